//! The HTTP listener: hyper's HTTP/1.1 server over a bound socket, with the limits a
//! listener open to anyone on the network needs, and the open-file limit raised to match.
//!
//! Without them a client that opens connections and sends nothing holds each one (and
//! its file descriptor) for ever: about 1,100 such connections used up a 1,024-descriptor
//! limit, and agentbus accepted nothing more — the homeserver's transactions included.
//! Here a connection that sends no request is closed after
//! [`ListenerLimits::header_read_timeout`] (or [`ListenerLimits::idle_timeout`]), and at
//! most [`ListenerLimits::max_connections`] are open at once. When that many are open,
//! a new connection is not refused and does not wait behind them: the connection that has
//! gone longest without a request in progress is closed to make room — as Apache's event
//! MPM closes idle keep-alive connections when it is full. So the homeserver's next
//! connection gets in at once, and, since it sends its request straight away, is not the
//! one closed for the next newcomer. Only when every connection has a request in progress
//! do new ones wait in the kernel's listen queue.
//!
//! Only HTTP/1.1 is served: homeservers and reverse proxies speak it to appservices, and
//! hyper's HTTP/2 detection reads a connection's first bytes without any timeout.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::throttle::LogThrottle;

/// How long connections may take and how many may be open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// How long a client may take to send a request's head (request line and headers),
    /// counted from when the connection can take a request: as it opens, and after each
    /// answer on a kept-alive connection — so it also ends idle kept-alive connections.
    pub header_read_timeout: Duration,
    /// How long a connection may stay open with no request in progress, whatever it is
    /// doing (waiting, trickling bytes, not reading its answer).
    pub idle_timeout: Duration,
    /// Most connections open at once; beyond it the longest-idle one is closed for the
    /// newcomer.
    pub max_connections: usize,
}

/// Serves `app` on `listener` within `limits` until `shutdown` is cancelled, then stops
/// accepting, lets requests in progress finish, and returns once every connection is
/// closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ListenerLimits,
    shutdown: CancellationToken,
) {
    let open_files = getrlimit(Resource::Nofile).current;
    let limits = ListenerLimits {
        max_connections: connections_within(limits.max_connections, open_files),
        ..limits
    };
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open = Arc::new(OpenConnections::default());
    let tasks = TaskTracker::new();
    let all_taken = LogThrottle::new(Duration::from_secs(60));
    let accept_failed = LogThrottle::new(Duration::from_secs(60));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, most likely: closing connections frees
                    // some, so wait a moment and accept again (what hyper and axum do).
                    if let Some(held_back) = accept_failed.admit() {
                        tracing::error!(error = %e, suppressed = held_back, "cannot accept connections");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        () = shutdown.cancelled() => break,
                    }
                }
            },
            () = shutdown.cancelled() => break,
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let closed_one = open.close_longest_idle();
                if let Some(held_back) = all_taken.admit() {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        suppressed = held_back,
                        "every connection slot is taken (appservice.max_connections); {}",
                        if closed_one {
                            "closing the connection idle longest for each new one"
                        } else {
                            "every connection has a request in progress, new ones wait"
                        }
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    () = shutdown.cancelled() => break,
                }
            }
        };
        tasks.spawn(serve_connection(
            stream,
            peer,
            app.clone(),
            limits,
            open.register(),
            shutdown.clone(),
            slot,
        ));
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// Errors of one connection that came and went before it was accepted.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serves one connection until the client closes it, a timeout ends it, it is closed
/// for a newcomer, or shutdown has let its request in progress finish. Holds `_slot` for
/// as long.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: ListenerLimits,
    registered: Registered,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let connection = registered.connection.clone();
    let mut activity = connection.activity.subscribe();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let mut request = request.map(axum::body::Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        let guard = InProgress::start(&connection);
        async move {
            let response = app.oneshot(request).await;
            drop(guard);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let http = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(http);
    let mut draining = false;
    loop {
        tokio::select! {
            result = http.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!(peer = %peer, error = %e, "connection ended");
                }
                return;
            }
            // Dropping the connection closes it: nothing is in progress on it.
            () = idle_for(&mut activity, limits.idle_timeout) => return,
            () = registered.connection.close.cancelled() => return,
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                http.as_mut().graceful_shutdown();
            }
        }
    }
}

/// What a connection is doing, as far as closing it goes.
#[derive(Debug, Clone, Copy)]
struct Activity {
    /// Requests in progress: from the call of the service until the answer is ready.
    in_progress: usize,
    /// When the last request ended (or the connection opened).
    idle_since: Instant,
}

/// One open connection, as the accept loop sees it.
#[derive(Debug)]
struct Connection {
    activity: watch::Sender<Activity>,
    /// Cancelled to close the connection for a newcomer.
    close: CancellationToken,
}

/// Every open connection, to find the longest-idle one when all slots are taken.
#[derive(Debug, Default)]
struct OpenConnections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Connection>>>,
}

impl OpenConnections {
    /// A new connection, idle since now, listed until the guard is dropped.
    fn register(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection {
            activity: watch::Sender::new(Activity {
                in_progress: 0,
                idle_since: Instant::now(),
            }),
            close: CancellationToken::new(),
        });
        self.list().insert(id, connection.clone());
        Registered {
            id,
            connection,
            open: self.clone(),
        }
    }

    /// Closes the connection that has had no request in progress for longest; false when
    /// every connection has one.
    fn close_longest_idle(&self) -> bool {
        let list = self.list();
        let longest_idle = list
            .values()
            .filter(|c| !c.close.is_cancelled())
            .filter_map(|c| {
                let activity = *c.activity.borrow();
                (activity.in_progress == 0).then_some((activity.idle_since, c))
            })
            .min_by_key(|(idle_since, _)| *idle_since);
        match longest_idle {
            Some((_, connection)) => {
                connection.close.cancel();
                true
            }
            None => false,
        }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection's place in [`OpenConnections`], given up when it closes.
struct Registered {
    id: u64,
    connection: Arc<Connection>,
    open: Arc<OpenConnections>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.open.list().remove(&self.id);
    }
}

/// One request in progress on a connection (dropped when its answer is ready, or when it
/// is abandoned).
struct InProgress(Arc<Connection>);

impl InProgress {
    fn start(connection: &Arc<Connection>) -> Self {
        connection.activity.send_modify(|a| a.in_progress += 1);
        Self(connection.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.activity.send_modify(|a| {
            a.in_progress -= 1;
            if a.in_progress == 0 {
                a.idle_since = Instant::now();
            }
        });
    }
}

/// Completes once no request has been in progress for `limit` in a row.
async fn idle_for(activity: &mut watch::Receiver<Activity>, limit: Duration) {
    loop {
        if activity.wait_for(|a| a.in_progress == 0).await.is_err() {
            // The connection is gone with its sender: it ends by itself.
            return std::future::pending().await;
        }
        if tokio::time::timeout(limit, activity.changed())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// `max_connections`, or half the open-file limit when that is smaller: connections must
/// leave descriptors for the store, the homeserver and the models.
fn connections_within(max_connections: usize, open_files: Option<u64>) -> usize {
    let Some(open_files) = open_files else {
        return max_connections;
    };
    let budget = usize::try_from(open_files / 2).unwrap_or(usize::MAX).max(1);
    if max_connections > budget {
        tracing::warn!(
            max_connections,
            open_files,
            using = budget,
            "appservice.max_connections is more than half the open-file limit; raise the \
             hard limit (ulimit -Hn, LimitNOFILE=) or lower appservice.max_connections"
        );
        return budget;
    }
    max_connections
}

/// The open-file limit before and after [`raise_open_files_limit`] (`None`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    pub soft_before: Option<u64>,
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard limit: the soft
/// limit is often 1,024 for compatibility with `select(2)`, which agentbus does not use,
/// and each connection, store file and outbound request takes a descriptor.
pub fn raise_open_files_limit() -> io::Result<OpenFilesLimit> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let mut limit = OpenFilesLimit {
        soft_before: current,
        soft: current,
        hard: maximum,
    };
    // An unlimited hard limit cannot be the soft one (Linux caps it at fs.nr_open):
    // leave the soft limit as it is then.
    if let Some(hard) = maximum
        && current.is_some_and(|soft| soft < hard)
    {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum,
            },
        )?;
        limit.soft = getrlimit(Resource::Nofile).current;
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_keep_half_the_open_file_limit_free() {
        assert_eq!(connections_within(512, Some(1024)), 512);
        assert_eq!(connections_within(512, Some(600)), 300);
        assert_eq!(connections_within(512, None), 512);
        assert_eq!(connections_within(512, Some(1)), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_clock_runs_only_while_no_request_is_in_progress() {
        let open = Arc::new(OpenConnections::default());
        let registered = open.register();
        let mut activity = registered.connection.activity.subscribe();
        let limit = Duration::from_secs(5);
        let started = Instant::now();
        idle_for(&mut activity, limit).await;
        assert_eq!(started.elapsed(), limit);

        // A request arrives after 3 s and takes 10 s; the clock starts again when it ends.
        let started = Instant::now();
        let connection = registered.connection.clone();
        let request = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let guard = InProgress::start(&connection);
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(guard);
        });
        idle_for(&mut activity, limit).await;
        assert_eq!(started.elapsed(), Duration::from_secs(3 + 10 + 5));
        request.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_listener_closes_the_connection_idle_longest() {
        let open = Arc::new(OpenConnections::default());
        let homeserver = open.register();
        tokio::time::advance(Duration::from_secs(1)).await;
        let idle = open.register();
        tokio::time::advance(Duration::from_secs(1)).await;
        let newest = open.register();

        // The oldest connection has a request in progress: it is not the one closed.
        let request = InProgress::start(&homeserver.connection);
        assert!(open.close_longest_idle());
        assert!(idle.connection.close.is_cancelled());
        assert!(!homeserver.connection.close.is_cancelled());
        assert!(!newest.connection.close.is_cancelled());

        // Its request over, it is the one idle for the shortest time.
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(request);
        assert!(open.close_longest_idle());
        assert!(newest.connection.close.is_cancelled());
        assert!(!homeserver.connection.close.is_cancelled());

        // A connection that closed is no longer listed; with every other one busy or
        // closing, nothing is closed.
        drop(idle);
        let _busy = InProgress::start(&homeserver.connection);
        assert!(!open.close_longest_idle());
        assert_eq!(open.list().len(), 2);
    }
}

//! When to try a request again: the backoff schedule for transient failures, and the
//! wait-out-the-outage loop for messages that must be delivered.

use std::time::Duration;

use ruma::{RoomId, UserId};
use tokio_util::sync::CancellationToken;

use super::error::{MatrixError, Undelivered};

/// The wait between rounds of retries while the homeserver is unreachable.
pub const UNREACHABLE_RETRY: Duration = Duration::from_secs(5);

/// Retry schedule for transient failures.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in total, including the first.
    pub attempts: u32,
    /// Delay before the first retry; doubles each time.
    pub initial_backoff: Duration,
    /// Upper bound for any single delay, including a server's `retry_after_ms`.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (0-based) after `error`, or `None` to give up.
    pub fn delay(&self, retry: u32, error: &MatrixError) -> Option<Duration> {
        if retry + 1 >= self.attempts {
            return None;
        }
        let backoff = self
            .initial_backoff
            .saturating_mul(1 << retry.min(16))
            .min(self.max_backoff);
        match error {
            MatrixError::Permanent { .. } => None,
            MatrixError::Network(_) => Some(backoff),
            MatrixError::Transient { retry_after, .. } => {
                Some(retry_after.unwrap_or(backoff).min(self.max_backoff))
            }
        }
    }

    /// Runs `attempt` until it succeeds, fails permanently or the attempts run out, sleeping
    /// [`RetryPolicy::delay`] between tries. `endpoint` names the request in the logs.
    pub(super) async fn run<T, F, Fut>(
        &self,
        endpoint: &'static str,
        mut attempt: F,
    ) -> Result<T, MatrixError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, MatrixError>>,
    {
        let mut retry = 0;
        loop {
            match attempt().await {
                Ok(response) => return Ok(response),
                Err(error) => match self.delay(retry, &error) {
                    Some(delay) => {
                        tracing::debug!(%error, ?delay, retry, endpoint, "retrying Matrix request");
                        tokio::time::sleep(delay).await;
                        retry += 1;
                    }
                    None => return Err(error),
                },
            }
        }
    }
}

/// Repeats `attempt` (itself a retried send of `user`'s message to `room_id`) until the
/// homeserver takes it, waiting [`UNREACHABLE_RETRY`] between rounds for as long as it is
/// down. Gives up on a permanent error, or when `stop` is cancelled.
pub(super) async fn until_delivered<T, F, Fut>(
    stop: &CancellationToken,
    user: &UserId,
    room_id: &RoomId,
    mut attempt: F,
) -> Result<T, Undelivered>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, MatrixError>>,
{
    let mut outage: Option<std::time::Instant> = None;
    loop {
        let attempt = tokio::select! {
            _ = stop.cancelled() => return Err(Undelivered::Stopped),
            attempt = attempt() => attempt,
        };
        match attempt {
            Ok(delivered) => {
                if let Some(since) = outage {
                    tracing::info!(room_id = %room_id, user = %user, down_for = ?since.elapsed(), "delivered a message held back by a homeserver outage");
                }
                return Ok(delivered);
            }
            Err(error @ MatrixError::Permanent { .. }) => {
                return Err(Undelivered::Permanent(error));
            }
            Err(error) => {
                if outage.is_none() {
                    tracing::warn!(room_id = %room_id, user = %user, %error, "homeserver unavailable; keeping the message and retrying until it is back");
                }
                outage.get_or_insert_with(std::time::Instant::now);
                tokio::select! {
                    _ = stop.cancelled() => return Err(Undelivered::Stopped),
                    _ = tokio::time::sleep(UNREACHABLE_RETRY) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::classify_error;

    #[test]
    fn limit_exceeded_is_transient_with_its_delay() {
        let body =
            br#"{"errcode":"M_LIMIT_EXCEEDED","error":"Too many requests","retry_after_ms":1500}"#;
        let error = classify_error(429, body);
        assert!(
            matches!(error, MatrixError::Transient { retry_after: Some(d), .. } if d == Duration::from_millis(1500))
        );
        assert_eq!(
            RetryPolicy::default().delay(0, &error),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn server_errors_retry_with_doubling_backoff_until_attempts_run_out() {
        let policy = RetryPolicy {
            attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(250),
        };
        let error = classify_error(502, b"<html>bad gateway</html>");
        assert_eq!(error.errcode(), None);
        let delays: Vec<_> = (0..4).map(|n| policy.delay(n, &error)).collect();
        assert_eq!(
            delays,
            [
                Some(Duration::from_millis(100)),
                Some(Duration::from_millis(200)),
                Some(Duration::from_millis(250)),
                None
            ]
        );
        let network = MatrixError::Network("connection refused".into());
        assert_eq!(policy.delay(0, &network), Some(Duration::from_millis(100)));
    }

    #[test]
    fn a_huge_retry_after_is_capped() {
        let error = classify_error(
            429,
            br#"{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":99999999}"#,
        );
        assert_eq!(
            RetryPolicy::default().delay(0, &error),
            Some(Duration::from_secs(30))
        );
    }

    /// An attempt that fails with each of `errors` in turn, then succeeds; counts its calls.
    fn scripted(
        errors: Vec<MatrixError>,
    ) -> (
        std::sync::Arc<std::sync::atomic::AtomicU32>,
        impl FnMut() -> std::future::Ready<Result<&'static str, MatrixError>>,
    ) {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut errors = errors.into_iter();
        let counter = calls.clone();
        let attempt = move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::future::ready(errors.next().map_or(Ok("delivered"), Err))
        };
        (calls, attempt)
    }

    fn busy() -> MatrixError {
        classify_error(502, b"bad gateway")
    }

    #[tokio::test(start_paused = true)]
    async fn run_sleeps_the_backoff_between_attempts_and_returns_the_success() {
        let policy = RetryPolicy {
            attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        let (calls, attempt) = scripted(vec![busy(), busy()]);
        let started = tokio::time::Instant::now();
        assert_eq!(policy.run("test", attempt).await.unwrap(), "delivered");
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert_eq!(started.elapsed(), Duration::from_millis(100 + 200));
    }

    #[tokio::test(start_paused = true)]
    async fn run_gives_up_after_the_attempts_with_the_last_error() {
        let policy = RetryPolicy {
            attempts: 2,
            ..RetryPolicy::default()
        };
        let (calls, attempt) = scripted(vec![busy(), busy(), busy()]);
        let error = policy.run("test", attempt).await.unwrap_err();
        assert!(matches!(error, MatrixError::Transient { status: 502, .. }));
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn until_delivered_waits_out_an_outage_and_stops_on_a_permanent_error() {
        let (user, room) = (ruma::user_id!("@damon:hs"), ruma::room_id!("!room:hs"));
        let stop = CancellationToken::new();
        let network = || MatrixError::Network("connection refused".into());
        let (calls, attempt) = scripted(vec![network(), busy()]);
        let started = tokio::time::Instant::now();
        let delivered = until_delivered(&stop, user, room, attempt).await.unwrap();
        assert_eq!(delivered, "delivered");
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert_eq!(started.elapsed(), 2 * UNREACHABLE_RETRY);

        let forbidden = classify_error(403, br#"{"errcode":"M_FORBIDDEN"}"#);
        let (calls, attempt) = scripted(vec![forbidden]);
        let refused = until_delivered(&stop, user, room, attempt).await;
        assert!(
            matches!(refused, Err(Undelivered::Permanent(e)) if e.errcode() == Some("M_FORBIDDEN"))
        );
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn until_delivered_stops_during_an_outage_when_told() {
        let (user, room) = (ruma::user_id!("@damon:hs"), ruma::room_id!("!room:hs"));
        let stop = CancellationToken::new();
        let canceller = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(UNREACHABLE_RETRY * 3 / 2).await;
            canceller.cancel();
        });
        let (calls, attempt) = scripted(vec![busy(); 10]);
        let stopped = until_delivered(&stop, user, room, attempt).await;
        assert!(matches!(stopped, Err(Undelivered::Stopped)));
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}

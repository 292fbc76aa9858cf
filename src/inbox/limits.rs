//! Rate limits on what people can make agents do: a token bucket per sender and one per
//! room (`routing.limits`), taken from before an agent is asked to answer. Each agent
//! answering a message takes one token from both; a bucket refills evenly over its
//! period. The first message over a limit gets a notice, the rest of that episode none.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use crate::config::{LimitsConfig, RateConfig};

/// Buckets kept per map before full ones are forgotten (a full bucket is the default).
const KEPT: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// The episode's notice was sent.
    noticed: bool,
}

impl Bucket {
    fn full(rate: RateConfig, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.answers),
            at: now,
            noticed: false,
        }
    }

    fn refill(&mut self, rate: RateConfig, now: Instant) {
        let per_token = rate.per.as_secs_f64() / f64::from(rate.answers);
        let gained = now.saturating_duration_since(self.at).as_secs_f64() / per_token;
        self.tokens = (self.tokens + gained).min(f64::from(rate.answers));
        self.at = now;
    }

    /// How long until `n` tokens are there.
    fn wait_for(&self, rate: RateConfig, n: f64) -> Duration {
        let per_token = rate.per.as_secs_f64() / f64::from(rate.answers);
        Duration::from_secs_f64(((n - self.tokens).max(0.0) * per_token).ceil())
    }
}

/// Which limit a message ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Sender,
    Room,
}

/// A message over a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub which: Which,
    /// The limit, as configured.
    pub rate: (u32, Duration),
    /// When the answers would fit again.
    pub retry_after: Duration,
    /// Whether this is the first message of the episode (the one that gets the notice).
    pub first: bool,
}

/// The buckets of one kind of key.
struct Buckets<K> {
    rate: RateConfig,
    map: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(rate: RateConfig) -> Self {
        Self {
            rate,
            map: HashMap::new(),
        }
    }

    /// The key's bucket, refilled to `now` (a new key starts full).
    fn refilled(&mut self, key: K, now: Instant) -> &mut Bucket {
        let rate = self.rate;
        if self.map.len() >= KEPT && !self.map.contains_key(&key) {
            let cap = f64::from(rate.answers);
            self.map.retain(|_, b| {
                b.refill(rate, now);
                b.tokens < cap
            });
        }
        let bucket = self
            .map
            .entry(key)
            .or_insert_with(|| Bucket::full(rate, now));
        bucket.refill(rate, now);
        bucket
    }
}

/// The per-sender and per-room limits.
pub struct Limits {
    inner: Mutex<(Buckets<OwnedUserId>, Buckets<OwnedRoomId>)>,
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Self {
        Self {
            inner: Mutex::new((
                Buckets::new(config.per_sender),
                Buckets::new(config.per_room),
            )),
        }
    }

    /// Takes `answers` tokens for `sender` in `room`, from both buckets or from neither.
    pub fn take(
        &self,
        sender: &UserId,
        room: &RoomId,
        answers: usize,
        now: Instant,
    ) -> Result<(), Limited> {
        let n = answers as f64;
        let mut inner = self.inner.lock().expect("limits lock");
        let (senders, rooms) = &mut *inner;
        let (sender_rate, room_rate) = (senders.rate, rooms.rate);
        let by_sender = senders.refilled(sender.to_owned(), now);
        let by_room = rooms.refilled(room.to_owned(), now);
        let over = if by_sender.tokens < n {
            Some((Which::Sender, sender_rate))
        } else if by_room.tokens < n {
            Some((Which::Room, room_rate))
        } else {
            None
        };
        if let Some((which, rate)) = over {
            let bucket = match which {
                Which::Sender => by_sender,
                Which::Room => by_room,
            };
            let first = !bucket.noticed;
            bucket.noticed = true;
            return Err(Limited {
                which,
                rate: (rate.answers, rate.per),
                retry_after: bucket.wait_for(rate, n),
                first,
            });
        }
        for bucket in [by_sender, by_room] {
            bucket.tokens -= n;
            bucket.noticed = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use ruma::{owned_room_id, owned_user_id};

    use super::*;

    fn limits(sender: (u32, u64), room: (u32, u64)) -> Limits {
        let rate = |(answers, secs): (u32, u64)| RateConfig {
            answers,
            per: Duration::from_secs(secs),
        };
        Limits::new(&LimitsConfig {
            per_sender: rate(sender),
            per_room: rate(room),
        })
    }

    #[test]
    fn a_sender_gets_their_burst_then_one_notice_then_tokens_back_over_time() {
        let limits = limits((2, 60), (100, 60));
        let (alice, room) = (owned_user_id!("@alice:hs"), owned_room_id!("!r:hs"));
        let t0 = Instant::now();
        assert_eq!(limits.take(&alice, &room, 1, t0), Ok(()));
        assert_eq!(limits.take(&alice, &room, 1, t0), Ok(()));
        let over = limits.take(&alice, &room, 1, t0).unwrap_err();
        assert_eq!(over.which, Which::Sender);
        assert!(over.first);
        assert_eq!(over.retry_after, Duration::from_secs(30));
        assert!(!limits.take(&alice, &room, 1, t0).unwrap_err().first);
        // One token comes back every 30 s; the next episode gets its notice again.
        assert_eq!(
            limits.take(&alice, &room, 1, t0 + Duration::from_secs(30)),
            Ok(())
        );
        let again = limits
            .take(&alice, &room, 1, t0 + Duration::from_secs(31))
            .unwrap_err();
        assert!(again.first);
    }

    #[test]
    fn a_room_limit_binds_every_sender_and_a_refusal_takes_nothing() {
        let limits = limits((3, 60), (3, 60));
        let (room, other) = (owned_room_id!("!r:hs"), owned_room_id!("!other:hs"));
        let (alice, bob) = (owned_user_id!("@alice:hs"), owned_user_id!("@bob:hs"));
        let t0 = Instant::now();
        // A broadcast to three agents takes three.
        assert_eq!(limits.take(&alice, &room, 3, t0), Ok(()));
        let over = limits.take(&bob, &room, 1, t0).unwrap_err();
        assert_eq!(over.which, Which::Room);
        // Bob's own bucket was not charged for the refused message.
        for _ in 0..3 {
            assert_eq!(limits.take(&bob, &other, 1, t0), Ok(()));
        }
        assert_eq!(
            limits.take(&bob, &other, 1, t0).unwrap_err().which,
            Which::Sender
        );
    }

    #[test]
    fn many_senders_do_not_grow_the_buckets_without_bound() {
        let limits = limits((5, 60), (1_000_000, 60));
        let room = owned_room_id!("!r:hs");
        let t0 = Instant::now();
        for i in 0..3 * KEPT {
            let user = UserId::parse(format!("@u{i}:hs")).unwrap();
            limits
                .take(&user, &room, 1, t0 + Duration::from_secs(60) * i as u32)
                .unwrap();
        }
        assert!(limits.inner.lock().unwrap().0.map.len() <= KEPT);
    }
}

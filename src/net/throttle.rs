//! Log lines that anyone on the network can trigger (a wrong token, a full listener) are
//! let through at most once per interval, with a count of the ones held back, so a flood
//! of requests cannot flood the log.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Admits one log line per `every`; counts the others.
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the next line may be logged (`None`: now).
    next: Option<Instant>,
    /// Lines held back since the last one logged.
    held_back: u64,
}

impl LogThrottle {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new(State {
                next: None,
                held_back: 0,
            }),
        }
    }

    /// `Some(n)` when this line may be logged, `n` being how many were held back since
    /// the last one; `None` when it is to be held back.
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.next.is_some_and(|next| now < next) {
            state.held_back += 1;
            return None;
        }
        state.next = Some(now + self.every);
        Some(std::mem::take(&mut state.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_with_the_count_held_back() {
        let throttle = LogThrottle::new(Duration::from_secs(30));
        assert_eq!(throttle.admit(), Some(0), "the first line is logged");
        for _ in 0..999 {
            assert_eq!(throttle.admit(), None);
        }
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(throttle.admit(), None, "still within the interval");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            throttle.admit(),
            Some(1000),
            "the next line says how many were held back"
        );
        assert_eq!(throttle.admit(), None);
        // After a quiet spell the next line is logged at once, and counts only its own
        // interval's held-back lines.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(throttle.admit(), Some(1));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(throttle.admit(), Some(0));
    }
}

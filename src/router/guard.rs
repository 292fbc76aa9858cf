//! The loop guard's memory: how many events each pair of agents exchanged recently, and
//! which pairs are cooling down. Time is passed in, never read, so the router stays pure.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::config::AgentId;

/// Recent agent-to-agent traffic, per unordered pair of agent ids.
#[derive(Debug, Default, Clone)]
pub struct LoopGuard {
    exchanges: HashMap<(AgentId, AgentId), VecDeque<u64>>,
    cooled_until: HashMap<(AgentId, AgentId), u64>,
}

fn pair(a: &AgentId, b: &AgentId) -> (AgentId, AgentId) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

impl LoopGuard {
    /// Whether the pair `a`–`b` is cooling down at `now_ms`.
    pub fn is_cooled(&self, a: &AgentId, b: &AgentId, now_ms: u64) -> bool {
        self.cooled_until
            .get(&pair(a, b))
            .is_some_and(|&until| now_ms < until)
    }

    /// Records that `from` sent an event that was routed to `to` at `now_ms`. When the pair
    /// has now exchanged more than `limit` events within `window`, it is cooled down for
    /// `cooldown` and its count restarts; returns whether that happened.
    pub fn record(
        &mut self,
        from: &AgentId,
        to: &AgentId,
        now_ms: u64,
        limit: usize,
        window: Duration,
        cooldown: Duration,
    ) -> bool {
        let key = pair(from, to);
        let times = self.exchanges.entry(key.clone()).or_default();
        times.push_back(now_ms);
        let start = now_ms.saturating_sub(window.as_millis() as u64);
        while times.front().is_some_and(|&t| t < start) {
            times.pop_front();
        }
        if times.len() > limit {
            times.clear();
            self.cooled_until
                .insert(key, now_ms + cooldown.as_millis() as u64);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn agents<const N: usize>(ids: [&str; N]) -> [AgentId; N] {
        ids.map(|id| AgentId::parse(id).unwrap())
    }

    #[test]
    fn more_than_the_limit_within_the_window_cools_the_pair_down() {
        let [damon, coder, researcher] = &agents(["damon", "coder", "researcher"]);
        let mut guard = LoopGuard::default();
        for i in 0..20 {
            assert!(!guard.record(damon, coder, 1_000 + i * 100, 20, MINUTE, MINUTE));
        }
        assert!(!guard.is_cooled(coder, damon, 3_000));
        // The 21st event in 60 s, sent in the other direction: same pair.
        assert!(guard.record(coder, damon, 3_000, 20, MINUTE, MINUTE));
        assert!(guard.is_cooled(damon, coder, 3_001));
        assert!(guard.is_cooled(coder, damon, 62_999));
        assert!(!guard.is_cooled(coder, damon, 63_000));
        assert!(!guard.is_cooled(damon, researcher, 3_001));
    }

    #[test]
    fn events_spread_over_more_than_the_window_never_cool() {
        let [a, b] = &agents(["a", "b"]);
        let mut guard = LoopGuard::default();
        for i in 0..100u64 {
            assert!(!guard.record(a, b, i * 4_000, 20, MINUTE, MINUTE));
        }
        assert!(!guard.is_cooled(a, b, 400_000));
    }
}

//! Partition leases: which holder (a worker process) drains which rooms' events.
//!
//! Rooms are spread over [`PARTITIONS`] partitions by a stable hash of their ID, so events
//! of one room always land in the same partition and keep their order under one holder. A
//! holder claims partitions for a lease period and renews before it runs out; a lease not
//! renewed expires and another holder may take the partitions over.
//!
//! [`LeaseTable`] is the single-process implementation the embedded backends share: their
//! database is locked to one process, so leases need not outlive it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ruma::RoomId;

use super::StoreError;

/// How many partitions rooms are spread over.
pub const PARTITIONS: u16 = 64;

/// One slice of the rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Partition(pub u16);

impl Partition {
    /// The partition of `room`: FNV-1a of its ID, so every process and version agrees.
    pub fn of(room: &RoomId) -> Self {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in room.as_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self((hash % u64::from(PARTITIONS)) as u16)
    }

    /// Every partition.
    pub fn all() -> Vec<Self> {
        (0..PARTITIONS).map(Self).collect()
    }
}

/// Partitions granted to a holder until `expires_ms` (unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub partitions: Vec<Partition>,
    pub expires_ms: u64,
}

impl Lease {
    pub fn holds(&self, partition: Partition) -> bool {
        self.partitions.binary_search(&partition).is_ok()
    }
}

fn millis(period: Duration) -> u64 {
    u64::try_from(period.as_millis()).unwrap_or(u64::MAX)
}

/// Who holds each partition, and until when.
#[derive(Default)]
pub struct LeaseTable {
    held: Mutex<HashMap<Partition, (String, u64)>>,
}

impl LeaseTable {
    pub fn claim(
        &self,
        holder: &str,
        partitions: &[Partition],
        period: Duration,
        now_ms: u64,
    ) -> Lease {
        let expires_ms = now_ms.saturating_add(millis(period));
        let mut held = self.held.lock().expect("lease table");
        let mut granted: Vec<Partition> = partitions
            .iter()
            .copied()
            .filter(|p| match held.get(p) {
                Some((owner, until)) => owner == holder || *until < now_ms,
                None => true,
            })
            .collect();
        granted.sort_unstable();
        granted.dedup();
        for p in &granted {
            held.insert(*p, (holder.to_owned(), expires_ms));
        }
        Lease {
            holder: holder.to_owned(),
            partitions: granted,
            expires_ms,
        }
    }

    pub fn renew(&self, lease: &Lease, period: Duration, now_ms: u64) -> Result<Lease, StoreError> {
        let expires_ms = now_ms.saturating_add(millis(period));
        let mut held = self.held.lock().expect("lease table");
        let mut kept = Vec::with_capacity(lease.partitions.len());
        for p in &lease.partitions {
            let ours = match held.get(p) {
                Some((owner, until)) => owner == &lease.holder || *until < now_ms,
                None => true,
            };
            if ours {
                held.insert(*p, (lease.holder.clone(), expires_ms));
                kept.push(*p);
            }
        }
        if kept.is_empty() && !lease.partitions.is_empty() {
            return Err(StoreError::Conflict(format!(
                "every partition of {}'s lease was taken over",
                lease.holder
            )));
        }
        Ok(Lease {
            holder: lease.holder.clone(),
            partitions: kept,
            expires_ms,
        })
    }

    pub fn release(&self, lease: &Lease) {
        let mut held = self.held.lock().expect("lease table");
        for p in &lease.partitions {
            if held.get(p).is_some_and(|(owner, _)| owner == &lease.holder) {
                held.remove(p);
            }
        }
    }

    /// Fails with [`StoreError::Conflict`] unless `lease`'s holder still owns `partition`
    /// (an expired lease nobody took over still counts: its holder renews it next).
    pub fn check(&self, lease: &Lease, partition: Partition) -> Result<(), StoreError> {
        let held = self.held.lock().expect("lease table");
        match held.get(&partition) {
            Some((owner, _)) if owner == &lease.holder => Ok(()),
            Some((owner, _)) => Err(StoreError::Conflict(format!(
                "partition {} is held by {owner}, not {}",
                partition.0, lease.holder
            ))),
            None => Err(StoreError::Conflict(format!(
                "partition {} is not claimed by {}",
                partition.0, lease.holder
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_always_lands_in_the_same_partition() {
        let room = RoomId::parse("!abc:example.org").unwrap();
        assert_eq!(Partition::of(&room), Partition::of(&room));
        assert!(Partition::of(&room).0 < PARTITIONS);
        // Rooms spread: 1000 rooms touch most partitions.
        let used: std::collections::HashSet<Partition> = (0..1000)
            .map(|n| Partition::of(&RoomId::parse(format!("!r{n}:x")).unwrap()))
            .collect();
        assert!(
            used.len() > usize::from(PARTITIONS) * 9 / 10,
            "{}",
            used.len()
        );
    }
}

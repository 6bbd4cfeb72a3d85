//! Byte-range locks per disk, in arrival order.
//!
//! A read-modify-write of a 4 KiB block (a compare-and-write, a sub-block write) must not
//! interleave with another write of that block on the same node: the other write's bytes
//! would be lost when the read-modify-write puts back what it read. So a node takes, for each
//! write it issues or serves, a lock on the blocks it changes: **shared** for writes of whole
//! blocks (they may run together), **exclusive** for read-modify-write.
//!
//! Locks are granted first come, first served among those that conflict: a request is granted
//! once no request that arrived before it overlaps it with an exclusive side. Nothing starves,
//! and two requests can never wait for each other (each waits only for older ones).
//!
//! A request is registered before it waits, and its [`RangeGuard`] removes it when dropped, so
//! a waiter that is cancelled leaves nothing behind.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::Mutex;

use csvd_raft::volume::DiskId;
use tokio::sync::Notify;

use crate::node::lock;

/// The lock table of one node.
#[derive(Debug, Default)]
pub(crate) struct RangeLocks {
    table: Mutex<Table>,
    released: Notify,
}

/// Held (or awaited) ranges per disk, oldest first.
#[derive(Debug, Default)]
struct Table {
    next: u64,
    by_disk: HashMap<DiskId, Vec<Entry>>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

impl Entry {
    fn conflicts(&self, other: &Entry) -> bool {
        (self.exclusive || other.exclusive) && self.start < other.end && other.start < self.end
    }
}

impl Table {
    fn register(&mut self, disk: DiskId, start: u64, end: u64, exclusive: bool) -> u64 {
        self.next += 1;
        let id = self.next;
        self.by_disk.entry(disk).or_default().push(Entry {
            id,
            start,
            end,
            exclusive,
        });
        id
    }

    /// Whether request `id` may proceed: no older request conflicts with it.
    fn granted(&self, disk: DiskId, id: u64) -> bool {
        let Some(entries) = self.by_disk.get(&disk) else {
            return true;
        };
        let Some(pos) = entries.iter().position(|e| e.id == id) else {
            return true;
        };
        let me = &entries[pos];
        !entries[..pos].iter().any(|e| e.conflicts(me))
    }

    fn release(&mut self, disk: DiskId, id: u64) {
        if let Some(entries) = self.by_disk.get_mut(&disk) {
            entries.retain(|e| e.id != id);
            if entries.is_empty() {
                self.by_disk.remove(&disk);
            }
        }
    }
}

impl RangeLocks {
    /// Locks `start..end` of `disk`, exclusively or shared; waits for older conflicting
    /// requests to release theirs.
    pub(crate) async fn lock(
        &self,
        disk: DiskId,
        start: u64,
        end: u64,
        exclusive: bool,
    ) -> RangeGuard<'_> {
        let id = lock(&self.table).register(disk, start, end, exclusive);
        let guard = RangeGuard {
            locks: self,
            disk,
            id,
        };
        loop {
            // Listen before looking, so a release between the two is not missed.
            let mut released = pin!(self.released.notified());
            released.as_mut().enable();
            if lock(&self.table).granted(disk, id) {
                return guard;
            }
            released.await;
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        lock(&self.table).by_disk.values().map(Vec::len).sum()
    }
}

/// A granted range; released when dropped.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    disk: DiskId,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        lock(&self.locks.table).release(self.disk, self.id);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn test_range_table_grants_in_arrival_order() {
        let mut t = Table::default();
        let a = t.register(1, 0, 8192, false);
        let b = t.register(1, 4096, 12288, false);
        // Shared with shared: both run.
        assert!(t.granted(1, a) && t.granted(1, b));
        // Exclusive over a shared one waits; another disk or a disjoint range does not.
        let x = t.register(1, 8192, 12288, true);
        let other_disk = t.register(2, 0, 4096, true);
        let disjoint = t.register(1, 16384, 20480, true);
        assert!(!t.granted(1, x));
        assert!(t.granted(2, other_disk) && t.granted(1, disjoint));
        // A shared request arriving after the waiting exclusive one queues behind it.
        let late = t.register(1, 8192, 12288, false);
        assert!(!t.granted(1, late));
        t.release(1, b);
        assert!(t.granted(1, x) && !t.granted(1, late));
        t.release(1, x);
        assert!(t.granted(1, late));
        // Adjacent ranges do not overlap.
        let edge = t.register(1, 12288, 16384, true);
        assert!(t.granted(1, edge));
        for id in [a, late, disjoint, edge] {
            t.release(1, id);
        }
        t.release(2, other_disk);
        assert!(t.by_disk.is_empty());
    }

    #[tokio::test]
    async fn test_range_lock_excludes_and_cleans_up() {
        let locks = Arc::new(RangeLocks::default());
        let held = locks.lock(7, 0, 4096, true).await;
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _g = locks.lock(7, 0, 4096, false).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "a shared lock waits for an exclusive one"
        );
        // A cancelled waiter leaves nothing behind.
        let cancelled = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _g = locks.lock(7, 0, 4096, true).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        cancelled.abort();
        let _ = cancelled.await;
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter runs once the range is released")
            .unwrap();
        assert_eq!(locks.held(), 0);
    }
}

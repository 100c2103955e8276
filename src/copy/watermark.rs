//! Deciding, at a chunk's high watermark, which of its copied rows are still current.
//!
//! Pure logic, driven by the change stream in stream order: `lw:<chunk>` opens a window,
//! every committed transaction inside the window marks the keys it changed as touched, and
//! `hw:<chunk>` closes it. The chunk's untouched rows may be applied at the high watermark;
//! touched keys already carry a newer state in the stream.
//!
//! One race plain DBLog leaves open is closed here: a transaction can write its commit
//! record just before the low watermark yet still be in progress for the chunk's snapshot
//! (commit record written, not yet removed from the proc array — a window that grows with
//! fsync and synchronous-standby waits). Its change precedes `lw`, so it is not marked
//! touched, and the chunk holds the older row: applying it would lose the update. The chunk's
//! snapshot lists such transactions in `xip`; if any of them committed before `lw` in the
//! stream, the outcome is [`HighOutcome::Retry`] and the chunk must be read again.
//!
//! Only committed transactions may touch keys (an aborted one never reaches the stream, and
//! a streamed one is reported at Stream Commit): discarding a chunk row because of a change
//! that never committed would lose the row.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

use super::chunk::Snapshot;
use crate::pgoutput::Xid;

/// How many recent commits are remembered for the race check. A transaction that sits
/// between its commit record and its proc-array exit while this many others commit escapes
/// the check; at 50 k commits/s that is five seconds.
pub const RECENT_COMMITS: usize = 262_144;

/// What to do with a chunk when its high watermark arrives.
#[derive(Debug, Clone)]
pub enum HighOutcome<K> {
    /// Apply the chunk's rows except those whose key is in `touched`.
    Apply {
        /// Keys changed by transactions committed inside the window.
        touched: HashSet<K>,
    },
    /// The chunk's snapshot missed a transaction that committed before the low watermark:
    /// read the chunk again (with new watermarks).
    Retry {
        /// The transaction that caused it.
        xid: Xid,
    },
    /// No open window for this chunk (a stale watermark from before a restart): ignore.
    Unknown,
}

impl<K: Hash + Eq> PartialEq for HighOutcome<K> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (HighOutcome::Apply { touched: a }, HighOutcome::Apply { touched: b }) => a == b,
            (HighOutcome::Retry { xid: a }, HighOutcome::Retry { xid: b }) => a == b,
            (HighOutcome::Unknown, HighOutcome::Unknown) => true,
            _ => false,
        }
    }
}

#[derive(Debug)]
struct Window<K> {
    touched: HashSet<K>,
    opened_at: u64,
}

/// Tracks open watermark windows over the change stream.
#[derive(Debug)]
pub struct WatermarkTracker<K> {
    windows: HashMap<u64, Window<K>>,
    commit_seq: u64,
    recent: VecDeque<(Xid, u64)>,
    recent_index: HashMap<Xid, u64>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone> Default for WatermarkTracker<K> {
    fn default() -> Self {
        Self::with_capacity(RECENT_COMMITS)
    }
}

impl<K: Hash + Eq + Clone> WatermarkTracker<K> {
    /// A tracker remembering `capacity` recent commits for the race check.
    pub fn with_capacity(capacity: usize) -> Self {
        WatermarkTracker {
            windows: HashMap::new(),
            commit_seq: 0,
            recent: VecDeque::new(),
            recent_index: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// The stream reached `lw:<chunk>`.
    pub fn on_low(&mut self, chunk: u64) {
        self.windows.insert(
            chunk,
            Window {
                touched: HashSet::new(),
                opened_at: self.commit_seq,
            },
        );
    }

    /// A transaction committed in the stream, having changed `keys` (for an update that
    /// changed the key, both the old and the new key).
    pub fn on_commit<I: IntoIterator<Item = K>>(&mut self, xid: Xid, keys: I) {
        self.commit_seq += 1;
        if !self.windows.is_empty() {
            let keys: Vec<K> = keys.into_iter().collect();
            for w in self.windows.values_mut() {
                w.touched.extend(keys.iter().cloned());
            }
        }
        self.recent.push_back((xid, self.commit_seq));
        self.recent_index.insert(xid, self.commit_seq);
        while self.recent.len() > self.capacity {
            if let Some((old, seq)) = self.recent.pop_front() {
                // A wrapped-around xid may have been re-inserted with a newer sequence.
                if self.recent_index.get(&old) == Some(&seq) {
                    self.recent_index.remove(&old);
                }
            }
        }
    }

    /// The stream reached `hw:<chunk>`; `snapshot` is the one the chunk was read in.
    pub fn on_high(&mut self, chunk: u64, snapshot: &Snapshot) -> HighOutcome<K> {
        let Some(w) = self.windows.remove(&chunk) else {
            return HighOutcome::Unknown;
        };
        // Every transaction that committed before the low watermark must be visible to the
        // chunk's snapshot. An invisible one is either in `xip` or — easy to miss, and seen in
        // the crash soak — has an xid at or above `xmax`, which is latestCompletedXid + 1 and
        // not the next xid to be assigned: such a running transaction is invisible without
        // being listed.
        let before_lw = self
            .recent
            .iter()
            .rev()
            .skip_while(|&&(_, seq)| seq > w.opened_at);
        for &(xid, _) in before_lw {
            if !snapshot.sees(xid) {
                return HighOutcome::Retry { xid };
            }
        }
        HighOutcome::Apply { touched: w.touched }
    }

    /// Forgets every open window (after a reconnect, in-flight chunks are read again).
    pub fn reset_windows(&mut self) {
        self.windows.clear();
    }

    /// How many windows are open.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(xip: &[u64]) -> Snapshot {
        Snapshot {
            xmin: 1,
            xmax: 1000,
            xip: xip.to_vec(),
        }
    }

    #[test]
    fn keys_committed_inside_the_window_are_touched() {
        let mut t = WatermarkTracker::default();
        t.on_commit(10, [1]);
        t.on_low(7);
        t.on_commit(11, [2, 3]);
        t.on_commit(12, [3]);
        let HighOutcome::Apply { touched } = t.on_high(7, &snap(&[])) else {
            panic!()
        };
        assert_eq!(touched, HashSet::from([2, 3]));
        t.on_commit(13, [4]);
        assert_eq!(t.open_windows(), 0);
    }

    #[test]
    fn overlapping_windows_each_see_their_own_commits() {
        let mut t = WatermarkTracker::default();
        t.on_low(1);
        t.on_commit(20, ["a"]);
        t.on_low(2);
        t.on_commit(21, ["b"]);
        assert_eq!(
            t.on_high(1, &snap(&[])),
            HighOutcome::Apply {
                touched: HashSet::from(["a", "b"])
            }
        );
        t.on_commit(22, ["c"]);
        assert_eq!(
            t.on_high(2, &snap(&[])),
            HighOutcome::Apply {
                touched: HashSet::from(["b", "c"])
            }
        );
    }

    #[test]
    fn a_transaction_committed_before_lw_but_invisible_to_the_chunk_forces_a_retry() {
        let mut t: WatermarkTracker<i32> = WatermarkTracker::default();
        t.on_commit(30, [1]);
        t.on_low(5);
        // xid 30 is in the chunk snapshot's in-progress list: the chunk missed its change.
        assert_eq!(t.on_high(5, &snap(&[30])), HighOutcome::Retry { xid: 30 });
    }

    #[test]
    fn a_transaction_at_or_above_xmax_committed_before_lw_forces_a_retry() {
        // Seen in the crash soak: xmin = xmax = 297285, xip empty, and xid 297285 had written
        // its commit record before the low watermark but not yet left the proc array.
        let mut t: WatermarkTracker<i32> = WatermarkTracker::default();
        t.on_commit(297_284, [1]);
        t.on_commit(297_285, [2]);
        t.on_low(5);
        let s = Snapshot {
            xmin: 297_285,
            xmax: 297_285,
            xip: vec![],
        };
        assert_eq!(t.on_high(5, &s), HighOutcome::Retry { xid: 297_285 });
        // Once the snapshot sees it, the chunk may be applied.
        t.on_low(6);
        let s = Snapshot {
            xmin: 297_286,
            xmax: 297_286,
            xip: vec![],
        };
        assert!(matches!(t.on_high(6, &s), HighOutcome::Apply { .. }));
    }

    #[test]
    fn in_progress_transactions_committing_inside_the_window_are_fine() {
        let mut t = WatermarkTracker::default();
        t.on_low(5);
        t.on_commit(31, [9]);
        // 31 was in progress for the snapshot and committed after lw: touched, not a race.
        assert_eq!(
            t.on_high(5, &snap(&[31, 99])),
            HighOutcome::Apply {
                touched: HashSet::from([9])
            }
        );
    }

    #[test]
    fn unknown_and_reset_windows_are_ignored() {
        let mut t: WatermarkTracker<i32> = WatermarkTracker::default();
        assert_eq!(t.on_high(3, &snap(&[])), HighOutcome::Unknown);
        t.on_low(3);
        t.reset_windows();
        assert_eq!(t.on_high(3, &snap(&[])), HighOutcome::Unknown);
    }

    #[test]
    fn recent_commits_are_bounded() {
        let mut t: WatermarkTracker<i32> = WatermarkTracker::with_capacity(4);
        for x in 0..100 {
            t.on_commit(x, []);
        }
        assert_eq!(t.recent.len(), 4);
        assert_eq!(t.recent_index.len(), 4);
        t.on_low(1);
        // xid 10 scrolled out long ago; xid 98 is remembered.
        assert!(matches!(
            t.on_high(1, &snap(&[10])),
            HighOutcome::Apply { .. }
        ));
        t.on_low(2);
        assert_eq!(t.on_high(2, &snap(&[98])), HighOutcome::Retry { xid: 98 });
    }
}

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

    /// Forgets the window of `chunk`, if open: its read failed and another one replaces it.
    pub fn forget(&mut self, chunk: u64) {
        self.windows.remove(&chunk);
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

/// Pairs the copier's reads with their watermarks when a job is read more than once.
///
/// A job (a key range, or keys to re-read) is read again when a read fails — its session was
/// terminated, say — and when the race check asks for it. Each read has its own id, carried by
/// its watermarks, so that a high watermark is only ever matched with the rows read between it
/// and its own low watermark. A failed read may leave behind a window (its `lw` was emitted)
/// or rows (sent before its `hw` failed): once a newer read of the job is under way they are
/// stale, and keeping them would hold a worker's permit and keep "caught up" from ever being
/// reached. The rows of a read are sent before its `hw` is emitted, so at an `hw` the rows
/// are either here or on their way — unless a newer read of the job was already finished, in
/// which case they may have been dropped and must not be waited for.
#[derive(Debug)]
pub struct ReadBook<C> {
    /// Rows that arrived, by read id, with their job.
    ready: HashMap<u64, (u64, C)>,
    /// The read whose window is open, by job.
    open: HashMap<u64, u64>,
    /// The newest read handled at its high watermark, by job.
    finished: HashMap<u64, u64>,
    /// Jobs whose rows were applied: any other read of them is redundant.
    completed: HashSet<u64>,
}

/// What to do at a read's high watermark.
#[derive(Debug, PartialEq, Eq)]
pub enum AtHigh {
    /// A newer read of the same job was already finished, or the job is complete: ignore
    /// this one.
    Stale,
    /// Take the rows with [`ReadBook::take`], after receiving until they have arrived.
    Take,
}

impl<C> Default for ReadBook<C> {
    fn default() -> Self {
        ReadBook {
            ready: HashMap::new(),
            open: HashMap::new(),
            finished: HashMap::new(),
            completed: HashSet::new(),
        }
    }
}

impl<C> ReadBook<C> {
    /// The rows of read `read` of job `job` arrived. Those of a read older than one already
    /// finished, or of a complete job, are dropped at once.
    pub fn arrived(&mut self, job: u64, read: u64, rows: C) {
        if self.stale(job, read) {
            return;
        }
        self.ready.insert(read, (job, rows));
    }

    fn stale(&self, job: u64, read: u64) -> bool {
        self.completed.contains(&job) || self.finished.get(&job).is_some_and(|&f| f >= read)
    }

    /// The stream reached the low watermark of read `read` of job `job`; returns the older
    /// read of the job whose window is still open, which the caller forgets.
    pub fn on_low(&mut self, job: u64, read: u64) -> Option<u64> {
        self.open.insert(job, read).filter(|&old| old != read)
    }

    /// The stream reached the high watermark of read `read` of job `job`.
    pub fn at_high(&self, job: u64, read: u64) -> AtHigh {
        if self.stale(job, read) {
            AtHigh::Stale
        } else {
            AtHigh::Take
        }
    }

    /// Whether the rows of `read` have arrived.
    pub fn has(&self, read: u64) -> bool {
        self.ready.contains_key(&read)
    }

    /// Takes the rows of read `read` of job `job` at its high watermark, and drops the rows
    /// of the job's older reads: their high watermarks, if they ever come, are stale now.
    pub fn take(&mut self, job: u64, read: u64) -> Option<C> {
        let rows = self.ready.remove(&read).map(|(_, c)| c);
        self.finished.insert(job, read);
        if self.open.get(&job) == Some(&read) {
            self.open.remove(&job);
        }
        self.ready.retain(|&r, (j, _)| *j != job || r > read);
        rows
    }

    /// The rows `take` gave for `job` were applied: the job is done, and the rows of any
    /// other read of it — one retried although its `hw` reached the WAL — are dropped.
    pub fn complete(&mut self, job: u64) {
        self.completed.insert(job);
        self.ready.retain(|_, (j, _)| *j != job);
    }

    /// Whether no rows wait for their high watermark.
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
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

    #[test]
    fn a_read_is_matched_only_with_its_own_watermarks() {
        let mut b = ReadBook::default();
        // Read 1 of job 5 sent its rows, then its hw failed; read 2 replaces it.
        assert_eq!(b.on_low(5, 1), None);
        b.arrived(5, 1, "stale");
        assert_eq!(b.on_low(5, 2), Some(1), "read 1's window is forgotten");
        assert_eq!(b.at_high(5, 2), AtHigh::Take);
        assert!(!b.has(2), "read 1's rows must not stand in for read 2's");
        b.arrived(5, 2, "fresh");
        assert_eq!(b.take(5, 2), Some("fresh"));
        assert!(
            b.is_empty(),
            "read 1's rows are dropped (and their permit freed)"
        );
        // Read 1's hw, late: stale, not waited for; its rows, late: dropped.
        assert_eq!(b.at_high(5, 1), AtHigh::Stale);
        b.arrived(5, 1, "late");
        assert!(b.is_empty());
    }

    #[test]
    fn a_late_high_watermark_of_an_older_read_keeps_the_newer_rows() {
        let mut b = ReadBook::default();
        b.on_low(3, 1);
        b.arrived(3, 1, "one");
        b.on_low(3, 2);
        b.arrived(3, 2, "two");
        // hw 1 came after all (the session died after writing it).
        assert_eq!(b.at_high(3, 1), AtHigh::Take);
        assert_eq!(b.take(3, 1), Some("one"));
        assert!(b.has(2), "the newer read's rows stay for its own hw");
        assert_eq!(b.take(3, 2), Some("two"));
        assert!(b.is_empty());
        // A read retried after its predecessor's hw did reach the WAL: once the job is
        // complete, the retry is redundant, whenever its rows and hw come.
        b.on_low(6, 10);
        b.arrived(6, 10, "first");
        b.on_low(6, 11);
        b.arrived(6, 11, "retry, early");
        assert_eq!(b.take(6, 10), Some("first"));
        b.complete(6);
        assert!(!b.has(11), "the retry's rows are dropped");
        assert_eq!(b.at_high(6, 11), AtHigh::Stale);
        b.arrived(6, 12, "retry, late");
        assert!(b.is_empty());
        // Other jobs are untouched by a job's pruning.
        b.arrived(4, 3, "four");
        b.take(3, 9);
        assert!(b.has(3));
    }
}

//! Failpoints: named places where a test makes the engine fail on purpose, at a moment no
//! outside action can hit reliably (a session ending between two statements of one chunk).
//!
//! Armed only by the `SHADOWMIG_FAILPOINTS` environment variable, read once:
//! `name=count[,name=count…]` makes the first `count` passes through `name` fire. Unset (as in
//! production) every check is one atomic load of an empty table. This module never fails a
//! run itself: it only answers whether a place should.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The variable that arms failpoints.
pub const ENV: &str = "SHADOWMIG_FAILPOINTS";

/// The backfill's reader ends its own session after sending a chunk's rows and before
/// emitting the chunk's high watermark.
pub const COPY_BEFORE_HIGH_WATERMARK: &str = "copy_before_hw";

/// The backfill's reader ends its own session right after emitting a chunk's high watermark,
/// so that the read fails although its watermark reached the WAL.
pub const COPY_AFTER_HIGH_WATERMARK: &str = "copy_after_hw";

fn armed() -> &'static HashMap<String, AtomicU64> {
    static ARMED: OnceLock<HashMap<String, AtomicU64>> = OnceLock::new();
    ARMED.get_or_init(|| parse(&std::env::var(ENV).unwrap_or_default()))
}

/// The failpoints of a `name=count,…` list; malformed items are skipped.
fn parse(text: &str) -> HashMap<String, AtomicU64> {
    text.split(',')
        .filter_map(|item| {
            let (name, count) = item.split_once('=')?;
            let count: u64 = count.trim().parse().ok()?;
            Some((name.trim().to_string(), AtomicU64::new(count)))
        })
        .collect()
}

/// Whether the failpoint `name` fires on this pass (and uses up one of its passes).
pub fn fire(name: &str) -> bool {
    armed().get(name).is_some_and(take)
}

fn take(left: &AtomicU64) -> bool {
    left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failpoint_fires_its_count_of_times_then_never() {
        let set = parse("copy_before_hw=2, other = 1,bad,worse=x");
        assert_eq!(set.len(), 2);
        let fp = &set["copy_before_hw"];
        assert!(take(fp));
        assert!(take(fp));
        assert!(!take(fp));
        assert!(!take(fp));
        assert!(take(&set["other"]));
        assert!(!fire("never_armed"));
    }
}

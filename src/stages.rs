//! Stage changes and the one log line each one gets.
//!
//! Two things are called a stage. The migration's stage is persisted in
//! `shadowmig.migrations.stage` (the cutover stage, or `paused`) and changes only through
//! [`crate::state::set_stage`]. The run's stage is what a `shadowmig run` process is doing:
//! setting up, backfilling, streaming, caught up, paused or stopped ([`RunStage`]). Both log
//! every change as exactly one INFO line `stage changed` with the structured fields `scope`
//! (`migration` or `run`), `migration`, `from` and `to`, so human and JSON logs carry the same
//! facts. This module owns those lines and the run's stage vocabulary; it must never read or
//! write the database or decide when a stage changes.

use std::fmt;

/// What a `shadowmig run` process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStage {
    /// Creating the state tables, publication, slot and target table.
    SettingUp,
    /// Copying history while streaming changes.
    Backfill,
    /// The backfill is paused (by the operator, or the whole run on a source change it cannot
    /// apply); streaming goes on in the first case, stops in the second.
    Paused,
    /// The backfill is done; streaming changes, not yet proven caught up.
    Streaming,
    /// The backfill is done and every change up to a sync marker is applied.
    CaughtUp,
    /// The process is ending (stopped, caught up with `--exit-when-caught-up`, or failed).
    Stopped,
}

impl RunStage {
    /// The name in log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStage::SettingUp => "setting-up",
            RunStage::Backfill => "backfill",
            RunStage::Paused => "paused",
            RunStage::Streaming => "streaming",
            RunStage::CaughtUp => "caught-up",
            RunStage::Stopped => "stopped",
        }
    }

    /// The stage of a run that is streaming: backfill (or paused backfill) until the copy is
    /// done, then streaming until caught up. An operator's pause after the copy is done
    /// changes nothing (it pauses only the backfill).
    pub fn of(copy_done: bool, backfill_paused: bool, caught_up: bool) -> RunStage {
        match (copy_done, backfill_paused, caught_up) {
            (false, true, _) => RunStage::Paused,
            (false, false, _) => RunStage::Backfill,
            (true, _, true) => RunStage::CaughtUp,
            (true, _, false) => RunStage::Streaming,
        }
    }
}

impl fmt::Display for RunStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which stage changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The persisted stage in `shadowmig.migrations`.
    Migration,
    /// The stage of this `run` process.
    Run,
}

impl Scope {
    /// The value of the `scope` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Migration => "migration",
            Scope::Run => "run",
        }
    }
}

/// Logs one stage change: INFO `stage changed` with `scope`, `migration`, `from`, `to`.
pub fn log_change(scope: Scope, migration: &str, from: &str, to: &str) {
    // Display, not Debug: human lines read `from=backfill to=streaming`, unquoted.
    tracing::info!(
        scope = %scope.as_str(),
        migration = %migration,
        from = %from,
        to = %to,
        "stage changed"
    );
}

/// The run's current stage; logs each change once. Setting the stage it already has is a
/// no-op, so callers may set it wherever it could have changed.
#[derive(Debug)]
pub struct StageLog {
    migration: String,
    current: Option<RunStage>,
}

impl StageLog {
    /// A run of `migration` that has no stage yet (the first change logs `from=none`).
    pub fn new(migration: &str) -> StageLog {
        StageLog {
            migration: migration.to_string(),
            current: None,
        }
    }

    /// Moves to `stage`; true (and one log line) when that is a change.
    pub fn set(&mut self, stage: RunStage) -> bool {
        if self.current == Some(stage) {
            return false;
        }
        let from = self.current.map(RunStage::as_str).unwrap_or("none");
        log_change(Scope::Run, &self.migration, from, stage.as_str());
        self.current = Some(stage);
        true
    }

    /// The current stage, if one was set.
    pub fn current(&self) -> Option<RunStage> {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_count() {
        let mut s = StageLog::new("m");
        assert!(s.set(RunStage::SettingUp));
        assert!(!s.set(RunStage::SettingUp));
        assert!(s.set(RunStage::Backfill));
        assert_eq!(s.current(), Some(RunStage::Backfill));
    }

    #[test]
    fn the_stage_of_a_streaming_run() {
        assert_eq!(RunStage::of(false, false, false), RunStage::Backfill);
        assert_eq!(RunStage::of(false, true, false), RunStage::Paused);
        assert_eq!(RunStage::of(true, true, false), RunStage::Streaming);
        assert_eq!(RunStage::of(true, false, true), RunStage::CaughtUp);
    }
}

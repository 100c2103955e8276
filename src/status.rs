//! `shadowmig status`: what a migration is doing, read from the state in the target and the
//! slot on the source.
//!
//! Owns gathering and presenting the status (the JSON shape is a contract: fields are only
//! ever added). It must never change anything, and it works whether or not `run` is alive.

use serde::Serialize;
use tokio_postgres::Client;

use crate::catalog;
use crate::size::human_bytes;
use crate::spec::Spec;
use crate::state::{self, Direction};

/// Copy progress.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CopyStatus {
    /// Rows the backfill has applied.
    pub rows_copied: i64,
    /// The backfill is finished.
    pub done: bool,
    /// The planner's estimate of the source's rows (`reltuples`), if known.
    pub source_rows_estimate: Option<i64>,
    /// Percent done, from the estimate.
    pub percent: Option<f64>,
    /// Rows copied per second, averaged since the migration started.
    pub rows_per_sec: Option<f64>,
    /// Seconds left at that rate, from the estimate (while copying).
    pub eta_seconds: Option<f64>,
}

/// How far apply is behind the source.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LagStatus {
    /// WAL bytes between the source's current position and what apply has confirmed.
    pub bytes: Option<i64>,
    /// Seconds since apply last committed, while behind; 0 when caught up.
    pub seconds: Option<f64>,
    /// The LSN of the last applied source transaction.
    pub apply_lsn: Option<String>,
    /// The source's current WAL position.
    pub source_lsn: Option<String>,
}

/// The replication slot.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SlotStatus {
    /// Its name.
    pub name: String,
    /// Whether it exists.
    pub exists: bool,
    /// Whether a consumer (`run`) is connected.
    pub active: bool,
    /// WAL the slot keeps on the source's disk.
    pub wal_held_bytes: Option<i64>,
    /// The server's `max_slot_wal_keep_size` (MB; -1 is unlimited).
    pub max_slot_wal_keep_size_mb: Option<i64>,
    /// `pg_replication_slots.wal_status` (reserved, extended, unreserved, lost).
    pub wal_status: Option<String>,
}

/// Correctness counters.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyStatus {
    /// Rows found different by verification.
    pub mismatches: i64,
    /// Rows checked.
    pub checked: i64,
    /// mismatches / checked.
    pub mismatch_rate: f64,
}

/// The operator's runtime controls (`pause`, `resume`, `throttle`), as `run` applies them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ControlsStatus {
    /// The backfill is paused.
    pub paused: bool,
    /// Rows per backfill chunk.
    pub chunk_rows: u64,
    /// Backfill workers.
    pub workers: u64,
    /// Backfill waits while the slot holds more WAL than this.
    pub max_lag_bytes: u64,
    /// Backfill waits while apply lags more than this.
    pub max_apply_lag_ms: u64,
}

/// Traffic routing.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RoutingStatus {
    /// The routing state's generation (0 until cutover starts).
    pub generation: i64,
}

/// The whole status (`status --json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    /// The migration's name.
    pub migration: String,
    /// The cutover stage, or `not-started` before the first `run`.
    pub stage: String,
    /// The backfill is paused by the operator.
    pub paused: bool,
    /// The last error or pause reason.
    pub last_error: Option<String>,
    /// Backfill progress.
    pub copy: CopyStatus,
    /// Apply lag.
    pub lag: LagStatus,
    /// The slot.
    pub slot: SlotStatus,
    /// Changes applied so far.
    pub changes_applied: i64,
    /// Changes applied per second, averaged since the migration started.
    pub changes_per_sec: Option<f64>,
    /// Verification counters.
    pub verify: VerifyStatus,
    /// Runtime controls.
    pub controls: ControlsStatus,
    /// Routing.
    pub routing: RoutingStatus,
}

/// Reading the status failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// A database could not be reached or queried.
    #[error("{0}")]
    Db(String),
}

fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StatusError {
    move |e| StatusError::Db(format!("{what}: {}", catalog::db_message(&e)))
}

async fn state_exists(tgt: &Client) -> Result<bool, StatusError> {
    state::exists(tgt)
        .await
        .map_err(|e| StatusError::Db(e.to_string()))
}

/// Gathers the status of the spec's migration.
pub async fn gather(spec: &Spec) -> Result<Status, StatusError> {
    let src = catalog::connect(&spec.source.url)
        .await
        .map_err(|e| StatusError::Db(e.to_string()))?;
    let tgt = catalog::connect(&spec.target.url)
        .await
        .map_err(|e| StatusError::Db(e.to_string()))?;
    let have_state = state_exists(&tgt).await?;
    let migration = if have_state {
        state::read_migration(&tgt, &spec.name)
            .await
            .map_err(|e| StatusError::Db(e.to_string()))?
    } else {
        None
    };
    let applied = if have_state {
        state::read_progress(&tgt, &spec.name, Direction::Forward)
            .await
            .map_err(|e| StatusError::Db(e.to_string()))?
    } else {
        None
    };
    let (rows_copied, done) = if have_state {
        let p = state::read_copy_progress(&tgt, &spec.name)
            .await
            .map_err(|e| StatusError::Db(e.to_string()))?;
        p.iter()
            .find(|c| c.chunk == 0)
            .map(|c| (c.rows_copied, c.done))
            .unwrap_or((0, false))
    } else {
        (0, false)
    };
    let extra = if migration.is_some() {
        tgt.query_opt(
            "SELECT changes_applied, \
                    extract(epoch FROM now() - (SELECT updated_at FROM shadowmig.progress WHERE migration = $1 AND direction = 'forward'))::float8, \
                    extract(epoch FROM now() - created_at)::float8 \
             FROM shadowmig.migrations WHERE name = $1",
            &[&spec.name],
        )
        .await
        .ok()
        .flatten()
    } else {
        None
    };
    let counters = if migration.is_some() {
        crate::sampler::read_counters(&tgt, &spec.name)
            .await
            .map_err(|e| StatusError::Db(catalog::db_message(&e)))?
    } else {
        crate::sampler::Counters::default()
    };
    let changes_applied: i64 = extra.as_ref().and_then(|r| r.try_get(0).ok()).unwrap_or(0);
    let since_apply: Option<f64> = extra.as_ref().and_then(|r| r.try_get(1).ok()).flatten();
    let age: Option<f64> = extra
        .as_ref()
        .and_then(|r| r.try_get::<_, Option<f64>>(2).ok())
        .flatten()
        .filter(|a| *a > 0.0);
    let per_sec = |n: i64| age.filter(|_| n > 0).map(|a| n as f64 / a);

    let estimate: Option<i64> = src
        .query_opt(
            "SELECT greatest(sum(c.reltuples), 0)::int8 FROM pg_class c \
             WHERE c.oid = to_regclass($1) OR c.oid IN (SELECT relid FROM pg_partition_tree(to_regclass($1)) WHERE isleaf)",
            &[&spec.source.table.quoted()],
        )
        .await
        .ok()
        .flatten()
        .and_then(|r| r.try_get(0).ok());
    let slot_row = src
        .query_opt(
            "SELECT active, (pg_current_wal_lsn() - restart_lsn)::int8, wal_status, confirmed_flush_lsn::text, \
                    pg_current_wal_lsn()::text, (pg_current_wal_lsn() - confirmed_flush_lsn)::int8, \
                    (SELECT setting::int8 FROM pg_settings WHERE name = 'max_slot_wal_keep_size') \
             FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&spec.slot_name()],
        )
        .await
        .map_err(db("reading the slot"))?;
    let source_lsn: Option<String> = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .ok()
        .and_then(|r| r.try_get(0).ok());
    let keep: Option<i64> = src
        .query_one(
            "SELECT setting::int8 FROM pg_settings WHERE name = 'max_slot_wal_keep_size'",
            &[],
        )
        .await
        .ok()
        .and_then(|r| r.try_get(0).ok());
    let slot = match &slot_row {
        Some(r) => SlotStatus {
            name: spec.slot_name(),
            exists: true,
            active: r.try_get(0).unwrap_or(false),
            wal_held_bytes: r.try_get(1).ok().flatten(),
            max_slot_wal_keep_size_mb: keep,
            wal_status: r.try_get(2).ok().flatten(),
        },
        None => SlotStatus {
            name: spec.slot_name(),
            exists: false,
            active: false,
            wal_held_bytes: None,
            max_slot_wal_keep_size_mb: keep,
            wal_status: None,
        },
    };
    // The slot's confirmed position also advances over other tables' WAL while idle, so it
    // measures lag better than the last applied transaction of this table alone.
    let lag_bytes: Option<i64> = slot_row.as_ref().and_then(|r| r.try_get(5).ok().flatten());
    let lag_seconds = match (lag_bytes, since_apply) {
        (Some(0), _) => Some(0.0),
        (_, s) => s,
    };
    let percent = match (estimate, done) {
        (_, true) => Some(100.0),
        (Some(e), false) if e > 0 => Some((rows_copied as f64 * 100.0 / e as f64).min(99.9)),
        _ => None,
    };
    Ok(Status {
        migration: spec.name.clone(),
        stage: migration
            .as_ref()
            .map(|m| m.stage.clone())
            .unwrap_or_else(|| "not-started".into()),
        paused: migration.as_ref().map(|m| m.paused).unwrap_or(false),
        last_error: migration.as_ref().and_then(|m| m.last_error.clone()),
        copy: CopyStatus {
            rows_copied,
            done,
            source_rows_estimate: estimate,
            percent,
            rows_per_sec: per_sec(rows_copied),
            eta_seconds: match (done, estimate, per_sec(rows_copied)) {
                (false, Some(e), Some(r)) if e > rows_copied => Some((e - rows_copied) as f64 / r),
                (false, _, _) => None,
                (true, _, _) => Some(0.0),
            },
        },
        changes_per_sec: per_sec(changes_applied),
        lag: LagStatus {
            bytes: lag_bytes,
            seconds: lag_seconds,
            apply_lsn: applied.map(|l| l.to_string()),
            source_lsn,
        },
        slot,
        changes_applied,
        verify: VerifyStatus {
            mismatches: counters.mismatches,
            checked: counters.checked,
            mismatch_rate: if counters.checked > 0 {
                counters.mismatches as f64 / counters.checked as f64
            } else {
                0.0
            },
        },
        controls: ControlsStatus {
            paused: migration.as_ref().map(|m| m.paused).unwrap_or(false),
            chunk_rows: pick(
                migration.as_ref().and_then(|m| m.chunk_rows),
                spec.copy.chunk_rows,
            ),
            workers: pick(
                migration.as_ref().and_then(|m| m.workers.map(i64::from)),
                u64::from(spec.copy.workers),
            ),
            max_lag_bytes: pick(
                migration.as_ref().and_then(|m| m.max_lag_bytes),
                spec.throttle.max_lag_bytes,
            ),
            max_apply_lag_ms: pick(
                migration.as_ref().and_then(|m| m.max_apply_lag_ms),
                spec.throttle.max_apply_lag_ms,
            ),
        },
        routing: RoutingStatus { generation: 0 },
    })
}

/// An operator's setting if there is a positive one, else the spec's.
fn pick(set: Option<i64>, spec: u64) -> u64 {
    set.filter(|v| *v > 0).map(|v| v as u64).unwrap_or(spec)
}

impl Status {
    /// The status as a readable table.
    pub fn render(&self) -> String {
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "—".into());
        let mut rows: Vec<(&str, String)> = vec![
            ("migration", self.migration.clone()),
            (
                "stage",
                format!(
                    "{}{}",
                    self.stage,
                    if self.paused {
                        " (backfill paused)"
                    } else {
                        ""
                    }
                ),
            ),
            (
                "copy",
                format!(
                    "{} rows{}{}{}{}",
                    self.copy.rows_copied,
                    self.copy
                        .percent
                        .map(|p| format!(" ({p:.1}%)"))
                        .unwrap_or_default(),
                    if self.copy.done { ", done" } else { "" },
                    self.copy
                        .rows_per_sec
                        .map(|r| format!(", {r:.0} rows/s"))
                        .unwrap_or_default(),
                    match (self.copy.done, self.copy.eta_seconds) {
                        (false, Some(e)) => format!(", ETA {e:.0} s"),
                        _ => String::new(),
                    }
                ),
            ),
            (
                "changes applied",
                format!(
                    "{}{}",
                    self.changes_applied,
                    self.changes_per_sec
                        .map(|r| format!(" ({r:.0}/s since start)"))
                        .unwrap_or_default()
                ),
            ),
            ("apply LSN", opt(&self.lag.apply_lsn)),
            ("source LSN", opt(&self.lag.source_lsn)),
            (
                "lag",
                match (self.lag.bytes, self.lag.seconds) {
                    (Some(b), Some(s)) => format!("{} ({s:.1} s)", human_bytes(b)),
                    (Some(b), None) => human_bytes(b),
                    _ => "—".into(),
                },
            ),
            (
                "slot",
                if self.slot.exists {
                    format!(
                        "{} ({}), holds {} of WAL{}{}",
                        self.slot.name,
                        if self.slot.active {
                            "active"
                        } else {
                            "inactive"
                        },
                        self.slot
                            .wal_held_bytes
                            .map(human_bytes)
                            .unwrap_or_else(|| "?".into()),
                        match self.slot.max_slot_wal_keep_size_mb {
                            Some(-1) | None => ", max_slot_wal_keep_size unlimited".to_string(),
                            Some(mb) =>
                                format!(" of max_slot_wal_keep_size {}", human_bytes(mb << 20)),
                        },
                        self.slot
                            .wal_status
                            .as_ref()
                            .map(|s| format!(", wal_status {s}"))
                            .unwrap_or_default()
                    )
                } else {
                    format!("{} (does not exist)", self.slot.name)
                },
            ),
            (
                "mismatches",
                format!(
                    "{} of {} checked ({:.4}%)",
                    self.verify.mismatches,
                    self.verify.checked,
                    self.verify.mismatch_rate * 100.0
                ),
            ),
            (
                "controls",
                format!(
                    "{}chunk_rows {}, workers {}, max_lag_bytes {}, max_apply_lag_ms {}",
                    if self.controls.paused {
                        "backfill PAUSED; "
                    } else {
                        ""
                    },
                    self.controls.chunk_rows,
                    self.controls.workers,
                    self.controls.max_lag_bytes,
                    self.controls.max_apply_lag_ms
                ),
            ),
            ("routing generation", self.routing.generation.to_string()),
        ];
        if let Some(e) = &self.last_error {
            rows.push(("last error", e.clone()));
        }
        let w = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<w$}  {v}\n"))
            .collect()
    }
}

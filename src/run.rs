//! `shadowmig run`: wires set-up, backfill and streaming apply into one long-running process.
//!
//! Owns the order of events: the change stream is the clock. Streamed transactions and
//! backfilled chunks (at their high watermark) join one sequence of batches, each applied in
//! one target transaction together with its progress, and the slot is confirmed only after
//! that commit. A crash at any point therefore repeats at most one batch or chunk, and the
//! next `run` resumes from the state in the target. It must never write the source table,
//! never confirm what is not committed in the target, and never decode or apply by itself
//! (that is `pgoutput` and `apply`).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_postgres::Client;

use crate::apply::bulk::{BulkPool, BulkTarget};
use crate::apply::coalesce::Coalescer;
use crate::apply::{
    ApplyTarget, ApplyWriter, Change, ProgressKey, SourceChange, SourceColumn, TargetColumn,
};
use crate::catalog::{self, ReplicaIdentity};
use crate::copy::{
    emit_watermark, AtHigh, CopySource, HighOutcome, KeyValue, ReadBook, Snapshot, TargetRows,
    TransformedSource, WatermarkTracker,
};
use crate::lsn::Lsn;
use crate::pgoutput::{Decoder, LogicalMessage, PgTimestamp, RelationBody, TupleData, TupleValue};
use crate::replication::{
    PgOutputOptions, ReplicationClient, ReplicationError, ReplicationEvent, SnapshotAction,
    StreamConfig,
};
use crate::size::human_bytes;
use crate::spec::{quote_ident, quote_literal, Spec};
use crate::stages::{RunStage, StageLog};
use crate::state::{self, ChunkProgress, Direction};

mod deferred;
mod shape;
mod streamed;
use streamed::Poison;

/// The prefix of shadowmig's logical messages (watermarks and sync markers).
pub const MESSAGE_PREFIX: &str = "shadowmig";

/// Read-ahead events beyond which `run` counts itself behind the source (see
/// [`RunOptions::batch_max_delay`]).
const BACKLOG_QUEUED: usize = 4096;

/// Behind the source, a batch this large (in changes) is handed over as soon as the writer is
/// free, whatever its age: the writer is the drain's slowest stage, so it must not wait for a
/// batch to age while changes queue up (at the start of a drain it would idle for a whole
/// batch's read). Not smaller, so that a writer faster than the reader still gets batches
/// worth a commit (D25).
const BACKLOG_EAGER_CHANGES: usize = 16_384;

/// How `run` behaves beyond the spec.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Exit 0 once the backfill is done and apply has caught up with the source (for scripts
    /// and tests); otherwise run until stopped.
    pub exit_when_caught_up: bool,
    /// A source transaction with more changes than this is written as it arrives, in
    /// coalesced parts of at most `batch_rows` rows, into one target transaction committed at
    /// its source commit.
    pub batch_changes: usize,
    /// Flush a batch (at a transaction boundary) once its net effect touches this many rows.
    /// A batch holds net rows, not changes (a key changed many times costs one row), so under
    /// a backlog a large batch coalesces away much of the work. `SHADOWMIG_BATCH_ROWS`
    /// overrides the default of 250,000 (diagnosis and benchmarks).
    pub batch_rows: usize,
    /// ... or once its net rows take this many bytes of memory (`SHADOWMIG_BATCH_BYTES`
    /// overrides the default of 64 MiB, for diagnosis and benchmarks).
    pub batch_bytes: usize,
    /// Flush a non-empty batch when the stream has been quiet this long.
    pub batch_idle: Duration,
    /// Flush a non-empty batch at the next transaction boundary once it is this old, however
    /// busy the stream: a steady trickle of messages (other tables' transactions, or the
    /// keepalives a walsender sends while it waits to shut down) must not hold changes back.
    /// While the read-ahead holds a backlog, 8× this.
    pub batch_max_delay: Duration,
    /// Write a batch on its own task while the next one is read (D24); off, each batch is
    /// written before reading goes on. `SHADOWMIG_APPLY_PIPELINE=0` turns it off (diagnosis,
    /// benchmarks).
    pub pipeline: bool,
    /// Behind the source, hand a batch to a free writer early (D25); off, a batch grows to
    /// its bounds or its age first. `SHADOWMIG_APPLY_EAGER=0` turns it off (diagnosis,
    /// benchmarks).
    pub eager: bool,
    /// Ask the walsender to stream large transactions before their commit (pgoutput
    /// protocol 2), once the backfill is done, and apply them as they arrive (D29).
    /// `SHADOWMIG_STREAMING=0` turns it off (diagnosis, benchmarks).
    pub streaming: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            exit_when_caught_up: false,
            batch_changes: 20_000,
            batch_rows: env_usize("SHADOWMIG_BATCH_ROWS").unwrap_or(250_000),
            batch_bytes: env_usize("SHADOWMIG_BATCH_BYTES").unwrap_or(64 << 20),
            batch_idle: Duration::from_millis(20),
            batch_max_delay: Duration::from_millis(250),
            pipeline: std::env::var("SHADOWMIG_APPLY_PIPELINE").map_or(true, |v| v != "0"),
            eager: std::env::var("SHADOWMIG_APPLY_EAGER").map_or(true, |v| v != "0"),
            streaming: std::env::var("SHADOWMIG_STREAMING").map_or(true, |v| v != "0"),
        }
    }
}

/// An apply writer of the migration's forward stream into its target.
fn forward_writer(spec: &Spec, prepared: &Prepared) -> Result<ApplyWriter, RunError> {
    let progress = ProgressKey {
        migration: spec.name.clone(),
        direction: Direction::Forward,
    };
    ApplyWriter::new(prepared.apply_target.clone(), progress)
        .map_err(|e| RunError::Setup(e.to_string()))
}

/// How long a stream that fell back from streaming (D29) sends whole transactions before
/// streaming is tried again: 10 minutes, `SHADOWMIG_STREAMING_RETRY_SECS` for tests.
fn streaming_retry_after() -> Duration {
    Duration::from_secs(
        env_usize("SHADOWMIG_STREAMING_RETRY_SECS")
            .map(|n| n as u64)
            .unwrap_or(600),
    )
}

/// A positive number from the environment (diagnostic knobs; ignored when not a number).
fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
}

/// How a `run` ended without an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped by SIGINT/SIGTERM after committing and confirming the current batch.
    Stopped,
    /// Backfill done and apply caught up (with `exit_when_caught_up`).
    CaughtUp,
    /// Something happened on the source that needs an operator; the message says what.
    Paused(String),
}

/// Why `run` could not go on.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A preflight check failed; the text is the plan's report of failures.
    #[error("{0}")]
    Preflight(String),
    /// Set-up failed.
    #[error("set-up: {0}")]
    Setup(String),
    /// A connection broke; `run` retries these itself.
    #[error("connection lost: {0}")]
    Connection(String),
    /// Anything else.
    #[error("{0}")]
    Fatal(String),
    /// The whole-table copy (D26) found the source table in another shape than prepared;
    /// `run` pauses on it and it never reaches a caller.
    #[error("the source table changed shape during the backfill: {0}")]
    Shape(String),
    /// A source transaction being written in parts was abandoned before its commit (a pause,
    /// shutdown or a failure elsewhere) and rolled back in the target; never reaches a caller.
    #[error("a large source transaction was abandoned before its commit and rolled back")]
    Abandoned,
    /// The change stream must start again at once from the state in the target (not a
    /// failure; `run` handles it and it never reaches a caller). D29.
    #[error("{why}")]
    Restart {
        /// What happened, for the log.
        why: String,
        /// True to stream in-progress transactions from now on; false for a fallback, which
        /// puts streaming off for a while.
        streaming: bool,
    },
}

impl RunError {
    fn retryable(&self) -> bool {
        matches!(self, RunError::Connection(_))
    }
}

/// Maps a target-database error: a broken connection is retryable, the rest is fatal.
fn pg_err(what: &str, e: tokio_postgres::Error) -> RunError {
    if catalog::connection_lost(&e) {
        RunError::Connection(format!("{what}: {}", catalog::db_message(&e)))
    } else {
        RunError::Fatal(format!("{what}: {}", catalog::db_message(&e)))
    }
}

/// Maps a failed START_REPLICATION. The slot "is active for PID …" (55006) right after this
/// migration's previous process died: its walsender has not yet noticed the client is gone
/// (this process holds the migration's writer lock, so no other live `run` of it has the
/// slot). That is retried with backoff like a lost connection; were it another consumer of
/// the slot, the warnings say so each time and nothing is applied meanwhile.
fn start_err(slot: &str, e: ReplicationError) -> RunError {
    if e.sqlstate() == Some("42704") {
        return RunError::Fatal(format!(
            "starting replication: {e}; the slot {slot} is gone (dropped, or invalidated past max_slot_wal_keep_size): \
             the changes since are lost to this migration, so it cannot go on. Run `shadowmig abort`, then `shadowmig run` to start again"
        ));
    }
    if e.sqlstate() == Some("55006") {
        return RunError::Connection(format!(
            "starting replication: {e}; the slot {slot} is still held by the walsender of an earlier connection \
             (a run that was killed, whose walsender has not yet noticed), or by another consumer of this slot \
             (stop it: pg_stat_replication shows it)"
        ));
    }
    repl_err("starting replication", e)
}

fn repl_err(what: &str, e: ReplicationError) -> RunError {
    if e.is_connection_lost()
        || matches!(
            e,
            ReplicationError::Connect { .. } | ReplicationError::ConnectTimeout(_)
        )
    {
        RunError::Connection(format!("{what}: {e}"))
    } else {
        RunError::Fatal(format!("{what}: {e}"))
    }
}

fn apply_err(what: &str, e: crate::apply::ApplyError) -> RunError {
    match e {
        crate::apply::ApplyError::Db { source, during } => {
            pg_err(&format!("{what} ({during})"), source)
        }
        crate::apply::ApplyError::State(state::StateError::Db { source, during }) => {
            pg_err(&format!("{what} ({during})"), source)
        }
        crate::apply::ApplyError::Bulk {
            message,
            connection_lost: true,
        } => RunError::Connection(format!("{what}: {message}")),
        other => RunError::Fatal(format!("{what}: {other}")),
    }
}

fn state_err(what: &str, e: state::StateError) -> RunError {
    match e {
        state::StateError::Db { source, during } => pg_err(&format!("{what} ({during})"), source),
        other => RunError::Fatal(format!("{what}: {other}")),
    }
}

fn copy_err(what: &str, e: crate::copy::CopyError) -> RunError {
    match e {
        crate::copy::CopyError::Query { source, context } => {
            pg_err(&format!("{what} ({context})"), source)
        }
        other => RunError::Fatal(format!("{what}: {other}")),
    }
}

/// Everything `run` derives from the spec and the catalogs once per connection.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The source table's oid.
    pub source_oid: u32,
    /// The source's columns as pgoutput sends them (attribute order, no generated columns).
    pub source_columns: Vec<catalog::Column>,
    /// What apply writes.
    pub apply_target: ApplyTarget,
    /// What the backfill reads; its key is the identity the stream matches rows by.
    pub copy_source: CopySource,
    /// The backfill's bulk path, when it applies: chunks read in the target's shape and
    /// written with plain binary COPY on several connections (D19). `None` falls back to
    /// handing chunk rows to the stream's apply.
    pub transformed: Option<TransformedSource>,
}

/// The oid of `table` (the `side` table), which must exist.
async fn existing_table(
    client: &Client,
    table: &crate::spec::QualifiedName,
    side: &str,
) -> Result<u32, RunError> {
    catalog::table_oid(client, table)
        .await
        .map_err(|e| RunError::Setup(e.to_string()))?
        .ok_or_else(|| RunError::Setup(format!("{side} table {} not found", table.quoted())))
}

/// [`prepare`], and the source's WAL insert position at which the columns it read were
/// current: while the catalogs are read, a session of its own holds `ACCESS SHARE` on the
/// source table, so no DDL on it can commit meanwhile. A transaction whose commit lies below
/// that position wrote the table in a shape these columns already account for, which is how
/// a replay from before a DDL is told from a new DDL (D30). The lock waits behind a DDL
/// under way (1 s per try, then retried), never queues others behind itself for long.
async fn prepare_at(
    spec: &Spec,
    src: &Client,
    tgt: &Client,
    shutdown: &watch::Receiver<bool>,
) -> Result<(Prepared, Lsn), RunError> {
    let guard = catalog::connect_as(&spec.source.url, "prepare")
        .await
        .map_err(|e| RunError::Connection(e.to_string()))?;
    let lock = format!(
        "BEGIN; SET LOCAL lock_timeout = '1s'; LOCK TABLE {} IN ACCESS SHARE MODE",
        spec.source.table.quoted()
    );
    let started = Instant::now();
    loop {
        match guard.batch_execute(&lock).await {
            Ok(()) => break,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                let _ = guard.batch_execute("ROLLBACK").await;
                if *shutdown.borrow() || started.elapsed() > Duration::from_secs(120) {
                    return Err(RunError::Connection(format!(
                        "the source table {} stayed locked by another session (a DDL under way?) for {} s while its columns were read",
                        spec.source.table.quoted(),
                        started.elapsed().as_secs()
                    )));
                }
                tracing::info!("waiting for a lock on the source table to read its columns");
            }
            // A missing table or privilege: prepare says which, without the lock.
            Err(_) => {
                let _ = guard.batch_execute("ROLLBACK").await;
                break;
            }
        }
    }
    let prepared = prepare(spec, src, tgt).await?;
    let at: String = src
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(|e| pg_err("reading the source's WAL position", e))?
        .get(0);
    let at: Lsn = at
        .parse()
        .map_err(|_| RunError::Fatal(format!("unreadable WAL position {at}")))?;
    let _ = guard.batch_execute("COMMIT").await;
    Ok((prepared, at))
}

/// Records the source table's shape the migration follows when none is (the first run, or
/// the first after a pause); otherwise says how the current one differs from it, if it does.
/// A shape change the stream reports is only "old" (D30) relative to a shape the operator has
/// accepted, so a run that prepares again after a reconnect must not accept a new one itself.
async fn accept_shape(
    tgt: &Client,
    spec: &Spec,
    columns: &[catalog::Column],
) -> Result<Option<StaleShape>, RunError> {
    let now = shape_text(columns.iter().map(|c| (c.name.as_str(), c.type_oid)));
    let row = tgt
        .query_one(
            "SELECT source_shape FROM shadowmig.migrations WHERE name = $1",
            &[&spec.name],
        )
        .await
        .map_err(|e| pg_err("reading the source table's accepted shape", e))?;
    let accepted: Option<String> = row.get(0);
    match accepted {
        Some(a) if a == now => Ok(None),
        Some(a) => Ok(Some(StaleShape {
            why: format!(
                "columns (name type-oid) were [{a}], now [{now}], changed while no stream was reading"
            ),
            accepted: a,
        })),
        None => {
            tgt.execute(
                "UPDATE shadowmig.migrations SET source_shape = $2 WHERE name = $1",
                &[&spec.name, &now],
            )
            .await
            .map_err(|e| pg_err("recording the source table's shape", e))?;
            Ok(None)
        }
    }
}

/// The source table changed shape after the operator accepted its shape and before this
/// stream started: the changes written before the DDL are still to come, in the accepted
/// shape. They are applied (mapped by name, D30) and the run pauses where the DDL is crossed.
struct StaleShape {
    /// The accepted shape, as [`shape_text`] renders it.
    accepted: String,
    /// What changed, for the pause message.
    why: String,
}

/// A table's shape as recorded in `shadowmig.migrations.source_shape`: each column's quoted
/// name and type oid.
fn shape_text<'a>(columns: impl Iterator<Item = (&'a str, u32)>) -> String {
    columns
        .map(|(name, oid)| format!("{} {oid}", quote_ident(name)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Derives the apply target and the copy source from the catalogs of both databases.
pub async fn prepare(spec: &Spec, src: &Client, tgt: &Client) -> Result<Prepared, RunError> {
    let cat = |e: catalog::CatalogError| RunError::Setup(e.to_string());
    let source_oid = existing_table(src, &spec.source.table, "source").await?;
    let source_columns: Vec<catalog::Column> = catalog::columns(src, source_oid)
        .await
        .map_err(cat)?
        .into_iter()
        .filter(|c| !c.generated)
        .collect();
    let pk = catalog::primary_key(src, source_oid).await.map_err(cat)?;
    let target_oid = existing_table(tgt, &spec.target.table, "target").await?;
    let target_cols = catalog::columns(tgt, target_oid).await.map_err(cat)?;
    let target_key = match catalog::row_key(tgt, target_oid).await.map_err(cat)? {
        Some((_, cols)) => cols,
        // Dropped by `[copy] defer_indexes` until the backfill ends (D26).
        None => state::deferred_key(tgt, &spec.name)
            .await
            .map_err(|e| state_err("reading the deferred primary key", e))?
            .ok_or_else(|| {
                RunError::Setup(format!(
                    "target table {} has no primary key or usable unique index",
                    spec.target.table.quoted()
                ))
            })?,
    };
    let has_source = |name: &str| source_columns.iter().any(|c| c.name == name);
    let need_pk = || {
        pk.clone().ok_or_else(|| {
            RunError::Setup(
                "the source table has no primary key for REPLICA IDENTITY DEFAULT or FULL: run shadowmig plan for the fix"
                    .into(),
            )
        })
    };
    // `identity`: the columns apply matches rows by (coalescing, deletes). `paging`: the
    // unique key the backfill pages by and watermarks compare, present in every change.
    let (identity_cols, paging): (Vec<String>, Vec<String>) =
        match catalog::replica_identity(src, source_oid).await.map_err(cat)? {
            ReplicaIdentity::Default => (need_pk()?, need_pk()?),
            ReplicaIdentity::Index { columns, .. } => (columns.clone(), columns),
            // Under FULL every column is in the old tuple, but matching by all of them would
            // turn each update into a delete and an insert: match by the primary key plus
            // the same-named source columns the target key needs.
            ReplicaIdentity::Full => {
                let mut cols = need_pk()?;
                for k in &target_key {
                    if !spec.transform.contains_key(k) && has_source(k) && !cols.contains(k) {
                        cols.push(k.clone());
                    }
                }
                (cols, need_pk()?)
            }
            ReplicaIdentity::Nothing => {
                return Err(RunError::Setup(
                    "the source table has REPLICA IDENTITY NOTHING: deletes and updates cannot be applied; run shadowmig plan for the fix".into(),
                ))
            }
        };
    let pos = |name: &str| source_columns.iter().position(|c| c.name == name);
    let key: Vec<usize> = paging
        .iter()
        .map(|n| {
            pos(n).ok_or_else(|| RunError::Setup(format!("key column {n} is not a source column")))
        })
        .collect::<Result<_, _>>()?;
    let mut target_columns = Vec::new();
    for c in target_cols.iter().filter(|c| !c.generated) {
        if let Some(expr) = spec.transform.get(&c.name) {
            target_columns.push(TargetColumn::expr(&c.name, expr));
        } else if pos(&c.name).is_some() {
            target_columns.push(TargetColumn::copy(&c.name));
        }
    }
    let apply_target = ApplyTarget {
        table: (
            spec.target.table.schema.clone(),
            spec.target.table.name.clone(),
        ),
        source_columns: source_columns
            .iter()
            .map(|c| SourceColumn {
                name: c.name.clone(),
                type_sql: c.type_name.clone(),
                is_identity: identity_cols.contains(&c.name),
            })
            .collect(),
        target_columns,
        target_key,
    };
    let copy_source = CopySource {
        table_sql: spec.source.table.quoted(),
        columns: source_columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect(),
        key,
        types: source_columns.iter().map(|c| c.type_oid).collect(),
    };
    let transformed = transformed_source(&copy_source, &apply_target, &target_cols, src, tgt).await;
    Ok(Prepared {
        source_oid,
        source_columns,
        apply_target,
        copy_source,
        transformed,
    })
}

/// The bulk path's reader, when every written target column has a built-in type: binary
/// values of those are the same in any database, while a user-defined type's oid (which
/// binary arrays and records carry) differs between source and target.
/// `SHADOWMIG_BULK_COPY=0` turns the bulk path off (for diagnosis and tests).
async fn transformed_source(
    copy_source: &CopySource,
    target: &ApplyTarget,
    target_cols: &[catalog::Column],
    src: &Client,
    tgt: &Client,
) -> Option<TransformedSource> {
    if std::env::var("SHADOWMIG_BULK_COPY").is_ok_and(|v| v == "0") {
        return None;
    }
    // The first oid of objects created after initdb (FirstNormalObjectId).
    const FIRST_USER_OID: u32 = 16384;
    let mut select = Vec::with_capacity(target.target_columns.len());
    for tc in &target.target_columns {
        let col = target_cols.iter().find(|c| c.name == tc.name)?;
        if col.type_oid >= FIRST_USER_OID {
            tracing::info!(column = %tc.name, r#type = %col.type_name, "backfill: a user-defined target column type; chunks go through apply");
            return None;
        }
        select.push(format!("CAST(({}) AS {})", tc.expr, col.type_name));
    }
    // The settings an expression's result can depend on, as the target's sessions have them.
    let settings: Vec<(String, String)> = match tgt
        .query(
            "SELECT name, setting FROM pg_settings WHERE name IN \
             ('TimeZone', 'DateStyle', 'IntervalStyle', 'extra_float_digits', 'bytea_output')",
            &[],
        )
        .await
    {
        Ok(rows) => rows
            .iter()
            .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
            .collect(),
        Err(e) => {
            tracing::info!("backfill: cannot read the target's session settings ({e}); chunks go through apply");
            return None;
        }
    };
    // The source must accept them (a time zone name unknown there would fail every chunk).
    let probe: Vec<String> = settings
        .iter()
        .map(|(n, v)| {
            format!(
                "SELECT set_config({}, {}, true)",
                quote_literal(n),
                quote_literal(v)
            )
        })
        .collect();
    let probe = format!("BEGIN; {}; ROLLBACK", probe.join("; "));
    if let Err(e) = src.batch_execute(&probe).await {
        let _ = src.batch_execute("ROLLBACK").await;
        tracing::info!(
            "backfill: the source refuses the target's session settings ({}); chunks go through apply",
            catalog::db_message(&e)
        );
        return None;
    }
    Some(TransformedSource {
        source: copy_source.clone(),
        select,
        settings,
    })
}

/// Tries to take the session advisory lock named `key` (hashed) without waiting.
async fn try_lock(tgt: &Client, key: &str, what: &str) -> Result<bool, RunError> {
    Ok(tgt
        .query_one(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
            &[&key],
        )
        .await
        .map_err(|e| pg_err(what, e))?
        .get(0))
}

/// Starts the bulk writers (one target connection per copy worker), after waiting out any
/// chunk transaction an earlier, killed process may still be committing: each holds the
/// migration's bulk fence in shared mode until it ends.
async fn start_bulk(
    spec: &Spec,
    prepared: &Prepared,
    tgt: &Client,
    shutdown: &watch::Receiver<bool>,
) -> Result<BulkPool, RunError> {
    let fence = format!("shadowmig-bulk:{}", spec.name);
    let started = Instant::now();
    loop {
        if try_lock(tgt, &fence, "taking the bulk fence").await? {
            tgt.execute(
                "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
                &[&fence],
            )
            .await
            .map_err(|e| pg_err("releasing the bulk fence", e))?;
            break;
        }
        if *shutdown.borrow() {
            return Err(RunError::Connection(
                "stopped while waiting for an earlier run's chunk writes to end".into(),
            ));
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(RunError::Fatal(format!(
                "a backfill chunk transaction of an earlier run of {} is still open in the target after 2 minutes; \
                 end its session (pg_stat_activity) and run again",
                spec.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let target =
        BulkTarget::new(&prepared.apply_target).map_err(|e| RunError::Setup(e.to_string()))?;
    let n = spec.copy.workers.clamp(1, 8) as usize;
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(
            catalog::connect_as(&spec.target.url, "copy writer")
                .await
                .map_err(|e| RunError::Connection(e.to_string()))?,
        );
    }
    tracing::info!(
        writers = n,
        "backfill: bulk path, chunks written by binary COPY on their own connections"
    );
    Ok(BulkPool::start(clients, target, spec.name.clone(), fence))
}

/// Makes this connection the migration's only writer: a session advisory lock in the target,
/// keyed by the migration's name. A `run` killed with -9 can leave its target backend still
/// finishing a batch (it notices the dead client only when the statement ends); the lock is
/// released only when that backend is gone, so a new `run` never applies changes while an
/// old batch could still commit behind it. It also refuses a second live `run`.
async fn take_writer_lock(
    tgt: &Client,
    spec: &Spec,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), RunError> {
    let key = format!("shadowmig:{}", spec.name);
    let started = Instant::now();
    let mut said = false;
    // Tests shorten the wait; an operator has no reason to.
    let wait_limit = std::env::var("SHADOWMIG_WRITER_LOCK_WAIT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60));
    loop {
        if try_lock(tgt, &key, "taking the migration's writer lock").await? {
            return Ok(());
        }
        if *shutdown.borrow() {
            return Err(RunError::Connection(
                "stopped while waiting for the writer lock".into(),
            ));
        }
        if started.elapsed() > wait_limit {
            return Err(RunError::Fatal(format!(
                "another `shadowmig run` of migration {} is active (it holds the migration's writer lock in the target); \
                 stop it first — or, if it was killed, wait for its database session to end",
                spec.name
            )));
        }
        if !said && started.elapsed() > Duration::from_secs(2) {
            said = true;
            tracing::warn!("waiting for an earlier run's target session to end (writer lock)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many times [`ddl_with_retries`] tries a statement whose lock is not granted.
const DDL_ATTEMPTS: u32 = 10;

/// The first words of a DDL statement, to say which one could not take its lock (the
/// target's `create` may be long; it never holds secrets, unlike connection strings).
fn ddl_head(sql: &str) -> String {
    let first = sql.split(';').next().unwrap_or_default();
    let words: Vec<&str> = first.split_whitespace().collect();
    let head = words.join(" ");
    let head: String = head.chars().take(80).collect();
    format!("`{head}…`")
}

/// Runs `sql` under `lock_timeout`, retrying with backoff when the lock is not granted in
/// time, so DDL never queues behind a long lock (and never makes others queue behind it).
pub async fn ddl_with_retries(
    client: &Client,
    sql: &str,
    lock_timeout_ms: u64,
) -> Result<(), RunError> {
    ddl_with_attempts(client, sql, lock_timeout_ms, DDL_ATTEMPTS).await
}

/// [`ddl_with_retries`] with at most `attempts` tries (at least one).
pub async fn ddl_with_attempts(
    client: &Client,
    sql: &str,
    lock_timeout_ms: u64,
    attempts: u32,
) -> Result<(), RunError> {
    let attempts = attempts.max(1);
    let mut wait = Duration::from_millis(200);
    for attempt in 1..=attempts {
        let r = client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = {lock_timeout_ms}; {sql}; COMMIT;"
            ))
            .await;
        match r {
            Ok(()) => return Ok(()),
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                let lock = e
                    .as_db_error()
                    .map(|d| d.code().code() == "55P03")
                    .unwrap_or(false);
                if !lock {
                    return Err(pg_err("running DDL", e));
                }
                if attempt == attempts {
                    return Err(RunError::Setup(format!(
                        "{} could not take its lock within lock_timeout ({lock_timeout_ms} ms) in {attempts} tries: \
                         another session holds a conflicting lock on the table (find it in pg_locks joined to pg_stat_activity); \
                         run again once it is released, or raise [throttle] lock_timeout_ms. Nothing was changed by this statement",
                        ddl_head(sql)
                    )));
                }
                tracing::warn!(
                    attempt,
                    "DDL waited longer than lock_timeout for its lock; retrying in {:?}",
                    wait
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
    Ok(())
}

/// Idempotent set-up: state schema, publication (source table only), slot, target table.
pub async fn set_up(
    spec: &Spec,
    spec_text: &str,
    src: &Client,
    tgt: &mut Client,
) -> Result<(), RunError> {
    let lt = spec.throttle.lock_timeout_ms;
    state::ensure_schema(tgt, lt.min(u64::from(u32::MAX)) as u32)
        .await
        .map_err(|e| state_err("creating the state schema", e))?;
    ensure_run_state(tgt, lt).await?;
    state::register_migration(&*tgt, &spec.name, spec_text)
        .await
        .map_err(|e| state_err("registering the migration", e))?;
    // A run after a pause (source DDL or TRUNCATE) goes on: the migration is back at its
    // first stage (no cutover stage exists before it), and `status` must not say paused.
    if let Ok(Some(m)) = state::read_migration(&*tgt, &spec.name).await {
        if m.stage == "paused" {
            state::set_stage(&*tgt, &spec.name, "source")
                .await
                .map_err(|e| state_err("resuming after a pause", e))?;
            // Running again after a pause accepts the source table's shape as it is now (D30).
            tgt.execute(
                "UPDATE shadowmig.migrations SET source_shape = NULL WHERE name = $1",
                &[&spec.name],
            )
            .await
            .map_err(|e| pg_err("resuming after a pause", e))?;
        }
    }

    let pubname = spec.publication_name();
    let slot = spec.slot_name();
    let (have_slot, have_pub) = catalog::slot_and_publication_exist(src, &slot, &pubname)
        .await
        .map_err(|e| RunError::Connection(e.to_string()))?;
    if !have_pub {
        // The shadow table must never be in it: PostgreSQL 15 cannot filter our own writes out.
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            quote_ident(&pubname),
            spec.source.table.quoted()
        );
        ddl_with_retries(src, &sql, lt).await?;
        tracing::info!(publication = %pubname, "created the publication");
    }

    if let catalog::SlotPresence::OtherDatabase(other) = &have_slot {
        return Err(RunError::Setup(format!(
            "a replication slot named {slot} already exists in database {other:?}, not in the source database: \
             slot names are cluster-wide, so another migration of the same name holds it; \
             give this migration another `name` in the spec (or abort the other one)"
        )));
    }
    let settled = have_slot.here() && slot_settled(src, &slot).await?;
    if have_slot.here() && !settled {
        // A session that was creating it went away before it was done: the server dropped
        // the unfinished slot, so this run creates it afresh.
        tracing::info!(slot = %slot, "an earlier run's unfinished slot is gone");
    }
    if !settled {
        let mut repl = ReplicationClient::connect_config(spec.source.url.config())
            .await
            .map_err(|e| repl_err("opening a replication connection", e))?;
        repl.create_logical_slot(&slot, false, SnapshotAction::Nothing)
            .await
            .map_err(|e| repl_err("creating the replication slot", e))?;
        let _ = repl.close().await;
        tracing::info!(slot = %slot, "created the replication slot");
    }

    let have_target = catalog::table_oid(&*tgt, &spec.target.table)
        .await
        .map_err(|e| RunError::Setup(e.to_string()))?
        .is_some();
    if !have_target {
        let create = spec.target.create.as_deref().ok_or_else(|| {
            RunError::Setup(format!(
                "target table {} does not exist and the spec has no [target].create",
                spec.target.table.quoted()
            ))
        })?;
        // One transaction: a crash can never leave a table we created but did not record
        // (abort would then not know to drop it, and plan would refuse to resume).
        let mut sql = format!(
            "{create};\nUPDATE shadowmig.migrations SET created_target = true WHERE name = {}",
            quote_literal(&spec.name)
        );
        if spec.copy.defer_indexes {
            // In the same transaction: the key is never gone without its recorded definition.
            sql.push_str(";\n");
            sql.push_str(&deferred::defer_sql(&spec.name, &spec.target.table));
        }
        ddl_with_retries(tgt, &sql, lt).await?;
        tracing::info!(table = %spec.target.table.quoted(), "created the target table");
    }
    Ok(())
}

/// Waits while slot `slot` is still being created (listed, but without a confirmed position:
/// `CREATE_REPLICATION_SLOT` waits for running transactions before the slot is usable), as
/// when the run that was creating it was killed and its walsender has not yet noticed. True
/// when the slot is complete; false when it went away (its creator died). A slot still being
/// made after a minute belongs to a live session: that is an error naming it.
async fn slot_settled(src: &Client, slot: &str) -> Result<bool, RunError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut said = false;
    loop {
        let row = src
            .query_opt(
                "SELECT confirmed_flush_lsn IS NOT NULL, coalesce(active_pid, 0) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND database = current_database()",
                &[&slot],
            )
            .await
            .map_err(|e| pg_err("looking at the replication slot", e))?;
        let Some(row) = row else { return Ok(false) };
        if row.get::<_, bool>(0) {
            return Ok(true);
        }
        let pid: i32 = row.get(1);
        if !said {
            said = true;
            tracing::info!(
                "the replication slot {slot} is still being made by the session with PID {pid}: waiting for it to finish or go away"
            );
        }
        if Instant::now() > deadline {
            return Err(RunError::Setup(format!(
                "the replication slot {slot} has been in the making for over a minute by the session with PID {pid} \
                 (waiting for the transactions that were running when it started): let it finish, or end that session \
                 (SELECT pg_terminate_backend({pid})) and run again"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Columns and tables `run` needs beyond the apply engine's state tables.
async fn ensure_run_state(tgt: &Client, lock_timeout_ms: u64) -> Result<(), RunError> {
    // Under lock_timeout and retried: `status` or `verify` may be reading these tables.
    ddl_with_retries(
        tgt,
        "ALTER TABLE shadowmig.migrations ADD COLUMN IF NOT EXISTS created_target boolean NOT NULL DEFAULT false;
         ALTER TABLE shadowmig.migrations ADD COLUMN IF NOT EXISTS changes_applied bigint NOT NULL DEFAULT 0;
         ALTER TABLE shadowmig.migrations ADD COLUMN IF NOT EXISTS caught_up_at timestamptz;
         ALTER TABLE shadowmig.migrations ADD COLUMN IF NOT EXISTS source_shape text;
         CREATE TABLE IF NOT EXISTS shadowmig.reread (
             migration text NOT NULL,
             key text[] NOT NULL,
             PRIMARY KEY (migration, key)
         );
         CREATE TABLE IF NOT EXISTS shadowmig.deferred_ddl (
             migration text NOT NULL,
             seq int NOT NULL,
             statement text NOT NULL,
             key_columns text[],
             PRIMARY KEY (migration, seq)
         )",
        lock_timeout_ms,
    )
    .await
}

fn hex_key(k: &KeyValue) -> Vec<Option<String>> {
    k.iter().map(|b| Some(hex::encode(b))).collect()
}

fn unhex_key(k: &[Option<String>]) -> Option<KeyValue> {
    k.iter()
        .map(|s| {
            s.as_deref()
                .and_then(|h| hex::decode(h).ok())
                .map(Bytes::from)
        })
        .collect()
}

/// The durable backfill frontier: every source key up to it has been copied.
#[derive(Debug, Clone, Default)]
struct CopyState {
    frontier: Option<KeyValue>,
    rows_copied: i64,
    done: bool,
}

const FRONTIER_ROW: i64 = 0;

impl CopyState {
    /// Records range chunk `id` (ending at `hi`, `None` for the last) as applied, and moves
    /// the frontier over the contiguous applied prefix (`pending` holds ranges applied out of
    /// order; `next` is the first range id not yet in the prefix).
    fn finish_range(
        &mut self,
        pending: &mut HashMap<u64, Option<KeyValue>>,
        next: &mut u64,
        id: u64,
        hi: Option<KeyValue>,
    ) {
        pending.insert(id, hi);
        while let Some(hi) = pending.remove(next) {
            match hi {
                Some(hi) => self.frontier = Some(hi),
                None => self.done = true,
            }
            *next += 1;
        }
    }

    /// The checkpoint row for this state.
    fn checkpoint(&self) -> ChunkProgress {
        ChunkProgress {
            chunk: FRONTIER_ROW,
            last_key: self.frontier.as_ref().map(hex_key),
            rows_copied: self.rows_copied,
            done: self.done,
        }
    }
}

async fn read_copy_state(tgt: &Client, migration: &str) -> Result<CopyState, RunError> {
    let rows = state::read_copy_progress(tgt, migration)
        .await
        .map_err(|e| state_err("reading copy progress", e))?;
    let Some(p) = rows.into_iter().find(|p| p.chunk == FRONTIER_ROW) else {
        return Ok(CopyState::default());
    };
    let frontier = match p.last_key {
        Some(k) => Some(
            unhex_key(&k)
                .ok_or_else(|| RunError::Fatal("copy progress holds an unreadable key".into()))?,
        ),
        None => None,
    };
    Ok(CopyState {
        frontier,
        rows_copied: p.rows_copied,
        done: p.done,
    })
}

/// A chunk the backfill read, waiting in the apply loop for its high watermark.
struct ReadyChunk {
    job: Job,
    /// Which read of the job this is (D38): its watermarks carry it.
    read: u64,
    rows: Vec<TupleData>,
    /// The rows in the target's shape, instead of `rows`, on the bulk path.
    target_rows: Option<TargetRows>,
    snapshot: Snapshot,
    _permit: ReadPermit,
}

/// A worker's permit: held by the rows a read sent until the stream takes them, so that no
/// more chunks are read than the stream has room for. A read that fails after sending its rows
/// releases it itself: those rows wait for a high watermark that may never come, and the
/// job's next read needs the permit (D38).
#[derive(Clone)]
struct ReadPermit(Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>);

impl ReadPermit {
    fn new(p: tokio::sync::OwnedSemaphorePermit) -> Self {
        ReadPermit(Arc::new(std::sync::Mutex::new(Some(p))))
    }

    fn release(&self) {
        if let Ok(mut p) = self.0.lock() {
            p.take();
        }
    }
}

/// What the copier is asked to read. Range ids count up from 1 in key order (the frontier
/// advances over the contiguous finished prefix); re-read ids live above [`KEYS_ID_BASE`].
#[derive(Debug, Clone)]
enum Job {
    Range {
        id: u64,
        lo: Option<KeyValue>,
        hi: Option<KeyValue>,
    },
    Keys {
        id: u64,
        keys: Vec<KeyValue>,
    },
}

const KEYS_ID_BASE: u64 = 1 << 40;

impl Job {
    fn id(&self) -> u64 {
        match self {
            Job::Range { id, .. } | Job::Keys { id, .. } => *id,
        }
    }
}

/// The most backfill workers `throttle --workers` may ask for.
pub const MAX_WORKERS: usize = 16;

/// Knobs shared with the copier, changed by runtime controls.
#[derive(Debug)]
struct Shared {
    paused: AtomicBool,
    workers: AtomicU64,
    chunk_rows: AtomicU64,
    max_lag_bytes: AtomicU64,
    max_apply_lag_ms: AtomicU64,
    /// When the oldest change received but not yet committed in the target arrived (`None`
    /// when everything received has committed). An instant, not a figure the loop computes:
    /// a loop waiting on a writer stuck behind a lock cannot refresh a figure, and the
    /// throttle must see that lag grow (D35).
    unapplied_since: std::sync::Mutex<Option<Instant>>,
    /// The change stream, for how long its oldest message not yet taken by the loop has
    /// waited (the loop takes none while it waits on a writer).
    stream: crate::replication::ConfirmHandle,
    /// Set by the copier when a read found the source table in another shape than prepared
    /// (a DDL the stream has not reached yet): what changed.
    shape_changed: std::sync::Mutex<Option<String>>,
    /// Set by the copier when it stops for good (it cannot reach the source): why. The loop
    /// then restarts the run, with backoff, instead of waiting for chunks that never come.
    copier_failed: std::sync::Mutex<Option<String>>,
}

impl Shared {
    /// How long the oldest change received and not yet committed in the target has waited,
    /// in ms: one in a batch being written or built, or still queued in the stream.
    fn apply_lag_ms(&self) -> u64 {
        let unapplied = self.unapplied_since.lock().ok().and_then(|s| *s);
        [unapplied, self.stream.unread_since()]
            .into_iter()
            .flatten()
            .min()
            .map_or(0, |t| t.elapsed().as_millis() as u64)
    }
}

/// Runs the migration until stopped, caught up (with the option), paused, or a fatal error.
/// Lost connections are retried with backoff and resumed from the state in the target.
pub async fn run(
    spec: &Spec,
    spec_text: &str,
    opts: &RunOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Outcome, RunError> {
    let mut stages = StageLog::new(&spec.name);
    stages.set(RunStage::SettingUp);
    let result = run_stages(spec, spec_text, opts, &mut shutdown, &mut stages).await;
    stages.set(match &result {
        Ok(Outcome::Paused(_)) => RunStage::Paused,
        _ => RunStage::Stopped,
    });
    result
}

/// [`run`] after its first stage change: set up, then connected stretches until an outcome.
async fn run_stages(
    spec: &Spec,
    spec_text: &str,
    opts: &RunOptions,
    shutdown: &mut watch::Receiver<bool>,
    stages: &mut StageLog,
) -> Result<Outcome, RunError> {
    {
        let src = catalog::connect(&spec.source.url)
            .await
            .map_err(|e| RunError::Setup(e.to_string()))?;
        let mut tgt = catalog::connect(&spec.target.url)
            .await
            .map_err(|e| RunError::Setup(e.to_string()))?;
        set_up(spec, spec_text, &src, &mut tgt).await?;
    }
    // Observability must not stop a migration: without the endpoint, say so and go on.
    match crate::metrics::install(spec.metrics.listen) {
        Ok(()) => tracing::info!("metrics on http://{}/metrics", spec.metrics.listen),
        Err(e) => tracing::warn!("{e}; running without the metrics endpoint"),
    }
    metrics::gauge!(crate::metrics::STAGE).set(0.0);
    let mut backoff = Duration::from_millis(500);
    // From when the stream may stream large transactions (never with the option off): put
    // off for a while each time a streamed transaction could not be applied as it arrived,
    // so that the walsender sends that one whole at its commit first (D29).
    let mut streaming_from = opts.streaming.then(Instant::now);
    // The session holding the migration's writer lock, for the life of the process.
    let mut lock: Option<Client> = None;
    loop {
        let began = Instant::now();
        match run_once(spec, opts, shutdown, stages, streaming_from, &mut lock).await {
            Ok(outcome) => return Ok(outcome),
            Err(RunError::Restart { why, streaming: s }) => {
                if s {
                    tracing::info!("{why}");
                } else {
                    let pause = streaming_retry_after();
                    tracing::warn!(
                        "{why}: restarting the change stream without streaming; the walsender sends every transaction whole at its commit for the next {pause:?}"
                    );
                    streaming_from = streaming_from.map(|_| Instant::now() + pause);
                }
            }
            Err(e) if e.retryable() => {
                if *shutdown.borrow() {
                    return Ok(Outcome::Stopped);
                }
                // A run that went well for a minute before this failure starts over at the
                // shortest wait: backoff is for failures in a row, not for the process's life.
                if began.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(500);
                }
                tracing::warn!(
                    "{e}; reconnecting in {:?} and resuming from the last committed batch",
                    backoff
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(Outcome::Stopped),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The writing side of the loop: the batch being built and the one target connection that
/// applies it.
struct Applier<'a> {
    spec: &'a Spec,
    /// What `run` prepared, shared with the writer tasks.
    prepared_arc: Arc<Prepared>,
    /// The apply connection and its writer; `None` while a flush task holds them.
    conn: Option<(Client, ApplyWriter)>,
    /// The batch being written on its own task while the loop reads and coalesces the next
    /// (at most one: batches commit in stream order).
    inflight: Option<tokio::task::JoinHandle<FlushDone>>,
    /// When the oldest change of the batch in flight arrived; cleared once it has committed.
    inflight_since: Option<Instant>,
    /// Where the apply lag is published for the throttle.
    shared: Arc<Shared>,
    /// The source transaction too large for a batch that is being written as it arrives.
    large: Option<LargeTxn>,
    /// The transaction being streamed before its commit (protocol 2), written on the spare
    /// connection while batches commit on the apply connection (D29).
    streamed: Option<LargeTxn>,
    /// What to do with streamed transactions' messages.
    streamed_state: streamed::StreamedState,
    /// A second target connection and writer for streamed transactions; the two swap roles
    /// at each streamed commit.
    spare: Option<(Client, ApplyWriter)>,
    /// [`RunOptions::pipeline`].
    pipeline: bool,
    /// The batch's net effect so far (complete source transactions only).
    batch: Coalescer,
    batch_lsn: Option<Lsn>,
    /// When the first change of the batch was added.
    batch_started: Option<Instant>,
    batch_copy: Option<CopyState>,
    rereads_done: Vec<KeyValue>,
    /// Keys the last flush could not apply from the stream (unchanged TOAST for rows the
    /// target lacks); recorded durably in the same transaction, to be re-read as a chunk.
    new_rereads: Vec<KeyValue>,
    applied: u64,
    /// How many of the batch's changes are backfilled rows (the rest are streamed changes).
    batch_copied: u64,
    /// The stream position of the last message processed outside a transaction. Once the
    /// batch holding everything before it has committed, it may be confirmed: confirming only
    /// commit ends would never pass a watermark, so on an idle source the slot (and the WAL it
    /// holds, which the backfill's own writes keep growing) would never advance.
    position: Lsn,
    /// The live verification sampler, offered a share of each batch's keys.
    sampler: Option<crate::sampler::Sampler>,
    /// The source commit time and local receipt of the batch's oldest streamed transaction,
    /// for the lag histogram.
    batch_oldest: Option<(PgTimestamp, Instant)>,
    /// The backfill's bulk writers, on the bulk path while the backfill is not done.
    bulk: Option<BulkPool>,
}

impl Applier<'_> {
    fn push(&mut self, lsn: Lsn, change: Change) -> Result<(), RunError> {
        offer_and_coalesce(&mut self.sampler, &mut self.batch, lsn, change)?;
        self.batch_lsn = Some(lsn);
        self.batch_started.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Whether the batch is big enough to be flushed at this transaction boundary.
    fn full(&self, opts: &RunOptions) -> bool {
        is_full(&self.batch, opts)
    }

    /// Waits until every bulk chunk handed in is committed.
    async fn settle(&mut self) -> Result<(), RunError> {
        match self.bulk.as_mut() {
            Some(b) => b
                .wait_idle()
                .await
                .map_err(|e| apply_err("writing a backfill chunk", e)),
            None => Ok(()),
        }
    }

    /// True when no bulk chunk is in flight.
    fn bulk_idle(&self) -> bool {
        self.bulk.as_ref().map_or(true, |b| b.idle())
    }

    /// Whether the batch has waited long enough to be flushed at the next boundary.
    fn due(&self, now: Instant, max_delay: Duration) -> bool {
        self.batch_started
            .is_some_and(|t| now.saturating_duration_since(t) >= max_delay)
    }

    /// True when no batch or large transaction is being written: a flush now would not wait.
    fn writer_idle(&self) -> bool {
        self.large.is_none() && self.inflight.as_ref().map_or(true, |h| h.is_finished())
    }

    /// True when the batch is empty and no batch is in flight: everything handed to the
    /// applier has committed.
    fn is_empty(&self) -> bool {
        self.batch_lsn.is_none() && self.inflight.is_none()
    }

    /// Hands the batch to a task that applies it in one target transaction with its progress,
    /// copy frontier and re-read bookkeeping, then confirms its LSN to the slot; returns once
    /// the previous batch has committed (batches commit in order, one in flight). The loop
    /// meanwhile reads and coalesces the next batch, so reading and writing overlap.
    async fn flush(&mut self, stream: &crate::replication::LogicalStream) -> Result<(), RunError> {
        self.join().await?;
        let Some(lsn) = self.batch_lsn else {
            return Ok(());
        };
        // Bulk chunks handed in before this batch's later changes must be in first: a delete
        // or update would otherwise miss a row a chunk is still inserting.
        self.settle().await?;
        let (mut tgt, mut writer) = self.take_conn()?;
        let n = self.batch.changes() as i64;
        let job = FlushJob {
            net: self.batch.finish(),
            changes: n,
            lsn,
            copy_checkpoint: self.batch_copy.take().map(|c| c.checkpoint()),
            rereads_done: std::mem::take(&mut self.rereads_done),
            copied: std::mem::take(&mut self.batch_copied),
            oldest: self.batch_oldest.take(),
            confirm_to: lsn.max(self.position),
            name: self.spec.name.clone(),
            prepared: self.prepared_arc.clone(),
            confirm: stream.confirm_handle(),
        };
        self.batch_lsn = None;
        self.batch_started = None;
        self.inflight_since = Some(job.oldest.map_or_else(Instant::now, |(_, r)| r));
        self.applied += n as u64;
        self.inflight = Some(tokio::spawn(async move {
            let result = write_flush(&mut tgt, &mut writer, job).await;
            FlushDone {
                tgt,
                writer,
                result,
            }
        }));
        self.publish_lag();
        if !self.pipeline {
            self.join().await?;
        }
        Ok(())
    }

    /// Publishes when the oldest change received but not yet committed in the target
    /// arrived: the batch in flight's, else the one being built's. Called at each hand-over
    /// and commit, not only from the loop's timer: a loop that waits on a writer stuck behind
    /// a lock must still show the lag growing (D35).
    fn publish_lag(&self) {
        let since = [self.inflight_since, self.batch_oldest.map(|(_, r)| r)]
            .into_iter()
            .flatten()
            .min();
        if let Ok(mut s) = self.shared.unapplied_since.lock() {
            *s = since;
        }
    }

    /// [`Applier::flush`], then waits until the batch has committed and been confirmed.
    async fn flush_sync(
        &mut self,
        stream: &crate::replication::LogicalStream,
    ) -> Result<(), RunError> {
        self.flush(stream).await?;
        self.join().await
    }

    /// Waits for the batch in flight, if any, and takes back the apply connection.
    /// A large transaction still arriving is abandoned (rolled back in the target): only
    /// what the source committed whole is ever applied.
    async fn join(&mut self) -> Result<(), RunError> {
        if let Some(l) = self.large.take() {
            drop(l.parts);
            self.inflight = Some(l.handle);
        }
        let Some(h) = self.inflight.take() else {
            return Ok(());
        };
        let done = h
            .await
            .map_err(|e| RunError::Fatal(format!("the batch writer task failed: {e}")))?;
        self.inflight_since = None;
        self.publish_lag();
        self.conn = Some((done.tgt, done.writer));
        match done.result {
            Ok(rereads) => self.new_rereads.extend(rereads),
            Err(RunError::Abandoned) => tracing::info!(
                "a large source transaction was cut short before its commit arrived and its parts were rolled back; it is applied whole later"
            ),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// The apply connection and writer, which must not be in use by a flush (call
    /// [`Applier::join`] first).
    fn take_conn(&mut self) -> Result<(Client, ApplyWriter), RunError> {
        self.conn.take().ok_or_else(|| {
            RunError::Fatal("internal: the apply connection is held by a batch in flight".into())
        })
    }

    /// The apply connection, once no batch is in flight.
    async fn tgt(&mut self) -> Result<&Client, RunError> {
        self.join().await?;
        match self.conn.as_ref() {
            Some((c, _)) => Ok(c),
            None => Err(RunError::Fatal(
                "internal: the apply connection is held by a batch in flight".into(),
            )),
        }
    }

    /// Whether the apply connection is known to be closed (not checked while a batch is in
    /// flight: its own error reports that).
    fn tgt_closed(&self) -> bool {
        self.conn.as_ref().is_some_and(|(c, _)| c.is_closed())
    }
}

/// What a flush task needs: a batch's net effect and the bookkeeping committed with it.
struct FlushJob {
    net: crate::apply::Coalesced,
    changes: i64,
    lsn: Lsn,
    copy_checkpoint: Option<ChunkProgress>,
    rereads_done: Vec<KeyValue>,
    copied: u64,
    oldest: Option<(PgTimestamp, Instant)>,
    /// What to confirm to the slot once committed: the batch's LSN, or the stream position
    /// the loop had passed when the batch was cut (everything before it is in the batch).
    confirm_to: Lsn,
    name: String,
    prepared: Arc<Prepared>,
    confirm: crate::replication::ConfirmHandle,
}

/// A flush task's end: the connection and writer it borrowed, and the keys to re-read.
struct FlushDone {
    tgt: Client,
    writer: ApplyWriter,
    result: Result<Vec<KeyValue>, RunError>,
}

/// Counts `changes` as applied and commits `tx`, which the writer wrote into.
async fn commit_counted(
    tx: tokio_postgres::Transaction<'_>,
    writer: &mut ApplyWriter,
    name: &str,
    changes: i64,
    what: &'static str,
) -> Result<(), RunError> {
    tx.execute(
        "UPDATE shadowmig.migrations SET changes_applied = changes_applied + $2 WHERE name = $1",
        &[&name, &changes],
    )
    .await
    .map_err(|e| pg_err("counting applied changes", e))?;
    tx.commit().await.map_err(|e| pg_err(what, e))?;
    writer.batch_committed();
    Ok(())
}

/// Writes one batch in one target transaction and confirms it (the body of a flush task).
async fn write_flush(
    tgt: &mut Client,
    writer: &mut ApplyWriter,
    job: FlushJob,
) -> Result<Vec<KeyValue>, RunError> {
    let started = Instant::now();
    let name = &job.name;
    let n = job.changes;
    let tx = tgt
        .transaction()
        .await
        .map_err(|e| pg_err("starting a batch", e))?;
    let stats = writer
        .write_net(&tx, job.net, n as usize, job.lsn)
        .await
        .map_err(|e| apply_err("applying a batch", e))?;
    if let Some(c) = job.copy_checkpoint.as_ref() {
        state::write_copy_progress(&tx, name, c)
            .await
            .map_err(|e| state_err("writing copy progress", e))?;
    }
    for k in &job.rereads_done {
        tx.execute(
            "DELETE FROM shadowmig.reread WHERE migration = $1 AND key = $2",
            &[name, &hex_key(k)],
        )
        .await
        .map_err(|e| pg_err("clearing a re-read", e))?;
    }
    let rereads = record_rereads(&tx, &job.prepared, name, &stats.needs_reread).await?;
    commit_counted(tx, writer, name, n, "committing a batch").await?;
    job.confirm.confirm(job.confirm_to);
    tracing::debug!(lsn = %job.lsn, changes = n, copied = job.copied, "batch committed");
    metrics::counter!(crate::metrics::ROWS_COPIED_TOTAL).increment(job.copied);
    metrics::counter!(crate::metrics::CHANGES_APPLIED_TOTAL)
        .increment(n as u64 - job.copied.min(n as u64));
    metrics::histogram!(crate::metrics::BATCH_SIZE).record(n as f64);
    metrics::histogram!(crate::metrics::APPLY_SECONDS).record(started.elapsed().as_secs_f64());
    if let Some((ts, received)) = job.oldest {
        metrics::histogram!(crate::metrics::BATCH_LAG_SECONDS)
            .record(commit_age(ts, received).as_secs_f64());
    }
    Ok(rereads)
}

impl Applier<'_> {
    /// Starts writing a source transaction too large for a batch (it reached
    /// `opts.batch_changes` changes): the batch before it is committed first, then a task takes
    /// the apply connection, opens one target transaction and writes the transaction's
    /// coalesced parts into it as they arrive ([`Applier::push_large`]), while the loop goes on
    /// reading. It commits at the source commit ([`Applier::commit_large`]) and rolls back if
    /// the transaction is abandoned (a pause, shutdown or a lost connection before its commit):
    /// the target never shows part of a source transaction, and memory stays bounded by parts.
    async fn begin_large(
        &mut self,
        stream: &crate::replication::LogicalStream,
        lsn: Lsn,
    ) -> Result<(), RunError> {
        self.flush(stream).await?;
        self.join().await?;
        // Chunks handed in before this transaction must be in first (see `flush`).
        self.settle().await?;
        let (tgt, writer) = self.take_conn()?;
        tracing::info!("applying a large source transaction in parts as it arrives");
        self.large = Some(self.spawn_parts_writer(tgt, writer, lsn)?);
        Ok(())
    }

    /// Starts a task that writes a source transaction's parts into one target transaction on
    /// `tgt` and commits it at the source commit; `lsn` orders the transaction's changes.
    fn spawn_parts_writer(
        &self,
        mut tgt: Client,
        mut writer: ApplyWriter,
        lsn: Lsn,
    ) -> Result<LargeTxn, RunError> {
        let net = writer
            .new_batch()
            .map_err(|e| apply_err("applying a large transaction", e))?;
        let (parts, rx) = tokio::sync::mpsc::channel(1);
        let name = self.spec.name.clone();
        let prepared = self.prepared_arc.clone();
        let handle = tokio::spawn(async move {
            let result = write_large(&mut tgt, &mut writer, &prepared, &name, rx).await;
            FlushDone {
                tgt,
                writer,
                result,
            }
        });
        Ok(LargeTxn {
            parts,
            handle,
            net,
            lsn,
            changes: 0,
            received: Instant::now(),
        })
    }

    /// Adds one change of the large transaction; hands a part to its task when the part is
    /// full (waiting while the task is still writing the one before).
    async fn push_large(&mut self, change: Change, opts: &RunOptions) -> Result<(), RunError> {
        let Some(l) = self.large.as_mut() else {
            return Err(RunError::Fatal(
                "internal: a large-transaction change without its writer".into(),
            ));
        };
        if l.add(&mut self.sampler, change, opts)? && !l.send_part().await {
            return self.large_writer_ended().await;
        }
        Ok(())
    }

    /// The large-transaction task ended before its transaction did: its error says why.
    async fn large_writer_ended(&mut self) -> Result<(), RunError> {
        self.join().await.and(Err(RunError::Fatal(
            "the large-transaction writer ended before the transaction did".into(),
        )))
    }

    /// Hands the large transaction's last part and its commit (`end_lsn`) to its task, which
    /// commits with the progress and confirms; it is then the batch in flight.
    async fn commit_large(
        &mut self,
        end_lsn: Lsn,
        oldest: (PgTimestamp, Instant),
        stream: &crate::replication::LogicalStream,
    ) -> Result<(), RunError> {
        let Some(l) = self.large.take() else {
            return Err(RunError::Fatal(
                "internal: a large-transaction commit without its writer".into(),
            ));
        };
        self.commit_parts(l, end_lsn, oldest, stream).await
    }

    /// Hands a transaction's last part and its commit to its writer task, which becomes the
    /// batch in flight.
    async fn commit_parts(
        &mut self,
        mut l: LargeTxn,
        end_lsn: Lsn,
        oldest: (PgTimestamp, Instant),
        stream: &crate::replication::LogicalStream,
    ) -> Result<(), RunError> {
        let mut sent = true;
        if !l.net.is_empty() {
            let part = l.take_part();
            sent = l.parts.send(part).await.is_ok();
        }
        let end = LargeMsg::Commit {
            lsn: end_lsn,
            changes: l.changes,
            confirm_to: end_lsn.max(self.position),
            oldest,
            confirm: stream.confirm_handle(),
        };
        sent = sent && l.parts.send(end).await.is_ok();
        self.applied += l.changes;
        self.inflight = Some(l.handle);
        if !sent {
            return self.large_writer_ended().await;
        }
        Ok(())
    }
}

/// A source transaction too large for a batch, written by a task into one open target
/// transaction while it arrives.
struct LargeTxn {
    parts: tokio::sync::mpsc::Sender<LargeMsg>,
    handle: tokio::task::JoinHandle<FlushDone>,
    /// The part being coalesced.
    net: Coalescer,
    /// The transaction's commit LSN (from its Begin): the order key of its changes (zero for
    /// a streamed transaction, whose commit LSN comes last).
    lsn: Lsn,
    changes: u64,
    /// When its writer started, for the lag histogram of a streamed transaction.
    received: Instant,
}

impl LargeTxn {
    /// Offers `change` to the sampler and adds it to the part; true when the part is full.
    fn add(
        &mut self,
        sampler: &mut Option<crate::sampler::Sampler>,
        change: Change,
        opts: &RunOptions,
    ) -> Result<bool, RunError> {
        offer_and_coalesce(sampler, &mut self.net, self.lsn, change)?;
        self.changes += 1;
        Ok(is_full(&self.net, opts))
    }

    /// Hands the part to the writer task (waiting while it writes the one before); false when
    /// the task has ended.
    async fn send_part(&mut self) -> bool {
        let part = self.take_part();
        self.parts.send(part).await.is_ok()
    }

    /// The part coalesced so far, for the task; the part starts empty again.
    fn take_part(&mut self) -> LargeMsg {
        LargeMsg::Part {
            changes: self.net.changes(),
            net: self.net.finish(),
        }
    }
}

/// Offers a change to the sampler, then adds it to `net`. Offered before the commit: the
/// sampler compares only after apply has passed the LSN it read the source at, so it never
/// sees a batch or a large transaction half-applied.
fn offer_and_coalesce(
    sampler: &mut Option<crate::sampler::Sampler>,
    net: &mut Coalescer,
    lsn: Lsn,
    change: Change,
) -> Result<(), RunError> {
    if let Some(s) = sampler.as_mut() {
        s.offer_change(&change);
    }
    net.push(SourceChange { lsn, change })
        .map_err(|e| apply_err("coalescing changes", e.into()))
}

/// Whether a batch or part is big enough to be written: `batch_rows` net rows or
/// `batch_bytes` of memory.
fn is_full(net: &Coalescer, opts: &RunOptions) -> bool {
    net.net_rows() >= opts.batch_rows || net.bytes() >= opts.batch_bytes
}

/// What the large-transaction task is sent.
enum LargeMsg {
    /// A coalesced part, written into the open transaction.
    Part {
        net: crate::apply::Coalesced,
        changes: usize,
    },
    /// The source commit: record progress, commit, confirm.
    Commit {
        lsn: Lsn,
        changes: u64,
        confirm_to: Lsn,
        oldest: (PgTimestamp, Instant),
        confirm: crate::replication::ConfirmHandle,
    },
}

/// The body of a large-transaction task: parts into one target transaction, committed at the
/// source commit. A closed channel before the commit rolls the transaction back.
async fn write_large(
    tgt: &mut Client,
    writer: &mut ApplyWriter,
    prepared: &Prepared,
    name: &str,
    mut rx: tokio::sync::mpsc::Receiver<LargeMsg>,
) -> Result<Vec<KeyValue>, RunError> {
    let tx = tgt
        .transaction()
        .await
        .map_err(|e| pg_err("starting a large transaction", e))?;
    let mut rereads = Vec::new();
    loop {
        match rx.recv().await {
            Some(LargeMsg::Part { net, changes }) => {
                let stats = writer
                    .write_part(&tx, net, changes)
                    .await
                    .map_err(|e| apply_err("applying a large transaction", e))?;
                rereads.extend(record_rereads(&tx, prepared, name, &stats.needs_reread).await?);
            }
            Some(LargeMsg::Commit {
                lsn,
                changes,
                confirm_to,
                oldest,
                confirm,
            }) => {
                writer
                    .write_progress(&tx, lsn)
                    .await
                    .map_err(|e| apply_err("recording a large transaction's progress", e))?;
                commit_counted(
                    tx,
                    writer,
                    name,
                    changes as i64,
                    "committing a large transaction",
                )
                .await?;
                confirm.confirm(confirm_to);
                metrics::counter!(crate::metrics::CHANGES_APPLIED_TOTAL).increment(changes);
                metrics::histogram!(crate::metrics::BATCH_LAG_SECONDS)
                    .record(commit_age(oldest.0, oldest.1).as_secs_f64());
                return Ok(rereads);
            }
            // Abandoned before its commit: dropping `tx` rolls it back.
            None => return Err(RunError::Abandoned),
        }
    }
}

/// How old a source transaction is now: from its commit on the source (`commit_ts`, microseconds
/// since 2000-01-01, the source's clock) to now, and never less than the time since we received
/// it (`received`, our monotonic clock), so a source clock running ahead of ours cannot hide lag.
fn commit_age(commit_ts: PgTimestamp, received: Instant) -> Duration {
    const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64 - PG_EPOCH_UNIX_MICROS)
        .unwrap_or(commit_ts);
    let by_clock = Duration::from_micros(now.saturating_sub(commit_ts).max(0) as u64);
    by_clock.max(received.elapsed())
}

/// Records, in the batch's transaction, the keys apply could not write from the stream, so
/// a crash before their re-read cannot lose them.
async fn record_rereads(
    tx: &tokio_postgres::Transaction<'_>,
    prepared: &Prepared,
    migration: &str,
    tuples: &[TupleData],
) -> Result<Vec<KeyValue>, RunError> {
    let mut keys = Vec::with_capacity(tuples.len());
    for t in tuples {
        let k = key_of(prepared, t)?;
        tx.execute(
            "INSERT INTO shadowmig.reread (migration, key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&migration, &hex_key(&k)],
        )
        .await
        .map_err(|e| pg_err("recording a re-read", e))?;
        keys.push(k);
    }
    Ok(keys)
}

/// One connected stretch of the migration: from the committed state to an outcome or error.
async fn run_once(
    spec: &Spec,
    opts: &RunOptions,
    shutdown: &mut watch::Receiver<bool>,
    stages: &mut StageLog,
    streaming_from: Option<Instant>,
    lock: &mut Option<Client>,
) -> Result<Outcome, RunError> {
    let mut src = catalog::connect(&spec.source.url)
        .await
        .map_err(|e| RunError::Connection(e.to_string()))?;
    let mut tgt = catalog::connect_as(&spec.target.url, "apply")
        .await
        .map_err(|e| RunError::Connection(e.to_string()))?;
    // The writer lock lives on a session of its own, kept across restarts of the stream: a
    // second `run` must not slip in while this one reconnects.
    if lock.as_ref().map_or(true, |c| c.is_closed()) {
        let c = catalog::connect_as(&spec.target.url, "lock")
            .await
            .map_err(|e| RunError::Connection(e.to_string()))?;
        take_writer_lock(&c, spec, shutdown).await?;
        *lock = Some(c);
    }
    let (prepared, prepared_at) = prepare_at(spec, &src, &tgt, shutdown).await?;
    let prepared = Arc::new(prepared);
    let writer = forward_writer(spec, &prepared)?;
    let committed = writer
        .committed_lsn(&tgt)
        .await
        .map_err(|e| apply_err("reading progress", e))?;
    // A DDL while no stream of this run was reading (a reconnect or restart): the operator
    // decides, as for one seen in the stream, once what was written before it is applied.
    let mut stale = accept_shape(&tgt, spec, &prepared.source_columns).await?;
    if let Some(s) = &stale {
        tracing::info!(
            "the source table changed shape while no stream was reading ({}): applying the changes written before, then pausing",
            s.why
        );
    }
    let mut copy_state = read_copy_state(&tgt, &spec.name).await?;
    // With deferred constraints the whole copy comes first and nothing is streamed until the
    // constraints are built; the stream then starts where the slot was created (D26).
    let deferred = deferred::pending(&tgt, &spec.name).await?;
    if !copy_state.done && (spec.copy.defer_indexes || !deferred.is_empty()) {
        stages.set(RunStage::Backfill);
        match deferred::copy_all(spec, &prepared, &tgt, &mut copy_state, shutdown).await {
            Ok(true) => {}
            Ok(false) => return Ok(Outcome::Stopped),
            Err(RunError::Shape(why)) => {
                // Nothing streams during this copy: the chunks so far are committed, and the
                // operator decides as for a DDL seen in the stream.
                let msg = pause_message(spec, &Poison::Shape(why), committed.unwrap_or(Lsn::ZERO));
                let _ = state::set_last_error(&tgt, &spec.name, Some(&msg)).await;
                let _ = state::set_stage(&tgt, &spec.name, "paused").await;
                return Ok(Outcome::Paused(msg));
            }
            Err(e) => return Err(e),
        }
    }
    if !deferred.is_empty() {
        deferred::build(spec, &mut tgt, &deferred).await?;
    }
    let pending_rereads = queued_rereads(&tgt, &spec.name).await?;
    let control = catalog::connect_as(&spec.target.url, "control")
        .await
        .map_err(|e| RunError::Connection(e.to_string()))?;

    let repl = ReplicationClient::connect_config(spec.source.url.config())
        .await
        .map_err(|e| repl_err("opening the replication connection", e))?;
    // Streaming of in-progress transactions only once the backfill is done: a streamed
    // transaction is written before its commit, which the watermark windows and the bulk
    // writers do not allow for (D29).
    // Not while a stale shape is being drained: its changes are mapped as whole transactions.
    let streaming =
        copy_state.done && stale.is_none() && streaming_from.is_some_and(|t| Instant::now() >= t);
    let proto = if streaming { 2 } else { 1 };
    let mut options = PgOutputOptions::new(proto)
        .publication(&spec.publication_name())
        .binary(true)
        .messages(true);
    if streaming {
        options = options.streaming(true);
    }
    let mut stream = repl
        .start_logical(
            &spec.slot_name(),
            committed.unwrap_or(Lsn::ZERO),
            &options,
            // Frequent status updates: the slot follows what is applied within a second. A deep
            // read-ahead lets the walsender go on decoding while a batch is being applied
            // (BENCHMARKS "engine", D1): about 10–20 MB at most.
            StreamConfig::default()
                .status_interval(Duration::from_secs(1))
                .channel_capacity(65_536),
        )
        .await
        .map_err(|e| start_err(&spec.slot_name(), e))?;
    tracing::info!(from = %committed.unwrap_or(Lsn::ZERO), rows_copied = copy_state.rows_copied, copy_done = copy_state.done, streaming, "streaming changes");

    // Per-process epoch: watermarks left in the WAL by an earlier process are ignored.
    let epoch: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    if stale.is_some() {
        // Everything written before the DDL is in the stream before this marker.
        emit_watermark(
            &src,
            MESSAGE_PREFIX,
            &marker("shape", &spec.name, epoch, 0, 0),
        )
        .await
        .map_err(|e| copy_err("emitting a shape marker", e))?;
    }
    let shared = Arc::new(Shared {
        paused: AtomicBool::new(false),
        workers: AtomicU64::new(u64::from(spec.copy.workers.max(1))),
        chunk_rows: AtomicU64::new(spec.copy.chunk_rows),
        max_lag_bytes: AtomicU64::new(spec.throttle.max_lag_bytes),
        max_apply_lag_ms: AtomicU64::new(spec.throttle.max_apply_lag_ms),
        unapplied_since: std::sync::Mutex::new(None),
        stream: stream.confirm_handle(),
        shape_changed: std::sync::Mutex::new(None),
        copier_failed: std::sync::Mutex::new(None),
    });
    let (chunk_tx, mut chunk_rx) = mpsc::channel::<ReadyChunk>(64);
    let (job_tx, job_rx) = mpsc::unbounded_channel::<Job>();
    let bulk = match &prepared.transformed {
        Some(_) if !copy_state.done => Some(start_bulk(spec, &prepared, &tgt, shutdown).await?),
        _ => None,
    };
    let _copier = AbortOnDrop(tokio::spawn(copier(
        spec.clone(),
        prepared.copy_source.clone(),
        bulk.as_ref()
            .and(prepared.transformed.clone())
            .map(Arc::new),
        epoch,
        copy_state.frontier.clone(),
        copy_state.done,
        shared.clone(),
        chunk_tx,
        job_rx,
        job_tx.clone(),
    )));
    let mut next_keys_id = KEYS_ID_BASE;
    let mut pending_keys: BTreeSet<u64> = BTreeSet::new();
    send_rereads(
        &job_tx,
        &mut next_keys_id,
        &mut pending_keys,
        pending_rereads,
    );

    let batch = writer
        .new_batch()
        .map_err(|e| apply_err("preparing apply", e))?;
    let mut ap = Applier {
        spec,
        prepared_arc: prepared.clone(),
        conn: Some((tgt, writer)),
        inflight: None,
        inflight_since: None,
        shared: shared.clone(),
        large: None,
        streamed: None,
        streamed_state: streamed::StreamedState::default(),
        spare: None,
        pipeline: opts.pipeline,
        batch,
        batch_lsn: None,
        batch_started: None,
        batch_copy: None,
        rereads_done: Vec::new(),
        new_rereads: Vec::new(),
        applied: 0,
        batch_copied: 0,
        position: committed.unwrap_or(Lsn::ZERO),
        sampler: crate::sampler::start(
            spec,
            crate::sampler::key_columns(&prepared.source_columns, &prepared.copy_source.key),
        ),
        batch_oldest: None,
        bulk,
    };
    let mut decoder = Decoder::new(proto);
    // The streamed transaction whose block is open (Stream Start … Stream Stop).
    let mut in_stream: Option<u32> = None;
    let mut tracker: WatermarkTracker<KeyValue> = WatermarkTracker::default();
    let mut ready: ReadBook<ReadyChunk> = ReadBook::default();
    let mut done_ranges: HashMap<u64, Option<KeyValue>> = HashMap::new();
    let mut next_frontier_id: u64 = 1;
    let mut txn: Option<Txn> = None;
    // Set while the table's tuples arrive in a shape older than the prepared one (D30).
    let mut older_shape: Option<shape::ShapeMap> = None;
    // What rows are matched and re-read by: the identity and the backfill key.
    let identity: Vec<bool> = prepared
        .apply_target
        .source_columns
        .iter()
        .enumerate()
        .map(|(i, c)| c.is_identity || prepared.copy_source.key.contains(&i))
        .collect();
    let mut last_end = committed.unwrap_or(Lsn::ZERO);
    let mut sync_sent: Option<u64> = None;
    let mut sync_seq: u64 = 0;
    let mut last_report = Instant::now();
    // Due at once: the lag gauges exist from a stream's first moments (a stream restarted
    // right after a short backfill would otherwise show none for half a second).
    let mut control_check = Instant::now()
        .checked_sub(Duration::from_secs(1))
        .unwrap_or_else(Instant::now);
    let started = Instant::now();
    let mut caught_up_logged = false;
    let mut fast_reads: u32 = 0;
    // The planner's row estimate and the server's WAL limit for slots, for the progress
    // display: neither is worth failing a run over.
    let (estimate, keep_bytes): (u64, Option<i64>) = match src
        .query_opt(
            "SELECT (SELECT sum(greatest(c.reltuples, 0))::int8 FROM pg_class c \
                     WHERE c.oid = $1::int8::oid OR c.oid IN (SELECT relid FROM pg_partition_tree($1::int8::oid) WHERE isleaf)), \
                    pg_size_bytes(current_setting('max_slot_wal_keep_size'))",
            &[&i64::from(prepared.source_oid)],
        )
        .await
    {
        Ok(Some(r)) => (
            r.try_get::<_, Option<i64>>(0).ok().flatten().unwrap_or(0).max(0) as u64,
            r.try_get::<_, Option<i64>>(1).ok().flatten(),
        ),
        _ => (0, None),
    };
    let mut bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        Some(Progress::new(estimate))
    } else {
        None
    };
    let mut report = ProgressReport::new(estimate, keep_bytes, copy_state.rows_copied);

    // A batch may be in flight when the loop fails: it must finish (commit or fail) before a
    // retry reads the progress, or its older images could land after the retry's newer ones.
    let outcome: Result<Outcome, RunError> = async {
    loop {
        if *shutdown.borrow() {
            // Finish the current batch (complete transactions only) and the chunks handed to
            // the bulk writers, commit, confirm, exit.
            ap.settle().await?;
            ap.flush_sync(&stream).await?;
            let _ = stream.send_status_now().await;
            let _ = stream.shutdown().await;
            return Ok(Outcome::Stopped);
        }
        // Behind the source (the read-ahead holds a backlog), a batch may grow for longer while
        // the writer is busy: the changes are late anyway, and a larger batch coalesces away
        // more of them. Once the writer is free it takes what is there (D25).
        let behind = stream.queued() >= BACKLOG_QUEUED;
        // One clock read per event for every age below (each read showed in the drain's
        // profile).
        let now = Instant::now();
        let max_delay = if behind {
            opts.batch_max_delay * 8
        } else {
            opts.batch_max_delay
        };
        let eager = opts.eager
            && behind
            && ap.writer_idle()
            && (ap.batch.changes() >= BACKLOG_EAGER_CHANGES || ap.due(now, opts.batch_max_delay / 5));
        // A due batch that a busy writer cannot take yet keeps growing (and coalescing)
        // instead of stopping the loop until the writer is free; 8× the delay bounds it.
        let due = ap.due(now, max_delay)
            && (ap.writer_idle() || ap.due(now, opts.batch_max_delay * 8));
        if txn.is_none() && (eager || due) {
            ap.flush(&stream).await?;
        }
        if !streaming
            && stale.is_none()
            && streaming_from.is_some_and(|t| now >= t)
            && copy_state.done
            && txn.is_none()
            && ap.bulk_idle()
            && ready.is_empty()
        {
            // The backfill finished during this stream, or a fallback's time is up: start one
            // that streams large transactions, from what is committed (anything else comes
            // again, as after a reconnect; the batch is committed first so that little does).
            ap.flush_sync(&stream).await?;
            let _ = stream.send_status_now().await;
            let _ = stream.shutdown().await;
            return Err(RunError::Restart {
                why: "restarting the change stream with large transactions streamed as they happen".into(),
                streaming: true,
            });
        }
        if now.saturating_duration_since(control_check) > Duration::from_millis(500) {
            control_check = now;
            // A connection the server closed (a restart, an administrator) must tear the
            // pipeline down now: a walsender that is shutting down waits for us to confirm
            // everything it sent, which we cannot do without the target.
            if ap.tgt_closed() || src.is_closed() || control.is_closed() {
                return Err(RunError::Connection(
                    "a connection to the source or target closed".into(),
                ));
            }
            read_controls(&control, &spec.name, &shared).await;
            let found = shared.shape_changed.lock().ok().and_then(|mut s| s.take());
            if let (Some(why), None) = (found, stale.as_ref()) {
                // A DDL the stream has not reached: apply what comes before it, then pause
                // there, as for one found at a reconnect (D31).
                tracing::info!("the backfill found the source table changed ({why}): applying the changes before it, then pausing");
                emit_watermark(&src, MESSAGE_PREFIX, &marker("shape", &spec.name, epoch, 0, 0))
                    .await
                    .map_err(|e| copy_err("emitting a shape marker", e))?;
                stale = Some(StaleShape {
                    accepted: shape_text(prepared.source_columns.iter().map(|c| (c.name.as_str(), c.type_oid))),
                    why: format!("the backfill found it changed: {why}"),
                });
            }
            ap.publish_lag();
            let lag = shared.apply_lag_ms();
            metrics::gauge!(crate::metrics::APPLY_LAG_SECONDS).set(lag as f64 / 1000.0);
            // Lag in bytes: the source's WAL position against what is confirmed (the slot
            // advances over other tables' WAL while idle too).
            if let Ok(row) = src
                .query_one(
                    "SELECT coalesce((SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 \
                     FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()), 0)",
                    &[&spec.slot_name()],
                )
                .await
            {
                let bytes: i64 = row.get(0);
                metrics::gauge!(crate::metrics::APPLY_LAG_BYTES).set(bytes as f64);
                report.held_bytes = bytes;
            }
            report.lag_ms = lag;
        }
        stages.set(RunStage::of(
            copy_state.done,
            shared.paused.load(Ordering::Relaxed),
            caught_up_logged,
        ));
        if let Some(bar) = bar.as_mut() {
            bar.update(&copy_state, ap.applied, last_end, &report);
        } else if now.saturating_duration_since(last_report) > Duration::from_secs(5) {
            last_report = now;
            let f = report.take(now, &copy_state, ap.applied);
            tracing::info!(
                rows_copied = copy_state.rows_copied,
                copy_done = copy_state.done,
                rows_per_sec = f.rows_per_sec,
                eta_secs = f.eta_secs,
                changes_applied = ap.applied,
                changes_per_sec = f.changes_per_sec,
                apply_lag_ms = report.lag_ms,
                slot_wal_held = %f.held,
                position = %last_end,
                "progress"
            );
        }
        send_rereads(
            &job_tx,
            &mut next_keys_id,
            &mut pending_keys,
            std::mem::take(&mut ap.new_rereads),
        );
        // While the read-ahead holds events, take them directly: the select below (a timer,
        // a watch and a channel polled per message) cost more than decoding a change. Every
        // 64th event goes through it anyway, so chunks and shutdown are never starved.
        let event = if fast_reads > 0 && stream.queued() > 0 {
            fast_reads -= 1;
            Ok(stream.next().await)
        } else {
            fast_reads = 64;
            tokio::select! {
                biased;
                _ = shutdown.changed() => continue,
                c = chunk_rx.recv() => {
                    match c {
                        Some(c) => ready.arrived(c.job.id(), c.read, c),
                        None => return Err(copier_stopped(&shared)),
                    }
                    continue;
                }
                e = tokio::time::timeout(opts.batch_idle, stream.next()) => e,
            }
        };
        let event = match event {
            Err(_) => {
                // A quiet stream: apply what is complete; once the backfill is done, ask the
                // stream (with a marker) whether everything up to now has been applied.
                if txn.is_none() && !ap.is_empty() {
                    ap.flush_sync(&stream).await?;
                }
                if txn.is_none() && ap.is_empty() {
                    // Everything processed is applied (or durably queued for a re-read).
                    stream.confirm(ap.position);
                }
                if copy_state.done
                    && txn.is_none()
                    && ap.is_empty()
                    && sync_sent.is_none()
                    && ready.is_empty()
                    && pending_keys.is_empty()
                {
                    sync_seq += 1;
                    emit_watermark(
                        &src,
                        MESSAGE_PREFIX,
                        &marker("sync", &spec.name, epoch, sync_seq, 0),
                    )
                    .await
                    .map_err(|e| copy_err("emitting a sync marker", e))?;
                    sync_sent = Some(sync_seq);
                }
                continue;
            }
            Ok(None) => return Err(RunError::Connection("the replication stream ended".into())),
            Ok(Some(Err(e))) => return Err(repl_err("reading the stream", e)),
            Ok(Some(Ok(ev))) => ev,
        };
        let ReplicationEvent::XLogData {
            data, wal_start, ..
        } = event
        else {
            continue;
        };
        let msg = decoder
            .decode(&data)
            .map_err(|e| RunError::Fatal(format!("decoding the change stream: {e}")))?;
        if txn.is_none()
            && in_stream.is_none()
            && !matches!(
                msg,
                LogicalMessage::Begin { .. }
                    | LogicalMessage::StreamStart { .. }
                    | LogicalMessage::StreamCommit { .. }
                    | LogicalMessage::StreamAbort { .. }
            )
        {
            // A message outside any transaction (a watermark or sync marker).
            ap.position = ap.position.max(wal_start);
        }
        match msg {
            LogicalMessage::Begin {
                xid,
                commit_ts,
                final_lsn,
            } => {
                txn = Some(Txn {
                    xid,
                    commit_ts,
                    received: stream.arrived_at(),
                    changes: Vec::new(),
                    keys: Vec::new(),
                    track: tracker.open_windows() > 0,
                    final_lsn,
                    // Its commit record begins before the last commit applied ends: replayed
                    // after a restart, and already in the target (checked again at Commit).
                    skip: committed.is_some_and(|c| final_lsn < c),
                    large: false,
                });
            }
            LogicalMessage::Relation { body, .. }
                if body.oid == prepared.source_oid && stale.is_some() =>
            {
                let Some(s) = stale.as_ref() else { continue };
                let shape = shape_text(body.columns.iter().map(|c| (c.name.as_str(), c.type_oid)));
                let mapped = (shape == s.accepted)
                    .then(|| shape::ShapeMap::new(&body, &prepared.source_columns, &identity));
                match mapped {
                    // Written before the DDL, in the shape prepared (a DDL the backfill found).
                    Some(Ok(_)) if shape_changed(&body, &prepared.source_columns).is_none() => older_shape = None,
                    // Written before the DDL, in the shape the operator accepted.
                    Some(Ok(m)) => older_shape = Some(m),
                    Some(Err(e)) => {
                        return pause(&mut ap, &mut src, &Poison::Shape(format!("{}; {e}", s.why)), last_end, stream).await;
                    }
                    // The DDL is crossed: its transaction is not applied.
                    None => {
                        return pause(&mut ap, &mut src, &Poison::Shape(s.why.clone()), last_end, stream).await;
                    }
                }
            }
            LogicalMessage::Relation { body, xid } if body.oid == prepared.source_oid => {
                let Some(why) = shape_changed(&body, &prepared.source_columns) else {
                    if in_stream.is_none() {
                        older_shape = None;
                    }
                    continue;
                };
                if let Some(top) = in_stream {
                    // Not yet committed, and it may abort: decided at its commit.
                    ap.poison_streamed(top, xid.unwrap_or(top), Poison::Shape(why)).await?;
                    continue;
                }
                match txn.as_ref().filter(|t| t.final_lsn < prepared_at) {
                    // Committed before the columns were read: written before a DDL they
                    // include, replayed (D30).
                    Some(t) => match shape::ShapeMap::new(&body, &prepared.source_columns, &identity) {
                        Ok(m) => {
                            tracing::info!(
                                xid = t.xid,
                                commit = %t.final_lsn,
                                "changes written before the source table's last change of shape ({why}): matched to its current columns by name{}",
                                if m.complete() { "" } else { "; rows whose columns changed since are re-read from the source" }
                            );
                            older_shape = Some(m);
                        }
                        Err(e) => {
                            return pause(&mut ap, &mut src, &Poison::Shape(format!("{why}; {e}")), last_end, stream).await;
                        }
                    },
                    None => {
                        return pause(&mut ap, &mut src, &Poison::Shape(why), last_end, stream).await;
                    }
                }
            }
            LogicalMessage::Insert { .. } | LogicalMessage::Update { .. } | LogicalMessage::Delete { .. }
                if in_stream.is_none() && older_shape.is_some() =>
            {
                let (Some(m), Some(t)) = (older_shape.as_ref(), txn.as_mut()) else { continue };
                let change = match msg {
                    LogicalMessage::Insert { relation, new, .. } if relation == prepared.source_oid => Change::Insert { new },
                    LogicalMessage::Update { relation, old: None, new, .. } if relation == prepared.source_oid => Change::Upsert { new },
                    LogicalMessage::Update { relation, old: Some((old_kind, old)), new, .. } if relation == prepared.source_oid => {
                        Change::KeyChange { old, old_kind, new }
                    }
                    LogicalMessage::Delete { relation, old: (_, old), .. } if relation == prepared.source_oid => Change::Delete { old },
                    _ => continue,
                };
                let mapped = m
                    .map(change)
                    .map_err(|e| RunError::Fatal(format!("source transaction {}: {e}", t.xid)))?;
                for c in mapped {
                    let keys = change_keys(&prepared, t.track, &c)?;
                    add_change(&mut ap, t, c, keys, opts, &stream).await?;
                }
            }
            LogicalMessage::Insert { relation, new, xid } if relation == prepared.source_oid => {
                if let Some(t) = txn.as_mut() {
                    let k = tracked_key(&prepared, t.track, &new)?;
                    add_change(&mut ap, t, Change::Insert { new }, k, opts, &stream).await?;
                } else if let Some(top) = in_stream {
                    ap.push_streamed(top, xid.unwrap_or(top), Change::Insert { new }, opts, &stream).await?;
                }
            }
            LogicalMessage::Update {
                relation, old, new, xid,
            } if relation == prepared.source_oid => {
                if let Some(t) = txn.as_mut() {
                    let k = tracked_key(&prepared, t.track, &new)?;
                    match old {
                        Some((old_kind, old)) => {
                            let ko = tracked_key(&prepared, t.track, &old)?;
                            add_change(&mut ap, t, Change::KeyChange { old, old_kind, new }, k.into_iter().chain(ko), opts, &stream).await?;
                        }
                        None => add_change(&mut ap, t, Change::Upsert { new }, k, opts, &stream).await?,
                    }
                } else if let Some(top) = in_stream {
                    let change = match old {
                        Some((old_kind, old)) => Change::KeyChange { old, old_kind, new },
                        None => Change::Upsert { new },
                    };
                    ap.push_streamed(top, xid.unwrap_or(top), change, opts, &stream).await?;
                }
            }
            LogicalMessage::Delete {
                relation,
                old: (_, old),
                xid,
            } if relation == prepared.source_oid => {
                if let Some(t) = txn.as_mut() {
                    let k = tracked_key(&prepared, t.track, &old)?;
                    add_change(&mut ap, t, Change::Delete { old }, k, opts, &stream).await?;
                } else if let Some(top) = in_stream {
                    ap.push_streamed(top, xid.unwrap_or(top), Change::Delete { old }, opts, &stream).await?;
                }
            }
            LogicalMessage::Truncate { relations, xid, .. }
                if relations.contains(&prepared.source_oid) =>
            {
                if let Some(top) = in_stream {
                    ap.poison_streamed(top, xid.unwrap_or(top), Poison::Truncate).await?;
                    continue;
                }
                return pause(&mut ap, &mut src, &Poison::Truncate, last_end, stream).await;
            }
            LogicalMessage::StreamStart { xid, first_segment } => {
                tracing::trace!(xid, first_segment, "stream block");
                in_stream = Some(xid);
            }
            LogicalMessage::StreamStop => in_stream = None,
            LogicalMessage::StreamAbort { xid, subxid } => {
                tracing::debug!(xid, subxid, "stream abort");
                ap.abort_streamed(xid, subxid).await?;
            }
            LogicalMessage::StreamCommit {
                xid,
                end_lsn,
                commit_ts,
                ..
            } => {
                tracing::debug!(xid, %end_lsn, "stream commit");
                if ap.streamed_state.open_xid() == Some(xid) {
                    // The walsender takes the shape it sent in the transaction as known from
                    // now on; unpoisoned, that is the prepared shape.
                    older_shape = None;
                }
                if let Some(why) = ap
                    .commit_streamed(xid, end_lsn, commit_ts, (committed, prepared_at), &stream)
                    .await?
                {
                    return pause(&mut ap, &mut src, &why, last_end, stream).await;
                }
                last_end = last_end.max(end_lsn);
                ap.position = ap.position.max(end_lsn);
            }
            LogicalMessage::Commit { end_lsn, .. } => {
                let Some(t) = txn.take() else { continue };
                last_end = end_lsn;
                ap.position = ap.position.max(end_lsn);
                tracker.on_commit(t.xid, t.keys);
                if t.skip && !committed.is_some_and(|c| end_lsn <= c) {
                    return Err(RunError::Fatal(format!(
                        "internal: transaction {} (commit {end_lsn}) was taken for a replay at its Begin but is not applied",
                        t.xid
                    )));
                }
                if committed.is_some_and(|c| end_lsn <= c) {
                    if t.large {
                        // Cannot happen (skipped at Begin); never commit a replay twice.
                        ap.join().await?;
                    }
                    continue;
                }
                if t.large {
                    // Written in parts as it arrived: commit it.
                    ap.commit_large(end_lsn, (t.commit_ts, t.received), &stream)
                        .await?;
                    continue;
                }
                if t.changes.is_empty() {
                    continue;
                }
                ap.batch_oldest.get_or_insert((t.commit_ts, t.received));
                for change in t.changes {
                    ap.push(end_lsn, change)?;
                }
                if ap.full(opts) {
                    ap.flush(&stream).await?;
                }
            }
            LogicalMessage::Message {
                prefix, content, ..
            } if prefix == MESSAGE_PREFIX => {
                let text = String::from_utf8_lossy(&content).into_owned();
                let Some((kind, id, read)) = parse_marker(&text, &spec.name, epoch) else {
                    continue;
                };
                match kind {
                    "shape" => {
                        // Everything written before the DDL is applied once this batch is.
                        let Some(s) = stale.take() else { continue };
                        return pause(&mut ap, &mut src, &Poison::Shape(s.why), last_end, stream).await;
                    }
                    "lw" => {
                        tracing::debug!(chunk = id, read, position = %last_end, "low watermark");
                        if let Some(failed) = ready.on_low(id, read) {
                            tracker.forget(failed);
                        }
                        tracker.on_low(read)
                    }
                    "hw" => {
                        if ready.at_high(id, read) == AtHigh::Stale {
                            tracing::debug!(chunk = id, read, "high watermark of a superseded read");
                            // Its window would track every later commit's keys for good.
                            tracker.forget(read);
                            continue;
                        }
                        // The copier sends a read's rows before it emits its hw.
                        while !ready.has(read) {
                            match chunk_rx.recv().await {
                                Some(c) => ready.arrived(c.job.id(), c.read, c),
                                None => return Err(copier_stopped(&shared)),
                            }
                        }
                        let Some(chunk) = ready.take(id, read) else {
                            continue;
                        };
                        let outcome = tracker.on_high(read, &chunk.snapshot);
                        tracing::debug!(
                            chunk = id,
                            read,
                            rows = chunk.rows.len(),
                            snapshot = ?chunk.snapshot,
                            outcome = match &outcome {
                                HighOutcome::Apply { touched } => format!("apply, {} touched", touched.len()),
                                HighOutcome::Retry { xid } => format!("retry (xid {xid})"),
                                HighOutcome::Unknown => "unknown".into(),
                            },
                            "high watermark"
                        );
                        match outcome {
                            HighOutcome::Retry { xid } => {
                                tracing::info!(chunk = id, xid, "a transaction that committed just before the chunk's low watermark was invisible to its snapshot: reading the chunk again");
                                let _ = job_tx.send(chunk.job);
                            }
                            HighOutcome::Unknown => {}
                            HighOutcome::Apply { touched } => {
                                // Once applied, any other read of the job is redundant: the
                                // stream carries every later change to its rows.
                                ready.complete(id);
                                if chunk.target_rows.is_some() {
                                    // A batch in flight must commit before a bulk chunk is
                                    // handed in: it may hold older images of rows the chunk
                                    // read later.
                                    ap.join().await?;
                                }
                                if let (Some(rows), Some(pool), Job::Range { id, hi, .. }) =
                                    (chunk.target_rows.as_ref(), ap.bulk.as_mut(), &chunk.job)
                                {
                                    // The bulk path: the chunk commits on its own connection,
                                    // before any later stream batch (`flush` waits for it).
                                    let (tuples, n) = rows.without(&touched);
                                    copy_state.rows_copied += n as i64;
                                    copy_state.finish_range(
                                        &mut done_ranges,
                                        &mut next_frontier_id,
                                        *id,
                                        hi.clone(),
                                    );
                                    pool.submit(tuples, n, copy_state.checkpoint())
                                        .await
                                        .map_err(|e| {
                                            apply_err("handing a chunk to the bulk writers", e)
                                        })?;
                                    if copy_state.done {
                                        let (copied, upserted) = pool.counts();
                                        tracing::info!(
                                            rows = copy_state.rows_copied,
                                            chunks_copied = copied,
                                            chunks_upserted = upserted,
                                            "backfill done (bulk path; chunks still in flight are committed before any later batch)"
                                        );
                                    }
                                    continue;
                                }
                                if chunk.target_rows.is_some() {
                                    // Read for the bulk path, which is not running: its rows
                                    // are not in `chunk.rows`, so applying it here would lose them.
                                    return Err(RunError::Fatal(
                                        "internal: a bulk chunk without bulk writers".into(),
                                    ));
                                }
                                let lsn = ap.batch_lsn.unwrap_or(last_end);
                                let mut n = 0i64;
                                for row in chunk.rows {
                                    let k = prepared
                                        .copy_source
                                        .key_of(&row)
                                        .map_err(|e| RunError::Fatal(e.to_string()))?;
                                    if !touched.contains(&k) {
                                        ap.push(lsn, Change::Upsert { new: row })?;
                                        ap.batch_copied += 1;
                                        n += 1;
                                    }
                                }
                                ap.batch_lsn = Some(lsn);
                                match chunk.job {
                                    Job::Keys { id, keys } => {
                                        pending_keys.remove(&id);
                                        ap.rereads_done.extend(keys);
                                    }
                                    Job::Range { id, hi, .. } => {
                                        copy_state.rows_copied += n;
                                        copy_state.finish_range(
                                            &mut done_ranges,
                                            &mut next_frontier_id,
                                            id,
                                            hi,
                                        );
                                        ap.batch_copy = Some(copy_state.clone());
                                        if copy_state.done {
                                            tracing::info!(
                                                rows = copy_state.rows_copied,
                                                "backfill done"
                                            );
                                        }
                                    }
                                }
                                if ap.full(opts) {
                                    ap.flush(&stream).await?;
                                }
                            }
                        }
                    }
                    "sync" if sync_sent == Some(id) => {
                        sync_sent = None;
                        if txn.is_none() && !ap.is_empty() {
                            ap.flush_sync(&stream).await?;
                        }
                        if txn.is_none() && ap.is_empty() {
                            // Everything streamed before the marker is applied: confirm it at
                            // once (LSN-gated re-checks wait on it), and tell the server now.
                            stream.confirm(ap.position);
                            let _ = stream.send_status_now().await;
                        }
                        let idle = ap.is_empty()
                            && ap.bulk_idle()
                            && ready.is_empty()
                            && pending_keys.is_empty()
                            && ap.new_rereads.is_empty();
                        if copy_state.done && idle {
                            if !caught_up_logged {
                                caught_up_logged = true;
                                tracing::info!(elapsed = ?started.elapsed(), rows_copied = copy_state.rows_copied, "caught up: backfill done and every change so far applied");
                                let _ = ap.tgt().await?.execute("UPDATE shadowmig.migrations SET caught_up_at = now() WHERE name = $1", &[&spec.name]).await;
                            }
                            if opts.exit_when_caught_up {
                                stages.set(RunStage::CaughtUp);
                                let _ = stream.send_status_now().await;
                                let _ = stream.shutdown().await;
                                return Ok(Outcome::CaughtUp);
                            }

                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    }
    .await;
    if outcome.is_err() {
        let _ = ap.join().await;
    }
    // A streamed transaction not committed yet is rolled back (it comes again from the slot);
    // waiting for it keeps its row locks from meeting the next stream's batches.
    let _ = ap.abandon_streamed().await;
    outcome
}

/// Why the migration pauses at a change of the source table's shape or a TRUNCATE: what
/// happened and what to do, with the last position applied.
fn pause_message(spec: &Spec, why: &Poison, last_end: Lsn) -> String {
    match why {
        Poison::Shape(why) => format!(
            "the source table {} changed shape mid-migration ({why}); shadowmig paused at LSN {last_end} and applied nothing after it. \
             Make the target table and the spec's [transform] fit the new shape, then run `shadowmig run` again to go on — \
             or `shadowmig abort` to undo the migration",
            spec.source.table.quoted()
        ),
        Poison::Truncate => format!(
            "the source table {} was TRUNCATEd mid-migration; shadowmig paused at LSN {last_end} without applying it (the shadow table still holds the old rows). \
             The backfill must start over: run `shadowmig abort` and then `shadowmig run` again",
            spec.source.table.quoted()
        ),
    }
}

/// The source transaction being received. Without streaming, a transaction arrives whole at
/// its commit position, so the watermark windows open at its Begin are those open at its
/// Commit: keys are collected only when one is.
struct Txn {
    xid: u32,
    /// Source commit time (from Begin) and when Begin arrived, for the lag histogram.
    commit_ts: PgTimestamp,
    received: Instant,
    changes: Vec<Change>,
    keys: Vec<KeyValue>,
    track: bool,
    /// The commit LSN, from Begin.
    final_lsn: Lsn,
    /// Already applied (a replay after a restart): its changes are dropped as they arrive.
    skip: bool,
    /// Reached `batch_changes` changes: its changes go to the applier's large-transaction
    /// writer as they arrive instead of into `changes`.
    large: bool,
}

/// Adds one change of the open source transaction `t`: kept in `t` until its commit, unless
/// the transaction is a replay (dropped) or has grown past `opts.batch_changes` changes, from
/// which point it is written in parts as it arrives ([`Applier::begin_large`]).
async fn add_change(
    ap: &mut Applier<'_>,
    t: &mut Txn,
    change: Change,
    keys: impl IntoIterator<Item = KeyValue>,
    opts: &RunOptions,
    stream: &crate::replication::LogicalStream,
) -> Result<(), RunError> {
    if t.track {
        t.keys.extend(keys);
    }
    if t.skip {
        return Ok(());
    }
    if t.large {
        return ap.push_large(change, opts).await;
    }
    t.changes.push(change);
    if t.changes.len() >= opts.batch_changes {
        ap.begin_large(stream, t.final_lsn).await?;
        t.large = true;
        for c in std::mem::take(&mut t.changes) {
            ap.push_large(c, opts).await?;
        }
    }
    Ok(())
}

/// The terminal display of `run`: a bar with rate and ETA while backfilling, then a line
/// of streaming figures. Off the terminal, periodic log lines say the same.
struct Progress {
    bar: indicatif::ProgressBar,
    streaming: bool,
    last: Instant,
}

impl Progress {
    fn new(estimate: u64) -> Progress {
        let bar = indicatif::ProgressBar::new(estimate);
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} backfill [{bar:30}] {human_pos}/{human_len} rows  {rate}  ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .with_key(
            "rate",
            |st: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0} rows/s", st.per_sec());
            },
        )
        .progress_chars("=> ");
        bar.set_style(style);
        Progress {
            bar,
            streaming: false,
            last: Instant::now(),
        }
    }

    /// The copy of a deferred-constraint backfill (D26): rows only, nothing is streamed yet.
    fn copy_only(&mut self, copy: &CopyState) {
        if self.last.elapsed() < Duration::from_millis(200) && !copy.done {
            return;
        }
        self.last = Instant::now();
        let copied = copy.rows_copied.max(0) as u64;
        if copied > self.bar.length().unwrap_or(0) {
            self.bar.set_length(copied);
        }
        self.bar.set_position(copied);
        if copy.done {
            self.bar
                .finish_with_message("copied; building the constraints");
        } else {
            self.bar
                .set_message("constraints deferred: nothing streamed yet");
        }
    }

    fn update(&mut self, copy: &CopyState, applied: u64, position: Lsn, report: &ProgressReport) {
        if self.last.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last = Instant::now();
        if copy.done && !self.streaming {
            self.streaming = true;
            self.bar.finish_with_message("done");
            self.bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} streaming  {msg}")
            {
                self.bar.set_style(style);
            }
        }
        let copied = copy.rows_copied.max(0) as u64;
        if !self.streaming {
            if copied > self.bar.length().unwrap_or(0) {
                self.bar.set_length(copied);
            }
            self.bar.set_position(copied);
        }
        self.bar.set_message(format!(
            "{applied} changes applied, at {position}, apply lag {} ms, slot holds {}",
            report.lag_ms,
            report.held_text()
        ));
        self.bar.tick();
    }
}

/// The figures of the plain progress line (off a terminal): rates over the last interval,
/// the backfill's ETA from the planner's estimate, and the WAL the slot holds against the
/// server's `max_slot_wal_keep_size`, which invalidates the slot when passed.
struct ProgressReport {
    estimate: u64,
    keep_bytes: Option<i64>,
    lag_ms: u64,
    held_bytes: i64,
    at: Instant,
    rows: i64,
    applied: u64,
}

/// One interval's figures of [`ProgressReport::take`].
struct Figures {
    rows_per_sec: u64,
    changes_per_sec: u64,
    /// None while the rate is 0, when the copy is done, or without an estimate.
    eta_secs: Option<u64>,
    held: String,
}

impl ProgressReport {
    /// `rows` is the count already copied (by earlier runs): rates are this run's only.
    fn new(estimate: u64, keep_bytes: Option<i64>, rows: i64) -> ProgressReport {
        ProgressReport {
            estimate,
            keep_bytes,
            lag_ms: 0,
            held_bytes: 0,
            at: Instant::now(),
            rows: rows.max(0),
            applied: 0,
        }
    }

    fn held_text(&self) -> String {
        let held = human_bytes(self.held_bytes);
        match self.keep_bytes {
            Some(k) if k >= 0 => format!(
                "{held} of max_slot_wal_keep_size {} ({:.0}%)",
                human_bytes(k),
                100.0 * self.held_bytes as f64 / (k.max(1)) as f64
            ),
            _ => format!("{held} (max_slot_wal_keep_size unlimited)"),
        }
    }

    fn take(&mut self, now: Instant, copy: &CopyState, applied: u64) -> Figures {
        let secs = now
            .saturating_duration_since(self.at)
            .as_secs_f64()
            .max(0.001);
        let rows = copy.rows_copied.max(0);
        let rows_per_sec = ((rows - self.rows).max(0) as f64 / secs) as u64;
        let changes_per_sec = (applied.saturating_sub(self.applied) as f64 / secs) as u64;
        self.at = now;
        self.rows = rows;
        self.applied = applied;
        let left = self.estimate.saturating_sub(rows as u64);
        let eta_secs =
            (!copy.done && rows_per_sec > 0 && self.estimate > 0).then(|| left / rows_per_sec);
        Figures {
            rows_per_sec,
            changes_per_sec,
            eta_secs,
            held: self.held_text(),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Hands `keys` to the copier to be re-read, as jobs of at most
/// [`crate::copy::MAX_READ_KEYS`] keys (what one re-read statement takes), each tracked in `pending` until its rows are applied. Every
/// re-read goes through here: a job of more keys would be refused by the copier on every try.
fn send_rereads(
    job_tx: &mpsc::UnboundedSender<Job>,
    next_id: &mut u64,
    pending: &mut BTreeSet<u64>,
    keys: Vec<KeyValue>,
) {
    for k in keys.chunks(crate::copy::MAX_READ_KEYS) {
        *next_id += 1;
        pending.insert(*next_id);
        let _ = job_tx.send(Job::Keys {
            id: *next_id,
            keys: k.to_vec(),
        });
    }
}

/// The key of a change's tuple when a watermark window needs it (`track`); otherwise only
/// checks that the tuple has it, without building it (once per streamed change).
fn tracked_key(p: &Prepared, track: bool, t: &TupleData) -> Result<Option<KeyValue>, RunError> {
    if track {
        return key_of(p, t).map(Some);
    }
    let missing = p.copy_source.key.iter().find(|&&i| {
        !matches!(
            t.0.get(i),
            Some(TupleValue::Binary(_)) | Some(TupleValue::Text(_))
        )
    });
    match missing {
        None => Ok(None),
        // The error says which column.
        Some(_) => key_of(p, t).map(Some),
    }
}

/// The keys a change touches, for the watermark windows (see [`tracked_key`]).
fn change_keys(p: &Prepared, track: bool, c: &Change) -> Result<Vec<KeyValue>, RunError> {
    let tuples: [Option<&TupleData>; 2] = match c {
        Change::Insert { new } | Change::Upsert { new } => [Some(new), None],
        Change::Delete { old } => [Some(old), None],
        Change::KeyChange { old, new, .. } => [Some(new), Some(old)],
    };
    let mut keys = Vec::new();
    for t in tuples.into_iter().flatten() {
        keys.extend(tracked_key(p, track, t)?);
    }
    Ok(keys)
}

/// The identity key of a tuple (new row, or `K`/`O` old tuple), as binary values.
fn key_of(p: &Prepared, t: &TupleData) -> Result<KeyValue, RunError> {
    p.copy_source
        .key
        .iter()
        .map(|&i| match t.0.get(i) {
            Some(TupleValue::Binary(b)) | Some(TupleValue::Text(b)) => Ok(b.clone()),
            _ => Err(RunError::Fatal(format!(
                "a change lacks the value of key column {}: the replica identity must cover the backfill key",
                p.source_columns.get(i).map(|c| c.name.as_str()).unwrap_or("?")
            ))),
        })
        .collect()
}

/// The text of a marker `run` emits into the WAL; [`parse_marker`] reads it back. `read`
/// tells a job's reads apart (D38): 0 for markers that are not a read's.
fn marker(kind: &str, migration: &str, epoch: u64, id: u64, read: u64) -> String {
    format!("{kind}:{migration}:{epoch}:{id}:{read}")
}

/// A marker of this run: its kind, id and read.
fn parse_marker<'a>(text: &'a str, migration: &str, epoch: u64) -> Option<(&'a str, u64, u64)> {
    let mut parts = text.splitn(5, ':');
    let kind = parts.next()?;
    let mig = parts.next()?;
    let ep: u64 = parts.next()?.parse().ok()?;
    let id: u64 = parts.next()?.parse().ok()?;
    let read: u64 = parts.next()?.parse().ok()?;
    (mig == migration && ep == epoch).then_some((kind, id, read))
}

/// Why a `Relation` message no longer matches the shape `run` prepared for, if it does not.
fn shape_changed(body: &RelationBody, expected: &[catalog::Column]) -> Option<String> {
    let got: Vec<(&str, u32)> = body
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_oid))
        .collect();
    let want: Vec<(&str, u32)> = expected
        .iter()
        .map(|c| (c.name.as_str(), c.type_oid))
        .collect();
    if got == want {
        return None;
    }
    let names = |v: &[(&str, u32)]| v.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
    Some(format!(
        "columns were [{}], now [{}]",
        names(&want),
        names(&got)
    ))
}

/// The keys queued for a re-read from the source (D7), durable in the target.
async fn queued_rereads(tgt: &Client, name: &str) -> Result<Vec<KeyValue>, RunError> {
    Ok(tgt
        .query(
            "SELECT key FROM shadowmig.reread WHERE migration = $1",
            &[&name],
        )
        .await
        .map_err(|e| pg_err("reading pending re-reads", e))?
        .iter()
        .filter_map(|r| {
            r.try_get::<_, Vec<Option<String>>>(0)
                .ok()
                .and_then(|k| unhex_key(&k))
        })
        .collect())
}

/// Pauses the migration where the stream is: the batch and the re-reads still queued are
/// committed first, so the target holds every change up to here while the operator decides
/// (a row deleted for a re-read — D7, D30 — would otherwise stay missing until the next run).
/// The re-reads need no watermarks: the stream stops here, and the next run replays every
/// change after what is committed over the rows read, in order.
async fn pause(
    ap: &mut Applier<'_>,
    src: &mut Client,
    why: &Poison,
    last_end: Lsn,
    stream: crate::replication::LogicalStream,
) -> Result<Outcome, RunError> {
    ap.flush_sync(&stream).await?;
    let spec = ap.spec;
    let queued = queued_rereads(ap.tgt().await?, &spec.name).await?;
    let prepared = ap.prepared_arc.clone();
    for keys in queued.chunks(crate::copy::MAX_READ_KEYS) {
        let chunk = match prepared.copy_source.read_keys(src, keys).await {
            Ok(c) => c,
            Err(crate::copy::CopyError::ShapeChanged(e)) => {
                // The next run, prepared for the new shape, re-reads them first.
                tracing::warn!("{} rows stay queued for a re-read by the next run: the source table changed shape ({e})", queued.len());
                break;
            }
            Err(e) => return Err(copy_err("re-reading rows before pausing", e)),
        };
        let lsn = ap.batch_lsn.unwrap_or(last_end);
        for row in chunk.rows {
            ap.push(lsn, Change::Upsert { new: row })?;
        }
        ap.batch_lsn = Some(lsn);
        ap.rereads_done.extend(keys.iter().cloned());
        ap.flush_sync(&stream).await?;
    }
    let msg = pause_message(spec, why, last_end);
    let tgt = ap.tgt().await?;
    let _ = state::set_last_error(tgt, &spec.name, Some(&msg)).await;
    let _ = state::set_stage(tgt, &spec.name, "paused").await;
    let _ = stream.send_status_now().await;
    let _ = stream.shutdown().await;
    Ok(Outcome::Paused(msg))
}

/// Reads the operator's controls (`pause`, `resume`, `throttle`) from the state table and
/// logs each change once.
async fn read_controls(c: &Client, name: &str, shared: &Shared) {
    let Ok(Some(m)) = state::read_migration(c, name).await else {
        return;
    };
    if shared.paused.swap(m.paused, Ordering::Relaxed) != m.paused {
        tracing::info!(
            "backfill {} by the operator",
            if m.paused { "paused" } else { "resumed" }
        );
    }
    let set = |slot: &AtomicU64, v: Option<i64>, what: &str| {
        if let Some(v) = v.filter(|v| *v > 0).map(|v| v as u64) {
            if slot.swap(v, Ordering::Relaxed) != v {
                tracing::info!("{what} set to {v} by the operator");
            }
        }
    };
    set(&shared.chunk_rows, m.chunk_rows, "chunk_rows");
    set(&shared.workers, m.workers.map(i64::from), "workers");
    set(&shared.max_lag_bytes, m.max_lag_bytes, "max_lag_bytes");
    set(
        &shared.max_apply_lag_ms,
        m.max_apply_lag_ms,
        "max_apply_lag_ms",
    );
}

/// The error the loop returns when the copier has stopped (its chunk channel closed).
fn copier_stopped(shared: &Shared) -> RunError {
    let why = shared.copier_failed.lock().ok().and_then(|mut f| f.take());
    RunError::Connection(why.unwrap_or_else(|| "the backfill stopped".into()))
}

/// The backfill: plans key ranges in order and reads them with `workers` connections, each
/// chunk between a low and a high watermark; also serves re-reads of single keys.
#[allow(clippy::too_many_arguments)]
async fn copier(
    spec: Spec,
    source: CopySource,
    fast: Option<Arc<TransformedSource>>,
    epoch: u64,
    frontier: Option<KeyValue>,
    done: bool,
    shared: Arc<Shared>,
    chunk_tx: mpsc::Sender<ReadyChunk>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    job_tx: mpsc::UnboundedSender<Job>,
) {
    // Sized for the most workers an operator may ask for; `shared.workers` caps how many
    // chunks are read at once, and connections are opened as they are first needed.
    let permits = Arc::new(Semaphore::new(MAX_WORKERS));
    // Giving up ends the task, which closes the chunk channel: the loop then restarts the run.
    let give_up = |e: &dyn std::fmt::Display| {
        let why = format!("the backfill cannot reach the source: {e}");
        if let Ok(mut f) = shared.copier_failed.lock() {
            f.get_or_insert(why);
        }
    };
    let mut planner_client = match catalog::connect_as(&spec.source.url, "copy").await {
        Ok(c) => c,
        Err(e) => return give_up(&e),
    };
    let mut lo = frontier;
    let mut planned_all = done;
    let mut next_id: u64 = 1;
    let mut worker_clients: Vec<Arc<tokio::sync::Mutex<Client>>> = Vec::new();
    let mut rr = 0usize;
    let mut next_read: u64 = 1;
    let mut planner_failures = 0u32;
    // How many times in a row each job's read failed, for its retry's backoff.
    let failures: Arc<std::sync::Mutex<HashMap<u64, u32>>> = Arc::default();
    // What holds the backfill (a `Throttle::cause`), to log each change of cause once.
    let mut throttled: Option<&'static str> = None;
    loop {
        // A session ended on its own (terminated by an administrator, an idle timeout) while
        // the run's other connections stayed up: open another.
        if planner_client.is_closed() {
            tracing::warn!("backfill: the planning session to the source was closed; reconnecting");
            planner_client = match catalog::connect_as(&spec.source.url, "copy").await {
                Ok(c) => c,
                Err(e) => return give_up(&e),
            };
        }
        // Re-reads and retries first: they hold up nothing else but are small.
        let job = match jobs.try_recv() {
            Ok(j) => Some(j),
            Err(_) if planned_all => match jobs.recv().await {
                Some(j) => Some(j),
                None => return,
            },
            Err(_) => None,
        };
        let job = match job {
            Some(j) => j,
            None => {
                if let Some(t) = throttle_reason(&planner_client, &spec, &shared).await {
                    if throttled != Some(t.cause) {
                        tracing::info!("backfill throttled: {}", t.why);
                        throttled = Some(t.cause);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                if throttled.take().is_some() {
                    tracing::info!("backfill resumed");
                }
                let n = shared.chunk_rows.load(Ordering::Relaxed).max(1) as i64;
                let hi = match source.boundary_after(&planner_client, lo.as_ref(), n).await {
                    Ok(h) => {
                        planner_failures = 0;
                        h
                    }
                    Err(e) => {
                        planner_failures += 1;
                        let delay = retry_delay(planner_failures);
                        if log_try(planner_failures) {
                            tracing::error!(
                                "backfill: finding a chunk boundary: {e} (try {planner_failures}, again in {} s)",
                                delay.as_secs()
                            );
                        }
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                };
                let id = next_id;
                next_id += 1;
                if hi.is_none() {
                    planned_all = true;
                }
                let job = Job::Range {
                    id,
                    lo: lo.clone(),
                    hi: hi.clone(),
                };
                lo = hi;
                job
            }
        };
        let workers = (shared.workers.load(Ordering::Relaxed) as usize).clamp(1, MAX_WORKERS);
        while MAX_WORKERS - permits.available_permits() >= workers {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let permit = ReadPermit::new(permit);
        let read = next_read;
        next_read += 1;
        while worker_clients.len() < workers {
            match catalog::connect_as(&spec.source.url, "copy").await {
                Ok(c) => worker_clients.push(Arc::new(tokio::sync::Mutex::new(c))),
                Err(e) => return give_up(&e),
            }
        }
        let client = worker_clients[rr % workers].clone();
        rr += 1;
        let source = source.clone();
        let fast = fast.clone();
        let chunk_tx = chunk_tx.clone();
        let name = spec.name.clone();
        let job_tx = job_tx.clone();
        let shared = shared.clone();
        let spec_url = spec.source.url.clone();
        let failures = failures.clone();
        tokio::spawn(async move {
            let mut c = client.lock().await;
            if let Err(e) = read_job(
                &mut c,
                &source,
                fast.as_deref(),
                &name,
                epoch,
                (job.clone(), read),
                permit.clone(),
                &chunk_tx,
            )
            .await
            {
                permit.release();
                if let crate::copy::CopyError::ShapeChanged(why) = &e {
                    // The stream pauses where it reaches the DDL; until then nothing more
                    // is read in the old shape.
                    if let Ok(mut s) = shared.shape_changed.lock() {
                        s.get_or_insert_with(|| why.clone());
                    }
                }
                let tries = failures.lock().map_or(1, |mut f| {
                    let n = f.entry(job.id()).or_insert(0);
                    *n += 1;
                    *n
                });
                let delay = retry_delay(tries);
                if log_try(tries) {
                    tracing::warn!(
                        "backfill: {e}; retrying the chunk (try {tries}, in {} s)",
                        delay.as_secs()
                    );
                }
                // A terminated session may not read as closed yet: ask it.
                if c.is_closed() || c.batch_execute("").await.is_err() {
                    // Its session is gone: the retry (and every later chunk of this worker)
                    // reads on a new one. When none can be had, the planner's next connect
                    // fails too and the run restarts.
                    match catalog::connect_as(&spec_url, "copy").await {
                        Ok(n) => *c = n,
                        Err(e) => tracing::warn!("backfill: cannot reconnect a worker: {e}"),
                    }
                }
                // The worker's session is free for other chunks meanwhile.
                drop(c);
                tokio::time::sleep(delay).await;
                let _ = job_tx.send(job);
            } else if let Ok(mut f) = failures.lock() {
                f.remove(&job.id());
            }
        });
    }
}

/// How long to wait before the `tries`th retry of a failed read: 1 s, doubling to 30 s.
fn retry_delay(tries: u32) -> Duration {
    Duration::from_secs((1u64 << tries.saturating_sub(1).min(5)).min(30))
}

/// Whether the `tries`th failure in a row is logged: a lasting one (a privilege revoked, say)
/// is retried until the operator fixes it, and its log lines thin out.
fn log_try(tries: u32) -> bool {
    tries <= 3 || tries % 10 == 0
}

/// A failpoint's way to lose a session: the server ends it, as an administrator's
/// `pg_terminate_backend` would.
async fn end_own_session(client: &Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute("SELECT pg_terminate_backend(pg_backend_pid())")
        .await
}

#[allow(clippy::too_many_arguments)]
async fn read_job(
    client: &mut Client,
    source: &CopySource,
    fast: Option<&TransformedSource>,
    name: &str,
    epoch: u64,
    (job, read): (Job, u64),
    permit: ReadPermit,
    chunk_tx: &mpsc::Sender<ReadyChunk>,
) -> Result<(), crate::copy::CopyError> {
    let id = job.id();
    emit_watermark(client, MESSAGE_PREFIX, &marker("lw", name, epoch, id, read)).await?;
    let ready = match (&job, fast) {
        (Job::Range { lo, hi, .. }, Some(fast)) => {
            let t = fast.read_chunk(client, lo.as_ref(), hi.as_ref()).await?;
            ReadyChunk {
                job,
                read,
                rows: Vec::new(),
                snapshot: t.snapshot.clone(),
                target_rows: Some(t),
                _permit: permit,
            }
        }
        _ => {
            let chunk = match &job {
                Job::Range { lo, hi, .. } => {
                    source
                        .read_chunk(client, lo.as_ref(), hi.as_ref(), None)
                        .await?
                }
                Job::Keys { keys, .. } => source.read_keys(client, keys).await?,
            };
            ReadyChunk {
                job,
                read,
                rows: chunk.rows,
                snapshot: chunk.snapshot,
                target_rows: None,
                _permit: permit,
            }
        }
    };
    if chunk_tx.send(ready).await.is_err() {
        return Ok(());
    }
    if crate::failpoint::fire(crate::failpoint::COPY_BEFORE_HIGH_WATERMARK) {
        let _ = end_own_session(client).await;
    }
    emit_watermark(client, MESSAGE_PREFIX, &marker("hw", name, epoch, id, read)).await?;
    if crate::failpoint::fire(crate::failpoint::COPY_AFTER_HIGH_WATERMARK) {
        if let Err(source) = end_own_session(client).await {
            return Err(crate::copy::CopyError::Query {
                context: "emitting a watermark",
                source,
            });
        }
    }
    Ok(())
}

/// What holds the backfill back.
struct Throttle {
    /// The kind of limit, stable while its figures change: a new cause is logged again.
    cause: &'static str,
    /// What to tell the operator, figures and limit included.
    why: String,
}

/// Why the backfill should wait now, if it should: paused by the operator, the slot holding
/// too much WAL, apply lagging, or physical standbys lagging. `pg_stat_replication` lists
/// logical walsenders too — this run's own, other migrations', a stalled CDC consumer's —
/// whose "replay" is only what their client confirmed: they are left out, or a stopped
/// consumer elsewhere would hold the backfill forever and this run's own lag would throttle it.
async fn throttle_reason(src: &Client, spec: &Spec, shared: &Shared) -> Option<Throttle> {
    let hold = |cause, why| Some(Throttle { cause, why });
    if shared.paused.load(Ordering::Relaxed) {
        return hold(
            "paused",
            "paused by the operator (shadowmig resume SPEC to go on)".into(),
        );
    }
    let apply_lag = shared.apply_lag_ms();
    let max_apply = shared.max_apply_lag_ms.load(Ordering::Relaxed);
    if apply_lag > max_apply {
        return hold(
            "apply lag",
            format!("apply lags {apply_lag} ms (limit {max_apply} ms)"),
        );
    }
    let row = src
        .query_opt(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::int8, \
                    (SELECT max(pg_current_wal_lsn() - r.replay_lsn)::int8 FROM pg_stat_replication r \
                      WHERE r.replay_lsn IS NOT NULL AND NOT EXISTS (SELECT FROM pg_replication_slots l \
                        WHERE l.slot_type = 'logical' AND l.active_pid = r.pid)) \
             FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&spec.slot_name()],
        )
        .await
        .ok()
        .flatten()?;
    let held: Option<i64> = row.try_get(0).ok().flatten();
    let max_lag = shared.max_lag_bytes.load(Ordering::Relaxed);
    if let Some(h) = held {
        if h as u64 > max_lag {
            return hold(
                "slot WAL",
                format!("the slot holds {h} bytes of WAL (limit {max_lag})"),
            );
        }
    }
    let replica: Option<i64> = row.try_get(1).ok().flatten();
    if let (Some(r), Some(limit)) = (replica, spec.throttle.max_replica_lag_bytes) {
        if r as u64 > limit {
            return hold(
                "standby lag",
                format!("a standby's replay lags {r} bytes (limit {limit})"),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ddl_is_named_by_its_first_words() {
        assert_eq!(
            ddl_head("CREATE PUBLICATION \"p\" FOR TABLE \"public\".\"orders\""),
            "`CREATE PUBLICATION \"p\" FOR TABLE \"public\".\"orders\"…`"
        );
        assert_eq!(
            ddl_head("ALTER TABLE a ADD b int;\n ALTER TABLE a ADD c int; CREATE TABLE x (y int)"),
            "`ALTER TABLE a ADD b int…`"
        );
        assert_eq!(ddl_head(""), "`…`");
        let long = format!("CREATE TABLE \"ü\" ({})", "c int, ".repeat(40));
        assert_eq!(ddl_head(&long).chars().count(), 83);
    }

    #[test]
    fn progress_figures_are_this_runs_rates_and_an_eta_from_the_estimate() {
        // Resumed at 1000 of an estimated 11 000 rows.
        let mut r = ProgressReport::new(11_000, Some(64 << 20), 1000);
        r.held_bytes = 16 << 20;
        let t0 = r.at;
        let copy = |rows, done| CopyState {
            frontier: None,
            rows_copied: rows,
            done,
        };
        let f = r.take(t0 + Duration::from_secs(5), &copy(6000, false), 500);
        assert_eq!(
            f.rows_per_sec, 1000,
            "earlier runs' rows are not this run's rate"
        );
        assert_eq!(f.changes_per_sec, 100);
        assert_eq!(f.eta_secs, Some(5));
        assert_eq!(f.held, "16.0 MB of max_slot_wal_keep_size 64.0 MB (25%)");
        // Paused: no rate, no ETA.
        let f = r.take(t0 + Duration::from_secs(10), &copy(6000, false), 500);
        assert_eq!((f.rows_per_sec, f.eta_secs), (0, None));
        // Past the estimate, or done: no ETA rather than a wrong one.
        let f = r.take(t0 + Duration::from_secs(11), &copy(12_000, true), 900);
        assert_eq!(
            (f.rows_per_sec, f.changes_per_sec, f.eta_secs),
            (6000, 400, None)
        );
        r.keep_bytes = Some(-1);
        assert_eq!(r.held_text(), "16.0 MB (max_slot_wal_keep_size unlimited)");
    }

    #[test]
    fn a_failing_read_is_retried_slower_and_slower() {
        let secs: Vec<u64> = (1..=8).map(|t| retry_delay(t).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_delay(0).as_secs(), 1);
    }

    #[test]
    fn markers_of_other_migrations_and_epochs_are_ignored() {
        assert_eq!(parse_marker("lw:m:7:3:1", "m", 7), Some(("lw", 3, 1)));
        assert_eq!(parse_marker("hw:m:7:12:40", "m", 7), Some(("hw", 12, 40)));
        assert_eq!(parse_marker("hw:m:8:12:1", "m", 7), None);
        assert_eq!(parse_marker("hw:other:7:12:1", "m", 7), None);
        assert_eq!(parse_marker("garbage", "m", 7), None);
        assert_eq!(parse_marker("hw:m:7:x:1", "m", 7), None);
        assert_eq!(
            parse_marker("hw:m:7:12", "m", 7),
            None,
            "a read is required"
        );
        assert_eq!(
            parse_marker(&marker("shape", "m_1", 7, 0, 0), "m_1", 7),
            Some(("shape", 0, 0))
        );
    }

    #[test]
    fn hex_keys_round_trip() {
        let k: KeyValue = vec![Bytes::from_static(b"\x00\x01"), Bytes::from_static(b"")];
        assert_eq!(unhex_key(&hex_key(&k)), Some(k));
        assert_eq!(unhex_key(&[Some("zz".into())]), None);
        assert_eq!(unhex_key(&[None]), None);
    }
}

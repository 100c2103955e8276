//! The `shadowmig` schema in the target database: migrations, apply progress, copy progress.
//!
//! Owns the DDL of the state tables (created idempotently, under a lock timeout) and the
//! queries that read and write them. Writers take a [`GenericClient`] so that callers put
//! progress in the same transaction as the data it describes. This module must never decide
//! what to apply or copy, and never hold a transaction open itself beyond its own DDL.

use tokio_postgres::GenericClient;

use crate::lsn::Lsn;

/// The state tables. Changes here must be additive (`ADD COLUMN IF NOT EXISTS`): a newer
/// binary resumes migrations started by an older one.
const SCHEMA_SQL: &str = r#"
CREATE SCHEMA IF NOT EXISTS shadowmig;
CREATE TABLE IF NOT EXISTS shadowmig.migrations (
    name             text PRIMARY KEY,
    stage            text NOT NULL DEFAULT 'source',
    spec             text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    paused           boolean NOT NULL DEFAULT false,
    chunk_rows       bigint,
    workers          integer,
    max_lag_bytes    bigint,
    max_apply_lag_ms bigint
);
CREATE TABLE IF NOT EXISTS shadowmig.progress (
    migration  text NOT NULL,
    direction  text NOT NULL CHECK (direction IN ('forward', 'reverse')),
    lsn        pg_lsn NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (migration, direction)
);
CREATE TABLE IF NOT EXISTS shadowmig.copy_progress (
    migration   text NOT NULL,
    chunk       bigint NOT NULL,
    last_key    text[],
    rows_copied bigint NOT NULL DEFAULT 0,
    done        boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (migration, chunk)
);
"#;

/// A state-table operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The database refused a statement.
    #[error("shadowmig state: {during}: {source}")]
    Db {
        /// What was being done.
        during: &'static str,
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A stored value could not be understood.
    #[error("shadowmig state: {0}")]
    Corrupt(String),
}

fn db(during: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StateError {
    move |source| StateError::Db { during, source }
}

/// The direction a change stream flows in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Old table → new table.
    Forward,
    /// New table → old table (after the write switch, for rollback).
    Reverse,
}

impl Direction {
    /// The value stored in `shadowmig.progress.direction`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Reverse => "reverse",
        }
    }
}

/// Creates the `shadowmig` schema and tables if absent. Safe to call on every start; waits at
/// most `lock_timeout_ms` for locks (so a busy catalog yields an error, not a hang).
pub async fn ensure_schema(
    client: &mut tokio_postgres::Client,
    lock_timeout_ms: u32,
) -> Result<(), StateError> {
    let tx = client.transaction().await.map_err(db("begin"))?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = {lock_timeout_ms}"))
        .await
        .map_err(db("set lock_timeout"))?;
    tx.batch_execute(SCHEMA_SQL)
        .await
        .map_err(db("create state tables"))?;
    tx.commit().await.map_err(db("commit state tables"))
}

/// Whether the state tables exist in this database (no `run` has set them up otherwise).
pub async fn exists<C: GenericClient>(client: &C) -> Result<bool, StateError> {
    client
        .query_one(
            "SELECT to_regclass('shadowmig.migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(db("look for the state tables"))?
        .try_get(0)
        .map_err(db("look for the state tables"))
}

/// The last applied commit LSN of `migration`'s `direction` stream, if any batch committed.
pub async fn read_progress<C: GenericClient>(
    client: &C,
    migration: &str,
    direction: Direction,
) -> Result<Option<Lsn>, StateError> {
    let row = client
        .query_opt(
            "SELECT lsn::text FROM shadowmig.progress WHERE migration = $1 AND direction = $2",
            &[&migration, &direction.as_str()],
        )
        .await
        .map_err(db("read progress"))?;
    match row {
        None => Ok(None),
        Some(r) => {
            let s: String = r.try_get(0).map_err(db("read progress"))?;
            s.parse()
                .map(Some)
                .map_err(|e| StateError::Corrupt(format!("progress lsn: {e}")))
        }
    }
}

/// Records `lsn` as the last applied commit LSN. Call it inside the transaction that applied
/// the data, so both commit or neither. Never moves progress backwards.
pub async fn write_progress<C: GenericClient>(
    client: &C,
    migration: &str,
    direction: Direction,
    lsn: Lsn,
) -> Result<(), StateError> {
    client
        .execute(
            "INSERT INTO shadowmig.progress (migration, direction, lsn, updated_at) \
             VALUES ($1, $2, $3::text::pg_lsn, now()) \
             ON CONFLICT (migration, direction) DO UPDATE \
             SET lsn = GREATEST(shadowmig.progress.lsn, EXCLUDED.lsn), updated_at = now()",
            &[&migration, &direction.as_str(), &lsn.to_string()],
        )
        .await
        .map_err(db("write progress"))?;
    Ok(())
}

/// Checkpoint of one backfill chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkProgress {
    /// Chunk number.
    pub chunk: i64,
    /// Text form of the last key copied (one element per key column), if any.
    pub last_key: Option<Vec<Option<String>>>,
    /// Rows copied in this chunk so far.
    pub rows_copied: i64,
    /// True once the chunk is applied.
    pub done: bool,
}

/// Upserts a chunk checkpoint; call it in the transaction that applied the chunk's rows.
pub async fn write_copy_progress<C: GenericClient>(
    client: &C,
    migration: &str,
    p: &ChunkProgress,
) -> Result<(), StateError> {
    client
        .execute(
            "INSERT INTO shadowmig.copy_progress (migration, chunk, last_key, rows_copied, done, updated_at) \
             VALUES ($1, $2, $3, $4, $5, now()) \
             ON CONFLICT (migration, chunk) DO UPDATE SET last_key = EXCLUDED.last_key, \
             rows_copied = EXCLUDED.rows_copied, done = EXCLUDED.done, updated_at = now()",
            &[&migration, &p.chunk, &p.last_key, &p.rows_copied, &p.done],
        )
        .await
        .map_err(db("write copy progress"))?;
    Ok(())
}

/// All chunk checkpoints of `migration`, by chunk number.
pub async fn read_copy_progress<C: GenericClient>(
    client: &C,
    migration: &str,
) -> Result<Vec<ChunkProgress>, StateError> {
    let rows = client
        .query(
            "SELECT chunk, last_key, rows_copied, done FROM shadowmig.copy_progress \
             WHERE migration = $1 ORDER BY chunk",
            &[&migration],
        )
        .await
        .map_err(db("read copy progress"))?;
    rows.iter()
        .map(|r| {
            Ok(ChunkProgress {
                chunk: r.try_get(0).map_err(db("read copy progress"))?,
                last_key: r.try_get(1).map_err(db("read copy progress"))?,
                rows_copied: r.try_get(2).map_err(db("read copy progress"))?,
                done: r.try_get(3).map_err(db("read copy progress"))?,
            })
        })
        .collect()
}

/// A target constraint whose build `run` deferred to the end of the backfill
/// (`[copy] defer_indexes`), as recorded in `shadowmig.deferred_ddl` when it was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeferredConstraint {
    /// Build order.
    pub seq: i32,
    /// The `ALTER TABLE … ADD CONSTRAINT …` that builds it again.
    pub statement: String,
    /// For the primary key: its columns, the key apply matches rows by once it is built.
    pub key_columns: Option<Vec<String>>,
}

/// The constraints of `migration` still waiting to be built, in build order; none when the
/// state table does not exist (a schema older than `defer_indexes`, or no `run` yet).
pub async fn deferred_constraints<C: GenericClient>(
    client: &C,
    migration: &str,
) -> Result<Vec<DeferredConstraint>, StateError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('shadowmig.deferred_ddl') IS NOT NULL",
            &[],
        )
        .await
        .map_err(db("look for deferred constraints"))?
        .try_get(0)
        .map_err(db("look for deferred constraints"))?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT seq, statement, key_columns FROM shadowmig.deferred_ddl \
             WHERE migration = $1 ORDER BY seq",
            &[&migration],
        )
        .await
        .map_err(db("read deferred constraints"))?;
    rows.iter()
        .map(|r| {
            Ok(DeferredConstraint {
                seq: r.try_get(0).map_err(db("read deferred constraints"))?,
                statement: r.try_get(1).map_err(db("read deferred constraints"))?,
                key_columns: r.try_get(2).map_err(db("read deferred constraints"))?,
            })
        })
        .collect()
}

/// The primary key columns of `migration`'s target while its build is deferred.
pub async fn deferred_key<C: GenericClient>(
    client: &C,
    migration: &str,
) -> Result<Option<Vec<String>>, StateError> {
    Ok(deferred_constraints(client, migration)
        .await?
        .into_iter()
        .find_map(|c| c.key_columns))
}

/// A row of `shadowmig.migrations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationRow {
    /// Migration name.
    pub name: String,
    /// Current stage.
    pub stage: String,
    /// The spec text it was started with.
    pub spec: String,
    /// The last error `run` recorded, if any.
    pub last_error: Option<String>,
    /// Backfill paused by the operator.
    pub paused: bool,
    /// Operator override of rows per chunk.
    pub chunk_rows: Option<i64>,
    /// Operator override of copy workers.
    pub workers: Option<i32>,
    /// Operator override of the lag limit in bytes.
    pub max_lag_bytes: Option<i64>,
    /// Operator override of the apply lag limit in milliseconds.
    pub max_apply_lag_ms: Option<i64>,
}

/// Registers a migration (stage `source`) unless it exists. Returns true when it was created.
pub async fn register_migration<C: GenericClient>(
    client: &C,
    name: &str,
    spec: &str,
) -> Result<bool, StateError> {
    let n = client
        .execute(
            "INSERT INTO shadowmig.migrations (name, spec) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&name, &spec],
        )
        .await
        .map_err(db("register migration"))?;
    Ok(n == 1)
}

/// Reads a migration's row.
pub async fn read_migration<C: GenericClient>(
    client: &C,
    name: &str,
) -> Result<Option<MigrationRow>, StateError> {
    let row = client
        .query_opt(
            "SELECT name, stage, spec, last_error, paused, chunk_rows, workers, max_lag_bytes, \
             max_apply_lag_ms FROM shadowmig.migrations WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(db("read migration"))?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(MigrationRow {
        name: r.try_get(0).map_err(db("read migration"))?,
        stage: r.try_get(1).map_err(db("read migration"))?,
        spec: r.try_get(2).map_err(db("read migration"))?,
        last_error: r.try_get(3).map_err(db("read migration"))?,
        paused: r.try_get(4).map_err(db("read migration"))?,
        chunk_rows: r.try_get(5).map_err(db("read migration"))?,
        workers: r.try_get(6).map_err(db("read migration"))?,
        max_lag_bytes: r.try_get(7).map_err(db("read migration"))?,
        max_apply_lag_ms: r.try_get(8).map_err(db("read migration"))?,
    }))
}

/// Sets a migration's stage; returns the stage it had (`None`: no such migration) and logs the
/// change, once, when there was one ([`crate::stages::log_change`]). The old stage is read
/// under the row lock the update takes, so concurrent callers each log the change they made.
pub async fn set_stage<C: GenericClient>(
    client: &C,
    name: &str,
    stage: &str,
) -> Result<Option<String>, StateError> {
    let row = client
        .query_opt(
            "UPDATE shadowmig.migrations m SET stage = $2, updated_at = now() \
             FROM (SELECT name, stage FROM shadowmig.migrations WHERE name = $1 FOR UPDATE) old \
             WHERE m.name = old.name RETURNING old.stage",
            &[&name, &stage],
        )
        .await
        .map_err(db("set stage"))?;
    let Some(row) = row else { return Ok(None) };
    let old: String = row.try_get(0).map_err(db("set stage"))?;
    if old != stage {
        crate::stages::log_change(crate::stages::Scope::Migration, name, &old, stage);
    }
    Ok(Some(old))
}

/// Records (or clears, with `None`) a migration's last error.
pub async fn set_last_error<C: GenericClient>(
    client: &C,
    name: &str,
    error: Option<&str>,
) -> Result<(), StateError> {
    client
        .execute(
            "UPDATE shadowmig.migrations SET last_error = $2, updated_at = now() WHERE name = $1",
            &[&name, &error],
        )
        .await
        .map_err(db("set last error"))?;
    Ok(())
}

/// Removes every state row of `migration` (for `abort`). Leaves the schema in place: other
/// migrations may use it. A no-op when the schema does not exist.
pub async fn drop_state(
    client: &mut tokio_postgres::Client,
    migration: &str,
) -> Result<(), StateError> {
    let exists: bool = client
        .query_one("SELECT to_regnamespace('shadowmig') IS NOT NULL", &[])
        .await
        .map_err(db("drop state"))?
        .try_get(0)
        .map_err(db("drop state"))?;
    if !exists {
        return Ok(());
    }
    let tx = client.transaction().await.map_err(db("drop state"))?;
    for sql in [
        "DELETE FROM shadowmig.copy_progress WHERE migration = $1",
        "DELETE FROM shadowmig.progress WHERE migration = $1",
        "DELETE FROM shadowmig.migrations WHERE name = $1",
    ] {
        tx.execute(sql, &[&migration])
            .await
            .map_err(db("drop state"))?;
    }
    tx.commit().await.map_err(db("drop state"))
}

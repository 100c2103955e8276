//! `run`'s backfill with deferred constraints (`[copy] defer_indexes`, D26): when shadowmig
//! creates the target table it drops the table's primary key, unique constraints and indexes,
//! recording how to build them again; the history is then copied by plain binary `COPY` into
//! the bare table, with nothing streamed; they are built in one transaction; and only then
//! does the stream start, from the slot's creation, applying every change since over the
//! copied rows (a change is a full image or a delete, so each key ends at its last change —
//! the argument D19 makes for a restart).
//!
//! Owns the recorded definitions (`shadowmig.deferred_ddl`) and the order of the three steps.
//! It must never drop a constraint it does not record in the same transaction, never let
//! anything be applied from the stream while a recorded constraint is missing, and never
//! write the source.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use super::{
    catalog, pg_err, quote_ident, quote_literal, start_bulk, state_err, CopyState, Prepared,
    Progress, RunError,
};
use crate::copy::{CopyError, KeyValue, TargetRows};
use crate::spec::{QualifiedName, Spec};
use crate::state;

/// SQL, run in the transaction that creates the target, that drops its primary key, unique
/// constraints and plain indexes and records them in `shadowmig.deferred_ddl` (the primary
/// key first, with its columns). A table without a primary key keeps everything: apply then
/// matches rows by a unique index, which must exist from the start. Exclusion constraints, and
/// indexes a constraint depends on (a foreign key elsewhere), stay too.
pub(super) fn defer_sql(migration: &str, table: &QualifiedName) -> String {
    let t = quote_literal(&table.quoted());
    let m = quote_literal(migration);
    let body = format!(
        "DECLARE r record; n int := 0;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = {t}::regclass AND contype = 'p') THEN
    RETURN;
  END IF;
  FOR r IN
    SELECT c.conname, c.contype, pg_get_constraintdef(c.oid) AS def,
           (SELECT array_agg(a.attname::text ORDER BY k.ord)
              FROM unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord)
              JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum) AS cols
      FROM pg_constraint c
     WHERE c.conrelid = {t}::regclass AND c.contype IN ('p', 'u')
     ORDER BY c.contype, c.conname
  LOOP
    n := n + 1;
    INSERT INTO shadowmig.deferred_ddl (migration, seq, statement, key_columns)
    VALUES ({m}, n, format('ALTER TABLE %s ADD CONSTRAINT %I %s', {t}, r.conname, r.def),
            CASE WHEN r.contype = 'p' THEN r.cols END);
    EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', {t}, r.conname);
  END LOOP;
  -- Plain indexes (no constraint behind them). On a partitioned table the definition reads
  -- `ON ONLY`, which would build the parent's index alone: the rebuild must cover every
  -- partition, as the original did.
  FOR r IN
    SELECT i.indexrelid::regclass::text AS name,
           regexp_replace(pg_get_indexdef(i.indexrelid),
                          '^(CREATE (UNIQUE )?INDEX (\"([^\"]|\"\")+\"|[^ ]+) ON) ONLY ', '\\1 ') AS def
      FROM pg_index i
     WHERE i.indrelid = {t}::regclass
       AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
     ORDER BY 1
  LOOP
    n := n + 1;
    INSERT INTO shadowmig.deferred_ddl (migration, seq, statement, key_columns)
    VALUES ({m}, n, r.def, NULL);
    EXECUTE 'DROP INDEX ' || r.name;
  END LOOP;
END"
    );
    // A plain literal, not dollar quotes: a table or migration name may contain any text.
    format!("DO {}", quote_literal(&body))
}

/// A chunk being read: its upper bound, and the task that returns its rows and the reader's
/// connection. Dropped unfinished (a failure, shutdown), it stops the read.
struct Reading {
    hi: Option<KeyValue>,
    task: JoinHandle<(Client, Result<TargetRows, CopyError>)>,
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies every chunk after the frontier into the target, in key order, `[copy] workers`
/// chunks read at once and written by the bulk writers (each chunk committed with its
/// checkpoint, in order). Returns false when stopped by `shutdown` (everything handed to the
/// writers is committed first).
pub(super) async fn copy_all(
    spec: &Spec,
    prepared: &Prepared,
    tgt: &Client,
    copy_state: &mut CopyState,
    shutdown: &watch::Receiver<bool>,
) -> Result<bool, RunError> {
    let Some(fast) = prepared.transformed.clone().map(std::sync::Arc::new) else {
        return Err(RunError::Fatal(
            "[copy] defer_indexes needs the bulk copy path, which is off: a target column has a \
             user-defined type (or SHADOWMIG_BULK_COPY=0). Remove defer_indexes from the spec, run \
             `shadowmig abort`, and start again"
                .into(),
        ));
    };
    let mut pool = start_bulk(spec, prepared, tgt, shutdown).await?;
    let connect = || async {
        catalog::connect_as(&spec.source.url, "copy")
            .await
            .map_err(|e| RunError::Connection(e.to_string()))
    };
    let planner = connect().await?;
    let workers = spec.copy.workers.clamp(1, 8) as usize;
    let mut idle: Vec<Client> = Vec::with_capacity(workers);
    for _ in 0..workers {
        idle.push(connect().await?);
    }
    let mut chunk_rows = spec.copy.chunk_rows.max(1) as i64;
    let estimate = planner
        .query_one(
            "SELECT greatest(reltuples, 0)::int8 FROM pg_class WHERE oid = $1::int8::oid",
            &[&i64::from(prepared.source_oid)],
        )
        .await
        .ok()
        .and_then(|r| r.try_get::<_, i64>(0).ok())
        .unwrap_or(0);
    tracing::info!(
        from_rows = copy_state.rows_copied,
        estimate,
        workers,
        "backfill with deferred constraints: copying before streaming"
    );
    // A bar on a terminal (indicatif draws nothing otherwise); log lines every 5 s either way.
    let mut bar = Progress::new(estimate.max(0) as u64);
    let started = Instant::now();
    let start_rows = copy_state.rows_copied;
    let mut last_log = Instant::now();
    let mut lo = copy_state.frontier.clone();
    let mut planned_all = false;
    let mut reading: VecDeque<Reading> = VecDeque::new();
    let mut last_control = Instant::now();
    let mut paused = false;
    let stopped = loop {
        if *shutdown.borrow() {
            break true;
        }
        // `shadowmig pause SPEC` holds the copy at a chunk boundary, as it does the other path.
        if last_control.elapsed() >= Duration::from_secs(1) || paused {
            last_control = Instant::now();
            let m = match state::read_migration(tgt, &spec.name).await {
                Ok(Some(m)) => Some(m),
                // `shadowmig abort` removed the migration: nothing is left to copy into.
                Ok(None) => {
                    return Err(RunError::Fatal(format!(
                    "migration {} was aborted while its backfill ran (its state is gone); stopping",
                    spec.name
                )))
                }
                Err(_) => None,
            };
            let now = m.as_ref().is_some_and(|m| m.paused);
            // `shadowmig throttle --chunk-rows` applies from the next chunk planned.
            if let Some(n) = m
                .and_then(|m| m.chunk_rows)
                .filter(|&n| n > 0 && n != chunk_rows)
            {
                tracing::info!("chunk_rows set to {n} by the operator");
                chunk_rows = n;
            }
            if now != paused {
                paused = now;
                tracing::info!(
                    "backfill {} by the operator",
                    if paused { "paused" } else { "resumed" }
                );
            }
            if paused && reading.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        // Keep every reader busy, in key order.
        while !planned_all && !paused && !idle.is_empty() {
            let hi = fast
                .source
                .boundary_after(&planner, lo.as_ref(), chunk_rows)
                .await
                .map_err(|e| copy_error("finding a chunk boundary", e))?;
            planned_all = hi.is_none();
            let mut client = idle.pop().ok_or_else(|| {
                RunError::Fatal("internal: no idle reader for a planned chunk".into())
            })?;
            let (after, upto, fast) = (lo.clone(), hi.clone(), fast.clone());
            let task = tokio::spawn(async move {
                let rows = fast
                    .read_chunk(&mut client, after.as_ref(), upto.as_ref())
                    .await;
                (client, rows)
            });
            reading.push_back(Reading {
                hi: hi.clone(),
                task,
            });
            lo = hi;
        }
        let Some(mut next) = reading.pop_front() else {
            break false;
        };
        let (client, rows) = (&mut next.task)
            .await
            .map_err(|e| RunError::Fatal(format!("a chunk reader failed: {e}")))?;
        idle.push(client);
        let rows = rows.map_err(|e| copy_error("reading a chunk", e))?;
        let n = rows.len();
        copy_state.rows_copied += n as i64;
        match next.hi.take() {
            Some(hi) => copy_state.frontier = Some(hi),
            None => copy_state.done = true,
        }
        pool.submit(rows.data, n as u64, copy_state.checkpoint())
            .await
            .map_err(|e| super::apply_err("writing a backfill chunk", e))?;
        bar.copy_only(copy_state);
        // `[throttle] max_rows_per_sec` paces the copy.
        if let Some(limit) = spec.throttle.max_rows_per_sec.filter(|&l| l > 0) {
            let due = Duration::from_secs_f64(
                (copy_state.rows_copied - start_rows) as f64 / limit as f64,
            );
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                let mut sd = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = sd.changed() => {}
                }
            }
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            let done = copy_state.rows_copied - start_rows;
            let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
            let left = (estimate - copy_state.rows_copied).max(0) as f64;
            tracing::info!(
                rows_copied = copy_state.rows_copied,
                rows_per_sec = rate as u64,
                eta_secs = (left / rate.max(1.0)) as u64,
                "backfill with deferred constraints"
            );
        }
    };
    drop(reading);
    pool.wait_idle()
        .await
        .map_err(|e| super::apply_err("writing a backfill chunk", e))?;
    if !stopped {
        tracing::info!(
            rows = copy_state.rows_copied,
            secs = started.elapsed().as_secs_f64(),
            "backfill with deferred constraints: copy done"
        );
    }
    Ok(!stopped)
}

fn copy_error(what: &str, e: CopyError) -> RunError {
    match e {
        CopyError::Query { source, context } if catalog::connection_lost(&source) => {
            RunError::Connection(format!(
                "{what} ({context}): {}",
                catalog::db_message(&source)
            ))
        }
        CopyError::ShapeChanged(why) => RunError::Shape(why),
        other => RunError::Fatal(format!("{what}: {other}")),
    }
}

/// Builds the recorded constraints and forgets them, in one target transaction. Rows the
/// copy wrote twice (a chunk whose writer committed after its process was killed, before the
/// checkpoint moved past it) make the primary key's build fail: the duplicates are then
/// removed, one row of each key kept, and the build tried once more. Which row stays does not
/// matter: the stream is applied from the slot's creation next, so every key that changed
/// since ends at its last change, and a key that did not change has the same row twice.
pub(super) async fn build(
    spec: &Spec,
    tgt: &mut Client,
    constraints: &[state::DeferredConstraint],
) -> Result<(), RunError> {
    let started = Instant::now();
    tracing::info!(
        constraints = constraints.len(),
        "backfill with deferred constraints: building the target's constraints"
    );
    let key = constraints.iter().find_map(|c| c.key_columns.clone());
    for attempt in 0..2 {
        match try_build(spec, tgt, constraints).await {
            Ok(()) => {
                tracing::info!(
                    secs = started.elapsed().as_secs_f64(),
                    "backfill with deferred constraints: constraints built; streaming from the slot's start"
                );
                return Ok(());
            }
            Err(e) if attempt == 0 && e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                let Some(key) = &key else {
                    return Err(pg_err("building the target's deferred constraints", e));
                };
                let removed = tgt
                    .execute(&dedupe_sql(&spec.target.table, key), &[])
                    .await
                    .map_err(|e| pg_err("removing rows the copy wrote twice", e))?;
                tracing::warn!(
                    removed,
                    "the copy had written some rows twice (an earlier run was killed mid-chunk); removed the extra copies"
                );
            }
            Err(e) => return Err(pg_err("building the target's deferred constraints", e)),
        }
    }
    Err(RunError::Fatal(
        "the target's primary key could not be built after removing duplicate rows".into(),
    ))
}

async fn try_build(
    spec: &Spec,
    tgt: &mut Client,
    constraints: &[state::DeferredConstraint],
) -> Result<(), tokio_postgres::Error> {
    let tx = tgt.transaction().await?;
    // A sort of the whole table per constraint: more memory than the default 64 MB saves
    // spilling it to disk.
    tx.batch_execute("SET LOCAL maintenance_work_mem = '256MB'")
        .await?;
    for c in constraints {
        tx.batch_execute(&c.statement).await?;
    }
    tx.execute(
        "DELETE FROM shadowmig.deferred_ddl WHERE migration = $1",
        &[&spec.name],
    )
    .await?;
    tx.commit().await
}

/// Deletes all but one row of each `key` in `table`.
fn dedupe_sql(table: &QualifiedName, key: &[String]) -> String {
    let cols: Vec<String> = key.iter().map(|c| quote_ident(c)).collect();
    format!(
        "DELETE FROM {t} AS x USING (SELECT tableoid AS o, ctid AS c, \
         row_number() OVER (PARTITION BY {k} ORDER BY tableoid, ctid) AS n FROM {t}) AS d \
         WHERE x.tableoid = d.o AND x.ctid = d.c AND d.n > 1",
        t = table.quoted(),
        k = cols.join(", ")
    )
}

/// Reads what is still deferred (after the state tables exist).
pub(super) async fn pending(
    tgt: &Client,
    migration: &str,
) -> Result<Vec<state::DeferredConstraint>, RunError> {
    state::deferred_constraints(tgt, migration)
        .await
        .map_err(|e| state_err("reading deferred constraints", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defer_sql_quotes_every_name_as_a_literal() {
        let t = QualifiedName::new("s p", "Ta'b\"le $x$");
        let sql = defer_sql("m'1", &t);
        assert!(sql.starts_with("DO '"), "{sql}");
        assert!(!sql.contains("$$"), "{sql}");
        // The table's quoted name and the migration, each a literal inside the quoted body.
        assert!(
            sql.contains("''\"s p\".\"Ta''''b\"\"le $x$\"''::regclass"),
            "{sql}"
        );
        assert!(sql.contains("''m''''1''"), "{sql}");
    }

    #[test]
    fn dedupe_keeps_one_row_per_key() {
        let t = QualifiedName::new("public", "Orders v2");
        assert_eq!(
            dedupe_sql(&t, &["customer_id".into(), "id".into()]),
            "DELETE FROM \"public\".\"Orders v2\" AS x USING (SELECT tableoid AS o, ctid AS c, \
             row_number() OVER (PARTITION BY \"customer_id\", \"id\" ORDER BY tableoid, ctid) AS n FROM \"public\".\"Orders v2\") AS d \
             WHERE x.tableoid = d.o AND x.ctid = d.c AND d.n > 1"
        );
    }
}

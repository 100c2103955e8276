//! Bulk writes of backfilled chunks: binary COPY straight into the target, on several target
//! connections at once, committed in the order the chunks were handed in.
//!
//! A chunk arrives already in the target's shape ([`crate::copy::TargetRows`]), so it goes in
//! with one plain `COPY … FROM STDIN (FORMAT binary)` — the cheapest way PostgreSQL has to
//! insert rows. Stream changes may already have put some of the chunk's keys in the target
//! (changes ahead of the copy are applied too, and a restart re-copies a chunk that committed
//! after its predecessor); then the COPY fails with a unique violation inside a savepoint and
//! the chunk is written again as an upsert through a stage, which is always correct.
//!
//! Commits follow the hand-in order, each with the copy checkpoint it was given, so the
//! checkpoint in the target never passes a chunk that is not committed. Every chunk
//! transaction first takes the migration's bulk fence lock in shared mode: a new `run` takes it
//! exclusively once, which waits out any transaction a killed run left behind.
//!
//! It must never commit a chunk out of order, and never decide which rows are current (the
//! caller has already left out the keys the stream changed in the chunk's window).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Transaction};

use super::sql::quote_ident;
use super::{ApplyError, ApplyTarget};
use crate::state::{self, ChunkProgress};

/// The statements a bulk write runs, derived once from the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkTarget {
    copy: String,
    stage_create: String,
    stage_copy: String,
    upsert: String,
    lock_timeout_ms: u64,
}

const STAGE: &str = "shadowmig_bulk_stage";

impl BulkTarget {
    /// The statements for `t`'s table and written columns, in `t.target_columns` order.
    pub fn new(t: &ApplyTarget) -> Result<BulkTarget, ApplyError> {
        if t.target_columns.is_empty() {
            return Err(ApplyError::InvalidTarget(
                "no target columns to write".into(),
            ));
        }
        let table = format!("{}.{}", quote_ident(&t.table.0), quote_ident(&t.table.1));
        let cols: Vec<String> = t
            .target_columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect();
        let cols = cols.join(", ");
        let keys: Vec<String> = t.target_key.iter().map(|k| quote_ident(k)).collect();
        let sets: Vec<String> = t
            .target_columns
            .iter()
            .filter(|c| !t.target_key.contains(&c.name))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
            .collect();
        let action = if sets.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", sets.join(", "))
        };
        let stage = format!("pg_temp.{}", quote_ident(STAGE));
        Ok(BulkTarget {
            copy: format!("COPY {table} ({cols}) FROM STDIN (FORMAT binary)"),
            stage_create: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS AS SELECT {cols} FROM {table} WITH NO DATA",
                quote_ident(STAGE)
            ),
            stage_copy: format!("COPY {stage} ({cols}) FROM STDIN (FORMAT binary)"),
            upsert: format!(
                "INSERT INTO {table} ({cols}) SELECT {cols} FROM {stage} ON CONFLICT ({}) {action}",
                keys.join(", ")
            ),
            lock_timeout_ms: 60_000,
        })
    }

    /// How long a chunk may wait for a row lock before it fails (default 60 s); see
    /// [`BulkPool`]: any wait means two chunks hold the same target key.
    pub fn lock_timeout(mut self, d: std::time::Duration) -> BulkTarget {
        self.lock_timeout_ms = (d.as_millis() as u64).max(1);
        self
    }
}

/// Sends `tuples` (binary COPY tuples back to back) through a `COPY … FROM STDIN`.
async fn copy_in(
    tx: &Transaction<'_>,
    sql: &str,
    tuples: &Bytes,
) -> Result<u64, tokio_postgres::Error> {
    let sink = tx.copy_in::<_, Bytes>(sql).await?;
    futures_util::pin_mut!(sink);
    let mut header = BytesMut::with_capacity(19);
    header.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    header.put_i32(0);
    header.put_i32(0);
    sink.feed(header.freeze()).await?;
    sink.feed(tuples.clone()).await?;
    sink.feed(Bytes::from_static(&[0xff, 0xff])).await?;
    sink.as_mut().finish().await
}

/// Writes one chunk's tuples into the target inside `tx`: a plain COPY, or — when some of its
/// keys are already there — an upsert through a stage. Returns whether it had to upsert.
pub async fn write_chunk(
    tx: &mut Transaction<'_>,
    target: &BulkTarget,
    tuples: &Bytes,
) -> Result<bool, ApplyError> {
    if tuples.is_empty() {
        return Ok(false);
    }
    let sp = tx
        .savepoint("shadowmig_bulk")
        .await
        .map_err(ApplyError::db("savepoint"))?;
    match copy_in(&sp, &target.copy, tuples).await {
        Ok(_) => {
            sp.commit()
                .await
                .map_err(ApplyError::db("release savepoint"))?;
            return Ok(false);
        }
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            sp.rollback()
                .await
                .map_err(ApplyError::db("rollback to savepoint"))?;
        }
        Err(e) => return Err(ApplyError::db("bulk copy")(e)),
    }
    tx.batch_execute(&target.stage_create)
        .await
        .map_err(ApplyError::db("create bulk stage"))?;
    copy_in(tx, &target.stage_copy, tuples)
        .await
        .map_err(ApplyError::db("bulk stage copy"))?;
    tx.execute(&target.upsert, &[])
        .await
        .map_err(ApplyError::db("bulk upsert"))?;
    // The stage empties at commit; a second chunk in this transaction would see these rows.
    tx.batch_execute(&format!("TRUNCATE pg_temp.{}", quote_ident(STAGE)))
        .await
        .map_err(ApplyError::db("empty bulk stage"))?;
    Ok(true)
}

/// One chunk handed to the pool.
struct Job {
    seq: u64,
    tuples: Bytes,
    rows: u64,
    progress: ChunkProgress,
}

#[derive(Debug, Clone, Default)]
struct PoolState {
    /// Every chunk up to this sequence number is committed.
    committed: u64,
    /// Chunks written by the plain COPY and by the upsert fallback.
    copied: u64,
    upserted: u64,
    /// The first failure, and whether it was a lost connection.
    failed: Option<(String, bool)>,
}

/// Bulk writers on several target connections.
pub struct BulkPool {
    jobs: mpsc::Sender<Job>,
    state: watch::Receiver<PoolState>,
    submitted: u64,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for BulkPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkPool")
            .field("writers", &self.tasks.len())
            .field("submitted", &self.submitted)
            .finish()
    }
}

impl BulkPool {
    /// Starts one writer per client. Checkpoints go to `migration`'s copy progress; `fence`
    /// names the advisory lock each chunk transaction takes in shared mode.
    pub fn start(
        clients: Vec<Client>,
        target: BulkTarget,
        migration: String,
        fence: String,
    ) -> BulkPool {
        let (jobs, rx) = mpsc::channel::<Job>(1);
        let rx = Arc::new(Mutex::new(rx));
        let (state_tx, state) = watch::channel(PoolState::default());
        let state_tx = Arc::new(state_tx);
        let target = Arc::new(target);
        let tasks = clients
            .into_iter()
            .map(|client| {
                tokio::spawn(writer(
                    client,
                    rx.clone(),
                    state_tx.clone(),
                    target.clone(),
                    migration.clone(),
                    fence.clone(),
                ))
            })
            .collect();
        BulkPool {
            jobs,
            state,
            submitted: 0,
            tasks,
        }
    }

    /// Hands in a chunk and the checkpoint to commit with it; waits while every writer is
    /// busy (this bounds the rows held in memory).
    pub async fn submit(
        &mut self,
        tuples: Bytes,
        rows: u64,
        progress: ChunkProgress,
    ) -> Result<(), ApplyError> {
        self.check()?;
        self.submitted += 1;
        let job = Job {
            seq: self.submitted,
            tuples,
            rows,
            progress,
        };
        self.jobs.send(job).await.map_err(|_| stopped())
    }

    fn check(&self) -> Result<(), ApplyError> {
        match &self.state.borrow().failed {
            Some(f) => Err(failure(f.clone())),
            None => Ok(()),
        }
    }

    /// True when every chunk handed in is committed.
    pub fn idle(&self) -> bool {
        self.state.borrow().committed >= self.submitted
    }

    /// Chunks committed by plain COPY and by the upsert fallback, so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.state.borrow();
        (s.copied, s.upserted)
    }

    /// Waits until every chunk handed in is committed; the error of a failed write otherwise.
    pub async fn wait_idle(&mut self) -> Result<(), ApplyError> {
        let want = self.submitted;
        let res = self
            .state
            .wait_for(|s| s.committed >= want || s.failed.is_some())
            .await
            .map(|s| s.failed.clone());
        match res {
            Ok(None) => Ok(()),
            Ok(Some(f)) => Err(failure(f)),
            Err(_) => Err(stopped()),
        }
    }
}

impl Drop for BulkPool {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn failure((message, connection_lost): (String, bool)) -> ApplyError {
    ApplyError::Bulk {
        message,
        connection_lost,
    }
}

fn stopped() -> ApplyError {
    ApplyError::Bulk {
        message: "the bulk writers stopped".into(),
        connection_lost: true,
    }
}

async fn writer(
    mut client: Client,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    state: Arc<watch::Sender<PoolState>>,
    target: Arc<BulkTarget>,
    migration: String,
    fence: String,
) {
    loop {
        let job = { jobs.lock().await.recv().await };
        let Some(job) = job else { return };
        let seq = job.seq;
        match write_one(&mut client, &state, &target, &migration, &fence, job).await {
            Ok(upserted) => state.send_modify(|s| {
                s.committed = s.committed.max(seq);
                if upserted {
                    s.upserted += 1;
                } else {
                    s.copied += 1;
                }
            }),
            Err(e) => {
                // The server's own words: this message is what the operator will read.
                let text = match &e {
                    ApplyError::Db { during, source } => {
                        format!("{during}: {}", crate::catalog::db_message(source))
                    }
                    other => other.to_string(),
                };
                let f = (text, e.connection_lost());
                state.send_modify(|s| {
                    s.failed.get_or_insert(f);
                });
                return;
            }
        }
    }
}

async fn write_one(
    client: &mut Client,
    state: &watch::Sender<PoolState>,
    target: &BulkTarget,
    migration: &str,
    fence: &str,
    job: Job,
) -> Result<bool, ApplyError> {
    let mut tx = client
        .transaction()
        .await
        .map_err(ApplyError::db("begin bulk chunk"))?;
    // Awaited before anything is written: a transaction that can still commit holds it.
    tx.execute(
        "SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0))",
        &[&fence],
    )
    .await
    .map_err(ApplyError::db("bulk fence lock"))?;
    // No need to wait for the flush: a chunk lost in a crash loses its checkpoint with it (the
    // range is copied again), and every later stream batch commits synchronously, which
    // flushes the WAL — this commit record included — before the slot is confirmed.
    // Nothing else writes the shadow table while chunks are in flight (stream batches wait for
    // them), so a lock wait means two chunks hold the same target key — and since chunks
    // commit in order, the two would wait for each other for ever. Fail instead, and say why.
    tx.batch_execute(&format!(
        "SET LOCAL synchronous_commit = off; SET LOCAL lock_timeout = {}",
        target.lock_timeout_ms
    ))
    .await
    .map_err(ApplyError::db("bulk commit mode"))?;
    let upserted = match write_chunk(&mut tx, target, &job.tuples).await {
        Err(ApplyError::Db { source, .. })
            if source.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) =>
        {
            return Err(ApplyError::Bulk {
                message: format!(
                    "a backfill chunk waited over {} ms for a row lock in the target ({}): two source rows \
                     seem to map to the same target key (is the target key unique over the transformed rows?), \
                     or another session is writing the shadow table",
                    target.lock_timeout_ms,
                    crate::catalog::db_message(&source)
                ),
                connection_lost: false,
            })
        }
        other => other?,
    };
    // Commit in hand-in order: the checkpoint must never pass an uncommitted chunk.
    let mut rx = state.subscribe();
    // A failure of a later chunk does not stop this one: only an earlier failure (which
    // means our turn never comes) does.
    let turn = rx
        .wait_for(|s| s.committed + 1 >= job.seq || s.failed.is_some())
        .await
        .map(|s| (s.committed + 1 >= job.seq, s.failed.clone()));
    match turn {
        Ok((true, _)) => {}
        Ok((false, Some(f))) => return Err(failure(f)),
        Ok((false, None)) | Err(_) => return Err(stopped()),
    }
    state::write_copy_progress(&tx, migration, &job.progress).await?;
    tx.commit()
        .await
        .map_err(ApplyError::db("commit bulk chunk"))?;
    metrics::counter!(crate::metrics::ROWS_COPIED_TOTAL).increment(job.rows);
    Ok(upserted)
}

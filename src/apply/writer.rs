//! The apply writer: stages a coalesced batch with binary COPY and applies it as set
//! operations, with the progress row, in one target transaction.
//!
//! Owns the stage tables of its session (temporary, `ON COMMIT DELETE ROWS`) and the binary
//! COPY framing. It must never write a value for an unchanged-TOAST column it does not have
//! (those keys go back to the caller in [`ApplyStats::needs_reread`]), and never commit the
//! data of a batch without its progress row.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio_postgres::{Client, Transaction};

use super::coalesce::{coalesce, Coalesced, Coalescer, SourceChange};
use super::sql::{self, Plan, StageKind, StageShape};
use super::{ApplyError, ApplyTarget, ProgressKey};
use crate::lsn::Lsn;
use crate::pgoutput::{TupleData, TupleValue};
use crate::state;

/// What one batch did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApplyStats {
    /// Changes handed in.
    pub changes: usize,
    /// Target rows deleted (old identities that had a row).
    pub deleted: u64,
    /// Target rows inserted or updated.
    pub upserted: u64,
    /// Identity key tuples (source column order; non-identity columns `Null`, like a `K`
    /// tuple) whose final image had unchanged-TOAST columns apply could not resolve: the row is
    /// missing from the target, or a transform needs the missing value. Nothing was written
    /// for them; the caller must re-read these keys from the source and apply the rows.
    pub needs_reread: Vec<TupleData>,
    /// The progress LSN recorded with the batch (zero for a part, which records none).
    pub lsn: Lsn,
    /// Wall time from the start of coalescing to the end of the last statement (and the
    /// commit, for [`ApplyWriter::apply_batch`]).
    pub duration: Duration,
}

static WRITER_SEQ: AtomicU64 = AtomicU64::new(0);

/// Applies batches of changes to one target table over one target session.
///
/// The writer creates its stage tables lazily as temporary tables of the session it is given;
/// use one writer per connection (after a reconnect, create a new writer or call
/// [`ApplyWriter::reset_session`]).
#[derive(Debug)]
pub struct ApplyWriter {
    target: ApplyTarget,
    plan: Plan,
    progress: ProgressKey,
    id: u64,
    stages: HashMap<StageShape, Stage>,
    /// Stage names are never reused within a writer: a rolled-back CREATE must not leave a
    /// name that a later, differently shaped stage would find with `IF NOT EXISTS`.
    next_stage: u64,
    /// Batches left that write [`Coalesced::inserts`] by upsert after a plain insert found a
    /// row: a stream replayed over copied rows (deferred constraints) would otherwise fail
    /// over and over.
    insert_backoff: u32,
}

/// Batches that upsert their inserts after a plain insert found a row (see
/// [`ApplyWriter::write_net`]).
const INSERT_BACKOFF: u32 = 64;

#[derive(Debug)]
struct Stage {
    name: String,
    /// Known to exist in the session (its CREATE committed).
    created: bool,
    /// Loaded in the current transaction: its rows stay until commit (ON COMMIT DELETE
    /// ROWS), so a second batch in the same transaction must empty it first.
    used: bool,
}

/// One group of rows staged together.
struct Group<'a> {
    shape: StageShape,
    rows: Vec<(u32, &'a TupleData)>,
}

impl ApplyWriter {
    /// Validates `target` and prepares a writer that records progress under `progress`.
    pub fn new(target: ApplyTarget, progress: ProgressKey) -> Result<ApplyWriter, ApplyError> {
        let plan = Plan::new(&target)?;
        Ok(ApplyWriter {
            target,
            plan,
            progress,
            id: WRITER_SEQ.fetch_add(1, Ordering::Relaxed),
            stages: HashMap::new(),
            next_stage: 0,
            insert_backoff: 0,
        })
    }

    /// The target this writer applies to.
    pub fn target(&self) -> &ApplyTarget {
        &self.target
    }

    /// Forgets the stage tables, for use on a new session.
    pub fn reset_session(&mut self) {
        self.stages.clear();
    }

    /// The last committed progress LSN: the caller skips changes whose commit LSN is at or
    /// below it.
    pub async fn committed_lsn(&self, client: &Client) -> Result<Option<Lsn>, ApplyError> {
        Ok(state::read_progress(client, &self.progress.migration, self.progress.direction).await?)
    }

    /// Applies `changes` (stream order, whole source transactions) and records `lsn` — the
    /// commit LSN of the batch's last source transaction — as progress, in one target
    /// transaction that this call begins and commits. On error nothing is committed.
    pub async fn apply_batch(
        &mut self,
        client: &mut Client,
        changes: &[SourceChange],
        lsn: Lsn,
    ) -> Result<ApplyStats, ApplyError> {
        let start = Instant::now();
        let tx = client
            .transaction()
            .await
            .map_err(ApplyError::db("begin"))?;
        let result = self.write_batch(&tx, changes, lsn).await;
        let mut stats = match result {
            Ok(s) => s,
            Err(e) => {
                // The transaction rolls back on drop; stage tables it created are gone too.
                drop(tx);
                self.forget_uncommitted();
                return Err(e);
            }
        };
        if let Err(e) = tx.commit().await {
            self.forget_uncommitted();
            return Err(ApplyError::Db {
                during: "commit",
                source: e,
            });
        }
        self.batch_committed();
        stats.duration = start.elapsed();
        tracing::debug!(
            changes = stats.changes,
            upserted = stats.upserted,
            deleted = stats.deleted,
            needs_reread = stats.needs_reread.len(),
            lsn = %stats.lsn,
            ms = stats.duration.as_millis() as u64,
            "applied batch"
        );
        Ok(stats)
    }

    /// After a failed batch nothing about the session's stage tables is certain: re-issue
    /// their (idempotent) CREATE before next use.
    fn forget_uncommitted(&mut self) {
        for s in self.stages.values_mut() {
            s.created = false;
            s.used = false;
        }
    }

    /// An empty batch for this writer's source table, to be fed change by change and written
    /// with [`ApplyWriter::write_net`].
    pub fn new_batch(&self) -> Result<Coalescer, ApplyError> {
        Ok(Coalescer::new(&self.plan.identity)?)
    }

    /// Records `lsn` as this stream's progress in the caller's transaction (what
    /// [`ApplyWriter::write_net`] does for each batch), e.g. once a transaction written in
    /// parts has ended.
    pub async fn write_progress(&self, tx: &Transaction<'_>, lsn: Lsn) -> Result<(), ApplyError> {
        state::write_progress(tx, &self.progress.migration, self.progress.direction, lsn).await?;
        Ok(())
    }

    /// Tells the writer that the caller committed a transaction [`ApplyWriter::write_batch`]
    /// wrote into, so the stage tables it created exist (otherwise they are re-created
    /// idempotently, which only costs a catalog lookup per batch).
    pub fn batch_committed(&mut self) {
        for s in self.stages.values_mut() {
            s.created = true;
            s.used = false;
        }
    }

    /// Writes a batch and its progress row into the caller's transaction without committing
    /// it: the caller commits (or rolls back), e.g. after adding a backfill chunk's checkpoint
    /// ([`crate::state::write_copy_progress`]) to the same transaction. It may be called several
    /// times in one transaction (a source transaction too large for one batch is written in
    /// parts): a stage already loaded in this transaction is emptied before reuse. After a
    /// commit, call [`ApplyWriter::batch_committed`].
    pub async fn write_batch(
        &mut self,
        tx: &Transaction<'_>,
        changes: &[SourceChange],
        lsn: Lsn,
    ) -> Result<ApplyStats, ApplyError> {
        let start = Instant::now();
        // Coalescing refuses changes out of stream order; `write_net` refuses a progress LSN
        // below the last change.
        let net = coalesce(&self.plan.identity, changes)?;
        tracing::debug!(
            coalesce_ms = start.elapsed().as_millis() as u64,
            "coalesced a batch"
        );
        let mut stats = self.write_net(tx, net, changes.len(), lsn).await?;
        stats.duration = start.elapsed();
        Ok(stats)
    }

    /// [`ApplyWriter::write_batch`] for a batch already coalesced (by a
    /// [`crate::apply::coalesce::Coalescer`] fed as the changes arrived): `changes` is how many
    /// changes it stands for.
    pub async fn write_net(
        &mut self,
        tx: &Transaction<'_>,
        net: Coalesced,
        changes: usize,
        lsn: Lsn,
    ) -> Result<ApplyStats, ApplyError> {
        if let Some(last) = net.last_lsn.filter(|&l| l > lsn) {
            // Progress below an applied change would replay it after later batches on restart.
            return Err(ApplyError::InvalidBatch(format!(
                "progress LSN {lsn} is below the batch's last change at {last}"
            )));
        }
        let mut stats = self.write_part(tx, net, changes).await?;
        stats.lsn = lsn;
        let t = Instant::now();
        state::write_progress(tx, &self.progress.migration, self.progress.direction, lsn).await?;
        stats.duration += t.elapsed();
        Ok(stats)
    }

    /// Writes part of a source transaction into the caller's open transaction, without the
    /// progress row: the transaction's last part is followed by
    /// [`ApplyWriter::write_progress`] at its commit. A transaction streamed before its commit
    /// is written on a connection of its own while other batches commit on the apply
    /// connection; a progress row written early would hold their progress updates behind its
    /// row lock until the source commit.
    pub async fn write_part(
        &mut self,
        tx: &Transaction<'_>,
        net: Coalesced,
        changes: usize,
    ) -> Result<ApplyStats, ApplyError> {
        let start = Instant::now();
        let mut load_time = Duration::ZERO;
        let mut sql_time = Duration::ZERO;
        let mut stats = ApplyStats {
            changes,
            ..ApplyStats::default()
        };
        // Staged tables have no statistics; a hash or merge join would read the whole target.
        // Index lookups per staged row are what a batch of this size wants.
        tx.batch_execute("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
            .await
            .map_err(ApplyError::db("set planner options"))?;

        // Deletes first: see `Coalesced`.
        let del_rows: Vec<&TupleData> = net.deletes.iter().collect();
        for g in self.group(StageKind::Delete, &del_rows) {
            let t = Instant::now();
            let name = self.staged(tx, &g).await?;
            load_time += t.elapsed();
            let t = Instant::now();
            let q = sql::delete(&self.target, &self.plan, &g.shape, &name);
            stats.deleted += tx
                .execute(&q, &[])
                .await
                .map_err(ApplyError::db("delete"))?;
            sql_time += t.elapsed();
        }

        // Rows the target should not have (their first change in the batch was a source
        // INSERT): a plain INSERT under a savepoint. If a row is there after all (a unique
        // violation: a backfilled chunk, a stream replayed over copied rows), back to the
        // savepoint and upsert the same stage, and upsert inserts for a while.
        let insert_rows: Vec<&TupleData> = net.inserts.iter().collect();
        let plain_inserts = self.insert_backoff == 0;
        self.insert_backoff = self.insert_backoff.saturating_sub(1);
        for g in self.group(StageKind::Insert, &insert_rows) {
            let t = Instant::now();
            let name = self.staged(tx, &g).await?;
            load_time += t.elapsed();
            let t = Instant::now();
            stats.upserted += if plain_inserts {
                self.insert_or_upsert(tx, &g.shape, &name).await?
            } else {
                self.upsert(tx, &g.shape, &name).await?
            };
            sql_time += t.elapsed();
        }

        // Upserts without unchanged TOAST are plain INSERT … ON CONFLICT. Those with it update
        // existing rows only, unless a transform or the key needs the missing value.
        let mut plain = Vec::new();
        let mut partial = Vec::new();
        for t in &net.upserts {
            let unchanged: Vec<usize> = (0..t.0.len())
                .filter(|&i| t.0[i] == TupleValue::UnchangedToast)
                .collect();
            if unchanged.is_empty() {
                plain.push(t);
            } else if self.resolvable(&unchanged) {
                partial.push(t);
            } else {
                stats.needs_reread.push(self.key_tuple(t));
            }
        }
        for g in self.group(StageKind::Upsert, &plain) {
            let t = Instant::now();
            let name = self.staged(tx, &g).await?;
            load_time += t.elapsed();
            let t = Instant::now();
            stats.upserted += self.upsert(tx, &g.shape, &name).await?;
            sql_time += t.elapsed();
        }
        for mut g in self.group(StageKind::Upsert, &partial) {
            g.shape.with_unchanged = true;
            let name = self.staged(tx, &g).await?;
            let q = sql::update_keeping_unchanged(&self.target, &self.plan, &g.shape, &name);
            let rows = tx
                .query(&q, &[])
                .await
                .map_err(ApplyError::db("update keeping unchanged TOAST"))?;
            let mut matched = vec![false; g.rows.len()];
            for r in &rows {
                let n: i32 = r.try_get(0).map_err(ApplyError::db("read updated rows"))?;
                if let Some(m) = usize::try_from(n).ok().and_then(|n| matched.get_mut(n)) {
                    *m = true;
                }
            }
            stats.upserted += rows.len() as u64;
            for ((_, t), m) in g.rows.iter().zip(matched) {
                if !m {
                    stats.needs_reread.push(self.key_tuple(t));
                }
            }
        }

        stats.duration = start.elapsed();
        tracing::debug!(
            changes = stats.changes,
            net_rows = net.upserts.len() + net.inserts.len() + net.deletes.len(),
            inserts = net.inserts.len(),
            stage_copy_ms = load_time.as_millis() as u64,
            statements_ms = sql_time.as_millis() as u64,
            total_ms = stats.duration.as_millis() as u64,
            "wrote batch (not yet committed)"
        );
        Ok(stats)
    }

    /// The stage table for `g`'s shape (created, or emptied, as needed) with `g` loaded into it.
    async fn staged(&mut self, tx: &Transaction<'_>, g: &Group<'_>) -> Result<String, ApplyError> {
        let name = self.stage(tx, &g.shape).await?;
        self.load(tx, g, &name).await?;
        Ok(name)
    }

    /// Upserts a loaded stage into the target; returns the rows written.
    async fn upsert(
        &self,
        tx: &Transaction<'_>,
        shape: &StageShape,
        name: &str,
    ) -> Result<u64, ApplyError> {
        let q = sql::upsert(&self.target, &self.plan, shape, name);
        tx.execute(&q, &[]).await.map_err(ApplyError::db("upsert"))
    }

    /// Writes a staged group of rows the target should not have by plain INSERT; on a unique
    /// violation rolls that INSERT back and upserts the group instead (and does so for the
    /// next [`INSERT_BACKOFF`] batches). Returns the rows written.
    async fn insert_or_upsert(
        &mut self,
        tx: &Transaction<'_>,
        shape: &StageShape,
        name: &str,
    ) -> Result<u64, ApplyError> {
        const SP: &str = "shadowmig_insert";
        tx.batch_execute(&format!("SAVEPOINT {SP}"))
            .await
            .map_err(ApplyError::db("savepoint before insert"))?;
        let q = sql::insert(&self.target, &self.plan, shape, name);
        match tx.execute(&q, &[]).await {
            Ok(n) => {
                tx.batch_execute(&format!("RELEASE SAVEPOINT {SP}"))
                    .await
                    .map_err(ApplyError::db("release savepoint after insert"))?;
                Ok(n)
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                tracing::debug!(
                    "a plain insert of new rows found one in the target; upserting them, and the next {INSERT_BACKOFF} batches' too"
                );
                self.insert_backoff = INSERT_BACKOFF;
                tx.batch_execute(&format!(
                    "ROLLBACK TO SAVEPOINT {SP}; RELEASE SAVEPOINT {SP}"
                ))
                .await
                .map_err(ApplyError::db("roll back to savepoint after insert"))?;
                self.upsert(tx, shape, name).await
            }
            Err(e) => Err(ApplyError::db("insert")(e)),
        }
    }

    /// True when every target column that needs one of `unchanged` (source columns) is a
    /// plain non-key copy of it, which the update can keep from the target row.
    fn resolvable(&self, unchanged: &[usize]) -> bool {
        self.plan.deps.iter().enumerate().all(|(i, deps)| {
            let needs = deps.iter().any(|d| unchanged.contains(d));
            !needs || (self.plan.copy_of[i].is_some() && !self.plan.is_key[i])
        })
    }

    fn key_tuple(&self, t: &TupleData) -> TupleData {
        TupleData(
            t.0.iter()
                .zip(&self.plan.identity)
                .map(|(v, &id)| if id { v.clone() } else { TupleValue::Null })
                .collect(),
        )
    }

    /// Splits rows into groups that share a stage shape. A column is staged as text when its
    /// values in the batch arrived as text; rows that mix forms differently get their own group.
    fn group<'a>(&self, kind: StageKind, rows: &[&'a TupleData]) -> Vec<Group<'a>> {
        let n = self.plan.identity.len();
        let included = |i: usize| kind != StageKind::Delete || self.plan.identity[i];
        let mut batch_text = vec![false; n];
        for t in rows {
            for (i, v) in t.0.iter().enumerate() {
                if included(i) && matches!(v, TupleValue::Text(_)) {
                    batch_text[i] = true;
                }
            }
        }
        let mut groups: Vec<Group<'a>> = Vec::new();
        let mut index: HashMap<Vec<bool>, usize> = HashMap::new();
        for t in rows {
            let text: Vec<bool> = (0..n)
                .map(|i| {
                    included(i)
                        && match &t.0[i] {
                            TupleValue::Text(_) => true,
                            TupleValue::Binary(_) => false,
                            TupleValue::Null | TupleValue::UnchangedToast => batch_text[i],
                        }
                })
                .collect();
            let gi = *index.entry(text.clone()).or_insert_with(|| {
                groups.push(Group {
                    shape: StageShape {
                        kind,
                        text,
                        with_unchanged: false,
                    },
                    rows: Vec::new(),
                });
                groups.len() - 1
            });
            let g = &mut groups[gi];
            let ordinal = g.rows.len() as u32;
            g.rows.push((ordinal, t));
        }
        groups
    }

    /// The stage table for `shape`, created in this session if needed.
    async fn stage(
        &mut self,
        tx: &Transaction<'_>,
        shape: &StageShape,
    ) -> Result<String, ApplyError> {
        let id = self.id;
        let next = &mut self.next_stage;
        let stage = self.stages.entry(shape.clone()).or_insert_with(|| {
            *next += 1;
            Stage {
                name: format!("shadowmig_stage_{id}_{next}"),
                created: false,
                used: false,
            }
        });
        if !stage.created {
            let q = sql::create_stage(&self.target, &self.plan, shape, &stage.name);
            tx.batch_execute(&q)
                .await
                .map_err(ApplyError::db("create stage table"))?;
        }
        if stage.used {
            // An earlier batch of this same transaction left its rows here.
            tx.batch_execute(&format!("TRUNCATE {}", sql::quote_ident(&stage.name)))
                .await
                .map_err(ApplyError::db("empty stage table"))?;
        }
        stage.used = true;
        Ok(stage.name.clone())
    }

    /// Loads a group into its stage with binary COPY. Binary-form values are written as
    /// received: pgoutput's binary form is the type's send format, which is what binary COPY
    /// carries per field. Text-form values go to `text` stage columns, whose binary form is the
    /// text's bytes.
    async fn load(
        &self,
        tx: &Transaction<'_>,
        g: &Group<'_>,
        name: &str,
    ) -> Result<(), ApplyError> {
        let q = sql::copy_into_stage(&self.plan, &g.shape, name);
        let sink = tx
            .copy_in::<_, Bytes>(q.as_str())
            .await
            .map_err(ApplyError::db("copy into stage"))?;
        futures_util::pin_mut!(sink);
        let cols = g.shape.columns(&self.plan);
        let nfields = 1 + usize::from(g.shape.with_unchanged) + cols.len();
        let nfields = i16::try_from(nfields).map_err(|_| {
            ApplyError::InvalidTarget(format!("{nfields} columns exceed COPY's limit"))
        })?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0);
        buf.put_i32(0);
        for (ordinal, t) in &g.rows {
            buf.put_i16(nfields);
            buf.put_i32(4);
            buf.put_u32(*ordinal);
            if g.shape.with_unchanged {
                put_unchanged_flags(&mut buf, t);
            }
            for &i in &cols {
                match &t.0[i] {
                    TupleValue::Null | TupleValue::UnchangedToast => buf.put_i32(-1),
                    TupleValue::Text(b) | TupleValue::Binary(b) => {
                        let len = i32::try_from(b.len())
                            .map_err(|_| ApplyError::ValueTooLarge(b.len()))?;
                        buf.put_i32(len);
                        buf.put_slice(b);
                    }
                }
            }
            if buf.len() >= 256 * 1024 {
                sink.send(buf.split().freeze())
                    .await
                    .map_err(ApplyError::db("copy into stage"))?;
            }
        }
        buf.put_i16(-1);
        sink.send(buf.freeze())
            .await
            .map_err(ApplyError::db("copy into stage"))?;
        sink.finish()
            .await
            .map_err(ApplyError::db("copy into stage"))?;
        Ok(())
    }
}

/// A one-dimensional `bool[]` in array_send form: which source columns are unchanged TOAST.
fn put_unchanged_flags(buf: &mut BytesMut, t: &TupleData) {
    const BOOLOID: i32 = 16;
    let n = t.0.len();
    // ndim, has-nulls flag, element type, then (length, lower bound) per dimension, then
    // (length, value) per element.
    let len = 20 + 5 * n;
    buf.put_i32(len as i32);
    buf.put_i32(1);
    buf.put_i32(0);
    buf.put_i32(BOOLOID);
    buf.put_i32(n as i32);
    buf.put_i32(1);
    for v in &t.0 {
        buf.put_i32(1);
        buf.put_u8(u8::from(*v == TupleValue::UnchangedToast));
    }
}

//! The live verification sampler of `run`: while changes stream, it re-checks a share of the
//! keys apply just changed and a few random keys of the source and the target, with
//! [`verify::recheck`] (LSN-gated: a key is compared only once apply has passed the source
//! position it was read at), and reports what it finds: `shadowmig_checked_total`,
//! `shadowmig_mismatch_total`, a warning per mismatching key (key, kind, both rows), and
//! cumulative counters in the target's `shadowmig.sampler_counters` that `status` shows.
//!
//! It owns its own connections (a read-only [`VerifyContext`] and one target connection for
//! its two counters) and a background task. It must never write a data table, and it must
//! never block or fail apply: apply hands it keys through [`Sampler::offer`], a bounded
//! channel whose overflow is dropped, and every error of the sampler is logged and retried
//! later, never returned to `run`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::apply::{Change, SourceChange};
use crate::catalog;
use crate::pgoutput::types::{TupleData, TupleValue};
use crate::raw::RawParam;
use crate::spec::{quote_ident, Spec};
use crate::verify::{self, KeyText, VerifyContext, VerifyError, VerifyOptions};

/// Source identity keys waiting for the sampler at most (beyond it, offers are dropped). Kept
/// about one re-check round deep: a sample is worth more fresh than queued.
const CHANNEL: usize = 1000;
/// Keys per re-check call (each call waits once for apply to pass its read position, up to
/// the stream's status interval when the source is idle, so calls are few and wide).
const BATCH: usize = 1000;
/// The most of the sampler's wall time the target lookup of changed identities may take: it
/// searches the target by the source's key, which the target's indexes often do not lead
/// with (a table re-keyed by customer, say), and then it is a full scan; between lookups the
/// identities wait (at most [`BATCH`] of them) for the next one.
const TARGET_LOOKUP_DUTY: f64 = 0.01;
/// The duty rule above, bounded so that identities never wait long: the gap after a lookup
/// that took `d` is at most max(this, 9·d) — a share of at most 10 % for slow lookups, and
/// the 1 % rule for any lookup under 0.1 s. (Without a bound, one slow lookup under load made
/// the next wait minutes, and a lone change after it went unchecked.)
const TARGET_LOOKUP_MAX_GAP: Duration = Duration::from_secs(10);

/// The wait after a target lookup that took `d`.
fn lookup_gap(d: Duration) -> Duration {
    let duty = d.mul_f64((1.0 - TARGET_LOOKUP_DUTY) / TARGET_LOOKUP_DUTY);
    duty.min(TARGET_LOOKUP_MAX_GAP.max(d * 9))
}

/// One source column of the identity apply matches rows by.
#[derive(Debug, Clone)]
pub struct KeyColumn {
    /// Position in the source tuple.
    pub position: usize,
    /// Column name.
    pub name: String,
    /// Its type as `format_type` prints it (the parameters are cast to it).
    pub type_name: String,
}

/// The identity columns at `positions` of the source's `columns` (what [`start`] needs).
pub fn key_columns(columns: &[catalog::Column], positions: &[usize]) -> Vec<KeyColumn> {
    positions
        .iter()
        .filter_map(|&p| {
            columns.get(p).map(|c| KeyColumn {
                position: p,
                name: c.name.clone(),
                type_name: c.type_name.clone(),
            })
        })
        .collect()
}

/// The handle `run` keeps: offers keys, stops the task when dropped.
pub struct Sampler {
    tx: mpsc::Sender<Vec<Bytes>>,
    rate: f64,
    acc: f64,
    key: Vec<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the sampler for `spec` (`None` when `[verify]` turns both kinds of sampling off).
/// Connecting happens in the background: this returns at once.
pub fn start(spec: &Spec, key: Vec<KeyColumn>) -> Option<Sampler> {
    let cfg = &spec.verify;
    if cfg.sample_rate <= 0.0 && cfg.random_keys_per_minute == 0 {
        return None;
    }
    let (tx, rx) = mpsc::channel(CHANNEL);
    let positions = key.iter().map(|k| k.position).collect();
    let task = tokio::spawn(task(spec.clone(), key, rx));
    Some(Sampler {
        tx,
        rate: cfg.sample_rate,
        acc: 0.0,
        key: positions,
        task,
    })
}

impl Sampler {
    /// Offers the sampler the keys of `changes` (a committed or committing batch): every
    /// `1 / sample_rate`-th change is taken (a deterministic stride, no randomness to pay
    /// for), and dropped when the sampler is behind. Never waits.
    pub fn offer(&mut self, changes: &[SourceChange]) {
        for c in changes {
            self.offer_change(&c.change);
        }
    }

    /// [`Sampler::offer`] for one change.
    pub fn offer_change(&mut self, change: &Change) {
        if self.rate <= 0.0 {
            return;
        }
        self.acc += self.rate;
        if self.acc < 1.0 {
            return;
        }
        self.acc -= 1.0;
        let tuples: [Option<&TupleData>; 2] = match change {
            Change::Insert { new } | Change::Upsert { new } => [Some(new), None],
            Change::Delete { old } => [Some(old), None],
            Change::KeyChange { old, new, .. } => [Some(old), Some(new)],
        };
        for t in tuples.into_iter().flatten() {
            if let Some(k) = self.key_of(t) {
                // Full or closed: the sample is dropped, apply goes on.
                let _ = self.tx.try_send(k);
            }
        }
    }

    fn key_of(&self, t: &TupleData) -> Option<Vec<Bytes>> {
        self.key
            .iter()
            .map(|&i| match t.0.get(i) {
                Some(TupleValue::Binary(b)) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Cumulative counters of the sampler, as `status` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Keys compared (settled).
    pub checked: i64,
    /// Keys found different.
    pub mismatches: i64,
}

/// Reads the sampler's cumulative counters from the target's state (zeros when the table or
/// the row does not exist yet).
pub async fn read_counters(
    tgt: &Client,
    migration: &str,
) -> Result<Counters, tokio_postgres::Error> {
    let exists: bool = tgt
        .query_one(
            "SELECT to_regclass('shadowmig.sampler_counters') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(Counters::default());
    }
    let row = tgt
        .query_opt(
            "SELECT checked, mismatches FROM shadowmig.sampler_counters WHERE migration = $1",
            &[&migration],
        )
        .await?;
    Ok(match row {
        Some(r) => Counters {
            checked: r.try_get(0)?,
            mismatches: r.try_get(1)?,
        },
        None => Counters::default(),
    })
}

/// The statements the sampler uses, built once from the compared shape.
struct Queries {
    /// The target key as `text[]`, computed from the source row (transform expressions).
    source_key: String,
    /// The target key as `text[]`, read from the target row.
    target_key: String,
    /// Random target keys of transform(source): `$1` percent of pages, `$2` rows.
    source_random: String,
    /// Random target keys of the target.
    target_random: String,
    arity: usize,
}

fn key_array(ctx: &VerifyContext, source: bool) -> String {
    let s = &ctx.shape;
    let vals: Vec<String> = s
        .key
        .iter()
        .map(|&k| {
            let c = &s.columns[k];
            if source {
                format!("(({})::{})::text", c.source_expr, c.type_name)
            } else {
                format!(
                    "({}.{})::text",
                    quote_ident(&s.target_alias),
                    quote_ident(&c.name)
                )
            }
        })
        .collect();
    format!("ARRAY[{}]::text[]", vals.join(", "))
}

/// Rows of `from` whose identity columns are among `n` tuples of parameters, each cast to
/// the source column's type (so a target column of another type still compares by value).
fn identity_sql(from: &str, alias: &str, select: &str, key: &[KeyColumn], n: usize) -> String {
    let cols: Vec<String> = key
        .iter()
        .map(|k| format!("{}.{}", quote_ident(alias), quote_ident(&k.name)))
        .collect();
    let tuples: Vec<String> = (0..n)
        .map(|i| {
            let ps: Vec<String> = key
                .iter()
                .enumerate()
                .map(|(j, k)| format!("${}::{}", 1 + i * key.len() + j, k.type_name))
                .collect();
            format!("({})", ps.join(", "))
        })
        .collect();
    format!(
        "SELECT {select} FROM {from} AS {} WHERE ({}) IN ({})",
        quote_ident(alias),
        cols.join(", "),
        tuples.join(", ")
    )
}

impl Queries {
    fn new(ctx: &VerifyContext, key: &[KeyColumn]) -> Queries {
        let s = &ctx.shape;
        let source_key = key_array(ctx, true);
        let target_key = key_array(ctx, false);
        let random = |from: &str, alias: &str, select: &str| {
            format!(
                "SELECT {select} FROM {from} AS {} TABLESAMPLE SYSTEM ($1::float4) ORDER BY random() LIMIT $2",
                quote_ident(alias)
            )
        };
        Queries {
            source_random: random(&s.source_sql, &s.source_alias, &source_key),
            target_random: random(&s.target_sql, &s.target_alias, &target_key),
            source_key,
            target_key,
            arity: key.len(),
        }
    }
}

/// The sampler's working state inside its task.
struct Worker {
    spec: Spec,
    key: Vec<KeyColumn>,
    ctx: VerifyContext,
    state: Client,
    q: Queries,
    target_lookup: bool,
    /// Identities waiting for the next target lookup, and when it may run.
    target_pending: Vec<Vec<Bytes>>,
    target_next: Instant,
    /// Positions in `key` of the columns the target is searched by.
    lookup: Vec<usize>,
    /// Keys already reported at warn level (later finds of the same key are counted, and
    /// logged at debug, so a lasting corruption does not flood the log).
    reported: HashSet<KeyText>,
    copy_done: bool,
}

fn qerr(what: &str) -> impl FnOnce(tokio_postgres::Error) -> VerifyError + '_ {
    move |e| VerifyError::Query {
        context: what.to_string(),
        reason: catalog::db_message(&e),
    }
}

async fn task(spec: Spec, key: Vec<KeyColumn>, mut rx: mpsc::Receiver<Vec<Bytes>>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match Worker::open(&spec, &key).await {
            Ok(mut w) => {
                tracing::info!(
                    sample_rate = spec.verify.sample_rate,
                    random_keys_per_minute = spec.verify.random_keys_per_minute,
                    "live verification sampler started"
                );
                backoff = Duration::from_secs(1);
                if let Err(e) = w.work(&mut rx).await {
                    tracing::warn!("live verification sampler: {e}; restarting it");
                }
            }
            Err(e) => tracing::warn!("live verification sampler cannot start: {e}"),
        }
        // Drop what queued meanwhile: the sampler never holds apply's memory for long.
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

impl Worker {
    async fn open(spec: &Spec, key: &[KeyColumn]) -> Result<Worker, VerifyError> {
        let opts = VerifyOptions {
            settle_timeout: Duration::from_secs(30),
            role: "sampler",
            ..VerifyOptions::default()
        };
        let ctx = VerifyContext::open(spec, &opts).await?;
        let state = catalog::connect_as(&spec.target.url, "sampler")
            .await
            .map_err(|source| VerifyError::Catalog {
                side: "target",
                source,
            })?;
        ensure_counters(&state, &spec.name).await?;
        let q = Queries::new(&ctx, key);
        // The target is searched by the narrowest unique part of the identity it carries as
        // it is: the source's primary key when the identity covers it (a row moved under
        // another target key then shows up too), else the whole identity.
        let cat = |source| VerifyError::Catalog {
            side: "source",
            source,
        };
        let pk = match catalog::table_oid(&ctx.source, &spec.source.table)
            .await
            .map_err(cat)?
        {
            Some(oid) => catalog::primary_key(&ctx.source, oid)
                .await
                .map_err(cat)?
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let mut lookup: Vec<usize> = (0..key.len())
            .filter(|&i| pk.contains(&key[i].name))
            .collect();
        if pk.is_empty() || lookup.len() != pk.len() {
            lookup = (0..key.len()).collect();
        }
        let target_lookup = lookup.iter().all(|&i| {
            !spec.transform.contains_key(&key[i].name)
                && ctx.shape.columns.iter().any(|c| c.name == key[i].name)
        });
        Ok(Worker {
            spec: spec.clone(),
            key: key.to_vec(),
            target_lookup,
            target_pending: Vec::new(),
            target_next: Instant::now(),
            lookup,
            ctx,
            state,
            q,
            reported: HashSet::new(),
            copy_done: false,
        })
    }

    async fn work(&mut self, rx: &mut mpsc::Receiver<Vec<Bytes>>) -> Result<(), VerifyError> {
        let per_minute = self.spec.verify.random_keys_per_minute as f64;
        let mut random_due = 0.0f64;
        let mut last_tick = Instant::now();
        let mut estimate: Option<(Instant, f64, f64)> = None;
        let mut from_source = true;
        loop {
            // Gather changed keys for up to a second.
            let mut changed: Vec<Vec<Bytes>> = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            while changed.len() < BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(k)) => changed.push(k),
                    Ok(None) => return Ok(()),
                    Err(_) => break,
                }
            }
            if !self.copy_done {
                // Before the backfill is done, rows not yet copied are rightly absent from
                // the target: comparing now would report them missing.
                self.copy_done = crate::state::read_copy_progress(&self.state, &self.spec.name)
                    .await
                    .map_err(|e| VerifyError::Protocol(e.to_string()))?
                    .iter()
                    .any(|c| c.chunk == 0 && c.done);
                if !self.copy_done {
                    random_due = 0.0;
                    last_tick = Instant::now();
                    continue;
                }
            }
            let mut keys: Vec<KeyText> = Vec::new();
            if !changed.is_empty() {
                keys.extend(self.resolve(&changed).await?);
            }
            random_due += per_minute * last_tick.elapsed().as_secs_f64() / 60.0;
            last_tick = Instant::now();
            let n = random_due.floor();
            if n >= 1.0 {
                random_due -= n;
                if estimate.map_or(true, |(at, _, _)| at.elapsed() > Duration::from_secs(60)) {
                    estimate = Some((
                        Instant::now(),
                        self.rows(true).await?,
                        self.rows(false).await?,
                    ));
                }
                let (_, src_rows, tgt_rows) = estimate.unwrap_or((Instant::now(), 0.0, 0.0));
                // Both sides each round when there is enough to share, else alternate: the
                // source's sample finds rows missing in the target, the target's finds extras.
                let per_side = (n / 2.0).floor() as i64;
                if per_side > 0 {
                    keys.extend(self.random(true, per_side, src_rows).await?);
                    keys.extend(self.random(false, per_side, tgt_rows).await?);
                } else {
                    let rows = if from_source { src_rows } else { tgt_rows };
                    keys.extend(self.random(from_source, n as i64, rows).await?);
                    from_source = !from_source;
                }
            }
            keys.sort();
            keys.dedup();
            if !keys.is_empty() {
                tracing::debug!(
                    changed = changed.len(),
                    keys = keys.len(),
                    "live verification: re-checking"
                );
            }
            for part in keys.chunks(BATCH) {
                self.check(part).await?;
            }
        }
    }

    /// Target keys of the source rows with these identities (and of the target rows with
    /// them, when the target carries the identity columns as they are).
    async fn resolve(&mut self, ids: &[Vec<Bytes>]) -> Result<Vec<KeyText>, VerifyError> {
        let n = ids.len();
        let params: Vec<RawParam> = ids.iter().flatten().cloned().map(RawParam).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        if params.len() != n * self.q.arity {
            return Ok(Vec::new());
        }
        let sql = identity_sql(
            &self.ctx.shape.source_sql,
            &self.ctx.shape.source_alias,
            &self.q.source_key,
            &self.key,
            n,
        );
        let mut out: Vec<KeyText> = Vec::new();
        for r in self
            .ctx
            .source
            .query(&sql, &refs)
            .await
            .map_err(qerr("source: target keys of changed rows"))?
        {
            out.push(r.try_get(0).map_err(qerr("source: target keys"))?);
        }
        let from_source = out.len();
        if self.target_lookup {
            // Bounded: beyond BATCH waiting identities the oldest go to the source side only,
            // not the newest — a change made after a burst must still be looked up (a lone
            // stray row touched after a load went unchecked while the burst filled the queue).
            self.target_pending.extend(ids.iter().cloned());
            let over = self.target_pending.len().saturating_sub(BATCH);
            self.target_pending.drain(..over);
            if !self.target_pending.is_empty() && Instant::now() >= self.target_next {
                let pending = std::mem::take(&mut self.target_pending);
                let started = Instant::now();
                out.extend(self.lookup_in_target(&pending).await?);
                // Keep the lookup to its share of the time, however long a scan takes.
                self.target_next = Instant::now() + lookup_gap(started.elapsed());
            }
        }
        tracing::debug!(
            identities = n,
            from_source,
            from_target = out.len() - from_source,
            "live verification: changed keys resolved"
        );
        Ok(out)
    }

    /// Target keys of the target rows that carry these identities (by the narrowest unique
    /// part of the identity the target holds as it is, see [`Worker::open`]): finds a row moved
    /// under another target key, and an extra row next to the right one.
    async fn lookup_in_target(&mut self, ids: &[Vec<Bytes>]) -> Result<Vec<KeyText>, VerifyError> {
        let cols: Vec<KeyColumn> = self.lookup.iter().map(|&i| self.key[i].clone()).collect();
        let params: Vec<RawParam> = ids
            .iter()
            .flat_map(|id| self.lookup.iter().filter_map(|&i| id.get(i).cloned()))
            .map(RawParam)
            .collect();
        if params.len() != ids.len() * cols.len() {
            return Ok(Vec::new());
        }
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let sql = identity_sql(
            &self.ctx.shape.target_sql,
            &self.ctx.shape.target_alias,
            &self.q.target_key,
            &cols,
            ids.len(),
        );
        match self.ctx.target.query(&sql, &refs).await {
            Ok(rows) => rows
                .iter()
                .map(|r| r.try_get(0).map_err(qerr("target: keys of changed rows")))
                .collect(),
            Err(e) => {
                // E.g. a source type the target database lacks: look up by the source only
                // (extras under a changed key are then left to random sampling).
                tracing::info!(
                    "live verification sampler: cannot look changed keys up in the target ({}); using the source only",
                    catalog::db_message(&e)
                );
                self.target_lookup = false;
                Ok(Vec::new())
            }
        }
    }

    /// Estimated rows of the source (`true`) or target table, over its leaf partitions (50 a
    /// page for a table never analyzed or vacuumed).
    async fn rows(&self, source: bool) -> Result<f64, VerifyError> {
        let (c, t) = if source {
            (&self.ctx.source, &self.ctx.shape.source_sql)
        } else {
            (&self.ctx.target, &self.ctx.shape.target_sql)
        };
        let r = c
            .query_one(
                // As the planner does: the density seen at the last ANALYZE/VACUUM times the
                // pages now. `reltuples` alone is -1 until then (a freshly backfilled shadow
                // table), and taking that for "small" made every random sample a full scan.
                "SELECT coalesce(sum( \
                   CASE WHEN c.relpages > 0 AND c.reltuples >= 0 THEN c.reltuples / c.relpages ELSE 50 END \
                   * (pg_relation_size(c.oid) / current_setting('block_size')::float8)), 0)::float8 \
                 FROM pg_class c WHERE c.relkind IN ('r', 'm') AND (c.oid = to_regclass($1) \
                 OR c.oid IN (SELECT relid FROM pg_partition_tree(to_regclass($1)) WHERE isleaf))",
                &[t],
            )
            .await
            .map_err(qerr("estimating table rows"))?;
        r.try_get(0).map_err(qerr("estimating table rows"))
    }

    /// Up to `n` random target keys of transform(source) (`true`) or of the target: a
    /// page sample (`TABLESAMPLE SYSTEM`) a few times larger than `n`, so the cost stays
    /// bounded on large tables; whole table when small or never analyzed.
    async fn random(&self, source: bool, n: i64, rows: f64) -> Result<Vec<KeyText>, VerifyError> {
        let percent: f32 = if rows < 10_000.0 {
            100.0
        } else {
            (100.0 * 20.0 * n as f64 / rows).clamp(0.000_1, 100.0) as f32
        };
        let (c, sql) = if source {
            (&self.ctx.source, &self.q.source_random)
        } else {
            (&self.ctx.target, &self.q.target_random)
        };
        let rows = c
            .query(sql.as_str(), &[&percent, &n])
            .await
            .map_err(qerr("reading random keys"))?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(qerr("reading random keys")))
            .collect()
    }

    async fn check(&mut self, keys: &[KeyText]) -> Result<(), VerifyError> {
        let r = verify::recheck(&self.ctx, keys).await?;
        let checked = (keys.len() - r.unsettled.len().min(keys.len())) as u64;
        let mismatches = r.differences.len() as u64;
        metrics::counter!(crate::metrics::CHECKED_TOTAL).increment(checked);
        metrics::counter!(crate::metrics::MISMATCH_TOTAL).increment(mismatches);
        for d in &r.differences {
            let key = serde_json::to_string(&d.key).unwrap_or_default();
            let source = d
                .source
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "(none)".into());
            let target = d
                .target
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "(none)".into());
            if self.reported.len() >= 10_000 {
                self.reported.clear();
            }
            let k: KeyText = d.key.values().map(|v| Some(v.to_string())).collect();
            if self.reported.insert(k) {
                tracing::warn!(
                    key = %key,
                    kind = d.kind.name(),
                    source = %source,
                    target = %target,
                    "live verification: mismatch"
                );
            } else {
                tracing::debug!(key = %key, kind = d.kind.name(), "live verification: mismatch again");
            }
        }
        if !r.unsettled.is_empty() {
            tracing::debug!(
                keys = r.unsettled.len(),
                "live verification: keys left unsettled (apply did not pass them in time)"
            );
        }
        if checked > 0 {
            self.state
                .execute(
                    "UPDATE shadowmig.sampler_counters SET checked = checked + $2, \
                     mismatches = mismatches + $3 WHERE migration = $1",
                    &[&self.spec.name, &(checked as i64), &(mismatches as i64)],
                )
                .await
                .map_err(qerr("target: recording the sampler's counters"))?;
        }
        Ok(())
    }
}

/// Creates the sampler's counter table if it is missing: its own table, not columns of
/// `shadowmig.migrations`, so the sampler never takes a lock on the row apply updates in every
/// batch (nor an `ALTER TABLE` lock on the table).
async fn ensure_counters(c: &Client, migration: &str) -> Result<(), VerifyError> {
    c.batch_execute(
        "CREATE TABLE IF NOT EXISTS shadowmig.sampler_counters (
             migration text PRIMARY KEY,
             checked bigint NOT NULL DEFAULT 0,
             mismatches bigint NOT NULL DEFAULT 0
         )",
    )
    .await
    .map_err(qerr("target: creating the sampler's counters"))?;
    c.execute(
        "INSERT INTO shadowmig.sampler_counters (migration) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&migration],
    )
    .await
    .map_err(qerr("target: creating the sampler's counters"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_lookups_keep_their_share_yet_never_wait_long() {
        let ms = Duration::from_millis;
        // Fast lookups: the 1 % rule.
        assert_eq!(lookup_gap(ms(20)), ms(1980));
        assert_eq!(lookup_gap(ms(100)), ms(9900));
        // Slower: at most 10 s, or 9 × the lookup (a 10 % share) when that is longer.
        assert_eq!(lookup_gap(ms(500)), Duration::from_secs(10));
        assert_eq!(lookup_gap(Duration::from_secs(5)), Duration::from_secs(45));
    }

    #[test]
    fn identity_sql_casts_each_parameter_to_the_source_type() {
        let key = vec![
            KeyColumn {
                position: 0,
                name: "Id".into(),
                type_name: "bigint".into(),
            },
            KeyColumn {
                position: 2,
                name: "région".into(),
                type_name: "text".into(),
            },
        ];
        let sql = identity_sql("\"public\".\"T\"", "T", "x", &key, 2);
        assert_eq!(
            sql,
            "SELECT x FROM \"public\".\"T\" AS \"T\" WHERE (\"T\".\"Id\", \"T\".\"région\") IN (($1::bigint, $2::text), ($3::bigint, $4::text))"
        );
    }
}

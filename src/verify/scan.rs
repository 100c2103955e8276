//! The aggregate pass (both sides at once, each in short heap-block-range statements, per-bucket
//! count and xor of row hashes), its resumable state in `shadowmig.verify_progress`, and the
//! narrowing pass that lists the keys of chosen buckets.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::sql::{Side, BUCKETS};
use super::{qe, KeyText, VerifyContext, VerifyError, VerifyOptions};
use crate::spec::{quote_ident, STATE_SCHEMA};

/// What one side reads: the table itself, with its rows spread over one relation or over the
/// leaf partitions of a partitioned one.
///
/// A chunk is a range of block numbers `[a, b)` read through the table itself: for a
/// partitioned table each leaf contributes its own blocks `[a, b)` (the ctid condition is
/// pushed down to a TID Range Scan per leaf). Reading through the parent needs SELECT on the
/// parent only, as the application's grants usually give, never on each partition.
#[derive(Debug, Clone)]
pub(super) struct Leaf {
    oids: Vec<u32>,
    sql: String,
    rows_per_block: f64,
}

impl Leaf {
    fn blocks_per_chunk(&self, chunk_rows: u64) -> u64 {
        ((chunk_rows as f64 / self.rows_per_block).ceil() as u64).max(1)
    }
}

/// The table as one [`Leaf`] (a list, so that several relations could be read one after the
/// other; the saved frontier keeps an index into it).
pub(super) async fn leaves(c: &Client, table_sql: &str) -> Result<Vec<Leaf>, VerifyError> {
    let rows = c
        .query(
            "WITH t AS (SELECT relid FROM pg_partition_tree($1::text::regclass) WHERE isleaf
                        UNION ALL SELECT $1::text::regclass
                        WHERE NOT EXISTS (SELECT 1 FROM pg_partition_tree($1::text::regclass)))
             SELECT c.oid::int8, c.reltuples::float8, c.relpages::int8
             FROM t JOIN pg_class c ON c.oid = t.relid ORDER BY c.oid",
            &[&table_sql],
        )
        .await
        .map_err(qe(format!("listing the relations of {table_sql}")))?;
    let mut oids = Vec::new();
    let mut tuples = 0f64;
    let mut max_pages = 0i64;
    for r in &rows {
        let get = |e| VerifyError::Protocol(format!("relation list of {table_sql}: {e}"));
        let oid: i64 = r.try_get(0).map_err(get)?;
        let t: f64 = r.try_get(1).map_err(get)?;
        let p: i64 = r.try_get(2).map_err(get)?;
        oids.push(u32::try_from(oid).map_err(|_| VerifyError::Protocol("bad oid".into()))?);
        // -1: never analyzed.
        tuples += t.max(0.0);
        max_pages = max_pages.max(p);
    }
    // Rows per block *position*: every leaf contributes its block at each position.
    let rows_per_block = if tuples > 0.0 && max_pages > 0 {
        (tuples / max_pages as f64).max(1.0)
    } else {
        60.0 * oids.len().max(1) as f64
    };
    Ok(vec![Leaf {
        oids,
        sql: table_sql.to_string(),
        rows_per_block,
    }])
}

/// The number of block positions to read: the largest relation's size in blocks.
async fn nblocks(c: &Client, leaf: &Leaf) -> Result<u64, VerifyError> {
    let oids: Vec<i64> = leaf.oids.iter().map(|&o| i64::from(o)).collect();
    let n: i64 = c
        .query_one(
            "SELECT (coalesce(max(pg_relation_size(x::oid)), 0) / current_setting('block_size')::int8)::int8
             FROM unnest($1::int8[]) x",
            &[&oids],
        )
        .await
        .map_err(qe(format!("size of {}", leaf.sql)))?
        .try_get(0)
        .map_err(qe(format!("size of {}", leaf.sql)))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// One side's progress through its relations and its per-bucket accumulators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SideState {
    /// Index of the leaf being read.
    pub leaf: usize,
    /// Next block of that leaf.
    pub block: u64,
    /// Rows aggregated.
    pub rows: u64,
    /// Chunks read.
    pub chunks: u64,
    /// Per bucket: (row count, xor of row hashes).
    pub acc: Vec<(i64, i64)>,
}

impl SideState {
    fn new() -> SideState {
        SideState {
            leaf: 0,
            block: 0,
            rows: 0,
            chunks: 0,
            acc: vec![(0, 0); BUCKETS],
        }
    }
}

/// The result of a finished aggregate pass.
#[derive(Debug)]
pub(super) struct Aggregate {
    pub source: SideState,
    pub target: SideState,
    /// Continued from a saved frontier.
    pub resumed: bool,
}

impl Aggregate {
    /// Buckets whose (count, xor) differ between the sides.
    pub fn differing_buckets(&self) -> Vec<usize> {
        (0..BUCKETS)
            .filter(|&b| self.source.acc[b] != self.target.acc[b])
            .collect()
    }
}

pub(super) enum AggregateEnd {
    Done(Aggregate),
    Interrupted { chunks: u64 },
}

struct Shared {
    source: SideState,
    target: SideState,
    run_chunks: u64,
    run_rows: u64,
    last_save: Instant,
    last_log: Instant,
}

impl Shared {
    fn side(&mut self, side: Side) -> &mut SideState {
        match side {
            Side::Source => &mut self.source,
            Side::Target => &mut self.target,
        }
    }
}

struct Saver {
    client: tokio::sync::Mutex<Option<Client>>,
    migration: String,
    mode: &'static str,
    fingerprint: String,
}

fn encode_acc(s: &SideState, t: &SideState) -> Vec<u8> {
    let mut out = Vec::with_capacity(BUCKETS * 32);
    for st in [s, t] {
        for (c, x) in &st.acc {
            out.extend_from_slice(&c.to_le_bytes());
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// Per-bucket (count, xor) of one side.
type Acc = Vec<(i64, i64)>;

fn decode_acc(b: &[u8]) -> Option<(Acc, Acc)> {
    if b.len() != BUCKETS * 32 {
        return None;
    }
    let mut v: Vec<(i64, i64)> = b
        .chunks_exact(16)
        .map(|c| {
            let mut a = [0u8; 8];
            let mut x = [0u8; 8];
            a.copy_from_slice(&c[..8]);
            x.copy_from_slice(&c[8..]);
            (i64::from_le_bytes(a), i64::from_le_bytes(x))
        })
        .collect();
    let t = v.split_off(BUCKETS);
    Some((v, t))
}

fn frontier_json(s: &SideState, t: &SideState) -> String {
    serde_json::json!({
        "source": [s.leaf, s.block, s.rows, s.chunks],
        "target": [t.leaf, t.block, t.rows, t.chunks],
    })
    .to_string()
}

fn parse_frontier(text: &str, acc: (Acc, Acc)) -> Option<(SideState, SideState)> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let side = |name: &str, acc: Vec<(i64, i64)>| -> Option<SideState> {
        let a = v.get(name)?.as_array()?;
        let n = |i: usize| a.get(i).and_then(|x| x.as_u64());
        Some(SideState {
            leaf: usize::try_from(n(0)?).ok()?,
            block: n(1)?,
            rows: n(2)?,
            chunks: n(3)?,
            acc,
        })
    };
    Some((side("source", acc.0)?, side("target", acc.1)?))
}

impl Saver {
    const TABLE: &'static str = "verify_progress";

    fn table_sql() -> String {
        format!("{}.{}", quote_ident(STATE_SCHEMA), quote_ident(Self::TABLE))
    }

    /// Creates the progress table if needed; without the right to, verify still runs, only
    /// not resumably.
    async fn prepare(&self) -> bool {
        let mut guard = self.client.lock().await;
        let Some(c) = guard.as_ref() else {
            return false;
        };
        let ddl = format!(
            "SET client_min_messages = warning; CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {} (
                migration text NOT NULL, mode text NOT NULL, fingerprint text NOT NULL,
                frontier text NOT NULL, accumulators bytea NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (migration, mode))",
            quote_ident(STATE_SCHEMA),
            Self::table_sql()
        );
        match c.batch_execute(&ddl).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    error = %super::db_message(&e),
                    "verify: cannot create {}; this run will not be resumable",
                    Self::table_sql()
                );
                *guard = None;
                false
            }
        }
    }

    async fn load(&self) -> Result<Option<(SideState, SideState)>, VerifyError> {
        let guard = self.client.lock().await;
        let Some(c) = guard.as_ref() else {
            return Ok(None);
        };
        let row = c
            .query_opt(
                &format!(
                    "SELECT fingerprint, frontier, accumulators FROM {} WHERE migration = $1 AND mode = $2",
                    Self::table_sql()
                ),
                &[&self.migration, &self.mode],
            )
            .await
            .map_err(qe("reading the saved verify frontier"))?;
        let Some(r) = row else { return Ok(None) };
        let fp: String = r.try_get(0).map_err(qe("saved verify frontier"))?;
        if fp != self.fingerprint {
            tracing::info!("verify: the saved frontier is for another table shape; starting over");
            return Ok(None);
        }
        let frontier: String = r.try_get(1).map_err(qe("saved verify frontier"))?;
        let acc: Vec<u8> = r.try_get(2).map_err(qe("saved verify frontier"))?;
        Ok(decode_acc(&acc).and_then(|a| parse_frontier(&frontier, a)))
    }

    async fn save(&self, s: &SideState, t: &SideState) -> Result<(), VerifyError> {
        let guard = self.client.lock().await;
        let Some(c) = guard.as_ref() else {
            return Ok(());
        };
        c.execute(
            &format!(
                "INSERT INTO {} (migration, mode, fingerprint, frontier, accumulators)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (migration, mode) DO UPDATE SET fingerprint = EXCLUDED.fingerprint,
                   frontier = EXCLUDED.frontier, accumulators = EXCLUDED.accumulators, updated_at = now()",
                Self::table_sql()
            ),
            &[
                &self.migration,
                &self.mode,
                &self.fingerprint,
                &frontier_json(s, t),
                &encode_acc(s, t),
            ],
        )
        .await
        .map_err(qe("saving the verify frontier"))?;
        Ok(())
    }

    async fn clear(&self) -> Result<(), VerifyError> {
        let guard = self.client.lock().await;
        let Some(c) = guard.as_ref() else {
            return Ok(());
        };
        c.execute(
            &format!(
                "DELETE FROM {} WHERE migration = $1 AND mode = $2",
                Self::table_sql()
            ),
            &[&self.migration, &self.mode],
        )
        .await
        .map_err(qe("clearing the verify frontier"))?;
        Ok(())
    }
}

fn progress_bar(enabled: bool, total: u64, pos: u64) -> indicatif::ProgressBar {
    if !(enabled && std::io::stderr().is_terminal()) {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total.max(1));
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("verify [{bar:30}] {percent:>3}% {msg} ETA {eta}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_position(pos.min(total));
    pb
}

/// The aggregate pass over both sides, concurrently, from a saved frontier when one matches.
pub(super) async fn aggregate(
    ctx: &VerifyContext,
    state: Client,
    opts: &VerifyOptions,
) -> Result<AggregateEnd, VerifyError> {
    let (sl, tl) = tokio::try_join!(
        leaves(&ctx.source, &ctx.shape.source_sql),
        leaves(&ctx.target, &ctx.shape.target_sql)
    )?;
    let oids = |l: &[Leaf]| {
        l.iter()
            .flat_map(|x| x.oids.iter().map(|o| o.to_string()))
            .collect::<Vec<_>>()
            .join(",")
    };
    let saver = Saver {
        client: tokio::sync::Mutex::new(Some(state)),
        migration: ctx.migration.clone(),
        mode: if ctx.shape.keys_only { "keys" } else { "rows" },
        fingerprint: format!(
            "{};leaves={}|{}",
            ctx.shape.fingerprint(),
            oids(&sl),
            oids(&tl)
        ),
    };
    let can_save = saver.prepare().await;
    let saved = if opts.resume && can_save {
        saver.load().await?
    } else {
        None
    };
    let resumed = saved.is_some();
    let (source, target) = saved.unwrap_or_else(|| (SideState::new(), SideState::new()));
    if resumed {
        tracing::info!(
            source_rows = source.rows,
            target_rows = target.rows,
            "verify: continuing from the saved frontier"
        );
    }
    // Progress is counted in heap blocks; done blocks are estimated for a resumed side.
    let mut total = 0u64;
    let mut done = 0u64;
    for (c, ls, st) in [(&ctx.source, &sl, &source), (&ctx.target, &tl, &target)] {
        for (i, l) in ls.iter().enumerate() {
            let n = nblocks(c, l).await?;
            total += n;
            done += match i.cmp(&st.leaf) {
                std::cmp::Ordering::Less => n,
                std::cmp::Ordering::Equal => st.block.min(n),
                std::cmp::Ordering::Greater => 0,
            };
        }
    }
    let pb = progress_bar(opts.progress, total, done);
    let shared = Mutex::new(Shared {
        source,
        target,
        run_chunks: 0,
        run_rows: 0,
        last_save: Instant::now(),
        last_log: Instant::now(),
    });
    let start = Instant::now();
    let env = ScanEnv {
        ctx,
        opts,
        shared: &shared,
        saver: &saver,
        pb: &pb,
        start,
        total_blocks: total,
    };
    let (a, b) = tokio::try_join!(
        env.scan_side(Side::Source, &sl),
        env.scan_side(Side::Target, &tl)
    )?;
    pb.finish_and_clear();
    let (s, t, chunks) = {
        let g = shared
            .lock()
            .map_err(|_| VerifyError::Protocol("verify state lock poisoned".into()))?;
        (g.source.clone(), g.target.clone(), g.run_chunks)
    };
    if a || b {
        saver.save(&s, &t).await?;
        return Ok(AggregateEnd::Interrupted { chunks });
    }
    saver.clear().await?;
    Ok(AggregateEnd::Done(Aggregate {
        source: s,
        target: t,
        resumed,
    }))
}

struct ScanEnv<'a> {
    ctx: &'a VerifyContext,
    opts: &'a VerifyOptions,
    shared: &'a Mutex<Shared>,
    saver: &'a Saver,
    pb: &'a indicatif::ProgressBar,
    start: Instant,
    total_blocks: u64,
}

impl ScanEnv<'_> {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Shared>, VerifyError> {
        self.shared
            .lock()
            .map_err(|_| VerifyError::Protocol("verify state lock poisoned".into()))
    }

    /// Reads one side to its end; `Ok(true)` when stopped by `max_chunks`.
    async fn scan_side(&self, side: Side, leaves: &[Leaf]) -> Result<bool, VerifyError> {
        let client = match side {
            Side::Source => &self.ctx.source,
            Side::Target => &self.ctx.target,
        };
        let mut cached: Option<(usize, u64)> = None;
        loop {
            let (li, from) = {
                let mut g = self.lock()?;
                if let Some(max) = self.opts.max_chunks {
                    if g.run_chunks >= max {
                        return Ok(true);
                    }
                }
                let st = g.side(side);
                (st.leaf, st.block)
            };
            let Some(leaf) = leaves.get(li) else {
                return Ok(false);
            };
            // Re-read the relation's size when the cached one is reached: it may have grown.
            let n = match cached {
                Some((l, n)) if l == li && from < n => n,
                _ => {
                    let n = nblocks(client, leaf).await?;
                    cached = Some((li, n));
                    n
                }
            };
            if from >= n {
                let mut g = self.lock()?;
                let st = g.side(side);
                st.leaf += 1;
                st.block = 0;
                continue;
            }
            let to = from + leaf.blocks_per_chunk(self.opts.chunk_rows);
            let sql = self.ctx.shape.aggregate_sql(side, &leaf.sql, from, to);
            let rows = client.query(&sql, &[]).await.map_err(qe(format!(
                "{}: reading blocks {from}..{to} of {}",
                side.name(),
                leaf.sql
            )))?;
            let mut parts = Vec::with_capacity(rows.len());
            let mut nrows = 0u64;
            for r in &rows {
                let err = |e| VerifyError::Protocol(format!("aggregate row: {e}"));
                let b: i32 = r.try_get(0).map_err(err)?;
                let c: i64 = r.try_get(1).map_err(err)?;
                let x: i64 = r.try_get(2).map_err(err)?;
                let b = usize::try_from(b)
                    .ok()
                    .filter(|&b| b < BUCKETS)
                    .ok_or_else(|| VerifyError::Protocol(format!("bucket {b} out of range")))?;
                parts.push((b, c, x));
                nrows += u64::try_from(c).unwrap_or(0);
            }
            let (save, log, run_rows) = {
                let mut g = self.lock()?;
                let st = g.side(side);
                for (b, c, x) in parts {
                    st.acc[b].0 += c;
                    st.acc[b].1 ^= x;
                }
                st.block = to;
                st.rows += nrows;
                st.chunks += 1;
                g.run_chunks += 1;
                g.run_rows += nrows;
                let save = g.last_save.elapsed() >= Duration::from_secs(1);
                if save {
                    g.last_save = Instant::now();
                }
                let log = g.last_log.elapsed() >= Duration::from_secs(10);
                if log {
                    g.last_log = Instant::now();
                }
                let snap = save.then(|| (g.source.clone(), g.target.clone()));
                (snap, log, g.run_rows)
            };
            self.pb.inc(to.min(n) - from);
            self.pb.set_message(format!(
                "{} rows, {:.0} rows/s",
                run_rows,
                run_rows as f64 / self.start.elapsed().as_secs_f64().max(0.001)
            ));
            if log && self.pb.is_hidden() {
                tracing::info!(
                    rows = run_rows,
                    blocks_done = self.pb.position(),
                    blocks_total = self.total_blocks,
                    "verify: aggregate pass in progress"
                );
            }
            if let Some((s, t)) = save {
                self.saver.save(&s, &t).await?;
            }
            if let Some(limit) = self.opts.max_rows_per_sec {
                let due = Duration::from_secs_f64(run_rows as f64 / limit.max(1) as f64);
                let spent = self.start.elapsed();
                if due > spent {
                    tokio::time::sleep(due - spent).await;
                }
            }
        }
    }
}

/// The key and row hash of every row of `side` in one of `buckets`.
pub(super) async fn narrow(
    ctx: &VerifyContext,
    side: Side,
    buckets: &[i32],
    opts: &VerifyOptions,
) -> Result<HashMap<KeyText, i64>, VerifyError> {
    let (client, table) = match side {
        Side::Source => (&ctx.source, &ctx.shape.source_sql),
        Side::Target => (&ctx.target, &ctx.shape.target_sql),
    };
    let buckets = buckets.to_vec();
    let mut out = HashMap::new();
    for leaf in leaves(client, table).await? {
        let mut from = 0u64;
        let mut n = nblocks(client, &leaf).await?;
        loop {
            if from >= n {
                n = nblocks(client, &leaf).await?;
                if from >= n {
                    break;
                }
            }
            // Narrowing reads only the key and hash of a few rows: bigger steps are fine.
            let to = from + 4 * leaf.blocks_per_chunk(opts.chunk_rows);
            let sql = ctx.shape.narrow_sql(side, &leaf.sql, from, to);
            let rows = client.query(&sql, &[&buckets]).await.map_err(qe(format!(
                "{}: narrowing blocks {from}..{to} of {}",
                side.name(),
                leaf.sql
            )))?;
            for r in rows {
                let err = |e| VerifyError::Protocol(format!("narrowing row: {e}"));
                let k: Vec<Option<String>> = r.try_get(0).map_err(err)?;
                let h: i64 = r.try_get(1).map_err(err)?;
                out.insert(k, h);
            }
            from = to;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_state_round_trips() {
        let mut s = SideState::new();
        let mut t = SideState::new();
        s.acc[7] = (3, -42);
        t.acc[BUCKETS - 1] = (1, i64::MIN);
        s.leaf = 2;
        s.block = 99;
        t.rows = 12345;
        let acc = decode_acc(&encode_acc(&s, &t)).unwrap();
        let (s2, t2) = parse_frontier(&frontier_json(&s, &t), acc).unwrap();
        assert_eq!((s2, t2), (s, t));
        assert!(decode_acc(&[0u8; 5]).is_none());
        assert!(parse_frontier("{}", (vec![], vec![])).is_none());
    }
}

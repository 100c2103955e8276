//! Re-checking candidate keys so that changes in flight are never reported: each round reads
//! the keys on the source, notes the source's WAL position, waits until apply has passed it,
//! then reads them on the target (and the source again). See [`recheck`] for when a key
//! counts as different.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::report::{DiffKind, Difference};
use super::sql::Side;
use super::{key_object, qe, KeyText, VerifyContext, VerifyError};
use crate::lsn::Lsn;
use crate::spec::{quote_ident, STATE_SCHEMA};

/// What a re-check found.
#[derive(Debug, Default)]
pub struct Recheck {
    /// Keys that differed in every round, with both sides' last values.
    pub differences: Vec<Difference>,
    /// Keys that could not be settled: apply did not pass the LSN they were read at in time.
    pub unsettled: Vec<BTreeMap<String, serde_json::Value>>,
}

/// One side's row: its JSON (for the report) and its canonical text (for comparing).
type Row = Option<(serde_json::Value, String)>;

async fn read_rows(
    c: &Client,
    ctx: &VerifyContext,
    side: Side,
    keys: &[KeyText],
) -> Result<Vec<Row>, VerifyError> {
    let nk = ctx.shape.key.len();
    let cols: Vec<Vec<Option<String>>> = (0..nk)
        .map(|j| keys.iter().map(|k| k.get(j).cloned().flatten()).collect())
        .collect();
    let params: Vec<&(dyn ToSql + Sync)> = cols.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
    let rows = c
        .query(&ctx.shape.lookup_sql(side), &params)
        .await
        .map_err(qe(format!("{}: re-reading rows by key", side.name())))?;
    let mut out: Vec<Row> = vec![None; keys.len()];
    for r in rows {
        let err = |e| VerifyError::Protocol(format!("re-check row: {e}"));
        let i: i64 = r.try_get(0).map_err(err)?;
        let json: String = r.try_get(1).map_err(err)?;
        let text: String = r.try_get(2).map_err(err)?;
        let v = serde_json::from_str(&json)
            .map_err(|e| VerifyError::Protocol(format!("row JSON: {e}")))?;
        if let Some(slot) = usize::try_from(i - 1).ok().and_then(|i| out.get_mut(i)) {
            *slot = Some((v, text));
        }
    }
    Ok(out)
}

/// The slot's confirmed position, or `None` when there is no slot (nothing streams).
async fn slot_confirmed(ctx: &VerifyContext) -> Result<Option<Option<Lsn>>, VerifyError> {
    let row = ctx
        .source
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&ctx.slot_name],
        )
        .await
        .map_err(qe("source: reading the replication slot"))?;
    match row {
        None => Ok(None),
        Some(r) => {
            let s: Option<String> = r.try_get(0).map_err(qe("source: replication slot"))?;
            Ok(Some(s.and_then(|s| Lsn::from_str(&s).ok())))
        }
    }
}

/// The last source commit LSN apply recorded in `shadowmig.progress`, if any.
async fn applied_lsn(ctx: &VerifyContext) -> Result<Option<Lsn>, VerifyError> {
    let table = format!("{}.{}", quote_ident(STATE_SCHEMA), quote_ident("progress"));
    let exists: bool = ctx
        .target
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(qe("target: looking for shadowmig.progress"))?
        .try_get(0)
        .map_err(qe("target: looking for shadowmig.progress"))?;
    if !exists {
        return Ok(None);
    }
    let row = ctx
        .target
        .query_opt(
            &format!(
                "SELECT lsn::text FROM {table} WHERE migration = $1 AND direction = 'forward'"
            ),
            &[&ctx.migration],
        )
        .await
        .map_err(qe("target: reading apply progress"))?;
    match row {
        None => Ok(None),
        Some(r) => {
            let s: Option<String> = r.try_get(0).map_err(qe("target: apply progress"))?;
            Ok(s.and_then(|s| Lsn::from_str(&s).ok()))
        }
    }
}

/// Waits until apply has passed `lsn` (its progress row, or the slot's confirmed position:
/// apply confirms only what the target has committed); `false` on timeout.
async fn wait_applied(ctx: &VerifyContext, lsn: Lsn) -> Result<bool, VerifyError> {
    let deadline = Instant::now() + ctx.settle_timeout;
    loop {
        let applied = applied_lsn(ctx).await?;
        let confirmed = slot_confirmed(ctx).await?;
        let Some(confirmed) = confirmed else {
            // The slot is gone: nothing streams any more, the tables are at rest.
            return Ok(true);
        };
        if applied.max(confirmed).is_some_and(|a| a >= lsn) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn differs(s: &Row, t: &Row, keys_only: bool) -> bool {
    match (s, t) {
        (None, None) => false,
        (Some((_, a)), Some((_, b))) => !keys_only && a != b,
        _ => true,
    }
}

/// Re-checks `keys` (target key text forms) and returns those that really differ, and those
/// that could not be settled. Usable on its own, e.g. by a live sampler over recently changed
/// keys.
///
/// A round reads the source rows, notes the source's WAL position, waits until apply has
/// passed it, reads the target rows, then reads the source rows again. A key equal in any
/// round is cleared. A round that finds it different is *conclusive* only if its source row
/// did not change between the two source reads: the target, read in between, can then only
/// hold that very state. A key is a difference after `ctx.rounds` conclusive rounds (one
/// suffices when source and target are read in one snapshot: same database, nothing
/// streaming). A key still undecided after `4 × rounds + 2` rounds (it kept changing), or
/// whose position apply never passed, is unsettled: exit 2, never a false difference.
pub async fn recheck(ctx: &VerifyContext, keys: &[KeyText]) -> Result<Recheck, VerifyError> {
    let mut pending: Vec<usize> = (0..keys.len()).collect();
    let mut last: HashMap<usize, (Row, Row)> = HashMap::new();
    let mut conclusive: HashMap<usize, u32> = HashMap::new();
    let mut confirmed = Vec::new();
    let mut out = Recheck::default();
    let names = ctx.shape.key_names();
    let streaming = slot_confirmed(ctx).await?.is_some();
    let single_snapshot = ctx.same_database && !streaming;
    let needed = if single_snapshot {
        1
    } else {
        ctx.rounds.max(1)
    };
    let max_rounds = 4 * ctx.rounds.max(1) + 2;
    for round in 0..max_rounds {
        if pending.is_empty() {
            break;
        }
        if round > 0 {
            tokio::time::sleep(Duration::from_millis((50 * u64::from(round)).min(1000))).await;
        }
        let ks: Vec<KeyText> = pending.iter().map(|&i| keys[i].clone()).collect();
        let (src, tgt, stable) = if single_snapshot {
            // Nothing in flight between the tables: one snapshot sees both exactly.
            ctx.source
                .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .await
                .map_err(qe("source: starting the re-check snapshot"))?;
            let both = async {
                let s = read_rows(&ctx.source, ctx, Side::Source, &ks).await?;
                let t = read_rows(&ctx.source, ctx, Side::Target, &ks).await?;
                Ok::<_, VerifyError>((s, t))
            }
            .await;
            let end = ctx.source.batch_execute("COMMIT").await;
            let (s, t) = both?;
            end.map_err(qe("source: ending the re-check snapshot"))?;
            let stable = vec![true; s.len()];
            (s, t, stable)
        } else {
            let s = read_rows(&ctx.source, ctx, Side::Source, &ks).await?;
            let lsn: String = ctx
                .source
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
                .map_err(qe("source: reading the WAL position"))?
                .try_get(0)
                .map_err(qe("source: reading the WAL position"))?;
            let lsn = Lsn::from_str(&lsn).map_err(|e| VerifyError::Protocol(e.to_string()))?;
            if streaming && !wait_applied(ctx, lsn).await? {
                tracing::warn!(
                    %lsn,
                    keys = pending.len(),
                    timeout_s = ctx.settle_timeout.as_secs(),
                    "verify: apply did not pass the re-check position in time (is `shadowmig run` running?)"
                );
                break;
            }
            let t = read_rows(&ctx.target, ctx, Side::Target, &ks).await?;
            let again = read_rows(&ctx.source, ctx, Side::Source, &ks).await?;
            let stable = s
                .iter()
                .zip(&again)
                .map(|(a, b)| a.as_ref().map(|r| &r.1) == b.as_ref().map(|r| &r.1))
                .collect();
            (s, t, stable)
        };
        let mut still = Vec::new();
        for (j, &i) in pending.iter().enumerate() {
            if !differs(&src[j], &tgt[j], ctx.shape.keys_only) {
                continue;
            }
            last.insert(i, (src[j].clone(), tgt[j].clone()));
            let n = conclusive.entry(i).or_insert(0);
            if stable[j] {
                *n += 1;
            }
            if *n >= needed {
                confirmed.push(i);
            } else {
                still.push(i);
            }
        }
        pending = still;
    }
    for i in pending {
        let row = last.get(&i).and_then(|(s, t)| s.as_ref().or(t.as_ref()));
        out.unsettled
            .push(key_object(&names, &keys[i], row.map(|r| &r.0)));
    }
    for i in confirmed {
        let Some((s, t)) = last.remove(&i) else {
            continue;
        };
        let kind = match (&s, &t) {
            (Some(_), None) => DiffKind::Missing,
            (None, Some(_)) => DiffKind::Extra,
            _ => DiffKind::Different,
        };
        let row = s.as_ref().or(t.as_ref()).map(|r| &r.0);
        out.differences.push(Difference {
            key: key_object(&names, &keys[i], row),
            kind,
            source: s.map(|r| r.0),
            target: t.map(|r| r.0),
        });
    }
    Ok(out)
}

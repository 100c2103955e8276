//! `shadowmig verify`: an exact comparison of transform(source) with the target.
//!
//! It owns the comparison and nothing else: deciding what is compared ([`sql::Shape`]: the
//! spec's `[transform]` expressions, same-named columns, constant defaults), the aggregate pass
//! (each side read in short heap-block-range chunks, per-bucket count and xor of 64-bit hashes
//! of each row's canonical text), narrowing differing buckets down to keys, the re-check of
//! those keys after apply has passed the LSN they were read at ([`recheck`], public so a live
//! sampler can use it), resumability (`shadowmig.verify_progress` in the target) and the
//! report (human, JSON).
//!
//! It must never write to the source, nor to any target table other than its own
//! `shadowmig.verify_progress` (the reading connections are `default_transaction_read_only`),
//! and it must never call `apply`: it checks that code, it does not share it — transform
//! expressions are evaluated here, by SQL of our own.

mod recheck;
mod report;
mod scan;
pub mod sql;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::catalog::{self, db_message, CatalogError};
use crate::spec::{quote_ident, QualifiedName, Spec};
use sql::{ComparedColumn, ExcludedColumn, Shape, Side};

pub use recheck::{recheck, Recheck};
pub use report::{DiffKind, Difference, VerifyReport};

/// A key as the text form of each target key column, in key order (`None`: SQL NULL, which a
/// source expression may yield; it never matches a target key).
pub type KeyText = Vec<Option<String>>;

/// Why verify could not give an answer (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Connecting or a catalog query failed (never carries a password).
    #[error("{side}: {source}")]
    Catalog {
        /// `source` or `target`.
        side: &'static str,
        /// What failed.
        source: CatalogError,
    },
    /// The tables cannot be compared as they are (missing table, no key, a key column that
    /// nothing fills…).
    #[error("{0}")]
    Setup(String),
    /// A query failed.
    #[error("{context}: {reason}")]
    Query {
        /// What was being done.
        context: String,
        /// The server's message.
        reason: String,
    },
    /// The server returned something we cannot use.
    #[error("{0}")]
    Protocol(String),
}

fn qe(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> VerifyError {
    let context = context.into();
    move |e| VerifyError::Query {
        context,
        reason: db_message(&e),
    }
}

/// Knobs of one verify run. `Default` is what the CLI uses.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Compare key presence only (hash the key, not the row).
    pub keys_only: bool,
    /// Rows per aggregate chunk (estimated from each relation's rows per page).
    pub chunk_rows: u64,
    /// Stop after this many chunks (both sides together), saving the frontier: the run
    /// reports [`Outcome::Interrupted`] and the next one continues from there. For tests and
    /// for operators who want to spread a verify over several windows.
    pub max_chunks: Option<u64>,
    /// Upper bound on rows read per second (both sides together); defaults to the spec's
    /// `[throttle].max_rows_per_sec`.
    pub max_rows_per_sec: Option<u64>,
    /// Continue from a saved frontier when one matches (otherwise start over).
    pub resume: bool,
    /// Conclusive re-check rounds that must find a key different before it is reported (see
    /// [`recheck`]).
    pub recheck_rounds: u32,
    /// How long to wait for apply to pass a re-check LSN before calling keys unsettled.
    pub settle_timeout: Duration,
    /// Stop narrowing after this many confirmed differences (the report says it is truncated).
    pub max_differences: usize,
    /// Narrow differing buckets in batches of about this many rows, each one pass over both
    /// sides holding only that batch's keys in memory.
    pub narrow_batch_rows: i64,
    /// Show a progress bar on stderr when it is a terminal (plain log lines otherwise).
    pub progress: bool,
    /// Who is comparing, for `application_name` (`shadowmig <role>`): `verify`, or `sampler`
    /// for `run`'s live sampler.
    pub role: &'static str,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            keys_only: false,
            chunk_rows: 50_000,
            max_chunks: None,
            max_rows_per_sec: None,
            resume: true,
            recheck_rounds: 2,
            settle_timeout: Duration::from_secs(60),
            max_differences: 1000,
            narrow_batch_rows: 200_000,
            progress: false,
            role: "verify",
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The comparison finished.
    Done(VerifyReport),
    /// Stopped by [`VerifyOptions::max_chunks`]; the frontier is saved.
    Interrupted {
        /// Chunks read in this run.
        chunks: u64,
    },
}

/// Connections and the compared shape: everything [`recheck`] needs.
pub struct VerifyContext {
    /// The compared shape.
    pub shape: Shape,
    /// The migration id.
    pub migration: String,
    /// Read-only connection to the source.
    pub source: Client,
    /// Read-only connection to the target.
    pub target: Client,
    /// Source and target are the same database.
    pub same_database: bool,
    /// The migration's replication slot name (streaming is on while it exists).
    pub slot_name: String,
    /// Conclusive re-check rounds needed to report a key.
    pub rounds: u32,
    /// Wait bound for apply to pass a re-check LSN.
    pub settle_timeout: Duration,
}

/// Session settings that make both sides print values identically, whatever the servers'
/// defaults.
const SESSION_SETTINGS: &str = "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
     SET TimeZone = 'UTC'; SET extra_float_digits = 1; SET bytea_output = 'hex'; \
     SET lc_monetary = 'C'; SET default_transaction_read_only = on";

async fn connect(
    url: &crate::spec::DbUrl,
    side: &'static str,
    role: &str,
) -> Result<Client, VerifyError> {
    let c = catalog::connect_as(url, role)
        .await
        .map_err(|source| VerifyError::Catalog { side, source })?;
    c.batch_execute(SESSION_SETTINGS)
        .await
        .map_err(qe(format!("{side}: session settings")))?;
    Ok(c)
}

impl VerifyContext {
    /// Connects to both sides and works out what is compared.
    pub async fn open(spec: &Spec, opts: &VerifyOptions) -> Result<VerifyContext, VerifyError> {
        let source = connect(&spec.source.url, "source", opts.role).await?;
        let target = connect(&spec.target.url, "target", opts.role).await?;
        let shape = build_shape(spec, &source, &target, opts.keys_only).await?;
        Ok(VerifyContext {
            shape,
            migration: spec.name.clone(),
            source,
            target,
            same_database: spec.same_database(),
            slot_name: spec.slot_name(),
            rounds: opts.recheck_rounds.max(1),
            settle_timeout: opts.settle_timeout,
        })
    }
}

async fn oid_of(c: &Client, t: &QualifiedName, side: &'static str) -> Result<u32, VerifyError> {
    catalog::table_oid(c, t)
        .await
        .map_err(|source| VerifyError::Catalog { side, source })?
        .ok_or_else(|| VerifyError::Setup(format!("{side} table {t} does not exist")))
}

/// Defaults of the target's columns whose expression tree is constants only, as SQL text.
async fn constant_defaults(c: &Client, oid: u32) -> Result<HashMap<String, String>, VerifyError> {
    let rows = c
        .query(
            "SELECT a.attname::text, pg_get_expr(d.adbin, d.adrelid), d.adbin::text
             FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
             WHERE d.adrelid = $1::int8::oid",
            &[&i64::from(oid)],
        )
        .await
        .map_err(qe("target: column defaults"))?;
    let mut out = HashMap::new();
    for r in rows {
        let name: String = r.try_get(0).map_err(qe("target: column defaults"))?;
        let expr: String = r.try_get(1).map_err(qe("target: column defaults"))?;
        let tree: String = r.try_get(2).map_err(qe("target: column defaults"))?;
        if sql::constant_default_tree(&tree) {
            out.insert(name, expr);
        }
    }
    Ok(out)
}

async fn build_shape(
    spec: &Spec,
    source: &Client,
    target: &Client,
    keys_only: bool,
) -> Result<Shape, VerifyError> {
    let cat = |side: &'static str| move |source| VerifyError::Catalog { side, source };
    let soid = oid_of(source, &spec.source.table, "source").await?;
    let toid = oid_of(target, &spec.target.table, "target").await?;
    let scols = catalog::columns(source, soid)
        .await
        .map_err(cat("source"))?;
    let tcols = catalog::columns(target, toid)
        .await
        .map_err(cat("target"))?;
    let Some((_, tkey)) = catalog::row_key(target, toid)
        .await
        .map_err(cat("target"))?
    else {
        let deferred = matches!(
            crate::state::deferred_key(target, &spec.name).await,
            Ok(Some(_))
        );
        return Err(VerifyError::Setup(if deferred {
            format!(
                "target table {} has no primary key yet: [copy] defer_indexes builds it when the backfill ends; verify once `shadowmig status` shows the backfill done",
                spec.target.table
            )
        } else {
            format!(
                "target table {} has no primary key or usable unique index to compare rows by",
                spec.target.table
            )
        }));
    };
    let defaults = constant_defaults(target, toid).await?;
    for k in spec.transform.keys() {
        if !tcols.iter().any(|c| &c.name == k) {
            return Err(VerifyError::Setup(format!(
                "[transform].{k} names no column of the target table {}",
                spec.target.table
            )));
        }
    }
    let mut columns = Vec::new();
    let mut excluded = Vec::new();
    for c in &tcols {
        let expr = if c.generated {
            excluded.push(ExcludedColumn {
                column: c.name.clone(),
                reason: "generated in the target".into(),
            });
            continue;
        } else if let Some(e) = spec.transform.get(&c.name) {
            e.clone()
        } else if scols.iter().any(|s| s.name == c.name) {
            quote_ident(&c.name)
        } else if c.has_default {
            match defaults.get(&c.name) {
                Some(d) => d.clone(),
                None => {
                    excluded.push(ExcludedColumn {
                        column: c.name.clone(),
                        reason: "filled by a default that is not a constant (cannot be recomputed from the source)".into(),
                    });
                    continue;
                }
            }
        } else {
            // Nothing fills it: every insert leaves it NULL.
            "NULL".to_string()
        };
        columns.push(ComparedColumn {
            name: c.name.clone(),
            type_name: c.type_name.clone(),
            type_oid: c.type_oid,
            source_expr: expr,
        });
    }
    let mut key = Vec::new();
    for k in &tkey {
        match columns.iter().position(|c| &c.name == k) {
            Some(p) => key.push(p),
            None => {
                return Err(VerifyError::Setup(format!(
                    "target key column {k:?} is not computed from the source (no [transform] entry, no same-named source column)"
                )))
            }
        }
    }
    Ok(Shape {
        source_sql: spec.source.table.quoted(),
        source_alias: spec.source.table.name.clone(),
        target_sql: spec.target.table.quoted(),
        target_alias: spec.target.table.name.clone(),
        columns,
        key,
        excluded,
        keys_only,
    })
}

/// Runs a whole verify: aggregate pass (resumable), narrowing, re-check.
pub async fn verify(spec: &Spec, opts: &VerifyOptions) -> Result<Outcome, VerifyError> {
    let started = Instant::now();
    let ctx = VerifyContext::open(spec, opts).await?;
    let state_client = catalog::connect_as(&spec.target.url, opts.role)
        .await
        .map_err(|source| VerifyError::Catalog {
            side: "target",
            source,
        })?;
    let mut opts = opts.clone();
    if opts.max_rows_per_sec.is_none() {
        opts.max_rows_per_sec = spec.throttle.max_rows_per_sec;
    }
    let agg = match scan::aggregate(&ctx, state_client, &opts).await? {
        scan::AggregateEnd::Interrupted { chunks } => return Ok(Outcome::Interrupted { chunks }),
        scan::AggregateEnd::Done(a) => a,
    };
    let differing = agg.differing_buckets();
    tracing::info!(
        rows_source = agg.source.rows,
        rows_target = agg.target.rows,
        differing_buckets = differing.len(),
        "verify: aggregate pass done"
    );
    // Narrow in batches of buckets small enough to hold their keys in memory.
    let mut differences = Vec::new();
    let mut unsettled = Vec::new();
    let mut candidates = 0usize;
    let mut truncated = false;
    let mut batch: Vec<i32> = Vec::new();
    let mut batch_rows = 0i64;
    let mut batches = Vec::new();
    for b in differing {
        let rows = agg.source.acc[b].0.max(agg.target.acc[b].0);
        if !batch.is_empty() && batch_rows + rows > opts.narrow_batch_rows {
            batches.push(std::mem::take(&mut batch));
            batch_rows = 0;
        }
        batch.push(b as i32);
        batch_rows += rows;
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    for buckets in batches {
        let (s, t) = tokio::try_join!(
            scan::narrow(&ctx, Side::Source, &buckets, &opts),
            scan::narrow(&ctx, Side::Target, &buckets, &opts)
        )?;
        let keys = diff_maps(&s, &t);
        candidates += keys.len();
        for part in keys.chunks(1000) {
            let r = recheck(&ctx, part).await?;
            differences.extend(r.differences);
            unsettled.extend(r.unsettled);
        }
        if differences.len() >= opts.max_differences {
            differences.truncate(opts.max_differences);
            truncated = true;
            break;
        }
    }
    differences.sort_by_key(|d| d.sort_key());
    Ok(Outcome::Done(VerifyReport {
        equal: differences.is_empty() && unsettled.is_empty(),
        rows_source: agg.source.rows,
        rows_target: agg.target.rows,
        chunks: agg.source.chunks + agg.target.chunks,
        resumed: agg.resumed,
        differing_buckets: agg.differing_buckets().len(),
        candidates,
        keys_only: ctx.shape.keys_only,
        differences,
        unsettled,
        truncated,
        excluded_columns: ctx.shape.excluded.clone(),
        duration_ms: started.elapsed().as_millis() as u64,
    }))
}

/// Keys whose presence or hash differs between the two narrowed maps.
fn diff_maps(s: &HashMap<KeyText, i64>, t: &HashMap<KeyText, i64>) -> Vec<KeyText> {
    let mut keys: Vec<KeyText> = s
        .iter()
        .filter(|(k, h)| t.get(*k) != Some(h))
        .map(|(k, _)| k.clone())
        .collect();
    keys.extend(t.keys().filter(|k| !s.contains_key(*k)).cloned());
    keys.sort();
    keys
}

/// A JSON object of the key's columns, taken from whichever row is present (else the text).
fn key_object(
    names: &[String],
    key: &KeyText,
    row: Option<&serde_json::Value>,
) -> BTreeMap<String, serde_json::Value> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let v = row
                .and_then(|r| r.get(n).cloned())
                .unwrap_or_else(|| match key.get(i) {
                    Some(Some(s)) => serde_json::Value::String(s.clone()),
                    _ => serde_json::Value::Null,
                });
            (n.clone(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_maps_finds_each_kind() {
        let k = |s: &str| vec![Some(s.to_string())];
        let s: HashMap<KeyText, i64> = [(k("1"), 10), (k("2"), 20), (k("3"), 30)].into();
        let t: HashMap<KeyText, i64> = [(k("1"), 10), (k("2"), 21), (k("4"), 40)].into();
        assert_eq!(diff_maps(&s, &t), vec![k("2"), k("3"), k("4")]);
    }
}

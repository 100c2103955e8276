//! Operator controls of a running migration: `pause`, `resume`, `throttle`.
//!
//! Owns writing the controls into the migration's row in the target's state tables, which a
//! running `run` reads twice a second (like gh-ost's interactive commands). The gRPC control
//! API will sit behind these same functions. It must never touch data, the slot, or routing.

use crate::catalog;
use crate::spec::Spec;

/// A control could not be applied.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ControlError(pub String);

/// New limits for `throttle`; `None` leaves a limit as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Throttle {
    /// Rows per backfill chunk.
    pub chunk_rows: Option<u64>,
    /// Backfill workers (1 to [`crate::run::MAX_WORKERS`]).
    pub workers: Option<u32>,
    /// Pause the backfill while the slot holds more WAL than this.
    pub max_lag_bytes: Option<u64>,
    /// Pause the backfill while apply lags more than this.
    pub max_apply_lag_ms: Option<u64>,
}

async fn migration_client(spec: &Spec) -> Result<tokio_postgres::Client, ControlError> {
    let tgt = catalog::connect(&spec.target.url)
        .await
        .map_err(|e| ControlError(e.to_string()))?;
    let known = crate::state::exists(&tgt)
        .await
        .map_err(|e| ControlError(e.to_string()))?
        && tgt
            .query_opt(
                "SELECT 1 FROM shadowmig.migrations WHERE name = $1",
                &[&spec.name],
            )
            .await
            .map_err(|e| ControlError(catalog::db_message(&e)))?
            .is_some();
    if !known {
        return Err(ControlError(format!(
            "no migration named {:?} in the target database: start it with `shadowmig run SPEC`",
            spec.name
        )));
    }
    Ok(tgt)
}

/// Pauses (`true`) or resumes (`false`) the backfill; streaming goes on either way.
pub async fn set_paused(spec: &Spec, paused: bool) -> Result<String, ControlError> {
    let tgt = migration_client(spec).await?;
    tgt.execute(
        "UPDATE shadowmig.migrations SET paused = $2, updated_at = now() WHERE name = $1",
        &[&spec.name, &paused],
    )
    .await
    .map_err(|e| ControlError(catalog::db_message(&e)))?;
    Ok(if paused {
        format!(
            "backfill of {} paused (streaming continues); `shadowmig resume` to go on",
            spec.name
        )
    } else {
        format!("backfill of {} resumed", spec.name)
    })
}

/// Changes the running limits.
pub async fn throttle(spec: &Spec, t: &Throttle) -> Result<String, ControlError> {
    if *t == Throttle::default() {
        return Err(ControlError(
            "nothing to change: give --chunk-rows, --workers, --max-lag-bytes or --max-apply-lag-ms".into(),
        ));
    }
    let bad = |what: &str, range: &str| ControlError(format!("--{what} must be {range}"));
    let to_i64 = |v: u64, what: &str| {
        i64::try_from(v)
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| bad(what, "a positive integer"))
    };
    let chunk_rows = t.chunk_rows.map(|v| to_i64(v, "chunk-rows")).transpose()?;
    let max_lag = t
        .max_lag_bytes
        .map(|v| to_i64(v, "max-lag-bytes"))
        .transpose()?;
    let max_apply = t
        .max_apply_lag_ms
        .map(|v| to_i64(v, "max-apply-lag-ms"))
        .transpose()?;
    let workers = match t.workers {
        Some(w) if w == 0 || w as usize > crate::run::MAX_WORKERS => {
            return Err(bad(
                "workers",
                &format!("between 1 and {}", crate::run::MAX_WORKERS),
            ))
        }
        Some(w) => Some(w as i32),
        None => None,
    };
    let tgt = migration_client(spec).await?;
    tgt.execute(
        "UPDATE shadowmig.migrations SET chunk_rows = coalesce($2, chunk_rows), workers = coalesce($3, workers), \
         max_lag_bytes = coalesce($4, max_lag_bytes), max_apply_lag_ms = coalesce($5, max_apply_lag_ms), \
         updated_at = now() WHERE name = $1",
        &[&spec.name, &chunk_rows, &workers, &max_lag, &max_apply],
    )
    .await
    .map_err(|e| ControlError(catalog::db_message(&e)))?;
    let mut parts = Vec::new();
    if let Some(v) = chunk_rows {
        parts.push(format!("chunk_rows = {v}"));
    }
    if let Some(v) = workers {
        parts.push(format!("workers = {v}"));
    }
    if let Some(v) = max_lag {
        parts.push(format!("max_lag_bytes = {v}"));
    }
    if let Some(v) = max_apply {
        parts.push(format!("max_apply_lag_ms = {v}"));
    }
    Ok(format!("{}: {}", spec.name, parts.join(", ")))
}

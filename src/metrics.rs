//! Metric names (a contract: ARCHITECTURE §6, prefix `shadowmig_`) and the Prometheus
//! endpoint that exports them.
//!
//! Owns the names, their descriptions and units, and installing the exporter. Modules record
//! through the `metrics` macros with these names; this module must never compute a value.

use std::net::SocketAddr;

/// Rows the backfill has applied.
pub const ROWS_COPIED_TOTAL: &str = "shadowmig_rows_copied_total";
/// Source changes applied to the target.
pub const CHANGES_APPLIED_TOTAL: &str = "shadowmig_changes_applied_total";
/// WAL bytes between the source's position and what apply has confirmed.
pub const APPLY_LAG_BYTES: &str = "shadowmig_apply_lag_bytes";
/// Seconds the oldest unapplied change has waited.
pub const APPLY_LAG_SECONDS: &str = "shadowmig_apply_lag_seconds";
/// Changes per applied batch (histogram).
pub const BATCH_SIZE: &str = "shadowmig_batch_size";
/// Seconds to apply one batch in the target (histogram).
pub const APPLY_SECONDS: &str = "shadowmig_apply_seconds";
/// Replication lag of each committed batch (histogram): seconds from the source commit of the
/// batch's oldest streamed change to the batch's commit in the target.
pub const BATCH_LAG_SECONDS: &str = "shadowmig_batch_lag_seconds";
/// Rows found different by verification.
pub const MISMATCH_TOTAL: &str = "shadowmig_mismatch_total";
/// Rows checked by verification.
pub const CHECKED_TOTAL: &str = "shadowmig_checked_total";
/// Dark reads whose result differed between old and new.
pub const DARK_READ_MISMATCH_TOTAL: &str = "shadowmig_dark_read_mismatch_total";
/// Transactions routed, by route.
pub const ROUTED_TRANSACTIONS_TOTAL: &str = "shadowmig_routed_transactions_total";
/// Seconds writes were held at the write switch.
pub const WRITE_PAUSE_SECONDS: &str = "shadowmig_write_pause_seconds";
/// The cutover stage, as a number (0 source … 5 complete).
pub const STAGE: &str = "shadowmig_stage";

/// Installing the exporter failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}")]
pub struct MetricsError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why.
    pub reason: String,
}

/// Starts the Prometheus endpoint (`GET /metrics`) on `addr` and describes every metric.
/// Needs a running tokio runtime.
pub fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(BATCH_SIZE.into()),
            &[
                1.0, 10.0, 100.0, 1_000.0, 5_000.0, 10_000.0, 20_000.0, 50_000.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(APPLY_SECONDS.into()),
                &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(BATCH_LAG_SECONDS.into()),
                &[
                    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                    3600.0,
                ],
            )
        })
        .and_then(|b| b.install())
        .map_err(|e| MetricsError {
            addr,
            reason: e.to_string(),
        })?;
    describe();
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        ROWS_COPIED_TOTAL,
        Unit::Count,
        "rows the backfill has applied"
    );
    describe_counter!(
        CHANGES_APPLIED_TOTAL,
        Unit::Count,
        "source changes applied to the target"
    );
    describe_gauge!(
        APPLY_LAG_BYTES,
        Unit::Bytes,
        "WAL between the source's position and what apply confirmed"
    );
    describe_gauge!(
        APPLY_LAG_SECONDS,
        Unit::Seconds,
        "how long the oldest unapplied change has waited"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "changes per applied batch");
    describe_histogram!(
        APPLY_SECONDS,
        Unit::Seconds,
        "time to apply one batch in the target"
    );
    describe_histogram!(
        BATCH_LAG_SECONDS,
        Unit::Seconds,
        "per committed batch: from the source commit of its oldest change to its commit in the target"
    );
    describe_counter!(
        MISMATCH_TOTAL,
        Unit::Count,
        "rows found different by verification"
    );
    describe_counter!(CHECKED_TOTAL, Unit::Count, "rows checked by verification");
    describe_counter!(
        DARK_READ_MISMATCH_TOTAL,
        Unit::Count,
        "dark reads that differed"
    );
    describe_counter!(
        ROUTED_TRANSACTIONS_TOTAL,
        Unit::Count,
        "transactions routed, by route"
    );
    describe_histogram!(
        WRITE_PAUSE_SECONDS,
        Unit::Seconds,
        "how long writes were held at the write switch"
    );
    describe_gauge!(
        STAGE,
        "the cutover stage: 0 source, 1 dark-reads, 2 canary, 3 reads, 4 writes, 5 complete"
    );
}

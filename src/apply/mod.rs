//! Apply: the one writer of the shadow table.
//!
//! Owns turning source changes (streamed, or backfilled rows handed over as upserts) into set
//! operations on the target, exactly once: [`coalesce`] computes the net effect per key (pure),
//! [`sql`] generates the statements (pure), [`writer`] stages a batch with binary COPY and runs
//! the statements and the progress row in one target transaction.
//!
//! It must never write a guessed value for an unchanged-TOAST column (such keys are handed
//! back for a re-read), never commit data without its progress row, and never read the source.

pub mod bulk;
pub mod coalesce;
pub mod sql;
pub mod writer;

pub use coalesce::{coalesce, Change, CoalesceError, Coalesced, SourceChange};
pub use writer::{ApplyStats, ApplyWriter};

use crate::lsn::Lsn;

/// One column of the source table, in the source's attribute order (as in the `Relation`
/// message, so that tuple column `i` is `source_columns[i]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceColumn {
    /// Column name.
    pub name: String,
    /// Its type as `format_type(atttypid, atttypmod)` prints it (e.g. `numeric(12,2)`,
    /// `public.order_status`), valid in the target database.
    pub type_sql: String,
    /// True when the column belongs to the key changes are coalesced and matched by. Mark
    /// exactly the source columns the target key is computed from (the target key must be a
    /// function of these only; [`ApplyWriter::new`] checks it). They must be carried by every
    /// old tuple: with REPLICA IDENTITY DEFAULT or USING INDEX they must be among the identity
    /// columns (the `K` tuple holds nothing else); under FULL any columns qualify (the `O`
    /// tuple holds the whole row) — do not mark every column there, or every update becomes
    /// a delete plus an insert.
    pub is_identity: bool,
}

/// One column of the target table and how to compute it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetColumn {
    /// Column name in the target table.
    pub name: String,
    /// SQL expression over the source column names (quoted where needed), evaluated in the
    /// target. A same-named copy is the quoted source column name, see [`TargetColumn::copy`].
    pub expr: String,
}

impl TargetColumn {
    /// A target column that copies the same-named source column unchanged.
    pub fn copy(name: &str) -> TargetColumn {
        TargetColumn {
            name: name.to_string(),
            expr: sql::quote_ident(name),
        }
    }

    /// A target column computed by `expr`.
    pub fn expr(name: &str, expr: &str) -> TargetColumn {
        TargetColumn {
            name: name.to_string(),
            expr: expr.to_string(),
        }
    }
}

/// What apply writes into: the target table, the source's shape, and the transform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyTarget {
    /// Target table as (schema, name), unquoted.
    pub table: (String, String),
    /// Source columns, in tuple order.
    pub source_columns: Vec<SourceColumn>,
    /// Target columns written by apply, each with its expression.
    pub target_columns: Vec<TargetColumn>,
    /// Names of the target's key columns (its primary key or a unique index: the
    /// `ON CONFLICT` arbiter); each must be one of `target_columns`.
    pub target_key: Vec<String>,
}

/// Where a batch's progress is recorded: the `shadowmig.progress` row it updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressKey {
    /// The migration name.
    pub migration: String,
    /// The direction of the stream.
    pub direction: crate::state::Direction,
}

/// Applying a batch failed. The target transaction was rolled back (nothing of the batch and
/// no progress is visible), so the caller may retry the same batch.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The target description is unusable.
    #[error("invalid apply target: {0}")]
    InvalidTarget(String),
    /// The batch contradicts its own progress LSN or stream order.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// The changes could not be coalesced.
    #[error(transparent)]
    Coalesce(#[from] CoalesceError),
    /// A value is larger than binary COPY can carry.
    #[error("a column value of {0} bytes is too large for COPY")]
    ValueTooLarge(usize),
    /// The target database refused a statement.
    #[error("target database error during {during}: {source}")]
    Db {
        /// What apply was doing.
        during: &'static str,
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The progress row could not be written.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// A bulk chunk write on another connection failed.
    #[error("a backfill chunk write failed: {message}")]
    Bulk {
        /// What failed.
        message: String,
        /// The failure was a lost connection (retrying may succeed).
        connection_lost: bool,
    },
}

impl ApplyError {
    pub(crate) fn db(during: &'static str) -> impl FnOnce(tokio_postgres::Error) -> ApplyError {
        move |source| ApplyError::Db { during, source }
    }

    /// Whether the error is a lost connection (reconnecting and retrying may succeed).
    pub fn connection_lost(&self) -> bool {
        match self {
            ApplyError::Db { source, .. }
            | ApplyError::State(crate::state::StateError::Db { source, .. }) => {
                crate::catalog::connection_lost(source)
            }
            ApplyError::Bulk {
                connection_lost, ..
            } => *connection_lost,
            _ => false,
        }
    }
}

/// The changes of `changes` (in stream order) not yet applied, given the committed progress
/// LSN: those whose commit LSN is above it. A batch is applied as a whole with its last commit
/// LSN, so every change at or below the committed LSN is already in the target.
pub fn unapplied(changes: &[SourceChange], committed: Option<Lsn>) -> &[SourceChange] {
    match committed {
        None => changes,
        Some(done) => {
            let first = changes.partition_point(|c| c.lsn <= done);
            &changes[first..]
        }
    }
}

//! Placeholder: the relation cache is being written (issue 2, item 4).

/// A decoded row.
#[derive(Debug, Clone, Default)]
pub struct Row;

/// A tuple did not match its relation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("row error")]
pub struct RowError;

/// Cache of `Relation` messages by oid.
#[derive(Debug, Clone, Default)]
pub struct RelationCache;

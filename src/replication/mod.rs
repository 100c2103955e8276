//! The replication connection: a `replication=database` session on tokio.
//!
//! Being written (issue 2, item 3).

//! shadowmig restructures a live PostgreSQL table — new primary key, new partitioning, new
//! column shapes — with no downtime and no data loss. See `ARCHITECTURE.md` for the design.
//!
//! Module floors (imports point down, never up):
//! - ground: [`lsn`], [`pgoutput`], [`testpg`]
//! - engines: [`replication`]
//! - top: [`cli`]
#![warn(missing_docs)]

pub mod cli;
pub mod copy;
pub mod lsn;
pub mod pgoutput;
pub mod raw;
pub mod replication;
pub mod tail;
pub mod testpg;

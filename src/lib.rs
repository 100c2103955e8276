//! shadowmig restructures a live PostgreSQL table — new primary key, new partitioning, new
//! column shapes — with no downtime and no data loss. See `ARCHITECTURE.md` for the design.
//!
//! Module floors (imports point down, never up):
//! - ground: [`lsn`], [`pgoutput`], [`state`], [`testpg`]
//! - engines: [`apply`], [`replication`]
//! - top: [`cli`]
#![warn(missing_docs)]

pub mod apply;
pub mod cli;
pub mod lsn;
pub mod pgoutput;
pub mod replication;
pub mod state;
pub mod testpg;

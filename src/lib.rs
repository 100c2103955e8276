//! shadowmig restructures a live PostgreSQL table — new primary key, new partitioning, new
//! column shapes — with no downtime and no data loss. See `ARCHITECTURE.md` for the design.
//!
//! Module floors (imports point down, never up):
//! - ground: [`lsn`], [`pgoutput`], [`spec`], [`catalog`], [`testpg`]
//! - engines: [`replication`], [`plan`]
//! - top: [`cli`]
#![warn(missing_docs)]

pub mod catalog;
pub mod cli;
pub mod copy;
pub mod lsn;
pub mod pgoutput;
pub mod plan;
pub mod raw;
pub mod replication;
pub mod spec;
pub mod tail;
pub mod testpg;
pub mod verify;

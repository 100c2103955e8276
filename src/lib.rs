//! shadowmig restructures a live PostgreSQL table — new primary key, new partitioning, new
//! column shapes — with no downtime and no data loss. See `ARCHITECTURE.md` for the design.
//!
//! Module floors (imports point down, never up; ARCHITECTURE §1a):
//! - top: [`cli`] (and the binary's `main.rs`)
//! - orchestration: [`run`] (set-up, backfill and streaming wired together), [`control`]
//!   (pause/resume/throttle), [`abort`], [`status`]
//! - protocols: [`tail`]
//! - engines: [`replication`] (walsender client), [`copy`] (watermarked chunks), [`apply`]
//!   (coalesced set-based writer), [`verify`], [`sampler`], [`plan`]
//! - ground: [`pgoutput`] (sans-IO decoder), [`spec`], [`catalog`], [`state`], [`stages`],
//!   [`metrics`], [`raw`], [`lsn`], [`size`], [`failpoint`], [`testpg`] (throwaway clusters)
#![warn(missing_docs)]
pub mod abort;
pub mod apply;
pub mod catalog;
pub mod cli;
pub mod control;
pub mod copy;
pub mod failpoint;
pub mod lsn;
pub mod metrics;
pub mod pgoutput;
pub mod plan;
pub mod raw;
pub mod replication;
pub mod run;
pub mod sampler;
pub mod size;
pub mod spec;
pub mod stages;
pub mod state;
pub mod status;
pub mod tail;
pub mod testpg;
pub mod verify;

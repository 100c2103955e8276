//! The command-line contract (ARCHITECTURE §6): every subcommand and flag users and scripts
//! rely on. It owns parsing only; it must never do the work of a command.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// shadowmig: restructure a live PostgreSQL table with no downtime and no data loss.
#[derive(Debug, Parser)]
#[command(name = "shadowmig", version, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Human,
    /// One JSON object per event.
    Json,
}

/// A cutover stage an operator can move to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StageArg {
    /// Everything on the old table.
    Source,
    /// Reads mirrored to the new table and compared, never returned.
    DarkReads,
    /// A share of read-only transactions served by the new table.
    Canary,
    /// All reads from the new table.
    Reads,
    /// Reads and writes on the new table; reverse replication keeps the old one current.
    Writes,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Preflight checks and a runbook of every step with its rollback; changes nothing.
    Plan {
        /// The migration spec file (TOML).
        spec: PathBuf,
    },
    /// Set up, copy and stream; serves control and metrics; resumes after a restart.
    Run {
        /// The migration spec file (TOML).
        spec: PathBuf,
        /// Exit 0 once the backfill is done and every change so far is applied (for
        /// scripts and tests); by default `run` keeps streaming until stopped.
        #[arg(long)]
        exit_when_caught_up: bool,
    },
    /// Stage, copy progress, lag, mismatches, routing.
    Status {
        /// The migration spec file (TOML).
        spec: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Exact comparison of transform(source) with the target.
    Verify {
        /// The migration spec file (TOML).
        spec: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Compare keys only (presence), not row contents.
        #[arg(long)]
        keys_only: bool,
    },
    /// Print a table's decoded changes as JSON lines (for debugging CDC).
    Tail {
        /// Connection URL of the source database.
        #[arg(long)]
        url: String,
        /// The table, as `schema.name` or `name` (schema `public`).
        #[arg(long)]
        table: String,
        /// Use (or create, and keep) this replication slot; default: a temporary slot.
        #[arg(long)]
        slot: Option<String>,
        /// With --slot: skip what the slot holds and start from the current WAL position.
        #[arg(long)]
        from_now: bool,
    },
    /// Pause the backfill of a running `run`.
    Pause {
        /// The migration spec file (TOML).
        spec: PathBuf,
    },
    /// Resume the backfill of a running `run`.
    Resume {
        /// The migration spec file (TOML).
        spec: PathBuf,
    },
    /// Change limits of a running `run`.
    Throttle {
        /// The migration spec file (TOML).
        spec: PathBuf,
        /// Rows per backfill chunk.
        #[arg(long)]
        chunk_rows: Option<u64>,
        /// Backfill workers.
        #[arg(long)]
        workers: Option<u32>,
        /// Pause the backfill while the slot holds more WAL than this many bytes.
        #[arg(long)]
        max_lag_bytes: Option<u64>,
        /// Pause the backfill while apply lags more than this many milliseconds.
        #[arg(long)]
        max_apply_lag_ms: Option<u64>,
    },
    /// The routing proxy.
    Proxy {
        /// The migration spec file (TOML).
        spec: PathBuf,
    },
    /// Move traffic to a stage.
    Cutover {
        /// The migration spec file (TOML).
        spec: PathBuf,
        /// The stage to move to.
        #[arg(value_enum)]
        stage: StageArg,
        /// For dark-reads and canary: the share of reads, in percent.
        #[arg(long)]
        percent: Option<f64>,
    },
    /// Flip back one stage, or to STAGE.
    Rollback {
        /// The migration spec file (TOML).
        spec: PathBuf,
        /// The stage to return to.
        #[arg(long, value_enum)]
        to: Option<StageArg>,
    },
    /// Finish: the new table is the table; no rollback after this.
    Complete {
        /// The migration spec file (TOML).
        spec: PathBuf,
    },
    /// Undo everything; the old table is untouched.
    Abort {
        /// The migration spec file (TOML).
        spec: PathBuf,
    },
    /// The whole journey on a local throwaway cluster under live load.
    Demo,
    /// The benchmark suite against native baselines.
    Bench,
}

impl Command {
    /// The subcommand's name as typed.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Plan { .. } => "plan",
            Command::Run { .. } => "run",
            Command::Status { .. } => "status",
            Command::Verify { .. } => "verify",
            Command::Tail { .. } => "tail",
            Command::Pause { .. } => "pause",
            Command::Resume { .. } => "resume",
            Command::Throttle { .. } => "throttle",
            Command::Proxy { .. } => "proxy",
            Command::Cutover { .. } => "cutover",
            Command::Rollback { .. } => "rollback",
            Command::Complete { .. } => "complete",
            Command::Abort { .. } => "abort",
            Command::Demo => "demo",
            Command::Bench => "bench",
        }
    }
}

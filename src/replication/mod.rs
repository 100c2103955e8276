//! The replication connection: a `replication=database` session on tokio.
//!
//! Owns the wire protocol of a walsender session: TCP connect, startup with
//! `replication=database`, authentication (trust, cleartext, md5, SCRAM-SHA-256 without channel
//! binding), the simple query protocol, the replication commands (`IDENTIFY_SYSTEM`,
//! `CREATE_REPLICATION_SLOT … LOGICAL pgoutput`, `DROP_REPLICATION_SLOT`, `START_REPLICATION`)
//! and the CopyBoth logical stream with its keepalive replies and standby status updates.
//!
//! It must never decode pgoutput payloads (that is [`crate::pgoutput`]; the stream peeks only at
//! a payload's first byte and a commit's end LSN to know whether a transaction is open), never
//! report to the server an LSN as flushed that the caller did not confirm (except the idle rule
//! documented on [`LogicalStream`]), and never put a password or a full connection string into
//! an error or a log line. No TLS: connections are plain TCP (or a Unix socket).
//!
//! ```no_run
//! # async fn demo() -> Result<(), shadowmig::replication::ReplicationError> {
//! use futures_util::StreamExt;
//! use shadowmig::replication::*;
//! let mut client = ReplicationClient::connect("postgres://app@127.0.0.1:5432/shop").await?;
//! let slot = client.create_logical_slot("s1", false, SnapshotAction::Nothing).await?;
//! let opts = PgOutputOptions::new(1).publication("p");
//! let mut stream = client
//!     .start_logical("s1", slot.consistent_point, &opts, StreamConfig::default())
//!     .await?;
//! while let Some(ev) = stream.next().await {
//!     if let ReplicationEvent::XLogData { wal_end, .. } = ev? {
//!         stream.confirm(wal_end); // once durably applied downstream
//!     }
//! }
//! # Ok(()) }
//! ```

mod conn;
mod stream;

pub use conn::{CreatedSlot, ReplicationClient, SnapshotAction, SystemIdentity};
pub use stream::{
    ConfirmHandle, LogicalStream, PgOutputOptions, ReadStats, ReplicationEvent, StatusSnapshot,
    StreamConfig,
};

use std::fmt;

/// An error reported by the server (ErrorResponse), with its SQLSTATE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// Severity (`ERROR`, `FATAL`, `PANIC`), not localized.
    pub severity: String,
    /// The five-character SQLSTATE code, e.g. `42501`.
    pub code: String,
    /// The primary message.
    pub message: String,
    /// The optional detail.
    pub detail: Option<String>,
    /// The optional hint.
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (detail: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// What can go wrong on a replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The connection string or URL could not be used. Never contains the password.
    #[error("connection string: {0}")]
    Config(String),
    /// No TCP connection (or Unix socket) could be opened to any of the hosts.
    #[error("could not connect to {target}: {source}")]
    Connect {
        /// `host:port` (or the socket path) of the last attempt.
        target: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Connecting or authenticating took longer than `connect_timeout`.
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    /// Authentication could not be carried out on our side (unsupported method, no password).
    #[error("authentication: {0}")]
    Auth(String),
    /// The server answered with an ErrorResponse (wrong password, no privilege, bad command…).
    #[error("server error: {0}")]
    Server(ServerError),
    /// The server sent something that breaks the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The connection was closed or broke (server restart, `wal_sender_timeout`, network).
    /// Retry on a new connection from the last confirmed LSN.
    #[error("replication connection lost: {0}")]
    ConnectionLost(String),
    /// A slot or publication name that cannot be used.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The stream was already shut down or its tasks are gone.
    #[error("the replication stream is closed")]
    Closed,
}

impl ReplicationError {
    /// The SQLSTATE of a server error, if this is one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) => Some(&e.code),
            _ => None,
        }
    }

    /// True for the server's "not allowed" answers: `28000` (invalid authorization, e.g. no
    /// `pg_hba.conf` entry for replication), `28P01` (wrong password) and `42501`
    /// (insufficient privilege, e.g. a role without `REPLICATION`).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self.sqlstate(), Some("28000" | "28P01" | "42501"))
    }

    /// True when the connection broke and a reconnect may succeed.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, ReplicationError::ConnectionLost(_))
    }
}

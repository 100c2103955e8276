//! The messages of the pgoutput protocol (PostgreSQL docs, "Logical Replication Message
//! Formats"), as owned values. Column values are `Bytes` slices of the frame they came in,
//! so decoding copies no column data.

use bytes::Bytes;

use crate::lsn::Lsn;

/// PostgreSQL transaction id.
pub type Xid = u32;
/// PostgreSQL object id (relations, types).
pub type Oid = u32;
/// Microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's timestamp epoch.
pub type PgTimestamp = i64;

/// `Relation.replica_identity`: which old-row columns updates and deletes carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: nothing.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

/// One column of a `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnDesc {
    /// Bit 1 set: the column is part of the replica identity key.
    pub flags: u8,
    /// The column name.
    pub name: String,
    /// The column's type oid.
    pub type_oid: Oid,
    /// The column's type modifier (`atttypmod`).
    pub type_modifier: i32,
}

impl ColumnDesc {
    /// True when the column belongs to the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// A `Relation` message: the shape of a table, sent before its first change in each
/// walsender session and again after any DDL on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationBody {
    /// The table's oid, which later change messages refer to.
    pub oid: Oid,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Its replica identity setting.
    pub replica_identity: ReplicaIdentity,
    /// Its columns, in attribute order (dropped and generated columns omitted).
    pub columns: Vec<ColumnDesc>,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL — or, inside a `K` old-key tuple, "not a key column".
    Null,
    /// `u`: an out-of-line (TOASTed) value that did not change; no value is sent.
    UnchangedToast,
    /// `t`: the value in the type's text output form.
    Text(Bytes),
    /// `b`: the value in the type's binary send form (`binary 'true'`).
    Binary(Bytes),
}

/// The column values of one row, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData(pub Vec<TupleValue>);

/// Which old image an `Update` or `Delete` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: only the replica identity key columns hold values.
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// A decoded pgoutput message. `xid` fields are `Some` only for messages inside a
/// protocol-2 stream block (Stream Start … Stream Stop), where the xid follows the tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    /// `B`: a transaction starts.
    Begin {
        /// The LSN of the commit record (the transaction's final LSN).
        final_lsn: Lsn,
        /// Commit time.
        commit_ts: PgTimestamp,
        /// The transaction id.
        xid: Xid,
    },
    /// `C`: the transaction that began last commits.
    Commit {
        /// Currently unused flags.
        flags: u8,
        /// The LSN of the commit record.
        commit_lsn: Lsn,
        /// The end LSN of the transaction: what to confirm once it is durable downstream.
        end_lsn: Lsn,
        /// Commit time.
        commit_ts: PgTimestamp,
    },
    /// `O`: the transaction came from a replication origin.
    Origin {
        /// The commit LSN on the origin server.
        lsn: Lsn,
        /// The origin's name.
        name: String,
    },
    /// `R`: a table's shape.
    Relation {
        /// Set inside a stream block.
        xid: Option<Xid>,
        /// The relation.
        body: RelationBody,
    },
    /// `Y`: a non-built-in type (enum, domain) a following relation uses.
    Type {
        /// Set inside a stream block.
        xid: Option<Xid>,
        /// The type oid.
        oid: Oid,
        /// Schema name (empty for `pg_catalog`).
        namespace: String,
        /// Type name.
        name: String,
    },
    /// `I`: a row was inserted.
    Insert {
        /// Set inside a stream block.
        xid: Option<Xid>,
        /// The relation's oid.
        relation: Oid,
        /// The new row.
        new: TupleData,
    },
    /// `U`: a row was updated.
    Update {
        /// Set inside a stream block.
        xid: Option<Xid>,
        /// The relation's oid.
        relation: Oid,
        /// The old key (`K`, when the key changed) or old row (`O`, identity FULL).
        old: Option<(OldKind, TupleData)>,
        /// The new row, which may hold [`TupleValue::UnchangedToast`].
        new: TupleData,
    },
    /// `D`: a row was deleted.
    Delete {
        /// Set inside a stream block.
        xid: Option<Xid>,
        /// The relation's oid.
        relation: Oid,
        /// The old key or the old row.
        old: (OldKind, TupleData),
    },
    /// `T`: one or more tables were truncated.
    Truncate {
        /// Set inside a stream block.
        xid: Option<Xid>,
        /// Bit 1: CASCADE; bit 2: RESTART IDENTITY.
        flags: u8,
        /// The truncated relations.
        relations: Vec<Oid>,
    },
    /// `M`: a logical message from `pg_logical_emit_message`.
    Message {
        /// Set inside a stream block.
        xid: Option<Xid>,
        /// Whether it was emitted transactionally.
        transactional: bool,
        /// The LSN of the message.
        lsn: Lsn,
        /// The prefix.
        prefix: String,
        /// The content.
        content: Bytes,
    },
    /// `S`: a block of an in-progress transaction's changes begins.
    StreamStart {
        /// The streamed transaction.
        xid: Xid,
        /// True for the first block of this transaction.
        first_segment: bool,
    },
    /// `E`: the current stream block ends.
    StreamStop,
    /// `c`: a streamed transaction committed.
    StreamCommit {
        /// The transaction.
        xid: Xid,
        /// Currently unused flags.
        flags: u8,
        /// The LSN of the commit record.
        commit_lsn: Lsn,
        /// The end LSN of the transaction.
        end_lsn: Lsn,
        /// Commit time.
        commit_ts: PgTimestamp,
    },
    /// `A`: a streamed transaction, or one of its subtransactions, aborted.
    StreamAbort {
        /// The top-level transaction.
        xid: Xid,
        /// The aborted subtransaction (equal to `xid` when the whole transaction aborted).
        subxid: Xid,
    },
}

impl LogicalMessage {
    /// The one-letter tag of this message kind, as on the wire.
    pub fn tag(&self) -> char {
        match self {
            LogicalMessage::Begin { .. } => 'B',
            LogicalMessage::Commit { .. } => 'C',
            LogicalMessage::Origin { .. } => 'O',
            LogicalMessage::Relation { .. } => 'R',
            LogicalMessage::Type { .. } => 'Y',
            LogicalMessage::Insert { .. } => 'I',
            LogicalMessage::Update { .. } => 'U',
            LogicalMessage::Delete { .. } => 'D',
            LogicalMessage::Truncate { .. } => 'T',
            LogicalMessage::Message { .. } => 'M',
            LogicalMessage::StreamStart { .. } => 'S',
            LogicalMessage::StreamStop => 'E',
            LogicalMessage::StreamCommit { .. } => 'c',
            LogicalMessage::StreamAbort { .. } => 'A',
        }
    }
}

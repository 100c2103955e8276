//! The pgoutput decoder: bytes of PostgreSQL's logical replication protocol in, messages out.
//!
//! Owns the message types ([`LogicalMessage`]), the decoder for protocol versions 1 and 2
//! (`decoder`), the relation cache that turns tuples into named, typed rows (`relcache`),
//! and the rendering of binary-format values to PostgreSQL's text form (`binary`). It is
//! sans-IO: it must never import tokio, open a connection, or allocate unboundedly from a
//! length read off the wire, and it must never panic on any input: bad bytes are an error
//! naming the message kind and the offset.
//!
//! # Use
//! ```
//! use bytes::Bytes;
//! use shadowmig::pgoutput::{Decoder, LogicalMessage, RelationCache, RowChange};
//!
//! let mut decoder = Decoder::new(2); // the proto_version given to START_REPLICATION
//! let mut cache = RelationCache::new();
//! # let frames: Vec<Bytes> = vec![];
//! for frame in frames {             // each XLogData payload
//!     let msg = decoder.decode(&frame)?;
//!     cache.observe(&msg);          // keeps Relation and Type messages
//!     if let Some(RowChange::Update { old, new }) = cache.change(&msg)? {
//!         let _values = new.to_json()?;          // name -> text form, NULL -> null
//!         let _keep = new.unchanged_toast();     // columns whose value was not sent
//!         let _old_key = old.map(|o| o.to_json()); // K: key columns only
//!     }
//! }
//! // On reconnect: decoder.reset(); cache.clear();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What the decoder guarantees
//! - One frame in, one message out, for the tags of protocol 1 (`B C O R Y I U D T M`) and 2
//!   (`S E c A`, refused by a version-1 decoder). An unknown tag, a truncated field, a length
//!   that overruns the frame, an unknown tuple column kind, a nested Stream Start, a Stream
//!   Stop outside a block, or bytes left over after the message are errors
//!   ([`DecodeError`]); the decoder's stream state changes only on success.
//! - Column values and message contents are zero-copy [`bytes::Bytes`] slices of the frame.
//! - Counts read off the wire (columns, relation ids, array elements) are checked against
//!   the bytes that remain before anything is allocated for them.
//! - Timestamps are PostgreSQL's: microseconds since 2000-01-01 00:00:00 UTC.
//!
//! # Facts of the protocol the captured fixtures pin down (PostgreSQL 15)
//! - Inside a stream block the xid after the tag is that of the **subtransaction** that made
//!   the change (Relation, Insert, Update, Delete, Truncate), not necessarily the streamed
//!   top-level xid of the Stream Start; logical messages carry the top-level xid. A Stream
//!   Abort `(xid, subxid)` with `subxid != xid` discards the changes tagged `subxid`; with
//!   `subxid == xid` the whole transaction. After `ROLLBACK TO SAVEPOINT` the savepoint stays
//!   open, so later changes carry a new subxid that commits with the transaction.
//! - A `K` old-key tuple lists every column, the non-key ones as `n` (not NULLs):
//!   [`Row`]s built from it hold only the key columns. With `REPLICA IDENTITY FULL` every
//!   column is flagged as a key column, and updates and deletes send `O` instead.
//! - An update that leaves an out-of-line value alone sends it as `u`: [`Row::to_json`]
//!   leaves such columns out and [`Row::unchanged_toast`] lists them.
//! - A non-transactional logical message arrives on its own, outside Begin … Commit.
//! - A Type message precedes the Relation of a table with a column of a non-built-in type,
//!   one per type (an enum and its array type each get one).

pub mod binary;
pub mod decoder;
pub mod relcache;
pub mod types;

pub use binary::{BinaryError, UserType};
pub use decoder::{DecodeError, Decoder};
pub use relcache::{Relation, RelationCache, Rendered, Row, RowChange, RowError, TypeInfo};
pub use types::*;

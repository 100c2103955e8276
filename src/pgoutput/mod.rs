//! The pgoutput decoder: bytes of PostgreSQL's logical replication protocol in, messages out.
//!
//! Owns the message types ([`LogicalMessage`]), the decoder for protocol versions 1 and 2
//! (`decoder`), and the relation cache that turns tuples into named, typed rows
//! (`relcache`). It is sans-IO: it must never import tokio, open a connection, or
//! allocate unboundedly from a length read off the wire, and it must never panic on any
//! input: bad bytes are an error naming the message kind and the offset.

pub mod binary;
pub mod decoder;
pub mod relcache;
pub mod types;

pub use binary::{BinaryError, UserType};
pub use decoder::{DecodeError, Decoder};
pub use relcache::{Relation, RelationCache, Rendered, Row, RowChange, RowError, TypeInfo};
pub use types::*;

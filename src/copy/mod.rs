//! The backfill: fills the shadow table with the source's history in key-ordered chunks
//! between watermarks (ARCHITECTURE §2, after DBLog).
//!
//! Owns reading chunks ([`chunk`]) and deciding which copied rows are still current when
//! the stream reaches a chunk's high watermark. It must never write the target itself (it
//! hands rows to apply through the stream position), never hold a snapshot longer than one
//! chunk, and never lock source rows.

pub mod chunk;
pub mod fast;
pub mod watermark;

pub use chunk::{emit_watermark, Chunk, CopyError, CopySource, KeyValue, Snapshot, MAX_READ_KEYS};
pub use fast::{TargetRows, TransformedSource};
pub use watermark::{AtHigh, HighOutcome, ReadBook, WatermarkTracker};

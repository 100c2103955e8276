//! Placeholder: the pgoutput decoder is being written (issue 2, item 4).

use bytes::Bytes;

use super::types::LogicalMessage;

/// A frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not form a valid message of the named kind.
    #[error("malformed {kind} message at offset {offset}: {what}")]
    Malformed {
        /// The message kind, e.g. "Insert".
        kind: &'static str,
        /// Byte offset in the frame where decoding failed.
        offset: usize,
        /// What was wrong.
        what: String,
    },
}

/// Decodes pgoutput frames; tracks whether it is inside a protocol-2 stream block.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    /// The negotiated `proto_version`.
    pub proto_version: u32,
    in_stream: bool,
}

impl Decoder {
    /// A decoder for the given protocol version (1 or 2).
    pub fn new(proto_version: u32) -> Self {
        Decoder {
            proto_version,
            in_stream: false,
        }
    }

    /// Decodes one frame.
    pub fn decode(&mut self, _data: &Bytes) -> Result<LogicalMessage, DecodeError> {
        let _ = self.in_stream;
        Err(DecodeError::Malformed {
            kind: "any",
            offset: 0,
            what: "decoder not written yet".into(),
        })
    }
}

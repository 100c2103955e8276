//! The pgoutput frame decoder: one XLogData payload in, one [`LogicalMessage`] out.
//!
//! Owns the byte layout of protocol versions 1 and 2 exactly as PostgreSQL 15 writes it
//! (`src/backend/replication/logical/proto.c`) and the one piece of state that layout needs:
//! whether the decoder is inside a Stream Start … Stream Stop block, where `R`, `Y`, `I`, `U`,
//! `D`, `T` and `M` carry the streamed transaction's xid right after their tag.
//!
//! It must never panic on any input, never allocate from a length read off the wire before
//! checking that length against the bytes that remain, and never copy column data: tuple
//! values and message contents are [`Bytes::slice`]s of the frame.

use bytes::Bytes;

use super::types::{
    ColumnDesc, LogicalMessage, OldKind, RelationBody, ReplicaIdentity, TupleData, TupleValue,
};
use crate::lsn::Lsn;

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
    /// The first byte of the frame is not a tag of protocol version 1 or 2.
    #[error("unknown pgoutput message tag {tag:?} (0x{byte:02x}) at offset 0")]
    UnknownTag {
        /// The tag byte as a character (for printing).
        tag: char,
        /// The raw tag byte.
        byte: u8,
    },
    /// The frame was empty: no tag at all.
    #[error("empty pgoutput frame (offset 0): no message tag")]
    Empty,
}

impl DecodeError {
    /// The message kind the error is about ("Insert", "Relation", …; "unknown" for an
    /// unknown tag, "frame" for an empty frame).
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Malformed { kind, .. } => kind,
            DecodeError::UnknownTag { .. } => "unknown",
            DecodeError::Empty => "frame",
        }
    }

    /// The byte offset in the frame where decoding failed.
    pub fn offset(&self) -> usize {
        match self {
            DecodeError::Malformed { offset, .. } => *offset,
            DecodeError::UnknownTag { .. } | DecodeError::Empty => 0,
        }
    }
}

/// Decodes pgoutput frames; tracks whether it is inside a protocol-2 stream block.
///
/// One decoder per replication connection: call [`Decoder::reset`] on reconnect, since a
/// stream block cut by a disconnect never sees its Stream Stop.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    /// The negotiated `proto_version`.
    pub proto_version: u32,
    in_stream: bool,
}

impl Decoder {
    /// A decoder for the given protocol version (1 or 2). With version 1 the stream messages
    /// (`S`, `E`, `c`, `A`) are rejected, since a version-1 server never sends them.
    pub fn new(proto_version: u32) -> Self {
        Decoder {
            proto_version,
            in_stream: false,
        }
    }

    /// True between a Stream Start and its Stream Stop.
    pub fn in_stream(&self) -> bool {
        self.in_stream
    }

    /// Forgets stream state (call on reconnect).
    pub fn reset(&mut self) {
        self.in_stream = false;
    }

    /// Decodes one frame (the payload of one XLogData message). The stream state changes
    /// only when the frame decodes successfully.
    pub fn decode(&mut self, data: &Bytes) -> Result<LogicalMessage, DecodeError> {
        let tag = *data.first().ok_or(DecodeError::Empty)?;
        let kind = kind_name(tag).ok_or(DecodeError::UnknownTag {
            tag: char::from(tag),
            byte: tag,
        })?;
        let mut r = Reader { data, pos: 1, kind };
        let streamed = matches!(tag, b'S' | b'E' | b'c' | b'A');
        if streamed && self.proto_version < 2 {
            return Err(r.err("stream messages need proto_version 2"));
        }
        let msg = match tag {
            b'B' => LogicalMessage::Begin {
                final_lsn: Lsn(r.u64()?),
                commit_ts: r.i64()?,
                xid: r.u32()?,
            },
            b'C' => LogicalMessage::Commit {
                flags: r.u8()?,
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_ts: r.i64()?,
            },
            b'O' => LogicalMessage::Origin {
                lsn: Lsn(r.u64()?),
                name: r.cstr()?,
            },
            b'R' => {
                let xid = self.stream_xid(&mut r)?;
                LogicalMessage::Relation {
                    xid,
                    body: r.relation()?,
                }
            }
            b'Y' => {
                let xid = self.stream_xid(&mut r)?;
                LogicalMessage::Type {
                    xid,
                    oid: r.u32()?,
                    namespace: r.cstr()?,
                    name: r.cstr()?,
                }
            }
            b'I' => {
                let xid = self.stream_xid(&mut r)?;
                let relation = r.u32()?;
                r.expect_tag(b'N', "'N' (new tuple)")?;
                LogicalMessage::Insert {
                    xid,
                    relation,
                    new: r.tuple()?,
                }
            }
            b'U' => {
                let xid = self.stream_xid(&mut r)?;
                let relation = r.u32()?;
                let at = r.pos;
                let old = match r.u8()? {
                    b'K' => Some((OldKind::Key, r.tuple()?)),
                    b'O' => Some((OldKind::Full, r.tuple()?)),
                    b'N' => None,
                    other => {
                        return Err(
                            r.err_at(at, format!("expected 'K', 'O' or 'N', found 0x{other:02x}"))
                        )
                    }
                };
                if old.is_some() {
                    r.expect_tag(b'N', "'N' (new tuple) after the old tuple")?;
                }
                LogicalMessage::Update {
                    xid,
                    relation,
                    old,
                    new: r.tuple()?,
                }
            }
            b'D' => {
                let xid = self.stream_xid(&mut r)?;
                let relation = r.u32()?;
                let at = r.pos;
                let kind = match r.u8()? {
                    b'K' => OldKind::Key,
                    b'O' => OldKind::Full,
                    other => {
                        return Err(
                            r.err_at(at, format!("expected 'K' or 'O', found 0x{other:02x}"))
                        )
                    }
                };
                LogicalMessage::Delete {
                    xid,
                    relation,
                    old: (kind, r.tuple()?),
                }
            }
            b'T' => {
                let xid = self.stream_xid(&mut r)?;
                let at = r.pos;
                let n = r.u32()? as usize;
                let flags = r.u8()?;
                // Bound the allocation by what the frame can hold: 4 bytes per relation id.
                if n > r.remaining() / 4 {
                    return Err(r.err_at(
                        at,
                        format!(
                            "{n} relation ids announced but only {} bytes remain",
                            r.remaining()
                        ),
                    ));
                }
                let mut relations = Vec::with_capacity(n);
                for _ in 0..n {
                    relations.push(r.u32()?);
                }
                LogicalMessage::Truncate {
                    xid,
                    flags,
                    relations,
                }
            }
            b'M' => {
                let xid = self.stream_xid(&mut r)?;
                let flags = r.u8()?;
                let lsn = Lsn(r.u64()?);
                let prefix = r.cstr()?;
                let at = r.pos;
                let len = r.u32()? as usize;
                let content = r.bytes(len, at)?;
                LogicalMessage::Message {
                    xid,
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content,
                }
            }
            b'S' => {
                if self.in_stream {
                    return Err(r.err("Stream Start inside an open stream block"));
                }
                let xid = r.u32()?;
                let at = r.pos;
                let first_segment = match r.u8()? {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(
                            r.err_at(at, format!("first-segment flag is {other}, not 0 or 1"))
                        )
                    }
                };
                LogicalMessage::StreamStart { xid, first_segment }
            }
            b'E' => {
                if !self.in_stream {
                    return Err(r.err("Stream Stop outside a stream block"));
                }
                LogicalMessage::StreamStop
            }
            b'c' => LogicalMessage::StreamCommit {
                xid: r.u32()?,
                flags: r.u8()?,
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_ts: r.i64()?,
            },
            b'A' => LogicalMessage::StreamAbort {
                xid: r.u32()?,
                subxid: r.u32()?,
            },
            // kind_name accepted the tag, so every tag it knows is matched above.
            _ => {
                return Err(DecodeError::UnknownTag {
                    tag: char::from(tag),
                    byte: tag,
                })
            }
        };
        if r.remaining() != 0 {
            return Err(r.err(format!(
                "{} trailing bytes after the message",
                r.remaining()
            )));
        }
        match tag {
            b'S' => self.in_stream = true,
            b'E' => self.in_stream = false,
            _ => {}
        }
        Ok(msg)
    }

    fn stream_xid(&self, r: &mut Reader<'_>) -> Result<Option<u32>, DecodeError> {
        if self.in_stream {
            Ok(Some(r.u32()?))
        } else {
            Ok(None)
        }
    }
}

/// The human name of a protocol 1/2 message tag, `None` for anything else.
pub fn kind_name(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        b'M' => "Message",
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        _ => return None,
    })
}

/// A bounds-checked cursor over one frame; every read names the message kind and offset
/// when it fails.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    kind: &'static str,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn err(&self, what: impl Into<String>) -> DecodeError {
        self.err_at(self.pos, what)
    }

    fn err_at(&self, offset: usize, what: impl Into<String>) -> DecodeError {
        DecodeError::Malformed {
            kind: self.kind,
            offset,
            what: what.into(),
        }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let end = self.pos.checked_add(N).filter(|&e| e <= self.data.len());
        match end.and_then(|e| self.data.get(self.pos..e)) {
            Some(s) => {
                let mut out = [0u8; N];
                out.copy_from_slice(s);
                self.pos += N;
                Ok(out)
            }
            None => Err(self.err(format!(
                "truncated: need {N} bytes, {} remain",
                self.remaining()
            ))),
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take()?))
    }

    fn expect_tag(&mut self, want: u8, what: &str) -> Result<(), DecodeError> {
        let at = self.pos;
        let got = self.u8()?;
        if got == want {
            Ok(())
        } else {
            Err(self.err_at(at, format!("expected {what}, found 0x{got:02x}")))
        }
    }

    /// A NUL-terminated string; PostgreSQL sends names in the server encoding, which we
    /// require to be UTF-8.
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(self.err("unterminated string (no NUL before the end of the frame)"));
        };
        let s = std::str::from_utf8(&rest[..nul])
            .map_err(|e| self.err(format!("string is not UTF-8: {e}")))?
            .to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    /// `len` bytes as a zero-copy slice of the frame; `at` is where the length was read.
    fn bytes(&mut self, len: usize, at: usize) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(self.err_at(
                at,
                format!(
                    "length {len} exceeds the {} bytes that remain",
                    self.remaining()
                ),
            ));
        }
        let out = self.data.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    fn relation(&mut self) -> Result<RelationBody, DecodeError> {
        let oid = self.u32()?;
        let namespace = self.cstr()?;
        let name = self.cstr()?;
        let at = self.pos;
        let replica_identity = match self.u8()? {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            other => return Err(self.err_at(at, format!("unknown replica identity 0x{other:02x}"))),
        };
        let at = self.pos;
        let natts = self.i16()?;
        // Each column takes at least 10 bytes (flags, empty name's NUL, type oid, typmod).
        let natts = usize::try_from(natts)
            .ok()
            .filter(|&n| n <= self.remaining() / 10)
            .ok_or_else(|| {
                self.err_at(
                    at,
                    format!(
                        "column count {natts} does not fit the {} bytes that remain",
                        self.remaining()
                    ),
                )
            })?;
        let mut columns = Vec::with_capacity(natts);
        for _ in 0..natts {
            columns.push(ColumnDesc {
                flags: self.u8()?,
                name: self.cstr()?,
                type_oid: self.u32()?,
                type_modifier: self.i32()?,
            });
        }
        Ok(RelationBody {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let at = self.pos;
        let natts = self.i16()?;
        // Each column takes at least its one kind byte.
        let natts = usize::try_from(natts)
            .ok()
            .filter(|&n| n <= self.remaining())
            .ok_or_else(|| {
                self.err_at(
                    at,
                    format!(
                        "tuple column count {natts} does not fit the {} bytes that remain",
                        self.remaining()
                    ),
                )
            })?;
        let mut values = Vec::with_capacity(natts);
        for _ in 0..natts {
            let at = self.pos;
            let v = match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => TupleValue::Text(self.value()?),
                b'b' => TupleValue::Binary(self.value()?),
                other => {
                    return Err(self.err_at(
                        at,
                        format!("unknown tuple column kind 0x{other:02x} (expected n, u, t or b)"),
                    ))
                }
            };
            values.push(v);
        }
        Ok(TupleData(values))
    }

    fn value(&mut self) -> Result<Bytes, DecodeError> {
        let at = self.pos;
        let len = self.i32()?;
        let len = usize::try_from(len)
            .map_err(|_| self.err_at(at, format!("negative column value length {len}")))?;
        self.bytes(len, at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(parts: &[&[u8]]) -> Bytes {
        Bytes::from(parts.concat())
    }

    #[test]
    fn begin_and_commit() {
        let mut d = Decoder::new(1);
        let b = frame(&[
            b"B",
            &0x16_B374_D848u64.to_be_bytes(),
            &5i64.to_be_bytes(),
            &77u32.to_be_bytes(),
        ]);
        assert_eq!(
            d.decode(&b).unwrap(),
            LogicalMessage::Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_ts: 5,
                xid: 77
            }
        );
        let c = frame(&[
            b"C",
            &[0],
            &1u64.to_be_bytes(),
            &2u64.to_be_bytes(),
            &(-3i64).to_be_bytes(),
        ]);
        assert_eq!(
            d.decode(&c).unwrap(),
            LogicalMessage::Commit {
                flags: 0,
                commit_lsn: Lsn(1),
                end_lsn: Lsn(2),
                commit_ts: -3
            }
        );
    }

    #[test]
    fn insert_values_are_slices_of_the_frame() {
        let mut d = Decoder::new(1);
        let f = frame(&[
            b"I",
            &16384u32.to_be_bytes(),
            b"N",
            &3i16.to_be_bytes(),
            b"t",
            &2i32.to_be_bytes(),
            b"42",
            b"n",
            b"b",
            &1i32.to_be_bytes(),
            &[1],
        ]);
        let LogicalMessage::Insert { xid, relation, new } = d.decode(&f).unwrap() else {
            panic!("not an insert")
        };
        assert_eq!((xid, relation), (None, 16384));
        assert_eq!(new.0[1], TupleValue::Null);
        let TupleValue::Text(t) = &new.0[0] else {
            panic!()
        };
        assert_eq!(&t[..], b"42");
        // Zero-copy: the value points into the frame's buffer.
        let frame_range = f.as_ptr() as usize..f.as_ptr() as usize + f.len();
        assert!(frame_range.contains(&(t.as_ptr() as usize)));
    }

    #[test]
    fn stream_block_adds_xid_and_is_tracked() {
        let mut d = Decoder::new(2);
        let insert = frame(&[
            b"I",
            &900u32.to_be_bytes(),
            &16384u32.to_be_bytes(),
            b"N",
            &0i16.to_be_bytes(),
        ]);
        // Outside a block the same bytes mean relation 900 and then garbage.
        assert!(d.decode(&insert).is_err());
        d.decode(&frame(&[b"S", &900u32.to_be_bytes(), &[1]]))
            .unwrap();
        assert!(d.in_stream());
        assert_eq!(
            d.decode(&insert).unwrap(),
            LogicalMessage::Insert {
                xid: Some(900),
                relation: 16384,
                new: TupleData(vec![])
            }
        );
        // Nested Stream Start is refused and does not change state.
        assert!(d
            .decode(&frame(&[b"S", &1u32.to_be_bytes(), &[0]]))
            .is_err());
        assert_eq!(
            d.decode(&frame(&[b"E"])).unwrap(),
            LogicalMessage::StreamStop
        );
        assert!(!d.in_stream());
        assert!(d.decode(&frame(&[b"E"])).is_err());
        d.decode(&frame(&[b"S", &900u32.to_be_bytes(), &[0]]))
            .unwrap();
        d.reset();
        assert!(!d.in_stream());
    }

    #[test]
    fn proto_1_refuses_stream_messages() {
        let mut d = Decoder::new(1);
        let e = d
            .decode(&frame(&[b"S", &1u32.to_be_bytes(), &[1]]))
            .unwrap_err();
        assert_eq!(e.kind(), "Stream Start");
    }

    #[test]
    fn errors_name_kind_and_offset() {
        let mut d = Decoder::new(2);
        assert_eq!(d.decode(&Bytes::new()).unwrap_err(), DecodeError::Empty);
        let e = d.decode(&frame(&[b"Z"])).unwrap_err();
        assert!(e.to_string().contains("'Z'"), "{e}");
        // Insert with a text value claiming 1000 bytes.
        let f = frame(&[
            b"I",
            &1u32.to_be_bytes(),
            b"N",
            &1i16.to_be_bytes(),
            b"t",
            &1000i32.to_be_bytes(),
            b"ab",
        ]);
        let e = d.decode(&f).unwrap_err();
        assert_eq!((e.kind(), e.offset()), ("Insert", 9));
        assert!(e.to_string().contains("length 1000"), "{e}");
        // Huge column count must not allocate.
        let f = frame(&[b"I", &1u32.to_be_bytes(), b"N", &i16::MAX.to_be_bytes()]);
        assert_eq!(d.decode(&f).unwrap_err().offset(), 6);
        let f = frame(&[b"T", &u32::MAX.to_be_bytes(), &[0]]);
        assert_eq!(d.decode(&f).unwrap_err().kind(), "Truncate");
        // Trailing garbage is an error, not ignored.
        let f = frame(&[b"A", &1u32.to_be_bytes(), &1u32.to_be_bytes(), &[0]]);
        let e = d.decode(&f).unwrap_err();
        assert_eq!((e.kind(), e.offset()), ("Stream Abort", 9));
    }

    #[test]
    fn update_with_old_key_and_delete_full() {
        let mut d = Decoder::new(1);
        let tuple1: &[u8] = &[0, 1, b't', 0, 0, 0, 1, b'7'];
        let f = frame(&[b"U", &5u32.to_be_bytes(), b"K", tuple1, b"N", tuple1]);
        let LogicalMessage::Update {
            old: Some((OldKind::Key, old)),
            new,
            ..
        } = d.decode(&f).unwrap()
        else {
            panic!()
        };
        assert_eq!(old, new);
        let f = frame(&[b"D", &5u32.to_be_bytes(), b"O", tuple1]);
        assert!(matches!(
            d.decode(&f).unwrap(),
            LogicalMessage::Delete {
                old: (OldKind::Full, _),
                ..
            }
        ));
        let f = frame(&[b"D", &5u32.to_be_bytes(), b"N", tuple1]);
        assert_eq!(d.decode(&f).unwrap_err().offset(), 5);
    }
}

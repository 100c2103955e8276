//! Spill files: an on-disk queue of changes for a source transaction too large to hold in
//! memory until its commit.
//!
//! Owns the file format (a private, versionless framing: the file lives only as long as one
//! transaction in one process) and reading it back in order. It must never interpret the
//! column bytes, and never outlive the process (the file is an unnamed temporary file).

use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};

use bytes::Bytes;

use crate::apply::Change;
use crate::pgoutput::{OldKind, TupleData, TupleValue};

/// Writing or reading a spill file failed.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    /// The file system failed (disk full, …).
    #[error("spill file: {0}")]
    Io(#[from] std::io::Error),
    /// The file does not hold what we wrote (it cannot happen short of disk corruption).
    #[error("spill file is corrupt: {0}")]
    Corrupt(&'static str),
}

/// Changes appended in order, then read back in the same order.
#[derive(Debug)]
pub struct Spill {
    out: BufWriter<std::fs::File>,
    len: u64,
}

impl Spill {
    /// A new, empty spill file in the system's temp directory.
    pub fn new() -> Result<Spill, SpillError> {
        Ok(Spill {
            out: BufWriter::with_capacity(1 << 20, tempfile::tempfile()?),
            len: 0,
        })
    }

    /// How many changes it holds.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when it holds no change.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one change.
    pub fn push(&mut self, change: &Change) -> Result<(), SpillError> {
        let w = &mut self.out;
        match change {
            Change::Upsert { new } => {
                w.write_all(&[0])?;
                write_tuple(w, new)?;
            }
            Change::Delete { old } => {
                w.write_all(&[1])?;
                write_tuple(w, old)?;
            }
            Change::KeyChange { old, old_kind, new } => {
                w.write_all(&[2, if *old_kind == OldKind::Key { 0 } else { 1 }])?;
                write_tuple(w, old)?;
                write_tuple(w, new)?;
            }
        }
        self.len += 1;
        Ok(())
    }

    /// Finishes writing and returns a reader over the changes in the order they were pushed.
    pub fn into_reader(self) -> Result<SpillReader, SpillError> {
        let mut f = self
            .out
            .into_inner()
            .map_err(|e| SpillError::Io(e.into_error()))?;
        f.seek(SeekFrom::Start(0))?;
        Ok(SpillReader {
            input: BufReader::with_capacity(1 << 20, f),
            left: self.len,
        })
    }
}

fn write_tuple(w: &mut impl Write, t: &TupleData) -> Result<(), SpillError> {
    let n = u16::try_from(t.0.len()).map_err(|_| SpillError::Corrupt("more than 65535 columns"))?;
    w.write_all(&n.to_be_bytes())?;
    for v in &t.0 {
        match v {
            TupleValue::Null => w.write_all(b"n")?,
            TupleValue::UnchangedToast => w.write_all(b"u")?,
            TupleValue::Text(b) | TupleValue::Binary(b) => {
                w.write_all(if matches!(v, TupleValue::Text(_)) {
                    b"t"
                } else {
                    b"b"
                })?;
                let len =
                    u32::try_from(b.len()).map_err(|_| SpillError::Corrupt("value over 4 GiB"))?;
                w.write_all(&len.to_be_bytes())?;
                w.write_all(b)?;
            }
        }
    }
    Ok(())
}

/// Reads a spill file's changes back, in order.
#[derive(Debug)]
pub struct SpillReader {
    input: BufReader<std::fs::File>,
    left: u64,
}

impl SpillReader {
    /// Up to `n` next changes (fewer at the end; empty when done).
    pub fn next_batch(&mut self, n: usize) -> Result<Vec<Change>, SpillError> {
        let mut out = Vec::new();
        while self.left > 0 && out.len() < n {
            out.push(self.read_change()?);
            self.left -= 1;
        }
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, SpillError> {
        let mut b = [0u8; 1];
        self.input.read_exact(&mut b)?;
        Ok(b[0])
    }

    fn read_change(&mut self) -> Result<Change, SpillError> {
        Ok(match self.byte()? {
            0 => Change::Upsert {
                new: self.read_tuple()?,
            },
            1 => Change::Delete {
                old: self.read_tuple()?,
            },
            2 => {
                let old_kind = if self.byte()? == 0 {
                    OldKind::Key
                } else {
                    OldKind::Full
                };
                let old = self.read_tuple()?;
                Change::KeyChange {
                    old,
                    old_kind,
                    new: self.read_tuple()?,
                }
            }
            _ => return Err(SpillError::Corrupt("unknown change kind")),
        })
    }

    fn read_tuple(&mut self) -> Result<TupleData, SpillError> {
        let mut n = [0u8; 2];
        self.input.read_exact(&mut n)?;
        let n = u16::from_be_bytes(n) as usize;
        let mut vals = Vec::with_capacity(n);
        for _ in 0..n {
            vals.push(match self.byte()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                tag @ (b't' | b'b') => {
                    let mut len = [0u8; 4];
                    self.input.read_exact(&mut len)?;
                    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
                    self.input.read_exact(&mut buf)?;
                    let b = Bytes::from(buf);
                    if tag == b't' {
                        TupleValue::Text(b)
                    } else {
                        TupleValue::Binary(b)
                    }
                }
                _ => return Err(SpillError::Corrupt("unknown value tag")),
            });
        }
        Ok(TupleData(vals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(vals: &[TupleValue]) -> TupleData {
        TupleData(vals.to_vec())
    }

    #[test]
    fn changes_come_back_in_order_and_intact() {
        let b = |s: &'static [u8]| TupleValue::Binary(Bytes::from_static(s));
        let changes = vec![
            Change::Upsert {
                new: t(&[b(b"\x00\x01"), TupleValue::Null, TupleValue::UnchangedToast]),
            },
            Change::Delete {
                old: t(&[b(b""), TupleValue::Text(Bytes::from_static("é".as_bytes()))]),
            },
            Change::KeyChange {
                old: t(&[b(b"k")]),
                old_kind: OldKind::Key,
                new: t(&[b(b"k2")]),
            },
            Change::KeyChange {
                old: t(&[b(b"o")]),
                old_kind: OldKind::Full,
                new: t(&[]),
            },
        ];
        let mut s = Spill::new().unwrap();
        for _ in 0..1000 {
            for c in &changes {
                s.push(c).unwrap();
            }
        }
        assert_eq!(s.len(), 4000);
        let mut r = s.into_reader().unwrap();
        let mut got = Vec::new();
        loop {
            let b = r.next_batch(333).unwrap();
            if b.is_empty() {
                break;
            }
            assert!(b.len() <= 333);
            got.extend(b);
        }
        assert_eq!(got.len(), 4000);
        for (i, c) in got.iter().enumerate() {
            assert_eq!(c, &changes[i % 4]);
        }
    }

    #[test]
    fn an_empty_spill_reads_nothing() {
        let s = Spill::new().unwrap();
        assert!(s.is_empty());
        assert!(s.into_reader().unwrap().next_batch(10).unwrap().is_empty());
    }
}

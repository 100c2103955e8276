//! Coalescing: the net effect per source identity key of a batch of changes.
//!
//! Owns the rule that turns a stream-ordered run of changes into two disjoint sets (deletes
//! by old identity, upserts by final image) whose set-wise application equals applying the
//! changes one by one. It is pure: it must never do I/O, and it must never invent a value for
//! an unchanged-TOAST column (it either takes the value from an earlier image of the same row
//! in the batch, or leaves the column [`TupleValue::UnchangedToast`] for the writer to resolve).

use std::collections::HashMap;

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::pgoutput::{OldKind, TupleData, TupleValue};

/// One source change, as apply consumes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A source INSERT: the row's image. Its identity did not exist in the source just before,
    /// so when it is the first change of its key in a batch, the target has no row for it
    /// when the batch starts ([`Coalesced::inserts`]).
    Insert {
        /// The new row, in source column order.
        new: TupleData,
    },
    /// An update that kept the identity key, or a backfilled row: the row's new image.
    /// It may hold [`TupleValue::UnchangedToast`] columns (updates only).
    Upsert {
        /// The new row, in source column order.
        new: TupleData,
    },
    /// A delete. `old` is the `K` (identity columns only) or `O` (whole row) tuple.
    Delete {
        /// The old key or row, in source column order.
        old: TupleData,
    },
    /// An update that carried an old tuple (the identity changed, or REPLICA IDENTITY FULL):
    /// delete the old identity, then upsert the new image.
    KeyChange {
        /// The old key (`K`) or the whole old row (`O`).
        old: TupleData,
        /// Which of the two `old` is: an `O` tuple supplies values for unchanged-TOAST
        /// columns of `new`; a `K` tuple's non-key columns are not values.
        old_kind: OldKind,
        /// The new row, which may hold [`TupleValue::UnchangedToast`].
        new: TupleData,
    },
}

/// A change tagged with the commit LSN of the source transaction it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceChange {
    /// Commit LSN of the source transaction (what progress records and restarts skip by).
    pub lsn: Lsn,
    /// The change.
    pub change: Change,
}

/// The net effect of a batch: deletes and upserts, disjoint by source identity key — except
/// for an upsert that still holds unchanged-TOAST columns and follows a delete of its identity
/// in the batch: that delete is kept too, so that the writer cannot keep values of the deleted
/// row (it finds no row and reports the key for a re-read).
///
/// Apply the deletes first, then the upserts. That order is correct whenever the target key is
/// a function of the source identity columns and is unique in the source: after the batch, a
/// deleted identity holds no row, so deleting its target key can only remove (a) its own stale
/// row or (b) a row that an upsert of this batch writes again afterwards (another identity that
/// took over the same target key later in the batch, e.g. a key-changing update or delete then
/// re-insert). It cannot remove a row untouched by the batch: that row held its target key
/// throughout the batch, and two source rows never hold one target key at the same time.
/// Upserting first would be wrong in case (b): the delete would then remove the new row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coalesced {
    /// Old identity tuples (`K` or `O` shaped) whose rows must not exist after the batch.
    pub deletes: Vec<TupleData>,
    /// Final images, possibly with [`TupleValue::UnchangedToast`] columns that no earlier
    /// image in the batch could fill.
    pub upserts: Vec<TupleData>,
    /// Final images of keys whose first change in the batch was a source INSERT (then only
    /// updates): the target should hold no row for them, so a writer may insert them without
    /// `ON CONFLICT` — falling back to the upsert if it finds one after all (a chunk the
    /// backfill wrote, a stream replayed over copied rows). Never hold unchanged TOAST.
    pub inserts: Vec<TupleData>,
    /// Commit LSN of the last change seen, if any.
    pub last_lsn: Option<Lsn>,
}

/// A change could not be coalesced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoalesceError {
    /// A tuple's column count differs from the source table's.
    #[error("change #{index}: tuple has {got} columns, the source table has {expected}")]
    ColumnCount {
        /// Position of the change in the batch.
        index: usize,
        /// Columns in the tuple.
        got: usize,
        /// Columns of the source table.
        expected: usize,
    },
    /// An identity column arrived as unchanged TOAST, so the row cannot be identified.
    #[error(
        "change #{index}: identity column #{column} arrived as unchanged TOAST; \
         the row cannot be identified without its key value"
    )]
    UnchangedKey {
        /// Position of the change in the batch.
        index: usize,
        /// Source column index.
        column: usize,
    },
    /// A change arrived with a commit LSN below the previous change's.
    #[error("change #{index}: commit LSN {lsn} is below the previous change's {previous}: changes out of stream order")]
    OutOfOrder {
        /// Position of the change in the batch.
        index: usize,
        /// Its commit LSN.
        lsn: Lsn,
        /// The previous change's commit LSN.
        previous: Lsn,
    },
    /// The source table has no identity column, so changes cannot be matched to rows.
    #[error("the source table has no identity column; set a primary key or replica identity")]
    NoIdentity,
}

/// One part of an identity key, hashable (the decoder's [`TupleValue`] is not `Hash`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum KeyPart {
    Null,
    Text(Bytes),
    Binary(Bytes),
}

/// Keys of up to two columns (the common case) live inline: no allocation per change.
type Key = smallvec::SmallVec<[KeyPart; 2]>;

/// A seeded fast hasher: keys come from the source's data, so the seed is random per process.
type KeyHasher = foldhash::fast::RandomState;

enum Net {
    /// A slot just created for a key, before its first state is set (never seen outside
    /// [`Coalescer::push`]).
    Empty,
    /// The row's final image; `deleted` is the old tuple of a delete of the same identity
    /// earlier in the batch, if any.
    Upserted {
        image: TupleData,
        deleted: Option<TupleData>,
        /// The key's first change in the batch was a source INSERT, and only upserts followed.
        fresh: bool,
    },
    Deleted(TupleData),
}

/// Coalesces `changes` (in stream order) to their net effect per identity key.
///
/// `identity[i]` says whether source column `i` belongs to the identity key; `identity.len()`
/// is the source table's column count. Last writer wins; an upsert's unchanged-TOAST columns
/// take the value of the same row's earlier image in the batch (for a key change: the old
/// identity's earlier image, or the old tuple itself when it is a whole `O` row).
pub fn coalesce(identity: &[bool], changes: &[SourceChange]) -> Result<Coalesced, CoalesceError> {
    let mut c = Coalescer::new(identity)?;
    for sc in changes {
        c.push(sc.clone())?;
    }
    Ok(c.finish())
}

/// [`coalesce`], one change at a time: what a batch holds is its net effect, never the changes
/// themselves, so its memory grows with the keys it touches (tracked by [`Coalescer::bytes`])
/// and a hot key updated a thousand times costs one row, both here and in the target.
#[derive(Default)]
pub struct Coalescer {
    identity: Vec<bool>,
    /// Net state per key in slots, in order of each key's first change: one hash lookup per
    /// change and no key or row copies (coalescing was ~14 % of a batch's time).
    index: HashMap<Key, usize, KeyHasher>,
    slots: Vec<Net>,
    /// Approximate heap bytes of each slot's tuples (keys are counted in `bytes` only).
    slot_bytes: Vec<usize>,
    bytes: usize,
    changes: usize,
    last_lsn: Option<Lsn>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("changes", &self.changes)
            .field("net_rows", &self.slots.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

/// Approximate heap size of a tuple: the column vector and the bytes its values hold.
fn tuple_bytes(t: &TupleData) -> usize {
    const PER_ROW: usize = 64;
    const PER_COLUMN: usize = std::mem::size_of::<TupleValue>();
    PER_ROW
        + t.0
            .iter()
            .map(|v| {
                PER_COLUMN
                    + match v {
                        TupleValue::Text(b) | TupleValue::Binary(b) => b.len(),
                        _ => 0,
                    }
            })
            .sum::<usize>()
}

fn net_bytes(n: &Net) -> usize {
    match n {
        Net::Empty => 0,
        Net::Upserted { image, deleted, .. } => {
            tuple_bytes(image) + deleted.as_ref().map_or(0, tuple_bytes)
        }
        Net::Deleted(t) => tuple_bytes(t),
    }
}

/// Approximate heap size of a key held by the index.
fn key_bytes(key: &Key) -> usize {
    48 + key.len() * std::mem::size_of::<KeyPart>()
        + key
            .iter()
            .map(|p| match p {
                KeyPart::Text(b) | KeyPart::Binary(b) => b.len(),
                KeyPart::Null => 0,
            })
            .sum::<usize>()
}

impl Coalescer {
    /// An empty batch for a source table whose identity columns are `identity`.
    pub fn new(identity: &[bool]) -> Result<Self, CoalesceError> {
        if !identity.iter().any(|&b| b) {
            return Err(CoalesceError::NoIdentity);
        }
        Ok(Coalescer {
            identity: identity.to_vec(),
            ..Coalescer::default()
        })
    }

    /// Changes pushed since the last [`Coalescer::finish`].
    pub fn changes(&self) -> usize {
        self.changes
    }

    /// Distinct identity keys touched: the rows the batch will write or delete.
    pub fn net_rows(&self) -> usize {
        self.slots.len()
    }

    /// Approximate heap bytes the batch holds (what a memory budget compares against).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when nothing was pushed since the last [`Coalescer::finish`].
    pub fn is_empty(&self) -> bool {
        self.changes == 0
    }

    fn check(&self, t: &TupleData) -> Result<(), CoalesceError> {
        if t.0.len() != self.identity.len() {
            return Err(CoalesceError::ColumnCount {
                index: self.changes,
                got: t.0.len(),
                expected: self.identity.len(),
            });
        }
        Ok(())
    }

    fn key_of(&self, t: &TupleData) -> Result<Key, CoalesceError> {
        let mut k = Key::new();
        for (column, (v, &is_id)) in t.0.iter().zip(&self.identity).enumerate() {
            if !is_id {
                continue;
            }
            k.push(match v {
                TupleValue::Null => KeyPart::Null,
                TupleValue::Text(b) => KeyPart::Text(b.clone()),
                TupleValue::Binary(b) => KeyPart::Binary(b.clone()),
                TupleValue::UnchangedToast => {
                    return Err(CoalesceError::UnchangedKey {
                        index: self.changes,
                        column,
                    })
                }
            });
        }
        Ok(k)
    }

    /// The slot of `key`, created empty when the key is new (one hash lookup either way); a
    /// key keeps the position of its first change (output order).
    fn slot_of(&mut self, key: Key) -> usize {
        let kb = key_bytes(&key);
        match self.index.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => *e.get(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let i = self.slots.len();
                e.insert(i);
                self.slots.push(Net::Empty);
                // A key's bytes never change: they stay in the total, outside the slot's share.
                self.slot_bytes.push(0);
                self.bytes += kb;
                i
            }
        }
    }

    /// Takes slot `i`'s state out, leaving it empty for [`Coalescer::set`] right after: the
    /// earlier image to fill unchanged columns from, and the delete it follows. Moving out
    /// instead of cloning saves copying every repeated row.
    /// The third value says whether the image is fresh (see `Net::Upserted`).
    fn take(&mut self, i: usize) -> (Option<TupleData>, Option<TupleData>, bool) {
        match std::mem::replace(&mut self.slots[i], Net::Empty) {
            Net::Upserted {
                image,
                deleted,
                fresh,
            } => (Some(image), deleted, fresh),
            Net::Deleted(old) => (None, Some(old), false),
            Net::Empty => (None, None, false),
        }
    }

    /// Sets slot `i`'s net state.
    fn set(&mut self, i: usize, value: Net) {
        let b = net_bytes(&value);
        self.bytes = self.bytes - self.slot_bytes[i] + b;
        self.slot_bytes[i] = b;
        self.slots[i] = value;
    }

    /// An insert (`insert`) or update of one row's image.
    fn upsert(&mut self, mut image: TupleData, insert: bool) -> Result<(), CoalesceError> {
        self.check(&image)?;
        let key = self.key_of(&image)?;
        let i = self.slot_of(key);
        let (prev, deleted, was_fresh) = self.take(i);
        // Fresh: an insert is the key's first change, or an update follows a fresh image.
        // Anything else (a delete, a key change, a backfilled row, a second insert) may have
        // left a target row.
        let first = prev.is_none() && deleted.is_none();
        let fresh = if first { insert } else { was_fresh && !insert };
        if let Some(prev) = prev {
            fill_unchanged(&mut image, &prev);
        }
        self.set(
            i,
            Net::Upserted {
                image,
                deleted,
                fresh,
            },
        );
        Ok(())
    }

    /// Adds one change, in stream order (an LSN below the previous change's is refused).
    pub fn push(&mut self, sc: SourceChange) -> Result<(), CoalesceError> {
        if let Some(prev) = self.last_lsn.filter(|&p| sc.lsn < p) {
            return Err(CoalesceError::OutOfOrder {
                index: self.changes,
                lsn: sc.lsn,
                previous: prev,
            });
        }
        match sc.change {
            Change::Insert { new } => self.upsert(new, true)?,
            Change::Upsert { new } => self.upsert(new, false)?,
            Change::Delete { old } => {
                self.check(&old)?;
                let key = self.key_of(&old)?;
                let i = self.slot_of(key);
                self.set(i, Net::Deleted(old));
            }
            Change::KeyChange { old, old_kind, new } => {
                self.check(&old)?;
                self.check(&new)?;
                let old_key = self.key_of(&old)?;
                let mut image = new;
                if let Some(&at) = self.index.get(&old_key) {
                    if let Net::Upserted { image: prev, .. } = &self.slots[at] {
                        fill_unchanged(&mut image, prev);
                    }
                }
                if old_kind == OldKind::Full {
                    fill_unchanged(&mut image, &old);
                }
                // After filling: an unchanged identity column takes the old row's value.
                let new_key = self.key_of(&image)?;
                if old_key != new_key {
                    let i = self.slot_of(old_key);
                    self.set(i, Net::Deleted(old));
                }
                let i = self.slot_of(new_key);
                let deleted = self.take(i).1;
                self.set(
                    i,
                    Net::Upserted {
                        image,
                        deleted,
                        fresh: false,
                    },
                );
            }
        }
        self.changes += 1;
        self.last_lsn = Some(sc.lsn);
        Ok(())
    }

    /// The net effect of everything pushed so far; the coalescer is empty again afterwards.
    pub fn finish(&mut self) -> Coalesced {
        let mut out = Coalesced {
            last_lsn: self.last_lsn.take(),
            ..Coalesced::default()
        };
        self.index.clear();
        self.slot_bytes.clear();
        self.bytes = 0;
        self.changes = 0;
        for net in std::mem::take(&mut self.slots) {
            match net {
                Net::Upserted {
                    image,
                    deleted,
                    fresh,
                } => {
                    // An image still missing values must not take them from a target row the
                    // batch deleted: delete that row first, so the writer finds none and has
                    // the key re-read.
                    if let Some(old) = deleted {
                        if image.0.contains(&TupleValue::UnchangedToast) {
                            out.deletes.push(old);
                        }
                    }
                    if fresh && !image.0.contains(&TupleValue::UnchangedToast) {
                        out.inserts.push(image)
                    } else {
                        out.upserts.push(image)
                    }
                }
                Net::Deleted(t) => out.deletes.push(t),
                Net::Empty => {}
            }
        }
        out
    }
}

/// Replaces each unchanged-TOAST column of `image` by `earlier`'s value for it, when
/// `earlier` has one.
fn fill_unchanged(image: &mut TupleData, earlier: &TupleData) {
    for (v, e) in image.0.iter_mut().zip(&earlier.0) {
        if *v == TupleValue::UnchangedToast && *e != TupleValue::UnchangedToast {
            *v = e.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    // Model: 2 identity columns (0 and 1) and 2 payload columns (2, 3), small value domains so
    // that keys collide often. Values are text bytes; `None` in the model = unknown (must be
    // re-read).
    const NCOLS: usize = 4;
    const IDENTITY: [bool; NCOLS] = [true, true, false, false];
    type Row = Vec<Option<TupleValue>>;
    type Table = BTreeMap<(u8, u8), Row>;

    fn t(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::from(s.to_string()))
    }

    fn key_of(tuple: &TupleData) -> (u8, u8) {
        let p = |v: &TupleValue| match v {
            TupleValue::Text(b) => b[0],
            _ => 255,
        };
        (p(&tuple.0[0]), p(&tuple.0[1]))
    }

    /// Writing an image into the table the way the writer does: an unchanged-TOAST column keeps
    /// the table's value, or is unknown when the table has no such row.
    fn write_image(table: &mut Table, image: &TupleData) {
        let key = key_of(image);
        let existing = table.get(&key).cloned();
        let row: Row = image
            .0
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                TupleValue::UnchangedToast => existing.as_ref().and_then(|r| r[i].clone()),
                other => Some(other.clone()),
            })
            .collect();
        table.insert(key, row);
    }

    /// Applying changes one at a time (the reference semantics). For a key change, unchanged
    /// columns come from the old row where this batch wrote that column's value, else from the
    /// old full tuple; a value the row had from before the batch under a `K` old key is not
    /// consulted (the writer has it re-read from the source instead).
    fn sequential(mut table: Table, changes: &[Change]) -> Table {
        let mut written: BTreeMap<(u8, u8), [bool; NCOLS]> = BTreeMap::new();
        for c in changes {
            match c {
                Change::Insert { new } | Change::Upsert { new } => {
                    let k = key_of(new);
                    let prev = written.get(&k).copied().unwrap_or([false; NCOLS]);
                    let mut w = [false; NCOLS];
                    for i in 0..NCOLS {
                        w[i] = new.0[i] != TupleValue::UnchangedToast || prev[i];
                    }
                    write_image(&mut table, new);
                    written.insert(k, w);
                }
                Change::Delete { old } => {
                    table.remove(&key_of(old));
                    written.remove(&key_of(old));
                }
                Change::KeyChange { old, old_kind, new } => {
                    let ok = key_of(old);
                    let old_row = table.remove(&ok);
                    let old_w = written.remove(&ok).unwrap_or([false; NCOLS]);
                    let nk = key_of(new);
                    let mut w = [false; NCOLS];
                    let row: Row = new
                        .0
                        .iter()
                        .enumerate()
                        .map(|(i, v)| match v {
                            TupleValue::UnchangedToast => {
                                if old_w[i] {
                                    w[i] = true;
                                    old_row.as_ref().and_then(|r| r[i].clone())
                                } else if *old_kind == OldKind::Full {
                                    w[i] = true;
                                    Some(old.0[i].clone())
                                } else {
                                    None
                                }
                            }
                            other => {
                                w[i] = true;
                                Some(other.clone())
                            }
                        })
                        .collect();
                    // A key change onto a key the table already holds cannot happen in a
                    // valid stream; the generator avoids it.
                    table.insert(nk, row);
                    written.insert(nk, w);
                }
            }
        }
        table
    }

    fn coalesced(mut table: Table, changes: &[Change]) -> Table {
        let sc: Vec<SourceChange> = changes
            .iter()
            .map(|c| SourceChange {
                lsn: Lsn(1),
                change: c.clone(),
            })
            .collect();
        let out = coalesce(&IDENTITY, &sc).unwrap();
        let del: BTreeSet<_> = out.deletes.iter().map(key_of).collect();
        let up: BTreeSet<_> = out.upserts.iter().map(key_of).collect();
        for k in del.intersection(&up) {
            let u = out.upserts.iter().find(|u| key_of(u) == *k).unwrap();
            assert!(
                u.0.contains(&TupleValue::UnchangedToast),
                "a delete and a complete upsert of one key"
            );
        }
        assert_eq!(del.len(), out.deletes.len(), "duplicate delete keys");
        assert_eq!(up.len(), out.upserts.len(), "duplicate upsert keys");
        let ins: BTreeSet<_> = out.inserts.iter().map(key_of).collect();
        assert_eq!(ins.len(), out.inserts.len(), "duplicate insert keys");
        assert!(ins.is_disjoint(&up), "a key both inserted and upserted");
        for k in &del {
            table.remove(k);
        }
        // What the writer's plain INSERT relies on: after the deletes, no inserted key has a
        // row, and no inserted image lacks a value.
        for i in &out.inserts {
            assert!(
                !table.contains_key(&key_of(i)),
                "an insert of a key the table holds"
            );
            assert!(!i.0.contains(&TupleValue::UnchangedToast));
            write_image(&mut table, i);
        }
        for u in &out.upserts {
            write_image(&mut table, u);
        }
        table
    }

    #[derive(Debug, Clone)]
    enum Raw {
        Write(u8, u8, [u8; 2], [bool; 2]),
        Delete(u8, u8),
        Move(u8, u8, u8, u8, [u8; 2], [bool; 2], bool),
    }

    fn raw() -> impl Strategy<Value = Raw> {
        let k = 0u8..3;
        prop_oneof![
            4 => (k.clone(), k.clone(), any::<[u8; 2]>(), any::<[bool; 2]>())
                .prop_map(|(a, b, v, u)| Raw::Write(a, b, v, u)),
            2 => (k.clone(), k.clone()).prop_map(|(a, b)| Raw::Delete(a, b)),
            2 => (k.clone(), k.clone(), k.clone(), k, any::<[u8; 2]>(), any::<[bool; 2]>(), any::<bool>())
                .prop_map(|(a, b, c, d, v, u, f)| Raw::Move(a, b, c, d, v, u, f)),
        ]
    }

    fn image(a: u8, b: u8, v: [u8; 2], u: [bool; 2]) -> TupleData {
        let val = |i: usize| {
            if u[i] {
                TupleValue::UnchangedToast
            } else if v[i] % 5 == 0 {
                TupleValue::Null
            } else {
                t(&format!("{}", v[i] % 7))
            }
        };
        TupleData(vec![
            t(&(a as char).to_string()),
            t(&(b as char).to_string()),
            val(0),
            val(1),
        ])
    }

    /// Turns raw ops into a stream a real source could produce: no update of a missing row,
    /// no insert with unchanged TOAST, no key change onto an existing row.
    fn sanitize(initial: &Table, raws: &[Raw]) -> Vec<Change> {
        let mut live: BTreeMap<(u8, u8), Row> = initial.clone();
        let mut out = Vec::new();
        for r in raws {
            match *r {
                Raw::Write(a, b, v, u) => {
                    let u = if live.contains_key(&(a, b)) {
                        u
                    } else {
                        [false; 2]
                    };
                    let img = image(a, b, v, u);
                    // A write of a missing row is the source's INSERT.
                    let fresh = live.insert((a, b), vec![]).is_none();
                    out.push(if fresh {
                        Change::Insert { new: img }
                    } else {
                        Change::Upsert { new: img }
                    });
                }
                Raw::Delete(a, b) => {
                    if live.remove(&(a, b)).is_some() {
                        let mut old = image(a, b, [0, 0], [false; 2]);
                        old.0[2] = TupleValue::Null;
                        old.0[3] = TupleValue::Null;
                        out.push(Change::Delete { old });
                    }
                }
                Raw::Move(a, b, c, d, v, u, full) => {
                    if (a, b) == (c, d) || !live.contains_key(&(a, b)) || live.contains_key(&(c, d))
                    {
                        continue;
                    }
                    live.remove(&(a, b));
                    live.insert((c, d), vec![]);
                    let (old, old_kind) = if full {
                        (image(a, b, [v[1], v[0]], [false; 2]), OldKind::Full)
                    } else {
                        let mut o = image(a, b, [0, 0], [false; 2]);
                        o.0[2] = TupleValue::Null;
                        o.0[3] = TupleValue::Null;
                        (o, OldKind::Key)
                    };
                    out.push(Change::KeyChange {
                        old,
                        old_kind,
                        new: image(c, d, v, u),
                    });
                }
            }
        }
        out
    }

    fn initial_table() -> impl Strategy<Value = Table> {
        proptest::collection::btree_map((0u8..3, 0u8..3), any::<[u8; 2]>(), 0..5).prop_map(|m| {
            m.into_iter()
                .map(|((a, b), v)| {
                    let img = image(a, b, v, [false; 2]);
                    ((a, b), img.0.into_iter().map(Some).collect())
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn coalesced_equals_one_by_one(initial in initial_table(), raws in proptest::collection::vec(raw(), 0..40)) {
            let changes = sanitize(&initial, &raws);
            let a = sequential(initial.clone(), &changes);
            let b = coalesced(initial, &changes);
            prop_assert_eq!(a, b);
        }
    }

    /// A change of the source transaction that commits at LSN 7.
    fn sc(change: Change) -> SourceChange {
        SourceChange {
            lsn: Lsn(7),
            change,
        }
    }

    #[test]
    fn only_a_key_first_inserted_in_the_batch_is_an_insert() {
        let a = image(1, 1, [1, 2], [false; 2]);
        let b = image(2, 2, [1, 2], [false; 2]);
        let c = image(2, 1, [3, 4], [false; 2]);
        let out = coalesce(
            &IDENTITY,
            &[
                // Inserted, then updated with unchanged TOAST: still new, the value filled.
                sc(Change::Insert { new: a.clone() }),
                sc(Change::Upsert {
                    new: image(1, 1, [3, 3], [true, false]),
                }),
                // Deleted then inserted again: the target may hold the old row.
                sc(Change::Delete { old: b.clone() }),
                sc(Change::Insert { new: b.clone() }),
                // Updated, existing before the batch.
                sc(Change::Upsert { new: c.clone() }),
            ],
        )
        .unwrap();
        assert_eq!(out.inserts.len(), 1);
        assert_eq!(key_of(&out.inserts[0]), key_of(&a));
        assert_eq!(
            out.inserts[0].0[2], a.0[2],
            "unchanged TOAST filled from the insert"
        );
        let up: BTreeSet<_> = out.upserts.iter().map(key_of).collect();
        assert_eq!(up, BTreeSet::from([key_of(&b), key_of(&c)]));
    }

    #[test]
    fn insert_then_delete_nets_a_delete_only() {
        let ins = image(1, 1, [1, 2], [false; 2]);
        let out = coalesce(
            &IDENTITY,
            &[
                sc(Change::Upsert { new: ins.clone() }),
                sc(Change::Delete { old: ins }),
            ],
        )
        .unwrap();
        assert!(out.upserts.is_empty());
        assert_eq!(out.deletes.len(), 1);
        assert_eq!(out.last_lsn, Some(Lsn(7)));
    }

    #[test]
    fn a_hot_key_costs_one_row_and_finish_empties_the_batch() {
        let mut c = Coalescer::new(&IDENTITY).unwrap();
        let row = |v: &str| TupleData(vec![t("a"), t("b"), t(v), t("x")]);
        c.push(SourceChange {
            lsn: Lsn(1),
            change: Change::Upsert { new: row("0") },
        })
        .unwrap();
        let one = c.bytes();
        assert!(one > 0);
        for i in 0..1000u64 {
            c.push(SourceChange {
                lsn: Lsn(2 + i),
                change: Change::Upsert { new: row("1") },
            })
            .unwrap();
        }
        assert_eq!((c.changes(), c.net_rows(), c.bytes()), (1001, 1, one));
        let err = c
            .push(SourceChange {
                lsn: Lsn(1),
                change: Change::Upsert { new: row("2") },
            })
            .unwrap_err();
        assert!(
            matches!(err, CoalesceError::OutOfOrder { index: 1001, .. }),
            "{err}"
        );
        let net = c.finish();
        assert_eq!((net.upserts.len(), net.deletes.len()), (1, 0));
        assert_eq!(net.last_lsn, Some(Lsn(1001)));
        assert!(c.is_empty() && c.net_rows() == 0 && c.bytes() == 0);
        c.push(SourceChange {
            lsn: Lsn(1),
            change: Change::Delete { old: row("0") },
        })
        .unwrap();
        assert_eq!(c.net_rows(), 1);
    }

    #[test]
    fn unchanged_toast_merges_into_earlier_image_and_stays_otherwise() {
        let sc = |c| SourceChange {
            lsn: Lsn(1),
            change: c,
        };
        let full = image(1, 1, [1, 2], [false; 2]);
        let upd = image(1, 1, [3, 3], [true, false]);
        let out = coalesce(
            &IDENTITY,
            &[
                sc(Change::Upsert { new: full.clone() }),
                sc(Change::Upsert { new: upd.clone() }),
            ],
        )
        .unwrap();
        assert_eq!(out.upserts[0].0[2], full.0[2]);
        assert_eq!(out.upserts[0].0[3], upd.0[3]);
        let out = coalesce(&IDENTITY, &[sc(Change::Upsert { new: upd })]).unwrap();
        assert_eq!(out.upserts[0].0[2], TupleValue::UnchangedToast);
    }

    #[test]
    fn bad_tuples_are_errors() {
        let sc = |c| SourceChange {
            lsn: Lsn(1),
            change: c,
        };
        let short = TupleData(vec![t("a")]);
        assert!(matches!(
            coalesce(&IDENTITY, &[sc(Change::Upsert { new: short })]),
            Err(CoalesceError::ColumnCount { .. })
        ));
        let mut ukey = image(1, 1, [1, 1], [false; 2]);
        ukey.0[0] = TupleValue::UnchangedToast;
        assert!(matches!(
            coalesce(&IDENTITY, &[sc(Change::Upsert { new: ukey })]),
            Err(CoalesceError::UnchangedKey { column: 0, .. })
        ));
        assert_eq!(
            coalesce(&[false, false], &[]),
            Err(CoalesceError::NoIdentity)
        );
    }
}

//! Changes written before the source table's last change of shape, replayed after it.
//!
//! Owns the rule that maps a change that arrives in an older shape of the source table (a
//! `Relation` message from before a DDL that the prepared columns already include) onto the
//! prepared columns, by name and type. It is pure: it must never do I/O, and it must never
//! invent a value — a column it cannot map becomes unchanged TOAST after a delete of the row,
//! so that apply re-reads the row from the source (the rule D30 explains).

use crate::apply::coalesce::Change;
use crate::catalog;
use crate::pgoutput::{RelationBody, TupleData, TupleValue};

/// How tuples of one older shape map onto the prepared source columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ShapeMap {
    /// For each prepared column, its position in the arriving tuples, when a column of the
    /// same name and type is there.
    from: Vec<Option<usize>>,
    /// Prepared columns that identify a row (apply matches rows and the backfill re-reads
    /// them by these).
    identity: Vec<bool>,
    /// Columns of the arriving tuples.
    arriving: usize,
}

/// A change of an older shape that cannot be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum ShapeError {
    /// A tuple's column count is not the shape's.
    #[error("a change has {got} columns where its Relation message declared {expected}")]
    ColumnCount {
        /// Columns in the tuple.
        got: usize,
        /// Columns of the shape.
        expected: usize,
    },
}

impl ShapeMap {
    /// The map from `body`'s columns to `prepared`'s; `identity[i]` tells whether prepared
    /// column `i` identifies a row. Fails, saying which, when an identity column has no
    /// same-named column of the same type in `body`: such rows cannot be matched.
    pub(super) fn new(
        body: &RelationBody,
        prepared: &[catalog::Column],
        identity: &[bool],
    ) -> Result<Self, String> {
        let from: Vec<Option<usize>> = prepared
            .iter()
            .map(|p| {
                body.columns
                    .iter()
                    .position(|c| c.name == p.name && c.type_oid == p.type_oid)
            })
            .collect();
        let lost: Vec<&str> = prepared
            .iter()
            .zip(&from)
            .zip(identity)
            .filter(|((_, f), id)| **id && f.is_none())
            .map(|((p, _), _)| p.name.as_str())
            .collect();
        if !lost.is_empty() {
            return Err(format!(
                "key column(s) {} of the current table are not in the older shape with the same type",
                lost.join(", ")
            ));
        }
        Ok(ShapeMap {
            from,
            identity: identity.to_vec(),
            arriving: body.columns.len(),
        })
    }

    /// True when every prepared column has its value in the arriving tuples, so changes are
    /// only reordered; false when some must be re-read from the source.
    pub(super) fn complete(&self) -> bool {
        self.from.iter().all(Option::is_some)
    }

    /// The changes in the prepared shape that stand for `change`. When the map is complete,
    /// the change itself with its columns reordered. Otherwise a row image would lack values,
    /// so an insert or update becomes a delete of the row followed by an update that holds only
    /// its identity (every other column unchanged TOAST): apply finds no row to keep the
    /// values of and re-reads the row from the source. A key-changing update deletes both
    /// identities first.
    pub(super) fn map(&self, change: Change) -> Result<Vec<Change>, ShapeError> {
        if self.complete() {
            return Ok(vec![match change {
                Change::Insert { new } => Change::Insert {
                    new: self.values(&new)?,
                },
                Change::Upsert { new } => Change::Upsert {
                    new: self.values(&new)?,
                },
                Change::Delete { old } => Change::Delete {
                    old: self.values(&old)?,
                },
                Change::KeyChange { old, old_kind, new } => Change::KeyChange {
                    old: self.values(&old)?,
                    old_kind,
                    new: self.values(&new)?,
                },
            }]);
        }
        Ok(match change {
            Change::Delete { old } => vec![Change::Delete {
                old: self.identity_only(&old, TupleValue::Null)?,
            }],
            Change::Insert { new } | Change::Upsert { new } => vec![
                Change::Delete {
                    old: self.identity_only(&new, TupleValue::Null)?,
                },
                Change::Upsert {
                    new: self.identity_only(&new, TupleValue::UnchangedToast)?,
                },
            ],
            Change::KeyChange { old, new, .. } => vec![
                Change::Delete {
                    old: self.identity_only(&old, TupleValue::Null)?,
                },
                Change::Delete {
                    old: self.identity_only(&new, TupleValue::Null)?,
                },
                Change::Upsert {
                    new: self.identity_only(&new, TupleValue::UnchangedToast)?,
                },
            ],
        })
    }

    fn check(&self, t: &TupleData) -> Result<(), ShapeError> {
        if t.0.len() == self.arriving {
            Ok(())
        } else {
            Err(ShapeError::ColumnCount {
                got: t.0.len(),
                expected: self.arriving,
            })
        }
    }

    /// `t` in prepared column order; a prepared column the shape lacks is NULL (only used when
    /// the map is complete, or for columns that are not values anyway).
    fn values(&self, t: &TupleData) -> Result<TupleData, ShapeError> {
        self.check(t)?;
        Ok(TupleData(
            self.from
                .iter()
                .map(|f| f.map_or(TupleValue::Null, |j| t.0[j].clone()))
                .collect(),
        ))
    }

    /// `t`'s identity columns in prepared order, `rest` in every other column.
    fn identity_only(&self, t: &TupleData, rest: TupleValue) -> Result<TupleData, ShapeError> {
        self.check(t)?;
        Ok(TupleData(
            self.from
                .iter()
                .zip(&self.identity)
                .map(|(f, id)| match (f, id) {
                    (Some(j), true) => t.0[*j].clone(),
                    _ => rest.clone(),
                })
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{ColumnDesc, OldKind, ReplicaIdentity};
    use bytes::Bytes;

    const INT4: u32 = 23;
    const TEXT: u32 = 25;
    const VARCHAR: u32 = 1043;

    fn body(cols: &[(&str, u32)]) -> RelationBody {
        RelationBody {
            oid: 1,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: cols
                .iter()
                .map(|(n, ty)| ColumnDesc {
                    flags: u8::from(*n == "id"),
                    name: (*n).into(),
                    type_oid: *ty,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    fn prepared(cols: &[(&str, u32)]) -> Vec<catalog::Column> {
        cols.iter()
            .enumerate()
            .map(|(i, (n, ty))| catalog::Column {
                name: (*n).into(),
                type_name: String::new(),
                type_oid: *ty,
                not_null: false,
                has_default: false,
                generated: false,
                attnum: i as i16 + 1,
            })
            .collect()
    }

    fn v(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn row(vals: &[&str]) -> TupleData {
        TupleData(vals.iter().map(|s| v(s)).collect())
    }

    #[test]
    fn a_dropped_column_is_left_out_and_the_rest_reordered_by_name() {
        // Older shape (id, gone, note); current (id, note).
        let m = ShapeMap::new(
            &body(&[("id", INT4), ("gone", INT4), ("note", TEXT)]),
            &prepared(&[("id", INT4), ("note", TEXT)]),
            &[true, false],
        )
        .unwrap();
        assert!(m.complete());
        assert_eq!(
            m.map(Change::Upsert {
                new: row(&["1", "9", "x"])
            })
            .unwrap(),
            [Change::Upsert {
                new: row(&["1", "x"])
            }]
        );
        assert_eq!(
            m.map(Change::KeyChange {
                old: TupleData(vec![v("1"), TupleValue::Null, TupleValue::Null]),
                old_kind: OldKind::Key,
                new: row(&["2", "9", "y"]),
            })
            .unwrap(),
            [Change::KeyChange {
                old: TupleData(vec![v("1"), TupleValue::Null]),
                old_kind: OldKind::Key,
                new: row(&["2", "y"]),
            }]
        );
        // An insert stays an insert: nothing is missing.
        assert!(matches!(
            m.map(Change::Insert {
                new: row(&["3", "9", "z"])
            })
            .unwrap()[..],
            [Change::Insert { .. }]
        ));
    }

    #[test]
    fn a_column_added_or_retyped_since_makes_the_row_a_delete_and_a_reread() {
        // Older shape (id, note text); current (id, note varchar, extra int).
        let m = ShapeMap::new(
            &body(&[("id", INT4), ("note", TEXT)]),
            &prepared(&[("id", INT4), ("note", VARCHAR), ("extra", INT4)]),
            &[true, false, false],
        )
        .unwrap();
        assert!(!m.complete());
        let key = TupleData(vec![v("1"), TupleValue::Null, TupleValue::Null]);
        let reread = TupleData(vec![
            v("1"),
            TupleValue::UnchangedToast,
            TupleValue::UnchangedToast,
        ]);
        for c in [
            Change::Insert {
                new: row(&["1", "x"]),
            },
            Change::Upsert {
                new: row(&["1", "x"]),
            },
        ] {
            assert_eq!(
                m.map(c).unwrap(),
                [
                    Change::Delete { old: key.clone() },
                    Change::Upsert {
                        new: reread.clone()
                    }
                ]
            );
        }
        assert_eq!(
            m.map(Change::Delete {
                old: TupleData(vec![v("1"), TupleValue::Null])
            })
            .unwrap(),
            [Change::Delete { old: key.clone() }]
        );
        let moved = m
            .map(Change::KeyChange {
                old: TupleData(vec![v("7"), TupleValue::Null]),
                old_kind: OldKind::Key,
                new: row(&["1", "x"]),
            })
            .unwrap();
        assert_eq!(
            moved,
            [
                Change::Delete {
                    old: TupleData(vec![v("7"), TupleValue::Null, TupleValue::Null])
                },
                Change::Delete { old: key },
                Change::Upsert { new: reread }
            ]
        );
    }

    #[test]
    fn a_key_column_that_changed_type_cannot_be_mapped() {
        let e = ShapeMap::new(
            &body(&[("id", INT4), ("note", TEXT)]),
            &prepared(&[("id", 20), ("note", TEXT)]),
            &[true, false],
        )
        .unwrap_err();
        assert!(e.contains("id"), "{e}");
    }

    #[test]
    fn a_tuple_of_another_width_is_an_error_not_a_panic() {
        let m = ShapeMap::new(
            &body(&[("id", INT4), ("note", TEXT)]),
            &prepared(&[("id", INT4)]),
            &[true],
        )
        .unwrap();
        assert_eq!(
            m.map(Change::Upsert { new: row(&["1"]) }).unwrap_err(),
            ShapeError::ColumnCount {
                got: 1,
                expected: 2
            }
        );
    }
}

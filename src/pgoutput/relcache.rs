//! The relation cache: turns tuples into named, typed rows.
//!
//! Owns the latest `Relation` message per table oid (replaced on every new `R`, the only
//! signal that a table's shape changed), the names of the non-built-in types announced by
//! `Y` messages, and the rules for reading a tuple against its relation: a `K` old-key
//! tuple holds values only for the replica identity key columns (the others arrive as `n`
//! and are *not* NULLs), and an unchanged TOAST value (`u`) is never a value.
//!
//! It must never guess: a tuple whose column count differs from its relation's, or that
//! names an unknown relation, is an error; so is text that is not UTF-8 and a binary value
//! it cannot render (the error names the type oid). It does no I/O.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::binary::{self, BinaryError, UserType, UserTypes};
use super::types::{LogicalMessage, Oid, OldKind, RelationBody, TupleData, TupleValue};

/// A tuple could not be read as a row of its relation, or a value could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    /// No `Relation` message has been seen for this oid since the cache was cleared.
    #[error("change for relation oid {0}, whose Relation message was never received")]
    UnknownRelation(Oid),
    /// The tuple's column count differs from the relation's.
    #[error("tuple for {relation} has {got} columns, its Relation message has {expected}")]
    ColumnCount {
        /// `schema.table`.
        relation: String,
        /// Columns in the Relation message.
        expected: usize,
        /// Columns in the tuple.
        got: usize,
    },
    /// A text-format value is not UTF-8.
    #[error("column {column:?} (type oid {type_oid}): text value is not UTF-8: {what}")]
    InvalidUtf8 {
        /// The column name.
        column: String,
        /// The column's type oid.
        type_oid: Oid,
        /// The UTF-8 error.
        what: String,
    },
    /// A binary-format value could not be rendered to text.
    #[error("column {column:?}: {source}")]
    Binary {
        /// The column name.
        column: String,
        /// Why.
        source: BinaryError,
    },
}

/// A non-built-in type announced by a `Y` message (or declared by the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    /// Schema name.
    pub namespace: String,
    /// Type name.
    pub name: String,
    /// How its binary form is read.
    pub kind: UserType,
}

#[derive(Debug, Default, Clone)]
struct TypeMap(HashMap<Oid, TypeInfo>);

impl UserTypes for TypeMap {
    fn user_type(&self, oid: Oid) -> Option<UserType> {
        self.0.get(&oid).map(|t| t.kind)
    }
}

/// A cached relation with what rows need: its key column positions and a snapshot of the
/// user types known when it (or a type) last changed.
#[derive(Debug)]
pub struct Relation {
    body: RelationBody,
    qualified: String,
    key_columns: Vec<usize>,
    types: Arc<TypeMap>,
}

impl Relation {
    /// The Relation message this entry holds.
    pub fn body(&self) -> &RelationBody {
        &self.body
    }

    /// `schema.table` (quoted only for display, not for SQL).
    pub fn qualified_name(&self) -> &str {
        &self.qualified
    }

    /// Positions of the replica identity key columns.
    pub fn key_columns(&self) -> &[usize] {
        &self.key_columns
    }

    /// Position of the column called `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.body.columns.iter().position(|c| c.name == name)
    }
}

/// Keeps the latest `Relation` per oid and the `Y` types; builds [`Row`]s.
///
/// Feed it every message with [`RelationCache::observe`] (it keeps `R` and `Y`), and call
/// [`RelationCache::clear`] on reconnect: the server sends every Relation again in each
/// walsender session.
#[derive(Debug, Default, Clone)]
pub struct RelationCache {
    relations: HashMap<Oid, Arc<Relation>>,
    types: Arc<TypeMap>,
}

/// What a change message means as rows (see [`RelationCache::change`]).
#[derive(Debug, Clone)]
pub enum RowChange {
    /// `I`.
    Insert {
        /// The new row.
        new: Row,
    },
    /// `U`.
    Update {
        /// The old key (key columns only) or old full row, when sent.
        old: Option<Row>,
        /// The new row; may hold unchanged-TOAST columns.
        new: Row,
    },
    /// `D`.
    Delete {
        /// The old key (key columns only) or old full row.
        old: Row,
    },
}

impl RelationCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every relation and type (call on reconnect).
    pub fn clear(&mut self) {
        self.relations.clear();
        self.types = Arc::default();
    }

    /// Records `R` and `Y` messages; returns true when the message was one of them.
    pub fn observe(&mut self, msg: &LogicalMessage) -> bool {
        match msg {
            LogicalMessage::Relation { body, .. } => {
                self.insert_relation(body.clone());
                true
            }
            LogicalMessage::Type {
                oid,
                namespace,
                name,
                ..
            } => {
                // pgoutput says only the name; array types are named `_elem` by
                // PostgreSQL, and the other non-built-in types it sends are taken as enums.
                let kind = if name.starts_with('_') {
                    UserType::Array
                } else {
                    UserType::Enum
                };
                if self.types.0.get(oid).map(|t| (&t.namespace, &t.name)) != Some((namespace, name))
                {
                    self.set_user_type(*oid, namespace, name, kind);
                }
                true
            }
            _ => false,
        }
    }

    /// Replaces the cached shape of `body.oid`.
    pub fn insert_relation(&mut self, body: RelationBody) {
        let key_columns = body
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key())
            .map(|(i, _)| i)
            .collect();
        let qualified = format!("{}.{}", body.namespace, body.name);
        self.relations.insert(
            body.oid,
            Arc::new(Relation {
                body,
                qualified,
                key_columns,
                types: self.types.clone(),
            }),
        );
    }

    /// Declares (or corrects) how a non-built-in type is read in binary form, e.g. a
    /// domain over `int4` as `UserType::Domain(23)`. Existing relations see it at once.
    pub fn set_user_type(&mut self, oid: Oid, namespace: &str, name: &str, kind: UserType) {
        Arc::make_mut(&mut self.types).0.insert(
            oid,
            TypeInfo {
                namespace: namespace.to_string(),
                name: name.to_string(),
                kind,
            },
        );
        for rel in self.relations.values_mut() {
            *rel = Arc::new(Relation {
                body: rel.body.clone(),
                qualified: rel.qualified.clone(),
                key_columns: rel.key_columns.clone(),
                types: self.types.clone(),
            });
        }
    }

    /// The cached relation `oid`.
    pub fn get(&self, oid: Oid) -> Option<&Arc<Relation>> {
        self.relations.get(&oid)
    }

    /// A type announced by `Y` (or declared), by oid.
    pub fn user_type(&self, oid: Oid) -> Option<&TypeInfo> {
        self.types.0.get(&oid)
    }

    /// `schema.name` of a type announced by `Y`.
    pub fn type_name(&self, oid: Oid) -> Option<String> {
        self.types
            .0
            .get(&oid)
            .map(|t| format!("{}.{}", t.namespace, t.name))
    }

    /// Number of cached relations.
    pub fn len(&self) -> usize {
        self.relations.len()
    }

    /// True when no relation is cached.
    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }

    /// A full row (`N` new tuple, or `O` old row) of `relation`.
    pub fn row(&self, relation: Oid, tuple: TupleData) -> Result<Row, RowError> {
        self.build(relation, tuple, false)
    }

    /// An old row as the message says: `K` yields only the key columns, `O` all of them.
    pub fn old_row(&self, relation: Oid, kind: OldKind, tuple: TupleData) -> Result<Row, RowError> {
        self.build(relation, tuple, kind == OldKind::Key)
    }

    /// The rows of an `I`, `U` or `D` message (`None` for other messages). Clones the
    /// tuples, which is cheap: values are reference-counted slices.
    pub fn change(&self, msg: &LogicalMessage) -> Result<Option<RowChange>, RowError> {
        Ok(Some(match msg {
            LogicalMessage::Insert { relation, new, .. } => RowChange::Insert {
                new: self.row(*relation, new.clone())?,
            },
            LogicalMessage::Update {
                relation, old, new, ..
            } => RowChange::Update {
                old: match old {
                    Some((k, t)) => Some(self.old_row(*relation, *k, t.clone())?),
                    None => None,
                },
                new: self.row(*relation, new.clone())?,
            },
            LogicalMessage::Delete { relation, old, .. } => RowChange::Delete {
                old: self.old_row(*relation, old.0, old.1.clone())?,
            },
            _ => return Ok(None),
        }))
    }

    fn build(&self, relation: Oid, tuple: TupleData, key_only: bool) -> Result<Row, RowError> {
        let rel = self
            .relations
            .get(&relation)
            .ok_or(RowError::UnknownRelation(relation))?;
        if tuple.0.len() != rel.body.columns.len() {
            return Err(RowError::ColumnCount {
                relation: rel.qualified.clone(),
                expected: rel.body.columns.len(),
                got: tuple.0.len(),
            });
        }
        Ok(Row {
            rel: rel.clone(),
            values: tuple,
            key_only,
        })
    }
}

/// One value of a row in PostgreSQL's text form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered<'a> {
    /// SQL NULL.
    Null,
    /// Unchanged TOAST: no value was sent; keep the one the target has.
    UnchangedToast,
    /// The text PostgreSQL prints for the value (borrowed for text-mode values).
    Text(Cow<'a, str>),
}

/// A tuple read against its relation: named, typed columns. For a `K` old-key tuple only
/// the key columns are present.
#[derive(Debug, Clone)]
pub struct Row {
    rel: Arc<Relation>,
    values: TupleData,
    key_only: bool,
}

impl Row {
    /// The relation the row belongs to.
    pub fn relation(&self) -> &Arc<Relation> {
        &self.rel
    }

    /// True for a `K` old-key row (only key columns present).
    pub fn is_key_only(&self) -> bool {
        self.key_only
    }

    /// The raw tuple, in relation column order (for a key-only row the non-key slots hold
    /// `Null` placeholders that are not values).
    pub fn tuple(&self) -> &TupleData {
        &self.values
    }

    /// The raw tuple, by value.
    pub fn into_tuple(self) -> TupleData {
        self.values
    }

    fn present(&self, i: usize) -> bool {
        !self.key_only || self.rel.body.columns.get(i).is_some_and(|c| c.is_key())
    }

    /// The present columns as (name, type oid, value), in relation order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Oid, &TupleValue)> + '_ {
        self.rel
            .body
            .columns
            .iter()
            .zip(&self.values.0)
            .enumerate()
            .filter(|(i, _)| self.present(*i))
            .map(|(_, (c, v))| (c.name.as_str(), c.type_oid, v))
    }

    /// The replica identity key columns as (name, type oid, value), in relation order. For
    /// a full row these are read from the whole tuple; for a `K` row they are all it holds.
    pub fn key(&self) -> impl Iterator<Item = (&str, Oid, &TupleValue)> + '_ {
        self.rel.key_columns.iter().filter_map(move |&i| {
            let c = self.rel.body.columns.get(i)?;
            Some((c.name.as_str(), c.type_oid, self.values.0.get(i)?))
        })
    }

    /// Number of present columns.
    pub fn len(&self) -> usize {
        if self.key_only {
            self.rel.key_columns.len()
        } else {
            self.values.0.len()
        }
    }

    /// True when no column is present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value of column `name`; `None` if there is no such column or, in a key-only row,
    /// it is not a key column.
    pub fn get(&self, name: &str) -> Option<&TupleValue> {
        let i = self.rel.column_index(name)?;
        if self.present(i) {
            self.values.0.get(i)
        } else {
            None
        }
    }

    /// Names of the columns sent as unchanged TOAST (`u`): their values were not sent.
    pub fn unchanged_toast(&self) -> Vec<&str> {
        self.iter()
            .filter(|(_, _, v)| matches!(v, TupleValue::UnchangedToast))
            .map(|(n, _, _)| n)
            .collect()
    }

    /// The text form of one value of this row's relation.
    pub fn render<'v>(
        &self,
        name: &str,
        type_oid: Oid,
        value: &'v TupleValue,
    ) -> Result<Rendered<'v>, RowError> {
        match value {
            TupleValue::Null => Ok(Rendered::Null),
            TupleValue::UnchangedToast => Ok(Rendered::UnchangedToast),
            TupleValue::Text(b) => std::str::from_utf8(b)
                .map(|s| Rendered::Text(Cow::Borrowed(s)))
                .map_err(|e| RowError::InvalidUtf8 {
                    column: name.to_string(),
                    type_oid,
                    what: e.to_string(),
                }),
            TupleValue::Binary(b) => binary::render(type_oid, b, &*self.rel.types)
                .map(|s| Rendered::Text(Cow::Owned(s)))
                .map_err(|source| RowError::Binary {
                    column: name.to_string(),
                    source,
                }),
        }
    }

    /// The text form of column `name` as JSON: a string, or `null` for SQL NULL. `None` when
    /// the column is absent (no such column, a non-key column of a key-only row) or its
    /// value was not sent (unchanged TOAST).
    pub fn value_json(&self, name: &str) -> Result<Option<Value>, RowError> {
        let Some(i) = self.rel.column_index(name).filter(|&i| self.present(i)) else {
            return Ok(None);
        };
        let (Some(c), Some(v)) = (self.rel.body.columns.get(i), self.values.0.get(i)) else {
            return Ok(None);
        };
        Ok(match self.render(name, c.type_oid, v)? {
            Rendered::Null => Some(Value::Null),
            Rendered::UnchangedToast => None,
            Rendered::Text(s) => Some(Value::String(s.into_owned())),
        })
    }

    /// Every present column's text form, in relation order.
    pub fn rendered(&self) -> Result<Vec<(&str, Rendered<'_>)>, RowError> {
        self.iter()
            .map(|(n, t, v)| Ok((n, self.render(n, t, v)?)))
            .collect()
    }

    /// The present columns as a JSON object: name → text form (string), SQL NULL → `null`.
    /// Unchanged-TOAST columns are left out (see [`Row::unchanged_toast`]).
    pub fn to_json(&self) -> Result<Map<String, Value>, RowError> {
        let mut m = Map::new();
        for (n, t, v) in self.iter() {
            match self.render(n, t, v)? {
                Rendered::Null => {
                    m.insert(n.to_string(), Value::Null);
                }
                Rendered::UnchangedToast => {}
                Rendered::Text(s) => {
                    m.insert(n.to_string(), Value::String(s.into_owned()));
                }
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::types::{ColumnDesc, ReplicaIdentity};
    use bytes::Bytes;

    fn rel() -> RelationBody {
        let col = |flags, name: &str, type_oid| ColumnDesc {
            flags,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        RelationBody {
            oid: 42,
            namespace: "public".into(),
            name: "Tbl ü".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![col(1, "id", 23), col(0, "Big", 25), col(0, "mood", 16390)],
        }
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn rows_are_named_and_key_tuples_hold_only_keys() {
        let mut c = RelationCache::new();
        assert!(c.observe(&LogicalMessage::Relation {
            xid: None,
            body: rel()
        }));
        let row = c
            .row(
                42,
                TupleData(vec![
                    text("1"),
                    TupleValue::UnchangedToast,
                    TupleValue::Null,
                ]),
            )
            .unwrap();
        assert_eq!(row.len(), 3);
        assert_eq!(row.unchanged_toast(), vec!["Big"]);
        assert_eq!(row.value_json("Big").unwrap(), None);
        assert_eq!(row.value_json("mood").unwrap(), Some(Value::Null));
        assert_eq!(row.value_json("id").unwrap(), Some(Value::from("1")));
        assert_eq!(row.value_json("nope").unwrap(), None);
        let j = row.to_json().unwrap();
        assert_eq!(
            Value::Object(j),
            serde_json::json!({"id": "1", "mood": null})
        );
        let key = c
            .old_row(
                42,
                OldKind::Key,
                TupleData(vec![text("1"), TupleValue::Null, TupleValue::Null]),
            )
            .unwrap();
        assert_eq!(key.len(), 1);
        assert_eq!(key.key().map(|k| k.0).collect::<Vec<_>>(), vec!["id"]);
        assert_eq!(
            row.key().map(|k| k.2.clone()).collect::<Vec<_>>(),
            vec![text("1")]
        );
        assert_eq!(key.get("Big"), None);
        assert_eq!(key.get("id"), Some(&text("1")));
        assert_eq!(
            Value::Object(key.to_json().unwrap()),
            serde_json::json!({"id": "1"})
        );
    }

    #[test]
    fn mismatches_and_bad_values_are_errors() {
        let mut c = RelationCache::new();
        assert_eq!(
            c.row(42, TupleData(vec![])).unwrap_err(),
            RowError::UnknownRelation(42)
        );
        c.insert_relation(rel());
        let e = c.row(42, TupleData(vec![text("1")])).unwrap_err();
        assert!(
            matches!(
                e,
                RowError::ColumnCount {
                    expected: 3,
                    got: 1,
                    ..
                }
            ),
            "{e}"
        );
        let bad = TupleValue::Text(Bytes::from_static(b"\xff\xfe"));
        let row = c
            .row(42, TupleData(vec![text("1"), bad, TupleValue::Null]))
            .unwrap();
        assert!(matches!(row.to_json(), Err(RowError::InvalidUtf8 { .. })));
        // A binary value of a type without renderer names the oid.
        let mut body = rel();
        body.columns[1].type_oid = 869; // inet
        c.insert_relation(body);
        let row = c
            .row(
                42,
                TupleData(vec![
                    text("1"),
                    TupleValue::Binary(Bytes::from_static(b"\x02\x20\0\x04\x7f\0\0\x01")),
                    TupleValue::Null,
                ]),
            )
            .unwrap();
        let e = row.to_json().unwrap_err();
        assert!(e.to_string().contains("869"), "{e}");
        c.clear();
        assert!(c.is_empty());
    }

    #[test]
    fn user_types_from_y_and_declared_domains() {
        let mut c = RelationCache::new();
        c.insert_relation(rel());
        c.observe(&LogicalMessage::Type {
            xid: None,
            oid: 16390,
            namespace: "public".into(),
            name: "Mood".into(),
        });
        assert_eq!(c.type_name(16390).as_deref(), Some("public.Mood"));
        let enum_val = TupleValue::Binary(Bytes::from_static("très".as_bytes()));
        let row = c
            .row(42, TupleData(vec![text("1"), TupleValue::Null, enum_val]))
            .unwrap();
        assert_eq!(row.to_json().unwrap()["mood"], "très");
        // Declared as a domain over int4 it reads as an int.
        c.set_user_type(16390, "public", "posint", UserType::Domain(23));
        let v = TupleValue::Binary(Bytes::from_static(&[0, 0, 0, 7]));
        let row = c
            .row(42, TupleData(vec![text("1"), TupleValue::Null, v]))
            .unwrap();
        assert_eq!(row.to_json().unwrap()["mood"], "7");
    }
}

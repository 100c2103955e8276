//! Reading the source table in key-ordered chunks, each in one short statement.
//!
//! Rows come back in the binary send form of each column ([`crate::raw`]) as
//! [`TupleData`], the same shape the pgoutput stream delivers in binary mode, so apply treats
//! a copied row and a streamed row alike. Keys of any type and arity page correctly because
//! the server compares them (`(k1, k2) > ($1, $2)` on the key's btree order), never Rust.
//! Nothing here locks rows or holds a snapshot beyond one chunk.

use bytes::Bytes;
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use crate::pgoutput::{TupleData, TupleValue};
use crate::raw::{RawParam, RawValue};

/// A key value: the binary send form of each key column, in key order.
pub type KeyValue = Vec<Bytes>;

/// The part of the source table the copier reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySource {
    /// The table, already quoted (`"public"."orders"`).
    pub table_sql: String,
    /// Every column to copy, already quoted, in the relation's attribute order (the order
    /// pgoutput sends them in).
    pub columns: Vec<String>,
    /// Positions in `columns` of the key columns, in the key's (index) order.
    pub key: Vec<usize>,
    /// The type oid of each column in `columns` that a read must find (empty: not checked).
    pub types: Vec<u32>,
}

/// A server snapshot as `pg_current_snapshot()` prints it (`xmin:xmax:xip,…`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Every transaction id below this is finished.
    pub xmin: u64,
    /// Every transaction id at or above this had not started.
    pub xmax: u64,
    /// Transactions in progress when the snapshot was taken.
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// Parses the text form of `pg_snapshot`.
    pub fn parse(s: &str) -> Option<Snapshot> {
        let mut parts = s.trim().split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next() {
            Some("") | None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Snapshot { xmin, xmax, xip })
    }

    /// Whether the changes of transaction `xid` (32-bit, as pgoutput sends it) are visible
    /// in this snapshot, assuming it committed. The 32-bit xid is placed within 2^31 of
    /// `xmax`, as PostgreSQL's wraparound protection guarantees for any live transaction.
    pub fn sees(&self, xid: u32) -> bool {
        let xmax32 = self.xmax as u32;
        if (xid.wrapping_sub(xmax32) as i32) >= 0 {
            return false;
        }
        let full = self.xmax.wrapping_sub(u64::from(xmax32.wrapping_sub(xid)));
        !self.xip.contains(&full)
    }
}

/// One chunk of source rows.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    /// The rows, in key order.
    pub rows: Vec<TupleData>,
    /// The key of the last row, where the next chunk starts (exclusive).
    pub last_key: Option<KeyValue>,
    /// The snapshot the rows were read in.
    pub snapshot: Snapshot,
}

/// Reading the source failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A query failed.
    #[error("{context}: {}", crate::catalog::db_message(.source))]
    Query {
        /// What was being done.
        context: &'static str,
        /// The server's error.
        source: tokio_postgres::Error,
    },
    /// The server returned something we cannot use.
    #[error("{0}")]
    Protocol(String),
    /// The source description is unusable.
    #[error("{0}")]
    Spec(String),
    /// The source table no longer has the columns the copy was prepared for (a DDL since):
    /// nothing was read.
    #[error("the source table changed shape: {0}")]
    ShapeChanged(String),
}

/// The most keys [`CopySource::read_keys`] takes in one call.
pub const MAX_READ_KEYS: usize = 1000;

pub(crate) fn q(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> CopyError {
    move |source| CopyError::Query { context, source }
}

/// Runs a chunk's query in its transaction, rows streamed as they come. `types`, when not
/// empty, are the type oids its leading result columns must have: a column retyped since
/// would otherwise come back as bytes of another type.
pub(crate) async fn chunk_rows(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    params: &[Box<dyn ToSql + Sync + Send>],
    types: &[u32],
) -> Result<tokio_postgres::RowStream, CopyError> {
    let stmt = tx.prepare(sql).await.map_err(|e| {
        if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_COLUMN) {
            CopyError::ShapeChanged(crate::catalog::db_message(&e))
        } else {
            q("preparing the chunk query")(e)
        }
    })?;
    for (col, &want) in stmt.columns().iter().zip(types) {
        if col.type_().oid() != want {
            return Err(CopyError::ShapeChanged(format!(
                "column {} is now of type {} (oid {}), was oid {want}",
                col.name(),
                col.type_().name(),
                col.type_().oid()
            )));
        }
    }
    tx.query_raw(
        &stmt,
        params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)),
    )
    .await
    .map_err(q("reading a chunk"))
}

/// Starts the read-only REPEATABLE READ transaction one chunk of `table` is read in, and
/// returns it with its snapshot (the watermark logic needs it).
///
/// The table is locked (`ACCESS SHARE`, what the read takes anyway) before the snapshot is:
/// a DDL that rewrites the table and commits between the snapshot and the read would
/// otherwise show the read an empty table (a rewrite is not MVCC-safe), and the chunk would
/// be recorded as copied with none of its rows.
pub(crate) async fn chunk_transaction<'a>(
    client: &'a mut Client,
    table: &str,
) -> Result<(tokio_postgres::Transaction<'a>, Snapshot), CopyError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(q("starting the chunk transaction"))?;
    // LOCK does not fix a REPEATABLE READ snapshot; the query below does.
    tx.batch_execute(&format!("LOCK TABLE {table} IN ACCESS SHARE MODE"))
        .await
        .map_err(q("locking the source table for a chunk"))?;
    let snap: String = tx
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await
        .map_err(q("reading the chunk snapshot"))?
        .get(0);
    let snapshot = Snapshot::parse(&snap)
        .ok_or_else(|| CopyError::Protocol(format!("unparsable snapshot {snap:?}")))?;
    Ok((tx, snapshot))
}

impl CopySource {
    pub(crate) fn check(&self) -> Result<(), CopyError> {
        if self.key.is_empty() {
            return Err(CopyError::Spec(format!(
                "{} has no key columns to page by",
                self.table_sql
            )));
        }
        if self.key.iter().any(|&k| k >= self.columns.len()) {
            return Err(CopyError::Spec("key column position out of range".into()));
        }
        Ok(())
    }

    pub(crate) fn key_list(&self) -> String {
        self.key
            .iter()
            .map(|&k| self.columns[k].as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `($first, $first+1, …)` for the key's arity.
    fn key_params(&self, first: usize) -> String {
        let p: Vec<String> = (0..self.key.len())
            .map(|i| format!("${}", first + i))
            .collect();
        p.join(", ")
    }

    /// The SELECT of one chunk: rows with key > `after` (if any) and ≤ `upto` (if any), in
    /// key order, at most `limit` (if any).
    pub fn chunk_sql(&self, after: bool, upto: bool, limit: bool) -> String {
        self.chunk_sql_of(&self.columns.join(", "), after, upto, limit)
    }

    /// [`Self::chunk_sql`] with another select list (e.g. the target's columns computed by the
    /// transform, then the key).
    pub(crate) fn chunk_sql_of(&self, list: &str, after: bool, upto: bool, limit: bool) -> String {
        let keys = self.key_list();
        let mut conds = Vec::new();
        let mut next = 1;
        if after {
            conds.push(format!("({keys}) > ({})", self.key_params(next)));
            next += self.key.len();
        }
        if upto {
            conds.push(format!("({keys}) <= ({})", self.key_params(next)));
            next += self.key.len();
        }
        let mut sql = format!("SELECT {list} FROM {}", self.table_sql);
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        sql.push_str(&format!(" ORDER BY {keys}"));
        if limit {
            sql.push_str(&format!(" LIMIT ${next}"));
        }
        sql
    }

    /// Reads the next chunk after `after` (exclusive), up to `upto` (inclusive) if given, at
    /// most `limit` rows, in a REPEATABLE READ transaction of its own whose snapshot is
    /// returned with the rows (the watermark logic needs it).
    pub async fn read_chunk(
        &self,
        client: &mut Client,
        after: Option<&KeyValue>,
        upto: Option<&KeyValue>,
        limit: Option<i64>,
    ) -> Result<Chunk, CopyError> {
        self.check()?;
        let sql = self.chunk_sql(after.is_some(), upto.is_some(), limit.is_some());
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        for k in [after, upto].into_iter().flatten() {
            self.push_key(&mut params, k)?;
        }
        if let Some(l) = limit {
            params.push(Box::new(l));
        }
        self.read(client, &sql, params).await
    }

    /// Reads the current rows of the given keys (those that still exist), like a chunk: one
    /// REPEATABLE READ transaction whose snapshot comes back with the rows. At most
    /// [`MAX_READ_KEYS`] keys per call keeps the statement's parameters well inside the
    /// protocol's limit.
    pub async fn read_keys(
        &self,
        client: &mut Client,
        keys: &[KeyValue],
    ) -> Result<Chunk, CopyError> {
        self.check()?;
        if keys.len() > MAX_READ_KEYS {
            return Err(CopyError::Spec("at most 1,000 keys per re-read".into()));
        }
        let arity = self.key.len();
        let tuples: Vec<String> = (0..keys.len())
            .map(|i| format!("({})", self.key_params(1 + i * arity)))
            .collect();
        let sql = if keys.is_empty() {
            format!(
                "SELECT {} FROM {} WHERE false",
                self.columns.join(", "),
                self.table_sql
            )
        } else {
            format!(
                "SELECT {} FROM {} WHERE ({}) IN ({}) ORDER BY {}",
                self.columns.join(", "),
                self.table_sql,
                self.key_list(),
                tuples.join(", "),
                self.key_list()
            )
        };
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        for k in keys {
            self.push_key(&mut params, k)?;
        }
        self.read(client, &sql, params).await
    }

    pub(crate) fn push_key(
        &self,
        params: &mut Vec<Box<dyn ToSql + Sync + Send>>,
        k: &KeyValue,
    ) -> Result<(), CopyError> {
        if k.len() != self.key.len() {
            return Err(CopyError::Spec(
                "key value arity differs from the key".into(),
            ));
        }
        for v in k {
            params.push(Box::new(RawParam(v.clone())));
        }
        Ok(())
    }

    async fn read(
        &self,
        client: &mut Client,
        sql: &str,
        params: Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> Result<Chunk, CopyError> {
        let (tx, snapshot) = chunk_transaction(client, &self.table_sql).await?;
        let stream = chunk_rows(&tx, sql, &params, &self.types).await?;
        pin_mut!(stream);
        let ncols = self.columns.len();
        let mut rows = Vec::new();
        while let Some(row) = stream.try_next().await.map_err(q("reading a chunk row"))? {
            let mut vals = Vec::with_capacity(ncols);
            for i in 0..ncols {
                let v: Option<RawValue> = row.try_get(i).map_err(q("taking a chunk column"))?;
                vals.push(match v {
                    Some(RawValue(b)) => TupleValue::Binary(b),
                    None => TupleValue::Null,
                });
            }
            rows.push(TupleData(vals));
        }
        tx.commit()
            .await
            .map_err(q("ending the chunk transaction"))?;
        let last_key = match rows.last() {
            Some(r) => Some(self.key_of(r)?),
            None => None,
        };
        Ok(Chunk {
            rows,
            last_key,
            snapshot,
        })
    }

    /// The key value of a row read by [`Self::read_chunk`].
    pub fn key_of(&self, row: &TupleData) -> Result<KeyValue, CopyError> {
        self.key
            .iter()
            .map(|&k| match row.0.get(k) {
                Some(TupleValue::Binary(b)) => Ok(b.clone()),
                _ => Err(CopyError::Protocol(
                    "a key column is NULL or not binary".into(),
                )),
            })
            .collect()
    }

    /// The key `n` rows after `after` (the upper bound of a chunk of `n` rows), read from the
    /// key's index alone; `None` when fewer than `n` rows remain. Lets several workers read
    /// disjoint ranges at once.
    pub async fn boundary_after(
        &self,
        client: &Client,
        after: Option<&KeyValue>,
        n: i64,
    ) -> Result<Option<KeyValue>, CopyError> {
        self.check()?;
        let keys = self.key_list();
        let mut sql = format!("SELECT {keys} FROM {}", self.table_sql);
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut next = 1;
        if let Some(k) = after {
            sql.push_str(&format!(" WHERE ({keys}) > ({})", self.key_params(1)));
            next += self.key.len();
            for v in k {
                params.push(Box::new(RawParam(v.clone())));
            }
        }
        sql.push_str(&format!(" ORDER BY {keys} OFFSET ${next} LIMIT 1"));
        params.push(Box::new((n - 1).max(0)));
        let stmt = client
            .prepare(&sql)
            .await
            .map_err(q("preparing the boundary query"))?;
        let stream = client
            .query_raw(
                &stmt,
                params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)),
            )
            .await
            .map_err(q("finding a chunk boundary"))?;
        pin_mut!(stream);
        let Some(row) = stream
            .try_next()
            .await
            .map_err(q("finding a chunk boundary"))?
        else {
            return Ok(None);
        };
        let mut key = Vec::with_capacity(self.key.len());
        for i in 0..self.key.len() {
            let v: RawValue = row.try_get(i).map_err(q("taking a boundary key"))?;
            key.push(v.0);
        }
        Ok(Some(key))
    }
}

/// Emits a watermark into the WAL as a non-transactional logical message (it appears in
/// the change stream at its own position, between the commits around it) and returns its LSN.
pub async fn emit_watermark(
    client: &Client,
    prefix: &str,
    content: &str,
) -> Result<crate::lsn::Lsn, CopyError> {
    let lsn: String = client
        .query_one(
            "SELECT pg_logical_emit_message(false, $1, $2)::text",
            &[&prefix, &content],
        )
        .await
        .map_err(q("emitting a watermark"))?
        .get(0);
    lsn.parse()
        .map_err(|e: crate::lsn::ParseLsnError| CopyError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_parses_and_judges_visibility() {
        let s = Snapshot::parse("100:105:101,103").unwrap();
        assert_eq!(
            s,
            Snapshot {
                xmin: 100,
                xmax: 105,
                xip: vec![101, 103]
            }
        );
        assert!(s.sees(99));
        assert!(s.sees(100));
        assert!(!s.sees(101));
        assert!(s.sees(102));
        assert!(!s.sees(103));
        assert!(s.sees(104));
        assert!(!s.sees(105));
        assert!(!s.sees(200));
        assert_eq!(Snapshot::parse("7:7:").unwrap().xip, Vec::<u64>::new());
        for bad in ["", "1", "a:b:", "1:2:x", "1:2:3:4"] {
            assert!(Snapshot::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn snapshot_in_a_later_epoch_compares_32_bit_xids() {
        let e = 3u64 << 32;
        let s = Snapshot {
            xmin: e + 10,
            xmax: e + 20,
            xip: vec![e + 15],
        };
        assert!(s.sees(12));
        assert!(!s.sees(15));
        assert!(!s.sees(25));
        // An xid just below the epoch boundary belongs to the previous epoch: old, visible.
        assert!(s.sees(u32::MAX));
    }

    #[test]
    fn chunk_sql_pages_by_the_whole_key() {
        let src = CopySource {
            table_sql: "\"s\".\"t\"".into(),
            columns: vec!["\"a\"".into(), "\"b\"".into(), "\"c\"".into()],
            key: vec![2, 0],
            types: Vec::new(),
        };
        assert_eq!(
            src.chunk_sql(true, true, true),
            "SELECT \"a\", \"b\", \"c\" FROM \"s\".\"t\" WHERE (\"c\", \"a\") > ($1, $2) AND (\"c\", \"a\") <= ($3, $4) ORDER BY \"c\", \"a\" LIMIT $5"
        );
        assert_eq!(
            src.chunk_sql(false, false, false),
            "SELECT \"a\", \"b\", \"c\" FROM \"s\".\"t\" ORDER BY \"c\", \"a\""
        );
    }
}

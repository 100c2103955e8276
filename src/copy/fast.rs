//! Reading a chunk already in the target's shape, as binary COPY tuples.
//!
//! The bulk path of the backfill: the source evaluates the transform (each target column's
//! expression, cast to the target column's type) in the chunk's own SELECT, so the rows can go
//! into the target with one plain binary `COPY` — no stage table, no `ON CONFLICT`, no
//! coalescing. Each row also carries the source key (after the target columns) so that rows
//! the stream changed inside the chunk's watermark window can be left out.
//!
//! Like [`super::chunk`], it must never hold a snapshot beyond one chunk, never lock source
//! rows, and never write the target.

use std::collections::HashSet;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{pin_mut, TryStreamExt};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::chunk::{chunk_rows, chunk_transaction, q, CopyError, CopySource, KeyValue, Snapshot};
use crate::raw::RawRef;

/// How to read chunks in the target's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransformedSource {
    /// The source table, its columns and key.
    pub source: CopySource,
    /// One SQL expression per target column written, over the source's column names, already
    /// cast to the target column's type (`CAST((expr) AS type)`).
    pub select: Vec<String>,
    /// Session settings to evaluate the expressions under (name, value): the target's, where
    /// the stream's changes are transformed, so that both paths compute the same values
    /// (`TimeZone` for `timestamptz` to `date`, `DateStyle` for `::text`, …).
    pub settings: Vec<(String, String)>,
}

/// One chunk in the target's shape.
#[derive(Debug, Clone, Default)]
pub struct TargetRows {
    /// The rows as binary COPY tuples (field count, then length and bytes of each target
    /// column), back to back.
    pub data: Bytes,
    /// Where each tuple ends in `data`.
    pub ends: Vec<usize>,
    /// Each row's source key, in the key's order.
    pub keys: Vec<KeyValue>,
    /// The snapshot the rows were read in.
    pub snapshot: Snapshot,
}

impl TargetRows {
    /// How many rows.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when the chunk has no rows.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The tuples whose key is not in `skip`, and how many there are. Without keys to skip,
    /// the buffer is shared, not copied.
    pub fn without(&self, skip: &HashSet<KeyValue>) -> (Bytes, u64) {
        if skip.is_empty() || !self.keys.iter().any(|k| skip.contains(k)) {
            return (self.data.clone(), self.ends.len() as u64);
        }
        let mut out = BytesMut::with_capacity(self.data.len());
        let mut n = 0u64;
        let mut start = 0;
        for (end, key) in self.ends.iter().zip(&self.keys) {
            if !skip.contains(key) {
                out.extend_from_slice(&self.data[start..*end]);
                n += 1;
            }
            start = *end;
        }
        (out.freeze(), n)
    }
}

impl TransformedSource {
    /// Reads the rows with key > `after` and ≤ `upto` (each bound when given), in key order,
    /// in a REPEATABLE READ transaction of its own whose snapshot is returned with them.
    pub async fn read_chunk(
        &self,
        client: &mut Client,
        after: Option<&KeyValue>,
        upto: Option<&KeyValue>,
    ) -> Result<TargetRows, CopyError> {
        let src = &self.source;
        src.check()?;
        if self.select.is_empty() || self.select.len() > i16::MAX as usize {
            return Err(CopyError::Spec(
                "the target must have between 1 and 32767 columns".into(),
            ));
        }
        let mut list = self.select.clone();
        list.extend(src.key.iter().map(|&k| src.columns[k].clone()));
        let sql = src.chunk_sql_of(&list.join(", "), after.is_some(), upto.is_some(), false);
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        for k in [after, upto].into_iter().flatten() {
            src.push_key(&mut params, k)?;
        }
        let (tx, snapshot) = chunk_transaction(client, &self.source.table_sql).await?;
        for (name, value) in &self.settings {
            tx.execute("SELECT set_config($1, $2, true)", &[name, value])
                .await
                .map_err(q("applying the target's session settings"))?;
        }
        let stream = chunk_rows(&tx, &sql, &params, &[]).await?;
        pin_mut!(stream);
        let ncols = self.select.len();
        let nkey = src.key.len();
        let mut data = BytesMut::new();
        let mut ends = Vec::new();
        let mut keys = Vec::new();
        while let Some(row) = stream.try_next().await.map_err(q("reading a chunk row"))? {
            data.put_i16(ncols as i16);
            for i in 0..ncols {
                let v: Option<RawRef> = row.try_get(i).map_err(q("taking a chunk column"))?;
                match v {
                    Some(RawRef(b)) => {
                        let len = i32::try_from(b.len()).map_err(|_| {
                            CopyError::Protocol("a value too large for COPY".into())
                        })?;
                        data.put_i32(len);
                        data.extend_from_slice(b);
                    }
                    None => data.put_i32(-1),
                }
            }
            ends.push(data.len());
            let mut key = Vec::with_capacity(nkey);
            for i in ncols..ncols + nkey {
                let v: Option<RawRef> = row.try_get(i).map_err(q("taking a key column"))?;
                let Some(RawRef(b)) = v else {
                    return Err(CopyError::Protocol("a key column is NULL".into()));
                };
                key.push(Bytes::copy_from_slice(b));
            }
            keys.push(key);
        }
        tx.commit()
            .await
            .map_err(q("ending the chunk transaction"))?;
        Ok(TargetRows {
            data: data.freeze(),
            ends,
            keys,
            snapshot,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> TargetRows {
        // Three one-column tuples: 'a', NULL, 'cc'.
        let mut data = BytesMut::new();
        let mut ends = Vec::new();
        for v in [Some(&b"a"[..]), None, Some(&b"cc"[..])] {
            data.put_i16(1);
            match v {
                Some(b) => {
                    data.put_i32(b.len() as i32);
                    data.extend_from_slice(b);
                }
                None => data.put_i32(-1),
            }
            ends.push(data.len());
        }
        TargetRows {
            data: data.freeze(),
            ends,
            keys: vec![
                vec![Bytes::from_static(b"1")],
                vec![Bytes::from_static(b"2")],
                vec![Bytes::from_static(b"3")],
            ],
            snapshot: Snapshot::default(),
        }
    }

    #[test]
    fn without_leaves_out_exactly_the_skipped_keys() {
        let r = rows();
        let (all, n) = r.without(&HashSet::new());
        assert_eq!((all.len(), n), (r.data.len(), 3));
        let skip: HashSet<KeyValue> = [vec![Bytes::from_static(b"2")]].into_iter().collect();
        let (some, n) = r.without(&skip);
        assert_eq!(n, 2);
        let mut expect = BytesMut::new();
        expect.extend_from_slice(&r.data[..r.ends[0]]);
        expect.extend_from_slice(&r.data[r.ends[1]..]);
        assert_eq!(some, expect.freeze());
        let skip: HashSet<KeyValue> = r.keys.iter().cloned().collect();
        assert_eq!(r.without(&skip).1, 0);
    }
}

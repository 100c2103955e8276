//! Apply throughput: shadowmig's batched, coalesced, set-based apply against (a) row-at-a-time
//! apply of the same changes through a prepared `INSERT … ON CONFLICT`, one target transaction
//! per source transaction (what native logical replication's apply worker does), and (b) native
//! logical replication itself (publication + subscription on the same cluster).
//!
//! Run: `cargo bench --bench apply` (env `APPLY_BENCH_CHANGES`, default 200000;
//! `APPLY_BENCH_BATCH`, default 10000; `APPLY_BENCH_NATIVE=0` skips the subscription run).

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use shadowmig::apply::{
    ApplyTarget, ApplyWriter, Change, ProgressKey, SourceChange, SourceColumn, TargetColumn,
};
use shadowmig::lsn::Lsn;
use shadowmig::pgoutput::{TupleData, TupleValue};
use shadowmig::state::{self, Direction};
use shadowmig::testpg::{ClusterConfig, TestCluster};
use tokio_postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};
use tokio_postgres::Client;

const INITIAL_ROWS: i64 = 100_000;
const CHANGES_PER_TXN: i64 = 5;

/// A column value as the server sent it (binary result format = the type's send form).
struct Raw(Option<Bytes>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Some(Bytes::copy_from_slice(raw))))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(None))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A parameter sent exactly as pgoutput delivered it (binary send form), as an apply worker
/// would bind it.
#[derive(Debug)]
struct RawParam<'a>(&'a TupleValue);

impl ToSql for RawParam<'_> {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            TupleValue::Binary(b) => {
                out.put_slice(b);
                Ok(IsNull::No)
            }
            TupleValue::Null => Ok(IsNull::Yes),
            _ => Err("benchmark only sends binary values".into()),
        }
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    to_sql_checked!();
}

const TABLE: &str =
    "id bigint PRIMARY KEY, customer_id bigint NOT NULL, total_amount numeric(12,2) NOT NULL, \
    status text NOT NULL, note text, created_at timestamptz NOT NULL";
const COLS: &str = "id, customer_id, total_amount, status, note, created_at";

fn initial_rows(table: &str) -> String {
    format!(
        "INSERT INTO {table} SELECT g, g % 997, g * 1.25, 'new', 'note ' || g, \
         '2024-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, {INITIAL_ROWS}) g; \
         CREATE INDEX ON {table} (customer_id); ANALYZE {table};"
    )
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

async fn content_hash(cl: &Client, table: &str) -> String {
    cl.query_one(
        &format!("SELECT md5(string_agg(x::text, ',' ORDER BY id)) FROM {table} x"),
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = env_num("APPLY_BENCH_CHANGES", 200_000) as i64;
    let batch_target = env_num("APPLY_BENCH_BATCH", 10_000);
    let native = std::env::var("APPLY_BENCH_NATIVE")
        .map(|v| v != "0")
        .unwrap_or(true);

    let cluster = TestCluster::start(&ClusterConfig {
        durable: true,
        ..ClusterConfig::default()
            .setting("max_wal_size", "4GB")
            .setting("shared_buffers", "512MB")
            .setting("max_replication_slots", "10")
            .setting("max_wal_senders", "10")
    })
    .expect("start cluster");
    for db in ["src", "tgt", "native"] {
        cluster
            .psql("postgres", &format!("CREATE DATABASE {db}"))
            .unwrap();
    }

    // The workload: n changes in source transactions of CHANGES_PER_TXN; 30 % inserts of new
    // ids, 70 % updates of random existing rows.
    cluster
        .psql(
            "src",
            &format!(
                "CREATE TABLE orders ({TABLE}); {init}
                 SELECT setseed(0.42);
                 CREATE TABLE workload AS
                 SELECT seq, (seq / {CHANGES_PER_TXN})::bigint AS txn, op,
                        CASE WHEN op = 'i' THEN 1000000 + seq ELSE 1 + floor(random() * {INITIAL_ROWS})::bigint END AS id,
                        floor(random() * 997)::bigint AS customer_id,
                        round((random() * 1000)::numeric, 2) AS total_amount,
                        (ARRAY['paid','shipped','cancelled','refunded'])[1 + floor(random() * 4)::int] AS status,
                        md5(seq::text) AS note,
                        '2024-06-01'::timestamptz + seq * interval '1 ms' AS created_at
                 FROM (SELECT seq, CASE WHEN random() < 0.3 THEN 'i' ELSE 'u' END AS op
                       FROM generate_series(0::bigint, {last}) seq) s;",
                init = initial_rows("orders"),
                last = n - 1
            ),
        )
        .unwrap();
    for t in ["t_engine", "t_row"] {
        cluster
            .psql(
                "tgt",
                &format!("CREATE TABLE {t} ({TABLE}); {}", initial_rows(t)),
            )
            .unwrap();
    }

    let src = cluster.client("src").await.unwrap();
    let rows = src
        .query(
            &format!("SELECT txn, op, {COLS} FROM workload ORDER BY seq"),
            &[],
        )
        .await
        .unwrap();
    // Each source transaction's changes, as pgoutput would deliver them with `binary 'true'`:
    // an insert or an update that keeps the key is the new row image.
    let mut txns: Vec<Vec<SourceChange>> = Vec::new();
    let mut inserts = 0usize;
    for r in &rows {
        let txn: i64 = r.get(0);
        let op: String = r.get(1);
        inserts += usize::from(op == "i");
        let new = TupleData(
            (2..8)
                .map(|i| match r.get::<_, Raw>(i).0 {
                    Some(b) => TupleValue::Binary(b),
                    None => TupleValue::Null,
                })
                .collect(),
        );
        let lsn = Lsn(1 + txn as u64);
        if txns.len() as i64 <= txn {
            txns.push(Vec::new());
        }
        txns[txn as usize].push(SourceChange {
            lsn,
            change: Change::Upsert { new },
        });
    }
    let total: usize = txns.iter().map(Vec::len).sum();
    println!(
        "apply bench: {total} changes ({inserts} inserts, {} updates) in {} source transactions, \
         target pre-filled with {INITIAL_ROWS} rows, PK + secondary index",
        total - inserts,
        txns.len()
    );

    // shadowmig apply.
    let mut tgt = cluster.client("tgt").await.unwrap();
    state::ensure_schema(&mut tgt, 5000).await.unwrap();
    let types = [
        ("id", "bigint", true),
        ("customer_id", "bigint", false),
        ("total_amount", "numeric(12,2)", false),
        ("status", "text", false),
        ("note", "text", false),
        ("created_at", "timestamp with time zone", false),
    ];
    let source_columns: Vec<SourceColumn> = types
        .iter()
        .map(|(n, t, k)| SourceColumn {
            name: n.to_string(),
            type_sql: t.to_string(),
            is_identity: *k,
        })
        .collect();
    let target = ApplyTarget {
        table: ("public".into(), "t_engine".into()),
        target_columns: source_columns
            .iter()
            .map(|c| TargetColumn::copy(&c.name))
            .collect(),
        source_columns,
        target_key: vec!["id".into()],
    };
    let mut w = ApplyWriter::new(
        target,
        ProgressKey {
            migration: "bench".into(),
            direction: Direction::Forward,
        },
    )
    .unwrap();
    let start = Instant::now();
    let mut batch: Vec<SourceChange> = Vec::with_capacity(batch_target + 16);
    let mut batches = 0;
    let mut written = 0u64;
    for (i, t) in txns.iter().enumerate() {
        batch.extend_from_slice(t);
        if batch.len() >= batch_target || i + 1 == txns.len() {
            let lsn = batch.last().map(|c| c.lsn).unwrap_or_default();
            let s = w.apply_batch(&mut tgt, &batch, lsn).await.unwrap();
            written += s.upserted;
            batches += 1;
            batch.clear();
        }
    }
    let engine = start.elapsed();
    println!(
        "  shadowmig apply   : {:>8.0} changes/s ({:.2} s, {batches} batches of ~{batch_target}, {written} rows written after coalescing)",
        rate(total, engine),
        engine.as_secs_f64()
    );

    // (a) Row at a time, one target transaction per source transaction.
    tgt.batch_execute("SET synchronous_commit = off")
        .await
        .unwrap();
    let stmt = tgt
        .prepare(&format!(
            "INSERT INTO t_row ({COLS}) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO UPDATE SET \
             customer_id = EXCLUDED.customer_id, total_amount = EXCLUDED.total_amount, \
             status = EXCLUDED.status, note = EXCLUDED.note, created_at = EXCLUDED.created_at"
        ))
        .await
        .unwrap();
    let start = Instant::now();
    for t in &txns {
        let tx = tgt.transaction().await.unwrap();
        for c in t {
            let Change::Upsert { new } = &c.change else {
                unreachable!()
            };
            let p: Vec<RawParam> = new.0.iter().map(RawParam).collect();
            let params: Vec<&(dyn ToSql + Sync)> =
                p.iter().map(|x| x as &(dyn ToSql + Sync)).collect();
            tx.execute(&stmt, &params).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let row = start.elapsed();
    println!(
        "  row at a time     : {:>8.0} changes/s ({:.2} s, {} transactions, synchronous_commit off)",
        rate(total, row),
        row.as_secs_f64(),
        txns.len()
    );
    let (h_engine, h_row) = (
        content_hash(&tgt, "t_engine").await,
        content_hash(&tgt, "t_row").await,
    );
    assert_eq!(
        h_engine, h_row,
        "shadowmig apply and row-at-a-time disagree"
    );
    println!(
        "  ratio shadowmig / row-at-a-time: {:.2}x (targets identical: md5 {h_engine})",
        row.as_secs_f64() / engine.as_secs_f64()
    );

    if !native {
        return;
    }
    // (b) Native logical replication: replay the workload on the source table, then let a
    // subscription in another database apply it; time until it has confirmed the end LSN.
    cluster
        .psql(
            "native",
            &format!("CREATE TABLE orders ({TABLE}); {}", initial_rows("orders")),
        )
        .unwrap();
    cluster
        .psql("src", "CREATE PUBLICATION bench_pub FOR TABLE orders")
        .unwrap();
    cluster
        .psql(
            "src",
            "SELECT pg_create_logical_replication_slot('bench_slot', 'pgoutput')",
        )
        .unwrap();
    cluster
        .psql(
            "native",
            &format!(
                "CREATE SUBSCRIPTION bench_sub CONNECTION 'host=127.0.0.1 port={} user=postgres dbname=src' \
                 PUBLICATION bench_pub WITH (create_slot = false, slot_name = 'bench_slot', \
                 copy_data = false, enabled = false)",
                cluster.port()
            ),
        )
        .unwrap();
    // CALL must be the only statement of its query so that the procedure may COMMIT.
    cluster
        .psql(
            "postgres",
            "ALTER DATABASE src SET synchronous_commit = off",
        )
        .unwrap();
    cluster
        .psql(
            "src",
            "CREATE PROCEDURE replay() LANGUAGE plpgsql AS $$
             DECLARE r record; cur bigint := 0;
             BEGIN
               FOR r IN SELECT * FROM workload ORDER BY seq LOOP
                 IF r.txn <> cur THEN COMMIT; cur := r.txn; END IF;
                 IF r.op = 'i' THEN
                   INSERT INTO orders VALUES (r.id, r.customer_id, r.total_amount, r.status, r.note, r.created_at);
                 ELSE
                   UPDATE orders SET customer_id = r.customer_id, total_amount = r.total_amount,
                     status = r.status, note = r.note, created_at = r.created_at WHERE id = r.id;
                 END IF;
               END LOOP;
             END $$;",
        )
        .unwrap();
    cluster.psql("src", "CALL replay()").unwrap();
    let end_lsn = cluster.psql("src", "SELECT pg_current_wal_lsn()").unwrap();
    let start = Instant::now();
    cluster
        .psql("native", "ALTER SUBSCRIPTION bench_sub ENABLE")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(1200);
    loop {
        let done = cluster
            .psql(
                "native",
                &format!(
                    "SELECT coalesce(bool_or(latest_end_lsn >= '{end_lsn}'), false) FROM pg_stat_subscription \
                     WHERE subname = 'bench_sub'"
                ),
            )
            .unwrap();
        if done == "t" {
            break;
        }
        assert!(Instant::now() < deadline, "subscription did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let nat = start.elapsed();
    let nat_cl = cluster.client("native").await.unwrap();
    let h_native = content_hash(&nat_cl, "orders").await;
    println!(
        "  native logical rep: {:>8.0} changes/s ({:.2} s to confirm {end_lsn}; includes walsender decoding)",
        rate(total, nat),
        nat.as_secs_f64()
    );
    println!(
        "  ratio shadowmig / native: {:.2}x (native target identical: {})",
        nat.as_secs_f64() / engine.as_secs_f64(),
        h_native == h_engine
    );
    cluster
        .psql("native", "ALTER SUBSCRIPTION bench_sub DISABLE; ALTER SUBSCRIPTION bench_sub SET (slot_name = NONE); DROP SUBSCRIPTION bench_sub")
        .unwrap();
}

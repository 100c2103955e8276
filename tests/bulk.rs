//! The backfill's bulk path against a real server: chunks read in the target's shape
//! (`copy::TransformedSource`) and written by `apply::bulk::BulkPool` — plain binary COPY,
//! the upsert fallback when keys are already there, commit order and checkpoints, failures.

use std::collections::HashSet;

use shadowmig::apply::bulk::{BulkPool, BulkTarget};
use shadowmig::apply::{ApplyTarget, SourceColumn, TargetColumn};
use shadowmig::copy::{CopySource, KeyValue, TransformedSource};
use shadowmig::state::{self, ChunkProgress};
use shadowmig::testpg;

/// Names with quotes, spaces, capitals and unicode; a transform that changes a type; a
/// partitioned target keyed differently from the source.
const DDL: &str = r#"
CREATE SCHEMA "Sch ☺";
CREATE TABLE "Sch ☺"."Src ""t""" (id bigint PRIMARY KEY, "Cust Id" int NOT NULL, amount int, note text, ts timestamptz);
INSERT INTO "Sch ☺"."Src ""t"""
  SELECT g, g % 7, g * 3, CASE WHEN g % 5 = 0 THEN NULL ELSE repeat('n', g % 50) END, '2024-01-01 00:00+00'::timestamptz + g * interval '1 hour'
  FROM generate_series(1, 1000) g;
CREATE TABLE "Sch ☺"."Dst ✓" ("Cust Id" int NOT NULL, id bigint NOT NULL, amount_minor bigint NOT NULL, note text, day date,
  PRIMARY KEY ("Cust Id", id)) PARTITION BY HASH ("Cust Id");
CREATE TABLE "Sch ☺"."Dst ✓ 0" PARTITION OF "Sch ☺"."Dst ✓" FOR VALUES WITH (MODULUS 2, REMAINDER 0);
CREATE TABLE "Sch ☺"."Dst ✓ 1" PARTITION OF "Sch ☺"."Dst ✓" FOR VALUES WITH (MODULUS 2, REMAINDER 1);
"#;

/// transform(source) EXCEPT ALL target, both ways: (missing, extra).
const EXPECTED: &str = r#"SELECT "Cust Id", id, coalesce(amount, 0)::bigint * 100, note, (ts AT TIME ZONE 'UTC')::date FROM "Sch ☺"."Src ""t""""#;
const ACTUAL: &str = r#"SELECT "Cust Id", id, amount_minor, note, day FROM "Sch ☺"."Dst ✓""#;

fn diff(c: &testpg::TestCluster, db: &str) -> (String, String) {
    let missing = c
        .psql(
            db,
            &format!("SELECT count(*) FROM ({EXPECTED} EXCEPT ALL {ACTUAL}) d"),
        )
        .unwrap();
    let extra = c
        .psql(
            db,
            &format!("SELECT count(*) FROM ({ACTUAL} EXCEPT ALL {EXPECTED}) d"),
        )
        .unwrap();
    (missing, extra)
}

fn target() -> ApplyTarget {
    let src = |n: &str, id: bool| SourceColumn {
        name: n.into(),
        type_sql: String::new(),
        is_identity: id,
    };
    ApplyTarget {
        table: ("Sch ☺".into(), "Dst ✓".into()),
        source_columns: vec![
            src("id", true),
            src("Cust Id", true),
            src("amount", false),
            src("note", false),
            src("ts", false),
        ],
        target_columns: vec![
            TargetColumn::copy("Cust Id"),
            TargetColumn::copy("id"),
            TargetColumn::expr("amount_minor", "coalesce(amount, 0)::bigint * 100"),
            TargetColumn::copy("note"),
            TargetColumn::expr("day", "(ts AT TIME ZONE 'UTC')::date"),
        ],
        target_key: vec!["Cust Id".into(), "id".into()],
    }
}

fn reader() -> TransformedSource {
    TransformedSource {
        source: CopySource {
            table_sql: r#""Sch ☺"."Src ""t""""#.into(),
            columns: vec![
                "id".into(),
                r#""Cust Id""#.into(),
                "amount".into(),
                "note".into(),
                "ts".into(),
            ],
            key: vec![0],
            types: Vec::new(),
        },
        select: vec![
            r#"CAST(("Cust Id") AS integer)"#.into(),
            "CAST((id) AS bigint)".into(),
            "CAST((coalesce(amount, 0)::bigint * 100) AS bigint)".into(),
            "CAST((note) AS text)".into(),
            "CAST(((ts AT TIME ZONE 'UTC')::date) AS date)".into(),
        ],
        settings: vec![("TimeZone".into(), "UTC".into())],
    }
}

fn key(id: i64) -> KeyValue {
    vec![bytes::Bytes::copy_from_slice(&id.to_be_bytes())]
}

fn checkpoint(last: i64, rows: i64, done: bool) -> ChunkProgress {
    ChunkProgress {
        chunk: 0,
        last_key: Some(vec![Some(format!("{last}"))]),
        rows_copied: rows,
        done,
    }
}

async fn setup(prefix: &str) -> (&'static testpg::TestCluster, String, tokio_postgres::Client) {
    let (c, db) = testpg::fresh_db(prefix).unwrap();
    c.psql(&db, DDL).unwrap();
    let mut cl = c.client(&db).await.unwrap();
    state::ensure_schema(&mut cl, 5000).await.unwrap();
    (c, db, cl)
}

async fn pool(c: &testpg::TestCluster, db: &str, n: usize, name: &str) -> BulkPool {
    let mut clients = Vec::new();
    for _ in 0..n {
        clients.push(c.client(db).await.unwrap());
    }
    BulkPool::start(
        clients,
        BulkTarget::new(&target()).unwrap(),
        name.into(),
        format!("fence:{name}"),
    )
}

#[tokio::test]
async fn chunks_in_the_targets_shape_go_in_by_copy_in_order_with_their_checkpoint() {
    let (c, db, mut cl) = setup("bulk_copy").await;
    let r = reader();
    let mut p = pool(c, &db, 3, "m1").await;
    // Four ranges, handed in out of key order; the checkpoint is whatever each carries.
    let bounds = [
        (Some(250), Some(500)),
        (None, Some(250)),
        (Some(750), None),
        (Some(500), Some(750)),
    ];
    let mut total = 0;
    for (i, (lo, hi)) in bounds.iter().enumerate() {
        let rows = r
            .read_chunk(&mut cl, lo.map(key).as_ref(), hi.map(key).as_ref())
            .await
            .unwrap();
        assert_eq!(rows.len(), 250);
        let (tuples, n) = rows.without(&HashSet::new());
        total += n as i64;
        p.submit(tuples, n, checkpoint(i as i64, total, i == 3))
            .await
            .unwrap();
    }
    p.wait_idle().await.unwrap();
    assert!(p.idle());
    assert_eq!(
        p.counts(),
        (4, 0),
        "no key was there: every chunk by plain COPY"
    );
    assert_eq!(diff(c, &db), ("0".into(), "0".into()));
    // Commits follow the hand-in order: the last checkpoint is the last one handed in.
    let cp = state::read_copy_progress(&cl, "m1").await.unwrap();
    assert_eq!(cp.len(), 1);
    assert_eq!(cp[0].last_key, Some(vec![Some("3".into())]));
    assert_eq!((cp[0].rows_copied, cp[0].done), (1000, true));
}

#[tokio::test]
async fn keys_already_in_the_target_fall_back_to_an_upsert_and_skipped_keys_stay_out() {
    let (c, db, mut cl) = setup("bulk_conflict").await;
    // Stale rows for some keys, as a stream change or an earlier run's chunk leaves them.
    c.psql(
        &db,
        r#"INSERT INTO "Sch ☺"."Dst ✓" SELECT "Cust Id", id, -1, 'stale', NULL FROM "Sch ☺"."Src ""t""" WHERE id % 100 = 0"#,
    )
    .unwrap();
    let r = reader();
    let rows = r.read_chunk(&mut cl, None, None).await.unwrap();
    let skip: HashSet<KeyValue> = [key(7), key(8)].into_iter().collect();
    let (tuples, n) = rows.without(&skip);
    assert_eq!(n, 998);
    let mut p = pool(c, &db, 1, "m2").await;
    p.submit(tuples, n, checkpoint(1000, 998, true))
        .await
        .unwrap();
    p.wait_idle().await.unwrap();
    assert_eq!(
        p.counts(),
        (0, 1),
        "the conflicting chunk went in as an upsert"
    );
    // Every row current (the stale ones overwritten), except the two skipped keys.
    assert_eq!(diff(c, &db), ("2".into(), "0".into()));
    let absent = c
        .psql(
            &db,
            r#"SELECT count(*) FROM "Sch ☺"."Dst ✓" WHERE id IN (7, 8)"#,
        )
        .unwrap();
    assert_eq!(absent, "0");
}

#[tokio::test]
async fn a_failed_chunk_fails_the_pool_and_commits_nothing_after_it() {
    let (c, db, mut cl) = setup("bulk_fail").await;
    let r = reader();
    let good = r.read_chunk(&mut cl, None, Some(&key(100))).await.unwrap();
    // A NULL where the target forbids it: the server refuses the chunk.
    let bad_reader = TransformedSource {
        select: {
            let mut s = reader().select;
            s[2] = "CAST(NULL AS bigint)".into();
            s
        },
        ..reader()
    };
    let bad = bad_reader
        .read_chunk(&mut cl, Some(&key(100)), Some(&key(200)))
        .await
        .unwrap();
    let later = r.read_chunk(&mut cl, Some(&key(200)), None).await.unwrap();
    let mut p = pool(c, &db, 2, "m3").await;
    let all = HashSet::new();
    p.submit(good.without(&all).0, 100, checkpoint(100, 100, false))
        .await
        .unwrap();
    p.submit(bad.without(&all).0, 100, checkpoint(200, 200, false))
        .await
        .unwrap();
    let _ = p
        .submit(later.without(&all).0, 800, checkpoint(1000, 1000, true))
        .await;
    let err = p.wait_idle().await.unwrap_err();
    assert!(err.to_string().contains("null value"), "{err}");
    assert!(!err.connection_lost());
    // Only the chunk before the failure goes in (its writer may still be committing when the
    // failure is reported), with its checkpoint; nothing after it ever does.
    let count = || {
        c.psql(&db, r#"SELECT count(*) FROM "Sch ☺"."Dst ✓""#)
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count() != "100" && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(count(), "100");
    let cp = state::read_copy_progress(&cl, "m3").await.unwrap();
    assert_eq!(cp[0].last_key, Some(vec![Some("100".into())]));
    assert!(p
        .submit(bytes::Bytes::new(), 0, checkpoint(0, 0, false))
        .await
        .is_err());
}

/// A chunk that has to wait for a row lock would wait for ever when the holder is a later
/// chunk (two chunks holding the same target key: the later one holds the row, the earlier one
/// must commit first). Here another session holds the row: the wait times out, and the failure
/// says why instead of hanging.
#[tokio::test]
async fn a_chunk_waiting_for_a_row_lock_fails_with_a_reason_instead_of_hanging() {
    let (c, db, mut cl) = setup("bulk_lockwait").await;
    let r = reader();
    let rows = r.read_chunk(&mut cl, None, Some(&key(10))).await.unwrap();
    // An open transaction holds the target key of the source row with id 5.
    let mut holder = c.client(&db).await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute(r#"INSERT INTO "Sch ☺"."Dst ✓" VALUES (5, 5, 0, 'held', NULL)"#)
        .await
        .unwrap();
    let target = BulkTarget::new(&target())
        .unwrap()
        .lock_timeout(std::time::Duration::from_millis(1000));
    let mut p = BulkPool::start(
        vec![c.client(&db).await.unwrap()],
        target,
        "m4".into(),
        "fence:m4".into(),
    );
    p.submit(rows.data.clone(), 10, checkpoint(10, 10, false))
        .await
        .unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(60), p.wait_idle())
        .await
        .expect("the pool must not hang")
        .expect_err("the held row must fail the chunk");
    assert!(err.to_string().contains("same target key"), "{err}");
    assert!(!err.connection_lost());
    tx.rollback().await.unwrap();
    let n = c
        .psql(&db, r#"SELECT count(*) FROM "Sch ☺"."Dst ✓""#)
        .unwrap();
    assert_eq!(n, "0", "nothing of the failed chunk is committed");
}

//! The backfill's chunk reader against real PostgreSQL: key-ordered pages over a composite,
//! non-integer key cover every row exactly once, and raw binary values survive a round trip.

use shadowmig::copy::{CopySource, KeyValue};
use shadowmig::pgoutput::TupleValue;
use shadowmig::raw::RawParam;
use shadowmig::testpg;

const SETUP: &str = r#"
CREATE SCHEMA "Sales ""EU""";
CREATE TABLE "Sales ""EU"""."Orders ✓" (
    "Region" text NOT NULL,
    n int NOT NULL,
    amount numeric,
    at timestamptz,
    id uuid,
    doc jsonb,
    tags int[],
    PRIMARY KEY ("Region", n)
);
INSERT INTO "Sales ""EU"""."Orders ✓"
SELECT (ARRAY['Zürich','aachen','Berlin','émile', 'o''brien'])[1 + i % 5], i,
       CASE WHEN i % 7 = 0 THEN NULL ELSE i * 1.25 END,
       '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 minute',
       md5(i::text)::uuid,
       jsonb_build_object('i', i, 's', repeat('x', i % 3)),
       ARRAY[i, i + 1]
FROM generate_series(1, 103) AS i;
CREATE TABLE clone (LIKE "Sales ""EU"""."Orders ✓");
"#;

fn source() -> CopySource {
    CopySource {
        table_sql: "\"Sales \"\"EU\"\"\".\"Orders ✓\"".into(),
        columns: [
            "\"Region\"",
            "\"n\"",
            "\"amount\"",
            "\"at\"",
            "\"id\"",
            "\"doc\"",
            "\"tags\"",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        key: vec![0, 1],
        types: Vec::new(),
    }
}

async fn insert_clone(client: &tokio_postgres::Client, rows: &[shadowmig::pgoutput::TupleData]) {
    let stmt = client
        .prepare("INSERT INTO clone VALUES ($1, $2, $3, $4, $5, $6, $7)")
        .await
        .unwrap();
    for r in rows {
        let params: Vec<Option<RawParam>> =
            r.0.iter()
                .map(|v| match v {
                    TupleValue::Binary(b) => Some(RawParam(b.clone())),
                    TupleValue::Null => None,
                    other => panic!("unexpected value {other:?}"),
                })
                .collect();
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        client.execute(&stmt, &refs).await.unwrap();
    }
}

fn assert_same(c: &testpg::TestCluster, db: &str) {
    let t = "\"Sales \"\"EU\"\"\".\"Orders ✓\"";
    let missing = c
        .psql(
            db,
            &format!("SELECT count(*) FROM (TABLE {t} EXCEPT ALL TABLE clone) x"),
        )
        .unwrap();
    let extra = c
        .psql(
            db,
            &format!("SELECT count(*) FROM (TABLE clone EXCEPT ALL TABLE {t}) x"),
        )
        .unwrap();
    assert_eq!((missing.as_str(), extra.as_str()), ("0", "0"));
    assert_eq!(c.psql(db, "SELECT count(*) FROM clone").unwrap(), "103");
}

#[tokio::test]
async fn sequential_chunks_cover_every_row_once_in_key_order() {
    let (c, db) = testpg::fresh_db("copy_seq").unwrap();
    c.psql(&db, SETUP).unwrap();
    let mut client = c.client(&db).await.unwrap();
    let src = source();
    let mut after: Option<KeyValue> = None;
    let mut chunks = 0;
    loop {
        let chunk = src
            .read_chunk(&mut client, after.as_ref(), None, Some(10))
            .await
            .unwrap();
        assert!(chunk.rows.len() <= 10);
        assert!(chunk.snapshot.xmax >= chunk.snapshot.xmin);
        if chunk.rows.is_empty() {
            break;
        }
        chunks += 1;
        insert_clone(&client, &chunk.rows).await;
        after = chunk.last_key;
    }
    assert_eq!(chunks, 11);
    assert_same(c, &db);
}

#[tokio::test]
async fn boundaries_split_the_table_into_disjoint_ranges() {
    let (c, db) = testpg::fresh_db("copy_ranges").unwrap();
    c.psql(&db, SETUP).unwrap();
    let mut client = c.client(&db).await.unwrap();
    let src = source();
    let mut bounds = Vec::new();
    let mut after: Option<KeyValue> = None;
    while let Some(b) = src
        .boundary_after(&client, after.as_ref(), 25)
        .await
        .unwrap()
    {
        bounds.push(b.clone());
        after = Some(b);
    }
    assert_eq!(
        bounds.len(),
        4,
        "103 rows in ranges of 25: 4 bounds and an open tail"
    );
    let mut lo: Option<KeyValue> = None;
    for hi in bounds.iter().map(Some).chain([None]) {
        let chunk = src
            .read_chunk(&mut client, lo.as_ref(), hi, None)
            .await
            .unwrap();
        if hi.is_some() {
            assert_eq!(chunk.rows.len(), 25);
            assert_eq!(chunk.last_key.as_ref(), hi);
        } else {
            assert_eq!(chunk.rows.len(), 3);
        }
        insert_clone(&client, &chunk.rows).await;
        lo = hi.cloned();
    }
    assert_same(c, &db);
}

#[tokio::test]
async fn an_empty_table_and_a_keyless_source_are_handled() {
    let (c, db) = testpg::fresh_db("copy_empty").unwrap();
    c.psql(&db, "CREATE TABLE e (id int PRIMARY KEY)").unwrap();
    let mut client = c.client(&db).await.unwrap();
    let src = CopySource {
        table_sql: "\"e\"".into(),
        columns: vec!["\"id\"".into()],
        key: vec![0],
        types: Vec::new(),
    };
    let chunk = src
        .read_chunk(&mut client, None, None, Some(5))
        .await
        .unwrap();
    assert!(chunk.rows.is_empty() && chunk.last_key.is_none());
    assert_eq!(src.boundary_after(&client, None, 5).await.unwrap(), None);
    let keyless = CopySource { key: vec![], ..src };
    let err = keyless
        .read_chunk(&mut client, None, None, Some(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no key columns"), "{err}");
}

#[tokio::test]
async fn watermarks_return_increasing_lsns() {
    let (c, db) = testpg::fresh_db("copy_wm").unwrap();
    let client = c.client(&db).await.unwrap();
    let a = shadowmig::copy::emit_watermark(&client, "shadowmig", "lw:1")
        .await
        .unwrap();
    let b = shadowmig::copy::emit_watermark(&client, "shadowmig", "hw:1")
        .await
        .unwrap();
    assert!(b > a, "{a} < {b}");
}

#[tokio::test]
async fn read_keys_returns_the_current_rows_of_existing_keys_only() {
    let (c, db) = testpg::fresh_db("copy_keys").unwrap();
    c.psql(&db, SETUP).unwrap();
    let mut client = c.client(&db).await.unwrap();
    let src = source();
    let first = src
        .read_chunk(&mut client, None, None, Some(3))
        .await
        .unwrap();
    let keys: Vec<KeyValue> = first.rows.iter().map(|r| src.key_of(r).unwrap()).collect();
    // Change one, delete another: a re-read sees the current state.
    c.psql(&db, "UPDATE \"Sales \"\"EU\"\"\".\"Orders ✓\" SET amount = -1 WHERE (\"Region\", n) = (SELECT \"Region\", n FROM \"Sales \"\"EU\"\"\".\"Orders ✓\" ORDER BY 1, 2 LIMIT 1)").unwrap();
    c.psql(&db, "DELETE FROM \"Sales \"\"EU\"\"\".\"Orders ✓\" WHERE (\"Region\", n) = (SELECT \"Region\", n FROM \"Sales \"\"EU\"\"\".\"Orders ✓\" ORDER BY 1, 2 OFFSET 1 LIMIT 1)").unwrap();
    let again = src.read_keys(&mut client, &keys).await.unwrap();
    assert_eq!(again.rows.len(), 2);
    assert_eq!(src.key_of(&again.rows[0]).unwrap(), keys[0]);
    assert_eq!(src.key_of(&again.rows[1]).unwrap(), keys[2]);
    assert_ne!(
        again.rows[0], first.rows[0],
        "the updated row is read fresh"
    );
    assert!(src
        .read_keys(&mut client, &[])
        .await
        .unwrap()
        .rows
        .is_empty());
    let too_many = vec![keys[0].clone(); 1001];
    assert!(src.read_keys(&mut client, &too_many).await.is_err());
}

/// A column retyped or dropped since the copy was prepared: the read says so and returns no
/// rows (bytes of the new type would be written as the old one).
#[tokio::test]
async fn a_read_after_a_ddl_reports_the_changed_shape() {
    let (c, db) = testpg::fresh_db("copy_shape").unwrap();
    c.psql(
        &db,
        "CREATE TABLE \"T ☺\" (id int PRIMARY KEY, \"Val\" int, gone text); INSERT INTO \"T ☺\" VALUES (1, 2, 'x')",
    )
    .unwrap();
    let mut client = c.client(&db).await.unwrap();
    let src = CopySource {
        table_sql: "\"T ☺\"".into(),
        columns: vec!["\"id\"".into(), "\"Val\"".into(), "\"gone\"".into()],
        key: vec![0],
        types: vec![23, 23, 25],
    };
    let chunk = src.read_chunk(&mut client, None, None, None).await.unwrap();
    assert_eq!(chunk.rows.len(), 1);
    c.psql(&db, "ALTER TABLE \"T ☺\" ALTER COLUMN \"Val\" TYPE bigint")
        .unwrap();
    let err = src
        .read_chunk(&mut client, None, None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, shadowmig::copy::CopyError::ShapeChanged(_))
            && err.to_string().contains("Val"),
        "{err}"
    );
    // The failed read's transaction is rolled back when the client next talks to the server
    // (psql below blocks this single-threaded runtime).
    client.simple_query("SELECT 1").await.unwrap();
    c.psql(&db, "ALTER TABLE \"T ☺\" DROP COLUMN gone").unwrap();
    let err = src
        .read_keys(
            &mut client,
            &[vec![bytes::Bytes::from_static(&[0, 0, 0, 1])]],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, shadowmig::copy::CopyError::ShapeChanged(_))
            && err.to_string().contains("gone"),
        "{err}"
    );
}

//! The apply engine against a real server: every change is built from rows of a "source" table
//! in the same database (values in the server's own binary send form, or its text output form),
//! applied to a target, and the target is checked against an independent SQL query over the
//! source.

use bytes::Bytes;
use shadowmig::apply::{
    self, ApplyTarget, ApplyWriter, Change, ProgressKey, SourceChange, SourceColumn, TargetColumn,
};
use shadowmig::lsn::Lsn;
use shadowmig::pgoutput::{OldKind, TupleData, TupleValue};
use shadowmig::state::{self, Direction};
use shadowmig::testpg;
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::Client;

/// A column value exactly as the server sent it (binary result format = the type's send form).
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

/// The source table's columns in attribute order, `identity` naming the identity columns.
async fn source_columns(cl: &Client, table: &str, identity: &[&str]) -> Vec<SourceColumn> {
    cl.query(
        "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
         WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        &[&table],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        let name: String = r.get(0);
        SourceColumn {
            is_identity: identity.contains(&name.as_str()),
            name,
            type_sql: r.get(1),
        }
    })
    .collect()
}

fn qi(s: &str) -> String {
    apply::sql::quote_ident(s)
}

/// Rows of `table` matching `filter`, as pgoutput would carry them (binary or text form).
async fn tuples(
    cl: &Client,
    table: &str,
    cols: &[SourceColumn],
    filter: &str,
    text: bool,
) -> Vec<TupleData> {
    let list: Vec<String> = cols
        .iter()
        .map(|c| {
            if text {
                format!("{}::text", qi(&c.name))
            } else {
                qi(&c.name)
            }
        })
        .collect();
    let q = format!("SELECT {} FROM {table} WHERE {filter}", list.join(", "));
    cl.query(&q, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| {
            TupleData(
                (0..cols.len())
                    .map(|i| match r.get::<_, Raw>(i).0 {
                        None => TupleValue::Null,
                        Some(b) if text => TupleValue::Text(b),
                        Some(b) => TupleValue::Binary(b),
                    })
                    .collect(),
            )
        })
        .collect()
}

/// A `K` tuple: identity columns kept, the others `n`.
fn key_only(cols: &[SourceColumn], t: &TupleData) -> TupleData {
    TupleData(
        t.0.iter()
            .zip(cols)
            .map(|(v, c)| {
                if c.is_identity {
                    v.clone()
                } else {
                    TupleValue::Null
                }
            })
            .collect(),
    )
}

fn upserts(lsn: u64, ts: Vec<TupleData>) -> Vec<SourceChange> {
    ts.into_iter()
        .map(|new| SourceChange {
            lsn: Lsn(lsn),
            change: Change::Upsert { new },
        })
        .collect()
}

fn ch(lsn: u64, change: Change) -> SourceChange {
    SourceChange {
        lsn: Lsn(lsn),
        change,
    }
}

fn progress(name: &str) -> ProgressKey {
    ProgressKey {
        migration: name.into(),
        direction: Direction::Forward,
    }
}

async fn setup(prefix: &str, ddl: &str) -> (&'static testpg::TestCluster, String, Client) {
    let (c, db) = testpg::fresh_db(prefix).unwrap();
    c.psql(&db, ddl).unwrap();
    let mut cl = c.client(&db).await.unwrap();
    state::ensure_schema(&mut cl, 5000).await.unwrap();
    (c, db, cl)
}

/// Same-shaped copy target.
fn copy_target(schema: &str, table: &str, cols: &[SourceColumn], key: &[&str]) -> ApplyTarget {
    ApplyTarget {
        table: (schema.into(), table.into()),
        source_columns: cols.to_vec(),
        target_columns: cols.iter().map(|c| TargetColumn::copy(&c.name)).collect(),
        target_key: key.iter().map(|k| k.to_string()).collect(),
    }
}

const ALL_TYPES: &str = r#"
CREATE TYPE "Mood ☺" AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE src (
    id bigint PRIMARY KEY, t text, n numeric(12,2), ts timestamptz, jb jsonb, js json,
    by bytea, arr int[], mood "Mood ☺", u uuid, p point, "Mixed ""Case"" ✓" varchar(20)
);
CREATE TABLE dst (LIKE src INCLUDING ALL);
INSERT INTO src VALUES
 (1, 'héllo', 12.34, '2024-01-02 03:04:05.678+00', '{"a": [1, 2, {"b": null}]}', '{"x" :  1,"x":2}',
  '\x00ff10', '{1,NULL,3}', 'happy', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '(1.5,-2)', 'Ω'),
 (2, '', -0.01, 'infinity', '[]', '"s"', '\x', '{}', 'sad', '00000000-0000-0000-0000-000000000000', '(0,0)', ''),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
"#;

/// The source and target agree row for row (text form of the whole row, so json and point,
/// which have no equality operator, compare too).
fn same(c: &testpg::TestCluster, db: &str, src: &str, dst: &str, order: &str) {
    let q = |t: &str| format!("SELECT string_agg(x::text, E'\\n' ORDER BY {order}) FROM {t} x");
    let a = c.psql(db, &q(src)).unwrap();
    let b = c.psql(db, &q(dst)).unwrap();
    assert_eq!(a, b, "target differs from source");
}

#[tokio::test]
async fn all_types_binary_text_and_mixed() {
    let (c, db, mut cl) = setup("apply_types", ALL_TYPES).await;
    let cols = source_columns(&cl, "src", &["id"]).await;
    let mut w =
        ApplyWriter::new(copy_target("public", "dst", &cols, &["id"]), progress("t")).unwrap();

    // Inserts in binary form.
    let rows = tuples(&cl, "src", &cols, "true", false).await;
    let s = w
        .apply_batch(&mut cl, &upserts(10, rows), Lsn(10))
        .await
        .unwrap();
    assert_eq!((s.upserted, s.deleted), (3, 0));
    assert!(s.needs_reread.is_empty());
    same(c, &db, "src", "dst", "id");

    // Updates in text form (a stream without `binary`).
    c.psql(
        &db,
        r#"UPDATE src SET t = t || ' ✓', n = n * 2, ts = ts + interval '1 day', jb = jsonb_build_object('k', id),
           js = '[1,  2]', by = '\xdeadbeef', arr = '{7,8}', mood = 'ok', u = gen_random_uuid(),
           p = '(3,4)', "Mixed ""Case"" ✓" = 'x"y' WHERE id IN (1, 2)"#,
    )
    .unwrap();
    let rows = tuples(&cl, "src", &cols, "id IN (1, 2)", true).await;
    let s = w
        .apply_batch(&mut cl, &upserts(20, rows), Lsn(20))
        .await
        .unwrap();
    assert_eq!(s.upserted, 2);
    same(c, &db, "src", "dst", "id");

    // One batch mixing forms: row 1 binary, row 3 text, and a delete of row 2 by its K tuple.
    c.psql(
        &db,
        "UPDATE src SET t = 'again', p = '(9,9)' WHERE id IN (1, 3)",
    )
    .unwrap();
    let mut batch = upserts(30, tuples(&cl, "src", &cols, "id = 1", false).await);
    batch.extend(upserts(30, tuples(&cl, "src", &cols, "id = 3", true).await));
    let two = tuples(&cl, "src", &cols, "id = 2", false).await.remove(0);
    batch.push(ch(
        31,
        Change::Delete {
            old: key_only(&cols, &two),
        },
    ));
    c.psql(&db, "DELETE FROM src WHERE id = 2").unwrap();
    let s = w.apply_batch(&mut cl, &batch, Lsn(31)).await.unwrap();
    assert_eq!((s.upserted, s.deleted), (2, 1));
    same(c, &db, "src", "dst", "id");
    assert_eq!(w.committed_lsn(&cl).await.unwrap(), Some(Lsn(31)));
}

#[tokio::test]
async fn quoted_names_and_transforms() {
    let ddl = r#"
    CREATE SCHEMA "Src Schema";
    CREATE TABLE "Src Schema"."Ordérs ""Q"" Ω" ("ID" bigint PRIMARY KEY, "total amount" numeric(10,2), "Note ✓" text);
    CREATE SCHEMA "Shadow Ω";
    CREATE TABLE "Shadow Ω"."Orders v2 ""x""" ("ID" bigint PRIMARY KEY, total_amount_minor bigint NOT NULL,
        currency text NOT NULL, "Note ✓" text);
    INSERT INTO "Src Schema"."Ordérs ""Q"" Ω" SELECT g, g * 1.25, 'n' || g FROM generate_series(1, 50) g;
    "#;
    let (c, db, mut cl) = setup("apply_names", ddl).await;
    let src = r#""Src Schema"."Ordérs ""Q"" Ω""#;
    let cols = source_columns(&cl, src, &["ID"]).await;
    let target = ApplyTarget {
        table: ("Shadow Ω".into(), "Orders v2 \"x\"".into()),
        source_columns: cols.clone(),
        target_columns: vec![
            TargetColumn::copy("ID"),
            TargetColumn::expr("total_amount_minor", r#""total amount"::bigint"#),
            TargetColumn::expr("currency", "'USD'"),
            TargetColumn::copy("Note ✓"),
        ],
        target_key: vec!["ID".into()],
    };
    let mut w = ApplyWriter::new(target, progress("names")).unwrap();
    let rows = tuples(&cl, src, &cols, "true", false).await;
    w.apply_batch(&mut cl, &upserts(5, rows), Lsn(5))
        .await
        .unwrap();
    c.psql(
        &db,
        &format!(r#"UPDATE {src} SET "total amount" = 99.99 WHERE "ID" % 7 = 0"#),
    )
    .unwrap();
    let rows = tuples(&cl, src, &cols, r#""ID" % 7 = 0"#, false).await;
    w.apply_batch(&mut cl, &upserts(6, rows), Lsn(6))
        .await
        .unwrap();
    let expected = format!(r#"SELECT "ID", "total amount"::bigint, 'USD', "Note ✓" FROM {src}"#);
    let table = r#""Shadow Ω"."Orders v2 ""x""""#;
    let actual = format!("SELECT * FROM {table}");
    let diff = c
        .psql(
            &db,
            &format!(
                "SELECT count(*) FROM (({expected} EXCEPT {actual}) UNION ALL ({actual} EXCEPT {expected})) d"
            ),
        )
        .unwrap();
    assert_eq!(diff, "0");
    assert_eq!(
        c.psql(
            &db,
            &format!("SELECT count(*), sum(total_amount_minor) FROM {table}")
        )
        .unwrap(),
        c.psql(
            &db,
            &format!(r#"SELECT count(*), sum("total amount"::bigint) FROM {src}"#)
        )
        .unwrap()
    );
}

const ORDERS: &str = r#"
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL, total_amount numeric(12,2) NOT NULL,
    status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE UNIQUE INDEX orders_customer_id_id ON orders (customer_id, id);
ALTER TABLE orders REPLICA IDENTITY USING INDEX orders_customer_id_id;
CREATE TABLE orders_v2 (customer_id bigint NOT NULL, id bigint NOT NULL, total_amount_minor bigint NOT NULL,
    currency text NOT NULL, status text NOT NULL, created_at timestamptz NOT NULL,
    PRIMARY KEY (customer_id, id)) PARTITION BY HASH (customer_id);
CREATE TABLE orders_v2_p0 PARTITION OF orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE orders_v2_p1 PARTITION OF orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE orders_v2_p2 PARTITION OF orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE orders_v2_p3 PARTITION OF orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 3);
INSERT INTO orders (id, customer_id, total_amount, status)
    SELECT g, g % 13, g * 3.5, 'new' FROM generate_series(1, 200) g;
"#;

fn orders_target(cols: &[SourceColumn]) -> ApplyTarget {
    ApplyTarget {
        table: ("public".into(), "orders_v2".into()),
        source_columns: cols.to_vec(),
        target_columns: vec![
            TargetColumn::copy("customer_id"),
            TargetColumn::copy("id"),
            TargetColumn::expr("total_amount_minor", "total_amount::bigint"),
            TargetColumn::expr("currency", "'USD'"),
            TargetColumn::copy("status"),
            TargetColumn::copy("created_at"),
        ],
        target_key: vec!["customer_id".into(), "id".into()],
    }
}

fn orders_agree(c: &testpg::TestCluster, db: &str) {
    let expected =
        "SELECT customer_id, id, total_amount::bigint, 'USD'::text, status, created_at FROM orders";
    let actual = "SELECT * FROM orders_v2";
    let diff = c
        .psql(
            db,
            &format!(
                "SELECT count(*) FROM (({expected} EXCEPT {actual}) UNION ALL ({actual} EXCEPT {expected})) d"
            ),
        )
        .unwrap();
    assert_eq!(diff, "0", "orders_v2 differs from transform(orders)");
    assert_eq!(
        c.psql(db, "SELECT count(*) FROM orders").unwrap(),
        c.psql(db, "SELECT count(*) FROM orders_v2").unwrap()
    );
}

#[tokio::test]
async fn partitioned_target_with_partition_moves_key_changes_and_deletes() {
    let (c, db, mut cl) = setup("apply_orders", ORDERS).await;
    let cols = source_columns(&cl, "orders", &["customer_id", "id"]).await;
    let mut w = ApplyWriter::new(orders_target(&cols), progress("orders")).unwrap();
    let rows = tuples(&cl, "orders", &cols, "true", false).await;
    w.apply_batch(&mut cl, &upserts(100, rows), Lsn(100))
        .await
        .unwrap();
    orders_agree(c, &db);

    // One batch of several source transactions: plain updates, partition-moving updates
    // (customer_id is in the identity: old K tuple then the new row), an id change, deletes.
    let mut batch = Vec::new();
    c.psql(
        &db,
        "UPDATE orders SET status = 'paid' WHERE id BETWEEN 1 AND 20",
    )
    .unwrap();
    batch.extend(upserts(
        110,
        tuples(&cl, "orders", &cols, "id BETWEEN 1 AND 20", false).await,
    ));

    let moving = "id IN (5, 6, 7, 50, 51)";
    let before = tuples(
        &cl,
        "orders",
        &cols,
        &format!("{moving} ORDER BY id"),
        false,
    )
    .await;
    c.psql(
        &db,
        &format!(
            "UPDATE orders SET customer_id = customer_id + 1, status = 'moved' WHERE {moving}"
        ),
    )
    .unwrap();
    let after = tuples(
        &cl,
        "orders",
        &cols,
        &format!("{moving} ORDER BY id"),
        false,
    )
    .await;
    for (old, new) in before.iter().zip(after) {
        batch.push(ch(
            120,
            Change::KeyChange {
                old: key_only(&cols, old),
                old_kind: OldKind::Key,
                new,
            },
        ));
    }
    let old = tuples(&cl, "orders", &cols, "id = 60", false)
        .await
        .remove(0);
    c.psql(&db, "UPDATE orders SET id = 1060 WHERE id = 60")
        .unwrap();
    let new = tuples(&cl, "orders", &cols, "id = 1060", false)
        .await
        .remove(0);
    batch.push(ch(
        130,
        Change::KeyChange {
            old: key_only(&cols, &old),
            old_kind: OldKind::Key,
            new,
        },
    ));
    for old in tuples(&cl, "orders", &cols, "id > 190", false).await {
        batch.push(ch(
            140,
            Change::Delete {
                old: key_only(&cols, &old),
            },
        ));
    }
    c.psql(&db, "DELETE FROM orders WHERE id > 190").unwrap();

    let s = w.apply_batch(&mut cl, &batch, Lsn(140)).await.unwrap();
    assert_eq!(
        s.deleted,
        5 + 1 + 10,
        "moved rows' old keys, the old id, the deleted rows"
    );
    assert!(s.needs_reread.is_empty());
    orders_agree(c, &db);
    // Each moved row lives once, in the partition of its new customer.
    let placed = c
        .psql(
            &db,
            "SELECT count(*) FROM orders_v2 v JOIN orders o USING (id) \
             WHERE o.id IN (5, 6, 7, 50, 51) AND v.customer_id = o.customer_id \
             AND satisfies_hash_partition('orders_v2'::regclass, 4, \
                 (SELECT substring(v.tableoid::regclass::text from '\\d$')::int), v.customer_id)",
        )
        .unwrap();
    assert_eq!(placed, "5");
    assert_eq!(w.committed_lsn(&cl).await.unwrap(), Some(Lsn(140)));
}

const TOAST: &str = r#"
CREATE TABLE src (id int PRIMARY KEY, big text, small int);
CREATE TABLE dst (id int PRIMARY KEY, big text, small int);
CREATE TABLE dst_len (id int PRIMARY KEY, big_len int, small int);
INSERT INTO src SELECT g, (SELECT string_agg(md5(random()::text || i), '') FROM generate_series(1, 400) i), g
    FROM generate_series(1, 5) g;
"#;

/// The source row with `big` marked unchanged TOAST, as pgoutput sends an update that did not
/// touch it.
async fn with_unchanged_big(cl: &Client, cols: &[SourceColumn], id: i32) -> TupleData {
    let mut t = tuples(cl, "src", cols, &format!("id = {id}"), false)
        .await
        .remove(0);
    t.0[1] = TupleValue::UnchangedToast;
    t
}

#[tokio::test]
async fn unchanged_toast_is_kept_merged_or_reread_never_guessed() {
    let (c, db, mut cl) = setup("apply_toast", TOAST).await;
    assert_eq!(
        c.psql(&db, "SELECT pg_column_size(big) < octet_length(big) OR octet_length(big) > 8000 FROM src LIMIT 1")
            .unwrap(),
        "t"
    );
    let cols = source_columns(&cl, "src", &["id"]).await;
    let mut w = ApplyWriter::new(
        copy_target("public", "dst", &cols, &["id"]),
        progress("toast"),
    )
    .unwrap();
    let len_target = ApplyTarget {
        table: ("public".into(), "dst_len".into()),
        source_columns: cols.clone(),
        target_columns: vec![
            TargetColumn::copy("id"),
            TargetColumn::expr("big_len", "length(big)"),
            TargetColumn::copy("small"),
        ],
        target_key: vec!["id".into()],
    };
    let mut wl = ApplyWriter::new(len_target, progress("toast_len")).unwrap();
    let first = tuples(&cl, "src", &cols, "id IN (1, 2)", false).await;
    w.apply_batch(&mut cl, &upserts(1, first.clone()), Lsn(1))
        .await
        .unwrap();
    wl.apply_batch(&mut cl, &upserts(1, first), Lsn(1))
        .await
        .unwrap();

    // Update of row 1 that leaves `big` alone: the target keeps its value.
    c.psql(&db, "UPDATE src SET small = 100 WHERE id = 1")
        .unwrap();
    let u1 = with_unchanged_big(&cl, &cols, 1).await;
    let s = w
        .apply_batch(&mut cl, &upserts(2, vec![u1.clone()]), Lsn(2))
        .await
        .unwrap();
    assert!(s.needs_reread.is_empty());
    assert_eq!(s.upserted, 1);
    same(
        c,
        &db,
        "(SELECT * FROM src WHERE id IN (1, 2))",
        "dst",
        "id",
    );
    // A transform that needs `big` cannot be computed from this change: re-read, nothing written.
    let s = wl
        .apply_batch(&mut cl, &upserts(2, vec![u1]), Lsn(2))
        .await
        .unwrap();
    assert_eq!(
        s.needs_reread,
        vec![key_only(
            &cols,
            &tuples(&cl, "src", &cols, "id = 1", false).await[0]
        )]
    );
    assert_eq!(
        c.psql(&db, "SELECT small FROM dst_len WHERE id = 1")
            .unwrap(),
        "1"
    );

    // Row 3 is not in the target: its update with unchanged TOAST is handed back, not guessed.
    c.psql(&db, "UPDATE src SET small = 300 WHERE id = 3")
        .unwrap();
    let u3 = with_unchanged_big(&cl, &cols, 3).await;
    let s = w
        .apply_batch(&mut cl, &upserts(3, vec![u3]), Lsn(3))
        .await
        .unwrap();
    assert_eq!(s.needs_reread.len(), 1);
    assert_eq!(
        c.psql(&db, "SELECT count(*) FROM dst WHERE id = 3")
            .unwrap(),
        "0"
    );
    // The caller re-reads it and applies the whole row.
    let reread = tuples(&cl, "src", &cols, "id = 3", false).await;
    w.apply_batch(&mut cl, &upserts(3, reread), Lsn(3))
        .await
        .unwrap();

    // Insert then update with unchanged TOAST in one batch: the update merges into the insert.
    c.psql(&db, "UPDATE src SET small = 44 WHERE id = 4")
        .unwrap();
    let mut ins4 = tuples(&cl, "src", &cols, "id = 4", false).await.remove(0);
    ins4.0[2] = TupleValue::Binary(Bytes::from_static(&[0, 0, 0, 4]));
    let u4 = with_unchanged_big(&cl, &cols, 4).await;
    let s = w
        .apply_batch(
            &mut cl,
            &[
                ch(4, Change::Upsert { new: ins4 }),
                ch(4, Change::Upsert { new: u4 }),
            ],
            Lsn(4),
        )
        .await
        .unwrap();
    assert!(s.needs_reread.is_empty());
    same(c, &db, "(SELECT * FROM src WHERE id <= 4)", "dst", "id");

    // Row 1 is deleted, then row 5 takes id 1 in a key change that leaves `big` unchanged: the
    // deleted row's `big` must not be kept. The key is re-read.
    let old1 = tuples(&cl, "src", &cols, "id = 1", false).await.remove(0);
    let old5 = tuples(&cl, "src", &cols, "id = 5", false).await.remove(0);
    c.psql(
        &db,
        "DELETE FROM src WHERE id = 1; UPDATE src SET id = 1 WHERE id = 5",
    )
    .unwrap();
    let new1 = with_unchanged_big(&cl, &cols, 1).await;
    let s = w
        .apply_batch(
            &mut cl,
            &[
                ch(
                    5,
                    Change::Delete {
                        old: key_only(&cols, &old1),
                    },
                ),
                ch(
                    6,
                    Change::KeyChange {
                        old: key_only(&cols, &old5),
                        old_kind: OldKind::Key,
                        new: new1,
                    },
                ),
            ],
            Lsn(6),
        )
        .await
        .unwrap();
    assert_eq!(s.needs_reread.len(), 1);
    assert_eq!(
        c.psql(&db, "SELECT count(*) FROM dst WHERE id = 1")
            .unwrap(),
        "0"
    );
    let reread = tuples(&cl, "src", &cols, "id = 1", false).await;
    w.apply_batch(&mut cl, &upserts(6, reread), Lsn(6))
        .await
        .unwrap();
    same(c, &db, "src", "dst", "id");

    // With an old full row (REPLICA IDENTITY FULL), a key change takes the value from it.
    let old1 = tuples(&cl, "src", &cols, "id = 1", false).await.remove(0);
    c.psql(&db, "UPDATE src SET id = 11 WHERE id = 1").unwrap();
    let mut new11 = tuples(&cl, "src", &cols, "id = 11", false).await.remove(0);
    new11.0[1] = TupleValue::UnchangedToast;
    let s = w
        .apply_batch(
            &mut cl,
            &[ch(
                7,
                Change::KeyChange {
                    old: old1,
                    old_kind: OldKind::Full,
                    new: new11,
                },
            )],
            Lsn(7),
        )
        .await
        .unwrap();
    assert!(s.needs_reread.is_empty());
    same(c, &db, "src", "dst", "id");
}

const SIMPLE: &str = r#"
CREATE TABLE src (id int PRIMARY KEY, v text);
CREATE TABLE dst (id int PRIMARY KEY, v text);
"#;

async fn src_row(
    c: &testpg::TestCluster,
    db: &str,
    cl: &Client,
    cols: &[SourceColumn],
    sql: &str,
    id: i32,
) -> TupleData {
    c.psql(db, sql).unwrap();
    tuples(cl, "src", cols, &format!("id = {id}"), false)
        .await
        .remove(0)
}

/// A source INSERT is written by plain INSERT; when the target holds the row after all (the
/// backfill copied it, or a stream is replayed over copied rows), the batch upserts instead and
/// loses nothing, and so do the batches after it.
#[tokio::test]
async fn an_insert_of_a_row_the_target_already_has_is_upserted() {
    let (c, db, mut cl) = setup("apply_insert_conflict", SIMPLE).await;
    let cols = source_columns(&cl, "src", &["id"]).await;
    let mut w = ApplyWriter::new(
        copy_target("public", "dst", &cols, &["id"]),
        progress("insert_conflict"),
    )
    .unwrap();
    // Rows 1 and 2 are already in the target, with older values.
    c.psql(&db, "INSERT INTO dst VALUES (1, 'old one'), (2, 'old two')")
        .unwrap();
    let r1 = src_row(c, &db, &cl, &cols, "INSERT INTO src VALUES (1, 'one')", 1).await;
    let r3 = src_row(c, &db, &cl, &cols, "INSERT INTO src VALUES (3, 'three')", 3).await;
    let s = w
        .apply_batch(
            &mut cl,
            &[
                ch(1, Change::Insert { new: r1 }),
                ch(2, Change::Insert { new: r3 }),
            ],
            Lsn(2),
        )
        .await
        .unwrap();
    assert_eq!(s.upserted, 2);
    let r2 = src_row(c, &db, &cl, &cols, "INSERT INTO src VALUES (2, 'two')", 2).await;
    let r4 = src_row(c, &db, &cl, &cols, "INSERT INTO src VALUES (4, 'four')", 4).await;
    w.apply_batch(
        &mut cl,
        &[
            ch(3, Change::Insert { new: r2 }),
            ch(4, Change::Insert { new: r4 }),
        ],
        Lsn(4),
    )
    .await
    .unwrap();
    same(c, &db, "src", "dst", "id");
    assert_eq!(
        w.committed_lsn(&cl).await.unwrap(),
        Some(Lsn(4)),
        "progress committed with the rows"
    );
}

#[tokio::test]
async fn batch_edges_insert_delete_reinsert_and_key_swaps() {
    let (c, db, mut cl) = setup("apply_edges", SIMPLE).await;
    let cols = source_columns(&cl, "src", &["id"]).await;
    let mut w = ApplyWriter::new(
        copy_target("public", "dst", &cols, &["id"]),
        progress("edges"),
    )
    .unwrap();
    let r2 = src_row(c, &db, &cl, &cols, "INSERT INTO src VALUES (2, 'two')", 2).await;
    let r3 = src_row(c, &db, &cl, &cols, "INSERT INTO src VALUES (3, 'three')", 3).await;
    w.apply_batch(&mut cl, &upserts(1, vec![r2.clone(), r3.clone()]), Lsn(1))
        .await
        .unwrap();

    // Insert then delete of row 1: nothing. Delete then re-insert of row 2: the new row.
    // Row 3 changes its key to 4, and a new row takes key 3: both exist afterwards.
    let r1 = src_row(c, &db, &cl, &cols, "INSERT INTO src VALUES (1, 'one')", 1).await;
    c.psql(
        &db,
        "DELETE FROM src WHERE id = 1; DELETE FROM src WHERE id = 2",
    )
    .unwrap();
    let r2b = src_row(
        c,
        &db,
        &cl,
        &cols,
        "INSERT INTO src VALUES (2, 'two again')",
        2,
    )
    .await;
    let r4 = src_row(
        c,
        &db,
        &cl,
        &cols,
        "UPDATE src SET id = 4, v = 'was three' WHERE id = 3",
        4,
    )
    .await;
    let r3b = src_row(
        c,
        &db,
        &cl,
        &cols,
        "INSERT INTO src VALUES (3, 'new three')",
        3,
    )
    .await;
    let batch = vec![
        ch(2, Change::Insert { new: r1.clone() }),
        ch(
            3,
            Change::Delete {
                old: key_only(&cols, &r1),
            },
        ),
        ch(
            4,
            Change::Delete {
                old: key_only(&cols, &r2),
            },
        ),
        ch(5, Change::Insert { new: r2b }),
        ch(
            6,
            Change::KeyChange {
                old: key_only(&cols, &r3),
                old_kind: OldKind::Key,
                new: r4,
            },
        ),
        ch(7, Change::Insert { new: r3b }),
    ];
    let s = w.apply_batch(&mut cl, &batch, Lsn(7)).await.unwrap();
    assert!(s.needs_reread.is_empty());
    same(c, &db, "src", "dst", "id");
    assert_eq!(
        c.psql(
            &db,
            "SELECT string_agg(id || '=' || v, ',' ORDER BY id) FROM dst"
        )
        .unwrap(),
        "2=two again,3=new three,4=was three"
    );
}

#[tokio::test]
async fn exactly_once_across_a_crash_before_commit() {
    let (c, db, mut cl) = setup("apply_once", SIMPLE).await;
    let cols = source_columns(&cl, "src", &["id"]).await;
    let mut w = ApplyWriter::new(
        copy_target("public", "dst", &cols, &["id"]),
        progress("once"),
    )
    .unwrap();
    let r1 = src_row(c, &db, &cl, &cols, "INSERT INTO src VALUES (1, 'a')", 1).await;
    let r2 = src_row(c, &db, &cl, &cols, "INSERT INTO src VALUES (2, 'b')", 2).await;
    c.psql(&db, "DELETE FROM src WHERE id = 1").unwrap();
    let stream = vec![
        ch(10, Change::Upsert { new: r1.clone() }),
        ch(20, Change::Upsert { new: r2 }),
        ch(
            30,
            Change::Delete {
                old: key_only(&cols, &r1),
            },
        ),
    ];

    // Batch 1 (lsn 10) commits.
    w.apply_batch(&mut cl, &stream[..1], Lsn(10)).await.unwrap();
    // Batch 2 (lsn 20, 30) is written, then the process "crashes" before COMMIT.
    {
        let tx = cl.transaction().await.unwrap();
        let s = w.write_batch(&tx, &stream[1..], Lsn(30)).await.unwrap();
        assert_eq!(s.upserted, 1);
        drop(tx);
    }
    assert_eq!(
        c.psql(&db, "SELECT string_agg(id::text, ',') FROM dst")
            .unwrap(),
        "1"
    );
    assert_eq!(
        c.psql(
            &db,
            "SELECT lsn FROM shadowmig.progress WHERE migration = 'once'"
        )
        .unwrap(),
        Lsn(10).to_string()
    );

    // Restart: a new session, resume after the committed LSN, replaying the whole stream.
    let mut cl = c.client(&db).await.unwrap();
    let mut w = ApplyWriter::new(
        copy_target("public", "dst", &cols, &["id"]),
        progress("once"),
    )
    .unwrap();
    let done = w.committed_lsn(&cl).await.unwrap();
    assert_eq!(done, Some(Lsn(10)));
    let rest = apply::unapplied(&stream, done);
    assert_eq!(rest.len(), 2);
    w.apply_batch(&mut cl, rest, Lsn(30)).await.unwrap();
    same(c, &db, "src", "dst", "id");
    // A second replay finds nothing left to do.
    let done = w.committed_lsn(&cl).await.unwrap();
    assert!(apply::unapplied(&stream, done).is_empty());
    assert_eq!(c.psql(&db, "SELECT count(*) FROM dst").unwrap(), "1");
    // Source transactions without changes for this table still move progress on.
    let s = w.apply_batch(&mut cl, &[], Lsn(40)).await.unwrap();
    assert_eq!((s.changes, s.upserted, s.deleted), (0, 0, 0));
    assert_eq!(w.committed_lsn(&cl).await.unwrap(), Some(Lsn(40)));
}

#[tokio::test]
async fn bad_batches_are_errors_and_roll_back() {
    let (c, db, mut cl) = setup("apply_bad", SIMPLE).await;
    let cols = source_columns(&cl, "src", &["id"]).await;
    let mut w = ApplyWriter::new(
        copy_target("public", "dst", &cols, &["id"]),
        progress("bad"),
    )
    .unwrap();
    let short = TupleData(vec![TupleValue::Binary(Bytes::from_static(&[0, 0, 0, 1]))]);
    let e = w
        .apply_batch(&mut cl, &upserts(1, vec![short]), Lsn(1))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("columns"), "{e}");
    // A value that is not a valid int4 send form: the server refuses it, nothing commits.
    let bad = TupleData(vec![
        TupleValue::Binary(Bytes::from_static(&[0, 1])),
        TupleValue::Text(Bytes::from_static(b"x")),
    ]);
    let good = TupleData(vec![
        TupleValue::Binary(Bytes::from_static(&[0, 0, 0, 9])),
        TupleValue::Null,
    ]);
    let e = w
        .apply_batch(&mut cl, &upserts(2, vec![good.clone(), bad]), Lsn(2))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("copy into stage"), "{e}");
    assert_eq!(c.psql(&db, "SELECT count(*) FROM dst").unwrap(), "0");
    assert_eq!(w.committed_lsn(&cl).await.unwrap(), None);
    // The writer stays usable after a failed batch.
    w.apply_batch(&mut cl, &upserts(3, vec![good]), Lsn(3))
        .await
        .unwrap();
    assert_eq!(c.psql(&db, "SELECT id, v IS NULL FROM dst").unwrap(), "9|t");
    // A progress LSN below the batch's changes, or changes out of order, are refused.
    let row = |id: u8| {
        TupleData(vec![
            TupleValue::Binary(Bytes::from(vec![0, 0, 0, id])),
            TupleValue::Null,
        ])
    };
    let e = w
        .apply_batch(&mut cl, &upserts(9, vec![row(1)]), Lsn(8))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("below the batch's last change"),
        "{e}"
    );
    let mut twisted = upserts(9, vec![row(1)]);
    twisted.extend(upserts(8, vec![row(2)]));
    let e = w.apply_batch(&mut cl, &twisted, Lsn(9)).await.unwrap_err();
    assert!(e.to_string().contains("out of stream order"), "{e}");
    assert_eq!(w.committed_lsn(&cl).await.unwrap(), Some(Lsn(3)));
    // Invalid targets are refused up front.
    let mut t = copy_target("public", "dst", &cols, &["id"]);
    t.target_key = vec!["missing".into()];
    assert!(ApplyWriter::new(t, progress("bad")).is_err());
}

#[tokio::test]
async fn state_tables_are_idempotent_and_droppable() {
    let (c, db, mut cl) = setup("apply_state", "SELECT 1").await;
    state::ensure_schema(&mut cl, 5000).await.unwrap();
    assert!(state::register_migration(&cl, "m1", "name = 'm1'")
        .await
        .unwrap());
    assert!(!state::register_migration(&cl, "m1", "other").await.unwrap());
    // set_stage reports the stage it replaced (what its log line says), None for no migration.
    assert_eq!(
        state::set_stage(&cl, "m1", "reads")
            .await
            .unwrap()
            .as_deref(),
        Some("source")
    );
    assert_eq!(
        state::set_stage(&cl, "m1", "reads")
            .await
            .unwrap()
            .as_deref(),
        Some("reads")
    );
    assert_eq!(state::set_stage(&cl, "nope", "reads").await.unwrap(), None);
    state::set_last_error(&cl, "m1", Some("boom"))
        .await
        .unwrap();
    let m = state::read_migration(&cl, "m1").await.unwrap().unwrap();
    assert_eq!(
        (
            m.stage.as_str(),
            m.spec.as_str(),
            m.last_error.as_deref(),
            m.paused
        ),
        ("reads", "name = 'm1'", Some("boom"), false)
    );
    assert_eq!(
        state::read_progress(&cl, "m1", Direction::Forward)
            .await
            .unwrap(),
        None
    );
    state::write_progress(
        &cl,
        "m1",
        Direction::Forward,
        "16/B374D848".parse().unwrap(),
    )
    .await
    .unwrap();
    state::write_progress(&cl, "m1", Direction::Forward, Lsn(5))
        .await
        .unwrap();
    state::write_progress(&cl, "m1", Direction::Reverse, Lsn(7))
        .await
        .unwrap();
    assert_eq!(
        state::read_progress(&cl, "m1", Direction::Forward)
            .await
            .unwrap(),
        Some("16/B374D848".parse().unwrap()),
        "progress never moves backwards"
    );
    let p = state::ChunkProgress {
        chunk: 3,
        last_key: Some(vec![Some("42".into()), None]),
        rows_copied: 10,
        done: false,
    };
    state::write_copy_progress(&cl, "m1", &p).await.unwrap();
    let p2 = state::ChunkProgress {
        done: true,
        rows_copied: 20,
        ..p.clone()
    };
    state::write_copy_progress(&cl, "m1", &p2).await.unwrap();
    assert_eq!(
        state::read_copy_progress(&cl, "m1").await.unwrap(),
        vec![p2]
    );
    state::register_migration(&cl, "m2", "x").await.unwrap();
    state::drop_state(&mut cl, "m1").await.unwrap();
    assert_eq!(
        c.psql(&db, "SELECT (SELECT count(*) FROM shadowmig.migrations), (SELECT count(*) FROM shadowmig.progress), (SELECT count(*) FROM shadowmig.copy_progress)").unwrap(),
        "1|0|0"
    );
    // Dropping state in a database without the schema is a no-op.
    let (_, db2) = testpg::fresh_db("apply_state_none").unwrap();
    let mut cl2 = c.client(&db2).await.unwrap();
    state::drop_state(&mut cl2, "m1").await.unwrap();
}

/// A random workload run on a real source table; each statement's change is built as pgoutput
/// would send it (updates that leave `big` alone carry it as unchanged TOAST), batched at
/// random transaction boundaries, applied, re-read where apply asks, and after every batch the
/// target must equal the source.
#[tokio::test]
async fn random_workload_matches_source_at_every_batch_boundary() {
    random_workload(false).await;
}

/// The same with a stream in text form (no `binary` option).
#[tokio::test]
async fn random_text_workload_matches_source_at_every_batch_boundary() {
    random_workload(true).await;
}

async fn random_workload(text: bool) {
    use rand::{Rng, SeedableRng};
    let ddl = r#"
    CREATE TABLE src (id int PRIMARY KEY, a int, big text);
    CREATE TABLE dst (id int PRIMARY KEY, a int, big text);
    "#;
    let (c, db, mut cl) = setup("apply_random", ddl).await;
    let cols = source_columns(&cl, "src", &["id"]).await;
    let mut w = ApplyWriter::new(
        copy_target("public", "dst", &cols, &["id"]),
        progress("rnd"),
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        std::env::var("APPLY_RANDOM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(7),
    );
    let mut live: Vec<i32> = Vec::new();
    let mut lsn = 0u64;
    let mut rereads = 0;
    for _batch in 0..40 {
        let mut batch = Vec::new();
        for _ in 0..rng.gen_range(1..25) {
            lsn += 1;
            let op = rng.gen_range(0..5);
            let row = |id: i32| format!("id = {id}");
            if live.is_empty() || op == 0 {
                let id = rng.gen_range(1..80);
                if live.contains(&id) {
                    continue;
                }
                cl.execute(
                    "INSERT INTO src VALUES ($1::int, $2::int, repeat(md5($1::int::text || $2::int::text), 100 + $2::int))",
                    &[&id, &rng.gen_range(0..1000i32)],
                )
                .await
                .unwrap();
                live.push(id);
                let new = tuples(&cl, "src", &cols, &row(id), text).await.remove(0);
                batch.push(ch(lsn, Change::Insert { new }));
                continue;
            }
            let id = live[rng.gen_range(0..live.len())];
            match op {
                1 | 2 => {
                    let touch_big = op == 2;
                    if touch_big {
                        cl.execute(
                            "UPDATE src SET big = big || 'x', a = a + 1 WHERE id = $1",
                            &[&id],
                        )
                        .await
                        .unwrap();
                    } else {
                        cl.execute("UPDATE src SET a = a + 1 WHERE id = $1", &[&id])
                            .await
                            .unwrap();
                    }
                    let mut new = tuples(&cl, "src", &cols, &row(id), text).await.remove(0);
                    if !touch_big {
                        new.0[2] = TupleValue::UnchangedToast;
                    }
                    batch.push(ch(lsn, Change::Upsert { new }));
                }
                3 => {
                    let old = tuples(&cl, "src", &cols, &row(id), text).await.remove(0);
                    cl.execute("DELETE FROM src WHERE id = $1", &[&id])
                        .await
                        .unwrap();
                    live.retain(|&x| x != id);
                    batch.push(ch(
                        lsn,
                        Change::Delete {
                            old: key_only(&cols, &old),
                        },
                    ));
                }
                _ => {
                    let to = rng.gen_range(1..80);
                    if live.contains(&to) {
                        continue;
                    }
                    let old = tuples(&cl, "src", &cols, &row(id), text).await.remove(0);
                    cl.execute("UPDATE src SET id = $2 WHERE id = $1", &[&id, &to])
                        .await
                        .unwrap();
                    live.retain(|&x| x != id);
                    live.push(to);
                    let mut new = tuples(&cl, "src", &cols, &row(to), text).await.remove(0);
                    new.0[2] = TupleValue::UnchangedToast;
                    let full = rng.gen_bool(0.5);
                    batch.push(ch(
                        lsn,
                        Change::KeyChange {
                            old: if full {
                                old.clone()
                            } else {
                                key_only(&cols, &old)
                            },
                            old_kind: if full { OldKind::Full } else { OldKind::Key },
                            new,
                        },
                    ));
                }
            }
        }
        let s = w.apply_batch(&mut cl, &batch, Lsn(lsn)).await.unwrap();
        // The caller's side of the contract: re-read what apply could not resolve.
        let mut fix = Vec::new();
        for k in &s.needs_reread {
            let id: i32 = match &k.0[0] {
                TupleValue::Binary(b) => i32::from_be_bytes(b[..].try_into().unwrap()),
                TupleValue::Text(b) => std::str::from_utf8(b).unwrap().parse().unwrap(),
                other => panic!("bad key {other:?}"),
            };
            match tuples(&cl, "src", &cols, &format!("id = {id}"), text)
                .await
                .pop()
            {
                Some(new) => fix.push(ch(lsn, Change::Upsert { new })),
                None => fix.push(ch(lsn, Change::Delete { old: k.clone() })),
            }
            rereads += 1;
        }
        w.apply_batch(&mut cl, &fix, Lsn(lsn)).await.unwrap();
        same(c, &db, "src", "dst", "id");
    }
    assert!(rereads > 0, "the workload should exercise re-reads");
    assert_eq!(w.committed_lsn(&cl).await.unwrap(), Some(Lsn(lsn)));
}

/// A backfill chunk and its checkpoint commit together, or neither does.
#[tokio::test]
async fn chunk_rows_and_their_checkpoint_share_the_transaction() {
    let (c, db, mut cl) = setup("apply_chunk", SIMPLE).await;
    c.psql(
        &db,
        "INSERT INTO src SELECT g, 'v' || g FROM generate_series(1, 30) g",
    )
    .unwrap();
    let cols = source_columns(&cl, "src", &["id"]).await;
    let mut w = ApplyWriter::new(
        copy_target("public", "dst", &cols, &["id"]),
        progress("chunk"),
    )
    .unwrap();
    let rows = tuples(&cl, "src", &cols, "id <= 20", false).await;
    let checkpoint = state::ChunkProgress {
        chunk: 0,
        last_key: Some(vec![Some("20".into())]),
        rows_copied: 20,
        done: true,
    };
    {
        let tx = cl.transaction().await.unwrap();
        w.write_batch(&tx, &upserts(50, rows.clone()), Lsn(50))
            .await
            .unwrap();
        state::write_copy_progress(&tx, "chunk", &checkpoint)
            .await
            .unwrap();
        // Crash before commit.
    }
    assert_eq!(c.psql(&db, "SELECT count(*) FROM dst").unwrap(), "0");
    assert!(state::read_copy_progress(&cl, "chunk")
        .await
        .unwrap()
        .is_empty());
    let tx = cl.transaction().await.unwrap();
    w.write_batch(&tx, &upserts(50, rows), Lsn(50))
        .await
        .unwrap();
    state::write_copy_progress(&tx, "chunk", &checkpoint)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    w.batch_committed();
    assert_eq!(c.psql(&db, "SELECT count(*) FROM dst").unwrap(), "20");
    assert_eq!(
        state::read_copy_progress(&cl, "chunk").await.unwrap(),
        vec![checkpoint]
    );
    // The next batch reuses the stage created in the committed transaction.
    let rest = tuples(&cl, "src", &cols, "id > 20", false).await;
    w.apply_batch(&mut cl, &upserts(60, rest), Lsn(60))
        .await
        .unwrap();
    same(c, &db, "src", "dst", "id");
}

/// REPLICA IDENTITY FULL: updates carry the whole old row (`O`), so the coalescing key can be
/// the columns the target key needs even though the source's primary key is `id` alone.
#[tokio::test]
async fn full_identity_old_rows_move_partitions_and_delete() {
    let ddl = ORDERS.replace(
        "ALTER TABLE orders REPLICA IDENTITY USING INDEX orders_customer_id_id;",
        "ALTER TABLE orders REPLICA IDENTITY FULL;",
    );
    let (c, db, mut cl) = setup("apply_full", &ddl).await;
    let cols = source_columns(&cl, "orders", &["customer_id", "id"]).await;
    let mut w = ApplyWriter::new(orders_target(&cols), progress("full")).unwrap();
    let rows = tuples(&cl, "orders", &cols, "true", false).await;
    w.apply_batch(&mut cl, &upserts(1, rows), Lsn(1))
        .await
        .unwrap();

    let mut batch = Vec::new();
    // Every update under FULL comes with its old row: a plain one (same key) and a
    // partition-moving one, then a delete by old row.
    for (lsn, sql, filter) in [
        (
            2,
            "UPDATE orders SET status = 'paid' WHERE id = 10",
            "id = 10",
        ),
        (
            3,
            "UPDATE orders SET customer_id = 999, status = 'moved' WHERE id = 11",
            "id = 11",
        ),
        (
            4,
            "UPDATE orders SET total_amount = 1 WHERE id = 11",
            "id = 11",
        ),
    ] {
        let old = tuples(&cl, "orders", &cols, filter, false).await.remove(0);
        c.psql(&db, sql).unwrap();
        let new = tuples(&cl, "orders", &cols, filter, false).await.remove(0);
        batch.push(ch(
            lsn,
            Change::KeyChange {
                old,
                old_kind: OldKind::Full,
                new,
            },
        ));
    }
    let old = tuples(&cl, "orders", &cols, "id = 12", false)
        .await
        .remove(0);
    c.psql(&db, "DELETE FROM orders WHERE id = 12").unwrap();
    batch.push(ch(5, Change::Delete { old }));
    let s = w.apply_batch(&mut cl, &batch, Lsn(5)).await.unwrap();
    assert_eq!(s.deleted, 2, "the moved row's old key and the deleted row");
    orders_agree(c, &db);
    assert_eq!(
        c.psql(
            &db,
            "SELECT customer_id, status FROM orders_v2 WHERE id = 11"
        )
        .unwrap(),
        "999|moved"
    );
}

/// A source transaction larger than a batch is written as several batches in one target
/// transaction: a later part must not re-apply an earlier part's staged rows (a row the
/// first part upserted and the second deleted must stay deleted).
#[tokio::test]
async fn several_batches_in_one_transaction_do_not_replay_each_other() {
    let (c, db, mut cl) = setup("apply_parts", SIMPLE).await;
    c.psql(
        &db,
        "INSERT INTO src SELECT g, 'v' || g FROM generate_series(1, 10) g",
    )
    .unwrap();
    let cols = source_columns(&cl, "src", &["id"]).await;
    let mut w = ApplyWriter::new(
        copy_target("public", "dst", &cols, &["id"]),
        progress("parts"),
    )
    .unwrap();
    let rows = tuples(&cl, "src", &cols, "true", false).await;
    let deletes: Vec<SourceChange> = rows[..4]
        .iter()
        .map(|r| {
            ch(
                70,
                Change::Delete {
                    old: key_only(&cols, r),
                },
            )
        })
        .collect();
    let tx = cl.transaction().await.unwrap();
    w.write_batch(&tx, &upserts(70, rows.clone()), Lsn(70))
        .await
        .unwrap();
    w.write_batch(&tx, &deletes, Lsn(70)).await.unwrap();
    w.write_batch(&tx, &upserts(70, rows[9..].to_vec()), Lsn(70))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    w.batch_committed();
    c.psql(&db, "DELETE FROM src WHERE id <= 4").unwrap();
    same(c, &db, "src", "dst", "id");
    assert_eq!(c.psql(&db, "SELECT count(*) FROM dst").unwrap(), "6");
}

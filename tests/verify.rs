//! `shadowmig verify` against real PostgreSQL: the orders scenario (one database and two),
//! each kind of corruption found with its key and kind, awkward types and names, no false
//! positive under a concurrent workload, resuming an interrupted run, the LSN wait of the
//! re-check, and the binary's exit codes and JSON.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shadowmig::spec::Spec;
use shadowmig::testpg::{self, TestCluster};
use shadowmig::verify::{self, DiffKind, Outcome, VerifyOptions, VerifyReport};

const ORDERS_TRANSFORMS: &[(&str, &str)] = &[
    ("total_amount_minor", "total_amount::bigint"),
    ("currency", "'USD'"),
];

/// A spec comparing `src` (in `src_url`) with `tgt` (in `tgt_url`). Table names are given as
/// SQL (quoted where needed).
fn spec_text(
    name: &str,
    src_url: &str,
    src: &str,
    tgt_url: &str,
    tgt: &str,
    tf: &[(&str, &str)],
) -> String {
    let mut s = format!(
        "name = \"{name}\"\n[source]\nurl = \"{src_url}\"\ntable = '{src}'\n[target]\nurl = \"{tgt_url}\"\ntable = '{tgt}'\n[transform]\n"
    );
    for (k, v) in tf {
        s.push_str(&format!("{} = {}\n", toml_key(k), toml_key(v)));
    }
    s
}

fn toml_key(k: &str) -> String {
    format!("\"{}\"", k.replace('\\', "\\\\").replace('"', "\\\""))
}

fn orders_spec(c: &TestCluster, db: &str, tgt_db: &str) -> Spec {
    orders_spec_named(c, db, tgt_db, "orders_verify")
}

/// [`orders_spec`] under another migration name. A test that creates the migration's slot
/// needs a name of its own: slot names are cluster-wide, and the tests of this binary share
/// one cluster.
fn orders_spec_named(c: &TestCluster, db: &str, tgt_db: &str, name: &str) -> Spec {
    Spec::parse(
        &spec_text(
            name,
            &c.url(db),
            "public.orders",
            &c.url(tgt_db),
            "public.orders_v2",
            ORDERS_TRANSFORMS,
        ),
        "test.toml",
    )
    .unwrap()
}

fn opts() -> VerifyOptions {
    VerifyOptions {
        chunk_rows: 300,
        ..Default::default()
    }
}

async fn run(spec: &Spec, o: &VerifyOptions) -> VerifyReport {
    match verify::verify(spec, o).await.unwrap() {
        Outcome::Done(r) => r,
        Outcome::Interrupted { chunks } => panic!("interrupted after {chunks} chunks"),
    }
}

/// Orders source seeded with `n` rows and its target filled by hand (transform in SQL).
fn orders_setup(c: &TestCluster, db: &str, n: u64) {
    c.psql(db, common::ORDERS_SOURCE).unwrap();
    c.psql(db, common::ORDERS_TARGET).unwrap();
    c.psql(db, &common::orders_seed_sql(n)).unwrap();
    c.psql(
        db,
        &format!(
            "INSERT INTO public.orders_v2 (customer_id, id, total_amount_minor, currency, status, note, created_at) {}",
            common::ORDERS_EXPECTED
        ),
    )
    .unwrap();
    c.psql(db, "ANALYZE").unwrap();
}

fn key_of(c: &TestCluster, db: &str, id: i64) -> (i64, i64) {
    let cust: i64 = c
        .psql(
            db,
            &format!("SELECT customer_id FROM public.orders WHERE id = {id}"),
        )
        .unwrap()
        .parse()
        .unwrap();
    (cust, id)
}

fn find(r: &VerifyReport, cust: i64, id: i64) -> Vec<&verify::Difference> {
    r.differences
        .iter()
        .filter(|d| {
            d.key.get("customer_id") == Some(&cust.into()) && d.key.get("id") == Some(&id.into())
        })
        .collect()
}

#[tokio::test]
async fn orders_equal_then_every_corruption_found_with_key_and_kind() {
    let (c, db) = testpg::fresh_db("verify_orders").unwrap();
    orders_setup(c, &db, 3000);
    common::assert_orders_equal(c, &db);
    let spec = orders_spec(c, &db, &db);
    let r = run(&spec, &opts()).await;
    assert!(r.equal, "{}", r.render());
    assert_eq!((r.rows_source, r.rows_target), (3000, 3000));
    assert!(r.chunks > 10, "small chunks expected: {}", r.render());
    assert_eq!(r.exit_code(), 0);

    // Corrupt the target directly, one of each kind.
    let changed = key_of(c, &db, 5);
    let deleted = key_of(c, &db, 10);
    let moved = key_of(c, &db, 20);
    let moved_to = (if moved.0 == 97 { 1 } else { moved.0 + 1 }, 20);
    let toasted = key_of(c, &db, 30); // id % 10 == 0: a TOASTed note
    c.psql(
        &db,
        &format!(
            "UPDATE public.orders_v2 SET status = 'lost' WHERE customer_id = {} AND id = 5;
             DELETE FROM public.orders_v2 WHERE customer_id = {} AND id = 10;
             INSERT INTO public.orders_v2 VALUES (42, 999999, 1, 'USD', 'new', NULL, now());
             UPDATE public.orders_v2 SET customer_id = {} WHERE customer_id = {} AND id = 20;
             UPDATE public.orders_v2 SET note = note || 'x' WHERE customer_id = {} AND id = 30;",
            changed.0, deleted.0, moved_to.0, moved.0, toasted.0
        ),
    )
    .unwrap();
    let r = run(&spec, &opts()).await;
    assert!(!r.equal);
    assert_eq!(r.exit_code(), 1);
    assert_eq!(r.differences.len(), 6, "{}", r.render());
    let one = |k: (i64, i64), kind: DiffKind| {
        let d = find(&r, k.0, k.1);
        assert_eq!(d.len(), 1, "key {k:?}: {}", r.render());
        assert_eq!(d[0].kind, kind, "key {k:?}: {}", r.render());
        d[0].clone()
    };
    let d = one(changed, DiffKind::Different);
    assert_eq!(d.source.as_ref().unwrap()["status"], "shipped");
    assert_eq!(d.target.as_ref().unwrap()["status"], "lost");
    let d = one(deleted, DiffKind::Missing);
    assert!(d.target.is_none() && d.source.is_some());
    let d = one((42, 999999), DiffKind::Extra);
    assert!(d.source.is_none());
    one(moved, DiffKind::Missing);
    one(moved_to, DiffKind::Extra);
    let d = one(toasted, DiffKind::Different);
    assert!(d.target.as_ref().unwrap()["note"]
        .as_str()
        .unwrap()
        .ends_with('x'));

    // Keys only: the value changes are not differences, presence changes are.
    let r = run(
        &spec,
        &VerifyOptions {
            keys_only: true,
            ..opts()
        },
    )
    .await;
    assert!(r.keys_only);
    let kinds: Vec<_> = r.differences.iter().map(|d| d.kind).collect();
    assert_eq!(r.differences.len(), 4, "{}", r.render());
    assert!(kinds.iter().all(|k| *k != DiffKind::Different));
}

#[tokio::test]
async fn two_databases() {
    let (c, src_db) = testpg::fresh_db("verify_src").unwrap();
    let tgt_db = c.create_database("verify_tgt").unwrap();
    c.psql(&src_db, common::ORDERS_SOURCE).unwrap();
    c.psql(&src_db, &common::orders_seed_sql(2000)).unwrap();
    // The same deterministic rows, generated in the target database and transformed there.
    c.psql(&tgt_db, common::ORDERS_SOURCE).unwrap();
    c.psql(&tgt_db, &common::orders_seed_sql(2000)).unwrap();
    c.psql(&tgt_db, common::ORDERS_TARGET).unwrap();
    c.psql(
        &tgt_db,
        &format!(
            "INSERT INTO public.orders_v2 (customer_id, id, total_amount_minor, currency, status, note, created_at) {}; DROP TABLE public.orders",
            common::ORDERS_EXPECTED
        ),
    )
    .unwrap();
    let spec = orders_spec(c, &src_db, &tgt_db);
    assert!(!spec.same_database());
    let r = run(&spec, &opts()).await;
    assert!(r.equal, "{}", r.render());
    assert_eq!(r.rows_target, 2000);

    let k = key_of(c, &src_db, 77);
    c.psql(&tgt_db, "UPDATE public.orders_v2 SET created_at = created_at + interval '1 microsecond' WHERE id = 77").unwrap();
    c.psql(&src_db, "DELETE FROM public.orders WHERE id = 78")
        .unwrap();
    let k78 = {
        let v: i64 = c
            .psql(
                &tgt_db,
                "SELECT customer_id FROM public.orders_v2 WHERE id = 78",
            )
            .unwrap()
            .parse()
            .unwrap();
        (v, 78)
    };
    let r = run(&spec, &opts()).await;
    assert_eq!(r.differences.len(), 2, "{}", r.render());
    assert_eq!(find(&r, k.0, k.1)[0].kind, DiffKind::Different);
    assert_eq!(find(&r, k78.0, k78.1)[0].kind, DiffKind::Extra);
}

#[tokio::test]
async fn awkward_types_and_names() {
    let (c, db) = testpg::fresh_db("verify_types").unwrap();
    c.psql(
        &db,
        r#"
        CREATE SCHEMA "Läger ""A""";
        CREATE TABLE "Läger ""A"""."Quelle ✓" (
            "ID" int PRIMARY KEY, p point, j json, jb jsonb, n numeric, b bytea, a int[],
            t text, "Wert ✓" double precision, ts timestamptz, iv interval);
        ALTER TABLE "Läger ""A"""."Quelle ✓" ALTER COLUMN t SET STORAGE EXTERNAL;
        CREATE TABLE public."Ziel ""Q"" ✓" (
            "ID" bigint PRIMARY KEY, p point, j json, jb jsonb, n numeric(12,3), b bytea, a int[],
            t text, "Wert ✓" double precision, ts timestamptz, iv interval, "doubled" int);
        INSERT INTO "Läger ""A"""."Quelle ✓"
        SELECT i, point(i, -i / 3.0), ('{"a": ' || i || ',  "s": "x\"y"}')::json,
               ('{"k": [1, 2, ' || i || ']}')::jsonb, i / 7.0, decode(md5(i::text), 'hex'),
               ARRAY[i, NULL, -i], CASE WHEN i % 5 = 0 THEN repeat(md5(i::text), 300) WHEN i % 5 = 1 THEN NULL ELSE 't' || i END,
               CASE WHEN i % 4 = 0 THEN NULL ELSE 1.0 / i END, '2024-03-01 12:00:00+02'::timestamptz + i * interval '1 day',
               i * interval '1 minute 3 seconds'
        FROM generate_series(1, 400) i;
        INSERT INTO "Läger ""A"""."Quelle ✓" ("ID") VALUES (1000);
        INSERT INTO public."Ziel ""Q"" ✓"
        SELECT "ID", p, j, jb, n, b, a, t, "Wert ✓", ts, iv, "ID" * 2 FROM "Läger ""A"""."Quelle ✓";
        "#,
    )
    .unwrap();
    let spec = Spec::parse(
        &spec_text(
            "types_verify",
            &c.url(&db),
            r#""Läger ""A"""."Quelle ✓""#,
            &c.url(&db),
            r#"public."Ziel ""Q"" ✓""#,
            &[("doubled", r#""ID" * 2"#)],
        ),
        "t.toml",
    )
    .unwrap();
    let r = run(&spec, &opts()).await;
    assert!(r.equal, "{}", r.render());
    assert_eq!(r.rows_source, 401);
    assert_eq!(
        c.psql(
            &db,
            r#"SELECT count(*) FROM public."Ziel ""Q"" ✓" WHERE length(t) > 2000"#
        )
        .unwrap(),
        "80"
    );

    // json keeps its text: whitespace alone is a difference; a point moved by 1e-9 too.
    c.psql(
        &db,
        r#"UPDATE public."Ziel ""Q"" ✓" SET j = '{"a": 17, "s": "x\"y"}' WHERE "ID" = 17;
           UPDATE public."Ziel ""Q"" ✓" SET p = point(33, -11.000000001) WHERE "ID" = 33;
           UPDATE public."Ziel ""Q"" ✓" SET "Wert ✓" = 0.5 WHERE "ID" = 1000;
           UPDATE public."Ziel ""Q"" ✓" SET jb = '{"k": [1, 2, 90.0]}' WHERE "ID" = 90;"#,
    )
    .unwrap();
    let r = run(&spec, &opts()).await;
    let ids: Vec<_> = r
        .differences
        .iter()
        .map(|d| (d.key["ID"].clone(), d.kind))
        .collect();
    assert_eq!(
        ids,
        vec![
            (serde_json::json!(1000), DiffKind::Different),
            (serde_json::json!(17), DiffKind::Different),
            (serde_json::json!(33), DiffKind::Different),
            // jsonb calls 90.0 and 90 equal; their text differs, and so does verify.
            (serde_json::json!(90), DiffKind::Different),
        ],
        "{}",
        r.render()
    );
    let d = &r.differences[1];
    assert_eq!(
        d.source.as_ref().unwrap()["Wert ✓"],
        serde_json::json!(1.0 / 17.0)
    );
}

#[tokio::test]
async fn a_default_that_is_not_constant_is_excluded_and_said() {
    let (c, db) = testpg::fresh_db("verify_defaults").unwrap();
    c.psql(
        &db,
        "CREATE TABLE s (id int PRIMARY KEY, v text);
         CREATE TABLE t (id int PRIMARY KEY, v text, cur text NOT NULL DEFAULT 'EUR',
                         seen timestamptz NOT NULL DEFAULT clock_timestamp(), nothing int);
         INSERT INTO s SELECT i, 'v' || i FROM generate_series(1, 50) i;
         INSERT INTO t (id, v) SELECT id, v FROM s;",
    )
    .unwrap();
    let spec = Spec::parse(
        &spec_text("defaults", &c.url(&db), "s", &c.url(&db), "t", &[]),
        "t.toml",
    )
    .unwrap();
    let r = run(&spec, &opts()).await;
    assert!(r.equal, "{}", r.render());
    assert_eq!(r.excluded_columns.len(), 1);
    assert_eq!(r.excluded_columns[0].column, "seen");
    assert!(r.render().contains("not compared: target column \"seen\""));
    // The constant default and the never-filled NULL column are compared.
    c.psql(
        &db,
        "UPDATE t SET cur = 'USD' WHERE id = 3; UPDATE t SET nothing = 1 WHERE id = 4",
    )
    .unwrap();
    let r = run(&spec, &opts()).await;
    assert_eq!(r.differences.len(), 2, "{}", r.render());
}

const MIRROR: &str = r#"
CREATE FUNCTION public.mirror_orders() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('DELETE', 'UPDATE') THEN
    DELETE FROM public.orders_v2 WHERE customer_id = OLD.customer_id AND id = OLD.id;
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    INSERT INTO public.orders_v2 VALUES (NEW.customer_id, NEW.id, NEW.total_amount::bigint, 'USD',
                                         NEW.status, NEW.note, NEW.created_at);
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER mirror AFTER INSERT OR UPDATE OR DELETE ON public.orders
  FOR EACH ROW EXECUTE FUNCTION public.mirror_orders();
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_false_positive_in_20_runs_under_concurrent_writes() {
    let (c, db) = testpg::fresh_db("verify_live").unwrap();
    orders_setup(c, &db, 3000);
    // An honest stand-in for the streaming engine: every committed change reaches the target
    // in the same transaction, so the tables are equal at every commit.
    c.psql(&db, MIRROR).unwrap();
    let spec = orders_spec(c, &db, &db);
    let stop = Arc::new(AtomicBool::new(false));
    let mut wl_client = c.client(&db).await.unwrap();
    let wl_stop = stop.clone();
    let workload =
        tokio::spawn(
            async move { common::orders_workload(&mut wl_client, 7, wl_stop, u64::MAX).await },
        );
    let count = || {
        c.psql(
            &db,
            "SELECT count(*) || ':' || max(id) || ':' || sum(total_amount) FROM public.orders",
        )
        .unwrap()
    };
    let mut states = Vec::new();
    let mut buckets_seen = 0;
    let mut candidates = 0;
    for i in 0..20 {
        states.push(count());
        let r = run(&spec, &opts()).await;
        assert!(
            r.equal,
            "run {i}: false positive under load:\n{}",
            r.render()
        );
        buckets_seen += r.differing_buckets;
        candidates += r.candidates;
    }
    // The re-check alone, on keys the workload is changing right now: never a difference.
    let ctx = verify::VerifyContext::open(&spec, &opts()).await.unwrap();
    for _ in 0..5 {
        let keys: Vec<verify::KeyText> = c
            .psql(
                &db,
                "SELECT customer_id || ',' || id FROM public.orders ORDER BY id DESC LIMIT 300",
            )
            .unwrap()
            .lines()
            .map(|l| l.split(',').map(|p| Some(p.to_string())).collect())
            .collect();
        assert_eq!(keys.len(), 300);
        let r = verify::recheck(&ctx, &keys).await.unwrap();
        assert!(r.differences.is_empty() && r.unsettled.is_empty(), "{r:?}");
    }
    stop.store(true, Ordering::Relaxed);
    let stats = workload.await.unwrap();
    states.push(count());
    states.dedup();
    assert!(
        stats.committed > 100,
        "the workload must really write: {stats:?}"
    );
    assert!(
        states.len() > 10,
        "the source must change between runs: {states:?}"
    );
    // The aggregate pass reads the two sides at different moments, so some buckets differ
    // under load and the narrowing really ran (its keys then mostly agree already; the
    // re-check of keys under change is exercised directly above).
    assert!(buckets_seen > 0, "no bucket ever differed under load");
    eprintln!(
        "under load: {buckets_seen} differing buckets, {candidates} candidate keys re-checked"
    );
    common::assert_orders_equal(c, &db);
    // And a real difference is still found once the load stops.
    c.psql(&db, "ALTER TABLE public.orders DISABLE TRIGGER mirror; UPDATE public.orders SET status = 'gone' WHERE id = (SELECT min(id) FROM public.orders)").unwrap();
    let r = run(&spec, &opts()).await;
    assert_eq!(r.differences.len(), 1, "{}", r.render());
}

/// A stand-in for the streaming engine across two databases that lags behind the source and
/// records how far it got, as apply does. Each cycle: note the source's WAL position L, give
/// commits before L a moment to become visible, copy the whole of transform(source) into the
/// target and set `shadowmig.progress` to L in that same target transaction.
async fn lagging_mirror(
    src: &mut tokio_postgres::Client,
    tgt: &mut tokio_postgres::Client,
    migration: &str,
    stop: Arc<AtomicBool>,
) -> u64 {
    use futures_util::{SinkExt, TryStreamExt};
    let mut cycles = 0;
    loop {
        let l: String = src
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let stx = src
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .unwrap();
        let chunks: Vec<bytes::Bytes> = stx
            .copy_out(&format!("COPY ({}) TO STDOUT", common::ORDERS_EXPECTED))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        stx.commit().await.unwrap();
        let ttx = tgt.transaction().await.unwrap();
        ttx.batch_execute("DELETE FROM public.orders_v2")
            .await
            .unwrap();
        let sink = ttx
            .copy_in("COPY public.orders_v2 (customer_id, id, total_amount_minor, currency, status, note, created_at) FROM STDIN")
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        for c in chunks {
            sink.send(c).await.unwrap();
        }
        sink.finish().await.unwrap();
        ttx.execute(
            "UPDATE shadowmig.progress SET lsn = $1::text::pg_lsn WHERE migration = $2 AND direction = 'forward'",
            &[&l, &migration],
        )
        .await
        .unwrap();
        ttx.commit().await.unwrap();
        cycles += 1;
        if stop.load(Ordering::Relaxed) {
            return cycles;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_false_positive_across_databases_while_a_lagging_apply_streams() {
    let (c, src_db) = testpg::fresh_db("verify_stream_src").unwrap();
    let tgt_db = c.create_database("verify_stream_tgt").unwrap();
    c.psql(&src_db, common::ORDERS_SOURCE).unwrap();
    c.psql(&src_db, &common::orders_seed_sql(2000)).unwrap();
    c.psql(&tgt_db, common::ORDERS_TARGET).unwrap();
    c.psql(
        &tgt_db,
        "CREATE SCHEMA shadowmig;
         CREATE TABLE shadowmig.progress (migration text, direction text, lsn pg_lsn, PRIMARY KEY (migration, direction));
         INSERT INTO shadowmig.progress VALUES ('orders_verify_stream', 'forward', '0/0');",
    )
    .unwrap();
    let spec = orders_spec_named(c, &src_db, &tgt_db, "orders_verify_stream");
    // The slot makes verify treat the pair as streaming: it must wait for apply's progress.
    let slot = spec.slot_name();
    c.psql(
        &src_db,
        &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
    )
    .unwrap();

    let stop_mirror = Arc::new(AtomicBool::new(false));
    let (mut ms, mut mt) = (
        c.client(&src_db).await.unwrap(),
        c.client(&tgt_db).await.unwrap(),
    );
    let sm = stop_mirror.clone();
    let mirror =
        tokio::spawn(
            async move { lagging_mirror(&mut ms, &mut mt, "orders_verify_stream", sm).await },
        );
    let stop = Arc::new(AtomicBool::new(false));
    let mut wl_client = c.client(&src_db).await.unwrap();
    let wl_stop = stop.clone();
    let workload = tokio::spawn(async move {
        common::orders_workload(&mut wl_client, 11, wl_stop, u64::MAX).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut candidates = 0;
    for i in 0..20 {
        let r = run(&spec, &opts()).await;
        assert!(
            r.equal,
            "run {i}: false positive while streaming:\n{}",
            r.render()
        );
        candidates += r.candidates;
    }
    stop.store(true, Ordering::Relaxed);
    let stats = workload.await.unwrap();
    stop_mirror.store(true, Ordering::Relaxed);
    let cycles = mirror.await.unwrap();
    c.psql(
        &src_db,
        &format!("SELECT pg_drop_replication_slot('{slot}')"),
    )
    .unwrap();
    assert!(stats.committed > 100, "{stats:?}");
    assert!(cycles > 5, "the mirror must have streamed: {cycles} cycles");
    // The target lags, so the aggregate pass and the narrowing do see differences: the
    // re-check is what kept every one of them out of the reports.
    assert!(candidates > 0, "no candidate key was ever re-checked");
    eprintln!("streaming: {candidates} candidate keys re-checked and dismissed over 20 runs");
}

#[tokio::test]
async fn an_interrupted_run_continues_from_its_frontier() {
    let (c, db) = testpg::fresh_db("verify_resume").unwrap();
    orders_setup(c, &db, 3000);
    let k = key_of(c, &db, 2500);
    c.psql(
        &db,
        "UPDATE public.orders_v2 SET total_amount_minor = -1 WHERE id = 2500",
    )
    .unwrap();
    let spec = orders_spec(c, &db, &db);
    let first = verify::verify(
        &spec,
        &VerifyOptions {
            max_chunks: Some(6),
            ..opts()
        },
    )
    .await
    .unwrap();
    assert!(
        matches!(first, Outcome::Interrupted { chunks } if chunks >= 6),
        "{first:?}"
    );
    let saved = c
        .psql(&db, "SELECT mode || ' ' || frontier FROM shadowmig.verify_progress WHERE migration = 'orders_verify'")
        .unwrap();
    assert!(saved.starts_with("rows {"), "{saved}");
    // A second interrupted run moves the frontier on.
    verify::verify(
        &spec,
        &VerifyOptions {
            max_chunks: Some(4),
            ..opts()
        },
    )
    .await
    .unwrap();
    let saved2 = c
        .psql(&db, "SELECT frontier FROM shadowmig.verify_progress")
        .unwrap();
    assert_ne!(saved, format!("rows {saved2}"));

    let r = run(&spec, &opts()).await;
    assert!(r.resumed, "{}", r.render());
    // Resuming neither loses nor double-counts rows.
    assert_eq!(
        (r.rows_source, r.rows_target),
        (3000, 3000),
        "{}",
        r.render()
    );
    assert_eq!(r.differences.len(), 1, "{}", r.render());
    assert_eq!(find(&r, k.0, k.1)[0].kind, DiffKind::Different);
    assert_eq!(
        c.psql(&db, "SELECT count(*) FROM shadowmig.verify_progress")
            .unwrap(),
        "0"
    );
    // Without a saved frontier the next run starts over.
    let r = run(&spec, &opts()).await;
    assert!(!r.resumed);
    // A frontier of another shape (keys only) is not used for a full compare.
    verify::verify(
        &spec,
        &VerifyOptions {
            max_chunks: Some(2),
            keys_only: true,
            ..opts()
        },
    )
    .await
    .unwrap();
    let r = run(&spec, &opts()).await;
    assert!(!r.resumed);
    assert_eq!(r.differences.len(), 1);
}

#[tokio::test]
async fn recheck_waits_for_apply_to_pass_the_read_position() {
    let (c, db) = testpg::fresh_db("verify_lsn").unwrap();
    orders_setup(c, &db, 200);
    let spec = orders_spec_named(c, &db, &db, "orders_verify_lsn");
    let slot = spec.slot_name();
    c.psql(
        &db,
        &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
    )
    .unwrap();
    c.psql(
        &db,
        "CREATE SCHEMA shadowmig;
         CREATE TABLE shadowmig.progress (migration text, direction text, lsn pg_lsn, PRIMARY KEY (migration, direction));
         INSERT INTO shadowmig.progress VALUES ('orders_verify_lsn', 'forward', '0/1');
         UPDATE public.orders_v2 SET status = 'stale' WHERE id = 9;",
    )
    .unwrap();
    // Apply never passes: the key cannot be settled (exit 2), it is not called a difference.
    let o = VerifyOptions {
        settle_timeout: Duration::from_millis(700),
        ..opts()
    };
    let r = run(&spec, &o).await;
    assert_eq!(r.unsettled.len(), 1, "{}", r.render());
    assert!(r.differences.is_empty());
    assert_eq!(r.exit_code(), 2);
    // A stand-in apply that catches up a moment later and then keeps up: the difference is
    // now confirmed.
    let db2 = db.clone();
    let keep_up = Arc::new(AtomicBool::new(true));
    let running = keep_up.clone();
    let bump = tokio::task::spawn_blocking(move || {
        std::thread::sleep(Duration::from_millis(300));
        while running.load(Ordering::Relaxed) {
            c.psql(
                &db2,
                "UPDATE shadowmig.progress SET lsn = pg_current_wal_lsn()",
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let r = run(
        &spec,
        &VerifyOptions {
            settle_timeout: Duration::from_secs(20),
            ..opts()
        },
    )
    .await;
    keep_up.store(false, Ordering::Relaxed);
    bump.await.unwrap();
    c.psql(&db, &format!("SELECT pg_drop_replication_slot('{slot}')"))
        .unwrap();
    assert!(r.unsettled.is_empty(), "{}", r.render());
    assert_eq!(r.differences.len(), 1, "{}", r.render());
    assert_eq!(r.exit_code(), 1);
}

fn bin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shadowmig"))
        .args(args)
        .env("SHADOWMIG_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn binary_exit_codes_and_json() {
    let (c, db) = testpg::fresh_db("verify_bin").unwrap();
    orders_setup(c, &db, 500);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spec.toml");
    let write = |text: String| std::fs::write(&path, text).unwrap();
    let p = path.to_str().unwrap();
    write(spec_text(
        "bin_verify",
        &c.url(&db),
        "public.orders",
        &c.url(&db),
        "public.orders_v2",
        ORDERS_TRANSFORMS,
    ));

    let (code, out, err) = bin(&["verify", p, "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["equal"], true);
    assert_eq!(v["rows_source"], 500);
    assert_eq!(v["rows_target"], 500);
    assert_eq!(v["differences"], serde_json::json!([]));

    c.psql(&db, "DELETE FROM public.orders_v2 WHERE id = 3")
        .unwrap();
    let (code, out, err) = bin(&["verify", p, "--json"]);
    assert_eq!(code, 1, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["equal"], false);
    let d = &v["differences"][0];
    assert_eq!(d["kind"], "missing");
    assert_eq!(d["key"]["id"], 3);
    assert!(d["key"]["customer_id"].is_i64());
    assert_eq!(d["source"]["id"], 3);
    assert!(d["target"].is_null());
    let (code, out, _) = bin(&["verify", p]);
    assert_eq!(code, 1);
    assert!(out.starts_with("missing {\"customer_id\":"), "{out}");
    assert!(
        out.contains("verify: 1 difference(s); 500 source rows, 499 target rows"),
        "{out}"
    );
    let (code, out, _) = bin(&["verify", p, "--keys-only", "--json"]);
    assert_eq!(code, 1, "{out}");

    // Errors: one line on stderr, exit 2, never a password.
    write(spec_text(
        "bin_verify",
        &c.url(&db),
        "public.orders",
        &c.url(&db),
        "public.nope",
        &[],
    ));
    let (code, out, err) = bin(&["verify", p]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("target table \"public\".\"nope\" does not exist"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    write(spec_text(
        "bin_verify",
        &format!("postgres://app:hunter2secret@127.0.0.1:{closed}/x"),
        "public.orders",
        &c.url(&db),
        "public.orders_v2",
        &[],
    ));
    let (code, _, err) = bin(&["verify", p]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot connect"), "{err}");
    assert!(!err.contains("hunter2secret"), "{err}");
    let (code, _, err) = bin(&["verify", "/nonexistent/spec.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read"), "{err}");
    write("name = \"x\"\n[source]\n".into());
    let (code, _, err) = bin(&["verify", p]);
    assert_eq!(code, 2);
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn the_spec_throttle_bounds_the_reading_rate() {
    let (c, db) = testpg::fresh_db("verify_throttle").unwrap();
    orders_setup(c, &db, 1000);
    let text = spec_text(
        "throttled",
        &c.url(&db),
        "public.orders",
        &c.url(&db),
        "public.orders_v2",
        ORDERS_TRANSFORMS,
    ) + "[throttle]\nmax_rows_per_sec = 1000\n";
    let spec = Spec::parse(&text, "t.toml").unwrap();
    let start = std::time::Instant::now();
    let r = run(&spec, &opts()).await;
    let took = start.elapsed();
    assert!(r.equal, "{}", r.render());
    // 2000 rows (both sides) at 1000 rows/s.
    assert!(took >= Duration::from_millis(1800), "{took:?}");
    let start = std::time::Instant::now();
    run(&orders_spec(c, &db, &db), &opts()).await;
    assert!(start.elapsed() < took / 2, "unthrottled must be faster");
}

#[tokio::test]
async fn an_empty_target_lists_every_key_in_small_batches_and_truncates() {
    let (c, db) = testpg::fresh_db("verify_empty").unwrap();
    orders_setup(c, &db, 400);
    c.psql(&db, "TRUNCATE public.orders_v2").unwrap();
    let spec = orders_spec(c, &db, &db);
    let o = VerifyOptions {
        narrow_batch_rows: 30,
        ..opts()
    };
    let r = run(&spec, &o).await;
    assert_eq!((r.rows_source, r.rows_target), (400, 0));
    assert_eq!(r.differences.len(), 400, "{}", r.render());
    assert!(r.differences.iter().all(|d| d.kind == DiffKind::Missing));
    let ids: std::collections::BTreeSet<i64> = r
        .differences
        .iter()
        .map(|d| d.key["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=400).collect());
    assert!(!r.truncated);
    let r = run(
        &spec,
        &VerifyOptions {
            max_differences: 25,
            ..o
        },
    )
    .await;
    assert!(r.truncated);
    assert_eq!(r.differences.len(), 25);
    assert!(r.render().contains("25+ difference(s)"), "{}", r.render());
}

#[tokio::test]
async fn a_select_only_role_verifies_without_writing_anything() {
    let (c, db) = testpg::fresh_db("verify_ro").unwrap();
    orders_setup(c, &db, 300);
    c.psql(
        &db,
        &format!(
            "DO $$ BEGIN CREATE ROLE verify_reader LOGIN PASSWORD 'pw'; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             REVOKE CREATE ON DATABASE \"{db}\" FROM PUBLIC;
             GRANT SELECT ON public.orders, public.orders_v2 TO verify_reader;"
        ),
    )
    .unwrap();
    let fingerprint = |c: &TestCluster| {
        c.psql(
            &db,
            "SELECT (SELECT sum(hashtext(t::text)) FROM public.orders t) || ':' ||
                    (SELECT sum(hashtext(t::text)) FROM public.orders_v2 t) || ':' ||
                    (SELECT count(*) FROM pg_namespace WHERE nspname = 'shadowmig')",
        )
        .unwrap()
    };
    let before = fingerprint(c);
    let url = c.url_as("verify_reader", "pw", &db);
    let spec = Spec::parse(
        &spec_text(
            "readonly",
            &url,
            "public.orders",
            &url,
            "public.orders_v2",
            ORDERS_TRANSFORMS,
        ),
        "t.toml",
    )
    .unwrap();
    // No right to create the progress table: verify still answers, only not resumably.
    let r = run(&spec, &opts()).await;
    assert!(r.equal, "{}", r.render());
    c.psql(&db, "UPDATE public.orders_v2 SET status = 'x' WHERE id = 3")
        .unwrap();
    let r = run(&spec, &opts()).await;
    assert_eq!(r.differences.len(), 1, "{}", r.render());
    c.psql(
        &db,
        "UPDATE public.orders_v2 SET status = 'new' WHERE id = 3",
    )
    .unwrap();
    assert_eq!(fingerprint(c), before);
    assert!(before.ends_with(":0"), "no shadowmig schema: {before}");
}

/// Slot names are cluster-wide, a logical slot belongs to one database. A slot of this
/// migration's name in *another* database (another migration, or another test of this binary)
/// must not make verify think apply streams into this pair: it would wait for a progress that
/// never comes and report the keys as unsettled (a CI failure of the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_named_slot_in_another_database_is_not_ours() {
    let (c, db) = testpg::fresh_db("verify_foreign_slot").unwrap();
    let other = c.create_database("verify_foreign_slot_other").unwrap();
    orders_setup(c, &db, 200);
    let name = "orders_foreign_slot";
    let spec = Spec::parse(
        &spec_text(
            name,
            &c.url(&db),
            "public.orders",
            &c.url(&db),
            "public.orders_v2",
            ORDERS_TRANSFORMS,
        ),
        "test.toml",
    )
    .unwrap();
    let slot = spec.slot_name();
    c.psql(
        &other,
        &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
    )
    .unwrap();
    c.psql(
        &db,
        "UPDATE public.orders_v2 SET status = 'corrupt' WHERE id = (SELECT min(id) FROM public.orders_v2)",
    )
    .unwrap();
    let o = VerifyOptions {
        settle_timeout: Duration::from_secs(3),
        ..opts()
    };
    let started = std::time::Instant::now();
    let r = run(&spec, &o).await;
    c.psql(
        &other,
        &format!("SELECT pg_drop_replication_slot('{slot}')"),
    )
    .unwrap();
    assert!(r.unsettled.is_empty(), "{}", r.render());
    assert_eq!(r.differences.len(), 1, "{}", r.render());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "verify waited for a slot that is not its own"
    );
}

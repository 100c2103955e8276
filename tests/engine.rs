//! The migration engine end to end: `shadowmig run` as a child process against real
//! PostgreSQL, under concurrent writes and kill -9, checked by an independent SQL comparison.

mod common;

use common::{assert_logged, http_get, shadowmig, sigterm, status_json, wait_equal, wait_exit};

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shadowmig::testpg::{self, TestCluster};

fn write_spec(dir: &tempfile::TempDir, name: &str, url: &str, chunk_rows: u64) -> PathBuf {
    let spec = common::orders_spec(
        name,
        url,
        &format!("[copy]\nchunk_rows = {chunk_rows}\nworkers = 2\n"),
    );
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, spec).unwrap();
    path
}

/// The longest a `run --exit-when-caught-up` may take in these tests before it counts as hung
/// (each takes seconds; CI's 2 cores under the whole suite can make that a minute).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(240);

/// Runs `run --exit-when-caught-up` to completion; panics with its stderr on failure.
fn run_to_catch_up(spec: &Path) {
    let out = common::output_within(
        shadowmig(&["run", spec.to_str().unwrap(), "--exit-when-caught-up"]),
        CATCH_UP_LIMIT,
    );
    assert!(
        out.status.success(),
        "run failed ({:?}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn setup(c: &TestCluster, db: &str, rows: u64) {
    c.psql(db, common::ORDERS_SOURCE).unwrap();
    c.psql(db, &common::orders_seed_sql(rows)).unwrap();
}

#[test]
fn orders_backfill_alone_matches() {
    let (c, db) = testpg::fresh_db("engine_backfill").unwrap();
    setup(c, &db, 3000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "orders_backfill", &c.url(&db), 400);
    run_to_catch_up(&spec);
    common::assert_orders_equal(c, &db);
    // A second run resumes (nothing to copy) and still matches.
    c.psql(&db, "UPDATE orders SET status = 'late' WHERE id % 7 = 0")
        .unwrap();
    run_to_catch_up(&spec);
    common::assert_orders_equal(c, &db);
}

/// The core property: under a randomized concurrent workload with the engine killed at
/// random points and restarted, target = transform(source) after catch-up.
fn crash_run(seed: u64, ddl: bool) {
    let tag = if ddl { "ddl_" } else { "" };
    let (c, db) = testpg::fresh_db(&format!("engine_crash_{tag}{seed}")).unwrap();
    // Seeds ≡ 1 (mod 3) hand chunk rows to the stream's apply; the others use the bulk path,
    // on a table big enough (≈ 100 chunks) that most kills land in the middle of the
    // backfill; seeds ≡ 2 (mod 3) defer the target's constraints to the end of the copy, so
    // kills also land between the copy, the build and the stream (D26).
    let bulk = if seed % 3 == 1 { "0" } else { "1" };
    let deferred = seed % 3 == 2;
    setup(c, &db, if bulk == "1" { 30_000 } else { 4000 });
    // Even seeds have the walsender stream every transaction over 64 kB before its commit, so
    // kills also land while a streamed transaction's parts are written (D29).
    let streamed = seed % 2 == 0;
    if streamed {
        c.psql(
            &db,
            &format!("ALTER DATABASE \"{db}\" SET logical_decoding_work_mem = '64kB'"),
        )
        .unwrap();
    }
    // A history of every row change with its transaction, to explain a failure.
    c.psql(
        &db,
        "CREATE TABLE orders_audit (at timestamptz DEFAULT clock_timestamp(), xid bigint DEFAULT txid_current(), \
           lsn pg_lsn DEFAULT pg_current_wal_insert_lsn(), op text, old_id bigint, old_c bigint, new_id bigint, new_c bigint);
         CREATE FUNCTION orders_audit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           INSERT INTO orders_audit (op, old_id, old_c, new_id, new_c) VALUES
             (TG_OP, CASE WHEN TG_OP <> 'INSERT' THEN OLD.id END, CASE WHEN TG_OP <> 'INSERT' THEN OLD.customer_id END,
              CASE WHEN TG_OP <> 'DELETE' THEN NEW.id END, CASE WHEN TG_OP <> 'DELETE' THEN NEW.customer_id END);
           RETURN NULL; END $$;
         CREATE TRIGGER orders_audit AFTER INSERT OR UPDATE OR DELETE ON orders FOR EACH ROW EXECUTE FUNCTION orders_audit();",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("crash_{tag}{seed}");
    let spec = dir.path().join(format!("{name}.toml"));
    std::fs::write(
        &spec,
        common::orders_spec(
            &name,
            &c.url(&db),
            &format!("[copy]\nchunk_rows = 300\nworkers = 2\ndefer_indexes = {deferred}\n"),
        ),
    )
    .unwrap();
    let log = dir.path().join("runs.log");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let url_db = db.clone();
    let stop2 = stop.clone();
    let workload = rt.spawn(async move {
        let c = testpg::shared().unwrap();
        let mut client = c.client(&url_db).await.unwrap();
        common::orders_workload(&mut client, seed, stop2, u64::MAX).await
    });
    // With `ddl`, the source table changes shape under the run every second or so: scratch
    // columns added, retyped and dropped, alone or inside a transaction that writes rows
    // before and after its DDL (D30, D31). Each shape change pauses the run (exit 3), and
    // the next run accepts the new shape, as an operator would.
    let ddl_task = ddl.then(|| {
        let (url_db, stop3) = (db.clone(), stop.clone());
        rt.spawn(async move { ddl_workload(&url_db, seed, stop3).await })
    });
    let mut pauses = 0;
    let mut rng_state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        rng_state = rng_state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        rng_state >> 33
    };
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut kills = 0;
    while Instant::now() < deadline {
        // Up to two of each run's backfill reads also lose their session between their rows
        // and their high watermark (D38).
        let cut = format!(
            "{}={}",
            shadowmig::failpoint::COPY_BEFORE_HIGH_WATERMARK,
            next() % 3
        );
        let mut child = common::spawn_run_env(
            &spec,
            &log,
            "shadowmig=debug",
            &[
                ("SHADOWMIG_BULK_COPY", bulk),
                (shadowmig::failpoint::ENV, &cut),
            ],
        );
        if let Some(st) = wait_exit(&mut child, Duration::from_millis(300 + next() % 1500)) {
            assert_eq!(
                st.code(),
                Some(3),
                "seed {seed}: run exited on its own, not paused:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            pauses += 1;
            continue;
        }
        // SAFETY: killing our own child process.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let _ = child.wait();
        kills += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let joined = |what: &str| {
        format!(
            "seed {seed}: the {what} did not stop within a minute; sessions:\n{}",
            c.psql(
                &db,
                "SELECT pid, application_name, state, wait_event_type, wait_event, left(query, 120) \
                 FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            .unwrap_or_default()
        )
    };
    let stats = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), workload).await })
        .unwrap_or_else(|_| panic!("{}", joined("workload")))
        .unwrap();
    assert!(stats.committed > 50, "workload too small: {stats:?}");
    let ddls = ddl_task
        .map(|t| {
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(60), t).await })
                .unwrap_or_else(|_| panic!("{}", joined("shape-change workload")))
                .unwrap()
        })
        .unwrap_or(0);
    assert_eq!(ddl, ddls > 0, "seed {seed}: shape changes made: {ddls}");
    // The last shape change may still be ahead of the stream: one pause more at most.
    let out = common::output_within(
        shadowmig(&["run", spec.to_str().unwrap(), "--exit-when-caught-up"]),
        CATCH_UP_LIMIT,
    );
    if out.status.code() == Some(3) {
        assert!(ddl, "seed {seed}: paused without a DDL");
        pauses += 1;
    } else {
        common::assert_ok(&out);
    }
    run_to_catch_up(&spec);
    assert_eq!(
        ddl,
        pauses > 0,
        "seed {seed}: {pauses} pauses on {ddls} shape changes"
    );
    let check = std::panic::catch_unwind(|| common::assert_orders_equal(c, &db));
    if let Err(e) = check {
        let keep =
            std::env::temp_dir().join(format!("shadowmig-crash-{seed}-{}.log", std::process::id()));
        let _ = std::fs::copy(&log, &keep);
        eprintln!("run logs kept in {}", keep.display());
        let (missing, extra) = common::diff(c, &db, common::ORDERS_EXPECTED, common::ORDERS_ACTUAL);
        for row in missing.iter().chain(extra.iter()) {
            let mut f = row.trim_start_matches('(').split(',');
            let (cust, id) = (f.next().unwrap_or("0"), f.next().unwrap_or("0"));
            eprintln!(
                "history of id {id} (customer {cust}):\n{}",
                c.psql(
                    &db,
                    &format!(
                        "SELECT * FROM orders_audit WHERE {id} IN (old_id, new_id) ORDER BY at"
                    )
                )
                .unwrap_or_default()
            );
        }
        std::panic::resume_unwind(e);
    }
    // With DDL, many runs end in a pause before their kill comes: they interrupt runs too.
    assert!(
        kills >= 3 || (ddl && kills + pauses >= 3),
        "seed {seed}: only {kills} kills and {pauses} pauses"
    );
    let runs = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        runs.contains("bulk path"),
        bulk == "1",
        "seed {seed}: the backfill did not take the expected path"
    );
    assert_eq!(
        runs.contains("backfill with deferred constraints"),
        deferred,
        "seed {seed}: deferred constraints expected: {deferred}"
    );
    if deferred {
        assert_deferred_built(c, &db, &name);
    }
    // Every stream started after the backfill streams large transactions, unless the
    // process had fallen back to whole transactions (D29) or drains a stale shape (D31).
    assert!(
        ddl || runs.matches("copy_done=true streaming=false").count()
            <= runs
                .matches("restarting the change stream without streaming")
                .count(),
        "seed {seed}: a stream after the backfill did not stream large transactions"
    );
    let streamed_txns = runs
        .matches("applying a streamed source transaction")
        .count();
    let cut_reads = runs
        .matches("emitting a watermark: connection closed; retrying the chunk")
        .count();
    eprintln!(
        "seed {seed} (bulk {bulk}, deferred {deferred}, 64 kB decoding memory {streamed}, ddl {ddl}): {kills} kills, {ddls} shape changes, {pauses} pauses, {streamed_txns} streamed transactions, {cut_reads} reads cut off, {stats:?}"
    );
    // Free the slot: many seeds share one cluster with a fixed number of slots.
    abort_ok(&spec);
}

/// Seeds to run: `SHADOWMIG_CRASH_SEEDS=a..b` soaks many (e.g. `1..200`); CI runs a few.
fn seeds(default: std::ops::Range<u64>) -> std::ops::Range<u64> {
    std::env::var("SHADOWMIG_CRASH_SEEDS")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once("..")?;
            Some(a.parse().ok()?..b.parse().ok()?)
        })
        .unwrap_or(default)
}

/// After a run with `[copy] defer_indexes`: the target has its primary key again and nothing
/// is left recorded as deferred.
fn assert_deferred_built(c: &TestCluster, db: &str, migration: &str) {
    let pk = c
        .psql(
            db,
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'public.orders_v2'::regclass AND contype = 'p'",
        )
        .unwrap();
    assert_eq!(pk.trim(), "PRIMARY KEY (customer_id, id)");
    let left = c
        .psql(
            db,
            &format!("SELECT count(*) FROM shadowmig.deferred_ddl WHERE migration = '{migration}'"),
        )
        .unwrap();
    assert_eq!(left.trim(), "0");
}

#[test]
fn concurrent_workload_with_kill_9_many_seeds() {
    for seed in seeds(1..4) {
        crash_run(seed, false);
    }
}

#[test]
fn concurrent_workload_with_source_ddl_and_kill_9() {
    for seed in seeds(1..3) {
        crash_run(seed, true);
    }
}

/// Changes the shape of `orders` until `stop`, about once a second; the number of changes
/// made. Scratch columns only (the transform does not read them): added with a default,
/// retyped, dropped; a third of them inside a transaction that updates rows before and after
/// the DDL. A DDL that cannot take its lock within 2 s is skipped.
async fn ddl_workload(db: &str, seed: u64, stop: Arc<AtomicBool>) -> u64 {
    let c = testpg::shared().unwrap();
    let client = c.client(db).await.unwrap();
    client
        .batch_execute("SET lock_timeout = '2s'")
        .await
        .unwrap();
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut columns: Vec<(u64, bool)> = Vec::new(); // (number, retyped to bigint)
    let (mut made, mut n) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(600 + next() % 900)).await;
        let ddl = match next() % 3 {
            0 if !columns.is_empty() => {
                let (k, _) = columns.remove((next() as usize) % columns.len());
                format!("ALTER TABLE orders DROP COLUMN \"scratch {k}\"")
            }
            1 if columns.iter().any(|(_, r)| !r) => {
                let i = columns.iter().position(|(_, r)| !r).unwrap_or(0);
                columns[i].1 = true;
                format!(
                    "ALTER TABLE orders ALTER COLUMN \"scratch {}\" TYPE bigint",
                    columns[i].0
                )
            }
            _ => {
                n += 1;
                columns.push((n, false));
                format!("ALTER TABLE orders ADD COLUMN \"scratch {n}\" int DEFAULT {n}")
            }
        };
        let sql = if next() % 3 == 0 {
            let (a, b) = (1 + next() % 3000, 1 + next() % 3000);
            format!(
                "BEGIN; UPDATE orders SET status = 'before ddl' WHERE id BETWEEN {a} AND {a} + 5; {ddl}; \
                 UPDATE orders SET status = 'after ddl' WHERE id BETWEEN {b} AND {b} + 5; COMMIT"
            )
        } else {
            ddl
        };
        match client.batch_execute(&sql).await {
            Ok(()) => made += 1,
            Err(_) => {
                let _ = client.batch_execute("ROLLBACK").await;
                // Not made: undo the bookkeeping by reading the columns back.
                let rows = client
                    .query(
                        "SELECT attname, atttypid::regtype::text FROM pg_attribute \
                         WHERE attrelid = 'orders'::regclass AND attnum > 0 AND NOT attisdropped \
                         AND attname LIKE 'scratch %'",
                        &[],
                    )
                    .await
                    .unwrap_or_default();
                columns = rows
                    .iter()
                    .filter_map(|r| {
                        let name: String = r.get(0);
                        let ty: String = r.get(1);
                        Some((name.strip_prefix("scratch ")?.parse().ok()?, ty == "bigint"))
                    })
                    .collect();
            }
        }
    }
    made
}

#[test]
fn sigterm_commits_and_exits_0_then_status_and_abort_leave_nothing() {
    let (c, db) = testpg::fresh_db("engine_sigterm").unwrap();
    setup(c, &db, 2000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "sigterm_mig", &c.url(&db), 250);
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    assert!(
        wait_equal(c, &db, Duration::from_secs(60)),
        "run never caught up"
    );
    c.psql(&db, "UPDATE orders SET status = 'after' WHERE id <= 10")
        .unwrap();
    assert!(
        wait_equal(c, &db, Duration::from_secs(30)),
        "streaming did not apply the update"
    );
    let status = sigterm(&mut child);
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let out = shadowmig(&["status", spec.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["copy"]["done"], true, "{st}");
    assert_eq!(st["copy"]["rows_copied"], 2000, "{st}");
    assert_eq!(st["copy"]["eta_seconds"], 0.0, "{st}");
    assert!(
        st["copy"]["rows_per_sec"].as_f64().unwrap_or(0.0) > 0.0,
        "{st}"
    );
    assert!(st["changes_per_sec"].as_f64().unwrap_or(0.0) > 0.0, "{st}");
    assert_eq!(st["stage"], "source");
    assert!(st["lag"]["apply_lsn"].as_str().unwrap().contains('/'));
    assert!(st["lag"]["bytes"].as_i64().is_some(), "{st}");
    assert_eq!(st["slot"]["exists"], true);
    assert_eq!(st["slot"]["active"], false);
    for field in ["verify", "routing"] {
        assert!(st.get(field).is_some(), "status lacks {field}: {st}");
    }
    let human = shadowmig(&["status", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&human.stdout).contains("rows"));

    let out = shadowmig(&["abort", spec.to_str().unwrap()])
        .output()
        .unwrap();
    common::assert_ok(&out);
    assert_eq!(
        c.psql(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        )
        .unwrap(),
        "0"
    );
    assert_eq!(
        c.psql(&db, "SELECT count(*) FROM pg_publication").unwrap(),
        "0"
    );
    assert_eq!(c.psql(&db, "SELECT to_regclass('public.orders_v2') IS NULL AND to_regnamespace('shadowmig') IS NULL").unwrap(), "t");
    assert_eq!(
        c.psql(&db, "SELECT count(*) FROM orders").unwrap(),
        "2000",
        "abort never touches the source"
    );
    // Abort again: idempotent.
    let out = shadowmig(&["abort", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// Slot names are cluster-wide: a slot of this migration's name in another database belongs to
/// someone else. `run` refuses with the reason and the fix, and `abort` leaves it alone.
#[test]
fn a_same_named_slot_in_another_database_is_refused_and_left_alone() {
    let (c, db) = testpg::fresh_db("engine_foreign_slot").unwrap();
    let other = c.create_database("engine_foreign_slot_other").unwrap();
    setup(c, &db, 50);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "foreign_slot", &c.url(&db), 100);
    c.psql(
        &other,
        "SELECT pg_create_logical_replication_slot('shadowmig_foreign_slot', 'pgoutput')",
    )
    .unwrap();
    let out = common::output_within(shadowmig(&["run", spec.to_str().unwrap()]), CATCH_UP_LIMIT);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&other) && err.contains("`name`"), "{err}");
    let out = shadowmig(&["abort", spec.to_str().unwrap()])
        .output()
        .unwrap();
    common::assert_ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("left replication slot shadowmig_foreign_slot alone"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        c.psql(
            &other,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'shadowmig_foreign_slot' AND database = current_database()"
        )
        .unwrap(),
        "1",
        "another database's slot must survive"
    );
    c.psql(
        &other,
        "SELECT pg_drop_replication_slot('shadowmig_foreign_slot')",
    )
    .unwrap();
}

#[test]
fn abort_stops_a_running_migration_and_frees_the_slot() {
    let (c, db) = testpg::fresh_db("engine_abort_live").unwrap();
    setup(c, &db, 500);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "abort_live", &c.url(&db), 100);
    let mut child = spawn_run(&spec, &dir.path().join("run.log"));
    assert!(wait_equal(c, &db, Duration::from_secs(60)));
    let out = shadowmig(&["abort", spec.to_str().unwrap()])
        .output()
        .unwrap();
    common::assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dropped replication slot"));
    assert_eq!(
        c.psql(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        )
        .unwrap(),
        "0"
    );
    // The run notices and ends instead of recreating anything.
    let _ = wait_exit(&mut child, Duration::from_secs(20)).or_else(|| Some(sigterm(&mut child)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        c.psql(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        )
        .unwrap(),
        "0",
        "no orphaned slot holding WAL"
    );
}

/// With `[copy] defer_indexes` no slot consumer runs during the copy; abort must still stop
/// the run and leave nothing behind.
#[test]
fn abort_during_a_deferred_copy_leaves_nothing_behind() {
    let (c, db) = testpg::fresh_db("engine_abort_deferred").unwrap();
    setup(c, &db, 20_000);
    c.psql(&db, "ANALYZE orders").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("abort_deferred.toml");
    std::fs::write(
        &spec,
        common::orders_spec(
            "abort_deferred",
            &c.url(&db),
            "[copy]\nchunk_rows = 100\nworkers = 2\ndefer_indexes = true\n[throttle]\nmax_rows_per_sec = 2000\n",
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    wait_backfill_started(&spec);
    let out = shadowmig(&["abort", spec.to_str().unwrap()])
        .output()
        .unwrap();
    common::assert_ok(&out);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| !s.success()),
        "the run stops with an error: {status:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // The only migration of the database: abort drops the state schema with its tables.
    let left = c
        .psql(
            &db,
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()) || ' ' ||
                    (SELECT count(*) FROM pg_publication) || ' ' ||
                    (to_regclass('public.orders_v2') IS NULL) || ' ' ||
                    (SELECT count(*) FROM pg_namespace WHERE nspname = 'shadowmig')",
        )
        .unwrap();
    assert_eq!(
        left.trim(),
        "0 0 true 0",
        "slots, publications, table, state schema"
    );
    // Nothing recreated it after the abort.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        c.psql(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        )
        .unwrap()
        .trim(),
        "0"
    );
}

#[test]
fn source_ddl_mid_run_pauses_with_a_message_and_loses_nothing() {
    let (c, db) = testpg::fresh_db("engine_ddl").unwrap();
    setup(c, &db, 800);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "ddl_mid", &c.url(&db), 200);
    let log = dir.path().join("run.log");
    let mut child = spawn_caught_up(c, &db, &spec, &log, 60);
    c.psql(&db, "UPDATE orders SET status = 'before-ddl' WHERE id = 1")
        .unwrap();
    c.psql(&db, "ALTER TABLE orders ADD COLUMN priority int")
        .unwrap();
    c.psql(
        &db,
        "UPDATE orders SET status = 'after-ddl', priority = 1 WHERE id = 2",
    )
    .unwrap();
    let st = wait_exit(&mut child, Duration::from_secs(30)).expect("run did not pause");
    assert_eq!(st.code(), Some(3), "paused exit code");
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        err.contains("changed shape") && err.contains("priority"),
        "{err}"
    );
    assert_eq!(
        c.psql(&db, "SELECT status FROM orders_v2 WHERE id = 1")
            .unwrap(),
        "before-ddl",
        "changes before the DDL are applied"
    );
    let out = shadowmig(&["status", spec.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let stj: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        stj["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("changed shape"),
        "{stj}"
    );
    assert_eq!(stj["stage"], "paused", "{stj}");
    // The operator looks, decides the new column need not move, and runs again: it goes on,
    // and the migration is no longer shown as paused.
    run_to_catch_up(&spec);
    common::assert_orders_equal(c, &db);
    assert_eq!(status_json(&spec)["stage"], "source");
}

/// A DDL while no `run` is reading: the next run applies what was written before it, then
/// pauses where the stream crosses it: at the first change in the new shape, or, with none,
/// once everything written before the run started has arrived.
#[test]
fn a_ddl_while_stopped_pauses_the_next_run_after_the_changes_before_it() {
    let (c, db) = testpg::fresh_db("engine_ddl_stopped").unwrap();
    setup(c, &db, 300);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "ddl_stopped", &c.url(&db), 100);
    run_to_catch_up(&spec);
    let status_of = |id: i64| {
        c.psql(
            &db,
            &format!("SELECT status FROM orders_v2 WHERE id = {id}"),
        )
        .unwrap()
    };
    // Nothing written after the DDL: the pause comes at the marker.
    c.psql(&db, "UPDATE orders SET status = 'before-add' WHERE id = 1")
        .unwrap();
    c.psql(&db, "ALTER TABLE orders ADD COLUMN priority int")
        .unwrap();
    let log1 = dir.path().join("run1.log");
    let mut first = spawn_run(&spec, &log1);
    wait_paused_on_shape(&mut first, &log1);
    assert_logged(&log1, "priority");
    assert_eq!(
        status_of(1),
        "before-add",
        "the change before the DDL is applied"
    );
    assert_eq!(status_json(&spec)["stage"], "paused");
    run_to_catch_up(&spec);
    common::assert_orders_equal(c, &db);
    // A change after the DDL: the pause comes at its transaction, which is not applied.
    c.psql(&db, "UPDATE orders SET status = 'before-drop' WHERE id = 3")
        .unwrap();
    c.psql(&db, "ALTER TABLE orders DROP COLUMN priority")
        .unwrap();
    c.psql(&db, "UPDATE orders SET status = 'after-drop' WHERE id = 4")
        .unwrap();
    let log2 = dir.path().join("run2.log");
    let mut second = spawn_run(&spec, &log2);
    wait_paused_on_shape(&mut second, &log2);
    assert_eq!(
        status_of(3),
        "before-drop",
        "the change before the DDL is applied"
    );
    assert_ne!(
        status_of(4),
        "after-drop",
        "the change after the DDL waits for the operator"
    );
    run_to_catch_up(&spec);
    common::assert_orders_equal(c, &db);
    assert_eq!(status_json(&spec)["stage"], "source");
}

/// Waits for `run` to pause on a change of the source's shape (exit 3, the message logged);
/// on a timeout, kills it and panics with its log.
fn wait_paused_on_shape(child: &mut std::process::Child, log: &Path) {
    let Some(st) = wait_exit(child, Duration::from_secs(30)) else {
        let _ = child.kill();
        panic!(
            "run did not pause:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    };
    assert_eq!(st.code(), Some(3), "paused exit code");
    assert_logged(log, "changed shape mid-migration");
}

/// A DDL inside a transaction that changed rows before and after it: the run pauses; the
/// next run replays the rows written before the DDL in the older shape and must map them onto
/// the current columns (D30) instead of pausing again. Twice: a dropped column (rows only
/// reordered), then a retyped and an added column (rows deleted and re-read from the source).
#[test]
fn rows_written_before_a_ddl_in_the_same_transaction_are_applied_by_the_next_run() {
    let (c, db) = testpg::fresh_db("engine_ddl_txn").unwrap();
    setup(c, &db, 400);
    c.psql(&db, "ALTER TABLE orders ADD COLUMN scratch int DEFAULT 5")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "ddl_txn", &c.url(&db), 100);
    let log1 = dir.path().join("run1.log");
    let mut first = spawn_caught_up(c, &db, &spec, &log1, 60);
    c.psql(
        &db,
        "BEGIN;
         UPDATE orders SET status = 'before-drop', note = 'n' || id WHERE id <= 5;
         DELETE FROM orders WHERE id = 6;
         INSERT INTO orders (customer_id, total_amount, status, note) VALUES (77, 700, 'new-before-drop', 'x');
         UPDATE orders SET id = id + 100000 WHERE id = 7;
         ALTER TABLE orders DROP COLUMN scratch;
         UPDATE orders SET status = 'after-drop' WHERE id BETWEEN 4 AND 9;
         COMMIT;",
    )
    .unwrap();
    wait_paused_on_shape(&mut first, &log1);
    assert_eq!(
        c.psql(
            &db,
            "SELECT count(*) FROM orders_v2 WHERE status = 'before-drop' OR id = 100007"
        )
        .unwrap(),
        "0",
        "nothing of the transaction is applied"
    );

    // The operator reruns: the transaction is replayed, its first rows in the older shape.
    let log2 = dir.path().join("run2.log");
    let mut second = spawn_caught_up(c, &db, &spec, &log2, 60);
    assert_logged(&log2, "matched to its current columns by name");
    assert!(
        !std::fs::read_to_string(&log2)
            .unwrap()
            .contains("re-read from the source"),
        "a dropped column needs no re-read"
    );
    assert_eq!(status_json(&spec)["stage"], "source");

    // A retyped and an added column, in the middle of a transaction again.
    c.psql(
        &db,
        "BEGIN;
         UPDATE orders SET status = 'before-retype', note = repeat('t', 5000) WHERE id BETWEEN 10 AND 14;
         DELETE FROM orders WHERE id = 15;
         INSERT INTO orders (customer_id, total_amount, status, note) VALUES (78, 800, 'new-before-retype', 'y');
         UPDATE orders SET id = id + 100000, customer_id = customer_id + 1 WHERE id = 16;
         ALTER TABLE orders ALTER COLUMN status TYPE varchar(40);
         ALTER TABLE orders ADD COLUMN priority int DEFAULT 3;
         UPDATE orders SET priority = 1, note = 'after-retype' WHERE id BETWEEN 12 AND 20;
         COMMIT;
         UPDATE orders SET status = 'later', priority = 2 WHERE id = 13;",
    )
    .unwrap();
    wait_paused_on_shape(&mut second, &log2);
    assert_eq!(
        c.psql(
            &db,
            "SELECT count(*) FROM orders_v2 WHERE status = 'before-retype' OR id = 100016"
        )
        .unwrap(),
        "0",
        "nothing of the second transaction is applied"
    );
    let log3 = dir.path().join("run3.log");
    let mut third = spawn_caught_up(c, &db, &spec, &log3, 60);
    assert_logged(&log3, "re-read from the source");
    common::assert_orders_equal(c, &db);
    assert_eq!(status_json(&spec)["stage"], "source");
    // And it goes on streaming in the new shape.
    c.psql(
        &db,
        "UPDATE orders SET status = 'streamed', priority = 9 WHERE id BETWEEN 30 AND 40",
    )
    .unwrap();
    assert!(
        wait_equal(c, &db, Duration::from_secs(30)),
        "{}",
        std::fs::read_to_string(&log3).unwrap()
    );
    assert_eq!(sigterm(&mut third).code(), Some(0));
}

#[test]
fn source_truncate_mid_run_pauses_and_abort_cleans_up() {
    let (c, db) = testpg::fresh_db("engine_truncate").unwrap();
    setup(c, &db, 300);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "trunc_mid", &c.url(&db), 100);
    let log = dir.path().join("run.log");
    let mut child = spawn_caught_up(c, &db, &spec, &log, 60);
    c.psql(&db, "TRUNCATE orders").unwrap();
    let st = wait_exit(&mut child, Duration::from_secs(30)).expect("run did not pause");
    assert_eq!(st.code(), Some(3));
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(err.contains("TRUNCATE") && err.contains("abort"), "{err}");
    assert_eq!(
        c.psql(&db, "SELECT count(*) FROM orders_v2").unwrap(),
        "300",
        "the shadow table is left as it was"
    );
    let out = shadowmig(&["abort", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        c.psql(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        )
        .unwrap(),
        "0"
    );
}

#[test]
fn a_source_restart_during_streaming_is_survived() {
    let c = TestCluster::start(&shadowmig::testpg::ClusterConfig::default()).unwrap();
    let db = c.create_database("restart").unwrap();
    setup(&c, &db, 1000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "restart_mid", &c.url(&db), 200);
    let log = dir.path().join("run.log");
    let mut child = spawn_caught_up(&c, &db, &spec, &log, 60);
    let workload = common::Workload::start(&c.url(&db), 77, 300);
    std::thread::sleep(Duration::from_millis(800));
    restart(&c, &log);
    let _ = workload.finish();
    // More writes after the restart, on a new connection.
    c.psql(
        &db,
        "UPDATE orders SET status = 'post-restart' WHERE id % 5 = 0",
    )
    .unwrap();
    assert!(
        wait_equal(&c, &db, Duration::from_secs(90)),
        "run did not resume after the restart:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "run must survive a source restart"
    );
    assert_eq!(sigterm(&mut child).code(), Some(0));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("reconnecting"), "{log}");
}

#[test]
fn bad_input_to_run_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\n[source]\nurl = \"postgres://u:pw-secret@127.0.0.1:1/db\"\ntable = \"t\"\n[target]\ntable = \"t2\"\n[copy]\nchunk_rows = -5\n").unwrap();
    let out = shadowmig(&["run", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chunk_rows"), "{err}");
    assert!(!err.contains("pw-secret"));

    let (c, db) = testpg::fresh_db("engine_badinput").unwrap();
    let spec = write_spec(&dir, "no_source", &c.url(&db), 100);
    let out = common::output_within(shadowmig(&["run", spec.to_str().unwrap()]), CATCH_UP_LIMIT);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("preflight") && err.contains("orders"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn a_source_transaction_larger_than_a_batch_is_applied_whole() {
    let (c, db) = testpg::fresh_db("engine_large_txn").unwrap();
    setup(c, &db, 30_000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "large_txn", &c.url(&db), 5000);
    let log = dir.path().join("run.log");
    let mut child = spawn_caught_up(c, &db, &spec, &log, 120);
    // One transaction of 50,000 changes (more than a 20,000-change batch): updates, inserts,
    // key changes and deletes.
    c.psql(
        &db,
        "BEGIN;
         UPDATE orders SET status = 'bulk', total_amount = total_amount + 1;
         INSERT INTO orders (customer_id, total_amount, status) SELECT 1 + i % 97, i, 'bulk-new' FROM generate_series(1, 15000) i;
         UPDATE orders SET customer_id = customer_id + 1 WHERE id % 10 = 0;
         DELETE FROM orders WHERE id % 13 = 0;
         COMMIT;",
    )
    .unwrap();
    if !wait_equal(c, &db, Duration::from_secs(90)) {
        common::assert_orders_equal(c, &db);
    }
    assert_eq!(sigterm(&mut child).code(), Some(0));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("applying a large source transaction in parts"),
        "{log}"
    );
    common::assert_orders_equal(c, &db);
}

/// A batch holds net rows, not changes: a large transaction that updates the same 5,000 rows
/// twenty times (100,000 changes, written in parts as they arrive) writes each target row once,
/// where parts of 20,000 changes wrote every row five times. Counted by PostgreSQL's own
/// statistics on the shadow table, independently of shadowmig.
#[test]
fn a_large_transaction_is_coalesced_whole_and_writes_each_row_once() {
    let (c, db) = testpg::fresh_db("engine_coalesce").unwrap();
    setup(c, &db, 5000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "coalesce_whole", &c.url(&db), 5000);
    run_to_catch_up(&spec);
    let writes = || -> i64 {
        c.psql(
            &db,
            "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables
             WHERE relid IN (SELECT relid FROM pg_partition_tree('public.orders_v2'))",
        )
        .unwrap()
        .parse()
        .unwrap()
    };
    let before = writes();
    let mut sql = String::from("BEGIN;\n");
    for _ in 0..20 {
        sql.push_str("UPDATE orders SET total_amount = total_amount + 1, status = 'hot';\n");
    }
    sql.push_str("COMMIT;");
    c.psql(&db, &sql).unwrap();
    run_to_catch_up(&spec);
    common::assert_orders_equal(c, &db);
    // The run's backend has exited, so its statistics are flushed.
    let written = writes() - before;
    assert!(
        (5000..=5500).contains(&written),
        "100,000 changes to 5,000 rows should write about 5,000 target rows, wrote {written}"
    );
}

/// A transaction large enough to be written in parts as it arrives, cut short by SIGTERM
/// while it arrives: the parts already written are rolled back (the target never shows part of
/// a source transaction), `run` exits 0, and the next run applies it whole.
#[test]
fn a_large_transaction_cut_short_by_shutdown_is_rolled_back_then_applied_whole() {
    large_transaction_cut_short(false);
}

/// The same with kill -9: the server rolls the open target transaction back.
#[test]
fn a_large_transaction_cut_short_by_kill_9_is_applied_whole_by_the_next_run() {
    large_transaction_cut_short(true);
}

fn large_transaction_cut_short(kill_9: bool) {
    let name = if kill_9 { "large_kill" } else { "large_stop" };
    let (c, db) = testpg::fresh_db(&format!("engine_{name}")).unwrap();
    setup(c, &db, 25_000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, name, &c.url(&db), 5000);
    let log = dir.path().join("run.log");
    let mut child = spawn_caught_up(c, &db, &spec, &log, 120);
    // 8 passes over 25,000 rows: 200,000 changes, written in parts while they arrive.
    let mut sql = String::from("BEGIN;\n");
    for i in 1..=8 {
        sql.push_str(&format!(
            "UPDATE orders SET status = 'big', total_amount = {i};\n"
        ));
    }
    sql.push_str("COMMIT;");
    c.psql(&db, &sql).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("applying a large source transaction in parts as it arrives")
    {
        assert!(
            Instant::now() < deadline,
            "the large transaction never began"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    if kill_9 {
        child.kill().unwrap();
        child.wait().unwrap();
        // The server notices the dead connection and rolls its transaction back.
        std::thread::sleep(Duration::from_millis(500));
    } else {
        assert_eq!(sigterm(&mut child).code(), Some(0));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let big = || {
        c.psql(&db, "SELECT count(*) FROM orders_v2 WHERE status = 'big'")
            .unwrap()
    };
    let rolled_back = text.contains("parts were rolled back; it is applied whole later");
    let seen = big();
    assert!(
        seen == "0" || (!rolled_back && seen == "25000"),
        "part of a source transaction is visible in the target: {seen} rows (rolled back: {rolled_back})"
    );
    eprintln!("cut short: rolled back = {rolled_back}, rows seen = {seen}");
    run_to_catch_up(&spec);
    common::assert_orders_equal(c, &db);
    assert_eq!(big(), "25000");
}

#[test]
fn every_common_type_survives_backfill_and_streaming() {
    let (c, db) = testpg::fresh_db("engine_types").unwrap();
    c.psql(
        &db,
        r#"CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE SCHEMA "Odd ""S""";
        CREATE TABLE "Odd ""S"""."Typed ✓" (
            "Id" int PRIMARY KEY, t text, n numeric(12,3), ts timestamptz, jb jsonb, js json,
            b bytea, arr int[], m mood, u uuid, p point, big text, nul text
        );
        ALTER TABLE "Odd ""S"""."Typed ✓" ALTER COLUMN big SET STORAGE EXTERNAL;
        INSERT INTO "Odd ""S"""."Typed ✓"
        SELECT i, 'täxt ' || i, i * 1.5, '2024-05-01 12:00:00+02'::timestamptz + i * interval '1 hour',
               jsonb_build_object('k', i, 'a', jsonb_build_array(1, 'x')), json_build_object('k', i)::json,
               decode(md5(i::text), 'hex'), ARRAY[i, -i, NULL], (ARRAY['sad','ok','happy']::mood[])[1 + i % 3],
               md5(i::text)::uuid, point(i, -i), CASE WHEN i % 4 = 0 THEN repeat(md5(i::text), 300) END, NULL
        FROM generate_series(1, 400) i;"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("types.toml");
    let url = c.url(&db);
    std::fs::write(
        &spec,
        format!(
            r#"name = "types_mig"
[source]
url = "{url}"
table = '"Odd ""S"""."Typed ✓"'
[target]
table = '"Odd ""S"""."Typed v2 ✓"'
create = '''CREATE TABLE "Odd ""S"""."Typed v2 ✓" (LIKE "Odd ""S"""."Typed ✓"); ALTER TABLE "Odd ""S"""."Typed v2 ✓" ADD PRIMARY KEY ("Id")'''
[copy]
chunk_rows = 64
"#
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    let expected = r#"SELECT x::text FROM "Odd ""S"""."Typed ✓" x"#;
    let actual = r#"SELECT x::text FROM "Odd ""S"""."Typed v2 ✓" x"#;
    let equal = |c: &TestCluster| matches!(common::try_diff(c, &db, expected, actual), Some((m, e)) if m.is_empty() && e.is_empty());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !equal(c) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        equal(c),
        "backfill differs:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Streaming: updates that leave the TOASTed column alone, set NULLs, change every type.
    c.psql(
        &db,
        r#"UPDATE "Odd ""S"""."Typed ✓" SET t = t || '!', n = -n, p = point(0.5, 1e10), js = '[1, {"a": null}]'
           WHERE "Id" % 3 = 0;
           UPDATE "Odd ""S"""."Typed ✓" SET arr = NULL, jb = 'null', m = 'happy', b = '\x00ff' WHERE "Id" % 5 = 0;
           UPDATE "Odd ""S"""."Typed ✓" SET big = big || 'tail' WHERE "Id" % 8 = 0;
           DELETE FROM "Odd ""S"""."Typed ✓" WHERE "Id" % 7 = 0;
           INSERT INTO "Odd ""S"""."Typed ✓" ("Id", t, big) VALUES (1000, 'new', repeat('z', 9000));"#,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !equal(c) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let diff = common::try_diff(c, &db, expected, actual);
    assert!(
        equal(c),
        "streaming differs: {diff:#?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(sigterm(&mut child).code(), Some(0));
}

#[test]
fn pause_resume_and_throttle_act_on_a_running_backfill() {
    let (c, db) = testpg::fresh_db("engine_controls").unwrap();
    setup(c, &db, 20_000);
    c.psql(&db, "ANALYZE orders").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "controls_mig", &c.url(&db), 50);
    let out = shadowmig(&["pause", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "no migration yet: a clear error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("shadowmig run"));

    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    wait_backfill_started(&spec);
    let out = shadowmig(&["pause", spec.to_str().unwrap()])
        .output()
        .unwrap();
    common::assert_ok(&out);
    std::thread::sleep(Duration::from_millis(1500));
    let a = status_json(&spec);
    std::thread::sleep(Duration::from_millis(1500));
    let b = status_json(&spec);
    assert_eq!(a["controls"]["paused"], true);
    assert_eq!(
        a["copy"]["rows_copied"], b["copy"]["rows_copied"],
        "paused backfill must not copy"
    );
    assert_eq!(b["copy"]["done"], false);
    assert!(
        b["copy"]["rows_per_sec"].as_f64().unwrap_or(0.0) > 0.0,
        "{b}"
    );
    assert!(
        b["copy"]["eta_seconds"].as_f64().unwrap_or(0.0) > 0.0,
        "an ETA while copying: {b}"
    );
    // Off a terminal, the progress line carries the rates, the lag and the WAL held against
    // the server's limit (the harness leaves max_slot_wal_keep_size unlimited).
    wait_logged(&log, 15, "max_slot_wal_keep_size unlimited");
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("progress") && l.contains("slot_wal_held"))
        .unwrap_or_else(|| panic!("no progress line:\n{text}"));
    for field in [
        "rows_copied=",
        "rows_per_sec=",
        "apply_lag_ms=",
        "changes_per_sec=",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }

    let out = shadowmig(&[
        "throttle",
        spec.to_str().unwrap(),
        "--chunk-rows",
        "5000",
        "--workers",
        "3",
    ])
    .output()
    .unwrap();
    common::assert_ok(&out);
    let bad = shadowmig(&["throttle", spec.to_str().unwrap(), "--workers", "0"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let out = shadowmig(&["resume", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(wait_equal(c, &db, Duration::from_secs(60)));
    let st = status_json(&spec);
    assert_eq!(st["controls"]["chunk_rows"], 5000);
    assert_eq!(st["controls"]["workers"], 3);
    assert_eq!(st["controls"]["paused"], false);
    assert_eq!(sigterm(&mut child).code(), Some(0));
    let log = std::fs::read_to_string(&log).unwrap();
    for line in [
        "backfill paused by the operator",
        "backfill resumed by the operator",
        "chunk_rows set to 5000",
        "workers set to 3",
    ] {
        assert!(log.contains(line), "log lacks {line:?}:\n{log}");
    }
}

/// `[throttle] max_lag_bytes`: while the slot holds more WAL than the limit the backfill
/// waits, saying why, and copies nothing; `shadowmig throttle --max-lag-bytes` raises the
/// limit on the running process and the backfill finishes.
#[test]
fn the_slot_wal_limit_holds_the_backfill_until_raised() {
    let (c, db) = testpg::fresh_db("engine_slot_limit").unwrap();
    setup(c, &db, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let spec = held_spec(&dir, "slot_limit", &c.url(&db));
    let log = dir.path().join("run.log");
    let mut child = KillOnDrop(spawn_run(&spec, &log));
    poll_until(60, "the backfill to be throttled", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("backfill throttled: the slot holds")
    });
    assert_copy_held(&spec);
    raise_wal_limit(&spec);
    assert_caught_up(
        c,
        &db,
        90,
        &log,
        "the backfill did not finish after the limit was raised",
    );
    assert_logged(&log, "backfill resumed");
    assert_eq!(sigterm(&mut child.0).code(), Some(0));
    abort_ok(&spec);
}

/// A slow apply (each streamed update of a row costs the target 0.2 s, a trigger's sleep,
/// and updates come faster than that): the lag of the changes waiting grows past
/// `max_apply_lag_ms` and the backfill holds, saying why, until the apply has caught up;
/// then it finishes. The lag counts the batch in flight (D35): before, it was measured only
/// until a batch was handed to its writer.
#[test]
fn a_lagging_apply_holds_the_backfill_until_it_catches_up() {
    let (c, db) = testpg::fresh_db("engine_apply_lag").unwrap();
    setup(c, &db, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("apply_lag.toml");
    std::fs::write(
        &spec,
        common::orders_spec(
            "apply_lag",
            &c.url(&db),
            "[copy]\nchunk_rows = 500\nworkers = 2\n[throttle]\nmax_apply_lag_ms = 1500\n",
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut child = KillOnDrop(spawn_run(&spec, &log));
    wait_backfill_started(&spec);
    // Held by the operator first, so that the backfill is still under way when the apply
    // falls behind.
    common::assert_ok(
        &shadowmig(&["pause", spec.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    wait_logged(&log, 30, "backfill throttled: paused by the operator");
    c.psql(
        &db,
        "CREATE FUNCTION slow_apply() RETURNS trigger LANGUAGE plpgsql AS $$ \
           BEGIN PERFORM pg_sleep(0.2); RETURN NEW; END $$; \
         CREATE TRIGGER slow_apply BEFORE INSERT OR UPDATE ON orders_v2 FOR EACH ROW \
           WHEN (NEW.status = 'slow') EXECUTE FUNCTION slow_apply();",
    )
    .unwrap();
    // Rows already copied, so that only the apply meets the trigger: 20 of them, updated
    // 10 times a second, each costing the apply 0.2 s.
    let ids: Vec<String> = c
        .psql(&db, "SELECT id FROM orders_v2 ORDER BY id LIMIT 20")
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 20, "rows copied before the pause: {ids:?}");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, db) = (stop.clone(), db.clone());
        std::thread::spawn(move || {
            for id in ids.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                c.psql(
                    &db,
                    &format!("UPDATE orders SET status = 'slow' WHERE id = {id}"),
                )
                .unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    common::assert_ok(
        &shadowmig(&["resume", spec.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    wait_logged(&log, 60, "backfill throttled: apply lags");
    assert_copy_held(&spec);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert_caught_up(
        c,
        &db,
        120,
        &log,
        "the backfill did not finish after the apply caught up",
    );
    let l = std::fs::read_to_string(&log).unwrap_or_default();
    let throttled = l.find("backfill throttled: apply lags").unwrap_or(0);
    assert!(
        l[throttled..].contains("backfill resumed"),
        "no resume logged after the apply lag:\n{l}"
    );
    assert_eq!(sigterm(&mut child.0).code(), Some(0));
    abort_ok(&spec);
}

/// The backfill's own sessions on the source (its planner and readers) terminated by an
/// administrator while the run's other connections stay up: the backfill opens new ones and
/// finishes, nothing lost, the process never exits. (Before, it retried on the dead sessions
/// forever.)
#[test]
fn terminated_backfill_sessions_are_reopened_and_the_backfill_finishes() {
    let (c, db) = testpg::fresh_db("engine_copy_terminated").unwrap();
    setup(c, &db, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "copy_terminated", &c.url(&db), 500);
    let log = dir.path().join("run.log");
    let mut child = KillOnDrop(spawn_run(&spec, &log));
    wait_backfill_started(&spec);
    let out = shadowmig(&["pause", spec.to_str().unwrap()])
        .output()
        .unwrap();
    common::assert_ok(&out);
    let copying = format!(
        "FROM pg_stat_activity WHERE datname = '{db}' AND application_name = 'shadowmig copy'"
    );
    let killed: i64 = c
        .psql(
            &db,
            &format!("SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) {copying}"),
        )
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        killed >= 2,
        "the backfill's sessions were there to end: {killed}"
    );
    let out = shadowmig(&["resume", spec.to_str().unwrap()])
        .output()
        .unwrap();
    common::assert_ok(&out);
    assert_caught_up(
        c,
        &db,
        90,
        &log,
        "the backfill did not finish after its sessions were terminated",
    );
    stop_still_running(&mut child.0, &log);
    assert_logged(
        &log,
        "the planning session to the source was closed; reconnecting",
    );
    abort_ok(&spec);
}

/// A backfill read whose session ends after it sent its rows but before its high watermark
/// (failpoint `copy_before_hw`), under a write load, for both workers' first reads. Its rows
/// must neither stand in for the job's next read nor keep a worker's permit: before D38 the
/// backfill stalled for good (seen once under CI load, when an administrator's terminate
/// landed there). Caught up, nothing lost, the run still up.
#[test]
fn reads_cut_off_before_their_high_watermark_stall_nothing() {
    let (c, db) = testpg::fresh_db("engine_copy_cut_hw").unwrap();
    setup(c, &db, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "copy_cut_hw", &c.url(&db), 500);
    let log = dir.path().join("run.log");
    let workload = common::Workload::start(&c.url(&db), 23, 100_000);
    let mut child = KillOnDrop(spawn_with_failpoints(&spec, &log, "copy_before_hw=3"));
    wait_logged(&log, 60, "backfill done");
    let stats = workload.finish();
    assert!(stats.committed > 0, "{stats:?}");
    assert_eq!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("emitting a watermark: connection closed; retrying the chunk")
            .count(),
        3,
        "each cut-off read is retried once"
    );
    assert_caught_up(
        c,
        &db,
        120,
        &log,
        "the backfill stalled after reads were cut off before their high watermark",
    );
    stop_still_running(&mut child.0, &log);
    abort_ok(&spec);
}

/// A read whose session ends right after its high watermark reached the WAL (failpoint
/// `copy_after_hw`): the read failed for the copier, which reads the chunk again, but the
/// stream applied it already. The retry is ignored: every row is copied once (`rows_copied`
/// is exactly the table's size) and the run catches up.
#[test]
fn a_read_retried_after_its_high_watermark_landed_is_applied_once() {
    let (c, db) = testpg::fresh_db("engine_copy_after_hw").unwrap();
    setup(c, &db, 5000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "copy_after_hw", &c.url(&db), 500);
    let log = dir.path().join("run.log");
    let mut child = KillOnDrop(spawn_with_failpoints(&spec, &log, "copy_after_hw=3"));
    assert_caught_up(c, &db, 90, &log, "the run did not catch up");
    wait_logged(&log, 30, "caught up");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let retried: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("retrying the chunk"))
        .collect();
    assert_eq!(
        retried.len(),
        3,
        "each cut-off read failed once: {retried:#?}"
    );
    assert_eq!(status_json(&spec)["copy"]["rows_copied"], 5000);
    stop_still_running(&mut child.0, &log);
    abort_ok(&spec);
}

/// `[copy] defer_indexes`: the key is dropped while the history is copied (plan still passes
/// and says why), changes made meanwhile are applied after the constraints are built, and
/// rows the copy left twice (as a killed run's chunk writer can) are removed before the build.
#[test]
fn deferred_constraints_are_built_after_the_copy_even_over_duplicate_rows() {
    let (c, db) = testpg::fresh_db("engine_deferred").unwrap();
    setup(c, &db, 20_000);
    c.psql(&db, "ANALYZE orders").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("deferred_mig.toml");
    // A secondary index too, named so that its definition holds "ON ONLY" twice.
    std::fs::write(
        &spec,
        common::orders_spec(
            "deferred_mig",
            &c.url(&db),
            "[copy]\nchunk_rows = 100\nworkers = 1\ndefer_indexes = true\n[throttle]\nmax_rows_per_sec = 4000\n",
        )
        .replace(
            "PARTITION BY HASH (customer_id);",
            "PARTITION BY HASH (customer_id);\nCREATE INDEX \"by ON ONLY created\" ON public.orders_v2 (created_at);",
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    wait_backfill_started(&spec);
    common::assert_ok(
        &shadowmig(&["pause", spec.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let copied = status_json(&spec)["copy"]["rows_copied"]
        .as_i64()
        .unwrap_or(0);
    assert!(copied > 0 && copied < 20_000, "paused mid-copy: {copied}");
    let keys = c
        .psql(
            &db,
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'public.orders_v2'::regclass AND contype IN ('p', 'u')",
        )
        .unwrap();
    assert_eq!(keys.trim(), "0", "the key is built after the copy");
    let indexes = c
        .psql(
            &db,
            "SELECT count(*) FROM pg_index WHERE indrelid = 'public.orders_v2'::regclass",
        )
        .unwrap();
    assert_eq!(indexes.trim(), "0", "and so are the other indexes");
    let plan = shadowmig(&["plan", spec.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.status.success() && text.contains("built when the backfill ends"),
        "{text}\n{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let verify = shadowmig(&["verify", spec.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&verify.stderr).contains("defer_indexes builds it"),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // Rows written twice, and source changes the stream must apply after the build.
    c.psql(
        &db,
        "INSERT INTO orders_v2 SELECT * FROM orders_v2 ORDER BY id LIMIT 50;
         UPDATE orders SET status = 'during', note = NULL WHERE id % 10 = 0;
         DELETE FROM orders WHERE id % 97 = 0;
         UPDATE orders SET customer_id = customer_id + 1 WHERE id % 31 = 0;
         INSERT INTO orders (customer_id, total_amount, status, note, created_at)
         SELECT 1 + i % 13, i, 'new', 'late', now() FROM generate_series(1, 500) i;",
    )
    .unwrap();
    common::assert_ok(
        &shadowmig(&["resume", spec.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_caught_up(c, &db, 90, &log, "run did not catch up");
    assert_eq!(sigterm(&mut child).code(), Some(0));
    assert_deferred_built(c, &db, "deferred_mig");
    let secondary = c
        .psql(
            &db,
            "SELECT x.indisvalid || ' ' || (SELECT count(*) FROM pg_inherits WHERE inhparent = x.indexrelid)
               FROM pg_index x WHERE x.indexrelid = 'public.\"by ON ONLY created\"'::regclass",
        )
        .unwrap();
    assert_eq!(
        secondary.trim(),
        "true 4",
        "the secondary index, on every partition"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    for line in [
        "backfill with deferred constraints: copying before streaming",
        "backfill paused by the operator",
        "backfill with deferred constraints: copy done",
        "removed the extra copies",
        "constraints built",
    ] {
        assert!(log.contains(line), "log lacks {line:?}:\n{log}");
    }
    // Streaming goes on as usual afterwards.
    c.psql(&db, "UPDATE orders SET status = 'after' WHERE id % 7 = 0")
        .unwrap();
    run_to_catch_up(&spec);
    common::assert_orders_equal(c, &db);
    common::assert_ok(
        &shadowmig(&["abort", spec.to_str().unwrap()])
            .output()
            .unwrap(),
    );
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[test]
fn prometheus_metrics_report_copy_and_apply() {
    let (c, db) = testpg::fresh_db("engine_metrics").unwrap();
    setup(c, &db, 1500);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "metrics_mig", &c.url(&db), 300);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut text = std::fs::read_to_string(&spec).unwrap();
    text.push_str(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    std::fs::write(&spec, text).unwrap();
    let mut child = spawn_run(&spec, &dir.path().join("run.log"));
    assert!(wait_equal(c, &db, Duration::from_secs(60)));
    c.psql(&db, "UPDATE orders SET status = 'm' WHERE id <= 25")
        .unwrap();
    assert!(wait_equal(c, &db, Duration::from_secs(30)));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut body = String::new();
    while Instant::now() < deadline {
        body = http_get(port, "/metrics");
        if metric(&body, "shadowmig_changes_applied_total").unwrap_or(0.0) >= 25.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        metric(&body, "shadowmig_rows_copied_total"),
        Some(1500.0),
        "{body}"
    );
    assert!(
        metric(&body, "shadowmig_changes_applied_total").unwrap_or(0.0) >= 25.0,
        "{body}"
    );
    for name in [
        "shadowmig_apply_lag_bytes",
        "shadowmig_apply_lag_seconds",
        "shadowmig_batch_size_count",
        "shadowmig_apply_seconds_count",
        "shadowmig_stage",
    ] {
        assert!(metric(&body, name).is_some(), "{name} missing:\n{body}");
    }
    assert!(
        body.contains("# HELP shadowmig_rows_copied_total"),
        "{body}"
    );
    // The lag histogram: one sample per committed batch of streamed changes, each the age of
    // the batch's oldest change (seconds, on this test's idle machine well under a minute).
    let lag_count = metric(&body, "shadowmig_batch_lag_seconds_count").unwrap_or(0.0);
    let lag_sum = metric(&body, "shadowmig_batch_lag_seconds_sum").unwrap_or(-1.0);
    assert!(lag_count > 0.0, "no lag samples:\n{body}");
    assert!(
        (0.0..60.0 * lag_count).contains(&lag_sum),
        "lag sum {lag_sum} over {lag_count} batches:\n{body}"
    );
    assert!(
        body.contains("shadowmig_batch_lag_seconds_bucket{le=\"0.5\"}"),
        "{body}"
    );
    // pg_stat_activity tells a run's sessions apart (and what each costs the server).
    let names = c
        .psql(
            &db,
            "SELECT string_agg(DISTINCT application_name, ',' ORDER BY application_name) \
             FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE 'shadowmig%'",
        )
        .unwrap();
    for role in ["shadowmig apply", "shadowmig control", "shadowmig sampler"] {
        assert!(
            names.split(',').any(|n| n.trim() == role),
            "{role} not in {names}"
        );
    }
    assert_eq!(sigterm(&mut child).code(), Some(0));
    // Human log lines carry the stage fields as plain `key=value`, no colour codes in a file.
    let log = std::fs::read_to_string(dir.path().join("run.log")).unwrap();
    for line in [
        "stage changed scope=run migration=metrics_mig from=none to=setting-up",
        "stage changed scope=run migration=metrics_mig from=setting-up to=backfill",
    ] {
        assert!(log.contains(line), "log lacks {line:?}:\n{log}");
    }
    assert!(log.contains(" to=stopped"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log}");
}

/// The `stage changed` lines of a JSON log: (scope, from, to) in order.
fn stage_lines(log: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "stage changed")
        .map(|v| {
            let f = |k: &str| v["fields"][k].as_str().unwrap_or("?").to_string();
            (f("scope"), f("from"), f("to"))
        })
        .collect()
}

#[test]
fn every_stage_change_logs_one_line_in_order() {
    let (c, db) = testpg::fresh_db("engine_stages").unwrap();
    // 100 chunks: long enough for the pause to land mid-backfill, short for CI.
    setup(c, &db, 5_000);
    c.psql(&db, "ANALYZE orders").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "stages_mig", &c.url(&db), 50);
    let log = dir.path().join("run.log");
    let mut child = shadowmig(&["--log-format", "json", "run", spec.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_backfill_started(&spec);
    let control = |cmd: &str| {
        let out = shadowmig(&[cmd, spec.to_str().unwrap()]).output().unwrap();
        assert!(out.status.success(), "{cmd}: {out:?}");
    };
    control("pause");
    std::thread::sleep(Duration::from_millis(1500));
    control("resume");
    assert!(wait_equal(c, &db, Duration::from_secs(120)));
    c.psql(&db, "UPDATE orders SET status = 'staged' WHERE id <= 10")
        .unwrap();
    let run_lines = |log: &Path| {
        stage_lines(log)
            .into_iter()
            .filter(|(s, _, _)| s == "run")
            .map(|(_, f, t)| format!("{f}->{t}"))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run_lines(&log).contains(&"streaming->caught-up".to_string())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    // A source change apply cannot follow pauses the run: the persisted stage changes too.
    c.psql(&db, "ALTER TABLE orders ADD COLUMN priority int")
        .unwrap();
    c.psql(&db, "UPDATE orders SET priority = 1 WHERE id = 2")
        .unwrap();
    let st = wait_exit(&mut child, Duration::from_secs(30)).expect("run did not pause");
    assert_eq!(st.code(), Some(3));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        run_lines(&log),
        [
            "none->setting-up",
            "setting-up->backfill",
            "backfill->paused",
            "paused->backfill",
            "backfill->streaming",
            "streaming->caught-up",
            "caught-up->paused",
        ],
        "{text}"
    );
    let migration: Vec<_> = stage_lines(&log)
        .into_iter()
        .filter(|(s, _, _)| s == "migration")
        .collect();
    assert_eq!(
        migration,
        [("migration".into(), "source".into(), "paused".into())],
        "{text}"
    );
    assert_eq!(
        c.psql(
            &db,
            "SELECT stage FROM shadowmig.migrations WHERE name = 'stages_mig'"
        )
        .unwrap(),
        "paused"
    );
}

#[test]
fn a_second_live_run_of_the_same_migration_is_refused() {
    let (c, db) = testpg::fresh_db("engine_two_runs").unwrap();
    setup(c, &db, 200);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "two_runs", &c.url(&db), 100);
    let mut first = spawn_run(&spec, &dir.path().join("run1.log"));
    assert!(wait_equal(c, &db, Duration::from_secs(60)));
    let mut cmd = shadowmig(&["run", spec.to_str().unwrap()]);
    cmd.env("SHADOWMIG_WRITER_LOCK_WAIT_SECS", "2");
    let out = common::output_within(cmd, CATCH_UP_LIMIT);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another `shadowmig run`"), "{err}");
    assert!(first.try_wait().unwrap().is_none(), "the first run goes on");
    c.psql(
        &db,
        "UPDATE orders SET status = 'still-streaming' WHERE id = 1",
    )
    .unwrap();
    assert!(wait_equal(c, &db, Duration::from_secs(30)));
    assert_eq!(sigterm(&mut first).code(), Some(0));
}

#[test]
fn the_slot_advances_during_backfill_and_while_idle() {
    let (c, db) = testpg::fresh_db("engine_slot_advance").unwrap();
    setup(c, &db, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "slot_adv", &c.url(&db), 500);
    // A WAL limit far below what the backfill itself writes into the same database: the
    // backfill must still finish (the slot has to be confirmed past its own watermarks).
    let mut text = std::fs::read_to_string(&spec).unwrap();
    text.push_str("[throttle]\nmax_lag_bytes = 4000000\n");
    std::fs::write(&spec, text).unwrap();
    let log = dir.path().join("run.log");
    let mut child = spawn_caught_up(c, &db, &spec, &log, 120);
    // Idle source table; WAL written elsewhere. The slot must follow.
    c.psql(
        &db,
        "CREATE TABLE unrelated AS SELECT g FROM generate_series(1, 100000) g",
    )
    .unwrap();
    let target = c.psql(&db, "SELECT pg_current_wal_insert_lsn()").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let advanced = loop {
        let ok = c
            .psql(&db, &format!("SELECT confirmed_flush_lsn >= '{target}' FROM pg_replication_slots WHERE slot_name = 'shadowmig_slot_adv'"))
            .unwrap();
        if ok == "t" || Instant::now() > deadline {
            break ok == "t";
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        advanced,
        "an idle slot must advance:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(sigterm(&mut child).code(), Some(0));
}

/// A stream that is never quiet — here a flood of other applications' logical messages, like
/// the keepalives of a walsender waiting to shut down — must not hold applied changes back:
/// batches are flushed by age, not only when the stream pauses.
#[test]
fn a_busy_stream_does_not_hold_changes_back() {
    let (c, db) = testpg::fresh_db("engine_busy_stream").unwrap();
    setup(c, &db, 500);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "busy_stream", &c.url(&db), 1000);
    let log = dir.path().join("run.log");
    let mut child = spawn_caught_up(c, &db, &spec, &log, 60);
    let stop = Arc::new(AtomicBool::new(false));
    let (url, stop2) = (c.url(&db), stop.clone());
    let flood = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            // Each commit flushes the WAL at once, so the walsender sends without pause (the
            // harness's asynchronous commit would batch them every wal_writer_delay).
            client
                .batch_execute("SET synchronous_commit = on")
                .await
                .unwrap();
            let mut sent = 0u64;
            let until = Instant::now() + Duration::from_secs(30);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < until {
                client
                    .execute("SELECT pg_logical_emit_message(true, 'noise', 'x')", &[])
                    .await
                    .unwrap();
                sent += 1;
            }
            sent
        })
    });
    std::thread::sleep(Duration::from_secs(1));
    c.psql(&db, "UPDATE orders SET status = 'busy-stream' WHERE id = 7")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let applied = loop {
        let v = c
            .psql(&db, "SELECT status FROM orders_v2 WHERE id = 7")
            .unwrap();
        if v == "busy-stream" || Instant::now() > deadline {
            break v == "busy-stream";
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let still_flooding = !flood.is_finished();
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().unwrap();
    assert!(
        still_flooding && sent > 100,
        "the flood must outlast the check ({sent} messages)"
    );
    assert!(
        applied,
        "a change waited behind a busy stream:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(wait_equal(c, &db, Duration::from_secs(30)));
    assert_eq!(sigterm(&mut child).code(), Some(0));
}

/// The bulk path evaluates the transform in the source, the stream's apply in the target: with
/// source and target databases in different default time zones, a `timestamptz` → `date`
/// transform must still come out the same both ways (the target's settings rule).
#[test]
fn backfilled_and_streamed_rows_are_transformed_alike_across_databases() {
    let (c, src) = testpg::fresh_db("engine_tz_src").unwrap();
    let (_, dst) = testpg::fresh_db("engine_tz_dst").unwrap();
    c.psql(
        &src,
        &format!("ALTER DATABASE {src} SET TimeZone = 'Pacific/Kiritimati'"),
    )
    .unwrap();
    c.psql(
        &dst,
        &format!("ALTER DATABASE {dst} SET TimeZone = 'Pacific/Pago_Pago'"),
    )
    .unwrap();
    c.psql(
        &src,
        "CREATE TABLE ev (id bigint PRIMARY KEY, at timestamptz NOT NULL);
         INSERT INTO ev SELECT g, '2024-03-01 00:00+00'::timestamptz + g * interval '37 minutes'
         FROM generate_series(1, 3000) g;",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("tz.toml");
    std::fs::write(
        &spec,
        format!(
            r#"name = "tz"
[source]
url = "{}"
table = "public.ev"
[target]
url = "{}"
table = "public.ev2"
create = "CREATE TABLE public.ev2 (id bigint PRIMARY KEY, day date NOT NULL)"
[transform]
day = "at::date"
[copy]
chunk_rows = 500
"#,
            c.url(&src),
            c.url(&dst)
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    // The day each row falls on in the target's zone, computed independently.
    let expected = |c: &TestCluster| {
        c.psql(
            &src,
            "SET TimeZone = 'Pacific/Pago_Pago'; SELECT string_agg(id || ':' || at::date, ',' ORDER BY id) FROM ev",
        )
        .unwrap()
    };
    let actual = |c: &TestCluster| {
        c.psql(
            &dst,
            "SELECT string_agg(id || ':' || day, ',' ORDER BY id) FROM ev2",
        )
        .unwrap_or_default()
    };
    let wait = |c: &TestCluster| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if actual(c) == expected(c) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    };
    assert!(
        wait(c),
        "backfilled days differ:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Streamed changes, transformed in the target.
    c.psql(
        &src,
        "UPDATE ev SET at = at + interval '11 hours' WHERE id % 3 = 0;
         INSERT INTO ev SELECT g, '2024-06-01 23:30+00'::timestamptz + g * interval '7 minutes'
         FROM generate_series(3001, 3200) g;",
    )
    .unwrap();
    assert!(
        wait(c),
        "streamed days differ:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(std::fs::read_to_string(&log).unwrap().contains("bulk path"));
    assert_eq!(sigterm(&mut child).code(), Some(0));
}

/// Waits (up to 30 s) until `status` shows copied rows.
fn wait_backfill_started(spec: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_json(spec)["copy"]["rows_copied"]
        .as_i64()
        .unwrap_or(0)
        == 0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `run` and waits (up to `secs`) until the target equals transform(source); on a
/// timeout, panics with the run's log.
fn spawn_caught_up(
    c: &TestCluster,
    db: &str,
    spec: &Path,
    log: &Path,
    secs: u64,
) -> std::process::Child {
    let child = spawn_run(spec, log);
    assert!(
        wait_equal(c, db, Duration::from_secs(secs)),
        "run did not catch up:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    child
}

fn spawn_run(spec: &Path, log: &Path) -> std::process::Child {
    common::spawn_run(spec, log, "shadowmig=debug")
}

/// [`spawn_run`] with failpoints armed (`name=count,…`, `src/failpoint.rs`).
fn spawn_with_failpoints(spec: &Path, log: &Path, arm: &str) -> std::process::Child {
    common::spawn_run_env(
        spec,
        log,
        "shadowmig=debug",
        &[(shadowmig::failpoint::ENV, arm)],
    )
}

/// Asserts that `child` (a `run`) never exited on its own, then stops it with SIGTERM, which
/// must end it with exit 0.
fn stop_still_running(child: &mut std::process::Child, log: &Path) {
    assert!(
        child.try_wait().unwrap().is_none(),
        "the run exited:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    assert_eq!(sigterm(child).code(), Some(0));
}

/// Waits (up to `secs`) until the run's log says `text`; on a timeout, panics with the log.
fn wait_logged(log: &Path, secs: u64, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let l = std::fs::read_to_string(log).unwrap_or_default();
        if l.contains(text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the log to say {text:?}:\n{l}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits up to `secs` for target = transform(source); otherwise panics with `what` and the
/// run's log.
fn assert_caught_up(c: &TestCluster, db: &str, secs: u64, log: &Path, what: &str) {
    assert!(
        wait_equal(c, db, Duration::from_secs(secs)),
        "{what}:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// `pg_ctl restart -m fast` of `c`, or a panic with the run's log.
fn restart(c: &TestCluster, log: &Path) {
    if let Err(e) = c.restart_fast() {
        panic!(
            "restart failed: {e}\nrun log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// Polls `cond` every 100 ms for up to `secs` seconds; panics with `what` when it stays false.
fn poll_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `[throttle] max_replica_lag_bytes`: a physical standby whose replay is paused holds the
/// backfill back, with a message that names it, until its replay resumes. A logical consumer
/// that stopped reading (its walsender still listed in `pg_stat_replication`, its confirmed
/// position far behind) is not a standby and holds nothing back: the backfill finishes while
/// it is still stopped.
#[test]
fn a_lagging_standby_throttles_the_backfill_and_a_stalled_logical_consumer_does_not() {
    // The stopped bystander's walsender must not time out and leave during the test.
    let c =
        TestCluster::start(&testpg::ClusterConfig::default().setting("wal_sender_timeout", "0"))
            .unwrap();
    let db = c.create_database("engine_standby").unwrap();
    setup(&c, &db, 20_000);
    let standby = c.start_standby().unwrap();
    let lag_of = |app: &str| -> i64 {
        c.psql(
            "postgres",
            &format!(
                "SELECT coalesce(max(pg_current_wal_lsn() - replay_lsn), -1)::int8 \
                 FROM pg_stat_replication WHERE application_name = '{app}'"
            ),
        )
        .unwrap()
        .parse()
        .unwrap()
    };
    poll_until(30, "the standby to stream", || lag_of("walreceiver") >= 0);

    // A bystander logical consumer — another migration of the same table, which confirms what
    // it applied as its replay position — catches up, then is stopped dead (SIGSTOP).
    let dir = tempfile::tempdir().unwrap();
    let by_spec = dir.path().join("bystander.toml");
    std::fs::write(
        &by_spec,
        common::orders_spec("bystander", &c.url(&db), "").replace("orders_v2", "orders_by"),
    )
    .unwrap();
    let bystander = KillOnDrop(spawn_run(&by_spec, &dir.path().join("bystander.log")));
    poll_until(120, "the bystander to catch up", || {
        c.psql(
            &db,
            "SELECT count(*) FROM shadowmig.migrations WHERE name = 'bystander' AND caught_up_at IS NOT NULL",
        )
        .unwrap_or_default()
            == "1"
            && lag_of("shadowmig") >= 0
    });
    // SAFETY: stopping our own child process.
    unsafe {
        libc::kill(bystander.0.id() as i32, libc::SIGSTOP);
    }

    standby
        .psql("postgres", "SELECT pg_wal_replay_pause()")
        .unwrap();
    poll_until(30, "the standby's replay to pause", || {
        standby
            .psql("postgres", "SELECT pg_get_wal_replay_pause_state()")
            .unwrap()
            == "paused"
    });
    c.psql(
        &db,
        "CREATE TABLE filler AS SELECT g, repeat('x', 200) AS pad FROM generate_series(1, 20000) g",
    )
    .unwrap();
    const LIMIT: i64 = 1 << 20;
    poll_until(30, "the standby's lag to pass the limit", || {
        lag_of("walreceiver") > LIMIT
    });
    assert!(lag_of("shadowmig") > LIMIT, "the bystander lags too");

    let spec = dir.path().join("standby_mig.toml");
    std::fs::write(
        &spec,
        common::orders_spec(
            "standby_mig",
            &c.url(&db),
            &format!("[copy]\nchunk_rows = 500\nworkers = 2\n[throttle]\nmax_replica_lag_bytes = {LIMIT}\n"),
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    poll_until(60, "the backfill to be throttled", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("backfill throttled: a standby's replay lags")
    });
    assert_copy_held(&spec);

    standby
        .psql("postgres", "SELECT pg_wal_replay_resume()")
        .unwrap();
    assert!(
        wait_equal(&c, &db, Duration::from_secs(90)),
        "the backfill did not finish after the standby caught up:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_logged(&log, "backfill resumed");
    assert_eq!(
        c.psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid \
                 WHERE s.slot_name = 'shadowmig_bystander' AND pg_current_wal_lsn() - r.replay_lsn > {LIMIT}"
            )
        )
        .unwrap(),
        "1",
        "the bystander stayed stopped and behind throughout"
    );
    assert_eq!(sigterm(&mut child).code(), Some(0));
    drop(bystander);
    abort_ok(&spec);
    abort_ok(&by_spec);
}

/// Asserts that the backfill is not done and copies nothing over 1.5 s (it is held back).
fn assert_copy_held(spec: &Path) {
    let a = status_json(spec);
    std::thread::sleep(Duration::from_millis(1500));
    let b = status_json(spec);
    assert_eq!(b["copy"]["done"], false, "{b}");
    assert_eq!(
        a["copy"]["rows_copied"], b["copy"]["rows_copied"],
        "a held backfill must not copy"
    );
}

/// The orders spec `NAME.toml` with a WAL limit of 1 byte: the backfill is held from its
/// start (logging "backfill throttled: the slot holds …") until [`raise_wal_limit`].
fn held_spec(dir: &tempfile::TempDir, name: &str, url: &str) -> PathBuf {
    let spec = dir.path().join(format!("{name}.toml"));
    std::fs::write(
        &spec,
        common::orders_spec(
            name,
            url,
            "[copy]\nchunk_rows = 500\nworkers = 2\n[throttle]\nmax_lag_bytes = 1\n",
        ),
    )
    .unwrap();
    spec
}

/// `shadowmig throttle SPEC --max-lag-bytes 100000000000` on the running migration.
fn raise_wal_limit(spec: &Path) {
    common::assert_ok(
        &shadowmig(&[
            "throttle",
            spec.to_str().unwrap(),
            "--max-lag-bytes",
            "100000000000",
        ])
        .output()
        .unwrap(),
    );
}

/// `shadowmig abort SPEC`, which must succeed.
fn abort_ok(spec: &Path) {
    let out = common::output_within(
        shadowmig(&["abort", spec.to_str().unwrap()]),
        Duration::from_secs(120),
    );
    common::assert_ok(&out);
}

/// A child process killed (SIGKILL works on a stopped one too) when the test ends or panics.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The target on a server of its own, restarted (`pg_ctl restart -m fast`) during the backfill
/// and again while the source is written to: `run` loses only its target connections, retries with backoff, resumes
/// from the state in the target, and the target ends equal to transform(source).
#[test]
fn a_target_server_restart_during_backfill_and_streaming_is_survived() {
    let (c, db) = testpg::fresh_db("engine_tgt_restart").unwrap();
    setup(c, &db, 20_000);
    let t = TestCluster::start(&shadowmig::testpg::ClusterConfig::default()).unwrap();
    let tdb = t.create_database("tgt_restart").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("tgt_restart.toml");
    let text = common::orders_spec(
        "tgt_restart",
        &c.url(&db),
        "[copy]\nchunk_rows = 200\nworkers = 2\n",
    )
    .replacen(
        "[target]\n",
        &format!("[target]\nurl = \"{}\"\n", t.url(&tdb)),
        1,
    );
    std::fs::write(&spec, text).unwrap();
    // The two sides compared by an order-independent digest of their rows' text, each
    // computed on its own server (an EXCEPT cannot span two servers).
    let digest = |cl: &TestCluster, d: &str, q: &str| {
        cl.psql(
            d,
            &format!("SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, '|' ORDER BY x::text)), '') FROM ({q}) x"),
        )
        .unwrap_or_default()
    };
    let equal_within = |secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (e, a) = (
                digest(c, &db, common::ORDERS_EXPECTED),
                digest(&t, &tdb, common::ORDERS_ACTUAL),
            );
            if e == a {
                return true;
            }
            if Instant::now() > deadline {
                eprintln!("expected {e}, target {a}");
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    // Once during the backfill (the chunk writers lose their connections too)…
    wait_backfill_started(&spec);
    restart(&t, &log);
    assert!(
        equal_within(90),
        "run did not finish the backfill after a target restart:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let workload = common::Workload::start(&c.url(&db), 91, 400);
    // …and once while streaming.
    std::thread::sleep(Duration::from_millis(800));
    restart(&t, &log);
    std::thread::sleep(Duration::from_millis(500));
    let stats = workload.finish();
    assert!(stats.committed > 20, "workload too small: {stats:?}");
    c.psql(
        &db,
        "UPDATE orders SET status = 'after-target-restart' WHERE id % 7 = 0",
    )
    .unwrap();
    assert!(
        equal_within(90),
        "run did not resume after the target restart:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "run must survive a target restart:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(sigterm(&mut child).code(), Some(0));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("reconnecting"), "{log}");
    abort_ok(&spec);
}

/// SIGINT (Ctrl-C) in the middle of a write load: `run` finishes the batch, commits it,
/// confirms the slot up to it and exits 0 within seconds; the slot is then released and
/// confirmed at least as far as the progress committed in the target (nothing committed is
/// left unconfirmed, nothing unconfirmed is counted as applied), and the next run picks up
/// every change made meanwhile.
#[test]
fn sigint_mid_load_commits_confirms_and_exits_0() {
    let (c, db) = testpg::fresh_db("engine_sigint").unwrap();
    setup(c, &db, 3000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "sigint_mig", &c.url(&db), 500);
    let log = dir.path().join("run.log");
    let mut child = spawn_caught_up(c, &db, &spec, &log, 60);
    let workload = common::Workload::start(&c.url(&db), 5, 100_000);
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = wait_exit(&mut child, Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "run did not stop within 30 s of SIGINT:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let slot = c
        .psql(
            &db,
            "SELECT s.active, s.confirmed_flush_lsn >= p.lsn, p.lsn > '0/0' \
             FROM pg_replication_slots s, shadowmig.progress p \
             WHERE s.slot_name = 'shadowmig_sigint_mig' AND p.migration = 'sigint_mig' AND p.direction = 'forward'",
        )
        .unwrap();
    assert_eq!(
        slot,
        "f|t|t",
        "after SIGINT the slot must be released and confirmed up to the committed progress:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // The load goes on while nothing runs, then the next run catches up on all of it.
    std::thread::sleep(Duration::from_millis(500));
    let stats = workload.finish();
    assert!(stats.committed > 20, "workload too small: {stats:?}");
    run_to_catch_up(&spec);
    common::assert_orders_equal(c, &db);
    abort_ok(&spec);
}

/// Set-up DDL never queues behind a lock: while another session holds a lock that conflicts
/// with `CREATE PUBLICATION`, `run` gives up each try after `lock_timeout_ms`, says so and
/// retries (others keep reading the source meanwhile); once the lock goes it proceeds. The
/// target here was created by the user, not by `run`: `abort` removes the slot, publication
/// and state (the whole state schema, this being its only migration) but keeps that table
/// and its rows.
#[test]
fn setup_ddl_waits_out_a_lock_and_abort_keeps_a_table_it_did_not_create() {
    let (c, db) = testpg::fresh_db("engine_ddl_lock").unwrap();
    setup(c, &db, 1000);
    c.psql(&db, common::ORDERS_TARGET).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("ddl_lock.toml");
    let text = common::orders_spec(
        "ddl_lock",
        &c.url(&db),
        "[copy]\nchunk_rows = 250\n[throttle]\nlock_timeout_ms = 150\n",
    );
    // No [target].create: migrate into the existing table.
    let start = text.find("create = \"\"\"").unwrap();
    let end = start + text[start + 12..].find("\"\"\"").unwrap() + 15;
    let text = format!("{}{}", &text[..start], &text[end..]);
    assert!(!text.contains("create ="), "{text}");
    std::fs::write(&spec, text).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let locker = rt.block_on(async {
        let client = c.client(&db).await.unwrap();
        client
            .batch_execute("BEGIN; LOCK TABLE public.orders IN SHARE UPDATE EXCLUSIVE MODE")
            .await
            .unwrap();
        client
    });
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    wait_logged(&log, 30, "DDL waited longer than lock_timeout");
    // The lock is the only thing in the way: reads of the source go on, no publication yet.
    assert_eq!(c.psql(&db, "SELECT count(*) FROM orders").unwrap(), "1000");
    assert_eq!(
        c.psql(&db, "SELECT count(*) FROM pg_publication").unwrap(),
        "0"
    );
    rt.block_on(locker.batch_execute("ROLLBACK")).unwrap();
    assert_caught_up(
        c,
        &db,
        60,
        &log,
        "run did not go on once the lock was released",
    );
    assert_eq!(sigterm(&mut child).code(), Some(0));

    let out = shadowmig(&["abort", spec.to_str().unwrap()])
        .output()
        .unwrap();
    common::assert_ok(&out);
    assert_eq!(
        c.psql(
            &db,
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()) \
             || '|' || (SELECT count(*) FROM pg_publication) \
             || '|' || (to_regnamespace('shadowmig') IS NULL) \
             || '|' || (SELECT count(*) FROM public.orders_v2)"
        )
        .unwrap(),
        "0|0|true|1000",
        "abort must drop what run made and keep the user's table:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The backfill takes no row locks on the source (rows stay lockable `FOR UPDATE NOWAIT` while
/// chunks are read) and holds no snapshot between chunks: while it is paused, none of the
/// backfill's sessions has an xmin (which would hold back vacuum on the source) or sits in an
/// open transaction, and no other session of the run keeps one for more than 2 s (apply and
/// control commit short transactions of their own). Only this database's sessions count: the
/// cluster is shared with the other tests.
#[test]
fn the_backfill_takes_no_row_locks_and_holds_no_snapshot_between_chunks() {
    let (c, db) = testpg::fresh_db("engine_no_locks").unwrap();
    setup(c, &db, 10_000);
    c.psql(&db, "ANALYZE orders").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "no_locks", &c.url(&db), 200);
    // Slowed to ~10 s, so that the pause and the probes below land while it copies.
    let mut text = std::fs::read_to_string(&spec).unwrap();
    text.push_str("[throttle]\nmax_rows_per_sec = 1000\n");
    std::fs::write(&spec, text).unwrap();
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    wait_backfill_started(&spec);
    common::assert_ok(
        &shadowmig(&["pause", spec.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    // Paused once two readings a second apart agree (a chunk in flight finishes first).
    let mut last = -1;
    poll_until(30, "the backfill to stop copying", || {
        let n = status_json(&spec)["copy"]["rows_copied"]
            .as_i64()
            .unwrap_or(-1);
        let same = n == last;
        last = n;
        std::thread::sleep(Duration::from_millis(900));
        same
    });
    assert_eq!(status_json(&spec)["copy"]["done"], false);
    for _ in 0..5 {
        let holders = c
            .psql(
                &db,
                "SELECT count(*) || ':' || coalesce(string_agg(application_name || ' ' || state, ', '), '') \
                 FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name LIKE 'shadowmig%' \
                 AND (backend_xmin IS NOT NULL OR state LIKE 'idle in transaction%') \
                 AND (application_name LIKE 'shadowmig copy%' OR xact_start < now() - interval '2 seconds')",
            )
            .unwrap();
        assert_eq!(
            holders, "0:",
            "a session of the paused run holds a snapshot or an open transaction"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    common::assert_ok(
        &shadowmig(&["resume", spec.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    // Pause first (above), then probe while the rest is copied: the backfill is slowed to
    // ~1,000 rows/s, but probes under load are slow too.
    let mut probes = 0;
    for _ in 0..10 {
        let st = status_json(&spec);
        if st["copy"]["done"] == true {
            break;
        }
        let locked = c.psql(
            &db,
            "BEGIN; SELECT count(*) FROM (SELECT 1 FROM orders FOR UPDATE NOWAIT) x; ROLLBACK",
        );
        assert!(
            locked.is_ok(),
            "a source row was locked during the backfill: {locked:?}"
        );
        probes += 1;
    }
    assert!(probes > 0, "the backfill finished before any probe");
    assert_caught_up(c, &db, 90, &log, "run did not catch up");
    assert_eq!(sigterm(&mut child).code(), Some(0));
    abort_ok(&spec);
}

/// The seed guide's `currency` "filled with a default": the target column has a DEFAULT and
/// no `[transform]`; `plan` accepts it (saying the default fills it) and both the backfill and
/// streamed inserts — including rows moved between partitions by a key change — get it.
#[test]
fn a_target_column_left_to_its_default_is_filled_by_backfill_and_stream() {
    let (c, db) = testpg::fresh_db("engine_default_fill").unwrap();
    setup(c, &db, 3000);
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("default_fill.toml");
    let text = common::orders_spec(
        "default_fill",
        &c.url(&db),
        "[copy]\nchunk_rows = 300\nworkers = 2\n",
    );
    let text = text
        .replacen(
            "currency text NOT NULL,",
            "currency text NOT NULL DEFAULT 'EUR',",
            1,
        )
        .replacen("currency = \"'USD'\"\n", "", 1);
    assert!(
        text.contains("DEFAULT 'EUR'") && !text.contains("'USD'"),
        "{text}"
    );
    std::fs::write(&spec, text).unwrap();
    let plan = shadowmig(&["plan", spec.to_str().unwrap()])
        .output()
        .unwrap();
    common::assert_ok(&plan);
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains("its default"),
        "{}",
        String::from_utf8_lossy(&plan.stdout)
    );
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    let stats = common::Workload::start(&c.url(&db), 17, 300).join(120);
    assert!(stats.committed > 50, "workload too small: {stats:?}");
    let expected = common::ORDERS_EXPECTED.replace("'USD'", "'EUR'");
    let deadline = Instant::now() + Duration::from_secs(90);
    let (missing, extra) = loop {
        let d = common::try_diff(c, &db, &expected, common::ORDERS_ACTUAL);
        match d {
            Some((m, e)) if m.is_empty() && e.is_empty() => break (m, e),
            Some(d) if Instant::now() > deadline => break d,
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing: {missing:#?}\nextra: {extra:#?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(
        c.psql(&db, "SELECT count(*) FROM orders").unwrap(),
        c.psql(&db, "SELECT count(*) FROM orders_v2 WHERE currency = 'EUR'")
            .unwrap()
    );
    assert_eq!(sigterm(&mut child).code(), Some(0));
    abort_ok(&spec);
}

/// A TRUNCATE of the source while the backfill is copying: `run` pauses (exit 3) saying what
/// happened and what to do, a second `run` pauses at the same place instead of going on into
/// a half-copied table, and `abort` leaves nothing behind.
#[test]
fn source_truncate_during_the_backfill_pauses_every_run_until_abort() {
    let (c, db) = testpg::fresh_db("engine_truncate_backfill").unwrap();
    setup(c, &db, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "trunc_backfill", &c.url(&db), 100);
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    wait_backfill_started(&spec);
    c.psql(&db, "TRUNCATE orders").unwrap();
    let st = wait_exit(&mut child, Duration::from_secs(60)).unwrap_or_else(|| {
        panic!(
            "run did not pause:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert_eq!(st.code(), Some(3));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("TRUNCATEd") && text.contains("shadowmig abort"),
        "{text}"
    );
    let out = common::output_within(
        shadowmig(&["run", spec.to_str().unwrap(), "--exit-when-caught-up"]),
        CATCH_UP_LIMIT,
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "a second run must pause at the TRUNCATE again:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status_json(&spec)["stage"], "paused");
    common::assert_ok(
        &shadowmig(&["abort", spec.to_str().unwrap()])
            .output()
            .unwrap(),
    );
    assert_eq!(
        c.psql(
            &db,
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()) \
             || '|' || (SELECT count(*) FROM pg_publication) \
             || '|' || (to_regclass('public.orders_v2') IS NULL)"
        )
        .unwrap(),
        "0|0|true"
    );
}

/// Updates that leave a TOASTed column unchanged, to rows the backfill has not copied yet:
/// the stream carries no value for that column, so the rows are re-read from the source by
/// key (never written with a guessed or empty value). Here the backfill is held (a WAL
/// limit of 1 byte) while it happens, and the rows reach the target whole anyway.
#[test]
fn unchanged_toast_for_rows_not_yet_copied_is_reread_by_key() {
    let (c, db) = testpg::fresh_db("engine_toast_reread").unwrap();
    setup(c, &db, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let spec = held_spec(&dir, "toast_reread", &c.url(&db));
    let log = dir.path().join("run.log");
    let mut child = KillOnDrop(spawn_run(&spec, &log));
    wait_logged(&log, 60, "backfill throttled: the slot holds");
    assert_copy_held(&spec);
    // Rows with a TOASTed note that the target does not have yet.
    let ids = c
        .psql(
            &db,
            "SELECT string_agg(id::text, ',') FROM (SELECT id FROM orders o WHERE length(note) > 2000 \
             AND NOT EXISTS (SELECT 1 FROM orders_v2 v WHERE v.id = o.id) ORDER BY id DESC LIMIT 40) x",
        )
        .unwrap();
    assert_eq!(ids.split(',').count(), 40, "{ids}");
    c.psql(
        &db,
        &format!("UPDATE orders SET status = 'toast-kept' WHERE id IN ({ids})"),
    )
    .unwrap();
    let expected = format!("{} WHERE id IN ({ids})", common::ORDERS_EXPECTED);
    let actual = format!("{} WHERE id IN ({ids})", common::ORDERS_ACTUAL);
    poll_until(
        60,
        "the updated rows to be re-read into the target",
        || matches!(common::try_diff(c, &db, &expected, &actual), Some((m, e)) if m.is_empty() && e.is_empty()),
    );
    assert_eq!(
        c.psql(
            &db,
            &format!("SELECT count(*) FROM orders_v2 WHERE id IN ({ids}) AND length(note) > 2000 AND status = 'toast-kept'")
        )
        .unwrap(),
        "40"
    );
    assert_copy_held(&spec);
    raise_wal_limit(&spec);
    assert_caught_up(c, &db, 90, &log, "run did not catch up");
    assert_eq!(sigterm(&mut child.0).code(), Some(0));
    abort_ok(&spec);
}

/// DDL whose lock is never granted gives up after its tries with a message that names the
/// statement and says what to do, and changes nothing (the statement's transaction is rolled
/// back); a DDL that is not refused a lock fails at once with the server's reason.
#[test]
fn ddl_refused_its_lock_gives_up_with_the_statement_and_the_fix() {
    let (c, db) = testpg::fresh_db("engine_ddl_give_up").unwrap();
    setup(c, &db, 10);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let locker = c.client(&db).await.unwrap();
        locker
            .batch_execute("BEGIN; LOCK TABLE public.orders IN SHARE UPDATE EXCLUSIVE MODE")
            .await
            .unwrap();
        let client = c.client(&db).await.unwrap();
        let t = Instant::now();
        let err = shadowmig::run::ddl_with_attempts(
            &client,
            "CREATE PUBLICATION \"never made\" FOR TABLE public.orders",
            100,
            2,
        )
        .await
        .expect_err("the lock is held: the DDL must give up");
        let msg = err.to_string();
        for part in [
            "`CREATE PUBLICATION \"never made\" FOR TABLE public.orders…`",
            "lock_timeout (100 ms) in 2 tries",
            "pg_locks",
            "lock_timeout_ms",
        ] {
            assert!(msg.contains(part), "{part:?} missing from: {msg}");
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        // The session is usable again and nothing was created.
        let n: i64 = client
            .query_one("SELECT count(*) FROM pg_publication", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
        locker.batch_execute("ROLLBACK").await.unwrap();
        let err =
            shadowmig::run::ddl_with_attempts(&client, "ALTER TABLE public.nope ADD x int", 100, 5)
                .await
                .expect_err("no such table");
        assert!(err.to_string().contains("does not exist"), "{err}");
    });
}

/// The slot still held when `run` starts — as by the walsender of a run killed a moment ago,
/// which has not yet noticed its client is gone (seen in the crash soak), here by another
/// consumer: `run` does not fail; it says what holds the slot and retries with backoff,
/// then streams once the slot is free.
#[test]
fn a_slot_still_held_when_run_starts_is_waited_for() {
    let (c, db) = testpg::fresh_db("engine_slot_held").unwrap();
    setup(c, &db, 500);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "slot_held", &c.url(&db), 250);
    run_to_catch_up(&spec);
    let mut holder = std::process::Command::new(c.bindir().join("pg_recvlogical"))
        .args([
            "-h",
            c.host(),
            "-p",
            &c.port().to_string(),
            "-U",
            c.superuser(),
            "-d",
            &db,
            "-S",
            "shadowmig_slot_held",
            "--start",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=shadowmig_slot_held",
            "-f",
            "/dev/null",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    poll_until(30, "pg_recvlogical to hold the slot", || {
        c.psql(
            &db,
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'shadowmig_slot_held'",
        )
        .unwrap_or_default()
            == "t"
    });
    c.psql(
        &db,
        "UPDATE orders SET status = 'while-held' WHERE id <= 50",
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let mut child = KillOnDrop(spawn_run(&spec, &log));
    wait_logged(
        &log,
        30,
        "is still held by the walsender of an earlier connection",
    );
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "run must wait for the slot, not exit:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let _ = holder.kill();
    let _ = holder.wait();
    assert_caught_up(
        c,
        &db,
        60,
        &log,
        "run did not stream once the slot was free",
    );
    assert_eq!(sigterm(&mut child.0).code(), Some(0));
    abort_ok(&spec);
}

/// More than one re-read statement's worth (1,000) of rows queued for a re-read when `run`
/// is killed: the next run takes them from the state in the target in parts — their rows
/// arrive while the backfill is still held, so only the re-reads can have brought them — and
/// finishes with the queue empty.
/// (Found by the crash soak: the queue was handed over as one job, which the copier refused
/// on every try, and the run never caught up.) The queue is built as in
/// [`unchanged_toast_for_rows_not_yet_copied_is_reread_by_key`], with the source locked
/// right after the updates so that nothing is re-read before the kill.
#[test]
fn a_queue_of_more_than_1000_rereads_survives_kill_9() {
    let (c, db) = testpg::fresh_db("engine_many_rereads").unwrap();
    setup(c, &db, 20_000);
    let dir = tempfile::tempdir().unwrap();
    let spec = held_spec(&dir, "many_rereads", &c.url(&db));
    let log = dir.path().join("run.log");
    // Rows handed to apply (not the bulk path): its re-reads go one statement per job.
    let row_path = [("SHADOWMIG_BULK_COPY", "0")];
    let mut child = KillOnDrop(common::spawn_run_env(&spec, &log, "info", &row_path));
    wait_logged(&log, 60, "backfill throttled: the slot holds");
    assert_copy_held(&spec);
    let lacking = "SELECT id FROM orders o WHERE length(note) > 2000 \
                   AND NOT EXISTS (SELECT 1 FROM orders_v2 v WHERE v.id = o.id) ORDER BY id DESC LIMIT 1200";
    assert_eq!(
        c.psql(&db, &format!("SELECT count(*) FROM ({lacking}) x"))
            .unwrap(),
        "1200"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let locker = rt.block_on(async {
        let client = c.client(&db).await.unwrap();
        // Two calls: in one, the UPDATE would join the locking transaction.
        client
            .batch_execute(&format!(
                "UPDATE orders SET status = 'queued' WHERE id IN ({lacking})"
            ))
            .await
            .unwrap();
        client
            .batch_execute("BEGIN; LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        client
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while c
        .psql(
            &db,
            "SELECT count(*) >= 1200 FROM shadowmig.reread WHERE migration = 'many_rereads'",
        )
        .unwrap_or_default()
        != "t"
    {
        assert!(
            Instant::now() < deadline,
            "1,200 re-reads were not queued:\n{}\n{}",
            c.psql(&db, "SELECT count(*) FROM shadowmig.reread")
                .unwrap_or_default(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: killing our own child process.
    unsafe {
        libc::kill(child.0.id() as i32, libc::SIGKILL);
    }
    let _ = child.0.wait();
    rt.block_on(locker.batch_execute("ROLLBACK")).unwrap();
    // The backfill stays held: only the re-reads can bring these rows.
    let log2 = dir.path().join("run2.log");
    let mut child = KillOnDrop(common::spawn_run_env(&spec, &log2, "info", &row_path));
    let deadline = Instant::now() + Duration::from_secs(60);
    while c
        .psql(
            &db,
            "SELECT count(*) FROM orders_v2 WHERE status = 'queued' AND length(note) > 2000",
        )
        .unwrap_or_default()
        != "1200"
    {
        assert!(
            Instant::now() < deadline,
            "the queued re-reads were not read by the next run:\n{}",
            std::fs::read_to_string(&log2).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_copy_held(&spec);
    raise_wal_limit(&spec);
    assert_caught_up(c, &db, 90, &log2, "the next run did not finish");
    assert_eq!(
        c.psql(
            &db,
            "SELECT count(*) FROM shadowmig.reread WHERE migration = 'many_rereads'"
        )
        .unwrap(),
        "0"
    );
    assert_eq!(sigterm(&mut child.0).code(), Some(0));
    abort_ok(&spec);
}

/// A run killed while it was creating its slot leaves, for a moment, an unfinished slot that
/// its walsender still holds (creation waits for the transactions running when it began).
/// The next run waits for it to finish or go away — here another session is making it and is
/// terminated — then creates the slot itself and runs; before, it took the unfinished slot
/// for its own and failed when streaming found it gone (seen in the crash soak).
#[test]
fn a_slot_left_unfinished_by_a_killed_run_is_waited_out_and_made_again() {
    let (c, db) = testpg::fresh_db("engine_slot_unfinished").unwrap();
    setup(c, &db, 300);
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(&dir, "slot_unfinished", &c.url(&db), 100);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (open_txn, maker_pid, maker) = rt.block_on(async {
        let open_txn = c.client(&db).await.unwrap();
        open_txn
            .batch_execute("BEGIN; UPDATE orders SET status = 'open' WHERE id = 1")
            .await
            .unwrap();
        let maker = c.client(&db).await.unwrap();
        let pid: i32 = maker
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let task = tokio::spawn(async move {
            maker
                .query_one(
                    "SELECT pg_create_logical_replication_slot('shadowmig_slot_unfinished', 'pgoutput')",
                    &[],
                )
                .await
                .map(|_| ())
        });
        (open_txn, pid, task)
    });
    poll_until(30, "the slot to be in the making", || {
        c.psql(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'shadowmig_slot_unfinished' AND confirmed_flush_lsn IS NULL",
        )
        .unwrap_or_default()
            == "1"
    });
    let log = dir.path().join("run.log");
    let mut child = KillOnDrop(spawn_run(&spec, &log));
    wait_logged(&log, 30, "is still being made by the session with PID");
    c.psql(&db, &format!("SELECT pg_terminate_backend({maker_pid})"))
        .unwrap();
    assert!(
        rt.block_on(maker).unwrap().is_err(),
        "the maker was terminated"
    );
    rt.block_on(open_txn.batch_execute("COMMIT")).unwrap();
    assert_caught_up(c, &db, 60, &log, "run did not catch up");
    c.psql(&db, "UPDATE orders SET status = 'after' WHERE id <= 20")
        .unwrap();
    assert_caught_up(c, &db, 60, &log, "run did not catch up");
    assert_logged(&log, "created the replication slot");
    assert_eq!(sigterm(&mut child.0).code(), Some(0));
    abort_ok(&spec);
}

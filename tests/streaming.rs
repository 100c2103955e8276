//! Large source transactions streamed before their commit (pgoutput protocol 2, D29), end to
//! end against real PostgreSQL: written into a target transaction of their own while other
//! transactions commit, committed in stream order, rolled back when they abort, and — where a
//! streamed transaction cannot be applied as it arrives — a restart of the stream without
//! streaming. Every case ends with the independent SQL comparison of target and source.
//!
//! Each database sets `logical_decoding_work_mem` to its minimum (64 kB), so that transactions
//! of a few thousand rows are streamed; `SHADOWMIG_BATCH_ROWS` makes parts small enough that
//! several are written before the commit.

mod common;

use common::{assert_logged, sigterm, wait_equal, wait_exit};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shadowmig::testpg::{self, TestCluster};

const STREAMED: &str = "applying a streamed source transaction in parts before its commit";
const FELL_BACK: &str = "restarting the change stream without streaming";

/// A database with 20,000 orders that streams transactions over 64 kB, a spec for it, and a
/// `run` caught up with it (parts of at most 2,000 rows).
fn start(
    prefix: &str,
) -> (
    &'static TestCluster,
    String,
    tempfile::TempDir,
    PathBuf,
    PathBuf,
    Run,
) {
    let (c, db) = testpg::fresh_db(prefix).unwrap();
    c.psql(&db, common::ORDERS_SOURCE).unwrap();
    c.psql(&db, &common::orders_seed_sql(20_000)).unwrap();
    c.psql(
        &db,
        &format!("ALTER DATABASE \"{db}\" SET logical_decoding_work_mem = '64kB'"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.toml");
    std::fs::write(
        &spec,
        common::orders_spec(
            prefix,
            &c.url(&db),
            "[copy]\nchunk_rows = 5000\nworkers = 2\n",
        ),
    )
    .unwrap();
    let log = dir.path().join("run.log");
    let child = spawn(&spec, &log);
    // After the backfill, `run` restarts its stream with streaming on; what the test writes
    // must come after that.
    wait_log(&log, "streaming=true", 60);
    assert!(
        wait_equal(c, &db, Duration::from_secs(120)),
        "run did not catch up:\n{}",
        read(&log)
    );
    (c, db, dir, spec, log, child)
}

fn spawn(spec: &Path, log: &Path) -> Run {
    Run(common::spawn_run_env(
        spec,
        log,
        "shadowmig=debug",
        &[
            ("SHADOWMIG_BATCH_ROWS", "2000"),
            ("SHADOWMIG_STREAMING_RETRY_SECS", "3"),
        ],
    ))
}

/// A `run` child that is killed if the test fails before stopping it.
struct Run(Child);

impl std::ops::Deref for Run {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Run {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// `sql` in a psql session of its own, in the background.
fn background(c: &TestCluster, db: &str, sql: &str) -> Child {
    Command::new(c.bindir().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", c.host()])
        .args(["-p", &c.port().to_string(), "-U", c.superuser(), "-d", db])
        .args(["-c", sql])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "background session failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until `log` contains `text`.
fn wait_log(log: &Path, text: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !read(log).contains(text) {
        assert!(
            Instant::now() < deadline,
            "the log never said {text:?}:\n{}",
            read(log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count(c: &TestCluster, db: &str, sql: &str) -> i64 {
    c.psql(db, sql).unwrap().parse().unwrap()
}

fn stop(mut child: Run, c: &TestCluster, db: &str) {
    assert_eq!(sigterm(&mut child).code(), Some(0));
    common::assert_orders_equal(c, db);
}

/// The main case: a transaction of 15,000 changes is streamed and written in parts while it
/// is still open; transactions that commit meanwhile are applied at once, and the streamed
/// one stays invisible in the target until its commit, after which a transaction that waited
/// for its row lock lands on top of it.
#[test]
fn a_streamed_transaction_is_written_before_its_commit_and_lands_in_stream_order() {
    let (c, db, _dir, _spec, log, child) = start("stream_main");
    let x = background(
        c,
        &db,
        "BEGIN;
         UPDATE orders SET status = 'X', total_amount = total_amount + 1 WHERE id <= 10000;
         INSERT INTO orders (customer_id, total_amount, status) SELECT 1 + i % 89, i, 'X-new' FROM generate_series(1, 5000) i;
         SELECT pg_sleep(8);
         UPDATE orders SET note = 'late', customer_id = customer_id + 1 WHERE id <= 50;
         DELETE FROM orders WHERE id BETWEEN 9001 AND 9100;
         COMMIT;",
    );
    wait_log(&log, STREAMED, 30);
    // Committed while X is open (rows X does not touch): applied without waiting for X.
    c.psql(
        &db,
        "UPDATE orders SET status = 'S1' WHERE id > 15000 AND id <= 15100;
         INSERT INTO orders (customer_id, total_amount, status) VALUES (7, 7, 'S1-new');",
    )
    .unwrap();
    // Waits for X's row lock, so it commits after X and must land on top of it.
    let s2 = background(
        c,
        &db,
        "UPDATE orders SET status = 'S2', total_amount = -1 WHERE id = 5",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while count(
        c,
        &db,
        "SELECT count(*) FROM orders_v2 WHERE status LIKE 'S1%'",
    ) < 101
    {
        assert!(
            Instant::now() < deadline,
            "S1 was not applied while X was open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // X is open in the source: its parts are in an open target transaction, invisible.
    assert_eq!(
        count(
            c,
            &db,
            "SELECT count(*) FROM orders_v2 WHERE status LIKE 'X%'"
        ),
        0,
        "part of an uncommitted source transaction is visible in the target"
    );
    // Polled: the session is `active` while it writes a part.
    let open_sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'shadowmig apply' AND state = 'idle in transaction'";
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut open = count(c, &db, open_sql);
    while open == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        open = count(c, &db, open_sql);
    }
    assert!(
        open >= 1,
        "no target transaction is open for the streamed transaction: {}\n{}",
        c.psql(&db, "SELECT application_name, state, xact_start FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'shadowmig%'").unwrap(),
        read(&log)
    );
    let parts_before_commit = read(&log)
        .matches("wrote batch (not yet committed)")
        .count();
    assert!(
        parts_before_commit >= 3,
        "expected parts written before the commit, saw {parts_before_commit}:\n{}",
        read(&log)
    );
    finish(x);
    finish(s2);
    assert!(wait_equal(c, &db, Duration::from_secs(60)));
    assert_eq!(
        c.psql(
            &db,
            "SELECT status || ' ' || total_amount_minor FROM orders_v2 WHERE id = 5"
        )
        .unwrap(),
        "S2 -1"
    );
    stop(child, c, &db);
    assert!(!read(&log).contains(FELL_BACK), "{}", read(&log));
}

/// A streamed transaction that rolls back leaves nothing in the target, and neither does DDL
/// inside one that rolls back (no pause); the same DDL committed pauses the migration.
#[test]
fn a_streamed_transaction_that_aborts_leaves_nothing_and_streamed_ddl_pauses_at_its_commit() {
    let (c, db, _dir, spec, log, child) = start("stream_abort");
    let x = background(
        c,
        &db,
        "BEGIN;
         UPDATE orders SET status = 'gone', total_amount = 0;
         SELECT pg_sleep(1);
         ALTER TABLE orders ADD COLUMN extra int;
         UPDATE orders SET extra = 1 WHERE id <= 5000;
         ROLLBACK;",
    );
    wait_log(&log, STREAMED, 30);
    finish(x);
    c.psql(&db, "UPDATE orders SET status = 'after' WHERE id <= 10")
        .unwrap();
    assert!(
        wait_equal(c, &db, Duration::from_secs(60)),
        "{}",
        read(&log)
    );
    wait_log(&log, "a streamed source transaction aborted", 10);
    assert_eq!(
        count(
            c,
            &db,
            "SELECT count(*) FROM orders_v2 WHERE status = 'gone'"
        ),
        0
    );
    // Committed, with changes in the new shape after the DDL: the migration pauses at the
    // commit, with nothing of the transaction applied (its changes before the DDL included).
    c.psql(
        &db,
        "BEGIN;
         UPDATE orders SET status = 'ddl', total_amount = 1;
         ALTER TABLE orders ADD COLUMN extra int;
         UPDATE orders SET extra = 2 WHERE id <= 5000;
         COMMIT;",
    )
    .unwrap();
    let mut child = child;
    let Some(st) = wait_exit(&mut child, Duration::from_secs(60)) else {
        let _ = child.kill();
        panic!("run did not pause:\n{}", read(&log));
    };
    assert_eq!(st.code(), Some(3), "paused exit code:\n{}", read(&log));
    assert_logged(&log, "changed shape mid-migration");
    // Decided at the streamed commit, not before (the same DDL rolled back did not pause).
    assert_logged(&log, "changed the source table's shape");
    assert_eq!(
        count(
            c,
            &db,
            "SELECT count(*) FROM orders_v2 WHERE status = 'ddl'"
        ),
        0,
        "the transaction that changed the table's shape was applied"
    );
    let status = common::status_json(&spec);
    assert_eq!(status["stage"], "paused", "{status}");
}

/// A subtransaction rolled back after some of its changes were streamed cannot be taken out
/// of parts already coalesced and written: the streamed transaction is rolled back and the
/// stream restarts without streaming, where the walsender sends it whole at its commit.
#[test]
fn a_rolled_back_streamed_subtransaction_restarts_the_stream_without_streaming() {
    let (c, db, _dir, _spec, log, child) = start("stream_subxact");
    c.psql(
        &db,
        "BEGIN;
         UPDATE orders SET status = 'top', total_amount = 1 WHERE id <= 6000;
         SAVEPOINT s;
         UPDATE orders SET status = 'sub', total_amount = 2 WHERE id <= 12000;
         ROLLBACK TO SAVEPOINT s;
         UPDATE orders SET note = 'after-sub' WHERE id <= 100;
         COMMIT;",
    )
    .unwrap();
    assert!(
        wait_equal(c, &db, Duration::from_secs(60)),
        "{}",
        read(&log)
    );
    let text = read(&log);
    assert!(text.contains(FELL_BACK), "{text}");
    assert_eq!(
        count(
            c,
            &db,
            "SELECT count(*) FROM orders_v2 WHERE status = 'sub'"
        ),
        0
    );
    // Without streaming for a while (3 s here, 10 minutes by default), a large transaction
    // is still applied whole...
    c.psql(&db, "UPDATE orders SET status = 'later', total_amount = 3")
        .unwrap();
    assert!(wait_equal(c, &db, Duration::from_secs(60)));
    // ... and then the stream streams again.
    let streams_again = |l: &str| {
        l.rfind(FELL_BACK)
            .is_some_and(|i| l[i..].contains("streaming=true"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !streams_again(&read(&log)) {
        assert!(
            Instant::now() < deadline,
            "streaming never came back:\n{}",
            read(&log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let streamed = read(&log).matches(STREAMED).count();
    c.psql(&db, "UPDATE orders SET status = 'again', total_amount = 4")
        .unwrap();
    assert!(wait_equal(c, &db, Duration::from_secs(60)));
    assert!(
        read(&log).matches(STREAMED).count() > streamed,
        "the transaction after the retry was not streamed:\n{}",
        read(&log)
    );
    stop(child, c, &db);
}

/// Two transactions streamed at once would need a target transaction each: the first is
/// rolled back and the stream restarts without streaming.
#[test]
fn two_transactions_streamed_at_once_fall_back_to_whole_transactions() {
    let (c, db, _dir, _spec, log, child) = start("stream_two");
    let a = background(
        c,
        &db,
        "BEGIN; UPDATE orders SET status = 'A' WHERE id <= 8000; SELECT pg_sleep(2);
         UPDATE orders SET total_amount = 11 WHERE id <= 8000; COMMIT;",
    );
    wait_log(&log, STREAMED, 30);
    let b = background(
        c,
        &db,
        "BEGIN; UPDATE orders SET status = 'B' WHERE id > 10000; SELECT pg_sleep(1);
         UPDATE orders SET total_amount = 22 WHERE id > 10000; COMMIT;",
    );
    finish(a);
    finish(b);
    assert!(
        wait_equal(c, &db, Duration::from_secs(60)),
        "{}",
        read(&log)
    );
    assert_logged(&log, "were streamed at once");
    stop(child, c, &db);
}

/// kill -9 while a streamed transaction's parts are written and its source transaction is
/// still open: the server rolls the target transaction back, and the next run applies the
/// transaction (streamed again from its start) once it commits.
#[test]
fn kill_9_during_a_streamed_transaction_loses_nothing() {
    cut_short_while_streaming(true);
}

/// SIGTERM at the same point: `run` exits 0 with the streamed transaction rolled back, and
/// nothing of it is visible until the next run applies it whole.
#[test]
fn sigterm_during_a_streamed_transaction_rolls_it_back_and_exits_0() {
    cut_short_while_streaming(false);
}

fn cut_short_while_streaming(kill_9: bool) {
    let name = if kill_9 { "stream_kill" } else { "stream_term" };
    let (c, db, _dir, spec, log, mut child) = start(name);
    let x = background(
        c,
        &db,
        "BEGIN;
         UPDATE orders SET status = 'K', total_amount = total_amount * 2 WHERE id <= 12000;
         SELECT pg_sleep(3);
         DELETE FROM orders WHERE id <= 100;
         COMMIT;",
    );
    wait_log(&log, STREAMED, 30);
    std::thread::sleep(Duration::from_millis(300));
    if kill_9 {
        child.kill().unwrap();
        child.wait().unwrap();
    } else {
        assert_eq!(sigterm(&mut child).code(), Some(0), "{}", read(&log));
        assert_eq!(
            count(c, &db, "SELECT count(*) FROM orders_v2 WHERE status = 'K'"),
            0,
            "part of an uncommitted source transaction is visible after shutdown"
        );
    }
    finish(x);
    let child = spawn(&spec, &log);
    assert!(
        wait_equal(c, &db, Duration::from_secs(60)),
        "{}",
        read(&log)
    );
    assert_eq!(
        count(c, &db, "SELECT count(*) FROM orders_v2 WHERE status = 'K'"),
        11_900
    );
    stop(child, c, &db);
}

//! `shadowmig tail` end to end, as a user runs it: the binary against a real server, changes
//! made by SQL sessions, JSON lines read from its stdout.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};
use shadowmig::testpg::{self, ClusterConfig, TestCluster};

struct Tail {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

fn spawn_tail(args: &[&str]) -> Tail {
    let mut child = Command::new(env!("CARGO_BIN_EXE_shadowmig"))
        .arg("tail")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shadowmig tail");
    let out: ChildStdout = child.stdout.take().unwrap();
    let err: ChildStderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let (etx, stderr) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = etx.send(l);
        }
    });
    Tail {
        child,
        lines,
        stderr,
    }
}

impl Tail {
    /// Waits for the "following" line on stderr that says the stream is open.
    fn wait_ready(&self) {
        loop {
            let l = self
                .stderr
                .recv_timeout(Duration::from_secs(30))
                .expect("tail never became ready");
            if l.contains("following") {
                return;
            }
        }
    }

    fn next_json(&self) -> Value {
        let l = self
            .lines
            .recv_timeout(Duration::from_secs(30))
            .expect("no line from tail within 30 s");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"))
    }

    fn terminate(mut self) -> (i32, Vec<String>) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let status = self.child.wait().unwrap();
        let rest: Vec<String> = self.stderr.try_iter().collect();
        (status.code().unwrap_or(-1), rest)
    }
}

fn run_fail(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shadowmig"))
        .arg("tail")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn strip_positions(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    for f in ["lsn", "xid", "commit_lsn"] {
        assert!(o.contains_key(f), "line lacks {f}: {v}");
        o.remove(f);
    }
    v
}

#[test]
fn a_psql_session_shows_up_exactly() {
    let (c, db) = testpg::fresh_db("tail_session").unwrap();
    c.psql(
        &db,
        "CREATE TABLE public.items (id int PRIMARY KEY, n int, body text, note text);
         ALTER TABLE public.items ALTER COLUMN body SET STORAGE EXTERNAL;
         INSERT INTO public.items VALUES (1, 1, repeat('x', 10000), NULL);",
    )
    .unwrap();
    let url = c.url(&db);
    let tail = spawn_tail(&["--url", &url, "--table", "public.items"]);
    tail.wait_ready();
    c.psql(
        &db,
        "INSERT INTO items VALUES (2, 20, 'short', 'a \"quoted\" note')",
    )
    .unwrap();
    c.psql(&db, "UPDATE items SET n = 2 WHERE id = 1").unwrap();
    c.psql(&db, "UPDATE items SET id = 3 WHERE id = 2").unwrap();
    c.psql(&db, "DELETE FROM items WHERE id = 3").unwrap();
    c.psql(&db, "TRUNCATE items").unwrap();
    c.psql(
        &db,
        "SELECT pg_logical_emit_message(true, 'shadowmig-test', 'hello')",
    )
    .unwrap();

    let insert = tail.next_json();
    let xid = insert["xid"].as_u64().expect("xid is a number");
    assert!(xid > 0);
    assert!(insert["lsn"].as_str().unwrap().contains('/'));
    assert!(insert["commit_lsn"].as_str().unwrap().contains('/'));
    assert_eq!(
        strip_positions(insert),
        json!({"op": "insert", "table": "public.items", "key": {"id": "2"}, "old": null,
               "new": {"id": "2", "n": "20", "body": "short", "note": "a \"quoted\" note"},
               "unchanged_toast": []})
    );
    assert_eq!(
        strip_positions(tail.next_json()),
        json!({"op": "update", "table": "public.items", "key": {"id": "1"}, "old": null,
               "new": {"id": "1", "n": "2", "note": null}, "unchanged_toast": ["body"]})
    );
    assert_eq!(
        strip_positions(tail.next_json()),
        json!({"op": "update", "table": "public.items", "key": {"id": "2"}, "old": {"id": "2"},
               "new": {"id": "3", "n": "20", "body": "short", "note": "a \"quoted\" note"},
               "unchanged_toast": []})
    );
    assert_eq!(
        strip_positions(tail.next_json()),
        json!({"op": "delete", "table": "public.items", "key": {"id": "3"}, "old": {"id": "3"},
               "new": null, "unchanged_toast": []})
    );
    let trunc = strip_positions(tail.next_json());
    assert_eq!(trunc["op"], "truncate");
    assert_eq!(trunc["table"], "public.items");
    let msg = strip_positions(tail.next_json());
    assert_eq!(msg["op"], "message");
    assert_eq!(msg["prefix"], "shadowmig-test");
    assert_eq!(msg["content"], "hello");
    assert_eq!(msg["transactional"], true);

    let (code, _) = tail.terminate();
    assert_eq!(code, 0, "SIGTERM exits cleanly");
    // A temporary slot and the publication this run created are gone.
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
}

#[test]
fn a_named_slot_is_kept_and_resumes_after_what_was_confirmed() {
    let (c, db) = testpg::fresh_db("tail_named").unwrap();
    c.psql(
        &db,
        "CREATE TABLE \"Odd \"\"Name\"\" ✓\" (\"Id\" int PRIMARY KEY, v text)",
    )
    .unwrap();
    let url = c.url(&db);
    let table = "public.\"Odd \"\"Name\"\" ✓\"";
    let tail = spawn_tail(&["--url", &url, "--table", table, "--slot", "keepme"]);
    tail.wait_ready();
    c.psql(&db, "INSERT INTO \"Odd \"\"Name\"\" ✓\" VALUES (1, 'one')")
        .unwrap();
    let l = tail.next_json();
    assert_eq!(l["table"], "public.Odd \"Name\" ✓");
    assert_eq!(l["new"], json!({"Id": "1", "v": "one"}));
    let (code, _) = tail.terminate();
    assert_eq!(code, 0);
    assert_eq!(
        c.psql(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'keepme'"
        )
        .unwrap(),
        "1"
    );

    // Written while nobody tails: a resumed tail prints it, and nothing printed before.
    c.psql(&db, "INSERT INTO \"Odd \"\"Name\"\" ✓\" VALUES (2, 'two')")
        .unwrap();
    let tail = spawn_tail(&["--url", &url, "--table", table, "--slot", "keepme"]);
    tail.wait_ready();
    let l = tail.next_json();
    assert_eq!(
        l["new"]["Id"], "2",
        "resumes after the confirmed change, without repeating it"
    );
    let (code, _) = tail.terminate();
    assert_eq!(code, 0);

    // --from-now skips what the slot holds.
    c.psql(
        &db,
        "INSERT INTO \"Odd \"\"Name\"\" ✓\" VALUES (3, 'skipped')",
    )
    .unwrap();
    let tail = spawn_tail(&[
        "--url",
        &url,
        "--table",
        table,
        "--slot",
        "keepme",
        "--from-now",
    ]);
    tail.wait_ready();
    c.psql(&db, "INSERT INTO \"Odd \"\"Name\"\" ✓\" VALUES (4, 'seen')")
        .unwrap();
    let l = tail.next_json();
    assert_eq!(l["new"]["Id"], "4");
    let (code, _) = tail.terminate();
    assert_eq!(code, 0);
    c.psql(&db, "SELECT pg_drop_replication_slot('keepme')")
        .unwrap();
}

#[test]
fn bad_input_gives_one_clear_line_and_exit_1() {
    let (c, db) = testpg::fresh_db("tail_bad").unwrap();
    c.psql(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY); CREATE ROLE norepl LOGIN PASSWORD 's3cr3t-pw'",
    )
    .unwrap();
    let url = c.url(&db);

    let (code, err) = run_fail(&["--url", &url, "--table", "public.nope"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not found"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let (code, err) = run_fail(&[
        "--url",
        "postgres://u:s3cr3t-pw@127.0.0.1:notaport/db",
        "--table",
        "t",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("malformed"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("s3cr3t-pw"), "password leaked: {err}");

    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, err) = run_fail(&[
        "--url",
        &format!("postgres://u:s3cr3t-pw@127.0.0.1:{dead}/db"),
        "--table",
        "t",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot connect"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("s3cr3t-pw"), "password leaked: {err}");

    let (code, err) = run_fail(&[
        "--url",
        &c.url_as("norepl", "s3cr3t-pw", &db),
        "--table",
        "t",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("REPLICATION"), "{err}");
    assert!(!err.contains("s3cr3t-pw"), "password leaked: {err}");

    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn wal_level_not_logical_is_explained() {
    let c = TestCluster::start(&ClusterConfig::default().setting("wal_level", "replica")).unwrap();
    c.psql("postgres", "CREATE TABLE t (id int PRIMARY KEY)")
        .unwrap();
    let (code, err) = run_fail(&["--url", &c.url("postgres"), "--table", "t"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("wal_level") && err.contains("logical"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

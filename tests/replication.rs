//! The replication connection against real PostgreSQL: authentication methods, replication
//! commands, slots and exported snapshots, the CopyBoth stream, keepalives, the idle rule,
//! reconnect after a server restart, and backpressure.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use shadowmig::lsn::Lsn;
use shadowmig::replication::{
    CreatedSlot, LogicalStream, PgOutputOptions, ReplicationClient, ReplicationError,
    ReplicationEvent, SnapshotAction, StreamConfig,
};
use shadowmig::testpg::{self, ClusterConfig, TestCluster};

/// A table and a publication whose names need quoting everywhere.
const TABLE: &str = r#""Tab ""x"" ü""#;
const PUBLICATION: &str = r#"My "Pub" ü"#;

fn pub_ident() -> String {
    format!("\"{}\"", PUBLICATION.replace('"', "\"\""))
}

/// Creates the quoted table, its publication, and an unrelated table outside the publication.
fn setup_schema(c: &TestCluster, db: &str) {
    c.psql(
        db,
        &format!(
            "CREATE TABLE {TABLE} (id int PRIMARY KEY, v text); \
             CREATE TABLE unrelated (id serial PRIMARY KEY, v text); \
             CREATE PUBLICATION {} FOR TABLE {TABLE};",
            pub_ident()
        ),
    )
    .unwrap();
}

/// A replication connection to `db` and a temporary pgoutput slot `name` on it.
async fn temp_slot(c: &TestCluster, db: &str, name: &str) -> (ReplicationClient, CreatedSlot) {
    let mut cl = ReplicationClient::connect(&c.url(db)).await.unwrap();
    let slot = cl
        .create_logical_slot(name, true, SnapshotAction::Nothing)
        .await
        .unwrap();
    (cl, slot)
}

/// `txs` committed transactions of `rows` inserts each into the published table.
fn insert_backlog(c: &TestCluster, db: &str, txs: usize, rows: usize) {
    c.psql(
        db,
        &format!(
            "DO $$ BEGIN FOR t IN 0..{} LOOP \
               INSERT INTO {TABLE} SELECT t * {rows} + g, repeat('v', 50) FROM generate_series(1, {rows}) g; \
               COMMIT; END LOOP; END $$",
            txs - 1
        ),
    )
    .unwrap();
}

fn opts() -> PgOutputOptions {
    PgOutputOptions::new(1).publication(PUBLICATION)
}

/// Next XLogData (keepalives skipped), or panics after `within`.
async fn next_data(s: &mut LogicalStream, within: Duration) -> (Lsn, Bytes) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = tokio::time::timeout(left, s.next())
            .await
            .expect("timed out waiting for XLogData")
            .expect("stream ended")
            .expect("stream error");
        if let ReplicationEvent::XLogData {
            wal_start, data, ..
        } = ev
        {
            return (wal_start, data);
        }
    }
}

/// Reads XLogData until `commits` commits arrived; returns every payload and the last commit's
/// LSN.
async fn read_commits(s: &mut LogicalStream, commits: usize) -> (Vec<Bytes>, Lsn) {
    let mut out = Vec::new();
    let mut seen = 0;
    let mut last = Lsn::ZERO;
    while seen < commits {
        let (lsn, data) = next_data(s, Duration::from_secs(30)).await;
        if data.first() == Some(&b'C') {
            seen += 1;
            last = lsn;
        }
        out.push(data);
    }
    (out, last)
}

fn tags(payloads: &[Bytes]) -> String {
    payloads
        .iter()
        .map(|p| p.first().map(|&b| b as char).unwrap_or('?'))
        .collect()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn slot_confirmed(c: &TestCluster, db: &str, slot: &str) -> Lsn {
    c.psql(
        db,
        &format!("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    )
    .unwrap()
    .parse()
    .unwrap()
}

#[tokio::test]
async fn every_auth_method_connects_and_wrong_passwords_are_refused() {
    let c = TestCluster::start(
        &ClusterConfig::default()
            .hba_line("host all,replication u_clear 127.0.0.1/32 password")
            .hba_line("host all,replication u_md5 127.0.0.1/32 md5")
            .hba_line("host all,replication u_scram 127.0.0.1/32 scram-sha-256")
            .hba_line("host all,replication u_norep 127.0.0.1/32 trust"),
    )
    .unwrap();
    c.psql(
        "postgres",
        "CREATE ROLE u_clear LOGIN REPLICATION PASSWORD 'clear pw'; \
         SET password_encryption = 'md5'; \
         CREATE ROLE u_md5 LOGIN REPLICATION PASSWORD 'md5''pw'; \
         RESET password_encryption; \
         CREATE ROLE u_scram LOGIN REPLICATION PASSWORD 'scräm pw'; \
         CREATE ROLE u_norep LOGIN;",
    )
    .unwrap();
    assert!(c
        .psql(
            "postgres",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'u_md5'"
        )
        .unwrap()
        .starts_with("md5"));
    let port = c.port();
    let conninfo = |user: &str, pw: &str| {
        format!(
            "host=127.0.0.1 port={port} user={user} dbname=postgres password='{}'",
            pw.replace('\'', "\\'")
        )
    };

    // trust (the harness's default lines), by URL.
    let mut cl = ReplicationClient::connect(&c.url("postgres"))
        .await
        .unwrap();
    assert_eq!(
        cl.identify_system().await.unwrap().dbname.as_deref(),
        Some("postgres")
    );
    cl.close().await.unwrap();

    for (user, pw) in [
        ("u_clear", "clear pw"),
        ("u_md5", "md5'pw"),
        ("u_scram", "scräm pw"),
    ] {
        let mut cl = ReplicationClient::connect(&conninfo(user, pw))
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let rows = cl.simple_query("SELECT current_user").await.unwrap();
        assert_eq!(rows, vec![vec![Some(user.to_string())]]);
        cl.identify_system().await.unwrap();
        cl.close().await.unwrap();

        let e = ReplicationClient::connect(&conninfo(user, "wrong secret"))
            .await
            .unwrap_err();
        assert_eq!(e.sqlstate(), Some("28P01"), "{user}: {e}");
        assert!(e.is_permission_denied());
        assert!(!e.to_string().contains("wrong secret"), "{e}");

        // No password at all: our side says so.
        let e = ReplicationClient::connect(&format!(
            "host=127.0.0.1 port={port} user={user} dbname=postgres"
        ))
        .await
        .unwrap_err();
        assert!(matches!(e, ReplicationError::Auth(_)), "{user}: {e}");
    }

    // A role without REPLICATION: the server refuses the walsender.
    let e = ReplicationClient::connect(&conninfo("u_norep", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate(), Some("42501"), "{e}");
    assert!(e.is_permission_denied());

    // Nothing listening: a connect error, not a panic; bad strings do not echo the password.
    drop(c);
    let e = ReplicationClient::connect(&format!(
        "host=127.0.0.1 port={port} user=x password=hunter2 connect_timeout=5"
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            ReplicationError::Connect { .. } | ReplicationError::ConnectTimeout(_)
            // Another test's server may have taken the freed port meanwhile.
            | ReplicationError::Server(_)
        ),
        "{e}"
    );
    assert!(!e.to_string().contains("hunter2"));
    let e = ReplicationClient::connect("postgres://u:hunter2@127.0.0.1:notaport/db")
        .await
        .unwrap_err();
    assert!(matches!(e, ReplicationError::Config(_)), "{e}");
    assert!(!e.to_string().contains("hunter2"));
}

#[tokio::test]
async fn identify_system_and_plain_sql() {
    let (c, db) = testpg::fresh_db("repl_identify").unwrap();
    let mut cl = ReplicationClient::connect(&c.url(&db)).await.unwrap();
    let id = cl.identify_system().await.unwrap();
    assert_eq!(id.dbname.as_deref(), Some(db.as_str()));
    assert_eq!(id.timeline, 1);
    assert!(id.xlogpos > Lsn::ZERO);
    let sysid = c
        .psql(&db, "SELECT system_identifier FROM pg_control_system()")
        .unwrap();
    assert_eq!(id.systemid, sysid);
    assert_eq!(
        cl.simple_query("SHOW wal_level").await.unwrap(),
        vec![vec![Some("logical".to_string())]]
    );
    let lsn: Lsn = cl
        .simple_query("SELECT pg_current_wal_lsn()")
        .await
        .unwrap()[0][0]
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(lsn >= id.xlogpos);
    assert_eq!(
        cl.simple_query("SELECT NULL::text, 'a'").await.unwrap(),
        vec![vec![None, Some("a".to_string())]]
    );
    // A SQL error is a server error with its SQLSTATE, and the session stays usable.
    let e = cl
        .simple_query("SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate(), Some("42P01"));
    assert_eq!(cl.simple_query("SELECT 1").await.unwrap().len(), 1);
    cl.close().await.unwrap();

    // The same over the Unix socket (a host that is a directory).
    let mut cl = ReplicationClient::connect(&format!(
        "host={} port={} user=postgres dbname={db}",
        c.root().display(),
        c.port()
    ))
    .await
    .unwrap();
    assert_eq!(
        cl.identify_system().await.unwrap().dbname.as_deref(),
        Some(db.as_str())
    );
    cl.close().await.unwrap();
}

#[tokio::test]
async fn slots_temporary_and_permanent_with_and_without_snapshot() {
    let (c, db) = testpg::fresh_db("repl_slots").unwrap();
    setup_schema(c, &db);
    c.psql(&db, &format!("INSERT INTO {TABLE} VALUES (1, 'before')"))
        .unwrap();

    // Temporary slot with an exported snapshot.
    let mut cl = ReplicationClient::connect(&c.url(&db)).await.unwrap();
    let slot = cl
        .create_logical_slot("repl_tmp_export", true, SnapshotAction::Export)
        .await
        .unwrap();
    assert_eq!(slot.slot_name, "repl_tmp_export");
    assert_eq!(slot.output_plugin.as_deref(), Some("pgoutput"));
    assert!(slot.consistent_point > Lsn::ZERO);
    let snap = slot.snapshot_name.clone().expect("exported snapshot");
    // A row committed after the slot: invisible in the exported snapshot.
    c.psql(&db, &format!("INSERT INTO {TABLE} VALUES (2, 'after')"))
        .unwrap();
    let mut pg = c.client(&db).await.unwrap();
    let tx = pg
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    tx.batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snap}'"))
        .await
        .unwrap();
    let n: i64 = tx
        .query_one(&format!("SELECT count(*) FROM {TABLE}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the exported snapshot predates row 2");
    tx.commit().await.unwrap();
    assert_eq!(
        c.psql(
            &db,
            "SELECT temporary FROM pg_replication_slots WHERE slot_name = 'repl_tmp_export'"
        )
        .unwrap(),
        "t"
    );

    // The snapshot dies with the next command on the replication session.
    cl.identify_system().await.unwrap();
    let tx = pg
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    assert!(tx
        .batch_execute(&format!("SET TRANSACTION SNAPSHOT '{snap}'"))
        .await
        .is_err());
    drop(tx);

    // SNAPSHOT 'use': the slot's snapshot becomes this session's open transaction's, so the
    // session can read exactly the rows the stream will not send.
    cl.simple_query("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    let u = cl
        .create_logical_slot("repl_tmp_use", true, SnapshotAction::Use)
        .await
        .unwrap();
    assert_eq!(u.snapshot_name, None);
    c.psql(&db, &format!("INSERT INTO {TABLE} VALUES (3, 'later')"))
        .unwrap();
    assert_eq!(
        cl.simple_query(&format!("SELECT count(*) FROM {TABLE}"))
            .await
            .unwrap(),
        vec![vec![Some("2".to_string())]]
    );
    cl.simple_query("COMMIT").await.unwrap();

    // Permanent slot without a snapshot.
    let p = cl
        .create_logical_slot("repl_perm", false, SnapshotAction::Nothing)
        .await
        .unwrap();
    assert_eq!(p.snapshot_name, None);
    // Same name again: the server's duplicate_object error.
    let e = cl
        .create_logical_slot("repl_perm", false, SnapshotAction::Nothing)
        .await
        .unwrap_err();
    assert_eq!(e.sqlstate(), Some("42710"), "{e}");
    // Names that are not slot names never reach the server.
    for bad in ["Bad Name", "x\"; DROP", ""] {
        let e = cl
            .create_logical_slot(bad, true, SnapshotAction::Nothing)
            .await
            .unwrap_err();
        assert!(matches!(e, ReplicationError::InvalidName { .. }), "{e}");
    }
    cl.close().await.unwrap();

    // The temporary slot went away with its session; the permanent one stays.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = c
            .psql(
                &db,
                "SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots \
                 WHERE slot_name LIKE 'repl_%'",
            )
            .unwrap();
        if left == "repl_perm" {
            break;
        }
        assert!(Instant::now() < deadline, "slots left: {left}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut cl = ReplicationClient::connect(&c.url(&db)).await.unwrap();
    cl.drop_slot("repl_perm", true).await.unwrap();
    let e = cl.drop_slot("repl_perm", false).await.unwrap_err();
    assert_eq!(e.sqlstate(), Some("42704"), "{e}");
    cl.close().await.unwrap();
    assert_eq!(
        c.psql(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'repl_perm'"
        )
        .unwrap(),
        "0"
    );
}

#[tokio::test]
async fn stream_delivers_begin_relation_insert_commit_and_options() {
    let (c, db) = testpg::fresh_db("repl_stream").unwrap();
    setup_schema(c, &db);
    let (cl, slot) = temp_slot(c, &db, "repl_stream").await;
    let mut s = cl
        .start_logical(
            "repl_stream",
            slot.consistent_point,
            &opts(),
            StreamConfig::default(),
        )
        .await
        .unwrap();
    c.psql(
        &db,
        &format!(
            "BEGIN; INSERT INTO {TABLE} VALUES (1, 'one'), (2, 'two'), (3, 'three'); \
             INSERT INTO unrelated (v) VALUES ('not published'); COMMIT; \
             INSERT INTO {TABLE} VALUES (4, 'four');"
        ),
    )
    .unwrap();
    let (mut payloads, first_commit) = read_commits(&mut s, 1).await;
    let (second, last_commit) = read_commits(&mut s, 1).await;
    payloads.extend(second);
    assert_eq!(tags(&payloads), "BRIIICBIC");
    assert!(contains(&payloads[1], "Tab \"x\" ü"), "relation name in R");
    assert!(contains(&payloads[2], "one"));
    assert!(contains(&payloads[7], "four"));
    assert!(last_commit > slot.consistent_point);
    assert!(!s.status().transaction_open);
    assert_eq!(s.status().must_confirm, last_commit);
    // Received but not confirmed: nothing at or past a received commit is reported (an idle
    // keepalive from before the transactions arrived may have been).
    s.send_status_now().await.unwrap();
    assert!(s.status().reported_flush < first_commit);
    s.confirm(last_commit);
    s.send_status_now().await.unwrap();
    // At least the commit; more if a keepalive for other databases' WAL came meanwhile (the
    // idle rule: everything received is confirmed).
    assert!(s.status().reported_flush >= last_commit);
    let t = Instant::now();
    s.shutdown().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "clean shutdown is quick"
    );

    // Every option at once (proto 2, binary, messages, streaming) is accepted, and messages
    // arrive.
    let (cl, slot) = temp_slot(c, &db, "repl_stream_opts").await;
    let o = PgOutputOptions::new(2)
        .publication(PUBLICATION)
        .binary(true)
        .messages(true)
        .streaming(true);
    let mut s = cl
        .start_logical(
            "repl_stream_opts",
            slot.consistent_point,
            &o,
            StreamConfig::default(),
        )
        .await
        .unwrap();
    c.psql(
        &db,
        &format!(
            "BEGIN; SELECT pg_logical_emit_message(true, 'shadowmig', 'lw:1'); \
             INSERT INTO {TABLE} VALUES (5, 'five'); COMMIT;"
        ),
    )
    .unwrap();
    let (payloads, _) = read_commits(&mut s, 1).await;
    assert_eq!(tags(&payloads), "BMRIC");
    assert!(contains(&payloads[1], "lw:1"));
    s.shutdown().await.unwrap();

    // A publication that does not exist: a server error from the stream, not a hang.
    let (cl, slot) = temp_slot(c, &db, "repl_stream_nopub").await;
    let mut s = cl
        .start_logical(
            "repl_stream_nopub",
            slot.consistent_point,
            &PgOutputOptions::new(1).publication("nope"),
            StreamConfig::default(),
        )
        .await
        .unwrap();
    c.psql(&db, &format!("INSERT INTO {TABLE} VALUES (6, 'six')"))
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.next().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .unwrap();
    let e = ev.expect("an error").unwrap_err();
    assert_eq!(e.sqlstate(), Some("42704"), "{e}");
}

#[tokio::test]
async fn keepalive_replies_outlive_a_short_wal_sender_timeout() {
    let c =
        TestCluster::start(&ClusterConfig::default().setting("wal_sender_timeout", "2s")).unwrap();
    let db = c.create_database("ka").unwrap();
    setup_schema(&c, &db);
    let (cl, slot) = temp_slot(&c, &db, "ka").await;
    // The interval alone (60 s) would let the server time out: only replies keep it alive.
    let cfg = StreamConfig::default().status_interval(Duration::from_secs(60));
    let mut s = cl
        .start_logical("ka", slot.consistent_point, &opts(), cfg)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut requested = 0;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), s.next()).await {
            Err(_) => {}
            Ok(Some(Ok(ReplicationEvent::Keepalive {
                reply_requested, ..
            }))) => requested += usize::from(reply_requested),
            Ok(other) => panic!("unexpected while idle: {other:?}"),
        }
    }
    assert!(requested >= 2, "server asked {requested} times");
    assert!(s.status().updates_sent >= 3);
    c.psql(
        &db,
        &format!("INSERT INTO {TABLE} VALUES (1, 'still here')"),
    )
    .unwrap();
    let (payloads, _) = read_commits(&mut s, 1).await;
    assert_eq!(tags(&payloads), "BRIC");
}

/// Reads for `d`, expecting only keepalives; returns the greatest `wal_end` seen.
async fn drain_keepalives(s: &mut LogicalStream, d: Duration) -> Lsn {
    let until = Instant::now() + d;
    let mut max_ka = Lsn::ZERO;
    while Instant::now() < until {
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(100), s.next()).await {
            match ev.unwrap() {
                ReplicationEvent::Keepalive { wal_end, .. } => max_ka = max_ka.max(wal_end),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    max_ka
}

#[tokio::test]
async fn idle_slot_advances_only_when_everything_is_confirmed() {
    let (c, db) = testpg::fresh_db("repl_idle").unwrap();
    setup_schema(c, &db);
    let mut cl = ReplicationClient::connect(&c.url(&db)).await.unwrap();
    let slot = cl
        .create_logical_slot("repl_idle", false, SnapshotAction::Nothing)
        .await
        .unwrap();
    let cfg = StreamConfig::default().status_interval(Duration::from_millis(100));
    let mut s = cl
        .start_logical("repl_idle", slot.consistent_point, &opts(), cfg)
        .await
        .unwrap();
    c.psql(&db, &format!("INSERT INTO {TABLE} VALUES (1, 'a')"))
        .unwrap();
    let (payloads, commit) = read_commits(&mut s, 1).await;
    assert_eq!(tags(&payloads), "BRIC");

    // Unrelated WAL while the commit is unconfirmed: keepalives past it come, and nothing at
    // or past the commit is reported (before the transaction arrived, an idle keepalive may
    // have been: nothing had been received then).
    c.psql(
        &db,
        "INSERT INTO unrelated (v) SELECT 'x' FROM generate_series(1, 1000)",
    )
    .unwrap();
    let ka = drain_keepalives(&mut s, Duration::from_secs(2)).await;
    assert!(
        ka > commit,
        "a keepalive beyond the commit arrived: {ka} vs {commit}"
    );
    assert!(s.status().updates_sent > 0);
    assert!(s.status().reported_flush < commit, "{:?}", s.status());
    // The caller confirms less than the commit: still nothing at or past it.
    let partial = Lsn(commit.0 - 1);
    s.confirm(partial);
    s.send_status_now().await.unwrap();
    assert_eq!(s.status().reported_flush, partial);
    assert!(slot_confirmed(c, &db, "repl_idle") < commit);

    // Confirm the commit: the next keepalive after new unrelated WAL is reported.
    s.confirm(commit);
    c.psql(&db, "INSERT INTO unrelated (v) VALUES ('y')")
        .unwrap();
    let target: Lsn = c
        .psql(&db, "SELECT pg_current_wal_lsn()")
        .unwrap()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        drain_keepalives(&mut s, Duration::from_millis(300)).await;
        let confirmed = slot_confirmed(c, &db, "repl_idle");
        if confirmed >= target {
            assert!(s.status().reported_flush > commit);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slot stuck at {confirmed}, wanted {target} (status {:?})",
            s.status()
        );
        c.psql(&db, "INSERT INTO unrelated (v) VALUES ('z')")
            .unwrap();
    }
    s.shutdown().await.unwrap();
    let mut cl = ReplicationClient::connect(&c.url(&db)).await.unwrap();
    cl.drop_slot("repl_idle", true).await.unwrap();
}

#[tokio::test]
async fn open_streamed_transaction_blocks_the_idle_rule() {
    // A tiny logical_decoding_work_mem makes the server stream an open transaction (proto 2).
    let c =
        TestCluster::start(&ClusterConfig::default().setting("logical_decoding_work_mem", "64kB"))
            .unwrap();
    let db = c.create_database("open").unwrap();
    setup_schema(&c, &db);
    let mut cl = ReplicationClient::connect(&c.url(&db)).await.unwrap();
    let slot = cl
        .create_logical_slot("open", false, SnapshotAction::Nothing)
        .await
        .unwrap();
    let o = PgOutputOptions::new(2)
        .publication(PUBLICATION)
        .streaming(true);
    let cfg = StreamConfig::default().status_interval(Duration::from_millis(100));
    let mut s = cl
        .start_logical("open", slot.consistent_point, &o, cfg)
        .await
        .unwrap();
    // One committed transaction, confirmed.
    c.psql(&db, &format!("INSERT INTO {TABLE} VALUES (0, 'first')"))
        .unwrap();
    let (_, commit) = read_commits(&mut s, 1).await;
    s.confirm(commit);

    // An open transaction big enough to be streamed, held open.
    let mut pg = c.client(&db).await.unwrap();
    let tx = pg.transaction().await.unwrap();
    tx.batch_execute(&format!(
        "INSERT INTO {TABLE} SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g"
    ))
    .await
    .unwrap();
    // Read the stream block(s); whenever the stream is idle, write unrelated WAL so that
    // keepalives with a later wal_end come.
    let mut saw_stream_start = false;
    let mut max_ka = Lsn::ZERO;
    // What was reported when the stream block arrived (keepalives sent while the server was
    // still reading the big transaction may have been reported by the idle rule: it had not
    // been received yet, and it commits later, so it would be sent again in full).
    let mut at_stream_start = Lsn::ZERO;
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until && (!saw_stream_start || max_ka <= at_stream_start) {
        match tokio::time::timeout(Duration::from_millis(300), s.next()).await {
            Err(_) => {
                c.psql(&db, "INSERT INTO unrelated (v) VALUES ('w')")
                    .unwrap();
            }
            Ok(ev) => match ev.expect("stream ended").unwrap() {
                ReplicationEvent::XLogData { data, .. } => {
                    if !saw_stream_start && data.first() == Some(&b'S') {
                        saw_stream_start = true;
                        // Let any update computed before the block arrived finish first.
                        s.send_status_now().await.unwrap();
                        at_stream_start = s.status().reported_flush;
                    }
                }
                ReplicationEvent::Keepalive { wal_end, .. } if saw_stream_start => {
                    max_ka = max_ka.max(wal_end)
                }
                ReplicationEvent::Keepalive { .. } => {}
            },
        }
    }
    assert!(saw_stream_start, "the open transaction was streamed");
    assert!(at_stream_start >= commit);
    assert!(max_ka > at_stream_start, "keepalive past what was reported");
    assert!(s.status().transaction_open);
    s.send_status_now().await.unwrap();
    assert_eq!(
        s.status().reported_flush,
        at_stream_start,
        "nothing more is reported while the streamed transaction is open"
    );
    assert_eq!(slot_confirmed(&c, &db, "open"), at_stream_start);
    tx.commit().await.unwrap();
    s.shutdown().await.unwrap();
    let mut cl = ReplicationClient::connect(&c.url(&db)).await.unwrap();
    cl.drop_slot("open", true).await.unwrap();
}

#[tokio::test]
async fn restart_yields_connection_lost_and_reconnect_resumes() {
    // A shutdown waits for a logical walsender until its consumer confirmed everything sent,
    // or until wal_sender_timeout: we never confirm the unconfirmed change, so keep it short.
    let c =
        TestCluster::start(&ClusterConfig::default().setting("wal_sender_timeout", "5s")).unwrap();
    let db = c.create_database("restart").unwrap();
    setup_schema(&c, &db);
    let mut cl = ReplicationClient::connect(&c.url(&db)).await.unwrap();
    let slot = cl
        .create_logical_slot("restart", false, SnapshotAction::Nothing)
        .await
        .unwrap();
    let mut s = cl
        .start_logical(
            "restart",
            slot.consistent_point,
            &opts(),
            StreamConfig::default(),
        )
        .await
        .unwrap();
    c.psql(&db, &format!("INSERT INTO {TABLE} VALUES (1, 'row-one')"))
        .unwrap();
    let (_, first) = read_commits(&mut s, 1).await;
    s.confirm(first);
    s.send_status_now().await.unwrap();
    // Committed but never confirmed: must come again after the restart.
    c.psql(&db, &format!("INSERT INTO {TABLE} VALUES (2, 'row-two')"))
        .unwrap();
    let (p, _) = read_commits(&mut s, 1).await;
    assert!(p.iter().any(|d| contains(d, "row-two")));

    c.restart_fast().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return e,
                None => panic!("stream ended without an error"),
            }
        }
    })
    .await
    .unwrap();
    assert!(err.is_connection_lost(), "{err}");
    assert!(s.next().await.is_none(), "nothing after the error");

    c.psql(&db, &format!("INSERT INTO {TABLE} VALUES (3, 'row-three')"))
        .unwrap();
    let cl = ReplicationClient::connect(&c.url(&db)).await.unwrap();
    let mut s = cl
        .start_logical("restart", first, &opts(), StreamConfig::default())
        .await
        .unwrap();
    let (p, _) = read_commits(&mut s, 2).await;
    assert_eq!(tags(&p), "BRICBIC");
    assert!(
        contains(&p[2], "row-two"),
        "the unconfirmed change came again"
    );
    assert!(contains(&p[5], "row-three"));
    assert!(
        !p.iter().any(|d| contains(d, "row-one")),
        "confirmed not resent"
    );
    s.shutdown().await.unwrap();
    cl_drop(&c, &db, "restart").await.unwrap();
}

async fn cl_drop(c: &TestCluster, db: &str, slot: &str) -> Result<(), ReplicationError> {
    let mut cl = ReplicationClient::connect(&c.url(db)).await?;
    cl.drop_slot(slot, true).await
}

#[tokio::test]
async fn slow_consumer_keeps_queue_bounded_connection_alive_and_loses_nothing() {
    let c =
        TestCluster::start(&ClusterConfig::default().setting("wal_sender_timeout", "2s")).unwrap();
    let db = c.create_database("bp").unwrap();
    setup_schema(&c, &db);
    let (cl, slot) = temp_slot(&c, &db, "bp").await;
    let cfg = StreamConfig::default()
        .channel_capacity(4)
        .status_interval(Duration::from_millis(500));
    let mut s = cl
        .start_logical("bp", slot.consistent_point, &opts(), cfg)
        .await
        .unwrap();
    const TXS: usize = 300;
    const ROWS: usize = 100;
    insert_backlog(&c, &db, TXS, ROWS);
    // Do not poll for longer than wal_sender_timeout: the queue must stay at its bound and the
    // writer's status updates must keep the connection alive.
    let until = Instant::now() + Duration::from_secs(5);
    let mut max_queued = 0;
    while Instant::now() < until {
        max_queued = max_queued.max(s.queued());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(max_queued <= 4, "queued {max_queued}");
    assert!(max_queued >= 3, "the channel filled up ({max_queued})");
    let updates_while_stalled = s.status().updates_sent;
    assert!(updates_while_stalled >= 5, "{updates_while_stalled}");

    let (p, last) = read_commits(&mut s, TXS).await;
    let inserts = p.iter().filter(|d| d.first() == Some(&b'I')).count();
    assert_eq!(inserts, TXS * ROWS);
    s.confirm(last);
    s.shutdown().await.unwrap();
}

/// A backlog makes the reader busy: it raises the receive low-water mark (fewer, larger
/// reads), the tail of the burst below the mark still arrives (the busy wait drops the mark),
/// and a lone change after the burst arrives at once, not with the next keepalive.
#[tokio::test]
async fn busy_reader_paces_reads_and_still_delivers_the_tail_and_a_lone_change() {
    let (c, db) = testpg::fresh_db("pace").unwrap();
    setup_schema(c, &db);
    let (cl, slot) = temp_slot(c, &db, "pace").await;
    // The backlog exists before the stream starts, so the walsender sends at full speed.
    const TXS: usize = 300;
    const ROWS: usize = 100;
    insert_backlog(c, &db, TXS, ROWS);
    // A mark far above what one commit carries, and a wait long enough to notice if the tail
    // were only released by some later event.
    let cfg = StreamConfig::default()
        .busy_low_water(256 * 1024)
        .busy_wait(Duration::from_millis(100));
    let mut s = cl
        .start_logical("pace", slot.consistent_point, &opts(), cfg)
        .await
        .unwrap();
    let (p, last) = read_commits(&mut s, TXS).await;
    let inserts = p.iter().filter(|d| d.first() == Some(&b'I')).count();
    assert_eq!(inserts, TXS * ROWS);
    s.confirm(last);
    let st = s.read_stats();
    assert!(
        st.lowat_switches >= 2,
        "the reader turned busy and back to idle: {st:?}"
    );
    assert!(
        st.reads > 0 && st.bytes > (TXS * ROWS * 50) as u64,
        "{st:?}"
    );

    // Idle again: a single change must not wait for the mark (the next keepalive would come
    // only after wal_sender_timeout / 2 = 30 s).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    c.psql(&db, &format!("INSERT INTO {TABLE} VALUES (-1, 'lone')"))
        .unwrap();
    loop {
        let (_, data) = next_data(&mut s, Duration::from_secs(5)).await;
        if data.first() == Some(&b'I') {
            assert!(contains(&data, "lone"));
            break;
        }
    }
    let waited = t.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "lone change took {waited:?}"
    );
    s.shutdown().await.unwrap();
}

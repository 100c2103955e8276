//! The test-cluster harness itself: it starts a logical-replication-ready server as the right
//! user, gives each test its own database, and leaves nothing running behind it.

use shadowmig::testpg::{self, ClusterConfig, TestCluster};

#[test]
fn shared_cluster_is_logical_and_on_loopback() {
    let (c, db) = testpg::fresh_db("harness").expect("start shared cluster");
    assert_eq!(c.psql(&db, "SHOW wal_level").unwrap(), "logical");
    assert_eq!(c.psql(&db, "SHOW listen_addresses").unwrap(), "127.0.0.1");
    assert_eq!(c.psql(&db, "SELECT current_database()").unwrap(), db);
    assert_eq!(c.psql(&db, "SHOW port").unwrap(), c.port().to_string());
    // The server must not run as root: PostgreSQL refuses, and we must not try to trick it.
    let owner = c
        .psql(&db, "SELECT pg_read_file('postmaster.pid') IS NOT NULL")
        .unwrap();
    assert_eq!(owner, "t");
}

#[test]
fn fresh_databases_are_distinct() {
    let (c, a) = testpg::fresh_db("a").unwrap();
    let (_, b) = testpg::fresh_db("b").unwrap();
    assert_ne!(a, b);
    c.psql(&a, "CREATE TABLE only_in_a(x int)").unwrap();
    assert_eq!(
        c.psql(&b, "SELECT to_regclass('only_in_a') IS NULL")
            .unwrap(),
        "t"
    );
}

#[test]
fn own_cluster_takes_settings_restarts_and_is_removed_on_drop() {
    let c =
        TestCluster::start(&ClusterConfig::default().setting("logical_decoding_work_mem", "64kB"))
            .expect("start");
    let root = c.root().to_path_buf();
    let pid = c.pid().expect("pid");
    assert_eq!(
        c.psql("postgres", "SHOW logical_decoding_work_mem")
            .unwrap(),
        "64kB"
    );
    c.restart_fast().expect("restart");
    let pid2 = c.pid().expect("pid after restart");
    assert_ne!(pid, pid2, "a restart starts a new postmaster");
    assert_eq!(c.psql("postgres", "SELECT 1").unwrap(), "1");
    drop(c);
    assert!(!root.exists(), "cluster dir removed on drop");
    // SAFETY: existence probe only.
    let alive = unsafe { libc::kill(pid2, 0) } == 0;
    assert!(!alive, "postmaster {pid2} still running after drop");
}

#[test]
fn cluster_is_stopped_when_a_test_panics() {
    let root = std::sync::Arc::new(std::sync::Mutex::new(None));
    let r2 = root.clone();
    let res = std::panic::catch_unwind(move || {
        let c = TestCluster::start(&ClusterConfig::default()).expect("start");
        *r2.lock().unwrap() = Some((c.root().to_path_buf(), c.pid().unwrap()));
        panic!("test failure inside a cluster's lifetime");
    });
    assert!(res.is_err());
    let (dir, pid) = root.lock().unwrap().clone().expect("cluster started");
    assert!(!dir.exists());
    // SAFETY: existence probe only.
    assert!(unsafe { libc::kill(pid, 0) } != 0);
}

#[tokio::test]
async fn async_client_connects() {
    let (c, db) = testpg::fresh_db("client").unwrap();
    let client = c.client(&db).await.unwrap();
    let row = client.query_one("SELECT 40 + 2", &[]).await.unwrap();
    let v: i32 = row.get(0);
    assert_eq!(v, 42);
}

//! The live verification sampler end to end: `shadowmig run` as a child process against real
//! PostgreSQL streams the orders scenario while corruptions are injected straight into the
//! target; the sampler must find each with its key and kind (log, Prometheus, `status
//! --json`), agree with `shadowmig verify`, and report nothing under a clean concurrent
//! workload.

mod common;

use common::{http_get, shadowmig, sigterm, status_json, wait_equal};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shadowmig::testpg::{self, TestCluster};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_spec(
    dir: &tempfile::TempDir,
    name: &str,
    url: &str,
    verify: &str,
    metrics_port: u16,
) -> PathBuf {
    let spec = common::orders_spec(
        name,
        url,
        &format!("[copy]\nchunk_rows = 500\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n[verify]\n{verify}\n"),
    );
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, spec).unwrap();
    path
}

fn metric(port: u16, name: &str) -> Option<f64> {
    http_get(port, "/metrics")
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// The sampler's warn lines in the log: (key JSON, kind).
fn mismatches_logged(log: &Path) -> Vec<(String, String)> {
    let text = strip_ansi(&std::fs::read_to_string(log).unwrap_or_default());
    text.lines()
        .filter(|l| l.contains("live verification: mismatch") && l.contains("WARN"))
        .filter_map(|l| {
            let key = l.split("key=").nth(1)?.split(" kind=").next()?.to_string();
            let kind = l.split("kind=\"").nth(1)?.split('"').next()?.to_string();
            Some((key, kind))
        })
        .collect()
}

/// The log without terminal colour codes (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn key(customer: i64, id: i64) -> String {
    format!("{{\"customer_id\":{customer},\"id\":{id}}}")
}

fn customer_of(c: &TestCluster, db: &str, id: i64) -> i64 {
    c.psql(
        db,
        &format!("SELECT customer_id FROM orders WHERE id = {id}"),
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}

#[test]
fn every_kind_of_target_corruption_is_found_by_the_sampler_and_by_verify() {
    let (c, db) = testpg::fresh_db("sampler_corrupt").unwrap();
    c.psql(&db, common::ORDERS_SOURCE).unwrap();
    c.psql(&db, &common::orders_seed_sql(300)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let spec = write_spec(
        &dir,
        "sampler_corrupt",
        &c.url(&db),
        "sample_rate = 1.0\nrandom_keys_per_minute = 30000",
        port,
    );
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    assert!(wait_equal(c, &db, Duration::from_secs(60)), "no catch-up");
    // Clean so far: whatever it checked, it found nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(port, "shadowmig_checked_total").unwrap_or(0.0) < 300.0 {
        assert!(
            Instant::now() < deadline,
            "the sampler checks nothing:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(mismatches_logged(&log).is_empty());
    assert_eq!(metric(port, "shadowmig_mismatch_total").unwrap_or(0.0), 0.0);

    let (c10, c20, c30) = (
        customer_of(c, &db, 10),
        customer_of(c, &db, 20),
        customer_of(c, &db, 30),
    );
    c.psql(
        &db,
        "UPDATE public.orders_v2 SET status = 'corrupt' WHERE id = 10;
         DELETE FROM public.orders_v2 WHERE id = 20;
         INSERT INTO public.orders_v2 VALUES (4242, 999999, 1, 'USD', 'new', NULL, now());
         UPDATE public.orders_v2 SET customer_id = customer_id + 1000 WHERE id = 30;",
    )
    .unwrap();
    let expected = vec![
        (key(c10, 10), "different".to_string()),
        (key(c20, 20), "missing".to_string()),
        (key(4242, 999999), "extra".to_string()),
        (key(c30, 30), "missing".to_string()),
        (key(c30 + 1000, 30), "extra".to_string()),
    ];
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let found = mismatches_logged(&log);
        if expected.iter().all(|e| found.contains(e)) {
            // Nothing else: every warned key is one of the injected ones.
            for f in &found {
                assert!(expected.contains(f), "unexpected mismatch {f:?}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sampler did not find every corruption: found {found:?}, expected {expected:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let m = metric(port, "shadowmig_mismatch_total").unwrap_or(0.0);
    assert!(m >= 5.0, "shadowmig_mismatch_total = {m}");
    let st = status_json(&spec);
    let v = &st["verify"];
    let (mm, ch) = (
        v["mismatches"].as_i64().unwrap(),
        v["checked"].as_i64().unwrap(),
    );
    assert!(mm >= 5 && ch > mm, "{v}");
    let rate = v["mismatch_rate"].as_f64().unwrap();
    assert!((rate - mm as f64 / ch as f64).abs() < 1e-9, "{v}");

    // `verify` finds the very same keys and kinds while run streams.
    let out = shadowmig(&["verify", spec.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "verify: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut from_verify: Vec<(String, String)> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                serde_json::to_string(&d["key"]).unwrap(),
                d["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut want = expected.clone();
    from_verify.sort();
    want.sort();
    assert_eq!(from_verify, want, "{report}");

    // The counters survive a restart (they live in the target's state).
    assert_eq!(sigterm(&mut child).code(), Some(0));
    let after = status_json(&spec);
    assert!(after["verify"]["mismatches"].as_i64().unwrap() >= mm);
    assert!(after["verify"]["checked"].as_i64().unwrap() >= ch);
    let human = shadowmig(&["status", spec.to_str().unwrap()])
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("mismatches"), "{human}");
}

#[test]
fn a_clean_concurrent_workload_gives_no_false_positive_and_changed_keys_are_checked() {
    let (c, db) = testpg::fresh_db("sampler_clean").unwrap();
    c.psql(&db, common::ORDERS_SOURCE).unwrap();
    c.psql(&db, &common::orders_seed_sql(2000)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Changed keys only: what is checked below comes from apply's batches.
    let spec = write_spec(
        &dir,
        "sampler_clean",
        &c.url(&db),
        "sample_rate = 1.0\nrandom_keys_per_minute = 0",
        port,
    );
    let log = dir.path().join("run.log");
    let mut child = spawn_run(&spec, &log);
    assert!(wait_equal(c, &db, Duration::from_secs(60)), "no catch-up");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (stop2, db2) = (stop.clone(), db.clone());
    let workload = rt.spawn(async move {
        let c = testpg::shared().unwrap();
        let mut client = c.client(&db2).await.unwrap();
        common::orders_workload(&mut client, 7, stop2, u64::MAX).await
    });
    std::thread::sleep(Duration::from_secs(12));
    stop.store(true, Ordering::Relaxed);
    let stats = rt.block_on(workload).unwrap();
    assert!(stats.committed > 50, "{stats:?}");
    assert!(wait_equal(c, &db, Duration::from_secs(60)), "no catch-up");
    // Let the sampler drain its queue: its count stays still for longer than a re-check
    // can wait on an idle source (the stream's 10 s status interval).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = -1.0;
    let mut still_since = Instant::now();
    loop {
        let now = metric(port, "shadowmig_checked_total").unwrap_or(0.0);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if now > 0.0 && still_since.elapsed() > Duration::from_secs(15) {
            break;
        }
        assert!(Instant::now() < deadline, "the sampler does not settle");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Under this load the bounded channel drops most samples (by design: apply never
    // waits); what was checked must still be a real share.
    assert!(
        last >= 200.0,
        "checked only {last} keys for {} transactions",
        stats.committed
    );
    assert_eq!(
        metric(port, "shadowmig_mismatch_total").unwrap_or(0.0),
        0.0,
        "false positive:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(mismatches_logged(&log).is_empty());
    let st = status_json(&spec);
    assert_eq!(st["verify"]["mismatches"], 0, "{st}");
    assert_eq!(st["verify"]["mismatch_rate"], 0.0, "{st}");
    assert!(st["verify"]["checked"].as_i64().unwrap() >= last as i64);

    // A stray target row under the wrong customer is found through the changed-key path
    // alone (random sampling is off): touching the source row offers its identity.
    let id: i64 = c
        .psql(&db, "SELECT min(id) FROM orders")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    c.psql(
        &db,
        &format!(
            "INSERT INTO public.orders_v2 SELECT customer_id + 500, id, total_amount_minor, currency, status, note, created_at FROM public.orders_v2 WHERE id = {id}"
        ),
    )
    .unwrap();
    let cust = customer_of(c, &db, id);
    c.psql(
        &db,
        &format!("UPDATE orders SET status = 'touched' WHERE id = {id}"),
    )
    .unwrap();
    let want = (key(cust + 500, id), "extra".to_string());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mismatches_logged(&log).contains(&want) {
        assert!(
            Instant::now() < deadline,
            "not found: {want:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(mismatches_logged(&log), vec![want]);
    assert_eq!(sigterm(&mut child).code(), Some(0));
}

fn spawn_run(spec: &Path, log: &Path) -> std::process::Child {
    common::spawn_run(
        spec,
        log,
        "shadowmig=info,shadowmig::sampler=debug,shadowmig::verify=debug",
    )
}

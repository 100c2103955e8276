//! Stream drain: how fast our `LogicalStream` reads a slot, against `pg_recvlogical` reading
//! an identical slot over the same WAL, in the same run.
//!
//! `cargo bench --bench stream_drain` (release). `STREAM_DRAIN_CHANGES` sets the number of row
//! changes (default 1,000,000: half single-row inserts, half single-row updates, 100 rows per
//! transaction). `STREAM_DRAIN_ROUNDS` (default 2) rounds of four slots, all created at the same
//! point before the changes, are drained in the order pg_recvlogical, ours, ours,
//! pg_recvlogical so that neither side always runs with a warmer cache.
//! `STREAM_DRAIN_RUNTIME=current` runs our side on a current-thread tokio runtime (default:
//! multi-thread). Prints changes/s per run, the means and the ratio ours / pg_recvlogical.

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use shadowmig::lsn::Lsn;
use shadowmig::replication::{PgOutputOptions, ReplicationClient, ReplicationEvent, StreamConfig};
use shadowmig::testpg::{ClusterConfig, TestCluster};

const ROWS_PER_TX: u64 = 100;

fn main() {
    let changes: u64 = std::env::var("STREAM_DRAIN_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // Whole transactions: half inserts, half updates.
    let half = (changes / 2).div_ceil(ROWS_PER_TX) * ROWS_PER_TX;
    let changes = half * 2;

    let c = TestCluster::start(&ClusterConfig::default()).expect("start cluster");
    let db = c.create_database("stream_drain").expect("create database");
    c.psql(
        &db,
        "CREATE TABLE bench (id bigint PRIMARY KEY, v int NOT NULL); \
         CREATE PUBLICATION p FOR TABLE bench;",
    )
    .expect("schema");
    let rounds: usize = std::env::var("STREAM_DRAIN_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .clamp(1, 4);
    // Each round drains four slots: pg_recvlogical, ours, ours, pg_recvlogical.
    let plan: Vec<(String, bool)> = (0..rounds * 4)
        .map(|i| (format!("s{}", i + 1), matches!(i % 4, 0 | 3)))
        .collect();
    for (s, _) in &plan {
        c.psql(
            &db,
            &format!("SELECT pg_create_logical_replication_slot('{s}', 'pgoutput')"),
        )
        .expect("slot");
    }

    let t = Instant::now();
    c.psql(
        &db,
        &format!(
            "DO $$ BEGIN \
               FOR b IN 0..{txs} LOOP \
                 INSERT INTO bench SELECT g, 0 FROM generate_series(b * {n} + 1, (b + 1) * {n}) g; \
                 COMMIT; \
               END LOOP; \
               FOR b IN 0..{txs} LOOP \
                 UPDATE bench SET v = v + 1 WHERE id BETWEEN b * {n} + 1 AND (b + 1) * {n}; \
                 COMMIT; \
               END LOOP; \
             END $$",
            txs = half / ROWS_PER_TX - 1,
            n = ROWS_PER_TX
        ),
    )
    .expect("generate changes");
    let end: Lsn = c
        .psql(&db, "SELECT pg_current_wal_insert_lsn()")
        .expect("end lsn")
        .parse()
        .expect("lsn");
    println!(
        "generated {changes} changes ({} transactions) in {:.1} s, end LSN {end}",
        changes / ROWS_PER_TX,
        t.elapsed().as_secs_f64()
    );

    let current_thread = std::env::var("STREAM_DRAIN_RUNTIME").as_deref() == Ok("current");
    let rt = if current_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
    .expect("runtime");
    println!(
        "tokio runtime: {}",
        if current_thread {
            "current_thread"
        } else {
            "multi_thread"
        }
    );
    let mut theirs = Vec::new();
    let mut ours = Vec::new();
    for (slot, native) in &plan {
        let (slot, native) = (slot.as_str(), *native);
        let who = if native {
            libc::RUSAGE_CHILDREN
        } else {
            libc::RUSAGE_SELF
        };
        let cpu0 = cpu_seconds(who);
        let secs = if native {
            recvlogical(&c, &db, slot, end)
        } else {
            // Spawned, as a consumer inside `shadowmig run` is: on a worker thread, not the
            // main thread that blocks on the runtime.
            let (url, slot_name) = (c.url(&db), slot.to_string());
            let (secs, n) = rt
                .block_on(async move { tokio::spawn(drain(url, slot_name, end)).await })
                .expect("drain task");
            assert_eq!(n, changes, "our stream counted every change");
            secs
        };
        let cpu = cpu_seconds(who) - cpu0;
        let rate = changes as f64 / secs;
        println!(
            "{:>14} slot {slot}: {secs:.2} s, {rate:.0} changes/s, client CPU {cpu:.2} s",
            if native {
                "pg_recvlogical"
            } else {
                "LogicalStream"
            }
        );
        if native {
            theirs.push(rate);
        } else {
            ours.push(rate);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (o, p) = (mean(&ours), mean(&theirs));
    println!(
        "stream drain, {changes} changes: ours {o:.0}/s, pg_recvlogical {p:.0}/s, ratio ours/pg_recvlogical {:.2}",
        o / p
    );
}

/// User + system CPU seconds of this process (`RUSAGE_SELF`) or its waited-for children.
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes into the struct we pass; nothing else is shared.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return f64::NAN;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Runs pg_recvlogical to `end`, writing to /dev/null; returns seconds.
fn recvlogical(c: &TestCluster, db: &str, slot: &str, end: Lsn) -> f64 {
    let t = Instant::now();
    let out = Command::new(c.bindir().join("pg_recvlogical"))
        .args([
            "-h",
            c.host(),
            "-p",
            &c.port().to_string(),
            "-U",
            c.superuser(),
        ])
        .args(["-d", db, "--slot", slot, "--start", "--no-loop"])
        .args(["--endpos", &end.to_string()])
        .args(["-o", "proto_version=1", "-o", "publication_names=p"])
        .args(["-f", "/dev/null"])
        .output()
        .expect("run pg_recvlogical");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "pg_recvlogical failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

/// Drains `slot` with our stream until `end`; returns seconds and the row changes counted.
async fn drain(url: String, slot: String, end: Lsn) -> (f64, u64) {
    let t = Instant::now();
    let client = ReplicationClient::connect(&url).await.expect("connect");
    let opts = PgOutputOptions::new(1).publication("p");
    let mut s = client
        .start_logical(&slot, Lsn::ZERO, &opts, StreamConfig::default())
        .await
        .expect("start");
    let mut n = 0u64;
    let mut commits = 0u64;
    while let Some(ev) = s.next().await {
        match ev.expect("stream") {
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => {
                match data.first() {
                    Some(b'I' | b'U' | b'D') => n += 1,
                    Some(b'C') => {
                        commits += 1;
                        if commits % 100 == 0 {
                            s.confirm(wal_start);
                        }
                    }
                    _ => {}
                }
                if wal_start >= end {
                    s.confirm(wal_start);
                    break;
                }
            }
            ReplicationEvent::Keepalive { wal_end, .. } => {
                if wal_end >= end {
                    break;
                }
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.shutdown()).await;
    (secs, n)
}

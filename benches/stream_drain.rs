//! Stream drain: how fast our `LogicalStream` reads a slot, against `pg_recvlogical` reading
//! an identical slot over the same WAL, in the same run.
//!
//! `cargo bench --bench stream_drain` (release). `STREAM_DRAIN_CHANGES` sets the number of row
//! changes (default 1,000,000: half single-row inserts, half single-row updates, 100 rows per
//! transaction). `STREAM_DRAIN_ROUNDS` (default 2) rounds of four slots, all created at the same
//! point before the changes, are drained in the order pg_recvlogical, ours, ours,
//! pg_recvlogical so that neither side always runs with a warmer cache.
//! `STREAM_DRAIN_RUNTIME=current` runs our side on a current-thread tokio runtime (default:
//! multi-thread). `STREAM_DRAIN_LOWAT` (bytes) and `STREAM_DRAIN_BUSY_WAIT_MS` override our
//! stream's busy receive low-water mark and wait (`StreamConfig::busy_low_water`, `busy_wait`;
//! defaults: the library's). `STREAM_DRAIN_UNPACED=1` adds a third reader, ours with pacing off
//! (low-water mark 0, the reader before D20), so each round is pg_recvlogical, ours, unpaced,
//! unpaced, ours, pg_recvlogical. Prints changes/s per run, the means and the ratio
//! ours / pg_recvlogical (and unpaced / pg_recvlogical).

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use shadowmig::lsn::Lsn;
use shadowmig::replication::{
    PgOutputOptions, ReadStats, ReplicationClient, ReplicationEvent, StreamConfig,
};
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

    // Up to 8 rounds of up to 6 slots, all created before the changes.
    let c = TestCluster::start(&ClusterConfig::default().setting("max_replication_slots", "64"))
        .expect("start cluster");
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
        .clamp(1, 8);
    let unpaced = std::env::var("STREAM_DRAIN_UNPACED").as_deref() == Ok("1");
    // Each round drains four slots: pg_recvlogical, ours, ours, pg_recvlogical (six with the
    // unpaced reader in the middle).
    let order: &[Reader] = if unpaced {
        &[
            Reader::Native,
            Reader::Ours,
            Reader::Unpaced,
            Reader::Unpaced,
            Reader::Ours,
            Reader::Native,
        ]
    } else {
        &[Reader::Native, Reader::Ours, Reader::Ours, Reader::Native]
    };
    let plan: Vec<(String, Reader)> = (0..rounds * order.len())
        .map(|i| (format!("s{}", i + 1), order[i % order.len()]))
        .collect();
    let env_num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut paced = StreamConfig::default();
    if let Some(n) = env_num("STREAM_DRAIN_LOWAT") {
        paced = paced.busy_low_water(n as usize);
    }
    if let Some(ms) = env_num("STREAM_DRAIN_BUSY_WAIT_MS") {
        paced = paced.busy_wait(Duration::from_millis(ms));
    }
    println!(
        "our stream: busy low-water mark {} bytes, busy wait {:?}",
        paced.busy_low_water, paced.busy_wait
    );
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
    let mut unpaced_rates = Vec::new();
    let load0 = loadavg();
    for (slot, reader) in &plan {
        let (slot, native) = (slot.as_str(), *reader == Reader::Native);
        let who = if native {
            libc::RUSAGE_CHILDREN
        } else {
            libc::RUSAGE_SELF
        };
        let (cpu0, csw0) = usage(who);
        let mut stats = None;
        let secs = if native {
            recvlogical(&c, &db, slot, end)
        } else {
            // Spawned, as a consumer inside `shadowmig run` is: on a worker thread, not the
            // main thread that blocks on the runtime.
            let (url, slot_name) = (c.url(&db), slot.to_string());
            let cfg = if *reader == Reader::Unpaced {
                StreamConfig::default().busy_low_water(0)
            } else {
                paced.clone()
            };
            let (secs, n, st) = rt
                .block_on(async move { tokio::spawn(drain(url, slot_name, end, cfg)).await })
                .expect("drain task");
            assert_eq!(n, changes, "our stream counted every change");
            stats = Some(st);
            secs
        };
        let (cpu1, csw1) = usage(who);
        let (cpu, csw) = (cpu1 - cpu0, csw1 - csw0);
        let rate = changes as f64 / secs;
        println!(
            "{:>14} slot {slot}: {secs:.2} s, {rate:.0} changes/s, client CPU {cpu:.2} s, {csw} voluntary context switches",
            match reader {
                Reader::Native => "pg_recvlogical",
                Reader::Ours => "LogicalStream",
                Reader::Unpaced => "unpaced",
            }
        );
        if let Some(st) = stats {
            println!(
                "{:>14} {} reads, {:.0} bytes/read, {} low-water switches",
                "",
                st.reads,
                st.bytes as f64 / st.reads.max(1) as f64,
                st.lowat_switches
            );
        }
        match reader {
            Reader::Native => theirs.push(rate),
            Reader::Ours => ours.push(rate),
            Reader::Unpaced => unpaced_rates.push(rate),
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (o, p) = (mean(&ours), mean(&theirs));
    println!("load average before {load0}, after {}", loadavg());
    if !unpaced_rates.is_empty() {
        let u = mean(&unpaced_rates);
        println!(
            "unpaced (low-water mark off): {u:.0}/s, ratio unpaced/pg_recvlogical {:.2}",
            u / p
        );
    }
    println!(
        "stream drain, {changes} changes: ours {o:.0}/s, pg_recvlogical {p:.0}/s, ratio ours/pg_recvlogical {:.2}",
        o / p
    );
}

/// Who drains a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// pg_recvlogical, the native baseline.
    Native,
    /// Our stream with the configured pacing.
    Ours,
    /// Our stream with pacing off.
    Unpaced,
}

/// The three load averages, as `uptime` prints them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// User + system CPU seconds and voluntary context switches (the client's sleeps, i.e. its
/// wake-ups) of this process (`RUSAGE_SELF`, all threads) or its waited-for children.
fn usage(who: libc::c_int) -> (f64, i64) {
    // SAFETY: getrusage writes into the struct we pass; nothing else is shared.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return (f64::NAN, 0);
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    (t(ru.ru_utime) + t(ru.ru_stime), ru.ru_nvcsw)
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

/// Drains `slot` with our stream until `end`; returns seconds, the row changes counted and
/// the reader's socket statistics.
async fn drain(url: String, slot: String, end: Lsn, cfg: StreamConfig) -> (f64, u64, ReadStats) {
    let t = Instant::now();
    let client = ReplicationClient::connect(&url).await.expect("connect");
    let opts = PgOutputOptions::new(1).publication("p");
    let mut s = client
        .start_logical(&slot, Lsn::ZERO, &opts, cfg)
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
    let st = s.read_stats();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.shutdown()).await;
    (secs, n, st)
}

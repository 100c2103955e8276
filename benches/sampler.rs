//! Live sampler cost: what the live verification sampler at its default setting (no `[verify]`
//! section: 1 % of changes, 60 random keys a minute) costs `shadowmig run`'s apply, against the
//! sampler off (`[verify] sample_rate = 0`, `random_keys_per_minute = 0`), in the same run on the
//! same throwaway cluster. Release builds only: `cargo bench --bench sampler`.
//!
//! Two measurements:
//! 1. **Backlog drain.** `SAMPLER_BENCH_ROWS` (default 100,000) rows are backfilled into one
//!    shadow table per drain (one migration, own slot, each); then `SAMPLER_BENCH_CHANGES`
//!    (default 300,000) single-row updates, 100 per transaction, pile up in every slot; then
//!    each migration drains its backlog with `run --exit-when-caught-up`, timed.
//!    `SAMPLER_BENCH_PAIRS` (default 2) pairs, one drain per mode each, the order alternating
//!    per pair (off on, on off, off on, …) so neither mode always runs second. Prints
//!    changes/s and CPU of the `shadowmig` process per drain, each pair's ratio on / off, their
//!    mean and spread.
//! 2. **Steady state.** Two more migrations (off, on) are backfilled; then pgbench writes
//!    `SAMPLER_BENCH_RATE` (default 5,000) changes/s (transactions of 50 random neighbouring
//!    rows) for the whole phase, and each migration in turn runs (off, on, on, off): once it
//!    logs `stage changed … to=caught-up`, its `/metrics` are scraped over
//!    `SAMPLER_BENCH_STEADY_SECS` (default 30; 0 skips the phase) seconds: applied changes/s,
//!    the batch lag histogram (`shadowmig_batch_lag_seconds`: mean, p50, p99 from its
//!    buckets), apply busy time per 1,000 changes (`shadowmig_apply_seconds` sum) and the
//!    process's CPU per 1,000 changes, and the keys the sampler checked.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shadowmig::testpg::{ClusterConfig, TestCluster};

const ROWS_PER_TX: u64 = 100;
/// Rows per pgbench transaction in the steady phase.
const STEADY_ROWS_PER_TX: u64 = 50;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Where the bench's migrations read and write.
struct Urls {
    source: String,
    target: String,
}

fn write_spec(dir: &Path, name: &str, urls: &Urls, sampler_on: bool, metrics_port: u16) -> String {
    let verify = if sampler_on {
        String::new()
    } else {
        "[verify]\nsample_rate = 0\nrandom_keys_per_minute = 0\n".to_string()
    };
    let table = format!("t_{name}");
    let spec = format!(
        r#"name = "{name}"
[source]
url = "{source}"
table = "public.bench"
[target]
url = "{target}"
table = "public.{table}"
create = "CREATE TABLE public.{table} (grp int NOT NULL, id bigint NOT NULL, v bigint NOT NULL, pad text, PRIMARY KEY (grp, id))"
[transform]
v = "v::bigint"
[metrics]
listen = "127.0.0.1:{metrics_port}"
{verify}"#,
        source = urls.source,
        target = urls.target,
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, spec).expect("write spec");
    path.to_str().expect("utf-8 path").to_string()
}

/// User + system CPU seconds of this process's waited-for children so far.
fn children_cpu() -> f64 {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Fields 3… of `/proc/PID/stat` as numbers (non-numbers as 0), if the process exists.
fn stat_fields(pid: u32) -> Option<Vec<f64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(") ").map(|(_, r)| r)?;
    Some(
        after
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0.0))
            .collect(),
    )
}

fn clock_tick() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// User + system CPU seconds of a running process, from `/proc/PID/stat`.
fn process_cpu(pid: u32) -> f64 {
    let f = stat_fields(pid).unwrap_or_default();
    // Fields 14 and 15 of stat (utime, stime); the vector starts at field 3.
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / clock_tick()
}

/// CPU seconds the whole PostgreSQL cluster has used so far: the postmaster's own and its
/// reaped children's (`cutime`, `cstime`: backends that have exited), plus every live child's.
/// (Summed over the source and the target cluster.)
fn cluster_cpu(postmasters: &[u32]) -> f64 {
    let tick = clock_tick();
    let mut total = 0.0;
    for &pm in postmasters {
        let f = stat_fields(pm).unwrap_or_default();
        total += f.iter().skip(11).take(4).sum::<f64>() / tick;
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(f) = stat_fields(pid) {
            // Field 4 (ppid) is the vector's second element.
            if postmasters
                .iter()
                .any(|&pm| f.get(1).copied() == Some(f64::from(pm)))
            {
                total += (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / tick;
            }
        }
    }
    total
}

/// Runs `run --exit-when-caught-up`; its wall time, its CPU time and the cluster's CPU time
/// (the server side of apply and of the sampler's queries), in seconds.
fn drain(spec: &str, log: &Path, postmasters: &[u32]) -> (f64, f64, f64) {
    let f = std::fs::File::create(log).expect("log file");
    let pg0 = cluster_cpu(postmasters);
    let cpu0 = children_cpu();
    let t = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_shadowmig"))
        .args(["run", spec, "--exit-when-caught-up"])
        .env("SHADOWMIG_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .status()
        .expect("run shadowmig");
    let secs = t.elapsed().as_secs_f64();
    let cpu = children_cpu() - cpu0;
    // Let the postmaster reap the run's backends, so their CPU shows in its cutime.
    std::thread::sleep(Duration::from_millis(500));
    let pg = cluster_cpu(postmasters) - pg0;
    assert!(
        status.success(),
        "run failed: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    (secs, cpu, pg)
}

/// `GET /metrics` on 127.0.0.1:`port`, parsed into `name{labels}` → value.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return out;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        if let Some((name, value)) = line.rsplit_once(' ') {
            if let Ok(v) = value.parse::<f64>() {
                out.insert(name.to_string(), v);
            }
        }
    }
    out
}

fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, name: &str) -> f64 {
    b.get(name).unwrap_or(&0.0) - a.get(name).unwrap_or(&0.0)
}

/// The `q` quantile of a Prometheus histogram's increase between two scrapes, as the upper
/// bound of the bucket it falls in.
fn quantile(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, hist: &str, q: f64) -> String {
    let prefix = format!("{hist}_bucket{{le=\"");
    let mut buckets: Vec<(f64, String, f64)> = b
        .keys()
        .filter_map(|k| {
            let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, le.to_string(), delta(a, b, k)))
        })
        .collect();
    buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = buckets.last().map(|b| b.2).unwrap_or(0.0);
    if total <= 0.0 {
        return "n/a".into();
    }
    buckets
        .iter()
        .find(|(_, _, n)| *n >= q * total)
        .map(|(_, le, _)| format!("≤ {le} s"))
        .unwrap_or_else(|| "n/a".into())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn backlog_drains(
    c: &TestCluster,
    db: &str,
    (tc, tdb): (&TestCluster, &str),
    dir: &Path,
    rows: u64,
    specs: &[(String, bool)],
    postmasters: &[u32],
) {
    let changes = env_u64("SAMPLER_BENCH_CHANGES", 300_000).div_ceil(ROWS_PER_TX) * ROWS_PER_TX;
    let t = Instant::now();
    c.psql(
        db,
        &format!(
            "DO $$ BEGIN \
               FOR b IN 0..{txs} LOOP \
                 UPDATE public.bench SET v = v + 1 WHERE id BETWEEN (b * {n}) % {rows} + 1 AND (b * {n}) % {rows} + {n}; \
                 COMMIT; \
               END LOOP; \
             END $$",
            txs = changes / ROWS_PER_TX - 1,
            n = ROWS_PER_TX
        ),
    )
    .expect("generate changes");
    println!(
        "generated {changes} changes in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // (mode, changes/s, shadowmig + cluster CPU ms per 1,000 changes) per drain.
    let mut results: Vec<(bool, f64, f64)> = Vec::new();
    for (i, (spec, sampler_on)) in specs.iter().enumerate() {
        let log = dir.join(format!("drain_{i}.log"));
        let (secs, cpu, pg) = drain(spec, &log, postmasters);
        let rate = changes as f64 / secs;
        let cpu_per_k = cpu * 1e6 / changes as f64;
        let pg_per_k = pg * 1e6 / changes as f64;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let name = Path::new(spec)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("?")
            .to_string();
        let checked = tc
            .psql(
                tdb,
                &format!("SELECT coalesce((SELECT checked FROM shadowmig.sampler_counters WHERE migration = '{name}'), 0)"),
            )
            .unwrap_or_default();
        println!(
            "drain {i} sampler {} (keys checked so far: {}): {secs:.2} s, {rate:.0} changes/s; \
             CPU per 1,000 changes: shadowmig {cpu_per_k:.2} ms, PostgreSQL {pg_per_k:.2} ms{}",
            if *sampler_on { "on " } else { "off" },
            checked.trim(),
            if text.contains("live verification: mismatch") {
                " (MISMATCH LOGGED)"
            } else {
                ""
            }
        );
        results.push((*sampler_on, rate, cpu_per_k + pg_per_k));
    }
    let ratios: Vec<f64> = results
        .chunks(2)
        .filter_map(|p| match p {
            [(a_on, a, _), (_, b, _)] => Some(if *a_on { a / b } else { b / a }),
            _ => None,
        })
        .collect();
    let by = |on: bool, f: fn(&(bool, f64, f64)) -> f64| {
        results
            .iter()
            .filter(|r| r.0 == on)
            .map(f)
            .collect::<Vec<_>>()
    };
    let (off, on) = (by(false, |r| r.1), by(true, |r| r.1));
    let (cpu_off, cpu_on) = (by(false, |r| r.2), by(true, |r| r.2));
    let min = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    println!(
        "drain: mean changes/s off {:.0}, on (default) {:.0}; per-pair ratios on/off {:?}; \
         mean ratio {:.3}, median {:.3} (spread {:.3}…{:.3}); ratio of means {:.3}; \
         CPU (shadowmig + PostgreSQL) ms per 1,000 changes off {:.2}, on {:.2} (ratio {:.3})",
        mean(&off),
        mean(&on),
        ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>(),
        mean(&ratios),
        median(&ratios),
        min,
        max,
        mean(&on) / mean(&off),
        mean(&cpu_off),
        mean(&cpu_on),
        mean(&cpu_on) / mean(&cpu_off),
    );
}

/// Waits until `log` holds a `stage changed` line with `needle`, or `timeout` passes; whether
/// it did.
fn wait_for_log(log: &Path, needle: &str, child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("stage changed") && l.contains(needle))
        {
            return true;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "run exited early ({st}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn steady_state(
    c: &TestCluster,
    db: &str,
    dir: &Path,
    rows: u64,
    specs: &[(String, bool, u16)],
    postmasters: &[u32],
) {
    let secs = env_u64("SAMPLER_BENCH_STEADY_SECS", 30);
    let rate = env_u64("SAMPLER_BENCH_RATE", 5_000).max(STEADY_ROWS_PER_TX);
    let script = dir.join("steady.sql");
    std::fs::write(
        &script,
        format!(
            "\\set id random(1, {})\nUPDATE public.bench SET v = v + 1 WHERE id BETWEEN :id AND :id + {};\n",
            rows.saturating_sub(STEADY_ROWS_PER_TX).max(1),
            STEADY_ROWS_PER_TX - 1
        ),
    )
    .expect("pgbench script");
    let pgbench_log = std::fs::File::create(dir.join("pgbench.log")).expect("pgbench log");
    let mut pgbench = Command::new(c.bindir().join("pgbench"))
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &c.port().to_string(),
            "-U",
            "postgres",
            "-c",
            "2",
            "-j",
            "1",
            "-R",
            &(rate / STEADY_ROWS_PER_TX).to_string(),
            "-T",
            "100000",
            "-f",
            script.to_str().expect("utf-8 path"),
            db,
        ])
        .stdout(Stdio::null())
        .stderr(pgbench_log)
        .spawn()
        .expect("start pgbench");
    println!(
        "steady state: pgbench writing {rate} changes/s ({} tx/s of {STEADY_ROWS_PER_TX} rows), {secs} s windows",
        rate / STEADY_ROWS_PER_TX
    );
    for (i, (spec, sampler_on, port)) in specs.iter().enumerate() {
        let log = dir.join(format!("steady_{i}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_shadowmig"))
            .args(["run", spec])
            .env("SHADOWMIG_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("run shadowmig");
        let t = Instant::now();
        let caught_up = wait_for_log(&log, "to=caught-up", &mut child, Duration::from_secs(120));
        let to_catch_up = t.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(2));
        let (m0, cpu0, pg0, t0) = (
            scrape(*port),
            process_cpu(child.id()),
            cluster_cpu(postmasters),
            Instant::now(),
        );
        std::thread::sleep(Duration::from_secs(secs));
        let (m1, cpu1, pg1, el) = (
            scrape(*port),
            process_cpu(child.id()),
            cluster_cpu(postmasters),
            t0.elapsed().as_secs_f64(),
        );
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        let applied = delta(&m0, &m1, "shadowmig_changes_applied_total");
        let lag_n = delta(&m0, &m1, "shadowmig_batch_lag_seconds_count");
        let lag_sum = delta(&m0, &m1, "shadowmig_batch_lag_seconds_sum");
        let busy = delta(&m0, &m1, "shadowmig_apply_seconds_sum");
        let checked = delta(&m0, &m1, "shadowmig_checked_total");
        let per_k = |v: f64| v * 1e6 / applied.max(1.0);
        println!(
            "steady {i} sampler {}: {} after {to_catch_up:.1} s; {:.0} changes/s applied; \
             batch lag mean {:.3} s, p50 {}, p99 {} ({lag_n:.0} batches); apply busy {:.1} ms \
             per 1,000 changes ({:.1} % of the window); CPU per 1,000 changes: shadowmig {:.1} \
             ms, PostgreSQL (pgbench's writes included) {:.1} ms; sampler checked {checked:.0} keys",
            if *sampler_on { "on " } else { "off" },
            if caught_up {
                "caught up"
            } else {
                "NOT caught up"
            },
            applied / el,
            lag_sum / lag_n.max(1.0),
            quantile(&m0, &m1, "shadowmig_batch_lag_seconds", 0.5),
            quantile(&m0, &m1, "shadowmig_batch_lag_seconds", 0.99),
            per_k(busy),
            busy * 100.0 / el,
            per_k(cpu1 - cpu0),
            per_k(pg1 - pg0),
        );
    }
    let _ = pgbench.kill();
    let _ = pgbench.wait();
}

fn main() {
    let rows = env_u64("SAMPLER_BENCH_ROWS", 100_000);
    let pairs = env_u64("SAMPLER_BENCH_PAIRS", 2).max(1);
    // SAMPLER_BENCH_PGSS=1: pg_stat_statements in both clusters, the top statements printed
    // after the steady phase (to see what the sampler's queries cost the servers).
    let pgss = env_u64("SAMPLER_BENCH_PGSS", 0) > 0;
    let config = || {
        let c = ClusterConfig::default().setting("max_replication_slots", "20");
        if pgss {
            c.setting("shared_preload_libraries", "pg_stat_statements")
                .setting("pg_stat_statements.track_planning", "on")
        } else {
            c
        }
    };
    let c = TestCluster::start(&config()).expect("start cluster");
    let db = c.create_database("sampler_bench").expect("create database");
    c.psql(
        &db,
        &format!(
            "CREATE TABLE public.bench (id bigint PRIMARY KEY, grp int NOT NULL, v int NOT NULL, pad text);
             INSERT INTO public.bench SELECT g, g % 101, 0, md5(g::text) FROM generate_series(1, {rows}) g;
             CREATE UNIQUE INDEX bench_ri ON public.bench (id, grp);
             ALTER TABLE public.bench REPLICA IDENTITY USING INDEX bench_ri;"
        ),
    )
    .expect("source");
    c.psql(&db, "VACUUM ANALYZE public.bench").expect("vacuum");
    let dir = tempfile::tempdir().expect("tempdir");
    // The shadow tables live in a second cluster, as on a separate server: in the source's
    // cluster, each drain's writes would be WAL that every later drain's slot must decode too,
    // and drains would slow down one after the other whatever their mode.
    let tc = TestCluster::start(&config()).expect("start target cluster");
    let tdb = tc
        .create_database("sampler_target")
        .expect("create target database");
    if pgss {
        c.psql(&db, "CREATE EXTENSION pg_stat_statements")
            .expect("pgss");
        tc.psql(&tdb, "CREATE EXTENSION pg_stat_statements")
            .expect("pgss");
    }
    let url = Urls {
        source: c.url(&db),
        target: tc.url(&tdb),
    };
    // Alternate which mode drains first in each pair: off on, on off, off on, …
    let drains: Vec<(String, bool)> = (0..pairs)
        .flat_map(|p| {
            let order = if p % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            order.map(|on| {
                let name = format!("d{p}_{}", if on { "on" } else { "off" });
                (write_spec(dir.path(), &name, &url, on, 0), on)
            })
        })
        .collect();
    let steady: Vec<(String, bool, u16)> = if env_u64("SAMPLER_BENCH_STEADY_SECS", 30) > 0 {
        let (off_port, on_port) = (free_port(), free_port());
        let off = write_spec(dir.path(), "st_off", &url, false, off_port);
        let on = write_spec(dir.path(), "st_on", &url, true, on_port);
        vec![
            (off.clone(), false, off_port),
            (on.clone(), true, on_port),
            (on, true, on_port),
            (off, false, off_port),
        ]
    } else {
        Vec::new()
    };
    let backfills: Vec<&String> = drains
        .iter()
        .map(|(s, _)| s)
        .chain(steady.iter().take(2).map(|(s, _, _)| s))
        .collect();
    let postmasters = [
        c.pid().expect("postmaster pid") as u32,
        tc.pid().expect("postmaster pid") as u32,
    ];
    let postmasters = &postmasters[..];
    for (i, spec) in backfills.iter().enumerate() {
        let (secs, _, _) = drain(
            spec,
            &dir.path().join(format!("backfill_{i}.log")),
            postmasters,
        );
        println!("backfill {i}: {rows} rows in {secs:.1} s");
    }
    let statements = |phase: &str| {
        if !pgss {
            return;
        }
        for (name, cl, d) in [("source", &c, &db), ("target", &tc, &tdb)] {
            println!(
                "top statements on the {name} cluster during the {phase} (ms exec + plan, calls):"
            );
            println!(
                "{}",
                cl.psql(
                    d,
                    "SELECT round((total_exec_time + total_plan_time)::numeric, 1) || ' ms, ' || calls || ' calls: ' || left(regexp_replace(query, '\\s+', ' ', 'g'), 160) \
                     FROM pg_stat_statements ORDER BY total_exec_time + total_plan_time DESC LIMIT 12"
                )
                .unwrap_or_default()
            );
            let _ = cl.psql(d, "SELECT pg_stat_statements_reset()");
        }
    };
    if pgss {
        let _ = c.psql(&db, "SELECT pg_stat_statements_reset()");
        let _ = tc.psql(&tdb, "SELECT pg_stat_statements_reset()");
    }
    backlog_drains(&c, &db, (&tc, &tdb), dir.path(), rows, &drains, postmasters);
    statements("drains");
    // The drained migrations' slots would hold the steady phase's WAL: drop them.
    for (spec, _) in &drains {
        let _ = Command::new(env!("CARGO_BIN_EXE_shadowmig"))
            .args(["abort", spec])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    if !steady.is_empty() {
        steady_state(&c, &db, dir.path(), rows, &steady, postmasters);
        statements("steady state");
    }
}

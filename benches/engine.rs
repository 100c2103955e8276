//! The engine end to end: `shadowmig run` (release binary) against native baselines, each
//! scenario measured in the same run on the same throwaway durable cluster.
//!
//! `cargo bench --bench engine -- [backfill|drain|pgbench|all]` (default `all`).
//!
//! - `backfill`: `BENCH_BACKFILL_ROWS` (default 5,000,000) orders rows; `INSERT … SELECT`
//!   (twice, before and after), native initial sync, and `run --exit-when-caught-up` for each
//!   `[copy]` setting in `BENCH_BACKFILL_CONFIGS` (default `2x50000,4x50000,2x50000@other,
//!   2x50000+defer,2x50000@other+defer`: workers x chunk_rows, `@other` for the shadow table
//!   in another database of the cluster, `+defer` for `[copy] defer_indexes`).
//! - `drain`: a backlog of `BENCH_DRAIN_CHANGES` (default 1,000,000) changes, 70 % updates by
//!   random id and 30 % inserts, in transactions of 5, then one transaction of
//!   `BENCH_DRAIN_LARGE` (default the same) changes, over a table of `BENCH_DRAIN_BASE`
//!   (default 100,000) rows; `run --exit-when-caught-up` (the shadow table in another
//!   database, then in the source database) vs `pg_recvlogical --endpos` vs a native
//!   subscription, each from the same starting point.
//! - `pgbench`: a write mix (1 insert + 2 updates by random id per transaction) for
//!   `BENCH_PGBENCH_SECS` (default 30) seconds with `-c 4 -j 2`, `BENCH_PGBENCH_REPS` (default
//!   2) rounds of: alone, pg_recvlogical reading a slot (the floor of any logical consumer),
//!   shadowmig streaming (into the source database, and into another), a mirroring trigger,
//!   native logical replication (`BENCH_PGBENCH_MODES` picks some). Each load's CPU is
//!   reported per process class ([`CpuProfile`]).
//!
//! Every result table is checked against transform(source) with a multiset checksum (row
//! count and the sum of a 60-bit md5 prefix of every row's text); a mismatch aborts the bench.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shadowmig::testpg::{ClusterConfig, TestCluster};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

/// `SHADOWMIG_LOG` for the measured runs: `BENCH_LOG`, else `default`
/// (e.g. `BENCH_LOG=info,shadowmig::apply=debug` for the apply writer's per-batch timings).
fn log_level(default: &str) -> String {
    std::env::var("BENCH_LOG").unwrap_or_else(|_| default.to_string())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shadowmig"))
}

struct Bench {
    c: TestCluster,
    dir: tempfile::TempDir,
    cfg: ClusterConfig,
    /// A second server, started the first time a mode needs it ("… other server"): the
    /// shadow table on a server of its own, whose WAL is not the source's.
    other: std::sync::OnceLock<Box<Bench>>,
}

impl Bench {
    fn new(cfg: &ClusterConfig, dir: tempfile::TempDir) -> Bench {
        Bench {
            c: TestCluster::start(cfg).expect("start cluster"),
            dir,
            cfg: cfg.clone(),
            other: std::sync::OnceLock::new(),
        }
    }

    /// The second server, on this machine like the first (same cores, same disk).
    fn other_server(&self) -> &Bench {
        self.other.get_or_init(|| {
            let dir = tempfile::tempdir_in(self.dir.path()).expect("temp dir");
            let b = Bench::new(&self.cfg, dir);
            println!("  (second server at port {})", b.c.port());
            Box::new(b)
        })
    }

    fn psql(&self, db: &str, sql: &str) -> String {
        match self.c.psql(db, sql) {
            Ok(s) => s.trim().to_string(),
            Err(e) => panic!("psql on {db} failed: {e}\nSQL: {sql}"),
        }
    }

    /// Count and order-independent checksum of the rows of `query`.
    fn checksum(&self, db: &str, query: &str) -> String {
        self.psql(
            db,
            &format!(
                "SELECT count(*) || ':' || coalesce(sum(('x' || substr(md5(x::text), 1, 15))::bit(60)::bigint), 0) \
                 FROM ({query}) x"
            ),
        )
    }

    /// With `BENCH_STATEMENTS=1` (and `BENCH_PG_SETTINGS=shared_preload_libraries=pg_stat_statements`):
    /// clears pg_stat_statements before a measured run.
    fn stmts_reset(&self, db: &str) {
        if std::env::var_os("BENCH_STATEMENTS").is_some() {
            self.psql(
                db,
                "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()",
            );
        }
    }

    /// With `BENCH_STATEMENTS=1`: the statements that took the most server time since
    /// [`Bench::stmts_reset`] (where the time of a measured run went, server side).
    fn stmts_report(&self, db: &str) {
        if std::env::var_os("BENCH_STATEMENTS").is_some() {
            let out = self.psql(
                db,
                "SELECT lpad(round(total_exec_time)::text, 8) || ' ms | ' || lpad(calls::text, 7) || ' calls | ' \
                        || lpad(rows::text, 9) || ' rows | ' || left(regexp_replace(query, '\\s+', ' ', 'g'), 120) \
                 FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12",
            );
            for l in out.lines() {
                println!("    stmt: {l}");
            }
        }
    }

    /// What the slot's walsender spilled to disk and decoded in all, so far
    /// (`pg_stat_replication_slots`): transactions larger than `logical_decoding_work_mem`
    /// are spilled, and a migration's own writes in the source database are decoded too.
    fn slot_stats(&self, db: &str, slot: &str) -> String {
        self.psql(
            db,
            &format!(
                "SELECT 'spilled ' || spill_txns || ' txns / ' || pg_size_pretty(spill_bytes) \
                        || ', decoded ' || total_txns || ' txns / ' || pg_size_pretty(total_bytes) \
                 FROM pg_stat_replication_slots WHERE slot_name = '{slot}'"
            ),
        )
    }

    fn checkpoint(&self, db: &str) {
        self.psql(db, "CHECKPOINT");
    }

    fn lsn(&self, db: &str) -> String {
        self.psql(db, "SELECT pg_current_wal_insert_lsn()")
    }

    fn conninfo(&self, db: &str) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            self.c.host(),
            self.c.port(),
            self.c.superuser(),
            db
        )
    }

    /// The bench's migration spec, with the shadow table in the source database `db`, or in
    /// `target_db` of the same cluster (where PostgreSQL 15's walsender skips our own writes
    /// instead of decoding them: see BENCHMARKS "engine"), and `[copy] defer_indexes = defer`.
    fn write_spec(
        &self,
        name: &str,
        db: &str,
        target_db: Option<&str>,
        workers: u32,
        chunk_rows: u64,
        defer: bool,
    ) -> PathBuf {
        let url = target_db.map(|t| self.c.url(t));
        self.write_spec_to(name, db, url, workers, chunk_rows, defer)
    }

    /// [`Bench::write_spec`] with the shadow table at `target_url` (any server).
    fn write_spec_to(
        &self,
        name: &str,
        db: &str,
        target_url: Option<String>,
        workers: u32,
        chunk_rows: u64,
        defer: bool,
    ) -> PathBuf {
        let target_url = target_url
            .map(|u| format!("url = \"{u}\"\n"))
            .unwrap_or_default();
        let spec = format!(
            r#"name = "{name}"
[source]
url = "{url}"
table = "public.orders"
[target]
{target_url}table = "public.orders_v2"
create = """{target}"""
[transform]
total_amount_minor = "total_amount::bigint"
currency = "'USD'"
[copy]
chunk_rows = {chunk_rows}
workers = {workers}
defer_indexes = {defer}
[throttle]
max_lag_bytes = {max_lag}
"#,
            max_lag = env_u64("BENCH_MAX_LAG_BYTES", 1 << 40),
            url = self.c.url(db),
            target = common::ORDERS_TARGET
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, spec).expect("write spec");
        path
    }

    fn abort(&self, spec: &Path) {
        let out = Command::new(bin())
            .args(["abort", spec.to_str().expect("utf-8 path")])
            .env("SHADOWMIG_LOG", "warn")
            .output()
            .expect("run shadowmig abort");
        assert!(
            out.status.success(),
            "abort failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The source table: the tests' orders shape, filled in bulk, with the keys built after
    /// the load; 2 % of the notes are TOASTed (2,560 bytes, storage external).
    fn make_orders(&self, db: &str, rows: u64) {
        let t = Instant::now();
        self.psql(
            db,
            &format!(
                "CREATE SEQUENCE public.orders_id_seq;
                 CREATE TABLE public.orders (
                     id bigint NOT NULL DEFAULT nextval('public.orders_id_seq'),
                     customer_id bigint NOT NULL,
                     total_amount integer,
                     status text NOT NULL DEFAULT 'new',
                     note text,
                     created_at timestamptz NOT NULL DEFAULT now());
                 ALTER SEQUENCE public.orders_id_seq OWNED BY public.orders.id;
                 ALTER TABLE public.orders ALTER COLUMN note SET STORAGE EXTERNAL;
                 INSERT INTO public.orders (id, customer_id, total_amount, status, note, created_at)
                 SELECT i, 1 + (i * 7919) % 10007, ((i * 37) % 100000)::int, (ARRAY['new','paid','shipped'])[(1 + i % 3)::int],
                        CASE WHEN i % 50 = 0 THEN repeat(md5(i::text), 80) WHEN i % 10 = 1 THEN NULL ELSE 'n' || i END,
                        '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 second'
                 FROM generate_series(1::bigint, {rows}) AS i;
                 SELECT setval('public.orders_id_seq', {rows});
                 ALTER TABLE public.orders ADD PRIMARY KEY (id);
                 CREATE UNIQUE INDEX orders_id_customer ON public.orders (id, customer_id);
                 ALTER TABLE public.orders REPLICA IDENTITY USING INDEX orders_id_customer;"
            ),
        );
        self.psql(db, "VACUUM ANALYZE public.orders");
        self.checkpoint(db);
        println!(
            "  generated {rows} orders rows in {:.1} s (size {})",
            t.elapsed().as_secs_f64(),
            self.psql(
                db,
                "SELECT pg_size_pretty(pg_total_relation_size('public.orders'))"
            )
        );
    }

    /// A database holding a table native logical replication can fill: same name and column
    /// types as the source (native LR cannot transform), but the target's key
    /// (customer_id, id) and its hash partitioning.
    fn make_native_target(&self, prefix: &str) -> String {
        let db = self.c.create_database(prefix).expect("create database");
        self.psql(
            &db,
            "CREATE TABLE public.orders (
                 id bigint NOT NULL,
                 customer_id bigint NOT NULL,
                 total_amount integer,
                 status text NOT NULL,
                 note text,
                 created_at timestamptz NOT NULL,
                 PRIMARY KEY (customer_id, id)
             ) PARTITION BY HASH (customer_id);
             CREATE TABLE public.orders_p0 PARTITION OF public.orders FOR VALUES WITH (MODULUS 4, REMAINDER 0);
             CREATE TABLE public.orders_p1 PARTITION OF public.orders FOR VALUES WITH (MODULUS 4, REMAINDER 1);
             CREATE TABLE public.orders_p2 PARTITION OF public.orders FOR VALUES WITH (MODULUS 4, REMAINDER 2);
             CREATE TABLE public.orders_p3 PARTITION OF public.orders FOR VALUES WITH (MODULUS 4, REMAINDER 3);",
        );
        db
    }

    /// Publication + slot on `src`, subscription in `dst` (slot made beforehand: creating it
    /// from CREATE SUBSCRIPTION in the same cluster would wait for itself).
    fn native_subscribe(&self, src: &str, dst: &str, name: &str, copy_data: bool, enabled: bool) {
        self.native_subscribe_on(self, src, dst, name, copy_data, enabled)
    }

    /// [`Bench::native_subscribe`] with the subscription in `dst` on the server of `on`.
    fn native_subscribe_on(
        &self,
        on: &Bench,
        src: &str,
        dst: &str,
        name: &str,
        copy_data: bool,
        enabled: bool,
    ) {
        self.psql(
            src,
            &format!("CREATE PUBLICATION {name} FOR TABLE public.orders"),
        );
        self.psql(
            src,
            &format!("SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')"),
        );
        on.psql(
            dst,
            &format!(
                "CREATE SUBSCRIPTION {name} CONNECTION '{}' PUBLICATION {name} \
                 WITH (create_slot = false, slot_name = '{name}', copy_data = {copy_data}, \
                 enabled = {enabled}, binary = true, streaming = on)",
                self.conninfo(src)
            ),
        );
    }

    fn native_wait_ready(&self, dst: &str, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let n = self.psql(
                dst,
                &format!(
                    "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid \
                     WHERE s.subname = '{name}' AND r.srsubstate <> 'r'"
                ),
            );
            let any = self.psql(
                dst,
                &format!(
                    "SELECT count(*) FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid \
                     WHERE s.subname = '{name}'"
                ),
            );
            if n == "0" && any != "0" {
                return;
            }
            assert!(Instant::now() < deadline, "native sync never finished");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the subscription's apply worker has received and applied everything
    /// up to `lsn`: its walsender's `write_lsn` (the worker applies each message as it reads
    /// it and reports its last received position, which a keepalive moves past the last
    /// record once it is caught up). `latest_end_lsn` on the subscriber lags by seconds.
    fn native_wait_lsn(&self, _dst: &str, name: &str, lsn: &str) {
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let r = self.psql(
                "postgres",
                &format!(
                    "SELECT coalesce(bool_or(write_lsn >= '{lsn}'), false) FROM pg_stat_replication \
                     WHERE application_name = '{name}'"
                ),
            );
            if r == "t" {
                return;
            }
            assert!(Instant::now() < deadline, "native apply never caught up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn native_disable(&self, src: &str, dst: &str, name: &str) {
        self.native_disable_on(self, src, dst, name)
    }

    /// [`Bench::native_disable`] of a subscription on the server of `on`.
    fn native_disable_on(&self, on: &Bench, src: &str, dst: &str, name: &str) {
        on.psql(dst, &format!("ALTER SUBSCRIPTION {name} DISABLE"));
        // The slot must be free again before the next phase starts from it.
        loop {
            let active = self.psql(
                src,
                &format!("SELECT active FROM pg_replication_slots WHERE slot_name = '{name}'"),
            );
            if active == "f" {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn native_drop(&self, src: &str, dst: &str, name: &str) {
        self.native_drop_on(self, src, dst, name)
    }

    /// [`Bench::native_drop`] of a subscription on the server of `on`.
    fn native_drop_on(&self, on: &Bench, src: &str, dst: &str, name: &str) {
        self.native_disable_on(on, src, dst, name);
        on.psql(
            dst,
            &format!("ALTER SUBSCRIPTION {name} SET (slot_name = NONE); DROP SUBSCRIPTION {name}"),
        );
        self.psql(
            src,
            &format!("SELECT pg_drop_replication_slot('{name}'); DROP PUBLICATION {name}"),
        );
    }

    /// CPU seconds the bench's cluster has used so far (see [`cluster_cpu`]).
    fn server_cpu(&self) -> f64 {
        self.c.pid().map_or(0.0, cluster_cpu)
    }

    /// A pg_recvlogical command reading `slot` with pgoutput `options`, output discarded.
    fn recvlogical_cmd(&self, db: &str, slot: &str, options: &[&str]) -> Command {
        let mut cmd = Command::new(self.c.bindir().join("pg_recvlogical"));
        cmd.args([
            "-h",
            self.c.host(),
            "-p",
            &self.c.port().to_string(),
            "-U",
            self.c.superuser(),
        ])
        .args(["-d", db, "--slot", slot, "--start", "--no-loop"])
        .args(["-f", "/dev/null"]);
        for o in options {
            cmd.args(["-o", o]);
        }
        cmd
    }

    /// pg_recvlogical from `slot` to `end`, output discarded; seconds.
    fn recvlogical(&self, db: &str, slot: &str, end: &str, options: &[&str]) -> f64 {
        let mut cmd = self.recvlogical_cmd(db, slot, options);
        cmd.args(["--endpos", end]);
        let t = Instant::now();
        let out = cmd.output().expect("run pg_recvlogical");
        let secs = t.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "pg_recvlogical failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        secs
    }

    fn create_slot(&self, db: &str, slot: &str) {
        self.psql(
            db,
            &format!("SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"),
        );
    }

    fn drop_slot(&self, db: &str, slot: &str) {
        self.psql(db, &format!("SELECT pg_drop_replication_slot('{slot}')"));
    }
}

/// A `shadowmig run` child being watched: its peak RSS comes from `wait4`'s rusage, and the
/// time of its "backfill done" log line from polling its log file.
struct Watched {
    pid: i32,
    started: Instant,
    waiter: JoinHandle<(i32, i64, f64)>,
    log: PathBuf,
}

struct RunResult {
    secs: f64,
    backfill_secs: Option<f64>,
    peak_rss_mib: f64,
    /// User + system CPU seconds of the `run` process.
    cpu_secs: f64,
}

fn tv_secs(t: libc::timeval) -> f64 {
    t.tv_sec as f64 + t.tv_usec as f64 / 1e6
}

/// CPU seconds (user + system) of this process's waited-for children so far.
fn children_cpu() -> f64 {
    // SAFETY: plain libc call filling a plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    tv_secs(ru.ru_utime) + tv_secs(ru.ru_stime)
}

/// Fields of `/proc/PID/stat` after the parenthesised command name (which may hold spaces):
/// `[0]` is field 3 (state), `[1]` ppid, `[11]..[14]` utime, stime, cutime, cstime (ticks).
fn proc_stat(pid: &str) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(rest.split(' ').map(|f| f.parse().unwrap_or(0)).collect())
}

fn clock_ticks() -> f64 {
    // SAFETY: plain libc call.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// CPU ticks (user + system) of every live child of `postmaster`, by pid.
fn child_ticks(postmaster: i32) -> HashMap<i32, u64> {
    let mut out = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let (Some(f), Ok(pid)) = (proc_stat(&name), name.parse::<i32>()) {
                if f[1] == postmaster as u64 {
                    out.insert(pid, f[11] + f[12]);
                }
            }
        }
    }
    out
}

/// CPU seconds (user + system) of one live process, 0 once it is gone.
fn pid_cpu(pid: i32) -> f64 {
    proc_stat(&pid.to_string()).map_or(0.0, |f| (f[11] + f[12]) as f64 / clock_ticks())
}

/// CPU seconds used so far by a PostgreSQL cluster: the postmaster, its exited children
/// (reaped by it: `cutime`/`cstime`) and its live ones (walsenders, backends, checkpointer…).
fn cluster_cpu(postmaster: i32) -> f64 {
    let mut ticks: u64 = child_ticks(postmaster).values().sum();
    if let Some(f) = proc_stat(&postmaster.to_string()) {
        ticks += f[11] + f[12] + f[13] + f[14];
    }
    ticks as f64 / clock_ticks()
}

/// Where a stretch of load spent the CPU: the cluster's processes by what they are
/// (`pg_stat_activity`: walsenders and client backends by `application_name`, background
/// processes by type), the rest of the cluster (processes that exited meanwhile, such as
/// pgbench's backends), and client processes measured by the caller.
struct CpuProfile {
    postmaster: i32,
    start_cluster: f64,
    start: HashMap<i32, u64>,
    started: Instant,
    wal: [f64; 4],
}

/// The cluster's `pg_stat_wal` counters: records, full-page images, bytes, syncs.
fn wal_counters(b: &Bench) -> [f64; 4] {
    let row = b.psql(
        "postgres",
        "SELECT concat_ws(' ', wal_records, wal_fpi, wal_bytes, wal_sync) FROM pg_stat_wal",
    );
    let mut out = [0.0; 4];
    for (o, v) in out.iter_mut().zip(row.split_whitespace()) {
        *o = v.parse().unwrap_or(0.0);
    }
    out
}

impl CpuProfile {
    fn start(b: &Bench) -> CpuProfile {
        let postmaster = b.c.pid().unwrap_or(0);
        CpuProfile {
            postmaster,
            start_cluster: cluster_cpu(postmaster),
            start: child_ticks(postmaster),
            started: Instant::now(),
            wal: wal_counters(b),
        }
    }

    /// One line: CPU seconds per class over the stretch, and the share of the machine's
    /// cores each took. `clients` are (name, CPU seconds) measured by the caller.
    fn report(self, b: &Bench, db: &str, clients: &[(&str, f64)]) -> String {
        let wall = self.started.elapsed().as_secs_f64();
        let hz = clock_ticks();
        let classes: HashMap<i32, String> = b
            .psql(
                db,
                "SELECT string_agg(pid || '=' || CASE WHEN backend_type IN ('client backend', 'walsender') \
                 THEN backend_type || ' ' || coalesce(nullif(application_name, ''), '?') \
                 ELSE backend_type END, ';') FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
            )
            .split(';')
            .filter_map(|kv| {
                let (p, c) = kv.split_once('=')?;
                Some((p.parse().ok()?, c.replace("client backend ", "")))
            })
            .collect();
        let now = child_ticks(self.postmaster);
        let mut by: BTreeMap<String, f64> = BTreeMap::new();
        // Processes no longer in pg_stat_activity (pgbench's backends, exiting or reaped)
        // are what the load itself cost the server.
        let mut classified = 0.0;
        for (pid, t) in &now {
            if let Some(class) = classes.get(pid) {
                let d = t.saturating_sub(self.start.get(pid).copied().unwrap_or(0)) as f64 / hz;
                classified += d;
                *by.entry(class.clone()).or_default() += d;
            }
        }
        let total = cluster_cpu(self.postmaster) - self.start_cluster;
        by.insert("pgbench backends".into(), (total - classified).max(0.0));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as f64;
        let mut parts: Vec<String> = by
            .iter()
            .filter(|(_, &v)| v >= 0.05)
            .map(|(k, v)| format!("{k} {v:.1} s"))
            .collect();
        for (k, v) in clients {
            parts.push(format!("client {k} {v:.1} s"));
        }
        let all = total + clients.iter().map(|c| c.1).sum::<f64>();
        let w = wal_counters(b);
        let d: Vec<f64> = w.iter().zip(self.wal).map(|(a, z)| a - z).collect();
        format!(
            "CPU over {wall:.1} s ({:.0} % of {cores} cores): {}\n    WAL: {:.0} records, {:.0} full-page images, {:.1} MiB, {:.0} syncs",
            100.0 * all / (wall * cores),
            parts.join(", "),
            d[0],
            d[1],
            d[2] / 1048576.0,
            d[3]
        )
    }
}

fn spawn_run(spec: &Path, log: &Path, exit_when_caught_up: bool, level: &str) -> Watched {
    let f = std::fs::File::create(log).expect("log file");
    let mut cmd = Command::new(bin());
    cmd.args(["run", spec.to_str().expect("utf-8 path")]);
    if exit_when_caught_up {
        cmd.arg("--exit-when-caught-up");
    }
    let started = Instant::now();
    let child = cmd
        .env("SHADOWMIG_LOG", level)
        .stdout(Stdio::null())
        .stderr(f)
        .spawn()
        .expect("spawn shadowmig run");
    let pid = child.id() as i32;
    // The child is reaped by wait4 below, never through `child`.
    std::mem::forget(child);
    let waiter = std::thread::spawn(move || {
        let mut status = 0i32;
        // SAFETY: plain libc call on our own child; rusage is a plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        assert_eq!(r, pid, "wait4");
        (
            status,
            ru.ru_maxrss,
            tv_secs(ru.ru_utime) + tv_secs(ru.ru_stime),
        )
    });
    Watched {
        pid,
        started,
        waiter,
        log: log.to_path_buf(),
    }
}

impl Watched {
    fn finish(self) -> RunResult {
        let mut backfill = None;
        let mut pos = 0u64;
        let mut tail = String::new();
        loop {
            let done = self.waiter.is_finished();
            if backfill.is_none() {
                if let Ok(mut f) = std::fs::File::open(&self.log) {
                    if f.seek(SeekFrom::Start(pos)).is_ok() {
                        let mut buf = String::new();
                        if let Ok(n) = f.read_to_string(&mut buf) {
                            pos += n as u64;
                            tail.push_str(&buf);
                            if tail.contains("backfill done") {
                                backfill = Some(self.started.elapsed().as_secs_f64());
                            }
                            if let Some(i) = tail.rfind('\n') {
                                tail.drain(..=i);
                            }
                        }
                    }
                }
            }
            if done {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let secs = self.started.elapsed().as_secs_f64();
        let (status, maxrss_kib, cpu_secs) = self.waiter.join().expect("waiter");
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let last: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "shadowmig run failed (wait status {status}); last log lines:\n{}",
                last.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        RunResult {
            secs,
            backfill_secs: backfill,
            peak_rss_mib: maxrss_kib as f64 / 1024.0,
            cpu_secs,
        }
    }

    fn terminate(self) -> RunResult {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
        }
        self.finish()
    }
}

fn expect_equal(what: &str, expected: &str, actual: &str) {
    assert_eq!(
        expected, actual,
        "{what}: result differs from transform(source) (count:checksum)"
    );
    println!("  {what}: verified equal ({expected})");
}

const EXPECTED_NATIVE: &str =
    "SELECT customer_id, id, total_amount::bigint AS total_amount_minor, \
     'USD'::text AS currency, status, note, created_at FROM public.orders";

fn backfill(b: &Bench) {
    let rows = env_u64("BENCH_BACKFILL_ROWS", 5_000_000);
    // `<workers>x<chunk_rows>`, then `@other` for the shadow table in another database and
    // `+defer` for `[copy] defer_indexes`, in either order.
    let configs: Vec<(u32, u64, bool, bool)> = std::env::var("BENCH_BACKFILL_CONFIGS")
        .unwrap_or_else(|_| {
            "2x50000,4x50000,2x50000@other,2x50000+defer,2x50000@other+defer".into()
        })
        .split(',')
        .filter_map(|s| {
            let s = s.trim();
            let (other, defer) = (s.contains("@other"), s.contains("+defer"));
            let s = s.split(['@', '+']).next()?;
            let (w, c) = s.split_once('x')?;
            Some((w.parse().ok()?, c.parse().ok()?, other, defer))
        })
        .collect();
    println!("== backfill: {rows} rows (load {})", loadavg());
    let db = b.c.create_database("bf").expect("database");
    b.make_orders(&db, rows);
    let expected = b.checksum(&db, common::ORDERS_EXPECTED);

    let insert_select = |round: u32| -> f64 {
        b.psql(&db, common::ORDERS_TARGET);
        b.checkpoint(&db);
        let load = loadavg();
        let t = Instant::now();
        b.psql(
            &db,
            "INSERT INTO public.orders_v2 (customer_id, id, total_amount_minor, currency, status, note, created_at) \
             SELECT customer_id, id, total_amount::bigint, 'USD', status, note, created_at FROM public.orders",
        );
        let secs = t.elapsed().as_secs_f64();
        println!(
            "  INSERT … SELECT #{round}: {secs:.2} s, {:.0} rows/s (load {load})",
            rows as f64 / secs
        );
        expect_equal(
            "INSERT … SELECT",
            &expected,
            &b.checksum(&db, common::ORDERS_ACTUAL),
        );
        b.psql(&db, "DROP TABLE public.orders_v2");
        b.checkpoint(&db);
        secs
    };
    let is1 = insert_select(1);

    // Native initial sync.
    let ndb = b.make_native_target("bf_native");
    b.checkpoint(&db);
    let load = loadavg();
    let t = Instant::now();
    b.native_subscribe(&db, &ndb, "bf_native", true, true);
    b.native_wait_ready(&ndb, "bf_native");
    let native_secs = t.elapsed().as_secs_f64();
    println!(
        "  native initial sync: {native_secs:.2} s, {:.0} rows/s (load {load})",
        rows as f64 / native_secs
    );
    expect_equal(
        "native initial sync",
        &expected,
        &b.checksum(&ndb, EXPECTED_NATIVE),
    );
    b.native_drop(&db, &ndb, "bf_native");
    b.psql("postgres", &format!("DROP DATABASE \"{ndb}\""));
    b.checkpoint(&db);

    let mut ours = Vec::new();
    for (workers, chunk, other, defer) in &configs {
        let name = format!(
            "bf_w{workers}_c{chunk}{}{}",
            if *other { "_other" } else { "" },
            if *defer { "_defer" } else { "" }
        );
        let tdb = if *other {
            b.c.create_database("bf_other").expect("database")
        } else {
            db.clone()
        };
        let spec = b.write_spec(
            &name,
            &db,
            other.then_some(tdb.as_str()),
            *workers,
            *chunk,
            *defer,
        );
        let log = b.dir.path().join(format!("{name}.log"));
        b.checkpoint(&db);
        b.stmts_reset(&db);
        let load = loadavg();
        let r = spawn_run(&spec, &log, true, &log_level("info")).finish();
        b.stmts_report(&db);
        let bf = r.backfill_secs.unwrap_or(r.secs);
        let place = format!(
            "{}{}",
            if *other {
                ", target in another database"
            } else {
                ""
            },
            if *defer { ", constraints deferred" } else { "" }
        );
        println!(
            "  shadowmig workers={workers} chunk_rows={chunk}{place}: {:.2} s to exit ({:.0} rows/s), backfill done at {:.2} s ({:.0} rows/s), peak RSS {:.1} MiB (load {load})",
            r.secs,
            rows as f64 / r.secs,
            bf,
            rows as f64 / bf,
            r.peak_rss_mib
        );
        expect_equal(
            &format!("shadowmig {workers}x{chunk}{place}"),
            &expected,
            &b.checksum(&tdb, common::ORDERS_ACTUAL),
        );
        b.abort(&spec);
        if *other {
            b.psql("postgres", &format!("DROP DATABASE \"{tdb}\""));
        }
        ours.push((*workers, *chunk, *other, *defer, r));
    }
    let is2 = insert_select(2);

    let is_rate = rows as f64 / ((is1 + is2) / 2.0);
    let native_rate = rows as f64 / native_secs;
    println!("  --- backfill summary ({rows} rows) ---");
    println!("  INSERT … SELECT mean of 2: {is_rate:.0} rows/s; native initial sync {native_rate:.0} rows/s");
    for (w, ch, other, defer, r) in &ours {
        let rate = rows as f64 / r.secs;
        let place = format!(
            "{}{}",
            if *other { "@other" } else { "" },
            if *defer { "+defer" } else { "" }
        );
        println!(
            "  shadowmig {w}x{ch}{place}: {rate:.0} rows/s wall = {:.2}x INSERT…SELECT, {:.2}x native; peak RSS {:.1} MiB",
            rate / is_rate,
            rate / native_rate,
            r.peak_rss_mib
        );
    }
    for place in [false, true] {
        let Some((w, ch, _, defer, r)) = ours
            .iter()
            .filter(|o| o.2 == place)
            .min_by(|a, b| a.4.secs.partial_cmp(&b.4.secs).expect("finite"))
        else {
            continue;
        };
        let rate = rows as f64 / r.secs;
        let place = format!(
            "target in {}{}",
            if place {
                "another database"
            } else {
                "the source database"
            },
            if *defer { ", constraints deferred" } else { "" }
        );
        println!(
            "  best, {place}: workers={w} chunk_rows={ch}: {rate:.0} rows/s = {:.2}x INSERT…SELECT (target 1.2x), {:.2}x native initial sync (target 2x)",
            rate / is_rate,
            rate / native_rate
        );
    }
    b.psql("postgres", &format!("DROP DATABASE \"{db}\""));
}

fn backlog_small_sql(changes: u64, base: u64) -> String {
    let txns = changes / 5;
    // Per transaction of 5 changes: on average 3.5 updates and 1.5 inserts (alternating 3+2
    // and 4+1), i.e. 70 % / 30 %.
    format!(
        "DO $$
         DECLARE k int; r bigint;
         BEGIN
           PERFORM set_config('synchronous_commit', 'off', false);
           FOR t IN 1..{txns} LOOP
             k := CASE WHEN t % 2 = 0 THEN 3 ELSE 4 END;
             FOR j IN 1..k LOOP
               -- The id in a variable: `id = <volatile expression>` would scan the table.
               r := 1 + floor(random() * {base})::bigint;
               UPDATE public.orders SET status = 'u', total_amount = total_amount + 1 WHERE id = r;
             END LOOP;
             FOR j IN 1..5 - k LOOP
               INSERT INTO public.orders (customer_id, total_amount, status, note)
               VALUES (1 + floor(random() * 10007)::bigint, floor(random() * 100000)::int, 'new', 'b' || t);
             END LOOP;
             COMMIT;
           END LOOP;
         END $$;"
    )
}

fn backlog_large_sql(changes: u64, base: u64) -> String {
    let updates = changes * 7 / 10;
    let inserts = changes - updates;
    let passes = updates / base;
    let rest = updates % base;
    let mut sql = String::from("BEGIN;\n");
    for _ in 0..passes {
        sql.push_str(
            "UPDATE public.orders SET total_amount = total_amount + 1, status = 'L' WHERE id <= ",
        );
        sql.push_str(&format!("{base};\n"));
    }
    if rest > 0 {
        sql.push_str(&format!(
            "UPDATE public.orders SET total_amount = total_amount + 1, status = 'L' WHERE id <= {rest};\n"
        ));
    }
    sql.push_str(&format!(
        "INSERT INTO public.orders (customer_id, total_amount, status, note) \
         SELECT 1 + (i * 31) % 10007, i % 100000, 'new', 'L' || i FROM generate_series(1, {inserts}) i;\nCOMMIT;"
    ));
    sql
}

fn drain(b: &Bench) {
    let changes = env_u64("BENCH_DRAIN_CHANGES", 1_000_000);
    let large = env_u64("BENCH_DRAIN_LARGE", changes);
    let base = env_u64("BENCH_DRAIN_BASE", 100_000);
    println!(
        "== drain: {changes} changes in small transactions, {large} in one (base {base} rows; load {})",
        loadavg()
    );
    let db = b.c.create_database("dr").expect("database");
    b.make_orders(&db, base);
    let ndb = b.make_native_target("dr_native");
    b.native_subscribe(&db, &ndb, "dr_native", true, true);
    b.native_wait_ready(&ndb, "dr_native");
    // Two shadowmig contenders: the shadow table in another database of the cluster (as
    // native replication's target must be) and in the source database itself, where
    // PostgreSQL 15's walsender also decodes shadowmig's own writes.
    let xdb = b.c.create_database("dr_x").expect("database");
    let contenders: Vec<(&str, String, PathBuf, String)> = vec![
        (
            "shadowmig, target in another database",
            "drx".to_string(),
            b.write_spec("drx", &db, Some(&xdb), 2, 50_000, false),
            xdb.clone(),
        ),
        (
            "shadowmig, target in the source database",
            "dr".to_string(),
            b.write_spec("dr", &db, None, 2, 50_000, false),
            db.clone(),
        ),
    ];
    for (cname, name, spec, _) in &contenders {
        let r = spawn_run(
            spec,
            &b.dir.path().join(format!("{name}_setup.log")),
            true,
            "info",
        )
        .finish();
        println!(
            "  initial backfill of {base} rows by {cname}: {:.2} s",
            r.secs
        );
    }
    let pub_opt = "publication_names=shadowmig_dr".to_string();

    let phases: Vec<(&str, String, u64)> = vec![
        (
            "small transactions (5 changes)",
            backlog_small_sql(changes, base),
            changes,
        ),
        (
            "one large transaction",
            backlog_large_sql(large, base),
            large,
        ),
    ];
    for (pi, (label, sql, n)) in phases.into_iter().enumerate() {
        if n == 0 {
            continue;
        }
        // Everyone starts the phase caught up (earlier phases wrote WAL of their own).
        for (_, name, spec, _) in &contenders {
            spawn_run(
                spec,
                &b.dir.path().join(format!("{name}_pre{pi}.log")),
                true,
                "info",
            )
            .finish();
        }
        let now = b.lsn(&db);
        b.native_wait_lsn(&ndb, "dr_native", &now);
        b.native_disable(&db, &ndb, "dr_native");
        let variants: Vec<(&str, Vec<&str>)> = vec![
            ("p1 binary", vec!["proto_version=1", "binary=true"]),
            ("p1 text", vec!["proto_version=1"]),
            (
                "p2 binary streaming",
                vec!["proto_version=2", "binary=true", "streaming=on"],
            ),
        ];
        let slots: Vec<String> = (0..variants.len())
            .map(|i| format!("dr_recv_{pi}_{i}"))
            .collect();
        for s in &slots {
            b.create_slot(&db, s);
        }
        // A second slot for the repeated reference run (same options as the first).
        let again = format!("dr_recv_{pi}_again");
        b.create_slot(&db, &again);
        let t = Instant::now();
        b.psql(&db, &sql);
        let end = b.lsn(&db);
        println!(
            "  -- {label}: generated {n} changes in {:.1} s, end LSN {end} (load {})",
            t.elapsed().as_secs_f64(),
            loadavg()
        );
        b.checkpoint(&db);
        let mut recv = Vec::new();
        for ((vname, opts), slot) in variants.iter().zip(&slots) {
            let mut o = opts.clone();
            o.push(&pub_opt);
            let load = loadavg();
            let (srv, cli) = (b.server_cpu(), children_cpu());
            let secs = b.recvlogical(&db, slot, &end, &o);
            let (srv, cli) = (b.server_cpu() - srv, children_cpu() - cli);
            println!(
                "  pg_recvlogical ({vname}): {secs:.2} s, {:.0} changes/s (load {load}; CPU: server {srv:.2} s, client {cli:.2} s; {})",
                n as f64 / secs,
                b.slot_stats(&db, slot)
            );
            recv.push((vname.to_string(), secs));
        }
        // The other-database contender first: the source database's contender writes WAL
        // into the source database, which any slot of it that starts earlier must decode.
        let mut ours = Vec::new();
        for (cname, name, spec, tdb) in &contenders {
            b.stmts_reset(tdb);
            // Every writing contender starts right after a checkpoint: none pays for another's
            // dirty pages, nor meets a checkpoint the WAL volume of the one before triggered.
            b.checkpoint(&db);
            let load = loadavg();
            let srv = b.server_cpu();
            let r = spawn_run(
                spec,
                &b.dir.path().join(format!("{name}_{pi}.log")),
                true,
                &log_level("info"),
            )
            .finish();
            let srv = b.server_cpu() - srv;
            b.stmts_report(tdb);
            println!(
                "  {cname}: run --exit-when-caught-up {:.2} s, {:.0} changes/s, peak RSS {:.1} MiB (load {load}; CPU: server {srv:.2} s, shadowmig {:.2} s; slot so far: {})",
                r.secs,
                n as f64 / r.secs,
                r.peak_rss_mib,
                r.cpu_secs,
                b.slot_stats(&db, &format!("shadowmig_{name}"))
            );
            ours.push(r);
        }
        b.checkpoint(&db);
        let load = loadavg();
        let srv = b.server_cpu();
        let t = Instant::now();
        b.psql(&ndb, "ALTER SUBSCRIPTION dr_native ENABLE");
        b.native_wait_lsn(&ndb, "dr_native", &end);
        let native_secs = t.elapsed().as_secs_f64();
        let srv = b.server_cpu() - srv;
        println!(
            "  native subscription (binary, streaming=on): {native_secs:.2} s, {:.0} changes/s (load {load}; CPU: server {srv:.2} s)",
            n as f64 / native_secs
        );
        let mut o = variants[0].1.clone();
        o.push(&pub_opt);
        let load = loadavg();
        let secs2 = b.recvlogical(&db, &again, &end, &o);
        println!(
            "  pg_recvlogical (p1 binary, again): {secs2:.2} s, {:.0} changes/s (load {load})",
            n as f64 / secs2
        );
        for s in slots.iter().chain(std::iter::once(&again)) {
            b.drop_slot(&db, s);
        }
        let expected = b.checksum(&db, common::ORDERS_EXPECTED);
        for (cname, _, _, tdb) in &contenders {
            expect_equal(cname, &expected, &b.checksum(tdb, common::ORDERS_ACTUAL));
        }
        expect_equal(
            "native drain",
            &expected,
            &b.checksum(&ndb, EXPECTED_NATIVE),
        );
        let ref_rate = n as f64 / ((recv[0].1 + secs2) / 2.0);
        let native_rate = n as f64 / native_secs;
        println!("  --- drain summary, {label}, {n} changes ---");
        println!(
            "  pg_recvlogical p1 binary (mean of 2) {ref_rate:.0}/s; native {native_rate:.0}/s"
        );
        for (vname, secs) in &recv {
            println!("  pg_recvlogical {vname}: {:.0}/s", n as f64 / secs);
        }
        for ((cname, ..), r) in contenders.iter().zip(&ours) {
            let rate = n as f64 / r.secs;
            println!(
                "  {cname}: {rate:.0}/s; ratio to pg_recvlogical = {:.2} (target 0.9); to native = {:.2} (target > 1); peak RSS {:.1} MiB",
                rate / ref_rate,
                rate / native_rate,
                r.peak_rss_mib
            );
        }
    }
    b.native_drop(&db, &ndb, "dr_native");
    for (_, _, spec, _) in &contenders {
        b.abort(spec);
    }
    b.psql("postgres", &format!("DROP DATABASE \"{xdb}\""));
    b.psql("postgres", &format!("DROP DATABASE \"{ndb}\""));
    b.psql("postgres", &format!("DROP DATABASE \"{db}\""));
}

fn pgbench_run(b: &Bench, db: &str, script: &Path, secs: u64) -> f64 {
    let out = Command::new(b.c.bindir().join("pgbench"))
        .args([
            "-h",
            b.c.host(),
            "-p",
            &b.c.port().to_string(),
            "-U",
            b.c.superuser(),
        ])
        .args(["-n", "-c", "4", "-j", "2", "-T", &secs.to_string(), "-f"])
        .arg(script)
        .arg(db)
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok());
    match tps {
        Some(t) => t,
        None => panic!("no tps in pgbench output:\n{text}"),
    }
}

/// [`pgbench_run`] with the CPU it and every other process took meanwhile (see
/// [`CpuProfile`]); `watch` are client processes to account for, by name and pid.
fn pgbench_profiled(
    b: &Bench,
    db: &str,
    script: &Path,
    secs: u64,
    watch: &[(&str, i32)],
) -> (f64, String) {
    let before: Vec<f64> = watch.iter().map(|w| pid_cpu(w.1)).collect();
    let pgbench_before = children_cpu();
    let p = CpuProfile::start(b);
    let tps = pgbench_run(b, db, script, secs);
    let mut clients: Vec<(&str, f64)> = vec![("pgbench", children_cpu() - pgbench_before)];
    for (w, b0) in watch.iter().zip(before) {
        clients.push((w.0, pid_cpu(w.1) - b0));
    }
    (tps, p.report(b, db, &clients))
}

const MIRROR_TRIGGER: &str = "
CREATE FUNCTION public.orders_mirror() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND (OLD.customer_id, OLD.id) IS DISTINCT FROM (NEW.customer_id, NEW.id)) THEN
    DELETE FROM public.orders_v2 WHERE customer_id = OLD.customer_id AND id = OLD.id;
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    INSERT INTO public.orders_v2 (customer_id, id, total_amount_minor, currency, status, note, created_at)
    VALUES (NEW.customer_id, NEW.id, NEW.total_amount::bigint, 'USD', NEW.status, NEW.note, NEW.created_at)
    ON CONFLICT (customer_id, id) DO UPDATE SET total_amount_minor = EXCLUDED.total_amount_minor,
      currency = EXCLUDED.currency, status = EXCLUDED.status, note = EXCLUDED.note,
      created_at = EXCLUDED.created_at;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER orders_mirror AFTER INSERT OR UPDATE OR DELETE ON public.orders
  FOR EACH ROW EXECUTE FUNCTION public.orders_mirror();";

/// Polls `sql` (one boolean) in `db` every 20 ms until it is true, for at most 10 minutes.
fn poll_until_true(b: &Bench, db: &str, sql: &str) {
    let t = Instant::now();
    while b.psql(db, sql) != "t" && t.elapsed() < Duration::from_secs(600) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `BENCH_RENICE=n` (an experiment, off by default): before a consumer's load, lowers the CPU
/// priority of its processes — every walsender, logical replication worker and `shadowmig …`
/// session of the cluster, and the client processes `pids` — to nice `n`, to see what the
/// load loses to their CPU rather than to their writes.
fn renice_consumers(b: &Bench, pids: &[i32]) {
    let Some(n) = std::env::var("BENCH_RENICE")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return;
    };
    let listed = b.psql(
        "postgres",
        "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE backend_type IN ('walsender', 'logical replication worker') OR application_name LIKE 'shadowmig%'",
    );
    let mut all: Vec<i32> = listed
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    all.extend_from_slice(pids);
    for pid in &all {
        // SAFETY: setpriority on a pid; a failure only leaves its priority as it was.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, *pid as libc::id_t, n);
        }
    }
    println!("    reniced to {n}: {all:?}");
}

fn pgbench(b: &Bench) {
    let base = env_u64("BENCH_PGBENCH_ROWS", 500_000);
    let secs = env_u64("BENCH_PGBENCH_SECS", 30);
    let reps = env_u64("BENCH_PGBENCH_REPS", 2);
    println!(
        "== pgbench: {secs} s per run, -c 4 -j 2, base {base} rows, {reps} rounds (load {})",
        loadavg()
    );
    let db = b.c.create_database("pb").expect("database");
    b.make_orders(&db, base);
    let script = b.dir.path().join("write_mix.sql");
    std::fs::write(
        &script,
        format!(
            "\\set id1 random(1, {base})\n\\set id2 random(1, {base})\n\\set c random(1, 10007)\n\\set amt random(0, 99999)\n\
             BEGIN;\n\
             INSERT INTO public.orders (customer_id, total_amount, status, note) VALUES (:c, :amt, 'new', 'pgbench');\n\
             UPDATE public.orders SET status = 'paid', total_amount = total_amount + 1 WHERE id = :id1;\n\
             UPDATE public.orders SET status = 'shipped', note = 'moved' WHERE id = :id2;\n\
             END;\n"
        ),
    )
    .expect("script");
    let mut results: Vec<(&str, f64, String)> = Vec::new();
    // "recvlogical": pg_recvlogical reading a slot of the table and discarding what it gets,
    // the floor any logical consumer sits on (the walsender's decoding and sending).
    // "shadowmig other db": the shadow table in another database of the cluster, as native
    // replication's target is.
    // "… other server": the shadow table (or the subscriber) on a second server of this
    // machine, so the source's WAL carries none of the second write (not in the default set:
    // the cutover of a shadow table elsewhere needs the proxy to route across servers).
    // BENCH_PGBENCH_MODES picks some of them (comma-separated), e.g. for a profile.
    let all_modes = [
        "alone",
        "recvlogical",
        "shadowmig",
        "shadowmig other db",
        "trigger",
        "native",
        "shadowmig other server",
        "native other server",
    ];
    let picked = std::env::var("BENCH_PGBENCH_MODES").unwrap_or_default();
    let modes_fwd: Vec<&str> = all_modes
        .into_iter()
        .filter(|m| {
            if picked.is_empty() {
                !m.ends_with("other server")
            } else {
                picked.split(',').any(|p| p.trim() == *m)
            }
        })
        .collect();
    let mut round = 0;
    for rep in 0..reps {
        let order: Vec<&str> = if rep % 2 == 0 {
            modes_fwd.to_vec()
        } else {
            modes_fwd.iter().rev().copied().collect()
        };
        for mode in order {
            round += 1;
            b.psql(&db, "VACUUM public.orders");
            b.checkpoint(&db);
            match mode {
                "alone" => {
                    let load = loadavg();
                    let (tps, cpu) = pgbench_profiled(b, &db, &script, secs, &[]);
                    println!("  alone: {tps:.0} tps (load {load})\n    {cpu}");
                    results.push((mode, tps, load));
                }
                "shadowmig" | "shadowmig other db" | "shadowmig other server" => {
                    // The bench of the server that holds the shadow table.
                    let tb = if mode == "shadowmig other server" {
                        b.other_server()
                    } else {
                        b
                    };
                    let tdb = if mode == "shadowmig" {
                        db.clone()
                    } else {
                        tb.c.create_database("pb_other").expect("database")
                    };
                    let url = (mode != "shadowmig").then(|| tb.c.url(&tdb));
                    let spec = b.write_spec_to(&format!("pb{round}"), &db, url, 2, 50_000, false);
                    let log = b.dir.path().join(format!("pb{round}.log"));
                    let w = spawn_run(&spec, &log, false, "info");
                    let deadline = Instant::now() + Duration::from_secs(1800);
                    loop {
                        let caught = tb.c.psql(
                            &tdb,
                            &format!("SELECT caught_up_at IS NOT NULL FROM shadowmig.migrations WHERE name = 'pb{round}'"),
                        );
                        if matches!(caught.as_deref().map(str::trim), Ok("t")) {
                            break;
                        }
                        assert!(Instant::now() < deadline, "shadowmig never caught up");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    let load = loadavg();
                    tb.stmts_reset(&tdb);
                    renice_consumers(b, &[w.pid]);
                    let (tps, cpu) =
                        pgbench_profiled(b, &db, &script, secs, &[("shadowmig", w.pid)]);
                    tb.stmts_report(&tdb);
                    let t = Instant::now();
                    // A marker transaction after the load: its commit is past `lsn`, and
                    // shadowmig's progress row holds the commit LSN of what it applied.
                    let lsn = b.lsn(&db);
                    b.psql(
                        &db,
                        "UPDATE public.orders SET status = 'marker' WHERE id = 1",
                    );
                    poll_until_true(
                        tb,
                        &tdb,
                        &format!("SELECT coalesce(bool_or(lsn >= '{lsn}'), false) FROM shadowmig.progress WHERE migration = 'pb{round}'"),
                    );
                    let lag = t.elapsed().as_secs_f64();
                    let r = w.terminate();
                    println!(
                        "  {mode} streaming: {tps:.0} tps (load {load}); caught up {lag:.2} s after the load stopped; peak RSS {:.1} MiB\n    {cpu}",
                        r.peak_rss_mib
                    );
                    let r2 = spawn_run(
                        &spec,
                        &b.dir.path().join(format!("pb{round}_fin.log")),
                        true,
                        "info",
                    )
                    .finish();
                    let _ = r2;
                    expect_equal(
                        &format!("{mode} under pgbench"),
                        &b.checksum(&db, common::ORDERS_EXPECTED),
                        &tb.checksum(&tdb, common::ORDERS_ACTUAL),
                    );
                    b.abort(&spec);
                    if tdb != db {
                        tb.psql("postgres", &format!("DROP DATABASE \"{tdb}\""));
                    }
                    results.push((mode, tps, load));
                }
                "recvlogical" => {
                    let slot = format!("pb_recv_{round}");
                    b.psql(
                        &db,
                        &format!("CREATE PUBLICATION {slot} FOR TABLE public.orders"),
                    );
                    b.create_slot(&db, &slot);
                    let pub_opt = format!("publication_names={slot}");
                    let mut child = b
                        .recvlogical_cmd(&db, &slot, &["proto_version=1", "binary=true", &pub_opt])
                        .args(["-s", "1", "-F", "1"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("start pg_recvlogical");
                    std::thread::sleep(Duration::from_millis(500));
                    renice_consumers(b, &[child.id() as i32]);
                    let load = loadavg();
                    let (tps, cpu) = pgbench_profiled(
                        b,
                        &db,
                        &script,
                        secs,
                        &[("pg_recvlogical", child.id() as i32)],
                    );
                    let t = Instant::now();
                    let end = b.lsn(&db);
                    poll_until_true(
                        b,
                        &db,
                        &format!("SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots WHERE slot_name = '{slot}'"),
                    );
                    let lag = t.elapsed().as_secs_f64();
                    let _ = child.kill();
                    let _ = child.wait();
                    println!(
                        "  pg_recvlogical reading (p1 binary): {tps:.0} tps (load {load}); read up {lag:.2} s after the load stopped\n    {cpu}"
                    );
                    b.drop_slot(&db, &slot);
                    b.psql(&db, &format!("DROP PUBLICATION {slot}"));
                    results.push((mode, tps, load));
                }
                "trigger" => {
                    b.psql(&db, common::ORDERS_TARGET);
                    b.psql(
                        &db,
                        "INSERT INTO public.orders_v2 SELECT customer_id, id, total_amount::bigint, 'USD', status, note, created_at FROM public.orders",
                    );
                    b.psql(&db, MIRROR_TRIGGER);
                    b.checkpoint(&db);
                    let load = loadavg();
                    let (tps, cpu) = pgbench_profiled(b, &db, &script, secs, &[]);
                    println!("  trigger capture: {tps:.0} tps (load {load})\n    {cpu}");
                    b.psql(&db, "DROP TRIGGER orders_mirror ON public.orders; DROP FUNCTION public.orders_mirror()");
                    expect_equal(
                        "trigger capture",
                        &b.checksum(&db, common::ORDERS_EXPECTED),
                        &b.checksum(&db, common::ORDERS_ACTUAL),
                    );
                    b.psql(&db, "DROP TABLE public.orders_v2");
                    results.push((mode, tps, load));
                }
                "native" | "native other server" => {
                    let nb = if mode == "native" {
                        b
                    } else {
                        b.other_server()
                    };
                    let ndb = nb.make_native_target("pb_native");
                    b.native_subscribe_on(nb, &db, &ndb, "pb_native", true, true);
                    nb.native_wait_ready(&ndb, "pb_native");
                    let now = b.lsn(&db);
                    b.native_wait_lsn(&ndb, "pb_native", &now);
                    b.checkpoint(&db);
                    renice_consumers(b, &[]);
                    let load = loadavg();
                    let (tps, cpu) = pgbench_profiled(b, &db, &script, secs, &[]);
                    let t = Instant::now();
                    let end = b.lsn(&db);
                    b.native_wait_lsn(&ndb, "pb_native", &end);
                    let lag = t.elapsed().as_secs_f64();
                    println!(
                        "  {mode} (native logical replication): {tps:.0} tps (load {load}); caught up {lag:.2} s after the load stopped\n    {cpu}"
                    );
                    expect_equal(
                        "native under pgbench",
                        &b.checksum(&db, common::ORDERS_EXPECTED),
                        &nb.checksum(&ndb, EXPECTED_NATIVE),
                    );
                    b.native_drop_on(nb, &db, &ndb, "pb_native");
                    nb.psql("postgres", &format!("DROP DATABASE \"{ndb}\""));
                    results.push((mode, tps, load));
                }
                _ => unreachable!(),
            }
        }
    }
    let mean = |m: &str| {
        let v: Vec<f64> = results.iter().filter(|r| r.0 == m).map(|r| r.1).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let alone = mean("alone");
    println!("  --- pgbench summary ({secs} s runs) ---");
    for &m in &modes_fwd {
        let all: Vec<String> = results
            .iter()
            .filter(|r| r.0 == m)
            .map(|r| format!("{:.0}", r.1))
            .collect();
        println!(
            "  {m}: mean {:.0} tps ({}) = {:.2}x alone",
            mean(m),
            all.join(", "),
            mean(m) / alone
        );
    }
    println!("  target: shadowmig >= 0.85x alone, > trigger, > native");
    b.psql("postgres", &format!("DROP DATABASE \"{db}\""));
}

fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let all = which.is_empty() || which.iter().any(|w| w == "all");
    let want = |s: &str| all || which.iter().any(|w| w == s);
    let settings = std::env::var("BENCH_PG_SETTINGS").unwrap_or_default();
    // The launcher waits wal_retrieve_retry_interval (5 s) between worker starts, which
    // would add seconds of idle time to every native measurement that enables a subscription.
    let mut cfg = ClusterConfig {
        durable: true,
        ..ClusterConfig::default()
    }
    .setting("wal_retrieve_retry_interval", "100ms");
    for kv in settings.split(',').filter(|s| !s.is_empty()) {
        if let Some((k, v)) = kv.split_once('=') {
            cfg = cfg.setting(k, v);
        }
    }
    // BENCH_LOG_DIR keeps the specs and `run` logs (otherwise a temp dir removed at exit).
    let dir = match std::env::var("BENCH_LOG_DIR") {
        Ok(d) => {
            std::fs::create_dir_all(&d).expect("BENCH_LOG_DIR");
            let mut t = tempfile::Builder::new()
                .prefix("engine-")
                .tempdir_in(d)
                .expect("temp dir");
            t.disable_cleanup(true);
            t
        }
        Err(_) => tempfile::tempdir().expect("temp dir"),
    };
    let b = Bench::new(&cfg, dir);
    println!("logs in {}", b.dir.path().display());
    println!(
        "engine bench: PostgreSQL at port {}, durable (fsync on), binary {} (load {})",
        b.c.port(),
        bin().display(),
        loadavg()
    );
    if want("backfill") {
        backfill(&b);
    }
    if want("drain") {
        drain(&b);
    }
    if want("pgbench") {
        pgbench(&b);
    }
}

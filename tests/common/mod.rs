//! Shared test material: the seed guide's orders scenario, a randomized concurrent workload
//! over it, and an independent SQL check of target = transform(source).
//!
//! The check is written here by hand in SQL and shares no code with shadowmig: it is what
//! proves the engine right, so it must not reuse the engine's transform or apply code.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

/// The source table of the orders scenario, with a replica identity that covers the
/// target's key (customer_id, id), as `plan` recommends.
pub const ORDERS_SOURCE: &str = "
CREATE TABLE public.orders (
    id bigserial PRIMARY KEY,
    customer_id bigint NOT NULL,
    total_amount integer,
    status text NOT NULL DEFAULT 'new',
    note text,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE public.orders ALTER COLUMN note SET STORAGE EXTERNAL;
CREATE UNIQUE INDEX orders_id_customer ON public.orders (id, customer_id);
ALTER TABLE public.orders REPLICA IDENTITY USING INDEX orders_id_customer;
";

/// The target: hash-partitioned by customer, keyed by (customer_id, id), amount in minor
/// units as bigint, a currency filled with a default.
pub const ORDERS_TARGET: &str = "
CREATE TABLE public.orders_v2 (
    customer_id bigint NOT NULL,
    id bigint NOT NULL,
    total_amount_minor bigint,
    currency text NOT NULL,
    status text NOT NULL,
    note text,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (customer_id, id)
) PARTITION BY HASH (customer_id);
CREATE TABLE public.orders_v2_p0 PARTITION OF public.orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE public.orders_v2_p1 PARTITION OF public.orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE public.orders_v2_p2 PARTITION OF public.orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE public.orders_v2_p3 PARTITION OF public.orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 3);
";

/// transform(source), written independently of the spec's `[transform]`.
pub const ORDERS_EXPECTED: &str =
    "SELECT customer_id, id, total_amount::bigint AS total_amount_minor, \
     'USD'::text AS currency, status, note, created_at FROM public.orders";
/// The target's rows in the same column order.
pub const ORDERS_ACTUAL: &str =
    "SELECT customer_id, id, total_amount_minor, currency, status, note, created_at FROM public.orders_v2";

/// Fills the source with `n` orders, a share of them with a TOASTed note.
pub fn orders_seed_sql(n: u64) -> String {
    format!(
        "INSERT INTO public.orders (customer_id, total_amount, status, note, created_at)
         SELECT 1 + i % 97, (i * 37) % 100000, (ARRAY['new','paid','shipped'])[1 + i % 3],
                CASE WHEN i % 10 = 0 THEN repeat(md5(i::text), 200) WHEN i % 10 = 1 THEN NULL ELSE 'n' || i END,
                '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 second'
         FROM generate_series(1, {n}) AS i"
    )
}

/// Rows in `expected` missing from `actual`, and rows in `actual` not in `expected`
/// (multiset difference both ways), each as text for the failure message.
pub fn diff(
    c: &shadowmig::testpg::TestCluster,
    db: &str,
    expected: &str,
    actual: &str,
) -> (Vec<String>, Vec<String>) {
    try_diff(c, db, expected, actual).expect("diff query")
}

/// [`diff`], or `None` when the query fails (e.g. the target does not exist yet).
pub fn try_diff(
    c: &shadowmig::testpg::TestCluster,
    db: &str,
    expected: &str,
    actual: &str,
) -> Option<(Vec<String>, Vec<String>)> {
    let q = |a: &str, b: &str| {
        let out = c
            .psql(
                db,
                &format!("SELECT x::text FROM (({a}) EXCEPT ALL ({b})) x ORDER BY 1 LIMIT 20"),
            )
            .ok()?;
        Some(
            out.lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>(),
        )
    };
    Some((q(expected, actual)?, q(actual, expected)?))
}

/// Asserts target = transform(source) row for row, in both directions.
pub fn assert_orders_equal(c: &shadowmig::testpg::TestCluster, db: &str) {
    let (missing, extra) = diff(c, db, ORDERS_EXPECTED, ORDERS_ACTUAL);
    let n_src = c.psql(db, "SELECT count(*) FROM public.orders").unwrap();
    let n_tgt = c.psql(db, "SELECT count(*) FROM public.orders_v2").unwrap();
    assert!(
        missing.is_empty() && extra.is_empty() && n_src == n_tgt,
        "target differs from transform(source): {n_src} source rows, {n_tgt} target rows\n\
         missing from target: {missing:#?}\nextra in target: {extra:#?}"
    );
}

/// What the workload did.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkloadStats {
    /// Transactions committed.
    pub committed: u64,
    /// Transactions rolled back on purpose.
    pub rolled_back: u64,
    /// Statements that failed (e.g. a unique violation from a random key change) and whose
    /// transaction was rolled back.
    pub failed: u64,
}

/// Runs random transactions on the orders source until `stop` is set or `max_txns` ran:
/// inserts (some with TOASTed notes), updates that do and do not touch the TOASTed column,
/// updates that change the source key (id) and the target's partition key (customer_id),
/// deletes, multi-statement transactions, and deliberate rollbacks.
pub async fn orders_workload(
    client: &mut Client,
    seed: u64,
    stop: Arc<AtomicBool>,
    max_txns: u64,
) -> WorkloadStats {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats = WorkloadStats::default();
    let max_id: i64 = client
        .query_one("SELECT coalesce(max(id), 1) FROM public.orders", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(1);
    let mut hi = max_id.max(1);
    while !stop.load(Ordering::Relaxed)
        && stats.committed + stats.rolled_back + stats.failed < max_txns
    {
        let tx = match client.transaction().await {
            Ok(t) => t,
            Err(_) => {
                stats.failed += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let n_stmts = rng.gen_range(1..=4);
        let mut ok = true;
        for _ in 0..n_stmts {
            let pick = rng.gen_range(1..=hi);
            let r = match rng.gen_range(0..100) {
                0..=29 => {
                    let big = rng.gen_bool(0.2);
                    hi += 1;
                    tx.execute(
                        "INSERT INTO public.orders (customer_id, total_amount, status, note) \
                         VALUES ($1, $2, 'new', CASE WHEN $3 THEN repeat(md5(random()::text), 150) ELSE 'w' || left(md5(random()::text), 8) END)",
                        &[&rng.gen_range(1i64..=97), &rng.gen_range(0i32..100000), &big],
                    )
                    .await
                }
                30..=54 => {
                    tx.execute(
                        "UPDATE public.orders SET status = $1, total_amount = total_amount + 1 \
                         WHERE id = (SELECT id FROM public.orders WHERE id >= $2 ORDER BY id LIMIT 1)",
                        &[&["paid", "shipped", "refunded"][rng.gen_range(0..3)], &pick],
                    )
                    .await
                }
                55..=64 => {
                    tx.execute(
                        "UPDATE public.orders SET note = repeat(md5(random()::text), $1) \
                         WHERE id = (SELECT id FROM public.orders WHERE id >= $2 ORDER BY id LIMIT 1)",
                        &[&rng.gen_range(1i32..200), &pick],
                    )
                    .await
                }
                65..=74 => {
                    tx.execute(
                        "UPDATE public.orders SET customer_id = $1 \
                         WHERE id = (SELECT id FROM public.orders WHERE id >= $2 ORDER BY id LIMIT 1)",
                        &[&rng.gen_range(1i64..=97), &pick],
                    )
                    .await
                }
                75..=81 => {
                    tx.execute(
                        "UPDATE public.orders SET id = nextval('public.orders_id_seq') \
                         WHERE id = (SELECT id FROM public.orders WHERE id >= $1 ORDER BY id LIMIT 1)",
                        &[&pick],
                    )
                    .await
                }
                _ => {
                    tx.execute(
                        "DELETE FROM public.orders \
                         WHERE id = (SELECT id FROM public.orders WHERE id >= $1 ORDER BY id LIMIT 1)",
                        &[&pick],
                    )
                    .await
                }
            };
            if let Err(e) = r {
                if std::env::var_os("WORKLOAD_DEBUG").is_some() {
                    eprintln!("workload statement failed: {e:?}");
                }
                ok = false;
                break;
            }
        }
        if !ok {
            let _ = tx.rollback().await;
            stats.failed += 1;
        } else if rng.gen_bool(0.1) {
            let _ = tx.rollback().await;
            stats.rolled_back += 1;
        } else if tx.commit().await.is_ok() {
            stats.committed += 1;
        } else {
            stats.failed += 1;
        }
    }
    stats
}

/// An [`orders_workload`] running on a runtime of its own while the test goes on.
pub struct Workload {
    rt: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<WorkloadStats>,
}

impl Workload {
    /// Starts the workload on `url` with `seed`, for at most `max_txns` transactions.
    pub fn start(url: &str, seed: u64, max_txns: u64) -> Workload {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (url, stop2) = (url.to_string(), stop.clone());
        let handle = rt.spawn(async move {
            let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            orders_workload(&mut client, seed, stop2, max_txns).await
        });
        Workload { rt, stop, handle }
    }

    /// Stops it and waits for it (a minute at most: a workload stuck on a lock fails the
    /// test with that message instead of hanging it).
    pub fn finish(self) -> WorkloadStats {
        self.stop.store(true, Ordering::Relaxed);
        self.join(60)
    }

    /// Waits (at most `secs`) for it to run its `max_txns` transactions.
    pub fn join(self, secs: u64) -> WorkloadStats {
        let h = self.handle;
        self.rt
            .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(secs), h).await })
            .unwrap_or_else(|_| panic!("the workload did not stop within {secs} s"))
            .unwrap()
    }
}

/// `shadowmig ARGS` as a child process, logging at info unless told otherwise.
pub fn shadowmig(args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_shadowmig"));
    c.args(args).env("SHADOWMIG_LOG", "info");
    c
}

/// Starts `shadowmig run SPEC` in the background, its stderr appended to `log`, with the
/// given log filter.
pub fn spawn_run(
    spec: &std::path::Path,
    log: &std::path::Path,
    filter: &str,
) -> std::process::Child {
    spawn_run_env(spec, log, filter, &[])
}

/// [`spawn_run`] with extra environment variables for the child.
pub fn spawn_run_env(
    spec: &std::path::Path,
    log: &std::path::Path,
    filter: &str,
    env: &[(&str, &str)],
) -> std::process::Child {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    shadowmig(&["run", spec.to_str().unwrap()])
        .env("SHADOWMIG_LOG", filter)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(f)
        .spawn()
        .unwrap()
}

/// Runs `cmd` to its end like `Command::output`, but kills it and panics with what it printed
/// if it has not exited within `timeout`: a hung run fails its test with its log instead of
/// stalling the whole suite past CI's limit.
pub fn output_within(
    mut cmd: std::process::Command,
    timeout: std::time::Duration,
) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, timeout);
    let read = |p: &std::path::Path| std::fs::read(p).unwrap_or_default();
    let Some(status) = status else {
        // SAFETY: killing our own child process.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let _ = child.wait();
        panic!(
            "{cmd:?} did not exit within {timeout:?}; it printed:\n{}\n{}",
            String::from_utf8_lossy(&read(&out_path)),
            String::from_utf8_lossy(&read(&err_path))
        );
    };
    std::process::Output {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

/// Panics with the log unless it says `text`.
pub fn assert_logged(log: &std::path::Path, text: &str) {
    let l = std::fs::read_to_string(log).unwrap_or_default();
    assert!(l.contains(text), "the log does not say {text:?}:\n{l}");
}

/// SIGTERM to a child, then its exit status.
pub fn sigterm(child: &mut std::process::Child) -> std::process::ExitStatus {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    child.wait().unwrap()
}

/// The child's exit status, if it exits within `timeout`.
pub fn wait_exit(
    child: &mut std::process::Child,
    timeout: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    None
}

/// Polls until target = transform(source) for the orders scenario, or the timeout passes.
pub fn wait_equal(
    c: &shadowmig::testpg::TestCluster,
    db: &str,
    timeout: std::time::Duration,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some((m, e)) = try_diff(c, db, ORDERS_EXPECTED, ORDERS_ACTUAL) {
            if m.is_empty() && e.is_empty() {
                return true;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    false
}

/// Asserts that a finished command exited 0, showing its stderr otherwise.
pub fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `shadowmig status SPEC --json`, parsed.
pub fn status_json(spec: &std::path::Path) -> serde_json::Value {
    let out = shadowmig(&["status", spec.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert_ok(&out);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A plain HTTP/1.0 GET on loopback; the whole response.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// A spec for the orders scenario (source, target DDL, the transform), followed by `extra`
/// TOML sections such as `[copy]`, `[metrics]` or `[verify]`.
pub fn orders_spec(name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
[source]
url = "{url}"
table = "public.orders"
[target]
table = "public.orders_v2"
create = """{ORDERS_TARGET}"""
[transform]
total_amount_minor = "total_amount::bigint"
currency = "'USD'"
{extra}"#
    )
}

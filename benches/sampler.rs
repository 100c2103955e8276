//! Live sampler cost: apply throughput of `shadowmig run` draining the same backlog of changes
//! with the live verification sampler off (`[verify] sample_rate = 0`,
//! `random_keys_per_minute = 0`) and on at its default setting (no `[verify]` section), in
//! the same run on the same throwaway cluster.
//!
//! `cargo bench --bench sampler` (release). `SAMPLER_BENCH_ROWS` (default 100,000) rows are
//! backfilled into four shadow tables, one migration each (own slot); then
//! `SAMPLER_BENCH_CHANGES` (default 300,000) single-row updates, 100 per transaction, pile up in
//! all four slots; then each migration drains its backlog with `run --exit-when-caught-up`,
//! timed, in the order off, on, on, off so that neither side always runs with a warmer cache.
//! Prints changes/s per drain, the means and the ratio on / off.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use shadowmig::testpg::{ClusterConfig, TestCluster};

const ROWS_PER_TX: u64 = 100;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn write_spec(dir: &Path, name: &str, url: &str, table: &str, sampler_on: bool) -> String {
    let verify = if sampler_on {
        String::new()
    } else {
        "[verify]\nsample_rate = 0\nrandom_keys_per_minute = 0\n".to_string()
    };
    let spec = format!(
        r#"name = "{name}"
[source]
url = "{url}"
table = "public.bench"
[target]
table = "public.{table}"
create = "CREATE TABLE public.{table} (grp int NOT NULL, id bigint NOT NULL, v bigint NOT NULL, pad text, PRIMARY KEY (grp, id))"
[transform]
v = "v::bigint"
[metrics]
listen = "127.0.0.1:0"
{verify}"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, spec).expect("write spec");
    path.to_str().expect("utf-8 path").to_string()
}

/// Runs `run --exit-when-caught-up`; its wall time in seconds.
fn drain(spec: &str, log: &Path) -> f64 {
    let f = std::fs::File::create(log).expect("log file");
    let t = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_shadowmig"))
        .args(["run", spec, "--exit-when-caught-up"])
        .env("SHADOWMIG_LOG", "info")
        .stdout(Stdio::null())
        .stderr(f)
        .status()
        .expect("run shadowmig");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        status.success(),
        "run failed: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    secs
}

fn main() {
    let rows = env_u64("SAMPLER_BENCH_ROWS", 100_000);
    let changes = env_u64("SAMPLER_BENCH_CHANGES", 300_000).div_ceil(ROWS_PER_TX) * ROWS_PER_TX;
    let c = TestCluster::start(&ClusterConfig::default()).expect("start cluster");
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
    let plan = [
        ("off_1", false),
        ("on_1", true),
        ("on_2", true),
        ("off_2", false),
    ];
    let url = c.url(&db);
    let specs: Vec<(String, bool)> = plan
        .iter()
        .map(|(n, on)| {
            (
                write_spec(dir.path(), &format!("s_{n}"), &url, &format!("t_{n}"), *on),
                *on,
            )
        })
        .collect();
    for (i, (spec, _)) in specs.iter().enumerate() {
        let secs = drain(spec, &dir.path().join(format!("backfill_{i}.log")));
        println!("backfill {i}: {rows} rows in {secs:.1} s");
    }
    let t = Instant::now();
    c.psql(
        &db,
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
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for (i, (spec, sampler_on)) in specs.iter().enumerate() {
        let log = dir.path().join(format!("drain_{i}.log"));
        let secs = drain(spec, &log);
        let rate = changes as f64 / secs;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let name = format!("s_{}", plan[i].0);
        let checked = c
            .psql(
                &db,
                &format!("SELECT coalesce((SELECT checked FROM shadowmig.sampler_counters WHERE migration = '{name}'), 0)"),
            )
            .unwrap_or_default();
        println!(
            "drain {i} sampler {} (keys checked so far: {}): {secs:.2} s, {rate:.0} changes/s{}",
            if *sampler_on { "on " } else { "off" },
            checked.trim(),
            if text.contains("live verification: mismatch") {
                " (MISMATCH LOGGED)"
            } else {
                ""
            }
        );
        if *sampler_on {
            on.push(rate);
        } else {
            off.push(rate);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "mean changes/s: sampler off {:.0}, sampler on (default) {:.0}; ratio on/off {:.3}",
        mean(&off),
        mean(&on),
        mean(&on) / mean(&off)
    );
}

//! `verify` of two N-row tables against the native baseline of reading both once, measured in
//! the same run on the same throwaway cluster:
//! baseline = `SELECT sum(hashtext(t::text)) FROM t` on each table, one after the other;
//! ours = `shadowmig::verify::verify` of the pair (equal content, so no narrowing).
//! The goal is ours ≥ 0.5× the baseline's speed (time ratio baseline / ours ≥ 0.5).
//!
//! N defaults to 5,000,000; `SHADOWMIG_BENCH_ROWS=1000000 cargo bench --bench verify` scales it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use shadowmig::spec::Spec;
use shadowmig::testpg::{ClusterConfig, TestCluster};
use shadowmig::verify::{self, Outcome, VerifyOptions};

const SCHEMA: &str = "
CREATE TABLE public.orders (
    id bigint PRIMARY KEY, customer_id bigint NOT NULL, total_amount integer,
    status text NOT NULL, note text, created_at timestamptz NOT NULL);
CREATE TABLE public.orders_v2 (
    customer_id bigint NOT NULL, id bigint NOT NULL, total_amount_minor bigint,
    currency text NOT NULL, status text NOT NULL, note text, created_at timestamptz NOT NULL,
    PRIMARY KEY (customer_id, id)) PARTITION BY HASH (customer_id);
CREATE TABLE public.orders_v2_p0 PARTITION OF public.orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE public.orders_v2_p1 PARTITION OF public.orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE public.orders_v2_p2 PARTITION OF public.orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE public.orders_v2_p3 PARTITION OF public.orders_v2 FOR VALUES WITH (MODULUS 4, REMAINDER 3);
";

fn seed(n: u64) -> String {
    format!(
        "INSERT INTO public.orders
         SELECT i, 1 + i % 9973, (i * 37) % 100000, (ARRAY['new','paid','shipped'])[1 + i % 3],
                CASE WHEN i % 100 = 0 THEN repeat(md5(i::text), 20) WHEN i % 10 = 1 THEN NULL ELSE 'n' || i END,
                '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 second'
         FROM generate_series(1, {n}) AS i;
         INSERT INTO public.orders_v2
         SELECT customer_id, id, total_amount::bigint, 'USD', status, note, created_at FROM public.orders;"
    )
}

static TIMES: Mutex<Vec<(&'static str, Duration)>> = Mutex::new(Vec::new());

fn record(name: &'static str, d: Duration) {
    if let Ok(mut t) = TIMES.lock() {
        t.push((name, d));
    }
}

fn median(name: &str) -> Option<Duration> {
    let t = TIMES.lock().ok()?;
    let mut v: Vec<Duration> = t
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, d)| *d)
        .collect();
    v.sort();
    v.get(v.len() / 2).copied()
}

fn bench(c: &mut Criterion) {
    let n: u64 = std::env::var("SHADOWMIG_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000_000);
    let cluster = TestCluster::start(&ClusterConfig::default().setting("max_wal_size", "4GB"))
        .expect("cluster");
    let db = cluster.create_database("bench_verify").expect("db");
    let t0 = Instant::now();
    cluster.psql(&db, SCHEMA).expect("schema");
    cluster.psql(&db, &seed(n)).expect("seed");
    // Set hint bits and statistics first, so that no measured read pays for them.
    for t in ["public.orders", "public.orders_v2"] {
        cluster
            .psql(&db, &format!("VACUUM (FREEZE, ANALYZE) {t}"))
            .expect("vacuum");
    }
    eprintln!(
        "verify bench: {n} rows per table loaded in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let spec = Spec::parse(
        &format!(
            "name = \"bench\"\n[source]\nurl = \"{}\"\ntable = \"public.orders\"\n[target]\ntable = \"public.orders_v2\"\n[transform]\ntotal_amount_minor = \"total_amount::bigint\"\ncurrency = \"'USD'\"\n",
            cluster.url(&db)
        ),
        "bench.toml",
    )
    .expect("spec");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt.block_on(cluster.client(&db)).expect("client");

    let mut g = c.benchmark_group(format!("verify_{n}_rows"));
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(100));
    g.measurement_time(Duration::from_secs(1));
    g.bench_function("baseline_plain_read_of_both", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                rt.block_on(async {
                    for t in ["public.orders", "public.orders_v2"] {
                        client
                            .query_one(&format!("SELECT sum(hashtext(t::text)) FROM {t} t"), &[])
                            .await
                            .expect("baseline read");
                    }
                });
                let d = start.elapsed();
                record("baseline", d);
                total += d;
            }
            total
        })
    });
    g.bench_function("shadowmig_verify", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let out = rt
                    .block_on(verify::verify(&spec, &VerifyOptions::default()))
                    .expect("verify");
                match out {
                    Outcome::Done(r) => assert!(r.equal && r.rows_source == n, "{}", r.render()),
                    Outcome::Interrupted { .. } => panic!("interrupted"),
                }
                let d = start.elapsed();
                record("verify", d);
                total += d;
            }
            total
        })
    });
    g.finish();
    if let (Some(base), Some(ours)) = (median("baseline"), median("verify")) {
        eprintln!(
            "verify bench: {n} rows per table: baseline (plain read of both) median {:.2} s, \
             verify median {:.2} s, speed ratio {:.2} (goal >= 0.5)",
            base.as_secs_f64(),
            ours.as_secs_f64(),
            base.as_secs_f64() / ours.as_secs_f64()
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

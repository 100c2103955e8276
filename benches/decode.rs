//! pgoutput decode throughput on one core: a captured PostgreSQL 15 insert/update/delete
//! stream (`fixtures/pgoutput/bench_orders.hex`, 707 frames) replayed to 100,000 messages.
//!
//! Measures, per message: a memcpy of the frame (the floor: what merely touching the bytes
//! costs), decode only, decode + named row (`RelationCache::row`), and decode + row + JSON
//! rendering of every value. Run: `cargo bench --bench decode`.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shadowmig::pgoutput::{Decoder, LogicalMessage, RelationCache};

const TARGET_MESSAGES: usize = 100_000;

fn frames(case: &str) -> Vec<Bytes> {
    let path = format!(
        "{}/fixtures/pgoutput/{case}.hex",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("fixture");
    let one: Vec<Bytes> = text
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| Bytes::from(hex::decode(l.split(' ').nth(2).expect("hex column")).expect("hex")))
        .collect();
    let mut out = Vec::with_capacity(TARGET_MESSAGES);
    while out.len() < TARGET_MESSAGES {
        out.extend(one.iter().cloned());
    }
    out.truncate(TARGET_MESSAGES);
    out
}

/// Decodes every frame and builds rows for the changes; returns rows built.
fn decode_rows(frames: &[Bytes], json: bool) -> usize {
    let mut d = Decoder::new(1);
    let mut cache = RelationCache::new();
    let mut rows = 0;
    for f in frames {
        let msg = d.decode(f).expect("decodes");
        match msg {
            LogicalMessage::Relation { .. } | LogicalMessage::Type { .. } => {
                cache.observe(&msg);
            }
            LogicalMessage::Insert { relation, new, .. } => {
                let r = cache.row(relation, new).expect("row");
                if json {
                    black_box(r.to_json().expect("json"));
                }
                black_box(&r);
                rows += 1;
            }
            LogicalMessage::Update {
                relation, old, new, ..
            } => {
                if let Some((k, t)) = old {
                    let o = cache.old_row(relation, k, t).expect("old row");
                    if json {
                        black_box(o.to_json().expect("json"));
                    }
                    black_box(&o);
                }
                let r = cache.row(relation, new).expect("row");
                if json {
                    black_box(r.to_json().expect("json"));
                }
                black_box(&r);
                rows += 1;
            }
            LogicalMessage::Delete { relation, old, .. } => {
                let o = cache.old_row(relation, old.0, old.1).expect("old row");
                if json {
                    black_box(o.to_json().expect("json"));
                }
                black_box(&o);
                rows += 1;
            }
            other => {
                black_box(other);
            }
        }
    }
    rows
}

fn bench(c: &mut Criterion) {
    let frames = frames("bench_orders");
    let bytes: usize = frames.iter().map(|f| f.len()).sum();
    let mut g = c.benchmark_group("pgoutput_decode");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.sample_size(20);
    g.bench_function("memcpy_baseline", |b| {
        b.iter(|| {
            let mut n = 0usize;
            for f in &frames {
                let v = f.to_vec();
                n += black_box(v).len();
            }
            n
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| {
            let mut d = Decoder::new(1);
            for f in &frames {
                black_box(d.decode(f).expect("decodes"));
            }
        })
    });
    g.bench_function("decode_rows", |b| b.iter(|| decode_rows(&frames, false)));
    g.bench_function("decode_rows_json", |b| {
        b.iter(|| decode_rows(&frames, true))
    });
    g.finish();
    eprintln!(
        "pgoutput decode bench: {} messages, {} bytes ({:.1} bytes/message)",
        frames.len(),
        bytes,
        bytes as f64 / frames.len() as f64
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);

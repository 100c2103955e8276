//! Property tests: the decoder, the relation cache and the binary renderer never panic, on
//! arbitrary bytes and on mutated or truncated frames captured from PostgreSQL 15, and every
//! decode error names a message kind and an offset inside the frame.

#[path = "support/pgoutput_capture.rs"]
mod capture;

use std::sync::OnceLock;

use bytes::Bytes;
use proptest::prelude::*;
use shadowmig::pgoutput::binary::{oids, render, NoUserTypes};
use shadowmig::pgoutput::{DecodeError, Decoder, LogicalMessage, RelationCache, RowChange};

const KINDS: &[&str] = &[
    "Begin",
    "Commit",
    "Origin",
    "Relation",
    "Type",
    "Insert",
    "Update",
    "Delete",
    "Truncate",
    "Message",
    "Stream Start",
    "Stream Stop",
    "Stream Commit",
    "Stream Abort",
    "unknown",
    "frame",
];

fn check_error(e: &DecodeError, frame: &[u8]) {
    assert!(KINDS.contains(&e.kind()), "unexpected kind in {e}");
    assert!(e.offset() <= frame.len(), "offset beyond the frame: {e}");
    let s = e.to_string();
    assert!(s.contains("offset"), "error text must name the offset: {s}");
    if let DecodeError::Malformed { kind, .. } = e {
        assert!(s.contains(kind), "error text must name the kind: {s}");
    }
}

/// Decodes a frame in every decoder state; rows and renderings of what decodes.
fn exercise(frame: &[u8], cache: &mut RelationCache) {
    let bytes = Bytes::copy_from_slice(frame);
    for (proto, in_stream) in [(1, false), (2, false), (2, true)] {
        let mut d = Decoder::new(proto);
        if in_stream {
            d.decode(&Bytes::from_static(&[b'S', 0, 0, 0, 9, 1]))
                .unwrap();
        }
        match d.decode(&bytes) {
            Ok(msg) => {
                cache.observe(&msg);
                if let Ok(Some(change)) = cache.change(&msg) {
                    match change {
                        RowChange::Insert { new } => drop(new.to_json()),
                        RowChange::Update { old, new } => {
                            drop(old.map(|o| o.to_json()));
                            drop(new.to_json());
                        }
                        RowChange::Delete { old } => drop(old.to_json()),
                    }
                }
            }
            Err(e) => check_error(&e, frame),
        }
    }
}

/// Frames of the fixtures (the streaming case is cut short), with the cache state each
/// case builds, so mutated change frames meet a relation that fits them.
fn fixture_frames() -> &'static Vec<Vec<u8>> {
    static F: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    F.get_or_init(|| {
        let mut out = Vec::new();
        for c in capture::load_cases().unwrap() {
            for f in capture::load_hex(&c.name).unwrap().into_iter().take(60) {
                out.push(f.data);
            }
        }
        out
    })
}

fn primed_cache() -> RelationCache {
    static C: OnceLock<RelationCache> = OnceLock::new();
    C.get_or_init(build_primed_cache).clone()
}

fn build_primed_cache() -> RelationCache {
    let mut cache = RelationCache::new();
    for case in capture::load_cases().unwrap() {
        let mut d = Decoder::new(case.proto_version());
        for f in capture::load_hex(&case.name).unwrap().into_iter().take(60) {
            if let Ok(m) = d.decode(&Bytes::from(f.data)) {
                if matches!(
                    m,
                    LogicalMessage::Relation { .. } | LogicalMessage::Type { .. }
                ) {
                    cache.observe(&m);
                }
            }
        }
    }
    cache
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    /// Overwrite 4 bytes with an extreme length value.
    Length(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Mutation::Remove(i, n)),
        (
            any::<usize>(),
            prop_oneof![
                Just(u32::MAX),
                Just(0x7fff_ffff),
                Just(0x8000_0000),
                Just(0xffff),
                any::<u32>()
            ]
        )
            .prop_map(|(i, v)| Mutation::Length(i, v)),
    ]
}

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    if frame.is_empty() {
        return;
    }
    let n = frame.len();
    match m {
        Mutation::Flip(i, b) => frame[i % n] ^= b | 1,
        Mutation::Truncate(i) => frame.truncate(i % n),
        Mutation::Insert(i, v) => {
            let at = i % (n + 1);
            frame.splice(at..at, v.iter().copied());
        }
        Mutation::Remove(i, k) => {
            let at = i % n;
            let end = (at + k).min(n);
            frame.drain(at..end);
        }
        Mutation::Length(i, v) => {
            let at = i % n;
            for (j, b) in v.to_be_bytes().iter().enumerate() {
                if let Some(x) = frame.get_mut(at + j) {
                    *x = *b;
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        exercise(&data, &mut RelationCache::new());
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_tag_never_panic(
        tag in prop::sample::select(b"BCORYIUDTMSEcAK".to_vec()),
        rest in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut data = vec![tag];
        data.extend(rest);
        exercise(&data, &mut RelationCache::new());
    }

    #[test]
    fn mutated_fixture_frames_never_panic(
        pick in any::<prop::sample::Index>(),
        muts in proptest::collection::vec(mutation(), 1..4),
    ) {
        let frames = fixture_frames();
        let mut frame = pick.get(frames).clone();
        for m in &muts {
            apply(&mut frame, m);
        }
        exercise(&frame, &mut primed_cache());
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn every_truncation_of_a_fixture_frame_is_an_error(pick in any::<prop::sample::Index>()) {
        let frames = fixture_frames();
        let frame = pick.get(frames);
        // The stream-state decoder matters for frames from inside a block; try both.
        for cut in 0..frame.len() {
            let part = Bytes::copy_from_slice(&frame[..cut]);
            for in_stream in [false, true] {
                let mut d = Decoder::new(2);
                if in_stream {
                    d.decode(&Bytes::from_static(&[b'S', 0, 0, 0, 9, 1])).unwrap();
                }
                if let Err(e) = d.decode(&part) {
                    check_error(&e, &part);
                }
            }
            // In the state it was captured in, a cut frame never decodes.
            let whole_ok_out = Decoder::new(2).decode(&Bytes::copy_from_slice(frame)).is_ok();
            if whole_ok_out && cut < frame.len() {
                prop_assert!(Decoder::new(2).decode(&part).is_err(), "cut at {} decoded", cut);
            }
        }
    }

    #[test]
    fn binary_renderer_never_panics(
        pick in any::<prop::sample::Index>(),
        value in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut all: Vec<u32> = vec![16, 17, 18, 19, 20, 21, 23, 25, 26, 114, 600, 700, 701, 1042,
            1043, 1082, 1083, 1114, 1184, 1186, 1700, 2950, 3802, 16400, 869];
        all.extend_from_slice(oids::ARRAYS);
        let oid = *pick.get(&all);
        if let Err(e) = render(oid, &value, &NoUserTypes) {
            prop_assert!(e.to_string().contains(&oid.to_string()), "{} must name oid {}", e, oid);
        }
    }
}

/// Arrays whose header promises far more elements than the bytes hold must fail fast
/// without allocating for the promise.
#[test]
fn array_with_huge_dimensions_is_an_error() {
    let mut a = Vec::new();
    for v in [2i32, 0, 23, 0x7fff_ffff, 1, 0x7fff_ffff, 1] {
        a.extend_from_slice(&v.to_be_bytes());
    }
    let e = render(1007, &a, &NoUserTypes).unwrap_err();
    assert!(e.to_string().contains("1007"), "{e}");
}

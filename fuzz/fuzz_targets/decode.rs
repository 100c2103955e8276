//! Fuzzes the pgoutput decoder and the relation cache together: the input is a sequence of
//! frames, each prefixed by a big-endian u16 length, decoded in order by one protocol-2
//! `Decoder` (so stream state carries over) and fed to one `RelationCache`; every change is
//! turned into rows and rendered to JSON. Nothing may panic; every decode error must name a
//! message kind and an offset inside the frame.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use shadowmig::pgoutput::{Decoder, RelationCache};

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new(2);
    let mut cache = RelationCache::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let frame = Bytes::copy_from_slice(&rest[2..2 + len]);
        rest = &rest[2 + len..];
        match decoder.decode(&frame) {
            Ok(msg) => {
                cache.observe(&msg);
                if let Ok(Some(change)) = cache.change(&msg) {
                    let _ = format!("{change:?}");
                    match change {
                        shadowmig::pgoutput::RowChange::Insert { new } => {
                            let _ = new.to_json();
                        }
                        shadowmig::pgoutput::RowChange::Update { old, new } => {
                            let _ = old.map(|o| o.to_json());
                            let _ = new.to_json();
                            let _ = new.unchanged_toast();
                        }
                        shadowmig::pgoutput::RowChange::Delete { old } => {
                            let _ = old.to_json();
                        }
                    }
                }
            }
            Err(e) => {
                assert!(!e.kind().is_empty());
                assert!(
                    e.offset() <= frame.len(),
                    "{e} beyond frame of {}",
                    frame.len()
                );
                let _ = e.to_string();
            }
        }
    }
});

//! Fuzzes the binary-value renderer: the first byte picks a type oid (a built-in one with a
//! renderer, an array type, or a user type), the rest is the value. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shadowmig::pgoutput::binary::{oids, render, NoUserTypes};

const SCALARS: &[u32] = &[
    16, 17, 18, 19, 20, 21, 23, 25, 26, 114, 600, 700, 701, 705, 1042, 1043, 1082, 1083, 1114,
    1184, 1186, 1700, 2950, 3802, 16400, 869,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, value)) = data.split_first() else {
        return;
    };
    let all: Vec<u32> = SCALARS.iter().chain(oids::ARRAYS).copied().collect();
    let oid = all[usize::from(pick) % all.len()];
    let _ = render(oid, value, &NoUserTypes);
});

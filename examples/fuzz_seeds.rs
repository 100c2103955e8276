//! Writes the fuzz seed corpus from the captured fixtures: `fuzz/corpus/decode/` gets one
//! input per fixture case (its frames, each prefixed by a big-endian u16 length; the long
//! streaming case is cut into pieces) and one per frame.
//!
//! Run: `cargo run --example fuzz_seeds`

#[path = "../tests/support/pgoutput_capture.rs"]
mod capture;

fn encode(frames: &[capture::Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        let len = u16::try_from(f.data.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&f.data[..usize::from(len)]);
    }
    out
}

fn main() -> Result<(), String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut n = 0;
    for case in capture::load_cases()? {
        let frames = capture::load_hex(&case.name)?;
        for (i, chunk) in frames.chunks(40).enumerate().take(4) {
            std::fs::write(dir.join(format!("{}-{i}", case.name)), encode(chunk))
                .map_err(|e| e.to_string())?;
            n += 1;
        }
        for (i, f) in frames.iter().enumerate().take(30) {
            std::fs::write(
                dir.join(format!("{}-frame{i}", case.name)),
                encode(std::slice::from_ref(f)),
            )
            .map_err(|e| e.to_string())?;
            n += 1;
        }
    }
    println!("{n} seeds in {}", dir.display());
    Ok(())
}

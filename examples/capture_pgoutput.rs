//! Captures the pgoutput fixtures: for every `fixtures/pgoutput/<case>.sql`, runs it on the
//! test harness's PostgreSQL 15 cluster and writes `<case>.hex` (one frame per line:
//! `<lsn> <xid> <hex bytes>`).
//!
//! Run: `cargo run --example capture_pgoutput [CASE…]` (no arguments: every case).

#[path = "../tests/support/pgoutput_capture.rs"]
mod capture;

fn main() -> Result<(), String> {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let cluster = shadowmig::testpg::shared().map_err(|e| e.to_string())?;
    for case in capture::load_cases()? {
        if !only.is_empty() && !only.contains(&case.name) {
            continue;
        }
        let frames = capture::capture(cluster, &case)?;
        let path = capture::fixtures_dir().join(format!("{}.hex", case.name));
        std::fs::write(&path, capture::to_hex_file(&frames)).map_err(|e| e.to_string())?;
        println!(
            "{}: {} frames -> {}",
            case.name,
            frames.len(),
            path.display()
        );
    }
    Ok(())
}

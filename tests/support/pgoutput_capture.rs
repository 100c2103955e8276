//! Capturing pgoutput frames from a real PostgreSQL 15 through the SQL interface
//! (`pg_logical_slot_get_binary_changes`), shared by `examples/capture_pgoutput.rs` (which
//! writes `fixtures/pgoutput/<case>.hex`) and the live drift test in
//! `tests/pgoutput_fixtures.rs`. Never used by the library itself: pgoutput is sans-IO.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use shadowmig::testpg::TestCluster;

/// One `<case>.sql`: a header of options, setup SQL (runs before the slot exists) and a
/// workload (decoded).
#[derive(Debug, Clone)]
pub struct Case {
    /// File stem, e.g. `identity_full`.
    pub name: String,
    /// `key=value` pairs from the `-- options:` line.
    pub options: Vec<(String, String)>,
    /// SQL run before the slot is created.
    pub setup: String,
    /// SQL whose changes are captured.
    pub workload: String,
}

impl Case {
    /// The value of an option, if given.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The protocol version the case is captured with.
    pub fn proto_version(&self) -> u32 {
        self.option("proto_version")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
    }
}

/// One captured frame: the row of `pg_logical_slot_get_binary_changes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// `lsn` column, `X/Y` form.
    pub lsn: String,
    /// `xid` column.
    pub xid: u32,
    /// `data` column.
    pub data: Vec<u8>,
}

/// `fixtures/pgoutput` in the crate.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pgoutput")
}

/// Parses a case file.
pub fn parse_case(name: &str, text: &str) -> Result<Case, String> {
    let mut options = Vec::new();
    let (mut setup, mut workload) = (String::new(), String::new());
    let mut section = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("-- options:") {
            for kv in rest.split_whitespace() {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("{name}: bad option {kv:?}"))?;
                options.push((k.to_string(), v.to_string()));
            }
        } else if line.trim() == "-- setup" {
            section = 1;
        } else if line.trim() == "-- workload" {
            section = 2;
        } else if section == 1 {
            setup.push_str(line);
            setup.push('\n');
        } else if section == 2 {
            workload.push_str(line);
            workload.push('\n');
        }
    }
    if section != 2 {
        return Err(format!("{name}: needs '-- setup' and '-- workload' lines"));
    }
    Ok(Case {
        name: name.to_string(),
        options,
        setup,
        workload,
    })
}

/// Every `<case>.sql` in the fixtures directory, sorted by name.
pub fn load_cases() -> Result<Vec<Case>, String> {
    let dir = fixtures_dir();
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let p = e.map_err(|e| e.to_string())?.path();
        if p.extension().is_some_and(|x| x == "sql") {
            let name = p
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or("bad file name")?
                .to_string();
            let text = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
            out.push(parse_case(&name, &text)?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Runs a SQL script through `psql -f` (statement by statement, each in its own
/// transaction unless the script says BEGIN), as the superuser.
fn run_script(c: &TestCluster, db: &str, sql: &str) -> Result<(), String> {
    let file = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    std::fs::write(file.path(), sql).map_err(|e| e.to_string())?;
    let out = Command::new(c.bindir().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-p", &c.port().to_string(), "-U", c.superuser(), "-d", db])
        .arg("-f")
        .arg(file.path())
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "psql script failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Captures a case in a fresh database on `c`: setup, create slot `s`, workload, then read
/// every change with the case's options. The slot is dropped afterwards.
pub fn capture(c: &TestCluster, case: &Case) -> Result<Vec<Frame>, String> {
    let db = c
        .create_database(&format!("cap_{}", case.name))
        .map_err(|e| e.to_string())?;
    run_script(c, &db, &case.setup)?;
    c.psql(
        &db,
        "SELECT 1 FROM pg_create_logical_replication_slot('s', 'pgoutput')",
    )
    .map_err(|e| e.to_string())?;
    let result = (|| {
        // The harness runs with synchronous_commit off; the SQL decoding functions read only
        // flushed WAL, so the workload's commits must flush before we read.
        run_script(
            c,
            &db,
            &format!("SET synchronous_commit = on;\n{}", case.workload),
        )?;
        // A non-transactional message is not flushed by any commit; a WAL switch flushes it.
        c.psql(&db, "SELECT 1 FROM pg_switch_wal()")
            .map_err(|e| e.to_string())?;
        let mut opts = vec![
            format!("'proto_version', '{}'", case.proto_version()),
            "'publication_names', 'p'".to_string(),
            "'messages', 'true'".to_string(),
        ];
        if case.option("binary") == Some("true") {
            opts.push("'binary', 'true'".into());
        }
        if case.option("streaming") == Some("on") {
            opts.push("'streaming', 'on'".into());
        }
        let mut sql = String::from(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; \
             SET extra_float_digits = 1; ",
        );
        if let Some(mem) = case.option("logical_decoding_work_mem") {
            sql.push_str(&format!("SET logical_decoding_work_mem = '{mem}'; "));
        }
        sql.push_str(&format!(
            "SELECT lsn, xid, encode(data, 'hex') FROM pg_logical_slot_get_binary_changes('s', NULL, NULL, {})",
            opts.join(", ")
        ));
        let out = c.psql(&db, &sql).map_err(|e| e.to_string())?;
        let mut frames = Vec::new();
        for line in out.lines().filter(|l| !l.is_empty()) {
            let mut parts = line.split('|');
            let (Some(lsn), Some(xid), Some(hex), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(format!("unexpected psql line {line:?}"));
            };
            frames.push(Frame {
                lsn: lsn.to_string(),
                xid: xid.parse().map_err(|e| format!("xid {xid:?}: {e}"))?,
                data: hex::decode(hex).map_err(|e| format!("hex: {e}"))?,
            });
        }
        Ok(frames)
    })();
    let _ = c.psql(&db, "SELECT pg_drop_replication_slot('s')");
    let _ = c.psql("postgres", &format!("DROP DATABASE \"{db}\""));
    result
}

/// The `.hex` form: one frame per line, `<lsn> <xid> <hex>`.
pub fn to_hex_file(frames: &[Frame]) -> String {
    let mut s = String::new();
    for f in frames {
        s.push_str(&format!("{} {} {}\n", f.lsn, f.xid, hex::encode(&f.data)));
    }
    s
}

/// Parses the `.hex` form.
pub fn parse_hex_file(text: &str) -> Result<Vec<Frame>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let mut p = l.split_whitespace();
            match (p.next(), p.next(), p.next(), p.next()) {
                (Some(lsn), Some(xid), Some(hex), None) => Ok(Frame {
                    lsn: lsn.to_string(),
                    xid: xid
                        .parse()
                        .map_err(|e| format!("line {}: xid: {e}", i + 1))?,
                    data: hex::decode(hex).map_err(|e| format!("line {}: {e}", i + 1))?,
                }),
                _ => Err(format!("line {}: expected '<lsn> <xid> <hex>'", i + 1)),
            }
        })
        .collect()
}

/// Reads `fixtures/pgoutput/<name>.hex`.
pub fn load_hex(name: &str) -> Result<Vec<Frame>, String> {
    let p = fixtures_dir().join(format!("{name}.hex"));
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    parse_hex_file(&text)
}

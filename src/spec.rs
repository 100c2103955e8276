//! The migration spec file (ARCHITECTURE §6, a contract): parsing, defaults and validation.
//!
//! It owns turning TOML text into a checked [`Spec`], the [`QualifiedName`] type for table
//! names, and [`DbUrl`], a connection URL that can only be shown with its password hidden.
//! It must never print, log or put into an error message a URL's password or the control
//! token, and it must never touch a database: checks that need a server belong to `plan`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;

use serde::Deserialize;

/// Longest migration name: slot and publication names are built from it and PostgreSQL cuts
/// identifiers at 63 bytes, so the prefix `shadowmig_` plus suffixes must still fit.
pub const MAX_NAME_LEN: usize = 40;

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1).
pub const MAX_IDENT_LEN: usize = 63;

/// The schema that holds shadowmig's own state tables in the target database.
pub const STATE_SCHEMA: &str = "shadowmig";

/// Why a spec could not be loaded. Every variant names the file and, where it can, the field.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("spec {file}: cannot read: {reason}")]
    Read {
        /// The file as given.
        file: String,
        /// The I/O error.
        reason: String,
    },
    /// The text is not valid TOML, or a table or key is misplaced or unknown.
    #[error("spec {file}: line {line}{}: {message}", .table.as_ref().map(|t| format!(", in {t}")).unwrap_or_default())]
    Syntax {
        /// The file as given.
        file: String,
        /// 1-based line of the problem.
        line: usize,
        /// The `[table]` the line is in, when known.
        table: Option<String>,
        /// What is wrong (secrets scrubbed).
        message: String,
    },
    /// A field has a value that is not what it must be.
    #[error("spec {file}: {field}: {message}")]
    Field {
        /// The file as given.
        file: String,
        /// The field's path, e.g. `[copy].chunk_rows`.
        field: String,
        /// What was expected and, when it is not secret, what was found.
        message: String,
    },
}

/// A table name: schema and name, both as PostgreSQL stores them (unquoted, case kept).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QualifiedName {
    /// The schema (`public` when the spec gave none).
    pub schema: String,
    /// The table name.
    pub name: String,
}

/// Why a table name could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(String);

/// Quotes an identifier for SQL: wraps it in double quotes and doubles inner double quotes.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes a string as an SQL literal (single quotes doubled; `E''` never needed because
/// `standard_conforming_strings` is on in every supported server).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl QualifiedName {
    /// A name from its parts, taken verbatim.
    pub fn new(schema: &str, name: &str) -> QualifiedName {
        QualifiedName {
            schema: schema.to_string(),
            name: name.to_string(),
        }
    }

    /// `"schema"."name"`, safe to splice into SQL and to pass to `to_regclass`.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Parses `schema.table` or `table` (schema `public`) the way PostgreSQL reads a name:
    /// unquoted parts are folded to lower case, `"quoted"` parts are kept as written with `""`
    /// standing for one `"`.
    pub fn parse(input: &str) -> Result<QualifiedName, NameError> {
        let parts = split_ident_parts(input.trim())?;
        match parts.as_slice() {
            [name] => Ok(QualifiedName::new("public", name)),
            [schema, name] => Ok(QualifiedName::new(schema, name)),
            _ => Err(NameError(format!(
                "expected `schema.table` or `table`, got {} dot-separated parts",
                parts.len()
            ))),
        }
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.quoted())
    }
}

impl FromStr for QualifiedName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QualifiedName::parse(s)
    }
}

fn split_ident_parts(s: &str) -> Result<Vec<String>, NameError> {
    if s.is_empty() {
        return Err(NameError(
            "expected `schema.table` or `table`, got an empty name".into(),
        ));
    }
    let chars: Vec<char> = s.chars().collect();
    let mut parts = Vec::new();
    let mut i = 0;
    loop {
        let mut part = String::new();
        if chars.get(i) == Some(&'"') {
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(NameError("unterminated quoted identifier".into())),
                    Some('"') if chars.get(i + 1) == Some(&'"') => {
                        part.push('"');
                        i += 2;
                    }
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some(c) => {
                        part.push(*c);
                        i += 1;
                    }
                }
            }
            if part.is_empty() {
                return Err(NameError(
                    "a quoted identifier cannot be empty (\"\")".into(),
                ));
            }
        } else {
            while let Some(&c) = chars.get(i) {
                if c == '.' {
                    break;
                }
                let ok = c == '_'
                    || c.is_alphabetic()
                    || (!part.is_empty() && (c.is_ascii_digit() || c == '$'));
                if !ok {
                    return Err(NameError(format!(
                        "character {c:?} is not allowed in an unquoted identifier; quote the part, e.g. \"My Table\""
                    )));
                }
                // PostgreSQL folds only ASCII letters of unquoted identifiers.
                part.push(c.to_ascii_lowercase());
                i += 1;
            }
            if part.is_empty() {
                return Err(NameError(
                    "empty name part (a leading, trailing or doubled dot)".into(),
                ));
            }
        }
        if part.len() > MAX_IDENT_LEN {
            return Err(NameError(format!(
                "identifier is {} bytes long; PostgreSQL keeps at most {MAX_IDENT_LEN}",
                part.len()
            )));
        }
        parts.push(part);
        match chars.get(i) {
            None => break,
            Some('.') => i += 1,
            Some(c) => {
                return Err(NameError(format!(
                    "unexpected {c:?} after a quoted identifier; expected `.` or the end"
                )))
            }
        }
    }
    Ok(parts)
}

/// A PostgreSQL connection URL (or `key=value` string). Its `Display` and `Debug` show it with
/// the password replaced by `***`; the raw text is never exposed.
#[derive(Clone)]
pub struct DbUrl {
    config: tokio_postgres::Config,
}

impl DbUrl {
    /// Parses with `tokio_postgres::Config`; the error never contains the password.
    pub fn parse(raw: &str) -> Result<DbUrl, String> {
        match tokio_postgres::Config::from_str(raw) {
            Ok(config) => {
                if config.get_hosts().is_empty() {
                    return Err("names no host (expected postgres://user@host:port/dbname)".into());
                }
                Ok(DbUrl { config })
            }
            Err(e) => {
                // tokio-postgres puts the reason (e.g. "invalid value for option `port`") in
                // the error's source, not its Display.
                let mut why = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(inner) = src {
                    why.push_str(&format!(": {inner}"));
                    src = inner.source();
                }
                Err(format!(
                    "not a valid PostgreSQL connection URL ({}); expected postgres://user[:password]@host[:port]/dbname",
                    scrub_secrets(&scrub_password_of(&why, raw))
                ))
            }
        }
    }

    /// The parsed configuration, for connecting.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The URL with its password hidden: `postgres://user:***@host:port/dbname`.
    pub fn redacted(&self) -> String {
        let user = self.config.get_user().unwrap_or("");
        let pw = if self.config.get_password().is_some() {
            ":***"
        } else {
            ""
        };
        let at = if user.is_empty() && pw.is_empty() {
            ""
        } else {
            "@"
        };
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    tokio_postgres::config::Host::Tcp(s) => s.clone(),
                    #[cfg(unix)]
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                let ports = self.config.get_ports();
                match ports.get(i).or(if ports.len() == 1 {
                    ports.first()
                } else {
                    None
                }) {
                    Some(p) => format!("{host}:{p}"),
                    None => host,
                }
            })
            .collect();
        let db = self.config.get_dbname().unwrap_or("");
        format!("postgres://{user}{pw}{at}{}/{db}", hosts.join(","))
    }

    /// Whether two URLs name the same server (same hosts and ports).
    pub fn same_server(&self, other: &DbUrl) -> bool {
        self.config.get_hosts() == other.config.get_hosts()
            && self.config.get_ports() == other.config.get_ports()
    }

    /// Whether two URLs name the same database on the same server (same hosts, ports and
    /// database name; users may differ).
    pub fn same_database(&self, other: &DbUrl) -> bool {
        self.config.get_hosts() == other.config.get_hosts()
            && self.config.get_ports() == other.config.get_ports()
            && self.config.get_dbname().or(self.config.get_user())
                == other.config.get_dbname().or(other.config.get_user())
    }
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUrl({})", self.redacted())
    }
}

/// A secret string (the control token): shown as `***` by `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for comparing with what a client sends. Never print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Replaces the `password` part of anything shaped like `scheme://user:password@` and of
/// `password=…` with `***`, so messages from parsers that echo their input stay safe.
pub fn scrub_secrets(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // userinfo ends at the first '@' before any '/', whitespace or quote.
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'' || c == '`')
            .unwrap_or(tail.len());
        let auth = &tail[..end];
        match (auth.rfind('@'), auth.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&auth[..colon]);
                out.push_str(":***");
                out.push_str(&auth[at..]);
            }
            _ => out.push_str(auth),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    // libpq key=value form.
    let mut result = String::with_capacity(out.len());
    let mut s = out.as_str();
    while let Some(pos) = s.find("password=") {
        let (head, tail) = s.split_at(pos + "password=".len());
        result.push_str(head);
        result.push_str("***");
        let end = tail
            .find(|c: char| c.is_whitespace() || c == '"' || c == '`')
            .unwrap_or(tail.len());
        s = &tail[end..];
    }
    result.push_str(s);
    result
}

/// Removes the password found in `raw` (URL or key=value form) from `msg`.
fn scrub_password_of(msg: &str, raw: &str) -> String {
    let mut candidates = Vec::new();
    if let Some(p) = raw.find("://") {
        let tail = &raw[p + 3..];
        let end = tail.find('/').unwrap_or(tail.len());
        let auth = &tail[..end];
        if let (Some(at), Some(colon)) = (auth.rfind('@'), auth.find(':')) {
            if colon < at {
                candidates.push(&auth[colon + 1..at]);
            }
        }
    }
    if let Some(p) = raw.find("password=") {
        let tail = &raw[p + 9..];
        let end = tail.find(char::is_whitespace).unwrap_or(tail.len());
        candidates.push(&tail[..end]);
    }
    let mut out = msg.to_string();
    for c in candidates {
        if !c.is_empty() {
            out = out.replace(c, "***");
        }
    }
    out
}

/// `[source]`: where the live table is.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// Connection to the source database (needs REPLICATION for the slot).
    pub url: DbUrl,
    /// The live table.
    pub table: QualifiedName,
}

/// `[target]`: where the shadow table is.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    /// Connection to the target database; defaults to the source's.
    pub url: DbUrl,
    /// The shadow table.
    pub table: QualifiedName,
    /// DDL that creates the shadow table (may hold several statements, e.g. partitions);
    /// `None` when the table already exists.
    pub create: Option<String>,
}

/// `[copy]`: the backfill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// Rows per chunk (default 10000).
    pub chunk_rows: u64,
    /// Concurrent chunk readers (default 2).
    pub workers: u32,
    /// Build the target's primary key, unique constraints and indexes after the backfill
    /// instead of maintaining them row by row (default false): the copy runs first, without
    /// streaming, then they are built, then the stream is applied from the slot's start
    /// (docs/DECISIONS.md D26).
    pub defer_indexes: bool,
}

/// `[verify]`: the live verification sampler of `run` (see `sampler`).
#[derive(Debug, Clone, PartialEq)]
pub struct VerifySpec {
    /// Share of applied changes whose keys are re-checked, in `[0, 1]` (default 0.01; 0 turns
    /// the changed-key sampling off).
    pub sample_rate: f64,
    /// Random keys of the source and the target re-checked per minute (default 60; 0 turns
    /// random sampling off).
    pub random_keys_per_minute: u64,
}

/// Default `[verify].sample_rate`.
pub const DEFAULT_SAMPLE_RATE: f64 = 0.01;
/// Default `[verify].random_keys_per_minute`.
pub const DEFAULT_RANDOM_KEYS_PER_MINUTE: u64 = 60;

impl Default for VerifySpec {
    fn default() -> Self {
        VerifySpec {
            sample_rate: DEFAULT_SAMPLE_RATE,
            random_keys_per_minute: DEFAULT_RANDOM_KEYS_PER_MINUTE,
        }
    }
}

/// `[throttle]`: when the backfill pauses to protect the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleSpec {
    /// Pause the backfill while the slot holds more than this much WAL (default 1 GiB).
    pub max_lag_bytes: u64,
    /// Pause the backfill while apply is further behind than this (default 30000 ms).
    pub max_apply_lag_ms: u64,
    /// Pause the backfill while a physical standby replays more than this many bytes behind.
    pub max_replica_lag_bytes: Option<u64>,
    /// Upper bound on backfilled rows per second (none by default).
    pub max_rows_per_sec: Option<u64>,
    /// `lock_timeout` for every DDL statement shadowmig runs on a live table (default 5000 ms):
    /// a statement that would queue behind a long lock gives up instead of blocking the app.
    pub lock_timeout_ms: u64,
}

/// `[control]`: the gRPC control API.
#[derive(Debug, Clone)]
pub struct ControlSpec {
    /// Listen address (default 127.0.0.1:7878).
    pub listen: SocketAddr,
    /// Bearer token; required when `listen` is not a loopback address.
    pub token: Option<Secret>,
}

/// A listen address for a server of shadowmig (`[metrics]`, `[proxy]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// Listen address.
    pub listen: SocketAddr,
}

/// A checked migration spec.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The migration id: lowercase letters, digits and `_`, at most 40 characters.
    pub name: String,
    /// `[source]`.
    pub source: SourceSpec,
    /// `[target]`.
    pub target: TargetSpec,
    /// `[transform]`: target column → SQL expression over source columns.
    pub transform: BTreeMap<String, String>,
    /// `[reverse]`: source column → SQL expression over target columns.
    pub reverse: BTreeMap<String, String>,
    /// `[copy]`.
    pub copy: CopySpec,
    /// `[throttle]`.
    pub throttle: ThrottleSpec,
    /// `[control]`.
    pub control: ControlSpec,
    /// `[metrics]`.
    pub metrics: ListenSpec,
    /// `[proxy]`.
    pub proxy: ListenSpec,
    /// `[verify]`.
    pub verify: VerifySpec,
}

/// Default `[copy].chunk_rows`.
pub const DEFAULT_CHUNK_ROWS: u64 = 10_000;
/// Default `[copy].workers`.
pub const DEFAULT_WORKERS: u32 = 2;
/// Default `[throttle].max_lag_bytes` (1 GiB).
pub const DEFAULT_MAX_LAG_BYTES: u64 = 1 << 30;
/// Default `[throttle].max_apply_lag_ms`.
pub const DEFAULT_MAX_APPLY_LAG_MS: u64 = 30_000;
/// Default `[throttle].lock_timeout_ms`.
pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 5_000;
/// Default `[control].listen`.
pub const DEFAULT_CONTROL_LISTEN: &str = "127.0.0.1:7878";
/// Default `[metrics].listen`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9187";
/// Default `[proxy].listen`.
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:6432";

// The raw shape: serde checks the structure (tables, unknown keys); leaf values stay
// `toml::Value` so that every wrong value gets our message naming the field, not serde's.
type V = Option<toml::Value>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: V,
    source: Option<RawSource>,
    target: Option<RawTarget>,
    transform: Option<BTreeMap<String, toml::Value>>,
    reverse: Option<BTreeMap<String, toml::Value>>,
    copy: Option<RawCopy>,
    throttle: Option<RawThrottle>,
    control: Option<RawControl>,
    metrics: Option<RawListen>,
    proxy: Option<RawListen>,
    verify: Option<RawVerify>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    sample_rate: V,
    random_keys_per_minute: V,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    url: V,
    table: V,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    url: V,
    table: V,
    create: V,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCopy {
    chunk_rows: V,
    workers: V,
    defer_indexes: V,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawThrottle {
    max_lag_bytes: V,
    max_apply_lag_ms: V,
    max_replica_lag_bytes: V,
    max_rows_per_sec: V,
    lock_timeout_ms: V,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawControl {
    listen: V,
    token: V,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawListen {
    listen: V,
}

/// A short, non-secret rendering of a TOML value for "got …" in messages.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => {
            let s = scrub_secrets(s);
            if s.chars().count() > 60 {
                format!("{:?}…", s.chars().take(60).collect::<String>())
            } else {
                format!("{s:?}")
            }
        }
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(_) => "an array".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> SpecError {
        SpecError::Field {
            file: self.file.to_string(),
            field: field.to_string(),
            message: message.into(),
        }
    }

    fn required<'v>(
        &self,
        field: &str,
        v: &'v V,
        what: &str,
    ) -> Result<&'v toml::Value, SpecError> {
        v.as_ref()
            .ok_or_else(|| self.err(field, format!("missing; expected {what}")))
    }

    fn string(&self, field: &str, v: &toml::Value, what: &str) -> Result<String, SpecError> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            other => Err(self.err(field, format!("expected {what}, got {}", show(other)))),
        }
    }

    fn boolean(&self, field: &str, v: &V, default: bool) -> Result<bool, SpecError> {
        match v {
            None => Ok(default),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(other) => Err(self.err(
                field,
                format!("expected true or false, got {}", show(other)),
            )),
        }
    }

    fn positive(&self, field: &str, v: &V, default: u64, max: u64) -> Result<u64, SpecError> {
        match v {
            None => Ok(default),
            Some(v) => self.positive_value(field, v, max),
        }
    }

    fn positive_value(&self, field: &str, v: &toml::Value, max: u64) -> Result<u64, SpecError> {
        match v {
            toml::Value::Integer(i) if *i > 0 && (*i as u64) <= max => Ok(*i as u64),
            toml::Value::Integer(i) if *i > 0 => Err(self.err(
                field,
                format!("expected a positive integer at most {max}, got {i}"),
            )),
            other => Err(self.err(
                field,
                format!("expected a positive integer, got {}", show(other)),
            )),
        }
    }

    fn table_name(&self, field: &str, v: &V) -> Result<QualifiedName, SpecError> {
        let what = "a table name like `schema.table` or `table`";
        let s = self.string(field, self.required(field, v, what)?, what)?;
        QualifiedName::parse(&s).map_err(|e| self.err(field, format!("{e} (got {s:?})")))
    }

    fn url(&self, field: &str, v: &toml::Value) -> Result<DbUrl, SpecError> {
        let what = "a connection URL like postgres://user@host:5432/dbname";
        match v {
            // Never echo the value: it may hold a password.
            toml::Value::String(s) => DbUrl::parse(s).map_err(|e| self.err(field, e)),
            _ => Err(self.err(field, format!("expected {what} (a string)"))),
        }
    }

    fn listen(&self, field: &str, v: &V, default: &str) -> Result<SocketAddr, SpecError> {
        let what = "an address like 127.0.0.1:7878 (IP and port)";
        let s = match v {
            None => default.to_string(),
            Some(v) => self.string(field, v, what)?,
        };
        s.parse::<SocketAddr>()
            .map_err(|_| self.err(field, format!("expected {what}, got {s:?}")))
    }

    fn expressions(
        &self,
        section: &str,
        m: &Option<BTreeMap<String, toml::Value>>,
        what_key: &str,
    ) -> Result<BTreeMap<String, String>, SpecError> {
        let mut out = BTreeMap::new();
        for (k, v) in m.iter().flatten() {
            let field = format!("[{section}].{}", display_key(k));
            if k.is_empty() {
                return Err(self.err(
                    &field,
                    format!("expected a {what_key} name, got an empty key"),
                ));
            }
            let expr = self.string(&field, v, "an SQL expression (a string)")?;
            if expr.trim().is_empty() {
                return Err(self.err(&field, "expected an SQL expression, got an empty string"));
            }
            out.insert(k.clone(), expr);
        }
        Ok(out)
    }
}

fn display_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_string()
    } else {
        format!("{k:?}")
    }
}

/// Checks a migration id: lowercase ASCII letters, digits and `_`, 1 to 40 characters.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(
            "expected a migration id (lowercase letters, digits, underscore), got an empty string"
                .into(),
        );
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "expected at most {MAX_NAME_LEN} characters (it names the replication slot and publication), got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'))
    {
        return Err(format!(
            "expected only lowercase letters, digits and underscore (it names the replication slot and publication), found {c:?} in {name:?}"
        ));
    }
    Ok(())
}

fn toml_error(file: &str, text: &str, e: &toml::de::Error) -> SpecError {
    let (line, table) = match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            // A span off a char boundary must not panic: fall back to the whole text.
            let before = text.get(..start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            // The innermost `[table]` header above the problem, for orientation.
            let table = before
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| l.starts_with('[') && l.contains(']'))
                .map(|l| l[..=l.find(']').unwrap_or(l.len() - 1)].to_string());
            (line, table)
        }
        None => (0, None),
    };
    // The message only, never toml's Display: that quotes the offending source line, which
    // may be a URL with a password in it.
    SpecError::Syntax {
        file: file.to_string(),
        line,
        table,
        message: scrub_secrets(
            &e.message()
                .trim()
                .lines()
                .map(str::trim)
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

impl Spec {
    /// Reads and checks the spec at `path`.
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| SpecError::Read {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        Spec::parse(&text, &file)
    }

    /// Parses and checks spec text; `file` names it in messages.
    pub fn parse(text: &str, file: &str) -> Result<Spec, SpecError> {
        let raw: RawSpec = toml::from_str(text).map_err(|e| toml_error(file, text, &e))?;
        let cx = Ctx { file };

        let name_what = "a migration id (lowercase letters, digits, underscore; at most 40)";
        let name = cx.string(
            "name",
            cx.required("name", &raw.name, name_what)?,
            name_what,
        )?;
        validate_name(&name).map_err(|m| cx.err("name", m))?;

        let src = raw.source.ok_or_else(|| {
            cx.err(
                "[source]",
                "missing; expected a table with `url` and `table`",
            )
        })?;
        let src_url = cx.url(
            "[source].url",
            cx.required("[source].url", &src.url, "a connection URL")?,
        )?;
        let src_table = cx.table_name("[source].table", &src.table)?;

        let tgt = raw.target.ok_or_else(|| {
            cx.err(
                "[target]",
                "missing; expected a table with at least `table`",
            )
        })?;
        let tgt_url = match &tgt.url {
            None => src_url.clone(),
            Some(v) => cx.url("[target].url", v)?,
        };
        let tgt_table = cx.table_name("[target].table", &tgt.table)?;
        let create = match &tgt.create {
            None => None,
            Some(v) => {
                let s = cx.string(
                    "[target].create",
                    v,
                    "SQL that creates the target table (a string)",
                )?;
                if s.trim().is_empty() {
                    return Err(cx.err("[target].create", "expected SQL that creates the target table, got an empty string; leave the key out when the table exists"));
                }
                if let Some(bad) = transaction_control(&s) {
                    return Err(cx.err("[target].create", format!("must not contain transaction control ({bad}): plan runs it in a transaction it rolls back, and run in one it commits")));
                }
                Some(s)
            }
        };
        if src_url.same_database(&tgt_url) && src_table == tgt_table {
            return Err(cx.err(
                "[target].table",
                format!(
                    "must differ from [source].table in the same database (both are {src_table})"
                ),
            ));
        }

        let transform = cx.expressions("transform", &raw.transform, "target column")?;
        let reverse = cx.expressions("reverse", &raw.reverse, "source column")?;

        let c = raw.copy.unwrap_or_default();
        let copy = CopySpec {
            chunk_rows: cx.positive(
                "[copy].chunk_rows",
                &c.chunk_rows,
                DEFAULT_CHUNK_ROWS,
                100_000_000,
            )?,
            workers: cx.positive("[copy].workers", &c.workers, DEFAULT_WORKERS as u64, 64)? as u32,
            defer_indexes: cx.boolean("[copy].defer_indexes", &c.defer_indexes, false)?,
        };

        let t = raw.throttle.unwrap_or_default();
        let opt = |field: &str, v: &V| -> Result<Option<u64>, SpecError> {
            match v {
                None => Ok(None),
                Some(v) => cx.positive_value(field, v, i64::MAX as u64).map(Some),
            }
        };
        let throttle = ThrottleSpec {
            max_lag_bytes: cx.positive(
                "[throttle].max_lag_bytes",
                &t.max_lag_bytes,
                DEFAULT_MAX_LAG_BYTES,
                i64::MAX as u64,
            )?,
            max_apply_lag_ms: cx.positive(
                "[throttle].max_apply_lag_ms",
                &t.max_apply_lag_ms,
                DEFAULT_MAX_APPLY_LAG_MS,
                i64::MAX as u64,
            )?,
            max_replica_lag_bytes: opt(
                "[throttle].max_replica_lag_bytes",
                &t.max_replica_lag_bytes,
            )?,
            max_rows_per_sec: opt("[throttle].max_rows_per_sec", &t.max_rows_per_sec)?,
            lock_timeout_ms: cx.positive(
                "[throttle].lock_timeout_ms",
                &t.lock_timeout_ms,
                DEFAULT_LOCK_TIMEOUT_MS,
                3_600_000,
            )?,
        };

        let ctl = raw.control.unwrap_or_default();
        let listen = cx.listen("[control].listen", &ctl.listen, DEFAULT_CONTROL_LISTEN)?;
        let token = match &ctl.token {
            None => None,
            Some(toml::Value::String(s)) if !s.is_empty() => Some(Secret(s.clone())),
            Some(toml::Value::String(_)) => {
                return Err(cx.err(
                    "[control].token",
                    "expected a non-empty string, got an empty one",
                ))
            }
            // Never echo: it is a secret.
            Some(_) => return Err(cx.err("[control].token", "expected a string")),
        };
        if !listen.ip().is_loopback() && token.is_none() {
            return Err(cx.err(
                "[control].token",
                format!("required when [control].listen is not a loopback address (it is {listen}); set a token or listen on 127.0.0.1"),
            ));
        }
        let metrics = ListenSpec {
            listen: cx.listen(
                "[metrics].listen",
                &raw.metrics.unwrap_or_default().listen,
                DEFAULT_METRICS_LISTEN,
            )?,
        };
        let proxy = ListenSpec {
            listen: cx.listen(
                "[proxy].listen",
                &raw.proxy.unwrap_or_default().listen,
                DEFAULT_PROXY_LISTEN,
            )?,
        };
        let v = raw.verify.unwrap_or_default();
        let verify = VerifySpec {
            sample_rate: match &v.sample_rate {
                None => DEFAULT_SAMPLE_RATE,
                Some(x) => {
                    let f = match x {
                        toml::Value::Float(f) => Some(*f),
                        toml::Value::Integer(i) => Some(*i as f64),
                        _ => None,
                    };
                    match f {
                        Some(f) if (0.0..=1.0).contains(&f) => f,
                        _ => {
                            return Err(cx.err(
                                "[verify].sample_rate",
                                format!(
                                    "expected a fraction from 0 to 1 (e.g. 0.01), got {}",
                                    show(x)
                                ),
                            ))
                        }
                    }
                }
            },
            random_keys_per_minute: match &v.random_keys_per_minute {
                None => DEFAULT_RANDOM_KEYS_PER_MINUTE,
                Some(toml::Value::Integer(i)) if (0..=1_000_000).contains(i) => *i as u64,
                Some(x) => {
                    return Err(cx.err(
                        "[verify].random_keys_per_minute",
                        format!("expected an integer from 0 to 1000000, got {}", show(x)),
                    ))
                }
            },
        };

        Ok(Spec {
            name,
            source: SourceSpec {
                url: src_url,
                table: src_table,
            },
            target: TargetSpec {
                url: tgt_url,
                table: tgt_table,
                create,
            },
            transform,
            reverse,
            copy,
            throttle,
            control: ControlSpec { listen, token },
            metrics,
            proxy,
            verify,
        })
    }

    /// The replication slot's name (`shadowmig_<name>`).
    pub fn slot_name(&self) -> String {
        format!("shadowmig_{}", self.name)
    }

    /// The publication's name (`shadowmig_<name>`).
    pub fn publication_name(&self) -> String {
        format!("shadowmig_{}", self.name)
    }

    /// Whether source and target are the same database.
    pub fn same_database(&self) -> bool {
        self.source.url.same_database(&self.target.url)
    }
}

/// The first word (upper case) of each statement in `sql`, skipping comments and the insides of
/// quoted strings, quoted identifiers and dollar-quoted bodies.
pub fn statement_heads(sql: &str) -> Vec<String> {
    let b: Vec<char> = sql.chars().collect();
    let mut heads = Vec::new();
    let mut i = 0;
    let mut at_start = true;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '-' && next == Some('-') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            continue;
        }
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == ';' {
            at_start = true;
            i += 1;
            continue;
        }
        if at_start && (c.is_alphabetic() || c == '_') {
            let start = i;
            while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                i += 1;
            }
            heads.push(b[start..i].iter().collect::<String>().to_uppercase());
            at_start = false;
            continue;
        }
        at_start = false;
        match c {
            '\'' => {
                let escapes = i > 0 && matches!(b[i - 1], 'E' | 'e');
                i += 1;
                while i < b.len() {
                    // A backslash escape (E'' strings) or a doubled quote: two chars.
                    if (escapes && b[i] == '\\') || (b[i] == '\'' && b.get(i + 1) == Some(&'\'')) {
                        i += 2;
                    } else if b[i] == '\'' {
                        i += 1;
                        break;
                    } else {
                        i += 1;
                    }
                }
            }
            '"' => {
                i += 1;
                while i < b.len() {
                    if b[i] == '"' && b.get(i + 1) == Some(&'"') {
                        i += 2;
                    } else if b[i] == '"' {
                        i += 1;
                        break;
                    } else {
                        i += 1;
                    }
                }
            }
            '$' => {
                // $tag$ … $tag$ (tag empty or an identifier).
                let mut j = i + 1;
                while j < b.len() && (b[j].is_alphanumeric() || b[j] == '_') {
                    j += 1;
                }
                if b.get(j) == Some(&'$') {
                    let tag: String = b[i..=j].iter().collect();
                    let rest: String = b[j + 1..].iter().collect();
                    match rest.find(&tag) {
                        Some(pos) => i = j + 1 + rest[..pos].chars().count() + tag.chars().count(),
                        None => i = b.len(),
                    }
                } else {
                    i = j;
                }
            }
            _ => i += 1,
        }
    }
    heads
}

/// The first transaction-control statement in `sql`, if any (BEGIN, COMMIT, ROLLBACK, …).
pub fn transaction_control(sql: &str) -> Option<String> {
    const TC: [&str; 9] = [
        "BEGIN",
        "START",
        "COMMIT",
        "END",
        "ROLLBACK",
        "ABORT",
        "SAVEPOINT",
        "RELEASE",
        "PREPARE",
    ];
    statement_heads(sql)
        .into_iter()
        .find(|h| TC.contains(&h.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_hides_url_and_keyvalue_passwords() {
        assert_eq!(
            scrub_secrets("x postgres://a:s3cret@h:1/db y"),
            "x postgres://a:***@h:1/db y"
        );
        assert_eq!(
            scrub_secrets("host=h password=s3cret user=a"),
            "host=h password=*** user=a"
        );
        assert_eq!(scrub_secrets("postgres://a@h/db"), "postgres://a@h/db");
    }

    #[test]
    fn statement_heads_skip_quotes_and_comments() {
        let sql = "CREATE TABLE \"x;commit\" (a text DEFAULT 'a;COMMIT'); -- ; commit\n\
                   /* ; ROLLBACK */ CREATE FUNCTION f() RETURNS int AS $b$ SELECT 1; COMMIT; $b$ LANGUAGE sql;\n\
                   comment ON TABLE x IS E'it\\'s; end'";
        assert_eq!(statement_heads(sql), vec!["CREATE", "CREATE", "COMMENT"]);
        assert_eq!(transaction_control(sql), None);
        assert_eq!(
            transaction_control("CREATE TABLE a (b int); commit; CREATE TABLE c (d int)"),
            Some("COMMIT".into())
        );
    }

    #[test]
    fn names_round_trip() {
        let n = QualifiedName::parse(r#""Shop ""EU"""."Orders ✓""#).unwrap();
        assert_eq!(n.schema, "Shop \"EU\"");
        assert_eq!(n.name, "Orders ✓");
        assert_eq!(QualifiedName::parse(&n.quoted()).unwrap(), n);
    }
}

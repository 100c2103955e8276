//! The walsender session before streaming: connect, start up with `replication=database`,
//! authenticate, and run simple queries and replication commands.
//!
//! Owns the framing of backend messages (tag, length, body) and the parsing of the few message
//! bodies we need. It does not call `postgres_protocol::message::backend::Message::parse`: that
//! parser consumes a frame with a tag it does not know (CopyBothResponse `W`) and then fails, so
//! we split frames ourselves and look at the tag first. It must never write the password or the
//! connection string into an error or a log line.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::{Host, SslMode};

use super::stream::{LogicalStream, PgOutputOptions, StreamConfig};
use super::{ReplicationError, ServerError};
use crate::lsn::Lsn;

/// Anything we can speak the protocol over (TCP or a Unix socket).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A boxed connection: one type for TCP and Unix sockets.
pub(crate) type BoxIo = Box<dyn Io>;

/// Largest backend message we accept (PostgreSQL's own limit for a message is 1 GB).
const MAX_FRAME: usize = 1 << 30;
/// How much we ask the socket for at once: big reads keep syscalls per message low.
pub(crate) const READ_CHUNK: usize = 256 * 1024;

/// One backend message: its tag and its body (without tag and length).
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) tag: u8,
    pub(crate) body: Bytes,
}

/// Splits one complete backend message off `buf` without copying, if one is there.
pub(crate) fn try_frame(buf: &mut BytesMut) -> Result<Option<Frame>, ReplicationError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=MAX_FRAME).contains(&len) {
        return Err(ReplicationError::Protocol(format!(
            "message {:?} with impossible length {len}",
            tag as char
        )));
    }
    let total = 1 + len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(5);
    Ok(Some(Frame {
        tag,
        body: frame.freeze(),
    }))
}

/// Reads one backend message, waiting for the socket when `buf` holds no complete one.
pub(crate) async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, ReplicationError> {
    loop {
        if let Some(f) = try_frame(buf)? {
            return Ok(f);
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match r.read_buf(buf).await {
            Ok(0) => {
                return Err(ReplicationError::ConnectionLost(
                    "the server closed the connection".into(),
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(ReplicationError::ConnectionLost(e.to_string())),
        }
    }
}

/// A bounds-checked reader over a message body.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }

    fn short(&self) -> ReplicationError {
        ReplicationError::Protocol(format!("{} message is truncated", self.what))
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ReplicationError> {
        if self.buf.len() < n {
            return Err(self.short());
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ReplicationError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn i16(&mut self) -> Result<i16, ReplicationError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, ReplicationError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ReplicationError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, ReplicationError> {
        Ok(self.u64()? as i64)
    }

    pub(crate) fn cstr(&mut self) -> Result<&'a str, ReplicationError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.short())?;
        let s = std::str::from_utf8(&self.buf[..end]).map_err(|_| {
            ReplicationError::Protocol(format!("{} message has a non-UTF-8 string", self.what))
        })?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

/// Parses the fields of an ErrorResponse or NoticeResponse.
pub(crate) fn parse_error(body: &[u8]) -> ServerError {
    let mut e = ServerError {
        severity: "ERROR".into(),
        code: "XX000".into(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    let mut c = Cursor::new(body, "ErrorResponse");
    let mut localized_severity = None;
    while let Ok(kind) = c.u8() {
        if kind == 0 {
            break;
        }
        let Ok(value) = c.cstr() else { break };
        match kind {
            b'V' => e.severity = value.to_string(),
            b'S' => localized_severity = Some(value.to_string()),
            b'C' => e.code = value.to_string(),
            b'M' => e.message = value.to_string(),
            b'D' => e.detail = Some(value.to_string()),
            b'H' => e.hint = Some(value.to_string()),
            _ => {}
        }
    }
    // `V` (never localized) exists since 9.6; fall back to the localized one before that.
    if let (Some(s), true) = (localized_severity, e.severity == "ERROR") {
        if !s.is_empty() {
            e.severity = s;
        }
    }
    e
}

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier (decimal text, a 64-bit number).
    pub systemid: String,
    /// The current timeline.
    pub timeline: u32,
    /// The current WAL flush position.
    pub xlogpos: Lsn,
    /// The database this session is connected to (`None` for a physical session).
    pub dbname: Option<String>,
}

/// What `CREATE_REPLICATION_SLOT` does with a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAction {
    /// `SNAPSHOT 'export'`: export a snapshot that another session can import with
    /// `SET TRANSACTION SNAPSHOT` until the next command on this connection.
    Export,
    /// `SNAPSHOT 'nothing'`: no snapshot.
    Nothing,
    /// `SNAPSHOT 'use'`: use the snapshot in this session's open transaction.
    Use,
}

impl SnapshotAction {
    fn as_sql(self) -> &'static str {
        match self {
            SnapshotAction::Export => "export",
            SnapshotAction::Nothing => "nothing",
            SnapshotAction::Use => "use",
        }
    }
}

/// The answer to `CREATE_REPLICATION_SLOT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// The slot's name.
    pub slot_name: String,
    /// The first LSN from which the slot can stream: changes committed after it are sent.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, with [`SnapshotAction::Export`].
    pub snapshot_name: Option<String>,
    /// The output plugin (`pgoutput`).
    pub output_plugin: Option<String>,
}

/// The rows and column names of a simple query.
struct QueryResult {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

impl QueryResult {
    fn single_row(
        self,
        what: &str,
    ) -> Result<(Vec<String>, Vec<Option<String>>), ReplicationError> {
        let QueryResult { columns, mut rows } = self;
        if rows.len() != 1 {
            return Err(ReplicationError::Protocol(format!(
                "{what} returned {} rows, expected 1",
                rows.len()
            )));
        }
        let row = rows.pop().unwrap_or_default();
        Ok((columns, row))
    }
}

fn column<'a>(
    columns: &[String],
    row: &'a [Option<String>],
    name: &str,
    what: &str,
) -> Result<Option<&'a str>, ReplicationError> {
    let i = columns.iter().position(|c| c == name).ok_or_else(|| {
        ReplicationError::Protocol(format!("{what} answered without a column {name:?}"))
    })?;
    Ok(row.get(i).and_then(|v| v.as_deref()))
}

fn parse_lsn(text: Option<&str>, what: &str) -> Result<Lsn, ReplicationError> {
    let t = text.ok_or_else(|| ReplicationError::Protocol(format!("{what}: LSN is NULL")))?;
    t.parse()
        .map_err(|e| ReplicationError::Protocol(format!("{what}: {e}")))
}

/// Checks a replication slot name against PostgreSQL's rule (`ReplicationSlotValidateName`):
/// 1 to 63 characters, lower-case letters, digits and underscores. The server rejects others
/// anyway; rejecting them here keeps them out of the command text.
pub(crate) fn validate_slot_name(name: &str) -> Result<(), ReplicationError> {
    let reason = if name.is_empty() {
        Some("a slot name must not be empty")
    } else if name.len() > 63 {
        Some("a slot name has at most 63 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        Some("a slot name may contain only lower-case letters, digits and underscores")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ReplicationError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Quotes an identifier for the replication grammar (and SQL): `"` doubled, wrapped in `"`.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal: `'` doubled. The replication grammar has no backslash escapes.
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A `replication=database` session, before `START_REPLICATION`.
pub struct ReplicationClient {
    io: BoxIo,
    /// The socket's descriptor when `io` is TCP (for the stream's receive low-water mark).
    tcp_fd: Option<RawFd>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// `host:port` for messages (never the user, password or database).
    target: String,
    params: HashMap<String, String>,
}

impl std::fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Turns a connection-string parse error into text that cannot hold the password: only
/// messages that name an option (never its value) are passed on.
fn config_error(e: &tokio_postgres::Error) -> ReplicationError {
    let detail = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_default();
    if detail.starts_with("invalid value for option") || detail.starts_with("unknown option") {
        ReplicationError::Config(detail)
    } else {
        ReplicationError::Config(
            "malformed: expected a postgres:// URL or a key=value list (details withheld, they \
             may include the password)"
                .into(),
        )
    }
}

impl ReplicationClient {
    /// Connects with a `postgres://` URL or a `key=value` connection string and starts a
    /// `replication=database` session. Honours `host` (TCP names or a Unix socket directory;
    /// several are tried in order), `port`, `user`, `password`, `dbname`, `application_name`
    /// and `connect_timeout` (which bounds connecting and authenticating, per host). TLS is
    /// not supported: `sslmode=require` is refused, `prefer` connects in plain text. Without a
    /// host, `localhost` is used; without a port, 5432; a user is required. `hostaddr`,
    /// `options` and environment variables (`PGPASSWORD`, …) are not used.
    pub async fn connect(url_or_conninfo: &str) -> Result<Self, ReplicationError> {
        let config =
            tokio_postgres::Config::from_str(url_or_conninfo).map_err(|e| config_error(&e))?;
        Self::connect_config(&config).await
    }

    /// Like [`ReplicationClient::connect`], with an already parsed configuration.
    pub async fn connect_config(config: &tokio_postgres::Config) -> Result<Self, ReplicationError> {
        if config.get_ssl_mode() == SslMode::Require {
            return Err(ReplicationError::Config(
                "sslmode=require: TLS is not supported by the replication connection".into(),
            ));
        }
        let user = config
            .get_user()
            .ok_or_else(|| ReplicationError::Config("no user given".into()))?
            .to_string();
        let mut hosts: Vec<Host> = config.get_hosts().to_vec();
        if hosts.is_empty() {
            hosts.push(Host::Tcp("localhost".into()));
        }
        let ports = config.get_ports();
        let timeout = config.get_connect_timeout().copied();
        let mut last_err = None;
        for (i, host) in hosts.iter().enumerate() {
            let port = match ports.len() {
                0 => 5432,
                1 => ports[0],
                _ => *ports.get(i).unwrap_or(&5432),
            };
            let target = match host {
                Host::Tcp(h) => format!("{h}:{port}"),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            };
            let attempt = Self::connect_one(host, port, target.clone(), &user, config);
            let res = match timeout {
                Some(t) => tokio::time::timeout(t, attempt)
                    .await
                    .unwrap_or(Err(ReplicationError::ConnectTimeout(target))),
                None => attempt.await,
            };
            match res {
                Ok(c) => return Ok(c),
                // The server answered: another host would not change its mind.
                Err(e @ (ReplicationError::Server(_) | ReplicationError::Auth(_))) => {
                    return Err(e)
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| ReplicationError::Config("no host".into())))
    }

    async fn connect_one(
        host: &Host,
        port: u16,
        target: String,
        user: &str,
        config: &tokio_postgres::Config,
    ) -> Result<Self, ReplicationError> {
        let mut tcp_fd = None;
        let io: BoxIo = match host {
            Host::Tcp(h) => {
                let s = tokio::net::TcpStream::connect((h.as_str(), port))
                    .await
                    .map_err(|source| ReplicationError::Connect {
                        target: target.clone(),
                        source,
                    })?;
                // Status updates are tiny: do not let Nagle hold them back.
                let _ = s.set_nodelay(true);
                tcp_fd = Some(s.as_raw_fd());
                Box::new(s)
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|source| ReplicationError::Connect {
                        target: target.clone(),
                        source,
                    })?;
                Box::new(s)
            }
        };
        let mut client = ReplicationClient {
            io,
            tcp_fd,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::with_capacity(1024),
            target,
            params: HashMap::new(),
        };
        client.startup(user, config).await?;
        Ok(client)
    }

    async fn send(&mut self) -> Result<(), ReplicationError> {
        let res = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        }
        .await;
        self.wbuf.clear();
        res.map_err(|e| ReplicationError::ConnectionLost(e.to_string()))
    }

    async fn recv(&mut self) -> Result<Frame, ReplicationError> {
        read_frame(&mut self.io, &mut self.rbuf).await
    }

    async fn startup(
        &mut self,
        user: &str,
        config: &tokio_postgres::Config,
    ) -> Result<(), ReplicationError> {
        let dbname = config.get_dbname().unwrap_or(user).to_string();
        let app = config.get_application_name().unwrap_or("shadowmig");
        let params = [
            ("user", user),
            ("database", dbname.as_str()),
            ("replication", "database"),
            ("application_name", app),
            ("client_encoding", "UTF8"),
        ];
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)
            .map_err(|e| ReplicationError::Protocol(format!("startup message: {e}")))?;
        self.send().await?;
        self.authenticate(user, config.get_password()).await?;
        // After AuthenticationOk: parameters, key data, then ReadyForQuery (or an error).
        loop {
            let f = self.recv().await?;
            match f.tag {
                b'S' => self.parameter_status(&f.body)?,
                b'K' | b'N' => {}
                b'Z' => return Ok(()),
                b'E' => return Err(ReplicationError::Server(parse_error(&f.body))),
                t => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} during startup",
                        t as char
                    )))
                }
            }
        }
    }

    fn parameter_status(&mut self, body: &[u8]) -> Result<(), ReplicationError> {
        let mut c = Cursor::new(body, "ParameterStatus");
        let name = c.cstr()?.to_string();
        let value = c.cstr()?.to_string();
        self.params.insert(name, value);
        Ok(())
    }

    fn need_password(password: Option<&[u8]>) -> Result<&[u8], ReplicationError> {
        password.ok_or_else(|| {
            ReplicationError::Auth("the server asks for a password and none was given".into())
        })
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&[u8]>,
    ) -> Result<(), ReplicationError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = self.recv().await?;
            match f.tag {
                b'R' => {}
                b'E' => return Err(ReplicationError::Server(parse_error(&f.body))),
                t => {
                    return Err(ReplicationError::Protocol(format!(
                        "expected an authentication request, got {:?}",
                        t as char
                    )))
                }
            }
            let mut c = Cursor::new(&f.body, "Authentication");
            let bad = |e: std::io::Error| ReplicationError::Auth(format!("SCRAM: {e}"));
            match c.i32()? {
                0 => return Ok(()),
                3 => {
                    let pw = Self::need_password(password)?;
                    frontend::password_message(pw, &mut self.wbuf)
                        .map_err(|e| ReplicationError::Auth(e.to_string()))?;
                    self.send().await?;
                }
                5 => {
                    let pw = Self::need_password(password)?;
                    let s = c.take(4)?;
                    let salt = [s[0], s[1], s[2], s[3]];
                    let hash = md5_hash(user.as_bytes(), pw, salt);
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)
                        .map_err(|e| ReplicationError::Auth(e.to_string()))?;
                    self.send().await?;
                }
                10 => {
                    let pw = Self::need_password(password)?;
                    let mut mechanisms = Vec::new();
                    loop {
                        let m = c.cstr()?;
                        if m.is_empty() {
                            break;
                        }
                        mechanisms.push(m.to_string());
                    }
                    if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                        return Err(ReplicationError::Auth(format!(
                            "the server offers only SASL mechanisms {mechanisms:?}; \
                             supported: {SCRAM_SHA_256} (channel binding needs TLS, which we \
                             do not speak)"
                        )));
                    }
                    // No TLS, so no channel binding: the "n" (client does not support it)
                    // variant, which a server that offers no -PLUS mechanism accepts.
                    let s = ScramSha256::new(pw, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)
                        .map_err(bad)?;
                    scram = Some(s);
                    self.send().await?;
                }
                11 => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL continue before SASL start".into())
                    })?;
                    s.update(c.rest()).map_err(bad)?;
                    frontend::sasl_response(s.message(), &mut self.wbuf).map_err(bad)?;
                    self.send().await?;
                }
                12 => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL final before SASL start".into())
                    })?;
                    s.finish(c.rest()).map_err(bad)?;
                }
                2 => {
                    return Err(ReplicationError::Auth(
                        "Kerberos V5 is not supported".into(),
                    ))
                }
                7 | 8 => return Err(ReplicationError::Auth("GSSAPI is not supported".into())),
                9 => return Err(ReplicationError::Auth("SSPI is not supported".into())),
                n => {
                    return Err(ReplicationError::Auth(format!(
                        "unknown authentication request {n}"
                    )))
                }
            }
        }
    }

    /// The server's reported parameters (`server_version`, `integer_datetimes`, …).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// Runs one statement (or several separated by `;`) with the simple query protocol and
    /// returns every row as text. Plain SQL such as `SELECT pg_current_wal_lsn()` or
    /// `SHOW wal_level` works on a `replication=database` session, as do replication commands.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        Ok(self.query(sql).await?.rows)
    }

    async fn query(&mut self, sql: &str) -> Result<QueryResult, ReplicationError> {
        frontend::query(sql, &mut self.wbuf)
            .map_err(|e| ReplicationError::Protocol(format!("query text: {e}")))?;
        self.send().await?;
        let mut out = QueryResult {
            columns: Vec::new(),
            rows: Vec::new(),
        };
        let mut error = None;
        loop {
            let f = self.recv().await?;
            match f.tag {
                b'T' => out.columns = parse_row_description(&f.body)?,
                b'D' => out.rows.push(parse_data_row(&f.body)?),
                b'C' | b'I' | b'K' => {}
                b'N' => {
                    let n = parse_error(&f.body);
                    tracing::debug!(code = %n.code, message = %n.message, "server notice");
                }
                b'S' => self.parameter_status(&f.body)?,
                b'E' => error = Some(parse_error(&f.body)),
                b'Z' => {
                    return match error {
                        Some(e) => Err(ReplicationError::Server(e)),
                        None => Ok(out),
                    }
                }
                b'G' => {
                    // COPY FROM STDIN: refuse it so the session stays usable.
                    frontend::copy_fail(
                        "shadowmig: COPY FROM STDIN is not supported here",
                        &mut self.wbuf,
                    )
                    .map_err(|e| ReplicationError::Protocol(e.to_string()))?;
                    self.send().await?;
                }
                b'H' | b'W' => {
                    return Err(ReplicationError::Protocol(
                        "the statement started a COPY stream; use start_logical for \
                         START_REPLICATION"
                            .into(),
                    ))
                }
                t => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} in a query response",
                        t as char
                    )))
                }
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: the cluster's id, timeline, current WAL position and database.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        const WHAT: &str = "IDENTIFY_SYSTEM";
        let (cols, row) = self.query(WHAT).await?.single_row(WHAT)?;
        let systemid = column(&cols, &row, "systemid", WHAT)?
            .unwrap_or_default()
            .to_string();
        let timeline = column(&cols, &row, "timeline", WHAT)?
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| ReplicationError::Protocol(format!("{WHAT}: bad timeline")))?;
        let xlogpos = parse_lsn(column(&cols, &row, "xlogpos", WHAT)?, WHAT)?;
        let dbname = column(&cols, &row, "dbname", WHAT)?.map(str::to_string);
        Ok(SystemIdentity {
            systemid,
            timeline,
            xlogpos,
            dbname,
        })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput (SNAPSHOT '…')`. A temporary
    /// slot is dropped when this session ends. An exported snapshot stays valid only until the
    /// next command on this session.
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        temporary: bool,
        snapshot: SnapshotAction,
    ) -> Result<CreatedSlot, ReplicationError> {
        const WHAT: &str = "CREATE_REPLICATION_SLOT";
        validate_slot_name(name)?;
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput (SNAPSHOT '{}')",
            quote_ident(name),
            if temporary { " TEMPORARY" } else { "" },
            snapshot.as_sql()
        );
        let (cols, row) = self.query(&sql).await?.single_row(WHAT)?;
        Ok(CreatedSlot {
            slot_name: column(&cols, &row, "slot_name", WHAT)?
                .unwrap_or(name)
                .to_string(),
            consistent_point: parse_lsn(column(&cols, &row, "consistent_point", WHAT)?, WHAT)?,
            snapshot_name: column(&cols, &row, "snapshot_name", WHAT)?.map(str::to_string),
            output_plugin: column(&cols, &row, "output_plugin", WHAT)?.map(str::to_string),
        })
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]`: with `wait`, waits until a session using the
    /// slot lets go of it instead of failing.
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ReplicationError> {
        validate_slot_name(name)?;
        let sql = format!(
            "DROP_REPLICATION_SLOT {}{}",
            quote_ident(name),
            if wait { " WAIT" } else { "" }
        );
        self.query(&sql).await.map(|_| ())
    }

    /// `START_REPLICATION SLOT name LOGICAL lsn (…)`: turns this session into a
    /// [`LogicalStream`]. The server starts at the greater of `start` and the slot's
    /// `confirmed_flush_lsn`; pass `Lsn::ZERO` to resume from the slot.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start: Lsn,
        opts: &PgOutputOptions,
        cfg: StreamConfig,
    ) -> Result<LogicalStream, ReplicationError> {
        validate_slot_name(slot)?;
        let options = opts.to_sql()?;
        let mut sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start}",
            quote_ident(slot)
        );
        if !options.is_empty() {
            sql.push_str(" (");
            sql.push_str(&options);
            sql.push(')');
        }
        frontend::query(&sql, &mut self.wbuf)
            .map_err(|e| ReplicationError::Protocol(format!("query text: {e}")))?;
        self.send().await?;
        loop {
            let f = self.recv().await?;
            match f.tag {
                b'W' => break,
                b'N' | b'K' => {}
                b'S' => self.parameter_status(&f.body)?,
                b'E' => {
                    let e = parse_error(&f.body);
                    // Let the session reach ReadyForQuery; the server's error is the story even
                    // if the connection closes meanwhile.
                    while let Ok(f) = self.recv().await {
                        if f.tag == b'Z' {
                            break;
                        }
                    }
                    return Err(ReplicationError::Server(e));
                }
                t => {
                    return Err(ReplicationError::Protocol(format!(
                        "expected CopyBothResponse after START_REPLICATION, got {:?}",
                        t as char
                    )))
                }
            }
        }
        let ReplicationClient {
            io,
            tcp_fd,
            rbuf,
            target,
            ..
        } = self;
        Ok(LogicalStream::spawn(io, tcp_fd, rbuf, target, start, cfg))
    }

    /// Ends the session politely (Terminate) and closes the socket.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        frontend::terminate(&mut self.wbuf);
        self.send().await?;
        let _ = self.io.shutdown().await;
        Ok(())
    }
}

fn parse_row_description(body: &[u8]) -> Result<Vec<String>, ReplicationError> {
    let mut c = Cursor::new(body, "RowDescription");
    let n = c.i16()?;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        cols.push(c.cstr()?.to_string());
        // table oid, column number, type oid, type size, type modifier, format
        c.take(4 + 2 + 4 + 2 + 4 + 2)?;
    }
    Ok(cols)
}

fn parse_data_row(body: &[u8]) -> Result<Vec<Option<String>>, ReplicationError> {
    let mut c = Cursor::new(body, "DataRow");
    let n = c.i16()?;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = c.i32()?;
        if len < 0 {
            row.push(None);
            continue;
        }
        let v = c.take(len as usize)?;
        let s = std::str::from_utf8(v)
            .map_err(|_| ReplicationError::Protocol("DataRow holds non-UTF-8 text".into()))?;
        row.push(Some(s.to_string()));
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_validated() {
        for ok in ["s1", "shadowmig_orders_by_customer", &"a".repeat(63)] {
            assert!(validate_slot_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "S1", "a b", "x\"y", "ü", "a;DROP", &"a".repeat(64)] {
            let e = validate_slot_name(bad).unwrap_err();
            assert!(matches!(e, ReplicationError::InvalidName { .. }), "{bad}");
        }
    }

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_ident(r#"My "Pub""#), r#""My ""Pub""""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn error_fields_are_parsed() {
        let body = b"SERROR\0VFATAL\0C42501\0Mmust be superuser or replication role\0Dd\0\0";
        let e = parse_error(body);
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "42501");
        assert_eq!(e.message, "must be superuser or replication role");
        assert_eq!(e.detail.as_deref(), Some("d"));
        // Truncated bodies give what was readable, never a panic.
        let e = parse_error(b"C28P01\0Mpass");
        assert_eq!(e.code, "28P01");
    }

    #[test]
    fn data_rows_and_truncation() {
        let mut b = vec![0, 2, 0, 0, 0, 2, b'h', b'i', 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            parse_data_row(&b).unwrap(),
            vec![Some("hi".to_string()), None]
        );
        b.truncate(7);
        assert!(matches!(
            parse_data_row(&b),
            Err(ReplicationError::Protocol(_))
        ));
    }

    #[test]
    fn config_errors_do_not_echo_the_password() {
        for s in [
            "postgres://u:s3cr3t@host:notaport/db",
            "host=h password='s3cr3t",
            "postgres://u:s3cr3t@h/db?sslmode=bogus",
        ] {
            let e = tokio_postgres::Config::from_str(s).unwrap_err();
            let msg = config_error(&e).to_string();
            assert!(!msg.contains("s3cr3t"), "{msg}");
            assert!(!msg.contains('3'), "{msg}");
        }
    }

    #[tokio::test]
    async fn frames_split_without_copy_and_eof_is_connection_lost() {
        let mut wire: &[u8] = b"Z\0\0\0\x05IW\0\0\0\x07\0\0\0";
        let mut buf = BytesMut::new();
        let f = read_frame(&mut wire, &mut buf).await.unwrap();
        assert_eq!((f.tag, &f.body[..]), (b'Z', &b"I"[..]));
        let f = read_frame(&mut wire, &mut buf).await.unwrap();
        assert_eq!((f.tag, &f.body[..]), (b'W', &b"\0\0\0"[..]));
        let e = read_frame(&mut wire, &mut buf).await.unwrap_err();
        assert!(e.is_connection_lost());
        let mut bad: &[u8] = b"D\0\0\0\x01";
        let e = read_frame(&mut bad, &mut BytesMut::new())
            .await
            .unwrap_err();
        assert!(matches!(e, ReplicationError::Protocol(_)));
    }
}

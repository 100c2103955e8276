//! `shadowmig tail`: prints a table's decoded changes as JSON lines, for debugging CDC.
//!
//! Owns the tail command end to end: checking the server and the table, creating (or
//! reusing) the publication and slot, reading the stream, rendering each change as one JSON
//! line, and confirming only what it has printed. It must never write to the table, never
//! print or log the connection URL or password, and never confirm a change before its line
//! is flushed to stdout.

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use crate::lsn::Lsn;
use crate::pgoutput::relcache::RowChange;
use crate::pgoutput::{Decoder, LogicalMessage, RelationCache, Row};
use crate::replication::{
    PgOutputOptions, ReplicationClient, ReplicationError, ReplicationEvent, SnapshotAction,
    StreamConfig,
};

/// What `tail` was asked to do.
#[derive(Debug, Clone)]
pub struct TailOptions {
    /// Connection URL or key=value string of the source database.
    pub url: String,
    /// The table, as the user typed it (`schema.name`, `name`, quoted identifiers allowed).
    pub table: String,
    /// A named slot to use or create and keep; `None`: a temporary slot.
    pub slot: Option<String>,
    /// Skip what a reused slot holds and start from the current WAL position.
    pub from_now: bool,
}

/// Why `tail` could not run. Each message says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The URL did not parse (its text is not repeated: it may hold a password).
    #[error("malformed connection URL: {0}")]
    BadUrl(String),
    /// The server could not be reached or refused the connection.
    #[error("cannot connect to the source database: {0}")]
    Connect(String),
    /// `wal_level` is not `logical`.
    #[error(
        "wal_level is '{0}', but logical decoding needs 'logical': set wal_level = logical in \
         postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart the server"
    )]
    WalLevel(String),
    /// The table does not exist or is not a table.
    #[error("{0}")]
    Table(String),
    /// The role may not do what tail needs.
    #[error("{0}")]
    Privilege(String),
    /// The change stream failed or sent something unusable.
    #[error("{0}")]
    Stream(String),
    /// A query failed.
    #[error("{context}: {source}")]
    Query {
        /// What was being done.
        context: String,
        /// The server's error.
        source: tokio_postgres::Error,
    },
}

/// The table `tail` follows, as the server resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedTable {
    /// The table's oid.
    pub oid: u32,
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
}

impl ResolvedTable {
    /// `schema.name` as printed in the `table` field of each line.
    pub fn display_name(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The publication `tail` uses for this table.
    pub fn publication(&self) -> String {
        format!("shadowmig_tail_{}", self.oid)
    }
}

/// Opens an ordinary SQL connection; the URL is parsed first so a malformed one is reported
/// as such (without echoing it) rather than as a connection failure.
pub async fn connect_sql(url: &str) -> Result<Client, TailError> {
    let config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| TailError::BadUrl(e.to_string()))?;
    let (client, conn) = config
        .connect(NoTls)
        .await
        .map_err(|e| TailError::Connect(crate::catalog::db_message(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn query_err(context: &str) -> impl FnOnce(tokio_postgres::Error) -> TailError + '_ {
    move |source| TailError::Query {
        context: context.to_string(),
        source,
    }
}

/// Checks that logical decoding is possible and the role may use it, and resolves the table.
pub async fn preflight(client: &Client, table: &str) -> Result<ResolvedTable, TailError> {
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(query_err("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(TailError::WalLevel(wal_level));
    }
    let row = client
        .query_one(
            "SELECT rolsuper OR rolreplication, current_user::text FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(query_err("reading the role's attributes"))?;
    let (may_replicate, role): (bool, String) = (row.get(0), row.get(1));
    if !may_replicate {
        return Err(TailError::Privilege(format!(
            "role \"{role}\" has no REPLICATION privilege: run ALTER ROLE \"{}\" REPLICATION as a superuser",
            role.replace('"', "\"\"")
        )));
    }
    // to_regclass parses the name exactly as SQL does (quotes, search_path), so users can
    // type what they would type in psql.
    let row = client
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1)",
            &[&table],
        )
        .await
        .map_err(|e| {
            TailError::Table(format!(
                "cannot resolve table name {table:?}: {}",
                crate::catalog::db_message(&e)
            ))
        })?;
    let Some(row) = row else {
        return Err(TailError::Table(format!(
            "table {table:?} not found: give it as schema.name (quote names with capitals or spaces, \
             e.g. '\"My Schema\".\"Orders\"'); \\dt in psql lists tables"
        )));
    };
    let relkind: String = row.get(3);
    if relkind != "r" && relkind != "p" {
        return Err(TailError::Table(format!(
            "{table:?} is not a table (relkind {relkind})"
        )));
    }
    let oid: u32 = row.get(0);
    Ok(ResolvedTable {
        oid,
        schema: row.get(1),
        name: row.get(2),
    })
}

/// Makes sure the table's tail publication exists and covers exactly that table. Returns
/// true when this call created it (so the caller knows whether to drop it again).
pub async fn ensure_publication(client: &Client, table: &ResolvedTable) -> Result<bool, TailError> {
    let pubname = table.publication();
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&pubname],
        )
        .await
        .map_err(query_err("looking up the publication"))?
        .is_some();
    if exists {
        return Ok(false);
    }
    let sql: String = client
        .query_one(
            "SELECT format('CREATE PUBLICATION %I FOR TABLE %I.%I', $1::text, $2::text, $3::text)",
            &[&pubname, &table.schema, &table.name],
        )
        .await
        .map_err(query_err("quoting the publication statement"))?
        .get(0);
    client.batch_execute(&sql).await.map_err(|e| {
        TailError::Privilege(format!(
            "cannot create publication {pubname} for {}: {} — the table's owner or a superuser can create it",
            table.display_name(),
            crate::catalog::db_message(&e)
        ))
    })?;
    Ok(true)
}

/// Drops the tail publication (used when this run created it for a temporary slot).
pub async fn drop_publication(client: &Client, table: &ResolvedTable) -> Result<(), TailError> {
    let sql: String = client
        .query_one(
            "SELECT format('DROP PUBLICATION IF EXISTS %I', $1::text)",
            &[&table.publication()],
        )
        .await
        .map_err(query_err("quoting the publication statement"))?
        .get(0);
    client
        .batch_execute(&sql)
        .await
        .map_err(query_err("dropping the publication"))
}

/// One line of `tail` output (the field order is the documented one).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChangeLine {
    /// WAL position of the change.
    pub lsn: String,
    /// The transaction, or null for a non-transactional message.
    pub xid: Option<u32>,
    /// The commit LSN of the transaction, or null outside one.
    pub commit_lsn: Option<String>,
    /// insert, update, delete, truncate or message.
    pub op: &'static str,
    /// `schema.name`, or null for a message.
    pub table: Option<String>,
    /// The row's replica identity key.
    pub key: Option<serde_json::Map<String, serde_json::Value>>,
    /// The old key (`K`) or old row (`O`) when the server sent one.
    pub old: Option<serde_json::Map<String, serde_json::Value>>,
    /// The new row (unchanged TOAST columns left out).
    pub new: Option<serde_json::Map<String, serde_json::Value>>,
    /// Columns whose unchanged out-of-line value was not sent.
    pub unchanged_toast: Vec<String>,
    /// Truncate: CASCADE was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cascade: Option<bool>,
    /// Truncate: RESTART IDENTITY was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_identity: Option<bool>,
    /// Message: its prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Message: its content (UTF-8 text, or `\x…` hex when it is not UTF-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Message: emitted transactionally.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transactional: Option<bool>,
}

impl ChangeLine {
    fn new(lsn: Lsn, txn: Option<(u32, Lsn)>, op: &'static str) -> ChangeLine {
        ChangeLine {
            lsn: lsn.to_string(),
            xid: txn.map(|t| t.0),
            commit_lsn: txn.map(|t| t.1.to_string()),
            op,
            table: None,
            key: None,
            old: None,
            new: None,
            unchanged_toast: Vec::new(),
            cascade: None,
            restart_identity: None,
            prefix: None,
            content: None,
            transactional: None,
        }
    }
}

type JsonMap = serde_json::Map<String, serde_json::Value>;

fn key_map(row: &Row) -> Result<JsonMap, TailError> {
    let all = row
        .to_json()
        .map_err(|e| TailError::Stream(e.to_string()))?;
    let rel = row.relation();
    let names: Vec<&str> = rel
        .key_columns()
        .iter()
        .map(|&i| rel.body().columns[i].name.as_str())
        .collect();
    Ok(all
        .into_iter()
        .filter(|(k, _)| names.contains(&k.as_str()))
        .collect())
}

fn json(row: &Row) -> Result<JsonMap, TailError> {
    row.to_json().map_err(|e| TailError::Stream(e.to_string()))
}

/// Renders a decoded change as a line, if it is one `tail` prints.
pub fn render(
    cache: &RelationCache,
    msg: &LogicalMessage,
    lsn: Lsn,
    txn: Option<(u32, Lsn)>,
) -> Result<Vec<ChangeLine>, TailError> {
    let rowerr = |e: crate::pgoutput::RowError| TailError::Stream(e.to_string());
    let table_of = |oid: u32| cache.get(oid).map(|r| r.qualified_name().to_string());
    let mut out = Vec::new();
    match cache.change(msg).map_err(rowerr)? {
        Some(RowChange::Insert { new }) => {
            let mut l = ChangeLine::new(lsn, txn, "insert");
            l.table = Some(new.relation().qualified_name().to_string());
            l.key = Some(key_map(&new)?);
            l.new = Some(json(&new)?);
            out.push(l);
        }
        Some(RowChange::Update { old, new }) => {
            let mut l = ChangeLine::new(lsn, txn, "update");
            l.table = Some(new.relation().qualified_name().to_string());
            l.key = Some(match &old {
                Some(o) => key_map(o)?,
                None => key_map(&new)?,
            });
            l.old = old.as_ref().map(json).transpose()?;
            l.new = Some(json(&new)?);
            l.unchanged_toast = new
                .unchanged_toast()
                .into_iter()
                .map(str::to_string)
                .collect();
            out.push(l);
        }
        Some(RowChange::Delete { old }) => {
            let mut l = ChangeLine::new(lsn, txn, "delete");
            l.table = Some(old.relation().qualified_name().to_string());
            l.key = Some(key_map(&old)?);
            l.old = Some(json(&old)?);
            out.push(l);
        }
        None => match msg {
            LogicalMessage::Truncate {
                flags, relations, ..
            } => {
                for oid in relations {
                    let mut l = ChangeLine::new(lsn, txn, "truncate");
                    l.table = table_of(*oid).or_else(|| Some(format!("oid {oid}")));
                    l.cascade = Some(flags & 1 != 0);
                    l.restart_identity = Some(flags & 2 != 0);
                    out.push(l);
                }
            }
            LogicalMessage::Message {
                transactional,
                prefix,
                content,
                ..
            } => {
                let mut l =
                    ChangeLine::new(lsn, if *transactional { txn } else { None }, "message");
                l.prefix = Some(prefix.clone());
                l.content = Some(match std::str::from_utf8(content) {
                    Ok(s) => s.to_string(),
                    Err(_) => format!("\\x{}", hex::encode(content)),
                });
                l.transactional = Some(*transactional);
                out.push(l);
            }
            _ => {}
        },
    }
    Ok(out)
}

fn repl_error(e: ReplicationError) -> TailError {
    if e.is_permission_denied() {
        return TailError::Privilege(format!(
            "the server refused the replication connection: {e} — the role needs the REPLICATION attribute \
             and a pg_hba.conf line for the `replication` database"
        ));
    }
    match e {
        ReplicationError::Connect { .. } | ReplicationError::ConnectTimeout(_) => {
            TailError::Connect(e.to_string())
        }
        ReplicationError::Config(m) => TailError::BadUrl(m),
        other => TailError::Stream(other.to_string()),
    }
}

/// Moves a slot past everything committed so far. With asynchronous commit the newest
/// commits may be inserted into WAL but not yet written or flushed, and a slot only advances
/// over flushed WAL: take the insert position, wait for the WAL writer to flush up to it
/// (within `wal_writer_delay`), then advance.
async fn skip_to_now(client: &Client, slot: &str) -> Result<(), TailError> {
    let target: String = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(query_err("reading the current WAL position"))?
        .get(0);
    for _ in 0..200 {
        let flushed: bool = client
            .query_one(
                "SELECT pg_current_wal_flush_lsn() >= $1::text::pg_lsn",
                &[&target],
            )
            .await
            .map_err(query_err("reading the flushed WAL position"))?
            .get(0);
        if flushed {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    client
        .execute(
            "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
            &[&slot, &target],
        )
        .await
        .map_err(query_err("moving the slot to the current WAL position"))?;
    Ok(())
}

/// Runs `tail` until `shutdown` turns true (or stdout closes): prints each change of the
/// table as a JSON line to `out`, and confirms a transaction to the slot only after its lines
/// are flushed.
pub async fn run_tail<W: std::io::Write>(
    opts: &TailOptions,
    mut shutdown: watch::Receiver<bool>,
    mut out: W,
) -> Result<(), TailError> {
    let client = connect_sql(&opts.url).await?;
    let table = preflight(&client, &opts.table).await?;
    let mut repl = ReplicationClient::connect(&opts.url)
        .await
        .map_err(repl_error)?;
    let (slot, temporary) = match &opts.slot {
        Some(name) => {
            let plugin: Option<Option<String>> = client
                .query_opt(
                    "SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
                    &[name],
                )
                .await
                .map_err(query_err("looking up the slot"))?
                .map(|r| r.get(0));
            match plugin {
                None => {
                    repl.create_logical_slot(name, false, SnapshotAction::Nothing).await.map_err(repl_error)?;
                }
                Some(Some(p)) if p == "pgoutput" => {
                    if opts.from_now {
                        skip_to_now(&client, name).await?;
                    }
                }
                Some(other) => {
                    return Err(TailError::Table(format!(
                        "slot {name:?} exists but uses plugin {:?}, not pgoutput: choose another --slot",
                        other.unwrap_or_default()
                    )))
                }
            }
            (name.clone(), false)
        }
        None => {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let name = format!(
                "shadowmig_tail_{}_{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            repl.create_logical_slot(&name, true, SnapshotAction::Nothing)
                .await
                .map_err(repl_error)?;
            (name, true)
        }
    };
    // A publication is needed for a named slot's later runs too; only a one-off tail with a
    // temporary slot cleans up the publication it created.
    let created_pub = ensure_publication(&client, &table).await?;
    let options = PgOutputOptions::new(1)
        .publication(&table.publication())
        .messages(true);
    let mut stream = repl
        .start_logical(&slot, Lsn::ZERO, &options, StreamConfig::default())
        .await
        .map_err(repl_error)?;
    eprintln!(
        "shadowmig tail: following {} from {} (slot {slot}, {})",
        table.display_name(),
        stream.start_lsn(),
        if temporary {
            "temporary"
        } else {
            "kept on exit"
        }
    );
    let mut decoder = Decoder::new(1);
    let mut cache = RelationCache::new();
    let mut txn: Option<(u32, Lsn)> = None;
    let result: Result<(), TailError> = loop {
        let ev = tokio::select! {
            _ = shutdown.changed() => break Ok(()),
            ev = stream.next() => ev,
        };
        let ev = match ev {
            None => {
                break Err(TailError::Stream(
                    "the server ended the replication stream".into(),
                ))
            }
            Some(Err(e)) => break Err(repl_error(e)),
            Some(Ok(ev)) => ev,
        };
        let ReplicationEvent::XLogData {
            wal_start, data, ..
        } = ev
        else {
            continue;
        };
        let msg = match decoder.decode(&data) {
            Ok(m) => m,
            Err(e) => {
                break Err(TailError::Stream(format!(
                    "undecodable message from the server: {e}"
                )))
            }
        };
        cache.observe(&msg);
        match &msg {
            LogicalMessage::Begin { xid, final_lsn, .. } => txn = Some((*xid, *final_lsn)),
            LogicalMessage::Commit { end_lsn, .. } => {
                txn = None;
                if out.flush().is_err() {
                    break Ok(());
                }
                stream.confirm(*end_lsn);
            }
            _ => {
                let lines = match render(&cache, &msg, wal_start, txn) {
                    Ok(l) => l,
                    Err(e) => break Err(e),
                };
                let mut closed = false;
                for l in lines {
                    let text =
                        serde_json::to_string(&l).map_err(|e| TailError::Stream(e.to_string()))?;
                    if writeln!(out, "{text}").is_err() {
                        closed = true;
                        break;
                    }
                }
                if closed || (txn.is_none() && out.flush().is_err()) {
                    break Ok(());
                }
            }
        }
    };
    let _ = out.flush();
    let _ = stream.send_status_now().await;
    let _ = stream.shutdown().await;
    if temporary && created_pub {
        let _ = drop_publication(&client, &table).await;
    }
    result
}

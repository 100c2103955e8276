//! `shadowmig tail`: prints a table's decoded changes as JSON lines, for debugging CDC.
//!
//! Owns the tail command end to end: checking the server and the table, creating (or
//! reusing) the publication and slot, reading the stream, rendering each change as one JSON
//! line, and confirming only what it has printed. It must never write to the table, never
//! print or log the connection URL or password, and never confirm a change before its line
//! is flushed to stdout.

use tokio_postgres::{Client, NoTls};

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
        .map_err(|e| TailError::Connect(describe_pg_error(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A one-line description of a tokio-postgres error: the server's message and SQLSTATE
/// when there is one, else the I/O cause.
pub fn describe_pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} (SQLSTATE {})", db.message(), db.code().code());
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
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
                describe_pg_error(&e)
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
            describe_pg_error(&e)
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

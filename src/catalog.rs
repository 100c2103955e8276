//! Catalog queries shared by `plan`, `run` and `verify`: what a table looks like (columns, keys,
//! replica identity, indexes, foreign keys, partitioning, size), what the server allows
//! (settings, free slots and WAL senders) and what the connected role may do.
//!
//! Every function only reads the catalogs; none of them may change anything. Names travel as
//! bound parameters or through [`QualifiedName::quoted`], never spliced in unquoted.

use tokio_postgres::GenericClient;

use crate::spec::{DbUrl, QualifiedName};

/// A catalog query failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Could not connect (the message never holds the password).
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The URL, password hidden.
        url: String,
        /// Why.
        reason: String,
    },
    /// A query failed.
    #[error("catalog query ({what}) failed: {reason}")]
    Query {
        /// Which query.
        what: &'static str,
        /// The server's message.
        reason: String,
    },
}

fn q(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> CatalogError {
    move |e| CatalogError::Query {
        what,
        reason: db_message(&e),
    }
}

/// Whether an error means the connection is gone (closed, an I/O failure, or the server
/// terminating the session: SQLSTATE class 57P), so that reconnecting may succeed.
pub fn connection_lost(e: &tokio_postgres::Error) -> bool {
    if e.is_closed()
        || e.as_db_error()
            .is_some_and(|d| d.code().code().starts_with("57P"))
    {
        return true;
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if s.is::<std::io::Error>() {
            return true;
        }
        src = s.source();
    }
    false
}

/// The server's own message for an error (`ERROR: …` text, with detail and hint when there are
/// any), or the client-side description.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = db.message().to_string();
            if let Some(d) = db.detail() {
                s.push_str(&format!(" (detail: {d})"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!(" (hint: {h})"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                let t = inner.to_string();
                if !s.contains(&t) {
                    s.push_str(&format!(": {t}"));
                }
                src = inner.source();
            }
            s
        }
    }
}

/// Connects to `url` (10 s connect timeout) and spawns the connection task.
pub async fn connect(url: &DbUrl) -> Result<tokio_postgres::Client, CatalogError> {
    connect_as(url, "").await
}

/// [`connect`] with `application_name` `shadowmig <role>` (just `shadowmig` when `role` is
/// empty), so that `pg_stat_activity` tells a DBA which of a run's sessions is which — the
/// apply writer, a copy worker, the sampler — and what each costs.
pub async fn connect_as(url: &DbUrl, role: &str) -> Result<tokio_postgres::Client, CatalogError> {
    let mut config = url.config().clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    if role.is_empty() {
        config.application_name("shadowmig");
    } else {
        config.application_name(format!("shadowmig {role}"));
    }
    let (client, conn) =
        config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| CatalogError::Connect {
                url: url.redacted(),
                reason: crate::spec::scrub_secrets(&db_message(&e)),
            })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Its name.
    pub name: String,
    /// `format_type(atttypid, atttypmod)`, e.g. `numeric(12,2)`.
    pub type_name: String,
    /// The type's oid.
    pub type_oid: u32,
    /// `NOT NULL`.
    pub not_null: bool,
    /// Has a default or is an identity column (an insert may leave it out).
    pub has_default: bool,
    /// A generated column (cannot be written).
    pub generated: bool,
    /// Its attribute number.
    pub attnum: i16,
}

/// The replica identity of a table (`relreplident`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `DEFAULT`: the primary key's columns, if there is one.
    Default,
    /// `NOTHING`.
    Nothing,
    /// `FULL`: the whole old row.
    Full,
    /// `USING INDEX`: that index's columns.
    Index {
        /// The index's name.
        name: String,
        /// Its columns, in order.
        columns: Vec<String>,
    },
}

/// A unique index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UniqueIndex {
    /// Its name.
    pub name: String,
    /// Its column names in order (empty entries never: expression indexes set `expressions`).
    pub columns: Vec<String>,
    /// Backs the primary key.
    pub primary: bool,
    /// Has a WHERE clause.
    pub partial: bool,
    /// Has expression columns.
    pub expressions: bool,
    /// `indisvalid` (a failed CONCURRENTLY build leaves an invalid one).
    pub valid: bool,
    /// Every column is NOT NULL.
    pub all_not_null: bool,
    /// `indimmediate` (not deferrable).
    pub immediate: bool,
}

impl UniqueIndex {
    /// Can serve as a replica identity (`REPLICA IDENTITY USING INDEX` rules) or a row key.
    pub fn usable_as_key(&self) -> bool {
        !self.partial && !self.expressions && self.valid && self.all_not_null && self.immediate
    }
}

/// Which side of a foreign key the table is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FkDirection {
    /// The table references another table.
    Out,
    /// Another table references this one.
    In,
}

/// A foreign key touching a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignKey {
    /// Constraint name.
    pub name: String,
    /// Direction relative to the table asked about.
    pub direction: FkDirection,
    /// The referencing table.
    pub from_table: QualifiedName,
    /// The referencing columns.
    pub from_columns: Vec<String>,
    /// The referenced table.
    pub to_table: QualifiedName,
    /// The referenced columns.
    pub to_columns: Vec<String>,
    /// `pg_get_constraintdef`.
    pub definition: String,
}

/// How a table is partitioned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitioning {
    /// `hash`, `list` or `range`.
    pub strategy: String,
    /// Partition key columns (`None` for an expression part).
    pub columns: Vec<Option<String>>,
    /// How many partitions are attached directly.
    pub partitions: i64,
}

/// Server settings that logical replication depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// `wal_level`.
    pub wal_level: String,
    /// `max_replication_slots`.
    pub max_replication_slots: i64,
    /// `max_wal_senders`.
    pub max_wal_senders: i64,
    /// `max_slot_wal_keep_size` in MB (-1: unlimited).
    pub max_slot_wal_keep_size_mb: i64,
    /// `server_version_num`.
    pub server_version_num: i64,
    /// `data_directory` when this role may see it.
    pub data_directory: Option<String>,
    /// `port`.
    pub port: i64,
}

/// Replication resources in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicationUsage {
    /// Slots that exist (any kind).
    pub slots: i64,
    /// WAL sender processes running.
    pub walsenders: i64,
}

/// What the connected role may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privileges {
    /// `current_user`.
    pub role: String,
    /// Superuser.
    pub superuser: bool,
    /// Has the REPLICATION attribute.
    pub replication: bool,
    /// Has CREATE on the current database (schemas, publications).
    pub create_on_database: bool,
}

/// Reads column `idx` of a catalog row; a NULL or type surprise is an error, never a panic.
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    idx: usize,
) -> Result<T, CatalogError> {
    row.try_get(idx).map_err(|e| CatalogError::Query {
        what: "decoding a catalog row",
        reason: format!("column {idx}: {e}"),
    })
}

fn oid_param(oid: u32) -> i64 {
    i64::from(oid)
}

/// The table's oid, or `None` when it does not exist (`to_regclass` of the quoted name).
pub async fn table_oid(
    c: &impl GenericClient,
    table: &QualifiedName,
) -> Result<Option<u32>, CatalogError> {
    let row = c
        .query_one(
            "SELECT to_regclass($1)::oid::int8 AS oid",
            &[&table.quoted()],
        )
        .await
        .map_err(q("table exists"))?;
    let oid: Option<i64> = col(&row, 0)?;
    Ok(oid.and_then(|o| u32::try_from(o).ok()))
}

/// The table's name as the catalog has it.
pub async fn table_name(c: &impl GenericClient, oid: u32) -> Result<QualifiedName, CatalogError> {
    let row = c
        .query_one(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::int8::oid",
            &[&oid_param(oid)],
        )
        .await
        .map_err(q("table name"))?;
    Ok(QualifiedName::new(
        col::<&str>(&row, 0)?,
        col::<&str>(&row, 1)?,
    ))
}

/// The table's live columns in attnum order (dropped ones skipped).
pub async fn columns(c: &impl GenericClient, oid: u32) -> Result<Vec<Column>, CatalogError> {
    let rows = c
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.atttypid::int8,
                    a.attnotnull, a.atthasdef OR a.attidentity <> '', a.attgenerated <> '', a.attnum
             FROM pg_attribute a
             WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&oid_param(oid)],
        )
        .await
        .map_err(q("columns"))?;
    rows.iter()
        .map(|r| -> Result<Column, CatalogError> {
            Ok(Column {
                name: col(r, 0)?,
                type_name: col(r, 1)?,
                type_oid: u32::try_from(col::<i64>(r, 2)?).unwrap_or(0),
                not_null: col(r, 3)?,
                has_default: col(r, 4)?,
                generated: col(r, 5)?,
                attnum: col(r, 6)?,
            })
        })
        .collect::<Result<_, _>>()
}

const INDEX_COLS: &str =
    "ARRAY(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(n, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
             WHERE k.ord <= i.indnkeyatts ORDER BY k.ord)";

/// Unique indexes of the table (primary key included).
pub async fn unique_indexes(
    c: &impl GenericClient,
    oid: u32,
) -> Result<Vec<UniqueIndex>, CatalogError> {
    let sql = format!(
        "SELECT ic.relname::text, {INDEX_COLS}, i.indisprimary, i.indpred IS NOT NULL,
                i.indexprs IS NOT NULL, i.indisvalid, i.indimmediate,
                NOT EXISTS (SELECT 1 FROM unnest(i.indkey) k(n)
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                            WHERE NOT a.attnotnull)
         FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
         WHERE i.indrelid = $1::int8::oid AND i.indisunique
         ORDER BY NOT i.indisprimary, ic.relname"
    );
    let rows = c
        .query(&sql, &[&oid_param(oid)])
        .await
        .map_err(q("unique indexes"))?;
    rows.iter()
        .map(|r| -> Result<UniqueIndex, CatalogError> {
            Ok(UniqueIndex {
                name: col(r, 0)?,
                columns: col(r, 1)?,
                primary: col(r, 2)?,
                partial: col(r, 3)?,
                expressions: col(r, 4)?,
                valid: col(r, 5)?,
                immediate: col(r, 6)?,
                all_not_null: col(r, 7)?,
            })
        })
        .collect::<Result<_, _>>()
}

/// The primary key's columns, if the table has one.
pub async fn primary_key(
    c: &impl GenericClient,
    oid: u32,
) -> Result<Option<Vec<String>>, CatalogError> {
    Ok(unique_indexes(c, oid)
        .await?
        .into_iter()
        .find(|i| i.primary)
        .map(|i| i.columns))
}

/// The key apply looks rows up by: the primary key, else the first unique index usable as a
/// key (no predicate, no expressions, NOT NULL columns).
pub async fn row_key(
    c: &impl GenericClient,
    oid: u32,
) -> Result<Option<(String, Vec<String>)>, CatalogError> {
    let idx = unique_indexes(c, oid).await?;
    Ok(idx
        .iter()
        .find(|i| i.primary)
        .or_else(|| idx.iter().find(|i| i.usable_as_key()))
        .map(|i| (i.name.clone(), i.columns.clone())))
}

/// The table's replica identity.
pub async fn replica_identity(
    c: &impl GenericClient,
    oid: u32,
) -> Result<ReplicaIdentity, CatalogError> {
    let row = c
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE oid = $1::int8::oid",
            &[&oid_param(oid)],
        )
        .await
        .map_err(q("replica identity"))?;
    let kind: String = col(&row, 0)?;
    match kind.as_str() {
        "n" => Ok(ReplicaIdentity::Nothing),
        "f" => Ok(ReplicaIdentity::Full),
        "i" => {
            let sql = format!(
                "SELECT ic.relname::text, {INDEX_COLS} FROM pg_index i
                 JOIN pg_class ic ON ic.oid = i.indexrelid
                 WHERE i.indrelid = $1::int8::oid AND i.indisreplident"
            );
            let row = c
                .query_opt(&sql, &[&oid_param(oid)])
                .await
                .map_err(q("replica identity index"))?;
            // An identity index that was dropped leaves relreplident 'i' with no index: the
            // server then behaves as NOTHING.
            Ok(match row {
                Some(r) => ReplicaIdentity::Index {
                    name: col(&r, 0)?,
                    columns: col(&r, 1)?,
                },
                None => ReplicaIdentity::Nothing,
            })
        }
        _ => Ok(ReplicaIdentity::Default),
    }
}

/// Foreign keys out of and into the table.
pub async fn foreign_keys(
    c: &impl GenericClient,
    oid: u32,
) -> Result<Vec<ForeignKey>, CatalogError> {
    let rows = c
        .query(
            "SELECT co.conname::text, co.conrelid = $1::int8::oid,
                    fn.nspname::text, fc.relname::text,
                    ARRAY(SELECT a.attname::text FROM unnest(co.conkey) WITH ORDINALITY k(n, o)
                          JOIN pg_attribute a ON a.attrelid = co.conrelid AND a.attnum = k.n ORDER BY k.o),
                    tn.nspname::text, tc.relname::text,
                    ARRAY(SELECT a.attname::text FROM unnest(co.confkey) WITH ORDINALITY k(n, o)
                          JOIN pg_attribute a ON a.attrelid = co.confrelid AND a.attnum = k.n ORDER BY k.o),
                    pg_get_constraintdef(co.oid)
             FROM pg_constraint co
             JOIN pg_class fc ON fc.oid = co.conrelid JOIN pg_namespace fn ON fn.oid = fc.relnamespace
             JOIN pg_class tc ON tc.oid = co.confrelid JOIN pg_namespace tn ON tn.oid = tc.relnamespace
             WHERE co.contype = 'f' AND (co.conrelid = $1::int8::oid OR co.confrelid = $1::int8::oid)
               AND co.conparentid = 0
             ORDER BY co.conrelid <> $1::int8::oid, co.conname",
            &[&oid_param(oid)],
        )
        .await
        .map_err(q("foreign keys"))?;
    rows.iter()
        .map(|r| -> Result<ForeignKey, CatalogError> {
            Ok(ForeignKey {
                name: col(r, 0)?,
                direction: if col::<bool>(r, 1)? {
                    FkDirection::Out
                } else {
                    FkDirection::In
                },
                from_table: QualifiedName::new(col::<&str>(r, 2)?, col::<&str>(r, 3)?),
                from_columns: col(r, 4)?,
                to_table: QualifiedName::new(col::<&str>(r, 5)?, col::<&str>(r, 6)?),
                to_columns: col(r, 7)?,
                definition: col(r, 8)?,
            })
        })
        .collect::<Result<_, _>>()
}

/// Bytes on disk of the table with its indexes and TOAST, summed over all partitions.
pub async fn table_size(c: &impl GenericClient, oid: u32) -> Result<i64, CatalogError> {
    let row = c
        .query_one(
            // pg_partition_tree lists nothing for a plain table, so add the table itself.
            "SELECT (pg_total_relation_size($1::int8::oid) + coalesce((
                        SELECT sum(pg_total_relation_size(relid))
                        FROM pg_partition_tree($1::int8::oid::regclass)
                        WHERE relid <> $1::int8::oid::regclass), 0))::int8",
            &[&oid_param(oid)],
        )
        .await
        .map_err(q("table size"))?;
    col(&row, 0)
}

/// Whether the table holds at least one row.
pub async fn has_rows(c: &impl GenericClient, table: &QualifiedName) -> Result<bool, CatalogError> {
    let row = c
        .query_one(
            &format!("SELECT EXISTS (SELECT 1 FROM {})", table.quoted()),
            &[],
        )
        .await
        .map_err(q("has rows"))?;
    col(&row, 0)
}

/// How the table is partitioned, or `None` when it is not.
pub async fn partitioning(
    c: &impl GenericClient,
    oid: u32,
) -> Result<Option<Partitioning>, CatalogError> {
    let row = c
        .query_opt(
            "SELECT p.partstrat::text,
                    ARRAY(SELECT a.attname::text FROM unnest(p.partattrs) WITH ORDINALITY k(n, o)
                          LEFT JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = k.n
                          ORDER BY k.o),
                    (SELECT count(*) FROM pg_inherits WHERE inhparent = p.partrelid)
             FROM pg_partitioned_table p WHERE p.partrelid = $1::int8::oid",
            &[&oid_param(oid)],
        )
        .await
        .map_err(q("partitioning"))?;
    let Some(r) = row else { return Ok(None) };
    {
        let strategy = match col::<&str>(&r, 0)? {
            "h" => "hash",
            "l" => "list",
            "r" => "range",
            _ => "unknown",
        }
        .to_string();
        Ok(Some(Partitioning {
            strategy,
            columns: col::<Vec<Option<String>>>(&r, 1)?,
            partitions: col(&r, 2)?,
        }))
    }
}

/// Settings that logical replication needs.
pub async fn server_settings(c: &impl GenericClient) -> Result<ServerSettings, CatalogError> {
    let row = c
        .query_one(
            "SELECT current_setting('wal_level'),
                    current_setting('max_replication_slots')::int8,
                    current_setting('max_wal_senders')::int8,
                    coalesce(pg_size_bytes(nullif(current_setting('max_slot_wal_keep_size', true), '-1')) / 1048576, -1)::int8,
                    current_setting('server_version_num')::int8,
                    CASE WHEN pg_has_role('pg_read_all_settings', 'USAGE')
                         THEN current_setting('data_directory', true) END,
                    current_setting('port')::int8",
            &[],
        )
        .await
        .map_err(q("server settings"))?;
    Ok(ServerSettings {
        wal_level: col(&row, 0)?,
        max_replication_slots: col(&row, 1)?,
        max_wal_senders: col(&row, 2)?,
        max_slot_wal_keep_size_mb: col(&row, 3)?,
        server_version_num: col(&row, 4)?,
        data_directory: col(&row, 5)?,
        port: col(&row, 6)?,
    })
}

/// Slots and WAL senders in use.
pub async fn replication_usage(c: &impl GenericClient) -> Result<ReplicationUsage, CatalogError> {
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots)::int8,
                    (SELECT count(*) FROM pg_stat_replication)::int8",
            &[],
        )
        .await
        .map_err(q("replication usage"))?;
    Ok(ReplicationUsage {
        slots: col(&row, 0)?,
        walsenders: col(&row, 1)?,
    })
}

/// Where a replication slot of a given name is. Slot names are cluster-wide while a logical
/// slot belongs to one database, so a slot of our name may be another database's migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotPresence {
    /// No slot of that name.
    Absent,
    /// A slot of that name in the connected database.
    Here,
    /// A slot of that name in another database (named): not ours, never to be used or dropped.
    OtherDatabase(String),
}

impl SlotPresence {
    /// Whether the slot is in the connected database.
    pub fn here(&self) -> bool {
        matches!(self, SlotPresence::Here)
    }
}

/// Where the slot of this name is, and whether the publication exists (in this database).
pub async fn slot_and_publication_exist(
    c: &impl GenericClient,
    slot: &str,
    publication: &str,
) -> Result<(SlotPresence, bool), CatalogError> {
    let row = c
        .query_one(
            "SELECT (SELECT coalesce(database::text, '(a physical slot)')
                     FROM pg_replication_slots WHERE slot_name = $1),
                    current_database()::text,
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $2)",
            &[&slot, &publication],
        )
        .await
        .map_err(q("slot and publication"))?;
    let slot_db: Option<String> = col(&row, 0)?;
    let here: String = col(&row, 1)?;
    let presence = match slot_db {
        None => SlotPresence::Absent,
        Some(d) if d == here => SlotPresence::Here,
        Some(d) => SlotPresence::OtherDatabase(d),
    };
    Ok((presence, col(&row, 2)?))
}

/// The connected role's attributes.
pub async fn privileges(c: &impl GenericClient) -> Result<Privileges, CatalogError> {
    let row = c
        .query_one(
            "SELECT current_user::text, r.rolsuper, r.rolreplication,
                    has_database_privilege(current_database(), 'CREATE')
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(q("privileges"))?;
    Ok(Privileges {
        role: col(&row, 0)?,
        superuser: col(&row, 1)?,
        replication: col(&row, 2)?,
        create_on_database: col(&row, 3)?,
    })
}

/// What the connected role may do with one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TablePrivileges {
    /// SELECT on the table.
    pub select: bool,
    /// INSERT, UPDATE and DELETE on the table.
    pub write: bool,
    /// Owns the table (or is a member of its owner role), which CREATE PUBLICATION and
    /// ALTER TABLE need.
    pub owner: bool,
}

/// The connected role's rights on the table.
pub async fn table_privileges(
    c: &impl GenericClient,
    oid: u32,
) -> Result<TablePrivileges, CatalogError> {
    let row = c
        .query_one(
            "SELECT has_table_privilege(c.oid, 'SELECT'),
                    has_table_privilege(c.oid, 'INSERT') AND has_table_privilege(c.oid, 'UPDATE')
                      AND has_table_privilege(c.oid, 'DELETE'),
                    pg_has_role(c.relowner, 'USAGE')
             FROM pg_class c WHERE c.oid = $1::int8::oid",
            &[&oid_param(oid)],
        )
        .await
        .map_err(q("table privileges"))?;
    Ok(TablePrivileges {
        select: col(&row, 0)?,
        write: col(&row, 1)?,
        owner: col(&row, 2)?,
    })
}

/// Whether the schema exists, and whether the connected role has CREATE on it.
pub async fn schema_create(
    c: &impl GenericClient,
    schema: &str,
) -> Result<Option<bool>, CatalogError> {
    let row = c
        .query_opt(
            "SELECT has_schema_privilege(oid, 'CREATE') FROM pg_namespace WHERE nspname = $1",
            &[&schema],
        )
        .await
        .map_err(q("schema privilege"))?;
    row.map(|r| col(&r, 0)).transpose()
}

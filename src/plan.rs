//! `shadowmig plan SPEC`: preflight checks (each with its fix when it fails) and a runbook of
//! every step of the migration with what it locks and how to roll it back.
//!
//! Plan must change nothing: it only reads catalogs, and the target DDL and the transform
//! type checks run inside one target transaction that is always rolled back (statements are
//! only prepared, never executed against rows). It must never print a password.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::catalog::{self, CatalogError, Column, FkDirection, ReplicaIdentity};
use crate::size::human_bytes;
use crate::spec::{quote_ident, QualifiedName, Spec, STATE_SCHEMA};

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Worth reading, does not stop the migration.
    Warn,
    /// Must be fixed before `run`.
    Fail,
    /// Not checked because an earlier check failed.
    Skipped,
}

/// One preflight check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Short name, e.g. `wal_level`.
    pub name: String,
    /// The outcome.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it (for failures and warnings that need action).
    pub fix: Option<String>,
}

/// One step of the runbook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What the step is.
    pub title: String,
    /// What it does, concretely.
    pub action: String,
    /// What it locks and for how long at most.
    pub locks: String,
    /// How to undo it.
    pub rollback: String,
}

/// The result of `plan`: checks and runbook.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The migration id.
    pub name: String,
    /// Source URL, password hidden, and table.
    pub source: String,
    /// Target URL, password hidden, and table.
    pub target: String,
    /// The preflight checks in the order they ran.
    pub checks: Vec<Check>,
    /// The runbook.
    pub steps: Vec<Step>,
}

impl Plan {
    /// No check failed.
    pub fn ok(&self) -> bool {
        !self.checks.iter().any(|c| c.status == Status::Fail)
    }

    /// The check named `name`, if it ran.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    /// The readable report: checks with ✔/✘ and fixes, then the runbook.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "shadowmig plan: migration {}", self.name);
        let _ = writeln!(s, "  source: {}", self.source);
        let _ = writeln!(s, "  target: {}", self.target);
        let _ = writeln!(s, "\nPreflight checks");
        for c in &self.checks {
            let mark = match c.status {
                Status::Ok => "✔",
                Status::Warn => "!",
                Status::Fail => "✘",
                Status::Skipped => "-",
            };
            let _ = writeln!(s, "  {mark} {}: {}", c.name, indent_rest(&c.detail, 6));
            if let Some(fix) = &c.fix {
                let _ = writeln!(s, "      fix: {}", indent_rest(fix, 11));
            }
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        let warned = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Warn)
            .count();
        let _ = writeln!(
            s,
            "\n{}",
            if failed == 0 {
                format!("All checks passed ({warned} warning(s)).")
            } else {
                format!("{failed} check(s) failed, {warned} warning(s): fix them before `shadowmig run`.")
            }
        );
        let _ = writeln!(s, "\nRunbook");
        for (i, st) in self.steps.iter().enumerate() {
            let _ = writeln!(s, "  {}. {}", i + 1, st.title);
            let _ = writeln!(s, "     does:     {}", indent_rest(&st.action, 15));
            let _ = writeln!(s, "     locks:    {}", indent_rest(&st.locks, 15));
            let _ = writeln!(s, "     rollback: {}", indent_rest(&st.rollback, 15));
        }
        s
    }
}

fn indent_rest(text: &str, n: usize) -> String {
    text.replace('\n', &format!("\n{}", " ".repeat(n)))
}

/// Plan could not run at all (as opposed to a failed check).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A connection or catalog query failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A statement plan runs for itself failed.
    #[error("plan: {what}: {reason}")]
    Query {
        /// Which statement.
        what: &'static str,
        /// The server's message.
        reason: String,
    },
}

fn pq(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PlanError {
    move |e| PlanError::Query {
        what,
        reason: catalog::db_message(&e),
    }
}

struct Checks(Vec<Check>);

impl Checks {
    fn push(&mut self, name: &str, status: Status, detail: impl Into<String>, fix: Option<String>) {
        self.0.push(Check {
            name: name.to_string(),
            status,
            detail: detail.into(),
            fix,
        });
    }
    fn ok(&mut self, name: &str, detail: impl Into<String>) {
        self.push(name, Status::Ok, detail, None);
    }
    fn warn(&mut self, name: &str, detail: impl Into<String>, fix: Option<String>) {
        self.push(name, Status::Warn, detail, fix);
    }
    fn fail(&mut self, name: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Fail, detail, Some(fix.into()));
    }
    fn skip(&mut self, name: &str, why: &str) {
        self.push(name, Status::Skipped, format!("not checked: {why}"), None);
    }
}

/// Names of the checks, in the order they appear.
pub mod names {
    /// `wal_level` is logical on the source.
    pub const WAL_LEVEL: &str = "wal_level";
    /// A free replication slot on the source.
    pub const SLOTS: &str = "replication slots";
    /// A free WAL sender on the source.
    pub const WAL_SENDERS: &str = "WAL senders";
    /// `max_slot_wal_keep_size` against the throttle.
    pub const WAL_RETENTION: &str = "WAL retention";
    /// Leftover slot or publication of this migration.
    pub const LEFTOVERS: &str = "slot and publication names";
    /// The source role may replicate.
    pub const REPLICATION_PRIVILEGE: &str = "replication privilege";
    /// The source table exists.
    pub const SOURCE_TABLE: &str = "source table";
    /// Rights on the source table.
    pub const SOURCE_PRIVILEGES: &str = "source privileges";
    /// Source key and replica identity.
    pub const SOURCE_KEY: &str = "source key";
    /// Target DDL / existing target table.
    pub const TARGET_TABLE: &str = "target table";
    /// Rights in the target database.
    pub const TARGET_PRIVILEGES: &str = "target privileges";
    /// The target's key.
    pub const TARGET_KEY: &str = "target key";
    /// Every target column covered.
    pub const COLUMNS: &str = "column coverage";
    /// Transform expressions type-check.
    pub const TRANSFORMS: &str = "transform types";
    /// Replica identity carries the target key.
    pub const REPLICA_IDENTITY: &str = "replica identity";
    /// Foreign keys in and out.
    pub const FOREIGN_KEYS: &str = "foreign keys";
    /// Free disk.
    pub const DISK: &str = "free disk";
    /// What the reverse stream (writes stage) will need on the target.
    pub const REVERSE: &str = "reverse replication";
}

use names::*;

/// What plan learnt about the target inside its rolled-back transaction.
struct TargetInfo {
    columns: Vec<Column>,
    key: Option<Vec<String>>,
    unique_sets: Vec<Vec<String>>,
    fks_out: Vec<catalog::ForeignKey>,
}

/// Runs every preflight check and builds the runbook. Changes nothing. Returns `Err` only
/// when plan cannot run at all (a server is unreachable); problems found are failed checks.
pub async fn plan(spec: &Spec) -> Result<Plan, PlanError> {
    let src = catalog::connect(&spec.source.url).await?;
    let mut tgt = catalog::connect(&spec.target.url).await?;
    // The target transaction below may hold locks from [target].create while the source
    // connection prepares statements in the same database: bound every wait.
    src.batch_execute(&format!(
        "SET lock_timeout = {}; SET statement_timeout = '60s'",
        spec.throttle.lock_timeout_ms
    ))
    .await
    .map_err(pq("set timeouts on source"))?;
    let mut ck = Checks(Vec::new());

    // --- source server ---------------------------------------------------------------------
    let settings = catalog::server_settings(&src).await?;
    if settings.wal_level == "logical" {
        ck.ok(WAL_LEVEL, "logical");
    } else {
        ck.fail(
            WAL_LEVEL,
            format!("is {:?} on the source; logical decoding needs \"logical\"", settings.wal_level),
            "ALTER SYSTEM SET wal_level = logical; then restart the source server (a restart is required)",
        );
    }
    let usage = catalog::replication_usage(&src).await?;
    let free_slots = settings.max_replication_slots - usage.slots;
    // Resuming a migration reuses its slot: it needs no free one.
    let (own_slot, _) =
        catalog::slot_and_publication_exist(&src, &spec.slot_name(), &spec.publication_name())
            .await?;
    if let catalog::SlotPresence::OtherDatabase(other) = &own_slot {
        ck.fail(
            SLOTS,
            format!(
                "a replication slot named {} exists in database {other:?}, not in the source database (slot names are cluster-wide)",
                spec.slot_name()
            ),
            "give this migration another `name` in the spec, or abort the migration that owns that slot",
        );
    } else if own_slot.here() {
        ck.ok(
            SLOTS,
            format!(
                "this migration's slot {} exists and is reused",
                spec.slot_name()
            ),
        );
    } else if free_slots >= 1 {
        ck.ok(SLOTS, format!("{free_slots} of {} free (shadowmig needs 1 on the source; the reverse stream at the writes stage needs 1 on the target)", settings.max_replication_slots));
    } else {
        ck.fail(
            SLOTS,
            format!("{} of {} in use, none free", usage.slots, settings.max_replication_slots),
            "drop an unused slot (SELECT pg_drop_replication_slot(name) for one listed in pg_replication_slots), or raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = N; restart)",
        );
    }
    let free_senders = settings.max_wal_senders - usage.walsenders;
    if free_senders >= 1 {
        ck.ok(
            WAL_SENDERS,
            format!("{free_senders} of {} free", settings.max_wal_senders),
        );
    } else {
        ck.fail(
            WAL_SENDERS,
            format!("{} of {} in use, none free", usage.walsenders, settings.max_wal_senders),
            "raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = N; restart) or stop an idle replication client",
        );
    }
    let keep = settings.max_slot_wal_keep_size_mb;
    if keep < 0 {
        ck.ok(
            WAL_RETENTION,
            format!(
                "max_slot_wal_keep_size is unlimited: while `run` is stopped the slot keeps WAL until the disk fills; the backfill pauses above [throttle].max_lag_bytes = {} bytes",
                spec.throttle.max_lag_bytes
            ),
        );
    } else if (keep as u64).saturating_mul(1 << 20) <= spec.throttle.max_lag_bytes {
        ck.warn(
            WAL_RETENTION,
            format!("max_slot_wal_keep_size = {keep} MB is not above [throttle].max_lag_bytes = {}: the server may invalidate the slot before shadowmig throttles, and the migration must start over", spec.throttle.max_lag_bytes),
            Some(format!("set [throttle].max_lag_bytes well below {} bytes", (keep as u64) << 20)),
        );
    } else {
        ck.ok(
            WAL_RETENTION,
            format!("max_slot_wal_keep_size = {keep} MB, above [throttle].max_lag_bytes"),
        );
    }
    let (slot_exists, pub_exists) =
        catalog::slot_and_publication_exist(&src, &spec.slot_name(), &spec.publication_name())
            .await?;
    let slot_exists = slot_exists.here();
    if slot_exists || pub_exists {
        let which: Vec<String> = [
            slot_exists.then(|| format!("replication slot {}", spec.slot_name())),
            pub_exists.then(|| format!("publication {}", spec.publication_name())),
        ]
        .into_iter()
        .flatten()
        .collect();
        ck.warn(
            LEFTOVERS,
            format!(
                "{} already exist(s): `run` resumes the migration that made it",
                which.join(" and ")
            ),
            Some("if that migration is abandoned: shadowmig abort SPEC (drops them)".into()),
        );
    } else {
        ck.ok(
            LEFTOVERS,
            format!("slot and publication {} are free", spec.slot_name()),
        );
    }
    let sprivs = catalog::privileges(&src).await?;
    if sprivs.superuser || sprivs.replication {
        ck.ok(
            REPLICATION_PRIVILEGE,
            format!(
                "role {} {}",
                sprivs.role,
                if sprivs.superuser {
                    "is superuser"
                } else {
                    "has REPLICATION"
                }
            ),
        );
    } else {
        ck.fail(
            REPLICATION_PRIVILEGE,
            format!("role {} has neither SUPERUSER nor REPLICATION: it cannot create or read a replication slot", sprivs.role),
            format!("ALTER ROLE {} REPLICATION;  (as a superuser)", quote_ident(&sprivs.role)),
        );
    }

    // --- source table ----------------------------------------------------------------------
    let src_table = &spec.source.table;
    let src_oid = catalog::table_oid(&src, src_table).await?;
    let mut src_cols: Vec<Column> = Vec::new();
    let mut src_identity = ReplicaIdentity::Nothing;
    let mut src_pk: Option<Vec<String>> = None;
    let mut src_unique = Vec::new();
    let mut src_size = None;
    match src_oid {
        None => {
            ck.fail(
                SOURCE_TABLE,
                format!("{src_table} does not exist (or this role cannot see it)"),
                "check [source].table: unquoted names are folded to lower case; quote mixed-case or unusual names, e.g. \"My Schema\".\"Orders\"",
            );
            for n in [SOURCE_PRIVILEGES, SOURCE_KEY] {
                ck.skip(n, "the source table does not exist");
            }
        }
        Some(oid) => {
            src_cols = catalog::columns(&src, oid).await?;
            let size = catalog::table_size(&src, oid).await?;
            src_size = Some(size);
            ck.ok(
                SOURCE_TABLE,
                format!(
                    "{src_table}: {} columns, {}",
                    src_cols.len(),
                    human_bytes(size)
                ),
            );

            let tp = catalog::table_privileges(&src, oid).await?;
            let mut problems = Vec::new();
            let mut fixes = Vec::new();
            if !tp.select {
                problems.push("no SELECT on the table (the backfill reads it)".to_string());
                fixes.push(format!(
                    "GRANT SELECT ON {src_table} TO {};",
                    quote_ident(&sprivs.role)
                ));
            }
            if !(sprivs.superuser || tp.owner) {
                problems.push(
                    "does not own the table (CREATE PUBLICATION … FOR TABLE needs ownership)"
                        .to_string(),
                );
                fixes.push(format!(
                    "run as the table's owner, or ALTER TABLE {src_table} OWNER TO {};",
                    quote_ident(&sprivs.role)
                ));
            }
            if !(sprivs.superuser || sprivs.create_on_database) {
                problems.push(
                    "no CREATE on the source database (CREATE PUBLICATION needs it)".to_string(),
                );
                fixes.push(format!(
                    "GRANT CREATE ON DATABASE <source db> TO {};",
                    quote_ident(&sprivs.role)
                ));
            }
            if problems.is_empty() {
                ck.ok(
                    SOURCE_PRIVILEGES,
                    format!("role {} may read the table and publish it", sprivs.role),
                );
            } else {
                ck.fail(
                    SOURCE_PRIVILEGES,
                    format!("role {}: {}", sprivs.role, problems.join("; ")),
                    fixes.join("\n"),
                );
            }

            src_identity = catalog::replica_identity(&src, oid).await?;
            src_unique = catalog::unique_indexes(&src, oid).await?;
            src_pk = src_unique
                .iter()
                .find(|i| i.primary)
                .map(|i| i.columns.clone());
            let chunk_key = src_pk.clone().or_else(|| {
                src_unique
                    .iter()
                    .find(|i| i.usable_as_key())
                    .map(|i| i.columns.clone())
            });
            match (&src_identity, &src_pk, &chunk_key) {
                (ReplicaIdentity::Default, Some(pk), _) => ck.ok(
                    SOURCE_KEY,
                    format!("primary key ({}); replica identity DEFAULT (the primary key)", pk.join(", ")),
                ),
                (ReplicaIdentity::Default, None, _) | (ReplicaIdentity::Nothing, _, _) => ck.fail(
                    SOURCE_KEY,
                    format!(
                        "replica identity {} gives no old key: once the table is published, every UPDATE and DELETE on it fails with \"cannot update table … because it does not have a replica identity\"",
                        if src_identity == ReplicaIdentity::Nothing { "NOTHING" } else { "DEFAULT without a primary key" }
                    ),
                    no_identity_fix(spec, &src_identity, src_pk.as_deref(), &src_unique),
                ),
                (_, _, None) => ck.fail(
                    SOURCE_KEY,
                    "no primary key and no unique index on NOT NULL columns: the backfill reads in key order and needs one",
                    format!("CREATE UNIQUE INDEX CONCURRENTLY … ON {src_table} (<NOT NULL columns>); or add a primary key"),
                ),
                (ReplicaIdentity::Index { name, columns }, _, Some(k)) => ck.ok(
                    SOURCE_KEY,
                    format!("replica identity USING INDEX {} ({}); backfill key ({})", quote_ident(name), columns.join(", "), k.join(", ")),
                ),
                (ReplicaIdentity::Full, _, Some(k)) => ck.ok(
                    SOURCE_KEY,
                    format!("replica identity FULL (whole old rows in the WAL); backfill key ({})", k.join(", ")),
                ),
            }
        }
    }

    // --- target ----------------------------------------------------------------------------
    let tgt_table = &spec.target.table;
    let tprivs = catalog::privileges(&tgt).await?;
    let tx = tgt.transaction().await.map_err(pq("begin on target"))?;
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {}; SET LOCAL statement_timeout = '60s'",
        spec.throttle.lock_timeout_ms
    ))
    .await
    .map_err(pq("set timeouts"))?;
    let mut target: Option<TargetInfo> = None;
    let existing = catalog::table_oid(&tx, tgt_table).await?;
    // A target this migration created in an earlier `run` is being resumed, not clobbered.
    let created_by_us = match existing {
        Some(_) => {
            crate::state::exists(&tx)
                .await
                .map_err(|e| PlanError::Query {
                    what: "looking for the state tables",
                    reason: e.to_string(),
                })?
                && tx
                    .query_opt(
                        "SELECT 1 FROM shadowmig.migrations m WHERE m.name = $1 \
                     AND coalesce((to_jsonb(m) ->> 'created_target')::boolean, false)",
                        &[&spec.name],
                    )
                    .await
                    .map_err(pq("reading the migration's state"))?
                    .is_some()
        }
        None => false,
    };
    let tgt_oid = match (&spec.target.create, existing) {
        (Some(_), Some(oid)) if created_by_us => {
            ck.ok(
                TARGET_TABLE,
                format!("{tgt_table} exists: this migration created it in an earlier run, which `run` resumes"),
            );
            Some(oid)
        }
        (Some(_), Some(_)) => {
            ck.fail(
                TARGET_TABLE,
                format!("{tgt_table} already exists, and [target].create would create it"),
                "remove [target].create to migrate into the existing table, or drop the table (if it holds nothing you need)",
            );
            None
        }
        (Some(ddl), None) => match try_ddl(&tx, ddl).await? {
            Err(e) => {
                ck.fail(
                    TARGET_TABLE,
                    format!("[target].create fails on the target: {e}"),
                    "correct the DDL in [target].create (plan ran it in a transaction and rolled it back)",
                );
                None
            }
            Ok(()) => match catalog::table_oid(&tx, tgt_table).await? {
                None => {
                    ck.fail(
                        TARGET_TABLE,
                        format!("[target].create ran, but no table {tgt_table} exists afterwards"),
                        "make [target].create create [target].table (check schema and quoting)",
                    );
                    None
                }
                Some(oid) => {
                    ck.ok(TARGET_TABLE, format!("[target].create is valid and creates {tgt_table} (tried in a transaction, rolled back)"));
                    Some(oid)
                }
            },
        },
        (None, None) => {
            ck.fail(
                TARGET_TABLE,
                format!("{tgt_table} does not exist and [target].create is not set"),
                "create the target table first, or put its CREATE TABLE in [target].create",
            );
            None
        }
        (None, Some(oid)) => {
            if !catalog::table_privileges(&tx, oid).await?.select {
                // The privileges check below reports the missing rights.
                ck.ok(
                    TARGET_TABLE,
                    format!(
                        "{tgt_table} exists (not readable by this role, so not checked for rows)"
                    ),
                );
            } else if catalog::has_rows(&tx, tgt_table).await? {
                ck.warn(
                    TARGET_TABLE,
                    format!("{tgt_table} exists and already holds rows"),
                    Some("the backfill upserts by key over them, and rows with keys absent from the source stay; start from an empty table".into()),
                );
            } else {
                ck.ok(TARGET_TABLE, format!("{tgt_table} exists and is empty"));
            }
            Some(oid)
        }
    };

    // Rights in the target: the state schema and writing the shadow table.
    {
        let mut problems = Vec::new();
        let mut fixes = Vec::new();
        let state = catalog::schema_create(&tx, STATE_SCHEMA).await?;
        let state_ok = tprivs.superuser
            || match state {
                Some(create) => create,
                None => tprivs.create_on_database,
            };
        if !state_ok {
            problems.push(format!(
                "cannot create the state schema {STATE_SCHEMA} or tables in it"
            ));
            fixes.push(match state {
                None => format!(
                    "GRANT CREATE ON DATABASE <target db> TO {};",
                    quote_ident(&tprivs.role)
                ),
                Some(_) => format!(
                    "GRANT CREATE, USAGE ON SCHEMA {} TO {};",
                    quote_ident(STATE_SCHEMA),
                    quote_ident(&tprivs.role)
                ),
            });
        }
        if let Some(oid) = tgt_oid {
            let tp = catalog::table_privileges(&tx, oid).await?;
            if !tp.write || !tp.select {
                problems.push(format!(
                    "no SELECT, INSERT, UPDATE and DELETE on {tgt_table}"
                ));
                fixes.push(format!(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON {tgt_table} TO {};",
                    quote_ident(&tprivs.role)
                ));
            }
        } else if spec.target.create.is_some() && !tprivs.superuser {
            if let Some(false) = catalog::schema_create(&tx, &tgt_table.schema).await? {
                problems.push(format!(
                    "no CREATE on schema {}",
                    quote_ident(&tgt_table.schema)
                ));
                fixes.push(format!(
                    "GRANT CREATE ON SCHEMA {} TO {};",
                    quote_ident(&tgt_table.schema),
                    quote_ident(&tprivs.role)
                ));
            }
        }
        if problems.is_empty() {
            ck.ok(
                TARGET_PRIVILEGES,
                format!(
                    "role {} may create the state schema and write the target",
                    tprivs.role
                ),
            );
        } else {
            ck.fail(
                TARGET_PRIVILEGES,
                format!("role {}: {}", tprivs.role, problems.join("; ")),
                fixes.join("\n"),
            );
        }
    }

    if let Some(oid) = tgt_oid {
        let columns = catalog::columns(&tx, oid).await?;
        let idx = catalog::unique_indexes(&tx, oid).await?;
        let mut key = catalog::row_key(&tx, oid).await?.map(|(_, c)| c);
        // A migration that defers its constraints (`[copy] defer_indexes`) has dropped its
        // primary key until the backfill ends, and recorded it.
        let mut deferred_note = "";
        if key.is_none() {
            if let Ok(Some(k)) = crate::state::deferred_key(&tx, &spec.name).await {
                key = Some(k);
                deferred_note = ", built when the backfill ends ([copy] defer_indexes)";
            }
        }
        let part = catalog::partitioning(&tx, oid).await?;
        let fks = catalog::foreign_keys(&tx, oid).await?;
        let part_note = match &part {
            Some(p) => format!(
                ", partitioned by {} ({}) into {} partition(s)",
                p.strategy,
                p.columns
                    .iter()
                    .map(|c| c.clone().unwrap_or_else(|| "<expression>".into()))
                    .collect::<Vec<_>>()
                    .join(", "),
                p.partitions
            ),
            None => String::new(),
        };
        match (&key, &part) {
            (None, _) => ck.fail(
                TARGET_KEY,
                format!("{tgt_table} has no primary key and no unique index on NOT NULL columns: apply cannot find the row a change belongs to"),
                "give the target a primary key (in [target].create)",
            ),
            (Some(_), Some(p)) if p.partitions == 0 => ck.fail(
                TARGET_KEY,
                format!("{tgt_table} is partitioned but has no partitions: every insert would fail with \"no partition of relation found for row\""),
                match p.strategy.as_str() {
                    "hash" => format!("add the partitions to [target].create, e.g. CREATE TABLE {} PARTITION OF {tgt_table} FOR VALUES WITH (MODULUS 4, REMAINDER 0); … for remainders 1–3", QualifiedName::new(&tgt_table.schema, &format!("{}_p0", tgt_table.name)).quoted()),
                    _ => format!("add partitions (and a DEFAULT partition) to [target].create: CREATE TABLE … PARTITION OF {tgt_table} …"),
                },
            ),
            (Some(k), _) => ck.ok(
                TARGET_KEY,
                format!("({}){deferred_note}{part_note}", k.join(", ")),
            ),
        }
        target = Some(TargetInfo {
            columns,
            key,
            unique_sets: idx
                .iter()
                .filter(|i| i.usable_as_key())
                .map(|i| i.columns.clone())
                .collect(),
            fks_out: fks
                .into_iter()
                .filter(|f| f.direction == FkDirection::Out)
                .collect(),
        });
    } else {
        ck.skip(TARGET_KEY, "no usable target table");
    }

    // --- columns and transforms ------------------------------------------------------------
    let mut covered: Vec<(String, String, String)> = Vec::new(); // (target col, expr, target type)
    match (&target, src_oid) {
        (Some(t), Some(_)) => {
            let src_names: BTreeSet<&str> = src_cols.iter().map(|c| c.name.as_str()).collect();
            let tgt_names: BTreeMap<&str, &Column> =
                t.columns.iter().map(|c| (c.name.as_str(), c)).collect();
            let mut fails = Vec::new();
            let mut fixes = Vec::new();
            let mut defaulted = Vec::new();
            for k in spec.transform.keys() {
                match tgt_names.get(k.as_str()) {
                    None => {
                        fails.push(format!("[transform].{k} names no column of the target"));
                        fixes.push(format!(
                            "remove [transform].{k} or correct its name (target columns: {})",
                            t.columns
                                .iter()
                                .map(|c| c.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                    }
                    Some(c) if c.generated => {
                        fails.push(format!("[transform].{k} writes a generated column"));
                        fixes.push(format!("remove [transform].{k}: the target computes it"));
                    }
                    Some(_) => {}
                }
            }
            for k in spec.reverse.keys() {
                if !src_names.contains(k.as_str()) {
                    fails.push(format!("[reverse].{k} names no column of the source"));
                    fixes.push(format!("remove [reverse].{k} or correct its name"));
                }
            }
            for c in t.columns.iter().filter(|c| !c.generated) {
                if let Some(e) = spec.transform.get(&c.name) {
                    covered.push((c.name.clone(), e.clone(), c.type_name.clone()));
                } else if src_names.contains(c.name.as_str()) {
                    covered.push((c.name.clone(), quote_ident(&c.name), c.type_name.clone()));
                } else if c.has_default || !c.not_null {
                    defaulted.push(format!(
                        "{} ({})",
                        c.name,
                        if c.has_default { "its default" } else { "NULL" }
                    ));
                } else {
                    fails.push(format!("target column {:?} ({}) is NOT NULL without a default, and no source column or [transform] fills it", c.name, c.type_name));
                    fixes.push(format!("add [transform].{} = \"<SQL over source columns>\", or give the column a default", display_key(&c.name)));
                }
            }
            let exprs: String = spec
                .transform
                .values()
                .cloned()
                .collect::<Vec<_>>()
                .join(" ");
            let dropped: Vec<&str> = src_cols
                .iter()
                .map(|c| c.name.as_str())
                .filter(|n| !tgt_names.contains_key(n) && !exprs.contains(n))
                .collect();
            if !fails.is_empty() {
                ck.fail(COLUMNS, fails.join("\n"), fixes.join("\n"));
            } else if !dropped.is_empty() {
                ck.warn(
                    COLUMNS,
                    format!(
                        "{} target column(s) covered{}; source column(s) {} are neither in the target nor named in a transform: their data will not be in the new table",
                        covered.len(),
                        if defaulted.is_empty() { String::new() } else { format!(", filled by default: {}", defaulted.join(", ")) },
                        dropped.join(", ")
                    ),
                    Some("add them to the target, or accept that the new table drops them".into()),
                );
            } else {
                ck.ok(
                    COLUMNS,
                    format!(
                        "every target column is covered ({} from source or transform{})",
                        covered.len(),
                        if defaulted.is_empty() {
                            String::new()
                        } else {
                            format!("; by default: {}", defaulted.join(", "))
                        }
                    ),
                );
            }
            type_check(spec, &src, &tx, &covered, &mut ck).await?;
        }
        _ => {
            ck.skip(COLUMNS, "needs both the source and the target table");
            ck.skip(TRANSFORMS, "needs both the source and the target table");
        }
    }

    // --- replica identity against the target key ---------------------------------------------
    match (&target, src_oid) {
        (Some(TargetInfo { key: Some(key), .. }), Some(_))
            if src_pk.is_some()
                || !matches!(
                    src_identity,
                    ReplicaIdentity::Default | ReplicaIdentity::Nothing
                ) =>
        {
            // A key column computed by an expression is fine when the expression reads only
            // identity columns: prove it by preparing it over a subquery that exposes just those.
            let ident = identity_columns(&src_identity, &src_pk, &src_cols);
            let mut computable = BTreeSet::new();
            for k in key {
                if let Some(e) = spec.transform.get(k) {
                    if plain_column_ref(e).is_none() {
                        let sql = format!(
                            "SELECT ({e}) FROM (SELECT {} FROM {}) AS {} LIMIT 0",
                            ident
                                .iter()
                                .map(|c| quote_ident(c))
                                .collect::<Vec<_>>()
                                .join(", "),
                            spec.source.table.quoted(),
                            quote_ident(&spec.source.table.name)
                        );
                        if src.prepare(&sql).await.is_ok() {
                            computable.insert(k.clone());
                        }
                    }
                }
            }
            identity_check(
                spec,
                key,
                &computable,
                &src_cols,
                &src_identity,
                &src_pk,
                &src_unique,
                &mut ck,
            );
        }
        _ => ck.skip(
            REPLICA_IDENTITY,
            "needs a source table with a key and a target table with a key",
        ),
    }

    // --- foreign keys ----------------------------------------------------------------------
    if let Some(oid) = src_oid {
        let fks = catalog::foreign_keys(&src, oid).await?;
        fk_check(spec, &fks, target.as_ref(), &mut ck);
    } else {
        ck.skip(FOREIGN_KEYS, "the source table does not exist");
    }

    // Nothing plan did may survive: roll the DDL and type checks back.
    tx.rollback().await.map_err(pq("rollback on target"))?;

    // --- disk --------------------------------------------------------------------------------
    let tsettings = catalog::server_settings(&tgt).await?;
    match src_size {
        None => ck.skip(DISK, "the source table does not exist"),
        Some(size) => disk_check(size, &tsettings, &mut ck),
    }

    // --- reverse stream (needed from the writes stage on) ----------------------------------------
    let tusage = catalog::replication_usage(&tgt).await?;
    let same_server = spec.source.url.same_server(&spec.target.url);
    // On one server the forward slot counts against the same limit.
    let needed = if same_server { 2 } else { 1 };
    let tfree = tsettings.max_replication_slots - tusage.slots;
    let mut problems = Vec::new();
    if tsettings.wal_level != "logical" {
        problems.push(format!(
            "the target's wal_level is {:?}, not \"logical\"",
            tsettings.wal_level
        ));
    }
    if tfree < needed {
        problems.push(format!(
            "{tfree} replication slot(s) free on the target server, {needed} needed{}",
            if same_server {
                " (the forward slot is on the same server)"
            } else {
                ""
            }
        ));
    }
    if tsettings.max_wal_senders - tusage.walsenders < needed {
        problems.push("no WAL sender free on the target server for the reverse stream".into());
    }
    if problems.is_empty() {
        ck.ok(REVERSE, "the target can feed the reverse stream that keeps the old table current after `cutover writes`");
    } else {
        ck.warn(
            REVERSE,
            format!("{}: `cutover writes` will refuse until this is fixed (earlier stages do not need it)", problems.join("; ")),
            Some("on the target: ALTER SYSTEM SET wal_level = logical / raise max_replication_slots and max_wal_senders; restart".into()),
        );
    }

    Ok(Plan {
        name: spec.name.clone(),
        source: format!("{} table {}", spec.source.url.redacted(), spec.source.table),
        target: format!("{} table {}", spec.target.url.redacted(), spec.target.table),
        checks: ck.0,
        steps: runbook(spec),
    })
}

/// Runs the target DDL inside a savepoint so that a failure leaves the transaction usable.
/// The outer `Err` is plan's own failure; the inner one is the DDL's error message.
async fn try_ddl(
    tx: &tokio_postgres::Transaction<'_>,
    ddl: &str,
) -> Result<Result<(), String>, PlanError> {
    tx.batch_execute("SAVEPOINT shadowmig_plan_ddl")
        .await
        .map_err(pq("savepoint"))?;
    match tx.batch_execute(ddl).await {
        Ok(()) => Ok(Ok(())),
        Err(e) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT shadowmig_plan_ddl")
                .await
                .map_err(pq("rollback to savepoint"))?;
            Ok(Err(catalog::db_message(&e)))
        }
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

/// Type-checks every target column's expression with assignment semantics, the way apply
/// writes it. Statements are prepared (parsed and analysed), never executed.
async fn type_check(
    spec: &Spec,
    src: &tokio_postgres::Client,
    tx: &tokio_postgres::Transaction<'_>,
    covered: &[(String, String, String)],
    ck: &mut Checks,
) -> Result<(), PlanError> {
    let tgt = spec.target.table.quoted();
    let srcq = spec.source.table.quoted();
    let mut fails = Vec::new();
    for (i, (col, expr, ty)) in covered.iter().enumerate() {
        let origin = if spec.transform.contains_key(col) {
            format!("[transform].{} = {:?}", display_key(col), expr)
        } else {
            format!("source column {col:?}")
        };
        let sql = if spec.same_database() {
            format!(
                "INSERT INTO {tgt} ({}) SELECT ({expr}) FROM {srcq}",
                quote_ident(col)
            )
        } else {
            // Different databases: learn the expression's type on the source, then require an
            // assignment cast from that type to the column's in the target.
            match src
                .prepare(&format!("SELECT ({expr}) FROM {srcq} LIMIT 0"))
                .await
            {
                Err(e) => {
                    fails.push(format!("{origin}: {}", catalog::db_message(&e)));
                    continue;
                }
                Ok(st) => {
                    let t = st.columns().first().map(|c| c.type_().clone());
                    match t {
                        Some(t) => format!(
                            "INSERT INTO {tgt} ({}) SELECT CAST(NULL AS {}.{})",
                            quote_ident(col),
                            quote_ident(t.schema()),
                            quote_ident(t.name())
                        ),
                        None => continue,
                    }
                }
            }
        };
        let sp = format!("shadowmig_plan_{i}");
        tx.batch_execute(&format!("SAVEPOINT {sp}"))
            .await
            .map_err(pq("savepoint"))?;
        match tx.prepare(&sql).await {
            Ok(_) => tx
                .batch_execute(&format!("RELEASE SAVEPOINT {sp}"))
                .await
                .map_err(pq("release savepoint"))?,
            Err(e) => {
                fails.push(format!(
                    "{origin} into {col:?} {ty}: {}",
                    catalog::db_message(&e)
                ));
                tx.batch_execute(&format!("ROLLBACK TO SAVEPOINT {sp}"))
                    .await
                    .map_err(pq("rollback to savepoint"))?;
            }
        }
    }
    if fails.is_empty() {
        ck.ok(
            TRANSFORMS,
            format!(
                "{} column expression(s) type-check against the target columns",
                covered.len()
            ),
        );
    } else {
        ck.fail(
            TRANSFORMS,
            fails.join("\n"),
            "correct the [transform] expression (cast explicitly, e.g. \"col::bigint\"), or the target column's type",
        );
    }
    Ok(())
}

/// A transform that is a plain reference to one column: `col` or `"Col"`.
fn plain_column_ref(expr: &str) -> Option<String> {
    let e = expr.trim();
    if let Some(inner) = e.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        if !inner.is_empty() && !inner.replace("\"\"", "").contains('"') {
            return Some(inner.replace("\"\"", "\""));
        }
        return None;
    }
    let mut chars = e.chars();
    let first = chars.next()?;
    if (first.is_alphabetic() || first == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
    {
        Some(e.to_ascii_lowercase())
    } else {
        None
    }
}

/// The source columns an old-row image carries under `identity`.
fn identity_columns(
    identity: &ReplicaIdentity,
    src_pk: &Option<Vec<String>>,
    src_cols: &[Column],
) -> Vec<String> {
    match identity {
        ReplicaIdentity::Default => src_pk.clone().unwrap_or_default(),
        ReplicaIdentity::Index { columns, .. } => columns.clone(),
        ReplicaIdentity::Full => src_cols.iter().map(|c| c.name.clone()).collect(),
        ReplicaIdentity::Nothing => Vec::new(),
    }
}

#[allow(clippy::too_many_arguments)]
fn identity_check(
    spec: &Spec,
    target_key: &[String],
    computable: &BTreeSet<String>,
    src_cols: &[Column],
    identity: &ReplicaIdentity,
    src_pk: &Option<Vec<String>>,
    src_unique: &[catalog::UniqueIndex],
    ck: &mut Checks,
) {
    let table = &spec.source.table;
    let src_names: BTreeSet<&str> = src_cols.iter().map(|c| c.name.as_str()).collect();
    let mut needed: Vec<String> = Vec::new();
    let mut computed: Vec<String> = Vec::new();
    for k in target_key {
        let src_col = match spec.transform.get(k) {
            Some(e) => plain_column_ref(e).filter(|c| src_names.contains(c.as_str())),
            None => Some(k.clone()).filter(|c| src_names.contains(c.as_str())),
        };
        match src_col {
            Some(c) => {
                if !needed.contains(&c) {
                    needed.push(c)
                }
            }
            None if computable.contains(k) => {}
            None => computed.push(k.clone()),
        }
    }
    let ident_cols = identity_columns(identity, src_pk, src_cols);
    let ident_desc = match identity {
        ReplicaIdentity::Default => "DEFAULT (the primary key)".to_string(),
        ReplicaIdentity::Index { name, .. } => format!("USING INDEX {}", quote_ident(name)),
        ReplicaIdentity::Full => "FULL".into(),
        ReplicaIdentity::Nothing => "NOTHING".into(),
    };
    let key_desc = format!("({})", target_key.join(", "));
    if *identity == ReplicaIdentity::Full {
        ck.ok(REPLICA_IDENTITY, format!("FULL: deletes and key-changing updates carry the whole old row, so apply can compute the target key {key_desc}"));
        return;
    }
    let missing: Vec<&String> = needed.iter().filter(|c| !ident_cols.contains(c)).collect();
    if missing.is_empty() && computed.is_empty() {
        ck.ok(
            REPLICA_IDENTITY,
            format!(
                "{ident_desc} covers ({}), the source columns of the target key {key_desc}",
                needed.join(", ")
            ),
        );
        return;
    }
    let full_fix = format!(
        "ALTER TABLE {table} REPLICA IDENTITY FULL;\n  (every UPDATE and DELETE then writes the whole old row to the WAL: more WAL and decoding work)\n\
         Both ALTER TABLE … REPLICA IDENTITY forms take an ACCESS EXCLUSIVE lock for an instant (no rewrite): run them with SET lock_timeout = '{}ms'.",
        spec.throttle.lock_timeout_ms
    );
    if !computed.is_empty() {
        ck.fail(
            REPLICA_IDENTITY,
            format!(
                "target key column(s) {} are computed by [transform] expressions, so deletes and key-changing updates must carry every column those read; identity {ident_desc} carries only ({})",
                computed.join(", "),
                ident_cols.join(", ")
            ),
            full_fix,
        );
        return;
    }
    let missing_list = missing
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let detail = format!(
        "identity {ident_desc} carries ({}), but the target key {key_desc} also needs ({missing_list}): a DELETE or a key-changing UPDATE on the source would reach apply without the old value of {missing_list}, and apply could not find the target row",
        ident_cols.join(", ")
    );
    // Prefer an existing unique index that already covers everything.
    let existing = src_unique
        .iter()
        .find(|i| i.usable_as_key() && needed.iter().all(|n| i.columns.contains(n)));
    let index_fix = match existing {
        Some(i) => format!(
            "ALTER TABLE {table} REPLICA IDENTITY USING INDEX {};  (the existing unique index covers the target key)",
            quote_ident(&i.name)
        ),
        None => {
            let mut cols: Vec<String> = ident_cols.clone();
            for m in &needed {
                if !cols.contains(m) {
                    cols.push(m.clone());
                }
            }
            let nullable: Vec<&Column> = src_cols
                .iter()
                .filter(|c| cols.contains(&c.name) && !c.not_null)
                .collect();
            let index_name = format!("shadowmig_{}_ri", spec.name);
            let mut s = String::new();
            for c in &nullable {
                let _ = writeln!(
                    s,
                    "ALTER TABLE {table} ALTER COLUMN {} SET NOT NULL;  (an index used as replica identity needs NOT NULL columns; this scans the table under an ACCESS EXCLUSIVE lock)",
                    quote_ident(&c.name)
                );
            }
            let _ = write!(
                s,
                "CREATE UNIQUE INDEX CONCURRENTLY {} ON {table} ({});\nALTER TABLE {table} REPLICA IDENTITY USING INDEX {};",
                quote_ident(&index_name),
                cols.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", "),
                quote_ident(&index_name)
            );
            s
        }
    };
    ck.fail(
        REPLICA_IDENTITY,
        detail,
        format!(
            "either (less WAL)\n  {}\nor\n  {full_fix}",
            index_fix.replace('\n', "\n  ")
        ),
    );
}

/// The fix for a source table whose replica identity gives no old key (NOTHING, or DEFAULT
/// without a primary key), from what the table has: its primary key, an existing unique
/// index that can serve, or neither.
fn no_identity_fix(
    spec: &Spec,
    identity: &ReplicaIdentity,
    pk: Option<&[String]>,
    unique: &[catalog::UniqueIndex],
) -> String {
    let table = &spec.source.table;
    let lock_note = format!(
        "(ALTER TABLE … REPLICA IDENTITY / ADD PRIMARY KEY USING INDEX take an ACCESS EXCLUSIVE lock for an instant, no rewrite: run them with SET lock_timeout = '{}ms')",
        spec.throttle.lock_timeout_ms
    );
    if let Some(pk) = pk {
        // Only NOTHING gets here with a primary key: DEFAULT would use it.
        return format!(
            "ALTER TABLE {table} REPLICA IDENTITY DEFAULT;  (the primary key ({}) becomes the identity)\n{lock_note}",
            pk.join(", ")
        );
    }
    match unique.iter().find(|i| i.usable_as_key()) {
        Some(i) => {
            let idx = quote_ident(&i.name);
            let mut s = format!(
                "ALTER TABLE {table} REPLICA IDENTITY USING INDEX {idx};  (the existing unique index on ({}))",
                i.columns.join(", ")
            );
            // A primary key added under NOTHING would not change the identity.
            if *identity == ReplicaIdentity::Default {
                let _ = write!(
                    s,
                    "\nor make that index the primary key, which DEFAULT identity uses: ALTER TABLE {table} ADD PRIMARY KEY USING INDEX {idx};"
                );
            }
            let _ = write!(s, "\n{lock_note}");
            s
        }
        None => {
            let idx = quote_ident(&format!("shadowmig_{}_key", spec.name));
            format!(
                "the table has no unique index on NOT NULL columns either: create one over the columns that identify a row, then make it the identity:\n\
                 CREATE UNIQUE INDEX CONCURRENTLY {idx} ON {table} (<NOT NULL columns>);\n\
                 ALTER TABLE {table} REPLICA IDENTITY USING INDEX {idx};\n{lock_note}"
            )
        }
    }
}

fn fk_check(
    spec: &Spec,
    fks: &[catalog::ForeignKey],
    target: Option<&TargetInfo>,
    ck: &mut Checks,
) {
    if fks.is_empty() {
        ck.ok(FOREIGN_KEYS, "none into or out of the source table");
        return;
    }
    let tgt = &spec.target.table;
    let mut lines = Vec::new();
    for fk in fks {
        let head = format!(
            "{} {}({}) → {}({})",
            quote_ident(&fk.name),
            fk.from_table,
            fk.from_columns.join(", "),
            fk.to_table,
            fk.to_columns.join(", ")
        );
        match fk.direction {
            FkDirection::Out => {
                let mirrored = target.is_some_and(|t| {
                    t.fks_out
                        .iter()
                        .any(|o| o.to_table == fk.to_table && o.to_columns == fk.to_columns)
                });
                if mirrored {
                    lines.push(format!("out: {head}: the target has the same reference; keep the referenced rows alive during the migration"));
                } else {
                    lines.push(format!(
                        "out: {head}: the target does not enforce it; after the backfill add it as ALTER TABLE {tgt} ADD CONSTRAINT … FOREIGN KEY ({}) REFERENCES {}({}) NOT VALID, then VALIDATE CONSTRAINT (SHARE UPDATE EXCLUSIVE on the target), before the writes stage",
                        fk.from_columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", "),
                        fk.to_table,
                        fk.to_columns.iter().map(|c| quote_ident(c)).collect::<Vec<_>>().join(", ")
                    ));
                }
            }
            FkDirection::In => {
                let unique_in_target = target.is_some_and(|t| {
                    t.unique_sets.iter().any(|u| {
                        u.len() == fk.to_columns.len()
                            && u.iter().all(|c| fk.to_columns.contains(c))
                    })
                });
                let key_note = target
                    .and_then(|t| t.key.as_ref())
                    .map(|k| format!("({})", k.join(", ")))
                    .unwrap_or_else(|| "not known (no usable target table)".into());
                lines.push(format!(
                    "in: {head}: it keeps referencing the old table, whose rows reverse replication keeps current after the writes stage; the old table cannot be dropped after `complete` until this constraint is moved{}",
                    if unique_in_target {
                        format!(" (re-point it: ADD … REFERENCES {tgt} NOT VALID, VALIDATE, then DROP the old one)")
                    } else {
                        format!("; it cannot simply be re-pointed: the target's key is {key_note} and it has no unique constraint on ({}) alone", fk.to_columns.join(", "))
                    }
                ));
            }
        }
    }
    ck.warn(FOREIGN_KEYS, lines.join("\n"), Some("decide for each constraint before `cutover writes`; plan lists them, it does not move them".into()));
}

/// Free bytes of the file system holding `path`.
fn free_bytes(path: &str) -> Option<u64> {
    let c = std::ffi::CString::new(path).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn disk_check(size: i64, t: &catalog::ServerSettings, ck: &mut Checks) {
    // The copy needs about the table's size again, plus the WAL the slot retains while it
    // runs: ask for twice the source's size.
    let need = (size.max(0) as u64).saturating_mul(2);
    // The target is local when its data directory is readable here and its postmaster.pid
    // names the same port (a same-named directory of another server must not fool us).
    let local = t.data_directory.as_ref().filter(|dd| {
        std::fs::read_to_string(std::path::Path::new(dd).join("postmaster.pid"))
            .ok()
            .and_then(|pid| pid.lines().nth(3).map(|l| l.trim() == t.port.to_string()))
            .unwrap_or(false)
    });
    match local.and_then(|dd| free_bytes(dd).map(|f| (dd, f))) {
        Some((dd, free)) if free >= need => ck.ok(
            DISK,
            format!("{} free at the target's data directory {dd}; the copy needs about {} (2× the source's {})", human_bytes(free as i64), human_bytes(need as i64), human_bytes(size)),
        ),
        Some((dd, free)) => ck.fail(
            DISK,
            format!("only {} free at the target's data directory {dd}; the copy needs about {} (2× the source's {})", human_bytes(free as i64), human_bytes(need as i64), human_bytes(size)),
            "free disk space or grow the volume before `run`; the new table plus the WAL kept during the backfill must fit",
        ),
        None => ck.warn(
            DISK,
            format!("could not be checked: the target server's data directory is not on this machine or not readable here; the copy needs about {} free (2× the source's {})", human_bytes(need as i64), human_bytes(size)),
            Some("check free space on the target server yourself".into()),
        ),
    }
}

/// The runbook: every step `run`, `cutover`, `complete` and `abort` take, with locks and
/// rollback.
pub fn runbook(spec: &Spec) -> Vec<Step> {
    let src = &spec.source.table;
    let tgt = &spec.target.table;
    let slot = spec.slot_name();
    let publ = spec.publication_name();
    let lt = spec.throttle.lock_timeout_ms;
    let abort = "shadowmig abort SPEC";
    vec![
        Step {
            title: "Create the state schema".into(),
            action: format!("CREATE SCHEMA IF NOT EXISTS {} in the target, with its progress, chunk and routing tables", quote_ident(STATE_SCHEMA)),
            locks: "nothing the application uses".into(),
            rollback: format!("{abort} deletes this migration's state rows (and the schema when no other migration uses it)"),
        },
        Step {
            title: "Create the publication for the source table only".into(),
            action: format!("CREATE PUBLICATION {} FOR TABLE {src}", quote_ident(&publ)),
            locks: format!("SHARE UPDATE EXCLUSIVE on {src} for an instant (reads and writes go on; it waits behind running DDL, VACUUM or a long ANALYZE, at most lock_timeout = {lt} ms, then gives up and is retried)"),
            rollback: format!("{abort}: DROP PUBLICATION {}", quote_ident(&publ)),
        },
        Step {
            title: "Create the replication slot".into(),
            action: format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput on the source; from now on the source keeps WAL for it"),
            locks: "no table lock; it waits until every transaction that was already running when it started has ended, so a long open transaction on the source delays it (check pg_stat_activity for old xact_start)".into(),
            rollback: format!("{abort}: DROP_REPLICATION_SLOT {slot} (releases the retained WAL)"),
        },
        Step {
            title: "Create the target table".into(),
            action: match &spec.target.create {
                Some(_) => format!("run [target].create (creates {tgt}) with lock_timeout = {lt} ms"),
                None => format!("use the existing {tgt}"),
            },
            locks: format!("ACCESS EXCLUSIVE on the new {tgt} only (nobody uses it yet); a FOREIGN KEY in the DDL also takes SHARE ROW EXCLUSIVE on the referenced table for an instant, under lock_timeout = {lt} ms"),
            rollback: match &spec.target.create {
                Some(_) => format!("{abort}: DROP TABLE {tgt} (shadowmig created it)"),
                None => format!("{abort} leaves {tgt} in place (shadowmig did not create it) and deletes nothing from it"),
            },
        },
        Step {
            title: if spec.copy.defer_indexes {
                "Backfill first, constraints after ([copy] defer_indexes)".into()
            } else {
                "Backfill by watermarked chunks".into()
            },
            action: if spec.copy.defer_indexes {
                format!(
                    "when shadowmig creates {tgt}, its primary key, unique constraints and indexes are dropped in the same transaction and recorded; {} worker(s) copy {src} in key order, {} rows per chunk, by plain COPY into the bare table, with nothing streamed (the slot keeps all WAL from its creation meanwhile: [throttle] max_lag_bytes does not pause this copy); then the constraints are built in one transaction (maintenance_work_mem 256MB), and the stream is applied from the slot's creation",
                    spec.copy.workers, spec.copy.chunk_rows
                )
            } else {
                format!(
                    "{} worker(s) copy {src} in key order, {} rows per chunk, each chunk one short statement between low and high watermarks; paused while the slot holds more than {} bytes or apply lags more than {} ms{}",
                    spec.copy.workers,
                    spec.copy.chunk_rows,
                    spec.throttle.max_lag_bytes,
                    spec.throttle.max_apply_lag_ms,
                    spec.throttle.max_rows_per_sec.map(|r| format!(", at most {r} rows/s")).unwrap_or_default()
                )
            },
            locks: if spec.copy.defer_indexes {
                format!("ACCESS SHARE on {src} for one chunk's read (no row locks; no snapshot held longer than one chunk); ROW EXCLUSIVE on {tgt} while copying, then ACCESS EXCLUSIVE on {tgt} (nobody uses it yet) while the constraints are built")
            } else {
                format!("ACCESS SHARE on {src} for one chunk's read (like any SELECT; no row locks; no snapshot held longer than one chunk); ROW EXCLUSIVE on {tgt}")
            },
            rollback: format!("`shadowmig pause SPEC` stops it at a chunk boundary; {abort} drops what was copied with the target table"),
        },
        Step {
            title: "Stream changes".into(),
            action: format!("apply every change of {src} from the slot into {tgt}, transformed, exactly once (progress committed with the data)"),
            locks: format!("ROW EXCLUSIVE on {tgt} only; none on {src}"),
            rollback: format!("{abort} stops it and drops the slot"),
        },
        Step {
            title: "Verify".into(),
            action: format!("`shadowmig verify SPEC`: compare transform({src}) with {tgt} in key-ordered chunks; re-check differing keys after apply passes them"),
            locks: "ACCESS SHARE on both tables per chunk (reads only)".into(),
            rollback: "nothing to undo".into(),
        },
        Step {
            title: "Cutover: dark-reads, canary, reads".into(),
            action: "`shadowmig cutover SPEC dark-reads --percent P`, then `canary --percent P`, then `reads`: routing only".into(),
            locks: "no table locks; routing state changes in one short transaction on the target".into(),
            rollback: "`shadowmig rollback SPEC` (one stage back) or `--to source`".into(),
        },
        Step {
            title: "Cutover: writes".into(),
            action: format!("write switch: proxies hold new transactions, in-flight ones finish, apply drains to the source's current LSN, reverse replication ({tgt} → {src}) starts at that LSN, routing flips, proxies release"),
            locks: "new transactions wait at the proxy for the measured pause (bounded; on timeout the switch is abandoned and traffic resumes on the old route); table fences change under lock_timeout".into(),
            rollback: "`shadowmig rollback SPEC --to reads`: the write switch in reverse (needs a free replication slot on the target for the reverse stream)".into(),
        },
        Step {
            title: "Complete, or abort".into(),
            action: format!("`shadowmig complete SPEC`: stop both streams, drop the slot(s) and the publication; {src} stays for you to drop. Or `{abort}` at any stage before: drop the slot, the publication, the target table if shadowmig created it, and this migration's state; {src} is untouched"),
            locks: format!("DROP PUBLICATION: an instant SHARE UPDATE EXCLUSIVE on {src} under lock_timeout"),
            rollback: "none after complete: it is the contract step; before it, abort leaves the old table as it was".into(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_column_refs() {
        assert_eq!(
            plain_column_ref(" customer_id "),
            Some("customer_id".into())
        );
        assert_eq!(plain_column_ref("Customer_ID"), Some("customer_id".into()));
        assert_eq!(
            plain_column_ref("\"Cust \"\"x\"\"\""),
            Some("Cust \"x\"".into())
        );
        assert_eq!(plain_column_ref("total_amount::bigint"), None);
        assert_eq!(plain_column_ref("a + b"), None);
        assert_eq!(plain_column_ref("\"a\" || \"b\""), None);
    }
}

//! `shadowmig abort`: undoes a migration. Drops the slot (so no WAL stays held), the
//! publication, the shadow table if shadowmig created it, and the migration's state.
//!
//! It must never touch the source table's rows or shape, and never drop a target table the
//! user created. Each step is idempotent, so an interrupted abort can simply be run again.

use std::time::Duration;

use tokio_postgres::Client;

use crate::catalog;
use crate::spec::{quote_ident, Spec};

/// Aborting failed part-way; what was done so far stays done and a re-run finishes it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AbortError(pub String);

fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> AbortError {
    move |e| AbortError(format!("{what}: {}", catalog::db_message(&e)))
}

/// Runs `sql` in a transaction under `lock_timeout`: abort must answer, never hang behind a
/// session's lock; the error says `what` was being done (and that abort can be run again).
async fn drop_under_lock_timeout(
    client: &Client,
    sql: &str,
    lock_timeout_ms: u64,
    what: &'static str,
) -> Result<(), AbortError> {
    let r = client
        .batch_execute(&format!(
            "BEGIN; SET LOCAL lock_timeout = {lock_timeout_ms}; {sql}; COMMIT;"
        ))
        .await;
    if let Err(e) = r {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(db(what)(e));
    }
    Ok(())
}

/// Undoes the spec's migration; returns a line per thing removed.
pub async fn abort(spec: &Spec) -> Result<Vec<String>, AbortError> {
    let src = catalog::connect(&spec.source.url)
        .await
        .map_err(|e| AbortError(e.to_string()))?;
    let tgt = catalog::connect(&spec.target.url)
        .await
        .map_err(|e| AbortError(e.to_string()))?;
    let mut done = Vec::new();
    let slot = spec.slot_name();
    // A running `run` holds the slot: end its walsender first, then drop the slot.
    for attempt in 0..50 {
        let row = src
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
                &[&slot],
            )
            .await
            .map_err(db("looking up the slot"))?;
        let Some(row) = row else { break };
        let pid: Option<i32> = row.get(0);
        if let Some(pid) = pid {
            if attempt == 0 {
                done.push(format!(
                    "stopped the running consumer of slot {slot} (pid {pid})"
                ));
            }
            src.execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .map_err(db("ending the slot's consumer"))?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        match src
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => {
                done.push(format!("dropped replication slot {slot}"));
                break;
            }
            // It became active again in between (a `run` reconnecting): try again.
            Err(e)
                if e.as_db_error()
                    .map(|d| d.code().code() == "55006")
                    .unwrap_or(false) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(db("dropping the slot")(e)),
        }
    }
    let pubname = spec.publication_name();
    let (slot_where, have_pub) = catalog::slot_and_publication_exist(&src, &slot, &pubname)
        .await
        .map_err(|e| AbortError(e.to_string()))?;
    if let catalog::SlotPresence::OtherDatabase(other) = slot_where {
        done.push(format!(
            "left replication slot {slot} alone: it belongs to database {other:?}, not to this migration's source"
        ));
    }
    if have_pub {
        drop_under_lock_timeout(
            &src,
            &format!("DROP PUBLICATION IF EXISTS {}", quote_ident(&pubname)),
            spec.throttle.lock_timeout_ms,
            "dropping the publication (a session may hold a lock on it; run abort again)",
        )
        .await?;
        done.push(format!("dropped publication {pubname}"));
    }
    drop_target_and_state(&tgt, spec, &mut done).await?;
    if done.is_empty() {
        done.push(format!(
            "nothing to undo: migration {} left nothing behind",
            spec.name
        ));
    }
    Ok(done)
}

async fn drop_target_and_state(
    tgt: &Client,
    spec: &Spec,
    done: &mut Vec<String>,
) -> Result<(), AbortError> {
    let have_state = crate::state::exists(tgt)
        .await
        .map_err(|e| AbortError(e.to_string()))?;
    if !have_state {
        return Ok(());
    }
    let created: bool = tgt
        .query_opt(
            "SELECT coalesce((to_jsonb(m) ->> 'created_target')::boolean, false) FROM shadowmig.migrations m WHERE name = $1",
            &[&spec.name],
        )
        .await
        .map_err(db("reading the migration"))?
        .map(|r| r.get(0))
        .unwrap_or(false);
    if created {
        let exists = catalog::table_oid(tgt, &spec.target.table)
            .await
            .map_err(|e| AbortError(e.to_string()))?
            .is_some();
        if exists {
            drop_under_lock_timeout(
                tgt,
                &format!("DROP TABLE {}", spec.target.table.quoted()),
                spec.throttle.lock_timeout_ms,
                "dropping the shadow table (it may be in use; run abort again)",
            )
            .await?;
            done.push(format!(
                "dropped shadow table {}",
                spec.target.table.quoted()
            ));
        }
    }
    let tx_sql = "DELETE FROM shadowmig.copy_progress WHERE migration = $1";
    let mut removed = tgt
        .execute(tx_sql, &[&spec.name])
        .await
        .map_err(db("removing copy progress"))?;
    removed += tgt
        .execute(
            "DELETE FROM shadowmig.progress WHERE migration = $1",
            &[&spec.name],
        )
        .await
        .map_err(db("removing progress"))?;
    // Tables that later versions added to the state schema: an older schema may lack them.
    for (table, what) in [
        ("reread", "pending re-reads"),
        ("sampler_counters", "the sampler's counters"),
        ("deferred_ddl", "the deferred constraints"),
    ] {
        let exists: bool = tgt
            .query_one(
                "SELECT to_regclass(format('shadowmig.%I', $1::text)) IS NOT NULL",
                &[&table],
            )
            .await
            .map_err(db("looking for a state table"))?
            .get(0);
        if exists {
            removed += tgt
                .execute(
                    &format!("DELETE FROM shadowmig.{table} WHERE migration = $1"),
                    &[&spec.name],
                )
                .await
                .map_err(|e| AbortError(format!("removing {what}: {}", catalog::db_message(&e))))?;
        }
    }
    removed += tgt
        .execute(
            "DELETE FROM shadowmig.migrations WHERE name = $1",
            &[&spec.name],
        )
        .await
        .map_err(db("removing the migration"))?;
    if removed > 0 {
        done.push(format!("removed the state of migration {}", spec.name));
    }
    let others: i64 = tgt
        .query_one("SELECT count(*) FROM shadowmig.migrations", &[])
        .await
        .map_err(db("counting migrations"))?
        .get(0);
    if others == 0 {
        tgt.batch_execute("DROP SCHEMA shadowmig CASCADE")
            .await
            .map_err(db("dropping the state schema"))?;
        done.push("dropped schema shadowmig (no other migrations use it)".into());
    }
    Ok(())
}

//! What to do with a source transaction that the walsender streams before its commit
//! (pgoutput protocol 2, `streaming 'on'`). The decisions are [`StreamedState`], pure and
//! unit-tested without a database; the `Applier` methods below carry them out on the spare
//! target connection.
//!
//! Owns: which streamed transaction is being applied, the (sub)transactions whose changes it
//! received, and whether something in it (DDL, TRUNCATE) means it must not be applied.
//! Must never: apply a change of a transaction other than the one open, or keep applying a
//! transaction after an abort it cannot undo — those end in a restart without streaming,
//! where the walsender sends the transaction whole at its commit (D29).

use std::collections::HashSet;

use super::forward_writer;
use super::{Applier, Change, RunError, RunOptions};
use crate::lsn::Lsn;
use crate::pgoutput::PgTimestamp;
use crate::replication::LogicalStream;

/// The streamed transaction being applied, if any.
#[derive(Debug, Default)]
pub(super) struct StreamedState {
    open: Option<Open>,
}

/// Why a streamed transaction must not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Poison {
    /// DDL changed the source table's shape (what changed).
    Shape(String),
    /// The source table was truncated.
    Truncate,
}

#[derive(Debug)]
struct Open {
    xid: u32,
    /// (Sub)transactions whose changes, relation or truncate messages were received.
    writers: HashSet<u32>,
    /// Why the transaction must not be applied (DDL or TRUNCATE on the source table): the
    /// migration pauses at its commit, and nothing happens if it aborts.
    poison: Option<Poison>,
}

/// What a change of a streamed transaction leads to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum OnChange {
    /// The first change of the transaction: open a target transaction for it, then push.
    Begin,
    /// Add the change to the open transaction.
    Push,
    /// Drop it: the transaction will not be applied.
    Drop,
    /// Another transaction is being applied: restart without streaming, for this reason.
    Fallback(String),
}

/// What a Stream Abort leads to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum OnAbort {
    /// Not ours, or a subtransaction we received nothing of.
    Nothing,
    /// The whole transaction aborted: roll its target transaction back.
    RollBack,
    /// A subtransaction whose changes may already be coalesced into written parts: roll back
    /// and restart without streaming, for this reason.
    Fallback(String),
}

/// What a Stream Commit leads to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum OnCommit {
    /// Nothing of ours was in it.
    Nothing,
    /// Commit its target transaction.
    Commit,
    /// Roll it back and pause the migration for this reason.
    Pause(Poison),
}

impl StreamedState {
    /// The xid of the transaction being applied.
    pub(super) fn open_xid(&self) -> Option<u32> {
        self.open.as_ref().map(|o| o.xid)
    }

    /// A change of the source table by (sub)transaction `sub` of streamed transaction `top`.
    pub(super) fn on_change(&mut self, top: u32, sub: u32) -> OnChange {
        match self.open.as_mut() {
            None => {
                self.open = Some(Open {
                    xid: top,
                    writers: HashSet::from([sub]),
                    poison: None,
                });
                OnChange::Begin
            }
            Some(o) if o.xid == top => {
                o.writers.insert(sub);
                if o.poison.is_some() {
                    OnChange::Drop
                } else {
                    OnChange::Push
                }
            }
            Some(o) => OnChange::Fallback(format!(
                "transactions {} and {top} were streamed at once; one target transaction per source transaction would be needed",
                o.xid
            )),
        }
    }

    /// A message in `top` (by `sub`) that makes the transaction unappliable: DDL that changed
    /// the source table's shape, or a TRUNCATE of it. The first reason is kept.
    pub(super) fn poison(&mut self, top: u32, sub: u32, why: Poison) -> OnChange {
        match self.open.as_mut() {
            None => {
                self.open = Some(Open {
                    xid: top,
                    writers: HashSet::from([sub]),
                    poison: Some(why),
                });
                OnChange::Drop
            }
            Some(o) if o.xid == top => {
                o.writers.insert(sub);
                o.poison.get_or_insert(why);
                OnChange::Drop
            }
            Some(o) => OnChange::Fallback(format!(
                "transactions {} and {top} were streamed at once",
                o.xid
            )),
        }
    }

    /// Stream Abort of `sub` (the transaction itself when `sub == top`).
    pub(super) fn on_abort(&mut self, top: u32, sub: u32) -> OnAbort {
        let Some(o) = self.open.as_ref().filter(|o| o.xid == top) else {
            return OnAbort::Nothing;
        };
        if sub == top {
            self.open = None;
            return OnAbort::RollBack;
        }
        if !o.writers.contains(&sub) {
            // Its changes (if it had any for this table) were never streamed: the walsender
            // discarded them.
            return OnAbort::Nothing;
        }
        self.open = None;
        OnAbort::Fallback(format!(
            "subtransaction {sub} of streamed transaction {top} rolled back after some of its changes had arrived"
        ))
    }

    /// Stream Commit of `top`.
    pub(super) fn on_commit(&mut self, top: u32) -> OnCommit {
        if self.open.as_ref().map(|o| o.xid) != Some(top) {
            return OnCommit::Nothing;
        }
        match self.open.take().and_then(|o| o.poison) {
            Some(why) => OnCommit::Pause(why),
            None => OnCommit::Commit,
        }
    }

    /// Forgets the open transaction (its target transaction was rolled back elsewhere).
    pub(super) fn clear(&mut self) {
        self.open = None;
    }
}

impl Applier<'_> {
    /// A change of the source table by `sub` in streamed transaction `top`: written into the
    /// transaction's own target transaction, on the spare connection, in coalesced parts.
    pub(super) async fn push_streamed(
        &mut self,
        top: u32,
        sub: u32,
        change: Change,
        opts: &RunOptions,
        stream: &LogicalStream,
    ) -> Result<(), RunError> {
        match self.streamed_state.on_change(top, sub) {
            OnChange::Drop => {
                tracing::trace!(
                    xid = top,
                    "dropped a change of a streamed transaction that will not be applied"
                );
                return Ok(());
            }
            OnChange::Fallback(why) => return self.fall_back(why).await,
            OnChange::Begin => self.begin_streamed().await?,
            OnChange::Push => {}
        }
        let Some(l) = self.streamed.as_mut() else {
            return Err(no_writer());
        };
        if l.add(&mut self.sampler, change, opts)? {
            // Every transaction that committed before these changes were made is in the
            // target before them: a key they share was changed by that transaction first
            // (the source's row lock orders them), and it arrived before this part.
            self.flush(stream).await?;
            self.join().await?;
            let Some(l) = self.streamed.as_mut() else {
                return Err(no_writer());
            };
            if !l.send_part().await {
                return self.streamed_writer_ended().await;
            }
        }
        Ok(())
    }

    /// DDL or a TRUNCATE on the source table inside streamed transaction `top` (by `sub`):
    /// nothing more of it is applied, and its commit pauses the migration with `why`.
    pub(super) async fn poison_streamed(
        &mut self,
        top: u32,
        sub: u32,
        why: Poison,
    ) -> Result<(), RunError> {
        tracing::debug!(xid = top, subxid = sub, reason = ?why, "a streamed transaction changed the source table's shape or truncated it");
        match self.streamed_state.poison(top, sub, why) {
            OnChange::Fallback(why) => self.fall_back(why).await,
            _ => Ok(()),
        }
    }

    /// Stream Abort of `sub` in `top`.
    pub(super) async fn abort_streamed(&mut self, top: u32, sub: u32) -> Result<(), RunError> {
        match self.streamed_state.on_abort(top, sub) {
            OnAbort::Nothing => Ok(()),
            OnAbort::RollBack => {
                tracing::info!(
                    xid = top,
                    "a streamed source transaction aborted: its parts were rolled back"
                );
                self.abandon_streamed().await
            }
            OnAbort::Fallback(why) => self.fall_back(why).await,
        }
    }

    /// Stream Commit of `top`, whose commit ends at `end_lsn`: once every earlier commit is in
    /// the target, its target transaction commits with the progress, as the batch in flight.
    /// `Some(reason)` when the migration must pause instead (the transaction changed the source
    /// table's shape or truncated it). `committed` is the progress the run started from,
    /// `prepared_at` where the prepared columns were current: a shape change committed before
    /// that is a replay from before a DDL they include, which the stream can only map onto
    /// them when the transaction comes whole, so it restarts without streaming (D30).
    pub(super) async fn commit_streamed(
        &mut self,
        top: u32,
        end_lsn: Lsn,
        commit_ts: PgTimestamp,
        (committed, prepared_at): (Option<Lsn>, Lsn),
        stream: &LogicalStream,
    ) -> Result<Option<Poison>, RunError> {
        match self.streamed_state.on_commit(top) {
            OnCommit::Nothing => Ok(None),
            OnCommit::Pause(_) if committed.is_some_and(|c| end_lsn <= c) => {
                self.abandon_streamed().await.map(|()| None)
            }
            OnCommit::Pause(Poison::Shape(why)) if end_lsn <= prepared_at => {
                self.fall_back(format!(
                    "streamed transaction {top} was written before the source table's last change of shape ({why})"
                ))
                .await
                .map(|()| None)
            }
            OnCommit::Pause(why) => {
                self.abandon_streamed().await?;
                Ok(Some(why))
            }
            OnCommit::Commit => {
                self.flush(stream).await?;
                self.join().await?;
                if committed.is_some_and(|c| end_lsn <= c) {
                    // A replay after a restart: already in the target.
                    return self.abandon_streamed().await.map(|()| None);
                }
                let Some(l) = self.streamed.take() else {
                    return Err(no_writer());
                };
                // The idle apply connection waits for the next streamed transaction; the one
                // that wrote this transaction applies the batches after it.
                self.spare = self.conn.take();
                let received = l.received;
                self.commit_parts(l, end_lsn, (commit_ts, received), stream)
                    .await?;
                Ok(None)
            }
        }
    }

    /// Opens the streamed transaction's target transaction on the spare connection (made on
    /// first use) and starts its writer task.
    async fn begin_streamed(&mut self) -> Result<(), RunError> {
        let (tgt, writer) = match self.spare.take() {
            Some(c) => c,
            None => {
                let tgt = crate::catalog::connect_as(&self.spec.target.url, "apply")
                    .await
                    .map_err(|e| RunError::Connection(e.to_string()))?;
                (tgt, forward_writer(self.spec, &self.prepared_arc)?)
            }
        };
        tracing::info!("applying a streamed source transaction in parts before its commit");
        self.streamed = Some(self.spawn_parts_writer(tgt, writer, Lsn::ZERO)?);
        Ok(())
    }

    /// Rolls the streamed transaction's target transaction back (if one was opened) and keeps
    /// its connection as the spare.
    pub(super) async fn abandon_streamed(&mut self) -> Result<(), RunError> {
        self.streamed_state.clear();
        let Some(l) = self.streamed.take() else {
            return Ok(());
        };
        drop(l.parts);
        let done = l
            .handle
            .await
            .map_err(|e| RunError::Fatal(format!("the streamed-transaction writer failed: {e}")))?;
        self.spare = Some((done.tgt, done.writer));
        match done.result {
            Err(RunError::Abandoned) => Ok(()),
            Err(e) => Err(e),
            Ok(_) => Err(RunError::Fatal(
                "internal: a streamed transaction committed without its commit".into(),
            )),
        }
    }

    /// The streamed-transaction task ended before its transaction did: its error says why.
    async fn streamed_writer_ended(&mut self) -> Result<(), RunError> {
        self.abandon_streamed().await.and(Err(RunError::Fatal(
            "the streamed-transaction writer ended before the transaction did".into(),
        )))
    }

    /// Rolls back the streamed transaction and restarts the stream without streaming.
    async fn fall_back(&mut self, why: String) -> Result<(), RunError> {
        self.abandon_streamed().await?;
        Err(RunError::Restart {
            why,
            streaming: false,
        })
    }
}

/// A streamed transaction's message arrived while no writer holds it open.
fn no_writer() -> RunError {
    RunError::Fatal("internal: a streamed transaction without its writer".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_transaction_begins_at_its_first_change_and_commits() {
        let mut s = StreamedState::default();
        assert_eq!(s.on_change(10, 10), OnChange::Begin);
        assert_eq!(s.on_change(10, 11), OnChange::Push);
        assert_eq!(s.open_xid(), Some(10));
        assert_eq!(s.on_commit(10), OnCommit::Commit);
        assert_eq!(s.open_xid(), None);
        // Our own writes, streamed without changes of the table, commit to nothing.
        assert_eq!(s.on_commit(12), OnCommit::Nothing);
    }

    #[test]
    fn a_second_streamed_transaction_with_changes_falls_back() {
        let mut s = StreamedState::default();
        assert_eq!(s.on_change(10, 10), OnChange::Begin);
        assert!(matches!(s.on_change(20, 20), OnChange::Fallback(m) if m.contains("10 and 20")));
        assert!(matches!(
            s.poison(20, 20, Poison::Truncate),
            OnChange::Fallback(_)
        ));
    }

    #[test]
    fn aborts_roll_back_ignore_or_fall_back() {
        let mut s = StreamedState::default();
        assert_eq!(s.on_abort(10, 10), OnAbort::Nothing, "nothing open");
        s.on_change(10, 10);
        s.on_change(10, 11);
        // A subtransaction we received nothing of: the walsender dropped its changes.
        assert_eq!(s.on_abort(10, 12), OnAbort::Nothing);
        assert_eq!(s.on_abort(99, 99), OnAbort::Nothing, "another transaction");
        assert_eq!(s.open_xid(), Some(10));
        assert!(
            matches!(s.on_abort(10, 11), OnAbort::Fallback(m) if m.contains("subtransaction 11"))
        );
        assert_eq!(s.open_xid(), None);
        s.on_change(30, 30);
        assert_eq!(s.on_abort(30, 30), OnAbort::RollBack);
        assert_eq!(s.open_xid(), None);
        assert_eq!(s.on_commit(30), OnCommit::Nothing);
    }

    #[test]
    fn a_poisoned_transaction_drops_its_changes_and_pauses_at_commit_only() {
        let mut s = StreamedState::default();
        let shape = Poison::Shape("a column was added".into());
        assert_eq!(s.poison(10, 10, shape.clone()), OnChange::Drop);
        assert_eq!(s.on_change(10, 10), OnChange::Drop);
        assert_eq!(s.poison(10, 10, Poison::Truncate), OnChange::Drop);
        assert_eq!(s.on_commit(10), OnCommit::Pause(shape), "the first reason");
        // Aborted instead: nothing to pause for.
        s.on_change(20, 20);
        s.poison(20, 20, Poison::Truncate);
        assert_eq!(s.on_abort(20, 20), OnAbort::RollBack);
        assert_eq!(s.on_commit(20), OnCommit::Nothing);
    }
}

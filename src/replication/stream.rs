//! The CopyBoth logical stream after `START_REPLICATION … LOGICAL`.
//!
//! Owns the two tasks that hold the socket once streaming starts: a reader that turns
//! `XLogData` and primary keepalives into [`ReplicationEvent`]s on a bounded channel (a full
//! channel stops the reader, which stops reading the socket: TCP backpressure), and a writer
//! that sends standby status updates on an interval, at once when the server asks, and when the
//! caller asks. While the stream is busy, the reader of a TCP socket raises the socket's receive
//! low-water mark so that the kernel wakes it once per [`StreamConfig::busy_low_water`] bytes, not
//! once per message (docs/DECISIONS.md D20); it must never let a message wait in the socket
//! much longer than [`StreamConfig::busy_wait`]. It must never report as flushed an LSN the
//! caller did not confirm, except by the idle rule documented on [`LogicalStream`], and it must
//! never decode pgoutput beyond a payload's first byte and a commit's end LSN.

use std::collections::HashSet;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore, TryAcquireError};
use tokio::task::JoinHandle;

use super::conn::{
    parse_error, quote_ident, quote_literal, try_frame, BoxIo, Cursor, Frame, READ_CHUNK,
};
use super::ReplicationError;
use crate::lsn::Lsn;

/// How long [`LogicalStream::shutdown`] waits for the server to end the COPY.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// Most events handed to the consumer in one batch.
const MAX_BATCH: usize = 256;
/// Largest channel capacity (tokio's semaphore has a permit limit).
const MAX_CAPACITY: usize = 1 << 24;
/// Default [`StreamConfig::busy_low_water`]: see docs/DECISIONS.md (D20).
const BUSY_LOWAT: usize = 32 * 1024;
/// Default [`StreamConfig::busy_wait`].
const BUSY_WAIT: Duration = Duration::from_millis(8);
/// Seconds from 1970-01-01 to PostgreSQL's epoch, 2000-01-01 (UTC).
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// One message from the server's side of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// A pgoutput message (`w`): decode `data` with [`crate::pgoutput`].
    XLogData {
        /// The WAL position of this message (for a Commit: the commit record's end).
        wal_start: Lsn,
        /// The server's current end of WAL sent (for logical streams, the same as `wal_start`).
        wal_end: Lsn,
        /// The server's clock when sending, microseconds since 2000-01-01 UTC.
        server_time: i64,
        /// The pgoutput message bytes.
        data: Bytes,
    },
    /// A primary keepalive (`k`). Informational: the stream answers it by itself. When the
    /// queue is full, keepalives that arrive on their own are dropped rather than waited for
    /// (they carry no change).
    Keepalive {
        /// The last WAL position the server has sent or skipped.
        wal_end: Lsn,
        /// The server's clock, microseconds since 2000-01-01 UTC.
        server_time: i64,
        /// The server asked for an immediate reply (already sent by the stream).
        reply_requested: bool,
    },
}

/// Options of the pgoutput plugin for `START_REPLICATION`; each is sent only when set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgOutputOptions {
    /// `proto_version` (1; 2 allows streaming of in-progress transactions).
    pub proto_version: Option<u32>,
    /// `publication_names`, each quoted as an identifier inside the literal.
    pub publication_names: Vec<String>,
    /// `binary 'true'`: column values in binary format (PostgreSQL 14+).
    pub binary: Option<bool>,
    /// `messages 'true'`: logical messages from `pg_logical_emit_message` (PostgreSQL 14+).
    pub messages: Option<bool>,
    /// `streaming 'on'`: stream large in-progress transactions (needs `proto_version` 2).
    pub streaming: Option<bool>,
}

impl PgOutputOptions {
    /// Options with `proto_version` set.
    pub fn new(proto_version: u32) -> Self {
        PgOutputOptions {
            proto_version: Some(proto_version),
            ..Default::default()
        }
    }

    /// Adds a publication (the name exactly as created: case and quotes are preserved).
    pub fn publication(mut self, name: &str) -> Self {
        self.publication_names.push(name.to_string());
        self
    }

    /// Sets `binary`.
    pub fn binary(mut self, on: bool) -> Self {
        self.binary = Some(on);
        self
    }

    /// Sets `messages`.
    pub fn messages(mut self, on: bool) -> Self {
        self.messages = Some(on);
        self
    }

    /// Sets `streaming`.
    pub fn streaming(mut self, on: bool) -> Self {
        self.streaming = Some(on);
        self
    }

    /// The option list for `START_REPLICATION`, without parentheses (empty if nothing set).
    pub fn to_sql(&self) -> Result<String, ReplicationError> {
        let mut parts = Vec::new();
        if let Some(v) = self.proto_version {
            parts.push(format!("\"proto_version\" '{v}'"));
        }
        if !self.publication_names.is_empty() {
            let mut names = Vec::with_capacity(self.publication_names.len());
            for n in &self.publication_names {
                if n.is_empty() || n.contains('\0') {
                    return Err(ReplicationError::InvalidName {
                        name: n.clone(),
                        reason: "a publication name must be non-empty and free of NUL bytes",
                    });
                }
                // pgoutput splits the list with SplitIdentifierString: quote each name so case,
                // commas and spaces survive; then the list is one string literal.
                names.push(quote_ident(n));
            }
            parts.push(format!(
                "\"publication_names\" {}",
                quote_literal(&names.join(","))
            ));
        }
        let flag = |b: bool| if b { "true" } else { "false" };
        if let Some(b) = self.binary {
            parts.push(format!("\"binary\" '{}'", flag(b)));
        }
        if let Some(b) = self.messages {
            parts.push(format!("\"messages\" '{}'", flag(b)));
        }
        if let Some(b) = self.streaming {
            parts.push(format!("\"streaming\" '{}'", if b { "on" } else { "off" }));
        }
        Ok(parts.join(", "))
    }
}

/// Tuning of a [`LogicalStream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    /// How many events may wait for the consumer before the reader stops reading the socket.
    pub channel_capacity: usize,
    /// How often a standby status update is sent even when the server does not ask. Keep it
    /// well below the server's `wal_sender_timeout` (default 60 s).
    pub status_interval: Duration,
    /// On TCP, the receive low-water mark (SO_RCVLOWAT, bytes) while the stream is busy: the
    /// kernel then wakes the reader once per this many bytes instead of once per message, which
    /// spares the walsender a wake-up on every send. 0 or 1 turns pacing off. Default 32 KiB.
    pub busy_low_water: usize,
    /// While busy, the longest the reader waits for [`StreamConfig::busy_low_water`] bytes
    /// before it reads whatever is there (the stream stays busy if that was at least 1/32 of
    /// the mark, and counts as idle again otherwise): the most a message can wait in the
    /// socket. Default 8 ms.
    pub busy_wait: Duration,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            channel_capacity: 1024,
            status_interval: Duration::from_secs(10),
            busy_low_water: BUSY_LOWAT,
            busy_wait: BUSY_WAIT,
        }
    }
}

impl StreamConfig {
    /// Sets [`StreamConfig::channel_capacity`] (at least 1).
    pub fn channel_capacity(mut self, n: usize) -> Self {
        self.channel_capacity = n.max(1);
        self
    }

    /// Sets [`StreamConfig::status_interval`].
    pub fn status_interval(mut self, d: Duration) -> Self {
        self.status_interval = d;
        self
    }

    /// Sets [`StreamConfig::busy_low_water`] (0 or 1: no pacing).
    pub fn busy_low_water(mut self, bytes: usize) -> Self {
        self.busy_low_water = bytes;
        self
    }

    /// Sets [`StreamConfig::busy_wait`] (at least 1 ms, tokio's timer resolution).
    pub fn busy_wait(mut self, d: Duration) -> Self {
        self.busy_wait = d.max(Duration::from_millis(1));
        self
    }
}

/// What the reader has seen, for the idle rule.
#[derive(Debug, Default)]
struct Progress {
    /// Between Begin and Commit.
    in_xact: bool,
    /// Between Stream Start and Stream Stop.
    in_stream_block: bool,
    /// Streamed transactions started and not yet committed or aborted.
    streamed_open: HashSet<u32>,
    /// The caller must have confirmed at least this before the idle rule applies: the end LSN
    /// of the last commit received (or the position of a message outside any transaction).
    must_confirm: u64,
    /// The greatest `wal_end` of a keepalive received while no transaction was open.
    idle_wal_end: u64,
    /// The greatest position received in any message.
    received: u64,
}

impl Progress {
    fn open(&self) -> bool {
        self.in_xact || self.in_stream_block || !self.streamed_open.is_empty()
    }

    /// Tracks transaction boundaries from a pgoutput payload's first byte.
    fn observe(&mut self, wal_start: u64, data: &[u8]) {
        let mut c = Cursor::new(data, "pgoutput");
        let tag = c.u8().unwrap_or(0);
        match tag {
            b'B' => self.in_xact = true,
            b'C' => {
                self.in_xact = false;
                // flags(1) commit_lsn(8) end_lsn(8)
                let end = c.take(9).and_then(|_| c.u64()).unwrap_or(wal_start);
                self.must_confirm = self.must_confirm.max(end);
            }
            b'S' => {
                self.in_stream_block = true;
                if let Ok(xid) = c.i32() {
                    self.streamed_open.insert(xid as u32);
                }
            }
            b'E' => self.in_stream_block = false,
            b'c' => {
                // xid(4) flags(1) commit_lsn(8) end_lsn(8)
                if let Ok(xid) = c.i32() {
                    self.streamed_open.remove(&(xid as u32));
                }
                let end = c.take(9).and_then(|_| c.u64()).unwrap_or(wal_start);
                self.must_confirm = self.must_confirm.max(end);
            }
            b'A' => {
                // xid(4) subxid(4): the whole transaction only when they are equal.
                if let (Ok(xid), Ok(sub)) = (c.i32(), c.i32()) {
                    if xid == sub {
                        self.streamed_open.remove(&(xid as u32));
                    }
                }
            }
            _ if !self.open() => {
                // Outside any transaction (a non-transactional logical message): the caller
                // must confirm past it before idle keepalives may be reported.
                self.must_confirm = self.must_confirm.max(wal_start);
            }
            _ => {}
        }
        self.received = self.received.max(wal_start);
    }
}

/// State shared by the stream, its handles and its two tasks.
#[derive(Debug, Default)]
struct Shared {
    /// What the caller says is durable downstream (monotonic).
    confirmed: AtomicU64,
    /// The last flush LSN sent to the server (monotonic).
    reported: AtomicU64,
    /// Standby status updates sent.
    updates_sent: AtomicU64,
    /// Events read and not yet taken by the consumer.
    queued: AtomicUsize,
    /// Successful socket reads, and the bytes they returned.
    reads: AtomicU64,
    bytes_read: AtomicU64,
    /// Times the reader switched to (or left) the busy low-water mark.
    lowat_switches: AtomicU64,
    progress: Mutex<Progress>,
    /// When each queued batch was read, oldest first (the one being handed out included):
    /// how long the oldest unconsumed message has waited, even while the consumer is busy.
    arrivals: Mutex<std::collections::VecDeque<std::time::Instant>>,
}

impl Shared {
    /// The flush LSN to report: see the rule on [`LogicalStream`].
    fn flush_lsn(&self) -> u64 {
        let confirmed = self.confirmed.load(Ordering::Acquire);
        let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let mut flush = confirmed;
        if !p.open() && confirmed >= p.must_confirm {
            flush = flush.max(p.idle_wal_end);
        }
        drop(p);
        // Never step back: PostgreSQL 15 would move confirmed_flush_lsn back with us.
        flush.max(self.reported.load(Ordering::Acquire))
    }

    fn snapshot(&self) -> StatusSnapshot {
        let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        StatusSnapshot {
            confirmed: Lsn(self.confirmed.load(Ordering::Acquire)),
            reported_flush: Lsn(self.reported.load(Ordering::Acquire)),
            received: Lsn(p.received),
            must_confirm: Lsn(p.must_confirm),
            transaction_open: p.open(),
            updates_sent: self.updates_sent.load(Ordering::Acquire),
        }
    }
}

/// How the reader has read the socket so far (see [`LogicalStream::read_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Socket reads that returned data.
    pub reads: u64,
    /// Bytes those reads returned.
    pub bytes: u64,
    /// Times the busy receive low-water mark was set or cleared (0 on a Unix socket).
    pub lowat_switches: u64,
}

/// A point-in-time view of the stream's progress bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSnapshot {
    /// The greatest LSN the caller confirmed.
    pub confirmed: Lsn,
    /// The last flush (= write = apply) LSN sent to the server; `0/0` until one was sent.
    pub reported_flush: Lsn,
    /// The greatest LSN received from the server (data or keepalive).
    pub received: Lsn,
    /// The end LSN of the last commit received (or message outside a transaction).
    pub must_confirm: Lsn,
    /// Whether a transaction (or streamed transaction) is open in what was received.
    pub transaction_open: bool,
    /// Standby status updates sent so far.
    pub updates_sent: u64,
}

enum Cmd {
    /// Send a status update; the ack (if any) gets the result once it is written.
    Status(Option<oneshot::Sender<Result<(), ReplicationError>>>),
    /// Send a last status update and CopyDone.
    Finish(oneshot::Sender<Result<(), ReplicationError>>),
    /// Send Terminate and close the socket.
    Terminate(oneshot::Sender<Result<(), ReplicationError>>),
}

/// A cloneable handle to confirm progress from another task while the stream is consumed.
#[derive(Debug, Clone)]
pub struct ConfirmHandle {
    shared: Arc<Shared>,
    cmd: mpsc::UnboundedSender<Cmd>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cmd::Status(_) => "Status",
            Cmd::Finish(_) => "Finish",
            Cmd::Terminate(_) => "Terminate",
        })
    }
}

impl ConfirmHandle {
    /// When the oldest message read from the server and not yet fully taken by the consumer
    /// arrived; `None` when the consumer has taken everything. Readable from another task
    /// while the consumer is busy elsewhere (e.g. waiting on a slow write).
    pub fn unread_since(&self) -> Option<std::time::Instant> {
        self.shared
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .front()
            .copied()
    }

    /// Declares everything up to `lsn` durable downstream. Monotonic: a lower value is ignored.
    /// Reported to the server with the next status update.
    pub fn confirm(&self, lsn: Lsn) {
        self.shared.confirmed.fetch_max(lsn.0, Ordering::AcqRel);
    }

    /// Sends a standby status update now and waits until it is written to the socket.
    pub async fn send_status_now(&self) -> Result<(), ReplicationError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Status(Some(tx)))
            .map_err(|_| ReplicationError::Closed)?;
        rx.await.map_err(|_| ReplicationError::Closed)?
    }

    /// The stream's progress bookkeeping.
    pub fn status(&self) -> StatusSnapshot {
        self.shared.snapshot()
    }
}

/// A logical replication stream: a [`futures_util::Stream`] of [`ReplicationEvent`]s.
///
/// **Backpressure.** A reader task reads the socket and queues events, at most
/// [`StreamConfig::channel_capacity`] of them (in batches of the messages already buffered, so
/// the hot path pays one hand-over per batch, not per message); when the queue is full the
/// reader waits, stops reading the socket, and the server's sends block on TCP. Status updates come from a separate writer
/// task, so they keep flowing (and the server's `wal_sender_timeout` stays satisfied) while the
/// consumer is slow.
///
/// **What is reported.** Every standby status update sends the same LSN as write, flush and
/// apply position. It is the greatest LSN passed to [`LogicalStream::confirm`] — with one
/// exception, the *idle rule*, which lets a slot advance when its tables are idle (PostgreSQL
/// 15 skips empty transactions, so no commit would ever be confirmed): the `wal_end` of the
/// latest keepalive received while no transaction was open is reported instead, if it is
/// greater, when **both** hold:
/// 1. no transaction is open in what the reader has received: no Begin (`B`) without its
///    Commit (`C`), not inside a Stream Start … Stream Stop block (`S`/`E`), and no streamed
///    transaction without its Stream Commit (`c`) or top-level Stream Abort (`A`); and
/// 2. the caller has confirmed at least the end LSN of the last commit received (from the
///    Commit / Stream Commit payload), or the `wal_start` of the last message received outside
///    any transaction (a non-transactional logical message), whichever is later.
///
/// Then everything the server sent has been durably handled, and the WAL up to that keepalive
/// held no committed change for this slot. (It may hold the start of a transaction that has not
/// committed yet, or whose commit the server has not decoded yet: such a transaction commits
/// after the reported LSN, and PostgreSQL sends every transaction that commits after the
/// slot's `confirmed_flush_lsn` again in full after a restart.) The reported LSN never goes
/// backwards. Status updates go out
/// every [`StreamConfig::status_interval`], at once when a keepalive asks for a reply, and
/// on [`LogicalStream::send_status_now`]; the first interval update is sent right after the
/// start (reporting `0/0`, which the server ignores, until something is confirmed).
///
/// **Errors.** A closed or broken connection (server restart, `wal_sender_timeout`, network,
/// a FATAL error from the server) ends the stream with [`ReplicationError::ConnectionLost`];
/// reconnect and `START_REPLICATION` from the last confirmed LSN (the server resumes from the
/// greater of it and the slot's `confirmed_flush_lsn`). After an error the stream yields
/// `None`.
#[derive(Debug)]
pub struct LogicalStream {
    rx: mpsc::UnboundedReceiver<Result<Vec<ReplicationEvent>, ReplicationError>>,
    /// The batch being handed out, and how many permits it holds.
    batch: std::vec::IntoIter<ReplicationEvent>,
    batch_permits: usize,
    permits: Arc<Semaphore>,
    handle: ConfirmHandle,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    target: String,
    start: Lsn,
}

impl LogicalStream {
    pub(crate) fn spawn(
        io: BoxIo,
        tcp_fd: Option<RawFd>,
        rbuf: BytesMut,
        target: String,
        start: Lsn,
        cfg: StreamConfig,
    ) -> LogicalStream {
        let (rd, wr) = tokio::io::split(io);
        let shared = Arc::new(Shared::default());
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let capacity = cfg.channel_capacity.clamp(1, MAX_CAPACITY);
        let permits = Arc::new(Semaphore::new(capacity));
        let queue = Queue {
            tx: ev_tx,
            permits: permits.clone(),
            capacity,
            shared: shared.clone(),
        };
        let pacer = tcp_fd
            .filter(|_| cfg.busy_low_water > 1)
            .map(|fd| Pacer::new(fd, cfg.busy_low_water, cfg.busy_wait));
        let reader = tokio::spawn(reader_task(
            rd,
            pacer,
            rbuf,
            queue,
            cmd_tx.clone(),
            shared.clone(),
        ));
        let writer = tokio::spawn(writer_task(wr, cmd_rx, shared.clone(), cfg.status_interval));
        LogicalStream {
            rx: ev_rx,
            batch: Vec::new().into_iter(),
            batch_permits: 0,
            permits,
            handle: ConfirmHandle {
                shared,
                cmd: cmd_tx,
            },
            reader,
            writer,
            target,
            start,
        }
    }

    /// Declares everything up to `lsn` durable downstream (see the rule above). Monotonic.
    pub fn confirm(&self, lsn: Lsn) {
        self.handle.confirm(lsn)
    }

    /// A cloneable handle for [`LogicalStream::confirm`] from another task.
    pub fn confirm_handle(&self) -> ConfirmHandle {
        self.handle.clone()
    }

    /// Sends a standby status update now and waits until it is written (e.g. on shutdown, to
    /// confirm what was printed).
    pub async fn send_status_now(&self) -> Result<(), ReplicationError> {
        self.handle.send_status_now().await
    }

    /// The stream's progress bookkeeping.
    pub fn status(&self) -> StatusSnapshot {
        self.handle.status()
    }

    /// When the message just taken (or the next one) was read from the socket: the lag of a
    /// consumer that falls behind counts from there, not from when it got round to it.
    pub fn arrived_at(&self) -> std::time::Instant {
        self.handle
            .unread_since()
            .unwrap_or_else(std::time::Instant::now)
    }

    /// Events read from the socket and not yet taken by the consumer (at most
    /// [`StreamConfig::channel_capacity`]).
    pub fn queued(&self) -> usize {
        self.handle.shared.queued.load(Ordering::Acquire)
    }

    /// How the reader has read the socket so far: reads, bytes, low-water-mark switches.
    pub fn read_stats(&self) -> ReadStats {
        let s = &self.handle.shared;
        ReadStats {
            reads: s.reads.load(Ordering::Relaxed),
            bytes: s.bytes_read.load(Ordering::Relaxed),
            lowat_switches: s.lowat_switches.load(Ordering::Relaxed),
        }
    }

    /// The LSN `START_REPLICATION` was asked to start at.
    pub fn start_lsn(&self) -> Lsn {
        self.start
    }

    /// Ends the stream cleanly: a last status update with what was confirmed, CopyDone, waits
    /// (up to 10 s, discarding events still in flight) for the server to end the COPY, then
    /// Terminate. The slot keeps its confirmed position for the next start.
    pub async fn shutdown(mut self) -> Result<(), ReplicationError> {
        let (tx, rx) = oneshot::channel();
        self.handle
            .cmd
            .send(Cmd::Finish(tx))
            .map_err(|_| ReplicationError::Closed)?;
        rx.await.map_err(|_| ReplicationError::Closed)??;
        let drained = tokio::time::timeout(SHUTDOWN_WAIT, async {
            while let Some(ev) = futures_util::StreamExt::next(&mut self).await {
                ev?;
            }
            Ok(())
        })
        .await;
        let (tx, rx) = oneshot::channel();
        if self.handle.cmd.send(Cmd::Terminate(tx)).is_ok() {
            let _ = rx.await;
        }
        match drained {
            Ok(res) => res,
            Err(_) => {
                tracing::warn!(target = %self.target, "server did not end the COPY in time; closed");
                Ok(())
            }
        }
    }
}

impl Drop for LogicalStream {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl futures_util::Stream for LogicalStream {
    type Item = Result<ReplicationEvent, ReplicationError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(ev) = this.batch.next() {
                this.handle.shared.queued.fetch_sub(1, Ordering::AcqRel);
                return Poll::Ready(Some(Ok(ev)));
            }
            // The batch is used up: give its room back to the reader.
            if this.batch_permits > 0 {
                this.permits.add_permits(this.batch_permits);
                this.batch_permits = 0;
                this.handle
                    .shared
                    .arrivals
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop_front();
            }
            match this.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(batch))) => {
                    this.batch_permits = batch.len();
                    this.batch = batch.into_iter();
                }
            }
        }
    }
}

fn pg_now() -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64 - PG_EPOCH_UNIX_SECS as i64;
    secs * 1_000_000 + i64::from(now.subsec_micros())
}

/// What ends the reader after the current batch.
enum End {
    /// ReadyForQuery after the server ended the COPY: a clean end of stream.
    Clean,
    /// An error for the consumer.
    Error(ReplicationError),
}

/// Turns one backend message into an event (or nothing), updating the progress bookkeeping.
fn handle_frame(
    frame: Frame,
    p: &mut Progress,
    reply: &mut bool,
) -> Result<Option<ReplicationEvent>, End> {
    match frame.tag {
        b'd' => {
            let ev = parse_copy_data(&frame.body).map_err(End::Error)?;
            match &ev {
                ReplicationEvent::XLogData {
                    wal_start, data, ..
                } => p.observe(wal_start.0, data),
                ReplicationEvent::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                } => {
                    p.received = p.received.max(wal_end.0);
                    if !p.open() {
                        p.idle_wal_end = p.idle_wal_end.max(wal_end.0);
                    }
                    *reply |= *reply_requested;
                }
            }
            Ok(Some(ev))
        }
        // The end of a clean shutdown: CopyDone, CommandComplete, then ReadyForQuery.
        b'c' | b'C' | b'S' | b'K' => Ok(None),
        b'Z' => Err(End::Clean),
        b'N' => {
            let n = parse_error(&frame.body);
            tracing::debug!(code = %n.code, message = %n.message, "server notice");
            Ok(None)
        }
        b'E' => {
            let e = parse_error(&frame.body);
            // FATAL and worse end the session (restart, admin shutdown, conflict): the caller
            // may retry; an ERROR is about what we asked for.
            Err(End::Error(if e.severity == "ERROR" {
                ReplicationError::Server(e)
            } else {
                ReplicationError::ConnectionLost(e.to_string())
            }))
        }
        t => Err(End::Error(ReplicationError::Protocol(format!(
            "unexpected message {:?} during replication",
            t as char
        )))),
    }
}

/// What [`PacePolicy`] asks of the socket's receive low-water mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Leave it as it is.
    Keep,
    /// Raise it to the busy mark: wake the reader once per that many bytes.
    Raise,
    /// Drop it to 1 byte: whatever is waiting becomes readable at once.
    Drop,
}

/// Reads within one `wait` that make a stream of small messages busy even below the byte
/// mark: from about 1,000 wake-ups a second, each commit of a steady write load (pgbench's)
/// would otherwise wake the reader, and the walsender's `send` would wake it, on its own.
const BUSY_READS: u32 = 8;

/// When the receive low-water mark goes up and down: the decisions of [`Pacer`], without the
/// socket, so that they can be tested as they are.
///
/// Idle, the mark is 1 byte: every message wakes the reader at once. The stream turns busy
/// when, within `wait`, `lowat` bytes arrive (a backlog) or [`BUSY_READS`] reads are needed (a
/// steady trickle of small transactions); the mark then goes up to `lowat`. When `wait` passes
/// without that much data the mark drops to 1, which makes whatever is waiting readable at
/// once (Linux re-checks readiness whenever the mark changes), so no message waits in the
/// socket longer than `wait`. If that read finds at least `trickle` bytes the stream is still
/// busy — the mark goes straight back up, and a steady load is read once per `wait` instead of
/// once per commit; otherwise the stream is idle again.
#[derive(Debug)]
struct PacePolicy {
    lowat: usize,
    trickle: usize,
    wait: Duration,
    busy: bool,
    /// The mark was dropped by a timeout; the next read decides busy or idle.
    draining: bool,
    /// Idle: when the current measuring window started, and the bytes and reads in it.
    window_start: Instant,
    window_bytes: usize,
    window_reads: u32,
}

impl PacePolicy {
    fn new(lowat: usize, wait: Duration, now: Instant) -> Self {
        PacePolicy {
            lowat,
            trickle: (lowat / 32).max(1),
            wait,
            busy: false,
            draining: false,
            window_start: now,
            window_bytes: 0,
            window_reads: 0,
        }
    }

    /// A read of `n` bytes at `now`.
    fn on_read(&mut self, n: usize, now: Instant) -> Mark {
        if self.busy {
            return Mark::Keep;
        }
        if std::mem::take(&mut self.draining) && n >= self.trickle {
            self.busy = true;
            return Mark::Raise;
        }
        if now.duration_since(self.window_start) > self.wait {
            self.window_start = now;
            self.window_bytes = 0;
            self.window_reads = 0;
        }
        self.window_bytes += n;
        self.window_reads += 1;
        if self.window_bytes >= self.lowat || self.window_reads >= BUSY_READS {
            self.busy = true;
            self.window_start = now;
            self.window_bytes = 0;
            self.window_reads = 0;
            return Mark::Raise;
        }
        Mark::Keep
    }

    /// `wait` passed while busy without a completed read.
    fn on_timeout(&mut self, now: Instant) -> Mark {
        self.busy = false;
        self.draining = true;
        self.window_start = now;
        self.window_bytes = 0;
        self.window_reads = 0;
        Mark::Drop
    }

    /// The mark could not be changed as asked: `raised` is what was tried. A mark that could
    /// not be raised leaves the stream idle; one that could not be dropped leaves it busy, so
    /// that the timer keeps reads going.
    fn mark_failed(&mut self, raised: bool) {
        self.busy = !raised;
        self.draining = false;
    }
}

/// Paces the reader of a TCP socket with the receive low-water mark (SO_RCVLOWAT), as
/// [`PacePolicy`] decides. Linux also wakes the reader below the mark when the receive buffer
/// is under pressure or the window nearly closed.
struct Pacer {
    fd: RawFd,
    policy: PacePolicy,
}

impl Pacer {
    fn new(fd: RawFd, lowat: usize, wait: Duration) -> Self {
        Pacer {
            fd,
            policy: PacePolicy::new(lowat, wait, Instant::now()),
        }
    }

    fn busy(&self) -> bool {
        self.policy.busy
    }

    fn wait(&self) -> Duration {
        self.policy.wait
    }

    /// Sets SO_RCVLOWAT. Failure only costs speed, never data: the mark stays what it was.
    fn set_lowat(&self, bytes: usize, shared: &Shared) -> bool {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fd` is the socket owned by the reader's half of the connection, open for as
        // long as the reader task runs; setsockopt only reads the `c_int` we pass.
        let rc = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "SO_RCVLOWAT not set; reading without it"
            );
            return false;
        }
        shared.lowat_switches.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn apply(&mut self, mark: Mark, shared: &Shared) {
        let (bytes, raised) = match mark {
            Mark::Keep => return,
            Mark::Raise => (self.policy.lowat, true),
            Mark::Drop => (1, false),
        };
        if !self.set_lowat(bytes, shared) {
            self.policy.mark_failed(raised);
        }
    }

    /// Accounts for a read of `n` bytes.
    fn after_read(&mut self, n: usize, shared: &Shared) {
        let mark = self.policy.on_read(n, Instant::now());
        self.apply(mark, shared);
    }

    /// `wait` passed without the mark's worth of data.
    fn timed_out(&mut self, shared: &Shared) {
        let mark = self.policy.on_timeout(Instant::now());
        self.apply(mark, shared);
    }
}

/// Reads more bytes into `buf` (paced by `pacer` on TCP). Errors are a lost connection.
async fn read_more<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    pacer: &mut Option<Pacer>,
    shared: &Shared,
) -> Result<(), ReplicationError> {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
    let res = loop {
        match pacer {
            Some(p) if p.busy() => {
                let r = tokio::select! {
                    biased;
                    r = rd.read_buf(buf) => Some(r),
                    _ = tokio::time::sleep(p.wait()) => None,
                };
                match r {
                    Some(r) => break r,
                    // Too little came for the mark: drop it (which signals what is waiting)
                    // and read again; if it could not be dropped, the timer stays on.
                    None => p.timed_out(shared),
                }
            }
            _ => break rd.read_buf(buf).await,
        }
    };
    match res {
        Ok(0) => Err(ReplicationError::ConnectionLost(
            "the server closed the connection".into(),
        )),
        Ok(n) => {
            shared.reads.fetch_add(1, Ordering::Relaxed);
            shared.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(p) = pacer {
                p.after_read(n, shared);
            }
            Ok(())
        }
        Err(e) => Err(ReplicationError::ConnectionLost(e.to_string())),
    }
}

/// Reads one backend message, waiting for the socket when `buf` holds no complete one.
async fn next_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    pacer: &mut Option<Pacer>,
    shared: &Shared,
) -> Result<Frame, ReplicationError> {
    loop {
        if let Some(f) = try_frame(buf)? {
            return Ok(f);
        }
        read_more(rd, buf, pacer, shared).await?;
    }
}

async fn reader_task<R: AsyncRead + Unpin>(
    mut rd: R,
    mut pacer: Option<Pacer>,
    mut buf: BytesMut,
    q: Queue,
    cmd: mpsc::UnboundedSender<Cmd>,
    shared: Arc<Shared>,
) {
    // A batch must fit into the free room: a quarter of the capacity lets the queue fill to
    // at least three quarters before the reader waits.
    let max_batch = (q.capacity / 4).clamp(1, MAX_BATCH);
    let mut frames = Vec::with_capacity(max_batch);
    loop {
        // Wait for one message, then take every complete one already buffered: one channel
        // send and one lock per batch instead of per message.
        let mut end = None;
        match next_frame(&mut rd, &mut buf, &mut pacer, &shared).await {
            Ok(f) => frames.push(f),
            Err(e) => end = Some(End::Error(e)),
        }
        while end.is_none() && frames.len() < max_batch {
            match try_frame(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => end = Some(End::Error(e)),
            }
        }
        let mut events = Vec::with_capacity(frames.len());
        let mut reply = false;
        {
            let mut p = shared.progress.lock().unwrap_or_else(|e| e.into_inner());
            for f in frames.drain(..) {
                match handle_frame(f, &mut p, &mut reply) {
                    Ok(Some(ev)) => events.push(ev),
                    Ok(None) => {}
                    Err(e) => {
                        end = Some(e);
                        break;
                    }
                }
            }
        }
        frames.clear();
        if reply {
            let _ = cmd.send(Cmd::Status(None));
        }
        if !events.is_empty() && !q.push(events).await {
            return;
        }
        match end {
            None => {}
            Some(End::Clean) => return,
            Some(End::Error(e)) => {
                let _ = q.tx.send(Err(e));
                return;
            }
        }
    }
}

/// The reader's side of the event queue: batches on an unbounded channel, bounded in events
/// by a semaphore whose permits the consumer gives back as it takes events.
struct Queue {
    tx: mpsc::UnboundedSender<Result<Vec<ReplicationEvent>, ReplicationError>>,
    permits: Arc<Semaphore>,
    capacity: usize,
    shared: Arc<Shared>,
}

impl Queue {
    /// Queues a batch, waiting for room; a batch of keepalives only is dropped when there is
    /// none. False when the consumer is gone.
    async fn push(&self, events: Vec<ReplicationEvent>) -> bool {
        if events.is_empty() {
            return true;
        }
        let read_at = std::time::Instant::now();
        let n = events.len() as u32;
        let keepalives_only = events
            .iter()
            .all(|e| matches!(e, ReplicationEvent::Keepalive { .. }));
        if keepalives_only {
            match self.permits.try_acquire_many(n) {
                Ok(p) => p.forget(),
                Err(TryAcquireError::NoPermits) => return true,
                Err(TryAcquireError::Closed) => return false,
            }
        } else {
            match self.permits.acquire_many(n).await {
                Ok(p) => p.forget(),
                Err(_) => return false,
            }
        }
        self.shared.queued.fetch_add(n as usize, Ordering::AcqRel);
        self.shared
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(read_at);
        self.tx.send(Ok(events)).is_ok()
    }
}

fn parse_copy_data(body: &Bytes) -> Result<ReplicationEvent, ReplicationError> {
    let mut c = Cursor::new(body, "CopyData");
    match c.u8()? {
        b'w' => {
            let wal_start = Lsn(c.u64()?);
            let wal_end = Lsn(c.u64()?);
            let server_time = c.i64()?;
            Ok(ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                server_time,
                data: body.slice(25..),
            })
        }
        b'k' => {
            let wal_end = Lsn(c.u64()?);
            let server_time = c.i64()?;
            let reply_requested = c.u8()? != 0;
            Ok(ReplicationEvent::Keepalive {
                wal_end,
                server_time,
                reply_requested,
            })
        }
        t => Err(ReplicationError::Protocol(format!(
            "unknown replication message {:?}",
            t as char
        ))),
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut cmd: mpsc::UnboundedReceiver<Cmd>,
    shared: Arc<Shared>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = BytesMut::with_capacity(64);
    let mut copy_done = false;
    loop {
        let c = tokio::select! {
            _ = tick.tick() => Cmd::Status(None),
            c = cmd.recv() => match c {
                Some(c) => c,
                None => return,
            },
        };
        match c {
            Cmd::Status(ack) => {
                let res = if copy_done {
                    Err(ReplicationError::Closed)
                } else {
                    send_status(&mut wr, &mut buf, &shared).await
                };
                let failed = res.is_err() && !copy_done;
                if let Some(ack) = ack {
                    let _ = ack.send(res);
                }
                if failed {
                    // The reader sees the broken socket too and reports ConnectionLost.
                    return;
                }
            }
            Cmd::Finish(ack) => {
                let mut res = Ok(());
                if !copy_done {
                    res = send_status(&mut wr, &mut buf, &shared).await;
                    if res.is_ok() {
                        frontend::copy_done(&mut buf);
                        res = write_all(&mut wr, &mut buf).await;
                    }
                    copy_done = true;
                }
                let _ = ack.send(res);
            }
            Cmd::Terminate(ack) => {
                frontend::terminate(&mut buf);
                let res = write_all(&mut wr, &mut buf).await;
                let _ = wr.shutdown().await;
                let _ = ack.send(res);
                return;
            }
        }
    }
}

async fn write_all<W: AsyncWrite + Unpin>(
    wr: &mut W,
    buf: &mut BytesMut,
) -> Result<(), ReplicationError> {
    let res = async {
        wr.write_all(buf).await?;
        wr.flush().await
    }
    .await;
    buf.clear();
    res.map_err(|e| ReplicationError::ConnectionLost(e.to_string()))
}

async fn send_status<W: AsyncWrite + Unpin>(
    wr: &mut W,
    buf: &mut BytesMut,
    shared: &Shared,
) -> Result<(), ReplicationError> {
    let flush = shared.flush_lsn();
    let mut msg = [0u8; 34];
    {
        let mut m = &mut msg[..];
        m.put_u8(b'r');
        m.put_u64(flush); // written
        m.put_u64(flush); // flushed
        m.put_u64(flush); // applied
        m.put_i64(pg_now());
        m.put_u8(0); // no reply requested
    }
    frontend::CopyData::new(&msg[..])
        .map_err(|e| ReplicationError::Protocol(e.to_string()))?
        .write(buf);
    write_all(wr, buf).await?;
    shared.reported.fetch_max(flush, Ordering::AcqRel);
    shared.updates_sent.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_burst_of_bytes_makes_the_stream_busy() {
        let t0 = Instant::now();
        let mut p = PacePolicy::new(32 * 1024, 8 * MS, t0);
        assert_eq!(p.on_read(20_000, t0), Mark::Keep);
        assert_eq!(p.on_read(20_000, t0 + MS), Mark::Raise);
        assert!(p.busy);
        // Busy reads that reach the mark keep it.
        assert_eq!(p.on_read(40_000, t0 + 2 * MS), Mark::Keep);
    }

    #[test]
    fn many_small_reads_within_the_wait_make_the_stream_busy() {
        let t0 = Instant::now();
        let mut p = PacePolicy::new(32 * 1024, 8 * MS, t0);
        for i in 0..BUSY_READS - 1 {
            assert_eq!(p.on_read(600, t0 + i * MS / 2), Mark::Keep, "read {i}");
        }
        assert_eq!(p.on_read(600, t0 + 4 * MS), Mark::Raise);
    }

    #[test]
    fn a_slow_trickle_stays_idle() {
        let t0 = Instant::now();
        let mut p = PacePolicy::new(32 * 1024, 8 * MS, t0);
        // One small transaction every 2 ms: 4 reads per window, never busy.
        for i in 0..100 {
            assert_eq!(p.on_read(600, t0 + i * 2 * MS), Mark::Keep, "read {i}");
        }
        assert!(!p.busy);
    }

    #[test]
    fn after_a_timeout_a_steady_trickle_stays_busy_and_a_quiet_stream_goes_idle() {
        let t0 = Instant::now();
        let mut p = PacePolicy::new(32 * 1024, 8 * MS, t0);
        for i in 0..BUSY_READS {
            p.on_read(600, t0 + i * MS / 4);
        }
        assert!(p.busy);
        // The wait passes: the mark drops so that what is waiting can be read at once.
        assert_eq!(p.on_timeout(t0 + 10 * MS), Mark::Drop);
        assert!(!p.busy);
        // Enough came meanwhile: straight back to busy.
        assert_eq!(p.on_read(5_000, t0 + 10 * MS), Mark::Raise);
        assert!(p.busy);
        assert_eq!(p.on_timeout(t0 + 18 * MS), Mark::Drop);
        // Only a lone message: idle, and the next small read does not re-raise.
        assert_eq!(p.on_read(300, t0 + 18 * MS), Mark::Keep);
        assert!(!p.busy);
        assert_eq!(p.on_read(300, t0 + 30 * MS), Mark::Keep);
        assert!(!p.busy);
    }

    #[test]
    fn a_mark_that_cannot_be_changed_leaves_the_timer_on_or_off_safely() {
        let t0 = Instant::now();
        let mut p = PacePolicy::new(32 * 1024, 8 * MS, t0);
        assert_eq!(p.on_read(40_000, t0), Mark::Raise);
        // Raising failed: reads must not wait on a timer for a mark that is not there.
        p.mark_failed(true);
        assert!(!p.busy);
        assert_eq!(p.on_read(40_000, t0 + MS), Mark::Raise);
        assert_eq!(p.on_timeout(t0 + 10 * MS), Mark::Drop);
        // Dropping failed: stay busy so that the timer keeps the reads going.
        p.mark_failed(false);
        assert!(p.busy);
    }

    fn commit(end: u64) -> Vec<u8> {
        let mut v = vec![b'C', 0];
        v.extend_from_slice(&(end - 8).to_be_bytes());
        v.extend_from_slice(&end.to_be_bytes());
        v.extend_from_slice(&0i64.to_be_bytes());
        v
    }

    fn shared_with(f: impl FnOnce(&mut Progress)) -> Shared {
        let s = Shared::default();
        f(&mut s.progress.lock().unwrap());
        s
    }

    #[test]
    fn idle_rule_needs_closed_transaction_and_full_confirmation() {
        let s = shared_with(|p| {
            p.observe(100, b"B");
            p.observe(110, b"I");
            p.observe(200, &commit(200));
            p.idle_wal_end = 300; // keepalive after the commit
        });
        // Nothing confirmed: report nothing.
        assert_eq!(s.flush_lsn(), 0);
        s.confirmed.store(150, Ordering::Release);
        assert_eq!(s.flush_lsn(), 150);
        s.confirmed.store(200, Ordering::Release);
        assert_eq!(s.flush_lsn(), 300);
        // A new transaction opens: only what the caller confirmed.
        s.progress.lock().unwrap().observe(400, b"B");
        s.reported.store(0, Ordering::Release);
        assert_eq!(s.flush_lsn(), 200);
        // Never backwards.
        s.reported.store(300, Ordering::Release);
        assert_eq!(s.flush_lsn(), 300);
    }

    #[test]
    fn streamed_transactions_keep_the_slot_open_until_commit_or_abort() {
        let mut p = Progress::default();
        p.observe(10, &[b'S', 0, 0, 0, 7, 1]);
        assert!(p.open());
        p.observe(11, b"E");
        assert!(p.open(), "xid 7 streamed but not committed");
        // Subtransaction abort keeps it open.
        p.observe(12, &[b'A', 0, 0, 0, 7, 0, 0, 0, 8]);
        assert!(p.open());
        let mut c = vec![b'c', 0, 0, 0, 7, 0];
        c.extend_from_slice(&90u64.to_be_bytes());
        c.extend_from_slice(&99u64.to_be_bytes());
        c.extend_from_slice(&0i64.to_be_bytes());
        p.observe(99, &c);
        assert!(!p.open());
        assert_eq!(p.must_confirm, 99);
        // A non-transactional message outside a transaction must be confirmed too.
        p.observe(120, b"M");
        assert_eq!(p.must_confirm, 120);
        // Truncated payloads do not panic.
        p.observe(130, b"C");
        p.observe(131, b"");
        assert_eq!(p.must_confirm, 131);
    }

    fn rcvlowat(fd: RawFd) -> libc::c_int {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        v
    }

    #[test]
    fn pacer_turns_busy_only_on_fast_data_and_back_to_idle() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let fd = sock.as_raw_fd();
        let shared = Shared::default();
        assert_eq!(rcvlowat(fd), 1);

        // Slow data: the window holds the mark's worth of bytes, but over more than `wait`.
        let mut p = Pacer::new(fd, 4096, Duration::from_millis(20));
        p.after_read(3000, &shared);
        std::thread::sleep(Duration::from_millis(40));
        p.after_read(3000, &shared);
        assert!(!p.busy());
        assert_eq!(rcvlowat(fd), 1);

        // Fast data: busy, with the mark set on the socket.
        std::thread::sleep(Duration::from_millis(40));
        p.after_read(2000, &shared);
        assert!(!p.busy(), "half the mark is not enough");
        p.after_read(2096, &shared);
        assert!(p.busy());
        assert_eq!(rcvlowat(fd), 4096);
        // Busy reads do not touch the mark.
        p.after_read(100, &shared);
        assert_eq!(rcvlowat(fd), 4096);

        p.timed_out(&shared);
        assert!(!p.busy());
        assert_eq!(rcvlowat(fd), 1);
        assert_eq!(shared.lowat_switches.load(Ordering::Relaxed), 2);

        // A bad descriptor: pacing just stays off, no panic.
        let mut bad = Pacer::new(-1, 4096, Duration::from_secs(1));
        bad.after_read(8192, &shared);
        assert!(!bad.busy());
        assert_eq!(shared.lowat_switches.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn options_are_quoted() {
        let o = PgOutputOptions::new(2)
            .publication("p")
            .publication("My \"Pub\" it's")
            .binary(true)
            .messages(true)
            .streaming(true);
        assert_eq!(
            o.to_sql().unwrap(),
            r#""proto_version" '2', "publication_names" '"p","My ""Pub"" it''s"', "binary" 'true', "messages" 'true', "streaming" 'on'"#
        );
        assert_eq!(PgOutputOptions::default().to_sql().unwrap(), "");
        assert!(PgOutputOptions::new(1).publication("").to_sql().is_err());
    }

    #[test]
    fn copy_data_parsing() {
        let mut b = vec![b'w'];
        b.extend_from_slice(&5u64.to_be_bytes());
        b.extend_from_slice(&6u64.to_be_bytes());
        b.extend_from_slice(&7i64.to_be_bytes());
        b.extend_from_slice(b"Bxyz");
        let ev = parse_copy_data(&Bytes::from(b.clone())).unwrap();
        assert_eq!(
            ev,
            ReplicationEvent::XLogData {
                wal_start: Lsn(5),
                wal_end: Lsn(6),
                server_time: 7,
                data: Bytes::from_static(b"Bxyz")
            }
        );
        assert!(parse_copy_data(&Bytes::from(b[..20].to_vec())).is_err());
        assert!(parse_copy_data(&Bytes::from_static(b"k\0")).is_err());
        assert!(parse_copy_data(&Bytes::from_static(b"")).is_err());
    }
}

//! The gate between the encrypted channel and Cap'n Proto RPC: it decides when a peer's next
//! RPC message is read, and what capnp-rpc is allowed to see.
//!
//! - **Memory follows the bytes.** capnp's reader allocates a whole message as soon as its
//!   segment table announces it. The gate reads the table itself (at most
//!   [`MAX_SEGMENTS`] entries), checks the announced size against the traversal limit, and
//!   buffers the body in a buffer that grows with the bytes actually received; capnp sees the
//!   message only once all of it is here. Buffers are released after every message.
//! - **Calls in flight are bounded, by backpressure.** Each `Call` or `Bootstrap` read is a
//!   question the local side owes a `Return`; the writer half counts the `Return`s written.
//!   While `max_calls_in_flight` are owed, or while the socket does not take what is written,
//!   the gate reads nothing more from the peer (TCP then slows it down): no queue grows.
//! - **No large echo.** capnp-rpc answers a message it does not implement with an
//!   `unimplemented` message holding a deep copy of it (which pointer aliasing can make far
//!   larger than the original). Message types no honest peer sends are refused (the connection
//!   ends with [`GateError::Refused`]); the few kinds an honest peer may send that are echoed
//!   (a `Return` that was canceled, ...) pass only when at most [`MAX_ECHOED_BYTES`] long.
//! - **Write stalls are visible.** The writer half records since when the socket has refused
//!   bytes, so the owner can close a connection whose peer stopped reading.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};
use std::time::Instant;

use capnp::Word;
use capnp::message::{ReaderOptions, SegmentArray};
use capnp_rpc::rpc_capnp::{message, return_};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most segments accepted in one message (capnp's own writers use a handful).
pub const MAX_SEGMENTS: usize = 512;
/// Largest message of a kind capnp-rpc echoes back that is let through.
pub const MAX_ECHOED_BYTES: usize = 256;
/// Initial size, in words, of a message body buffer; it doubles as bytes arrive.
const INITIAL_BODY_WORDS: usize = 256;

/// Why the gate ended a connection.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GateError {
    /// A message announced more segments than [`MAX_SEGMENTS`].
    #[error("message of {0} segments")]
    TooManySegments(usize),
    /// A message announced more words than the traversal limit.
    #[error("message of {words} words exceeds {max}")]
    TooLarge {
        /// Words announced.
        words: usize,
        /// Words allowed.
        max: usize,
    },
    /// A message of a kind that would be echoed back, refused before capnp-rpc saw it.
    #[error("refused RPC message: {0}")]
    Refused(&'static str),
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed mid-message")]
    Truncated,
}

impl From<GateError> for io::Error {
    fn from(e: GateError) -> Self {
        let kind = match e {
            GateError::Truncated => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        Self::new(kind, e)
    }
}

/// Limits the gate applies.
#[derive(Debug, Clone, Default)]
pub struct GateLimits {
    /// Questions (calls, bootstraps) the peer may have outstanding before reading pauses;
    /// `None`: no cap (cluster links, clients).
    pub max_calls_in_flight: Option<usize>,
    /// The largest message, in words (the traversal limit).
    pub max_words: usize,
    /// Counts every pause of reading (shared by the connections of a process), if given.
    pub throttled: Option<Arc<AtomicU64>>,
    /// Sums the bytes buffered for messages not yet whole (shared by the connections of a
    /// process), if given.
    pub buffered: Option<Arc<AtomicU64>>,
}

/// What the owner of a connection sees of its gate: calls in flight, write stalls, counts.
/// Shared by the two halves (same thread).
#[derive(Debug)]
pub struct GateState {
    max_calls: Option<usize>,
    owed: Cell<usize>,
    reader: RefCell<Option<Waker>>,
    /// Since when the socket has not taken bytes the writer had for it.
    stalled_since: Cell<Option<Instant>>,
    /// Times reading paused because the peer had the most calls in flight (or the socket
    /// was full).
    throttled: Cell<u64>,
    /// Why the gate refused a message, if it did.
    refused: Cell<Option<&'static str>>,
    /// Bytes held for a message being received.
    buffered: Cell<usize>,
    throttled_total: Option<Arc<AtomicU64>>,
    buffered_total: Option<Arc<AtomicU64>>,
}

impl Drop for GateState {
    fn drop(&mut self) {
        self.set_buffered(0);
    }
}

impl GateState {
    /// Questions read and not yet answered.
    pub fn calls_in_flight(&self) -> usize {
        self.owed.get()
    }

    /// Since when the socket has refused bytes the writer has for it (`None`: not stalled).
    pub fn write_stalled_since(&self) -> Option<Instant> {
        self.stalled_since.get()
    }

    /// Times reading paused for backpressure.
    pub fn times_throttled(&self) -> u64 {
        self.throttled.get()
    }

    /// The kind of message refused, if the gate ended the connection for one.
    pub fn refused(&self) -> Option<&'static str> {
        self.refused.get()
    }

    /// Bytes buffered now for a message not yet whole.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered.get()
    }

    fn set_buffered(&self, n: usize) {
        let before = self.buffered.replace(n);
        if let Some(total) = &self.buffered_total {
            if n >= before {
                total.fetch_add((n - before) as u64, Ordering::Relaxed);
            } else {
                total.fetch_sub((before - n) as u64, Ordering::Relaxed);
            }
        }
    }

    fn wake_reader(&self) {
        if let Some(w) = self.reader.borrow_mut().take() {
            w.wake();
        }
    }

    fn answered(&self) {
        self.owed.set(self.owed.get().saturating_sub(1));
        self.wake_reader();
    }

    fn may_read(&self, cx: &Context<'_>) -> bool {
        let full = self.max_calls.is_some_and(|max| self.owed.get() >= max);
        if full || self.stalled_since.get().is_some() {
            *self.reader.borrow_mut() = Some(cx.waker().clone());
            return false;
        }
        true
    }
}

/// Wraps the two halves of a connection's plaintext stream in the gate.
pub fn gate<R, W>(
    read: R,
    write: W,
    limits: GateLimits,
) -> (GatedReader<R>, GatedWriter<W>, Rc<GateState>) {
    let state = Rc::new(GateState {
        max_calls: limits.max_calls_in_flight,
        owed: Cell::new(0),
        reader: RefCell::new(None),
        stalled_since: Cell::new(None),
        throttled: Cell::new(0),
        refused: Cell::new(None),
        buffered: Cell::new(0),
        throttled_total: limits.throttled.clone(),
        buffered_total: limits.buffered.clone(),
    });
    (
        GatedReader {
            io: read,
            state: Rc::clone(&state),
            max_words: limits.max_words,
            phase: ReadPhase::Table,
            table: Vec::new(),
            body: Vec::new(),
            filled: 0,
            total_words: 0,
            emitted: 0,
            paused: false,
        },
        GatedWriter {
            io: write,
            state: Rc::clone(&state),
            scan: Scan::default(),
        },
        state,
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadPhase {
    /// Reading the segment table.
    Table,
    /// Reading the body.
    Body,
    /// Handing the whole message to capnp.
    Emit,
}

/// The reading half: yields whole RPC messages to capnp, read only when the gate allows.
pub struct GatedReader<R> {
    io: R,
    state: Rc<GateState>,
    max_words: usize,
    phase: ReadPhase,
    /// The segment table as received.
    table: Vec<u8>,
    body: Vec<Word>,
    /// Body bytes received.
    filled: usize,
    total_words: usize,
    /// Bytes of table + body handed out.
    emitted: usize,
    /// Whether the current pause has been counted.
    paused: bool,
}

/// Bytes of a segment table of `segments` entries (padded to a word).
fn table_len(segments: usize) -> usize {
    (4 + 4 * segments).div_ceil(8) * 8
}

/// Reads into `dst`; `Ok(0)` is the end of the stream.
fn poll_io<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    dst: &mut [u8],
) -> Poll<io::Result<usize>> {
    let mut rb = ReadBuf::new(dst);
    ready!(Pin::new(io).poll_read(cx, &mut rb))?;
    Poll::Ready(Ok(rb.filled().len()))
}

fn le_u32(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

impl<R: AsyncRead + Unpin> GatedReader<R> {
    /// Bytes of segment table wanted before the body, once its first word is known.
    fn table_wanted(&self) -> Result<usize, GateError> {
        if self.table.len() < 4 {
            return Ok(8);
        }
        let segments = le_u32(&self.table, 0).saturating_add(1);
        if segments > MAX_SEGMENTS {
            return Err(GateError::TooManySegments(segments));
        }
        Ok(table_len(segments))
    }

    fn segment_lengths(&self) -> impl Iterator<Item = usize> + '_ {
        let segments = le_u32(&self.table, 0) + 1;
        (0..segments).map(|i| le_u32(&self.table, 4 + 4 * i))
    }

    /// Advances the current message until it is whole (`Ok(true)`), or the stream ended
    /// cleanly between messages (`Ok(false)`).
    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            match self.phase {
                ReadPhase::Emit => return Poll::Ready(Ok(true)),
                ReadPhase::Table => {
                    if self.table.is_empty() {
                        // Between messages: read the next one only when the gate allows.
                        if !self.state.may_read(cx) {
                            if !self.paused {
                                self.paused = true;
                                self.state.throttled.set(self.state.throttled.get() + 1);
                                if let Some(total) = &self.state.throttled_total {
                                    total.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            return Poll::Pending;
                        }
                        self.paused = false;
                    }
                    let wanted = self.table_wanted()?;
                    if self.table.len() < wanted {
                        let have = self.table.len();
                        self.table.resize(wanted, 0);
                        let r = poll_io(&mut self.io, cx, &mut self.table[have..wanted]);
                        let n = match r {
                            Poll::Ready(Ok(n)) => n,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => {
                                self.table.truncate(have);
                                return Poll::Pending;
                            }
                        };
                        self.table.truncate(have + n);
                        if n == 0 {
                            return Poll::Ready(if have == 0 {
                                Ok(false)
                            } else {
                                Err(GateError::Truncated.into())
                            });
                        }
                        continue;
                    }
                    self.start_body()?;
                }
                ReadPhase::Body => {
                    let total = self.total_words * 8;
                    if self.filled == total {
                        self.finish_body()?;
                        continue;
                    }
                    if self.filled == self.body.len() * 8 {
                        let words = (self.body.len() * 2)
                            .max(INITIAL_BODY_WORDS)
                            .min(self.total_words);
                        self.body.resize(words, capnp::word(0, 0, 0, 0, 0, 0, 0, 0));
                        self.state.set_buffered(words * 8);
                    }
                    let end = (self.body.len() * 8).min(total);
                    let from = self.filled;
                    let dst = &mut Word::words_to_bytes_mut(&mut self.body)[from..end];
                    match ready!(poll_io(&mut self.io, cx, dst))? {
                        0 => return Poll::Ready(Err(GateError::Truncated.into())),
                        n => self.filled += n,
                    }
                }
            }
        }
    }

    fn start_body(&mut self) -> Result<(), GateError> {
        let words: usize = self.segment_lengths().fold(0usize, usize::saturating_add);
        if words > self.max_words {
            return Err(GateError::TooLarge {
                words,
                max: self.max_words,
            });
        }
        self.total_words = words;
        self.filled = 0;
        self.phase = ReadPhase::Body;
        Ok(())
    }

    fn finish_body(&mut self) -> Result<(), GateError> {
        let kind = self.classify();
        match kind {
            Kind::Question => self.state.owed.set(self.state.owed.get() + 1),
            Kind::Other => {}
            Kind::Refused(why) => {
                self.state.refused.set(Some(why));
                return Err(GateError::Refused(why));
            }
        }
        self.phase = ReadPhase::Emit;
        self.emitted = 0;
        Ok(())
    }

    /// What the buffered message is, from its root: a question, something else, or refused.
    fn classify(&self) -> Kind {
        let bytes = Word::words_to_bytes(&self.body);
        let mut segments: Vec<&[u8]> = Vec::new();
        let mut at = 0;
        for len in self.segment_lengths() {
            let Some(seg) = bytes.get(at..at + len * 8) else {
                return Kind::Refused("malformed segments");
            };
            segments.push(seg);
            at += len * 8;
        }
        let mut options = ReaderOptions::new();
        options.traversal_limit_in_words(Some(self.max_words.max(1)));
        let reader = capnp::message::Reader::new(SegmentArray::new(&segments), options);
        let Ok(root) = reader.get_root::<message::Reader<'_>>() else {
            // capnp-rpc fails the connection on an unreadable root; nothing is echoed.
            return Kind::Other;
        };
        let small = self.total_words * 8 <= MAX_ECHOED_BYTES;
        match root.which() {
            Ok(message::Call(_) | message::Bootstrap(_)) => Kind::Question,
            Ok(message::Return(Ok(r))) => match r.which() {
                Ok(return_::Results(_) | return_::Exception(_)) => Kind::Other,
                Ok(_) if small => Kind::Other,
                Ok(_) => Kind::Refused("return echoed as unimplemented"),
                Err(_) => Kind::Refused("return of an unknown kind"),
            },
            Ok(
                message::Unimplemented(_)
                | message::Abort(_)
                | message::Return(Err(_))
                | message::Finish(_)
                | message::Resolve(_)
                | message::Release(_)
                | message::Disembargo(_),
            ) => Kind::Other,
            Ok(
                message::Provide(_)
                | message::Accept(_)
                | message::Join(_)
                | message::ObsoleteSave(_)
                | message::ObsoleteDelete(_),
            ) => Kind::Refused("message type not served"),
            Err(_) => Kind::Refused("message of an unknown type"),
        }
    }
}

/// What a received message is to the gate.
enum Kind {
    Question,
    Other,
    Refused(&'static str),
}

impl<R: AsyncRead + Unpin> AsyncRead for GatedReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !ready!(this.poll_message(cx))? {
            return Poll::Ready(Ok(()));
        }
        // Emit: the table, then the body.
        let table_len = this.table.len();
        let total = table_len + this.total_words * 8;
        while buf.remaining() > 0 && this.emitted < total {
            let chunk = if this.emitted < table_len {
                &this.table[this.emitted..]
            } else {
                &Word::words_to_bytes(&this.body)[this.emitted - table_len..this.total_words * 8]
            };
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            this.emitted += n;
        }
        if this.emitted == total {
            // The message is capnp's now: release the buffers for the next one.
            this.table = Vec::new();
            this.body = Vec::new();
            this.state.set_buffered(0);
            this.phase = ReadPhase::Table;
        }
        Poll::Ready(Ok(()))
    }
}

/// Scans the outgoing message stream for `Return`s (answers to the peer's questions),
/// without buffering it: only the segment table, the root pointer and the root's
/// discriminant are looked at.
#[derive(Debug, Default)]
struct Scan {
    /// The message's first word (segment count, first segment's length).
    head: [u8; 8],
    head_len: usize,
    /// Segments of the current message.
    segments: usize,
    /// Bytes of segment table after the first word.
    table_rest: usize,
    /// Bytes of the current message seen after its first word.
    seen: usize,
    /// Bytes of the current message still to come (grows as the table is read).
    rest: usize,
    len: [u8; 4],
    root: [u8; 8],
    /// Offset in the body of the root's discriminant, once the root pointer is known.
    disc_at: Option<usize>,
    disc: [u8; 2],
}

impl Scan {
    /// Feeds bytes written; returns how many `Return`s they completed.
    fn feed(&mut self, mut bytes: &[u8]) -> usize {
        let mut returns = 0;
        while !bytes.is_empty() {
            if self.head_len < 8 {
                let n = (8 - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&bytes[..n]);
                self.head_len += n;
                bytes = &bytes[n..];
                if self.head_len == 8 {
                    self.segments = le_u32(&self.head, 0).saturating_add(1);
                    self.table_rest = table_len(self.segments) - 8;
                    self.rest = self.table_rest + le_u32(&self.head, 4) * 8;
                    self.seen = 0;
                    self.disc_at = None;
                    if self.rest == 0 {
                        self.head_len = 0;
                    }
                }
                continue;
            }
            let n = self.rest.min(bytes.len());
            let (start, end) = (self.seen, self.seen + n);
            // The rest of the segment table: each length adds to what is still to come.
            for at in start..end.min(self.table_rest) {
                let entry = at / 4;
                if entry + 1 < self.segments {
                    self.len[at % 4] = bytes[at - start];
                    if at % 4 == 3 {
                        let words = le_u32(&self.len, 0);
                        self.rest = self.rest.saturating_add(words * 8);
                    }
                }
            }
            // The root pointer, then the root's discriminant.
            let body = self.table_rest;
            for at in start.max(body)..end.min(body + 8) {
                self.root[at - body] = bytes[at - start];
                if at - body == 7 {
                    self.disc_at = root_discriminant_at(&self.root);
                }
            }
            if let Some(d) = self.disc_at {
                for k in 0..2 {
                    let at = body + d + k;
                    if (start..end).contains(&at) {
                        self.disc[k] = bytes[at - start];
                        if k == 1 && u16::from_le_bytes(self.disc) == RETURN {
                            returns += 1;
                        }
                    }
                }
            }
            self.seen = end;
            self.rest -= n;
            bytes = &bytes[n..];
            if self.rest == 0 {
                self.head_len = 0;
            }
        }
        returns
    }
}

/// The `Message` union's discriminant of `Return`.
const RETURN: u16 = 3;

/// Where, in the first segment, the root struct's discriminant (its first data bytes) is, from
/// the root pointer.
fn root_discriminant_at(root: &[u8; 8]) -> Option<usize> {
    let lower = u32::from_le_bytes([root[0], root[1], root[2], root[3]]);
    if lower & 3 != 0 {
        return None;
    }
    let data_words = u16::from_le_bytes([root[4], root[5]]);
    if data_words == 0 {
        return None;
    }
    let offset = (lower as i32) >> 2;
    let word = 1i64 + i64::from(offset);
    usize::try_from(word * 8).ok()
}

/// The writing half: passes bytes through, counting the `Return`s written and recording
/// write stalls.
pub struct GatedWriter<W> {
    io: W,
    state: Rc<GateState>,
    scan: Scan,
}

impl<W> GatedWriter<W> {
    fn track<T>(&self, r: &Poll<T>) {
        match r {
            Poll::Pending => {
                if self.state.stalled_since.get().is_none() {
                    self.state.stalled_since.set(Some(Instant::now()));
                }
            }
            Poll::Ready(_) => {
                if self.state.stalled_since.take().is_some() {
                    self.state.wake_reader();
                }
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for GatedWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.track(&r);
        if let Poll::Ready(Ok(n)) = r {
            for _ in 0..this.scan.feed(&buf[..n]) {
                this.state.answered();
            }
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.track(&r);
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;

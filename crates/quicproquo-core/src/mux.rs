//! Push frames beside RPC on one Noise channel: a single writer per connection that carries
//! both Cap'n Proto RPC's byte stream and push frames, coalescing whatever is pending into as
//! few socket writes as it can.
//!
//! [`mux`] splits a [`NoiseWriter`] into
//! - a [`RpcWriter`], the `AsyncWrite` that capnp-rpc writes its messages to (its bytes become
//!   ordinary frames, as with the plain stream view), and
//! - a [`PushPort`], where any task of the connection's thread queues whole push frames
//!   (already encoded: the same bytes may go to many connections), and
//! - a [`Pump`], the future that seals and writes both. It is the only task that writes to the
//!   socket (two tasks polling one socket half would take each other's wake-ups), so it must
//!   run beside the RPC system, and ends once the RPC writer is shut down or dropped and
//!   everything queued is written.
//!
//! The pump writes everything queued in one go (one `write` for many frames when the socket
//! takes them), packs frames back to back into Noise messages (many small frames share one
//! seal; a large one spans several messages), and seals at most [`OUT_HIGH_WATER`] bytes ahead
//! of the socket, so a large frame is never copied whole. What it may hold is bounded by its producers: RPC bytes by
//! [`RPC_PENDING_LIMIT`] (the writer then returns `Pending`), push frames by whatever window
//! the pushing side keeps per subscriber. This is single-threaded (`Rc`), like capnp-rpc.
//!
//! A push frame is written whole and in the order queued; between two RPC frames, never inside
//! one. The reader's side is [`NoiseReader::on_push`](crate::NoiseReader::on_push).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tokio::io::AsyncWrite;

use crate::channel::{HEADER_LEN, NoiseWriter, PUSH_FLAG};
use crate::error::TransportError;
use crate::noise::MAX_NOISE_PLAINTEXT;

/// RPC bytes the writer takes before it returns `Pending` until the pump has taken them.
pub const RPC_PENDING_LIMIT: usize = 256 * 1024;
/// Sealed bytes the pump keeps ahead of the socket.
pub const OUT_HIGH_WATER: usize = 256 * 1024;

/// What the pump is sealing: RPC bytes (one frame) or a push frame.
enum Item {
    Rpc(Vec<u8>),
    Push(Arc<[u8]>),
}

impl Item {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Rpc(b) => b,
            Self::Push(b) => b,
        }
    }
}

/// State shared by the writer, the port and the pump (one thread).
#[derive(Default)]
struct Shared {
    /// RPC bytes not yet taken by the pump.
    rpc: Vec<u8>,
    /// RPC bytes written so far, and those whose frame is written to the socket.
    rpc_in: u64,
    rpc_out: u64,
    /// Push frames not yet taken by the pump, and their bytes.
    pushes: VecDeque<Arc<[u8]>>,
    push_bytes: usize,
    /// Push frames queued and written, in all.
    pushes_queued: u64,
    pushes_written: u64,
    pump: Option<Waker>,
    /// The RPC writer, waiting for room or for its bytes to be written.
    writer: Option<Waker>,
    /// Tasks waiting for queued push frames to be written ([`PushPort::written`]).
    flushed: Vec<Waker>,
    /// Why writing failed; nothing more is taken.
    failed: Option<(io::ErrorKind, String)>,
    /// The RPC writer was shut down or dropped: the pump ends once everything is written.
    closing: bool,
    /// The pump has ended.
    ended: bool,
    /// Since when the socket has not taken what the pump holds.
    stalled_since: Option<Instant>,
    /// The largest frame the channel sends.
    max_frame: usize,
}

impl Shared {
    fn wake_pump(&mut self) {
        if let Some(w) = self.pump.take() {
            w.wake();
        }
    }

    fn wake_writers(&mut self) {
        if let Some(w) = self.writer.take() {
            w.wake();
        }
        for w in self.flushed.drain(..) {
            w.wake();
        }
    }

    fn error(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, why)| io::Error::new(*kind, why.clone()))
    }
}

/// Splits `writer` into the RPC writer, the push port and the pump that writes for both.
pub fn mux<W: AsyncWrite + Unpin>(writer: NoiseWriter<W>) -> (RpcWriter, PushPort, Pump<W>) {
    let shared = Rc::new(RefCell::new(Shared {
        max_frame: writer.max_frame(),
        ..Shared::default()
    }));
    (
        RpcWriter {
            shared: Rc::clone(&shared),
        },
        PushPort {
            shared: Rc::clone(&shared),
        },
        Pump {
            writer,
            shared,
            current: None,
            at: 0,
            staged: Vec::new(),
            staged_count: (0, 0),
            sealed_count: (0, 0),
        },
    )
}

/// The byte stream capnp-rpc writes to; each flush waits until its bytes are on the socket.
pub struct RpcWriter {
    shared: Rc<RefCell<Shared>>,
}

impl AsyncWrite for RpcWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.shared.borrow_mut();
        if let Some(e) = s.error() {
            return Poll::Ready(Err(e));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = RPC_PENDING_LIMIT.saturating_sub(s.rpc.len());
        if room == 0 {
            s.writer = Some(cx.waker().clone());
            s.wake_pump();
            return Poll::Pending;
        }
        let n = buf.len().min(room).min(s.max_frame);
        s.rpc.extend_from_slice(&buf[..n]);
        s.rpc_in += n as u64;
        s.wake_pump();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.shared.borrow_mut();
        if let Some(e) = s.error() {
            return Poll::Ready(Err(e));
        }
        if s.rpc_out == s.rpc_in {
            return Poll::Ready(Ok(()));
        }
        s.writer = Some(cx.waker().clone());
        s.wake_pump();
        Poll::Pending
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.as_mut().poll_flush(cx))?;
        let mut s = self.shared.borrow_mut();
        s.closing = true;
        s.wake_pump();
        Poll::Ready(Ok(()))
    }
}

impl Drop for RpcWriter {
    fn drop(&mut self) {
        let mut s = self.shared.borrow_mut();
        s.closing = true;
        s.wake_pump();
    }
}

/// Queues push frames on one connection (cheap to clone; single-threaded).
#[derive(Clone)]
pub struct PushPort {
    shared: Rc<RefCell<Shared>>,
}

impl std::fmt::Debug for PushPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.shared.borrow();
        f.debug_struct("PushPort")
            .field("queued_bytes", &s.push_bytes)
            .field("closing", &s.closing)
            .finish_non_exhaustive()
    }
}

impl PushPort {
    /// Queues `frame` as one push frame; it is written after everything queued before it.
    /// Fails once the connection is closing or its writes failed.
    /// A frame longer than the channel's largest is refused.
    pub fn push(&self, frame: Arc<[u8]>) -> Result<(), TransportError> {
        let mut s = self.shared.borrow_mut();
        if s.failed.is_some() || s.closing {
            return Err(TransportError::Closed);
        }
        if frame.len() > s.max_frame {
            return Err(TransportError::FrameTooLarge {
                len: frame.len(),
                max: s.max_frame,
            });
        }
        s.push_bytes += frame.len();
        s.pushes.push_back(frame);
        s.pushes_queued += 1;
        s.wake_pump();
        Ok(())
    }

    /// Push frame bytes queued and not yet taken by the pump.
    pub fn queued_bytes(&self) -> usize {
        self.shared.borrow().push_bytes
    }

    /// Since when the socket has not taken what the pump holds (a peer that stopped reading).
    pub fn write_stalled_since(&self) -> Option<Instant> {
        self.shared.borrow().stalled_since
    }

    /// Whether the connection's writes failed or it is closing.
    pub fn is_closed(&self) -> bool {
        let s = self.shared.borrow();
        s.failed.is_some() || s.closing
    }

    /// Waits until every push frame queued so far is written to the socket.
    pub async fn written(&self) -> Result<(), TransportError> {
        let target = self.shared.borrow().pushes_queued;
        std::future::poll_fn(|cx| {
            let mut s = self.shared.borrow_mut();
            if s.pushes_written >= target {
                return Poll::Ready(Ok(()));
            }
            if s.failed.is_some() || s.ended {
                return Poll::Ready(Err(TransportError::Closed));
            }
            s.flushed.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

/// Seals and writes everything the RPC writer and the push port are given; see the module.
pub struct Pump<W> {
    writer: NoiseWriter<W>,
    shared: Rc<RefCell<Shared>>,
    /// The item being staged, and how much of it (header included) is staged.
    current: Option<Item>,
    at: usize,
    /// Plaintext of the next Noise message: whole frames and pieces of frames, back to back,
    /// so that many small frames share one seal.
    staged: Vec<u8>,
    /// RPC bytes and push frames staged whole, sealed whole, and (in `shared`) written.
    staged_count: (u64, u64),
    sealed_count: (u64, u64),
}

impl<W: AsyncWrite + Unpin> Pump<W> {
    /// Stages the next piece of the current item, up to a full Noise message.
    fn stage_piece(&mut self) {
        let Some(item) = self.current.take() else {
            return;
        };
        let payload = item.bytes();
        let total = HEADER_LEN + payload.len();
        while self.at < total && self.staged.len() < MAX_NOISE_PLAINTEXT {
            let room = MAX_NOISE_PLAINTEXT - self.staged.len();
            if self.at < HEADER_LEN {
                let flag = if matches!(item, Item::Push(_)) {
                    PUSH_FLAG
                } else {
                    0
                };
                // The length fits: both producers refuse larger frames.
                let header = (payload.len() as u32 | flag).to_be_bytes();
                let n = (HEADER_LEN - self.at).min(room);
                self.staged.extend_from_slice(&header[self.at..self.at + n]);
                self.at += n;
            } else {
                let from = self.at - HEADER_LEN;
                let n = (payload.len() - from).min(room);
                self.staged.extend_from_slice(&payload[from..from + n]);
                self.at += n;
            }
        }
        if self.at < total {
            self.current = Some(item);
            return;
        }
        match item {
            Item::Rpc(b) => self.staged_count.0 += b.len() as u64,
            Item::Push(_) => self.staged_count.1 += 1,
        }
        self.at = 0;
    }

    /// Seals what is staged into one Noise message.
    fn seal_staged(&mut self) -> Result<(), TransportError> {
        if !self.staged.is_empty() {
            self.writer.seal_message(&self.staged)?;
            self.staged.clear();
        }
        self.sealed_count = self.staged_count;
        Ok(())
    }

    fn fail(&mut self, e: io::Error) -> Poll<Result<(), TransportError>> {
        let mut s = self.shared.borrow_mut();
        s.failed = Some((e.kind(), e.to_string()));
        s.ended = true;
        s.pushes.clear();
        s.push_bytes = 0;
        s.wake_writers();
        Poll::Ready(Err(e.into()))
    }

    /// Writes what is sealed; `Pending` while the socket does not take it.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.writer.poll_write_out(cx) {
            Poll::Pending => {
                let mut s = self.shared.borrow_mut();
                if s.stalled_since.is_none() {
                    s.stalled_since = Some(Instant::now());
                }
                Poll::Pending
            }
            Poll::Ready(r) => {
                let mut s = self.shared.borrow_mut();
                s.stalled_since = None;
                if r.is_ok() {
                    (s.rpc_out, s.pushes_written) = self.sealed_count;
                    s.wake_writers();
                }
                if self.staged.capacity() > MAX_NOISE_PLAINTEXT && self.staged.is_empty() {
                    self.staged = Vec::new();
                }
                Poll::Ready(r)
            }
        }
    }
}

impl<W: AsyncWrite + Unpin> Future for Pump<W> {
    type Output = Result<(), TransportError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            if this.writer.unwritten() >= OUT_HIGH_WATER {
                match this.poll_out(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return this.fail(e),
                    Poll::Ready(Ok(())) => {}
                }
            }
            if this.staged.len() >= MAX_NOISE_PLAINTEXT
                && let Err(e) = this.seal_staged()
            {
                return this.fail(e.into());
            }
            if this.current.is_some() {
                this.stage_piece();
                continue;
            }
            let next = {
                let mut s = this.shared.borrow_mut();
                if s.failed.is_some() {
                    return Poll::Ready(Err(TransportError::Closed));
                }
                if !s.rpc.is_empty() {
                    Some(Item::Rpc(std::mem::take(&mut s.rpc)))
                } else if let Some(p) = s.pushes.pop_front() {
                    s.push_bytes -= p.len();
                    Some(Item::Push(p))
                } else {
                    None
                }
            };
            if let Some(item) = next {
                this.current = Some(item);
                continue;
            }
            // Nothing left to take: seal and write out what is staged, then wait for more.
            if let Err(e) = this.seal_staged() {
                return this.fail(e.into());
            }
            match this.poll_out(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.fail(e),
                Poll::Ready(Ok(())) => {}
            }
            let mut s = this.shared.borrow_mut();
            if !s.rpc.is_empty() || !s.pushes.is_empty() {
                continue;
            }
            if s.closing {
                drop(s);
                return match this.writer.poll_close(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Ok(())) => {
                        let mut s = this.shared.borrow_mut();
                        s.ended = true;
                        s.wake_writers();
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(e)) => this.fail(e),
                };
            }
            s.pump = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }
}

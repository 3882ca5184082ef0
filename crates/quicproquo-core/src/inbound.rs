//! The reading side of a channel as a task of its own, for an end that mostly receives push
//! frames (a subscriber): [`split`] turns a [`NoiseReader`] into
//! - a [`ReadPump`], the future that reads the socket, hands each push frame to the reader's
//!   handler as it comes and keeps the RPC bytes for
//! - an [`RpcBytes`], the `AsyncRead` that Cap'n Proto RPC reads.
//!
//! Run inside the RPC system, the reader is polled through capnp-rpc's task set on every push
//! frame, although nothing arrives for RPC. Run as its own task, a push frame wakes the pump
//! alone, and the RPC system is woken only when RPC bytes arrive.
//!
//! What the pump holds is bounded: it stops reading the socket while [`RPC_IN_LIMIT`] bytes
//! wait for the RPC reader (the same backpressure as reading inline: push frames then wait in
//! the socket too), and it gives its buffer back once the RPC reader has taken everything. It
//! is single-threaded (`Rc`), like capnp-rpc; it ends at the peer's end of the stream, at the
//! channel's first error (which the RPC reader then returns), or once the RPC reader is
//! dropped.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, ReadBuf};

use crate::channel::NoiseReader;
use crate::error::TransportError;

/// RPC bytes the pump holds for the RPC reader before it stops reading the socket.
pub const RPC_IN_LIMIT: usize = 64 * 1024;
/// Most bytes the pump takes from the channel in one read.
const READ_CHUNK: usize = 16 * 1024;

/// State shared by the pump and the RPC reader (one thread).
#[derive(Default)]
struct Shared {
    /// RPC bytes received and not yet read, from `start`.
    bytes: Vec<u8>,
    start: usize,
    /// The peer ended the stream.
    eof: bool,
    /// Why reading failed.
    failed: Option<(io::ErrorKind, String)>,
    /// The RPC reader was dropped: the pump ends.
    closed: bool,
    /// The RPC reader, waiting for bytes.
    reader: Option<Waker>,
    /// The pump, waiting for room or for the socket.
    pump: Option<Waker>,
    /// The pump waits for room (the RPC reader wakes it as it takes bytes).
    wants_room: bool,
}

impl Shared {
    fn held(&self) -> usize {
        self.bytes.len() - self.start
    }

    fn wake_reader(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }
}

/// Splits `reader` into the pump that reads it and the RPC bytes it leaves.
pub fn split<R: AsyncRead + Unpin>(reader: NoiseReader<R>) -> (RpcBytes, ReadPump<R>) {
    let shared = Rc::new(RefCell::new(Shared::default()));
    (
        RpcBytes {
            shared: Rc::clone(&shared),
        },
        ReadPump { reader, shared },
    )
}

/// The RPC byte stream the [`ReadPump`] leaves: what capnp-rpc reads.
pub struct RpcBytes {
    shared: Rc<RefCell<Shared>>,
}

impl RpcBytes {
    /// RPC bytes received and not yet read: at most [`RPC_IN_LIMIT`].
    pub fn held(&self) -> usize {
        self.shared.borrow().held()
    }
}

impl AsyncRead for RpcBytes {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut s = self.shared.borrow_mut();
        if s.held() > 0 {
            let n = s.held().min(buf.remaining());
            let start = s.start;
            buf.put_slice(&s.bytes[start..start + n]);
            s.start += n;
            if s.held() == 0 {
                // Everything taken: the buffer goes back (an idle connection holds none).
                s.bytes = Vec::new();
                s.start = 0;
            }
            if s.wants_room
                && let Some(w) = s.pump.take()
            {
                s.wants_room = false;
                w.wake();
            }
            return Poll::Ready(Ok(()));
        }
        if let Some((kind, why)) = &s.failed {
            return Poll::Ready(Err(io::Error::new(*kind, why.clone())));
        }
        if s.eof {
            return Poll::Ready(Ok(()));
        }
        s.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for RpcBytes {
    fn drop(&mut self) {
        let mut s = self.shared.borrow_mut();
        s.closed = true;
        if let Some(w) = s.pump.take() {
            w.wake();
        }
    }
}

/// Reads the channel: push frames go to their handler, RPC bytes to the [`RpcBytes`]; see the
/// module. Resolves at the end of the stream or once the RPC reader is gone, or with the
/// channel's error.
pub struct ReadPump<R> {
    reader: NoiseReader<R>,
    shared: Rc<RefCell<Shared>>,
}

impl<R: AsyncRead + Unpin> Future for ReadPump<R> {
    type Output = Result<(), TransportError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Uninitialised: a push frame, the common case, fills none of it.
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        loop {
            {
                let mut s = this.shared.borrow_mut();
                if s.closed {
                    return Poll::Ready(Ok(()));
                }
                if s.held() >= RPC_IN_LIMIT {
                    s.pump = Some(cx.waker().clone());
                    s.wants_room = true;
                    return Poll::Pending;
                }
            }
            let room = (RPC_IN_LIMIT - this.shared.borrow().held()).min(READ_CHUNK);
            let mut rb = ReadBuf::uninit(&mut chunk[..room]);
            let read = Pin::new(&mut this.reader).poll_read(cx, &mut rb);
            let mut s = this.shared.borrow_mut();
            match read {
                Poll::Pending => {
                    // Woken by the socket, or by the RPC reader's drop.
                    if !s.pump.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        s.pump = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    s.failed = Some((e.kind(), e.to_string()));
                    s.wake_reader();
                    return Poll::Ready(Err(e.into()));
                }
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    s.eof = true;
                    s.wake_reader();
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => {
                    if s.start > 0 && s.start >= s.bytes.len() / 2 {
                        let start = s.start;
                        s.bytes.drain(..start);
                        s.start = 0;
                    }
                    s.bytes.extend_from_slice(rb.filled());
                    s.wake_reader();
                }
            }
        }
    }
}

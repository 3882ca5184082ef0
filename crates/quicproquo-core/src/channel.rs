//! The framed encrypted channel that runs over a completed Noise session.
//!
//! On the wire, application data is a sequence of frames `[u32 big-endian length][bytes]`. The
//! frame stream is cut into Noise transport messages of at most 65519 plaintext bytes, each sent
//! as `[u16 big-endian length][ciphertext]`, so a frame may span many Noise messages. The reader
//! checks every announced frame length against [`ChannelLimits::max_frame_bytes`] before it
//! allocates anything for the frame, and never allocates by what a header announces: buffers
//! grow with the bytes that arrive and shrink back when the peer goes quiet.
//!
//! Two views share that wire format:
//! - messages: [`NoiseWriter::send_frame`] / [`NoiseReader::recv_frame`];
//! - a byte stream: [`NoiseWriter`] implements `AsyncWrite` (each flush ends a frame) and
//!   [`NoiseReader`] implements `AsyncRead`, which is what Cap'n Proto RPC runs over.
//!
//! Use one view per direction of a connection; mixing them mid-frame is not supported.
//!
//! **Push frames.** A frame whose header has [`PUSH_FLAG`] set is not part of the byte stream:
//! the stream view hands it whole to the reader's push handler ([`NoiseReader::on_push`]) and
//! reads on. Push frames are how a server sends a subscriber its entries beside Cap'n Proto RPC
//! on the same channel, and how the subscriber acknowledges them (see [`crate::mux`]). A reader
//! without a handler refuses them (the connection ends), and the message view never takes one.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::TransportError;
use crate::noise::{MAX_NOISE_PLAINTEXT, Session, TAG_LEN};

/// Default maximum frame size: 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Frame header length.
pub(crate) const HEADER_LEN: usize = 4;
/// Set in a frame header for a push frame (frames are at most [`u32::MAX`] / 2 bytes).
pub const PUSH_FLAG: u32 = 1 << 31;
/// Handles one whole push frame; an error ends the connection.
pub type PushHandler = Box<dyn FnMut(Vec<u8>) -> Result<(), TransportError>>;
/// Noise message length prefix.
const LEN_PREFIX: usize = 2;
/// The stream view seals buffered bytes into a frame once this many are pending.
const PENDING_LIMIT: usize = 256 * 1024;
/// Sealed bytes are written out once this many accumulate while sending a large frame.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Size of a first read into an empty reader: buffers grow (doubling) with the bytes that
/// arrive, and are given back whole once the peer goes quiet (a read would block with nothing
/// buffered). A read while nothing is buffered goes through the stack first, so an idle
/// connection — most of a server's connections — holds no receive buffer at all.
const INITIAL_READ: usize = 2 * 1024;
/// A send buffer (sealed bytes, a frame's first message, the stream view's pending bytes)
/// larger than this is released once everything is written: a connection keeps what a small
/// answer needs, not what its largest push needed.
const KEEP_OUT: usize = 4 * 1024;
/// Largest single read from the socket.
const MAX_READ: usize = 256 * 1024;

/// Limits applied to a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelLimits {
    /// The largest frame accepted or sent, in bytes.
    pub max_frame_bytes: usize,
}

impl Default for ChannelLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Splits an established session into its reading and writing halves.
pub fn channel<R, W>(
    read: R,
    write: W,
    session: Arc<Session>,
    limits: ChannelLimits,
) -> (NoiseReader<R>, NoiseWriter<W>) {
    let max_frame = limits.max_frame_bytes.min((PUSH_FLAG - 1) as usize);
    (
        NoiseReader {
            io: read,
            session: Arc::clone(&session),
            nonce: 0,
            cipher: Buf::default(),
            plain: Buf::default(),
            read_size: INITIAL_READ,
            frame_remaining: 0,
            max_frame,
            failed: false,
            push: None,
            max_push: 0,
            push_frame: Vec::new(),
            push_remaining: None,
        },
        NoiseWriter {
            io: write,
            session,
            nonce: 0,
            pending: Vec::new(),
            pending_limit: PENDING_LIMIT.min(max_frame).max(1),
            out: Buf::default(),
            scratch: Vec::new(),
            max_frame,
        },
    )
}

/// A byte buffer with a consumed prefix and free tail, grown on demand.
#[derive(Default)]
struct Buf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    fn readable(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Makes at least `free` bytes writable after `end` and returns them.
    fn tail(&mut self, free: usize) -> &mut [u8] {
        if self.data.len() - self.end < free && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.data.len() - self.end < free {
            self.data.resize(self.end + free, 0);
        }
        &mut self.data[self.end..]
    }
}

/// The reading half of a Noise channel.
pub struct NoiseReader<R> {
    io: R,
    session: Arc<Session>,
    nonce: u64,
    /// Bytes read from the socket, not yet decrypted.
    cipher: Buf,
    /// Decrypted bytes, not yet handed out.
    plain: Buf,
    read_size: usize,
    /// Bytes of the current frame still to hand out (stream view).
    frame_remaining: usize,
    max_frame: usize,
    failed: bool,
    /// Where push frames go (stream view); `None`: they are refused.
    push: Option<PushHandler>,
    /// The longest push frame accepted.
    max_push: usize,
    /// The push frame being received, and how many of its bytes are still to come.
    push_frame: Vec<u8>,
    push_remaining: Option<usize>,
}

impl<R> NoiseReader<R> {
    /// Hands every push frame the stream view meets to `handler`, whole, in order; a push
    /// frame longer than `max_bytes` ends the connection before anything is buffered for it.
    pub fn on_push(&mut self, handler: PushHandler, max_bytes: usize) {
        self.push = Some(handler);
        self.max_push = max_bytes;
    }
}

impl<R: AsyncRead + Unpin> NoiseReader<R> {
    /// The ciphertext length of the next Noise message, if the whole message is buffered.
    fn buffered_message(&self) -> Result<Option<usize>, TransportError> {
        let avail = self.cipher.readable();
        if avail.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([avail[0], avail[1]]));
        if len < TAG_LEN {
            return Err(TransportError::Decrypt);
        }
        Ok((avail.len() >= LEN_PREFIX + len).then_some(len))
    }

    /// Decrypts the buffered message of ciphertext length `len` into `out`.
    fn open_into(&mut self, len: usize, out: &mut [u8]) -> Result<usize, TransportError> {
        let ciphertext = &self.cipher.data[self.cipher.start + LEN_PREFIX..][..len];
        let n = self.session.open(self.nonce, ciphertext, out)?;
        self.cipher.consume(LEN_PREFIX + len);
        self.nonce = self.nonce.checked_add(1).ok_or(TransportError::Decrypt)?;
        Ok(n)
    }

    /// Decrypts one buffered Noise message into `plain`, if a whole one is buffered.
    fn open_one(&mut self) -> Result<bool, TransportError> {
        let Some(len) = self.buffered_message()? else {
            return Ok(false);
        };
        let mut plain = std::mem::take(&mut self.plain);
        let opened = self.open_into(len, plain.tail(len - TAG_LEN));
        if let Ok(n) = opened {
            plain.end += n;
        }
        self.plain = plain;
        opened.map(|_| true)
    }

    /// Reads more ciphertext from the socket. `Ok(false)` means the peer closed the connection.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, TransportError>> {
        let wanted = match self.cipher.readable() {
            [a, b, ..] => LEN_PREFIX + usize::from(u16::from_be_bytes([*a, *b])),
            _ => LEN_PREFIX,
        };
        if self.cipher.data.is_empty() {
            return self.poll_read_first(cx);
        }
        let free = wanted.saturating_sub(self.cipher.len()).max(self.read_size);
        let tail = self.cipher.tail(free);
        let tail_len = tail.len();
        let mut rb = ReadBuf::new(tail);
        let polled = Pin::new(&mut self.io).poll_read(cx, &mut rb);
        let n = rb.filled().len();
        if polled.is_pending() {
            self.release_idle();
            return Poll::Pending;
        }
        if let Poll::Ready(Err(e)) = polled {
            return Poll::Ready(Err(e.into()));
        }
        if n == 0 {
            return Poll::Ready(Ok(false));
        }
        if n == tail_len && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        self.cipher.end += n;
        Poll::Ready(Ok(true))
    }

    /// Reads into a stack buffer while the reader holds no buffer, and keeps a heap buffer only
    /// for bytes that arrived: a read that would block allocates nothing.
    fn poll_read_first(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, TransportError>> {
        let mut first = [0u8; INITIAL_READ];
        let mut rb = ReadBuf::new(&mut first);
        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
            Poll::Pending => {
                self.release_idle();
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Ok(false));
                }
                self.cipher.tail(n)[..n].copy_from_slice(&first[..n]);
                self.cipher.end += n;
                Poll::Ready(Ok(true))
            }
        }
    }

    /// The peer is quiet: empty buffers are given back whole (what is buffered is kept).
    fn release_idle(&mut self) {
        if self.cipher.len() == 0 {
            self.cipher = Buf::default();
        }
        if self.plain.len() == 0 {
            self.plain = Buf::default();
        }
        self.read_size = INITIAL_READ;
    }

    /// Bytes of receive buffers this reader holds (for tests and accounting).
    pub fn buffer_capacity(&self) -> usize {
        self.cipher.data.len() + self.plain.data.len()
    }

    /// Makes more plaintext available. `Ok(false)` means the peer closed the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, TransportError>> {
        loop {
            if self.open_one()? {
                return Poll::Ready(Ok(true));
            }
            if !ready!(self.poll_read_more(cx))? {
                return Poll::Ready(Ok(false));
            }
        }
    }

    fn at_clean_end(&self) -> bool {
        self.cipher.len() == 0
            && self.plain.len() == 0
            && self.frame_remaining == 0
            && self.push_remaining.is_none()
    }

    /// The next frame's length and whether it is a push frame (taken only when `pushes`).
    fn take_header(&mut self, pushes: bool) -> Result<Option<(usize, bool)>, TransportError> {
        let p = self.plain.readable();
        if p.len() < HEADER_LEN {
            return Ok(None);
        }
        let raw = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
        let push = pushes && raw & PUSH_FLAG != 0;
        let len = if push { raw & !PUSH_FLAG } else { raw } as usize;
        if push && self.push.is_none() {
            self.failed = true;
            return Err(TransportError::Push("no push frames were asked for".into()));
        }
        if push && len > self.max_push {
            self.failed = true;
            return Err(TransportError::FrameTooLarge {
                len,
                max: self.max_push,
            });
        }
        if len > self.max_frame {
            self.failed = true;
            return Err(TransportError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        self.plain.consume(HEADER_LEN);
        Ok(Some((len, push)))
    }

    /// Moves buffered bytes into the push frame being received; hands it over once whole.
    fn take_push(&mut self) -> Result<(), TransportError> {
        let Some(remaining) = self.push_remaining else {
            return Ok(());
        };
        let take = remaining.min(self.plain.len());
        self.push_frame
            .extend_from_slice(&self.plain.readable()[..take]);
        self.plain.consume(take);
        if take < remaining {
            self.push_remaining = Some(remaining - take);
            return Ok(());
        }
        self.push_remaining = None;
        let frame = std::mem::take(&mut self.push_frame);
        match self.push.as_mut() {
            Some(handler) => handler(frame),
            None => Err(TransportError::Push("no push frames were asked for".into())),
        }
    }

    async fn fill(&mut self) -> Result<bool, TransportError> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Receives the next whole frame. `Ok(None)` when the peer closed between frames.
    pub async fn recv_frame(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        if self.failed {
            return Err(TransportError::Closed);
        }
        let len = loop {
            if let Some((len, _)) = self.take_header(false)? {
                break len;
            }
            if !self.fill().await? {
                return if self.at_clean_end() {
                    Ok(None)
                } else {
                    Err(TransportError::Closed)
                };
            }
        };
        // The frame grows with the bytes that arrive, never to what its header announces.
        let mut frame = Vec::with_capacity(len.min(MAX_NOISE_PLAINTEXT));
        loop {
            let take = (len - frame.len()).min(self.plain.len());
            frame.extend_from_slice(&self.plain.readable()[..take]);
            self.plain.consume(take);
            if frame.len() == len {
                return Ok(Some(frame));
            }
            // `plain` is empty: decrypt straight into the frame when the next message fits.
            match self.buffered_message()? {
                Some(ct) if ct - TAG_LEN <= len - frame.len() => {
                    let at = frame.len();
                    frame.resize(at + ct - TAG_LEN, 0);
                    let n = self.open_into(ct, &mut frame[at..])?;
                    frame.truncate(at + n);
                }
                Some(_) => {
                    self.open_one()?;
                }
                None => {
                    if !poll_fn(|cx| self.poll_read_more(cx)).await? {
                        return Err(TransportError::Closed);
                    }
                }
            }
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for NoiseReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(Err(TransportError::Closed.into()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.frame_remaining > 0 {
                let avail = this.plain.readable();
                if !avail.is_empty() {
                    let n = avail.len().min(this.frame_remaining).min(buf.remaining());
                    buf.put_slice(&avail[..n]);
                    this.plain.consume(n);
                    this.frame_remaining -= n;
                    return Poll::Ready(Ok(()));
                }
            } else if this.push_remaining.is_some() {
                if let Err(e) = this.take_push() {
                    this.failed = true;
                    return Poll::Ready(Err(e.into()));
                }
                if this.push_remaining.is_none() {
                    continue;
                }
            } else if let Some((len, push)) = this.take_header(true)? {
                if push {
                    this.push_frame = Vec::with_capacity(len.min(MAX_NOISE_PLAINTEXT));
                    this.push_remaining = Some(len);
                } else {
                    this.frame_remaining = len;
                }
                continue;
            }
            match ready!(this.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) if this.at_clean_end() => return Poll::Ready(Ok(())),
                Ok(false) => return Poll::Ready(Err(TransportError::Closed.into())),
                Err(e) => {
                    this.failed = true;
                    return Poll::Ready(Err(e.into()));
                }
            }
        }
    }
}

/// The writing half of a Noise channel.
pub struct NoiseWriter<W> {
    io: W,
    session: Arc<Session>,
    nonce: u64,
    /// Stream-view bytes not yet sealed.
    pending: Vec<u8>,
    pending_limit: usize,
    /// Sealed bytes not yet written.
    out: Buf,
    scratch: Vec<u8>,
    max_frame: usize,
}

impl<W: AsyncWrite + Unpin> NoiseWriter<W> {
    /// The largest frame this writer sends.
    pub(crate) fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Sealed bytes waiting to be written.
    pub(crate) fn unwritten(&self) -> usize {
        self.out.len()
    }

    /// Writes sealed bytes out until none are left (buffers kept small afterwards).
    pub(crate) fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_drain(cx)
    }

    /// Flushes and shuts the socket down (everything sealed must be written first).
    pub(crate) fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_flush_all(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    pub(crate) fn seal_message(&mut self, plaintext: &[u8]) -> Result<(), TransportError> {
        let tail = self.out.tail(LEN_PREFIX + plaintext.len() + TAG_LEN);
        let n = self
            .session
            .seal(self.nonce, plaintext, &mut tail[LEN_PREFIX..])?;
        let len = u16::try_from(n)
            .map_err(|_| TransportError::Encrypt("noise message too long".into()))?;
        tail[..LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
        self.out.end += LEN_PREFIX + n;
        self.nonce = self
            .nonce
            .checked_add(1)
            .ok_or_else(|| TransportError::Encrypt("nonce space exhausted".into()))?;
        Ok(())
    }

    /// Seals the frame header and the first piece of `payload`; returns how much was taken.
    fn seal_frame_start(&mut self, payload: &[u8]) -> Result<usize, TransportError> {
        self.seal_header_and_start(0, payload)
    }

    /// [`Self::seal_frame_start`] with `flag` (0 or [`PUSH_FLAG`]) or-ed into the header.
    pub(crate) fn seal_header_and_start(
        &mut self,
        flag: u32,
        payload: &[u8],
    ) -> Result<usize, TransportError> {
        if payload.len() > self.max_frame {
            return Err(TransportError::FrameTooLarge {
                len: payload.len(),
                max: self.max_frame,
            });
        }
        let len = u32::try_from(payload.len()).map_err(|_| TransportError::FrameTooLarge {
            len: payload.len(),
            max: self.max_frame,
        })? | flag;
        let first = payload.len().min(MAX_NOISE_PLAINTEXT - HEADER_LEN);
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(&len.to_be_bytes());
        scratch.extend_from_slice(&payload[..first]);
        let sealed = self.seal_message(&scratch);
        self.scratch = scratch;
        sealed.map(|()| first)
    }

    fn seal_pending(&mut self) -> Result<(), TransportError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let result = (|| {
            let first = self.seal_frame_start(&pending)?;
            for chunk in pending[first..].chunks(MAX_NOISE_PLAINTEXT) {
                self.seal_message(chunk)?;
            }
            Ok(())
        })();
        self.pending = pending;
        self.pending.clear();
        result
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out.len() > 0 {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.out.readable()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.consume(n);
        }
        if self.out.data.len() > KEEP_OUT {
            self.out = Buf::default();
        }
        if self.scratch.capacity() > KEEP_OUT {
            self.scratch = Vec::new();
        }
        if self.pending.is_empty() && self.pending.capacity() > KEEP_OUT {
            self.pending = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_flush_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.seal_pending()?;
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Sends `payload` as one frame and flushes it to the socket.
    ///
    /// Large frames are sealed and written in pieces, so memory use stays bounded.
    pub async fn send_frame(&mut self, payload: &[u8]) -> Result<(), TransportError> {
        if payload.len() > self.max_frame {
            return Err(TransportError::FrameTooLarge {
                len: payload.len(),
                max: self.max_frame,
            });
        }
        poll_fn(|cx| self.poll_flush_all(cx)).await?;
        let first = self.seal_frame_start(payload)?;
        for chunk in payload[first..].chunks(MAX_NOISE_PLAINTEXT) {
            self.seal_message(chunk)?;
            if self.out.len() >= OUT_HIGH_WATER {
                poll_fn(|cx| self.poll_drain(cx)).await?;
            }
        }
        poll_fn(|cx| self.poll_flush_all(cx)).await?;
        Ok(())
    }

    /// Seals `plaintext` into Noise messages without a frame header and flushes it.
    ///
    /// Protocol code never calls this: it exists so tests can produce malformed frame streams
    /// (a lying header, a truncated frame) inside a valid encrypted session.
    #[doc(hidden)]
    pub async fn send_unframed(&mut self, plaintext: &[u8]) -> Result<(), TransportError> {
        poll_fn(|cx| self.poll_flush_all(cx)).await?;
        for chunk in plaintext.chunks(MAX_NOISE_PLAINTEXT) {
            self.seal_message(chunk)?;
        }
        poll_fn(|cx| self.poll_flush_all(cx)).await?;
        Ok(())
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for NoiseWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.pending.len() >= this.pending_limit {
            this.seal_pending()?;
        }
        if this.out.len() > 0 {
            ready!(this.poll_drain(cx))?;
        }
        let n = buf.len().min(this.pending_limit - this.pending.len());
        this.pending.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_all(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_all(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

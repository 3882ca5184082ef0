//! Cap'n Proto RPC over an established Noise session: the one place that builds an RPC system
//! on the encrypted channel, with the reader limits that guard it.
//!
//! Every connection of the project (a client to an edge, a server accepting any peer, an edge
//! dialing a shard) goes through [`rpc_system`], so the traversal and nesting limits applied
//! to what a peer sends are set here and nowhere else.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use capnp::message::ReaderOptions;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::channel::{ChannelLimits, PushHandler, channel};
use crate::error::TransportError;
use crate::gate::{GateLimits, GateState, gate};
use crate::inbound;
use crate::mux::{PushPort, mux};
use crate::noise::Session;

/// Deepest pointer nesting accepted in a message from a peer.
pub const NESTING_LIMIT: i32 = 64;

/// The reader limits for messages of at most `limits.max_frame_bytes`: a message may not make
/// the reader traverse more words than fit in one frame, nor nest deeper than
/// [`NESTING_LIMIT`].
pub fn reader_options(limits: ChannelLimits) -> ReaderOptions {
    let mut options = ReaderOptions::new();
    options
        .traversal_limit_in_words(Some(limits.max_frame_bytes / 8))
        .nesting_limit(NESTING_LIMIT);
    options
}

/// Builds the RPC system of one connection over its established Noise `session`, on the byte
/// stream halves `read` and `write`. `side` is [`Side::Client`] for the end that dialed;
/// `bootstrap` is the capability this end offers the peer (`None` when it offers nothing).
///
/// The peer's messages pass the [`gate`](crate::gate) (memory follows the bytes received,
/// no large echo) with no cap on calls in flight; see [`rpc_system_gated`].
pub fn rpc_system<R, W>(
    read: R,
    write: W,
    session: Arc<Session>,
    limits: ChannelLimits,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
) -> RpcSystem<Side>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    rpc_system_gated(
        read,
        write,
        session,
        limits,
        GateLimits::default(),
        side,
        bootstrap,
    )
    .0
}

/// [`rpc_system`] with the gate's `gate_limits` (its `max_words` is taken from `limits`): at
/// most `max_calls_in_flight` questions from the peer owed an answer before the connection
/// stops reading (backpressure). Also returns the gate's state, where the owner sees calls
/// in flight and write stalls.
pub fn rpc_system_gated<R, W>(
    read: R,
    write: W,
    session: Arc<Session>,
    limits: ChannelLimits,
    gate_limits: GateLimits,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
) -> (RpcSystem<Side>, Rc<GateState>)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let (reader, writer) = channel(read, write, session, limits);
    gated_system(reader, writer, limits, gate_limits, side, bootstrap)
}

/// The RPC system over `reader` and `writer` behind the gate (its `max_words` taken from
/// `limits`), with the reader limits of [`reader_options`].
fn gated_system<R, W>(
    reader: R,
    writer: W,
    limits: ChannelLimits,
    gate_limits: GateLimits,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
) -> (RpcSystem<Side>, Rc<GateState>)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let (reader, writer, state) = gate(
        reader,
        writer,
        GateLimits {
            max_words: limits.max_frame_bytes / 8,
            ..gate_limits
        },
    );
    let options = reader_options(limits);
    let network = twoparty::VatNetwork::new(reader.compat(), writer.compat_write(), side, options);
    (RpcSystem::new(Box::new(network), bootstrap), state)
}

/// A connection whose RPC system shares the channel with push frames ([`crate::mux`]).
pub struct PushingConnection {
    /// The RPC system, to be run to completion.
    pub rpc: RpcSystem<Side>,
    /// The gate's state (calls in flight, write stalls of the RPC stream).
    pub gate: Rc<GateState>,
    /// Where push frames to the peer are queued.
    pub port: PushPort,
    /// The one writer of the socket: run it beside `rpc`; a connection whose pump ended with
    /// an error is over.
    pub pump: Pump,
    /// With [`Reading::Task`], the reader of the socket: run it beside `rpc` too.
    pub read_pump: Option<Pump>,
}

/// A connection's writer or reader, run beside its RPC system until it ends.
pub type Pump = Pin<Box<dyn Future<Output = Result<(), TransportError>>>>;

/// Where a pushing connection reads its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Inside the RPC system, which meets the peer's push frames as it reads: for an end that
    /// mostly answers calls and receives few push frames (a node: acknowledgements). It holds
    /// nothing beyond what the RPC system reads.
    Inline,
    /// In a read pump of its own ([`crate::inbound`]), so that a push frame does not poll the
    /// RPC system: for an end that mostly receives push frames (a subscriber). It may hold
    /// up to [`crate::inbound::RPC_IN_LIMIT`] RPC bytes the RPC system has not read.
    Task,
}

/// [`rpc_system_gated`], with push frames beside RPC: the peer's push frames, of at most
/// `max_push_bytes` each, go to `on_push`, and ours are queued on the returned [`PushPort`].
/// The returned pump (and, with [`Reading::Task`], the read pump) must run beside the RPC
/// system.
#[allow(clippy::too_many_arguments)]
pub fn rpc_system_pushing<R, W>(
    read: R,
    write: W,
    session: Arc<Session>,
    limits: ChannelLimits,
    gate_limits: GateLimits,
    side: Side,
    bootstrap: Option<capnp::capability::Client>,
    (on_push, max_push_bytes): (PushHandler, usize),
    reading: Reading,
) -> PushingConnection
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let (mut reader, writer) = channel(read, write, session, limits);
    reader.on_push(on_push, max_push_bytes);
    let (writer, port, pump) = mux(writer);
    let ((rpc, gate), read_pump) = match reading {
        Reading::Inline => (
            gated_system(reader, writer, limits, gate_limits, side, bootstrap),
            None,
        ),
        Reading::Task => {
            let (rpc_bytes, read_pump) = inbound::split(reader);
            let read_pump: Pump = Box::pin(read_pump);
            (
                gated_system(rpc_bytes, writer, limits, gate_limits, side, bootstrap),
                Some(read_pump),
            )
        }
    };
    PushingConnection {
        rpc,
        gate,
        port,
        pump: Box::pin(pump),
        read_pump,
    }
}

//! Attacks on one connection's resources, through real sockets against a server running in
//! this test process: the server's memory is read as this process's resident set
//! (`/proc/self/status` VmRSS), which also holds the attackers' own small buffers. Each test
//! asserts that the attacker is refused or throttled, that an honest client on another
//! connection is served meanwhile, and that resident memory stays under a stated ceiling.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use capnp::message::Builder;
use capnp_rpc::rpc_capnp::message;
use quicproquo_core::channel::{ChannelLimits, NoiseReader, NoiseWriter, channel};
use quicproquo_core::{IdentityKeypair, NodeRole};
use quicproquo_proto::bootstrap_capnp::bootstrap;
use support::{RawClient, TestServer, eventually, handshake_from, local};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

const WITHIN: Duration = Duration::from_secs(20);
/// Deadline for conditions that wait on the server working through a large attack.
const SLOW: Duration = Duration::from_secs(90);

/// The tests of this file run one at a time: each reads the whole process's memory.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A connection from `ip` that completed the handshake, as raw encrypted frame halves.
async fn raw_channel(
    ip: [u8; 4],
    server: &TestServer,
) -> Result<(NoiseReader<OwnedReadHalf>, NoiseWriter<OwnedWriteHalf>)> {
    let (stream, outcome) = handshake_from(ip, server).await?;
    let (r, w) = stream.into_split();
    Ok(channel(r, w, outcome.session, ChannelLimits::default()))
}

/// `message` serialized as a Cap'n Proto stream message.
fn serialized(message: &Builder<capnp::message::HeapAllocator>) -> Vec<u8> {
    capnp::serialize::write_message_to_words(message)
}

/// An RPC `Bootstrap` message asking question `question`.
fn bootstrap_message(question: u32) -> Vec<u8> {
    let mut m = Builder::new_default();
    m.init_root::<message::Builder<'_>>()
        .init_bootstrap()
        .set_question_id(question);
    serialized(&m)
}

/// An RPC `Call` of `Bootstrap.ping` (empty payload) on the answer to question `on`.
fn ping_call(question: u32, on: u32, payload: &[u8]) -> Result<Vec<u8>> {
    let mut m = Builder::new_default();
    {
        let mut call = m.init_root::<message::Builder<'_>>().init_call();
        call.set_question_id(question);
        call.set_interface_id(<bootstrap::Client as capnp::traits::HasTypeId>::TYPE_ID);
        call.set_method_id(0);
        call.reborrow()
            .init_target()
            .init_promised_answer()
            .set_question_id(on);
        call.init_params()
            .init_content()
            .init_as::<bootstrap::ping_params::Builder<'_>>()
            .set_payload(payload);
    }
    Ok(serialized(&m))
}

/// Bytes the server sends on `reader` until it closes the connection (or `WITHIN` passes).
async fn bytes_until_closed(reader: &mut NoiseReader<OwnedReadHalf>) -> Result<usize> {
    let mut got = 0;
    let read_all = async {
        while let Ok(Some(frame)) = reader.recv_frame().await {
            got += frame.len();
        }
    };
    tokio::time::timeout(WITHIN, read_all)
        .await
        .context("the server did not close the connection")?;
    Ok(got)
}

/// An honest client from another address binds and is answered.
async fn honest_client_is_served(server: &TestServer) -> Result<()> {
    let honest = RawClient::connect_from([127, 0, 0, 9], server).await?;
    honest.bind(&IdentityKeypair::generate()?).await?;
    let payload = vec![5u8; 1024];
    anyhow::ensure!(honest.ping(&payload).await? == payload);
    Ok(())
}

/// After a valid handshake, one Noise message announces a 16 MiB frame holding a Cap'n Proto
/// message of 2 097 151 words, and the peer goes silent. The server holds only what arrived
/// (a 2 KiB buffer per connection, not 16 MiB): for 16 such connections the buffered bytes
/// stay at 16 × 2 KiB and resident memory grows by less than 16 MiB (it grew by 16 MB per
/// connection when the reader allocated what the header announced).
#[tokio::test]
async fn an_oversized_header_commits_no_memory() -> Result<()> {
    const ATTACKERS: usize = 16;
    let _serial = SERIAL.lock().await;
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |_| {})?;
        honest_client_is_served(&server).await?;
        let before = support::rss()?;
        let mut held = Vec::new();
        for _ in 0..ATTACKERS {
            let (reader, mut writer) = raw_channel([127, 0, 0, 2], &server).await?;
            let words: u32 = 2_097_151;
            let mut lie = Vec::new();
            lie.extend_from_slice(&(8 + words * 8).to_be_bytes()); // frame header
            lie.extend_from_slice(&0u32.to_le_bytes()); // one segment
            lie.extend_from_slice(&words.to_le_bytes()); // of 2 097 151 words
            lie.extend_from_slice(&[0u8; 64]); // and a few of its bytes
            writer.send_unframed(&lie).await?;
            held.push((reader, writer));
        }
        let buffered = &server.handle()?.stats().rpc_buffered_bytes;
        // Every attacker's header was read: each holds one initial 2 KiB body buffer.
        eventually(WITHIN, || {
            buffered.load(Ordering::Relaxed) == (ATTACKERS * 2048) as u64
        })
        .await?;
        let grown = support::rss()?.saturating_sub(before);
        eprintln!("resident memory grew by {grown} bytes under {ATTACKERS} oversized headers");
        assert!(grown < 16 << 20, "resident memory grew by {grown} bytes");
        honest_client_is_served(&server).await?;
        drop(held);
        eventually(WITHIN, || buffered.load(Ordering::Relaxed) == 0).await?;
        Ok(())
    })
    .await
}

/// A message of a type the server does not implement would be echoed back as a deep copy
/// (24 kB came back as 16.4 MB): the server refuses it before capnp-rpc sees it, closes that
/// connection with fewer than 1 KiB sent back, counts it, and serves everyone else.
#[tokio::test]
async fn an_unimplemented_message_is_not_echoed() -> Result<()> {
    let _serial = SERIAL.lock().await;
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |_| {})?;
        let before = support::rss()?;
        // A call carrying 24 kB, then turned into a message type that does not exist (99),
        // and a `provide` (10), which no peer of ours may send.
        for kind in [99u16, 10] {
            let mut m = Builder::new_default();
            {
                let call = m.init_root::<message::Builder<'_>>().init_call();
                call.init_params()
                    .init_content()
                    .set_as::<capnp::data::Owned>(&vec![0x41u8; 24_000][..])?;
            }
            let mut bytes = serialized(&m);
            // The root struct's discriminant: after the segment table and the root pointer.
            let segments = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) + 1;
            let at = (4 + 4 * segments as usize).div_ceil(8) * 8 + 8;
            bytes[at..at + 2].copy_from_slice(&kind.to_le_bytes());
            let (mut reader, mut writer) = raw_channel([127, 0, 0, 2], &server).await?;
            writer.send_frame(&bytes).await?;
            let echoed = bytes_until_closed(&mut reader).await?;
            assert!(
                echoed < 1024,
                "{echoed} bytes came back for a {kind} message"
            );
        }
        let limited = &server.handle()?.stats().refused_messages;
        eventually(WITHIN, || limited.load(Ordering::Relaxed) == 2).await?;
        honest_client_is_served(&server).await?;
        let grown = support::rss()?.saturating_sub(before);
        eprintln!("resident memory grew by {grown} bytes under the unimplemented messages");
        assert!(grown < 16 << 20, "resident memory grew by {grown} bytes");
        Ok(())
    })
    .await
}

/// 100 000 pipelined calls on one connection whose peer never reads: the server reads no more
/// than `max_calls_in_flight` calls ahead of its answers, then stops reading (the connection
/// is throttled: TCP holds the rest), closes it once its writes have gone unread for the
/// write-stall timeout, and serves another client throughout; resident memory stays under
/// 64 MiB more than before the attack.
#[tokio::test]
async fn pipelined_calls_are_throttled_not_queued() -> Result<()> {
    const CALLS: u32 = 100_000;
    const PAYLOAD: &[u8] = &[7u8; 1024];
    let _serial = SERIAL.lock().await;
    local(async {
        let server = TestServer::start(NodeRole::Standalone, |c| {
            c.limits.write_stall_timeout = Duration::from_secs(3);
            // Answers of 1 KiB: 100 000 of them outgrow any socket buffers on loopback, so
            // the server's writes must stall (100 000 empty answers, packed into few Noise
            // messages, can fit in what the kernel buffers).
            c.limits.max_unbound_ping_bytes = PAYLOAD.len();
        })?;
        let before = support::rss()?;
        let (reader, mut writer) = raw_channel([127, 0, 0, 2], &server).await?;
        let attack = tokio::task::spawn_local(async move {
            let mut frame = bootstrap_message(0);
            for q in 1..=CALLS {
                frame.extend(ping_call(q, 0, PAYLOAD)?);
                if q % 1000 == 0 {
                    if writer.send_frame(&frame).await.is_err() {
                        // The server closed the connection: the attack is over.
                        return Ok::<u32, anyhow::Error>(q);
                    }
                    frame.clear();
                }
            }
            Ok(CALLS)
        });
        let stats = server.handle()?.stats();
        // Generous deadlines: on a loaded machine the server works through tens of thousands
        // of calls before its writes back up.
        eventually(SLOW, || stats.throttled.load(Ordering::Relaxed) > 0).await?;
        honest_client_is_served(&server).await?;
        let peak = support::rss()?.saturating_sub(before);
        eprintln!("resident memory grew by {peak} bytes while throttling 100 000 calls");
        assert!(peak < 64 << 20, "resident memory grew by {peak} bytes");
        // The peer never reads: once the server's writes stall that long, it is closed.
        eventually(SLOW, || stats.write_stalls.load(Ordering::Relaxed) == 1).await?;
        let sent = tokio::time::timeout(SLOW, attack).await???;
        eprintln!("the attacker got {sent} calls into the socket before it was closed");
        drop(reader);
        honest_client_is_served(&server).await?;
        Ok(())
    })
    .await
}

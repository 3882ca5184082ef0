//! The channel's frame reader and the RPC gate behind it: the input is the plaintext a peer
//! sends inside a valid encrypted session (frame headers, push frames, Cap'n Proto segment
//! tables and messages, all untrusted). Reading must end cleanly or with an error, never panic, and hold
//! no more than the bytes that arrived.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use quicproquo_core::channel::{ChannelLimits, channel};
use quicproquo_core::gate::{GateLimits, gate};
use quicproquo_core::{ClusterSigningKey, NodeRole, NodeVerifier, NoiseKeypair, noise};
use tokio::io::AsyncReadExt;

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let (Ok(cluster), Ok(server_key), Ok(client_key)) = (
            ClusterSigningKey::generate(),
            NoiseKeypair::generate(),
            NoiseKeypair::generate(),
        ) else {
            return;
        };
        let cert = cluster.certify(NodeRole::Standalone, server_key.public());
        let pinned = NodeVerifier::new(cluster.public_key());
        let (mut c, mut s) = tokio::io::duplex(1 << 20);
        let deadline = Duration::from_secs(5);
        let (co, so) = tokio::join!(
            noise::initiate(&mut c, &client_key, &pinned, deadline),
            noise::respond(&mut s, &server_key, &cert, deadline)
        );
        let (Ok(co), Ok(so)) = (co, so) else {
            return;
        };
        let limits = ChannelLimits {
            max_frame_bytes: 1 << 20,
        };
        let (cr, cw) = tokio::io::split(c);
        let (sr, sw) = tokio::io::split(s);
        let (_, mut writer) = channel(cr, cw, co.session, limits);
        let (mut reader, _w) = channel(sr, sw, so.session, limits);
        // Push frames (the header's top bit) go to a handler, at most 1 KiB each, as on a
        // server; the handler refuses one frame in three to exercise that path too.
        let mut pushes = 0u32;
        reader.on_push(
            Box::new(move |frame| {
                assert!(frame.len() <= 1024, "a push frame over the maximum was handed over");
                pushes += 1;
                if pushes % 3 == 0 {
                    return Err(quicproquo_core::TransportError::Push("refused".into()));
                }
                Ok(())
            }),
            1024,
        );
        let (mut gated, _gw, state) = gate(
            reader,
            tokio::io::sink(),
            GateLimits {
                max_words: limits.max_frame_bytes / 8,
                ..GateLimits::default()
            },
        );
        let send = async {
            let _ = writer.send_unframed(data).await;
            drop(writer);
        };
        let read = async {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = gated.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                // Never more held than arrived (twice over for a doubling buffer).
                assert!(state.buffered_bytes() <= 2 * data.len() + 4096);
            }
        };
        tokio::join!(send, read);
    });
});

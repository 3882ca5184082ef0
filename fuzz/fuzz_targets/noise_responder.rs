//! The Noise responder reading an initiator's handshake messages: the input is everything the
//! initiator sends; the responder must fail cleanly, never panic or hang.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use quicproquo_core::{ClusterSigningKey, NodeCertificate, NodeRole, NoiseKeypair, noise};
use tokio::io::AsyncWriteExt;

fn server() -> &'static (NoiseKeypair, NodeCertificate) {
    static SERVER: OnceLock<(NoiseKeypair, NodeCertificate)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let (Ok(cluster), Ok(key)) = (ClusterSigningKey::generate(), NoiseKeypair::generate())
        else {
            std::process::abort();
        };
        let cert = cluster.certify(NodeRole::Standalone, key.public());
        (key, cert)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let (key, cert) = server();
        let (mut ours, mut theirs) = tokio::io::duplex(1 << 16);
        // The initiator's bytes, then the end of its stream.
        let _ = theirs.write_all(data).await;
        let _ = theirs.shutdown().await;
        let _ = noise::respond(&mut ours, key, cert, Duration::from_secs(1)).await;
        drop(theirs);
    });
});

//! RPC messages decoded by a real server: one standalone node (embedded store) runs in this
//! process; each input is sent, inside a valid encrypted session, as the byte stream of Cap'n
//! Proto RPC messages to it (the gate, capnp-rpc and the served objects all see it). The
//! server must answer or close that connection; any panic in it aborts the run.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use quicproquo_core::channel::{ChannelLimits, channel};
use quicproquo_core::{NodeRole, NodeVerifier, NoiseKeypair, noise};
use quicproquo_server::{NodeIdentity, ServerConfig, ServerHandle};
use tokio::io::AsyncWriteExt;

fn server() -> &'static (ServerHandle, SocketAddr, NodeVerifier) {
    static SERVER: OnceLock<(ServerHandle, SocketAddr, NodeVerifier)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let run = || -> Result<_, Box<dyn std::error::Error>> {
            let dir = std::env::temp_dir().join(format!("qpq-fuzz-rpc-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let mut config = ServerConfig::for_role(NodeRole::Standalone, dir.join("data"));
            config.workers = 1;
            config.limits.max_connections_per_address = config.max_connections;
            config.limits.rates.binds_per_address = u32::MAX;
            let store = quicproquo_server::open_store(&config)?;
            let identity = NodeIdentity::load_or_create(&config.data_dir, NodeRole::Standalone)?;
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            let handle = quicproquo_server::start(config, listener, identity, store)?;
            let verifier = NodeVerifier::new(handle.cluster_key());
            Ok((handle, addr, verifier))
        };
        match run() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot start the server: {e}");
                std::process::abort();
            }
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let (_, addr, verifier) = server();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let Ok(socket) = tokio::net::TcpSocket::new_v4() else {
            return;
        };
        // No TIME_WAIT left behind by hundreds of connections a second.
        let _ = socket.set_zero_linger();
        let Ok(mut stream) = socket.connect(*addr).await else {
            return;
        };
        let Ok(key) = NoiseKeypair::generate() else {
            return;
        };
        let Ok(outcome) =
            noise::initiate(&mut stream, &key, verifier, Duration::from_secs(5)).await
        else {
            return;
        };
        let (r, w) = stream.into_split();
        let (mut reader, mut writer) = channel(r, w, outcome.session, ChannelLimits::default());
        let mut framed = (data.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(data);
        if writer.send_unframed(&framed).await.is_err() {
            return;
        }
        // The end of our stream: the server answers what it read, then closes.
        let _ = writer.shutdown().await;
        // Read what the server answers until it closes (or a call it holds keeps it open).
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while let Ok(Some(_)) = reader.recv_frame().await {}
        })
        .await;
    });
});

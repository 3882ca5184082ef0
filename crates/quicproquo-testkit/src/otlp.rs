//! A real OTLP/HTTP receiver in the test process: it answers 200 to every POST and keeps each
//! request body, for the trace tests to decode (they read it with their own decoders).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Result;

/// Largest request body kept (a batch of spans is far smaller).
const MAX_BODY: usize = 64 << 20;

/// A running receiver on an ephemeral loopback port.
pub struct Receiver {
    addr: SocketAddr,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Receiver {
    /// Binds port 0 on loopback and serves on a thread of its own for the test's lifetime.
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let kept = Arc::clone(&bodies);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let _ = receive(stream, &kept);
            }
        });
        Ok(Self { addr, bodies })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL exporters are given.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request body received so far.
    pub fn bodies(&self) -> Vec<Vec<u8>> {
        self.bodies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn receive(mut stream: TcpStream, bodies: &Mutex<Vec<Vec<u8>>>) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse()?;
        }
    }
    anyhow::ensure!(length <= MAX_BODY, "a body of {length} bytes");
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    bodies
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(body);
    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    Ok(())
}

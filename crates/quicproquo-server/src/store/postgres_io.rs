//! The Postgres store's connection I/O thread: every pooled connection's socket is driven by
//! a runtime the store owns, not by whichever caller happened to open it.

use std::pin::pin;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::StoreError;
use super::postgres::describe;

/// Opens connections whose sockets (and timers) belong to a runtime of the store's own: a
/// current-thread runtime driven by the `qpq-pg-io` thread. Callers on other runtimes talk to a
/// connection through channels only.
pub(super) struct IoThreadConnect {
    handle: tokio::runtime::Handle,
    /// TLS for every connection (used as the URL's `sslmode` says).
    tls: MakeRustlsConnect,
    /// Dropped with the pool: the thread then leaves `block_on` and drops its runtime, with
    /// every connection task on it (closing their sockets).
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl IoThreadConnect {
    /// Starts the `qpq-pg-io` thread.
    pub(super) fn start(tls: MakeRustlsConnect) -> Result<Self, StoreError> {
        let failed = |e: std::io::Error| {
            StoreError::Unavailable(format!("starting the database I/O thread: {e}"))
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(failed)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("qpq-pg-io".into())
            .spawn(move || {
                runtime.block_on(async {
                    // Err once the sender is dropped: that is the signal.
                    let _ = stopped.await;
                });
            })
            .map_err(failed)?;
        Ok(Self {
            handle,
            tls,
            _stop: stop,
        })
    }
}

impl deadpool_postgres::Connect for IoThreadConnect {
    fn connect(
        &self,
        pg_config: &tokio_postgres::Config,
    ) -> BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let config = pg_config.clone();
        let handle = self.handle.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            // Poll the connect inside the I/O runtime's context, so the socket and the connect
            // timeout register with its reactor and timer rather than the caller's.
            let mut connecting = pin!(config.connect(tls));
            let (client, connection) = std::future::poll_fn(|cx| {
                let _entered = handle.enter();
                connecting.as_mut().poll(cx)
            })
            .await?;
            Ok((client, handle.spawn(drive(connection))))
        })
    }
}

/// Drives one connection until it closes.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(e) = connection.await {
        tracing::warn!(error = %describe(&e), "database connection closed with an error");
    }
}

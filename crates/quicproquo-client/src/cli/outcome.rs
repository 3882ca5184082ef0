//! How a `qpq` command ends: stopped by a signal ([`Stop`]), refused for its arguments
//! ([`UsageError`]), or failed; and how that shows in the exit code and on the command's root
//! span (`error.type`, after the OpenTelemetry conventions for CLI programs).

use std::cell::Cell;
use std::io::ErrorKind;
use std::rc::Rc;

use anyhow::{Context as _, Result};
use quicproquo_client::ClientError;
use quicproquo_client::chat::ChatError;
use quicproquo_client::state::StateError;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A command refused for its arguments or the device's state, before any call.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UsageError {
    /// No `--server-key` was given.
    #[error("--server-key is required (the key `qpq-server cluster-key` prints)")]
    MissingServerKey,
    /// `--server-key` is not a key.
    #[error("--server-key")]
    BadServerKey(#[source] quicproquo_core::KeyError),
    /// The device already has another name.
    #[error("this device is already registered as {0}")]
    AlreadyRegistered(String),
}

/// The command was stopped by a signal before it finished.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {0}")]
pub(crate) struct Interrupted(pub(crate) Signal);

/// The signals that stop a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Ctrl-C.
    Int,
    /// `kill`, a container stop.
    Term,
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Int => "SIGINT",
            Self::Term => "SIGTERM",
        })
    }
}

/// SIGINT and SIGTERM, caught: a command asked to stop ends as on a normal exit (its spans
/// flushed), instead of being killed by the default action.
#[derive(Debug, Clone)]
pub(crate) struct Stop {
    token: CancellationToken,
    signal: Rc<Cell<Option<Signal>>>,
}

impl Stop {
    /// Installs the handlers (inside a `LocalSet`: a local task waits for the signals).
    pub(crate) fn install() -> Result<Self> {
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let stop = Self {
            token: CancellationToken::new(),
            signal: Rc::default(),
        };
        let (token, cell) = (stop.token.clone(), Rc::clone(&stop.signal));
        tokio::task::spawn_local(async move {
            let got = tokio::select! {
                _ = term.recv() => Signal::Term,
                _ = int.recv() => Signal::Int,
            };
            cell.set(Some(got));
            token.cancel();
        });
        Ok(stop)
    }

    /// Resolves with the signal once one arrives.
    pub(crate) async fn requested(&self) -> Signal {
        self.token.cancelled().await;
        self.signal.get().unwrap_or(Signal::Term)
    }
}

/// The process exit code for a command's outcome: 0, 1, or 128 + the signal's number.
pub(crate) fn exit_code(result: &Result<()>) -> u8 {
    match result {
        Ok(()) => 0,
        Err(e) => match e.downcast_ref::<Interrupted>() {
            Some(Interrupted(Signal::Int)) => 130,
            Some(Interrupted(Signal::Term)) => 143,
            None => 1,
        },
    }
}

/// The `error.type` of a failed command: a low-cardinality name of its first typed cause (the
/// server's error code when the server refused the call).
pub(crate) fn error_type(e: &anyhow::Error) -> &'static str {
    for cause in e.chain() {
        if let Some(e) = cause.downcast_ref::<Interrupted>() {
            return match e.0 {
                Signal::Int | Signal::Term => "interrupted",
            };
        }
        if let Some(e) = cause.downcast_ref::<UsageError>() {
            return match e {
                UsageError::MissingServerKey | UsageError::BadServerKey(_) => "invalid_argument",
                UsageError::AlreadyRegistered(_) => "already_registered",
            };
        }
        if let Some(e) = cause.downcast_ref::<ChatError>() {
            return chat_error_type(e);
        }
        if let Some(e) = cause.downcast_ref::<ClientError>() {
            return client_error_type(e);
        }
        if let Some(e) = cause.downcast_ref::<StateError>() {
            return state_error_type(e);
        }
    }
    "_OTHER"
}

fn chat_error_type(e: &ChatError) -> &'static str {
    match e {
        ChatError::Client(c) => client_error_type(c),
        ChatError::Group(_) => "mls",
        ChatError::UnknownGroup(_) => "unknown_group",
        ChatError::NoKeyPackage(_) => "no_key_package",
        ChatError::Contended(_) => "contended",
        ChatError::Protocol(_) => "protocol",
        ChatError::Commit(_) => "commit",
        _ => "_OTHER",
    }
}

fn client_error_type(e: &ClientError) -> &'static str {
    match e {
        ClientError::Connect { source, .. } if source.kind() == ErrorKind::ConnectionRefused => {
            "connection_refused"
        }
        ClientError::Connect { .. } => "connect_failed",
        ClientError::Timeout { .. } => "timeout",
        ClientError::WrongClusterKey { .. } => "wrong_cluster_key",
        ClientError::Transport { .. } => "transport",
        ClientError::Rpc(r) if r.kind == capnp::ErrorKind::Disconnected => "disconnected",
        ClientError::Rpc(_) => "rpc_failed",
        ClientError::NoServers => "no_servers",
        ClientError::AllFailed(last) => client_error_type(last),
        ClientError::Service { code, .. } => code.as_str(),
        ClientError::Draining(_) => "draining",
        ClientError::State(s) => state_error_type(s),
        ClientError::Key(_) | ClientError::Mls(_) => "key",
        _ => "_OTHER",
    }
}

fn state_error_type(e: &StateError) -> &'static str {
    match e {
        StateError::Missing(_) => "state_missing",
        StateError::Corrupt(_) => "state_corrupt",
        StateError::Io { .. } => "state_io",
        _ => "key",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicproquo_proto::errors::ErrorCode;

    #[test]
    fn failures_are_named_by_their_first_typed_cause() {
        let refused = ClientError::Service {
            code: ErrorCode::UnknownGroup,
            message: "no such group".into(),
        };
        let e = anyhow::Error::from(ChatError::Client(refused)).context("sending");
        assert_eq!(error_type(&e), "unknown_group");
        let missing = StateError::Missing("qpq-state.bin".into());
        assert_eq!(error_type(&anyhow::Error::from(missing)), "state_missing");
        let wrapped = ClientError::AllFailed(Box::new(ClientError::Connect {
            addr: ([127, 0, 0, 1], 9).into(),
            source: std::io::Error::from(ErrorKind::ConnectionRefused),
        }));
        assert_eq!(
            error_type(&anyhow::Error::from(wrapped)),
            "connection_refused"
        );
        assert_eq!(error_type(&anyhow::anyhow!("plain")), "_OTHER");
        let stopped = Err(anyhow::Error::from(Interrupted(Signal::Term)));
        assert_eq!(exit_code(&stopped), 143);
        assert_eq!(exit_code(&Err(UsageError::MissingServerKey.into())), 1);
        assert_eq!(exit_code(&Ok(())), 0);
    }
}

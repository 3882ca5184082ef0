//! The `qpq` binary's command line: its options ([`Cli`], [`Command`]) and [`run`], which
//! hands each command to its own function in [`commands`] and stops it on SIGINT or SIGTERM.
//! Printing is [`output`]'s; how a command ends (exit code, `error.type`) is [`outcome`]'s.

mod commands;
mod outcome;
mod output;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use quicproquo_client::state::{DEFAULT_STATE_FILE, StateLock};
use quicproquo_core::duration::parse_duration;
use quicproquo_core::mls::Suite;

use outcome::{Interrupted, Stop};
pub(crate) use outcome::{error_type, exit_code};
use output::Output;

// The options of every command (no doc comment: clap would print it in `--help`).
#[derive(Parser)]
#[command(
    name = "qpq",
    version,
    about = "quicproquo client: end-to-end encrypted group messaging"
)]
pub(crate) struct Cli {
    /// Server address(es), `host:port[,host:port...]`, tried in order.
    #[arg(
        long,
        env = "QPQ_SERVER",
        value_delimiter = ',',
        default_value = "127.0.0.1:7000"
    )]
    server: Vec<String>,
    /// The cluster public key (hex) printed by `qpq-server cluster-key`; during a key
    /// rollover, the old and the new key, comma-separated.
    #[arg(long, env = "QPQ_SERVER_KEY", default_value = "")]
    server_key: String,
    /// The device state file.
    #[arg(long, env = "QPQ_STATE", default_value = DEFAULT_STATE_FILE)]
    state: PathBuf,
    /// Deadline for connecting, the handshake and each call, e.g. `5s`, `500ms`, `1m`.
    #[arg(long, env = "QPQ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print one JSON object per event instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

// What to do (no doc comment, for the same reason).
#[derive(Subcommand)]
enum Command {
    /// Measure the round-trip time to a server over Noise + Cap'n Proto.
    Ping,
    /// Create this device's identity (if the state has none), claim a user name and upload
    /// KeyPackages.
    Register {
        /// The user name to claim (3-32 characters: a-z, 0-9, '_', '-', '.').
        #[arg(long)]
        name: String,
        /// MLS ciphersuite of this device's KeyPackages.
        #[arg(long, default_value = "hybrid", value_parser = parse_suite)]
        suite: Suite,
        /// How many KeyPackages to upload.
        #[arg(long, default_value_t = DEFAULT_BATCH)]
        key_packages: u32,
    },
    /// Print this device's user name and identity fingerprint.
    Whoami,
    /// Show how many KeyPackages the server holds for this device; upload more when low.
    Keys {
        /// Top the pool up to this many when the server says it is low.
        #[arg(long, default_value_t = DEFAULT_BATCH)]
        top_up_to: u32,
    },
    /// Look up a user by name and print the fingerprint of their identity key.
    Lookup {
        /// The user name.
        name: String,
    },
    /// Create a group with this device as its only member.
    CreateGroup {
        /// A local name for the group.
        name: String,
    },
    /// Add users to a group (one commit for all of them).
    Invite {
        /// The group (local name or hex id prefix).
        group: String,
        /// User names to add.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove users from a group.
    Remove {
        /// The group (local name or hex id prefix).
        group: String,
        /// User names to remove.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Process pending Welcomes and print the groups joined.
    Join,
    /// Send a message to a group.
    Send {
        /// The group (local name or hex id prefix).
        group: String,
        /// The text.
        text: String,
    },
    /// Print what arrived since last time (and join pending groups); `--follow` stays live.
    Recv {
        /// Keep receiving as messages arrive, until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// List groups with epoch and members.
    Groups,
}

/// KeyPackages uploaded at registration and kept in the pool.
const DEFAULT_BATCH: u32 = 50;

fn parse_suite(s: &str) -> Result<Suite, String> {
    Suite::parse(s).ok_or_else(|| "use hybrid or classical".to_owned())
}

impl Cli {
    /// The subcommand's name, as typed (`send`, `create-group`, ...).
    pub(crate) fn command_name(&self) -> &'static str {
        match &self.command {
            Command::Ping => "ping",
            Command::Register { .. } => "register",
            Command::Whoami => "whoami",
            Command::Keys { .. } => "keys",
            Command::Lookup { .. } => "lookup",
            Command::CreateGroup { .. } => "create-group",
            Command::Invite { .. } => "invite",
            Command::Remove { .. } => "remove",
            Command::Join => "join",
            Command::Send { .. } => "send",
            Command::Recv { .. } => "recv",
            Command::Groups => "groups",
        }
    }
}

/// Runs the command `cli` names until it ends or SIGINT or SIGTERM arrives: a command stops
/// with [`Interrupted`], except `recv --follow`, for which a signal is the normal way to end.
pub(crate) async fn run(cli: Cli) -> Result<()> {
    let stop = Stop::install()?;
    let out = Output { json: cli.json };
    // Every command that may write the state holds it until the command ends.
    let _state = match &cli.command {
        Command::Ping | Command::Whoami => None,
        _ => Some(StateLock::acquire(&cli.state)?),
    };
    if let Command::Recv { follow: true } = &cli.command {
        return commands::recv(&cli, &out, Some(&stop)).await;
    }
    tokio::select! {
        result = dispatch(&cli, &out) => result,
        signal = stop.requested() => Err(Interrupted(signal).into()),
    }
}

/// Hands the command to its function.
async fn dispatch(cli: &Cli, out: &Output) -> Result<()> {
    match &cli.command {
        Command::Ping => commands::ping(cli).await,
        Command::Register {
            name,
            suite,
            key_packages,
        } => commands::register(cli, name, *suite, *key_packages).await,
        Command::Whoami => commands::whoami(cli),
        Command::Keys { top_up_to } => commands::keys(cli, *top_up_to).await,
        Command::Lookup { name } => commands::lookup(cli, name).await,
        Command::CreateGroup { name } => commands::create_group(cli, out, name).await,
        Command::Invite { group, names } => commands::invite(cli, out, group, names).await,
        Command::Remove { group, names } => commands::remove(cli, out, group, names).await,
        Command::Join => commands::join(cli, out).await,
        Command::Send { group, text } => commands::send(cli, out, group, text).await,
        Command::Recv { .. } => commands::recv(cli, out, None).await,
        Command::Groups => commands::groups(cli, out).await,
    }
}

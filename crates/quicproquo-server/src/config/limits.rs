//! Limits a single host or peer cannot exhaust: caps per source address, the bind deadline,
//! the idle timeout, the size of a `ping` before `bind` and the CPU pool's size, with their
//! flags, defaults and checks.

use std::time::Duration;

use super::{ConfigError, FileConfig, duration, invalid};
use crate::auth::RateSettings;
use crate::model::page::DEFAULT_PAGE_BYTES;
use crate::pool;

/// Default `max_connections_per_address`: more than a NAT'd office opens.
const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 256;
/// Default `max_handshakes_per_address`.
const DEFAULT_MAX_HANDSHAKES_PER_ADDRESS: usize = 32;
/// Default `bind_timeout`.
const DEFAULT_BIND_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `idle_timeout`.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `max_unbound_ping_bytes`.
const DEFAULT_MAX_UNBOUND_PING_BYTES: usize = 64;
/// Default `max_calls_in_flight`.
const DEFAULT_MAX_CALLS_IN_FLIGHT: usize = 32;
/// Default `max_subscriptions_per_connection`.
const DEFAULT_MAX_SUBSCRIPTIONS: usize = 64;
/// Default `write_stall_timeout`.
const DEFAULT_WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Smallest accepted `max_reply_bytes`.
const MIN_REPLY_BYTES: usize = 64 * 1024;
/// Most threads accepted for `cpu_pool_threads`.
const MAX_CPU_POOL_THREADS: usize = 256;
/// Most jobs accepted for `cpu_pool_queue`.
const MAX_CPU_POOL_QUEUE: usize = 65_536;
/// Most views accepted for `max_cached_group_views`.
const MAX_CACHED_GROUP_VIEWS: usize = 1_000_000;
/// Largest accepted `max_unbound_ping_bytes`.
const MAX_UNBOUND_PING_BYTES: usize = 64 * 1024;

/// Per-address and per-session limits (see `docs/operations.md`, "Limits").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSettings {
    /// Most connections open at once from one source address (an IPv6 /64 counts as one).
    pub max_connections_per_address: usize,
    /// Most handshakes in progress at once from one source address.
    pub max_handshakes_per_address: usize,
    /// How long a peer that is not a node may stay connected after its handshake without
    /// binding an identity.
    pub bind_timeout: Duration,
    /// Largest `ping` payload answered before the session binds (nodes are exempt).
    pub max_unbound_ping_bytes: usize,
    /// How long a connection that holds no subscription may go without a call before it is
    /// closed (nodes are exempt).
    pub idle_timeout: Duration,
    /// Threads of the bounded CPU pool (KeyPackage validation and other CPU-heavy checks).
    pub cpu_pool_threads: usize,
    /// Jobs the CPU pool admits beyond those running; past them, callers wait.
    pub cpu_pool_queue: usize,
    /// Byte budget of one page of a reply (`fetch`, `inbox`) or push; one entry always fits.
    /// Capped to `max_frame_bytes` − 64 KiB (see `ServerConfig::reply_budget`).
    pub max_reply_bytes: usize,
    /// Calls a client may have in flight on one connection; past them the connection is not
    /// read until calls finish (backpressure).
    pub max_calls_in_flight: usize,
    /// Subscriptions (group and inbox) one client connection may hold.
    pub max_subscriptions_per_connection: usize,
    /// How long a client connection may leave the server's writes unread before it is
    /// closed.
    pub write_stall_timeout: Duration,
    /// Rates per source address and per identity (binds, KeyPackage fetches) and the
    /// limiters' memory bound.
    pub rates: RateSettings,
    /// Groups whose public view (ADR 0012) an appender keeps in memory; idle ones past it are
    /// dropped and reloaded from the store when next needed.
    pub max_cached_group_views: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_connections_per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            max_handshakes_per_address: DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
            bind_timeout: DEFAULT_BIND_TIMEOUT,
            max_unbound_ping_bytes: DEFAULT_MAX_UNBOUND_PING_BYTES,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            cpu_pool_threads: pool::default_threads(),
            cpu_pool_queue: pool::DEFAULT_QUEUE,
            max_reply_bytes: DEFAULT_PAGE_BYTES,
            max_calls_in_flight: DEFAULT_MAX_CALLS_IN_FLIGHT,
            max_subscriptions_per_connection: DEFAULT_MAX_SUBSCRIPTIONS,
            write_stall_timeout: DEFAULT_WRITE_STALL_TIMEOUT,
            rates: RateSettings::default(),
            max_cached_group_views: crate::ordering::views::DEFAULT_CACHED_VIEWS,
        }
    }
}

/// The limits' flags and `QPQ_*` variables (flattened into the server's overrides).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LimitOverrides {
    /// Most connections open at once from one source address (an IPv6 /64 counts as one);
    /// more are closed on accept [default: 256].
    #[arg(long, env = "QPQ_MAX_CONNECTIONS_PER_ADDRESS")]
    pub max_connections_per_address: Option<usize>,
    /// Most handshakes in progress at once from one source address; more are closed on
    /// accept [default: 32].
    #[arg(long, env = "QPQ_MAX_HANDSHAKES_PER_ADDRESS")]
    pub max_handshakes_per_address: Option<usize>,
    /// Deadline for a client to bind an identity after its handshake, e.g. `10s`
    /// [default: 10s].
    #[arg(long, env = "QPQ_BIND_TIMEOUT")]
    pub bind_timeout: Option<String>,
    /// Largest `ping` payload answered before `bind`, in bytes [default: 64].
    #[arg(long, env = "QPQ_MAX_UNBOUND_PING_BYTES")]
    pub max_unbound_ping_bytes: Option<usize>,
    /// Close a client connection that holds no subscription after this long without a call,
    /// e.g. `5m` [default: 5m].
    #[arg(long, env = "QPQ_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Threads of the bounded pool that runs CPU-heavy checks (KeyPackage validation) off
    /// the connections' workers [default: one per core, at most 8].
    #[arg(long, env = "QPQ_CPU_POOL_THREADS")]
    pub cpu_pool_threads: Option<usize>,
    /// Jobs the CPU pool admits beyond those running; past them, calls wait for a slot
    /// [default: 256].
    #[arg(long, env = "QPQ_CPU_POOL_QUEUE")]
    pub cpu_pool_queue: Option<usize>,
    /// Byte budget of one page of a reply or push (fetch, inbox); one entry always fits;
    /// capped to max_frame_bytes - 64 KiB [default: 4194304].
    #[arg(long, env = "QPQ_MAX_REPLY_BYTES")]
    pub max_reply_bytes: Option<usize>,
    /// Calls a client may have in flight on one connection; past them the connection is not
    /// read until calls finish [default: 32].
    #[arg(long, env = "QPQ_MAX_CALLS_IN_FLIGHT")]
    pub max_calls_in_flight: Option<usize>,
    /// Subscriptions one client connection may hold; more are refused with limit_reached
    /// [default: 64].
    #[arg(long, env = "QPQ_MAX_SUBSCRIPTIONS_PER_CONNECTION")]
    pub max_subscriptions_per_connection: Option<usize>,
    /// Close a client connection that leaves the server's writes unread this long, e.g.
    /// `30s` [default: 30s].
    #[arg(long, env = "QPQ_WRITE_STALL_TIMEOUT")]
    pub write_stall_timeout: Option<String>,
    /// Binds (each may register a new identity) one source address may make per minute
    /// [default: 120].
    #[arg(long, env = "QPQ_BIND_LIMIT_PER_ADDRESS")]
    pub bind_limit_per_address: Option<u32>,
    /// KeyPackage targets one identity may fetch per minute, all targets together
    /// [default: 2000].
    #[arg(long, env = "QPQ_KEY_PACKAGE_FETCH_LIMIT_PER_IDENTITY")]
    pub key_package_fetch_limit_per_identity: Option<u32>,
    /// KeyPackage targets fetched from one source address per minute [default: 10000].
    #[arg(long, env = "QPQ_KEY_PACKAGE_FETCH_LIMIT_PER_ADDRESS")]
    pub key_package_fetch_limit_per_address: Option<u32>,
    /// Keys (identities, addresses, pairs) each rate limiter tracks at most: its memory bound
    /// [default: 65536].
    #[arg(long, env = "QPQ_RATE_LIMITER_ENTRIES")]
    pub rate_limiter_entries: Option<usize>,
    /// Groups whose public view an appender keeps in memory (about 1.6 MB each for a
    /// 1000-member hybrid group); idle ones past it are reloaded when needed [default: 256].
    #[arg(long, env = "QPQ_MAX_CACHED_GROUP_VIEWS")]
    pub max_cached_group_views: Option<usize>,
}

impl LimitSettings {
    /// The limits from the flags/environment over the file over `defaults`.
    pub(super) fn resolve(
        file: &mut FileConfig,
        overrides: &mut LimitOverrides,
        defaults: Self,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            max_connections_per_address: overrides
                .max_connections_per_address
                .or(file.max_connections_per_address)
                .unwrap_or(defaults.max_connections_per_address),
            max_handshakes_per_address: overrides
                .max_handshakes_per_address
                .or(file.max_handshakes_per_address)
                .unwrap_or(defaults.max_handshakes_per_address),
            bind_timeout: duration(
                "bind_timeout",
                overrides.bind_timeout.take().or(file.bind_timeout.take()),
                defaults.bind_timeout,
            )?,
            max_unbound_ping_bytes: overrides
                .max_unbound_ping_bytes
                .or(file.max_unbound_ping_bytes)
                .unwrap_or(defaults.max_unbound_ping_bytes),
            idle_timeout: duration(
                "idle_timeout",
                overrides.idle_timeout.take().or(file.idle_timeout.take()),
                defaults.idle_timeout,
            )?,
            cpu_pool_threads: overrides
                .cpu_pool_threads
                .or(file.cpu_pool_threads)
                .unwrap_or(defaults.cpu_pool_threads),
            cpu_pool_queue: overrides
                .cpu_pool_queue
                .or(file.cpu_pool_queue)
                .unwrap_or(defaults.cpu_pool_queue),
            max_reply_bytes: overrides
                .max_reply_bytes
                .or(file.max_reply_bytes)
                .unwrap_or(defaults.max_reply_bytes),
            max_calls_in_flight: overrides
                .max_calls_in_flight
                .or(file.max_calls_in_flight)
                .unwrap_or(defaults.max_calls_in_flight),
            max_subscriptions_per_connection: overrides
                .max_subscriptions_per_connection
                .or(file.max_subscriptions_per_connection)
                .unwrap_or(defaults.max_subscriptions_per_connection),
            write_stall_timeout: duration(
                "write_stall_timeout",
                overrides
                    .write_stall_timeout
                    .take()
                    .or(file.write_stall_timeout.take()),
                defaults.write_stall_timeout,
            )?,
            rates: RateSettings {
                binds_per_address: overrides
                    .bind_limit_per_address
                    .or(file.bind_limit_per_address)
                    .unwrap_or(defaults.rates.binds_per_address),
                fetches_per_identity: overrides
                    .key_package_fetch_limit_per_identity
                    .or(file.key_package_fetch_limit_per_identity)
                    .unwrap_or(defaults.rates.fetches_per_identity),
                fetches_per_address: overrides
                    .key_package_fetch_limit_per_address
                    .or(file.key_package_fetch_limit_per_address)
                    .unwrap_or(defaults.rates.fetches_per_address),
                capacity: overrides
                    .rate_limiter_entries
                    .or(file.rate_limiter_entries)
                    .unwrap_or(defaults.rates.capacity),
            },
            max_cached_group_views: overrides
                .max_cached_group_views
                .or(file.max_cached_group_views)
                .unwrap_or(defaults.max_cached_group_views),
        })
    }

    /// Checks the limits' ranges. The per-address caps may exceed the global ones (the
    /// smaller cap applies).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_connections_per_address == 0 {
            return Err(invalid("max_connections_per_address", "must be at least 1"));
        }
        if self.max_handshakes_per_address == 0 {
            return Err(invalid("max_handshakes_per_address", "must be at least 1"));
        }
        if self.bind_timeout.is_zero() || self.bind_timeout > Duration::from_secs(300) {
            return Err(invalid(
                "bind_timeout",
                "must be more than 0 and at most 5m",
            ));
        }
        if self.idle_timeout < Duration::from_secs(1)
            || self.idle_timeout > Duration::from_secs(86_400)
        {
            return Err(invalid("idle_timeout", "must be between 1s and 24h"));
        }
        if !(1..=MAX_CPU_POOL_THREADS).contains(&self.cpu_pool_threads) {
            return Err(invalid(
                "cpu_pool_threads",
                format!("must be between 1 and {MAX_CPU_POOL_THREADS}"),
            ));
        }
        if !(1..=65_536).contains(&self.max_calls_in_flight) {
            return Err(invalid(
                "max_calls_in_flight",
                "must be between 1 and 65536",
            ));
        }
        if self.max_subscriptions_per_connection == 0 {
            return Err(invalid(
                "max_subscriptions_per_connection",
                "must be at least 1",
            ));
        }
        if self.write_stall_timeout < Duration::from_secs(1)
            || self.write_stall_timeout > Duration::from_secs(3600)
        {
            return Err(invalid("write_stall_timeout", "must be between 1s and 1h"));
        }
        let r = &self.rates;
        for (key, v) in [
            ("bind_limit_per_address", r.binds_per_address),
            (
                "key_package_fetch_limit_per_identity",
                r.fetches_per_identity,
            ),
            ("key_package_fetch_limit_per_address", r.fetches_per_address),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if !(64..=16_777_216).contains(&r.capacity) {
            return Err(invalid(
                "rate_limiter_entries",
                "must be between 64 and 16777216",
            ));
        }
        if self.max_reply_bytes < MIN_REPLY_BYTES {
            return Err(invalid(
                "max_reply_bytes",
                format!("must be at least {MIN_REPLY_BYTES}"),
            ));
        }
        if self.cpu_pool_queue > MAX_CPU_POOL_QUEUE {
            return Err(invalid(
                "cpu_pool_queue",
                format!("must be at most {MAX_CPU_POOL_QUEUE}"),
            ));
        }
        if !(1..=MAX_CACHED_GROUP_VIEWS).contains(&self.max_cached_group_views) {
            return Err(invalid(
                "max_cached_group_views",
                format!("must be between 1 and {MAX_CACHED_GROUP_VIEWS}"),
            ));
        }
        if self.max_unbound_ping_bytes > MAX_UNBOUND_PING_BYTES {
            return Err(invalid(
                "max_unbound_ping_bytes",
                format!("must be at most {MAX_UNBOUND_PING_BYTES}"),
            ));
        }
        Ok(())
    }
}

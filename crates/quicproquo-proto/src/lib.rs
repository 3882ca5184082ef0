//! Wire schemas of quicproquo: the Rust code generated from `schemas/*.capnp`.
//!
//! This crate holds types only: no crypto, no I/O, no async. The generated code is checked in
//! (see `docs/adr/0002-checked-in-capnp-code.md`), so building it needs no Cap'n Proto compiler;
//! `cargo run -p quicproquo-proto --example codegen -- --check` verifies that it matches the schemas.
//!
//! Modules follow the schema files: [`common_capnp`] (trace context, node roles),
//! [`envelope_capnp`] (a stored log entry), [`auth_capnp`] (Authentication Service),
//! [`delivery_capnp`] (Delivery Service and message streams) and [`bootstrap_capnp`] (the
//! capability a client receives after the handshake). [`errors`] defines the stable error
//! codes servers put in failed calls.
//!
//! # Layout
//!
//! | module | holds |
//! |---|---|
//! | `*_capnp` | generated readers/builders, one per schema file (never edited by hand) |
//! | [`errors`] | the `[code] detail` convention of failed calls and its stable codes |
//!
//! Every other crate depends on this one; it depends on `capnp` alone.

pub mod errors;

macro_rules! generated {
    ($(#[$doc:meta] $name:ident => $file:literal),* $(,)?) => {
        $(
            #[$doc]
            #[allow(missing_docs, unreachable_pub, unused_qualifications, clippy::all, clippy::pedantic, clippy::nursery, clippy::restriction)]
            pub mod $name {
                include!(concat!("generated/", $file));
            }
        )*
    };
}

generated! {
    /// Types shared by every interface: trace context and node roles.
    common_capnp => "common_capnp.rs",
    /// The stored and delivered log entry.
    envelope_capnp => "envelope_capnp.rs",
    /// The Authentication Service interface.
    auth_capnp => "auth_capnp.rs",
    /// The Delivery Service, message stream and subscription interfaces.
    delivery_capnp => "delivery_capnp.rs",
    /// The internal interface between cluster nodes (edge to shard).
    cluster_capnp => "cluster_capnp.rs",
    /// The bootstrap interface handed out after the Noise handshake.
    bootstrap_capnp => "bootstrap_capnp.rs",
}

//! Test fixtures shared by quicproquo's test suites; never part of a release.
//!
//! [`conformance`] is the store conformance suite: the behaviour every `Store` implementation
//! must show, run against the embedded store and against Postgres. [`postgres`] hands each test
//! its own fresh Postgres database, on the server named by `QPQ_TEST_DATABASE_URL` or on a
//! throwaway server started from the installed Postgres binaries.
//!
//! # Layout
//!
//! | module | role |
//! |---|---|
//! | [`conformance`] | the Authentication Service store's specification, as tests |
//! | [`log_conformance`] | the Delivery Service store's specification (ordering, epochs, windows) |
//! | [`noise`] | a real Noise channel over loopback TCP, for what runs on one connection |
//! | [`otlp`] | an OTLP/HTTP receiver keeping what exporters send, for the trace tests |
//! | [`postgres`] | one fresh database per test, on a given or throwaway server |
//! | [`retention_conformance`] | what retention deletes, and what readers see afterwards |

pub mod conformance;
pub mod log_conformance;
pub mod noise;
pub mod otlp;
pub mod postgres;
pub mod retention_conformance;

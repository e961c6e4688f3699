//! sde-gateway: the front door of a Secure Data Environment.
//!
//! Researchers send SQL over Arrow Flight SQL; only safe aggregates come back. Every query walks
//! the same path, top to bottom, and each step lives in its own module:
//!
//! `identity` (who is asking) → `registry` (may they, for this project) → `engine` (a catalogue
//! holding only the project's granted data, opt-outs removed) → `policy` (is the plan
//! aggregate-only, with identifiers used safely; rewrite it for disclosure control) → execute →
//! `disclosure` (threshold, rounding) → `audit` (recorded before release) → `api` (gRPC).

/// mimalloc for every binary built on the crate (the gateway, its tests and benches): the query
/// engine allocates and frees many small buffers per query from several threads, which glibc's
/// allocator serves with more contention and fragmentation.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod admin_client;
pub mod api;
pub mod audit;
pub mod auditor;
pub mod baselines;
pub mod budget;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod disclosure;
pub mod engine;
pub mod error;
pub mod gateway;
pub mod identity;
pub mod ingest;
pub mod limits;
pub mod plans;
pub mod policy;
pub mod recent;
pub mod registry;
pub mod review;
pub mod review_client;
pub mod server;
pub mod telemetry;

/// Stack of each of the gateway binary's worker threads (tokio's default is 2 MiB). The query
/// path does not depend on it (see [`policy::statement`]); it is a margin.
pub const WORKER_STACK_BYTES: usize = 16 * 1024 * 1024;

pub use config::GatewayConfig;
pub use error::Error;
pub use server::Gateway;

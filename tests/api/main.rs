//! Integration tests: the real gateway on an ephemeral port, real TLS with certificates made at
//! test time, real signed tokens, and the Rust Flight SQL client. The telemetry tests are their
//! own test binary (`tests/telemetry.rs`), so no other test's tracing shares their process.

mod admin;
mod attacks;
mod audit;
mod budget;
mod changes;
mod corpus;
mod crash;
mod flight_sql;
mod fuzz;
mod helpers;
mod hostile;
mod identity;
mod matrix;
mod operations;
mod oracles;
mod perturbation;
mod property;
mod review;
mod versions;

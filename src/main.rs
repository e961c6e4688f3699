//! `sde-gateway`: parse the command line, start logging, hand over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sde_gateway::telemetry::init_logging();
    sde_gateway::cli::run(sde_gateway::cli::Cli::parse()).await
}

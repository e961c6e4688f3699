//! `sde-gateway`: parse the command line, start logging, hand over to the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = sde_gateway::cli::Cli::parse();
    // Worker threads with room to spare: DataFusion's deep walks grow their stacks on the heap,
    // and the statement limits bound everything else, but a margin costs only address space.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(sde_gateway::WORKER_STACK_BYTES)
        .build()?
        .block_on(async {
            sde_gateway::telemetry::init_logging();
            sde_gateway::cli::run(cli).await
        })
}

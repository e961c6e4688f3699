//! `sde-gateway`: parse the command line, start logging, hand over to the library, and say what
//! went wrong in one line: a refusal by its rule and message, anything else with its causes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = sde_gateway::cli::Cli::parse();
    // Worker threads with room to spare: DataFusion's deep walks grow their stacks on the heap,
    // and the statement limits bound everything else, but a margin costs only address space.
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(sde_gateway::WORKER_STACK_BYTES)
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime.block_on(async {
                sde_gateway::telemetry::init_logging();
                sde_gateway::cli::run(cli).await
            })
        });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// A gRPC status as the gateway wrote it (the rule id leads its message) with its code's name;
/// any other error with the chain of its causes.
fn describe(e: &anyhow::Error) -> String {
    match e.downcast_ref::<tonic::Status>() {
        Some(status) => format!("{} ({:?})", status.message(), status.code()),
        None => format!("{e:#}"),
    }
}

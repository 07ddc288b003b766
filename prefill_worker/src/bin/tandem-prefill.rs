//! `tandem-prefill`: a prefill worker process.

use clap::Parser;
use tandem_prefill_worker::{PrefillArgs, run, runtime, shutdown_signal};

/// Runs a tandem prefill worker.
#[derive(Parser)]
#[command(name = "tandem-prefill", version, about)]
struct Cli {
    #[command(flatten)]
    args: PrefillArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::init_tracing();
    run(cli.args, shutdown_signal()).await
}

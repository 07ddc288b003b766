//! `tandem-prefill`: a prefill worker process.

use clap::Parser;
use tandem_prefill_worker::{PrefillArgs, run, runtime, shutdown_signal};

/// A tandem prefill worker: computes prompts' KV and streams it to decode workers.
#[derive(Parser)]
#[command(name = "tandem-prefill", version)]
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

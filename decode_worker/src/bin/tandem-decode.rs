//! `tandem-decode`: a decode worker process.

use clap::Parser;
use tandem_decode_worker::{DecodeArgs, run, shutdown_signal};
use tandem_prefill_worker::runtime;

/// A tandem decode worker: generates tokens, prefilling locally or on a prefill worker.
#[derive(Parser)]
#[command(name = "tandem-decode", version)]
struct Cli {
    #[command(flatten)]
    args: DecodeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    runtime::init_tracing();
    run(cli.args, shutdown_signal()).await
}

//! `tandem-router`: the OpenAI API in front of a tandem cluster's workers.

use anyhow::Context;
use clap::Parser;
use tandem_router::serve::{RouterArgs, run};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "tandem-router",
    version,
    about = "Serve the OpenAI API over a tandem cluster's workers"
)]
struct Cli {
    #[command(flatten)]
    args: RouterArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // Installed before serving, so an early signal is not lost.
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    run(cli.args, async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
    .await
}

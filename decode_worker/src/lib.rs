//! The decode worker (`tandem-decode`): generates tokens for prompts. When the
//! router names a prefill worker, it reserves KV blocks for the prompt (all but
//! its last token), has the prefill worker compute them and stream them in over
//! QUIC, and decodes from there; otherwise, or if that fails, it prefills
//! locally. Either way it computes the last prompt token and samples every
//! output token itself, so outputs are the same as in aggregated mode.
//!
//! The process around it (engine, gRPC service, registration, metrics, drain)
//! is the shared [`tandem_prefill_worker::runtime`].

#![warn(missing_docs)]

mod generate;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

pub use tandem_prefill_worker::runtime::CommonArgs;
pub use tandem_prefill_worker::shutdown_signal;

/// The decode worker's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DecodeArgs {
    /// The flags every worker takes.
    #[command(flatten)]
    pub common: CommonArgs,
    /// Where to receive KV transfers over QUIC (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub kv_addr: SocketAddr,
    /// Also receive KV from prefill workers on this host through shared memory,
    /// listening on this Unix socket (no crypto, no network stack on the data
    /// path). Prefill workers elsewhere keep using QUIC.
    #[arg(long, value_name = "PATH")]
    pub kv_socket: Option<PathBuf>,
    /// How long a remote prefill may take before the worker prefills locally, ms:
    /// the prefill worker's queue, its compute and the transfer together. Falling
    /// back late costs the whole prompt again here, so this bounds a lost
    /// prefill worker, not a busy one.
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    pub transfer_deadline_ms: u32,
    /// Test mode: answer Generate at once by repeating the last prompt token,
    /// without running the model (measures the router's overhead).
    #[arg(long, hide = true)]
    pub echo: bool,
}

impl DecodeArgs {
    /// Defaults for everything but the common flags.
    pub fn new(common: CommonArgs) -> Self {
        Self {
            common,
            kv_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            kv_socket: None,
            transfer_deadline_ms: 60_000,
            echo: false,
        }
    }
}

/// Runs a decode worker until `shutdown` resolves, then drains and stops.
pub async fn run(
    args: DecodeArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let common = args.common.clone();
    tandem_prefill_worker::runtime::serve(
        &common,
        tandem_protocol::Role::Decode,
        |worker| generate::DecodeService::start(worker, args),
        shutdown,
    )
    .await
}

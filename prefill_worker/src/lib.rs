//! The prefill worker (`tandem-prefill`): computes prompts' KV and streams it
//! over QUIC into the blocks a decode worker reserved, layer by layer as the
//! prefill completes them, so the transfer overlaps the compute.
//!
//! It also holds the [`runtime`] every tandem worker shares (engine, the one
//! `Worker` gRPC service, registration, metrics, drain); the decode worker
//! builds on it with its own [`runtime::RoleService`].

#![warn(missing_docs)]

mod prefill;
pub mod runtime;

use std::future::Future;

pub use runtime::shutdown_signal;

/// The prefill worker's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefillArgs {
    /// The flags every worker takes.
    #[command(flatten)]
    pub common: runtime::CommonArgs,
}

/// Runs a prefill worker until `shutdown` resolves, then drains and stops.
pub async fn run(
    args: PrefillArgs,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    runtime::serve(
        &args.common,
        tandem_protocol::Role::Prefill,
        |worker| async move {
            let service = prefill::PrefillService::new(worker)?;
            Ok((service, runtime::RoleEndpoints::default()))
        },
        shutdown,
    )
    .await
}

//! The `tandem` command's library: each subcommand's work, so `main.rs` stays
//! argument parsing and dispatch.

pub mod bench;
pub mod bench_frontend;
pub mod bench_router;
pub mod bench_serve;
pub mod bench_stream;
pub mod bench_transfer;
pub mod certs;
pub mod connector_local;
pub mod control;
pub mod ctl;
pub mod generate;
pub mod kubernetes;
pub mod model_pull;
pub mod sim;
pub mod up;

/// The async runtime every command that needs one runs on: multi-threaded,
/// with I/O and timers.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

//! tandem's KV-aware router, as a library: the KV index that workers' cache events
//! keep current, the routing cost that picks a worker for each request, and a
//! simulator that replays request traces through both against simulated workers on
//! a virtual clock.
//!
//! The index ([`index::KvIndex`]) answers "how many leading blocks of this prompt
//! does each worker hold"; the cost ([`cost`]) turns those overlaps and the
//! router's own view of each worker's load into a choice; [`KvRouter`] ties the two
//! together with the per-request bookkeeping that load terms need. The simulator
//! ([`sim`]) drives that same code with workers that keep the engine's real KV
//! cache bookkeeping, so its prefix-reuse figures are the engine's.
//!
//! [`serve`] is the router process (`tandem-router`, `tandem router`): it follows
//! the cluster's membership in the control-plane store, feeds each worker's KV
//! events into the index, and serves the OpenAI API by routing each request to a
//! decode worker (and, when it pays, a prefill worker) over gRPC.

pub mod cost;
pub mod index;
mod kv_router;
mod rng;
pub mod serve;
pub mod sim;
mod table;

pub use cost::{CostConfig, Policy};
pub use index::{Applied, IndexError, KvIndex, KvSnapshot, Overlaps, SyncState, WorkerId};
pub use kv_router::{Decision, KvRouter, RequestId};

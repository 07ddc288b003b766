//! Types every tandem process shares: how token blocks are named (the chained
//! block hash), and the KV cache events that workers publish to routers.
//!
//! The engine hashes blocks as it fills its KV cache, and the router hashes
//! prompts with the same function to find where a prefix is already cached, so
//! this crate is the one definition both sides use.

mod block_hash;
mod cluster;
mod kv_event;
mod metrics;
mod planner;

/// gRPC services shared by the cluster's processes.
#[cfg(feature = "grpc")]
pub mod grpc {
    /// The control-plane store service (`proto/store.proto`).
    pub mod store {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("tandem.store.v1");
    }

    /// The embedded store's peer service and log format (`proto/raft.proto`).
    pub mod raft {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("tandem.raft.v1");
    }

    /// The worker service (`proto/worker.proto`): generate, prefill, KV events, load.
    pub mod worker {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("tandem.worker.v1");
    }

    #[path = "convert.rs"]
    mod convert;
    pub use convert::{raw, typed};
}

pub use block_hash::{BlockHash, BlockHasher, DEFAULT_BLOCK_SIZE};
pub use cluster::{InstanceInfo, ModelCard, Role, WorkerState, keys};
pub use kv_event::{KvEvent, KvEventKind};
pub use metrics::{LatencyHistogram, write_family, write_metric};
pub use planner::{Desired, MAX_REPLICAS, PlannerDecision, PlannerTargets, unix_ms};

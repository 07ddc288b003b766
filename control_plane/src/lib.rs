//! The control plane's storage: one [`Store`] trait for membership, model cards
//! and planner state, with etcd's semantics (a global revision per write, prefix
//! watches that resume from a revision, leases that delete their keys when they
//! expire, compare-and-swap transactions).
//!
//! - [`MemStore`] is the in-memory store: the state machine (shared with the
//!   Raft store) with a bounded history for watch resumption and a reaper for
//!   expired leases, nothing on disk.
//! - [`EmbeddedStore`] replicates that state machine with Raft (raft-rs) over a
//!   group of 1 or 3 nodes, with a write-ahead log and snapshots on disk.
//! - [`serve`] offers either to other processes over gRPC, and [`RemoteStore`]
//!   is the client: a process talks to the cluster's store through it (failing
//!   over between a group's nodes), and its watches reconnect and resume where
//!   they left off.
//! - [`Registration`] keeps a process's [`tandem_protocol::InstanceInfo`]
//!   under a lease for as long as it serves, across store outages.

mod any;
mod connector;
mod etcd;
mod mem;
pub mod planner;
mod raft;
mod reconcile;
mod registration;
mod remote;
mod resume;
mod service;
mod state;
mod store;

pub use any::AnyStore;
pub use connector::{Connector, ConnectorError};
pub use etcd::{EtcdStore, EtcdTls};
pub use mem::MemStore;
pub use planner::{LoadProbe, run_planner};
pub use raft::{DEFAULT_SNAPSHOT_EVERY, EmbeddedConfig, EmbeddedStore, parse_peers};
pub use reconcile::{WORKER_ROLES, reconcile};
pub use registration::{DEFAULT_LEASE_TTL, Registration};
pub use remote::RemoteStore;
pub use service::{Served, serve};
pub use store::{
    Compare, Event, KeyValue, LeaseId, Revision, Store, StoreError, TxnOp, WatchStream,
};

//! The control plane's storage: one [`Store`] trait for membership, model cards
//! and planner state, with etcd's semantics (a global revision per write, prefix
//! watches that resume from a revision, leases that delete their keys when they
//! expire, compare-and-swap transactions).
//!
//! - [`MemStore`] is the embedded store: the state machine in memory, with a
//!   bounded history for watch resumption and a reaper for expired leases.
//! - [`serve`] offers a `MemStore` to other processes over gRPC, and
//!   [`RemoteStore`] is the client: a process talks to the cluster's store
//!   through it, and its watches reconnect and resume where they left off.
//! - [`Registration`] keeps a process's [`tandem_protocol::InstanceInfo`]
//!   under a lease for as long as it serves, across store outages.

mod connector;
mod etcd;
mod mem;
pub mod planner;
mod reconcile;
mod registration;
mod remote;
mod service;
mod store;

pub use connector::{Connector, ConnectorError};
pub use etcd::EtcdStore;
pub use mem::MemStore;
pub use planner::{LoadProbe, campaign, run_planner};
pub use reconcile::{WORKER_ROLES, reconcile};
pub use registration::{DEFAULT_LEASE_TTL, Registration};
pub use remote::RemoteStore;
pub use service::serve;
pub use store::{
    Compare, Event, KeyValue, LeaseId, Revision, Store, StoreError, TxnOp, WatchStream,
};

//! The store's types and the trait every implementation provides.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

/// A store-wide write counter: every write gets the next one.
pub type Revision = i64;

/// A lease: keys attached to it are deleted when it expires or is revoked.
pub type LeaseId = i64;

/// A key and its value, with etcd's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Writes since the key was created (1 for a new key).
    pub version: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: LeaseId,
}

/// One change, as a watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

impl Event {
    /// The key that changed.
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// A condition of a transaction: the key's last write was at `mod_revision`
/// (0: the key does not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub mod_revision: Revision,
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("revision {requested} is no longer in the history (oldest kept: {oldest})")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    #[error("lease {0} does not exist (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("watcher fell behind; resume from revision {0}")]
    WatchLagged(Revision),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("the watch ended")]
    WatchClosed,
}

/// Changes under a prefix, in revision order.
pub struct WatchStream {
    rx: mpsc::Receiver<Result<Vec<Event>, StoreError>>,
    pending: std::collections::VecDeque<Event>,
    /// Every change after this revision (and none before it) comes through.
    from: Revision,
}

impl WatchStream {
    pub(crate) fn new(rx: mpsc::Receiver<Result<Vec<Event>, StoreError>>, from: Revision) -> Self {
        Self {
            rx,
            pending: Default::default(),
            from,
        }
    }

    /// The revision the stream starts after: it delivers every change with a
    /// higher revision, in order.
    pub fn starts_after(&self) -> Revision {
        self.from
    }

    /// The next change; an error ends the stream.
    pub async fn next(&mut self) -> Result<Event, StoreError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(ev);
            }
            match self.rx.recv().await {
                Some(Ok(events)) => self.pending.extend(events),
                Some(Err(e)) => return Err(e),
                None => return Err(StoreError::WatchClosed),
            }
        }
    }

    /// The next batch of changes (all at one revision, or a resumed backlog).
    pub(crate) async fn next_batch(&mut self) -> Result<Vec<Event>, StoreError> {
        if !self.pending.is_empty() {
            return Ok(self.pending.drain(..).collect());
        }
        match self.rx.recv().await {
            Some(batch) => batch,
            None => Err(StoreError::WatchClosed),
        }
    }
}

/// What the control plane needs from its store. Implementations: [`crate::MemStore`]
/// (embedded) and [`crate::RemoteStore`] (a store served by another process).
pub trait Store: Send + Sync + 'static {
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Writes `key`, attached to `lease` if given; returns the write's revision.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;

    /// Deletes `key`; says whether it existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Every key under `prefix`, in key order, and the store's revision.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<KeyValue>, Revision), StoreError>> + Send;

    /// Changes under `prefix` from revision `start` (None: from now on).
    fn watch(
        &self,
        prefix: &str,
        start: Option<Revision>,
    ) -> impl Future<Output = Result<WatchStream, StoreError>> + Send;

    fn lease_grant(
        &self,
        ttl: Duration,
    ) -> impl Future<Output = Result<LeaseId, StoreError>> + Send;

    /// Restarts the lease's TTL; `LeaseNotFound` once it has expired.
    fn lease_keepalive(&self, id: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Ends the lease now, deleting its keys.
    fn lease_revoke(&self, id: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Applies `success` if every comparison holds, else `failure`, atomically;
    /// says which.
    fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Claims `key` for the holder of `lease` if nobody holds it: writes
    /// `value` there, attached to the lease, only if the key does not exist.
    /// Says whether the caller holds the key now, which is also true when it
    /// already held it under the same lease. The claim ends with the lease
    /// (expiry or revoke); the others campaign again after. The simple form of
    /// etcd's election, with no queue of candidates: enough to pick one leader
    /// among a few planners. The default is a create-if-absent transaction and
    /// a read of the holder; a store may do both in one round trip.
    fn campaign(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move {
            let won = self
                .txn(
                    vec![Compare {
                        key: key.to_owned(),
                        mod_revision: 0,
                    }],
                    vec![TxnOp::Put {
                        key: key.to_owned(),
                        value,
                        lease: Some(lease),
                    }],
                    vec![],
                )
                .await?;
            if won {
                return Ok(true);
            }
            Ok(self.get(key).await?.is_some_and(|kv| kv.lease == lease))
        }
    }
}

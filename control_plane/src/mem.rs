//! The in-memory store: the whole state machine in this process, no disk.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;

use crate::state::State;
use crate::store::{Compare, KeyValue, LeaseId, Revision, Store, StoreError, TxnOp, WatchStream};

/// How often expired leases are looked for.
const REAP_EVERY: Duration = Duration::from_millis(50);

/// The in-memory store. Clones share one state.
#[derive(Clone)]
pub struct MemStore {
    inner: Arc<Mutex<State>>,
}

/// Locks a shared state. A panic while holding the lock leaves the maps
/// consistent (every mutation completes before anything can panic), so
/// poisoning is ignored.
pub(crate) fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemStore {
    /// An empty store. Must be called inside a tokio runtime: it starts the task
    /// that expires leases, which ends when the last clone is dropped.
    pub fn new() -> Self {
        let inner = Arc::new(Mutex::new(State::default()));
        let weak: Weak<Mutex<State>> = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_EVERY);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                lock(&inner).expire_leases(Instant::now());
            }
        });
        Self { inner }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner)
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.state().revision
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Store for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.state().get(key))
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        self.state().apply(vec![TxnOp::Put {
            key: key.to_owned(),
            value,
            lease,
        }])
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.state().delete(key))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        Ok(self.state().list(prefix))
    }

    async fn watch(
        &self,
        prefix: &str,
        start: Option<Revision>,
    ) -> Result<WatchStream, StoreError> {
        self.state().watch(prefix, start)
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("a lease needs a TTL above zero".into()));
        }
        Ok(self.state().grant(ttl, Instant::now()))
    }

    async fn lease_keepalive(&self, id: LeaseId) -> Result<(), StoreError> {
        self.state().keepalive(id, Instant::now())
    }

    async fn lease_revoke(&self, id: LeaseId) -> Result<(), StoreError> {
        if self.state().revoke(id) {
            Ok(())
        } else {
            Err(StoreError::LeaseNotFound(id))
        }
    }

    async fn txn(
        &self,
        compare: Vec<Compare>,
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<bool, StoreError> {
        self.state().txn(&compare, success, failure)
    }
}

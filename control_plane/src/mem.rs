//! The embedded store: the whole state machine in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::store::{
    Compare, Event, KeyValue, LeaseId, Revision, Store, StoreError, TxnOp, WatchStream,
};

/// Changes kept for watchers that resume from an older revision.
const HISTORY: usize = 65_536;
/// Batches a watcher may have queued before it is cut off as lagging.
const WATCH_QUEUE: usize = 1024;
/// How often expired leases are looked for.
const REAP_EVERY: Duration = Duration::from_millis(50);

/// The embedded store. Clones share one state.
#[derive(Clone)]
pub struct MemStore {
    inner: Arc<Mutex<State>>,
}

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Result<Vec<Event>, StoreError>>,
}

#[derive(Default)]
struct State {
    revision: Revision,
    kvs: BTreeMap<String, KeyValue>,
    history: VecDeque<Event>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    watchers: Vec<Watcher>,
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
                let mut state = inner.lock().unwrap_or_else(PoisonError::into_inner);
                state.expire_leases(Instant::now());
            }
        });
        Self { inner }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (every
        // mutation completes before anything can panic), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current revision.
    pub fn revision(&self) -> Revision {
        self.state().revision
    }
}

impl State {
    fn record(&mut self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        for ev in &events {
            self.history.push_back(ev.clone());
        }
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        let revision = self.revision;
        self.watchers.retain(|w| {
            let mine: Vec<Event> = events
                .iter()
                .filter(|e| e.key().starts_with(&w.prefix))
                .cloned()
                .collect();
            if mine.is_empty() {
                return !w.tx.is_closed();
            }
            match w.tx.try_send(Ok(mine)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Cut the slow watcher off; it resumes from what it has seen.
                    let _ = w.tx.try_send(Err(StoreError::WatchLagged(revision)));
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    fn apply_put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        revision: Revision,
    ) -> Event {
        let lease = lease.unwrap_or(0);
        let old = self.kvs.get(key);
        let (create_revision, version, old_lease) = match old {
            Some(kv) => (kv.create_revision, kv.version + 1, kv.lease),
            None => (revision, 1, 0),
        };
        if old_lease != lease
            && let Some(l) = self.leases.get_mut(&old_lease)
        {
            l.keys.remove(key);
        }
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.insert(key.to_owned());
        }
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: revision,
            version,
            lease,
        };
        self.kvs.insert(key.to_owned(), kv.clone());
        Event::Put(kv)
    }

    fn apply_delete(&mut self, key: &str, revision: Revision) -> Option<Event> {
        let kv = self.kvs.remove(key)?;
        if let Some(l) = self.leases.get_mut(&kv.lease) {
            l.keys.remove(key);
        }
        Some(Event::Delete {
            key: key.to_owned(),
            revision,
        })
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<(), StoreError> {
        match lease {
            Some(id) if !self.leases.contains_key(&id) => Err(StoreError::LeaseNotFound(id)),
            _ => Ok(()),
        }
    }

    /// Applies writes at one new revision (none if nothing changes).
    fn apply(&mut self, ops: Vec<TxnOp>) -> Result<Revision, StoreError> {
        for op in &ops {
            if let TxnOp::Put { lease, key, .. } = op {
                if key.is_empty() {
                    return Err(StoreError::Invalid("empty key".into()));
                }
                self.check_lease(*lease)?;
            }
        }
        let revision = self.revision + 1;
        let mut events = Vec::new();
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => {
                    events.push(self.apply_put(&key, value, lease, revision))
                }
                TxnOp::Delete { key } => events.extend(self.apply_delete(&key, revision)),
            }
        }
        if !events.is_empty() {
            self.revision = revision;
            self.record(events);
        }
        Ok(self.revision)
    }

    fn revoke(&mut self, id: LeaseId) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        let ops = lease
            .keys
            .into_iter()
            .map(|key| TxnOp::Delete { key })
            .collect();
        // Deletes cannot fail.
        let _ = self.apply(ops);
        true
    }

    fn expire_leases(&mut self, now: Instant) {
        let expired: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            tracing::debug!(lease = id, "lease expired");
            self.revoke(id);
        }
    }
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Store for MemStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.state().kvs.get(key).cloned())
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
        let mut state = self.state();
        let existed = state.kvs.contains_key(key);
        state.apply(vec![TxnOp::Delete {
            key: key.to_owned(),
        }])?;
        Ok(existed)
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let state = self.state();
        let kvs = state
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok((kvs, state.revision))
    }

    async fn watch(
        &self,
        prefix: &str,
        start: Option<Revision>,
    ) -> Result<WatchStream, StoreError> {
        let mut state = self.state();
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let mut from = state.revision;
        if let Some(start) = start.filter(|&s| s <= state.revision) {
            from = start - 1;
            let oldest = state
                .history
                .front()
                .map_or(state.revision + 1, Event::revision);
            if start < oldest {
                return Err(StoreError::Compacted {
                    requested: start,
                    oldest,
                });
            }
            let backlog: Vec<Event> = state
                .history
                .iter()
                .filter(|e| e.revision() >= start && e.key().starts_with(prefix))
                .cloned()
                .collect();
            if !backlog.is_empty() {
                // The channel is new and empty, so this cannot fail.
                let _ = tx.try_send(Ok(backlog));
            }
        }
        state.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            tx,
        });
        Ok(WatchStream::new(rx, from))
    }

    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("a lease needs a TTL above zero".into()));
        }
        let mut state = self.state();
        state.next_lease += 1;
        let id = state.next_lease;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        Ok(id)
    }

    async fn lease_keepalive(&self, id: LeaseId) -> Result<(), StoreError> {
        let mut state = self.state();
        let lease = state
            .leases
            .get_mut(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        lease.deadline = Instant::now() + lease.ttl;
        Ok(())
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
        let mut state = self.state();
        let holds = compare.iter().all(|c| {
            let current = state.kvs.get(&c.key).map_or(0, |kv| kv.mod_revision);
            current == c.mod_revision
        });
        state.apply(if holds { success } else { failure })?;
        Ok(holds)
    }
}

//! The state machine both embedded stores share: keys with etcd's bookkeeping,
//! the revision counter, a bounded history for watchers that resume from an
//! older revision, leases and their keys, and the live watchers.
//!
//! [`crate::MemStore`] drives it directly; [`crate::EmbeddedStore`] drives it
//! with the commands of its Raft log, in log order, so every node computes the
//! same revisions. Nothing here reads the clock: lease deadlines are passed in.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::store::{Compare, Event, KeyValue, LeaseId, Revision, StoreError, TxnOp, WatchStream};

/// Changes kept for watchers that resume from an older revision.
pub(crate) const HISTORY: usize = 65_536;
/// Batches a watcher may have queued before it is cut off as lagging.
const WATCH_QUEUE: usize = 1024;

pub(crate) struct Lease {
    pub(crate) ttl: Duration,
    /// When the lease expires unless kept alive. Local to this process: a Raft
    /// follower keeps one too, but only the leader acts on it.
    pub(crate) deadline: Instant,
    pub(crate) keys: BTreeSet<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Result<Vec<Event>, StoreError>>,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) revision: Revision,
    pub(crate) kvs: BTreeMap<String, KeyValue>,
    pub(crate) history: VecDeque<Event>,
    pub(crate) leases: HashMap<LeaseId, Lease>,
    /// The last lease id handed out.
    pub(crate) next_lease: LeaseId,
    watchers: Vec<Watcher>,
}

impl State {
    /// Remembers `events` (all at the current revision) and hands them to the
    /// watchers whose prefix they fall under.
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
    pub(crate) fn apply(&mut self, ops: Vec<TxnOp>) -> Result<Revision, StoreError> {
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

    /// Deletes `key`; says whether it existed.
    pub(crate) fn delete(&mut self, key: &str) -> bool {
        let existed = self.kvs.contains_key(key);
        // Deletes cannot fail.
        let _ = self.apply(vec![TxnOp::Delete {
            key: key.to_owned(),
        }]);
        existed
    }

    /// Applies `success` if every comparison holds, else `failure`; says which.
    pub(crate) fn txn(
        &mut self,
        compare: &[Compare],
        success: Vec<TxnOp>,
        failure: Vec<TxnOp>,
    ) -> Result<bool, StoreError> {
        let holds = compare.iter().all(|c| {
            let current = self.kvs.get(&c.key).map_or(0, |kv| kv.mod_revision);
            current == c.mod_revision
        });
        self.apply(if holds { success } else { failure })?;
        Ok(holds)
    }

    /// Hands out the next lease id, with its deadline `ttl` after `now`.
    pub(crate) fn grant(&mut self, ttl: Duration, now: Instant) -> LeaseId {
        self.next_lease += 1;
        let id = self.next_lease;
        self.leases.insert(
            id,
            Lease {
                ttl,
                deadline: now + ttl,
                keys: BTreeSet::new(),
            },
        );
        id
    }

    /// Restarts the lease's TTL from `now`.
    pub(crate) fn keepalive(&mut self, id: LeaseId, now: Instant) -> Result<(), StoreError> {
        let lease = self
            .leases
            .get_mut(&id)
            .ok_or(StoreError::LeaseNotFound(id))?;
        lease.deadline = now + lease.ttl;
        Ok(())
    }

    /// Restarts every lease's TTL from `now` (a new Raft leader does this: the
    /// old leader's deadlines died with it).
    pub(crate) fn restart_leases(&mut self, now: Instant) {
        for lease in self.leases.values_mut() {
            lease.deadline = now + lease.ttl;
        }
    }

    /// Ends the lease, deleting its keys; false if it did not exist.
    pub(crate) fn revoke(&mut self, id: LeaseId) -> bool {
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

    /// The leases whose deadline has passed at `now`.
    pub(crate) fn expired(&self, now: Instant) -> Vec<LeaseId> {
        let mut ids: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Revokes every lease expired at `now`.
    pub(crate) fn expire_leases(&mut self, now: Instant) {
        for id in self.expired(now) {
            tracing::debug!(lease = id, "lease expired");
            self.revoke(id);
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<KeyValue> {
        self.kvs.get(key).cloned()
    }

    /// Every key under `prefix`, in key order, and the revision.
    pub(crate) fn list(&self, prefix: &str) -> (Vec<KeyValue>, Revision) {
        let kvs = self
            .kvs
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect();
        (kvs, self.revision)
    }

    /// Changes under `prefix` from revision `start` (None: from now on): the
    /// backlog from the history, then every new change.
    pub(crate) fn watch(
        &mut self,
        prefix: &str,
        start: Option<Revision>,
    ) -> Result<WatchStream, StoreError> {
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        let mut from = self.revision;
        if let Some(start) = start.filter(|&s| s <= self.revision) {
            from = start - 1;
            let oldest = self
                .history
                .front()
                .map_or(self.revision + 1, Event::revision);
            if start < oldest {
                return Err(StoreError::Compacted {
                    requested: start,
                    oldest,
                });
            }
            let backlog: Vec<Event> = self
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
        self.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            tx,
        });
        Ok(WatchStream::new(rx, from))
    }

    /// Ends every watch (the store is going away; their clients resume elsewhere).
    pub(crate) fn close_watchers(&mut self) {
        self.watchers.clear();
    }

    /// Replaces the data (not the watchers) with a snapshot's. Watchers are cut
    /// off as lagging: changes between the old and new state never reach them,
    /// so they must resume (and may find the revision compacted).
    pub(crate) fn restore(&mut self, from: State) {
        let watchers = std::mem::take(&mut self.watchers);
        let revision = self.revision;
        *self = from;
        for w in watchers {
            let _ = w.tx.try_send(Err(StoreError::WatchLagged(revision)));
        }
    }
}

//! A process's membership in the cluster: its [`InstanceInfo`] under a lease,
//! kept alive in the background for as long as the process serves.
//!
//! The registration outlives store outages: while the store is unreachable the
//! keeper retries, and once the store answers again it renews the lease or, if
//! the lease expired meanwhile, grants a new one and writes the value again.
//! The process keeps serving throughout; only its visibility to routers lapses.

use std::time::Duration;

use tandem_protocol::{InstanceInfo, WorkerState, keys};
use tokio::sync::{mpsc, oneshot, watch};

use crate::store::{LeaseId, Store, StoreError};

/// The default lease TTL of a registration.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// Longest wait between attempts while the store is unreachable.
const MAX_RETRY: Duration = Duration::from_secs(1);

enum Command {
    SetState(WorkerState, oneshot::Sender<Result<(), StoreError>>),
    Deregister(oneshot::Sender<Result<(), StoreError>>),
}

/// A live registration. Dropping it stops the keepalives (the lease then
/// expires and the key disappears); [`Registration::deregister`] removes the
/// key at once.
#[derive(Debug)]
pub struct Registration {
    key: String,
    commands: mpsc::Sender<Command>,
    lease: watch::Receiver<Option<LeaseId>>,
    task: tokio::task::JoinHandle<()>,
}

/// The background keeper: owns the lease and the value.
struct Keeper<S> {
    store: S,
    key: String,
    info: InstanceInfo,
    ttl: Duration,
    lease: Option<LeaseId>,
    published: watch::Sender<Option<LeaseId>>,
    /// The last attempt failed: the store was unreachable.
    failing: bool,
}

impl Registration {
    /// Registers `info` at [`keys::instance`] under a lease of `ttl` and keeps
    /// it alive (every `ttl / 3`) in a background task.
    ///
    /// The first attempt happens before this returns; if the store is
    /// unreachable the error is logged and the keeper goes on retrying, so a
    /// process can start before its store does. Errors only for a TTL under
    /// one second (too short to keep alive reliably).
    pub async fn start<S: Store>(
        store: S,
        cluster: &str,
        info: InstanceInfo,
        ttl: Duration,
    ) -> Result<Self, StoreError> {
        if ttl < Duration::from_secs(1) {
            return Err(StoreError::Invalid(format!(
                "registration lease TTL {ttl:?} is under one second"
            )));
        }
        let key = keys::instance(cluster, info.role, &info.id);
        let (published, lease) = watch::channel(None);
        let mut keeper = Keeper {
            store,
            key: key.clone(),
            info,
            ttl,
            lease: None,
            published,
            failing: false,
        };
        keeper.register().await;
        let (commands, rx) = mpsc::channel(8);
        let task = tokio::spawn(keeper.run(rx));
        Ok(Self {
            key,
            commands,
            lease,
            task,
        })
    }

    /// The store key the registration lives at.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease the key is attached to now (None while unregistered: the
    /// store is unreachable and the old lease has expired).
    pub fn lease(&self) -> Option<LeaseId> {
        *self.lease.borrow()
    }

    /// Waits until the registration holds a lease different from `old`
    /// (a fresh registration after the old one was lost).
    pub async fn wait_for_lease_change(&mut self, old: Option<LeaseId>) -> Option<LeaseId> {
        let changed = self
            .lease
            .wait_for(|l| l.is_some() && *l != old)
            .await
            .map(|l| *l);
        changed.ok().flatten()
    }

    /// Rewrites the registration with a new state (routers stop sending new
    /// work to a draining worker). If the store is unreachable the new value
    /// is written once it is back, and the error says so now.
    pub async fn set_state(&self, state: WorkerState) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::SetState(state, tx))
            .await
            .map_err(|_| StoreError::Unavailable("the registration keeper stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the registration keeper stopped".into()))?
    }

    /// Revokes the lease, deleting the key, and stops the keeper.
    pub async fn deregister(self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Deregister(tx))
            .await
            .map_err(|_| StoreError::Unavailable("the registration keeper stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the registration keeper stopped".into()))?
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<S: Store> Keeper<S> {
    fn value(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(&self.info)
            .map_err(|e| StoreError::Invalid(format!("registration of {}: {e}", self.key)))
    }

    fn set_lease(&mut self, lease: Option<LeaseId>) {
        self.lease = lease;
        self.published.send_replace(lease);
    }

    /// Logs a failed attempt, loudly only on the first of a run of failures.
    fn failed(&mut self, what: &str, e: &StoreError) {
        if self.failing {
            tracing::debug!(key = %self.key, error = %e, "{what} failed again");
        } else {
            tracing::warn!(key = %self.key, error = %e, "{what} failed; retrying");
        }
        self.failing = true;
    }

    fn recovered(&mut self) {
        if self.failing {
            tracing::info!(key = %self.key, "store reachable again; registration restored");
        }
        self.failing = false;
    }

    /// Grants a lease and writes the value under it.
    async fn register(&mut self) {
        let lease = match self.store.lease_grant(self.ttl).await {
            Ok(l) => l,
            Err(e) => return self.failed("granting a registration lease", &e),
        };
        let put = match self.value() {
            Ok(v) => self.store.put(&self.key, v, Some(lease)).await,
            Err(e) => Err(e),
        };
        match put {
            Ok(_) => {
                self.recovered();
                tracing::debug!(key = %self.key, lease, "registered");
                self.set_lease(Some(lease));
            }
            Err(e) => {
                // Do not leave an orphan lease behind (best effort: it expires anyway).
                let _ = self.store.lease_revoke(lease).await;
                self.failed("writing the registration", &e);
            }
        }
    }

    /// Renews the lease, and restores the key if it vanished under a live lease.
    async fn keep_alive(&mut self, lease: LeaseId) {
        match self.store.lease_keepalive(lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseNotFound(_)) => {
                tracing::warn!(key = %self.key, lease, "registration lease expired; registering again");
                self.set_lease(None);
                return self.register().await;
            }
            Err(e) => return self.failed("renewing the registration lease", &e),
        }
        let value = match self.value() {
            Ok(v) => v,
            Err(e) => return self.failed("encoding the registration", &e),
        };
        match self.store.get(&self.key).await {
            Ok(Some(kv)) if kv.lease == lease && kv.value == value => self.recovered(),
            Ok(_) => self.write(lease, value).await,
            Err(e) => self.failed("reading the registration", &e),
        }
    }

    async fn write(&mut self, lease: LeaseId, value: Vec<u8>) {
        match self.store.put(&self.key, value, Some(lease)).await {
            Ok(_) => self.recovered(),
            Err(StoreError::LeaseNotFound(_)) => {
                self.set_lease(None);
                self.register().await;
            }
            Err(e) => self.failed("writing the registration", &e),
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            let wait = if self.failing || self.lease.is_none() {
                (self.ttl / 3).min(MAX_RETRY)
            } else {
                self.ttl / 3
            };
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(Command::SetState(state, reply)) => {
                        self.info.state = state;
                        let result = self.rewrite().await;
                        let _ = reply.send(result);
                    }
                    Some(Command::Deregister(reply)) => {
                        let result = match self.lease {
                            Some(lease) => match self.store.lease_revoke(lease).await {
                                Err(StoreError::LeaseNotFound(_)) => Ok(()),
                                other => other,
                            },
                            None => Ok(()),
                        };
                        self.set_lease(None);
                        let _ = reply.send(result);
                        return;
                    }
                    // The handle is gone: stop renewing and let the lease expire.
                    None => return,
                },
                () = tokio::time::sleep(wait) => match self.lease {
                    Some(lease) => self.keep_alive(lease).await,
                    None => self.register().await,
                },
            }
        }
    }

    /// Writes the current value now; on failure the next tick writes it.
    async fn rewrite(&mut self) -> Result<(), StoreError> {
        let Some(lease) = self.lease else {
            self.register().await;
            return match self.lease {
                Some(_) => Ok(()),
                None => Err(StoreError::Unavailable(format!(
                    "{} is not registered; the new state is written once the store answers",
                    self.key
                ))),
            };
        };
        let value = self.value()?;
        match self.store.put(&self.key, value, Some(lease)).await {
            Ok(_) => Ok(()),
            Err(StoreError::LeaseNotFound(_)) => {
                self.set_lease(None);
                self.register().await;
                Ok(())
            }
            Err(e) => {
                self.failed("writing the registration", &e);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;
    use tandem_protocol::Role;

    fn info(id: &str) -> InstanceInfo {
        InstanceInfo {
            id: id.into(),
            role: Role::Decode,
            model: "m".into(),
            grpc_addr: "http://127.0.0.1:1".into(),
            http_addr: "127.0.0.1:2".into(),
            kv_addr: None,
            kv_server_name: None,
            kv_blocks: 8,
            max_sequences: 2,
            state: WorkerState::Serving,
            version: "0".into(),
        }
    }

    async fn read(store: &MemStore, key: &str) -> Option<InstanceInfo> {
        let kv = store.get(key).await.expect("get")?;
        Some(InstanceInfo::from_json(key, &kv.value).expect("valid JSON"))
    }

    async fn wait_gone(store: &MemStore, key: &str, within: Duration) {
        let start = tokio::time::Instant::now();
        while read(store, key).await.is_some() {
            assert!(start.elapsed() < within, "{key} still registered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn registers_renews_and_expires_when_keepalive_stops() {
        let store = MemStore::new();
        let ttl = Duration::from_secs(1);
        let reg = Registration::start(store.clone(), "c", info("d0"), ttl)
            .await
            .expect("start");
        let key = keys::instance("c", Role::Decode, "d0");
        assert_eq!(reg.key(), key);
        assert!(reg.lease().is_some());
        // Kept alive well past its TTL.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(read(&store, &key).await, Some(info("d0")));

        reg.set_state(WorkerState::Draining).await.expect("state");
        let got = read(&store, &key).await.expect("registered");
        assert_eq!(got.state, WorkerState::Draining);

        // The keeper stops with the handle: the lease runs out.
        drop(reg);
        wait_gone(&store, &key, Duration::from_secs(3)).await;
    }

    #[tokio::test]
    async fn registers_again_after_the_key_or_lease_vanished_and_deregisters() {
        let store = MemStore::new();
        let ttl = Duration::from_secs(1);
        let mut reg = Registration::start(store.clone(), "c", info("d1"), ttl)
            .await
            .expect("start");
        let key = reg.key().to_owned();

        // The key is deleted under a live lease: it comes back.
        assert!(store.delete(&key).await.expect("delete"));
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(read(&store, &key).await, Some(info("d1")));

        // The lease is lost (as after a long outage): a new one is granted.
        let old = reg.lease();
        store
            .lease_revoke(old.expect("a lease"))
            .await
            .expect("revoke");
        assert_eq!(read(&store, &key).await, None);
        let new = tokio::time::timeout(Duration::from_secs(3), reg.wait_for_lease_change(old))
            .await
            .expect("registered again in time");
        assert!(new.is_some() && new != old);
        assert_eq!(read(&store, &key).await, Some(info("d1")));
        assert_eq!(
            store.get(&key).await.expect("get").expect("kv").lease,
            new.expect("lease")
        );

        reg.deregister().await.expect("deregister");
        assert_eq!(read(&store, &key).await, None);
    }
}

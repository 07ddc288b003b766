//! Following the cluster's membership in the store, loading the models its
//! workers serve, and keeping the router's own registration alive.

use std::sync::Arc;
use std::time::Duration;

use tandem_control_plane::{Event, Registration, Store, StoreError};
use tandem_protocol::{InstanceInfo, keys};
use tokio::sync::watch;

use super::cluster::{Cluster, Model, parse_card, parse_instance};

/// A registration's time to live.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(10);
/// Longest wait between attempts to reach the store.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

fn next_backoff(b: Duration) -> Duration {
    (b * 2).min(MAX_BACKOFF)
}

/// Lists then watches the cluster's instances until `stop` fires. When the store
/// is unreachable the last known membership stays in force; a watch that cannot
/// resume (history compacted) is replaced by a fresh list.
pub(crate) async fn follow_membership<S: Store + Clone>(
    store: S,
    cluster: Arc<Cluster>,
    cluster_name: String,
    mut stop: watch::Receiver<bool>,
) {
    let prefix = keys::instances(&cluster_name);
    let mut backoff = Duration::from_millis(100);
    loop {
        let began = tokio::time::Instant::now();
        let attempt = list_and_watch(&store, &cluster, &cluster_name, &prefix);
        tokio::select! {
            e = attempt => {
                tracing::warn!(error = %e, "lost the store's membership feed; serving on the last known workers");
            }
            _ = stop.changed() => return,
        }
        if began.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = next_backoff(backoff);
    }
}

/// One list of the instances and the watch that follows it; returns the error
/// that ended the watch.
async fn list_and_watch<S: Store + Clone>(
    store: &S,
    cluster: &Arc<Cluster>,
    cluster_name: &str,
    prefix: &str,
) -> StoreError {
    let (kvs, revision) = match store.list(prefix).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    let listed: Vec<(String, InstanceInfo)> = kvs
        .iter()
        .filter_map(|kv| parse_instance(&kv.key, &kv.value).map(|i| (kv.key.clone(), i)))
        .collect();
    tracing::debug!(instances = listed.len(), revision, "listed the cluster");
    for model in cluster.reconcile(listed) {
        spawn_model_load(
            store.clone(),
            cluster.clone(),
            cluster_name.to_owned(),
            model,
        );
    }
    let mut watch = match store.watch(prefix, Some(revision + 1)).await {
        Ok(w) => w,
        Err(e) => return e,
    };
    loop {
        match watch.next().await {
            Ok(Event::Put(kv)) => {
                if let Some(info) = parse_instance(&kv.key, &kv.value)
                    && let Some(model) = cluster.upsert(&kv.key, info)
                {
                    spawn_model_load(
                        store.clone(),
                        cluster.clone(),
                        cluster_name.to_owned(),
                        model,
                    );
                }
            }
            Ok(Event::Delete { key, .. }) => cluster.remove(&key),
            Err(e) => return e,
        }
    }
}

/// Loads a model's tokenizer from its card, retrying while some worker serves it.
fn spawn_model_load<S: Store>(
    store: S,
    cluster: Arc<Cluster>,
    cluster_name: String,
    model: String,
) {
    tokio::spawn(async move {
        let key = keys::model(&cluster_name, &model);
        let mut backoff = Duration::from_millis(200);
        loop {
            let loaded = match store.get(&key).await {
                Ok(Some(kv)) => match parse_card(&kv.key, &kv.value) {
                    Ok(card) => tokio::task::spawn_blocking(move || Model::load(&card))
                        .await
                        .unwrap_or_else(|e| Err(format!("loading the tokenizer panicked: {e}"))),
                    Err(e) => Err(e),
                },
                Ok(None) => Err(format!("no model card at {key}")),
                Err(e) => Err(format!("reading {key}: {e}")),
            };
            match loaded {
                Ok(m) => {
                    tracing::info!(model = %model, "model ready");
                    cluster.model_loaded(&model, Some(m));
                    return;
                }
                Err(e) => tracing::warn!(model = %model, error = %e, "cannot load model yet"),
            }
            tokio::time::sleep(backoff).await;
            backoff = next_backoff(backoff);
            if !cluster.model_wanted(&model) {
                cluster.model_loaded(&model, None);
                return;
            }
        }
    });
}

/// Keeps the router registered (the control plane's [`Registration`]: renewed
/// every TTL/3, registered again after a lost lease or a store outage) until
/// `stop` fires, then revokes the lease.
pub(crate) async fn keep_registered<S: Store>(
    store: S,
    cluster: String,
    info: InstanceInfo,
    ttl: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let registration = match Registration::start(store, &cluster, info, ttl).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the router");
            return;
        }
    };
    // A changed value or a dropped sender: either way the router stops.
    let _ = stop.changed().await;
    match registration.deregister().await {
        Ok(()) => tracing::info!("router deregistered"),
        Err(e) => tracing::warn!(error = %e, "cannot deregister; the lease will expire"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_control_plane::MemStore;
    use tandem_protocol::{Role, WorkerState};

    fn router_info() -> InstanceInfo {
        InstanceInfo {
            id: "r0".into(),
            role: Role::Router,
            model: String::new(),
            grpc_addr: String::new(),
            http_addr: "127.0.0.1:8080".into(),
            kv_addr: None,
            kv_server_name: None,
            kv_blocks: 0,
            max_sequences: 0,
            state: WorkerState::Serving,
            version: "test".into(),
        }
    }

    #[tokio::test]
    async fn registration_survives_a_lost_lease_and_is_revoked_at_stop() {
        let store = MemStore::new();
        let key = keys::instance("c", Role::Router, "r0");
        let (stop, stopped) = watch::channel(false);
        // The shortest TTL a registration takes.
        let ttl = Duration::from_secs(1);
        let task = tokio::spawn(keep_registered(
            store.clone(),
            "c".to_owned(),
            router_info(),
            ttl,
            stopped,
        ));
        let registered = || async {
            store
                .get(&key)
                .await
                .expect("store")
                .map(|kv| (kv.lease, InstanceInfo::from_json(&kv.key, &kv.value)))
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (lease, info) = registered().await.expect("registered");
        assert_eq!(info, Ok(router_info()));
        // Kept alive well past the TTL.
        tokio::time::sleep(ttl * 4).await;
        assert_eq!(registered().await.map(|r| r.0), Some(lease));
        // The lease is lost (e.g. the store restarted): the router registers again.
        store.lease_revoke(lease).await.expect("revoked");
        assert!(registered().await.is_none());
        tokio::time::sleep(ttl).await;
        let (again, _) = registered().await.expect("registered again");
        assert_ne!(again, lease);
        stop.send(true).expect("task listens");
        task.await.expect("task ends");
        assert!(registered().await.is_none(), "revoked at stop");
    }
}

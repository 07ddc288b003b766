//! A registration through a store served over gRPC, across an outage of the
//! store server: the lease runs out meanwhile, and once the server is back
//! the registration comes back with a new lease by itself.

use std::net::SocketAddr;
use std::time::Duration;

use tandem_control_plane::{MemStore, Registration, RemoteStore, Store, serve};
use tandem_protocol::{InstanceInfo, Role, WorkerState, keys};
use tokio::sync::oneshot;

fn info() -> InstanceInfo {
    InstanceInfo {
        id: "p0".into(),
        role: Role::Prefill,
        model: "m".into(),
        grpc_addr: "https://127.0.0.1:1".into(),
        http_addr: "127.0.0.1:2".into(),
        kv_addr: None,
        kv_server_name: None,
        kv_blocks: 4,
        max_sequences: 1,
        state: WorkerState::Serving,
        version: "0".into(),
    }
}

/// Serves `store` on `addr` until the sender fires.
async fn start_server(
    store: &MemStore,
    addr: SocketAddr,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    SocketAddr,
) {
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let bound = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(store.clone(), listener, async move {
        let _ = rx.await;
    }));
    (tx, task, bound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_survives_a_store_outage() {
    let store = MemStore::new();
    let (stop, task, addr) = start_server(&store, "127.0.0.1:0".parse().expect("addr")).await;
    let remote = RemoteStore::connect(&format!("http://{addr}")).expect("client");
    let mut reg = Registration::start(remote, "c", info(), Duration::from_secs(1))
        .await
        .expect("start");
    let key = keys::instance("c", Role::Prefill, "p0");
    let first = reg.lease();
    assert!(first.is_some(), "registered at once");
    assert!(store.get(&key).await.expect("get").is_some());

    // The store server goes away for longer than the lease's TTL.
    let _ = stop.send(());
    task.await.expect("server task").expect("server stops");
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(
        store.get(&key).await.expect("get").is_none(),
        "the lease expired during the outage"
    );
    // Setting the state while the store is down says so, and is not lost.
    let e = reg.set_state(WorkerState::Draining).await;
    assert!(e.is_err(), "the store is down: {e:?}");

    // Back on the same address: the registration returns by itself.
    let (stop, task, _) = start_server(&store, addr).await;
    let new = tokio::time::timeout(Duration::from_secs(10), reg.wait_for_lease_change(first))
        .await
        .expect("registered again in time");
    assert!(new.is_some() && new != first);
    let kv = store
        .get(&key)
        .await
        .expect("get")
        .expect("registered again");
    assert_eq!(Some(kv.lease), new);
    let back = InstanceInfo::from_json(&key, &kv.value).expect("JSON");
    assert_eq!(back.state, WorkerState::Draining, "the state set meanwhile");

    reg.deregister().await.expect("deregister");
    assert!(store.get(&key).await.expect("get").is_none());
    let _ = stop.send(());
    task.await.expect("server task").expect("server stops");
}

//! One suite, run against every store: the in-memory `MemStore` directly and the
//! same store served over gRPC on loopback through `RemoteStore` (the suite is
//! in `common`; `etcd.rs` runs it against a real etcd, `raft.rs` against the
//! Raft-replicated `EmbeddedStore`).

use std::time::Duration;

mod common;

use common::{next, serve_until_stopped, suite};
use tandem_control_plane::{MemStore, RemoteStore, Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Serves `store` on a loopback port; the sender stops the server.
async fn served(store: MemStore, port: u16) -> (u16, oneshot::Sender<()>) {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    (port, serve_until_stopped(store, listener))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms() {
    suite(&MemStore::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_store_conforms() {
    let (port, _stop) = served(MemStore::new(), 0).await;
    let remote = RemoteStore::connect(&format!("http://127.0.0.1:{port}")).expect("client");
    suite(&remote).await;
}

/// A watcher whose store goes away and comes back sees every change, in order,
/// including those made while it was disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_watch_resumes_after_the_store_returns() {
    let store = MemStore::new();
    let (port, stop) = served(store.clone(), 0).await;
    let remote = RemoteStore::connect(&format!("http://127.0.0.1:{port}")).expect("client");
    let mut w = remote.watch("/m/", None).await.expect("watch");
    let r1 = remote.put("/m/1", b"a".to_vec(), None).await.expect("put");
    assert_eq!(next(&mut w).await.revision(), r1);

    stop.send(()).expect("stop the server");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(matches!(
        remote.get("/m/1").await,
        Err(StoreError::Unavailable(_))
    ));
    // Changes while the watcher is cut off.
    let missed: Vec<i64> = {
        let mut revs = Vec::new();
        for i in 2..5 {
            revs.push(
                store
                    .put(&format!("/m/{i}"), b"b".to_vec(), None)
                    .await
                    .expect("put"),
            );
        }
        revs
    };
    let (_, _stop) = served(store.clone(), port).await;
    for want in missed {
        assert_eq!(next(&mut w).await.revision(), want);
    }
    let r5 = remote.put("/m/5", b"c".to_vec(), None).await.expect("put");
    assert_eq!(next(&mut w).await.revision(), r5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_forgotten_revision_is_refused() {
    let store = MemStore::new();
    // More changes than the history keeps.
    for i in 0..70_000 {
        store
            .put(&format!("/x/{}", i % 10), b"1".to_vec(), None)
            .await
            .expect("put");
    }
    let (port, _stop) = served(store.clone(), 0).await;
    let remote = RemoteStore::connect(&format!("http://127.0.0.1:{port}")).expect("client");
    for result in [
        store.watch("/x/", Some(1)).await,
        remote.watch("/x/", Some(1)).await,
    ] {
        match result {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!(requested, 1);
                assert!(oldest > 1);
            }
            Err(e) => panic!("expected Compacted, got {e}"),
            Ok(_) => panic!("expected Compacted, got a watch"),
        }
    }
    assert!(matches!(
        RemoteStore::connect("not a url"),
        Err(StoreError::Invalid(_))
    ));
}

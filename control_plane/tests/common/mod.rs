//! The conformance suite every `Store` must pass, shared by the test binaries
//! that run it against each implementation (`conformance.rs`: the in-memory
//! and the gRPC-served store; `etcd.rs`: a real etcd; `raft.rs`: the Raft store
//! with one node and with three), and the helpers those binaries share.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tandem_control_plane::{Compare, Event, Served, Store, StoreError, TxnOp, WatchStream, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::timeout;

/// How long a test waits for a change it expects.
pub const WAIT: Duration = Duration::from_secs(5);

/// The next change on `w`, failing the test after [`WAIT`].
pub async fn next(w: &mut WatchStream) -> Event {
    timeout(WAIT, w.next())
        .await
        .expect("a change within 5 s")
        .expect("watch open")
}

/// A fresh directory path `{prefix}-{pid}-{n}`, nothing left in it: on tmpfs
/// when there is one (the stores fsync every write), else in the temp dir.
#[allow(dead_code, reason = "etcd.rs and raft.rs only")]
pub fn scratch_dir(prefix: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Serves `store`'s client API on `listener` until the sender fires or drops.
#[allow(dead_code, reason = "conformance.rs and raft.rs only")]
pub fn serve_until_stopped(store: impl Served, listener: TcpListener) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        serve(store, listener, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve");
    });
    stop
}

/// One compare-and-swap increment of the number at `key`: whether it won
/// (false: another writer changed it first).
pub async fn try_increment(s: &impl Store, key: &str) -> bool {
    let kv = s.get(key).await.expect("get").expect("present");
    let n: u64 = String::from_utf8_lossy(&kv.value).parse().expect("number");
    s.txn(
        vec![Compare {
            key: kv.key.clone(),
            mod_revision: kv.mod_revision,
        }],
        vec![TxnOp::Put {
            key: kv.key,
            value: (n + 1).to_string().into_bytes(),
            lease: None,
        }],
        vec![],
    )
    .await
    .expect("txn")
}

async fn keys_and_revisions(s: &impl Store) {
    let r1 = s.put("/t/a", b"1".to_vec(), None).await.expect("put");
    let r2 = s.put("/t/b", b"2".to_vec(), None).await.expect("put");
    let r3 = s.put("/t/a", b"3".to_vec(), None).await.expect("put");
    assert!(r1 < r2 && r2 < r3, "revisions grow: {r1} {r2} {r3}");
    let a = s.get("/t/a").await.expect("get").expect("present");
    assert_eq!(
        (
            a.value.as_slice(),
            a.create_revision,
            a.mod_revision,
            a.version
        ),
        (&b"3"[..], r1, r3, 2)
    );
    s.put("/u/x", b"other".to_vec(), None).await.expect("put");
    let (kvs, rev) = s.list("/t/").await.expect("list");
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/a", "/t/b"]);
    assert!(rev > r3);
    assert!(s.delete("/t/b").await.expect("delete"));
    assert!(!s.delete("/t/b").await.expect("delete again"));
    assert_eq!(s.get("/t/b").await.expect("get"), None);
    assert!(matches!(
        s.put("", b"x".to_vec(), None).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn watch_replays_from_a_revision_then_follows(s: &impl Store) {
    let r1 = s.put("/w/1", b"a".to_vec(), None).await.expect("put");
    s.put("/elsewhere", b"-".to_vec(), None).await.expect("put");
    let r2 = s.put("/w/2", b"b".to_vec(), None).await.expect("put");
    let mut w = s.watch("/w/", Some(r1)).await.expect("watch");
    assert_eq!(w.starts_after(), r1 - 1);
    assert_eq!(next(&mut w).await.revision(), r1);
    assert_eq!(next(&mut w).await.revision(), r2);
    s.delete("/w/1").await.expect("delete");
    match next(&mut w).await {
        Event::Delete { key, revision } => assert!(key == "/w/1" && revision > r2),
        other => panic!("expected the delete, got {other:?}"),
    }
    let mut live = s.watch("/w/", None).await.expect("watch");
    let r4 = s.put("/w/3", b"c".to_vec(), None).await.expect("put");
    assert_eq!(next(&mut live).await.revision(), r4);
    assert_eq!(next(&mut w).await.revision(), r4);
}

async fn lease_expires_when_its_holder_stops(s: &impl Store) {
    let lease = s
        .lease_grant(Duration::from_millis(400))
        .await
        .expect("grant");
    s.put("/l/worker", b"up".to_vec(), Some(lease))
        .await
        .expect("put");
    let mut w = s.watch("/l/", None).await.expect("watch");
    // Kept alive past several TTLs, the key stays.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.lease_keepalive(lease).await.expect("keepalive");
    }
    assert!(s.get("/l/worker").await.expect("get").is_some());
    // The holder stops: the key goes, and watchers see it go.
    match next(&mut w).await {
        Event::Delete { key, .. } => assert_eq!(key, "/l/worker"),
        other => panic!("expected the expiry, got {other:?}"),
    }
    assert_eq!(s.get("/l/worker").await.expect("get"), None);
    assert_eq!(
        s.lease_keepalive(lease).await,
        Err(StoreError::LeaseNotFound(lease))
    );
    assert!(matches!(
        s.put("/l/late", b"x".to_vec(), Some(lease)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    // Revoking deletes at once.
    let lease = s.lease_grant(Duration::from_secs(60)).await.expect("grant");
    s.put("/l/a", b"1".to_vec(), Some(lease))
        .await
        .expect("put");
    s.lease_revoke(lease).await.expect("revoke");
    assert_eq!(s.get("/l/a").await.expect("get"), None);
}

async fn compare_and_swap_is_atomic(s: &(impl Store + Clone)) {
    s.put("/c/counter", b"0".to_vec(), None).await.expect("put");
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                for _ in 0..15 {
                    // Retried until this writer's increment wins.
                    while !try_increment(&s, "/c/counter").await {}
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let kv = s.get("/c/counter").await.expect("get").expect("present");
    assert_eq!(kv.value, b"90");
    // Create-if-absent: only the first of two succeeds.
    let absent = || Compare {
        key: "/c/leader".into(),
        mod_revision: 0,
    };
    let claim = |who: &str| TxnOp::Put {
        key: "/c/leader".into(),
        value: who.as_bytes().to_vec(),
        lease: None,
    };
    assert!(
        s.txn(vec![absent()], vec![claim("a")], vec![])
            .await
            .expect("txn")
    );
    assert!(
        !s.txn(vec![absent()], vec![claim("b")], vec![])
            .await
            .expect("txn")
    );
    let leader = s.get("/c/leader").await.expect("get").expect("present");
    assert_eq!(leader.value, b"a");
}

/// Runs the whole suite against `s`, which must start empty.
pub async fn suite(s: &(impl Store + Clone)) {
    keys_and_revisions(s).await;
    watch_replays_from_a_revision_then_follows(s).await;
    lease_expires_when_its_holder_stops(s).await;
    compare_and_swap_is_atomic(s).await;
    campaign_elects_one_leader_per_lease(s).await;
}

/// One of several campaigners wins; the key is the winner's until its lease
/// ends, and then another campaign wins.
async fn campaign_elects_one_leader_per_lease(s: &(impl Store + Clone)) {
    let mut leases = Vec::new();
    for _ in 0..4 {
        leases.push(s.lease_grant(Duration::from_secs(30)).await.expect("grant"));
    }
    let tasks: Vec<_> = leases
        .iter()
        .map(|&lease| {
            let s = s.clone();
            tokio::spawn(async move {
                s.campaign("/e/leader", lease.to_string().into_bytes(), lease)
                    .await
                    .expect("campaign")
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (task, lease) in tasks.into_iter().zip(&leases) {
        if task.await.expect("task") {
            winners.push(*lease);
        }
    }
    assert_eq!(winners.len(), 1, "one leader: {winners:?}");
    let leader = winners[0];
    // The leader campaigning again still holds it; the others still do not.
    assert!(
        s.campaign("/e/leader", b"x".to_vec(), leader)
            .await
            .expect("campaign")
    );
    let other = *leases.iter().find(|&&l| l != leader).expect("another");
    assert!(
        !s.campaign("/e/leader", b"x".to_vec(), other)
            .await
            .expect("campaign")
    );
    s.lease_revoke(leader).await.expect("revoke");
    assert!(
        s.campaign("/e/leader", b"next".to_vec(), other)
            .await
            .expect("campaign")
    );
    let kv = s.get("/e/leader").await.expect("get").expect("held");
    assert_eq!((kv.value.as_slice(), kv.lease), (b"next".as_slice(), other));
    for lease in leases.into_iter().filter(|&l| l != leader) {
        s.lease_revoke(lease).await.expect("revoke");
    }
}

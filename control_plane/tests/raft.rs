//! `EmbeddedStore`, the Raft-replicated store: the conformance suite (in
//! `common`) on a group of one and of three nodes, directly and through
//! `RemoteStore`; a node that restarts from its data directory; and a group of
//! three that loses its leader. Nodes run in this process, each with its own
//! data directory (on tmpfs when there is one), talking over loopback gRPC.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{WAIT, next, scratch_dir, serve_until_stopped, suite, try_increment};
use tandem_control_plane::{EmbeddedConfig, EmbeddedStore, Event, RemoteStore, Store, StoreError};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep, timeout};

/// A temporary data directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        TempDir(scratch_dir(&format!("tandem-raft-{name}")))
    }

    fn node(&self, id: u64) -> PathBuf {
        self.0.join(format!("node{id}"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serves `store`'s client API on a loopback port; the sender stops it.
async fn served(store: EmbeddedStore) -> (String, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    (url, serve_until_stopped(store, listener))
}

/// A group of three nodes with their client APIs served.
struct Group {
    dir: TempDir,
    peers: BTreeMap<u64, String>,
    snapshot_every: u64,
    nodes: BTreeMap<u64, EmbeddedStore>,
    urls: BTreeMap<u64, String>,
    stops: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Group {
    async fn start(name: &str, snapshot_every: u64) -> Group {
        let mut listeners = BTreeMap::new();
        let mut peers = BTreeMap::new();
        for id in 1..=3u64 {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            peers.insert(id, format!("http://{}", l.local_addr().expect("address")));
            listeners.insert(id, l);
        }
        let mut group = Group {
            dir: TempDir::new(name),
            peers,
            snapshot_every,
            nodes: BTreeMap::new(),
            urls: BTreeMap::new(),
            stops: BTreeMap::new(),
        };
        for (id, l) in listeners {
            group.open(id, Some(l)).await;
        }
        group
    }

    /// Opens node `id` from its directory (`None`: on its peer address again).
    async fn open(&mut self, id: u64, listener: Option<TcpListener>) {
        let config = EmbeddedConfig {
            id,
            data_dir: self.dir.node(id),
            peers: self.peers.clone(),
            snapshot_every: self.snapshot_every,
        };
        let node = EmbeddedStore::open(config, listener)
            .await
            .expect("open a node");
        let (url, stop) = served(node.clone()).await;
        self.nodes.insert(id, node);
        self.urls.insert(id, url);
        self.stops.insert(id, stop);
    }

    /// Stops node `id` as if it died: its peer service, client API and thread.
    async fn kill(&mut self, id: u64) {
        if let Some(stop) = self.stops.remove(&id) {
            let _ = stop.send(());
        }
        if let Some(node) = self.nodes.remove(&id) {
            node.shutdown().await;
        }
    }

    /// The leader every running node agrees on, waiting for an election.
    async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen: Vec<Option<u64>> = self.nodes.values().map(|n| n.leader()).collect();
            if let Some(Some(l)) = seen.first()
                && self.nodes.contains_key(l)
                && seen.iter().all(|s| *s == Some(*l))
            {
                return *l;
            }
            assert!(Instant::now() < deadline, "no leader elected: {seen:?}");
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn follower(&self, leader: u64) -> EmbeddedStore {
        self.nodes
            .iter()
            .find(|(id, _)| **id != leader)
            .map(|(_, n)| n.clone())
            .expect("a follower")
    }

    /// The client URLs, `first`'s first.
    fn urls_from(&self, first: u64) -> String {
        let mut urls = vec![self.urls[&first].clone()];
        urls.extend(
            self.urls
                .iter()
                .filter(|(id, _)| **id != first)
                .map(|(_, u)| u.clone()),
        );
        urls.join(",")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_conforms_directly_and_through_remote() {
    let dir = TempDir::new("one");
    let store = EmbeddedStore::open(EmbeddedConfig::single(dir.node(1)), None)
        .await
        .expect("open");
    suite(&store).await;

    let dir = TempDir::new("one-remote");
    let store = EmbeddedStore::open(EmbeddedConfig::single(dir.node(1)), None)
        .await
        .expect("open");
    let (url, _stop) = served(store).await;
    suite(&RemoteStore::connect(&url).expect("client")).await;
}

/// The suite on a follower: every write is forwarded to the leader, every read
/// waits for a read-index round, compare-and-swap races across the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_conform_through_a_follower() {
    let group = Group::start("three", 64).await;
    let leader = group.leader().await;
    suite(&group.follower(leader)).await;
    // Every node applied the same log: same revision, same keys.
    let (kvs, rev) = group.nodes[&leader].list("/").await.expect("list");
    for node in group.nodes.values() {
        assert_eq!(node.list("/").await.expect("list"), (kvs.clone(), rev));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_conform_through_remote() {
    let group = Group::start("three-remote", 64).await;
    let leader = group.leader().await;
    let client = RemoteStore::connect(&group.urls_from(leader)).expect("client");
    suite(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarts_from_its_directory() {
    let dir = TempDir::new("restart");
    let config = EmbeddedConfig {
        // Small, so the restart goes through a snapshot and a log tail.
        snapshot_every: 16,
        ..EmbeddedConfig::single(dir.node(1))
    };
    let store = EmbeddedStore::open(config.clone(), None)
        .await
        .expect("open");
    for i in 0..40 {
        store
            .put(&format!("/r/{i}"), i.to_string().into_bytes(), None)
            .await
            .expect("put");
    }
    let lease = store
        .lease_grant(Duration::from_secs(30))
        .await
        .expect("grant");
    store
        .put("/r/leased", b"x".to_vec(), Some(lease))
        .await
        .expect("put");
    assert!(store.delete("/r/0").await.expect("delete"));
    let (before, revision) = store.list("/r/").await.expect("list");
    store.shutdown().await;
    assert!(matches!(
        store.get("/r/1").await,
        Err(StoreError::Unavailable(_))
    ));
    drop(store);

    // A crash tore the last record of the log.
    let wal = dir.node(1).join("wal");
    let mut bytes = std::fs::read(&wal).expect("read the log");
    bytes.extend_from_slice(&[200, 0, 0, 0, 7, 7, 7, 7, 1, 2, 3]);
    std::fs::write(&wal, &bytes).expect("write the log");

    let store = EmbeddedStore::open(config, None).await.expect("reopen");
    assert_eq!(store.list("/r/").await.expect("list"), (before, revision));
    assert_eq!(store.revision(), revision);
    store
        .lease_keepalive(lease)
        .await
        .expect("the lease survived");
    let next_rev = store.put("/r/new", b"y".to_vec(), None).await.expect("put");
    assert_eq!(next_rev, revision + 1);
    // Revoking the recovered lease deletes its key.
    store.lease_revoke(lease).await.expect("revoke");
    assert_eq!(store.get("/r/leased").await.expect("get"), None);
    let other = store
        .lease_grant(Duration::from_secs(30))
        .await
        .expect("grant");
    assert!(
        other > lease,
        "lease ids are not reused: {other} after {lease}"
    );
}

/// Killing the leader of three loses no acknowledged write, a new leader takes
/// over, a client and a watcher move on to another node without missing a
/// change, a kept-alive lease survives and an abandoned one expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_survives_the_death_of_its_leader() {
    let mut group = Group::start("failover", 16).await;
    let old = group.leader().await;
    // The client starts on the leader, so it has to fail over.
    let client = RemoteStore::connect(&group.urls_from(old)).expect("client");
    let mut watch = client.watch("/f/", None).await.expect("watch");

    let kept = client
        .lease_grant(Duration::from_millis(1500))
        .await
        .expect("grant");
    let abandoned = client
        .lease_grant(Duration::from_millis(1500))
        .await
        .expect("grant");
    assert_ne!(kept, abandoned);
    client
        .put("/f/kept", b"1".to_vec(), Some(kept))
        .await
        .expect("put");
    client
        .put("/f/abandoned", b"1".to_vec(), Some(abandoned))
        .await
        .expect("put");
    let holding = Arc::new(AtomicBool::new(true));
    let keeper = {
        let (client, holding) = (client.clone(), holding.clone());
        tokio::spawn(async move {
            while holding.load(Ordering::Relaxed) {
                // Errors while the group elects a leader are retried.
                let _ = client.lease_keepalive(kept).await;
                sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let mut acknowledged = Vec::new();
    for i in 0..30 {
        let key = format!("/f/k{i}");
        let rev = client.put(&key, b"v".to_vec(), None).await.expect("put");
        acknowledged.push((key, rev));
    }

    group.kill(old).await;
    let new = group.leader().await;
    assert_ne!(new, old);

    // Enough writes that the leader compacts past where the dead node stopped.
    for i in 30..70 {
        let key = format!("/f/k{i}");
        let rev = timeout(WAIT, client.put(&key, b"v".to_vec(), None))
            .await
            .expect("a write within 5 s of the failover")
            .expect("put after the failover");
        acknowledged.push((key, rev));
    }
    for (key, rev) in &acknowledged {
        let kv = client
            .get(key)
            .await
            .expect("get")
            .expect("acknowledged write kept");
        assert_eq!(kv.mod_revision, *rev);
    }

    // The abandoned lease expires under the new leader; the kept one does not.
    let deadline = Instant::now() + Duration::from_secs(8);
    while client.get("/f/abandoned").await.expect("get").is_some() {
        assert!(
            Instant::now() < deadline,
            "the abandoned lease never expired"
        );
        sleep(Duration::from_millis(50)).await;
    }
    sleep(Duration::from_millis(600)).await;
    assert!(client.get("/f/kept").await.expect("get").is_some());
    client.lease_keepalive(kept).await.expect("keepalive");
    assert_eq!(
        client.lease_keepalive(abandoned).await,
        Err(StoreError::LeaseNotFound(abandoned))
    );
    holding.store(false, Ordering::Relaxed);
    keeper.await.expect("keeper");

    // The watcher saw every change, in order, across the failover.
    let last = acknowledged.last().expect("writes").1;
    let mut seen = Vec::new();
    loop {
        let ev = next(&mut watch).await;
        if let Some((_, prev)) = seen.last() {
            assert!(ev.revision() > *prev, "out of order: {seen:?} then {ev:?}");
        }
        seen.push((ev.clone(), ev.revision()));
        let expired = seen
            .iter()
            .any(|(e, _)| matches!(e, Event::Delete { key, .. } if key == "/f/abandoned"));
        if ev.revision() >= last && expired {
            break;
        }
    }
    for (key, rev) in &acknowledged {
        assert!(
            seen.iter().any(|(e, r)| e.key() == key && r == rev),
            "the watcher missed {key} at {rev}"
        );
    }

    // The dead node comes back from its directory and catches up (through a
    // snapshot: the log it missed was compacted meanwhile).
    group.open(old, None).await;
    let target = client.list("/f/").await.expect("list");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let node = &group.nodes[&old];
        if node.revision() >= target.1 {
            assert_eq!(node.list("/f/").await.expect("list"), target);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node never caught up"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// Writers on every node of a group race to increment one counter with
/// compare-and-swap: no increment is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_is_atomic_across_nodes() {
    let group = Group::start("cas", 64).await;
    group.leader().await;
    let nodes: Vec<EmbeddedStore> = group.nodes.values().cloned().collect();
    nodes[0]
        .put("/cas/n", b"0".to_vec(), None)
        .await
        .expect("put");
    let writers: Vec<_> = (0..6)
        .map(|i| {
            let s = nodes[i % nodes.len()].clone();
            tokio::spawn(async move {
                let mut swaps = 0;
                while swaps < 10 {
                    swaps += usize::from(try_increment(&s, "/cas/n").await);
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    for node in &nodes {
        let kv = node.get("/cas/n").await.expect("get").expect("present");
        assert_eq!(kv.value, b"60");
    }
}

//! `EtcdStore` against a real etcd: the conformance suite, and what only a real
//! server can show (a watch that outlives a restart of etcd, compaction, a
//! process that starts before etcd does, a member that is down). Each test
//! starts its own etcd from the Debian package `etcd-server` on loopback ports,
//! and kills it at the end; a [`Relay`] lets a test decide when a watcher can
//! reach etcd.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{WAIT, next, scratch_dir, suite};
use tandem_control_plane::{AnyStore, EtcdStore, EtcdTls, Event, Store, StoreError};
use tandem_kv_transfer::tls::ClusterCa;
use tokio::task::AbortHandle;
use tokio::time::timeout;

const ETCD: &str = "/usr/bin/etcd";
/// How long etcd may take to answer after it is started.
const START_WITHIN: Duration = Duration::from_secs(15);

/// An etcd server of its own, in a temporary data directory; killed (and the
/// directory removed) when dropped.
struct Etcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// With mutual TLS on the client port: the server's files (`ca.pem`,
    /// `node.pem`, `node.key`) and a client identity the server accepts.
    tls: Option<(PathBuf, EtcdTls)>,
}

/// Two free loopback ports.
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    (
        a.local_addr().expect("address").port(),
        b.local_addr().expect("address").port(),
    )
}

impl Etcd {
    /// Starts etcd on free ports and waits until it answers.
    async fn start() -> Etcd {
        let (client_port, peer_port) = free_ports();
        Etcd::start_on(client_port, peer_port).await
    }

    /// Starts etcd on the given ports and waits until it answers.
    async fn start_on(client_port: u16, peer_port: u16) -> Etcd {
        Etcd::start_with(client_port, peer_port, None).await
    }

    /// Starts etcd on free ports, serving clients over mutual TLS only.
    async fn start_tls(server_dir: PathBuf, client: EtcdTls) -> Etcd {
        let (client_port, peer_port) = free_ports();
        Etcd::start_with(client_port, peer_port, Some((server_dir, client))).await
    }

    async fn start_with(client_port: u16, peer_port: u16, tls: Option<(PathBuf, EtcdTls)>) -> Etcd {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} not found: these tests need a real etcd server; install the Debian \
             package `etcd-server` (apt-get install etcd-server)"
        );
        // tmpfs when there is one: etcd fsyncs every write.
        let dir = scratch_dir("tandem-etcd");
        std::fs::create_dir_all(&dir).expect("etcd's directory");
        let mut etcd = Etcd {
            child: None,
            dir,
            client_port,
            peer_port,
            tls,
        };
        etcd.run().await;
        etcd
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn store(&self) -> EtcdStore {
        EtcdStore::connect_tls(&[self.url()], self.tls.as_ref().map(|(_, c)| c))
            .expect("etcd client")
    }

    /// Starts the server process (on the existing data directory, if etcd ran
    /// before) and waits until it answers.
    async fn run(&mut self) {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("etcd's log");
        let mut command = Command::new(ETCD);
        if let Some((dir, _)) = &self.tls {
            command
                .arg("--cert-file")
                .arg(dir.join("node.pem"))
                .arg("--key-file")
                .arg(dir.join("node.key"))
                .arg("--trusted-ca-file")
                .arg(dir.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", "default"])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            // Short raft timeouts: a quick start, and a minimum lease TTL of
            // 1 s (1.5 election timeouts, rounded up) for the lease tests.
            .args(["--heartbeat-interval", "25", "--election-timeout", "250"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd's log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let store = self.store();
        let began = Instant::now();
        loop {
            if store.get("/ready").await.is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "etcd exited ({status}) before answering:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                began.elapsed() < START_WITHIN,
                "etcd did not answer within {START_WITHIN:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server process (as a crash would) and waits for it to end.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP relay to a local port that a test can cut (closing every connection
/// and refusing new ones until it is restored).
struct Relay {
    port: u16,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Relay {
    async fn to(upstream: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let port = listener.local_addr().expect("address").port();
        let open = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let open = open.clone();
            let connections = connections.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let relayed = tokio::spawn(async move {
                        if let Ok(mut outbound) =
                            tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                        {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections
                        .lock()
                        .expect("relay lock")
                        .push(relayed.abort_handle());
                }
            }
        })
        .abort_handle();
        Relay {
            port,
            open,
            connections,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().expect("relay lock").drain(..) {
            connection.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_conforms() {
    let etcd = Etcd::start().await;
    suite(&etcd.store()).await;
}

/// A watcher whose etcd crashes and comes back (same data, same address) sees
/// every change, in order, exactly once, including those made before it could
/// reconnect: it resumes from the last revision it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_resumes_after_etcd_restarts() {
    let mut etcd = Etcd::start().await;
    // The watcher reaches etcd through a relay, so that the test decides when
    // it can reconnect; the writer goes straight to etcd.
    let relay = Relay::to(etcd.client_port).await;
    let watcher = EtcdStore::connect(&[relay.url()]).expect("etcd client");
    let writer = etcd.store();
    let mut w = watcher.watch("/m/", None).await.expect("watch");
    let r1 = writer.put("/m/1", b"a".to_vec(), None).await.expect("put");
    assert_eq!(next(&mut w).await.revision(), r1);

    relay.cut();
    etcd.kill();
    let began = Instant::now();
    for store in [&watcher, &writer] {
        assert!(matches!(
            store.get("/m/1").await,
            Err(StoreError::Unavailable(_))
        ));
    }
    assert!(began.elapsed() < WAIT, "{:?}", began.elapsed());

    etcd.run().await;
    // Changes the watcher cannot see yet: puts, a delete, a put.
    let mut written = Vec::new();
    for i in 2..6 {
        let key = format!("/m/{i}");
        written.push(writer.put(&key, b"b".to_vec(), None).await.expect("put"));
    }
    writer.delete("/m/2").await.expect("delete");
    // The store's revision is the delete's.
    written.push(writer.list("/m/").await.expect("list").1);
    written.push(writer.put("/m/6", b"c".to_vec(), None).await.expect("put"));
    relay.restore();

    let mut seen = Vec::new();
    let mut puts = Vec::new();
    for _ in 0..written.len() {
        let event = next(&mut w).await;
        seen.push(event.revision());
        puts.push(matches!(event, Event::Put(_)));
    }
    assert_eq!(seen, written);
    assert_eq!(puts, [true, true, true, true, false, true]);
    // Live again, and nothing twice.
    let last = writer.put("/m/7", b"d".to_vec(), None).await.expect("put");
    assert_eq!(next(&mut w).await.revision(), last);
    assert!(
        timeout(Duration::from_millis(300), w.next()).await.is_err(),
        "no change beyond those made"
    );
}

/// A watch from before etcd's compaction point is refused with the oldest
/// revision etcd kept; from that revision on it is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_from_a_compacted_revision_is_refused() {
    let etcd = Etcd::start().await;
    let store = etcd.store();
    let mut last = 0;
    for i in 0..10 {
        last = store
            .put(&format!("/x/{}", i % 3), b"1".to_vec(), None)
            .await
            .expect("put");
    }
    store.compact(last - 2).await.expect("compact");
    match store.watch("/x/", Some(1)).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!((requested, oldest), (1, last - 2));
        }
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("expected Compacted, got a watch"),
    }
    let mut w = store.watch("/x/", Some(last - 2)).await.expect("watch");
    for want in last - 2..=last {
        assert_eq!(next(&mut w).await.revision(), want);
    }
}

/// A watcher cut off while etcd compacts past the revision it would resume
/// from cannot go on: its stream ends with `Compacted`, so that its reader
/// re-lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_cut_off_past_a_compaction_ends_with_compacted() {
    let etcd = Etcd::start().await;
    let relay = Relay::to(etcd.client_port).await;
    let watcher = EtcdStore::connect(&[relay.url()]).expect("etcd client");
    let writer = etcd.store();
    let mut w = watcher.watch("/y/", None).await.expect("watch");
    let r1 = writer.put("/y/1", b"a".to_vec(), None).await.expect("put");
    assert_eq!(next(&mut w).await.revision(), r1);

    relay.cut();
    let mut last = r1;
    for i in 0..5 {
        last = writer
            .put(&format!("/y/{i}"), b"b".to_vec(), None)
            .await
            .expect("put");
    }
    writer.compact(last).await.expect("compact");
    relay.restore();
    match timeout(WAIT, w.next()).await.expect("an answer within 5 s") {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!((requested, oldest), (r1 + 1, last));
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
}

/// A process can make its client before etcd is up: calls fail with
/// `Unavailable` (promptly), and work once etcd is there, without a new client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_connects_lazily_and_reports_unavailable() {
    let (client_port, peer_port) = free_ports();
    let store = EtcdStore::connect(&[format!("127.0.0.1:{client_port}")]).expect("client");
    let began = Instant::now();
    assert!(matches!(
        store.get("/k").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.watch("/k", None).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.lease_grant(Duration::from_secs(5)).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(began.elapsed() < WAIT, "{:?}", began.elapsed());

    let _etcd = Etcd::start_on(client_port, peer_port).await;
    let rev = store.put("/k", b"v".to_vec(), None).await.expect("put");
    let kv = store.get("/k").await.expect("get").expect("present");
    assert_eq!(kv.mod_revision, rev);
}

/// One campaigner wins while its lease lives; the next wins once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_campaign_elects_one_leader_per_lease() {
    let etcd = Etcd::start().await;
    let store = etcd.store();
    let a = store
        .lease_grant(Duration::from_secs(30))
        .await
        .expect("grant");
    let b = store
        .lease_grant(Duration::from_secs(30))
        .await
        .expect("grant");
    let key = "/planner/leader";
    // Whether `value` under `lease` holds the key after campaigning for it.
    let wins = async |value: &[u8], lease| {
        store
            .campaign(key, value.to_vec(), lease)
            .await
            .expect("campaign")
    };
    assert!(wins(b"a", a).await);
    assert!(!wins(b"b", b).await);
    // Campaigning again under the same lease keeps the lead.
    assert!(wins(b"a", a).await);
    let leader = store.get(key).await.expect("get").expect("present");
    assert_eq!((leader.value.as_slice(), leader.lease), (&b"a"[..], a));

    let mut w = store.watch(key, None).await.expect("watch");
    store.lease_revoke(a).await.expect("revoke");
    assert!(matches!(next(&mut w).await, Event::Delete { .. }));
    assert!(wins(b"b", b).await);
    assert!(!wins(b"a", a).await);
    // A claim needs a live lease.
    store.lease_revoke(b).await.expect("revoke");
    assert_eq!(
        store.campaign(key, b"a".to_vec(), a).await,
        Err(StoreError::LeaseNotFound(a))
    );
}

/// With a member down, every request still succeeds on one that answers,
/// including writes and watches (a write that could not be delivered is sent
/// to the next member).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_moves_on_from_an_unreachable_member() {
    let etcd = Etcd::start().await;
    let (down, _) = free_ports();
    let store =
        EtcdStore::connect(&[format!("127.0.0.1:{down}"), etcd.url()]).expect("etcd client");
    let mut w = store.watch("/p/", None).await.expect("watch");
    let mut written = Vec::new();
    for i in 0..20 {
        written.push(
            store
                .put(&format!("/p/{i}"), b"v".to_vec(), None)
                .await
                .expect("put"),
        );
    }
    for want in written {
        assert_eq!(next(&mut w).await.revision(), want);
    }
    assert_eq!(store.list("/p/").await.expect("list").0.len(), 20);
}

/// Writes a fresh identity from `ca` for `names` into `dir`.
fn identity(ca: &ClusterCa, names: &[&str], dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).expect("identity directory");
    ca.issue(names)
        .expect("issue a certificate")
        .write_files(dir)
        .expect("write the identity");
    dir.to_owned()
}

/// etcd with `--client-cert-auth`: the conformance suite passes through an
/// `etcds://` address with the cluster's client identity, and a client whose
/// certificate comes from another CA, or one with no TLS, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_mutual_tls_conforms_and_refuses_strangers() {
    let base = std::env::temp_dir().join(format!("tandem-etcd-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let ca = ClusterCa::generate("etcd test CA").expect("CA");
    let server = identity(&ca, &["127.0.0.1", "localhost"], &base.join("server"));
    let client = identity(&ca, &["tandem-router"], &base.join("client"));
    let stranger_ca = ClusterCa::generate("another CA").expect("CA");
    let stranger = identity(&stranger_ca, &["intruder"], &base.join("stranger"));
    // The stranger trusts the real CA (so it can check the server) but its
    // own certificate is from another one.
    std::fs::copy(client.join("ca.pem"), stranger.join("ca.pem")).expect("copy the CA");

    let etcd = Etcd::start_tls(
        server,
        EtcdTls::from_dir(&client).expect("the client's files"),
    )
    .await;
    let address = format!("etcds://127.0.0.1:{}", etcd.client_port);
    let store = AnyStore::connect(&address, Some(&client)).expect("client");
    suite(&store).await;

    let stranger = AnyStore::connect(&address, Some(&stranger)).expect("client");
    assert!(
        matches!(stranger.get("/k").await, Err(StoreError::Unavailable(_))),
        "a certificate from another CA must be refused"
    );
    let plain =
        AnyStore::connect(&format!("etcd://127.0.0.1:{}", etcd.client_port), None).expect("client");
    assert!(
        matches!(plain.get("/k").await, Err(StoreError::Unavailable(_))),
        "a client without TLS must be refused"
    );
    drop(etcd);
    let _ = std::fs::remove_dir_all(&base);
}

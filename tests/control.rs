//! `tandem control` as separate processes: one hosts the embedded store, two
//! more run the planner against it (`--store`). One planner leads and sets the
//! desired counts (here: decode up to its floor of 1, as nothing runs); when
//! the leader is stopped the other takes over; every process stops cleanly on
//! SIGTERM.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_control_plane::{RemoteStore, Store};
use tandem_protocol::{Desired, PlannerDecision, Role, keys};

mod common;
use common::{BIN, KillOnDrop, free_port, fresh_temp_dir, stdout_of};

const CLUSTER: &str = "ctl-test";

/// `tandem control args...`, writing to `log`.
fn control(args: &[&str], log: &Path) -> KillOnDrop {
    let out = std::fs::File::create(log).expect("log file");
    KillOnDrop(
        Command::new(BIN)
            .arg("control")
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("tandem control starts"),
    )
}

/// SIGTERM, then the exit status within 20 s.
fn terminate(p: KillOnDrop) -> std::process::ExitStatus {
    p.terminate(Duration::from_secs(20), "tandem control")
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn leader(store: &RemoteStore) -> Option<String> {
    let kv = store.get(&keys::planner_leader(CLUSTER)).await.ok()??;
    Some(String::from_utf8_lossy(&kv.value).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planners_in_control_replicas_elect_one_leader_that_plans_and_hands_over() {
    let dir = fresh_temp_dir("control");
    let tls = dir.join("tls");
    stdout_of(
        Command::new(BIN)
            .args(["tls", "init"])
            .arg(&tls)
            .args(["--name", "tandem-worker"]),
        "tandem tls init",
    );

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.join("store");
    let host = control(
        &[
            "--listen",
            &listen,
            "--data-dir",
            data.to_str().expect("path"),
        ],
        &dir.join("host.log"),
    );
    let url = format!("http://{listen}");
    let tls_dir = tls.to_str().expect("path");
    let planner = |name: &str| {
        control(
            &[
                "--store",
                &url,
                "--cluster",
                CLUSTER,
                "--planner",
                "--name",
                name,
                "--tls-dir",
                tls_dir,
            ],
            &dir.join(format!("{name}.log")),
        )
    };
    let store = RemoteStore::connect(&url).expect("client");
    eventually("the store answers", || async { store.get("/x").await.ok() }).await;
    // Fast decisions for the test.
    store
        .put(
            &keys::planner_targets(CLUSTER),
            br#"{"interval_ms": 200, "cooldown_ms": 500}"#.to_vec(),
            None,
        )
        .await
        .expect("targets");
    let mut a = Some(planner("planner-a"));
    let mut b = Some(planner("planner-b"));

    let first = eventually("a planner leads", || leader(&store)).await;
    assert!(first == "planner-a" || first == "planner-b", "{first}");
    // The leader plans: nothing runs, so decode goes to its floor of 1.
    let desired = eventually("the leader sets the decode count", || async {
        let kv = store
            .get(&keys::planner_desired(CLUSTER, Role::Decode))
            .await
            .ok()??;
        Desired::from_json(&kv.key, &kv.value).ok()
    })
    .await;
    assert_eq!((desired.replicas, desired.by.as_str()), (1, "planner"));
    let (log, _) = store
        .list(&keys::planner_decisions(CLUSTER))
        .await
        .expect("decisions");
    let decision = PlannerDecision::from_json(&log[0].key, &log[0].value).expect("decision");
    assert_eq!(
        (decision.role, decision.from, decision.to),
        (Role::Decode, 0, 1)
    );
    assert!(
        decision.reason.contains("min_decode"),
        "{}",
        decision.reason
    );

    // Stop the leader: the other takes over.
    let (stopped, other) = if first == "planner-a" {
        (a.take(), "planner-b")
    } else {
        (b.take(), "planner-a")
    };
    let status = terminate(stopped.expect("the leader's process"));
    assert!(status.success(), "the leader exited with {status}");
    eventually("the other planner takes over", || async {
        (leader(&store).await.as_deref() == Some(other)).then_some(())
    })
    .await;

    for p in [a.take(), b.take()].into_iter().flatten() {
        let status = terminate(p);
        assert!(status.success(), "a planner exited with {status}");
    }
    let status = terminate(host);
    assert!(status.success(), "the store host exited with {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

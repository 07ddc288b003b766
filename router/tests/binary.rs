//! The `tandem-router` binary: flags, registration of its API address (how
//! `tandem up` finds it), serving, and a clean stop on SIGTERM.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use support::*;
use tandem_control_plane::Store;
use tandem_protocol::{InstanceInfo, Role, keys};

/// Kills the process if the test fails before it exits.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_registers_serves_and_stops_on_sigterm() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let store = TestStore::start().await;
    let d0 = FakeWorker::start("d0", Script::Tokens(2)).await;
    store.register(&d0, Role::Decode).await;

    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_tandem-router"))
            .args(["--store", &store.url, "--cluster", CLUSTER, "--id", "r-bin"])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--disagg",
                "never",
                "--policy",
                "kv",
            ])
            .stdin(Stdio::null())
            .spawn()
            .expect("tandem-router starts"),
    );

    // The API address comes from the router's registration, as `tandem up` reads it.
    let key = keys::instance(CLUSTER, Role::Router, "r-bin");
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr = loop {
        if let Some(kv) = store.store.get(&key).await.expect("store") {
            break InstanceInfo::from_json(&kv.key, &kv.value)
                .expect("registration")
                .http_addr;
        }
        assert!(
            child.0.try_wait().expect("wait").is_none(),
            "the router exited"
        );
        assert!(Instant::now() < deadline, "the router never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = client.get(format!("http://{addr}/health")).send().await;
        if r.is_ok_and(|r| r.status() == StatusCode::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "the router never became healthy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
    });
    let r = client
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["choices"][0]["message"]["content"], "t0 t1 ");

    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "the router ignored SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exited with {status}");
    assert!(
        store.store.get(&key).await.expect("store").is_none(),
        "deregistered"
    );
}

//! The router process against fake workers and a real store, over real HTTP
//! and gRPC: routing, KV-aware steering, disaggregation, retries, membership
//! changes, errors, cancellation, self-registration.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use support::*;
use tandem_control_plane::Store;
use tandem_protocol::{InstanceInfo, Role, WorkerState, keys};
use tandem_router::Policy;
use tandem_router::serve::{DisaggMode, RouterArgs};

/// A store with `workers` registered as serving decode workers, and a router
/// over it, its arguments set by `configure`, that routes to all of them.
async fn serve_decode_workers(
    workers: &[&FakeWorker],
    configure: impl FnOnce(&mut RouterArgs),
) -> (TestStore, TestRouter) {
    let store = TestStore::start().await;
    for w in workers {
        store.register(w, Role::Decode).await;
    }
    let mut a = args(&store);
    configure(&mut a);
    let router = TestRouter::start(a).await;
    router.wait_for_decode_workers(workers.len() as u64).await;
    (store, router)
}

/// Posts a streamed chat completion ("Hi", up to `max_tokens`) and checks
/// that it is accepted.
async fn stream_chat(router: &TestRouter, max_tokens: u32) -> reqwest::Response {
    let r = router
        .client
        .post(format!("{}/v1/chat/completions", router.url))
        .json(&serde_json::json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": max_tokens,
            "stream": true,
        }))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    r
}

/// GETs `path` from the router.
async fn get(router: &TestRouter, path: &str) -> reqwest::Response {
    router
        .client
        .get(format!("{}{path}", router.url))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// GETs `path` from the router; returns its JSON body.
async fn get_json(router: &TestRouter, path: &str) -> Value {
    get(router, path).await.json().await.expect("json")
}

/// Polls a metric until it is at least `at_least`; fails with `what` after 10 s.
async fn metric_reaches(router: &TestRouter, name: &str, at_least: f64, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while router.metric(name).await < at_least {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_reaches_a_decode_worker_and_carries_its_tokens_and_usage() {
    let d0 = FakeWorker::start("d0", Script::Tokens(3)).await;
    let (store, router) = serve_decode_workers(&[&d0], |a| a.id = Some("r-a".into())).await;

    let (status, body) = router.chat("Hello there", 8).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "t0 t1 t2 ");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let sent = d0.requests();
    assert_eq!(sent.len(), 1);
    assert!(!sent[0].prompt.is_empty());
    assert_eq!(sent[0].max_tokens, 8);
    assert!(
        sent[0].prefill.is_none(),
        "a short prompt prefills locally in auto mode"
    );
    assert_eq!(body["usage"]["prompt_tokens"], sent[0].prompt.len());
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"],
        CACHED_TOKENS
    );

    // Streamed too: the same tokens as SSE chunks.
    let r = stream_chat(&router, 2).await;
    let text = r.text().await.expect("body");
    assert!(
        text.contains("t0 ") && text.contains("t1 ") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );

    // /v1/models lists the served model; /health and /metrics report.
    let models = get_json(&router, "/v1/models").await;
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(
        router
            .metric("tandem_router_requests_total{outcome=\"ok\"}")
            .await,
        2.0
    );
    assert_eq!(
        router
            .metric("tandem_router_routing_decisions_total{prefill=\"local\"}")
            .await,
        2.0
    );
    assert_eq!(router.metric("tandem_router_ttft_seconds_count").await, 2.0);
    assert_eq!(
        router.metric("tandem_router_cached_tokens_total").await,
        2.0 * f64::from(CACHED_TOKENS)
    );
    assert_eq!(
        router
            .metric("tandem_router_workers{role=\"decode\",state=\"serving\"}")
            .await,
        1.0
    );

    // The router registered its API address under a lease, and deregisters on shutdown.
    let key = keys::instance(CLUSTER, Role::Router, "r-a");
    let kv = store
        .store
        .get(&key)
        .await
        .expect("store")
        .expect("registered");
    assert_ne!(kv.lease, 0, "registered under a lease");
    let info = InstanceInfo::from_json(&key, &kv.value).expect("info");
    assert_eq!(format!("http://{}", info.http_addr), router.url);
    router.stop().await;
    assert!(
        store.store.get(&key).await.expect("store").is_none(),
        "deregistered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_steer_a_shared_prefix_to_the_worker_that_holds_it() {
    let d0 = FakeWorker::start("d0", Script::Tokens(1)).await;
    let d1 = FakeWorker::start("d1", Script::Tokens(1)).await;
    let (_store, router) = serve_decode_workers(&[&d0, &d1], |a| a.policy = Policy::Kv).await;
    eventually("both workers followed", || {
        d0.subscribers() == 1 && d1.subscribers() == 1
    })
    .await;

    let context = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    // Learn the prompt's tokens from whichever worker gets it first.
    let (status, _) = router.chat(&context, 1).await;
    assert_eq!(status, StatusCode::OK);
    let first = [d0.requests(), d1.requests()].concat();
    let prompt = first[0].prompt.clone();
    let hashes = hasher().hash_prefix(&prompt);
    assert!(hashes.len() >= 8, "a prompt of {} tokens", prompt.len());

    // The worker that did NOT get it announces the prefix: half in an event, half
    // in an event lost on the way (a gap the router must resync from a snapshot).
    let (holder, other) = if d0.requests().is_empty() {
        (&d0, &d1)
    } else {
        (&d1, &d0)
    };
    let half = hashes.len() / 2;
    holder.store_blocks(&hashes[..half]);
    holder.store_blocks_silently(&hashes[half..]);
    holder.store_blocks(&[tandem_protocol::BlockHash(7)]);
    let resyncs_before = router.metric("tandem_router_kv_resyncs_total").await;
    metric_reaches(
        &router,
        "tandem_router_index_blocks",
        (hashes.len() + 1) as f64,
        "index never caught up",
    )
    .await;
    assert!(router.metric("tandem_router_kv_resyncs_total").await >= resyncs_before.max(3.0));

    let before_holder = holder.requests().len();
    let before_other = other.requests().len();
    let predicted_before = router
        .metric("tandem_router_predicted_cached_tokens_total")
        .await;
    for _ in 0..8 {
        let (status, _) = router.chat(&context, 1).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        holder.requests().len(),
        before_holder + 8,
        "all went to the holder"
    );
    assert_eq!(other.requests().len(), before_other);
    // The index predicted every full block cached there.
    let predicted = router
        .metric("tandem_router_predicted_cached_tokens_total")
        .await;
    assert_eq!(
        predicted - predicted_before,
        8.0 * (hashes.len() * BLOCK) as f64
    );
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregation_always_names_the_prefill_worker_and_never_names_none() {
    let store = TestStore::start().await;
    let d0 = FakeWorker::start("d0", Script::Tokens(1)).await;
    let p0 = FakeWorker::start("p0", Script::Tokens(1)).await;
    store.register(&d0, Role::Decode).await;
    store.register(&p0, Role::Prefill).await;

    let mut a = args(&store);
    a.disagg = DisaggMode::Always;
    let always = TestRouter::start(a).await;
    always.wait_for_decode_workers(1).await;
    metric_reaches(
        &always,
        "tandem_router_workers{role=\"prefill\",state=\"serving\"}",
        1.0,
        "prefill worker never joined",
    )
    .await;
    let (status, body) = always.chat("Hi", 1).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let target = d0.requests()[0].prefill.clone().expect("a prefill target");
    assert_eq!(target.worker_id, "p0");
    assert_eq!(target.grpc_addr, p0.url());
    assert!(
        p0.requests().is_empty(),
        "Generate goes to the decode worker only"
    );
    assert_eq!(
        always
            .metric("tandem_router_routing_decisions_total{prefill=\"remote\"}")
            .await,
        1.0
    );
    always.stop().await;

    let mut a = args(&store);
    a.disagg = DisaggMode::Never;
    let never = TestRouter::start(a).await;
    never.wait_for_decode_workers(1).await;
    let long = "Tell me everything about the sea and the ships on it. ".repeat(40);
    let (status, _) = never.chat(&long, 1).await;
    assert_eq!(status, StatusCode::OK);
    let sent = d0.requests();
    assert_eq!(sent.len(), 2);
    assert!(sent[1].prompt.len() > 256);
    assert!(sent[1].prefill.is_none());
    never.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_the_first_token_are_retried_and_after_it_reported() {
    let store = TestStore::start().await;
    // A registered worker nobody listens at, one that fails, one that works.
    // Bound but never listening: connecting is refused, and no other test
    // can take the port over while this one runs.
    let gone = tokio::net::TcpSocket::new_v4().expect("socket");
    gone.bind(([127, 0, 0, 1], 0).into()).expect("bind");
    let dead_url = format!("http://{}", gone.local_addr().expect("address"));
    store
        .register_at("dead", &dead_url, Role::Decode, WorkerState::Serving)
        .await;
    let bad = FakeWorker::start("bad", Script::FailBeforeFirst).await;
    let good = FakeWorker::start("good", Script::Tokens(2)).await;
    store.register(&bad, Role::Decode).await;
    store.register(&good, Role::Decode).await;
    let mut a = args(&store);
    a.policy = Policy::RoundRobin;
    a.retries = 2;
    let router = TestRouter::start(a).await;
    // The dead worker may already be suspect (its load poll fails): 2 or 3 count.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let h = get_json(&router, "/health").await;
        if h["decode_workers"].as_u64().unwrap_or(0) >= 2
            && h["models"].as_array().is_some_and(|m| !m.is_empty())
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for _ in 0..4 {
        let (status, body) = router.chat("Hi", 2).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], "t0 t1 ");
    }
    assert!(
        !bad.requests().is_empty(),
        "round robin tried the failing worker"
    );
    assert_eq!(good.requests().len(), 4);
    assert!(router.metric("tandem_router_retries_total").await >= 1.0);

    // With every attempt failing, the client gets a 503 naming the failure.
    good.set_script(Script::FailBeforeFirst);
    let (status, body) = router.chat("Hi", 2).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("decode worker")),
        "{body}"
    );

    // After the first token there is no retry: the stream ends with an error event.
    good.set_script(Script::FailAfterFirst);
    bad.set_script(Script::FailAfterFirst);
    let r = stream_chat(&router, 4).await;
    let text = r.text().await.expect("body");
    assert!(text.contains("t0 ") && text.contains("\"error\""), "{text}");
    assert!(text.contains("mid-generation"), "{text}");
    assert!(
        router
            .metric("tandem_router_requests_total{outcome=\"failed\"}")
            .await
            >= 1.0
    );
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistered_workers_leave_routing_and_none_left_is_a_503() {
    let d0 = FakeWorker::start("d0", Script::Tokens(1)).await;
    let d1 = FakeWorker::start("d1", Script::Tokens(1)).await;
    let (store, router) =
        serve_decode_workers(&[&d0, &d1], |a| a.policy = Policy::RoundRobin).await;
    let k0 = keys::instance(CLUSTER, Role::Decode, &d0.id);
    let k1 = keys::instance(CLUSTER, Role::Decode, &d1.id);

    store.deregister(&k0).await;
    router.wait_for_decode_workers(1).await;
    let before = d0.requests().len();
    for _ in 0..4 {
        let (status, _) = router.chat("Hi", 1).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(
        d0.requests().len(),
        before,
        "a deregistered worker gets nothing"
    );
    assert_eq!(d1.requests().len(), 4);

    // Draining keeps a worker registered but takes it out of routing.
    store
        .register_at("d1", &d1.url(), Role::Decode, WorkerState::Draining)
        .await;
    router.wait_for_decode_workers(0).await;
    let (status, body) = router.chat("Hi", 1).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    store.deregister(&k1).await;
    let health = get(&router, "/health").await;
    assert_eq!(health.status(), StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = router.chat("Hi", 1).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    let msg = body["error"]["message"].as_str().expect("a message");
    assert!(msg.contains("no decode worker"), "{msg}");
    assert_eq!(d1.requests().len(), 4);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_the_workers_stream() {
    let d0 = FakeWorker::start("d0", Script::Slow(u32::MAX)).await;
    let (_store, router) = serve_decode_workers(&[&d0], |_| {}).await;

    let mut r = stream_chat(&router, 1000).await;
    let chunk = r.chunk().await.expect("a chunk").expect("data");
    assert!(!chunk.is_empty());
    assert_eq!(d0.cancelled.load(Ordering::SeqCst), 0);
    drop(r);
    eventually("the worker saw the cancellation", || {
        d0.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    metric_reaches(
        &router,
        "tandem_router_requests_total{outcome=\"cancelled\"}",
        1.0,
        "cancellation never counted",
    )
    .await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_streams_finish_then_deregisters() {
    let d0 = FakeWorker::start("d0", Script::Slow(30)).await;
    let (store, router) = serve_decode_workers(&[&d0], |a| a.id = Some("r-drain".into())).await;
    let key = keys::instance(CLUSTER, Role::Router, "r-drain");
    assert!(store.store.get(&key).await.expect("store").is_some());

    let mut r = stream_chat(&router, 64).await;
    let mut text = String::new();
    let chunk = r.chunk().await.expect("a chunk").expect("data");
    text.push_str(&String::from_utf8_lossy(&chunk));
    let url = router.url.clone();
    let stopping = tokio::spawn(router.stop());
    while let Some(chunk) = r.chunk().await.expect("the stream goes on") {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.contains("t29 ") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    stopping.await.expect("router stopped");
    assert_eq!(
        d0.cancelled.load(Ordering::SeqCst),
        0,
        "the open stream was not cut"
    );
    assert!(
        store.store.get(&key).await.expect("store").is_none(),
        "deregistered"
    );
    assert!(
        reqwest::get(format!("{url}/health")).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_reached_over_mutual_tls_with_the_cluster_identity() {
    let dirs = identities(&["decode-0", "router-0"]);
    let store = TestStore::start().await;
    let d0 = FakeWorker::start_tls("decode-0", Script::Tokens(2), &dirs[0]).await;
    store
        .register_at(
            "decode-0",
            &d0.tls_url(),
            Role::Decode,
            WorkerState::Serving,
        )
        .await;
    let mut a = args(&store);
    a.tls_dir = Some(dirs[1].clone());
    let router = TestRouter::start(a).await;
    router.wait_for_decode_workers(1).await;
    let (status, body) = router.chat("Hi", 2).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "t0 t1 ");
    eventually("KV events over TLS", || d0.subscribers() == 1).await;
    router.stop().await;

    // Without the cluster identity the worker cannot be reached.
    let plain = TestRouter::start(args(&store)).await;
    let (status, _) = plain.chat("Hi", 2).await;
    assert!(
        status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::NOT_FOUND,
        "{status}"
    );
    assert_eq!(d0.requests().len(), 1);
    plain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_goes_on_while_the_store_is_unreachable_and_catches_up_after() {
    let store = TestStore::start().await;
    let link = StoreLink::start(&store).await;
    let d0 = FakeWorker::start("d0", Script::Tokens(1)).await;
    let d1 = FakeWorker::start("d1", Script::Tokens(1)).await;
    store.register(&d0, Role::Decode).await;
    let mut a = args(&store);
    a.store = link.url.clone();
    a.policy = Policy::RoundRobin;
    let router = TestRouter::start(a).await;
    router.wait_for_decode_workers(1).await;

    link.cut().await;
    // A worker joins while the router cannot see the store.
    store.register(&d1, Role::Decode).await;
    for _ in 0..3 {
        let (status, body) = router.chat("Hi", 1).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(
        d0.requests().len(),
        3,
        "the last known worker keeps serving"
    );
    router.wait_for_decode_workers(1).await;

    // The store is back: the watch resumes and the router learns of d1.
    link.restore().await;
    router.wait_for_decode_workers(2).await;
    for _ in 0..4 {
        let (status, _) = router.chat("Hi", 1).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert!(
        !d1.requests().is_empty(),
        "the worker that joined during the outage is routed to"
    );
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_api_but_not_health_and_metrics() {
    let d0 = FakeWorker::start("d0", Script::Tokens(1)).await;
    let (_store, router) =
        serve_decode_workers(&[&d0], |a| a.api_keys = vec!["sesame".into()]).await;
    let models = format!("{}/v1/models", router.url);
    let r = router.client.get(&models).send().await.expect("sent");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = router
        .client
        .get(&models)
        .bearer_auth("sesame")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(router.metric("tandem_router_index_bytes").await > 0.0);
    router.stop().await;
}

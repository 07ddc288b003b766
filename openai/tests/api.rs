//! The OpenAI API over real HTTP, served by an in-process engine running the
//! default model.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tandem_engine::chat_template::ChatMessage;
use tandem_engine::engine::{Engine, EngineConfig, LoadReport, Request, TokenEvent};
use tandem_openai::{ApiConfig, EngineGenerator, router, serve};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const MODEL: &str = "SmolLM2-135M-Instruct";
const QUESTION: &str = "What is the capital of France? Answer in one sentence.";

/// An API server on a loopback port, over its own engine.
struct TestServer {
    url: String,
    generator: EngineGenerator,
    client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl TestServer {
    async fn start(config: ApiConfig) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let path = tandem_engine::paths::test_model_path();
        let engine_config = EngineConfig {
            // Tests run side by side on small machines.
            threads: Some(1),
            ..EngineConfig::default()
        };
        let generator = EngineGenerator::load(MODEL, &path, engine_config).expect("model loads");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(generator.clone(), config);
        tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            serve(listener, app, shutdown).await.expect("server runs");
        });
        Self {
            url,
            generator,
            client: reqwest::Client::new(),
            _stop: stop,
        }
    }

    fn engine(&self) -> &Engine {
        self.generator.engine()
    }

    /// Posts `body` as JSON to `path`.
    async fn send_post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let r = self.send_post(path, body).await;
        let status = r.status();
        let text = r.text().await.expect("body");
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path} answered non-JSON ({e}): {text}"));
        (status, value)
    }

    /// Posts a streaming request and returns its `data:` payloads, `[DONE]` included.
    async fn post_stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self.send_post(path, body).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let text = r.text().await.expect("body");
        sse_data(&text)
    }
}

fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// A stream's chunks as JSON, after checking that `[DONE]` ends it.
#[track_caller]
fn stream_chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk is JSON"))
        .collect()
}

/// What `tandem generate --chat` feeds the engine for one user message.
fn chat_ids(engine: &Engine, user: &str) -> Vec<u32> {
    let text = engine
        .chat_template()
        .expect("the model has a chat template")
        .render(&[ChatMessage::new("user", user)], true)
        .expect("renders");
    let tok = engine.tokenizer();
    let mut ids: Vec<u32> = tok.bos().filter(|_| tok.add_bos()).into_iter().collect();
    let body = tok.encode(&text, true);
    if ids.len() == 1 && body.first() == ids.first() {
        ids.clear();
    }
    ids.extend(body);
    ids
}

/// The engine's own greedy text for these prompt tokens.
async fn engine_greedy(engine: &Engine, prompt: Vec<u32>, max_tokens: usize) -> String {
    let mut handle = engine
        .submit(Request::new(prompt, max_tokens))
        .expect("submits");
    let mut text = String::new();
    while let Some(event) = handle.events.recv().await {
        match event {
            TokenEvent::Token(t) => text.push_str(&t.text),
            TokenEvent::Finished { .. } => return text,
        }
    }
    panic!("the engine stopped");
}

/// Waits until the engine's load report satisfies `done` (it is published after each step).
async fn wait_for_load(engine: &Engine, done: impl Fn(&LoadReport) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let load = engine.load_report();
        if done(&load) {
            return;
        }
        assert!(Instant::now() < deadline, "load stays {load:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": 24,
    });
    if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_agree_with_the_engine_streamed_or_not() {
    let server = TestServer::start(ApiConfig::default()).await;

    let models = server
        .client
        .get(format!("{}/v1/models", server.url))
        .send()
        .await
        .expect("models");
    assert_eq!(models.status(), StatusCode::OK);
    let models: Value = models.json().await.expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);

    // Greedy chat equals the engine's greedy output for the same prompt.
    let (status, chat) = server
        .post("/v1/chat/completions", &chat_body(json!({})))
        .await;
    assert_eq!(status, StatusCode::OK, "{chat}");
    let text = chat["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    let expected = engine_greedy(server.engine(), chat_ids(server.engine(), QUESTION), 24).await;
    assert_eq!(text, expected);
    assert!(!text.is_empty());
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    let usage = &chat["usage"];
    let prompt_tokens = chat_ids(server.engine(), QUESTION).len() as u64;
    assert_eq!(usage["prompt_tokens"], prompt_tokens);
    assert_eq!(
        usage["total_tokens"],
        prompt_tokens + usage["completion_tokens"].as_u64().expect("count")
    );

    // Streamed, the same text; usage comes last, and the repeated prompt hits the cache.
    let events = server
        .post_stream(
            "/v1/chat/completions",
            &chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
        )
        .await;
    let chunks = stream_chunks(&events);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let last = chunks.last().expect("a usage chunk");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"]["completion_tokens"],
        usage["completion_tokens"]
    );
    let cached = last["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens");
    assert!(cached > 0 && cached < prompt_tokens, "cached {cached}");
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(*finish, chat["choices"][0]["finish_reason"]);

    // A stop string cuts the same text where it first appears.
    let cut = text
        .char_indices()
        .nth(text.chars().count() / 2)
        .map_or(0, |(i, _)| i);
    let stop: String = text[cut..].chars().take(3).collect();
    let (status, stopped) = server
        .post(
            "/v1/chat/completions",
            &chat_body(json!({"stop": [stop.clone()]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    let head = &text[..text.find(&stop).expect("stop is in the text")];
    assert_eq!(stopped["choices"][0]["message"]["content"], head);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // Chat logprobs: the greedy token is the most likely alternative.
    let (status, lp) = server
        .post(
            "/v1/chat/completions",
            &chat_body(json!({"logprobs": true, "top_logprobs": 3, "max_tokens": 4})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{lp}");
    let content = lp["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs content");
    assert_eq!(content.len(), 4);
    for entry in content {
        assert_eq!(entry["top_logprobs"].as_array().map(Vec::len), Some(3));
        assert_eq!(entry["token"], entry["top_logprobs"][0]["token"]);
    }

    // Text completions, whole and streamed, with logprobs.
    let body = json!({
        "model": MODEL, "prompt": "The capital of France is", "max_tokens": 12,
        "temperature": 0, "logprobs": 2,
    });
    let (status, done) = server.post("/v1/completions", &body).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["object"], "text_completion");
    let text = done["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    let logprobs = &done["choices"][0]["logprobs"];
    assert_eq!(
        logprobs["tokens"].as_array().map(Vec::len),
        done["usage"]["completion_tokens"]
            .as_u64()
            .map(|n| n as usize)
    );
    assert_eq!(
        logprobs["top_logprobs"][0].as_object().map(|m| m.len()),
        Some(2)
    );
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let events = server.post_stream("/v1/completions", &streamed_body).await;
    let streamed: String = stream_chunks(&events)
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);

    // n = 2 with a seed: two choices, the same two again with the same seed.
    let sampled = chat_body(json!({"n": 2, "seed": 7, "temperature": 0.9, "max_tokens": 12}));
    let (status, first) = server.post("/v1/chat/completions", &sampled).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let choices = first["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    let (_, again) = server.post("/v1/chat/completions", &sampled).await;
    assert_eq!(again["choices"], first["choices"]);
    // Streamed, the two choices interleave and each ends with its finish reason.
    let mut streamed_sampled = sampled.clone();
    streamed_sampled["stream"] = json!(true);
    let events = server
        .post_stream("/v1/chat/completions", &streamed_sampled)
        .await;
    let mut texts = [String::new(), String::new()];
    let mut finishes = [Value::Null, Value::Null];
    for chunk in stream_chunks(&events) {
        let choice = &chunk["choices"][0];
        let i = choice["index"].as_u64().expect("index") as usize;
        texts[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if !choice["finish_reason"].is_null() {
            finishes[i] = choice["finish_reason"].clone();
        }
    }
    for i in 0..2 {
        assert_eq!(
            texts[i],
            choices[i]["message"]["content"].as_str().expect("text")
        );
        assert_eq!(finishes[i], choices[i]["finish_reason"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_leave_others_alone() {
    let server = TestServer::start(ApiConfig {
        max_body_bytes: 64 << 10,
        ..ApiConfig::default()
    })
    .await;
    // A good request streams while the bad ones arrive.
    let good_body = chat_body(json!({"stream": true, "max_tokens": 32}));
    let good = {
        let client = server.client.clone();
        let url = format!("{}/v1/chat/completions", server.url);
        let body = good_body.clone();
        tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await.expect("sent");
            sse_data(&r.text().await.expect("body"))
        })
    };

    let raw = |body: &'static str| {
        server
            .client
            .post(format!("{}/v1/chat/completions", server.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = raw("{\"model\": ").await.expect("sent");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );

    let (status, e) = server
        .post(
            "/v1/chat/completions",
            &chat_body(json!({"model": "gpt-9"})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(e["error"]["code"], "model_not_found");

    for (extra, param) in [
        (json!({"temperature": 5}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"n": 0}), "n"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (
            json!({"max_completion_tokens": -3}),
            "max_completion_tokens",
        ),
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (json!({"frequency_penalty": -9}), "frequency_penalty"),
        (
            json!({"logprobs": true, "top_logprobs": 30}),
            "top_logprobs",
        ),
        (json!({"messages": []}), "messages"),
        (json!({"stop": "x".repeat(2000)}), "stop"),
        (json!({"top_k": -5}), "top_k"),
    ] {
        let (status, e) = server.post("/v1/chat/completions", &chat_body(extra)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{param}: {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }

    // A prompt longer than the context.
    let context = server.engine().model_config().context_length;
    let (status, e) = server
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": vec![1u32; context + 10]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert_eq!(e["error"]["param"], "prompt");

    // A body over the limit.
    let big = json!({"model": MODEL, "prompt": "x".repeat(100 << 10)});
    let (status, e) = server.post("/v1/completions", &big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(e["error"]["message"].is_string());

    let (status, e) = server.post("/v1/embeddings", &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(e["error"]["message"].is_string());

    // The good request finished normally, with the text it has when alone.
    let events = good.await.expect("good request");
    let streamed: String = stream_chunks(&events)
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let alone = engine_greedy(server.engine(), chat_ids(server.engine(), QUESTION), 32).await;
    assert_eq!(streamed, alone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_overload_and_disconnects() {
    let server = TestServer::start(ApiConfig {
        api_keys: vec!["sk-tandem-test".into()],
        max_concurrent_requests: 1,
        ..ApiConfig::default()
    })
    .await;
    let get = |path: &str| server.client.get(format!("{}{path}", server.url));
    // A chat completion with the valid key.
    let chat = |body: &Value| {
        server
            .client
            .post(format!("{}/v1/chat/completions", server.url))
            .bearer_auth("sk-tandem-test")
            .json(body)
    };

    let r = get("/v1/models").send().await.expect("sent");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["type"], "authentication_error");
    let r = get("/v1/models")
        .bearer_auth("sk-wrong")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = get("/v1/models")
        .bearer_auth("sk-tandem-test")
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    let r = get("/health").send().await.expect("sent");
    assert_eq!(r.status(), StatusCode::OK);

    // A long stream takes the only slot.
    let long = chat_body(json!({"stream": true, "max_tokens": 8000, "ignore_eos": true}));
    let mut stream = chat(&long).send().await.expect("sent");
    assert_eq!(stream.status(), StatusCode::OK);
    let first = stream.chunk().await.expect("reads").expect("a first event");
    assert!(first.starts_with(b"data: "));

    let r = chat(&chat_body(json!({}))).send().await.expect("sent");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "1");
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["type"], "rate_limit_error");

    // The client goes away: the engine stops the work and the slot frees.
    wait_for_load(server.engine(), |l| l.running == 1).await;
    drop(stream);
    wait_for_load(server.engine(), |l| l.running == 0 && l.waiting == 0).await;

    // So does one that gives up waiting for a whole answer.
    let whole = chat_body(json!({"max_tokens": 8000, "ignore_eos": true}));
    let gave_up = chat(&whole)
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()));
    wait_for_load(server.engine(), |l| l.running == 0 && l.waiting == 0).await;
    let r = chat(&chat_body(json!({"max_tokens": 4})))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with the openai package (pip install openai)"]
async fn the_openai_python_sdk_works_unchanged() {
    let server = TestServer::start(ApiConfig {
        api_keys: vec!["sk-sdk".into()],
        ..ApiConfig::default()
    })
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/check_openai_sdk.py");
    let base = format!("{}/v1", server.url);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, &base, "sk-sdk", MODEL])
            .output()
    })
    .await
    .expect("joins")
    .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

//! The API over a scripted `Generator` (no engine): backend errors pass through,
//! a stream that fails midway ends with an error event, and a client that
//! goes away drops the token stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tandem_openai::{
    ApiConfig, ApiError, FinishReason, GenerateRequest, GeneratedToken, Generator, ServedModel,
    TokenEvent, TokenStream, Usage, router, serve,
};
use tokio::net::TcpListener;

const MODEL: &str = "scripted";

/// Answers by `max_tokens`: 1 → backend full (429), 2 → two tokens then a lost
/// worker, 3 → cancelled by the server, else tokens forever.
struct Scripted {
    model: Arc<ServedModel>,
    dropped: Arc<AtomicUsize>,
}

fn token(text: &str) -> Result<TokenEvent, ApiError> {
    Ok(TokenEvent::Token(GeneratedToken {
        id: 1,
        text: text.into(),
        logprob: -0.5,
        top: Vec::new(),
    }))
}

/// Counts drops of the stream it wraps.
struct DropCounter(Arc<AtomicUsize>);

impl Drop for DropCounter {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Generator for Scripted {
    fn models(&self) -> Vec<Arc<ServedModel>> {
        vec![self.model.clone()]
    }

    async fn generate(&self, request: GenerateRequest) -> Result<TokenStream, ApiError> {
        let counter = DropCounter(self.dropped.clone());
        let events: TokenStream = match request.max_tokens {
            1 => return Err(ApiError::overloaded(7)),
            2 => Box::pin(stream::iter([
                token("a"),
                token("b"),
                Err(ApiError::unavailable("worker lost")),
            ])),
            3 => Box::pin(stream::iter([
                token("a"),
                Ok(TokenEvent::Finished {
                    reason: FinishReason::Cancelled,
                    usage: Usage::default(),
                }),
            ])),
            _ => Box::pin(
                stream::repeat_with(|| token("x"))
                    .then(|t| async {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        t
                    })
                    .map(move |t| {
                        let _alive = &counter;
                        t
                    }),
            ),
        };
        Ok(events)
    }
}

async fn start(config: ApiConfig) -> (String, Arc<AtomicUsize>) {
    let path = tandem_engine::paths::test_model_path();
    let model = ServedModel::from_gguf(MODEL, &path).expect("tokenizer loads");
    let dropped = Arc::new(AtomicUsize::new(0));
    let generator = Scripted {
        model: Arc::new(model),
        dropped: dropped.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move {
        serve(listener, router(generator, config), std::future::pending())
            .await
            .expect("server runs");
    });
    (url, dropped)
}

fn body(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_and_disconnects_reach_the_generator_contract() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (url, dropped) = start(ApiConfig {
        max_concurrent_requests: 1,
        ..ApiConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    let chat = format!("{url}/v1/chat/completions");
    let post = |b: Value| client.post(&chat).json(&b).send();

    // The backend's own 429 passes through with its Retry-After.
    let r = post(body(1, false)).await.expect("sent");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "7");

    // A worker lost midway: 503 whole, an error event then [DONE] streamed.
    let r = post(body(2, false)).await.expect("sent");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let e: Value = r.json().await.expect("json");
    assert_eq!(e["error"]["message"], "worker lost");
    let r = post(body(2, true)).await.expect("sent");
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.expect("body");
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.len(), 4, "{text}");
    let error: Value = serde_json::from_str(events[2]).expect("json");
    assert_eq!(error["error"]["type"], "server_error");
    assert_eq!(events[3], "[DONE]");

    // A cancellation the client did not ask for is an error, not a finish.
    let r = post(body(3, false)).await.expect("sent");
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);

    // A client that goes away drops the stream and frees its slot.
    let before = dropped.load(Ordering::SeqCst);
    let mut open = post(body(100, true)).await.expect("sent");
    assert!(open.chunk().await.expect("reads").is_some());
    let r = post(body(2, false)).await.expect("sent");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(10);
    while dropped.load(Ordering::SeqCst) == before {
        assert!(Instant::now() < deadline, "the stream was not dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = post(body(3, false)).await.expect("sent");
    assert_eq!(
        r.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "the slot is free"
    );
}

//! [`Generator`] over an in-process [`Engine`]: one model, no network.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tandem_engine::engine::{Engine, EngineConfig, EngineError, Request, TokenEvent};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::generator::{GenerateRequest, Generator, TokenStream};
use crate::model::{ModelLoadError, ServedModel};

/// Errors from starting an [`EngineGenerator`].
#[derive(Debug, thiserror::Error)]
pub enum EngineGeneratorError {
    #[error("loading the engine: {0}")]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Model(#[from] ModelLoadError),
}

/// Serves one engine's model under one name.
#[derive(Debug, Clone)]
pub struct EngineGenerator {
    engine: Arc<Engine>,
    model: Arc<ServedModel>,
}

impl EngineGenerator {
    /// Loads the model at `path` into an engine and serves it as `name`.
    pub fn load(
        name: impl Into<String>,
        path: &Path,
        config: EngineConfig,
    ) -> Result<Self, EngineGeneratorError> {
        let engine = Engine::load(path, config)?;
        let mut model = ServedModel::from_gguf(name, path)?;
        // The engine's limit is the one that holds.
        model.context_length = engine.model_config().context_length;
        Ok(Self::new(Arc::new(engine), model))
    }

    /// Serves `engine` with the prompt handling of `model` (which must describe the same model).
    pub fn new(engine: Arc<Engine>, model: ServedModel) -> Self {
        Self {
            engine,
            model: Arc::new(model),
        }
    }

    /// The engine, e.g. for its load report.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The served model.
    pub fn served_model(&self) -> &Arc<ServedModel> {
        &self.model
    }
}

impl Generator for EngineGenerator {
    fn models(&self) -> Vec<Arc<ServedModel>> {
        vec![self.model.clone()]
    }

    async fn generate(&self, request: GenerateRequest) -> Result<TokenStream, ApiError> {
        if request.model != self.model.name {
            return Err(ApiError::model_not_found(&request.model));
        }
        let mut r = Request::new(request.prompt, request.max_tokens);
        r.sampling = request.sampling;
        r.stop = request.stop;
        r.stop_token_ids = request.stop_token_ids;
        r.ignore_eos = request.ignore_eos;
        let handle = self.engine.submit(r).map_err(engine_error)?;
        Ok(Box::pin(EngineStream {
            engine: self.engine.clone(),
            id: handle.id,
            events: handle.events,
            finished: false,
        }))
    }
}

fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::PromptTooLong { .. } => {
            ApiError::context_length_exceeded("prompt", e.to_string())
        }
        EngineError::EmptyPrompt => ApiError::invalid_param("prompt", e.to_string()),
        EngineError::Sampling(_) | EngineError::Config(_) => {
            ApiError::invalid_request(e.to_string())
        }
        EngineError::Stopped | EngineError::Failed(_) => ApiError::unavailable(e.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

/// An engine request's events; cancels the request when dropped before it finished.
struct EngineStream {
    engine: Arc<Engine>,
    id: u64,
    events: mpsc::UnboundedReceiver<TokenEvent>,
    finished: bool,
}

impl Stream for EngineStream {
    type Item = Result<TokenEvent, ApiError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(event)) => {
                self.finished = matches!(event, TokenEvent::Finished { .. });
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Ready(None) => {
                self.finished = true;
                Poll::Ready(Some(Err(engine_error(self.engine.stop_reason()))))
            }
        }
    }
}

impl Drop for EngineStream {
    fn drop(&mut self) {
        if !self.finished {
            self.engine.cancel(self.id);
        }
    }
}

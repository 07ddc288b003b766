//! The seam between the HTTP layer and whatever produces tokens: the in-process
//! engine here, the router's workers in the cluster.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tandem_engine::sampling::SamplingParams;

pub use tandem_engine::engine::{FinishReason, GeneratedToken, TokenEvent, Usage};

use crate::error::ApiError;
use crate::model::ServedModel;

/// One sequence to generate, with its prompt already templated and tokenized.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The served model's name, as listed by [`Generator::models`].
    pub model: String,
    /// Prompt token ids (BOS included when the model wants one).
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation; they are not part of the output.
    pub stop: Vec<String>,
    /// Token ids that end generation, besides the model's end-of-generation tokens.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

/// The events of one generation: tokens, then one `Finished` with the usage.
///
/// An `Err` item (a worker lost mid-stream) ends the stream. Dropping the
/// stream before `Finished` must cancel the work wherever it runs.
pub type TokenStream = Pin<Box<dyn Stream<Item = Result<TokenEvent, ApiError>> + Send>>;

/// Produces tokens for the API.
///
/// Implementations decide where a sequence runs; the API layer has already
/// checked the request, applied the chat template and tokenized the prompt.
pub trait Generator: Send + Sync + 'static {
    /// The models served now.
    fn models(&self) -> Vec<Arc<ServedModel>>;

    /// The served model called `name`.
    fn model(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.models().into_iter().find(|m| m.name == name)
    }

    /// Starts one generation. Errors are answered to the client as they are
    /// (e.g. 429 when the backend's queues are full, 503 when it is down).
    fn generate(
        &self,
        request: GenerateRequest,
    ) -> impl Future<Output = Result<TokenStream, ApiError>> + Send;
}

//! tandem's OpenAI-compatible HTTP API.
//!
//! [`router`] builds an axum `Router` serving `POST /v1/chat/completions`,
//! `POST /v1/completions` and `GET /v1/models` (streamed as server-sent events
//! or answered whole), over any [`Generator`]: the seam between HTTP and
//! whatever produces tokens. This crate checks each request, applies the chat
//! template and tokenizes with the [`ServedModel`] the generator lists, starts
//! one generation per choice, and formats the answer. [`EngineGenerator`]
//! runs an in-process engine; the router process implements the trait over
//! its workers. Errors are OpenAI's JSON with the matching status, API keys
//! are checked when configured, and a client that goes away drops its token
//! streams, which cancels the work.

mod engine_generator;
mod error;
mod generator;
mod model;
mod request;
mod response;
mod server;
mod wire;

pub use engine_generator::{EngineGenerator, EngineGeneratorError};
pub use error::ApiError;
pub use generator::{
    FinishReason, GenerateRequest, GeneratedToken, Generator, TokenEvent, TokenStream, Usage,
};
pub use model::{ModelLoadError, ServedModel};
pub use server::{ApiConfig, router, serve};

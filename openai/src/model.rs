//! A model as the API serves it: its name and what turns requests into prompt
//! tokens (tokenizer, chat template) and checks them (context length).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use tandem_engine::chat_template::{ChatMessage, ChatTemplate};
use tandem_engine::gguf::GgufFile;
use tandem_engine::tokenizer::Tokenizer;

use crate::error::ApiError;

/// Errors from loading a served model's tokenizer and template.
#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: tandem_engine::gguf::GgufError,
    },
    #[error("cannot build the tokenizer of {path}: {reason}")]
    Tokenizer { path: String, reason: String },
    #[error("{path} has no usable context length")]
    ContextLength { path: String },
}

/// A served model: name, tokenizer, chat template and context length.
#[derive(Debug)]
pub struct ServedModel {
    /// The name clients put in `model`.
    pub name: String,
    pub tokenizer: Tokenizer,
    /// `None` when the model has no template: chat completions are refused.
    pub chat_template: Option<ChatTemplate>,
    /// Prompt plus generated tokens may not exceed this.
    pub context_length: usize,
    /// Unix seconds, for `/v1/models`.
    pub created: u64,
    /// `owned_by` in `/v1/models`.
    pub owned_by: String,
}

impl ServedModel {
    /// A model from its parts.
    pub fn new(
        name: impl Into<String>,
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        context_length: usize,
    ) -> Self {
        Self {
            name: name.into(),
            tokenizer,
            chat_template,
            context_length,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            owned_by: "tandem".into(),
        }
    }

    /// Reads the tokenizer, chat template and context length from a GGUF file,
    /// without the weights (what a router needs).
    pub fn from_gguf(name: impl Into<String>, path: &Path) -> Result<Self, ModelLoadError> {
        let shown = path.display().to_string();
        let file = GgufFile::open(path).map_err(|source| ModelLoadError::Open {
            path: shown.clone(),
            source,
        })?;
        let tokenizer = Tokenizer::from_gguf(&file).map_err(|e| ModelLoadError::Tokenizer {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        // A model without a chat template can still complete raw prompts.
        let chat_template = ChatTemplate::from_gguf(&file).ok();
        let context_length = file
            .get_str("general.architecture")
            .ok()
            .and_then(|arch| file.get_u64(&format!("{arch}.context_length")).ok())
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 1)
            .ok_or(ModelLoadError::ContextLength { path: shown })?;
        Ok(Self::new(name, tokenizer, chat_template, context_length))
    }

    /// Token ids of a chat: the template rendered with the assistant's turn opened.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            ApiError::invalid_param(
                "model",
                format!(
                    "the model `{}` has no chat template; use /v1/completions",
                    self.name
                ),
            )
        })?;
        let text = template
            .render(messages, true)
            .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
        Ok(self.text_prompt(&text))
    }

    /// Token ids of a raw prompt: special tokens parsed, BOS prepended when the
    /// model asks for it and the text does not already start with it (as llama.cpp does).
    pub fn text_prompt(&self, text: &str) -> Vec<u32> {
        let tok = &self.tokenizer;
        let body = tok.encode(text, true);
        let mut ids = Vec::with_capacity(body.len() + 1);
        if tok.add_bos()
            && let Some(bos) = tok.bos()
            && body.first() != Some(&bos)
        {
            ids.push(bos);
        }
        ids.extend(body);
        ids
    }

    /// The text a single token stands for (lossy for partial UTF-8), for logprobs.
    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.tokenizer.token_bytes(id)).into_owned()
    }
}

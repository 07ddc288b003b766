//! Turning a parsed request into checked generation requests: parameter
//! ranges, prompt tokens, context length, one [`GenerateRequest`] per choice.

use std::sync::Arc;

use tandem_engine::sampling::SamplingParams;

use crate::error::ApiError;
use crate::generator::GenerateRequest;
use crate::model::ServedModel;
use crate::server::ApiConfig;
use crate::wire::{ChatCompletionRequest, CommonParams, CompletionRequest, Prompt};

/// Most stop strings a request may give.
pub(crate) const MAX_STOP: usize = 16;
/// Longest stop string, in bytes.
pub(crate) const MAX_STOP_BYTES: usize = 1024;
/// Default `max_tokens` of text completions, as OpenAI's.
const COMPLETION_DEFAULT_MAX_TOKENS: usize = 16;

/// Which log-probabilities a request wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Logprobs {
    None,
    /// Chat: `logprobs: true` with `top_logprobs` alternatives.
    Chat(usize),
    /// Completions: `logprobs: k`.
    Completion(usize),
}

/// A checked request: everything needed to start its choices and format the answer.
#[derive(Debug)]
pub(crate) struct Plan {
    pub model: Arc<ServedModel>,
    /// One request per choice, prompt-major: choice `p * n + j` is prompt `p`'s `j`th.
    pub choices: Vec<GenerateRequest>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: Logprobs,
}

impl Plan {
    /// Prompt tokens over distinct prompts (a prompt counts once however many choices it has).
    pub fn prompt_tokens(&self) -> usize {
        self.choices
            .iter()
            .step_by(self.n)
            .map(|c| c.prompt.len())
            .sum()
    }
}

/// Finds the model or answers 404.
pub(crate) fn find_model(
    name: &str,
    lookup: impl FnOnce(&str) -> Option<Arc<ServedModel>>,
) -> Result<Arc<ServedModel>, ApiError> {
    lookup(name).ok_or_else(|| ApiError::model_not_found(name))
}

/// Checks a chat request and tokenizes its conversation.
pub(crate) fn plan_chat(
    req: ChatCompletionRequest,
    model: Arc<ServedModel>,
    config: &ApiConfig,
) -> Result<Plan, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must not be empty",
        ));
    }
    let top = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(k)) if !(0..=20).contains(&k) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                format!("top_logprobs = {k} is out of range: 0 to 20"),
            ));
        }
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "top_logprobs requires logprobs to be true",
            ));
        }
        (true, k) => Logprobs::Chat(k.unwrap_or(0) as usize),
        (false, _) => Logprobs::None,
    };
    let messages = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| m.to_chat_message(i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| ApiError::invalid_param("messages", m))?;
    let prompt = model.chat_prompt(&messages)?;
    let (max, max_param) = match req.max_completion_tokens {
        Some(v) => (Some(v), "max_completion_tokens"),
        None => (req.common.max_tokens, "max_tokens"),
    };
    let alternatives = match top {
        Logprobs::Chat(k) => k,
        _ => 0,
    };
    build(
        &req.common,
        model,
        vec![prompt],
        "messages",
        (max, max_param, None),
        top,
        alternatives,
        config,
    )
}

/// Checks a text-completion request and tokenizes its prompts.
pub(crate) fn plan_completion(
    req: CompletionRequest,
    model: Arc<ServedModel>,
    config: &ApiConfig,
) -> Result<Plan, ApiError> {
    if req.echo.unwrap_or(false) {
        return Err(ApiError::invalid_param("echo", "echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    let n = req.common.n.unwrap_or(1);
    if let Some(b) = req.best_of
        && b != n
    {
        return Err(ApiError::invalid_param(
            "best_of",
            "best_of other than n is not supported",
        ));
    }
    let logprobs = match req.logprobs {
        None => Logprobs::None,
        Some(k) if (0..=20).contains(&k) => Logprobs::Completion(k as usize),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "logprobs",
                format!("logprobs = {k} is out of range: 0 to 20"),
            ));
        }
    };
    let prompts = match req.prompt {
        Prompt::Text(t) => vec![model.text_prompt(&t)],
        Prompt::Texts(ts) => ts.iter().map(|t| model.text_prompt(t)).collect(),
        Prompt::Tokens(ids) => vec![ids],
        Prompt::TokenLists(lists) => lists,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "prompt must not be empty",
        ));
    }
    let vocab = model.tokenizer.vocab_size();
    for p in &prompts {
        if let Some(bad) = p.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::invalid_param(
                "prompt",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
    }
    let alternatives = match logprobs {
        Logprobs::Completion(k) => k,
        _ => 0,
    };
    build(
        &req.common,
        model,
        prompts,
        "prompt",
        (
            req.common.max_tokens,
            "max_tokens",
            Some(COMPLETION_DEFAULT_MAX_TOKENS),
        ),
        logprobs,
        alternatives,
        config,
    )
}

/// The checks and conversions both endpoints share.
#[allow(clippy::too_many_arguments)]
fn build(
    common: &CommonParams,
    model: Arc<ServedModel>,
    prompts: Vec<Vec<u32>>,
    prompt_param: &str,
    (max_tokens, max_param, default_max): (Option<i64>, &str, Option<usize>),
    logprobs: Logprobs,
    alternatives: usize,
    config: &ApiConfig,
) -> Result<Plan, ApiError> {
    let n = common.n.unwrap_or(1);
    if n < 1 || n as u64 > config.max_n as u64 {
        return Err(ApiError::invalid_param(
            "n",
            format!("n = {n} is out of range: 1 to {}", config.max_n),
        ));
    }
    let n = n as usize;
    if prompts.len() * n > config.max_choices {
        return Err(ApiError::invalid_param(
            prompt_param,
            format!(
                "{} prompts times n = {n} is more than {} choices",
                prompts.len(),
                config.max_choices
            ),
        ));
    }
    if let Some(m) = max_tokens
        && m < 1
    {
        return Err(ApiError::invalid_param(
            max_param,
            format!("{max_param} = {m} is out of range: at least 1"),
        ));
    }
    let ctx = model.context_length;
    let mut sized = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let len = prompt.len();
        if len == 0 {
            return Err(ApiError::invalid_param(prompt_param, "the prompt is empty"));
        }
        if len >= ctx {
            return Err(ApiError::context_length_exceeded(
                prompt_param,
                format!(
                    "This model's maximum context length is {ctx} tokens. However, your prompt has {len} tokens."
                ),
            ));
        }
        let max = match max_tokens {
            Some(m) => {
                let m = usize::try_from(m).unwrap_or(usize::MAX);
                if len.saturating_add(m) > ctx {
                    return Err(ApiError::context_length_exceeded(
                        max_param,
                        format!(
                            "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({len} in the prompt, {m} for the completion).",
                            len.saturating_add(m)
                        ),
                    ));
                }
                m
            }
            None => default_max.unwrap_or(ctx - len).min(ctx - len),
        };
        sized.push((prompt, max));
    }

    let stop: Vec<String> = common
        .stop
        .clone()
        .map(|s| s.into_vec())
        .unwrap_or_default()
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid_param(
            "stop",
            format!("at most {MAX_STOP} stop strings are allowed"),
        ));
    }
    if stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid_param(
            "stop",
            format!("a stop string may be at most {MAX_STOP_BYTES} bytes"),
        ));
    }
    let vocab = model.tokenizer.vocab_size();
    let stop_token_ids = common.stop_token_ids.clone().unwrap_or_default();
    if let Some(bad) = stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid_param(
            "stop_token_ids",
            format!("token id {bad} is outside the vocabulary of {vocab}"),
        ));
    }
    let top_k = match common.top_k {
        None => 0,
        // vLLM spells "disabled" as -1.
        Some(-1) => 0,
        Some(k) if k >= 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k = {k} is out of range: -1 or at least 0"),
            ));
        }
    };
    let base = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: common.temperature.unwrap_or(1.0),
        top_k,
        top_p: common.top_p.unwrap_or(base.top_p),
        min_p: common.min_p.unwrap_or(base.min_p),
        repetition_penalty: common.repetition_penalty.unwrap_or(base.repetition_penalty),
        presence_penalty: common.presence_penalty.unwrap_or(base.presence_penalty),
        frequency_penalty: common.frequency_penalty.unwrap_or(base.frequency_penalty),
        seed: common.seed.map(|s| s as u64),
        logprobs: alternatives,
        ..base
    };
    sampling.validate().map_err(|e| {
        let param = match (e.field, logprobs) {
            ("logprobs", Logprobs::Chat(_)) => "top_logprobs",
            (field, _) => field,
        };
        ApiError::invalid_param(param, e.to_string())
    })?;

    let mut choices = Vec::with_capacity(sized.len() * n);
    for (prompt, max) in sized {
        for j in 0..n {
            let mut sampling = sampling.clone();
            // Each choice draws its own numbers, reproducibly when seeded.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(j as u64));
            choices.push(GenerateRequest {
                model: model.name.clone(),
                prompt: prompt.clone(),
                sampling,
                max_tokens: max,
                stop: stop.clone(),
                stop_token_ids: stop_token_ids.clone(),
                ignore_eos: common.ignore_eos.unwrap_or(false),
            });
        }
    }
    let stream = common.stream.unwrap_or(false);
    Ok(Plan {
        model,
        choices,
        n,
        stream,
        include_usage: stream
            && common
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        logprobs,
    })
}

//! Turning the choices' token streams into an answer: one JSON object, or
//! server-sent events ending with `data: [DONE]`.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{BoxStream, SelectAll};
use futures_util::{StreamExt, stream};
use serde::Serialize;
use tokio::sync::OwnedSemaphorePermit;

use crate::error::ApiError;
use crate::generator::{FinishReason, GeneratedToken, TokenEvent, TokenStream, Usage};
use crate::model::ServedModel;
use crate::request::{Logprobs, Plan};
use crate::wire::{
    self, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs,
    ChatTokenLogprob, Completion, CompletionChoice, CompletionLogprobs, Delta, OutMessage,
    PromptTokensDetails, TopLogprob,
};

const FINGERPRINT: &str = concat!("tandem-", env!("CARGO_PKG_VERSION"));

/// Which endpoint is answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub(crate) fn id_prefix(self) -> &'static str {
        match self {
            Self::Chat => "chatcmpl",
            Self::Completion => "cmpl",
        }
    }
}

type Merged = SelectAll<BoxStream<'static, (usize, Result<TokenEvent, ApiError>)>>;

/// All choices' events in arrival order, tagged with the choice index.
fn merge(streams: Vec<TokenStream>) -> Merged {
    stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.map(move |ev| (i, ev)).boxed()),
    )
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The OpenAI name of a finish; a cancellation the client did not ask for is an error.
fn finish_name(reason: FinishReason) -> Result<&'static str, ApiError> {
    match reason {
        FinishReason::Stop => Ok("stop"),
        FinishReason::Length => Ok("length"),
        FinishReason::Cancelled => Err(ApiError::unavailable(
            "the generation was cancelled by the server",
        )),
    }
}

/// Usage of the whole request: each prompt counted once (with its first
/// choice's cache hits), every choice's completion tokens.
fn total_usage(plan: &Plan, finished: &[Option<Usage>]) -> wire::Usage {
    let prompt_tokens = plan.prompt_tokens();
    let completion_tokens = finished.iter().flatten().map(|u| u.completion_tokens).sum();
    let cached_tokens = finished
        .iter()
        .step_by(plan.n)
        .flatten()
        .map(|u| u.cached_tokens)
        .sum();
    wire::Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        prompt_tokens_details: PromptTokensDetails { cached_tokens },
    }
}

/// JSON has no infinities; OpenAI reports impossible tokens as -9999.
fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        -9999.0
    }
}

fn chat_logprob(model: &ServedModel, t: &GeneratedToken) -> ChatTokenLogprob {
    let top = |id: u32, lp: f32| TopLogprob {
        token: model.token_text(id),
        logprob: finite(lp),
        bytes: model.tokenizer.token_bytes(id).to_vec(),
    };
    ChatTokenLogprob {
        token: model.token_text(t.id),
        logprob: finite(t.logprob),
        bytes: model.tokenizer.token_bytes(t.id).to_vec(),
        top_logprobs: t.top.iter().map(|&(id, lp)| top(id, lp)).collect(),
    }
}

/// Appends one token to completion logprobs; `offset` is where its text starts, in chars.
fn push_completion_logprob(
    out: &mut CompletionLogprobs,
    model: &ServedModel,
    t: &GeneratedToken,
    offset: usize,
) {
    out.tokens.push(model.token_text(t.id));
    out.token_logprobs.push(finite(t.logprob));
    out.top_logprobs.push(
        t.top
            .iter()
            .map(|&(id, lp)| (model.token_text(id), serde_json::Value::from(finite(lp))))
            .collect(),
    );
    out.text_offset.push(offset);
}

/// Waits for every choice and answers with one JSON object.
pub(crate) async fn collect(
    plan: &Plan,
    endpoint: Endpoint,
    id: String,
    streams: Vec<TokenStream>,
) -> Result<Response, ApiError> {
    let k = streams.len();
    let mut texts = vec![String::new(); k];
    let mut chars = vec![0usize; k];
    let mut chat_lp: Vec<ChatLogprobs> = vec![ChatLogprobs::default(); k];
    let mut completion_lp: Vec<CompletionLogprobs> = vec![CompletionLogprobs::default(); k];
    let mut finished: Vec<Option<(FinishReason, Usage)>> = vec![None; k];
    let mut merged = merge(streams);
    while let Some((i, event)) = merged.next().await {
        match event? {
            TokenEvent::Token(t) => {
                match plan.logprobs {
                    Logprobs::None => {}
                    Logprobs::Chat(_) => chat_lp[i].content.push(chat_logprob(&plan.model, &t)),
                    Logprobs::Completion(_) => {
                        push_completion_logprob(&mut completion_lp[i], &plan.model, &t, chars[i]);
                    }
                }
                chars[i] += t.text.chars().count();
                texts[i].push_str(&t.text);
            }
            TokenEvent::Finished { reason, usage } => finished[i] = Some((reason, usage)),
        }
    }
    let mut reasons = Vec::with_capacity(k);
    for f in &finished {
        let (reason, _) =
            f.ok_or_else(|| ApiError::unavailable("the generation ended before it finished"))?;
        reasons.push(finish_name(reason)?);
    }
    let usages: Vec<Option<Usage>> = finished.iter().map(|f| f.map(|(_, u)| u)).collect();
    let usage = total_usage(plan, &usages);
    let model = plan.model.name.clone();
    let created = now();
    let body = match endpoint {
        Endpoint::Chat => {
            let choices = texts
                .into_iter()
                .zip(chat_lp)
                .zip(reasons)
                .enumerate()
                .map(|(index, ((content, lp), reason))| ChatChoice {
                    index,
                    message: OutMessage {
                        role: "assistant",
                        content,
                    },
                    logprobs: matches!(plan.logprobs, Logprobs::Chat(_)).then_some(lp),
                    finish_reason: reason,
                })
                .collect();
            axum::Json(ChatCompletion {
                id,
                object: "chat.completion",
                created,
                model,
                system_fingerprint: FINGERPRINT,
                choices,
                usage,
            })
            .into_response()
        }
        Endpoint::Completion => {
            let choices = texts
                .into_iter()
                .zip(completion_lp)
                .zip(reasons)
                .enumerate()
                .map(|(index, ((text, lp), reason))| CompletionChoice {
                    index,
                    text,
                    logprobs: matches!(plan.logprobs, Logprobs::Completion(_)).then_some(lp),
                    finish_reason: Some(reason),
                })
                .collect();
            axum::Json(Completion {
                id,
                object: "text_completion",
                created,
                model,
                system_fingerprint: FINGERPRINT,
                choices,
                usage: Some(usage),
            })
            .into_response()
        }
    };
    Ok(body)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Tokens,
    Usage,
    Done,
    End,
}

/// A streamed answer in progress; dropping it (the client went away) drops
/// every choice's token stream, which cancels the work.
struct Streaming {
    /// Declared first so the slot is free by the time the streams are dropped.
    permit: Option<OwnedSemaphorePermit>,
    plan: Plan,
    endpoint: Endpoint,
    id: String,
    created: u64,
    merged: Merged,
    phase: Phase,
    /// Per choice: whether the assistant role went out, chars sent, usage once finished.
    role_sent: Vec<bool>,
    chars: Vec<usize>,
    finished: Vec<Option<Usage>>,
    remaining: usize,
}

/// Answers with server-sent events; `permit` is held until the last event.
pub(crate) fn stream(
    plan: Plan,
    endpoint: Endpoint,
    id: String,
    streams: Vec<TokenStream>,
    permit: OwnedSemaphorePermit,
) -> Response {
    let k = streams.len();
    let state = Streaming {
        permit: Some(permit),
        plan,
        endpoint,
        id,
        created: now(),
        merged: merge(streams),
        phase: Phase::Tokens,
        role_sent: vec![false; k],
        chars: vec![0; k],
        finished: vec![None; k],
        remaining: k,
    };
    let events = stream::unfold(state, |mut s| async move {
        let event = s.next_event().await?;
        Some((Ok::<_, Infallible>(event), s))
    });
    Sse::new(events).into_response()
}

fn json_event<T: Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(s) => Event::default().data(s),
        Err(e) => error_event(&ApiError::internal(format!("cannot encode an event: {e}"))),
    }
}

fn error_event(e: &ApiError) -> Event {
    let s = serde_json::to_string(&e.body()).unwrap_or_else(|_| {
        r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
            .to_string()
    });
    Event::default().data(s)
}

impl Streaming {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            match self.phase {
                Phase::Tokens => match self.merged.next().await {
                    Some((i, Ok(TokenEvent::Token(t)))) => {
                        if let Some(event) = self.token_event(i, &t) {
                            return Some(event);
                        }
                    }
                    Some((i, Ok(TokenEvent::Finished { reason, usage }))) => {
                        self.finished[i] = Some(usage);
                        self.remaining = self.remaining.saturating_sub(1);
                        match finish_name(reason) {
                            Ok(name) => {
                                if self.remaining == 0 {
                                    self.end_tokens();
                                }
                                return Some(self.finish_event(i, name));
                            }
                            Err(e) => return Some(self.fail(&e)),
                        }
                    }
                    Some((_, Err(e))) => return Some(self.fail(&e)),
                    None if self.remaining > 0 => {
                        let e = ApiError::unavailable("the generation ended before it finished");
                        return Some(self.fail(&e));
                    }
                    None => self.end_tokens(),
                },
                Phase::Usage => {
                    self.phase = Phase::Done;
                    return Some(self.usage_event());
                }
                Phase::Done => {
                    self.phase = Phase::End;
                    self.permit = None;
                    return Some(Event::default().data("[DONE]"));
                }
                Phase::End => return None,
            }
        }
    }

    fn end_tokens(&mut self) {
        self.phase = if self.plan.include_usage {
            Phase::Usage
        } else {
            Phase::Done
        };
    }

    /// Stops every choice (dropping their streams cancels them) and reports the error.
    fn fail(&mut self, e: &ApiError) -> Event {
        self.merged = SelectAll::new();
        self.phase = Phase::Done;
        error_event(e)
    }

    fn token_event(&mut self, i: usize, t: &GeneratedToken) -> Option<Event> {
        let offset = self.chars[i];
        self.chars[i] += t.text.chars().count();
        let model = &self.plan.model;
        match self.endpoint {
            Endpoint::Chat => {
                let logprobs = match self.plan.logprobs {
                    Logprobs::Chat(_) => Some(ChatLogprobs {
                        content: vec![chat_logprob(model, t)],
                    }),
                    _ => None,
                };
                if t.text.is_empty() && logprobs.is_none() {
                    return None;
                }
                let role = self.take_role(i);
                Some(self.chat_chunk(
                    vec![ChatChunkChoice {
                        index: i,
                        delta: Delta {
                            role,
                            content: Some(t.text.clone()),
                        },
                        logprobs,
                        finish_reason: None,
                    }],
                    None,
                ))
            }
            Endpoint::Completion => {
                let logprobs = match self.plan.logprobs {
                    Logprobs::Completion(_) => {
                        let mut lp = CompletionLogprobs::default();
                        push_completion_logprob(&mut lp, model, t, offset);
                        Some(lp)
                    }
                    _ => None,
                };
                if t.text.is_empty() && logprobs.is_none() {
                    return None;
                }
                Some(self.completion_chunk(
                    vec![CompletionChoice {
                        index: i,
                        text: t.text.clone(),
                        logprobs,
                        finish_reason: None,
                    }],
                    None,
                ))
            }
        }
    }

    fn take_role(&mut self, i: usize) -> Option<&'static str> {
        (!std::mem::replace(&mut self.role_sent[i], true)).then_some("assistant")
    }

    fn finish_event(&mut self, i: usize, reason: &'static str) -> Event {
        match self.endpoint {
            Endpoint::Chat => {
                let role = self.take_role(i);
                self.chat_chunk(
                    vec![ChatChunkChoice {
                        index: i,
                        delta: Delta {
                            role,
                            content: None,
                        },
                        logprobs: None,
                        finish_reason: Some(reason),
                    }],
                    None,
                )
            }
            Endpoint::Completion => self.completion_chunk(
                vec![CompletionChoice {
                    index: i,
                    text: String::new(),
                    logprobs: None,
                    finish_reason: Some(reason),
                }],
                None,
            ),
        }
    }

    fn usage_event(&self) -> Event {
        let usage = Some(total_usage(&self.plan, &self.finished));
        match self.endpoint {
            Endpoint::Chat => self.chat_chunk(Vec::new(), usage),
            Endpoint::Completion => self.completion_chunk(Vec::new(), usage),
        }
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<wire::Usage>) -> Event {
        json_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.plan.model.name.clone(),
            system_fingerprint: FINGERPRINT,
            choices,
            usage,
        })
    }

    fn completion_chunk(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<wire::Usage>,
    ) -> Event {
        json_event(&Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.plan.model.name.clone(),
            system_fingerprint: FINGERPRINT,
            choices,
            usage,
        })
    }
}

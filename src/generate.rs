//! `tandem generate` and `tandem tokenize`: the engine in-process, on one prompt.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;
use tandem_engine::chat_template::ChatMessage;
use tandem_engine::device::Device;
use tandem_engine::engine::{Engine, EngineConfig, Request, TokenEvent};
use tandem_engine::gguf::GgufFile;
use tandem_engine::sampling::SamplingParams;
use tandem_engine::tokenizer::Tokenizer;

/// How the prompt text becomes tokens.
#[derive(Debug, Clone)]
pub enum PromptKind {
    /// Tokenized as is (special tokens parsed).
    Raw(String),
    /// Wrapped as a user message in the model's chat template.
    Chat(String),
}

/// Options of `tandem generate`.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub model: PathBuf,
    pub prompt: PromptKind,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub threads: Option<usize>,
    pub device: Device,
    pub json: bool,
}

/// Turns prompt text into token ids the way llama.cpp does: template if chat,
/// special tokens parsed, BOS prepended when the model asks for it.
pub fn prompt_ids(engine: &Engine, prompt: &PromptKind) -> anyhow::Result<Vec<u32>> {
    let text = match prompt {
        PromptKind::Raw(t) => t.clone(),
        PromptKind::Chat(user) => engine
            .chat_template()
            .context("the model has no chat template; use --prompt")?
            .render(
                &[ChatMessage {
                    role: "user".into(),
                    content: user.clone(),
                }],
                true,
            )
            .context("rendering the chat template")?,
    };
    let tok = engine.tokenizer();
    let mut ids = Vec::new();
    if tok.add_bos()
        && let Some(bos) = tok.bos()
    {
        ids.push(bos);
    }
    let body = tok.encode(&text, true);
    // A template that writes the BOS text itself must not get a second one.
    if ids.len() == 1 && body.first() == ids.first() {
        ids.clear();
    }
    ids.extend(body);
    Ok(ids)
}

/// Runs `tandem generate`: streams text to stdout, or prints one JSON object.
pub fn run(opts: &GenerateOptions) -> anyhow::Result<()> {
    let engine = Engine::load(
        &opts.model,
        EngineConfig {
            threads: opts.threads,
            device: opts.device,
            ..EngineConfig::default()
        },
    )
    .with_context(|| format!("loading {}", opts.model.display()))?;
    let prompt = prompt_ids(&engine, &opts.prompt)?;
    let sampling = SamplingParams {
        temperature: opts.temperature,
        top_p: opts.top_p,
        top_k: opts.top_k,
        min_p: opts.min_p,
        repetition_penalty: opts.repetition_penalty,
        seed: opts.seed,
        logprobs: if opts.json { 3 } else { 0 },
        ..SamplingParams::default()
    };
    let mut request = Request::new(prompt.clone(), opts.max_tokens);
    request.sampling = sampling;
    request.stop = opts.stop.clone();
    let mut handle = engine.submit(request)?;

    let mut stdout = std::io::stdout().lock();
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut top = Vec::new();
    let mut logprobs = Vec::new();
    while let Some(ev) = handle.events.blocking_recv() {
        match ev {
            TokenEvent::Token(t) => {
                if !opts.json {
                    write!(stdout, "{}", t.text)?;
                    stdout.flush()?;
                }
                ids.push(t.id);
                text.push_str(&t.text);
                logprobs.push(t.logprob);
                top.push(
                    t.top
                        .iter()
                        .map(|&(id, lp)| json!({"id": id, "logprob": lp}))
                        .collect::<Vec<_>>(),
                );
            }
            TokenEvent::Finished { reason, usage } => {
                if opts.json {
                    let out = json!({
                        "prompt_ids": prompt,
                        "output_ids": ids,
                        "text": text,
                        "finish_reason": reason.as_str(),
                        "logprobs": logprobs,
                        "top_logprobs": top,
                        "usage": usage,
                    });
                    writeln!(stdout, "{out}")?;
                } else {
                    writeln!(stdout)?;
                }
                return Ok(());
            }
        }
    }
    Err(engine.stop_reason()).context("the request did not finish")
}

/// Runs `tandem tokenize`: loads only the tokenizer, not the weights.
pub fn tokenize(model: &Path, text: &str, json: bool) -> anyhow::Result<()> {
    let file = GgufFile::open(model).with_context(|| format!("opening {}", model.display()))?;
    let tok = Tokenizer::from_gguf(&file).context("building the tokenizer")?;
    let ids = tok.encode(text, true);
    if json {
        println!("{}", json!({ "ids": ids }));
    } else {
        let line: Vec<String> = ids.iter().map(u32::to_string).collect();
        println!("{}", line.join(" "));
    }
    Ok(())
}

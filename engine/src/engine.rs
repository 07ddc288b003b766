//! The engine a worker process drives: submit a request, receive a stream of
//! tokens, cancel; export and import a sequence's KV blocks; read the load.
//!
//! One thread owns the model, the KV cache and every sequence, and runs the
//! continuous-batching loop: between steps, sequences join (reusing every
//! cached leading block) and leave; each step packs the running decodes and
//! chunks of pending prefills into one forward batch under a token budget, so
//! a long prompt never stalls the decodes. Callers talk to that thread over a
//! channel, and the token streams are tokio channels, so both blocking code
//! (the CLI) and async code (the workers) can consume them.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tandem_protocol::{BlockHash, BlockHasher, DEFAULT_BLOCK_SIZE, KvEvent};
use tokio::sync::{broadcast, mpsc as tmpsc, watch};

use crate::backend::{self, Backend, BackendError, CpuBackend, KvRead, LayerHook};
use crate::chat_template::ChatTemplate;
use crate::device::{Device, DeviceError};
use crate::gguf::GgufFile;
use crate::kv_cache::{BlockId, KvCache, KvLayout};
use crate::model::{BatchSeq, Model, ModelConfig, ModelError};
use crate::sampling::{SampledToken, Sampler, SamplingParams};
use crate::schedule::{self, Scheduled};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Errors from loading an engine or submitting work to it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("invalid engine config: {0}")]
    Config(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt of {tokens} tokens does not fit: the limit is {limit} ({what})")]
    PromptTooLong {
        tokens: usize,
        limit: usize,
        what: &'static str,
    },
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),
    #[error("imported KV does not fit this engine: {0}")]
    KvMismatch(String),
    #[error("no retained KV for request {0}")]
    UnknownRequest(u64),
    #[error("the KV cache has {free} free blocks, {needed} are needed")]
    KvCacheFull { needed: usize, free: usize },
    #[error("no KV reservation {0}")]
    UnknownReservation(u64),
    #[error("invalid write into KV reservation {reservation}: {reason}")]
    InvalidKvWrite { reservation: u64, reason: String },
    #[error(
        "KV reservation {reservation} is incomplete: {missing} block-layer pieces never written"
    )]
    IncompleteReservation { reservation: u64, missing: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("the engine stopped after its device failed: {0}")]
    Failed(BackendError),
    #[error("cannot build the thread pool: {0}")]
    ThreadPool(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// How an engine is sized.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV cache capacity in tokens (rounded up to whole blocks).
    pub kv_cache_tokens: usize,
    /// Tokens computed per step, across all sequences (the prefill chunk budget).
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    pub max_running: usize,
    /// Compute threads; `None` uses every core.
    pub threads: Option<usize>,
    /// The device the forward pass runs on.
    #[serde(default)]
    pub device: Device,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            kv_cache_tokens: 16_384,
            max_batch_tokens: 512,
            max_running: 64,
            threads: None,
            device: Device::Cpu,
        }
    }
}

impl EngineConfig {
    /// KV blocks the cache holds: `kv_cache_tokens` rounded up to whole blocks.
    pub fn num_blocks(&self) -> usize {
        self.kv_cache_tokens.div_ceil(self.block_size)
    }

    fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: String| Err(EngineError::Config(m));
        if !(1..=1024).contains(&self.block_size) {
            return bad(format!(
                "block_size {} must be in 1..=1024",
                self.block_size
            ));
        }
        if self.kv_cache_tokens < self.block_size {
            return bad(format!(
                "kv_cache_tokens {} is less than one block",
                self.kv_cache_tokens
            ));
        }
        if self.max_batch_tokens == 0 || self.max_running == 0 {
            return bad("max_batch_tokens and max_running must be positive".into());
        }
        if self.threads == Some(0) {
            return bad("threads must be positive".into());
        }
        Ok(())
    }
}

/// The backend for `device`, holding `num_blocks` KV blocks.
fn open_backend(
    device: Device,
    model: Model,
    block_size: usize,
    num_blocks: usize,
) -> Result<Box<dyn Backend>, EngineError> {
    match device {
        Device::Cpu => Ok(Box::new(CpuBackend::new(model, block_size, num_blocks))),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let backend = crate::cuda::CudaBackend::new(model, block_size, num_blocks, ordinal)
                .map_err(DeviceError::from)?;
            Ok(Box::new(backend))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            drop(model);
            Err(DeviceError::CudaNotBuilt.into())
        }
    }
}

/// A sequence's KV cache contents, as exported by one engine and imported by another.
///
/// `data` holds `ceil(tokens.len() / block_size)` blocks, each in the cache's
/// block layout (every layer's piece in order; see [`KvLayout`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceKv {
    pub layout: KvLayout,
    /// The tokens whose K/V the blocks hold, from position 0.
    pub tokens: Vec<u32>,
    pub data: Vec<u8>,
}

/// A generation request.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// Strings that end generation; they are not part of the output text.
    pub stop: Vec<String>,
    /// Token ids that end generation, besides the model's end-of-generation tokens.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// Keep the sequence's KV blocks after it finishes, until exported or released.
    pub retain_kv: bool,
    /// KV for a prefix of the prompt computed elsewhere; the engine computes the rest.
    pub imported_kv: Option<SequenceKv>,
    /// Streams the prompt's KV blocks out as the prefill completes them.
    pub kv_stream: Option<KvStream>,
}

/// Where an engine streams a prompt's KV while prefilling it (the sending side
/// of a KV transfer).
///
/// In each step, the blocks of the prompt that the step completes (every slot
/// the prompt fills computed) are copied out layer by layer, one [`KvChunk`] per
/// layer as soon as that layer's K/V are final, so the transfer overlaps the rest
/// of the step; the last, partial block goes out with the step that ends the
/// prefill. The
/// channel closes when the sequence ends, so a receiver that saw fewer blocks
/// than the prompt has knows the prefill was cut short. What the channel can
/// hold is bounded by the prompt's own KV: each block is sent once.
#[derive(Debug, Clone)]
pub struct KvStream {
    /// Leading blocks not to send (the receiver already holds them).
    pub skip_blocks: usize,
    pub tx: tmpsc::UnboundedSender<KvChunk>,
}

/// One layer of consecutive blocks of a prompt's KV.
#[derive(Debug, Clone, PartialEq)]
pub struct KvChunk {
    /// Index of the first block in the sequence (block `i` holds tokens `i * block_size ..`).
    pub first_block: usize,
    pub n_blocks: usize,
    pub layer: usize,
    /// The `n_blocks` pieces of the layer, each `piece_bytes` long, in block order.
    pub data: Vec<u8>,
}

/// Blocks reserved in an engine's pool for KV computed elsewhere (the receiving
/// side of a KV transfer).
///
/// The leading `cached_blocks` already hold the right KV (prefix reuse); the
/// sender writes every layer of every other block with [`KvReservation::write`],
/// and [`Engine::submit_reserved`] turns the blocks into a running sequence.
/// Dropping the reservation without submitting it frees the blocks: nothing
/// written into them is ever registered or read.
pub struct KvReservation {
    pub id: u64,
    pub layout: KvLayout,
    /// The tokens whose KV the blocks will hold.
    pub tokens: Vec<u32>,
    /// Target block ids in this engine's pool, one per block of `tokens`, in order.
    pub blocks: Vec<BlockId>,
    /// Leading blocks already cached here; they need no transfer.
    pub cached_blocks: usize,
    link: Link,
    writes: Arc<tokio::sync::Semaphore>,
    settled: bool,
}

impl std::fmt::Debug for KvReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvReservation")
            .field("id", &self.id)
            .field("tokens", &self.tokens.len())
            .field("blocks", &self.blocks.len())
            .field("cached_blocks", &self.cached_blocks)
            .finish()
    }
}

/// Writes queued to the engine thread at once, per engine: the bound on
/// memory held by in-flight KV writes (each at most one layer of a transfer).
const KV_WRITES_IN_FLIGHT: usize = 16;

impl KvReservation {
    /// Checks that `data` is `count` whole pieces of `layer` for blocks
    /// `first_block..first_block + count` (indices into `blocks`) that need writing.
    pub fn check_write(
        &self,
        layer: usize,
        first_block: usize,
        data_len: usize,
    ) -> Result<usize, EngineError> {
        let bad = |reason: String| {
            Err(EngineError::InvalidKvWrite {
                reservation: self.id,
                reason,
            })
        };
        let pb = self.layout.piece_bytes();
        if layer >= self.layout.n_layers {
            return bad(format!(
                "layer {layer} of a model with {} layers",
                self.layout.n_layers
            ));
        }
        if data_len == 0 || !data_len.is_multiple_of(pb) {
            return bad(format!(
                "{data_len} bytes is not whole pieces of {pb} bytes"
            ));
        }
        let count = data_len / pb;
        if first_block < self.cached_blocks || first_block + count > self.blocks.len() {
            return bad(format!(
                "blocks {first_block}..{} outside the writable {}..{}",
                first_block + count,
                self.cached_blocks,
                self.blocks.len()
            ));
        }
        Ok(count)
    }

    /// Writes `layer`'s pieces of consecutive blocks starting at index
    /// `first_block`. Waits while the engine has many writes queued
    /// (backpressure); the copy into the pool happens on the engine thread
    /// between steps.
    pub async fn write(
        &self,
        layer: usize,
        first_block: usize,
        data: Vec<u8>,
    ) -> Result<(), EngineError> {
        self.check_write(layer, first_block, data.len())?;
        let permit = self
            .writes
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.link.stopped())?;
        self.link.send(Command::WriteKv(Box::new(KvWrite {
            reservation: self.id,
            layer,
            first_block,
            data,
            _permit: permit,
        })))
    }

    /// Frees the reserved blocks (the same as dropping the reservation).
    pub fn abort(self) {}
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        if !self.settled {
            // A stopped engine has freed everything already.
            let _ = self.link.send(Command::AbortReservation(self.id));
        }
    }
}

struct KvWrite {
    reservation: u64,
    layer: usize,
    first_block: usize,
    data: Vec<u8>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Request {
    /// A greedy request for `max_tokens` tokens.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            retain_kv: false,
            imported_kv: None,
            kv_stream: None,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token, stop token or stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
    /// Cancelled by the caller.
    Cancelled,
}

impl FinishReason {
    /// The OpenAI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub id: u32,
    /// Text newly complete after this token (may be empty while UTF-8 or a possible stop string is pending).
    pub text: String,
    pub logprob: f32,
    /// Most likely alternatives with log-probabilities, if requested.
    pub top: Vec<(u32, f32)>,
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    Token(GeneratedToken),
    Finished { reason: FinishReason, usage: Usage },
}

/// A submitted request: its id and its token stream.
#[derive(Debug)]
pub struct RequestHandle {
    pub id: u64,
    pub events: tmpsc::UnboundedReceiver<TokenEvent>,
}

/// A whole generation, collected from a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<GeneratedToken>,
    pub text: String,
    pub reason: FinishReason,
    pub usage: Usage,
}

impl RequestHandle {
    /// Blocks until the request finishes and returns everything it produced.
    /// Not for use inside an async runtime.
    pub fn wait(mut self) -> Result<Generation, EngineError> {
        let mut tokens = Vec::new();
        let mut text = String::new();
        while let Some(ev) = self.events.blocking_recv() {
            match ev {
                TokenEvent::Token(t) => {
                    text.push_str(&t.text);
                    tokens.push(t);
                }
                TokenEvent::Finished { reason, usage } => {
                    return Ok(Generation {
                        tokens,
                        text,
                        reason,
                        usage,
                    });
                }
            }
        }
        Err(EngineError::Stopped)
    }
}

/// A snapshot of the engine's load, for routing and autoscaling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub running: usize,
    pub waiting: usize,
    /// Prompt tokens not yet computed, over running and waiting sequences.
    pub pending_prefill_tokens: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Prefix-cache hit rate in blocks since start.
    pub kv_hit_rate: f64,
    /// Steps run and tokens computed since start.
    pub steps: u64,
    pub tokens_computed: u64,
}

enum Command {
    Submit(u64, Box<Request>, tmpsc::UnboundedSender<TokenEvent>),
    Cancel(u64),
    Export(u64, mpsc::Sender<Result<SequenceKv, EngineError>>),
    Release(u64),
    Reserve(
        u64,
        Vec<u32>,
        mpsc::Sender<Result<(Vec<BlockId>, usize), EngineError>>,
    ),
    WriteKv(Box<KvWrite>),
    SubmitReserved(u64, Submission, mpsc::Sender<Result<(), EngineError>>),
    AbortReservation(u64),
    Snapshot(mpsc::Sender<(u64, Vec<BlockHash>)>),
    Shutdown,
}

type Submission = (u64, Box<Request>, tmpsc::UnboundedSender<TokenEvent>);

/// What the engine thread and its handles share read-only.
struct Shared {
    config: ModelConfig,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    layout: KvLayout,
    num_blocks: usize,
}

/// The way to the engine thread, and why it is gone if it is.
#[derive(Clone)]
struct Link {
    commands: mpsc::Sender<Command>,
    failure: watch::Receiver<Option<BackendError>>,
}

impl Link {
    fn send(&self, cmd: Command) -> Result<(), EngineError> {
        // A failed engine may not have closed its queue yet.
        if self.failure.borrow().is_some() {
            return Err(self.stopped());
        }
        self.commands.send(cmd).map_err(|_| self.stopped())
    }

    /// Waits for the engine thread's answer to a command.
    fn recv<T>(&self, rx: &mpsc::Receiver<T>) -> Result<T, EngineError> {
        rx.recv().map_err(|_| self.stopped())
    }

    /// Why the engine thread no longer answers.
    fn stopped(&self) -> EngineError {
        match self.failure.borrow().clone() {
            Some(e) => EngineError::Failed(e),
            None => EngineError::Stopped,
        }
    }
}

/// When the device call in progress on the engine thread began, if one is.
#[derive(Debug, Clone, Default)]
struct Busy(Arc<Mutex<Option<Instant>>>);

impl Busy {
    fn enter(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    fn leave(&self) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    fn elapsed(&self) -> Option<Duration> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|t| t.elapsed())
    }
}

/// How long dropping an engine waits for its thread to finish the step in
/// progress; past it the device is taken for hung and the thread left behind.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running engine. Dropping it stops the engine thread.
pub struct Engine {
    shared: Arc<Shared>,
    link: Link,
    load: Arc<Mutex<LoadReport>>,
    busy: Busy,
    /// [`STOP_GRACE`] (shorter in tests).
    stop_grace: Duration,
    events: broadcast::Sender<KvEvent>,
    next_id: std::sync::atomic::AtomicU64,
    kv_writes: Arc<tokio::sync::Semaphore>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.shared.config.name)
            .finish()
    }
}

impl Engine {
    /// Loads a GGUF model and starts the engine thread.
    pub fn load(path: impl AsRef<Path>, config: EngineConfig) -> Result<Self, EngineError> {
        config.validate()?;
        let file = GgufFile::open(path)?;
        let tokenizer =
            Tokenizer::from_gguf(&file).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        // A model without a chat template can still complete raw prompts.
        let chat_template = ChatTemplate::from_gguf(&file).ok();
        let model = Model::load(file)?;
        let backend = open_backend(config.device, model, config.block_size, config.num_blocks())?;
        Self::start(config, tokenizer, chat_template, backend)
    }

    /// Starts the engine thread over a loaded backend.
    fn start(
        config: EngineConfig,
        tokenizer: Tokenizer,
        chat_template: Option<ChatTemplate>,
        backend: Box<dyn Backend>,
    ) -> Result<Self, EngineError> {
        let mc = backend.config().clone();
        let layout = backend.kv_layout();
        let num_blocks = config.num_blocks();
        let hasher = BlockHasher::new(&mc.name, config.block_size);
        let cache = KvCache::new(layout, num_blocks, hasher);
        let threads = config
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tandem-compute-{i}"))
            .build()
            .map_err(|e| EngineError::ThreadPool(e.to_string()))?;

        let shared = Arc::new(Shared {
            config: mc,
            tokenizer,
            chat_template,
            layout,
            num_blocks,
        });
        let load = Arc::new(Mutex::new(LoadReport {
            kv_blocks_total: num_blocks,
            ..LoadReport::default()
        }));
        let (events, _) = broadcast::channel(4096);
        let (tx, rx) = mpsc::channel();
        let (failure_tx, failure) = watch::channel(None);
        let busy = Busy::default();
        let mut core = Core {
            shared: shared.clone(),
            backend,
            cache,
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            retained: HashMap::new(),
            reservations: HashMap::new(),
            load: load.clone(),
            busy: busy.clone(),
            events: events.clone(),
            steps: 0,
            tokens_computed: 0,
            failure: None,
            failure_tx,
        };
        let thread = std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || pool.install(|| core.run(rx)))
            .map_err(|e| EngineError::ThreadPool(e.to_string()))?;
        Ok(Self {
            shared,
            link: Link {
                commands: tx,
                failure,
            },
            load,
            busy,
            stop_grace: STOP_GRACE,
            events,
            next_id: std::sync::atomic::AtomicU64::new(1),
            kv_writes: Arc::new(tokio::sync::Semaphore::new(KV_WRITES_IN_FLIGHT)),
            thread: Some(thread),
        })
    }

    /// The model's hyperparameters.
    pub fn model_config(&self) -> &ModelConfig {
        &self.shared.config
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    /// The model's chat template, if its file has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.shared.chat_template.as_ref()
    }

    /// The KV cache's block layout.
    pub fn kv_layout(&self) -> KvLayout {
        self.shared.layout
    }

    /// Checks a request and queues it; the stream yields its tokens then `Finished`.
    pub fn submit(&self, request: Request) -> Result<RequestHandle, EngineError> {
        self.check_request(&request)?;
        let id = self.next_id();
        let (tx, rx) = tmpsc::unbounded_channel();
        self.link.send(Command::Submit(id, Box::new(request), tx))?;
        Ok(RequestHandle { id, events: rx })
    }

    /// Reserves blocks for the KV of `tokens` (a prompt, or the prefix of one
    /// whose KV another engine computes): every leading full block already
    /// cached is reused, the others are fresh and wait to be written.
    /// Fails at once if the pool cannot hold them. Blocks the caller until the
    /// engine thread has handled it (at most one step): async code should call
    /// it through `spawn_blocking`, as it does `export_kv`.
    pub fn reserve_kv(&self, tokens: Vec<u32>) -> Result<KvReservation, EngineError> {
        let s = &self.shared;
        self.check_prompt_len(tokens.len())?;
        let id = self.next_id();
        let (tx, rx) = mpsc::channel();
        self.link.send(Command::Reserve(id, tokens.clone(), tx))?;
        let (blocks, cached_blocks) = self.link.recv(&rx)??;
        Ok(KvReservation {
            id,
            layout: s.layout,
            tokens,
            blocks,
            cached_blocks,
            link: self.link.clone(),
            writes: self.kv_writes.clone(),
            settled: false,
        })
    }

    /// Starts `request` from a reservation whose blocks have all been written:
    /// its prompt must strictly extend the reserved tokens, and the engine
    /// computes the rest. An incomplete reservation is refused and freed.
    /// Blocks the caller until the engine thread has handled it (at most one step).
    pub fn submit_reserved(
        &self,
        mut reservation: KvReservation,
        request: Request,
    ) -> Result<RequestHandle, EngineError> {
        self.check_request(&request)?;
        let t = &reservation.tokens;
        if request.imported_kv.is_some()
            || t.len() >= request.prompt.len()
            || request.prompt[..t.len()] != t[..]
        {
            return Err(EngineError::KvMismatch(
                "the reserved tokens must be a strict prefix of the prompt, with no imported KV"
                    .into(),
            ));
        }
        let id = self.next_id();
        let (out, events) = tmpsc::unbounded_channel();
        let (tx, rx) = mpsc::channel();
        // From here the engine thread owns the blocks, whatever the outcome.
        reservation.settled = true;
        self.link.send(Command::SubmitReserved(
            reservation.id,
            (id, Box::new(request), out),
            tx,
        ))?;
        self.link.recv(&rx)??;
        Ok(RequestHandle { id, events })
    }

    fn next_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A prompt (or reserved prefix) must hold a token and leave room for one more.
    fn check_prompt_len(&self, n: usize) -> Result<(), EngineError> {
        let limit = self.shared.config.context_length;
        if n == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if n >= limit {
            return Err(EngineError::PromptTooLong {
                tokens: n,
                limit: limit - 1,
                what: "model context length",
            });
        }
        Ok(())
    }

    fn check_request(&self, request: &Request) -> Result<(), EngineError> {
        let s = &self.shared;
        let n = request.prompt.len();
        self.check_prompt_len(n)?;
        let cache_tokens = s.num_blocks * s.layout.block_size;
        if n >= cache_tokens {
            return Err(EngineError::PromptTooLong {
                tokens: n,
                limit: cache_tokens - 1,
                what: "KV cache capacity",
            });
        }
        request
            .sampling
            .validate()
            .map_err(|e| EngineError::Sampling(e.to_string()))?;
        if let Some(vocab) = request
            .prompt
            .iter()
            .find(|&&t| t as usize >= s.config.vocab_size)
        {
            return Err(EngineError::Config(format!(
                "token id {vocab} is outside the vocabulary of {}",
                s.config.vocab_size
            )));
        }
        if let Some(kv) = &request.imported_kv {
            check_import(kv, &request.prompt, s.layout)?;
        }
        Ok(())
    }

    /// Cancels a request; its stream ends with `Finished { reason: Cancelled }`.
    pub fn cancel(&self, id: u64) {
        // A stopped engine has nothing left to cancel.
        let _ = self.link.send(Command::Cancel(id));
    }

    /// Takes the KV of a finished request submitted with `retain_kv`, freeing its blocks.
    pub fn export_kv(&self, id: u64) -> Result<SequenceKv, EngineError> {
        let (tx, rx) = mpsc::channel();
        self.link.send(Command::Export(id, tx))?;
        self.link.recv(&rx)?
    }

    /// Frees the retained KV of a finished request without exporting it.
    pub fn release_kv(&self, id: u64) {
        let _ = self.link.send(Command::Release(id));
    }

    /// The load after the latest step.
    pub fn load_report(&self) -> LoadReport {
        *self.load.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every block hash cached now, with the sequence number of the first KV
    /// event not reflected in it: what a router rebuilds its view of this
    /// engine from after missing events. Blocks the caller for at most one step.
    pub fn kv_snapshot(&self) -> Result<(u64, Vec<BlockHash>), EngineError> {
        let (tx, rx) = mpsc::channel();
        self.link.send(Command::Snapshot(tx))?;
        self.link.recv(&rx)
    }

    /// KV cache events (blocks stored and removed), numbered per engine.
    /// A subscriber that lags sees a gap in `seq` and should resync.
    pub fn subscribe_kv_events(&self) -> broadcast::Receiver<KvEvent> {
        self.events.subscribe()
    }

    /// Why a stream ended without `Finished`: the engine stopped, after a
    /// device failure ([`EngineError::Failed`]) or a shutdown.
    pub fn stop_reason(&self) -> EngineError {
        self.link.stopped()
    }

    /// How long the forward pass in progress has run, if one is. A step
    /// takes milliseconds to seconds; one that never returns is a hung device,
    /// which no error reports: a worker's watchdog reads this.
    pub fn busy_for(&self) -> Option<Duration> {
        self.busy.elapsed()
    }

    /// The device failure that stopped this engine, if one did.
    pub fn failure(&self) -> Option<BackendError> {
        self.link.failure.borrow().clone()
    }

    /// Resolves when a device failure stops the engine; never otherwise.
    /// Every stream the engine held has ended (without `Finished`) by then.
    pub async fn failed(&self) -> BackendError {
        let mut rx = self.link.failure.clone();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                // Stopped without a failure.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.link.send(Command::Shutdown);
        let Some(t) = self.thread.take() else { return };
        // Joining would wait forever on a hung device: the thread then ends
        // with the process (or by itself once the call returns).
        let deadline = Instant::now() + self.stop_grace;
        while !t.is_finished() {
            if Instant::now() > deadline {
                tracing::error!(
                    busy = ?self.busy.elapsed(),
                    "the engine thread did not stop in {:?}; leaving it behind",
                    self.stop_grace
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if t.join().is_err() {
            tracing::error!("engine thread panicked");
        }
    }
}

fn check_import(kv: &SequenceKv, prompt: &[u32], layout: KvLayout) -> Result<(), EngineError> {
    if kv.layout != layout {
        return Err(EngineError::KvMismatch(format!(
            "layout {:?} differs from this engine's {:?}",
            kv.layout, layout
        )));
    }
    if kv.tokens.len() >= prompt.len() || prompt[..kv.tokens.len()] != kv.tokens[..] {
        return Err(EngineError::KvMismatch(
            "the KV must cover a strict prefix of the prompt".into(),
        ));
    }
    let blocks = kv.tokens.len().div_ceil(layout.block_size);
    if kv.data.len() != blocks * layout.block_bytes() {
        return Err(EngineError::KvMismatch(format!(
            "{} bytes for {} tokens, expected {}",
            kv.data.len(),
            kv.tokens.len(),
            blocks * layout.block_bytes()
        )));
    }
    Ok(())
}

/// A sequence the engine is working on.
struct Sequence {
    id: u64,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose K/V is in the cache.
    computed: usize,
    blocks: Vec<BlockId>,
    /// Hashes of the leading full blocks, chained.
    hashes: Vec<BlockHash>,
    cached_tokens: usize,
    /// Prompt blocks sent on the request's `kv_stream` so far.
    kv_streamed: usize,
    sampler: Sampler,
    request: Box<Request>,
    out: tmpsc::UnboundedSender<TokenEvent>,
    decoder: StreamDecoder,
    /// Generated text so far and how much of it has been sent.
    text: String,
    sent: usize,
}

impl Scheduled for Sequence {
    fn context_len(&self) -> usize {
        self.tokens.len()
    }
    fn computed(&self) -> usize {
        self.computed
    }
    fn blocks_mut(&mut self) -> &mut Vec<BlockId> {
        &mut self.blocks
    }
    fn reset_kv(&mut self) {
        self.blocks.clear();
        self.hashes.clear();
        self.computed = 0;
    }
}

impl Sequence {
    fn new(id: u64, request: Box<Request>, out: tmpsc::UnboundedSender<TokenEvent>) -> Self {
        Self {
            id,
            tokens: request.prompt.clone(),
            prompt_len: request.prompt.len(),
            computed: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
            cached_tokens: 0,
            kv_streamed: 0,
            sampler: Sampler::new(request.sampling.clone()),
            request,
            out,
            decoder: StreamDecoder::default(),
            text: String::new(),
            sent: 0,
        }
    }

    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated(),
            cached_tokens: self.cached_tokens,
        }
    }
}

struct Retained {
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
}

/// Blocks reserved for an incoming transfer, owned by the engine thread.
struct Reserved {
    tokens: Vec<u32>,
    blocks: Vec<BlockId>,
    cached_blocks: usize,
    /// Per fresh block (index minus `cached_blocks`), which layers have been written.
    written: Vec<Vec<bool>>,
    missing: usize,
}

/// The engine thread's state.
struct Core {
    shared: Arc<Shared>,
    backend: Box<dyn Backend>,
    cache: KvCache,
    config: EngineConfig,
    waiting: VecDeque<Sequence>,
    /// In admission order.
    running: Vec<Sequence>,
    retained: HashMap<u64, Retained>,
    reservations: HashMap<u64, Reserved>,
    load: Arc<Mutex<LoadReport>>,
    busy: Busy,
    events: broadcast::Sender<KvEvent>,
    steps: u64,
    tokens_computed: u64,
    /// A device failure seen in the current command or step.
    failure: Option<BackendError>,
    failure_tx: watch::Sender<Option<BackendError>>,
}

impl Core {
    fn run(&mut self, commands: mpsc::Receiver<Command>) {
        let mut stalled = false;
        loop {
            let idle = stalled || (self.running.is_empty() && self.waiting.is_empty());
            let first = if idle {
                match commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else {
                None
            };
            for cmd in first
                .into_iter()
                .chain(std::iter::from_fn(|| commands.try_recv().ok()))
            {
                if !self.handle(cmd) {
                    self.cancel_all();
                    return;
                }
                if self.failure.is_some() {
                    break;
                }
            }
            if self.failure.is_none() {
                stalled = !self.step();
            }
            if let Some(e) = self.failure.take() {
                self.stop_failed(e);
                return;
            }
            self.publish();
        }
    }

    /// Records a device failure; the run loop stops the engine after the
    /// current command or step.
    fn device_failed(&mut self, e: BackendError) {
        tracing::error!(device = %self.backend.name(), error = %e, "the device failed");
        self.failure.get_or_insert(e);
    }

    /// Stops after a device failure: whatever the device holds is suspect, so
    /// no stream gets a `Finished` it did not earn (each ends without one) and
    /// no block is registered or reused again. Later calls answer
    /// [`EngineError::Failed`].
    fn stop_failed(&mut self, e: BackendError) {
        let streams = self.running.len() + self.waiting.len();
        tracing::error!(
            error = %e, streams,
            "the engine stops after a device failure; ending every stream it holds"
        );
        // Set before the streams end, so a consumer that sees its stream end
        // finds the reason.
        self.failure_tx.send_replace(Some(e));
        let held = (
            std::mem::take(&mut self.running),
            std::mem::take(&mut self.waiting),
        );
        self.reservations.clear();
        self.retained.clear();
        // The load shows nothing held before the streams end (with `held`).
        self.publish();
        drop(held);
    }

    /// Applies one command; false means shut down.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(id, request, out) => {
                self.waiting.push_back(Sequence::new(id, request, out));
            }
            Command::Reserve(id, tokens, reply) => {
                let _ = reply.send(self.reserve(id, tokens));
            }
            Command::WriteKv(w) => self.write_kv(&w),
            Command::SubmitReserved(rid, (id, request, out), reply) => {
                let _ = reply.send(self.submit_reserved(rid, id, request, out));
            }
            Command::AbortReservation(id) => {
                if let Some(r) = self.reservations.remove(&id) {
                    tracing::debug!(reservation = id, "KV reservation aborted");
                    self.release_blocks(&r.blocks);
                }
            }
            Command::Cancel(id) => {
                if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
                    if let Some(seq) = self.waiting.remove(i) {
                        self.finish(seq, FinishReason::Cancelled);
                    }
                } else if let Some(i) = self.running.iter().position(|s| s.id == id) {
                    let seq = self.running.remove(i);
                    self.finish(seq, FinishReason::Cancelled);
                }
            }
            Command::Export(id, reply) => {
                let result = match self.retained.remove(&id) {
                    None => Err(EngineError::UnknownRequest(id)),
                    Some(r) => {
                        let read = backend::read_blocks(self.backend.as_ref(), &r.blocks);
                        self.release_blocks(&r.blocks);
                        match read {
                            Ok(data) => Ok(SequenceKv {
                                layout: self.shared.layout,
                                tokens: r.tokens,
                                data,
                            }),
                            Err(e) => {
                                self.device_failed(e.clone());
                                Err(EngineError::Failed(e))
                            }
                        }
                    }
                };
                let _ = reply.send(result);
            }
            Command::Release(id) => {
                if let Some(r) = self.retained.remove(&id) {
                    self.release_blocks(&r.blocks);
                }
            }
            Command::Snapshot(reply) => {
                // Events not yet published precede the snapshot: send them first,
                // so `next_seq` is exactly where a subscriber picks up.
                self.publish();
                let _ = reply.send((self.cache.next_seq(), self.cache.cached_hashes()));
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn cancel_all(&mut self) {
        let seqs: Vec<Sequence> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        for seq in seqs {
            self.finish(seq, FinishReason::Cancelled);
        }
    }

    fn reserve(&mut self, id: u64, tokens: Vec<u32>) -> Result<(Vec<BlockId>, usize), EngineError> {
        let n_blocks = tokens.len().div_ceil(self.shared.layout.block_size);
        let hashes = self.cache.hasher().hash_prefix(&tokens);
        let mut blocks = self.cache.acquire_prefix(&hashes);
        let cached_blocks = blocks.len();
        let fresh = n_blocks - cached_blocks;
        let Some(new) = self.cache.allocate_many(fresh) else {
            let free = self.cache.num_free();
            self.release_blocks(&blocks);
            return Err(EngineError::KvCacheFull {
                needed: fresh,
                free,
            });
        };
        blocks.extend(new);
        let n_layers = self.shared.layout.n_layers;
        self.reservations.insert(
            id,
            Reserved {
                tokens,
                blocks: blocks.clone(),
                cached_blocks,
                written: vec![vec![false; n_layers]; fresh],
                missing: fresh * n_layers,
            },
        );
        Ok((blocks, cached_blocks))
    }

    fn write_kv(&mut self, w: &KvWrite) {
        let Some(r) = self.reservations.get_mut(&w.reservation) else {
            // Aborted while the write was queued: nothing to do.
            return;
        };
        let pb = self.shared.layout.piece_bytes();
        // `KvReservation::write` checked the bounds against the same reservation.
        let mut blocks = Vec::with_capacity(w.data.len() / pb);
        for index in w.first_block..w.first_block + w.data.len() / pb {
            let Some(&b) = r.blocks.get(index) else { break };
            let Some(done) = index
                .checked_sub(r.cached_blocks)
                .and_then(|f| r.written.get_mut(f))
                .and_then(|l| l.get_mut(w.layer))
            else {
                break;
            };
            if !*done {
                *done = true;
                r.missing -= 1;
            }
            blocks.push(b);
        }
        let data = &w.data[..blocks.len() * pb];
        if let Err(e) = self.backend.write_kv_pieces(&blocks, w.layer, data) {
            self.device_failed(e);
        }
    }

    fn submit_reserved(
        &mut self,
        rid: u64,
        id: u64,
        request: Box<Request>,
        out: tmpsc::UnboundedSender<TokenEvent>,
    ) -> Result<(), EngineError> {
        let r = self
            .reservations
            .remove(&rid)
            .ok_or(EngineError::UnknownReservation(rid))?;
        if r.missing > 0 {
            self.release_blocks(&r.blocks);
            return Err(EngineError::IncompleteReservation {
                reservation: rid,
                missing: r.missing,
            });
        }
        let mut seq = Sequence::new(id, request, out);
        seq.computed = r.tokens.len();
        seq.cached_tokens = r.cached_blocks * self.shared.layout.block_size;
        seq.blocks = r.blocks;
        // The written blocks are complete now: make the full ones reusable.
        register_full_blocks(&mut self.cache, &mut seq);
        self.waiting.push_back(seq);
        Ok(())
    }

    fn release_blocks(&mut self, blocks: &[BlockId]) {
        self.cache.release_all(blocks);
    }

    /// Moves waiting sequences into the running set while blocks allow.
    fn admit(&mut self) {
        let bs = self.shared.layout.block_size;
        while self.running.len() < self.config.max_running {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if !seq.blocks.is_empty() {
                // Started from a reservation: its KV is in place already.
                let needed = (seq.tokens.len() + 1)
                    .div_ceil(bs)
                    .saturating_sub(seq.blocks.len());
                if self.cache.num_free() < needed {
                    self.waiting.push_front(seq);
                    break;
                }
                self.running.push(seq);
                continue;
            }
            let hashes = self.cache.hasher().hash_prefix(&seq.tokens);
            let Some(mut blocks) =
                schedule::admit_prefix(&mut self.cache, &hashes, seq.tokens.len())
            else {
                self.waiting.push_front(seq);
                break;
            };
            let import = seq
                .request
                .imported_kv
                .as_ref()
                .map(|kv| kv.tokens.len().div_ceil(bs));
            let import_blocks = import.unwrap_or(0).saturating_sub(blocks.len());
            let acquired = blocks.len();
            let mut computed = acquired * bs;
            seq.cached_tokens = computed;
            if let (Some(kv), true) = (&seq.request.imported_kv, import_blocks > 0) {
                let Some(new) = self.cache.allocate_many(import_blocks) else {
                    self.release_blocks(&blocks);
                    self.waiting.push_front(seq);
                    break;
                };
                let bb = self.shared.layout.block_bytes();
                let data = &kv.data[blocks.len() * bb..][..new.len() * bb];
                if let Err(e) = backend::write_blocks(self.backend.as_mut(), &new, data) {
                    self.device_failed(e);
                    return;
                }
                blocks.extend(new);
                computed = kv.tokens.len();
            }
            seq.hashes = hashes[..acquired].to_vec();
            seq.blocks = blocks;
            seq.computed = computed;
            seq.request.imported_kv = None;
            register_full_blocks(&mut self.cache, &mut seq);
            self.running.push(seq);
        }
    }

    /// Plans one batch (see [`schedule::plan_step`]): (running index, tokens to compute) pairs.
    fn plan(&mut self) -> Vec<(usize, usize)> {
        schedule::plan_step(
            &mut self.running,
            &mut self.waiting,
            &mut self.cache,
            self.config.max_batch_tokens,
        )
    }

    /// Runs one batch; false when nothing could run (the queue waits on retained KV).
    fn step(&mut self) -> bool {
        self.admit();
        if self.failure.is_some() {
            return false;
        }
        let plan = self.plan();
        if plan.is_empty() {
            if self.running.is_empty() && self.retained.is_empty() && self.reservations.is_empty() {
                // Nothing fits even with the whole cache free: give up on the head of the queue.
                if let Some(seq) = self.waiting.pop_front() {
                    tracing::warn!(id = seq.id, "sequence does not fit the KV cache");
                    self.finish(seq, FinishReason::Length);
                    return true;
                }
            }
            return false;
        }
        let batch: Vec<BatchSeq<'_>> = plan
            .iter()
            .map(|&(i, take)| {
                let s = &self.running[i];
                BatchSeq {
                    tokens: &s.tokens[s.computed..s.computed + take],
                    start_pos: s.computed,
                    blocks: &s.blocks,
                    want_logits: s.computed + take == s.tokens.len(),
                }
            })
            .collect();
        let bs = self.shared.layout.block_size;
        let pending: Vec<PendingKv> = plan
            .iter()
            .filter_map(|&(i, take)| pending_kv(&self.running[i], take, bs))
            .collect();
        let piece_bytes = self.shared.layout.piece_bytes();
        let mut read_failed = None;
        let mut send_layer = |layer: usize, kv: &dyn KvRead| {
            if read_failed.is_some() {
                return;
            }
            for p in &pending {
                let mut data = Vec::with_capacity(p.blocks.len() * piece_bytes);
                if let Err(e) = kv.read_kv_pieces(&p.blocks, layer, &mut data) {
                    read_failed = Some(e);
                    return;
                }
                // A receiver that hung up has given up on the transfer; the
                // sequence goes on.
                let _ = p.tx.send(KvChunk {
                    first_block: p.first,
                    n_blocks: p.blocks.len(),
                    layer,
                    data,
                });
            }
        };
        self.busy.enter();
        // Without a stream to feed, the backend may run the step as one unit.
        let hook: Option<LayerHook<'_>> = if pending.is_empty() {
            None
        } else {
            Some(&mut send_layer)
        };
        // Each sequence whose chunk ends its known tokens samples one; when
        // every one of them is plain greedy the backend picks the tokens
        // itself (on a GPU, without copying the logits back).
        let samplers = plan.iter().filter_map(|&(i, take)| {
            let s = &self.running[i];
            (s.computed + take == s.tokens.len()).then_some(&s.sampler)
        });
        let rows = samplers.clone().count();
        let greedy = rows > 0 && samplers.into_iter().all(Sampler::is_plain_greedy);
        let vocab = self.shared.config.vocab_size;
        let forward = if greedy {
            self.backend
                .forward_greedy(&batch, hook)
                .map(Readout::Picked)
        } else {
            self.backend.forward(&batch, hook).map(Readout::Logits)
        };
        self.busy.leave();
        drop(batch);
        let readout = match (forward, read_failed) {
            (Ok(r), None) => r,
            (Err(e), _) | (Ok(_), Some(e)) => {
                self.device_failed(e);
                return false;
            }
        };
        if !readout.fits(rows, vocab) {
            self.device_failed(BackendError(format!(
                "the step's output does not fit its {rows} sampling sequences"
            )));
            return false;
        }
        self.steps += 1;
        self.tokens_computed += plan.iter().map(|&(_, t)| t as u64).sum::<u64>();

        // Sequences whose whole prompt is now computed sample their next token, each
        // from its row of the readout, in parallel.
        let mut sampling = vec![None; self.running.len()];
        let mut row = 0;
        for &(i, take) in &plan {
            let seq = &mut self.running[i];
            seq.computed += take;
            register_full_blocks(&mut self.cache, seq);
            if let Some(stream) = &seq.request.kv_stream {
                let ready = streamable_blocks(seq.computed, seq.prompt_len, bs);
                seq.kv_streamed = seq.kv_streamed.max(ready).max(stream.skip_blocks);
            }
            if seq.computed == seq.tokens.len() {
                sampling[i] = Some(row);
                row += 1;
            }
        }
        let sampled: Vec<(usize, SampledToken)> = self
            .running
            .par_iter_mut()
            .zip(sampling)
            .enumerate()
            .filter_map(|(i, (seq, row))| {
                let row = row?;
                let token = match &readout {
                    Readout::Logits(logits) => {
                        let logits = &logits[row * vocab..(row + 1) * vocab];
                        seq.sampler.sample(logits, &seq.tokens)
                    }
                    Readout::Picked(picked) => {
                        let (id, logprob) = picked[row];
                        SampledToken {
                            id,
                            logprob,
                            top: Vec::new(),
                        }
                    }
                };
                Some((i, token))
            })
            .collect();
        let mut done = Vec::new();
        for (i, token) in sampled {
            if let Some(reason) = accept(&self.shared, &mut self.running[i], token) {
                done.push((i, reason));
            }
        }
        // Remove finished sequences from the back so indices stay valid.
        done.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, reason) in done {
            let seq = self.running.remove(i);
            self.finish(seq, reason);
        }
        // Streams whose receiver is gone are cancelled.
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].out.is_closed() {
                let seq = self.running.remove(i);
                self.finish(seq, FinishReason::Cancelled);
            } else {
                i += 1;
            }
        }
        true
    }

    fn finish(&mut self, mut seq: Sequence, reason: FinishReason) {
        let blocks = std::mem::take(&mut seq.blocks);
        if seq.request.retain_kv && reason != FinishReason::Cancelled && seq.computed > 0 {
            let tokens = seq.tokens[..seq.computed].to_vec();
            self.retained.insert(seq.id, Retained { tokens, blocks });
        } else {
            self.release_blocks(&blocks);
        }
        let _ = seq.out.send(TokenEvent::Finished {
            reason,
            usage: seq.usage(),
        });
    }

    fn publish(&mut self) {
        for ev in self.cache.take_events() {
            // No subscribers is fine: nobody is routing on this engine's cache.
            let _ = self.events.send(ev);
        }
        let pending_prefill_tokens = self
            .running
            .iter()
            .chain(&self.waiting)
            .map(|s| s.prompt_len.saturating_sub(s.computed))
            .sum();
        let report = LoadReport {
            running: self.running.len(),
            waiting: self.waiting.len(),
            pending_prefill_tokens,
            kv_blocks_used: self.cache.num_in_use(),
            kv_blocks_total: self.cache.num_blocks(),
            kv_hit_rate: self.cache.hit_rate(),
            steps: self.steps,
            tokens_computed: self.tokens_computed,
        };
        *self.load.lock().unwrap_or_else(PoisonError::into_inner) = report;
    }
}

/// What a step gives the sampling sequences: a row of logits each, or each
/// one's greedy token and log-probability picked by the backend.
enum Readout {
    Logits(Vec<f32>),
    Picked(Vec<(u32, f32)>),
}

impl Readout {
    /// Whether it holds exactly `rows` rows.
    fn fits(&self, rows: usize, vocab: usize) -> bool {
        match self {
            Readout::Logits(l) => l.len() == rows * vocab,
            Readout::Picked(p) => p.len() == rows,
        }
    }
}

/// Prompt blocks complete once `computed` tokens are: the full ones, and the
/// last, partial one when the whole prompt is.
fn streamable_blocks(computed: usize, prompt_len: usize, block_size: usize) -> usize {
    if computed >= prompt_len {
        prompt_len.div_ceil(block_size)
    } else {
        computed / block_size
    }
}

/// Prompt blocks a step completes for a sequence with a KV stream, to send
/// layer by layer during the step.
struct PendingKv {
    tx: tmpsc::UnboundedSender<KvChunk>,
    first: usize,
    blocks: Vec<BlockId>,
}

/// The blocks of `seq` that computing `take` more tokens completes and its
/// stream has not had yet; the last, partial block counts once the prompt is done.
fn pending_kv(seq: &Sequence, take: usize, block_size: usize) -> Option<PendingKv> {
    let stream = seq.request.kv_stream.as_ref()?;
    let ready = streamable_blocks(seq.computed + take, seq.prompt_len, block_size);
    let first = seq.kv_streamed.max(stream.skip_blocks);
    (ready > first).then(|| PendingKv {
        tx: stream.tx.clone(),
        first,
        blocks: seq.blocks[first..ready].to_vec(),
    })
}

/// Registers every newly full, computed block of `seq` under its chained hash.
fn register_full_blocks(cache: &mut KvCache, seq: &mut Sequence) {
    let bs = cache.layout().block_size;
    while (seq.hashes.len() + 1) * bs <= seq.computed {
        let i = seq.hashes.len();
        let parent = seq.hashes.last().copied();
        let hash = cache
            .hasher()
            .hash_block(parent, &seq.tokens[i * bs..(i + 1) * bs]);
        cache.register(seq.blocks[i], parent, hash);
        seq.hashes.push(hash);
    }
}

/// Appends a sampled token, streams it, and says whether the sequence is done.
fn accept(shared: &Shared, seq: &mut Sequence, sampled: SampledToken) -> Option<FinishReason> {
    let tok = sampled.id;
    seq.tokens.push(tok);
    let tokenizer = &shared.tokenizer;
    let eog = !seq.request.ignore_eos && tokenizer.is_eog(tok)
        || seq.request.stop_token_ids.contains(&tok);
    let mut reason = None;
    let mut text = String::new();
    if eog {
        reason = Some(FinishReason::Stop);
    } else {
        seq.text.push_str(&seq.decoder.push(tokenizer, tok));
        let (emit_to, hit) = stop_scan(&seq.text, seq.sent, &seq.request.stop);
        text.push_str(&seq.text[seq.sent..emit_to]);
        seq.sent = emit_to;
        if hit {
            seq.text.truncate(emit_to);
            reason = Some(FinishReason::Stop);
        }
    }
    if reason.is_none() {
        let context_full = seq.tokens.len() >= shared.config.context_length;
        let cache_full = seq.tokens.len() >= shared.num_blocks * shared.layout.block_size;
        if seq.generated() >= seq.request.max_tokens || context_full || cache_full {
            reason = Some(FinishReason::Length);
            // Flush text held back for a stop string that can no longer complete.
            text.push_str(&seq.text[seq.sent..]);
            seq.sent = seq.text.len();
        }
    }
    let _ = seq.out.send(TokenEvent::Token(GeneratedToken {
        id: tok,
        text,
        logprob: sampled.logprob,
        top: sampled.top,
    }));
    reason
}

/// Finds how much of `text` past `sent` may be emitted given the stop strings:
/// returns (emit up to this byte, whether a stop string was found). Text that
/// could be the start of a stop string is held back.
fn stop_scan(text: &str, sent: usize, stops: &[String]) -> (usize, bool) {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    if longest == 0 {
        return (text.len(), false);
    }
    // A stop string may straddle what was already sent only if it started in held-back text,
    // and held-back text is never sent, so searching from `sent` is enough.
    let mut first: Option<usize> = None;
    for s in stops.iter().filter(|s| !s.is_empty()) {
        if let Some(i) = text[sent..].find(s.as_str()) {
            first = Some(first.map_or(sent + i, |f| f.min(sent + i)));
        }
    }
    if let Some(i) = first {
        return (i, true);
    }
    // Hold back the longest suffix that is a prefix of some stop string.
    let mut hold = 0;
    for s in stops {
        for k in (1..s.len().min(text.len() - sent + 1)).rev() {
            if s.is_char_boundary(k) && text.ends_with(&s[..k]) {
                hold = hold.max(k);
                break;
            }
        }
    }
    (text.len() - hold, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_scan_holds_back_possible_stops() {
        let stops = vec!["\n\nUser".to_string()];
        assert_eq!(stop_scan("Hello", 0, &stops), (5, false));
        assert_eq!(stop_scan("Hello\n", 0, &stops), (5, false));
        assert_eq!(stop_scan("Hello\n\nUs", 0, &stops), (5, false));
        assert_eq!(stop_scan("Hello\n\nUser: hi", 0, &stops), (5, true));
        assert_eq!(stop_scan("Hello\nthere", 5, &stops), (11, false));
        assert_eq!(stop_scan("abc", 0, &[]), (3, false));
    }

    /// `--device cuda` where it cannot run is an error that says why, not a panic:
    /// a build without the feature says how to build it; a machine without the
    /// driver (or the GPU) names what is missing.
    #[test]
    fn cuda_where_it_cannot_run_is_a_clear_error() {
        #[cfg(feature = "cuda")]
        if crate::cuda::probe(0).is_ok() {
            eprintln!("skipped: this machine has a GPU");
            return;
        }
        let config = EngineConfig {
            kv_cache_tokens: 256,
            device: Device::Cuda(0),
            ..EngineConfig::default()
        };
        let load = || Engine::load(crate::paths::test_model_path(), config.clone());
        let result = std::panic::catch_unwind(load).expect("loading must not panic");
        let msg = result.expect_err("no CUDA here").to_string();
        if cfg!(feature = "cuda") {
            assert!(
                msg.contains("libcuda.so.1") || msg.contains("no CUDA device"),
                "{msg}"
            );
        } else {
            assert!(msg.contains("--features cuda"), "{msg}");
        }
    }

    /// A CPU backend whose device fails on cue: `forward` after
    /// `forwards_left` steps, or every KV read inside a step.
    struct Faulty {
        inner: CpuBackend,
        forwards_left: usize,
        unreadable: bool,
        /// Each step waits for a message here first (a slow or hung device).
        gate: Option<mpsc::Receiver<()>>,
    }

    struct Unreadable;

    impl KvRead for Unreadable {
        fn read_kv_pieces(
            &self,
            _: &[BlockId],
            _: usize,
            _: &mut Vec<u8>,
        ) -> Result<(), BackendError> {
            Err(BackendError("injected KV read fault".into()))
        }
    }

    impl Backend for Faulty {
        fn name(&self) -> String {
            "faulty".into()
        }
        fn config(&self) -> &ModelConfig {
            self.inner.config()
        }
        fn kv_layout(&self) -> KvLayout {
            self.inner.kv_layout()
        }
        fn forward(
            &mut self,
            batch: &[BatchSeq<'_>],
            on_layer: Option<crate::backend::LayerHook<'_>>,
        ) -> Result<Vec<f32>, BackendError> {
            if let Some(gate) = &self.gate {
                let _ = gate.recv();
            }
            if self.forwards_left == 0 {
                return Err(BackendError("injected step fault".into()));
            }
            self.forwards_left -= 1;
            match on_layer {
                Some(hook) if self.unreadable => self
                    .inner
                    .forward(batch, Some(&mut |l, _| hook(l, &Unreadable))),
                on_layer => self.inner.forward(batch, on_layer),
            }
        }
        fn read_kv_pieces(
            &self,
            b: &[BlockId],
            l: usize,
            out: &mut Vec<u8>,
        ) -> Result<(), BackendError> {
            self.inner.read_kv_pieces(b, l, out)
        }
        fn write_kv_pieces(
            &mut self,
            b: &[BlockId],
            l: usize,
            data: &[u8],
        ) -> Result<(), BackendError> {
            self.inner.write_kv_pieces(b, l, data)
        }
    }

    fn faulty_engine(forwards_left: usize, unreadable: bool) -> Engine {
        faulty_engine_gated(forwards_left, unreadable, None)
    }

    fn faulty_engine_gated(
        forwards_left: usize,
        unreadable: bool,
        gate: Option<mpsc::Receiver<()>>,
    ) -> Engine {
        let config = EngineConfig {
            kv_cache_tokens: 1024,
            threads: Some(2),
            ..EngineConfig::default()
        };
        let file = GgufFile::open(crate::paths::test_model_path()).expect("model");
        let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer");
        let model = Model::load(file).expect("model");
        let backend = Faulty {
            inner: CpuBackend::new(model, config.block_size, config.num_blocks()),
            forwards_left,
            unreadable,
            gate,
        };
        Engine::start(config, tokenizer, None, Box::new(backend)).expect("engine")
    }

    /// Drains a stream: its tokens, and whether it ended with `Finished`.
    fn drain(h: &mut RequestHandle) -> (usize, bool) {
        let mut tokens = 0;
        while let Some(ev) = h.events.blocking_recv() {
            match ev {
                TokenEvent::Token(_) => tokens += 1,
                TokenEvent::Finished { .. } => return (tokens, true),
            }
        }
        (tokens, false)
    }

    /// A device failure mid-serving stops the engine, not the process: every
    /// stream it held ends without `Finished` (nothing computed after the
    /// fault passes for output), every later call answers with the failure,
    /// and `failed()` wakes whoever supervises the engine.
    #[test]
    fn a_device_failure_ends_every_stream_and_fails_later_calls() {
        let engine = faulty_engine(3, false);
        let mut request = Request::new((1..40).collect(), 32);
        request.ignore_eos = true;
        let mut a = engine.submit(request.clone()).expect("submit");
        let mut b = engine.submit(request.clone()).expect("submit");
        // Three good steps: the prefill (with the first token) and two decode
        // steps; the fourth fails. `b` joins in the first or the second step.
        assert_eq!(drain(&mut a), (3, false));
        let (b_tokens, b_finished) = drain(&mut b);
        assert!((2..=3).contains(&b_tokens) && !b_finished, "{b_tokens}");

        let failure = engine.failure().expect("the failure is recorded");
        assert!(failure.0.contains("injected step fault"), "{failure}");
        for e in [
            engine.submit(request).map(|_| ()).unwrap_err(),
            engine
                .reserve_kv((1..40).collect())
                .map(|_| ())
                .unwrap_err(),
            engine.kv_snapshot().map(|_| ()).unwrap_err(),
            engine.stop_reason(),
        ] {
            assert!(matches!(&e, EngineError::Failed(f) if *f == failure), "{e}");
        }
        assert_eq!(engine.load_report().running, 0);
        let mut failed = std::pin::pin!(engine.failed());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert_eq!(
            failed.as_mut().poll(&mut cx),
            std::task::Poll::Ready(failure)
        );
    }

    /// A KV piece that cannot be read out mid-step fails the engine too: the
    /// KV stream closes short (its sender fails the transfer rather than
    /// finishing it) and the request's stream ends without `Finished`.
    #[test]
    fn a_failed_kv_read_closes_the_kv_stream_short() {
        let engine = faulty_engine(usize::MAX, true);
        let (tx, mut chunks) = tmpsc::unbounded_channel();
        let mut request = Request::new((1..40).collect(), 1);
        request.kv_stream = Some(KvStream { skip_blocks: 0, tx });
        let mut h = engine.submit(request).expect("submit");
        assert_eq!(drain(&mut h), (0, false));
        assert!(chunks.blocking_recv().is_none(), "no KV left the engine");
        let failure = engine.failure().expect("the failure is recorded");
        assert!(failure.0.contains("injected KV read fault"), "{failure}");
    }

    /// `busy_for` says how long the step in progress has been in the device:
    /// nothing while idle, a growing figure while a step hangs, nothing again
    /// once it returns.
    #[test]
    fn busy_for_measures_a_step_stuck_in_the_device() {
        let (open, gate) = mpsc::channel();
        let engine = faulty_engine_gated(usize::MAX, false, Some(gate));
        assert_eq!(engine.busy_for(), None, "idle");
        let mut h = engine
            .submit(Request::new((1..20).collect(), 1))
            .expect("submit");
        let start = Instant::now();
        while engine
            .busy_for()
            .is_none_or(|b| b < Duration::from_millis(300))
        {
            assert!(start.elapsed() < Duration::from_secs(10), "never busy");
            std::thread::sleep(Duration::from_millis(20));
        }
        open.send(()).expect("release the step");
        assert_eq!(drain(&mut h), (1, true));
        assert_eq!(engine.busy_for(), None, "idle again");
        drop(open);
    }

    /// Dropping an engine whose step never returns (a hung device) gives up
    /// on its thread after the grace period instead of hanging the caller.
    #[test]
    fn dropping_an_engine_stuck_in_the_device_does_not_hang() {
        let (open, gate) = mpsc::channel::<()>();
        let mut engine = faulty_engine_gated(usize::MAX, false, Some(gate));
        engine.stop_grace = Duration::from_millis(300);
        let _h = engine
            .submit(Request::new((1..20).collect(), 1))
            .expect("submit");
        while engine.busy_for().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let start = Instant::now();
        drop(engine);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
        drop(open);
    }

    #[test]
    fn config_validation_names_the_field() {
        let bad = EngineConfig {
            block_size: 0,
            ..EngineConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("block_size")
        );
        assert!(EngineConfig::default().validate().is_ok());
    }
}

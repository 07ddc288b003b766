//! The `tandem` command: argument parsing and dispatch; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tandem::bench::{self, EngineBenchOptions};
use tandem::generate::{self, GenerateOptions, PromptKind};
use tandem_engine::device::Device;

/// Disaggregated LLM serving: prefill and decode workers, KV-aware routing, a control plane.
#[derive(Parser)]
#[command(name = "tandem", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Generate text from a prompt with the in-process engine.
    Generate(GenerateArgs),
    /// Print the token ids of a text (special tokens parsed, no BOS added).
    Tokenize {
        #[command(flatten)]
        model: ModelArg,
        /// Print `{"ids": [...]}`.
        #[arg(long)]
        json: bool,
        /// The text to tokenize.
        text: String,
    },
    /// Start a local cluster: control-plane store, router, prefill and decode workers.
    Up(UpArgs),
    /// Operate a running cluster through the router's admin API.
    Ctl(tandem::ctl::CtlArgs),
    /// Serve the embedded control-plane store over gRPC (what `tandem up` hosts).
    Control(tandem::control::ControlArgs),
    /// Certificates for a cluster that `tandem up` does not start.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
    /// Replay a request trace through the router against simulated workers.
    Sim(tandem::sim::SimArgs),
    /// Measure performance.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Run a prefill worker (computes prompts' KV and streams it to decode workers).
    Prefill(tandem_prefill_worker::PrefillArgs),
    /// Run a decode worker (generates tokens, prefilling locally or on a prefill worker).
    Decode(tandem_decode_worker::DecodeArgs),
    /// Run the router: the OpenAI API in front of the cluster's workers.
    Router(tandem_router::serve::RouterArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download the default model (SmolLM2-135M-Instruct Q4_1) into the cache; prints its path.
    Pull,
    /// Write a GGUF with a real Llama's shapes and seeded random weights (for speed
    /// measurements at a realistic size, no download; the output is gibberish).
    Synth {
        /// llama-1b (Llama 3.2 1B), llama-8b (Llama 3.1 8B) or tiny (tests).
        #[arg(long)]
        shape: String,
        /// q4_1, q8_0 or f16 (norms stay f32).
        #[arg(long)]
        quant: String,
        /// Seed of the weights: the same seed writes the same file.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The GGUF whose tokenizer to copy (default: the default model, pulled if missing).
        #[arg(long, value_name = "GGUF")]
        tokenizer_from: Option<PathBuf>,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
        /// Where to write the model.
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Write a new cluster CA and one shared identity (ca.pem, node.pem,
    /// node.key) into DIR, the layout `--tls-dir` reads.
    Init {
        /// Where to write the files (must not hold them already).
        dir: PathBuf,
        /// A DNS name or IP address the certificate is valid for (repeat for
        /// more); processes sharing it pass the first as `--tls-name`.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// The cluster's name, for the CA's subject.
        #[arg(long, default_value = "local")]
        cluster: String,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill, single-stream decode and 8-stream decode throughput of the engine.
    Engine {
        #[command(flatten)]
        model: ModelArg,
        /// Compute threads (default: every core).
        #[arg(long)]
        threads: Option<usize>,
        /// The device to run on: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
        #[arg(long, default_value = "cpu", value_name = "DEVICE")]
        device: Device,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Also run llama.cpp's `llama-bench` at this path on the same file and threads.
        #[arg(long, value_name = "PATH")]
        llama_bench: Option<PathBuf>,
        /// Also run llama.cpp's `llama-server` at this path with 8 and 64 concurrent streams.
        #[arg(long, value_name = "PATH")]
        llama_server: Option<PathBuf>,
        /// Timed repetitions of each measurement.
        #[arg(long, default_value_t = 3)]
        repetitions: usize,
    },
    /// KV transfer throughput and latency: QUIC, local, plain TCP and memcpy.
    Transfer {
        #[command(flatten)]
        model: ModelArg,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Timed transfers per size and path.
        #[arg(long, default_value_t = 5)]
        repetitions: usize,
        /// Between two real engines instead: engine A prefills a prompt and
        /// streams its KV into blocks engine B reserved (shared memory, QUIC).
        #[arg(long)]
        engines: bool,
        /// With --engines: the engines' device (cpu, cuda, cuda:N).
        #[arg(long, default_value = "cpu", value_name = "DEVICE")]
        device: Device,
        /// With --engines: prompt tokens per prefill.
        #[arg(long, default_value_t = 2048)]
        tokens: usize,
    },
    /// Router speed: decision time, KV event ingestion, index memory.
    Router(tandem::bench_router::RouterBenchArgs),
    /// Load an OpenAI-compatible endpoint: TTFT, ITL, end-to-end latency, throughput.
    Serve(tandem::bench_serve::ServeBenchArgs),
    /// The router's cost: CPU per request and added latency, against an echo worker.
    Frontend(tandem::bench_frontend::FrontendBenchArgs),
}

#[derive(Args)]
struct UpArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The OpenAI API port.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The API's address (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Prefill workers.
    #[arg(long, default_value_t = 1)]
    prefill: usize,
    /// Decode workers.
    #[arg(long, default_value_t = 1)]
    decode: usize,
    /// Whether the router prefills on a prefill worker: never, auto or always.
    #[arg(long, default_value = "auto")]
    disagg: String,
    /// The cluster's name (its keys in the store, its run directory).
    #[arg(long, default_value = "local")]
    cluster: String,
    /// Compute threads per worker (default: the cores shared out).
    #[arg(long)]
    threads: Option<usize>,
    /// Require this API key (repeatable).
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// Where the cluster keeps its files (default: the cache's clusters/NAME).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// The device every worker runs on: cpu, cuda or cuda:N (cuda needs a build
    /// with `--features cuda`).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: Device,
    /// Extra arguments passed to every worker (e.g. `--worker-arg=--kv-blocks=512`).
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    worker_args: Vec<String>,
    /// Run the planner: scale prefill and decode workers to the SLA targets
    /// (`tandem ctl targets`); without it only operators scale them.
    #[arg(long)]
    autoscale: bool,
}

#[derive(Args)]
struct ModelArg {
    /// A GGUF file (default: the default model, pulled if missing).
    #[arg(long, env = "TANDEM_MODEL")]
    model: Option<PathBuf>,
}

impl ModelArg {
    fn resolve(self) -> anyhow::Result<PathBuf> {
        match self.model {
            Some(path) => {
                anyhow::ensure!(
                    path.exists(),
                    "model file {} does not exist",
                    path.display()
                );
                Ok(path)
            }
            None => {
                tandem::model_pull::pull_default_model(true).context("fetching the default model")
            }
        }
    }
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("input").required(true))]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Raw prompt text (special tokens parsed; BOS added if the model wants it).
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// A user message, wrapped in the model's chat template.
    #[arg(long, group = "input")]
    chat: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this string appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Compute threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// The device to run on: cpu, cuda or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: Device,
    /// Print one JSON object with ids, text, finish reason and top-3 log-probabilities.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // TLS clients (model download, benchmarks, cluster mTLS) use the ring provider:
    // it needs no C toolchain beyond the compiler.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Model {
            command: ModelCommand::Pull,
        } => {
            let path = tandem::model_pull::pull_default_model(true)?;
            println!("{}", path.display());
        }
        Command::Model {
            command:
                ModelCommand::Synth {
                    shape,
                    quant,
                    seed,
                    tokenizer_from,
                    force,
                    out,
                },
        } => {
            let opts = tandem_engine::synth::SynthOptions {
                shape: shape.parse()?,
                quant: quant.parse()?,
                seed,
                tokenizer_from: ModelArg {
                    model: tokenizer_from,
                }
                .resolve()?,
                out,
                force,
            };
            let start = std::time::Instant::now();
            let r = tandem_engine::synth::synthesize(&opts)?;
            println!(
                "wrote {}: {} tensors, {:.3} B parameters, {:.2} GB, in {:.1} s",
                r.path.display(),
                r.n_tensors,
                r.n_params as f64 / 1e9,
                r.file_bytes as f64 / 1e9,
                start.elapsed().as_secs_f64()
            );
        }
        Command::Generate(a) => {
            let prompt = match (a.prompt, a.chat) {
                (Some(p), _) => PromptKind::Raw(p),
                (None, Some(c)) => PromptKind::Chat(c),
                (None, None) => anyhow::bail!("give --prompt or --chat"),
            };
            let opts = GenerateOptions {
                model: a.model.resolve()?,
                prompt,
                max_tokens: a.max_tokens,
                temperature: a.temperature,
                top_p: a.top_p,
                top_k: a.top_k,
                min_p: a.min_p,
                repetition_penalty: a.repetition_penalty,
                seed: a.seed,
                stop: a.stop,
                threads: a.threads,
                device: a.device,
                json: a.json,
            };
            generate::run(&opts)?;
        }
        Command::Tokenize { model, json, text } => {
            generate::tokenize(&model.resolve()?, &text, json)?;
        }
        Command::Bench {
            command:
                BenchCommand::Engine {
                    model,
                    threads,
                    device,
                    json,
                    llama_bench,
                    llama_server,
                    repetitions,
                },
        } => {
            let opts = EngineBenchOptions {
                model: model.resolve()?,
                threads,
                device,
                json,
                llama_bench,
                llama_server,
                repetitions,
            };
            bench::engine(&opts)?;
        }
        Command::Bench {
            command:
                BenchCommand::Transfer {
                    model,
                    json,
                    repetitions,
                    engines,
                    device,
                    tokens,
                },
        } => {
            let model = model.resolve()?;
            if engines {
                tandem::bench_stream::run(&tandem::bench_stream::StreamBenchOptions {
                    model,
                    device,
                    tokens,
                    repetitions,
                    json,
                })?;
            } else {
                tandem::bench_transfer::transfer(&tandem::bench_transfer::TransferBenchOptions {
                    model,
                    json,
                    repetitions,
                })?;
            }
        }
        Command::Sim(a) => tandem::sim::run(&a)?,
        Command::Up(a) => tandem::up::run(tandem::up::UpOptions {
            model: a.model.resolve()?,
            listen: std::net::SocketAddr::new(a.host, a.port),
            prefill: a.prefill,
            decode: a.decode,
            cluster: a.cluster,
            disagg: a.disagg,
            threads: a.threads,
            api_keys: a.api_keys,
            run_dir: a.run_dir,
            worker_args: match a.device {
                Device::Cpu => a.worker_args,
                d => [vec![format!("--device={d}")], a.worker_args].concat(),
            },
            autoscale: a.autoscale,
        })?,
        Command::Tls {
            command:
                TlsCommand::Init {
                    dir,
                    names,
                    cluster,
                },
        } => {
            tandem::certs::init(&dir, &cluster, &names)?;
            println!(
                "wrote {}: ca.pem, node.pem, node.key (pass --tls-dir {} --tls-name {})",
                dir.display(),
                dir.display(),
                names[0]
            );
        }
        Command::Control(a) => tandem::control::run(a)?,
        Command::Ctl(a) => tandem::ctl::run(&a)?,
        Command::Bench {
            command: BenchCommand::Serve(a),
        } => tandem::bench_serve::run(&a)?,
        Command::Bench {
            command: BenchCommand::Frontend(a),
        } => {
            let model = ModelArg {
                model: a.model.clone(),
            }
            .resolve()?;
            tandem::bench_frontend::run(&a, &model)?;
        }
        Command::Bench {
            command: BenchCommand::Router(a),
        } => tandem::bench_router::run(&a)?,
        Command::Prefill(a) => tandem::runtime()?.block_on(tandem_prefill_worker::run(
            a,
            tandem_prefill_worker::shutdown_signal(),
        ))?,
        Command::Router(a) => tandem::runtime()?.block_on(tandem_router::serve::run(
            a,
            tandem_prefill_worker::shutdown_signal(),
        ))?,
        Command::Decode(a) => tandem::runtime()?.block_on(tandem_decode_worker::run(
            a,
            tandem_decode_worker::shutdown_signal(),
        ))?,
    }
    Ok(())
}

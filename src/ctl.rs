//! `tandem ctl`: the router's admin API from the shell.
//!
//! With no `--url`, it finds the local `tandem up` cluster (its cluster file) and
//! takes the admin URL and token from there.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::up::ClusterFile;

/// Where the admin API is and how to reach it.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// The admin API base URL (`http://127.0.0.1:8080/admin`; a URL without `/admin` gets it).
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// The admin token (default: from the cluster file when `--url` is not given).
    #[arg(
        long,
        env = "TANDEM_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// The local cluster to find (its `tandem up --cluster` name).
    #[arg(long, default_value = "local", global = true)]
    pub cluster: String,
    /// A cluster file to read instead of the local cluster's.
    #[arg(long, global = true)]
    pub cluster_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// What to do.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// List the workers with their role, state and load.
    Workers {
        /// Print a JSON list of the workers (each with `id`, `role`, `state`, addresses, load).
        #[arg(long)]
        json: bool,
    },
    /// Drain a worker: it stops taking requests, finishes what it holds, and exits.
    Drain {
        /// The worker's id (`tandem ctl workers` lists them).
        id: String,
    },
    /// Set the desired number of workers of a role (no argument: show the counts).
    Scale {
        /// `prefill` or `decode`.
        role: Option<String>,
        /// How many workers it should run.
        replicas: Option<u32>,
        /// With no role: print `{"prefill": {...}, "decode": {...}}`.
        #[arg(long)]
        json: bool,
    },
    /// Show the planner's SLA targets, or change some of them.
    Targets {
        /// Time-to-first-token target, ms.
        #[arg(long)]
        ttft_ms: Option<f64>,
        /// Inter-token latency target, ms.
        #[arg(long)]
        itl_ms: Option<f64>,
        /// Any other fields as JSON, merged too (`{"max_decode":3,"cooldown_ms":5000}`).
        #[arg(long)]
        set: Option<String>,
    },
    /// The planner's decision log, newest first.
    Decisions {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print `{"leader": ..., "decisions": [...]}`.
        #[arg(long)]
        json: bool,
    },
}

struct Admin {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Admin {
    fn from_args(args: &CtlArgs) -> anyhow::Result<Self> {
        let (base, token) = match &args.url {
            Some(url) => {
                let token = args
                    .token
                    .clone()
                    .context("--url needs the admin token too: --token or TANDEM_ADMIN_TOKEN")?;
                let url = url.trim_end_matches('/');
                let base = if url.ends_with("/admin") {
                    url.to_owned()
                } else {
                    format!("{url}/admin")
                };
                (base, token)
            }
            None => {
                let path = args
                    .cluster_file
                    .clone()
                    .unwrap_or_else(|| ClusterFile::default_path(&args.cluster));
                let file = ClusterFile::read(&path).with_context(|| {
                    format!(
                        "is `tandem up --cluster {}` running? (or give --url and --token)",
                        args.cluster
                    )
                })?;
                let token = args.token.clone().unwrap_or(file.admin_token);
                (file.admin_url, token)
            }
        };
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(Self { base, token, http })
    }

    fn call(&self, method: reqwest::Method, path: &str) -> anyhow::Result<Value> {
        self.call_with(method, path, None)
    }

    fn call_with(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let resp = req.send().with_context(|| format!("{method} {url}"))?;
        let status = resp.status();
        let body = resp.text().context("reading the response")?;
        let value: Value = serde_json::from_str(&body).unwrap_or(Value::String(body));
        if !status.is_success() {
            let message = value["error"]["message"]
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned);
            anyhow::bail!("{method} {url}: {status}: {message}");
        }
        Ok(value)
    }
}

/// Runs a `tandem ctl` command.
pub fn run(args: &CtlArgs) -> anyhow::Result<()> {
    let admin = Admin::from_args(args)?;
    match &args.command {
        CtlCommand::Workers { json } => {
            let v = admin.call(reqwest::Method::GET, "/workers")?;
            if *json {
                // A list of worker objects (`id`, `role`, `state`, addresses, load).
                println!("{}", serde_json::to_string_pretty(&v["workers"])?);
            } else {
                print_workers(&v);
            }
        }
        CtlCommand::Drain { id } => {
            let v = admin.call(reqwest::Method::POST, &format!("/workers/{id}/drain"))?;
            println!(
                "{id}: draining ({} request(s) in flight); it leaves the cluster once they finish",
                v["in_flight"].as_u64().unwrap_or(0)
            );
        }
        CtlCommand::Scale {
            role,
            replicas,
            json,
        } => match (role, replicas) {
            (Some(role), Some(n)) => {
                let body = serde_json::json!({ "replicas": n });
                admin.call_with(
                    reqwest::Method::POST,
                    &format!("/scale/{role}"),
                    Some(&body),
                )?;
                println!("{role}: desired {n} (the connector starts or drains workers to match)");
            }
            (None, None) => {
                let v = admin.call(reqwest::Method::GET, "/scale")?;
                if *json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print_scale(&v);
                }
            }
            _ => anyhow::bail!("usage: tandem ctl scale prefill|decode N"),
        },
        CtlCommand::Targets {
            ttft_ms,
            itl_ms,
            set,
        } => {
            let mut patch = match set {
                Some(json) => {
                    serde_json::from_str::<Value>(json).context("--set takes a JSON object")?
                }
                None => Value::Object(Default::default()),
            };
            let fields = patch.as_object_mut().context("--set takes a JSON object")?;
            if let Some(v) = ttft_ms {
                fields.insert("ttft_ms".into(), serde_json::json!(v));
            }
            if let Some(v) = itl_ms {
                fields.insert("itl_ms".into(), serde_json::json!(v));
            }
            let v = if fields.is_empty() {
                admin.call(reqwest::Method::GET, "/targets")?
            } else {
                admin.call_with(reqwest::Method::PUT, "/targets", Some(&patch))?
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        CtlCommand::Decisions { limit, json } => {
            let v = admin.call(
                reqwest::Method::GET,
                &format!("/planner/decisions?limit={limit}"),
            )?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_decisions(&v);
            }
        }
    }
    Ok(())
}

fn print_scale(v: &Value) {
    println!(
        "{:<8} {:>7} {:>7} {:>8}  BY",
        "ROLE", "DESIRED", "RUNNING", "DRAINING"
    );
    for role in ["prefill", "decode"] {
        let r = &v[role];
        println!(
            "{:<8} {:>7} {:>7} {:>8}  {}",
            role,
            r["desired"]
                .as_u64()
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
            r["running"].as_u64().unwrap_or(0),
            r["draining"].as_u64().unwrap_or(0),
            r["by"].as_str().unwrap_or("-"),
        );
    }
}

fn print_decisions(v: &Value) {
    println!(
        "planner leader: {}",
        v["leader"].as_str().unwrap_or("(none)")
    );
    let empty = Vec::new();
    let decisions = v["decisions"].as_array().unwrap_or(&empty);
    for d in decisions {
        let secs = d["at_ms"].as_u64().unwrap_or(0) / 1_000;
        println!(
            "{} {:<8} {:<7} {} -> {}  {}",
            format_utc(secs),
            d["by"].as_str().unwrap_or("?"),
            d["role"].as_str().unwrap_or("?"),
            d["from"],
            d["to"],
            d["reason"].as_str().unwrap_or(""),
        );
    }
    if decisions.is_empty() {
        println!("(no decisions yet)");
    }
}

/// `HH:MM:SS` UTC of a Unix time in seconds.
fn format_utc(secs: u64) -> String {
    let day = secs % 86_400;
    format!("{:02}:{:02}:{:02}", day / 3_600, day % 3_600 / 60, day % 60)
}

fn print_workers(v: &Value) {
    let empty = Vec::new();
    let workers = v["workers"].as_array().unwrap_or(&empty);
    println!(
        "{:<14} {:<8} {:<9} {:>7} {:>7} {:>13} {:>6} {:>9} {:>8}",
        "ID", "ROLE", "STATE", "RUNNING", "WAITING", "KV BLOCKS", "HIT", "TTFT ms", "ITL ms"
    );
    for w in workers {
        let n = |k: &str| w[k].as_f64().unwrap_or(0.0);
        println!(
            "{:<14} {:<8} {:<9} {:>7} {:>7} {:>13} {:>5.0}% {:>9.1} {:>8.1}",
            w["id"].as_str().unwrap_or("?"),
            w["role"].as_str().unwrap_or("?"),
            w["state"].as_str().unwrap_or("?"),
            n("running"),
            n("waiting"),
            format!("{}/{}", n("kv_blocks_used"), n("kv_blocks_total")),
            n("kv_hit_rate") * 100.0,
            n("ttft_ms"),
            n("itl_ms"),
        );
    }
    if workers.is_empty() {
        println!("(no workers)");
    }
}

//! The router process's configuration: its command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::cost::Policy;

/// When the router has a prefill worker compute a prompt instead of the decode worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisaggMode {
    /// Always on the decode worker.
    Never,
    /// On a prefill worker when enough of the prompt is uncached and one has room.
    Auto,
    /// On a prefill worker whenever one serves the model.
    Always,
}

impl DisaggMode {
    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::Auto => "auto",
            Self::Always => "always",
        }
    }
}

impl std::fmt::Display for DisaggMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DisaggMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(Self::Never),
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            other => Err(format!(
                "unknown disaggregation mode {other:?} (expected never, auto or always)"
            )),
        }
    }
}

/// `tandem router`: serve the OpenAI API over the cluster's workers.
#[derive(Debug, Clone, clap::Args)]
pub struct RouterArgs {
    /// The control-plane store: `http://host:port` (a tandem store;
    /// comma-separate the nodes of a replicated one), `etcd://host:port[,...]`
    /// or `etcds://host:port[,...]` (etcd over mutual TLS).
    #[arg(long, env = "TANDEM_STORE")]
    pub store: String,
    /// For `etcds://`: a directory with `ca.pem` (the etcd members' CA),
    /// `node.pem` and `node.key` (this client's certificate and key).
    #[arg(long, env = "TANDEM_STORE_TLS_DIR", value_name = "DIR")]
    pub store_tls_dir: Option<std::path::PathBuf>,

    /// The cluster whose workers to route to.
    #[arg(long, default_value = "local")]
    pub cluster: String,

    /// This router's instance id (default `router-<pid>`).
    #[arg(long)]
    pub id: Option<String>,

    /// Where to serve the API (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Prefill on prefill workers: never, auto (long uncached prompts) or always.
    #[arg(long, default_value = "auto")]
    pub disagg: DisaggMode,

    /// In auto mode, prefill remotely when at least this many prompt tokens are
    /// not cached on the chosen decode worker.
    #[arg(long, default_value_t = 256)]
    pub disagg_threshold: usize,

    /// In auto mode, a prefill worker has room while fewer prompt tokens than
    /// this wait on it.
    #[arg(long, default_value_t = 16_384)]
    pub prefill_max_pending: u64,

    /// How workers are picked: kv, kv-load, round-robin or random.
    #[arg(long, default_value = "kv-load")]
    pub policy: Policy,

    /// An API key clients must send as `Authorization: Bearer` (repeatable).
    #[arg(long = "api-key", env = "TANDEM_API_KEYS", value_delimiter = ',')]
    pub api_keys: Vec<String>,

    /// Completion requests in flight at once (429 above).
    #[arg(long, default_value_t = 256)]
    pub max_concurrent_requests: usize,

    /// Other decode workers to try when one fails before the first token.
    #[arg(long, default_value_t = 2)]
    pub retries: usize,

    /// mTLS to workers: a directory with ca.pem, node.pem and node.key.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,

    /// The bearer token of the admin API (`/admin/...`); without one it is off.
    #[arg(long, env = "TANDEM_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

impl RouterArgs {
    /// Arguments with every default, for the store at `store` (tests, embedding).
    pub fn new(store: impl Into<String>) -> Self {
        Self {
            store: store.into(),
            store_tls_dir: None,
            cluster: "local".into(),
            id: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            disagg: DisaggMode::Auto,
            disagg_threshold: 256,
            prefill_max_pending: 16_384,
            policy: Policy::KvLoad,
            api_keys: Vec::new(),
            max_concurrent_requests: 256,
            retries: 2,
            tls_dir: None,
            admin_token: None,
        }
    }

    /// The instance id, `router-<pid>` unless given.
    pub fn instance_id(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("router-{}", std::process::id()))
    }

    /// Checks the fields, naming the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster.is_empty() || self.cluster.contains('/') {
            return Err(format!(
                "--cluster {:?}: must be a non-empty name without '/'",
                self.cluster
            ));
        }
        if let Some(id) = &self.id
            && (id.is_empty() || id.contains('/'))
        {
            return Err(format!("--id {id:?}: must be a non-empty name without '/'"));
        }
        if self.max_concurrent_requests == 0 {
            return Err("--max-concurrent-requests must be positive".into());
        }
        if self.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err("--api-key must not be empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: RouterArgs,
    }

    #[test]
    fn flags_parse_with_their_defaults() {
        let cli = Cli::try_parse_from(["x", "--store", "http://s:1"]).expect("parses");
        let a = cli.args;
        assert_eq!(a.cluster, "local");
        assert_eq!(a.listen.port(), 8080);
        assert_eq!(a.disagg, DisaggMode::Auto);
        assert_eq!(a.disagg_threshold, 256);
        assert_eq!(a.policy, Policy::KvLoad);
        assert_eq!(a.retries, 2);
        assert!(a.instance_id().starts_with("router-"));
        assert!(a.validate().is_ok());

        let cli = Cli::try_parse_from([
            "x",
            "--store",
            "http://s:1",
            "--disagg",
            "always",
            "--policy",
            "round-robin",
            "--api-key",
            "a",
            "--api-key",
            "b",
            "--listen",
            "127.0.0.1:0",
            "--id",
            "r1",
        ])
        .expect("parses");
        assert_eq!(cli.args.disagg, DisaggMode::Always);
        assert_eq!(cli.args.policy, Policy::RoundRobin);
        assert_eq!(cli.args.api_keys, ["a", "b"]);
        assert_eq!(cli.args.instance_id(), "r1");

        assert!(Cli::try_parse_from(["x", "--store", "s", "--disagg", "sometimes"]).is_err());
        let mut bad = RouterArgs::new("http://s:1");
        bad.cluster = "a/b".into();
        assert!(
            bad.validate()
                .expect_err("bad cluster")
                .contains("--cluster")
        );
    }
}

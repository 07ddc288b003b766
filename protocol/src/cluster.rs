//! What cluster processes publish in the control-plane store: who they are and
//! where to reach them ([`InstanceInfo`]), the model they serve ([`ModelCard`]),
//! and the keys these live under ([`keys`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A process's part in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Prefill,
    Decode,
    Router,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prefill => "prefill",
            Self::Decode => "decode",
            Self::Router => "router",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "prefill" => Ok(Self::Prefill),
            "decode" => Ok(Self::Decode),
            "router" => Ok(Self::Router),
            other => Err(format!(
                "unknown role {other:?} (expected prefill, decode or router)"
            )),
        }
    }
}

/// Whether a worker takes new requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    #[default]
    Serving,
    /// Finishing what it holds before it exits: routers send it nothing new.
    Draining,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Draining => "draining",
        }
    }
}

/// A registered process, stored as JSON at [`keys::instance`] under its lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    pub role: Role,
    /// The served model's name (its [`ModelCard`] key).
    pub model: String,
    /// gRPC endpoint, as a URI (`http://127.0.0.1:7001`).
    pub grpc_addr: String,
    /// HTTP endpoint with `/metrics` and `/health` (`127.0.0.1:9001`).
    pub http_addr: String,
    /// The QUIC endpoint receiving KV transfers (decode workers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_addr: Option<String>,
    /// The name on the worker's certificate, which peers check on its gRPC
    /// and KV endpoints (absent: the address's host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_server_name: Option<String>,
    /// KV cache capacity in blocks.
    pub kv_blocks: u64,
    /// Most sequences the worker runs at once.
    pub max_sequences: u32,
    #[serde(default)]
    pub state: WorkerState,
    /// The tandem version the process runs.
    pub version: String,
}

/// What a router needs to serve a model without loading its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub name: String,
    /// Where the GGUF file is (tokenizer and chat template are read from it).
    pub source: String,
    pub block_size: u32,
    /// The salt the engine's block hashes use (the model's own name in its
    /// GGUF), so a router hashes prompts exactly as the workers do.
    pub hash_salt: String,
    pub context_length: u32,
    /// Bytes of one block's KV over every layer.
    pub kv_block_bytes: u64,
}

/// Store keys, all under `/tandem/<cluster>/`.
pub mod keys {
    use super::Role;

    /// The prefix of everything a cluster keeps in the store.
    pub fn cluster(cluster: &str) -> String {
        format!("/tandem/{cluster}/")
    }

    /// Prefix of every registered instance.
    pub fn instances(cluster: &str) -> String {
        format!("/tandem/{cluster}/instances/")
    }

    /// Prefix of the registered instances of one role.
    pub fn role_instances(cluster: &str, role: Role) -> String {
        format!("/tandem/{cluster}/instances/{role}/")
    }

    /// One instance's registration.
    pub fn instance(cluster: &str, role: Role, id: &str) -> String {
        format!("/tandem/{cluster}/instances/{role}/{id}")
    }

    /// A model card.
    pub fn model(cluster: &str, name: &str) -> String {
        format!("/tandem/{cluster}/models/{name}")
    }

    /// The planner's SLA targets.
    pub fn planner_targets(cluster: &str) -> String {
        format!("/tandem/{cluster}/planner/targets")
    }

    /// The desired replica count of a role.
    pub fn planner_desired(cluster: &str, role: Role) -> String {
        format!("/tandem/{cluster}/planner/desired/{role}")
    }

    /// The planner's leader-election key.
    pub fn planner_leader(cluster: &str) -> String {
        format!("/tandem/{cluster}/planner/leader")
    }

    /// Prefix of the planner's decision log; entries are keyed by a
    /// zero-padded sequence number so they list in order.
    pub fn planner_decisions(cluster: &str) -> String {
        format!("/tandem/{cluster}/planner/decisions/")
    }

    /// One decision-log entry.
    pub fn planner_decision(cluster: &str, seq: u64) -> String {
        format!("/tandem/{cluster}/planner/decisions/{seq:020}")
    }
}

impl InstanceInfo {
    /// Parses a registration from the store; a bad value names its key.
    pub fn from_json(key: &str, value: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(value).map_err(|e| format!("bad registration at {key}: {e}"))
    }
}

impl ModelCard {
    pub fn from_json(key: &str, value: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(value).map_err(|e| format!("bad model card at {key}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_keys_nest() {
        for r in [Role::Prefill, Role::Decode, Role::Router] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("gpu".parse::<Role>().is_err());
        let k = keys::instance("c", Role::Decode, "d0");
        assert_eq!(k, "/tandem/c/instances/decode/d0");
        assert!(k.starts_with(&keys::role_instances("c", Role::Decode)));
        assert!(k.starts_with(&keys::instances("c")));
    }

    #[test]
    fn registration_round_trips_and_bad_values_name_the_key() {
        let info = InstanceInfo {
            id: "d0".into(),
            role: Role::Decode,
            model: "m".into(),
            grpc_addr: "http://127.0.0.1:1".into(),
            http_addr: "127.0.0.1:2".into(),
            kv_addr: Some("127.0.0.1:3".into()),
            kv_server_name: Some("d0".into()),
            kv_blocks: 10,
            max_sequences: 4,
            state: WorkerState::Draining,
            version: "0.1.0".into(),
        };
        let json = serde_json::to_vec(&info).expect("serializes");
        assert_eq!(InstanceInfo::from_json("k", &json), Ok(info));
        let err = InstanceInfo::from_json("/x/y", b"{").expect_err("bad JSON");
        assert!(err.contains("/x/y"), "{err}");
    }
}

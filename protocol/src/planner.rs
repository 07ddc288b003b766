//! The planner's shared records: the SLA targets an operator sets, the desired
//! replica counts the planner (or an operator) writes, and the decisions it logs.
//! Stored as JSON under `planner/` (see [`crate::keys`]).

use serde::{Deserialize, Serialize};

use crate::Role;

/// Most replicas of one role a cluster may ask for.
pub const MAX_REPLICAS: u32 = 256;

/// SLA targets and the planner's bounds, at `planner/targets`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlannerTargets {
    /// Time-to-first-token target, ms.
    pub ttft_ms: f64,
    /// Inter-token latency target, ms.
    pub itl_ms: f64,
    pub min_prefill: u32,
    pub max_prefill: u32,
    pub min_decode: u32,
    pub max_decode: u32,
    /// How often the planner observes and decides, ms.
    pub interval_ms: u64,
    /// Least time between two changes of one role's count, ms.
    pub cooldown_ms: u64,
}

impl Default for PlannerTargets {
    fn default() -> Self {
        Self {
            ttft_ms: 2_000.0,
            itl_ms: 150.0,
            min_prefill: 0,
            max_prefill: 4,
            min_decode: 1,
            max_decode: 4,
            interval_ms: 2_000,
            cooldown_ms: 10_000,
        }
    }
}

impl PlannerTargets {
    /// Checks the targets make sense; the message names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "{name} must be a positive number of milliseconds, not {v}"
                ))
            }
        };
        positive("ttft_ms", self.ttft_ms)?;
        positive("itl_ms", self.itl_ms)?;
        for (role, min, max) in [
            ("prefill", self.min_prefill, self.max_prefill),
            ("decode", self.min_decode, self.max_decode),
        ] {
            if min > max {
                return Err(format!("min_{role} ({min}) is above max_{role} ({max})"));
            }
            if max > MAX_REPLICAS {
                return Err(format!("max_{role} ({max}) is above {MAX_REPLICAS}"));
            }
        }
        if self.min_decode == 0 {
            return Err(
                "min_decode must be at least 1: a cluster with no decode worker serves nothing"
                    .into(),
            );
        }
        if self.interval_ms < 100 {
            return Err(format!(
                "interval_ms must be at least 100, not {}",
                self.interval_ms
            ));
        }
        Ok(())
    }

    /// The (min, max) replicas of a worker role.
    pub fn bounds(&self, role: Role) -> (u32, u32) {
        match role {
            Role::Prefill => (self.min_prefill, self.max_prefill),
            _ => (self.min_decode, self.max_decode),
        }
    }

    pub fn from_json(key: &str, value: &[u8]) -> Result<Self, String> {
        let t: Self = serde_json::from_slice(value)
            .map_err(|e| format!("bad planner targets at {key}: {e}"))?;
        t.validate()
            .map_err(|e| format!("bad planner targets at {key}: {e}"))?;
        Ok(t)
    }
}

/// A desired replica count, at `planner/desired/<role>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub replicas: u32,
    /// Who set it: `planner` or `operator`.
    pub by: String,
    /// When, in ms since the Unix epoch.
    pub at_ms: u64,
}

impl Desired {
    pub fn from_json(key: &str, value: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(value).map_err(|e| format!("bad desired count at {key}: {e}"))
    }
}

/// One entry of the planner's decision log, at `planner/decisions/<seq>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannerDecision {
    /// ms since the Unix epoch.
    pub at_ms: u64,
    pub role: Role,
    pub from: u32,
    pub to: u32,
    /// Why, in words an operator reads ("ITL p50 212 ms over the 150 ms target").
    pub reason: String,
    /// `planner`, `operator`, or `reconcile` (workers that exited replaced).
    pub by: String,
}

impl PlannerDecision {
    pub fn from_json(key: &str, value: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(value).map_err(|e| format!("bad planner decision at {key}: {e}"))
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_validate_and_name_the_bad_field() {
        assert!(PlannerTargets::default().validate().is_ok());
        let bad = PlannerTargets {
            min_decode: 5,
            max_decode: 2,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("min_decode"));
        let bad = PlannerTargets {
            itl_ms: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("itl_ms"));
        let partial =
            PlannerTargets::from_json("k", br#"{"ttft_ms": 500}"#).expect("partial targets parse");
        assert_eq!(partial.ttft_ms, 500.0);
        assert_eq!(partial.itl_ms, PlannerTargets::default().itl_ms);
        assert!(PlannerTargets::from_json("k", br#"{"tftt_ms": 500}"#).is_err());
    }
}

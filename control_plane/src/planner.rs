//! The SLA planner: one leader among the control-plane replicas (elected
//! through the store) reads every worker's load and latency each interval and
//! sets the desired prefill and decode counts so that TTFT and ITL stay under
//! the targets at `planner/targets`.
//!
//! - [`Policy::decide`] is the pure part: observations in, decisions out. It
//!   predicts demand with an exponentially weighted moving average (decode:
//!   sequences running and waiting; prefill: prompt tokens pending), measures
//!   per-worker capacity (decode: sequences per worker at which ITL meets its
//!   target; prefill: prompt tokens per second at which TTFT meets its target;
//!   falling back to the workers' `max_sequences` before there is data), and
//!   scales within the bounds. Scaling up happens as soon as demand needs it or
//!   the latency target is missed; scaling down only when the load would fit
//!   in one worker fewer with headroom for [`DOWN_STREAK`] intervals in a row.
//!   A role changes at most once per `cooldown_ms`, and an operator's write of
//!   its desired count restarts that cooldown.
//! - [`run_planner`] is the I/O: campaign for `planner/leader`, then while
//!   leading: read targets, poll each worker's `Load`, decide, write
//!   `planner/desired/<role>` and append to the decision log.
//! - [`campaign`], [`append_decision`], [`read_targets`] and friends are the
//!   store helpers the router's admin API uses too.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tandem_protocol::grpc::worker::LoadResponse;
use tandem_protocol::{
    Desired, InstanceInfo, PlannerDecision, PlannerTargets, Role, WorkerState, keys, unix_ms,
};
use tokio::sync::watch;

use crate::{Compare, LeaseId, Store, StoreError, TxnOp};

/// Decision-log entries kept; older ones are deleted.
pub const DECISION_LOG_KEEP: usize = 200;
/// Intervals in a row the load must fit in one worker fewer before a scale-down.
pub const DOWN_STREAK: u32 = 3;
/// Weight of the newest observation in the demand average.
const DEMAND_ALPHA: f64 = 0.5;
/// Weight of the newest measurement in the capacity average.
const CAPACITY_ALPHA: f64 = 0.3;
/// Scale up so that workers run at most this fraction of their capacity.
const UP_UTILIZATION: f64 = 0.8;
/// Scale down only if the rest would run at most this fraction of their capacity.
const DOWN_UTILIZATION: f64 = 0.5;
/// Scale down only while latency is under this fraction of its target.
const DOWN_LATENCY: f64 = 0.8;
/// Sequences per decode worker assumed when workers report no `max_sequences`.
const FALLBACK_SEQUENCES: f64 = 8.0;
/// Prompt tokens per second per prefill worker assumed before any measurement.
const FALLBACK_PREFILL_TOKENS_PER_S: f64 = 2_000.0;
/// The leader's lease TTL.
const LEADER_TTL: Duration = Duration::from_secs(5);
/// How often the leader renews its lease (and a follower campaigns).
const LEADER_TICK: Duration = Duration::from_millis(1_000);

// ----- store helpers -----

/// Campaigns for `key`: puts `value` under `lease` if no one holds the key.
/// True if this lease holds it now (it just won, or already held it). The
/// key goes when the lease does, and the next campaign wins then. Works with
/// any [`Store`]: a compare-and-swap on "the key does not exist".
pub async fn campaign<S: Store>(
    store: &S,
    key: &str,
    value: Vec<u8>,
    lease: LeaseId,
) -> Result<bool, StoreError> {
    let won = store
        .txn(
            vec![Compare {
                key: key.to_owned(),
                mod_revision: 0,
            }],
            vec![TxnOp::Put {
                key: key.to_owned(),
                value,
                lease: Some(lease),
            }],
            vec![],
        )
        .await?;
    if won {
        return Ok(true);
    }
    Ok(store.get(key).await?.is_some_and(|kv| kv.lease == lease))
}

/// The planner targets of `cluster` (the defaults when none are stored).
pub async fn read_targets<S: Store>(store: &S, cluster: &str) -> Result<PlannerTargets, String> {
    let key = keys::planner_targets(cluster);
    match store.get(&key).await.map_err(|e| e.to_string())? {
        Some(kv) => PlannerTargets::from_json(&key, &kv.value),
        None => Ok(PlannerTargets::default()),
    }
}

/// The desired count of `role`, with the revision of its last write (0: none).
pub async fn read_desired<S: Store>(
    store: &S,
    cluster: &str,
    role: Role,
) -> Result<(Option<Desired>, i64), String> {
    let key = keys::planner_desired(cluster, role);
    match store.get(&key).await.map_err(|e| e.to_string())? {
        Some(kv) => Ok((Some(Desired::from_json(&key, &kv.value)?), kv.mod_revision)),
        None => Ok((None, 0)),
    }
}

/// The id of the planner leader, if there is one.
pub async fn read_leader<S: Store>(store: &S, cluster: &str) -> Result<Option<String>, StoreError> {
    Ok(store
        .get(&keys::planner_leader(cluster))
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

/// Appends `decision` to the decision log and deletes all but the newest
/// [`DECISION_LOG_KEEP`] entries; returns its sequence number.
pub async fn append_decision<S: Store>(
    store: &S,
    cluster: &str,
    decision: &PlannerDecision,
) -> Result<u64, StoreError> {
    let prefix = keys::planner_decisions(cluster);
    let value = serde_json::to_vec(decision).map_err(|e| StoreError::Invalid(e.to_string()))?;
    // Two writers may pick the same number: the loser takes the next.
    for _ in 0..16 {
        let (kvs, _) = store.list(&prefix).await?;
        let last = kvs
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(&prefix)?.parse::<u64>().ok())
            .max();
        let seq = last.map_or(0, |s| s + 1);
        let key = keys::planner_decision(cluster, seq);
        let written = store
            .txn(
                vec![Compare {
                    key: key.clone(),
                    mod_revision: 0,
                }],
                vec![TxnOp::Put {
                    key,
                    value: value.clone(),
                    lease: None,
                }],
                vec![],
            )
            .await?;
        if !written {
            continue;
        }
        // `kvs` is in key order and the keys are zero-padded: oldest first.
        let total = kvs.len() + 1;
        if total > DECISION_LOG_KEEP {
            for kv in &kvs[..total - DECISION_LOG_KEEP] {
                store.delete(&kv.key).await?;
            }
        }
        return Ok(seq);
    }
    Err(StoreError::Unavailable(
        "the decision log kept changing under a writer".into(),
    ))
}

/// The newest `limit` decisions, newest first.
pub async fn read_decisions<S: Store>(
    store: &S,
    cluster: &str,
    limit: usize,
) -> Result<Vec<PlannerDecision>, StoreError> {
    let (kvs, _) = store.list(&keys::planner_decisions(cluster)).await?;
    Ok(kvs
        .iter()
        .rev()
        .filter_map(|kv| match PlannerDecision::from_json(&kv.key, &kv.value) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(error = %e, "skipping a decision-log entry");
                None
            }
        })
        .take(limit)
        .collect())
}

/// Writes `role`'s desired count as `by`, and logs the change with `reason`.
pub async fn set_desired<S: Store>(
    store: &S,
    cluster: &str,
    role: Role,
    replicas: u32,
    by: &str,
    reason: &str,
) -> Result<(), StoreError> {
    let (from, _) = read_desired(store, cluster, role)
        .await
        .map_err(StoreError::Invalid)?;
    let at_ms = unix_ms();
    let desired = Desired {
        replicas,
        by: by.to_owned(),
        at_ms,
    };
    let value = serde_json::to_vec(&desired).map_err(|e| StoreError::Invalid(e.to_string()))?;
    store
        .put(&keys::planner_desired(cluster, role), value, None)
        .await?;
    append_decision(
        store,
        cluster,
        &PlannerDecision {
            at_ms,
            role,
            from: from.map_or(replicas, |d| d.replicas),
            to: replicas,
            reason: reason.to_owned(),
            by: by.to_owned(),
        },
    )
    .await?;
    Ok(())
}

// ----- the policy -----

/// One worker's load report, as the planner sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerLoad {
    pub id: String,
    pub running: u32,
    pub waiting: u32,
    pub pending_prefill_tokens: u64,
    /// Recent TTFT and ITL p50, ms (0: no data).
    pub ttft_ms: f64,
    pub itl_ms: f64,
    /// From its registration.
    pub max_sequences: u32,
    pub draining: bool,
}

impl WorkerLoad {
    /// A worker's load from its registration and `Load` answer.
    pub fn new(info: &InstanceInfo, load: &LoadResponse) -> Self {
        Self {
            id: info.id.clone(),
            running: load.running,
            waiting: load.waiting,
            pending_prefill_tokens: load.pending_prefill_tokens,
            ttft_ms: load.ttft_ms,
            itl_ms: load.itl_ms,
            max_sequences: info.max_sequences,
            draining: info.state == WorkerState::Draining || load.state == "draining",
        }
    }

    fn busy(&self) -> bool {
        self.running > 0 || self.waiting > 0 || self.pending_prefill_tokens > 0
    }
}

/// What the planner saw at one interval.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// ms since the Unix epoch.
    pub at_ms: u64,
    pub prefill: Vec<WorkerLoad>,
    pub decode: Vec<WorkerLoad>,
    pub desired_prefill: Option<Desired>,
    pub desired_decode: Option<Desired>,
}

impl Observation {
    fn workers(&self, role: Role) -> &[WorkerLoad] {
        match role {
            Role::Prefill => &self.prefill,
            _ => &self.decode,
        }
    }

    fn desired(&self, role: Role) -> Option<&Desired> {
        match role {
            Role::Prefill => self.desired_prefill.as_ref(),
            _ => self.desired_decode.as_ref(),
        }
    }
}

/// A change of one role's desired count.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub role: Role,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

#[derive(Debug, Clone, Default)]
struct RoleState {
    /// Predicted demand (decode: sequences; prefill: pending prompt tokens).
    demand: Option<f64>,
    /// Measured capacity per worker (decode: sequences; prefill: tokens/s).
    capacity: Option<f64>,
    /// When the role's count last changed (by the planner or an operator).
    last_change_ms: Option<u64>,
    /// Intervals in a row the load fit in one worker fewer.
    low_streak: u32,
}

/// The planner's memory between intervals: demand and capacity averages,
/// cooldowns, scale-down streaks.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    roles: BTreeMap<Role, RoleState>,
}

fn ewma(prev: Option<f64>, x: f64, alpha: f64) -> f64 {
    prev.map_or(x, |p| alpha * x + (1.0 - alpha) * p)
}

/// The largest of `xs` (0 for none).
fn max_of(xs: impl Iterator<Item = f64>) -> f64 {
    xs.fold(0.0, f64::max)
}

impl Policy {
    /// The changes to make after `obs`, given `targets`.
    pub fn decide(&mut self, targets: &PlannerTargets, obs: &Observation) -> Vec<Change> {
        [Role::Prefill, Role::Decode]
            .into_iter()
            .filter_map(|role| self.decide_role(targets, obs, role))
            .collect()
    }

    /// The predicted demand and the per-worker capacity the policy uses now,
    /// for `role` (for logs and tests).
    pub fn estimates(&self, role: Role) -> (Option<f64>, Option<f64>) {
        self.roles
            .get(&role)
            .map_or((None, None), |s| (s.demand, s.capacity))
    }

    fn decide_role(
        &mut self,
        targets: &PlannerTargets,
        obs: &Observation,
        role: Role,
    ) -> Option<Change> {
        let now = obs.at_ms;
        let (min, max) = targets.bounds(role);
        let serving: Vec<&WorkerLoad> = obs.workers(role).iter().filter(|w| !w.draining).collect();
        let desired = obs.desired(role);
        let current = desired.map_or(u32::try_from(serving.len()).unwrap_or(u32::MAX), |d| {
            d.replicas
        });
        let state = self.roles.entry(role).or_default();
        if let Some(d) = desired.filter(|d| d.by != "planner") {
            // An operator's count holds for a cooldown before the planner moves it.
            if state.last_change_ms.is_none_or(|t| d.at_ms > t) {
                state.last_change_ms = Some(d.at_ms);
                state.low_streak = 0;
            }
        }

        // Demand, capacity and the latency signal.
        let (raw_demand, measured, fallback, latency, target, unit) = match role {
            Role::Prefill => {
                // With no prefill worker, the decode workers' local prefills
                // are the work a prefill worker would take.
                let source: Vec<&WorkerLoad> = if serving.is_empty() {
                    obs.decode.iter().filter(|w| !w.draining).collect()
                } else {
                    serving.clone()
                };
                let demand: f64 = source.iter().map(|w| w.pending_prefill_tokens as f64).sum();
                // A backlog cleared in TTFT: tokens/s at that latency.
                let rates: Vec<f64> = serving
                    .iter()
                    .filter(|w| w.pending_prefill_tokens > 0 && w.ttft_ms > 0.0)
                    .map(|w| w.pending_prefill_tokens as f64 * 1_000.0 / w.ttft_ms)
                    .collect();
                let measured =
                    (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64);
                let latency = max_of(source.iter().filter(|w| w.busy()).map(|w| w.ttft_ms));
                (
                    demand,
                    measured,
                    FALLBACK_PREFILL_TOKENS_PER_S,
                    latency,
                    targets.ttft_ms,
                    "TTFT",
                )
            }
            _ => {
                let demand: f64 = serving
                    .iter()
                    .map(|w| f64::from(w.running) + f64::from(w.waiting))
                    .sum();
                let estimates: Vec<f64> = serving
                    .iter()
                    .filter(|w| w.running > 0 && w.itl_ms > 0.0)
                    .map(|w| {
                        let cap = if w.max_sequences > 0 {
                            f64::from(w.max_sequences)
                        } else {
                            FALLBACK_SEQUENCES
                        };
                        (f64::from(w.running) * targets.itl_ms / w.itl_ms).clamp(1.0, cap)
                    })
                    .collect();
                let measured = (!estimates.is_empty())
                    .then(|| estimates.iter().sum::<f64>() / estimates.len() as f64);
                let seqs: Vec<f64> = serving
                    .iter()
                    .filter(|w| w.max_sequences > 0)
                    .map(|w| f64::from(w.max_sequences))
                    .collect();
                let fallback = if seqs.is_empty() {
                    FALLBACK_SEQUENCES
                } else {
                    seqs.iter().sum::<f64>() / seqs.len() as f64
                };
                let latency = max_of(serving.iter().filter(|w| w.running > 0).map(|w| w.itl_ms));
                (demand, measured, fallback, latency, targets.itl_ms, "ITL")
            }
        };
        let demand = ewma(state.demand, raw_demand, DEMAND_ALPHA);
        state.demand = Some(demand);
        if let Some(m) = measured {
            state.capacity = Some(ewma(state.capacity, m, CAPACITY_ALPHA));
        }
        let per_worker = state.capacity.unwrap_or(fallback).max(f64::MIN_POSITIVE);
        // In the demand's unit: a prefill worker holds `rate × TTFT` tokens.
        let per_worker_demand = match role {
            Role::Prefill => per_worker * targets.ttft_ms / 1_000.0,
            _ => per_worker,
        };
        let (demand_unit, capacity_unit) = match role {
            Role::Prefill => ("pending prompt tokens", "tokens/s"),
            _ => ("sequences", "sequences"),
        };
        let violated = latency > target;
        let needed = (demand / (per_worker_demand * UP_UTILIZATION)).ceil();
        let needed = if needed.is_finite() {
            needed.min(f64::from(u32::MAX)) as u32
        } else {
            u32::MAX
        };
        let fits_one_fewer = current > 0
            && demand <= f64::from(current - 1) * per_worker_demand * DOWN_UTILIZATION
            && latency <= target * DOWN_LATENCY
            // A role can go to 0 only when nothing at all is asked of it.
            && (current > 1 || demand == 0.0);
        state.low_streak = if fits_one_fewer {
            state.low_streak.saturating_add(1)
        } else {
            0
        };

        // Bounds come first and ignore the cooldown.
        let (to, reason) = if current < min {
            (min, format!("below min_{role} ({min})"))
        } else if current > max {
            (max, format!("above max_{role} ({max})"))
        } else {
            if state
                .last_change_ms
                .is_some_and(|t| now < t.saturating_add(targets.cooldown_ms))
            {
                return None;
            }
            let up = if violated && demand > 0.0 {
                Some(needed.max(current.saturating_add(1)))
            } else if needed > current {
                Some(needed)
            } else {
                None
            };
            if let Some(up) = up {
                let to = up.min(max);
                if to <= current {
                    return None;
                }
                let why = if violated {
                    format!("{unit} p50 {latency:.0} ms over the {target:.0} ms target; ")
                } else {
                    String::new()
                };
                (
                    to,
                    format!(
                        "{why}demand {demand:.1} {demand_unit} needs {needed} worker(s) at {per_worker:.1} {capacity_unit} each"
                    ),
                )
            } else if state.low_streak >= DOWN_STREAK && current > min {
                (
                    current - 1,
                    format!(
                        "demand {demand:.1} {demand_unit} fits in {} worker(s) at {per_worker:.1} {capacity_unit} each with headroom for {} intervals; {}",
                        current - 1,
                        state.low_streak,
                        if latency > 0.0 {
                            format!("{unit} p50 {latency:.0} ms under the {target:.0} ms target")
                        } else {
                            "no traffic".to_owned()
                        }
                    ),
                )
            } else {
                return None;
            }
        };
        if to == current {
            return None;
        }
        state.last_change_ms = Some(now);
        state.low_streak = 0;
        Some(Change {
            role,
            from: current,
            to,
            reason,
        })
    }
}

// ----- the leader loop -----

/// Where the planner gets a worker's load (the `Load` gRPC, over mTLS).
pub trait LoadProbe: Send + Sync + 'static {
    fn load(
        &self,
        info: &InstanceInfo,
    ) -> impl Future<Output = Result<LoadResponse, String>> + Send;
}

/// Campaigns for the planner leadership of `cluster` as `id` and plans while
/// leading, until `stop` turns true.
pub async fn run_planner<S: Store + Clone, P: LoadProbe>(
    store: S,
    cluster: String,
    id: String,
    probe: Arc<P>,
    mut stop: watch::Receiver<bool>,
) {
    let key = keys::planner_leader(&cluster);
    loop {
        let attempt = async {
            let lease = store.lease_grant(LEADER_TTL).await?;
            if !campaign(&store, &key, id.clone().into_bytes(), lease).await? {
                let _ = store.lease_revoke(lease).await;
                return Ok::<_, StoreError>(false);
            }
            tracing::info!(%id, "planner leader");
            let lost = lead(&store, &cluster, &key, lease, probe.as_ref()).await;
            tracing::warn!(%id, error = %lost, "planner leadership lost");
            let _ = store.lease_revoke(lease).await;
            Ok(true)
        };
        let result = tokio::select! {
            r = attempt => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "planner campaign failed");
        }
        tokio::select! {
            () = tokio::time::sleep(LEADER_TICK) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // Hand the leadership on at once rather than when the lease expires.
    if let Ok(Some(kv)) = store.get(&key).await
        && kv.value == id.as_bytes()
        && kv.lease != 0
    {
        let _ = store.lease_revoke(kv.lease).await;
    }
}

/// Plans while this lease holds the leadership; returns why it stopped.
async fn lead<S: Store, P: LoadProbe>(
    store: &S,
    cluster: &str,
    key: &str,
    lease: LeaseId,
    probe: &P,
) -> StoreError {
    let mut policy = Policy::default();
    let mut next_plan = tokio::time::Instant::now();
    loop {
        if let Err(e) = store.lease_keepalive(lease).await {
            return e;
        }
        match store.get(key).await {
            Ok(Some(kv)) if kv.lease == lease => {}
            Ok(_) => return StoreError::Invalid("another planner holds the leadership".into()),
            Err(e) => return e,
        }
        let targets = match read_targets(store, cluster).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "using the default planner targets");
                PlannerTargets::default()
            }
        };
        if tokio::time::Instant::now() >= next_plan {
            next_plan = tokio::time::Instant::now() + Duration::from_millis(targets.interval_ms);
            if let Err(e) = plan_once(store, cluster, probe, &targets, &mut policy).await {
                tracing::warn!(error = %e, "planner interval failed");
            }
        }
        let wake = next_plan.min(tokio::time::Instant::now() + LEADER_TICK);
        tokio::time::sleep_until(wake).await;
    }
}

/// Observes the cluster once and applies the policy's changes.
pub async fn plan_once<S: Store, P: LoadProbe>(
    store: &S,
    cluster: &str,
    probe: &P,
    targets: &PlannerTargets,
    policy: &mut Policy,
) -> Result<Vec<Change>, String> {
    let (desired_prefill, rev_prefill) = read_desired(store, cluster, Role::Prefill).await?;
    let (desired_decode, rev_decode) = read_desired(store, cluster, Role::Decode).await?;
    let (kvs, _) = store
        .list(&keys::instances(cluster))
        .await
        .map_err(|e| e.to_string())?;
    let infos: Vec<InstanceInfo> = kvs
        .iter()
        .filter_map(|kv| InstanceInfo::from_json(&kv.key, &kv.value).ok())
        .filter(|i| matches!(i.role, Role::Prefill | Role::Decode))
        .collect();
    let loads = futures_join(infos.iter().map(|i| probe.load(i))).await;
    let mut obs = Observation {
        at_ms: unix_ms(),
        desired_prefill,
        desired_decode,
        ..Default::default()
    };
    for (info, load) in infos.iter().zip(loads) {
        match load {
            Ok(load) => {
                let w = WorkerLoad::new(info, &load);
                match info.role {
                    Role::Prefill => obs.prefill.push(w),
                    _ => obs.decode.push(w),
                }
            }
            Err(e) => tracing::debug!(worker = %info.id, error = %e, "no load report"),
        }
    }
    let changes = policy.decide(targets, &obs);
    for c in &changes {
        let rev = if c.role == Role::Prefill {
            rev_prefill
        } else {
            rev_decode
        };
        let key = keys::planner_desired(cluster, c.role);
        let desired = Desired {
            replicas: c.to,
            by: "planner".into(),
            at_ms: obs.at_ms,
        };
        let value = serde_json::to_vec(&desired).map_err(|e| e.to_string())?;
        // Not over an operator's write made since we read.
        let written = store
            .txn(
                vec![Compare {
                    key: key.clone(),
                    mod_revision: rev,
                }],
                vec![TxnOp::Put {
                    key,
                    value,
                    lease: None,
                }],
                vec![],
            )
            .await
            .map_err(|e| e.to_string())?;
        if !written {
            tracing::info!(role = %c.role, "the desired count changed meanwhile; not scaling");
            continue;
        }
        tracing::info!(role = %c.role, from = c.from, to = c.to, reason = %c.reason, "planner scales");
        append_decision(
            store,
            cluster,
            &PlannerDecision {
                at_ms: obs.at_ms,
                role: c.role,
                from: c.from,
                to: c.to,
                reason: c.reason.clone(),
                by: "planner".into(),
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(changes)
}

/// Runs the futures concurrently; results in order.
async fn futures_join<F: Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStore;

    fn targets() -> PlannerTargets {
        PlannerTargets {
            itl_ms: 100.0,
            ttft_ms: 1_000.0,
            min_prefill: 0,
            max_prefill: 0,
            min_decode: 1,
            max_decode: 4,
            interval_ms: 1_000,
            cooldown_ms: 5_000,
        }
    }

    fn decode(id: &str, running: u32, waiting: u32, itl_ms: f64) -> WorkerLoad {
        WorkerLoad {
            id: id.into(),
            running,
            waiting,
            itl_ms,
            max_sequences: 8,
            ..Default::default()
        }
    }

    fn desired(n: u32, by: &str, at_ms: u64) -> Option<Desired> {
        Some(Desired {
            replicas: n,
            by: by.into(),
            at_ms,
        })
    }

    /// `n` decode workers each running `running` at `itl_ms`, desired `n` by the planner.
    fn obs(at_ms: u64, n: u32, running: u32, itl_ms: f64) -> Observation {
        Observation {
            at_ms,
            decode: (0..n)
                .map(|i| decode(&format!("decode-{i}"), running, 0, itl_ms))
                .collect(),
            desired_decode: desired(n, "planner", 0),
            ..Default::default()
        }
    }

    #[test]
    fn scales_decode_up_when_itl_misses_its_target() {
        let mut p = Policy::default();
        let changes = p.decide(&targets(), &obs(10_000, 1, 6, 250.0));
        assert_eq!(changes.len(), 1, "{changes:?}");
        let c = &changes[0];
        assert_eq!((c.role, c.from), (Role::Decode, 1));
        assert!(c.to >= 2, "{c:?}");
        assert!(c.to <= 4);
        assert!(
            c.reason.contains("ITL p50 250 ms over the 100 ms target"),
            "{}",
            c.reason
        );
        // Capacity measured: 6 sequences at 250 ms → 2.4 at 100 ms.
        let (_, capacity) = p.estimates(Role::Decode);
        assert!((capacity.expect("measured") - 2.4).abs() < 1e-9);
    }

    #[test]
    fn scales_up_on_demand_over_capacity_even_under_target() {
        let mut p = Policy::default();
        // 8 sequences each, plus 10 waiting: demand 18 over 8 per worker.
        let mut o = obs(10_000, 1, 8, 50.0);
        o.decode[0].waiting = 10;
        let changes = p.decide(&targets(), &o);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].to, 3, "{changes:?}");
    }

    #[test]
    fn never_above_max_or_below_min() {
        let mut p = Policy::default();
        let changes = p.decide(&targets(), &obs(10_000, 4, 8, 900.0));
        assert!(changes.is_empty(), "already at max_decode: {changes:?}");
        // Desired 0 is below min_decode: fixed at once.
        let mut o = obs(10_000, 1, 0, 0.0);
        o.desired_decode = desired(0, "operator", 9_999);
        let changes = p.decide(&targets(), &o);
        assert_eq!(changes[0].to, 1, "{changes:?}");
        assert!(changes[0].reason.contains("min_decode"));
    }

    #[test]
    fn cooldown_holds_a_second_change() {
        let mut p = Policy::default();
        let t = PlannerTargets {
            max_decode: 16,
            ..targets()
        };
        let first = p.decide(&t, &obs(10_000, 1, 6, 250.0));
        assert_eq!(first.len(), 1);
        let to = first[0].to;
        // Still over target right after: the cooldown holds.
        for at in [11_000, 12_000, 14_999] {
            assert!(p.decide(&t, &obs(at, to, 6, 250.0)).is_empty(), "at {at}");
        }
        // After the cooldown it may act again.
        let later = p.decide(&t, &obs(15_000, to, 6, 250.0));
        assert_eq!(later.len(), 1, "{later:?}");
        assert!(later[0].to > to);
    }

    #[test]
    fn an_operator_write_restarts_the_cooldown() {
        let mut p = Policy::default();
        let t = targets();
        // The operator set 3 at 20 s; the load is gone, but the planner waits.
        let mut o = obs(20_500, 3, 0, 0.0);
        o.desired_decode = desired(3, "operator", 20_000);
        for at in (21_000..25_000).step_by(1_000) {
            o.at_ms = at;
            assert!(p.decide(&t, &o).is_empty(), "at {at}");
        }
        o.at_ms = 25_000;
        let changes = p.decide(&t, &o);
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!((changes[0].from, changes[0].to), (3, 2));
    }

    #[test]
    fn no_flapping_scales_down_only_after_a_streak_with_headroom() {
        let mut p = Policy::default();
        let t = PlannerTargets {
            cooldown_ms: 0,
            ..targets()
        };
        // Two workers, load that would just fit in one: no scale-down ever.
        for i in 0..20 {
            let changes = p.decide(&t, &obs(10_000 + i * 1_000, 2, 3, 40.0));
            assert!(changes.is_empty(), "interval {i}: {changes:?}");
        }
        // Alternating busy and idle intervals: the streak never completes.
        let mut p = Policy::default();
        for i in 0..20 {
            let running = if i % 3 == 2 { 6 } else { 0 };
            let changes = p.decide(&t, &obs(10_000 + i * 1_000, 2, running, 40.0));
            assert!(changes.is_empty(), "interval {i}: {changes:?}");
        }
        // Idle for DOWN_STREAK intervals in a row: one step down, with the reason.
        let mut p = Policy::default();
        let mut downs = Vec::new();
        for i in 0..u64::from(DOWN_STREAK) {
            downs.extend(p.decide(&t, &obs(10_000 + i * 1_000, 2, 0, 40.0)));
        }
        assert_eq!(downs.len(), 1, "{downs:?}");
        assert_eq!((downs[0].from, downs[0].to), (2, 1));
        assert!(
            downs[0].reason.contains("fits in 1 worker"),
            "{}",
            downs[0].reason
        );
        // And not below min_decode.
        for i in 0..10 {
            assert!(p.decide(&t, &obs(20_000 + i * 1_000, 1, 0, 0.0)).is_empty());
        }
    }

    #[test]
    fn up_then_down_settles_without_oscillating() {
        let mut p = Policy::default();
        let t = PlannerTargets {
            cooldown_ms: 2_000,
            ..targets()
        };
        let mut n = 1;
        let mut changes = 0;
        // A steady load of 10 sequences at 60 ms ITL on 8-sequence workers.
        for i in 0..60 {
            let per = 10u32.div_ceil(n);
            let itl = 30.0 + 8.0 * f64::from(per);
            for c in p.decide(&t, &obs(10_000 + i * 1_000, n, per, itl)) {
                n = c.to;
                changes += 1;
            }
        }
        assert!(changes <= 2, "{changes} changes for a steady load");
        assert!((2..=4).contains(&n), "settled at {n}");
    }

    #[test]
    fn prefill_scales_from_zero_on_pending_tokens_over_ttft() {
        let mut p = Policy::default();
        let t = PlannerTargets {
            max_prefill: 2,
            ..targets()
        };
        let mut o = obs(10_000, 1, 2, 50.0);
        o.decode[0].pending_prefill_tokens = 6_000;
        o.decode[0].ttft_ms = 3_000.0;
        o.desired_prefill = desired(0, "operator", 0);
        let changes = p.decide(&t, &o);
        let c = changes
            .iter()
            .find(|c| c.role == Role::Prefill)
            .expect("a prefill change");
        assert_eq!((c.from, c.to), (0, 2), "{c:?}");
        assert!(
            c.reason
                .contains("TTFT p50 3000 ms over the 1000 ms target")
        );
    }

    #[tokio::test]
    async fn campaign_elects_one_leader_per_lease() {
        let store = MemStore::new();
        let a = store
            .lease_grant(Duration::from_secs(30))
            .await
            .expect("lease");
        let b = store
            .lease_grant(Duration::from_secs(30))
            .await
            .expect("lease");
        assert!(
            campaign(&store, "/l", b"a".to_vec(), a)
                .await
                .expect("campaign")
        );
        assert!(
            !campaign(&store, "/l", b"b".to_vec(), b)
                .await
                .expect("campaign")
        );
        assert!(
            campaign(&store, "/l", b"a".to_vec(), a)
                .await
                .expect("campaign")
        );
        store.lease_revoke(a).await.expect("revoke");
        assert!(
            campaign(&store, "/l", b"b".to_vec(), b)
                .await
                .expect("campaign")
        );
    }

    #[tokio::test]
    async fn the_decision_log_keeps_the_newest_entries() {
        let store = MemStore::new();
        for i in 0..(DECISION_LOG_KEEP as u32 + 5) {
            let d = PlannerDecision {
                at_ms: u64::from(i),
                role: Role::Decode,
                from: i,
                to: i + 1,
                reason: format!("step {i}"),
                by: "planner".into(),
            };
            append_decision(&store, "c", &d).await.expect("append");
        }
        let all = read_decisions(&store, "c", 1_000).await.expect("read");
        assert_eq!(all.len(), DECISION_LOG_KEEP);
        assert_eq!(all[0].from, DECISION_LOG_KEEP as u32 + 4, "newest first");
        assert_eq!(read_decisions(&store, "c", 3).await.expect("read").len(), 3);
    }

    struct FixedLoad(LoadResponse);

    impl LoadProbe for FixedLoad {
        async fn load(&self, _info: &InstanceInfo) -> Result<LoadResponse, String> {
            Ok(self.0.clone())
        }
    }

    #[tokio::test]
    async fn plan_once_writes_desired_and_logs_the_decision() {
        let store = MemStore::new();
        let info = InstanceInfo {
            id: "decode-0".into(),
            role: Role::Decode,
            model: "m".into(),
            grpc_addr: "https://127.0.0.1:1".into(),
            http_addr: "127.0.0.1:2".into(),
            kv_addr: None,
            kv_server_name: None,
            kv_blocks: 64,
            max_sequences: 4,
            state: WorkerState::Serving,
            version: "0".into(),
        };
        store
            .put(
                &keys::instance("c", Role::Decode, "decode-0"),
                serde_json::to_vec(&info).expect("json"),
                None,
            )
            .await
            .expect("put");
        let probe = FixedLoad(LoadResponse {
            running: 4,
            waiting: 6,
            itl_ms: 300.0,
            state: "serving".into(),
            ..Default::default()
        });
        let mut policy = Policy::default();
        let changes = plan_once(&store, "c", &probe, &targets(), &mut policy)
            .await
            .expect("plan");
        assert_eq!(changes.len(), 1, "{changes:?}");
        let (d, _) = read_desired(&store, "c", Role::Decode).await.expect("read");
        let d = d.expect("desired written");
        assert_eq!((d.replicas, d.by.as_str()), (4, "planner"));
        let log = read_decisions(&store, "c", 10).await.expect("log");
        assert_eq!(log.len(), 1);
        assert_eq!((log[0].from, log[0].to), (1, 4));
    }
}

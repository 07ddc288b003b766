//! The reconcile loop: follows `planner/desired/<role>` in the store and asks a
//! [`Connector`] to make the actual number of workers equal it.
//!
//! Each worker role has its own task, so a slow scale-down of one role (a
//! drain waits for in-flight requests) never holds up the other. A task acts
//! on the latest desired count only: counts written while a scale was under
//! way collapse into one. A failed scale is retried after a pause while the
//! desired count stays what it was.
//!
//! Between changes each task checks every 5 s that the role still runs its
//! desired count: workers that exited on their own (a crash, a device failure)
//! are replaced, at once the first time and then after a pause that doubles
//! (5 s up to a minute) while replacements keep dying within two minutes of
//! each other, so a worker that cannot start does not spin. Each replacement
//! goes into the planner's decision log (`by: "reconcile"`), where operators
//! read scaling history.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tandem_protocol::{Desired, PlannerDecision, unix_ms};
use tandem_protocol::{Role, keys};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{Connector, Event, Store, StoreError};

/// Pause before retrying a failed scale or a lost watch.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// How a role's task holds its count between changes.
#[derive(Debug, Clone, Copy)]
struct Resync {
    /// How often the running count is compared with the desired one.
    every: Duration,
    /// The longest pause before replacing workers that keep exiting.
    max_pause: Duration,
    /// Replacements further apart than this are not a crash loop.
    crash_window: Duration,
}

const RESYNC: Resync = Resync {
    every: Duration::from_secs(5),
    max_pause: Duration::from_secs(60),
    crash_window: Duration::from_secs(120),
};

impl Resync {
    /// The pause before the `n`th replacement in a row (0: at once).
    fn restart_pause(&self, n: u32) -> Duration {
        match n {
            0 => Duration::ZERO,
            n => self
                .every
                .saturating_mul(1 << (n - 1).min(8))
                .min(self.max_pause),
        }
    }
}

/// The worker roles a connector scales.
pub const WORKER_ROLES: [Role; 2] = [Role::Prefill, Role::Decode];

/// Follows the desired counts of `cluster` and scales `connector` to them
/// until `stop` turns true.
pub async fn reconcile<S: Store, C: Connector>(
    store: S,
    cluster: String,
    connector: Arc<C>,
    stop: watch::Receiver<bool>,
) {
    reconcile_with(store, cluster, connector, stop, RESYNC).await;
}

async fn reconcile_with<S: Store, C: Connector>(
    store: S,
    cluster: String,
    connector: Arc<C>,
    mut stop: watch::Receiver<bool>,
    resync: Resync,
) {
    let store = Arc::new(store);
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for role in WORKER_ROLES {
        let (tx, rx) = watch::channel::<Option<u32>>(None);
        senders.push((role, tx));
        let log = DecisionLog {
            store: store.clone(),
            cluster: cluster.clone(),
        };
        tasks.push(tokio::spawn(scale_role(
            role,
            connector.clone(),
            rx,
            stop.clone(),
            resync,
            log,
        )));
    }
    let send = |role: Role, replicas: u32| {
        for (r, tx) in &senders {
            if *r == role {
                tx.send_if_modified(|cur| {
                    let changed = *cur != Some(replicas);
                    *cur = Some(replicas);
                    changed
                });
            }
        }
    };
    loop {
        let followed = follow(&*store, &cluster, &send);
        let err = tokio::select! {
            e = followed => e,
            _ = stop.wait_for(|s| *s) => break,
        };
        tracing::warn!(error = %err, "lost the desired counts' watch; following again");
        tokio::select! {
            () = tokio::time::sleep(RETRY_AFTER) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    drop(senders);
    for task in tasks {
        if let Err(e) = task.await {
            tracing::warn!(error = %e, "a scaling task ended abnormally");
        }
    }
}

/// Lists the desired counts, then follows their changes; returns why it stopped.
async fn follow<S: Store>(store: &S, cluster: &str, send: &impl Fn(Role, u32)) -> StoreError {
    let prefix = desired_prefix(cluster);
    let (kvs, revision) = match store.list(&prefix).await {
        Ok(r) => r,
        Err(e) => return e,
    };
    for kv in kvs {
        if let Some((role, desired)) = parse(&prefix, &kv.key, &kv.value) {
            send(role, desired.replicas);
        }
    }
    let mut watch = match store.watch(&prefix, Some(revision + 1)).await {
        Ok(w) => w,
        Err(e) => return e,
    };
    loop {
        match watch.next().await {
            Ok(Event::Put(kv)) => {
                if let Some((role, desired)) = parse(&prefix, &kv.key, &kv.value) {
                    tracing::info!(
                        %role, replicas = desired.replicas, by = %desired.by,
                        "desired count changed"
                    );
                    send(role, desired.replicas);
                }
            }
            // No desired count: leave the workers as they are.
            Ok(Event::Delete { .. }) => {}
            Err(e) => return e,
        }
    }
}

/// `/tandem/<cluster>/planner/desired/`.
pub(crate) fn desired_prefix(cluster: &str) -> String {
    let key = keys::planner_desired(cluster, Role::Decode);
    let cut = key.len() - Role::Decode.as_str().len();
    key[..cut].to_owned()
}

fn parse(prefix: &str, key: &str, value: &[u8]) -> Option<(Role, Desired)> {
    let role = Role::from_str(key.strip_prefix(prefix)?).ok()?;
    if !WORKER_ROLES.contains(&role) {
        return None;
    }
    match Desired::from_json(key, value) {
        Ok(d) => Some((role, d)),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a desired count");
            None
        }
    }
}

/// Where a role's task records the replacements it starts.
struct DecisionLog<S> {
    store: Arc<S>,
    cluster: String,
}

impl<S: Store> DecisionLog<S> {
    async fn replaced(&self, role: Role, running: u32, desired: u32, pause: Duration) {
        let missing = desired - running;
        let mut reason =
            format!("{missing} {role} worker(s) exited on their own; starting replacements");
        if !pause.is_zero() {
            reason.push_str(&format!(" after {} s (they keep exiting)", pause.as_secs()));
        }
        let decision = PlannerDecision {
            at_ms: unix_ms(),
            role,
            from: running,
            to: desired,
            reason,
            by: "reconcile".into(),
        };
        if let Err(e) =
            crate::planner::append_decision(&*self.store, &self.cluster, &decision).await
        {
            tracing::warn!(%role, error = %e, "cannot log the replacement");
        }
    }
}

/// Scales one role to the latest desired count, retrying failures, and
/// replaces workers that exit while the count holds.
async fn scale_role<S: Store, C: Connector>(
    role: Role,
    connector: Arc<C>,
    mut desired: watch::Receiver<Option<u32>>,
    mut stop: watch::Receiver<bool>,
    resync: Resync,
    log: DecisionLog<S>,
) {
    // Replacements in a row, and when the last one started.
    let mut restarts = 0u32;
    let mut last_restart: Option<Instant> = None;
    loop {
        let Some(replicas) = *desired.borrow_and_update() else {
            tokio::select! {
                r = desired.changed() => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            continue;
        };
        let result = tokio::select! {
            r = connector.scale(role, replicas) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let pause = match result {
            Ok(()) => {
                let held = hold(
                    role,
                    &*connector,
                    replicas,
                    &mut desired,
                    &mut stop,
                    resync.every,
                );
                let running = match held.await {
                    Held::Changed => continue,
                    Held::Stopped => return,
                    Held::Missing(running) => running,
                };
                let now = Instant::now();
                restarts = match last_restart {
                    Some(t) if now - t < resync.crash_window => restarts + 1,
                    _ => 0,
                };
                last_restart = Some(now);
                let pause = resync.restart_pause(restarts);
                tracing::warn!(
                    %role, running, desired = replicas, ?pause,
                    "workers exited on their own; replacing them"
                );
                log.replaced(role, running, replicas, pause).await;
                pause
            }
            Err(e) => {
                tracing::warn!(%role, replicas, error = %e, "scaling failed; retrying");
                RETRY_AFTER
            }
        };
        // Scale again after the pause, or at once to a new count.
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            r = desired.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// What ended [`hold`].
enum Held {
    /// The desired count changed.
    Changed,
    /// The task is to end.
    Stopped,
    /// Fewer workers run than wanted: this many.
    Missing(u32),
}

/// Waits while `role` runs `replicas` workers, comparing every `every`.
async fn hold<C: Connector>(
    role: Role,
    connector: &C,
    replicas: u32,
    desired: &mut watch::Receiver<Option<u32>>,
    stop: &mut watch::Receiver<bool>,
    every: Duration,
) -> Held {
    loop {
        tokio::select! {
            r = desired.changed() => return if r.is_err() { Held::Stopped } else { Held::Changed },
            _ = stop.wait_for(|s| *s) => return Held::Stopped,
            () = tokio::time::sleep(every) => {}
        }
        match connector.running(role).await {
            Ok(n) if n < replicas => return Held::Missing(n),
            Ok(_) => {}
            Err(e) => tracing::warn!(%role, error = %e, "cannot count the running workers"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use super::*;
    use crate::{ConnectorError, MemStore};

    #[derive(Default)]
    struct Fake {
        counts: Mutex<BTreeMap<Role, u32>>,
        /// Every scale call, in order.
        calls: Mutex<Vec<(Role, u32)>>,
    }

    impl Connector for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }

        async fn scale(&self, role: Role, replicas: u32) -> Result<(), ConnectorError> {
            self.counts.lock().expect("lock").insert(role, replicas);
            self.calls.lock().expect("lock").push((role, replicas));
            Ok(())
        }

        async fn running(&self, role: Role) -> Result<u32, ConnectorError> {
            Ok(self
                .counts
                .lock()
                .expect("lock")
                .get(&role)
                .copied()
                .unwrap_or(0))
        }
    }

    async fn set_desired(store: &MemStore, cluster: &str, role: Role, n: u32) {
        store
            .put(&keys::planner_desired(cluster, role), desired(n), None)
            .await
            .expect("put");
    }

    fn desired(n: u32) -> Vec<u8> {
        serde_json::to_vec(&Desired {
            replicas: n,
            by: "operator".into(),
            at_ms: 0,
        })
        .expect("json")
    }

    async fn wait_for(fake: &Fake, role: Role, n: u32) {
        for _ in 0..200 {
            if fake.running(role).await.expect("running") == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{role} never reached {n}");
    }

    #[tokio::test]
    async fn scales_to_the_existing_then_the_changed_desired_counts() {
        let store = MemStore::new();
        set_desired(&store, "c", Role::Decode, 2).await;
        let fake = Arc::new(Fake::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(reconcile(store.clone(), "c".into(), fake.clone(), stopped));
        wait_for(&fake, Role::Decode, 2).await;
        set_desired(&store, "c", Role::Prefill, 3).await;
        set_desired(&store, "c", Role::Decode, 1).await;
        // Another cluster's keys are not ours.
        set_desired(&store, "d", Role::Decode, 5).await;
        wait_for(&fake, Role::Prefill, 3).await;
        wait_for(&fake, Role::Decode, 1).await;
        stop.send(true).expect("stop");
        task.await.expect("reconcile ends");
        assert_eq!(fake.running(Role::Decode).await.expect("running"), 1);
    }

    /// Workers that die are replaced: the first time at the next check, then
    /// after a pause that grows while the replacements keep dying; a role
    /// whose workers stay up is left alone.
    #[tokio::test]
    async fn replaces_workers_that_exit_backing_off_while_they_keep_dying() {
        let resync = Resync {
            every: Duration::from_millis(100),
            max_pause: Duration::from_secs(10),
            crash_window: Duration::from_secs(60),
        };
        let store = MemStore::new();
        set_desired(&store, "c", Role::Decode, 2).await;
        let fake = Arc::new(Fake::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(reconcile_with(
            store.clone(),
            "c".into(),
            fake.clone(),
            stopped,
            resync,
        ));
        wait_for(&fake, Role::Decode, 2).await;
        let scales = || fake.calls.lock().expect("lock").len();
        let start = scales();
        tokio::time::sleep(resync.every * 5).await;
        assert_eq!(scales(), start, "a healthy role is left alone");

        // Four crashes in a row: replaced after at least 0, 100, 200, 400 ms.
        for n in 0..4 {
            fake.counts.lock().expect("lock").insert(Role::Decode, 1);
            let died = Instant::now();
            wait_for(&fake, Role::Decode, 2).await;
            let took = died.elapsed();
            let pause = resync.restart_pause(n);
            assert!(
                took >= pause && took < pause + Duration::from_secs(1),
                "replacement {n} after {took:?}, its pause {pause:?}"
            );
        }
        assert_eq!(scales(), start + 4);
        let logged = crate::planner::read_decisions(&store, "c", 10)
            .await
            .expect("decision log");
        assert_eq!(logged.len(), 4, "{logged:?}");
        assert!(
            logged.iter().all(|d| d.by == "reconcile"
                && d.role == Role::Decode
                && (d.from, d.to) == (1, 2)
                && d.reason.contains("exited on their own")),
            "{logged:?}"
        );
        stop.send(true).expect("stop");
        task.await.expect("reconcile ends");
    }

    #[test]
    fn the_restart_pause_doubles_up_to_a_minute() {
        let secs: Vec<u64> = (0..10).map(|n| RESYNC.restart_pause(n).as_secs()).collect();
        assert_eq!(secs, [0, 5, 10, 20, 40, 60, 60, 60, 60, 60]);
    }
}

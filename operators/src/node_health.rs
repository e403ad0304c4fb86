//! Node health as a differential collection in event time.
//!
//! A heartbeat at time `t` is evidence that its node is alive from `t` until
//! `t + heartbeat_timeout`, and *fresh* until `t + unhealthy_after`. Both windows are
//! expressed as updates in the future (a retraction at `t + timeout`), so "which nodes are
//! alive at time t" is a plain reduction over a collection, maintained incrementally by
//! differential dataflow. Status changes and per-region rollups are derived from it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

use crate::records::{Gauge, HealthStatus, Heartbeat, NodeState, RegionRollup, StatusChange};
use crate::state::{Entry, StateHandle, WorkerState};
use crate::window_aggregate::{from_micros, to_micros};
use crate::{route_hash, DurationMs, EventTime};

/// YAML configuration of the `node_health` operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeHealthConfig {
    /// A node with no heartbeat for this long is Offline (default 90s: three missed 30s
    /// heartbeats).
    #[serde(default = "defaults::heartbeat_timeout")]
    pub heartbeat_timeout: DurationMs,
    /// A node whose latest heartbeat is older than this (but younger than
    /// `heartbeat_timeout`) is Unhealthy: its heartbeats are late (default 45s).
    #[serde(default = "defaults::unhealthy_after")]
    pub unhealthy_after: DurationMs,
    /// CPU percent at or above which a node is Degraded (default 90).
    #[serde(default = "defaults::cpu_degraded")]
    pub cpu_degraded: f64,
    /// Memory percent at or above which a node is Degraded (default 90).
    #[serde(default = "defaults::memory_degraded")]
    pub memory_degraded: f64,
    /// Disk percent at or above which a node is Degraded (default 95).
    #[serde(default = "defaults::disk_degraded")]
    pub disk_degraded: f64,
    /// Length of the tumbling window of the per-region rollups (default 10s).
    #[serde(default = "defaults::rollup_window")]
    pub rollup_window: DurationMs,
}

mod defaults {
    use crate::DurationMs;
    pub fn heartbeat_timeout() -> DurationMs {
        DurationMs::from_secs(90)
    }
    pub fn unhealthy_after() -> DurationMs {
        DurationMs::from_secs(45)
    }
    pub fn cpu_degraded() -> f64 {
        90.0
    }
    pub fn memory_degraded() -> f64 {
        90.0
    }
    pub fn disk_degraded() -> f64 {
        95.0
    }
    pub fn rollup_window() -> DurationMs {
        DurationMs::from_secs(10)
    }
}

impl Default for NodeHealthConfig {
    fn default() -> Self {
        Self {
            heartbeat_timeout: defaults::heartbeat_timeout(),
            unhealthy_after: defaults::unhealthy_after(),
            cpu_degraded: defaults::cpu_degraded(),
            memory_degraded: defaults::memory_degraded(),
            disk_degraded: defaults::disk_degraded(),
            rollup_window: defaults::rollup_window(),
        }
    }
}

/// A parameter of `node_health` that cannot work.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeHealthError {
    #[error("`unhealthy_after` ({unhealthy_after}) must be shorter than `heartbeat_timeout` ({timeout})")]
    UnhealthyAfterTimeout { unhealthy_after: DurationMs, timeout: DurationMs },
    #[error("`{field}` is {value}; a threshold must be a percentage in (0, 100]")]
    Threshold { field: &'static str, value: f64 },
    #[error("`{0}` must be longer than 0ms")]
    ZeroDuration(&'static str),
}

impl crate::params::FieldError for NodeHealthError {
    fn field(&self) -> &str {
        match self {
            NodeHealthError::UnhealthyAfterTimeout { .. } => "unhealthy_after",
            NodeHealthError::Threshold { field, .. } | NodeHealthError::ZeroDuration(field) => field,
        }
    }
}

/// Validated parameters of `node_health`; the running operator only ever sees these.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeHealthParams {
    timeout: u64,
    unhealthy_after: u64,
    cpu_degraded: f64,
    memory_degraded: f64,
    disk_degraded: f64,
    rollup_window: u64,
}

impl NodeHealthParams {
    /// Checks `config` and returns parameters the operator can run with.
    pub fn try_new(config: &NodeHealthConfig) -> Result<Self, NodeHealthError> {
        for (field, value) in [
            ("heartbeat_timeout", config.heartbeat_timeout),
            ("unhealthy_after", config.unhealthy_after),
            ("rollup_window", config.rollup_window),
        ] {
            if value.as_millis() == 0 {
                return Err(NodeHealthError::ZeroDuration(field));
            }
        }
        if config.unhealthy_after >= config.heartbeat_timeout {
            return Err(NodeHealthError::UnhealthyAfterTimeout {
                unhealthy_after: config.unhealthy_after,
                timeout: config.heartbeat_timeout,
            });
        }
        for (field, value) in [
            ("cpu_degraded", config.cpu_degraded),
            ("memory_degraded", config.memory_degraded),
            ("disk_degraded", config.disk_degraded),
        ] {
            if !(value > 0.0 && value <= 100.0) {
                return Err(NodeHealthError::Threshold { field, value });
            }
        }
        Ok(Self {
            timeout: config.heartbeat_timeout.as_millis(),
            unhealthy_after: config.unhealthy_after.as_millis(),
            cpu_degraded: config.cpu_degraded,
            memory_degraded: config.memory_degraded,
            disk_degraded: config.disk_degraded,
            rollup_window: config.rollup_window.as_millis(),
        })
    }

    /// The rollup window length in milliseconds.
    pub fn rollup_window_ms(&self) -> u64 {
        self.rollup_window
    }

    /// The status of a node whose latest live heartbeat has these readings.
    /// `fresh` is false once the heartbeat is older than `unhealthy_after`.
    pub fn classify(&self, fresh: bool, cpu: f64, memory: f64, disk: f64) -> HealthStatus {
        if !fresh {
            HealthStatus::Unhealthy
        } else if cpu >= self.cpu_degraded || memory >= self.memory_degraded || disk >= self.disk_degraded {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        }
    }

    /// Status of a node at time `now` given all of its heartbeats' event times and readings,
    /// computed from scratch. This is the specification the incremental operator is tested
    /// against, and what a hand-written loop computes.
    pub fn status_at(&self, now: EventTime, beats: &[(EventTime, f64, f64, f64)]) -> HealthStatus {
        let latest = beats
            .iter()
            .filter(|(t, ..)| *t <= now && now < t.saturating_add(self.timeout))
            .max_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.total_cmp(&b.2)).then(a.3.total_cmp(&b.3)));
        match latest {
            None => HealthStatus::Offline,
            Some(&(t, cpu, memory, disk)) => {
                self.classify(now < t.saturating_add(self.unhealthy_after), cpu, memory, disk)
            }
        }
    }

    /// The end of the rollup window that holds `time` (saturating near `u64::MAX`).
    pub fn window_end(&self, time: EventTime) -> EventTime {
        time.div_ceil(self.rollup_window).saturating_mul(self.rollup_window)
    }
}

/// What the node-health reduction sees per node: that the node is known (ever sent a
/// heartbeat), and each heartbeat still in force with whether it is still fresh.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Evidence {
    Known { node_id: String, region: String },
    Beat { time: EventTime, fresh: bool, cpu: Gauge, memory: Gauge, disk: Gauge },
}

/// Nodes are keyed by a 64-bit hash of their id inside the dataflow: comparing, hashing and
/// copying a `u64` is much cheaper than a `String` in arrangements. Two ids with the same
/// hash would share a key; with 64 bits this is vanishingly unlikely for any real fleet.
pub type NodeKey = u64;

/// The three outputs of `node_health`.
#[derive(Clone)]
pub struct NodeHealthStreams<'scope> {
    /// The live status collection: one `(key, NodeState)` per known node at every time.
    pub status: VecCollection<'scope, EventTime, (NodeKey, NodeState)>,
    /// One record each time a node's status changes (or a node is first seen).
    pub changes: StreamVec<'scope, EventTime, StatusChange>,
    /// Per-region nodes per status and resource use, at the end of each rollup window.
    pub rollups: StreamVec<'scope, EventTime, RegionRollup>,
}

impl std::fmt::Debug for NodeHealthStreams<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHealthStreams").finish_non_exhaustive()
    }
}

/// Computes node health from a collection of heartbeats.
///
/// ```
/// use differential_dataflow::input::Input;
/// use edgeflow_operators::node_health::{NodeHealth, NodeHealthConfig, NodeHealthParams};
/// use edgeflow_operators::Heartbeat;
/// use timely::dataflow::operators::{Inspect, Probe};
///
/// let params = NodeHealthParams::try_new(&NodeHealthConfig::default()).unwrap();
/// timely::execute_directly(move |worker| {
///     let mut input = worker.dataflow::<u64, _, _>(|scope| {
///         let (input, heartbeats) = scope.new_collection::<Heartbeat, isize>();
///         heartbeats
///             .node_health(&params)
///             .changes
///             .inspect(|change| println!("{} -> {}", change.node_id, change.to));
///         input
///     });
///     let beat: Heartbeat = serde_json::from_str(
///         r#"{"node_id":"n1","region":"eu","lat":0,"lon":0,"timestamp":0,"cpu":5,"memory":5,"disk":5}"#,
///     ).unwrap();
///     input.insert(beat);
/// });
/// ```
pub trait NodeHealth<'scope> {
    /// Node health under `params`; see the module documentation for the semantics.
    fn node_health(self, params: &NodeHealthParams) -> NodeHealthStreams<'scope>;

    /// Node health that takes part in checkpoints through `state` as `name` (its parts are
    /// `NAME/status`, `NAME/changes`, `NAME/readings` and `NAME/rollups`): it saves each
    /// node's latest heartbeat and status, the open rollup windows and the last reported
    /// rollups, and after a restore carries on as if it had never stopped. The restored
    /// nodes' states are stated again on the `status` collection at the checkpoint's time
    /// (a snapshot, as a live collection's new reader gets); `changes` and `rollups` go on
    /// exactly as an uninterrupted run's.
    fn node_health_checkpointed(
        self,
        params: &NodeHealthParams,
        state: &WorkerState,
        name: &str,
    ) -> NodeHealthStreams<'scope>;
}

impl<'scope> NodeHealth<'scope> for VecCollection<'scope, EventTime, Heartbeat> {
    fn node_health(self, params: &NodeHealthParams) -> NodeHealthStreams<'scope> {
        self.node_health_checkpointed(params, &WorkerState::default(), "node_health")
    }

    fn node_health_checkpointed(
        self,
        params: &NodeHealthParams,
        state: &WorkerState,
        name: &str,
    ) -> NodeHealthStreams<'scope> {
        let handle = |part: &str| state.handle(&format!("{name}/{part}"));
        let status = status_machine(self.clone(), params, handle("status"));
        let changes = status_changes(status.clone(), handle("changes"));
        let rollups = region_rollups(status.clone(), self, params, handle("readings"), handle("rollups"));
        NodeHealthStreams { status, changes, rollups }
    }
}

/// What a checkpoint keeps of one node in the status machine.
#[derive(Serialize, Deserialize)]
struct SavedNode {
    node_id: String,
    region: String,
    /// Data time and readings of the latest heartbeat.
    latest: (EventTime, Gauge, Gauge, Gauge),
    /// The status in the collection.
    status: Option<HealthStatus>,
}

/// An update of the status collection.
type StatusUpdate = ((NodeKey, NodeState), EventTime, isize);

/// A heartbeat waiting for the frontier: node key, cpu/memory/disk, and the node's id and
/// region when the worker has not seen the node before.
type PendingBeat = (NodeKey, [Gauge; 3], Option<(String, String)>);

/// The node-status collection computed by event-time timers, one state machine per node.
///
/// Per node only the latest heartbeat matters (a newer heartbeat's fresh and alive periods
/// outlast an older one's), so the operator keeps it and two deadlines, `t + unhealthy_after`
/// and `t + heartbeat_timeout`, in a timer heap. Heartbeats and deadlines are processed in
/// event-time order once the frontier has passed them; whenever a node's status at that time
/// differs from the one in the collection, the old state is retracted and the new one added.
/// The result equals the differential formulation ([`status_differential`]) update for
/// update, at a fraction of its cost. The input must be append-only (heartbeats are never
/// retracted).
fn status_machine<'scope>(
    heartbeats: VecCollection<'scope, EventTime, Heartbeat>,
    params: &NodeHealthParams,
    state: StateHandle,
) -> VecCollection<'scope, EventTime, (NodeKey, NodeState)> {
    type Update = (Heartbeat, EventTime, isize);
    struct Node {
        state: Option<NodeState>,
        node_id: String,
        region: String,
        /// Data time and readings of the latest heartbeat.
        latest: (EventTime, Gauge, Gauge, Gauge),
    }
    let params = params.clone();
    let pact = Exchange::new(|update: &Update| route_hash(&update.0.node_id));
    let scope = heartbeats.scope();
    heartbeats
        .inner
        .unary_frontier(pact, "NodeHealth", move |initial, info| {
            state.activate_with(scope.activator_for(info.address));
            let mut nodes: HashMap<NodeKey, Node> = HashMap::new();
            // Heartbeats waiting for the frontier, reduced to what the state machine needs; the
            // id and region travel along only for nodes this worker has not seen yet.
            let mut pending: BTreeMap<EventTime, Vec<PendingBeat>> = BTreeMap::new();
            let mut timers: BinaryHeap<Reverse<(EventTime, NodeKey)>> = BinaryHeap::new();
            let mut held: Option<Capability<EventTime>> = None;
            let mut touched: Vec<NodeKey> = Vec::new();
            let mut changed: Vec<StatusUpdate> = Vec::new();
            // Restored nodes: their deadlines still ahead go back on the timer heap, and their
            // states are stated again at the checkpoint's time (downstream starts empty).
            let mut restated: Option<(Capability<EventTime>, Vec<StatusUpdate>)> = None;
            if let Some((at, entries)) = state.restored() {
                let mut states = Vec::new();
                for entry in entries {
                    let Ok(saved) = entry.value::<SavedNode>() else {
                        tracing::error!(part = state.name(), "a saved node does not decode; it is left out");
                        continue;
                    };
                    let key = entry.route;
                    let (t, ..) = saved.latest;
                    for deadline in [t.saturating_add(params.unhealthy_after), t.saturating_add(params.timeout)] {
                        if deadline >= at {
                            timers.push(Reverse((deadline, key)));
                        }
                    }
                    let node_state = saved.status.map(|status| NodeState {
                        node_id: saved.node_id.clone(),
                        region: saved.region.clone(),
                        status,
                    });
                    if let Some(node_state) = &node_state {
                        states.push(((key, node_state.clone()), at, 1));
                    }
                    nodes.insert(
                        key,
                        Node { state: node_state, node_id: saved.node_id, region: saved.region, latest: saved.latest },
                    );
                }
                held = Some(initial.delayed(&at));
                restated = Some((initial.delayed(&at), states));
            }
            move |(input, frontier), output| {
                if let Some((cap, mut states)) = restated.take() {
                    output.session(&cap).give_iterator(states.drain(..));
                }
                input.for_each(|cap, data| {
                    let time = cap.least().copied().unwrap_or_default();
                    if held.as_ref().is_none_or(|h| time < *h.time()) {
                        held = cap.retain_least(output.output_index());
                    }
                    for (hb, t, diff) in data.drain(..) {
                        if diff > 0 {
                            let key = route_hash(&hb.node_id);
                            let names = (!nodes.contains_key(&key)).then_some((hb.node_id, hb.region));
                            pending.entry(t).or_default().push((
                                key,
                                [Gauge(hb.cpu), Gauge(hb.memory), Gauge(hb.disk)],
                                names,
                            ));
                        }
                    }
                });
                let save = |nodes: &HashMap<NodeKey, Node>| {
                    let entries = nodes.iter().map(|(key, node)| {
                        let status = node.state.as_ref().map(|state| state.status);
                        let saved = SavedNode {
                            node_id: node.node_id.clone(),
                            region: node.region.clone(),
                            latest: node.latest,
                            status,
                        };
                        Entry::new(*key, &saved)
                    });
                    state.save(entries.collect());
                };
                loop {
                    let next_beat = pending.first_key_value().map(|(t, _)| *t);
                    let next_timer = timers.peek().map(|Reverse((t, _))| *t);
                    let Some(now) = next_beat.into_iter().chain(next_timer).min() else { break };
                    if frontier.less_equal(&now) {
                        break;
                    }
                    if state.due_at(frontier).is_some_and(|at| now >= at) {
                        save(&nodes);
                    }
                    let Some(cap) = held.as_ref() else { break };
                    touched.clear();
                    if next_beat == Some(now) {
                        for (key, [cpu, memory, disk], names) in
                            pending.pop_first().map(|(_, beats)| beats).unwrap_or_default()
                        {
                            let readings = (now, cpu, memory, disk);
                            let node = match nodes.entry(key) {
                                std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
                                std::collections::hash_map::Entry::Vacant(entry) => {
                                    let (node_id, region) = names.unwrap_or_default();
                                    entry.insert(Node { state: None, node_id, region, latest: readings })
                                }
                            };
                            node.latest = node.latest.max(readings);
                            timers.push(Reverse((now.saturating_add(params.unhealthy_after), key)));
                            timers.push(Reverse((now.saturating_add(params.timeout), key)));
                            touched.push(key);
                        }
                    }
                    while let Some(Reverse((at, key))) = timers.peek().copied() {
                        if at != now {
                            break;
                        }
                        timers.pop();
                        touched.push(key);
                    }
                    touched.sort_unstable();
                    touched.dedup();
                    // Most times change no node's status: the capability for `now` (a
                    // progress update) is made only when one does.
                    changed.clear();
                    for key in &touched {
                        let Some(node) = nodes.get_mut(key) else { continue };
                        let (t, cpu, memory, disk) = node.latest;
                        let status = if now < t.saturating_add(params.timeout) {
                            params.classify(now < t.saturating_add(params.unhealthy_after), cpu.0, memory.0, disk.0)
                        } else {
                            HealthStatus::Offline
                        };
                        if node.state.as_ref().is_some_and(|state| state.status == status) {
                            continue;
                        }
                        let new = NodeState { node_id: node.node_id.clone(), region: node.region.clone(), status };
                        if let Some(old) = node.state.replace(new.clone()) {
                            changed.push(((*key, old), now, -1));
                        }
                        changed.push(((*key, new), now, 1));
                    }
                    if !changed.is_empty() {
                        let at = cap.delayed(&now);
                        output.session(&at).give_iterator(changed.drain(..));
                    }
                }
                if state.due_at(frontier).is_some() {
                    save(&nodes);
                }
                let next = pending
                    .first_key_value()
                    .map(|(t, _)| *t)
                    .into_iter()
                    .chain(timers.peek().map(|Reverse((t, _))| *t))
                    .min();
                match (next, held.as_mut()) {
                    (Some(next), Some(cap)) => cap.downgrade(&next),
                    _ => held = None,
                }
            }
        })
        .as_collection()
}

/// The node-status collection in its purely differential formulation: each heartbeat is
/// evidence that is fresh on `[t, t+unhealthy_after)` and alive on `[t, t+timeout)`, as
/// updates with retractions in the future, and a reduction per node picks the latest live
/// evidence. It states the semantics most directly and serves as the reference that
/// [`NodeHealth::node_health`] is tested against; it does several times more work.
pub fn status_differential<'scope>(
    heartbeats: VecCollection<'scope, EventTime, Heartbeat>,
    params: &NodeHealthParams,
) -> VecCollection<'scope, EventTime, (NodeKey, NodeState)> {
    let (soft, timeout) = (params.unhealthy_after, params.timeout);

    // Each heartbeat is fresh on [t, t+soft), stale on [t+soft, t+timeout), gone after; and
    // it makes its node known for good (the `Known` evidence is never retracted, and
    // consolidates to one entry per node as the arrangement compacts).
    let mut seen: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
    let evidence = heartbeats
        .clone()
        .inner
        .flat_map(move |(hb, t, r): (Heartbeat, EventTime, isize)| {
            let node = route_hash(&hb.node_id);
            let beat = |fresh| Evidence::Beat {
                time: hb.timestamp,
                fresh,
                cpu: Gauge(hb.cpu),
                memory: Gauge(hb.memory),
                disk: Gauge(hb.disk),
            };
            let (fresh, stale) = (beat(true), beat(false));
            // A node is known from its first heartbeat on. The evidence is never retracted,
            // so each worker states it once per node (the count does not matter, only that
            // it is positive), instead of once per heartbeat.
            let first = r > 0 && !seen.contains(&(hb.node_id.clone(), hb.region.clone()));
            let known = first.then(|| {
                seen.insert((hb.node_id.clone(), hb.region.clone()));
                ((node, Evidence::Known { node_id: hb.node_id, region: hb.region }), t, 1)
            });
            known.into_iter().chain([
                ((node, fresh.clone()), t, r),
                ((node, fresh), t.saturating_add(soft), -r),
                ((node, stale.clone()), t.saturating_add(soft), r),
                ((node, stale), t.saturating_add(timeout), -r),
            ])
        })
        .as_collection();

    let classify = params.clone();
    evidence.reduce_named("NodeHealth", move |_key, evidence, output| {
        let mut known = None;
        let mut latest = None;
        for (item, count) in evidence {
            if *count <= 0 {
                continue;
            }
            match item {
                Evidence::Known { node_id, region } => known = Some((node_id, region)),
                // Values arrive sorted, so the last live beat is the latest one.
                Evidence::Beat { fresh, cpu, memory, disk, .. } => latest = Some((*fresh, cpu.0, memory.0, disk.0)),
            }
        }
        let Some((node_id, region)) = known else { return };
        let status = match latest {
            Some((fresh, cpu, memory, disk)) => classify.classify(fresh, cpu, memory, disk),
            None => HealthStatus::Offline,
        };
        output.push((NodeState { node_id: node_id.clone(), region: region.clone(), status }, 1));
    })
}

/// Node states that became current at one time, with the capability to report them.
type PendingStates = (Capability<EventTime>, Vec<(NodeState, isize)>);

/// Turns the status collection's updates into one `StatusChange` per node whose status
/// differs from its previous one, once the time is final.
fn status_changes<'scope>(
    status: VecCollection<'scope, EventTime, (NodeKey, NodeState)>,
    saved: StateHandle,
) -> StreamVec<'scope, EventTime, StatusChange> {
    type Update = ((NodeKey, NodeState), EventTime, isize);
    let pact = Exchange::new(|update: &Update| (update.0).0);
    let scope = status.scope();
    status.inner.unary_frontier(pact, "NodeHealthChanges", move |_, info| {
        saved.activate_with(scope.activator_for(info.address));
        let mut pending: BTreeMap<EventTime, PendingStates> = BTreeMap::new();
        let mut current: HashMap<String, HealthStatus> = HashMap::new();
        if let Some((_, entries)) = saved.restored() {
            for entry in entries {
                match entry.value::<(String, HealthStatus)>() {
                    Ok((node_id, status)) => {
                        current.insert(node_id, status);
                    }
                    Err(err) => tracing::error!(part = saved.name(), %err, "a saved status is left out"),
                }
            }
        }
        let saver = saved.clone();
        let save = move |current: &HashMap<String, HealthStatus>| {
            let entries = current.iter().map(|(node_id, status)| Entry::new(route_hash(node_id), &(node_id, status)));
            saver.save(entries.collect());
        };
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                for ((_, state), time, diff) in data.drain(..) {
                    pending
                        .entry(time)
                        .or_insert_with(|| (cap.delayed(&time, output.output_index()), Vec::new()))
                        .1
                        .push((state, diff));
                }
            });
            while let Some(entry) = pending.first_entry() {
                if frontier.less_equal(entry.key()) {
                    break;
                }
                if saved.due_at(frontier).is_some_and(|at| *entry.key() >= at) {
                    save(&current);
                }
                let (time, (cap, mut updates)) = entry.remove_entry();
                // A time's updates, consolidated: a state restated after a restore and
                // replaced at the same time cancels out, as it never happened.
                differential_dataflow::consolidation::consolidate(&mut updates);
                let mut session = output.session(&cap);
                for (state, diff) in updates {
                    if diff <= 0 {
                        continue;
                    }
                    let previous = current.insert(state.node_id.clone(), state.status);
                    if previous != Some(state.status) {
                        session.give(StatusChange {
                            time,
                            node_id: state.node_id,
                            region: state.region,
                            from: previous,
                            to: state.status,
                        });
                    }
                }
            }
            if saved.due_at(frontier).is_some() {
                save(&current);
            }
        }
    })
}

/// Aggregate of one region as maintained by the rollup reduction.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct RegionAggregate {
    counts: [u64; 4],
    heartbeats: u64,
    cpu_mean: Option<Gauge>,
    cpu_max: Option<Gauge>,
    memory_mean: Option<Gauge>,
    memory_max: Option<Gauge>,
}

/// What the rollup reduction sees per region: each node's status, and each heartbeat's
/// readings during the window it arrived in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum RegionEvidence {
    Status(HealthStatus),
    /// One worker's partial aggregate of the region's heartbeats in one window.
    Readings(Readings),
}

/// Partial aggregate of heartbeat readings. Sums are kept exactly in millionths, so that
/// partials from any number of workers add up to the same result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Readings {
    count: u64,
    cpu_micros: i128,
    memory_micros: i128,
    cpu_max: Option<Gauge>,
    memory_max: Option<Gauge>,
}

impl Readings {
    fn add(&mut self, cpu: f64, memory: f64) {
        self.count += 1;
        self.cpu_micros += to_micros(cpu);
        self.memory_micros += to_micros(memory);
        self.cpu_max = self.cpu_max.max(Some(Gauge(cpu)));
        self.memory_max = self.memory_max.max(Some(Gauge(memory)));
    }

    fn merge(&mut self, other: &Readings, times: u64) {
        self.count += other.count * times;
        self.cpu_micros += other.cpu_micros * i128::from(times);
        self.memory_micros += other.memory_micros * i128::from(times);
        self.cpu_max = self.cpu_max.max(other.cpu_max);
        self.memory_max = self.memory_max.max(other.memory_max);
    }
}

/// Each worker sums its heartbeats' readings per region and rollup window, and states each
/// sum once, present from the window's end until the next window's end, instead of every
/// heartbeat entering the rollup reduction on its own.
///
/// Its input comes from this worker's sources only, which hand in nothing at or after a
/// checkpoint's time before the checkpoint is agreed: while one is due, readings at or after
/// its time are summed apart, so that the open windows saved hold exactly the heartbeats
/// before it.
fn window_readings<'scope>(
    heartbeats: VecCollection<'scope, EventTime, Heartbeat>,
    params: &NodeHealthParams,
    saved: StateHandle,
) -> VecCollection<'scope, EventTime, (String, RegionEvidence)> {
    type Windows = BTreeMap<EventTime, HashMap<String, Readings>>;
    fn add(windows: &mut HashMap<String, Readings>, region: String, cpu: f64, memory: f64) {
        match windows.get_mut(&region) {
            Some(readings) => readings.add(cpu, memory),
            None => {
                let mut readings = Readings::default();
                readings.add(cpu, memory);
                windows.insert(region, readings);
            }
        }
    }
    let params = params.clone();
    let window = params.rollup_window;
    let scope = heartbeats.scope();
    heartbeats
        .inner
        .unary_frontier(timely::dataflow::channels::pact::Pipeline, "RegionReadings", move |initial, info| {
            saved.activate_with(scope.activator_for(info.address));
            let mut open: BTreeMap<EventTime, (Capability<EventTime>, HashMap<String, Readings>)> = BTreeMap::new();
            // Readings at or after the time of a checkpoint being taken, until it is saved.
            let mut after: Windows = BTreeMap::new();
            if let Some((_, entries)) = saved.restored() {
                for entry in entries {
                    match entry.value::<(EventTime, String, Readings)>() {
                        Ok((end, region, readings)) => {
                            let (_, regions) =
                                open.entry(end).or_insert_with(|| (initial.delayed(&end), HashMap::new()));
                            regions.entry(region).or_default().merge(&readings, 1);
                        }
                        Err(err) => tracing::error!(part = saved.name(), %err, "saved readings are left out"),
                    }
                }
            }
            drop(initial);
            move |(input, frontier), output| {
                let due = saved.due();
                input.for_each(|cap, data| {
                    for (hb, t, diff) in data.drain(..) {
                        if diff <= 0 {
                            continue;
                        }
                        let end = params.window_end(t);
                        let (_, regions) = open
                            .entry(end)
                            .or_insert_with(|| (cap.delayed(&end, output.output_index()), HashMap::new()));
                        if due.is_some_and(|at| t >= at) {
                            add(after.entry(end).or_default(), hb.region, hb.cpu, hb.memory);
                        } else {
                            add(regions, hb.region, hb.cpu, hb.memory);
                        }
                    }
                });
                // Windows that close before a checkpoint's time go out before it is saved;
                // the open windows it saves hold only heartbeats before it.
                let mut due = saved.due_at(frontier);
                loop {
                    if let Some(at) = due.filter(|at| open.first_key_value().is_none_or(|(end, _)| end >= at)) {
                        let entries = open.iter().flat_map(|(end, (_, regions))| {
                            regions
                                .iter()
                                .map(move |(region, readings)| Entry::new(route_hash(region), &(end, region, readings)))
                        });
                        saved.save(entries.collect());
                        tracing::trace!(part = saved.name(), at, "saved");
                        for (end, regions) in std::mem::take(&mut after) {
                            if let Some((_, open)) = open.get_mut(&end) {
                                for (region, readings) in regions {
                                    open.entry(region).or_default().merge(&readings, 1);
                                }
                            }
                        }
                        due = None;
                    }
                    let Some(entry) = open.first_entry() else { break };
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (end, (cap, regions)) = entry.remove_entry();
                    let mut session = output.session(&cap);
                    for (region, readings) in regions {
                        session.give(((region.clone(), RegionEvidence::Readings(readings)), end, 1));
                        session.give(((region, RegionEvidence::Readings(readings)), end.saturating_add(window), -1));
                    }
                }
            }
        })
        .as_collection()
}

fn region_rollups<'scope>(
    status: VecCollection<'scope, EventTime, (NodeKey, NodeState)>,
    heartbeats: VecCollection<'scope, EventTime, Heartbeat>,
    params: &NodeHealthParams,
    readings_state: StateHandle,
    saved: StateHandle,
) -> StreamVec<'scope, EventTime, RegionRollup> {
    let window = params.rollup_window;
    let snap = params.clone();
    let statuses = status.map(|(_, state)| (state.region, RegionEvidence::Status(state.status)));
    let readings = window_readings(heartbeats, params, readings_state);
    let aggregates = statuses.delay(move |time| snap.window_end(*time)).concat(readings).reduce_named(
        "RegionRollup",
        |_region, values, output| {
            let mut aggregate = RegionAggregate::default();
            let mut readings = Readings::default();
            for (value, count) in values {
                let count = u64::try_from(*count).unwrap_or(0);
                match value {
                    RegionEvidence::Status(status) => aggregate.counts[status.index()] += count,
                    RegionEvidence::Readings(partial) => readings.merge(partial, count),
                }
            }
            aggregate.heartbeats = readings.count;
            if readings.count > 0 {
                let mean = |micros: i128| Gauge(from_micros(micros) / readings.count as f64);
                aggregate.cpu_mean = Some(mean(readings.cpu_micros));
                aggregate.memory_mean = Some(mean(readings.memory_micros));
                aggregate.cpu_max = readings.cpu_max;
                aggregate.memory_max = readings.memory_max;
            }
            output.push((aggregate, 1));
        },
    );

    type Update = ((String, RegionAggregate), EventTime, isize);
    let pact = Exchange::new(|update: &Update| route_hash(&(update.0).0));
    let scope = aggregates.scope();
    aggregates.inner.unary_frontier(pact, "RegionRollupWindows", move |_, info| {
        saved.activate_with(scope.activator_for(info.address));
        let mut pending: BTreeMap<EventTime, Vec<(String, RegionAggregate, isize)>> = BTreeMap::new();
        // The last aggregate reported per region. After a restore the reduction states every
        // region's aggregate anew (it starts empty): an aggregate equal to this one is no
        // change, as in the run that never stopped.
        let mut current: BTreeMap<String, RegionAggregate> = BTreeMap::new();
        if let Some((_, entries)) = saved.restored() {
            for entry in entries {
                match entry.value::<(String, RegionAggregate)>() {
                    Ok((region, aggregate)) => {
                        current.insert(region, aggregate);
                    }
                    Err(err) => tracing::error!(part = saved.name(), %err, "a saved rollup is left out"),
                }
            }
        }
        let saver = saved.clone();
        let save = move |current: &BTreeMap<String, RegionAggregate>| {
            let entries =
                current.iter().map(|(region, aggregate)| Entry::new(route_hash(region), &(region, aggregate)));
            saver.save(entries.collect());
        };
        // Capability at the next window end to report.
        let mut next: Option<Capability<EventTime>> = None;
        let mut changed: HashSet<String> = HashSet::new();
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                for ((region, aggregate), time, diff) in data.drain(..) {
                    match &next {
                        Some(held) if held.time() <= &time => {}
                        _ => next = Some(cap.delayed(&time, output.output_index())),
                    }
                    pending.entry(time).or_default().push((region, aggregate, diff));
                }
            });
            // A region is reported at a window end where its aggregate changed or where it had
            // heartbeats; windows in which nothing happened anywhere are skipped, so the work
            // is bounded by the data and not by the span of event time it covers.
            while let Some(cap) = next.as_mut() {
                let end = *cap.time();
                if frontier.less_equal(&end) {
                    break;
                }
                if saved.due_at(frontier).is_some_and(|at| end >= at) {
                    save(&current);
                }
                changed.clear();
                if let Some(mut updates) = pending.remove(&end) {
                    // Retractions first, so that a region's new aggregate replaces the old.
                    updates.sort_by_key(|update| update.2);
                    for (region, aggregate, diff) in updates {
                        if diff < 0 {
                            if current.get(&region) == Some(&aggregate) {
                                current.remove(&region);
                            }
                            changed.insert(region);
                        } else if current.get(&region) != Some(&aggregate) {
                            changed.insert(region.clone());
                            current.insert(region, aggregate);
                        }
                    }
                }
                let mut active = false;
                let mut session = output.session(&*cap);
                for (region, aggregate) in &current {
                    if aggregate.heartbeats > 0 {
                        active = true;
                    } else if !changed.contains(region) {
                        continue;
                    }
                    let [healthy, degraded, unhealthy, offline] = aggregate.counts;
                    session.give(RegionRollup {
                        region: region.clone(),
                        window_start: end.saturating_sub(window),
                        window_end: end,
                        nodes: healthy + degraded + unhealthy + offline,
                        healthy,
                        degraded,
                        unhealthy,
                        offline,
                        heartbeats: aggregate.heartbeats,
                        cpu_mean: aggregate.cpu_mean,
                        cpu_max: aggregate.cpu_max,
                        memory_mean: aggregate.memory_mean,
                        memory_max: aggregate.memory_max,
                    });
                }
                drop(session);
                // The next window end: the following one while a region has heartbeats (its
                // readings leave then), else the next one with updates.
                let following = if active { Some(end.saturating_add(window)) } else { pending.keys().next().copied() };
                match following {
                    Some(time) if time > end => cap.downgrade(&time),
                    _ => next = None,
                }
            }
            if saved.due_at(frontier).is_some() {
                save(&current);
            }
        }
    })
}

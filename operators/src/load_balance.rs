//! Load balancing of inference requests over edge nodes.
//!
//! The balancer keeps a view of the fleet: each node's health (from `node_health`'s status
//! changes) and its latest resources and location (from heartbeats). A request at event time
//! `t` is assigned once both fleet inputs are complete up to `t`, from the fleet as it was
//! at `t`, so the choice does not depend on arrival order or on how fast each input runs.
//! Only Healthy and Degraded nodes serve. A request with no eligible node leaves on the
//! `unplaced` output as a `rejected` result with the reason.
//!
//! Strategies:
//! - `round_robin`: eligible nodes in id order, in turn.
//! - `least_loaded`: the least `cpu% + memory% + 100 * queue_depth / capacity`, where the
//!   queue depth is the number of requests this worker assigned to the node within the last
//!   `load_window` of event time (each queued request per core weighs like a saturated
//!   resource).
//! - `weighted`: smooth weighted round robin (as in nginx) by the free-compute score
//!   `capacity * (1 - cpu%) * (1 - memory%)`: over time each node gets requests in
//!   proportion to its score, deterministically.
//! - `geo_nearest`: the eligible node at the least haversine distance from the request's
//!   location; without a location, the least loaded node of the request's region; without
//!   either (or no eligible node in the region), the least loaded node.
//! - `consistent_hash`: a hash ring with `virtual_nodes` points per eligible node; the
//!   request's key (`key`, else its id) goes to the first point at or after its hash. When
//!   one of N nodes leaves, only its keys (about 1/N) move.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

use crate::records::{
    HealthStatus, Heartbeat, InferenceRequest, InferenceResult, Location, ResultStatus, StatusChange,
};
use crate::state::{Entry, StateHandle};
use crate::{route_hash, DurationMs, EventTime};

/// How a node is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Eligible nodes in turn.
    RoundRobin,
    /// Lowest cpu + memory + queue depth per core.
    LeastLoaded,
    /// In proportion to free compute (smooth weighted round robin).
    Weighted,
    /// Nearest to the request's location, else within its region.
    GeoNearest,
    /// A hash ring over the request key.
    ConsistentHash,
}

impl Strategy {
    /// Whether the strategy needs heartbeats (resources or location).
    pub fn needs_heartbeats(self) -> bool {
        matches!(self, Strategy::LeastLoaded | Strategy::Weighted | Strategy::GeoNearest)
    }
}

/// YAML configuration of the `load_balance` operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadBalanceConfig {
    /// `round_robin`, `least_loaded`, `weighted`, `geo_nearest` or `consistent_hash`.
    pub strategy: Strategy,
    /// Points per node on the `consistent_hash` ring (default 128).
    #[serde(default = "defaults::virtual_nodes")]
    pub virtual_nodes: u32,
    /// Event-time span over which assignments count as a node's queue depth
    /// (`least_loaded`, `geo_nearest`; default 1s).
    #[serde(default = "defaults::load_window")]
    pub load_window: DurationMs,
}

mod defaults {
    use crate::DurationMs;
    pub fn virtual_nodes() -> u32 {
        128
    }
    pub fn load_window() -> DurationMs {
        DurationMs::from_secs(1)
    }
}

impl crate::params::Validate for LoadBalanceConfig {
    fn validate(&self, problems: &mut crate::params::ParamErrors) {
        if self.virtual_nodes == 0 {
            problems.at_value("virtual_nodes", "virtual_nodes must be at least 1");
        }
        if self.load_window.as_millis() == 0 {
            problems.at_value("load_window", "load_window must be longer than 0s");
        }
    }
}

impl LoadBalanceConfig {}

/// No node could take a request (the unplaced result's reason).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no Healthy or Degraded node to serve request `{request}` (fleet of {fleet} nodes)")]
pub struct NoNode {
    /// The request.
    pub request: String,
    /// Nodes the balancer knows.
    pub fleet: usize,
}

/// What the balancer knows of one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Latest health status.
    pub status: HealthStatus,
    /// Region.
    pub region: String,
    /// Location, from its latest heartbeat.
    pub location: Option<Location>,
    /// CPU percent, from its latest heartbeat.
    pub cpu: f64,
    /// Memory percent, from its latest heartbeat.
    pub memory: f64,
    /// Cores.
    pub capacity: f64,
}

impl NodeView {
    fn eligible(&self) -> bool {
        matches!(self.status, HealthStatus::Healthy | HealthStatus::Degraded)
    }

    fn free_compute(&self) -> f64 {
        (self.capacity * (1.0 - self.cpu / 100.0) * (1.0 - self.memory / 100.0)).max(0.0)
    }
}

/// The fleet as of some event time.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    nodes: BTreeMap<String, NodeView>,
    /// Changes whenever the set of eligible nodes may have changed; unique across all fleet
    /// views (copies included), so a cache keyed by it is never stale.
    generation: u64,
}

fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Fleet {
    /// Applies a status change.
    pub fn apply_change(&mut self, change: &StatusChange) {
        let node = self.nodes.entry(change.node_id.clone()).or_insert_with(|| NodeView {
            status: change.to,
            region: change.region.clone(),
            location: None,
            cpu: 0.0,
            memory: 0.0,
            capacity: 1.0,
        });
        node.status = change.to;
        node.region.clone_from(&change.region);
        self.generation = next_generation();
    }

    /// Applies a heartbeat's resources and location (its status comes from status changes;
    /// a node known only from heartbeats is not eligible).
    pub fn apply_heartbeat(&mut self, heartbeat: &Heartbeat) {
        let node = self.nodes.entry(heartbeat.node_id.clone()).or_insert_with(|| {
            self.generation = next_generation();
            NodeView {
                status: HealthStatus::Offline,
                region: heartbeat.region.clone(),
                location: None,
                cpu: 0.0,
                memory: 0.0,
                capacity: 1.0,
            }
        });
        node.location = Some(Location { lat: heartbeat.lat, lon: heartbeat.lon });
        node.cpu = heartbeat.cpu;
        node.memory = heartbeat.memory;
        node.capacity = heartbeat.capacity.max(f64::MIN_POSITIVE);
    }

    /// A node's view.
    pub fn node(&self, id: &str) -> Option<&NodeView> {
        self.nodes.get(id)
    }

    fn eligible(&self) -> impl Iterator<Item = (&String, &NodeView)> {
        self.nodes.iter().filter(|(_, node)| node.eligible())
    }
}

/// Great-circle distance in km.
pub fn haversine_km(a: Location, b: Location) -> f64 {
    let (lat1, lat2) = (a.lat.to_radians(), b.lat.to_radians());
    let (dlat, dlon) = ((b.lat - a.lat).to_radians(), (b.lon - a.lon).to_radians());
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}

/// Chooses nodes for requests; one per worker.
#[derive(Debug)]
pub struct Balancer {
    config: LoadBalanceConfig,
    round_robin: usize,
    /// Smooth weighted round robin: current weight per node.
    current: BTreeMap<String, f64>,
    /// Assignments within the load window: (time, node), oldest first, and counts.
    recent: VecDeque<(EventTime, String)>,
    depth: BTreeMap<String, u64>,
    /// The consistent-hash ring for the fleet generation it was built at.
    ring: Option<(u64, Vec<(u64, String)>)>,
}

impl Balancer {
    /// A balancer with `config`.
    pub fn new(config: &LoadBalanceConfig) -> Self {
        Self {
            config: config.clone(),
            round_robin: 0,
            current: BTreeMap::new(),
            recent: VecDeque::new(),
            depth: BTreeMap::new(),
            ring: None,
        }
    }

    /// What a checkpoint keeps of the balancer: its turn, weights and recent assignments.
    fn saved(&self) -> SavedBalancer {
        SavedBalancer {
            round_robin: self.round_robin,
            current: self.current.clone(),
            recent: self.recent.iter().cloned().collect(),
        }
    }

    /// Takes up where a saved balancer was.
    fn restore(&mut self, saved: SavedBalancer) {
        self.round_robin = saved.round_robin;
        self.current = saved.current;
        self.depth.clear();
        for (_, node) in &saved.recent {
            *self.depth.entry(node.clone()).or_default() += 1;
        }
        self.recent = saved.recent.into();
    }

    /// Requests assigned to `node` within the load window.
    pub fn queue_depth(&self, node: &str) -> u64 {
        self.depth.get(node).copied().unwrap_or(0)
    }

    /// Chooses the node for `request` at event time `time`, or says why there is none.
    pub fn choose(&mut self, fleet: &Fleet, request: &InferenceRequest, time: EventTime) -> Result<String, NoNode> {
        self.expire(time);
        let chosen = match self.config.strategy {
            Strategy::RoundRobin => self.round_robin(fleet),
            Strategy::LeastLoaded => self.least_loaded(fleet, |_| true),
            Strategy::Weighted => self.weighted(fleet),
            Strategy::GeoNearest => self.geo_nearest(fleet, request),
            Strategy::ConsistentHash => self.consistent_hash(fleet, request.routing_key()),
        };
        let node = chosen.ok_or_else(|| NoNode { request: request.id.clone(), fleet: fleet.nodes.len() })?;
        self.recent.push_back((time, node.clone()));
        *self.depth.entry(node.clone()).or_default() += 1;
        Ok(node)
    }

    fn expire(&mut self, time: EventTime) {
        let window = self.config.load_window.as_millis();
        while let Some((at, _)) = self.recent.front() {
            if at.saturating_add(window) > time {
                break;
            }
            if let Some((_, node)) = self.recent.pop_front() {
                if let Some(count) = self.depth.get_mut(&node) {
                    *count -= 1;
                    if *count == 0 {
                        self.depth.remove(&node);
                    }
                }
            }
        }
    }

    fn round_robin(&mut self, fleet: &Fleet) -> Option<String> {
        let eligible: Vec<&String> = fleet.eligible().map(|(id, _)| id).collect();
        if eligible.is_empty() {
            return None;
        }
        let node = eligible[self.round_robin % eligible.len()].clone();
        self.round_robin = self.round_robin.wrapping_add(1);
        Some(node)
    }

    fn load(&self, id: &str, node: &NodeView) -> f64 {
        node.cpu + node.memory + 100.0 * self.queue_depth(id) as f64 / node.capacity
    }

    fn least_loaded(&self, fleet: &Fleet, keep: impl Fn(&NodeView) -> bool) -> Option<String> {
        fleet
            .eligible()
            .filter(|(_, node)| keep(node))
            .min_by(|(a, x), (b, y)| self.load(a, x).total_cmp(&self.load(b, y)).then_with(|| a.cmp(b)))
            .map(|(id, _)| id.clone())
    }

    fn weighted(&mut self, fleet: &Fleet) -> Option<String> {
        let weights: Vec<(&String, f64)> = fleet.eligible().map(|(id, node)| (id, node.free_compute())).collect();
        if weights.is_empty() {
            return None;
        }
        // All saturated: fall back to equal weights rather than refuse.
        let all_zero = weights.iter().all(|(_, w)| *w <= 0.0);
        let total: f64 = if all_zero { weights.len() as f64 } else { weights.iter().map(|(_, w)| w).sum() };
        self.current.retain(|id, _| weights.iter().any(|(node, _)| *node == id));
        let mut best: Option<(&String, f64)> = None;
        for (id, weight) in &weights {
            let weight = if all_zero { 1.0 } else { *weight };
            let current = self.current.entry((*id).clone()).or_default();
            *current += weight;
            if best.is_none_or(|(_, value)| *current > value) {
                best = Some((id, *current));
            }
        }
        let (id, _) = best?;
        if let Some(current) = self.current.get_mut(id) {
            *current -= total;
        }
        Some(id.clone())
    }

    fn geo_nearest(&self, fleet: &Fleet, request: &InferenceRequest) -> Option<String> {
        if let Some(location) = request.location {
            let nearest = fleet
                .eligible()
                .filter_map(|(id, node)| node.location.map(|at| (id, haversine_km(location, at))))
                .min_by(|(a, x), (b, y)| x.total_cmp(y).then_with(|| a.cmp(b)));
            if let Some((id, _)) = nearest {
                return Some(id.clone());
            }
        }
        if let Some(region) = &request.region {
            if let Some(id) = self.least_loaded(fleet, |node| &node.region == region) {
                return Some(id);
            }
        }
        self.least_loaded(fleet, |_| true)
    }

    fn consistent_hash(&mut self, fleet: &Fleet, key: &str) -> Option<String> {
        if self.ring.as_ref().is_none_or(|(generation, _)| *generation != fleet.generation) {
            let mut ring: Vec<(u64, String)> = fleet
                .eligible()
                .flat_map(|(id, _)| {
                    (0..self.config.virtual_nodes).map(move |i| (route_hash(&format!("{id}#{i}")), id.clone()))
                })
                .collect();
            ring.sort();
            self.ring = Some((fleet.generation, ring));
        }
        let (_, ring) = self.ring.as_ref()?;
        if ring.is_empty() {
            return None;
        }
        let hash = route_hash(key);
        let at = ring.partition_point(|(point, _)| *point < hash);
        Some(ring[at % ring.len()].1.clone())
    }
}

/// An update of the fleet view, at its event time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FleetUpdate {
    /// A node's status changed.
    Change(StatusChange),
    /// A node's resources and location.
    Beat(Heartbeat),
}

/// A request on its way into the balancer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Incoming {
    /// A new request.
    New(InferenceRequest),
    /// A request whose node went Offline before serving it: `node` is the lost node.
    Reroute(InferenceRequest),
}

/// What the balancer decided.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Placement {
    /// The request, with `node` set.
    Assigned(InferenceRequest),
    /// No eligible node: the request ends here with a `rejected` result.
    Unplaced(InferenceResult),
}

/// A balancer's state in a checkpoint.
#[derive(Serialize, Deserialize)]
struct SavedBalancer {
    round_robin: usize,
    current: BTreeMap<String, f64>,
    recent: Vec<(EventTime, String)>,
}

/// What a checkpoint keeps of the load balancer.
#[derive(Serialize, Deserialize)]
enum SavedBalance {
    /// The fleet view, the same on every worker (saved by worker 0, restored on all).
    Fleet(BTreeMap<String, NodeView>),
    /// One worker's balancer (saved under the worker's index, restored on the worker of
    /// that index: each worker balances its own sources' requests).
    Balancer(SavedBalancer),
}

/// Stashed items per time, with a capability to emit at that time.
type Stash<D> = BTreeMap<EventTime, (Capability<EventTime>, Vec<D>)>;

/// The load-balance operator on `requests`, with the fleet view from `updates`. New
/// requests at time `t` are assigned once the fleet updates are complete up to `t`, from the
/// fleet as of `t`; re-routed requests at once, from the latest view, away from their lost
/// node. Each worker balances its own requests; every worker sees every fleet update.
///
/// In checkpoints (through `state`) it keeps the fleet view and each worker's balancer (turn,
/// weights, recent assignments), as of the checkpoint's time: new requests and fleet updates
/// at or after it wait until it is saved, and so do re-routed requests at or after it (the
/// inference operator that sends them keeps those in flight across the checkpoint). On
/// another number of workers, worker `i` takes up the balancer of the old worker `i`.
pub fn load_balance<'scope>(
    requests: StreamVec<'scope, EventTime, Incoming>,
    updates: StreamVec<'scope, EventTime, FleetUpdate>,
    config: &LoadBalanceConfig,
    name: &str,
    state: StateHandle,
) -> StreamVec<'scope, EventTime, Placement> {
    let mut balancer = Balancer::new(config);
    let updates = updates.broadcast();
    let scope = requests.scope();
    let (index, _) = state.worker();
    requests.binary_frontier(updates, Pipeline, Pipeline, &format!("LoadBalance({name})"), move |_, info| {
        state.activate_with(scope.activator_for(info.address));
        let mut fleet = Fleet::default();
        if let Some((_, entries)) = state.restored_all() {
            for entry in entries {
                match entry.value::<SavedBalance>() {
                    Ok(SavedBalance::Fleet(nodes)) => fleet.nodes = nodes,
                    Ok(SavedBalance::Balancer(saved)) if entry.route == index as u64 => balancer.restore(saved),
                    Ok(SavedBalance::Balancer(_)) => {}
                    Err(err) => tracing::error!(part = state.name(), %err, "saved balancer state is left out"),
                }
            }
            fleet.generation = next_generation();
        }
        let mut waiting: Stash<InferenceRequest> = BTreeMap::new();
        // Updates received but not yet applied (re-routed requests see them: the latest view).
        let mut pending: BTreeMap<EventTime, Vec<FleetUpdate>> = BTreeMap::new();
        // Re-routed requests at or after a checkpoint's time, until it is saved.
        let mut stashed: Vec<(Capability<EventTime>, InferenceRequest)> = Vec::new();
        move |(requests, request_frontier), (updates, update_frontier), output| {
            updates.for_each(|cap, data| {
                let time = cap.least().copied().unwrap_or_default();
                pending.entry(time).or_default().append(data);
            });
            let mut reroutes = Vec::new();
            requests.for_each(|cap, data| {
                let time = cap.least().copied().unwrap_or_default();
                for incoming in data.drain(..) {
                    match incoming {
                        Incoming::New(request) => waiting
                            .entry(time)
                            .or_insert_with(|| (cap.delayed(&time, output.output_index()), Vec::new()))
                            .1
                            .push(request),
                        Incoming::Reroute(request) => {
                            reroutes.push((cap.delayed(&time, output.output_index()), request))
                        }
                    }
                }
            });
            // A checkpoint is saved once both inputs have reached its time, before anything
            // at or after it applies.
            let ready = state.due().filter(|at| !request_frontier.less_than(at) && !update_frontier.less_than(at));
            let save = |balancer: &Balancer,
                        fleet: &mut Fleet,
                        pending: &mut BTreeMap<EventTime, Vec<FleetUpdate>>,
                        at: EventTime| {
                apply_until(fleet, pending, at.saturating_sub(1));
                let mut entries = vec![Entry::new(index as u64, &SavedBalance::Balancer(balancer.saved()))];
                if index == 0 {
                    entries.push(Entry::new(0, &SavedBalance::Fleet(fleet.nodes.clone())));
                }
                state.save(entries);
            };
            // New requests whose time the fleet updates have passed, in time order, each
            // after the updates at or before its time.
            while let Some(entry) = waiting.first_entry() {
                let time = *entry.key();
                if update_frontier.less_equal(&time) {
                    break;
                }
                if let Some(at) = ready.filter(|at| time >= *at && state.due().is_some()) {
                    save(&balancer, &mut fleet, &mut pending, at);
                }
                let (cap, batch) = entry.remove();
                apply_until(&mut fleet, &mut pending, time);
                let mut session = output.session(&cap);
                for mut request in batch {
                    match balancer.choose(&fleet, &request, time) {
                        Ok(node) => {
                            request.node = Some(node);
                            session.give(Placement::Assigned(request));
                        }
                        Err(reason) => {
                            let reason = reason.to_string();
                            let result = InferenceResult::refused(&request, ResultStatus::Rejected, reason, 0.0);
                            session.give(Placement::Unplaced(result));
                        }
                    }
                }
            }
            if let Some(at) = ready.filter(|_| state.due().is_some()) {
                save(&balancer, &mut fleet, &mut pending, at);
            }
            // Updates the frontier has passed are final: apply them.
            if let Some(low) = update_frontier.frontier().iter().min().copied() {
                apply_until(&mut fleet, &mut pending, low.saturating_sub(1));
            } else {
                apply_until(&mut fleet, &mut pending, EventTime::MAX);
            }
            match state.due() {
                Some(at) => {
                    let (later, now): (Vec<_>, Vec<_>) = reroutes.into_iter().partition(|(cap, _)| *cap.time() >= at);
                    stashed.extend(later);
                    reroutes = now;
                }
                None => reroutes.append(&mut stashed),
            }
            if !reroutes.is_empty() {
                reroute(&mut balancer, &fleet, &pending, reroutes, output);
            }
        }
    })
}

/// Places re-routed requests from the latest view (every update received so far), away from
/// the node each one lost.
fn reroute(
    balancer: &mut Balancer,
    fleet: &Fleet,
    pending: &BTreeMap<EventTime, Vec<FleetUpdate>>,
    reroutes: Vec<(Capability<EventTime>, InferenceRequest)>,
    output: &mut PlacementOutput<'_>,
) {
    let mut latest = fleet.clone();
    for update in pending.values().flatten() {
        latest.apply(update);
    }
    // The latest view without the lost node; re-routes come in runs of one node, so the view
    // is made once per run.
    let mut without: Option<(String, Fleet)> = None;
    for (cap, mut request) in reroutes {
        let lost = request.node.take().unwrap_or_default();
        if without.as_ref().is_none_or(|(node, _)| *node != lost) {
            let mut view = latest.clone();
            view.exclude(&lost);
            without = Some((lost.clone(), view));
        }
        let Some((_, view)) = without.as_ref() else { continue };
        let placed = match balancer.choose(view, &request, *cap.time()) {
            Ok(node) => {
                request.node = Some(node);
                Placement::Assigned(request)
            }
            Err(reason) => Placement::Unplaced(InferenceResult::refused(
                &request,
                ResultStatus::Rejected,
                format!("node `{lost}` went offline and {reason}"),
                0.0,
            )),
        };
        output.session(&cap).give(placed);
    }
}

/// Where the balancer sends its placements.
type PlacementOutput<'a> = timely::dataflow::operators::generic::OutputBuilderSession<
    'a,
    EventTime,
    timely::container::CapacityContainerBuilder<Vec<Placement>>,
>;

fn apply_until(fleet: &mut Fleet, pending: &mut BTreeMap<EventTime, Vec<FleetUpdate>>, time: EventTime) {
    while let Some(entry) = pending.first_entry() {
        if *entry.key() > time {
            break;
        }
        for update in entry.remove() {
            fleet.apply(&update);
        }
    }
}

impl Fleet {
    /// Applies one update.
    pub fn apply(&mut self, update: &FleetUpdate) {
        match update {
            FleetUpdate::Change(change) => self.apply_change(change),
            FleetUpdate::Beat(heartbeat) => self.apply_heartbeat(heartbeat),
        }
    }

    /// Marks `node` as not serving (a re-routed request must not go back to it).
    pub fn exclude(&mut self, node: &str) {
        if let Some(view) = self.nodes.get_mut(node) {
            view.status = HealthStatus::Offline;
            self.generation = next_generation();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap as Map;

    fn change(node: &str, region: &str, to: HealthStatus) -> StatusChange {
        StatusChange { time: 0, node_id: node.into(), region: region.into(), from: None, to }
    }

    fn beat(node: &str, region: &str, lat: f64, lon: f64, cpu: f64, memory: f64, capacity: f64) -> Heartbeat {
        Heartbeat {
            node_id: node.into(),
            region: region.into(),
            lat,
            lon,
            timestamp: 0,
            cpu,
            memory,
            disk: 10.0,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            capacity,
            labels: Map::new(),
        }
    }

    /// Four nodes: Paris (busy), Frankfurt (idle, big), Virginia (idle), Tokyo (offline).
    fn fleet() -> Fleet {
        let mut fleet = Fleet::default();
        for (id, region, lat, lon, cpu, memory, capacity, status) in [
            ("paris", "eu", 48.86, 2.35, 80.0, 70.0, 4.0, HealthStatus::Degraded),
            ("frankfurt", "eu", 50.11, 8.68, 10.0, 20.0, 8.0, HealthStatus::Healthy),
            ("virginia", "us", 39.04, -77.49, 20.0, 20.0, 2.0, HealthStatus::Healthy),
            ("tokyo", "ap", 35.68, 139.69, 5.0, 5.0, 16.0, HealthStatus::Offline),
        ] {
            fleet.apply_change(&change(id, region, status));
            fleet.apply_heartbeat(&beat(id, region, lat, lon, cpu, memory, capacity));
        }
        fleet
    }

    fn request(id: &str, location: Option<(f64, f64)>, region: Option<&str>) -> InferenceRequest {
        InferenceRequest {
            id: id.into(),
            model: "m".into(),
            version: None,
            timestamp: 0,
            inputs: Map::new(),
            deadline: None,
            priority: Default::default(),
            location: location.map(|(lat, lon)| Location { lat, lon }),
            region: region.map(str::to_owned),
            key: None,
            node: None,
        }
    }

    fn balancer(strategy: Strategy) -> Balancer {
        Balancer::new(&LoadBalanceConfig { strategy, virtual_nodes: 128, load_window: DurationMs::from_secs(1) })
    }

    fn choices(strategy: Strategy, n: usize) -> Vec<String> {
        let (fleet, mut balancer) = (fleet(), balancer(strategy));
        (0..n).map(|i| balancer.choose(&fleet, &request(&format!("r{i}"), None, None), 0).unwrap()).collect()
    }

    #[test]
    fn round_robin_takes_eligible_nodes_in_turn() {
        assert_eq!(choices(Strategy::RoundRobin, 4), ["frankfurt", "paris", "virginia", "frankfurt"]);
    }

    #[test]
    fn least_loaded_counts_resources_and_queued_requests_per_core() {
        // Loads: paris 150, frankfurt 30 (+12.5 per queued request), virginia 40 (+50).
        let picks = choices(Strategy::LeastLoaded, 4);
        assert_eq!(picks, ["frankfurt", "virginia", "frankfurt", "frankfurt"]);
        // The window ends: queued counts fall back to zero.
        let (fleet, mut balancer) = (fleet(), balancer(Strategy::LeastLoaded));
        for _ in 0..10 {
            balancer.choose(&fleet, &request("a", None, None), 0).unwrap();
        }
        assert_eq!(balancer.queue_depth("frankfurt") + balancer.queue_depth("virginia"), 10);
        assert_eq!(balancer.choose(&fleet, &request("b", None, None), 1_000).unwrap(), "frankfurt");
        assert_eq!(balancer.queue_depth("frankfurt"), 1);
    }

    #[test]
    fn weighted_follows_free_compute() {
        // Free compute: paris 4*.2*.3 = 0.24, frankfurt 8*.9*.8 = 5.76, virginia 2*.8*.8 = 1.28.
        let picks = choices(Strategy::Weighted, 728);
        let count = |node: &str| picks.iter().filter(|p| *p == node).count();
        assert_eq!((count("paris"), count("frankfurt"), count("virginia")), (24, 576, 128));
    }

    #[test]
    fn geo_nearest_by_distance_then_region() {
        let (fleet, mut balancer) = (fleet(), balancer(Strategy::GeoNearest));
        let mut pick = |location, region| balancer.choose(&fleet, &request("r", location, region), 0).unwrap();
        assert_eq!(pick(Some((48.0, 2.0)), None), "paris", "Paris is nearest to Paris, busy or not");
        assert_eq!(pick(Some((40.7, -74.0)), Some("eu")), "virginia", "location wins over region");
        assert_eq!(pick(Some((35.0, 139.0)), None), "frankfurt", "Tokyo is offline; Frankfurt is nearer than Virginia");
        assert_eq!(pick(None, Some("us")), "virginia");
        assert_eq!(pick(None, Some("eu")), "frankfurt", "least loaded of the region");
        assert_eq!(pick(None, Some("mars")), "frankfurt", "no node in the region: least loaded overall");
        assert!(
            (haversine_km(Location { lat: 48.86, lon: 2.35 }, Location { lat: 50.11, lon: 8.68 }) - 479.0).abs() < 5.0
        );
    }

    #[test]
    fn consistent_hash_moves_only_the_lost_nodes_keys() {
        let nodes = 50;
        let mut fleet = Fleet::default();
        for n in 0..nodes {
            fleet.apply_change(&change(&format!("node-{n}"), "eu", HealthStatus::Healthy));
        }
        let mut balancer = balancer(Strategy::ConsistentHash);
        let keys = 100_000;
        let before: Vec<String> =
            (0..keys).map(|k| balancer.choose(&fleet, &request(&format!("key-{k}"), None, None), 0).unwrap()).collect();
        // Stable while the fleet is.
        assert_eq!(balancer.choose(&fleet, &request("key-7", None, None), 0).unwrap(), before[7]);
        fleet.apply_change(&change("node-13", "eu", HealthStatus::Offline));
        let after: Vec<String> =
            (0..keys).map(|k| balancer.choose(&fleet, &request(&format!("key-{k}"), None, None), 0).unwrap()).collect();
        let moved: Vec<usize> = (0..keys).filter(|&k| before[k] != after[k]).collect();
        assert!(moved.iter().all(|&k| before[k] == "node-13"), "only the offline node's keys move");
        assert_eq!(moved.len(), before.iter().filter(|n| *n == "node-13").count(), "all of its keys move");
        let fraction = moved.len() as f64 / keys as f64;
        println!(
            "consistent_hash: one of {nodes} nodes offline moved {} of {keys} keys ({fraction:.4}; 1/N = {:.4})",
            moved.len(),
            1.0 / nodes as f64
        );
        assert!(
            (0.5 / nodes as f64..2.0 / nodes as f64).contains(&fraction),
            "moved {fraction} of keys, 1/N is {}",
            1.0 / nodes as f64
        );
    }

    #[test]
    fn no_eligible_node_is_an_error_with_the_reason() {
        let mut fleet = Fleet::default();
        fleet.apply_change(&change("a", "eu", HealthStatus::Unhealthy));
        fleet.apply_heartbeat(&beat("b", "eu", 0.0, 0.0, 1.0, 1.0, 1.0));
        for strategy in [
            Strategy::RoundRobin,
            Strategy::LeastLoaded,
            Strategy::Weighted,
            Strategy::GeoNearest,
            Strategy::ConsistentHash,
        ] {
            let err = balancer(strategy).choose(&fleet, &request("r1", None, None), 0).unwrap_err();
            assert_eq!(err.to_string(), "no Healthy or Degraded node to serve request `r1` (fleet of 2 nodes)");
        }
    }
}

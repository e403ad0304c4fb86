//! The `generator` source: a synthetic edge fleet.
//!
//! N nodes spread over regions with coordinates send a heartbeat every
//! `heartbeat_interval` plus jitter. Nodes fail (go silent) and recover, some run hot
//! (Degraded), a configurable fraction of heartbeats arrives late (behind the watermark) and
//! a fraction is malformed. Each node draws from its own random stream seeded by `seed` and
//! its index, so the same seed gives the same fleet on any number of workers and processes:
//! worker `w` of `n` simulates the nodes whose index is `w` modulo `n`.

use edgeflow_operators::params::Checked;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use edgeflow_operators::{DeadLetter, DurationMs, EventTime, Heartbeat, Record};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{wall_clock_ms, ConnectorError, Position, Source, SourceItem, SourceStatus};

mod requests;
pub use requests::{RequestGenerator, RequestGeneratorConfig};

/// How fast the generator's event time runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Speed {
    /// Event time is the wall clock: heartbeats are emitted when they are due.
    Realtime,
    /// As fast as possible: event time starts at `start_time` and runs ahead freely.
    Max,
}

/// A region of the simulated fleet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Region name.
    pub name: String,
    /// Latitude of the region's centre.
    pub lat: f64,
    /// Longitude of the region's centre.
    pub lon: f64,
}

/// YAML configuration of the `generator` source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Number of edge nodes (default 1000).
    #[serde(default = "defaults::nodes")]
    pub nodes: u32,
    /// Regions, nodes assigned round-robin (default: five regions on three continents).
    #[serde(default = "defaults::regions")]
    pub regions: Vec<RegionConfig>,
    /// Interval between a node's heartbeats (default 30s).
    #[serde(default = "defaults::heartbeat_interval")]
    pub heartbeat_interval: DurationMs,
    /// Each heartbeat's event time is its slot plus a uniform jitter in [0, jitter] (default 2s).
    #[serde(default = "defaults::jitter")]
    pub jitter: DurationMs,
    /// Heartbeats are emitted up to this long after their event time, so the stream is out
    /// of order within this bound (default 1s; must not exceed `max_out_of_orderness`).
    #[serde(default = "defaults::disorder")]
    pub disorder: DurationMs,
    /// Probability that a node fails at a given heartbeat (default 0.002).
    #[serde(default = "defaults::failure_rate")]
    pub failure_rate: f64,
    /// Mean length of a failure; lengths are exponentially distributed (default 4m).
    #[serde(default = "defaults::mean_outage")]
    pub mean_outage: DurationMs,
    /// Fraction of nodes that run hot and report Degraded readings (default 0.05).
    #[serde(default = "defaults::hot_fraction")]
    pub hot_fraction: f64,
    /// Fraction of heartbeats delivered `late_by` after their event time (default 0).
    #[serde(default)]
    pub late_fraction: f64,
    /// How late the late heartbeats are (default 2m).
    #[serde(default = "defaults::late_by")]
    pub late_by: DurationMs,
    /// Fraction of heartbeats that are malformed (default 0).
    #[serde(default)]
    pub malformed_fraction: f64,
    /// Random seed: the same seed gives the same stream (default 42).
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// `realtime` (default) or `max`.
    #[serde(default = "defaults::speed")]
    pub speed: Speed,
    /// Event time of the first heartbeat slot, ms since the epoch (default: now in
    /// `realtime`, 1700000000000 in `max`).
    #[serde(default)]
    pub start_time: Option<EventTime>,
    /// Length of the stream in event time; without it the generator runs until stopped.
    #[serde(default)]
    pub duration: Option<DurationMs>,
    /// The watermark is the generator's emission clock minus this (default 5s).
    #[serde(default = "crate::file::source_defaults::max_out_of_orderness")]
    pub max_out_of_orderness: DurationMs,
    /// After this long without a heartbeat due, the watermark follows the wall clock
    /// (realtime only; default 30s).
    #[serde(default = "crate::file::source_defaults::idle_timeout")]
    pub idle_timeout: DurationMs,
}

mod defaults {
    use super::{RegionConfig, Speed};
    use edgeflow_operators::DurationMs;

    pub fn nodes() -> u32 {
        1000
    }
    pub(super) fn regions() -> Vec<RegionConfig> {
        [
            ("eu-west", 48.86, 2.35),
            ("eu-central", 50.11, 8.68),
            ("us-east", 39.04, -77.49),
            ("us-west", 37.34, -121.89),
            ("ap-south", 19.08, 72.88),
        ]
        .into_iter()
        .map(|(name, lat, lon)| RegionConfig { name: name.into(), lat, lon })
        .collect()
    }
    pub fn heartbeat_interval() -> DurationMs {
        DurationMs::from_secs(30)
    }
    pub fn jitter() -> DurationMs {
        DurationMs::from_secs(2)
    }
    pub fn disorder() -> DurationMs {
        DurationMs::from_secs(1)
    }
    pub fn failure_rate() -> f64 {
        0.002
    }
    pub fn mean_outage() -> DurationMs {
        DurationMs::from_secs(240)
    }
    pub fn hot_fraction() -> f64 {
        0.05
    }
    pub fn late_by() -> DurationMs {
        DurationMs::from_secs(120)
    }
    pub fn seed() -> u64 {
        42
    }
    pub fn speed() -> Speed {
        Speed::Realtime
    }
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        serde_json::from_str("{}").unwrap_or_else(|_| unreachable!("every field has a default"))
    }
}

impl edgeflow_operators::params::Validate for GeneratorConfig {
    fn validate(&self, problems: &mut edgeflow_operators::params::ParamErrors) {
        if let Some(start) = self.start_time {
            if let Err(reason) = edgeflow_operators::time::check_event_time("start_time", start) {
                problems.at_value("start_time", reason.to_string());
            }
        }
        for (field, value) in [
            ("failure_rate", self.failure_rate),
            ("hot_fraction", self.hot_fraction),
            ("late_fraction", self.late_fraction),
            ("malformed_fraction", self.malformed_fraction),
        ] {
            if !(0.0..=1.0).contains(&value) {
                problems.at_value(field, format!("`{field}` is {value}; it must be a fraction in [0, 1]"));
            }
        }
        if self.nodes == 0 {
            problems.at_value("nodes", "`nodes` must be at least 1");
        }
        if self.regions.is_empty() {
            problems.at_value("regions", "`regions` is empty; list at least one region");
        }
        if self.heartbeat_interval.as_millis() == 0 {
            problems.at_value("heartbeat_interval", "`heartbeat_interval` must be longer than 0ms");
        }
        if self.disorder > self.max_out_of_orderness {
            problems.at_value(
                "disorder",
                format!(
                    "`disorder` ({}) exceeds `max_out_of_orderness` ({}), so on-time heartbeats would count as late",
                    self.disorder, self.max_out_of_orderness
                ),
            );
        }
        if self.late_fraction > 0.0 && self.late_by <= self.max_out_of_orderness {
            problems.at_value(
                "late_by",
                format!(
                    "`late_by` ({}) must exceed `max_out_of_orderness` ({}) for late heartbeats to be late",
                    self.late_by, self.max_out_of_orderness
                ),
            );
        }
    }
}

impl GeneratorConfig {}

/// One simulated node.
#[derive(Debug)]
struct SimNode {
    index: u32,
    id: String,
    region: String,
    lat: f64,
    lon: f64,
    capacity: f64,
    labels: BTreeMap<String, String>,
    rng: ChaCha8Rng,
    next_slot: EventTime,
    seq: u64,
    cpu: f64,
    memory: f64,
    disk: f64,
    hot: bool,
    down_until: EventTime,
}

/// A heartbeat generated but not yet emitted, ordered by emission time. The payload waits
/// in a slab so that the heap moves only these few words around.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pending {
    emit_at: EventTime,
    node: u32,
    seq: u64,
    slot: usize,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Payload {
    Beat(Heartbeat),
    Malformed(Vec<u8>),
}

/// The running generator of one worker.
#[derive(Debug)]
pub struct Generator {
    name: String,
    config: GeneratorConfig,
    nodes: Vec<SimNode>,
    /// Nodes by next heartbeat slot.
    slots: BinaryHeap<Reverse<(EventTime, usize)>>,
    pending: BinaryHeap<Reverse<Pending>>,
    payloads: Vec<Option<Payload>>,
    free: Vec<usize>,
    end: EventTime,
    /// Wall clock minus event time, for realtime pacing.
    realtime: bool,
    /// Items produced so far, and this generator's share of the fleet (its position).
    produced: u64,
    index: u64,
    peers: u64,
}

impl Generator {
    /// The generator for worker `index` of `peers`.
    pub fn new(
        name: &str,
        config: &Checked<GeneratorConfig>,
        index: usize,
        peers: usize,
    ) -> Result<Self, ConnectorError> {
        let realtime = config.speed == Speed::Realtime;
        let (share, generators) = (index as u64, peers.max(1) as u64);
        let start = config.start_time.unwrap_or(if realtime { wall_clock_ms() } else { 1_700_000_000_000 });
        let end = config.duration.map_or(EventTime::MAX, |d| start.saturating_add(d.as_millis()));
        let interval = config.heartbeat_interval.as_millis();
        let mut nodes = Vec::new();
        let mut slots = BinaryHeap::new();
        for index in (index as u32..config.nodes).step_by(peers.max(1)) {
            let mut rng =
                ChaCha8Rng::seed_from_u64(config.seed ^ (u64::from(index) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let region = &config.regions[index as usize % config.regions.len()];
            let hot = rng.gen_bool(config.hot_fraction);
            let tier = if index % 10 == 0 { "gpu" } else { "cpu" };
            let node = SimNode {
                index,
                id: format!("edge-{index:05}"),
                region: region.name.clone(),
                lat: (region.lat + rng.gen_range(-2.0..2.0)).clamp(-90.0, 90.0),
                lon: (region.lon + rng.gen_range(-2.0..2.0)).clamp(-180.0, 180.0),
                capacity: f64::from(1u32 << rng.gen_range(1..5)),
                labels: BTreeMap::from([("tier".to_owned(), tier.to_owned())]),
                next_slot: start.saturating_add(rng.gen_range(0..interval)),
                seq: 0,
                cpu: if hot { 93.0 } else { rng.gen_range(10.0..60.0) },
                memory: rng.gen_range(20.0..70.0),
                disk: rng.gen_range(10.0..80.0),
                hot,
                down_until: 0,
                rng,
            };
            slots.push(Reverse((node.next_slot, nodes.len())));
            nodes.push(node);
        }
        Ok(Self {
            name: name.to_owned(),
            config: config.get().clone(),
            nodes,
            slots,
            pending: BinaryHeap::new(),
            payloads: Vec::new(),
            free: Vec::new(),
            end,
            realtime,
            produced: 0,
            index: share,
            peers: generators,
        })
    }

    /// Simulates the next heartbeat slot of the node due first.
    fn advance_one_slot(&mut self) {
        let Some(Reverse((slot, position))) = self.slots.pop() else { return };
        let config = &self.config;
        let node = &mut self.nodes[position];
        let interval = config.heartbeat_interval.as_millis();
        node.next_slot = slot.saturating_add(interval);
        if node.next_slot < self.end {
            self.slots.push(Reverse((node.next_slot, position)));
        }
        let rng = &mut node.rng;
        if slot < node.down_until {
            return;
        }
        if rng.gen_bool(config.failure_rate) {
            let mean = config.mean_outage.as_millis() as f64;
            let outage = (-mean * (1.0 - rng.gen::<f64>()).ln()) as u64;
            node.down_until = slot.saturating_add(outage.max(interval));
            return;
        }
        let target = if node.hot { 93.0 } else { 35.0 };
        node.cpu = (node.cpu + (target - node.cpu) * 0.1 + rng.gen_range(-5.0..5.0)).clamp(0.0, 100.0);
        node.memory = (node.memory + rng.gen_range(-2.0..2.0)).clamp(0.0, 100.0);
        node.disk = (node.disk + rng.gen_range(-0.1..0.15)).clamp(0.0, 100.0);
        let time = slot.saturating_add(rng.gen_range(0..=config.jitter.as_millis()));
        let emit_at = if rng.gen_bool(config.late_fraction) {
            time.saturating_add(config.late_by.as_millis())
        } else {
            time.saturating_add(rng.gen_range(0..=config.disorder.as_millis()))
        };
        let malformed = rng.gen_bool(config.malformed_fraction);
        node.seq += 1;
        let heartbeat = Heartbeat {
            node_id: node.id.clone(),
            region: node.region.clone(),
            lat: node.lat,
            lon: node.lon,
            timestamp: time,
            cpu: round2(node.cpu),
            memory: round2(node.memory),
            disk: round2(node.disk),
            net_rx_bytes: rng.gen_range(10_000..5_000_000),
            net_tx_bytes: rng.gen_range(10_000..2_000_000),
            capacity: node.capacity,
            labels: node.labels.clone(),
        };
        let payload =
            if malformed { Payload::Malformed(corrupt(&heartbeat, node.seq)) } else { Payload::Beat(heartbeat) };
        let (index, seq) = (node.index, node.seq);
        let slot = match self.free.pop() {
            Some(slot) => {
                self.payloads[slot] = Some(payload);
                slot
            }
            None => {
                self.payloads.push(Some(payload));
                self.payloads.len() - 1
            }
        };
        self.pending.push(Reverse(Pending { emit_at, node: index, seq, slot }));
    }

    /// The earliest time anything not yet generated could be emitted.
    fn generation_horizon(&self) -> EventTime {
        self.slots.peek().map_or(EventTime::MAX, |Reverse((slot, _))| *slot)
    }

    /// Ms until the next heartbeat is due by the wall clock (realtime), if any.
    pub fn next_due_in(&self, now: EventTime) -> Option<u64> {
        let next =
            self.pending.peek().map(|Reverse(p)| p.emit_at).unwrap_or(EventTime::MAX).min(self.generation_horizon());
        (next != EventTime::MAX).then(|| next.saturating_sub(now))
    }
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// Bytes of a broken heartbeat: one of a few realistic ways agents get JSON wrong.
fn corrupt(heartbeat: &Heartbeat, seq: u64) -> Vec<u8> {
    let json = serde_json::to_string(heartbeat).unwrap_or_default();
    match seq % 3 {
        0 => json.as_bytes()[..json.len() / 2].to_vec(),
        1 => json.replacen(&format!("\"cpu\":{}", heartbeat.cpu), "\"cpu\":\"n/a\"", 1).into_bytes(),
        _ => json.replacen(&format!("\"node_id\":\"{}\",", heartbeat.node_id), "", 1).into_bytes(),
    }
}

impl Source for Generator {
    /// A generator at full speed is a function of its seed: its position is how many items
    /// it produced. A realtime one simulates the fleet live and has none.
    fn position(&mut self) -> Option<Position> {
        (!self.realtime).then_some(Position::Generated { items: self.produced, index: self.index, peers: self.peers })
    }

    /// Produces again, and drops, the items produced before the checkpoint. A realtime
    /// generator goes on from the wall clock.
    fn resume(&mut self, saved: &[Position]) -> Result<(), ConnectorError> {
        if self.realtime {
            return Ok(());
        }
        let (index, peers) = (self.index, self.peers);
        let items = saved.iter().find_map(|position| match position {
            Position::Generated { items, index: i, peers: p } if (*i, *p) == (index, peers) => Some(*items),
            _ => None,
        });
        let Some(items) = items else {
            let then = saved.iter().find_map(|position| match position {
                Position::Generated { peers, .. } => Some(*peers),
                _ => None,
            });
            return Err(ConnectorError::Config {
                connector: "generator",
                reason: format!(
                    "source `{}` cannot resume: the checkpoint was taken with {} generators, this run has {peers}\nhint: a generator's fleet is split by worker; resume on the same number of workers",
                    self.name,
                    then.map_or_else(|| "no".to_owned(), |p| p.to_string()),
                ),
            });
        };
        let mut scratch = Vec::with_capacity(1024);
        while self.produced < items {
            scratch.clear();
            let max = (items - self.produced).min(1024) as usize;
            if self.poll(&mut scratch, max)? == SourceStatus::Exhausted {
                break;
            }
        }
        tracing::info!(source = %self.name, items, "resumed: skipped the items produced before the checkpoint");
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<SourceItem>, max: usize) -> Result<SourceStatus, ConnectorError> {
        let now = if self.realtime { wall_clock_ms() } else { EventTime::MAX };
        let mut produced = 0;
        while produced < max {
            let next_emit = self.pending.peek().map(|Reverse(p)| p.emit_at);
            let horizon = self.generation_horizon();
            match next_emit {
                // Nothing generated later can be emitted before this one.
                Some(emit_at) if emit_at <= horizon => {
                    if emit_at > now {
                        return Ok(SourceStatus::Idle { retry_in_ms: (emit_at - now).min(1000) });
                    }
                    let Some(Reverse(pending)) = self.pending.pop() else { break };
                    let Some(payload) = self.payloads[pending.slot].take() else { continue };
                    self.free.push(pending.slot);
                    produced += 1;
                    self.produced += 1;
                    out.push(match payload {
                        Payload::Beat(heartbeat) => {
                            SourceItem::Record { record: Record::Heartbeat(heartbeat), clock: pending.emit_at }
                        }
                        Payload::Malformed(bytes) => SourceItem::Malformed {
                            letter: DeadLetter {
                                source: self.name.clone(),
                                position: format!("node {} seq {}", pending.node, pending.seq),
                                reason: edgeflow_operators::Heartbeat::from_json(&bytes)
                                    .err()
                                    .map_or_else(|| "malformed heartbeat".into(), |err| err.to_string()),
                                payload: bytes,
                            },
                            clock: Some(pending.emit_at),
                        },
                    });
                }
                _ if horizon == EventTime::MAX => return Ok(SourceStatus::Exhausted),
                _ => {
                    if horizon > now {
                        return Ok(SourceStatus::Idle { retry_in_ms: (horizon - now).min(1000) });
                    }
                    self.advance_one_slot();
                }
            }
        }
        Ok(SourceStatus::Ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GeneratorConfig {
        GeneratorConfig {
            nodes: 40,
            speed: Speed::Max,
            duration: Some(DurationMs::from_secs(1800)),
            failure_rate: 0.02,
            late_fraction: 0.01,
            malformed_fraction: 0.01,
            ..GeneratorConfig::default()
        }
    }

    fn run(config: &GeneratorConfig, index: usize, peers: usize) -> Vec<SourceItem> {
        let mut generator = Generator::new("gen", &Checked::try_new(config.clone()).unwrap(), index, peers).unwrap();
        let mut out = Vec::new();
        while generator.poll(&mut out, 100).unwrap() == SourceStatus::Ready {}
        out
    }

    #[test]
    fn same_seed_same_stream_on_any_split() {
        let config = config();
        let mut whole: Vec<String> = run(&config, 0, 1).iter().map(|i| format!("{i:?}")).collect();
        let mut split: Vec<String> = (0..3).flat_map(|w| run(&config, w, 3)).map(|i| format!("{i:?}")).collect();
        whole.sort();
        split.sort();
        assert_eq!(whole, split);
        assert!(whole.len() > 40 * 50, "{}", whole.len());
    }

    #[test]
    fn emission_clock_is_monotone_and_late_ones_are_late() {
        let config = config();
        let items = run(&config, 0, 1);
        let mut clock = 0;
        let (mut late, mut malformed) = (0, 0);
        for item in &items {
            match item {
                SourceItem::Record { record, clock: c } => {
                    assert!(*c >= clock);
                    clock = *c;
                    if record.event_time() + config.max_out_of_orderness.as_millis() < *c {
                        late += 1;
                    }
                }
                SourceItem::Malformed { letter, .. } => {
                    malformed += 1;
                    assert!(letter.reason.starts_with("invalid heartbeat"), "{}", letter.reason);
                }
                SourceItem::Future { letter, .. } => panic!("the generator runs on the wall clock: {letter:?}"),
            }
        }
        assert!(late > 5 && malformed > 5, "late {late} malformed {malformed}");
    }

    #[test]
    fn bad_parameters_are_reported() {
        let bad = GeneratorConfig { failure_rate: 1.5, disorder: DurationMs::from_secs(60), ..config() };
        let errors = Checked::try_new(bad).expect_err("refused");
        let fields: Vec<_> = errors.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, vec!["failure_rate", "disorder"]);
    }
}

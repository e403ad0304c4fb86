//! Baselines and inputs shared by edgeflow's benchmarks.
//!
//! The COST baseline (Frank McSherry's "Configuration that Outperforms a Single Thread") is
//! the node-health computation written as one single-threaded loop with event-time timers:
//! what a careful engineer would write by hand instead of using a dataflow engine.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use edgeflow_connectors::generator::{Generator, GeneratorConfig, Speed};
use edgeflow_connectors::{Source, SourceItem, SourceStatus};
use edgeflow_operators::node_health::{NodeHealthConfig, NodeHealthParams};
use edgeflow_operators::{DurationMs, EventTime, HealthStatus, Heartbeat, Record};

/// The generator settings every benchmark uses for `nodes` nodes over `minutes`.
pub fn fleet_config(nodes: u32, minutes: u64) -> GeneratorConfig {
    GeneratorConfig {
        nodes,
        speed: Speed::Max,
        duration: Some(DurationMs(minutes * 60_000)),
        failure_rate: 0.005,
        seed: 7,
        ..GeneratorConfig::default()
    }
}

/// The heartbeats of `config`, in emission order (as the source yields them).
pub fn fleet_heartbeats(config: &GeneratorConfig) -> Vec<Heartbeat> {
    let config = edgeflow_operators::params::Checked::try_new(config.clone()).expect("valid generator settings");
    let mut generator = Generator::new("bench", &config, 0, 1).expect("generator opens");
    let mut items = Vec::new();
    while generator.poll(&mut items, 4096).expect("generator never fails") == SourceStatus::Ready {}
    items
        .into_iter()
        .filter_map(|item| match item {
            SourceItem::Record { record: Record::Heartbeat(heartbeat), .. } => Some(heartbeat),
            SourceItem::Record { .. } => None,
            SourceItem::Malformed { .. } | SourceItem::Future { .. } => None,
        })
        .collect()
}

/// What the baseline computed, to check it did the same work as the dataflow.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BaselineOutput {
    /// Status changes (including first sightings).
    pub changes: u64,
    /// Region rollup rows.
    pub rollups: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Soft,
    Hard,
}

/// Node health by hand: heartbeats in event-time order, per-node state, a timer heap for
/// the `unhealthy_after` and `heartbeat_timeout` deadlines, and per-region rollups at each
/// window end.
pub fn cost_baseline(heartbeats: &[Heartbeat], config: &NodeHealthConfig) -> BaselineOutput {
    let params = NodeHealthParams::try_new(config).expect("valid node health settings");
    let (soft, hard, window) =
        (config.unhealthy_after.as_millis(), config.heartbeat_timeout.as_millis(), params.rollup_window_ms());
    let mut order: Vec<&Heartbeat> = heartbeats.iter().collect();
    order.sort_by_key(|hb| hb.timestamp);

    struct Node {
        region: usize,
        latest: EventTime,
        status: HealthStatus,
    }
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut regions: HashMap<&str, usize> = HashMap::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut timers: BinaryHeap<Reverse<(EventTime, usize, EventTime, Timer)>> = BinaryHeap::new();
    let mut out = BaselineOutput::default();
    let mut next_window: Option<EventTime> = None;

    // Per region: heartbeats, cpu sum and max, memory sum and max in the current window.
    let mut readings: Vec<(u64, f64, f64, f64, f64)> = Vec::new();
    let rollup = |nodes: &[Node], readings: &mut Vec<(u64, f64, f64, f64, f64)>, out: &mut BaselineOutput| {
        let mut counts = vec![[0u64; 4]; readings.len()];
        for node in nodes {
            counts[node.region][node.status.index()] += 1;
        }
        out.rollups += counts.iter().filter(|c| c.iter().sum::<u64>() > 0).count() as u64;
        std::hint::black_box((&counts, &readings));
        readings.iter_mut().for_each(|r| *r = (0, 0.0, 0.0, 0.0, 0.0));
    };

    let fire_until = |until: EventTime, nodes: &mut Vec<Node>, timers: &mut BinaryHeap<_>, out: &mut BaselineOutput| {
        while let Some(Reverse((at, node, beat, kind))) = timers.peek().copied() {
            if at >= until {
                break;
            }
            timers.pop();
            let state: &mut Node = &mut nodes[node];
            if state.latest != beat {
                continue; // a newer heartbeat replaced this deadline
            }
            let status = if kind == Timer::Soft { HealthStatus::Unhealthy } else { HealthStatus::Offline };
            if state.status != status {
                state.status = status;
                out.changes += 1;
            }
        }
    };

    for hb in order {
        // Close the rollup windows that end before this heartbeat.
        let end = hb.timestamp.div_ceil(window) * window;
        match next_window {
            None => next_window = Some(end),
            Some(mut w) => {
                while w < end {
                    fire_until(w + 1, &mut nodes, &mut timers, &mut out);
                    rollup(&nodes, &mut readings, &mut out);
                    w += window;
                }
                next_window = Some(w);
            }
        }
        fire_until(hb.timestamp, &mut nodes, &mut timers, &mut out);
        let region_count = regions.len();
        let region = *regions.entry(hb.region.as_str()).or_insert(region_count);
        if region == readings.len() {
            readings.push((0, 0.0, 0.0, 0.0, 0.0));
        }
        let reading = &mut readings[region];
        reading.0 += 1;
        reading.1 += hb.cpu;
        reading.2 = reading.2.max(hb.cpu);
        reading.3 += hb.memory;
        reading.4 = reading.4.max(hb.memory);
        let node_count = nodes.len();
        let index = *ids.entry(hb.node_id.as_str()).or_insert(node_count);
        if index == nodes.len() {
            nodes.push(Node { region, latest: 0, status: HealthStatus::Offline });
            out.changes += 1; // first sighting
            nodes[index].status = params.classify(true, hb.cpu, hb.memory, hb.disk);
        } else {
            let status = params.classify(true, hb.cpu, hb.memory, hb.disk);
            if nodes[index].status != status {
                out.changes += 1;
                nodes[index].status = status;
            }
        }
        let node = &mut nodes[index];
        node.latest = hb.timestamp;
        timers.push(Reverse((hb.timestamp + soft, index, hb.timestamp, Timer::Soft)));
        timers.push(Reverse((hb.timestamp + hard, index, hb.timestamp, Timer::Hard)));
    }
    fire_until(EventTime::MAX, &mut nodes, &mut timers, &mut out);
    rollup(&nodes, &mut readings, &mut out);
    out
}

/// Produces `heartbeats` as JSON to `topic` on the Kafka broker at `address`, keyed by node
/// id, waiting when the producer's queue is full, and returns once all are delivered.
pub fn produce_heartbeats(address: &str, topic: &str, heartbeats: &[Heartbeat]) {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    use std::time::Duration;
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", address)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    for heartbeat in heartbeats {
        let payload = serde_json::to_vec(heartbeat).expect("json");
        while producer.send(BaseRecord::to(topic).key(&heartbeat.node_id).payload(&payload)).is_err() {
            producer.poll(Duration::from_millis(5));
        }
    }
    producer.flush(Duration::from_secs(300)).expect("input produced");
}

/// The median of `values` (the upper one of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs `yaml` (a pipeline, named `name` in errors) on `workers` workers to its end; returns
/// the seconds from its first record (seen by a watcher thread) to the end, and its metrics.
pub fn run_timed(yaml: &str, name: &str, workers: usize) -> (f64, std::sync::Arc<edgeflow_engine::metrics::Metrics>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let pipeline =
        edgeflow_engine::config::load_str(yaml, name, &|_| None).unwrap_or_else(|problems| panic!("{problems}"));
    let metrics = Arc::new(edgeflow_engine::metrics::Metrics::new());
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (metrics, done) = (metrics.clone(), done.clone());
        std::thread::spawn(move || {
            while metrics.records_total.get() == 0 && !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(200));
            }
            Instant::now()
        })
    };
    let options = edgeflow_engine::runtime::RunOptions { workers, ..Default::default() };
    edgeflow_engine::runtime::run(&pipeline, &options, metrics.clone()).expect("pipeline runs");
    let end = Instant::now();
    done.store(true, Ordering::Relaxed);
    let first = watcher.join().expect("watcher");
    (end.duration_since(first).as_secs_f64(), metrics)
}

//! Reference comparison for `node_health`: random heartbeat streams, and at every time the
//! incremental output equals a from-scratch recomputation; 1 and 4 workers agree.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::heartbeat;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::InputSession;
use edgeflow_operators::node_health::{status_differential, NodeHealth, NodeHealthConfig, NodeHealthParams};
use edgeflow_operators::records::{HealthStatus, Heartbeat, NodeState, RegionRollup, StatusChange};
use edgeflow_operators::DurationMs;
use proptest::prelude::*;
use timely::dataflow::operators::Inspect;

#[derive(Default, Debug, Clone, PartialEq)]
struct Outputs {
    status: Vec<((u64, NodeState), u64, isize)>,
    /// The status of the purely differential formulation, consolidated.
    differential: Vec<((u64, NodeState), u64, isize)>,
    changes: Vec<StatusChange>,
    rollups: Vec<RegionRollup>,
}

fn params() -> NodeHealthParams {
    NodeHealthParams::try_new(&NodeHealthConfig {
        heartbeat_timeout: DurationMs(90),
        unhealthy_after: DurationMs(45),
        rollup_window: DurationMs(20),
        ..NodeHealthConfig::default()
    })
    .expect("valid parameters")
}

/// Runs node_health over `beats` (fed in time order, as a source with a watermark would).
fn run(beats: &[Heartbeat], workers: usize) -> Outputs {
    let outputs = Arc::new(Mutex::new(Outputs::default()));
    let sink = outputs.clone();
    let beats = beats.to_vec();
    timely::execute(timely::Config::process(workers), move |worker| {
        let sink = sink.clone();
        let params = params();
        let mut input = InputSession::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let heartbeats = input.to_collection(scope);
            let d = sink.clone();
            status_differential(heartbeats.clone(), &params)
                .inner
                .inspect(move |update| d.lock().unwrap().differential.push(update.clone()));
            let streams = heartbeats.node_health(&params);
            let (a, b, c) = (sink.clone(), sink.clone(), sink.clone());
            streams.status.inner.inspect(move |update| a.lock().unwrap().status.push(update.clone()));
            streams.changes.inspect(move |change| b.lock().unwrap().changes.push(change.clone()));
            streams.rollups.inspect(move |rollup| c.lock().unwrap().rollups.push(rollup.clone()));
        });
        if worker.index() == 0 {
            let mut sorted = beats.clone();
            sorted.sort_by_key(|hb| hb.timestamp);
            for hb in sorted {
                input.advance_to(hb.timestamp);
                let time = hb.timestamp;
                input.update_at(hb, time, 1);
                worker.step();
            }
        }
        input.close();
    })
    .expect("timely runs");
    let mut outputs = Arc::try_unwrap(outputs).expect("workers finished").into_inner().unwrap();
    outputs.status.sort();
    outputs.differential = consolidate(std::mem::take(&mut outputs.differential));
    outputs.changes.sort();
    outputs.rollups.sort();
    outputs
}

fn consolidate(updates: Vec<((u64, NodeState), u64, isize)>) -> Vec<((u64, NodeState), u64, isize)> {
    let mut sums: BTreeMap<((u64, NodeState), u64), isize> = BTreeMap::new();
    for (data, time, diff) in updates {
        *sums.entry((data, time)).or_default() += diff;
    }
    let mut out: Vec<_> =
        sums.into_iter().filter(|(_, d)| *d != 0).map(|((data, time), diff)| (data, time, diff)).collect();
    out.sort();
    out
}

/// Accumulates status updates up to and including `time`.
fn status_at(updates: &[((u64, NodeState), u64, isize)], time: u64) -> BTreeMap<String, HealthStatus> {
    let mut counts: BTreeMap<(u64, NodeState), isize> = BTreeMap::new();
    for (data, t, diff) in updates {
        if *t <= time {
            *counts.entry(data.clone()).or_default() += diff;
        }
    }
    let mut result = BTreeMap::new();
    for ((_, state), count) in counts {
        let node = state.node_id.clone();
        assert!(count == 0 || count == 1, "node {node} has count {count} at {time}");
        if count == 1 {
            assert!(result.insert(node.clone(), state.status).is_none(), "two states for {node} at {time}");
        }
    }
    result
}

fn reference_at(beats: &[Heartbeat], time: u64) -> BTreeMap<String, HealthStatus> {
    let params = params();
    let mut per_node: BTreeMap<String, Vec<(u64, f64, f64, f64)>> = BTreeMap::new();
    for hb in beats.iter().filter(|hb| hb.timestamp <= time) {
        per_node.entry(hb.node_id.clone()).or_default().push((hb.timestamp, hb.cpu, hb.memory, hb.disk));
    }
    per_node.into_iter().map(|(node, beats)| (node, params.status_at(time, &beats))).collect()
}

fn beats_strategy() -> impl Strategy<Value = Vec<Heartbeat>> {
    prop::collection::vec((0usize..5, 0u64..400, prop_oneof![Just(10.0), Just(95.0)]), 1..40)
        .prop_map(|raw| raw.into_iter().map(|(node, time, cpu)| heartbeat(node, time, cpu)).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn status_matches_recomputation_at_every_time(beats in beats_strategy()) {
        let outputs = run(&beats, 1);
        prop_assert_eq!(consolidate(outputs.status.clone()), outputs.differential.clone(), "timers and differential formulations agree");
        let mut times: BTreeSet<u64> = BTreeSet::new();
        for hb in &beats {
            for offset in [0, 44, 45, 46, 89, 90, 91] {
                times.insert(hb.timestamp + offset);
            }
        }
        for time in times {
            prop_assert_eq!(status_at(&outputs.status, time), reference_at(&beats, time), "at time {}", time);
        }
        // Every change is a real transition of the reference.
        for change in &outputs.changes {
            let now = reference_at(&beats, change.time)[&change.node_id];
            prop_assert_eq!(now, change.to, "change {:?}", change);
            if let Some(before) = change.from {
                prop_assert_eq!(reference_at(&beats, change.time - 1)[&change.node_id], before);
            }
        }
        // Rollup counts equal the reference at each window end.
        for rollup in &outputs.rollups {
            let statuses = reference_at(&beats, rollup.window_end);
            let in_region: Vec<_> = statuses.iter()
                .filter(|(node, _)| {
                    let index: usize = node[1..].parse().unwrap();
                    format!("r{}", index % 3) == rollup.region
                })
                .map(|(_, status)| *status)
                .collect();
            let count = |s| in_region.iter().filter(|x| **x == s).count() as u64;
            prop_assert_eq!(rollup.nodes, in_region.len() as u64);
            prop_assert_eq!(rollup.healthy, count(HealthStatus::Healthy));
            prop_assert_eq!(rollup.degraded, count(HealthStatus::Degraded));
            prop_assert_eq!(rollup.unhealthy, count(HealthStatus::Unhealthy));
            prop_assert_eq!(rollup.offline, count(HealthStatus::Offline));
        }
    }

    #[test]
    fn one_and_four_workers_agree(beats in beats_strategy()) {
        prop_assert_eq!(run(&beats, 1), run(&beats, 4));
    }
}

#[test]
fn node_that_returns_is_healthy_again() {
    let beats = vec![heartbeat(0, 0, 10.0), heartbeat(0, 30, 10.0), heartbeat(0, 500, 10.0)];
    let outputs = run(&beats, 2);
    let transitions: Vec<_> = outputs.changes.iter().map(|c| (c.time, c.from, c.to)).collect();
    assert_eq!(
        transitions,
        vec![
            (0, None, HealthStatus::Healthy),
            (75, Some(HealthStatus::Healthy), HealthStatus::Unhealthy),
            (120, Some(HealthStatus::Unhealthy), HealthStatus::Offline),
            (500, Some(HealthStatus::Offline), HealthStatus::Healthy),
            (545, Some(HealthStatus::Healthy), HealthStatus::Unhealthy),
            (590, Some(HealthStatus::Unhealthy), HealthStatus::Offline),
        ]
    );
}

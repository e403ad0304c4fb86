//! Checkpoint and restore of `node_health`: a run checkpointed at time `T`, stopped, and
//! restored from the checkpoint (on the same or another number of workers) with the inputs
//! at or after `T` reports exactly the status changes and rollups of a run that never
//! stopped, whatever `T` is and whatever inputs at or after `T` the first run had already
//! received (after the checkpoint was agreed, as in the engine) when it saved.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use differential_dataflow::input::InputSession;
use edgeflow_operators::node_health::{NodeHealth, NodeHealthConfig, NodeHealthParams};
use edgeflow_operators::records::{Heartbeat, RegionRollup, StatusChange};
use edgeflow_operators::state::{Entry, WorkerState};
use edgeflow_operators::DurationMs;
use proptest::prelude::*;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::ProbeHandle;

fn heartbeat(node: usize, time: u64, cpu: f64) -> Heartbeat {
    Heartbeat {
        node_id: format!("n{node}"),
        region: format!("r{}", node % 3),
        lat: 0.0,
        lon: 0.0,
        timestamp: time,
        cpu,
        memory: 50.0,
        disk: 50.0,
        net_rx_bytes: 0,
        net_tx_bytes: 0,
        capacity: 1.0,
        labels: BTreeMap::new(),
    }
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

#[derive(Default)]
struct Run {
    changes: BTreeSet<String>,
    rollups: BTreeSet<String>,
    saved: BTreeMap<String, Vec<Entry>>,
}

/// What one run does: restore from `restore` (time and entries), feed `beats` (at or after
/// the restore time) in time order on worker 0, and, with `checkpoint_at`, save at that time
/// having already fed the beats up to `ahead` past it, then stop.
struct Plan {
    beats: Vec<Heartbeat>,
    workers: usize,
    restore: Option<(u64, BTreeMap<String, Vec<Entry>>)>,
    checkpoint_at: Option<(u64, u64)>,
}

fn run(plan: Plan) -> Run {
    let result = Arc::new(Mutex::new(Run::default()));
    let sink = result.clone();
    let Plan { beats, workers, restore, checkpoint_at } = plan;
    timely::execute(timely::Config::process(workers), move |worker| {
        let state = WorkerState::new(worker.index(), worker.peers(), restore.clone());
        let sink = sink.clone();
        let mut input = InputSession::new();
        let probe = ProbeHandle::new();
        let start = restore.as_ref().map_or(0, |(time, _)| *time);
        worker.dataflow::<u64, _, _>(|scope| {
            let streams = input.to_collection(scope).node_health_checkpointed(&params(), &state, "health");
            let (a, b) = (sink.clone(), sink.clone());
            let stop = checkpoint_at.map(|(at, _)| at);
            // The first run reports only what comes before the checkpoint (what a sink has
            // written when the checkpoint is taken); the rest is the restored run's.
            let keep = move |time: u64| stop.is_none_or(|at| time < at);
            streams
                .changes
                .inspect(move |c: &StatusChange| {
                    if keep(c.time) {
                        a.lock().unwrap().changes.insert(serde_json::to_string(c).unwrap());
                    }
                })
                .probe_with(&probe);
            streams.rollups.inspect(move |r: &RegionRollup| {
                if keep(r.window_end) {
                    b.lock().unwrap().rollups.insert(serde_json::to_string(r).unwrap());
                }
            });
        });
        input.advance_to(start);
        let mut sorted: Vec<Heartbeat> = if worker.index() == 0 { beats.clone() } else { Vec::new() };
        sorted.sort_by_key(|hb| hb.timestamp);
        match checkpoint_at {
            None => {
                for hb in sorted {
                    input.advance_to(hb.timestamp);
                    let time = hb.timestamp;
                    input.update_at(hb, time, 1);
                    worker.step();
                }
            }
            Some((at, ahead)) => {
                // Beats before the checkpoint; then, as the engine's protocol has it, the
                // checkpoint is agreed at a time past every beat handed in so far, and beats
                // at or after it follow (before the frontier reaches it, as a source's
                // out-of-order records do); then the frontier moves to it and past it.
                let (before, after): (Vec<_>, Vec<_>) = sorted.into_iter().partition(|hb| hb.timestamp < at);
                for hb in before {
                    let time = hb.timestamp;
                    input.advance_to(time);
                    input.update_at(hb, time, 1);
                    worker.step();
                }
                state.start(1, at);
                for hb in after.into_iter().filter(|hb| hb.timestamp < at + ahead) {
                    let time = hb.timestamp;
                    input.update_at(hb, time, 1);
                    worker.step();
                }
                input.advance_to(at);
                input.flush();
                let saved = loop {
                    worker.step();
                    if let Some((_, _, saved)) = state.take_complete() {
                        break saved;
                    }
                };
                // Let what is before the checkpoint reach the outputs, then stop.
                while probe.less_than(&at) {
                    worker.step();
                }
                let mut result = sink.lock().unwrap();
                for (part, entries) in saved {
                    result.saved.entry(part).or_default().extend(entries);
                }
            }
        }
    })
    .expect("timely runs");
    Arc::try_unwrap(result).ok().expect("one owner").into_inner().unwrap()
}

fn fleet(seed: &[(usize, u64, u8)]) -> Vec<Heartbeat> {
    seed.iter().map(|&(node, time, cpu)| heartbeat(node, time, f64::from(cpu))).collect()
}

fn check(beats: &[Heartbeat], at: u64, ahead: u64, workers: (usize, usize)) {
    let whole = run(Plan { beats: beats.to_vec(), workers: 1, restore: None, checkpoint_at: None });
    let first =
        run(Plan { beats: beats.to_vec(), workers: workers.0, restore: None, checkpoint_at: Some((at, ahead)) });
    assert!(first.saved.contains_key("health/status"), "{:?}", first.saved.keys());
    let rest: Vec<Heartbeat> = beats.iter().filter(|hb| hb.timestamp >= at).cloned().collect();
    let second = run(Plan { beats: rest, workers: workers.1, restore: Some((at, first.saved)), checkpoint_at: None });
    let changes: BTreeSet<String> = first.changes.union(&second.changes).cloned().collect();
    let rollups: BTreeSet<String> = first.rollups.union(&second.rollups).cloned().collect();
    assert_eq!(changes, whole.changes, "status changes differ (checkpoint at {at}, workers {workers:?})");
    assert_eq!(rollups, whole.rollups, "rollups differ (checkpoint at {at}, workers {workers:?})");
    // Nothing twice: the two runs' outputs do not overlap.
    assert_eq!(first.changes.len() + second.changes.len(), whole.changes.len());
    assert_eq!(first.rollups.len() + second.rollups.len(), whole.rollups.len());
}

/// A node healthy before the checkpoint is not new after it, and one that goes silent across
/// it goes Unhealthy and Offline at the right times.
#[test]
fn restored_nodes_carry_on_where_they_were() {
    let beats = fleet(&[(0, 0, 10), (1, 5, 10), (0, 30, 10), (1, 35, 95), (0, 60, 10), (0, 100, 10), (0, 140, 10)]);
    check(&beats, 50, 0, (1, 1));
    check(&beats, 50, 40, (1, 2));
    check(&beats, 61, 15, (2, 1));
    check(&beats, 100, 0, (2, 3));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn restore_equals_an_uninterrupted_run(
        seed in prop::collection::vec((0usize..8, 0u64..400, 0u8..100), 1..60),
        at in 1u64..400,
        ahead in 0u64..60,
        workers in (1usize..4, 1usize..4),
    ) {
        check(&fleet(&seed), at, ahead, workers);
    }
}

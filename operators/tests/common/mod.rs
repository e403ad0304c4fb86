//! Helpers shared by the operator tests: heartbeats, and a harness that checkpoints an
//! operator at a time, stops it, and restores it on another run.

#![allow(dead_code)] // Each test file uses its own part of the helpers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use edgeflow_operators::records::Heartbeat;
use edgeflow_operators::state::{Entry, WorkerState};
use timely::dataflow::operators::{Input, Inspect, Probe};
use timely::dataflow::{ProbeHandle, StreamVec};

/// A heartbeat of node `n{node}` in region `r{node % 3}` at `time` with `cpu` percent.
pub fn heartbeat(node: usize, time: u64, cpu: f64) -> Heartbeat {
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

/// An operator under test: builds it on a stream of heartbeat updates, taking part in
/// checkpoints through the worker's state, and gives its outputs as text.
pub type Build =
    for<'scope> fn(StreamVec<'scope, u64, (Heartbeat, u64, isize)>, &WorkerState) -> StreamVec<'scope, u64, String>;

/// What one run does: restore from `restore` (time and entries), feed `updates` (heartbeat
/// and dataflow time, at or after the restore time) in time order on worker 0, and, with
/// `checkpoint_at: (T, ahead)`, save at `T` having already fed the updates up to `ahead`
/// past it (after the checkpoint was agreed, as the engine's sources do), then stop.
pub struct Plan {
    pub updates: Vec<(Heartbeat, u64)>,
    pub workers: usize,
    pub restore: Option<(u64, BTreeMap<String, Vec<Entry>>)>,
    pub checkpoint_at: Option<(u64, u64)>,
}

/// What a run reported (a first run: only at times before the checkpoint, what a sink has
/// written when it is taken) and what it saved.
#[derive(Default)]
pub struct Run {
    pub outputs: BTreeSet<String>,
    pub saved: BTreeMap<String, Vec<Entry>>,
}

pub fn run(plan: Plan, build: Build) -> Run {
    let result = Arc::new(Mutex::new(Run::default()));
    let sink = result.clone();
    let Plan { updates, workers, restore, checkpoint_at } = plan;
    timely::execute(timely::Config::process(workers), move |worker| {
        let state = WorkerState::new(worker.index(), worker.peers(), restore.clone());
        let sink = sink.clone();
        let probe = ProbeHandle::new();
        let stop = checkpoint_at.map(|(at, _)| at);
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, stream) = scope.new_input();
            let seen = sink.clone();
            build(stream, &state)
                .inspect_core(move |event| {
                    if let Ok((stamp, outputs)) = event {
                        let time = stamp.least().copied().unwrap_or_default();
                        if stop.is_none_or(|at| time < at) {
                            seen.lock().unwrap().outputs.extend(outputs.iter().cloned());
                        }
                    }
                })
                .probe_with(&probe);
            input
        });
        input.advance_to(restore.as_ref().map_or(0, |(time, _)| *time));
        let mut sorted = if worker.index() == 0 { updates.clone() } else { Vec::new() };
        sorted.sort_by_key(|(_, time)| *time);
        let Some((at, ahead)) = checkpoint_at else {
            for (hb, time) in sorted {
                input.advance_to(time);
                input.send((hb, time, 1));
                worker.step();
            }
            return;
        };
        let (before, after): (Vec<_>, Vec<_>) = sorted.into_iter().partition(|(_, time)| *time < at);
        for (hb, time) in before {
            input.advance_to(time);
            input.send((hb, time, 1));
            worker.step();
        }
        state.start(1, at);
        for (hb, time) in after.into_iter().filter(|(_, time)| *time < at + ahead) {
            // Sent under the capability at or before the checkpoint's time, as a source's
            // out-of-order records are.
            input.send((hb, time, 1));
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
    })
    .expect("timely runs");
    Arc::try_unwrap(result).ok().expect("one owner").into_inner().unwrap()
}

/// Checkpoints a run of `build` over `updates` at `at` (with the updates up to `ahead` past it
/// already in), restores it on `workers.1` workers with the updates at or after `at`, and
/// checks that together they report exactly what one uninterrupted run reports, nothing twice.
/// Returns what the first run saved.
pub fn check_restore(
    updates: &[(Heartbeat, u64)],
    at: u64,
    ahead: u64,
    workers: (usize, usize),
    build: Build,
) -> BTreeMap<String, Vec<Entry>> {
    let whole = run(Plan { updates: updates.to_vec(), workers: 1, restore: None, checkpoint_at: None }, build);
    let first = run(
        Plan { updates: updates.to_vec(), workers: workers.0, restore: None, checkpoint_at: Some((at, ahead)) },
        build,
    );
    let rest: Vec<_> = updates.iter().filter(|(_, time)| *time >= at).cloned().collect();
    let second = run(
        Plan { updates: rest, workers: workers.1, restore: Some((at, first.saved.clone())), checkpoint_at: None },
        build,
    );
    let together: BTreeSet<String> = first.outputs.union(&second.outputs).cloned().collect();
    assert_eq!(together, whole.outputs, "outputs differ (checkpoint at {at}, workers {workers:?})");
    assert_eq!(
        first.outputs.len() + second.outputs.len(),
        whole.outputs.len(),
        "an output was reported twice (checkpoint at {at}, workers {workers:?})"
    );
    first.saved
}

//! Checkpoint and restore of `node_health`: a run checkpointed at time `T`, stopped, and
//! restored from the checkpoint (on the same or another number of workers) with the inputs
//! at or after `T` reports exactly the status changes and rollups of a run that never
//! stopped, whatever `T` is and whatever inputs at or after `T` the first run had already
//! received (after the checkpoint was agreed, as in the engine) when it saved.

mod common;

use common::{check_restore, heartbeat};
use differential_dataflow::AsCollection;
use edgeflow_operators::node_health::{NodeHealth, NodeHealthConfig, NodeHealthParams};
use edgeflow_operators::records::Heartbeat;
use edgeflow_operators::state::WorkerState;
use edgeflow_operators::DurationMs;
use proptest::prelude::*;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Concat;
use timely::dataflow::StreamVec;

fn params() -> NodeHealthParams {
    NodeHealthParams::try_new(&NodeHealthConfig {
        heartbeat_timeout: DurationMs(90),
        unhealthy_after: DurationMs(45),
        rollup_window: DurationMs(20),
        ..NodeHealthConfig::default()
    })
    .expect("valid parameters")
}

/// Node health's status changes and rollups, as text.
fn health<'scope>(
    updates: StreamVec<'scope, u64, (Heartbeat, u64, isize)>,
    state: &WorkerState,
) -> StreamVec<'scope, u64, String> {
    let streams = updates.as_collection().node_health_checkpointed(&params(), state, "health");
    let changes = streams.changes.map(|c| format!("change {}", serde_json::to_string(&c).unwrap()));
    let rollups = streams.rollups.map(|r| format!("rollup {}", serde_json::to_string(&r).unwrap()));
    changes.concat(rollups)
}

fn fleet(seed: &[(usize, u64, u8)]) -> Vec<Heartbeat> {
    seed.iter().map(|&(node, time, cpu)| heartbeat(node, time, f64::from(cpu))).collect()
}

fn check(beats: &[Heartbeat], at: u64, ahead: u64, workers: (usize, usize)) {
    let updates: Vec<_> = beats.iter().map(|hb| (hb.clone(), hb.timestamp)).collect();
    let saved = check_restore(&updates, at, ahead, workers, health);
    assert!(saved.contains_key("health/status"), "{:?}", saved.keys());
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

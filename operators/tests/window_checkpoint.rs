//! Checkpoint and restore of `window_aggregate`: a run checkpointed at time `T`, stopped, and
//! restored from the checkpoint (on the same or another number of workers) with the inputs at
//! or after `T` reports exactly the window results and late corrections of a run that never
//! stopped, whatever `T` is and whatever inputs at or after `T` the first run had already
//! received when it saved.

mod common;

use common::{check_restore, heartbeat};
use edgeflow_operators::records::Heartbeat;
use edgeflow_operators::state::WorkerState;
use edgeflow_operators::window_aggregate::{
    heartbeat_windows, Aggregate, WindowAggregateConfig, WindowField, WindowKey, WindowParams,
};
use edgeflow_operators::DurationMs;
use proptest::prelude::*;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::StreamVec;

fn config(key: WindowKey) -> WindowAggregateConfig {
    WindowAggregateConfig {
        key,
        field: WindowField::Cpu,
        window: DurationMs(20),
        slide: Some(DurationMs(10)),
        aggregates: vec![Aggregate::Count, Aggregate::Sum, Aggregate::Mean, Aggregate::Min, Aggregate::Max],
        allowed_lateness: Some(DurationMs(30)),
    }
}

fn windows<'scope>(
    updates: StreamVec<'scope, u64, (Heartbeat, u64, isize)>,
    state: &WorkerState,
    key: WindowKey,
) -> StreamVec<'scope, u64, String> {
    let config = config(key);
    let params = WindowParams::from_config(&config).expect("valid windows");
    heartbeat_windows(updates, "windows", &config, params, state.handle("windows"))
        .map(|result| serde_json::to_string(&result).unwrap())
}

fn by_node<'scope>(
    updates: StreamVec<'scope, u64, (Heartbeat, u64, isize)>,
    state: &WorkerState,
) -> StreamVec<'scope, u64, String> {
    windows(updates, state, WindowKey::NodeId)
}

fn by_region<'scope>(
    updates: StreamVec<'scope, u64, (Heartbeat, u64, isize)>,
    state: &WorkerState,
) -> StreamVec<'scope, u64, String> {
    windows(updates, state, WindowKey::Region)
}

/// Heartbeats that enter the dataflow `delay` after their event time (late records under the
/// late policy `update`, which correct windows already emitted).
fn late(seed: &[(usize, u64, u64, u8)]) -> Vec<(Heartbeat, u64)> {
    seed.iter().map(|&(node, time, delay, cpu)| (heartbeat(node, time, f64::from(cpu)), time + delay)).collect()
}

/// Open windows, emitted windows still open to corrections, and a late record that corrects a
/// window emitted before the checkpoint, after it.
#[test]
fn open_windows_and_corrections_carry_across_a_restore() {
    let updates =
        late(&[(0, 3, 0, 10), (1, 12, 0, 20), (0, 18, 0, 30), (0, 25, 0, 40), (1, 8, 27, 50), (2, 33, 0, 60)]);
    let saved = check_restore(&updates, 30, 0, (1, 1), by_node);
    assert!(saved["windows"].len() > 1, "open windows saved: {saved:?}");
    check_restore(&updates, 30, 5, (2, 3), by_node);
    check_restore(&updates, 26, 10, (3, 1), by_region);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn restore_equals_an_uninterrupted_run(
        seed in prop::collection::vec((0usize..6, 0u64..200, prop_oneof![Just(0u64), 0u64..45], 0u8..100), 1..50),
        at in 1u64..220,
        ahead in 0u64..30,
        workers in (1usize..4, 1usize..4),
        region in any::<bool>(),
    ) {
        check_restore(&late(&seed), at, ahead, workers, if region { by_region } else { by_node });
    }
}

//! Node-health throughput: the engine against the COST baseline, side by side.
//!
//! Run: `cargo bench -p edgeflow-benches --bench node_health` (full size, 5 runs each,
//! medians). Under `cargo test` it runs once on a tiny fleet as a smoke test.
//!
//! Variants, all on the same fleet (same generator seed, same heartbeats):
//! - `baseline (memory)`: the COST baseline, a single-threaded hand-written loop over the
//!   heartbeats in memory;
//! - `baseline (generator)`: the same loop over the heartbeats as the generator makes them
//!   (generation included, as it is in the engine's generator runs);
//! - `baseline (file)`: the same loop, reading and decoding the JSON file first;
//! - `engine generator -> node_health -> discard` on 1 and 2 workers;
//! - `engine JSON file -> node_health -> discard` on 1 and 2 workers.
//!
//! Ratios are throughput relative to the matching baseline (generator runs against
//! `baseline (generator)`, file runs against `baseline (file)`); above 1.0 the engine is
//! faster. The machine these numbers come from has 2 cores.

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use edgeflow_benches::{cost_baseline, fleet_config, fleet_heartbeats};
use edgeflow_engine::config::load_str;
use edgeflow_engine::metrics::Metrics;
use edgeflow_engine::runtime::{run, RunOptions};
use edgeflow_operators::node_health::NodeHealthConfig;
use edgeflow_operators::Heartbeat;

/// The allocator of the `edgeflow` binary, so that the engine runs here as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn median(runs: usize, mut work: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn engine(yaml: &str, workers: usize) {
    let pipeline = load_str(yaml, "bench.yaml", &|_| None).unwrap_or_else(|problems| panic!("{problems}"));
    run(&pipeline, &RunOptions { workers, ..RunOptions::default() }, Arc::new(Metrics::new())).expect("pipeline runs");
}

const SINKS: &str = "
operators:
  health:
    type: node_health
    input: fleet
sinks:
  changes:
    type: file
    input: health.changes
    path: /dev/null
  rollups:
    type: file
    input: health.rollups
    path: /dev/null
";

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let (nodes, minutes, runs) = if full { (2000, 120, 5) } else { (50, 10, 1) };
    let config = fleet_config(nodes, minutes);
    let heartbeats = fleet_heartbeats(&config);
    let records = heartbeats.len() as f64;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("heartbeats.jsonl");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).expect("create input"));
        for hb in &heartbeats {
            serde_json::to_writer(&mut file, hb).expect("write");
            file.write_all(b"\n").expect("write");
        }
    }
    let health = NodeHealthConfig::default();
    let generator_yaml = format!(
        "sources:\n  fleet:\n    type: generator\n    nodes: {nodes}\n    speed: max\n    duration: {minutes}m\n    failure_rate: 0.005\n    seed: 7\n{SINKS}"
    );
    let file_yaml = format!("sources:\n  fleet:\n    type: file\n    path: {}\n{SINKS}", path.display());

    let expected = cost_baseline(&heartbeats, &health);
    let mut rows: Vec<(String, f64, Option<usize>)> = Vec::new();
    let memory = median(runs, || {
        std::hint::black_box(cost_baseline(&heartbeats, &health));
    });
    rows.push(("baseline (memory): hand-written loop, 1 thread".into(), memory, None));
    let generated = median(runs, || {
        let output = cost_baseline(&fleet_heartbeats(&config), &health);
        assert_eq!(output, expected);
    });
    rows.push(("baseline (generator): generate + loop, 1 thread".into(), generated, None));
    let file = median(runs, || {
        let text = std::fs::read(&path).expect("read input");
        let parsed: Vec<Heartbeat> = text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| Heartbeat::from_json(l).expect("valid"))
            .collect();
        let output = cost_baseline(&parsed, &health);
        assert_eq!(output, expected);
    });
    rows.push(("baseline (file): read + decode + loop, 1 thread".into(), file, None));
    for workers in [1, 2] {
        let seconds = median(runs, || engine(&generator_yaml, workers));
        rows.push((format!("engine: generator -> node_health -> discard, {workers} worker(s)"), seconds, Some(1)));
    }
    for workers in [1, 2] {
        let seconds = median(runs, || engine(&file_yaml, workers));
        rows.push((format!("engine: JSON file -> node_health -> discard, {workers} worker(s)"), seconds, Some(2)));
    }

    println!(
        "\nnode_health: {} heartbeats from {nodes} nodes over {minutes} min of event time; median of {runs} run(s)",
        records
    );
    println!("{} status changes and {} rollup rows per run (baseline)\n", expected.changes, expected.rollups);
    println!("| variant | seconds | heartbeats/s | vs baseline |");
    println!("| --- | ---: | ---: | ---: |");
    let baselines = [memory, generated, file];
    for (name, seconds, baseline) in &rows {
        let ratio = baseline.map_or_else(|| "1.00 (baseline)".to_owned(), |b| format!("{:.2}", baselines[b] / seconds));
        println!("| {name} | {seconds:.3} | {:.0} | {ratio} |", records / seconds);
    }
}

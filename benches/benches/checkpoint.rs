//! Checkpoints: what they cost a running pipeline, and how fast a large state comes back.
//!
//! Run: `cargo bench -p edgeflow-benches --bench checkpoint` (full size, 3 runs each,
//! medians). Under `cargo test` it runs once on a tiny fleet as a smoke test.
//!
//! - **Overhead**: the 2-worker `generator -> node_health -> files` pipeline without
//!   checkpoints, with a checkpoint every 10 s, and every 1 s (ten times as often, to show the
//!   cost per checkpoint), run alternately on the same fleet; reported as throughput and as
//!   the ratio to the run without checkpoints.
//! - **Recovery**: a 100,000-node state checkpointed from a file of heartbeats, the run
//!   stopped, then started again: the time from start to the first new output line, with
//!   the checkpoint's size.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeflow_engine::config::load_str;
use edgeflow_engine::metrics::Metrics;
use edgeflow_engine::runtime::{run, RunOptions};

/// The allocator of the `edgeflow` binary, so that the engine runs here as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn fleet_pipeline(dir: &Path, nodes: u32, hours: u32, interval: Option<&str>) -> String {
    let checkpoint = match interval {
        Some(interval) => format!("checkpoint:\n  dir: {}/ckpt\n  interval: {interval}\n", dir.display()),
        None => String::new(),
    };
    format!(
        "name: bench\nmetrics:\n  enabled: false\n{checkpoint}sources:\n  fleet:\n    type: generator\n    nodes: {nodes}\n    speed: max\n    duration: {hours}h\n    failure_rate: 0.005\n    seed: 7\noperators:\n  health:\n    type: node_health\n    input: fleet\nsinks:\n  changes:\n    type: file\n    input: health.changes\n    path: {d}/changes.jsonl\n  rollups:\n    type: file\n    input: health.rollups\n    path: {d}/rollups.jsonl\n",
        d = dir.display()
    )
}

/// Runs `yaml` to its end; returns the seconds it took and the run's metrics.
fn timed(yaml: &str, workers: usize) -> (f64, Arc<Metrics>) {
    let pipeline = load_str(yaml, "bench.yaml", &|_| None).unwrap_or_else(|problems| panic!("{problems}"));
    let metrics = Arc::new(Metrics::new());
    let start = Instant::now();
    run(&pipeline, &RunOptions { workers, ..RunOptions::default() }, metrics.clone()).expect("pipeline runs");
    (start.elapsed().as_secs_f64(), metrics)
}

fn overhead(full: bool) {
    let (nodes, hours, runs) = if full { (10_000, 6, 3) } else { (50, 1, 1) };
    let variants: [(&str, Option<&str>); 3] =
        [("no checkpoints", None), ("checkpoint every 10s", Some("10s")), ("checkpoint every 1s", Some("1s"))];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut records = 0u64;
    let mut completed = vec![0u64; variants.len()];
    for _ in 0..runs {
        for (index, (_, interval)) in variants.iter().enumerate() {
            let dir = tempfile::tempdir().expect("temp dir");
            let (seconds, metrics) = timed(&fleet_pipeline(dir.path(), nodes, hours, *interval), 2);
            records = metrics.records_total.get();
            completed[index] = metrics.checkpoints.completed.get();
            times[index].push(seconds);
        }
    }
    println!("\n## Checkpoint overhead: generator ({nodes} nodes, {hours} h, {records} heartbeats) -> node_health -> files, 2 workers, median of {runs}\n");
    println!("| variant | seconds | heartbeats/s | checkpoints | ratio |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let median = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let base = median(&mut times[0].clone());
    for (index, (name, _)) in variants.iter().enumerate() {
        let seconds = median(&mut times[index]);
        println!(
            "| {name} | {seconds:.2} | {:.0} | {} | {:.2} |",
            records as f64 / seconds,
            completed[index],
            base / seconds
        );
    }
}

fn recovery(full: bool) {
    let nodes: u64 = if full { 100_000 } else { 200 };
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("beats.jsonl");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&input).expect("create input"));
        // Six heartbeats per node, 30 s apart, then more to read after the restart.
        for step in 0..12u64 {
            for node in 0..nodes {
                let time = 1_700_000_000_000 + step * 30_000 + node % 30_000;
                writeln!(
                    file,
                    r#"{{"node_id":"edge-{node:06}","region":"r{}","lat":0,"lon":0,"timestamp":{time},"cpu":{},"memory":40,"disk":30}}"#,
                    node % 8,
                    (node + step) % 100
                )
                .expect("write");
            }
        }
    }
    let yaml = format!(
        "name: recovery\nmetrics:\n  enabled: false\ncheckpoint:\n  dir: {d}/ckpt\n  interval: 1s\nsources:\n  beats:\n    type: file\n    path: {i}\noperators:\n  health:\n    type: node_health\n    input: beats\nsinks:\n  changes:\n    type: file\n    input: health.changes\n    path: {d}/changes.jsonl\n",
        d = dir.path().display(),
        i = input.display()
    );
    let pipeline = load_str(&yaml, "bench.yaml", &|_| None).unwrap_or_else(|problems| panic!("{problems}"));
    // First run: stop once a checkpoint holds every node (the first one after half the file).
    let options = RunOptions { workers: 2, ..RunOptions::default() };
    let metrics = Arc::new(Metrics::new());
    let stop = options.stop.clone();
    let watcher = {
        let metrics = metrics.clone();
        std::thread::spawn(move || {
            let half = nodes * 6;
            while metrics.records_total.get() < half {
                std::thread::sleep(Duration::from_millis(5));
            }
            let taken = metrics.checkpoints.completed.get();
            while metrics.checkpoints.completed.get() <= taken {
                std::thread::sleep(Duration::from_millis(5));
            }
            stop.store(true, Ordering::Relaxed);
        })
    };
    run(&pipeline, &options, metrics.clone()).expect("first run");
    if !watcher.is_finished() {
        // The file was read to its end before a checkpoint part-way (a tiny smoke run).
        println!("\n(recovery: the input ended before a checkpoint part-way; nothing to measure)");
        return;
    }
    watcher.join().expect("watcher");
    let bytes = metrics.checkpoints.bytes.get();
    // Second run: time from start (restore included) to the first line its sink writes.
    let options = RunOptions { workers: 2, ..RunOptions::default() };
    let stop = options.stop.clone();
    let restored = Arc::new(Metrics::new());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = Instant::now();
    let probe = {
        let (done, restored) = (done.clone(), restored.clone());
        std::thread::spawn(move || {
            let written = restored
                .sink_records
                .get_or_create(&edgeflow_engine::metrics::labels::Sink { sink: "changes".into() })
                .clone();
            while !done.load(Ordering::Relaxed) {
                if written.get() > 0 {
                    let first = start.elapsed();
                    stop.store(true, Ordering::Relaxed);
                    return Some(first);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            None
        })
    };
    run(&pipeline, &options, restored).expect("restored run");
    done.store(true, Ordering::Relaxed);
    let first = probe.join().expect("probe").unwrap_or_default();
    println!("\n## Recovery of a {nodes}-node state (node_health from a file, 2 workers)\n");
    println!("| checkpoint bytes | start to first output (ms) |");
    println!("| ---: | ---: |");
    println!("| {bytes} | {} |", first.as_millis());
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    overhead(full);
    recovery(full);
}

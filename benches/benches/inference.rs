//! Inference benchmarks, each side by side with its baseline in one run, on the 64 -> 256 ->
//! 256 -> 16 MLP of `engine/tests/models/mlp` and one ONNX Runtime thread per session.
//!
//! Run: `cargo bench -p edgeflow-benches --bench inference` (full size: the closed loop in
//! 5 interleaved rounds, medians); `-- closed`, `-- open` or `-- stall` runs the closed loop
//! and only that part (the closed loop always runs: the open loop's rates come from it).
//! Under `cargo test` it runs once, small, as a smoke test.
//!
//! 1. **Batch 64, closed loop**: a bare `ort` `Session::run` loop on one pre-built batch of
//!    64 rows, against the engine (`requests` source as fast as the dataflow admits requests
//!    of one row each -> `inference` with `max_batch_size: 64` -> results to a file, once as
//!    an Arrow IPC stream and once as JSON lines), and the same batched loop through ONNX
//!    Runtime's Python API (PyPI `onnxruntime`). Rows/s; the engine's overhead is
//!    1 - engine/bare. JSON costs more: 16 output floats a row formatted as decimal text.
//! 2. **Open loop**: single requests at a fixed rate (the `requests` source: due times do not
//!    slow down when the engine does), latency = result time - due time, p50 and p99, with
//!    dynamic batching (64, 2 ms) and with batch size 1, at a half and a quarter of the
//!    engine's closed-loop batch-64 rate and at 90% of the batch-1 engine's maximum.
//! 3. **No stall**: node_health on 1 worker alone, and on the same worker while an inference
//!    operator keeps its model thread busy (the shipped IsolationForest, ~50 us a row, at
//!    15,000 requests/s: little work for the worker, much for the model); heartbeats/s of
//!    each (rounds interleaved, the median of the rounds' ratios), and the model thread's
//!    busy fraction. A model run inside the worker would take that fraction of the worker's
//!    time away from node_health.

use edgeflow_benches::median;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeflow_engine::config::load_str;
use edgeflow_engine::metrics::{labels, Metrics};
use edgeflow_engine::runtime::{run, RunOptions};
use ort::session::Session;

/// The allocator of the `edgeflow` binary, so that the engine runs here as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn mlp() -> PathBuf {
    root().join("engine/tests/models/mlp/1/model.onnx")
}

/// Rows/s of a bare `ort` loop at `batch` for `seconds`.
fn bare_ort(batch: usize, seconds: f64) -> f64 {
    let environment = edgeflow_connectors::onnx::runtime::environment().expect("ONNX Runtime");
    let mut session = Session::builder(environment)
        .and_then(|b| b.with_intra_threads(1).map_err(Into::into))
        .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
        .and_then(|mut b| b.commit_from_file(mlp()))
        .expect("the mlp model loads");
    let data: Vec<f32> = (0..batch * 64).map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0).collect();
    let input = ort::value::Tensor::from_array((vec![batch, 64], data)).expect("tensor");
    for _ in 0..3 {
        session.run(ort::inputs!["x" => input.view()]).expect("run");
    }
    let start = Instant::now();
    let mut runs = 0usize;
    while start.elapsed().as_secs_f64() < seconds || runs < 10 {
        let outputs = session.run(ort::inputs!["x" => input.view()]).expect("run");
        std::hint::black_box(outputs["y"].try_extract_tensor::<f32>().expect("y").1[0]);
        runs += 1;
    }
    (runs * batch) as f64 / start.elapsed().as_secs_f64()
}

/// Rows/s of the Python baseline.
fn python_ort(batch: usize, seconds: f64) -> Option<f64> {
    let python = root().join(".venv/bin/python");
    let output = Command::new(python)
        .arg(root().join("benches/onnx_python.py"))
        .arg(mlp())
        .arg(batch.to_string())
        .arg(seconds.to_string())
        .output()
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    value["rows_per_second"].as_f64()
}

/// Runs a pipeline to its end; returns the seconds from the first request read from source
/// `load` to the end of the run (everything flushed). Like the bare loop, which builds its
/// session before its clock starts, this leaves out the start: loading the model, creating
/// its session, building the dataflow (about 0.1 s, 5% of a 2 s run).
fn run_pipeline(yaml: &str, workers: usize) -> (f64, Arc<Metrics>) {
    let pipeline = load_str(yaml, "bench.yaml", &|_| None).unwrap_or_else(|problems| panic!("{problems}"));
    let metrics = Arc::new(Metrics::new());
    let options = RunOptions { workers, ..Default::default() };
    let read = metrics.source_records.get_or_create(&labels::Source { source: "load".to_owned() }).clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            while read.get() == 0 && !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_micros(100));
            }
            Instant::now()
        })
    };
    run(&pipeline, &options, metrics.clone()).expect("the pipeline runs");
    let end = Instant::now();
    done.store(true, Ordering::Relaxed);
    let first_read = watcher.join().expect("watcher");
    (end.duration_since(first_read).as_secs_f64(), metrics)
}

/// Seconds the model thread of `model` (operator `infer`, worker 0) spent in model runs.
fn model_busy_seconds(metrics: &Metrics, model: &str) -> f64 {
    let labels = labels::ModelWorker { operator: "infer".to_owned(), model: model.to_owned(), worker: 0 };
    metrics.inference.busy_seconds.get_or_create(&labels).get()
}

/// How the results are written: JSON lines, or an Arrow IPC stream (`format: arrow`).
#[derive(Clone, Copy, PartialEq)]
enum Format {
    Jsonl,
    Arrow,
}

/// The benchmark pipeline; `slack_ms` is the source's `max_out_of_orderness`.
fn inference_pipeline(
    rate: f64,
    count: u64,
    batch: usize,
    delay_ms: u64,
    slack_ms: u64,
    out: &Path,
    format: Format,
) -> String {
    let format = match format {
        Format::Jsonl => "jsonl",
        Format::Arrow => "arrow",
    };
    format!(
        "name: bench\nmetrics:\n  enabled: false\nsources:\n  load:\n    type: requests\n    model: mlp\n    rate: {rate}\n    count: {count}\n    input_name: x\n    shape: [1, 64]\n    max_out_of_orderness: {slack_ms}ms\n\
         operators:\n  infer:\n    type: inference\n    input: load\n    registry: {}\n    models: [mlp]\n    max_batch_size: {batch}\n    max_queue_delay: {delay_ms}ms\n    queue_capacity: 1000000\n\
         sinks:\n  out:\n    type: file\n    input: infer\n    format: {format}\n    path: {}\n",
        root().join("engine/tests/models").display(),
        out.display()
    )
}

/// Result latencies (finished_at - timestamp, ms) and statuses of a results file.
fn latencies(path: &Path) -> (Vec<f64>, BTreeMap<String, usize>) {
    let mut latencies = Vec::new();
    let mut statuses = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let result: serde_json::Value = serde_json::from_str(line).expect("a result");
        *statuses.entry(result["status"].as_str().unwrap_or("?").to_owned()).or_insert(0) += 1;
        let (finished, due) =
            (result["finished_at"].as_f64().unwrap_or(0.0), result["timestamp"].as_f64().unwrap_or(0.0));
        latencies.push(finished - due);
    }
    latencies.sort_by(f64::total_cmp);
    (latencies, statuses)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn closed_loop(batch: usize, rows: u64, out: &Path, format: Format) -> f64 {
    // A rate far above what the engine serves, so every request is due at once, but with due
    // times still 0.5 us apart and no out-of-orderness: the watermark then moves with the
    // requests, and the engine's flow control keeps a few batches of requests in flight, like
    // a closed loop with a window. (At a rate of 1e9 all requests shared one millisecond,
    // nothing held the source back, and all 1M requests waited in memory: 726 MB.)
    let (seconds, metrics) = run_pipeline(&inference_pipeline(2e6, rows, batch, 50, 0, out, format), 1);
    let busy = model_busy_seconds(&metrics, "mlp") / seconds;
    eprintln!(
        "closed loop, batch {batch}: {:.0} rows/s, model thread busy {:.0}%",
        rows as f64 / seconds,
        busy * 100.0
    );
    rows as f64 / seconds
}

fn open_loop(rate: f64, seconds: f64, batch: usize, out: &Path) -> (f64, f64, f64, BTreeMap<String, usize>) {
    let count = (rate * seconds) as u64;
    let (wall, _) = run_pipeline(&inference_pipeline(rate, count, batch, 2, 100, out, Format::Jsonl), 1);
    let (latencies, statuses) = latencies(out);
    (count as f64 / wall, percentile(&latencies, 0.5), percentile(&latencies, 0.99), statuses)
}

/// Heartbeats/s of node_health on one worker, alone or beside a busy inference operator;
/// with inference, also the model thread's busy fraction while the heartbeats ran.
fn node_health_rate(heartbeats_minutes: u64, with_inference: bool, dir: &Path) -> (f64, Option<f64>) {
    let nodes: u64 = 2000;
    // No failures: every node sends one heartbeat per 30 s slot.
    let total = nodes * heartbeats_minutes * 2;
    let inference = if with_inference {
        // Light on the worker, heavy on the model thread: the IsolationForest costs ~50 us a
        // row, so 15,000 one-row requests/s keep its thread busy most of the time.
        "  load:\n    type: requests\n    model: anomaly\n    rate: 15000\n    input_name: features\n    shape: [1, 3]\n"
            .to_owned()
    } else {
        String::new()
    };
    let infer_op = if with_inference {
        format!(
            "  infer:\n    type: inference\n    input: load\n    registry: {}\n    models: [anomaly]\n    max_batch_size: 64\n    max_queue_delay: 2ms\n",
            root().join("pipelines/models").display()
        )
    } else {
        String::new()
    };
    let infer_sink = if with_inference {
        format!("  scored:\n    type: file\n    input: infer\n    path: {}\n", dir.join("scored.jsonl").display())
    } else {
        String::new()
    };
    let yaml = format!(
        "name: stall\nmetrics:\n  enabled: false\nsources:\n  fleet:\n    type: generator\n    nodes: {nodes}\n    speed: max\n    duration: {heartbeats_minutes}m\n    failure_rate: 0\n    seed: 3\n{inference}\
         operators:\n  health:\n    type: node_health\n    input: fleet\n{infer_op}\
         sinks:\n  changes:\n    type: file\n    input: health\n    path: {}\n{infer_sink}",
        dir.join("changes.jsonl").display()
    );
    let pipeline = load_str(&yaml, "stall.yaml", &|_| None).unwrap_or_else(|problems| panic!("{problems}"));
    let metrics = Arc::new(Metrics::new());
    let options = RunOptions::default();
    let stop = options.stop.clone();
    let watched = metrics.clone();
    // Watch the heartbeat count; once all are read and processed, stop the (endless) requests.
    let watcher = std::thread::spawn(move || {
        let read = watched.source_records.get_or_create(&labels::Source { source: "fleet".to_owned() }).clone();
        // The clock starts with the first heartbeat read, after the models have loaded.
        while read.get() == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        let start = Instant::now();
        let compute = || model_busy_seconds(&watched, "anomaly");
        let compute_at_start = compute();
        loop {
            if read.get() >= total || start.elapsed() > Duration::from_secs(300) {
                let elapsed = start.elapsed().as_secs_f64();
                let busy = (compute() - compute_at_start) / elapsed;
                stop.store(true, Ordering::Relaxed);
                return (elapsed, busy);
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    });
    let runner = std::thread::spawn(move || run(&pipeline, &options, metrics));
    let (elapsed, busy) = watcher.join().expect("watcher");
    runner.join().expect("runner").expect("the pipeline runs");
    (total as f64 / elapsed, with_inference.then_some(busy))
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let parts: Vec<String> = std::env::args().skip(1).filter(|arg| !arg.starts_with("--")).collect();
    let wanted = |part: &str| parts.is_empty() || parts.iter().any(|p| p == part);
    let (rows, seconds, rounds) = if full { (1_000_000u64, 3.0, 3) } else { (20_000, 0.2, 1) };
    let closed_rounds = if full { 5 } else { 1 };
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("results.jsonl");
    let arrow_out = dir.path().join("results.arrows");

    println!("## Batch 64, closed loop ({rows} rows of 64 floats, MLP 64-256-256-16, 1 ORT thread)\n");
    // Rounds interleave the variants, so that a noisy moment of this shared machine does not
    // fall on one variant only; each engine run is compared with the bare run of its round.
    let (mut bare, mut columns, mut engine) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..closed_rounds {
        bare.push(bare_ort(64, seconds));
        columns.push(closed_loop(64, rows, &arrow_out, Format::Arrow));
        engine.push(closed_loop(64, rows, &out, Format::Jsonl));
    }
    let ratios = |engine: &[f64]| median(engine.iter().zip(&bare).map(|(e, b)| e / b).collect());
    let (columns_ratio, engine_ratio) = (ratios(&columns), ratios(&engine));
    let (bare, columns, engine) = (median(bare), median(columns), median(engine));
    let python = python_ort(64, seconds);
    println!("| variant | rows/s | vs bare ort |");
    println!("| --- | ---: | ---: |");
    println!("| bare `ort` Session::run loop, batch 64 | {bare:.0} | 1.00 |");
    println!(
        "| engine: requests -> inference (batch 64) -> file, `format: arrow` | {columns:.0} | {columns_ratio:.2} |"
    );
    println!("| engine: requests -> inference (batch 64) -> file, JSON lines | {engine:.0} | {engine_ratio:.2} |");
    match python {
        Some(python) => {
            println!("| Python onnxruntime InferenceSession.run, batch 64 | {python:.0} | {:.2} |", python / bare)
        }
        None => println!("| Python onnxruntime | (not run: .venv missing) | |"),
    }
    println!(
        "\nengine overhead (median of the rounds' ratios): {:.1}% writing Arrow, {:.1}% writing JSON lines (target: at most 15%)\n",
        (1.0 - columns_ratio) * 100.0,
        (1.0 - engine_ratio) * 100.0
    );

    if wanted("open") {
        open_loops(engine, rows, full, &out);
    }
    if wanted("stall") {
        stall(full, rounds, dir.path());
    }
}

/// Part 2: the open loop at fractions of the closed loop's rate `engine`.
fn open_loops(engine: f64, rows: u64, full: bool, out: &Path) {
    let batch_one = closed_loop(1, rows / 10, out, Format::Jsonl);
    println!("## Open loop: single requests at a fixed rate, latency = result time - due time\n");
    println!("engine maximum: {engine:.0} requests/s at batch 64, {batch_one:.0} at batch 1\n");
    println!("| rate (req/s) | batching | achieved req/s | p50 ms | p99 ms | statuses |");
    println!("| ---: | --- | ---: | ---: | ---: | --- |");
    let window = if full { 5.0 } else { 0.5 };
    for rate in [(engine / 2.0).round(), (engine / 4.0).round(), (batch_one * 0.9).round()] {
        for (batch, label) in [(64, "dynamic (64, 2 ms)"), (1, "none (batch 1)")] {
            let (achieved, p50, p99, statuses) = open_loop(rate, window, batch, out);
            println!("| {rate:.0} | {label} | {achieved:.0} | {p50:.2} | {p99:.2} | {statuses:?} |");
        }
    }
}

/// Part 3: node_health alone and beside a busy inference operator.
fn stall(full: bool, rounds: usize, dir: &Path) {
    println!("\n## node_health beside busy inference on the same worker\n");
    let minutes = if full { 60 } else { 5 };
    // Interleaved rounds, each run beside compared with the run alone of its round.
    let (mut alone, mut beside, mut busy, mut ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let by_itself = node_health_rate(minutes, false, dir).0;
        let (with_inference, model_busy) = node_health_rate(minutes, true, dir);
        ratios.push(with_inference / by_itself);
        alone.push(by_itself);
        beside.push(with_inference);
        busy.push(model_busy.unwrap_or(0.0));
    }
    let (alone, beside, busy, ratio) = (median(alone), median(beside), median(busy), median(ratios));
    println!("| variant | heartbeats/s | vs alone | model thread busy |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| node_health alone (1 worker) | {alone:.0} | 1.00 | |");
    println!("| node_health + inference on the same worker | {beside:.0} | {ratio:.2} | {:.0}% |", busy * 100.0);
}

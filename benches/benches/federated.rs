//! FedAvg over 100 clients x 1,000,000 f32 parameters, side by side in one run:
//!
//! - **Flower**: `flwr.server.strategy.aggregate.aggregate` (PyPI `flwr`) on the same arrays
//!   (`benches/flower_fedavg.py`), timed around the call;
//! - **plain sum**: a single-threaded loop adding the arrays into one, the memory-bandwidth
//!   baseline (no weighting);
//! - **edgeflow**: the streaming `RoundAggregate` (example-weighted, f64 accumulator) fed one
//!   update at a time as they would arrive, then `finish` and the server step. The throughput
//!   counts everything; "after the last update" is the time from the last update's arrival
//!   (its `add` done) to the new global model.
//!
//! Run: `cargo bench -p edgeflow-benches --bench federated` (full size, medians of 3). Under
//! `cargo test` it runs once on 10 clients x 100,000 parameters.

use edgeflow_benches::median;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use edgeflow_operators::federated::aggregate::{RoundAggregate, ServerOptimizer, Strategy};

/// The allocator of the `edgeflow` binary, so that the engine runs here as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn update(client: usize, parameters: usize) -> Vec<f32> {
    (0..parameters).map(|i| ((i * 7919 + client * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let (clients, parameters, rounds) = if full { (100, 1_000_000, 3) } else { (10, 100_000, 1) };
    let updates: Vec<Vec<f32>> = (0..clients).map(|c| update(c, parameters)).collect();
    let total_values = (clients * parameters) as f64;

    let mut plain = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        let mut sum = vec![0.0f32; parameters];
        for update in &updates {
            for (s, v) in sum.iter_mut().zip(update) {
                *s += v;
            }
        }
        std::hint::black_box(&sum);
        plain.push(start.elapsed().as_secs_f64());
    }

    let mut whole = Vec::new();
    let mut after_last = Vec::new();
    let mut checksum = 0.0;
    for _ in 0..rounds {
        let mut model = vec![0.0f32; parameters];
        let mut server = ServerOptimizer::new(Strategy::FedAvg, parameters);
        let start = Instant::now();
        let mut round = RoundAggregate::new(Strategy::FedAvg, parameters);
        for (client, update) in updates.iter().enumerate() {
            round.add(update, 100 + client as u64).expect("same length");
        }
        let last = Instant::now();
        let delta = round.finish().expect("updates");
        server.apply(&mut model, &delta);
        after_last.push(last.elapsed().as_secs_f64());
        whole.push(start.elapsed().as_secs_f64());
        checksum = model[..1000].iter().map(|v| f64::from(*v)).sum();
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("flower_fedavg.py");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let flower = Command::new(python)
        .arg(script)
        .args([clients.to_string(), parameters.to_string(), rounds.to_string()])
        .output()
        .ok()
        .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok());

    let (plain, whole, after_last) = (median(plain), median(whole), median(after_last));
    println!("## FedAvg, {clients} clients x {parameters} f32 parameters (median of {rounds})\n");
    println!("| variant | seconds | parameters/s | vs Flower |");
    println!("| --- | ---: | ---: | ---: |");
    let flower_seconds = flower.as_ref().and_then(|f| f["seconds"].as_f64());
    let ratio = |seconds: f64| flower_seconds.map_or("".to_owned(), |f| format!("{:.2}x", f / seconds));
    match (&flower, flower_seconds) {
        (Some(flower), Some(seconds)) => {
            println!("| Flower `aggregate` (numpy) | {seconds:.3} | {:.0} | 1.00x |", total_values / seconds);
            let theirs = flower["checksum"].as_f64().unwrap_or(f64::NAN);
            assert!(
                (theirs - checksum).abs() < 1e-3 * (1.0 + theirs.abs()),
                "same aggregate: Flower {theirs}, edgeflow {checksum}"
            );
        }
        _ => println!("| Flower | (not run: .venv with flwr missing) | | |"),
    }
    println!(
        "| plain single-threaded sum (bandwidth baseline) | {plain:.3} | {:.0} | {} |",
        total_values / plain,
        ratio(plain)
    );
    println!(
        "| edgeflow streaming FedAvg, all updates + finish | {whole:.3} | {:.0} | {} |",
        total_values / whole,
        ratio(whole)
    );
    println!("\nafter the last update: {:.2} ms to the new model", after_last * 1000.0);
    if let Some(seconds) = flower_seconds {
        println!(
            "= {:.2}% of Flower's whole aggregation (target: at most 5%); throughput {:.2}x Flower's (target: at least 1.5x)",
            after_last / seconds * 100.0,
            seconds / whole
        );
    }
}

//! Runs node health over a simulated fleet from Rust, without a YAML file on disk.
//!
//!     cargo run --release --example fleet_health
//!
//! 500 nodes, one hour of event time as fast as the machine allows, on 2 workers; status
//! changes go to `fleet-changes.jsonl` in the system's temporary directory, and the metrics
//! registry is read at the end.

use std::sync::Arc;

use edgeflow_engine::config::load_str;
use edgeflow_engine::metrics::Metrics;
use edgeflow_engine::runtime::{run, RunOptions};

fn main() -> anyhow::Result<()> {
    let out = std::env::temp_dir().join("fleet-changes.jsonl");
    let yaml = format!(
        r#"
name: example
sources:
  fleet:
    type: generator
    nodes: 500
    speed: max
    duration: 1h
    failure_rate: 0.01
operators:
  health:
    type: node_health
    input: fleet
sinks:
  changes:
    type: file
    input: health.changes
    path: {}
"#,
        out.display()
    );
    let pipeline = load_str(&yaml, "example.yaml", &|name| std::env::var(name).ok()).map_err(anyhow::Error::msg)?;
    let metrics = Arc::new(Metrics::new());
    run(&pipeline, &RunOptions { workers: 2, ..RunOptions::default() }, metrics.clone())?;
    let changes = std::fs::read_to_string(&out)?.lines().count();
    println!("{} heartbeats read, {changes} status changes written to {}", metrics.records_total.get(), out.display());
    Ok(())
}

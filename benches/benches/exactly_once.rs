//! Exactly once against at-least-once on Apache Kafka: the `Kafka -> node_health -> Kafka`
//! pipeline (status changes and rollups produced back) on 2 workers, run alternately on the
//! same broker and topic in one run:
//!
//! - `at-least-once`: no checkpoints, idempotent producer, offsets committed after delivery
//!   (the baseline);
//! - `at-least-once, checkpoints every 1s`: the cost of checkpoints alone;
//! - `exactly once, checkpoints every 10s` and `every 1s`: each interval's output in a
//!   Kafka transaction committed after its checkpoint is durable.
//!
//! Each is timed from its first record to the end of its run (outputs delivered or
//! committed), so the consumer group's join is not counted; reported as messages per second
//! and as the ratio to at-least-once.
//!
//! Run: `cargo bench -p edgeflow-benches --bench exactly_once` (2,000 nodes for 260 minutes:
//! 997,922 heartbeats; 3 rounds, medians). Under `cargo test` it runs once on a small fleet as a
//! smoke test. It starts Apache Kafka (KRaft, one broker on loopback; the jars from
//! `EDGEFLOW_KAFKA_LIBS` or `.kafka/libs`, as `scripts/setup.sh test` installs them).

#[path = "../../engine/tests/common/apache_kafka.rs"]
mod apache_kafka;

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use edgeflow_benches::{fleet_config, fleet_heartbeats, median, produce_heartbeats, run_timed};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::ClientConfig;

/// The allocator of the `edgeflow` binary, so that the engine runs here as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
const PARTITIONS: i32 = 4;

/// The broker process, stopped when dropped.
struct Broker {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Broker {
    fn start() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let (child, address, dir) = apache_kafka::start(&apache_kafka::libs(&root));
        Self { child, address, _dir: dir }
    }

    fn create_topics(&self, topics: &[(&str, i32)]) {
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.address).create().expect("admin client");
        let topics: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        for result in runtime.block_on(admin.create_topics(&topics, &options)).expect("topics created") {
            result.unwrap_or_else(|(name, err)| panic!("topic {name} not created: {err}"));
        }
    }
}

/// One variant: its checkpoint interval, if any, and whether its sinks are exactly once.
struct Variant {
    name: &'static str,
    interval: Option<&'static str>,
    exactly_once: bool,
}

const VARIANTS: [Variant; 4] = [
    Variant { name: "at-least-once (baseline)", interval: None, exactly_once: false },
    Variant { name: "at-least-once, checkpoints every 1s", interval: Some("1s"), exactly_once: false },
    Variant { name: "exactly once, checkpoints every 10s", interval: Some("10s"), exactly_once: true },
    Variant { name: "exactly once, checkpoints every 1s", interval: Some("1s"), exactly_once: true },
];

/// Seconds from the engine's first record to the end of its run of `variant`, as `run` (a
/// fresh group, transactional id and checkpoint directory).
fn engine(broker: &Broker, variant: &Variant, run_name: &str, total: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let checkpoint = variant.interval.map_or_else(String::new, |interval| {
        format!("checkpoint:\n  dir: {}\n  interval: {interval}\n", dir.path().display())
    });
    let eos = if variant.exactly_once { "    exactly_once: true\n" } else { "" };
    let yaml = format!(
        "name: {run_name}\nmetrics:\n  enabled: false\n{checkpoint}sources:\n  beats:\n    type: kafka\n    brokers: {b}\n    topics: [beats]\n    group: {run_name}\n    stop_at_end: true\n    max_out_of_orderness: 10s\noperators:\n  health:\n    type: node_health\n    input: beats\nsinks:\n  changes:\n    type: kafka\n    brokers: {b}\n    topic: changes\n    input: health.changes\n{eos}  rollups:\n    type: kafka\n    brokers: {b}\n    topic: rollups\n    key: region\n    input: health.rollups\n{eos}",
        b = broker.address
    );
    let (seconds, metrics) = run_timed(&yaml, "exactly-once-bench.yaml", 2);
    // In a consumer group (no checkpoints) the second worker's join moves partitions, and
    // messages read but not yet committed are read again: at least once.
    let read = metrics.records_total.get();
    if variant.interval.is_some() {
        assert_eq!(read, total as u64, "{}: the engine read every message once", variant.name);
    } else {
        assert!(read >= total as u64, "{}: the engine read {read} of {total} messages", variant.name);
    }
    if variant.exactly_once {
        assert!(metrics.checkpoints.completed.get() > 0, "{}: no checkpoint completed", variant.name);
    }
    seconds
}

fn main() {
    // The engine's warnings (a slow checkpoint names what it waits for) on stderr.
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGEFLOW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let full = std::env::args().any(|arg| arg == "--bench");
    let (nodes, minutes, rounds) = if full { (2000, 260, 3) } else { (50, 10, 1) };
    let heartbeats = fleet_heartbeats(&fleet_config(nodes, minutes));
    let total = heartbeats.len();
    let broker = Broker::start();
    broker.create_topics(&[("beats", PARTITIONS), ("changes", 2), ("rollups", 1)]);
    produce_heartbeats(&broker.address, "beats", &heartbeats);

    // Rounds interleave the variants so that the broker's state is alike for each.
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for (index, variant) in VARIANTS.iter().enumerate() {
            eprintln!("running {} (round {round})", variant.name);
            times[index].push(engine(&broker, variant, &format!("eos-bench-{round}-{index}"), total));
        }
    }
    let baseline = median(times[0].clone());
    println!(
        "\nexactly once: {total} heartbeats in {PARTITIONS} partitions (Apache Kafka on loopback), 2 workers; median of {rounds} round(s)\n"
    );
    println!("| variant | seconds | messages/s | vs at-least-once |");
    println!("| --- | ---: | ---: | ---: |");
    for (variant, times) in VARIANTS.iter().zip(times) {
        let seconds = median(times);
        println!("| {} | {seconds:.3} | {:.0} | {:.2} |", variant.name, total as f64 / seconds, baseline / seconds);
    }
}

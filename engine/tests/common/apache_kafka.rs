//! Apache Kafka in KRaft mode (one process as controller and broker, replication 1,
//! transactions on) on free loopback ports, for the tests and the benchmarks (which include
//! this file by its path). Its jars come from `EDGEFLOW_KAFKA_LIBS` or the project's
//! `.kafka/libs` (`scripts/setup.sh test` resolves them with Maven).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// The cluster id every broker is formatted with (a fixed base64 UUID: each broker has a
/// log directory of its own).
const CLUSTER_ID: &str = "7MzZfJ0BRpe1RBSGkg5tXw";

/// Apache Kafka's jars, from `EDGEFLOW_KAFKA_LIBS` or `ROOT/.kafka/libs`.
pub fn libs(root: &Path) -> PathBuf {
    let libs = std::env::var_os("EDGEFLOW_KAFKA_LIBS").map_or_else(|| root.join(".kafka/libs"), PathBuf::from);
    assert!(
        libs.join("kafka_2.13-4.1.1.jar").exists(),
        "Apache Kafka is missing from `{}`: run scripts/setup.sh test (it resolves org.apache.kafka:kafka_2.13 with Maven) or set EDGEFLOW_KAFKA_LIBS",
        libs.display()
    );
    libs
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts a broker with the jars in `libs`: its process (the caller stops it), its address,
/// and its log directory (removed when dropped). Ready once it answers a metadata request.
pub fn start(libs: &Path) -> (Child, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (port, controller) = (free_port(), free_port());
    let address = format!("127.0.0.1:{port}");
    let properties = dir.path().join("server.properties");
    std::fs::write(
        &properties,
        format!(
            "process.roles=broker,controller\nnode.id=1\ncontroller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://{address},CONTROLLER://127.0.0.1:{controller}\nadvertised.listeners=PLAINTEXT://{address}\n\
             controller.listener.names=CONTROLLER\nlistener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\nlog.dirs={}\nnum.partitions=1\noffsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=4\ntransaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=4\ngroup.initial.rebalance.delay.ms=0\nauto.create.topics.enable=false\n",
            dir.path().join("log").display()
        ),
    )
    .unwrap();
    let classpath = format!("{}/*", libs.display());
    let java = |args: &[&str]| {
        let mut command = Command::new("java");
        command.args(["-Xmx512m", "-XX:+UseSerialGC", "-cp", &classpath]).args(args);
        command
    };
    let format = java(&["kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c"])
        .arg(&properties)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("java runs Kafka's storage tool");
    assert!(format.success(), "kafka-storage format failed");
    let mut child = java(&["kafka.Kafka"])
        .arg(&properties)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("java starts Apache Kafka");
    // Ready: the broker answers a metadata request (its port opens a little earlier).
    let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &address).create().unwrap();
    let start = Instant::now();
    while client.fetch_metadata(None, Duration::from_secs(2)).map_or(true, |m| m.brokers().is_empty()) {
        if start.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("Apache Kafka did not start on {address}");
        }
    }
    (child, address, dir)
}

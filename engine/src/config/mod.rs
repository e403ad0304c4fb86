//! Pipeline configuration: the YAML shape, loading with `${VAR:-default}` substitution, and
//! validation that collects every problem, each with its YAML path and line:column, before
//! anything starts.

pub mod env;
mod load;
pub mod schema;
pub mod yaml;

use std::fmt;
use std::net::SocketAddr;

use edgeflow_connectors::dead_letter::DeadLetterSinkConfig;
pub use edgeflow_connectors::file::FileFormat;
use edgeflow_connectors::file::{FileSinkConfig, FileSourceConfig};
use edgeflow_connectors::generator::{GeneratorConfig, RequestGeneratorConfig};
use edgeflow_connectors::kafka::{KafkaSinkConfig, KafkaSourceConfig};
use edgeflow_connectors::stdout::StdoutSinkConfig;
use edgeflow_operators::federated::config::FederatedConfig;
use edgeflow_operators::inference::InferenceConfig;
use edgeflow_operators::load_balance::LoadBalanceConfig;
use edgeflow_operators::node_health::NodeHealthConfig;
use edgeflow_operators::window_aggregate::WindowAggregateConfig;
use edgeflow_operators::RecordKind;
use serde::{Deserialize, Serialize};

pub use load::{load_file, load_str};
pub use yaml::Mark;

/// What happens to a record whose event time is behind its source's watermark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LatePolicy {
    /// Drop it and count it (`edgeflow_late_records_total`).
    #[default]
    Drop,
    /// Send it to the dead-letter output with the reason, and count it.
    DeadLetter,
    /// Apply it at the current watermark: collections retract the old value and show the new
    /// one; closed windows emit a corrected result with a higher `revision`.
    Update,
}

impl LatePolicy {
    /// The name used in YAML and in metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            LatePolicy::Drop => "drop",
            LatePolicy::DeadLetter => "dead_letter",
            LatePolicy::Update => "update",
        }
    }
}

/// Where the metrics and health endpoints listen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of `/metrics`, `/health` and `/ready` (default `127.0.0.1:9898`; port 0
    /// picks a free port, printed at start).
    #[serde(default = "default_metrics_address")]
    pub address: String,
    /// Serve the endpoints at all (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_metrics_address() -> String {
    "127.0.0.1:9898".into()
}
fn default_true() -> bool {
    true
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { address: default_metrics_address(), enabled: true }
    }
}

impl MetricsConfig {
    /// The parsed listen address.
    pub fn socket_addr(&self) -> Result<SocketAddr, String> {
        self.address
            .parse()
            .map_err(|_| format!("`{}` is not a socket address; write for example `127.0.0.1:9898`", self.address))
    }
}

/// The kind of records a port carries; inputs are type-checked against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortKind {
    /// Heartbeat records.
    Heartbeats,
    /// Updates of the live node-status collection.
    NodeStatus,
    /// Status changes.
    StatusChanges,
    /// Region rollups.
    RegionRollups,
    /// Window results.
    WindowResults,
    /// Dead letters.
    DeadLetters,
    /// Inference requests.
    InferenceRequests,
    /// Inference results.
    InferenceResults,
    /// Federated round reports.
    FederatedRounds,
    /// Global model versions.
    GlobalModels,
    /// Federated client updates.
    ModelUpdates,
    /// Federated round plans.
    RoundPlans,
    /// Messages as raw bytes (`format: raw`).
    RawMessages,
}

impl fmt::Display for PortKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortKind::Heartbeats => "heartbeats",
            PortKind::NodeStatus => "node status updates",
            PortKind::StatusChanges => "status changes",
            PortKind::RegionRollups => "region rollups",
            PortKind::WindowResults => "window results",
            PortKind::DeadLetters => "dead letters",
            PortKind::InferenceRequests => "inference requests",
            PortKind::InferenceResults => "inference results",
            PortKind::FederatedRounds => "federated round reports",
            PortKind::GlobalModels => "global models",
            PortKind::ModelUpdates => "model updates",
            PortKind::RoundPlans => "round plans",
            PortKind::RawMessages => "raw messages",
        })
    }
}

/// A reference to a component's output: `fleet`, `health.changes`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRef {
    /// The component.
    pub component: String,
    /// The output port; `None` for a component's only (or main) output.
    pub port: Option<String>,
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.port {
            Some(port) => write!(f, "{}.{}", self.component, port),
            None => f.write_str(&self.component),
        }
    }
}

/// A source's type and settings.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceConfig {
    /// Synthetic fleet.
    Generator(GeneratorConfig),
    /// JSON lines file.
    File(FileSourceConfig),
    /// Kafka topics.
    Kafka(KafkaSourceConfig),
    /// Open-loop inference requests.
    Requests(RequestGeneratorConfig),
}

impl SourceConfig {
    /// The type name used in YAML.
    pub fn type_name(&self) -> &'static str {
        match self {
            SourceConfig::Generator(_) => "generator",
            SourceConfig::File(_) => "file",
            SourceConfig::Kafka(_) => "kafka",
            SourceConfig::Requests(_) => "requests",
        }
    }

    /// The kind of records the source yields.
    pub fn records(&self) -> RecordKind {
        match self {
            SourceConfig::Generator(_) => RecordKind::Heartbeats,
            SourceConfig::File(c) => c.records,
            SourceConfig::Kafka(c) => c.records,
            SourceConfig::Requests(_) => RecordKind::InferenceRequests,
        }
    }

    /// Whether the source passes messages through as raw bytes (`format: raw`).
    pub fn is_raw(&self) -> bool {
        matches!(self, SourceConfig::Kafka(c) if c.format == edgeflow_connectors::kafka::KafkaFormat::Raw)
    }

    /// The port kind of the source's main output.
    pub fn port_kind(&self) -> PortKind {
        if self.is_raw() {
            return PortKind::RawMessages;
        }
        match self.records() {
            RecordKind::Heartbeats => PortKind::Heartbeats,
            RecordKind::InferenceRequests => PortKind::InferenceRequests,
            RecordKind::ModelUpdates => PortKind::ModelUpdates,
        }
    }

    /// Maximum out-of-orderness of the source's watermark, ms.
    pub fn max_out_of_orderness(&self) -> u64 {
        match self {
            SourceConfig::Generator(c) => c.max_out_of_orderness.as_millis(),
            SourceConfig::File(c) => c.max_out_of_orderness.as_millis(),
            SourceConfig::Kafka(c) => c.max_out_of_orderness.as_millis(),
            SourceConfig::Requests(c) => c.max_out_of_orderness.as_millis(),
        }
    }

    /// Idle timeout, ms.
    pub fn idle_timeout(&self) -> u64 {
        match self {
            SourceConfig::Generator(c) => c.idle_timeout.as_millis(),
            SourceConfig::File(c) => c.idle_timeout.as_millis(),
            SourceConfig::Kafka(c) => c.idle_timeout.as_millis(),
            // Requests are due by the wall clock: the generator never idles behind it.
            SourceConfig::Requests(c) => c.max_out_of_orderness.as_millis(),
        }
    }
}

/// An operator's type and settings.
#[derive(Clone, Debug, PartialEq)]
pub enum OperatorConfig {
    /// Node health.
    NodeHealth(NodeHealthConfig),
    /// Event-time windows.
    WindowAggregate(WindowAggregateConfig),
    /// Batched ONNX inference.
    Inference(InferenceConfig),
    /// Placement of inference requests on edge nodes.
    LoadBalance(LoadBalanceConfig),
    /// Federated training over simulated or external clients.
    Federated(Box<FederatedConfig>),
}

impl OperatorConfig {
    /// The type name used in YAML.
    pub fn type_name(&self) -> &'static str {
        match self {
            OperatorConfig::NodeHealth(_) => "node_health",
            OperatorConfig::WindowAggregate(_) => "window_aggregate",
            OperatorConfig::Inference(_) => "inference",
            OperatorConfig::LoadBalance(_) => "load_balance",
            OperatorConfig::Federated(_) => "federated",
        }
    }

    /// The port kinds the operator reads.
    pub fn accepts(&self) -> &'static [PortKind] {
        match self {
            OperatorConfig::NodeHealth(_) | OperatorConfig::WindowAggregate(_) => &[PortKind::Heartbeats],
            OperatorConfig::Inference(_) => &[PortKind::InferenceRequests, PortKind::Heartbeats],
            OperatorConfig::LoadBalance(_) => {
                &[PortKind::InferenceRequests, PortKind::StatusChanges, PortKind::Heartbeats]
            }
            OperatorConfig::Federated(_) => &[PortKind::ModelUpdates, PortKind::StatusChanges, PortKind::Heartbeats],
        }
    }
}

/// A sink's type and settings.
#[derive(Clone, Debug, PartialEq)]
pub enum SinkConfig {
    /// Standard output.
    Stdout(StdoutSinkConfig),
    /// JSON lines file, or an Arrow IPC stream of inference results.
    File(FileSinkConfig),
    /// Dead-letter file or topic.
    DeadLetter(DeadLetterSinkConfig),
    /// Kafka topic.
    Kafka(KafkaSinkConfig),
}

impl SinkConfig {
    /// The Kafka producer settings of a sink that writes to Kafka (a `kafka` sink or a
    /// `dead_letter` sink with `kafka`).
    pub fn kafka(&self) -> Option<&KafkaSinkConfig> {
        match self {
            SinkConfig::Kafka(config) => Some(config),
            SinkConfig::DeadLetter(config) => config.kafka.as_ref(),
            SinkConfig::Stdout(_) | SinkConfig::File(_) => None,
        }
    }

    /// Whether the sink takes inference results as records rather than JSON lines, to
    /// write them in a format of its own (a `file` sink with `format: arrow`); it then takes
    /// nothing else.
    pub fn takes_results(&self) -> bool {
        matches!(self, SinkConfig::File(file) if file.format == FileFormat::Arrow)
    }

    /// The type name used in YAML.
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkConfig::Stdout(_) => "stdout",
            SinkConfig::File(_) => "file",
            SinkConfig::DeadLetter(_) => "dead_letter",
            SinkConfig::Kafka(_) => "kafka",
        }
    }
}

/// A named source.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceSpec {
    /// Its name.
    pub name: String,
    /// Its settings.
    pub config: SourceConfig,
}

/// A named operator and its inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct OperatorSpec {
    /// Its name.
    pub name: String,
    /// What it reads.
    pub inputs: Vec<PortRef>,
    /// Its settings.
    pub config: OperatorConfig,
}

/// A named sink and its inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkSpec {
    /// Its name.
    pub name: String,
    /// What it writes.
    pub inputs: Vec<PortRef>,
    /// Its settings.
    pub config: SinkConfig,
}

impl Pipeline {
    /// The transactional id when the pipeline runs exactly once (a Kafka sink asks for it;
    /// validation has checked that the whole pipeline can), else `None`.
    pub fn exactly_once(&self) -> Option<String> {
        self.sinks.iter().find_map(|sink| match &sink.config {
            SinkConfig::Kafka(config) if config.exactly_once => {
                Some(config.transactional_id.clone().unwrap_or_else(|| format!("edgeflow-{}", self.name)))
            }
            _ => None,
        })
    }
}

/// A validated pipeline, ready to run.
#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    /// Name, for logs and metrics.
    pub name: String,
    /// Late-record policy.
    pub late_policy: LatePolicy,
    /// Metrics endpoint.
    pub metrics: MetricsConfig,
    /// Sources, in written order.
    pub sources: Vec<SourceSpec>,
    /// Operators, in an order where every operator comes after its inputs.
    pub operators: Vec<OperatorSpec>,
    /// Sinks, in written order.
    pub sinks: Vec<SinkSpec>,
}

/// The output ports of an operator type, the first being its main output.
pub fn operator_outputs(config: &OperatorConfig) -> &'static [(&'static str, PortKind)] {
    match config {
        OperatorConfig::NodeHealth(_) => &[
            ("changes", PortKind::StatusChanges),
            ("status", PortKind::NodeStatus),
            ("rollups", PortKind::RegionRollups),
        ],
        OperatorConfig::WindowAggregate(_) => &[("results", PortKind::WindowResults)],
        OperatorConfig::Inference(_) => &[("results", PortKind::InferenceResults)],
        OperatorConfig::LoadBalance(_) => {
            &[("requests", PortKind::InferenceRequests), ("unplaced", PortKind::InferenceResults)]
        }
        OperatorConfig::Federated(_) => &[
            ("rounds", PortKind::FederatedRounds),
            ("models", PortKind::GlobalModels),
            ("plans", PortKind::RoundPlans),
            ("rejected", PortKind::DeadLetters),
        ],
    }
}

/// One problem found in a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted YAML path, e.g. `sources.fleet.heartbeat_interval`.
    pub path: String,
    /// Where it was written.
    pub mark: Mark,
    /// What is wrong (first line) and details or a hint (further lines).
    pub message: String,
}

/// Every problem of a pipeline file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problems {
    /// The file, as given.
    pub file: String,
    /// The problems, sorted by position.
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for problem in &self.problems {
            let mut lines = problem.message.lines();
            writeln!(f, "error: {}", lines.next().unwrap_or_default())?;
            writeln!(f, "  --> {}:{}", self.file, problem.mark)?;
            if !problem.path.is_empty() {
                writeln!(f, "   = at: {}", problem.path)?;
            }
            for line in lines {
                writeln!(f, "   = {line}")?;
            }
        }
        let count = self.problems.len();
        write!(f, "{}: {count} problem{} found; nothing was started", self.file, if count == 1 { "" } else { "s" })
    }
}

impl std::error::Error for Problems {}

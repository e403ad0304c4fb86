//! Pipeline configuration: the YAML shape, loading with `${VAR:-default}` substitution, and
//! validation that collects every problem, each with its YAML path and line:column, before
//! anything starts.

pub mod env;
mod load;
pub mod schema;
pub mod serve;
pub mod yaml;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

pub use edgeflow_connectors::file::FileFormat;
use edgeflow_operators::RecordKind;
use serde::{Deserialize, Serialize};

pub use load::{load_file, load_str};
pub use yaml::{Mark, Node};

use crate::components::{OperatorComponent, Ports, SinkComponent, SourceComponent};

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
    pub fn socket_addr(&self) -> Result<SocketAddr, AddressError> {
        self.address.parse().map_err(|_| AddressError(self.address.clone()))
    }
}

/// A listen address that is not `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a socket address; write for example `127.0.0.1:9898`")]
pub struct AddressError(pub String);

impl MetricsConfig {}

/// `checkpoint:`: where and how often the pipeline's state is saved. Checkpoints are on when
/// `dir` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Directory of the checkpoints, relative to the pipeline file; created if missing. Every
    /// process of a cluster must see the same directory.
    pub dir: Option<PathBuf>,
    /// Time between the starts of two checkpoints (default 10s).
    #[serde(default = "default_checkpoint_interval")]
    pub interval: edgeflow_operators::DurationMs,
    /// Complete checkpoints kept; older ones are pruned (default 3, at least 2).
    #[serde(default = "default_checkpoint_keep")]
    pub keep: usize,
}

fn default_checkpoint_interval() -> edgeflow_operators::DurationMs {
    edgeflow_operators::DurationMs::from_secs(10)
}
fn default_checkpoint_keep() -> usize {
    3
}

/// Checkpoints of a pipeline, checked: on, in `dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpointing {
    /// Directory of the checkpoints (resolved against the pipeline file).
    pub dir: PathBuf,
    /// Time between the starts of two checkpoints.
    pub interval: std::time::Duration,
    /// Complete checkpoints kept.
    pub keep: usize,
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

impl PortKind {
    /// The port kind of a source yielding `records`.
    pub const fn of_records(records: RecordKind) -> Self {
        match records {
            RecordKind::Heartbeats => PortKind::Heartbeats,
            RecordKind::InferenceRequests => PortKind::InferenceRequests,
            RecordKind::ModelUpdates => PortKind::ModelUpdates,
        }
    }
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

/// A named component of a pipeline, checked: its type in the registry, its ports, what it
/// reads (empty for sources) and the component. `R` is the role's trait object.
#[derive(Debug)]
pub struct Spec<R: ?Sized + 'static> {
    /// Its name.
    pub name: String,
    /// Its type in the registry.
    pub kind: &'static dyn crate::components::ComponentType<R>,
    /// Its ports.
    pub ports: Ports,
    /// What it reads.
    pub inputs: Vec<PortRef>,
    /// The checked component.
    pub component: Arc<R>,
}

impl<R: ?Sized + 'static> Clone for Spec<R> {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            kind: self.kind,
            ports: self.ports,
            inputs: self.inputs.clone(),
            component: self.component.clone(),
        }
    }
}

/// A named source.
pub type SourceSpec = Spec<dyn SourceComponent>;
/// A named operator and its inputs.
pub type OperatorSpec = Spec<dyn OperatorComponent>;
/// A named sink and its inputs.
pub type SinkSpec = Spec<dyn SinkComponent>;

impl Pipeline {
    /// The transactional id when the pipeline runs exactly once (a Kafka sink asks for it;
    /// validation has checked that the whole pipeline can), else `None`.
    pub fn exactly_once(&self) -> Option<String> {
        self.sinks.iter().find_map(|sink| sink.component.exactly_once(&self.name))
    }
}

/// A validated pipeline, ready to run: every component's parameters are checked.
#[derive(Clone, Debug)]
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
    /// Checkpoints, when on.
    pub checkpoint: Option<Checkpointing>,
    /// Live tables served over Flight SQL, when on.
    pub serve: Option<serve::Serving>,
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

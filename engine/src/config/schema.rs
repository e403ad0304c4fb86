//! JSON Schema of the pipeline YAML, generated from the configuration structs (their doc
//! comments become descriptions), for editors and for the README's reference.

use edgeflow_connectors::dead_letter::DeadLetterSinkConfig;
use edgeflow_connectors::file::{FileSinkConfig, FileSourceConfig};
use edgeflow_connectors::generator::GeneratorConfig;
use edgeflow_connectors::stdout::StdoutSinkConfig;
use edgeflow_operators::node_health::NodeHealthConfig;
use edgeflow_operators::window_aggregate::WindowAggregateConfig;
use schemars::JsonSchema;
use serde::Serialize;
use std::collections::BTreeMap;

use super::{LatePolicy, MetricsConfig};

/// Where an operator or sink reads from: `input: NAME` or `inputs: [NAME, ...]`, where NAME
/// is a source, an operator's main output, or `COMPONENT.PORT` (e.g. `health.rollups`,
/// `fleet.dead_letters`).
#[derive(Serialize, JsonSchema)]
#[allow(dead_code)]
struct Inputs {
    /// One input.
    input: Option<String>,
    /// Several inputs, merged.
    inputs: Option<Vec<String>>,
}

/// A source.
#[derive(Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(dead_code)]
enum Source {
    /// A synthetic edge fleet.
    Generator(GeneratorConfig),
    /// Heartbeats from a JSON lines file.
    File(FileSourceConfig),
}

/// An operator's settings.
#[derive(Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(dead_code)]
enum OperatorKind {
    /// Node health: outputs `changes` (main), `status` and `rollups`.
    NodeHealth(NodeHealthConfig),
    /// Event-time windows over a key: output `results`.
    WindowAggregate(WindowAggregateConfig),
}

/// An operator.
#[derive(Serialize, JsonSchema)]
#[allow(dead_code)]
struct Operator {
    #[serde(flatten)]
    kind: OperatorKind,
    #[serde(flatten)]
    inputs: Inputs,
}

/// A sink's settings.
#[derive(Serialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(dead_code)]
enum SinkKind {
    /// JSON lines on standard output.
    Stdout(StdoutSinkConfig),
    /// JSON lines in a file.
    File(FileSinkConfig),
    /// Rejected records with their reason (inputs default to every source's dead letters).
    DeadLetter(DeadLetterSinkConfig),
}

/// A sink.
#[derive(Serialize, JsonSchema)]
#[allow(dead_code)]
struct Sink {
    #[serde(flatten)]
    kind: SinkKind,
    #[serde(flatten)]
    inputs: Inputs,
}

/// An edgeflow pipeline: named sources, operators and sinks wired by their inputs.
/// Scalars may use `${VAR}` and `${VAR:-default}`; unknown keys are errors.
#[derive(Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PipelineFile {
    /// Name of the pipeline, for logs and metrics.
    name: Option<String>,
    /// What happens to records behind the watermark: `drop` (default, counted),
    /// `dead_letter`, or `update`.
    late_policy: Option<LatePolicy>,
    /// The metrics and health endpoints.
    metrics: Option<MetricsConfig>,
    /// Sources by name.
    sources: BTreeMap<String, Source>,
    /// Operators by name.
    operators: Option<BTreeMap<String, Operator>>,
    /// Sinks by name.
    sinks: BTreeMap<String, Sink>,
}

/// The JSON Schema of a pipeline file.
pub fn pipeline_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(PipelineFile)).unwrap_or_default()
}

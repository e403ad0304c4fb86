//! JSON Schema of the pipeline YAML, generated from the configuration structs (their doc
//! comments become descriptions), for editors and for the README's reference.

use edgeflow_connectors::dead_letter::DeadLetterSinkConfig;
use edgeflow_connectors::file::{FileSinkConfig, FileSourceConfig};
use edgeflow_connectors::generator::{GeneratorConfig, RequestGeneratorConfig};
use edgeflow_connectors::kafka::{KafkaSinkConfig, KafkaSourceConfig};
use edgeflow_connectors::stdout::StdoutSinkConfig;
use edgeflow_operators::federated::config::FederatedConfig;
use edgeflow_operators::inference::InferenceConfig;
use edgeflow_operators::load_balance::LoadBalanceConfig;
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
    /// Heartbeats or inference requests from a JSON lines file.
    File(FileSourceConfig),
    /// Heartbeats or inference requests from Kafka topics (consumer group; offsets committed
    /// after the sinks wrote).
    Kafka(KafkaSourceConfig),
    /// An open-loop stream of inference requests at a target rate.
    Requests(RequestGeneratorConfig),
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
    /// Batched ONNX inference of requests (or of heartbeats, with `features`): output
    /// `results`, one per request.
    Inference(InferenceConfig),
    /// Places inference requests on Healthy or Degraded edge nodes: inputs are requests,
    /// `node_health`'s status changes (`HEALTH.changes`) and, for resource- and location-aware
    /// strategies, heartbeats. Outputs `requests` (main, with `node` set) and `unplaced`
    /// (results of requests no node could take; an inference operator reading the balancer
    /// reports them among its results).
    LoadBalance(LoadBalanceConfig),
    /// Federated training, round after round. Without an input its clients are a simulated
    /// fleet and rounds are logical times; with an `input` of model updates (a `file` or
    /// `kafka` source with `records: model_updates`) its clients are outside, read the `plans`
    /// output and a round closes when all answered, on quorum (`close_on_quorum`) or at its
    /// wall-clock `round_timeout`. Outputs `rounds` (main: one report per round), `models`
    /// (each global model version), `plans` (each round's plan with the model to train from)
    /// and `rejected` (refused updates with their reason).
    Federated(Box<FederatedConfig>),
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
    /// JSON lines in a file, or inference results as an Arrow IPC stream (`format: arrow`).
    File(FileSinkConfig),
    /// Rejected records with their reason (inputs default to every source's dead letters).
    DeadLetter(DeadLetterSinkConfig),
    /// Records as JSON messages on a Kafka topic (idempotent producer, zstd).
    Kafka(KafkaSinkConfig),
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

/// The pipeline YAML reference in Markdown, generated from the JSON Schema (and so from the
/// configuration structs' doc comments). The README embeds it; a test keeps the two equal.
pub fn pipeline_reference_markdown() -> String {
    use std::fmt::Write;
    let schema = pipeline_schema();
    let defs = &schema["$defs"];
    let mut out = String::new();
    let _ = writeln!(out, "Top-level keys:\n");
    render_properties(&mut out, &schema, defs, &[]);
    let _ = writeln!(out, "\n`metrics`:\n");
    render_properties(&mut out, &defs["MetricsConfig"], defs, &[]);
    for (section, def, what) in
        [("sources", "Source", "source"), ("operators", "Operator", "operator"), ("sinks", "Sink", "sink")]
    {
        let _ = writeln!(out, "\n### {section}\n");
        for variant in defs[def]["oneOf"].as_array().into_iter().flatten() {
            let type_name = variant["properties"]["type"]["const"].as_str().unwrap_or("?");
            let _ = writeln!(out, "#### {what} `type: {type_name}`\n");
            if let Some(description) = variant["description"].as_str() {
                let _ = writeln!(out, "{}\n", description.replace('\n', " "));
            }
            render_properties(&mut out, variant, defs, &["type"]);
            out.push('\n');
        }
    }
    out
}

fn render_properties(out: &mut String, schema: &serde_json::Value, defs: &serde_json::Value, skip: &[&str]) {
    use std::fmt::Write;
    let required: Vec<&str> =
        schema["required"].as_array().into_iter().flatten().filter_map(serde_json::Value::as_str).collect();
    let _ = writeln!(out, "| key | type | default | description |");
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    let Some(properties) = schema["properties"].as_object() else { return };
    for (name, property) in properties {
        if skip.contains(&name.as_str()) {
            continue;
        }
        let default = match property.get("default") {
            _ if required.contains(&name.as_str()) => "required".to_owned(),
            Some(serde_json::Value::Null) | None => "-".to_owned(),
            Some(value) => format!("`{value}`"),
        };
        let description = property["description"].as_str().unwrap_or("").replace('\n', " ").replace('|', "\\|");
        let _ = writeln!(out, "| `{name}` | {} | {default} | {description} |", type_of(property, defs));
    }
}

fn type_of(property: &serde_json::Value, defs: &serde_json::Value) -> String {
    if let Some(reference) = property["$ref"].as_str() {
        let name = reference.rsplit('/').next().unwrap_or(reference);
        let def = &defs[name];
        if let Some(values) = enum_values(def) {
            return values;
        }
        return name.to_owned();
    }
    if let Some(any) = property["anyOf"].as_array() {
        let kinds: Vec<String> = any.iter().filter(|v| v["type"] != "null").map(|v| type_of(v, defs)).collect();
        return format!("{} (optional)", kinds.join(" or "));
    }
    if let Some(values) = enum_values(property) {
        return values;
    }
    match &property["type"] {
        serde_json::Value::String(kind) if kind == "array" => format!("list of {}", type_of(&property["items"], defs)),
        serde_json::Value::String(kind) => kind.clone(),
        serde_json::Value::Array(kinds) => {
            let kinds: Vec<&str> = kinds.iter().filter_map(|k| k.as_str()).filter(|k| *k != "null").collect();
            format!("{} (optional)", kinds.join(" or "))
        }
        _ => "value".to_owned(),
    }
}

fn enum_values(schema: &serde_json::Value) -> Option<String> {
    let mut values: Vec<String> = Vec::new();
    if let Some(list) = schema["enum"].as_array() {
        values.extend(list.iter().map(|v| format!("`{}`", v.as_str().unwrap_or_default())));
    }
    for variant in schema["oneOf"].as_array().into_iter().flatten() {
        if let Some(constant) = variant["const"].as_str() {
            values.push(format!("`{constant}`"));
        } else if let Some(list) = variant["enum"].as_array() {
            values.extend(list.iter().map(|v| format!("`{}`", v.as_str().unwrap_or_default())));
        } else if let Some(object) = variant["properties"].as_object() {
            values.extend(object.keys().map(|k| format!("`{{{k}: ...}}`")));
        }
    }
    (!values.is_empty()).then(|| values.join(", "))
}

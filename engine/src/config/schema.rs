//! JSON Schema of the pipeline YAML, generated from the configuration structs (their doc
//! comments become descriptions), for editors and for the README's reference.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;

use super::serve::ServeConfig;
use super::{CheckpointConfig, LatePolicy, MetricsConfig};
use crate::components::{ComponentType, OPERATORS, SINKS, SOURCES};

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

/// The schema of one registered type: its settings with the `type` key first, as an
/// internally tagged variant.
fn variant<R: ?Sized>(kind: &dyn ComponentType<R>, generator: &mut SchemaGenerator) -> serde_json::Value {
    let mut schema = kind.schema(generator).to_value();
    if let serde_json::Value::Object(object) = &mut schema {
        object.insert("type".into(), "object".into());
        let properties = object.entry("properties").or_insert_with(|| serde_json::json!({}));
        if let serde_json::Value::Object(properties) = properties {
            properties.insert("type".into(), serde_json::json!({"type": "string", "const": kind.name()}));
        }
        let required = object.entry("required").or_insert_with(|| serde_json::json!([]));
        if let serde_json::Value::Array(required) = required {
            required.insert(0, "type".into());
        }
        object.insert("description".into(), kind.doc().into());
    }
    schema
}

/// The schema of a section's entry: one of the registry's types, and for operators and sinks
/// the `input`/`inputs` keys.
fn section<R: ?Sized>(
    types: &[&dyn ComponentType<R>],
    description: &str,
    with_inputs: bool,
    generator: &mut SchemaGenerator,
) -> Schema {
    let mut variants: Vec<serde_json::Value> = types.iter().map(|kind| variant(*kind, generator)).collect();
    if with_inputs {
        // `input` and `inputs` sit beside the settings.
        for variant in &mut variants {
            if let serde_json::Value::Object(object) = variant {
                object.remove("additionalProperties");
            }
        }
    }
    let mut object = serde_json::json!({"description": description, "oneOf": variants});
    if with_inputs {
        let inputs = Inputs::json_schema(generator).to_value();
        object["properties"] = inputs["properties"].clone();
        object["type"] = "object".into();
    }
    Schema::try_from(object).unwrap_or_default()
}

/// A source: one of the registry's source types.
struct Source;

impl JsonSchema for Source {
    fn schema_name() -> Cow<'static, str> {
        "Source".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        section(SOURCES, "A source.", false, generator)
    }
}

/// An operator: one of the registry's operator types, with its inputs.
struct Operator;

impl JsonSchema for Operator {
    fn schema_name() -> Cow<'static, str> {
        "Operator".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        section(OPERATORS, "An operator.", true, generator)
    }
}

/// A sink: one of the registry's sink types, with its inputs.
struct Sink;

impl JsonSchema for Sink {
    fn schema_name() -> Cow<'static, str> {
        "Sink".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        section(SINKS, "A sink.", true, generator)
    }
}

/// An edgeflow pipeline: named sources, operators and sinks wired by their inputs.
/// Scalars may use `${VAR}` and `${VAR:-default}`; unknown keys are errors.
#[derive(JsonSchema)]
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
    /// Checkpoints of every operator's state and every source's position (on when `dir` is
    /// set); a restart goes on from the last one.
    checkpoint: Option<CheckpointConfig>,
    /// Live tables from operator outputs, queried with SQL over Arrow Flight SQL while the
    /// pipeline runs.
    serve: Option<ServeConfig>,
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
    let _ = writeln!(out, "\n`checkpoint`:\n");
    render_properties(&mut out, &defs["CheckpointConfig"], defs, &[]);
    for (title, def) in [
        ("serve", "ServeConfig"),
        ("serve.flight", "FlightConfig"),
        ("serve.flight.tls", "TlsConfig"),
        ("serve.tables.NAME", "TableConfig"),
    ] {
        let _ = writeln!(out, "\n`{title}`:\n");
        render_properties(&mut out, &defs[def], defs, &[]);
    }
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

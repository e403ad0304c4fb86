//! Loading and validating a pipeline file: every problem is collected before any is shown.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use edgeflow_operators::node_health::NodeHealthParams;
use edgeflow_operators::window_aggregate::WindowParams;
use serde::de::DeserializeOwned;

use super::yaml::{self, Mark, Node, Value};
use super::{
    env, operator_outputs, LatePolicy, MetricsConfig, OperatorConfig, OperatorSpec, Pipeline, PortKind, PortRef,
    Problem, Problems, SinkConfig, SinkSpec, SourceConfig, SourceSpec,
};

const TOP_LEVEL: &[&str] = &["name", "late_policy", "metrics", "sources", "operators", "sinks"];
const SOURCE_TYPES: &[&str] = &["generator", "file", "kafka", "requests"];
const OPERATOR_TYPES: &[&str] = &["node_health", "window_aggregate", "inference", "load_balance", "federated"];
const SINK_TYPES: &[&str] = &["stdout", "file", "dead_letter", "kafka"];

/// Loads and validates the pipeline in `path`, with environment variables from the process.
pub fn load_file(path: &Path) -> Result<Pipeline, Problems> {
    let file = path.display().to_string();
    match read_pipeline_file(path) {
        Ok(text) => load_str(&text, &file, &|name| std::env::var(name).ok()),
        Err(message) => Err(Problems {
            file: file.clone(),
            problems: vec![Problem { path: String::new(), mark: Mark { line: 0, col: 0 }, message }],
        }),
    }
}

/// Largest pipeline file read (1 MiB): pipelines are a few kilobytes.
pub const MAX_PIPELINE_BYTES: u64 = 1 << 20;

/// Reads a pipeline file: a regular file (not a device or FIFO, which may never end) of at
/// most [`MAX_PIPELINE_BYTES`], in UTF-8, a byte-order mark at its start ignored.
fn read_pipeline_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    let hint = format!("hint: check the path `{shown}`");
    // Checked before opening: opening a FIFO blocks until someone writes to it.
    let metadata = std::fs::metadata(path).map_err(|err| format!("cannot read the pipeline file: {err}\n{hint}"))?;
    if !metadata.is_file() {
        return Err(format!(
            "cannot read the pipeline file: `{shown}` is not a regular file (a directory, device or FIFO)\n{hint}"
        ));
    }
    let file = std::fs::File::open(path).map_err(|err| format!("cannot read the pipeline file: {err}\n{hint}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_PIPELINE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| format!("cannot read the pipeline file: {err}\n{hint}"))?;
    if bytes.len() as u64 > MAX_PIPELINE_BYTES {
        return Err(format!(
            "cannot read the pipeline file: `{shown}` is larger than {MAX_PIPELINE_BYTES} bytes; a pipeline is a few kilobytes\n{hint}"
        ));
    }
    let text = String::from_utf8(bytes)
        .map_err(|err| format!("cannot read the pipeline file: it is not UTF-8 ({err})\n{hint}"))?;
    Ok(text.strip_prefix('\u{feff}').map(str::to_owned).unwrap_or(text))
}

/// Loads and validates pipeline `text` (named `file` in messages), reading environment
/// variables through `env_lookup`.
pub fn load_str(text: &str, file: &str, env_lookup: &dyn Fn(&str) -> Option<String>) -> Result<Pipeline, Problems> {
    let base = Path::new(file).parent().map(Path::to_path_buf).unwrap_or_default();
    let mut checker = Checker { problems: Vec::new(), base };
    let pipeline = match yaml::parse(text) {
        Ok(mut root) => {
            substitute_env(&mut root, "", env_lookup, &mut checker);
            checker.pipeline(&root)
        }
        Err(err) => {
            checker.problem(
                "",
                err.mark,
                format!("invalid YAML: {}\nhint: the mistake may be before this position, e.g. an unclosed bracket or quote", err.message),
            );
            None
        }
    };
    let mut problems = checker.problems;
    match pipeline {
        Some(pipeline) if problems.is_empty() => Ok(pipeline),
        _ => {
            problems.sort_by(|a, b| (a.mark, &a.path).cmp(&(b.mark, &b.path)));
            problems.dedup();
            Err(Problems { file: file.to_owned(), problems })
        }
    }
}

fn substitute_env(node: &mut Node, path: &str, lookup: &dyn Fn(&str) -> Option<String>, checker: &mut Checker) {
    let mark = node.mark;
    match &mut node.value {
        Value::Scalar { text, .. } => match env::substitute(text, lookup) {
            Ok(replaced) => *text = replaced,
            Err(message) => checker.problem(path, mark, message),
        },
        Value::Seq(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_env(item, &format!("{path}[{i}]"), lookup, checker);
            }
        }
        Value::Map(entries) => {
            for (key, value) in entries.iter_mut() {
                let child = join(path, key.as_str().unwrap_or("?"));
                substitute_env(value, &child, lookup, checker);
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// A component as written, before its settings are typed.
struct Written<'a> {
    section: &'static str,
    name: String,
    name_mark: Mark,
    type_name: String,
    body: &'a Node,
    inputs: Vec<(PortRef, Mark, String)>,
}

#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
    /// The pipeline file's directory: relative model registries are found from it.
    base: std::path::PathBuf,
}

impl Checker {
    fn problem(&mut self, path: &str, mark: Mark, message: impl Into<String>) {
        self.problems.push(Problem { path: path.to_owned(), mark, message: message.into() });
    }

    fn pipeline(&mut self, root: &Node) -> Option<Pipeline> {
        let Some(entries) = root.as_map() else {
            self.problem("", root.mark, format!("a pipeline must be a mapping, found {}", root.kind()));
            return None;
        };
        self.check_duplicate_keys(root, "");
        for (key, _) in entries {
            let name = key.as_str().unwrap_or_default();
            if !TOP_LEVEL.contains(&name) {
                self.problem(name, key.mark, unknown("top-level key", name, TOP_LEVEL));
            }
        }
        let name = root.get("name").and_then(Node::as_str).unwrap_or("pipeline").to_owned();
        let late_policy =
            root.get("late_policy").and_then(|node| self.typed::<LatePolicy>(node, "late_policy")).unwrap_or_default();
        let metrics = match root.get("metrics") {
            Some(node) => self.typed::<MetricsConfig>(node, "metrics").unwrap_or_default(),
            None => MetricsConfig::default(),
        };
        if let Err(message) = metrics.socket_addr() {
            let node = root.get("metrics").map_or(root, |m| m.locate("address"));
            self.problem("metrics.address", node.mark, message);
        }

        let sources = self.section(root, "sources", SOURCE_TYPES);
        let operators = self.section(root, "operators", OPERATOR_TYPES);
        let sinks = self.section(root, "sinks", SINK_TYPES);
        if sources.is_empty() && root.get("sources").is_some_and(|s| s.as_map().is_some_and(<[_]>::is_empty)) {
            self.problem(
                "sources",
                root.get("sources").map_or(root.mark, |s| s.mark),
                "`sources` is empty; a pipeline needs at least one source",
            );
        }
        // A federated operator makes its own data (simulated clients): no source needed.
        let self_fed = operators.iter().any(|w| w.type_name == "federated");
        if root.get("sources").is_none() && !self_fed {
            self.problem("", root.mark, "missing `sources`; a pipeline needs at least one source");
        }
        if root.get("sinks").is_none() {
            self.problem(
                "",
                root.mark,
                "missing `sinks`; a pipeline needs at least one sink, or its results go nowhere",
            );
        }

        // Names are unique across sections, since inputs refer to them.
        let mut seen: HashMap<&str, (&str, Mark)> = HashMap::new();
        for component in sources.iter().chain(&operators).chain(&sinks) {
            if let Some((section, mark)) = seen.get(component.name.as_str()) {
                self.problem(
                    &format!("{}.{}", component.section, component.name),
                    component.name_mark,
                    format!(
                        "duplicate name `{}`: also defined at {section}.{} ({mark})\nhint: every source, operator and sink needs its own name",
                        component.name, component.name
                    ),
                );
            } else {
                seen.insert(&component.name, (component.section, component.name_mark));
            }
        }

        let typed_sources: Vec<Option<SourceSpec>> = sources.iter().map(|c| self.source(c)).collect();
        let typed_operators: Vec<Option<OperatorSpec>> = operators.iter().map(|c| self.operator(c)).collect();
        let typed_sinks: Vec<Option<SinkSpec>> = sinks.iter().map(|c| self.sink(c)).collect();

        // Output ports of every component whose type is known.
        let mut ports: BTreeMap<String, Vec<(&'static str, PortKind)>> = BTreeMap::new();
        for source in typed_sources.iter().flatten() {
            ports.insert(
                source.name.clone(),
                vec![("", source.config.port_kind()), ("dead_letters", PortKind::DeadLetters)],
            );
        }
        for operator in typed_operators.iter().flatten() {
            let mut outputs = operator_outputs(&operator.config).to_vec();
            outputs.insert(0, ("", outputs[0].1));
            ports.insert(operator.name.clone(), outputs);
        }
        let mut consumed: BTreeSet<String> = BTreeSet::new();
        let all_names: Vec<&str> = sources.iter().chain(&operators).map(|c| c.name.as_str()).collect();

        for (written, typed) in operators.iter().zip(&typed_operators) {
            let Some(operator) = typed else { continue };
            let accepts = operator.config.accepts();
            self.check_inputs(written, &ports, &all_names, &mut consumed, |kind| {
                accepts.contains(&kind).then_some(()).ok_or_else(|| {
                    let kinds: Vec<String> = accepts.iter().map(ToString::to_string).collect();
                    let what = if kinds.is_empty() {
                        "takes no input".to_owned()
                    } else {
                        format!("reads {}", kinds.join(" or "))
                    };
                    format!("operator `{}` ({}) {what}", operator.name, operator.config.type_name())
                })
            });
            if let OperatorConfig::Inference(config) = &operator.config {
                self.check_inference_features(written, config, &ports);
            }
            if let OperatorConfig::LoadBalance(config) = &operator.config {
                self.check_load_balance(written, config, &ports, &operators, &typed_operators, &sinks);
            }
            if matches!(operator.config, OperatorConfig::Federated(_)) && !written.inputs.is_empty() {
                self.check_federated_inputs(written, &ports);
            }
        }
        for (written, typed) in sinks.iter().zip(&typed_sinks) {
            let Some(sink) = typed else { continue };
            let dead_letter = matches!(sink.config, SinkConfig::DeadLetter(_));
            let takes_results = sink.config.takes_results();
            self.check_inputs(written, &ports, &all_names, &mut consumed, |kind| {
                if dead_letter && kind != PortKind::DeadLetters {
                    Err(format!(
                        "sink `{}` (dead_letter) writes dead letters, for example `SOURCE.dead_letters`",
                        sink.name
                    ))
                } else if takes_results && kind != PortKind::InferenceResults {
                    Err(format!("sink `{}` (file, format: arrow) writes inference results only", sink.name))
                } else {
                    Ok(())
                }
            });
        }
        let order = self.operator_order(&operators);
        self.check_exactly_once(&sources, &typed_sources, &operators, &sinks, &typed_sinks);

        for component in sources.iter().chain(&operators) {
            if !consumed.contains(&component.name) && ports.contains_key(&component.name) {
                let what = if component.section == "sources" { "source" } else { "operator" };
                self.problem(
                    &format!("{}.{}", component.section, component.name),
                    component.name_mark,
                    format!(
                        "{what} `{}` is never used: no operator or sink reads its output\nhint: add it to an operator's or sink's `input`, or remove it",
                        component.name
                    ),
                );
            }
        }

        if !self.problems.is_empty() {
            return None;
        }
        let mut operators: Vec<OperatorSpec> = typed_operators.into_iter().flatten().collect();
        let position: HashMap<String, usize> = order.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        operators.sort_by_key(|operator| position.get(&operator.name).copied().unwrap_or(usize::MAX));
        Some(Pipeline {
            name,
            late_policy,
            metrics,
            sources: typed_sources.into_iter().flatten().collect(),
            operators,
            sinks: typed_sinks.into_iter().flatten().collect(),
        })
    }

    fn check_duplicate_keys(&mut self, node: &Node, path: &str) {
        match &node.value {
            Value::Map(entries) => {
                let mut seen: HashMap<&str, Mark> = HashMap::new();
                for (key, value) in entries {
                    let name = key.as_str().unwrap_or_default();
                    let child = join(path, name);
                    if let Some(first) = seen.get(name) {
                        let what = if matches!(path, "sources" | "operators" | "sinks") { "name" } else { "key" };
                        self.problem(
                            &child,
                            key.mark,
                            format!("duplicate {what} `{name}`: also defined at {first}\nhint: YAML would silently keep only one of them"),
                        );
                    } else {
                        seen.insert(name, key.mark);
                    }
                    self.check_duplicate_keys(value, &child);
                }
            }
            Value::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.check_duplicate_keys(item, &format!("{path}[{i}]"));
                }
            }
            Value::Scalar { .. } => {}
        }
    }

    fn section<'a>(&mut self, root: &'a Node, section: &'static str, types: &[&str]) -> Vec<Written<'a>> {
        let Some(node) = root.get(section) else { return Vec::new() };
        let Some(entries) = node.as_map() else {
            if node.as_str() != Some("") {
                self.problem(
                    section,
                    node.mark,
                    format!("`{section}` must be a mapping of names to settings, found {}", node.kind()),
                );
            }
            return Vec::new();
        };
        let mut written = Vec::new();
        let mut names = HashMap::new();
        for (key, body) in entries {
            let name = key.as_str().unwrap_or_default().to_owned();
            let path = format!("{section}.{name}");
            if names.insert(name.clone(), ()).is_some() {
                continue; // reported as a duplicate key
            }
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                self.problem(&path, key.mark, format!("invalid name `{name}`: use letters, digits, `_` and `-`"));
                continue;
            }
            if body.as_map().is_none() {
                self.problem(
                    &path,
                    body.mark,
                    format!("`{name}` must be a mapping with a `type`, found {}", body.kind()),
                );
                continue;
            }
            let type_name = match body.get("type") {
                None => {
                    self.problem(&path, key.mark, format!("`{name}` has no `type`; expected one of {}", list(types)));
                    continue;
                }
                Some(node) => match node.as_str() {
                    Some(t) if types.contains(&t) => t.to_owned(),
                    other => {
                        let kind = &section[..section.len() - 1];
                        self.problem(
                            &format!("{path}.type"),
                            node.mark,
                            unknown(&format!("{kind} type"), other.unwrap_or_default(), types),
                        );
                        continue;
                    }
                },
            };
            let inputs = self.inputs(section, &path, &type_name, body, key.mark);
            written.push(Written { section, name, name_mark: key.mark, type_name, body, inputs });
        }
        written
    }

    fn inputs(
        &mut self,
        section: &str,
        path: &str,
        type_name: &str,
        body: &Node,
        name_mark: Mark,
    ) -> Vec<(PortRef, Mark, String)> {
        let single = body.get("input");
        let many = body.get("inputs");
        if section == "sources" {
            for key in ["input", "inputs"] {
                if let Some(node) = body.key_of(key) {
                    self.problem(
                        &join(path, key),
                        node.mark,
                        format!("a source reads from the outside world and takes no `{key}`"),
                    );
                }
            }
            return Vec::new();
        }
        let mut refs = Vec::new();
        match (single, many) {
            (Some(_), Some(node)) => {
                self.problem(&join(path, "inputs"), node.mark, "both `input` and `inputs` are set; use one of them");
            }
            (None, None) if type_name != "dead_letter" && type_name != "federated" => {
                self.problem(
                    path,
                    name_mark,
                    "missing `input`: name the source or operator output to read, e.g. `input: fleet`",
                );
            }
            _ => {}
        }
        if let Some(node) = single {
            match node.as_str() {
                Some(text) if !text.is_empty() => refs.push((parse_ref(text), node.mark, join(path, "input"))),
                _ => self.problem(
                    &join(path, "input"),
                    node.mark,
                    format!("`input` must be a name such as `fleet`, found {}", node.kind()),
                ),
            }
        }
        if let Some(node) = many {
            match &node.value {
                Value::Seq(items) if !items.is_empty() => {
                    for (i, item) in items.iter().enumerate() {
                        let item_path = format!("{path}.inputs[{i}]");
                        match item.as_str() {
                            Some(text) if !text.is_empty() => refs.push((parse_ref(text), item.mark, item_path)),
                            _ => self.problem(
                                &item_path,
                                item.mark,
                                format!("an input must be a name, found {}", item.kind()),
                            ),
                        }
                    }
                }
                _ => self.problem(&join(path, "inputs"), node.mark, "`inputs` must be a non-empty list of names"),
            }
        }
        refs
    }

    /// Deserializes `node` (a mapping) into `T`, reporting unknown keys (all of them) and
    /// the first value error, each at its own position.
    fn typed<T: DeserializeOwned + schemars::JsonSchema>(&mut self, node: &Node, path: &str) -> Option<T> {
        self.typed_without::<T>(node, path, &[])
    }

    fn typed_without<T: DeserializeOwned + schemars::JsonSchema>(
        &mut self,
        node: &Node,
        path: &str,
        skip: &[&str],
    ) -> Option<T> {
        let mut json = node.to_json();
        if let (serde_json::Value::Object(object), Some(entries)) = (&mut json, node.as_map()) {
            let known = known_fields::<T>();
            for key in skip {
                object.remove(*key);
            }
            let mut unknown_keys = false;
            for (key, _) in entries {
                let name = key.as_str().unwrap_or_default();
                if skip.contains(&name) || known.iter().any(|k| k == name) {
                    continue;
                }
                let names: Vec<&str> = known.iter().map(String::as_str).collect();
                self.problem(&join(path, name), key.mark, unknown("key", name, &names));
                object.remove(name);
                unknown_keys = true;
            }
            if unknown_keys {
                // Still look for value errors in the keys that are known.
                let _ = self.deserialize::<T>(json, node, path);
                return None;
            }
        }
        self.deserialize(json, node, path)
    }

    fn deserialize<T: DeserializeOwned>(&mut self, json: serde_json::Value, node: &Node, path: &str) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(json) {
            Ok(value) => Some(value),
            Err(err) => {
                let inner = err.path().to_string();
                let inner = if inner == "." { String::new() } else { inner };
                let at = node.locate(&inner);
                let message = err.inner().to_string();
                let message = match message.split_once(" at line ") {
                    Some((head, _)) => head.to_owned(),
                    None => message,
                };
                self.problem(&join(path, &inner), at.mark, message);
                None
            }
        }
    }

    fn source(&mut self, written: &Written<'_>) -> Option<SourceSpec> {
        let path = format!("sources.{}", written.name);
        // `input` and `inputs` on a source are reported as such, not as unknown keys.
        let skip = ["type", "input", "inputs"];
        let config = match written.type_name.as_str() {
            "generator" => {
                let config: edgeflow_connectors::generator::GeneratorConfig =
                    self.typed_without(written.body, &path, &skip)?;
                for (field, message) in config.problems() {
                    self.problem(&join(&path, field), written.body.locate(field).mark, message);
                }
                SourceConfig::Generator(config)
            }
            "file" => SourceConfig::File(self.typed_without(written.body, &path, &skip)?),
            "kafka" => {
                let config: edgeflow_connectors::kafka::KafkaSourceConfig =
                    self.typed_without(written.body, &path, &skip)?;
                self.check_kafka(&path, written.body, &config.brokers, config.topics.iter());
                if config.group.trim().is_empty() {
                    self.problem(&join(&path, "group"), written.body.locate("group").mark, "`group` is empty");
                }
                SourceConfig::Kafka(config)
            }
            "requests" => {
                let config: edgeflow_connectors::generator::RequestGeneratorConfig =
                    self.typed_without(written.body, &path, &skip)?;
                for (field, message) in config.problems() {
                    self.problem(&join(&path, field), written.body.locate(field).mark, message);
                }
                SourceConfig::Requests(config)
            }
            _ => return None,
        };
        Some(SourceSpec { name: written.name.clone(), config })
    }

    fn operator(&mut self, written: &Written<'_>) -> Option<OperatorSpec> {
        let path = format!("operators.{}", written.name);
        let skip = ["type", "input", "inputs"];
        let config = match written.type_name.as_str() {
            "node_health" => {
                let config: edgeflow_operators::node_health::NodeHealthConfig =
                    self.typed_without(written.body, &path, &skip)?;
                if let Err(err) = NodeHealthParams::try_new(&config) {
                    self.parameter_problem(&path, written.body, &err);
                }
                OperatorConfig::NodeHealth(config)
            }
            "window_aggregate" => {
                let config: edgeflow_operators::window_aggregate::WindowAggregateConfig =
                    self.typed_without(written.body, &path, &skip)?;
                if let Err(err) = WindowParams::from_config(&config) {
                    self.parameter_problem(&path, written.body, &err);
                }
                OperatorConfig::WindowAggregate(config)
            }
            "load_balance" => {
                let config: edgeflow_operators::load_balance::LoadBalanceConfig =
                    self.typed_without(written.body, &path, &skip)?;
                for (field, message) in config.problems() {
                    self.problem(&join(&path, field), written.body.locate(field).mark, message);
                }
                OperatorConfig::LoadBalance(config)
            }
            "federated" => {
                let mut config: edgeflow_operators::federated::config::FederatedConfig =
                    self.typed_without(written.body, &path, &skip)?;
                for (field, message) in config.problems() {
                    self.problem(&join(&path, field), written.body.locate(field).mark, message);
                }
                if config.dataset.is_relative() {
                    config.dataset = self.base.join(&config.dataset);
                }
                if let Some(export) = config.export.as_mut().filter(|e| e.registry.is_relative()) {
                    export.registry = self.base.join(&export.registry);
                }
                if !config.dataset.is_file() {
                    self.problem(
                        &join(&path, "dataset"),
                        written.body.locate("dataset").mark,
                        format!("dataset `{}` is not a file", config.dataset.display()),
                    );
                }
                // With an input the clients are external: settings of simulated clients, and
                // of external ones without it, would have no effect.
                let external = !written.inputs.is_empty();
                let misplaced: &[&str] =
                    if external { &["dropout"] } else { &["client_ids", "round_timeout", "close_on_quorum"] };
                for field in misplaced.iter().filter(|field| written.body.get(field).is_some()) {
                    let why = if external {
                        "applies to simulated clients only, and this operator reads external clients' updates from its input"
                    } else {
                        "applies to external clients only (an operator with an `input` of model updates)"
                    };
                    self.problem(&join(&path, field), written.body.locate(field).mark, format!("`{field}` {why}"));
                }
                OperatorConfig::Federated(Box::new(config))
            }
            "inference" => {
                let mut config: edgeflow_operators::inference::InferenceConfig =
                    self.typed_without(written.body, &path, &skip)?;
                if config.registry.is_relative() {
                    config.registry = self.base.join(&config.registry);
                }
                for (field, message) in config.problems() {
                    self.problem(&join(&path, field), written.body.locate(field).mark, message);
                }
                self.check_registry(&path, written.body, &config);
                OperatorConfig::Inference(config)
            }
            _ => return None,
        };
        Some(OperatorSpec {
            name: written.name.clone(),
            inputs: written.inputs.iter().map(|i| i.0.clone()).collect(),
            config,
        })
    }

    /// The registry directory and each model's directory with at least one version must
    /// exist (the models themselves load, and are checked, when the pipeline starts).
    fn check_registry(&mut self, path: &str, body: &Node, config: &edgeflow_operators::inference::InferenceConfig) {
        let registry = &config.registry;
        if !registry.is_dir() {
            self.problem(
                &join(path, "registry"),
                body.locate("registry").mark,
                format!("model registry `{}` is not a directory", registry.display()),
            );
            return;
        }
        for (index, model) in config.models.iter().enumerate() {
            let dir = registry.join(model);
            let versions = edgeflow_connectors::onnx::version_dirs(&dir).map_or(0, |found| found.len());
            if versions == 0 {
                let mark = body.locate(&format!("models[{index}]")).mark;
                let message = if dir.is_dir() {
                    format!("model `{model}` has no versions: expected `{}/1/model.onnx`", dir.display())
                } else {
                    format!("model `{model}` is not in the registry: `{}` is not a directory", dir.display())
                };
                self.problem(&format!("{path}.models[{index}]"), mark, message);
            }
        }
    }

    /// A balancer reads requests, exactly one status-change stream and, for strategies that
    /// need resources or locations, heartbeats; its unplaced requests must reach someone (an
    /// inference operator reading it, or a reader of `NAME.unplaced`); and at most one
    /// inference operator reads it (that operator sends re-routed requests back).
    /// A federated operator with inputs has external clients: their updates must be among
    /// the inputs (health inputs alone would leave every round waiting for nothing).
    fn check_federated_inputs(
        &mut self,
        written: &Written<'_>,
        ports: &BTreeMap<String, Vec<(&'static str, PortKind)>>,
    ) {
        let updates = written.inputs.iter().any(|(reference, _, _)| {
            ports.get(&reference.component).is_some_and(|outputs| {
                let port = reference.port.as_deref().unwrap_or("");
                outputs.iter().any(|(name, kind)| *name == port && *kind == PortKind::ModelUpdates)
            })
        });
        if !updates {
            let mark = written.body.locate("input").mark.max(written.body.locate("inputs").mark);
            self.problem(
                &format!("operators.{}", written.name),
                mark,
                format!(
                    "federated `{}` has inputs but no model updates among them: name the source of its clients' updates (a `file` or `kafka` source with `records: model_updates`)",
                    written.name
                ),
            );
        }
    }

    fn check_load_balance(
        &mut self,
        written: &Written<'_>,
        config: &edgeflow_operators::load_balance::LoadBalanceConfig,
        ports: &BTreeMap<String, Vec<(&'static str, PortKind)>>,
        operators: &[Written<'_>],
        typed_operators: &[Option<OperatorSpec>],
        sinks: &[Written<'_>],
    ) {
        let kind_of = |reference: &PortRef| {
            ports.get(&reference.component).and_then(|outputs| {
                let port = reference.port.as_deref().unwrap_or("");
                outputs.iter().find(|(name, _)| *name == port).map(|(_, kind)| *kind)
            })
        };
        let count = |kind: PortKind| written.inputs.iter().filter(|(r, _, _)| kind_of(r) == Some(kind)).count();
        let path = format!("operators.{}", written.name);
        let mark = written.body.locate("input").mark.max(written.body.locate("inputs").mark);
        if count(PortKind::InferenceRequests) == 0 {
            self.problem(
                &path,
                mark,
                format!("load_balance `{}` needs inference requests among its inputs", written.name),
            );
        }
        if count(PortKind::StatusChanges) != 1 {
            self.problem(
                &path,
                mark,
                format!(
                    "load_balance `{}` needs exactly one status-change input (a node_health operator's `changes`), found {}",
                    written.name,
                    count(PortKind::StatusChanges)
                ),
            );
        }
        if config.strategy.needs_heartbeats() && count(PortKind::Heartbeats) == 0 {
            self.problem(
                &join(&path, "strategy"),
                written.body.locate("strategy").mark,
                format!(
                    "strategy {:?} needs heartbeats (resources and locations) among the inputs",
                    serde_json::to_value(config.strategy).unwrap_or_default()
                ),
            );
        }
        let reads = |inputs: &[(PortRef, Mark, String)], port: Option<&str>| {
            inputs.iter().any(|(r, _, _)| {
                r.component == written.name
                    && (r.port.as_deref() == port || (port.is_none() && r.port.as_deref() == Some("requests")))
            })
        };
        let inference_readers = operators
            .iter()
            .zip(typed_operators)
            .filter(|(w, t)| {
                matches!(t, Some(OperatorSpec { config: OperatorConfig::Inference(_), .. })) && reads(&w.inputs, None)
            })
            .count();
        if inference_readers > 1 {
            self.problem(
                &path,
                written.name_mark,
                format!("load_balance `{}` feeds {inference_readers} inference operators; at most one may read a balancer (it returns re-routed requests)", written.name),
            );
        }
        let unplaced_read = operators.iter().chain(sinks).any(|w| reads(&w.inputs, Some("unplaced")));
        if inference_readers == 0 && !unplaced_read {
            self.problem(
                &path,
                written.name_mark,
                format!(
                    "the unplaced requests of load_balance `{}` are not read, so they would be lost\nhint: read `{}.unplaced` in a sink, or feed the balancer to an inference operator",
                    written.name, written.name
                ),
            );
        }
    }

    /// `features` turn heartbeats into requests: needed with a heartbeat input, meaningless
    /// without one.
    fn check_inference_features(
        &mut self,
        written: &Written<'_>,
        config: &edgeflow_operators::inference::InferenceConfig,
        ports: &BTreeMap<String, Vec<(&'static str, PortKind)>>,
    ) {
        let reads_heartbeats = written.inputs.iter().any(|(reference, _, _)| {
            ports.get(&reference.component).is_some_and(|outputs| {
                let port = reference.port.as_deref().unwrap_or("");
                outputs.iter().any(|(name, kind)| *name == port && *kind == PortKind::Heartbeats)
            })
        });
        let path = format!("operators.{}", written.name);
        if reads_heartbeats && config.features.is_empty() {
            self.problem(
                &join(&path, "features"),
                written.name_mark,
                "an inference operator that reads heartbeats needs `features`, the heartbeat fields fed to the model (e.g. [cpu, memory, disk])",
            );
        }
        if !reads_heartbeats && !config.features.is_empty() {
            self.problem(
                &join(&path, "features"),
                written.body.locate("features").mark,
                "`features` apply to heartbeat inputs only; this operator reads inference requests",
            );
        }
    }

    /// Brokers must be `host:port` entries; topic names follow Kafka's rules.
    fn check_kafka<'t>(
        &mut self,
        path: &str,
        body: &Node,
        brokers: &str,
        topics: impl IntoIterator<Item = &'t String>,
    ) {
        let bad_broker = brokers
            .split(',')
            .map(str::trim)
            .find(|b| b.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()));
        if let Some(broker) = bad_broker {
            self.problem(
                &join(path, "brokers"),
                body.locate("brokers").mark,
                format!("`{broker}` is not a broker address\nhint: write `host:port`, several separated by commas, e.g. `localhost:9092`"),
            );
        }
        let mut any = false;
        for topic in topics {
            any = true;
            let valid = !topic.is_empty()
                && topic.len() <= 249
                && topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !valid {
                self.problem(
                    path,
                    body.mark,
                    format!("`{topic}` is not a valid topic name\nhint: use letters, digits, `.`, `_` and `-` (at most 249)"),
                );
            }
        }
        if !any {
            self.problem(&join(path, "topics"), body.mark, "no topic given; list at least one");
        }
    }

    /// Reports a builder's parameter error at the field it names first (in backticks).
    /// `exactly_once` on a Kafka sink puts the whole pipeline in transactions: every source
    /// must be Kafka (its offsets are committed in the transaction), no operator may keep
    /// state (it is not checkpointed, so a restart would rebuild it differently), and every
    /// sink must write to Kafka on the same brokers through the one transactional producer.
    fn check_exactly_once(
        &mut self,
        sources: &[Written<'_>],
        typed_sources: &[Option<SourceSpec>],
        operators: &[Written<'_>],
        sinks: &[Written<'_>],
        typed_sinks: &[Option<SinkSpec>],
    ) {
        let Some((asking, brokers)) = sinks.iter().zip(typed_sinks).find_map(|(written, typed)| match typed {
            Some(SinkSpec { config: SinkConfig::Kafka(config), .. }) if config.exactly_once => {
                Some((written, config.brokers.clone()))
            }
            _ => None,
        }) else {
            return;
        };
        let why = format!("sink `{}` sets `exactly_once`", asking.name);
        for (written, typed) in sources.iter().zip(typed_sources) {
            if let Some(source) = typed {
                if !matches!(source.config, SourceConfig::Kafka(_)) {
                    self.problem(
                        &format!("sources.{}", written.name),
                        written.name_mark,
                        format!(
                            "{why}, but source `{}` is a `{}` source: exactly-once delivery commits the consumed Kafka offsets inside the sinks' transaction, so every source must be Kafka",
                            written.name,
                            source.config.type_name()
                        ),
                    );
                }
            }
        }
        for written in operators {
            self.problem(
                &format!("operators.{}", written.name),
                written.name_mark,
                format!(
                    "{why}, but operator `{}` ({}) keeps state that is not checkpointed: after a restart it would be rebuilt from the committed offsets and its outputs could differ\nhint: exactly-once covers Kafka-to-Kafka pipelines that carry records through; remove `exactly_once` for at-least-once",
                    written.name, written.type_name
                ),
            );
        }
        for (written, typed) in sinks.iter().zip(typed_sinks) {
            let Some(sink) = typed else { continue };
            let problem = match (&sink.config, sink.config.kafka()) {
                (SinkConfig::Kafka(config), _) if !config.exactly_once => {
                    Some(format!("sink `{}` writes to Kafka without `exactly_once: true`; in an exactly-once pipeline every Kafka sink shares the transaction", written.name))
                }
                (_, Some(config)) if config.brokers != brokers => Some(format!(
                    "sink `{}` writes to brokers `{}`, not `{brokers}`: one transaction cannot span two clusters",
                    written.name, config.brokers
                )),
                (_, Some(_)) => None,
                (config, None) => Some(format!(
                    "sink `{}` is a `{}` sink, outside the Kafka transaction: after a crash it would keep the records of the aborted transaction and write them again after the restart\nhint: write it to a Kafka topic (a `kafka` sink, or `dead_letter` with `kafka:`)",
                    written.name,
                    config.type_name()
                )),
            };
            if let Some(problem) = problem {
                self.problem(&format!("sinks.{}", written.name), written.name_mark, format!("{why}, but {problem}"));
            }
        }
    }

    fn parameter_problem(&mut self, path: &str, body: &Node, err: &dyn std::fmt::Display) {
        let message = err.to_string();
        let field = message.split('`').nth(1).unwrap_or_default().to_owned();
        self.problem(&join(path, &field), body.locate(&field).mark, message);
    }

    fn sink(&mut self, written: &Written<'_>) -> Option<SinkSpec> {
        let path = format!("sinks.{}", written.name);
        let skip = ["type", "input", "inputs"];
        let config = match written.type_name.as_str() {
            "stdout" => SinkConfig::Stdout(self.typed_without(written.body, &path, &skip)?),
            "file" => {
                let config: edgeflow_connectors::file::FileSinkConfig =
                    self.typed_without(written.body, &path, &skip)?;
                for (field, message) in config.problems() {
                    // The problems are about a key being there at all: shown at the key.
                    let mark = written.body.key_of(field).map_or(written.name_mark, |key| key.mark);
                    self.problem(&join(&path, field), mark, message);
                }
                SinkConfig::File(config)
            }
            "dead_letter" => {
                let config: edgeflow_connectors::dead_letter::DeadLetterSinkConfig =
                    self.typed_without(written.body, &path, &skip)?;
                if let Some(problem) = config.problem() {
                    self.problem(&path, written.name_mark, problem);
                }
                if let Some(kafka) = &config.kafka {
                    self.check_kafka(
                        &join(&path, "kafka"),
                        written.body.locate("kafka"),
                        &kafka.brokers,
                        [&kafka.topic],
                    );
                }
                SinkConfig::DeadLetter(config)
            }
            "kafka" => {
                let config: edgeflow_connectors::kafka::KafkaSinkConfig =
                    self.typed_without(written.body, &path, &skip)?;
                self.check_kafka(&path, written.body, &config.brokers, [&config.topic]);
                SinkConfig::Kafka(config)
            }
            _ => return None,
        };
        Some(SinkSpec {
            name: written.name.clone(),
            inputs: written.inputs.iter().map(|i| i.0.clone()).collect(),
            config,
        })
    }

    fn check_inputs(
        &mut self,
        written: &Written<'_>,
        ports: &BTreeMap<String, Vec<(&'static str, PortKind)>>,
        names: &[&str],
        consumed: &mut BTreeSet<String>,
        accepts: impl Fn(PortKind) -> Result<(), String>,
    ) {
        for (reference, mark, path) in &written.inputs {
            if reference.component == written.name && written.section == "operators" {
                self.problem(
                    path,
                    *mark,
                    format!("`{}` reads its own output: cycle {} -> {}", written.name, written.name, written.name),
                );
                continue;
            }
            let Some(outputs) = ports.get(&reference.component) else {
                if !names.contains(&reference.component.as_str()) {
                    let mut message = format!(
                        "unknown input `{reference}`: no source or operator is called `{}`",
                        reference.component
                    );
                    if let Some(close) = closest(&reference.component, names) {
                        message.push_str(&format!("\nhint: did you mean `{close}`?"));
                    } else if !names.is_empty() {
                        message.push_str(&format!("\nhint: defined are {}", list(names)));
                    }
                    self.problem(path, *mark, message);
                }
                continue;
            };
            let port = reference.port.as_deref().unwrap_or("");
            let Some((_, kind)) = outputs.iter().find(|(name, _)| *name == port) else {
                let available: Vec<String> = outputs
                    .iter()
                    .filter(|(n, _)| !n.is_empty())
                    .map(|(n, _)| format!("{}.{n}", reference.component))
                    .collect();
                let available: Vec<&str> = available.iter().map(String::as_str).collect();
                let mut message = format!("unknown output `{reference}`");
                if let Some(close) = closest(&reference.to_string(), &available) {
                    message.push_str(&format!("\nhint: did you mean `{close}`?"));
                }
                message.push_str(&format!("\nhint: `{}` has the outputs {}", reference.component, list(&available)));
                self.problem(path, *mark, message);
                continue;
            };
            if *kind != PortKind::DeadLetters {
                consumed.insert(reference.component.clone());
            }
            if let Err(expectation) = accepts(*kind) {
                self.problem(path, *mark, format!("wrong input type: {expectation}, but `{reference}` carries {kind}"));
            }
        }
    }

    /// Operators in dependency order; reports cycles.
    fn operator_order(&mut self, operators: &[Written<'_>]) -> Vec<String> {
        let by_name: HashMap<&str, &Written<'_>> = operators.iter().map(|w| (w.name.as_str(), w)).collect();
        let mut order = Vec::new();
        let mut state: HashMap<&str, u8> = HashMap::new(); // 1 visiting, 2 done
        fn visit<'a>(
            name: &'a str,
            by_name: &HashMap<&'a str, &'a Written<'a>>,
            state: &mut HashMap<&'a str, u8>,
            stack: &mut Vec<&'a str>,
            order: &mut Vec<String>,
            cycles: &mut Vec<(Vec<String>, Mark, String)>,
        ) {
            match state.get(name) {
                Some(2) => return,
                Some(1) => {
                    let start = stack.iter().position(|n| *n == name).unwrap_or(0);
                    let mut cycle: Vec<String> = stack[start..].iter().map(|s| (*s).to_owned()).collect();
                    cycle.push(name.to_owned());
                    let written = by_name[name];
                    cycles.push((cycle, written.name_mark, format!("operators.{name}")));
                    return;
                }
                _ => {}
            }
            state.insert(name, 1);
            stack.push(name);
            let written = by_name[name];
            for (reference, _, _) in &written.inputs {
                if reference.component != name && by_name.contains_key(reference.component.as_str()) {
                    let next = by_name[reference.component.as_str()].name.as_str();
                    visit(next, by_name, state, stack, order, cycles);
                }
            }
            stack.pop();
            state.insert(name, 2);
            order.push(name.to_owned());
        }
        let mut cycles = Vec::new();
        for written in operators {
            visit(&written.name, &by_name, &mut state, &mut Vec::new(), &mut order, &mut cycles);
        }
        for (cycle, mark, path) in cycles {
            self.problem(
                &path,
                mark,
                format!("cycle: {}\nhint: a pipeline is a directed acyclic graph; break the loop", cycle.join(" -> ")),
            );
        }
        order
    }
}

fn parse_ref(text: &str) -> PortRef {
    match text.split_once('.') {
        Some((component, port)) => PortRef { component: component.to_owned(), port: Some(port.to_owned()) },
        None => PortRef { component: text.to_owned(), port: None },
    }
}

fn known_fields<T: schemars::JsonSchema>() -> Vec<String> {
    let schema = schemars::schema_for!(T);
    schema
        .as_object()
        .and_then(|object| object.get("properties"))
        .and_then(|properties| properties.as_object())
        .map(|properties| properties.keys().cloned().collect())
        .unwrap_or_default()
}

fn list(names: &[&str]) -> String {
    names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
}

fn unknown(what: &str, name: &str, expected: &[&str]) -> String {
    let mut message = format!("unknown {what} `{name}`");
    if let Some(close) = closest(name, expected) {
        message.push_str(&format!("\nhint: did you mean `{close}`?"));
    }
    if !expected.is_empty() {
        message.push_str(&format!("\nhint: expected one of {}", list(expected)));
    }
    message
}

/// The candidate within a small edit distance of `name`, if any.
fn closest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(name, c), *c))
        .filter(|(d, c)| *d > 0 && *d <= (c.len() / 3).max(1))
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = if ca == *cb { previous } else { 1 + previous.min(row[j]).min(row[j + 1]) };
            previous = current;
        }
    }
    row[b.len()]
}

//! Loading and validating a pipeline file: every problem is collected before any is shown.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use edgeflow_operators::params::Place;
use serde::de::DeserializeOwned;

use super::serve::{RetentionConfig, ServeConfig, ServedTable, Serving, DEFAULT_RETENTION_ROWS};
use super::yaml::{self, Mark, Node, Value};
use super::{
    env, CheckpointConfig, Checkpointing, LatePolicy, MetricsConfig, Pipeline, PortKind, PortRef, Problem, Problems,
    Spec,
};
use crate::components::{
    find, join, names, ComponentType, Context, Declared, Input, OperatorComponent, PortKinds, SinkComponent, Wiring,
    OPERATORS, SINKS, SOURCES,
};
use crate::serve::rows::{Layout, TableKind};
use crate::serve::store::Retention;

const TOP_LEVEL: &[&str] = &["name", "late_policy", "metrics", "checkpoint", "serve", "sources", "operators", "sinks"];

/// Loads and validates the pipeline in `path`, with environment variables from the process.
pub fn load_file(path: &Path) -> Result<Pipeline, Problems> {
    let file = path.display().to_string();
    match read_pipeline_file(path) {
        Ok(text) => load_str(&text, &file, &|name| std::env::var(name).ok()),
        Err(err) => Err(Problems {
            file: file.clone(),
            problems: vec![Problem { path: String::new(), mark: Mark { line: 0, col: 0 }, message: err.to_string() }],
        }),
    }
}

/// Largest pipeline file read (1 MiB): pipelines are a few kilobytes.
pub const MAX_PIPELINE_BYTES: u64 = 1 << 20;

/// Reads a pipeline file: a regular file (not a device or FIFO, which may never end) of at
/// most [`MAX_PIPELINE_BYTES`], in UTF-8, a byte-order mark at its start ignored.
fn read_pipeline_file(path: &Path) -> Result<String, PipelineFileError> {
    use std::io::Read;
    let shown = || path.display().to_string();
    let io = |source| PipelineFileError::Io { path: shown(), source };
    // Checked before opening: opening a FIFO blocks until someone writes to it.
    let metadata = std::fs::metadata(path).map_err(io)?;
    if !metadata.is_file() {
        return Err(PipelineFileError::NotAFile { path: shown() });
    }
    let file = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    file.take(MAX_PIPELINE_BYTES + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > MAX_PIPELINE_BYTES {
        return Err(PipelineFileError::TooLarge { path: shown() });
    }
    let text = String::from_utf8(bytes).map_err(|source| PipelineFileError::NotUtf8 { path: shown(), source })?;
    Ok(text.strip_prefix('\u{feff}').map(str::to_owned).unwrap_or(text))
}

/// A pipeline file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PipelineFileError {
    /// The file system refused.
    #[error("cannot read the pipeline file: {source}\nhint: check the path `{path}`")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A directory, device or FIFO.
    #[error("cannot read the pipeline file: `{path}` is not a regular file (a directory, device or FIFO)\nhint: check the path `{path}`")]
    NotAFile {
        /// The path.
        path: String,
    },
    /// Larger than a pipeline can be.
    #[error("cannot read the pipeline file: `{path}` is larger than {max} bytes; a pipeline is a few kilobytes\nhint: check the path `{path}`", max = MAX_PIPELINE_BYTES)]
    TooLarge {
        /// The file.
        path: String,
    },
    /// Not UTF-8.
    #[error("cannot read the pipeline file: it is not UTF-8 ({source})\nhint: check the path `{path}`")]
    NotUtf8 {
        /// The file.
        path: String,
        /// Where it stops being UTF-8.
        source: std::string::FromUtf8Error,
    },
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
            Err(err) => checker.problem(path, mark, err.to_string()),
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

/// A component as written, before its settings are typed.
struct Written<'a, R: ?Sized + 'static> {
    section: &'static str,
    name: String,
    name_mark: Mark,
    kind: &'static dyn ComponentType<R>,
    body: &'a Node,
    inputs: Vec<(PortRef, Mark, String)>,
}

impl<R: ?Sized + 'static> Written<'_, R> {
    /// Section, name and where the name is.
    fn header(&self) -> (&'static str, &str, Mark) {
        (self.section, &self.name, self.name_mark)
    }

    /// The inputs it names.
    fn refs(&self) -> Vec<PortRef> {
        self.inputs.iter().map(|(reference, _, _)| reference.clone()).collect()
    }
}

/// The checked components of a section whose every component was declared without a
/// problem.
fn checked<R: ?Sized + 'static>(written: &[Written<'_, R>], declared: Vec<Option<Declared<R>>>) -> Vec<Spec<R>> {
    written
        .iter()
        .zip(declared)
        .filter_map(|(written, declared)| {
            let declared = declared?;
            Some(Spec {
                name: written.name.clone(),
                kind: written.kind,
                ports: declared.ports,
                inputs: written.refs(),
                component: declared.component.ok()?,
            })
        })
        .collect()
}

/// The kind of the port `reference` names, if it is known.
fn kind_of(ports: &PortKinds, reference: &PortRef) -> Option<PortKind> {
    let port = reference.port.as_deref().unwrap_or("");
    ports.get(&reference.component)?.iter().find(|(name, _)| *name == port).map(|(_, kind)| *kind)
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
            self.problem("metrics.address", node.mark, message.to_string());
        }

        let checkpoint = self.checkpoint(root);

        let sources = self.section(root, "sources", SOURCES);
        let operators = self.section(root, "operators", OPERATORS);
        let sinks = self.section(root, "sinks", SINKS);
        if sources.is_empty() && root.get("sources").is_some_and(|s| s.as_map().is_some_and(<[_]>::is_empty)) {
            self.problem(
                "sources",
                root.get("sources").map_or(root.mark, |s| s.mark),
                "`sources` is empty; a pipeline needs at least one source",
            );
        }
        // An operator that makes its own data (simulated clients) needs no source.
        let self_fed = operators.iter().any(|w| w.kind.feeds_itself());
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
        for component in sources
            .iter()
            .map(Written::header)
            .chain(operators.iter().map(Written::header))
            .chain(sinks.iter().map(Written::header))
        {
            let (section, name, name_mark) = component;
            if let Some((first, mark)) = seen.get(name) {
                self.problem(
                    &format!("{section}.{name}"),
                    name_mark,
                    format!(
                        "duplicate name `{name}`: also defined at {first}.{name} ({mark})\nhint: every source, operator and sink needs its own name"
                    ),
                );
            } else {
                seen.insert(name, (section, name_mark));
            }
        }

        let declared_sources: Vec<_> = sources.iter().map(|w| self.declare(w)).collect();
        let declared_operators: Vec<_> = operators.iter().map(|w| self.declare(w)).collect();
        let declared_sinks: Vec<_> = sinks.iter().map(|w| self.declare(w)).collect();

        // Output ports of every component whose settings were read.
        let mut ports: PortKinds = BTreeMap::new();
        for (written, declared) in sources.iter().zip(&declared_sources) {
            if let Some(declared) = declared {
                let mut outputs = declared.ports.outputs.to_vec();
                outputs.push(("dead_letters", PortKind::DeadLetters));
                ports.insert(written.name.clone(), outputs);
            }
        }
        for (written, declared) in operators.iter().zip(&declared_operators) {
            if let Some(declared) = declared {
                let mut outputs = declared.ports.outputs.to_vec();
                outputs.insert(0, ("", outputs[0].1));
                ports.insert(written.name.clone(), outputs);
            }
        }
        let mut consumed: BTreeSet<String> = BTreeSet::new();
        let all_names: Vec<&str> =
            sources.iter().map(|c| c.name.as_str()).chain(operators.iter().map(|c| c.name.as_str())).collect();
        let readers: Vec<(&'static str, Vec<PortRef>)> = operators
            .iter()
            .map(|w| (w.kind.name(), w.refs()))
            .chain(sinks.iter().map(|w| (w.kind.name(), w.refs())))
            .collect();

        for (written, declared) in operators.iter().zip(&declared_operators) {
            let Some(declared) = declared else { continue };
            let accepts = declared.ports.accepts;
            let type_name = written.kind.name();
            let name = written.name.clone();
            self.check_inputs(written.header(), &written.inputs, &ports, &all_names, &mut consumed, |kind| {
                accepts.contains(&kind).then_some(()).ok_or_else(|| {
                    let kinds: Vec<String> = accepts.iter().map(ToString::to_string).collect();
                    let what = if kinds.is_empty() {
                        "takes no input".to_owned()
                    } else {
                        format!("reads {}", kinds.join(" or "))
                    };
                    format!("operator `{name}` ({type_name}) {what}")
                })
            });
            let inputs = written
                .inputs
                .iter()
                .map(|(reference, mark, _)| (reference.clone(), kind_of(&ports, reference), *mark))
                .collect();
            let mut wiring = Wiring {
                name: &written.name,
                path: format!("operators.{}", written.name),
                body: written.body,
                name_mark: written.name_mark,
                inputs,
                readers: &readers,
                problems: &mut self.problems,
            };
            (declared.wiring)(&mut wiring);
        }
        for (written, declared) in sinks.iter().zip(&declared_sinks) {
            let Some(declared) = declared else { continue };
            let only = declared.ports.only;
            let name = written.name.clone();
            self.check_inputs(
                written.header(),
                &written.inputs,
                &ports,
                &all_names,
                &mut consumed,
                |kind| match only {
                    Some((only, what)) if kind != only => Err(format!("sink `{name}` {what}")),
                    _ => Ok(()),
                },
            );
        }
        let serve = root.get("serve").and_then(|node| self.serve(node, &ports, &all_names, &mut consumed));
        let order = self.operator_order(&operators);
        self.check_exactly_once(checkpoint.as_ref(), &sinks, &declared_sinks);
        if checkpoint.is_some() {
            self.check_checkpointed(&operators, &declared_operators);
        }

        for (section, name, name_mark) in
            sources.iter().map(Written::header).chain(operators.iter().map(Written::header))
        {
            if !consumed.contains(name) && ports.contains_key(name) {
                let what = if section == "sources" { "source" } else { "operator" };
                self.problem(
                    &format!("{section}.{name}"),
                    name_mark,
                    format!(
                        "{what} `{name}` is never used: no operator or sink reads its output\nhint: add it to an operator's or sink's `input`, or remove it"
                    ),
                );
            }
        }

        if !self.problems.is_empty() {
            return None;
        }
        // No problem was found, so every component was declared and checked.
        let sources = checked(&sources, declared_sources);
        let mut typed_operators = checked(&operators, declared_operators);
        let sinks = checked(&sinks, declared_sinks);
        let position: HashMap<String, usize> = order.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect();
        typed_operators.sort_by_key(|operator| position.get(&operator.name).copied().unwrap_or(usize::MAX));
        Some(Pipeline { name, late_policy, metrics, sources, operators: typed_operators, sinks, checkpoint, serve })
    }

    /// The `checkpoint` section: on when `dir` is set; an interval of at least 100ms and at
    /// least two checkpoints kept (the one before the newest is the fallback).
    fn checkpoint(&mut self, root: &Node) -> Option<Checkpointing> {
        let node = root.get("checkpoint")?;
        let config = self.typed::<CheckpointConfig>(node, "checkpoint")?;
        if config.interval.as_millis() < 100 {
            self.problem(
                "checkpoint.interval",
                node.locate("interval").mark,
                format!("`interval` is {}; checkpoints need at least 100ms between them", config.interval),
            );
        }
        if config.keep < 2 {
            self.problem(
                "checkpoint.keep",
                node.locate("keep").mark,
                format!("`keep` is {}; at least 2 checkpoints are kept (the older one is the fallback when the newest is damaged)", config.keep),
            );
        }
        let dir = config.dir?;
        if dir.as_os_str().is_empty() {
            self.problem("checkpoint.dir", node.locate("dir").mark, "`dir` is empty; name a directory");
            return None;
        }
        let dir = if dir.is_relative() { self.base.join(dir) } else { dir };
        Some(Checkpointing {
            dir,
            interval: std::time::Duration::from_millis(config.interval.as_millis()),
            keep: config.keep,
        })
    }

    /// The `serve` section: each table reads a servable operator output (which counts as
    /// using it), has an SQL name, and a retention only if it appends; the Flight address
    /// parses, and one that is not loopback needs tokens.
    fn serve(
        &mut self,
        node: &Node,
        ports: &PortKinds,
        names: &[&str],
        consumed: &mut BTreeSet<String>,
    ) -> Option<Serving> {
        let config = self.typed::<ServeConfig>(node, "serve")?;
        let flight_node = node.get("flight").unwrap_or(node);
        let address = match config.flight.address.parse::<std::net::SocketAddr>() {
            Ok(address) => Some(address),
            Err(_) => {
                self.problem(
                    "serve.flight.address",
                    flight_node.locate("address").mark,
                    format!("`{}` is not an address; write HOST:PORT, e.g. 127.0.0.1:50051", config.flight.address),
                );
                None
            }
        };
        if let Some(address) = address {
            if !address.ip().is_loopback() && config.flight.tokens.is_empty() {
                self.problem(
                    "serve.flight.tokens",
                    flight_node.locate("address").mark,
                    format!("the Flight SQL server listens on {address}, beyond loopback, without `tokens`: anyone who can reach it could read the pipeline's state\nhint: add `tokens: [\"${{EDGEFLOW_FLIGHT_TOKEN}}\"]` (and `tls`), or listen on 127.0.0.1"),
                );
            }
        }
        for (i, token) in config.flight.tokens.iter().enumerate() {
            if token.len() < 16 {
                let mark = flight_node.locate(&format!("tokens[{i}]")).mark;
                self.problem(
                    &format!("serve.flight.tokens[{i}]"),
                    mark,
                    format!(
                        "token {} is {} characters; a token needs at least 16 (e.g. `openssl rand -hex 32`)",
                        i + 1,
                        token.len()
                    ),
                );
            }
        }
        let mut flight = config.flight.clone();
        if let Some(tls) = flight.tls.as_mut() {
            let resolve =
                |path: &std::path::Path| if path.is_relative() { self.base.join(path) } else { path.to_path_buf() };
            tls.cert = resolve(&tls.cert);
            tls.key = resolve(&tls.key);
            tls.client_ca = tls.client_ca.as_deref().map(resolve);
        }
        let tables_node = node.get("tables").unwrap_or(node);
        let mut tables = Vec::new();
        for (name, table) in &config.tables {
            let path = format!("serve.tables.{name}");
            let table_node = tables_node.get(name).unwrap_or(tables_node);
            let name_mark = tables_node.key_of(name).map_or(table_node.mark, |key| key.mark);
            let sql_name = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !sql_name {
                self.problem(
                    &path,
                    name_mark,
                    format!("table name `{name}` is not a plain SQL name: use lower-case letters, digits and `_`, starting with a letter"),
                );
            }
            let reference = parse_ref(&table.input);
            let input_mark = table_node.locate("input").mark;
            let inputs = [(reference.clone(), input_mark, format!("{path}.input"))];
            self.check_inputs(("serve", name, name_mark), &inputs, ports, names, consumed, |kind| {
                Layout::of(kind).map(|_| ()).ok_or_else(|| {
                    format!("table `{name}` holds node status, status changes, region rollups, window, inference or federated round results")
                })
            });
            let Some(kind) = kind_of(ports, &reference) else { continue };
            let Some(layout) = Layout::of(kind) else { continue };
            let retention = match (layout.kind, table.retention) {
                (TableKind::Collection, Some(_)) => {
                    self.problem(
                        &format!("{path}.retention"),
                        table_node.locate("retention").mark,
                        format!("table `{name}` holds the live collection `{reference}` (its current contents), which takes no `retention`\nhint: remove `retention`"),
                    );
                    continue;
                }
                (_, Some(RetentionConfig::Rows(0))) => {
                    self.problem(
                        &format!("{path}.retention.rows"),
                        table_node.locate("retention").mark,
                        "`rows` is 0; keep at least 1 row".to_owned(),
                    );
                    continue;
                }
                (_, Some(RetentionConfig::Span(span))) if span.as_millis() == 0 => {
                    self.problem(
                        &format!("{path}.retention.span"),
                        table_node.locate("retention").mark,
                        "`span` is 0; keep a span of at least 1ms".to_owned(),
                    );
                    continue;
                }
                (_, Some(RetentionConfig::Rows(rows))) => Retention::Rows(rows),
                (_, Some(RetentionConfig::Span(span))) => Retention::Span(span.as_millis()),
                (_, None) => Retention::Rows(DEFAULT_RETENTION_ROWS),
            };
            tables.push(ServedTable { name: name.clone(), input: reference, kind, retention });
        }
        if config.tables.is_empty() {
            self.problem(
                "serve.tables",
                tables_node.mark,
                "`tables` is empty; serve at least one operator output".to_owned(),
            );
        }
        Some(Serving { flight, address: address?, tables })
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

    fn section<'a, R: ?Sized + 'static>(
        &mut self,
        root: &'a Node,
        section: &'static str,
        registry: &'static [&'static dyn ComponentType<R>],
    ) -> Vec<Written<'a, R>> {
        let types = &names(registry)[..];
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
            let kind = match body.get("type") {
                None => {
                    self.problem(&path, key.mark, format!("`{name}` has no `type`; expected one of {}", list(types)));
                    continue;
                }
                Some(node) => match node.as_str().and_then(|t| find(registry, t)) {
                    Some(kind) => kind,
                    None => {
                        let other = node.as_str();
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
            let inputs = self.inputs(section, &path, kind.input(), body, key.mark);
            written.push(Written { section, name, name_mark: key.mark, kind, body, inputs });
        }
        written
    }

    fn inputs(
        &mut self,
        section: &str,
        path: &str,
        input: Input,
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
            (None, None) if input == Input::Required => {
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

    /// Reads a component's settings into its type: unknown keys and values that do not
    /// deserialize are reported (and yield `None`); problems of the parameters are reported
    /// at their fields, and the ports and wiring check are returned all the same, so the
    /// rest of the pipeline is checked too.
    fn declare<R: ?Sized + 'static>(&mut self, written: &Written<'_, R>) -> Option<Declared<R>> {
        let path = format!("{}.{}", written.section, written.name);
        let body = written.body;
        // `input` and `inputs` on a source are reported as such, not as unknown keys.
        let skip = ["type", "input", "inputs"];
        let mut json = body.to_json();
        let mut unknown_keys = false;
        if let (serde_json::Value::Object(object), Some(entries)) = (&mut json, body.as_map()) {
            let schema = written.kind.schema(&mut schemars::SchemaGenerator::default());
            let known: Vec<&str> = schema
                .as_object()
                .and_then(|object| object.get("properties"))
                .and_then(|properties| properties.as_object())
                .map(|properties| properties.keys().map(String::as_str).collect())
                .unwrap_or_default();
            for key in skip {
                object.remove(key);
            }
            for (key, _) in entries {
                let name = key.as_str().unwrap_or_default();
                if skip.contains(&name) || known.contains(&name) {
                    continue;
                }
                self.problem(&join(&path, name), key.mark, unknown("key", name, &known));
                object.remove(name);
                unknown_keys = true;
            }
        }
        let cx = Context { base: &self.base, has_inputs: !written.inputs.is_empty(), body };
        let declared = match written.kind.check(json, &cx) {
            Ok(declared) => declared,
            Err((inner, message)) => {
                let at = body.locate(&inner);
                self.problem(&join(&path, &inner), at.mark, message);
                return None;
            }
        };
        if unknown_keys {
            return None;
        }
        if let Err(errors) = &declared.component {
            for problem in errors.problems() {
                let (at, mark) = match problem.place {
                    Place::Value => (join(&path, &problem.field), body.locate(&problem.field).mark),
                    Place::Key => (
                        join(&path, &problem.field),
                        body.key_of(&problem.field).map_or(written.name_mark, |key| key.mark),
                    ),
                    Place::Component => (path.clone(), written.name_mark),
                };
                self.problem(&at, mark, problem.message.clone());
            }
        }
        Some(declared)
    }

    /// `exactly_once` on a Kafka sink puts the pipeline's output in transactions, one per
    /// checkpoint: the pipeline needs checkpoints, and every sink must write either to Kafka
    /// on the same brokers through the one transactional producer, or where a restore can
    /// take back what was written after the checkpoint (a `jsonl` file, cut back to its length).
    fn check_exactly_once(
        &mut self,
        checkpoint: Option<&Checkpointing>,
        sinks: &[Written<'_, dyn SinkComponent>],
        declared_sinks: &[Option<Declared<dyn SinkComponent>>],
    ) {
        let component = |declared: &Option<Declared<dyn SinkComponent>>| {
            declared.as_ref().and_then(|d| d.component.as_ref().ok()).cloned()
        };
        let Some((asking, brokers)) = sinks.iter().zip(declared_sinks).find_map(|(written, declared)| {
            let sink = component(declared)?;
            sink.exactly_once("")?;
            Some((written, sink.kafka()?.brokers.clone()))
        }) else {
            return;
        };
        let why = format!("sink `{}` sets `exactly_once`", asking.name);
        if checkpoint.is_none() {
            self.problem(
                &format!("sinks.{}", asking.name),
                asking.name_mark,
                format!("{why}, but the pipeline takes no checkpoints: exactly-once output is committed with each checkpoint, and a restart goes back to the last one\nhint: add `checkpoint: {{dir: checkpoints}}`"),
            );
        }
        for (written, declared) in sinks.iter().zip(declared_sinks) {
            let Some(sink) = component(declared) else { continue };
            let problem = match (sink.exactly_once_setting(), sink.kafka()) {
                (Some(false), _) => Some(format!("sink `{}` writes to Kafka without `exactly_once: true`; in an exactly-once pipeline every Kafka sink shares the transaction", written.name)),
                (_, Some(config)) if config.brokers != brokers => Some(format!(
                    "sink `{}` writes to brokers `{}`, not `{brokers}`: one transaction cannot span two clusters",
                    written.name, config.brokers
                )),
                // A transaction stays open for an interval and the checkpoint after it; the
                // broker aborts one that outlives `transaction.timeout.ms`.
                (_, Some(config))
                    if checkpoint.is_some_and(|c| {
                        u128::from(config.delivery_timeout.as_millis()) < 2 * c.interval.as_millis()
                    }) =>
                {
                    Some(format!(
                        "sink `{}` has `delivery_timeout: {}`, the transaction timeout, shorter than twice the checkpoint interval ({} ms): the broker would abort a transaction before its checkpoint completes\nhint: raise `delivery_timeout` or shorten `checkpoint.interval`",
                        written.name,
                        config.delivery_timeout,
                        checkpoint.map_or(0, |c| c.interval.as_millis())
                    ))
                }
                (_, Some(_)) => None,
                (_, None) if sink.rewinds() => None,
                (_, None) => Some(format!(
                    "sink `{}` is a `{}` sink, which cannot take back what it wrote after the last checkpoint: after a crash it would write those records again\nhint: write it to a Kafka topic (a `kafka` sink, or `dead_letter` with `kafka:`) or to a `jsonl` file",
                    written.name,
                    written.kind.name()
                )),
            };
            if let Some(problem) = problem {
                self.problem(&format!("sinks.{}", written.name), written.name_mark, format!("{why}, but {problem}"));
            }
        }
    }

    /// In a checkpointed pipeline every operator must save its state: one that does not would
    /// come back empty after a restore while its sources resume where they were.
    fn check_checkpointed(
        &mut self,
        operators: &[Written<'_, dyn OperatorComponent>],
        declared: &[Option<Declared<dyn OperatorComponent>>],
    ) {
        for (written, declared) in operators.iter().zip(declared) {
            let Some(Ok(operator)) = declared.as_ref().map(|d| &d.component) else { continue };
            if !operator.checkpointed() {
                self.problem(
                    &format!("operators.{}", written.name),
                    written.name_mark,
                    format!(
                        "operator `{}` ({}) does not save its state in checkpoints yet: after a restore it would start empty while its sources resume where they were\nhint: remove `checkpoint` from this pipeline, or the operator",
                        written.name,
                        written.kind.name()
                    ),
                );
            }
        }
    }

    fn check_inputs(
        &mut self,
        (section, name, _): (&'static str, &str, Mark),
        inputs: &[(PortRef, Mark, String)],
        ports: &PortKinds,
        names: &[&str],
        consumed: &mut BTreeSet<String>,
        accepts: impl Fn(PortKind) -> Result<(), String>,
    ) {
        for (reference, mark, path) in inputs {
            if reference.component == name && section == "operators" {
                self.problem(path, *mark, format!("`{name}` reads its own output: cycle {name} -> {name}"));
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
    fn operator_order(&mut self, operators: &[Written<'_, dyn OperatorComponent>]) -> Vec<String> {
        type Operator<'a> = Written<'a, dyn OperatorComponent>;
        let by_name: HashMap<&str, &Operator<'_>> = operators.iter().map(|w| (w.name.as_str(), w)).collect();
        let mut order = Vec::new();
        let mut state: HashMap<&str, u8> = HashMap::new(); // 1 visiting, 2 done
        fn visit<'a>(
            name: &'a str,
            by_name: &HashMap<&'a str, &'a Written<'a, dyn OperatorComponent>>,
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

fn known_fields<T: schemars::JsonSchema>() -> Vec<String> {
    let schema = schemars::schema_for!(T);
    schema
        .as_object()
        .and_then(|object| object.get("properties"))
        .and_then(|properties| properties.as_object())
        .map(|properties| properties.keys().cloned().collect())
        .unwrap_or_default()
}

fn parse_ref(text: &str) -> PortRef {
    match text.split_once('.') {
        Some((component, port)) => PortRef { component: component.to_owned(), port: Some(port.to_owned()) },
        None => PortRef { component: text.to_owned(), port: None },
    }
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

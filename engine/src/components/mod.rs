//! Component types: every source, operator and sink type has one module here that declares
//! its YAML type name, its configuration struct, its ports, its validation and how it is
//! built into the dataflow (or opened, for sources and sinks).
//!
//! The registry at the bottom ([`SOURCES`], [`OPERATORS`], [`SINKS`]) is the only list of
//! types: the YAML schema (`edgeflow schema`), validation, `edgeflow graph` and the runtime
//! all read it. Adding a type is one module and one registry line:
//!
//! 1. a struct holding the checked parameters, implementing [`Component`] (type name, doc,
//!    config, `try_new`) and one of [`SourceComponent`], [`OperatorComponent`] or
//!    [`SinkComponent`] (ports, wiring checks, build or open);
//! 2. `&Registered::<TheStruct>::NEW` in the role's list.

pub mod operators;
pub mod sinks;
pub mod sources;

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgeflow_connectors::kafka::KafkaSinkConfig;
use edgeflow_connectors::{ConnectorError, Sink, Source};
use edgeflow_operators::params::ParamErrors;
use serde::de::DeserializeOwned;

use crate::config::{Mark, Node, PortKind, PortRef, Problem};
use crate::metrics::Metrics;
use crate::runtime::{Build, Port, SharedSource};

/// Whether an operator or sink needs an input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// It must name at least one input.
    Required,
    /// It may go without one (a `dead_letter` sink takes every source's dead letters; a
    /// `federated` operator without inputs simulates its clients).
    Optional,
}

/// What a component type declares: its name in YAML, its description, its configuration and
/// how a configuration is checked into the component.
pub trait Component: Sized + Send + Sync + fmt::Debug + 'static {
    /// The `type:` of the component in YAML.
    const TYPE: &'static str;
    /// What it does, for the schema and the README's reference (Markdown, one paragraph).
    const DOC: &'static str;
    /// Whether it needs an input (operators and sinks; sources take none).
    const INPUT: Input = Input::Required;
    /// Whether it makes data of its own, so a pipeline with it needs no source.
    const FEEDS_ITSELF: bool = false;
    /// The YAML settings (serde and schemars, unknown keys refused).
    type Config: DeserializeOwned + schemars::JsonSchema + Clone + 'static;

    /// Its ports, known from its settings alone, so validation checks the wiring of a
    /// component whose parameters are wrong too.
    fn ports(config: &Self::Config) -> Ports;

    /// Checks `config`; every problem names its field. `cx` says where the pipeline file is
    /// and how the component was written.
    fn try_new(config: Self::Config, cx: &Context<'_>) -> Result<Self, ParamErrors>;

    /// Checks that depend on its inputs and on the rest of the pipeline.
    fn check_wiring(_config: &Self::Config, _cx: &mut Wiring<'_>) {}
}

/// The ports of a component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    /// The kinds of records it reads (operators).
    pub accepts: &'static [PortKind],
    /// Its named outputs, the first being its main output (operators), or its one unnamed
    /// output (sources: with the name `""`).
    pub outputs: &'static [(&'static str, PortKind)],
    /// A sink that takes one kind only: the kind, and what to say about it after its name.
    pub only: Option<(PortKind, &'static str)>,
}

impl Ports {
    /// Ports of a source of `kind`.
    pub const fn source(kind: PortKind) -> Self {
        let outputs: &'static [(&'static str, PortKind)] = match kind {
            PortKind::Heartbeats => &[("", PortKind::Heartbeats)],
            PortKind::InferenceRequests => &[("", PortKind::InferenceRequests)],
            PortKind::ModelUpdates => &[("", PortKind::ModelUpdates)],
            PortKind::RawMessages => &[("", PortKind::RawMessages)],
            _ => &[],
        };
        Ports { accepts: &[], outputs, only: None }
    }

    /// Ports of an operator.
    pub const fn operator(accepts: &'static [PortKind], outputs: &'static [(&'static str, PortKind)]) -> Self {
        Ports { accepts, outputs, only: None }
    }

    /// Ports of a sink that takes anything.
    pub const SINK: Ports = Ports { accepts: &[], outputs: &[], only: None };

    /// The kind of the main (first) output.
    pub fn main(&self) -> Option<PortKind> {
        self.outputs.first().map(|(_, kind)| *kind)
    }
}

/// A source, checked and ready to open on each worker.
pub trait SourceComponent: Send + Sync + fmt::Debug {
    /// Maximum out-of-orderness of its watermark, ms.
    fn max_out_of_orderness(&self) -> u64;
    /// How long without data before its watermark follows the wall clock, ms.
    fn idle_timeout(&self) -> u64;
    /// Opens its share on one worker.
    fn open(&self, cx: &OpenSource<'_>) -> Result<Box<dyn Source>, ConnectorError>;
}

/// An operator, checked and ready to build into the dataflow on each worker.
pub trait OperatorComponent: Send + Sync + fmt::Debug {
    /// Builds it on one worker from its inputs; returns its outputs in the order of its
    /// [`Ports::outputs`].
    fn build<'scope>(
        &self,
        name: &str,
        inputs: &[PortRef],
        cx: &mut Build<'_, 'scope>,
    ) -> Result<Vec<Port<'scope>>, BuildError>;

    /// Whether it saves its state in checkpoints (through [`Build::state`]).
    fn checkpointed(&self) -> bool {
        false
    }
}

/// A sink, checked and ready to open (on worker 0).
pub trait SinkComponent: Send + Sync + fmt::Debug {
    /// Whether it takes inference results as records rather than JSON lines, to write them
    /// in a format of its own.
    fn takes_results(&self) -> bool {
        false
    }
    /// The Kafka producer settings, if it writes to Kafka.
    fn kafka(&self) -> Option<&KafkaSinkConfig> {
        None
    }
    /// Its own `exactly_once` setting, for a sink that has one (a Kafka sink); `None` for
    /// sinks that follow the pipeline (dead letters on Kafka join its transaction).
    fn exactly_once_setting(&self) -> Option<bool> {
        None
    }
    /// The transactional id, if it asks for exactly-once delivery (`pipeline`: the
    /// pipeline's name, for the default).
    fn exactly_once(&self, _pipeline: &str) -> Option<String> {
        None
    }
    /// Whether a restore can take back what it wrote after the checkpoint (a `jsonl` file
    /// is cut back to the checkpoint's length), so that it is exactly-once too.
    fn rewinds(&self) -> bool {
        false
    }
    /// Opens it; inside `transaction` when the pipeline runs exactly once.
    fn open(&self, cx: &OpenSink<'_>) -> Result<Box<dyn Sink>, ConnectorError>;
}

/// Where and how a component was written, for its `try_new`.
pub struct Context<'a> {
    /// The pipeline file's directory: relative paths are found from it.
    pub base: &'a Path,
    /// Whether the component names any input.
    pub has_inputs: bool,
    pub(crate) body: &'a Node,
}

impl Context<'_> {
    /// `path` relative to the pipeline file.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_relative() {
            self.base.join(path)
        } else {
            path.to_path_buf()
        }
    }

    /// Whether `field` is written in the component's settings.
    pub fn is_set(&self, field: &str) -> bool {
        self.body.get(field).is_some()
    }
}

/// What an operator's wiring check sees: its inputs with their kinds and the other
/// components of the pipeline. Problems go to the pipeline's list.
pub struct Wiring<'a> {
    pub(crate) name: &'a str,
    pub(crate) path: String,
    pub(crate) body: &'a Node,
    pub(crate) name_mark: Mark,
    /// Each input: its reference, its kind (if known) and where it was written.
    pub(crate) inputs: Vec<(PortRef, Option<PortKind>, Mark)>,
    /// Every operator and sink: (type name, its input references).
    pub(crate) readers: &'a [(&'static str, Vec<PortRef>)],
    pub(crate) problems: &'a mut Vec<Problem>,
}

impl Wiring<'_> {
    /// The component's name.
    pub fn name(&self) -> &str {
        self.name
    }

    /// How many inputs carry `kind`.
    pub fn count(&self, kind: PortKind) -> usize {
        self.inputs.iter().filter(|(_, k, _)| *k == Some(kind)).count()
    }

    /// Components (by type name) reading this component's `port` (`None`: its main output,
    /// also spelled as `main`).
    pub fn readers_of(&self, port: Option<&str>, main: &str) -> Vec<&'static str> {
        self.readers
            .iter()
            .filter(|(_, inputs)| {
                inputs.iter().any(|r| {
                    r.component == self.name
                        && (r.port.as_deref() == port || (port.is_none() && r.port.as_deref() == Some(main)))
                })
            })
            .map(|(type_name, _)| *type_name)
            .collect()
    }

    /// A problem with the inputs (shown at `input`/`inputs`).
    pub fn at_inputs(&mut self, message: impl Into<String>) {
        let mark = self.body.locate("input").mark.max(self.body.locate("inputs").mark);
        self.problems.push(Problem { path: self.path.clone(), mark, message: message.into() });
    }

    /// A problem with the component as a whole (shown at its name).
    pub fn at_name(&mut self, message: impl Into<String>) {
        self.problems.push(Problem { path: self.path.clone(), mark: self.name_mark, message: message.into() });
    }

    /// A problem with `field`'s value.
    pub fn at_value(&mut self, field: &str, message: impl Into<String>) {
        let mark = self.body.locate(field).mark;
        self.problems.push(Problem { path: join(&self.path, field), mark, message: message.into() });
    }

    /// A problem about `field` (shown at its key, or at the name when it is missing).
    pub fn at_key(&mut self, field: &str, message: impl Into<String>) {
        let mark = self.body.key_of(field).map_or(self.name_mark, |key| key.mark);
        self.problems.push(Problem { path: join(&self.path, field), mark, message: message.into() });
    }
}

/// What a source needs to open on one worker.
pub struct OpenSource<'a> {
    /// Its name.
    pub name: &'a str,
    /// This worker's index among all workers of all processes.
    pub index: usize,
    /// All workers.
    pub peers: usize,
    /// State shared with the other workers of this process.
    pub shared: Option<&'a SharedSource>,
    /// The run's metrics.
    pub metrics: &'a Metrics,
    /// Whether the pipeline takes checkpoints: a source then reads a fixed share (Kafka: its
    /// partitions by worker index; a file: one reader) so that it can resume from positions.
    pub checkpointed: bool,
}

/// What a sink needs to open.
pub struct OpenSink<'a> {
    /// The run's metrics.
    pub metrics: &'a Metrics,
    /// The transaction of an exactly-once pipeline.
    pub transaction: Option<&'a edgeflow_connectors::kafka::KafkaTransaction>,
    /// What it saved at the checkpoint being restored, if anything: it goes back to that
    /// output.
    pub resume: Option<&'a [u8]>,
}

/// A component could not be built on a worker (an operator's models or data did not load).
#[derive(Debug, thiserror::Error)]
#[error("{role} `{operator}` {what}: {reason}")]
pub struct BuildError {
    /// `operator`, `source` or `sink`.
    pub role: &'static str,
    /// The component.
    pub operator: String,
    /// What failed, e.g. `cannot load its models`.
    pub what: &'static str,
    /// Why.
    pub reason: String,
}

/// A type in the registry, seen without its Rust type: what the loader, the schema and the
/// graph ask of it. `R` is the role's component trait object.
pub trait ComponentType<R: ?Sized>: Sync {
    /// The `type:` name.
    fn name(&self) -> &'static str;
    /// Its description.
    fn doc(&self) -> &'static str;
    /// Whether it needs an input.
    fn input(&self) -> Input;
    /// Whether it makes data of its own.
    fn feeds_itself(&self) -> bool;
    /// The JSON Schema of its settings (inline, without the `type` key).
    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema;
    /// Reads settings (JSON from the YAML): `Err((serde path, message))` if they do not
    /// deserialize.
    fn check(&self, config: serde_json::Value, cx: &Context<'_>) -> Result<Declared<R>, (String, String)>;
}

impl<R: ?Sized> fmt::Debug for dyn ComponentType<R> + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "type `{}`", self.name())
    }
}

/// Settings that deserialized: the component's ports, the component (or the problems of its
/// parameters) and its wiring check.
pub struct Declared<R: ?Sized> {
    /// Its ports.
    pub ports: Ports,
    /// The checked component, or every problem of its parameters.
    pub component: Result<Arc<R>, ParamErrors>,
    /// Its checks of the wiring.
    pub wiring: Box<dyn Fn(&mut Wiring<'_>)>,
}

/// A component type `T` in the registry.
pub struct Registered<T>(PhantomData<fn() -> T>);

impl<T> Registered<T> {
    /// The registry entry.
    pub const NEW: Self = Registered(PhantomData);
}

fn deserialize<T: Component>(config: serde_json::Value) -> Result<T::Config, (String, String)> {
    serde_path_to_error::deserialize::<_, T::Config>(config).map_err(|err| {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let message = err.inner().to_string();
        let message = match message.split_once(" at line ") {
            Some((head, _)) => head.to_owned(),
            None => message,
        };
        (path, message)
    })
}

macro_rules! registered_as {
    ($role:ident) => {
        impl<T: Component + $role> ComponentType<dyn $role> for Registered<T> {
            fn name(&self) -> &'static str {
                T::TYPE
            }
            fn doc(&self) -> &'static str {
                T::DOC
            }
            fn input(&self) -> Input {
                T::INPUT
            }
            fn feeds_itself(&self) -> bool {
                T::FEEDS_ITSELF
            }
            fn schema(&self, generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
                <T::Config as schemars::JsonSchema>::json_schema(generator)
            }
            fn check(
                &self,
                config: serde_json::Value,
                cx: &Context<'_>,
            ) -> Result<Declared<dyn $role>, (String, String)> {
                let config = deserialize::<T>(config)?;
                let ports = T::ports(&config);
                let component = T::try_new(config.clone(), cx).map(|c| Arc::new(c) as Arc<dyn $role>);
                Ok(Declared { ports, component, wiring: Box::new(move |cx| T::check_wiring(&config, cx)) })
            }
        }
    };
}
registered_as!(SourceComponent);
registered_as!(OperatorComponent);
registered_as!(SinkComponent);

/// A source type in the registry.
pub type SourceType = dyn ComponentType<dyn SourceComponent>;
/// An operator type in the registry.
pub type OperatorType = dyn ComponentType<dyn OperatorComponent>;
/// A sink type in the registry.
pub type SinkType = dyn ComponentType<dyn SinkComponent>;

/// Every source type, in the order of the reference.
pub static SOURCES: &[&SourceType] = &[
    &Registered::<sources::generator::GeneratorSource>::NEW,
    &Registered::<sources::file::FileSource>::NEW,
    &Registered::<sources::kafka::KafkaSource>::NEW,
    &Registered::<sources::requests::RequestsSource>::NEW,
];

/// Every operator type, in the order of the reference.
pub static OPERATORS: &[&OperatorType] = &[
    &Registered::<operators::node_health::NodeHealthOperator>::NEW,
    &Registered::<operators::window_aggregate::WindowAggregateOperator>::NEW,
    &Registered::<operators::inference::InferenceOperator>::NEW,
    &Registered::<operators::load_balance::LoadBalanceOperator>::NEW,
    &Registered::<operators::federated::FederatedOperator>::NEW,
];

/// Every sink type, in the order of the reference.
pub static SINKS: &[&SinkType] = &[
    &Registered::<sinks::stdout::StdoutSink>::NEW,
    &Registered::<sinks::file::FileSink>::NEW,
    &Registered::<sinks::dead_letter::DeadLetterSink>::NEW,
    &Registered::<sinks::kafka::KafkaSink>::NEW,
];

/// The type called `name` among `types`.
pub fn find<R: ?Sized + 'static>(
    types: &'static [&'static dyn ComponentType<R>],
    name: &str,
) -> Option<&'static dyn ComponentType<R>> {
    types.iter().copied().find(|t| t.name() == name)
}

/// The names of `types`.
pub fn names<R: ?Sized>(types: &[&dyn ComponentType<R>]) -> Vec<&'static str> {
    types.iter().map(|t| t.name()).collect()
}

/// `path.field`, or `path` for an empty field.
pub(crate) fn join(path: &str, field: &str) -> String {
    match (path.is_empty(), field.is_empty()) {
        (_, true) => path.to_owned(),
        (true, false) => field.to_owned(),
        (false, false) => format!("{path}.{field}"),
    }
}

/// Brokers must be `host:port` entries; topic names follow Kafka's rules. `prefix` is the
/// field the Kafka settings are under (empty at the top of the component).
pub(crate) fn check_kafka<'t>(
    problems: &mut ParamErrors,
    prefix: &str,
    brokers: &str,
    topics: impl IntoIterator<Item = &'t String>,
) {
    let bad_broker = brokers
        .split(',')
        .map(str::trim)
        .find(|b| b.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err()));
    if let Some(broker) = bad_broker {
        problems.at_value(
            join(prefix, "brokers"),
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
            problems.at_value(
                prefix,
                format!(
                    "`{topic}` is not a valid topic name\nhint: use letters, digits, `.`, `_` and `-` (at most 249)"
                ),
            );
        }
    }
    if !any {
        problems.at_value(join(prefix, "topics"), "no topic given; list at least one");
    }
}

/// The port kinds of every component output, by reference text (`name`, `name.port`).
pub(crate) type PortKinds = BTreeMap<String, Vec<(&'static str, PortKind)>>;

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Wiring<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wiring").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for OpenSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenSource").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for OpenSink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenSink").finish_non_exhaustive()
    }
}

impl<R: ?Sized> std::fmt::Debug for Declared<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Declared").finish_non_exhaustive()
    }
}

impl<T> std::fmt::Debug for Registered<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registered").finish_non_exhaustive()
    }
}

//! Builds the timely dataflow of a pipeline on one worker.

use std::collections::BTreeMap;
use std::sync::Arc;

use differential_dataflow::input::InputSession;
use differential_dataflow::VecCollection;
use edgeflow_operators::federated::coordinator::PlanRecord;
use edgeflow_operators::federated::update::ModelUpdate;
use edgeflow_operators::{
    DeadLetter, EventTime, Heartbeat, InferenceRequest, InferenceResult, NodeState, RawMessage, RegionRollup,
    StatusChange, WindowResult,
};
use timely::dataflow::operators::core::Inspect;
use timely::dataflow::operators::feedback::Handle as FeedbackHandle;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::ConnectLoop;
use timely::dataflow::operators::{Concatenate, Probe};
use timely::dataflow::{ProbeHandle, Scope, StreamVec};

use super::sink::{sink_operator, Failure, OrderedResult, SinkGroup, SinkItem};
use crate::components::BuildError;
use crate::config::{Pipeline, PortKind, PortRef};
use crate::metrics::Metrics;

/// A stream of one of the record kinds, as an output port of a component.
#[derive(Clone)]
pub enum Port<'scope> {
    /// Heartbeats.
    Heartbeats(VecCollection<'scope, EventTime, Heartbeat>),
    /// Node status collection.
    Status(VecCollection<'scope, EventTime, (u64, NodeState)>),
    /// Status changes.
    Changes(StreamVec<'scope, EventTime, StatusChange>),
    /// Region rollups.
    Rollups(StreamVec<'scope, EventTime, RegionRollup>),
    /// Window results.
    Windows(StreamVec<'scope, EventTime, WindowResult>),
    /// Dead letters.
    DeadLetters(StreamVec<'scope, EventTime, (DeadLetter, EventTime)>),
    /// Inference requests.
    Requests(StreamVec<'scope, EventTime, Box<InferenceRequest>>),
    /// Inference results.
    Results(StreamVec<'scope, EventTime, Box<InferenceResult>>),
    /// Federated round reports (time: the round).
    Rounds(StreamVec<'scope, EventTime, edgeflow_operators::federated::operator::RoundReport>),
    /// Global model versions (time: the round).
    Models(StreamVec<'scope, EventTime, edgeflow_operators::federated::operator::GlobalModel>),
    /// Federated client updates.
    Updates(StreamVec<'scope, EventTime, ModelUpdate>),
    /// Federated round plans (time: the round before).
    Plans(StreamVec<'scope, EventTime, PlanRecord>),
    /// Messages as raw bytes.
    Raw(StreamVec<'scope, EventTime, RawMessage>),
}

/// The inputs of one source on this worker.
pub struct SourceInputs {
    /// Heartbeats, at their event time.
    pub heartbeats: InputSession<EventTime, Heartbeat, isize>,
    /// Inference requests, at their event time.
    pub requests: InputSession<EventTime, Box<InferenceRequest>, isize>,
    /// Federated client updates, at their event time.
    pub updates: InputSession<EventTime, ModelUpdate, isize>,
    /// Raw messages, at their event time.
    pub raw: InputSession<EventTime, RawMessage, isize>,
    /// Dead letters, at the watermark when they were found.
    pub dead_letters: InputSession<EventTime, DeadLetter, isize>,
}

impl SourceInputs {
    /// Feeds `record` into the input of its kind at `time`.
    pub fn insert(&mut self, record: edgeflow_operators::Record, time: EventTime) {
        match record {
            edgeflow_operators::Record::Heartbeat(heartbeat) => self.heartbeats.update_at(heartbeat, time, 1),
            edgeflow_operators::Record::Request(request) => self.requests.update_at(request, time, 1),
            edgeflow_operators::Record::Update(update) => self.updates.update_at(*update, time, 1),
            edgeflow_operators::Record::Raw(message) => self.raw.update_at(*message, time, 1),
        }
    }
}

/// Records on their way to a sink operator.
type SinkStream<'scope> = StreamVec<'scope, EventTime, (EventTime, SinkItem)>;

/// The sinks of a pipeline on this worker.
pub struct Sinks {
    /// Each sink's name and connector (connectors on worker 0 only), in pipeline order.
    pub sinks: Vec<(String, Option<Box<dyn edgeflow_connectors::Sink>>)>,
    /// The transaction of an exactly-once pipeline (worker 0 only).
    pub transaction: Option<Box<dyn edgeflow_connectors::Transaction>>,
    /// Whether the pipeline runs exactly once: then one sink operator writes all sinks
    /// inside the transaction, committed with each checkpoint.
    pub exactly_once: bool,
    /// The worker's checkpointed state, when the pipeline takes checkpoints: each sink
    /// saves how far its output goes.
    pub state: Option<edgeflow_operators::state::WorkerState>,
    /// Where a sink reports a failure.
    pub failure: Failure,
    /// The run's stop flag (a sink whose reader went away stops the run).
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The live tables the `serve` section's outputs feed (worker 0 holds them).
    pub tables: Option<crate::serve::feed::SharedTables>,
}

/// Probes of a built dataflow.
pub struct Probes {
    /// Passes a time once every source input (of every worker) has passed it.
    pub inputs: ProbeHandle<EventTime>,
    /// Passes a time once every sink has written and flushed everything before it.
    pub sinks: ProbeHandle<EventTime>,
    /// Passes a time once the dataflow has delivered everything before it to the sinks
    /// (not necessarily flushed): what flow control waits on.
    pub processed: ProbeHandle<EventTime>,
}

/// Builds the pipeline's dataflow in `scope`; returns each source's inputs (in pipeline
/// order) and the probes.
pub fn build<'scope>(
    scope: Scope<'scope, EventTime>,
    pipeline: &Pipeline,
    sinks: Sinks,
    metrics: &Arc<Metrics>,
    state: &edgeflow_operators::state::WorkerState,
) -> Result<(Vec<SourceInputs>, Probes), BuildError> {
    let mut ports: BTreeMap<String, Port<'scope>> = BTreeMap::new();
    let mut inputs = Vec::new();
    let input_probe = ProbeHandle::new();
    for source in &pipeline.sources {
        let mut heartbeats = InputSession::new();
        let mut requests: InputSession<EventTime, Box<InferenceRequest>, isize> = InputSession::new();
        let mut updates: InputSession<EventTime, ModelUpdate, isize> = InputSession::new();
        let mut raw: InputSession<EventTime, RawMessage, isize> = InputSession::new();
        let mut dead_letters = InputSession::new();
        let collection = heartbeats.to_collection(scope);
        let collection =
            differential_dataflow::collection::AsCollection::as_collection(collection.inner.probe_with(&input_probe));
        let request_stream = at_record_time(requests.to_collection(scope).inner.probe_with(&input_probe));
        let update_stream = at_record_time(updates.to_collection(scope).inner.probe_with(&input_probe));
        let raw_stream = at_record_time(raw.to_collection(scope).inner.probe_with(&input_probe));
        let port = match source.ports.main() {
            Some(PortKind::RawMessages) => Port::Raw(raw_stream),
            Some(PortKind::Heartbeats) => Port::Heartbeats(collection),
            Some(PortKind::InferenceRequests) => Port::Requests(request_stream),
            Some(PortKind::ModelUpdates) => Port::Updates(update_stream),
            other => {
                return Err(BuildError {
                    role: "source",
                    operator: source.name.clone(),
                    what: "is a source of an unknown kind",
                    reason: format!("{other:?} (a bug: sources yield records)"),
                })
            }
        };
        ports.insert(source.name.clone(), port);
        let letters =
            dead_letters.to_collection(scope).inner.probe_with(&input_probe).map(|(letter, time, _)| (letter, time));
        ports.insert(format!("{}.dead_letters", source.name), Port::DeadLetters(letters));
        inputs.push(SourceInputs { heartbeats, requests, updates, raw, dead_letters });
    }

    // Load balancers by name: the status changes they place on, the feedback edge their
    // re-routed requests come back on, and their unplaced requests.
    let mut balancers: BTreeMap<String, Balanced<'scope>> = BTreeMap::new();
    for operator in &pipeline.operators {
        let span = tracing::info_span!("operator", name = %operator.name, r#type = operator.kind.name());
        let _entered = span.enter();
        // Validation resolved every input; one that does not resolve here is a bug, never a
        // reason to build the operator without it.
        if let Some(missing) = operator.inputs.iter().find(|r| !ports.contains_key(&r.to_string())) {
            return Err(unresolved("operator", &operator.name, missing));
        }
        let mut cx = Build { scope, ports: &ports, metrics, balancers: &mut balancers, state };
        let outputs = operator.component.build(&operator.name, &operator.inputs, &mut cx)?;
        if outputs.len() != operator.ports.outputs.len() {
            return Err(BuildError {
                role: "operator",
                operator: operator.name.clone(),
                what: "built the wrong number of outputs",
                reason: format!("{} instead of {} (a bug)", outputs.len(), operator.ports.outputs.len()),
            });
        }
        for (index, ((port, _), stream)) in operator.ports.outputs.iter().zip(outputs).enumerate() {
            if index == 0 {
                ports.insert(operator.name.clone(), stream.clone());
            }
            ports.insert(format!("{}.{port}", operator.name), stream);
        }
    }

    for (_, balanced) in balancers {
        scope.concatenate(balanced.reroutes).connect_loop(balanced.feedback);
    }

    let Sinks { sinks, transaction, exactly_once, failure, stop, state: saved, tables } = sinks;
    if let (Some(serving), Some(tables)) = (&pipeline.serve, tables) {
        for table in &serving.tables {
            let Some(port) = ports.get(&table.input.to_string()) else { continue };
            // A node status table also holds each node's latest heartbeat: the heartbeats
            // its operator reads.
            let heartbeats: Vec<_> = pipeline
                .operators
                .iter()
                .filter(|operator| operator.name == table.input.component)
                .flat_map(|operator| &operator.inputs)
                .filter_map(|input| match ports.get(&input.to_string()) {
                    Some(Port::Heartbeats(collection)) => Some(collection.inner.clone()),
                    _ => None,
                })
                .collect();
            serve_table(port, &table.name, table.kind, &tables, scope.concatenate(heartbeats));
        }
    }
    let probe = ProbeHandle::new();
    let processed = ProbeHandle::new();
    let mut groups: Vec<(SinkGroup, Vec<SinkStream<'scope>>)> = Vec::new();
    let group = |span, transaction| SinkGroup {
        sinks: Vec::new(),
        transaction,
        failure: failure.clone(),
        stop: stop.clone(),
        span,
        saves: Vec::new(),
    };
    if exactly_once {
        let names: Vec<&str> = pipeline.sinks.iter().map(|sink| sink.name.as_str()).collect();
        let span = tracing::info_span!("sinks", names = %names.join(","), r#type = "transaction");
        groups.push((group(span, transaction), Vec::new()));
    }
    for (spec, handle) in pipeline.sinks.iter().zip(sinks) {
        if !exactly_once {
            let span = tracing::info_span!("sink", name = %spec.name, r#type = spec.kind.name());
            groups.push((group(span, None), Vec::new()));
        }
        let Some((group, streams)) = groups.last_mut() else { continue };
        let index = group.sinks.len();
        group.sinks.push(handle);
        if let Some(saved) = &saved {
            group.saves.push(saved.handle(&format!("@sink/{}", spec.name)));
        }
        let references: Vec<PortRef> = if spec.inputs.is_empty() {
            // A dead_letter sink without inputs takes every source's dead letters.
            pipeline
                .sources
                .iter()
                .map(|s| PortRef { component: s.name.clone(), port: Some("dead_letters".into()) })
                .collect()
        } else {
            spec.inputs.clone()
        };
        let takes_results = spec.component.takes_results();
        for reference in references {
            match ports.get(&reference.to_string()) {
                None => return Err(unresolved("sink", &spec.name, &reference)),
                // Raw messages keep their bytes up to the sink.
                Some(Port::Raw(stream)) => {
                    streams.push(stream.clone().map(move |message| (message.timestamp, SinkItem::Raw(index, message))));
                }
                // A sink with a results format of its own takes the results themselves.
                Some(Port::Results(stream)) if takes_results => {
                    streams.push(
                        stream
                            .clone()
                            .map(move |result| (result.timestamp, SinkItem::Result(index, OrderedResult(result)))),
                    );
                }
                Some(port) => {
                    streams.push(encode(port.clone()).map(move |(key, line)| (key, SinkItem::Line(index, line))));
                }
            }
        }
    }
    for (group, streams) in groups {
        let merged = scope.concatenate(streams).probe_with(&processed);
        sink_operator(merged, group, metrics.clone()).probe_with(&probe);
    }
    Ok((inputs, Probes { inputs: input_probe, sinks: probe, processed }))
}

/// The error for an input that names no stream: validation resolves every input, so this is
/// a bug, reported rather than building the component without the input.
fn unresolved(role: &'static str, component: &str, reference: &PortRef) -> BuildError {
    BuildError {
        role,
        operator: component.to_owned(),
        what: "reads an output that was not built",
        reason: format!("`{reference}` (a bug in edgeflow: validation accepted it)"),
    }
}

/// The records of a source's collection as a stream whose message times are the records'
/// times (a collection's message may be at an earlier time than its records), repeated by
/// their multiplicity.
fn at_record_time<'scope, D: Clone + 'static>(
    updates: StreamVec<'scope, EventTime, (D, EventTime, isize)>,
) -> StreamVec<'scope, EventTime, D> {
    use timely::dataflow::channels::pact::Pipeline;
    use timely::dataflow::operators::Operator;
    updates.unary(Pipeline, "AtRecordTime", |_, _| {
        move |input, output| {
            input.for_each(|cap, data| {
                if !data.is_sorted_by_key(|(_, time, _)| *time) {
                    data.sort_by_key(|(_, time, _)| *time);
                }
                let mut updates = std::mem::take(data).into_iter().peekable();
                while let Some((request, time, diff)) = updates.next() {
                    let cap = cap.delayed(&time, output.output_index());
                    let mut session = output.session(&cap);
                    let same_time = std::iter::from_fn(|| updates.next_if(|(_, t, _)| *t == time));
                    for (request, _, diff) in std::iter::once((request, time, diff)).chain(same_time) {
                        for _ in 1..diff.max(0) {
                            session.give(request.clone());
                        }
                        if diff > 0 {
                            session.give(request);
                        }
                    }
                }
            });
        }
    })
}

/// A load balancer in the dataflow, as the inference operator reading it sees it.
pub struct Balanced<'scope> {
    /// Results of requests no node could take.
    pub unplaced: StreamVec<'scope, EventTime, Box<InferenceResult>>,
    /// The status changes it places on (an inference operator reading it re-routes on them).
    pub changes: StreamVec<'scope, EventTime, StatusChange>,
    /// Where re-routed requests re-enter it (one time unit later).
    pub feedback: FeedbackHandle<'scope, EventTime, Vec<InferenceRequest>>,
    /// The re-routed requests of the inference operator reading it.
    pub reroutes: Vec<StreamVec<'scope, EventTime, InferenceRequest>>,
}

/// What an operator sees while it is built on one worker: the scope, the streams of the
/// components built before it, the metrics, and the load balancers (an inference operator
/// reading one sends re-routed requests back to it).
pub struct Build<'a, 'scope> {
    /// The dataflow scope.
    pub scope: Scope<'scope, EventTime>,
    ports: &'a BTreeMap<String, Port<'scope>>,
    /// The run's metrics.
    pub metrics: &'a Arc<Metrics>,
    /// Load balancers built so far, by name.
    pub balancers: &'a mut BTreeMap<String, Balanced<'scope>>,
    /// The worker's checkpointed state: an operator that saves its state takes part through
    /// it (see [`edgeflow_operators::state`]).
    pub state: &'a edgeflow_operators::state::WorkerState,
}

impl<'scope> Build<'_, 'scope> {
    /// The stream of an input.
    pub fn port(&self, reference: &PortRef) -> Option<&Port<'scope>> {
        self.ports.get(&reference.to_string())
    }

    /// The heartbeats among `inputs`, merged.
    pub fn heartbeats(&self, inputs: &[PortRef]) -> VecCollection<'scope, EventTime, Heartbeat> {
        let streams: Vec<_> = inputs
            .iter()
            .filter_map(|reference| match self.port(reference) {
                Some(Port::Heartbeats(collection)) => Some(collection.inner.clone()),
                _ => None,
            })
            .collect();
        differential_dataflow::collection::AsCollection::as_collection(self.scope.concatenate(streams))
    }

    /// `collection`, counting its updates as records of `operator`'s `port`.
    pub fn count(
        &self,
        collection: VecCollection<'scope, EventTime, Heartbeat>,
        operator: &str,
        port: &'static str,
    ) -> VecCollection<'scope, EventTime, Heartbeat> {
        let counted = self.count_stream(collection.inner, operator, port);
        differential_dataflow::collection::AsCollection::as_collection(counted)
    }

    /// `stream`, counting its records as records of `operator`'s `port`.
    pub fn count_stream<D: 'static>(
        &self,
        stream: StreamVec<'scope, EventTime, D>,
        operator: &str,
        port: &'static str,
    ) -> StreamVec<'scope, EventTime, D> {
        let counter = self
            .metrics
            .operator_records
            .get_or_create(&crate::metrics::labels::OperatorPort { operator: operator.to_owned(), port })
            .clone();
        stream.inspect_core(move |event| {
            if let Ok((_, batch)) = event {
                counter.inc_by(batch.len() as u64);
            }
        })
    }
}

/// Feeds live table `name` from `port` (a servable output: validation checked its kind).
fn serve_table<'scope>(
    port: &Port<'scope>,
    name: &str,
    kind: crate::config::PortKind,
    tables: &crate::serve::feed::SharedTables,
    heartbeats: StreamVec<'scope, EventTime, (Heartbeat, EventTime, isize)>,
) {
    use crate::serve::feed::{append_rows, collection_rows, feed, feed_with_latest, latest_heartbeats};
    let Some(layout) = crate::serve::rows::Layout::of(kind) else { return };
    let rows = match port {
        Port::Status(collection) => {
            let statuses = collection.inner.clone().map(|((_, state), time, diff)| (state, time, diff));
            let rows = collection_rows(statuses, layout, name);
            return feed_with_latest(rows, latest_heartbeats(heartbeats), name, tables.clone());
        }
        Port::Changes(stream) => append_rows(stream.clone(), layout, name),
        Port::Rollups(stream) => append_rows(stream.clone(), layout, name),
        Port::Windows(stream) => append_rows(stream.clone(), layout, name),
        Port::Results(stream) => append_rows(stream.clone(), layout, name),
        Port::Rounds(stream) => append_rows(stream.clone(), layout, name),
        _ => return,
    };
    feed(rows, name, tables.clone());
}

/// Encodes a port's records as `(event time, JSON line)` for sinks.
fn encode(port: Port<'_>) -> StreamVec<'_, EventTime, (EventTime, String)> {
    fn json<T: serde::Serialize>(value: &T) -> String {
        // Records are plain data; serialising them to JSON cannot fail.
        serde_json::to_string(value).unwrap_or_default()
    }
    match port {
        Port::Heartbeats(collection) => collection.inner.map(|(hb, time, _)| (time, json(&hb))),
        Port::Status(collection) => collection.inner.map(|((_, state), time, diff)| {
            let mut value = serde_json::to_value(&state).unwrap_or_default();
            value["time"] = time.into();
            value["diff"] = (diff as i64).into();
            (time, value.to_string())
        }),
        Port::Changes(stream) => stream.map(|change| (change.time, json(&change))),
        Port::Rollups(stream) => stream.map(|rollup| (rollup.window_end, json(&rollup))),
        Port::Windows(stream) => stream.map(|result| (result.window_end, json(&result))),
        Port::DeadLetters(stream) => stream.map(|(letter, time)| (time, letter.to_json().to_string())),
        Port::Requests(stream) => stream.map(|request| (request.timestamp, json(&request))),
        Port::Results(stream) => {
            stream.map(|result| (result.timestamp, String::from_utf8(result.to_json_line()).unwrap_or_default()))
        }
        Port::Rounds(stream) => stream.map(|report| (report.round(), json(&report))),
        Port::Models(stream) => stream.map(|model| (model.round(), json(&model))),
        Port::Updates(stream) => stream.map(|update| (update.timestamp, json(&update))),
        // A plan is published at the time of the round before it (the round it follows).
        Port::Plans(stream) => stream.map(|record| (record.plan.round.saturating_sub(1), json(&record))),
        Port::Raw(stream) => stream.map(|message| (message.timestamp, message.to_json().to_string())),
    }
}

impl std::fmt::Debug for Port<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Balanced<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balanced").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Build<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Build").finish_non_exhaustive()
    }
}

//! Builds the timely dataflow of a pipeline on one worker.

use std::collections::BTreeMap;
use std::sync::Arc;

use differential_dataflow::input::InputSession;
use differential_dataflow::VecCollection;
use edgeflow_connectors::onnx::OnnxModel;
use edgeflow_operators::federated::coordinator::PlanRecord;
use edgeflow_operators::federated::update::ModelUpdate;
use edgeflow_operators::load_balance::{load_balance, FleetUpdate, Incoming, LoadBalanceConfig, Placement};
use edgeflow_operators::node_health::{NodeHealth, NodeHealthParams};
use edgeflow_operators::window_aggregate::heartbeat_windows;
use edgeflow_operators::{
    DeadLetter, EventTime, Heartbeat, InferenceRequest, InferenceResult, NodeState, RawMessage, RecordKind,
    RegionRollup, StatusChange, WindowResult,
};
use timely::dataflow::operators::core::Inspect;
use timely::dataflow::operators::feedback::Handle as FeedbackHandle;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concatenate, Probe};
use timely::dataflow::operators::{ConnectLoop, Feedback};
use timely::dataflow::{ProbeHandle, Scope, StreamVec};

use super::federated::ClientHealth;
use super::inference::InferenceOut;
use super::sink::{sink_operator, Failure, OrderedResult, SinkGroup, SinkItem};
use crate::config::{OperatorConfig, Pipeline, PortRef};
use crate::metrics::Metrics;

/// A stream of one of the record kinds, as an output port of a component.
#[derive(Clone)]
pub(crate) enum Port<'scope> {
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
    Rounds(StreamVec<'scope, EventTime, super::federated::RoundReport>),
    /// Global model versions (time: the round).
    Models(StreamVec<'scope, EventTime, super::federated::GlobalModel>),
    /// Federated client updates.
    Updates(StreamVec<'scope, EventTime, ModelUpdate>),
    /// Federated round plans (time: the round before).
    Plans(StreamVec<'scope, EventTime, PlanRecord>),
    /// Messages as raw bytes.
    Raw(StreamVec<'scope, EventTime, RawMessage>),
}

/// What a pipeline's operators loaded before the dataflow was built (per worker).
#[derive(Default)]
pub struct Resources {
    /// Each inference operator's models.
    pub models: BTreeMap<String, Vec<OnnxModel>>,
    /// Each federated operator's data.
    pub(crate) federated: BTreeMap<String, super::federated::FederatedData>,
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
    /// Source positions, at the time of the last record they cover; they travel to the
    /// sinks' transaction in an exactly-once pipeline (and nowhere otherwise).
    pub checkpoints: InputSession<EventTime, edgeflow_connectors::Checkpoint, isize>,
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
    /// inside the transaction, with the sources' checkpoints.
    pub exactly_once: bool,
    /// Where a sink reports a failure.
    pub failure: Failure,
    /// The run's stop flag (a sink whose reader went away stops the run).
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
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
    resources: Resources,
    metrics: &Arc<Metrics>,
) -> (Vec<SourceInputs>, Probes) {
    let Resources { mut models, mut federated } = resources;
    let mut ports: BTreeMap<String, Port<'scope>> = BTreeMap::new();
    let mut inputs = Vec::new();
    let input_probe = ProbeHandle::new();
    let mut checkpoint_streams = Vec::new();
    for source in &pipeline.sources {
        let mut heartbeats = InputSession::new();
        let mut requests: InputSession<EventTime, Box<InferenceRequest>, isize> = InputSession::new();
        let mut updates: InputSession<EventTime, ModelUpdate, isize> = InputSession::new();
        let mut raw: InputSession<EventTime, RawMessage, isize> = InputSession::new();
        let mut dead_letters = InputSession::new();
        let mut checkpoints = InputSession::new();
        checkpoint_streams.push(
            checkpoints
                .to_collection(scope)
                .inner
                .probe_with(&input_probe)
                .map(|(checkpoint, time, _)| (time, SinkItem::Offsets(checkpoint))),
        );
        let collection = heartbeats.to_collection(scope);
        let collection =
            differential_dataflow::collection::AsCollection::as_collection(collection.inner.probe_with(&input_probe));
        let request_stream = at_record_time(requests.to_collection(scope).inner.probe_with(&input_probe));
        let update_stream = at_record_time(updates.to_collection(scope).inner.probe_with(&input_probe));
        let raw_stream = at_record_time(raw.to_collection(scope).inner.probe_with(&input_probe));
        let port = match source.config.records() {
            _ if source.config.is_raw() => Port::Raw(raw_stream),
            RecordKind::Heartbeats => Port::Heartbeats(collection),
            RecordKind::InferenceRequests => Port::Requests(request_stream),
            RecordKind::ModelUpdates => Port::Updates(update_stream),
        };
        ports.insert(source.name.clone(), port);
        let letters =
            dead_letters.to_collection(scope).inner.probe_with(&input_probe).map(|(letter, time, _)| (letter, time));
        ports.insert(format!("{}.dead_letters", source.name), Port::DeadLetters(letters));
        inputs.push(SourceInputs { heartbeats, requests, updates, raw, dead_letters, checkpoints });
    }

    // Load balancers by name: the status changes they place on, the feedback edge their
    // re-routed requests come back on, and their unplaced requests.
    let mut balancers: BTreeMap<String, Balanced<'scope>> = BTreeMap::new();
    for operator in &pipeline.operators {
        if let OperatorConfig::Federated(config) = &operator.config {
            let Some(data) = federated.remove(&operator.name) else { continue };
            // External clients: their updates come from the operator's inputs.
            let external: Vec<_> = operator
                .inputs
                .iter()
                .filter_map(|reference| match ports.get(&reference.to_string()) {
                    Some(Port::Updates(stream)) => Some(stream.clone()),
                    _ => None,
                })
                .collect();
            let external = (!operator.inputs.is_empty()).then(|| scope.concatenate(external));
            // Live health of the clients (edge nodes of the same ids): status changes and
            // heartbeats among the inputs.
            let health = operator
                .inputs
                .iter()
                .filter_map(|reference| match ports.get(&reference.to_string()) {
                    Some(Port::Changes(stream)) => Some(
                        stream.clone().map(|change| ClientHealth::Status { node: change.node_id, status: change.to }),
                    ),
                    Some(Port::Heartbeats(collection)) => Some(collection.inner.clone().flat_map(|(beat, _, diff)| {
                        (diff > 0).then_some(ClientHealth::Load {
                            node: beat.node_id,
                            cpu: beat.cpu,
                            memory: beat.memory,
                        })
                    })),
                    _ => None,
                })
                .collect();
            let ports_of = super::federated::federated(scope, &operator.name, config, data, external, health, metrics);
            let rounds = count_stream(ports_of.rounds, metrics, &operator.name, "rounds");
            ports.insert(operator.name.clone(), Port::Rounds(rounds.clone()));
            ports.insert(format!("{}.rounds", operator.name), Port::Rounds(rounds));
            ports.insert(format!("{}.models", operator.name), Port::Models(ports_of.models));
            ports.insert(format!("{}.plans", operator.name), Port::Plans(ports_of.plans));
            ports.insert(format!("{}.rejected", operator.name), Port::DeadLetters(ports_of.rejected));
            continue;
        }
        if let OperatorConfig::LoadBalance(config) = &operator.config {
            let balanced = build_balancer(scope, &ports, operator, config, metrics);
            let placed = count_stream(balanced.placed.clone(), metrics, &operator.name, "requests");
            let unplaced = count_stream(balanced.unplaced.clone(), metrics, &operator.name, "unplaced");
            ports.insert(operator.name.clone(), Port::Requests(placed.clone()));
            ports.insert(format!("{}.requests", operator.name), Port::Requests(placed));
            ports.insert(format!("{}.unplaced", operator.name), Port::Results(unplaced));
            balancers.insert(operator.name.clone(), balanced);
            continue;
        }
        if let OperatorConfig::Inference(config) = &operator.config {
            let models = models.remove(&operator.name).unwrap_or_default();
            // Heartbeats are scored with the first model, through its only input.
            let input = models.first().and_then(|m| m.interface().inputs.first()).map(|s| s.name.clone());
            let mut streams = Vec::new();
            let balancer_name = operator
                .inputs
                .iter()
                .find(|r| r.port.as_deref().is_none_or(|p| p == "requests") && balancers.contains_key(&r.component))
                .map(|r| r.component.clone());
            let balancer = balancer_name.and_then(|name| balancers.get_mut(&name));
            for reference in &operator.inputs {
                match ports.get(&reference.to_string()) {
                    Some(Port::Requests(stream)) => streams.push(stream.clone()),
                    Some(Port::Heartbeats(collection)) => {
                        let (config, input) = (config.clone(), input.clone().unwrap_or_default());
                        streams.push(
                            collection
                                .inner
                                .clone()
                                .map(move |(heartbeat, _, _)| Box::new(config.heartbeat_request(&heartbeat, &input))),
                        );
                    }
                    _ => {}
                }
            }
            let requests = count_stream(scope.concatenate(streams), metrics, &operator.name, "input");
            let changes = balancer.as_ref().map_or_else(|| scope.concatenate(Vec::new()), |b| b.changes.clone());
            let out = super::inference::inference(requests, changes, &operator.name, config, models, metrics);
            let mut results = out.clone().flat_map(|out| match out {
                InferenceOut::Result(result) => Some(result),
                InferenceOut::Reroute(_) => None,
            });
            if let Some(balancer) = balancer {
                // Requests no node could take are results of this operator too; requests
                // whose node went Offline go back to the balancer.
                results = scope.concatenate([results, balancer.unplaced.clone()]);
                balancer.reroutes.push(out.flat_map(|out| match out {
                    InferenceOut::Reroute(request) => Some(*request),
                    InferenceOut::Result(_) => None,
                }));
            }
            let results = count_stream(results, metrics, &operator.name, "results");
            ports.insert(operator.name.clone(), Port::Results(results.clone()));
            ports.insert(format!("{}.results", operator.name), Port::Results(results));
            continue;
        }
        let heartbeats = heartbeat_inputs(scope, &ports, &operator.inputs);
        let counted = count(heartbeats, metrics, &operator.name, "input");
        match &operator.config {
            OperatorConfig::NodeHealth(config) => {
                // Validated when the pipeline was loaded.
                let Ok(params) = NodeHealthParams::try_new(config) else { continue };
                let streams = counted.node_health(&params);
                let nodes = metrics.clone();
                let status = streams.status.clone().inner.inspect(move |((_, state), _, diff)| {
                    nodes.add_nodes(state.status, *diff as i64);
                });
                let status = differential_dataflow::collection::AsCollection::as_collection(status);
                let changes = count_stream(streams.changes, metrics, &operator.name, "changes");
                let rollups = count_stream(streams.rollups, metrics, &operator.name, "rollups");
                ports.insert(operator.name.clone(), Port::Changes(changes.clone()));
                ports.insert(format!("{}.changes", operator.name), Port::Changes(changes));
                ports.insert(format!("{}.status", operator.name), Port::Status(status));
                ports.insert(format!("{}.rollups", operator.name), Port::Rollups(rollups));
            }
            OperatorConfig::WindowAggregate(config) => {
                let Ok(results) = heartbeat_windows(counted.inner, &operator.name, config) else { continue };
                let results = count_stream(results, metrics, &operator.name, "results");
                ports.insert(operator.name.clone(), Port::Windows(results.clone()));
                ports.insert(format!("{}.results", operator.name), Port::Windows(results));
            }
            OperatorConfig::Inference(_) | OperatorConfig::LoadBalance(_) | OperatorConfig::Federated(_) => {}
        }
    }

    for (_, balanced) in balancers {
        scope.concatenate(balanced.reroutes).connect_loop(balanced.feedback);
    }

    let probe = ProbeHandle::new();
    let processed = ProbeHandle::new();
    let mut groups: Vec<(SinkGroup, Vec<SinkStream<'scope>>)> = Vec::new();
    let Sinks { sinks, transaction, exactly_once, failure, stop } = sinks;
    if exactly_once {
        groups.push((
            SinkGroup { sinks: Vec::new(), transaction, failure: failure.clone(), stop: stop.clone() },
            checkpoint_streams,
        ));
    }
    for (spec, handle) in pipeline.sinks.iter().zip(sinks) {
        if !exactly_once {
            groups.push((
                SinkGroup { sinks: Vec::new(), transaction: None, failure: failure.clone(), stop: stop.clone() },
                Vec::new(),
            ));
        }
        let Some((group, streams)) = groups.last_mut() else { continue };
        let index = group.sinks.len();
        group.sinks.push(handle);
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
        let takes_results = spec.config.takes_results();
        for reference in references {
            match ports.get(&reference.to_string()) {
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
                None => {}
            }
        }
    }
    for (group, streams) in groups {
        let merged = scope.concatenate(streams).probe_with(&processed);
        sink_operator(merged, group, metrics.clone()).probe_with(&probe);
    }
    (inputs, Probes { inputs: input_probe, sinks: probe, processed })
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

/// A load balancer in the dataflow.
struct Balanced<'scope> {
    /// Requests with their node.
    placed: StreamVec<'scope, EventTime, Box<InferenceRequest>>,
    /// Results of requests no node could take.
    unplaced: StreamVec<'scope, EventTime, Box<InferenceResult>>,
    /// The status changes it places on (an inference operator reading it re-routes on them).
    changes: StreamVec<'scope, EventTime, StatusChange>,
    /// Where re-routed requests re-enter it (one time unit later).
    feedback: FeedbackHandle<'scope, EventTime, Vec<InferenceRequest>>,
    /// The re-routed requests of the inference operator reading it.
    reroutes: Vec<StreamVec<'scope, EventTime, InferenceRequest>>,
}

fn build_balancer<'scope>(
    scope: Scope<'scope, EventTime>,
    ports: &BTreeMap<String, Port<'scope>>,
    operator: &crate::config::OperatorSpec,
    config: &LoadBalanceConfig,
    metrics: &Arc<Metrics>,
) -> Balanced<'scope> {
    let (feedback, rerouted) = scope.feedback::<Vec<InferenceRequest>>(1);
    let mut requests = vec![rerouted.map(Incoming::Reroute)];
    let mut updates = Vec::new();
    let mut changes = Vec::new();
    for reference in &operator.inputs {
        match ports.get(&reference.to_string()) {
            Some(Port::Requests(stream)) => requests.push(stream.clone().map(|request| Incoming::New(*request))),
            Some(Port::Changes(stream)) => {
                changes.push(stream.clone());
                updates.push(stream.clone().map(FleetUpdate::Change));
            }
            Some(Port::Heartbeats(collection)) => {
                updates.push(collection.inner.clone().map(|(heartbeat, _, _)| FleetUpdate::Beat(heartbeat)));
            }
            _ => {}
        }
    }
    let placements = load_balance(scope.concatenate(requests), scope.concatenate(updates), config, &operator.name);
    let family = metrics.inference.placed.clone();
    let name = operator.name.clone();
    let placements = placements.inspect(move |placement| {
        let status = match placement {
            Placement::Assigned(_) => "assigned",
            Placement::Unplaced(_) => "unplaced",
        };
        family.get_or_create(&vec![("operator", name.clone()), ("status", status.to_owned())]).inc();
    });
    Balanced {
        placed: placements.clone().flat_map(|p| match p {
            Placement::Assigned(request) => Some(Box::new(request)),
            Placement::Unplaced(_) => None,
        }),
        unplaced: placements.flat_map(|p| match p {
            Placement::Unplaced(result) => Some(Box::new(result)),
            Placement::Assigned(_) => None,
        }),
        changes: scope.concatenate(changes),
        feedback,
        reroutes: Vec::new(),
    }
}

fn heartbeat_inputs<'scope>(
    scope: Scope<'scope, EventTime>,
    ports: &BTreeMap<String, Port<'scope>>,
    inputs: &[PortRef],
) -> VecCollection<'scope, EventTime, Heartbeat> {
    let streams: Vec<_> = inputs
        .iter()
        .filter_map(|reference| match ports.get(&reference.to_string()) {
            Some(Port::Heartbeats(collection)) => Some(collection.inner.clone()),
            _ => None,
        })
        .collect();
    differential_dataflow::collection::AsCollection::as_collection(scope.concatenate(streams))
}

fn count<'scope>(
    collection: VecCollection<'scope, EventTime, Heartbeat>,
    metrics: &Arc<Metrics>,
    operator: &str,
    port: &str,
) -> VecCollection<'scope, EventTime, Heartbeat> {
    let counted = count_stream(collection.inner, metrics, operator, port);
    differential_dataflow::collection::AsCollection::as_collection(counted)
}

fn count_stream<'scope, D: 'static>(
    stream: StreamVec<'scope, EventTime, D>,
    metrics: &Arc<Metrics>,
    operator: &str,
    port: &str,
) -> StreamVec<'scope, EventTime, D> {
    let counter = metrics
        .operator_records
        .get_or_create(&vec![("operator", operator.to_owned()), ("port", port.to_owned())])
        .clone();
    stream.inspect_core(move |event| {
        if let Ok((_, batch)) = event {
            counter.inc_by(batch.len() as u64);
        }
    })
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

//! The `inference` operator: dynamic batching in the dataflow, model runs on each model's
//! own thread.
//!
//! Requests go to the worker that owns their edge node (`node`, set by `load_balance`), or
//! are spread by id. Each worker keeps a [`Batcher`] per model and pinned version; a due
//! batch is handed to the model's runner (a [`Model`] started on its own thread), and the
//! operator returns at once, so other operators on the worker keep running while the model
//! computes. The runner wakes the operator when a batch is done. Until then the operator
//! holds a capability for each waiting request's time, so downstream frontiers (and sinks)
//! wait for every result. Every request gets exactly one result: `ok`, `expired` (deadline
//! passed while queued), `rejected` (queue full, with the reason) or `failed` (a request
//! that does not fit the model, an unknown model or version, a failed run).
//!
//! The models come from outside: `connectors` implements [`Model`] and [`ModelRunner`] with
//! ONNX Runtime. The example below serves a model that doubles its input, run in place.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::{Arc, Mutex};
//! use edgeflow_operators::inference::operator::{Inference, InferenceOut, Model, ModelRunner, RunOutcome};
//! use edgeflow_operators::inference::InferenceConfig;
//! use edgeflow_operators::metrics::InferenceMetrics;
//! use edgeflow_operators::state::StateHandle;
//! use edgeflow_operators::{InferenceRequest, Tensor};
//! use timely::dataflow::operators::capture::{Capture, Event};
//! use timely::dataflow::operators::{Concatenate, ToStream};
//!
//! /// Doubles `x`, in the caller's thread.
//! struct Double(Arc<Mutex<Vec<RunOutcome>>>);
//! impl Model for Double {
//!     type Runner = Double;
//!     fn name(&self) -> &str { "double" }
//!     fn latest(&self) -> Option<u64> { Some(1) }
//!     fn start(self, _notify: Box<dyn Fn() + Send>) -> Result<Double, String> { Ok(self) }
//! }
//! impl ModelRunner for Double {
//!     type Split = usize;
//!     type Error = String;
//!     fn name(&self) -> &str { "double" }
//!     fn check(&self, inputs: &BTreeMap<String, Tensor>) -> Result<(), String> {
//!         inputs.get("x").map(|_| ()).ok_or_else(|| "needs input `x`".to_owned())
//!     }
//!     fn submit(&self, id: u64, _version: Option<u64>, batch: &[&BTreeMap<String, Tensor>]) -> Result<usize, String> {
//!         let doubled = batch.iter().map(|inputs| {
//!             let x = &inputs["x"];
//!             Tensor { shape: x.shape.clone(), data: x.data.iter().map(|v| v * 2.0).collect() }
//!         }).collect();
//!         let started = std::time::Instant::now();
//!         let compute = std::time::Duration::ZERO;
//!         self.0.lock().unwrap().push(RunOutcome::Done { id, started, compute, result: Ok((1, doubled)) });
//!         Ok(batch.len())
//!     }
//!     fn split(_rows: &usize, outputs: Vec<Tensor>) -> Result<Vec<BTreeMap<String, Tensor>>, String> {
//!         Ok(outputs.into_iter().map(|y| BTreeMap::from([("y".to_owned(), y)])).collect())
//!     }
//!     fn try_next(&self) -> Option<RunOutcome> { self.0.lock().unwrap().pop() }
//! }
//!
//! let config: InferenceConfig = serde_json::from_value(serde_json::json!({
//!     "registry": "unused", "models": ["double"], "max_queue_delay": "0s"
//! })).unwrap();
//! let results = timely::example(move |scope| {
//!     let json = br#"{"id": "r1", "model": "double", "timestamp": 5,
//!                     "inputs": {"x": {"shape": [1, 1], "data": [21.0]}}}"#;
//!     let request = InferenceRequest::from_json(json).unwrap();
//!     let requests = vec![Box::new(request)].to_stream(scope);
//!     let changes = scope.concatenate(Vec::<timely::dataflow::StreamVec<_, _>>::new());
//!     let models = vec![Double(Arc::default())];
//!     let (metrics, state) = (InferenceMetrics::default(), StateHandle::none());
//!     requests.inference(changes, "infer", &config, models, &metrics, state).capture()
//! });
//! let out: Vec<InferenceOut> = results
//!     .try_iter()
//!     .flat_map(|event| match event {
//!         Event::Messages(_, outs) => outs,
//!         Event::Progress(_) => Vec::new(),
//!     })
//!     .collect();
//! let InferenceOut::Result(result) = &out[0] else { panic!("a result") };
//! assert_eq!(result.outputs["y"].data, vec![42.0]);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::OutputBuilderSession;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Capability, InputCapability, Operator};
use timely::dataflow::StreamVec;

use super::InferenceConfig;
use crate::batcher::{Admission, Batcher};
use crate::metrics::{labels, BatchHistogram, InferenceMetrics};
use crate::state::{Entry, StateHandle};
use crate::time::wall_clock_ms;
use crate::{
    route_hash, EventTime, HealthStatus, InferenceRequest, InferenceResult, ResultStatus, StatusChange, Tensor,
};

/// A model the operator can serve: started on a thread of its own when the operator is
/// built (implemented with ONNX Runtime in `connectors`).
pub trait Model: 'static {
    /// The running model.
    type Runner: ModelRunner;
    /// Its name, as requests name it.
    fn name(&self) -> &str;
    /// Its latest version, if any is loaded.
    fn latest(&self) -> Option<u64>;
    /// Starts it; `notify` is called whenever an outcome is ready (it wakes the operator).
    fn start(self, notify: Box<dyn Fn() + Send>) -> Result<Self::Runner, <Self::Runner as ModelRunner>::Error>;
}

/// A running model: takes batches and reports their outcomes, without blocking the worker.
pub trait ModelRunner {
    /// How to split a batch's outputs per request.
    type Split;
    /// Why a request or a batch cannot run (its text becomes the results' reason).
    type Error: std::fmt::Display;
    /// Its name.
    fn name(&self) -> &str;
    /// Checks one request's inputs against the model's interface.
    fn check(&self, inputs: &BTreeMap<String, Tensor>) -> Result<(), Self::Error>;
    /// Stacks the inputs of a batch (on the caller's thread) and queues the batch as job
    /// `id` of `version` (`None`: the latest).
    fn submit(
        &self,
        id: u64,
        version: Option<u64>,
        batch: &[&BTreeMap<String, Tensor>],
    ) -> Result<Self::Split, Self::Error>;
    /// Splits a batch's stacked outputs (one per model output) per request.
    fn split(split: &Self::Split, outputs: Vec<Tensor>) -> Result<Vec<BTreeMap<String, Tensor>>, Self::Error>;
    /// The next outcome, if one is ready.
    fn try_next(&self) -> Option<RunOutcome>;
}

/// What a model runner reports.
#[derive(Debug)]
pub enum RunOutcome {
    /// A batch ran (or failed as a whole).
    Done {
        /// The job's id.
        id: u64,
        /// When its run started.
        started: Instant,
        /// How long the run took.
        compute: Duration,
        /// The version that ran and the stacked outputs (one per model output), or why the
        /// batch failed.
        result: Result<(u64, Vec<Tensor>), String>,
    },
    /// A new version was loaded and is now the latest (unless a higher one exists).
    Loaded {
        /// The version.
        version: u64,
    },
    /// A version could not be loaded; the ones loaded keep serving.
    LoadFailed {
        /// Why.
        reason: String,
    },
}

/// Batched inference of requests on a stream of boxed requests.
pub trait Inference<'scope> {
    /// Runs every request through its model, in batches, and emits exactly one result per
    /// request (or, for a request whose node went Offline in `changes` while it waited, a
    /// re-route). `models` are this worker's models; `name` names the operator in metrics
    /// and logs.
    ///
    /// In checkpoints (through `state`, [`StateHandle::none`] for none) it saves once every
    /// request before the checkpoint's time is answered or re-routed; what it keeps is the
    /// re-routed requests still on their way back to the balancer across the checkpoint
    /// (sent back just before its time, they reach the balancer at it), which it sends back
    /// again after a restore. Requests at or after the time come again from the sources.
    fn inference<M: Model>(
        self,
        changes: StreamVec<'scope, EventTime, StatusChange>,
        name: &str,
        config: &InferenceConfig,
        models: Vec<M>,
        metrics: &InferenceMetrics,
        state: StateHandle,
    ) -> StreamVec<'scope, EventTime, InferenceOut>;
}

impl<'scope> Inference<'scope> for StreamVec<'scope, EventTime, Box<InferenceRequest>> {
    fn inference<M: Model>(
        self,
        changes: StreamVec<'scope, EventTime, StatusChange>,
        name: &str,
        config: &InferenceConfig,
        models: Vec<M>,
        metrics: &InferenceMetrics,
        state: StateHandle,
    ) -> StreamVec<'scope, EventTime, InferenceOut> {
        inference_core(self, changes, name, config, models, metrics, state)
    }
}

type Output<'a> = OutputBuilderSession<'a, EventTime, CapacityContainerBuilder<Vec<InferenceOut>>>;

/// What the operator emits: results, and requests whose node went Offline while they
/// waited (they go back to the load balancer that placed them).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum InferenceOut {
    /// The one result of a request.
    Result(Box<InferenceResult>),
    /// A request to place again, with `node` still naming the lost node.
    Reroute(Box<InferenceRequest>),
}

impl InferenceOut {
    fn result(result: InferenceResult) -> Self {
        InferenceOut::Result(Box::new(result))
    }
}

/// A request waiting for, or in, a model run: the time its result goes out at. Boxed, so
/// that the queue and the batches move a pointer rather than the ~200-byte request.
struct Waiting {
    request: Box<InferenceRequest>,
    time: EventTime,
}

/// One served model on one worker.
struct Lane<R> {
    service: R,
    /// A queue per pinned version (`None`: the latest).
    queues: BTreeMap<Option<u64>, Batcher<Waiting>>,
    counters: StatusCounters,
    batch_size: BatchHistogram,
    queue_seconds: BatchHistogram,
    compute_seconds: BatchHistogram,
    busy_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    depth: Gauge,
    version: Gauge,
    load_failures: Counter,
}

/// Result counters per status, in [`ResultStatus::ALL`] order.
struct StatusCounters([Counter; 4]);

impl StatusCounters {
    fn new(metrics: &InferenceMetrics, operator: &str, model: &str) -> Self {
        Self(ResultStatus::ALL.map(|status| {
            metrics
                .requests
                .get_or_create(&labels::ModelStatus {
                    operator: operator.to_owned(),
                    model: model.to_owned(),
                    status: status.as_str(),
                })
                .clone()
        }))
    }

    fn count(&self, status: ResultStatus) {
        self.count_n(status, 1);
    }

    fn count_n(&self, status: ResultStatus, n: usize) {
        self.0[ResultStatus::ALL.iter().position(|s| *s == status).unwrap_or(0)].inc_by(n as u64);
    }
}

/// Capabilities held for waiting requests, one per time, with how many wait at it.
#[derive(Default)]
struct Held(BTreeMap<EventTime, (Capability<EventTime>, usize)>);

impl Held {
    fn hold(&mut self, cap: &InputCapability<EventTime>, time: EventTime, port: usize) {
        self.0.entry(time).or_insert_with(|| (cap.delayed(&time, port), 0)).1 += 1;
    }

    /// Emits each `(time, out)` and releases one hold per record. One session per run of
    /// equal times: a session sends its container when it ends, so a session per record
    /// would send (and allocate) a container per record.
    fn emit_all(&mut self, output: &mut Output<'_>, mut outs: Vec<(EventTime, InferenceOut)>) {
        // Results of one batch are usually in time order already; a sort moves every result.
        if !outs.is_sorted_by_key(|(time, _)| *time) {
            outs.sort_by_key(|(time, _)| *time);
        }
        let mut outs = outs.into_iter().peekable();
        while let Some(&(time, _)) = outs.peek() {
            let run = std::iter::from_fn(|| outs.next_if(|(t, _)| *t == time)).map(|(_, out)| out);
            let Some((cap, count)) = self.0.get_mut(&time) else {
                run.for_each(drop);
                continue;
            };
            let mut sent = 0;
            output.session(&*cap).give_iterator(run.inspect(|_| sent += 1));
            *count -= sent;
            if *count == 0 {
                self.0.remove(&time);
            }
        }
    }
}

/// Builds the operator on one worker; `models` are this worker's models. `changes` are the
/// status changes of the fleet the requests were placed on (load-balanced requests): a
/// request still waiting when its node goes Offline leaves as a re-route.
fn inference_core<'scope, M: Model>(
    requests: StreamVec<'scope, EventTime, Box<InferenceRequest>>,
    changes: StreamVec<'scope, EventTime, StatusChange>,
    operator: &str,
    config: &InferenceConfig,
    models: Vec<M>,
    metrics: &InferenceMetrics,
    state: StateHandle,
) -> StreamVec<'scope, EventTime, InferenceOut> {
    let scope = requests.scope();
    let worker = scope.index();
    let name = operator.to_owned();
    let policy = config.policy();

    // The stream's records are boxed requests: the closure takes what the stream holds.
    #[allow(clippy::borrowed_box)]
    let pact =
        Exchange::new(|request: &Box<InferenceRequest>| route_hash(request.node.as_deref().unwrap_or(&request.id)));
    let rerouted = metrics.rerouted.get_or_create(&labels::Operator { operator: operator.to_owned() }).clone();
    let changes = changes.broadcast();
    requests.binary_frontier(changes, pact, Pipeline, &format!("Inference({operator})"), move |initial, info| {
        let activator = scope.activator_for(info.address.clone());
        state.activate_with(activator.clone());
        // Re-routed requests by the time they were sent back at; those sent back just before
        // a checkpoint's time are in flight across it, and the checkpoint keeps them.
        let mut sent_back: BTreeMap<EventTime, Vec<InferenceRequest>> = BTreeMap::new();
        // After a restore: the requests in flight at the checkpoint, sent back again.
        let mut resend: Option<(Capability<EventTime>, Vec<InferenceOut>)> = None;
        if let Some((at, entries)) = state.restored() {
            let mut requests = Vec::new();
            for entry in entries {
                match entry.value::<InferenceRequest>() {
                    Ok(request) => requests.push(InferenceOut::Reroute(Box::new(request))),
                    Err(err) => tracing::error!(part = state.name(), %err, "a saved re-routed request is left out"),
                }
            }
            resend = Some((initial.delayed(&at.saturating_sub(1)), requests));
        }
        drop(initial);
        let wake = scope.worker().sync_activator_for(info.address.to_vec());
        let served: Vec<String> = models.iter().map(|m| m.name().to_owned()).collect();
        let mut lanes: BTreeMap<String, Lane<M::Runner>> = BTreeMap::new();
        let mut start_error = None;
        for model in models {
            let model_name = model.name().to_owned();
            let model_labels = labels::Model { operator: name.clone(), model: model_name.clone() };
            let worker_labels = labels::ModelWorker { operator: name.clone(), model: model_name.clone(), worker };
            let m = &metrics;
            let version = m.model_version.get_or_create(&worker_labels).clone();
            version.set(model.latest().map_or(0, |v| v as i64));
            let wake = wake.clone();
            let notify = Box::new(move || {
                let _ = wake.activate();
            });
            match model.start(notify) {
                Ok(service) => {
                    lanes.insert(
                        model_name.clone(),
                        Lane {
                            service,
                            queues: BTreeMap::new(),
                            counters: StatusCounters::new(m, &name, &model_name),
                            batch_size: m.batch_size.get_or_create(&model_labels).clone(),
                            queue_seconds: m.queue_seconds.get_or_create(&model_labels).clone(),
                            compute_seconds: m.compute_seconds.get_or_create(&model_labels).clone(),
                            busy_seconds: m
                                .busy_seconds
                                .get_or_create(&worker_labels)
                                .clone(),
                            depth: m.queue_depth.get_or_create(&worker_labels).clone(),
                            version,
                            load_failures: m.load_failures.get_or_create(&model_labels).clone(),
                        },
                    );
                }
                Err(err) => start_error = Some(err),
            }
        }
        if let Some(err) = start_error {
            tracing::error!(operator = %name, %err, "cannot start a model thread");
        }
        let mut held = Held::default();
        let mut offline: std::collections::HashSet<String> = std::collections::HashSet::new();
        // Batches in a model run: their requests, when each was admitted, and how to split
        // the outputs.
        let mut running: HashMap<u64, Running<<M::Runner as ModelRunner>::Split>> = HashMap::new();
        let mut next_job = 0u64;

        let span = tracing::info_span!("operator", name = %name, r#type = "inference", worker);
        move |(input, frontier), (changes, _), output: &mut Output<'_>| {
            let _entered = span.enter();
            if let Some((cap, requests)) = resend.take() {
                output.session(&cap).give_iterator(requests.into_iter());
            }
            // Waiting requests of nodes that went Offline go back to be placed again, and so do
            // requests that arrive for a node already known to be Offline.
            let mut lost = Vec::new();
            changes.for_each(|_, data| {
                for change in data.drain(..) {
                    if change.to == HealthStatus::Offline {
                        offline.insert(change.node_id.clone());
                        lost.push(change.node_id);
                    } else {
                        offline.remove(&change.node_id);
                    }
                }
            });
            // Results of requests that waited (each released from its hold), sent together.
            let mut released: Vec<(EventTime, InferenceOut)> = Vec::new();
            for node in &lost {
                for lane in lanes.values_mut() {
                    for queue in lane.queues.values_mut() {
                        for gone in queue.remove_where(|w| w.request.node.as_deref() == Some(node.as_str())) {
                            rerouted.inc();
                            sent_back.entry(gone.item.time).or_default().push((*gone.item.request).clone());
                            released.push((gone.item.time, InferenceOut::Reroute(gone.item.request)));
                        }
                    }
                }
            }
            let now = Instant::now();
            let now_ms = wall_clock_ms();
            input.for_each(|cap, data| {
                let time = cap.least().copied().unwrap_or_default();
                let port = output.output_index();
                // Requests answered at once, at their own time.
                let mut answered: Vec<InferenceOut> = Vec::new();
                for request in data.drain(..) {
                    if request.node.as_ref().is_some_and(|node| offline.contains(node)) {
                        rerouted.inc();
                        sent_back.entry(time).or_default().push((*request).clone());
                        answered.push(InferenceOut::Reroute(request));
                        continue;
                    }
                    let Some(lane) = lanes.get_mut(&request.model) else {
                        let reason = format!(
                            "model `{}` is not served by operator `{name}` (it serves: {})",
                            request.model,
                            served.join(", ")
                        );
                        answered.push(InferenceOut::result(InferenceResult::refused(&request, ResultStatus::Failed, reason.to_string(), 0.0)));
                        continue;
                    };
                    if let Err(reason) = lane.service.check(&request.inputs) {
                        lane.counters.count(ResultStatus::Failed);
                        answered.push(InferenceOut::result(InferenceResult::refused(&request, ResultStatus::Failed, reason.to_string(), 0.0)));
                        continue;
                    }
                    if let Some(deadline) = request.deadline.filter(|d| *d <= now_ms) {
                        lane.counters.count(ResultStatus::Expired);
                        let reason = format!("deadline {deadline} passed {} ms before admission", now_ms - deadline);
                        answered.push(InferenceOut::result(InferenceResult::refused(&request, ResultStatus::Expired, reason, 0.0)));
                        continue;
                    }
                    let queue = lane.queues.entry(request.version).or_insert_with(|| Batcher::new(policy));
                    let (priority, deadline) = (request.priority, request.deadline);
                    match queue.push(Waiting { request, time }, priority, deadline, now) {
                        Admission::Admitted => held.hold(&cap, time, port),
                        Admission::Displaced(victim, reason) => {
                            held.hold(&cap, time, port);
                            lane.counters.count(ResultStatus::Rejected);
                            let waited = now.duration_since(victim.admitted).as_secs_f64() * 1000.0;
                            let result = InferenceResult::refused(&victim.item.request, ResultStatus::Rejected, reason, waited);
                            released.push((victim.item.time, InferenceOut::result(result)));
                        }
                        Admission::Rejected(waiting, reason) => {
                            lane.counters.count(ResultStatus::Rejected);
                            let result = InferenceResult::refused(&waiting.request, ResultStatus::Rejected, reason, 0.0);
                            answered.push(InferenceOut::result(result));
                        }
                    }
                }
                if !answered.is_empty() {
                    output.session(&cap).give_iterator(answered.into_iter());
                }
            });

            // Finished runs.
            for lane in lanes.values_mut() {
                while let Some(outcome) = lane.service.try_next() {
                    match outcome {
                        RunOutcome::Done { id, started, compute, result } => {
                            let Some(batch) = running.remove(&id) else { continue };
                            let result = result.and_then(|(version, outputs)| {
                                M::Runner::split(&batch.stacked, outputs)
                                    .map(|outputs| (version, outputs))
                                    .map_err(|err| err.to_string())
                            });
                            match result {
                                Err(reason) if batch.waiting.len() > 1 => {
                                    // One bad request must not fail its batch: each runs alone,
                                    // and only those that fail alone fail.
                                    tracing::warn!(operator = %name, model = lane.service.name(), requests = batch.waiting.len(), %reason, "a batch failed; running its requests one by one");
                                    for one in batch.waiting {
                                        let submitted = Submit { service: &lane.service, counters: &lane.counters, id: next_job, version: batch.version };
                                        next_job += 1;
                                        submitted.run(vec![one], &mut running, &mut held, output);
                                    }
                                }
                                result => finish(lane, &mut held, output, batch.waiting, started, compute, result),
                            }
                        }
                        RunOutcome::Loaded { version } => {
                            tracing::info!(operator = %name, model = lane.service.name(), version, worker, "model version loaded");
                            if version as i64 > lane.version.get() {
                                lane.version.set(version as i64);
                            }
                        }
                        RunOutcome::LoadFailed { reason } => {
                            lane.load_failures.inc();
                            tracing::error!(operator = %name, model = lane.service.name(), %reason, "a model version failed to load; the loaded versions keep serving");
                        }
                    }
                }
            }

            // Expired requests, then due batches.
            let drain = frontier.is_empty();
            let mut wake_in: Option<Duration> = None;
            for lane in lanes.values_mut() {
                let mut depth = 0;
                for (version, queue) in lane.queues.iter_mut() {
                    for expired in queue.expire(now_ms) {
                        lane.counters.count(ResultStatus::Expired);
                        let waited = now.duration_since(expired.admitted).as_secs_f64() * 1000.0;
                        let deadline = expired.deadline.unwrap_or_default();
                        let reason = format!("deadline {deadline} passed after {waited:.1} ms in the queue");
                        let result = InferenceResult::refused(&expired.item.request, ResultStatus::Expired, reason, waited);
                        released.push((expired.item.time, InferenceOut::result(result)));
                    }
                    while let Some(batch) = queue.next_batch(now, drain) {
                        let batch: Vec<(Waiting, Instant)> = batch.into_iter().map(|q| (q.item, q.admitted)).collect();
                        if batch.len() == 1 {
                            let submitted = Submit { service: &lane.service, counters: &lane.counters, id: next_job, version: *version };
                            next_job += 1;
                            submitted.run(batch, &mut running, &mut held, output);
                            continue;
                        }
                        let submitted = Submit { service: &lane.service, counters: &lane.counters, id: next_job, version: *version };
                        next_job += 1;
                        if let Err(rest) = submitted.try_run(batch, &mut running) {
                            // The batch could not be stacked: each request goes alone.
                            for one in rest {
                                let submitted = Submit { service: &lane.service, counters: &lane.counters, id: next_job, version: *version };
                                next_job += 1;
                                submitted.run(vec![one], &mut running, &mut held, output);
                            }
                        }
                    }
                    depth += queue.len();
                    let due = queue.due_in(now);
                    let deadline = queue
                        .earliest_deadline()
                        .map(|d| Duration::from_millis(d.saturating_sub(now_ms).max(1)));
                    for candidate in [due, deadline].into_iter().flatten() {
                        wake_in = Some(wake_in.map_or(candidate, |w| w.min(candidate)));
                    }
                }
                lane.depth.set(depth as i64);
            }
            held.emit_all(output, released);
            // Nothing goes out before `low` any more: requests sent back before `low - 1`
            // reached the balancer before `low`, which no checkpoint still to come precedes.
            let low = frontier.frontier().iter().copied().chain(held.0.keys().next().copied()).min();
            if let Some(at) = state.due().filter(|at| low.is_none_or(|low| low >= *at)) {
                let in_flight = sent_back.get(&at.saturating_sub(1)).into_iter().flatten();
                let routed = |request: &InferenceRequest| route_hash(request.node.as_deref().unwrap_or(&request.id));
                state.save(in_flight.map(|request| Entry::new(routed(request), request)).collect());
            }
            match low {
                Some(low) => sent_back = sent_back.split_off(&low.saturating_sub(1)),
                None => sent_back.clear(),
            }
            if let Some(delay) = wake_in {
                activator.activate_after(delay);
            }
        }
    })
}

/// A batch in a model run.
struct Running<S> {
    waiting: Vec<(Waiting, Instant)>,
    stacked: S,
    /// The version it asked for (`None`: the latest).
    version: Option<u64>,
}

/// A batch on its way to a model's thread.
struct Submit<'a, R> {
    service: &'a R,
    counters: &'a StatusCounters,
    id: u64,
    version: Option<u64>,
}

impl<R: ModelRunner> Submit<'_, R> {
    /// Stacks the batch's inputs here, on the worker, and hands the batch to the model's
    /// thread (so only whole batches cross threads); if that fails, every request fails.
    fn run(
        self,
        waiting: Vec<(Waiting, Instant)>,
        running: &mut HashMap<u64, Running<R::Split>>,
        held: &mut Held,
        output: &mut Output<'_>,
    ) {
        match self.submit(&waiting) {
            Ok(stacked) => {
                running.insert(self.id, Running { waiting, stacked, version: self.version });
            }
            Err(reason) => {
                tracing::error!(model = self.service.name(), %reason, "cannot run a batch");
                let failed = waiting.into_iter().map(|(item, _)| {
                    self.counters.count(ResultStatus::Failed);
                    let result = InferenceResult::refused(&item.request, ResultStatus::Failed, reason.clone(), 0.0);
                    (item.time, InferenceOut::result(result))
                });
                held.emit_all(output, failed.collect());
            }
        }
    }

    /// Like [`Self::run`], but hands the requests back if the batch cannot be submitted.
    fn try_run(
        self,
        waiting: Vec<(Waiting, Instant)>,
        running: &mut HashMap<u64, Running<R::Split>>,
    ) -> Result<(), Vec<(Waiting, Instant)>> {
        match self.submit(&waiting) {
            Ok(stacked) => {
                running.insert(self.id, Running { waiting, stacked, version: self.version });
                Ok(())
            }
            Err(reason) => {
                tracing::warn!(model = self.service.name(), requests = waiting.len(), %reason, "cannot stack a batch; running its requests one by one");
                Err(waiting)
            }
        }
    }

    fn submit(&self, waiting: &[(Waiting, Instant)]) -> Result<R::Split, String> {
        let inputs: Vec<&BTreeMap<String, Tensor>> = waiting.iter().map(|(w, _)| &w.request.inputs).collect();
        self.service.submit(self.id, self.version, &inputs).map_err(|err| err.to_string())
    }
}

/// Turns a finished run into one result per request.
fn finish<R>(
    lane: &Lane<R>,
    held: &mut Held,
    output: &mut Output<'_>,
    batch: Vec<(Waiting, Instant)>,
    started: Instant,
    compute: Duration,
    result: Result<(u64, Vec<BTreeMap<String, Tensor>>), String>,
) {
    let compute_ms = compute.as_secs_f64() * 1000.0;
    lane.batch_size.observe(batch.len() as f64);
    lane.compute_seconds.observe(compute.as_secs_f64());
    lane.busy_seconds.inc_by(compute.as_secs_f64());
    let size = batch.len() as u32;
    let finished_at = crate::records::wall_clock_ms_f64();
    let mut outs = Vec::with_capacity(batch.len());
    match result {
        Ok((version, outputs)) => {
            // Metrics once per batch: a lock or an atomic per request shows in profiles.
            let waited = |admitted: &Instant| started.saturating_duration_since(*admitted);
            lane.queue_seconds.observe_all(batch.iter().map(|(_, admitted)| waited(admitted).as_secs_f64()));
            let mut ok = 0;
            for ((waiting, admitted), outputs) in batch.into_iter().zip(outputs) {
                let queue = waited(&admitted);
                if let Some(reason) = non_finite(&outputs) {
                    // JSON has no infinity or NaN: an `ok` result would carry `null` where a
                    // number was, and Arrow readers would disagree with JSON ones.
                    lane.counters.count(ResultStatus::Failed);
                    let mut result = InferenceResult::refused(
                        &waiting.request,
                        ResultStatus::Failed,
                        reason,
                        queue.as_secs_f64() * 1000.0,
                    );
                    result.version = Some(version);
                    result.compute_ms = compute_ms;
                    result.batch_size = size;
                    outs.push((waiting.time, InferenceOut::result(result)));
                    continue;
                }
                ok += 1;
                let request = *waiting.request;
                let result = InferenceResult {
                    id: request.id,
                    model: request.model,
                    version: Some(version),
                    status: ResultStatus::Ok,
                    error: None,
                    outputs,
                    node: request.node,
                    timestamp: request.timestamp,
                    queue_ms: queue.as_secs_f64() * 1000.0,
                    compute_ms,
                    batch_size: size,
                    finished_at,
                };
                outs.push((waiting.time, InferenceOut::result(result)));
            }
            lane.counters.count_n(ResultStatus::Ok, ok);
        }
        Err(reason) => {
            for (waiting, admitted) in batch {
                let queue_ms = started.saturating_duration_since(admitted).as_secs_f64() * 1000.0;
                lane.counters.count(ResultStatus::Failed);
                let mut result =
                    InferenceResult::refused(&waiting.request, ResultStatus::Failed, reason.clone(), queue_ms);
                result.compute_ms = compute_ms;
                result.batch_size = size;
                outs.push((waiting.time, InferenceOut::result(result)));
            }
        }
    }
    held.emit_all(output, outs);
}

/// Why a request's outputs cannot make an `ok` result: the first non-finite value, named.
fn non_finite(outputs: &BTreeMap<String, Tensor>) -> Option<String> {
    outputs.iter().find_map(|(name, tensor)| {
        let index = tensor.data.iter().position(|value| !value.is_finite())?;
        Some(format!(
            "model output `{name}` has a non-finite value ({}) at index {index}; results carry finite numbers only",
            tensor.data[index]
        ))
    })
}

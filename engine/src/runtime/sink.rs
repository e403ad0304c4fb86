//! The sink operator: gathers sinks' records on worker 0, writes each event time's records
//! in sorted order once the time is final, and flushes at most every [`FLUSH_INTERVAL`].
//! Sorting makes a sink's output identical on any number of workers and processes.
//!
//! Until a flush, the operator holds a capability at the earliest time it wrote, so its
//! (empty) output frontier, which the engine's sink probe watches, passes a time only once
//! everything before it is flushed: durable in a file, acknowledged by Kafka. Source offsets
//! are committed on that probe, which makes delivery at-least-once.
//!
//! In an exactly-once pipeline one operator writes all sinks into one [`Transaction`], and
//! the sources' checkpoints travel through the dataflow to it as [`SinkItem::Offsets`] at the
//! time of the last record they cover: a flush commits the transaction with the offsets of
//! exactly the records written into it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeflow_connectors::{Checkpoint, ConnectorError, Sink, Transaction};
use edgeflow_operators::{EventTime, InferenceResult};
use prometheus_client::metrics::counter::Counter;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::OutputBuilderSession;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::StreamVec;

use crate::metrics::Metrics;

/// The first runtime failure of a run, shared by all workers; a failure stops the run.
pub type Failure = Arc<Mutex<Option<String>>>;

/// How often a sink flushes while records keep arriving.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// What reaches the sink operator.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum SinkItem {
    /// An encoded record for the operator's sink number `.0`.
    Line(usize, String),
    /// A source's positions, covering every record up to its time (exactly-once only).
    Offsets(Checkpoint),
    /// A raw message for the operator's sink number `.0`.
    Raw(usize, edgeflow_operators::RawMessage),
    /// An inference result for the operator's sink number `.0`, which has a format of its
    /// own for results (`format: arrow`).
    Result(usize, OrderedResult),
}

/// An inference result with a total order for sorting within an event time (floats by their
/// bits), so that a sink's rows come out in the same order on any number of workers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct OrderedResult(pub Box<InferenceResult>);

impl Ord for OrderedResult {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let key = |r: &InferenceResult| {
            let outputs = r.outputs.iter().map(|(name, tensor)| {
                (name.clone(), tensor.shape.clone(), tensor.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
            });
            let times = [r.queue_ms, r.compute_ms, r.finished_at].map(f64::to_bits);
            (outputs.collect::<Vec<_>>(), times)
        };
        let (a, b) = (&*self.0, &*other.0);
        (&a.id, a.timestamp, &a.model, a.version, a.status, &a.error, &a.node, a.batch_size)
            .cmp(&(&b.id, b.timestamp, &b.model, b.version, b.status, &b.error, &b.node, b.batch_size))
            // Results of distinct requests differ above; this is for duplicate ids.
            .then_with(|| key(a).cmp(&key(b)))
    }
}

impl PartialOrd for OrderedResult {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for OrderedResult {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for OrderedResult {}

/// The writers of one sink operator: present on worker 0 only.
pub struct SinkGroup {
    /// Each sink's name and connector (`None` on workers other than 0).
    pub sinks: Vec<(String, Option<Box<dyn Sink>>)>,
    /// The transaction the sinks write into (exactly-once pipelines, worker 0).
    pub transaction: Option<Box<dyn Transaction>>,
    /// Where to report a write failure.
    pub failure: Failure,
    /// The run's stop flag: set when an output's reader goes away (standard output closed).
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// The span its log lines are in: the sink's name and type (or the transaction's sinks).
    pub span: tracing::Span,
}

/// Records of one time waiting for the frontier, with the capability to hold for them.
type Bucket = (Capability<EventTime>, Vec<(EventTime, SinkItem)>);

type Empty<'a> = OutputBuilderSession<'a, EventTime, CapacityContainerBuilder<Vec<()>>>;

/// Writes `(key, item)` records to `group`; the returned stream carries no data and exists
/// so that a probe can tell when the sinks have flushed everything before a time.
pub fn sink_operator<'scope>(
    items: StreamVec<'scope, EventTime, (EventTime, SinkItem)>,
    mut group: SinkGroup,
    metrics: Arc<Metrics>,
) -> StreamVec<'scope, EventTime, ()> {
    let names: Vec<String> = group.sinks.iter().map(|(name, _)| name.clone()).collect();
    let counter = |family: &prometheus_client::metrics::family::Family<_, Counter>| -> Vec<Counter> {
        names
            .iter()
            .map(|name| family.get_or_create(&crate::metrics::labels::Sink { sink: name.clone() }).clone())
            .collect()
    };
    let written = counter(&metrics.sink_records);
    let errors = counter(&metrics.sink_errors);
    let label = names.join(",");
    let scope = items.scope();
    items.unary_frontier(Exchange::new(|_: &(EventTime, SinkItem)| 0), &format!("Sink({label})"), move |_cap, info| {
        let activator = scope.activator_for(info.address.clone());
        let span = group.span.clone();
        let mut pending: BTreeMap<EventTime, Bucket> = BTreeMap::new();
        // Held until the next flush: the earliest time written since the last one.
        let mut unflushed: Option<Capability<EventTime>> = None;
        // Source positions covered by what was written since the last flush.
        let mut offsets: Vec<Checkpoint> = Vec::new();
        let mut last_flush = Instant::now();
        let mut failed = false;
        let fail = move |sink: &str, err: &ConnectorError, errors: &Counter, failure: &Failure| {
            errors.inc();
            let (fault, retryable) = (err.fault().as_str(), err.retryable());
            tracing::error!(%sink, fault, retryable, %err, "sink failed; stopping the pipeline");
            let mut failure = failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            failure.get_or_insert_with(|| format!("sink `{sink}`: {err}"));
        };
        move |(input, frontier), output: &mut Empty<'_>| {
            let _entered = span.enter();
            input.for_each(|cap, data| {
                // A record is written once the frontier passes its key (its event time), or
                // its message time if later; within a time, records are sorted.
                let time = cap.least().copied().unwrap_or_default();
                for (key, item) in data.drain(..) {
                    let at = key.max(time);
                    pending
                        .entry(at)
                        .or_insert_with(|| (cap.delayed(&at, output.output_index()), Vec::new()))
                        .1
                        .push((key, item));
                }
            });
            while let Some(entry) = pending.first_entry() {
                if frontier.less_equal(entry.key()) {
                    break;
                }
                let (cap, mut items) = entry.remove();
                if unflushed.is_none() {
                    unflushed = Some(cap);
                }
                items.sort();
                if failed {
                    continue;
                }
                for (_, item) in items {
                    let (index, result) = match item {
                        SinkItem::Offsets(checkpoint) => {
                            offsets.push(checkpoint);
                            continue;
                        }
                        SinkItem::Line(index, line) => {
                            let Some((_, Some(sink))) = group.sinks.get_mut(index) else { continue };
                            (index, sink.write(line.as_bytes()))
                        }
                        SinkItem::Raw(index, message) => {
                            let Some((_, Some(sink))) = group.sinks.get_mut(index) else { continue };
                            (index, sink.write_raw(&message))
                        }
                        SinkItem::Result(index, result) => {
                            let Some((_, Some(sink))) = group.sinks.get_mut(index) else { continue };
                            (index, sink.write_result(&result.0))
                        }
                    };
                    if let Err(err) = result {
                        if closed(&mut group, index, &err) {
                            continue;
                        }
                        failed = true;
                        fail(&names[index], &err, &errors[index], &group.failure);
                        break;
                    }
                    written[index].inc();
                }
            }
            if unflushed.is_some() {
                let due = last_flush.elapsed() >= FLUSH_INTERVAL || frontier.is_empty();
                if due {
                    if !failed {
                        if let Err((index, err)) = flush(&mut group, &offsets) {
                            if !closed(&mut group, index, &err) {
                                failed = true;
                                fail(&names[index], &err, &errors[index], &group.failure);
                            }
                        }
                    }
                    offsets.clear();
                    last_flush = Instant::now();
                    unflushed = None;
                } else {
                    activator.activate_after(FLUSH_INTERVAL.saturating_sub(last_flush.elapsed()));
                }
            }
        }
    })
}

/// Flushes every sink, then commits the transaction (if any) with `offsets`; on failure, the
/// index of the sink to blame (the first, for the transaction) and the error.
fn flush(group: &mut SinkGroup, offsets: &[Checkpoint]) -> Result<(), (usize, ConnectorError)> {
    for (index, (_, sink)) in group.sinks.iter_mut().enumerate() {
        if let Some(sink) = sink {
            sink.flush().map_err(|err| (index, err))?;
        }
    }
    if let Some(transaction) = group.transaction.as_mut() {
        transaction.commit(offsets).map_err(|err| (0, err))?;
    }
    Ok(())
}

/// Whether `err` says that sink `index`'s reader went away (`| head` closed standard
/// output): then the sink is dropped and the run stops gracefully, as if interrupted; it is
/// not a failure.
fn closed(group: &mut SinkGroup, index: usize, err: &ConnectorError) -> bool {
    if !matches!(err, ConnectorError::OutputClosed { .. }) {
        return false;
    }
    if let Some((name, sink)) = group.sinks.get_mut(index) {
        tracing::info!(sink = %name, %err, "the sink's output is closed; stopping the run");
        *sink = None;
    }
    group.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    true
}

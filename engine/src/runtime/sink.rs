//! The sink operator: gathers sinks' records on worker 0, writes each event time's records
//! in sorted order once the time is final, and flushes at most every [`FLUSH_INTERVAL`].
//! Sorting makes a sink's output identical on any number of workers and processes.
//!
//! Until a flush, the operator holds a capability at the earliest time it wrote, so its
//! (empty) output frontier, which the engine's sink probe watches, passes a time only once
//! everything before it is flushed: durable in a file, acknowledged by Kafka. Source offsets
//! are committed on that probe, which makes delivery at-least-once.
//!
//! In a checkpointed pipeline each sink saves how far its output goes when its frontier
//! reaches a checkpoint's time (a file: its length, after an fsync), before it writes any
//! later time. In an exactly-once pipeline one operator writes all sinks into one
//! [`Transaction`]: at a checkpoint it flushes them (the transaction's first phase), writes
//! nothing later until the checkpoint is complete, then commits the transaction marked with
//! the checkpoint's number and opens the next.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeflow_connectors::{ConnectorError, Sink, Transaction};
use edgeflow_operators::state::{Entry, StateHandle};
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
    /// Each sink's part in checkpoints (empty without checkpoints).
    pub saves: Vec<StateHandle>,
}

impl SinkGroup {
    /// Saves each sink's output state for the checkpoint being taken (sinks are on worker 0;
    /// the operator elsewhere saves nothing).
    fn save(&mut self) -> Result<(), (usize, ConnectorError)> {
        for (index, handle) in self.saves.iter().enumerate() {
            let entries = match self.sinks.get_mut(index).and_then(|(_, sink)| sink.as_mut()) {
                Some(sink) => vec![Entry::new(0, &sink.checkpoint().map_err(|err| (index, err))?)],
                None => Vec::new(),
            };
            handle.save(entries);
        }
        Ok(())
    }

    /// The checkpoint due at `frontier`, if its time has been reached.
    fn due(&self, frontier: &timely::progress::frontier::MutableAntichain<EventTime>) -> Option<(u64, EventTime)> {
        let handle = self.saves.first()?;
        handle.due_at(frontier)?;
        handle.due_checkpoint()
    }
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
        for handle in &group.saves {
            handle.activate_with(scope.activator_for(info.address.clone()));
        }
        let span = group.span.clone();
        let mut pending: BTreeMap<EventTime, Bucket> = BTreeMap::new();
        // Held until the next flush: the earliest time written since the last one.
        let mut unflushed: Option<Capability<EventTime>> = None;
        // Exactly once: a checkpoint saved whose transaction waits for it to be complete, and
        // a capability that follows the frontier so that the run does not end before the
        // last transaction commits.
        let mut awaiting: Option<u64> = None;
        let mut reserve = group.transaction.is_some().then_some(_cap);
        let (mut saved_last, mut last_committed) = (false, false);
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
            if let Some(epoch) = awaiting {
                if group.saves.first().is_some_and(|h| h.committed() < epoch) {
                    activator.activate_after(Duration::from_millis(2));
                    return;
                }
                awaiting = None;
                if let Some(transaction) = group.transaction.as_mut() {
                    if let Err(err) = transaction.commit(epoch) {
                        failed = true;
                        fail(&names[0], &err, &errors[0], &group.failure);
                    }
                }
                last_committed |= saved_last;
            }
            loop {
                let next = pending.first_key_value().map(|(time, _)| *time);
                if let Some((epoch, at)) = group.due(frontier) {
                    if next.is_none_or(|time| time >= at) {
                        // Everything before the checkpoint is written: save (and, exactly
                        // once, flush the transaction and hold what comes after it).
                        if let Err((index, err)) = group.save() {
                            failed = true;
                            fail(&names[index], &err, &errors[index], &group.failure);
                        }
                        if group.transaction.is_some() {
                            saved_last = at == EventTime::MAX;
                            awaiting = Some(epoch);
                            activator.activate_after(Duration::from_millis(2));
                            break;
                        }
                    }
                }
                let Some(entry) = pending.first_entry() else { break };
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
                        if let Err((index, err)) = flush(&mut group) {
                            if !closed(&mut group, index, &err) {
                                failed = true;
                                fail(&names[index], &err, &errors[index], &group.failure);
                            }
                        }
                    }
                    last_flush = Instant::now();
                    unflushed = None;
                } else {
                    activator.activate_after(FLUSH_INTERVAL.saturating_sub(last_flush.elapsed()));
                }
            }
            if let Some(cap) = reserve.as_mut() {
                match frontier.frontier().iter().min() {
                    Some(low) if cap.time() < low => cap.downgrade(low),
                    Some(_) => {}
                    // The input has ended: the reserve goes once the last checkpoint (at the
                    // end of time) has committed its transaction, or on failure.
                    None if failed || (awaiting.is_none() && last_committed) => reserve = None,
                    None => {}
                }
            }
        }
    })
}

/// Flushes every sink (inside the open transaction, if any, which commits with the next
/// checkpoint); on failure, the index of the sink to blame and the error.
fn flush(group: &mut SinkGroup) -> Result<(), (usize, ConnectorError)> {
    for (index, (_, sink)) in group.sinks.iter_mut().enumerate() {
        if let Some(sink) = sink {
            sink.flush().map_err(|err| (index, err))?;
        }
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

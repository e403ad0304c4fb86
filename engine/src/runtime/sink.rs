//! The sink operator: gathers a sink's records on worker 0, writes each event time's records
//! in sorted order once the time is final, and flushes at most every [`FLUSH_INTERVAL`].
//! Sorting makes a sink's output identical on any number of workers and processes.
//!
//! Until a flush, the operator holds a capability at the earliest time it wrote, so its
//! (empty) output frontier, which the engine's sink probe watches, passes a time only once
//! everything before it is flushed: durable in a file, acknowledged by Kafka. Source offsets
//! are committed on that probe, which makes delivery at-least-once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgeflow_connectors::Sink;
use edgeflow_operators::EventTime;
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

/// The writer of one sink: present on worker 0 only.
pub struct SinkHandle {
    /// The connector; `None` on workers other than 0.
    pub sink: Option<Box<dyn Sink>>,
    /// Where to report a write failure.
    pub failure: Failure,
}

/// Records of one time waiting for the frontier, with the capability to hold for them.
type Bucket = (Capability<EventTime>, Vec<(EventTime, String)>);

type Empty<'a> = OutputBuilderSession<'a, EventTime, CapacityContainerBuilder<Vec<()>>>;

/// Writes `(key, line)` records to `handle`; the returned stream carries no data and exists
/// so that a probe can tell when the sink has flushed everything before a time.
pub fn sink_operator<'scope>(
    lines: StreamVec<'scope, EventTime, (EventTime, String)>,
    name: &str,
    mut handle: SinkHandle,
    metrics: Arc<Metrics>,
) -> StreamVec<'scope, EventTime, ()> {
    let written = metrics.sink_records.get_or_create(&vec![("sink", name.to_owned())]).clone();
    let errors = metrics.sink_errors.get_or_create(&vec![("sink", name.to_owned())]).clone();
    let sink_name = name.to_owned();
    let scope = lines.scope();
    lines.unary_frontier(Exchange::new(|_: &(EventTime, String)| 0), &format!("Sink({name})"), move |_cap, info| {
        let activator = scope.activator_for(info.address.clone());
        let mut pending: BTreeMap<EventTime, Bucket> = BTreeMap::new();
        // Held until the next flush: the earliest time written since the last one.
        let mut unflushed: Option<Capability<EventTime>> = None;
        let mut last_flush = Instant::now();
        let mut failed = false;
        let fail = move |err: String, errors: &prometheus_client::metrics::counter::Counter, failure: &Failure| {
            errors.inc();
            tracing::error!(sink = %sink_name, %err, "sink failed; stopping the pipeline");
            let mut failure = failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            failure.get_or_insert_with(|| format!("sink `{sink_name}`: {err}"));
        };
        move |(input, frontier), output: &mut Empty<'_>| {
            input.for_each(|cap, data| {
                // A record is written once the frontier passes its key (its event time), or
                // its message time if later; within a time, records are sorted.
                let time = cap.least().copied().unwrap_or_default();
                for (key, line) in data.drain(..) {
                    let at = key.max(time);
                    pending
                        .entry(at)
                        .or_insert_with(|| (cap.delayed(&at, output.output_index()), Vec::new()))
                        .1
                        .push((key, line));
                }
            });
            while let Some(entry) = pending.first_entry() {
                if frontier.less_equal(entry.key()) {
                    break;
                }
                let (cap, mut lines) = entry.remove();
                if unflushed.is_none() {
                    unflushed = Some(cap);
                }
                lines.sort();
                let Some(sink) = handle.sink.as_mut() else { continue };
                if failed {
                    continue;
                }
                for (_, line) in &lines {
                    if let Err(err) = sink.write(line.as_bytes()) {
                        failed = true;
                        fail(err.to_string(), &errors, &handle.failure);
                        break;
                    }
                }
                written.inc_by(lines.len() as u64);
            }
            if unflushed.is_some() {
                let due = last_flush.elapsed() >= FLUSH_INTERVAL || frontier.is_empty();
                if due {
                    if let (Some(sink), false) = (handle.sink.as_mut(), failed) {
                        if let Err(err) = sink.flush() {
                            failed = true;
                            fail(err.to_string(), &errors, &handle.failure);
                        }
                    }
                    last_flush = Instant::now();
                    unflushed = None;
                } else {
                    activator.activate_after(FLUSH_INTERVAL.saturating_sub(last_flush.elapsed()));
                }
            }
        }
    })
}

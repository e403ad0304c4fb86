//! The sink operator: gathers a sink's records on worker 0, writes each event time's records
//! in sorted order once the time is final, and flushes. Sorting makes a sink's output
//! identical on any number of workers and processes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use edgeflow_connectors::Sink;
use edgeflow_operators::EventTime;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Operator;
use timely::dataflow::StreamVec;

use crate::metrics::Metrics;

/// The first runtime failure of a run, shared by all workers; a failure stops the run.
pub type Failure = Arc<Mutex<Option<String>>>;

/// The writer of one sink: present on worker 0 only.
pub struct SinkHandle {
    /// The connector; `None` on workers other than 0.
    pub sink: Option<Box<dyn Sink>>,
    /// Where to report a write failure.
    pub failure: Failure,
}

/// Writes `(key, line)` records to `handle`; the returned stream carries no data and exists
/// so that a probe can tell when the sink has written everything before a time.
pub fn sink_operator<'scope>(
    lines: StreamVec<'scope, EventTime, (EventTime, String)>,
    name: &str,
    mut handle: SinkHandle,
    metrics: Arc<Metrics>,
) -> StreamVec<'scope, EventTime, ()> {
    let written = metrics.sink_records.get_or_create(&vec![("sink", name.to_owned())]).clone();
    let errors = metrics.sink_errors.get_or_create(&vec![("sink", name.to_owned())]).clone();
    let sink_name = name.to_owned();
    lines.unary_frontier(Exchange::new(|_: &(EventTime, String)| 0), &format!("Sink({name})"), move |_cap, _| {
        let mut pending: BTreeMap<EventTime, Vec<(EventTime, String)>> = BTreeMap::new();
        let mut failed = false;
        move |(input, frontier),
              _output: &mut timely::dataflow::operators::generic::OutputBuilderSession<
            '_,
            EventTime,
            CapacityContainerBuilder<Vec<()>>,
        >| {
            input.for_each(|cap, data| {
                // A record is written once the frontier passes its key (its event time), or
                // its message time if later; within a time, records are sorted.
                let time = cap.least().copied().unwrap_or_default();
                for (key, line) in data.drain(..) {
                    pending.entry(key.max(time)).or_default().push((key, line));
                }
            });
            let mut wrote = false;
            while let Some(entry) = pending.first_entry() {
                if frontier.less_equal(entry.key()) {
                    break;
                }
                let mut lines = entry.remove();
                lines.sort();
                let Some(sink) = handle.sink.as_mut() else { continue };
                if failed {
                    continue;
                }
                for (_, line) in &lines {
                    if let Err(err) = sink.write(line.as_bytes()) {
                        errors.inc();
                        failed = true;
                        tracing::error!(sink = %sink_name, %err, "sink write failed; stopping the pipeline");
                        let mut failure = handle.failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                        failure.get_or_insert_with(|| format!("sink `{sink_name}`: {err}"));
                        break;
                    }
                }
                written.inc_by(lines.len() as u64);
                wrote = true;
            }
            if wrote && !failed {
                if let Some(sink) = handle.sink.as_mut() {
                    if let Err(err) = sink.flush() {
                        errors.inc();
                        failed = true;
                        tracing::error!(sink = %sink_name, %err, "sink flush failed; stopping the pipeline");
                        let mut failure = handle.failure.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                        failure.get_or_insert_with(|| format!("sink `{sink_name}`: {err}"));
                    }
                }
            }
        }
    })
}

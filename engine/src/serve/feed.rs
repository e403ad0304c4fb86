//! The dataflow side of a live table: an operator that sends a port's records, as rows, to
//! worker 0, which adds them to the [`Tables`] and marks the table complete up to its input
//! frontier. A query never waits on the dataflow, and the dataflow never waits on a query
//! (the lock is held for one batch of updates).

use std::sync::{Arc, Mutex};

use edgeflow_operators::EventTime;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Operator;
use timely::dataflow::StreamVec;

use super::rows::Layout;
use super::store::{Row, Tables};

/// The tables of a running pipeline, shared by the dataflow (worker 0 writes) and the
/// query server (reads).
pub type SharedTables = Arc<Mutex<Tables>>;

/// Feeds table `name` from `updates` (rows with their event time and `+1`/`-1`). Worker 0
/// holds the table; each input frontier it sees becomes the table's complete time.
pub fn feed<'scope>(updates: StreamVec<'scope, EventTime, (Row, EventTime, isize)>, name: &str, tables: SharedTables) {
    let name = name.to_owned();
    let index = updates.scope().index();
    updates.sink(
        Exchange::new(|_: &(Row, EventTime, isize)| 0),
        &format!("Serve({name})"),
        move |(input, frontier)| {
            let mut batch = Vec::new();
            input.for_each(|_, data| batch.append(data));
            if index != 0 {
                return;
            }
            let mut tables = tables.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if !batch.is_empty() {
                tables.update(&name, batch);
            }
            complete_before(&mut tables, &name, frontier.frontier().iter().min().copied());
        },
    );
}

/// Table `name` is complete up to just before `low`, the least time still to come on its
/// inputs (`None`: they have ended, and it is complete for all of time).
fn complete_before(tables: &mut Tables, name: &str, low: Option<EventTime>) {
    let complete = match low {
        Some(0) => return,
        Some(low) => low - 1,
        None => EventTime::MAX,
    };
    if let Err(err) = tables.advance(name, complete) {
        tracing::error!(table = %name, %err, "the live table cannot take its rows");
    }
}

type Unused<'a> = timely::dataflow::operators::generic::OutputBuilderSession<
    'a,
    EventTime,
    timely::container::CapacityContainerBuilder<Vec<()>>,
>;

/// Feeds collection table `name` from `updates` (as [`feed`]) and its rows' latest-entry
/// series from `latest` (key, time, cells; see [`Tables::update_latest`]): the table is
/// complete up to where both inputs are.
pub fn feed_with_latest<'scope>(
    updates: StreamVec<'scope, EventTime, (Row, EventTime, isize)>,
    latest: StreamVec<'scope, EventTime, (String, EventTime, Row)>,
    name: &str,
    tables: SharedTables,
) {
    let name = name.to_owned();
    let index = updates.scope().index();
    let operator = format!("Serve({name})");
    let _: StreamVec<'scope, EventTime, ()> = updates.binary_frontier(
        latest,
        Exchange::new(|_: &(Row, EventTime, isize)| 0),
        Exchange::new(|_: &(String, EventTime, Row)| 0),
        &operator,
        move |_, _| {
            move |(updates, updates_frontier), (latest, latest_frontier), _output: &mut Unused<'_>| {
                let mut batch = Vec::new();
                updates.for_each(|_, data| batch.append(data));
                let mut entries = Vec::new();
                latest.for_each(|_, data| entries.append(data));
                if index != 0 {
                    return;
                }
                let mut tables = tables.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if !batch.is_empty() {
                    tables.update(&name, batch);
                }
                if !entries.is_empty() {
                    tables.update_latest(&name, entries);
                }
                let low = updates_frontier.frontier().iter().chain(latest_frontier.frontier().iter()).min().copied();
                complete_before(&mut tables, &name, low);
            }
        },
    );
}

/// Each heartbeat inserted into `heartbeats` (a collection's updates) as its node's entry
/// of the latest-heartbeat series at the heartbeat's time.
pub fn latest_heartbeats<'scope>(
    heartbeats: StreamVec<'scope, EventTime, (edgeflow_operators::Heartbeat, EventTime, isize)>,
) -> StreamVec<'scope, EventTime, (String, EventTime, Row)> {
    heartbeats.flat_map(|(heartbeat, time, diff)| {
        (diff > 0).then(|| {
            let cells = super::rows::heartbeat_cells(&heartbeat);
            (heartbeat.node_id, time, cells)
        })
    })
}

/// `records` as rows of `layout` at their message time, each counted once (an append
/// table's records). A record that does not fit is logged and left out (a bug: the layouts
/// follow the records' own fields).
pub fn append_rows<'scope, D: serde::Serialize + 'static>(
    records: StreamVec<'scope, EventTime, D>,
    layout: Layout,
    name: &str,
) -> StreamVec<'scope, EventTime, (Row, EventTime, isize)> {
    let name = name.to_owned();
    records.unary(timely::dataflow::channels::pact::Pipeline, &format!("Rows({name})"), move |_, _| {
        move |input, output| {
            input.for_each(|cap, data| {
                let time = cap.least().copied().unwrap_or_default();
                let mut session = output.session(&cap);
                for record in data.drain(..) {
                    match layout.row(&record) {
                        Ok(row) => session.give((row, time, 1)),
                        Err(err) => tracing::error!(table = %name, %err, "a record does not fit its live table"),
                    }
                }
            });
        }
    })
}

/// A collection's updates as rows of `layout` with their times and diffs.
pub fn collection_rows<'scope, D: serde::Serialize + 'static>(
    updates: StreamVec<'scope, EventTime, (D, EventTime, isize)>,
    layout: Layout,
    name: &str,
) -> StreamVec<'scope, EventTime, (Row, EventTime, isize)> {
    let name = name.to_owned();
    updates.flat_map(move |(record, time, diff)| match layout.row(&record) {
        Ok(row) => Some((row, time, diff)),
        Err(err) => {
            tracing::error!(table = %name, %err, "a record does not fit its live table");
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PortKind;
    use edgeflow_operators::{HealthStatus, NodeState, StatusChange};
    use timely::dataflow::operators::vec::Input;

    fn state(node: &str, status: HealthStatus) -> NodeState {
        NodeState { node_id: node.into(), region: "eu".into(), status }
    }

    /// On 2 workers, the status collection and the changes reach worker 0's tables, each
    /// complete up to its input frontier: a read as of a time holds exactly what came before.
    #[test]
    fn two_workers_feed_one_consistent_table() {
        let shared: SharedTables = Arc::default();
        {
            let mut tables = shared.lock().unwrap();
            let layout = Layout::of(PortKind::NodeStatus).unwrap();
            tables.add_collection("nodes", layout.schema);
            let layout = Layout::of(PortKind::StatusChanges).unwrap();
            tables.add_append("changes", layout.schema, crate::serve::store::Retention::Rows(10));
        }
        let tables = shared.clone();
        timely::execute(timely::Config::process(2), move |worker| {
            let tables = tables.clone();
            let index = worker.index();
            let (mut statuses, mut changes) = worker.dataflow::<EventTime, _, _>(|scope| {
                let (statuses, stream) = scope.new_input::<(NodeState, EventTime, isize)>();
                feed(
                    collection_rows(stream, Layout::of(PortKind::NodeStatus).unwrap(), "nodes"),
                    "nodes",
                    tables.clone(),
                );
                let (changes, stream) = scope.new_input::<StatusChange>();
                feed(append_rows(stream, Layout::of(PortKind::StatusChanges).unwrap(), "changes"), "changes", tables);
                (statuses, changes)
            });
            // Worker 1 says node b is healthy at 10 and unhealthy at 20; worker 0 has a.
            let node = if index == 0 { "a" } else { "b" };
            statuses.send((state(node, HealthStatus::Healthy), 10, 1));
            changes.send(StatusChange {
                time: 10,
                node_id: node.into(),
                region: "eu".into(),
                from: None,
                to: HealthStatus::Healthy,
            });
            statuses.advance_to(20);
            changes.advance_to(20);
            if index == 1 {
                statuses.send((state("b", HealthStatus::Healthy), 20, -1));
                statuses.send((state("b", HealthStatus::Unhealthy), 20, 1));
            }
            statuses.advance_to(30);
            changes.advance_to(30);
        })
        .unwrap();
        let tables = shared.lock().unwrap();
        // Both inputs ended: complete for all of time.
        let at = tables.as_of(["nodes", "changes"]).unwrap();
        assert_eq!(at, EventTime::MAX);
        let nodes = tables.snapshot("nodes", at).unwrap();
        let statuses: Vec<String> = (0..nodes[0].num_rows())
            .map(|row| {
                let column = nodes[0].column(2).as_any().downcast_ref::<arrow_array::StringArray>().unwrap();
                column.value(row).to_owned()
            })
            .collect();
        assert_eq!(statuses, ["healthy", "unhealthy"]);
        let nodes = tables.snapshot("nodes", 15);
        assert!(nodes.is_err(), "folded past 15 once both tables were complete");
        assert_eq!(tables.snapshot("changes", at).unwrap().iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    }
}

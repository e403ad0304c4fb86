//! The table each servable operator output becomes: its schema (names, types, nullability,
//! exactly as queries will see them) and how one record becomes a row.
//!
//! Records become rows through their JSON form (the same fields as in files and topics), so
//! a table's columns are the record's documented fields. Nested values (labels, tensors)
//! become JSON text.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::Serialize;
use serde_json::Value;

use super::store::{time_type, Cell, Row};
use crate::config::PortKind;

/// Whether a table holds a collection's current contents or appended records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    /// The current contents of a differential collection.
    Collection,
    /// Records at their event times, kept for a retention.
    Append,
}

/// A column: its name (the record's JSON field), Arrow type and whether it may be null.
#[derive(Clone, Copy, Debug)]
struct Column {
    name: &'static str,
    kind: Kind,
    nullable: bool,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Text,
    Int,
    Float,
    Bool,
    Time,
    /// Any JSON value, as its JSON text.
    Json,
}

const fn column(name: &'static str, kind: Kind) -> Column {
    Column { name, kind, nullable: false }
}

const fn nullable(name: &'static str, kind: Kind) -> Column {
    Column { name, kind, nullable: true }
}

const NODE_STATUS: &[Column] =
    &[column("node_id", Kind::Text), column("region", Kind::Text), column("status", Kind::Text)];

const STATUS_CHANGES: &[Column] = &[
    column("node_id", Kind::Text),
    column("region", Kind::Text),
    nullable("from", Kind::Text),
    column("to", Kind::Text),
];

/// The columns a node's row takes from its latest heartbeat at the time read (nullable: a
/// node may have none yet).
const LATEST_HEARTBEAT: &[Column] = &[
    nullable("last_heartbeat", Kind::Time),
    nullable("cpu", Kind::Float),
    nullable("memory", Kind::Float),
    nullable("disk", Kind::Float),
    nullable("lat", Kind::Float),
    nullable("lon", Kind::Float),
    nullable("capacity", Kind::Float),
    nullable("labels", Kind::Json),
];

/// A heartbeat as the cells of [`LATEST_HEARTBEAT`].
pub fn heartbeat_cells(heartbeat: &edgeflow_operators::Heartbeat) -> Row {
    vec![
        Cell::Time(heartbeat.timestamp),
        Cell::Float(heartbeat.cpu),
        Cell::Float(heartbeat.memory),
        Cell::Float(heartbeat.disk),
        Cell::Float(heartbeat.lat),
        Cell::Float(heartbeat.lon),
        Cell::Float(heartbeat.capacity),
        Cell::Text(serde_json::to_string(&heartbeat.labels).unwrap_or_default()),
    ]
}

const REGION_ROLLUPS: &[Column] = &[
    column("region", Kind::Text),
    column("window_start", Kind::Time),
    column("window_end", Kind::Time),
    column("nodes", Kind::Int),
    column("healthy", Kind::Int),
    column("degraded", Kind::Int),
    column("unhealthy", Kind::Int),
    column("offline", Kind::Int),
    column("heartbeats", Kind::Int),
    nullable("cpu_mean", Kind::Float),
    nullable("cpu_max", Kind::Float),
    nullable("memory_mean", Kind::Float),
    nullable("memory_max", Kind::Float),
];

const WINDOW_RESULTS: &[Column] = &[
    column("key", Kind::Text),
    column("window_start", Kind::Time),
    column("window_end", Kind::Time),
    column("count", Kind::Int),
    nullable("sum", Kind::Float),
    nullable("mean", Kind::Float),
    nullable("min", Kind::Float),
    nullable("max", Kind::Float),
    column("revision", Kind::Int),
];

const INFERENCE_RESULTS: &[Column] = &[
    column("id", Kind::Text),
    column("model", Kind::Text),
    nullable("version", Kind::Int),
    column("status", Kind::Text),
    nullable("error", Kind::Text),
    column("outputs", Kind::Json),
    nullable("node", Kind::Text),
    column("queue_ms", Kind::Float),
    column("compute_ms", Kind::Float),
    column("batch_size", Kind::Int),
];

const FEDERATED_ROUNDS: &[Column] = &[
    column("round", Kind::Int),
    column("model_version", Kind::Int),
    column("selected", Kind::Int),
    column("accepted", Kind::Int),
    column("rejected", Kind::Int),
    column("quorum_met", Kind::Bool),
    nullable("client_loss", Kind::Float),
    column("test_loss", Kind::Float),
    column("test_accuracy", Kind::Float),
    nullable("epsilon", Kind::Float),
    nullable("clip_norm", Kind::Float),
    nullable("failure", Kind::Text),
];

/// The columns of a table fed by a port of `kind`, and what kind of table it is; `None`
/// for ports that cannot be served.
fn columns(kind: PortKind) -> Option<(TableKind, &'static [Column])> {
    Some(match kind {
        PortKind::NodeStatus => (TableKind::Collection, NODE_STATUS),
        PortKind::StatusChanges => (TableKind::Append, STATUS_CHANGES),
        PortKind::RegionRollups => (TableKind::Append, REGION_ROLLUPS),
        PortKind::WindowResults => (TableKind::Append, WINDOW_RESULTS),
        PortKind::InferenceResults => (TableKind::Append, INFERENCE_RESULTS),
        PortKind::FederatedRounds => (TableKind::Append, FEDERATED_ROUNDS),
        _ => return None,
    })
}

/// The port kinds a table can be made of.
pub const SERVABLE: [PortKind; 6] = [
    PortKind::NodeStatus,
    PortKind::StatusChanges,
    PortKind::RegionRollups,
    PortKind::WindowResults,
    PortKind::InferenceResults,
    PortKind::FederatedRounds,
];

/// How records of one port kind become rows of its table.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Collection or append.
    pub kind: TableKind,
    /// The table's schema (an append table's starts with the rows' event time, `time`).
    pub schema: SchemaRef,
    /// How many of the schema's last columns come from the latest heartbeat of the row's
    /// node (the node status table), not from the record.
    pub latest: usize,
    columns: &'static [Column],
}

impl Layout {
    /// The layout of a table fed by a port of `kind` (`None`: not servable).
    pub fn of(kind: PortKind) -> Option<Self> {
        let (table, columns) = columns(kind)?;
        let mut fields = Vec::with_capacity(columns.len() + 1);
        if table == TableKind::Append {
            fields.push(Field::new("time", time_type(), false));
        }
        let latest = if kind == PortKind::NodeStatus { LATEST_HEARTBEAT } else { &[] };
        fields.extend(columns.iter().chain(latest).map(|column| {
            let data_type = match column.kind {
                Kind::Text | Kind::Json => DataType::Utf8,
                Kind::Int => DataType::Int64,
                Kind::Float => DataType::Float64,
                Kind::Bool => DataType::Boolean,
                Kind::Time => time_type(),
            };
            Field::new(column.name, data_type, column.nullable)
        }));
        Some(Self { kind: table, schema: Arc::new(Schema::new(fields)), latest: latest.len(), columns })
    }

    /// `record` as a row of the table (without an append table's `time`, which the store
    /// adds): each column from the record's JSON field of its name. A field that is missing
    /// or of another type is null in a nullable column, and an error in another.
    pub fn row<T: Serialize>(&self, record: &T) -> Result<Row, String> {
        let value = serde_json::to_value(record).map_err(|err| format!("cannot encode the record: {err}"))?;
        self.columns
            .iter()
            .map(|column| {
                let field = value.get(column.name).unwrap_or(&Value::Null);
                let cell = match (column.kind, field) {
                    (_, Value::Null) => Cell::Null,
                    (Kind::Json, value) => Cell::Text(value.to_string()),
                    (Kind::Text, Value::String(text)) => Cell::Text(text.clone()),
                    (Kind::Int, Value::Number(number)) => {
                        number.as_i64().or_else(|| number.as_u64().map(|n| n as i64)).map_or(Cell::Null, Cell::Int)
                    }
                    (Kind::Float, Value::Number(number)) => number.as_f64().map_or(Cell::Null, Cell::Float),
                    (Kind::Bool, Value::Bool(value)) => Cell::Bool(*value),
                    (Kind::Time, Value::Number(number)) => number.as_u64().map_or(Cell::Null, Cell::Time),
                    _ => Cell::Null,
                };
                if matches!(cell, Cell::Null) && !column.nullable {
                    return Err(format!("field `{}` is {field}, not a value of column `{}`", column.name, column.name));
                }
                Ok(cell)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeflow_operators::{HealthStatus, NodeState, StatusChange};

    /// Rows follow the schema, nulls included, and the schema says which columns may be null.
    #[test]
    fn records_become_rows_of_their_tables_schema() {
        let layout = Layout::of(PortKind::StatusChanges).unwrap();
        assert_eq!(layout.kind, TableKind::Append);
        let names: Vec<&str> = layout.schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["time", "node_id", "region", "from", "to"]);
        assert!(layout.schema.field_with_name("from").unwrap().is_nullable());
        assert!(!layout.schema.field_with_name("to").unwrap().is_nullable());
        let change =
            StatusChange { time: 5, node_id: "n1".into(), region: "eu".into(), from: None, to: HealthStatus::Healthy };
        let row = layout.row(&change).unwrap();
        assert_eq!(
            row,
            vec![Cell::Text("n1".into()), Cell::Text("eu".into()), Cell::Null, Cell::Text("healthy".into())]
        );

        let status = Layout::of(PortKind::NodeStatus).unwrap();
        assert_eq!(status.kind, TableKind::Collection);
        let state = NodeState { node_id: "n1".into(), region: "eu".into(), status: HealthStatus::Degraded };
        assert_eq!(status.row(&state).unwrap()[2], Cell::Text("degraded".into()));
        assert!(Layout::of(PortKind::Heartbeats).is_none());
        for kind in SERVABLE {
            assert!(Layout::of(kind).is_some(), "{kind}");
        }
    }

    /// A record without a value for a column that may not be null is an error naming it.
    #[test]
    fn a_missing_required_field_is_an_error() {
        let layout = Layout::of(PortKind::StatusChanges).unwrap();
        let err = layout.row(&serde_json::json!({"node_id": "n1", "region": "eu"})).unwrap_err();
        assert!(err.contains("`to`"), "{err}");
    }
}

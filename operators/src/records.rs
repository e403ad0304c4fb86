//! The record types of edgeflow, defined once and imported everywhere.
//!
//! Every record has a documented JSON encoding (the serde derive below, one JSON object per
//! line on files and topics). The same types travel between timely workers and processes, so
//! their serde shape must stay symmetric: no `skip_serializing_if`, no `flatten`.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::federated::update::ModelUpdate;
use crate::EventTime;

/// Why a record was refused: a dead letter's reason. Every message names the record kind
/// and, where there is one, the field.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RecordError {
    /// The JSON is an array, not an object.
    #[error("invalid {what} JSON: expected an object, found an array")]
    NotAnObject {
        /// The record kind.
        what: &'static str,
    },
    /// The JSON does not decode into the record.
    #[error("invalid {what} JSON: {reason}")]
    Json {
        /// The record kind.
        what: &'static str,
        /// serde's message, with the line and column.
        reason: String,
    },
    /// A value is out of its range.
    #[error("invalid {what}: {problem}")]
    Invalid {
        /// The record, e.g. `heartbeat` or ``inference request `r1` ``.
        what: String,
        /// What is wrong, naming the field.
        problem: String,
    },
    /// Its event time cannot be used.
    #[error("invalid {what}: {source}")]
    Time {
        /// The record.
        what: String,
        /// Why.
        source: crate::time::TimeError,
    },
    /// One of its tensors is malformed.
    #[error("invalid {what}: {source}")]
    Tensor {
        /// The record.
        what: String,
        /// Why.
        source: TensorError,
    },
}

/// A tensor that cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TensorError {
    /// More than [`Tensor::MAX_DIMENSIONS`] dimensions.
    #[error("tensor `{name}` has {dimensions} dimensions; at most {max} are accepted", max = Tensor::MAX_DIMENSIONS)]
    TooManyDimensions {
        /// The tensor's name.
        name: String,
        /// Its dimensions.
        dimensions: usize,
    },
    /// A dimension larger than a tensor may hold.
    #[error("tensor `{name}` has shape {shape:?}: dimension {dimension} is more than the {max} values a tensor may hold", max = Tensor::MAX_VALUES)]
    DimensionTooLarge {
        /// The tensor's name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// The dimension.
        dimension: usize,
    },
    /// More values in all than a tensor may hold.
    #[error("tensor `{name}` has shape {shape:?}, more than the {max} values a tensor may hold", max = Tensor::MAX_VALUES)]
    TooManyValues {
        /// The tensor's name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// The data do not fill the shape.
    #[error("tensor `{name}` has shape {shape:?} ({expected} values) but {found} values")]
    WrongLength {
        /// The tensor's name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
        /// Values the shape calls for.
        expected: usize,
        /// Values found.
        found: usize,
    },
    /// A value that is not a finite number.
    #[error("{message}")]
    NotFinite {
        /// What and where.
        message: String,
    },
}

/// Decodes one JSON object of type `T`, named `what` in errors. A record is always an
/// object: serde would also accept an array of the fields in order (`["n1", ...]`), which
/// no sender means, so an array is refused here (other non-objects fail in serde).
pub fn decode_object<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, RecordError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(RecordError::NotAnObject { what });
    }
    serde_json::from_slice(bytes).map_err(|err| RecordError::Json { what, reason: err.to_string() })
}

/// A total order on records with floats, so they can live in differential collections
/// (which need `Ord`): floats compare with `total_cmp`.
macro_rules! total_order {
    ($type:ty, |$a:ident, $b:ident| $body:expr) => {
        impl PartialEq for $type {
            fn eq(&self, other: &Self) -> bool {
                self.cmp(other) == Ordering::Equal
            }
        }
        impl Eq for $type {}
        impl PartialOrd for $type {
            fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
                Some(self.cmp(other))
            }
        }
        impl Ord for $type {
            fn cmp(&self, other: &Self) -> Ordering {
                let ($a, $b) = (self, other);
                $body
            }
        }
    };
}

/// A floating-point measurement with a total order, so that it can live inside differential
/// collections (which need `Ord`). Serialised as a plain JSON number.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Gauge(pub f64);

total_order!(Gauge, |a, b| a.0.total_cmp(&b.0));

/// One heartbeat of an edge node: its identity, place, and resource use at `timestamp`.
///
/// JSON encoding (one object per line):
///
/// ```json
/// {"node_id":"edge-0042","region":"eu-west","lat":48.85,"lon":2.35,
///  "timestamp":1700000000000,"cpu":37.5,"memory":61.0,"disk":40.2,
///  "net_rx_bytes":123456,"net_tx_bytes":65432,"capacity":4.0,"labels":{"tier":"gpu"}}
/// ```
///
/// `cpu`, `memory` and `disk` are percentages in `[0, 100]`; `timestamp` is event time in
/// milliseconds since the Unix epoch; `capacity` is the node's compute capacity in cores.
/// `net_rx_bytes`, `net_tx_bytes`, `capacity` and `labels` are optional.
/// Unknown fields are ignored so that newer agents can add fields.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Heartbeat {
    /// Unique id of the edge node.
    pub node_id: String,
    /// Region the node belongs to.
    pub region: String,
    /// Latitude in degrees, `[-90, 90]`.
    pub lat: f64,
    /// Longitude in degrees, `[-180, 180]`.
    pub lon: f64,
    /// Event time: milliseconds since the Unix epoch.
    pub timestamp: EventTime,
    /// CPU use, percent.
    pub cpu: f64,
    /// Memory use, percent.
    pub memory: f64,
    /// Disk use, percent.
    pub disk: f64,
    /// Bytes received since the previous heartbeat.
    #[serde(default)]
    pub net_rx_bytes: u64,
    /// Bytes sent since the previous heartbeat.
    #[serde(default)]
    pub net_tx_bytes: u64,
    /// Compute capacity in cores.
    #[serde(default = "default_capacity")]
    pub capacity: f64,
    /// Free-form labels (`tier`, `hw`, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_capacity() -> f64 {
    1.0
}

impl Heartbeat {
    /// Decodes one JSON heartbeat and checks its values, with a reason on failure that names
    /// the offending field.
    pub fn from_json(bytes: &[u8]) -> Result<Self, RecordError> {
        let heartbeat: Heartbeat = decode_object(bytes, "heartbeat")?;
        heartbeat.validate()?;
        Ok(heartbeat)
    }

    /// Checks value ranges; the error names the field and the allowed range.
    pub fn validate(&self) -> Result<(), RecordError> {
        let invalid = |problem: String| RecordError::Invalid { what: "heartbeat".into(), problem };
        if self.node_id.is_empty() {
            return Err(invalid("`node_id` is empty".into()));
        }
        crate::time::check_event_time("timestamp", self.timestamp)
            .map_err(|source| RecordError::Time { what: "heartbeat".into(), source })?;
        let checks = [
            ("cpu", self.cpu, 0.0, 100.0),
            ("memory", self.memory, 0.0, 100.0),
            ("disk", self.disk, 0.0, 100.0),
            ("lat", self.lat, -90.0, 90.0),
            ("lon", self.lon, -180.0, 180.0),
            ("capacity", self.capacity, 0.0, f64::MAX),
        ];
        for (field, value, low, high) in checks {
            if !value.is_finite() || value < low || value > high {
                return Err(invalid(format!("`{field}` is {value}, expected a number in [{low}, {high}]")));
            }
        }
        Ok(())
    }

    fn order_key(&self) -> (EventTime, &str, &str) {
        (self.timestamp, &self.node_id, &self.region)
    }
}

total_order!(Heartbeat, |a, b| a
    .order_key()
    .cmp(&b.order_key())
    .then_with(|| a.cpu.total_cmp(&b.cpu))
    .then_with(|| a.memory.total_cmp(&b.memory))
    .then_with(|| a.disk.total_cmp(&b.disk))
    .then_with(|| a.lat.total_cmp(&b.lat))
    .then_with(|| a.lon.total_cmp(&b.lon))
    .then_with(|| a.net_rx_bytes.cmp(&b.net_rx_bytes))
    .then_with(|| a.net_tx_bytes.cmp(&b.net_tx_bytes))
    .then_with(|| a.capacity.total_cmp(&b.capacity))
    .then_with(|| a.labels.cmp(&b.labels)));

/// Health of one edge node, from best to worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Heartbeats on time and resources under the thresholds.
    Healthy,
    /// Heartbeats on time, but cpu, memory or disk over a threshold.
    Degraded,
    /// The latest heartbeat is older than the soft threshold (`unhealthy_after`).
    Unhealthy,
    /// No heartbeat for `heartbeat_timeout`.
    Offline,
}

impl HealthStatus {
    /// Every status, in order; handy for per-status counters.
    pub const ALL: [HealthStatus; 4] =
        [HealthStatus::Healthy, HealthStatus::Degraded, HealthStatus::Unhealthy, HealthStatus::Offline];

    /// The lowercase name used in JSON, metrics labels and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
            HealthStatus::Offline => "offline",
        }
    }

    /// Position in [`HealthStatus::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The live state of one node, as held in the node-health collection. It changes only when
/// the node's status does, so the collection stays small and quiet.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeState {
    /// Node id.
    pub node_id: String,
    /// Region of the node.
    pub region: String,
    /// Current status.
    pub status: HealthStatus,
}

/// A node's status changed at event time `time`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StatusChange {
    /// Event time at which the new status holds.
    pub time: EventTime,
    /// Node id.
    pub node_id: String,
    /// Region of the node.
    pub region: String,
    /// Previous status; `null` for a node seen for the first time.
    pub from: Option<HealthStatus>,
    /// New status.
    pub to: HealthStatus,
}

/// Nodes per status and resource use in one region, as of the end of a window.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct RegionRollup {
    /// Region.
    pub region: String,
    /// Start of the window (inclusive), ms.
    pub window_start: EventTime,
    /// End of the window (exclusive), ms; the snapshot is the state at this time.
    pub window_end: EventTime,
    /// Number of known nodes in the region.
    pub nodes: u64,
    /// Nodes Healthy.
    pub healthy: u64,
    /// Nodes Degraded.
    pub degraded: u64,
    /// Nodes Unhealthy.
    pub unhealthy: u64,
    /// Nodes Offline.
    pub offline: u64,
    /// Heartbeats received from the region in the window.
    pub heartbeats: u64,
    /// Mean CPU percent of those heartbeats (none without heartbeats).
    pub cpu_mean: Option<Gauge>,
    /// Max CPU percent of those heartbeats.
    pub cpu_max: Option<Gauge>,
    /// Mean memory percent of those heartbeats.
    pub memory_mean: Option<Gauge>,
    /// Max memory percent of those heartbeats.
    pub memory_max: Option<Gauge>,
}

/// One aggregate of one key over one event-time window.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WindowResult {
    /// The key value (node id, region, or label value).
    pub key: String,
    /// Window start (inclusive), ms.
    pub window_start: EventTime,
    /// Window end (exclusive), ms.
    pub window_end: EventTime,
    /// Number of records in the window.
    pub count: u64,
    /// Sum of the field, when requested.
    pub sum: Option<Gauge>,
    /// Mean of the field, when requested.
    pub mean: Option<Gauge>,
    /// Minimum of the field, when requested.
    pub min: Option<Gauge>,
    /// Maximum of the field, when requested.
    pub max: Option<Gauge>,
    /// 0 for the first result of a window; 1, 2, ... for corrections by late records
    /// (late policy `update`).
    pub revision: u32,
}

/// A record that could not be processed, with where it came from and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Name of the source (or operator) that rejected it.
    pub source: String,
    /// Where it was: `file.jsonl:17` (line), `partition 3 offset 1200`, `generator node 12 seq 4`.
    pub position: String,
    /// What was wrong, in words.
    pub reason: String,
    /// The original bytes.
    pub payload: Vec<u8>,
}

impl DeadLetter {
    /// The JSON encoding: `payload` as text when the bytes are UTF-8, otherwise
    /// `payload_hex` as lowercase hex, so the original bytes are always recoverable.
    pub fn to_json(&self) -> serde_json::Value {
        let mut object = serde_json::json!({
            "source": self.source,
            "position": self.position,
            "reason": self.reason,
        });
        match std::str::from_utf8(&self.payload) {
            Ok(text) => object["payload"] = serde_json::Value::String(text.to_owned()),
            Err(_) => {
                let hex: String = self.payload.iter().map(|b| format!("{b:02x}")).collect();
                object["payload_hex"] = serde_json::Value::String(hex);
            }
        }
        object
    }
}

/// A dense tensor of 32-bit floats in row-major order, as carried in inference requests and
/// results. JSON: `{"shape":[1,4],"data":[0.1,0.2,0.3,0.4]}`; `data` holds the product of
/// `shape` values. Model outputs of other numeric element types (int64 labels, float64) are
/// converted to f32 in results.
#[derive(Clone, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tensor {
    /// Dimensions; the first is the batch (rows) dimension for model inputs and outputs.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

impl Tensor {
    /// Most values a tensor may hold (16 Mi: 64 MiB of f32), so that no shape can make the
    /// engine allocate without bound when it batches requests.
    pub const MAX_VALUES: usize = 1 << 24;
    /// Most dimensions a tensor may have.
    pub const MAX_DIMENSIONS: usize = 16;

    /// Checks that `data` holds exactly the number of values `shape` calls for.
    pub fn validate(&self, name: &str) -> Result<(), TensorError> {
        let name = || name.to_owned();
        if self.shape.len() > Self::MAX_DIMENSIONS {
            return Err(TensorError::TooManyDimensions { name: name(), dimensions: self.shape.len() });
        }
        if let Some(dim) = self.shape.iter().find(|dim| **dim > Self::MAX_VALUES) {
            return Err(TensorError::DimensionTooLarge { name: name(), shape: self.shape.clone(), dimension: *dim });
        }
        // Checked: a shape such as [2^62, 4] must not wrap around to a small product.
        let expected = self
            .shape
            .iter()
            .try_fold(1usize, |product, dim| product.checked_mul(*dim))
            .filter(|values| *values <= Self::MAX_VALUES)
            .ok_or_else(|| TensorError::TooManyValues { name: name(), shape: self.shape.clone() })?;
        if expected != self.data.len() {
            return Err(TensorError::WrongLength {
                name: name(),
                shape: self.shape.clone(),
                expected,
                found: self.data.len(),
            });
        }
        if let Some(position) = self.data.iter().position(|value| !value.is_finite()) {
            let message = format!("tensor `{}` has a non-finite value at index {position}", name());
            return Err(TensorError::NotFinite { message });
        }
        Ok(())
    }

    /// Rows: the first dimension (1 for a scalar).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }
}

/// Priority of an inference request: a full queue makes room for higher priorities, and a
/// batch takes higher priorities first.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Served first.
    High,
    /// The default.
    #[default]
    Normal,
    /// Served last; displaced first from a full queue.
    Low,
}

impl Priority {
    /// Every priority, highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// Position in [`Priority::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The lowercase name used in JSON and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
}

/// A point on Earth, in degrees.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Location {
    /// Latitude, `[-90, 90]`.
    pub lat: f64,
    /// Longitude, `[-180, 180]`.
    pub lon: f64,
}

/// One inference request.
///
/// JSON encoding (one object per line):
///
/// ```json
/// {"id":"req-17","model":"anomaly","version":null,"timestamp":1700000000000,
///  "inputs":{"features":{"shape":[1,3],"data":[37.5,61.0,40.2]}},
///  "deadline":1700000000250,"priority":"normal","location":{"lat":48.85,"lon":2.35},
///  "region":"eu-west","key":null,"node":null}
/// ```
///
/// `version` pins a model version (default: the latest loaded). `deadline` is the wall-clock
/// time (ms since the epoch) after which the result is useless: a request still queued then
/// gets an `expired` result. `location`, `region` and `key` guide `load_balance`, which sets
/// `node`. Only `id`, `model`, `timestamp` and `inputs` are required.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceRequest {
    /// Request id, echoed in the result.
    pub id: String,
    /// Model name in the registry.
    pub model: String,
    /// Pinned model version; `null` for the latest.
    #[serde(default)]
    pub version: Option<u64>,
    /// Event time of the request, ms since the epoch.
    pub timestamp: EventTime,
    /// Input tensors by model input name.
    pub inputs: BTreeMap<String, Tensor>,
    /// Wall-clock deadline, ms since the epoch.
    #[serde(default)]
    pub deadline: Option<EventTime>,
    /// Priority (default `normal`).
    #[serde(default)]
    pub priority: Priority,
    /// Where the request comes from, for `geo_nearest` balancing.
    #[serde(default)]
    pub location: Option<Location>,
    /// Region of the request, the fallback of `geo_nearest`.
    #[serde(default)]
    pub region: Option<String>,
    /// Routing key for `consistent_hash` (default: the id).
    #[serde(default)]
    pub key: Option<String>,
    /// The edge node chosen to serve it (set by `load_balance`).
    #[serde(default)]
    pub node: Option<String>,
}

impl InferenceRequest {
    /// Decodes one JSON request and checks its tensors.
    pub fn from_json(bytes: &[u8]) -> Result<Self, RecordError> {
        let request: InferenceRequest = decode_object(bytes, "inference request")?;
        request.validate()?;
        Ok(request)
    }

    /// Checks the id, model and tensors; the error names what is wrong.
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.id.is_empty() {
            return Err(RecordError::Invalid { what: "inference request".into(), problem: "`id` is empty".into() });
        }
        let what = || format!("inference request `{}`", self.id);
        let invalid = |problem: String| RecordError::Invalid { what: what(), problem };
        if self.model.is_empty() {
            return Err(invalid("`model` is empty".into()));
        }
        if self.inputs.is_empty() {
            return Err(invalid("`inputs` is empty".into()));
        }
        crate::time::check_event_time("timestamp", self.timestamp)
            .map_err(|source| RecordError::Time { what: what(), source })?;
        for (name, tensor) in &self.inputs {
            tensor.validate(name).map_err(|source| RecordError::Tensor { what: what(), source })?;
        }
        if let Some(location) = self.location {
            if !(-90.0..=90.0).contains(&location.lat) || !(-180.0..=180.0).contains(&location.lon) {
                return Err(invalid(format!(
                    "location ({}, {}) is not a latitude/longitude",
                    location.lat, location.lon
                )));
            }
        }
        Ok(())
    }

    /// The key `consistent_hash` routes on: `key`, else the id.
    pub fn routing_key(&self) -> &str {
        self.key.as_deref().unwrap_or(&self.id)
    }
}

fn cmp_floats(a: &[f32], b: &[f32]) -> Ordering {
    a.len()
        .cmp(&b.len())
        .then_with(|| a.iter().zip(b).map(|(x, y)| x.total_cmp(y)).find(|o| o.is_ne()).unwrap_or(Ordering::Equal))
}

total_order!(Tensor, |a, b| a.shape.cmp(&b.shape).then_with(|| cmp_floats(&a.data, &b.data)));
total_order!(Location, |a, b| a.lat.total_cmp(&b.lat).then_with(|| a.lon.total_cmp(&b.lon)));
total_order!(InferenceRequest, |a, b| (a.timestamp, &a.id, &a.model, a.version, a.priority, a.deadline)
    .cmp(&(b.timestamp, &b.id, &b.model, b.version, b.priority, b.deadline))
    .then_with(|| (&a.node, &a.key, &a.region, a.location).cmp(&(&b.node, &b.key, &b.region, b.location)))
    .then_with(|| a.inputs.cmp(&b.inputs)));

/// How an inference request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// Served: `outputs` holds the model's outputs.
    Ok,
    /// Its deadline passed before it was served.
    Expired,
    /// Not admitted: the queue was full, or a higher priority displaced it.
    Rejected,
    /// The request does not fit the model (missing input, wrong shape), the model or version
    /// does not exist, or the run failed.
    Failed,
}

impl ResultStatus {
    /// Every status.
    pub const ALL: [ResultStatus; 4] =
        [ResultStatus::Ok, ResultStatus::Expired, ResultStatus::Rejected, ResultStatus::Failed];

    /// The lowercase name used in JSON and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Ok => "ok",
            ResultStatus::Expired => "expired",
            ResultStatus::Rejected => "rejected",
            ResultStatus::Failed => "failed",
        }
    }
}

/// The result of one inference request: every request gets exactly one.
///
/// ```json
/// {"id":"req-17","model":"anomaly","version":2,"status":"ok","error":null,
///  "outputs":{"scores":{"shape":[1,1],"data":[0.12]}},"node":"edge-0007",
///  "timestamp":1700000000000,"queue_ms":1.8,"compute_ms":0.4,"batch_size":12,
///  "finished_at":1700000000002.6}
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceResult {
    /// The request's id.
    pub id: String,
    /// The model asked for.
    pub model: String,
    /// The version that computed it (`null` when none ran).
    pub version: Option<u64>,
    /// How it ended.
    pub status: ResultStatus,
    /// Why, when it did not end `ok`.
    pub error: Option<String>,
    /// Output tensors by model output name (empty unless `ok`).
    pub outputs: BTreeMap<String, Tensor>,
    /// The edge node that served it (`load_balance`'s choice), if any.
    pub node: Option<String>,
    /// Event time of the request.
    pub timestamp: EventTime,
    /// Time from admission to the start of the model run, ms.
    pub queue_ms: f64,
    /// Time of the model run of its batch, ms.
    pub compute_ms: f64,
    /// Number of requests in its batch (0 when none ran).
    pub batch_size: u32,
    /// When the result was made, by the wall clock: ms since the epoch, with a fractional
    /// part (for a generated request, `finished_at - timestamp` is its whole latency).
    pub finished_at: f64,
}

/// The wall clock in ms since the epoch, with a fractional part.
pub fn wall_clock_ms_f64() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

impl InferenceResult {
    /// Appends the result's JSON (the bytes `serde_json` writes, without the serde
    /// machinery) to `out`. Results are the hottest records of an inference pipeline, and
    /// most of their bytes are output floats.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut floats = zmij::Buffer::new();
        out.extend_from_slice(b"{\"id\":");
        json::string(out, &self.id);
        out.extend_from_slice(b",\"model\":");
        json::string(out, &self.model);
        out.extend_from_slice(b",\"version\":");
        json::option(out, self.version.as_ref(), |out, v| json::integer(out, *v));
        out.extend_from_slice(b",\"status\":\"");
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.extend_from_slice(b"\",\"error\":");
        json::option(out, self.error.as_deref(), json::string);
        out.extend_from_slice(b",\"outputs\":{");
        for (index, (name, tensor)) in self.outputs.iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            json::string(out, name);
            out.extend_from_slice(b":{\"shape\":[");
            for (index, dim) in tensor.shape.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                json::integer(out, *dim as u64);
            }
            out.extend_from_slice(b"],\"data\":[");
            for (index, value) in tensor.data.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                json::float(out, &mut floats, *value);
            }
            out.extend_from_slice(b"]}");
        }
        out.extend_from_slice(b"},\"node\":");
        json::option(out, self.node.as_deref(), json::string);
        out.extend_from_slice(b",\"timestamp\":");
        json::integer(out, self.timestamp);
        out.extend_from_slice(b",\"queue_ms\":");
        json::float(out, &mut floats, self.queue_ms);
        out.extend_from_slice(b",\"compute_ms\":");
        json::float(out, &mut floats, self.compute_ms);
        out.extend_from_slice(b",\"batch_size\":");
        json::integer(out, u64::from(self.batch_size));
        out.extend_from_slice(b",\"finished_at\":");
        json::float(out, &mut floats, self.finished_at);
        out.push(b'}');
    }

    /// The result's JSON line (see [`Self::write_json`]).
    pub fn to_json_line(&self) -> Vec<u8> {
        // Room for the fields and ~16 bytes per output float, so the line is not regrown.
        let mut line = Vec::with_capacity(256 + 16 * self.outputs.values().map(|t| t.data.len()).sum::<usize>());
        self.write_json(&mut line);
        line
    }

    /// A result that ends `request` without a model run.
    pub fn refused(request: &InferenceRequest, status: ResultStatus, reason: String, queue_ms: f64) -> Self {
        InferenceResult {
            id: request.id.clone(),
            model: request.model.clone(),
            version: None,
            status,
            error: Some(reason),
            outputs: BTreeMap::new(),
            node: request.node.clone(),
            timestamp: request.timestamp,
            queue_ms,
            compute_ms: 0.0,
            batch_size: 0,
            finished_at: wall_clock_ms_f64(),
        }
    }
}

/// The kinds of record a source can decode.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// [`Heartbeat`] records (the default).
    #[default]
    Heartbeats,
    /// [`InferenceRequest`] records.
    InferenceRequests,
    /// Federated-learning client updates ([`ModelUpdate`]).
    ModelUpdates,
}

impl RecordKind {
    /// Decodes one JSON record of this kind.
    pub fn decode(self, bytes: &[u8]) -> Result<Record, RecordError> {
        match self {
            RecordKind::Heartbeats => Heartbeat::from_json(bytes).map(Record::Heartbeat),
            RecordKind::InferenceRequests => InferenceRequest::from_json(bytes).map(|r| Record::Request(Box::new(r))),
            RecordKind::ModelUpdates => ModelUpdate::from_json(bytes).map(|u| Record::Update(Box::new(u))),
        }
    }
}

/// A message of a `kafka` source read with `format: raw`: its bytes as they were, with where
/// it came from. Only sinks take it: a `kafka` sink writes the value with the original key; a
/// file or stdout sink writes a JSON line:
///
/// ```json
/// {"topic":"edge-logs","partition":0,"offset":42,"timestamp":1700000000000,
///  "key":"bm9kZS0x","value":"AAEC/w=="}
/// ```
///
/// `key` (null when the message has none) and `value` in base64 (standard alphabet, padded);
/// `timestamp` is the message's Kafka timestamp, its event time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RawMessage {
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its Kafka timestamp, ms since the epoch (the event time).
    pub timestamp: EventTime,
    /// Its key, if any.
    pub key: Option<Vec<u8>>,
    /// Its value.
    pub value: Vec<u8>,
}

impl RawMessage {
    /// The JSON line written by file and stdout sinks.
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine;
        let base64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        serde_json::json!({
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp,
            "key": self.key.as_deref().map(base64),
            "value": base64(&self.value),
        })
    }
}

/// A record as a source yields it.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A heartbeat.
    Heartbeat(Heartbeat),
    /// An inference request (boxed: tensors make it large).
    Request(Box<InferenceRequest>),
    /// A federated client's update (boxed: the payload makes it large).
    Update(Box<ModelUpdate>),
    /// A message's bytes as they were (`format: raw`).
    Raw(Box<RawMessage>),
}

impl Record {
    /// The record's event time.
    pub fn event_time(&self) -> EventTime {
        match self {
            Record::Heartbeat(heartbeat) => heartbeat.timestamp,
            Record::Request(request) => request.timestamp,
            Record::Update(update) => update.timestamp,
            Record::Raw(message) => message.timestamp,
        }
    }

    /// The record's JSON encoding (for dead letters of late records).
    pub fn to_json(&self) -> Vec<u8> {
        match self {
            Record::Heartbeat(heartbeat) => serde_json::to_vec(heartbeat),
            Record::Request(request) => serde_json::to_vec(request),
            Record::Update(update) => serde_json::to_vec(update),
            Record::Raw(message) => Ok(message.value.clone()),
        }
        .unwrap_or_default()
    }

    /// Where the record is, in words, for dead letters.
    pub fn position(&self) -> String {
        match self {
            Record::Heartbeat(heartbeat) => format!("node {} time {}", heartbeat.node_id, heartbeat.timestamp),
            Record::Request(request) => format!("request {} time {}", request.id, request.timestamp),
            Record::Update(update) => format!("round {} client {}", update.round, update.client_id),
            Record::Raw(message) => {
                format!("topic {} partition {} offset {}", message.topic, message.partition, message.offset)
            }
        }
    }
}

/// Pieces of hand-written JSON encoders, writing exactly what `serde_json` writes.
mod json {
    /// A JSON string: short plain strings are copied; others go through `serde_json`'s
    /// escaping.
    pub(super) fn string(out: &mut Vec<u8>, value: &str) {
        if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            out.push(b'"');
            out.extend_from_slice(value.as_bytes());
            out.push(b'"');
        } else {
            // Writing into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, value);
        }
    }

    pub(super) fn integer(out: &mut Vec<u8>, value: u64) {
        out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// A float as `serde_json` writes it: the shortest form that reads back the same, and
    /// `null` for NaN and the infinities.
    pub(super) fn float<F: zmij::Float + Copy + Into<f64>>(out: &mut Vec<u8>, buffer: &mut zmij::Buffer, value: F) {
        if value.into().is_finite() {
            out.extend_from_slice(buffer.format_finite(value).as_bytes());
        } else {
            out.extend_from_slice(b"null");
        }
    }

    pub(super) fn option<T>(out: &mut Vec<u8>, value: Option<T>, write: impl FnOnce(&mut Vec<u8>, T)) {
        match value {
            Some(value) => write(out, value),
            None => out.extend_from_slice(b"null"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_written_result_json_is_what_serde_writes() {
        let base = InferenceResult {
            id: "req-1".into(),
            model: "mlp".into(),
            version: Some(3),
            status: ResultStatus::Ok,
            error: None,
            outputs: BTreeMap::from([
                ("y".to_owned(), Tensor { shape: vec![1, 4], data: vec![0.1, -2.5e-8, 3.0e30, f32::NAN] }),
                ("a\"b".to_owned(), Tensor { shape: vec![0], data: vec![] }),
            ]),
            node: Some("edge-0007".into()),
            timestamp: 1_700_000_000_000,
            queue_ms: 1.25,
            compute_ms: 0.000_123,
            batch_size: 64,
            finished_at: 1_700_000_000_002.637,
        };
        let refused = InferenceResult {
            version: None,
            status: ResultStatus::Failed,
            error: Some("tensor `x` has shape [1, 3]\nnot \u{1}[1, 64] \\ é".into()),
            outputs: BTreeMap::new(),
            node: None,
            queue_ms: f64::INFINITY,
            ..base.clone()
        };
        for result in [base, refused] {
            let mut out = Vec::new();
            result.write_json(&mut out);
            assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&result).unwrap());
        }
    }

    fn sample() -> &'static str {
        r#"{"node_id":"edge-1","region":"eu","lat":48.8,"lon":2.3,"timestamp":1000,
            "cpu":37.5,"memory":61.0,"disk":40.0}"#
    }

    #[test]
    fn decodes_documented_json_with_defaults() {
        let hb = Heartbeat::from_json(sample().as_bytes()).unwrap();
        assert_eq!(hb.node_id, "edge-1");
        assert_eq!(hb.capacity, 1.0);
        assert!(hb.labels.is_empty());
        let back = serde_json::to_string(&hb).unwrap();
        assert_eq!(Heartbeat::from_json(back.as_bytes()).unwrap(), hb);
    }

    #[test]
    fn rejects_out_of_range_with_field_name() {
        let bad = sample().replace("37.5", "137.5");
        let err = Heartbeat::from_json(bad.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("`cpu` is 137.5"), "{err}");
        let err = Heartbeat::from_json(b"{\"node_id\":1}").unwrap_err().to_string();
        assert!(err.starts_with("invalid heartbeat JSON"), "{err}");
    }

    #[test]
    fn dead_letter_keeps_binary_payloads() {
        let letter =
            DeadLetter { source: "s".into(), position: "p".into(), reason: "r".into(), payload: vec![0xff, 0x00] };
        assert_eq!(letter.to_json()["payload_hex"], "ff00");
    }
}

//! The record types of edgeflow, defined once and imported everywhere.
//!
//! Every record has a documented JSON encoding (the serde derive below, one JSON object per
//! line on files and topics). The same types travel between timely workers and processes, so
//! their serde shape must stay symmetric: no `skip_serializing_if`, no `flatten`.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::EventTime;

/// A floating-point measurement with a total order, so that it can live inside differential
/// collections (which need `Ord`). Serialised as a plain JSON number.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Gauge(pub f64);

impl PartialEq for Gauge {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0) == Ordering::Equal
    }
}
impl Eq for Gauge {}
impl PartialOrd for Gauge {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Gauge {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

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
    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        let heartbeat: Heartbeat =
            serde_json::from_slice(bytes).map_err(|err| format!("invalid heartbeat JSON: {err}"))?;
        heartbeat.validate()?;
        Ok(heartbeat)
    }

    /// Checks value ranges; the error names the field and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_id.is_empty() {
            return Err("invalid heartbeat: `node_id` is empty".into());
        }
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
                return Err(format!("invalid heartbeat: `{field}` is {value}, expected a number in [{low}, {high}]"));
            }
        }
        Ok(())
    }

    fn order_key(&self) -> (EventTime, &str, &str) {
        (self.timestamp, &self.node_id, &self.region)
    }
}

impl PartialEq for Heartbeat {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Heartbeat {}
impl PartialOrd for Heartbeat {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Heartbeat {
    fn cmp(&self, other: &Self) -> Ordering {
        self.order_key()
            .cmp(&other.order_key())
            .then_with(|| self.cpu.total_cmp(&other.cpu))
            .then_with(|| self.memory.total_cmp(&other.memory))
            .then_with(|| self.disk.total_cmp(&other.disk))
            .then_with(|| self.lat.total_cmp(&other.lat))
            .then_with(|| self.lon.total_cmp(&other.lon))
            .then_with(|| self.net_rx_bytes.cmp(&other.net_rx_bytes))
            .then_with(|| self.net_tx_bytes.cmp(&other.net_tx_bytes))
            .then_with(|| self.capacity.total_cmp(&other.capacity))
            .then_with(|| self.labels.cmp(&other.labels))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = Heartbeat::from_json(bad.as_bytes()).unwrap_err();
        assert!(err.contains("`cpu` is 137.5"), "{err}");
        let err = Heartbeat::from_json(b"{\"node_id\":1}").unwrap_err();
        assert!(err.starts_with("invalid heartbeat JSON"), "{err}");
    }

    #[test]
    fn dead_letter_keeps_binary_payloads() {
        let letter =
            DeadLetter { source: "s".into(), position: "p".into(), reason: "r".into(), payload: vec![0xff, 0x00] };
        assert_eq!(letter.to_json()["payload_hex"], "ff00");
    }
}

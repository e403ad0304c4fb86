//! The `inference` operator ([`operator`]), its configuration, and how heartbeats become
//! inference requests (telemetry scoring); the batching rules are in [`crate::batcher`].

pub mod operator;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::batcher::BatchPolicy;
use crate::records::{Heartbeat, InferenceRequest, Location, Priority, Tensor};
use crate::DurationMs;

/// A heartbeat field used as a model feature: the numeric fields `window_aggregate` reads.
pub use crate::window_aggregate::WindowField as HeartbeatFeature;

/// YAML configuration of the `inference` operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InferenceConfig {
    /// The model registry: one directory per model, one numbered directory per version,
    /// each with a `model.onnx`. A relative path is relative to the pipeline file.
    pub registry: PathBuf,
    /// The models this operator serves (directories of the registry). A request for
    /// another model gets a `failed` result.
    pub models: Vec<String>,
    /// With a heartbeat input: the heartbeat fields that make the `[1, k]` input tensor of
    /// the first model (its only input). Each heartbeat becomes a request with the id
    /// `NODE@TIMESTAMP`.
    #[serde(default)]
    pub features: Vec<HeartbeatFeature>,
    /// Most requests in one model run (default 64).
    #[serde(default = "defaults::max_batch_size")]
    pub max_batch_size: usize,
    /// Longest a request waits for its batch to fill (default 5ms).
    #[serde(default = "defaults::max_queue_delay")]
    pub max_queue_delay: DurationMs,
    /// Most requests waiting per model and worker; beyond it requests are rejected with
    /// the reason, or displace lower-priority ones (default 4096).
    #[serde(default = "defaults::queue_capacity")]
    pub queue_capacity: usize,
    /// ONNX Runtime threads inside one operator per session (default 1; 0: one per core).
    #[serde(default = "defaults::threads")]
    pub intra_op_threads: usize,
    /// ONNX Runtime threads running independent graph operators (default 1; 0: default).
    #[serde(default = "defaults::threads")]
    pub inter_op_threads: usize,
    /// How often the registry is checked for new versions (default 1s; 0s: never).
    #[serde(default = "defaults::watch")]
    pub watch: DurationMs,
}

mod defaults {
    use crate::DurationMs;
    pub fn max_batch_size() -> usize {
        64
    }
    pub fn max_queue_delay() -> DurationMs {
        DurationMs(5)
    }
    pub fn queue_capacity() -> usize {
        4096
    }
    pub fn threads() -> usize {
        1
    }
    pub fn watch() -> DurationMs {
        DurationMs::from_secs(1)
    }
}

impl crate::params::Validate for InferenceConfig {
    /// The registry's contents are checked when the models load.
    fn validate(&self, problems: &mut crate::params::ParamErrors) {
        if self.models.is_empty() {
            problems.at_value("models", "name at least one model of the registry");
        }
        if self.max_batch_size == 0 {
            problems.at_value("max_batch_size", "max_batch_size must be at least 1");
        }
        if self.queue_capacity < self.max_batch_size {
            problems.at_value(
                "queue_capacity",
                format!(
                    "queue_capacity ({}) must be at least max_batch_size ({})",
                    self.queue_capacity, self.max_batch_size
                ),
            );
        }
    }
}

impl InferenceConfig {
    /// The batching policy.
    pub fn policy(&self) -> BatchPolicy {
        BatchPolicy {
            max_batch_size: self.max_batch_size,
            max_queue_delay: std::time::Duration::from_millis(self.max_queue_delay.as_millis()),
            queue_capacity: self.queue_capacity,
        }
    }

    /// The request that scores `heartbeat` with the first model, whose input is `input`.
    pub fn heartbeat_request(&self, heartbeat: &Heartbeat, input: &str) -> InferenceRequest {
        let data: Vec<f32> = self.features.iter().map(|f| f.read(heartbeat) as f32).collect();
        InferenceRequest {
            id: format!("{}@{}", heartbeat.node_id, heartbeat.timestamp),
            model: self.models.first().cloned().unwrap_or_default(),
            version: None,
            timestamp: heartbeat.timestamp,
            inputs: BTreeMap::from([(input.to_owned(), Tensor { shape: vec![1, data.len()], data })]),
            deadline: None,
            priority: Priority::Normal,
            location: Some(Location { lat: heartbeat.lat, lon: heartbeat.lon }),
            region: Some(heartbeat.region.clone()),
            key: Some(heartbeat.node_id.clone()),
            node: None,
        }
    }
}

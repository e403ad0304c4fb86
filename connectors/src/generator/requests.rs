//! The `requests` source: an open-loop generator of inference requests at a target rate.
//!
//! Request `i` is due at `start + i / rate` by the wall clock, whatever the engine does:
//! when the engine falls behind, requests pile up instead of arriving more slowly, so the
//! latency measured from a request's `timestamp` (its due time) includes the time it waited
//! to enter (no coordinated omission). Workers split the sequence (`i % peers == index`).

use edgeflow_operators::params::Checked;
use std::collections::BTreeMap;

use edgeflow_operators::{DurationMs, EventTime, InferenceRequest, Location, Priority, Record, Tensor};
use serde::{Deserialize, Serialize};

use super::RegionConfig;
use crate::{wall_clock_ms, ConnectorError, Source, SourceItem, SourceStatus};

/// YAML configuration of the `requests` source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestGeneratorConfig {
    /// Model the requests ask for.
    pub model: String,
    /// Pinned version (default: none, the latest).
    #[serde(default)]
    pub version: Option<u64>,
    /// Requests per second over all workers.
    pub rate: f64,
    /// Total number of requests; without it (or `duration`) the source runs until stopped.
    #[serde(default)]
    pub count: Option<u64>,
    /// Length of the stream; ends the source after this long.
    #[serde(default)]
    pub duration: Option<DurationMs>,
    /// Name of the model input to fill (`input` names a component's inputs in pipelines).
    pub input_name: String,
    /// Shape of each request's tensor (first dimension: rows, usually 1).
    pub shape: Vec<usize>,
    /// Deadline budget: each request's deadline is its due time plus this (default none).
    #[serde(default)]
    pub deadline: Option<DurationMs>,
    /// Fraction of requests with `high` priority (default 0).
    #[serde(default)]
    pub high_priority_fraction: f64,
    /// Fraction of requests with `low` priority (default 0).
    #[serde(default)]
    pub low_priority_fraction: f64,
    /// Regions the requests come from; each request gets a location near one of them
    /// (default: the fleet generator's five regions).
    #[serde(default = "super::defaults::regions")]
    pub regions: Vec<RegionConfig>,
    /// Number of distinct routing keys (`key-0` ...); default none: the id is the key.
    #[serde(default)]
    pub keys: Option<u64>,
    /// Random seed: the same seed gives the same requests (default 42).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The watermark trails the latest due time by this (default 100ms).
    #[serde(default = "default_out_of_orderness")]
    pub max_out_of_orderness: DurationMs,
}

fn default_seed() -> u64 {
    42
}
fn default_out_of_orderness() -> DurationMs {
    DurationMs(100)
}

impl edgeflow_operators::params::Validate for RequestGeneratorConfig {
    fn validate(&self, problems: &mut edgeflow_operators::params::ParamErrors) {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            problems
                .at_value("rate", format!("rate must be a positive number of requests per second, not {}", self.rate));
        }
        if self.shape.is_empty() || self.shape.contains(&0) {
            problems
                .at_value("shape", format!("shape {:?} must have at least one dimension, none of them 0", self.shape));
        }
        let (high, low) = (self.high_priority_fraction, self.low_priority_fraction);
        if !(0.0..=1.0).contains(&high) || !(0.0..=1.0).contains(&low) || high + low > 1.0 {
            problems.at_value(
                "high_priority_fraction",
                format!("priority fractions must be in [0, 1] and sum to at most 1 (high {high}, low {low})"),
            );
        }
        if self.regions.is_empty() {
            problems.at_value("regions", "at least one region is needed");
        }
        if self.keys == Some(0) {
            problems.at_value("keys", "keys must be at least 1");
        }
    }
}

impl RequestGeneratorConfig {}

/// The running request generator of one worker.
#[derive(Debug)]
pub struct RequestGenerator {
    config: RequestGeneratorConfig,
    start: EventTime,
    /// Next sequence number this worker emits.
    next: u64,
    step: u64,
    end_count: u64,
    end_time: EventTime,
    values: usize,
}

impl RequestGenerator {
    /// The generator for worker `index` of `peers`, starting now.
    pub fn new(config: &Checked<RequestGeneratorConfig>, index: usize, peers: usize) -> Result<Self, ConnectorError> {
        let start = wall_clock_ms();
        Ok(Self {
            config: config.get().clone(),
            start,
            next: index as u64,
            step: peers.max(1) as u64,
            end_count: config.count.unwrap_or(u64::MAX),
            end_time: config.duration.map_or(EventTime::MAX, |d| start.saturating_add(d.as_millis())),
            values: config.shape.iter().product(),
        })
    }

    /// Due time of request `seq`, ms since the epoch.
    fn due(&self, seq: u64) -> EventTime {
        self.start + (seq as f64 * 1000.0 / self.config.rate) as u64
    }

    fn request(&self, seq: u64, due: EventTime) -> InferenceRequest {
        let config = &self.config;
        let mut rng = SplitMix64(config.seed ^ (seq + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let data = (0..self.values).map(|_| rng.unit_f32() * 2.0 - 1.0).collect();
        let draw = rng.unit_f64();
        let priority = if draw < config.high_priority_fraction {
            Priority::High
        } else if draw < config.high_priority_fraction + config.low_priority_fraction {
            Priority::Low
        } else {
            Priority::Normal
        };
        let region = &config.regions[(seq % config.regions.len() as u64) as usize];
        let location = Location {
            lat: (region.lat + rng.unit_f64() * 4.0 - 2.0).clamp(-90.0, 90.0),
            lon: (region.lon + rng.unit_f64() * 4.0 - 2.0).clamp(-180.0, 180.0),
        };
        let mut id = String::with_capacity(24);
        id.push_str("req-");
        id.push_str(itoa::Buffer::new().format(seq));
        let mut inputs = BTreeMap::new();
        inputs.insert(config.input_name.clone(), Tensor { shape: config.shape.clone(), data });
        InferenceRequest {
            id,
            model: config.model.clone(),
            version: config.version,
            timestamp: due,
            inputs,
            deadline: config.deadline.map(|budget| due + budget.as_millis()),
            priority,
            location: Some(location),
            region: Some(region.name.clone()),
            key: config.keys.map(|keys| format!("key-{}", seq % keys)),
            node: None,
        }
    }
}

/// SplitMix64 (Steele, Lea and Flood): one seeded generator per request, so any worker can
/// make request `seq` alone: far cheaper to seed per request than ChaCha8, and the sequence
/// is fixed by this code, not by a crate's version.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 24 random bits.
    fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform in [0, 1), 53 random bits.
    fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

impl Source for RequestGenerator {
    fn poll(&mut self, out: &mut Vec<SourceItem>, max: usize) -> Result<SourceStatus, ConnectorError> {
        let now = wall_clock_ms();
        let mut produced = 0;
        while produced < max {
            if self.next >= self.end_count {
                return Ok(SourceStatus::Exhausted);
            }
            let due = self.due(self.next);
            if due >= self.end_time {
                return Ok(SourceStatus::Exhausted);
            }
            if due > now {
                return Ok(if produced > 0 {
                    SourceStatus::Ready
                } else {
                    SourceStatus::Idle { retry_in_ms: (due - now).max(1) }
                });
            }
            let request = self.request(self.next, due);
            out.push(SourceItem::Record { record: Record::Request(Box::new(request)), clock: due });
            self.next += self.step;
            produced += 1;
        }
        Ok(SourceStatus::Ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RequestGeneratorConfig {
        serde_json::from_value(serde_json::json!({
            "model": "linear", "rate": 1_000_000.0, "count": 1000, "input_name": "x", "shape": [1, 4],
            "deadline": "50ms", "high_priority_fraction": 0.1, "low_priority_fraction": 0.2, "keys": 7
        }))
        .unwrap()
    }

    #[test]
    fn workers_split_the_sequence_and_requests_are_reproducible() {
        let mut seen = Vec::new();
        for index in 0..3 {
            let mut generator = RequestGenerator::new(&Checked::try_new(config()).unwrap(), index, 3).unwrap();
            let mut out = Vec::new();
            while !matches!(generator.poll(&mut out, 100).unwrap(), SourceStatus::Exhausted) {}
            for item in out {
                let SourceItem::Record { record: Record::Request(request), clock } = item else { panic!("{item:?}") };
                assert_eq!(clock, request.timestamp);
                assert_eq!(request.deadline, Some(request.timestamp + 50));
                assert_eq!(request.inputs["x"].data.len(), 4);
                request.validate().unwrap();
                seen.push(*request);
            }
        }
        seen.sort_by_key(|r| r.id[4..].parse::<u64>().unwrap());
        assert_eq!(seen.len(), 1000);
        assert_eq!(seen[999].id, "req-999");
        assert_eq!(seen[8].key.as_deref(), Some("key-1"));
        let high = seen.iter().filter(|r| r.priority == Priority::High).count();
        assert!((50..150).contains(&high), "{high} high-priority requests of 1000");
        let again =
            RequestGenerator::new(&Checked::try_new(config()).unwrap(), 0, 1).unwrap().request(8, seen[8].timestamp);
        assert_eq!(again.inputs, seen[8].inputs);
        // Values spread over [-1, 1): the mean of all 4000 near 0, both ends reached.
        let values: Vec<f32> = seen.iter().flat_map(|r| r.inputs["x"].data.iter().copied()).collect();
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!(values.iter().all(|v| (-1.0..1.0).contains(v)));
        assert!(values.iter().any(|v| *v < -0.99) && values.iter().any(|v| *v > 0.99));
    }

    #[test]
    fn requests_are_due_at_the_rate_not_earlier() {
        let slow = RequestGeneratorConfig { rate: 10.0, ..config() };
        let mut generator = RequestGenerator::new(&Checked::try_new(slow).unwrap(), 0, 1).unwrap();
        let mut out = Vec::new();
        // Request 0 is due at once, request 1 only 100 ms later.
        assert_eq!(generator.poll(&mut out, 100).unwrap(), SourceStatus::Ready);
        assert_eq!(out.len(), 1);
        assert!(
            matches!(generator.poll(&mut out, 100).unwrap(), SourceStatus::Idle { retry_in_ms } if retry_in_ms <= 100)
        );
    }

    #[test]
    fn bad_parameters_are_reported() {
        let bad = RequestGeneratorConfig { rate: 0.0, shape: vec![1, 0], ..config() };
        let errors = Checked::try_new(bad).expect_err("refused");
        let fields: Vec<&str> = errors.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, vec!["rate", "shape"]);
    }
}

//! Client updates: the record, its tensor payload encoding, and the checks that reject bad
//! updates with a reason.
//!
//! JSON encoding (one object per line, on files and topics):
//!
//! ```json
//! {"round":3,"client_id":"edge-0007","num_examples":120,"base_version":2,
//!  "timestamp":1700000000000,
//!  "payload":{"format":"f32le+zstd","parameters":650,"data":"KLUv/QBY..."},
//!  "metrics":{"loss":0.41,"accuracy":0.88}}
//! ```
//!
//! `payload.data` is the update (the client's trained weights minus the base model, flattened
//! in the model's parameter order) as little-endian IEEE-754 f32 values, compressed with zstd
//! and then base64-encoded (standard alphabet, with padding). `parameters` is the number of
//! f32 values. `metrics` are optional.

use std::collections::BTreeSet;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::privacy::l2_norm;
use crate::EventTime;

/// The payload format edgeflow reads and writes.
pub const PAYLOAD_FORMAT: &str = "f32le+zstd";

/// A compressed tensor payload.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// `f32le+zstd`.
    pub format: String,
    /// Number of f32 values.
    pub parameters: u64,
    /// base64 of the zstd-compressed little-endian f32 values.
    pub data: String,
}

/// Largest decoded payload (1 GiB of f32: 256 Mi parameters).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 30;

impl Payload {
    /// Encodes `values` (zstd level 3).
    pub fn encode(values: &[f32]) -> Self {
        let mut raw = Vec::with_capacity(values.len() * 4);
        for value in values {
            raw.extend_from_slice(&value.to_le_bytes());
        }
        // Compressing an in-memory buffer cannot fail.
        let compressed = zstd::bulk::compress(&raw, 3).unwrap_or_default();
        Self {
            format: PAYLOAD_FORMAT.to_owned(),
            parameters: values.len() as u64,
            data: base64::engine::general_purpose::STANDARD.encode(compressed),
        }
    }

    /// Decodes the values, or says what is wrong with the payload.
    pub fn decode(&self) -> Result<Vec<f32>, PayloadError> {
        if self.format != PAYLOAD_FORMAT {
            return Err(PayloadError::Format { format: self.format.clone() });
        }
        let compressed = base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .map_err(|err| PayloadError::Base64 { reason: err.to_string() })?;
        // Checked, and capped: the decompression buffer is allocated up front.
        let expected = usize::try_from(self.parameters)
            .ok()
            .and_then(|parameters| parameters.checked_mul(4))
            .filter(|bytes| *bytes <= MAX_PAYLOAD_BYTES)
            .ok_or(PayloadError::TooLarge { parameters: self.parameters })?;
        let raw = zstd::bulk::decompress(&compressed, expected + 1)
            .map_err(|err| PayloadError::Zstd { reason: err.to_string() })?;
        if raw.len() != expected {
            return Err(PayloadError::Length { bytes: raw.len(), parameters: self.parameters, expected });
        }
        Ok(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }
}

/// A payload that does not decode.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// Not the encoding this version reads.
    #[error("payload format `{format}` is not supported (expected `{expected}`)", expected = PAYLOAD_FORMAT)]
    Format {
        /// The format it names.
        format: String,
    },
    /// Not base64.
    #[error("payload is not valid base64: {reason}")]
    Base64 {
        /// Why.
        reason: String,
    },
    /// More parameters than a payload may carry.
    #[error("payload claims {parameters} parameters, more than {max} bytes of f32", max = MAX_PAYLOAD_BYTES)]
    TooLarge {
        /// The parameters it claims.
        parameters: u64,
    },
    /// Not zstd.
    #[error("payload is not valid zstd data: {reason}")]
    Zstd {
        /// Why.
        reason: String,
    },
    /// Fewer or more bytes than its parameters need.
    #[error("payload holds {bytes} bytes, {parameters} parameters need {expected}")]
    Length {
        /// Bytes found.
        bytes: usize,
        /// Parameters claimed.
        parameters: u64,
        /// Bytes they need.
        expected: usize,
    },
}

/// Why a round refuses an update (the `rejected` output's reason).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("update from `{client}` for round {round}: {problem}")]
pub struct UpdateError {
    /// The client.
    pub client: String,
    /// The round it was for.
    pub round: u64,
    /// What is wrong with it.
    pub problem: UpdateProblem,
}

/// What is wrong with an update.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum UpdateProblem {
    /// Its round is over.
    #[error("round {0} is closed")]
    Closed(u64),
    /// Another round is open.
    #[error("the open round is {0}")]
    OtherRound(u64),
    /// The client was not selected.
    #[error("the client was not selected for this round")]
    NotSelected,
    /// The client already sent one.
    #[error("the client already sent an update this round")]
    Duplicate,
    /// It trained another model version.
    #[error("based on model version {base}, the round trains version {expected}")]
    Version {
        /// Its base version.
        base: u64,
        /// The round's.
        expected: u64,
    },
    /// It has another number of parameters.
    #[error("has {got} parameters, the model has {expected}")]
    Parameters {
        /// Its parameters.
        got: u64,
        /// The model's.
        expected: usize,
    },
    /// Its payload does not decode.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// A value is not finite.
    #[error("parameter {index} is {value}")]
    NotFinite {
        /// Where.
        index: usize,
        /// The value.
        value: f32,
    },
    /// Longer than the round's bound.
    #[error("L2 norm {norm:.4} exceeds the bound {bound}")]
    Norm {
        /// Its norm.
        norm: f64,
        /// The bound.
        bound: f64,
    },
}

/// What a client reports of its local training.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientMetrics {
    /// Training loss after local training.
    #[serde(default)]
    pub loss: Option<f64>,
    /// Training accuracy after local training.
    #[serde(default)]
    pub accuracy: Option<f64>,
}

/// One client's update for one round.
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelUpdate {
    /// The round it belongs to.
    pub round: u64,
    /// The client (edge node) id.
    pub client_id: String,
    /// Local examples it trained on (the FedAvg weight).
    pub num_examples: u64,
    /// The global model version it started from.
    pub base_version: u64,
    /// When it was sent, ms since the epoch.
    pub timestamp: EventTime,
    /// The update tensor.
    pub payload: Payload,
    /// Local training metrics.
    #[serde(default)]
    pub metrics: ClientMetrics,
}

// A total order, so updates can live in differential collections like every source record.
impl PartialEq for ModelUpdate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for ModelUpdate {}
impl PartialOrd for ModelUpdate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ModelUpdate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (a, b) = (self, other);
        let metric = |m: Option<f64>| m.unwrap_or(f64::NAN);
        (a.timestamp, a.round, &a.client_id, a.base_version, a.num_examples)
            .cmp(&(b.timestamp, b.round, &b.client_id, b.base_version, b.num_examples))
            .then_with(|| self.payload.cmp(&other.payload))
            .then_with(|| metric(self.metrics.loss).total_cmp(&metric(other.metrics.loss)))
            .then_with(|| metric(self.metrics.accuracy).total_cmp(&metric(other.metrics.accuracy)))
    }
}

impl ModelUpdate {
    /// Decodes one JSON update.
    pub fn from_json(bytes: &[u8]) -> Result<Self, crate::records::RecordError> {
        let update: Self = crate::records::decode_object(bytes, "model update")?;
        crate::time::check_event_time("timestamp", update.timestamp).map_err(|source| {
            crate::records::RecordError::Time { what: format!("model update from `{}`", update.client_id), source }
        })?;
        Ok(update)
    }
}

/// What the round expects of its updates.
#[derive(Clone, Debug)]
pub struct RoundRules {
    /// The round.
    pub round: u64,
    /// The global model version the round's clients start from.
    pub base_version: u64,
    /// Parameters of the model.
    pub parameters: usize,
    /// Clients selected for the round.
    pub selected: BTreeSet<String>,
    /// Largest L2 norm accepted (before any clipping), if bounded.
    pub max_norm: Option<f64>,
}

/// Checks a round's updates one by one; remembers who already sent one.
#[derive(Debug)]
pub struct UpdateCheck {
    rules: RoundRules,
    seen: BTreeSet<String>,
}

impl UpdateCheck {
    /// Checks for the round of `rules`.
    pub fn new(rules: RoundRules) -> Self {
        Self { rules, seen: BTreeSet::new() }
    }

    /// The decoded update if it is acceptable, else the reason it is rejected. An accepted
    /// client cannot send a second update this round.
    pub fn accept(&mut self, update: &ModelUpdate) -> Result<Vec<f32>, UpdateError> {
        let rules = &self.rules;
        let refuse = |problem| Err(UpdateError { client: update.client_id.clone(), round: update.round, problem });
        if update.round != rules.round {
            return refuse(UpdateProblem::OtherRound(rules.round));
        }
        if !rules.selected.contains(&update.client_id) {
            return refuse(UpdateProblem::NotSelected);
        }
        if self.seen.contains(&update.client_id) {
            return refuse(UpdateProblem::Duplicate);
        }
        if update.base_version != rules.base_version {
            return refuse(UpdateProblem::Version { base: update.base_version, expected: rules.base_version });
        }
        if update.payload.parameters != rules.parameters as u64 {
            return refuse(UpdateProblem::Parameters { got: update.payload.parameters, expected: rules.parameters });
        }
        let values = match update.payload.decode() {
            Ok(values) => values,
            Err(err) => return refuse(err.into()),
        };
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return refuse(UpdateProblem::NotFinite { index, value: values[index] });
        }
        if let Some(bound) = rules.max_norm {
            let norm = l2_norm(&values);
            if norm > bound {
                return refuse(UpdateProblem::Norm { norm, bound });
            }
        }
        self.seen.insert(update.client_id.clone());
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(client: &str, round: u64, values: &[f32]) -> ModelUpdate {
        ModelUpdate {
            round,
            client_id: client.into(),
            num_examples: 10,
            base_version: 4,
            timestamp: 0,
            payload: Payload::encode(values),
            metrics: ClientMetrics::default(),
        }
    }

    fn check() -> UpdateCheck {
        UpdateCheck::new(RoundRules {
            round: 5,
            base_version: 4,
            parameters: 3,
            selected: ["a", "b", "c"].iter().map(|s| s.to_string()).collect(),
            max_norm: Some(10.0),
        })
    }

    #[test]
    fn payload_round_trips_and_documents_its_bytes() {
        let values = [1.5f32, -0.0, f32::MAX, 3.25];
        let payload = Payload::encode(&values);
        assert_eq!(payload.decode().unwrap(), values);
        // The documented encoding, step by step.
        let compressed = base64::engine::general_purpose::STANDARD.decode(&payload.data).unwrap();
        let raw = zstd::bulk::decompress(&compressed, 16).unwrap();
        assert_eq!(&raw[..4], &1.5f32.to_le_bytes());
        let json = serde_json::to_string(&update("a", 5, &values)).unwrap();
        assert_eq!(ModelUpdate::from_json(json.as_bytes()).unwrap(), update("a", 5, &values));
    }

    #[test]
    fn bad_updates_are_rejected_with_their_reason() {
        let mut check = check();
        assert_eq!(check.accept(&update("a", 5, &[1.0, 2.0, 3.0])).unwrap(), vec![1.0, 2.0, 3.0]);
        let reasons = [
            (
                update("a", 5, &[1.0, 2.0, 3.0]),
                "update from `a` for round 5: the client already sent an update this round",
            ),
            (
                update("z", 5, &[1.0, 2.0, 3.0]),
                "update from `z` for round 5: the client was not selected for this round",
            ),
            (update("b", 4, &[1.0, 2.0, 3.0]), "update from `b` for round 4: the open round is 5"),
            (update("b", 5, &[1.0, 2.0]), "update from `b` for round 5: has 2 parameters, the model has 3"),
            (update("b", 5, &[1.0, f32::NAN, 3.0]), "update from `b` for round 5: parameter 1 is NaN"),
            (update("b", 5, &[1.0, f32::INFINITY, 3.0]), "update from `b` for round 5: parameter 1 is inf"),
            (update("b", 5, &[10.0, 2.0, 3.0]), "update from `b` for round 5: L2 norm 10.6301 exceeds the bound 10"),
        ];
        for (bad, reason) in reasons {
            assert_eq!(check.accept(&bad).unwrap_err().to_string(), reason);
        }
        let mut stale = update("b", 5, &[1.0, 2.0, 3.0]);
        stale.base_version = 3;
        assert_eq!(
            check.accept(&stale).unwrap_err().to_string(),
            "update from `b` for round 5: based on model version 3, the round trains version 4"
        );
        let mut garbled = update("b", 5, &[1.0, 2.0, 3.0]);
        garbled.payload.data = "not base64!".into();
        assert!(check.accept(&garbled).unwrap_err().to_string().contains("payload is not valid base64"));
        // After all the rejections, b may still send its one good update.
        assert!(check.accept(&update("b", 5, &[0.0, 0.0, 1.0])).is_ok());
    }
}

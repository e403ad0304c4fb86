//! Domain operators of edgeflow: node health over differential collections, event-time
//! windows, load balancing, batched inference, federated training, and the record types
//! every other crate shares.
//!
//! Nothing here does I/O. Operators are extension traits on timely streams, scopes or
//! differential collections ([`node_health::NodeHealth`], [`window_aggregate`],
//! [`load_balance`], [`inference::operator::Inference`], [`federated::operator::Federated`]);
//! what they need from outside is a trait implemented in `connectors` (a
//! [`inference::operator::Model`] run by ONNX Runtime, a [`federated::operator::RoundsOutput`]
//! that writes files). Parameters are checked once by a `try_new` builder ([`params`]), so a
//! running operator never meets a bad one; errors are `thiserror` enums per module; metrics
//! an operator keeps itself are prometheus-client families ([`metrics`]).

pub mod batcher;
pub mod duration;
pub mod federated;
pub mod inference;
pub mod load_balance;
pub mod metrics;
pub mod node_health;
pub mod params;
pub mod records;
pub mod state;
pub mod time;
pub mod window_aggregate;

pub use duration::DurationMs;
pub use records::{
    DeadLetter, HealthStatus, Heartbeat, InferenceRequest, InferenceResult, Location, NodeState, Priority, RawMessage,
    Record, RecordKind, RegionRollup, ResultStatus, StatusChange, Tensor, WindowResult,
};

/// Event time: milliseconds since the Unix epoch. This is the timely timestamp everywhere.
pub type EventTime = u64;

/// A stable 64-bit hash used to route keyed records to workers. It must not depend on the
/// process (no random seed), since every process of a cluster must agree on the owner.
pub fn route_hash(key: &str) -> u64 {
    // FNV-1a: tiny, stable across processes and releases, good enough spread for routing.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // Final avalanche so that keys differing in their last byte spread over workers.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

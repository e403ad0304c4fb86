//! Kafka source and sink through librdkafka (`rdkafka`).
//!
//! The source is a consumer group member per worker, so the group protocol spreads the
//! topic's partitions over all workers of all processes. Its event clock is the least, over
//! its assigned partitions that are not idle, of the latest event time seen in the partition
//! (per-partition watermarks); offsets are committed only when the engine reports that every
//! record up to them has been written by the sinks. Each partition is read from its own queue,
//! slowest partition first (watermark alignment). The sink is an idempotent producer with
//! zstd compression by default; delivery failures are retried by librdkafka and then surface
//! as a flush error, which stops the pipeline.
//!
//! Exactly once: a [`KafkaTransaction`] is one transactional producer shared by all sinks of
//! a pipeline; the engine commits it with the sources' checkpoints (consumed offsets) at each
//! sink flush, and the sources take their partitions by static assignment
//! ([`Membership::Static`]) instead of joining the group.

mod config;
mod metrics;
mod sink;
mod source;

pub use config::{AutoOffsetReset, KafkaFormat, KafkaSecurity, KafkaSinkConfig, KafkaSourceConfig, SinkKey};
pub use metrics::KafkaMetrics;
pub use sink::{KafkaSink, KafkaTransaction};
pub use source::{FinishedPartitions, KafkaSource, Membership};

use std::collections::BTreeMap;

use rdkafka::ClientConfig;

/// librdkafka settings from edgeflow's typed options, then the free `options` pass-through.
fn client_config(brokers: &str, security: &KafkaSecurity, options: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    security.apply(&mut config);
    for (key, value) in options {
        config.set(key, value);
    }
    config
}

//! Prometheus metrics of the Kafka source and sink, registered by the engine.
//!
//! Consumer lag, producer retries and messages in flight come from librdkafka's statistics
//! (`statistics.interval.ms`, 1 s unless overridden in `options`); records, bytes, commit
//! latency and delivery failures are counted as they happen.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `topic`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Topic {
    /// The topic.
    pub topic: String,
}

/// `topic`, `partition`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
}

/// `group`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Group {
    /// The consumer group (or transactional id).
    pub group: String,
}

type HistogramFamily = Family<Group, Histogram, fn() -> Histogram>;

/// Every Kafka metric; one instance per process, shared by all sources and sinks.
#[derive(Debug)]
pub struct KafkaMetrics {
    /// Messages behind the partition's high watermark, per topic and partition.
    pub consumer_lag: Family<TopicPartition, Gauge>,
    /// Messages consumed per topic.
    pub messages_in: Family<Topic, Counter>,
    /// Value bytes consumed per topic.
    pub bytes_in: Family<Topic, Counter>,
    /// Messages acknowledged by the brokers per topic.
    pub messages_out: Family<Topic, Counter>,
    /// Value bytes acknowledged per topic.
    pub bytes_out: Family<Topic, Counter>,
    /// Time from an offset commit (or transaction commit) to its acknowledgement, per group.
    pub commit_latency: HistogramFamily,
    /// Offset commits the broker refused, per group.
    pub commit_failures: Family<Group, Counter>,
    /// Messages whose delivery failed after librdkafka's retries, per topic.
    pub producer_errors: Family<Topic, Counter>,
    /// Produce requests retried, per topic's producer.
    pub producer_retries: Family<Topic, Counter>,
    /// Messages handed to the producer and not yet acknowledged, per topic.
    pub producer_in_flight: Family<Topic, Gauge>,
}

impl Default for KafkaMetrics {
    fn default() -> Self {
        fn commit_histogram() -> Histogram {
            // 1 ms to about 16 s.
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        }
        Self {
            consumer_lag: Family::default(),
            messages_in: Family::default(),
            bytes_in: Family::default(),
            messages_out: Family::default(),
            bytes_out: Family::default(),
            commit_latency: Family::new_with_constructor(commit_histogram),
            commit_failures: Family::default(),
            producer_errors: Family::default(),
            producer_retries: Family::default(),
            producer_in_flight: Family::default(),
        }
    }
}

impl KafkaMetrics {
    /// Registers the metrics under `kafka_` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("kafka");
        registry.register(
            "consumer_lag",
            "Messages behind the high watermark per partition",
            self.consumer_lag.clone(),
        );
        registry.register("messages_in", "Messages consumed per topic", self.messages_in.clone());
        registry.register("bytes_in", "Value bytes consumed per topic", self.bytes_in.clone());
        registry.register("messages_out", "Messages acknowledged by the brokers per topic", self.messages_out.clone());
        registry.register("bytes_out", "Value bytes acknowledged by the brokers per topic", self.bytes_out.clone());
        registry.register(
            "commit_latency_seconds",
            "Offset or transaction commit latency per consumer group",
            self.commit_latency.clone(),
        );
        registry.register("commit_failures", "Offset commits refused per group", self.commit_failures.clone());
        registry.register(
            "producer_errors",
            "Messages not delivered after retries per topic",
            self.producer_errors.clone(),
        );
        registry.register("producer_retries", "Produce requests retried per topic", self.producer_retries.clone());
        registry.register(
            "producer_in_flight",
            "Messages produced and not yet acknowledged per topic",
            self.producer_in_flight.clone(),
        );
    }

    /// Records a commit that took `elapsed`.
    pub(super) fn observe_commit(&self, group: &str, elapsed: Duration) {
        self.commit_latency.get_or_create(&Group { group: group.to_owned() }).observe(elapsed.as_secs_f64());
    }
}

/// A topic label.
pub(super) fn topic(topic: &str) -> Topic {
    Topic { topic: topic.to_owned() }
}

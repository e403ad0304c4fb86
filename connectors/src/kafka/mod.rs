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

/// A Kafka error with whose fault it is and whether a retry can help, from what librdkafka
/// reported (it has retried what it retries by itself already).
fn kafka_error(brokers: &str, message: String, err: &rdkafka::error::KafkaError) -> crate::ConnectorError {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};
    let (fault, retryable) = match err {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => (crate::Fault::User, false),
        KafkaError::Transaction(err) => (crate::Fault::External, err.is_retriable()),
        _ => match err.rdkafka_error_code() {
            Some(
                Code::UnknownTopicOrPartition
                | Code::UnknownTopic
                | Code::TopicAuthorizationFailed
                | Code::GroupAuthorizationFailed
                | Code::ClusterAuthorizationFailed
                | Code::TransactionalIdAuthorizationFailed
                | Code::SaslAuthenticationFailed
                | Code::Authentication
                | Code::InvalidConfig
                | Code::InvalidArgument
                | Code::MessageSizeTooLarge
                | Code::InvalidTopic,
            ) => (crate::Fault::User, false),
            Some(
                Code::QueueFull
                | Code::BrokerTransportFailure
                | Code::AllBrokersDown
                | Code::OperationTimedOut
                | Code::RequestTimedOut
                | Code::NetworkException
                | Code::LeaderNotAvailable
                | Code::NotLeaderForPartition
                | Code::CoordinatorNotAvailable
                | Code::NotCoordinator
                | Code::CoordinatorLoadInProgress
                | Code::RebalanceInProgress,
            ) => (crate::Fault::External, true),
            _ => (crate::Fault::External, false),
        },
    };
    crate::ConnectorError::Kafka { brokers: brokers.to_owned(), message, fault, retryable }
}

/// A Kafka error that no retry fixes: librdkafka's own retries are spent (a delivery timed
/// out, a flush did not finish), or the cluster is not as the pipeline expects.
fn kafka_failure(brokers: &str, message: String, fault: crate::Fault) -> crate::ConnectorError {
    crate::ConnectorError::Kafka { brokers: brokers.to_owned(), message, fault, retryable: false }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};

    use super::kafka_error;
    use crate::Fault;

    /// librdkafka's codes sort into the user's faults (a topic that does not exist, a refused
    /// credential: no retry helps) and the outside world's passing ones (brokers down).
    #[test]
    fn kafka_errors_are_classified_by_their_code() {
        let classify = |err: KafkaError| {
            let err = kafka_error("localhost:9092", err.to_string(), &err);
            (err.fault(), err.retryable())
        };
        let down = KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown);
        assert_eq!(classify(down), (Fault::External, true));
        let unknown = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopicOrPartition);
        assert_eq!(classify(unknown), (Fault::User, false));
        let denied = KafkaError::ConsumerCommit(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert_eq!(classify(denied), (Fault::User, false));
        assert_eq!(classify(KafkaError::ClientCreation("bad option".into())), (Fault::User, false));
        let fenced = KafkaError::MessageProduction(RDKafkaErrorCode::ProducerFenced);
        assert_eq!(classify(fenced), (Fault::External, false));
    }
}

//! `type: kafka`: records as messages on a Kafka topic (idempotent producer, zstd), or
//! inside the pipeline's transaction with `exactly_once`.

use edgeflow_connectors::kafka::KafkaSinkConfig;
use edgeflow_connectors::{ConnectorError, Sink};
use edgeflow_operators::params::ParamErrors;

use crate::components::{check_kafka, Component, Context, OpenSink, Ports, SinkComponent};

/// A Kafka topic, checked.
#[derive(Debug)]
pub struct KafkaSink(KafkaSinkConfig);

impl Component for KafkaSink {
    const TYPE: &'static str = "kafka";
    const DOC: &'static str = "Records as JSON messages on a Kafka topic (idempotent producer, zstd).";
    type Config = KafkaSinkConfig;

    fn ports(_config: &KafkaSinkConfig) -> Ports {
        Ports::SINK
    }

    fn try_new(config: KafkaSinkConfig, _cx: &Context<'_>) -> Result<Self, ParamErrors> {
        let mut problems = ParamErrors::default();
        check_kafka(&mut problems, "", &config.brokers, [&config.topic]);
        problems.into_result(Self(config))
    }
}

impl SinkComponent for KafkaSink {
    fn kafka(&self) -> Option<&KafkaSinkConfig> {
        Some(&self.0)
    }
    fn exactly_once_setting(&self) -> Option<bool> {
        Some(self.0.exactly_once)
    }
    fn exactly_once(&self, pipeline: &str) -> Option<String> {
        self.0.exactly_once.then(|| self.0.transactional_id.clone().unwrap_or_else(|| format!("edgeflow-{pipeline}")))
    }
    fn open(&self, cx: &OpenSink<'_>) -> Result<Box<dyn Sink>, ConnectorError> {
        Ok(match cx.transaction {
            Some(transaction) => {
                Box::new(edgeflow_connectors::kafka::KafkaSink::in_transaction(&self.0, transaction, false))
            }
            None => Box::new(edgeflow_connectors::kafka::KafkaSink::open(&self.0, &cx.metrics.kafka)?),
        })
    }
}

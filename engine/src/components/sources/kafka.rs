//! `type: kafka`: records from Kafka topics, in a consumer group (or, exactly once, with
//! static partition assignment and offsets committed in the sinks' transaction).

use edgeflow_connectors::kafka::{KafkaFormat, KafkaSourceConfig, Membership};
use edgeflow_connectors::{ConnectorError, Source};
use edgeflow_operators::params::ParamErrors;

use crate::components::{check_kafka, Component, Context, OpenSource, Ports, SourceComponent};
use crate::config::PortKind;

/// Kafka topics, checked.
#[derive(Debug)]
pub struct KafkaSource(KafkaSourceConfig);

impl Component for KafkaSource {
    const TYPE: &'static str = "kafka";
    const DOC: &'static str = concat!(
        "Heartbeats or inference requests from Kafka topics (consumer group; offsets committed\n",
        "after the sinks wrote)."
    );
    type Config = KafkaSourceConfig;

    fn ports(config: &KafkaSourceConfig) -> Ports {
        if config.format == KafkaFormat::Raw {
            Ports::source(PortKind::RawMessages)
        } else {
            Ports::source(PortKind::of_records(config.records))
        }
    }

    fn try_new(config: KafkaSourceConfig, _cx: &Context<'_>) -> Result<Self, ParamErrors> {
        let mut problems = ParamErrors::default();
        check_kafka(&mut problems, "", &config.brokers, config.topics.iter());
        if config.group.trim().is_empty() {
            problems.at_value("group", "`group` is empty");
        }
        problems.into_result(Self(config))
    }
}

impl SourceComponent for KafkaSource {
    fn max_out_of_orderness(&self) -> u64 {
        self.0.max_out_of_orderness.as_millis()
    }
    fn idle_timeout(&self) -> u64 {
        self.0.idle_timeout.as_millis()
    }
    fn open(&self, cx: &OpenSource<'_>) -> Result<Box<dyn Source>, ConnectorError> {
        let finished = cx.shared.map(|shared| shared.finished.clone()).unwrap_or_default();
        let membership =
            if cx.checkpointed { Membership::Static { index: cx.index, peers: cx.peers } } else { Membership::Group };
        Ok(Box::new(edgeflow_connectors::kafka::KafkaSource::open(
            cx.name,
            &self.0,
            membership,
            finished,
            cx.metrics.kafka.clone(),
        )?))
    }
}

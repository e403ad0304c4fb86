//! `type: dead_letter`: rejected records with their reason, to a file or a Kafka topic.

use edgeflow_connectors::dead_letter::DeadLetterSinkConfig;
use edgeflow_connectors::kafka::{KafkaSink, KafkaSinkConfig};
use edgeflow_connectors::{ConnectorError, Sink};
use edgeflow_operators::params::{Checked, ParamErrors};

use crate::components::{check_kafka, Component, Context, Input, OpenSink, Ports, SinkComponent};
use crate::config::PortKind;

/// A dead-letter file or topic, checked.
#[derive(Debug)]
pub struct DeadLetterSink(Checked<DeadLetterSinkConfig>);

impl Component for DeadLetterSink {
    const TYPE: &'static str = "dead_letter";
    const DOC: &'static str = "Rejected records with their reason (inputs default to every source's dead letters).";
    /// Without inputs it takes every source's dead letters.
    const INPUT: Input = Input::Optional;
    type Config = DeadLetterSinkConfig;

    fn ports(_config: &DeadLetterSinkConfig) -> Ports {
        Ports {
            only: Some((PortKind::DeadLetters, "(dead_letter) writes dead letters, for example `SOURCE.dead_letters`")),
            ..Ports::SINK
        }
    }

    fn try_new(config: DeadLetterSinkConfig, _cx: &Context<'_>) -> Result<Self, ParamErrors> {
        Checked::try_new_with(config, |config, problems| {
            if let Some(kafka) = &config.kafka {
                check_kafka(problems, "kafka", &kafka.brokers, [&kafka.topic]);
            }
        })
        .map(Self)
    }
}

impl SinkComponent for DeadLetterSink {
    fn kafka(&self) -> Option<&KafkaSinkConfig> {
        self.0.kafka.as_ref()
    }
    fn rewinds(&self) -> bool {
        self.0.kafka.is_none()
    }
    fn open(&self, cx: &OpenSink<'_>) -> Result<Box<dyn Sink>, ConnectorError> {
        match (&self.0.kafka, cx.transaction) {
            (Some(kafka), Some(transaction)) => Ok(Box::new(KafkaSink::in_transaction(kafka, transaction, true))),
            (None, _) if cx.resume.is_some() => {
                let mut sink = edgeflow_connectors::dead_letter::DeadLetterSink::reopen(&self.0)?;
                sink.restore(cx.resume.unwrap_or_default())?;
                Ok(Box::new(sink))
            }
            _ => Ok(Box::new(edgeflow_connectors::dead_letter::DeadLetterSink::open(&self.0, &cx.metrics.kafka)?)),
        }
    }
}

//! The `dead_letter` sink: rejected records with their original bytes, position and reason,
//! as JSON lines (see [`edgeflow_operators::DeadLetter::to_json`]).

use std::path::PathBuf;

use edgeflow_operators::params::{Checked, ParamErrors, Validate};
use serde::{Deserialize, Serialize};

use crate::file::FileSink;
use crate::{ConnectorError, Sink};

/// YAML configuration of the `dead_letter` sink: a file (`path`) or a Kafka topic (`kafka`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSinkConfig {
    /// File that receives one JSON object per rejected record:
    /// `{"source","position","reason","payload"}` (`payload_hex` for non-UTF-8 bytes).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Append to an existing file instead of replacing it (default false).
    #[serde(default)]
    pub append: bool,
    /// A Kafka topic instead of a file: each message is the rejected record's original
    /// bytes, with the headers `edgeflow.reason`, `edgeflow.source` and `edgeflow.position`
    /// (for Kafka sources: `topic T partition P offset O`).
    #[cfg(feature = "kafka")]
    #[serde(default)]
    pub kafka: Option<crate::kafka::KafkaSinkConfig>,
}

impl Validate for DeadLetterSinkConfig {
    fn validate(&self, problems: &mut ParamErrors) {
        #[cfg(feature = "kafka")]
        let kafka = self.kafka.is_some();
        #[cfg(not(feature = "kafka"))]
        let kafka = false;
        match (self.path.is_some(), kafka) {
            (true, true) => problems.whole("set either `path` or `kafka`, not both"),
            (false, false) => problems.whole("missing `path` (a file) or `kafka` (a topic) for the dead letters"),
            _ => {}
        }
    }
}

/// Writes dead letters to a file or a topic.
#[derive(Debug)]
pub struct DeadLetterSink {
    inner: Box<dyn Sink>,
}

impl std::fmt::Debug for dyn Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sink")
    }
}

impl DeadLetterSink {
    /// Opens the dead-letter file or producer (whose metrics go to `kafka_metrics`).
    pub fn open(
        config: &Checked<DeadLetterSinkConfig>,
        #[cfg(feature = "kafka")] kafka_metrics: &std::sync::Arc<crate::kafka::KafkaMetrics>,
    ) -> Result<Self, ConnectorError> {
        #[cfg(feature = "kafka")]
        if let Some(kafka) = &config.kafka {
            return Ok(Self { inner: Box::new(crate::kafka::KafkaSink::open_dead_letters(kafka, kafka_metrics)?) });
        }
        let path = config.path.clone().unwrap_or_default();
        Ok(Self { inner: Box::new(FileSink::create(&path, config.append)?) })
    }

    /// Opens the dead-letter file as it is, to be cut back to a checkpoint's length by
    /// [`Sink::restore`].
    pub fn reopen(config: &Checked<DeadLetterSinkConfig>) -> Result<Self, ConnectorError> {
        let path = config.path.clone().unwrap_or_default();
        Ok(Self { inner: Box::new(FileSink::create(&path, true)?) })
    }
}

impl Sink for DeadLetterSink {
    fn write(&mut self, record: &[u8]) -> Result<(), ConnectorError> {
        self.inner.write(record)
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        self.inner.flush()
    }

    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>, ConnectorError> {
        self.inner.checkpoint()
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ConnectorError> {
        self.inner.restore(state)
    }
}

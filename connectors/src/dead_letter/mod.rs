//! The `dead_letter` sink: rejected records with their original bytes, position and reason,
//! as JSON lines (see [`edgeflow_operators::DeadLetter::to_json`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::file::FileSink;
use crate::{ConnectorError, Sink};

/// YAML configuration of the `dead_letter` sink.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSinkConfig {
    /// File that receives one JSON object per rejected record:
    /// `{"source","position","reason","payload"}` (`payload_hex` for non-UTF-8 bytes).
    pub path: PathBuf,
    /// Append to an existing file instead of replacing it (default false).
    #[serde(default)]
    pub append: bool,
}

/// Writes dead letters to a file.
#[derive(Debug)]
pub struct DeadLetterSink {
    file: FileSink,
}

impl DeadLetterSink {
    /// Opens the dead-letter file.
    pub fn open(config: &DeadLetterSinkConfig) -> Result<Self, ConnectorError> {
        Ok(Self { file: FileSink::create(&config.path, config.append)? })
    }
}

impl Sink for DeadLetterSink {
    fn write(&mut self, record: &[u8]) -> Result<(), ConnectorError> {
        self.file.write(record)
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        self.file.flush()
    }
}

//! The `stdout` sink: one JSON document per line on standard output.

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::{ConnectorError, Sink};

/// YAML configuration of the `stdout` sink.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StdoutSinkConfig {
    /// Prefix each line with this text (for example the sink's name), to tell several
    /// stdout sinks apart. Empty by default.
    #[serde(default)]
    pub prefix: String,
}

/// Writes JSON lines to standard output.
#[derive(Debug)]
pub struct StdoutSink {
    out: std::io::BufWriter<std::io::Stdout>,
    prefix: Vec<u8>,
}

impl StdoutSink {
    /// A sink writing to this process's standard output.
    pub fn new(config: &StdoutSinkConfig) -> Self {
        Self { out: std::io::BufWriter::new(std::io::stdout()), prefix: config.prefix.as_bytes().to_vec() }
    }
}

impl Sink for StdoutSink {
    fn write(&mut self, record: &[u8]) -> Result<(), ConnectorError> {
        let fail = |source| ConnectorError::Write { path: "<stdout>".into(), source };
        self.out.write_all(&self.prefix).map_err(fail)?;
        self.out.write_all(record).map_err(fail)?;
        self.out.write_all(b"\n").map_err(fail)
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        self.out.flush().map_err(|source| ConnectorError::Write { path: "<stdout>".into(), source })
    }
}

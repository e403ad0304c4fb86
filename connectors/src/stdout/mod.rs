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
///
/// Lines are buffered here and written whole, under the lock of standard output: several
/// stdout sinks (each on its own sink operator) never interleave parts of their lines.
#[derive(Debug)]
pub struct StdoutSink {
    buffer: Vec<u8>,
    prefix: Vec<u8>,
    /// Standard output was closed (the reader went away): what follows is discarded.
    closed: bool,
}

/// Bytes buffered before they are written out, whole lines only.
const BUFFER_BYTES: usize = 64 * 1024;

impl StdoutSink {
    /// A sink writing to this process's standard output.
    pub fn new(config: &StdoutSinkConfig) -> Self {
        Self { buffer: Vec::with_capacity(BUFFER_BYTES), prefix: config.prefix.as_bytes().to_vec(), closed: false }
    }

    fn write_out(&mut self) -> Result<(), ConnectorError> {
        if self.buffer.is_empty() || self.closed {
            self.buffer.clear();
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        let result = out.write_all(&self.buffer).and_then(|()| out.flush());
        self.buffer.clear();
        match result {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Err(ConnectorError::OutputClosed { what: "standard output".into() })
            }
            Err(source) => Err(ConnectorError::Write { path: "<stdout>".into(), source }),
        }
    }
}

impl Sink for StdoutSink {
    fn write(&mut self, record: &[u8]) -> Result<(), ConnectorError> {
        if self.closed {
            return Ok(());
        }
        self.buffer.extend_from_slice(&self.prefix);
        self.buffer.extend_from_slice(record);
        self.buffer.push(b'\n');
        if self.buffer.len() >= BUFFER_BYTES {
            self.write_out()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        self.write_out()
    }
}

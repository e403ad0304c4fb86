use edgeflow_operators::params::Checked;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ConnectorError, Sink};

/// YAML configuration of the `file` sink.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// File to write, one JSON document per line. Within one event time, lines are sorted,
    /// so the same input gives byte-identical files on any number of workers.
    pub path: PathBuf,
    /// Append to an existing file instead of replacing it (default false; `jsonl` only).
    #[serde(default)]
    pub append: bool,
    /// `jsonl` (default): one JSON document per line. `arrow`: an Arrow IPC stream of
    /// inference results in record batches of up to 8,192 rows (results only).
    #[serde(default)]
    pub format: FileFormat,
}

/// How a `file` sink writes its records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON document per line.
    #[default]
    Jsonl,
    /// An Arrow IPC stream (inference results only): columnar, the floats copied rather
    /// than formatted. See [`super::ArrowResultSink`] for the columns.
    Arrow,
}

/// Writes JSON lines to a file.
#[derive(Debug)]
pub struct FileSink {
    path: String,
    out: BufWriter<File>,
}

impl FileSink {
    /// Opens the sink's file, in the configured format.
    pub fn open(config: &Checked<FileSinkConfig>) -> Result<Box<dyn Sink>, ConnectorError> {
        Ok(match config.format {
            FileFormat::Jsonl => Box::new(Self::create(&config.path, config.append)?),
            FileFormat::Arrow => Box::new(super::ArrowResultSink::create(&config.path)?),
        })
    }

    /// Opens the sink's file as it is, to be cut back to a checkpoint's length by
    /// [`Sink::restore`] (`jsonl` only: an Arrow stream is rewritten whole).
    pub fn reopen(config: &Checked<FileSinkConfig>) -> Result<Box<dyn Sink>, ConnectorError> {
        if config.format == FileFormat::Arrow {
            return Err(ConnectorError::Config {
                connector: "file",
                reason: format!(
                    "`{}` (format: arrow) cannot go back to a checkpoint: an Arrow IPC stream is written whole\nhint: write `format: jsonl` in a checkpointed pipeline, or start without the checkpoint",
                    config.path.display()
                ),
            });
        }
        Ok(Box::new(Self::create(&config.path, true)?))
    }

    /// Creates (or appends to) `path`.
    pub fn create(path: &Path, append: bool) -> Result<Self, ConnectorError> {
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .map_err(|source| ConnectorError::Write { path: shown.clone(), source })?;
        Ok(Self { path: shown, out: BufWriter::with_capacity(1 << 16, file) })
    }
}

impl Sink for FileSink {
    fn write(&mut self, record: &[u8]) -> Result<(), ConnectorError> {
        let fail = |source| ConnectorError::Write { path: self.path.clone(), source };
        self.out.write_all(record).map_err(fail)?;
        self.out.write_all(b"\n").map_err(|source| ConnectorError::Write { path: self.path.clone(), source })
    }

    fn flush(&mut self) -> Result<(), ConnectorError> {
        self.out.flush().map_err(|source| ConnectorError::Write { path: self.path.clone(), source })
    }

    /// The file's length, once everything written is flushed and fsynced.
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>, ConnectorError> {
        let fail = |source| ConnectorError::Write { path: self.path.clone(), source };
        self.out.flush().map_err(fail)?;
        let file = self.out.get_mut();
        file.sync_data().map_err(fail)?;
        let length = file.metadata().map_err(fail)?.len();
        Ok(Some(length.to_le_bytes().to_vec()))
    }

    /// Cuts the file back to the checkpoint's length: what was written after it is written
    /// again by the restored run.
    fn restore(&mut self, state: &[u8]) -> Result<(), ConnectorError> {
        let fail = |source| ConnectorError::Write { path: self.path.clone(), source };
        let length = state.try_into().map(u64::from_le_bytes).map_err(|_| ConnectorError::Config {
            connector: "file",
            reason: format!("the checkpoint's state of `{}` is not a length", self.path),
        })?;
        self.out.flush().map_err(fail)?;
        let file = self.out.get_mut();
        let now = file.metadata().map_err(fail)?.len();
        if now < length {
            return Err(ConnectorError::Data {
                what: format!("`{}`", self.path),
                reason: format!(
                    "it is {now} bytes, shorter than the {length} bytes the checkpoint wrote: it was changed since"
                ),
            });
        }
        file.set_len(length).map_err(fail)?;
        file.sync_data().map_err(fail)?;
        tracing::info!(path = %self.path, length, cut = now - length, "file cut back to the checkpoint");
        Ok(())
    }
}

/// Where a sink's file is, for messages.
impl edgeflow_operators::params::Validate for FileSinkConfig {
    fn validate(&self, problems: &mut edgeflow_operators::params::ParamErrors) {
        if self.format == FileFormat::Arrow && self.append {
            problems.at_key(
                "append",
                "`append: true` cannot be used with `format: arrow`: an Arrow IPC stream has one schema, at its start"
                    .to_owned(),
            );
        }
    }
}

impl FileSinkConfig {
    /// The configured path.
    pub fn path(&self) -> &PathBuf {
        &self.path
    }
}

//! Sources and sinks of edgeflow: all I/O to the outside lives here.
//!
//! A [`Source`] is polled by the engine's driver loop on each worker; it yields decoded
//! records together with the source's event clock, or dead letters for input it could not
//! decode. A [`Sink`] receives encoded lines on one worker and writes them out.
//! Each connector is one directory: its `<Name>Config` (the YAML shape) and `<Name>` (the
//! running thing).

pub mod dead_letter;
pub mod federated;
pub mod file;
pub mod generator;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod stdout;

use edgeflow_operators::{DeadLetter, EventTime, Record};

/// One item produced by a source.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceItem {
    /// A decoded record. `clock` is the source's event clock at this record (for most
    /// sources the record's own event time; for the generator its emission time), from
    /// which the engine derives the watermark.
    Record { record: Record, clock: EventTime },
    /// Input that could not be decoded, with its position and the reason. `clock` is the
    /// source's event clock at this item when the source knows it (the generator does).
    Malformed { letter: DeadLetter, clock: Option<EventTime> },
    /// A record whose event time is further ahead of the wall clock than the source's
    /// `max_future`: refused before it could move the source's clock (and so the watermark).
    /// `clock` as for `Malformed`.
    Future { letter: DeadLetter, clock: Option<EventTime> },
}

/// What a poll found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceStatus {
    /// Items were produced and more may be available right away.
    Ready,
    /// Nothing available now; `retry_in_ms` is a hint for when to look again.
    Idle { retry_in_ms: u64 },
    /// The source is finite and has produced everything.
    Exhausted,
}

/// An error from the outside world that stops a source.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// A file could not be opened or read.
    #[error("cannot read `{path}`: {source}\nhint: check that the file exists and is readable")]
    Read { path: String, source: std::io::Error },
    /// A file could not be created or written.
    #[error("cannot write `{path}`: {source}\nhint: check that the directory exists and is writable")]
    Write { path: String, source: std::io::Error },
    /// A parameter that cannot work.
    #[error("invalid {connector} configuration: {reason}")]
    Config { connector: &'static str, reason: String },
    /// The reader of an output went away (standard output closed, as by `| head`): not a
    /// failure, the run stops gracefully.
    #[error("{what} was closed by its reader")]
    OutputClosed { what: String },
    /// Kafka refused or failed an operation; librdkafka has already retried.
    #[error("kafka ({brokers}): {message}\nhint: check that the brokers are reachable from here and the topic exists")]
    Kafka { brokers: String, message: String },
}

/// Positions a source has read up to: `(topic, partition, next offset)`. The engine hands it
/// back through [`Source::commit`] once everything read before it has been written, or, in
/// an exactly-once pipeline, to the sinks' [`Transaction`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The consumer group the offsets belong to.
    pub group: String,
    /// Next offset to read per topic and partition.
    pub offsets: Vec<(String, i32, i64)>,
}

/// A source of records (heartbeats or inference requests), one instance per worker.
pub trait Source: Send {
    /// Appends at most `max` items to `out`.
    fn poll(&mut self, out: &mut Vec<SourceItem>, max: usize) -> Result<SourceStatus, ConnectorError>;

    /// Where the source has read up to, for sources that can resume (Kafka).
    fn checkpoint(&mut self) -> Option<Checkpoint> {
        None
    }

    /// Records that everything before `checkpoint` has been processed and written; `wait`
    /// blocks until the commit is acknowledged (used for the last commit before exit).
    fn commit(&mut self, _checkpoint: &Checkpoint, _wait: bool) -> Result<(), ConnectorError> {
        Ok(())
    }
}

/// A sink of encoded records (one JSON document per call, without the newline).
pub trait Sink: Send {
    /// Writes one record.
    fn write(&mut self, record: &[u8]) -> Result<(), ConnectorError>;
    /// Makes everything written so far durable or visible.
    fn flush(&mut self) -> Result<(), ConnectorError>;

    /// Writes one raw message (`format: raw`): its key and value as they were where the sink
    /// can carry bytes (Kafka), else its JSON line.
    fn write_raw(&mut self, message: &edgeflow_operators::RawMessage) -> Result<(), ConnectorError> {
        self.write(message.to_json().to_string().as_bytes())
    }

    /// Writes one inference result: its JSON line, unless the sink has a format of its own
    /// for results (a `file` sink with `format: arrow`).
    fn write_result(&mut self, result: &edgeflow_operators::InferenceResult) -> Result<(), ConnectorError> {
        self.write(&result.to_json_line())
    }
}

/// The transaction that the sinks of an exactly-once pipeline write into.
pub trait Transaction: Send {
    /// Commits everything the sinks wrote since the last commit together with the source
    /// positions `offsets` (the latest per group, topic and partition), and opens the next
    /// transaction. On error the open transaction is aborted and the pipeline must stop.
    fn commit(&mut self, offsets: &[Checkpoint]) -> Result<(), ConnectorError>;
}

pub use edgeflow_operators::time::wall_clock_ms;

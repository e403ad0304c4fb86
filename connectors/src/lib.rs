//! Sources and sinks of edgeflow: all I/O to the outside lives here.
//!
//! A [`Source`] is polled by the engine's driver loop on each worker; it yields decoded
//! records together with the source's event clock, or dead letters for input it could not
//! decode. A [`Sink`] receives encoded lines on one worker and writes them out.
//! Each connector is one directory: its `<Name>Config` (the YAML shape) and `<Name>` (the
//! running thing). Besides sources and sinks, the outside I/O of operators lives here: ONNX
//! Runtime behind the inference operator's `Model` trait ([`onnx`]), and the dataset, CSV and
//! model export of federated training ([`federated`]). Errors are [`ConnectorError`]s that say
//! whose fault they are ([`Fault`]) and whether a retry can help.

pub mod checkpoint;
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

/// A gap between two polls of a source longer than this means that the worker did not look
/// (it waited for the dataflow to catch up): the time in between does not count towards a
/// source's or partition's idle timeout.
pub const UNPOLLED: std::time::Duration = std::time::Duration::from_secs(1);

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

/// Whose fault an error is: what the person reading it should look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The user's: the pipeline's settings or the input (a wrong path, a bad dataset, a
    /// topic that does not exist, a refused credential).
    User,
    /// The outside world's: a broker down, a disk full, a reader that went away.
    External,
    /// Ours: a bug in edgeflow (a thread that stopped, a state that cannot happen).
    Internal,
}

impl Fault {
    /// The name used in logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Fault::User => "user",
            Fault::External => "external",
            Fault::Internal => "internal",
        }
    }
}

/// An error that stops a source or a sink. [`ConnectorError::fault`] says whose fault it is
/// and [`ConnectorError::retryable`] whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// A file could not be opened or read.
    #[error("cannot read `{path}`: {source}\nhint: check that the file exists and is readable")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be created or written.
    #[error("cannot write `{path}`: {source}\nhint: check that the directory exists and is writable")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A parameter that cannot work.
    #[error("invalid {connector} configuration: {reason}")]
    Config {
        /// The connector.
        connector: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Input that cannot be used at all (not a record that goes to the dead letters, but a
    /// whole file, such as a dataset).
    #[error("{what}: {reason}")]
    Data {
        /// What was read, e.g. ``dataset `digits.csv` ``.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The reader of an output went away (standard output closed, as by `| head`): not a
    /// failure, the run stops gracefully.
    #[error("{what} was closed by its reader")]
    OutputClosed {
        /// The output.
        what: String,
    },
    /// Kafka refused or failed an operation; librdkafka has already retried.
    #[error("kafka ({brokers}): {message}\nhint: check that the brokers are reachable from here and the topic exists")]
    Kafka {
        /// The brokers.
        brokers: String,
        /// What failed, and why.
        message: String,
        /// Whose fault it is.
        fault: Fault,
        /// Whether trying again can help.
        retryable: bool,
    },
    /// A thread or channel of the connector stopped: a bug.
    #[error("{what} has stopped (a bug in edgeflow)")]
    Stopped {
        /// What stopped.
        what: String,
    },
}

impl ConnectorError {
    /// Whose fault the error is.
    pub fn fault(&self) -> Fault {
        match self {
            ConnectorError::Read { source, .. } | ConnectorError::Write { source, .. } => io_fault(source.kind()),
            ConnectorError::Config { .. } | ConnectorError::Data { .. } => Fault::User,
            ConnectorError::OutputClosed { .. } => Fault::External,
            ConnectorError::Kafka { fault, .. } => *fault,
            ConnectorError::Stopped { .. } => Fault::Internal,
        }
    }

    /// Whether trying the same operation again can help (a timeout, a broker that is
    /// restarting), as opposed to a problem that stays until someone fixes it.
    pub fn retryable(&self) -> bool {
        match self {
            ConnectorError::Read { source, .. } | ConnectorError::Write { source, .. } => io_retryable(source.kind()),
            ConnectorError::Kafka { retryable, .. } => *retryable,
            ConnectorError::Config { .. }
            | ConnectorError::Data { .. }
            | ConnectorError::OutputClosed { .. }
            | ConnectorError::Stopped { .. } => false,
        }
    }
}

/// A missing or forbidden path is the user's to fix; anything else the file system says is
/// the outside world's.
fn io_fault(kind: std::io::ErrorKind) -> Fault {
    use std::io::ErrorKind::*;
    match kind {
        NotFound | PermissionDenied | AlreadyExists | InvalidInput | InvalidData | IsADirectory | NotADirectory
        | InvalidFilename | ReadOnlyFilesystem => Fault::User,
        _ => Fault::External,
    }
}

/// Interruptions and timeouts pass; a full disk or a missing file does not by itself.
fn io_retryable(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(kind, Interrupted | TimedOut | WouldBlock | ConnectionReset | ConnectionAborted | ResourceBusy)
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

/// Where one worker's source has read up to, as a checkpoint keeps it: a source resumes
/// from the positions of every worker of the checkpointed run (so a run with a different
/// number of workers resumes too, where the source can).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Position {
    /// Kafka: the next offset of each partition the worker read.
    Kafka(Checkpoint),
    /// A file: the byte offset and 1-based number of the next line, of a worker reading
    /// blocks of lines `index` modulo `peers`.
    File {
        /// Byte offset of the next line.
        offset: u64,
        /// Its 1-based number.
        line: u64,
        /// The reader's index.
        index: u64,
        /// Readers of the file.
        peers: u64,
    },
    /// A generator: how many items the worker's generator has produced.
    Generated {
        /// Items produced.
        items: u64,
        /// The generator's index.
        index: u64,
        /// Generators of the run.
        peers: u64,
    },
}

/// A source of records (heartbeats or inference requests), one instance per worker.
pub trait Source: Send {
    /// Appends at most `max` items to `out`.
    fn poll(&mut self, out: &mut Vec<SourceItem>, max: usize) -> Result<SourceStatus, ConnectorError>;

    /// Where the source has read up to, for a checkpoint; `None` for a source that cannot
    /// resume (it starts afresh after a restore, as a live simulation does).
    fn position(&mut self) -> Option<Position> {
        None
    }

    /// Goes on from `saved`, the positions of every worker of the checkpointed run (read
    /// before the first poll). A source takes the positions that concern it; an error says
    /// why it cannot resume from them.
    fn resume(&mut self, _saved: &[Position]) -> Result<(), ConnectorError> {
        Ok(())
    }

    /// Where the source has read up to, for sources that can resume (Kafka).
    fn checkpoint(&mut self) -> Option<Checkpoint> {
        None
    }

    /// Records that everything before `checkpoint` has been processed and written; `wait`
    /// blocks until the commit is acknowledged (used for the last commit before exit).
    fn commit(&mut self, _checkpoint: &Checkpoint, _wait: bool) -> Result<(), ConnectorError> {
        Ok(())
    }

    /// Called while the worker does not poll the source (it waits for the dataflow to
    /// catch up): a source that must answer its peers meanwhile (a Kafka consumer taking
    /// part in a group rebalance) does so here; records that come with it wait for the next
    /// poll.
    fn keep_alive(&mut self) {}
}

/// A sink of encoded records (one JSON document per call, without the newline).
pub trait Sink: Send {
    /// Writes one record.
    fn write(&mut self, record: &[u8]) -> Result<(), ConnectorError>;
    /// Makes everything written so far durable or visible.
    fn flush(&mut self) -> Result<(), ConnectorError>;

    /// For a checkpoint: makes everything written so far durable and returns what the sink
    /// needs to go back to exactly this output on a restore (a file: its length), or `None`
    /// for a sink whose output cannot be taken back (what it wrote after the checkpoint is
    /// written again after a restore: at-least-once).
    fn checkpoint(&mut self) -> Result<Option<Vec<u8>>, ConnectorError> {
        self.flush()?;
        Ok(None)
    }

    /// Goes back to the output of a checkpoint, from what [`Sink::checkpoint`] returned.
    fn restore(&mut self, _state: &[u8]) -> Result<(), ConnectorError> {
        Ok(())
    }

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

/// The transaction that the sinks of an exactly-once pipeline write into: one per
/// checkpoint interval, committed once the checkpoint that covers it is durable.
pub trait Transaction: Send {
    /// Commits everything the sinks wrote since the last commit, marked as checkpoint
    /// `epoch`'s output (so that a restart can tell whether it was committed), and opens the
    /// next transaction. On error the open transaction is aborted and the pipeline must stop.
    fn commit(&mut self, epoch: u64) -> Result<(), ConnectorError>;
}

pub use edgeflow_operators::time::wall_clock_ms;

#[cfg(test)]
mod fault_tests {
    use super::*;

    /// Each error says whose fault it is and whether a retry helps: a missing file is the
    /// user's, an interrupted write passes, a full disk does not, a stopped thread is ours.
    #[test]
    fn errors_say_whose_fault_and_whether_a_retry_helps() {
        let missing = std::fs::File::open("/nonexistent/edgeflow/heartbeats.jsonl").unwrap_err();
        let read = ConnectorError::Read { path: "heartbeats.jsonl".into(), source: missing };
        assert_eq!((read.fault(), read.retryable()), (Fault::User, false));
        let interrupted = std::io::Error::from(std::io::ErrorKind::Interrupted);
        let write = ConnectorError::Write { path: "out.jsonl".into(), source: interrupted };
        assert_eq!((write.fault(), write.retryable()), (Fault::External, true));
        let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
        let write = ConnectorError::Write { path: "out.jsonl".into(), source: full };
        assert_eq!((write.fault(), write.retryable()), (Fault::External, false));
        let config = ConnectorError::Config { connector: "file", reason: "bad".into() };
        assert_eq!((config.fault(), config.retryable()), (Fault::User, false));
        let data = ConnectorError::Data { what: "dataset `d.csv`".into(), reason: "line 3: bad".into() };
        assert_eq!((data.fault(), data.to_string().as_str()), (Fault::User, "dataset `d.csv`: line 3: bad"));
        let stopped = ConnectorError::Stopped { what: "the committer".into() };
        assert_eq!((stopped.fault(), stopped.retryable()), (Fault::Internal, false));
        assert!(stopped.to_string().contains("a bug in edgeflow"), "{stopped}");
    }
}

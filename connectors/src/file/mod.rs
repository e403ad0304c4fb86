//! The `file` source (JSON lines, optionally following a growing file) and the `file` sink
//! (JSON lines, or an Arrow IPC stream of inference results).
//!
//! Without `follow`, every worker of the whole cluster reads the file and decodes its share
//! of blocks of 64 lines, so every line is decoded exactly once, decoding runs in parallel,
//! and all workers' watermarks advance together. With `follow`, worker 0 reads the file and
//! keeps reading what is appended to it.

mod arrow;
mod sink;
mod source;

pub use arrow::ArrowResultSink;
pub use sink::{FileFormat, FileSink, FileSinkConfig};
pub use source::{FileClock, FileSource, FileSourceConfig};

/// Defaults shared by the sources' watermark settings.
pub mod source_defaults {
    pub use super::source::defaults::*;
}

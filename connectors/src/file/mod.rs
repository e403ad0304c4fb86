//! The `file` source (JSON lines, optionally following a growing file) and the `file` sink
//! (JSON lines).
//!
//! Without `follow`, the file is split into byte ranges, one per worker of the whole
//! cluster: a line belongs to the worker whose range holds its first byte, so every line is
//! read exactly once and parsing runs in parallel. With `follow`, worker 0 reads the file and
//! keeps reading what is appended to it.

mod sink;
mod source;

pub use sink::{FileSink, FileSinkConfig};
pub use source::{FileSource, FileSourceConfig};

/// Defaults shared by the sources' watermark settings.
pub mod source_defaults {
    pub use super::source::defaults::*;
}

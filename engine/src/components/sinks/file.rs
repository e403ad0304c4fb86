//! `type: file`: JSON lines in a file, or inference results as an Arrow IPC stream.

use edgeflow_connectors::file::{FileFormat, FileSinkConfig};
use edgeflow_connectors::{ConnectorError, Sink};
use edgeflow_operators::params::{Checked, ParamErrors};

use crate::components::{Component, Context, OpenSink, Ports, SinkComponent};
use crate::config::PortKind;

/// A file, checked.
#[derive(Debug)]
pub struct FileSink(Checked<FileSinkConfig>);

impl Component for FileSink {
    const TYPE: &'static str = "file";
    const DOC: &'static str = "JSON lines in a file, or inference results as an Arrow IPC stream (`format: arrow`).";
    type Config = FileSinkConfig;

    fn ports(config: &FileSinkConfig) -> Ports {
        match config.format {
            // An Arrow stream has the results' schema: it takes nothing else.
            FileFormat::Arrow => Ports {
                only: Some((PortKind::InferenceResults, "(file, format: arrow) writes inference results only")),
                ..Ports::SINK
            },
            FileFormat::Jsonl => Ports::SINK,
        }
    }

    fn try_new(config: FileSinkConfig, _cx: &Context<'_>) -> Result<Self, ParamErrors> {
        Checked::try_new(config).map(Self)
    }
}

impl SinkComponent for FileSink {
    fn takes_results(&self) -> bool {
        self.0.format == FileFormat::Arrow
    }
    fn rewinds(&self) -> bool {
        self.0.format == edgeflow_connectors::file::FileFormat::Jsonl
    }
    fn open(&self, cx: &OpenSink<'_>) -> Result<Box<dyn Sink>, ConnectorError> {
        match cx.resume {
            Some(state) => {
                let mut sink = edgeflow_connectors::file::FileSink::reopen(&self.0)?;
                sink.restore(state)?;
                Ok(sink)
            }
            None => edgeflow_connectors::file::FileSink::open(&self.0),
        }
    }
}

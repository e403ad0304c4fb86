//! `type: file`: heartbeats, inference requests or model updates from a JSON lines file.

use edgeflow_connectors::file::FileSourceConfig;
use edgeflow_connectors::{ConnectorError, Source};
use edgeflow_operators::params::ParamErrors;

use crate::components::{Component, Context, OpenSource, Ports, SourceComponent};
use crate::config::PortKind;

/// A JSON lines file.
#[derive(Debug)]
pub struct FileSource(FileSourceConfig);

impl Component for FileSource {
    const TYPE: &'static str = "file";
    const DOC: &'static str = "Heartbeats or inference requests from a JSON lines file.";
    type Config = FileSourceConfig;

    fn ports(config: &Self::Config) -> Ports {
        Ports::source(PortKind::of_records(config.records))
    }

    fn try_new(config: FileSourceConfig, _cx: &Context<'_>) -> Result<Self, ParamErrors> {
        Ok(Self(config))
    }
}

impl SourceComponent for FileSource {
    fn max_out_of_orderness(&self) -> u64 {
        self.0.max_out_of_orderness.as_millis()
    }
    fn idle_timeout(&self) -> u64 {
        self.0.idle_timeout.as_millis()
    }
    fn open(&self, cx: &OpenSource<'_>) -> Result<Box<dyn Source>, ConnectorError> {
        if cx.checkpointed {
            return Ok(Box::new(edgeflow_connectors::file::FileSource::open_single(cx.name, &self.0, cx.index)?));
        }
        let source = edgeflow_connectors::file::FileSource::open(cx.name, &self.0, cx.index, cx.peers)?;
        // Workers of one process read the file on one event clock (see `FileClock`).
        Ok(match cx.shared.and_then(|shared| shared.file_clock.as_ref()) {
            Some(clock) => Box::new(source.with_shared_clock(clock)),
            None => Box::new(source),
        })
    }
}

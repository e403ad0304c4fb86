//! `type: stdout`: JSON lines on standard output.

use edgeflow_connectors::stdout::StdoutSinkConfig;
use edgeflow_connectors::{ConnectorError, Sink};
use edgeflow_operators::params::ParamErrors;

use crate::components::{Component, Context, OpenSink, Ports, SinkComponent};

/// Standard output.
#[derive(Debug)]
pub struct StdoutSink(StdoutSinkConfig);

impl Component for StdoutSink {
    const TYPE: &'static str = "stdout";
    const DOC: &'static str = "JSON lines on standard output.";
    type Config = StdoutSinkConfig;

    fn ports(_config: &StdoutSinkConfig) -> Ports {
        Ports::SINK
    }

    fn try_new(config: StdoutSinkConfig, _cx: &Context<'_>) -> Result<Self, ParamErrors> {
        Ok(Self(config))
    }
}

impl SinkComponent for StdoutSink {
    fn open(&self, _cx: &OpenSink<'_>) -> Result<Box<dyn Sink>, ConnectorError> {
        Ok(Box::new(edgeflow_connectors::stdout::StdoutSink::new(&self.0)))
    }
}

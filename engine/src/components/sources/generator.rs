//! `type: generator`: a synthetic edge fleet's heartbeats.

use edgeflow_connectors::generator::{Generator, GeneratorConfig};
use edgeflow_connectors::{ConnectorError, Source};
use edgeflow_operators::params::{Checked, ParamErrors};

use crate::components::{Component, Context, OpenSource, Ports, SourceComponent};
use crate::config::PortKind;

/// A synthetic fleet, checked.
#[derive(Debug)]
pub struct GeneratorSource(Checked<GeneratorConfig>);

impl Component for GeneratorSource {
    const TYPE: &'static str = "generator";
    const DOC: &'static str = "A synthetic edge fleet.";
    type Config = GeneratorConfig;

    fn ports(_config: &Self::Config) -> Ports {
        Ports::source(PortKind::Heartbeats)
    }

    fn try_new(config: GeneratorConfig, _cx: &Context<'_>) -> Result<Self, ParamErrors> {
        Checked::try_new(config).map(Self)
    }
}

impl SourceComponent for GeneratorSource {
    fn max_out_of_orderness(&self) -> u64 {
        self.0.max_out_of_orderness.as_millis()
    }
    fn idle_timeout(&self) -> u64 {
        self.0.idle_timeout.as_millis()
    }
    fn open(&self, cx: &OpenSource<'_>) -> Result<Box<dyn Source>, ConnectorError> {
        Ok(Box::new(Generator::new(cx.name, &self.0, cx.index, cx.peers)?))
    }
}

//! `type: requests`: an open-loop stream of inference requests at a target rate.

use edgeflow_connectors::generator::{RequestGenerator, RequestGeneratorConfig};
use edgeflow_connectors::{ConnectorError, Source};
use edgeflow_operators::params::{Checked, ParamErrors};

use crate::components::{Component, Context, OpenSource, Ports, SourceComponent};
use crate::config::PortKind;

/// A request generator, checked.
#[derive(Debug)]
pub struct RequestsSource(Checked<RequestGeneratorConfig>);

impl Component for RequestsSource {
    const TYPE: &'static str = "requests";
    const DOC: &'static str = "An open-loop stream of inference requests at a target rate.";
    type Config = RequestGeneratorConfig;

    fn ports(_config: &Self::Config) -> Ports {
        Ports::source(PortKind::InferenceRequests)
    }

    fn try_new(config: RequestGeneratorConfig, _cx: &Context<'_>) -> Result<Self, ParamErrors> {
        Checked::try_new(config).map(Self)
    }
}

impl SourceComponent for RequestsSource {
    fn max_out_of_orderness(&self) -> u64 {
        self.0.max_out_of_orderness.as_millis()
    }
    /// Requests are due by the wall clock: the generator never idles behind it.
    fn idle_timeout(&self) -> u64 {
        self.0.max_out_of_orderness.as_millis()
    }
    fn open(&self, cx: &OpenSource<'_>) -> Result<Box<dyn Source>, ConnectorError> {
        Ok(Box::new(RequestGenerator::new(&self.0, cx.index, cx.peers)?))
    }
}

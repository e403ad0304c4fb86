//! `type: window_aggregate`: event-time windows over a key; output `results`.

use edgeflow_operators::params::ParamErrors;
use edgeflow_operators::window_aggregate::{heartbeat_windows, WindowAggregateConfig, WindowParams};

use crate::components::{BuildError, Component, Context, OperatorComponent, Ports};
use crate::config::{PortKind, PortRef};
use crate::runtime::{Build, Port};

/// Windows with checked parameters.
#[derive(Debug)]
pub struct WindowAggregateOperator {
    config: WindowAggregateConfig,
    params: WindowParams,
}

impl Component for WindowAggregateOperator {
    const TYPE: &'static str = "window_aggregate";
    const DOC: &'static str = "Event-time windows over a key: output `results`.";
    type Config = WindowAggregateConfig;

    fn ports(_config: &WindowAggregateConfig) -> Ports {
        Ports::operator(&[PortKind::Heartbeats], &[("results", PortKind::WindowResults)])
    }

    fn try_new(config: WindowAggregateConfig, _cx: &Context<'_>) -> Result<Self, ParamErrors> {
        let params = WindowParams::from_config(&config)?;
        Ok(Self { config, params })
    }
}

impl OperatorComponent for WindowAggregateOperator {
    fn build<'scope>(
        &self,
        name: &str,
        inputs: &[PortRef],
        cx: &mut Build<'_, 'scope>,
    ) -> Result<Vec<Port<'scope>>, BuildError> {
        let heartbeats = cx.count(cx.heartbeats(inputs), name, "input");
        let state = cx.state.handle(name);
        let results = heartbeat_windows(heartbeats.inner, name, &self.config, self.params.clone(), state);
        Ok(vec![Port::Windows(cx.count_stream(results, name, "results"))])
    }

    fn checkpointed(&self) -> bool {
        true
    }
}

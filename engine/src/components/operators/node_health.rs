//! `type: node_health`: each node's status from its heartbeats; outputs `changes` (main),
//! `status` and `rollups`.

use edgeflow_operators::node_health::{NodeHealth, NodeHealthConfig, NodeHealthParams};
use edgeflow_operators::params::ParamErrors;
use timely::dataflow::operators::core::Inspect;

use crate::components::{BuildError, Component, Context, OperatorComponent, Ports};
use crate::config::{PortKind, PortRef};
use crate::runtime::{Build, Port};

/// Node health with checked parameters.
#[derive(Debug)]
pub struct NodeHealthOperator(NodeHealthParams);

impl Component for NodeHealthOperator {
    const TYPE: &'static str = "node_health";
    const DOC: &'static str = "Node health: outputs `changes` (main), `status` and `rollups`.";
    type Config = NodeHealthConfig;

    fn ports(_config: &NodeHealthConfig) -> Ports {
        Ports::operator(
            &[PortKind::Heartbeats],
            &[
                ("changes", PortKind::StatusChanges),
                ("status", PortKind::NodeStatus),
                ("rollups", PortKind::RegionRollups),
            ],
        )
    }

    fn try_new(config: NodeHealthConfig, _cx: &Context<'_>) -> Result<Self, ParamErrors> {
        Ok(Self(NodeHealthParams::try_new(&config)?))
    }
}

impl OperatorComponent for NodeHealthOperator {
    fn build<'scope>(
        &self,
        name: &str,
        inputs: &[PortRef],
        cx: &mut Build<'_, 'scope>,
    ) -> Result<Vec<Port<'scope>>, BuildError> {
        let heartbeats = cx.count(cx.heartbeats(inputs), name, "input");
        let streams = heartbeats.node_health_checkpointed(&self.0, cx.state, name);
        let nodes = cx.metrics.clone();
        let status = streams.status.inner.inspect(move |((_, state), _, diff)| {
            nodes.add_nodes(state.status, *diff as i64);
        });
        let status = differential_dataflow::collection::AsCollection::as_collection(status);
        let changes = cx.count_stream(streams.changes, name, "changes");
        let rollups = cx.count_stream(streams.rollups, name, "rollups");
        Ok(vec![Port::Changes(changes), Port::Status(status), Port::Rollups(rollups)])
    }

    fn checkpointed(&self) -> bool {
        true
    }
}

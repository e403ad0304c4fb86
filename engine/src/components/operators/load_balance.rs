//! `type: load_balance`: places inference requests on Healthy or Degraded edge nodes.

use edgeflow_operators::load_balance::{load_balance, FleetUpdate, Incoming, LoadBalanceConfig, Placement};
use edgeflow_operators::params::{Checked, ParamErrors};
use edgeflow_operators::InferenceRequest;
use timely::dataflow::operators::core::Inspect;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Concatenate, Feedback};

use super::inference::InferenceOperator;
use crate::components::{BuildError, Component, Context, OperatorComponent, Ports, Wiring};
use crate::config::{PortKind, PortRef};
use crate::metrics::labels::OperatorStatus;
use crate::runtime::{Balanced, Build, Port};

/// A balancer with checked settings.
#[derive(Debug)]
pub struct LoadBalanceOperator(Checked<LoadBalanceConfig>);

impl Component for LoadBalanceOperator {
    const TYPE: &'static str = "load_balance";
    const DOC: &'static str = concat!(
        "Places inference requests on Healthy or Degraded edge nodes: inputs are requests,\n",
        "`node_health`'s status changes (`HEALTH.changes`) and, for resource- and location-aware\n",
        "strategies, heartbeats. Outputs `requests` (main, with `node` set) and `unplaced`\n",
        "(results of requests no node could take; an inference operator reading the balancer\n",
        "reports them among its results)."
    );
    type Config = LoadBalanceConfig;

    fn ports(_config: &LoadBalanceConfig) -> Ports {
        Ports::operator(
            &[PortKind::InferenceRequests, PortKind::StatusChanges, PortKind::Heartbeats],
            &[("requests", PortKind::InferenceRequests), ("unplaced", PortKind::InferenceResults)],
        )
    }

    fn try_new(config: LoadBalanceConfig, _cx: &Context<'_>) -> Result<Self, ParamErrors> {
        Checked::try_new(config).map(Self)
    }

    /// A balancer reads requests, exactly one status-change stream and, for strategies that
    /// need resources or locations, heartbeats; its unplaced requests must reach someone (an
    /// inference operator reading it, or a reader of `NAME.unplaced`); and at most one
    /// inference operator reads it (that operator sends re-routed requests back).
    fn check_wiring(config: &LoadBalanceConfig, cx: &mut Wiring<'_>) {
        let name = cx.name().to_owned();
        if cx.count(PortKind::InferenceRequests) == 0 {
            cx.at_inputs(format!("load_balance `{name}` needs inference requests among its inputs"));
        }
        let changes = cx.count(PortKind::StatusChanges);
        if changes != 1 {
            cx.at_inputs(format!(
                "load_balance `{name}` needs exactly one status-change input (a node_health operator's `changes`), found {changes}"
            ));
        }
        if config.strategy.needs_heartbeats() && cx.count(PortKind::Heartbeats) == 0 {
            cx.at_value(
                "strategy",
                format!(
                    "strategy {:?} needs heartbeats (resources and locations) among the inputs",
                    serde_json::to_value(config.strategy).unwrap_or_default()
                ),
            );
        }
        let inference_readers =
            cx.readers_of(None, "requests").iter().filter(|t| **t == InferenceOperator::TYPE).count();
        if inference_readers > 1 {
            cx.at_name(format!("load_balance `{name}` feeds {inference_readers} inference operators; at most one may read a balancer (it returns re-routed requests)"));
        }
        let unplaced_read = !cx.readers_of(Some("unplaced"), "requests").is_empty();
        if inference_readers == 0 && !unplaced_read {
            cx.at_name(format!(
                "the unplaced requests of load_balance `{name}` are not read, so they would be lost\nhint: read `{name}.unplaced` in a sink, or feed the balancer to an inference operator"
            ));
        }
    }
}

impl OperatorComponent for LoadBalanceOperator {
    fn checkpointed(&self) -> bool {
        true
    }

    fn build<'scope>(
        &self,
        name: &str,
        inputs: &[PortRef],
        cx: &mut Build<'_, 'scope>,
    ) -> Result<Vec<Port<'scope>>, BuildError> {
        let scope = cx.scope;
        // Re-routed requests of the inference operator reading it come back one time unit later.
        let (feedback, rerouted) = scope.feedback::<Vec<InferenceRequest>>(1);
        let mut requests = vec![rerouted.map(Incoming::Reroute)];
        let mut updates = Vec::new();
        let mut changes = Vec::new();
        for reference in inputs {
            match cx.port(reference) {
                Some(Port::Requests(stream)) => requests.push(stream.clone().map(|request| Incoming::New(*request))),
                Some(Port::Changes(stream)) => {
                    changes.push(stream.clone());
                    updates.push(stream.clone().map(FleetUpdate::Change));
                }
                Some(Port::Heartbeats(collection)) => {
                    updates.push(collection.inner.clone().map(|(heartbeat, _, _)| FleetUpdate::Beat(heartbeat)));
                }
                _ => {}
            }
        }
        let state = cx.state.handle(name);
        let placements = load_balance(scope.concatenate(requests), scope.concatenate(updates), &self.0, name, state);
        let placed = |status| {
            let labels = OperatorStatus { operator: name.to_owned(), status };
            cx.metrics.inference.placed.get_or_create(&labels).clone()
        };
        let (assigned, unassigned) = (placed("assigned"), placed("unplaced"));
        let placements = placements.inspect(move |placement| match placement {
            Placement::Assigned(_) => {
                assigned.inc();
            }
            Placement::Unplaced(_) => {
                unassigned.inc();
            }
        });
        let placed = placements.clone().flat_map(|p| match p {
            Placement::Assigned(request) => Some(Box::new(request)),
            Placement::Unplaced(_) => None,
        });
        let unplaced = placements.flat_map(|p| match p {
            Placement::Unplaced(result) => Some(Box::new(result)),
            Placement::Assigned(_) => None,
        });
        let placed = cx.count_stream(placed, name, "requests");
        let unplaced = cx.count_stream(unplaced, name, "unplaced");
        cx.balancers.insert(
            name.to_owned(),
            Balanced {
                unplaced: unplaced.clone(),
                changes: scope.concatenate(changes),
                feedback,
                reroutes: Vec::new(),
            },
        );
        Ok(vec![Port::Requests(placed), Port::Results(unplaced)])
    }
}

//! `type: federated`: federated training, round after round, over simulated clients or
//! external ones whose updates are its input.

use edgeflow_connectors::federated::{load, RoundFiles};
use edgeflow_operators::federated::config::FederatedConfig;
use edgeflow_operators::federated::operator::{ClientHealth, Federated};
use edgeflow_operators::params::{Checked, ParamErrors};
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Concatenate;

use crate::components::{BuildError, Component, Context, Input, OperatorComponent, Ports, Wiring};
use crate::config::{PortKind, PortRef};
use crate::runtime::{Build, Port};

/// Federated training with checked settings and a dataset that exists.
#[derive(Debug)]
pub struct FederatedOperator {
    config: Checked<FederatedConfig>,
    /// Whether its clients are external (it has inputs).
    external: bool,
}

impl Component for FederatedOperator {
    const TYPE: &'static str = "federated";
    const DOC: &'static str = concat!(
        "Federated training, round after round. Without an input its clients are a simulated\n",
        "fleet and rounds are logical times; with an `input` of model updates (a `file` or\n",
        "`kafka` source with `records: model_updates`) its clients are outside, read the `plans`\n",
        "output and a round closes when all answered, on quorum (`close_on_quorum`) or at its\n",
        "wall-clock `round_timeout`. Outputs `rounds` (main: one report per round), `models`\n",
        "(each global model version), `plans` (each round's plan with the model to train from)\n",
        "and `rejected` (refused updates with their reason)."
    );
    /// Without inputs its clients are simulated.
    const INPUT: Input = Input::Optional;
    /// Simulated clients make their own data: a pipeline with it needs no source.
    const FEEDS_ITSELF: bool = true;
    type Config = FederatedConfig;

    fn ports(_config: &FederatedConfig) -> Ports {
        Ports::operator(
            &[PortKind::ModelUpdates, PortKind::StatusChanges, PortKind::Heartbeats],
            &[
                ("rounds", PortKind::FederatedRounds),
                ("models", PortKind::GlobalModels),
                ("plans", PortKind::RoundPlans),
                ("rejected", PortKind::DeadLetters),
            ],
        )
    }

    fn try_new(mut config: FederatedConfig, cx: &Context<'_>) -> Result<Self, ParamErrors> {
        config.dataset = cx.resolve(&config.dataset);
        if let Some(export) = config.export.as_mut() {
            export.registry = cx.resolve(&export.registry);
        }
        Checked::try_new_with(config, |config, problems| {
            if !config.dataset.is_file() {
                problems.at_value("dataset", format!("dataset `{}` is not a file", config.dataset.display()));
            }
            // With an input the clients are external: settings of simulated clients, and of
            // external ones without it, would have no effect.
            let external = cx.has_inputs;
            let misplaced: &[&str] =
                if external { &["dropout"] } else { &["client_ids", "round_timeout", "close_on_quorum"] };
            for field in misplaced.iter().filter(|field| cx.is_set(field)) {
                let why = if external {
                    "applies to simulated clients only, and this operator reads external clients' updates from its input"
                } else {
                    "applies to external clients only (an operator with an `input` of model updates)"
                };
                problems.at_value(*field, format!("`{field}` {why}"));
            }
        })
        .map(|config| Self { config, external: cx.has_inputs })
    }

    /// With inputs its clients are external: their updates must be among the inputs (health
    /// inputs alone would leave every round waiting for nothing).
    fn check_wiring(_config: &FederatedConfig, cx: &mut Wiring<'_>) {
        if !cx.inputs.is_empty() && cx.count(PortKind::ModelUpdates) == 0 {
            let name = cx.name().to_owned();
            cx.at_inputs(format!(
                "federated `{name}` has inputs but no model updates among them: name the source of its clients' updates (a `file` or `kafka` source with `records: model_updates`)"
            ));
        }
    }
}

impl OperatorComponent for FederatedOperator {
    /// Training saves its state, but not yet with external clients' secure aggregation
    /// (its masking steps are not saved).
    fn checkpointed(&self) -> bool {
        !self.external || self.config.secure_aggregation.is_none()
    }

    fn build<'scope>(
        &self,
        name: &str,
        inputs: &[PortRef],
        cx: &mut Build<'_, 'scope>,
    ) -> Result<Vec<Port<'scope>>, BuildError> {
        let data = load(&self.config).map_err(|err| BuildError {
            role: "operator",
            operator: name.to_owned(),
            what: "cannot load its data",
            reason: err.to_string(),
        })?;
        let scope = cx.scope;
        // External clients: their updates come from the operator's inputs.
        let updates: Vec<_> = inputs
            .iter()
            .filter_map(|reference| match cx.port(reference) {
                Some(Port::Updates(stream)) => Some(stream.clone()),
                _ => None,
            })
            .collect();
        let external = (!inputs.is_empty()).then(|| scope.concatenate(updates));
        // Live health of the clients (edge nodes of the same ids): status changes and
        // heartbeats among the inputs.
        let health = inputs
            .iter()
            .filter_map(|reference| match cx.port(reference) {
                Some(Port::Changes(stream)) => {
                    Some(stream.clone().map(|change| ClientHealth::Status { node: change.node_id, status: change.to }))
                }
                Some(Port::Heartbeats(collection)) => Some(collection.inner.clone().flat_map(|(beat, _, diff)| {
                    (diff > 0).then_some(ClientHealth::Load { node: beat.node_id, cpu: beat.cpu, memory: beat.memory })
                })),
                _ => None,
            })
            .collect();
        let files = RoundFiles::create(name, &self.config);
        let state = cx.state.handle(name);
        let ports = scope.federated(name, &self.config, data, external, health, &cx.metrics.federated, files, state);
        let rounds = cx.count_stream(ports.rounds, name, "rounds");
        Ok(vec![
            Port::Rounds(rounds),
            Port::Models(ports.models),
            Port::Plans(ports.plans),
            Port::DeadLetters(ports.rejected),
        ])
    }
}

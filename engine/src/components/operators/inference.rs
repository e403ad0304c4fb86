//! `type: inference`: batched ONNX inference of requests (or of heartbeats, with
//! `features`); output `results`, one per request.

use std::path::Path;

use edgeflow_connectors::onnx::{ServedModel, ServiceOptions};
use edgeflow_operators::inference::operator::{Inference, InferenceOut};
use edgeflow_operators::inference::InferenceConfig;
use edgeflow_operators::params::{Checked, ParamErrors};
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Concatenate;

use crate::components::{BuildError, Component, Context, OperatorComponent, Ports, Wiring};
use crate::config::{PortKind, PortRef};
use crate::runtime::{Build, Port};

/// Inference with checked settings and an existing registry.
#[derive(Debug)]
pub struct InferenceOperator(Checked<InferenceConfig>);

impl Component for InferenceOperator {
    const TYPE: &'static str = "inference";
    const DOC: &'static str = concat!(
        "Batched ONNX inference of requests (or of heartbeats, with `features`): output\n",
        "`results`, one per request."
    );
    type Config = InferenceConfig;

    fn ports(_config: &InferenceConfig) -> Ports {
        Ports::operator(
            &[PortKind::InferenceRequests, PortKind::Heartbeats],
            &[("results", PortKind::InferenceResults)],
        )
    }

    fn try_new(mut config: InferenceConfig, cx: &Context<'_>) -> Result<Self, ParamErrors> {
        config.registry = cx.resolve(&config.registry);
        Checked::try_new_with(config, |config, problems| check_registry(problems, config)).map(Self)
    }

    /// `features` turn heartbeats into requests: needed with a heartbeat input,
    /// meaningless without one.
    fn check_wiring(config: &InferenceConfig, cx: &mut Wiring<'_>) {
        let reads_heartbeats = cx.count(PortKind::Heartbeats) > 0;
        if reads_heartbeats && config.features.is_empty() {
            cx.at_key(
                "features",
                "an inference operator that reads heartbeats needs `features`, the heartbeat fields fed to the model (e.g. [cpu, memory, disk])",
            );
        }
        if !reads_heartbeats && !config.features.is_empty() {
            cx.at_value(
                "features",
                "`features` apply to heartbeat inputs only; this operator reads inference requests",
            );
        }
    }
}

/// The registry directory and each model's directory with at least one version must exist
/// (the models themselves load, and are checked, when the pipeline starts). Problems are
/// listed after the settings' own, at the registry's or the model's position.
fn check_registry(problems: &mut ParamErrors, config: &InferenceConfig) {
    let registry: &Path = &config.registry;
    if !registry.is_dir() {
        problems.at_value("registry", format!("model registry `{}` is not a directory", registry.display()));
        return;
    }
    for (index, model) in config.models.iter().enumerate() {
        let dir = registry.join(model);
        let versions = edgeflow_connectors::onnx::version_dirs(&dir).map_or(0, |found| found.len());
        if versions == 0 {
            let message = if dir.is_dir() {
                format!("model `{model}` has no versions: expected `{}/1/model.onnx`", dir.display())
            } else {
                format!("model `{model}` is not in the registry: `{}` is not a directory", dir.display())
            };
            problems.at_value(format!("models[{index}]"), message);
        }
    }
}

impl OperatorComponent for InferenceOperator {
    fn checkpointed(&self) -> bool {
        true
    }

    fn build<'scope>(
        &self,
        name: &str,
        inputs: &[PortRef],
        cx: &mut Build<'_, 'scope>,
    ) -> Result<Vec<Port<'scope>>, BuildError> {
        let config = self.0.get();
        // Each worker has its own sessions, with the operator's thread settings.
        let options = edgeflow_connectors::onnx::SessionOptions {
            intra_op_threads: config.intra_op_threads,
            inter_op_threads: config.inter_op_threads,
        };
        let models =
            edgeflow_connectors::onnx::load_registry(&config.registry, &config.models, options).map_err(|err| {
                BuildError {
                    role: "operator",
                    operator: name.to_owned(),
                    what: "cannot load its models",
                    reason: err.to_string(),
                }
            })?;
        // Heartbeats are scored with the first model, through its only input.
        let input = models.first().and_then(|m| m.interface().inputs.first()).map(|s| s.name.clone());
        let mut streams = Vec::new();
        let balancer_name = inputs
            .iter()
            .find(|r| r.port.as_deref().is_none_or(|p| p == "requests") && cx.balancers.contains_key(&r.component))
            .map(|r| r.component.clone());
        for reference in inputs {
            match cx.port(reference) {
                Some(Port::Requests(stream)) => streams.push(stream.clone()),
                Some(Port::Heartbeats(collection)) => {
                    let (config, input) = (config.clone(), input.clone().unwrap_or_default());
                    streams.push(
                        collection
                            .inner
                            .clone()
                            .map(move |(heartbeat, _, _)| Box::new(config.heartbeat_request(&heartbeat, &input))),
                    );
                }
                _ => {}
            }
        }
        let scope = cx.scope;
        let requests = cx.count_stream(scope.concatenate(streams), name, "input");
        let balancer = balancer_name.and_then(|name| cx.balancers.get_mut(&name));
        let changes = balancer.as_ref().map_or_else(|| scope.concatenate(Vec::new()), |b| b.changes.clone());
        // Each model runs on a thread of its own, which also watches for new versions.
        let watch = (config.watch.as_millis() > 0).then(|| std::time::Duration::from_millis(config.watch.as_millis()));
        let served: Vec<ServedModel> =
            models.into_iter().map(|model| ServedModel { model, options: ServiceOptions { watch } }).collect();
        let state = cx.state.handle(name);
        let out = requests.inference(changes, name, config, served, &cx.metrics.inference, state);
        let mut results = out.clone().flat_map(|out| match out {
            InferenceOut::Result(result) => Some(result),
            InferenceOut::Reroute(_) => None,
        });
        if let Some(balancer) = balancer {
            // Requests no node could take are results of this operator too; requests whose
            // node went Offline go back to the balancer.
            results = scope.concatenate([results, balancer.unplaced.clone()]);
            balancer.reroutes.push(out.flat_map(|out| match out {
                InferenceOut::Reroute(request) => Some(*request),
                InferenceOut::Result(_) => None,
            }));
        }
        Ok(vec![Port::Results(cx.count_stream(results, name, "results"))])
    }
}

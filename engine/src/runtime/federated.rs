//! The `federated` operator: training rounds as logical times of the dataflow.
//!
//! Round `r` is timely time `r`. The coordinator (on worker 0) publishes the plan of round
//! `r` with the global model; it crosses a feedback edge (+1) and reaches every worker at time
//! `r`, where the simulated clients each worker owns (by a hash of their id) train and send
//! their updates at time `r`. They are exchanged to worker 0; once the frontier passes `r`,
//! every answer of the round is in: the coordinator checks and folds them in (rejected ones go
//! to the `rejected` output with their reason), closes the round, measures the new model on
//! the held-out data, and publishes round `r + 1` at time `r`. The loop ends after `rounds`
//! rounds, or when the privacy budget refuses the next one.

use std::io::Write;
use std::sync::Arc;

use edgeflow_operators::federated::config::FederatedConfig;
use edgeflow_operators::federated::coordinator::{Coordinator, RoundPlan, RoundSummary};
use edgeflow_operators::federated::learn::Dataset;
use edgeflow_operators::federated::simulate::SimulatedFleet;
use edgeflow_operators::federated::update::{ModelUpdate, Payload};
use edgeflow_operators::{route_hash, DeadLetter, EventTime};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{ConnectLoop, Feedback, Operator};
use timely::dataflow::{Scope, StreamVec};

use crate::metrics::Metrics;

/// One line of the `rounds` output (and of the CSV).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct RoundReport {
    round: u64,
    model_version: u64,
    selected: usize,
    accepted: usize,
    rejected: usize,
    quorum_met: bool,
    client_loss: Option<f64>,
    /// Cross-entropy of the new global model on the held-out data.
    test_loss: f64,
    /// Its accuracy on the held-out data.
    test_accuracy: f64,
    epsilon: Option<f64>,
    clip_norm: Option<f64>,
}

impl RoundReport {
    fn new(summary: RoundSummary, test_loss: f64, test_accuracy: f64) -> Self {
        Self {
            round: summary.round,
            model_version: summary.model_version,
            selected: summary.selected,
            accepted: summary.accepted,
            rejected: summary.rejected,
            quorum_met: summary.quorum_met,
            client_loss: summary.client_loss,
            test_loss,
            test_accuracy,
            epsilon: summary.epsilon,
            clip_norm: summary.clip_norm,
        }
    }

    /// Its event time: the round.
    pub fn round(&self) -> u64 {
        self.round
    }
}

/// One line of the `models` output: a global model version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct GlobalModel {
    round: u64,
    version: u64,
    payload: Payload,
}

impl GlobalModel {
    /// Its event time: the round.
    pub fn round(&self) -> u64 {
        self.round
    }
}

/// A plan with the model to train from.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PlanMessage {
    plan: RoundPlan,
    model: Vec<f32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum CoordinatorOut {
    Plan(PlanMessage),
    Report(RoundReport),
    Model(GlobalModel),
    /// A refused update, at the round it was for.
    Rejected(DeadLetter, u64),
}

/// The operator's outputs.
pub(crate) struct FederatedPorts<'scope> {
    pub rounds: StreamVec<'scope, EventTime, RoundReport>,
    pub models: StreamVec<'scope, EventTime, GlobalModel>,
    pub rejected: StreamVec<'scope, EventTime, (DeadLetter, EventTime)>,
}

/// The training data of a federated operator, loaded when the pipeline starts.
pub(crate) struct FederatedData {
    pub fleet: SimulatedFleet,
    pub test: Dataset,
}

/// Loads the dataset and splits it over the simulated clients.
pub(crate) fn load(config: &FederatedConfig) -> Result<FederatedData, String> {
    let text = std::fs::read_to_string(&config.dataset)
        .map_err(|err| format!("cannot read the dataset `{}`: {err}", config.dataset.display()))?;
    let data = Dataset::parse_csv(&text, config.feature_scale)
        .map_err(|err| format!("dataset `{}`: {err}", config.dataset.display()))?;
    let (train, test) = data.split(config.test_fraction, config.seed);
    let fleet = SimulatedFleet::new(&train, config.clients, config.partition, config.seed);
    Ok(FederatedData { fleet, test })
}

/// Builds the training loop in `scope`.
pub(crate) fn federated<'scope>(
    scope: Scope<'scope, EventTime>,
    name: &str,
    config: &FederatedConfig,
    data: FederatedData,
    metrics: &Arc<Metrics>,
) -> FederatedPorts<'scope> {
    let (handle, plans) = scope.feedback::<Vec<PlanMessage>>(1);
    let (index, peers) = (scope.index(), scope.peers());
    let fleet = Arc::new(data.fleet);
    let dropout = config.dropout;
    let seed = config.seed;
    let clients = fleet.clone();
    let updates = plans.broadcast().unary(Pipeline, &format!("FederatedClients({name})"), move |_, _| {
        move |input, output| {
            input.for_each(|cap, data| {
                let mut session = output.session(&cap);
                for message in data.drain(..) {
                    for client in &message.plan.clients {
                        if route_hash(client) as usize % peers != index {
                            continue;
                        }
                        let draw: f64 = rand_chacha::ChaCha8Rng::seed_from_u64(
                            seed ^ route_hash(client) ^ message.plan.round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        )
                        .gen();
                        if draw < dropout {
                            continue;
                        }
                        if let Some(update) = clients.train(&message.plan, &message.model, client) {
                            session.give(update);
                        }
                    }
                }
            });
        }
    });

    let coordinator_config = config.coordinator();
    let rounds = config.rounds;
    let test = data.test;
    let model_shape = fleet.model;
    let infos = fleet.infos();
    let operator = name.to_owned();
    let csv = config.csv.clone();
    let export = config.export.clone();
    let gauges = FederatedGauges::new(metrics, name);
    let out = updates.unary_frontier(
        Exchange::new(|_: &ModelUpdate| 0),
        &format!("FederatedCoordinator({name})"),
        move |cap, _info| {
            let mut coordinator = Coordinator::new(coordinator_config, vec![0.0; model_shape.parameters()]);
            let mut csv = csv.and_then(|path| match std::fs::File::create(&path) {
                Ok(mut file) => {
                    let _ = writeln!(
                        file,
                        "round,model_version,selected,accepted,rejected,quorum_met,client_loss,test_loss,test_accuracy,epsilon"
                    );
                    Some(file)
                }
                Err(err) => {
                    tracing::error!(path = %path.display(), %err, "cannot create the federated CSV");
                    None
                }
            });
            // Worker 0 coordinates; the others only run clients.
            let mut held = (index == 0).then_some(cap);
            let mut pending: std::collections::BTreeMap<EventTime, Vec<ModelUpdate>> = Default::default();
            let mut started = false;
            move |(input, frontier), output| {
                if !started {
                    started = true;
                    if let Some(cap) = held.as_mut() {
                        match coordinator.plan(&infos) {
                            Ok(plan) => {
                                let model = coordinator.model().to_vec();
                                output.session(&*cap).give(CoordinatorOut::Plan(PlanMessage { plan, model }));
                                cap.downgrade(&1);
                            }
                            Err(reason) => {
                                tracing::error!(operator = %operator, %reason, "no federated round can start");
                                held = None;
                            }
                        }
                    }
                }
                input.for_each(|cap, data| {
                    let time = cap.least().copied().unwrap_or_default();
                    pending.entry(time).or_default().append(data);
                });
                let Some(cap) = held.as_mut() else { return };
                let round = *cap.time();
                if frontier.less_equal(&round) {
                    return;
                }
                // Every answer of `round` is in: sorted by client, so the result does not
                // depend on the number of workers.
                let mut answers = pending.remove(&round).unwrap_or_default();
                answers.sort_by(|a, b| a.client_id.cmp(&b.client_id));
                let mut session = output.session(&*cap);
                for update in &answers {
                    if let Err(reason) = coordinator.offer(update) {
                        gauges.rejected.inc();
                        let letter = DeadLetter {
                            source: operator.clone(),
                            position: format!("round {} client {}", update.round, update.client_id),
                            reason,
                            payload: serde_json::to_vec(update).unwrap_or_default(),
                        };
                        session.give(CoordinatorOut::Rejected(letter, update.round));
                    } else {
                        gauges.accepted.inc();
                    }
                }
                match coordinator.close() {
                    Ok(summary) => {
                        let (test_loss, test_accuracy) = model_shape.evaluate(coordinator.model(), &test);
                        gauges.observe(&summary, test_accuracy);
                        tracing::info!(operator = %operator, round, accuracy = test_accuracy, accepted = summary.accepted, "federated round closed");
                        if let Some(file) = csv.as_mut() {
                            let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
                            let _ = writeln!(
                                file,
                                "{},{},{},{},{},{},{},{test_loss:.6},{test_accuracy:.6},{}",
                                summary.round,
                                summary.model_version,
                                summary.selected,
                                summary.accepted,
                                summary.rejected,
                                summary.quorum_met,
                                opt(summary.client_loss),
                                opt(summary.epsilon)
                            );
                            let _ = file.flush();
                        }
                        session.give(CoordinatorOut::Model(GlobalModel {
                            round,
                            version: summary.model_version,
                            payload: Payload::encode(coordinator.model()),
                        }));
                        session.give(CoordinatorOut::Report(RoundReport::new(summary, test_loss, test_accuracy)));
                    }
                    Err(reason) => tracing::error!(operator = %operator, round, %reason, "federated round failed"),
                }
                if round >= rounds {
                    drop(session);
                    held = None;
                    if let Some(export) = &export {
                        match write_onnx(export, &model_shape, &coordinator) {
                            Ok(path) => tracing::info!(operator = %operator, path = %path.display(), "trained model exported to ONNX"),
                            Err(err) => tracing::error!(operator = %operator, %err, "cannot export the trained model"),
                        }
                    }
                    return;
                }
                match coordinator.plan(&infos) {
                    Ok(plan) => {
                        let model = coordinator.model().to_vec();
                        session.give(CoordinatorOut::Plan(PlanMessage { plan, model }));
                        drop(session);
                        cap.downgrade(&(round + 1));
                    }
                    Err(reason) => {
                        tracing::warn!(operator = %operator, round = round + 1, %reason, "federated training stops");
                        drop(session);
                        held = None;
                    }
                }
            }
        },
    );
    out.clone()
        .flat_map(|o| match o {
            CoordinatorOut::Plan(plan) => Some(plan),
            _ => None,
        })
        .connect_loop(handle);
    FederatedPorts {
        rounds: out.clone().flat_map(|o| match o {
            CoordinatorOut::Report(report) => Some(report),
            _ => None,
        }),
        models: out.clone().flat_map(|o| match o {
            CoordinatorOut::Model(model) => Some(model),
            _ => None,
        }),
        rejected: out.flat_map(|o| match o {
            CoordinatorOut::Rejected(letter, round) => Some((letter, round)),
            _ => None,
        }),
    }
}

/// Writes the global model as `REGISTRY/MODEL/VERSION/model.onnx`, beside and then renamed
/// into place, so a registry being watched never shows a half-written version.
fn write_onnx(
    export: &edgeflow_operators::federated::config::Export,
    shape: &edgeflow_operators::federated::learn::Softmax,
    coordinator: &Coordinator,
) -> std::io::Result<std::path::PathBuf> {
    let model_dir = export.registry.join(&export.model);
    std::fs::create_dir_all(&model_dir)?;
    let version = coordinator.version();
    let staging = model_dir.join(format!(".staging-{version}"));
    std::fs::create_dir_all(&staging)?;
    let description = format!("softmax regression trained by federated rounds; global model version {version}");
    let bytes =
        edgeflow_operators::federated::onnx_export::softmax_onnx(shape, coordinator.model(), version, &description);
    std::fs::write(staging.join("model.onnx"), bytes)?;
    let target = model_dir.join(version.to_string());
    if target.exists() {
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&staging, &target)?;
    Ok(target.join("model.onnx"))
}

/// Prometheus view of the training.
struct FederatedGauges {
    round: prometheus_client::metrics::gauge::Gauge,
    accuracy: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    epsilon: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    accepted: prometheus_client::metrics::counter::Counter,
    rejected: prometheus_client::metrics::counter::Counter,
}

impl FederatedGauges {
    fn new(metrics: &Metrics, operator: &str) -> Self {
        let labels = vec![("operator", operator.to_owned())];
        let f = &metrics.federated;
        // One family lookup per statement: a lookup's read guard lives to the statement's
        // end, and a second lookup that creates would wait on it forever.
        let outcome = |outcome: &str| {
            let counter = f
                .updates
                .get_or_create(&vec![("operator", operator.to_owned()), ("outcome", outcome.to_owned())])
                .clone();
            counter
        };
        let accepted = outcome("accepted");
        let rejected = outcome("rejected");
        let round = f.round.get_or_create(&labels).clone();
        let accuracy = f.test_accuracy.get_or_create(&labels).clone();
        let epsilon = f.epsilon.get_or_create(&labels).clone();
        Self { round, accuracy, epsilon, accepted, rejected }
    }

    fn observe(&self, summary: &RoundSummary, accuracy: f64) {
        self.round.set(summary.round as i64);
        self.accuracy.set(accuracy);
        if let Some(epsilon) = summary.epsilon {
            self.epsilon.set(epsilon);
        }
    }
}

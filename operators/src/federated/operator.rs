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
//!
//! With an input of model updates the clients are outside the engine: they read the plans
//! (the `plans` output, e.g. to a Kafka topic) and send updates through a source. Those
//! rounds run on the wall clock: an update counts when it arrives, and a round closes when
//! every selected client has answered, on quorum if `close_on_quorum`, at its deadline
//! (`round_timeout` after its plan), or when the input ends. The operator then holds no
//! capability ahead of its input, so its outputs go out at the updates' input frontier and
//! never hold back the sinks or the sources' flow control.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{Capability, Concatenate, ConnectLoop, Feedback, Operator};
use timely::dataflow::{Scope, StreamVec};

use super::config::{FederatedConfig, SecureAggregation};
use super::coordinator::DpMode;
use super::coordinator::{
    ClientInfo, Coordinator, CoordinatorSnapshot, PlanError, PlanRecord, RoundPlan, RoundSummary,
};
use super::learn::{Dataset, Softmax};
use super::secure::{unmask, Announcement, MaskedUpdate, Reveal, SecureClient};
use super::secure_protocol::{Advance, ClientStep, ServerRound, ServerStep};
use super::simulate::SimulatedFleet;
use super::update::{ModelUpdate, Payload};
use crate::metrics::{labels, FederatedMetrics};
use crate::state::{Entry, StateHandle};
use crate::time::wall_clock_ms;
use crate::{route_hash, DeadLetter, EventTime, HealthStatus};

/// Where a federated operator's rounds go besides its outputs: a CSV of the convergence and
/// the trained model exported to a registry (implemented with files in `connectors`).
pub trait RoundsOutput: 'static {
    /// Round `summary.round` closed; the new global model measured `test_loss` and
    /// `test_accuracy` on the held-out data.
    fn round_closed(&mut self, summary: &RoundSummary, test_loss: f64, test_accuracy: f64);
    /// Training is over: `coordinator` holds the final global model of shape `shape`.
    fn finished(&mut self, shape: &Softmax, coordinator: &Coordinator);
    /// Training goes on from a checkpoint taken after round `closed` closed: what was
    /// written of later rounds is undone.
    fn restored(&mut self, _closed: u64) {}
}

/// Rounds go nowhere but the operator's outputs.
impl RoundsOutput for () {
    fn round_closed(&mut self, _summary: &RoundSummary, _test_loss: f64, _test_accuracy: f64) {}
    fn finished(&mut self, _shape: &Softmax, _coordinator: &Coordinator) {}
}

/// Federated training in a scope.
///
/// Three rounds of FedAvg over ten simulated clients of a small two-class dataset:
///
/// ```
/// use edgeflow_operators::federated::config::FederatedConfig;
/// use edgeflow_operators::federated::learn::Dataset;
/// use edgeflow_operators::federated::operator::{Federated, FederatedData};
/// use edgeflow_operators::metrics::FederatedMetrics;
/// use edgeflow_operators::state::StateHandle;
/// use timely::dataflow::operators::capture::{Capture, Extract};
/// use timely::dataflow::operators::vec::Map;
///
/// // Class 0 near (0, 0), class 1 near (1, 1).
/// let csv: String = (0..200).map(|i| format!("{},{},{}\n", i % 2, (i % 2) as f32 + (i % 7) as f32 / 50.0, (i % 2) as f32)).collect();
/// let config: FederatedConfig = serde_json::from_value(serde_json::json!({
///     "dataset": "unused.csv", "clients": 10, "clients_per_round": 5, "rounds": 3,
/// })).unwrap();
/// let data = FederatedData::split(&Dataset::parse_csv(&csv, 1.0).unwrap(), &config);
/// let rounds = timely::example(move |scope| {
///     let (metrics, state) = (FederatedMetrics::default(), StateHandle::none());
///     let ports = scope.federated("train", &config, data, None, Vec::new(), &metrics, (), state);
///     ports.rounds.map(|report| report.round()).capture()
/// });
/// let rounds: Vec<u64> = rounds.extract().into_iter().flat_map(|(_, rounds)| rounds).collect();
/// assert_eq!(rounds, vec![1, 2, 3]);
/// ```
pub trait Federated<'scope> {
    /// Builds the training loop of operator `name`. With `external` updates (a source of
    /// `model_updates`), the clients are outside: they read the `plans` output and a round
    /// closes when every selected client has answered, on quorum if asked, or at its
    /// wall-clock deadline. Without, the simulated fleet of `data` answers each plan within
    /// the round's logical time. `health` is the clients' live node health; `output` gets
    /// each closed round and the final model.
    ///
    /// With simulated clients it takes part in checkpoints through `state`
    /// ([`StateHandle::none`] for none): rounds are times, so it proposes the round it waits
    /// for as the least checkpoint time and holds still while one is agreed; it saves the
    /// coordinator between rounds (model, optimiser state, privacy spent, participation, the
    /// open round's plan), and after a restore sends the open round's plan to the clients
    /// again and goes on at that round.
    #[allow(clippy::too_many_arguments)]
    fn federated<W: RoundsOutput>(
        self,
        name: &str,
        config: &FederatedConfig,
        data: FederatedData,
        external: Option<StreamVec<'scope, EventTime, ModelUpdate>>,
        health: Vec<StreamVec<'scope, EventTime, ClientHealth>>,
        metrics: &FederatedMetrics,
        output: W,
        state: StateHandle,
    ) -> FederatedPorts<'scope>;
}

impl<'scope> Federated<'scope> for Scope<'scope, EventTime> {
    fn federated<W: RoundsOutput>(
        self,
        name: &str,
        config: &FederatedConfig,
        data: FederatedData,
        external: Option<StreamVec<'scope, EventTime, ModelUpdate>>,
        health: Vec<StreamVec<'scope, EventTime, ClientHealth>>,
        metrics: &FederatedMetrics,
        output: W,
        state: StateHandle,
    ) -> FederatedPorts<'scope> {
        federated_core(self, name, config, data, external, health, metrics, Box::new(output), state)
    }
}

/// One line of the `rounds` output (and of the CSV).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundReport {
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
    /// Why the round failed, when it failed for another reason than its quorum (secure
    /// aggregation could not unmask the sum).
    failure: Option<String>,
}

impl RoundReport {
    fn new(summary: RoundSummary, test_loss: f64, test_accuracy: f64, failure: Option<String>) -> Self {
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
            failure,
        }
    }

    /// Its event time: the round.
    pub fn round(&self) -> u64 {
        self.round
    }
}

/// One line of the `models` output: a global model version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GlobalModel {
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
    /// Wall-clock deadline, ms since the epoch (external clients).
    deadline: Option<u64>,
    /// Secure aggregation with external clients: the step this message opens.
    secure: Option<ServerStep>,
}

/// What the live node health says of a client (an edge node of the same id).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientHealth {
    /// Its status changed (from `node_health`'s changes).
    Status {
        /// The node (and client) id.
        node: String,
        /// Its new status.
        status: HealthStatus,
    },
    /// Its latest resource use, percent (from its heartbeats).
    Load {
        /// The node (and client) id.
        node: String,
        /// CPU percent.
        cpu: f64,
        /// Memory percent.
        memory: f64,
    },
}

/// What clients send the coordinator.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum ClientMessage {
    /// A plain update.
    Update(ModelUpdate),
    /// Live health of a client (external clients).
    Health(ClientHealth),
    /// Secure aggregation, step 1: a selected client's public key (index in the round).
    Announce { index: u8, public: [u8; 32] },
    /// Step 3: a surviving client's masked, weighted update (`[w·delta.., w, loss]`).
    Masked { index: u8, client: String, masked: MaskedUpdate },
    /// Step 4: a surviving client's shares for unmasking.
    Reveal(Reveal),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum CoordinatorOut {
    Plan(PlanMessage),
    Report(RoundReport),
    Model(GlobalModel),
    /// A refused update, at the round it was for.
    Rejected(DeadLetter, u64),
    /// The open round's plan sent to the simulated clients again after a restore (not to
    /// the `plans` output, which had it before the checkpoint).
    Resend(PlanMessage),
}

/// The operator's outputs.
#[derive(Debug)]
pub struct FederatedPorts<'scope> {
    /// One report per round (time: the round).
    pub rounds: StreamVec<'scope, EventTime, RoundReport>,
    /// Each global model version (time: the round).
    pub models: StreamVec<'scope, EventTime, GlobalModel>,
    /// Each round's plan with the model to train from (time: the round before).
    pub plans: StreamVec<'scope, EventTime, PlanRecord>,
    /// Refused updates with their reason.
    pub rejected: StreamVec<'scope, EventTime, (DeadLetter, EventTime)>,
}

/// The training data of a federated operator, loaded when the pipeline starts.
#[derive(Debug)]
pub struct FederatedData {
    /// The simulated clients, each with its share of the training data.
    pub fleet: SimulatedFleet,
    /// The held-out data the global model is measured on.
    pub test: Dataset,
}

impl FederatedData {
    /// Splits `data` into held-out and training data, and the training data over the
    /// simulated clients, as `config` says.
    pub fn split(data: &Dataset, config: &FederatedConfig) -> Self {
        let (train, test) = data.split(config.test_fraction, config.seed);
        let fleet = SimulatedFleet::new(&train, config.clients, config.partition, config.seed);
        FederatedData { fleet, test }
    }
}

/// Builds the training loop in `scope`. With `external` updates (a source of
/// `model_updates`), the clients are outside: they read the `plans` output and a round closes
/// when every selected client has answered, on quorum if asked, or at its wall-clock deadline.
/// Without, the simulated fleet answers each plan within the round's logical time.
#[allow(clippy::too_many_arguments)]
fn federated_core<'scope>(
    scope: Scope<'scope, EventTime>,
    name: &str,
    config: &FederatedConfig,
    data: FederatedData,
    external: Option<StreamVec<'scope, EventTime, ModelUpdate>>,
    health: Vec<StreamVec<'scope, EventTime, ClientHealth>>,
    metrics: &FederatedMetrics,
    output: Box<dyn RoundsOutput>,
    state: StateHandle,
) -> FederatedPorts<'scope> {
    let live_health = external.is_some() && !health.is_empty();
    let index = scope.index();
    let model_shape = data.fleet.model;
    let infos = match (&external, &config.client_ids) {
        (None, _) => data.fleet.infos(),
        (Some(_), ids) => {
            let ids = ids.clone().unwrap_or_else(|| SimulatedFleet::ids(config.clients));
            // Without live health nothing is known of external clients: they count as Healthy
            // and idle. With it, a client counts once its node reports.
            let status = if live_health { HealthStatus::Offline } else { HealthStatus::Healthy };
            ids.into_iter().map(|id| ClientInfo { id, status, cpu: 0.0, memory: 0.0 }).collect()
        }
    };
    let is_external = external.is_some();
    let (updates, feedback) = match external {
        Some(stream) => {
            let health = scope.concatenate(health).map(ClientMessage::Health);
            (scope.concatenate([stream.map(ClientMessage::Update), health]), None)
        }
        None => {
            let (handle, plans) = scope.feedback::<Vec<PlanMessage>>(1);
            (simulated_clients(plans, name, config, data.fleet), Some(handle))
        }
    };

    let mut driver =
        Driver::new(config, data.test, model_shape, infos, name, metrics, output, is_external, live_health);
    driver.keep_offered = state.checkpointing();
    let secure = config.secure_aggregation.clone();
    let out = updates.unary_frontier(
        Exchange::new(|_: &ClientMessage| 0),
        &format!("FederatedCoordinator({name})"),
        move |cap, info| {
            let activator = scope.activator_for(info.address.clone());
            state.activate_with(activator.clone());
            let mut pending: BTreeMap<EventTime, Vec<ClientMessage>> = BTreeMap::new();
            let mut started = false;
            // After a restore: the open round's plan, sent to the clients again just before
            // its round.
            let mut resend: Option<(Capability<EventTime>, PlanMessage)> = None;
            // External clients: messages at or after a checkpoint's time, until it is saved.
            let mut waiting: Vec<(EventTime, Vec<ClientMessage>)> = Vec::new();
            let restored = state.restored_all().and_then(|(_, entries)| entries.into_iter().next());
            let restored = restored.filter(|_| index == 0).and_then(|entry| match entry.value::<SavedTraining>() {
                Ok(saved) => Some(saved),
                Err(err) => {
                    tracing::error!(part = state.name(), %err, "the saved training does not decode; it starts afresh");
                    None
                }
            });
            // Worker 0 coordinates; the others only run clients.
            let mut held = (index == 0).then_some(cap);
            // Training is over but a last checkpoint is to come (see `retire`): the
            // capability at the end of time, and the checkpoint saved at it.
            let mut reserve: Option<Capability<EventTime>> = None;
            let mut saved_last: Option<u64> = None;
            if let (Some(saved), Some(cap)) = (restored, held.as_mut()) {
                started = true;
                let over = saved.over;
                tracing::info!(operator = %driver.operator, round = saved.coordinator.round(), over, "federated training restored");
                match driver.restore(saved) {
                    // External clients read the plan where it went before the checkpoint.
                    Some(_) if !over && is_external => {}
                    Some(plan) if !over => {
                        let round = plan.plan.round;
                        resend = Some((cap.delayed(&round.saturating_sub(1)), plan));
                        cap.downgrade(&round);
                    }
                    _ => reserve = retire(&mut held, &state, !is_external),
                }
            }
            // The training loop drives time from the start (the run is not over when its
            // sources, if any, are).
            if let (Some(cap), false) = (held.as_ref(), is_external) {
                state.propose(*cap.time());
            }
            let span = tracing::info_span!("operator", name = %name, r#type = "federated", worker = index);
            move |(input, frontier), output| {
                let _entered = span.enter();
                if let Some((cap, plan)) = resend.take() {
                    output.session(&cap).give(CoordinatorOut::Resend(plan));
                }
                let Some(cap) = held.as_mut() else {
                    // Nothing more to save than whether training is over (worker 0).
                    if let Some((epoch, time)) = state.due_checkpoint() {
                        let saved = (index == 0).then(|| Entry::new(0, &driver.saved()));
                        state.save(saved.into_iter().collect());
                        if time == EventTime::MAX {
                            saved_last = Some(epoch);
                        }
                    }
                    if let (Some(_), Some(epoch)) = (&reserve, saved_last) {
                        if state.committed() >= epoch {
                            reserve = None;
                        } else {
                            activator.activate_after(Duration::from_millis(2));
                        }
                    }
                    // Training is over: whatever still arrives is a straggler (no round is open,
                    // so the coordinator refuses it).
                    input.for_each(|cap, data| {
                        let mut session = output.session(&cap);
                        for message in data.drain(..) {
                            if let ClientMessage::Update(update) = message {
                                session.give_iterator(driver.offer(&update).into_iter());
                            }
                        }
                    });
                    return;
                };
                if is_external {
                    // External rounds are driven by the wall clock: the outputs go at the
                    // updates' input frontier, so the operator never holds the dataflow (its
                    // sinks, the sources' flow control) behind its input.
                    if let Some(low) = frontier.frontier().first() {
                        if cap.time() < low {
                            cap.downgrade(low);
                        }
                    }
                }
                if !started {
                    started = true;
                    match driver.open() {
                        Opened::Plan(plan) => output.session(&*cap).give(*plan),
                        Opened::Wait => activator.activate_after(RETRY_SELECTION),
                        Opened::Over => {
                            reserve = retire(&mut held, &state, !is_external);
                            return;
                        }
                    }
                    if !is_external {
                        cap.downgrade(&1);
                    }
                }
                let mut out = Vec::new();
                if is_external {
                    // Updates count in the order they arrive; health reports update the fleet.
                    // While a checkpoint at `T` is due, what arrives at or after `T` waits
                    // until the state as of `T` is saved.
                    let due = state.due_checkpoint().map(|(_, time)| time);
                    input.for_each(|cap, data| {
                        let time = cap.least().copied().unwrap_or_default();
                        match due {
                            Some(due) if time >= due => waiting.push((time, std::mem::take(data))),
                            _ => data.drain(..).for_each(|message| out.extend(driver.take_in(message))),
                        }
                    });
                    if state.due_at(frontier).is_some() {
                        state.save(vec![Entry::new(0, &driver.saved())]);
                    }
                    if state.due_checkpoint().is_none() {
                        waiting.sort_by_key(|(time, _)| *time);
                        for (_, data) in waiting.drain(..) {
                            data.into_iter().for_each(|message| out.extend(driver.take_in(message)));
                        }
                    }
                    // With checkpoints an ended input stays at the end of time until the
                    // last one.
                    let ended = !frontier.less_than(&EventTime::MAX);
                    out.extend(driver.secure_tick(ended));
                    let next = match driver.coordinator.open_round() {
                        Some(round) if ended || driver.due() => {
                            out.extend(driver.close(round));
                            if ended {
                                tracing::warn!(operator = %driver.operator, round, "the updates' input ended: federated training stops");
                                driver.finish();
                                Some(Opened::Over)
                            } else {
                                Some(driver.open())
                            }
                        }
                        Some(_) => None,
                        // No client was eligible: try again.
                        None if ended => {
                            driver.finish();
                            Some(Opened::Over)
                        }
                        // Health reports arrive over a moment: retry on a timer, not at the
                        // first report, so the round sees them together.
                        None if driver.retry_at.is_some_and(|at| Instant::now() < at) => None,
                        None => Some(driver.open()),
                    };
                    output.session(&*cap).give_iterator(out.into_iter());
                    match next {
                        Some(Opened::Plan(plan)) => output.session(&*cap).give(*plan),
                        Some(Opened::Wait) => {}
                        Some(Opened::Over) => reserve = retire(&mut held, &state, !is_external),
                        None => {}
                    }
                    if let Some(at) = driver.wake_at() {
                        activator.activate_after(at.saturating_duration_since(Instant::now()));
                    }
                    return;
                }
                input.for_each(|cap, data| {
                    let time = cap.least().copied().unwrap_or_default();
                    pending.entry(time).or_default().append(data);
                });
                let round = *cap.time();
                // Rounds are times: a checkpoint is at least the round waited for, and no
                // round closes while its time is being agreed.
                state.propose(round);
                if state.holding() {
                    return;
                }
                let save = |driver: &Driver| state.save(vec![Entry::new(0, &driver.saved())]);
                if state.due_at(frontier).is_some_and(|at| round >= at) {
                    save(&driver);
                }
                if frontier.less_equal(&round) {
                    return;
                }
                // Every answer of `round` is in: sorted by client, so the result does not
                // depend on the number of workers.
                let answers = pending.remove(&round).unwrap_or_default();
                match &secure {
                    Some(secure) => driver.offer_secure(answers, secure),
                    None => {
                        let mut updates: Vec<ModelUpdate> = answers
                            .into_iter()
                            .filter_map(|m| match m {
                                ClientMessage::Update(update) => Some(update),
                                _ => None,
                            })
                            .collect();
                        updates.sort_by(|a, b| a.client_id.cmp(&b.client_id));
                        out.extend(updates.iter().filter_map(|u| driver.offer(u)));
                    }
                }
                out.extend(driver.close(round));
                let next = driver.open();
                output.session(&*cap).give_iterator(out.into_iter());
                match next {
                    Opened::Plan(plan) => {
                        output.session(&*cap).give(*plan);
                        // Round `round + 1` is the next logical time.
                        cap.downgrade(&(round + 1));
                        state.propose(round + 1);
                        if state.due_at(frontier).is_some_and(|at| round + 1 >= at) {
                            save(&driver);
                        }
                    }
                    Opened::Wait | Opened::Over => {
                        reserve = retire(&mut held, &state, !is_external);
                        // A checkpoint after the last round, not yet saved.
                        if state.due().is_some() {
                            save(&driver);
                        }
                        activator.activate();
                    }
                }
            }
        },
    );
    if let Some(handle) = feedback {
        out.clone()
            .flat_map(|o| match o {
                CoordinatorOut::Plan(plan) | CoordinatorOut::Resend(plan) => Some(plan),
                _ => None,
            })
            .connect_loop(handle);
    }
    FederatedPorts {
        rounds: out.clone().flat_map(|o| match o {
            CoordinatorOut::Report(report) => Some(report),
            _ => None,
        }),
        models: out.clone().flat_map(|o| match o {
            CoordinatorOut::Model(model) => Some(model),
            _ => None,
        }),
        plans: out.clone().flat_map(|o| match o {
            CoordinatorOut::Plan(message) => {
                let mut record = PlanRecord::new(&message.plan, message.deadline, &message.model);
                record.secure_aggregation = message.secure;
                Some(record)
            }
            _ => None,
        }),
        rejected: out.flat_map(|o| match o {
            CoordinatorOut::Rejected(letter, round) => Some((letter, round)),
            _ => None,
        }),
    }
}

/// The simulated fleet: each worker trains the selected clients it owns (by a hash of their
/// id) when a plan reaches it, and sends their updates at the plan's time. With secure
/// aggregation they send masked updates instead (see [`secure_round`]).
fn simulated_clients<'scope>(
    plans: StreamVec<'scope, EventTime, PlanMessage>,
    name: &str,
    config: &FederatedConfig,
    fleet: SimulatedFleet,
) -> StreamVec<'scope, EventTime, ClientMessage> {
    let (index, peers) = (plans.scope().index(), plans.scope().peers());
    let (dropout, seed) = (config.dropout, config.seed);
    let secure = config.secure_aggregation.clone();
    // Under central DP every client weighs the same (the noise is calibrated to one client).
    let equal_weights = config.dp.as_ref().is_some_and(|dp| dp.mode == DpMode::Central);
    let span = tracing::info_span!("operator", name = %name, r#type = "federated");
    plans.broadcast().unary(Pipeline, &format!("FederatedClients({name})"), move |_, _| {
        move |input, output| {
            let _entered = span.enter();
            input.for_each(|cap, data| {
                let mut session = output.session(&cap);
                for message in data.drain(..) {
                    let plan = &message.plan;
                    let owned = |client: &String| route_hash(client) as usize % peers == index;
                    let drops = |client: &String| {
                        let draw: f64 = rand_chacha::ChaCha8Rng::seed_from_u64(
                            seed ^ route_hash(client) ^ plan.round.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        )
                        .gen();
                        draw < dropout
                    };
                    if let Some(secure) = &secure {
                        // The simulated clients' secrets come from the operating system, so one
                        // worker runs them all (workers could not agree on them otherwise).
                        if index == 0 {
                            let round = SecureRound { plan, model: &message.model, secure, equal_weights };
                            session.give_iterator(round.messages(&fleet, &drops).into_iter());
                        }
                        continue;
                    }
                    for client in plan.clients.iter().filter(|c| owned(c) && !drops(c)) {
                        if let Some(update) = fleet.train(plan, &message.model, client) {
                            session.give(ClientMessage::Update(update));
                        }
                    }
                }
            });
        }
    })
}

/// One round of secure aggregation among simulated clients (Bonawitz et al.; see
/// `crate::federated::secure`). Every selected client announces its key and
/// shares its secrets; those that drop out (`dropout`) do so after sharing, so their masks
/// must be recovered. The clients' secrets come from the operating system's generator; as
/// the simulation runs every client in one place (worker 0) it protects nothing, and is
/// there to show the protocol's arithmetic: external clients (`edgeflow client`, see
/// `secure_protocol`) keep their secrets to themselves. The coordinator receives only
/// announcements, masked updates and the survivors' reveals.
struct SecureRound<'a> {
    plan: &'a RoundPlan,
    model: &'a [f32],
    secure: &'a SecureAggregation,
    equal_weights: bool,
}

impl SecureRound<'_> {
    /// The messages of every selected client.
    fn messages(&self, fleet: &SimulatedFleet, drops: &dyn Fn(&String) -> bool) -> Vec<ClientMessage> {
        let plan = self.plan;
        let threshold = self.secure.shares_needed(plan.clients.len());
        // Each client's secrets from the operating system's generator, as a real client's.
        let Ok(mut rng) = rand_chacha::ChaCha20Rng::from_rng(rand::rngs::OsRng) else {
            tracing::error!(round = plan.round, "the operating system's random number generator failed");
            return Vec::new();
        };
        let mut parties: Vec<SecureClient> =
            (1..=plan.clients.len()).map(|i| SecureClient::new(i as u8, plan.round, &mut rng)).collect();
        let announced: Vec<Announcement> = parties.iter().map(SecureClient::announce).collect();
        let shares: Vec<_> = parties.iter().flat_map(|p| p.share(&announced, threshold, &mut rng)).collect();
        for party in &mut parties {
            if let Err(reason) = party.receive(&announced, &shares) {
                // Shares sealed and opened in one process cannot fail to authenticate.
                tracing::error!(round = plan.round, %reason, "simulated secure aggregation: a share did not open");
            }
        }
        let (mut survivors, mut dropped) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
        for (i, client) in plan.clients.iter().enumerate() {
            if drops(client) { &mut dropped } else { &mut survivors }.insert(i as u8 + 1);
        }
        let mut out = Vec::new();
        for (i, client) in plan.clients.iter().enumerate() {
            let index = i as u8 + 1;
            out.push(ClientMessage::Announce { index, public: announced[i].public_bytes() });
            if dropped.contains(&index) {
                continue;
            }
            let Some(update) = fleet.train(plan, self.model, client) else { continue };
            let Ok(delta) = update.payload.decode() else { continue };
            let weight = if self.equal_weights { 1.0 } else { update.num_examples.max(1) as f32 };
            let mut vector: Vec<f32> = delta.iter().map(|d| d * weight).collect();
            vector.push(weight);
            vector.push(update.metrics.loss.unwrap_or(0.0) as f32);
            let masked = parties[i].mask(&vector, &announced);
            out.push(ClientMessage::Masked { index, client: client.clone(), masked });
            out.push(ClientMessage::Reveal(parties[i].reveal(&survivors, &dropped)));
        }
        out
    }
}

/// The coordinator's side of the operator (worker 0): rounds opened, updates offered,
/// rounds closed, reported and exported.
struct Driver {
    coordinator: Coordinator,
    /// Where closed rounds and the final model go.
    output: Box<dyn RoundsOutput>,
    /// Whether the final model went to the output.
    finished: bool,
    gauges: FederatedGauges,
    test: Dataset,
    model_shape: Softmax,
    infos: Vec<ClientInfo>,
    operator: String,
    rounds: u64,
    /// External clients: how long a round waits.
    timeout: Option<Duration>,
    close_on_quorum: bool,
    /// External clients: when the open round closes.
    deadline: Option<Instant>,
    /// Rounds closed so far (the last one's number).
    closed: u64,
    /// Why the open round failed, if it did (secure aggregation).
    failure: Option<String>,
    /// Whether client health comes from node health (then no eligible client means wait).
    live_health: bool,
    /// When a round waiting for an eligible client tries again.
    retry_at: Option<Instant>,
    /// Secure aggregation with external clients: its settings, and the open round's steps.
    secure: Option<SecureAggregation>,
    secure_round: Option<ServerRound>,
    /// The open round's plan, repeated with each of its secure-aggregation steps.
    open_plan: Option<PlanMessage>,
    /// External clients in a run that takes checkpoints: the updates offered since the open
    /// round opened, in order (a checkpoint keeps them: the sources resume after them).
    offered: Vec<ModelUpdate>,
    /// Whether to keep `offered` (the run takes checkpoints).
    keep_offered: bool,
}

/// Training is over: the coordinator's capability goes, unless the run takes checkpoints;
/// then it stays at the end of time until the last checkpoint (at the end of time) is
/// complete, so that neither the coordinator nor the operators after it are retired before
/// they have saved it. Returns the capability kept.
/// A loop that drives time (`drives`) proposes checkpoints after its last output from now on.
fn retire(
    held: &mut Option<Capability<EventTime>>,
    state: &StateHandle,
    drives: bool,
) -> Option<Capability<EventTime>> {
    if let Some(cap) = held.as_ref().filter(|_| drives) {
        state.propose(cap.time().saturating_add(1));
        state.stop_driving();
    }
    let mut cap = held.take().filter(|_| state.checkpointing())?;
    cap.downgrade(&EventTime::MAX);
    Some(cap)
}

/// A federated operator's state in a checkpoint (see [`Driver::saved`]).
#[derive(Serialize, Deserialize)]
struct SavedTraining {
    coordinator: CoordinatorSnapshot,
    closed: u64,
    over: bool,
    /// External clients: the updates offered to the open round (JSON), in order.
    offered: Vec<String>,
}

/// What opening a round gave.
enum Opened {
    /// The plan of the new round.
    Plan(Box<CoordinatorOut>),
    /// No client is eligible yet.
    Wait,
    /// Training is over.
    Over,
}

/// How often a round waiting for an eligible client tries again.
const RETRY_SELECTION: Duration = Duration::from_secs(1);

impl Driver {
    /// The coordinator's side of operator `name`, training `model_shape` over the clients
    /// `infos`, measured on `test`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        config: &FederatedConfig,
        test: Dataset,
        model_shape: Softmax,
        infos: Vec<ClientInfo>,
        name: &str,
        metrics: &FederatedMetrics,
        output: Box<dyn RoundsOutput>,
        external: bool,
        live_health: bool,
    ) -> Self {
        Self {
            coordinator: Coordinator::new(config.coordinator(), vec![0.0; model_shape.parameters()]),
            output,
            finished: false,
            gauges: FederatedGauges::new(metrics, name),
            test,
            model_shape,
            infos,
            operator: name.to_owned(),
            rounds: config.rounds,
            timeout: external.then(|| Duration::from_millis(config.round_timeout.as_millis())),
            close_on_quorum: config.close_on_quorum,
            deadline: None,
            closed: 0,
            failure: None,
            live_health,
            retry_at: None,
            secure: config.secure_aggregation.clone().filter(|_| external),
            secure_round: None,
            open_plan: None,
            offered: Vec::new(),
            keep_offered: false,
        }
    }

    /// Opens the next round and returns its plan; or says to wait (no client is eligible now,
    /// and live health may change that); or says training is over (the last round closed,
    /// or no round can start), and then exports the model.
    fn open(&mut self) -> Opened {
        if self.closed >= self.rounds {
            self.finish();
            return Opened::Over;
        }
        match self.coordinator.plan(&self.infos) {
            Ok(plan) => {
                self.retry_at = None;
                self.offered.clear();
                let deadline = self.timeout.map(|timeout| {
                    // Checked: a timeout of centuries means no deadline, not a panic.
                    self.deadline = Instant::now().checked_add(timeout);
                    wall_clock_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
                });
                let model = self.coordinator.model().to_vec();
                let secure = self.secure.as_ref().zip(self.timeout).map(|(secure, timeout)| {
                    // Each of the four steps may take a quarter of the round.
                    let threshold = secure.shares_needed(plan.clients.len());
                    let parameters = model.len() + 2;
                    let equal_weights = self.coordinator.central_dp();
                    ServerRound::new(plan.round, &plan.clients, threshold, parameters, equal_weights, timeout / 4)
                });
                let step = secure.as_ref().map(ServerRound::plan_step);
                self.secure_round = secure;
                let message = PlanMessage { plan, model, deadline, secure: step };
                self.open_plan = self.secure.is_some().then(|| message.clone());
                Opened::Plan(Box::new(CoordinatorOut::Plan(message)))
            }
            Err(PlanError::NoneEligible(reason)) if self.live_health => {
                if self.retry_at.is_none() {
                    tracing::info!(operator = %self.operator, round = self.closed + 1, %reason, "waiting for eligible clients");
                }
                self.retry_at = Some(Instant::now() + RETRY_SELECTION);
                Opened::Wait
            }
            Err(reason) => {
                tracing::warn!(operator = %self.operator, round = self.closed + 1, %reason, "federated training stops");
                self.finish();
                Opened::Over
            }
        }
    }

    /// Takes in a health report of a client (an edge node of the same id).
    fn observe(&mut self, report: ClientHealth) {
        let (id, update): (&str, &dyn Fn(&mut ClientInfo)) = match &report {
            ClientHealth::Status { node, status } => (node, &|info| info.status = *status),
            ClientHealth::Load { node, cpu, memory } => (node, &|info| {
                info.cpu = *cpu;
                info.memory = *memory;
            }),
        };
        if let Some(info) = self.infos.iter_mut().find(|info| info.id == id) {
            update(info);
        }
    }

    /// External clients: takes in an update (offered to the open round, and kept for
    /// checkpoints) or a health report.
    fn take_in(&mut self, message: ClientMessage) -> Option<CoordinatorOut> {
        match message {
            ClientMessage::Update(update) => {
                let refused = self.offer(&update);
                if self.keep_offered && self.secure.is_none() {
                    self.offered.push(update);
                }
                refused
            }
            ClientMessage::Health(report) => {
                self.observe(report);
                None
            }
            _ => None,
        }
    }

    /// Offers `update` to the open round; a refused one comes back as a dead letter.
    fn offer(&mut self, update: &ModelUpdate) -> Option<CoordinatorOut> {
        if self.secure.is_some() {
            let open = self.coordinator.open_round();
            let result = match (ClientStep::from_update(update), self.secure_round.as_mut()) {
                (Some(Ok(step)), Some(round)) if open == Some(update.round) => {
                    round.receive(&update.client_id, step).map_err(|err| err.to_string())
                }
                (Some(Ok(_)), _) => Err(format!(
                    "secure-aggregation step from `{}` for round {}: that round is not open",
                    update.client_id, update.round
                )),
                (Some(Err(reason)), _) => Err(format!("from `{}`: {reason}", update.client_id)),
                (None, _) => Err(format!(
                    "update from `{}` for round {}: the rounds use secure aggregation; send its steps (payload format `{}`), not an update in the clear",
                    update.client_id,
                    update.round,
                    crate::federated::secure_protocol::SECAGG_FORMAT
                )),
            };
            return result.err().map(|reason| self.reject(update, reason));
        }
        match self.coordinator.offer(update) {
            Ok(()) => {
                self.gauges.accepted.inc();
                None
            }
            Err(reason) => Some(self.reject(update, reason.to_string())),
        }
    }

    /// Secure aggregation: unmasks the sum of the round's masked updates and folds it in. Too
    /// few survivors fail the round (it keeps the model), with the reason in its report.
    fn offer_secure(&mut self, answers: Vec<ClientMessage>, secure: &SecureAggregation) {
        let mut announced = Vec::new();
        let mut masked = BTreeMap::new();
        let mut clients = Vec::new();
        let mut reveals = Vec::new();
        for message in answers {
            match message {
                ClientMessage::Announce { index, public } => {
                    announced.push(Announcement::from_bytes(index, public));
                }
                ClientMessage::Masked { index, client, masked: values } => {
                    masked.insert(index, values);
                    clients.push(client);
                }
                ClientMessage::Reveal(reveal) => reveals.push(reveal),
                ClientMessage::Update(_) | ClientMessage::Health(_) => {}
            }
        }
        if masked.is_empty() {
            return;
        }
        announced.sort_by_key(|a| a.client);
        reveals.sort_by_key(|r| r.from);
        clients.sort();
        let threshold = secure.shares_needed(announced.len());
        let round = self.coordinator.open_round().unwrap_or_default();
        let result = unmask(round, &announced, &masked, &reveals, threshold).map_err(|err| err.to_string()).and_then(
            |mut sum| {
                let loss = sum.pop().map(|total| f64::from(total) / clients.len() as f64);
                let weight = sum.pop().map_or(0.0, f64::from);
                self.coordinator.offer_secure_sum(&sum, weight, &clients, loss).map_err(|err| err.to_string())
            },
        );
        match result {
            Ok(()) => {
                self.gauges.accepted.inc_by(clients.len() as u64);
            }
            Err(reason) => {
                tracing::warn!(operator = %self.operator, %reason, "secure aggregation failed; the round keeps the model");
                self.failure = Some(reason);
            }
        }
    }

    fn reject(&mut self, update: &ModelUpdate, reason: String) -> CoordinatorOut {
        self.gauges.rejected.inc();
        let letter = DeadLetter {
            source: self.operator.clone(),
            position: format!("round {} client {}", update.round, update.client_id),
            reason,
            payload: serde_json::to_vec(update).unwrap_or_default(),
        };
        CoordinatorOut::Rejected(letter, update.round)
    }

    /// Secure aggregation with external clients: moves the open round's steps on (when a
    /// step is complete or timed out; `ended`: no more messages will come); returns the
    /// steps to publish. When the round is over its sum is folded in, or its failure kept.
    fn secure_tick(&mut self, ended: bool) -> Vec<CoordinatorOut> {
        let mut out = Vec::new();
        loop {
            let Some(round) = self.secure_round.as_mut() else { return out };
            match round.advance(Instant::now(), ended) {
                Advance::Wait => return out,
                Advance::Publish(step) => {
                    if let Some(plan) = &self.open_plan {
                        let mut message = plan.clone();
                        message.secure = Some(step);
                        out.push(CoordinatorOut::Plan(message));
                    }
                }
                Advance::Done(result) => {
                    self.secure_round = None;
                    let result = result.map_err(|err| err.to_string()).and_then(|(mut sum, clients)| {
                        let loss = sum.pop().map(|total| f64::from(total) / clients.len().max(1) as f64);
                        let weight = sum.pop().map_or(0.0, f64::from);
                        self.coordinator
                            .offer_secure_sum(&sum, weight, &clients, loss)
                            .map(|()| clients.len())
                            .map_err(|err| err.to_string())
                    });
                    match result {
                        Ok(clients) => {
                            self.gauges.accepted.inc_by(clients as u64);
                        }
                        Err(reason) => {
                            tracing::warn!(operator = %self.operator, %reason, "secure aggregation failed; the round keeps the model");
                            self.failure = Some(reason);
                        }
                    }
                    return out;
                }
            }
        }
    }

    /// When the operator must look at the round again (a step's or the round's deadline).
    fn wake_at(&self) -> Option<Instant> {
        let step = self.secure_round.as_ref().map(ServerRound::deadline);
        [step, self.deadline, self.retry_at].into_iter().flatten().min()
    }

    /// External clients: whether the open round should close now.
    fn due(&self) -> bool {
        if self.secure.is_some() {
            // The steps decide; the round's own deadline is a backstop.
            return self.secure_round.is_none() || self.deadline.is_some_and(|deadline| Instant::now() >= deadline);
        }
        self.coordinator.all_answered()
            || (self.close_on_quorum && self.coordinator.quorum_reached())
            || self.deadline.is_some_and(|deadline| Instant::now() >= deadline)
    }

    /// Closes round `round`: measures the new model, writes the CSV line, and returns the
    /// model and the report.
    fn close(&mut self, round: u64) -> Vec<CoordinatorOut> {
        self.deadline = None;
        self.offered.clear();
        if self.secure_round.take().is_some() {
            self.failure
                .get_or_insert_with(|| format!("secure aggregation failed in round {round}: the round's time ran out"));
        }
        self.open_plan = None;
        self.closed = round;
        let summary = match self.coordinator.close() {
            Ok(summary) => summary,
            Err(reason) => {
                tracing::error!(operator = %self.operator, round, %reason, "federated round failed");
                return Vec::new();
            }
        };
        let (test_loss, test_accuracy) = self.model_shape.evaluate(self.coordinator.model(), &self.test);
        self.gauges.observe(&summary, test_accuracy);
        tracing::info!(operator = %self.operator, round, accuracy = test_accuracy, accepted = summary.accepted, "federated round closed");
        self.output.round_closed(&summary, test_loss, test_accuracy);
        vec![
            CoordinatorOut::Model(GlobalModel {
                round,
                version: summary.model_version,
                payload: Payload::encode(self.coordinator.model()),
            }),
            CoordinatorOut::Report(RoundReport::new(summary, test_loss, test_accuracy, self.failure.take())),
        ]
    }

    /// What a checkpoint keeps: the coordinator (between rounds, or with external clients
    /// the updates offered to the open round), the rounds closed, and whether training is
    /// over.
    fn saved(&self) -> SavedTraining {
        SavedTraining {
            coordinator: self.coordinator.snapshot(),
            closed: self.closed,
            over: self.finished,
            offered: self.offered.iter().filter_map(|update| serde_json::to_string(update).ok()).collect(),
        }
    }

    /// Takes up saved training: the plan to send the clients again if a round is open.
    fn restore(&mut self, saved: SavedTraining) -> Option<PlanMessage> {
        self.closed = saved.closed;
        self.finished = saved.over;
        self.coordinator.restore(saved.coordinator);
        self.gauges.round.set(self.closed as i64);
        self.output.restored(self.closed);
        // The open round's updates again, in their order; the clients' refusals went out
        // before the checkpoint. The round's time starts again.
        for json in saved.offered {
            match serde_json::from_str::<ModelUpdate>(&json) {
                Ok(update) => {
                    self.offer(&update);
                    self.offered.push(update);
                }
                Err(err) => {
                    tracing::error!(operator = %self.operator, %err, "a saved update does not decode; it is left out")
                }
            }
        }
        if self.coordinator.open_round().is_some() {
            self.deadline = self.timeout.and_then(|timeout| Instant::now().checked_add(timeout));
        }
        let plan = self.coordinator.open_plan()?;
        Some(PlanMessage { plan, model: self.coordinator.model().to_vec(), deadline: None, secure: None })
    }

    /// Training is over: the final model goes to the output (once).
    fn finish(&mut self) {
        if !std::mem::replace(&mut self.finished, true) {
            self.output.finished(&self.model_shape, &self.coordinator);
        }
    }
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
    fn new(metrics: &FederatedMetrics, operator: &str) -> Self {
        let labels = labels::Operator { operator: operator.to_owned() };
        let f = metrics;
        // One family lookup per statement: a lookup's read guard lives to the statement's
        // end, and a second lookup that creates would wait on it forever.
        let outcome = |outcome| {
            let labels = labels::OperatorOutcome { operator: operator.to_owned(), outcome };
            let counter = f.updates.get_or_create(&labels).clone();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_external_round_closes_on_quorum_only_when_asked() {
        let dataset = concat!(env!("CARGO_MANIFEST_DIR"), "/../pipelines/data/digits.csv");
        for close_on_quorum in [false, true] {
            let config: FederatedConfig = serde_json::from_value(serde_json::json!({
                "dataset": dataset, "clients_per_round": 5, "quorum": 0.6,
                "close_on_quorum": close_on_quorum, "round_timeout": "1h",
            }))
            .unwrap();
            let text = std::fs::read_to_string(&config.dataset).unwrap();
            let data = FederatedData::split(&Dataset::parse_csv(&text, config.feature_scale).unwrap(), &config);
            let infos = data.fleet.infos();
            let metrics = FederatedMetrics::default();
            let shape = data.fleet.model;
            let mut driver =
                Driver::new(&config, data.test, shape, infos, "train", &metrics, Box::new(()), true, false);
            let Opened::Plan(plan) = driver.open() else { panic!("no plan") };
            let CoordinatorOut::Plan(message) = *plan else { panic!("no plan") };
            let mut send = |client: &String| {
                let update = data.fleet.train(&message.plan, &message.model, client).unwrap();
                assert!(driver.offer(&update).is_none(), "accepted");
                driver.due()
            };
            let due: Vec<bool> = message.plan.clients.iter().map(&mut send).collect();
            // 3 of 5 is the quorum (0.6); all 5 close the round either way; the deadline is
            // an hour away.
            assert_eq!(due, vec![false, false, close_on_quorum, close_on_quorum, true]);
        }
    }
}

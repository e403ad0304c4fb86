//! The round coordinator: selects clients, publishes the round plan, checks and folds in
//! updates, closes the round and moves the global model, with central or local differential
//! privacy and a privacy budget.
//!
//! This is the round logic on its own (rounds in, plans and models out); the dataflow runs it
//! with rounds as logical times. Stragglers: an update for a round that has closed is
//! rejected with the reason `round R is closed` (counted as a dead letter), never folded into
//! a later round, since it was trained from an older model.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::{ChaCha20Rng, ChaCha8Rng};
use serde::{Deserialize, Serialize};

use super::aggregate::{RoundAggregate, ServerOptimizer, Strategy};
use super::learn::LocalTraining;
use super::privacy::{clip_l2, Accountant, AdaptiveClip, DiscreteNoise, Noise};
use super::update::{ModelUpdate, RoundRules, UpdateCheck, UpdateError, UpdateProblem};
use crate::records::HealthStatus;

/// How clients are picked for a round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "selection", rename_all = "snake_case", deny_unknown_fields)]
pub enum Selection {
    /// Uniformly at random among the known clients, seeded per round.
    Uniform {
        /// Seed (default 0).
        #[serde(default)]
        seed: u64,
    },
    /// Uniformly among Healthy clients with at least the given free CPU and memory (percent).
    ResourceAware {
        /// Free CPU needed, percent (default 20).
        #[serde(default = "twenty")]
        min_free_cpu: f64,
        /// Free memory needed, percent (default 20).
        #[serde(default = "twenty")]
        min_free_memory: f64,
        /// Seed (default 0).
        #[serde(default)]
        seed: u64,
    },
    /// Those who took part least so far (ties in id order): every client in turn.
    RoundRobin,
    /// Exactly these clients.
    List {
        /// Client ids.
        clients: Vec<String>,
    },
}

fn twenty() -> f64 {
    20.0
}

/// What the coordinator knows of a client when selecting.
#[derive(Clone, Debug, PartialEq)]
pub struct ClientInfo {
    /// Client (edge node) id.
    pub id: String,
    /// Its health.
    pub status: HealthStatus,
    /// CPU use, percent.
    pub cpu: f64,
    /// Memory use, percent.
    pub memory: f64,
}

/// Differential privacy of the rounds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpConfig {
    /// `central` (noise on the aggregate, accounted) or `local` (noise added by each client).
    pub mode: DpMode,
    /// L2 clipping norm of each update.
    pub clip_norm: f64,
    /// Noise std over the clipping norm.
    pub noise_multiplier: f64,
    /// Total ε allowed (central mode): a round that would exceed it is refused.
    #[serde(default = "default_budget")]
    pub epsilon_budget: f64,
    /// δ of the guarantee (default 1e-5).
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// Adaptive clipping toward this quantile of update norms (Andrew et al.), if set.
    #[serde(default)]
    pub adaptive_quantile: Option<f64>,
    /// `gaussian` (default; std `noise_multiplier * C`, RDP-accounted) or `laplace` (scale
    /// `noise_multiplier * C * sqrt(parameters)`, an L1 bound of a clipped update: each round
    /// is pure (1 / noise_multiplier)-DP, rounds composed by adding, no credit for sampling).
    #[serde(default)]
    pub noise: Noise,
    /// INSECURE, for reproducible tests only: seed the privacy noise and the clipping
    /// randomness from this number instead of the operating system's generator. Anyone who
    /// knows the seed can regenerate the noise and subtract it, which removes the privacy;
    /// a run with it set logs a warning. Default: unset (randomness from the operating
    /// system).
    #[serde(default)]
    pub insecure_noise_seed: Option<u64>,
}

fn default_budget() -> f64 {
    f64::INFINITY
}
fn default_delta() -> f64 {
    1e-5
}

/// Where DP noise is added.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DpMode {
    /// On the aggregate, by the server.
    Central,
    /// On each update, by its client.
    Local,
}

/// The coordinator's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct CoordinatorConfig {
    /// Aggregation strategy.
    pub strategy: Strategy,
    /// Client selection.
    pub selection: Selection,
    /// Clients per round.
    pub clients_per_round: usize,
    /// Fraction of the selected clients whose updates close the round early.
    pub quorum: f64,
    /// Updates with a larger L2 norm are rejected (before clipping).
    pub max_norm: Option<f64>,
    /// Local training the clients are asked to do.
    pub local: LocalTraining,
    /// Differential privacy.
    pub dp: Option<DpConfig>,
}

/// What the clients of a round are told.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundPlan {
    /// Round number, from 1.
    pub round: u64,
    /// Selected client ids.
    pub clients: Vec<String>,
    /// The global model version to train from.
    pub model_version: u64,
    /// Local training settings (FedProx `mu` included).
    pub local: LocalTraining,
    /// Clip updates to this L2 norm (DP), if set.
    pub clip_norm: Option<f64>,
    /// Local DP: add Gaussian noise of this std to the clipped update, if set.
    pub local_noise_std: Option<f64>,
    /// Local DP with Laplace noise: add Laplace noise of this scale instead, if set.
    pub local_laplace_scale: Option<f64>,
}

/// A round plan as its clients receive it (the `plans` output of the `federated` operator),
/// one JSON object per line:
///
/// ```json
/// {"round":4,"clients":["client-03","client-11"],"model_version":3,
///  "local":{"epochs":1,"batch_size":16,"learning_rate":0.1,"mu":0.0},
///  "clip_norm":null,"local_noise_std":null,"local_laplace_scale":null,
///  "deadline":1700000060000,
///  "model":{"format":"f32le+zstd","parameters":650,"data":"KLUv/QBY..."}}
/// ```
///
/// A selected client trains from `model` (the global model of version `model_version`, in
/// the update payload format) and sends a [`ModelUpdate`] for
/// `round` with `base_version` = `model_version` before `deadline` (ms since the epoch; null
/// for simulated clients, which answer within the round's logical time).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanRecord {
    /// The plan (its fields at the top level of the record).
    #[serde(flatten)]
    pub plan: RoundPlan,
    /// When the round closes, ms since the epoch (external clients).
    pub deadline: Option<u64>,
    /// The global model.
    pub model: super::update::Payload,
    /// Secure aggregation with external clients: the step this record opens (`null`
    /// otherwise). Every step's record repeats the plan and the model.
    #[serde(default)]
    pub secure_aggregation: Option<super::secure_protocol::ServerStep>,
}

impl PlanRecord {
    /// The record of `plan`, training from `model`.
    pub fn new(plan: &RoundPlan, deadline: Option<u64>, model: &[f32]) -> Self {
        Self { plan: plan.clone(), deadline, model: super::update::Payload::encode(model), secure_aggregation: None }
    }
}

/// What a closed round produced.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    /// The round.
    pub round: u64,
    /// The new global model version.
    pub model_version: u64,
    /// Updates folded in.
    pub accepted: usize,
    /// Clients selected.
    pub selected: usize,
    /// Mean client training loss reported.
    pub client_loss: Option<f64>,
    /// ε spent so far (central DP).
    pub epsilon: Option<f64>,
    /// Clip norm used (DP).
    pub clip_norm: Option<f64>,
    /// Updates rejected in the round (each with its reason elsewhere).
    pub rejected: usize,
    /// Whether the quorum was met; if not, the model did not move.
    pub quorum_met: bool,
}

struct OpenRound {
    plan: RoundPlan,
    check: UpdateCheck,
    aggregate: RoundAggregate,
    /// Central DP: the sum of clipped updates.
    dp_sum: Option<Vec<f64>>,
    unclipped: usize,
    losses: Vec<f64>,
    rejected: usize,
    /// Selected clients that sent an update for the round, accepted or not.
    answered: std::collections::BTreeSet<String>,
}

/// What a checkpoint keeps of a [`Coordinator`] (see [`Coordinator::snapshot`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordinatorSnapshot {
    round: u64,
    version: u64,
    model: Vec<f32>,
    moments: (Vec<f64>, Vec<f64>),
    spent: Option<(Vec<f64>, u64, f64)>,
    clip: Option<f64>,
    participation: BTreeMap<String, u64>,
    open: Option<RoundPlan>,
}

impl CoordinatorSnapshot {
    /// The round it was taken in (the open one, or the last closed).
    pub fn round(&self) -> u64 {
        self.round
    }
}

/// Why no round could start.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// No known client meets the selection (for now: live health may change that).
    #[error("{0}")]
    NoneEligible(String),
    /// The next round would exceed the privacy budget.
    #[error("{0}")]
    Budget(String),
}

/// The coordinator of one training run.
pub struct Coordinator {
    config: CoordinatorConfig,
    round: u64,
    version: u64,
    model: Vec<f32>,
    server: ServerOptimizer,
    accountant: Option<Accountant>,
    adaptive: Option<AdaptiveClip>,
    participation: BTreeMap<String, u64>,
    open: Option<OpenRound>,
    /// The privacy noise's generator: ChaCha20 keyed from the operating system (or from the
    /// insecure test seed).
    rng: ChaCha20Rng,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("round", &self.round)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Why the coordinator refused an update, a secure sum or a close.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RoundError {
    /// An update the round refuses.
    #[error(transparent)]
    Update(#[from] UpdateError),
    /// No round is open.
    #[error("no round is open")]
    NoOpenRound,
    /// A secure sum with a value that is not finite.
    #[error("the secure sum has a non-finite value: a client sent a broken update")]
    NonFiniteSum,
    /// A secure sum longer than its clients' clipped updates can be.
    #[error("the secure sum's norm {norm:.4} exceeds {bound:.4} (total weight {weight} times clip_norm {clip}): a client did not clip its update")]
    SumTooLong {
        /// Its norm.
        norm: f64,
        /// The most it can be.
        bound: f64,
        /// The clients' total weight.
        weight: f64,
        /// The round's clip norm.
        clip: f64,
    },
    /// A secure sum over a client that was not selected.
    #[error("secure sum includes `{client}`, who was not selected")]
    NotSelected {
        /// The client.
        client: String,
    },
    /// The aggregate refused the values.
    #[error(transparent)]
    Aggregate(#[from] super::aggregate::AggregateError),
    /// The round's aggregate could not be finished.
    #[error("round {round}: {source}")]
    Finish {
        /// The round.
        round: u64,
        /// Why.
        source: super::aggregate::AggregateError,
    },
}

impl Coordinator {
    /// A coordinator starting from `model` (version 0).
    pub fn new(config: CoordinatorConfig, model: Vec<f32>) -> Self {
        let accountant = config
            .dp
            .as_ref()
            .filter(|dp| dp.mode == DpMode::Central)
            .map(|dp| Accountant::new(dp.epsilon_budget, dp.delta));
        let adaptive = config.dp.as_ref().and_then(|dp| {
            dp.adaptive_quantile.map(|quantile| AdaptiveClip {
                clip: dp.clip_norm,
                target_quantile: quantile,
                learning_rate: 0.2,
                count_noise: config.clients_per_round as f64 / 20.0,
            })
        });
        let server = ServerOptimizer::new(config.strategy, model.len());
        let rng = noise_rng(config.dp.as_ref().and_then(|dp| dp.insecure_noise_seed));
        Self {
            config,
            round: 0,
            version: 0,
            model,
            server,
            accountant,
            adaptive,
            participation: BTreeMap::new(),
            open: None,
            rng,
        }
    }

    /// The global model.
    pub fn model(&self) -> &[f32] {
        &self.model
    }

    /// Its version (the number of rounds closed).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether noise is added centrally (then every client's update weighs the same).
    pub fn central_dp(&self) -> bool {
        self.config.dp.as_ref().is_some_and(|dp| dp.mode == DpMode::Central)
    }

    /// ε spent so far (central DP).
    pub fn epsilon(&self) -> Option<f64> {
        self.accountant.as_ref().map(Accountant::spent)
    }

    fn clip_norm(&self) -> Option<f64> {
        self.adaptive.as_ref().map(|a| a.clip).or_else(|| self.config.dp.as_ref().map(|dp| dp.clip_norm))
    }

    /// Opens the next round over `fleet`: selects its clients and returns the plan, or says
    /// why no round can start (no eligible client, or the privacy budget would be exceeded).
    pub fn plan(&mut self, fleet: &[ClientInfo]) -> Result<RoundPlan, PlanError> {
        let round = self.round + 1;
        let k = self.config.clients_per_round;
        let mut chosen: Vec<String> = match &self.config.selection {
            Selection::Uniform { seed } => {
                let mut ids: Vec<String> = fleet.iter().map(|c| c.id.clone()).collect();
                ids.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ round.wrapping_mul(0x9e37_79b9)));
                ids.truncate(k);
                ids
            }
            Selection::ResourceAware { min_free_cpu, min_free_memory, seed } => {
                let mut ids: Vec<String> = fleet
                    .iter()
                    .filter(|c| {
                        c.status == HealthStatus::Healthy
                            && 100.0 - c.cpu >= *min_free_cpu
                            && 100.0 - c.memory >= *min_free_memory
                    })
                    .map(|c| c.id.clone())
                    .collect();
                ids.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ round.wrapping_mul(0x9e37_79b9)));
                ids.truncate(k);
                ids
            }
            Selection::RoundRobin => {
                let mut ids: Vec<(u64, String)> =
                    fleet.iter().map(|c| (self.participation.get(&c.id).copied().unwrap_or(0), c.id.clone())).collect();
                ids.sort();
                ids.into_iter().take(k).map(|(_, id)| id).collect()
            }
            Selection::List { clients } => clients.clone(),
        };
        chosen.sort();
        if chosen.is_empty() {
            return Err(PlanError::NoneEligible(format!(
                "round {round}: no client is eligible ({} known)",
                fleet.len()
            )));
        }
        if let (Some(accountant), Some(dp)) = (self.accountant.as_mut(), self.config.dp.as_ref()) {
            let q = (chosen.len() as f64 / fleet.len().max(1) as f64).min(1.0);
            let spent = match dp.noise {
                Noise::Gaussian => accountant.spend(q, dp.noise_multiplier),
                Noise::Laplace => accountant.spend_pure(1.0 / dp.noise_multiplier),
            };
            spent.map_err(|reason| PlanError::Budget(format!("privacy budget: {reason}")))?;
        }
        for id in &chosen {
            *self.participation.entry(id.clone()).or_default() += 1;
        }
        let clip_norm = self.clip_norm();
        let local = self.config.dp.as_ref().filter(|dp| dp.mode == DpMode::Local);
        let parameters = self.model.len() as f64;
        let local_noise_std =
            local.filter(|dp| dp.noise == Noise::Gaussian).and_then(|dp| clip_norm.map(|c| dp.noise_multiplier * c));
        let local_laplace_scale = local
            .filter(|dp| dp.noise == Noise::Laplace)
            .and_then(|dp| clip_norm.map(|c| dp.noise_multiplier * c * parameters.sqrt()));
        let plan = RoundPlan {
            round,
            clients: chosen.clone(),
            model_version: self.version,
            local: self.config.local,
            clip_norm,
            local_noise_std,
            local_laplace_scale,
        };
        self.open = Some(self.open_round_for(plan.clone()));
        self.round = round;
        Ok(plan)
    }

    /// The open state of a round whose plan is `plan` (no update in yet).
    fn open_round_for(&self, plan: RoundPlan) -> OpenRound {
        let rules = RoundRules {
            round: plan.round,
            base_version: self.version,
            parameters: self.model.len(),
            selected: plan.clients.iter().cloned().collect(),
            max_norm: self.config.max_norm,
        };
        let central = self.config.dp.as_ref().is_some_and(|dp| dp.mode == DpMode::Central);
        OpenRound {
            check: UpdateCheck::new(rules),
            aggregate: RoundAggregate::new(self.config.strategy, self.model.len()),
            dp_sum: central.then(|| vec![0.0; self.model.len()]),
            unclipped: 0,
            losses: Vec::new(),
            rejected: 0,
            answered: Default::default(),
            plan,
        }
    }

    /// What a checkpoint keeps of the coordinator, taken while no update of the open round
    /// is in (between rounds).
    pub fn snapshot(&self) -> CoordinatorSnapshot {
        CoordinatorSnapshot {
            round: self.round,
            version: self.version,
            model: self.model.clone(),
            moments: self.server.moments(),
            spent: self.accountant.as_ref().map(Accountant::spent_state),
            clip: self.adaptive.as_ref().map(|adaptive| adaptive.clip),
            participation: self.participation.clone(),
            open: self.open.as_ref().map(|open| open.plan.clone()),
        }
    }

    /// Takes up where `snapshot` was: the model, optimiser state, privacy spent, clip norm,
    /// participation, and the open round again (no update in). The privacy noise's
    /// generator is keyed afresh (from the operating system; with the insecure test seed,
    /// from the seed and the round): its state is never written to disk, where it would tell
    /// the noise.
    pub fn restore(&mut self, snapshot: CoordinatorSnapshot) {
        self.round = snapshot.round;
        self.version = snapshot.version;
        if snapshot.model.len() == self.model.len() {
            self.model = snapshot.model;
        }
        self.server.restore_moments(snapshot.moments);
        if let (Some(accountant), Some(spent)) = (self.accountant.as_mut(), snapshot.spent) {
            accountant.restore_spent(spent);
        }
        if let (Some(adaptive), Some(clip)) = (self.adaptive.as_mut(), snapshot.clip) {
            adaptive.clip = clip;
        }
        self.participation = snapshot.participation;
        self.open = snapshot.open.map(|plan| self.open_round_for(plan));
        let seed = self.config.dp.as_ref().and_then(|dp| dp.insecure_noise_seed);
        self.rng = noise_rng(seed.map(|seed| seed ^ self.round.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    }

    /// Offers an update to the open round: folded in, or rejected with the reason.
    pub fn offer(&mut self, update: &ModelUpdate) -> Result<(), RoundError> {
        let closed = || UpdateError {
            client: update.client_id.clone(),
            round: update.round,
            problem: UpdateProblem::Closed(update.round),
        };
        let Some(open) = self.open.as_mut() else {
            return Err(closed().into());
        };
        if update.round < open.plan.round {
            return Err(closed().into());
        }
        if update.round == open.plan.round && open.plan.clients.contains(&update.client_id) {
            open.answered.insert(update.client_id.clone());
        }
        let mut values = match open.check.accept(update) {
            Ok(values) => values,
            Err(reason) => {
                open.rejected += 1;
                return Err(reason.into());
            }
        };
        if let Some(loss) = update.metrics.loss {
            open.losses.push(loss);
        }
        if let Some(clip) = open.plan.clip_norm {
            if clip_l2(&mut values, clip) <= clip {
                open.unclipped += 1;
            }
        }
        match open.dp_sum.as_mut() {
            Some(sum) => {
                for (s, v) in sum.iter_mut().zip(&values) {
                    *s += f64::from(*v);
                }
                // Counted for quorum; DP rounds aggregate with equal weights.
                open.aggregate.add(&values, 1)?;
            }
            None => open.aggregate.add(&values, update.num_examples)?,
        }
        Ok(())
    }

    /// Folds in the unmasked sum of a secure-aggregation round: `sum` is the sum over
    /// `clients` (those whose masked updates were summed) of each one's clipped delta times
    /// its weight, `weight` the total weight (examples, or 1 per client under central DP),
    /// `loss` their mean training loss. The server never sees a single update, so the
    /// per-update checks cannot run: clients clip before masking.
    pub fn offer_secure_sum(
        &mut self,
        sum: &[f32],
        weight: f64,
        clients: &[String],
        loss: Option<f64>,
    ) -> Result<(), RoundError> {
        let open = self.open.as_mut().ok_or(RoundError::NoOpenRound)?;
        // The server cannot check one update, but it can check their sum: with clipping, each
        // client's weighted update is at most `weight * clip` long, so the sum is at most
        // `total weight * clip` (plus the fixed point's rounding). A longer or non-finite sum
        // means a client did not clip: the round keeps the model.
        if sum.iter().any(|v| !v.is_finite()) {
            return Err(RoundError::NonFiniteSum);
        }
        if let Some(clip) = open.plan.clip_norm {
            let norm = super::privacy::l2_norm(sum);
            let bound = weight * clip * (1.0 + 1e-6) + 1e-3;
            if norm > bound {
                return Err(RoundError::SumTooLong { norm, bound, weight, clip });
            }
        }
        for client in clients {
            if !open.plan.clients.contains(client) {
                return Err(RoundError::NotSelected { client: client.clone() });
            }
            open.answered.insert(client.clone());
        }
        if let Some(loss) = loss {
            open.losses.push(loss);
        }
        if let Some(dp_sum) = open.dp_sum.as_mut() {
            for (s, v) in dp_sum.iter_mut().zip(sum) {
                *s += f64::from(*v);
            }
        }
        Ok(open.aggregate.add_sum(sum, weight, clients.len())?)
    }

    /// Whether the open round has its quorum of updates.
    pub fn quorum_reached(&self) -> bool {
        self.open.as_ref().is_some_and(|open| {
            open.aggregate.count() as f64 >= (self.config.quorum * open.plan.clients.len() as f64).ceil()
        })
    }

    /// Whether every client selected for the open round has sent an update (accepted or
    /// rejected): nothing more is to be waited for.
    pub fn all_answered(&self) -> bool {
        self.open.as_ref().is_some_and(|open| open.answered.len() == open.plan.clients.len())
    }

    /// The open round's plan, if a round is open.
    pub fn open_plan(&self) -> Option<RoundPlan> {
        self.open.as_ref().map(|open| open.plan.clone())
    }

    /// The open round, if any.
    pub fn open_round(&self) -> Option<u64> {
        self.open.as_ref().map(|open| open.plan.round)
    }

    /// Closes the open round (on quorum or at its deadline) and moves the global model.
    pub fn close(&mut self) -> Result<RoundSummary, RoundError> {
        let open = self.open.take().ok_or(RoundError::NoOpenRound)?;
        let round = open.plan.round;
        let accepted = open.aggregate.count();
        let needed = (self.config.quorum * open.plan.clients.len() as f64).ceil() as usize;
        let client_loss = (!open.losses.is_empty()).then(|| open.losses.iter().sum::<f64>() / open.losses.len() as f64);
        let (selected, clip_norm, rejected) = (open.plan.clients.len(), open.plan.clip_norm, open.rejected);
        let summary = |coordinator: &Self, quorum_met| RoundSummary {
            round,
            model_version: coordinator.version,
            accepted,
            selected,
            client_loss,
            epsilon: coordinator.epsilon(),
            clip_norm,
            rejected,
            quorum_met,
        };
        if accepted == 0 || accepted < needed {
            // Below quorum: the round counts as failed and the model stays.
            return Ok(summary(self, false));
        }
        let delta = match (open.dp_sum, self.config.dp.as_ref()) {
            (Some(sum), Some(dp)) => {
                // Central DP: Gaussian noise of std sigma * C on the sum of clipped updates,
                // divided by the number of clients asked (fixed, so one client changes the
                // result by at most C / k).
                let clip = open.plan.clip_norm.unwrap_or(dp.clip_norm);
                let mut noisy = sum;
                if let Some(noise) = central_noise(dp, clip, noisy.len()) {
                    noise.add(&mut noisy, &mut self.rng);
                }
                let k = open.plan.clients.len() as f64;
                noisy.iter().map(|v| (v / k) as f32).collect()
            }
            _ => open.aggregate.finish().map_err(|source| RoundError::Finish { round, source })?,
        };
        if let Some(adaptive) = self.adaptive.as_mut() {
            adaptive.update(open.unclipped, accepted, &mut self.rng);
        }
        self.server.apply(&mut self.model, &delta);
        self.version += 1;
        Ok(summary(self, true))
    }
}

/// The generator of privacy noise: from the operating system, unless an insecure test seed
/// is set (then with a warning).
fn noise_rng(insecure_seed: Option<u64>) -> ChaCha20Rng {
    match insecure_seed {
        Some(seed) => {
            tracing::warn!(
                seed,
                "dp.insecure_noise_seed is set: the privacy noise is predictable and gives no privacy; use it for tests only"
            );
            ChaCha20Rng::seed_from_u64(seed)
        }
        None => ChaCha20Rng::from_rng(rand::rngs::OsRng).unwrap_or_else(|err| {
            // getrandom failing means the OS has no entropy source: nothing private can run.
            panic!("the operating system's random number generator failed: {err}")
        }),
    }
}

/// The noise of a central-DP release of `values` values from updates clipped to `clip`:
/// Gaussian of std `noise_multiplier * clip` (L2 sensitivity `clip`), or Laplace of scale
/// `noise_multiplier * clip * sqrt(values)` (L1 sensitivity `clip * sqrt(values)`); none
/// when the multiplier is 0.
pub fn central_noise(dp: &DpConfig, clip: f64, values: usize) -> Option<DiscreteNoise> {
    if dp.noise_multiplier <= 0.0 || clip <= 0.0 || values == 0 {
        return None;
    }
    Some(match dp.noise {
        Noise::Gaussian => DiscreteNoise::gaussian(dp.noise_multiplier * clip, clip, values),
        Noise::Laplace => {
            let l1 = clip * (values as f64).sqrt();
            DiscreteNoise::laplace(dp.noise_multiplier * l1, l1, values)
        }
    })
}

#[cfg(test)]
mod tests;

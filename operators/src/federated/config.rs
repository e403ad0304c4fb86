//! YAML configuration of the `federated` operator: a training run over a fleet of simulated
//! clients, round after round.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::aggregate::Strategy;
use super::coordinator::{CoordinatorConfig, DpConfig, Selection};
use super::learn::{LocalTraining, Partition};

/// The default bound on an update's L2 norm (`max_norm`).
pub const DEFAULT_MAX_NORM: f64 = 1000.0;

/// YAML configuration of the `federated` operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FederatedConfig {
    /// Labelled examples, `label,feature,...` per line (`#` comments); a relative path is
    /// relative to the pipeline file. The clients' data and the held-out test set.
    pub dataset: PathBuf,
    /// Features are divided by this (default 16, the digits' largest pixel value).
    #[serde(default = "defaults::scale")]
    pub feature_scale: f32,
    /// Fraction of the dataset held out to measure the global model (default 0.2).
    #[serde(default = "defaults::test_fraction")]
    pub test_fraction: f64,
    /// Simulated clients the training set is split over (default 20).
    #[serde(default = "defaults::clients")]
    pub clients: usize,
    /// How examples are spread: `iid`, `shards`, or `{dirichlet: {alpha: A}}` (default
    /// Dirichlet with alpha 0.5).
    #[serde(default = "defaults::partition")]
    pub partition: Partition,
    /// Ids of the clients when they are external (the operator reads their updates from an
    /// `input`); default `client-00`, `client-01`, ... up to `clients`, the ids a simulated
    /// fleet of the same size uses.
    #[serde(default)]
    pub client_ids: Option<Vec<String>>,
    /// Probability that a selected simulated client does not answer a round (default 0).
    #[serde(default)]
    pub dropout: f64,
    /// External clients: the wall-clock time a round waits for its updates after its plan is
    /// published (default 60s). At the deadline the round closes with what arrived (below
    /// the quorum it fails and the model stays); later updates are stragglers, rejected.
    #[serde(default = "defaults::round_timeout")]
    pub round_timeout: crate::DurationMs,
    /// External clients: close a round as soon as the quorum of updates has arrived rather
    /// than waiting for every selected client until the deadline (default false).
    #[serde(default)]
    pub close_on_quorum: bool,
    /// Rounds to run (default 50).
    #[serde(default = "defaults::rounds")]
    pub rounds: u64,
    /// Clients asked per round (default 10).
    #[serde(default = "defaults::clients_per_round")]
    pub clients_per_round: usize,
    /// Client selection (default uniform, seed 0).
    #[serde(default = "defaults::selection")]
    pub selection: Selection,
    /// Aggregation strategy (default FedAvg).
    #[serde(default = "defaults::strategy")]
    pub strategy: Strategy,
    /// Fraction of the selected clients whose updates must arrive for the round to count
    /// (default 0.5); a round below it keeps the model and is reported.
    #[serde(default = "defaults::quorum")]
    pub quorum: f64,
    /// Updates with a larger L2 norm are rejected (default 1000, far above an honest update
    /// of the shipped models and far below one that wrecks a model: set it to your model's
    /// scale). With secure aggregation no single update is seen:
    /// then the unmasked sum must be within `dp.clip_norm` times the total weight.
    #[serde(default)]
    pub max_norm: Option<f64>,
    /// Local training of each client per round.
    #[serde(default)]
    pub local: LocalTraining,
    /// Differential privacy (default none).
    #[serde(default)]
    pub dp: Option<DpConfig>,
    /// Secure aggregation of the simulated clients' updates (default off): the coordinator
    /// receives only masked updates and unmasks their sum.
    #[serde(default)]
    pub secure_aggregation: Option<SecureAggregation>,
    /// A CSV file of per-round convergence (round, clients, updates, losses, held-out accuracy,
    /// epsilon), written as rounds close; a relative path is relative to the working
    /// directory.
    #[serde(default)]
    pub csv: Option<PathBuf>,
    /// After the last round, write the global model as ONNX into this model registry (the
    /// layout the `inference` operator serves: `REGISTRY/MODEL/VERSION/model.onnx`).
    #[serde(default)]
    pub export: Option<Export>,
    /// Seed of the split and of the clients' training (default 3).
    #[serde(default = "defaults::seed")]
    pub seed: u64,
}

/// Secure aggregation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregation {
    /// Fraction of a round's selected clients that must survive to unmask the sum (the
    /// Shamir threshold `t = ceil(threshold * k)`, default 0.6, above one half); a round with
    /// fewer fails with the reason.
    #[serde(default = "defaults::threshold")]
    pub threshold: f64,
}

impl SecureAggregation {
    /// The Shamir threshold for `selected` clients.
    pub fn shares_needed(&self, selected: usize) -> usize {
        ((self.threshold * selected as f64).ceil() as usize).clamp(1, selected.max(1))
    }
}

/// Where the trained model goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Export {
    /// Registry directory (created if missing); a relative path is relative to the pipeline
    /// file.
    pub registry: PathBuf,
    /// Model name in the registry.
    pub model: String,
}

mod defaults {
    use super::*;
    pub fn scale() -> f32 {
        16.0
    }
    pub fn test_fraction() -> f64 {
        0.2
    }
    pub fn clients() -> usize {
        20
    }
    pub fn partition() -> Partition {
        Partition::Dirichlet { alpha: 0.5 }
    }
    pub fn rounds() -> u64 {
        50
    }
    pub fn clients_per_round() -> usize {
        10
    }
    pub fn selection() -> Selection {
        Selection::Uniform { seed: 0 }
    }
    pub fn strategy() -> Strategy {
        Strategy::FedAvg
    }
    pub fn quorum() -> f64 {
        0.5
    }
    pub fn seed() -> u64 {
        3
    }
    pub fn threshold() -> f64 {
        0.6
    }
    pub fn round_timeout() -> crate::DurationMs {
        crate::DurationMs(60_000)
    }
}

impl crate::params::Validate for FederatedConfig {
    fn validate(&self, problems: &mut crate::params::ParamErrors) {
        if self.clients == 0 || self.clients_per_round == 0 || self.clients_per_round > self.clients {
            problems.at_value(
                "clients_per_round",
                format!(
                    "clients_per_round ({}) must be between 1 and clients ({})",
                    self.clients_per_round, self.clients
                ),
            );
        }
        if !(0.0..1.0).contains(&self.test_fraction) {
            problems.at_value("test_fraction", format!("test_fraction {} must be in [0, 1)", self.test_fraction));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            problems.at_value("dropout", format!("dropout {} must be in [0, 1)", self.dropout));
        }
        if !(self.quorum > 0.0 && self.quorum <= 1.0) {
            problems.at_value("quorum", format!("quorum {} must be in (0, 1]", self.quorum));
        }
        if let Some(ids) = &self.client_ids {
            let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
            if ids.len() != self.clients || unique.len() != ids.len() {
                problems.at_value(
                    "client_ids",
                    format!(
                        "client_ids must name `clients` ({}) distinct clients; it has {} ids, {} distinct",
                        self.clients,
                        ids.len(),
                        unique.len()
                    ),
                );
            }
        }
        if let Some(secure) = &self.secure_aggregation {
            if !(secure.threshold > 0.5 && secure.threshold <= 1.0) {
                problems.at_value(
                    "secure_aggregation",
                    format!("threshold {} must be in (0.5, 1]: fewer could unmask a client's update", secure.threshold),
                );
            }
            if !self.strategy.is_linear() {
                problems.at_value(
                    "secure_aggregation",
                    "median, trimmed_mean and krum need each update; secure aggregation reveals only their sum"
                        .to_owned(),
                );
            }
            if self.max_norm.is_some() {
                problems.at_value("secure_aggregation", "max_norm checks each update, which secure aggregation hides; bound updates with dp.clip_norm (clients clip before masking)".to_owned());
            }
            if self.dp.as_ref().is_some_and(|dp| dp.adaptive_quantile.is_some()) {
                problems.at_value(
                    "secure_aggregation",
                    "adaptive clipping needs each update's norm, which secure aggregation hides",
                );
            }
            if self.clients_per_round > 255 {
                problems
                    .at_value("secure_aggregation", "at most 255 clients per round take part in secure aggregation");
            }
        }
        if self.round_timeout.as_millis() == 0 {
            problems.at_value("round_timeout", "round_timeout must be longer than 0ms");
        }
        if self.rounds == 0 {
            problems.at_value("rounds", "rounds must be at least 1");
        }
        for problem in self.strategy.problems() {
            problems.at_value("strategy", problem);
        }
        if let Partition::Dirichlet { alpha } = self.partition {
            if !(alpha > 0.0 && alpha.is_finite()) {
                problems.at_value("partition", format!("dirichlet alpha {alpha} must be > 0"));
            }
        }
        if let Some(dp) = &self.dp {
            if !(dp.clip_norm > 0.0 && dp.noise_multiplier >= 0.0 && dp.delta > 0.0 && dp.delta < 1.0) {
                problems.at_value("dp", "dp needs clip_norm > 0, noise_multiplier >= 0 and delta in (0, 1)");
            }
        }
    }
}

impl FederatedConfig {
    /// The coordinator's settings.
    pub fn coordinator(&self) -> CoordinatorConfig {
        CoordinatorConfig {
            strategy: self.strategy,
            selection: self.selection.clone(),
            clients_per_round: self.clients_per_round,
            quorum: self.quorum,
            max_norm: match (&self.secure_aggregation, self.max_norm) {
                (None, bound) => Some(bound.unwrap_or(DEFAULT_MAX_NORM)).filter(|bound| bound.is_finite()),
                (Some(_), _) => None,
            },
            local: self.local,
            dp: self.dp.clone(),
        }
    }
}

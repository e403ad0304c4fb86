//! Aggregation of client updates into a new global model.
//!
//! An update is a client's model delta: its locally trained weights minus the global model it
//! started from (the round's base version), flattened to `f32`. Every strategy turns the
//! round's updates into one aggregate delta; the server optimiser then moves the global model:
//!
//! - linear strategies aggregate as updates arrive, in memory proportional to the model
//!   (one running sum), not to clients x model:
//!   - `fed_avg` (McMahan et al.): the example-weighted mean of the deltas, applied as is;
//!   - `fed_prox` (Li et al.): aggregated like FedAvg; the proximal term `mu` is the
//!     clients' (published in the round plan);
//!   - `fed_avg_m`: server momentum, `m = beta * m + mean`, `x += lr * m`;
//!   - `fed_adam`, `fed_yogi`, `fed_adagrad`: the adaptive server optimisers of Reddi et al.,
//!     "Adaptive Federated Optimization" (ICLR 2021, Algorithm 2), with `mean` as the
//!     pseudo-gradient;
//! - robust strategies keep the round's updates (they need all of them at once):
//!   coordinate-wise `median`, coordinate-wise `trimmed_mean` (dropping the `trim` fraction
//!   at each end), and `krum` / multi-Krum (Blanchard et al.: the `select` updates with the
//!   least summed squared distance to their `n - f - 2` nearest neighbours, averaged).

use serde::{Deserialize, Serialize};

/// How a round's updates become the next global model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
pub enum Strategy {
    /// Example-weighted mean of the deltas.
    FedAvg,
    /// FedAvg on the server; clients add the proximal term `mu`.
    FedProx {
        /// Proximal coefficient sent to the clients.
        mu: f64,
    },
    /// FedAvg with server momentum.
    FedAvgM {
        /// Server learning rate (default 1).
        #[serde(default = "one")]
        server_lr: f64,
        /// Momentum (default 0.9).
        #[serde(default = "momentum")]
        beta: f64,
    },
    /// Adam on the server.
    FedAdam {
        /// Server learning rate.
        server_lr: f64,
        /// First-moment decay (default 0.9).
        #[serde(default = "beta1")]
        beta1: f64,
        /// Second-moment decay (default 0.99).
        #[serde(default = "beta2")]
        beta2: f64,
        /// Adaptivity (default 1e-3).
        #[serde(default = "tau")]
        tau: f64,
    },
    /// Yogi on the server.
    FedYogi {
        /// Server learning rate.
        server_lr: f64,
        /// First-moment decay (default 0.9).
        #[serde(default = "beta1")]
        beta1: f64,
        /// Second-moment decay (default 0.99).
        #[serde(default = "beta2")]
        beta2: f64,
        /// Adaptivity (default 1e-3).
        #[serde(default = "tau")]
        tau: f64,
    },
    /// Adagrad on the server.
    FedAdagrad {
        /// Server learning rate.
        server_lr: f64,
        /// Adaptivity (default 1e-3).
        #[serde(default = "tau")]
        tau: f64,
    },
    /// Coordinate-wise median of the deltas.
    Median,
    /// Coordinate-wise mean after dropping the `trim` fraction of values at each end.
    TrimmedMean {
        /// Fraction dropped at each end, in `[0, 0.5)`.
        trim: f64,
    },
    /// (Multi-)Krum: the mean of the `select` updates closest to their neighbours.
    Krum {
        /// Byzantine clients tolerated.
        byzantine: usize,
        /// Updates averaged (1: Krum).
        #[serde(default = "one_usize")]
        select: usize,
    },
}

/// Strictly positive (false for NaN).
fn positive(value: f64) -> bool {
    value > 0.0
}

fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn momentum() -> f64 {
    0.9
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.99
}
fn tau() -> f64 {
    1e-3
}

impl Strategy {
    /// Whether updates are folded in as they arrive (memory of one model).
    pub fn is_linear(&self) -> bool {
        !matches!(self, Strategy::Median | Strategy::TrimmedMean { .. } | Strategy::Krum { .. })
    }

    /// Parameters that cannot work, with the reason.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let unit = |name: &str, value: f64, problems: &mut Vec<String>| {
            if !(0.0..1.0).contains(&value) {
                problems.push(format!("`{name}` is {value}; it must be in [0, 1)"));
            }
        };
        match *self {
            Strategy::FedProx { mu } if !(mu.is_finite() && mu >= 0.0) => {
                problems.push(format!("`mu` is {mu}; it must be a number >= 0"))
            }
            Strategy::FedAvgM { server_lr, beta } => {
                unit("beta", beta, &mut problems);
                if !positive(server_lr) {
                    problems.push(format!("`server_lr` is {server_lr}; it must be > 0"));
                }
            }
            Strategy::FedAdam { server_lr, beta1, beta2, tau } | Strategy::FedYogi { server_lr, beta1, beta2, tau } => {
                unit("beta1", beta1, &mut problems);
                unit("beta2", beta2, &mut problems);
                if !(positive(server_lr) && positive(tau)) {
                    problems.push(format!("`server_lr` ({server_lr}) and `tau` ({tau}) must be > 0"));
                }
            }
            Strategy::FedAdagrad { server_lr, tau } if !(positive(server_lr) && positive(tau)) => {
                problems.push(format!("`server_lr` ({server_lr}) and `tau` ({tau}) must be > 0"))
            }
            Strategy::TrimmedMean { trim } if !(0.0..0.5).contains(&trim) => {
                problems.push(format!("`trim` is {trim}; it must be in [0, 0.5)"))
            }
            Strategy::Krum { select: 0, .. } => problems.push("`select` must be at least 1".to_owned()),
            _ => {}
        }
        problems
    }
}

/// Why a round could not be aggregated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// No update arrived.
    #[error("no updates to aggregate")]
    Empty,
    /// A sum of updates offered to a strategy that needs each update.
    #[error("median, trimmed mean and krum need each update; a secure-aggregation sum cannot be used")]
    NotLinear,
    /// An update of another length than the model.
    #[error("update has {got} parameters, the model has {expected}")]
    Length {
        /// The update's length.
        got: usize,
        /// The model's.
        expected: usize,
    },
    /// Krum needs `n > 2f + 2` updates.
    #[error("krum with {byzantine} byzantine clients needs more than {needed} updates, got {got}")]
    TooFewForKrum {
        /// `f`.
        byzantine: usize,
        /// `2f + 2`.
        needed: usize,
        /// `n`.
        got: usize,
    },
}

/// One round's aggregation: fed updates one by one, then finished once.
#[derive(Debug)]
pub struct RoundAggregate {
    strategy: Strategy,
    len: usize,
    /// Running example-weighted sum (linear strategies), in f64 so that the order of
    /// arrival does not change the result beyond rounding.
    sum: Vec<f64>,
    total_weight: f64,
    /// Kept updates (robust strategies).
    kept: Vec<Vec<f32>>,
    count: usize,
}

impl RoundAggregate {
    /// An empty round for a model of `len` parameters.
    pub fn new(strategy: Strategy, len: usize) -> Self {
        let sum = if strategy.is_linear() { vec![0.0; len] } else { Vec::new() };
        Self { strategy, len, sum, total_weight: 0.0, kept: Vec::new(), count: 0 }
    }

    /// Updates folded in so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Folds in one client's delta, weighted by its number of examples (linear strategies;
    /// robust ones weigh clients equally).
    pub fn add(&mut self, delta: &[f32], examples: u64) -> Result<(), AggregateError> {
        if delta.len() != self.len {
            return Err(AggregateError::Length { got: delta.len(), expected: self.len });
        }
        if self.strategy.is_linear() {
            let weight = examples.max(1) as f64;
            for (sum, value) in self.sum.iter_mut().zip(delta) {
                *sum += weight * f64::from(*value);
            }
            self.total_weight += weight;
        } else {
            self.kept.push(delta.to_vec());
        }
        self.count += 1;
        Ok(())
    }

    /// Folds in the sum of `clients` clients' weighted deltas at once, `weight` their total
    /// weight: what secure aggregation reveals (linear strategies only).
    pub fn add_sum(&mut self, sum: &[f32], weight: f64, clients: usize) -> Result<(), AggregateError> {
        if sum.len() != self.len {
            return Err(AggregateError::Length { got: sum.len(), expected: self.len });
        }
        if !self.strategy.is_linear() {
            return Err(AggregateError::NotLinear);
        }
        for (total, value) in self.sum.iter_mut().zip(sum) {
            *total += f64::from(*value);
        }
        self.total_weight += weight;
        self.count += clients;
        Ok(())
    }

    /// The aggregate delta of the round (before the server optimiser).
    pub fn finish(self) -> Result<Vec<f32>, AggregateError> {
        if self.count == 0 {
            return Err(AggregateError::Empty);
        }
        match self.strategy {
            Strategy::Median => Ok(coordinate_wise(&self.kept, self.len, |values| {
                let n = values.len();
                if n % 2 == 1 {
                    values[n / 2]
                } else {
                    (values[n / 2 - 1] + values[n / 2]) / 2.0
                }
            })),
            Strategy::TrimmedMean { trim } => {
                let cut = (self.kept.len() as f64 * trim).floor() as usize;
                Ok(coordinate_wise(&self.kept, self.len, |values| {
                    let kept = &values[cut..values.len() - cut];
                    kept.iter().sum::<f64>() / kept.len() as f64
                }))
            }
            Strategy::Krum { byzantine, select } => krum(&self.kept, byzantine, select),
            _ => Ok(self.sum.iter().map(|sum| (sum / self.total_weight) as f32).collect()),
        }
    }
}

fn coordinate_wise(updates: &[Vec<f32>], len: usize, pick: impl Fn(&[f64]) -> f64) -> Vec<f32> {
    let mut column = vec![0.0f64; updates.len()];
    (0..len)
        .map(|i| {
            for (slot, update) in column.iter_mut().zip(updates) {
                *slot = f64::from(update[i]);
            }
            column.sort_by(f64::total_cmp);
            pick(&column) as f32
        })
        .collect()
}

fn krum(updates: &[Vec<f32>], byzantine: usize, select: usize) -> Result<Vec<f32>, AggregateError> {
    let n = updates.len();
    let needed = 2 * byzantine + 2;
    if n <= needed {
        return Err(AggregateError::TooFewForKrum { byzantine, needed, got: n });
    }
    let distance = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>();
    let neighbours = n - byzantine - 2;
    let mut scores: Vec<(f64, usize)> = (0..n)
        .map(|i| {
            let mut distances: Vec<f64> =
                (0..n).filter(|&j| j != i).map(|j| distance(&updates[i], &updates[j])).collect();
            distances.sort_by(f64::total_cmp);
            (distances[..neighbours].iter().sum(), i)
        })
        .collect();
    scores.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let chosen: Vec<usize> = scores.iter().take(select.min(n)).map(|(_, i)| *i).collect();
    let len = updates[0].len();
    Ok((0..len)
        .map(|k| (chosen.iter().map(|&i| f64::from(updates[i][k])).sum::<f64>() / chosen.len() as f64) as f32)
        .collect())
}

/// The server side: the global model and the optimiser state that carries over rounds.
#[derive(Debug, Clone)]
pub struct ServerOptimizer {
    strategy: Strategy,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl ServerOptimizer {
    /// Fresh state for a model of `len` parameters.
    pub fn new(strategy: Strategy, len: usize) -> Self {
        let state = |on: bool| if on { vec![0.0; len] } else { Vec::new() };
        let (m, v) = match strategy {
            Strategy::FedAvgM { .. } => (state(true), state(false)),
            Strategy::FedAdam { .. } | Strategy::FedYogi { .. } => (state(true), state(true)),
            Strategy::FedAdagrad { .. } => (state(false), state(true)),
            _ => (state(false), state(false)),
        };
        Self { strategy, m, v }
    }

    /// The moments that carry over rounds (empty where the strategy has none).
    pub(crate) fn moments(&self) -> (Vec<f64>, Vec<f64>) {
        (self.m.clone(), self.v.clone())
    }

    /// Takes up saved moments of the same length.
    pub(crate) fn restore_moments(&mut self, (m, v): (Vec<f64>, Vec<f64>)) {
        if m.len() == self.m.len() && v.len() == self.v.len() {
            self.m = m;
            self.v = v;
        }
    }

    /// Moves `model` by the round's aggregate `delta`.
    pub fn apply(&mut self, model: &mut [f32], delta: &[f32]) {
        match self.strategy {
            Strategy::FedAvgM { server_lr, beta } => {
                for ((x, d), m) in model.iter_mut().zip(delta).zip(&mut self.m) {
                    *m = beta * *m + f64::from(*d);
                    *x += (server_lr * *m) as f32;
                }
            }
            Strategy::FedAdam { server_lr, beta1, beta2, tau } | Strategy::FedYogi { server_lr, beta1, beta2, tau } => {
                let yogi = matches!(self.strategy, Strategy::FedYogi { .. });
                for (((x, d), m), v) in model.iter_mut().zip(delta).zip(&mut self.m).zip(&mut self.v) {
                    let d = f64::from(*d);
                    *m = beta1 * *m + (1.0 - beta1) * d;
                    let d2 = d * d;
                    *v = if yogi {
                        *v - (1.0 - beta2) * d2 * (*v - d2).signum()
                    } else {
                        beta2 * *v + (1.0 - beta2) * d2
                    };
                    *x += (server_lr * *m / (v.sqrt() + tau)) as f32;
                }
            }
            Strategy::FedAdagrad { server_lr, tau } => {
                for ((x, d), v) in model.iter_mut().zip(delta).zip(&mut self.v) {
                    let d = f64::from(*d);
                    *v += d * d;
                    *x += (server_lr * d / (v.sqrt() + tau)) as f32;
                }
            }
            _ => {
                for (x, d) in model.iter_mut().zip(delta) {
                    *x += d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aggregate(strategy: Strategy, updates: &[(&[f32], u64)]) -> Vec<f32> {
        let mut round = RoundAggregate::new(strategy, updates[0].0.len());
        for (delta, examples) in updates {
            round.add(delta, *examples).unwrap();
        }
        round.finish().unwrap()
    }

    #[test]
    fn fed_avg_weights_by_examples_in_any_order() {
        let a: &[f32] = &[1.0, 0.0];
        let b: &[f32] = &[0.0, 4.0];
        assert_eq!(aggregate(Strategy::FedAvg, &[(a, 30), (b, 10)]), vec![0.75, 1.0]);
        assert_eq!(aggregate(Strategy::FedAvg, &[(b, 10), (a, 30)]), vec![0.75, 1.0]);
        let mut round = RoundAggregate::new(Strategy::FedAvg, 2);
        assert_eq!(round.add(&[1.0], 1), Err(AggregateError::Length { got: 1, expected: 2 }));
        assert_eq!(RoundAggregate::new(Strategy::FedAvg, 2).finish(), Err(AggregateError::Empty));
    }

    #[test]
    fn robust_strategies_resist_an_outlier() {
        let updates: Vec<Vec<f32>> =
            vec![vec![1.0, 1.0], vec![1.1, 0.9], vec![0.9, 1.1], vec![1.0, 1.05], vec![100.0, -100.0]];
        let refs: Vec<(&[f32], u64)> = updates.iter().map(|u| (u.as_slice(), 1)).collect();
        assert_eq!(aggregate(Strategy::Median, &refs), vec![1.0, 1.0]);
        let trimmed = aggregate(Strategy::TrimmedMean { trim: 0.2 }, &refs);
        assert!((trimmed[0] - 1.0333).abs() < 1e-3 && (trimmed[1] - 0.9833).abs() < 1e-3, "{trimmed:?}");
        let krum = aggregate(Strategy::Krum { byzantine: 1, select: 1 }, &refs);
        assert!(krum[0] < 1.2 && krum[1] < 1.2, "krum picks a benign update: {krum:?}");
        let multi = aggregate(Strategy::Krum { byzantine: 1, select: 3 }, &refs);
        assert!(multi.iter().all(|v| (v - 1.0).abs() < 0.1), "{multi:?}");
        let mut round = RoundAggregate::new(Strategy::Krum { byzantine: 2, select: 1 }, 2);
        for u in &updates {
            round.add(u, 1).unwrap();
        }
        assert_eq!(round.finish(), Err(AggregateError::TooFewForKrum { byzantine: 2, needed: 6, got: 5 }));
    }

    #[test]
    fn server_optimizers_follow_reddi_et_al() {
        // One coordinate, pseudo-gradient 0.5 twice.
        let step = |strategy: Strategy| {
            let mut server = ServerOptimizer::new(strategy, 1);
            let mut x = [0.0f32];
            server.apply(&mut x, &[0.5]);
            let first = x[0];
            server.apply(&mut x, &[0.5]);
            (first, x[0])
        };
        assert_eq!(step(Strategy::FedAvg), (0.5, 1.0));
        let (a, b) = step(Strategy::FedAvgM { server_lr: 1.0, beta: 0.9 });
        assert!((a - 0.5).abs() < 1e-6 && (b - (0.5 + 0.95)).abs() < 1e-6, "{a} {b}");
        // Adam: m1 = 0.05, v1 = 0.0025, x1 = 0.1 * 0.05 / (0.05 + 0.001).
        let (a, _) = step(Strategy::FedAdam { server_lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3 });
        assert!((f64::from(a) - 0.1 * 0.05 / (0.05 + 1e-3)).abs() < 1e-6, "{a}");
        // Yogi from v = 0: v1 = 0 + 0.01 * 0.25 (sign(0 - 0.25) = -1), the same first step.
        let (y, _) = step(Strategy::FedYogi { server_lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3 });
        assert!((y - a).abs() < 1e-7, "{y} {a}");
        // Adagrad: v1 = 0.25, x1 = 0.1 * 0.5 / (0.5 + 0.001).
        let (g, _) = step(Strategy::FedAdagrad { server_lr: 0.1, tau: 1e-3 });
        assert!((f64::from(g) - 0.05 / 0.501).abs() < 1e-6, "{g}");
    }

    #[test]
    fn parameters_are_checked() {
        assert!(Strategy::FedAvg.problems().is_empty());
        assert_eq!(Strategy::TrimmedMean { trim: 0.5 }.problems(), vec!["`trim` is 0.5; it must be in [0, 0.5)"]);
        assert_eq!(Strategy::FedProx { mu: -1.0 }.problems().len(), 1);
    }
}

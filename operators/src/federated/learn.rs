//! Local learning for simulated edge clients: a labelled dataset, non-IID splits, and
//! multinomial logistic regression (softmax) trained by minibatch SGD, with FedProx's
//! proximal term as an option.
//!
//! Parameters are flattened as `weights` (features x classes, row-major) then `bias`
//! (classes): that order is the update payload's.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A labelled dataset with features scaled to about [0, 1].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    /// Feature vectors, one per example.
    pub features: Vec<Vec<f32>>,
    /// Labels in `0..classes`.
    pub labels: Vec<usize>,
    /// Number of classes.
    pub classes: usize,
}

/// A dataset that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CsvError {
    /// A line without a label first.
    #[error("line {line}: the first field must be a label (0, 1, ...)")]
    Label {
        /// The line, from 1.
        line: usize,
    },
    /// A feature that is not a number.
    #[error("line {line}: {reason}")]
    Feature {
        /// The line, from 1.
        line: usize,
        /// Why.
        reason: String,
    },
    /// A line with another number of features than the first.
    #[error("line {line}: {found} features, earlier lines have {expected}")]
    Width {
        /// The line, from 1.
        line: usize,
        /// Its features.
        found: usize,
        /// The first line's.
        expected: usize,
    },
    /// No example at all.
    #[error("the dataset is empty")]
    Empty,
}

impl Dataset {
    /// Parses `label,f0,f1,...` lines (`#` comments and blank lines skipped), dividing the
    /// features by `scale`.
    pub fn parse_csv(text: &str, scale: f32) -> Result<Self, CsvError> {
        let mut data = Dataset::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split(',');
            let label: usize =
                fields.next().and_then(|f| f.trim().parse().ok()).ok_or(CsvError::Label { line: number + 1 })?;
            let features = fields
                .map(|f| f.trim().parse::<f32>().map(|v| v / scale))
                .collect::<Result<Vec<f32>, _>>()
                .map_err(|err| CsvError::Feature { line: number + 1, reason: err.to_string() })?;
            if let Some(first) = data.features.first() {
                if first.len() != features.len() {
                    return Err(CsvError::Width { line: number + 1, found: features.len(), expected: first.len() });
                }
            }
            data.classes = data.classes.max(label + 1);
            data.features.push(features);
            data.labels.push(label);
        }
        if data.labels.is_empty() {
            return Err(CsvError::Empty);
        }
        Ok(data)
    }

    /// Examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features per example.
    pub fn dimension(&self) -> usize {
        self.features.first().map_or(0, Vec::len)
    }

    /// The examples at `indices`.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        Dataset {
            features: indices.iter().map(|&i| self.features[i].clone()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes,
        }
    }

    /// A seeded shuffle split into (train, test) with `test_fraction` held out.
    pub fn split(&self, test_fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let test = (self.len() as f64 * test_fraction).round() as usize;
        (self.subset(&order[test..]), self.subset(&order[..test]))
    }
}

/// How examples are spread over clients.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Partition {
    /// Uniformly at random: IID.
    Iid,
    /// Sorted by label and cut into `2 x clients` shards, two per client (McMahan et al.):
    /// most clients see two digits.
    Shards,
    /// Per class, client shares drawn from Dirichlet(`alpha`): smaller is more skewed.
    Dirichlet {
        /// Concentration.
        alpha: f64,
    },
}

/// The example indices of each of `clients` clients.
pub fn partition(data: &Dataset, clients: usize, how: Partition, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut parts = vec![Vec::new(); clients];
    match how {
        Partition::Iid => {
            let mut order: Vec<usize> = (0..data.len()).collect();
            order.shuffle(&mut rng);
            for (k, index) in order.into_iter().enumerate() {
                parts[k % clients].push(index);
            }
        }
        Partition::Shards => {
            let mut order: Vec<usize> = (0..data.len()).collect();
            order.shuffle(&mut rng);
            order.sort_by_key(|&i| data.labels[i]);
            let shards = 2 * clients;
            let size = data.len().div_ceil(shards);
            let mut ids: Vec<usize> = (0..shards).collect();
            ids.shuffle(&mut rng);
            for (k, shard) in ids.into_iter().enumerate() {
                let start = (shard * size).min(data.len());
                let end = ((shard + 1) * size).min(data.len());
                parts[k % clients].extend_from_slice(&order[start..end]);
            }
        }
        Partition::Dirichlet { alpha } => {
            for class in 0..data.classes {
                let mut members: Vec<usize> = (0..data.len()).filter(|&i| data.labels[i] == class).collect();
                members.shuffle(&mut rng);
                let shares: Vec<f64> = (0..clients).map(|_| gamma(&mut rng, alpha)).collect();
                let total: f64 = shares.iter().sum::<f64>().max(f64::MIN_POSITIVE);
                let mut start = 0;
                let mut cumulative = 0.0;
                for (client, share) in shares.iter().enumerate() {
                    cumulative += share / total;
                    let end = if client + 1 == clients {
                        members.len()
                    } else {
                        (cumulative * members.len() as f64).round() as usize
                    };
                    parts[client].extend_from_slice(&members[start..end.max(start)]);
                    start = end.max(start);
                }
            }
        }
    }
    parts
}

/// A Gamma(`shape`, 1) draw (Marsaglia and Tsang; boosted for shape < 1).
fn gamma(rng: &mut impl Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = super::privacy::standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// Multinomial logistic regression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Softmax {
    /// Input features.
    pub features: usize,
    /// Classes.
    pub classes: usize,
}

/// Local training settings (sent to clients in the round plan).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LocalTraining {
    /// Passes over the local data per round (default 1).
    #[serde(default = "one")]
    pub epochs: u32,
    /// Minibatch size (default 16).
    #[serde(default = "batch")]
    pub batch_size: usize,
    /// SGD step (default 0.1).
    #[serde(default = "learning_rate")]
    pub learning_rate: f32,
    /// FedProx proximal coefficient: the loss gains `mu/2 * |w - w_global|^2` (default 0).
    #[serde(default)]
    pub mu: f32,
}

fn one() -> u32 {
    1
}
fn batch() -> usize {
    16
}
fn learning_rate() -> f32 {
    0.1
}

impl Default for LocalTraining {
    fn default() -> Self {
        Self { epochs: 1, batch_size: 16, learning_rate: 0.1, mu: 0.0 }
    }
}

impl Softmax {
    /// Number of parameters.
    pub fn parameters(&self) -> usize {
        self.features * self.classes + self.classes
    }

    /// Class probabilities of one example.
    fn probabilities(&self, weights: &[f32], x: &[f32], out: &mut [f32]) {
        let (w, b) = weights.split_at(self.features * self.classes);
        for (class, logit) in out.iter_mut().enumerate() {
            *logit = b[class] + x.iter().enumerate().map(|(f, v)| v * w[f * self.classes + class]).sum::<f32>();
        }
        let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0;
        for p in out.iter_mut() {
            *p = (*p - max).exp();
            total += *p;
        }
        for p in out.iter_mut() {
            *p /= total;
        }
    }

    /// Mean cross-entropy and accuracy of `weights` on `data`.
    pub fn evaluate(&self, weights: &[f32], data: &Dataset) -> (f64, f64) {
        let mut probabilities = vec![0.0; self.classes];
        let (mut loss, mut correct) = (0.0f64, 0usize);
        for (x, &label) in data.features.iter().zip(&data.labels) {
            self.probabilities(weights, x, &mut probabilities);
            loss -= f64::from(probabilities[label].max(1e-12)).ln();
            let predicted =
                (0..self.classes).max_by(|&a, &b| probabilities[a].total_cmp(&probabilities[b])).unwrap_or(0);
            correct += usize::from(predicted == label);
        }
        let n = data.len().max(1) as f64;
        (loss / n, correct as f64 / n)
    }

    /// Trains from `global` on `data`; returns the new weights.
    pub fn train(&self, global: &[f32], data: &Dataset, settings: &LocalTraining, seed: u64) -> Vec<f32> {
        let mut weights = global.to_vec();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..data.len()).collect();
        let mut probabilities = vec![0.0; self.classes];
        let mut gradient = vec![0.0f32; weights.len()];
        let wlen = self.features * self.classes;
        for _ in 0..settings.epochs {
            order.shuffle(&mut rng);
            for batch in order.chunks(settings.batch_size.max(1)) {
                gradient.iter_mut().for_each(|g| *g = 0.0);
                for &i in batch {
                    let x = &data.features[i];
                    self.probabilities(&weights, x, &mut probabilities);
                    probabilities[data.labels[i]] -= 1.0;
                    for (f, v) in x.iter().enumerate() {
                        if *v != 0.0 {
                            for class in 0..self.classes {
                                gradient[f * self.classes + class] += v * probabilities[class];
                            }
                        }
                    }
                    for class in 0..self.classes {
                        gradient[wlen + class] += probabilities[class];
                    }
                }
                let step = settings.learning_rate / batch.len() as f32;
                for ((w, g), w0) in weights.iter_mut().zip(&gradient).zip(global) {
                    *w -= step * g + settings.learning_rate * settings.mu * (*w - w0);
                }
            }
        }
        weights
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits() -> Dataset {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../pipelines/data/digits.csv")).unwrap();
        Dataset::parse_csv(&text, 16.0).unwrap()
    }

    #[test]
    fn the_shipped_digits_load() {
        let data = digits();
        assert_eq!((data.len(), data.dimension(), data.classes), (1797, 64, 10));
        assert!(Dataset::parse_csv("1,2,3\n2,3\n", 1.0).unwrap_err().to_string().starts_with("line 2: 1 features"));
    }

    #[test]
    fn centralised_softmax_learns_the_digits() {
        let (train, test) = digits().split(0.2, 1);
        let model = Softmax { features: 64, classes: 10 };
        let mut weights = vec![0.0; model.parameters()];
        let settings = LocalTraining { epochs: 1, batch_size: 16, learning_rate: 0.1, mu: 0.0 };
        for epoch in 0..20 {
            weights = model.train(&weights, &train, &settings, epoch);
        }
        let (loss, accuracy) = model.evaluate(&weights, &test);
        assert!(accuracy > 0.93 && loss < 0.3, "accuracy {accuracy}, loss {loss}");
    }

    #[test]
    fn partitions_cover_every_example_once_and_skew_labels() {
        let data = digits();
        for how in [Partition::Iid, Partition::Shards, Partition::Dirichlet { alpha: 0.3 }] {
            let parts = partition(&data, 20, how, 7);
            let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..data.len()).collect::<Vec<_>>(), "{how:?}");
            let labels_per_client: Vec<usize> = parts
                .iter()
                .map(|p| p.iter().map(|&i| data.labels[i]).collect::<std::collections::BTreeSet<_>>().len())
                .collect();
            let mean = labels_per_client.iter().sum::<usize>() as f64 / 20.0;
            match how {
                Partition::Iid => assert!(mean > 9.0, "{mean}"),
                Partition::Shards => assert!(mean <= 3.0, "{mean}"),
                Partition::Dirichlet { .. } => assert!(mean < 8.0, "{mean}"),
            }
        }
    }
}

//! A fleet of simulated edge clients, each holding its own part of a dataset: they answer a
//! round plan by training locally from the global model and sending their update.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::coordinator::{ClientInfo, RoundPlan};
use super::learn::{partition, Dataset, Partition, Softmax};
use super::privacy::{clip_l2, DiscreteNoise};
use super::update::{ClientMetrics, ModelUpdate, Payload};
use crate::records::HealthStatus;

/// Simulated clients and their local data.
#[derive(Debug, Clone)]
pub struct SimulatedFleet {
    /// The model they train.
    pub model: Softmax,
    /// Client ids and their examples.
    pub clients: Vec<(String, Dataset)>,
    seed: u64,
}

impl SimulatedFleet {
    /// Splits `data` over `clients` clients (`client-00`, `client-01`, ...).
    pub fn new(data: &Dataset, clients: usize, how: Partition, seed: u64) -> Self {
        let parts = partition(data, clients, how, seed);
        let model = Softmax { features: data.dimension(), classes: data.classes };
        let clients =
            Self::ids(clients).into_iter().zip(&parts).map(|(id, indices)| (id, data.subset(indices))).collect();
        Self { model, clients, seed }
    }

    /// The ids of `clients` clients: `client-00`, `client-01`, ...
    pub fn ids(clients: usize) -> Vec<String> {
        (0..clients).map(|i| format!("client-{i:02}")).collect()
    }

    /// What the coordinator sees of the clients (all Healthy, moderately loaded).
    pub fn infos(&self) -> Vec<ClientInfo> {
        self.clients
            .iter()
            .enumerate()
            .map(|(i, (id, _))| ClientInfo {
                id: id.clone(),
                status: HealthStatus::Healthy,
                cpu: 20.0 + (i * 37 % 60) as f64,
                memory: 30.0 + (i * 17 % 50) as f64,
            })
            .collect()
    }

    /// Client `client`'s update for `plan`, trained from `global`.
    pub fn train(&self, plan: &RoundPlan, global: &[f32], client: &str) -> Option<ModelUpdate> {
        let index = self.clients.iter().position(|(id, _)| id == client)?;
        let data = &self.clients[index].1;
        let seed = self.seed ^ (plan.round << 16) ^ index as u64;
        let trained = self.model.train(global, data, &plan.local, seed);
        let (loss, accuracy) = self.model.evaluate(&trained, data);
        let mut delta: Vec<f32> = trained.iter().zip(global).map(|(t, g)| t - g).collect();
        if let Some(clip) = plan.clip_norm {
            clip_l2(&mut delta, clip);
        }
        // Local DP: the client's own noise, from the operating system's generator (the
        // simulation's seed drives the data split and training, never the noise).
        let clip = plan.clip_norm.unwrap_or(1.0);
        let noise = match (plan.local_noise_std, plan.local_laplace_scale) {
            (Some(std), _) if std > 0.0 => Some(DiscreteNoise::gaussian(std, clip, delta.len())),
            (_, Some(scale)) if scale > 0.0 => {
                let l1 = clip * (delta.len() as f64).sqrt();
                Some(DiscreteNoise::laplace(scale, l1, delta.len()))
            }
            _ => None,
        };
        if let Some(noise) = noise {
            let mut rng = ChaCha20Rng::from_rng(rand::rngs::OsRng).ok()?;
            for value in delta.iter_mut() {
                *value = noise.apply(f64::from(*value), &mut rng) as f32;
            }
        }
        Some(ModelUpdate {
            round: plan.round,
            client_id: client.to_owned(),
            num_examples: data.len() as u64,
            base_version: plan.model_version,
            timestamp: 0,
            payload: Payload::encode(&delta),
            metrics: ClientMetrics { loss: Some(loss), accuracy: Some(accuracy) },
        })
    }
}

//! Metrics of the operators that keep their own (inference, federated training), as
//! prometheus-client families. The engine registers them in its registry; an operator gets
//! its handles once, when it is built, and keeps them.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

/// Label sets of the operators' metrics.
pub mod labels {
    use prometheus_client::encoding::EncodeLabelSet;

    /// `operator`, `status`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct OperatorStatus {
        /// The operator's name.
        pub operator: String,
        /// An outcome, e.g. `assigned` or `unplaced`.
        pub status: &'static str,
    }

    /// `operator`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Operator {
        /// The operator's name.
        pub operator: String,
    }

    /// `operator`, `outcome`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct OperatorOutcome {
        /// The operator's name.
        pub operator: String,
        /// An outcome, e.g. `accepted` or `rejected`.
        pub outcome: &'static str,
    }

    /// `operator`, `model`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Model {
        /// The inference operator's name.
        pub operator: String,
        /// The model's name.
        pub model: String,
    }

    /// `operator`, `model`, `status`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ModelStatus {
        /// The inference operator's name.
        pub operator: String,
        /// The model's name.
        pub model: String,
        /// The result's status.
        pub status: &'static str,
    }

    /// `operator`, `model`, `worker`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ModelWorker {
        /// The inference operator's name.
        pub operator: String,
        /// The model's name.
        pub model: String,
        /// The worker's index.
        pub worker: usize,
    }
}

type HistogramFamily<L> = Family<L, BatchHistogram, fn() -> BatchHistogram>;

/// A Prometheus histogram that also takes a batch of observations under one lock.
/// prometheus-client's `Histogram` takes a write lock per observation, which on the
/// inference path (a queue time per request) cost about 5% of a worker's time.
#[derive(Debug, Clone)]
pub struct BatchHistogram {
    inner: Arc<std::sync::Mutex<HistogramState>>,
}

#[derive(Debug)]
struct HistogramState {
    sum: f64,
    count: u64,
    /// Upper bounds (the last is `f64::MAX`: `+Inf`) and the observations in each.
    buckets: Vec<(f64, u64)>,
}

impl BatchHistogram {
    /// A histogram with these upper bounds, and `+Inf`.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let buckets = bounds.into_iter().chain(std::iter::once(f64::MAX)).map(|bound| (bound, 0)).collect();
        Self { inner: Arc::new(std::sync::Mutex::new(HistogramState { sum: 0.0, count: 0, buckets })) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HistogramState> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        self.observe_all(std::iter::once(value));
    }

    /// Records every value of `values`, under one lock.
    pub fn observe_all(&self, values: impl IntoIterator<Item = f64>) {
        let mut state = self.state();
        let HistogramState { sum, count, buckets } = &mut *state;
        for value in values {
            *sum += value;
            *count += 1;
            // NaN counts in `+Inf`, as in prometheus-client.
            let bucket = buckets.iter().position(|(bound, _)| *bound >= value).unwrap_or(buckets.len() - 1);
            buckets[bucket].1 += 1;
        }
    }

    /// The sum, the count and the per-bucket (not cumulative) counts.
    pub fn get(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let state = self.state();
        (state.sum, state.count, state.buckets.clone())
    }
}

impl prometheus_client::metrics::TypedMetric for BatchHistogram {
    const TYPE: prometheus_client::metrics::MetricType = prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for BatchHistogram {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.get();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        <Self as prometheus_client::metrics::TypedMetric>::TYPE
    }
}

/// Metrics of the inference operators, labelled by operator and model.
#[derive(Debug)]
pub struct InferenceMetrics {
    /// Requests ended, per status (`ok`, `expired`, `rejected`, `failed`).
    pub requests: Family<labels::ModelStatus, Counter>,
    /// Requests per model run.
    pub batch_size: HistogramFamily<labels::Model>,
    /// Time from admission to the start of the run, seconds.
    pub queue_seconds: HistogramFamily<labels::Model>,
    /// Model run time per batch, seconds.
    pub compute_seconds: HistogramFamily<labels::Model>,
    /// Model run time, seconds in all: its rate is the model thread's busy fraction.
    pub busy_seconds: Family<labels::ModelWorker, Counter<f64, AtomicU64>>,
    /// Requests waiting, per operator, model and worker.
    pub queue_depth: Family<labels::ModelWorker, Gauge>,
    /// Latest loaded version per model and worker.
    pub model_version: Family<labels::ModelWorker, Gauge>,
    /// Versions found in the registry that failed to load, per model.
    pub load_failures: Family<labels::Model, Counter>,
    /// Waiting requests sent back to their load balancer because their node went Offline.
    pub rerouted: Family<labels::Operator, Counter>,
    /// Requests placed by each load balancer, per node.
    pub placed: Family<labels::OperatorStatus, Counter>,
}

impl Default for InferenceMetrics {
    fn default() -> Self {
        fn batches() -> BatchHistogram {
            BatchHistogram::new(exponential_buckets(1.0, 2.0, 11))
        }
        fn seconds() -> BatchHistogram {
            BatchHistogram::new(exponential_buckets(0.000_05, 2.0, 16))
        }
        Self {
            requests: Family::default(),
            batch_size: Family::new_with_constructor(batches),
            queue_seconds: Family::new_with_constructor(seconds),
            compute_seconds: Family::new_with_constructor(seconds),
            busy_seconds: Family::default(),
            queue_depth: Family::default(),
            model_version: Family::default(),
            load_failures: Family::default(),
            rerouted: Family::default(),
            placed: Family::default(),
        }
    }
}

impl InferenceMetrics {
    /// Registers the families under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("inference");
        registry.register("requests", "Inference requests ended, per status", self.requests.clone());
        registry.register("batch_size", "Requests per model run", self.batch_size.clone());
        registry.register("queue_seconds", "Time from admission to the model run", self.queue_seconds.clone());
        registry.register("compute_seconds", "Model run time per batch", self.compute_seconds.clone());
        registry.register("busy_seconds", "Model run time in all, per worker", self.busy_seconds.clone());
        registry.register("queue_depth", "Requests waiting for a batch", self.queue_depth.clone());
        registry.register("model_version", "Latest loaded model version", self.model_version.clone());
        registry.register("model_load_failures", "Model versions that failed to load", self.load_failures.clone());
        registry.register(
            "rerouted",
            "Waiting requests re-routed because their node went offline",
            self.rerouted.clone(),
        );
        registry.register("placed", "Requests placed by load balancers, per status", self.placed.clone());
    }
}

/// Metrics of federated training, per operator.
#[derive(Debug, Default)]
pub struct FederatedMetrics {
    /// Last closed round.
    pub round: Family<labels::Operator, Gauge>,
    /// Held-out accuracy of the global model after the last round.
    pub test_accuracy: Family<labels::Operator, Gauge<f64, AtomicU64>>,
    /// Privacy spent so far (central DP).
    pub epsilon: Family<labels::Operator, Gauge<f64, AtomicU64>>,
    /// Client updates, per outcome (`accepted`, `rejected`).
    pub updates: Family<labels::OperatorOutcome, Counter>,
}

impl FederatedMetrics {
    /// Registers the families under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("federated");
        registry.register("round", "Last closed training round", self.round.clone());
        registry.register("test_accuracy", "Held-out accuracy of the global model", self.test_accuracy.clone());
        registry.register("epsilon", "Differential privacy spent so far", self.epsilon.clone());
        registry.register("updates", "Client updates, per outcome", self.updates.clone());
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::Histogram;

    use super::*;

    /// A batch histogram exposes exactly what prometheus-client's histogram exposes for the
    /// same observations (values on a bound, beyond the last bound, and in batches).
    #[test]
    fn a_batch_histogram_encodes_like_the_library_histogram() {
        let values = [0.5, 1.0, 3.0, 1e9, 0.0, 2.0, 7.9];
        let theirs = Histogram::new(exponential_buckets(1.0, 2.0, 4));
        let ours = BatchHistogram::new(exponential_buckets(1.0, 2.0, 4));
        for value in values {
            theirs.observe(value);
        }
        ours.observe(values[0]);
        ours.observe_all(values[1..].iter().copied());
        let encode = |register: &dyn Fn(&mut Registry)| {
            let mut registry = Registry::default();
            register(&mut registry);
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text
        };
        let expected = encode(&|registry| registry.register("latency", "help", theirs.clone()));
        let got = encode(&|registry| registry.register("latency", "help", ours.clone()));
        assert!(expected.contains("latency_bucket{le=\"+Inf\"} 7"), "{expected}");
        assert!(expected.contains("latency_bucket{le=\"1.0\"} 3"), "{expected}");
        assert_eq!(got, expected);

        // A NaN counts in +Inf, so that +Inf still equals the count (prometheus-client's
        // histogram counts it but puts it in no bucket).
        ours.observe(f64::NAN);
        let (_, count, buckets) = ours.get();
        assert_eq!((count, buckets.last().unwrap().1), (8, 2));
    }
}

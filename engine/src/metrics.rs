//! Prometheus metrics of a running pipeline, and the `/metrics`, `/health` and `/ready`
//! endpoints.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use edgeflow_operators::HealthStatus;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label sets of edgeflow's metrics, one struct per shape. A component builds its label
/// sets once, when it starts, and keeps the metric handles; nothing is built per record.
pub mod labels {
    use prometheus_client::encoding::EncodeLabelSet;

    pub use edgeflow_operators::metrics::labels::{
        Model, ModelStatus, ModelWorker, Operator, OperatorOutcome, OperatorStatus,
    };

    /// `source`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Source {
        /// The source's name.
        pub source: String,
    }

    /// `source`, `worker`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct SourceWorker {
        /// The source's name.
        pub source: String,
        /// The worker's index.
        pub worker: usize,
    }

    /// `source`, `reason` (`malformed`, `late`, `future`).
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct SourceReason {
        /// The source's name.
        pub source: String,
        /// Why records were dead-lettered.
        pub reason: &'static str,
    }

    /// `source`, `policy` (the late policy).
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct SourcePolicy {
        /// The source's name.
        pub source: String,
        /// The pipeline's late policy.
        pub policy: &'static str,
    }

    /// `operator`, `port`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct OperatorPort {
        /// The operator's name.
        pub operator: String,
        /// The port (`input`, or an output's name).
        pub port: &'static str,
    }

    /// `sink`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Sink {
        /// The sink's name.
        pub sink: String,
    }

    /// `status` (a node health status).
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Status {
        /// The status.
        pub status: &'static str,
    }
}

pub use edgeflow_operators::metrics::{BatchHistogram, FederatedMetrics, InferenceMetrics};

/// Checkpoints: how many, how long, how large, how old.
#[derive(Debug)]
pub struct CheckpointMetrics {
    /// Checkpoints completed.
    pub completed: Counter,
    /// Damaged or incomplete checkpoints passed over when restoring.
    pub skipped: Counter,
    /// Seconds from a checkpoint's start to its manifest being durable.
    pub duration: prometheus_client::metrics::histogram::Histogram,
    /// Bytes of the last complete checkpoint.
    pub bytes: Gauge,
    /// Seconds since the last complete checkpoint.
    pub age: Gauge<f64, AtomicU64>,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Default for CheckpointMetrics {
    fn default() -> Self {
        let buckets = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        Self {
            completed: Counter::default(),
            skipped: Counter::default(),
            duration: prometheus_client::metrics::histogram::Histogram::new(buckets),
            bytes: Gauge::default(),
            age: Gauge::default(),
            last: std::sync::Mutex::new(None),
        }
    }
}

impl CheckpointMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register("checkpoints_completed", "Checkpoints completed", self.completed.clone());
        registry.register(
            "checkpoints_skipped",
            "Damaged or incomplete checkpoints passed over when restoring",
            self.skipped.clone(),
        );
        registry.register(
            "checkpoint_duration_seconds",
            "Time from a checkpoint's start to its manifest being durable",
            self.duration.clone(),
        );
        registry.register("checkpoint_bytes", "Bytes of the last complete checkpoint", self.bytes.clone());
        registry.register("checkpoint_age_seconds", "Seconds since the last complete checkpoint", self.age.clone());
    }

    /// A checkpoint completed after `took`, of `bytes`.
    pub fn completed(&self, took: std::time::Duration, bytes: u64) {
        self.completed.inc();
        self.duration.observe(took.as_secs_f64());
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
        self.age.set(0.0);
    }

    /// Updates the age gauge.
    pub fn observe_age(&self) {
        if let Some(last) = *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
            self.age.set(last.elapsed().as_secs_f64());
        }
    }
}

/// Every metric edgeflow exports. Cheap to clone handles out of; shared by all workers.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Records read per source.
    pub source_records: Family<labels::Source, Counter>,
    /// Records in and out per operator and port.
    pub operator_records: Family<labels::OperatorPort, Counter>,
    /// Records written per sink.
    pub sink_records: Family<labels::Sink, Counter>,
    /// Dead-lettered records per source and reason kind (`malformed`, `late`).
    pub dead_letters: Family<labels::SourceReason, Counter>,
    /// Dead-lettered records per source, all reasons.
    pub dead_letters_total: Family<labels::Source, Counter>,
    /// Records behind the watermark per source and late policy.
    pub late_records: Family<labels::SourcePolicy, Counter>,
    /// Watermark per source and worker, seconds since the epoch.
    pub watermark: Family<labels::SourceWorker, Gauge<f64, AtomicU64>>,
    /// Wall clock minus watermark per source and worker, seconds.
    pub watermark_lag: Family<labels::SourceWorker, Gauge<f64, AtomicU64>>,
    /// Nodes per health status (this process's share of the keys).
    pub nodes: Family<labels::Status, Gauge>,
    /// Sink write failures.
    pub sink_errors: Family<labels::Sink, Counter>,
    /// Readiness: set once the dataflow runs, cleared when it stops.
    pub ready: AtomicBool,
    /// Total records read by all sources, for the status line.
    pub records_total: Counter,
    /// Kafka sources and sinks.
    pub kafka: Arc<edgeflow_connectors::kafka::KafkaMetrics>,
    /// Inference operators.
    pub inference: InferenceMetrics,
    /// Federated training.
    pub federated: FederatedMetrics,
    /// Checkpoints.
    pub checkpoints: CheckpointMetrics,
    node_counts: [AtomicI64; 4],
    /// The node gauges, in [`HealthStatus::ALL`] order.
    node_gauges: [Gauge; 4],
    /// Every source driver's watermark-lag gauge, for the status line.
    lag_gauges: std::sync::Mutex<Vec<Gauge<f64, AtomicU64>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("edgeflow");
        let metrics = Self {
            source_records: Family::default(),
            operator_records: Family::default(),
            sink_records: Family::default(),
            dead_letters: Family::default(),
            dead_letters_total: Family::default(),
            late_records: Family::default(),
            watermark: Family::default(),
            watermark_lag: Family::default(),
            nodes: Family::default(),
            sink_errors: Family::default(),
            ready: AtomicBool::new(false),
            records_total: Counter::default(),
            kafka: Arc::default(),
            inference: InferenceMetrics::default(),
            federated: FederatedMetrics::default(),
            checkpoints: CheckpointMetrics::default(),
            node_counts: Default::default(),
            node_gauges: Default::default(),
            lag_gauges: Default::default(),
            registry: Registry::default(),
        };
        registry.register("source_records", "Records read per source", metrics.source_records.clone());
        registry.register(
            "operator_records",
            "Records in and out per operator and port",
            metrics.operator_records.clone(),
        );
        registry.register("sink_records", "Records written per sink", metrics.sink_records.clone());
        registry.register(
            "dead_letters",
            "Records sent to the dead-letter output, per source and reason",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "source_dead_letters",
            "Records sent to the dead-letter output, per source",
            metrics.dead_letters_total.clone(),
        );
        registry.register(
            "late_records",
            "Records behind their source's watermark, per source and late policy",
            metrics.late_records.clone(),
        );
        registry.register(
            "watermark_seconds",
            "Source watermark per worker, seconds since the Unix epoch",
            metrics.watermark.clone(),
        );
        registry.register(
            "watermark_lag_seconds",
            "Wall clock minus the source watermark per worker, seconds",
            metrics.watermark_lag.clone(),
        );
        registry.register("nodes", "Edge nodes per health status", metrics.nodes.clone());
        registry.register("sink_errors", "Sink write failures", metrics.sink_errors.clone());
        registry.register("records_read", "Records read by all sources", metrics.records_total.clone());
        metrics.kafka.register(&mut registry);
        metrics.inference.register(&mut registry);
        metrics.federated.register(&mut registry);
        metrics.checkpoints.register(&mut registry);
        let node_gauges = HealthStatus::ALL.map(|status| {
            let gauge = metrics.nodes.get_or_create(&labels::Status { status: status.as_str() }).clone();
            gauge.set(0);
            gauge
        });
        Self { registry, node_gauges, ..metrics }
    }

    /// Applies a change of `diff` nodes in `status`.
    pub fn add_nodes(&self, status: HealthStatus, diff: i64) {
        let count = self.node_counts[status.index()].fetch_add(diff, Ordering::Relaxed) + diff;
        self.node_gauges[status.index()].set(count);
    }

    /// Nodes per status, in [`HealthStatus::ALL`] order.
    pub fn node_counts(&self) -> [i64; 4] {
        std::array::from_fn(|i| self.node_counts[i].load(Ordering::Relaxed))
    }

    /// The watermark-lag gauge of `source` on `worker`, kept for the status line too.
    pub fn watermark_lag_of(&self, source: &str, worker: usize) -> Gauge<f64, AtomicU64> {
        let gauge =
            self.watermark_lag.get_or_create(&labels::SourceWorker { source: source.to_owned(), worker }).clone();
        self.lag_gauges.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(gauge.clone());
        gauge
    }

    /// The largest watermark lag over all sources and workers, ms.
    pub fn max_watermark_lag(&self) -> Option<i64> {
        let gauges = self.lag_gauges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        gauges.iter().map(|gauge| (gauge.get() * 1000.0) as i64).max()
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode_openmetrics(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric: what `/metrics`
    /// serves, and what `promtool check metrics` validates.
    pub fn encode(&self) -> String {
        to_prometheus_text(&self.encode_openmetrics())
    }
}

/// Converts OpenMetrics text to the classic Prometheus text format: counters' `HELP` and
/// `TYPE` lines name the `_total` series, and `# EOF` and `# UNIT` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Serves `/metrics`, `/health` and `/ready` on `address` from a background thread; returns
/// the bound address (useful with port 0).
pub fn serve(metrics: Arc<Metrics>, address: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("edgeflow-http".into()).spawn(move || {
        runtime.block_on(async move {
            use axum::http::StatusCode;
            use axum::routing::get;
            let metrics_route = metrics.clone();
            let ready_route = metrics.clone();
            let app = axum::Router::new()
                .route(
                    "/metrics",
                    get(move || {
                        let metrics = metrics_route.clone();
                        async move {
                            (
                                [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
                                metrics.encode(),
                            )
                        }
                    }),
                )
                .route("/health", get(|| async { "ok\n" }))
                .route(
                    "/ready",
                    get(move || {
                        let metrics = ready_route.clone();
                        async move {
                            if metrics.ready.load(Ordering::Relaxed) {
                                (StatusCode::OK, "ready\n")
                            } else {
                                (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                            }
                        }
                    }),
                );
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => crate::http::serve(listener, app, crate::http::Limits::default()).await,
                Err(err) => tracing::error!(%err, "metrics server could not start"),
            }
        });
    })?;
    Ok(bound)
}

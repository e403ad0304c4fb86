//! `edgeflow model inspect` and `edgeflow model bench`: what a model takes and gives, and how
//! fast it runs at a batch size, through the same code path the inference operator uses.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use edgeflow_connectors::onnx::{ModelError, OnnxModel, SessionOptions};
use edgeflow_operators::Tensor;
use rand::{Rng, SeedableRng};

/// Why `edgeflow model` failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelCliError {
    /// The path is neither a model directory nor a file.
    #[error("`{0}` is neither a model directory nor an .onnx file\nhint: pass a registry entry such as pipelines/models/anomaly, or a model.onnx")]
    NotAModel(String),
    /// The model did not load or run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A batch size of 0.
    #[error("--batch must be at least 1")]
    EmptyBatch,
    /// An input with a dynamic dimension after the first.
    #[error("dimension {index} of input `{input}` is dynamic ({shape:?}); only the first may be")]
    Dynamic {
        /// The dimension.
        index: usize,
        /// The input.
        input: String,
        /// Its shape.
        shape: Vec<i64>,
    },
    /// No version loaded.
    #[error("the model has no version")]
    NoVersion,
}

/// Loads a model directory of a registry (`models/anomaly`) or a single `.onnx` file.
pub fn load(path: &Path, options: SessionOptions) -> Result<OnnxModel, ModelCliError> {
    if path.is_file() {
        Ok(OnnxModel::from_file(path, options)?)
    } else if path.is_dir() {
        Ok(OnnxModel::load(path, options)?)
    } else {
        Err(ModelCliError::NotAModel(path.display().to_string()))
    }
}

/// The model's versions, inputs, outputs and metadata, as text or JSON.
pub fn inspect(model: &OnnxModel, json: bool) -> String {
    if json {
        let value = serde_json::json!({
            "name": model.name(),
            "description": model.description(),
            "versions": model.version_info(),
            "latest": model.latest(),
            "inputs": model.interface().inputs,
            "outputs": model.interface().outputs,
            "onnx_runtime": edgeflow_connectors::onnx::runtime::library_path(),
        });
        return serde_json::to_string_pretty(&value).unwrap_or_default();
    }
    let mut out = String::new();
    let _ = writeln!(out, "model {}", model.name());
    if let Some(description) = model.description() {
        let _ = writeln!(out, "  description: {description}");
    }
    let _ = writeln!(out, "inputs:");
    for spec in &model.interface().inputs {
        let _ = writeln!(out, "  {:<16} {:<8} {:?}", spec.name, spec.element, spec.shape);
    }
    let _ = writeln!(out, "outputs:");
    for spec in &model.interface().outputs {
        let _ = writeln!(out, "  {:<16} {:<8} {:?}", spec.name, spec.element, spec.shape);
    }
    let _ = writeln!(out, "versions (the latest serves unpinned requests):");
    for info in model.version_info() {
        let _ = writeln!(out, "  {} {}", info.version, info.path.display());
        for (key, value) in &info.metadata {
            let _ = writeln!(out, "      {key}: {value}");
        }
    }
    out
}

/// What a benchmark measured.
#[derive(Debug, serde::Serialize)]
pub struct BenchReport {
    /// Model name.
    pub model: String,
    /// Version run.
    pub version: u64,
    /// Rows per run.
    pub batch: usize,
    /// Runs measured (after warm-up).
    pub runs: usize,
    /// Wall time of the measured runs, seconds.
    pub seconds: f64,
    /// Rows per second.
    pub rows_per_second: f64,
    /// Run latency percentiles, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

/// Runs the latest version on random inputs of `batch` rows (seeded) for `duration`, after
/// a short warm-up.
pub fn bench(model: &mut OnnxModel, batch: usize, duration: Duration) -> Result<BenchReport, ModelCliError> {
    if batch == 0 {
        return Err(ModelCliError::EmptyBatch);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut inputs = BTreeMap::new();
    for spec in &model.interface().inputs {
        let mut shape = vec![batch];
        for (index, dim) in spec.shape.iter().enumerate().skip(1) {
            let dim = usize::try_from(*dim).map_err(|_| ModelCliError::Dynamic {
                index,
                input: spec.name.clone(),
                shape: spec.shape.clone(),
            })?;
            shape.push(dim);
        }
        let data = (0..shape.iter().product::<usize>()).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        inputs.insert(spec.name.clone(), Tensor { shape, data });
    }
    let version = model.latest().ok_or(ModelCliError::NoVersion)?;
    for _ in 0..3 {
        model.run(Some(version), &[&inputs])?;
    }
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration || latencies.len() < 10 {
        let run = Instant::now();
        model.run(Some(version), &[&inputs])?;
        latencies.push(run.elapsed().as_secs_f64() * 1000.0);
    }
    let seconds = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Ok(BenchReport {
        model: model.name().to_owned(),
        version,
        batch,
        runs: latencies.len(),
        seconds,
        rows_per_second: (latencies.len() * batch) as f64 / seconds,
        p50_ms: percentile(0.5),
        p99_ms: percentile(0.99),
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "model {} version {}, batch {}: {} runs in {:.2} s, {:.0} rows/s; run latency p50 {:.3} ms, p99 {:.3} ms",
            self.model,
            self.version,
            self.batch,
            self.runs,
            self.seconds,
            self.rows_per_second,
            self.p50_ms,
            self.p99_ms
        )
    }
}

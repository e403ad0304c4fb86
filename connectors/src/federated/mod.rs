//! Files of federated training: the dataset the simulated clients train on, the CSV of
//! per-round convergence, and the trained model exported to a model registry as ONNX.

use std::io::Write;
use std::path::{Path, PathBuf};

use edgeflow_operators::federated::config::{Export, FederatedConfig};
use edgeflow_operators::federated::coordinator::{Coordinator, RoundSummary};
use edgeflow_operators::federated::learn::{Dataset, Softmax};
use edgeflow_operators::federated::operator::{FederatedData, RoundsOutput};

use crate::ConnectorError;

/// Loads the dataset of `config` and splits it over the simulated clients.
pub fn load(config: &FederatedConfig) -> Result<FederatedData, ConnectorError> {
    let path = config.dataset.display().to_string();
    let text = std::fs::read_to_string(&config.dataset)
        .map_err(|source| ConnectorError::Read { path: path.clone(), source })?;
    let data = Dataset::parse_csv(&text, config.feature_scale)
        .map_err(|err| ConnectorError::Data { what: format!("dataset `{path}`"), reason: err.to_string() })?;
    Ok(FederatedData::split(&data, config))
}

/// The CSV of per-round convergence (`csv:`) and the model export (`export:`) of one
/// federated operator.
#[derive(Debug)]
pub struct RoundFiles {
    operator: String,
    /// The CSV's path; the file is created (with its header) at the first round, or taken
    /// up at a restore.
    csv_path: Option<PathBuf>,
    csv: Option<std::fs::File>,
    export: Option<Export>,
}

impl RoundFiles {
    /// The files of operator `operator`; a CSV that cannot be created is logged and skipped
    /// (training goes on).
    pub fn create(operator: &str, config: &FederatedConfig) -> Self {
        Self { operator: operator.to_owned(), csv_path: config.csv.clone(), csv: None, export: config.export.clone() }
    }

    /// The CSV, created with its header on first use.
    fn csv(&mut self) -> Option<&mut std::fs::File> {
        if self.csv.is_none() {
            self.csv = self.csv_path.take().and_then(|path| create_csv(&path));
        }
        self.csv.as_mut()
    }
}

/// The CSV at `path` as of a checkpoint after round `closed`: its rows of later rounds (run
/// after the checkpoint, and run again now) are cut off; open for appending.
fn resume_csv(path: &Path, closed: u64) -> Option<std::fs::File> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.lines();
    let Some(header) = lines.next() else { return create_csv(path) };
    let mut kept = format!("{header}\n");
    for line in lines {
        let round = line.split(',').next().and_then(|r| r.parse::<u64>().ok());
        if round.is_some_and(|round| round <= closed) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    let written = std::fs::write(path, kept).and_then(|()| std::fs::OpenOptions::new().append(true).open(path));
    match written {
        Ok(file) => Some(file),
        Err(err) => {
            tracing::error!(path = %path.display(), %err, "cannot take up the federated CSV");
            None
        }
    }
}

/// The CSV with its header.
fn create_csv(path: &Path) -> Option<std::fs::File> {
    match std::fs::File::create(path) {
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
    }
}

impl RoundsOutput for RoundFiles {
    fn round_closed(&mut self, summary: &RoundSummary, test_loss: f64, test_accuracy: f64) {
        let Some(file) = self.csv() else { return };
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

    fn restored(&mut self, closed: u64) {
        if let Some(path) = self.csv_path.take() {
            self.csv = resume_csv(&path, closed);
        }
    }

    fn finished(&mut self, shape: &Softmax, coordinator: &Coordinator) {
        let Some(export) = self.export.take() else { return };
        match write_onnx(&export, shape, coordinator) {
            Ok(path) => {
                tracing::info!(operator = %self.operator, path = %path.display(), "trained model exported to ONNX")
            }
            Err(err) => tracing::error!(operator = %self.operator, %err, "cannot export the trained model"),
        }
    }
}

/// Writes the global model as `REGISTRY/MODEL/VERSION/model.onnx`, beside and then renamed
/// into place, so a registry being watched never shows a half-written version.
fn write_onnx(export: &Export, shape: &Softmax, coordinator: &Coordinator) -> std::io::Result<PathBuf> {
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

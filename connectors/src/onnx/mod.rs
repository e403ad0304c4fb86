//! ONNX models: a versioned model registry on disk, and model runs through ONNX Runtime.
//!
//! A registry is a directory with one directory per model and one numbered directory per
//! version (the layout of Triton and TF Serving):
//!
//! ```text
//! models/
//!   anomaly/
//!     model.json          optional: description and the declared interface
//!     1/model.onnx
//!     2/model.onnx
//! ```
//!
//! `model.json` is `{"description": "...", "inputs": [{"name": "x", "type": "float32",
//! "shape": [-1, 4]}], "outputs": [...]}` (`-1` for a dynamic dimension). Every version must
//! have the declared interface, or, without `model.json`, the interface of the lowest
//! version. Inputs are float32 with a dynamic first (batch) dimension; outputs are float32,
//! float64, int64 or int32 tensors with a dynamic first dimension (converted to f32).
//! A version directory that appears while running is loaded by [`OnnxModel::refresh`]; write
//! it under another name and rename it into place, so no half-written file is seen.

pub mod runtime;
mod service;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use edgeflow_operators::Tensor;
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};
use serde::{Deserialize, Serialize};

pub use service::{InferenceService, Job, ServedModel, ServiceOptions};

/// Element types of model inputs and outputs that edgeflow handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ElementType {
    /// 32-bit float.
    Float32,
    /// 64-bit float (outputs only).
    Float64,
    /// 64-bit integer (outputs only).
    Int64,
    /// 32-bit integer (outputs only).
    Int32,
}

impl ElementType {
    fn from_ort(ty: TensorElementType) -> Option<Self> {
        match ty {
            TensorElementType::Float32 => Some(ElementType::Float32),
            TensorElementType::Float64 => Some(ElementType::Float64),
            TensorElementType::Int64 => Some(ElementType::Int64),
            TensorElementType::Int32 => Some(ElementType::Int32),
            _ => None,
        }
    }
}

impl fmt::Display for ElementType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ElementType::Float32 => "float32",
            ElementType::Float64 => "float64",
            ElementType::Int64 => "int64",
            ElementType::Int32 => "int32",
        })
    }
}

/// One input or output of a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// Name in the graph.
    pub name: String,
    /// Element type.
    #[serde(rename = "type")]
    pub element: ElementType,
    /// Dimensions; `-1` is dynamic.
    pub shape: Vec<i64>,
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {:?}", self.name, self.element, self.shape)
    }
}

/// A model's inputs and outputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInterface {
    /// Inputs, in graph order.
    pub inputs: Vec<TensorSpec>,
    /// Outputs, in graph order.
    pub outputs: Vec<TensorSpec>,
}

/// Why a model could not be loaded or run, by whose fault it is; the message names the
/// model, file or input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A request's inputs, or the version it pins, do not fit the model (the sender's).
    #[error("{0}")]
    Request(String),
    /// The registry, a model's directory or files are not as they must be (the user's).
    #[error("{0}")]
    Registry(String),
    /// ONNX Runtime could not load or run a model, or its outputs do not fit.
    #[error("{0}")]
    Runtime(String),
    /// The ONNX Runtime library is missing or cannot start (the setup's).
    #[error("{0}")]
    Library(String),
    /// A model's thread stopped (a bug).
    #[error("{0}")]
    Stopped(String),
}

impl ModelError {
    /// Whose fault the error is.
    pub fn fault(&self) -> crate::Fault {
        match self {
            ModelError::Request(_) | ModelError::Registry(_) | ModelError::Library(_) => crate::Fault::User,
            ModelError::Runtime(_) => crate::Fault::External,
            ModelError::Stopped(_) => crate::Fault::Internal,
        }
    }

    /// Whether trying again can help: none of these pass by themselves.
    pub fn retryable(&self) -> bool {
        false
    }
}

impl ModelInterface {
    /// Checks that a request's tensors fit: every input present (and no other), float32
    /// values whose dimensions after the first match, and the same number of rows in each.
    pub fn check(&self, model: &str, inputs: &BTreeMap<String, Tensor>) -> Result<usize, ModelError> {
        let mut rows = None;
        for spec in &self.inputs {
            let Some(tensor) = inputs.get(&spec.name) else {
                return Err(ModelError::Request(format!(
                    "model `{model}` needs input `{}` ({spec}); the request has none",
                    spec.name
                )));
            };
            let fits = tensor.shape.len() == spec.shape.len()
                && tensor.shape.iter().zip(&spec.shape).skip(1).all(|(d, s)| *s < 0 || *d as i64 == *s);
            if !fits || tensor.rows() == 0 {
                return Err(ModelError::Request(format!(
                    "input `{}` has shape {:?}; model `{model}` expects {:?} (-1: any size, at least 1 row)",
                    spec.name, tensor.shape, spec.shape
                )));
            }
            match rows {
                Some(rows) if rows != tensor.rows() => {
                    return Err(ModelError::Request(format!(
                        "inputs of model `{model}` have different row counts ({rows} and {})",
                        tensor.rows()
                    )))
                }
                _ => rows = Some(tensor.rows()),
            }
        }
        if let Some(extra) = inputs.keys().find(|name| !self.inputs.iter().any(|s| &s.name == *name)) {
            let known: Vec<&str> = self.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(ModelError::Request(format!(
                "model `{model}` has no input `{extra}` (inputs: {})",
                known.join(", ")
            )));
        }
        Ok(rows.unwrap_or(1))
    }
}

/// The optional `model.json` of a model directory.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelJson {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    inputs: Option<Vec<TensorSpec>>,
    #[serde(default)]
    outputs: Option<Vec<TensorSpec>>,
}

/// ONNX Runtime settings of a model's sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionOptions {
    /// Threads inside one operator (0: ONNX Runtime's default, one per core).
    pub intra_op_threads: usize,
    /// Threads running independent operators in parallel (0: default).
    pub inter_op_threads: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self { intra_op_threads: 1, inter_op_threads: 1 }
    }
}

/// A loaded model: every valid version, each with its ONNX Runtime session.
pub struct OnnxModel {
    name: String,
    dir: PathBuf,
    options: SessionOptions,
    description: Option<String>,
    declared: Option<ModelInterface>,
    interface: ModelInterface,
    versions: BTreeMap<u64, Version>,
    /// Version files that failed to load, with their modification time (retried once the
    /// file changes) and the reason.
    failed: BTreeMap<u64, (Option<SystemTime>, String)>,
}

impl fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnnxModel")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("versions", &self.versions.keys().collect::<Vec<_>>())
            .finish()
    }
}

struct Version {
    session: Session,
    path: PathBuf,
    metadata: BTreeMap<String, String>,
}

/// What a model file's metadata says, for `edgeflow model inspect`.
#[derive(Clone, Debug, Serialize)]
pub struct VersionInfo {
    /// Version number.
    pub version: u64,
    /// The file.
    pub path: PathBuf,
    /// Producer, graph name, description, custom properties.
    pub metadata: BTreeMap<String, String>,
}

impl OnnxModel {
    /// Loads every version of the model in `dir` (named after the directory), checking
    /// each against the declared interface. Fails if any version cannot be loaded, so a
    /// broken registry is found at start.
    pub fn load(dir: &Path, options: SessionOptions) -> Result<Self, ModelError> {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ModelError::Registry(format!("`{}` is not a model directory", dir.display())))?
            .to_owned();
        if !dir.is_dir() {
            return Err(ModelError::Registry(format!("model `{name}`: `{}` is not a directory", dir.display())));
        }
        let json_path = dir.join("model.json");
        let json: ModelJson = match std::fs::read(&json_path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|err| ModelError::Registry(format!("`{}`: {err}", json_path.display())))?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => ModelJson::default(),
            Err(err) => return Err(ModelError::Registry(format!("cannot read `{}`: {err}", json_path.display()))),
        };
        let declared = match (json.inputs, json.outputs) {
            (Some(inputs), Some(outputs)) => Some(ModelInterface { inputs, outputs }),
            (None, None) => None,
            _ => {
                return Err(ModelError::Registry(format!(
                    "`{}` must declare both `inputs` and `outputs`, or neither",
                    json_path.display()
                )))
            }
        };
        let found = version_dirs(dir)?;
        if found.is_empty() {
            return Err(ModelError::Registry(format!(
                "model `{name}` has no versions: expected `{}/1/model.onnx` (one numbered directory per version)",
                dir.display()
            )));
        }
        let mut model = OnnxModel {
            name,
            dir: dir.to_path_buf(),
            options,
            description: json.description,
            interface: declared.clone().unwrap_or(ModelInterface { inputs: Vec::new(), outputs: Vec::new() }),
            declared,
            versions: BTreeMap::new(),
            failed: BTreeMap::new(),
        };
        for (version, path) in found {
            model.load_version(version, &path)?;
        }
        Ok(model)
    }

    /// Loads one `.onnx` file as a model of one version (the number of its directory, else
    /// 1), named after the file; its interface is the file's own.
    pub fn from_file(path: &Path, options: SessionOptions) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(ModelError::Registry(format!("`{}` is not a file", path.display())));
        }
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let numbered: Option<u64> = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok());
        let version_dir = numbered.is_some();
        let version = numbered.unwrap_or(1);
        // `registry/NAME/3/model.onnx` is version 3 of NAME; any other file is named after itself.
        let registry_name = dir.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).filter(|_| version_dir);
        let name = registry_name.or_else(|| path.file_stem().and_then(|n| n.to_str())).unwrap_or("model").to_owned();
        let mut model = OnnxModel {
            name,
            dir,
            options,
            description: None,
            declared: None,
            interface: ModelInterface { inputs: Vec::new(), outputs: Vec::new() },
            versions: BTreeMap::new(),
            failed: BTreeMap::new(),
        };
        model.load_version(version, path)?;
        Ok(model)
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its interface.
    pub fn interface(&self) -> &ModelInterface {
        &self.interface
    }

    /// Its description, from `model.json`.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    /// Loaded versions, ascending.
    pub fn versions(&self) -> Vec<u64> {
        self.versions.keys().copied().collect()
    }

    /// The latest loaded version.
    pub fn latest(&self) -> Option<u64> {
        self.versions.keys().next_back().copied()
    }

    /// Each loaded version's file and metadata.
    pub fn version_info(&self) -> Vec<VersionInfo> {
        self.versions
            .iter()
            .map(|(version, v)| VersionInfo { version: *version, path: v.path.clone(), metadata: v.metadata.clone() })
            .collect()
    }

    /// Loads versions that appeared (or changed after failing) since the last look; returns
    /// the versions loaded and the errors of those that failed.
    pub fn refresh(&mut self) -> (Vec<u64>, Vec<String>) {
        let (mut loaded, mut errors) = (Vec::new(), Vec::new());
        let found = match version_dirs(&self.dir) {
            Ok(found) => found,
            Err(err) => return (loaded, vec![err.to_string()]),
        };
        for (version, path) in found {
            if self.versions.contains_key(&version) {
                continue;
            }
            let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            if self.failed.get(&version).is_some_and(|(seen, _)| *seen == modified) {
                continue;
            }
            match self.load_version(version, &path) {
                Ok(()) => {
                    self.failed.remove(&version);
                    loaded.push(version);
                }
                Err(err) => {
                    self.failed.insert(version, (modified, err.to_string()));
                    errors.push(err.to_string());
                }
            }
        }
        (loaded, errors)
    }

    fn load_version(&mut self, version: u64, path: &Path) -> Result<(), ModelError> {
        let environment = runtime::environment()?;
        if !path.is_file() {
            return Err(ModelError::Registry(format!(
                "model `{}` version {version}: `{}` is missing",
                self.name,
                path.display()
            )));
        }
        let cannot = |err: ort::Error| {
            ModelError::Runtime(format!("cannot load model `{}` from `{}`: {err}", self.name, path.display()))
        };
        let mut builder = Session::builder(environment).map_err(cannot)?;
        if self.options.intra_op_threads > 0 {
            builder = builder.with_intra_threads(self.options.intra_op_threads).map_err(|e| cannot(e.into()))?;
        }
        if self.options.inter_op_threads > 0 {
            builder = builder.with_inter_threads(self.options.inter_op_threads).map_err(|e| cannot(e.into()))?;
        }
        let session = builder.commit_from_file(path).map_err(cannot)?;
        let interface = ModelInterface {
            inputs: specs(&session.inputs().iter().map(|o| (o.name(), o.dtype())).collect::<Vec<_>>(), path, true)?,
            outputs: specs(&session.outputs().iter().map(|o| (o.name(), o.dtype())).collect::<Vec<_>>(), path, false)?,
        };
        let expected = self.declared.as_ref().or_else(|| self.versions.is_empty().then_some(&interface));
        if let Some(expected) = expected {
            compare(
                expected,
                &interface,
                path,
                if self.declared.is_some() { "model.json" } else { "the first version" },
            )?;
        } else {
            compare(&self.interface, &interface, path, "the first version")?;
        }
        if self.versions.is_empty() && self.declared.is_none() {
            self.interface = interface;
        }
        let metadata = metadata(&session);
        self.versions.insert(version, Version { session, path: path.to_path_buf(), metadata });
        Ok(())
    }

    /// Runs `version` (the latest if `None`) on a batch: each request's tensors (already
    /// checked with [`ModelInterface::check`]) are stacked along the first dimension, and the
    /// outputs split back per request. Returns the version that ran.
    pub fn run(
        &mut self,
        version: Option<u64>,
        batch: &[&BTreeMap<String, Tensor>],
    ) -> Result<(u64, Vec<BTreeMap<String, Tensor>>), ModelError> {
        let stacked = Batch::stack(&self.interface, batch)?;
        let (version, outputs) = self.run_stacked(version, &stacked.inputs)?;
        Ok((version, stacked.split(outputs)?))
    }

    /// Runs `version` (the latest if `None`) on stacked inputs (one tensor per model input,
    /// in interface order); returns the version that ran and one stacked tensor per output.
    pub fn run_stacked(&mut self, version: Option<u64>, inputs: &[Tensor]) -> Result<(u64, Vec<Tensor>), ModelError> {
        let version = match version {
            Some(version) => version,
            None => self
                .latest()
                .ok_or_else(|| ModelError::Runtime(format!("model `{}` has no loaded version", self.name)))?,
        };
        let Some(loaded) = self.versions.get_mut(&version) else {
            let have: Vec<String> = self.versions.keys().map(u64::to_string).collect();
            let why = match self.failed.get(&version) {
                Some((_, reason)) => format!("; it failed to load: {reason}"),
                None => String::new(),
            };
            return Err(ModelError::Request(format!(
                "model `{}` has no version {version} (loaded: {}){why}",
                self.name,
                have.join(", ")
            )));
        };
        let mut values: Vec<(&str, ort::value::TensorRef<'_, f32>)> = Vec::with_capacity(inputs.len());
        for (spec, tensor) in self.interface.inputs.iter().zip(inputs) {
            let value = ort::value::TensorRef::from_array_view((tensor.shape.clone(), tensor.data.as_slice()))
                .map_err(|err| ModelError::Request(format!("input `{}`: {err}", spec.name)))?;
            values.push((spec.name.as_str(), value));
        }
        let outputs = loaded
            .session
            .run(values)
            .map_err(|err| ModelError::Runtime(format!("model `{}` version {version} failed: {err}", self.name)))?;
        let mut stacked = Vec::with_capacity(self.interface.outputs.len());
        for spec in &self.interface.outputs {
            let value = outputs
                .get(&spec.name)
                .ok_or_else(|| ModelError::Runtime(format!("output `{}` missing", spec.name)))?;
            let (shape, data) = extract_f32(value, spec.element)
                .map_err(|err| ModelError::Runtime(format!("output `{}`: {err}", spec.name)))?;
            stacked.push(Tensor { shape, data });
        }
        Ok((version, stacked))
    }
}

/// Requests' inputs stacked into one tensor per model input, and how to split the outputs
/// back: made and split on the caller's thread, so that only whole batches cross to the
/// model's thread.
#[derive(Debug, Default)]
pub struct Batch {
    /// One tensor per model input, in interface order.
    pub inputs: Vec<Tensor>,
    /// Rows of each request.
    pub rows: Vec<usize>,
    output_names: Vec<String>,
}

impl Batch {
    /// Stacks the inputs of `batch` (each checked with [`ModelInterface::check`]).
    pub fn stack(interface: &ModelInterface, batch: &[&BTreeMap<String, Tensor>]) -> Result<Self, ModelError> {
        let rows: Vec<usize> = batch.iter().map(|inputs| inputs.values().next().map_or(1, Tensor::rows)).collect();
        let total = rows
            .iter()
            .try_fold(0usize, |total, rows| total.checked_add(*rows))
            .ok_or_else(|| ModelError::Request(format!("the batch's row counts {rows:?} overflow")))?;
        let mut stacked = Vec::with_capacity(interface.inputs.len());
        for spec in &interface.inputs {
            let mut shape = Vec::new();
            let mut data = Vec::new();
            for inputs in batch {
                let tensor = inputs
                    .get(&spec.name)
                    .ok_or_else(|| ModelError::Request(format!("input `{}` missing", spec.name)))?;
                if shape.is_empty() {
                    shape = tensor.shape.clone();
                    let per_row = tensor.data.len() / tensor.rows().max(1);
                    data.reserve(total.saturating_mul(per_row).min(Tensor::MAX_VALUES));
                }
                data.extend_from_slice(&tensor.data);
            }
            if let Some(first) = shape.first_mut() {
                *first = total;
            }
            stacked.push(Tensor { shape, data });
        }
        let output_names = interface.outputs.iter().map(|s| s.name.clone()).collect();
        Ok(Self { inputs: stacked, rows, output_names })
    }

    /// Splits stacked outputs (one per model output, in interface order) per request.
    pub fn split(&self, outputs: Vec<Tensor>) -> Result<Vec<BTreeMap<String, Tensor>>, ModelError> {
        let total = self.rows.iter().try_fold(0usize, |total, rows| total.checked_add(*rows));
        let mut results: Vec<BTreeMap<String, Tensor>> = vec![BTreeMap::new(); self.rows.len()];
        for (name, output) in self.output_names.iter().zip(outputs) {
            if total.is_none() || output.shape.first().copied() != total {
                return Err(ModelError::Runtime(format!(
                    "output `{name}` has shape {:?}, not {total:?} rows",
                    output.shape
                )));
            }
            let mismatch = || {
                ModelError::Runtime(format!(
                    "output `{name}` has shape {:?} but {} values",
                    output.shape,
                    output.data.len()
                ))
            };
            let per_row = output
                .shape
                .iter()
                .skip(1)
                .try_fold(1usize, |product, dim| product.checked_mul(*dim))
                .ok_or_else(mismatch)?;
            let mut offset = 0usize;
            for (result, rows) in results.iter_mut().zip(&self.rows) {
                let mut shape = output.shape.clone();
                shape[0] = *rows;
                let end = rows.checked_mul(per_row).and_then(|len| offset.checked_add(len)).ok_or_else(mismatch)?;
                let data = output.data.get(offset..end).ok_or_else(mismatch)?;
                result.insert(name.clone(), Tensor { shape, data: data.to_vec() });
                offset = end;
            }
        }
        Ok(results)
    }
}

fn extract_f32(value: &ort::value::DynValue, element: ElementType) -> Result<(Vec<usize>, Vec<f32>), ort::Error> {
    fn convert<T: ort::value::PrimitiveTensorElementType + Copy>(
        value: &ort::value::DynValue,
        f: impl Fn(T) -> f32,
    ) -> Result<(Vec<usize>, Vec<f32>), ort::Error> {
        let (shape, data) = value.try_extract_tensor::<T>()?;
        Ok((shape.iter().map(|d| *d as usize).collect(), data.iter().map(|v| f(*v)).collect()))
    }
    match element {
        ElementType::Float32 => convert::<f32>(value, |v| v),
        ElementType::Float64 => convert::<f64>(value, |v| v as f32),
        ElementType::Int64 => convert::<i64>(value, |v| v as f32),
        ElementType::Int32 => convert::<i32>(value, |v| v as f32),
    }
}

/// Numbered version directories of a model, ascending, with their `model.onnx` path.
pub fn version_dirs(dir: &Path) -> Result<Vec<(u64, PathBuf)>, ModelError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|err| ModelError::Registry(format!("cannot read model directory `{}`: {err}", dir.display())))?;
    let mut found: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u64>().ok()?;
            Some((version, e.path().join("model.onnx")))
        })
        .collect();
    found.sort();
    Ok(found)
}

fn specs(outlets: &[(&str, &ValueType)], path: &Path, input: bool) -> Result<Vec<TensorSpec>, ModelError> {
    let what = if input { "input" } else { "output" };
    outlets
        .iter()
        .map(|(name, dtype)| {
            let ValueType::Tensor { ty, shape, .. } = dtype else {
                return Err(ModelError::Registry(format!("`{}`: {what} `{name}` is not a tensor ({dtype:?}); edgeflow serves tensor models", path.display())));
            };
            let element = ElementType::from_ort(*ty).filter(|e| !input || *e == ElementType::Float32).ok_or_else(|| {
                ModelError::Registry(format!(
                    "`{}`: {what} `{name}` has element type {ty}; edgeflow feeds float32 inputs and reads float32, float64, int64 or int32 outputs",
                    path.display()
                ))
            })?;
            let shape: Vec<i64> = shape.iter().copied().collect();
            if shape.first().is_none_or(|first| *first >= 0) {
                return Err(ModelError::Registry(format!(
                    "`{}`: {what} `{name}` has shape {shape:?}; edgeflow batches along a dynamic first dimension: export the model with a dynamic batch axis",
                    path.display()
                )));
            }
            Ok(TensorSpec { name: (*name).to_owned(), element, shape })
        })
        .collect()
}

fn compare(expected: &ModelInterface, found: &ModelInterface, path: &Path, against: &str) -> Result<(), ModelError> {
    for (what, expected, found) in
        [("input", &expected.inputs, &found.inputs), ("output", &expected.outputs, &found.outputs)]
    {
        for spec in expected {
            match found.iter().find(|f| f.name == spec.name) {
                None => {
                    return Err(ModelError::Registry(format!(
                        "`{}` has no {what} `{}` ({against} declares {spec})",
                        path.display(),
                        spec.name
                    )))
                }
                Some(f) if f != spec => {
                    return Err(ModelError::Registry(format!(
                        "`{}`: {what} `{}` is {} {:?}, {against} declares {} {:?}",
                        path.display(),
                        spec.name,
                        f.element,
                        f.shape,
                        spec.element,
                        spec.shape
                    )))
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = found.iter().find(|f| !expected.iter().any(|s| s.name == f.name)) {
            return Err(ModelError::Registry(format!(
                "`{}` has an {what} `{}` that {against} does not declare",
                path.display(),
                extra.name
            )));
        }
    }
    Ok(())
}

fn metadata(session: &Session) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(meta) = session.metadata() {
        let fields = [
            ("producer", meta.producer()),
            ("name", meta.name()),
            ("description", meta.description()),
            ("graph_description", meta.graph_description()),
        ];
        for (key, value) in fields {
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                out.insert(key.to_owned(), value);
            }
        }
        if let Some(version) = meta.version() {
            out.insert("model_version".to_owned(), version.to_string());
        }
        if let Ok(keys) = meta.custom_keys() {
            for key in keys {
                if let Some(value) = meta.custom(&key) {
                    out.insert(key, value);
                }
            }
        }
    }
    out
}

/// Loads the models named in `names` from the registry directory `root`.
pub fn load_registry(root: &Path, names: &[String], options: SessionOptions) -> Result<Vec<OnnxModel>, ModelError> {
    if !root.is_dir() {
        return Err(ModelError::Registry(format!("model registry `{}` is not a directory", root.display())));
    }
    names.iter().map(|name| OnnxModel::load(&root.join(name), options)).collect()
}

#[cfg(test)]
mod tests;

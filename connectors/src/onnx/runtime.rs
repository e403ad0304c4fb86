//! Finding and loading the ONNX Runtime shared library, once per process.
//!
//! `ort` is built with `load-dynamic`: nothing is downloaded at build time, and the library
//! is opened when the first model loads. It is looked for, in order:
//!
//! 1. `ORT_DYLIB_PATH` (a file path);
//! 2. the project's virtualenv: `.venv/lib/python3*/site-packages/onnxruntime/capi/
//!    libonnxruntime.so*` under the working directory or any directory above the `edgeflow`
//!    executable (`scripts/setup.sh` installs PyPI `onnxruntime==1.31.1` there).

use super::ModelError;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The ONNX Runtime release `ort` 2.0.0-rc.15 is written against.
pub const ORT_VERSION: &str = "1.31.1";

static ENVIRONMENT: OnceLock<Result<(PathBuf, ort::environment::Environment), ModelError>> = OnceLock::new();

/// The process's ONNX Runtime environment, loading the library on first use.
pub fn environment() -> Result<&'static ort::environment::Environment, ModelError> {
    match ENVIRONMENT.get_or_init(load) {
        Ok((_, environment)) => Ok(environment),
        Err(err) => Err(err.clone()),
    }
}

/// Where the loaded library came from (after [`environment`] succeeded).
pub fn library_path() -> Option<&'static Path> {
    match ENVIRONMENT.get() {
        Some(Ok((path, _))) => Some(path),
        _ => None,
    }
}

fn load() -> Result<(PathBuf, ort::environment::Environment), ModelError> {
    let path = find_library()?;
    let builder = ort::init_from(&path).map_err(|err| {
        ModelError::Library(format!("cannot load the ONNX Runtime library `{}`: {err}", path.display()))
    })?;
    let environment = builder
        .with_name("edgeflow")
        .build()
        .map_err(|err| ModelError::Library(format!("cannot start ONNX Runtime from `{}`: {err}", path.display())))?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    Ok((path, environment))
}

fn find_library() -> Result<PathBuf, ModelError> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(ModelError::Library(format!(
                "ORT_DYLIB_PATH is `{}`, which is not a file\n{}",
                path.display(),
                how_to_get()
            )))
        };
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::env::current_dir() {
        roots.push(dir);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    for root in roots {
        if let Some(found) = in_virtualenv(&root.join(".venv")) {
            return Ok(found);
        }
    }
    Err(ModelError::Library(format!("the ONNX Runtime library (libonnxruntime.so) was not found\n{}", how_to_get())))
}

fn in_virtualenv(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    for python in lib.flatten() {
        let capi = python.path().join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else { continue };
        let mut candidates: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")))
            .collect();
        candidates.sort();
        if let Some(found) = candidates.pop() {
            return Some(found);
        }
    }
    None
}

fn how_to_get() -> String {
    format!(
        "hint: run `scripts/setup.sh run` (installs PyPI onnxruntime=={ORT_VERSION} into .venv), or \
         `pip install onnxruntime=={ORT_VERSION}` and set ORT_DYLIB_PATH to its \
         onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}"
    )
}

//! Against the real ONNX Runtime library and the test models of `engine/tests/models`
//! (made by `pipelines/models/make_test_models.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use edgeflow_operators::Tensor;

use super::*;

fn test_models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/models")
}

/// A private copy of the `linear` model with only the given versions.
fn linear_copy(versions: &[u64]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("linear");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(test_models().join("linear/model.json"), model.join("model.json")).unwrap();
    for version in versions {
        std::fs::create_dir_all(model.join(version.to_string())).unwrap();
        std::fs::copy(
            test_models().join(format!("linear/{version}/model.onnx")),
            model.join(format!("{version}/model.onnx")),
        )
        .unwrap();
    }
    (dir, model)
}

fn x(rows: &[[f32; 4]]) -> BTreeMap<String, Tensor> {
    let data = rows.iter().flatten().copied().collect();
    BTreeMap::from([("x".to_owned(), Tensor { shape: vec![rows.len(), 4], data })])
}

#[test]
fn loads_versions_and_interface() {
    let model = OnnxModel::load(&test_models().join("linear"), SessionOptions::default()).unwrap();
    assert_eq!(model.versions(), vec![1, 2]);
    assert_eq!(model.latest(), Some(2));
    let interface = model.interface();
    assert_eq!(
        interface.inputs,
        vec![TensorSpec { name: "x".into(), element: ElementType::Float32, shape: vec![-1, 4] }]
    );
    assert_eq!(interface.outputs[0].shape, vec![-1, 3]);
    let info = model.version_info();
    assert_eq!(info[0].metadata.get("producer").map(String::as_str), Some("edgeflow-tests"));
}

#[test]
fn a_batch_gives_each_request_what_it_gets_alone() {
    let mut model = OnnxModel::load(&test_models().join("linear"), SessionOptions::default()).unwrap();
    let a = x(&[[1.0, 2.0, 3.0, 4.0]]);
    let b = x(&[[-1.0, 0.5, 0.0, 2.0], [0.1, 0.2, 0.3, 0.4]]);
    let (version, together) = model.run(None, &[&a, &b]).unwrap();
    assert_eq!(version, 2);
    let (_, alone_a) = model.run(Some(2), &[&a]).unwrap();
    let (_, alone_b) = model.run(Some(2), &[&b]).unwrap();
    assert_eq!(together[0], alone_a[0]);
    assert_eq!(together[1], alone_b[0]);
    assert_eq!(together[1]["y"].shape, vec![2, 3]);
    let (_, v1) = model.run(Some(1), &[&a]).unwrap();
    assert_ne!(v1[0], alone_a[0], "versions 1 and 2 have different weights");
    let err = model.run(Some(7), &[&a]).unwrap_err().to_string();
    assert_eq!(err, "model `linear` has no version 7 (loaded: 1, 2)");
}

#[test]
fn requests_are_checked_against_the_interface() {
    let model = OnnxModel::load(&test_models().join("linear"), SessionOptions::default()).unwrap();
    let interface = model.interface();
    assert_eq!(interface.check("linear", &x(&[[0.0; 4], [1.0; 4]])), Ok(2));
    let wrong = BTreeMap::from([("x".to_owned(), Tensor { shape: vec![1, 5], data: vec![0.0; 5] })]);
    assert_eq!(
        interface.check("linear", &wrong).unwrap_err().to_string(),
        "input `x` has shape [1, 5]; model `linear` expects [-1, 4] (-1: any size, at least 1 row)"
    );
    let missing = BTreeMap::from([("z".to_owned(), Tensor { shape: vec![1, 4], data: vec![0.0; 4] })]);
    assert!(interface.check("linear", &missing).unwrap_err().to_string().starts_with("model `linear` needs input `x`"));
}

#[test]
fn a_corrupt_file_or_a_mismatch_is_a_clear_error() {
    let (_dir, model) = linear_copy(&[1]);
    std::fs::write(model.join("1/model.onnx"), b"not a model").unwrap();
    let err = OnnxModel::load(&model, SessionOptions::default()).unwrap_err().to_string();
    assert!(err.starts_with("cannot load model `linear` from `"), "{err}");
    assert!(err.contains("1/model.onnx"), "{err}");

    let (_dir, model) = linear_copy(&[1]);
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("model.json")).unwrap()).unwrap();
    json["inputs"][0]["shape"] = serde_json::json!([-1, 5]);
    std::fs::write(model.join("model.json"), json.to_string()).unwrap();
    let err = OnnxModel::load(&model, SessionOptions::default()).unwrap_err().to_string();
    assert!(err.contains("input `x` is float32 [-1, 4], model.json declares float32 [-1, 5]"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir(empty.path().join("nothing")).unwrap();
    let err = OnnxModel::load(&empty.path().join("nothing"), SessionOptions::default()).unwrap_err().to_string();
    assert!(err.starts_with("model `nothing` has no versions"), "{err}");
}

#[test]
fn refresh_loads_a_new_version_and_skips_a_broken_one_until_it_changes() {
    let (_dir, model_dir) = linear_copy(&[1]);
    let mut model = OnnxModel::load(&model_dir, SessionOptions::default()).unwrap();
    assert_eq!(model.refresh(), (vec![], vec![]));
    std::fs::create_dir(model_dir.join("3")).unwrap();
    std::fs::write(model_dir.join("3/model.onnx"), b"half written").unwrap();
    let (loaded, errors) = model.refresh();
    assert!(loaded.is_empty());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(model.refresh(), (vec![], vec![]), "an unchanged broken file is not retried");
    // The complete file replaces it (a new inode and modification time).
    let staged = model_dir.join("staged.onnx");
    std::fs::copy(test_models().join("linear/2/model.onnx"), &staged).unwrap();
    std::fs::rename(&staged, model_dir.join("3/model.onnx")).unwrap();
    let file = std::fs::File::options().append(true).open(model_dir.join("3/model.onnx")).unwrap();
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(1)).unwrap();
    assert_eq!(model.refresh(), (vec![3], vec![]));
    assert_eq!(model.latest(), Some(3));
}

#[test]
fn a_federated_softmax_export_runs_in_onnx_runtime_as_in_rust() {
    use edgeflow_operators::federated::learn::Softmax;
    use edgeflow_operators::federated::onnx_export::softmax_onnx;
    let model = Softmax { features: 4, classes: 3 };
    let weights: Vec<f32> = (0..model.parameters()).map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("digits/1/model.onnx");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, softmax_onnx(&model, &weights, 1, "test")).unwrap();
    let mut onnx = OnnxModel::load(&dir.path().join("digits"), SessionOptions::default()).unwrap();
    assert_eq!(
        onnx.interface().outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
        ["probabilities", "label"]
    );
    let rows = [[0.5f32, 0.0, 1.0, 0.25], [1.0, 1.0, 0.0, 0.0]];
    let (_, outputs) = onnx.run(None, &[&x(&rows)]).unwrap();
    let probabilities = &outputs[0]["probabilities"];
    assert_eq!(probabilities.shape, vec![2, 3]);
    for (row, x) in rows.iter().enumerate() {
        // The same computation in Rust.
        let logits: Vec<f32> =
            (0..3).map(|c| weights[12 + c] + (0..4).map(|f| x[f] * weights[f * 3 + c]).sum::<f32>()).collect();
        let max = logits.iter().copied().fold(f32::MIN, f32::max);
        let total: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        for (c, logit) in logits.iter().enumerate() {
            let want = (logit - max).exp() / total;
            assert!((probabilities.data[row * 3 + c] - want).abs() < 1e-6);
        }
        let best = (0..3).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        assert_eq!(outputs[0]["label"].data[row], best as f32);
    }
}

/// Each model error says whose fault it is: a missing registry is the user's, a request that
/// does not fit the model is its sender's, a stopped model thread is ours.
#[test]
fn model_errors_say_whose_fault_they_are() {
    let err =
        load_registry(Path::new("/nonexistent/registry"), &["m".to_owned()], SessionOptions::default()).unwrap_err();
    assert!(matches!(err, ModelError::Registry(_)), "{err:?}");
    assert_eq!((err.fault(), err.retryable()), (crate::Fault::User, false));
    let interface = ModelInterface { inputs: Vec::new(), outputs: Vec::new() };
    let stray = BTreeMap::from([("x".to_owned(), Tensor { shape: vec![1], data: vec![0.0] })]);
    let err = interface.check("m", &stray).unwrap_err();
    assert!(matches!(err, ModelError::Request(_)), "{err:?}");
    assert_eq!(err.to_string(), "model `m` has no input `x` (inputs: )");
    assert_eq!(ModelError::Stopped("the thread of model `m` has stopped".into()).fault(), crate::Fault::Internal);
}

//! End-to-end tests of the `inference` operator on the real ONNX Runtime library, with the
//! test models of `engine/tests/models` (rebuilt by `pipelines/models/make_test_models.py`)
//! and reference outputs from ONNX Runtime's Python API (`onnx_reference.py`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{wait_for, Running};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/models")
}

fn edgeflow() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgeflow"));
    command.env("EDGEFLOW_LOG", "info").env_remove("EDGEFLOW_WORKERS").env_remove("EDGEFLOW_METRICS_ADDR");
    command
}

fn run(pipeline: &Path, workers: usize) -> Output {
    let output = edgeflow()
        .arg("run")
        .arg(pipeline)
        .args(["--no-metrics", "--workers", &workers.to_string()])
        .output()
        .expect("edgeflow runs");
    assert!(output.status.success(), "edgeflow failed: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn python() -> PathBuf {
    let python = root().join(".venv/bin/python");
    assert!(python.exists(), "the test virtualenv is missing: run scripts/setup.sh test");
    python
}

/// A request of the `linear` model (input `x`, 4 columns) with `rows` rows of values
/// derived from `seq`, at event time 1700000000000 + `seq`.
fn linear_request(seq: u64, rows: usize) -> Value {
    linear_request_at(seq, rows, 1_700_000_000_000)
}

fn linear_request_at(seq: u64, rows: usize, base: u64) -> Value {
    let data: Vec<f32> = (0..rows * 4).map(|k| (((seq * 7 + k as u64 * 13) % 41) as f32 - 20.0) / 8.0).collect();
    serde_json::json!({
        "id": format!("r{seq}"), "model": "linear", "timestamp": base + seq,
        "inputs": {"x": {"shape": [rows, 4], "data": data}},
    })
}

/// A `linear` request whose `x` has 5 columns instead of 4.
fn wrong_shape_request(seq: u64) -> Value {
    let mut request = linear_request(seq, 1);
    request["inputs"]["x"] = serde_json::json!({"shape": [1, 5], "data": [1, 2, 3, 4, 5]});
    request
}

fn write_lines(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn read_results(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("bad result line {line}: {err}")))
        .collect()
}

/// Reference outputs by request id, from ONNX Runtime's Python API on `model`.
fn reference(requests: &Path, model: &Path) -> HashMap<String, Value> {
    let output = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/onnx_reference.py"))
        .arg(requests)
        .arg(model)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap();
            (value["id"].as_str().unwrap().to_owned(), value["outputs"].clone())
        })
        .collect()
}

/// Asserts that two output maps hold the same shapes and values (to 1e-5).
fn assert_outputs_equal(id: &str, got: &Value, want: &Value) {
    let (got, want) = (got.as_object().unwrap(), want.as_object().unwrap());
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{id}: output names");
    for (name, tensor) in want {
        assert_eq!(got[name]["shape"], tensor["shape"], "{id}: shape of {name}");
        let (a, b) = (got[name]["data"].as_array().unwrap(), tensor["data"].as_array().unwrap());
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{id}: {name} {x} != {y}");
        }
    }
}

/// A pipeline: `source` (YAML of one source named `input`) -> inference `infer` with
/// `settings` -> file sink `results.jsonl` in `dir`.
fn pipeline(dir: &Path, source: &str, registry: &Path, settings: &str) -> PathBuf {
    let text = format!(
        "name: inference-test\nmetrics:\n  enabled: false\nsources:\n  input:\n{source}\noperators:\n  infer:\n    type: inference\n    input: input\n    registry: {}\n    models: [linear]\n{settings}\nsinks:\n  results:\n    type: file\n    input: infer\n    path: {}\n",
        registry.display(),
        dir.join("results.jsonl").display()
    );
    let path = dir.join("pipeline.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

fn file_source(requests: &Path) -> String {
    format!("    type: file\n    records: inference_requests\n    path: {}", requests.display())
}

/// A private registry with the `linear` model at the given versions.
fn registry(dir: &Path, versions: &[u64]) -> PathBuf {
    let registry = dir.join("models");
    std::fs::create_dir_all(registry.join("linear")).unwrap();
    std::fs::copy(models().join("linear/model.json"), registry.join("linear/model.json")).unwrap();
    for version in versions {
        add_version(&registry, *version);
    }
    registry
}

/// Adds `linear` version `version` the safe way: written beside, renamed into place.
fn add_version(registry: &Path, version: u64) {
    let staging = registry.join(format!("linear/.staging-{version}"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::copy(models().join(format!("linear/{version}/model.onnx")), staging.join("model.onnx")).unwrap();
    std::fs::rename(&staging, registry.join(format!("linear/{version}"))).unwrap();
}

fn by_status(results: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for result in results {
        *counts.entry(result["status"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    counts
}

#[test]
fn outputs_equal_a_direct_onnx_runtime_run_and_bad_requests_get_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let mut requests: Vec<Value> = (0..3000).map(|seq| linear_request(seq, 1 + (seq % 3) as usize)).collect();
    let wrong_shape = wrong_shape_request(90_001);
    let mut unknown_model = linear_request(90_002, 1);
    unknown_model["model"] = "resnet".into();
    let mut wrong_input = linear_request(90_003, 1);
    wrong_input["inputs"] = serde_json::json!({"z": {"shape": [1, 4], "data": [1, 2, 3, 4]}});
    requests.extend([wrong_shape, unknown_model, wrong_input]);
    let path = dir.path().join("requests.jsonl");
    write_lines(&path, &requests);
    std::fs::write(dir.path().join("requests.jsonl"), {
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"id\": \"broken\"\n");
        text
    })
    .unwrap();

    let settings = "    max_batch_size: 64\n    max_queue_delay: 20ms";
    for workers in [1, 2] {
        let pipeline = pipeline(dir.path(), &file_source(&path), &models(), settings);
        run(&pipeline, workers);
        let results = read_results(&dir.path().join("results.jsonl"));
        assert_eq!(results.len(), 3003, "one result per request ({workers} workers)");
        let mut expected = reference(&path, &models().join("linear/2/model.onnx"));
        expected.remove("r90002"); // fits the tensors, but names another model
        assert_eq!(expected.len(), 3000);
        let mut batched = 0;
        for result in &results {
            let id = result["id"].as_str().unwrap();
            match expected.get(id) {
                Some(outputs) => {
                    assert_eq!(result["status"], "ok", "{result}");
                    assert_eq!(result["version"], 2, "unpinned requests get the latest version");
                    assert_outputs_equal(id, &result["outputs"], outputs);
                    if result["batch_size"].as_u64().unwrap() > 1 {
                        batched += 1;
                    }
                }
                None => {
                    assert_eq!(result["status"], "failed", "{result}");
                    let error = result["error"].as_str().unwrap();
                    let want = match id {
                        "r90001" => "input `x` has shape [1, 5]; model `linear` expects [-1, 4]",
                        "r90002" => "model `resnet` is not served by operator `infer` (it serves: linear)",
                        _ => "model `linear` needs input `x`",
                    };
                    assert!(error.starts_with(want), "{id}: {error}");
                }
            }
        }
        // Requests that arrive together share runs.
        assert!(batched > 2900, "{batched} of 3000 requests ran in batches larger than 1 ({workers} workers)");
        let largest = results.iter().filter_map(|r| r["batch_size"].as_u64()).max().unwrap();
        assert_eq!(largest, 64, "max_batch_size caps a batch");
    }
}

#[test]
fn a_lone_request_waits_for_max_queue_delay_and_no_longer() {
    let dir = tempfile::tempdir().unwrap();
    let source =
        "    type: requests\n    model: linear\n    rate: 10\n    count: 15\n    input_name: x\n    shape: [1, 4]";
    let pipeline = pipeline(dir.path(), source, &models(), "    max_batch_size: 64\n    max_queue_delay: 40ms");
    run(&pipeline, 1);
    let results = read_results(&dir.path().join("results.jsonl"));
    assert_eq!(results.len(), 15);
    // The stream's end releases the last request at once; the others wait alone.
    let mut waits: Vec<f64> = results
        .iter()
        .filter(|r| r["id"] != "req-14")
        .map(|r| {
            assert_eq!(r["status"], "ok", "{r}");
            assert_eq!(r["batch_size"], 1, "requests 100 ms apart run alone: {r}");
            r["queue_ms"].as_f64().unwrap()
        })
        .collect();
    waits.sort_by(f64::total_cmp);
    // Each waited for its batch to fill until max_queue_delay, then ran; the timer that wakes
    // the operator fires within a few ms.
    assert!(waits[0] >= 39.0, "a lone request waits max_queue_delay for company: {waits:?}");
    assert!(waits[7] <= 45.0, "median wait beyond max_queue_delay: {waits:?}");
    assert!(waits[13] <= 60.0, "a wait far beyond max_queue_delay: {waits:?}");
}

#[test]
fn deadlines_expire_with_an_error_result() {
    let dir = tempfile::tempdir().unwrap();
    // Requests with a 10 ms budget cannot wait for a 300 ms batch window.
    let source =
        "    type: requests\n    model: linear\n    rate: 100\n    count: 20\n    input_name: x\n    shape: [1, 4]\n    deadline: 10ms";
    let window = pipeline(dir.path(), source, &models(), "    max_batch_size: 64\n    max_queue_delay: 300ms");
    run(&window, 1);
    let results = read_results(&dir.path().join("results.jsonl"));
    // The stream's end releases the last request at once, before its deadline.
    assert_eq!(by_status(&results), BTreeMap::from([("expired".to_owned(), 19), ("ok".to_owned(), 1)]));
    for result in results.iter().filter(|r| r["id"] != "req-19") {
        let error = result["error"].as_str().unwrap();
        assert!(error.starts_with("deadline ") && error.contains("ms in the queue"), "{error}");
        assert!(result["outputs"].as_object().unwrap().is_empty());
    }

    // A request already past its deadline when it arrives is not queued at all.
    let path = dir.path().join("late.jsonl");
    let mut late = linear_request(1, 1);
    late["deadline"] = 1_000.into();
    write_lines(&path, &[late, linear_request(2, 1)]);
    let late_pipeline = pipeline(dir.path(), &file_source(&path), &models(), "    max_queue_delay: 1ms");
    run(&late_pipeline, 1);
    let results = read_results(&dir.path().join("results.jsonl"));
    assert_eq!(by_status(&results), BTreeMap::from([("expired".to_owned(), 1), ("ok".to_owned(), 1)]));
    let expired = results.iter().find(|r| r["status"] == "expired").unwrap();
    assert!(expired["error"].as_str().unwrap().contains("before admission"), "{expired}");
}

#[test]
fn a_full_queue_rejects_with_the_reason_and_makes_room_for_high_priority() {
    let dir = tempfile::tempdir().unwrap();
    let requests: Vec<Value> = (0..5000)
        .map(|seq| {
            let mut request = linear_request(seq, 1);
            if seq % 100 == 0 {
                request["priority"] = "high".into();
            }
            request
        })
        .collect();
    let path = dir.path().join("requests.jsonl");
    write_lines(&path, &requests);
    let settings = "    max_batch_size: 8\n    queue_capacity: 32\n    max_queue_delay: 1ms";
    let pipeline = pipeline(dir.path(), &file_source(&path), &models(), settings);
    run(&pipeline, 1);
    let results = read_results(&dir.path().join("results.jsonl"));
    assert_eq!(results.len(), 5000, "every request gets a result, admitted or not");
    let counts = by_status(&results);
    assert!(counts.get("rejected").copied().unwrap_or(0) > 1000, "{counts:?}");
    assert!(counts.get("ok").copied().unwrap_or(0) >= 32, "{counts:?}");
    for result in &results {
        let id: u64 = result["id"].as_str().unwrap()[1..].parse().unwrap();
        if id.is_multiple_of(100) {
            assert_eq!(result["status"], "ok", "high priority is admitted ahead of normal: {result}");
        }
        if result["status"] == "rejected" {
            let error = result["error"].as_str().unwrap();
            assert!(
                error.starts_with(
                    "queue full: 32 requests of priority normal or higher are waiting (queue_capacity 32)"
                ) || error.starts_with("displaced from a full queue (32 waiting) by a high priority request"),
                "{error}"
            );
        }
    }
}

#[test]
fn a_corrupt_model_is_refused_at_start_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path(), &[1]);
    std::fs::write(registry.join("linear/1/model.onnx"), b"\x08\x07garbage").unwrap();
    let path = dir.path().join("requests.jsonl");
    write_lines(&path, &[linear_request(1, 1)]);
    let pipeline = pipeline(dir.path(), &file_source(&path), &registry, "");
    let output = edgeflow().arg("run").arg(&pipeline).arg("--no-metrics").output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("error: operator `infer` cannot load its models: cannot load model `linear` from `"),
        "{stderr}"
    );
    assert!(stderr.contains("linear/1/model.onnx"), "{stderr}");

    // A model missing from the registry is a validation error, before anything starts.
    std::fs::remove_dir_all(registry.join("linear")).unwrap();
    let output = edgeflow().arg("validate").arg(&pipeline).output().unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("model `linear` is not in the registry"), "{stderr}");
}

#[test]
fn a_new_version_is_swapped_in_mid_stream_without_dropping_or_mixing() {
    let dir = tempfile::tempdir().unwrap();
    let registry = registry(dir.path(), &[1]);
    let path = dir.path().join("requests.jsonl");
    // Event times near the wall clock: an idle followed file's watermark follows the clock.
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let base = now();
    let first: Vec<Value> = (0..2000).map(|seq| linear_request_at(seq, 1 + (seq % 2) as usize, base)).collect();
    write_lines(&path, &first);
    let source = format!("{}\n    follow: true\n    poll_interval: 10ms\n    idle_timeout: 100ms", file_source(&path));
    let pipeline =
        pipeline(dir.path(), &source, &registry, "    max_batch_size: 32\n    max_queue_delay: 5ms\n    watch: 50ms");
    let results_path = dir.path().join("results.jsonl");
    let mut child = Running(
        edgeflow()
            .arg("run")
            .arg(&pipeline)
            .args(["--no-metrics", "--workers", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let log_writer = log.clone();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            log_writer.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let count = |path: &Path| std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0);
    wait_for("the first requests' results", Duration::from_secs(60), || count(&results_path) >= 2000);
    add_version(&registry, 2);
    // Both workers load the new version.
    wait_for("version 2 to load", Duration::from_secs(30), || {
        log.lock().unwrap().matches("model version loaded").count() >= 2
    });
    // A broken version 3 is reported and skipped; version 2 keeps serving.
    std::fs::create_dir_all(registry.join("linear/3")).unwrap();
    std::fs::write(registry.join("linear/3/model.onnx"), b"truncated").unwrap();
    wait_for("version 3 to fail", Duration::from_secs(30), || {
        log.lock().unwrap().matches("a model version failed to load").count() >= 2
    });
    let base = now() - 2000;
    let mut pinned = linear_request_at(5000, 1, base - 3000);
    pinned["version"] = 1.into();
    let mut broken = linear_request_at(5001, 1, base - 3000);
    broken["version"] = 3.into();
    let second: Vec<Value> =
        (2000..4000).map(|seq| linear_request_at(seq, 1 + (seq % 2) as usize, base)).chain([pinned, broken]).collect();
    let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    for request in &second {
        std::io::Write::write_all(&mut file, format!("{request}\n").as_bytes()).unwrap();
    }
    drop(file);
    wait_for("the second requests' results", Duration::from_secs(60), || count(&results_path) >= 4002);
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();

    let results = read_results(&results_path);
    assert_eq!(results.len(), 4002, "no request dropped or answered twice");
    let v1 = reference(&path, &models().join("linear/1/model.onnx"));
    let v2 = reference(&path, &models().join("linear/2/model.onnx"));
    let mut versions = BTreeMap::new();
    for result in &results {
        let id = result["id"].as_str().unwrap();
        if id == "r5001" {
            assert_eq!(result["status"], "failed");
            let error = result["error"].as_str().unwrap();
            assert!(
                error.starts_with("model `linear` has no version 3 (loaded: 1, 2); it failed to load: "),
                "{error}"
            );
            continue;
        }
        assert_eq!(result["status"], "ok", "{result}");
        let version = result["version"].as_u64().unwrap();
        // Each result is entirely the version it names: no batch mixes versions.
        let expected = if version == 1 { &v1 } else { &v2 };
        assert_outputs_equal(id, &result["outputs"], &expected[id]);
        let seq: u64 = id[1..].parse().unwrap();
        *versions.entry((seq >= 2000 && seq != 5000, version)).or_insert(0) += 1;
    }
    assert_eq!(versions.get(&(false, 1)), Some(&2001), "before the swap, and the pinned one: {versions:?}");
    assert_eq!(
        versions.get(&(true, 2)),
        Some(&2000),
        "after the swap every unpinned request ran version 2: {versions:?}"
    );
}

/// Heartbeats of nodes `n0`..`n3` every second for `seconds` from two minutes ago (300: to
/// three minutes ahead, so the fleet outlives the test: a followed file, its watermark near
/// the wall clock); `n2` stops after 20 s (Offline at 25 s with a 5 s timeout). Requests
/// every 100 ms from 10 s to 50 s.
fn fleet_and_requests(dir: &Path, seconds: u64) -> (PathBuf, PathBuf) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let base = now - 120_000;
    let mut beats = Vec::new();
    for second in 0..seconds {
        for node in 0..4 {
            if node == 2 && second > 20 {
                continue;
            }
            beats.push(serde_json::json!({
                "node_id": format!("n{node}"), "region": if node < 2 { "eu" } else { "us" },
                "lat": 48.0 + node as f64, "lon": 2.0 + node as f64, "timestamp": base + second * 1000 + node,
                "cpu": 10.0 + node as f64, "memory": 20.0, "disk": 30.0, "capacity": 4.0,
            }));
        }
    }
    let requests: Vec<Value> =
        (0..400).map(|i| linear_request_at(i, 1, base + 10_000 + i * 100 - i)).collect::<Vec<_>>();
    let (beats_path, requests_path) = (dir.join("beats.jsonl"), dir.join("requests.jsonl"));
    write_lines(&beats_path, &beats);
    write_lines(&requests_path, &requests);
    (beats_path, requests_path)
}

/// Node health, a balancer with `strategy` and batched inference (2 s batch window, so that
/// requests wait) over `fleet_and_requests`' files; results in `results.jsonl`, status
/// changes in `changes.jsonl`; `extra` adds top-level sections.
fn balance_pipeline(dir: &Path, (beats, requests): (&Path, &Path), strategy: &str, extra: &str) -> PathBuf {
    let text = format!(
        "name: balance\nmetrics:\n  enabled: false\n{extra}sources:\n  fleet:\n    type: file\n    follow: true\n    path: {}\n  requests:\n    {}\n\
         operators:\n  health:\n    type: node_health\n    input: fleet\n    heartbeat_timeout: 5s\n    unhealthy_after: 3s\n\
         \x20 route:\n    type: load_balance\n    inputs: [requests, health.changes, fleet]\n    strategy: {strategy}\n\
         \x20 infer:\n    type: inference\n    input: route\n    registry: {}\n    models: [linear]\n    max_batch_size: 1000\n    max_queue_delay: 2s\n\
         sinks:\n  results:\n    type: file\n    input: infer\n    path: {}\n  changes:\n    type: file\n    input: health\n    path: {}\n",
        beats.display(),
        file_source(requests).trim_start(),
        models().display(),
        dir.join("results.jsonl").display(),
        dir.join("changes.jsonl").display(),
    );
    let pipeline = dir.join("pipeline.yaml");
    std::fs::write(&pipeline, text).unwrap();
    pipeline
}

#[test]
fn balanced_requests_go_to_live_nodes_and_a_lost_nodes_waiting_requests_are_rerouted() {
    // The last run is a cluster of 2 processes of 1 worker: requests cross processes to the
    // worker that owns their node.
    for (strategy, workers, processes) in [("round_robin", 1, 1), ("consistent_hash", 2, 1), ("consistent_hash", 1, 2)]
    {
        let dir = tempfile::tempdir().unwrap();
        let (beats, requests) = fleet_and_requests(dir.path(), 300);
        let results_path = dir.path().join("results.jsonl");
        let pipeline = balance_pipeline(dir.path(), (&beats, &requests), strategy, "");
        let hostfile = dir.path().join("hosts");
        let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        std::fs::write(&hostfile, format!("127.0.0.1:{}\n127.0.0.1:{}\n", port(), port())).unwrap();
        let mut children: Vec<Running> = (0..processes)
            .map(|process| {
                let mut command = edgeflow();
                command.arg("run").arg(&pipeline).args(["--no-metrics", "--workers", &workers.to_string()]);
                if processes > 1 {
                    command.args(["--processes", "2", "--process", &process.to_string(), "--hostfile"]).arg(&hostfile);
                }
                Running(command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap())
            })
            .collect();
        let count = || std::fs::read_to_string(&results_path).map(|t| t.lines().count()).unwrap_or(0);
        wait_for("400 results", Duration::from_secs(60), || count() >= 400);
        let changes_path = dir.path().join("changes.jsonl");
        wait_for("n2's loss in the status changes", Duration::from_secs(30), || {
            std::fs::read_to_string(&changes_path).is_ok_and(|t| {
                t.contains("\"node_id\":\"n2\",\"region\":\"us\",\"from\":\"unhealthy\",\"to\":\"offline\"")
            })
        });
        for child in &mut children {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        let results = read_results(&results_path);
        assert_eq!(results.len(), 400, "{strategy} on {processes} process(es): one result per request");
        let changes = std::fs::read_to_string(dir.path().join("changes.jsonl")).unwrap();
        let offline: Value = changes
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|c| c["node_id"] == "n2" && c["to"] == "offline")
            .expect("n2 goes offline");
        let offline_at = offline["time"].as_u64().unwrap();
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for result in &results {
            assert_eq!(result["status"], "ok", "{strategy}: {result}");
            let node = result["node"].as_str().expect("every result names its node").to_owned();
            *per_node.entry(node).or_default() += 1;
        }
        // n2 was placed requests while it lived, but all of them still waited (2 s batch
        // window) when it went Offline: re-routed, none served by it, none lost.
        assert!(!per_node.contains_key("n2"), "{strategy}: {per_node:?} (n2 offline at {offline_at})");
        assert_eq!(per_node.len(), 3, "{strategy}: {per_node:?}");
        // While n2 lived (up to 23 s, then Unhealthy) the balancer placed some requests on it
        // (round robin: every fourth; the hash ring: its keys); those are the re-routed ones.
        let while_alive = results.iter().filter(|r| r["timestamp"].as_u64().unwrap() < offline_at - 2_000).count();
        assert!(while_alive > 100, "{strategy}: {while_alive} requests while n2 was Healthy");
    }
}

/// Complete checkpoints (with a manifest) under `dir/ckpt`.
fn complete_checkpoints(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir.join("ckpt")).map(|e| e.flatten().map(|e| e.path()).collect::<Vec<_>>());
    entries.unwrap_or_default().into_iter().filter(|p| p.join("MANIFEST.json").exists()).collect()
}

/// The balanced pipeline with checkpoints, killed with SIGKILL three times after a new
/// checkpoint (at a random moment while requests wait in their 2 s batches, are answered,
/// and those of the lost node are re-routed) and restarted each time: in the end every
/// request has exactly one result (what the killed runs wrote after their last checkpoint is
/// cut off and answered again, nothing before it twice), none served by the lost node.
#[test]
fn balanced_inference_killed_and_restored_answers_every_request_once() {
    use rand::Rng;
    let dir = tempfile::Builder::new().prefix("balanced-ckpt").tempdir().unwrap();
    // The fleet's heartbeats end about now: a checkpoint's time is past every record read, and
    // once they are all read the frontier reaches it as the wall clock advances (with
    // heartbeats three minutes ahead, a checkpoint would wait three minutes).
    let (beats, requests) = fleet_and_requests(dir.path(), 121);
    let checkpoint = "checkpoint:\n  dir: ckpt\n  interval: 200ms\n";
    let pipeline = balance_pipeline(dir.path(), (&beats, &requests), "round_robin", checkpoint);
    // A restored run has read the whole fleet file: its watermark follows the wall clock
    // after 1 s without new heartbeats, not the default 30 s.
    let text = std::fs::read_to_string(&pipeline).unwrap();
    std::fs::write(&pipeline, text.replace("    follow: true\n", "    follow: true\n    idle_timeout: 1s\n")).unwrap();
    let results_path = dir.path().join("results.jsonl");
    let log = dir.path().join("engine.log");
    let start = || {
        let mut command = edgeflow();
        command.current_dir(dir.path()).arg("run").arg(&pipeline).args(["--no-metrics", "--workers", "2"]);
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        Running(command.stdout(Stdio::null()).stderr(stderr).spawn().unwrap())
    };
    eprintln!("engine log: {}", log.display());
    let mut rng = rand::thread_rng();
    for _ in 0..3 {
        let seen = complete_checkpoints(dir.path());
        let mut engine = start();
        wait_for("a new checkpoint", Duration::from_secs(60), || {
            complete_checkpoints(dir.path()).iter().any(|c| !seen.contains(c))
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
        engine.kill().unwrap();
        engine.wait().unwrap();
    }
    let mut engine = start();
    let ids = || {
        let results = std::fs::read_to_string(&results_path).unwrap_or_default();
        let complete = results.lines().filter(|l| l.ends_with('}'));
        complete
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    wait_for("400 results", Duration::from_secs(60), || ids().len() >= 400);
    // Anything still to come would be a duplicate: wait for the next checkpoint first.
    let seen = complete_checkpoints(dir.path());
    wait_for("a checkpoint after the last result", Duration::from_secs(60), || {
        complete_checkpoints(dir.path()).iter().any(|c| !seen.contains(c))
    });
    engine.kill().unwrap();
    engine.wait().unwrap();
    let results = read_results(&results_path);
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for result in &results {
        assert_eq!(result["status"], "ok", "{result}");
        assert_ne!(result["node"], "n2", "served by the lost node: {result}");
        *per_id.entry(result["id"].as_str().unwrap().to_owned()).or_default() += 1;
    }
    let twice: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    assert_eq!(per_id.len(), 400, "one result per request");
}

/// The rows of an Arrow IPC results file as read by pyarrow (an independent reader), as
/// JSON objects with the JSON sink's fields: `(schema, rows)`.
fn read_arrow_with_pyarrow(path: &Path) -> (String, Vec<Value>) {
    const SCRIPT: &str = r#"
import json, sys
import pyarrow as pa
table = pa.ipc.open_stream(sys.argv[1]).read_all()
print(json.dumps(str(table.schema)))
table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp", table["timestamp"].cast(pa.int64()))
for row in table.to_pylist():
    row["outputs"] = {name: tensor for name, tensor in row["outputs"]}
    print(json.dumps(row))
"#;
    let output = Command::new(python()).arg("-c").arg(SCRIPT).arg(path).stderr(Stdio::inherit()).output().unwrap();
    assert!(
        output.status.success(),
        "pyarrow cannot read {} (is pyarrow in .venv? run scripts/setup.sh test)",
        path.display()
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let (schema, rows) = text.split_once('\n').unwrap();
    (serde_json::from_str(schema).unwrap(), common::json_values(rows))
}

#[test]
fn an_arrow_results_file_holds_what_the_json_results_say() {
    let dir = tempfile::tempdir().unwrap();
    let mut requests: Vec<Value> = (0..600).map(|seq| linear_request(seq, 1 + (seq % 2) as usize)).collect();
    requests.push(wrong_shape_request(90_001));
    let path = dir.path().join("requests.jsonl");
    write_lines(&path, &requests);
    let mut orders = Vec::new();
    for workers in [1, 2] {
        let jsonl =
            pipeline(dir.path(), &file_source(&path), &models(), "    max_batch_size: 16\n    max_queue_delay: 5ms");
        let arrow_path = dir.path().join("results.arrows");
        let text = std::fs::read_to_string(&jsonl).unwrap()
            + &format!(
                "  columns:\n    type: file\n    format: arrow\n    input: infer\n    path: {}\n",
                arrow_path.display()
            );
        std::fs::write(&jsonl, text).unwrap();
        run(&jsonl, workers);

        let json: HashMap<String, Value> = read_results(&dir.path().join("results.jsonl"))
            .into_iter()
            .map(|result| (result["id"].as_str().unwrap().to_owned(), result))
            .collect();
        let (schema, rows) = read_arrow_with_pyarrow(&arrow_path);
        for column in [
            "outputs: map<string, struct<shape: list<item: uint64 not null> not null",
            "child 0, key: string not null",
            "child 0, shape: list<item: uint64 not null> not null",
            "child 1, data: list<item: float not null> not null",
            "timestamp: timestamp[ms, tz=UTC] not null",
            "version: uint64\n",
        ] {
            assert!(schema.contains(column), "no `{column}` in the schema:\n{schema}");
        }
        assert_eq!(rows.len(), 601, "one row per request ({workers} workers)");
        assert_eq!(json.len(), 601);
        for row in &rows {
            let id = row["id"].as_str().unwrap();
            let want = &json[id];
            // Every field but the outputs is the same JSON value; output floats are f32 in
            // both (JSON: the shortest decimal that reads back as the same f32).
            for field in [
                "model",
                "version",
                "status",
                "error",
                "node",
                "timestamp",
                "queue_ms",
                "compute_ms",
                "batch_size",
                "finished_at",
            ] {
                assert_eq!(row[field], want[field], "{id}: {field}");
            }
            let (got, want) = (row["outputs"].as_object().unwrap(), want["outputs"].as_object().unwrap());
            assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{id}");
            for (name, tensor) in want {
                assert_eq!(got[name]["shape"], tensor["shape"], "{id}: {name}");
                let floats =
                    |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
                assert_eq!(floats(&got[name]["data"]), floats(&tensor["data"]), "{id}: {name}");
            }
        }
        let failed = rows.iter().find(|row| row["id"] == "r90001").unwrap();
        assert_eq!(failed["status"], "failed");
        assert!(failed["error"].as_str().unwrap().starts_with("input `x` has shape [1, 5]"), "{failed}");
        assert_eq!(failed["outputs"], serde_json::json!({}));
        orders.push(rows.iter().map(|row| row["id"].as_str().unwrap().to_owned()).collect::<Vec<_>>());
    }
    assert_eq!(orders[0], orders[1], "rows come in the same order on 1 and 2 workers");
}

/// The shipped `pipelines/edge-inference.yaml`: requests go through `load_balance` to live
/// edge nodes of the simulated fleet and are scored there by the anomaly model.
#[test]
fn shipped_edge_inference_pipeline_places_requests_on_live_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let results_path = dir.path().join("results.jsonl");
    let output = edgeflow()
        .arg("run")
        .arg(root().join("pipelines/edge-inference.yaml"))
        .args(["--no-metrics", "--workers", "2"])
        .env("RUN_FOR", "8s")
        .env("FLEET_NODES", "40")
        .env("FLEET_FAILURE_RATE", "0")
        .env("REQUEST_RATE", "50")
        .env("RESULTS_PATH", &results_path)
        .env("DEAD_LETTER_PATH", dir.path().join("dead.jsonl"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // Status changes on stdout: the timeline of each node.
    let mut timeline: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let change: Value = serde_json::from_str(line.strip_prefix("change ").expect("change lines")).unwrap();
        timeline
            .entry(change["node_id"].as_str().unwrap().to_owned())
            .or_default()
            .push((change["time"].as_u64().unwrap(), change["to"].as_str().unwrap().to_owned()));
    }
    let status_at = |node: &str, time: u64| -> Option<&str> {
        timeline.get(node)?.iter().rfind(|(t, _)| *t <= time).map(|(_, s)| s.as_str())
    };
    let results = read_results(&results_path);
    assert_eq!(results.len(), 400, "one result per request (50/s for 8 s)");
    let ok: Vec<&Value> = results.iter().filter(|r| r["status"] == "ok").collect();
    assert!(ok.len() >= 300, "most requests are served: {:?}", by_status(&results));
    let mut nodes = std::collections::BTreeSet::new();
    for result in &ok {
        let node = result["node"].as_str().expect("a served request names its node");
        let at = result["timestamp"].as_u64().unwrap();
        let status = status_at(node, at);
        assert!(matches!(status, Some("healthy" | "degraded")), "{node} was {status:?} at {at}: {result}");
        assert_eq!(result["outputs"]["scores"]["shape"], serde_json::json!([1, 1]), "{result}");
        nodes.insert(node.to_owned());
    }
    assert!(nodes.len() >= 10, "requests from five regions spread over the fleet: {nodes:?}");
    // The others were refused with a reason (no live node known yet at the very start, or
    // the fleet gone at the end), never lost.
    for result in results.iter().filter(|r| r["status"] != "ok") {
        assert!(result["error"].as_str().unwrap().contains("no Healthy or Degraded node"), "{result}");
    }
}

/// A request that fits the model's declared interface but fails in ONNX Runtime (5 columns
/// where the graph multiplies by a 4-row matrix) fails alone: the others of its batch are
/// served (its batch used to fail as a whole).
#[test]
fn a_request_that_fails_in_the_model_fails_alone_not_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let mut requests: Vec<Value> = (0..20).map(|i| linear_request(i, 1)).collect();
    for request in &mut requests {
        request["model"] = "loose".into();
    }
    let mut bad = linear_request(100, 1);
    bad["model"] = "loose".into();
    bad["inputs"]["x"] = serde_json::json!({"shape": [1, 5], "data": [1, 2, 3, 4, 5]});
    requests.insert(7, bad);
    let requests_path = dir.path().join("requests.jsonl");
    write_lines(&requests_path, &requests);
    let results_path = dir.path().join("results.jsonl");
    let pipeline = dir.path().join("pipeline.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: loose\nmetrics:\n  enabled: false\nsources:\n  input:\n{}\noperators:\n  infer:\n    type: inference\n    input: input\n    registry: {}\n    models: [loose]\n    max_batch_size: 64\n    max_queue_delay: 1s\nsinks:\n  results:\n    type: file\n    input: infer\n    path: {}\n",
            file_source(&requests_path),
            models().display(),
            results_path.display()
        ),
    )
    .unwrap();
    let output = run(&pipeline, 1);
    let results = read_results(&results_path);
    assert_eq!(results.len(), 21);
    let failed: Vec<&Value> = results.iter().filter(|r| r["status"] != "ok").collect();
    assert_eq!(failed.len(), 1, "only the bad request fails: {:?}", by_status(&results));
    assert_eq!(failed[0]["id"], "r100");
    assert!(failed[0]["error"].as_str().unwrap().contains("failed"), "{}", failed[0]);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("running its requests one by one"), "the batch was split: {log}");
}

/// Writes `requests` and a pipeline that serves them with `linear` in batches of up to 64
/// (waiting up to 1 s for a batch to fill).
fn batched_linear_pipeline(dir: &Path, requests: &[Value]) -> PathBuf {
    let requests_path = dir.join("requests.jsonl");
    write_lines(&requests_path, requests);
    pipeline(dir, &file_source(&requests_path), &models(), "    max_batch_size: 64\n    max_queue_delay: 1s")
}

/// Shapes whose product overflows (`[2^62, 4]` with no data) used to pass validation and
/// panic the worker when two were batched: now they are refused at the source, with the
/// reason, and the other requests are served.
#[test]
fn requests_with_overflowing_shapes_are_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let mut requests: Vec<Value> = (0..10).map(|i| linear_request(i, 1)).collect();
    for (at, seq) in [(3, 100), (4, 101)] {
        let mut bad = linear_request(seq, 1);
        bad["inputs"]["x"] = serde_json::json!({"shape": [4_611_686_018_427_387_904u64, 4], "data": []});
        requests.insert(at, bad);
    }
    let pipeline = batched_linear_pipeline(dir.path(), &requests);
    let text = std::fs::read_to_string(&pipeline).unwrap()
        + &format!("  dead:\n    type: dead_letter\n    path: {}\n", dir.path().join("dead.jsonl").display());
    std::fs::write(&pipeline, text).unwrap();
    run(&pipeline, 2);
    let results = read_results(&dir.path().join("results.jsonl"));
    assert_eq!(by_status(&results), BTreeMap::from([("ok".to_owned(), 10)]));
    let letters = read_results(&dir.path().join("dead.jsonl"));
    assert_eq!(letters.len(), 2);
    for letter in letters {
        assert!(
            letter["reason"].as_str().unwrap().contains("more than the 16777216 values a tensor may hold"),
            "{letter}"
        );
    }
}

/// JSON has no infinity: a model output that overflows to infinity makes its request
/// `failed` with the output and index named (it used to be `null` inside an `ok` result),
/// and the other requests of the batch are served.
#[test]
fn an_infinite_model_output_fails_its_request_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut requests: Vec<Value> = (0..5).map(|i| linear_request(i, 1)).collect();
    let mut huge = linear_request(100, 1);
    huge["inputs"]["x"] = serde_json::json!({"shape": [1, 4], "data": [3.0e38, 3.0e38, 3.0e38, 3.0e38]});
    let mut huge_negative = linear_request(101, 1);
    huge_negative["inputs"]["x"] = serde_json::json!({"shape": [1, 4], "data": [-3.0e38, -3.0e38, -3.0e38, -3.0e38]});
    requests.extend([huge, huge_negative]);
    let pipeline = batched_linear_pipeline(dir.path(), &requests);
    run(&pipeline, 1);
    let results = read_results(&dir.path().join("results.jsonl"));
    assert_eq!(results.len(), 7);
    for result in &results {
        for tensor in result["outputs"].as_object().unwrap().values() {
            assert!(tensor["data"].as_array().unwrap().iter().all(Value::is_number), "a null in an output: {result}");
        }
    }
    let failed: Vec<&Value> = results.iter().filter(|r| r["status"] == "failed").collect();
    assert!(!failed.is_empty(), "an overflowing input gives an infinite output: {results:?}");
    for result in &failed {
        assert!(["r100", "r101"].contains(&result["id"].as_str().unwrap()), "{result}");
        let error = result["error"].as_str().unwrap();
        assert!(error.starts_with("model output `y` has a non-finite value (inf) at index"), "{error}");
    }
    assert_eq!(results.iter().filter(|r| r["status"] == "ok").count(), 7 - failed.len());
}

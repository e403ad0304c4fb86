//! The federated pipeline end to end: rounds as logical times of the dataflow, simulated
//! clients on every worker, the same result on 1 and 2 workers; external clients that read
//! plans and send updates through files, with deadlines, stragglers and a failed quorum.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgeflow_operators::federated::coordinator::PlanRecord;

fn run(dir: &Path, workers: usize, extra: &str) -> (String, String, String) {
    let pipeline = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/federated.yaml"))
        .unwrap()
        .replace("dataset: data/digits.csv", &format!("dataset: {}", data().display()))
        .replace("    quorum: 0.8\n", &format!("    quorum: 0.8\n{extra}"));
    let path = dir.join(format!("federated-{workers}.yaml"));
    std::fs::write(&path, pipeline).unwrap();
    let out = |name: &str| dir.join(format!("{name}-{workers}"));
    let output = Command::new(env!("CARGO_BIN_EXE_edgeflow"))
        .arg("run")
        .arg(&path)
        .args(["--no-metrics", "--workers", &workers.to_string()])
        .env("FEDERATED_ROUNDS", "30")
        .env("FEDERATED_CSV", out("csv"))
        .env("FEDERATED_ROUNDS_PATH", out("rounds"))
        .env("FEDERATED_MODELS_PATH", out("models"))
        .env("FEDERATED_DEAD_LETTERS", out("dead"))
        .env("FEDERATED_REGISTRY", dir.join("registry"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let read = |name: &str| std::fs::read_to_string(out(name)).unwrap();
    (read("csv"), read("rounds"), read("models"))
}

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/data/digits.csv")
}

#[test]
fn federated_rounds_train_the_digits_the_same_on_any_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let (csv, rounds, models) = run(dir.path(), 1, "");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "round,model_version,selected,accepted,rejected,quorum_met,client_loss,test_loss,test_accuracy,epsilon"
    );
    assert_eq!(lines.len(), 31, "a header and 30 rounds");
    let accuracy = |line: &str| line.split(',').nth(8).unwrap().parse::<f64>().unwrap();
    let (first, last) = (accuracy(lines[1]), accuracy(lines[30]));
    assert!(first < last && last > 0.85, "held-out accuracy {first} -> {last}");
    let reports: Vec<serde_json::Value> = common::json_values(&rounds);
    assert_eq!(reports.len(), 30);
    assert!(reports.iter().all(|r| r["accepted"] == 10 && r["quorum_met"] == true));
    let model: serde_json::Value = serde_json::from_str(models.lines().last().unwrap()).unwrap();
    assert_eq!((model["version"].as_u64(), model["payload"]["parameters"].as_u64()), (Some(30), Some(650)));
    // Clients spread over two workers give the same rounds, byte for byte.
    let (_, rounds_two, models_two) = run(dir.path(), 2, "");
    assert_eq!(rounds, rounds_two);
    assert_eq!(models, models_two);
}

#[test]
fn dropouts_and_central_dp_are_reported_per_round() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "    dropout: 0.3\n    dp: {mode: central, clip_norm: 1.0, noise_multiplier: 1.0, epsilon_budget: 50, delta: 0.00001}\n";
    let (csv, rounds, _) = run(dir.path(), 2, extra);
    let reports: Vec<serde_json::Value> = common::json_values(&rounds);
    assert_eq!(reports.len(), 30);
    assert!(reports.iter().any(|r| r["accepted"].as_u64().unwrap() < 10), "some clients drop out");
    let below: Vec<&serde_json::Value> = reports.iter().filter(|r| r["quorum_met"] == false).collect();
    for report in &below {
        assert!(report["accepted"].as_u64().unwrap() < 8, "quorum 0.8 of 10: {report}");
    }
    // Epsilon grows round by round, as the accountant computes for q = 10/20, sigma = 1.
    let epsilons: Vec<f64> = reports.iter().map(|r| r["epsilon"].as_f64().unwrap()).collect();
    assert!(epsilons.windows(2).all(|w| w[0] < w[1]), "{epsilons:?}");
    let expected = edgeflow_operators::federated::privacy::epsilon_for(1.0, 0.5, 30, 1e-5).0;
    assert!((epsilons[29] - expected).abs() < 1e-9, "{} vs {expected}", epsilons[29]);
    assert!(csv.lines().nth(30).unwrap().ends_with(&format!("{:.6}", epsilons[29])));
}

#[test]
fn the_trained_model_is_exported_to_onnx_and_served_by_inference() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry");
    let (_, _, models) = run(dir.path(), 1, "");
    let onnx = registry.join("digits/30/model.onnx");
    assert!(onnx.is_file(), "{} written after the last round", onnx.display());

    // The final global model, from the `models` output, computed in Rust.
    let last: serde_json::Value = serde_json::from_str(models.lines().last().unwrap()).unwrap();
    let payload: edgeflow_operators::federated::update::Payload =
        serde_json::from_value(last["payload"].clone()).unwrap();
    let weights = payload.decode().unwrap();
    let digits =
        edgeflow_operators::federated::learn::Dataset::parse_csv(&std::fs::read_to_string(data()).unwrap(), 16.0)
            .unwrap();
    let predict = |x: &[f32]| -> usize {
        let logits: Vec<f32> =
            (0..10).map(|c| weights[640 + c] + (0..64).map(|f| x[f] * weights[f * 10 + c]).sum::<f32>()).collect();
        (0..10).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap()
    };

    // Serve it: 300 digits as inference requests through the inference operator.
    let requests = dir.path().join("requests.jsonl");
    let lines: Vec<String> = (0..300)
        .map(|i| {
            serde_json::json!({"id": format!("d{i}"), "model": "digits", "timestamp": 1_700_000_000_000u64 + i as u64,
                "inputs": {"x": {"shape": [1, 64], "data": digits.features[i]}}})
            .to_string()
        })
        .collect();
    std::fs::write(&requests, lines.join("\n") + "\n").unwrap();
    let served = dir.path().join("served.jsonl");
    let pipeline = dir.path().join("serve.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: serve\nmetrics:\n  enabled: false\nsources:\n  digits:\n    type: file\n    records: inference_requests\n    path: {}\n\
             operators:\n  infer:\n    type: inference\n    input: digits\n    registry: {}\n    models: [digits]\n\
             sinks:\n  out:\n    type: file\n    input: infer\n    path: {}\n",
            requests.display(),
            registry.display(),
            served.display()
        ),
    )
    .unwrap();
    let output =
        Command::new(env!("CARGO_BIN_EXE_edgeflow")).arg("run").arg(&pipeline).arg("--no-metrics").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let results: Vec<serde_json::Value> = common::json_values(&std::fs::read_to_string(&served).unwrap());
    assert_eq!(results.len(), 300);
    let mut correct = 0;
    for result in &results {
        assert_eq!(result["status"], "ok", "{result}");
        assert_eq!(result["version"], 30);
        let i: usize = result["id"].as_str().unwrap()[1..].parse().unwrap();
        let label = result["outputs"]["label"]["data"][0].as_f64().unwrap() as usize;
        assert_eq!(label, predict(&digits.features[i]), "served as trained: {result}");
        correct += usize::from(label == digits.labels[i]);
    }
    assert!(correct > 250, "{correct} of 300 digits right");
}

/// External clients over files: plans to a file they read, updates appended to a file the
/// engine follows.
struct FileTransport {
    plans: PathBuf,
    read: usize,
    updates: std::fs::File,
}

impl common::external_clients::Transport for FileTransport {
    fn plans(&mut self) -> Vec<PlanRecord> {
        let plans: Vec<PlanRecord> = common::written_json_values(&self.plans);
        let new = plans[self.read..].to_vec();
        self.read = plans.len();
        new
    }

    fn send(&mut self, lines: &[String]) {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        self.updates.write_all(text.as_bytes()).unwrap();
        self.updates.flush().unwrap();
    }
}

#[test]
fn external_clients_over_files_with_deadlines_stragglers_and_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let (plans, updates) = (dir.path().join("plans.jsonl"), dir.path().join("updates.jsonl"));
    let file = std::fs::File::create(&updates).unwrap();
    let source = format!(
        "    type: file\n    path: {}\n    records: model_updates\n    follow: true\n    poll_interval: 20ms\n    idle_timeout: 200ms",
        updates.display()
    );
    let sink = format!("    type: file\n    input: train.plans\n    path: {}", plans.display());
    let pipeline = common::external_clients::pipeline(dir.path(), &data(), &source, &sink, 3000);
    let mut transport = FileTransport { plans, read: 0, updates: file };
    let script = common::external_clients::run(dir.path(), &pipeline, &data(), &mut transport);
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    common::check_external_rounds(&script, &read("rounds.jsonl"), &read("models.jsonl"), &read("dead.jsonl"), 3000);
    assert_eq!(read("source-dead.jsonl"), "", "no update is malformed or late");
}

/// The global models of a run's `models` output.
fn models_of(models: &str) -> Vec<Vec<f32>> {
    models
        .lines()
        .map(|line| {
            let model: serde_json::Value = serde_json::from_str(line).unwrap();
            let payload: edgeflow_operators::federated::update::Payload =
                serde_json::from_value(model["payload"].clone()).unwrap();
            payload.decode().unwrap()
        })
        .collect()
}

#[test]
fn secure_aggregation_gives_the_plain_result_with_and_without_dropouts() {
    let dir = tempfile::tempdir().unwrap();
    for dropout in ["", "    dropout: 0.3\n"] {
        let (_, plain_rounds, plain_models) = run(dir.path(), 2, dropout);
        let secure = format!("{dropout}    secure_aggregation: {{threshold: 0.6}}\n");
        let (_, secure_rounds, secure_models) = run(dir.path(), 2, &secure);
        let (plain, masked): (Vec<serde_json::Value>, Vec<serde_json::Value>) =
            (common::json_values(&plain_rounds), common::json_values(&secure_rounds));
        assert_eq!(plain.len(), 30);
        for (p, s) in plain.iter().zip(&masked) {
            if s["failure"].is_null() {
                assert_eq!((&p["accepted"], &p["quorum_met"]), (&s["accepted"], &s["quorum_met"]), "{p} vs {s}");
            } else {
                // Fewer than the threshold (6 of 10) survived: below the quorum (8) as well.
                assert!(p["accepted"].as_u64().unwrap() < 6 && p["quorum_met"] == false, "{p} vs {s}");
                assert_eq!(s["quorum_met"], false);
            }
        }
        if !dropout.is_empty() {
            assert!(masked.iter().any(|r| r["accepted"].as_u64().unwrap() < 10), "some clients drop after masking");
        }
        // The unmasked sums equal the plain ones up to the fixed-point encoding (2^-24).
        let (plain, masked) = (models_of(&plain_models), models_of(&secure_models));
        for (round, (p, s)) in plain.iter().zip(&masked).enumerate() {
            let worst = p.iter().zip(s).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "round {}: models differ by {worst} ({dropout:?})", round + 1);
        }
    }
}

#[test]
fn secure_aggregation_fails_a_round_with_too_many_dropouts() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "    dropout: 0.3\n    secure_aggregation: {threshold: 0.9}\n";
    let (_, rounds, models) = run(dir.path(), 1, extra);
    let reports: Vec<serde_json::Value> = common::json_values(&rounds);
    let failed: Vec<&serde_json::Value> = reports.iter().filter(|r| !r["failure"].is_null()).collect();
    assert!(!failed.is_empty(), "with 30% dropouts some round keeps fewer than 9 of 10 clients");
    let models = models_of(&models);
    for report in &failed {
        let reason = report["failure"].as_str().unwrap();
        assert!(reason.starts_with("secure aggregation failed:") && reason.contains("9 are needed"), "{reason}");
        assert_eq!(report["quorum_met"], false);
        assert_eq!(report["accepted"], 0, "nothing of a failed round is folded in");
        let round = report["round"].as_u64().unwrap() as usize;
        if round > 1 {
            assert_eq!(models[round - 1], models[round - 2], "round {round} keeps the model");
        }
    }
    // Rounds where 9 or 10 survived are aggregated.
    assert!(reports.iter().any(|r| r["accepted"].as_u64().unwrap() >= 9));
}

#[test]
fn resource_aware_selection_follows_live_node_health() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("updates.jsonl"), "").unwrap();
    let mut beats = std::fs::File::create(path("beats.jsonl")).unwrap();
    let follow = "follow: true, poll_interval: 20ms, idle_timeout: 200ms, max_out_of_orderness: 0ms";
    let yaml = format!(
        "name: federated-health\nsources:\n  updates: {{type: file, path: {}, records: model_updates, {follow}}}\n  beats: {{type: file, path: {}, {follow}}}\noperators:\n  health: {{type: node_health, input: beats}}\n  train:\n    type: federated\n    inputs: [updates, health.changes, beats]\n    dataset: {}\n    clients: 4\n    rounds: 2\n    clients_per_round: 2\n    selection: {{selection: resource_aware, min_free_cpu: 20, min_free_memory: 20, seed: 1}}\n    round_timeout: 3s\nsinks:\n  plans: {{type: file, input: train.plans, path: {}}}\n  rounds: {{type: file, input: train, path: {}}}\n",
        path("updates.jsonl").display(),
        path("beats.jsonl").display(),
        data().display(),
        path("plans.jsonl").display(),
        path("rounds.jsonl").display(),
    );
    std::fs::write(path("pipeline.yaml"), yaml).unwrap();
    let log = std::fs::File::create(path("engine.log")).unwrap();
    let mut engine = common::Running(
        Command::new(env!("CARGO_BIN_EXE_edgeflow"))
            .arg("run")
            .arg(path("pipeline.yaml"))
            .args(["--no-metrics", "--workers", "2"])
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let lines = |name: &str| -> Vec<serde_json::Value> { common::written_json_values(&path(name)) };
    let wait_for = |name: &str, count: usize| {
        let start = std::time::Instant::now();
        while lines(name).len() < count {
            assert!(start.elapsed() < std::time::Duration::from_secs(60), "{count} lines of {name}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // Before any node reports, no client is known to be Healthy: no round starts.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(lines("plans.jsonl").is_empty(), "a round started before any health report");
    let mut beat = |node: &str, cpu: f64, memory: f64| {
        let now = edgeflow_connectors::wall_clock_ms();
        writeln!(
            beats,
            r#"{{"node_id":"{node}","region":"eu","lat":1,"lon":1,"timestamp":{now},"cpu":{cpu},"memory":{memory},"disk":10}}"#
        )
        .unwrap();
        beats.flush().unwrap();
    };
    // client-00 is Healthy but has 15% CPU free; client-01 is Degraded (memory 95%).
    beat("client-00", 85.0, 30.0);
    beat("client-01", 10.0, 95.0);
    beat("client-02", 10.0, 30.0);
    beat("client-03", 15.0, 40.0);
    wait_for("plans.jsonl", 1);
    assert_eq!(lines("plans.jsonl")[0]["clients"], serde_json::json!(["client-02", "client-03"]));
    // client-03 becomes Degraded before the round closes at its deadline.
    beat("client-03", 95.0, 40.0);
    wait_for("plans.jsonl", 2);
    assert_eq!(lines("plans.jsonl")[1]["clients"], serde_json::json!(["client-02"]));
    wait_for("rounds.jsonl", 2);
    let reports = lines("rounds.jsonl");
    assert!(reports.iter().all(|r| r["accepted"] == 0 && r["quorum_met"] == false), "{reports:?}");
    assert!(Command::new("kill").args(["-s", "TERM", &engine.id().to_string()]).status().unwrap().success());
    assert!(engine.0.wait().unwrap().success(), "{}", std::fs::read_to_string(path("engine.log")).unwrap());
}

#[test]
fn the_pipeline_reaches_centralised_accuracy_within_three_points() {
    use edgeflow_operators::federated::learn::{Dataset, LocalTraining, Softmax};
    let dir = tempfile::tempdir().unwrap();
    let pipeline = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/federated.yaml"))
        .unwrap()
        .replace("dataset: data/digits.csv", &format!("dataset: {}", data().display()));
    std::fs::write(dir.path().join("federated.yaml"), pipeline).unwrap();
    let csv = dir.path().join("rounds.csv");
    let output = Command::new(env!("CARGO_BIN_EXE_edgeflow"))
        .arg("run")
        .arg(dir.path().join("federated.yaml"))
        .args(["--no-metrics", "--workers", "2"])
        .env("FEDERATED_CSV", &csv)
        .env("FEDERATED_ROUNDS_PATH", dir.path().join("rounds"))
        .env("FEDERATED_MODELS_PATH", dir.path().join("models"))
        .env("FEDERATED_DEAD_LETTERS", dir.path().join("dead"))
        .env("FEDERATED_REGISTRY", dir.path().join("registry"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let csv = std::fs::read_to_string(csv).unwrap();
    let last = csv.lines().last().unwrap();
    assert!(last.starts_with("100,"), "the pipeline's 100 rounds: {last}");
    let federated: f64 = last.split(',').nth(8).unwrap().parse().unwrap();
    // The same model trained centrally on the same training split (the pipeline's defaults:
    // 20% held out, seed 3), 40 epochs of the same minibatch SGD.
    let text = std::fs::read_to_string(data()).unwrap();
    let (train, test) = Dataset::parse_csv(&text, 16.0).unwrap().split(0.2, 3);
    let model = Softmax { features: train.dimension(), classes: train.classes };
    let settings = LocalTraining { epochs: 1, batch_size: 16, learning_rate: 0.1, mu: 0.0 };
    let mut weights = vec![0.0; model.parameters()];
    for epoch in 0..40 {
        weights = model.train(&weights, &train, &settings, epoch);
    }
    let central = model.evaluate(&weights, &test).1;
    println!("pipelines/federated.yaml: {federated:.4} after 100 rounds; centralised: {central:.4}");
    assert!(federated >= central - 0.03, "federated {federated:.4} vs centralised {central:.4}");
}

/// Secure aggregation with clients outside the engine: five `edgeflow client` processes,
/// each with its own data, take part over files; one drops out after sharing its secrets in
/// round 1 (and does not come back). The coordinator only ever receives protocol steps, and
/// the global model equals the plain FedAvg of the surviving clients' updates.
#[test]
fn secure_aggregation_with_external_client_processes_and_a_dropout() {
    use edgeflow_operators::federated::coordinator::{PlanRecord, RoundPlan};
    use edgeflow_operators::federated::learn::{Dataset, LocalTraining};
    use edgeflow_operators::federated::secure_protocol::{ClientStep, SECAGG_FORMAT};
    use edgeflow_operators::federated::update::{ModelUpdate, Payload};

    let dir = tempfile::tempdir().unwrap();
    let fleet = common::external_clients::fleet(&data());
    let ids: Vec<String> = (0..5).map(|i| format!("client-{i:02}")).collect();
    let mut local: Vec<Dataset> = Vec::new();
    for (id, (_, dataset)) in ids.iter().zip(&fleet.clients) {
        // Each client's own examples, in the dataset's format (features scaled back by 16).
        let text: String = dataset
            .features
            .iter()
            .zip(&dataset.labels)
            .map(|(features, label)| {
                let values: Vec<String> = features.iter().map(|f| format!("{}", (f * 16.0).round())).collect();
                format!("{label},{}\n", values.join(","))
            })
            .collect();
        std::fs::write(dir.path().join(format!("{id}.csv")), &text).unwrap();
        local.push(Dataset::parse_csv(&text, 16.0).unwrap());
    }
    let (plans, updates) = (dir.path().join("plans.jsonl"), dir.path().join("updates.jsonl"));
    std::fs::File::create(&updates).unwrap();
    let pipeline = dir.path().join("secure.yaml");
    std::fs::write(
        &pipeline,
        format!(
            "name: secure-external\nsources:\n  updates:\n    type: file\n    path: {u}\n    records: model_updates\n    follow: true\n    poll_interval: 20ms\n    idle_timeout: 200ms\noperators:\n  train:\n    type: federated\n    input: updates\n    dataset: {data}\n    clients: 5\n    rounds: 2\n    clients_per_round: 5\n    selection: {{selection: round_robin}}\n    quorum: 0.6\n    round_timeout: 8s\n    secure_aggregation: {{threshold: 0.6}}\n    local: {{epochs: 1, batch_size: 16, learning_rate: 0.1}}\nsinks:\n  plans:\n    type: file\n    input: train.plans\n    path: {p}\n  rounds:\n    type: file\n    input: train\n    path: {d}/rounds.jsonl\n  models:\n    type: file\n    input: train.models\n    path: {d}/models.jsonl\n  rejected:\n    type: dead_letter\n    input: train.rejected\n    path: {d}/dead.jsonl\n",
            u = updates.display(),
            p = plans.display(),
            data = data().display(),
            d = dir.path().display()
        ),
    )
    .unwrap();
    let mut engine = common::Running(
        Command::new(env!("CARGO_BIN_EXE_edgeflow"))
            .arg("run")
            .arg(&pipeline)
            .args(["--no-metrics", "--workers", "2"])
            .stderr(std::fs::File::create(dir.path().join("engine.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut clients: Vec<common::Running> = ids
        .iter()
        .map(|id| {
            let mut command = Command::new(env!("CARGO_BIN_EXE_edgeflow"));
            command
                .args(["client", "--id", id, "--rounds", "2", "--idle-timeout", "60"])
                .arg("--plans")
                .arg(&plans)
                .arg("--updates")
                .arg(&updates)
                .arg("--data")
                .arg(dir.path().join(format!("{id}.csv")));
            if id == "client-02" {
                command.args(["--drop-after-sharing", "1"]);
            }
            common::Running(
                command.stderr(std::fs::File::create(dir.path().join(format!("{id}.log"))).unwrap()).spawn().unwrap(),
            )
        })
        .collect();
    let rounds_path = dir.path().join("rounds.jsonl");
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&rounds_path).unwrap_or_default().lines().count() < 2 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(90),
            "two rounds were not reported: {}",
            std::fs::read_to_string(dir.path().join("engine.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for client in &mut clients {
        let status = client.0.wait().unwrap();
        assert!(status.success(), "a client failed");
    }
    let id = engine.id().to_string();
    assert!(Command::new("kill").args(["-s", "TERM", &id]).status().unwrap().success());
    assert!(engine.0.wait().unwrap().success());

    let reports: Vec<serde_json::Value> = common::json_values(&std::fs::read_to_string(&rounds_path).unwrap());
    let logs = || {
        let mut text = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap_or_default();
        for name in ["engine.log", "client-00.log", "client-02.log"] {
            text.push_str(&format!(
                "\n== {name}\n{}",
                std::fs::read_to_string(dir.path().join(name)).unwrap_or_default()
            ));
        }
        text
    };
    for report in &reports {
        assert!(report["failure"].is_null(), "{report}\n{}", logs());
        assert_eq!(report["accepted"], 4, "four survivors in each round: {report}");
    }
    assert_eq!(std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap_or_default(), "", "nothing refused");
    // The coordinator received protocol steps only, never an update in the clear, and each
    // masked update looks like noise over the whole ring.
    let sent: Vec<ModelUpdate> = common::json_values(&std::fs::read_to_string(&updates).unwrap());
    assert!(sent.iter().all(|u| u.payload.format == SECAGG_FORMAT), "an update was sent in the clear");
    let mut masked = 0;
    for update in &sent {
        if let Some(Ok(ClientStep::Masked { values, .. })) = ClientStep::from_update(update) {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD.decode(values).unwrap();
            let near = bytes
                .chunks_exact(8)
                .filter(|c| (u64::from_le_bytes((*c).try_into().unwrap()) as i64 as f64 / 16_777_216.0).abs() < 1e3)
                .count();
            assert!(near < 5, "{near} masked values look like plain ones");
            masked += 1;
        }
    }
    assert_eq!(masked, 8, "4 masked updates a round");
    // Round 1's model is the plain FedAvg of the four survivors' updates from the zero model.
    let zero = vec![0.0f32; 650];
    let plan = RoundPlan {
        round: 1,
        clients: ids.clone(),
        model_version: 0,
        local: LocalTraining { epochs: 1, batch_size: 16, learning_rate: 0.1, mu: 0.0 },
        clip_norm: None,
        local_noise_std: None,
        local_laplace_scale: None,
    };
    let record = PlanRecord::new(&plan, None, &zero);
    let (mut sum, mut weight) = (vec![0.0f64; 650], 0.0f64);
    for (id, dataset) in ids.iter().zip(&local).filter(|(id, _)| id.as_str() != "client-02") {
        let update = edgeflow_engine::client::train(&record, dataset, id).unwrap();
        let w = update.num_examples as f64;
        for (s, d) in sum.iter_mut().zip(update.payload.decode().unwrap()) {
            *s += w * f64::from(d);
        }
        weight += w;
    }
    let models = std::fs::read_to_string(dir.path().join("models.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(models.lines().next().unwrap()).unwrap();
    let payload: Payload = serde_json::from_value(first["payload"].clone()).unwrap();
    let model = payload.decode().unwrap();
    let worst = model.iter().zip(&sum).map(|(m, s)| (f64::from(*m) - s / weight).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-4, "the unmasked model differs from the plain FedAvg by {worst}");
}

/// The federated pipeline with checkpoints, killed with SIGKILL once part-way through its
/// rounds (after a checkpoint) and restarted: it goes on at the round it was in. Without
/// privacy noise, the rounds, models and CSV equal an uninterrupted run's byte for byte (the
/// same model at every round, no round twice or missing); with central DP, ε continues
/// where it was (the accountant's value for every round, as an uninterrupted run's).
#[test]
fn a_run_killed_mid_training_resumes_at_the_same_round_with_the_same_model_and_epsilon() {
    let dp = "    dp: {mode: central, clip_norm: 1.0, noise_multiplier: 1.0, epsilon_budget: 50, delta: 0.00001}\n";
    for extra in ["", dp] {
        let dir = tempfile::tempdir().unwrap();
        let expected = run(dir.path(), 1, extra);
        let pipeline = std::fs::read_to_string(dir.path().join("federated-1.yaml")).unwrap().replace(
            "name: federated-digits\n",
            "name: federated-digits\ncheckpoint:\n  dir: ckpt\n  interval: 100ms\n",
        );
        let path = dir.path().join("checkpointed.yaml");
        std::fs::write(&path, pipeline).unwrap();
        let out = |name: &str| dir.path().join(format!("{name}-restored"));
        let start = || {
            let mut command = Command::new(env!("CARGO_BIN_EXE_edgeflow"));
            command
                .current_dir(dir.path())
                .arg("run")
                .arg(&path)
                .args(["--no-metrics", "--log-format", "json"])
                .env("FEDERATED_ROUNDS", "30")
                .env("FEDERATED_CSV", out("csv"))
                .env("FEDERATED_ROUNDS_PATH", out("rounds"))
                .env("FEDERATED_MODELS_PATH", out("models"))
                .env("FEDERATED_DEAD_LETTERS", out("dead"))
                .env("FEDERATED_REGISTRY", dir.path().join("registry-restored"));
            command
        };
        // The first run stalls before the manifest of its second checkpoint and is killed
        // there: mid-training, after one complete checkpoint.
        let log = dir.path().join("first.log");
        let mut first = start();
        first.env("EDGEFLOW_TEST_PAUSE_BEFORE_MANIFEST", "2:600000");
        first.stdout(std::process::Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        let mut first = common::Running(first.spawn().unwrap());
        common::wait_for(
            "the pause before the second checkpoint's manifest",
            std::time::Duration::from_secs(120),
            || std::fs::read_to_string(&log).is_ok_and(|log| log.contains("pausing before the manifest")),
        );
        let reports = || std::fs::read_to_string(out("rounds")).map(|t| t.lines().count()).unwrap_or(0);
        first.kill().unwrap();
        first.wait().unwrap();
        let killed_at = reports();
        assert!(killed_at < 30, "the run finished before it was killed ({killed_at} rounds)");
        let output = start().output().unwrap();
        let log = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "{log}");
        let restored =
            log.lines().find(|l| l.contains("federated training restored")).unwrap_or_else(|| panic!("{log}"));
        let round: serde_json::Value = serde_json::from_str(restored).unwrap();
        let round = round["round"].as_u64().unwrap();
        assert!(
            (1..=30).contains(&round) && round <= killed_at as u64 + 1,
            "restored at round {round}, killed after {killed_at}"
        );
        let read = |name: &str| std::fs::read_to_string(out(name)).unwrap();
        let (csv, rounds, models) = (read("csv"), read("rounds"), read("models"));
        let reports: Vec<serde_json::Value> = common::json_values(&rounds);
        let numbers: Vec<u64> = reports.iter().map(|r| r["round"].as_u64().unwrap()).collect();
        assert_eq!(numbers, (1..=30).collect::<Vec<_>>(), "every round once, in order");
        assert_eq!(csv.lines().count(), 31, "a header and 30 rounds in the CSV");
        if extra.is_empty() {
            assert!(rounds == expected.1, "the rounds differ from an uninterrupted run's");
            assert!(models == expected.2, "the models differ from an uninterrupted run's");
            assert!(csv == expected.0, "the CSV differs from an uninterrupted run's");
        } else {
            let epsilons: Vec<f64> = reports.iter().map(|r| r["epsilon"].as_f64().unwrap()).collect();
            for (index, epsilon) in epsilons.iter().enumerate() {
                let want = edgeflow_operators::federated::privacy::epsilon_for(1.0, 0.5, index as u64 + 1, 1e-5).0;
                assert!((epsilon - want).abs() < 1e-9, "round {}: epsilon {epsilon} vs {want}", index + 1);
            }
        }
    }
}

/// External clients over files with checkpoints: the engine is killed with SIGKILL in round
/// 2 after three of its five clients' updates are covered by a complete checkpoint, and
/// restarted; the other two answer then. Round 2 counts all five once (the three saved with
/// the open round, not lost and not read again), and every round's global model equals an
/// uninterrupted run's.
#[test]
fn external_clients_killed_mid_round_keep_the_updates_they_sent() {
    use common::external_clients::{fleet, pipeline};
    let models = |kill: bool| {
        let dir = tempfile::tempdir().unwrap();
        let (plans, updates) = (dir.path().join("plans.jsonl"), dir.path().join("updates.jsonl"));
        let mut file = std::fs::File::create(&updates).unwrap();
        let source = format!(
            "    type: file\n    path: {}\n    records: model_updates\n    follow: true\n    poll_interval: 20ms\n    idle_timeout: 100ms",
            updates.display()
        );
        let sink = format!("    type: file\n    input: train.plans\n    path: {}", plans.display());
        // No round closes on its deadline: each waits for its five clients.
        let path = pipeline(dir.path(), &data(), &source, &sink, 600_000);
        let yaml = std::fs::read_to_string(&path).unwrap().replacen(
            "sources:",
            "checkpoint:\n  dir: ckpt\n  interval: 100ms\nsources:",
            1,
        );
        std::fs::write(&path, yaml).unwrap();
        let log = dir.path().join("engine.log");
        let start = || {
            common::Running(
                Command::new(env!("CARGO_BIN_EXE_edgeflow"))
                    .arg("run")
                    .arg(&path)
                    .args(["--no-metrics", "--log-format", "json"])
                    .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
                    .spawn()
                    .unwrap(),
            )
        };
        let mut engine = start();
        let fleet = fleet(&data());
        let mut send = |plan: &PlanRecord, clients: &[String]| -> u64 {
            let global = plan.model.decode().unwrap();
            let mut newest = 0;
            for client in clients {
                let mut update = fleet.train(&plan.plan, &global, client).unwrap();
                update.timestamp = edgeflow_connectors::wall_clock_ms();
                newest = update.timestamp;
                writeln!(file, "{}", serde_json::to_string(&update).unwrap()).unwrap();
            }
            file.flush().unwrap();
            newest
        };
        let plan = |round: usize| {
            common::wait_for(&format!("the plan of round {round}"), Duration::from_secs(60), || {
                common::written_json_values::<PlanRecord>(&plans).len() >= round
            });
            common::written_json_values::<PlanRecord>(&plans).remove(round - 1)
        };
        for round in 1..=6 {
            let plan = plan(round);
            let (first, rest) = plan.plan.clients.split_at(3);
            let newest = send(&plan, first);
            if kill && round == 2 {
                // A complete checkpoint past the three updates' time: they are in its state.
                common::wait_for("a checkpoint after the updates", Duration::from_secs(60), || {
                    std::fs::read_to_string(&log).unwrap_or_default().lines().any(|line| {
                        let line: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
                        line["message"] == "checkpoint complete" && line["time"].as_u64().is_some_and(|t| t > newest)
                    })
                });
                engine.kill().unwrap();
                engine.wait().unwrap();
                engine = start();
            }
            send(&plan, rest);
        }
        let rounds = dir.path().join("rounds.jsonl");
        common::wait_for("the sixth round", Duration::from_secs(60), || {
            std::fs::read_to_string(&rounds).unwrap_or_default().lines().count() >= 6
        });
        let id = engine.id().to_string();
        assert!(Command::new("kill").args(["-s", "TERM", &id]).status().unwrap().success());
        assert!(engine.0.wait().unwrap().success(), "{}", std::fs::read_to_string(&log).unwrap());
        let log = std::fs::read_to_string(&log).unwrap();
        assert_eq!(log.contains("federated training restored"), kill, "{log}");
        let reports: Vec<serde_json::Value> = common::json_values(&std::fs::read_to_string(&rounds).unwrap());
        let counts: Vec<(u64, u64)> =
            reports.iter().map(|r| (r["round"].as_u64().unwrap(), r["accepted"].as_u64().unwrap())).collect();
        assert_eq!(counts, (1..=6).map(|round| (round, 5)).collect::<Vec<_>>(), "every round once, all five in");
        models_of(&std::fs::read_to_string(dir.path().join("models.jsonl")).unwrap())
    };
    let restored = models(true);
    assert!(restored == models(false), "the models differ from an uninterrupted run's");
}

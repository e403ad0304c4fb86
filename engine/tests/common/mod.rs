//! Helpers shared by the end-to-end test crates (each includes this module with `mod common;`).
// Each test crate uses its own subset of these helpers.
#![allow(dead_code)]

pub mod apache_kafka;

use std::io::Write;
use std::process::{Child, Command, Stdio};

/// The `edgeflow` binary under test, with a clean environment (info logs, no worker or
/// metrics override from the caller's environment).
pub fn edgeflow() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgeflow"));
    command.env("EDGEFLOW_LOG", "info").env_remove("EDGEFLOW_WORKERS").env_remove("EDGEFLOW_METRICS_ADDR");
    command
}

/// Runs `command` to its end.
pub fn output(command: &mut Command) -> std::process::Output {
    command.output().unwrap_or_else(|err| panic!("cannot run edgeflow: {err}"))
}

/// Waits until `condition` holds, checking every 20 ms; fails after `limit`, naming `what`.
pub fn wait_for(what: &str, limit: std::time::Duration, mut condition: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Writes `text` to `dir/name`.
pub fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
    path
}

/// A running edgeflow process that is killed if the test panics before it ends.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Fails unless `promtool check metrics` accepts `metrics` (the Prometheus text exposition).
pub fn promtool_accepts(metrics: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "promtool is needed to validate /metrics ({err}); scripts/test.sh installs it (apt package prometheus)"
            )
        });
    promtool.stdin.take().unwrap().write_all(metrics.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
}

/// The JSON values of a JSON-lines text, one per line.
pub fn json_values<T: serde::de::DeserializeOwned>(text: &str) -> Vec<T> {
    text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

/// The whole lines written so far to a JSON-lines file (a sink may be half-way through the
/// last one), as JSON values; none if the file is not there yet.
pub fn written_json_values<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Vec<T> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    json_values(text.rfind('\n').map_or("", |end| &text[..=end]))
}

/// Edge clients outside the engine, for the federated tests: a simulated fleet that reads
/// round plans and sends its updates through some transport, following a script that makes
/// every round rule visible.
pub mod external_clients {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use edgeflow_operators::federated::coordinator::PlanRecord;
    use edgeflow_operators::federated::learn::{Dataset, Partition};
    use edgeflow_operators::federated::simulate::SimulatedFleet;
    use edgeflow_operators::federated::update::ModelUpdate;

    /// Where plans come from and updates go.
    pub trait Transport {
        /// Plans published since the last call.
        fn plans(&mut self) -> Vec<PlanRecord>;
        /// Sends JSON updates, in order.
        fn send(&mut self, lines: &[String]);
    }

    /// The pipeline's settings the clients must share: the digits split over 20 clients
    /// (Dirichlet 0.5, seed 3, 20% held out), as the operator's defaults make it.
    pub fn fleet(dataset: &Path) -> SimulatedFleet {
        let text = std::fs::read_to_string(dataset).unwrap();
        let data = Dataset::parse_csv(&text, 16.0).unwrap();
        let (train, _) = data.split(0.2, 3);
        SimulatedFleet::new(&train, 20, Partition::Dirichlet { alpha: 0.5 }, 3)
    }

    /// The pipeline of a federated operator whose clients are outside, with `source` (indented
    /// YAML of the `updates` source), `plans_sink` (of the `plans` sink) and a round timeout.
    pub fn pipeline(dir: &Path, dataset: &Path, source: &str, plans_sink: &str, timeout_ms: u64) -> std::path::PathBuf {
        let yaml = format!(
            "name: federated-external\nsources:\n  updates:\n{source}\noperators:\n  train:\n    type: federated\n    input: updates\n    dataset: {}\n    clients: 20\n    rounds: 6\n    clients_per_round: 5\n    selection: {{selection: uniform, seed: 1}}\n    quorum: 0.6\n    round_timeout: {timeout_ms}ms\n    local: {{epochs: 1, batch_size: 16, learning_rate: 0.1}}\nsinks:\n  plans:\n{plans_sink}\n  rounds:\n    type: file\n    input: train\n    path: {}\n  models:\n    type: file\n    input: train.models\n    path: {}\n  rejected:\n    type: dead_letter\n    input: train.rejected\n    path: {}\n  malformed:\n    type: dead_letter\n    path: {}\n",
            dataset.display(),
            dir.join("rounds.jsonl").display(),
            dir.join("models.jsonl").display(),
            dir.join("dead.jsonl").display(),
            dir.join("source-dead.jsonl").display(),
        );
        let path = dir.join("external.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// Runs `pipeline` (from [`pipeline`], logging to `DIR/engine.log`) on 2 workers, answers
    /// its 6 rounds through `transport`, waits for the 6th report and stops the engine with
    /// SIGTERM (it must exit 0).
    pub fn run(dir: &Path, pipeline: &Path, dataset: &Path, transport: &mut dyn Transport) -> Script {
        let log = dir.join("engine.log");
        let mut engine = super::Running(
            std::process::Command::new(env!("CARGO_BIN_EXE_edgeflow"))
                .arg("run")
                .arg(pipeline)
                .args(["--no-metrics", "--workers", "2"])
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        let script = answer(transport, &fleet(dataset), 6);
        let rounds = dir.join("rounds.jsonl");
        let start = Instant::now();
        while std::fs::read_to_string(&rounds).unwrap_or_default().lines().count() < 6 {
            assert!(start.elapsed() < Duration::from_secs(60), "round 6 was not reported");
            std::thread::sleep(Duration::from_millis(20));
        }
        let id = engine.id().to_string();
        assert!(std::process::Command::new("kill").args(["-s", "TERM", &id]).status().unwrap().success());
        let status = engine.0.wait().unwrap();
        assert!(status.success(), "SIGTERM exits 0: {}", std::fs::read_to_string(&log).unwrap_or_default());
        script
    }

    /// What the clients did, for the assertions.
    #[derive(Debug, Default)]
    pub struct Script {
        /// Every plan, in order.
        pub plans: Vec<PlanRecord>,
        /// The updates of round 1 (all accepted).
        pub first_round: Vec<ModelUpdate>,
    }

    /// Answers `rounds` plans: round 1 with a duplicate of its first update; round 2 without
    /// its last client, which sends late, once round 3 is announced; round 3 with an update
    /// from a client that was not selected; round 4 with only two clients (below a 0.6
    /// quorum of 5); the others in full.
    pub fn answer(transport: &mut dyn Transport, fleet: &SimulatedFleet, rounds: u64) -> Script {
        let mut script = Script::default();
        let mut late: Option<ModelUpdate> = None;
        let start = Instant::now();
        while (script.plans.len() as u64) < rounds {
            assert!(start.elapsed() < Duration::from_secs(120), "only {} plans arrived", script.plans.len());
            let plans = transport.plans();
            if plans.is_empty() {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            for record in plans {
                let plan = record.plan.clone();
                let global = record.model.decode().unwrap();
                let train = |client: &str| {
                    let mut update = fleet.train(&plan, &global, client).unwrap();
                    update.timestamp = edgeflow_connectors::wall_clock_ms();
                    update
                };
                let json = |update: &ModelUpdate| serde_json::to_string(update).unwrap();
                let mut lines = Vec::new();
                if let Some(mut late) = late.take() {
                    // Stamped when sent, as every update.
                    late.timestamp = edgeflow_connectors::wall_clock_ms();
                    lines.push(json(&late));
                }
                if plan.round == 3 {
                    // Before the selected clients' updates: the round closes as soon as all of
                    // them are in, and an update read after that is refused as late instead.
                    let outsider =
                        fleet.clients.iter().map(|(id, _)| id).find(|id| !plan.clients.contains(id)).unwrap();
                    let mut update = train(&plan.clients[0]);
                    update.client_id = outsider.clone();
                    lines.push(json(&update));
                }
                let clients = match plan.round {
                    2 => &plan.clients[..plan.clients.len() - 1],
                    4 => &plan.clients[..2],
                    _ => &plan.clients[..],
                };
                for (i, client) in clients.iter().enumerate() {
                    let update = train(client);
                    lines.push(json(&update));
                    if plan.round == 1 {
                        if i == 0 {
                            lines.push(json(&update));
                        }
                        script.first_round.push(update);
                    }
                }
                if plan.round == 2 {
                    late = Some(train(plan.clients.last().unwrap()));
                }
                transport.send(&lines);
                script.plans.push(record);
            }
        }
        script
    }
}

/// Checks what a federated operator with external clients wrote, against what the clients of
/// [`external_clients::answer`] did: `rounds`, `models` and `dead` are the lines of its
/// `rounds`, `models` and `rejected` outputs; `timeout_ms` its `round_timeout`.
pub fn check_external_rounds(
    script: &external_clients::Script,
    rounds: &str,
    models: &str,
    dead: &str,
    timeout_ms: u64,
) {
    use edgeflow_operators::federated::update::Payload;
    let reports: Vec<serde_json::Value> = json_values(rounds);
    assert_eq!(reports.len(), 6, "{rounds}");
    let field = |round: usize, name: &str| reports[round - 1][name].clone();
    let counts: Vec<(u64, u64, bool)> = reports
        .iter()
        .map(|r| (r["accepted"].as_u64().unwrap(), r["rejected"].as_u64().unwrap(), r["quorum_met"].as_bool().unwrap()))
        .collect();
    // Round 1: a duplicate refused; 2: the straggler missing; 3: the outsider refused (the
    // straggler's late update is refused before it reaches a round); 4: below the quorum.
    assert_eq!(
        counts,
        vec![(5, 1, true), (4, 0, true), (5, 1, true), (2, 0, false), (5, 0, true), (5, 0, true)],
        "{rounds}"
    );
    assert_eq!(field(4, "model_version"), field(3, "model_version"), "a failed round keeps the model");
    assert_eq!(field(6, "model_version"), 5);
    let accuracy = |round| field(round, "test_accuracy").as_f64().unwrap();
    assert!(accuracy(6) > accuracy(1), "held-out accuracy {} -> {}", accuracy(1), accuracy(6));

    // Round 1 closed as soon as all five answered; round 2 waited for its deadline.
    let deadline = |round: usize| script.plans[round - 1].deadline.unwrap();
    assert!(deadline(2) - deadline(1) < timeout_ms, "round 1 closed early: {} ms", deadline(2) - deadline(1));
    assert!(deadline(3) - deadline(2) + 5 >= timeout_ms, "round 2 waited: {} ms", deadline(3) - deadline(2));
    assert_eq!(script.plans.iter().map(|p| p.plan.round).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);

    // The first global model is the example-weighted mean of the round's updates (FedAvg
    // from a zero model).
    let first: serde_json::Value = serde_json::from_str(models.lines().next().unwrap()).unwrap();
    let payload: Payload = serde_json::from_value(first["payload"].clone()).unwrap();
    let model = payload.decode().unwrap();
    let total: u64 = script.first_round.iter().map(|u| u.num_examples).sum();
    let mut expected = vec![0.0f64; model.len()];
    for update in &script.first_round {
        for (e, v) in expected.iter_mut().zip(update.payload.decode().unwrap()) {
            *e += f64::from(v) * update.num_examples as f64 / total as f64;
        }
    }
    let worst = model.iter().zip(&expected).map(|(m, e)| (f64::from(*m) - e).abs()).fold(0.0, f64::max);
    assert!(worst < 1e-5, "round 1 model differs from FedAvg by {worst}");

    let letters: Vec<serde_json::Value> = json_values(dead);
    let reasons: Vec<&str> = letters.iter().map(|l| l["reason"].as_str().unwrap()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    for (expected, round) in
        [("already sent an update this round", 1), ("round 2 is closed", 2), ("was not selected", 3)]
    {
        let found = letters.iter().find(|l| l["reason"].as_str().unwrap().contains(expected));
        let found = found.unwrap_or_else(|| panic!("no dead letter says `{expected}`: {reasons:?}"));
        assert!(found["position"].as_str().unwrap().starts_with(&format!("round {round} ")), "{found}");
    }
}

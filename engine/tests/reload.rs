//! Hot reload end to end: `edgeflow reload` (and a plain SIGHUP) applies a changed pipeline
//! to a running one without losing state (no node is new again, a changed threshold applies
//! to later heartbeats, an added sink writes), and a file with problems is refused with its
//! `line:col` messages while the running pipeline goes on unchanged.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{edgeflow, output, wait_for, write, Running};
use serde_json::Value;

/// Node health over a followed heartbeats file, checkpointed; `cpu_degraded` and any extra
/// sinks vary between versions of the file.
fn pipeline(cpu_degraded: u32, extra_sinks: &str) -> String {
    format!(
        "name: reload\nmetrics:\n  enabled: false\ncheckpoint:\n  dir: ckpt\n  interval: 200ms\nsources:\n  beats:\n    type: file\n    path: beats.jsonl\n    follow: true\n    idle_timeout: 500ms\n    max_out_of_orderness: 0s\noperators:\n  health:\n    type: node_health\n    input: beats\n    heartbeat_timeout: 10m\n    unhealthy_after: 5m\n    cpu_degraded: {cpu_degraded}\n    rollup_window: 1s\nsinks:\n  changes:\n    type: file\n    input: health.changes\n    path: changes.jsonl\n{extra_sinks}"
    )
}

fn append_beats(dir: &Path, beats: &[(&str, f64)]) {
    use std::io::Write;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("beats.jsonl")).unwrap();
    for (node, cpu) in beats {
        let beat = serde_json::json!({"node_id": node, "region": "eu", "lat": 0.0, "lon": 0.0, "timestamp": now,
            "cpu": cpu, "memory": 10.0, "disk": 10.0});
        writeln!(file, "{beat}").unwrap();
    }
}

fn changes(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("changes.jsonl")).unwrap_or_default();
    text.lines().filter(|l| l.ends_with('}')).map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn has_change(dir: &Path, node: &str, to: &str) -> bool {
    changes(dir).iter().any(|c| c["node_id"] == node && c["to"] == to)
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("engine.log")).unwrap_or_default()
}

#[test]
fn a_changed_pipeline_is_applied_with_its_state_and_a_bad_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "pipeline.yaml", &pipeline(90, ""));
    append_beats(dir.path(), &[("n0", 50.0), ("n1", 50.0), ("n2", 50.0)]);
    let stderr = std::fs::File::create(dir.path().join("engine.log")).unwrap();
    let mut engine = Running(
        edgeflow()
            .current_dir(dir.path())
            .args(["run", "pipeline.yaml", "--no-status", "--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    let limit = Duration::from_secs(60);
    wait_for("three new nodes", limit, || changes(dir.path()).len() == 3);
    wait_for("a checkpoint", limit, || log(dir.path()).contains("checkpoint complete"));

    // A lower threshold and a new sink, through `edgeflow reload`.
    let rollups = "  rollups:\n    type: file\n    input: health.rollups\n    path: rollups.jsonl\n";
    write(dir.path(), "pipeline.yaml", &pipeline(70, rollups));
    let pid = engine.id().to_string();
    let sent = output(edgeflow().args(["reload", "--pid", &pid]).arg(&file));
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    wait_for("the reload", limit, || log(dir.path()).contains("reloaded: starting the new pipeline"));
    append_beats(dir.path(), &[("n0", 80.0), ("n1", 50.0)]);
    wait_for("n0 degraded at 80% under the new threshold", limit, || has_change(dir.path(), "n0", "degraded"));
    wait_for("rollups in the added sink", limit, || {
        std::fs::read_to_string(dir.path().join("rollups.jsonl")).is_ok_and(|t| t.contains("\"region\":\"eu\""))
    });

    // A file with a problem: `edgeflow reload` prints it and sends nothing; a plain SIGHUP
    // makes the engine log it and go on with the pipeline it runs (threshold 70).
    write(dir.path(), "pipeline.yaml", &pipeline(250, rollups));
    let refused = output(edgeflow().args(["reload", "--pid", &pid]).arg(&file));
    let message = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert_eq!(refused.status.code(), Some(3), "{message}");
    assert!(message.contains("pipeline.yaml:") && message.contains("cpu_degraded"), "{message}");
    let hup = std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(hup.success());
    wait_for("the refusal in the log", limit, || log(dir.path()).contains("reload refused"));
    let refusal = log(dir.path()).lines().find(|l| l.contains("reload refused")).unwrap().to_owned();
    assert!(refusal.contains("pipeline.yaml:") && refusal.contains("cpu_degraded"), "{refusal}");
    append_beats(dir.path(), &[("n1", 75.0)]);
    wait_for("n1 degraded at 75% (threshold still 70)", limit, || has_change(dir.path(), "n1", "degraded"));
    assert!(engine.try_wait().unwrap().is_none(), "the engine runs on");

    // State carried over: every node was new once, before the reload.
    let all = changes(dir.path());
    let new: Vec<_> = all.iter().filter(|c| c["from"].is_null()).collect();
    assert_eq!(new.len(), 3, "a node reported new again after the reload: {all:?}");
    engine.kill().unwrap();
    engine.wait().unwrap();
}

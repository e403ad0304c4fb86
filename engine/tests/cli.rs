//! End-to-end tests of the `edgeflow` binary: exit statuses, schema and graph, identical
//! output on 1 and 4 workers and on a 2-process cluster, graceful stop on SIGINT/SIGTERM,
//! the metrics endpoints (checked with `promtool`), and an idle followed file that does not
//! hold the watermark back.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{edgeflow, output, promtool_accepts, wait_for, write, Running};

fn fleet_pipeline(out: &Path, nodes: u32, duration: &str) -> String {
    format!(
        r#"
name: fleet-test
late_policy: dead_letter
sources:
  fleet:
    type: generator
    nodes: {nodes}
    speed: max
    duration: {duration}
    failure_rate: 0.01
    mean_outage: 3m
    late_fraction: 0.01
    malformed_fraction: 0.005
    seed: 11
operators:
  health:
    type: node_health
    input: fleet
  windows:
    type: window_aggregate
    input: fleet
    key: region
    window: 1m
    slide: 30s
sinks:
  changes:
    type: file
    input: health.changes
    path: {out}/changes.jsonl
  status:
    type: file
    input: health.status
    path: {out}/status.jsonl
  rollups:
    type: file
    input: health.rollups
    path: {out}/rollups.jsonl
  window_results:
    type: file
    input: windows
    path: {out}/windows.jsonl
  dead:
    type: dead_letter
    path: {out}/dead.jsonl
"#,
        out = out.display()
    )
}

fn read_outputs(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap()))
        .collect()
}

#[test]
fn validate_exit_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.yaml", "sources:\n  fleet:\n    type: generator\n    heartbeat_interval: 30q\nsinks:\n  out:\n    type: stdout\n    input: flet\n");
    let result = output(edgeflow().arg("validate").arg(&bad));
    assert_eq!(result.status.code(), Some(3), "invalid pipeline exits 3");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("bad.yaml:4:25"), "{stderr}");
    assert!(stderr.contains("did you mean `fleet`?"), "{stderr}");
    assert!(stderr.contains("2 problems found"), "{stderr}");
    // `run` refuses the same file with the same status, before starting anything.
    let result = output(edgeflow().arg("run").arg(&bad).arg("--no-metrics"));
    assert_eq!(result.status.code(), Some(3));

    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/edge-fleet.yaml");
    let result = output(edgeflow().arg("validate").arg(&good));
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let missing = output(edgeflow().arg("validate").arg(dir.path().join("nope.yaml")));
    assert_eq!(missing.status.code(), Some(3));
}

/// Every pipeline shipped in `pipelines/` validates, on its embedded defaults.
#[test]
fn every_shipped_pipeline_validates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines");
    let mut shipped: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    shipped.sort();
    assert!(shipped.len() >= 5, "{shipped:?}");
    for pipeline in shipped {
        let result = output(edgeflow().arg("validate").arg(&pipeline));
        assert!(result.status.success(), "{}: {}", pipeline.display(), String::from_utf8_lossy(&result.stderr));
    }
}

#[test]
fn schema_and_graph() {
    let result = output(edgeflow().arg("schema"));
    assert!(result.status.success());
    let schema: serde_json::Value = serde_json::from_slice(&result.stdout).expect("schema is JSON");
    let text = schema.to_string();
    assert!(text.contains("A node with no heartbeat for this long is Offline"), "doc comments become descriptions");
    assert!(text.contains("\"generator\""));

    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("../pipelines/edge-fleet.yaml");
    let dot = output(edgeflow().args(["graph", "--format", "dot"]).arg(&good));
    let dot = String::from_utf8_lossy(&dot.stdout);
    assert!(dot.contains("\"fleet\" -> \"health\""), "{dot}");
    assert!(dot.contains("\"health\" -> \"rollups\" [label=\"rollups\"]"), "{dot}");
    let mermaid = output(edgeflow().arg("graph").arg(&good));
    assert!(String::from_utf8_lossy(&mermaid.stdout).starts_with("flowchart LR"));
}

fn run_fleet(workers: usize) -> Vec<(String, String)> {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write(dir.path(), "p.yaml", &fleet_pipeline(dir.path(), 60, "40m"));
    let result = output(edgeflow().arg("run").arg(&pipeline).args(["--no-metrics", "--workers", &workers.to_string()]));
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    read_outputs(dir.path())
}

#[test]
fn same_output_on_one_and_four_workers() {
    let one = run_fleet(1);
    let four = run_fleet(4);
    assert_eq!(one.len(), 5);
    for ((name, a), (_, b)) in one.iter().zip(&four) {
        assert!(a.lines().count() > 10 || name == "dead.jsonl", "{name} has output");
        assert!(a == b, "{name} differs between 1 and 4 workers");
    }
    let changes = &one.iter().find(|(n, _)| n == "changes.jsonl").unwrap().1;
    assert!(
        changes.contains("\"to\":\"offline\"") && changes.contains("\"from\":\"offline\",\"to\":\"healthy\""),
        "failures and recoveries"
    );
    let dead = &one.iter().find(|(n, _)| n == "dead.jsonl").unwrap().1;
    assert!(dead.contains("late record") && dead.contains("invalid heartbeat"), "{dead}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn two_processes_give_the_output_of_one() {
    let single = run_fleet(1);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write(dir.path(), "p.yaml", &fleet_pipeline(dir.path(), 60, "40m"));
    let hostfile = write(dir.path(), "hosts", &format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port()));
    let children: Vec<Running> = (0..2)
        .map(|process| {
            edgeflow()
                .arg("run")
                .arg(&pipeline)
                .args(["--no-metrics", "--processes", "2", "--process", &process.to_string()])
                .arg("--hostfile")
                .arg(&hostfile)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map(Running)
                .unwrap()
        })
        .collect();
    for mut child in children {
        let status = wait_exit(&mut child, Duration::from_secs(120));
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(status.success(), "{stderr}");
    }
    let cluster = read_outputs(dir.path());
    assert_eq!(single.len(), cluster.len());
    for ((name, a), (_, b)) in single.iter().zip(&cluster) {
        assert!(a == b, "{name} differs between 1 process and 2 processes");
    }
}

/// Starts a realtime fleet writing status changes to a file, with metrics on an ephemeral
/// port; returns the child, the metrics address and the output directory.
fn start_realtime(dir: &Path) -> (Running, String, PathBuf) {
    let out = dir.join("changes.jsonl");
    let pipeline = write(
        dir,
        "live.yaml",
        &format!(
            "name: live\nmetrics:\n  address: 127.0.0.1:0\nsources:\n  fleet:\n    type: generator\n    nodes: 200\n    heartbeat_interval: 1s\n    jitter: 100ms\n    disorder: 100ms\n    max_out_of_orderness: 200ms\noperators:\n  health:\n    type: node_health\n    input: fleet\n    heartbeat_timeout: 3s\n    unhealthy_after: 2s\n    rollup_window: 1s\nsinks:\n  changes:\n    type: file\n    input: health.changes\n    path: {}\n",
            out.display()
        ),
    );
    let mut child = Running(
        edgeflow()
            .arg("run")
            .arg(&pipeline)
            .args(["--log-format", "json", "--workers", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut address = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let log: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("log lines are JSON: {line}"));
        if let Some(addr) = log.get("address").and_then(|a| a.as_str()) {
            address = Some(addr.to_owned());
            break;
        }
    }
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, address.expect("the metrics address is logged"), out)
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").args(["-s", name, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("edgeflow did not stop within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_endpoints_and_graceful_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, address, out) = start_realtime(dir.path());
    let get = |path: &str| ureq::get(&format!("http://{address}{path}")).call().map_err(Box::new);
    assert_eq!(get("/health").unwrap().into_string().unwrap(), "ok\n");
    wait_for("readiness", Duration::from_secs(20), || get("/ready").is_ok());
    // Wait until the health of all 200 nodes is known (status changes written).
    wait_for("status changes", Duration::from_secs(30), || {
        std::fs::read_to_string(&out).map(|text| text.lines().count() >= 200).unwrap_or(false)
    });
    let metrics = get("/metrics").unwrap().into_string().unwrap();
    for expected in [
        "edgeflow_source_records_total{source=\"fleet\"}",
        "edgeflow_operator_records_total{operator=\"health\",port=\"input\"}",
        "edgeflow_nodes{status=\"healthy\"}",
        "edgeflow_watermark_lag_seconds{source=\"fleet\",worker=\"0\"}",
        "edgeflow_sink_records_total{sink=\"changes\"}",
    ] {
        assert!(metrics.contains(expected), "missing {expected} in\n{metrics}");
    }
    let healthy: i64 = metrics
        .lines()
        .find(|l| l.starts_with("edgeflow_nodes{status=\"healthy\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(healthy > 100, "most of the 200 nodes are healthy: {healthy}");
    promtool_accepts(&metrics);

    signal(&child, "INT");
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "SIGINT exits 0: {status:?}");
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(written.ends_with('\n'), "the sink flushed whole lines");
    for line in written.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|_| panic!("complete JSON line: {line}"));
    }
}

#[test]
fn sigterm_stops_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _address, out) = start_realtime(dir.path());
    wait_for("status changes", Duration::from_secs(30), || {
        std::fs::metadata(&out).map(|m| m.len() > 0).unwrap_or(false)
    });
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
}

#[test]
fn idle_followed_file_does_not_hold_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output_path = dir.path().join("windows.jsonl");
    let pipeline = write(
        dir.path(),
        "follow.yaml",
        &format!(
            "sources:\n  beats:\n    type: file\n    path: {}\n    follow: true\n    poll_interval: 20ms\n    idle_timeout: 500ms\n    max_out_of_orderness: 1s\noperators:\n  windows:\n    type: window_aggregate\n    input: beats\n    window: 1s\nsinks:\n  out:\n    type: file\n    input: windows\n    path: {}\n",
            input.display(),
            output_path.display()
        ),
    );
    // The five heartbeats fall in one 1 s window: started at a whole second, they cannot
    // straddle a window boundary.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let now = now - now % 1000;
    let mut file = std::fs::File::create(&input).unwrap();
    for i in 0..5 {
        writeln!(
            file,
            r#"{{"node_id":"n1","region":"eu","lat":1,"lon":1,"timestamp":{},"cpu":{},"memory":1,"disk":1}}"#,
            now + i * 10,
            10 + i
        )
        .unwrap();
    }
    file.flush().unwrap();
    let mut child = edgeflow()
        .arg("run")
        .arg(&pipeline)
        .arg("--no-metrics")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // No record after these: only the idle timeout can move the watermark past the window.
    wait_for("the window to close on an idle source", Duration::from_secs(20), || {
        std::fs::read_to_string(&output_path).map(|t| t.contains("\"count\":5")).unwrap_or(false)
    });
    signal(&child, "INT");
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
}

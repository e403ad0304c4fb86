//! Inputs made to crash or exhaust the engine, tried through the `edgeflow` binary: each
//! test is an attack that used to succeed (issue 12) and must now be refused or survived.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{edgeflow, output, write, written_json_values, Running};

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn beat(node: &str, time: u64) -> String {
    format!(r#"{{"node_id":"{node}","region":"eu","lat":1,"lon":2,"timestamp":{time},"cpu":10,"memory":20,"disk":30}}"#)
}

/// A heartbeat far in the future (or at u64::MAX) between good ones: it is dead-lettered
/// with its reason, later good heartbeats are not late, and the run ends normally (it used
/// to grow memory without bound, or panic a worker in differential's reduce).
#[test]
fn far_future_heartbeats_in_a_file_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let start = now_ms() - 120_000;
    let mut lines: Vec<String> = (0..10).map(|i| beat(&format!("early-{i}"), start + i * 1000)).collect();
    lines.push(beat("year-ahead", now_ms() + 365 * 86_400_000));
    lines.push(beat("year-9999", 253_402_300_799_999));
    lines.push(beat("max", u64::MAX));
    lines.extend((0..10).map(|i| beat(&format!("later-{i}"), start + 20_000 + i * 1000)));
    let data = write(dir.path(), "beats.jsonl", &(lines.join("\n") + "\n"));
    let pipeline = write(
        dir.path(),
        "p.yaml",
        &format!(
            "late_policy: dead_letter\nsources:\n  beats:\n    type: file\n    path: {}\noperators:\n  health:\n    type: node_health\n    input: beats\n  cpu:\n    type: window_aggregate\n    input: beats\n    key: region\n    field: cpu\n    window: 1m\n    aggregates: [count]\nsinks:\n  changes:\n    type: file\n    input: health.changes\n    path: {d}/changes.jsonl\n  rollups:\n    type: file\n    input: health.rollups\n    path: {d}/rollups.jsonl\n  windows:\n    type: file\n    input: cpu\n    path: {d}/windows.jsonl\n  rejected:\n    type: dead_letter\n    path: {d}/dead.jsonl\n",
            data.display(),
            d = dir.path().display()
        ),
    );
    for workers in ["1", "2"] {
        let out = output(edgeflow().arg("run").arg(&pipeline).args(["--no-metrics", "--workers", workers]));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let letters: Vec<serde_json::Value> = written_json_values(&dir.path().join("dead.jsonl"));
        let reasons: Vec<&str> = letters.iter().map(|l| l["reason"].as_str().unwrap()).collect();
        assert_eq!(reasons.len(), 3, "{reasons:#?}");
        assert_eq!(reasons.iter().filter(|r| r.contains("ahead of the wall clock")).count(), 2, "{reasons:#?}");
        assert!(reasons.iter().any(|r| r.contains("past the latest event time")), "{reasons:#?}");
        let changes: Vec<serde_json::Value> = written_json_values(&dir.path().join("changes.jsonl"));
        assert!((0..10).all(|i| changes.iter().any(|c| c["node_id"] == format!("later-{i}").as_str())));
        let windows: Vec<serde_json::Value> = written_json_values(&dir.path().join("windows.jsonl"));
        assert_eq!(windows.iter().map(|w| w["count"].as_u64().unwrap()).sum::<u64>(), 20, "{windows:?}");
    }
}

/// 614 bytes of nested YAML aliases ("billion laughs") used to make `validate` allocate
/// gigabytes.
#[test]
fn a_yaml_alias_bomb_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("name: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (level, name) in "bcdefghi".chars().enumerate() {
        let refs = vec![format!("*{}", (b'a' + level as u8) as char); 9].join(",");
        text.push_str(&format!("{name}: &{name} [{refs}]\n"));
    }
    let pipeline = write(dir.path(), "bomb.yaml", &text);
    let out = output(edgeflow().arg("validate").arg(&pipeline));
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expands to more than 100000 nodes"), "{stderr}");
}

#[test]
fn a_device_or_fifo_is_not_read_as_a_pipeline() {
    let out = output(edgeflow().args(["validate", "/dev/zero"]));
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a regular file"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.yaml");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let out = output(edgeflow().arg("validate").arg(&fifo));
    assert_eq!(out.status.code(), Some(3), "a FIFO is refused without waiting for a writer");
}

#[test]
fn a_pipeline_file_with_a_byte_order_mark_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write(
        dir.path(),
        "bom.yaml",
        "\u{feff}sources:\n  fleet:\n    type: generator\n    nodes: 3\noperators:\n  health:\n    type: node_health\n    input: fleet\nsinks:\n  out:\n    type: stdout\n    input: health.changes\n",
    );
    let out = output(edgeflow().arg("validate").arg(&pipeline));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn worker_and_process_counts_are_bounded() {
    for (flag, value) in [("--workers", "0"), ("--workers", "100000"), ("--processes", "0"), ("--processes", "5000")] {
        let out = output(edgeflow().args(["run", "pipelines/edge-fleet.yaml", flag, value]));
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("out of range"), "{flag} {value}: {stderr}");
    }
}

fn fleet(dir: &Path, sinks: &str, extra: &str) -> PathBuf {
    write(
        dir,
        "fleet.yaml",
        &format!(
            "name: fleet\n{extra}sources:\n  fleet:\n    type: generator\n    nodes: 300\n    speed: max\n    duration: 2h\n    failure_rate: 0.05\n    mean_outage: 2m\n    seed: 3\noperators:\n  health:\n    type: node_health\n    input: fleet\n    rollup_window: 30s\nsinks:\n{sinks}"
        ),
    )
}

/// `edgeflow run ... | head` ends quietly with status 0 when `head` closes the pipe.
#[test]
fn a_closed_stdout_stops_the_run_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline =
        fleet(dir.path(), "  out:\n    type: stdout\n    input: health.changes\n", "metrics:\n  enabled: false\n");
    let mut child =
        Running(edgeflow().arg("run").arg(&pipeline).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap());
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    for _ in 0..3 {
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with('{'), "{line}");
    }
    drop(stdout);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "edgeflow kept running after its stdout closed");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("error"), "no error is reported: {stderr}");
}

/// Two stdout sinks write whole lines: each line is a prefix and one complete JSON record.
#[test]
fn stdout_sinks_never_interleave() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = fleet(
        dir.path(),
        "  changes:\n    type: stdout\n    input: health.changes\n    prefix: \"change \"\n  rollups:\n    type: stdout\n    input: health.rollups\n    prefix: \"rollup \"\n",
        "metrics:\n  enabled: false\n",
    );
    let out = output(edgeflow().arg("run").arg(&pipeline).args(["--workers", "2"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (mut changes, mut rollups) = (0, 0);
    for line in text.lines() {
        let (kind, json) = line.split_once(' ').unwrap_or_else(|| panic!("no prefix: {line}"));
        let value: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|err| panic!("{err}: {line}"));
        match kind {
            "change" => {
                changes += 1;
                assert!(value.get("to").is_some(), "{line}");
            }
            "rollup" => {
                rollups += 1;
                assert!(value.get("window_end").is_some(), "{line}");
            }
            other => panic!("unknown prefix `{other}`: {line}"),
        }
    }
    assert!(changes > 300 && rollups > 100, "changes {changes} rollups {rollups}");
}

/// A thousand connections that never send a request cannot make `/health` unreachable.
#[test]
fn idle_connections_cannot_lock_out_the_health_check() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = write(
        dir.path(),
        "live.yaml",
        "metrics:\n  address: 127.0.0.1:0\nsources:\n  fleet:\n    type: generator\n    nodes: 10\n    heartbeat_interval: 1s\noperators:\n  health:\n    type: node_health\n    input: fleet\nsinks:\n  out:\n    type: file\n    input: health.changes\n    path: /dev/null\n",
    );
    let mut child = Running(
        edgeflow()
            .arg("run")
            .arg(&pipeline)
            .args(["--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let address = lines
        .by_ref()
        .find_map(|line| {
            let log: serde_json::Value = serde_json::from_str(&line.ok()?).ok()?;
            log.get("address").and_then(|a| a.as_str()).map(str::to_owned)
        })
        .expect("the metrics address is logged");
    std::thread::spawn(move || for _ in lines {});
    let idle: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(&address).unwrap()).collect();
    let health = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let response = health.get(&format!("http://{address}/health")).call().expect("/health answers");
    assert_eq!(response.into_string().unwrap(), "ok\n");
    let ready = health.get(&format!("http://{address}/ready")).call();
    assert!(ready.is_ok() || matches!(ready, Err(ureq::Error::Status(503, _))), "/ready answers: {ready:?}");
    // The newest idle connection is still open; the server closes it when it has not sent a
    // request head within the header timeout (10 s): the read ends with end of file.
    let mut last = idle.into_iter().last().unwrap();
    last.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut byte = [0u8; 1];
    let read = last.read(&mut byte);
    assert!(matches!(read, Ok(0)), "the idle connection is closed by the server: {read:?}");
}

/// Dead letters of a file read by several workers come out in the same order as on one
/// worker: the workers share the file's event clock, so every dead letter (malformed or
/// late) gets the time a single reader gives it.
#[test]
fn dead_letters_come_out_in_the_same_order_on_any_number_of_workers() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    let mut time = 1_700_000_000_000u64;
    for i in 0..3000u64 {
        time += (i * 7919) % 200;
        if i % 37 == 0 {
            lines.push(format!("{{\"node_id\": broken {i}"));
        } else {
            let late = if i % 53 == 0 { 20_000 } else { 0 };
            lines.push(beat(&format!("n{}", i % 50), time - late));
        }
    }
    let data = write(dir.path(), "beats.jsonl", &(lines.join("\n") + "\n"));
    let mut outputs = Vec::new();
    for workers in ["1", "3", "4"] {
        let out = dir.path().join(format!("out-{workers}"));
        std::fs::create_dir_all(&out).unwrap();
        let pipeline = write(
            dir.path(),
            &format!("p-{workers}.yaml"),
            &format!(
                "late_policy: dead_letter\nmetrics:\n  enabled: false\nsources:\n  beats:\n    type: file\n    path: {}\n    max_out_of_orderness: 2s\noperators:\n  health:\n    type: node_health\n    input: beats\nsinks:\n  changes:\n    type: file\n    input: health.changes\n    path: {o}/changes.jsonl\n  rejected:\n    type: dead_letter\n    path: {o}/dead.jsonl\n",
                data.display(),
                o = out.display()
            ),
        );
        let run = output(edgeflow().arg("run").arg(&pipeline).args(["--workers", workers]));
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let dead = std::fs::read_to_string(out.join("dead.jsonl")).unwrap();
        let changes = std::fs::read_to_string(out.join("changes.jsonl")).unwrap();
        outputs.push((workers, dead, changes));
    }
    let (_, dead, changes) = &outputs[0];
    assert_eq!(dead.lines().count(), 82 + 55, "82 malformed and 55 late lines");
    for (workers, other_dead, other_changes) in &outputs[1..] {
        assert!(other_dead == dead, "dead letters on {workers} workers differ from 1 worker");
        assert!(other_changes == changes, "changes on {workers} workers differ from 1 worker");
    }
}

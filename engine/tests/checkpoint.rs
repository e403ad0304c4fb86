//! Checkpoints and recovery end to end: the engine killed with SIGKILL at random points and
//! restarted gives byte for byte the output of a run that never stopped; a checkpoint
//! killed half-written, corrupted or truncated is passed over for the one before; a restore
//! on another number of workers or processes gives the same output; a checkpoint that no
//! longer fits the pipeline is refused unless its state may be dropped.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{edgeflow, write, Running};
use rand::Rng;

/// A simulated fleet with outages, node health and its outputs in files; `checkpoint` adds
/// the checkpoint section.
fn fleet_pipeline(dir: &Path, name: &str, hours: u32, checkpoint: bool) -> PathBuf {
    let section = if checkpoint { "checkpoint:\n  dir: ckpt\n  interval: 200ms\n" } else { "" };
    write(
        dir,
        name,
        &format!(
            "name: fleet\nlate_policy: dead_letter\nmetrics:\n  enabled: false\n{section}sources:\n  fleet:\n    type: generator\n    nodes: 300\n    heartbeat_interval: 30s\n    jitter: 2s\n    failure_rate: 0.01\n    mean_outage: 4m\n    late_fraction: 0.001\n    malformed_fraction: 0.0005\n    seed: 11\n    speed: max\n    duration: {hours}h\n    max_out_of_orderness: 5s\noperators:\n  health:\n    type: node_health\n    input: fleet\nsinks:\n  changes:\n    type: file\n    input: health.changes\n    path: changes.jsonl\n  rollups:\n    type: file\n    input: health.rollups\n    path: rollups.jsonl\n  dead:\n    type: dead_letter\n    path: dead.jsonl\n"
        ),
    )
}

const OUTPUTS: [&str; 3] = ["changes.jsonl", "rollups.jsonl", "dead.jsonl"];

/// Runs `pipeline` to its end in its directory; returns stderr.
fn run_to_end(pipeline: &Path, args: &[&str]) -> String {
    let output = edgeflow()
        .current_dir(pipeline.parent().unwrap())
        .arg("run")
        .arg(pipeline)
        .args(["--no-status", "--log-format", "json"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "edgeflow failed:\n{stderr}");
    stderr
}

fn start(pipeline: &Path, args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut command = edgeflow();
    command
        .current_dir(pipeline.parent().unwrap())
        .arg("run")
        .arg(pipeline)
        .args(["--no-status", "--log-format", "json"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    Running(command.spawn().unwrap())
}

/// Complete checkpoints (with a manifest) in `dir/ckpt`, newest last.
fn complete_checkpoints(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join("ckpt"))
        .map(|entries| entries.flatten().map(|e| e.path()).filter(|p| p.join("MANIFEST.json").exists()).collect())
        .unwrap_or_default();
    found.sort();
    found
}

/// Waits until `dir` holds a complete checkpoint other than those in `seen` (or the engine
/// ended); returns whether the engine still runs.
fn wait_for_new_checkpoint(engine: &mut Running, dir: &Path, seen: &[PathBuf]) -> bool {
    let start = Instant::now();
    loop {
        if engine.try_wait().unwrap().is_some() {
            return false;
        }
        if complete_checkpoints(dir).iter().any(|c| !seen.contains(c)) {
            return true;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint in 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Fails unless `log` says the run restored a checkpoint taken part-way (not the last one,
/// at the end of time, after which nothing is left to do).
fn assert_restored_part_way(log: &str) {
    let line =
        log.lines().find(|l| l.contains("restoring from checkpoint")).unwrap_or_else(|| panic!("no restore:\n{log}"));
    assert!(!line.contains(&u64::MAX.to_string()), "restored the last checkpoint, not one part-way: {line}");
}

fn assert_same_outputs(reference: &Path, dir: &Path) {
    for name in OUTPUTS {
        let expected = std::fs::read(reference.join(name)).unwrap();
        let actual = std::fs::read(dir.join(name)).unwrap();
        assert!(!expected.is_empty(), "{name} of the reference run is empty");
        assert!(
            expected == actual,
            "{name} differs from the uninterrupted run's ({} vs {} bytes)",
            actual.len(),
            expected.len()
        );
    }
}

/// The uninterrupted run's outputs, without checkpoints, in a directory of their own.
fn reference(hours: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run_to_end(&fleet_pipeline(dir.path(), "fleet.yaml", hours, false), &[]);
    dir
}

/// SIGKILL at 10 random points, each after the engine made progress (a new checkpoint),
/// restart each time: every output file equals the uninterrupted run's byte for byte, and
/// no node is reported new twice (a node restored is not new).
#[test]
fn kill_9_at_random_points_gives_the_uninterrupted_output() {
    let hours = 24;
    let expected = reference(hours);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = fleet_pipeline(dir.path(), "fleet.yaml", hours, true);
    let mut rng = rand::thread_rng();
    let mut kills = 0;
    for _ in 0..10 {
        let mut engine = start(&pipeline, &[], &[]);
        let seen = complete_checkpoints(dir.path());
        if !wait_for_new_checkpoint(&mut engine, dir.path(), &seen) {
            break;
        }
        let delay = rng.gen_range(0..300);
        std::thread::sleep(Duration::from_millis(delay));
        if engine.try_wait().unwrap().is_some() {
            break;
        }
        engine.kill().unwrap(); // SIGKILL
        engine.wait().unwrap();
        kills += 1;
        eprintln!("kill {kills} after {delay} ms past a checkpoint");
    }
    assert_eq!(kills, 10, "the run ended before it was killed 10 times; make it longer");
    let log = run_to_end(&pipeline, &[]);
    assert_restored_part_way(&log);
    assert_same_outputs(expected.path(), dir.path());
    let changes = std::fs::read_to_string(dir.path().join("changes.jsonl")).unwrap();
    let first_seen = changes.lines().filter(|l| l.contains("\"from\":null")).count();
    assert_eq!(first_seen, 300, "each node is new exactly once");
}

/// Kills the checkpointed fleet run once at least `after` checkpoints are complete.
fn run_and_kill_after(pipeline: &Path, dir: &Path, after: usize, args: &[&str]) {
    let mut engine = start(pipeline, args, &[]);
    let begun = Instant::now();
    while complete_checkpoints(dir).len() < after {
        assert!(engine.try_wait().unwrap().is_none(), "the engine ended before {after} checkpoints");
        assert!(begun.elapsed() < Duration::from_secs(120), "no checkpoints in 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    engine.kill().unwrap();
    engine.wait().unwrap();
}

/// The newest complete checkpoint's part file.
fn newest_part(dir: &Path) -> PathBuf {
    let newest = complete_checkpoints(dir).pop().expect("a checkpoint");
    newest.join("part-worker-0.bin")
}

/// A corrupted, then a truncated, newest checkpoint is found by its checksum and length,
/// logged and passed over; the run restores the one before it and still gives the
/// uninterrupted output.
#[test]
fn damaged_checkpoints_are_passed_over_for_the_previous_one() {
    let hours = 8;
    let expected = reference(hours);
    for (damage, reason) in [("corrupt", "corrupted"), ("truncate", "truncated")] {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = fleet_pipeline(dir.path(), "fleet.yaml", hours, true);
        run_and_kill_after(&pipeline, dir.path(), 3, &[]);
        let part = newest_part(dir.path());
        let mut bytes = std::fs::read(&part).unwrap();
        if damage == "corrupt" {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x5a;
        } else {
            bytes.truncate(bytes.len() - 10);
        }
        std::fs::write(&part, bytes).unwrap();
        let log = run_to_end(&pipeline, &[]);
        let passed_over = log.lines().find(|l| l.contains("checkpoint passed over")).unwrap_or_else(|| panic!("{log}"));
        assert!(passed_over.contains(reason), "{passed_over}");
        assert_restored_part_way(&log);
        assert_same_outputs(expected.path(), dir.path());
    }
}

/// SIGKILL while a checkpoint is half written (its parts durable, its manifest not yet):
/// the restart passes over it as incomplete and restores the one before.
#[test]
fn kill_9_during_a_checkpoint_write_restores_the_previous_one() {
    let hours = 8;
    let expected = reference(hours);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = fleet_pipeline(dir.path(), "fleet.yaml", hours, true);
    let mut engine = start(&pipeline, &[], &[("EDGEFLOW_TEST_PAUSE_BEFORE_MANIFEST", "3:60000")]);
    let half = dir.path().join("ckpt").join(format!("ckpt-{:020}", 3));
    let begun = Instant::now();
    while !half.join("part-worker-0.bin").exists() {
        assert!(engine.try_wait().unwrap().is_none(), "the engine ended before checkpoint 3");
        assert!(begun.elapsed() < Duration::from_secs(120), "checkpoint 3 never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    engine.kill().unwrap();
    engine.wait().unwrap();
    assert!(!half.join("MANIFEST.json").exists());
    let log = run_to_end(&pipeline, &[]);
    let passed_over = log.lines().find(|l| l.contains("checkpoint passed over")).unwrap_or_else(|| panic!("{log}"));
    assert!(passed_over.contains("incomplete"), "{passed_over}");
    assert!(log.contains(r#""epoch":2"#), "restored checkpoint 2:\n{log}");
    assert_same_outputs(expected.path(), dir.path());
}

/// Heartbeats of 200 nodes in a file, some going silent for a while.
fn heartbeats_file(dir: &Path) -> PathBuf {
    let mut text = String::new();
    let start = 1_700_000_000_000u64;
    for step in 0..600u64 {
        for node in 0..200u64 {
            // Every 7th node is silent for 4 minutes in every 10.
            if node % 7 == 0 && (step % 20) >= 12 {
                continue;
            }
            let time = start + step * 30_000 + node * 37;
            let cpu = (node * 13 + step * 7) % 100;
            text.push_str(&format!(
                "{{\"node_id\":\"n{node}\",\"region\":\"r{}\",\"lat\":0,\"lon\":0,\"timestamp\":{time},\"cpu\":{cpu},\"memory\":40,\"disk\":30}}\n",
                node % 4
            ));
        }
    }
    write(dir, "beats.jsonl", &text)
}

fn file_pipeline(dir: &Path, checkpoint: bool) -> PathBuf {
    heartbeats_file(dir);
    let section = if checkpoint { "checkpoint:\n  dir: ckpt\n  interval: 100ms\n" } else { "" };
    write(
        dir,
        "health.yaml",
        &format!("name: health\nmetrics:\n  enabled: false\n{section}sources:\n  beats:\n    type: file\n    path: beats.jsonl\n    max_out_of_orderness: 1s\noperators:\n  health:\n    type: node_health\n    input: beats\nsinks:\n  changes:\n    type: file\n    input: health.changes\n    path: changes.jsonl\n  rollups:\n    type: file\n    input: health.rollups\n    path: rollups.jsonl\n  dead:\n    type: dead_letter\n    path: dead.jsonl\n"),
    )
}

/// A checkpoint taken on 2 workers restores on 4 (the operators' state is keyed and goes
/// to the worker its key maps to there): the output equals a 1-worker uninterrupted run's.
#[test]
fn restore_on_more_workers_gives_the_same_output() {
    let expected = tempfile::tempdir().unwrap();
    run_to_end(&file_pipeline(expected.path(), false), &[]);
    std::fs::write(expected.path().join("dead.jsonl"), b"").ok();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = file_pipeline(dir.path(), true);
    run_and_kill_after(&pipeline, dir.path(), 2, &["--workers", "2"]);
    let log = run_to_end(&pipeline, &["--workers", "4"]);
    assert_restored_part_way(&log);
    for name in ["changes.jsonl", "rollups.jsonl"] {
        let want = std::fs::read(expected.path().join(name)).unwrap();
        assert!(!want.is_empty());
        assert!(want == std::fs::read(dir.path().join(name)).unwrap(), "{name} differs after 2 -> 4 workers");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A checkpoint taken by 2 processes restores in 1.
#[test]
fn restore_from_two_processes_in_one_gives_the_same_output() {
    let expected = tempfile::tempdir().unwrap();
    run_to_end(&file_pipeline(expected.path(), false), &[]);
    let dir = tempfile::tempdir().unwrap();
    let pipeline = file_pipeline(dir.path(), true);
    let hosts = write(dir.path(), "hosts", &format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port()));
    let hostfile = hosts.to_str().unwrap();
    let mut processes: Vec<Running> = (0..2)
        .map(|process| {
            let index = process.to_string();
            start(&pipeline, &["--processes", "2", "--process", &index, "--hostfile", hostfile], &[])
        })
        .collect();
    let begun = Instant::now();
    while complete_checkpoints(dir.path()).len() < 2 {
        assert!(processes.iter_mut().all(|p| p.try_wait().unwrap().is_none()), "a process ended early");
        assert!(begun.elapsed() < Duration::from_secs(120), "no checkpoints in 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    for process in &mut processes {
        process.kill().unwrap();
        process.wait().unwrap();
    }
    let log = run_to_end(&pipeline, &[]);
    assert_restored_part_way(&log);
    for name in ["changes.jsonl", "rollups.jsonl"] {
        let want = std::fs::read(expected.path().join(name)).unwrap();
        assert!(want == std::fs::read(dir.path().join(name)).unwrap(), "{name} differs after 2 processes -> 1");
    }
}

/// A checkpoint with state of an operator the pipeline no longer has is refused, naming it;
/// `--allow-state-drop NAME` starts without that state.
#[test]
fn a_checkpoint_that_no_longer_fits_is_refused_unless_its_state_may_be_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = fleet_pipeline(dir.path(), "fleet.yaml", 8, true);
    run_and_kill_after(&pipeline, dir.path(), 1, &[]);
    let text = std::fs::read_to_string(&pipeline).unwrap();
    let renamed =
        write(dir.path(), "renamed.yaml", &text.replace("  health:\n", "  vitals:\n").replace("health.", "vitals."));
    let refused = Command::new(env!("CARGO_BIN_EXE_edgeflow"))
        .current_dir(dir.path())
        .args(["run", "renamed.yaml", "--no-status"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("operator `health` (node_health) has state in the checkpoint but is no longer in the pipeline"),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-state-drop"), "{stderr}");
    let log = run_to_end(&renamed, &["--allow-state-drop", "health"]);
    assert!(log.contains("its state is dropped"), "{log}");
}

/// A second run of the pipeline on the same checkpoint directory, while the first still
/// runs, is refused with the first one's pid (it would mix its checkpoints with the first's).
#[test]
fn a_second_run_on_the_same_checkpoints_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = fleet_pipeline(dir.path(), "fleet.yaml", 24 * 365, true);
    let mut first = start(&pipeline, &[], &[]);
    assert!(wait_for_new_checkpoint(&mut first, dir.path(), &[]), "the first run ended");
    let second = Command::new(env!("CARGO_BIN_EXE_edgeflow"))
        .current_dir(dir.path())
        .args(["run", "fleet.yaml", "--no-status"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is in use by another run of this pipeline"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", first.id())), "{stderr}");
    assert!(first.try_wait().unwrap().is_none(), "the first run goes on");
    first.kill().unwrap();
    first.wait().unwrap();
}

/// Two file sources into node_health: `early`, a few heartbeats of other nodes in the
/// middle of `beats`'s event time, ends at once while `beats` is read on. The records
/// `early` handed in are still in the dataflow (node_health waits for `beats` to reach their
/// time), so a checkpoint must not be taken before them: killed after a checkpoint and
/// restarted (`early` at its end), the output equals an uninterrupted run's.
#[test]
fn a_source_that_ended_still_holds_the_checkpoint_time_back() {
    let pipeline = |dir: &Path, checkpoint: bool| {
        heartbeats_file(dir);
        let start = 1_700_000_000_000u64 + 150 * 60_000;
        let early: String = (0..20u64)
            .flat_map(|step| {
                (0..10u64).map(move |node| {
                    format!(
                        "{{\"node_id\":\"x{node}\",\"region\":\"x\",\"lat\":0,\"lon\":0,\"timestamp\":{},\"cpu\":95,\"memory\":40,\"disk\":30}}\n",
                        start + step * 30_000 + node
                    )
                })
            })
            .collect();
        write(dir, "early.jsonl", &early);
        let section = if checkpoint { "checkpoint:\n  dir: ckpt\n  interval: 100ms\n" } else { "" };
        write(
            dir,
            "health.yaml",
            &format!("name: health\nmetrics:\n  enabled: false\n{section}sources:\n  beats:\n    type: file\n    path: beats.jsonl\n    max_out_of_orderness: 1s\n  early:\n    type: file\n    path: early.jsonl\n    max_out_of_orderness: 1s\noperators:\n  health:\n    type: node_health\n    inputs: [beats, early]\nsinks:\n  changes:\n    type: file\n    input: health.changes\n    path: changes.jsonl\n  rollups:\n    type: file\n    input: health.rollups\n    path: rollups.jsonl\n"),
        )
    };
    let expected = tempfile::tempdir().unwrap();
    run_to_end(&pipeline(expected.path(), false), &[]);
    let want = std::fs::read_to_string(expected.path().join("changes.jsonl")).unwrap();
    assert!(want.contains("\"x3\""), "the early source's nodes are reported");
    let dir = tempfile::tempdir().unwrap();
    let path = pipeline(dir.path(), true);
    run_and_kill_after(&path, dir.path(), 1, &[]);
    let log = run_to_end(&path, &[]);
    assert_restored_part_way(&log);
    for name in ["changes.jsonl", "rollups.jsonl"] {
        let want = std::fs::read(expected.path().join(name)).unwrap();
        assert!(want == std::fs::read(dir.path().join(name)).unwrap(), "{name} differs after the restore");
    }
}

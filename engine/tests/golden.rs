//! Golden tests: malformed pipelines under `pipelines/tests/invalid/` with their expected
//! messages (`NAME.expected`; `${PIPELINES}` in a case is the shipped pipelines' directory),
//! and runnable pipelines under `pipelines/tests/valid/` with
//! their input and expected output. `EDGEFLOW_BLESS=1 cargo test --test golden` rewrites the
//! expectations on purpose.

use std::path::{Path, PathBuf};

use edgeflow_engine::config::load_str;
use edgeflow_engine::metrics::Metrics;
use edgeflow_engine::runtime::{run, RunOptions};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bless() -> bool {
    std::env::var_os("EDGEFLOW_BLESS").is_some()
}

fn cases(dir: &str) -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|err| panic!("cannot list {dir}: {err}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    cases.sort();
    cases
}

fn compare(expected_path: &Path, actual: &str, failures: &mut Vec<String>) {
    if bless() {
        std::fs::write(expected_path, actual)
            .unwrap_or_else(|err| panic!("cannot bless {}: {err}", expected_path.display()));
        return;
    }
    match std::fs::read_to_string(expected_path) {
        Ok(expected) if expected == actual => {}
        Ok(expected) => failures
            .push(format!("{} differs\n--- expected\n{expected}\n--- actual\n{actual}", expected_path.display())),
        Err(_) => failures
            .push(format!("{} is missing; run with EDGEFLOW_BLESS=1\n--- actual\n{actual}", expected_path.display())),
    }
}

#[test]
fn invalid_pipelines_report_every_problem() {
    let cases = cases("pipelines/tests/invalid");
    assert!(cases.len() >= 12, "expected at least 12 malformed pipelines, found {}", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let text = std::fs::read_to_string(&case).expect("readable case");
        let name = format!("pipelines/tests/invalid/{}", case.file_name().unwrap().to_string_lossy());
        // `${PIPELINES}`: the shipped pipelines' directory, for a file a case needs to exist.
        let pipelines = root().join("pipelines");
        let lookup = |var: &str| (var == "PIPELINES").then(|| pipelines.display().to_string());
        let problems = match load_str(&text, &name, &lookup) {
            Ok(_) => panic!("{name} should be invalid"),
            Err(problems) => problems,
        };
        assert!(!problems.problems.is_empty());
        for problem in &problems.problems {
            assert!(problem.mark.line >= 1, "{name}: problem without a position: {problem:?}");
        }
        compare(&case.with_extension("expected"), &format!("{problems}\n"), &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn valid_pipelines_produce_expected_output() {
    let mut failures = Vec::new();
    for case in cases("pipelines/tests/valid") {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = case.parent().unwrap().join("data");
        let out = dir.path().to_owned();
        let text = std::fs::read_to_string(&case).expect("readable case");
        let load = |state: &std::path::Path| {
            let lookup = |name: &str| match name {
                "DATA" => Some(data.display().to_string()),
                "OUT" => Some(out.display().to_string()),
                // Checkpoints, outside OUT: each worker count's run starts afresh.
                "STATE" => Some(state.display().to_string()),
                _ => None,
            };
            load_str(&text, &case.display().to_string(), &lookup)
                .unwrap_or_else(|problems| panic!("{} should be valid:\n{problems}", case.display()))
        };
        // A case may restrict the worker counts it runs on: `# golden-workers: 1`.
        let workers_list: Vec<usize> = text
            .lines()
            .find_map(|line| line.strip_prefix("# golden-workers:"))
            .map(|list| list.split(',').filter_map(|w| w.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1, 3]);
        for workers in workers_list {
            let state = tempfile::tempdir().expect("temp dir");
            let pipeline = load(state.path());
            let metrics = std::sync::Arc::new(Metrics::new());
            run(&pipeline, &RunOptions { workers, ..RunOptions::default() }, metrics.clone())
                .unwrap_or_else(|err| panic!("{} failed: {err:#}", case.display()));
            let stem = case.file_stem().unwrap().to_string_lossy().to_string();
            let mut outputs: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).collect();
            outputs.sort();
            let mut actual = String::new();
            for output in outputs {
                actual.push_str(&format!("== {}\n", output.file_name().unwrap().to_string_lossy()));
                let text = std::fs::read_to_string(&output).unwrap();
                // Positions name the input file; keep the expectation independent of the checkout.
                actual.push_str(&text.replace(&data.display().to_string(), "${DATA}"));
            }
            // Counters show that nothing was lost silently: late and rejected records.
            actual.push_str("== metrics\n");
            let counted =
                ["edgeflow_late_records_total", "edgeflow_dead_letters_total", "edgeflow_source_records_total"];
            let text = metrics.encode();
            let mut lines: Vec<&str> =
                text.lines().filter(|line| counted.iter().any(|name| line.starts_with(&format!("{name}{{")))).collect();
            lines.sort_unstable();
            for line in lines {
                actual.push_str(line);
                actual.push('\n');
            }
            let expected = case.with_file_name(format!("{stem}.expected"));
            // Bless from the 1-worker run; every worker count must then match it.
            if workers == 1 || !bless() {
                compare(&expected, &actual, &mut failures);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn readme_reference_matches_the_schema() {
    let readme_path = root().join("README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("README.md");
    let (start, end) = ("<!-- reference:start -->\n", "<!-- reference:end -->");
    let from = readme.find(start).expect("reference start marker") + start.len();
    let to = readme.find(end).expect("reference end marker");
    let generated = edgeflow_engine::config::schema::pipeline_reference_markdown();
    if bless() {
        let updated = format!("{}{generated}{}", &readme[..from], &readme[to..]);
        std::fs::write(&readme_path, updated).expect("write README.md");
        return;
    }
    assert!(
        readme[from..to] == generated,
        "README.md's YAML reference is out of date; run EDGEFLOW_BLESS=1 cargo test -p edgeflow-engine --test golden"
    );
}

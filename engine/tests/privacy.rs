//! `edgeflow dp epsilon` against Google's `dp-accounting` (PyPI, in the test virtualenv) on
//! several (noise multiplier, sample rate, steps, delta) settings: within 0.1% relative.

use std::path::Path;
use std::process::Command;

const SETTINGS: &[(f64, f64, u64, f64)] = &[
    (1.1, 0.01, 10_000, 1e-5),
    (0.8, 0.05, 500, 1e-6),
    (2.0, 0.001, 100_000, 1e-5),
    (1.0, 1.0, 10, 1e-5),
    (0.6, 0.1, 200, 1e-3),
    (4.0, 0.2, 50, 1e-8),
    (1.3, 0.02, 3_000, 1e-5),
];

fn python() -> std::path::PathBuf {
    std::env::var_os("EDGEFLOW_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

#[test]
fn epsilon_matches_dp_accounting() {
    let script = r#"
import json, sys
import dp_accounting as dpa
for sigma, q, steps, delta in json.loads(sys.argv[1]):
    accountant = dpa.rdp.RdpAccountant()
    accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    print(accountant.get_epsilon(delta))
"#;
    let settings = serde_json::to_string(SETTINGS).unwrap();
    let output = Command::new(python()).args(["-c", script, &settings]).output().expect("python runs");
    assert!(
        output.status.success(),
        "dp-accounting (scripts/setup.sh test installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected: Vec<f64> = String::from_utf8_lossy(&output.stdout).lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(expected.len(), SETTINGS.len());
    for (&(sigma, q, steps, delta), want) in SETTINGS.iter().zip(expected) {
        let output = Command::new(env!("CARGO_BIN_EXE_edgeflow"))
            .args(["dp", "epsilon", "--json"])
            .args(["--noise-multiplier", &sigma.to_string(), "--sample-rate", &q.to_string()])
            .args(["--steps", &steps.to_string(), "--delta", &delta.to_string()])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let got: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let got = got["epsilon"].as_f64().unwrap();
        let relative = (got - want).abs() / want;
        assert!(
            relative <= 1e-3,
            "sigma {sigma} q {q} steps {steps} delta {delta}: edgeflow {got}, dp-accounting {want}"
        );
    }
}

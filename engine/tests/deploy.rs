//! The deployment files stay valid: Prometheus config under `promtool check config`, the
//! Compose and Kubernetes files as YAML, and the Kubernetes command uses flags that exist.

use std::path::Path;
use std::process::Command;

fn deploy(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

#[test]
fn prometheus_config_is_valid() {
    let output = Command::new("promtool")
        .args(["check", "config"])
        .arg(deploy("prometheus/prometheus.yml"))
        .output()
        .unwrap_or_else(|err| panic!("promtool is needed ({err}); scripts/test.sh installs it"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
}

#[test]
fn compose_and_kubernetes_files_parse_and_use_real_flags() {
    for file in ["docker-compose.yml", "kubernetes/edgeflow.yaml"] {
        let text = std::fs::read_to_string(deploy(file)).unwrap();
        yaml_rust2::YamlLoader::load_from_str(&text).unwrap_or_else(|err| panic!("{file}: {err}"));
    }
    let kubernetes = std::fs::read_to_string(deploy("kubernetes/edgeflow.yaml")).unwrap();
    let help = Command::new(env!("CARGO_BIN_EXE_edgeflow")).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in ["--workers", "--processes", "--process", "--hostfile"] {
        assert!(kubernetes.contains(flag) && help.contains(flag), "{flag}");
    }
}

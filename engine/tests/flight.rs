//! Arrow Flight SQL over a running pipeline's live tables, queried by clients no one here
//! wrote (the ADBC Flight SQL driver and pyarrow.flight, from `flight_clients.py`): the
//! answers equal a recomputation from the same run's file output at the reported time, the
//! catalog calls and prepared statements work, and every refusal says why.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{edgeflow, wait_for, write, Running};

const TOKEN: &str = "test-token-0123456789abcdef";

fn python() -> PathBuf {
    std::env::var_os("EDGEFLOW_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// The address the run logged for its Flight SQL server.
fn flight_address(log: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().filter(|line| line.contains("serving Flight SQL")).find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        value["address"].as_str().map(str::to_owned)
    })
}

/// Runs `pipeline` on 2 workers (logging to `log`, with `FLIGHT_TOKEN` set to [`TOKEN`]);
/// the running engine and its Flight SQL address, once it serves.
fn serve(pipeline: &std::path::Path, log: &std::path::Path) -> (Running, String) {
    let engine = Running(
        edgeflow()
            .args(["run", pipeline.to_str().unwrap(), "--no-metrics", "--log-format", "json", "--workers", "2"])
            .env("FLIGHT_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut address = None;
    wait_for("the Flight SQL server's address in the log", Duration::from_secs(60), || {
        address = flight_address(log);
        address.is_some()
    });
    (engine, address.unwrap())
}

/// Each node's status as of `time`, recomputed from a run's status changes (`changes.jsonl`):
/// its latest change at or before then; and how many changes that is.
fn statuses_until(changes: &std::path::Path, time: u64) -> (BTreeMap<String, String>, u64) {
    let (mut statuses, mut count) = (BTreeMap::new(), 0);
    for line in std::fs::read_to_string(changes).unwrap().lines() {
        let change: serde_json::Value = serde_json::from_str(line).unwrap();
        if change["time"].as_u64().unwrap() <= time {
            count += 1;
            statuses.insert(change["node_id"].as_str().unwrap().to_owned(), change["to"].as_str().unwrap().to_owned());
        }
    }
    (statuses, count)
}

#[test]
fn adbc_and_pyarrow_query_a_running_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let changes = dir.path().join("changes.jsonl");
    let beats = dir.path().join("beats.jsonl");
    let pipeline = write(
        dir.path(),
        "served.yaml",
        &format!(
            "name: served
sources:
  fleet:
    type: generator
    nodes: 300
    heartbeat_interval: 1s
    failure_rate: 0.05
    mean_outage: 3s
    seed: 7
operators:
  health:
    type: node_health
    input: fleet
    heartbeat_timeout: 3s
    unhealthy_after: 1500ms
serve:
  flight:
    address: 127.0.0.1:0
    tokens: [\"${{FLIGHT_TOKEN}}\"]
  tables:
    nodes:
      input: health.status
    changes:
      input: health.changes
      retention: {{rows: 1000000}}
sinks:
  changes:
    type: file
    input: health.changes
    path: {}
  beats:
    type: file
    input: fleet
    path: {}
",
            changes.display(),
            beats.display()
        ),
    );
    let log = dir.path().join("run.log");
    let (mut engine, address) = serve(&pipeline, &log);
    let clients = Command::new(python())
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/flight_clients.py"))
        .args([&address, TOKEN, "300"])
        .output()
        .unwrap();
    assert!(
        clients.status.success(),
        "the clients failed:\n{}\nengine log:\n{}",
        String::from_utf8_lossy(&clients.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // `edgeflow sql --subscribe` prints the changes as they come.
    let mut subscribed = edgeflow()
        .args(["sql", "--server", &address, "--format", "json", "--subscribe", "SELECT node_id, status FROM nodes"])
        .env("EDGEFLOW_FLIGHT_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(subscribed.stdout.take().unwrap()));
    let (mut inserted, mut progressed) = (false, false);
    while !(inserted && progressed) {
        let line = lines.next().expect("the subscription ended").unwrap();
        let change: serde_json::Value = serde_json::from_str(&line).unwrap();
        inserted |= change["diff"] == 1 && change["node_id"].is_string();
        progressed |= change["progressed"] == true;
    }
    subscribed.kill().unwrap();
    subscribed.wait().unwrap();

    // `edgeflow sql` in each format, and refused without the token.
    let sql = |format: &str, token: &str, query: &str| {
        edgeflow()
            .args(["sql", "--server", &address, "--format", format, query])
            .env("EDGEFLOW_FLIGHT_TOKEN", token)
            .output()
            .unwrap()
    };
    let count = "SELECT count(*) AS nodes, max(edgeflow_as_of()) AS at FROM nodes";
    let json = sql("json", TOKEN, count);
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let row: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(row["nodes"], 300, "{row}");
    let csv = sql("csv", TOKEN, "SELECT node_id, status FROM nodes ORDER BY node_id LIMIT 2");
    let csv = String::from_utf8(csv.stdout).unwrap();
    assert_eq!(csv.lines().next(), Some("node_id,status"), "{csv}");
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let table = sql("table", TOKEN, count);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("| nodes |") && table.contains("(1 rows, as of "), "{table}");
    let arrow = sql("arrow", TOKEN, count);
    assert!(arrow.status.success() && arrow.stdout.starts_with(&[0xff, 0xff, 0xff, 0xff]), "an Arrow IPC stream");
    let refused = sql("table", "wrong-token-0123456789", count);
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("Unauthenticated") && message.contains("not accepted"), "{message}");
    let bad = sql("table", TOKEN, "SELECT nonsense FROM nodes");
    let message = String::from_utf8_lossy(&bad.stderr);
    assert!(message.contains("InvalidArgument") && message.contains("nonsense"), "{message}");

    // Stopped gracefully, the run writes every change up to where it got.
    Command::new("kill").args(["-TERM", &engine.id().to_string()]).status().unwrap();
    let status = engine.wait().unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    let report: serde_json::Value = serde_json::from_slice(&clients.stdout).unwrap();
    let as_of = report["as_of"].as_u64().unwrap();

    // The table as of `as_of` is each node's latest status change at or before it.
    let (expected, changes_until) = statuses_until(&changes, as_of);
    let rows = report["nodes"].as_array().unwrap();
    let answered: BTreeMap<String, String> =
        rows.iter().map(|row| (row[0].as_str().unwrap().to_owned(), row[1].as_str().unwrap().to_owned())).collect();
    // Each node's row has its latest heartbeat at or before `as_of`.
    let mut latest: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for line in std::fs::read_to_string(&beats).unwrap().lines() {
        let beat: serde_json::Value = serde_json::from_str(line).unwrap();
        let time = beat["timestamp"].as_u64().unwrap();
        let node = beat["node_id"].as_str().unwrap().to_owned();
        if time <= as_of && latest.get(&node).is_none_or(|(seen, _)| *seen < time) {
            latest.insert(node, (time, beat["cpu"].as_f64().unwrap()));
        }
    }
    let heartbeats: BTreeMap<String, (u64, f64)> = rows
        .iter()
        .map(|row| (row[0].as_str().unwrap().to_owned(), (row[2].as_u64().unwrap(), row[3].as_f64().unwrap())))
        .collect();
    assert_eq!(heartbeats, latest, "each node's latest heartbeat as of {as_of}");
    assert_eq!(answered.len(), 300, "one row per node");
    assert_eq!(answered, expected, "the table as of {as_of} is the changes up to it");
    let statuses: std::collections::BTreeSet<&String> = answered.values().collect();
    assert!(statuses.len() > 1, "the fleet's statuses vary: {statuses:?}");
    assert_eq!(
        report["nodes_schema"],
        serde_json::json!([
            ["node_id", "string", false],
            ["status", "string", false],
            ["last_heartbeat", "int64", true],
            ["cpu", "double", true]
        ]),
        "nullability as in the table"
    );

    // One time per query: the metadata and edgeflow_as_of() agree; a later query is not older.
    let as_of_fn = &report["as_of_fn"];
    assert_eq!(as_of_fn[0], as_of_fn[1], "{as_of_fn}");
    assert!(as_of_fn[0].as_u64().unwrap() >= as_of);
    assert_eq!(report["counts"][0], 300);
    assert!(report["counts"][1].as_u64().unwrap() >= changes_until);

    // Prepared statements with parameters, and the catalog.
    let prepared = &report["prepared"];
    assert_eq!(prepared[1], serde_json::json!([[prepared[0][0]], [prepared[0][1]]]), "{prepared}");
    assert_eq!(report["table_types"], serde_json::json!(["TABLE"]));
    assert_eq!(report["objects"], serde_json::json!([["edgeflow", "live", ["changes", "nodes"]]]));
    assert_eq!(
        report["changes_schema"],
        serde_json::json!([
            ["time", "timestamp[ms, tz=UTC]", false],
            ["node_id", "string", false],
            ["region", "string", false],
            ["from", "string", true],
            ["to", "string", false]
        ])
    );
    assert_eq!(report["vendor"], "edgeflow");

    // Refusals, each saying why.
    let refusal = |key: &str, words: &[&str]| {
        let error = report[key].as_array().unwrap_or_else(|| panic!("`{key}` was not refused"));
        let message = error[1].as_str().unwrap();
        for word in words {
            assert!(message.contains(word), "{key}: `{word}` not in {message}");
        }
    };
    refusal("bad_sql", &["INVALID_ARGUMENT", "SELEC"]);
    refusal("unknown_table", &["INVALID_ARGUMENT", "nowhere"]);
    refusal("not_a_query", &["INVALID_ARGUMENT", "only queries"]);
    refusal("wrong_token", &["UNAUTHENTICATED", "not accepted"]);

    // pyarrow.flight: Basic -> Bearer, and DoGet's schema is FlightInfo's, metadata included.
    assert_eq!(report["handshake_header"], serde_json::json!(["authorization", "Bearer"]));
    assert_eq!(report["flight_schema_equal"], true);
    assert_eq!(report["flight_rows"], 300);
    refusal("flight_no_token", &["no `authorization` header"]);

    // The subscription's changes, replayed, are the table as of the last time read.
    let subscription = &report["subscription"];
    let until = subscription["time"].as_u64().unwrap();
    let (expected, _) = statuses_until(&changes, until);
    let replayed: BTreeMap<String, String> = subscription["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            assert_eq!(row[2], 1, "a node is in the table once: {row}");
            (row[0].as_str().unwrap().to_owned(), row[1].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(replayed, expected, "the changes up to {until}, replayed");
    assert!(subscription["progress"].as_u64().unwrap() > 0 && subscription["retracted"].as_u64().unwrap() > 0);
    assert_eq!(
        subscription["schema"],
        serde_json::json!([
            ["time", "timestamp[ms, tz=UTC]", false],
            ["progressed", "bool", false],
            ["diff", "int64", true],
            ["node_id", "string", true],
            ["status", "string", true]
        ])
    );
    refusal("flight_bad_basic", &["not accepted"]);
}

/// A certificate authority, and PEM certificates with keys signed by it.
struct Authority {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Authority {
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self { issuer: rcgen::Issuer::new(params, key), pem }
    }

    /// A certificate for `names` (server or client), and its key.
    fn sign(&self, names: &[&str], client: bool) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        (params.signed_by(&key, &self.issuer).unwrap().pem(), key.serialize_pem())
    }
}

/// TLS with client certificates: `edgeflow sql` with the CA and a client certificate gets
/// its answer; without the certificate, with another CA, or in plain text, it does not. A
/// pipeline whose TLS files cannot be read does not start.
#[test]
fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (authority, stranger) = (Authority::new(), Authority::new());
    let (server_cert, server_key) = authority.sign(&["127.0.0.1", "localhost"], false);
    let (client_cert, client_key) = authority.sign(&["analyst"], true);
    for (name, text) in [
        ("ca.pem", &authority.pem),
        ("other-ca.pem", &stranger.pem),
        ("server.pem", &server_cert),
        ("server.key", &server_key),
        ("client.pem", &client_cert),
        ("client.key", &client_key),
    ] {
        write(dir.path(), name, text);
    }
    let pipeline = |cert: &str| {
        format!(
            "name: tls
sources:
  fleet:
    type: generator
    nodes: 20
    heartbeat_interval: 1s
operators:
  health:
    type: node_health
    input: fleet
serve:
  flight:
    address: 127.0.0.1:0
    tls: {{cert: {cert}, key: server.key, client_ca: ca.pem}}
  tables:
    nodes:
      input: health.status
sinks:
  out:
    type: file
    input: health.changes
    path: changes.jsonl
"
        )
    };
    // A certificate file that is not there: the run does not start, and says which file.
    let missing = write(dir.path(), "missing.yaml", &pipeline("nowhere.pem"));
    let failed = edgeflow().args(["run", missing.to_str().unwrap(), "--no-metrics"]).output().unwrap();
    assert_eq!(failed.status.code(), Some(1));
    let message = String::from_utf8_lossy(&failed.stderr);
    assert!(message.contains("cannot read the Flight TLS file") && message.contains("nowhere.pem"), "{message}");

    let served = write(dir.path(), "tls.yaml", &pipeline("server.pem"));
    let (_engine, address) = serve(&served, &dir.path().join("run.log"));
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let sql = |extra: &[String]| {
        edgeflow()
            .args(["sql", "--server", &address, "--format", "csv"])
            .args(extra)
            .arg("SELECT 1 AS one")
            .output()
            .unwrap()
    };
    let mutual = ["--ca", "ca.pem", "--client-cert", "client.pem", "--client-key", "client.key"].map(|a| {
        if a.ends_with(".pem") || a.ends_with(".key") {
            path(a)
        } else {
            a.to_owned()
        }
    });
    let mut answered = None;
    wait_for("an answer over TLS", Duration::from_secs(60), || {
        let out = sql(&mutual);
        let ok = out.status.success();
        answered = Some(out);
        ok
    });
    assert_eq!(String::from_utf8_lossy(&answered.unwrap().stdout), "one\n1\n");
    // No client certificate: the server refuses the handshake.
    let anonymous = sql(&["--ca".into(), path("ca.pem")]);
    assert!(!anonymous.status.success(), "answered without a client certificate");
    // Another CA: the client does not trust the server.
    let distrusting = sql(&[
        "--ca".into(),
        path("other-ca.pem"),
        "--client-cert".into(),
        path("client.pem"),
        "--client-key".into(),
        path("client.key"),
    ]);
    assert!(!distrusting.status.success(), "trusted a server its CA did not sign");
    let message = String::from_utf8_lossy(&distrusting.stderr);
    assert!(message.contains("certificate"), "{message}");
    // Plain text to a TLS server.
    let plain = sql(&[]);
    assert!(!plain.status.success(), "answered in plain text");
}

//! The `serve` section: which operator outputs become live SQL tables, and where and how
//! the Arrow Flight SQL server listens.

use std::collections::BTreeMap;
use std::path::PathBuf;

use edgeflow_operators::DurationMs;
use serde::{Deserialize, Serialize};

/// `serve:` as written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The Flight SQL endpoint.
    #[serde(default)]
    pub flight: FlightConfig,
    /// Tables by name (SQL identifiers: lower-case letters, digits and `_`), each from one
    /// operator output.
    pub tables: BTreeMap<String, TableConfig>,
}

/// Where and how the Flight SQL server listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlightConfig {
    /// Listen address (default `127.0.0.1:50051`; port 0 picks a free port, printed at
    /// start). An address other than loopback needs `tokens`.
    #[serde(default = "default_flight_address")]
    pub address: String,
    /// Bearer tokens accepted on every call (write them as `${VAR}`, not in the file).
    /// Without tokens the server answers anyone who can reach it: loopback only.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// TLS: the server's certificate chain and key (PEM files), and optionally the CA whose
    /// client certificates are required.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

fn default_flight_address() -> String {
    "127.0.0.1:50051".into()
}

impl Default for FlightConfig {
    fn default() -> Self {
        Self { address: default_flight_address(), tokens: Vec::new(), tls: None }
    }
}

/// TLS files, relative to the pipeline file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert: PathBuf,
    /// PEM private key of the server.
    pub key: PathBuf,
    /// PEM CA certificate(s): when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// One table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// The operator output it holds, e.g. `health.status` (its current contents) or
    /// `health.changes` (appended rows).
    pub input: String,
    /// How long an appended table keeps rows (default 100,000 rows); a live collection
    /// holds its current contents and takes no retention.
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
}

/// How long an appended table keeps its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RetentionConfig {
    /// The newest this many rows.
    Rows(usize),
    /// Rows within this event-time span of the table's complete time, e.g. `1h`.
    Span(DurationMs),
}

/// The default retention of an appended table.
pub const DEFAULT_RETENTION_ROWS: usize = 100_000;

/// The `serve` section, checked: tables with their input's kind resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    /// The Flight SQL endpoint's settings (addresses parsed, TLS paths resolved).
    pub flight: FlightConfig,
    /// Its parsed listen address.
    pub address: std::net::SocketAddr,
    /// The tables, by name.
    pub tables: Vec<ServedTable>,
}

/// One table, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedTable {
    /// Its SQL name.
    pub name: String,
    /// The operator output it holds.
    pub input: super::PortRef,
    /// What that output carries.
    pub kind: super::PortKind,
    /// Retention (append tables).
    pub retention: crate::serve::store::Retention,
}

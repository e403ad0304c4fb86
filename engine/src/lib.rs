//! The edgeflow runtime: pipeline configuration, the dataflow built from it, and the
//! services around it (metrics, health, status line).
//!
//! How it fits together:
//! - [`components`]: one module per source, operator and sink type (its YAML name, config,
//!   ports, `try_new` and wiring checks, and how it is built or opened), and the registry
//!   that lists them. Everything below reads the registry; nothing else names a type.
//! - [`config`]: YAML with line:col marks and `${VAR}` substitution, the loader that checks a
//!   whole pipeline into a [`config::Pipeline`] of checked components (or every problem),
//!   and the JSON Schema and README reference generated from the registry.
//! - [`runtime`]: timely workers, the driver loop that polls sources and moves watermarks,
//!   the dataflow built from the pipeline's components, and the sinks' operator.
//! - [`metrics`], [`http`], [`status_line`], [`graph`], [`client`], [`model_cli`]: the
//!   services and commands around a run.

pub mod client;
pub mod components;
pub mod config;
pub mod graph;
pub mod http;
pub mod metrics;
pub mod model_cli;
pub mod reload;
pub mod runtime;
pub mod serve;
pub mod sql_cli;
pub mod status_line;

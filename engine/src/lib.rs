//! The edgeflow runtime: pipeline configuration, the dataflow built from it, and the
//! services around it (metrics, health, status line).

pub mod client;
pub mod components;
pub mod config;
pub mod graph;
pub mod http;
pub mod metrics;
pub mod model_cli;
pub mod runtime;
pub mod status_line;

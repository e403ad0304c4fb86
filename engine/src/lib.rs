//! The edgeflow runtime: pipeline configuration, the dataflow built from it, and the
//! services around it (metrics, health, status line).

pub mod config;

//! Federated learning: aggregation strategies and server optimisers, and differential
//! privacy (clipping, noise, adaptive clipping, the RDP accountant). The round coordinator,
//! client simulation and secure aggregation build on these.

pub mod aggregate;
pub mod config;
pub mod coordinator;
pub mod learn;
pub mod onnx_export;
pub mod operator;
pub mod privacy;
pub mod secure;
pub mod secure_protocol;
pub mod simulate;
pub mod update;

//! Operator types: each wraps a domain operator of `edgeflow-operators` (or the runtime's
//! inference and federated operators) and wires it to its inputs.

pub mod federated;
pub mod inference;
pub mod load_balance;
pub mod node_health;
pub mod window_aggregate;

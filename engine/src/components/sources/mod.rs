//! Source types: each reads from the outside world through a connector.

pub mod file;
pub mod generator;
pub mod kafka;
pub mod requests;

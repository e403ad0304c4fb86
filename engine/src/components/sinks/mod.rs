//! Sink types: each writes records to the outside world through a connector.

pub mod dead_letter;
pub mod file;
pub mod kafka;
pub mod stdout;

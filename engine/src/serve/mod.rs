//! Serving a running pipeline's live state for queries (see [`store`]).

pub mod store;

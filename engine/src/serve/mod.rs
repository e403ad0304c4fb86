//! Serving a running pipeline's live state for queries: [`rows`] says which table each
//! servable operator output becomes, [`store`] keeps the tables consistent per event time.

pub mod feed;
pub mod rows;
pub mod store;

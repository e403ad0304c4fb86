//! Serving a running pipeline's live state for queries: [`rows`] says which table each
//! servable operator output becomes, [`store`] keeps the tables consistent per event time,
//! [`feed`] brings the dataflow's updates to them, [`query`] answers SQL over them with
//! DataFusion and [`flight`] serves that over Arrow Flight SQL.

pub mod feed;
pub mod flight;
pub mod query;
pub mod rows;
pub mod store;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::config::serve::Serving;
use feed::SharedTables;
use rows::{Layout, TableKind};
use store::Tables;

/// The live tables of a run and the Flight SQL server answering over them, on a thread of
/// its own for as long as the run lasts.
#[derive(Debug)]
pub struct Server {
    /// The tables the dataflow feeds.
    pub tables: SharedTables,
    /// Where the server listens.
    pub address: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The empty tables of a `serve` section.
pub fn tables_of(serving: &Serving) -> SharedTables {
    let mut tables = Tables::default();
    for table in &serving.tables {
        let Some(layout) = Layout::of(table.kind) else { continue };
        match layout.kind {
            TableKind::Collection if layout.latest > 0 => {
                tables.add_collection_with_latest(&table.name, layout.schema, layout.latest)
            }
            TableKind::Collection => tables.add_collection(&table.name, layout.schema),
            TableKind::Append => tables.add_append(&table.name, layout.schema, table.retention),
        }
    }
    Arc::new(Mutex::new(tables))
}

impl Server {
    /// Creates the tables and starts serving them on `serving`'s address (logged, with the
    /// port picked for port 0).
    pub fn start(serving: &Serving) -> anyhow::Result<Self> {
        let tables = tables_of(serving);
        let listener = std::net::TcpListener::bind(serving.flight.address.as_str()).with_context(|| {
            format!("cannot listen for Flight SQL on {}\nhint: pick another `serve.flight.address`", serving.address)
        })?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("edgeflow-flight")
            .enable_all()
            .build()
            .context("cannot start the Flight SQL server's runtime")?;
        let service = flight::LiveFlightSql::new(query::QueryEngine::new(tables.clone()), &serving.flight.tokens);
        let server = flight::server(&serving.flight)?;
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("edgeflow-flight".into()).spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(err) => return tracing::error!(%err, "the Flight SQL server could not start"),
                };
                let stop = async move {
                    let _ = stopped.await;
                };
                if let Err(err) = flight::serve(service, server, listener, stop).await {
                    tracing::error!(err = %format!("{err:#}"), "the Flight SQL server failed");
                }
            });
        })?;
        let tls = if serving.flight.tls.is_some() { "tls" } else { "plain" };
        let auth = if serving.flight.tokens.is_empty() { "none" } else { "bearer tokens" };
        tracing::info!(address = %address, tls, auth, tables = serving.tables.len(), "serving Flight SQL");
        Ok(Self { tables, address, shutdown: Some(shutdown), thread: Some(thread) })
    }

    /// Stops serving (queries under way are cut off) and waits for the server's thread.
    pub fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

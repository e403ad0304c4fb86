//! The engine's HTTP serving loop, with the limits a server on an open port needs.
//!
//! `axum::serve` accepts every connection and keeps it as long as the peer does, so a few
//! hundred connections that never send a request (or send it a byte at a time) would hold
//! file descriptors and tasks forever and, at the process's file limit, make `/health`
//! unreachable. Here:
//! - a connection must send a complete request head within [`Limits::header_timeout`] of
//!   opening (and, between keep-alive requests, of the previous response), else it is
//!   closed;
//! - at most [`Limits::max_connections`] are open at once; a new connection past the cap
//!   closes the oldest one, so a flood of idle connections cannot lock out a health check.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::oneshot;

/// Limits of a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most; past it the oldest is closed.
    pub max_connections: usize,
    /// Time to send a request's head, from the connection's start or the last response.
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_connections: 256, header_timeout: Duration::from_secs(10) }
    }
}

/// Open connections, oldest first, each with the handle that closes it.
#[derive(Default)]
struct Open {
    next_id: u64,
    connections: VecDeque<(u64, oneshot::Sender<()>)>,
}

/// Serves `app` on `listener` until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, app: axum::Router, limits: Limits) {
    let open: Arc<Mutex<Open>> = Arc::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, or a connection reset before accept: wait a little
                // rather than spin, then go on.
                tracing::warn!(%err, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (close, closed) = oneshot::channel::<()>();
        let id = {
            let mut open = open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            while open.connections.len() >= limits.max_connections.max(1) {
                if let Some((_, oldest)) = open.connections.pop_front() {
                    let _ = oldest.send(());
                }
            }
            let id = open.next_id;
            open.next_id += 1;
            open.connections.push_back((id, close));
            id
        };
        let service = TowerToHyperService::new(app.clone());
        let open = open.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                result = connection => {
                    if let Err(err) = result {
                        tracing::debug!(%peer, %err, "connection ended");
                    }
                }
                _ = closed => tracing::debug!(%peer, "connection closed: too many open"),
            }
            let mut open = open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            open.connections.retain(|(other, _)| *other != id);
        });
    }
}

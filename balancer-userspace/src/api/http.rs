//! The read-only HTTP API on `metrics_listen`: `GET /metrics` (OpenMetrics) and
//! `GET /api/v1/status` (the status document, JSON). Both render the latest snapshot the
//! event loop published; neither reads the kernel. Counters are as of the request: the
//! handler asks the event loop to read them and waits (briefly) for the snapshot that has
//! them.
//! Every other method is refused: write actions go through the control socket.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    extract::State,
    http::{header, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use tokio::sync::{mpsc, watch};

use crate::{
    api::{
        connections::{self, ConnectionCounters, Limits},
        metrics,
        status::{Attachment, StatusDocument},
    },
    core::snapshot::Snapshot,
};

/// How long a request waits for the event loop to publish fresher counters.
const REFRESH_WAIT: Duration = Duration::from_secs(1);

/// What the API serves from.
#[derive(Clone)]
pub struct ApiState {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub attachment: Arc<Attachment>,
    /// Asks the event loop for a new snapshot with fresh counters (coalesced: capacity 1).
    pub refresh: mpsc::Sender<()>,
    /// The API's own connections, counted by its accept loop.
    pub connections: Arc<ConnectionCounters>,
}

impl ApiState {
    /// A snapshot with counters read after the request came: the event loop is asked for
    /// one (requests that arrive together share a reading), and after `REFRESH_WAIT` without
    /// one, the latest there is.
    async fn snapshot(&self) -> Arc<Snapshot> {
        let asked = Instant::now();
        let mut snapshots = self.snapshots.clone();
        // Full: a refresh is already asked for; closed: shutting down. Either way, wait.
        let _ = self.refresh.try_send(());
        let deadline = tokio::time::Instant::from_std(asked + REFRESH_WAIT);
        loop {
            let latest = snapshots.borrow_and_update().clone();
            if latest.counters_at.is_some_and(|at| at >= asked) {
                return latest;
            }
            match tokio::time::timeout_at(deadline, snapshots.changed()).await {
                Ok(Ok(())) => continue,
                _ => return latest,
            }
        }
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/api/v1/status", get(get_status))
        .fallback(refuse)
        .with_state(state)
}

/// Serves the API within `limits` until `shutdown` resolves (see [`connections::serve`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let counters = state.connections.clone();
    connections::serve(listener, router(state), limits, counters, shutdown).await;
}

async fn get_status(State(api): State<ApiState>) -> Json<StatusDocument> {
    let snapshot = api.snapshot().await;
    Json(StatusDocument::new(&snapshot, &api.attachment))
}

async fn get_metrics(State(api): State<ApiState>) -> Response {
    let snapshot = api.snapshot().await;
    let text = metrics::render(snapshot, api.connections.stats());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// Anything but the two reads: 405 for another method (a write action), 404 otherwise.
async fn refuse(method: Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        return (
            StatusCode::NOT_FOUND,
            "not found: GET /metrics or /api/v1/status\n",
        )
            .into_response();
    }
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "GET")],
        "this address serves reads only (GET /metrics, GET /api/v1/status); write actions such as \
         reloads go through the daemon's control socket: `balancer reload`\n",
    )
        .into_response()
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

//! The HTTP API on `metrics_listen`:
//! - `GET /api/v1/status`: configuration, every backend's state and health, and the counters,
//!   summed over CPUs when asked for (JSON);
//! - `POST /api/v1/reload`: reload the config file now; answers whether it was accepted.

use std::{net::SocketAddr, time::Duration};

use axum::{
    extract::State,
    http::StatusCode,
    routing::{get, post},
    Json, Router,
};
use balancer_common::{xdp_action, Outcome, TrafficStats};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::{
    controller::{Controller, ReloadOutcome},
    daemon::{Event, Shared},
    dataplane::error_chain,
};

#[derive(Clone)]
struct Api {
    shared: Shared,
    events: mpsc::Sender<Event>,
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Shared,
    events: mpsc::Sender<Event>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/api/v1/status", get(get_status))
        .route("/metrics", get(get_metrics))
        .route("/api/v1/reload", post(post_reload))
        .with_state(Api { shared, events });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await
}

async fn get_status(State(api): State<Api>) -> Result<Json<Value>, (StatusCode, String)> {
    let shared = api.shared.clone();
    match tokio::task::spawn_blocking(move || status(&shared.lock().expect("state lock"))).await {
        Ok(Ok(value)) => Ok(Json(value)),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e)),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn get_metrics(
    State(api): State<Api>,
) -> Result<([(axum::http::header::HeaderName, &'static str); 1], String), (StatusCode, String)> {
    let shared = api.shared.clone();
    match tokio::task::spawn_blocking(move || {
        crate::metrics::render(&shared.lock().expect("state lock"))
    })
    .await
    {
        Ok(Ok(text)) => Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e)),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn post_reload(State(api): State<Api>) -> (StatusCode, Json<Value>) {
    let (reply, answer) = oneshot::channel();
    if api
        .events
        .send(Event::Reload {
            trigger: "API request",
            reply: Some(reply),
        })
        .await
        .is_err()
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"accepted": false, "error": "shutting down"})),
        );
    }
    match tokio::time::timeout(Duration::from_secs(60), answer).await {
        Ok(Ok(outcome)) => reload_answer(outcome),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"accepted": false, "error": "no answer from the daemon"})),
        ),
    }
}

fn reload_answer(outcome: ReloadOutcome) -> (StatusCode, Json<Value>) {
    match outcome {
        ReloadOutcome::Accepted {
            generation,
            changes,
        } => (
            StatusCode::OK,
            Json(json!({"accepted": true, "generation": generation, "changes": changes})),
        ),
        ReloadOutcome::Unchanged { generation } => (
            StatusCode::OK,
            Json(json!({"accepted": true, "generation": generation, "changes": []})),
        ),
        ReloadOutcome::Rejected { error } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"accepted": false, "error": error})),
        ),
    }
}

fn rates_json(rates: Option<crate::autoscale::TrafficRates>) -> Value {
    let r = rates.unwrap_or_default();
    json!({ "new_flows_per_second": r.new_flows, "packets_per_second": r.packets, "bytes_per_second": r.bytes })
}

fn stats_json(stats: Option<&TrafficStats>) -> Value {
    let s = stats.copied().unwrap_or_default();
    json!({ "packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows })
}

/// The status document.
pub fn status(c: &Controller) -> Result<Value, String> {
    let counters = c.dataplane.counters().map_err(|e| error_chain(&e))?;
    let applied = c.dataplane.applied();
    let vips: Vec<Value> = applied
        .vips
        .iter()
        .zip(&c.config.vips)
        .map(|(vip, config)| {
            let backends: Vec<Value> = vip
                .backends
                .iter()
                .map(|b| {
                    let key = (vip.name.clone(), b.address);
                    let hop = c.next_hops.get(&b.address);
                    let health = match c.trackers.get(&key) {
                        Some(t) => json!({
                            "state": if t.up { "up" } else { "down" },
                            "probes": t.probes,
                            "last_failure": t.last_failure.as_ref().map(ToString::to_string),
                        }),
                        None => json!({ "state": "unchecked" }),
                    };
                    json!({
                        "address": b.address.to_string(),
                        "weight": b.weight,
                        "state": b.state.as_str(),
                        "health": health,
                        "slots": b.slots,
                        "interface": hop.map(|h| h.interface.clone()),
                        "mac": hop.map(|h| format_mac(&h.dst_mac)),
                        "stats": stats_json(counters.backends.get(&b.id)),
                        "rates": rates_json(c.samples.backend(&key, crate::autoscale::STATUS_WINDOW)),
                    })
                })
                .collect();
            let all_down = c.all_down.get(&vip.name).cloned().unwrap_or_default();
            json!({
                "name": vip.name,
                "address": config.address.to_string(),
                "port": config.port,
                "protocol": config.protocol.to_string(),
                "forwarding": match config.forwarding {
                    crate::config::Forwarding::Tunnel => "tunnel",
                    _ => "dsr",
                },
                "hash": match config.hash {
                    crate::config::HashMode::DstPortOnly => "dst_port_only",
                    crate::config::HashMode::FiveTuple => "five_tuple",
                },
                "fragments": config.fragments,
                "table_size": vip.meta.table_size,
                "table_fingerprint": format!("{:016x}", crate::maglev::fingerprint(&vip.table)),
                "all_backends_down": all_down.active,
                "fail_open": vip.fail_open,
                "all_down_episodes": all_down.episodes,
                "stats": stats_json(counters.vips.get(&vip.meta.vip_id)),
                "rates": rates_json(c.samples.vip(&vip.name, crate::autoscale::STATUS_WINDOW)),
                "healthy_backends": vip.backends.iter().filter(|b| b.state == crate::reconcile::BackendState::Active).count(),
                "autoscale": match (config.autoscale, c.autoscale.get(&vip.name)) {
                    (Some(target), Some(state)) => json!({
                        "metric": target.metric.name(),
                        "target_per_backend": target.target_per_backend,
                        "tolerance": target.tolerance,
                        "window_seconds": target.window.as_secs_f64(),
                        "ready_backends": state.ready,
                        "rate": state.rate,
                        "desired_backends": state.desired,
                    }),
                    _ => Value::Null,
                },
                "backends": backends,
            })
        })
        .collect();
    let outcomes: serde_json::Map<String, Value> = Outcome::ALL
        .iter()
        .map(|o| (o.name().to_owned(), json!(counters.outcomes[*o as usize])))
        .collect();
    let verdicts: serde_json::Map<String, Value> = xdp_action::NAMES
        .iter()
        .zip(counters.verdicts())
        .map(|(name, total)| ((*name).to_owned(), json!(total)))
        .collect();
    let (interface, mode) = c
        .dataplane
        .attached()
        .map_or((None, None), |(i, m)| (Some(i), Some(m.as_str())));
    let ids = c.dataplane.program_ids();
    let datapath = json!({
        "pin_dir": c.dataplane.pin_dir().map(|d| d.display().to_string()),
        "adopted": c.adopted,
        "keep_on_exit": c.keep_datapath(),
        "program_id": ids.map(|i| i.program_id),
        "program_tag": ids.map(|i| format!("{:016x}", i.program_tag)),
        "link_id": ids.and_then(|i| i.link_id),
        "replaced_program_id": ids.and_then(|i| i.replaced_program),
    });
    Ok(json!({
        "interface": interface,
        "xdp_mode": mode,
        "datapath": datapath,
        "config": c.config_path.display().to_string(),
        "config_generation": c.generation,
        "reloads": {
            "accepted": c.reloads.accepted,
            "rejected": c.reloads.rejected,
            "last_error": c.reloads.last_error,
            "last_apply_ms": c.reloads.last_apply.map(|d| d.as_secs_f64() * 1e3),
        },
        "hash_seed": c.config.hash_seed,
        "conn_table_size": c.config.conn_table_size,
        "conn_table_entries": c.conn_entries.map(|(n, _)| n),
        "vips": vips,
        "outcomes": outcomes,
        "verdicts": verdicts,
    }))
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

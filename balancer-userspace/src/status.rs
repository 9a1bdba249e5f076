//! The JSON status API (`GET /api/v1/status` on `metrics_listen`): what is configured, what
//! state every backend is in, and the counters, summed over CPUs when asked for.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{http::StatusCode, routing::get, Json, Router};
use balancer_common::{Outcome, TrafficStats};
use serde_json::{json, Value};

use crate::{
    config::Config,
    dataplane::{error_chain, Dataplane},
    reconcile::NextHops,
};

/// What the daemon shares with the API.
pub struct Shared {
    pub config: Config,
    pub dataplane: Dataplane,
    pub next_hops: NextHops,
}

pub type SharedState = Arc<Mutex<Shared>>;

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: SharedState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/api/v1/status",
        get(move || {
            let state = state.clone();
            async move {
                match tokio::task::spawn_blocking(move || {
                    status(&state.lock().expect("state lock"))
                })
                .await
                {
                    Ok(Ok(value)) => Ok(Json(value)),
                    Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e)),
                    Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await
}

fn stats_json(stats: Option<&TrafficStats>) -> Value {
    let s = stats.copied().unwrap_or_default();
    json!({ "packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows })
}

/// The status document.
pub fn status(shared: &Shared) -> Result<Value, String> {
    let counters = shared.dataplane.counters().map_err(|e| error_chain(&e))?;
    let applied = shared.dataplane.applied();
    let vips: Vec<Value> = applied
        .vips
        .iter()
        .zip(&shared.config.vips)
        .map(|(vip, config)| {
            let backends: Vec<Value> = vip
                .backends
                .iter()
                .map(|b| {
                    let hop = shared.next_hops.get(&b.address);
                    json!({
                        "address": b.address.to_string(),
                        "weight": b.weight,
                        "state": b.state.as_str(),
                        "slots": b.slots,
                        "interface": hop.map(|h| h.interface.clone()),
                        "mac": hop.map(|h| format_mac(&h.dst_mac)),
                        "stats": stats_json(counters.backends.get(&b.id)),
                    })
                })
                .collect();
            json!({
                "name": vip.name,
                "address": config.address.to_string(),
                "port": config.port,
                "protocol": config.protocol.to_string(),
                "forwarding": "dsr",
                "table_size": vip.meta.table_size,
                "table_fingerprint": format!("{:016x}", crate::maglev::fingerprint(&vip.table)),
                "stats": stats_json(counters.vips.get(&vip.meta.vip_id)),
                "backends": backends,
            })
        })
        .collect();
    let outcomes: serde_json::Map<String, Value> = Outcome::ALL
        .iter()
        .map(|o| (o.name().to_owned(), json!(counters.outcomes[*o as usize])))
        .collect();
    let mut verdicts = serde_json::Map::new();
    for (i, name) in balancer_common::xdp_action::NAMES.iter().enumerate() {
        let total: u64 = Outcome::ALL
            .iter()
            .filter(|o| o.verdict() as usize == i)
            .map(|o| counters.outcomes[*o as usize])
            .sum();
        verdicts.insert((*name).to_owned(), json!(total));
    }
    let (interface, mode) = shared
        .dataplane
        .attached()
        .map_or((None, None), |(i, m)| (Some(i), Some(m.as_str())));
    Ok(json!({
        "interface": interface,
        "xdp_mode": mode,
        "hash_seed": shared.config.hash_seed,
        "conn_table_size": shared.config.conn_table_size,
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

//! The Prometheus exposition (`GET /metrics`, text format 0.0.4). Counters are read from the
//! per-CPU maps and summed when scraped: the packet path does nothing for metrics beyond its
//! own per-CPU increments.

use std::fmt::Write as _;

use balancer_common::{xdp_action, Outcome};

use crate::{
    controller::Controller,
    dataplane::{error_chain, Counters},
    health::PROBE_BUCKETS,
    reconcile::BackendState,
};

/// Writes metric families: HELP and TYPE once per family, then its samples.
struct Exposition {
    out: String,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, pairs: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = writeln!(self.out, "{name}{} {value}", labels(pairs));
    }
}

/// The whole exposition.
pub fn render(c: &Controller) -> Result<String, String> {
    let counters: Counters = c.dataplane.counters().map_err(|e| error_chain(&e))?;
    let applied = c.dataplane.applied();
    let mut e = Exposition {
        out: String::with_capacity(16 * 1024),
    };

    // Per backend.
    struct Row<'a> {
        vip: &'a str,
        backend: String,
        id: u32,
        weight: u32,
        state: BackendState,
        key: crate::reconcile::BackendKey,
    }
    let rows: Vec<Row> = applied
        .vips
        .iter()
        .flat_map(|v| {
            v.backends.iter().map(move |b| Row {
                vip: &v.name,
                backend: b.address.to_string(),
                id: b.id,
                weight: b.weight,
                state: b.state,
                key: (v.name.clone(), b.address),
            })
        })
        .collect();
    let per_backend =
        |e: &mut Exposition, name: &str, kind: &str, help: &str, value: &dyn Fn(&Row) -> String| {
            e.family(name, kind, help);
            for r in &rows {
                e.sample(name, &[("vip", r.vip), ("backend", &r.backend)], value(r));
            }
        };
    let stats = |id: u32| counters.backends.get(&id).copied().unwrap_or_default();
    per_backend(
        &mut e,
        "balancer_backend_packets_total",
        "counter",
        "Packets forwarded to the backend.",
        &|r| stats(r.id).packets.to_string(),
    );
    per_backend(
        &mut e,
        "balancer_backend_bytes_total",
        "counter",
        "Bytes (whole frames as received) forwarded to the backend.",
        &|r| stats(r.id).bytes.to_string(),
    );
    per_backend(
        &mut e,
        "balancer_backend_new_flows_total",
        "counter",
        "Flows placed on the backend by the Maglev table.",
        &|r| stats(r.id).new_flows.to_string(),
    );
    per_backend(
        &mut e,
        "balancer_backend_up",
        "gauge",
        "1 if the backend passes its health checks (or has none), else 0.",
        &|r| {
            let up = c.trackers.get(&r.key).is_none_or(|t| t.up);
            (up as u8).to_string()
        },
    );
    per_backend(
        &mut e,
        "balancer_backend_weight",
        "gauge",
        "The backend's configured weight.",
        &|r| r.weight.to_string(),
    );
    per_backend(
        &mut e,
        "balancer_backend_draining",
        "gauge",
        "1 if the backend keeps its flows but gets no new ones (drain, weight 0, or removed from the config).",
        &|r| ((matches!(r.state, BackendState::Draining | BackendState::Removed)) as u8).to_string(),
    );

    e.family(
        "balancer_backend_probe_duration_seconds",
        "histogram",
        "Duration of the backend's health-check probes.",
    );
    for r in &rows {
        let Some(t) = c.trackers.get(&r.key) else {
            continue;
        };
        for (bound, count) in PROBE_BUCKETS.iter().zip(t.durations.buckets) {
            let le = bound.to_string();
            e.sample(
                "balancer_backend_probe_duration_seconds_bucket",
                &[("vip", r.vip), ("backend", &r.backend), ("le", &le)],
                count,
            );
        }
        let labels = [("vip", r.vip), ("backend", r.backend.as_str())];
        e.sample(
            "balancer_backend_probe_duration_seconds_bucket",
            &[("vip", r.vip), ("backend", &r.backend), ("le", "+Inf")],
            t.durations.count,
        );
        e.sample(
            "balancer_backend_probe_duration_seconds_sum",
            &labels,
            t.durations.sum,
        );
        e.sample(
            "balancer_backend_probe_duration_seconds_count",
            &labels,
            t.durations.count,
        );
    }
    e.family(
        "balancer_backend_probe_failures_total",
        "counter",
        "Failed health-check probes, by reason.",
    );
    for r in &rows {
        let Some(t) = c.trackers.get(&r.key) else {
            continue;
        };
        for reason in ["refused", "timeout", "status", "error"] {
            let n = t.failures_by_kind.get(reason).copied().unwrap_or(0);
            e.sample(
                "balancer_backend_probe_failures_total",
                &[("vip", r.vip), ("backend", &r.backend), ("reason", reason)],
                n,
            );
        }
    }

    // Per VIP.
    let vip_stats = |id: u32| counters.vips.get(&id).copied().unwrap_or_default();
    let per_vip = |e: &mut Exposition,
                   name: &str,
                   kind: &str,
                   help: &str,
                   value: &dyn Fn(&crate::reconcile::DesiredVip) -> String| {
        e.family(name, kind, help);
        for v in &applied.vips {
            e.sample(name, &[("vip", &v.name)], value(v));
        }
    };
    per_vip(
        &mut e,
        "balancer_vip_packets_total",
        "counter",
        "Packets forwarded for the VIP.",
        &|v| vip_stats(v.meta.vip_id).packets.to_string(),
    );
    per_vip(
        &mut e,
        "balancer_vip_bytes_total",
        "counter",
        "Bytes (whole frames as received) forwarded for the VIP.",
        &|v| vip_stats(v.meta.vip_id).bytes.to_string(),
    );
    per_vip(
        &mut e,
        "balancer_vip_new_flows_total",
        "counter",
        "Flows placed by the VIP's Maglev table.",
        &|v| vip_stats(v.meta.vip_id).new_flows.to_string(),
    );
    per_vip(
        &mut e,
        "balancer_vip_healthy_backends",
        "gauge",
        "Backends of the VIP taking new flows (healthy, not draining).",
        &|v| {
            v.backends
                .iter()
                .filter(|b| b.state == BackendState::Active)
                .count()
                .to_string()
        },
    );
    per_vip(
        &mut e,
        "balancer_vip_fail_open",
        "gauge",
        "1 while every backend is down and the VIP spreads over them anyway.",
        &|v| (v.fail_open as u8).to_string(),
    );
    e.family(
        "balancer_vip_table_info",
        "gauge",
        "Always 1; the fingerprint label identifies the VIP's Maglev table, equal on balancers that choose alike.",
    );
    for v in &applied.vips {
        let fingerprint = format!("{:016x}", crate::maglev::fingerprint(&v.table));
        e.sample(
            "balancer_vip_table_info",
            &[("vip", &v.name), ("fingerprint", &fingerprint)],
            1,
        );
    }
    e.family(
        "balancer_vip_desired_backends",
        "gauge",
        "Backends the VIP's load calls for (its autoscale target, computed as the Kubernetes HPA does).",
    );
    for (name, a) in &c.autoscale {
        e.sample("balancer_vip_desired_backends", &[("vip", name)], a.desired);
    }

    // Global.
    e.family(
        "balancer_packets_total",
        "counter",
        "Packets seen by the XDP program, by verdict.",
    );
    for (verdict, n) in xdp_action::NAMES.iter().zip(counters.verdicts()) {
        e.sample("balancer_packets_total", &[("verdict", verdict)], n);
    }
    e.family(
        "balancer_packet_outcomes_total",
        "counter",
        "Packets seen by the XDP program, by what happened to them.",
    );
    for o in Outcome::ALL {
        e.sample(
            "balancer_packet_outcomes_total",
            &[("outcome", o.name())],
            counters.outcomes[*o as usize],
        );
    }
    e.family(
        "balancer_dropped_packets_total",
        "counter",
        "Packets dropped by the XDP program, by reason.",
    );
    for o in Outcome::ALL
        .iter()
        .filter(|o| o.verdict() == xdp_action::DROP)
    {
        e.sample(
            "balancer_dropped_packets_total",
            &[("reason", o.name())],
            counters.outcomes[*o as usize],
        );
    }
    e.family(
        "balancer_conn_table_entries",
        "gauge",
        "Flows the connection table remembers (finished ones stay until the LRU evicts them), as of the last walk of the table: every second while the walk is quick, spaced out so that walking costs under 1% of one CPU, at least every 60 seconds.",
    );
    e.sample(
        "balancer_conn_table_entries",
        &[],
        c.conn_entries.map_or(0, |(n, _)| n),
    );
    e.family(
        "balancer_conn_table_capacity",
        "gauge",
        "Flows the connection table holds at most.",
    );
    e.sample(
        "balancer_conn_table_capacity",
        &[],
        c.config.conn_table_size,
    );
    e.family(
        "balancer_config_reloads_total",
        "counter",
        "Config reloads, by result.",
    );
    e.sample(
        "balancer_config_reloads_total",
        &[("result", "accepted")],
        c.reloads.accepted,
    );
    e.sample(
        "balancer_config_reloads_total",
        &[("result", "rejected")],
        c.reloads.rejected,
    );
    e.family(
        "balancer_config_generation",
        "gauge",
        "Generation of the running config (1 at start, +1 per accepted reload).",
    );
    e.sample("balancer_config_generation", &[], c.generation);
    e.family(
        "balancer_build_info",
        "gauge",
        "Always 1; labels describe the build.",
    );
    e.sample(
        "balancer_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("layout", &balancer_common::LAYOUT_VERSION.to_string()),
        ],
        1,
    );
    Ok(e.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(labels(&[("a", "x\"y\\z\nw")]), "{a=\"x\\\"y\\\\z\\nw\"}");
        assert_eq!(labels(&[]), "");
    }
}

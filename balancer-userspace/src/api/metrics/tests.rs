//! The exposition against golden text.
//!
//! `golden/metrics-0.0.4.txt` is what the hand-written Prometheus 0.0.4 renderer of revision
//! 49b1652 (before the exposition moved to prometheus-client) wrote for the snapshot built
//! here: every metric name, label and value the scrape had then. The OpenMetrics output must
//! carry exactly the same samples (names, labels, values), and the same families with the
//! same help and type, apart from the families added since ([`ADDED_SINCE_LEGACY`]).
//! `golden/metrics.txt` is the exact current output, so that any change of format shows in
//! review.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use crate::api::{connections::ConnectionStats, metrics::render, sample::sample_snapshot};

/// Prefixes of the families added after the legacy renderer: the status API's connections,
/// NAT.
const ADDED_SINCE_LEGACY: &[&str] = &[
    "balancer_api_",
    "balancer_nat_",
    "balancer_discovery_",
    "balancer_backend_info",
    "balancer_backend_remembered_flows",
    "balancer_backend_last_packet_age_seconds",
    "balancer_flood",
    "balancer_new_flows_per_cpu_cap",
    "balancer_pending_table_capacity",
    "balancer_defence_events",
];

fn legacy_name(name: &str) -> bool {
    !ADDED_SINCE_LEGACY.iter().any(|p| name.starts_with(p))
}

/// The status API's connection counters, each with its own value.
fn sample_connections() -> ConnectionStats {
    ConnectionStats {
        open: 3,
        refused: 17,
        header_timeouts: 5,
        lifetime_timeouts: 1,
    }
}

/// A sample: name and labels, as a key.
type Series = (String, BTreeMap<String, String>);

/// Every sample of an exposition (either format), with its value.
fn samples(text: &str) -> BTreeMap<Series, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value of {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let labels = rest
                    .strip_suffix('}')
                    .expect("closing brace")
                    .split("\",")
                    .map(|pair| {
                        let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                        let v = v.trim_end_matches('"');
                        // Bucket bounds are numbers, written differently by each format.
                        let v = if k == "le" && v != "+Inf" {
                            v.parse::<f64>().unwrap().to_string()
                        } else {
                            v.to_owned()
                        };
                        (k.to_owned(), v)
                    })
                    .collect();
                (name, labels)
            }
        };
        assert!(
            out.insert((name.to_owned(), labels), value).is_none(),
            "{line} twice"
        );
    }
    out
}

/// HELP and TYPE per family; OpenMetrics names counter families without `_total`.
fn families(text: &str, openmetrics: bool) -> BTreeMap<String, (String, String)> {
    let mut out: BTreeMap<String, (String, String)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            out.entry(name.to_owned()).or_default().0 = help.to_owned();
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            out.entry(name.to_owned()).or_default().1 = kind.to_owned();
        }
    }
    if openmetrics {
        out = out
            .into_iter()
            .map(|(name, (help, kind))| {
                let name = if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name
                };
                (name, (help, kind))
            })
            .collect();
    }
    out
}

fn golden(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/api/metrics/golden")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_scrape_keeps_every_metric_name_label_and_value() {
    let text = render(Arc::new(sample_snapshot()), sample_connections());
    let legacy = golden("metrics-0.0.4.txt");
    let mut now = samples(&text);
    now.retain(|(name, _), _| legacy_name(name));
    assert_eq!(now, samples(&legacy));
    let mut now = families(&text, true);
    now.retain(|name, _| legacy_name(name));
    assert_eq!(now, families(&legacy, false));
    assert!(
        text.ends_with("# EOF\n"),
        "an OpenMetrics exposition ends with # EOF"
    );
}

#[test]
fn the_exposition_is_the_golden_text() {
    let text = render(Arc::new(sample_snapshot()), sample_connections());
    let golden = golden("metrics.txt");
    if text != golden {
        let path = std::env::temp_dir().join("balancer-metrics.txt");
        std::fs::write(&path, &text).unwrap();
        panic!(
            "the exposition differs from src/api/metrics/golden/metrics.txt; the new one is in {} \
             (copy it over if the change is intended)",
            path.display()
        );
    }
}

#[test]
fn a_fleet_member_exports_its_announcements_and_sync() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut snapshot = sample_snapshot();
    let plain = render(Arc::new(snapshot.clone()), sample_connections());
    assert!(!plain.contains("balancer_vip_announced") && !plain.contains("balancer_sync_"));
    snapshot.announce = Some(crate::core::snapshot::AnnounceView {
        table: 100,
        routes: vec!["192.0.2.1".parse().unwrap()],
        withdrawn_all: false,
        withdrawn: vec!["dns".into()],
        awaiting_sync: false,
    });
    snapshot.vips[1].unannounced = Some("withdrawn by the operator");
    let peer: std::net::SocketAddr = "10.0.0.3:7946".parse().unwrap();
    let stats = crate::sync::SyncStats::new("10.0.0.2:7946".parse().unwrap(), &[peer]);
    stats.entries_sent.store(10, Relaxed);
    stats.entries_applied.store(8, Relaxed);
    stats.reject("replayed", 2);
    stats.peers.lock().unwrap().get_mut(&peer).unwrap().lag =
        Some(std::time::Duration::from_millis(3));
    snapshot.sync = Some(Arc::new(stats));
    let text = render(Arc::new(snapshot), sample_connections());
    for line in [
        "balancer_vip_announced{vip=\"web\"} 1",
        "balancer_vip_announced{vip=\"dns\"} 0",
        "balancer_announced_routes 1",
        "balancer_sync_entries_sent_total 10",
        "balancer_sync_entries_applied_total 8",
        "balancer_sync_rejected_total{reason=\"replayed\"} 2",
        "balancer_sync_rejected_total{reason=\"unauthenticated\"} 0",
        "balancer_sync_peer_lag_seconds{peer=\"10.0.0.3:7946\"} 0.003",
    ] {
        assert!(
            text.contains(&format!("{line}\n")),
            "{line} not in:\n{text}"
        );
    }
}

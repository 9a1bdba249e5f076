//! `GET /metrics`: the snapshot in the OpenMetrics text format, encoded by the Prometheus
//! organisation's own client library (`prometheus-client`) as constant metrics: the counters
//! are the data plane's per-CPU counters summed when the snapshot was taken, and the API's
//! own connection counters read with it, so nothing here counts anything itself.

use std::{collections::HashMap, fmt};

use balancer_common::{xdp_action, NatCounter, Outcome, LAYOUT_VERSION};
use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeMetric, MetricEncoder},
    metrics::{counter::ConstCounter, exemplar::Exemplar, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use crate::{
    api::connections::ConnectionStats,
    core::{
        health::{Histogram, PROBE_BUCKETS},
        snapshot::{BackendView, Snapshot, VipView},
    },
};

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The whole exposition of a snapshot and of the API's connections.
pub fn render(snapshot: std::sync::Arc<Snapshot>, api: ConnectionStats) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition(snapshot, api)));
    let mut out = String::with_capacity(16 * 1024);
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

#[derive(Debug)]
struct Exposition(std::sync::Arc<Snapshot>, ConnectionStats);

/// Label sets, as the encoder takes them.
type Labels<'a> = Vec<(&'static str, &'a str)>;

/// A family of one value per backend (or VIP): name, help, counter or gauge, the value.
type PerBackend = (
    &'static str,
    &'static str,
    MetricType,
    fn(&BackendView) -> u64,
);
type PerVip = (&'static str, &'static str, MetricType, fn(&VipView) -> u64);

/// One metric family, its samples written one by one.
struct Family<'f> {
    encoder: MetricEncoder<'f>,
}

/// Starts a family: its name (without `_total` for counters: the encoder adds it to the
/// samples), its help text and its type.
fn family<'f>(
    encoder: &'f mut DescriptorEncoder<'_>,
    name: &'f str,
    help: &str,
    kind: MetricType,
) -> Result<Family<'f>, fmt::Error> {
    Ok(Family {
        encoder: encoder.encode_descriptor(name, help, None, kind)?,
    })
}

impl Family<'_> {
    fn counter(&mut self, labels: &Labels, value: u64) -> fmt::Result {
        ConstCounter::new(value).encode(self.encoder.encode_family(labels)?)
    }

    fn gauge(&mut self, labels: &Labels, value: i64) -> fmt::Result {
        ConstGauge::new(value).encode(self.encoder.encode_family(labels)?)
    }

    /// A sample of a counter or gauge family, as its type says.
    fn sample(&mut self, kind: MetricType, labels: &Labels, value: u64) -> fmt::Result {
        match kind {
            MetricType::Counter => self.counter(labels, value),
            _ => self.gauge(labels, value as i64),
        }
    }

    fn gauge_f64(&mut self, labels: &Labels, value: f64) -> fmt::Result {
        ConstGauge::new(value).encode(self.encoder.encode_family(labels)?)
    }

    /// The one sample of a gauge family without labels.
    fn single(self, value: i64) -> fmt::Result {
        ConstGauge::new(value).encode(self.encoder)
    }

    /// The one sample of a gauge family without labels, a fraction.
    fn single_f64(self, value: f64) -> fmt::Result {
        ConstGauge::new(value).encode(self.encoder)
    }

    /// The one sample of a counter family without labels.
    fn single_counter(self, value: u64) -> fmt::Result {
        ConstCounter::new(value).encode(self.encoder)
    }

    fn histogram(&mut self, labels: &Labels, h: &Histogram) -> fmt::Result {
        // The encoder takes per-bucket counts and accumulates them; ours are cumulative.
        let mut buckets: Vec<(f64, u64)> = Vec::with_capacity(PROBE_BUCKETS.len() + 1);
        let mut below = 0;
        for (bound, cumulative) in PROBE_BUCKETS.iter().zip(h.buckets) {
            buckets.push((*bound, cumulative - below));
            below = cumulative;
        }
        buckets.push((f64::MAX, h.count - below));
        let no_exemplars: Option<&HashMap<usize, Exemplar<Labels, f64>>> = None;
        self.encoder
            .encode_family(labels)?
            .encode_histogram(h.sum, h.count, &buckets, no_exemplars)
    }
}

impl Collector for Exposition {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        backends(&mut e, s)?;
        drains(&mut e, s)?;
        probes(&mut e, s)?;
        vips(&mut e, s)?;
        discovery(&mut e, s)?;
        announce(&mut e, s)?;
        if let Some(sync) = &s.sync {
            sync_metrics(&mut e, sync)?;
        }
        global(&mut e, s)?;
        nat(&mut e, s)?;
        defence(&mut e, s)?;
        api(&mut e, &self.1)
    }
}

/// Every backend of every VIP, with its VIP.
fn each_backend(s: &Snapshot) -> impl Iterator<Item = (&VipView, &BackendView, String)> {
    s.vips.iter().flat_map(|v| {
        v.backends
            .iter()
            .map(move |b| (v, b, b.address.to_string()))
    })
}

fn backend_labels<'a>(v: &'a VipView, address: &'a str) -> Labels<'a> {
    vec![("vip", v.name.as_str()), ("backend", address)]
}

fn backends(e: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    use MetricType::{Counter, Gauge};
    let families: [PerBackend; 6] = [
        ("balancer_backend_packets", "Packets forwarded to the backend.", Counter, |b| b.stats.packets),
        (
            "balancer_backend_bytes",
            "Bytes (whole frames as received) forwarded to the backend.",
            Counter,
            |b| b.stats.bytes,
        ),
        (
            "balancer_backend_new_flows",
            "Flows placed on the backend by the Maglev table.",
            Counter,
            |b| b.stats.new_flows,
        ),
        (
            "balancer_backend_up",
            "1 if the backend passes its health checks (or has none), else 0.",
            Gauge,
            |b| b.up().into(),
        ),
        ("balancer_backend_weight", "The backend's configured weight.", Gauge, |b| b.weight.into()),
        (
            "balancer_backend_draining",
            "1 if the backend keeps its flows but gets no new ones (drain, weight 0, or removed from the config).",
            Gauge,
            |b| b.state.drains().into(),
        ),
    ];
    for (name, help, kind, value) in families {
        let mut f = family(e, name, help, kind)?;
        for (v, b, address) in each_backend(s) {
            f.sample(kind, &backend_labels(v, &address), value(b))?;
        }
    }
    Ok(())
}

/// Where each backend comes from, and what says a drained one is done.
fn drains(e: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let mut f = family(
        e,
        "balancer_backend_info",
        "Always 1; the source label says where the backend comes from: file, the discovery that found it (dns NAME, srv NAME), or removed (retiring through removal_grace).",
        MetricType::Gauge,
    )?;
    for (v, b, address) in each_backend(s) {
        let mut labels = backend_labels(v, &address);
        labels.push(("source", b.source.as_str()));
        f.gauge(&labels, 1)?;
    }
    let mut f = family(
        e,
        "balancer_backend_remembered_flows",
        "Flows the connection table remembers for the backend (under NAT: its open connections), as of the last walk or sweep; a drained backend is done when this reaches 0.",
        MetricType::Gauge,
    )?;
    for (v, b, address) in each_backend(s) {
        if let Some(n) = b.remembered_flows {
            f.gauge(&backend_labels(v, &address), n as i64)?;
        }
    }
    let mut f = family(
        e,
        "balancer_backend_last_packet_age_seconds",
        "Time since the backend last forwarded a packet (since the daemon's first reading if it has not), to the second of the readings.",
        MetricType::Gauge,
    )?;
    let now = std::time::Instant::now();
    for (v, b, address) in each_backend(s) {
        if let Some(at) = b.last_packet {
            let age = now.saturating_duration_since(at).as_secs_f64().round();
            f.gauge_f64(&backend_labels(v, &address), age)?;
        }
    }
    Ok(())
}

/// Every discovering VIP's lookups.
/// With `[announce]`: which VIPs are announced.
fn announce(e: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let Some(announce) = &s.announce else {
        return Ok(());
    };
    let mut f = family(
        e,
        "balancer_vip_announced",
        "1 while the VIP's address is announced (a route in the [announce] table for the BGP speaker); 0 while it is withdrawn: no backend takes new flows, `balancer withdraw`, or waiting for the peers' connection tables.",
        MetricType::Gauge,
    )?;
    for v in &s.vips {
        f.gauge(
            &vec![("vip", v.name.as_str())],
            v.unannounced.is_none().into(),
        )?;
    }
    family(
        e,
        "balancer_announced_routes",
        "Routes in the [announce] table: one per announced VIP address.",
        MetricType::Gauge,
    )?
    .single(announce.routes.len() as i64)
}

/// With `[sync]`: the connection-table sync's counters.
fn sync_metrics(e: &mut DescriptorEncoder, s: &crate::sync::SyncStats) -> fmt::Result {
    use std::sync::atomic::Ordering::Relaxed;
    let counters: [(&str, &str, &std::sync::atomic::AtomicU64); 8] = [
        ("balancer_sync_entries_sent", "New-flow decisions sent to peers, counted once per peer.", &s.entries_sent),
        ("balancer_sync_messages_sent", "Sync messages sent (batches, bulk copies, requests).", &s.messages_sent),
        ("balancer_sync_send_errors", "Sync messages the socket refused to send.", &s.send_errors),
        ("balancer_sync_lost", "New-flow decisions the program could not hand to the sender (its ring buffer was full): not sent.", &s.lost),
        ("balancer_sync_entries_received", "Entries in authentic messages from peers.", &s.entries_received),
        ("balancer_sync_entries_applied", "Received entries inserted into the connection table.", &s.entries_applied),
        ("balancer_sync_entries_kept", "Received entries for flows this balancer had placed itself: its own entry kept.", &s.entries_kept),
        ("balancer_sync_bulk_copies_sent", "Whole connection tables sent to peers that asked (a peer starting).", &s.bulk_sent),
    ];
    for (name, help, value) in counters {
        family(e, name, help, MetricType::Counter)?.single_counter(value.load(Relaxed))?;
    }
    let mut f = family(
        e,
        "balancer_sync_rejected",
        "Sync messages (truncated, oversized, unauthenticated, malformed, replayed, stale, unknown_peer) and entries (unknown_vip, unknown_backend, insert_failed) dropped, by reason.",
        MetricType::Counter,
    )?;
    for (reason, n) in s.rejections() {
        f.counter(&vec![("reason", reason)], n)?;
    }
    let peers = s.peers();
    let mut f = family(
        e,
        "balancer_sync_peer_lag_seconds",
        "How old the peer's last message was when it arrived (its send time against this host's clock).",
        MetricType::Gauge,
    )?;
    for (peer, stats) in &peers {
        if let Some(lag) = stats.lag {
            f.gauge_f64(
                &vec![("peer", peer.to_string().as_str())],
                lag.as_secs_f64(),
            )?;
        }
    }
    let mut f = family(
        e,
        "balancer_sync_peer_last_message_age_seconds",
        "Time since the peer's last authentic message (every peer sends at least a heartbeat a second: a growing age is a peer down, unreachable, or with another key).",
        MetricType::Gauge,
    )?;
    for (peer, stats) in &peers {
        if let Some(at) = stats.last_heard {
            f.gauge_f64(
                &vec![("peer", peer.to_string().as_str())],
                at.elapsed().as_secs_f64(),
            )?;
        }
    }
    Ok(())
}

fn discovery(e: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    use crate::core::discovery::Outcome;
    let discovering = || {
        s.vips
            .iter()
            .filter_map(|v| Some((v, v.discovery.as_ref()?)))
    };
    let mut f = family(
        e,
        "balancer_discovery_backends",
        "Backends the VIP's DNS discovery found and that are in force.",
        MetricType::Gauge,
    )?;
    for (v, d) in discovering() {
        let source = d.query.to_string();
        let labels = vec![("vip", v.name.as_str()), ("source", source.as_str())];
        f.gauge(&labels, d.state.backends.len() as i64)?;
    }
    let mut f = family(
        e,
        "balancer_discovery_resolutions",
        "DNS lookups of the VIP's discovery, by result: records, empty, nxdomain (both removed the set only once they lasted empty_grace), timeout, servfail, refused, error (all four kept the last set), over_cap (more backends than max_backends: refused, the last set kept).",
        MetricType::Counter,
    )?;
    for (v, d) in discovering() {
        for o in Outcome::ALL {
            let labels = vec![("vip", v.name.as_str()), ("result", o.name())];
            f.counter(&labels, d.state.outcomes.get(&o).copied().unwrap_or(0))?;
        }
    }
    let mut f = family(
        e,
        "balancer_discovery_last_success_age_seconds",
        "Time since the VIP's discovery last had an answer that gave (or confirmed) its set; grows while lookups fail.",
        MetricType::Gauge,
    )?;
    let now = std::time::Instant::now();
    for (v, d) in discovering() {
        if let Some(at) = d.state.last_good {
            let age = now.saturating_duration_since(at).as_secs_f64();
            f.gauge_f64(&vec![("vip", v.name.as_str())], (age * 10.0).round() / 10.0)?;
        }
    }
    let mut f = family(
        e,
        "balancer_discovery_backend_changes",
        "Backends added to and removed from the VIP by its discovery's answers.",
        MetricType::Counter,
    )?;
    for (v, d) in discovering() {
        for (change, n) in [("added", d.state.added), ("removed", d.state.removed)] {
            f.counter(&vec![("vip", v.name.as_str()), ("change", change)], n)?;
        }
    }
    let mut f = family(
        e,
        "balancer_discovery_rejected_records",
        "Discovered records left out because they cannot be backends (loopback, another address family, a VIP's address...).",
        MetricType::Counter,
    )?;
    for (v, d) in discovering() {
        f.counter(&vec![("vip", v.name.as_str())], d.state.rejected_records)?;
    }
    Ok(())
}

fn probes(e: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let mut f = family(
        e,
        "balancer_backend_probe_duration_seconds",
        "Duration of the backend's health-check probes.",
        MetricType::Histogram,
    )?;
    for (v, b, address) in each_backend(s) {
        if let Some(t) = &b.health {
            f.histogram(&backend_labels(v, &address), &t.durations)?;
        }
    }
    let mut f = family(
        e,
        "balancer_backend_probe_failures",
        "Failed health-check probes, by reason.",
        MetricType::Counter,
    )?;
    for (v, b, address) in each_backend(s) {
        let Some(t) = &b.health else { continue };
        for reason in ["refused", "timeout", "status", "error"] {
            let mut labels = backend_labels(v, &address);
            labels.push(("reason", reason));
            f.counter(
                &labels,
                t.failures_by_kind.get(reason).copied().unwrap_or(0),
            )?;
        }
    }
    Ok(())
}

fn vips(e: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    use MetricType::{Counter, Gauge};
    let families: [PerVip; 5] = [
        (
            "balancer_vip_packets",
            "Packets forwarded for the VIP.",
            Counter,
            |v| v.stats.packets,
        ),
        (
            "balancer_vip_bytes",
            "Bytes (whole frames as received) forwarded for the VIP.",
            Counter,
            |v| v.stats.bytes,
        ),
        (
            "balancer_vip_new_flows",
            "Flows placed by the VIP's Maglev table.",
            Counter,
            |v| v.stats.new_flows,
        ),
        (
            "balancer_vip_healthy_backends",
            "Backends of the VIP taking new flows (healthy, not draining).",
            Gauge,
            |v| v.healthy as u64,
        ),
        (
            "balancer_vip_fail_open",
            "1 while every backend is down and the VIP spreads over them anyway.",
            Gauge,
            |v| v.fail_open.into(),
        ),
    ];
    for (name, help, kind, value) in families {
        let mut f = family(e, name, help, kind)?;
        for v in &s.vips {
            f.sample(kind, &vec![("vip", v.name.as_str())], value(v))?;
        }
    }
    let mut f = family(
        e,
        "balancer_vip_table_info",
        "Always 1; the fingerprint label identifies the VIP's Maglev table, equal on balancers that choose alike.",
        MetricType::Gauge,
    )?;
    for v in &s.vips {
        let fingerprint = format!("{:016x}", v.fingerprint);
        f.gauge(
            &vec![("vip", v.name.as_str()), ("fingerprint", &fingerprint)],
            1,
        )?;
    }
    let mut f = family(
        e,
        "balancer_vip_desired_backends",
        "Backends the VIP's load calls for (its autoscale target, computed as the Kubernetes HPA does).",
        MetricType::Gauge,
    )?;
    for v in &s.vips {
        if let Some((_, state)) = &v.autoscale {
            f.gauge(&vec![("vip", v.name.as_str())], state.desired.into())?;
        }
    }
    Ok(())
}

fn global(e: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let outcome = |o: &Outcome| s.outcomes.get(*o as usize).copied().unwrap_or(0);
    let mut f = family(
        e,
        "balancer_packets",
        "Packets seen by the XDP program, by verdict.",
        MetricType::Counter,
    )?;
    for (i, verdict) in xdp_action::NAMES.iter().enumerate() {
        f.counter(
            &vec![("verdict", *verdict)],
            s.verdicts.get(i).copied().unwrap_or(0),
        )?;
    }
    let mut f = family(
        e,
        "balancer_packet_outcomes",
        "Packets seen by the XDP program, by what happened to them.",
        MetricType::Counter,
    )?;
    for o in Outcome::ALL {
        f.counter(&vec![("outcome", o.name())], outcome(o))?;
    }
    let mut f = family(
        e,
        "balancer_dropped_packets",
        "Packets dropped by the XDP program, by reason.",
        MetricType::Counter,
    )?;
    for o in Outcome::ALL
        .iter()
        .filter(|o| o.verdict() == xdp_action::DROP)
    {
        f.counter(&vec![("reason", o.name())], outcome(o))?;
    }
    family(
        e,
        "balancer_conn_table_entries",
        "Flows the connection table remembers (finished ones stay until the LRU evicts them), as of the last walk of the table: every second while the walk is quick, spaced out so that walking costs under 1% of one CPU, at least every 60 seconds.",
        MetricType::Gauge,
    )?
    .single(s.conn_entries.unwrap_or(0) as i64)?;
    family(
        e,
        "balancer_conn_table_capacity",
        "Flows the connection table holds at most.",
        MetricType::Gauge,
    )?
    .single(s.conn_table_size.into())?;
    let mut f = family(
        e,
        "balancer_config_reloads",
        "Config reloads, by result.",
        MetricType::Counter,
    )?;
    f.counter(&vec![("result", "accepted")], s.reloads.accepted)?;
    f.counter(&vec![("result", "rejected")], s.reloads.rejected)?;
    family(
        e,
        "balancer_config_generation",
        "Generation of the running config (1 at start, +1 per accepted reload).",
        MetricType::Gauge,
    )?
    .single(s.generation as i64)?;
    let layout = LAYOUT_VERSION.to_string();
    family(
        e,
        "balancer_build_info",
        "Always 1; labels describe the build.",
        MetricType::Gauge,
    )?
    .gauge(
        &vec![("version", env!("CARGO_PKG_VERSION")), ("layout", &layout)],
        1,
    )
}

/// The defences of the state tables: flood mode and what the pending tables and the cap did
/// (new flows over a source's limit are the outcome `source_limited`).
fn defence(e: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    use balancer_common::defence::DefenceCounter;
    let d = &s.defence;
    family(
        e,
        "balancer_flood_mode",
        "1 while new flows go over the per-CPU cap ([flood] new_flows_per_cpu): they are then placed by the Maglev table alone, without state, and new NAT connections are refused.",
        MetricType::Gauge,
    )?
    .single(i64::from(d.flooding))?;
    family(
        e,
        "balancer_floods",
        "How often flood mode started.",
        MetricType::Counter,
    )?
    .single_counter(d.floods)?;
    family(
        e,
        "balancer_new_flows_per_cpu_cap",
        "New flows with state each CPU takes per second before flood mode ([flood] new_flows_per_cpu).",
        MetricType::Gauge,
    )?
    .single(d.cap.into())?;
    family(
        e,
        "balancer_pending_table_capacity",
        "TCP flows each pending table (one per family) holds between their SYN and their next packet ([flood] pending_table_size).",
        MetricType::Gauge,
    )?
    .single(d.pending_capacity.into())?;
    let mut f = family(
        e,
        "balancer_defence_events",
        "What the defences did with new flows: SYNs placed in the pending table (pending), pending flows moved to the connection table by their next packet (promoted), SYNs that rewrote a reused 5-tuple's entry in place (reused), new flows over the per-CPU cap placed without state (capped).",
        MetricType::Counter,
    )?;
    for c in DefenceCounter::ALL {
        let v = d.counters.get(*c as usize).copied().unwrap_or(0);
        f.counter(&vec![("event", c.name())], v)?;
    }
    Ok(())
}

/// NAT: the tables as of the last sweep, translations, allocation failures, expiries.
fn nat(e: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    nat_tables(e, s)?;
    nat_events(e, s)
}

/// The NAT tables as of the last sweep.
fn nat_tables(e: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let n = &s.nat;
    let sweep = n.sweep.clone().unwrap_or_default();
    let mut f = family(
        e,
        "balancer_nat_entries",
        "Entries of the NAT tables (two per connection, one per direction; a closed connection's reply entry stays through its quarantine), by family, as of the last sweep.",
        MetricType::Gauge,
    )?;
    f.gauge(&vec![("family", "ipv4")], sweep.entries_v4 as i64)?;
    f.gauge(&vec![("family", "ipv6")], sweep.entries_v6 as i64)?;
    family(
        e,
        "balancer_nat_connections",
        "NAT connections (forward entries) in the tables, as of the last sweep.",
        MetricType::Gauge,
    )?
    .single(sweep.connections as i64)?;
    family(
        e,
        "balancer_nat_table_capacity",
        "NAT connections each NAT table (one per family) holds at most (nat_table_size).",
        MetricType::Gauge,
    )?
    .single(n.capacity.into())?;
    let mut f = family(
        e,
        "balancer_nat_snat_ports_in_use",
        "SNAT ports taken (by live and quarantined connections), by SNAT address, as of the last sweep.",
        MetricType::Gauge,
    )?;
    for (address, ports) in &sweep.ports {
        f.gauge(&vec![("address", &address.to_string())], *ports as i64)?;
    }
    family(
        e,
        "balancer_nat_last_sweep_seconds",
        "How long the last sweep of the NAT tables took (it pauses between batches).",
        MetricType::Gauge,
    )?
    .single_f64(sweep.took.as_secs_f64())
}

/// What happened to NAT packets and connections.
fn nat_events(e: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
    let n = &s.nat;
    let counter = |c: NatCounter| n.counters.get(c as usize).copied().unwrap_or(0);
    let mut f = family(
        e,
        "balancer_nat_translations",
        "Packets translated by NAT: client packets to backends (forward), backends' replies to clients (reply).",
        MetricType::Counter,
    )?;
    f.counter(&vec![("direction", "forward")], n.forwarded)?;
    f.counter(&vec![("direction", "reply")], n.replies)?;
    let mut f = family(
        e,
        "balancer_nat_icmp_translations",
        "ICMP errors about NAT connections translated, by the direction they went.",
        MetricType::Counter,
    )?;
    f.counter(
        &vec![("direction", "forward")],
        counter(NatCounter::IcmpForward),
    )?;
    f.counter(
        &vec![("direction", "reply")],
        counter(NatCounter::IcmpReply),
    )?;
    let mut f = family(
        e,
        "balancer_nat_connections_created",
        "NAT connections created, by how the SNAT port was found (the client's own kept, or another probed; destination-only NAT keeps the client's).",
        MetricType::Counter,
    )?;
    f.counter(&vec![("port", "kept")], counter(NatCounter::PortKept))?;
    f.counter(&vec![("port", "probed")], counter(NatCounter::PortProbed))?;
    f.counter(
        &vec![("port", "client")],
        counter(NatCounter::Created)
            .saturating_sub(counter(NatCounter::PortKept) + counter(NatCounter::PortProbed)),
    )?;
    let mut f = family(
        e,
        "balancer_nat_allocation_failures",
        "New NAT connections refused (dropped), by reason.",
        MetricType::Counter,
    )?;
    f.counter(
        &vec![("reason", "ports_exhausted")],
        counter(NatCounter::NoPortExhausted),
    )?;
    f.counter(
        &vec![("reason", "insert_failed")],
        counter(NatCounter::NoPortInsertFailed),
    )?;
    f.counter(
        &vec![("reason", "no_snat_address")],
        counter(NatCounter::NoSnatAddress),
    )?;
    let mut f = family(
        e,
        "balancer_nat_expired",
        "NAT entries that timed out: found late by a client's packet (lookup), or removed by a sweep (sweep).",
        MetricType::Counter,
    )?;
    f.counter(
        &vec![("by", "lookup")],
        counter(NatCounter::ExpiredOnLookup),
    )?;
    f.counter(&vec![("by", "sweep")], n.swept)
}

/// The status API's own connections.
fn api(e: &mut DescriptorEncoder, c: &ConnectionStats) -> fmt::Result {
    family(
        e,
        "balancer_api_connections",
        "Connections open to the status API (metrics_listen).",
        MetricType::Gauge,
    )?
    .single(c.open as i64)?;
    family(
        e,
        "balancer_api_connections_refused",
        "Connections to the status API answered 503 and closed at once: api_max_connections were open (loopback peers have a reserve above it).",
        MetricType::Counter,
    )?
    .single_counter(c.refused)?;
    let mut f = family(
        e,
        "balancer_api_connections_timed_out",
        "Connections to the status API closed by a timeout: header (no complete request header within api_idle_timeout of connecting or of the last answer), lifetime (a request still unfinished at the end of the connection's lifetime).",
        MetricType::Counter,
    )?;
    f.counter(&vec![("reason", "header")], c.header_timeouts)?;
    f.counter(&vec![("reason", "lifetime")], c.lifetime_timeouts)
}

#[cfg(test)]
mod tests;

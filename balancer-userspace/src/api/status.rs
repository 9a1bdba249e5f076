//! The status document: one typed struct, serialised by the daemon (`GET /api/v1/status`) and
//! deserialised by `balancer status`, built from a snapshot.

use std::{collections::BTreeMap, time::Instant};

use balancer_common::{xdp_action, NatCounter, Outcome, TrafficStats};
use serde::{Deserialize, Serialize};

use crate::{
    autoscale::TrafficRates,
    config::{AutoscaleMetric, Forwarding, HashMode, Protocol},
    core::snapshot::{BackendView, DiscoveryView, Snapshot, VipView},
    plan::{desired::BackendState, inputs::format_mac},
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusDocument {
    pub interface: Option<String>,
    pub xdp_mode: Option<String>,
    pub datapath: DatapathStatus,
    /// The config file.
    pub config: String,
    pub config_generation: u64,
    pub reloads: ReloadsStatus,
    pub hash_seed: u32,
    pub conn_table_size: u32,
    /// Flows in the connection table at the last walk.
    pub conn_table_entries: Option<u64>,
    pub vips: Vec<VipStatus>,
    /// Packets by outcome name.
    pub outcomes: BTreeMap<String, u64>,
    /// Packets by XDP verdict name.
    pub verdicts: BTreeMap<String, u64>,
    /// The NAT tables (absent from the documents of daemons before NAT).
    #[serde(default)]
    pub nat: NatStatus,
    /// The announced VIP routes (`[announce]`; absent: nothing is announced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<AnnounceStatus>,
    /// Connection-table sync with the fleet's peers (`[sync]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncStatus>,
    /// The state tables' defences against floods (absent from the documents of daemons
    /// before them).
    #[serde(default)]
    pub defence: DefenceStatus,
}

/// Flood mode and what the defences did with new flows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefenceStatus {
    /// New flows over the per-CPU cap at the last reading: placed without state.
    pub flood_mode: bool,
    /// How often flood mode started.
    pub floods: u64,
    /// New flows with state per CPU per second (`[flood] new_flows_per_cpu`).
    pub new_flows_per_cpu: u32,
    /// Each pending table's size (`[flood] pending_table_size`).
    pub pending_table_size: u32,
    /// Events by `DefenceCounter` name: pending, promoted, reused, capped.
    pub events: BTreeMap<String, u64>,
    /// New flows dropped over their source's limit.
    pub source_limited: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    /// The kernel table the routes are in.
    pub table: u32,
    /// The VIP addresses announced.
    pub routes: Vec<String>,
    /// Every VIP is withdrawn by the operator (`balancer withdraw`).
    pub withdrawn_all: bool,
    /// VIPs withdrawn by name.
    pub withdrawn: Vec<String>,
    /// Nothing is announced until the peers' connection tables are copied.
    pub awaiting_sync: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub listen: String,
    /// The copy of the peers' tables at start: not_needed, waiting, complete (from a peer,
    /// with its entries), timed_out.
    pub bulk: String,
    pub entries_sent: u64,
    pub messages_sent: u64,
    pub send_errors: u64,
    /// Decisions the program could not hand to the sender (its ring buffer was full).
    pub lost: u64,
    pub entries_received: u64,
    pub entries_applied: u64,
    /// Received entries for flows this balancer had already placed: its own kept.
    pub entries_kept: u64,
    pub rejected: BTreeMap<String, u64>,
    pub bulk_copies_sent: u64,
    pub peers: Vec<PeerStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub address: String,
    pub last_message_age_seconds: Option<f64>,
    /// How old its last message was when it arrived.
    pub lag_seconds: Option<f64>,
    pub messages: u64,
    pub entries: u64,
}

/// The NAT tables, as of the last sweep, and what happened in them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatStatus {
    /// Connections each table (one per family) holds at most.
    pub capacity: u32,
    /// As of the last sweep (`None`: not swept yet).
    pub entries_ipv4: Option<u64>,
    pub entries_ipv6: Option<u64>,
    pub connections: Option<u64>,
    /// SNAT ports taken, by SNAT address.
    pub snat_ports_in_use: BTreeMap<String, u64>,
    /// Events by `NatCounter` name (connections created, ports kept or probed, allocation
    /// failures by reason, expiries found on lookup, ICMP errors translated).
    pub events: BTreeMap<String, u64>,
    /// Entries removed by sweeps.
    pub swept: u64,
    /// Packets translated, by direction.
    pub forwarded: u64,
    pub replies: u64,
}

/// The data plane as the daemon set it up: fixed at start, but for `keep_on_exit`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathStatus {
    pub pin_dir: Option<String>,
    /// What was adopted at start, if the data plane was.
    pub adopted: Option<String>,
    pub keep_on_exit: bool,
    pub program_id: Option<u32>,
    pub program_tag: Option<String>,
    pub link_id: Option<u32>,
    pub replaced_program_id: Option<u32>,
}

/// Where and how the program is attached, as the daemon found out at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attachment {
    pub interface: Option<String>,
    pub xdp_mode: Option<String>,
    /// `adopted` and `keep_on_exit` come from the snapshot.
    pub datapath: DatapathStatus,
}

fn defence_status(snapshot: &Snapshot) -> DefenceStatus {
    use balancer_common::defence::DefenceCounter;
    let d = &snapshot.defence;
    DefenceStatus {
        flood_mode: d.flooding,
        floods: d.floods,
        new_flows_per_cpu: d.cap,
        pending_table_size: d.pending_capacity,
        events: DefenceCounter::ALL
            .iter()
            .map(|c| {
                let v = d.counters.get(*c as usize).copied().unwrap_or(0);
                (c.name().to_owned(), v)
            })
            .collect(),
        source_limited: snapshot
            .outcomes
            .get(Outcome::SourceLimited as usize)
            .copied()
            .unwrap_or(0),
    }
}

fn nat_status(n: &crate::core::snapshot::NatView) -> NatStatus {
    let sweep = n.sweep.as_ref();
    NatStatus {
        capacity: n.capacity,
        entries_ipv4: sweep.map(|s| s.entries_v4),
        entries_ipv6: sweep.map(|s| s.entries_v6),
        connections: sweep.map(|s| s.connections),
        snat_ports_in_use: sweep
            .map(|s| s.ports.iter().map(|(a, n)| (a.to_string(), *n)).collect())
            .unwrap_or_default(),
        events: NatCounter::ALL
            .iter()
            .map(|c| {
                let v = n.counters.get(*c as usize).copied().unwrap_or(0);
                (c.name().to_owned(), v)
            })
            .collect(),
        swept: n.swept,
        forwarded: n.forwarded,
        replies: n.replies,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReloadsStatus {
    pub accepted: u64,
    pub rejected: u64,
    pub last_error: Option<String>,
    pub last_apply_ms: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub address: String,
    /// `None`: any port.
    pub port: Option<u16>,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub hash: HashMode,
    pub fragments: bool,
    pub table_size: u32,
    pub table_fingerprint: String,
    pub all_backends_down: bool,
    pub fail_open: bool,
    pub all_down_episodes: u64,
    pub stats: Stats,
    pub rates: Rates,
    pub healthy_backends: usize,
    pub autoscale: Option<AutoscaleStatus>,
    pub backends: Vec<BackendStatus>,
    /// The VIP's DNS discovery (absent: the file's backends only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryStatus>,
    /// With `[announce]`: whether the VIP is announced, and if not, why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announced: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_announced_because: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryStatus {
    /// `dns web.default.svc.cluster.local` or `srv _http._tcp...`.
    pub source: String,
    pub interval_seconds: f64,
    /// Backends discovered and in force.
    pub backends: usize,
    /// The last answer: its result (records, empty, nxdomain, timeout, servfail, refused,
    /// error, over_cap) and what it said.
    pub last_result: Option<String>,
    pub last_detail: Option<String>,
    pub last_answer_age_seconds: Option<f64>,
    /// Since the last answer that gave (or confirmed) the set in force.
    pub last_good_age_seconds: Option<f64>,
    /// Until the next lookup (0: due or under way).
    pub next_resolution_seconds: f64,
    pub failures_in_a_row: u32,
    /// Since the last answer with records, answers have been empty: for this long.
    pub empty_for_seconds: Option<f64>,
    pub resolutions: BTreeMap<String, u64>,
    pub changes: u64,
    pub added: u64,
    pub removed: u64,
    pub rejected_records: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub new_flows_per_second: f64,
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleStatus {
    pub metric: AutoscaleMetric,
    pub target_per_backend: f64,
    pub tolerance: f64,
    pub window_seconds: f64,
    pub ready_backends: u32,
    pub rate: f64,
    pub desired_backends: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    pub state: BackendState,
    pub health: HealthStatus,
    pub slots: u32,
    pub interface: Option<String>,
    pub mac: Option<String>,
    pub stats: Stats,
    pub rates: Rates,
    /// "file", the discovery that found it ("dns web.default.svc.cluster.local"), or
    /// "removed" (retiring: it keeps its flows for removal_grace).
    #[serde(default)]
    pub source: String,
    /// Flows the connection table remembers for it (under NAT: its open connections), as
    /// of the last walk or sweep. A drained backend is done when this reaches 0 (or, with
    /// direct server return and tunnels, whose table forgets nothing until it is full, when
    /// no packet has come for longer than the clients' idle time).
    #[serde(default)]
    pub remembered_flows: Option<u64>,
    /// Since it last forwarded a packet (since the daemon's first reading, if it has not).
    #[serde(default)]
    pub last_packet_age_seconds: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthStatus {
    pub state: HealthState,
    /// Probes run so far (checked backends only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<u64>,
    #[serde(default)]
    pub last_failure: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    Up,
    Down,
    /// No health checks: always up.
    Unchecked,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Up => "up",
            HealthState::Down => "down",
            HealthState::Unchecked => "unchecked",
        }
    }
}

impl From<TrafficStats> for Stats {
    fn from(s: TrafficStats) -> Stats {
        Stats {
            packets: s.packets,
            bytes: s.bytes,
            new_flows: s.new_flows,
        }
    }
}

impl From<Option<TrafficRates>> for Rates {
    fn from(r: Option<TrafficRates>) -> Rates {
        let r = r.unwrap_or_default();
        Rates {
            new_flows_per_second: r.new_flows,
            packets_per_second: r.packets,
            bytes_per_second: r.bytes,
        }
    }
}

impl StatusDocument {
    pub fn new(snapshot: &Snapshot, attachment: &Attachment) -> StatusDocument {
        StatusDocument {
            interface: attachment.interface.clone(),
            xdp_mode: attachment.xdp_mode.clone(),
            datapath: DatapathStatus {
                adopted: snapshot.adopted.clone(),
                keep_on_exit: snapshot.keep_datapath,
                ..attachment.datapath.clone()
            },
            config: snapshot.config_path.display().to_string(),
            config_generation: snapshot.generation,
            reloads: ReloadsStatus {
                accepted: snapshot.reloads.accepted,
                rejected: snapshot.reloads.rejected,
                last_error: snapshot.reloads.last_error.clone(),
                last_apply_ms: snapshot.reloads.last_apply.map(|d| d.as_secs_f64() * 1e3),
            },
            hash_seed: snapshot.hash_seed,
            conn_table_size: snapshot.conn_table_size,
            conn_table_entries: snapshot.conn_entries,
            vips: snapshot
                .vips
                .iter()
                .map(|v| VipStatus {
                    announced: snapshot.announce.as_ref().map(|_| v.unannounced.is_none()),
                    ..vip_status(v)
                })
                .collect(),
            outcomes: Outcome::ALL
                .iter()
                .map(|o| {
                    let n = snapshot.outcomes.get(*o as usize).copied().unwrap_or(0);
                    (o.name().to_owned(), n)
                })
                .collect(),
            verdicts: xdp_action::NAMES
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    (
                        (*name).to_owned(),
                        snapshot.verdicts.get(i).copied().unwrap_or(0),
                    )
                })
                .collect(),
            nat: nat_status(&snapshot.nat),
            announce: snapshot.announce.as_ref().map(|a| AnnounceStatus {
                table: a.table,
                routes: a.routes.iter().map(ToString::to_string).collect(),
                withdrawn_all: a.withdrawn_all,
                withdrawn: a.withdrawn.clone(),
                awaiting_sync: a.awaiting_sync,
            }),
            sync: snapshot.sync.as_deref().map(sync_status),
            defence: defence_status(snapshot),
        }
    }
}

fn sync_status(s: &crate::sync::SyncStats) -> SyncStatus {
    use std::sync::atomic::Ordering::Relaxed;
    let bulk = match s.bulk() {
        crate::sync::Bulk::NotNeeded => "not_needed".to_owned(),
        crate::sync::Bulk::Waiting => "waiting".to_owned(),
        crate::sync::Bulk::Complete { peer, entries } => {
            format!("complete ({entries} entries from {peer})")
        }
        crate::sync::Bulk::TimedOut => "timed_out".to_owned(),
    };
    SyncStatus {
        listen: s.listen.to_string(),
        bulk,
        entries_sent: s.entries_sent.load(Relaxed),
        messages_sent: s.messages_sent.load(Relaxed),
        send_errors: s.send_errors.load(Relaxed),
        lost: s.lost.load(Relaxed),
        entries_received: s.entries_received.load(Relaxed),
        entries_applied: s.entries_applied.load(Relaxed),
        entries_kept: s.entries_kept.load(Relaxed),
        rejected: s
            .rejections()
            .into_iter()
            .map(|(r, n)| (r.to_owned(), n))
            .collect(),
        bulk_copies_sent: s.bulk_sent.load(Relaxed),
        peers: s
            .peers()
            .into_iter()
            .map(|(address, p)| PeerStatus {
                address: address.to_string(),
                last_message_age_seconds: p.last_heard.map(age),
                lag_seconds: p.lag.map(|d| (d.as_secs_f64() * 1e3).round() / 1e3),
                messages: p.messages,
                entries: p.entries,
            })
            .collect(),
    }
}

fn vip_status(v: &VipView) -> VipStatus {
    VipStatus {
        name: v.name.clone(),
        address: v.address.to_string(),
        port: v.port,
        protocol: v.protocol,
        forwarding: v.forwarding,
        hash: v.hash,
        fragments: v.fragments,
        table_size: v.table_size,
        table_fingerprint: format!("{:016x}", v.fingerprint),
        all_backends_down: v.all_down.active,
        fail_open: v.fail_open,
        all_down_episodes: v.all_down.episodes,
        stats: v.stats.into(),
        rates: v.rates.into(),
        healthy_backends: v.healthy,
        autoscale: v.autoscale.as_ref().map(|(target, state)| AutoscaleStatus {
            metric: target.metric,
            target_per_backend: target.target_per_backend,
            tolerance: target.tolerance,
            window_seconds: target.window.as_secs_f64(),
            ready_backends: state.ready,
            rate: state.rate,
            desired_backends: state.desired,
        }),
        backends: v.backends.iter().map(backend_status).collect(),
        discovery: v.discovery.as_ref().map(discovery_status),
        announced: None,
        not_announced_because: v.unannounced.map(str::to_owned),
    }
}

/// Seconds since `at`, to a tenth.
fn age(at: Instant) -> f64 {
    (at.elapsed().as_secs_f64() * 10.0).round() / 10.0
}

fn discovery_status(d: &DiscoveryView) -> DiscoveryStatus {
    let s = &d.state;
    let now = Instant::now();
    DiscoveryStatus {
        source: d.query.to_string(),
        interval_seconds: d.interval.as_secs_f64(),
        backends: s.backends.len(),
        last_result: s.last.as_ref().map(|l| l.outcome.name().to_owned()),
        last_detail: s.last.as_ref().map(|l| l.detail.clone()),
        last_answer_age_seconds: s.last.as_ref().map(|l| age(l.at)),
        last_good_age_seconds: s.last_good.map(age),
        next_resolution_seconds: if s.in_flight.is_some() {
            0.0
        } else {
            (s.next_due.saturating_duration_since(now).as_secs_f64() * 10.0).round() / 10.0
        },
        failures_in_a_row: s.failures_in_a_row,
        empty_for_seconds: s.empty_since.map(age),
        resolutions: s
            .outcomes
            .iter()
            .map(|(o, n)| (o.name().to_owned(), *n))
            .collect(),
        changes: s.changes,
        added: s.added,
        removed: s.removed,
        rejected_records: s.rejected_records,
    }
}

fn backend_status(b: &BackendView) -> BackendStatus {
    BackendStatus {
        address: b.address.to_string(),
        weight: b.weight,
        state: b.state,
        health: match &b.health {
            Some(t) => HealthStatus {
                state: if t.up {
                    HealthState::Up
                } else {
                    HealthState::Down
                },
                probes: Some(t.probes),
                last_failure: t.last_failure.as_ref().map(ToString::to_string),
            },
            None => HealthStatus {
                state: HealthState::Unchecked,
                probes: None,
                last_failure: None,
            },
        },
        slots: b.slots,
        interface: b.next_hop.as_ref().map(|(i, _)| i.clone()),
        mac: b.next_hop.as_ref().map(|(_, m)| format_mac(m)),
        stats: b.stats.into(),
        rates: b.rates.into(),
        source: b.source.clone(),
        remembered_flows: b.remembered_flows,
        last_packet_age_seconds: b.last_packet.map(age),
    }
}

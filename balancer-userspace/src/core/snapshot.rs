//! An immutable picture of what the daemon is doing, published by the event loop after
//! every change: the API renders it (metrics, status) and never reads the kernel.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use balancer_common::TrafficStats;

use crate::{
    autoscale::TrafficRates,
    config::{Autoscale, BackendSource, Config, Forwarding, HashMode, Protocol},
    core::{
        health::Tracker,
        traffic::{AutoscaleState, Traffic},
    },
    plan::{
        desired::{BackendState, DesiredState, DesiredVip},
        inputs::{BackendKey, NextHops},
    },
};

/// Reload counters and the last rejection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadStats {
    pub accepted: u64,
    pub rejected: u64,
    pub last_error: Option<String>,
    /// Time from reading the file to the maps being written, of the last accepted reload.
    pub last_apply: Option<Duration>,
}

/// Per VIP: is every backend down (whether it fails open is the desired state's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllDownStats {
    pub active: bool,
    /// All down only because the first checks have not concluded yet (not an episode).
    pub awaiting: bool,
    /// Times the VIP entered the all-down state.
    pub episodes: u64,
}

#[derive(Clone, Debug)]
pub struct Snapshot {
    /// When the counters in it were read (`None`: not yet).
    pub counters_at: Option<Instant>,
    pub config_path: PathBuf,
    pub generation: u64,
    pub reloads: ReloadStats,
    pub hash_seed: u32,
    pub conn_table_size: u32,
    /// Flows in the connection table at the last walk.
    pub conn_entries: Option<u64>,
    /// The data plane stays forwarding at exit.
    pub keep_datapath: bool,
    /// Started by adopting a pinned data plane: what was adopted.
    pub adopted: Option<String>,
    pub vips: Vec<VipView>,
    /// Packets per `Outcome`, summed over CPUs.
    pub outcomes: Vec<u64>,
    /// Packets per XDP verdict (indexed like `xdp_action::NAMES`).
    pub verdicts: Vec<u64>,
    pub nat: NatView,
    /// The state tables' defences against floods.
    pub defence: DefenceView,
    /// What is announced (`[announce]`), if anything is.
    pub announce: Option<AnnounceView>,
    /// Connection-table sync (`[sync]`): its live counters, set by the daemon.
    pub sync: Option<std::sync::Arc<crate::sync::SyncStats>>,
}

/// The announced routes and what withholds the others.
#[derive(Clone, Debug)]
pub struct AnnounceView {
    pub table: u32,
    pub routes: Vec<IpAddr>,
    pub withdrawn_all: bool,
    pub withdrawn: Vec<String>,
    pub awaiting_sync: bool,
}

/// The defences: flood mode, the cap, the pending tables, what they did.
#[derive(Clone, Debug, Default)]
pub struct DefenceView {
    /// New flows with state per CPU per second (`[flood] new_flows_per_cpu`).
    pub cap: u32,
    /// Flows each pending table (one per family) holds at most.
    pub pending_capacity: u32,
    /// In flood mode now; how often it started.
    pub flooding: bool,
    pub floods: u64,
    /// Indexed by `balancer_common::defence::DefenceCounter`.
    pub counters: Vec<u64>,
}

/// The NAT tables and what happened in them.
#[derive(Clone, Debug, Default)]
pub struct NatView {
    /// Connections each NAT table (one per family) holds at most.
    pub capacity: u32,
    /// Indexed by `balancer_common::NatCounter`.
    pub counters: Vec<u64>,
    /// The tables as of the last sweep (`None`: not swept yet).
    pub sweep: Option<crate::plan::contents::NatSweep>,
    /// Entries sweeps removed in all (timed out, quarantine passed).
    pub swept: u64,
    /// Replies translated back to clients (packets), summed from the outcomes.
    pub replies: u64,
    /// Client packets translated to backends: the NAT VIPs' forwarded packets.
    pub forwarded: u64,
}

#[derive(Clone, Debug)]
pub struct VipView {
    pub name: String,
    pub address: IpAddr,
    pub port: Option<u16>,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub hash: HashMode,
    pub fragments: bool,
    pub table_size: u32,
    /// Identifies the Maglev table: equal on balancers that choose alike.
    pub fingerprint: u64,
    pub all_down: AllDownStats,
    pub fail_open: bool,
    pub stats: TrafficStats,
    pub rates: Option<TrafficRates>,
    /// Backends taking new flows.
    pub healthy: usize,
    pub autoscale: Option<(Autoscale, AutoscaleState)>,
    pub backends: Vec<BackendView>,
    /// The VIP's DNS discovery, if it discovers.
    pub discovery: Option<DiscoveryView>,
    /// With `[announce]`: why the VIP is not announced (`None`: it is, or nothing is).
    pub unannounced: Option<&'static str>,
}

/// A VIP's discovery as the status shows it.
#[derive(Clone, Debug)]
pub struct DiscoveryView {
    pub query: crate::config::DiscoverQuery,
    pub interval: std::time::Duration,
    pub state: crate::core::discovery::Discovery,
}

#[derive(Clone, Debug)]
pub struct BackendView {
    pub address: IpAddr,
    pub weight: u32,
    pub state: BackendState,
    /// The health checks' verdict; `None` for a backend without checks.
    pub health: Option<Tracker>,
    pub slots: u32,
    /// The egress interface and the next hop's MAC address.
    pub next_hop: Option<(String, [u8; 6])>,
    pub stats: TrafficStats,
    pub rates: Option<TrafficRates>,
    /// Where it comes from: "file", the discovery ("dns web.example"), or "removed".
    pub source: String,
    /// Flows the connection table (and, under NAT, open connections the NAT table) holds for
    /// it, as of the last walk or sweep (`None`: neither yet).
    pub remembered_flows: Option<u64>,
    /// When it last forwarded a packet (as of the readings; the first reading for a backend
    /// that has not forwarded one since the daemon started).
    pub last_packet: Option<Instant>,
}

/// Everything a snapshot is made of.
pub struct Sources<'a> {
    pub config_path: &'a PathBuf,
    pub config: &'a Config,
    pub generation: u64,
    pub reloads: &'a ReloadStats,
    pub keep_datapath: bool,
    pub adopted: &'a Option<String>,
    pub desired: &'a DesiredState,
    pub trackers: &'a HashMap<BackendKey, Tracker>,
    pub next_hops: &'a NextHops,
    pub all_down: &'a HashMap<String, AllDownStats>,
    pub traffic: &'a Traffic,
    pub discovery: &'a BTreeMap<String, crate::core::discovery::Discovery>,
    pub announcement: &'a crate::core::announce::Announcement,
}

pub fn build(s: &Sources) -> Snapshot {
    let counters = &s.traffic.counters;
    let unannounced = s.announcement.reasons(s.config, s.desired);
    Snapshot {
        counters_at: s.traffic.read_at,
        config_path: s.config_path.clone(),
        generation: s.generation,
        reloads: s.reloads.clone(),
        hash_seed: s.config.hash_seed,
        conn_table_size: s.config.conn_table_size,
        conn_entries: s.traffic.conn_entries,
        keep_datapath: s.keep_datapath,
        adopted: s.adopted.clone(),
        vips: s
            .desired
            .vips
            .iter()
            .zip(&s.config.vips)
            .map(|(vip, config)| VipView {
                unannounced: s
                    .config
                    .announce
                    .as_ref()
                    .and(unannounced.get(&vip.name))
                    .map(|r| r.as_str()),
                ..vip_view(s, vip, config)
            })
            .collect(),
        outcomes: counters.outcomes.clone(),
        verdicts: counters.verdicts(),
        nat: nat_view(s),
        defence: DefenceView {
            cap: s.config.flood.new_flows_per_cpu,
            pending_capacity: s.config.flood.pending_table_size,
            flooding: s.traffic.flood.is_some(),
            floods: s.traffic.floods,
            counters: counters.defence.clone(),
        },
        announce: s.config.announce.as_ref().map(|a| AnnounceView {
            table: a.table,
            routes: s.announcement.routes.iter().copied().collect(),
            withdrawn_all: s.announcement.withdrawn_all,
            withdrawn: s.announcement.withdrawn.iter().cloned().collect(),
            awaiting_sync: s.announcement.awaiting_sync,
        }),
        sync: None,
    }
}

fn nat_view(s: &Sources) -> NatView {
    use balancer_common::Outcome;
    let counters = &s.traffic.counters;
    let outcome = |o: Outcome| counters.outcomes.get(o as usize).copied().unwrap_or(0);
    let forwarded = s
        .desired
        .vips
        .iter()
        .filter(|v| v.meta.translates())
        .filter_map(|v| counters.vips.get(&v.meta.vip_id))
        .map(|stats| stats.packets)
        .sum();
    NatView {
        capacity: s.config.nat.table_size,
        counters: counters.nat.clone(),
        sweep: s.traffic.nat_sweep.clone(),
        swept: s.traffic.nat_swept,
        replies: outcome(Outcome::NatReplyTx) + outcome(Outcome::NatReplyRedirect),
        forwarded,
    }
}

fn vip_view(s: &Sources, vip: &DesiredVip, config: &crate::config::Vip) -> VipView {
    let counters = &s.traffic.counters;
    // Where each configured backend comes from, looked up once per backend.
    let sources: HashMap<IpAddr, &BackendSource> = config
        .backends
        .iter()
        .map(|c| (c.address, &c.source))
        .collect();
    VipView {
        name: vip.name.clone(),
        address: config.address,
        port: config.port,
        protocol: config.protocol,
        forwarding: config.forwarding,
        hash: config.hash,
        fragments: config.fragments,
        table_size: vip.meta.table_size,
        fingerprint: vip.fingerprint,
        all_down: s.all_down.get(&vip.name).cloned().unwrap_or_default(),
        fail_open: vip.fail_open,
        stats: counters
            .vips
            .get(&vip.meta.vip_id)
            .copied()
            .unwrap_or_default(),
        rates: s.traffic.vip_rates(&vip.name),
        healthy: vip.healthy(),
        autoscale: config
            .autoscale
            .zip(s.traffic.autoscale.get(&vip.name).cloned()),
        discovery: config.discover.as_ref().and_then(|d| {
            Some(DiscoveryView {
                query: d.query.clone(),
                interval: d.interval,
                state: s.discovery.get(&vip.name)?.clone(),
            })
        }),
        unannounced: None,
        backends: vip
            .backends
            .iter()
            .map(|b| {
                let key = (vip.name.clone(), b.address);
                let source = match sources.get(&b.address) {
                    None => "removed".to_owned(),
                    Some(BackendSource::File) => "file".to_owned(),
                    Some(BackendSource::Discovered) => config
                        .discover
                        .as_ref()
                        .map_or("discovered".to_owned(), |d| d.query.to_string()),
                };
                BackendView {
                    source,
                    remembered_flows: s.traffic.remembered_flows(b.id),
                    last_packet: s.traffic.last_packet.get(&b.id).map(|(_, at)| *at),
                    address: b.address,
                    weight: b.weight,
                    state: b.state,
                    health: s.trackers.get(&key).cloned(),
                    slots: b.slots,
                    next_hop: s
                        .next_hops
                        .get(&b.address)
                        .map(|h| (h.interface.clone(), h.dst_mac)),
                    stats: counters.backends.get(&b.id).copied().unwrap_or_default(),
                    rates: s.traffic.backend_rates(&key),
                }
            })
            .collect(),
    }
}

impl BackendView {
    /// Passes its health checks, or has none.
    pub fn up(&self) -> bool {
        self.health.as_ref().is_none_or(|t| t.up)
    }
}

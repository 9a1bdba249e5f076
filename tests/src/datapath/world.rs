//! The world a datapath test runs in: the real XDP object loaded into the kernel, its maps
//! filled from a config by the daemon's own code (config parser, planner, kernel shell), and
//! the network around it described by name: each backend address has a [`Reach`].
//!
//! This is the only file of the tests that uses the daemon's library (`balancer`). When that
//! library's interface changes, this file changes and the fixtures and the benchmark do not:
//! keep what `World` offers small, and in the tests' own terms.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::Path,
};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use balancer::{
    config::{self, Config, XdpModeSetting},
    maglev::{self, MaglevBackend},
    plan::{
        self,
        contents::MapContents,
        desired::{desired_state, DesiredState, DesiredVip},
        ids::Ids,
        inputs::{BackendKey, NextHop, NextHops},
    },
    shell::dataplane::{Dataplane, LoadOptions},
};
use balancer_common::{
    defence::{SourceBucket, SourceKey},
    hash::vip_flow_hash,
    map_names,
    nat::NatEntry,
    ConnEntry, FlowKey, FlowKeyV4, FlowKeyV6, Outcome, TrafficStats, VipMeta,
};

use super::{LB4, LB6, LB_MAC, ROUTER4, ROUTER6, ROUTER_MAC};

/// How the balancer reaches a backend address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// On the link packets come in on: sent back out of it (XDP_TX).
    Local,
    /// On another interface of the balancer (XDP_REDIRECT).
    OtherInterface,
    /// No next hop is known: the backend is unreachable.
    Unresolvable,
    /// Behind the router on the ingress link, over a path of this MTU. Only tunnels reach it
    /// (direct server return needs the backend on the link).
    Routed { mtu: u32 },
}

/// MTU of the links to local backends and to backends on the other interface.
pub const LINK_MTU: u32 = 1500;

/// Where the world is loaded and what it loads.
#[derive(Clone, Copy, Debug)]
pub struct WorldOptions {
    /// The interface packets come in on. BPF_PROG_TEST_RUN without a context says 1 (`lo`).
    pub ingress_ifindex: u32,
    /// The interface of [`Reach::OtherInterface`] backends, in the network namespace the
    /// world is loaded in (the redirect map resolves it there).
    pub other_ifindex: Option<u32>,
    /// Also load the object's trivial programs (`program_names::{DROP, TX, REFLECT}`), for
    /// measurements. `program_names::PASS` is always loaded.
    pub trivial_programs: bool,
    /// The XDP object to load: the daemon's built-in one, or another revision's build (the
    /// benchmark's baseline) of the same map layout or of layout 1 or 2 (see `apply` and
    /// `remember`).
    pub object: Option<&'static [u8]>,
}

impl Default for WorldOptions {
    fn default() -> Self {
        WorldOptions {
            ingress_ifindex: 1,
            other_ifindex: None,
            trivial_programs: false,
            object: None,
        }
    }
}

/// What the health checks say of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
}

/// What one BPF_PROG_TEST_RUN of the balancer returned.
#[derive(Clone, Debug)]
pub struct Run {
    /// The XDP action (`balancer_common::xdp_action`).
    pub verdict: u32,
    /// The frame as the program left it.
    pub output: Vec<u8>,
}

/// The program's counters, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    /// By backend id.
    pub backends: BTreeMap<u32, TrafficStats>,
    /// By VIP id.
    pub vips: BTreeMap<u32, TrafficStats>,
    /// Indexed by `Outcome`.
    pub outcomes: Vec<u64>,
    /// Indexed by `balancer_common::defence::DefenceCounter`.
    pub defence: Vec<u64>,
}

impl Counters {
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome as usize]
    }

    pub fn defence(&self, counter: balancer_common::defence::DefenceCounter) -> u64 {
        self.defence[counter as usize]
    }
}

/// The outer source address of a VIP's tunnels: `address` with its low `varied_bits` bits
/// replaced per flow by the flow's hash (`balancer_common::tunnel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelSource {
    pub address: IpAddr,
    pub varied_bits: u8,
}

/// The loaded program, its maps filled from a config, and the state the daemon's planner
/// works from (next hops from the reach table, health, id assignments). Dropping it unloads
/// the program and frees the maps.
pub struct World {
    dataplane: Dataplane,
    config: Config,
    reach: HashMap<IpAddr, Reach>,
    hops: NextHops,
    health: HashMap<BackendKey, plan::inputs::Health>,
    ids: Ids,
    /// What the maps hold, and what the planner said of each VIP.
    held: MapContents,
    desired: DesiredState,
}

/// Loads every program of the built-in object into the kernel (the verifier checks each):
/// the balancer and `xdp_pass`, the decapsulating program, the benchmarks' trivial programs.
/// Returns the first refusal, whole.
pub fn load_every_program() -> Result<(), String> {
    let options = LoadOptions {
        hash_seed: 0,
        conn_table_size: balancer::config::MIN_CONN_TABLE_SIZE,
        pending_table_size: balancer::config::MIN_CONN_TABLE_SIZE,
        nat_table_size: balancer::config::MIN_NAT_TABLE_SIZE,
    };
    let error = |e: balancer::shell::dataplane::DataplaneError| {
        let mut text = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text = format!("{text}: {c}");
            cause = c.source();
        }
        text
    };
    Dataplane::load_with_trivial_programs(balancer::PROGRAM, options)
        .and_then(|mut d| d.load_nat())
        .map_err(error)?;
    Dataplane::load_decap().map_err(error)?;
    Ok(())
}

impl World {
    /// Loads the object (through the verifier), and fills its maps from `config` (the TOML of
    /// the daemon's config file) with every backend reached as `reach` says. Every backend the
    /// config names must be in `reach`.
    pub fn load(config: &str, reach: &[(IpAddr, Reach)], options: WorldOptions) -> World {
        let config = parse(config);
        let reach: HashMap<IpAddr, Reach> = reach.iter().copied().collect();
        let hops = reach
            .iter()
            .filter_map(|(&address, &how)| Some((address, next_hop(address, how, options)?)))
            .collect();
        let load = LoadOptions {
            hash_seed: config.hash_seed,
            conn_table_size: config.conn_table_size,
            pending_table_size: config.flood.pending_table_size,
            nat_table_size: config.nat.table_size,
        };
        let object = options.object.unwrap_or(balancer::PROGRAM);
        let dataplane = if options.trivial_programs {
            Dataplane::load_with_trivial_programs(object, load)
        } else {
            Dataplane::load_object(object, load)
        }
        .expect("the XDP object loads and passes the verifier");
        let mut world = World {
            dataplane,
            config,
            reach,
            hops,
            health: HashMap::new(),
            ids: Ids::default(),
            held: MapContents::default(),
            desired: DesiredState::default(),
        };
        world.apply();
        world
    }

    /// Computes the maps' contents from the config, next hops and health (the daemon's
    /// planner) and writes them (the plan from what the maps hold, executed by the daemon's
    /// kernel shell).
    pub fn apply(&mut self) {
        for vip in &self.config.vips {
            for backend in &vip.backends {
                assert!(
                    self.reach.contains_key(&backend.address),
                    "the reach table says nothing of {} (a backend of VIP {:?})",
                    backend.address,
                    vip.name
                );
            }
        }
        let desired = desired_state(&self.config, &[], &self.hops, &self.health, &mut self.ids)
            .expect("the planner accepts the config");
        let mut plan = plan::ops::plan(&self.held, &desired.maps);
        // An object of an earlier layout (the benchmark's baseline): without the prefilter
        // (1) or the VIP slots (1 and 2). Its connection entries ignore the flow hash.
        // Nor the NAT maps (1 to 3).
        let (filter, slots, nat) = (
            self.dataplane.has_map(map_names::VIP_FILTER),
            self.dataplane.has_map(map_names::VIP_SLOTS),
            self.dataplane.has_map(map_names::NAT_VIPS),
        );
        plan.ops.retain(|op| {
            use plan::ops::MapOp::*;
            match op {
                SetFilterWord(..) => filter,
                SetVipSlot(..) | ClearVipSlot(..) => slots,
                SetNatSettings(..) | SetNatVip(..) | SetNatFilterWord(..) => nat,
                _ => true,
            }
        });
        self.dataplane.execute(&plan).expect("maps written");
        self.held = desired.maps.clone();
        self.desired = desired;
    }

    /// Replaces the config (the whole TOML text) and applies it, as a reload does: ids of the
    /// VIPs and backends that stay are kept.
    pub fn set_config(&mut self, config: &str) {
        self.config = parse(config);
        self.apply();
    }

    /// Back to a world as `load` makes it, without loading the program again (each load is a
    /// run of the verifier, seconds under emulation): `config` in force, every backend up,
    /// the connection and NAT tables emptied. Counters and id assignments carry on; the
    /// checks compare counters before and after a packet, and ids are asked of the world.
    pub fn reset(&mut self, config: &str) {
        self.health.clear();
        self.set_config(config);
        self.clear::<FlowKeyV4, ConnEntry>(map_names::CONN_TABLE_V4);
        self.clear::<FlowKeyV6, ConnEntry>(map_names::CONN_TABLE_V6);
        self.clear::<FlowKeyV4, NatEntry>(map_names::NAT_V4);
        self.clear::<FlowKeyV6, NatEntry>(map_names::NAT_V6);
        self.clear::<FlowKeyV4, ConnEntry>(map_names::PENDING_V4);
        self.clear::<FlowKeyV6, ConnEntry>(map_names::PENDING_V6);
        self.clear::<FlowKeyV4, NatEntry>(map_names::NAT_PENDING_V4);
        self.clear::<FlowKeyV6, NatEntry>(map_names::NAT_PENDING_V6);
        self.clear::<SourceKey, SourceBucket>(map_names::SOURCE_RATES);
        let _ = self.sync_events();
    }

    /// Removes every entry of a hash map.
    fn clear<K: aya::Pod, V: aya::Pod>(&mut self, name: &'static str) {
        let map = self
            .dataplane
            .raw_map_mut(name)
            .expect("a map of the object");
        let mut table: aya::maps::HashMap<&mut aya::maps::MapData, K, V> =
            map.try_into().expect("a hash map");
        let keys: Vec<K> = table.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = table.remove(&key);
        }
    }

    /// Sets what the health checks say of `backend` of `vip`, and applies it.
    pub fn set_health(&mut self, vip: &str, backend: IpAddr, health: Health) {
        let health = match health {
            Health::Up => plan::inputs::Health::Up,
            Health::Down => plan::inputs::Health::Down,
        };
        self.health.insert((vip.to_owned(), backend), health);
        self.apply();
    }

    /// Runs `frame` through the balancer once (BPF_PROG_TEST_RUN, ingress `lo`).
    pub fn run(&self, frame: &[u8]) -> Run {
        let mut output = vec![0u8; frame.len() + 256];
        let result = self
            .dataplane
            .program()
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut output),
                ..TestRunOptions::new()
            })
            .expect("BPF_PROG_TEST_RUN");
        output.truncate(result.data_size_out as usize);
        Run {
            verdict: result.return_value,
            output,
        }
    }

    /// The counters of every VIP and backend of the config, and of every outcome.
    pub fn counters(&self) -> Counters {
        let backends: Vec<u32> = self.held.backends.keys().copied().collect();
        let vips: Vec<u32> = self.held.tables.keys().copied().collect();
        let c = self
            .dataplane
            .counters(&backends, &vips)
            .expect("counters read");
        Counters {
            backends: c.backends,
            vips: c.vips,
            outcomes: c.outcomes,
            defence: c.defence,
        }
    }

    /// Flows in the connection tables (both families).
    pub fn conn_count(&self) -> usize {
        self.dataplane
            .conn_count()
            .expect("connection tables read")
            .0
    }

    /// The NAT counters, indexed by `balancer_common::NatCounter`.
    pub fn nat_counters(&self) -> Vec<u64> {
        self.dataplane.nat_counters().expect("NAT counters read")
    }

    /// The NAT entry that packets of `flow` find as they arrive: a client's (`reply` false)
    /// or a backend's reply.
    pub fn nat_entry(&self, flow: &FlowKey, reply: bool) -> Option<NatEntry> {
        self.dataplane
            .nat_lookup(flow, reply)
            .expect("NAT table read")
    }

    /// Like [`World::nat_entry`], in the pending tables (a TCP connection before its client
    /// acknowledged the backend's SYN-ACK).
    pub fn nat_pending_entry(&self, flow: &FlowKey, reply: bool) -> Option<NatEntry> {
        self.dataplane
            .nat_pending_lookup(flow, reply)
            .expect("NAT pending table read")
    }

    /// The connection's entry wherever it is: the NAT tables, else the pending ones.
    pub fn nat_entry_anywhere(&self, flow: &FlowKey, reply: bool) -> Option<NatEntry> {
        self.nat_entry(flow, reply)
            .or_else(|| self.nat_pending_entry(flow, reply))
    }

    /// Every entry of the NAT tables.
    pub fn nat_entries(&self) -> usize {
        self.dataplane.nat_entries().expect("NAT tables read").len()
    }

    /// Every entry of the NAT pending tables.
    pub fn nat_pending_entries(&self) -> usize {
        self.dataplane
            .nat_pending_entries()
            .expect("NAT pending tables read")
            .len()
    }

    /// The new-flow decisions the program handed to the sync since the last call (the
    /// `SYNC_EVENTS` ring, drained).
    pub fn sync_events(&mut self) -> Vec<balancer_common::SyncEvent> {
        let map = self
            .dataplane
            .raw_map_mut(map_names::SYNC_EVENTS)
            .expect("SYNC_EVENTS");
        let mut ring: aya::maps::RingBuf<&mut aya::maps::MapData> =
            map.try_into().expect("a ring buffer");
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(
                item.len(),
                std::mem::size_of::<balancer_common::SyncEvent>()
            );
            // SAFETY: a whole `SyncEvent`, written by the program; read unaligned.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
        }
        events
    }

    /// The backend id the connection table holds for `flow`.
    pub fn conn(&self, flow: &FlowKey) -> Option<u32> {
        self.dataplane
            .conn_lookup(flow)
            .expect("connection table read")
    }

    /// The backend id the pending tables hold for `flow` (a SYN placed, nothing since).
    pub fn pending(&self, flow: &FlowKey) -> Option<u32> {
        self.dataplane
            .pending_lookup(flow)
            .expect("pending table read")
    }

    /// Remembers `flow` on `backend` of `vip` in the connection table, as if an earlier packet
    /// of the flow had been placed there.
    pub fn remember(&mut self, vip: &str, flow: &FlowKey, backend: IpAddr) {
        let entry = ConnEntry {
            backend_id: self.backend_id(vip, backend),
            flow_hash: vip_flow_hash(&self.vip_meta(vip), flow, self.hash_seed()),
        };
        if !self.dataplane.has_map(map_names::CONN_TABLE_V4) {
            // An object of layout 1 or 2 (the benchmark's baseline): one table of FlowKeys.
            let map = self
                .dataplane
                .raw_map_mut("CONN_TABLE")
                .expect("CONN_TABLE");
            let mut table: aya::maps::HashMap<_, FlowKey, ConnEntry> =
                map.try_into().expect("an LRU hash map");
            table
                .insert(flow, entry, 0)
                .expect("connection table written");
            return;
        }
        self.dataplane
            .conn_insert(flow, entry)
            .expect("connection table written");
    }

    /// The backend the VIP's Maglev table names for a new flow, hashed as the VIP hashes
    /// (`balancer_common::hash::vip_flow_hash`).
    pub fn table_choice(&self, vip: &str, flow: &FlowKey) -> IpAddr {
        let hash = vip_flow_hash(&self.vip_meta(vip), flow, self.hash_seed());
        self.table_owner(vip, hash)
    }

    /// The backend owning the slot of the VIP's Maglev table that `hash` falls in (the hash
    /// modulo the table's size).
    pub fn table_owner(&self, vip: &str, hash: u32) -> IpAddr {
        let v = self.planned(vip);
        let id = v.table[(hash % v.meta.table_size) as usize];
        v.backends
            .iter()
            .find(|b| b.id == id)
            .unwrap_or_else(|| panic!("slot of VIP {vip:?} names no backend (id {id})"))
            .address
    }

    /// The VIP's entry as applied to the maps (its id, table size, forwarding and flags).
    pub fn vip_meta(&self, vip: &str) -> VipMeta {
        self.planned(vip).meta
    }

    fn planned(&self, vip: &str) -> &DesiredVip {
        self.desired
            .vips
            .iter()
            .find(|v| v.name == vip)
            .unwrap_or_else(|| panic!("no VIP {vip:?} applied"))
    }

    pub fn vip_id(&self, vip: &str) -> u32 {
        self.ids
            .vip(vip)
            .unwrap_or_else(|| panic!("no VIP {vip:?} configured"))
    }

    pub fn backend_id(&self, vip: &str, backend: IpAddr) -> u32 {
        self.ids
            .backend(&(vip.to_owned(), backend))
            .unwrap_or_else(|| panic!("no backend {backend} of VIP {vip:?} configured"))
    }

    /// The seed of every flow hash (the config's `hash_seed`, loaded into the program).
    pub fn hash_seed(&self) -> u32 {
        self.config.hash_seed
    }

    /// The MAC address frames to `backend` are sent to: the backend's own, or the router's for
    /// a routed backend.
    pub fn neighbour_mac(&self, backend: IpAddr) -> [u8; 6] {
        match self.reach[&backend] {
            Reach::Routed { .. } => ROUTER_MAC,
            _ => backend_mac(backend),
        }
    }

    /// The outer source of tunnels from `vip` to `backend`, before the flow varies it: the
    /// VIP's configured tunnel source for the backend's family, or else the balancer's own
    /// address, fixed.
    pub fn tunnel_source(&self, vip: &str, backend: IpAddr) -> TunnelSource {
        let v = self
            .config
            .vips
            .iter()
            .find(|v| v.name == vip)
            .unwrap_or_else(|| panic!("no VIP {vip:?} configured"));
        let configured = if backend.is_ipv4() {
            v.tunnel_source_v4
        } else {
            v.tunnel_source_v6
        };
        match configured {
            Some(s) => TunnelSource {
                address: s.address,
                varied_bits: s.varied_bits,
            },
            None => TunnelSource {
                address: own_address(backend),
                varied_bits: 0,
            },
        }
    }

    /// A loaded program of the object by name (`balancer_common::program_names`), e.g. to
    /// measure it with BPF_PROG_TEST_RUN.
    pub fn program(&self, name: &'static str) -> &Xdp {
        self.dataplane.program_named(name)
    }

    /// Attaches a loaded program of the object to `interface` (of the caller's network
    /// namespace) in native mode, until the world is dropped.
    pub fn attach(&mut self, program: &'static str, interface: &str) {
        self.dataplane
            .attach_program(program, interface, XdpModeSetting::Native)
            .unwrap_or_else(|e| panic!("attaching {program} to {interface}: {e}"));
    }

    /// Kernel memory of every map, by name (the Maglev tables summed as `maglev tables`).
    pub fn map_memory(&self) -> Vec<(String, u64)> {
        self.dataplane.memory().expect("map memory read")
    }
}

/// Backends (address, weight) made ready for the daemon's Maglev table builder, so that a
/// measurement of the builder measures the build alone.
pub struct MaglevBackends(Vec<MaglevBackend>);

impl MaglevBackends {
    pub fn new(backends: &[(IpAddr, u32)]) -> Self {
        MaglevBackends(
            backends
                .iter()
                .map(|&(address, weight)| MaglevBackend { address, weight })
                .collect(),
        )
    }

    /// Builds a table of `size` slots; returns its length.
    pub fn build_table(&self, size: u32, seed: u32) -> usize {
        maglev::build(&self.0, size, seed).len()
    }
}

fn parse(text: &str) -> Config {
    config::parse(Path::new("world.toml"), text)
        .unwrap_or_else(|e| panic!("the world's config does not parse: {e}"))
}

/// The next hop the reach table implies (none for an unresolvable backend).
fn next_hop(address: IpAddr, reach: Reach, options: WorldOptions) -> Option<NextHop> {
    let on_link = |ifindex: u32, interface: &str| NextHop {
        ifindex,
        interface: interface.to_owned(),
        src_mac: LB_MAC,
        dst_mac: backend_mac(address),
        gateway: None,
        mtu: LINK_MTU,
        source: Some(own_address(address)),
    };
    match reach {
        Reach::Local => Some(on_link(options.ingress_ifindex, "ingress")),
        Reach::OtherInterface => {
            let ifindex = options.other_ifindex.unwrap_or_else(|| {
                panic!("{address} is on another interface, but the world has none (WorldOptions::other_ifindex)")
            });
            Some(on_link(ifindex, "other"))
        }
        Reach::Unresolvable => None,
        Reach::Routed { mtu } => Some(NextHop {
            dst_mac: ROUTER_MAC,
            gateway: Some(match address {
                IpAddr::V4(_) => IpAddr::V4(ROUTER4),
                IpAddr::V6(_) => IpAddr::V6(ROUTER6),
            }),
            mtu,
            ..on_link(options.ingress_ifindex, "ingress")
        }),
    }
}

/// The balancer's own address of `peer`'s family.
fn own_address(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => IpAddr::V4(LB4),
        IpAddr::V6(_) => IpAddr::V6(LB6),
    }
}

/// A backend's MAC address: 02:be:00:00 and the last two bytes of its address.
fn backend_mac(address: IpAddr) -> [u8; 6] {
    let [a, b] = match address {
        IpAddr::V4(a) => [a.octets()[2], a.octets()[3]],
        IpAddr::V6(a) => [a.octets()[14], a.octets()[15]],
    };
    [0x02, 0xbe, 0, 0, a, b]
}

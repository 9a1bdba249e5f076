//! The map plan's order invariants, checked as properties: random pairs of states (and random
//! sequences of configs through the real planner), each plan applied step by step to a model
//! of the kernel's maps, and after every single step no packet can meet a half state.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::Path,
};

use balancer_common::defence::{FloodSettings, SourceLimit};
use balancer_common::{
    hash::vip_filter_bit,
    nat::{NatSettings, NatVip},
    Backend, VipKey, VipMeta, VipSlot, BACKEND_F_DOWN, BACKEND_F_DRAINING, BACKEND_F_VALID,
    FORWARD_NAT, NO_BACKEND, VIP_F_ADDRESS, VIP_F_FRAGMENTS_ONLY,
};

use super::*;
use crate::{
    config::{self, Config, Vip},
    plan::{
        contents::{MapContents, Table},
        desired::desired_state,
        ids::Ids,
        inputs::{BackendKey, Health, NextHop, NextHops},
    },
};

/// The maps as the kernel holds them, operation by operation.
#[derive(Default)]
struct Kernel {
    keys: HashMap<VipKey, VipMeta>,
    backends: BTreeMap<u32, Backend>,
    /// The table as planned, and as filled (padded).
    tables: BTreeMap<u32, (Table, Vec<u32>)>,
    egress: BTreeSet<u32>,
    zeroed_backends: BTreeSet<u32>,
    /// The prefilter's words.
    filter: BTreeMap<u32, u64>,
    /// The VIP slots.
    slots: BTreeMap<u32, VipSlot>,
    /// NAT: the timeouts, the VIPs' translations, the reply filter.
    nat_settings: NatSettings,
    nat_vips: BTreeMap<u32, NatVip>,
    nat_filter: BTreeMap<u32, u64>,
    /// The defences: the flood cap, the VIPs' source limits.
    flood: FloodSettings,
    source_limits: BTreeMap<u32, SourceLimit>,
}

impl Kernel {
    fn holding(contents: &MapContents) -> Kernel {
        Kernel {
            keys: contents.keys.iter().copied().collect(),
            backends: contents.backends.clone(),
            tables: contents
                .tables
                .iter()
                .map(|(id, t)| (*id, (t.clone(), t.to_vec())))
                .collect(),
            egress: contents.egress.clone(),
            zeroed_backends: BTreeSet::new(),
            filter: filter_words(&contents.keys),
            slots: vip_slots(&contents.keys),
            nat_settings: contents.nat.settings,
            nat_vips: contents.nat.vips.clone(),
            nat_filter: nat_filter_words(contents),
            flood: contents.defence.flood,
            source_limits: contents.defence.limits.clone(),
        }
    }

    fn apply(&mut self, op: &MapOp) {
        match op {
            MapOp::ZeroBackendStats(id) => {
                self.zeroed_backends.insert(*id);
            }
            MapOp::ZeroVipStats(_) => {}
            MapOp::AddEgress(i) => {
                self.egress.insert(*i);
            }
            MapOp::SetBackend(id, entry) => {
                self.backends.insert(*id, *entry);
            }
            MapOp::RemoveVipKey(key) => {
                self.keys.remove(key);
            }
            MapOp::SetFilterWord(word, bits) => {
                self.filter.insert(*word, *bits);
            }
            MapOp::SwapTable {
                vip_id,
                slots,
                fill,
            } => {
                let filled = (0..*fill as usize)
                    .map(|i| slots[i % slots.len()])
                    .collect();
                self.tables.insert(*vip_id, (slots.clone(), filled));
            }
            MapOp::SetVipSlot(id, slot) => {
                if let Some(held) = self.slots.get(id) {
                    assert_eq!(
                        held.key, slot.key,
                        "slot {id}'s key overwritten in place (a reader could see a mix)"
                    );
                }
                self.slots.insert(*id, *slot);
            }
            MapOp::ClearVipSlot(id) => {
                self.slots.remove(id);
            }
            MapOp::SetVipKey(key, meta) => {
                self.keys.insert(*key, *meta);
            }
            MapOp::ClearTable(id) => {
                self.tables.remove(id);
            }
            MapOp::ClearBackend(id) => {
                self.backends.remove(id);
            }
            MapOp::RemoveEgress(i) => {
                self.egress.remove(i);
            }
            MapOp::SetNatSettings(settings) => self.nat_settings = *settings,
            MapOp::SetNatVip(id, vip) => {
                self.nat_vips.insert(*id, *vip);
            }
            MapOp::SetNatFilterWord(word, bits) => {
                self.nat_filter.insert(*word, *bits);
            }
            MapOp::SetFloodSettings(settings) => self.flood = *settings,
            MapOp::SetSourceLimit(id, limit) => {
                self.source_limits.insert(*id, *limit);
            }
        }
    }

    /// NAT: a key of a NAT VIP leads to the VIP's translation (the old or the new one) and
    /// to timeouts, and every backend its table names has its reply filter bit set.
    fn check_nat(&self, held: &MapContents, desired: &MapContents, step: &str) {
        for meta in self
            .keys
            .values()
            .filter(|m| m.translates() && !m.is_address())
        {
            let id = meta.vip_id;
            let vip = self.nat_vips.get(&id);
            assert!(
                vip.is_some()
                    && (held.nat.vips.get(&id) == vip || desired.nat.vips.get(&id) == vip),
                "{step}: NAT VIP {id}'s key without its translation"
            );
            assert_ne!(
                self.nat_settings,
                NatSettings::default(),
                "{step}: NAT VIP {id}'s key before the timeouts"
            );
            let Some((_, filled)) = self.tables.get(&id) else {
                continue;
            };
            for backend in filled.iter().filter_map(|b| self.backends.get(b)) {
                let bit = vip_filter_bit(&backend.addr, backend.family);
                let word = self.nat_filter.get(&(bit >> 6)).copied().unwrap_or(0);
                assert!(
                    word & (1 << (bit & 63)) != 0,
                    "{step}: a backend of NAT VIP {id} is behind a clear reply filter bit"
                );
            }
        }
    }

    /// A key or slot that flags a source limit leads to one (the old or the new).
    fn check_defence(&self, held: &MapContents, desired: &MapContents, step: &str) {
        let metas = self
            .keys
            .values()
            .chain(self.slots.values().map(|s| &s.meta));
        for meta in metas.filter(|m| m.limits_sources()) {
            let limit = self.source_limits.get(&meta.vip_id);
            let known = [held, desired]
                .iter()
                .any(|c| c.defence.limits.get(&meta.vip_id) == limit);
            assert!(
                limit.is_some() && known,
                "{step}: VIP {} flags a source limit the map does not hold",
                meta.vip_id
            );
        }
    }

    /// What a packet can meet now is either the old state or the new one, never a mix.
    fn check(&self, held: &MapContents, desired: &MapContents, step: &str) {
        self.check_nat(held, desired, step);
        self.check_defence(held, desired, step);
        for key in self.keys.keys() {
            let bit = vip_filter_bit(&key.addr, key.family);
            let word = self.filter.get(&(bit >> 6)).copied().unwrap_or(0);
            assert!(
                word & (1 << (bit & 63)) != 0,
                "{step}: key {key:?} is behind a clear prefilter bit"
            );
        }
        for (key, meta) in &self.keys {
            assert!(
                held.meta(key) == Some(meta) || desired.meta(key) == Some(meta),
                "{step}: key {key:?} leads to {meta:?}, neither the old nor the new meta"
            );
            if meta.is_address() {
                continue;
            }
            let (_, filled) = self.tables.get(&meta.vip_id).unwrap_or_else(|| {
                panic!(
                    "{step}: key {key:?} leads to VIP {} without a table",
                    meta.vip_id
                )
            });
            if filled.is_empty() {
                // An adopted table the plan has not rewritten yet: its slots are whatever
                // the previous daemon wrote, which was consistent then.
                continue;
            }
            assert!(
                filled.len() >= meta.table_size as usize,
                "{step}: VIP {} hashes over {} slots of a table of {}",
                meta.vip_id,
                meta.table_size,
                filled.len()
            );
            for &id in &filled[..meta.table_size as usize] {
                if id == NO_BACKEND {
                    continue;
                }
                let b = self.backends.get(&id).unwrap_or_else(|| {
                    panic!(
                        "{step}: VIP {}'s table names backend {id}, which the maps lack",
                        meta.vip_id
                    )
                });
                assert!(b.is_valid(), "{step}: backend {id} is not valid");
                assert_eq!(b.vip_id, meta.vip_id, "{step}: backend {id} of another VIP");
                assert!(
                    b.ifindex == 0 || self.egress.contains(&b.ifindex),
                    "{step}: backend {id} leaves through {}, not in the device map",
                    b.ifindex
                );
            }
        }
        let slots_of = |c: &MapContents| vip_slots(&c.keys);
        for (id, slot) in &self.slots {
            assert!(
                slots_of(held).get(id) == Some(slot) || slots_of(desired).get(id) == Some(slot),
                "{step}: VIP {id}'s slot {slot:?} is neither the old nor the new one"
            );
        }
        for (id, (slots, _)) in &self.tables {
            assert!(
                held.tables.get(id) == Some(slots) || desired.tables.get(id) == Some(slots),
                "{step}: VIP {id}'s table is neither the old nor the new one"
            );
        }
        for id in self.backends.keys() {
            if !held.backends.contains_key(id) {
                assert!(
                    self.zeroed_backends.contains(id),
                    "{step}: backend {id} written before its counters were zeroed"
                );
            }
        }
    }

    fn assert_holds(&self, desired: &MapContents, case: &str) {
        let keys: HashMap<VipKey, VipMeta> = desired.keys.iter().copied().collect();
        assert_eq!(self.keys, keys, "{case}: keys");
        assert_eq!(self.backends, desired.backends, "{case}: backends");
        let tables: BTreeMap<u32, Table> = self
            .tables
            .iter()
            .map(|(id, (t, _))| (*id, t.clone()))
            .collect();
        assert_eq!(tables, desired.tables, "{case}: tables");
        assert_eq!(self.egress, desired.egress, "{case}: egress");
        let filter: BTreeMap<u32, u64> = self
            .filter
            .iter()
            .filter(|(_, bits)| **bits != 0)
            .map(|(w, b)| (*w, *b))
            .collect();
        assert_eq!(filter, filter_words(&desired.keys), "{case}: prefilter");
        assert_eq!(self.slots, vip_slots(&desired.keys), "{case}: slots");
        assert_eq!(
            self.nat_settings, desired.nat.settings,
            "{case}: NAT settings"
        );
        for (id, vip) in &desired.nat.vips {
            assert_eq!(self.nat_vips.get(id), Some(vip), "{case}: NAT VIP {id}");
        }
        let nat_filter: BTreeMap<u32, u64> = self
            .nat_filter
            .iter()
            .filter(|(_, bits)| **bits != 0)
            .map(|(w, b)| (*w, *b))
            .collect();
        assert_eq!(nat_filter, nat_filter_words(desired), "{case}: NAT filter");
        assert_eq!(self.flood, desired.defence.flood, "{case}: flood cap");
        for (id, limit) in &desired.defence.limits {
            let held = self.source_limits.get(id);
            assert_eq!(held, Some(limit), "{case}: source limit {id}");
        }
    }
}

/// Applies `plan` to `kernel` step by step, checking after each step, and then that the maps
/// hold `desired`.
fn run_plan(
    kernel: &mut Kernel,
    plan: &MapPlan,
    held: &MapContents,
    desired: &MapContents,
    case: &str,
) {
    kernel.check(held, desired, &format!("{case}, before the plan"));
    for (i, op) in plan.ops.iter().enumerate() {
        kernel.apply(op);
        kernel.check(held, desired, &format!("{case}, after step {i} {op:?}"));
    }
    kernel.assert_holds(desired, case);
}

const VIP_IDS: u32 = 6;
const BACKEND_IDS: u32 = 24;

/// A random but consistent state: every key leads to a table whose slots name live backends
/// of its VIP. `owners[id]` is the VIP a backend id belongs to (the same in both states of a
/// pair: the planner's precondition).
fn random_state(rng: &mut fastrand::Rng, owners: &[u32]) -> MapContents {
    let mut pool: Vec<VipKey> = (0..10u8)
        .map(|i| VipKey {
            addr: [10, 0, i % 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: (80 + u16::from(i)).to_be(),
            proto: 6,
            family: 4,
        })
        .collect();
    rng.shuffle(&mut pool);
    let mut state = MapContents::default();
    // The planner always writes the timeouts (from the config or its defaults).
    state.nat.settings = NatSettings {
        syn_ns: 60,
        established_ns: [3600, 7200][rng.usize(..2)],
        closing_ns: 10,
        udp_ns: 60,
        quarantine_ns: 60,
    };
    for vip_id in 0..VIP_IDS {
        if !rng.bool() {
            continue;
        }
        let size = [5u32, 7, 11][rng.usize(..3)];
        let nat = rng.u8(..10) < 3;
        let meta = VipMeta {
            vip_id,
            table_size: size,
            forwarding: if nat { FORWARD_NAT } else { 0 },
            ..VipMeta::default()
        };
        if nat {
            state.nat.vips.insert(vip_id, random_nat_vip(rng));
        }
        let Some(key) = pool.pop() else { break };
        state.keys.push((key, meta));
        if rng.u8(..10) < 3 {
            if let Some(key) = pool.pop() {
                let flags = if rng.bool() {
                    VIP_F_FRAGMENTS_ONLY
                } else {
                    VIP_F_ADDRESS
                };
                let table_size = if flags == VIP_F_ADDRESS { 0 } else { size };
                state.keys.push((
                    key,
                    VipMeta {
                        flags,
                        table_size,
                        ..meta
                    },
                ));
            }
        }
        let mut live = Vec::new();
        for id in 0..BACKEND_IDS {
            if owners[id as usize] != vip_id || rng.u8(..10) >= 6 {
                continue;
            }
            let entry = random_backend(rng, vip_id, id);
            if entry.flags == BACKEND_F_VALID {
                live.push(id);
            }
            if entry.ifindex != 0 {
                state.egress.insert(entry.ifindex);
            }
            state.backends.insert(id, entry);
        }
        let mut table = Vec::new();
        for _ in 0..size {
            table.push(if live.is_empty() {
                NO_BACKEND
            } else {
                live[rng.usize(..live.len())]
            });
        }
        state.tables.insert(vip_id, Table::from(table));
    }
    state
}

fn random_nat_vip(rng: &mut fastrand::Rng) -> NatVip {
    NatVip {
        snat_count: 1,
        port_min: 1024,
        port_max: [2000, 3000][rng.usize(..2)],
        ..NatVip::default()
    }
}

/// A backend entry of id `id`: its address follows from the id (a backend id names the same
/// backend in both states of a pair), the rest is random.
fn random_backend(rng: &mut fastrand::Rng, vip_id: u32, id: u32) -> Backend {
    let ifindex = rng.u32(0..4);
    let mut flags = BACKEND_F_VALID;
    match rng.u8(..10) {
        _ if ifindex == 0 => flags |= BACKEND_F_DOWN,
        0 | 1 => flags |= BACKEND_F_DOWN,
        2 => flags |= BACKEND_F_DRAINING,
        _ => {}
    }
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&[10, 1, 0, id as u8]);
    Backend {
        vip_id,
        ifindex,
        flags,
        dst_mac: [2, 0, 0, 0, 0, rng.u8(..3)],
        addr,
        family: 4,
        ..Backend::default()
    }
}

/// The maps as a daemon adopting them records them: tables not known.
fn adopted(contents: &MapContents) -> MapContents {
    MapContents {
        tables: contents
            .tables
            .keys()
            .map(|&id| (id, Table::from(Vec::new())))
            .collect(),
        ..contents.clone()
    }
}

#[test]
fn random_pairs_of_states_never_expose_a_half_state() {
    for seed in 0..1000u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let owners: Vec<u32> = (0..BACKEND_IDS).map(|_| rng.u32(..VIP_IDS)).collect();
        let held = random_state(&mut rng, &owners);
        let desired = random_state(&mut rng, &owners);
        let case = format!("seed {seed}");
        let mut kernel = Kernel::holding(&held);
        run_plan(&mut kernel, &plan(&held, &desired), &held, &desired, &case);
        // Adopted: the same kernel, known less well.
        let mut kernel = Kernel::holding(&held);
        let recorded = adopted(&held);
        run_plan(
            &mut kernel,
            &plan(&recorded, &desired),
            &held,
            &desired,
            &format!("{case}, adopted"),
        );
        // After a failure: everything written again.
        let mut kernel = Kernel::holding(&held);
        run_plan(
            &mut kernel,
            &rewrite_all(&held, &desired),
            &held,
            &desired,
            &format!("{case}, rewrite"),
        );
    }
}

#[test]
fn the_same_state_needs_no_operation() {
    let mut rng = fastrand::Rng::with_seed(7);
    let owners: Vec<u32> = (0..BACKEND_IDS).map(|_| rng.u32(..VIP_IDS)).collect();
    let state = random_state(&mut rng, &owners);
    assert!(plan(&state, &state).is_empty());
    assert!(!rewrite_all(&state, &state).is_empty());
}

#[test]
fn a_table_that_shrinks_is_padded_while_the_old_key_can_see_it() {
    let key = VipKey::default();
    let meta = |size| VipMeta {
        vip_id: 1,
        table_size: size,
        ..VipMeta::default()
    };
    let backend = Backend {
        vip_id: 1,
        flags: BACKEND_F_VALID,
        ..Backend::default()
    };
    let state = |size: u32| MapContents {
        keys: vec![(key, meta(size))],
        backends: BTreeMap::from([(3, backend)]),
        tables: BTreeMap::from([(1, Table::from(vec![3; size as usize]))]),
        egress: BTreeSet::new(),
        nat: Default::default(),
        defence: Default::default(),
    };
    let (big, small) = (state(11), state(5));
    let shrink = plan(&big, &small);
    assert_eq!(
        shrink.ops,
        [
            MapOp::SwapTable {
                vip_id: 1,
                slots: small.tables[&1].clone(),
                fill: 11
            },
            MapOp::SetVipSlot(1, VipSlot { key, meta: meta(5) }),
            MapOp::SetVipKey(key, meta(5)),
        ]
    );
    let mut kernel = Kernel::holding(&big);
    run_plan(&mut kernel, &shrink, &big, &small, "shrink");
    let grow = plan(&small, &big);
    assert!(matches!(grow.ops[0], MapOp::SwapTable { fill: 11, .. }));
}

#[test]
fn a_slot_whose_key_changes_is_emptied_after_the_old_key_and_written_before_the_new() {
    let key = |port: u16| VipKey {
        addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        port: port.to_be(),
        proto: 6,
        family: 4,
    };
    let meta = VipMeta {
        vip_id: 2,
        table_size: 5,
        ..VipMeta::default()
    };
    let state = |port| MapContents {
        keys: vec![(key(port), meta)],
        tables: BTreeMap::from([(2, Table::from(vec![NO_BACKEND; 5]))]),
        ..MapContents::default()
    };
    let ops = plan(&state(80), &state(8080)).ops;
    let at = |wanted: &MapOp| ops.iter().position(|op| op == wanted).unwrap();
    let slot = VipSlot {
        key: key(8080),
        meta,
    };
    assert!(at(&MapOp::RemoveVipKey(key(80))) < at(&MapOp::ClearVipSlot(2)));
    assert!(at(&MapOp::ClearVipSlot(2)) < at(&MapOp::SetVipSlot(2, slot)));
    assert!(at(&MapOp::SetVipSlot(2, slot)) < at(&MapOp::SetVipKey(key(8080), meta)));
    // A VIP removed: its slot emptied after its key.
    let ops = plan(&state(80), &MapContents::default()).ops;
    let at = |wanted: &MapOp| ops.iter().position(|op| op == wanted).unwrap();
    assert!(at(&MapOp::RemoveVipKey(key(80))) < at(&MapOp::ClearVipSlot(2)));
}

// ------------------------------------------------------------------------------------------
// The real planner: random sequences of configs, next hops and health.

fn template() -> Config {
    let text = "[balancer]\nremoval_grace = \"1m\"\n[[vip]]\nname = \"t\"\naddress = \"192.0.2.1\"\nport = 80\n\
                protocol = \"tcp\"\nforwarding = \"dsr\"\ntable_size = 13\nbackends = [{ address = \"10.0.0.1\" }]\n";
    config::parse(Path::new("template.toml"), text).unwrap()
}

fn random_config(rng: &mut fastrand::Rng, base: &Config) -> Config {
    let mut config = Config {
        vips: Vec::new(),
        ..base.clone()
    };
    let template = &base.vips[0];
    // Each VIP on an address of its own (a VIP balancing fragments must be alone on it), the
    // addresses shuffled so that keys move from one VIP to another.
    let mut addresses: Vec<IpAddr> = (1..=6u8).map(|i| IpAddr::from([192, 0, 2, i])).collect();
    rng.shuffle(&mut addresses);
    for name in ["a", "b", "c", "d"] {
        if rng.u8(..10) >= 7 {
            continue;
        }
        let mut backends = Vec::new();
        for last in 1..=8u8 {
            if !rng.bool() {
                continue;
            }
            let mut b = template.backends[0].clone();
            b.address = IpAddr::from([10, 0, 0, last]);
            b.weight = rng.u32(0..4);
            b.drain = rng.u8(..10) == 0;
            backends.push(b);
        }
        config.vips.push(Vip {
            name: name.to_owned(),
            address: addresses.pop().expect("more addresses than VIPs"),
            port: Some([80, 81][rng.usize(..2)]),
            table_size: [7, 13][rng.usize(..2)],
            fragments: rng.u8(..10) == 0,
            source_limit: (rng.u8(..4) == 0).then(|| crate::config::SourceLimitConfig {
                rate: rng.u32(1..1000),
                burst: rng.u32(1..1000),
                ipv4_prefix: rng.u8(1..=32),
                ipv6_prefix: rng.u8(1..=128),
            }),
            backends,
            ..template.clone()
        });
    }
    config
}

fn random_hops(rng: &mut fastrand::Rng) -> NextHops {
    (1..=8u8)
        .filter(|_| rng.u8(..10) < 8)
        .collect::<Vec<u8>>()
        .into_iter()
        .map(|last| {
            let hop = NextHop {
                ifindex: rng.u32(1..4),
                interface: "x".into(),
                src_mac: [2; 6],
                dst_mac: [2, 0, 0, 0, last, rng.u8(..2)],
                gateway: None,
                mtu: 1500,
                source: None,
            };
            (IpAddr::from([10, 0, 0, last]), hop)
        })
        .collect()
}

fn random_health(rng: &mut fastrand::Rng, config: &Config) -> HashMap<BackendKey, Health> {
    config
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| (v.name.clone(), b.address)))
        .map(|key| {
            (
                key,
                if rng.u8(..10) < 2 {
                    Health::Down
                } else {
                    Health::Up
                },
            )
        })
        .collect()
}

/// Backends of the previous config that the new one dropped, kept (at random) as retiring.
fn random_retiring(rng: &mut fastrand::Rng, old: &Config, new: &Config) -> Vec<BackendKey> {
    old.vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| (v.name.clone(), b.address)))
        .filter(|(vip, address)| {
            !new.vips
                .iter()
                .any(|v| &v.name == vip && v.backends.iter().any(|b| b.address == *address))
        })
        .filter(|_| rng.bool())
        .collect()
}

#[test]
fn random_config_sequences_through_the_planner_never_expose_a_half_state() {
    let base = template();
    for seed in 0..100u64 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut ids = Ids::default();
        let mut held = MapContents::default();
        let mut kernel = Kernel::default();
        let mut config = Config {
            vips: Vec::new(),
            ..base.clone()
        };
        for step in 0..12 {
            let new = random_config(&mut rng, &base);
            let retiring = random_retiring(&mut rng, &config, &new);
            let desired = desired_state(
                &new,
                &retiring,
                &random_hops(&mut rng),
                &random_health(&mut rng, &new),
                &mut ids,
            )
            .unwrap();
            let case = format!("seed {seed} step {step}");
            run_plan(
                &mut kernel,
                &plan(&held, &desired.maps),
                &held,
                &desired.maps,
                &case,
            );
            held = desired.maps;
            config = new;
        }
    }
}

//! The desired state: (validated config, next hops, health verdicts, ids) -> the exact
//! contents the maps must hold, and what each VIP and backend is doing. Pure: no kernel, no
//! I/O, tested on any machine.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use balancer_common::{
    defence::{FloodSettings, SourceLimit},
    nat::{NatSettings, NatVip, MAX_SNAT_ADDRESSES, NAT_VIP_F_SNAT},
    Backend, VipKey, VipMeta, BACKEND_F_DOWN, BACKEND_F_DRAINING, BACKEND_F_VALID, FORWARD_DSR,
    FORWARD_NAT, FORWARD_TUNNEL, NO_BACKEND, PROTO_ICMP, PROTO_ICMPV6, VIP_F_ADDRESS,
    VIP_F_FRAGMENTS, VIP_F_FRAGMENTS_ONLY, VIP_F_HASH_DST_PORT_ONLY, VIP_F_SOURCE_LIMIT,
    VIP_F_SYNC,
};

use crate::{
    config::{
        BackendConfig, Config, Forwarding, HashMode, NatGlobal, Snat, TunnelSource, Vip,
        WhenAllDown,
    },
    maglev::{self, MaglevBackend},
    plan::{
        contents::{MapContents, Table},
        ids::{IdError, Ids},
        inputs::{address_bytes, vip_key, BackendKey, Health, NextHop, NextHops},
    },
};

/// Everything the maps must hold, and per VIP what it is doing.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DesiredState {
    pub vips: Vec<DesiredVip>,
    pub maps: MapContents,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredVip {
    pub name: String,
    pub key: VipKey,
    pub meta: VipMeta,
    /// `table_size` slots of backend ids (`NO_BACKEND` where no backend takes new flows).
    pub table: Table,
    pub backends: Vec<DesiredBackend>,
    /// Every backend that could take new flows is down, and the VIP fails open: the table
    /// spreads over the down backends.
    pub fail_open: bool,
    /// What the table was built from: (id, address, weight in the table) of every backend,
    /// the table size and seed. The same input gives the same table, which is then reused
    /// rather than built again (a health change of one VIP rebuilds that VIP only).
    pub table_input: TableInput,
    /// What the table means (the backend address of every slot): equal on balancers that
    /// choose alike, whatever their backend ids (`maglev::fingerprint`).
    pub fingerprint: u64,
}

/// What a Maglev table is built from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TableInput {
    pub backends: Arc<[(u32, IpAddr, u32)]>,
    pub size: u32,
    pub seed: u32,
}

impl DesiredVip {
    /// Backends taking new flows.
    pub fn healthy(&self) -> usize {
        self.backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .count()
    }

    /// Every backend that would take new flows is down (the VIP fails open or drops).
    pub fn all_down(&self) -> bool {
        self.healthy() == 0 && self.backends.iter().any(|b| b.state == BackendState::Down)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub id: u32,
    pub address: IpAddr,
    pub weight: u32,
    pub state: BackendState,
    /// Slots of the Maglev table this backend owns.
    pub slots: u32,
}

/// A backend's state as the data plane sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new flows.
    Active,
    /// Keeps its flows, takes no new ones (drain = true, or weight 0).
    Draining,
    /// Failed health checks: its flows are moved.
    Down,
    /// Its next hop could not be resolved: treated as down.
    Unreachable,
    /// Removed from the config: keeps its flows, takes no new ones, until the removal grace
    /// period ends.
    Removed,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Down => "down",
            BackendState::Unreachable => "unreachable",
            BackendState::Removed => "removed",
        }
    }

    /// Keeps its flows but takes no new ones.
    pub fn drains(self) -> bool {
        matches!(self, BackendState::Draining | BackendState::Removed)
    }
}

/// A backend the maps hold for a VIP: its address and, unless it is retiring (removed from
/// the config, within its grace period), its config.
type Member<'a> = (IpAddr, Option<&'a BackendConfig>);

/// Computes the desired map contents, updating `ids` to the config. `retiring` lists backends
/// removed from the config whose grace period has not ended: they keep their ids and flows.
pub fn desired_state(
    config: &Config,
    retiring: &[BackendKey],
    next_hops: &NextHops,
    health: &HashMap<BackendKey, Health>,
    ids: &mut Ids,
) -> Result<DesiredState, IdError> {
    desired_state_after(config, retiring, next_hops, health, ids, None)
}

/// [`desired_state`], reusing the tables of `previous` whose input has not changed.
pub fn desired_state_after(
    config: &Config,
    retiring: &[BackendKey],
    next_hops: &NextHops,
    health: &HashMap<BackendKey, Health>,
    ids: &mut Ids,
    previous: Option<&DesiredState>,
) -> Result<DesiredState, IdError> {
    let members: Vec<(&Vip, Vec<Member>)> = config
        .vips
        .iter()
        .map(|vip| (vip, members(vip, retiring)))
        .collect();
    let vip_names: Vec<&str> = config.vips.iter().map(|v| v.name.as_str()).collect();
    let backend_keys: Vec<BackendKey> = members
        .iter()
        .flat_map(|(vip, list)| list.iter().map(|(a, _)| (vip.name.clone(), *a)))
        .collect();
    ids.assign(&vip_names, &backend_keys)?;

    let mut state = DesiredState::default();
    state.maps.nat.settings = nat_settings(&config.nat);
    state.maps.defence.flood = FloodSettings {
        new_flows_per_cpu: u64::from(config.flood.new_flows_per_cpu),
    };
    for (vip, list) in members {
        let planned = VipPlan {
            vip,
            vip_id: ids.vip(&vip.name).expect("assigned above"),
            seed: config.hash_seed,
            previous: previous.and_then(|p| p.vips.iter().find(|v| v.name == vip.name)),
            syncs: config.sync.is_some() && vip.forwarding != Forwarding::Nat,
        };
        let desired = planned.build(&list, next_hops, health, ids, &mut state.maps);
        state.vips.push(desired);
    }
    Ok(state)
}

/// The NAT timeouts as the program reads them.
pub fn nat_settings(nat: &NatGlobal) -> NatSettings {
    let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    NatSettings {
        syn_ns: ns(nat.syn_timeout),
        established_ns: ns(nat.established_timeout),
        closing_ns: ns(nat.closing_timeout),
        udp_ns: ns(nat.udp_timeout),
        quarantine_ns: ns(nat.quarantine),
    }
}

/// The configured backends of `vip`, then its retiring ones.
fn members<'a>(vip: &'a Vip, retiring: &[BackendKey]) -> Vec<Member<'a>> {
    let mut list: Vec<Member> = vip.backends.iter().map(|b| (b.address, Some(b))).collect();
    let listed: std::collections::HashSet<IpAddr> = list.iter().map(|(a, _)| *a).collect();
    for (name, address) in retiring {
        if *name == vip.name && !listed.contains(address) {
            list.push((*address, None));
        }
    }
    list
}

/// One VIP being planned.
struct VipPlan<'a> {
    vip: &'a Vip,
    vip_id: u32,
    seed: u32,
    /// The VIP as last planned, if it was.
    previous: Option<&'a DesiredVip>,
    /// Its new-flow decisions go to the fleet's peers (`[sync]`; not under NAT).
    syncs: bool,
}

impl VipPlan<'_> {
    /// The VIP's backends, table and keys, added to `maps`.
    fn build(
        &self,
        members: &[Member],
        next_hops: &NextHops,
        health: &HashMap<BackendKey, Health>,
        ids: &Ids,
        maps: &mut MapContents,
    ) -> DesiredVip {
        let vip = self.vip;
        let mut backends = Vec::with_capacity(members.len());
        let mut entries = Vec::with_capacity(members.len());
        // Whether each backend is configured to take new flows (not draining, weight above
        // 0; retiring ones never).
        let takes: Vec<bool> = members
            .iter()
            .map(|(_, c)| c.is_some_and(BackendConfig::takes_new_flows))
            .collect();
        for &(address, configured) in members {
            let key = (vip.name.clone(), address);
            let id = ids.backend(&key).expect("assigned above");
            // Direct server return cannot reach a backend behind a router.
            let next_hop = next_hops
                .get(&address)
                .filter(|hop| vip.forwarding != Forwarding::Dsr || hop.gateway.is_none());
            let healthy = health.get(&key).copied().unwrap_or_default() == Health::Up;
            if let Some(hop) = next_hop {
                maps.egress.insert(hop.ifindex);
            }
            let mut entry = self.entry(address, next_hop);
            entry.port = configured.and_then(|b| b.port).unwrap_or(0).to_be();
            entries.push((entry, healthy));
            backends.push(DesiredBackend {
                id,
                address,
                weight: configured.map_or(0, |b| b.weight),
                state: backend_state(next_hop.is_some(), configured, healthy),
                slots: 0,
            });
        }
        let fail_open = self.fails_open(&backends, &takes);
        for (((mut entry, healthy), b), takes) in entries.into_iter().zip(&backends).zip(&takes) {
            entry.flags |= self.state_flags(b, *takes, healthy, fail_open);
            maps.backends.insert(b.id, entry);
        }
        let (table, table_input, fingerprint) = self.table(&mut backends, &takes, fail_open);
        let meta = self.meta();
        if let Some(nat) = self.nat_vip(members, next_hops) {
            maps.nat.vips.insert(self.vip_id, nat);
        }
        if let Some(l) = vip.source_limit {
            let limit = SourceLimit::new(l.rate, l.burst, l.ipv4_prefix, l.ipv6_prefix);
            maps.defence.limits.insert(self.vip_id, limit);
        }
        self.keys(meta, &mut maps.keys);
        maps.tables.insert(self.vip_id, table.clone());
        DesiredVip {
            name: vip.name.clone(),
            key: vip_key(vip),
            meta,
            table,
            backends,
            fail_open,
            table_input,
            fingerprint,
        }
    }

    /// The backend's map entry, without its state flags.
    fn entry(&self, address: IpAddr, next_hop: Option<&NextHop>) -> Backend {
        let (addr, family) = address_bytes(address);
        let mut entry = Backend {
            addr,
            family,
            vip_id: self.vip_id,
            flags: BACKEND_F_VALID,
            ..Backend::default()
        };
        let Some(hop) = next_hop else {
            return entry;
        };
        entry.ifindex = hop.ifindex;
        entry.src_mac = hop.src_mac;
        entry.dst_mac = hop.dst_mac;
        entry.mtu = hop.mtu.min(u16::MAX as u32) as u16;
        if self.vip.forwarding == Forwarding::Tunnel {
            let configured = if address.is_ipv4() {
                self.vip.tunnel_source_v4
            } else {
                self.vip.tunnel_source_v6
            };
            let source = configured.or(hop.source.map(|address| TunnelSource {
                address,
                varied_bits: 0,
            }));
            if let Some(source) = source {
                entry.tunnel_src = address_bytes(source.address).0;
                entry.tunnel_src_bits = source.varied_bits;
            }
        }
        entry
    }

    /// Whether the backend would take new flows if it were healthy (`takes`: configured to).
    fn would_take(b: &DesiredBackend, takes: bool) -> bool {
        takes && matches!(b.state, BackendState::Active | BackendState::Down)
    }

    /// New flows go to active backends; if every backend that would take new flows is down
    /// and the VIP fails open, to those down backends instead.
    fn fails_open(&self, backends: &[DesiredBackend], takes: &[bool]) -> bool {
        self.vip.when_all_down == WhenAllDown::FailOpen
            && !backends.iter().any(|b| b.state == BackendState::Active)
            && backends
                .iter()
                .zip(takes)
                .any(|(b, t)| Self::would_take(b, *t))
    }

    fn in_table(b: &DesiredBackend, takes: bool, fail_open: bool) -> bool {
        b.state == BackendState::Active || (fail_open && Self::would_take(b, takes))
    }

    fn state_flags(&self, b: &DesiredBackend, takes: bool, healthy: bool, fail_open: bool) -> u32 {
        match b.state {
            BackendState::Active => 0,
            BackendState::Draining => BACKEND_F_DRAINING,
            BackendState::Removed if healthy => BACKEND_F_DRAINING,
            // A down backend's flows move, unless the VIP fails open over it.
            BackendState::Down if Self::in_table(b, takes, fail_open) => 0,
            BackendState::Down | BackendState::Unreachable | BackendState::Removed => {
                BACKEND_F_DOWN
            }
        }
    }

    /// The Maglev table over the backends that take new flows, and what it was built from;
    /// counts each one's slots. The last table is reused if its input is the same.
    fn table(
        &self,
        backends: &mut [DesiredBackend],
        takes: &[bool],
        fail_open: bool,
    ) -> (Table, TableInput, u64) {
        let input = TableInput {
            backends: backends
                .iter()
                .zip(takes)
                .map(|(b, t)| {
                    let weight = if Self::in_table(b, *t, fail_open) {
                        b.weight
                    } else {
                        0
                    };
                    (b.id, b.address, weight)
                })
                .collect(),
            size: self.vip.table_size,
            seed: self.seed,
        };
        if let Some(previous) = self.previous.filter(|p| p.table_input == input) {
            for (b, old) in backends.iter_mut().zip(&previous.backends) {
                b.slots = old.slots;
            }
            return (previous.table.clone(), input, previous.fingerprint);
        }
        let candidates: Vec<MaglevBackend> = input
            .backends
            .iter()
            .map(|&(_, address, weight)| MaglevBackend { address, weight })
            .collect();
        let built = maglev::build(&candidates, self.vip.table_size, self.seed);
        let fingerprint = maglev::fingerprint(
            built
                .iter()
                .map(|s| s.map(|i| candidates[i as usize].address)),
        );
        let table: Vec<u32> = built
            .into_iter()
            .map(|slot| match slot {
                Some(index) => {
                    backends[index as usize].slots += 1;
                    backends[index as usize].id
                }
                None => NO_BACKEND,
            })
            .collect();
        (Arc::from(table), input, fingerprint)
    }

    fn meta(&self) -> VipMeta {
        let vip = self.vip;
        let mut flags = 0;
        if vip.hash == HashMode::DstPortOnly {
            flags |= VIP_F_HASH_DST_PORT_ONLY;
        }
        if vip.fragments {
            flags |= VIP_F_FRAGMENTS;
        }
        if self.syncs {
            flags |= VIP_F_SYNC;
        }
        if vip.source_limit.is_some() {
            flags |= VIP_F_SOURCE_LIMIT;
        }
        VipMeta {
            vip_id: self.vip_id,
            table_size: vip.table_size,
            forwarding: match vip.forwarding {
                Forwarding::Dsr => FORWARD_DSR,
                Forwarding::Tunnel => FORWARD_TUNNEL,
                Forwarding::Nat => FORWARD_NAT,
            },
            flags,
            _pad: [0; 2],
        }
    }

    /// A NAT VIP's translation: its SNAT addresses (configured, or the addresses of the
    /// interfaces its backends are reached through) and ports. `None` for other modes.
    fn nat_vip(&self, members: &[Member], next_hops: &NextHops) -> Option<NatVip> {
        let nat = self.vip.nat.as_ref()?;
        let addresses: Vec<IpAddr> = match &nat.snat {
            Snat::None => Vec::new(),
            Snat::Addresses(list) => list.clone(),
            Snat::Interface => {
                let mut found: Vec<IpAddr> = members
                    .iter()
                    .filter_map(|(address, _)| next_hops.get(address)?.source)
                    .filter(|source| source.is_ipv4() == self.vip.address.is_ipv4())
                    .collect();
                found.sort();
                found.dedup();
                found
            }
        };
        let mut vip = NatVip {
            flags: if nat.snat == Snat::None {
                0
            } else {
                NAT_VIP_F_SNAT
            },
            snat_count: addresses.len().min(MAX_SNAT_ADDRESSES) as u16,
            port_min: nat.ports.0,
            port_max: nat.ports.1,
            ..NatVip::default()
        };
        for (slot, address) in vip.snat.iter_mut().zip(&addresses) {
            let bytes = address_bytes(*address).0;
            *slot = std::array::from_fn(|i| {
                u32::from_ne_bytes([
                    bytes[4 * i],
                    bytes[4 * i + 1],
                    bytes[4 * i + 2],
                    bytes[4 * i + 3],
                ])
            });
        }
        Some(vip)
    }

    /// The VIP's key, its fragments-only port-0 key, and its address's entry (unless another
    /// VIP on the address made it already).
    fn keys(&self, meta: VipMeta, keys: &mut Vec<(VipKey, VipMeta)>) {
        let vip = self.vip;
        let key = vip_key(vip);
        keys.push((key, meta));
        if vip.fragments && vip.port.is_some() {
            let fragments = VipMeta {
                flags: meta.flags | VIP_F_FRAGMENTS_ONLY,
                ..meta
            };
            keys.push((VipKey { port: 0, ..key }, fragments));
        }
        let address_key = VipKey {
            port: 0,
            proto: if vip.address.is_ipv4() {
                PROTO_ICMP
            } else {
                PROTO_ICMPV6
            },
            ..key
        };
        if !keys.iter().any(|(k, _)| *k == address_key) {
            let meta = VipMeta {
                vip_id: self.vip_id,
                table_size: 0,
                forwarding: 0,
                flags: VIP_F_ADDRESS,
                _pad: [0; 2],
            };
            keys.push((address_key, meta));
        }
    }
}

/// What a backend is doing: resolved or not, configured or retiring, healthy or not.
fn backend_state(
    resolved: bool,
    configured: Option<&BackendConfig>,
    healthy: bool,
) -> BackendState {
    match (resolved, configured) {
        (false, _) => BackendState::Unreachable,
        // A retiring backend goes on being checked: one that was stopped after its removal
        // has its flows moved, not sent to a dead address for the rest of the grace.
        (true, None) if !healthy => BackendState::Down,
        (true, None) => BackendState::Removed,
        (true, Some(_)) if !healthy => BackendState::Down,
        (true, Some(b)) if !b.takes_new_flows() => BackendState::Draining,
        (true, Some(_)) => BackendState::Active,
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    use balancer_common::{FAMILY_IPV4, FAMILY_IPV6};

    use super::*;
    use crate::config;

    fn config(text: &str) -> Config {
        config::parse(Path::new("test.toml"), text).unwrap()
    }

    const TWO_VIPS: &str = r#"
[balancer]
hash_seed = 3
[[vip]]
name = "web"
address = "192.0.2.1"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
backends = [
  { address = "10.0.0.1", weight = 1 },
  { address = "10.0.0.2", weight = 3 },
  { address = "10.0.0.3", drain = true },
  { address = "10.0.0.4" },
]
[[vip]]
name = "any"
address = "192.0.2.2"
port = "any"
protocol = "udp"
forwarding = "dsr"
table_size = 13
backends = [{ address = "10.0.0.1" }]
"#;

    fn hop(last: u8) -> NextHop {
        NextHop {
            ifindex: 7,
            interface: "eth0".into(),
            src_mac: [2, 0, 0, 0, 0, 0xff],
            dst_mac: [2, 0, 0, 0, 0, last],
            gateway: None,
            mtu: 1500,
            source: Some(IpAddr::from([10, 0, 0, 254])),
        }
    }

    fn hops() -> NextHops {
        (1..=4)
            .map(|i| (IpAddr::from([10, 0, 0, i]), hop(i)))
            .collect()
    }

    #[test]
    fn maps_follow_the_config() {
        let c = config(TWO_VIPS);
        let mut ids = Ids::default();
        let health = HashMap::from([(
            ("web".to_owned(), IpAddr::from([10, 0, 0, 4])),
            Health::Down,
        )]);
        let state = desired_state(&c, &[], &hops(), &health, &mut ids).unwrap();

        let web = &state.vips[0];
        assert_eq!(web.key.addr[..4], [192, 0, 2, 1]);
        assert_eq!(web.key.port, 80u16.to_be());
        assert_eq!((web.key.proto, web.key.family), (6, FAMILY_IPV4));
        assert_eq!(
            web.meta,
            VipMeta {
                vip_id: 0,
                table_size: 251,
                forwarding: FORWARD_DSR,
                flags: 0,
                _pad: [0; 2]
            }
        );
        assert_eq!(web.table.len(), 251);
        let states: Vec<BackendState> = web.backends.iter().map(|b| b.state).collect();
        assert_eq!(
            states,
            [
                BackendState::Active,
                BackendState::Active,
                BackendState::Draining,
                BackendState::Down
            ]
        );
        // Only active backends own slots, in proportion to their weights (1:3).
        let slots: Vec<u32> = web.backends.iter().map(|b| b.slots).collect();
        assert_eq!(slots.iter().sum::<u32>(), 251);
        assert_eq!(&slots[2..], &[0, 0]);
        assert!((62..=64).contains(&slots[0]), "{slots:?}");
        for (b, slots) in web.backends.iter().zip(&slots) {
            assert_eq!(
                web.table.iter().filter(|&&id| id == b.id).count() as u32,
                *slots
            );
        }

        // Backend entries: flags, next hop, owner.
        let entry = |id: u32| state.maps.backends[&id];
        assert_eq!(entry(web.backends[0].id).flags, BACKEND_F_VALID);
        assert_eq!(
            entry(web.backends[2].id).flags,
            BACKEND_F_VALID | BACKEND_F_DRAINING
        );
        assert_eq!(
            entry(web.backends[3].id).flags,
            BACKEND_F_VALID | BACKEND_F_DOWN
        );
        assert_eq!(entry(web.backends[1].id).dst_mac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(entry(web.backends[1].id).ifindex, 7);
        assert_eq!(entry(web.backends[1].id).vip_id, 0);

        // The same address behind two VIPs is two backends.
        let any = &state.vips[1];
        assert_eq!(any.key.port, 0);
        assert_eq!(any.meta.vip_id, 1);
        assert_ne!(any.backends[0].id, web.backends[0].id);
        assert_eq!(entry(any.backends[0].id).vip_id, 1);
        assert!(any.table.iter().all(|&id| id == any.backends[0].id));
        assert_eq!(state.maps.backends.len(), 5);
        assert_eq!(state.maps.egress, BTreeSet::from([7]));
    }

    #[test]
    fn unresolved_backends_are_unreachable_and_get_no_slots() {
        let c = config(TWO_VIPS);
        let mut hops = hops();
        hops.remove(&IpAddr::from([10, 0, 0, 1]));
        let state = desired_state(&c, &[], &hops, &HashMap::new(), &mut Ids::default()).unwrap();
        let web = &state.vips[0];
        assert_eq!(web.backends[0].state, BackendState::Unreachable);
        assert_eq!(web.backends[0].slots, 0);
        assert_eq!(
            state.maps.backends[&web.backends[0].id].flags,
            BACKEND_F_VALID | BACKEND_F_DOWN
        );
        // The other VIP's only backend is unreachable: its table is empty.
        assert!(state.vips[1].table.iter().all(|&id| id == NO_BACKEND));
    }

    #[test]
    fn ids_survive_config_changes_and_freed_ids_are_not_reused_at_once() {
        let mut ids = Ids::default();
        let first =
            desired_state(&config(TWO_VIPS), &[], &hops(), &HashMap::new(), &mut ids).unwrap();
        let id_of = |s: &DesiredState, vip: usize, b: usize| s.vips[vip].backends[b].id;
        let kept = id_of(&first, 0, 3);
        let removed = id_of(&first, 0, 1);
        let used: BTreeSet<u32> = first.maps.backends.keys().copied().collect();

        // Remove 10.0.0.2 from "web", add 10.0.0.9.
        let changed = TWO_VIPS
            .replace("  { address = \"10.0.0.2\", weight = 3 },\n", "")
            .replace(
                "{ address = \"10.0.0.4\" },",
                "{ address = \"10.0.0.4\" },\n  { address = \"10.0.0.9\" },",
            );
        let mut hops = hops();
        hops.insert(IpAddr::from([10, 0, 0, 9]), hop(9));
        let second =
            desired_state(&config(&changed), &[], &hops, &HashMap::new(), &mut ids).unwrap();
        assert_eq!(id_of(&second, 0, 2), kept, "10.0.0.4 keeps its id");
        let new_id = id_of(&second, 0, 3);
        assert!(
            !used.contains(&new_id),
            "10.0.0.9 gets a fresh id, not the one just freed ({removed})"
        );
        assert_eq!(second.vips[1].meta.vip_id, 1);
        assert!(!second
            .maps
            .backends
            .values()
            .any(|b| b.addr[..4] == [10, 0, 0, 2]));
    }

    #[test]
    fn retiring_backends_keep_their_id_and_flows_but_get_no_slots() {
        let mut ids = Ids::default();
        let first =
            desired_state(&config(TWO_VIPS), &[], &hops(), &HashMap::new(), &mut ids).unwrap();
        let removed_id = first.vips[0].backends[1].id;
        let changed = TWO_VIPS.replace("  { address = \"10.0.0.2\", weight = 3 },\n", "");
        let retiring = [("web".to_owned(), IpAddr::from([10, 0, 0, 2]))];
        let state = desired_state(
            &config(&changed),
            &retiring,
            &hops(),
            &HashMap::new(),
            &mut ids,
        )
        .unwrap();
        let web = &state.vips[0];
        let gone = web
            .backends
            .iter()
            .find(|b| b.address == IpAddr::from([10, 0, 0, 2]))
            .expect("still in the maps");
        assert_eq!(
            (gone.id, gone.state, gone.slots),
            (removed_id, BackendState::Removed, 0)
        );
        assert_eq!(
            state.maps.backends[&removed_id].flags,
            BACKEND_F_VALID | BACKEND_F_DRAINING
        );
        assert!(!web.table.contains(&removed_id));
        // A retiring backend of a VIP that no longer exists is not kept.
        let retiring = [("nosuch".to_owned(), IpAddr::from([10, 0, 0, 2]))];
        let state = desired_state(
            &config(&changed),
            &retiring,
            &hops(),
            &HashMap::new(),
            &mut ids,
        )
        .unwrap();
        assert!(!state.maps.backends.contains_key(&removed_id));
    }

    fn all_down(text: &str) -> DesiredState {
        let c = config(text);
        let health: HashMap<BackendKey, Health> = c.vips[0]
            .backends
            .iter()
            .map(|b| (("web".to_owned(), b.address), Health::Down))
            .collect();
        desired_state(&c, &[], &hops(), &health, &mut Ids::default()).unwrap()
    }

    #[test]
    fn all_down_fails_open_by_default_over_the_backends_that_take_new_flows() {
        let state = all_down(TWO_VIPS);
        let web = &state.vips[0];
        assert!(web.fail_open);
        // 10.0.0.1 (weight 1), 10.0.0.2 (weight 3) and 10.0.0.4 (weight 1) are in the table;
        // 10.0.0.3 drains and stays out.
        let slots: Vec<u32> = web.backends.iter().map(|b| b.slots).collect();
        assert_eq!(slots.iter().sum::<u32>(), 251);
        assert_eq!(slots[2], 0);
        assert!(slots[1] > slots[0] * 2, "{slots:?}");
        // Their flows are not moved away (no DOWN flag while failing open).
        assert_eq!(
            state.maps.backends[&web.backends[0].id].flags,
            BACKEND_F_VALID
        );
        assert!(web.backends.iter().all(|b| b.state != BackendState::Active));
    }

    #[test]
    fn all_down_with_drop_empties_the_table() {
        let text = TWO_VIPS.replacen(
            "table_size = 251\n",
            "table_size = 251\nwhen_all_down = \"drop\"\n",
            1,
        );
        let state = all_down(&text);
        let web = &state.vips[0];
        assert!(!web.fail_open);
        assert!(web.table.iter().all(|&id| id == NO_BACKEND));
        assert_eq!(
            state.maps.backends[&web.backends[0].id].flags,
            BACKEND_F_VALID | BACKEND_F_DOWN
        );
    }

    #[test]
    fn one_healthy_backend_takes_everything() {
        let c = config(TWO_VIPS);
        let health: HashMap<BackendKey, Health> = [1u8, 2]
            .iter()
            .map(|i| {
                (
                    ("web".to_owned(), IpAddr::from([10, 0, 0, *i])),
                    Health::Down,
                )
            })
            .collect();
        let state = desired_state(&c, &[], &hops(), &health, &mut Ids::default()).unwrap();
        let web = &state.vips[0];
        assert!(!web.fail_open);
        let only = web.backends[3].id;
        assert!(web.table.iter().all(|&id| id == only));
    }

    const TUNNELS: &str = r#"
[balancer]
[[vip]]
name = "t4"
address = "192.0.2.10"
port = 80
protocol = "tcp"
forwarding = "tunnel"
tunnel_source_v4 = "172.16.0.0/16"
hash = "dst_port_only"
backends = [{ address = "10.0.0.1" }, { address = "2001:db8::1" }]
[[vip]]
name = "dsr"
address = "192.0.2.10"
port = 81
protocol = "tcp"
forwarding = "dsr"
backends = [{ address = "10.0.0.2" }]
[[vip]]
name = "frag"
address = "2001:db8::10"
port = 53
protocol = "udp"
forwarding = "dsr"
fragments = true
health = { kind = "none" }
backends = [{ address = "2001:db8::2" }]
"#;

    #[test]
    fn tunnels_fragments_and_address_entries() {
        let c = config(TUNNELS);
        let mut hops = hops();
        // 10.0.0.2 sits behind a router: fine for a tunnel, not for direct server return.
        hops.get_mut(&IpAddr::from([10, 0, 0, 2])).unwrap().gateway =
            Some(IpAddr::from([10, 0, 0, 254]));
        let v6 =
            |last: u16| IpAddr::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last));
        for i in [1, 2] {
            let mut h = hop(0x60 + i as u8);
            h.mtu = 9000;
            h.source = Some(v6(0xfe));
            hops.insert(v6(i), h);
        }
        let state = desired_state(&c, &[], &hops, &HashMap::new(), &mut Ids::default()).unwrap();
        let t4 = &state.vips[0];
        assert_eq!(t4.meta.forwarding, FORWARD_TUNNEL);
        assert_eq!(t4.meta.flags, VIP_F_HASH_DST_PORT_ONLY);
        let v4_backend = state.maps.backends[&t4.backends[0].id];
        assert_eq!(&v4_backend.tunnel_src[..4], &[172, 16, 0, 0]);
        assert_eq!((v4_backend.tunnel_src_bits, v4_backend.mtu), (16, 1500));
        // No IPv6 source configured: the route's preferred source, fixed.
        let v6_backend = state.maps.backends[&t4.backends[1].id];
        assert_eq!(v6_backend.tunnel_src, address_bytes(v6(0xfe)).0);
        assert_eq!(
            (
                v6_backend.tunnel_src_bits,
                v6_backend.mtu,
                v6_backend.family
            ),
            (0, 9000, FAMILY_IPV6)
        );
        // The DSR VIP's routed backend is unreachable.
        assert_eq!(state.vips[1].backends[0].state, BackendState::Unreachable);

        // Keys: each VIP, a fragments-only port-0 key for "frag", one address entry per address.
        let frag = &state.vips[2];
        assert_eq!(frag.meta.flags, VIP_F_FRAGMENTS);
        let keys: Vec<(u16, u8, u8)> = state
            .maps
            .keys
            .iter()
            .map(|(k, m)| (u16::from_be(k.port), k.proto, m.flags))
            .collect();
        assert_eq!(
            keys,
            [
                (80, 6, VIP_F_HASH_DST_PORT_ONLY),
                (0, PROTO_ICMP, VIP_F_ADDRESS),
                (81, 6, 0),
                (53, 17, VIP_F_FRAGMENTS),
                (0, 17, VIP_F_FRAGMENTS | VIP_F_FRAGMENTS_ONLY),
                (0, PROTO_ICMPV6, VIP_F_ADDRESS),
            ]
        );
        assert_eq!(state.maps.keys[1].0.addr[..4], [192, 0, 2, 10]);
        assert_eq!(state.maps.keys[5].0.family, FAMILY_IPV6);
    }

    #[test]
    fn same_input_same_output() {
        let a = desired_state(
            &config(TWO_VIPS),
            &[],
            &hops(),
            &HashMap::new(),
            &mut Ids::default(),
        )
        .unwrap();
        let b = desired_state(
            &config(TWO_VIPS),
            &[],
            &hops(),
            &HashMap::new(),
            &mut Ids::default(),
        )
        .unwrap();
        assert_eq!(a, b);
    }
}

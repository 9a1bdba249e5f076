//! Writing the maps: a map plan executed operation by operation through typed per-map
//! handles, in the order the plan gives (see `plan::ops` for why that order is safe). Also
//! reading what pinned maps hold, and the decapsulating program's address map.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{
    Array, ArrayOfMaps, DevMapHash, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray,
    PerCpuValues,
};
use balancer_common::{
    defence::{FloodSettings, SourceLimit},
    map_names,
    nat::{NatSettings, NatVip},
    Backend, DecapAddress, TrafficStats, VipKey, VipMeta, VipSlot, MAGLEV_CAPACITY,
    MAGLEV_TABLE_MAP_FLAGS, MAX_BACKENDS,
};

use crate::{
    plan::{
        contents::{DefenceContents, MapContents, NatContents},
        inputs::address_bytes,
        ops::{MapOp, MapPlan},
    },
    shell::dataplane::{map_err, Dataplane, DataplaneError},
};

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// A map of the object as its typed handle.
fn typed<'a, T>(map: &'a mut Map, name: &'static str) -> Result<T>
where
    T: TryFrom<&'a mut Map, Error = MapError>,
{
    T::try_from(map).map_err(map_err(name))
}

impl Dataplane {
    fn vips_map(&mut self) -> Result<BpfHashMap<&mut MapData, VipKey, VipMeta>> {
        typed(self.map_mut(map_names::VIPS)?, map_names::VIPS)
    }

    fn backends_map(&mut self) -> Result<Array<&mut MapData, Backend>> {
        typed(self.map_mut(map_names::BACKENDS)?, map_names::BACKENDS)
    }

    fn tables_map(&mut self) -> Result<ArrayOfMaps<&mut MapData, MapData>> {
        typed(
            self.map_mut(map_names::MAGLEV_TABLES)?,
            map_names::MAGLEV_TABLES,
        )
    }

    fn egress_map(&mut self) -> Result<DevMapHash<&mut MapData>> {
        typed(
            self.map_mut(map_names::EGRESS_DEVICES)?,
            map_names::EGRESS_DEVICES,
        )
    }

    fn filter_map(&mut self) -> Result<Array<&mut MapData, u64>> {
        typed(self.map_mut(map_names::VIP_FILTER)?, map_names::VIP_FILTER)
    }

    fn array<T: aya::Pod>(&mut self, name: &'static str) -> Result<Array<&mut MapData, T>> {
        typed(self.map_mut(name)?, name)
    }

    fn slots_map(&mut self) -> Result<Array<&mut MapData, VipSlot>> {
        typed(self.map_mut(map_names::VIP_SLOTS)?, map_names::VIP_SLOTS)
    }

    fn stats_map(&mut self, name: &'static str) -> Result<PerCpuArray<&mut MapData, TrafficStats>> {
        typed(self.map_mut(name)?, name)
    }

    /// Executes `plan`, in order. Stops at the first operation the kernel refuses. A plan
    /// that writes a NAT VIP loads the NAT programs first (once).
    pub fn execute(&mut self, plan: &MapPlan) -> Result<()> {
        if plan.ops.iter().any(|op| matches!(op, MapOp::SetNatVip(..))) {
            self.load_nat()?;
        }
        plan.ops.iter().try_for_each(|op| self.execute_op(op))
    }

    fn execute_op(&mut self, op: &MapOp) -> Result<()> {
        use map_names::*;
        match op {
            MapOp::ZeroBackendStats(id) => self.zero_stats(BACKEND_STATS, *id),
            MapOp::ZeroVipStats(id) => self.zero_stats(VIP_STATS, *id),
            MapOp::AddEgress(ifindex) => self
                .egress_map()?
                .insert(*ifindex, *ifindex, None, 0)
                .map_err(|source| DataplaneError::Xdp {
                    map: EGRESS_DEVICES,
                    source,
                }),
            MapOp::SetBackend(id, entry) => self
                .backends_map()?
                .set(*id, entry, 0)
                .map_err(map_err(BACKENDS)),
            MapOp::RemoveVipKey(key) => {
                ignore_missing(self.vips_map()?.remove(key)).map_err(map_err(VIPS))
            }
            MapOp::SetFilterWord(word, bits) => self
                .filter_map()?
                .set(*word, bits, 0)
                .map_err(map_err(VIP_FILTER)),
            MapOp::SwapTable {
                vip_id,
                slots,
                fill,
            } => self.swap_table(*vip_id, slots, *fill),
            MapOp::SetVipSlot(id, slot) => self
                .slots_map()?
                .set(*id, slot, 0)
                .map_err(map_err(VIP_SLOTS)),
            MapOp::ClearVipSlot(id) => self
                .slots_map()?
                .set(*id, VipSlot::default(), 0)
                .map_err(map_err(VIP_SLOTS)),
            MapOp::SetVipKey(key, meta) => {
                self.vips_map()?.insert(key, meta, 0).map_err(map_err(VIPS))
            }
            MapOp::ClearTable(vip_id) => {
                // Replaced with an empty table rather than deleted: an array of maps cannot
                // delete.
                self.swap_table(*vip_id, &[], 0)?;
                self.tables.remove(vip_id);
                Ok(())
            }
            MapOp::ClearBackend(id) => self
                .backends_map()?
                .set(*id, Backend::default(), 0)
                .map_err(map_err(BACKENDS)),
            MapOp::RemoveEgress(ifindex) => {
                ignore_missing(self.egress_map()?.remove(*ifindex)).map_err(map_err(EGRESS_DEVICES))
            }
            MapOp::SetNatSettings(settings) => self
                .array::<NatSettings>(NAT_SETTINGS)?
                .set(0, settings, 0)
                .map_err(map_err(NAT_SETTINGS)),
            MapOp::SetNatVip(id, vip) => self
                .array::<NatVip>(NAT_VIPS)?
                .set(*id, vip, 0)
                .map_err(map_err(NAT_VIPS)),
            MapOp::SetNatFilterWord(word, bits) => self
                .array::<u64>(NAT_FILTER)?
                .set(*word, bits, 0)
                .map_err(map_err(NAT_FILTER)),
            // An object older than the defences (a benchmark's baseline) has no such maps.
            MapOp::SetFloodSettings(_) | MapOp::SetSourceLimit(..)
                if !self.has_map(FLOOD_SETTINGS) =>
            {
                Ok(())
            }
            MapOp::SetFloodSettings(settings) => self
                .array::<FloodSettings>(FLOOD_SETTINGS)?
                .set(0, settings, 0)
                .map_err(map_err(FLOOD_SETTINGS)),
            MapOp::SetSourceLimit(id, limit) => self
                .array::<SourceLimit>(SOURCE_LIMITS)?
                .set(*id, limit, 0)
                .map_err(map_err(SOURCE_LIMITS)),
        }
    }

    /// Counters of an id about to be used start from zero (it may have served another
    /// backend or VIP before).
    fn zero_stats(&mut self, name: &'static str, id: u32) -> Result<()> {
        let zeros = PerCpuValues::try_from(vec![TrafficStats::default(); self.cpus])
            .map_err(|source| DataplaneError::Io { map: name, source })?;
        self.stats_map(name)?
            .set(id, zeros, 0)
            .map_err(map_err(name))
    }

    /// A fresh inner map holding `slots` repeated to `fill` slots, swapped in with one update
    /// of the outer map: a packet sees the old table or the new one.
    fn swap_table(&mut self, vip_id: u32, slots: &[u32], fill: u32) -> Result<()> {
        let inner = new_table(slots, fill).map_err(|source| DataplaneError::Io {
            map: map_names::MAGLEV_TABLES,
            source,
        })?;
        self.tables_map()?
            .set(vip_id, &inner, 0)
            .map_err(map_err(map_names::MAGLEV_TABLES))?;
        self.tables.insert(vip_id, inner);
        Ok(())
    }

    /// What the maps hold: VIP keys, live backends, egress devices (tables are not read: the
    /// first plan writes them whole).
    pub(super) fn read_contents(&mut self) -> Result<MapContents> {
        let mut keys: Vec<(VipKey, VipMeta)> = self
            .vips_map()?
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::VIPS))?;
        keys.sort_by_key(|(k, _)| (k.addr, k.port, k.proto, k.family));
        let backends_map = self.backends_map()?;
        let mut backends = BTreeMap::new();
        for id in 0..MAX_BACKENDS {
            let b = backends_map
                .get(&id, 0)
                .map_err(map_err(map_names::BACKENDS))?;
            if b.is_valid() {
                backends.insert(id, b);
            }
        }
        let egress = self.egress_map()?.keys().filter_map(|k| k.ok()).collect();
        let settings = self
            .array::<NatSettings>(map_names::NAT_SETTINGS)?
            .get(&0, 0)
            .map_err(map_err(map_names::NAT_SETTINGS))?;
        let nat_vips = self.array::<NatVip>(map_names::NAT_VIPS)?;
        let mut vips = BTreeMap::new();
        for (_, meta) in keys.iter().filter(|(_, m)| m.translates()) {
            let vip = nat_vips
                .get(&meta.vip_id, 0)
                .map_err(map_err(map_names::NAT_VIPS))?;
            vips.insert(meta.vip_id, vip);
        }
        let defence = self.read_defence(&keys)?;
        Ok(MapContents {
            keys,
            backends,
            tables: BTreeMap::new(),
            egress,
            nat: NatContents { settings, vips },
            defence,
        })
    }

    /// The flood cap, and the source limits of the VIPs whose keys flag one.
    fn read_defence(&mut self, keys: &[(VipKey, VipMeta)]) -> Result<DefenceContents> {
        let flood = self
            .array::<FloodSettings>(map_names::FLOOD_SETTINGS)?
            .get(&0, 0)
            .map_err(map_err(map_names::FLOOD_SETTINGS))?;
        let map = self.array::<SourceLimit>(map_names::SOURCE_LIMITS)?;
        let mut limits = BTreeMap::new();
        for (_, meta) in keys.iter().filter(|(_, m)| m.limits_sources()) {
            let limit = map
                .get(&meta.vip_id, 0)
                .map_err(map_err(map_names::SOURCE_LIMITS))?;
            limits.insert(meta.vip_id, limit);
        }
        Ok(DefenceContents { flood, limits })
    }

    /// The addresses the decapsulating program accepts tunnels to.
    pub fn set_decap_addresses(&mut self, addresses: &[IpAddr]) -> Result<()> {
        let name = map_names::DECAP_ADDRESSES;
        let mut map: BpfHashMap<&mut MapData, DecapAddress, u8> = typed(self.map_mut(name)?, name)?;
        let old: Vec<DecapAddress> = map.keys().filter_map(|k| k.ok()).collect();
        for key in old {
            ignore_missing(map.remove(&key)).map_err(map_err(name))?;
        }
        for &address in addresses {
            let (addr, family) = address_bytes(address);
            let key = DecapAddress {
                addr,
                family,
                _pad: [0; 3],
            };
            map.insert(key, 1, 0).map_err(map_err(name))?;
        }
        Ok(())
    }
}

/// A new inner Maglev table map holding `slots` cyclically in its first `fill` slots (the
/// rest zero; never read). Filled through a memory mapping: one pass over memory instead of
/// one syscall per slot. The kernel lays array elements out 8 bytes apart whatever their
/// size, so each 4-byte slot sits at a multiple of 8.
fn new_table(slots: &[u32], fill: u32) -> std::io::Result<MapData> {
    assert!(fill as usize >= slots.len() && fill <= MAGLEV_CAPACITY);
    let definition = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        4,
        4,
        MAGLEV_CAPACITY,
        MAGLEV_TABLE_MAP_FLAGS,
    );
    let map = MapData::create(definition, "maglev_table", None).map_err(std::io::Error::other)?;
    if slots.is_empty() {
        return Ok(map);
    }
    const STRIDE: usize = 8;
    let page = 4096usize;
    let len = (MAGLEV_CAPACITY as usize * STRIDE).div_ceil(page) * page;
    let fd = map.fd().as_fd().as_raw_fd();
    // SAFETY: mapping a BPF array created with BPF_F_MMAPABLE, of exactly its size rounded up
    // to a page, which the kernel allows; every write lands below `fill * STRIDE <= len`;
    // unmapped before returning.
    unsafe {
        let base = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = base.cast::<u8>();
        for (i, &slot) in slots.iter().cycle().take(fill as usize).enumerate() {
            base.add(i * STRIDE).cast::<u32>().write(slot);
        }
        libc::munmap(base.cast::<libc::c_void>(), len);
    }
    Ok(map)
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

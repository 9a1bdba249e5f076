//! Reading the data plane: per-CPU counters summed, the connection table, kernel memory.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray},
    Pod,
};
use balancer_common::{
    defence::DEFENCE_COUNTER_COUNT,
    map_names,
    nat::{NatEntry, NAT_KEY_REPLY},
    ConnEntry, FlowKey, FlowKeyV4, FlowKeyV6, TrafficStats, DECAP_OUTCOME_COUNT, FAMILY_IPV4,
    NAT_COUNTER_COUNT, OUTCOME_COUNT,
};

use crate::{
    plan::contents::Counters,
    shell::dataplane::{map_err, Dataplane, DataplaneError},
};

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

fn typed<'a, T>(map: &'a Map, name: &'static str) -> Result<T>
where
    T: TryFrom<&'a Map, Error = MapError>,
{
    T::try_from(map).map_err(map_err(name))
}

impl Dataplane {
    /// The counters of the given backend and VIP ids, and every outcome, summed over CPUs.
    pub fn counters(&self, backend_ids: &[u32], vip_ids: &[u32]) -> Result<Counters> {
        let outcome_map: PerCpuArray<&MapData, u64> = typed(
            self.map(map_names::OUTCOME_STATS)?,
            map_names::OUTCOME_STATS,
        )?;
        let outcomes = (0..OUTCOME_COUNT)
            .map(|i| outcome_map.get(&i, 0).map(|v| v.iter().sum()))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(map_err(map_names::OUTCOME_STATS))?;
        let nat = if self.has_map(map_names::NAT_STATS) {
            self.nat_counters()?
        } else {
            Vec::new()
        };
        let defence = if self.has_map(map_names::DEFENCE_STATS) {
            self.per_cpu_sums(map_names::DEFENCE_STATS, DEFENCE_COUNTER_COUNT)?
        } else {
            Vec::new()
        };
        Ok(Counters {
            backends: self.traffic(map_names::BACKEND_STATS, backend_ids)?,
            vips: self.traffic(map_names::VIP_STATS, vip_ids)?,
            outcomes,
            nat,
            defence,
        })
    }

    fn traffic(&self, name: &'static str, ids: &[u32]) -> Result<BTreeMap<u32, TrafficStats>> {
        let stats: PerCpuArray<&MapData, TrafficStats> = typed(self.map(name)?, name)?;
        let mut out = BTreeMap::new();
        for &id in ids {
            let per_cpu = stats.get(&id, 0).map_err(map_err(name))?;
            let total = per_cpu
                .iter()
                .fold(TrafficStats::default(), |a, s| TrafficStats {
                    packets: a.packets + s.packets,
                    bytes: a.bytes + s.bytes,
                    new_flows: a.new_flows + s.new_flows,
                });
            out.insert(id, total);
        }
        Ok(out)
    }

    /// The connection table `name`, keyed by `K`.
    fn conn_table<K: Pod>(&self, name: &'static str) -> Result<BpfHashMap<&MapData, K, ConnEntry>> {
        typed(self.map(name)?, name)
    }

    fn conn_get<K: Pod>(&self, name: &'static str, key: &K) -> Result<Option<u32>> {
        match self.conn_table::<K>(name)?.get(key, 0) {
            Ok(entry) => Ok(Some(entry.backend_id)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        }
    }

    fn conn_put<K: Pod>(&mut self, name: &'static str, key: &K, entry: ConnEntry) -> Result<()> {
        let mut table: BpfHashMap<&mut MapData, K, ConnEntry> =
            self.map_mut(name)?.try_into().map_err(map_err(name))?;
        table.insert(key, entry, 0).map_err(map_err(name))
    }

    /// The backend the connection table holds for a flow.
    pub fn conn_lookup(&self, flow: &FlowKey) -> Result<Option<u32>> {
        if flow.family == FAMILY_IPV4 {
            self.conn_get(map_names::CONN_TABLE_V4, &flow.v4())
        } else {
            self.conn_get(map_names::CONN_TABLE_V6, &flow.v6())
        }
    }

    /// The backend id the pending tables hold for `flow` (a TCP flow that sent a SYN and
    /// nothing since), if any.
    pub fn pending_lookup(&self, flow: &FlowKey) -> Result<Option<u32>> {
        if flow.family == FAMILY_IPV4 {
            self.conn_get(map_names::PENDING_V4, &flow.v4())
        } else {
            self.conn_get(map_names::PENDING_V6, &flow.v6())
        }
    }

    /// Remembers `flow` as `entry`, as the program does for a new flow (tests and tools; the
    /// packet path fills the table itself).
    pub fn conn_insert(&mut self, flow: &FlowKey, entry: ConnEntry) -> Result<()> {
        if flow.family == FAMILY_IPV4 {
            self.conn_put(map_names::CONN_TABLE_V4, &flow.v4(), entry)
        } else {
            self.conn_put(map_names::CONN_TABLE_V6, &flow.v6(), entry)
        }
    }

    /// Number of flows in the connection tables, and how many each backend id has (walks
    /// them: two syscalls per flow).
    pub fn conn_count(&self) -> Result<(usize, std::collections::BTreeMap<u32, u64>)> {
        let v4 = self.conn_table::<FlowKeyV4>(map_names::CONN_TABLE_V4)?;
        let v6 = self.conn_table::<FlowKeyV6>(map_names::CONN_TABLE_V6)?;
        let mut by_backend = std::collections::BTreeMap::new();
        let mut total = 0;
        let ids = v4
            .iter()
            .filter_map(Result::ok)
            .map(|(_, e)| e.backend_id)
            .chain(v6.iter().filter_map(Result::ok).map(|(_, e)| e.backend_id));
        for id in ids {
            total += 1;
            *by_backend.entry(id).or_insert(0) += 1;
        }
        Ok((total, by_backend))
    }

    /// The NAT counters, indexed by `NatCounter`, summed over CPUs.
    pub fn nat_counters(&self) -> Result<Vec<u64>> {
        self.per_cpu_sums(map_names::NAT_STATS, NAT_COUNTER_COUNT)
    }

    /// The first `count` counters of the per-CPU array `name`, each summed over CPUs.
    fn per_cpu_sums(&self, name: &'static str, count: u32) -> Result<Vec<u64>> {
        let stats: PerCpuArray<&MapData, u64> = typed(self.map(name)?, name)?;
        (0..count)
            .map(|i| stats.get(&i, 0).map(|v| v.iter().sum()))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(map_err(name))
    }

    fn nat_get<K: Pod>(&self, name: &'static str, key: &K) -> Result<Option<NatEntry>> {
        let table: BpfHashMap<&MapData, K, NatEntry> = typed(self.map(name)?, name)?;
        match table.get(key, 0) {
            Ok(entry) => Ok(Some(entry)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        }
    }

    /// The NAT entry of packets of `flow` as they arrive (`reply`: a backend's reply).
    pub fn nat_lookup(&self, flow: &FlowKey, reply: bool) -> Result<Option<NatEntry>> {
        self.nat_lookup_in(flow, reply, map_names::NAT_TABLES)
    }

    /// Like [`Dataplane::nat_lookup`], in the pending tables (a TCP connection whose client
    /// has not yet acknowledged the backend's SYN-ACK).
    pub fn nat_pending_lookup(&self, flow: &FlowKey, reply: bool) -> Result<Option<NatEntry>> {
        self.nat_lookup_in(flow, reply, map_names::NAT_PENDING_TABLES)
    }

    fn nat_lookup_in(
        &self,
        flow: &FlowKey,
        reply: bool,
        [v4, v6]: [&'static str; 2],
    ) -> Result<Option<NatEntry>> {
        let flag = if reply { NAT_KEY_REPLY } else { 0 };
        if flow.family == FAMILY_IPV4 {
            let mut key = flow.v4();
            key.proto |= flag;
            self.nat_get(v4, &key)
        } else {
            let mut key = flow.v6();
            key.proto |= flag;
            self.nat_get(v6, &key)
        }
    }

    /// Every NAT entry of both tables (walks them: one syscall per entry), each with its
    /// family and its key as an IPv6 table key (an IPv4 key in the first words).
    pub fn nat_entries(&self) -> Result<Vec<(u8, FlowKeyV6, NatEntry)>> {
        self.nat_entries_in(map_names::NAT_TABLES)
    }

    /// Like [`Dataplane::nat_entries`], of the pending tables.
    pub fn nat_pending_entries(&self) -> Result<Vec<(u8, FlowKeyV6, NatEntry)>> {
        self.nat_entries_in(map_names::NAT_PENDING_TABLES)
    }

    fn nat_entries_in(
        &self,
        [v4_name, v6_name]: [&'static str; 2],
    ) -> Result<Vec<(u8, FlowKeyV6, NatEntry)>> {
        let mut out = Vec::new();
        let v4: BpfHashMap<&MapData, FlowKeyV4, NatEntry> = typed(self.map(v4_name)?, v4_name)?;
        for (key, entry) in v4.iter().filter_map(Result::ok) {
            let wide = FlowKeyV6 {
                src: [key.src, 0, 0, 0],
                dst: [key.dst, 0, 0, 0],
                ports: key.ports,
                proto: key.proto,
            };
            out.push((FAMILY_IPV4, wide, entry));
        }
        let v6: BpfHashMap<&MapData, FlowKeyV6, NatEntry> = typed(self.map(v6_name)?, v6_name)?;
        out.extend(
            v6.iter()
                .filter_map(Result::ok)
                .map(|(k, e)| (balancer_common::FAMILY_IPV6, k, e)),
        );
        Ok(out)
    }

    /// The decapsulating program's counters, indexed by `DecapOutcome`.
    pub fn decap_counters(&self) -> Result<Vec<u64>> {
        let name = map_names::DECAP_STATS;
        let stats: PerCpuArray<&MapData, u64> = typed(self.map(name)?, name)?;
        (0..DECAP_OUTCOME_COUNT)
            .map(|i| stats.get(&i, 0).map(|v| v.iter().sum()))
            .collect::<Result<Vec<u64>, _>>()
            .map_err(map_err(name))
    }

    /// Kernel memory of every map (as `memlock` in /proc/self/fdinfo), by map name; the
    /// Maglev tables summed under `maglev tables`.
    pub fn memory(&self) -> std::io::Result<Vec<(String, u64)>> {
        let memlock = |fd: i32| -> std::io::Result<u64> {
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
            Ok(info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0))
        };
        let mut out = Vec::new();
        for (name, map) in self.ebpf.maps() {
            let fd = match map {
                Map::Array(d)
                | Map::ArrayOfMaps(d)
                | Map::HashMap(d)
                | Map::LruHashMap(d)
                | Map::PerCpuArray(d)
                | Map::DevMapHash(d) => d.fd().as_fd().as_raw_fd(),
                _ => continue,
            };
            out.push((name.to_owned(), memlock(fd)?));
        }
        let tables = self
            .tables
            .values()
            .map(|t| memlock(t.fd().as_fd().as_raw_fd()))
            .sum::<std::io::Result<u64>>()?;
        out.push(("maglev tables".to_owned(), tables));
        out.sort();
        Ok(out)
    }
}

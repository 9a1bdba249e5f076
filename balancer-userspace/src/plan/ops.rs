//! The map plan: the ordered map operations that take the kernel from what its maps hold to
//! what the desired state says. Computed purely; the kernel shell executes it in order.
//!
//! The order keeps every packet consistent, whatever moment it arrives at:
//! - counters of newly used ids are zeroed before anything can count into them;
//! - egress devices and backend entries are written before a table can name them;
//! - keys that go away are removed before tables change under them;
//! - a VIP id's slot (`VIP_SLOTS`: its key and meta, which established flows are checked
//!   against before any key lookup) is written before its key and cleared after its key is
//!   gone; a slot whose key changes is cleared before it is written again, so that a packet
//!   reading it while it changes sees the old key, the new key or none, never a mix of both;
//! - a VIP's Maglev table is swapped in whole (a fresh inner map, one update of the outer
//!   map), after its backends and before the key that leads to it;
//! - the prefilter bit of a key's address is set before the key is written and cleared only
//!   after it is removed (a packet never finds a key behind a clear bit);
//! - the flood cap, and a VIP's source limit (`SOURCE_LIMITS`), are written before its key
//!   and slot (whose meta flags the limit);
//! - NAT: the timeouts and a NAT VIP's translation (`NAT_VIPS`) are written before its key;
//!   the reply filter's bit of a NAT VIP's backend is set before the key too, and cleared
//!   only after (like the prefilter's);
//! - tables, backends and devices that nothing leads to any more are cleared last.
//!
//! A table whose size changes is padded, cyclically, to the larger of the old and the new
//! size, so that a packet still matching the old key (old size) finds a backend of its own
//! VIP in every slot it can hash to.
//!
//! Precondition (kept by [`crate::plan::ids::Ids`]): an id present in both states names the
//! same VIP, and a backend id the same VIP's backend.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use balancer_common::{
    defence::{FloodSettings, SourceLimit},
    hash::vip_filter_bit,
    nat::{NatSettings, NatVip},
    Backend, VipKey, VipMeta, VipSlot,
};

use crate::plan::contents::{MapContents, Table};

/// One map operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Zero the per-CPU traffic counters of a backend id about to be used.
    ZeroBackendStats(u32),
    /// Zero the per-CPU traffic counters of a VIP id about to be used.
    ZeroVipStats(u32),
    /// Add an interface to the redirect device map.
    AddEgress(u32),
    /// Write a backend entry.
    SetBackend(u32, Backend),
    /// Remove a key from the VIPS map.
    RemoveVipKey(VipKey),
    /// Write a word of the VIP address prefilter.
    SetFilterWord(u32, u64),
    /// Swap in a new Maglev table: `slots`, repeated cyclically to fill `fill` slots.
    SwapTable {
        vip_id: u32,
        slots: Table,
        fill: u32,
    },
    /// Write a VIP id's slot (its own key and meta).
    SetVipSlot(u32, VipSlot),
    /// Empty a VIP id's slot.
    ClearVipSlot(u32),
    /// Write a key of the VIPS map.
    SetVipKey(VipKey, VipMeta),
    /// Replace a VIP id's table with an empty one (an array of maps cannot delete).
    ClearTable(u32),
    /// Mark a backend id free.
    ClearBackend(u32),
    /// Remove an interface from the redirect device map.
    RemoveEgress(u32),
    /// Write the NAT timeouts.
    SetNatSettings(NatSettings),
    /// Write a NAT VIP's translation, by VIP id.
    SetNatVip(u32, NatVip),
    /// Write a word of the NAT reply filter.
    SetNatFilterWord(u32, u64),
    /// Write the per-CPU cap on new flows.
    SetFloodSettings(FloodSettings),
    /// Write a VIP's per-source limit, by VIP id.
    SetSourceLimit(u32, SourceLimit),
}

/// The operations, in the order they must be executed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapPlan {
    pub ops: Vec<MapOp>,
}

impl MapPlan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// The plan from `held` (what the maps hold) to `desired`.
pub fn plan(held: &MapContents, desired: &MapContents) -> MapPlan {
    plan_over(held, &held.keys, &nat_filter_words(held), desired, true)
}

/// The prefilter's words (the non-zero ones) for `keys`: the bit of every key's address.
pub fn filter_words(keys: &[(VipKey, VipMeta)]) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    for (key, _) in keys {
        let bit = vip_filter_bit(&key.addr, key.family);
        *words.entry(bit >> 6).or_insert(0u64) |= 1 << (bit & 63);
    }
    words
}

/// The NAT reply filter's words (the non-zero ones) for `contents`: the bit of every backend
/// of a NAT VIP (a VIP with a `NAT_VIPS` entry).
pub fn nat_filter_words(contents: &MapContents) -> BTreeMap<u32, u64> {
    backend_words(contents, |id| contents.nat.vips.contains_key(&id))
}

/// The reply filter's words while a plan runs: the bit of every backend `desired` holds of a
/// VIP that is a NAT VIP on either side (a key of the old side can lead to the new tables).
fn nat_transition_words(held: &MapContents, desired: &MapContents) -> BTreeMap<u32, u64> {
    backend_words(desired, |id| {
        held.nat.vips.contains_key(&id) || desired.nat.vips.contains_key(&id)
    })
}

fn backend_words(contents: &MapContents, nat: impl Fn(u32) -> bool) -> BTreeMap<u32, u64> {
    let mut words = BTreeMap::new();
    for backend in contents.backends.values().filter(|b| nat(b.vip_id)) {
        let bit = vip_filter_bit(&backend.addr, backend.family);
        *words.entry(bit >> 6).or_insert(0u64) |= 1 << (bit & 63);
    }
    words
}

/// Each VIP id's slot: its own key (not the fragments-only or address entries) and meta.
pub fn vip_slots(keys: &[(VipKey, VipMeta)]) -> BTreeMap<u32, VipSlot> {
    keys.iter()
        .filter(|(_, meta)| !meta.is_address() && !meta.is_fragments_only())
        .map(|&(key, meta)| (meta.vip_id, VipSlot { key, meta }))
        .collect()
}

/// The plan after a plan failed half-way, when what the maps hold is not known: every
/// desired entry is written again, and every entry `held` recorded and `desired` does not
/// want is cleared.
pub fn rewrite_all(held: &MapContents, desired: &MapContents) -> MapPlan {
    // An entry that matches nothing desired: every desired entry differs from it.
    let unknown_meta = VipMeta {
        vip_id: u32::MAX,
        ..VipMeta::default()
    };
    let unknown = MapContents {
        keys: held.keys.iter().map(|(k, _)| (*k, unknown_meta)).collect(),
        backends: held
            .backends
            .keys()
            .map(|&id| (id, Backend::default()))
            .collect(),
        tables: held
            .tables
            .keys()
            .map(|&id| (id, Table::from(Vec::new())))
            .collect(),
        egress: held.egress.difference(&desired.egress).copied().collect(),
        // Not known either: everything desired is written.
        nat: crate::plan::contents::NatContents {
            settings: NatSettings {
                syn_ns: u64::MAX,
                ..NatSettings::default()
            },
            vips: held
                .nat
                .vips
                .keys()
                .map(|&id| {
                    let unknown = NatVip {
                        snat_count: u16::MAX,
                        ..NatVip::default()
                    };
                    (id, unknown)
                })
                .collect(),
        },
        // Not known: everything desired is written.
        defence: crate::plan::contents::DefenceContents {
            flood: FloodSettings {
                new_flows_per_cpu: u64::MAX,
            },
            limits: std::collections::BTreeMap::new(),
        },
    };
    // What the prefilter and the slots hold is not known either: every word either side
    // names, and every desired slot, is written.
    plan_over(
        &unknown,
        &held.keys,
        &nat_filter_words(held),
        desired,
        false,
    )
}

fn key_map(contents: &MapContents) -> HashMap<VipKey, VipMeta> {
    contents.keys.iter().copied().collect()
}

/// The plan from `base` to `desired`; `held_keys` are the keys the maps hold, which packets
/// can match while the plan runs (for padding tables), and from which the prefilter's words
/// and the slots follow. `known`: the prefilter and the slots hold what `held_keys` imply
/// (false after a failed plan).
fn plan_over(
    base: &MapContents,
    held_keys: &[(VipKey, VipMeta)],
    held_nat: &BTreeMap<u32, u64>,
    desired: &MapContents,
    known: bool,
) -> MapPlan {
    let mut ops = Vec::new();
    let live_keys: HashMap<VipKey, VipMeta> = held_keys.iter().copied().collect();
    let base_keys = key_map(base);
    let desired_keys = key_map(desired);
    // Counters of ids the maps do not hold yet; devices and entries tables will name.
    for &id in desired.backends.keys() {
        if !base.backends.contains_key(&id) {
            ops.push(MapOp::ZeroBackendStats(id));
        }
    }
    for &id in desired.tables.keys() {
        if !base.tables.contains_key(&id) {
            ops.push(MapOp::ZeroVipStats(id));
        }
    }
    for &ifindex in desired.egress.difference(&base.egress) {
        ops.push(MapOp::AddEgress(ifindex));
    }
    for (&id, entry) in &desired.backends {
        if base.backends.get(&id) != Some(entry) {
            ops.push(MapOp::SetBackend(id, *entry));
        }
    }
    // NAT: the timeouts and each NAT VIP's translation, and its backends' reply filter bits,
    // before a table or key can lead to them.
    if base.nat.settings != desired.nat.settings {
        ops.push(MapOp::SetNatSettings(desired.nat.settings));
    }
    for (&id, vip) in &desired.nat.vips {
        if base.nat.vips.get(&id) != Some(vip) {
            ops.push(MapOp::SetNatVip(id, *vip));
        }
    }
    if base.defence.flood != desired.defence.flood {
        ops.push(MapOp::SetFloodSettings(desired.defence.flood));
    }
    for (&id, limit) in &desired.defence.limits {
        if base.defence.limits.get(&id) != Some(limit) {
            ops.push(MapOp::SetSourceLimit(id, *limit));
        }
    }
    // The old bits stay until the old keys and tables are gone, whether the maps are known to
    // hold them or not.
    let mut during = held_nat.clone();
    for (word, bits) in nat_transition_words(base, desired) {
        *during.entry(word).or_insert(0) |= bits;
    }
    for (&word, &bits) in &during {
        if !known || held_nat.get(&word).copied().unwrap_or(0) != bits {
            ops.push(MapOp::SetNatFilterWord(word, bits));
        }
    }
    let nat_filter = FilterPlan::new(during, true, nat_filter_words(desired));
    // Keys that go away (and slots that lose or change their key), then tables, then the
    // keys that lead to them.
    for (key, _) in &base.keys {
        if !desired_keys.contains_key(key) {
            ops.push(MapOp::RemoveVipKey(*key));
        }
    }
    let slots = SlotPlan::new(held_keys, known, desired);
    slots.clear(&mut ops);
    for (&vip_id, slots) in &desired.tables {
        if base.tables.get(&vip_id) != Some(slots) {
            let fill = padded_size(vip_id, slots, &live_keys, &desired_keys);
            let slots = slots.clone();
            ops.push(MapOp::SwapTable {
                vip_id,
                slots,
                fill,
            });
        }
    }
    // The prefilter: a new key's bit is set before the key, an old key's bit cleared only
    // after the key is gone, so that no key is ever behind a clear bit (the bit of a key
    // that stays is set in both words, and every word is written whole).
    let filter = FilterPlan::new(filter_words(held_keys), known, filter_words(&desired.keys));
    filter.before_keys(&mut ops, MapOp::SetFilterWord);
    slots.set(&mut ops);
    for (key, meta) in &desired.keys {
        if base_keys.get(key) != Some(meta) {
            ops.push(MapOp::SetVipKey(*key, *meta));
        }
    }
    filter.after_keys(&mut ops, MapOp::SetFilterWord);
    nat_filter.after_keys(&mut ops, MapOp::SetNatFilterWord);
    clear_unreachable(base, desired, &mut ops);
    MapPlan { ops }
}

/// The slots to clear and write around the key changes.
struct SlotPlan {
    /// Slots as the maps hold them.
    held: BTreeMap<u32, VipSlot>,
    desired: BTreeMap<u32, VipSlot>,
    /// Whether `held` is what the maps hold (else every desired slot is written).
    known: bool,
}

impl SlotPlan {
    fn new(held_keys: &[(VipKey, VipMeta)], known: bool, desired: &MapContents) -> SlotPlan {
        SlotPlan {
            held: vip_slots(held_keys),
            desired: vip_slots(&desired.keys),
            known,
        }
    }

    /// Slots whose key goes away or changes: emptied once their keys are removed.
    fn clear(&self, ops: &mut Vec<MapOp>) {
        for (&id, held) in &self.held {
            if self.desired.get(&id).map(|d| d.key) != Some(held.key) {
                ops.push(MapOp::ClearVipSlot(id));
            }
        }
    }

    /// Slots the maps lack (or may lack), written before the keys.
    fn set(&self, ops: &mut Vec<MapOp>) {
        for (&id, desired) in &self.desired {
            if !self.known || self.held.get(&id) != Some(desired) {
                ops.push(MapOp::SetVipSlot(id, *desired));
            }
        }
    }
}

/// The words of a filter (the prefilter, the NAT reply filter) to write around the key
/// changes.
struct FilterPlan {
    /// Words as the maps hold them (`None`: not known, every word is written).
    base: Option<BTreeMap<u32, u64>>,
    desired: BTreeMap<u32, u64>,
    /// Every word either side has bits in.
    words: BTreeSet<u32>,
}

impl FilterPlan {
    fn new(held: BTreeMap<u32, u64>, known: bool, desired: BTreeMap<u32, u64>) -> FilterPlan {
        let words = held.keys().chain(desired.keys()).copied().collect();
        FilterPlan {
            base: known.then_some(held),
            desired,
            words,
        }
    }

    fn held(&self, word: u32) -> Option<u64> {
        self.base
            .as_ref()
            .map(|b| b.get(&word).copied().unwrap_or(0))
    }

    fn union(&self, word: u32) -> u64 {
        self.held(word).unwrap_or(0) | self.desired.get(&word).copied().unwrap_or(0)
    }

    /// The bits of both sides, where the maps lack some.
    fn before_keys(&self, ops: &mut Vec<MapOp>, op: fn(u32, u64) -> MapOp) {
        for &word in &self.words {
            if self.held(word) != Some(self.union(word)) {
                ops.push(op(word, self.union(word)));
            }
        }
    }

    /// The desired bits, where the union has more.
    fn after_keys(&self, ops: &mut Vec<MapOp>, op: fn(u32, u64) -> MapOp) {
        for &word in &self.words {
            let desired = self.desired.get(&word).copied().unwrap_or(0);
            if desired != self.union(word) {
                ops.push(op(word, desired));
            }
        }
    }
}

/// What nothing leads to any more: tables of VIP ids gone, backends gone, devices unused.
fn clear_unreachable(base: &MapContents, desired: &MapContents, ops: &mut Vec<MapOp>) {
    for &vip_id in base.tables.keys() {
        if !desired.tables.contains_key(&vip_id) {
            ops.push(MapOp::ClearTable(vip_id));
        }
    }
    for &id in base.backends.keys() {
        if !desired.backends.contains_key(&id) {
            ops.push(MapOp::ClearBackend(id));
        }
    }
    for &ifindex in base.egress.difference(&desired.egress) {
        ops.push(MapOp::RemoveEgress(ifindex));
    }
}

/// How many slots a swapped table must fill: its own size, or more while a key still in
/// the maps hashes this VIP's packets over a larger table.
fn padded_size(
    vip_id: u32,
    slots: &Table,
    held_keys: &HashMap<VipKey, VipMeta>,
    desired_keys: &HashMap<VipKey, VipMeta>,
) -> u32 {
    held_keys
        .iter()
        .filter(|(key, meta)| {
            meta.vip_id == vip_id && !meta.is_address() && desired_keys.contains_key(*key)
        })
        .map(|(_, meta)| meta.table_size)
        .chain([slots.len() as u32])
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;

//! Select: which backend gets this packet.
//!
//! 1. The connection table, if it remembers the flow and its backend is still a live
//!    backend of a VIP that the packet is addressed to. For an established flow this comes
//!    first, before any VIP lookup (`established`): the entry names the backend, the backend
//!    its VIP, and `VIP_SLOTS` that VIP's key, which the packet's destination must match.
//!    Draining backends keep their flows here. A TCP SYN skips this step: it starts a new
//!    connection, even when its 5-tuple was used before (a client reusing a source port must
//!    not land on a backend that is draining).
//! 2. Otherwise a pending flow's choice (`balancer_common::defence`): a TCP flow whose SYN
//!    was placed and that sends its next packet now is promoted to the connection table.
//! 3. Otherwise the VIP's Maglev table at `hash(flow) % table_size`, and the choice is
//!    remembered with the hash: a SYN's in the pending table, any other flow's in the
//!    connection table, each within the defences' limits (see `backend`). Down and draining
//!    backends are not in the table (the daemon leaves them out), so re-selection moves a
//!    flow off a down backend.

// Keys and values built in map memory (`FlowKeys`) are passed to the map helpers by
// reference: by value, as clippy suggests, they would be copied to the stack, which is full.
#![allow(clippy::needless_borrows_for_generic_args)]

use balancer_common::{
    defence::DefenceCounter, hash::vip_flow_hash, Backend, ConnEntry, FlowKey, Outcome, SyncEvent,
    VipMeta, FAMILY_IPV4, PROTO_TCP,
};

use crate::{
    defence,
    maps::{
        hash_seed, FlowKeys, BACKENDS, CONN_TABLE_V4, CONN_TABLE_V6, MAGLEV_TABLES, PENDING_V4,
        PENDING_V6, SYNC_EVENTS, SYNC_STATS, VIP_SLOTS,
    },
    parse::{Kind, Packet},
};

/// The flow's connection-table entry, from its family's table.
#[inline(always)]
fn remembered(flow: &FlowKey) -> Option<*const ConnEntry> {
    if flow.family == FAMILY_IPV4 {
        CONN_TABLE_V4.get_ptr(flow.v4())
    } else {
        CONN_TABLE_V6.get_ptr(flow.v6())
    }
}

/// Hands a new-flow decision to the daemon for the fleet's peers (VIPs with `VIP_F_SYNC`
/// only: one flag test for the others). A full ring loses the decision, counted.
#[inline(always)]
fn publish(keys: &mut FlowKeys, flow: &FlowKey, backend_id: u32, flow_hash: u32) {
    // Built in map memory: 48 bytes the stack has no room for.
    keys.event = SyncEvent {
        flow: *flow,
        backend_id,
        flow_hash,
    };
    if SYNC_EVENTS.output(&keys.event, 0).is_err() {
        if let Some(lost) = SYNC_STATS.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run.
            unsafe { *lost += 1 };
        }
    }
}

/// The chosen backend and what forwarding needs of its VIP, copied out of the map slots.
/// Plain scalars on purpose: a pointer in here would share stack space with the error of
/// `Result<Selected, _>`, and LLVM may then read half of a spilled pointer, which the
/// verifier rejects ("invalid size of register fill").
pub struct Selected {
    pub id: u32,
    pub vip_id: u32,
    /// 1 if the flow missed the connection table, else 0.
    pub new_flows: u32,
    /// The flow's hash as its VIP places it: computed by the Maglev step, or remembered in
    /// the connection table (computed once per flow, not per packet).
    pub hash: u32,
    pub addr: [u8; 16],
    pub tunnel_src: [u8; 16],
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ifindex: u32,
    pub mtu: u16,
    pub family: u8,
    pub tunnel_src_bits: u8,
    /// The VIP encapsulates (`VipMeta::tunnels`).
    pub tunnels: bool,
}

impl Selected {
    #[inline(always)]
    fn new(id: u32, backend: &Backend, vip: &VipMeta, new_flows: u32, hash: u32) -> Self {
        Selected {
            id,
            vip_id: vip.vip_id,
            new_flows,
            hash,
            addr: backend.addr,
            tunnel_src: backend.tunnel_src,
            dst_mac: backend.dst_mac,
            src_mac: backend.src_mac,
            ifindex: backend.ifindex,
            mtu: backend.mtu,
            family: backend.family,
            tunnel_src_bits: backend.tunnel_src_bits,
            tunnels: vip.tunnels(),
        }
    }
}

/// An established flow, found by its connection-table entry alone: one hash lookup, then
/// two arrays read by id. `None` (the VIP lookup decides) when the table does not know the
/// flow, its backend is free or down, or the backend's VIP is not the packet's destination
/// any more (removed, or its id reused). Only for packets that are neither SYNs, fragments
/// nor ICMP, whose flow key is the same before and after classification.
#[inline(always)]
pub fn established(packet: &Packet) -> Option<Selected> {
    let flow = &packet.flow;
    let (id, backend, hash) = remembered_live(flow)?;
    let slot = VIP_SLOTS.get(backend.vip_id)?;
    // A NAT VIP's flows are in the NAT tables; an entry here is from before the VIP changed
    // its mode.
    if !slot.serves(flow) || slot.meta.translates() {
        return None;
    }
    Some(Selected::new(id, backend, &slot.meta, 0, hash))
}

/// The live backend the connection table remembers for `flow` (its id and entry), with the
/// flow's hash. Which VIP the backend belongs to is the caller's to check.
#[inline(always)]
fn remembered_live(flow: &FlowKey) -> Option<(u32, &'static Backend, u32)> {
    let entry = remembered(flow)?;
    // SAFETY: the value stays valid for this run of the program (RCU); a concurrent eviction
    // can at worst give a stale id, which is checked like any other.
    let (id, hash) = unsafe { ((*entry).backend_id, (*entry).flow_hash) };
    let backend = BACKENDS.get(id)?;
    backend.is_live().then_some((id, backend, hash))
}

/// The backend the VIP's Maglev table names for `flow` (its id and entry), and the flow's
/// hash. Not remembered here.
#[inline(always)]
pub fn table_choice(
    vip: &VipMeta,
    flow: &FlowKey,
) -> Result<(u32, &'static Backend, u32), Outcome> {
    let hash = vip_flow_hash(vip, flow, hash_seed());
    let slot = hash % vip.table_size;
    let id = *MAGLEV_TABLES
        .get_value(vip.vip_id, &slot)
        .ok_or(Outcome::NoBackend)?;
    let backend = BACKENDS.get(id).ok_or(Outcome::NoBackend)?;
    if !backend.is_valid() {
        return Err(Outcome::NoBackend);
    }
    Ok((id, backend, hash))
}

/// The backend for a packet of `vip` that the fast path did not place: the connection
/// table's (if `ask_table`), a pending flow's (promoted to the connection table by any packet
/// but an ICMP error), else the Maglev table's. What a new flow writes:
/// - a SYN: the pending table, or, for a flow the connection table holds (a reused port), its
///   entry rewritten in place; no slot claimed in the connection table either way;
/// - any other packet (UDP, a TCP flow met mid-stream): the connection table;
/// - an ICMP error: nothing.
///
/// Each only while the CPU is under its cap (`defence::admit`), and for a VIP with a
/// per-source limit only while the source is under it (else the packet is dropped).
#[inline(always)]
pub fn backend(vip: &VipMeta, packet: &Packet, ask_table: bool) -> Result<Selected, Outcome> {
    // One `Selected` built, whichever way the backend was found: each would take stack.
    let (id, hash, new_flows) = choose(vip, packet, ask_table)?;
    let backend = BACKENDS.get(id).ok_or(Outcome::NoBackend)?;
    Ok(Selected::new(id, backend, vip, new_flows, hash))
}

/// `backend`'s choice: the backend id, the flow's hash, and 1 for a new flow. What lives
/// across helper calls is kept in `FlowKeys` (map memory): the stack is nearly full.
#[inline(always)]
fn choose(vip: &VipMeta, packet: &Packet, ask_table: bool) -> Result<(u32, u32, u32), Outcome> {
    let flow = &packet.flow;
    if ask_table {
        if let Some((id, backend, hash)) = remembered_live(flow) {
            if backend.vip_id == vip.vip_id {
                return Ok((id, hash, 0));
            }
        }
    }
    let keys = FlowKeys::of(flow)?;
    let error = packet.kind == Kind::IcmpError;
    let handshake = flow.proto == PROTO_TCP && !packet.fragment;
    let new_flows = if handshake && !packet.syn && pending_live(vip, keys) {
        if error {
            return Ok((keys.entry.backend_id, keys.entry.flow_hash, 0));
        }
        // Promoted: the flow is real.
        let _ = if keys.v4 {
            PENDING_V4.remove(&keys.key4)
        } else {
            PENDING_V6.remove(&keys.key6)
        };
        defence::count(DefenceCounter::Promoted);
        0
    } else {
        let now = defence::now();
        // A TCP flow met mid-stream is not new to its source: not limited.
        let opens = !error && (packet.syn || !handshake);
        if opens && vip.limits_sources() && !defence::source_allowed(vip, flow, keys, now) {
            return Err(Outcome::SourceLimited);
        }
        let (id, _, hash) = table_choice(vip, flow)?;
        if error {
            return Ok((id, hash, 0));
        }
        keys.entry = ConnEntry {
            backend_id: id,
            flow_hash: hash,
        };
        if packet.syn && handshake {
            if !reused(keys) && defence::admit(now) {
                pend(keys);
            }
            return Ok((id, hash, 1));
        }
        if !defence::admit(now) {
            return Ok((id, hash, 1));
        }
        1
    };
    let _ = if keys.v4 {
        CONN_TABLE_V4.insert(&keys.key4, &keys.entry, 0)
    } else {
        CONN_TABLE_V6.insert(&keys.key6, &keys.entry, 0)
    };
    let (id, hash) = (keys.entry.backend_id, keys.entry.flow_hash);
    if vip.syncs() {
        publish(keys, flow, id, hash);
    }
    Ok((id, hash, new_flows))
}

/// Whether the flow is pending with a live backend of `vip`; its entry then in `keys.entry`.
#[inline(always)]
fn pending_live(vip: &VipMeta, keys: &mut FlowKeys) -> bool {
    let entry = if keys.v4 {
        PENDING_V4.get_ptr(&keys.key4)
    } else {
        PENDING_V6.get_ptr(&keys.key6)
    };
    let Some(entry) = entry else { return false };
    // SAFETY: as in `remembered_live`.
    keys.entry = unsafe { *entry };
    match BACKENDS.get(keys.entry.backend_id) {
        Some(backend) => backend.is_live() && backend.vip_id == vip.vip_id,
        None => false,
    }
}

/// A SYN for a flow the connection table holds (its client reused the port): the entry
/// rewritten in place with the new choice. A lookup, not an update: an LRU update takes a
/// free node (perhaps evicting) before it checks whether the key exists.
#[inline(always)]
fn reused(keys: &FlowKeys) -> bool {
    let found = if keys.v4 {
        CONN_TABLE_V4.get_ptr_mut(&keys.key4)
    } else {
        CONN_TABLE_V6.get_ptr_mut(&keys.key6)
    };
    match found {
        Some(slot) => {
            // SAFETY: a hash map value, valid for this run of the program (RCU). A reader on
            // another CPU may see one field old and one new: both name a live choice.
            unsafe { *slot = keys.entry };
            defence::count(DefenceCounter::Reused);
            true
        }
        None => false,
    }
}

/// Writes a SYN's choice to the pending table. An insert can only fail if the kernel cannot
/// allocate: the flow is placed by the Maglev table again at its next packet.
#[inline(always)]
fn pend(keys: &FlowKeys) {
    let _ = if keys.v4 {
        PENDING_V4.insert(&keys.key4, &keys.entry, 0)
    } else {
        PENDING_V6.insert(&keys.key6, &keys.entry, 0)
    };
    defence::count(DefenceCounter::Pending);
}

//! Select: which backend gets this packet.
//!
//! 1. The connection table, if it remembers the flow and its backend is still a live
//!    backend of a VIP that the packet is addressed to. For an established flow this comes
//!    first, before any VIP lookup (`established`): the entry names the backend, the backend
//!    its VIP, and `VIP_SLOTS` that VIP's key, which the packet's destination must match.
//!    Draining backends keep their flows here. A TCP SYN skips this step: it starts a new
//!    connection, even when its 5-tuple was used before (a client reusing a source port must
//!    not land on a backend that is draining).
//! 2. Otherwise the VIP's Maglev table at `hash(flow) % table_size`, and the choice is
//!    remembered with the hash. Down and draining backends are not in the table (the daemon
//!    leaves them out), so re-selection moves a flow off a down backend.

use balancer_common::{
    hash::vip_flow_hash, Backend, ConnEntry, FlowKey, Outcome, SyncEvent, VipMeta, FAMILY_IPV4,
};

use crate::{
    maps::{
        hash_seed, BACKENDS, CONN_TABLE_V4, CONN_TABLE_V6, MAGLEV_TABLES, SYNC_EVENTS, SYNC_STATS,
        VIP_SLOTS,
    },
    parse::Packet,
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

/// Remembers the flow. An insert can only fail if the kernel cannot allocate; the packet is
/// forwarded anyway and the flow is placed by the table again next time.
#[inline(always)]
fn remember(flow: &FlowKey, entry: ConnEntry) {
    let _ = if flow.family == FAMILY_IPV4 {
        CONN_TABLE_V4.insert(flow.v4(), entry, 0)
    } else {
        CONN_TABLE_V6.insert(flow.v6(), entry, 0)
    };
}

/// Hands a new-flow decision to the daemon for the fleet's peers (VIPs with `VIP_F_SYNC`
/// only: one flag test for the others). A full ring loses the decision, counted.
#[inline(always)]
fn publish(flow: &FlowKey, backend_id: u32, flow_hash: u32) {
    let event = SyncEvent {
        flow: *flow,
        backend_id,
        flow_hash,
    };
    if SYNC_EVENTS.output(event, 0).is_err() {
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

/// The backend for a packet of `vip`: the connection table's (if `ask_table`), else the
/// Maglev table's, remembered.
#[inline(always)]
pub fn backend(vip: &VipMeta, packet: &Packet, ask_table: bool) -> Result<Selected, Outcome> {
    let flow = &packet.flow;
    if ask_table {
        if let Some((id, backend, hash)) = remembered_live(flow) {
            if backend.vip_id == vip.vip_id {
                return Ok(Selected::new(id, backend, vip, 0, hash));
            }
        }
    }

    let (id, backend, hash) = table_choice(vip, flow)?;
    remember(
        flow,
        ConnEntry {
            backend_id: id,
            flow_hash: hash,
        },
    );
    if vip.syncs() {
        publish(flow, id, hash);
    }
    Ok(Selected::new(id, backend, vip, 1, hash))
}

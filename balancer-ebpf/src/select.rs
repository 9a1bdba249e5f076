//! Select: which backend gets this packet.
//!
//! 1. The connection table, if it remembers the flow and its backend is still a live, healthy
//!    backend of this VIP. Draining backends keep their flows here. A TCP SYN skips this
//!    step: it starts a new connection, even when its 5-tuple was used before (a client
//!    reusing a source port must not land on a backend that is draining).
//! 2. Otherwise the VIP's Maglev table at `hash(flow) % table_size`, and the choice is
//!    remembered. Down and draining backends are not in the table (the daemon leaves them
//!    out), so re-selection moves a flow off a down backend.

use balancer_common::{hash::vip_flow_hash, Backend, ConnEntry, FlowKey, Outcome, VipMeta};

use crate::{
    maps::{hash_seed, BACKENDS, CONN_TABLE, MAGLEV_TABLES},
    parse::Packet,
};

/// The chosen backend, copied out of its map slot. Plain scalars on purpose: a pointer in
/// here would share stack space with the error of `Result<Selected, _>`, and LLVM may then
/// read half of a spilled pointer, which the verifier rejects ("invalid size of register
/// fill").
pub struct Selected {
    pub id: u32,
    /// 1 if the flow missed the connection table, else 0.
    pub new_flows: u32,
    /// The flow's hash, when the Maglev table placed it (`new_flows == 1`); else 0, not
    /// computed: a connection-table hit needs no hash (see `flow_hash`).
    hash: u32,
    pub addr: [u8; 16],
    pub tunnel_src: [u8; 16],
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ifindex: u32,
    pub mtu: u16,
    pub family: u8,
    pub tunnel_src_bits: u8,
}

impl Selected {
    #[inline(always)]
    fn new(id: u32, backend: &Backend, new_flows: u32, hash: u32) -> Self {
        Selected {
            id,
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
        }
    }

    /// The flow's hash as the VIP sees it: the one selection computed, or, for a flow the
    /// connection table knew, computed now (a tunnel's outer header needs it; direct server
    /// return never asks).
    #[inline(always)]
    pub fn flow_hash(&self, vip: &VipMeta, flow: &FlowKey) -> u32 {
        if self.new_flows == 1 {
            self.hash
        } else {
            hash(vip, flow)
        }
    }
}

/// The flow's hash as the VIP sees it, with the seed the daemon set.
#[inline(always)]
fn hash(vip: &VipMeta, flow: &FlowKey) -> u32 {
    vip_flow_hash(vip, flow, hash_seed())
}

#[inline(always)]
pub fn backend(vip: &VipMeta, packet: &Packet) -> Result<Selected, Outcome> {
    let flow = &packet.flow;
    if let Some(entry) = if packet.syn {
        None
    } else {
        CONN_TABLE.get_ptr(flow)
    } {
        // SAFETY: the value stays valid for this run of the program (RCU); a concurrent
        // eviction can at worst give a stale id, which is checked below like any other.
        let id = unsafe { (*entry).backend_id };
        if let Some(backend) = BACKENDS.get(id) {
            if backend.is_live() && backend.vip_id == vip.vip_id {
                return Ok(Selected::new(id, backend, 0, 0));
            }
        }
    }

    let hash = hash(vip, flow);
    let slot = hash % vip.table_size;
    let id = *MAGLEV_TABLES
        .get_value(vip.vip_id, &slot)
        .ok_or(Outcome::NoBackend)?;
    let backend = BACKENDS.get(id).ok_or(Outcome::NoBackend)?;
    if !backend.is_valid() {
        return Err(Outcome::NoBackend);
    }
    // An insert can only fail if the kernel cannot allocate; the packet is forwarded anyway
    // and the flow is placed by the table again next time.
    let _ = CONN_TABLE.insert(
        flow,
        ConnEntry {
            backend_id: id,
            _reserved: 0,
        },
        0,
    );
    Ok(Selected::new(id, backend, 1, hash))
}

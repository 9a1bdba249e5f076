//! Classify: is the packet addressed to a VIP? First the prefilter (one bit per bucket of
//! destination addresses): a clear bit means no VIP, and the packet leaves without a hash
//! lookup. Then, for packets the connection table did not settle (see `select::established`),
//! the VIPS map: exact (address, port, protocol) first, then the address's port-0 entry: an
//! any-port VIP, or the entry that takes a VIP's non-first fragments (which carry no port).

use balancer_common::{
    hash::vip_filter_bit, Outcome, VipKey, VipMeta, FAMILY_IPV4, PROTO_ICMP, PROTO_ICMPV6,
};

use crate::{
    maps::{VIPS, VIP_FILTER},
    parse::Packet,
};

/// Whether `VIPS` may have a key for this destination address: false means it has none.
#[inline(always)]
fn may_be_vip(addr: &[u8; 16], family: u8) -> bool {
    let bit = vip_filter_bit(addr, family);
    VIP_FILTER
        .get(bit >> 6)
        .is_some_and(|word| *word & (1u64 << (bit & 63)) != 0)
}

#[inline(always)]
fn lookup(key: &VipKey) -> Option<&'static VipMeta> {
    // SAFETY: the kernel keeps a hash map value alive for the whole program run (RCU).
    VIPS.get_ptr(*key).map(|meta| unsafe { &*meta })
}

/// What a packet that is not for a VIP counts as.
#[inline(always)]
fn not_ours(packet: &Packet) -> Outcome {
    if packet.fragment {
        Outcome::Fragment
    } else {
        Outcome::NotVip
    }
}

/// The prefilter, for TCP, UDP and ICMP errors (by the flow's destination): `Err` when no VIP
/// has the destination's address.
#[inline(always)]
pub fn prefilter(packet: &Packet) -> Result<(), Outcome> {
    let flow = &packet.flow;
    if may_be_vip(&flow.dst, flow.family) {
        Ok(())
    } else {
        Err(not_ours(packet))
    }
}

/// The VIP of a TCP or UDP packet (or of the flow an ICMP error is about) that passed the
/// prefilter. Fragments: see `VIP_F_FRAGMENTS` (`VipMeta::balances_fragments`); their ports
/// are cleared here, so that every fragment of a datagram hashes alike.
#[inline(always)]
pub fn vip(packet: &mut Packet) -> Result<&'static VipMeta, Outcome> {
    let flow = &packet.flow;
    let not_ours = not_ours(packet);
    let mut meta = lookup(&VipKey::from_words(
        flow.dst_words(),
        flow.dst_port,
        flow.proto,
        flow.family,
    ));
    if meta.is_none() && flow.dst_port != 0 {
        meta = lookup(&VipKey::from_words(
            flow.dst_words(),
            0,
            flow.proto,
            flow.family,
        ));
    }
    let meta = meta.ok_or(not_ours)?;
    if packet.fragment {
        if !meta.balances_fragments() {
            return Err(Outcome::Fragment);
        }
        packet.flow.src_port = 0;
        packet.flow.dst_port = 0;
    } else if meta.is_fragments_only() {
        return Err(Outcome::NotVip);
    }
    Ok(meta)
}

/// Whether an echo request's destination is a VIP address.
#[inline(always)]
pub fn is_vip_address(packet: &Packet) -> bool {
    let flow = &packet.flow;
    if !may_be_vip(&flow.dst, flow.family) {
        return false;
    }
    let proto = if flow.family == FAMILY_IPV4 {
        PROTO_ICMP
    } else {
        PROTO_ICMPV6
    };
    lookup(&VipKey::from_words(flow.dst_words(), 0, proto, flow.family))
        .is_some_and(VipMeta::is_address)
}

//! Frame surgery shared by the rewrites and the balancer's own answers: room made or removed
//! between the L2 header and the IP packet, the Ethernet addresses set or swapped, and the IP
//! headers the balancer writes itself (tunnel outer headers, ICMP answers).
//!
//! `l3` is the L2 header's length: where the IP packet starts, after the Ethernet header and
//! the VLAN tag if any. The EtherType that announces the IP packet is the L2 header's last two
//! bytes either way (see `ether_type_at` for how that offset must be written).

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};

use crate::{
    access::{copy_within, ptr_at_mut, write},
    wire::{EthHdr, Ipv4Hdr, Ipv6Hdr, ETH_HLEN, IPV4_HLEN, IPV4_VERSION_IHL, IP_DF},
};

/// Hop limit of outer headers and of the balancer's own answers.
pub const TTL: u8 = 64;

/// Makes `room` bytes of room between the L2 header and the IP packet: grows the frame at its
/// head and moves the L2 header there, announcing `ether_type`. The room starts at `l3`.
#[inline(always)]
pub fn grow_front(ctx: &XdpContext, room: usize, l3: usize, ether_type: u16) -> Option<()> {
    // SAFETY: the helper only moves the packet's start; every pointer is re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(room as i32)) } != 0 {
        return None;
    }
    copy_within::<ETH_HLEN>(ctx, room, 0)?;
    if l3 > ETH_HLEN {
        // The VLAN tag's TCI; its EtherType is written below.
        copy_within::<2>(ctx, room + ETH_HLEN, ETH_HLEN)?;
    }
    // The EtherType that announces the IP packet (after the tag, if any).
    write(ctx, ether_type_at(l3), ether_type)
}

/// Removes the `len` bytes between the L2 header and what follows (an outer IP header),
/// announcing `ether_type` for what follows.
#[inline(always)]
pub fn shrink_front(ctx: &XdpContext, len: usize, l3: usize, ether_type: u16) -> Option<()> {
    // Move the Ethernet header (and VLAN tag) forward over the outer IP header, then drop
    // the bytes in front. The regions do not overlap: the outer header is at least 20
    // bytes, the L2 header at most 18.
    copy_within::<ETH_HLEN>(ctx, 0, len)?;
    if l3 > ETH_HLEN {
        copy_within::<2>(ctx, ETH_HLEN, len + ETH_HLEN)?;
    }
    // The EtherType that announces the inner packet (after the tag, if any).
    write(ctx, len + ether_type_at(l3), ether_type)?;
    // SAFETY: shrinks the packet from the front; nothing is read afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, len as i32) } != 0 {
        return None;
    }
    Some(())
}

/// Where the EtherType announcing the IP packet sits: 12 without a VLAN tag, 16 with one.
///
/// Chosen between two constants on purpose, never computed as `l3 - 2`: LLVM folds that
/// subtraction into the store after the bounds check (`*(ptr - 2)` of a pointer checked up to
/// its end), and the verifier refuses a packet access at a negative offset from the pointer it
/// checked ("R3 offset is outside of the packet", seen in `balancer_decap`).
#[inline(always)]
fn ether_type_at(l3: usize) -> usize {
    if l3 > ETH_HLEN {
        ETH_HLEN + 2
    } else {
        ETH_HLEN - 2
    }
}

/// Addresses the frame from `src` to `dst`.
#[inline(always)]
pub fn set_addresses(ctx: &XdpContext, dst: [u8; 6], src: [u8; 6]) -> Option<()> {
    let eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at_mut checked the bounds.
    unsafe {
        (*eth).dst = dst;
        (*eth).src = src;
    }
    Some(())
}

/// Answers the frame to its sender: swaps the Ethernet addresses.
#[inline(always)]
pub fn turn_around(ctx: &XdpContext) -> Option<()> {
    let eth = ptr_at_mut::<EthHdr>(ctx, 0)?;
    // SAFETY: ptr_at_mut checked the bounds.
    unsafe { core::mem::swap(&mut (*eth).dst, &mut (*eth).src) };
    Some(())
}

/// An IPv4 header of the balancer's own in front of `payload_len` bytes: no options, not a
/// fragment, TTL `TTL`, checksum filled in. `dont_fragment` sets DF.
#[inline(always)]
pub fn ipv4_header(
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    payload_len: usize,
    tos: u8,
    dont_fragment: bool,
) -> Ipv4Hdr {
    let mut header = Ipv4Hdr {
        version_ihl: IPV4_VERSION_IHL,
        tos,
        total_len: ((IPV4_HLEN + payload_len) as u16).to_be(),
        id: 0,
        frag_off: if dont_fragment { IP_DF } else { 0 },
        ttl: TTL,
        proto,
        check: 0,
        src,
        dst,
    };
    header.check = header.checksum();
    header
}

/// An IPv6 header of the balancer's own in front of `payload_len` bytes, hop limit `TTL`.
#[inline(always)]
pub fn ipv6_header(
    next_header: u8,
    src: [u8; 16],
    dst: [u8; 16],
    payload_len: usize,
    traffic_class: u8,
    flow_label: u32,
) -> Ipv6Hdr {
    Ipv6Hdr {
        vtc_flow: Ipv6Hdr::vtc_flow(traffic_class, flow_label),
        payload_len: (payload_len as u16).to_be(),
        next_header,
        hop_limit: TTL,
        src,
        dst,
    }
}

//! Rewrite, per VIP forwarding mode, and transmit:
//! - direct server return: the IP packet is left as it is (the backend holds the VIP on a
//!   loopback and answers the client directly); only the Ethernet addresses change;
//! - tunnel: an outer IPv4 or IPv6 header to the backend goes in front of the IP packet
//!   (IPIP, IP6IP6, or IPv4-in-IPv6), so backends need not share the balancer's L2 segment.
//!
//! The frame leaves through the backend's egress interface: XDP_TX when that is the ingress
//! interface, XDP_REDIRECT through the device map otherwise.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use balancer_common::{
    csum, xdp_action, Outcome, FAMILY_IPV4, FAMILY_IPV6, PROTO_IPIP, PROTO_IPV6,
};

use crate::{
    access::{copy_within, ptr_at_mut},
    icmp,
    maps::EGRESS_DEVICES,
    parse::{EthHdr, Kind, Packet, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN},
    select::Selected,
};

/// Hop limit of outer headers and of the balancer's own answers.
pub const TTL: u8 = 64;

#[inline(always)]
pub fn direct_server_return(ctx: &XdpContext, to: &Selected) -> Result<Outcome, Outcome> {
    transmit(ctx, to)
}

/// Sets the Ethernet addresses towards the backend's next hop and picks the verdict.
#[inline(always)]
fn transmit(ctx: &XdpContext, to: &Selected) -> Result<Outcome, Outcome> {
    let eth = ptr_at_mut::<EthHdr>(ctx, 0).ok_or(Outcome::TruncatedEthernet)?;
    // SAFETY: ptr_at_mut checked the bounds.
    unsafe {
        (*eth).dst = to.dst_mac;
        (*eth).src = to.src_mac;
    }
    if to.ifindex as usize == ctx.ingress_ifindex() {
        return Ok(Outcome::ForwardedTx);
    }
    // On a miss bpf_redirect_map returns the low bits of the flags: XDP_DROP here, counted.
    match EGRESS_DEVICES.redirect(to.ifindex, xdp_action::DROP as u64) {
        Ok(_) => Ok(Outcome::ForwardedRedirect),
        Err(_) => Err(Outcome::NoEgress),
    }
}

/// The outer source address: the backend's `tunnel_src` with its last `bits` bits (at most
/// 32) taken from the flow's hash, so that receivers spreading load by the outer header
/// (RSS) see many sources instead of one.
#[inline(always)]
fn varied(base: u32, bits: u8, hash: u32) -> u32 {
    let mask = match bits {
        0 => 0,
        b if b >= 32 => u32::MAX,
        b => (1u32 << b) - 1,
    };
    (base & !mask) | (hash & mask)
}

/// Encapsulates the packet for the backend and transmits it, or answers "too big" if the
/// encapsulated packet would not fit the egress MTU.
#[inline(always)]
pub fn tunnel(
    ctx: &XdpContext,
    packet: &Packet,
    to: &Selected,
    hash: u32,
) -> Result<Outcome, Outcome> {
    let outer_v6 = to.family == FAMILY_IPV6;
    let overhead = if outer_v6 { IPV6_HLEN } else { IPV4_HLEN };
    if packet.ip_len + overhead > to.mtu as usize {
        if packet.kind != Kind::Flow {
            // Never an ICMP error about an ICMP error.
            return Err(Outcome::TooBig);
        }
        return icmp::too_big(ctx, packet, (to.mtu as usize).saturating_sub(overhead));
    }
    let vlan = packet.l3 > ETH_HLEN;
    // SAFETY: the helper only moves the packet's start; every pointer is re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Err(Outcome::NoHeadroom);
    }
    move_l2_header(
        ctx,
        overhead,
        vlan,
        if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP },
    )?;
    let l3 = if vlan { ETH_HLEN + 4 } else { ETH_HLEN };
    let inner_proto = if packet.flow.family == FAMILY_IPV4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };

    if outer_v6 {
        let label = hash & 0x000F_FFFF;
        let mut src = to.tunnel_src;
        let low = u32::from_be_bytes([src[12], src[13], src[14], src[15]]);
        src[12..].copy_from_slice(&varied(low, to.tunnel_src_bits, hash).to_be_bytes());
        let header = ptr_at_mut::<[u8; IPV6_HLEN]>(ctx, l3).ok_or(Outcome::NoHeadroom)?;
        let payload = (packet.ip_len as u16).to_be_bytes();
        // SAFETY: ptr_at_mut checked the bounds.
        let h = unsafe { &mut *header };
        h[0] = 0x60 | (packet.tos >> 4);
        h[1] = (packet.tos << 4) | ((label >> 16) as u8 & 0x0F);
        h[2] = (label >> 8) as u8;
        h[3] = label as u8;
        h[4] = payload[0];
        h[5] = payload[1];
        h[6] = inner_proto;
        h[7] = TTL;
        h[8..24].copy_from_slice(&src);
        h[24..40].copy_from_slice(&to.addr);
    } else {
        let base = u32::from_be_bytes([
            to.tunnel_src[0],
            to.tunnel_src[1],
            to.tunnel_src[2],
            to.tunnel_src[3],
        ]);
        let src = varied(base, to.tunnel_src_bits, hash).to_be_bytes();
        let total = ((packet.ip_len + IPV4_HLEN) as u16).to_be_bytes();
        let mut h = [0u8; IPV4_HLEN];
        h[0] = 0x45;
        h[1] = packet.tos;
        h[2] = total[0];
        h[3] = total[1];
        // Keep the inner packet's don't-fragment bit.
        h[6] = if packet.dont_fragment { 0x40 } else { 0 };
        h[8] = TTL;
        h[9] = inner_proto;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&to.addr[..4]);
        let check = csum::ipv4_header(&h).to_ne_bytes();
        h[10] = check[0];
        h[11] = check[1];
        let header = ptr_at_mut::<[u8; IPV4_HLEN]>(ctx, l3).ok_or(Outcome::NoHeadroom)?;
        // SAFETY: ptr_at_mut checked the bounds.
        unsafe { *header = h };
    }
    transmit(ctx, to)
}

/// After `bpf_xdp_adjust_head` made `grown` bytes of room at the front, moves the Ethernet
/// header (and VLAN tag) there and sets the EtherType of what follows.
#[inline(always)]
pub fn move_l2_header(
    ctx: &XdpContext,
    grown: usize,
    vlan: bool,
    ether_type: u16,
) -> Result<(), Outcome> {
    copy_within::<ETH_HLEN>(ctx, grown, 0).ok_or(Outcome::NoHeadroom)?;
    let at = if vlan {
        copy_within::<2>(ctx, grown + ETH_HLEN, ETH_HLEN).ok_or(Outcome::NoHeadroom)?;
        ETH_HLEN + 2
    } else {
        ETH_HLEN - 2
    };
    let et = ptr_at_mut::<u16>(ctx, at).ok_or(Outcome::NoHeadroom)?;
    // SAFETY: checked.
    unsafe { *et = ether_type };
    Ok(())
}

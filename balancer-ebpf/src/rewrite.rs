//! Rewrite, per VIP forwarding mode, and transmit:
//! - direct server return: the IP packet is left as it is (the backend holds the VIP on a
//!   loopback and answers the client directly); only the Ethernet addresses change;
//! - tunnel: an outer IPv4 or IPv6 header to the backend goes in front of the IP packet
//!   (IPIP, IP6IP6, or IPv4-in-IPv6), so backends need not share the balancer's L2 segment.
//!
//! The frame leaves through the backend's egress interface: XDP_TX when that is the ingress
//! interface, XDP_REDIRECT through the device map otherwise.

use aya_ebpf::{helpers::bpf_redirect, programs::XdpContext};
use balancer_common::{
    tunnel, xdp_action, Outcome, FAMILY_IPV4, FAMILY_IPV6, PROTO_IPIP, PROTO_IPV6,
};

use crate::{
    access::write,
    frame, icmp,
    maps::EGRESS_DEVICES,
    parse::{Kind, Packet},
    select::Selected,
    wire::{ipv4_address, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN},
};

#[inline(always)]
pub fn direct_server_return(ctx: &XdpContext, to: &Selected) -> Result<Outcome, Outcome> {
    transmit(ctx, to)
}

/// Sets the Ethernet addresses towards the backend's next hop and picks the verdict.
#[inline(always)]
fn transmit(ctx: &XdpContext, to: &Selected) -> Result<Outcome, Outcome> {
    send(ctx, to.dst_mac, to.src_mac, to.ifindex)
}

/// Addresses the frame to `dst_mac` from `src_mac` and sends it out of `ifindex`: XDP_TX if
/// that is the ingress interface (`Outcome::ForwardedTx`), else XDP_REDIRECT through the
/// device map (`Outcome::ForwardedRedirect`).
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    ifindex: u32,
) -> Result<Outcome, Outcome> {
    if address(ctx, dst_mac, src_mac, ifindex)? {
        return Ok(Outcome::ForwardedTx);
    }
    // On a miss bpf_redirect_map returns the low bits of the flags: XDP_DROP here, counted.
    match EGRESS_DEVICES.redirect(ifindex, xdp_action::DROP as u64) {
        Ok(_) => Ok(Outcome::ForwardedRedirect),
        Err(_) => Err(Outcome::NoEgress),
    }
}

/// Addresses the frame to `dst_mac` from `src_mac`; true if `ifindex` is the ingress
/// interface (the frame leaves with XDP_TX).
#[inline(always)]
fn address(
    ctx: &XdpContext,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    ifindex: u32,
) -> Result<bool, Outcome> {
    frame::set_addresses(ctx, dst_mac, src_mac).ok_or(Outcome::TruncatedEthernet)?;
    Ok(ifindex as usize == ctx.ingress_ifindex())
}

/// Sends a NAT reply towards the client: out of the interface it came in on (XDP_TX), or out
/// of `ifindex`, where the client's packets came from, with a plain redirect (the daemon
/// attaches the program to every interface NAT replies arrive on, and those need not be in
/// the device map).
#[inline(always)]
pub fn send_back(
    ctx: &XdpContext,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    ifindex: u32,
) -> Result<Outcome, Outcome> {
    if address(ctx, dst_mac, src_mac, ifindex)? {
        return Ok(Outcome::NatReplyTx);
    }
    // SAFETY: a helper taking plain values.
    if unsafe { bpf_redirect(ifindex, 0) } == xdp_action::REDIRECT as i64 {
        Ok(Outcome::NatReplyRedirect)
    } else {
        Err(Outcome::NoEgress)
    }
}

/// Encapsulates the packet for the backend and transmits it, or answers "too big" if the
/// encapsulated packet would not fit the egress MTU. The outer source address and flow label
/// vary with the flow's hash (see `balancer_common::tunnel`).
#[inline(always)]
pub fn tunnel(ctx: &XdpContext, packet: &Packet, to: &Selected) -> Result<Outcome, Outcome> {
    let hash = to.hash;
    let outer_v6 = to.family == FAMILY_IPV6;
    let overhead = if outer_v6 { IPV6_HLEN } else { IPV4_HLEN };
    if packet.ip_len + overhead > to.mtu as usize {
        if packet.kind != Kind::Flow {
            // Never an ICMP error about an ICMP error.
            return Err(Outcome::TooBig);
        }
        return icmp::too_big(ctx, packet, (to.mtu as usize).saturating_sub(overhead));
    }
    let l3 = packet.l3;
    let outer_ether_type = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    frame::grow_front(ctx, overhead, l3, outer_ether_type).ok_or(Outcome::NoHeadroom)?;
    let inner_proto = if packet.flow.family == FAMILY_IPV4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };

    let written = if outer_v6 {
        let outer = frame::ipv6_header(
            inner_proto,
            tunnel::source_v6(to.tunnel_src, to.tunnel_src_bits, hash),
            to.addr,
            packet.ip_len,
            packet.tos,
            tunnel::flow_label(hash),
        );
        write(ctx, l3, outer)
    } else {
        let outer = frame::ipv4_header(
            inner_proto,
            tunnel::source_v4(ipv4_address(&to.tunnel_src), to.tunnel_src_bits, hash),
            ipv4_address(&to.addr),
            packet.ip_len,
            packet.tos,
            // Keep the inner packet's don't-fragment bit.
            packet.dont_fragment,
        );
        write(ctx, l3, outer)
    };
    written.ok_or(Outcome::NoHeadroom)?;
    transmit(ctx, to)
}

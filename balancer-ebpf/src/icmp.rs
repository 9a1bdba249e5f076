//! The balancer's own ICMP answers: echo replies for VIP addresses, and "too big" messages
//! (ICMP fragmentation needed, ICMPv6 packet too big) for packets that would not fit the egress
//! MTU once encapsulated. Both turn the received frame into the answer in place and send it
//! back out of the interface it came in on.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use balancer_common::{csum, Outcome, FAMILY_IPV4, PROTO_ICMP, PROTO_ICMPV6};

use crate::{
    access::{ptr_at, ptr_at_mut},
    parse::{
        EthHdr, IcmpHdr, Ipv4Hdr, Ipv6Hdr, Packet, ETH_HLEN, ETH_P_IP, ETH_P_IPV6,
        ICMPV6_ECHO_REPLY, ICMPV6_PACKET_TOO_BIG, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY,
        ICMP_FRAG_NEEDED, ICMP_HLEN, IPV4_HLEN, IPV6_HLEN,
    },
    rewrite::{move_l2_header, TTL},
};

/// IPv6's minimum MTU: an ICMPv6 error carries as much of the offending packet as fits in it.
const IPV6_MIN_MTU: usize = 1280;
/// Most bytes of the offending IPv6 packet a "packet too big" carries.
const IPV6_QUOTE_MAX: usize = IPV6_MIN_MTU - IPV6_HLEN - ICMP_HLEN;
/// An IPv4 "fragmentation needed" carries the offending header (at most 60 bytes) and 8 more.
const IPV4_QUOTE_MAX: usize = 60 + 8;

/// Answers the frame to its sender: swaps the Ethernet addresses.
#[inline(always)]
fn turn_around(ctx: &XdpContext) -> Result<(), Outcome> {
    let eth = ptr_at_mut::<EthHdr>(ctx, 0).ok_or(Outcome::TruncatedEthernet)?;
    // SAFETY: ptr_at_mut checked the bounds.
    unsafe {
        core::mem::swap(&mut (*eth).dst, &mut (*eth).src);
    }
    Ok(())
}

#[inline(always)]
fn word(bytes: [u8; 2]) -> u16 {
    u16::from_ne_bytes(bytes)
}

/// Turns an echo request to a VIP address into the reply.
#[inline(always)]
pub fn echo_reply(ctx: &XdpContext, packet: &Packet) -> Result<Outcome, Outcome> {
    turn_around(ctx)?;
    let icmp = ptr_at_mut::<IcmpHdr>(ctx, packet.l4).ok_or(Outcome::TruncatedL4)?;
    if packet.flow.family == FAMILY_IPV4 {
        let ip = ptr_at_mut::<Ipv4Hdr>(ctx, packet.l3).ok_or(Outcome::TruncatedIpv4)?;
        // SAFETY: ptr_at_mut checked the bounds of both headers.
        unsafe {
            core::mem::swap(&mut (*ip).src, &mut (*ip).dst);
            let old = word([(*ip).ttl, (*ip).proto]);
            (*ip).ttl = TTL;
            (*ip).check = csum::replace((*ip).check, old, word([TTL, (*ip).proto]));
            let old = word([(*icmp).kind, (*icmp).code]);
            (*icmp).kind = ICMP_ECHO_REPLY;
            (*icmp).check =
                csum::replace((*icmp).check, old, word([ICMP_ECHO_REPLY, (*icmp).code]));
        }
    } else {
        let ip = ptr_at_mut::<Ipv6Hdr>(ctx, packet.l3).ok_or(Outcome::TruncatedIpv6)?;
        // SAFETY: as above. Swapping the addresses leaves the pseudo-header's sum unchanged.
        unsafe {
            core::mem::swap(&mut (*ip).src, &mut (*ip).dst);
            (*ip).hop_limit = TTL;
            let old = word([(*icmp).kind, (*icmp).code]);
            (*icmp).kind = ICMPV6_ECHO_REPLY;
            (*icmp).check =
                csum::replace((*icmp).check, old, word([ICMPV6_ECHO_REPLY, (*icmp).code]));
        }
    }
    Ok(Outcome::EchoReplied)
}

/// Answers a packet that does not fit `mtu` (the largest IP packet that would) with ICMP
/// "fragmentation needed" or ICMPv6 "packet too big", from the VIP it was sent to.
#[inline(always)]
pub fn too_big(ctx: &XdpContext, packet: &Packet, mtu: usize) -> Result<Outcome, Outcome> {
    if packet.flow.family == FAMILY_IPV4 {
        if !packet.dont_fragment {
            // The sender allows fragmentation, which the balancer does not do: no ICMP
            // message says "fragment it yourself".
            return Err(Outcome::TooBig);
        }
        too_big_v4(ctx, packet, mtu)
    } else {
        too_big_v6(ctx, packet, mtu.max(IPV6_MIN_MTU))
    }
}

/// Adds `len` bytes of the packet from `offset` (at most `2 * MAX_WORDS`; an odd last byte is
/// padded with zero) to a running sum.
#[inline(always)]
fn sum_packet<const MAX_WORDS: usize>(
    ctx: &XdpContext,
    mut sum: u32,
    offset: usize,
    len: usize,
) -> u32 {
    for i in 0..MAX_WORDS {
        let at = offset + 2 * i;
        if 2 * i + 1 < len {
            match ptr_at::<[u8; 2]>(ctx, at) {
                // SAFETY: ptr_at checked the bounds.
                Some(w) => sum = csum::add(sum, word(unsafe { *w })),
                None => break,
            }
        } else {
            if 2 * i < len {
                if let Some(b) = ptr_at::<u8>(ctx, at) {
                    // SAFETY: ptr_at checked the bounds.
                    sum = csum::add(sum, word([unsafe { *b }, 0]));
                }
            }
            break;
        }
    }
    sum
}

/// Frame bytes kept: `keep`; room added in front: `grown`.
#[inline(always)]
fn reshape(
    ctx: &XdpContext,
    packet: &Packet,
    keep: usize,
    grown: usize,
    ether_type: u16,
) -> Result<(), Outcome> {
    let frame = ctx.data_end() - ctx.data();
    if keep < frame {
        // SAFETY: shrinking the packet's tail; pointers are re-derived afterwards.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep as i32 - frame as i32) } != 0 {
            return Err(Outcome::TooBig);
        }
    }
    // SAFETY: as above, at the head.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grown as i32)) } != 0 {
        return Err(Outcome::NoHeadroom);
    }
    move_l2_header(ctx, grown, packet.l3 > ETH_HLEN, ether_type)?;
    turn_around(ctx)
}

fn too_big_v4(ctx: &XdpContext, packet: &Packet, mtu: usize) -> Result<Outcome, Outcome> {
    let l3 = packet.l3;
    let quote = (packet.l4 - l3 + 8).min(IPV4_QUOTE_MAX);
    let (client, vip) = (packet.flow.src, packet.flow.dst);
    reshape(ctx, packet, l3 + quote, IPV4_HLEN + ICMP_HLEN, ETH_P_IP)?;

    let total = ((IPV4_HLEN + ICMP_HLEN + quote) as u16).to_be_bytes();
    let mut h = [0u8; IPV4_HLEN];
    h[0] = 0x45;
    h[2] = total[0];
    h[3] = total[1];
    h[8] = TTL;
    h[9] = PROTO_ICMP;
    h[12..16].copy_from_slice(&vip[..4]);
    h[16..20].copy_from_slice(&client[..4]);
    let check = csum::ipv4_header(&h).to_ne_bytes();
    h[10] = check[0];
    h[11] = check[1];
    let ip = ptr_at_mut::<[u8; IPV4_HLEN]>(ctx, l3).ok_or(Outcome::TooBig)?;
    // SAFETY: checked.
    unsafe { *ip = h };

    let mtu = (mtu as u16).to_be_bytes();
    let icmp_at = l3 + IPV4_HLEN;
    let icmp = ptr_at_mut::<IcmpHdr>(ctx, icmp_at).ok_or(Outcome::TooBig)?;
    // SAFETY: checked.
    unsafe {
        *icmp = IcmpHdr {
            kind: ICMP_DEST_UNREACH,
            code: ICMP_FRAG_NEEDED,
            check: 0,
            rest: [0, 0, mtu[0], mtu[1]],
        };
    }
    let sum =
        sum_packet::<{ (ICMP_HLEN + IPV4_QUOTE_MAX) / 2 }>(ctx, 0, icmp_at, ICMP_HLEN + quote);
    let icmp = ptr_at_mut::<IcmpHdr>(ctx, icmp_at).ok_or(Outcome::TooBig)?;
    // SAFETY: checked.
    unsafe { (*icmp).check = csum::finish(sum) };
    Ok(Outcome::TooBigAnswered)
}

fn too_big_v6(ctx: &XdpContext, packet: &Packet, mtu: usize) -> Result<Outcome, Outcome> {
    let l3 = packet.l3;
    let in_frame = (ctx.data_end() - ctx.data()).saturating_sub(l3);
    let quote = packet.ip_len.min(in_frame).min(IPV6_QUOTE_MAX);
    let (client, vip) = (packet.flow.src, packet.flow.dst);
    reshape(ctx, packet, l3 + quote, IPV6_HLEN + ICMP_HLEN, ETH_P_IPV6)?;

    let upper_len = ICMP_HLEN + quote;
    let ip = ptr_at_mut::<Ipv6Hdr>(ctx, l3).ok_or(Outcome::TooBig)?;
    // SAFETY: checked.
    unsafe {
        *ip = Ipv6Hdr {
            vtc_flow: [0x60, 0, 0, 0],
            payload_len: (upper_len as u16).to_be(),
            next_header: PROTO_ICMPV6,
            hop_limit: TTL,
            src: vip,
            dst: client,
        };
    }
    let icmp_at = l3 + IPV6_HLEN;
    let icmp = ptr_at_mut::<IcmpHdr>(ctx, icmp_at).ok_or(Outcome::TooBig)?;
    // SAFETY: checked.
    unsafe {
        *icmp = IcmpHdr {
            kind: ICMPV6_PACKET_TOO_BIG,
            code: 0,
            check: 0,
            rest: (mtu as u32).to_be_bytes(),
        };
    }
    // Pseudo-header: addresses, upper-layer length, next header.
    let mut sum = csum::add_bytes(0, &vip);
    sum = csum::add_bytes(sum, &client);
    sum = csum::add_bytes(sum, &(upper_len as u32).to_be_bytes());
    sum = csum::add_bytes(sum, &(PROTO_ICMPV6 as u32).to_be_bytes());
    sum = sum_packet::<{ (ICMP_HLEN + IPV6_QUOTE_MAX).div_ceil(2) }>(ctx, sum, icmp_at, upper_len);
    let icmp = ptr_at_mut::<IcmpHdr>(ctx, icmp_at).ok_or(Outcome::TooBig)?;
    // SAFETY: checked.
    unsafe { (*icmp).check = csum::finish(sum) };
    Ok(Outcome::TooBigAnswered)
}

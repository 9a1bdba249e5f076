//! The balancer's own ICMP answers: echo replies for VIP addresses, and "too big" messages
//! (ICMP fragmentation needed, ICMPv6 packet too big) for packets that would not fit the egress
//! MTU once encapsulated. Both turn the received frame into the answer in place and send it
//! back out of the interface it came in on.

use aya_ebpf::{helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use balancer_common::{csum, Outcome, FAMILY_IPV4, PROTO_ICMP, PROTO_ICMPV6};

use crate::{
    access::{opaque, ptr_at, ptr_at_mut, write},
    frame::{self, TTL},
    parse::Packet,
    wire::{
        ipv4_address, IcmpHdr, Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6, ICMPV6_ECHO_REPLY,
        ICMPV6_PACKET_TOO_BIG, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_FRAG_NEEDED, ICMP_HLEN,
        IPV4_HLEN, IPV6_HLEN,
    },
};

/// IPv6's minimum MTU: an ICMPv6 error carries as much of the offending packet as fits in it.
const IPV6_MIN_MTU: usize = 1280;
/// Most bytes of the offending IPv6 packet a "packet too big" carries.
const IPV6_QUOTE_MAX: usize = IPV6_MIN_MTU - IPV6_HLEN - ICMP_HLEN;
/// An IPv4 "fragmentation needed" carries the offending header (at most 60 bytes) and 8 more.
const IPV4_QUOTE_MAX: usize = 60 + 8;

#[inline(always)]
fn word(bytes: [u8; 2]) -> u16 {
    u16::from_ne_bytes(bytes)
}

/// Longest ICMP message of an echo request the balancer verifies and answers: one of a
/// 1500-byte IPv4 packet. A longer request is left to the stack, unanswered.
const ECHO_MAX: usize = 1500 - IPV4_HLEN;
/// Bytes summed by one helper call in the first pass over an echo request.
const ECHO_CHUNK: usize = 64;

/// Whether an echo request's ICMP checksum is right (ICMPv6's covers a pseudo-header too).
/// Linux ignores a request with a wrong one; so does the balancer, which would otherwise
/// answer with an equally wrong reply. Summed by `bpf_csum_diff` over 64-byte chunks, then
/// 4-byte ones, then the last bytes: two short loops (at most 23 and 15 turns), where a
/// loop over every word cost the verifier far more at every load.
#[inline(always)]
pub fn echo_intact(ctx: &XdpContext, packet: &Packet) -> bool {
    let end = packet.l3 + packet.ip_len;
    if end <= packet.l4 || end - packet.l4 > ECHO_MAX {
        return false;
    }
    let len = end - packet.l4;
    let mut sum = 0;
    if packet.flow.family != FAMILY_IPV4 {
        sum = csum::add_bytes(sum, &packet.flow.src);
        sum = csum::add_bytes(sum, &packet.flow.dst);
        sum = csum::add_bytes(sum, &(len as u32).to_be_bytes());
        sum = csum::add_bytes(sum, &(PROTO_ICMPV6 as u32).to_be_bytes());
    }
    let (mut at, mut left) = (packet.l4, len);
    for _ in 0..ECHO_MAX / ECHO_CHUNK {
        if left < ECHO_CHUNK {
            break;
        }
        let Some(s) = sum_chunk::<ECHO_CHUNK>(ctx, at, sum) else {
            return false;
        };
        (sum, at, left) = (s, at + ECHO_CHUNK, left - ECHO_CHUNK);
    }
    for _ in 0..ECHO_CHUNK / 4 - 1 {
        if left < 4 {
            break;
        }
        let Some(s) = sum_chunk::<4>(ctx, at, sum) else {
            return false;
        };
        (sum, at, left) = (s, at + 4, left - 4);
    }
    // Folded to 16 bits before the last bytes are added (no carry lost).
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = sum_packet::<2>(ctx, sum, opaque(at), left);
    csum::finish(sum) == 0
}

/// The running checksum `seed` plus the `K` bytes at `at` (`K` a multiple of 4, at most 512),
/// by `bpf_csum_diff`; `None` past the frame's end.
#[inline(always)]
fn sum_chunk<const K: usize>(ctx: &XdpContext, at: usize, seed: u32) -> Option<u32> {
    let chunk = ptr_at::<[u8; K]>(ctx, opaque(at))?;
    // SAFETY: ptr_at checked that the K bytes lie inside the packet; the helper only reads.
    let sum = unsafe {
        aya_ebpf::helpers::bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            chunk as *mut u32,
            K as u32,
            seed,
        )
    };
    u32::try_from(sum).ok()
}

/// Turns an echo request to a VIP address into the reply.
#[inline(always)]
pub fn echo_reply(ctx: &XdpContext, packet: &Packet) -> Result<Outcome, Outcome> {
    frame::turn_around(ctx).ok_or(Outcome::TruncatedEthernet)?;
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
    frame::grow_front(ctx, grown, packet.l3, ether_type).ok_or(Outcome::NoHeadroom)?;
    frame::turn_around(ctx).ok_or(Outcome::TruncatedEthernet)
}

fn too_big_v4(ctx: &XdpContext, packet: &Packet, mtu: usize) -> Result<Outcome, Outcome> {
    let l3 = packet.l3;
    let quote = (packet.l4 - l3 + 8).min(IPV4_QUOTE_MAX);
    let (client, vip) = (packet.flow.src, packet.flow.dst);
    reshape(ctx, packet, l3 + quote, IPV4_HLEN + ICMP_HLEN, ETH_P_IP)?;

    // TOS 0, DF clear.
    let ip = frame::ipv4_header(
        PROTO_ICMP,
        ipv4_address(&vip),
        ipv4_address(&client),
        ICMP_HLEN + quote,
        0,
        false,
    );
    write(ctx, l3, ip).ok_or(Outcome::TooBig)?;

    let mtu = (mtu as u16).to_be_bytes();
    let icmp_at = l3 + IPV4_HLEN;
    let icmp = IcmpHdr {
        kind: ICMP_DEST_UNREACH,
        code: ICMP_FRAG_NEEDED,
        check: 0,
        rest: [0, 0, mtu[0], mtu[1]],
    };
    write(ctx, icmp_at, icmp).ok_or(Outcome::TooBig)?;
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
    // Traffic class 0, flow label 0.
    let ip = frame::ipv6_header(PROTO_ICMPV6, vip, client, upper_len, 0, 0);
    write(ctx, l3, ip).ok_or(Outcome::TooBig)?;
    let icmp_at = l3 + IPV6_HLEN;
    let icmp = IcmpHdr {
        kind: ICMPV6_PACKET_TOO_BIG,
        code: 0,
        check: 0,
        rest: (mtu as u32).to_be_bytes(),
    };
    write(ctx, icmp_at, icmp).ok_or(Outcome::TooBig)?;
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

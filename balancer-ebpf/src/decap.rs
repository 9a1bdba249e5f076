//! The backend side of tunnel mode, for hosts without a kernel ipip/ip6tnl device: strips the
//! outer header of IPIP, IP6IP6 and IPv4-in-IPv6 packets addressed to this host and passes the
//! inner packet to the local stack. Everything else passes untouched.

use aya_ebpf::programs::XdpContext;
use balancer_common::{
    DecapAddress, DecapOutcome, FAMILY_IPV4, FAMILY_IPV6, PROTO_IPIP, PROTO_IPV6,
};

use crate::{
    access::ptr_at,
    frame,
    maps::DECAP_ADDRESSES,
    parse::ethernet,
    wire::{Ipv4Hdr, Ipv6Hdr, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN},
};

#[inline(always)]
fn local(addr: [u8; 16], family: u8) -> bool {
    DECAP_ADDRESSES
        .get_ptr(DecapAddress {
            addr,
            family,
            _pad: [0; 3],
        })
        .is_some()
}

#[inline(always)]
pub fn decapsulate(ctx: &XdpContext) -> DecapOutcome {
    let Ok((ether_type, l3)) = ethernet(ctx) else {
        return DecapOutcome::NotTunnel;
    };
    let (outer_len, inner_ether_type, outcome) = if ether_type == ETH_P_IP {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
            return DecapOutcome::NotTunnel;
        };
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &*ip };
        if ip.proto != PROTO_IPIP {
            return DecapOutcome::NotTunnel;
        }
        let mut dst = [0u8; 16];
        dst[..4].copy_from_slice(&ip.dst);
        if !local(dst, FAMILY_IPV4) {
            return DecapOutcome::NotLocal;
        }
        let header_len = ip.header_len();
        if header_len < IPV4_HLEN || ptr_at::<Ipv4Hdr>(ctx, l3 + header_len).is_none() {
            return DecapOutcome::Malformed;
        }
        (header_len, ETH_P_IP, DecapOutcome::Ipip)
    } else if ether_type == ETH_P_IPV6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
            return DecapOutcome::NotTunnel;
        };
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &*ip };
        let (inner, outcome) = match ip.next_header {
            PROTO_IPV6 => (ETH_P_IPV6, DecapOutcome::Ip6ip6),
            PROTO_IPIP => (ETH_P_IP, DecapOutcome::Ip4in6),
            _ => return DecapOutcome::NotTunnel,
        };
        if !local(ip.dst, FAMILY_IPV6) {
            return DecapOutcome::NotLocal;
        }
        if ptr_at::<Ipv4Hdr>(ctx, l3 + IPV6_HLEN).is_none() {
            return DecapOutcome::Malformed;
        }
        (IPV6_HLEN, inner, outcome)
    } else {
        return DecapOutcome::NotTunnel;
    };

    match frame::shrink_front(ctx, outer_len, l3, inner_ether_type) {
        Some(()) => outcome,
        None => DecapOutcome::Malformed,
    }
}

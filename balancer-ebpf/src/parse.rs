//! Parse: Ethernet (with at most one 802.1Q tag), IPv4 (options skipped), TCP or UDP ports.
//!
//! Anything this step cannot make sense of is returned as an `Outcome` whose verdict is
//! XDP_PASS: the kernel's stack deals with it as if the balancer were not there.

use aya_ebpf::programs::XdpContext;
use balancer_common::{FlowKey, Outcome, FAMILY_IPV4, PROTO_TCP, PROTO_UDP};

use crate::access::ptr_at;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV4_MIN_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

// EtherTypes, in network byte order as read from the packet.
const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88A8u16.to_be();

/// IPv4 "more fragments" flag and fragment offset, network byte order.
const IP_MF_OFFSET_MASK: u16 = 0x3FFFu16.to_be();

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
struct VlanHdr {
    _tci: u16,
    ether_type: u16,
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    _tos: u8,
    _total_len: u16,
    _id: u16,
    frag_off: u16,
    _ttl: u8,
    proto: u8,
    _check: u16,
    src: [u8; 4],
    dst: [u8; 4],
}

/// The first four bytes of TCP and UDP alike.
#[repr(C)]
struct Ports {
    src: u16,
    dst: u16,
}

/// Offset and bits of the TCP flags byte.
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A packet the balancer may have to forward.
pub struct Packet {
    pub flow: FlowKey,
    /// Length of the whole frame in bytes.
    pub len: u64,
    /// A TCP SYN without ACK: the first packet of a new connection.
    pub syn: bool,
}

#[inline(always)]
pub fn packet(ctx: &XdpContext) -> Result<Packet, Outcome> {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (ether_type, l3) = ethernet(ctx)?;
    if ether_type == ETH_P_IPV6 {
        return Err(Outcome::Ipv6);
    }
    if ether_type != ETH_P_IP {
        return Err(Outcome::NotIp);
    }
    let (flow, syn) = ipv4(ctx, l3)?;
    Ok(Packet { flow, len, syn })
}

/// Returns the EtherType of the payload and where the payload starts.
#[inline(always)]
fn ethernet(ctx: &XdpContext) -> Result<(u16, usize), Outcome> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Outcome::TruncatedEthernet)?;
    // SAFETY: ptr_at checked that the header lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
        return Ok((ether_type, ETH_HLEN));
    }
    let vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(Outcome::TruncatedVlan)?;
    // SAFETY: as above.
    Ok((unsafe { (*vlan).ether_type }, ETH_HLEN + VLAN_HLEN))
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize) -> Result<(FlowKey, bool), Outcome> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, l3).ok_or(Outcome::TruncatedIpv4)?;
    // SAFETY: ptr_at checked that the fixed header lies inside the packet.
    let ip = unsafe { &*ip };
    if ip.version_ihl >> 4 != 4 {
        return Err(Outcome::BadIpv4Header);
    }
    let header_len = ((ip.version_ihl & 0x0F) as usize) * 4;
    if header_len < IPV4_MIN_HLEN {
        return Err(Outcome::BadIpv4Header);
    }
    // The options (if any) must be there too, even though they are skipped.
    let l4 = l3 + header_len;
    if ctx.data() + l4 > ctx.data_end() {
        return Err(Outcome::TruncatedIpv4);
    }
    if ip.frag_off & IP_MF_OFFSET_MASK != 0 {
        return Err(Outcome::Fragment);
    }
    let l4_len = match ip.proto {
        PROTO_TCP => TCP_HLEN,
        PROTO_UDP => UDP_HLEN,
        _ => return Err(Outcome::NotTcpUdp),
    };
    if ctx.data() + l4 + l4_len > ctx.data_end() {
        return Err(Outcome::TruncatedL4);
    }
    let ports = ptr_at::<Ports>(ctx, l4).ok_or(Outcome::TruncatedL4)?;
    // SAFETY: ptr_at checked the bounds.
    let ports = unsafe { &*ports };

    let mut flow = FlowKey {
        src_port: ports.src,
        dst_port: ports.dst,
        proto: ip.proto,
        family: FAMILY_IPV4,
        ..FlowKey::default()
    };
    flow.src[..4].copy_from_slice(&ip.src);
    flow.dst[..4].copy_from_slice(&ip.dst);
    let syn = ip.proto == PROTO_TCP && {
        let flags = ptr_at::<u8>(ctx, l4 + TCP_FLAGS_OFFSET).ok_or(Outcome::TruncatedL4)?;
        // SAFETY: ptr_at checked the bounds.
        unsafe { *flags & (TCP_SYN | TCP_ACK) == TCP_SYN }
    };
    Ok((flow, syn))
}

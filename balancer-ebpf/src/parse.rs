//! Parse: Ethernet (with at most one 802.1Q tag); IPv4 (options skipped) or IPv6 (extension
//! headers walked up to `IPV6_EXTENSION_LIMIT`); TCP and UDP ports and flags; ICMP and ICMPv6
//! echo requests and the errors the balancer handles ("destination unreachable", of which
//! "fragmentation needed", ICMPv6 "packet too big", "time exceeded"), whose embedded packet
//! names the flow they concern.
//!
//! Anything this step cannot make sense of is returned as an `Outcome` whose verdict is
//! XDP_PASS: the kernel's stack deals with it as if the balancer were not there.

use aya_ebpf::programs::XdpContext;
use balancer_common::{
    FlowKey, Outcome, FAMILY_IPV4, FAMILY_IPV6, IPV6_EXTENSION_LIMIT, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_TCP, PROTO_UDP,
};

use crate::{
    access::ptr_at,
    wire::{
        address_words, EthHdr, IcmpHdr, Ipv4Hdr, Ipv6ExtHdr, Ipv6FragHdr, Ipv6Hdr, Ports, VlanHdr,
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ICMPV6_DEST_UNREACH,
        ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG, ICMPV6_TIME_EXCEEDED, ICMP_DEST_UNREACH,
        ICMP_ECHO_REQUEST, ICMP_FRAG_NEEDED, ICMP_HLEN, ICMP_TIME_EXCEEDED, IPV4_HLEN,
        IPV6_DEST_OPTIONS, IPV6_FRAGMENT, IPV6_FRAG_HLEN, IPV6_FRAG_OFFSET, IPV6_HLEN,
        IPV6_HOP_BY_HOP, IPV6_ROUTING, IP_DF, IP_MF, IP_OFFSET, TCP_ACK, TCP_FLAGS_OFFSET,
        TCP_HLEN, TCP_SYN, UDP_HLEN, VLAN_HLEN,
    },
};

/// What the packet asks of the balancer.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP or UDP (or a fragment of it) to balance by `flow`.
    Flow,
    /// An ICMP or ICMPv6 echo request to `flow.dst`.
    EchoRequest,
    /// An ICMP error about a packet the balancer sent: `flow` is that packet's flow turned
    /// around (the quoted packet went VIP -> client: `flow` is client -> VIP, and finds the
    /// backend that owns it; on a NAT connection's backend side the quoted packet went SNAT
    /// address -> backend: `flow` is the backend's reply direction).
    IcmpError,
}

/// A packet the balancer may have to handle.
pub struct Packet {
    pub kind: Kind,
    pub flow: FlowKey,
    /// Length of the whole frame in bytes.
    pub len: u64,
    /// Where the IP header starts (after Ethernet and VLAN).
    pub l3: usize,
    /// Where the transport header starts (after IPv4 options or IPv6 extension headers).
    pub l4: usize,
    /// Length of the IP packet (header included), from the IP header.
    pub ip_len: usize,
    /// IPv4 type of service, or IPv6 traffic class.
    pub tos: u8,
    /// IPv4 don't-fragment bit (always set for IPv6, which routers never fragment).
    pub dont_fragment: bool,
    /// A TCP SYN without ACK: the first packet of a new connection.
    pub syn: bool,
    /// TCP: the flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// ICMP errors: "fragmentation needed" or "packet too big" (the only errors forwarded to
    /// the backends of VIPs that do not translate addresses).
    pub too_big: bool,
    /// ICMP errors: where the quoted IP header and its transport header start.
    pub inner_l3: usize,
    pub inner_l4: usize,
    /// Part of a fragmented datagram.
    pub fragment: bool,
    /// A fragment other than the first: it carries no transport header (ports are 0).
    pub later_fragment: bool,
}

#[inline(always)]
pub fn packet(ctx: &XdpContext) -> Result<Packet, Outcome> {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (ether_type, l3) = ethernet(ctx)?;
    let mut packet = if ether_type == ETH_P_IP {
        ipv4(ctx, l3)?
    } else if ether_type == ETH_P_IPV6 {
        ipv6(ctx, l3)?
    } else {
        return Err(Outcome::NotIp);
    };
    packet.len = len;
    lengths(&packet)?;
    Ok(packet)
}

/// The IP length fields against the frame and the headers: an IPv4 total length or IPv6
/// payload length is believed only as far as the frame goes (a longer frame is Ethernet
/// padding, which is normal), and must cover the headers read (IP, extension headers, the
/// transport's ports and flags, or the ICMP header). Checked once everything is parsed: a
/// check before the reads would let the compiler drop bounds checks that the verifier needs
/// (it cannot follow "inside the datagram, which is inside the frame").
#[inline(always)]
fn lengths(packet: &Packet) -> Result<(), Outcome> {
    let v4 = packet.flow.family == FAMILY_IPV4;
    let ip_end = packet.l3 + packet.ip_len;
    if ip_end < packet.l4 {
        return Err(if v4 {
            Outcome::BadIpv4Header
        } else {
            Outcome::TruncatedIpv6
        });
    }
    if ip_end as u64 > packet.len {
        return Err(if v4 {
            Outcome::TruncatedIpv4
        } else {
            Outcome::TruncatedIpv6
        });
    }
    let transport = match packet.kind {
        Kind::Flow if packet.later_fragment => 0,
        Kind::Flow if packet.flow.proto == PROTO_TCP => TCP_HLEN,
        Kind::Flow => UDP_HLEN,
        Kind::EchoRequest | Kind::IcmpError => ICMP_HLEN,
    };
    if packet.l4 + transport > ip_end {
        return Err(Outcome::TruncatedL4);
    }
    Ok(())
}

/// Returns the EtherType of the payload and where the payload starts.
#[inline(always)]
pub fn ethernet(ctx: &XdpContext) -> Result<(u16, usize), Outcome> {
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

fn new_packet(flow: FlowKey, l3: usize, l4: usize, ip_len: usize, tos: u8) -> Packet {
    Packet {
        kind: Kind::Flow,
        flow,
        len: 0,
        l3,
        l4,
        ip_len,
        tos,
        dont_fragment: true,
        syn: false,
        tcp_flags: 0,
        too_big: false,
        inner_l3: 0,
        inner_l4: 0,
        fragment: false,
        later_fragment: false,
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize) -> Result<Packet, Outcome> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, l3).ok_or(Outcome::TruncatedIpv4)?;
    // SAFETY: ptr_at checked that the fixed header lies inside the packet.
    let ip = unsafe { &*ip };
    if ip.version() != 4 {
        return Err(Outcome::BadIpv4Header);
    }
    let header_len = ip.header_len();
    if header_len < IPV4_HLEN {
        return Err(Outcome::BadIpv4Header);
    }
    // The options (if any) must be there too, even though they are skipped.
    let l4 = l3 + header_len;
    if ctx.data() + l4 > ctx.data_end() {
        return Err(Outcome::TruncatedIpv4);
    }
    // Checked against the frame and the headers once parsed (`lengths`).
    let total_len = u16::from_be(ip.total_len) as usize;
    let mut flow = FlowKey {
        proto: ip.proto,
        family: FAMILY_IPV4,
        ..FlowKey::default()
    };
    flow.set_addresses(address_words(&ip.src), address_words(&ip.dst));
    let mut packet = new_packet(flow, l3, l4, total_len, ip.tos);
    packet.dont_fragment = ip.frag_off & IP_DF != 0;
    packet.fragment = ip.frag_off & (IP_MF | IP_OFFSET) != 0;
    packet.later_fragment = ip.frag_off & IP_OFFSET != 0;
    transport(ctx, packet)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize) -> Result<Packet, Outcome> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, l3).ok_or(Outcome::TruncatedIpv6)?;
    // SAFETY: ptr_at checked that the fixed header lies inside the packet.
    let ip = unsafe { &*ip };
    if ip.version() != 6 {
        return Err(Outcome::TruncatedIpv6);
    }
    let tos = ip.traffic_class();
    let mut flow = FlowKey {
        family: FAMILY_IPV6,
        ..FlowKey::default()
    };
    flow.set_addresses(address_words(&ip.src), address_words(&ip.dst));
    let ip_len = IPV6_HLEN + u16::from_be(ip.payload_len) as usize;
    let mut packet = new_packet(flow, l3, l3 + IPV6_HLEN, ip_len, tos);

    // Walk the extension headers, at most IPV6_EXTENSION_LIMIT of them.
    let mut next = ip.next_header;
    let mut offset = l3 + IPV6_HLEN;
    for _ in 0..IPV6_EXTENSION_LIMIT {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS => {
                let ext = ptr_at::<Ipv6ExtHdr>(ctx, offset).ok_or(Outcome::TruncatedIpv6)?;
                // SAFETY: ptr_at checked the bounds.
                let ext = unsafe { &*ext };
                next = ext.next_header;
                offset += (ext.len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let frag = ptr_at::<Ipv6FragHdr>(ctx, offset).ok_or(Outcome::TruncatedIpv6)?;
                // SAFETY: ptr_at checked the bounds.
                let frag = unsafe { &*frag };
                next = frag.next_header;
                packet.fragment = true;
                packet.later_fragment = u16::from_be(frag.offset_flags) & IPV6_FRAG_OFFSET != 0;
                offset += IPV6_FRAG_HLEN;
            }
            _ => break,
        }
    }
    if matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS | IPV6_FRAGMENT
    ) {
        return Err(Outcome::Ipv6ExtensionLimit);
    }
    if ctx.data() + offset > ctx.data_end() {
        return Err(Outcome::TruncatedIpv6);
    }
    packet.flow.proto = next;
    packet.l4 = offset;
    transport(ctx, packet)
}

/// Ports and TCP flags, or the ICMP message.
#[inline(always)]
fn transport(ctx: &XdpContext, mut packet: Packet) -> Result<Packet, Outcome> {
    let proto = packet.flow.proto;
    let l4 = packet.l4;
    // Each family's own ICMP only: protocol 58 inside IPv4 or 1 inside IPv6 is no ICMP.
    let icmp_proto = if packet.flow.family == FAMILY_IPV4 {
        PROTO_ICMP
    } else {
        PROTO_ICMPV6
    };
    if proto == icmp_proto {
        if packet.fragment {
            return Err(Outcome::Fragment);
        }
        return icmp(ctx, packet);
    }
    let header_len = match proto {
        PROTO_TCP => TCP_HLEN,
        PROTO_UDP => UDP_HLEN,
        _ => return Err(Outcome::NotTcpUdp),
    };
    if packet.later_fragment {
        return Ok(packet);
    }
    if ctx.data() + l4 + header_len > ctx.data_end() {
        return Err(Outcome::TruncatedL4);
    }
    let ports = ptr_at::<Ports>(ctx, l4).ok_or(Outcome::TruncatedL4)?;
    // SAFETY: ptr_at checked the bounds.
    let ports = unsafe { &*ports };
    packet.flow.src_port = ports.src;
    packet.flow.dst_port = ports.dst;
    if proto == PROTO_TCP {
        let flags = ptr_at::<u8>(ctx, l4 + TCP_FLAGS_OFFSET).ok_or(Outcome::TruncatedL4)?;
        // SAFETY: ptr_at checked the bounds.
        let flags = unsafe { *flags };
        packet.tcp_flags = flags;
        packet.syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    }
    Ok(packet)
}

/// Echo requests, and the errors that concern a VIP's flows: for those, `flow` becomes the
/// flow of the embedded packet (which a backend sent from the VIP), turned around.
#[inline(always)]
fn icmp(ctx: &XdpContext, mut packet: Packet) -> Result<Packet, Outcome> {
    let header = ptr_at::<IcmpHdr>(ctx, packet.l4).ok_or(Outcome::TruncatedL4)?;
    // SAFETY: ptr_at checked the bounds.
    let (kind, code) = unsafe { ((*header).kind, (*header).code) };
    let embedded = packet.l4 + ICMP_HLEN;
    packet.inner_l3 = embedded;
    // An error is about a flow of this balancer only when it is addressed to where the quoted
    // packet came from (the VIP, or a NAT connection's SNAT address): compared below.
    let outer_dst = packet.flow.dst_words();
    if packet.flow.family == FAMILY_IPV4 {
        match (kind, code) {
            (ICMP_ECHO_REQUEST, 0) => packet.kind = Kind::EchoRequest,
            (ICMP_DEST_UNREACH, _) | (ICMP_TIME_EXCEEDED, _) => {
                let (flow, inner_l4) = embedded_ipv4(ctx, embedded)?;
                packet.flow = flow;
                packet.inner_l4 = inner_l4;
                packet.kind = Kind::IcmpError;
                packet.too_big = kind == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED;
            }
            _ => return Err(Outcome::IcmpOther),
        }
    } else {
        match (kind, code) {
            (ICMPV6_ECHO_REQUEST, 0) => packet.kind = Kind::EchoRequest,
            (ICMPV6_DEST_UNREACH, _) | (ICMPV6_PACKET_TOO_BIG, 0) | (ICMPV6_TIME_EXCEEDED, _) => {
                packet.flow = embedded_ipv6(ctx, embedded)?;
                packet.inner_l4 = embedded + IPV6_HLEN;
                packet.kind = Kind::IcmpError;
                packet.too_big = kind == ICMPV6_PACKET_TOO_BIG;
            }
            _ => return Err(Outcome::IcmpOther),
        }
    }
    // Word by word: the program has no `memcmp`.
    let (a, b) = (packet.flow.dst_words(), outer_dst);
    if packet.kind == Kind::IcmpError
        && (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) != 0
    {
        return Err(Outcome::IcmpOther);
    }
    Ok(packet)
}

/// The flow of an IPv4 packet embedded in an ICMP error, turned around (see
/// `Kind::IcmpError`), and where its transport header starts.
#[inline(always)]
fn embedded_ipv4(ctx: &XdpContext, offset: usize) -> Result<(FlowKey, usize), Outcome> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, offset).ok_or(Outcome::IcmpOther)?;
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &*ip };
    let header_len = ip.header_len();
    if ip.version() != 4
        || header_len < IPV4_HLEN
        || (ip.proto != PROTO_TCP && ip.proto != PROTO_UDP)
    {
        return Err(Outcome::IcmpOther);
    }
    let ports = ptr_at::<Ports>(ctx, offset + header_len).ok_or(Outcome::IcmpOther)?;
    // SAFETY: ptr_at checked the bounds.
    let ports = unsafe { &*ports };
    let mut flow = FlowKey {
        src_port: ports.dst,
        dst_port: ports.src,
        proto: ip.proto,
        family: FAMILY_IPV4,
        ..FlowKey::default()
    };
    flow.set_addresses(address_words(&ip.dst), address_words(&ip.src));
    Ok((flow, offset + header_len))
}

/// The flow of an IPv6 packet embedded in an ICMPv6 error, turned around. Only a transport
/// header right after the fixed header is looked at.
#[inline(always)]
fn embedded_ipv6(ctx: &XdpContext, offset: usize) -> Result<FlowKey, Outcome> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, offset).ok_or(Outcome::IcmpOther)?;
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &*ip };
    if ip.next_header != PROTO_TCP && ip.next_header != PROTO_UDP {
        return Err(Outcome::IcmpOther);
    }
    let ports = ptr_at::<Ports>(ctx, offset + IPV6_HLEN).ok_or(Outcome::IcmpOther)?;
    // SAFETY: ptr_at checked the bounds.
    let ports = unsafe { &*ports };
    let mut flow = FlowKey {
        src_port: ports.dst,
        dst_port: ports.src,
        proto: ip.next_header,
        family: FAMILY_IPV6,
        ..FlowKey::default()
    };
    flow.set_addresses(address_words(&ip.dst), address_words(&ip.src));
    Ok(flow)
}

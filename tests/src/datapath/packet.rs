//! Test packets, built with the packet library etherparse: what the client sends ([`Pkt`]),
//! the frame the balancer must send for it ([`forwarded`]), a few packets of other parties
//! (routers' ICMP errors, tunnels to the balancer itself), and a checksum validator.
//! Expected frames are built here from the input and the world's description, never copied
//! from the program's output.

use std::net::IpAddr;

use balancer_common::{FlowKey, FAMILY_IPV4, FAMILY_IPV6, PROTO_TCP, PROTO_UDP};
use etherparse::{
    Icmpv4Type, Icmpv6Type, IpDscp, IpEcn, IpFragOffset, IpHeaders, IpNumber, Ipv4Extensions,
    Ipv4Header, Ipv6Extensions, Ipv6FlowLabel, Ipv6Header, NetSlice, PacketBuilder, SlicedPacket,
    TransportSlice,
};

use super::{CLIENT4, CLIENT6, CLIENT_MAC, LB4, LB6, LB_MAC, ROUTER4, ROUTER6, ROUTER_MAC};

/// The transport of a [`Pkt`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// A TCP SYN (no payload unless sized).
    TcpSyn,
    /// A TCP segment of an established connection (ACK and PSH, with a payload).
    TcpAck,
    /// A server's SYN-ACK.
    TcpSynAck,
    /// A FIN (with ACK).
    TcpFin,
    /// A reset.
    TcpRst,
    Udp,
}

/// A packet from the client (or, with [`Pkt::from`], from another source). `bytes()` writes
/// it as the client sends it to the balancer.
#[derive(Clone, Copy, Debug)]
pub struct Pkt {
    pub dst: IpAddr,
    pub src: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    /// An 802.1Q tag with this VLAN id.
    pub vlan: Option<u16>,
    /// IPv4 options (Record Route, 12 bytes).
    pub options: bool,
    /// IPv4 DSCP and ECN, or IPv6 traffic class.
    pub tos: u8,
    /// IPv4 don't-fragment.
    pub df: bool,
    /// Payload bytes (`None`: none for a SYN, a short text otherwise).
    pub size: Option<usize>,
    /// IPv6 destination-options headers in front of the transport header.
    pub ext_headers: u8,
    /// (offset in 8-byte units, more fragments).
    pub fragment: Option<(u16, bool)>,
}

/// A TCP SYN from the client to `dst` (the client's address of `dst`'s family).
pub fn tcp(dst: IpAddr, sport: u16, dport: u16) -> Pkt {
    let src = match dst {
        IpAddr::V4(_) => IpAddr::V4(CLIENT4),
        IpAddr::V6(_) => IpAddr::V6(CLIENT6),
    };
    Pkt {
        dst,
        src,
        sport,
        dport,
        l4: L4::TcpSyn,
        vlan: None,
        options: false,
        tos: 0,
        df: true,
        size: None,
        ext_headers: 0,
        fragment: None,
    }
}

/// A UDP datagram from the client to `dst`.
pub fn udp(dst: IpAddr, sport: u16, dport: u16) -> Pkt {
    Pkt {
        l4: L4::Udp,
        ..tcp(dst, sport, dport)
    }
}

impl Pkt {
    /// A TCP SYN, not fragmented: what the program writes to the pending table.
    pub fn is_syn(&self) -> bool {
        self.l4 == L4::TcpSyn && self.fragment.is_none()
    }

    /// A segment of an established connection instead of a SYN.
    pub fn ack(self) -> Pkt {
        Pkt {
            l4: L4::TcpAck,
            ..self
        }
    }
    pub fn vlan(self, id: u16) -> Pkt {
        Pkt {
            vlan: Some(id),
            ..self
        }
    }
    pub fn with_options(self) -> Pkt {
        Pkt {
            options: true,
            ..self
        }
    }
    pub fn tos(self, tos: u8) -> Pkt {
        Pkt { tos, ..self }
    }
    pub fn no_df(self) -> Pkt {
        Pkt { df: false, ..self }
    }
    pub fn size(self, size: usize) -> Pkt {
        Pkt {
            size: Some(size),
            ..self
        }
    }
    pub fn ext_headers(self, n: u8) -> Pkt {
        Pkt {
            ext_headers: n,
            ..self
        }
    }
    /// A fragment at `offset` (8-byte units); a later one (offset > 0) carries no transport
    /// header.
    pub fn fragment(self, offset: u16, more: bool) -> Pkt {
        Pkt {
            fragment: Some((offset, more)),
            ..self
        }
    }
    pub fn from(self, src: IpAddr) -> Pkt {
        Pkt { src, ..self }
    }
    pub fn sport(self, sport: u16) -> Pkt {
        Pkt { sport, ..self }
    }

    fn payload(&self) -> Vec<u8> {
        match (self.size, self.l4) {
            (Some(n), _) => (0..n).map(|i| (i % 251) as u8).collect(),
            (None, L4::TcpSyn | L4::TcpSynAck | L4::TcpRst) => Vec::new(),
            (None, _) => b"hello, backend".to_vec(),
        }
    }

    fn ip_headers(&self) -> IpHeaders {
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut ip =
                    Ipv4Header::new(0, 64, IpNumber::TCP, src.octets(), dst.octets()).unwrap();
                ip.dscp = IpDscp::try_new(self.tos >> 2).unwrap();
                ip.ecn = IpEcn::try_new(self.tos & 3).unwrap();
                ip.dont_fragment = self.df;
                if self.options {
                    // Record Route with room for two addresses, padded with End of Options.
                    ip.options = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0].into();
                }
                IpHeaders::Ipv4(ip, Ipv4Extensions::default())
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => IpHeaders::Ipv6(
                Ipv6Header {
                    traffic_class: self.tos,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: 0,
                    next_header: IpNumber::TCP,
                    hop_limit: 64,
                    source: src.octets(),
                    destination: dst.octets(),
                },
                Ipv6Extensions::default(),
            ),
            _ => unreachable!("mixed families"),
        }
    }

    /// The IP packet alone, with extension headers and fragmentation applied.
    pub fn ip_bytes(&self) -> Vec<u8> {
        let step = PacketBuilder::ip(self.ip_headers());
        let mut out = Vec::new();
        let payload = self.payload();
        match self.l4 {
            L4::Udp => step.udp(self.sport, self.dport).write(&mut out, &payload),
            L4::TcpSyn => step
                .tcp(self.sport, self.dport, 1000, 64240)
                .syn()
                .write(&mut out, &payload),
            // Acknowledging the SYN-ACK below (sequence number 5000).
            L4::TcpAck => step
                .tcp(self.sport, self.dport, 1001, 64240)
                .ack(5001)
                .psh()
                .write(&mut out, &payload),
            L4::TcpSynAck => step
                .tcp(self.sport, self.dport, 5000, 64240)
                .syn()
                .ack(1001)
                .write(&mut out, &payload),
            L4::TcpFin => step
                .tcp(self.sport, self.dport, 1001, 64240)
                .fin()
                .ack(5001)
                .write(&mut out, &payload),
            L4::TcpRst => step
                .tcp(self.sport, self.dport, 1000, 0)
                .rst()
                .write(&mut out, &payload),
        }
        .unwrap();
        if self.dst.is_ipv4() {
            if let Some((offset, more)) = self.fragment {
                out = fragment_v4(&out, offset, more);
            }
        } else {
            for _ in 0..self.ext_headers {
                out = insert_v6_ext(&out, 60, &[1, 4, 0, 0, 0, 0]);
            }
            if let Some((offset, more)) = self.fragment {
                let field = (offset << 3) | more as u16;
                let [a, b] = field.to_be_bytes();
                out = insert_v6_ext(&out, 44, &[a, b, 0, 0, 0x12, 0x34]);
                if offset != 0 {
                    // A later fragment carries no transport header: cut it out.
                    let transport = if self.l4 == L4::Udp { 8 } else { 20 };
                    out.drain(48..48 + transport);
                    set_v6_payload_len(&mut out);
                }
            }
        }
        out
    }

    /// The frame as the client sends it to the balancer.
    pub fn bytes(&self) -> Vec<u8> {
        frame(CLIENT_MAC, LB_MAC, self.vlan, &self.ip_bytes())
    }

    /// The frame cut after `len` bytes.
    pub fn truncated(&self, len: usize) -> Vec<u8> {
        let mut bytes = self.bytes();
        bytes.truncate(len);
        bytes
    }

    /// The packet's flow as the connection table keys it and the Maglev hash reads it.
    pub fn flow(&self) -> FlowKey {
        let (src, family) = key_address(self.src);
        let (dst, _) = key_address(self.dst);
        FlowKey {
            src,
            dst,
            src_port: self.sport.to_be(),
            dst_port: self.dport.to_be(),
            proto: if self.l4 == L4::Udp {
                PROTO_UDP
            } else {
                PROTO_TCP
            },
            family,
            _pad: [0; 2],
        }
    }

    /// The flow as a VIP balancing fragments sees every fragment: ports cleared.
    pub fn fragment_flow(&self) -> FlowKey {
        FlowKey {
            src_port: 0,
            dst_port: 0,
            ..self.flow()
        }
    }
}

/// An address as map keys hold it: 16 bytes (IPv4 in the first four) and the family.
fn key_address(address: IpAddr) -> ([u8; 16], u8) {
    let mut bytes = [0u8; 16];
    match address {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            (bytes, FAMILY_IPV4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_IPV6),
    }
}

/// Ethernet (and an 802.1Q tag) in front of an IP packet.
pub fn frame(src: [u8; 6], dst: [u8; 6], vlan: Option<u16>, ip: &[u8]) -> Vec<u8> {
    let ether_type: [u8; 2] = if ip[0] >> 4 == 4 {
        [0x08, 0x00]
    } else {
        [0x86, 0xdd]
    };
    let mut f = Vec::with_capacity(18 + ip.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(id) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&id.to_be_bytes());
    }
    f.extend_from_slice(&ether_type);
    f.extend_from_slice(ip);
    f
}

/// The IP packet of a frame (after Ethernet and any VLAN tag).
fn ip_of(frame: &[u8]) -> &[u8] {
    if frame[12..14] == [0x81, 0x00] {
        &frame[18..]
    } else {
        &frame[14..]
    }
}

fn vlan_of(frame: &[u8]) -> Option<u16> {
    (frame[12..14] == [0x81, 0x00]).then(|| u16::from_be_bytes([frame[14], frame[15]]))
}

/// Sets the fragment fields of an IPv4 packet (and its checksum), keeping the transport header
/// for the first fragment and dropping it for later ones.
fn fragment_v4(ip: &[u8], offset: u16, more: bool) -> Vec<u8> {
    let (mut header, rest) = Ipv4Header::from_slice(ip).unwrap();
    header.more_fragments = more;
    header.dont_fragment = false;
    header.fragment_offset = IpFragOffset::try_new(offset).unwrap();
    let body: Vec<u8> = if offset == 0 {
        rest.to_vec()
    } else {
        rest[8.min(rest.len())..].to_vec()
    };
    header.set_payload_len(body.len()).unwrap();
    let mut out = Vec::new();
    header.write(&mut out).unwrap();
    out.extend_from_slice(&body);
    out
}

/// Inserts an 8-byte IPv6 extension header (`kind`, then `rest` after its next-header and
/// length bytes) right after the fixed header, chaining next-header fields.
fn insert_v6_ext(ip: &[u8], kind: u8, rest: &[u8; 6]) -> Vec<u8> {
    let mut out = ip[..40].to_vec();
    let next = out[6];
    out[6] = kind;
    out.push(next);
    out.push(0);
    out.extend_from_slice(rest);
    out.extend_from_slice(&ip[40..]);
    set_v6_payload_len(&mut out);
    out
}

fn set_v6_payload_len(ip: &mut [u8]) {
    let len = ((ip.len() - 40) as u16).to_be_bytes();
    ip[4] = len[0];
    ip[5] = len[1];
}

/// The outer header a tunnel puts in front of a packet.
#[derive(Clone, Copy, Debug)]
pub struct Encapsulation {
    pub source: IpAddr,
    /// The backend.
    pub destination: IpAddr,
    /// IPv6 outer headers only.
    pub flow_label: u32,
}

/// The frame the balancer sends for `input`, from its interface to `next_hop_mac`: direct
/// server return keeps the IP packet and changes the MACs; a tunnel puts an outer header in
/// front (its ToS and, for IPv4 in IPv4, don't-fragment copied from the inner header). The
/// VLAN tag stays.
pub fn forwarded(input: &[u8], next_hop_mac: [u8; 6], tunnel: Option<Encapsulation>) -> Vec<u8> {
    let inner = ip_of(input);
    let vlan = vlan_of(input);
    let Some(tunnel) = tunnel else {
        return frame(LB_MAC, next_hop_mac, vlan, inner);
    };
    let (tos, df, inner_proto) = if inner[0] >> 4 == 4 {
        let (h, _) = Ipv4Header::from_slice(inner).unwrap();
        (
            (h.dscp.value() << 2) | h.ecn.value(),
            h.dont_fragment,
            IpNumber::IPV4,
        )
    } else {
        let (h, _) = Ipv6Header::from_slice(inner).unwrap();
        (h.traffic_class, true, IpNumber::IPV6)
    };
    let mut outer = Vec::new();
    match (tunnel.source, tunnel.destination) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut h = Ipv4Header::new(
                inner.len() as u16,
                64,
                inner_proto,
                src.octets(),
                dst.octets(),
            )
            .unwrap();
            h.dscp = IpDscp::try_new(tos >> 2).unwrap();
            h.ecn = IpEcn::try_new(tos & 3).unwrap();
            h.dont_fragment = df;
            h.write(&mut outer).unwrap();
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => Ipv6Header {
            traffic_class: tos,
            flow_label: Ipv6FlowLabel::try_new(tunnel.flow_label).unwrap(),
            payload_length: inner.len() as u16,
            next_header: inner_proto,
            hop_limit: 64,
            source: src.octets(),
            destination: dst.octets(),
        }
        .write(&mut outer)
        .unwrap(),
        _ => unreachable!("the outer source has the backend's family"),
    }
    outer.extend_from_slice(inner);
    frame(LB_MAC, next_hop_mac, vlan, &outer)
}

/// An IP packet (`inner`) tunnelled by the router to the balancer's own address: IPIP,
/// IP6IP6 or IPv4 in IPv6.
pub fn tunnel_to_balancer(inner: &[u8], outer_v6: bool) -> Vec<u8> {
    let proto = if inner[0] >> 4 == 6 {
        IpNumber::IPV6
    } else {
        IpNumber::IPV4
    };
    let mut outer = Vec::new();
    if outer_v6 {
        Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: inner.len() as u16,
            next_header: proto,
            hop_limit: 64,
            source: ROUTER6.octets(),
            destination: LB6.octets(),
        }
        .write(&mut outer)
        .unwrap();
    } else {
        Ipv4Header::new(
            inner.len() as u16,
            64,
            proto,
            ROUTER4.octets(),
            LB4.octets(),
        )
        .unwrap()
        .write(&mut outer)
        .unwrap();
    }
    outer.extend_from_slice(inner);
    frame(ROUTER_MAC, LB_MAC, None, &outer)
}

/// The router's ICMP "fragmentation needed" (IPv4, next-hop MTU 1400) or ICMPv6 "packet too
/// big" (MTU 1280) about the IP packet `about`, sent to that packet's source through the
/// balancer. It quotes what the protocols ask for: the IPv4 header and 8 bytes, or as much of
/// the IPv6 packet as fits in 1280 bytes.
pub fn router_too_big(about: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    if about[0] >> 4 == 4 {
        let (quoted, _) = Ipv4Header::from_slice(about).unwrap();
        PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
            .ipv4(ROUTER4.octets(), quoted.source, 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400,
                },
            ))
            .write(&mut f, &about[..quoted.header_len() + 8])
            .unwrap();
    } else {
        let (quoted, _) = Ipv6Header::from_slice(about).unwrap();
        PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
            .ipv6(ROUTER6.octets(), quoted.source, 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut f, &about[..1232.min(about.len())])
            .unwrap();
    }
    f
}

/// Checks with the packet library that every IPv4 header checksum and the TCP/UDP/ICMP
/// checksum of a frame (inside a tunnel too) are valid; panics naming `case` otherwise.
pub fn assert_checksums_valid(bytes: &[u8], case: &str) {
    let sliced = SlicedPacket::from_ethernet(bytes)
        .unwrap_or_else(|e| panic!("{case}: unparsable output: {e}"));
    let header_v4 = |ip: &etherparse::Ipv4Slice| {
        let h = ip.header().to_header();
        assert_eq!(
            h.header_checksum,
            h.calc_header_checksum(),
            "{case}: IPv4 header checksum"
        );
    };
    let mut inner: Option<Vec<u8>> = None;
    match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            header_v4(ip);
            if matches!(ip.payload().ip_number, IpNumber::IPV4 | IpNumber::IPV6) {
                inner = Some(ip.payload().payload.to_vec());
            }
        }
        Some(NetSlice::Ipv6(ip)) => {
            if matches!(ip.payload().ip_number, IpNumber::IPV4 | IpNumber::IPV6) {
                inner = Some(ip.payload().payload.to_vec());
            }
        }
        _ => panic!("{case}: no IP in output"),
    }
    if let Some(inner) = inner {
        // Check the encapsulated packet as a frame of its own.
        return assert_checksums_valid(&frame(CLIENT_MAC, LB_MAC, None, &inner), case);
    }
    let ip = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            IpHeaders::Ipv4(ip.header().to_header(), Ipv4Extensions::default())
        }
        Some(NetSlice::Ipv6(ip)) => {
            IpHeaders::Ipv6(ip.header().to_header(), Ipv6Extensions::default())
        }
        _ => unreachable!(),
    };
    match (&sliced.transport, ip) {
        (Some(TransportSlice::Tcp(t)), IpHeaders::Ipv4(h, _)) => {
            assert_eq!(
                t.checksum(),
                t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap(),
                "{case}: TCP"
            );
        }
        (Some(TransportSlice::Tcp(t)), IpHeaders::Ipv6(h, _)) => {
            assert_eq!(
                t.checksum(),
                t.to_header().calc_checksum_ipv6(&h, t.payload()).unwrap(),
                "{case}: TCP"
            );
        }
        (Some(TransportSlice::Udp(u)), IpHeaders::Ipv4(h, _)) => {
            assert_eq!(
                u.checksum(),
                u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap(),
                "{case}: UDP"
            );
        }
        (Some(TransportSlice::Udp(u)), IpHeaders::Ipv6(h, _)) => {
            assert_eq!(
                u.checksum(),
                u.to_header().calc_checksum_ipv6(&h, u.payload()).unwrap(),
                "{case}: UDP"
            );
        }
        (Some(TransportSlice::Icmpv4(i)), _) => {
            assert_eq!(
                i.checksum(),
                i.header().icmp_type.calc_checksum(i.payload()),
                "{case}: ICMP"
            );
        }
        (Some(TransportSlice::Icmpv6(i)), IpHeaders::Ipv6(h, _)) => {
            let expected = i
                .header()
                .icmp_type
                .calc_checksum(h.source, h.destination, i.payload())
                .unwrap();
            assert_eq!(i.checksum(), expected, "{case}: ICMPv6");
        }
        // Fragments after the first carry no transport header to check.
        (None, _) => {}
        (other, _) => panic!("{case}: unexpected transport {other:?}"),
    }
}

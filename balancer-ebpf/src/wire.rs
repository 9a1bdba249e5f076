//! Wire formats: the headers the program reads and writes, field by field, and the protocol
//! numbers it looks at. Multi-byte fields hold network byte order, as on the wire; every
//! 32-bit field is a byte array, so that no header needs more than 2-byte alignment (headers
//! sit at even, but not always 4-byte aligned, offsets).
//!
//! No packet access here: headers are read and written through `access`.

use balancer_common::csum;

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;

// EtherTypes, in network byte order as read from the packet.
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
pub const ETH_P_IPV6: u16 = 0x86DDu16.to_be();
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();
pub const ETH_P_8021AD: u16 = 0x88A8u16.to_be();

/// IPv4 flags and fragment offset, network byte order.
pub const IP_DF: u16 = 0x4000u16.to_be();
pub const IP_MF: u16 = 0x2000u16.to_be();
pub const IP_OFFSET: u16 = 0x1FFFu16.to_be();

// IPv6 extension headers walked.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DEST_OPTIONS: u8 = 60;

/// Fragment offset bits of the IPv6 fragment header's `offset_flags` (host byte order).
pub const IPV6_FRAG_OFFSET: u16 = 0xFFF8;

// ICMP types handled.
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// Offset and bits of the TCP flags byte.
pub const TCP_FLAGS_OFFSET: usize = 13;
pub const TCP_SYN: u8 = 0x02;
/// Offsets of the checksum in the TCP and UDP headers.
pub const TCP_CHECK_OFFSET: usize = 16;
pub const UDP_CHECK_OFFSET: usize = 6;
pub const TCP_ACK: u8 = 0x10;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

/// An 802.1Q (or 802.1ad) tag, after the Ethernet addresses and the tag's own EtherType.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VlanHdr {
    pub _tci: u16,
    pub ether_type: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// Version 4, and a header of five 32-bit words (no options).
pub const IPV4_VERSION_IHL: u8 = 0x45;

impl Ipv4Hdr {
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.version_ihl >> 4
    }

    /// Header length in bytes, options included.
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        ((self.version_ihl & 0x0F) as usize) * 4
    }

    /// The header checksum of an option-less header, computed as if `check` were zero.
    /// Fields are summed as they lie in memory, which is the order `csum` expects.
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        let mut sum = csum::add(0, u16::from_ne_bytes([self.version_ihl, self.tos]));
        sum = csum::add(sum, self.total_len);
        sum = csum::add(sum, self.id);
        sum = csum::add(sum, self.frag_off);
        sum = csum::add(sum, u16::from_ne_bytes([self.ttl, self.proto]));
        sum = csum::add_bytes(sum, &self.src);
        sum = csum::add_bytes(sum, &self.dst);
        csum::finish(sum)
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version, traffic class and flow label.
    pub vtc_flow: [u8; 4],
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

impl Ipv6Hdr {
    #[inline(always)]
    pub fn version(&self) -> u8 {
        self.vtc_flow[0] >> 4
    }

    #[inline(always)]
    pub fn traffic_class(&self) -> u8 {
        (self.vtc_flow[0] << 4) | (self.vtc_flow[1] >> 4)
    }

    /// The first word of a header: version 6, `traffic_class`, and the low 20 bits of
    /// `flow_label`.
    #[inline(always)]
    pub fn vtc_flow(traffic_class: u8, flow_label: u32) -> [u8; 4] {
        [
            0x60 | (traffic_class >> 4),
            (traffic_class << 4) | ((flow_label >> 16) as u8 & 0x0F),
            (flow_label >> 8) as u8,
            flow_label as u8,
        ]
    }
}

/// Hop-by-hop, routing and destination options headers alike: what follows, and the
/// header's length in 8-byte units beyond the first 8 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6ExtHdr {
    pub next_header: u8,
    pub len: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6FragHdr {
    pub next_header: u8,
    pub _reserved: u8,
    /// Fragment offset (`IPV6_FRAG_OFFSET`) and the more-fragments bit.
    pub offset_flags: u16,
    pub _id: [u8; 4],
}

pub const IPV6_FRAG_HLEN: usize = 8;

/// The first four bytes of TCP and UDP alike.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    /// Type-specific: the echo identifier and sequence number, the next-hop MTU...
    pub rest: [u8; 4],
}

/// An IPv4 address as balancer-common stores it: in the first four bytes of a 16-byte field.
#[inline(always)]
pub fn ipv4_address(addr: &[u8; 16]) -> [u8; 4] {
    [addr[0], addr[1], addr[2], addr[3]]
}

/// The 32-bit words of an address field of a header (wire byte order, read natively), read
/// 16 bits at a time: header structs are 2-byte aligned. `N` is 4 (IPv4) or 16 (IPv6); an
/// IPv4 address leaves the last three words 0.
#[inline(always)]
pub fn address_words<const N: usize>(bytes: &[u8; N]) -> [u32; 4] {
    let halves = bytes.as_ptr() as *const u16;
    let word = |i: usize| {
        if 4 * i >= N {
            return 0;
        }
        // SAFETY: the field lies in a 2-byte aligned header at an even offset, and word `i`
        // lies within its N bytes.
        let (a, b) = unsafe { (*halves.add(2 * i), *halves.add(2 * i + 1)) };
        let (a, b) = (a.to_ne_bytes(), b.to_ne_bytes());
        u32::from_ne_bytes([a[0], a[1], b[0], b[1]])
    };
    [word(0), word(1), word(2), word(3)]
}

//! NAT: the state the packet path keeps per translated connection, and the checksum
//! arithmetic of address and port translation.
//!
//! # State
//! A connection through a NAT VIP has two entries in its family's NAT table (`NAT_V4`,
//! `NAT_V6`), one per direction, each keyed by the 5-tuple its packets arrive with:
//! - the forward entry, keyed by the client's packet (client -> VIP), says what the packet
//!   becomes: from the SNAT address and port (full NAT) or still from the client
//!   (destination-only NAT), to the backend's address and port;
//! - the reply entry, keyed by the backend's reply (backend -> SNAT address and port, or
//!   backend -> client), says what the reply becomes (VIP -> client) and where it leaves:
//!   towards the next hop the client's packet came from, learned from that packet.
//!
//! Each entry's key is the reverse of the other entry's translation, so either entry finds
//! its twin without storing its key. The reply key is inserted first, with no-overwrite
//! semantics: it holds the SNAT port, and two CPUs can never take the same one. Both entries
//! carry the connection's TCP state and the time of its last packet, written in place; the
//! twin is looked up only when the state changes or the time is `NAT_REFRESH_NS` old.
//!
//! # Checksums
//! When a packet's address and port change, its checksums are updated from the old and new
//! values alone (RFC 1624), never recomputed over the payload.
//!
//! - The IPv4 header checksum covers the addresses; IPv6 has no header checksum.
//! - TCP and UDP checksums cover a pseudo-header with both addresses, so an address change
//!   updates them as well as a port change does.
//! - UDP: a checksum of 0 means "none" and stays 0 (the sender did not compute one); an
//!   updated checksum that comes out as 0 is sent as 0xffff, its other one's-complement form
//!   (RFC 768), because 0 would mean "none".
//!
//! Addresses and ports are taken in memory order, as they sit in the packet (see `csum`).

use crate::{csum, PROTO_TCP, PROTO_UDP};

/// The key flag of a reply-direction entry, in the key's `proto` word above the protocol:
/// the two directions share one table and can never share a key.
pub const NAT_KEY_REPLY: u32 = 1 << 8;

/// The entry translates replies (backend -> client); without it, the client's packets.
pub const NAT_F_REPLY: u8 = 1 << 0;
/// The connection's source is translated too (full NAT); without it only the destination
/// (destination-only NAT).
pub const NAT_F_SNAT: u8 = 1 << 1;

/// TCP state bits of a connection, the same in both its entries: the client's SYN, the
/// backend's SYN-ACK, a FIN from either side, a reset from either side. A reset is not
/// trusted at once (it may be spoofed): it shortens the timeout, and any later packet
/// without one clears it.
pub const NAT_S_SYN: u8 = 1 << 0;
pub const NAT_S_SYN_ACK: u8 = 1 << 1;
pub const NAT_S_FIN_CLIENT: u8 = 1 << 2;
pub const NAT_S_FIN_BACKEND: u8 = 1 << 3;
pub const NAT_S_RST: u8 = 1 << 4;

/// How often, at most, a connection's time of last packet is written (in both entries):
/// an established connection's packets read their entry and write nothing in between.
pub const NAT_REFRESH_NS: u64 = 1_000_000_000;

/// How many SNAT addresses a VIP may have (a power of two: the index is masked).
pub const MAX_SNAT_ADDRESSES: usize = 16;
/// How many ports the packet path tries for a new connection before it gives up (the
/// client's own first, then consecutive ports from a hash of the flow): every port of a
/// range of up to 23. The verifier walks each try: 64 cost about 0.2 s more per load, which
/// emulated VMs multiply many times.
pub const NAT_PORT_TRIES: u32 = 24;

/// The VIP translates sources too (full NAT); without it, destinations only.
pub const NAT_VIP_F_SNAT: u16 = 1 << 0;

/// One direction of a NAT connection (see the module's documentation).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatEntry {
    /// The source address written into the packet (32-bit words as in `FlowKey`; IPv4: the
    /// first word).
    pub src: [u32; 4],
    /// The destination address written into the packet.
    pub dst: [u32; 4],
    /// Ports written into the packet, network byte order.
    pub src_port: u16,
    pub dst_port: u16,
    /// Reply direction: the Ethernet addresses and interface towards the client (the source
    /// MAC, destination MAC and ingress interface of the client's first packet). The forward
    /// direction reads its next hop from the backend's entry instead.
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub ifindex: u32,
    /// The backend the connection was placed on.
    pub backend_id: u32,
    /// `NAT_F_*`.
    pub flags: u8,
    /// `NAT_S_*`, the connection's (the same in both entries).
    pub state: u8,
    /// The transport protocol.
    pub proto: u8,
    pub _pad: u8,
    /// A pending TCP connection (`defence`): the sequence number of the backend's SYN-ACK,
    /// as on the wire, which the client's acknowledgement must answer (+1) for the connection
    /// to be promoted to the NAT tables. 0 until the SYN-ACK is seen.
    pub isn: u32,
    /// When the connection last saw a packet, within `NAT_REFRESH_NS` (CLOCK_MONOTONIC, in
    /// nanoseconds).
    pub last_seen: u64,
}

/// The timeouts of NAT connections by state, in nanoseconds (`NAT_SETTINGS`, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatSettings {
    /// TCP before the backend's SYN-ACK.
    pub syn_ns: u64,
    /// TCP after the handshake.
    pub established_ns: u64,
    /// TCP after a reset, or a FIN from both sides.
    pub closing_ns: u64,
    /// UDP since the last datagram either way.
    pub udp_ns: u64,
    /// How much longer a timed-out connection's reply entry, which holds its SNAT port, is
    /// kept (by the daemon's sweeps; the packet path does not read it).
    pub quarantine_ns: u64,
}

/// A NAT VIP's translation (`NAT_VIPS`, by VIP id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatVip {
    /// `NAT_VIP_F_*`.
    pub flags: u16,
    /// SNAT addresses in use: the first `snat_count` of `snat` (full NAT only).
    pub snat_count: u16,
    /// SNAT ports, host byte order, inclusive.
    pub port_min: u16,
    pub port_max: u16,
    pub snat: [[u32; 4]; MAX_SNAT_ADDRESSES],
}

impl NatEntry {
    /// The connection's timeout in its state.
    #[inline(always)]
    pub fn timeout(&self, settings: &NatSettings) -> u64 {
        if self.proto != PROTO_TCP {
            settings.udp_ns
        } else if self.state & NAT_S_RST != 0
            || self.state & (NAT_S_FIN_CLIENT | NAT_S_FIN_BACKEND)
                == NAT_S_FIN_CLIENT | NAT_S_FIN_BACKEND
        {
            settings.closing_ns
        } else if self.state & NAT_S_SYN_ACK == 0 {
            settings.syn_ns
        } else {
            settings.established_ns
        }
    }

    /// Whether the daemon removes this entry at `now`: its connection timed out, and for a
    /// reply entry (which holds the SNAT port) the quarantine passed too.
    #[inline(always)]
    pub fn sweepable(&self, settings: &NatSettings, now: u64) -> bool {
        let quarantine = if self.flags & NAT_F_REPLY != 0 {
            settings.quarantine_ns
        } else {
            0
        };
        now.saturating_sub(self.last_seen) > self.timeout(settings).saturating_add(quarantine)
    }

    /// Whether the connection has timed out at `now`.
    #[inline(always)]
    pub fn expired(&self, settings: &NatSettings, now: u64) -> bool {
        now.saturating_sub(self.last_seen) > self.timeout(settings)
    }

    /// The state after a TCP packet with `flags` (the TCP flags byte) in this entry's
    /// direction (`reply`).
    #[inline(always)]
    pub fn next_state(state: u8, flags: u8, reply: bool) -> u8 {
        const FIN: u8 = 0x01;
        const SYN: u8 = 0x02;
        const RST: u8 = 0x04;
        let mut next = if flags & RST != 0 {
            state | NAT_S_RST
        } else {
            state & !NAT_S_RST
        };
        if flags & SYN != 0 {
            next |= if reply { NAT_S_SYN_ACK } else { NAT_S_SYN };
        }
        if flags & FIN != 0 {
            next |= if reply {
                NAT_S_FIN_BACKEND
            } else {
                NAT_S_FIN_CLIENT
            };
        }
        next
    }
}

/// One end of a flow rewritten: an address (4 or 16 bytes) and a port (network byte order, as
/// in the packet), old and new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite<const N: usize> {
    pub old_addr: [u8; N],
    pub new_addr: [u8; N],
    pub old_port: u16,
    pub new_port: u16,
}

/// What a checksum must take in when 16-bit words it covers change: the sum of the complement
/// of every old word and every new word (RFC 1624, equation 3), gathered while the words are
/// rewritten and applied to each checksum that covers them. The packet path rewrites fields
/// in place and feeds the old and new words here: nothing is copied to the stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(u32);

impl Delta {
    /// A word changed from `old` to `new` (memory order, as in `csum`).
    #[inline(always)]
    pub fn replace(&mut self, old: u16, new: u16) {
        self.0 += (!old) as u32 + new as u32;
    }

    /// Every word of `old` changed to the same word of `new` (`N` even).
    #[inline(always)]
    pub fn replace_bytes<const N: usize>(&mut self, old: &[u8; N], new: &[u8; N]) {
        let mut i = 0;
        while i + 1 < N {
            self.replace(
                u16::from_ne_bytes([old[i], old[i + 1]]),
                u16::from_ne_bytes([new[i], new[i + 1]]),
            );
            i += 2;
        }
    }

    /// Both changes.
    #[inline(always)]
    pub fn plus(self, other: Delta) -> Delta {
        Delta(fold(self.0) + fold(other.0))
    }

    /// `check` (a checksum field: IPv4 header, ICMP) over the new words.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        csum::finish((!check) as u32 + fold(self.0))
    }

    /// A TCP or UDP checksum (`proto`) over the new words: a UDP checksum of 0 stays 0, and
    /// one that comes out as 0 is written 0xffff.
    #[inline(always)]
    pub fn apply_l4(self, check: u16, proto: u8) -> u16 {
        if proto == PROTO_UDP && check == 0 {
            return 0;
        }
        let updated = self.apply(check);
        if proto == PROTO_UDP && updated == 0 {
            0xffff
        } else {
            updated
        }
    }
}

#[inline(always)]
fn fold(sum: u32) -> u32 {
    (sum & 0xFFFF) + (sum >> 16)
}

impl<const N: usize> Rewrite<N> {
    /// The change of this end: its address and its port.
    #[inline(always)]
    pub fn delta(&self) -> Delta {
        let mut d = Delta::default();
        d.replace_bytes(&self.old_addr, &self.new_addr);
        d.replace(self.old_port, self.new_port);
        d
    }
}

/// The IPv4 header checksum after one of its addresses changed from `old` to `new`.
#[inline(always)]
pub fn ipv4_header_check(check: u16, old: &[u8; 4], new: &[u8; 4]) -> u16 {
    let mut d = Delta::default();
    d.replace_bytes(old, new);
    d.apply(check)
}

/// A TCP or UDP checksum after `rewrite` (one address of the pseudo-header and the port of
/// the same end). `proto` is the transport protocol: a UDP checksum of 0 stays 0, and one
/// that comes out as 0 is written 0xffff.
#[inline(always)]
pub fn l4_check<const N: usize>(check: u16, proto: u8, rewrite: &Rewrite<N>) -> u16 {
    rewrite.delta().apply_l4(check, proto)
}

/// A TCP or UDP checksum after both ends of the flow were rewritten, as the packet path
/// does it: one sum of both changes, applied once.
#[inline(always)]
pub fn l4_check_both<const N: usize>(
    check: u16,
    proto: u8,
    src: &Rewrite<N>,
    dst: &Rewrite<N>,
) -> u16 {
    src.delta().plus(dst.delta()).apply_l4(check, proto)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::{PROTO_TCP, PROTO_UDP};

    /// A small deterministic generator (xorshift64*): the property test needs no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            core::array::from_fn(|_| self.next() as u8)
        }
    }

    /// A TCP or UDP segment (header and payload) between two addresses, with its checksum
    /// computed from scratch (over the pseudo-header), at the offset the protocol puts it.
    struct Segment {
        src: Vec<u8>,
        dst: Vec<u8>,
        proto: u8,
        bytes: Vec<u8>,
    }

    impl Segment {
        fn check_offset(&self) -> usize {
            if self.proto == PROTO_TCP {
                16
            } else {
                6
            }
        }

        fn check(&self) -> u16 {
            let at = self.check_offset();
            u16::from_ne_bytes([self.bytes[at], self.bytes[at + 1]])
        }

        fn set_check(&mut self, check: u16) {
            let at = self.check_offset();
            self.bytes[at..at + 2].copy_from_slice(&check.to_ne_bytes());
        }

        /// The checksum computed from scratch, with the field taken as 0 (and UDP's 0 sent as
        /// 0xffff).
        fn full_check(&self) -> u16 {
            let mut zeroed = self.bytes.clone();
            let at = self.check_offset();
            zeroed[at] = 0;
            zeroed[at + 1] = 0;
            let mut sum = csum::add_bytes(0, &self.src);
            sum = csum::add_bytes(sum, &self.dst);
            sum = csum::add(sum, u16::from_ne_bytes([0, self.proto]));
            sum = csum::add(sum, (zeroed.len() as u16).to_be());
            sum = csum::add_bytes(sum, &zeroed);
            let check = csum::finish(sum);
            if self.proto == PROTO_UDP && check == 0 {
                0xffff
            } else {
                check
            }
        }

        /// The port of one end (source: offset 0, destination: 2).
        fn port(&self, at: usize) -> u16 {
            u16::from_ne_bytes([self.bytes[at], self.bytes[at + 1]])
        }
    }

    fn random_segment(rng: &mut Rng, v6: bool) -> Segment {
        let proto = if rng.next().is_multiple_of(2) {
            PROTO_TCP
        } else {
            PROTO_UDP
        };
        let header = if proto == PROTO_TCP { 20 } else { 8 };
        // Odd lengths too: the last byte is padded with zero in the sum.
        let len = header + (rng.next() % 64) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let (src, dst) = if v6 {
            (rng.bytes::<16>().to_vec(), rng.bytes::<16>().to_vec())
        } else {
            (rng.bytes::<4>().to_vec(), rng.bytes::<4>().to_vec())
        };
        let mut segment = Segment {
            src,
            dst,
            proto,
            bytes,
        };
        if proto == PROTO_UDP {
            // UDP's length field is its whole length.
            let len = (segment.bytes.len() as u16).to_be_bytes();
            segment.bytes[4..6].copy_from_slice(&len);
        }
        let check = segment.full_check();
        segment.set_check(check);
        segment
    }

    /// Rewrites one end of `segment` (the destination if `dst`, else the source) to `addr`
    /// and `port`, updating the checksum incrementally; returns the rewrite.
    fn translate<const N: usize>(
        segment: &mut Segment,
        dst: bool,
        addr: [u8; N],
        port: u16,
    ) -> Rewrite<N> {
        let port_at = if dst { 2 } else { 0 };
        let old_addr: [u8; N] = if dst { &segment.dst } else { &segment.src }[..]
            .try_into()
            .unwrap();
        let rewrite = Rewrite {
            old_addr,
            new_addr: addr,
            old_port: segment.port(port_at),
            new_port: port,
        };
        let check = l4_check(segment.check(), segment.proto, &rewrite);
        if dst {
            segment.dst = addr.to_vec();
        } else {
            segment.src = addr.to_vec();
        }
        segment.bytes[port_at..port_at + 2].copy_from_slice(&port.to_ne_bytes());
        segment.set_check(check);
        rewrite
    }

    fn check_both_ends<const N: usize>(rng: &mut Rng, case: usize) {
        let mut segment = random_segment(rng, N == 16);
        // Forward (destination to the backend, source to the SNAT address), then back.
        translate(&mut segment, true, rng.bytes::<N>(), rng.next() as u16);
        assert_eq!(
            segment.check(),
            segment.full_check(),
            "case {case}: after DNAT"
        );
        translate(&mut segment, false, rng.bytes::<N>(), rng.next() as u16);
        assert_eq!(
            segment.check(),
            segment.full_check(),
            "case {case}: after SNAT"
        );
    }

    /// Both ends at once (`l4_check_both`), as the packet path rewrites them.
    fn check_both_at_once<const N: usize>(rng: &mut Rng, case: usize) {
        let mut segment = random_segment(rng, N == 16);
        let original = segment.check();
        let dst = translate(&mut segment, true, rng.bytes::<N>(), rng.next() as u16);
        let src = translate(&mut segment, false, rng.bytes::<N>(), rng.next() as u16);
        let both = l4_check_both(original, segment.proto, &src, &dst);
        let full = segment.full_check();
        // 0 and 0xffff are one sum in one's complement; UDP sends 0xffff.
        assert!(
            both == full || (segment.proto == PROTO_TCP && both == 0xffff && full == 0),
            "case {case}: both ends at once: {both:#06x}, from scratch {full:#06x}"
        );
    }

    #[test]
    fn both_ends_rewritten_at_once_equal_full_checksums() {
        let mut rng = Rng(0x5eed_1234_abcd_0002);
        for case in 0..10_000usize {
            if case.is_multiple_of(2) {
                check_both_at_once::<4>(&mut rng, case);
            } else {
                check_both_at_once::<16>(&mut rng, case);
            }
        }
    }

    #[test]
    fn connection_state_and_timeouts() {
        let settings = NatSettings {
            syn_ns: 60,
            established_ns: 7200,
            closing_ns: 10,
            udp_ns: 30,
            quarantine_ns: 5,
        };
        let (syn, ack, fin, rst) = (0x02u8, 0x10u8, 0x01u8, 0x04u8);
        let mut e = NatEntry {
            proto: PROTO_TCP,
            ..NatEntry::default()
        };
        e.state = NatEntry::next_state(0, syn, false);
        assert_eq!(e.timeout(&settings), 60, "SYN sent, no answer yet");
        e.state = NatEntry::next_state(e.state, syn | ack, true);
        assert_eq!(e.timeout(&settings), 7200, "handshake answered");
        e.state = NatEntry::next_state(e.state, rst, true);
        assert_eq!(e.timeout(&settings), 10, "a reset shortens the timeout");
        e.state = NatEntry::next_state(e.state, ack, false);
        assert_eq!(
            e.timeout(&settings),
            7200,
            "a packet after a reset (a spoofed one) restores it"
        );
        e.state = NatEntry::next_state(e.state, fin | ack, false);
        assert_eq!(e.timeout(&settings), 7200, "half closed");
        e.state = NatEntry::next_state(e.state, fin | ack, true);
        assert_eq!(e.timeout(&settings), 10, "closed both ways");
        e.last_seen = 100;
        assert!(!e.expired(&settings, 110));
        assert!(e.expired(&settings, 111));
        assert!(
            !e.expired(&settings, 50),
            "a clock behind the entry never expires it"
        );
        assert!(
            e.sweepable(&settings, 111),
            "a forward entry goes when it times out"
        );
        let reply = NatEntry {
            flags: NAT_F_REPLY,
            ..e
        };
        assert!(
            !reply.sweepable(&settings, 115),
            "its port waits the quarantine"
        );
        assert!(reply.sweepable(&settings, 116));
        let udp = NatEntry {
            proto: PROTO_UDP,
            ..NatEntry::default()
        };
        assert_eq!(udp.timeout(&settings), 30);
    }

    /// At least 10,000 random segments, IPv4 and IPv6, TCP and UDP, odd and even lengths:
    /// every incrementally updated checksum equals the one computed from scratch.
    #[test]
    fn incremental_checksums_equal_full_ones_on_random_packets() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for case in 0..10_000usize {
            if case.is_multiple_of(2) {
                check_both_ends::<4>(&mut rng, case);
            } else {
                check_both_ends::<16>(&mut rng, case);
            }
        }
    }

    #[test]
    fn ipv4_header_checksum_follows_an_address_change() {
        let mut rng = Rng(7);
        for _ in 0..1_000 {
            let mut header: [u8; 20] = rng.bytes();
            header[10] = 0;
            header[11] = 0;
            let check = csum::finish(csum::add_bytes(0, &header));
            let old: [u8; 4] = header[16..20].try_into().unwrap();
            let new: [u8; 4] = rng.bytes();
            header[16..20].copy_from_slice(&new);
            let updated = ipv4_header_check(check, &old, &new);
            assert_eq!(updated, csum::finish(csum::add_bytes(0, &header)));
        }
    }

    #[test]
    fn a_udp_checksum_of_zero_stays_zero_and_a_computed_zero_is_sent_as_ffff() {
        let rewrite = Rewrite {
            old_addr: [10, 0, 0, 1],
            new_addr: [10, 0, 0, 2],
            old_port: 80u16.to_be(),
            new_port: 8080u16.to_be(),
        };
        assert_eq!(
            l4_check(0, PROTO_UDP, &rewrite),
            0,
            "no checksum stays none"
        );
        // A checksum that the rewrite turns into 0: the one whose complement the change
        // cancels, found by search.
        let zero_after = (1..=u16::MAX)
            .find(|&c| rewrite.delta().apply(c) == 0)
            .expect("some checksum updates to 0");
        assert_eq!(l4_check(zero_after, PROTO_UDP, &rewrite), 0xffff);
        assert_eq!(
            l4_check(zero_after, PROTO_TCP, &rewrite),
            0,
            "TCP keeps its 0"
        );
    }
}

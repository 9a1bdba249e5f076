//! The checksum arithmetic of address and port translation (NAT), shared by the packet path
//! and its host tests: when a packet's address and port change, its checksums are updated
//! from the old and new values alone (RFC 1624), never recomputed over the payload.
//!
//! - The IPv4 header checksum covers the addresses; IPv6 has no header checksum.
//! - TCP and UDP checksums cover a pseudo-header with both addresses, so an address change
//!   updates them as well as a port change does.
//! - UDP: a checksum of 0 means "none" and stays 0 (the sender did not compute one); an
//!   updated checksum that comes out as 0 is sent as 0xffff, its other one's-complement form
//!   (RFC 768), because 0 would mean "none".
//!
//! Addresses and ports are taken in memory order, as they sit in the packet (see `csum`).

use crate::{csum, PROTO_UDP};

/// One end of a flow rewritten: an address (4 or 16 bytes) and a port (network byte order, as
/// in the packet), old and new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite<const N: usize> {
    pub old_addr: [u8; N],
    pub new_addr: [u8; N],
    pub old_port: u16,
    pub new_port: u16,
}

/// The running sum that turns a checksum over the old bytes into one over the new: the
/// complement of every old word plus every new word (RFC 1624, equation 3, for many words).
#[inline(always)]
fn delta<const N: usize>(mut sum: u32, old: &[u8; N], new: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += (!u16::from_ne_bytes([old[i], old[i + 1]])) as u32;
        sum += u16::from_ne_bytes([new[i], new[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// The IPv4 header checksum after one of its addresses changed from `old` to `new`.
#[inline(always)]
pub fn ipv4_header_check(check: u16, old: &[u8; 4], new: &[u8; 4]) -> u16 {
    csum::finish(delta((!check) as u32, old, new))
}

/// A TCP or UDP checksum after `rewrite` (one address of the pseudo-header and the port of
/// the same end). `proto` is the transport protocol: a UDP checksum of 0 stays 0, and one
/// that comes out as 0 is written 0xffff.
#[inline(always)]
pub fn l4_check<const N: usize>(check: u16, proto: u8, rewrite: &Rewrite<N>) -> u16 {
    if proto == PROTO_UDP && check == 0 {
        return 0;
    }
    let mut sum = delta((!check) as u32, &rewrite.old_addr, &rewrite.new_addr);
    sum += (!rewrite.old_port) as u32;
    sum += rewrite.new_port as u32;
    let updated = csum::finish(sum);
    if proto == PROTO_UDP && updated == 0 {
        0xffff
    } else {
        updated
    }
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
            .find(|&c| {
                let sum = delta((!c) as u32, &rewrite.old_addr, &rewrite.new_addr)
                    + (!rewrite.old_port) as u32
                    + rewrite.new_port as u32;
                csum::finish(sum) == 0
            })
            .expect("some checksum updates to 0");
        assert_eq!(l4_check(zero_after, PROTO_UDP, &rewrite), 0xffff);
        assert_eq!(
            l4_check(zero_after, PROTO_TCP, &rewrite),
            0,
            "TCP keeps its 0"
        );
    }
}

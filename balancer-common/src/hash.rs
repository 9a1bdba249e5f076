//! The flow hash, shared so that the daemon and the tests can predict where the program
//! sends a flow.
//!
//! MurmurHash3 (x86, 32-bit) over 32-bit words: a handful of multiplies and rotates per word,
//! no tables, no loops with a data-dependent bound, so it costs a few nanoseconds in the
//! packet path and the verifier sees straight-line code. The seed is configurable so that a
//! fleet of balancers can agree on it (same seed: same backend for the same flow on every
//! node) and so that an operator can change it.

use crate::{FlowKey, VipMeta, FAMILY_IPV4};

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn finish(mut h: u32, len_bytes: u32) -> u32 {
    h ^= len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// MurmurHash3_x86_32 of `N` little-endian words.
#[inline(always)]
pub fn hash_words<const N: usize>(words: &[u32; N], seed: u32) -> u32 {
    let mut h = seed;
    let mut i = 0;
    while i < N {
        h = mix(h, words[i]);
        i += 1;
    }
    finish(h, (N * 4) as u32)
}

#[inline(always)]
fn word(bytes: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([
        bytes[i * 4],
        bytes[i * 4 + 1],
        bytes[i * 4 + 2],
        bytes[i * 4 + 3],
    ])
}

/// The prefilter bit of a destination address, `0..VIP_FILTER_WORDS * 64`: a multiplicative
/// (Fibonacci) hash of the address's words folded into one, its top 16 bits. One multiply
/// in the packet path; neighbouring addresses land far apart.
#[inline(always)]
pub fn vip_filter_bit(addr: &[u8; 16], family: u8) -> u32 {
    let mut folded = word(addr, 0);
    if family != FAMILY_IPV4 {
        folded ^= word(addr, 1).rotate_left(8) ^ word(addr, 2).rotate_left(16);
        folded ^= word(addr, 3).rotate_left(24);
    }
    folded.wrapping_mul(0x9e37_79b1) >> 16
}

/// Hash of a flow's 5-tuple. IPv4 flows hash only the address words they use.
#[inline(always)]
pub fn flow_hash(flow: &FlowKey, seed: u32) -> u32 {
    let ports = (flow.src_port as u32) << 16 | flow.dst_port as u32;
    let proto = (flow.family as u32) << 8 | flow.proto as u32;
    if flow.family == FAMILY_IPV4 {
        hash_words(
            &[word(&flow.src, 0), word(&flow.dst, 0), ports, proto],
            seed,
        )
    } else {
        hash_words(
            &[
                word(&flow.src, 0),
                word(&flow.src, 1),
                word(&flow.src, 2),
                word(&flow.src, 3),
                word(&flow.dst, 0),
                word(&flow.dst, 1),
                word(&flow.dst, 2),
                word(&flow.dst, 3),
                ports,
                proto,
            ],
            seed,
        )
    }
}

/// The hash a VIP places a flow by: the 5-tuple; for a VIP that hashes the destination port
/// only, the flow with its source address and port cleared; for a VIP that balances
/// fragments, the addresses and protocol only, for every datagram, fragmented or not (a
/// later fragment carries no port, so hashing the others on their ports would split a flow
/// that is sometimes fragmented over two backends). The program and every prediction of it
/// (tests, benchmarks) call this one function.
#[inline(always)]
pub fn vip_flow_hash(vip: &VipMeta, flow: &FlowKey, seed: u32) -> u32 {
    if vip.hashes_dst_port_only() {
        let only_port = FlowKey {
            src: [0; 16],
            src_port: 0,
            ..*flow
        };
        flow_hash(&only_port, seed)
    } else if vip.balances_fragments() {
        let addresses = FlowKey {
            src_port: 0,
            dst_port: 0,
            ..*flow
        };
        flow_hash(&addresses, seed)
    } else {
        flow_hash(flow, seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values of MurmurHash3_x86_32 (from the algorithm's published test vectors:
    /// empty input with seeds 0 and 1, and the 4-byte input 0x00000000... with seed 0).
    #[test]
    fn matches_reference_vectors() {
        assert_eq!(hash_words::<0>(&[], 0), 0);
        assert_eq!(hash_words::<0>(&[], 1), 0x514e_28b7);
        assert_eq!(hash_words(&[0], 0), 0x2362_f9de);
        // "abcd" as a little-endian word, seed 0x9747b28c.
        assert_eq!(
            hash_words(&[u32::from_le_bytes(*b"abcd")], 0x9747_b28c),
            0xf047_8627
        );
    }

    #[test]
    fn seed_and_every_field_change_the_hash() {
        let mut flow = FlowKey {
            family: FAMILY_IPV4,
            proto: 6,
            src_port: 1234u16.to_be(),
            dst_port: 80u16.to_be(),
            ..FlowKey::default()
        };
        flow.src[..4].copy_from_slice(&[10, 0, 0, 1]);
        flow.dst[..4].copy_from_slice(&[10, 0, 0, 100]);
        let base = flow_hash(&flow, 7);
        assert_ne!(base, flow_hash(&flow, 8));
        let variants: [fn(&mut FlowKey); 5] = [
            |f| f.src[3] = 2,
            |f| f.dst[3] = 101,
            |f| f.src_port = 1235u16.to_be(),
            |f| f.dst_port = 81u16.to_be(),
            |f| f.proto = 17,
        ];
        for change in variants {
            let mut other = flow;
            change(&mut other);
            assert_ne!(base, flow_hash(&other, 7), "{other:?}");
        }
    }

    #[test]
    fn dst_port_only_ignores_the_source() {
        let vip = VipMeta {
            flags: crate::VIP_F_HASH_DST_PORT_ONLY,
            ..VipMeta::default()
        };
        let mut a = FlowKey {
            family: FAMILY_IPV4,
            proto: 17,
            src_port: 1111u16.to_be(),
            dst_port: 443u16.to_be(),
            ..FlowKey::default()
        };
        a.src[..4].copy_from_slice(&[192, 0, 2, 7]);
        let b = FlowKey {
            src: [9; 16],
            src_port: 2222u16.to_be(),
            ..a
        };
        assert_eq!(vip_flow_hash(&vip, &a, 3), vip_flow_hash(&vip, &b, 3));
        let five_tuple = VipMeta::default();
        assert_eq!(vip_flow_hash(&five_tuple, &a, 3), flow_hash(&a, 3));
        assert_ne!(
            vip_flow_hash(&five_tuple, &a, 3),
            vip_flow_hash(&five_tuple, &b, 3)
        );
    }
}

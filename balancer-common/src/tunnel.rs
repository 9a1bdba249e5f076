//! The outer header of a tunnelled packet as far as it depends on the flow: the source address
//! (a configured prefix whose host bits come from the flow's hash, so that receivers spreading
//! load by the outer header (RSS) see many sources) and the IPv6 flow label. Shared by the
//! program and by every prediction of its output.

/// `base` with its last `bits` bits (at most 32) replaced by the low bits of `hash`.
#[inline(always)]
pub const fn varied(base: u32, bits: u8, hash: u32) -> u32 {
    let mask = match bits {
        0 => 0,
        b if b >= 32 => u32::MAX,
        b => (1u32 << b) - 1,
    };
    (base & !mask) | (hash & mask)
}

/// The outer IPv4 source: `base` (network byte order bytes) varied by the flow's hash.
#[inline(always)]
pub fn source_v4(base: [u8; 4], bits: u8, hash: u32) -> [u8; 4] {
    varied(u32::from_be_bytes(base), bits, hash).to_be_bytes()
}

/// The outer IPv6 source: `base` with its last 32 bits varied by the flow's hash.
#[inline(always)]
pub fn source_v6(base: [u8; 16], bits: u8, hash: u32) -> [u8; 16] {
    let mut src = base;
    let low = u32::from_be_bytes([src[12], src[13], src[14], src[15]]);
    let low = varied(low, bits, hash).to_be_bytes();
    src[12] = low[0];
    src[13] = low[1];
    src[14] = low[2];
    src[15] = low[3];
    src
}

/// The IPv6 outer header's flow label: the low 20 bits of the flow's hash.
#[inline(always)]
pub const fn flow_label(hash: u32) -> u32 {
    hash & 0x000F_FFFF
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bits_come_from_the_hash() {
        assert_eq!(source_v4([172, 16, 0, 0], 0, 0xdead_beef), [172, 16, 0, 0]);
        assert_eq!(
            source_v4([172, 16, 9, 9], 16, 0x1234_5678),
            [172, 16, 0x56, 0x78]
        );
        assert_eq!(
            source_v4([172, 16, 9, 9], 32, 0x1234_5678),
            [0x12, 0x34, 0x56, 0x78]
        );
        assert_eq!(varied(0xffff_ffff, 40, 7), 7, "more than 32 bits is all 32");
        let mut base = [0xfd; 16];
        base[15] = 0;
        let v6 = source_v6(base, 8, 0xabcd);
        assert_eq!(&v6[..15], &base[..15]);
        assert_eq!(v6[15], 0xcd);
        assert_eq!(flow_label(0xfff1_2345), 0x1_2345);
    }
}

//! Internet checksums (RFC 1071) and their incremental update (RFC 1624), shared by the
//! packet path and its host tests.
//!
//! Words are taken in memory order (`u16::from_ne_bytes` of two packet bytes) and the result
//! is stored the same way: the one's complement sum does not depend on byte order as long as
//! reading and writing agree.

/// Adds a 16-bit word to a running sum.
#[inline(always)]
pub const fn add(sum: u32, word: u16) -> u32 {
    sum + word as u32
}

/// Adds the words of `bytes` (an even number of them) to a running sum.
#[inline(always)]
pub fn add_bytes(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum = add(sum, u16::from_ne_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    if i < bytes.len() {
        sum = add(sum, u16::from_ne_bytes([bytes[i], 0]));
    }
    sum
}

/// Folds a running sum into the checksum field's value (complemented).
#[inline(always)]
pub const fn finish(mut sum: u32) -> u16 {
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
}

/// The checksum field after one 16-bit word of the covered data changed from `old` to `new`
/// (RFC 1624, equation 3: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub const fn replace(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check) as u32 + (!old) as u32 + new as u32;
    finish(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to ddf2 (checksum
    /// 220d), byte order aside.
    #[test]
    fn rfc1071_example() {
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        let check = finish(add_bytes(0, &bytes));
        assert_eq!(check.to_ne_bytes(), [0x22, 0x0d]);
    }

    /// A real IPv4 header (from a capture) and its checksum 0xb861.
    #[test]
    fn ipv4_header_checksum() {
        let mut header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        header[10] = 0;
        header[11] = 0;
        assert_eq!(finish(add_bytes(0, &header)).to_ne_bytes(), [0xb8, 0x61]);
    }

    #[test]
    fn incremental_update_matches_recomputation() {
        let mut data = [
            0x45u8, 0x00, 0x00, 0x54, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0, 0, 10, 0, 0, 1, 10, 0,
            0, 2,
        ];
        let check = finish(add_bytes(0, &data));
        // TTL 64 -> 63 (the word holding TTL and protocol).
        let old = u16::from_ne_bytes([data[8], data[9]]);
        data[8] = 63;
        let new = u16::from_ne_bytes([data[8], data[9]]);
        assert_eq!(replace(check, old, new), finish(add_bytes(0, &data)));
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(add_bytes(0, &[1, 2, 3]), add_bytes(0, &[1, 2, 3, 0]));
    }
}

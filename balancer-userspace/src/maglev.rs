//! Weighted Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016, section 3.4).
//!
//! Each backend gets a permutation of the table's slots from two hashes of its address
//! (`offset` and `skip`; the table size is prime, so every `skip` visits every slot). Backends
//! then take turns claiming their next free preferred slot until the table is full. Weights
//! decide how often a backend gets a turn: every round each backend earns its weight in
//! credit, and claims a slot whenever its credit reaches the largest weight. The result:
//! - each backend owns a share of slots proportional to its weight (within a slot or so);
//! - removing a backend moves little more than its own slots;
//! - the table depends only on the backends' addresses and weights and the seed, not on the
//!   order of the config, so balancers configured alike choose alike.

use std::net::IpAddr;

use balancer_common::hash::hash_words;

/// A backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    pub address: IpAddr,
    /// 0: no slots.
    pub weight: u32,
}

/// Slot -> index into the `backends` slice given to [`build`]; `None` only when no backend
/// has a weight above 0.
pub type MaglevTable = Vec<Option<u32>>;

/// Builds a table of `size` slots (`size` must be prime).
pub fn build(backends: &[MaglevBackend], size: u32, seed: u32) -> MaglevTable {
    assert!(
        crate::config::validate::is_prime(size),
        "Maglev table size {size} is not prime"
    );
    let m = size as u64;
    let mut table: MaglevTable = vec![None; size as usize];

    // Fill in address order: the config's order must not matter.
    let mut order: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].weight > 0)
        .collect();
    if order.is_empty() {
        return table;
    }
    order.sort_by_key(|&i| backends[i].address);

    struct Turn {
        index: u32,
        weight: u64,
        credit: u64,
        position: u64,
        skip: u64,
    }
    let mut turns: Vec<Turn> = order
        .iter()
        .map(|&i| {
            let words = address_words(backends[i].address);
            let offset = hash_words(&words, seed) as u64 % m;
            let skip = if m > 1 {
                hash_words(&words, seed ^ 0x9e37_79b9) as u64 % (m - 1) + 1
            } else {
                1
            };
            Turn {
                index: i as u32,
                weight: backends[i].weight as u64,
                credit: 0,
                position: offset,
                skip,
            }
        })
        .collect();
    let max_weight = turns.iter().map(|t| t.weight).max().unwrap_or(1);

    let mut filled = 0u64;
    while filled < m {
        for turn in turns.iter_mut() {
            turn.credit += turn.weight;
            if turn.credit < max_weight {
                continue;
            }
            turn.credit -= max_weight;
            // Walk this backend's permutation to its next free slot. Terminates: the table is
            // not full, and the permutation visits every slot.
            loop {
                let slot = turn.position as usize;
                turn.position += turn.skip;
                if turn.position >= m {
                    turn.position -= m;
                }
                if table[slot].is_none() {
                    table[slot] = Some(turn.index);
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table
}

/// The backend's address as hash input: IPv4 in the first word, like the packet path's keys.
fn address_words(address: IpAddr) -> [u32; 4] {
    let mut bytes = [0u8; 16];
    match address {
        IpAddr::V4(a) => bytes[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => bytes = a.octets(),
    }
    std::array::from_fn(|i| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap()))
}

/// A stable fingerprint of what a table means: the backend address of every slot (`None`:
/// an empty slot), FNV-1a over 64-bit words. Balancers that send every flow to the same
/// backend have the same fingerprint, whatever ids their backends have (ids follow the order
/// of the file and the history of reloads), so a fleet can check that its members agree.
/// Byte by byte (FNV-1a's mixing carries a difference only upwards within the word it is
/// multiplied in: whole words would leave tables that differ alike in their low bits);
/// computed once per table built (and kept with it), never per snapshot.
pub fn fingerprint(slots: impl IntoIterator<Item = Option<IpAddr>>) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for slot in slots {
        let bytes = match slot {
            Some(IpAddr::V4(a)) => a.to_ipv6_mapped().octets(),
            Some(IpAddr::V6(a)) => a.octets(),
            None => [0xff; 16],
        };
        for b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(PRIME);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const M: u32 = 65_537;

    fn backends(n: u32, weight: impl Fn(u32) -> u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                address: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i + 1)),
                weight: weight(i),
            })
            .collect()
    }

    fn counts(table: &MaglevTable, n: usize) -> Vec<u64> {
        let mut counts = vec![0u64; n];
        for slot in table {
            counts[slot.expect("full table") as usize] += 1;
        }
        counts
    }

    /// Largest |share of slots - share of weight|, in percentage points of the table, and
    /// the largest deviation from the ideal in slots.
    fn balance(backends: &[MaglevBackend], table: &MaglevTable) -> (f64, f64) {
        let total_weight: u64 = backends.iter().map(|b| b.weight as u64).sum();
        let counts = counts(table, backends.len());
        let mut worst_points = 0f64;
        let mut worst_slots = 0f64;
        for (b, &count) in backends.iter().zip(&counts) {
            let ideal = M as f64 * b.weight as f64 / total_weight as f64;
            worst_slots = worst_slots.max((count as f64 - ideal).abs());
            worst_points = worst_points.max((count as f64 - ideal).abs() / M as f64 * 100.0);
        }
        (worst_points, worst_slots)
    }

    #[test]
    fn equal_weights_balance_for_10_100_1000_backends() {
        for n in [10, 100, 1000] {
            let backends = backends(n, |_| 1);
            let table = build(&backends, M, 0x5eed);
            let (points, slots) = balance(&backends, &table);
            println!(
                "equal weights, N={n}: worst deviation {points:.4}% of the table, {slots:.1} slots"
            );
            // The requirement: every backend's share within 1% of its weight share.
            assert!(points < 1.0, "N={n}: {points}%");
            // What the algorithm actually gives with equal weights: every backend claims one
            // slot per round, so counts differ by at most one slot from each other.
            assert!(slots <= 1.0, "N={n}: {slots} slots");
        }
    }

    #[test]
    fn weights_are_honoured() {
        for n in [10, 100, 1000] {
            // Weights 1, 2, 3 and 10 mixed.
            let backends = backends(n, |i| [1, 2, 3, 10][(i % 4) as usize]);
            let table = build(&backends, M, 7);
            let (points, slots) = balance(&backends, &table);
            println!(
                "mixed weights, N={n}: worst deviation {points:.4}% of the table, {slots:.1} slots"
            );
            assert!(points < 1.0, "N={n}: {points}%");
            // Credit carries over between rounds, so a backend is never more than one turn
            // (one slot) ahead of or behind its weight, plus the final partial round.
            assert!(slots <= 2.0, "N={n}: {slots} slots");
            // Heavier backends own more slots than every lighter one.
            let counts = counts(&table, backends.len());
            let min_of = |w: u32| {
                backends
                    .iter()
                    .zip(&counts)
                    .filter(|(b, _)| b.weight == w)
                    .map(|(_, c)| *c)
                    .min()
            };
            let max_of = |w: u32| {
                backends
                    .iter()
                    .zip(&counts)
                    .filter(|(b, _)| b.weight == w)
                    .map(|(_, c)| *c)
                    .max()
            };
            assert!(max_of(1) < min_of(2) && max_of(2) < min_of(3) && max_of(3) < min_of(10));
        }
    }

    #[test]
    fn zero_weight_gets_no_slots_and_no_backends_gives_an_empty_table() {
        let mut b = backends(3, |_| 5);
        b[1].weight = 0;
        let table = build(&b, 251, 0);
        assert!(table.iter().all(|s| matches!(s, Some(0) | Some(2))));
        let empty = build(&backends(3, |_| 0), 251, 0);
        assert!(empty.iter().all(Option::is_none));
        assert!(build(&[], 251, 0).iter().all(Option::is_none));
    }

    /// Removing one backend of N: ideally exactly its 1/N of the slots move. Maglev trades
    /// some extra movement for its balance: the removed backend's slots are claimed by
    /// survivors earlier in the fill than those survivors would otherwise have claimed
    /// anything, which displaces their later choices, and the displacement cascades through
    /// the remaining rounds. The cascade is longest when a backend owns few slots (M/N = 65
    /// at N = 1000). Measured here (seed 11, one backend from the middle of the address
    /// order): 1.03x the ideal at N = 10, 1.55x at N = 100, 7.35x at N = 1000 (0.74% of the
    /// table). The bounds below leave about 30% headroom over those figures; at N = 1000 it
    /// means at most 1% of the slots move. Only new flows follow the table: flows already in
    /// the connection table stay on their backend whatever moves.
    #[test]
    fn disruption_when_one_backend_is_removed() {
        for (n, bound) in [(10u32, 1.35), (100, 2.0), (1000, 10.0)] {
            let all = backends(n, |_| 1);
            let before = build(&all, M, 11);
            let removed = n / 2;
            let survivors: Vec<MaglevBackend> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i as u32 != removed)
                .map(|(_, b)| *b)
                .collect();
            let after = build(&survivors, M, 11);
            // Map the survivors' indices back to the original ones.
            let original = |i: u32| if i >= removed { i + 1 } else { i };
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| b.unwrap() != original(a.unwrap()))
                .count() as f64;
            let moved_fraction = moved / M as f64;
            let ideal = 1.0 / n as f64;
            println!(
                "N={n}: removing one backend moved {:.3}% of the slots (ideal {:.3}%, ratio {:.2})",
                moved_fraction * 100.0,
                ideal * 100.0,
                moved_fraction / ideal
            );
            assert!(
                moved_fraction >= ideal * 0.95,
                "the removed backend's slots must move"
            );
            assert!(
                moved_fraction <= bound * ideal,
                "N={n}: moved {moved_fraction}, ideal {ideal}, bound {bound}x"
            );
        }
    }

    #[test]
    fn deterministic_and_independent_of_config_order() {
        let b = backends(50, |i| 1 + i % 3);
        let t1 = build(&b, M, 99);
        let t2 = build(&b, M, 99);
        assert_eq!(t1, t2);
        // Reversed input: the same backend (by address) owns the same slots.
        let reversed: Vec<MaglevBackend> = b.iter().rev().copied().collect();
        let t3 = build(&reversed, M, 99);
        let by_address = |t: &MaglevTable, list: &[MaglevBackend]| -> Vec<IpAddr> {
            t.iter()
                .map(|s| list[s.unwrap() as usize].address)
                .collect()
        };
        assert_eq!(by_address(&t1, &b), by_address(&t3, &reversed));
        // Another seed gives another table.
        assert_ne!(t1, build(&b, M, 100));
    }

    #[test]
    fn fingerprint_tells_tables_apart() {
        let a = |last: u8| Some(IpAddr::from([10, 0, 0, last]));
        assert_eq!(
            fingerprint([a(1), a(2), None]),
            fingerprint([a(1), a(2), None])
        );
        assert_ne!(
            fingerprint([a(1), a(2), None]),
            fingerprint([a(2), a(1), None])
        );
        assert_ne!(
            fingerprint([a(1), a(2), None]),
            fingerprint([a(1), a(2), a(3)])
        );
        // An IPv4 address is not its IPv6-mapped twin's neighbour by accident: the same.
        let mapped = Some(IpAddr::from(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped()));
        assert_eq!(fingerprint([a(1)]), fingerprint([mapped]));
        // One slot of 65,537 differing shows in the low bits too (a hash that only carried
        // differences upwards would leave them alike).
        let table: Vec<Option<IpAddr>> = (0..65_537u32).map(|i| a((i % 4) as u8 + 1)).collect();
        let mut other = table.clone();
        other[30_000] = a(9);
        let (x, y) = (fingerprint(table), fingerprint(other));
        assert_ne!(x & 0xffff_ffff, y & 0xffff_ffff);
    }
}

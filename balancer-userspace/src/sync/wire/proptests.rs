//! Property tests of the sync's wire format, whose messages come from the network: generated
//! messages of every kind and family round trip; any change to an authentic message (a bit,
//! its length, the key) is refused before a field is read; an authentic message with one
//! fault is refused for that fault; the replay guard takes each message once, in any order
//! within its window. (`tests::decode_never_panics_and_takes_only_canonical_messages` feeds
//! random and mutated bytes to `decode`; these complement it.)

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ring::hmac;

use super::{
    decode, encode, pack, Encoder, Entry, Family, Header, Key, Kind, Message, Protocol, Reject,
    ReplayGuard, HEADER_LEN, MAX_MESSAGE, MAX_SENDERS, MAX_SKEW, REPLAY_WINDOW, TAG_LEN,
};
use crate::{
    property::{assert_covered, cases, pick},
    sync::REJECT_REASONS,
};

type Rng = fastrand::Rng;

/// Unix ns, a moment in 2023.
const NOW: u64 = 1_700_000_000_000_000_000;

fn gen_key(rng: &mut Rng) -> (Key, Vec<u8>) {
    let len = rng.usize(32..=80);
    let bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
    (Key::new(&bytes).unwrap(), bytes)
}

fn gen_header(rng: &mut Rng, kind: Kind) -> Header {
    let mut field = || match rng.u8(..4) {
        0 => 0,
        1 => u64::MAX,
        _ => rng.u64(..),
    };
    Header {
        kind,
        sender: field(),
        epoch: field(),
        seq: field(),
        sent_ns: field(),
    }
}

fn gen_entry(rng: &mut Rng, family: Family) -> Entry {
    let mut address = |v6: bool| -> IpAddr {
        if v6 {
            Ipv6Addr::from(rng.u128(..)).into()
        } else {
            Ipv4Addr::from(rng.u32(..)).into()
        }
    };
    let (flow_v6, backend_v6) = (family.flow_is_v6(), family.backend_is_v6());
    let (src, vip, backend) = (address(flow_v6), address(flow_v6), address(backend_v6));
    Entry {
        proto: *pick(rng, &[Protocol::Tcp, Protocol::Udp]),
        src,
        src_port: rng.u16(..),
        vip,
        vip_port: rng.u16(..),
        backend,
    }
}

/// Entries of random families, as many as `want` or as fit in one message.
fn gen_entries(rng: &mut Rng, want: usize) -> Vec<Entry> {
    let mut encoder = Encoder::new();
    let mut entries = Vec::new();
    // Often one family, sometimes a mix.
    let one = *pick(rng, &Family::ALL);
    let mixed = rng.bool();
    for _ in 0..want {
        let family = if mixed { *pick(rng, &Family::ALL) } else { one };
        let entry = gen_entry(rng, family);
        if !encoder.push(&entry).unwrap() {
            break;
        }
        entries.push(entry);
    }
    entries
}

/// A valid message: its header, its entries and its bytes.
fn gen_message(rng: &mut Rng, key: &Key) -> (Message, Vec<u8>) {
    let kind = *pick(rng, &Kind::ALL);
    let header = gen_header(rng, kind);
    let entries = if kind.carries_entries() {
        let any = rng.usize(..80);
        let want = *pick(rng, &[0, 1, 2, any]);
        gen_entries(rng, want)
    } else {
        Vec::new()
    };
    let bytes = encode(key, &header, &entries).unwrap();
    (Message { header, entries }, bytes)
}

/// Messages of every kind and family, with any header, decode to what was encoded.
#[test]
fn generated_messages_round_trip() {
    for mut case in cases("generated_messages_round_trip", 512) {
        let rng = &mut case.rng;
        let (key, _) = gen_key(rng);
        let (message, bytes) = gen_message(rng, &key);
        let body: usize = message
            .entries
            .iter()
            .map(|e| e.family().unwrap().entry_len())
            .sum();
        assert_eq!(bytes.len(), HEADER_LEN + body + TAG_LEN);
        assert!(bytes.len() <= MAX_MESSAGE);
        assert_eq!(decode(&key, &bytes), Ok(message));
    }
}

/// Any list of entries packs into as few messages as hold it, each within the limit, each
/// under the next header, and they decode to the list.
#[test]
fn packed_entries_come_back_in_order() {
    for mut case in cases("packed_entries_come_back_in_order", 128) {
        let rng = &mut case.rng;
        let (key, _) = gen_key(rng);
        let entries: Vec<Entry> = (0..rng.usize(..300))
            .map(|_| {
                let family = *pick(rng, &Family::ALL);
                gen_entry(rng, family)
            })
            .collect();
        let first_seq = rng.u64(..u64::MAX / 2);
        let mut seq = first_seq;
        let kind = *pick(rng, &[Kind::Entries, Kind::Bulk]);
        let template = gen_header(rng, kind);
        let messages = pack(&key, &entries, || {
            seq += 1;
            Header { seq, ..template }
        })
        .unwrap();
        let decoded: Vec<Message> = messages.iter().map(|m| decode(&key, m).unwrap()).collect();
        for (i, (bytes, message)) in messages.iter().zip(&decoded).enumerate() {
            assert!(bytes.len() <= MAX_MESSAGE);
            assert_eq!(
                message.header,
                Header {
                    seq: first_seq + 1 + i as u64,
                    ..template
                }
            );
            if let Some(next) = decoded.get(i + 1) {
                let first = next.entries[0].family().unwrap().entry_len();
                assert!(
                    bytes.len() + first > MAX_MESSAGE,
                    "room left in message {i}"
                );
            }
        }
        let all: Vec<Entry> = decoded.into_iter().flat_map(|m| m.entries).collect();
        assert_eq!(all, entries);
    }
}

/// A bit flipped anywhere, the message cut or lengthened, or another key: refused, as
/// unauthenticated unless the length alone gives it away; and counted under a label the
/// metrics show.
#[test]
fn any_change_to_an_authentic_message_is_refused() {
    let mut reasons = std::collections::BTreeSet::new();
    for mut case in cases("any_change_to_an_authentic_message_is_refused", 256) {
        let rng = &mut case.rng;
        let (key, key_bytes) = gen_key(rng);
        let (_, bytes) = gen_message(rng, &key);
        for _ in 0..8 {
            let bit = rng.usize(..bytes.len() * 8);
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let got = decode(&key, &flipped);
            assert_eq!(got, Err(Reject::Unauthenticated), "bit {bit}");
        }
        let cut = rng.usize(..bytes.len());
        let expected = if cut < HEADER_LEN + TAG_LEN {
            Reject::Truncated
        } else {
            Reject::Unauthenticated
        };
        assert_eq!(decode(&key, &bytes[..cut]), Err(expected), "cut to {cut}");
        reasons.insert(expected.reason());
        let mut longer = bytes.clone();
        longer.extend((0..rng.usize(1..=MAX_MESSAGE)).map(|_| rng.u8(..)));
        let expected = if longer.len() > MAX_MESSAGE {
            Reject::Oversized
        } else {
            Reject::Unauthenticated
        };
        assert_eq!(
            decode(&key, &longer),
            Err(expected),
            "{} bytes",
            longer.len()
        );
        reasons.insert(expected.reason());
        let mut other = key_bytes.clone();
        let at = rng.usize(..other.len());
        other[at] ^= 1 << rng.u32(..8);
        let other = Key::new(&other).unwrap();
        assert_eq!(decode(&other, &bytes), Err(Reject::Unauthenticated));
    }
    assert_covered(
        reasons.len() == 3,
        "truncated, oversized and unauthenticated messages",
    );
    assert!(
        reasons.iter().all(|r| REJECT_REASONS.contains(r)),
        "{reasons:?}"
    );
}

/// The tag recomputed, as a holder of the key who wrote these bytes would.
fn resign(key: &Key, signed: &[u8]) -> Vec<u8> {
    let mut message = signed.to_vec();
    message.extend_from_slice(hmac::sign(&key.0, signed).as_ref());
    message
}

/// A value of a byte other than `valid` ones.
fn other_byte(rng: &mut Rng, valid: &[u8]) -> u8 {
    loop {
        let b = rng.u8(..);
        if !valid.contains(&b) {
            return b;
        }
    }
}

/// One fault laid into the signed bytes of a message of `count` entries (starting at
/// `offsets`), and the reason `decode` must give; `None` when the message has no room for
/// this fault.
fn fault(rng: &mut Rng, signed: &mut Vec<u8>, offsets: &[usize]) -> Option<&'static str> {
    let count = offsets.len();
    let entry = (count > 0).then(|| offsets[rng.usize(..count)]);
    let set_count = |signed: &mut Vec<u8>, n: u16| signed[6..8].copy_from_slice(&n.to_be_bytes());
    Some(match rng.u8(..11) {
        0 => {
            let at = rng.usize(..3);
            signed[at] = other_byte(rng, &[b"LBS"[at]]);
            "not a sync message (magic)"
        }
        1 => {
            signed[3] = other_byte(rng, &[super::VERSION]);
            "unknown version"
        }
        2 => {
            signed[4] = other_byte(rng, &[1, 2, 3, 4]);
            "unknown kind"
        }
        3 => {
            signed[5] = other_byte(rng, &[0]);
            "unknown flags"
        }
        4 if count > 0 => {
            signed[4] = *pick(rng, &[Kind::BulkRequest.byte(), Kind::BulkEnd.byte()]);
            "entries in a kind of message without entries"
        }
        5 if count > 0 => {
            signed[entry?] = other_byte(rng, &Family::ALL.map(Family::byte));
            "unknown address family"
        }
        6 if count > 0 => {
            signed[entry? + 1] = other_byte(rng, &[6, 17]);
            "a protocol other than TCP and UDP"
        }
        7 if signed[4] == 1 || signed[4] == 3 => {
            let more = rng.u16(1..=u16::MAX - count as u16);
            set_count(signed, count as u16 + more);
            "an entry runs past the end"
        }
        8 if count > 0 => {
            set_count(signed, rng.u16(..count as u16));
            "bytes after the last entry"
        }
        9 if signed.len() + TAG_LEN < MAX_MESSAGE => {
            let room = MAX_MESSAGE - TAG_LEN - signed.len();
            signed.extend((0..rng.usize(1..=room.min(60))).map(|_| rng.u8(..)));
            "bytes after the last entry"
        }
        10 if count > 0 => {
            let last = signed.len() - offsets[count - 1];
            signed.truncate(signed.len() - rng.usize(1..last));
            "an entry runs past the end"
        }
        _ => return None,
    })
}

/// An authentic message with one thing wrong in it is refused, for that thing.
#[test]
fn an_authentic_message_with_one_fault_is_refused_for_it() {
    let mut seen = BTreeSet::new();
    for mut case in cases("an_authentic_message_with_one_fault_is_refused_for_it", 512) {
        let rng = &mut case.rng;
        let (key, _) = gen_key(rng);
        let (message, bytes) = gen_message(rng, &key);
        let mut signed = bytes[..bytes.len() - TAG_LEN].to_vec();
        let mut offsets = Vec::new();
        let mut at = HEADER_LEN;
        for e in &message.entries {
            offsets.push(at);
            at += e.family().unwrap().entry_len();
        }
        let Some(why) = fault(rng, &mut signed, &offsets) else {
            continue;
        };
        let got = decode(&key, &resign(&key, &signed));
        assert_eq!(got, Err(Reject::Malformed(why)), "{message:?}");
        // Counted under a label the metrics show.
        assert_eq!(got.unwrap_err().reason(), "malformed");
        seen.insert(why);
    }
    assert_covered(seen.len() == 9, "every fault");
    assert!(REJECT_REASONS.contains(&"malformed"));
}

// ---------------------------------------------------------------------------------------------
// The replay guard.

fn header_of(sender: u64, epoch: u64, seq: u64, sent_ns: u64) -> Header {
    Header {
        kind: Kind::Entries,
        sender,
        epoch,
        seq,
        sent_ns,
    }
}

/// Up to a window of a sender's messages, in any order and with duplicates among them: each
/// is taken once; the duplicates, an older epoch's, the ones outside the window and the stale
/// ones are refused, and a refusal changes nothing.
#[test]
fn the_replay_guard_takes_each_message_once_in_any_order() {
    for mut case in cases("the_replay_guard_takes_each_message_once_in_any_order", 256) {
        let rng = &mut case.rng;
        let mut guard = ReplayGuard::new();
        let (sender, epoch) = (rng.u64(..), rng.u64(1..));
        let first = rng.u64(1..u64::MAX - 2 * REPLAY_WINDOW);
        let n = rng.u64(1..=REPLAY_WINDOW);
        let mut order: Vec<u64> = (first..first + n).collect();
        rng.shuffle(&mut order);
        let skew = MAX_SKEW.as_nanos() as u64;
        let mut taken = BTreeSet::new();
        let check = |guard: &mut ReplayGuard, header: Header| {
            let before = guard.senders();
            let got = guard.check(&header, NOW);
            if got.is_err() {
                assert_eq!(guard.senders(), before, "a refusal changes nothing");
            }
            got
        };
        for &seq in &order {
            let sent = NOW - skew + rng.u64(..=2 * skew);
            assert_eq!(
                check(&mut guard, header_of(sender, epoch, seq, sent)),
                Ok(()),
                "{seq}"
            );
            taken.insert(seq);
            let again = *pick(rng, &taken.iter().copied().collect::<Vec<_>>());
            let got = check(&mut guard, header_of(sender, epoch, again, NOW));
            assert_eq!(got, Err(Reject::Replayed("a duplicate")));
            let behind = NOW - skew - 1 - rng.u64(..skew);
            let stale = *pick(rng, &[behind, NOW + skew + 1]);
            let got = check(&mut guard, header_of(sender, epoch, seq + n, stale));
            assert_eq!(got.map_err(|e| e.reason()), Err("stale"));
            let got = check(&mut guard, header_of(sender, epoch - 1, rng.u64(..), NOW));
            assert_eq!(
                got,
                Err(Reject::Replayed("from an earlier epoch of the sender"))
            );
        }
        let highest = first + n - 1;
        let old = highest - REPLAY_WINDOW - rng.u64(..REPLAY_WINDOW);
        let got = check(&mut guard, header_of(sender, epoch, old, NOW));
        assert_eq!(got, Err(Reject::Replayed("older than the window")));
        assert_eq!(guard.senders()[0].last_seq, highest);
    }
}

/// Random traffic of many senders, restarts among them: the guard remembers at most
/// `MAX_SENDERS`, and never takes a (sender, epoch, seq) twice while it remembers the sender.
#[test]
fn the_replay_guard_never_takes_a_message_twice() {
    for mut case in cases("the_replay_guard_never_takes_a_message_twice", 64) {
        let rng = &mut case.rng;
        let mut guard = ReplayGuard::new();
        let senders = rng.u64(1..=MAX_SENDERS as u64 + 16);
        let mut taken: BTreeMap<u64, BTreeSet<(u64, u64)>> = BTreeMap::new();
        for step in 0..1_000u64 {
            let sender = rng.u64(..senders);
            let epoch = rng.u64(..3);
            let seq = rng.u64(..200);
            let now = NOW + step * 1_000_000;
            let got = guard.check(&header_of(sender, epoch, seq, now), now);
            if got.is_ok() && !taken.contains_key(&sender) {
                // A sender new to the guard: it may have evicted another.
                let remembered: BTreeSet<u64> = guard.senders().iter().map(|s| s.sender).collect();
                assert!(remembered.len() <= MAX_SENDERS);
                taken.retain(|s, _| remembered.contains(s));
            }
            if got.is_ok() {
                let fresh = taken.entry(sender).or_default().insert((epoch, seq));
                assert!(fresh, "sender {sender} epoch {epoch} seq {seq} taken twice");
            }
        }
    }
}

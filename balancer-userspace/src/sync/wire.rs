//! The wire format of the connection-table sync between the balancers of a fleet, and the
//! checks a received message passes before it is believed.
//!
//! Why a sync: after an ECMP change a balancer receives flows that another one placed. The
//! balancers tell each other, over UDP, "flow F was placed on backend B", so that the next one
//! to see F sends it to the same backend instead of where its own table would.
//!
//! Pure: entries, the key and the time come in; bytes, messages or a [`Reject`] come out. The
//! daemon owns the socket and the clock.
//!
//! A message, every integer big-endian:
//!
//! | bytes   | field                                                                   |
//! |---------|-------------------------------------------------------------------------|
//! | 0..3    | magic `LBS`                                                             |
//! | 3       | version, [`VERSION`]                                                    |
//! | 4       | kind, [`Kind`]                                                          |
//! | 5       | flags, 0: a set bit is refused, so that a later use of one is not misread |
//! | 6..8    | count of entries                                                        |
//! | 8..16   | sender: a node id, random per balancer, fixed for a process             |
//! | 16..24  | epoch: the sender's process start, unix ns                              |
//! | 24..32  | seq: 1, 2, ... within the epoch, one per message of any kind            |
//! | 32..40  | sent: unix ns                                                           |
//! | 40..    | `count` entries                                                         |
//! | last 32 | HMAC-SHA256 of everything before it, with the fleet's [`Key`]           |
//!
//! An entry: family u8 ([`Family`]), protocol u8 (6 or 17), source port u16, VIP port u16,
//! then the source address, the VIP and the backend, 4 or 16 bytes each as the family says.
//!
//! A received message is believed in steps, each for a reason:
//! 1. its length ([`Reject::Truncated`], [`Reject::Oversized`]);
//! 2. its tag ([`Reject::Unauthenticated`]), before any field is read: a message that is not
//!    the fleet's costs one HMAC and nothing more, and the parser only ever reads bytes that a
//!    holder of the key wrote;
//! 3. its fields ([`Reject::Malformed`]): nothing unknown is guessed at;
//! 4. [`ReplayGuard::check`]: its sender's sequence and its timestamp ([`Reject::Replayed`],
//!    [`Reject::Stale`]), so that a captured message sent again is not believed twice.
//!
//! What an entry may change is not decided here: whether its VIP is one of the config's and
//! its backend one of that VIP's is checked where the config is known.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ring::hmac;

/// The first bytes of every message.
const MAGIC: [u8; 3] = *b"LBS";
/// The version of this format, after the magic. A receiver refuses any other.
pub const VERSION: u8 = 1;
/// Magic and version, kind, flags, count, sender, epoch, seq, sent.
pub const HEADER_LEN: usize = 4 + 1 + 1 + 2 + 4 * 8;
/// An HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// The longest message, header and tag included. A 1500-byte MTU less IPv6's 40 and UDP's 8
/// bytes leaves 1452: a message is never fragmented, over IPv4 or IPv6, with room to spare.
pub const MAX_MESSAGE: usize = 1400;
/// Room for entries in a message.
const MAX_BODY: usize = MAX_MESSAGE - HEADER_LEN - TAG_LEN;
/// The shortest key: as long as the HMAC's output, the strength it can give.
pub const MIN_KEY_LEN: usize = 32;
/// How far a message's sending time may be from the receiver's clock. It bounds how long a
/// captured message can be replayed to a receiver that forgot its sender's sequence (it
/// restarted, or evicted the sender), and asks the fleet's clocks to agree that well (NTP).
pub const MAX_SKEW: Duration = Duration::from_secs(10);
const MAX_SKEW_NS: u64 = MAX_SKEW.as_nanos() as u64;
/// How many messages before a sender's latest one may still arrive (UDP reorders, a little).
pub const REPLAY_WINDOW: u64 = u64::BITS as u64;
/// The senders a [`ReplayGuard`] remembers: more than a fleet has balancers.
pub const MAX_SENDERS: usize = 64;

/// What a message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Flows placed since the sender's last message: sent as they are decided.
    Entries,
    /// "Send me your whole table": from a balancer that starts with an empty one.
    BulkRequest,
    /// Part of a whole table, in answer to a BulkRequest.
    Bulk,
    /// The whole table has been sent.
    BulkEnd,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Entries, Kind::BulkRequest, Kind::Bulk, Kind::BulkEnd];

    pub fn byte(self) -> u8 {
        match self {
            Kind::Entries => 1,
            Kind::BulkRequest => 2,
            Kind::Bulk => 3,
            Kind::BulkEnd => 4,
        }
    }

    pub fn from_byte(byte: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.byte() == byte)
    }

    /// Requests and ends carry no entries (their count is 0).
    pub fn carries_entries(self) -> bool {
        matches!(self, Kind::Entries | Kind::Bulk)
    }

    /// For logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Entries => "entries",
            Kind::BulkRequest => "bulk_request",
            Kind::Bulk => "bulk",
            Kind::BulkEnd => "bulk_end",
        }
    }
}

/// The protocols the balancer places flows of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub fn from_number(number: u8) -> Option<Protocol> {
        [Protocol::Tcp, Protocol::Udp]
            .into_iter()
            .find(|p| p.number() == number)
    }
}

/// The address families of an entry: its flow's (source and VIP, always one family) and its
/// backend's, which differ for a tunnel VIP whose backends are reached over the other one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
    /// An IPv4 flow, an IPv6 backend.
    V4ViaV6,
    /// An IPv6 flow, an IPv4 backend.
    V6ViaV4,
}

impl Family {
    pub const ALL: [Family; 4] = [Family::V4, Family::V6, Family::V4ViaV6, Family::V6ViaV4];

    /// The family byte: 4, 6, or the flow's then the backend's digit.
    pub fn byte(self) -> u8 {
        match self {
            Family::V4 => 4,
            Family::V6 => 6,
            Family::V4ViaV6 => 46,
            Family::V6ViaV4 => 64,
        }
    }

    pub fn from_byte(byte: u8) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.byte() == byte)
    }

    /// The family of a flow of `flow`'s family placed on `backend`.
    pub fn of(flow: IpAddr, backend: IpAddr) -> Family {
        match (flow.is_ipv6(), backend.is_ipv6()) {
            (false, false) => Family::V4,
            (true, true) => Family::V6,
            (false, true) => Family::V4ViaV6,
            (true, false) => Family::V6ViaV4,
        }
    }

    const fn flow_is_v6(self) -> bool {
        matches!(self, Family::V6 | Family::V6ViaV4)
    }

    const fn backend_is_v6(self) -> bool {
        matches!(self, Family::V6 | Family::V4ViaV6)
    }

    /// Bytes of an entry: family, protocol, two ports, two flow addresses and a backend's.
    pub const fn entry_len(self) -> usize {
        const fn address_len(v6: bool) -> usize {
            if v6 {
                16
            } else {
                4
            }
        }
        1 + 1 + 2 + 2 + 2 * address_len(self.flow_is_v6()) + address_len(self.backend_is_v6())
    }
}

/// How many entries of one family a message holds: 73 of IPv4 (18 bytes each), 24 of IPv6
/// (54), 44 of IPv4 flows on IPv6 backends (30), 31 of the reverse (42). At least one of any
/// family, so an entry always fits an empty message.
pub const fn entries_per_message(family: Family) -> usize {
    MAX_BODY / family.entry_len()
}

/// The fleet's shared secret. Debug shows nothing of it.
#[derive(Clone)]
pub struct Key(hmac::Key);

impl Key {
    pub fn new(bytes: &[u8]) -> Result<Key, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort { given: bytes.len() });
        }
        Ok(Key(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the sync key has {given} bytes, fewer than the {MIN_KEY_LEN} it needs: give it \
         {MIN_KEY_LEN} random bytes or more (`head -c 32 /dev/urandom > sync.key` makes one)"
    )]
    TooShort { given: usize },
}

/// A flow and the backend it was placed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub proto: Protocol,
    pub src: IpAddr,
    pub src_port: u16,
    /// The VIP, the flow's destination.
    pub vip: IpAddr,
    pub vip_port: u16,
    pub backend: IpAddr,
}

impl Entry {
    /// The entry's family; an error when its source and VIP differ in family (no packet
    /// carries such a flow, so the entry is a caller's mistake).
    pub fn family(&self) -> Result<Family, EncodeError> {
        if self.src.is_ipv6() != self.vip.is_ipv6() {
            return Err(EncodeError::FamilyMismatch {
                src: self.src,
                vip: self.vip,
            });
        }
        Ok(Family::of(self.vip, self.backend))
    }
}

/// A message's header, less what the encoder derives (magic, version, flags, count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// The sender's node id.
    pub sender: u64,
    /// The sender's process start, unix ns: a restarted sender has a larger one.
    pub epoch: u64,
    /// 1, 2, ... within the epoch, one per message of any kind.
    pub seq: u64,
    /// When it was sent, unix ns.
    pub sent_ns: u64,
}

/// A decoded, authentic message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub header: Header,
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the flow from {src} to {vip} mixes address families")]
    FamilyMismatch { src: IpAddr, vip: IpAddr },
    #[error("a {} message carries no entries, {count} given", kind.name())]
    EntriesNotCarried { kind: Kind, count: usize },
    #[error("{count} entries do not fit in one message of {MAX_MESSAGE} bytes; pack them")]
    TooMany { count: usize },
}

/// The entries of one message, gathered until the next does not fit.
#[derive(Clone, Debug, Default)]
pub struct Encoder {
    body: Vec<u8>,
    count: u16,
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// Adds `entry` when it fits; `Ok(false)` when the message is full and the entry was not
    /// added: finish the message and push the entry again.
    pub fn push(&mut self, entry: &Entry) -> Result<bool, EncodeError> {
        let family = entry.family()?;
        if self.body.len() + family.entry_len() > MAX_BODY {
            return Ok(false);
        }
        write_entry(&mut self.body, family, entry);
        self.count += 1;
        Ok(true)
    }

    /// Entries gathered.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The message of the entries gathered, under `header`, signed. The encoder is empty
    /// afterwards, ready for the next message. Entries under a kind that carries none are an
    /// error (and stay gathered).
    pub fn finish(&mut self, key: &Key, header: &Header) -> Result<Vec<u8>, EncodeError> {
        if !self.is_empty() && !header.kind.carries_entries() {
            return Err(EncodeError::EntriesNotCarried {
                kind: header.kind,
                count: self.len(),
            });
        }
        let mut message = Vec::with_capacity(HEADER_LEN + self.body.len() + TAG_LEN);
        message.extend_from_slice(&MAGIC);
        message.extend_from_slice(&[VERSION, header.kind.byte(), 0]);
        message.extend_from_slice(&self.count.to_be_bytes());
        for field in [header.sender, header.epoch, header.seq, header.sent_ns] {
            message.extend_from_slice(&field.to_be_bytes());
        }
        message.append(&mut self.body);
        self.count = 0;
        let tag = hmac::sign(&key.0, &message);
        message.extend_from_slice(tag.as_ref());
        Ok(message)
    }
}

fn write_entry(out: &mut Vec<u8>, family: Family, entry: &Entry) {
    out.extend_from_slice(&[family.byte(), entry.proto.number()]);
    out.extend_from_slice(&entry.src_port.to_be_bytes());
    out.extend_from_slice(&entry.vip_port.to_be_bytes());
    for address in [entry.src, entry.vip, entry.backend] {
        match address {
            IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
            IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
        }
    }
}

/// One message of `entries` (none for a request or an end).
pub fn encode(key: &Key, header: &Header, entries: &[Entry]) -> Result<Vec<u8>, EncodeError> {
    let mut encoder = Encoder::new();
    for entry in entries {
        if !encoder.push(entry)? {
            return Err(EncodeError::TooMany {
                count: entries.len(),
            });
        }
    }
    encoder.finish(key, header)
}

/// `entries`, in order, in as few messages as they fit; each message's header is the next
/// `header()` (which hands out the seqs, so it is called once per message made). No entries,
/// no messages. An entry that mixes families is refused before any header is asked for.
pub fn pack(
    key: &Key,
    entries: &[Entry],
    mut header: impl FnMut() -> Header,
) -> Result<Vec<Vec<u8>>, EncodeError> {
    for entry in entries {
        entry.family()?;
    }
    let mut messages = Vec::new();
    let mut encoder = Encoder::new();
    for entry in entries {
        if !encoder.push(entry)? {
            messages.push(encoder.finish(key, &header())?);
            let added = encoder.push(entry)?;
            debug_assert!(added, "an entry of any family fits an empty message");
        }
    }
    if !encoder.is_empty() {
        messages.push(encoder.finish(key, &header())?);
    }
    Ok(messages)
}

/// Why a received message was not believed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("shorter than a header and a tag")]
    Truncated,
    #[error("longer than {MAX_MESSAGE} bytes")]
    Oversized,
    #[error("the tag does not match: another key, or altered on the way")]
    Unauthenticated,
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error("replayed: {0}")]
    Replayed(&'static str),
    #[error(
        "sent {}, more than {} s off: the clocks disagree, or the message is replayed",
        skew(*sent_ns, *now_ns),
        MAX_SKEW.as_secs()
    )]
    Stale { sent_ns: u64, now_ns: u64 },
}

/// "2.5 s ahead of this host's clock", "12.0 s behind this host's clock".
fn skew(sent_ns: u64, now_ns: u64) -> String {
    let secs = sent_ns.abs_diff(now_ns) as f64 / 1e9;
    let side = if sent_ns > now_ns {
        "ahead of"
    } else {
        "behind"
    };
    format!("{secs:.1} s {side} this host's clock")
}

impl Reject {
    /// Every [`Reject::reason`], for metrics to show at 0 from the start.
    pub const REASONS: [&'static str; 6] = [
        "truncated",
        "oversized",
        "unauthenticated",
        "malformed",
        "replayed",
        "stale",
    ];

    /// A stable metric label value.
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::Truncated => "truncated",
            Reject::Oversized => "oversized",
            Reject::Unauthenticated => "unauthenticated",
            Reject::Malformed(_) => "malformed",
            Reject::Replayed(_) => "replayed",
            Reject::Stale { .. } => "stale",
        }
    }
}

/// The message in `bytes`, if it is authentic and well formed. Whether it is new is
/// [`ReplayGuard::check`]'s to say.
pub fn decode(key: &Key, bytes: &[u8]) -> Result<Message, Reject> {
    if bytes.len() < HEADER_LEN + TAG_LEN {
        return Err(Reject::Truncated);
    }
    if bytes.len() > MAX_MESSAGE {
        return Err(Reject::Oversized);
    }
    let (signed, tag) = bytes.split_at(bytes.len() - TAG_LEN);
    // Constant-time: the time taken says nothing of how much of a forged tag was right.
    hmac::verify(&key.0, signed, tag).map_err(|_| Reject::Unauthenticated)?;
    let mut reader = Reader { rest: signed };
    let (header, count) = read_header(&mut reader)?;
    let entries = (0..count)
        .map(|_| read_entry(&mut reader))
        .collect::<Result<Vec<_>, _>>()?;
    if !reader.rest.is_empty() {
        return Err(Reject::Malformed("bytes after the last entry"));
    }
    Ok(Message { header, entries })
}

/// The bytes not read yet.
struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], Reject> {
        // The header always fits (the length was checked): only an entry can run out.
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(Reject::Malformed("an entry runs past the end"))?;
        self.rest = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, Reject> {
        Ok(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, Reject> {
        Ok(u16::from_be_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, Reject> {
        Ok(u64::from_be_bytes(self.take()?))
    }

    fn address(&mut self, v6: bool) -> Result<IpAddr, Reject> {
        Ok(if v6 {
            Ipv6Addr::from(self.take::<16>()?).into()
        } else {
            Ipv4Addr::from(self.take::<4>()?).into()
        })
    }
}

/// The header, and the count of entries that follow.
fn read_header(reader: &mut Reader) -> Result<(Header, u16), Reject> {
    if reader.take::<3>()? != MAGIC {
        return Err(Reject::Malformed("not a sync message (magic)"));
    }
    if reader.u8()? != VERSION {
        return Err(Reject::Malformed("unknown version"));
    }
    let kind = Kind::from_byte(reader.u8()?).ok_or(Reject::Malformed("unknown kind"))?;
    if reader.u8()? != 0 {
        return Err(Reject::Malformed("unknown flags"));
    }
    let count = reader.u16()?;
    if count > 0 && !kind.carries_entries() {
        return Err(Reject::Malformed(
            "entries in a kind of message without entries",
        ));
    }
    let sender = reader.u64()?;
    let epoch = reader.u64()?;
    let seq = reader.u64()?;
    let sent_ns = reader.u64()?;
    let header = Header {
        kind,
        sender,
        epoch,
        seq,
        sent_ns,
    };
    Ok((header, count))
}

fn read_entry(reader: &mut Reader) -> Result<Entry, Reject> {
    let family =
        Family::from_byte(reader.u8()?).ok_or(Reject::Malformed("unknown address family"))?;
    let proto = Protocol::from_number(reader.u8()?)
        .ok_or(Reject::Malformed("a protocol other than TCP and UDP"))?;
    let src_port = reader.u16()?;
    let vip_port = reader.u16()?;
    let src = reader.address(family.flow_is_v6())?;
    let vip = reader.address(family.flow_is_v6())?;
    let backend = reader.address(family.backend_is_v6())?;
    Ok(Entry {
        proto,
        src,
        src_port,
        vip,
        vip_port,
        backend,
    })
}

/// Which messages of each sender were taken, so that none is taken twice.
///
/// Per sender: its latest epoch, and in it the highest seq with a bitmap of the
/// [`REPLAY_WINDOW`] seqs up to it. A seq above the highest moves the window; one inside it is
/// taken once; one below it is refused (from a sender whose seqs are consecutive, that far
/// behind is a replay, not reordering). A newer epoch starts over; an older one is refused.
///
/// At most [`MAX_SENDERS`] senders are remembered; a new one beyond evicts the least recently
/// heard. That is safe to do: only authentic messages reach the guard, so only the fleet's
/// balancers make entries, and a fleet smaller than `MAX_SENDERS` loses only senders gone
/// quiet (a restarted balancer's old node id). An evicted sender's old messages could be taken
/// again, but only within [`MAX_SKEW`] of their sending, as after the receiver's restart.
#[derive(Clone, Debug, Default)]
pub struct ReplayGuard {
    senders: BTreeMap<u64, Window>,
}

/// One sender's sequence.
#[derive(Clone, Copy, Debug)]
struct Window {
    epoch: u64,
    highest: u64,
    /// Bit i: seq `highest - i` was taken.
    taken: u64,
    last_heard_ns: u64,
}

impl Window {
    fn new(header: &Header, now_ns: u64) -> Window {
        Window {
            epoch: header.epoch,
            highest: header.seq,
            taken: 1,
            last_heard_ns: now_ns,
        }
    }

    fn take(&mut self, seq: u64) -> Result<(), Reject> {
        if seq > self.highest {
            let ahead = seq - self.highest;
            // Not a shift by the window's width or more, which would overflow.
            self.taken = if ahead >= REPLAY_WINDOW {
                0
            } else {
                self.taken << ahead
            };
            self.taken |= 1;
            self.highest = seq;
            return Ok(());
        }
        let behind = self.highest - seq;
        if behind >= REPLAY_WINDOW {
            return Err(Reject::Replayed("older than the window"));
        }
        if self.taken & (1 << behind) != 0 {
            return Err(Reject::Replayed("a duplicate"));
        }
        self.taken |= 1 << behind;
        Ok(())
    }
}

/// What the guard knows of a sender, for the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenderStatus {
    pub sender: u64,
    pub epoch: u64,
    /// The highest seq taken in the epoch.
    pub last_seq: u64,
    /// When its last message was taken, unix ns.
    pub last_heard_ns: u64,
}

impl ReplayGuard {
    pub fn new() -> ReplayGuard {
        ReplayGuard::default()
    }

    /// Takes the header of an authentic message (from [`decode`]) received at `now_ns` (unix
    /// ns), or says why it is not believed. A refused message changes nothing.
    pub fn check(&mut self, header: &Header, now_ns: u64) -> Result<(), Reject> {
        if header.sent_ns.abs_diff(now_ns) > MAX_SKEW_NS {
            return Err(Reject::Stale {
                sent_ns: header.sent_ns,
                now_ns,
            });
        }
        match self.senders.get_mut(&header.sender) {
            None => {
                self.make_room();
                self.senders
                    .insert(header.sender, Window::new(header, now_ns));
            }
            Some(window) if header.epoch < window.epoch => {
                return Err(Reject::Replayed("from an earlier epoch of the sender"));
            }
            Some(window) if header.epoch > window.epoch => {
                *window = Window::new(header, now_ns);
            }
            Some(window) => {
                window.take(header.seq)?;
                window.last_heard_ns = now_ns;
            }
        }
        Ok(())
    }

    /// Evicts the least recently heard senders until a new one fits.
    fn make_room(&mut self) {
        while self.senders.len() >= MAX_SENDERS {
            let oldest = self
                .senders
                .iter()
                .min_by_key(|(sender, w)| (w.last_heard_ns, **sender))
                .map(|(sender, _)| *sender);
            let Some(oldest) = oldest else { return };
            self.senders.remove(&oldest);
        }
    }

    /// The senders remembered, by node id.
    pub fn senders(&self) -> Vec<SenderStatus> {
        self.senders
            .iter()
            .map(|(&sender, w)| SenderStatus {
                sender,
                epoch: w.epoch,
                last_seq: w.highest,
                last_heard_ns: w.last_heard_ns,
            })
            .collect()
    }
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix ns, a moment in 2023.
    const T0: u64 = 1_700_000_000_000_000_000;

    fn key() -> Key {
        Key::new(&[7; 32]).unwrap()
    }

    fn header(kind: Kind, seq: u64) -> Header {
        Header {
            kind,
            sender: 0x00c0_ffee_1234_5678,
            epoch: T0 - 3_600_000_000_000,
            seq,
            sent_ns: T0,
        }
    }

    /// The tag recomputed, as a holder of the key who wrote these bytes would.
    fn resign(message: &mut [u8]) {
        let signed = message.len() - TAG_LEN;
        let tag = hmac::sign(&key().0, &message[..signed]);
        message[signed..].copy_from_slice(tag.as_ref());
    }

    fn entry(proto: Protocol, src: &str, vip: &str, backend: &str) -> Entry {
        Entry {
            proto,
            src: src.parse().unwrap(),
            src_port: 40_000,
            vip: vip.parse().unwrap(),
            vip_port: 443,
            backend: backend.parse().unwrap(),
        }
    }

    /// One entry of each family, the first of IPv4.
    fn one_of_each() -> Vec<Entry> {
        vec![
            entry(Protocol::Tcp, "198.51.100.7", "192.0.2.10", "10.0.0.1"),
            entry(
                Protocol::Udp,
                "2001:db8:1::7",
                "2001:db8::10",
                "2001:db8:2::1",
            ),
            entry(Protocol::Tcp, "198.51.100.8", "192.0.2.11", "2001:db8:2::2"),
            entry(Protocol::Udp, "2001:db8:1::8", "2001:db8::11", "10.0.0.2"),
        ]
    }

    /// Entry `i` of `family`, distinct for each `i`.
    fn numbered(family: Family, i: u32) -> Entry {
        let v4 = |base: u32| IpAddr::from(Ipv4Addr::from(base + i));
        let v6 = |base: u128| IpAddr::from(Ipv6Addr::from(base + u128::from(i)));
        let (flow_v6, backend_v6) = (family.flow_is_v6(), family.backend_is_v6());
        let flow = |v4_base, v6_base| if flow_v6 { v6(v6_base) } else { v4(v4_base) };
        Entry {
            proto: if i.is_multiple_of(2) {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
            src: flow(0xc633_6400, 0x2001_0db8_0001 << 80),
            src_port: (i % 60_000) as u16 + 1024,
            vip: flow(0xc000_020a, 0x2001_0db8 << 96),
            vip_port: 443,
            backend: if backend_v6 {
                v6(0x2001_0db8_0002 << 80)
            } else {
                v4(0x0a00_0000)
            },
        }
    }

    #[test]
    fn a_message_is_laid_out_as_the_module_doc_says() {
        let e = entry(Protocol::Udp, "198.51.100.7", "192.0.2.10", "10.0.0.1");
        let h = Header {
            kind: Kind::Bulk,
            sender: 0x0102_0304_0506_0708,
            epoch: 0x1112_1314_1516_1718,
            seq: 0x2122_2324_2526_2728,
            sent_ns: 0x3132_3334_3536_3738,
        };
        let message = encode(&key(), &h, &[e]).unwrap();
        let mut expected: Vec<u8> = b"LBS\x01\x03\x00\x00\x01".to_vec();
        for base in [0x01, 0x11, 0x21, 0x31] {
            expected.extend((0..8).map(|i| base + i));
        }
        expected.extend([4, 17, 0x9c, 0x40, 0x01, 0xbb]);
        expected.extend([198, 51, 100, 7, 192, 0, 2, 10, 10, 0, 0, 1]);
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]), &expected);
        expected.extend_from_slice(tag.as_ref());
        assert_eq!(message, expected);
    }

    #[test]
    fn entry_lengths_and_how_many_fit_in_a_message() {
        let table = [
            (Family::V4, 18, 73),
            (Family::V6, 54, 24),
            (Family::V4ViaV6, 30, 44),
            (Family::V6ViaV4, 42, 31),
        ];
        for (family, len, per_message) in table {
            assert_eq!(family.entry_len(), len, "{family:?}");
            assert_eq!(entries_per_message(family), per_message, "{family:?}");
            let entry = numbered(family, 1);
            assert_eq!(entry.family(), Ok(family));
            assert_eq!(Family::from_byte(family.byte()), Some(family));
            let mut one = Encoder::new();
            assert!(one.push(&entry).unwrap());
            assert_eq!(
                one.finish(&key(), &header(Kind::Entries, 1)).unwrap().len(),
                40 + len + 32
            );
        }
    }

    #[test]
    fn every_kind_and_family_round_trips() {
        let all = one_of_each();
        let cases: Vec<(Kind, &[Entry])> = vec![
            (Kind::Entries, &all),
            (Kind::Entries, &all[0..1]),
            (Kind::Entries, &all[1..2]),
            (Kind::Entries, &all[2..3]),
            (Kind::Entries, &all[3..4]),
            (Kind::Entries, &[]),
            (Kind::Bulk, &all),
            (Kind::Bulk, &[]),
            (Kind::BulkRequest, &[]),
            (Kind::BulkEnd, &[]),
        ];
        for (kind, entries) in cases {
            let h = header(kind, 42);
            let message = encode(&key(), &h, entries).unwrap();
            let body: usize = entries
                .iter()
                .map(|e| e.family().unwrap().entry_len())
                .sum();
            assert_eq!(message.len(), HEADER_LEN + body + TAG_LEN, "{kind:?}");
            let expected = Message {
                header: h,
                entries: entries.to_vec(),
            };
            assert_eq!(
                decode(&key(), &message),
                Ok(expected),
                "{kind:?} {entries:?}"
            );
        }
    }

    #[test]
    fn pack_splits_1000_entries_into_full_messages() {
        let mixed: Vec<Entry> = (0..1000)
            .map(|i| numbered(Family::ALL[i as usize % 4], i))
            .collect();
        let one_family = |f| (0..1000).map(|i| numbered(f, i)).collect::<Vec<_>>();
        let cases = [
            ("IPv4", one_family(Family::V4), Some(14)),
            ("IPv6", one_family(Family::V6), Some(42)),
            ("mixed", mixed, None),
        ];
        for (case, entries, expected_messages) in cases {
            let mut seq = 0;
            let messages = pack(&key(), &entries, || {
                seq += 1;
                header(Kind::Bulk, seq)
            })
            .unwrap();
            if let Some(n) = expected_messages {
                assert_eq!(messages.len(), n, "{case}");
            }
            let decoded: Vec<Message> = messages
                .iter()
                .map(|m| {
                    assert!(m.len() <= MAX_MESSAGE, "{case}: {} bytes", m.len());
                    decode(&key(), m).unwrap()
                })
                .collect();
            let seqs: Vec<u64> = decoded.iter().map(|m| m.header.seq).collect();
            assert_eq!(
                seqs,
                (1..=messages.len() as u64).collect::<Vec<_>>(),
                "{case}"
            );
            let all: Vec<Entry> = decoded.iter().flat_map(|m| m.entries.clone()).collect();
            assert_eq!(all, entries, "{case}: all of them, in order");
            // As few as possible: no message had room for the next one's first entry.
            for (m, next) in messages.iter().zip(&decoded[1..]) {
                let first = next.entries[0].family().unwrap().entry_len();
                assert!(m.len() + first > MAX_MESSAGE, "{case}: room left");
            }
        }
        assert_eq!(pack(&key(), &[], || unreachable!()), Ok(vec![]));
    }

    #[test]
    fn the_encoder_refuses_what_cannot_be_sent() {
        let mut mixed = one_of_each()[0];
        mixed.vip = "2001:db8::10".parse().unwrap();
        let mismatch = Err(EncodeError::FamilyMismatch {
            src: mixed.src,
            vip: mixed.vip,
        });
        assert_eq!(Encoder::new().push(&mixed).map(|_| ()), mismatch);
        assert_eq!(
            encode(&key(), &header(Kind::Entries, 1), &[mixed]).map(|_| ()),
            mismatch
        );
        let entries = [one_of_each()[0], mixed];
        let asked = std::cell::Cell::new(0);
        let packed = pack(&key(), &entries, || {
            asked.set(asked.get() + 1);
            header(Kind::Entries, 1)
        });
        assert_eq!(packed.map(|_| ()), mismatch);
        assert_eq!(asked.get(), 0, "no seq spent");

        for kind in [Kind::BulkRequest, Kind::BulkEnd] {
            let got = encode(&key(), &header(kind, 1), &one_of_each());
            assert_eq!(got, Err(EncodeError::EntriesNotCarried { kind, count: 4 }));
        }
        let too_many: Vec<Entry> = (0..74).map(|i| numbered(Family::V4, i)).collect();
        let got = encode(&key(), &header(Kind::Entries, 1), &too_many);
        assert_eq!(got, Err(EncodeError::TooMany { count: 74 }));

        let mut full = Encoder::new();
        for e in &too_many[..73] {
            assert!(full.push(e).unwrap());
        }
        assert!(!full.push(&too_many[73]).unwrap(), "the 74th does not fit");
        assert_eq!(full.len(), 73, "and was not added");
        full.finish(&key(), &header(Kind::Entries, 1)).unwrap();
        assert!(full.is_empty(), "finish empties the encoder");
    }

    #[test]
    fn every_truncation_and_every_bit_flip_is_refused() {
        let message = encode(&key(), &header(Kind::Entries, 1), &one_of_each()).unwrap();
        for len in 0..message.len() {
            let expected = if len < HEADER_LEN + TAG_LEN {
                Reject::Truncated
            } else {
                Reject::Unauthenticated
            };
            assert_eq!(
                decode(&key(), &message[..len]),
                Err(expected),
                "{len} bytes"
            );
        }
        for bit in 0..message.len() * 8 {
            let mut flipped = message.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let got = decode(&key(), &flipped);
            assert_eq!(got, Err(Reject::Unauthenticated), "bit {bit}");
        }
        let other = Key::new(&[8; 32]).unwrap();
        assert_eq!(decode(&other, &message), Err(Reject::Unauthenticated));
    }

    #[test]
    fn an_oversized_message_is_refused_before_its_tag() {
        let mut message = encode(&key(), &header(Kind::Entries, 1), &[]).unwrap();
        message.resize(MAX_MESSAGE + 1, 0);
        resign(&mut message);
        assert_eq!(decode(&key(), &message), Err(Reject::Oversized));
    }

    #[test]
    fn authentic_but_malformed_messages_are_refused_with_a_reason() {
        // IPv4 first: its family byte is at 40, its protocol at 41.
        let valid = encode(&key(), &header(Kind::Entries, 1), &one_of_each()).unwrap();
        let body_end = valid.len() - TAG_LEN;
        type Mutation = fn(&mut Vec<u8>, usize);
        let cases: [(&str, Mutation, &str); 14] = [
            ("another magic", |m, _| m[0] = b'X', "magic"),
            ("version 2", |m, _| m[3] = 2, "version"),
            ("version 0", |m, _| m[3] = 0, "version"),
            ("kind 0", |m, _| m[4] = 0, "kind"),
            ("kind 5", |m, _| m[4] = 5, "kind"),
            ("a flag", |m, _| m[5] = 0x80, "flags"),
            ("entries in a request", |m, _| m[4] = 2, "without entries"),
            ("entries in an end", |m, _| m[4] = 4, "without entries"),
            ("family 5", |m, _| m[40] = 5, "family"),
            ("protocol ICMP", |m, _| m[41] = 1, "protocol"),
            ("a count too high", |m, _| m[7] += 1, "past the end"),
            ("a count too low", |m, _| m[7] -= 1, "after the last entry"),
            (
                "a byte too many",
                |m, end| m.insert(end, 0),
                "after the last",
            ),
            (
                "a byte too few",
                |m, end| {
                    m.remove(end - 1);
                },
                "past the end",
            ),
        ];
        for (case, mutate, why) in cases {
            let mut message = valid.clone();
            mutate(&mut message, body_end);
            resign(&mut message);
            match decode(&key(), &message) {
                Err(Reject::Malformed(reason)) => assert!(reason.contains(why), "{case}: {reason}"),
                other => panic!("{case}: {other:?}"),
            }
        }
    }

    /// A few random changes: bytes replaced, inserted, removed, the end cut.
    fn mutate(rng: &mut fastrand::Rng, message: &mut Vec<u8>) {
        for _ in 0..rng.usize(1..4) {
            let at = rng.usize(..=message.len());
            match rng.u8(..4) {
                0 if at < message.len() => message[at] = rng.u8(..),
                1 => message.insert(at, rng.u8(..)),
                2 if at < message.len() => {
                    message.remove(at);
                }
                _ => message.truncate(at),
            }
        }
    }

    #[test]
    fn decode_never_panics_and_takes_only_canonical_messages() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let valid = encode(&key(), &header(Kind::Bulk, 9), &one_of_each()).unwrap();
        let mut taken = 0;
        for round in 0..4000 {
            let mut bytes = if round % 2 == 0 {
                let mut random: Vec<u8> = (0..rng.usize(..MAX_MESSAGE + 8))
                    .map(|_| rng.u8(..))
                    .collect();
                if random.len() >= 5 && rng.bool() {
                    random[..5].copy_from_slice(b"LBS\x01\x01");
                }
                random
            } else {
                let mut mutated = valid.clone();
                mutate(&mut rng, &mut mutated);
                mutated
            };
            assert!(
                decode(&key(), &bytes).is_err() || bytes == valid,
                "{bytes:?}"
            );
            // Re-signed, so that the parser reads them.
            if (HEADER_LEN + TAG_LEN..=MAX_MESSAGE).contains(&bytes.len()) {
                resign(&mut bytes);
            }
            if let Ok(message) = decode(&key(), &bytes) {
                taken += 1;
                let again = encode(&key(), &message.header, &message.entries).unwrap();
                assert_eq!(again, bytes, "what is taken is what its fields encode to");
            }
        }
        assert!(taken > 0, "some mutations leave a valid message");
    }

    fn from(sender: u64, epoch: u64, seq: u64) -> Header {
        Header {
            kind: Kind::Entries,
            sender,
            epoch,
            seq,
            sent_ns: T0,
        }
    }

    #[test]
    fn the_replay_guard_takes_each_message_once() {
        let script: [(&str, u64, u64, Result<(), &str>); 20] = [
            ("the first message", 1, 1, Ok(())),
            ("again", 1, 1, Err("a duplicate")),
            ("the next", 1, 2, Ok(())),
            ("a jump ahead", 1, 5, Ok(())),
            ("late, within the window", 1, 4, Ok(())),
            ("late, twice", 1, 4, Err("a duplicate")),
            ("another late one", 1, 3, Ok(())),
            ("far ahead", 1, 100, Ok(())),
            ("skipped by the jump, in the window", 1, 99, Ok(())),
            ("the oldest in the window", 1, 37, Ok(())),
            (
                "just before the window",
                1,
                36,
                Err("older than the window"),
            ),
            ("the window's width ahead", 1, 164, Ok(())),
            (
                "the old highest, now outside",
                1,
                100,
                Err("older than the window"),
            ),
            ("the oldest in the moved window", 1, 101, Ok(())),
            ("the new highest, again", 1, 164, Err("a duplicate")),
            (
                "an earlier epoch",
                0,
                500,
                Err("from an earlier epoch of the sender"),
            ),
            ("a newer epoch: the sender restarted", 2, 1, Ok(())),
            ("its seqs start over", 2, 2, Ok(())),
            (
                "the old epoch is over",
                1,
                165,
                Err("from an earlier epoch of the sender"),
            ),
            ("and the new window is fresh", 2, 1, Err("a duplicate")),
        ];
        let mut guard = ReplayGuard::new();
        for (case, epoch, seq, expected) in script {
            let got = guard.check(&from(1, epoch, seq), T0 + seq);
            let expected = expected.map_err(Reject::Replayed);
            assert_eq!(got, expected, "{case}");
        }
        let status = SenderStatus {
            sender: 1,
            epoch: 2,
            last_seq: 2,
            last_heard_ns: T0 + 2,
        };
        assert_eq!(guard.senders(), [status]);
    }

    #[test]
    fn stale_and_future_messages_are_refused_and_forgotten() {
        let skew = MAX_SKEW_NS;
        let table = [
            ("on time", T0, true),
            ("MAX_SKEW old", T0 - skew, true),
            ("older", T0 - skew - 1, false),
            ("MAX_SKEW ahead", T0 + skew, true),
            ("further ahead", T0 + skew + 1, false),
        ];
        let mut guard = ReplayGuard::new();
        for (seq, (case, sent_ns, taken)) in (1..).zip(table) {
            let h = Header {
                sent_ns,
                ..from(1, 1, seq)
            };
            let expected = if taken {
                Ok(())
            } else {
                Err(Reject::Stale {
                    sent_ns,
                    now_ns: T0,
                })
            };
            assert_eq!(guard.check(&h, T0), expected, "{case}");
            // Refused, it was not remembered: the same seq on time is taken.
            if !taken {
                assert_eq!(guard.check(&from(1, 1, seq), T0), Ok(()), "{case}");
            }
        }
        let late = Reject::Stale {
            sent_ns: T0 - 12_500_000_000,
            now_ns: T0,
        };
        assert!(late.to_string().contains("12.5 s behind"), "{late}");
    }

    #[test]
    fn the_least_recently_heard_sender_is_evicted() {
        let mut guard = ReplayGuard::new();
        for sender in 0..MAX_SENDERS as u64 {
            guard.check(&from(sender, 1, 1), T0 + sender).unwrap();
        }
        // Sender 0 heard again: sender 1 is now the least recently heard.
        guard.check(&from(0, 1, 2), T0 + 100).unwrap();
        guard.check(&from(999, 1, 1), T0 + 101).unwrap();
        let senders: Vec<u64> = guard.senders().iter().map(|s| s.sender).collect();
        assert_eq!(senders.len(), MAX_SENDERS);
        assert!(senders.contains(&0) && senders.contains(&999) && !senders.contains(&1));
        // Forgotten: its first message would be taken again (within MAX_SKEW of its sending).
        assert_eq!(guard.check(&from(1, 1, 1), T0 + 102), Ok(()));
        assert!(!guard.senders().iter().any(|s| s.sender == 2));
    }

    #[test]
    fn a_key_is_long_enough_and_never_printed() {
        let error = Key::new(&[1; 31]).unwrap_err();
        assert_eq!(error, KeyError::TooShort { given: 31 });
        let text = error.to_string();
        assert!(
            text.contains("31 bytes") && text.contains("head -c 32 /dev/urandom"),
            "{text}"
        );
        let key = Key::new(b"0123456789abcdef0123456789abcdef").unwrap();
        let shown = format!("{key:?} {key:#?}");
        assert!(
            !shown.contains("0123") && !shown.contains("48, 49"),
            "{shown}"
        );
    }

    #[test]
    fn every_reject_has_its_own_label() {
        let all = [
            Reject::Truncated,
            Reject::Oversized,
            Reject::Unauthenticated,
            Reject::Malformed("x"),
            Reject::Replayed("x"),
            Reject::Stale {
                sent_ns: 0,
                now_ns: 0,
            },
        ];
        assert_eq!(all.map(|r| r.reason()), Reject::REASONS);
        for kind in Kind::ALL {
            assert_eq!(Kind::from_byte(kind.byte()), Some(kind));
        }
    }
}

//! NAT: address and port translation for VIPs with `forwarding = "nat"`, both ways.
//!
//! - A client's packet to a NAT VIP (`forward`): its connection's forward entry says what it
//!   becomes (to the backend's address and port, from the SNAT address and port or still from
//!   the client). A packet without one starts a connection: the VIP's Maglev table picks the
//!   backend, a SNAT port is taken by inserting the reply entry without overwriting (the
//!   client's own port first, then consecutive ports from a hash of the flow, at most
//!   `NAT_PORT_TRIES`), then the forward entry is written.
//! - A packet for no VIP whose source is a NAT VIP's backend (`reply`): if its reply entry
//!   exists, it is turned back into the VIP's packet to the client and sent towards the next
//!   hop the client's packets came from. Never passed to the local stack, which would answer
//!   it with a reset: a timed-out connection's replies are dropped.
//! - ICMP errors about a connection, from either side, are translated like a packet of the
//!   connection in that direction: the outer header, and the quoted packet the other way.
//!
//! The state and its layout are `balancer_common::nat`'s. An established connection's packet
//! costs one lookup of its entry, read in place; the twin entry is looked up only when the
//! TCP state changes or once per `NAT_REFRESH_NS`.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use balancer_common::{
    defence::DefenceCounter,
    hash::{flow_hash, vip_filter_bit},
    nat::{
        self, Delta, NatEntry, NatSettings, NatVip, MAX_SNAT_ADDRESSES, NAT_F_REPLY, NAT_F_SNAT,
        NAT_KEY_REPLY, NAT_PORT_TRIES, NAT_REFRESH_NS, NAT_S_SYN_ACK, NAT_VIP_F_SNAT,
    },
    Backend, FlowKey, FlowKeyV4, FlowKeyV6, NatCounter, Outcome, VipMeta, FAMILY_IPV4, PROTO_TCP,
};

use crate::{
    access::{opaque, ptr_at, ptr_at_mut},
    count, defence,
    maps::{
        hash_seed, FlowKeys, NatScratch as Scratch, BACKENDS, NAT_FILTER, NAT_PENDING_V4,
        NAT_PENDING_V6, NAT_SCRATCH, NAT_SETTINGS, NAT_V4, NAT_V6, NAT_VIPS,
    },
    parse::{Kind, Packet},
    rewrite, select,
    wire::{
        EthHdr, IcmpHdr, Ipv4Hdr, Ipv6Hdr, Ports, TCP_ACK, TCP_CHECK_OFFSET, TCP_SYN,
        UDP_CHECK_OFFSET,
    },
};

const BPF_ANY: u64 = 0;
/// Where a TCP header holds its sequence and acknowledgement numbers.
const TCP_SEQ_OFFSET: usize = 4;
const TCP_ACK_OFFSET: usize = 8;
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;
/// Mixed into the hash seed for the SNAT address and the first port probed, so that they do
/// not follow the Maglev slot.
const PORT_SEED: u32 = 0x6e61_7470;

/// A NAT table key of either family, laid out as `FlowKeyV6` (an IPv4 key uses the first
/// word of each address).
type Key = FlowKeyV6;

#[inline(always)]
fn scratch() -> Result<&'static mut Scratch, Outcome> {
    // SAFETY: this CPU's slot, valid for this program run and used by nothing else.
    NAT_SCRATCH
        .get_ptr_mut(0)
        .map(|s| unsafe { &mut *s })
        .ok_or(Outcome::NatUnavailable)
}

/// CLOCK_MONOTONIC, in nanoseconds. (The coarse clock would be cheaper, but its helper
/// arrived in Linux 5.11, and 5.10 is supported.)
#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Sets `key` to `flow`'s key in its direction.
#[inline(always)]
fn set_key(key: &mut Key, flow: &FlowKey, reply: bool) {
    key.src = flow.src_words();
    key.dst = flow.dst_words();
    key.ports = (flow.src_port as u32) << 16 | flow.dst_port as u32;
    key.proto = flow.proto as u32 | if reply { NAT_KEY_REPLY } else { 0 };
}

/// Sets `key` to the key of the entry's twin (the other direction): the reverse of its
/// translation.
#[inline(always)]
fn set_twin_key(key: &mut Key, entry: &NatEntry) {
    let reply = if entry.flags & NAT_F_REPLY != 0 {
        0
    } else {
        NAT_KEY_REPLY
    };
    key.src = entry.dst;
    key.dst = entry.src;
    key.ports = (entry.dst_port as u32) << 16 | entry.src_port as u32;
    key.proto = entry.proto as u32 | reply;
}

/// Sets `s.key4` to `s.key`, an IPv4 key built wide.
#[inline(always)]
fn narrow(s: &mut Scratch) {
    s.key4 = FlowKeyV4 {
        src: s.key.src[0],
        dst: s.key.dst[0],
        ports: s.key.ports,
        proto: s.key.proto,
    };
}

/// The entry at `s.key` in the NAT tables.
#[inline(always)]
fn lookup(v6: bool, s: &mut Scratch) -> Option<*mut NatEntry> {
    lookup_in(v6, false, s)
}

/// The entry at `s.key` in the NAT tables, or (`pending`) in the pending ones.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference on purpose: a key or entry passed by value is copied to the stack"
)]
fn lookup_in(v6: bool, pending: bool, s: &mut Scratch) -> Option<*mut NatEntry> {
    match (v6, pending) {
        (true, false) => NAT_V6.get_ptr_mut(&s.key),
        (true, true) => NAT_PENDING_V6.get_ptr_mut(&s.key),
        (false, pending) => {
            narrow(s);
            if pending {
                NAT_PENDING_V4.get_ptr_mut(&s.key4)
            } else {
                NAT_V4.get_ptr_mut(&s.key4)
            }
        }
    }
}

/// Writes `s.entry` at `s.key` in the NAT tables.
#[inline(always)]
fn insert(v6: bool, s: &mut Scratch, flags: u64) -> Result<(), i32> {
    insert_in(v6, false, s, flags)
}

/// Writes `s.entry` at `s.key` in the NAT tables, or (`pending`) in the pending ones.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference on purpose: a key or entry passed by value is copied to the stack"
)]
fn insert_in(v6: bool, pending: bool, s: &mut Scratch, flags: u64) -> Result<(), i32> {
    match (v6, pending) {
        (true, false) => NAT_V6.insert(&s.key, &s.entry, flags),
        (true, true) => NAT_PENDING_V6.insert(&s.key, &s.entry, flags),
        (false, pending) => {
            narrow(s);
            if pending {
                NAT_PENDING_V4.insert(&s.key4, &s.entry, flags)
            } else {
                NAT_V4.insert(&s.key4, &s.entry, flags)
            }
        }
    }
}

/// Removes the entry at `s.key` from the NAT tables, or (`pending`) from the pending ones.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference on purpose: a key passed by value is copied to the stack"
)]
fn remove_in(v6: bool, pending: bool, s: &mut Scratch) {
    let _ = match (v6, pending) {
        (true, false) => NAT_V6.remove(&s.key),
        (true, true) => NAT_PENDING_V6.remove(&s.key),
        (false, pending) => {
            narrow(s);
            if pending {
                NAT_PENDING_V4.remove(&s.key4)
            } else {
                NAT_V4.remove(&s.key4)
            }
        }
    };
}

/// A pending connection's reservation at `s.key` (the reply entry, which holds the SNAT
/// port): refused while the NAT tables hold a connection there, else inserted into the
/// pending table without overwriting.
#[inline(always)]
fn reserve(v6: bool, s: &mut Scratch) -> Result<(), i32> {
    if lookup_in(v6, false, s).is_some() {
        return Err(-EEXIST);
    }
    insert_in(v6, true, s, BPF_NOEXIST)
}

/// The address field of a map entry as 32-bit words.
#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Records a packet of the connection in `entry` (its direction: `reply`): the TCP state and
/// the time, in place, and in the twin when either changed (the time: once per
/// `NAT_REFRESH_NS`).
#[inline(always)]
fn touch(
    (v6, pending): (bool, bool),
    s: &mut Scratch,
    entry: *mut NatEntry,
    packet: &Packet,
    reply: bool,
    now: u64,
) {
    // SAFETY: a hash map value, valid for this run of the program (RCU). Plain writes: a
    // concurrent writer of the same entry writes the same kind of values.
    unsafe {
        let state = (*entry).state;
        let next = if packet.flow.proto == PROTO_TCP {
            NatEntry::next_state(state, packet.tcp_flags, reply)
        } else {
            state
        };
        if next == state && now.saturating_sub((*entry).last_seen) < NAT_REFRESH_NS {
            return;
        }
        let mut merged = next;
        set_twin_key(&mut s.key, &*entry);
        if let Some(twin) = lookup_in(v6, pending, s) {
            // Bits the other direction set since the last exchange (a reset is this
            // packet's to set or clear).
            merged |= (*twin).state & !nat::NAT_S_RST;
            (*twin).state = merged;
            (*twin).last_seen = now;
        }
        (*entry).state = merged;
        (*entry).last_seen = now;
    }
}

/// Whether `NAT_FILTER` may hold the source address (false: no NAT VIP has it as backend).
#[inline(always)]
pub fn may_be_backend(flow: &FlowKey) -> bool {
    let bit = vip_filter_bit(&flow.src, flow.family);
    NAT_FILTER
        .get(bit >> 6)
        .is_some_and(|word| *word & (1u64 << (bit & 63)) != 0)
}

/// A packet (TCP, UDP or an ICMP error about a flow) addressed to the NAT VIP `vip`.
#[inline(always)]
pub fn forward(ctx: &XdpContext, packet: &Packet, vip: &VipMeta) -> Result<Outcome, Outcome> {
    let s = scratch()?;
    let v6 = packet.flow.family != FAMILY_IPV4;
    set_key(&mut s.key, &packet.flow, false);
    let found = lookup(v6, s);
    if packet.kind == Kind::IcmpError {
        // About a connection of the NAT tables, or a pending one.
        let entry = match found {
            Some(entry) => entry,
            None if packet.flow.proto == PROTO_TCP => {
                set_key(&mut s.key, &packet.flow, false);
                lookup_in(v6, true, s).ok_or(Outcome::IcmpOther)?
            }
            None => return Err(Outcome::IcmpOther),
        };
        // SAFETY: a hash map value, valid for this run of the program.
        let entry = unsafe { &*entry };
        let backend = BACKENDS.get(entry.backend_id).ok_or(Outcome::IcmpOther)?;
        translate_icmp(ctx, packet, entry, entry.flags & NAT_F_SNAT != 0)?;
        count::nat(NatCounter::IcmpForward);
        return rewrite::send(ctx, backend.dst_mac, backend.src_mac, backend.ifindex);
    }
    let settings = NAT_SETTINGS.get(0).ok_or(Outcome::NatUnavailable)?;
    let now = now();
    if let Some(e) = found {
        // SAFETY: as above.
        let entry = unsafe { &*e };
        // A SYN on a connection past its handshake starts a new one (the client reused its
        // port); a retransmitted SYN keeps its translation.
        let restarted = packet.syn && entry.state & NAT_S_SYN_ACK != 0;
        if let Some(backend) = BACKENDS.get(entry.backend_id) {
            if backend.is_live() && backend.vip_id == vip.vip_id && !restarted {
                if !entry.expired(settings, now) {
                    touch((v6, false), s, e, packet, false, now);
                    return send_forward(ctx, packet, entry, backend, vip, 0);
                }
                count::nat(NatCounter::ExpiredOnLookup);
            }
        }
    }
    if packet.flow.proto == PROTO_TCP {
        if let Some(sent) = pending_forward(ctx, packet, vip, s, (settings, now)) {
            return sent;
        }
    }
    create(ctx, packet, vip, s, now)
}

/// A client's packet of a pending TCP connection (one whose SYN was translated, and whose
/// client has not yet acknowledged the backend's SYN-ACK): translated by its pending entry;
/// the packet that acknowledges the SYN-ACK (`acknowledges`) promotes both entries to the NAT
/// tables. `None`: no live pending connection.
#[inline(always)]
fn pending_forward(
    ctx: &XdpContext,
    packet: &Packet,
    vip: &VipMeta,
    s: &mut Scratch,
    (settings, now): (&NatSettings, u64),
) -> Option<Result<Outcome, Outcome>> {
    let v6 = packet.flow.family != FAMILY_IPV4;
    set_key(&mut s.key, &packet.flow, false);
    let e = lookup_in(v6, true, s)?;
    // SAFETY: a hash map value, valid for this run of the program.
    let entry = unsafe { &*e };
    let backend = BACKENDS.get(entry.backend_id)?;
    if !backend.is_live() || backend.vip_id != vip.vip_id || entry.expired(settings, now) {
        return None;
    }
    // The state (a reset, say) and the time, in both pending entries.
    touch((v6, true), s, e, packet, false, now);
    if packet.syn || !acknowledges(ctx, packet, entry) {
        // A retransmitted SYN, or a packet that does not answer the SYN-ACK (yet): no state
        // claimed.
        return Some(send_forward(ctx, packet, entry, backend, vip, 0));
    }
    // Promoted: the reply entry, then the forward entry, each moved to the NAT tables (a
    // reply that arrives in between finds one or the other).
    s.entry = *entry;
    set_twin_key(&mut s.key, &s.entry);
    if let Some(twin) = lookup_in(v6, true, s) {
        // SAFETY: as above.
        s.entry = unsafe { *twin };
        let _ = insert_in(v6, false, s, BPF_ANY);
        remove_in(v6, true, s);
    }
    set_key(&mut s.key, &packet.flow, false);
    let e = lookup_in(v6, true, s)?;
    // SAFETY: as above.
    s.entry = unsafe { *e };
    s.entry.last_seen = now;
    let _ = insert_in(v6, false, s, BPF_ANY);
    remove_in(v6, true, s);
    defence::count(DefenceCounter::Promoted);
    Some(send_forward(ctx, packet, &s.entry, backend, vip, 0))
}

/// Whether a client's packet acknowledges its pending connection's SYN-ACK: the ACK flag,
/// and the acknowledgement number one past the backend's initial sequence number.
#[inline(always)]
fn acknowledges(ctx: &XdpContext, packet: &Packet, entry: &NatEntry) -> bool {
    if entry.state & NAT_S_SYN_ACK == 0 || packet.tcp_flags & TCP_ACK == 0 {
        return false;
    }
    match ptr_at::<[u8; 4]>(ctx, packet.l4 + TCP_ACK_OFFSET) {
        // SAFETY: ptr_at checked the bounds.
        Some(ack) => u32::from_be_bytes(unsafe { *ack }) == entry.isn.wrapping_add(1),
        None => false,
    }
}

/// Translates a client's packet by its forward entry and sends it to the backend.
#[inline(always)]
fn send_forward(
    ctx: &XdpContext,
    packet: &Packet,
    entry: &NatEntry,
    backend: &Backend,
    vip: &VipMeta,
    new_flows: u32,
) -> Result<Outcome, Outcome> {
    translate(ctx, packet, entry)?;
    let outcome = rewrite::send(ctx, backend.dst_mac, backend.src_mac, backend.ifindex)?;
    count::forwarded_to(entry.backend_id, vip.vip_id, new_flows, packet.len);
    Ok(outcome)
}

/// A new connection: the backend from the Maglev table, the reply entry (which takes the SNAT
/// port), then the forward entry; then the packet is translated and sent.
#[inline(always)]
fn create(
    ctx: &XdpContext,
    packet: &Packet,
    vip: &VipMeta,
    s: &mut Scratch,
    now: u64,
) -> Result<Outcome, Outcome> {
    let flow = &packet.flow;
    let v6 = flow.family != FAMILY_IPV4;
    // A TCP connection waits in the pending tables until its client acknowledges the
    // backend's SYN-ACK.
    let pending = flow.proto == PROTO_TCP;
    // A connection is state that cannot be left out: over the source's limit or the CPU's
    // cap, it is refused.
    if vip.limits_sources() && !defence::source_allowed(vip, flow, FlowKeys::of(flow)?, now) {
        return Err(Outcome::SourceLimited);
    }
    if !defence::admit(now) {
        return Err(Outcome::NatFloodRefused);
    }
    let (id, backend, _) = select::table_choice(vip, flow)?;
    let nat_vip = NAT_VIPS.get(vip.vip_id).ok_or(Outcome::NatUnavailable)?;
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(Outcome::TruncatedEthernet)?;
    let dst_port = if backend.port != 0 {
        backend.port
    } else {
        flow.dst_port
    };
    // The reply entry: replies become the VIP's packets to the client, sent back towards
    // the next hop this packet came from.
    let e = &mut s.entry;
    e.src = flow.dst_words();
    e.dst = flow.src_words();
    e.src_port = flow.dst_port;
    e.dst_port = flow.src_port;
    // SAFETY: ptr_at checked the bounds.
    unsafe {
        e.dst_mac = (*eth).src;
        e.src_mac = (*eth).dst;
    }
    e.ifindex = ctx.ingress_ifindex() as u32;
    e.backend_id = id;
    e.flags = NAT_F_REPLY;
    e.state = if flow.proto == PROTO_TCP {
        NatEntry::next_state(0, packet.tcp_flags, false)
    } else {
        0
    };
    e.proto = flow.proto;
    e._pad = 0;
    e.isn = 0;
    e.last_seen = now;
    // Its key: from the backend's address and port, to the SNAT address and port (taken
    // here) or the client's.
    s.key.src = words(&backend.addr);
    s.key.proto = flow.proto as u32 | NAT_KEY_REPLY;
    if nat_vip.flags & NAT_VIP_F_SNAT != 0 {
        if nat_vip.snat_count == 0 {
            count::nat(NatCounter::NoSnatAddress);
            return Err(Outcome::NatNoPort);
        }
        s.entry.flags |= NAT_F_SNAT;
        let hash = flow_hash(flow, hash_seed() ^ PORT_SEED);
        let index = (hash % nat_vip.snat_count as u32) as usize & (MAX_SNAT_ADDRESSES - 1);
        s.key.dst = nat_vip.snat[index];
        // The ports tried vary with the time too: a client that reuses its port for the same
        // VIP many times within a quarantine would otherwise find the same ports taken by
        // its own earlier connections, try after try.
        let probe = hash ^ ((now >> 10) as u32).wrapping_mul(0x9e37_79b9);
        allocate((v6, pending), s, dst_port, flow.src_port, nat_vip, probe)?;
    } else {
        s.key.dst = flow.src_words();
        s.key.ports = (dst_port as u32) << 16 | flow.src_port as u32;
        let taken = if pending {
            reserve(v6, s)
        } else {
            insert(v6, s, BPF_NOEXIST)
        };
        if taken.is_err() {
            count::nat(NatCounter::NoPortExhausted);
            return Err(Outcome::NatNoPort);
        }
    }
    // The forward entry: the same, turned around, at the client's key.
    let e = &mut s.entry;
    e.src = s.key.dst;
    e.dst = s.key.src;
    e.src_port = s.key.ports as u16;
    e.dst_port = dst_port;
    e.dst_mac = [0; 6];
    e.src_mac = [0; 6];
    e.ifindex = 0;
    e.flags &= !NAT_F_REPLY;
    set_key(&mut s.key, flow, false);
    if pending {
        // An expired or restarted connection's forward entry goes: the new one's packets
        // must not find it first.
        remove_in(v6, false, s);
    }
    // Overwrites an expired or restarted connection's entry; can only fail if the kernel
    // cannot allocate, and then the next packet starts over.
    let _ = insert_in(v6, pending, s, BPF_ANY);
    count::nat(NatCounter::Created);
    send_forward(ctx, packet, &s.entry, backend, vip, 1)
}

/// Takes a SNAT port for a new connection: inserts the reply entry (`s.entry`) at `s.key`
/// (its addresses set) without overwriting, at the client's own port (`client_port`) if the
/// range has it, else at consecutive ports from `hash`. Leaves the port taken in `s.key`.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference on purpose: a key or entry passed by value is copied to the stack"
)]
fn allocate(
    (v6, pending): (bool, bool),
    s: &mut Scratch,
    dst_port: u16,
    client_port: u16,
    nat_vip: &NatVip,
    hash: u32,
) -> Result<(), Outcome> {
    let min = nat_vip.port_min as u32;
    let range = (nat_vip.port_max as u32).saturating_sub(min) + 1;
    let client = u16::from_be(client_port) as u32;
    let probe = Probe {
        min,
        range,
        start: hash % range,
        // The client's port, if the range has it (else the first try is skipped).
        client: (client >= min && client - min < range).then_some(client),
        dst_port,
    };
    // One loop per family and table, each with one insert: the verifier walks every
    // iteration.
    let found = match (v6, pending) {
        (true, false) => probe.run(s, |s| NAT_V6.insert(&s.key, &s.entry, BPF_NOEXIST)),
        (false, false) => probe.run(s, |s| {
            narrow(s);
            NAT_V4.insert(&s.key4, &s.entry, BPF_NOEXIST)
        }),
        // The family a constant in each loop (no branch on it inside the probe).
        (true, true) => probe.run(s, |s| reserve(true, s)),
        (false, true) => probe.run(s, |s| reserve(false, s)),
    };
    match found {
        Ok(kept) => {
            count::nat(if kept {
                NatCounter::PortKept
            } else {
                NatCounter::PortProbed
            });
            Ok(())
        }
        Err(counter) => {
            count::nat(counter);
            Err(Outcome::NatNoPort)
        }
    }
}

/// The ports a new connection tries.
struct Probe {
    min: u32,
    range: u32,
    start: u32,
    client: Option<u32>,
    dst_port: u16,
}

impl Probe {
    /// Tries the client's port, then other ports of the range, at most `NAT_PORT_TRIES` in
    /// all, with `insert` (which inserts at `s.key`): in a range no larger than the tries,
    /// consecutive ports from `start` (every port once); in a larger one, ports spread by a
    /// hash of `start` and the try (consecutive tries would pile up behind the ports taken
    /// before them, as in any linear probing, and fail long before the range is full).
    /// `Ok(kept)`: a port was taken (the client's own if `kept`).
    #[inline(always)]
    fn run(
        &self,
        s: &mut Scratch,
        insert: impl Fn(&mut Scratch) -> Result<(), i32>,
    ) -> Result<bool, NatCounter> {
        for i in 0..NAT_PORT_TRIES {
            let port = match (i, self.client) {
                (0, Some(client)) => client,
                (0, None) => continue,
                _ if i > self.range => break,
                _ if self.range < NAT_PORT_TRIES => self.min + (self.start + i - 1) % self.range,
                _ => self.min + spread(self.start, i) % self.range,
            };
            s.key.ports = (self.dst_port as u32) << 16 | (port as u16).to_be() as u32;
            match insert(s) {
                Ok(()) => return Ok(i == 0),
                Err(e) if e == -EEXIST => {}
                Err(_) => return Err(NatCounter::NoPortInsertFailed),
            }
        }
        Err(NatCounter::NoPortExhausted)
    }
}

/// A hash of a probe's start and try: a multiply and a shift, so that tries land far apart.
#[inline(always)]
fn spread(start: u32, i: u32) -> u32 {
    let x = (start ^ i.wrapping_mul(0x9e37_79b9)).wrapping_mul(0x85eb_ca6b);
    x ^ (x >> 15)
}

/// A packet for no VIP: if it is a backend's reply on a NAT connection (or an ICMP error
/// about one from the backend's side), translated back and sent to the client. `None`: it
/// is not, and goes its way.
#[inline(always)]
pub fn reply(ctx: &XdpContext, packet: &Packet) -> Option<Result<Outcome, Outcome>> {
    if packet.fragment || packet.kind == Kind::EchoRequest || !may_be_backend(&packet.flow) {
        return None;
    }
    let s = match scratch() {
        Ok(s) => s,
        Err(outcome) => return Some(Err(outcome)),
    };
    let v6 = packet.flow.family != FAMILY_IPV4;
    set_key(&mut s.key, &packet.flow, true);
    if let Some(entry) = lookup(v6, s) {
        return Some(send_reply(ctx, packet, (v6, false), s, entry));
    }
    if packet.flow.proto != PROTO_TCP {
        return None;
    }
    // A pending connection's reply: its SYN-ACK's sequence number is what the client's
    // acknowledgement must answer.
    set_key(&mut s.key, &packet.flow, true);
    let entry = lookup_in(v6, true, s)?;
    if packet.kind == Kind::Flow && packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        if let Some(seq) = ptr_at::<[u8; 4]>(ctx, packet.l4 + TCP_SEQ_OFFSET) {
            // SAFETY: ptr_at checked the bounds; `entry` is a hash map value, valid for this
            // run of the program.
            unsafe {
                let isn = u32::from_be_bytes(*seq);
                (*entry).isn = isn;
                set_twin_key(&mut s.key, &*entry);
                if let Some(twin) = lookup_in(v6, true, s) {
                    (*twin).isn = isn;
                }
            }
        }
    }
    Some(send_reply(ctx, packet, (v6, true), s, entry))
}

#[inline(always)]
fn send_reply(
    ctx: &XdpContext,
    packet: &Packet,
    (v6, pending): (bool, bool),
    s: &mut Scratch,
    e: *mut NatEntry,
) -> Result<Outcome, Outcome> {
    // SAFETY: a hash map value, valid for this run of the program.
    let entry = unsafe { &*e };
    if packet.kind == Kind::IcmpError {
        translate_icmp(ctx, packet, entry, true)?;
        count::nat(NatCounter::IcmpReply);
    } else {
        let settings = NAT_SETTINGS.get(0).ok_or(Outcome::NatUnavailable)?;
        let now = now();
        if entry.expired(settings, now) {
            return Err(Outcome::NatReplyExpired);
        }
        touch((v6, pending), s, e, packet, true, now);
        translate(ctx, packet, entry)?;
    }
    rewrite::send_back(ctx, entry.dst_mac, entry.src_mac, entry.ifindex)
}

/// Where a transport header's checksum is.
#[inline(always)]
fn check_offset(proto: u8) -> usize {
    if proto == PROTO_TCP {
        TCP_CHECK_OFFSET
    } else {
        UDP_CHECK_OFFSET
    }
}

/// Writes `new` (an address's 32-bit words; `N` is 4 or 16) over the address field at
/// `field`, 16 bits at a time (headers are 2-byte aligned), and adds the change to `delta`.
///
/// # Safety
/// `field` points to `N` bytes inside the packet, at an even offset.
#[inline(always)]
unsafe fn rewrite_address<const N: usize>(field: *mut [u8; N], new: &[u32; 4], delta: &mut Delta) {
    let halves = field as *mut u16;
    let mut i = 0;
    while i < N / 2 {
        let word = new[i / 2].to_ne_bytes();
        let half = if i % 2 == 0 {
            u16::from_ne_bytes([word[0], word[1]])
        } else {
            u16::from_ne_bytes([word[2], word[3]])
        };
        // SAFETY: the caller's: half `i` lies within the field.
        let old = unsafe { *halves.add(i) };
        delta.replace(old, half);
        // SAFETY: as above.
        unsafe { *halves.add(i) = half };
        i += 1;
    }
}

/// Rewrites the packet's addresses and ports as `entry` says and updates its
/// checksums: the IPv4 header's, and TCP's or UDP's with the pseudo-header.
#[inline(always)]
fn translate(ctx: &XdpContext, packet: &Packet, entry: &NatEntry) -> Result<(), Outcome> {
    let (src, dst) = (&entry.src, &entry.dst);
    let (src_port, dst_port) = (entry.src_port, entry.dst_port);
    let proto = packet.flow.proto;
    let ports = ptr_at_mut::<Ports>(ctx, packet.l4).ok_or(Outcome::TruncatedL4)?;
    let check =
        ptr_at_mut::<u16>(ctx, packet.l4 + check_offset(proto)).ok_or(Outcome::TruncatedL4)?;
    let mut addresses = Delta::default();
    // SAFETY: ptr_at_mut checked the bounds of every header touched; headers sit at even
    // offsets.
    unsafe {
        if packet.flow.family == FAMILY_IPV4 {
            let ip = ptr_at_mut::<Ipv4Hdr>(ctx, packet.l3).ok_or(Outcome::TruncatedIpv4)?;
            rewrite_address(&mut (*ip).src, src, &mut addresses);
            rewrite_address(&mut (*ip).dst, dst, &mut addresses);
            (*ip).check = addresses.apply((*ip).check);
        } else {
            let ip = ptr_at_mut::<Ipv6Hdr>(ctx, packet.l3).ok_or(Outcome::TruncatedIpv6)?;
            rewrite_address(&mut (*ip).src, src, &mut addresses);
            rewrite_address(&mut (*ip).dst, dst, &mut addresses);
        }
        let mut l4 = addresses;
        l4.replace((*ports).src, src_port);
        l4.replace((*ports).dst, dst_port);
        (*ports).src = src_port;
        (*ports).dst = dst_port;
        *check = l4.apply_l4(*check, proto);
    }
    Ok(())
}

/// Translates an ICMP error about a connection, as a packet of the connection in `entry`'s
/// direction: the outer destination becomes `entry.dst` (and the outer source `entry.src`
/// if `outer_src`), and the quoted packet, which went the other way, becomes the one the
/// other side sent: from `entry.dst` and its port to `entry.src` and its port. Every checksum
/// follows: the outer IPv4 header's, ICMP's (ICMPv6's with its pseudo-header), the quoted
/// IPv4 header's, and the quoted TCP or UDP checksum where the quote holds it.
#[inline(always)]
fn translate_icmp(
    ctx: &XdpContext,
    packet: &Packet,
    entry: &NatEntry,
    outer_src: bool,
) -> Result<(), Outcome> {
    let icmp = ptr_at_mut::<IcmpHdr>(ctx, packet.l4).ok_or(Outcome::IcmpOther)?;
    let ports = ptr_at_mut::<Ports>(ctx, packet.inner_l4).ok_or(Outcome::IcmpOther)?;
    let proto = packet.flow.proto;
    // The quoted transport checksum, if the quote reaches it: inside the IP datagram, not
    // only inside the frame (bytes after the datagram, Ethernet padding, are covered by no
    // checksum: changing them would put the ICMP checksum wrong).
    let at = packet.inner_l4 + check_offset(proto);
    let inner_check = if at + 2 <= packet.l3 + packet.ip_len {
        ptr_at_mut::<u16>(ctx, opaque(at))
    } else {
        None
    };
    // What the ICMP checksum covers: the quoted packet, and for ICMPv6 the outer addresses.
    let mut icmp_delta = Delta::default();
    let mut inner = Delta::default();
    let mut outer = Delta::default();
    // SAFETY: ptr_at_mut checked the bounds of every header touched; headers sit at even
    // offsets.
    unsafe {
        if packet.flow.family == FAMILY_IPV4 {
            let outer_ip = ptr_at_mut::<Ipv4Hdr>(ctx, packet.l3).ok_or(Outcome::IcmpOther)?;
            let inner_ip = ptr_at_mut::<Ipv4Hdr>(ctx, packet.inner_l3).ok_or(Outcome::IcmpOther)?;
            rewrite_address(&mut (*inner_ip).src, &entry.dst, &mut inner);
            rewrite_address(&mut (*inner_ip).dst, &entry.src, &mut inner);
            let old = (*inner_ip).check;
            let new = inner.apply(old);
            (*inner_ip).check = new;
            icmp_delta.replace(old, new);
            rewrite_address(&mut (*outer_ip).dst, &entry.dst, &mut outer);
            if outer_src {
                rewrite_address(&mut (*outer_ip).src, &entry.src, &mut outer);
            }
            (*outer_ip).check = outer.apply((*outer_ip).check);
        } else {
            let outer_ip = ptr_at_mut::<Ipv6Hdr>(ctx, packet.l3).ok_or(Outcome::IcmpOther)?;
            let inner_ip = ptr_at_mut::<Ipv6Hdr>(ctx, packet.inner_l3).ok_or(Outcome::IcmpOther)?;
            rewrite_address(&mut (*inner_ip).src, &entry.dst, &mut inner);
            rewrite_address(&mut (*inner_ip).dst, &entry.src, &mut inner);
            rewrite_address(&mut (*outer_ip).dst, &entry.dst, &mut outer);
            if outer_src {
                rewrite_address(&mut (*outer_ip).src, &entry.src, &mut outer);
            }
            // ICMPv6's pseudo-header holds the outer addresses.
            icmp_delta = icmp_delta.plus(outer);
        }
        let mut inner_l4 = inner;
        inner_l4.replace((*ports).src, entry.dst_port);
        inner_l4.replace((*ports).dst, entry.src_port);
        icmp_delta = icmp_delta.plus(inner_l4);
        (*ports).src = entry.dst_port;
        (*ports).dst = entry.src_port;
        if let Some(c) = inner_check {
            let old = *c;
            let new = inner_l4.apply_l4(old, proto);
            *c = new;
            icmp_delta.replace(old, new);
        }
        (*icmp).check = icmp_delta.apply((*icmp).check);
    }
    Ok(())
}

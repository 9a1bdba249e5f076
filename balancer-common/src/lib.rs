//! Types shared by the XDP program (`balancer-ebpf`) and the daemon (`balancer-userspace`).
//!
//! Every map key and value is `#[repr(C)]` with explicit, zeroed padding: the kernel compares
//! hash keys byte for byte, so a padding byte left uninitialised would make two equal keys
//! differ. Sizes are pinned by compile-time assertions at the bottom of this file; changing
//! one is a map layout change (see [`LAYOUT_VERSION`]).
//!
//! Ports are stored in network byte order, exactly as they appear on the wire, so the packet
//! path never converts. Addresses are 16 bytes: an IPv4 address fills the first four bytes and
//! the rest stays zero, with `family` telling the two apart.
#![no_std]

pub mod csum;
pub mod defence;
pub mod hash;
pub mod nat;
pub mod tunnel;

/// Bumped whenever a map's key or value layout, or the meaning of a field, changes.
/// 2: the `VIP_FILTER` prefilter.
/// 3: `VIP_SLOTS` (each VIP's key and meta by id) and the flow hash in `ConnEntry`: an
///    established flow is found by one hash lookup, the connection table's; one connection
///    table per address family (`CONN_TABLE_V4` with 16-byte keys, `CONN_TABLE_V6`).
/// 4: NAT: the backend's port in `Backend`, the NAT tables and their settings, `NAT_FILTER`,
///    `NAT_STATS`, the NAT outcomes.
/// 5: connection-table sync: `VIP_F_SYNC`, the `SYNC_EVENTS` ring buffer and `SYNC_STATS`.
/// 6: the defences (`defence`): the pending tables, the flood cap, per-source limits
///    (`VIP_F_SOURCE_LIMIT`), their counters and outcomes.
pub const LAYOUT_VERSION: u32 = 6;

/// How many VIPs the maps hold.
pub const MAX_VIPS: u32 = 512;
/// Entries of the VIPS map: each VIP's key, at most one fragments key per VIP, and one address
/// entry per VIP address.
pub const VIP_KEYS_CAPACITY: u32 = 3 * MAX_VIPS;
/// Words of the VIP address prefilter: 1,024 x 64 = 65,536 bits (8 KiB), one bit per bucket
/// of destination addresses (`hash::vip_filter_bit`). At most 512 VIPs' addresses set at
/// most 1,536 bits: a packet for no VIP finds its bit set (and pays the VIPS lookups) less
/// than 2.5% of the time.
pub const VIP_FILTER_WORDS: u32 = 1024;
/// How many (VIP, backend) pairs the maps hold. A backend serving two VIPs takes two slots.
pub const MAX_BACKENDS: u32 = 16_384;
/// Capacity of every per-VIP Maglev table (the inner maps). A VIP's table size is a prime no
/// larger than this; the slots past it stay unused.
pub const MAGLEV_CAPACITY: u32 = 65_537;
/// Map flags of the Maglev tables: BPF_F_MMAPABLE, so that the daemon fills a new table with
/// one copy instead of one syscall per slot. Inner maps must match the outer map's template,
/// so the program's definition uses the same flags.
pub const MAGLEV_TABLE_MAP_FLAGS: u32 = 1 << 10;
/// Default Maglev table size, the largest prime the capacity allows.
pub const DEFAULT_MAGLEV_SIZE: u32 = 65_537;
/// Default number of flows each connection table (one per address family) remembers (LRU).
pub const DEFAULT_CONN_TABLE_SIZE: u32 = 262_144;
/// Default number of NAT connections each NAT table (one per address family) holds: two
/// entries each, one per direction.
pub const DEFAULT_NAT_TABLE_SIZE: u32 = 65_536;
/// Entries of each pending table (`defence`) in the object; the daemon sizes them at load
/// time from the config.
pub const DEFAULT_PENDING_TABLE_SIZE: u32 = 65_536;
/// Source prefixes whose buckets `SOURCE_RATES` holds (the least recently used go first).
pub const SOURCE_RATES_CAPACITY: u32 = 65_536;
/// `NAT_PROGRAMS` slots.
pub const NAT_PROGRAM_FORWARD: u32 = 0;
pub const NAT_PROGRAM_REPLY: u32 = 1;
pub const NAT_PROGRAM_COUNT: u32 = 2;
/// Words of the NAT reply filter: like `VIP_FILTER`, one bit per bucket of source addresses,
/// set for the backends of NAT VIPs.
pub const NAT_FILTER_WORDS: u32 = VIP_FILTER_WORDS;
/// How many egress interfaces the redirect device map holds.
pub const MAX_EGRESS_INTERFACES: u32 = 64;
/// A backend id that never names a backend: an empty Maglev slot.
pub const NO_BACKEND: u32 = u32::MAX;

/// Map names, one source of truth for the program and the daemon.
pub mod map_names {
    /// `VipKey -> VipMeta` (hash).
    pub const VIPS: &str = "VIPS";
    /// `word -> u64` (array): the bits of every VIP address (`hash::vip_filter_bit`); a
    /// packet whose destination's bit is clear is for no VIP.
    pub const VIP_FILTER: &str = "VIP_FILTER";
    /// `vip_id -> VipSlot` (array): each VIP's own key and meta, by id, for the flows the
    /// connection table finds before any VIP lookup.
    pub const VIP_SLOTS: &str = "VIP_SLOTS";
    /// `vip_id -> Maglev table` (array of arrays of backend ids).
    pub const MAGLEV_TABLES: &str = "MAGLEV_TABLES";
    /// `backend_id -> Backend` (array).
    pub const BACKENDS: &str = "BACKENDS";
    /// `FlowKeyV4 -> ConnEntry` (LRU hash): IPv4 flows.
    pub const CONN_TABLE_V4: &str = "CONN_TABLE_V4";
    /// `FlowKeyV6 -> ConnEntry` (LRU hash): IPv6 flows.
    pub const CONN_TABLE_V6: &str = "CONN_TABLE_V6";
    /// The connection tables, each sized by `conn_table_size`.
    pub const CONN_TABLES: [&str; 2] = [CONN_TABLE_V4, CONN_TABLE_V6];
    /// `ifindex -> ifindex` (device hash map for XDP_REDIRECT).
    pub const EGRESS_DEVICES: &str = "EGRESS_DEVICES";
    /// `backend_id -> TrafficStats` (per-CPU array).
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// `vip_id -> TrafficStats` (per-CPU array).
    pub const VIP_STATS: &str = "VIP_STATS";
    /// `Outcome -> packets` (per-CPU array).
    pub const OUTCOME_STATS: &str = "OUTCOME_STATS";
    /// `DecapOutcome -> packets` (per-CPU array), of the decapsulating program.
    pub const DECAP_STATS: &str = "DECAP_STATS";
    /// `DecapAddress -> 1`: the addresses the decapsulating program accepts tunnels to.
    pub const DECAP_ADDRESSES: &str = "DECAP_ADDRESSES";
    /// `FlowKeyV4 -> NatEntry` (LRU hash): both directions of IPv4 NAT connections (a reply
    /// key has `nat::NAT_KEY_REPLY` in its protocol word).
    pub const NAT_V4: &str = "NAT_V4";
    /// `FlowKeyV6 -> NatEntry` (LRU hash): IPv6 NAT connections.
    pub const NAT_V6: &str = "NAT_V6";
    /// The NAT tables, each sized twice `nat_table_size` (two entries per connection).
    pub const NAT_TABLES: [&str; 2] = [NAT_V4, NAT_V6];
    /// `0 -> NatSettings` (array of one): the timeouts.
    pub const NAT_SETTINGS: &str = "NAT_SETTINGS";
    /// `vip_id -> NatVip` (array): each NAT VIP's SNAT addresses and ports.
    pub const NAT_VIPS: &str = "NAT_VIPS";
    /// `word -> u64` (array): the bits of the backends of NAT VIPs (`hash::vip_filter_bit`
    /// of the address); a packet whose source's bit is clear is no NAT reply.
    pub const NAT_FILTER: &str = "NAT_FILTER";
    /// `NatCounter -> count` (per-CPU array).
    pub const NAT_STATS: &str = "NAT_STATS";
    /// `NAT_PROGRAM_* -> program` (program array): the NAT programs the balancer tail-calls.
    pub const NAT_PROGRAMS: &str = "NAT_PROGRAMS";
    /// `0 -> VipMeta` (per-CPU array): the VIP of the packet handed to the NAT forward
    /// program.
    pub const NAT_HANDOFF: &str = "NAT_HANDOFF";
    /// Ring buffer of `SyncEvent`s: the new-flow decisions of VIPs with `VIP_F_SYNC`.
    pub const SYNC_EVENTS: &str = "SYNC_EVENTS";
    /// `0 -> decisions` (per-CPU array): decisions not handed over (the ring was full).
    pub const SYNC_STATS: &str = "SYNC_STATS";
    /// TCP flows that have sent a SYN and nothing since (`defence`), by family: sized by the
    /// daemon at load time.
    pub const PENDING_V4: &str = "PENDING_V4";
    pub const PENDING_V6: &str = "PENDING_V6";
    pub const PENDING_TABLES: [&str; 2] = [PENDING_V4, PENDING_V6];
    /// NAT connections that have sent a SYN and not yet acknowledged the backend's SYN-ACK
    /// (both entries, as in `NAT_V4`/`NAT_V6`): sized like the pending tables.
    pub const NAT_PENDING_V4: &str = "NAT_PENDING_V4";
    pub const NAT_PENDING_V6: &str = "NAT_PENDING_V6";
    pub const NAT_PENDING_TABLES: [&str; 2] = [NAT_PENDING_V4, NAT_PENDING_V6];
    /// The per-CPU cap on new flows (`defence::FloodSettings`, one entry).
    pub const FLOOD_SETTINGS: &str = "FLOOD_SETTINGS";
    /// Each CPU's new flows in its current second (`defence::FloodState`).
    pub const FLOOD_STATE: &str = "FLOOD_STATE";
    /// Each VIP's per-source limit, by VIP id (`defence::SourceLimit`).
    pub const SOURCE_LIMITS: &str = "SOURCE_LIMITS";
    /// Source prefixes' token buckets (`defence::SourceKey` -> `defence::SourceBucket`).
    pub const SOURCE_RATES: &str = "SOURCE_RATES";
    /// `defence::DefenceCounter`s, per CPU.
    pub const DEFENCE_STATS: &str = "DEFENCE_STATS";
}

/// Program names in the object file.
pub mod program_names {
    /// The load balancer.
    pub const BALANCER: &str = "balancer";
    /// `XDP_PASS` and nothing else: the baseline for measurements, and the program a veth
    /// peer needs so that frames sent to it with XDP_TX or XDP_REDIRECT are delivered.
    pub const PASS: &str = "xdp_pass";
    /// Backend side of tunnel mode: strips the outer header of tunnels to local addresses.
    pub const DECAP: &str = "balancer_decap";
    /// NAT: a client's packet to a NAT VIP, handed over by the balancer (`NAT_PROGRAMS`).
    pub const NAT_FORWARD: &str = "balancer_nat_forward";
    /// NAT: a packet for no VIP from a NAT VIP's backend, handed over by the balancer.
    pub const NAT_REPLY: &str = "balancer_nat_reply";
    /// Benchmark helpers: drop everything; send every frame back unchanged (a packet
    /// generator with BPF_PROG_TEST_RUN's live frames); swap the MACs and send back (the
    /// trivial reflector the balancer is compared with).
    pub const DROP: &str = "xdp_drop";
    pub const TX: &str = "xdp_tx";
    pub const REFLECT: &str = "xdp_reflect";
}

/// Address family of a key or backend.
pub const FAMILY_IPV4: u8 = 4;
/// Address family of a key or backend.
pub const FAMILY_IPV6: u8 = 6;

/// IP protocol numbers the balancer forwards.
pub const PROTO_TCP: u8 = 6;
/// IP protocol numbers the balancer forwards.
pub const PROTO_UDP: u8 = 17;
/// ICMP, and the key protocol of a VIP address entry (see `VIP_F_ADDRESS`).
pub const PROTO_ICMP: u8 = 1;
/// ICMPv6, and the key protocol of an IPv6 VIP address entry.
pub const PROTO_ICMPV6: u8 = 58;
/// IPv4 in IP (IPIP and IPv4-in-IPv6).
pub const PROTO_IPIP: u8 = 4;
/// IPv6 in IP (IP6IP6).
pub const PROTO_IPV6: u8 = 41;

/// A VIP key: the destination a packet is classified by. `port == 0` is the any-port entry.
/// Aligned to 4 bytes (its size is unchanged) so that copies and comparisons go a word at a
/// time.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    pub addr: [u8; 16],
    /// Network byte order; 0 matches any port.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

impl VipKey {
    /// The key of an address (its 32-bit words, as `FlowKey::dst_words` gives them), a port,
    /// a protocol and a family, written as five whole words: the kernel hashes keys a word at
    /// a time, and a word the program wrote byte by byte stalls the CPU when read (no store
    /// forwarding).
    #[inline(always)]
    pub fn from_words(addr: [u32; 4], port: u16, proto: u8, family: u8) -> VipKey {
        let port = port.to_ne_bytes();
        let words: [u32; 5] = [
            addr[0],
            addr[1],
            addr[2],
            addr[3],
            u32::from_ne_bytes([port[0], port[1], proto, family]),
        ];
        // SAFETY: `VipKey` is five words' size and alignment (asserted below), `repr(C)`
        // without padding, and every bit pattern is a valid `VipKey`.
        unsafe { core::mem::transmute::<[u32; 5], VipKey>(words) }
    }
}

/// Forwarding mode: L2 direct server return.
pub const FORWARD_DSR: u8 = 0;
/// Forwarding mode: IP-in-IP encapsulation (IPIP, IP6IP6, IPv4-in-IPv6) to the backend.
pub const FORWARD_TUNNEL: u8 = 1;
/// Forwarding mode: address and port translation (see `nat`).
pub const FORWARD_NAT: u8 = 2;

/// The VIP's Maglev hash uses the destination port only (all flows to a port of the VIP go
/// to the same backend).
pub const VIP_F_HASH_DST_PORT_ONLY: u8 = 1 << 0;
/// Fragments of this VIP's traffic are balanced: every packet of a fragmented datagram is
/// hashed (and remembered) on addresses and protocol only, so all fragments, the first one
/// with ports and the others without, reach the same backend.
pub const VIP_F_FRAGMENTS: u8 = 1 << 1;
/// This key (port 0) stands for the VIP for fragments only: other packets that reach it
/// are not for a VIP. Lets a port-specific VIP receive its non-first fragments, which carry
/// no port.
pub const VIP_F_FRAGMENTS_ONLY: u8 = 1 << 2;
/// This key (protocol ICMP or ICMPv6, port 0) marks a VIP address: echo requests to it are
/// answered by the balancer.
pub const VIP_F_ADDRESS: u8 = 1 << 3;
/// The VIP's new-flow decisions are handed to the daemon (`SYNC_EVENTS`), which sends them
/// to the fleet's other balancers (`[sync]`). Never on a NAT VIP (its state is not synced).
pub const VIP_F_SYNC: u8 = 1 << 4;
/// New flows to the VIP are limited per source prefix (`defence::SourceLimit` in
/// `SOURCE_LIMITS`).
pub const VIP_F_SOURCE_LIMIT: u8 = 1 << 5;

/// Bytes of the `SYNC_EVENTS` ring buffer: 1 MiB holds 18,724 decisions (56 bytes each with
/// the ring's 8-byte header), 18 ms of new flows at 1M/s, for a reader woken per record.
pub const SYNC_RING_BYTES: u32 = 1 << 20;

/// A new-flow decision: the flow as the connection table keys it (all 40 bytes of the wide
/// form, whatever the family) and the backend the VIP's Maglev table chose.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SyncEvent {
    pub flow: FlowKey,
    pub backend_id: u32,
    pub flow_hash: u32,
}

/// What the program needs to know about a VIP once it matched.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index into `MAGLEV_TABLES` and `VIP_STATS`.
    pub vip_id: u32,
    /// Number of slots of this VIP's Maglev table in use (a prime <= `MAGLEV_CAPACITY`).
    pub table_size: u32,
    /// One of the `FORWARD_*` constants.
    pub forwarding: u8,
    /// `VIP_F_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
}

impl VipMeta {
    /// New-flow decisions are handed to the daemon for its peers (`VIP_F_SYNC`).
    #[inline(always)]
    pub const fn syncs(&self) -> bool {
        self.flags & VIP_F_SYNC != 0
    }

    /// New flows are limited per source prefix (`VIP_F_SOURCE_LIMIT`).
    #[inline(always)]
    pub const fn limits_sources(&self) -> bool {
        self.flags & VIP_F_SOURCE_LIMIT != 0
    }

    /// Flows are hashed on the destination port only (`VIP_F_HASH_DST_PORT_ONLY`).
    #[inline(always)]
    pub const fn hashes_dst_port_only(&self) -> bool {
        self.flags & VIP_F_HASH_DST_PORT_ONLY != 0
    }

    /// Fragments of the VIP's traffic are balanced (`VIP_F_FRAGMENTS`).
    #[inline(always)]
    pub const fn balances_fragments(&self) -> bool {
        self.flags & VIP_F_FRAGMENTS != 0
    }

    /// This key stands for the VIP for fragments only (`VIP_F_FRAGMENTS_ONLY`).
    #[inline(always)]
    pub const fn is_fragments_only(&self) -> bool {
        self.flags & VIP_F_FRAGMENTS_ONLY != 0
    }

    /// This key marks a VIP address, for echo requests (`VIP_F_ADDRESS`).
    #[inline(always)]
    pub const fn is_address(&self) -> bool {
        self.flags & VIP_F_ADDRESS != 0
    }

    /// The VIP encapsulates towards its backends.
    #[inline(always)]
    pub const fn tunnels(&self) -> bool {
        self.forwarding == FORWARD_TUNNEL
    }

    /// The VIP translates addresses (`FORWARD_NAT`).
    #[inline(always)]
    pub const fn translates(&self) -> bool {
        self.forwarding == FORWARD_NAT
    }
}

/// The backend entry holds a live backend. An id without it is free.
pub const BACKEND_F_VALID: u32 = 1 << 0;
/// Failed its health checks: flows pinned to it are re-selected.
pub const BACKEND_F_DOWN: u32 = 1 << 1;
/// Draining: keeps its existing flows, gets no new ones (the daemon leaves it out of the
/// Maglev table; the flag documents the state for readers of the map).
pub const BACKEND_F_DRAINING: u32 = 1 << 2;

/// A backend of one VIP, with its resolved next hop.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u8; 16],
    /// Tunnel mode: the outer source address (of the backend's family). Its last
    /// `tunnel_src_bits` bits are replaced per flow by bits of the flow's hash.
    pub tunnel_src: [u8; 16],
    /// Next hop's MAC address (the backend itself for direct server return, the backend or
    /// the gateway towards it for tunnels).
    pub dst_mac: [u8; 6],
    /// MAC address of the egress interface.
    pub src_mac: [u8; 6],
    /// Egress interface. Equal to the ingress interface: XDP_TX; otherwise XDP_REDIRECT.
    pub ifindex: u32,
    /// The VIP this entry belongs to. A flow remembered for another VIP's backend (an id that
    /// was freed and reused) is re-selected instead of followed.
    pub vip_id: u32,
    /// `BACKEND_F_*`.
    pub flags: u32,
    /// MTU of the egress interface: an encapsulated packet larger than this is answered with
    /// an ICMP "too big" instead.
    pub mtu: u16,
    pub family: u8,
    /// Tunnel mode: how many low bits of `tunnel_src` vary per flow (0: a fixed address).
    pub tunnel_src_bits: u8,
    /// NAT: the port the backend listens on, network byte order (0: the packet's own
    /// destination port).
    pub port: u16,
    pub _pad: [u8; 2],
}

impl Backend {
    /// The entry holds a backend (an id without it is free).
    #[inline(always)]
    pub const fn is_valid(&self) -> bool {
        self.flags & BACKEND_F_VALID != 0
    }

    /// A valid backend that is not down: flows remembered on it stay there.
    #[inline(always)]
    pub const fn is_live(&self) -> bool {
        self.flags & (BACKEND_F_VALID | BACKEND_F_DOWN) == BACKEND_F_VALID
    }
}

/// A flow, as the connection table and the Maglev hash see it. Aligned to 4 bytes (its size
/// is unchanged) so that its addresses are written and read as whole words (`set_addresses`,
/// `src_words`, `dst_words`). (Aligning it to 8 made a packet for no VIP 11 ns dearer,
/// measured: the program then builds it on the stack with more spills.)
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub src_port: u16,
    /// Network byte order.
    pub dst_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// An IPv4 flow as its connection table (`CONN_TABLE_V4`) keys it: 16 bytes instead of
/// `FlowKey`'s 40. Made of 32-bit words, written whole: the kernel hashes and compares keys a
/// word at a time, and a word it reads that the program wrote byte by byte stalls the CPU
/// (no store forwarding). Both measured: 16 bytes instead of 40 and whole words made an
/// established IPv4 packet about 25 ns cheaper.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKeyV4 {
    /// The address's bytes in wire order, read as a native word.
    pub src: u32,
    pub dst: u32,
    /// `src_port << 16 | dst_port`, each in network byte order.
    pub ports: u32,
    pub proto: u32,
}

/// An IPv6 flow as its connection table (`CONN_TABLE_V6`) keys it: `FlowKey`'s fields as
/// whole 32-bit words (see `FlowKeyV4`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKeyV6 {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// `src_port << 16 | dst_port`, each in network byte order.
    pub ports: u32,
    pub proto: u32,
}

impl FlowKey {
    /// Sets both addresses from 32-bit words (each the address's bytes in wire order, read
    /// natively; an IPv4 address is the first word, the others 0).
    #[inline(always)]
    pub fn set_addresses(&mut self, src: [u32; 4], dst: [u32; 4]) {
        // SAFETY: `src` and `dst` are 4-byte aligned (`FlowKey` is align(4), the fields at
        // offsets 0 and 16: asserted below) and 16 bytes long.
        unsafe {
            *(self.src.as_mut_ptr() as *mut [u32; 4]) = src;
            *(self.dst.as_mut_ptr() as *mut [u32; 4]) = dst;
        }
    }

    /// The source address as 32-bit words.
    #[inline(always)]
    pub fn src_words(&self) -> [u32; 4] {
        // SAFETY: as in `set_addresses`.
        unsafe { *(self.src.as_ptr() as *const [u32; 4]) }
    }

    /// The destination address as 32-bit words.
    #[inline(always)]
    pub fn dst_words(&self) -> [u32; 4] {
        // SAFETY: as in `set_addresses`.
        unsafe { *(self.dst.as_ptr() as *const [u32; 4]) }
    }

    #[inline(always)]
    fn ports_word(&self) -> u32 {
        (self.src_port as u32) << 16 | self.dst_port as u32
    }

    /// The IPv4 connection table's key of this flow (meaningful for an IPv4 flow).
    #[inline(always)]
    pub fn v4(&self) -> FlowKeyV4 {
        FlowKeyV4 {
            src: self.src_words()[0],
            dst: self.dst_words()[0],
            ports: self.ports_word(),
            proto: self.proto as u32,
        }
    }

    /// The IPv6 connection table's key of this flow (meaningful for an IPv6 flow).
    #[inline(always)]
    pub fn v6(&self) -> FlowKeyV6 {
        FlowKeyV6 {
            src: self.src_words(),
            dst: self.dst_words(),
            ports: self.ports_word(),
            proto: self.proto as u32,
        }
    }
}

/// What the connection table remembers about a flow: everything its packets need, so that
/// an established flow costs one hash lookup. The VIP is the backend's (`Backend::vip_id`),
/// read with its key from `VIP_SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnEntry {
    pub backend_id: u32,
    /// The flow's hash as its VIP placed it (`hash::vip_flow_hash`): a tunnel's outer header
    /// varies with it, and it is not computed again.
    pub flow_hash: u32,
}

/// A VIP's own key and meta, by VIP id (`VIP_SLOTS`). A flow the connection table knows is
/// forwarded only while its backend's VIP id holds a key that the packet's destination
/// matches (`serves`): a VIP removed, or an id given to another VIP, sends its old flows back
/// through the VIP lookup. An empty slot (family 0) matches nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipSlot {
    pub key: VipKey,
    pub meta: VipMeta,
}

impl VipSlot {
    /// Whether the packet of `flow` (not a fragment) is addressed to this slot's VIP: the
    /// same address, family and protocol, and the VIP's port or any port.
    #[inline(always)]
    pub fn serves(&self, flow: &FlowKey) -> bool {
        let key = &self.key;
        // SAFETY: [u32; 4] has the size of [u8; 16] and no invalid values; the slot's address
        // is 4-byte aligned (`VipKey` is align(4) with `addr` at offset 0: asserted below).
        // Compared a word at a time: the program has no `memcmp`.
        let a = unsafe { &*(key.addr.as_ptr() as *const [u32; 4]) };
        let b = flow.dst_words();
        key.family == flow.family
            && key.proto == flow.proto
            && (key.port == flow.dst_port || key.port == 0)
            && (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
    }
}

/// Traffic counters of a backend or a VIP (one copy per CPU, summed by the daemon).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficStats {
    pub packets: u64,
    /// Bytes of whole frames as received, Ethernet header included.
    pub bytes: u64,
    /// Flows that missed the connection table and were placed by the Maglev table.
    pub new_flows: u64,
}

/// XDP action values, as the kernel defines them.
pub mod xdp_action {
    pub const ABORTED: u32 = 0;
    pub const DROP: u32 = 1;
    pub const PASS: u32 = 2;
    pub const TX: u32 = 3;
    pub const REDIRECT: u32 = 4;
    /// Names of the actions, indexed by value.
    pub const NAMES: [&str; 5] = ["aborted", "drop", "pass", "tx", "redirect"];
}

macro_rules! outcomes {
    ($($(#[$doc:meta])* $variant:ident = $value:literal, $name:literal, $verdict:ident;)+) => {
        /// What happened to a packet, and why: the index of `OUTCOME_STATS`.
        ///
        /// One counter per packet covers both the verdict and its reason, so the packet path
        /// pays for one counter lookup, not two; per-verdict totals are sums of outcomes.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Outcome {
            $($(#[$doc])* $variant = $value,)+
        }

        impl Outcome {
            /// Every outcome, in index order.
            pub const ALL: &'static [Outcome] = &[$(Outcome::$variant,)+];

            /// The name used in logs and metrics.
            pub const fn name(self) -> &'static str {
                match self { $(Outcome::$variant => $name,)+ }
            }

            /// A packet sent on its way: to a backend, or a backend's reply to its client
            /// (not the balancer's own answers).
            pub const fn forwards(self) -> bool {
                matches!(
                    self,
                    Outcome::ForwardedTx
                        | Outcome::ForwardedRedirect
                        | Outcome::NatReplyTx
                        | Outcome::NatReplyRedirect
                )
            }

            /// The outcome of a name (`name`'s inverse).
            pub fn named(name: &str) -> Option<Outcome> {
                Outcome::ALL.iter().copied().find(|o| o.name() == name)
            }

            /// The XDP action returned for packets with this outcome.
            pub const fn verdict(self) -> u32 {
                match self { $(Outcome::$variant => xdp_action::$verdict,)+ }
            }
        }
    };
}

outcomes! {
    /// Forwarded to a backend out of the interface it came in on.
    ForwardedTx = 0, "forwarded_tx", TX;
    /// Forwarded to a backend out of another interface.
    ForwardedRedirect = 1, "forwarded_redirect", REDIRECT;
    /// An ICMP or ICMPv6 echo request to a VIP address, answered by the balancer.
    EchoReplied = 2, "icmp_echo_replied", TX;
    /// Too big to forward once encapsulated: answered with ICMP "fragmentation needed" or
    /// ICMPv6 "packet too big" carrying the MTU that fits.
    TooBigAnswered = 3, "icmp_too_big_sent", TX;
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    NotIp = 4, "not_ip", PASS;
    /// IP, but not addressed to any VIP (address, port and protocol).
    NotVip = 5, "not_vip", PASS;
    /// Shorter than an Ethernet header.
    TruncatedEthernet = 6, "truncated_ethernet", PASS;
    /// The 802.1Q tag is cut short.
    TruncatedVlan = 7, "truncated_vlan", PASS;
    /// The IPv4 header (with its options) is cut short.
    TruncatedIpv4 = 8, "truncated_ipv4", PASS;
    /// IPv4 header length below 20 bytes, or version not 4.
    BadIpv4Header = 9, "bad_ipv4_header", PASS;
    /// The IPv6 header or one of its extension headers is cut short, or the version is not 6.
    TruncatedIpv6 = 10, "truncated_ipv6", PASS;
    /// More IPv6 extension headers than the program walks (`IPV6_EXTENSION_LIMIT`), or one
    /// it does not know.
    Ipv6ExtensionLimit = 11, "ipv6_extension_limit", PASS;
    /// An IP fragment that is not balanced: its VIP does not set `fragments`, or it is not
    /// for a VIP (a non-first fragment carries no port to tell).
    Fragment = 12, "fragment", PASS;
    /// Neither TCP, UDP nor ICMP.
    NotTcpUdp = 13, "not_tcp_udp", PASS;
    /// The TCP, UDP or ICMP header is cut short.
    TruncatedL4 = 14, "truncated_l4", PASS;
    /// ICMP that is neither an echo request to a VIP address nor an error about a VIP's flow.
    IcmpOther = 15, "icmp_other", PASS;
    /// The VIP has no table yet, or its table slot names no live backend.
    NoBackend = 16, "no_backend", DROP;
    /// The backend's egress interface is not in the redirect map.
    NoEgress = 17, "no_egress", DROP;
    /// Too big to forward once encapsulated, and no ICMP answer possible (IPv4 without the
    /// don't-fragment bit).
    TooBig = 18, "too_big", DROP;
    /// The driver left no room in front of the packet for the tunnel header.
    NoHeadroom = 19, "no_headroom", DROP;
    /// A backend's reply on a NAT connection, translated back and sent to the client out of
    /// the interface it came in on.
    NatReplyTx = 20, "nat_reply_tx", TX;
    /// A backend's reply on a NAT connection, translated back and sent to the client out of
    /// another interface.
    NatReplyRedirect = 21, "nat_reply_redirect", REDIRECT;
    /// A new NAT connection found no free SNAT port (`NatCounter` says why).
    NatNoPort = 22, "nat_no_port", DROP;
    /// A backend's reply on a NAT connection that timed out: dropped, never passed to the
    /// local stack (which would answer it with a reset).
    NatReplyExpired = 23, "nat_reply_expired", DROP;
    /// A packet for a NAT VIP that the NAT program could not take (`NAT_PROGRAMS` empty).
    NatUnavailable = 24, "nat_unavailable", DROP;
    /// A new flow over its source prefix's limit (`defence`): dropped.
    SourceLimited = 25, "source_limited", DROP;
    /// A new NAT connection while the CPU is over its cap of new flows (`defence`): refused,
    /// as it cannot be placed without state.
    NatFloodRefused = 26, "nat_flood_refused", DROP;
}

/// Size of `OUTCOME_STATS`.
pub const OUTCOME_COUNT: u32 = 27;

macro_rules! nat_counters {
    ($($(#[$doc:meta])* $variant:ident = $value:literal, $name:literal;)+) => {
        /// Events of NAT connections, beyond the packets' outcomes: the index of `NAT_STATS`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum NatCounter {
            $($(#[$doc])* $variant = $value,)+
        }

        impl NatCounter {
            pub const ALL: &'static [NatCounter] = &[$(NatCounter::$variant,)+];
            pub const fn name(self) -> &'static str {
                match self { $(NatCounter::$variant => $name,)+ }
            }
        }
    };
}

nat_counters! {
    /// A connection created (both entries inserted).
    Created = 0, "created";
    /// Created with the client's own port as the SNAT port.
    PortKept = 1, "port_kept";
    /// Created with another port than the client's (taken or outside the range).
    PortProbed = 2, "port_probed";
    /// No free port among the ones tried (the range is exhausted, or nearly).
    NoPortExhausted = 3, "no_port_exhausted";
    /// The table refused the insert (out of memory).
    NoPortInsertFailed = 4, "no_port_insert_failed";
    /// A full-NAT VIP without a SNAT address (none configured could be resolved).
    NoSnatAddress = 8, "no_snat_address";
    /// A client's packet found its connection timed out, and started a new one.
    ExpiredOnLookup = 5, "expired_on_lookup";
    /// An ICMP error from the client's side about a connection, translated to the backend.
    IcmpForward = 6, "icmp_forward";
    /// An ICMP error from the backend's side about a connection, translated to the client.
    IcmpReply = 7, "icmp_reply";
}

/// Size of `NAT_STATS`.
pub const NAT_COUNTER_COUNT: u32 = 9;

/// How many IPv6 extension headers the program walks before giving up on a packet.
pub const IPV6_EXTENSION_LIMIT: usize = 4;

/// A local address the decapsulating program accepts tunnels to (IPv4 in the first 4 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DecapAddress {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// How many local addresses the decapsulating program holds.
pub const MAX_DECAP_ADDRESSES: u32 = 64;

macro_rules! decap_outcomes {
    ($($(#[$doc:meta])* $variant:ident = $value:literal, $name:literal;)+) => {
        /// What the decapsulating program did with a packet (every verdict is XDP_PASS).
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum DecapOutcome {
            $($(#[$doc])* $variant = $value,)+
        }

        impl DecapOutcome {
            pub const ALL: &'static [DecapOutcome] = &[$(DecapOutcome::$variant,)+];
            pub const fn name(self) -> &'static str {
                match self { $(DecapOutcome::$variant => $name,)+ }
            }
        }
    };
}

decap_outcomes! {
    /// IPv4 in IPv4, decapsulated.
    Ipip = 0, "ipip";
    /// IPv6 in IPv6, decapsulated.
    Ip6ip6 = 1, "ip6ip6";
    /// IPv4 in IPv6, decapsulated.
    Ip4in6 = 2, "ip4in6";
    /// Not a tunnel: passed as it is.
    NotTunnel = 3, "not_tunnel";
    /// A tunnel to an address that is not this host's: passed as it is.
    NotLocal = 4, "not_local";
    /// A tunnel packet cut short: passed as it is.
    Malformed = 5, "malformed";
}

/// Size of `DECAP_STATS`.
pub const DECAP_OUTCOME_COUNT: u32 = 6;

#[cfg(feature = "user")]
mod pod {
    macro_rules! pod {
        ($($t:ty),+) => {$(
            // SAFETY: #[repr(C)], only integers and byte arrays, explicit padding fields: every
            // bit pattern is valid and no byte is uninitialised.
            unsafe impl aya::Pod for $t {}
        )+};
    }
    pod!(
        super::VipKey,
        super::VipMeta,
        super::Backend,
        super::FlowKey,
        super::FlowKeyV4,
        super::FlowKeyV6,
        super::ConnEntry,
        super::SyncEvent,
        super::VipSlot,
        super::TrafficStats,
        super::DecapAddress,
        super::nat::NatEntry,
        super::nat::NatSettings,
        super::defence::FloodSettings,
        super::defence::FloodState,
        super::defence::SourceLimit,
        super::defence::SourceKey,
        super::defence::SourceBucket,
        super::nat::NatVip
    );
}

// The layout is a contract with maps that may outlive the process that wrote them.
const _: () = {
    // `hash::vip_filter_bit` yields 16 bits.
    assert!(VIP_FILTER_WORDS * 64 == 1 << 16);
    // `VipKey::from_words` builds it from five words; `VipSlot::serves` reads its address
    // as words.
    assert!(core::mem::size_of::<VipKey>() == 20);
    assert!(core::mem::offset_of!(VipKey, addr) == 0 && core::mem::align_of::<VipKey>() == 4);
    assert!(core::mem::size_of::<VipMeta>() == 12);
    assert!(core::mem::size_of::<Backend>() == 64);
    assert!(core::mem::size_of::<nat::NatEntry>() == 72);
    assert!(core::mem::offset_of!(nat::NatEntry, last_seen) == 64);
    assert!(core::mem::offset_of!(nat::NatEntry, isn) == 60);
    assert!(core::mem::size_of::<nat::NatSettings>() == 40);
    assert!(core::mem::size_of::<nat::NatVip>() == 8 + 16 * nat::MAX_SNAT_ADDRESSES);
    assert!(nat::MAX_SNAT_ADDRESSES.is_power_of_two());
    assert!(NatCounter::ALL.len() == NAT_COUNTER_COUNT as usize);
    assert!(core::mem::size_of::<FlowKey>() == 40);
    // `FlowKey::set_addresses` and the word readers.
    assert!(core::mem::align_of::<FlowKey>() == 4);
    assert!(core::mem::offset_of!(FlowKey, src) == 0 && core::mem::offset_of!(FlowKey, dst) == 16);
    assert!(core::mem::size_of::<FlowKeyV4>() == 16);
    assert!(core::mem::size_of::<FlowKeyV6>() == 40);
    assert!(core::mem::size_of::<ConnEntry>() == 8);
    assert!(core::mem::size_of::<SyncEvent>() == 48);
    assert!(core::mem::size_of::<VipSlot>() == 32);
    assert!(core::mem::size_of::<TrafficStats>() == 24);
    assert!(Outcome::ALL.len() == OUTCOME_COUNT as usize);
    assert!(DecapOutcome::ALL.len() == DECAP_OUTCOME_COUNT as usize);
    assert!(core::mem::size_of::<DecapAddress>() == 20);
    // Outcomes index OUTCOME_STATS: their values must be 0, 1, 2, ... in order.
    let mut i = 0;
    while i < Outcome::ALL.len() {
        assert!(Outcome::ALL[i] as usize == i);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vip_key_built_from_words_equals_the_one_built_from_fields() {
        let addr = [
            0x20, 0x01, 0x0d, 0xb8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ];
        for (port, proto, family) in [(80u16.to_be(), PROTO_TCP, FAMILY_IPV6), (0, PROTO_ICMP, 4)] {
            let fields = VipKey {
                addr,
                port,
                proto,
                family,
            };
            let words = [0, 4, 8, 12]
                .map(|i| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]));
            assert_eq!(VipKey::from_words(words, port, proto, family), fields);
        }
    }

    #[test]
    fn outcomes_by_name_and_which_forward() {
        for &o in Outcome::ALL {
            assert_eq!(Outcome::named(o.name()), Some(o));
        }
        assert_eq!(Outcome::named("no such outcome"), None);
        let mut forwarding = Outcome::ALL
            .iter()
            .filter(|o| o.forwards())
            .map(|o| o.name());
        for name in [
            "forwarded_tx",
            "forwarded_redirect",
            "nat_reply_tx",
            "nat_reply_redirect",
        ] {
            assert_eq!(forwarding.next(), Some(name));
        }
        assert_eq!(forwarding.next(), None);
    }

    #[test]
    fn connection_keys_keep_every_field_of_the_flow() {
        let mut flow = FlowKey {
            src_port: 40_000u16.to_be(),
            dst_port: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_IPV4,
            ..FlowKey::default()
        };
        flow.src[..4].copy_from_slice(&[192, 0, 2, 1]);
        flow.dst[..4].copy_from_slice(&[10, 0, 0, 1]);
        let key = flow.v4();
        assert_eq!(key.src.to_ne_bytes(), [192, 0, 2, 1]);
        assert_eq!(key.dst.to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(key.proto, u32::from(PROTO_TCP));
        // Every field that tells two flows apart changes the key.
        let changed = [
            FlowKey {
                src_port: 1,
                ..flow
            },
            FlowKey {
                dst_port: 1,
                ..flow
            },
            FlowKey {
                proto: PROTO_UDP,
                ..flow
            },
        ];
        for other in changed {
            assert_ne!(other.v4(), key);
        }
        assert_ne!(
            FlowKey {
                src_port: flow.dst_port,
                dst_port: flow.src_port,
                ..flow
            }
            .v4(),
            key
        );
        let mut v6 = FlowKey {
            family: FAMILY_IPV6,
            ..flow
        };
        v6.src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        v6.dst = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let key = v6.v6();
        for (i, a) in [v6.src, v6.dst].iter().enumerate() {
            let words = if i == 0 { key.src } else { key.dst };
            let mut bytes = [0u8; 16];
            for (j, w) in words.iter().enumerate() {
                bytes[j * 4..j * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            assert_eq!(&bytes, a);
        }
        let mut other = v6;
        other.src[15] = 9;
        assert_ne!(other.v6(), key);
    }
}

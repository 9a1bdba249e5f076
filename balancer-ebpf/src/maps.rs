//! The maps the program reads and the daemon writes. Names, sizes and layouts come from
//! balancer-common; the daemon sizes the connection tables at load time from the config.

use aya_ebpf::{
    btf_maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf,
    },
    macros::btf_map,
};
use balancer_common::{
    defence::{
        FloodSettings, FloodState, SourceBucket, SourceKey, SourceLimit, DEFENCE_COUNTER_COUNT,
    },
    nat::{NatEntry, NatSettings, NatVip},
    Backend, ConnEntry, DecapAddress, FlowKeyV4, FlowKeyV6, SyncEvent, TrafficStats, VipKey,
    VipMeta, VipSlot, DECAP_OUTCOME_COUNT, DEFAULT_CONN_TABLE_SIZE, DEFAULT_NAT_TABLE_SIZE,
    DEFAULT_PENDING_TABLE_SIZE, MAGLEV_CAPACITY, MAGLEV_TABLE_MAP_FLAGS, MAX_BACKENDS,
    MAX_DECAP_ADDRESSES, MAX_EGRESS_INTERFACES, MAX_VIPS, NAT_COUNTER_COUNT, NAT_FILTER_WORDS,
    NAT_PROGRAM_COUNT, OUTCOME_COUNT, SOURCE_RATES_CAPACITY, SYNC_RING_BYTES, VIP_FILTER_WORDS,
    VIP_KEYS_CAPACITY,
};

const VIPS_N: usize = MAX_VIPS as usize;
const BACKENDS_N: usize = MAX_BACKENDS as usize;

/// Hash seed of the Maglev flow hash, set by the daemon when it loads the program.
/// Read through `hash_seed()`: a plain read would be folded to the initial 0 at compile time.
#[no_mangle]
static HASH_SEED: u32 = 0;

#[inline(always)]
pub fn hash_seed() -> u32 {
    // SAFETY: a read of a static; volatile keeps the value the loader writes into .rodata.
    unsafe { core::ptr::read_volatile(&HASH_SEED) }
}

/// Each VIP's key (port 0 for an any-port VIP), the port-0 keys that take fragments, and one
/// address entry (ICMP) per VIP address.
#[btf_map]
pub static VIPS: HashMap<VipKey, VipMeta, { VIP_KEYS_CAPACITY as usize }> = HashMap::new();

/// The prefilter: a bit per bucket of destination addresses, set for every address `VIPS`
/// has a key of (the daemon sets a bit before the key and clears it after). A clear bit: no
/// VIP, without a hash lookup (an array lookup is a pointer computation once verified).
#[btf_map]
pub static VIP_FILTER: Array<u64, { VIP_FILTER_WORDS as usize }> = Array::new();

/// Each VIP's own key and meta, by VIP id: what an established flow's packets are checked
/// against and forwarded with, without a VIPS lookup (the connection table comes first).
/// The daemon writes a slot before the VIP's key and clears it after the key is gone.
#[btf_map]
pub static VIP_SLOTS: Array<VipSlot, VIPS_N> = Array::new();

/// One Maglev table per VIP, indexed by `VipMeta::vip_id`; each slot holds a backend id.
/// The daemon builds a new inner table and swaps it in with one update, so a packet sees
/// either the old table or the new one, never a mix.
#[btf_map]
pub static MAGLEV_TABLES: ArrayOfMaps<
    Array<u32, { MAGLEV_CAPACITY as usize }, { MAGLEV_TABLE_MAP_FLAGS as usize }>,
    VIPS_N,
> = ArrayOfMaps::new();

#[btf_map]
pub static BACKENDS: Array<Backend, BACKENDS_N> = Array::new();

/// Flow -> backend, so that a flow stays on its backend when the tables change: IPv4 flows
/// here, with 16-byte keys (the kernel hashes and compares whole keys), IPv6 flows in
/// `CONN_TABLE_V6`. One LRU shared by all CPUs: with per-CPU LRU lists a single receive
/// queue could use only a fraction of the capacity (the benchmarks measure both: feature
/// `conn-lru-per-cpu`).
#[btf_map]
pub static CONN_TABLE_V4: LruHashMap<
    FlowKeyV4,
    ConnEntry,
    { DEFAULT_CONN_TABLE_SIZE as usize },
    CONN_TABLE_FLAGS,
> = LruHashMap::new();

#[btf_map]
pub static CONN_TABLE_V6: LruHashMap<
    FlowKeyV6,
    ConnEntry,
    { DEFAULT_CONN_TABLE_SIZE as usize },
    CONN_TABLE_FLAGS,
> = LruHashMap::new();

#[cfg(not(feature = "conn-lru-per-cpu"))]
const CONN_TABLE_FLAGS: usize = 0;
/// BPF_F_NO_COMMON_LRU.
#[cfg(feature = "conn-lru-per-cpu")]
const CONN_TABLE_FLAGS: usize = 1 << 1;

/// Egress interfaces other than the ingress one, for XDP_REDIRECT (key: ifindex).
#[btf_map]
pub static EGRESS_DEVICES: DevMapHash<{ MAX_EGRESS_INTERFACES as usize }> = DevMapHash::new();

#[btf_map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats, BACKENDS_N> = PerCpuArray::new();

#[btf_map]
pub static VIP_STATS: PerCpuArray<TrafficStats, VIPS_N> = PerCpuArray::new();

#[btf_map]
pub static OUTCOME_STATS: PerCpuArray<u64, { OUTCOME_COUNT as usize }> = PerCpuArray::new();

/// Addresses the decapsulating program accepts tunnels to (filled by `balancer decap`).
#[btf_map]
pub static DECAP_ADDRESSES: HashMap<DecapAddress, u8, { MAX_DECAP_ADDRESSES as usize }> =
    HashMap::new();

#[btf_map]
pub static DECAP_STATS: PerCpuArray<u64, { DECAP_OUTCOME_COUNT as usize }> = PerCpuArray::new();

/// NAT connections, both directions (see `balancer_common::nat`): IPv4 here, IPv6 in `NAT_V6`.
/// Sized by the daemon at load time, two entries per connection. One LRU shared by all CPUs,
/// like the connection tables: a connection's two entries are written on whichever CPUs its
/// two directions arrive on.
#[btf_map]
pub static NAT_V4: LruHashMap<FlowKeyV4, NatEntry, { 2 * DEFAULT_NAT_TABLE_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
pub static NAT_V6: LruHashMap<FlowKeyV6, NatEntry, { 2 * DEFAULT_NAT_TABLE_SIZE as usize }> =
    LruHashMap::new();

/// NAT connections between their SYN and the client's acknowledgement of the backend's
/// SYN-ACK (`balancer_common::defence`), both entries, keyed as in `NAT_V4`/`NAT_V6`: a flood
/// of SYNs to a NAT VIP churns these, never the NAT tables. Sized by the daemon at load time.
#[btf_map]
pub static NAT_PENDING_V4: LruHashMap<
    FlowKeyV4,
    NatEntry,
    { DEFAULT_PENDING_TABLE_SIZE as usize },
> = LruHashMap::new();

#[btf_map]
pub static NAT_PENDING_V6: LruHashMap<
    FlowKeyV6,
    NatEntry,
    { DEFAULT_PENDING_TABLE_SIZE as usize },
> = LruHashMap::new();

/// The NAT timeouts (one entry), written by the daemon.
#[btf_map]
pub static NAT_SETTINGS: Array<NatSettings, 1> = Array::new();

/// Each NAT VIP's SNAT addresses and ports, by VIP id, written before the VIP's key.
#[btf_map]
pub static NAT_VIPS: Array<NatVip, VIPS_N> = Array::new();

/// The reply filter: a bit per bucket of source addresses, set for every backend of a NAT
/// VIP. A clear bit: the packet is no reply of a NAT connection, without a hash lookup.
#[btf_map]
pub static NAT_FILTER: Array<u64, { NAT_FILTER_WORDS as usize }> = Array::new();

#[btf_map]
pub static NAT_STATS: PerCpuArray<u64, { NAT_COUNTER_COUNT as usize }> = PerCpuArray::new();

/// The NAT programs (`NAT_PROGRAM_FORWARD`, `NAT_PROGRAM_REPLY`), which the balancer hands
/// NAT packets to with a tail call: each has a stack of its own (the NAT paths would not
/// fit the balancer's 512 bytes beside the rest). The daemon fills it when it loads them.
#[btf_map]
pub static NAT_PROGRAMS: ProgramArray<{ NAT_PROGRAM_COUNT as usize }> = ProgramArray::new();

/// The VIP of the packet handed to the NAT forward program, written just before the tail
/// call (per CPU: the packet is this CPU's until the program returns).
#[btf_map]
pub static NAT_HANDOFF: PerCpuArray<VipMeta, 1> = PerCpuArray::new();

/// Where the NAT programs build a connection's keys and entry: map memory, not the stack (the
/// program's 512 bytes do not hold them beside the packet's state; map helpers take keys and
/// values from map memory as well). An IPv4 key is built wide, then narrowed into `key4`.
pub struct NatScratch {
    pub key: FlowKeyV6,
    pub key4: FlowKeyV4,
    pub entry: NatEntry,
}

#[btf_map]
pub static NAT_SCRATCH: PerCpuArray<NatScratch, 1> = PerCpuArray::new();

/// New-flow decisions of VIPs that sync (`VIP_F_SYNC`), for the daemon to send to its peers.
#[btf_map]
pub static SYNC_EVENTS: RingBuf<SyncEvent, { SYNC_RING_BYTES as usize }> = RingBuf::new();

/// Decisions that found the ring full (the daemon counts them as lost).
#[btf_map]
pub static SYNC_STATS: PerCpuArray<u64, 1> = PerCpuArray::new();

/// TCP flows that have sent a SYN and nothing since, with the backend chosen for them
/// (`balancer_common::defence`): a flood of SYNs churns these, never the connection tables.
/// Sized by the daemon at load time.
#[btf_map]
pub static PENDING_V4: LruHashMap<FlowKeyV4, ConnEntry, { DEFAULT_PENDING_TABLE_SIZE as usize }> =
    LruHashMap::new();

#[btf_map]
pub static PENDING_V6: LruHashMap<FlowKeyV6, ConnEntry, { DEFAULT_PENDING_TABLE_SIZE as usize }> =
    LruHashMap::new();

/// The per-CPU cap on new flows with state (one entry, written by the daemon).
#[btf_map]
pub static FLOOD_SETTINGS: Array<FloodSettings, 1> = Array::new();

/// Each CPU's new flows in its current second.
#[btf_map]
pub static FLOOD_STATE: PerCpuArray<FloodState, 1> = PerCpuArray::new();

/// Each VIP's per-source limit, by VIP id (read for VIPs with `VIP_F_SOURCE_LIMIT`, written
/// before the VIP's key).
#[btf_map]
pub static SOURCE_LIMITS: Array<SourceLimit, VIPS_N> = Array::new();

/// Source prefixes' token buckets: their own LRU, so that a flood of sources churns them
/// and nothing else.
#[btf_map]
pub static SOURCE_RATES: LruHashMap<SourceKey, SourceBucket, { SOURCE_RATES_CAPACITY as usize }> =
    LruHashMap::new();

#[btf_map]
pub static DEFENCE_STATS: PerCpuArray<u64, { DEFENCE_COUNTER_COUNT as usize }> = PerCpuArray::new();

/// A new flow's table keys, built once where the slow path looks the flow up in several
/// tables: map memory, not the stack, which the packet's state fills already.
pub struct FlowKeys {
    /// The flow is IPv4: `key4` holds its key, else `key6`.
    pub v4: bool,
    pub key4: FlowKeyV4,
    pub key6: FlowKeyV6,
    /// The source prefix's key and a new bucket (`defence::source_allowed`).
    pub source: SourceKey,
    pub bucket: SourceBucket,
    /// A new-flow decision for the fleet's peers (`select::publish`).
    pub event: SyncEvent,
    /// The flow's choice, as the pending and connection tables hold it.
    pub entry: ConnEntry,
}

#[btf_map]
pub static FLOW_KEYS: PerCpuArray<FlowKeys, 1> = PerCpuArray::new();

impl FlowKeys {
    /// This CPU's keys, set to `flow`'s (`NoBackend` if the per-CPU slot is missing, which
    /// a loaded program never sees).
    #[inline(always)]
    pub fn of(
        flow: &balancer_common::FlowKey,
    ) -> Result<&'static mut FlowKeys, balancer_common::Outcome> {
        let keys = FLOW_KEYS
            .get_ptr_mut(0)
            .ok_or(balancer_common::Outcome::NoBackend)?;
        // SAFETY: this CPU's slot, valid for the program's run; nothing else holds it.
        let keys = unsafe { &mut *keys };
        keys.v4 = flow.family == balancer_common::FAMILY_IPV4;
        if keys.v4 {
            keys.key4 = flow.v4();
        } else {
            keys.key6 = flow.v6();
        }
        Ok(keys)
    }
}

//! Connection-table sync between the balancers of a fleet: each tells its peers where it
//! placed new flows, so that a flow that moves to another balancer (a balancer lost, an ECMP
//! change) reaches the same backend there.
//! - [`wire`]: the messages, their authentication and the replay guard (pure);
//! - the counters here, shared by the daemon's sync tasks and read by the API.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Mutex,
    },
    time::{Duration, Instant},
};

pub mod wire;

use balancer_common::VipMeta;

use crate::plan::desired::DesiredState;

/// Why a message or an entry was not applied, as metric labels.
pub const REJECT_REASONS: [&str; 10] = [
    "truncated",
    "oversized",
    "unauthenticated",
    "malformed",
    "replayed",
    "stale",
    "unknown_peer",
    "unknown_vip",
    "unknown_backend",
    "insert_failed",
];

/// The copy of the peers' tables a fresh balancer waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bulk {
    /// Not asked for: the table was kept (adopted data plane), no peers, or bulk_timeout 0.
    NotNeeded,
    /// Asked of every peer; none has finished yet.
    Waiting,
    /// A peer sent its whole table.
    Complete { peer: SocketAddr, entries: u64 },
    /// No peer finished within bulk_timeout.
    TimedOut,
}

/// What is known of one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerStats {
    /// When its last authentic message arrived.
    pub last_heard: Option<Instant>,
    /// How old its last message was on arrival (its send time against this host's clock).
    pub lag: Option<Duration>,
    pub messages: u64,
    pub entries: u64,
}

/// The sync's counters.
#[derive(Debug)]
pub struct SyncStats {
    pub listen: SocketAddr,
    /// Entries sent, counted once per peer they went to.
    pub entries_sent: AtomicU64,
    pub messages_sent: AtomicU64,
    pub send_errors: AtomicU64,
    /// New-flow decisions the program made that never reached the sender (its ring buffer
    /// was full).
    pub lost: AtomicU64,
    /// Entries in authentic messages.
    pub entries_received: AtomicU64,
    /// Entries inserted into the connection table.
    pub entries_applied: AtomicU64,
    /// Entries for flows the table already had: its own entry is kept.
    pub entries_kept: AtomicU64,
    /// By `REJECT_REASONS`: messages (the first six, and unknown_peer) or entries (the rest).
    pub rejected: [AtomicU64; REJECT_REASONS.len()],
    /// Bulk copies sent to peers that asked.
    pub bulk_sent: AtomicU64,
    pub bulk: Mutex<Bulk>,
    pub peers: Mutex<BTreeMap<SocketAddr, PeerStats>>,
}

impl SyncStats {
    pub fn new(listen: SocketAddr, peers: &[SocketAddr]) -> SyncStats {
        SyncStats {
            listen,
            entries_sent: AtomicU64::new(0),
            messages_sent: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            entries_received: AtomicU64::new(0),
            entries_applied: AtomicU64::new(0),
            entries_kept: AtomicU64::new(0),
            rejected: Default::default(),
            bulk_sent: AtomicU64::new(0),
            bulk: Mutex::new(Bulk::NotNeeded),
            peers: Mutex::new(peers.iter().map(|p| (*p, PeerStats::default())).collect()),
        }
    }

    /// Counts a rejection by its reason (one of `REJECT_REASONS`).
    pub fn reject(&self, reason: &str, n: u64) {
        if let Some(i) = REJECT_REASONS.iter().position(|r| *r == reason) {
            self.rejected[i].fetch_add(n, Relaxed);
        }
    }

    /// Rejections by reason.
    pub fn rejections(&self) -> BTreeMap<&'static str, u64> {
        REJECT_REASONS
            .iter()
            .zip(&self.rejected)
            .map(|(r, n)| (*r, n.load(Relaxed)))
            .collect()
    }

    pub fn bulk(&self) -> Bulk {
        self.bulk
            .lock()
            .map(|b| b.clone())
            .unwrap_or(Bulk::NotNeeded)
    }

    pub fn peers(&self) -> BTreeMap<SocketAddr, PeerStats> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

/// What the sync needs to know of the maps: to send, each backend id's address; to apply,
/// each VIP's meta (for the flow's hash) and its backends' ids by address. Built from the
/// desired state each time it changes; NAT VIPs are left out (their state is not synced).
#[derive(Debug, Default)]
pub struct Directory {
    /// Backend id -> (its address, its VIP's meta).
    pub backends: HashMap<u32, IpAddr>,
    /// (VIP address, port in host order (0: any), protocol) -> the VIP.
    pub vips: HashMap<(IpAddr, u16, u8), DirectoryVip>,
}

#[derive(Debug)]
pub struct DirectoryVip {
    pub meta: VipMeta,
    pub backends: HashMap<IpAddr, u32>,
}

impl Directory {
    pub fn new(desired: &DesiredState) -> Directory {
        let mut directory = Directory::default();
        for vip in desired.vips.iter().filter(|v| v.meta.syncs()) {
            let key = &vip.key;
            let address = address_of(key.addr, key.family);
            let backends: HashMap<IpAddr, u32> =
                vip.backends.iter().map(|b| (b.address, b.id)).collect();
            directory
                .backends
                .extend(vip.backends.iter().map(|b| (b.id, b.address)));
            directory.vips.insert(
                (address, u16::from_be(key.port), key.proto),
                DirectoryVip {
                    meta: vip.meta,
                    backends,
                },
            );
        }
        directory
    }

    /// The VIP a flow to `vip:port` over `proto` belongs to (its port's, else any port's).
    pub fn vip(&self, vip: IpAddr, port: u16, proto: u8) -> Option<&DirectoryVip> {
        self.vips
            .get(&(vip, port, proto))
            .or_else(|| self.vips.get(&(vip, 0, proto)))
    }
}

/// The address of 16 bytes and a family, as the maps hold them.
pub fn address_of(bytes: [u8; 16], family: u8) -> IpAddr {
    if family == balancer_common::FAMILY_IPV4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    }
}

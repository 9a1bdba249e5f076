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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::plan::{
        desired::desired_state,
        ids::Ids,
        inputs::{NextHop, NextHops},
    };

    const FLEET: &str = r#"
[balancer]
[sync]
listen = "10.0.0.100:7946"
peers = ["10.0.0.101:7946"]
key_file = "/etc/balancer/sync.key"
[[vip]]
name = "web"
address = "192.0.2.1"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
backends = [{ address = "10.0.0.1" }, { address = "10.0.0.2" }]
[[vip]]
name = "any"
address = "192.0.2.2"
port = "any"
protocol = "udp"
forwarding = "dsr"
table_size = 251
backends = [{ address = "10.0.0.3" }]
[[vip]]
name = "nat"
address = "192.0.2.3"
port = 80
protocol = "tcp"
forwarding = "nat"
snat = ["10.0.0.200"]
table_size = 251
backends = [{ address = "10.0.0.4", port = 8080 }]
"#;

    fn desired(text: &str) -> DesiredState {
        let config = crate::config::parse(Path::new("fleet.toml"), text).unwrap();
        let hops: NextHops = (1..=4)
            .map(|last| {
                let hop = NextHop {
                    ifindex: 2,
                    interface: "eth0".into(),
                    src_mac: [2, 0, 0, 0, 0, 0xfe],
                    dst_mac: [2, 0, 0, 0, 0, last],
                    gateway: None,
                    mtu: 1500,
                    source: None,
                };
                (IpAddr::from([10, 0, 0, last]), hop)
            })
            .collect();
        desired_state(&config, &[], &hops, &HashMap::new(), &mut Ids::default()).unwrap()
    }

    #[test]
    fn every_vip_but_nat_syncs_and_the_directory_knows_them() {
        let state = desired(FLEET);
        let syncs: Vec<(&str, bool)> = state
            .vips
            .iter()
            .map(|v| (v.name.as_str(), v.meta.syncs()))
            .collect();
        assert_eq!(syncs, [("web", true), ("any", true), ("nat", false)]);
        let directory = Directory::new(&state);
        let web = directory.vip("192.0.2.1".parse().unwrap(), 80, 6).unwrap();
        let id = web.backends[&"10.0.0.2".parse::<IpAddr>().unwrap()];
        assert_eq!(
            directory.backends[&id],
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
        // Another port or protocol of the address: not that VIP.
        assert!(directory.vip("192.0.2.1".parse().unwrap(), 81, 6).is_none());
        assert!(directory
            .vip("192.0.2.1".parse().unwrap(), 80, 17)
            .is_none());
        // An any-port VIP takes every port.
        assert!(directory
            .vip("192.0.2.2".parse().unwrap(), 5353, 17)
            .is_some());
        // NAT VIPs are not synced.
        assert!(directory.vip("192.0.2.3".parse().unwrap(), 80, 6).is_none());
        assert_eq!(directory.backends.len(), 3);

        // Without [sync]: nothing syncs.
        let start = FLEET.find("[sync]").unwrap();
        let end = FLEET.find("[[vip]]").unwrap();
        let plain = format!("{}{}", &FLEET[..start], &FLEET[end..]);
        assert!(desired(&plain).vips.iter().all(|v| !v.meta.syncs()));
    }

    #[test]
    fn rejections_are_counted_by_reason() {
        let stats = SyncStats::new("10.0.0.100:7946".parse().unwrap(), &[]);
        stats.reject("stale", 2);
        stats.reject("unknown_vip", 1);
        stats.reject("no such reason", 5);
        let counted = stats.rejections();
        assert_eq!(counted.len(), REJECT_REASONS.len());
        assert_eq!((counted["stale"], counted["unknown_vip"]), (2, 1));
        assert_eq!(counted.values().sum::<u64>(), 3);
        // The wire's reasons are all among them.
        for reason in wire::Reject::REASONS {
            assert!(REJECT_REASONS.contains(&reason), "{reason}");
        }
    }
}

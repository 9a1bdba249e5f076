//! Connection-table sync between the balancers of a fleet, in network namespaces (the router's
//! resilient nexthop group over two balancers, four backends, direct server return):
//! - the double fault that breaks streams without sync (a backend added, then a balancer lost)
//!   breaks none with it: the survivor had every flow of the lost one from its peer;
//! - messages that are forged, truncated, oversized, replayed, stale, from no peer, or about
//!   no VIP are rejected and counted, and change nothing in the table;
//! - a balancer restarted with an empty table asks its peer for a copy before it announces.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use balancer::sync::wire::{self, Entry, Header, Key, Kind, Protocol};
use balancer_common::{ConnEntry, FlowKey, FlowKeyV4, FAMILY_IPV4};
use balancer_tests::{
    fleet::{fleet_config, fleet_tables, FleetLab, STREAMS},
    http::download_digest_paced,
    prediction::predicted_backends,
    topology::{fleet_backend_addr, fleet_balancer_addr, FLEET_CLIENT_ADDR, FLEET_VIP_ADDR},
};
use serde_json::Value;

fn config(backends: usize, i: usize, key: &Path) -> String {
    fleet_config(backends, &fleet_tables(i, 2, key))
}

fn lab(name: &str) -> FleetLab {
    FleetLab::new(name, 2, false, |i, key| config(3, i, key), &[])
}

/// A counter of balancer `i`'s sync status.
fn sync_counter(lab: &FleetLab, i: usize, key: &str) -> u64 {
    lab.status(i)["sync"][key].as_u64().unwrap_or(0)
}

fn rejected(lab: &FleetLab, i: usize) -> serde_json::Map<String, Value> {
    lab.status(i)["sync"]["rejected"]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn with_sync_a_backend_added_then_a_balancer_lost_breaks_nothing() {
    const FIRST_PORT: u16 = 34_000;
    let mut lab = lab("sync-dbl");
    lab.wait_healthy(3);
    let key = lab.scratch.path("sync.key");
    // 8 s streams: time for the reload and its checks before the loss.
    let streams = lab.streams(FIRST_PORT, 160_000);
    let opened = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    for i in 0..2 {
        lab.scratch
            .write_atomically(&format!("lb{}.toml", i + 1), &config(4, i, &key));
    }
    lab.wait_healthy(4);
    let lost_flows = lab.new_flows(0);
    let kept_flows = lab.new_flows(1);
    let applied = sync_counter(&lab, 1, "entries_applied");
    // The kill comes long after the last stream opened (one sync interval is 50 ms).
    std::thread::sleep(Duration::from_millis(2500).saturating_sub(opened.elapsed()));
    lab.lose(0);
    let results: Vec<Result<String, String>> =
        streams.into_iter().map(|s| s.join().unwrap()).collect();

    let parse = |text: &str| balancer::config::parse(Path::new("fleet.toml"), text).unwrap();
    let before = predicted_backends(
        &parse(&config(3, 0, &key)),
        FLEET_CLIENT_ADDR,
        FLEET_VIP_ADDR,
    );
    let after = predicted_backends(
        &parse(&config(4, 0, &key)),
        FLEET_CLIENT_ADDR,
        FLEET_VIP_ADDR,
    );
    let changed = (0..STREAMS as u16)
        .map(|i| FIRST_PORT + i)
        .filter(|p| before(*p) != after(*p))
        .count();
    let broken: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let share = lost_flows as f64 / (lost_flows + kept_flows) as f64;
    println!(
        "{STREAMS} streams; {changed} move to another backend in the new table; {:.0}% crossed \
         the lost balancer (without sync about {:.0} would break); the survivor had applied \
         {applied} entries of its peer; {} broken",
        share * 100.0,
        changed as f64 * share,
        broken.len()
    );
    assert!(broken.is_empty(), "broken streams: {broken:?}");
    // The double fault was real: streams crossed the lost balancer, and the new table
    // moves some of them.
    assert!(
        changed > 0 && (0.2..=0.8).contains(&share),
        "{changed} changed, share {share}"
    );
    assert!(
        applied + 5 >= lost_flows,
        "the survivor applied {applied} entries; its peer placed {lost_flows} flows"
    );
    let rejected = rejected(&lab, 1);
    assert!(rejected.values().all(|n| n == 0), "{rejected:?}");
    lab.stop_all();
}

/// What a test sends: signed with `key` (or not), as sender `sender`.
struct Forger {
    key: Key,
    sender: u64,
    epoch: u64,
    seq: u64,
}

impl Forger {
    fn new(key: &[u8], sender: u64) -> Forger {
        Forger {
            key: Key::new(key).unwrap(),
            sender,
            epoch: now_ns(),
            seq: 0,
        }
    }

    /// A batch of `entries`, sent `sent_ns` (now if `None`).
    fn message(&mut self, entries: &[Entry], sent_ns: Option<u64>) -> Vec<u8> {
        self.seq += 1;
        let header = Header {
            kind: Kind::Entries,
            sender: self.sender,
            epoch: self.epoch,
            seq: self.seq,
            sent_ns: sent_ns.unwrap_or_else(now_ns),
        };
        wire::encode(&self.key, &header, entries).unwrap()
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// The client's flow from `port` to the VIP, placed on backend 1.
fn entry(port: u16, vip: IpAddr) -> Entry {
    Entry {
        proto: Protocol::Tcp,
        src: FLEET_CLIENT_ADDR.into(),
        src_port: port,
        vip,
        vip_port: 80,
        backend: fleet_backend_addr(0).into(),
    }
}

/// Balancer `i`'s IPv4 connection table, opened from its pins.
fn conn_table(lab: &FleetLab, i: usize) -> BpfHashMap<MapData, FlowKeyV4, ConnEntry> {
    let dir = lab.runs[i]
        .pin_dir()
        .join("eth0")
        .join(format!("v{}", balancer_common::LAYOUT_VERSION));
    let data = MapData::from_pin(dir.join("CONN_TABLE_V4")).expect("the pinned connection table");
    BpfHashMap::try_from(Map::LruHashMap(data)).expect("an LRU hash map")
}

fn key_of(port: u16) -> FlowKeyV4 {
    let mut flow = FlowKey {
        src_port: port.to_be(),
        dst_port: 80u16.to_be(),
        proto: 6,
        family: FAMILY_IPV4,
        ..FlowKey::default()
    };
    flow.src[..4].copy_from_slice(&FLEET_CLIENT_ADDR.octets());
    flow.dst[..4].copy_from_slice(&FLEET_VIP_ADDR.octets());
    flow.v4()
}

#[test]
fn sync_rejects_what_it_cannot_trust_and_copies_a_table_to_a_restarted_peer() {
    let mut lab = lab("sync-sec");
    lab.wait_healthy(3);
    // Each balancer's start-up copy of its peer's table done (else a copy asked for at
    // start but served after the flows below would bring them again, as entries kept).
    let deadline = Instant::now() + Duration::from_secs(15);
    while (0..2).any(|i| {
        lab.status(i)["sync"]["bulk"]
            .as_str()
            .is_none_or(|b| !b.starts_with("complete"))
    }) {
        assert!(
            Instant::now() < deadline,
            "bulk copies: {:?}",
            (0..2)
                .map(|i| lab.status(i)["sync"]["bulk"].clone())
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let key = std::fs::read(lab.scratch.path("sync.key")).unwrap();
    let target: SocketAddr = (fleet_balancer_addr(0), 7946).into();
    let vip: IpAddr = FLEET_VIP_ADDR.into();
    // Some real flows first, for the bulk copy below.
    let to: SocketAddr = (FLEET_VIP_ADDR, 80).into();
    let fetched: Vec<_> = (0..20u16)
        .map(|i| {
            lab.topology
                .client
                .spawn(move || download_digest_paced(to, 37_000 + i, 5_000, None))
        })
        .collect();
    assert!(fetched.into_iter().all(|f| f.join().unwrap().is_ok()));
    let before = rejected(&lab, 0);
    assert!(before.values().all(|n| n == 0), "{before:?}");
    // (Placed by either balancer: with sync both have it after one interval.)
    std::thread::sleep(Duration::from_millis(300));
    let own = conn_table(&lab, 0)
        .get(&key_of(37_000), 0)
        .expect("balancer 1 placed the flow from port 37000");

    // From the peer's namespace (its address, another port): the attacker is on the path.
    let peer_ns = &lab.topology.balancers[1];
    let sent = peer_ns.run(move || {
        let socket = UdpSocket::bind((fleet_balancer_addr(1), 0)).unwrap();
        let send = |bytes: &[u8]| socket.send_to(bytes, target).unwrap();
        let mut good = Forger::new(&key, 7);
        let accepted = good.message(&[entry(41_001, vip)], None);
        send(&accepted);
        // The same message again: a replay.
        send(&accepted);
        // Signed with another key: forged.
        let mut forger = Forger::new(&[0x55; 32], 8);
        send(&forger.message(&[entry(41_002, vip)], None));
        // Cut short: truncated (shorter than a header and a tag), or its tag broken.
        let cut = good.message(&[entry(41_003, vip)], None);
        send(&cut[..50]);
        send(&cut[..cut.len() - 1]);
        // One bit flipped in an entry: its tag no longer matches.
        let mut flipped = good.message(&[entry(41_004, vip)], None);
        flipped[45] ^= 1;
        send(&flipped);
        // Too long to be a message.
        send(&[0u8; 1500]);
        // Sent a minute ago by a sender never heard of: stale.
        let mut old = Forger::new(&key, 9);
        send(&old.message(&[entry(41_005, vip)], Some(now_ns() - 60_000_000_000)));
        // Authentic, about a VIP the balancer does not have.
        send(&good.message(&[entry(41_006, "10.90.100.99".parse().unwrap())], None));
        // Authentic, about a flow the balancer placed itself, on another backend: its own
        // entry stays.
        let mut other = entry(37_000, vip);
        other.backend = fleet_backend_addr(2).into();
        send(&good.message(&[other], None));
        7
    });
    // From the client's namespace: authentic, but not from a peer.
    let key = std::fs::read(lab.scratch.path("sync.key")).unwrap();
    lab.topology
        .client
        .ip(&["route", "add", "10.91.0.0/24", "via", "10.90.0.254"]);
    lab.topology.client.run(move || {
        let socket = UdpSocket::bind((FLEET_CLIENT_ADDR, 0)).unwrap();
        let mut outsider = Forger::new(&key, 10);
        socket
            .send_to(&outsider.message(&[entry(41_007, vip)], None), target)
            .unwrap();
    });
    let expected: &[(&str, u64)] = &[
        ("replayed", 1),
        ("unauthenticated", 3),
        ("truncated", 1),
        ("oversized", 1),
        ("stale", 1),
        ("unknown_vip", 1),
        ("unknown_peer", 1),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    let counted = loop {
        let counted = rejected(&lab, 0);
        let done = expected
            .iter()
            .all(|(reason, n)| counted.get(*reason).and_then(Value::as_u64) == Some(*n));
        if done || Instant::now() > deadline {
            break counted;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("{sent} kinds of bad message sent; rejected: {counted:?}");
    for (reason, n) in expected {
        assert_eq!(
            counted.get(*reason).and_then(Value::as_u64),
            Some(*n),
            "{reason}: {counted:?}"
        );
    }
    assert_eq!(counted["malformed"], 0);
    assert_eq!(counted["unknown_backend"], 0);
    // The table: the one authentic message's flow, none of the others; its own entries kept.
    let table = conn_table(&lab, 0);
    assert_eq!(
        table.get(&key_of(37_000), 0).ok(),
        Some(own),
        "an own entry overwritten"
    );
    assert_eq!(sync_counter(&lab, 0, "entries_kept"), 1);
    assert!(
        table.get(&key_of(41_001), 0).is_ok(),
        "the authentic entry was not applied"
    );
    for port in 41_002..=41_007 {
        assert!(
            table.get(&key_of(port), 0).is_err(),
            "the flow from port {port} is in the table"
        );
    }

    // Balancer 2 stopped (its data plane removed), then started again with an empty table:
    // it asks balancer 1 for a copy, and announces once it has it.
    let placed = lab.new_flows(0);
    lab.balancers[1].take().unwrap().stop();
    assert!(
        lab.announced_routes(1).is_empty(),
        "{}",
        lab.announced_routes(1)
    );
    // What a crashed daemon could have left in its table (a VIP since removed), and a route
    // of someone else's there: the first goes at start, the second stays.
    for (address, proto) in [("10.90.100.99/32", "250"), ("10.90.100.98/32", "static")] {
        lab.topology.balancers[1].ip(&[
            "route",
            "add",
            "blackhole",
            address,
            "table",
            "100",
            "proto",
            proto,
        ]);
    }
    let started = Instant::now();
    let restarted = lab.start(1, &[]);
    lab.balancers[1] = Some(restarted);
    let deadline = Instant::now() + Duration::from_secs(10);
    let bulk = loop {
        let bulk = lab.status(1)["sync"]["bulk"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if bulk.starts_with("complete") || Instant::now() > deadline {
            break bulk;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "balancer 2 restarted: bulk copy {bulk} within {:?}",
        started.elapsed()
    );
    assert!(
        bulk.starts_with("complete (") && bulk.contains("from 10.91.0.2:7946"),
        "{bulk}; balancer 1's sync: {:#}; balancer 2's: {:#}",
        lab.status(0)["sync"],
        lab.status(1)["sync"]
    );
    let copied: u64 = bulk["complete (".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Balancer 1's table: what it placed (or the peer sent it before it stopped), and the
    // one authentic forged entry.
    assert!(
        copied >= 1 && copied + 5 >= placed.min(20),
        "copied {copied}, placed {placed}"
    );
    let status = lab.status(1);
    assert_eq!(status["announce"]["awaiting_sync"], false);
    assert_eq!(status["vips"][0]["announced"], true);
    let log = lab.balancers[1].as_ref().unwrap().log();
    assert!(
        log.contains("connection-table sync: 10.91.0.2:7946 sent its connection table"),
        "{log}"
    );
    let routes = lab.announced_routes(1);
    assert!(
        routes.contains(&format!("blackhole {FLEET_VIP_ADDR} proto 250"))
            && !routes.contains("10.90.100.99")
            && routes.contains("10.90.100.98 proto static"),
        "{routes}"
    );
    lab.stop_all();
}

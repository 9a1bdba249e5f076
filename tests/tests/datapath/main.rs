//! Datapath fixtures: the real compiled XDP object, loaded into the kernel with the maps
//! filled by the daemon's own code, and packets run through it with BPF_PROG_TEST_RUN.
//!
//! The fixtures are data (`fixtures/`, one file per feature): one line of prose, the packet
//! (built with a packet library), and where it must end up. This runner checks each in a
//! fresh world: the verdict, the exact output bytes (built with the packet library from the
//! input and the world's description, never copied from the program's output, checksums
//! verified), the connection table's entry, and the counters that must move: exactly one
//! outcome counter, and the VIP's and backend's traffic counters by exactly this packet.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios and fixture tables read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

mod defence;
mod fixtures;
mod fragmented_flows;
mod nat;
mod sync;

use std::net::IpAddr;

use balancer_common::{hash::vip_flow_hash, tunnel, xdp_action, Outcome, TrafficStats};
use balancer_tests::{
    datapath::{
        packet::{assert_checksums_valid, forwarded, Encapsulation},
        world::{load_every_program, Run, TunnelSource, World, WorldOptions},
    },
    netns::{remove_stale, require_root, Netns},
};
use fixtures::{Expect, Fixture, CONFIG, REACH};

/// A network namespace of the test's own with a veth pair: its `lo` (ifindex 1) is the
/// ingress interface of every test run, and `fx0` the other interface, which
/// `Reach::OtherInterface` backends are behind. Removed on drop.
struct FixtureNetwork {
    ns: Netns,
    other_ifindex: u32,
}

impl FixtureNetwork {
    fn create(name: &str) -> FixtureNetwork {
        remove_stale("lbt-");
        let ns = Netns::create(&format!("lbt-{}-{name}", std::process::id()));
        ns.ip(&["link", "add", "fx0", "type", "veth", "peer", "name", "fx1"]);
        ns.ip(&["link", "set", "fx0", "up"]);
        ns.ip(&["link", "set", "fx1", "up"]);
        let out = ns.exec("cat", &["/sys/class/net/fx0/ifindex"]);
        let other_ifindex = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        FixtureNetwork { ns, other_ifindex }
    }
}

/// A fresh program and maps, filled from the fixtures' config. Call it inside the namespace.
fn world(other_ifindex: u32) -> World {
    World::load(
        CONFIG,
        REACH,
        WorldOptions {
            other_ifindex: Some(other_ifindex),
            ..WorldOptions::default()
        },
    )
}

/// Every program of the object passes the verifier, not only the one the fixtures run.
#[test]
fn every_program_of_the_object_loads() {
    require_root("loading the XDP programs");
    load_every_program().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn datapath_fixtures() {
    require_root("the datapath fixtures (BPF_PROG_TEST_RUN)");
    let network = FixtureNetwork::create("fx");
    let other = network.other_ifindex;
    let cases = network.ns.run(move || {
        let fixtures = fixtures::all();
        // One program for every case (each load is a run of the verifier, seconds under
        // emulation), reset to a fresh world's state before each, so that cases do not see
        // each other.
        let mut world = world(other);
        for fixture in &fixtures {
            world.reset(CONFIG);
            check(&mut world, fixture);
            println!("ok: {}", fixture.case);
        }
        fixtures.len()
    });
    println!("{cases} datapath fixtures passed");
}

#[test]
fn counters_add_up_over_a_sequence_of_packets() {
    require_root("the datapath fixtures (BPF_PROG_TEST_RUN)");
    let network = FixtureNetwork::create("fx-counters");
    let other = network.other_ifindex;
    network.ns.run(move || {
        let sequence = fixtures::counted_sequence();
        let case = sequence.case;
        let world = world(other);
        let before = world.counters();
        let mut bytes = 0;
        for (frame, verdict) in &sequence.packets {
            assert_eq!(world.run(frame).verdict, *verdict, "{case}: verdict");
            if *verdict == xdp_action::TX {
                bytes += frame.len() as u64;
            }
        }
        let after = world.counters();
        let expected = TrafficStats {
            packets: sequence.forwarded,
            bytes,
            new_flows: sequence.new_flows,
        };
        let id = world.backend_id(sequence.vip, sequence.backend);
        assert_eq!(
            delta(&after.backends[&id], &before.backends[&id]),
            expected,
            "{case}: backend counters"
        );
        let vip_id = world.vip_id(sequence.vip);
        assert_eq!(
            delta(&after.vips[&vip_id], &before.vips[&vip_id]),
            expected,
            "{case}: VIP counters"
        );
        for &o in Outcome::ALL {
            let expected = sequence
                .outcomes
                .iter()
                .find(|(counted, _)| *counted == o)
                .map_or(0, |(_, n)| *n);
            assert_eq!(
                after.outcome(o) - before.outcome(o),
                expected,
                "{case}: outcome counter {}",
                o.name()
            );
        }
        assert_eq!(
            after.outcomes.iter().sum::<u64>() - before.outcomes.iter().sum::<u64>(),
            sequence.packets.len() as u64,
            "{case}: every packet counted under exactly one outcome"
        );
    });
}

fn check(world: &mut World, fixture: &Fixture) {
    let case = fixture.case;
    let placed = (fixture.prepare)(world, &fixture.packet);
    let input = match &fixture.raw {
        Some(raw) => raw(&fixture.packet),
        None => fixture.packet.bytes(),
    };
    let expect = (fixture.expect)(world, &fixture.packet, placed);
    let before = world.counters();
    let conn_before = match &expect {
        Expect::Forwarded { flow, .. } => world.conn(flow),
        _ => None,
    };
    let Run { verdict, output } = world.run(&input);
    let after = world.counters();

    let outcome = match &expect {
        Expect::Passed(o) => {
            assert_eq!(verdict, xdp_action::PASS, "{case}: verdict");
            assert_eq!(
                output, input,
                "{case}: a passed packet must leave unchanged"
            );
            *o
        }
        Expect::Dropped(o) => {
            assert_eq!(verdict, xdp_action::DROP, "{case}: verdict");
            *o
        }
        Expect::Answered {
            outcome,
            output: expected,
        } => {
            assert_eq!(verdict, xdp_action::TX, "{case}: verdict");
            assert_eq!(&output, expected, "{case}: answer bytes");
            assert_checksums_valid(&output, case);
            *outcome
        }
        Expect::Forwarded {
            vip,
            backend,
            flow,
            new_flow,
            redirect,
        } => {
            let (want_verdict, o) = if *redirect {
                (xdp_action::REDIRECT, Outcome::ForwardedRedirect)
            } else {
                (xdp_action::TX, Outcome::ForwardedTx)
            };
            assert_eq!(verdict, want_verdict, "{case}: verdict");
            // The outer header's flow-dependent fields, from the shared functions the
            // program uses.
            let meta = world.vip_meta(vip);
            let tunnel = meta.tunnels().then(|| {
                let hash = vip_flow_hash(&meta, flow, world.hash_seed());
                Encapsulation {
                    source: outer_source(world.tunnel_source(vip, *backend), hash),
                    destination: *backend,
                    flow_label: tunnel::flow_label(hash),
                }
            });
            assert_eq!(
                output,
                forwarded(&input, world.neighbour_mac(*backend), tunnel),
                "{case}: output bytes"
            );
            assert_checksums_valid(&output, case);
            let id = world.backend_id(vip, *backend);
            let written = written(&input);
            if written == Written::Nothing {
                assert_eq!(
                    world.conn(flow),
                    conn_before,
                    "{case}: connection table entry"
                );
                assert_eq!(world.pending(flow), None, "{case}: pending entry");
            } else if written == Written::Pending {
                // A SYN claims no slot in the connection table: its choice waits in the
                // pending table, or rewrites the entry of a reused 5-tuple in place.
                if conn_before.is_some() {
                    assert_eq!(world.conn(flow), Some(id), "{case}: reused entry rewritten");
                    assert_eq!(world.pending(flow), None, "{case}: pending entry");
                } else {
                    assert_eq!(world.pending(flow), Some(id), "{case}: pending entry");
                    assert_eq!(world.conn(flow), None, "{case}: connection table entry");
                }
            } else {
                assert_eq!(world.conn(flow), Some(id), "{case}: connection table entry");
            }
            let expected = TrafficStats {
                packets: 1,
                bytes: input.len() as u64,
                // An ICMP error is no flow of its own.
                new_flows: u64::from(*new_flow && written != Written::Nothing),
            };
            assert_eq!(
                delta(&after.backends[&id], &before.backends[&id]),
                expected,
                "{case}: backend counters"
            );
            let vip_id = world.vip_id(vip);
            assert_eq!(
                delta(&after.vips[&vip_id], &before.vips[&vip_id]),
                expected,
                "{case}: VIP counters"
            );
            // No other backend or VIP counted anything.
            for (other, stats) in &after.backends {
                if *other != id {
                    assert_eq!(
                        stats, &before.backends[other],
                        "{case}: backend {other} counted"
                    );
                }
            }
            for (other, stats) in &after.vips {
                if *other != vip_id {
                    assert_eq!(stats, &before.vips[other], "{case}: VIP {other} counted");
                }
            }
            o
        }
    };
    if !matches!(expect, Expect::Forwarded { .. }) {
        assert_eq!(
            after.backends, before.backends,
            "{case}: no backend counts a packet that is not forwarded"
        );
        assert_eq!(
            after.vips, before.vips,
            "{case}: no VIP counts a packet that is not forwarded"
        );
    }
    for &o in Outcome::ALL {
        let moved = after.outcome(o) - before.outcome(o);
        assert_eq!(
            moved,
            (o == outcome) as u64,
            "{case}: outcome counter {}",
            o.name()
        );
    }
    assert_eq!(
        outcome.verdict(),
        verdict,
        "{case}: outcome and verdict agree"
    );
}

/// The outer source of a tunnel for a flow with this hash.
fn outer_source(source: TunnelSource, hash: u32) -> IpAddr {
    let bits = source.varied_bits;
    match source.address {
        IpAddr::V4(a) => IpAddr::from(tunnel::source_v4(a.octets(), bits, hash)),
        IpAddr::V6(a) => IpAddr::from(tunnel::source_v6(a.octets(), bits, hash)),
    }
}

fn delta(after: &TrafficStats, before: &TrafficStats) -> TrafficStats {
    TrafficStats {
        packets: after.packets - before.packets,
        bytes: after.bytes - before.bytes,
        new_flows: after.new_flows - before.new_flows,
    }
}

/// What a forwarded packet writes to the state tables.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    /// An ICMP error: nothing (it only follows its flow).
    Nothing,
    /// A TCP SYN, not fragmented: the pending table.
    Pending,
    /// Anything else: the connection table.
    Conn,
}

fn written(frame: &[u8]) -> Written {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let Ok(packet) = SlicedPacket::from_ethernet(frame) else {
        return Written::Conn;
    };
    let fragmented = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => ip.header().is_fragmenting_payload(),
        Some(NetSlice::Ipv6(ip)) => ip.payload().fragmented,
        _ => false,
    };
    match &packet.transport {
        Some(TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_)) => Written::Nothing,
        Some(TransportSlice::Tcp(tcp)) if tcp.syn() && !tcp.ack() && !fragmented => {
            Written::Pending
        }
        _ => Written::Conn,
    }
}

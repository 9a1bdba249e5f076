//! The state tables' defences in the program (`balancer_common::defence`): a SYN waits in the
//! pending table and claims a connection-table slot only at its flow's next packet; a flood
//! of SYNs churns the pending table and nothing else; a SYN reusing a remembered 5-tuple
//! rewrites its entry in place; over the per-CPU cap, new flows are placed by the Maglev
//! table alone (NAT connections refused); over its source prefix's limit, a new flow is
//! dropped.

use std::net::IpAddr;

use balancer_common::{defence::DefenceCounter, xdp_action, Outcome};
use balancer_tests::{
    datapath::packet::{tcp, udp},
    netns::require_root,
};

use crate::{
    fixtures::{v4, CONFIG},
    FixtureNetwork,
};

const WEB: IpAddr = v4([10, 100, 0, 1]);
const DNS: IpAddr = v4([10, 100, 0, 2]);

/// A source address of its own for each `i` (10.200.0.0/16 and up: no /24 shared with the
/// fixtures' client).
fn source(i: u32) -> IpAddr {
    IpAddr::from((0x0ac8_0000u32 + i).to_be_bytes())
}

#[test]
fn a_syn_flood_leaves_the_connection_table_alone() {
    require_root("the datapath fixtures (BPF_PROG_TEST_RUN)");
    let network = FixtureNetwork::create("fx-flood");
    let other = network.other_ifindex;
    network.ns.run(move || {
        let mut world = crate::world(other);
        // The cap out of reach: every SYN below goes to the pending table.
        world.set_config(&format!(
            "{CONFIG}\n[flood]\nnew_flows_per_cpu = 10000000\n"
        ));
        // 500 established flows, each promoted by its first packet after the SYN.
        for port in 0..500u16 {
            let syn = tcp(WEB, 20_000 + port, 80);
            assert_eq!(world.run(&syn.bytes()).verdict, xdp_action::TX);
            assert_eq!(world.run(&syn.ack().bytes()).verdict, xdp_action::TX);
        }
        assert_eq!(world.conn_count(), 500);
        let before = world.counters();
        assert_eq!(before.defence(DefenceCounter::Promoted), 500);
        // 20,000 SYNs from as many sources: five times the connection table (4,096), twenty
        // times the pending table (1,024).
        for i in 0..20_000u32 {
            let syn = tcp(WEB, 1024 + (i % 60_000) as u16, 80).from(source(i));
            assert_eq!(world.run(&syn.bytes()).verdict, xdp_action::TX);
        }
        assert_eq!(world.conn_count(), 500, "the connection table is as it was");
        for port in 0..500u16 {
            let flow = tcp(WEB, 20_000 + port, 80).flow();
            assert!(world.conn(&flow).is_some(), "established flow {port} lost");
        }
        let after = world.counters();
        let delta = |c| after.defence(c) - before.defence(c);
        assert_eq!(delta(DefenceCounter::Pending), 20_000, "each SYN pending");
        assert_eq!(delta(DefenceCounter::Capped), 0);
        // A legitimate client during the flood: its ACK finds its SYN's choice.
        let syn = tcp(WEB, 30_000, 80);
        world.run(&syn.bytes());
        assert!(world.pending(&syn.flow()).is_some(), "pending");
        world.run(&syn.ack().bytes());
        assert!(world.conn(&syn.flow()).is_some(), "promoted");
        assert_eq!(world.pending(&syn.flow()), None, "moved, not copied");
    });
}

#[test]
fn a_reused_port_rewrites_its_entry_in_place() {
    require_root("the datapath fixtures (BPF_PROG_TEST_RUN)");
    let network = FixtureNetwork::create("fx-reuse");
    let other = network.other_ifindex;
    network.ns.run(move || {
        let mut world = crate::world(other);
        let syn = tcp(WEB, 40_100, 80);
        let flow = syn.flow();
        let choice = world.table_choice("web", &flow);
        let other_backend = ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
            .into_iter()
            .map(|a| a.parse::<IpAddr>().unwrap())
            .find(|a| *a != choice)
            .unwrap();
        world.remember("web", &flow, other_backend);
        let reused = world.counters().defence(DefenceCounter::Reused);
        world.run(&syn.bytes());
        assert_eq!(world.conn(&flow), Some(world.backend_id("web", choice)));
        assert_eq!(world.pending(&flow), None);
        assert_eq!(world.counters().defence(DefenceCounter::Reused), reused + 1);
    });
}

#[test]
fn over_the_cap_new_flows_are_placed_without_state() {
    require_root("the datapath fixtures (BPF_PROG_TEST_RUN)");
    let network = FixtureNetwork::create("fx-cap");
    let other = network.other_ifindex;
    network.ns.run(move || {
        let mut world = crate::world(other);
        world.set_config(&format!("{CONFIG}\n[flood]\nnew_flows_per_cpu = 100\n"));
        let before = world.counters();
        // 600 new flows within a second (a CPU's window): at most 100 per CPU write state.
        let cpus = aya::util::nr_cpus().unwrap() as u64;
        for port in 0..300u16 {
            let syn = tcp(WEB, 41_000 + port, 80);
            assert_eq!(world.run(&syn.bytes()).verdict, xdp_action::TX);
            let datagram = udp(DNS, 41_000 + port, 53);
            assert_eq!(world.run(&datagram.bytes()).verdict, xdp_action::TX);
        }
        let after = world.counters();
        let capped = after.defence(DefenceCounter::Capped) - before.defence(DefenceCounter::Capped);
        assert!(capped >= 600 - 100 * cpus, "{capped} capped");
        let with_state = (0..300u16)
            .filter(|p| world.pending(&tcp(WEB, 41_000 + p, 80).flow()).is_some())
            .count() as u64
            + (0..300u16)
                .filter(|p| world.conn(&udp(DNS, 41_000 + p, 53).flow()).is_some())
                .count() as u64;
        assert_eq!(with_state, 600 - capped, "a capped flow writes nothing");
        // Every flow was forwarded all the same: to its Maglev choice.
        let forwarded = after.outcome(Outcome::ForwardedTx) - before.outcome(Outcome::ForwardedTx);
        assert_eq!(forwarded, 600);
    });
}

#[test]
fn a_source_over_its_limit_is_dropped_and_others_are_not() {
    require_root("the datapath fixtures (BPF_PROG_TEST_RUN)");
    let network = FixtureNetwork::create("fx-limit");
    let other = network.other_ifindex;
    network.ns.run(move || {
        let mut world = crate::world(other);
        let limited = CONFIG.replacen(
            "table_size = 4093\n",
            "table_size = 4093\nsource_limit = { rate = 1, burst = 5 }\n",
            1,
        );
        world.set_config(&limited);
        assert!(world.vip_meta("web").limits_sources());
        let before = world.counters();
        // One /24: five SYNs in a burst pass, the rest of 20 are dropped (a second's rate
        // of 1 cannot refill in the time this takes, but allow one).
        let verdicts: Vec<u32> = (0..20u32)
            .map(|i| {
                let syn = tcp(WEB, 42_000 + i as u16, 80).from(source(i % 200));
                world.run(&syn.bytes()).verdict
            })
            .collect();
        let passed = verdicts.iter().filter(|v| **v == xdp_action::TX).count();
        assert!(
            (5..=6).contains(&passed),
            "{passed} of 20 passed: {verdicts:?}"
        );
        let after = world.counters();
        let limited =
            after.outcome(Outcome::SourceLimited) - before.outcome(Outcome::SourceLimited);
        assert_eq!(limited as usize, 20 - passed);
        // Another /24 is not held back, nor another VIP, nor a flow's packets after its SYN.
        let elsewhere = tcp(WEB, 42_100, 80).from(source(256));
        assert_eq!(world.run(&elsewhere.bytes()).verdict, xdp_action::TX);
        let dns = udp(DNS, 42_101, 53).from(source(1));
        assert_eq!(world.run(&dns.bytes()).verdict, xdp_action::TX);
        let established = tcp(WEB, 42_000, 80).from(source(0)).ack();
        assert_eq!(world.run(&established.bytes()).verdict, xdp_action::TX);
    });
}

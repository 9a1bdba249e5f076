//! Connection-table sync in the program: a new-flow decision of a VIP that syncs is handed
//! to the daemon through the `SYNC_EVENTS` ring, once, with the flow and the chosen backend,
//! when it enters the connection table (a TCP flow at its first packet after the SYN: a
//! flood of SYNs sends nothing to the peers); established packets, VIPs that do not sync and
//! NAT VIPs hand over nothing.

use balancer_tests::{datapath::packet::tcp, netns::require_root};

use crate::FixtureNetwork;

/// The fixtures' config with `[sync]`: every VIP syncs but the NAT ones.
fn syncing() -> String {
    format!(
        "{}\n[sync]\nlisten = \"10.0.0.2:7946\"\npeers = [\"10.0.0.3:7946\"]\nkey_file = \"/etc/balancer/sync.key\"\n",
        crate::fixtures::CONFIG
    )
}

#[test]
fn new_flow_decisions_reach_the_sync_ring_once() {
    require_root("the datapath fixtures (BPF_PROG_TEST_RUN)");
    let network = FixtureNetwork::create("fx-sync");
    let other = network.other_ifindex;
    network.ns.run(move || {
        let vip = "10.100.0.1".parse().unwrap();
        // Without [sync]: nothing is handed over.
        let mut world = crate::world(other);
        let syn = tcp(vip, 40_000, 80);
        assert_eq!(
            world.run(&syn.bytes()).verdict,
            balancer_common::xdp_action::TX
        );
        assert!(world.sync_events().is_empty(), "a VIP without VIP_F_SYNC");

        world.set_config(&syncing());
        assert!(world.vip_meta("web").syncs());
        let syn = tcp(vip, 40_001, 80);
        world.run(&syn.bytes());
        assert!(world.sync_events().is_empty(), "a SYN is only pending");
        world.run(&syn.ack().bytes());
        let events = world.sync_events();
        assert_eq!(events.len(), 1, "one decision for one new flow");
        let flow = syn.flow();
        assert_eq!(events[0].flow, flow);
        assert_eq!(Some(events[0].backend_id), world.conn(&flow));
        assert_eq!(
            events[0].backend_id,
            world.backend_id("web", world.table_choice("web", &flow))
        );
        // The flow's next packets are established: nothing more.
        for _ in 0..3 {
            world.run(&syn.ack().bytes());
        }
        assert!(world.sync_events().is_empty(), "established packets");
        // 100 new flows, 100 decisions, each its own flow; 100 SYNs without a next packet,
        // none.
        for port in 0..100 {
            world.run(&tcp(vip, 50_000 + port, 80).bytes());
            world.run(&tcp(vip, 50_000 + port, 80).ack().bytes());
            world.run(&tcp(vip, 60_000 + port, 80).bytes());
        }
        let events = world.sync_events();
        assert_eq!(events.len(), 100);
        let ports: std::collections::BTreeSet<u16> = events
            .iter()
            .map(|e| u16::from_be(e.flow.src_port))
            .collect();
        assert_eq!(ports.len(), 100);
    });
}

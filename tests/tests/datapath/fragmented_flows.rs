//! A flow sometimes fragmented: with `fragments = true`, every datagram of a VIP is placed on
//! its addresses and protocol (a later fragment carries no port), so the whole datagrams and
//! the fragments of one client's flow reach one backend, in both families. (Placing the whole
//! datagrams on the 5-tuple split such a flow over two backends most of the time.)

use std::{collections::BTreeSet, net::IpAddr};

use balancer_tests::{datapath::packet::udp, netns::require_root};

use crate::FixtureNetwork;

#[test]
fn whole_datagrams_and_fragments_of_a_flow_reach_one_backend() {
    require_root("the datapath fixtures (BPF_PROG_TEST_RUN)");
    let network = FixtureNetwork::create("fx-frag");
    let other = network.other_ifindex;
    network.ns.run(move || {
        for (vip_name, vip, client) in [
            ("frag4", "10.100.2.1", "198.51.100."),
            ("frag6", "2001:db8::300", "2001:db8:5::"),
        ] {
            let world = crate::world(other);
            let vip: IpAddr = vip.parse().unwrap();
            let mut used = BTreeSet::new();
            for i in 1..=60u16 {
                let source: IpAddr = format!("{client}{i}").parse().unwrap();
                let whole = udp(vip, 30_000 + i, 53).from(source);
                world.run(&whole.bytes());
                let whole_backend = world.conn(&whole.flow()).expect("placed");
                let first = whole.fragment(0, true);
                world.run(&first.bytes());
                let fragment_backend = world.conn(&first.fragment_flow()).expect("placed");
                assert_eq!(
                    whole_backend, fragment_backend,
                    "{vip_name}: the flow from {source} split over two backends"
                );
                used.insert(whole_backend);
            }
            assert_eq!(
                used.len(),
                3,
                "{vip_name}: the clients spread over every backend"
            );
        }
    });
}

//! Which backend a balancer chooses for a new TCP flow, computed from a config with the
//! daemon's own table builder and the program's own hash: what end-to-end tests compare the
//! real choices with.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

use balancer::{
    config,
    plan::{
        desired::desired_state,
        ids::Ids,
        inputs::{NextHop, NextHops},
    },
};
use balancer_common::{hash::flow_hash, FlowKey, FAMILY_IPV4, NO_BACKEND, PROTO_TCP};

/// The backend (by address) the first VIP of `config` chooses for a new flow from `client`'s
/// `source_port` to `vip` port 80: every backend reachable and healthy.
pub fn predicted_backends(
    config: &config::Config,
    client: Ipv4Addr,
    vip: Ipv4Addr,
) -> impl Fn(u16) -> IpAddr {
    let hops: NextHops = config.vips[0]
        .backends
        .iter()
        .map(|b| {
            (
                b.address,
                NextHop {
                    ifindex: 1,
                    interface: "x".into(),
                    src_mac: [0; 6],
                    dst_mac: [0; 6],
                    gateway: None,
                    mtu: 1500,
                    source: None,
                },
            )
        })
        .collect();
    let state = desired_state(config, &[], &hops, &HashMap::new(), &mut Ids::default()).unwrap();
    let planned = state.vips[0].clone();
    let addresses: HashMap<u32, IpAddr> =
        planned.backends.iter().map(|b| (b.id, b.address)).collect();
    let seed = config.hash_seed;
    move |source_port| {
        let mut flow = FlowKey {
            src_port: source_port.to_be(),
            dst_port: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_IPV4,
            ..FlowKey::default()
        };
        flow.src[..4].copy_from_slice(&client.octets());
        flow.dst[..4].copy_from_slice(&vip.octets());
        let id = planned.table[(flow_hash(&flow, seed) % planned.meta.table_size) as usize];
        assert_ne!(id, NO_BACKEND);
        addresses[&id]
    }
}

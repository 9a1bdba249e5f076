//! The fleet's BGP plumbing alone, without the balancer daemon: BIRD on a router and on three
//! balancers (eBGP, BFD, the router's routes merged into one multipath route), in network
//! namespaces. The VIP's route is put into each balancer's kernel table 100 by hand, in the
//! form the daemon will use (`blackhole VIP/32 table 100 proto 250`), and the router's route
//! to the VIP must follow: every announcing balancer a next hop within seconds; one that
//! withdraws, loses its link or its BIRD gone within the detection time; back when restored.
//! docs/fleet.md ("BGP with BIRD 2") describes the configurations tested here.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::time::Duration;

use balancer_tests::{
    bird::{bfd_detection_time, KERNEL_SCAN_TIME, VIP_ROUTE_PROTO, VIP_TABLE},
    netns::{remove_stale, require_root, Netns},
    scratch::Scratch,
    topology::{FleetTopology, FLEET_VIP_ADDR},
};

/// A first announcement: the balancers' BIRD learn it at once, the router merges.
const ANNOUNCED_WITHIN: Duration = Duration::from_secs(5);
/// A withdrawal, or an announcement again: at once too. The kernel protocol's periodic scan
/// ([`KERNEL_SCAN_TIME`], 30 s) is far slower: meeting this bound takes netlink
/// notifications.
const CHANGED_WITHIN: Duration = Duration::from_secs(2);
/// A balancer lost (its link down, its BIRD killed): BFD's detection time (0.5 s) and the
/// withdrawal from the router's kernel. The hold timer alone (3 s, keepalives every 0.75 to
/// 1 s) would take 2 s at least: meeting this bound takes BFD.
const LOST_WITHIN: Duration = Duration::from_secs(2);
/// A balancer restored: its session comes back after BIRD's restart delays (1 s after an
/// error, a connect retry every 2 s).
const BACK_WITHIN: Duration = Duration::from_secs(15);

/// `ip route add|del blackhole VIP/32 table 100 proto 250` in a balancer's namespace: what
/// the daemon does to announce or withdraw a VIP.
fn vip_route(balancer: &Netns, action: &str) {
    balancer.ip(&[
        "route",
        action,
        "blackhole",
        &format!("{FLEET_VIP_ADDR}/32"),
        "table",
        &VIP_TABLE.to_string(),
        "proto",
        &VIP_ROUTE_PROTO.to_string(),
    ]);
}

#[test]
fn the_routers_multipath_route_follows_the_balancers() {
    require_root("the BGP fleet test");
    remove_stale("lbt-");
    // Removes what a killed run left in /tmp (its BIRDs' files among them).
    let _scratch = Scratch::new("lbt-", "fleet-bgp");
    let prefix = format!("lbt-{}-bgp-", std::process::id());
    let mut fleet = FleetTopology::create_bgp(&prefix, 3, 0, 7);
    assert!(
        CHANGED_WITHIN < Duration::from_secs(KERNEL_SCAN_TIME.into()) / 4,
        "the bounds must tell notifications from the periodic scan"
    );
    assert!(
        fleet.vip_next_hops().is_empty(),
        "nothing announced, yet the router has a route: {:?}",
        fleet.vip_next_hops()
    );

    for balancer in &fleet.balancers {
        vip_route(balancer, "add");
    }
    let took = fleet.wait_vip_next_hops(&[0, 1, 2], ANNOUNCED_WITHIN);
    println!("announced by all three: a next hop each after {took:?}");
    let route = fleet
        .router
        .ip(&["route", "show", &format!("{FLEET_VIP_ADDR}/32")]);
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    assert!(
        route.contains("proto bird") && route.matches("nexthop via").count() == 3,
        "not one multipath route from BIRD:\n{route}"
    );

    // Withdrawn by balancer 1, then announced again.
    vip_route(&fleet.balancers[0], "del");
    let took = fleet.wait_vip_next_hops(&[1, 2], CHANGED_WITHIN);
    println!("withdrawn by balancer 1: its next hop gone after {took:?}");
    vip_route(&fleet.balancers[0], "add");
    let took = fleet.wait_vip_next_hops(&[0, 1, 2], CHANGED_WITHIN);
    println!("announced again by balancer 1: back after {took:?}");

    // Balancer 2's link down: only BFD (or the hold timer) can tell.
    fleet.balancers[1].ip(&["link", "set", "eth0", "down"]);
    let took = fleet.wait_vip_next_hops(&[0, 2], LOST_WITHIN);
    println!(
        "balancer 2's link down: its next hop gone after {took:?} (BFD detection time {:?})",
        bfd_detection_time()
    );
    fleet.balancers[1].ip(&["link", "set", "eth0", "up"]);
    let took = fleet.wait_vip_next_hops(&[0, 1, 2], BACK_WITHIN);
    println!("balancer 2's link up: back after {took:?}");
    fleet.bgp().wait_up(1);

    // Balancer 3's BIRD killed: the kernel closes its session, BFD falls silent.
    fleet.bgp().balancers[2].kill();
    let took = fleet.wait_vip_next_hops(&[0, 1], LOST_WITHIN);
    println!("balancer 3's BIRD killed: its next hop gone after {took:?}");
    fleet.bgp().balancers[2].restart();
    let took = fleet.wait_vip_next_hops(&[0, 1, 2], BACK_WITHIN);
    println!("balancer 3's BIRD restarted: back after {took:?}");

    // Every balancer withdraws: no route left.
    for balancer in &fleet.balancers {
        vip_route(balancer, "del");
    }
    let took = fleet.wait_vip_next_hops(&[], CHANGED_WITHIN);
    println!("withdrawn by all: the route gone after {took:?}");
}

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

/// The daemon's side of BGP, during load: two balancers that announce the VIP themselves
/// (`[announce]`, BIRD learning table 100) and sync their connection tables; `balancer
/// withdraw` takes one out of rotation (the router's route follows within seconds, new flows
/// stop arriving there, the streams it carried move without a reset) and `announce` puts it
/// back; then it is lost mid-transfer (its daemon killed and its link down: its route stays in
/// its table, BFD takes it out of the router's) and no stream breaks; the survivor's
/// shutdown withdraws before it detaches.
#[test]
fn balancers_announce_withdraw_and_fail_over_through_bgp() {
    use balancer_tests::{
        fleet::{fleet_config, fleet_tables, FleetLab, STREAMS, STREAM_BYTES},
        http::{download_digest_paced, Pattern},
    };
    let mut lab = FleetLab::new(
        "bgpd",
        2,
        true,
        |i, key| fleet_config(4, &fleet_tables(i, 2, key)),
        &[],
    );
    lab.wait_healthy(4);
    let took = lab
        .topology
        .wait_vip_next_hops(&[0, 1], Duration::from_secs(10));
    println!("both balancers announce the VIP: the router has both after {took:?}");
    for i in 0..2 {
        let status = lab.status(i);
        assert_eq!(status["announce"]["routes"][0], FLEET_VIP_ADDR.to_string());
        assert_eq!(status["vips"][0]["announced"], true);
        let bulk = status["sync"]["bulk"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            bulk.starts_with("complete"),
            "balancer {}: bulk {bulk}",
            i + 1
        );
    }
    let expected = Pattern::digest(STREAM_BYTES);
    let check = |streams: Vec<std::thread::JoinHandle<Result<String, String>>>, what: &str| {
        let results: Vec<Result<String, String>> =
            streams.into_iter().map(|s| s.join().unwrap()).collect();
        let broken: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        let wrong = results
            .iter()
            .filter(|r| r.as_ref().is_ok_and(|d| *d != expected))
            .count();
        println!(
            "{what}: {} streams, {} broken, {wrong} with a wrong sha256",
            results.len(),
            broken.len()
        );
        assert!(broken.is_empty(), "{what}: broken streams: {broken:?}");
        assert_eq!(wrong, 0, "{what}: streams with a wrong sha256");
    };

    // Balancer 1 withdrawn by its operator during the load, then announced again.
    let streams = lab.streams(32_000, STREAM_BYTES);
    std::thread::sleep(Duration::from_millis(1500));
    let carried = lab.new_flows(0);
    let (ok, said) = lab.cli(0, &["withdraw"]);
    assert!(ok && said.contains("every VIP withdrawn"), "{said}");
    let took = lab.topology.wait_vip_next_hops(&[1], CHANGED_WITHIN);
    println!("`balancer withdraw` on balancer 1 ({carried} flows placed there): the router's route without it after {took:?}");
    assert!(
        lab.announced_routes(0).is_empty(),
        "{}",
        lab.announced_routes(0)
    );
    assert_eq!(
        lab.status(0)["vips"][0]["not_announced_because"],
        "withdrawn by the operator"
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = lab.new_flows(0);
    let to: std::net::SocketAddr = std::net::SocketAddrV4::new(FLEET_VIP_ADDR, 80).into();
    let fresh: Vec<_> = (0..50u16)
        .map(|i| {
            lab.topology
                .client
                .spawn(move || download_digest_paced(to, 36_000 + i, 10_000, None))
        })
        .collect();
    let fresh_ok = fresh
        .into_iter()
        .map(|s| s.join().unwrap())
        .filter(Result::is_ok)
        .count();
    assert_eq!(
        fresh_ok, 50,
        "new connections while balancer 1 is withdrawn"
    );
    assert_eq!(
        lab.new_flows(0),
        before,
        "new flows arrived at the withdrawn balancer"
    );
    check(streams, "withdrawal");
    let (ok, said) = lab.cli(0, &["announce"]);
    assert!(ok, "{said}");
    let took = lab.topology.wait_vip_next_hops(&[0, 1], CHANGED_WITHIN);
    println!("`balancer announce`: back after {took:?}");
    let (ok, said) = lab.cli(0, &["withdraw", "--vip", "nope"]);
    assert!(!ok && said.contains("no VIP named \"nope\""), "{said}");

    // Balancer 1 lost mid-transfer.
    let (first0, first1) = (lab.new_flows(0), lab.new_flows(1));
    let streams = lab.streams(33_000, STREAM_BYTES);
    std::thread::sleep(Duration::from_millis(1500));
    let lost = lab.new_flows(0) - first0;
    let kept = lab.new_flows(1) - first1;
    lab.lose(0);
    // A crash withdraws nothing: its data plane may still forward.
    assert!(
        lab.announced_routes(0)
            .contains(&FLEET_VIP_ADDR.to_string()),
        "a killed daemon's route is gone: {}",
        lab.announced_routes(0)
    );
    let took = lab.topology.wait_vip_next_hops(&[1], LOST_WITHIN);
    println!("balancer 1 lost: the router's route without it after {took:?}");
    check(streams, "balancer lost");
    let share = lost as f64 / (lost + kept) as f64;
    println!(
        "{STREAMS} streams: {lost} crossed the lost balancer, {kept} the other ({:.0}%)",
        share * 100.0
    );
    assert!(
        (0.3..=0.7).contains(&share),
        "{lost} of {} crossed the lost balancer",
        lost + kept
    );

    // The survivor's shutdown withdraws, then detaches.
    let mut survivor = lab.balancers[1].take().unwrap();
    survivor.signal(libc::SIGTERM);
    let took = lab.topology.wait_vip_next_hops(&[], CHANGED_WITHIN);
    println!("the survivor stopped: its route withdrawn after {took:?}, before it detached");
    survivor.stop();
    let log = survivor.log();
    assert!(
        log.contains("withdrew 1 VIP routes from table 100"),
        "{log}"
    );
    assert!(lab.announced_routes(1).is_empty());
}

//! A fleet behind ECMP, in network namespaces: a router spreading flows over two balancers
//! with a resilient nexthop group (hashing the 5-tuple with a fixed seed), four backends
//! behind them (direct server return), 200 long-lived downloads, and one balancer lost in
//! the middle of them (its daemon killed, its link down, the router's group without it).
//! Every balancer builds the same Maglev table, so the survivor sends the lost balancer's
//! flows to the backends they had: none breaks, every byte arrives.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use balancer_tests::{
    http::{download_digest_paced, get_json, Pattern},
    netns::{remove_stale, require_root},
    process::BalancerProcess,
    scratch::Scratch,
    topology::{fleet_backend_addr, FleetTopology, FLEET_VIP_ADDR},
};
use serde_json::Value;

const API: &str = "127.0.0.1:9100";
const STREAMS: usize = 200;
/// Each stream: 100 KB at 20 KB/s, about 5 s.
const STREAM_BYTES: u64 = 100_000;
const STREAM_RATE: usize = 20_000;

fn api() -> SocketAddr {
    API.parse().unwrap()
}

fn config() -> String {
    let backends: Vec<String> = (0..4)
        .map(|i| format!("{{ address = \"{}\" }}", fleet_backend_addr(i)))
        .collect();
    format!(
        r#"
[balancer]
interface = "eth0"
hash_seed = "0x5eed"
metrics_listen = "{API}"
[[vip]]
name = "web"
address = "{FLEET_VIP_ADDR}"
port = 80
protocol = "tcp"
forwarding = "dsr"
health = {{ kind = "tcp", interval = "500ms", timeout = "250ms", rise = 1 }}
backends = [{}]
"#,
        backends.join(", ")
    )
}

#[test]
fn a_balancer_lost_mid_transfer_loses_no_stream() {
    require_root("the fleet test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-ecmp-", std::process::id());
    let scratch = Scratch::new(&prefix, "fleet");
    let topology = FleetTopology::create(&prefix, 2, 4, 7);
    let _servers = topology.start_http_servers(|i| fleet_backend_addr(i).to_string());
    let path = scratch.write_atomically("fleet.toml", &config());
    // Each balancer its own pin directory (the namespaces share one bpffs) and logs.
    let runs: Vec<Scratch> = (0..2)
        .map(|i| Scratch::named(&format!("{prefix}{}-lb{}", std::process::id(), i + 1)))
        .collect();
    let mut balancers: Vec<Option<BalancerProcess>> = topology
        .balancers
        .iter()
        .zip(&runs)
        .map(|(ns, run)| {
            let mut b = BalancerProcess::run(ns, &path, run, &[], "balancer.log");
            b.wait_ready(ns, api(), Duration::from_secs(30));
            Some(b)
        })
        .collect();
    let status = |i: usize| -> Value {
        get_json(&topology.balancers[i], api(), "/api/v1/status").expect("status API")
    };
    // Both up, and the same table: the same fingerprint.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while (0..2).any(|i| status(i)["vips"][0]["healthy_backends"] != 4) {
        assert!(std::time::Instant::now() < deadline, "{:#}", status(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let fingerprints: Vec<Value> = (0..2)
        .map(|i| status(i)["vips"][0]["table_fingerprint"].clone())
        .collect();
    assert_eq!(fingerprints[0], fingerprints[1]);

    let to: SocketAddr = SocketAddrV4::new(FLEET_VIP_ADDR, 80).into();
    let streams: Vec<_> = (0..STREAMS)
        .map(|_| {
            topology
                .client
                .spawn(move || download_digest_paced(to, STREAM_BYTES, Some(STREAM_RATE)))
        })
        .collect();
    // Every stream under way, then balancer 1 is lost: daemon killed, link down, and the
    // router's group without it (what a BGP withdrawal or a lost session does).
    std::thread::sleep(Duration::from_millis(1500));
    let lost_flows = status(0)["vips"][0]["stats"]["new_flows"].as_u64().unwrap();
    let kept_flows = status(1)["vips"][0]["stats"]["new_flows"].as_u64().unwrap();
    balancers[0].take().unwrap().signal(libc::SIGKILL);
    topology.balancers[0].ip(&["link", "set", "eth0", "down"]);
    topology.route_over(&[1]);

    let expected = Pattern::digest(STREAM_BYTES);
    let results: Vec<Result<String, String>> =
        streams.into_iter().map(|s| s.join().unwrap()).collect();
    let broken: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let wrong = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|d| *d != expected))
        .count();
    let share = lost_flows as f64 / (lost_flows + kept_flows) as f64;
    println!(
        "{STREAMS} streams; {lost_flows} had crossed the lost balancer and {kept_flows} the other \
         ({:.0}% lost); {} broken, {wrong} with a wrong digest",
        share * 100.0,
        broken.len()
    );
    assert!(broken.is_empty(), "broken streams: {broken:?}");
    assert_eq!(wrong, 0, "streams with a wrong sha256");
    // Failover was really exercised: a fair share of the streams crossed the lost one.
    assert!(
        (0.3..=0.7).contains(&share),
        "{lost_flows} of {} flows crossed the lost balancer",
        lost_flows + kept_flows
    );
    assert!(lost_flows + kept_flows >= STREAMS as u64);
    // The survivor took them: it placed the lost balancer's flows on their backends.
    let after = status(1)["vips"][0]["stats"]["new_flows"].as_u64().unwrap();
    assert!(
        after > kept_flows,
        "the survivor placed no flow of the lost balancer"
    );
    balancers[1].take().unwrap().stop();
}

//! A snapshot with something in every field, for the API's tests: built by the core from a
//! config, probe results, reloads and counter readings, with a fake clock.

use std::{path::Path, time::Duration};

use balancer_common::{Outcome, TrafficStats};

use crate::{
    config,
    core::{
        discovery::{FailureKind, Resolution},
        health::ProbeFailure,
        snapshot::Snapshot,
        traffic::ConnWalk,
        Core, Input, ReadConfig, Start,
    },
    plan::{
        contents::Counters,
        inputs::{NextHop, NextHops},
    },
};

const CONFIG: &str = r#"
[balancer]
removal_grace = "1h"
[[vip]]
name = "web"
address = "192.0.2.1"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
health = { kind = "http", path = "/healthz", interval = "1s", timeout = "500ms", rise = 1, fall = 2 }
autoscale = { metric = "new_flows_per_second", target_per_backend = 100, window = "10s" }
backends = [
  { address = "10.0.0.1", weight = 2 },
  { address = "10.0.0.2" },
  { address = "10.0.0.3", drain = true },
]
[[vip]]
name = "dns"
address = "2001:db8::53"
port = "any"
protocol = "udp"
forwarding = "dsr"
table_size = 13
backends = [{ address = "2001:db8::1" }, { address = "2001:db8::2" }]
discover = { srv = "_dns._udp.dns.example", interval = "5s" }
"#;

fn hops() -> NextHops {
    let hop = |i: u8| NextHop {
        ifindex: 2,
        interface: "eth0".into(),
        src_mac: [2, 0, 0, 0, 0, 0xfe],
        dst_mac: [2, 0, 0, 0, 0, i],
        gateway: None,
        mtu: 1500,
        source: None,
    };
    [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "2001:db8::1",
        "2001:db8::2",
        "2001:db8::3",
    ]
    .iter()
    .zip(1..)
    .map(|(a, i)| (a.parse().unwrap(), hop(i)))
    .collect()
}

/// Discovery of the "dns" VIP: an answer with a backend (and one the file lists), then a
/// failed lookup.
fn discover(core: &mut Core, start: std::time::Instant) {
    let discovered = |core: &mut Core, resolution| {
        let hop = hops()["2001:db8::1".parse::<std::net::IpAddr>().as_ref().unwrap()].clone();
        core.handle(
            Input::Discovered {
                vip: "dns".into(),
                query: config::DiscoverQuery::Srv("_dns._udp.dns.example".into()),
                resolution,
                next_hops: vec![("2001:db8::3".parse().unwrap(), Ok(hop))],
            },
            start,
        );
    };
    let record = |address: &str| config::discover::Record {
        address: address.parse().unwrap(),
        port: Some(53),
        weight: Some(10),
    };
    discovered(
        core,
        Resolution::Records {
            records: vec![record("2001:db8::1"), record("2001:db8::3")],
            ttl: Duration::from_secs(30),
        },
    );
    discovered(
        core,
        Resolution::Failed {
            kind: FailureKind::ServFail,
            error: "error response: SERVFAIL".into(),
        },
    );
}

/// A daemon's state with something in every metric: probes of every kind of result and
/// duration, a backend down, one draining, one removed (retiring), an autoscaling VIP,
/// reloads accepted and rejected, counters and outcomes.
pub fn sample_snapshot() -> Snapshot {
    let start = std::time::Instant::now();
    let at = |ms: u64| start + Duration::from_millis(ms);
    let path = Path::new("golden.toml");
    let (mut core, _) = Core::start(
        Start {
            config_path: path.to_owned(),
            config: config::parse(path, CONFIG).unwrap(),
            text: CONFIG.to_owned(),
            next_hops: hops(),
            unreachable: Vec::new(),
            adopted: None,
            keep_datapath: false,
            withdrawn: false,
        },
        start,
    )
    .unwrap();
    let probe = |core: &mut Core, backend: &str, result, seconds| {
        let key = ("web".to_owned(), backend.parse().unwrap());
        let input = Input::Probe {
            key,
            result,
            seconds,
        };
        core.handle(input, start);
    };
    discover(&mut core, start);
    probe(&mut core, "10.0.0.1", Ok(()), 0.0004);
    probe(&mut core, "10.0.0.1", Ok(()), 0.003);
    probe(&mut core, "10.0.0.1", Err(ProbeFailure::Status(503)), 0.02);
    probe(&mut core, "10.0.0.2", Err(ProbeFailure::Refused), 0.0002);
    probe(&mut core, "10.0.0.2", Err(ProbeFailure::Timeout), 0.5);
    probe(
        &mut core,
        "10.0.0.3",
        Err(ProbeFailure::Error("reset".into())),
        3.0,
    );
    // A reload that removes 2001:db8::2 (retiring for an hour), and one that is refused.
    let reloaded = CONFIG.replace(", { address = \"2001:db8::2\" }", "");
    core.handle(
        Input::Reload {
            read: Box::new(ReadConfig::new(
                Path::new("golden.toml"),
                reloaded,
                &config::Host::default(),
            )),
            next_hops: hops(),
            only_if_changed: false,
        },
        start,
    );
    core.handle(
        Input::Reload {
            read: Box::new(ReadConfig::new(
                Path::new("golden.toml"),
                "[balancer\n".into(),
                &config::Host::default(),
            )),
            next_hops: hops(),
            only_if_changed: false,
        },
        start,
    );
    core.applied(Duration::from_millis(12), "SIGHUP", Vec::new(), start);
    for (n, ms) in [(1u64, 0u64), (3, 1000), (5, 2000)] {
        let walk = (n == 5).then_some(ConnWalk {
            entries: 42,
            took: Duration::from_millis(1),
            by_backend: [(0, 30), (1, 12)].into(),
        });
        core.handle(
            Input::Sampled {
                counters: counters(n),
                walk,
            },
            at(ms),
        );
    }
    swept(&mut core, at(9_000));
    core.snapshot()
}

/// Two sweeps of the NAT tables: their removals add up, the last one's picture stays.
fn swept(core: &mut Core, now: std::time::Instant) {
    for removed in [3, 4] {
        let sweep = crate::plan::contents::NatSweep {
            entries_v4: 6,
            entries_v6: 2,
            connections: 3,
            open_by_backend: [(1, 2)].into(),
            removed,
            ports: [
                ("10.0.0.250".parse().unwrap(), 4),
                ("2001:db8::250".parse().unwrap(), 1),
            ]
            .into(),
            took: Duration::from_millis(7),
        };
        core.handle(Input::NatSwept(Ok(sweep)), now);
    }
}

/// Counters that grow with `n`, different for every id and outcome.
fn counters(n: u64) -> Counters {
    let stats = |id: u64| TrafficStats {
        packets: n * (10 + id),
        bytes: n * (1500 + 100 * id),
        new_flows: n * (1 + id),
    };
    Counters {
        backends: (0..5).map(|id| (id as u32, stats(id))).collect(),
        vips: (0..2).map(|id| (id as u32, stats(100 + id))).collect(),
        outcomes: (0..Outcome::ALL.len() as u64)
            .map(|o| n * (o + 1))
            .collect(),
        nat: (0..balancer_common::NAT_COUNTER_COUNT as u64)
            .map(|c| n * (c + 2))
            .collect(),
        defence: (0..balancer_common::defence::DEFENCE_COUNTER_COUNT as u64)
            .map(|c| n * (c + 3))
            .collect(),
    }
}

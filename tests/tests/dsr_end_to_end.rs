//! End to end, in network namespaces: the real `balancer` binary with config/demo.toml, real
//! HTTP servers on three backends, a real client making 300 connections to the VIP.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios and fixture tables read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddrV4},
    time::Duration,
};

use balancer::config;
use balancer_tests::{
    http::{get_json, run_requests},
    netns::{remove_stale, require_root},
    prediction::predicted_backends,
    process::{workspace_root, BalancerProcess},
    scratch::Scratch,
    topology::{backend_addr, DsrTopology, CLIENT_ADDR, HOST_IF, VIP_ADDR},
};

const REQUESTS: u64 = 300;
const FIRST_PORT: u16 = 20_000;

#[test]
fn dsr_forwards_every_connection_whole_to_the_predicted_backend() {
    require_root("the network-namespace end-to-end test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-dsr-", std::process::id());
    let topology = DsrTopology::create(&prefix, 3);
    let servers = topology.start_http_servers(|i| format!("be{}", i + 1));
    topology.pin_arp();

    let config_path = workspace_root().join("config/demo.toml");
    let config =
        config::load(&config_path, &config::Host::default()).expect("config/demo.toml is valid");
    let api = config.metrics_listen;
    let scratch = Scratch::new("lbt-", "dsr");
    let mut balancer = BalancerProcess::run(
        &topology.balancer,
        &config_path,
        &scratch,
        &[],
        "balancer.log",
    );
    balancer.wait_ready(&topology.balancer, api, Duration::from_secs(30));

    let tx_packets = topology.client.link_stat(HOST_IF, "tx_packets");
    let tx_bytes = topology.client.link_stat(HOST_IF, "tx_bytes");
    let report = run_requests(
        &topology.client,
        SocketAddrV4::new(VIP_ADDR, 80).into(),
        REQUESTS,
        FIRST_PORT,
        |_| true,
    );
    // The client's last packets (its FIN) leave right after the response is read.
    std::thread::sleep(Duration::from_millis(300));
    let sent_packets = topology.client.link_stat(HOST_IF, "tx_packets") - tx_packets;
    let sent_bytes = topology.client.link_stat(HOST_IF, "tx_bytes") - tx_bytes;
    let status = get_json(&topology.balancer, api, "/api/v1/status").expect("status API");

    // Every connection succeeded and got its own response, whole.
    assert!(
        report.failures.is_empty(),
        "failed requests: {:#?}\n{}",
        report.failures,
        balancer.log()
    );
    assert_eq!(report.succeeded(), REQUESTS);
    let served: BTreeMap<String, u64> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("be{}", i + 1), s.served()))
        .collect();
    assert_eq!(
        served, report.per_backend,
        "servers' own counts vs what the client saw"
    );

    // Every connection went to the backend the Maglev table names for its flow.
    let predict = predicted_backends(&config, CLIENT_ADDR, VIP_ADDR);
    for (port, backend) in &report.flows {
        let index: usize = backend.trim_start_matches("be").parse::<usize>().unwrap() - 1;
        assert_eq!(
            IpAddr::V4(backend_addr(index)),
            predict(*port),
            "flow from port {port}"
        );
    }

    // The distribution follows the weights (1:1:2). With 300 hashed flows each share is a
    // binomial draw (standard deviation 2.5 to 2.9 percentage points); 10 points is more
    // than 3.4 standard deviations, so a correct balancer fails this about once in 1,500
    // runs at worst, while a balancer that ignores weights (33% each) fails it always.
    let total_weight: u32 = config.vips[0].backends.iter().map(|b| b.weight).sum();
    for (i, b) in config.vips[0].backends.iter().enumerate() {
        let share = report
            .per_backend
            .get(&format!("be{}", i + 1))
            .copied()
            .unwrap_or(0) as f64
            / REQUESTS as f64;
        let expected = b.weight as f64 / total_weight as f64;
        assert!(
            (share - expected).abs() <= 0.10,
            "be{}: share {share:.3}, weight share {expected:.3}",
            i + 1
        );
    }

    // The balancer's counters equal the traffic: everything the client sent went to the VIP
    // (ARP is pinned, IPv6 is off), and each connection was one new flow.
    let vip = &status["vips"][0];
    assert_eq!(
        vip["stats"]["packets"], sent_packets,
        "VIP packets vs client tx_packets\n{status:#}"
    );
    assert_eq!(
        vip["stats"]["bytes"], sent_bytes,
        "VIP bytes vs client tx_bytes\n{status:#}"
    );
    assert_eq!(vip["stats"]["new_flows"], REQUESTS);
    let backends = vip["backends"].as_array().unwrap();
    let sum = |field: &str| {
        backends
            .iter()
            .map(|b| b["stats"][field].as_u64().unwrap())
            .sum::<u64>()
    };
    assert_eq!(sum("packets"), sent_packets);
    assert_eq!(sum("bytes"), sent_bytes);
    for (i, b) in backends.iter().enumerate() {
        let served = report
            .per_backend
            .get(&format!("be{}", i + 1))
            .copied()
            .unwrap_or(0);
        assert_eq!(
            b["stats"]["new_flows"], served,
            "backend {i} new flows\n{status:#}"
        );
        assert_eq!(b["state"], "active");
    }
    assert_eq!(status["outcomes"]["forwarded_tx"], sent_packets);
    assert_eq!(status["verdicts"]["drop"], 0);

    // Shutdown detaches and removes everything.
    let exit = balancer.stop();
    assert!(exit.success(), "balancer exit {exit}:\n{}", balancer.log());
    let link = topology.balancer.ip(&["link", "show", HOST_IF]);
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        !link.contains("xdp"),
        "XDP still attached after shutdown: {link}"
    );
    assert!(
        balancer.log().contains("detached from eth0"),
        "{}",
        balancer.log()
    );
}

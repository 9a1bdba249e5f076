//! NAT end to end, in network namespaces: the real `balancer` binary in front of unmodified
//! backends (plain HTTP servers on their own address and port 8080, no VIP on a loopback, no
//! ARP settings), a real client making connections to the VIP on port 80.
//!
//! - Full NAT: the backends have no route to the client's network at all; they see the SNAT
//!   address only, and their answers come back through the balancer's XDP program. Closed
//!   connections leave no NAT entry once their timeout and one sweep have passed.
//! - Destination-only NAT: the balancer is the backends' gateway; they see the client.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use balancer_tests::{
    http::{get_json, run_requests, wait_for_status, HttpServer, LoadReport, LongLived, Stream},
    netns::{remove_stale, require_root, Netns},
    process::{balancer_binary, BalancerProcess},
    scratch::Scratch,
    topology::{
        checksum_errors, nat_backend_addr, tunnel_backend_addrs, NatTopology, TunnelTopology,
        NAT_BACKEND_PORT, NAT_CLIENT_ADDR, NAT_SNAT_ADDR, NAT_VIP_ADDR, TUNNEL_VIP4, TUNNEL_VIP6,
    },
};

const API: &str = "127.0.0.1:9100";

/// The config of one NAT VIP on port 80 in front of `backends` backends on port 8080;
/// `snat` is the VIP's extra lines (`snat`...; empty: the default, the interface's address).
fn config(backends: usize, snat: &str) -> String {
    config_with(backends, snat, "")
}

/// [`config`], with `balancer` lines added to `[balancer]`.
fn config_with(backends: usize, snat: &str, balancer: &str) -> String {
    let list: Vec<String> = (0..backends)
        .map(|i| format!("{{ address = \"{}\" }}", nat_backend_addr(i)))
        .collect();
    format!(
        r#"
[balancer]
interface = "eth0"
metrics_listen = "{API}"
nat_timeouts = {{ closing = "2s", quarantine = "1s" }}
{balancer}

[[vip]]
name = "web"
address = "{NAT_VIP_ADDR}"
port = 80
protocol = "tcp"
forwarding = "nat"
{snat}
backend_port = {NAT_BACKEND_PORT}
health = {{ kind = "tcp", interval = "500ms", timeout = "250ms", rise = 1 }}
backends = [{}]
"#,
        list.join(", ")
    )
}

/// How long a start may take: seconds here, but the VM tier runs these tests under software
/// emulation, where the verifier's pass over the NAT programs alone took up to half a
/// minute. Only a start that fails waits this long.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts the balancer in `topology` with `text`, and waits for it to serve.
fn start(topology: &NatTopology, scratch: &Scratch, text: &str) -> BalancerProcess {
    let path = scratch.write_atomically("nat.toml", text);
    let mut balancer =
        BalancerProcess::run(&topology.balancer, &path, scratch, &[], "balancer.log");
    balancer.wait_ready(&topology.balancer, API.parse().unwrap(), START_TIMEOUT);
    balancer
}

/// `requests` HTTP requests to the VIP from `threads` threads at once, each on a new
/// connection from a source port of its own range.
fn concurrent_requests(client: &Netns, requests: u64, threads: u64) -> LoadReport {
    let to: SocketAddr = SocketAddrV4::new(NAT_VIP_ADDR, 80).into();
    let per_thread = requests / threads;
    let reports: Vec<LoadReport> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let first = 20_000 + (t * per_thread) as u16;
                scope.spawn(move || run_requests(client, to, per_thread, first, |_| true))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut total = LoadReport::default();
    for r in reports {
        for (backend, n) in r.per_backend {
            *total.per_backend.entry(backend).or_default() += n;
        }
        total.flows.extend(r.flows);
        total.failures.extend(r.failures);
    }
    total
}

fn assert_no_checksum_errors(topology: &NatTopology) {
    for (name, ns) in topology.hosts() {
        assert_eq!(
            checksum_errors(ns),
            0,
            "InCsumErrors in the {name}'s /proc/net/snmp"
        );
    }
}

fn peers(servers: &[HttpServer]) -> BTreeSet<IpAddr> {
    servers.iter().flat_map(HttpServer::peers).collect()
}

#[test]
fn full_nat_serves_unmodified_backends_that_cannot_reach_the_client() {
    require_root("the NAT end-to-end test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-nat-", std::process::id());
    let topology = NatTopology::create(&prefix, 4);
    for backend in &topology.backends {
        let route = backend
            .command("ip")
            .args(["route", "get", &NAT_CLIENT_ADDR.to_string()])
            .output()
            .expect("ip runs");
        assert!(
            !route.status.success(),
            "a backend must have no route to the client: {}",
            String::from_utf8_lossy(&route.stdout)
        );
    }
    let servers = topology.start_http_servers(|i| format!("be{}", i + 1));
    let scratch = Scratch::new("lbt-", "nat");
    let balancer = start(&topology, &scratch, &config(4, ""));

    let report = concurrent_requests(&topology.client, 1_000, 20);
    assert!(
        report.failures.is_empty(),
        "{} failed requests, the first: {:#?}\n{}",
        report.failures.len(),
        &report.failures[..report.failures.len().min(5)],
        balancer.log()
    );
    assert_eq!(report.succeeded(), 1_000);
    // Equal weights: 250 each. A share is a binomial draw over 1,000 flows (standard
    // deviation 1.4 points); 6 points is more than 4 standard deviations.
    for i in 0..4 {
        let share = report
            .per_backend
            .get(&format!("be{}", i + 1))
            .copied()
            .unwrap_or(0) as f64
            / 1_000.0;
        assert!(
            (share - 0.25).abs() <= 0.06,
            "be{}: share {share:.3}",
            i + 1
        );
    }
    let served: BTreeMap<String, u64> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("be{}", i + 1), s.served()))
        .collect();
    assert_eq!(served, report.per_backend, "servers' own counts");
    assert_eq!(
        peers(&servers),
        BTreeSet::from([IpAddr::V4(NAT_SNAT_ADDR)]),
        "every backend saw the SNAT address only"
    );
    assert_no_checksum_errors(&topology);

    let api: SocketAddr = API.parse().unwrap();
    let status = get_json(&topology.balancer, api, "/api/v1/status").expect("status API");
    let nat = &status["nat"];
    assert_eq!(nat["events"]["created"], 1_000, "{nat:#}");
    assert!(nat["replies"].as_u64().unwrap() >= 2_000, "{nat:#}");
    assert_eq!(status["verdicts"]["drop"], 0, "{status:#}");
    // Every connection closed: after the closing timeout (2 s), the quarantine of the
    // ports (1 s) and a sweep, no entry is left: sweeps removed both entries of each.
    let (status, _) = wait_for_status(
        &topology.balancer,
        api,
        "the NAT tables empty after the closing timeout and a sweep",
        Duration::from_secs(15),
        |s| s["nat"]["swept"].as_u64() >= Some(2_000) && s["nat"]["entries_ipv4"] == 0,
        || balancer.log(),
    );
    assert_eq!(status["nat"]["swept"], 2_000, "{:#}", status["nat"]);
    assert_eq!(status["nat"]["connections"], 0);
    drop(balancer);
}

#[test]
fn destination_only_nat_shows_backends_the_client() {
    require_root("the NAT end-to-end test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-dnat-", std::process::id());
    let topology = NatTopology::create(&prefix, 2);
    topology.route_backends_via_balancer();
    let servers = topology.start_http_servers(|i| format!("be{}", i + 1));
    let scratch = Scratch::new("lbt-", "dnat");
    let balancer = start(&topology, &scratch, &config(2, "snat = \"none\""));

    let report = concurrent_requests(&topology.client, 200, 4);
    assert!(
        report.failures.is_empty(),
        "failed requests: {:#?}\n{}",
        &report.failures[..report.failures.len().min(5)],
        balancer.log()
    );
    assert_eq!(report.succeeded(), 200);
    // The client, as the backends see it; besides, only the balancer's own health checks,
    // from its address on their network.
    let seen = peers(&servers);
    let expected = BTreeSet::from([IpAddr::V4(NAT_CLIENT_ADDR), IpAddr::V4(NAT_SNAT_ADDR)]);
    assert!(
        seen.contains(&IpAddr::V4(NAT_CLIENT_ADDR)) && seen.is_subset(&expected),
        "backends saw {seen:?}"
    );
    assert_no_checksum_errors(&topology);
    drop(balancer);
}

fn vip() -> SocketAddr {
    SocketAddrV4::new(NAT_VIP_ADDR, 80).into()
}

fn api() -> SocketAddr {
    API.parse().unwrap()
}

#[test]
fn two_clients_on_the_same_source_port_get_distinct_ports_at_the_backend() {
    require_root("the NAT end-to-end test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-natport-", std::process::id());
    let topology = NatTopology::create(&prefix, 1);
    let second: std::net::Ipv4Addr = "10.96.0.3".parse().unwrap();
    topology
        .client
        .ip(&["addr", "add", &format!("{second}/24"), "dev", "eth0"]);
    let servers = topology.start_http_servers(|i| format!("be{}", i + 1));
    let scratch = Scratch::new("lbt-", "natport");
    let balancer = start(&topology, &scratch, &config(1, ""));
    // Both at once, from the same port (inside the SNAT range: the first keeps it).
    let from = |a: std::net::Ipv4Addr| SocketAddr::from(SocketAddrV4::new(a, 30_000));
    let mut a = Stream::open_from(&topology.client, vip(), from(NAT_CLIENT_ADDR))
        .unwrap_or_else(|e| panic!("first client: {e}\n{}", balancer.log()));
    let mut b = Stream::open_from(&topology.client, vip(), from(second))
        .unwrap_or_else(|e| panic!("second client: {e}\n{}", balancer.log()));
    for i in 0..20 {
        a.exchange(&format!("a {i}"))
            .expect("first client's exchange");
        b.exchange(&format!("b {i}"))
            .expect("second client's exchange");
    }
    let ports: BTreeSet<u16> = servers[0]
        .peer_sockets()
        .into_iter()
        .filter(|p| p.ip() == IpAddr::V4(NAT_SNAT_ADDR) && p.port() < 32_768)
        .map(|p| p.port())
        .collect();
    assert_eq!(ports.len(), 2, "two SNAT ports at the backend: {ports:?}");
    assert!(
        ports.contains(&30_000),
        "the first client kept its port: {ports:?}"
    );
    let status = get_json(&topology.balancer, api(), "/api/v1/status").expect("status API");
    let events = &status["nat"]["events"];
    assert_eq!(
        (events["port_kept"].as_u64(), events["port_probed"].as_u64()),
        (Some(1), Some(1))
    );
    drop((a, b));
    assert_no_checksum_errors(&topology);
}

#[test]
fn a_small_port_range_refuses_the_connection_too_many_and_frees_its_ports() {
    require_root("the NAT end-to-end test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-natfull-", std::process::id());
    let topology = NatTopology::create(&prefix, 1);
    let _servers = topology.start_http_servers(|i| format!("be{}", i + 1));
    let scratch = Scratch::new("lbt-", "natfull");
    let snat = format!("snat = \"{NAT_SNAT_ADDR}\"\nsnat_ports = \"5000-5015\"");
    let balancer = start(&topology, &scratch, &config(1, &snat));
    let open = |first: u16| -> Vec<Stream> {
        (0..16)
            .map(|i| {
                Stream::open(&topology.client, vip(), first + i)
                    .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", balancer.log()))
            })
            .collect()
    };
    let streams = open(41_000);
    // The 17th: its SYN is dropped (no port left), counted, and the connect times out.
    let refused = Stream::open(&topology.client, vip(), 41_016);
    assert!(refused.is_err(), "a 17th connection on 16 ports");
    let status = get_json(&topology.balancer, api(), "/api/v1/status").expect("status API");
    assert!(
        status["nat"]["events"]["no_port_exhausted"].as_u64() >= Some(1),
        "{:#}",
        status["nat"]
    );
    assert!(status["outcomes"]["nat_no_port"].as_u64() >= Some(1));
    // Closed: after the closing timeout, the quarantine and a sweep, the ports are free.
    drop(streams);
    wait_for_status(
        &topology.balancer,
        api(),
        "the 16 connections swept",
        Duration::from_secs(15),
        |s| s["nat"]["swept"].as_u64() >= Some(32) && s["nat"]["entries_ipv4"] == 0,
        || balancer.log(),
    );
    let again = open(42_000);
    assert_eq!(again.len(), 16);
    assert_no_checksum_errors(&topology);
}

#[test]
fn reloads_and_restarts_lose_no_nat_connection() {
    require_root("the NAT end-to-end test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-natrestart-", std::process::id());
    let topology = NatTopology::create(&prefix, 2);
    let _servers = topology.start_http_servers(|i| format!("be{}", i + 1));
    let scratch = Scratch::new("lbt-", "natrestart");
    let text = config_with(2, "", "keep_datapath = true");
    let mut first = start(&topology, &scratch, &text);
    let long = LongLived::open(&topology.client, vip(), 43_000, 8);
    std::thread::sleep(Duration::from_millis(500));
    // A reload: one backend reweighted (the file replaced, as an editor or a deploy does).
    let reweighted = text.replacen(
        &format!("{{ address = \"{}\" }}", nat_backend_addr(0)),
        &format!("{{ address = \"{}\", weight = 3 }}", nat_backend_addr(0)),
        1,
    );
    assert_ne!(reweighted, text);
    scratch.write_atomically("nat.toml", &reweighted);
    wait_for_status(
        &topology.balancer,
        api(),
        "the reload applied",
        Duration::from_secs(10),
        |s| s["config_generation"] == 2,
        || first.log(),
    );
    std::thread::sleep(Duration::from_millis(500));
    // A restart: the data plane (and its NAT state) kept, adopted by the next daemon.
    let exit = first.stop();
    assert!(exit.success(), "{}", first.log());
    std::thread::sleep(Duration::from_millis(500));
    let second = start(&topology, &scratch, &reweighted);
    std::thread::sleep(Duration::from_secs(1));
    let (exchanges, errors) = long.stop();
    assert_eq!(errors, Vec::<String>::new(), "{}", second.log());
    assert!(exchanges.iter().all(|&n| n > 20), "{exchanges:?}");
    let mut second = second;
    assert!(second.stop().success(), "{}", second.log());
    // Kept at exit: removed here.
    let out = topology
        .balancer
        .command(balancer_binary().to_str().unwrap())
        .args([
            "detach",
            "--interface",
            "eth0",
            "--pin-dir",
            &scratch.pin_dir_arg(),
        ])
        .output()
        .expect("balancer detach");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_checksum_errors(&topology);
}

#[test]
fn a_smaller_mtu_towards_the_backends_is_learned_through_translated_icmp() {
    require_root("the NAT end-to-end test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-natmtu-", std::process::id());
    // Client and balancer on one network, the backends behind a router whose link towards
    // them takes packets of 1,400 bytes at most: it answers bigger ones with ICMP
    // "fragmentation needed" / "packet too big", addressed to the SNAT address.
    let topology = TunnelTopology::create(&prefix, 2);
    topology.router.ip(&["link", "set", "eth1", "mtu", "1400"]);
    let _servers = topology.start_http_servers(|i| format!("be{}", i + 1));
    let backends = |v6: bool| -> String {
        (0..2)
            .map(|i| {
                let (a4, a6) = tunnel_backend_addrs(i);
                let a: IpAddr = if v6 { a6.into() } else { a4.into() };
                format!("{{ address = \"{a}\" }}")
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        r#"
[balancer]
interface = "eth0"
metrics_listen = "{API}"

[[vip]]
name = "web4"
address = "{TUNNEL_VIP4}"
port = 80
protocol = "tcp"
forwarding = "nat"
backends = [{}]

[[vip]]
name = "web6"
address = "{TUNNEL_VIP6}"
port = 80
protocol = "tcp"
forwarding = "nat"
backends = [{}]
"#,
        backends(false),
        backends(true)
    );
    let scratch = Scratch::new("lbt-", "natmtu");
    let path = scratch.write_atomically("nat.toml", &text);
    let mut balancer =
        BalancerProcess::run(&topology.balancer, &path, &scratch, &[], "balancer.log");
    balancer.wait_ready(&topology.balancer, api(), START_TIMEOUT);
    for (name, vip) in [
        ("IPv4", SocketAddr::from((TUNNEL_VIP4, 80))),
        ("IPv6", SocketAddr::from((TUNNEL_VIP6, 80))),
    ] {
        let before = get_json(&topology.balancer, api(), "/api/v1/status").unwrap()["nat"]
            ["events"]["icmp_reply"]
            .as_u64()
            .unwrap();
        let uploads: Vec<Result<String, String>> = topology.client.run(move || {
            (0..3)
                .map(|i| {
                    balancer_tests::http::request(vip, 0, i, 1 << 20).map(|served| served.backend)
                })
                .collect()
        });
        for (i, u) in uploads.iter().enumerate() {
            assert!(
                u.is_ok(),
                "{name}: 1 MiB upload {i}: {u:?}\n{}",
                balancer.log()
            );
        }
        let status = get_json(&topology.balancer, api(), "/api/v1/status").unwrap();
        let after = status["nat"]["events"]["icmp_reply"].as_u64().unwrap();
        assert!(
            after > before,
            "{name}: the router's ICMP errors reached the client translated\n{:#}",
            status["nat"]
        );
    }
    let hosts = [
        ("client", &topology.client),
        ("balancer", &topology.balancer),
    ];
    for (name, ns) in hosts
        .into_iter()
        .chain(topology.backends.iter().map(|b| ("backend", b)))
    {
        assert_eq!(checksum_errors(ns), 0, "InCsumErrors in the {name}");
    }
    assert!(balancer.stop().success(), "{}", balancer.log());
}

#[test]
fn large_transfers_through_full_nat_arrive_intact() {
    require_root("the NAT end-to-end test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-natbig-", std::process::id());
    let topology = NatTopology::create(&prefix, 1);
    let _servers = topology.start_http_servers(|i| format!("be{}", i + 1));
    let scratch = Scratch::new("lbt-", "natbig");
    let mut balancer = start(&topology, &scratch, &config(1, ""));
    const DOWNLOAD: u64 = 64 << 20;
    const UPLOAD: u64 = 16 << 20;
    let (down, up) = topology.client.run(|| {
        (
            balancer_tests::http::download_digest(vip(), DOWNLOAD),
            balancer_tests::http::upload_digest(vip(), UPLOAD),
        )
    });
    let log = balancer.log();
    assert_eq!(
        down.unwrap_or_else(|e| panic!("64 MiB download: {e}\n{log}")),
        balancer_tests::http::Pattern::digest(DOWNLOAD),
        "the 64 MiB download's SHA-256"
    );
    assert_eq!(
        up.unwrap_or_else(|e| panic!("16 MiB upload: {e}\n{log}")),
        balancer_tests::http::Pattern::digest(UPLOAD),
        "the 16 MiB upload's SHA-256, as the backend received it"
    );
    assert_no_checksum_errors(&topology);
    assert!(balancer.stop().success(), "{}", balancer.log());
}

#[test]
fn replies_arriving_on_another_interface_are_translated_there() {
    require_root("the NAT end-to-end test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-nat2-", std::process::id());
    let topology = NatTopology::create_two_legs(&prefix, 2);
    let servers = topology.start_http_servers(|i| format!("be{}", i + 1));
    let scratch = Scratch::new("lbt-", "nat2");
    let balancer = start(&topology, &scratch, &config(2, ""));
    assert!(
        balancer
            .log()
            .contains("NAT replies from backends on eth1 are translated there"),
        "the daemon says where it attached:\n{}",
        balancer.log()
    );
    let link = topology.balancer.ip(&["link", "show", "eth1"]);
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "the program on eth1: {}",
        String::from_utf8_lossy(&link.stdout)
    );
    let report = concurrent_requests(&topology.client, 200, 4);
    assert!(
        report.failures.is_empty(),
        "failed requests: {:#?}\n{}",
        &report.failures[..report.failures.len().min(5)],
        balancer.log()
    );
    assert_eq!(report.succeeded(), 200);
    assert_eq!(
        peers(&servers),
        BTreeSet::from([IpAddr::V4(NAT_SNAT_ADDR)]),
        "every backend saw the SNAT address only"
    );
    let status = get_json(&topology.balancer, api(), "/api/v1/status").expect("status API");
    assert!(
        status["outcomes"]["nat_reply_redirect"].as_u64() >= Some(400),
        "replies came in on eth1 and left through eth0: {:#}",
        status["outcomes"]
    );
    assert_no_checksum_errors(&topology);
    let mut balancer = balancer;
    assert!(balancer.stop().success(), "{}", balancer.log());
    // A plain stop removes the second link too.
    let link = topology.balancer.ip(&["link", "show", "eth1"]);
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "left on eth1: {}",
        String::from_utf8_lossy(&link.stdout)
    );
}

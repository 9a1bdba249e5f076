//! DNS discovery end to end, in network namespaces: the real `balancer` binary discovering
//! its NAT backends from a real DNS server (dnsmasq, answering for `lb.test` from a hosts
//! directory that it reads again whenever a file changes), real HTTP servers, and a real
//! client opening connections all along.
//!
//! - The set follows DNS, 3 -> 6 -> 2, while new connections flow and long-lived ones
//!   exchange data: none fails; new backends take traffic within an interval plus their
//!   checks' rise; removed ones keep their connections through the grace; a removed one
//!   that is then stopped is seen down; a drained one's remembered flows reach 0.
//! - The DNS server stopped for 30 s changes nothing (and is counted); an empty answer that
//!   lasts past `empty_grace` empties the VIP.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use balancer_tests::{
    dns::{Dnsmasq, Srv},
    http::{
        get, get_json, get_text, status_backend, wait_for_status, HttpServer, LoadGenerator,
        LongLived, Stream,
    },
    netns::{remove_stale, require_root, Netns},
    process::{balancer_binary, BalancerProcess},
    scratch::Scratch,
    topology::{
        backend_addr, nat_backend_addr, DsrTopology, NatTopology, NAT_BACKEND_PORT, NAT_DNS_ADDR,
        NAT_VIP_ADDR, VIP_ADDR,
    },
};
use serde_json::Value;

const API: &str = "127.0.0.1:9100";
const NAME: &str = "web.lb.test";

/// The VIP's config: NAT to port 8080, checks every 500 ms (rise 2, fall 2, starting down),
/// `discover` with `discover` (the table's contents), `balancer` lines in `[balancer]`.
fn config(discover: &str, balancer: &str) -> String {
    format!(
        r#"
[balancer]
interface = "eth0"
metrics_listen = "{API}"
nat_timeouts = {{ closing = "1s", quarantine = "1s" }}
{balancer}

[[vip]]
name = "web"
address = "{NAT_VIP_ADDR}"
port = 80
protocol = "tcp"
forwarding = "nat"
when_all_down = "drop"
health = {{ kind = "tcp", interval = "500ms", timeout = "250ms", rise = 2, fall = 2, initial = "down" }}
discover = {{ {discover} }}
"#
    )
}

/// Discovery of `NAME` on port 8080 from the test's DNS server, every second.
fn discover_a(extra: &str) -> String {
    format!(
        "dns = \"{NAME}\", port = {NAT_BACKEND_PORT}, interval = \"1s\", timeout = \"500ms\", \
         resolvers = [\"{NAT_DNS_ADDR}\"]{extra}"
    )
}

/// `/etc/netns/<namespace>/resolv.conf`, which `ip netns exec` mounts over /etc/resolv.conf
/// for what it starts in the namespace: the system's resolver, as the daemon reads it.
/// Removed on drop.
struct NetnsResolvConf(PathBuf);

impl NetnsResolvConf {
    fn new(ns: &Netns, nameserver: IpAddr) -> NetnsResolvConf {
        let dir = Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap();
        let text = format!("nameserver {nameserver}\noptions timeout:1 attempts:1\n");
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        NetnsResolvConf(dir)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vip() -> SocketAddr {
    SocketAddrV4::new(NAT_VIP_ADDR, 80).into()
}

fn api() -> SocketAddr {
    API.parse().unwrap()
}

/// Dropped in this order: the processes, then the namespaces, then the files.
struct Lab {
    balancer: BalancerProcess,
    dns: Dnsmasq,
    servers: Vec<Option<HttpServer>>,
    topology: NatTopology,
    config: PathBuf,
    _resolv_conf: Option<NetnsResolvConf>,
    _scratch: Scratch,
}

impl Lab {
    /// `backends` namespaces with servers, a DNS host (10.95.0.53) naming `first` of them,
    /// the balancer started with `text`; with `system_resolver`, the balancer's namespace has
    /// a resolv.conf naming the DNS host.
    fn new(name: &str, backends: usize, first: &[usize], text: &str, system_resolver: bool) -> Lab {
        require_root("the discovery end-to-end test");
        remove_stale("lbt-");
        let prefix = format!("lbt-{}-{name}-", std::process::id());
        // First: it removes what dead runs left under this prefix.
        let scratch = Scratch::new(&prefix, "discovery");
        let mut topology = NatTopology::create(&prefix, backends);
        let servers = topology
            .start_http_servers(|i| nat_backend_addr(i).to_string())
            .into_iter()
            .map(Some)
            .collect();
        let dns = Dnsmasq::start(topology.add_dns_host(), NAT_DNS_ADDR.into(), "lb.test", 1);
        let resolv_conf =
            system_resolver.then(|| NetnsResolvConf::new(&topology.balancer, NAT_DNS_ADDR.into()));
        let lab_dns = dns;
        lab_dns.set_addresses(NAME, &addresses_of(first));
        let path = scratch.write_atomically("discovery.toml", text);
        let mut balancer =
            BalancerProcess::run(&topology.balancer, &path, &scratch, &[], "balancer.log");
        balancer.wait_ready(&topology.balancer, api(), Duration::from_secs(30));
        Lab {
            balancer,
            dns: lab_dns,
            servers,
            topology,
            config: path,
            _resolv_conf: resolv_conf,
            _scratch: scratch,
        }
    }

    /// `NAME` resolves to these backends (none: no records).
    fn publish(&self, backends: &[usize]) {
        self.dns.set_addresses(NAME, &addresses_of(backends));
    }

    fn status(&self) -> Value {
        get_json(&self.topology.balancer, api(), "/api/v1/status").expect("status API")
    }

    fn metrics(&self) -> String {
        get_text(&self.topology.balancer, api(), "/metrics").expect("metrics")
    }

    /// Waits until `done` holds of the status; the time it took.
    fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Duration {
        let started = Instant::now();
        let log = || self.balancer.log();
        let (_, at) = wait_for_status(&self.topology.balancer, api(), what, timeout, done, log);
        at - started
    }
}

/// The backends of VIP 0 in `state` ("active", "removed"...), by address.
fn in_state(status: &Value, state: &str) -> Vec<String> {
    let mut v: Vec<String> = status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == state)
        .map(|b| b["address"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

fn addresses_of(backends: &[usize]) -> Vec<IpAddr> {
    backends
        .iter()
        .map(|i| nat_backend_addr(*i).into())
        .collect()
}

fn addresses(backends: &[usize]) -> Vec<String> {
    let mut v: Vec<String> = backends
        .iter()
        .map(|i| nat_backend_addr(*i).to_string())
        .collect();
    v.sort();
    v
}

/// The value of the metric sample `series` (name and labels, exactly as exposed).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

#[test]
fn the_backend_set_follows_dns_without_losing_a_connection() {
    let grace = "removal_grace = \"60s\"";
    let lab = Lab::new("dsc", 6, &[0, 1, 2], &config(&discover_a(""), grace), false);
    let patience = Duration::from_secs(20);
    lab.wait("three backends up", patience, |s| {
        in_state(s, "active") == addresses(&[0, 1, 2])
    });
    let status = lab.status();
    assert_eq!(
        status_backend(&status, 0, &nat_backend_addr(0).to_string())["source"],
        format!("dns {NAME}")
    );
    // `balancer check` resolves the name too, and says what the VIP would get.
    let check = lab
        .topology
        .balancer
        .command(balancer_binary().to_str().unwrap())
        .args(["check", "--config"])
        .arg(&lab.config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{said}");
    assert!(
        said.contains("it gives 3 backends now: 10.95.0.11, 10.95.0.12, 10.95.0.13"),
        "{said}"
    );
    let client = &lab.topology.client;
    let load = LoadGenerator::start_paced(client, vip(), 20_000..30_000, 25.0);
    let long_lived = LongLived::open(client, vip(), 40_000, 4);
    // And one held on the backend that will be removed but not stopped (10.95.0.13): the
    // first of a few connections that lands there.
    let draining = nat_backend_addr(2).to_string();
    let mut held = (41_000..41_064)
        .filter_map(|port| Stream::open(client, vip(), port).ok())
        .find(|s| s.backend == draining)
        .expect("a connection on 10.95.0.13");

    // Scale out: 3 -> 6. New backends enter through their checks (rise 2 x 500 ms) after the
    // next lookup (interval 1 s): traffic within 1 + 1 s, and some slack for a loaded machine.
    lab.publish(&[0, 1, 2, 3, 4, 5]);
    let took = lab.wait("six backends up", patience, |s| {
        in_state(s, "active") == addresses(&[0, 1, 2, 3, 4, 5])
    });
    println!("3 -> 6: all six active after {took:?}");
    assert!(took < Duration::from_secs(5), "new backends took {took:?}");
    let served_by = |i: usize| lab.servers[i].as_ref().map_or(0, HttpServer::served);
    let deadline = Instant::now() + Duration::from_secs(3);
    while (3..6).any(|i| served_by(i) == 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 3..6 {
        assert!(
            served_by(i) > 0,
            "backend {} got no traffic",
            nat_backend_addr(i)
        );
    }

    // Scale in: 6 -> 2. The four removed ones retire (no new flows, their connections kept).
    lab.publish(&[0, 1]);
    lab.wait("four retiring", patience, |s| {
        in_state(s, "active") == addresses(&[0, 1]) && in_state(s, "removed").len() == 4
    });
    let status = lab.status();
    for i in 2..6 {
        let b = status_backend(&status, 0, &nat_backend_addr(i).to_string());
        assert_eq!(b["source"], "removed", "{b:#}");
        assert_eq!(b["health"]["state"], "up", "still checked, still up: {b:#}");
    }
    assert_eq!(status["vips"][0]["discovery"]["backends"], 2);
    assert_eq!(status["vips"][0]["discovery"]["removed"], 4);

    // A removed replica is then stopped (as an autoscaler does): seen down within its
    // check's bound (fall 2 x 500 ms, plus a timeout), not kept as "removed" for the grace.
    let stopped = nat_backend_addr(4).to_string();
    lab.topology.backends[4].ip(&["link", "set", "eth0", "down"]);
    let took = lab.wait("the stopped replica down", patience, |s| {
        status_backend(s, 0, &stopped)["state"] == "down"
    });
    println!("removed replica stopped: down after {took:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");

    // The connection held on a removed backend goes on (it is still served there), and the
    // backend remembers it (an open NAT connection).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        held.exchange("still here").expect("the held connection"),
        draining
    );
    let status = lab.status();
    let remembered = &status_backend(&status, 0, &draining)["remembered_flows"];
    assert!(remembered.as_u64() >= Some(1), "{status:#}");
    let (exchanges, errors) = long_lived.stop();
    let attempts = load.stop();
    // Its connection closed: the count reaches 0 (the closing timeout, 1 s, then a sweep),
    // which is what a scaler or a preStop hook waits for.
    drop(held);
    let drained = draining;
    let took = lab.wait(
        "the drained backend's flows gone",
        Duration::from_secs(30),
        |s| status_backend(s, 0, &drained)["remembered_flows"] == 0,
    );
    println!(
        "drained backend {drained}: 0 remembered flows {took:?} after its last connection closed"
    );
    let metrics = lab.metrics();
    let series = format!("balancer_backend_remembered_flows{{vip=\"web\",backend=\"{drained}\"}}");
    assert_eq!(sample(&metrics, &series), 0.0);
    // And no packet for it since: its last packet ages.
    std::thread::sleep(Duration::from_secs(2));
    let status = lab.status();
    let age = status_backend(&status, 0, &drained)["last_packet_age_seconds"]
        .as_f64()
        .unwrap();
    assert!(age >= 1.0, "last packet {age} s ago");
    assert!(
        errors.is_empty(),
        "long-lived connections broke: {errors:?}"
    );
    assert!(exchanges.iter().all(|n| *n > 50), "{exchanges:?}");
    let failed: Vec<_> = attempts.iter().filter(|a| a.result.is_err()).collect();
    println!(
        "{} connections while scaling, {} failed; long-lived exchanges {exchanges:?}",
        attempts.len(),
        failed.len()
    );
    assert!(attempts.len() > 100, "{} connections", attempts.len());
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    let log = lab.balancer.log();
    assert!(
        log.contains(&format!("{NAME} now gives 6 backends")),
        "{log}"
    );
    assert!(
        !log.contains("all backends are down"),
        "no all-down episode at start (initial = \"down\"): {log}"
    );
    assert!(log.contains("waiting for the first health checks"), "{log}");
    assert!(
        !log.contains("no longer resolves; it gets no traffic"),
        "a stopped replica that was removed is no warning: {log}"
    );
}

#[test]
fn a_dns_outage_changes_nothing_and_an_empty_answer_empties_after_the_grace() {
    // No `resolvers`: the system's, from the namespace's resolv.conf.
    let discover = format!(
        "dns = \"{NAME}\", port = {NAT_BACKEND_PORT}, interval = \"1s\", timeout = \"500ms\", \
         empty_grace = \"5s\""
    );
    let text = config(&discover, "removal_grace = \"60s\"");
    let mut lab = Lab::new("dso", 3, &[0, 1, 2], &text, true);
    let patience = Duration::from_secs(20);
    lab.wait("three backends up", patience, |s| {
        in_state(s, "active") == addresses(&[0, 1, 2])
    });

    // 30 s without a DNS server: the set stays, every failure counted.
    lab.dns.stop();
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        let status = lab.status();
        assert_eq!(
            in_state(&status, "active"),
            addresses(&[0, 1, 2]),
            "{status:#}"
        );
        let served = lab.topology.client.run(|| get(vip(), 0, 1));
        served.expect("served during the outage");
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = lab.status();
    let discovery = &status["vips"][0]["discovery"];
    assert!(
        discovery["failures_in_a_row"].as_u64().unwrap() >= 20,
        "{discovery:#}"
    );
    assert!(
        discovery["last_good_age_seconds"].as_f64().unwrap() >= 29.0,
        "{discovery:#}"
    );
    let metrics = lab.metrics();
    let failed = sample(
        &metrics,
        "balancer_discovery_resolutions_total{vip=\"web\",result=\"error\"}",
    ) + sample(
        &metrics,
        "balancer_discovery_resolutions_total{vip=\"web\",result=\"timeout\"}",
    );
    assert!(failed >= 20.0, "{failed} failures counted");
    assert!(
        sample(
            &metrics,
            "balancer_discovery_last_success_age_seconds{vip=\"web\"}"
        ) >= 29.0
    );
    let log = lab.balancer.log();
    assert!(log.contains("failed"), "the failures are logged: {log}");

    // Back, with no records for the name (NXDOMAIN): kept through empty_grace (5 s)...
    lab.publish(&[]);
    // (No empty answer can come before the server runs again.)
    let empty_since = Instant::now();
    lab.dns.restart();
    lab.wait("an empty answer", patience, |s| {
        let last = &s["vips"][0]["discovery"]["last_result"];
        last == "empty" || last == "nxdomain"
    });
    assert_eq!(in_state(&lab.status(), "active"), addresses(&[0, 1, 2]));
    // ...then the VIP empties: its backends retire, new flows have nowhere to go (dropped:
    // when_all_down = "drop" with no backend at all).
    let took = lab.wait("the VIP emptied", patience, |s| {
        in_state(s, "active").is_empty()
    });
    let after = empty_since.elapsed();
    println!("empty answers: the VIP emptied {after:?} after the server came back ({took:?})");
    assert!(
        after >= Duration::from_secs(5),
        "emptied after {after:?}, before the grace"
    );
    assert!(after < Duration::from_secs(9), "emptied after {after:?}");
    let refused = lab.topology.client.run(|| get(vip(), 0, 2));
    assert!(
        refused.is_err(),
        "a VIP without backends served: {refused:?}"
    );
    let status = lab.status();
    assert!(
        status["outcomes"]["no_backend"].as_u64().unwrap() > 0,
        "{status:#}"
    );
    let log = lab.balancer.log();
    assert!(log.contains("gives no records"), "{log}");
    assert!(
        log.contains(&format!("{NAME} now gives 0 backends")),
        "{log}"
    );
}

#[test]
fn srv_records_bring_their_targets_ports_and_weights() {
    let srv_name = "_http._tcp.web.lb.test";
    let discover = format!(
        "srv = \"{srv_name}\", interval = \"1s\", timeout = \"500ms\", resolvers = [\"{NAT_DNS_ADDR}\"]"
    );
    let mut lab = Lab::new("dsv", 3, &[], &config(&discover, ""), false);
    for i in 0..3 {
        let target = format!("be{}.lb.test", i + 1);
        lab.dns.set_addresses(&target, &addresses_of(&[i]));
    }
    let record = |priority, weight, i: usize| Srv {
        priority,
        weight,
        port: NAT_BACKEND_PORT,
        target: format!("be{}.lb.test", i + 1),
    };
    // Two of priority 10, one standby of priority 20 (not used while the others answer).
    lab.dns.set_srv(
        srv_name,
        &[record(10, 10, 0), record(10, 30, 1), record(20, 50, 2)],
    );
    lab.wait("the two SRV backends up", Duration::from_secs(20), |s| {
        in_state(s, "active") == addresses(&[0, 1])
    });
    let status = lab.status();
    let weights: Vec<u64> = [0, 1]
        .iter()
        .map(|i| {
            status_backend(&status, 0, &nat_backend_addr(*i).to_string())["weight"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(weights, [10, 30], "{status:#}");
    assert_eq!(
        status_backend(&status, 0, &nat_backend_addr(0).to_string())["source"],
        format!("srv {srv_name}")
    );
    // Served through the VIP on the records' port, by the two only.
    for id in 0..20 {
        let served = lab
            .topology
            .client
            .run(move || get(vip(), 0, id))
            .expect("served");
        assert!(
            served.backend != nat_backend_addr(2).to_string(),
            "the standby record was used"
        );
    }
    // The priority-10 records gone: the standby's turn.
    lab.dns.set_srv(srv_name, &[record(20, 50, 2)]);
    lab.wait("the standby up", Duration::from_secs(20), |s| {
        in_state(s, "active") == addresses(&[2])
    });

    // An answer too large: 25 addresses against max_backends = 16: refused whole (not
    // truncated), the set kept, the reason logged.
    let many: Vec<IpAddr> = (0..25u32)
        .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a5f_1000 + i)))
        .collect();
    lab.dns.set_addresses("many.lb.test", &many);
    let text = config(
        &format!(
            "dns = \"many.lb.test\", port = {NAT_BACKEND_PORT}, interval = \"1s\", timeout = \
             \"900ms\", max_backends = 16, resolvers = [\"{NAT_DNS_ADDR}\"]"
        ),
        "",
    );
    std::fs::write(&lab.config, text).unwrap();
    lab.wait("the answer refused", Duration::from_secs(20), |s| {
        s["vips"][0]["discovery"]["last_result"] == "over_cap"
    });
    let status = lab.status();
    assert_eq!(
        in_state(&status, "active"),
        addresses(&[2]),
        "the last set stays: {status:#}"
    );
    let log = lab.balancer.log();
    assert!(
        log.contains("answer of dns many.lb.test refused: the answer has 25 backends, more than max_backends = 16"),
        "{log}"
    );
}

#[test]
fn direct_server_return_backends_are_discovered_too() {
    require_root("the discovery end-to-end test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-dsd-", std::process::id());
    let scratch = Scratch::new(&prefix, "discovery");
    let topology = DsrTopology::create(&prefix, 3);
    let _servers = topology.start_http_servers(|i| backend_addr(i).to_string());
    topology.pin_arp();
    // The DNS server in the balancer's own namespace, on loopback.
    let dns = Dnsmasq::start(
        &topology.balancer,
        IpAddr::from([127, 0, 0, 1]),
        "lb.test",
        1,
    );
    let two: Vec<IpAddr> = (0..2).map(|i| backend_addr(i).into()).collect();
    dns.set_addresses(NAME, &two);
    let text = format!(
        r#"
[balancer]
interface = "eth0"
metrics_listen = "{API}"
[[vip]]
name = "web"
address = "{VIP_ADDR}"
port = 80
protocol = "tcp"
forwarding = "dsr"
health = {{ kind = "tcp", interval = "500ms", timeout = "250ms", rise = 1 }}
discover = {{ dns = "{NAME}", interval = "1s", timeout = "500ms", resolvers = ["127.0.0.1"] }}
"#
    );
    let path = scratch.write_atomically("discovery.toml", &text);
    let mut balancer =
        BalancerProcess::run(&topology.balancer, &path, &scratch, &[], "balancer.log");
    balancer.wait_ready(&topology.balancer, api(), Duration::from_secs(30));
    let to: SocketAddr = SocketAddrV4::new(VIP_ADDR, 80).into();
    let (status, _) = wait_for_status(
        &topology.balancer,
        api(),
        "two DSR backends up",
        Duration::from_secs(20),
        |s| in_state(s, "active").len() == 2,
        || balancer.log(),
    );
    // Checked on the VIP's port, at the backends' own addresses.
    let b = status_backend(&status, 0, &backend_addr(0).to_string());
    assert_eq!(b["source"], format!("dns {NAME}"), "{status:#}");
    let served = topology.client.run(move || {
        (0..30)
            .map(|id| get(to, 0, id).map(|s| s.backend))
            .collect::<Result<std::collections::BTreeSet<String>, String>>()
    });
    let served = served.expect("served");
    assert_eq!(served.len(), 2, "{served:?}");
    // A third one published: it takes traffic, forwarded unchanged (DSR).
    dns.set_addresses(NAME, &[two[0], two[1], backend_addr(2).into()]);
    wait_for_status(
        &topology.balancer,
        api(),
        "three DSR backends up",
        Duration::from_secs(20),
        |s| in_state(s, "active").len() == 3,
        || balancer.log(),
    );
    let served = topology.client.run(move || {
        (100..160)
            .map(|id| get(to, 0, id).map(|s| s.backend))
            .collect::<Result<std::collections::BTreeSet<String>, String>>()
    });
    assert_eq!(served.expect("served").len(), 3);
    balancer.stop();
}

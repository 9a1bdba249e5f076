//! Tunnel mode end to end, in network namespaces: the real balancer encapsulates towards
//! backends behind a router (IPIP, IP6IP6 and IPv4-in-IPv6), the backends decapsulate, and a
//! real client makes connections over IPv4 and IPv6, small ones and uploads too big to fit the
//! path once encapsulated (which only work if the balancer's ICMP "too big" answers reach the
//! client and path MTU discovery does its job).
//!
//! Two ways to decapsulate: the real `balancer decap` (runs everywhere), and the kernel's own
//! flow-based ipip and ip6tnl devices, as most sites run it; the kernel this project is
//! developed on has no ipip, so that case runs in the VM tier (`cargo xtask vm`).
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
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use balancer_tests::{
    http::{get_json, request, run_requests},
    netns::{remove_stale, require_root},
    process::BalancerProcess,
    scratch::Scratch,
    topology::{tunnel_backend_addrs, TunnelTopology, TUNNEL_VIP4, TUNNEL_VIP46, TUNNEL_VIP6},
};

const BACKENDS: usize = 2;
const SMALL: u64 = 100;
const UPLOADS: u64 = 5;
const UPLOAD_BYTES: usize = 6000;

fn config() -> String {
    let list = |f: &dyn Fn(usize) -> String| {
        (0..BACKENDS)
            .map(|i| format!("{{ address = \"{}\" }}", f(i)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let v4 = list(&|i| tunnel_backend_addrs(i).0.to_string());
    let v6 = list(&|i| tunnel_backend_addrs(i).1.to_string());
    let health = "health = { kind = \"http\", path = \"/health\", interval = \"500ms\", timeout = \"200ms\" }";
    format!(
        r#"[balancer]
interface = "eth0"
hash_seed = "0x5eed"
metrics_listen = "127.0.0.1:9100"

[[vip]]
name = "web4"
address = "{TUNNEL_VIP4}"
port = 80
protocol = "tcp"
forwarding = "tunnel"
tunnel_source_v4 = "10.98.200.0/24"
{health}
backends = [{v4}]

[[vip]]
name = "web6"
address = "{TUNNEL_VIP6}"
port = 80
protocol = "tcp"
forwarding = "tunnel"
{health}
backends = [{v6}]

[[vip]]
name = "web46"
address = "{TUNNEL_VIP46}"
port = 80
protocol = "tcp"
forwarding = "tunnel"
{health}
backends = [{v6}]
"#
    )
}

/// `name count, name count, ...` from the last line of a decap log that has them.
fn decap_counts(log: &str) -> BTreeMap<String, u64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("packets: ipip"))
        .unwrap_or_else(|| panic!("no counts in:\n{log}"));
    let list = line.split("packets: ").nth(1).unwrap();
    list.split(", ")
        .map(|item| {
            let (name, count) = item.rsplit_once(' ').unwrap();
            (name.to_owned(), count.trim().parse().unwrap())
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Decap {
    /// `balancer decap` on each backend's interface.
    Program,
    /// The kernel: a flow-based ipip device and a flow-based ip6tnl device (mode any) on
    /// each backend.
    Kernel,
}

#[test]
fn tunnelled_connections_over_ipv4_and_ipv6_to_decapsulating_backends() {
    tunnel_end_to_end(Decap::Program, "tun");
}

#[test]
#[ignore = "needs a kernel with ipip and ip6_tunnel (this one has no ipip): runs in the VM tier, \
            `cargo xtask vm`, which `cargo xtask test` runs"]
fn tunnelled_connections_to_backends_decapsulating_with_kernel_tunnel_devices() {
    tunnel_end_to_end(Decap::Kernel, "ktun");
}

/// The kernel's tunnel devices on a backend: created, up, and reverse-path filtering off
/// (decapsulated packets arrive on the tunnel device, their answers leave on eth0).
fn kernel_decap(ns: &balancer_tests::netns::Netns) {
    ns.ip(&["link", "add", "name", "lbt4", "type", "ipip", "external"]);
    ns.ip(&[
        "link", "add", "name", "lbt6", "type", "ip6tnl", "mode", "any", "external",
    ]);
    for dev in ["lbt4", "lbt6"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    for key in ["all", "default", "lbt4", "eth0"] {
        ns.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0");
    }
}

fn tunnel_end_to_end(decap: Decap, name: &str) {
    require_root("the tunnel end-to-end test");
    remove_stale("lbt-");
    if decap == Decap::Kernel {
        for module in ["ipip", "ip6_tunnel"] {
            let out = std::process::Command::new("modprobe").arg(module).output();
            assert!(
                out.as_ref().is_ok_and(|o| o.status.success()),
                "this kernel cannot load {module} (run this test in the VM tier, `cargo xtask vm`): {out:?}"
            );
        }
    }
    let prefix = format!("lbt-{}-{name}-", std::process::id());
    let topology = TunnelTopology::create(&prefix, BACKENDS);
    let scratch = Scratch::new("lbt-", name);
    let _servers = topology.start_http_servers(|i| format!("be{}", i + 1));

    let mut decaps: Vec<BalancerProcess> = Vec::new();
    match decap {
        Decap::Program => {
            decaps = topology
                .backends
                .iter()
                .enumerate()
                .map(|(i, ns)| {
                    BalancerProcess::start(
                        ns,
                        &["decap", "--interface", "eth0"],
                        &scratch.path(&format!("decap{i}.log")),
                    )
                })
                .collect();
            for d in &mut decaps {
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while !d.log().contains("decapsulating") {
                    assert!(
                        d.running() && std::time::Instant::now() < deadline,
                        "decap did not start:\n{}",
                        d.log()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        Decap::Kernel => topology.backends.iter().for_each(kernel_decap),
    }

    let config = scratch.write_atomically("config.toml", &config());
    let mut balancer =
        BalancerProcess::run(&topology.balancer, &config, &scratch, &[], "balancer.log");
    let api: SocketAddr = "127.0.0.1:9100".parse().unwrap();
    balancer.wait_ready(&topology.balancer, api, Duration::from_secs(30));

    let vips: [(&str, IpAddr); 3] = [
        ("web4", TUNNEL_VIP4.into()),
        ("web6", TUNNEL_VIP6.into()),
        ("web46", TUNNEL_VIP46.into()),
    ];
    for (k, (name, address)) in vips.iter().enumerate() {
        let to = SocketAddr::new(*address, 80);
        let first_port = 20_000 + k as u16 * 1_000;
        let report = run_requests(&topology.client, to, SMALL, first_port, |_| true);
        assert!(
            report.failures.is_empty(),
            "{name}: {:#?}\n{}",
            report.failures,
            balancer.log()
        );
        assert_eq!(report.succeeded(), SMALL, "{name}");
        assert_eq!(
            report.per_backend.len(),
            BACKENDS,
            "{name}: every backend serves: {:?}",
            report.per_backend
        );
        // Uploads larger than the path takes once encapsulated.
        let uploads: Vec<Result<String, String>> = topology.client.run(move || {
            (0..UPLOADS)
                .map(|i| {
                    request(to, first_port + 500 + i as u16, i, UPLOAD_BYTES).map(|s| s.backend)
                })
                .collect()
        });
        for (i, u) in uploads.iter().enumerate() {
            assert!(u.is_ok(), "{name}: upload {i}: {u:?}\n{}", balancer.log());
        }
        println!("{name}: {} connections and {UPLOADS} uploads of {UPLOAD_BYTES} bytes, per backend {:?}", SMALL, report.per_backend);
    }
    std::thread::sleep(Duration::from_millis(300));
    let status = get_json(&topology.balancer, api, "/api/v1/status").unwrap();
    let too_big = status["outcomes"]["icmp_too_big_sent"].as_u64().unwrap();
    assert!(
        too_big >= 3,
        "every VIP's uploads needed a too-big answer first: {too_big}\n{status:#}"
    );
    assert!(balancer.stop().success(), "{}", balancer.log());

    // What the backends decapsulated is exactly what the balancer forwarded.
    let vip_packets = |name: &str| -> u64 {
        status["vips"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["stats"]["packets"]
            .as_u64()
            .unwrap()
    };
    let backend = |vip: &str, address: String| -> u64 {
        let v = status["vips"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vip)
            .unwrap();
        v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == address.as_str())
            .unwrap()["stats"]["packets"]
            .as_u64()
            .unwrap()
    };
    if decap == Decap::Kernel {
        // Each device's received packets: IPIP on lbt4; IP6IP6 and IPv4-in-IPv6 on lbt6.
        for (i, ns) in topology.backends.iter().enumerate() {
            let (a4, a6) = tunnel_backend_addrs(i);
            let ipip = ns.link_stat("lbt4", "rx_packets");
            let ip6 = ns.link_stat("lbt6", "rx_packets");
            println!(
                "be{}: the kernel decapsulated {ipip} IPIP and {ip6} IPv6-tunnelled packets",
                i + 1
            );
            assert_eq!(ipip, backend("web4", a4.to_string()), "be{}", i + 1);
            assert_eq!(
                ip6,
                backend("web6", a6.to_string()) + backend("web46", a6.to_string()),
                "be{}",
                i + 1
            );
        }
        return;
    }
    let counts: Vec<BTreeMap<String, u64>> = decaps
        .iter_mut()
        .map(|d| {
            assert!(d.stop().success(), "{}", d.log());
            decap_counts(&d.log())
        })
        .collect();
    let total = |kind: &str| counts.iter().map(|c| c[kind]).sum::<u64>();
    println!("decapsulated {:?}; too-big answers {too_big}", counts);
    assert_eq!(total("ipip"), vip_packets("web4"));
    assert_eq!(total("ip6ip6"), vip_packets("web6"));
    assert_eq!(total("ip4in6"), vip_packets("web46"));
    for (i, c) in counts.iter().enumerate() {
        let (a4, a6) = tunnel_backend_addrs(i);
        assert_eq!(c["ipip"], backend("web4", a4.to_string()), "be{}", i + 1);
        assert_eq!(c["ip6ip6"], backend("web6", a6.to_string()), "be{}", i + 1);
        assert_eq!(c["ip4in6"], backend("web46", a6.to_string()), "be{}", i + 1);
        assert_eq!(c["malformed"], 0);
    }
}

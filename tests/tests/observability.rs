//! What the balancer reports, checked against what was really sent, in network namespaces
//! with the real binary: the Prometheus exposition, the status API, `balancer status`, and
//! the autoscaling gauge under a load of known rate.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios and fixture tables read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, SocketAddrV4, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use balancer_tests::{
    http::{get_json, get_text, run_requests, wait_for_status, HttpServer, LoadGenerator},
    netns::{remove_stale, require_root, Netns},
    process::{balancer_binary, BalancerProcess},
    scratch::Scratch,
    topology::{backend_addr, DsrTopology, HOST_IF, VIP_ADDR},
};
use serde_json::Value;

const UDP_PORT: u16 = 5300;
/// Ethernet, IPv4 and UDP headers in front of a datagram's payload.
const UDP_FRAME_OVERHEAD: u64 = 14 + 20 + 8;

fn api() -> SocketAddr {
    "127.0.0.1:9100".parse().unwrap()
}

fn web() -> SocketAddr {
    SocketAddrV4::new(VIP_ADDR, 80).into()
}

/// Two VIPs on three backends: "web" (TCP 80, with an autoscale target) and "dns" (UDP).
fn config(autoscale_target: f64, window_s: u64) -> String {
    let backends: Vec<String> = (0..3)
        .map(|i| format!("  {{ address = \"{}\" }},", backend_addr(i)))
        .collect();
    let backends = backends.join("\n");
    format!(
        r#"[balancer]
interface = "eth0"
hash_seed = "0x5eed"
conn_table_size = 65536
metrics_listen = "127.0.0.1:9100"

[[vip]]
name = "web"
address = "{VIP_ADDR}"
port = 80
protocol = "tcp"
forwarding = "dsr"
health = {{ kind = "http", path = "/health", interval = "200ms", timeout = "100ms", rise = 1, fall = 3 }}
autoscale = {{ metric = "new_flows_per_second", target_per_backend = {autoscale_target}, tolerance = 0.1, window = "{window_s}s" }}
backends = [
{backends}
]

[[vip]]
name = "dns"
address = "{VIP_ADDR}"
port = {UDP_PORT}
protocol = "udp"
forwarding = "dsr"
health = {{ kind = "tcp", port = 80, interval = "200ms", timeout = "100ms", rise = 1, fall = 3 }}
backends = [
{backends}
]
"#
    )
}

struct Lab {
    balancer: BalancerProcess,
    _servers: Vec<HttpServer>,
    _scratch: Scratch,
    topology: DsrTopology,
}

impl Lab {
    fn start(test: &str, config_text: &str) -> Lab {
        require_root("the observability tests");
        remove_stale("lbt-");
        let prefix = format!("lbt-{}-{test}-", std::process::id());
        let topology = DsrTopology::create(&prefix, 3);
        let servers = topology.start_http_servers(|i| format!("be{}", i + 1));
        topology.pin_arp();
        let scratch = Scratch::new("lbt-", test);
        let config = scratch.write_atomically("config.toml", config_text);
        let mut balancer =
            BalancerProcess::run(&topology.balancer, &config, &scratch, &[], "balancer.log");
        balancer.wait_ready(&topology.balancer, api(), Duration::from_secs(30));
        let lab = Lab {
            balancer,
            _servers: servers,
            _scratch: scratch,
            topology,
        };
        lab.wait_for(
            "every backend of both VIPs up",
            Duration::from_secs(10),
            |s| {
                s["vips"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|v| v["healthy_backends"] == 3)
            },
        );
        lab
    }

    fn status(&self) -> Value {
        get_json(&self.topology.balancer, api(), "/api/v1/status").expect("status API")
    }

    fn scrape(&self) -> Scrape {
        let text = get_text(&self.topology.balancer, api(), "/metrics").expect("/metrics");
        Scrape::parse(&text)
    }

    fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let ns = &self.topology.balancer;
        wait_for_status(ns, api(), what, timeout, done, || self.balancer.log()).0
    }

    /// `balancer status ARGS...` in the balancer's namespace: its stdout.
    fn status_command(&self, args: &[&str]) -> String {
        let out = self
            .topology
            .balancer
            .command(balancer_binary().to_str().unwrap())
            .arg("status")
            .args(["--api", &api().to_string()])
            .args(args)
            .output()
            .expect("run balancer status");
        assert!(
            out.status.success(),
            "balancer status {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// A Prometheus text exposition, parsed, with its format checked.
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// Parses an OpenMetrics text exposition, checking the conventions: one prefix, HELP and
    /// TYPE before every family's samples, counter families named without `_total` and their
    /// samples with it, histograms as _bucket/_sum/_count, base units, `# EOF` last.
    fn parse(text: &str) -> Scrape {
        let mut types: BTreeMap<String, String> = BTreeMap::new();
        let mut helps: BTreeSet<String> = BTreeSet::new();
        let mut samples = Vec::new();
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.pop(), Some("# EOF"), "the exposition ends with # EOF");
        for line in lines {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(!help.is_empty(), "{line}");
                helps.insert(name.to_owned());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "family {name} declared twice"
                );
                continue;
            }
            assert!(
                !line.starts_with('#') && !line.is_empty(),
                "stray line {line:?}"
            );
            let (series, value) = line.rsplit_once(' ').expect("sample: series value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value in {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').unwrap())),
                None => (series, BTreeMap::new()),
            };
            assert!(name.starts_with("balancer_"), "{name}");
            let family_of = |suffix: &str, kind: &str| {
                name.strip_suffix(suffix)
                    .filter(|f| types.get(*f).is_some_and(|k| k == kind))
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| family_of(s, "histogram"))
                .or_else(|| family_of("_total", "counter"))
                .unwrap_or(name);
            let kind = types
                .get(family)
                .unwrap_or_else(|| panic!("{name} has no TYPE line before it"));
            assert!(helps.contains(family), "{family} has no HELP line");
            if kind == "counter" {
                assert!(
                    name.ends_with("_total") && !family.ends_with("_total"),
                    "counter {name}"
                );
            } else {
                assert!(!name.ends_with("_total"), "{kind} {name}");
            }
            assert!(
                !family.contains("milli") && !family.contains("_ms"),
                "base units: {family}"
            );
            samples.push((name.to_owned(), labels, value));
        }
        Scrape {
            text: text.to_owned(),
            samples,
        }
    }

    /// The one sample of `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{name}{labels:?}: {} samples in\n{}",
            found.len(),
            self.text
        );
        found[0]
    }

    fn u(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.get(name, labels) as u64
    }

    /// Lines of the exposition that mention `needle`.
    fn excerpt(&self, needle: &str) -> String {
        self.text
            .lines()
            .filter(|l| l.contains(needle) && !l.contains("_bucket{"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (i, '"') => break i,
                (_, '\\') => match chars.next().unwrap().1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

/// A UDP receiver in a backend's namespace: the (source port, payload length) of every
/// datagram to the VIP's port, until stopped.
struct UdpSink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<(u16, usize)>>>,
}

impl UdpSink {
    fn start(ns: &Netns) -> UdpSink {
        let socket = ns.run(|| UdpSocket::bind(("0.0.0.0", UDP_PORT)).expect("bind UDP sink"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    got.push((from.port(), n));
                }
            }
            got
        });
        UdpSink {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<(u16, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

const CONNECTIONS: u64 = 120;
const UDP_FLOWS: u16 = 30;

/// Datagrams of UDP flow `f` and their payload size.
fn udp_flow(f: u16) -> (usize, usize) {
    (1 + (f as usize % 5), 100 + 7 * f as usize)
}

#[test]
fn scraped_counters_equal_the_traffic_sent() {
    let lab = Lab::start("metrics", &config(1000.0, 10));
    let client = &lab.topology.client;
    let sinks: Vec<UdpSink> = lab.topology.backends.iter().map(UdpSink::start).collect();

    // TCP: exactly CONNECTIONS connections; the client's interface counts the packets.
    let (tx_packets, tx_bytes) = (
        client.link_stat(HOST_IF, "tx_packets"),
        client.link_stat(HOST_IF, "tx_bytes"),
    );
    let report = run_requests(client, web(), CONNECTIONS, 30_000, |_| true);
    std::thread::sleep(Duration::from_millis(300));
    let tcp_packets = client.link_stat(HOST_IF, "tx_packets") - tx_packets;
    let tcp_bytes = client.link_stat(HOST_IF, "tx_bytes") - tx_bytes;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.succeeded(), CONNECTIONS);

    // UDP: UDP_FLOWS flows (source ports), each a known number of datagrams of a known size.
    let (udp_tx_packets, udp_tx_bytes) = (
        client.link_stat(HOST_IF, "tx_packets"),
        client.link_stat(HOST_IF, "tx_bytes"),
    );
    client.run(|| {
        let to = SocketAddrV4::new(VIP_ADDR, UDP_PORT);
        for f in 0..UDP_FLOWS {
            let socket = UdpSocket::bind(("0.0.0.0", 31_000 + f)).expect("bind UDP source");
            let (count, size) = udp_flow(f);
            for _ in 0..count {
                socket.send_to(&vec![b'u'; size], to).expect("send UDP");
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let udp_sent_packets: u64 = (0..UDP_FLOWS).map(|f| udp_flow(f).0 as u64).sum();
    let udp_sent_bytes: u64 = (0..UDP_FLOWS)
        .map(|f| udp_flow(f).0 as u64 * (udp_flow(f).1 as u64 + UDP_FRAME_OVERHEAD))
        .sum();
    assert_eq!(
        client.link_stat(HOST_IF, "tx_packets") - udp_tx_packets,
        udp_sent_packets,
        "the client sent only the datagrams"
    );
    assert_eq!(
        client.link_stat(HOST_IF, "tx_bytes") - udp_tx_bytes,
        udp_sent_bytes
    );
    let received: Vec<Vec<(u16, usize)>> = sinks.into_iter().map(UdpSink::stop).collect();
    assert_eq!(
        received.iter().map(Vec::len).sum::<usize>() as u64,
        udp_sent_packets,
        "datagrams received by the backends"
    );

    // Let the connection-table walk (each second while quick) see every flow.
    std::thread::sleep(Duration::from_millis(2500));
    let scrape = lab.scrape();
    let status = lab.status();

    // Per VIP: what the client sent.
    let web = [("vip", "web")];
    let dns = [("vip", "dns")];
    assert_eq!(scrape.u("balancer_vip_packets_total", &web), tcp_packets);
    assert_eq!(scrape.u("balancer_vip_bytes_total", &web), tcp_bytes);
    assert_eq!(scrape.u("balancer_vip_new_flows_total", &web), CONNECTIONS);
    assert_eq!(
        scrape.u("balancer_vip_packets_total", &dns),
        udp_sent_packets
    );
    assert_eq!(scrape.u("balancer_vip_bytes_total", &dns), udp_sent_bytes);
    assert_eq!(
        scrape.u("balancer_vip_new_flows_total", &dns),
        UDP_FLOWS as u64
    );
    for vip in [&web, &dns] {
        assert_eq!(scrape.u("balancer_vip_healthy_backends", vip), 3);
    }

    // Per backend: TCP new flows are the connections each backend served (as the client saw
    // them); UDP packets, bytes and flows are what each backend's socket received.
    let mut tcp_backend_packets = 0;
    for (i, got) in received.iter().enumerate() {
        let address = backend_addr(i).to_string();
        let be = |vip: &'static str| [("vip", vip), ("backend", address.as_str())];
        let served = report
            .per_backend
            .get(&format!("be{}", i + 1))
            .copied()
            .unwrap_or(0);
        assert_eq!(
            scrape.u("balancer_backend_new_flows_total", &be("web")),
            served,
            "{address}"
        );
        tcp_backend_packets += scrape.u("balancer_backend_packets_total", &be("web"));
        let packets = got.len() as u64;
        let bytes: u64 = got
            .iter()
            .map(|(_, n)| *n as u64 + UDP_FRAME_OVERHEAD)
            .sum();
        let flows = got
            .iter()
            .map(|(port, _)| port)
            .collect::<BTreeSet<_>>()
            .len() as u64;
        assert_eq!(
            scrape.u("balancer_backend_packets_total", &be("dns")),
            packets,
            "{address}"
        );
        assert_eq!(
            scrape.u("balancer_backend_bytes_total", &be("dns")),
            bytes,
            "{address}"
        );
        assert_eq!(
            scrape.u("balancer_backend_new_flows_total", &be("dns")),
            flows,
            "{address}"
        );
        for vip in ["web", "dns"] {
            assert_eq!(scrape.u("balancer_backend_up", &be(vip)), 1);
            assert_eq!(scrape.u("balancer_backend_weight", &be(vip)), 1);
            assert_eq!(scrape.u("balancer_backend_draining", &be(vip)), 0);
            // Probes ran, each one in the histogram, none failed.
            let probes = scrape.u("balancer_backend_probe_duration_seconds_count", &be(vip));
            assert!(probes > 0);
            let mut labels = be(vip).to_vec();
            labels.push(("le", "+Inf"));
            assert_eq!(
                scrape.u("balancer_backend_probe_duration_seconds_bucket", &labels),
                probes
            );
            for reason in ["refused", "timeout", "status", "error"] {
                let mut labels = be(vip).to_vec();
                labels.push(("reason", reason));
                assert_eq!(
                    scrape.u("balancer_backend_probe_failures_total", &labels),
                    0
                );
            }
        }
    }
    assert_eq!(tcp_backend_packets, tcp_packets);

    // Global: every packet forwarded (XDP_TX), none dropped, one table entry per flow.
    let total = tcp_packets + udp_sent_packets;
    assert_eq!(
        scrape.u("balancer_packets_total", &[("verdict", "tx")]),
        total
    );
    assert_eq!(
        scrape.u("balancer_packets_total", &[("verdict", "drop")]),
        0
    );
    assert_eq!(
        scrape.u("balancer_packets_total", &[("verdict", "aborted")]),
        0
    );
    let dropped: f64 = scrape
        .samples
        .iter()
        .filter(|(n, _, _)| n == "balancer_dropped_packets_total")
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(dropped, 0.0);
    assert_eq!(
        scrape.u("balancer_conn_table_entries", &[]),
        CONNECTIONS + UDP_FLOWS as u64
    );
    assert_eq!(scrape.u("balancer_conn_table_capacity", &[]), 65536);
    assert_eq!(scrape.u("balancer_config_generation", &[]), 1);
    assert_eq!(
        scrape.u("balancer_config_reloads_total", &[("result", "accepted")]),
        0
    );
    assert_eq!(
        scrape.u("balancer_config_reloads_total", &[("result", "rejected")]),
        0
    );
    assert_eq!(
        scrape.get(
            "balancer_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // The fingerprint is the status API's.
    for (i, vip) in ["web", "dns"].iter().enumerate() {
        let fingerprint = status["vips"][i]["table_fingerprint"].as_str().unwrap();
        assert_eq!(fingerprint.len(), 16);
        assert_eq!(
            scrape.get(
                "balancer_vip_table_info",
                &[("vip", vip), ("fingerprint", fingerprint)]
            ),
            1.0
        );
    }

    // `balancer status --json` agrees with the scrape.
    let cli: Value = serde_json::from_str(&lab.status_command(&["--json"])).unwrap();
    for (i, vip) in ["web", "dns"].iter().enumerate() {
        let v = &cli["vips"][i];
        assert_eq!(v["name"], *vip);
        for field in ["packets", "bytes", "new_flows"] {
            assert_eq!(
                v["stats"][field].as_u64().unwrap(),
                scrape.u(&format!("balancer_vip_{field}_total"), &[("vip", vip)]),
                "{vip} {field}"
            );
            for b in v["backends"].as_array().unwrap() {
                let address = b["address"].as_str().unwrap();
                assert_eq!(
                    b["stats"][field].as_u64().unwrap(),
                    scrape.u(
                        &format!("balancer_backend_{field}_total"),
                        &[("vip", vip), ("backend", address)]
                    ),
                    "{vip} {address} {field}"
                );
            }
        }
    }
    assert_eq!(cli["conn_table_entries"], CONNECTIONS + UDP_FLOWS as u64);

    // The table shows each backend with its totals.
    let table = lab.status_command(&[]);
    for i in 0..3 {
        let address = backend_addr(i).to_string();
        let line = table
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{address} ")))
            .unwrap_or_else(|| panic!("{address} missing:\n{table}"));
        let served = report
            .per_backend
            .get(&format!("be{}", i + 1))
            .copied()
            .unwrap_or(0);
        assert!(line.contains("active") && line.contains("up"), "{line}");
        assert!(
            line.split_whitespace().any(|w| w == served.to_string()),
            "{served} new flows not in {line:?}"
        );
    }
    println!("balancer status:\n{table}");
    println!(
        "scrape excerpt:\n{}\n{}\n{}",
        scrape.excerpt("vip=\"web\""),
        scrape.excerpt("verdict="),
        scrape.excerpt("conn_table")
    );
    let mut balancer = lab.balancer;
    assert!(balancer.stop().success());
}

#[test]
fn the_desired_backends_gauge_follows_the_hpa_formula_under_a_known_load() {
    // Target 10 new flows/s per backend, over a 3 s window, with 3 ready backends.
    const TARGET: f64 = 10.0;
    const WINDOW_S: u64 = 3;
    let lab = Lab::start("autoscale", &config(TARGET, WINDOW_S));
    let gauge = |lab: &Lab| {
        lab.scrape()
            .u("balancer_vip_desired_backends", &[("vip", "web")])
    };

    // No load: never below one backend.
    let status = lab.wait_for("a full window of samples", Duration::from_secs(10), |s| {
        s["vips"][0]["autoscale"]["desired_backends"] == 1
    });
    assert_eq!(status["vips"][0]["autoscale"]["rate"], 0.0);
    assert_eq!(gauge(&lab), 1);

    // (rate per second, what the HPA asks for with 3 ready backends, why)
    let cases = [
        (45.0, 5, "ceil(3 x 15/10) = 5"),
        (
            31.0,
            3,
            "3 x 10.33 per backend is inside the 10% band: stay at 3",
        ),
        (17.0, 2, "ceil(3 x 5.67/10) = 2"),
    ];
    for (rate, want, why) in cases {
        let load = LoadGenerator::start_paced(&lab.topology.client, web(), 20_000..60_000, rate);
        // Wait out one window of the new rate, then for the gauge to settle.
        std::thread::sleep(Duration::from_secs(WINDOW_S + 1));
        let status = lab.wait_for(
            &format!("desired {want} at {rate}/s ({why})"),
            Duration::from_secs(8),
            |s| s["vips"][0]["autoscale"]["desired_backends"] == want,
        );
        // What the balancer measured is the rate sent, and the gauge is the formula of it.
        let a = &status["vips"][0]["autoscale"];
        let measured = a["rate"].as_f64().unwrap();
        assert!(
            (measured - rate).abs() <= rate * 0.08,
            "measured {measured}/s, sent {rate}/s"
        );
        assert_eq!(a["ready_backends"], 3);
        assert_eq!(
            balancer::autoscale::desired_backends(3, measured, TARGET, 0.1),
            want as u32,
            "{why}"
        );
        assert_eq!(gauge(&lab), want);
        let table = lab.status_command(&[]);
        assert!(
            table.contains(&format!("desired backends {want} (")),
            "{table}"
        );
        let attempts = load.stop();
        let failed = attempts.iter().filter(|a| a.result.is_err()).count();
        assert_eq!(failed, 0, "failed connections under load");
    }

    // Load gone: back to one once the window has no flows.
    lab.wait_for(
        "desired 1 without load",
        Duration::from_secs(WINDOW_S + 8),
        |s| s["vips"][0]["autoscale"]["desired_backends"] == 1,
    );
    assert_eq!(gauge(&lab), 1);
    let mut balancer = lab.balancer;
    assert!(balancer.stop().success());
}

//! The daemon restarting, being upgraded, crashing and being replaced while traffic flows, in
//! network namespaces with the real binary: the data plane (pinned maps, pinned XDP link) must
//! go on forwarding, and the next daemon must adopt it without losing a connection.
//!
//! An upgrade within one map layout (a changed program, the same maps) is adopted with every
//! connection kept. An upgrade across layouts (layout 3 added the VIP slots and split the
//! connection table per family; 2 the prefilter) cannot adopt the pins: the daemon refuses
//! and names `--replace`, which swaps a fresh data plane into the same link; established
//! flows are then placed again by the Maglev tables (the layout test below).
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios and fixture tables read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use balancer_common::{map_names, ConnEntry, FlowKey, FlowKeyV4, FAMILY_IPV4, PROTO_TCP};
use balancer_tests::{
    http::{
        get_json, status_backend, wait_for_status, Attempt, HttpServer, LoadGenerator, LongLived,
    },
    netns::{remove_stale, require_root},
    process::{balancer_binary, BalancerProcess},
    scratch::Scratch,
    topology::HTTP_LISTEN,
    topology::{backend_addr, DsrTopology, CLIENT_ADDR, HOST_IF, VIP_ADDR},
};
use serde_json::Value;

const LOAD_PORTS: std::ops::Range<u16> = 20_000..60_000;
const LOAD_PAUSE: Duration = Duration::from_millis(2);
const STREAM_PORTS: u16 = 10_000;
const STREAMS: u16 = 4;

fn vip() -> SocketAddr {
    SocketAddrV4::new(VIP_ADDR, 80).into()
}

fn api() -> SocketAddr {
    "127.0.0.1:9100".parse().unwrap()
}

fn config(conn_table_size: u32) -> String {
    let backends: Vec<String> = (0..3)
        .map(|i| format!("  {{ address = \"{}\" }},", backend_addr(i)))
        .collect();
    format!(
        r#"[balancer]
interface = "eth0"
hash_seed = "0x5eed"
conn_table_size = {conn_table_size}
metrics_listen = "127.0.0.1:9100"

[[vip]]
name = "web"
address = "{VIP_ADDR}"
port = 80
protocol = "tcp"
forwarding = "dsr"
health = {{ kind = "http", path = "/health", interval = "300ms", timeout = "200ms", rise = 2, fall = 3 }}
backends = [
{}
]
"#,
        backends.join("\n")
    )
}

struct Lab {
    balancer: Option<BalancerProcess>,
    runs: u32,
    servers: Vec<Option<HttpServer>>,
    scratch: Scratch,
    topology: DsrTopology,
}

impl Lab {
    fn new(test: &str, conn_table_size: u32) -> Lab {
        require_root("the restart tests");
        remove_stale("lbt-");
        let prefix = format!("lbt-{}-{test}-", std::process::id());
        let topology = DsrTopology::create(&prefix, 3);
        let servers = topology
            .start_http_servers(|i| format!("be{}", i + 1))
            .into_iter()
            .map(Some)
            .collect();
        let scratch = Scratch::new("lbt-", test);
        scratch.write_atomically("config.toml", &config(conn_table_size));
        Lab {
            balancer: None,
            runs: 0,
            servers,
            scratch,
            topology,
        }
    }

    /// Starts `balancer run` with `extra` arguments; waits for its API.
    fn start(&mut self, extra: &[&str]) -> Value {
        let mut process = self.spawn(extra);
        let status = process.wait_ready(&self.topology.balancer, api(), Duration::from_secs(30));
        self.balancer = Some(process);
        status
    }

    /// Starts `balancer run` with `extra` arguments, without waiting.
    fn spawn(&mut self, extra: &[&str]) -> BalancerProcess {
        self.runs += 1;
        BalancerProcess::run(
            &self.topology.balancer,
            &self.scratch.path("config.toml"),
            &self.scratch,
            extra,
            &format!("balancer-{}.log", self.runs),
        )
    }

    fn balancer(&mut self) -> &mut BalancerProcess {
        self.balancer.as_mut().expect("running")
    }

    /// SIGTERM, and the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut process = self.balancer.take().expect("running");
        let status = process.stop();
        assert!(status.success(), "exit {status}:\n{}", process.log());
        status
    }

    fn status(&self) -> Value {
        get_json(&self.topology.balancer, api(), "/api/v1/status").expect("status API")
    }

    fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let log = || self.balancer.as_ref().map(|b| b.log()).unwrap_or_default();
        wait_for_status(&self.topology.balancer, api(), what, timeout, done, log).0
    }

    fn wait_all_up(&self) {
        self.wait_for("every backend up", Duration::from_secs(10), |s| {
            s["vips"][0]["healthy_backends"] == 3
        });
    }

    /// The layout directory of the pins.
    fn layout_dir(&self) -> PathBuf {
        self.scratch
            .pin_dir()
            .join(HOST_IF)
            .join(format!("v{}", balancer_common::LAYOUT_VERSION))
    }

    /// `ip link show eth0` in the balancer's namespace.
    fn link(&self) -> String {
        String::from_utf8_lossy(&self.topology.balancer.ip(&["link", "show", HOST_IF]).stdout)
            .into_owned()
    }

    /// The pinned connection table, read directly: the backend id of each long-lived flow,
    /// and the number of flows.
    fn conn_table(&self) -> (Vec<Option<u32>>, usize) {
        let data = MapData::from_pin(self.layout_dir().join(map_names::CONN_TABLE_V4))
            .expect("pinned CONN_TABLE_V4");
        let table: BpfHashMap<MapData, FlowKeyV4, ConnEntry> =
            BpfHashMap::try_from(Map::LruHashMap(data)).expect("an LRU hash map");
        let ids = (0..STREAMS)
            .map(|i| {
                let mut flow = FlowKey {
                    src_port: (STREAM_PORTS + i).to_be(),
                    dst_port: 80u16.to_be(),
                    proto: PROTO_TCP,
                    family: FAMILY_IPV4,
                    ..FlowKey::default()
                };
                flow.src[..4].copy_from_slice(&CLIENT_ADDR.octets());
                flow.dst[..4].copy_from_slice(&VIP_ADDR.octets());
                table.get(&flow.v4(), 0).ok().map(|e| e.backend_id)
            })
            .collect();
        (ids, table.keys().filter(|k| k.is_ok()).count())
    }

    /// `balancer detach` for this lab's pins: its exit status and output.
    fn detach(&self) -> (bool, String) {
        let out = self
            .topology
            .balancer
            .command(balancer_binary().to_str().unwrap())
            .args([
                "detach",
                "--interface",
                HOST_IF,
                "--pin-dir",
                &self.scratch.pin_dir_arg(),
            ])
            .output()
            .expect("run balancer detach");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

fn failures(attempts: &[Attempt]) -> Vec<String> {
    attempts
        .iter()
        .filter_map(|a| {
            a.result
                .as_ref()
                .err()
                .map(|e| format!("port {}: {e}", a.source_port))
        })
        .collect()
}

/// The program id on the interface, from `ip link`.
fn xdp_program(link: &str) -> Option<u32> {
    link.split("prog/xdp id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
}

#[test]
fn a_killed_daemon_leaves_forwarding_running_and_the_next_one_adopts_it() {
    let mut lab = Lab::new("sigkill", 65536);
    lab.start(&[]);
    lab.wait_all_up();
    let long = LongLived::open(&lab.topology.client, vip(), STREAM_PORTS, STREAMS);
    let load = LoadGenerator::start(&lab.topology.client, vip(), LOAD_PORTS, LOAD_PAUSE);
    std::thread::sleep(Duration::from_millis(500));
    let program = lab.status()["datapath"]["program_id"].as_u64().unwrap() as u32;

    // SIGKILL: no clean-up runs; the pinned link keeps the program attached.
    let mut killed = lab.balancer.take().unwrap();
    killed.signal(libc::SIGKILL);
    let status = killed.wait_exit(Duration::from_secs(5));
    assert!(!status.success());
    let killed_at = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(xdp_program(&lab.link()), Some(program), "{}", lab.link());

    // The next daemon adopts: same link, its own program swapped in, last health verdicts.
    let status = lab.start(&[]);
    let restarted_at = Instant::now();
    let datapath = &status["datapath"];
    assert!(datapath["adopted"].is_string(), "{status:#}");
    assert_eq!(datapath["replaced_program_id"], program);
    assert_eq!(
        status["vips"][0]["healthy_backends"], 3,
        "adopted verdicts: {status:#}"
    );
    assert!(
        lab.balancer().log().contains("adopted the data plane"),
        "{}",
        lab.balancer().log()
    );
    std::thread::sleep(Duration::from_secs(1));

    let attempts = load.stop();
    let (exchanges, errors) = long.stop();
    let without_daemon = attempts
        .iter()
        .filter(|a| a.started >= killed_at && a.started < restarted_at)
        .count();
    println!(
        "SIGKILL: {without_daemon} new connections while no daemon ran (10 s), {} in all, {} failed; \
         long-lived connections: {exchanges:?} exchanges, {} resets",
        attempts.len(),
        failures(&attempts).len(),
        errors.len()
    );
    assert_eq!(failures(&attempts), Vec::<String>::new());
    assert_eq!(errors, Vec::<String>::new());
    assert!(without_daemon > 200, "{without_daemon} connections in 10 s");
    assert!(exchanges.iter().all(|&n| n > 150), "{exchanges:?}");

    // A plain stop removes it all.
    lab.stop();
    assert_eq!(xdp_program(&lab.link()), None, "{}", lab.link());
    assert!(!lab.scratch.pin_dir().exists(), "pins left behind");
}

#[test]
fn twenty_restarts_with_keep_datapath_lose_no_connection_and_no_flow() {
    let mut lab = Lab::new("keep", 65536);
    lab.start(&["--keep-datapath"]);
    lab.wait_all_up();
    let long = LongLived::open(&lab.topology.client, vip(), STREAM_PORTS, STREAMS);
    let load = LoadGenerator::start(&lab.topology.client, vip(), LOAD_PORTS, LOAD_PAUSE);
    std::thread::sleep(Duration::from_millis(300));
    let (first_ids, _) = lab.conn_table();
    assert!(
        first_ids.iter().all(Option::is_some),
        "long-lived flows not in the table: {first_ids:?}"
    );
    let link_id = lab.status()["datapath"]["link_id"].clone();
    let mut packets = 0u64;

    for restart in 1..=20 {
        let before = lab.conn_table();
        let vip_packets = lab.status()["vips"][0]["stats"]["packets"]
            .as_u64()
            .unwrap();
        assert!(
            vip_packets >= packets,
            "counters went back: {vip_packets} < {packets}"
        );
        packets = vip_packets;
        lab.stop();
        let kept = xdp_program(&lab.link());
        assert!(
            kept.is_some(),
            "restart {restart}: the program went away: {}",
            lab.link()
        );
        let status = lab.start(&["--keep-datapath"]);
        // Same link, same flows on the same backends, no entry lost.
        assert_eq!(status["datapath"]["link_id"], link_id, "restart {restart}");
        assert_eq!(status["datapath"]["replaced_program_id"], kept.unwrap());
        let after = lab.conn_table();
        assert_eq!(
            after.0, first_ids,
            "restart {restart}: long-lived flows moved"
        );
        assert!(
            after.1 >= before.1,
            "restart {restart}: {} flows before, {} after",
            before.1,
            after.1
        );
        // Counters carry on.
        let vip_packets = status["vips"][0]["stats"]["packets"].as_u64().unwrap();
        assert!(
            vip_packets >= packets,
            "restart {restart}: counters reset ({vip_packets} < {packets})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let attempts = load.stop();
    let (exchanges, errors) = long.stop();
    let (_, entries) = lab.conn_table();
    println!(
        "20 restarts with --keep-datapath: {} new connections, {} failed; long-lived connections: \
         {exchanges:?} exchanges, {} resets; {entries} flows in the connection table",
        attempts.len(),
        failures(&attempts).len(),
        errors.len()
    );
    assert_eq!(failures(&attempts), Vec::<String>::new());
    assert_eq!(errors, Vec::<String>::new());
    assert!(attempts.len() > 500);
    assert!(
        entries as u64 >= attempts.len().min(65536) as u64,
        "{entries} entries for {} connections",
        attempts.len()
    );

    // The last daemon also kept it: `balancer detach` removes it.
    lab.stop();
    let (ok, report) = lab.detach();
    assert!(ok, "{report}");
    assert!(report.contains("detached from eth0"), "{report}");
    assert_eq!(xdp_program(&lab.link()), None, "{}", lab.link());
    assert!(!lab.scratch.pin_dir().exists(), "pins left behind");
}

#[test]
fn an_upgraded_program_is_swapped_in_under_load() {
    let object = std::env::var_os("BALANCER_UPGRADE_OBJECT").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "BALANCER_UPGRADE_OBJECT is not set: it names a build of the XDP program with a changed \
             program and the same map layout, which `cargo xtask test` builds (balancer-ebpf with \
             the upgrade-variant feature); this test does not skip itself"
        )
    });
    assert!(object.is_file(), "{} missing", object.display());
    let mut lab = Lab::new("upgrade", 65536);
    let before = lab.start(&["--keep-datapath"]);
    lab.wait_all_up();
    let long = LongLived::open(&lab.topology.client, vip(), STREAM_PORTS, STREAMS);
    let load = LoadGenerator::start(&lab.topology.client, vip(), LOAD_PORTS, LOAD_PAUSE);
    std::thread::sleep(Duration::from_millis(500));

    lab.stop();
    let after = lab.start(&["--program-object", object.to_str().unwrap()]);
    std::thread::sleep(Duration::from_millis(1500));
    let attempts = load.stop();
    let (exchanges, errors) = long.stop();

    let (old, new) = (&before["datapath"], &after["datapath"]);
    println!(
        "upgrade: program {} (tag {}) replaced by program {} (tag {}) through link {}; {} new \
         connections, {} failed; long-lived: {exchanges:?} exchanges, {} resets",
        old["program_id"],
        old["program_tag"],
        new["program_id"],
        new["program_tag"],
        new["link_id"],
        attempts.len(),
        failures(&attempts).len(),
        errors.len()
    );
    assert_ne!(
        old["program_tag"], new["program_tag"],
        "the upgrade is a different program"
    );
    assert_eq!(
        old["link_id"], new["link_id"],
        "swapped through the same link"
    );
    assert_eq!(new["replaced_program_id"], old["program_id"]);
    assert_eq!(
        xdp_program(&lab.link()),
        new["program_id"].as_u64().map(|i| i as u32)
    );
    assert_eq!(failures(&attempts), Vec::<String>::new());
    assert_eq!(errors, Vec::<String>::new());
    assert!(attempts.len() > 100);
    lab.stop();
    assert!(!lab.scratch.pin_dir().exists(), "pins left behind");
}

#[test]
fn incompatible_pins_are_refused_with_the_way_out_and_replace_takes_over() {
    let mut lab = Lab::new("replace", 65536);
    lab.start(&["--keep-datapath"]);
    lab.wait_all_up();
    let link_id = lab.status()["datapath"]["link_id"].clone();
    lab.stop();
    let program = xdp_program(&lab.link()).expect("kept");

    // Another conn_table_size: the pinned table cannot be adopted.
    lab.scratch.write_atomically("config.toml", &config(131072));
    let mut refused = lab.spawn(&[]);
    assert!(!refused.wait_exit(Duration::from_secs(30)).success());
    let log = refused.log();
    assert!(
        log.contains(
            "the pinned connection table CONN_TABLE_V4 holds 65536 flows, conn_table_size asks \
             for 131072"
        ) && log.contains("--replace"),
        "{log}"
    );
    // Refusing touched nothing: the kept data plane still forwards.
    assert_eq!(xdp_program(&lab.link()), Some(program));
    let served =
        balancer_tests::http::run_requests(&lab.topology.client, vip(), 20, 40_000, |_| true);
    assert!(served.failures.is_empty(), "{:?}", served.failures);

    // Another map layout (as a build with another LAYOUT_VERSION would find it, e.g. layout
    // 2's pins under a build of layout 3).
    lab.scratch.write_atomically("config.toml", &config(65536));
    let pins = lab.scratch.pin_dir().join(HOST_IF);
    let layout = balancer_common::LAYOUT_VERSION;
    std::fs::rename(pins.join(format!("v{layout}")), pins.join("v0")).unwrap();
    let mut refused = lab.spawn(&[]);
    assert!(!refused.wait_exit(Duration::from_secs(30)).success());
    let log = refused.log();
    assert!(
        log.contains(&format!(
            "holds a data plane of map layout v0 and this build uses layout v{layout}"
        )) && log.contains("--replace"),
        "{log}"
    );
    assert_eq!(xdp_program(&lab.link()), Some(program));

    // --replace: a fresh data plane swapped into the same link, the old pins gone.
    let status = lab.start(&["--replace"]);
    assert!(status["datapath"]["adopted"].is_null(), "{status:#}");
    assert_eq!(
        status["datapath"]["link_id"], link_id,
        "replaced through the same link"
    );
    assert_eq!(status["datapath"]["replaced_program_id"], program);
    assert!(!pins.join("v0").exists());
    assert_eq!(status["vips"][0]["stats"]["packets"], 0, "fresh counters");
    let served =
        balancer_tests::http::run_requests(&lab.topology.client, vip(), 20, 41_000, |_| true);
    assert!(served.failures.is_empty(), "{:?}", served.failures);
    lab.stop();
    assert_eq!(xdp_program(&lab.link()), None);
    assert!(!lab.scratch.pin_dir().exists(), "pins left behind");
}

#[test]
fn detach_removes_a_kept_data_plane_and_refuses_while_a_daemon_runs() {
    let mut lab = Lab::new("detach", 65536);
    let (ok, report) = lab.detach();
    let pin_dir = lab.scratch.pin_dir_arg();
    assert!(ok && report.contains("nothing pinned for eth0"), "{report}");
    assert!(
        report.contains(&format!("looked in {pin_dir}/eth0")),
        "{report}"
    );

    lab.start(&["--keep-datapath"]);
    let (ok, report) = lab.detach();
    assert!(!ok && report.contains("stop it first"), "{report}");
    lab.stop();
    assert!(xdp_program(&lab.link()).is_some());
    // The daemon's parting hint carries its pin directory: the command works as written.
    let log = std::fs::read_to_string(lab.scratch.path("balancer-1.log")).unwrap();
    let hint = format!("`balancer detach --interface eth0 --pin-dir {pin_dir}` removes it");
    assert!(log.contains(&hint), "{log}");

    let (ok, report) = lab.detach();
    println!("balancer detach:\n{report}");
    assert!(ok, "{report}");
    assert!(
        report.contains(&format!("looked in {pin_dir}/eth0")),
        "{report}"
    );
    assert!(
        report.contains("detached from eth0") && report.contains("removed "),
        "{report}"
    );
    assert_eq!(xdp_program(&lab.link()), None, "{}", lab.link());
    assert!(!lab.scratch.pin_dir().exists(), "pins left behind");
    // Nothing left on the interface or in bpffs; the VIP is no longer balanced.
    let after =
        balancer_tests::http::run_requests(&lab.topology.client, vip(), 1, 42_000, |_| true);
    assert_eq!(after.failures.len(), 1, "a VIP still answered after detach");
}

#[test]
fn an_adopting_daemon_starts_from_the_last_health_verdicts() {
    let mut lab = Lab::new("verdicts", 65536);
    lab.start(&["--keep-datapath"]);
    lab.wait_all_up();
    let backend = |s: &Value, i: usize| -> Value {
        status_backend(s, 0, &backend_addr(i).to_string()).clone()
    };
    // be1's server dies; the daemon marks it down, then restarts.
    lab.servers[0] = None;
    lab.wait_for("be1 down", Duration::from_secs(5), |s| {
        backend(s, 0)["state"] == "down"
    });
    lab.stop();

    // The next daemon's first status: be1 still down, out of the table, the others up.
    let status = lab.start(&[]);
    let be1 = backend(&status, 0);
    assert_eq!(be1["health"]["state"], "down", "{status:#}");
    assert_eq!(be1["state"], "down", "{status:#}");
    assert_eq!(be1["slots"], 0);
    for i in 1..3 {
        assert_eq!(backend(&status, i)["state"], "active", "{status:#}");
    }
    // New connections avoid it from the first moment.
    let served =
        balancer_tests::http::run_requests(&lab.topology.client, vip(), 30, 43_000, |_| true);
    assert!(served.failures.is_empty(), "{:?}", served.failures);
    assert!(
        !served.per_backend.contains_key("be1"),
        "{:?}",
        served.per_backend
    );

    // Back after `rise` good probes.
    lab.servers[0] = Some(HttpServer::start(
        &lab.topology.backends[0],
        "be1",
        HTTP_LISTEN.into(),
    ));
    lab.wait_for("be1 up again", Duration::from_secs(5), |s| {
        backend(s, 0)["state"] == "active"
    });
    lab.stop();
    assert!(!lab.scratch.pin_dir().exists(), "pins left behind");
}

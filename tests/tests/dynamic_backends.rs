//! The backend set changing under load, in network namespaces with the real binary, real
//! servers and real clients: a backend dying and coming back, a backend drained under a
//! long-lived connection, 50 reloads in a row, and an invalid config.
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
    time::{Duration, Instant},
};

use balancer_tests::{
    http::{
        get_json, send, status_backend, wait_for_status, Attempt, HttpServer, LoadGenerator, Stream,
    },
    netns::{remove_stale, require_root},
    process::{balancer_binary, BalancerProcess},
    scratch::Scratch,
    topology::{backend_addr, DsrTopology, HTTP_LISTEN, VIP_ADDR},
};
use serde_json::Value;

const INTERVAL_MS: u64 = 300;
const RISE: u64 = 2;
const FALL: u64 = 3;
const LOAD_PORTS: std::ops::Range<u16> = 20_000..60_000;
const LOAD_PAUSE: Duration = Duration::from_millis(2);

fn vip() -> SocketAddr {
    SocketAddrV4::new(VIP_ADDR, 80).into()
}

fn name(i: usize) -> String {
    format!("be{}", i + 1)
}

/// The config: one VIP over backends (index, weight, drained), HTTP health checks every
/// 200 ms.
fn config(backends: &[(usize, u32, bool)]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(i, weight, drain)| {
            format!(
                "  {{ address = \"{}\", weight = {weight}, drain = {drain} }},",
                backend_addr(*i)
            )
        })
        .collect();
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
health = {{ kind = "http", path = "/health", interval = "{INTERVAL_MS}ms", timeout = "100ms", rise = {RISE}, fall = {FALL} }}
backends = [
{}
]
"#,
        list.join("\n")
    )
}

/// A topology, servers, a scratch directory with the config, and the running balancer.
struct Lab {
    scratch: Scratch,
    balancer: BalancerProcess,
    servers: Vec<Option<HttpServer>>,
    topology: DsrTopology,
}

impl Lab {
    fn start(test: &str, backends: usize, config_text: &str) -> Lab {
        Lab::start_with(test, backends, |scratch| {
            scratch.write_atomically("config.toml", config_text)
        })
    }

    /// Like `start`; `place_config` writes the config and returns the path to run with.
    fn start_with(
        test: &str,
        backends: usize,
        place_config: impl FnOnce(&Scratch) -> std::path::PathBuf,
    ) -> Lab {
        require_root("the dynamic backend tests");
        remove_stale("lbt-");
        let prefix = format!("lbt-{}-{test}-", std::process::id());
        let topology = DsrTopology::create(&prefix, backends);
        let servers = topology
            .start_http_servers(name)
            .into_iter()
            .map(Some)
            .collect();
        let scratch = Scratch::new("lbt-", test);
        let config = place_config(&scratch);
        let mut balancer =
            BalancerProcess::run(&topology.balancer, &config, &scratch, &[], "balancer.log");
        balancer.wait_ready(&topology.balancer, api(), Duration::from_secs(30));
        Lab {
            scratch,
            balancer,
            servers,
            topology,
        }
    }

    fn status(&self) -> Value {
        get_json(&self.topology.balancer, api(), "/api/v1/status").expect("status API")
    }

    /// Polls the status API until `done` holds; returns when it first did.
    fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Instant {
        let ns = &self.topology.balancer;
        wait_for_status(ns, api(), what, timeout, done, || self.balancer.log()).1
    }

    fn write_config(&self, text: &str) {
        self.scratch.write_atomically("config.toml", text);
    }

    fn generation(&self) -> u64 {
        self.status()["config_generation"].as_u64().unwrap()
    }

    /// `balancer reload --config FILE --pin-dir DIR` (the daemon runs with this scratch's pin
    /// directory), run in the balancer's namespace: through the control socket.
    fn reload_command(&self) -> std::process::Output {
        self.topology
            .balancer
            .command(balancer_binary().to_str().unwrap())
            .args([
                "reload",
                "--config",
                self.scratch.path("config.toml").to_str().unwrap(),
                "--pin-dir",
                &self.scratch.pin_dir_arg(),
            ])
            .output()
            .expect("run balancer reload")
    }
}

fn api() -> std::net::SocketAddr {
    "127.0.0.1:9100".parse().unwrap()
}

fn backend(status: &Value, i: usize) -> &Value {
    status_backend(status, 0, &backend_addr(i).to_string())
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

#[test]
fn a_dead_backend_leaves_within_fall_intervals_and_returns_after_rise() {
    let mut lab = Lab::start(
        "failover",
        3,
        &config(&[(0, 1, false), (1, 1, false), (2, 1, false)]),
    );
    lab.wait_for(
        "every backend checked and up",
        Duration::from_secs(10),
        |s| {
            (0..3).all(|i| {
                backend(s, i)["health"]["state"] == "up"
                    && backend(s, i)["health"]["probes"].as_u64() > Some(0)
            })
        },
    );
    let load = LoadGenerator::start(&lab.topology.client, vip(), LOAD_PORTS, LOAD_PAUSE);
    std::thread::sleep(Duration::from_secs(1));

    // Kill be2's server: connections to it are refused from now on.
    let killed = Instant::now();
    lab.servers[1] = None;
    let down = lab.wait_for("be2 down", Duration::from_secs(5), |s| {
        backend(s, 1)["state"] == "down"
    });
    std::thread::sleep(Duration::from_millis(1500));

    // Start it again.
    let restarted = Instant::now();
    lab.servers[1] = Some(HttpServer::start(
        &lab.topology.backends[1],
        &name(1),
        HTTP_LISTEN.into(),
    ));
    let up = lab.wait_for("be2 up", Duration::from_secs(5), |s| {
        backend(s, 1)["state"] == "active"
    });
    std::thread::sleep(Duration::from_millis(1500));
    let attempts = load.stop();

    let bound = Duration::from_millis(FALL * INTERVAL_MS + INTERVAL_MS);
    let detection = down - killed;
    let failed_before = attempts
        .iter()
        .filter(|a| a.started >= killed && a.result.is_err())
        .count();
    println!(
        "detection: {} ms after the kill (bound {} ms); {failed_before} connections failed before it; \
         back up {} ms after the restart; {} connections in all",
        detection.as_millis(),
        bound.as_millis(),
        (up - restarted).as_millis(),
        attempts.len()
    );
    // Before the kill: everything succeeded. (Connections under way at the kill itself may
    // be reset by the dying server; they are not judged.)
    let before: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started + Duration::from_millis(50) < killed)
        .collect();
    assert!(
        before.iter().all(|a| a.result.is_ok()),
        "{:?}",
        failures(&attempts)
    );
    // From fall x interval + one interval after the kill: 100% succeed, none on be2, until
    // be2's server runs again.
    let settled: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started >= killed + bound && a.started < restarted)
        .collect();
    assert!(
        settled.len() > 100,
        "too few connections to judge: {}",
        settled.len()
    );
    for a in &settled {
        match &a.result {
            Ok(b) => assert_ne!(b, "be2", "a new connection reached the dead backend"),
            Err(e) => panic!(
                "connection from port {} failed {:?} after the kill: {e}",
                a.source_port,
                a.started - killed
            ),
        }
    }
    assert!(
        detection <= bound + Duration::from_millis(50),
        "detected after {detection:?}"
    );
    // It returns after `rise` good probes: at most rise + 1 jittered intervals after restart.
    assert!(
        up - restarted <= Duration::from_millis((RISE + 1) * INTERVAL_MS * 11 / 10 + 50),
        "{:?}",
        up - restarted
    );
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.started >= restarted).collect();
    assert!(
        after.iter().all(|a| a.result.is_ok()),
        "{:?}",
        failures(&attempts)
    );
    assert!(
        after.iter().any(|a| a.result.as_deref() == Ok("be2")),
        "be2 got no new connections after coming back"
    );

    // One log line per transition, with the reason.
    let log = lab.balancer.log();
    let downs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("backend 10.99.0.12 of VIP web is DOWN"))
        .collect();
    assert_eq!(downs.len(), 1, "{log}");
    assert!(
        downs[0].contains("3 failed http probes in a row (last: connection refused)"),
        "{}",
        downs[0]
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("backend 10.99.0.12 of VIP web is UP"))
            .count(),
        1,
        "{log}"
    );
    assert!(lab.balancer.stop().success());
}

#[test]
fn a_drained_backend_keeps_a_long_lived_connection_and_gets_no_new_ones() {
    let mut lab = Lab::start(
        "drain",
        3,
        &config(&[(0, 1, false), (1, 1, false), (2, 1, false)]),
    );
    let mut stream =
        Stream::open(&lab.topology.client, vip(), 10_000).expect("long-lived connection");
    let drained: usize = stream
        .backend
        .trim_start_matches("be")
        .parse::<usize>()
        .unwrap()
        - 1;
    let load = LoadGenerator::start(&lab.topology.client, vip(), LOAD_PORTS, LOAD_PAUSE);
    std::thread::sleep(Duration::from_millis(300));

    let generation = lab.generation();
    let backends: Vec<(usize, u32, bool)> = (0..3).map(|i| (i, 1, i == drained)).collect();
    lab.write_config(&config(&backends));
    let applied = lab.wait_for("the drain to apply", Duration::from_secs(5), |s| {
        s["config_generation"] == generation + 1
    });
    let flows_at_drain = backend(&lab.status(), drained)["stats"]["new_flows"]
        .as_u64()
        .unwrap();

    // At least 10 s of traffic on the drained backend's connection.
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_millis(10_500) {
        let echoed_by = stream
            .exchange(&format!("ping {i}"))
            .unwrap_or_else(|e| panic!("after {:?}: {e}", started.elapsed()));
        assert_eq!(echoed_by, stream.backend);
        i += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let attempts = load.stop();
    let status = lab.status();
    println!(
        "{} exchanges over {:.1} s on the drained backend's connection; {} new connections, none failed",
        stream.exchanges,
        started.elapsed().as_secs_f64(),
        attempts.len()
    );
    assert!(stream.exchanges >= 100);
    assert_eq!(failures(&attempts), Vec::<String>::new());
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.started >= applied).collect();
    assert!(after.len() > 100);
    assert!(
        after
            .iter()
            .all(|a| a.result.as_deref() != Ok(stream.backend.as_str())),
        "a new connection reached the drained backend"
    );
    assert_eq!(backend(&status, drained)["state"], "draining");
    assert_eq!(backend(&status, drained)["slots"], 0);
    assert_eq!(
        backend(&status, drained)["stats"]["new_flows"],
        flows_at_drain,
        "the drained backend counted new flows"
    );
    assert!(lab.balancer.stop().success());
}

#[test]
fn fifty_reloads_under_load_lose_no_connection() {
    let base = |be1: u32, be2: u32, with_be4: bool| {
        let mut list = vec![(0, be1, false), (1, be2, false), (2, 1, false)];
        if with_be4 {
            list.push((3, 1, false));
        }
        config(&list)
    };
    let mut lab = Lab::start("reloads", 4, &base(1, 1, false));
    let mut streams: Vec<Stream> = (0..3)
        .map(|i| {
            Stream::open(&lab.topology.client, vip(), 10_000 + i).expect("long-lived connection")
        })
        .collect();
    let load = LoadGenerator::start(&lab.topology.client, vip(), LOAD_PORTS, LOAD_PAUSE);
    std::thread::sleep(Duration::from_millis(300));

    // Add be4, reweight be1, remove be4, reweight be1 and be2, reweight be2; ten times.
    let steps = [
        base(1, 1, true),
        base(3, 1, true),
        base(3, 1, false),
        base(1, 2, false),
        base(1, 1, false),
    ];
    let mut latencies = Vec::new();
    let first_generation = lab.generation();
    for n in 0..50u64 {
        let written = Instant::now();
        lab.write_config(&steps[n as usize % steps.len()]);
        let applied = lab.wait_for("a reload", Duration::from_secs(5), |s| {
            s["config_generation"] == first_generation + n + 1
        });
        latencies.push(applied - written);
        for (k, stream) in streams.iter_mut().enumerate() {
            let echoed_by = stream
                .exchange(&format!("reload {n} stream {k}"))
                .unwrap_or_else(|e| panic!("reload {n}: {e}"));
            assert_eq!(echoed_by, stream.backend, "stream {k} moved at reload {n}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let attempts = load.stop();
    let status = lab.status();

    latencies.sort();
    println!(
        "50 reloads: config written -> maps updated, median {:.1} ms, worst {:.1} ms (daemon's own apply time of the last: {} ms); \
         {} connections during them, {} failed; streams on {:?}",
        latencies[25].as_secs_f64() * 1e3,
        latencies[49].as_secs_f64() * 1e3,
        status["reloads"]["last_apply_ms"],
        attempts.len(),
        failures(&attempts).len(),
        streams.iter().map(|s| s.backend.clone()).collect::<Vec<_>>()
    );
    assert_eq!(failures(&attempts), Vec::<String>::new());
    assert!(attempts.len() > 200);
    assert_eq!(status["reloads"]["accepted"], 50);
    assert_eq!(status["reloads"]["rejected"], 0);
    assert!(streams.iter().all(|s| s.exchanges == 50));
    // be4 served new connections in the steps that had it.
    assert!(attempts.iter().any(|a| a.result.as_deref() == Ok("be4")));
    assert!(lab.balancer.stop().success());
}

#[test]
fn an_invalid_config_is_rejected_and_changes_nothing() {
    let good = config(&[(0, 1, false), (1, 1, false), (2, 1, false)]);
    let mut lab = Lab::start("invalid", 3, &good);
    let load = LoadGenerator::start(&lab.topology.client, vip(), LOAD_PORTS, LOAD_PAUSE);
    std::thread::sleep(Duration::from_millis(300));
    let before = lab.status();

    // An invalid weight, written during operation.
    let bad = good.replace(
        "address = \"10.99.0.12\", weight = 1",
        "address = \"10.99.0.12\", weight = \"heavy\"",
    );
    assert_ne!(bad, good);
    lab.write_config(&bad);
    let status_after = {
        lab.wait_for("the rejection", Duration::from_secs(5), |s| {
            s["reloads"]["rejected"] == 1
        });
        lab.status()
    };
    let error = status_after["reloads"]["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    let config_path = lab.scratch.path("config.toml");
    let line = bad.lines().position(|l| l.contains("heavy")).unwrap() + 1;
    let column = bad
        .lines()
        .nth(line - 1)
        .unwrap()
        .find("\"heavy\"")
        .unwrap()
        + 1;
    let position = format!("{}:{line}:{column}:", config_path.display());
    assert!(error.starts_with(&position), "{error}");
    assert!(error.contains("invalid type"), "{error}");
    assert_eq!(
        status_after["config_generation"],
        before["config_generation"]
    );
    assert_eq!(
        status_after["vips"][0]["table_fingerprint"],
        before["vips"][0]["table_fingerprint"]
    );
    assert!(lab
        .balancer
        .log()
        .contains(&format!("config reload rejected: {position}")));

    // `balancer reload` says so too, with a non-zero exit.
    let out = lab.reload_command();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("reload rejected") && stderr.contains(&position),
        "{stderr}"
    );
    assert_eq!(lab.status()["reloads"]["rejected"], 2);

    // A valid change is accepted; `balancer reload` then reports it as the running config.
    let changed = good.replace(
        "address = \"10.99.0.12\", weight = 1",
        "address = \"10.99.0.12\", weight = 2",
    );
    lab.write_config(&changed);
    let generation = before["config_generation"].as_u64().unwrap();
    lab.wait_for("the valid config", Duration::from_secs(5), |s| {
        s["config_generation"] == generation + 1
    });
    let out = lab.reload_command();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("reload accepted"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The metrics port takes no write action: a POST is refused and reloads nothing.
    let ns = &lab.topology.balancer;
    for path in ["/api/v1/reload", "/api/v1/status", "/metrics"] {
        let (code, body) = send(ns, api(), "POST", path).unwrap();
        assert_eq!(code, 405, "POST {path}: {body}");
    }
    let (_, body) = send(ns, api(), "POST", "/api/v1/reload").unwrap();
    assert!(body.contains("control socket"), "{body}");
    // `balancer reload` of the file that runs was no new generation, and a POST reloaded
    // nothing.
    assert_eq!(lab.generation(), generation + 1, "a POST reloaded");

    // SIGHUP reloads too: the same file again, accepted, still no new generation.
    let accepted = lab.status()["reloads"]["accepted"].as_u64().unwrap();
    lab.balancer.signal(libc::SIGHUP);
    lab.wait_for("the SIGHUP reload", Duration::from_secs(5), |s| {
        s["reloads"]["accepted"] == accepted + 1
    });
    assert_eq!(lab.generation(), generation + 1);

    let attempts = load.stop();
    assert_eq!(
        failures(&attempts),
        Vec::<String>::new(),
        "traffic was affected"
    );
    assert!(attempts.len() > 100);
    assert!(lab.balancer.stop().success());
}

/// The layout of a Kubernetes ConfigMap volume: `config.toml -> ..data/config.toml`,
/// `..data -> ..v1`; an update swaps the `..data` symlink to a new directory atomically.
#[test]
fn a_configmap_style_symlink_swap_is_seen() {
    let one = config(&[(0, 1, false), (1, 1, false)]);
    let two = config(&[(0, 1, false), (1, 5, false)]);
    let mut lab = Lab::start_with("configmap", 2, |scratch| {
        std::fs::create_dir(scratch.path("..v1")).unwrap();
        std::fs::write(scratch.path("..v1/config.toml"), &one).unwrap();
        std::os::unix::fs::symlink("..v1", scratch.path("..data")).unwrap();
        std::os::unix::fs::symlink("..data/config.toml", scratch.path("config.toml")).unwrap();
        scratch.path("config.toml")
    });
    let generation = lab.generation();
    std::fs::create_dir(lab.scratch.path("..v2")).unwrap();
    std::fs::write(lab.scratch.path("..v2/config.toml"), &two).unwrap();
    std::os::unix::fs::symlink("..v2", lab.scratch.path("..data_tmp")).unwrap();
    std::fs::rename(lab.scratch.path("..data_tmp"), lab.scratch.path("..data")).unwrap();
    lab.wait_for("the swapped config", Duration::from_secs(5), |s| {
        s["config_generation"] == generation + 1
    });
    assert_eq!(backend(&lab.status(), 1)["weight"], 5);
    assert!(
        lab.balancer
            .log()
            .contains("VIP web: 10.99.0.12 weight 1->5"),
        "{}",
        lab.balancer.log()
    );
    assert!(lab.balancer.stop().success());
}

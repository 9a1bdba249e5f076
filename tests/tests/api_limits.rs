//! The status API flooded with idle connections, in network namespaces with the real binary
//! started under the common soft limit of 1024 open files (`prlimit --nofile=1024:1024`, so
//! that raising it to the hard limit gains nothing): 2,000 connections from the client's
//! namespace that send nothing, held for 10 s, while 4 long-lived connections exchange data
//! through the VIP and every backend is health-checked over HTTP every 300 ms.
//!
//! Without a cap, about 1,100 such connections took every descriptor of the daemon: each
//! probe failed with "Too many open files", every backend went DOWN and the API stopped
//! answering. Now the API serves `api_max_connections` of them (the default), answers the
//! others 503 and closes them at once, closes the ones it serves after `api_idle_timeout`,
//! and still answers an operator on the machine's loopback (its reserve) while remote
//! clients hold every slot: the daemon listens on 0.0.0.0:9100, reachable both ways.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    io::{ErrorKind, Read as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    sync::mpsc,
    time::{Duration, Instant},
};

use balancer::{
    config::model::{DEFAULT_API_IDLE_TIMEOUT, DEFAULT_API_MAX_CONNECTIONS},
    shell::kernel::raise_nofile,
};
use balancer_tests::{
    http::{get_json, get_text, send, wait_for_status, HttpServer, LongLived},
    netns::{remove_stale, require_root},
    process::BalancerProcess,
    scratch::Scratch,
    topology::{backend_addr, DsrTopology, BALANCER_ADDR, VIP_ADDR},
};
use serde_json::Value;

const IDLE_CONNECTIONS: usize = 2_000;
const HOLD: Duration = Duration::from_secs(10);
/// The daemon's soft and hard limit on open files.
const NOFILE: &str = "1024";
const API_PORT: u16 = 9100;
/// A connection over the cap is closed within this of connecting.
const AT_ONCE: Duration = Duration::from_secs(1);

fn vip() -> SocketAddr {
    SocketAddrV4::new(VIP_ADDR, 80).into()
}

/// The API as the balancer's own namespace reaches it.
fn loopback_api() -> SocketAddr {
    SocketAddrV4::new([127, 0, 0, 1].into(), API_PORT).into()
}

/// The API as the client's namespace reaches it.
fn remote_api() -> SocketAddr {
    SocketAddrV4::new(BALANCER_ADDR, API_PORT).into()
}

/// One VIP over three backends checked over HTTP every 300 ms; the API on every address,
/// with its default limits.
fn config() -> String {
    let backends: Vec<String> = (0..3)
        .map(|i| format!("  {{ address = \"{}\" }},", backend_addr(i)))
        .collect();
    format!(
        r#"[balancer]
interface = "eth0"
hash_seed = "0x5eed"
conn_table_size = 65536
metrics_listen = "0.0.0.0:{API_PORT}"

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

/// What became of the flood's connections.
struct Flood {
    /// How long connecting them all took.
    connecting: Duration,
    /// Per connection: how long after connecting the daemon closed it (`None`: still open
    /// at the end), and whether it was answered 503.
    closed: Vec<(Option<Duration>, bool)>,
}

/// Opens `count` connections to `to` that send nothing, one after another, and watches
/// them for `hold` from the first: when each is closed by the other side (EOF or reset).
/// `connected` is told when the last one is connected. Runs in the calling thread's
/// namespace.
fn flood(to: SocketAddr, count: usize, hold: Duration, connected: mpsc::Sender<()>) -> Flood {
    let started = Instant::now();
    let mut streams: Vec<(TcpStream, Instant)> = Vec::with_capacity(count);
    let mut closed: Vec<(Option<Duration>, bool)> = vec![(None, false); count];
    let mut connecting = Duration::ZERO;
    while started.elapsed() < hold {
        if streams.len() < count {
            // Short attempts, the others watched in between: a SYN the full accept queue
            // dropped is retried by the kernel only after a second, and a connect blocked
            // that long would delay seeing the others' closes past `AT_ONCE`.
            let attempts = Instant::now();
            let stream = loop {
                match TcpStream::connect_timeout(&to, Duration::from_millis(100)) {
                    Ok(stream) => break stream,
                    Err(e) if attempts.elapsed() > Duration::from_secs(5) => {
                        panic!("connection {} to {to}: {e}", streams.len())
                    }
                    Err(_) => watch(&mut streams, &mut closed, 0),
                }
            };
            stream.set_nonblocking(true).expect("non-blocking");
            streams.push((stream, Instant::now()));
            if streams.len() == count {
                connecting = started.elapsed();
                let _ = connected.send(());
            }
        }
        // While connecting, only a look; then a wait for what happens next.
        let wait_ms = if streams.len() < count { 0 } else { 50 };
        watch(&mut streams, &mut closed, wait_ms);
    }
    Flood { connecting, closed }
}

/// One `poll` over the connections not yet closed; records the ones the other side closed.
fn watch(
    streams: &mut [(TcpStream, Instant)],
    closed: &mut [(Option<Duration>, bool)],
    wait_ms: i32,
) {
    let open: Vec<usize> = (0..streams.len())
        .filter(|&i| closed[i].0.is_none())
        .collect();
    let mut fds: Vec<libc::pollfd> = open
        .iter()
        .map(|&i| libc::pollfd {
            fd: streams[i].0.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        })
        .collect();
    // SAFETY: a valid array of pollfds, alive for the call.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
    if ready <= 0 {
        return;
    }
    for (fd, &i) in fds.iter().zip(&open) {
        if fd.revents == 0 {
            continue;
        }
        let (stream, connected_at) = &mut streams[i];
        let mut buf = [0u8; 512];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    closed[i].1 |= buf[..n].starts_with(b"HTTP/1.1 503 ");
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {}
            }
            closed[i].0 = Some(connected_at.elapsed());
            break;
        }
    }
}

/// The sum of the samples named `name` (`_total` included) whose labels contain `labels`.
fn metric(exposition: &str, name: &str, labels: &str) -> u64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (n, l) = series.split_once('{').unwrap_or((series, ""));
            n == name && l.contains(labels)
        })
        .map(|(_, value)| value.parse::<u64>().unwrap())
        .sum()
}

fn probes(status: &Value) -> Vec<u64> {
    status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["health"]["probes"].as_u64().unwrap())
        .collect()
}

fn all_up(status: &Value) -> bool {
    status["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["state"] == "active" && b["health"]["state"] == "up")
}

#[test]
fn idle_connections_to_the_api_leave_the_probes_their_descriptors() {
    require_root("the API limits test");
    remove_stale("lbt-");
    // This process holds the flood: 2,000 sockets and then some.
    let own = raise_nofile().expect("raising this test's open-files limit");
    assert!(own.now > IDLE_CONNECTIONS as u64 + 512, "{own:?}");
    let prefix = format!("lbt-{}-apilim-", std::process::id());
    let topology = DsrTopology::create(&prefix, 3);
    let _servers: Vec<HttpServer> = topology.start_http_servers(|i| format!("be{}", i + 1));
    let scratch = Scratch::new("lbt-", "api-limits");
    let config = scratch.write_atomically("config.toml", &config());
    let limit = format!("--nofile={NOFILE}:{NOFILE}");
    let mut balancer = BalancerProcess::run_wrapped(
        &topology.balancer,
        &["prlimit", &limit],
        &config,
        &scratch,
        &[],
        "balancer.log",
    );
    let (lb, client) = (&topology.balancer, &topology.client);
    balancer.wait_ready(lb, loopback_api(), Duration::from_secs(30));
    let log = || balancer.log();
    wait_for_status(
        lb,
        loopback_api(),
        "every backend probed and up",
        Duration::from_secs(10),
        |s| all_up(s) && probes(s).iter().all(|&n| n > 0),
        log,
    );
    let before = get_json(lb, loopback_api(), "/api/v1/status").unwrap();
    let exposition = get_text(lb, loopback_api(), "/metrics").unwrap();
    let failures_before = metric(&exposition, "balancer_backend_probe_failures_total", "");

    let long = LongLived::open(client, vip(), 10_000, 4);
    let (connected, all_connected) = mpsc::channel();
    let flooding = client.spawn(move || flood(remote_api(), IDLE_CONNECTIONS, HOLD, connected));
    all_connected
        .recv_timeout(DEFAULT_API_IDLE_TIMEOUT)
        .expect("the flood connected within the idle timeout");

    // Every slot is held by the flood: from the machine itself the API still answers, over
    // the cap (the loopback reserve); from the client's namespace it answers 503.
    let served = DEFAULT_API_MAX_CONNECTIONS as u64;
    let full = get_text(lb, loopback_api(), "/metrics").expect("the API on loopback");
    let status = get_json(lb, loopback_api(), "/api/v1/status").expect("the API on loopback");
    assert!(all_up(&status), "{status:#}");
    // (The 503 is written and the connection closed before the request is read: a request
    // that arrives after the close is answered by a reset, which the client may see first.)
    match send(client, remote_api(), "GET", "/api/v1/status") {
        Ok((code, body)) => assert_eq!(code, 503, "{body}"),
        Err(e) => assert!(!e.starts_with("connect"), "not even connected: {e}"),
    }
    assert_eq!(
        metric(&full, "balancer_api_connections", ""),
        served + 1,
        "{full}"
    );

    let Flood { connecting, closed } = match flooding.join() {
        Ok(flood) => flood,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let (exchanges, errors) = long.stop();
    let after = get_json(lb, loopback_api(), "/api/v1/status").expect("the API on loopback");
    let exposition = get_text(lb, loopback_api(), "/metrics").expect("metrics on loopback");
    // And from the client's namespace again, once the flood is gone.
    get_json(client, remote_api(), "/api/v1/status").expect("the API from the client");

    let served = served as usize;
    let at_once = closed
        .iter()
        .filter(|(c, _)| c.is_some_and(|c| c < AT_ONCE))
        .count();
    let answered_503 = closed.iter().filter(|(_, busy)| *busy).count();
    let timed_out: Vec<Duration> = closed
        .iter()
        .filter_map(|(c, _)| *c)
        .filter(|c| *c >= AT_ONCE)
        .collect();
    let still_open = closed.iter().filter(|(c, _)| c.is_none()).count();
    println!(
        "{IDLE_CONNECTIONS} idle connections to the API connected in {connecting:?}: {at_once} \
         closed within {AT_ONCE:?} ({answered_503} of them answered 503), {} closed after \
         {:?} to {:?}, {still_open} still open; long-lived connections: {exchanges:?} \
         exchanges, {} errors; probes per backend {:?} -> {:?}",
        timed_out.len(),
        timed_out.iter().min(),
        timed_out.iter().max(),
        errors.len(),
        probes(&before),
        probes(&after),
    );
    let log = balancer.log();
    assert!(
        log.contains(&format!("open files: limit {NOFILE} (hard limit)")),
        "{log}"
    );
    assert!(
        connecting < DEFAULT_API_IDLE_TIMEOUT,
        "connecting took {connecting:?}"
    );
    // The cap: the first ones are served (and closed by the idle timeout), every other one is
    // closed at once; none is left open by the end.
    assert_eq!(still_open, 0, "{log}");
    assert_eq!(at_once, IDLE_CONNECTIONS - served);
    assert_eq!(timed_out.len(), served, "{timed_out:?}");
    assert!(
        timed_out.iter().all(|c| *c >= DEFAULT_API_IDLE_TIMEOUT
            && *c < DEFAULT_API_IDLE_TIMEOUT + Duration::from_secs(3)),
        "{timed_out:?}"
    );
    let refused = metric(&exposition, "balancer_api_connections_refused_total", "");
    // The flood's and the client's 503.
    assert_eq!(
        refused as usize,
        IDLE_CONNECTIONS - served + 1,
        "{exposition}"
    );
    let timeouts = metric(
        &exposition,
        "balancer_api_connections_timed_out_total",
        "reason=\"header\"",
    );
    assert_eq!(timeouts as usize, served, "{exposition}");
    // Only the scrape itself is open.
    assert_eq!(
        metric(&exposition, "balancer_api_connections", ""),
        1,
        "{exposition}"
    );

    // The probes kept running and passing: nothing went down, no stream was reset.
    assert!(all_up(&after), "{after:#}\n{log}");
    let failures = metric(&exposition, "balancer_backend_probe_failures_total", "");
    assert_eq!(failures, failures_before, "{exposition}");
    let grown: Vec<u64> = probes(&after)
        .iter()
        .zip(probes(&before))
        .map(|(a, b)| a - b)
        .collect();
    assert!(
        grown.iter().all(|&n| n >= 20),
        "probes during the hold: {grown:?}"
    );
    assert!(!log.contains("is DOWN"), "{log}");
    assert!(!log.contains("Too many open files"), "{log}");
    assert_eq!(errors, Vec::<String>::new());
    assert!(exchanges.iter().all(|&n| n > 100), "{exchanges:?}");

    let exit = balancer.stop();
    assert!(exit.success(), "exit {exit}:\n{}", balancer.log());
}

//! The SYN-flood defences end to end, in network namespaces with the real binary: a
//! connection table of 16,384 entries, 2,000 established flows each exchanging a line every
//! 5 s, 200,000 SYNs from random sources in about 10 s (a raw socket in the client's
//! namespace), a fifth backend added in the middle of the flood, new legitimate connections
//! throughout; then one source opening 1,000 connections a second to a VIP with a
//! per-source limit while the client's own connections to it go through.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios and fixture tables read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use balancer_tests::{
    datapath::packet::tcp,
    http::get_text,
    netns::{remove_stale, require_root, Netns},
    process::BalancerProcess,
    scratch::Scratch,
    topology::{backend_addr, DsrTopology, VIP_ADDR},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const WEB_PORT: u16 = 80;
const LIMITED_PORT: u16 = 81;
const CONN_TABLE_SIZE: u64 = 16_384;
const NEW_FLOWS_PER_CPU: u64 = 2_000;
const ESTABLISHED: usize = 2_000;
const ROUND: Duration = Duration::from_secs(5);
const FLOOD_SYNS: u64 = 200_000;
const FLOOD_TIME: Duration = Duration::from_secs(10);
const LEGIT_PER_SECOND: u64 = 40;
const LIMIT_RATE: f64 = 100.0;
const LIMIT_BURST: f64 = 10.0;
const LIMITED_SOURCE: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Flood mode must start and end within this of the flood's start and end.
const FLOOD_MODE_BOUND: Duration = Duration::from_secs(2);

fn api() -> SocketAddr {
    "127.0.0.1:9100".parse().unwrap()
}

fn web() -> SocketAddr {
    SocketAddrV4::new(VIP_ADDR, WEB_PORT).into()
}

fn limited() -> SocketAddr {
    SocketAddrV4::new(VIP_ADDR, LIMITED_PORT).into()
}

/// The config: the web VIP and the limited VIP, over the first `backends` backends.
fn config(backends: usize) -> String {
    let list: Vec<String> = (0..backends)
        .map(|i| format!("  {{ address = \"{}\", weight = 1 }},", backend_addr(i)))
        .collect();
    let list = list.join("\n");
    format!(
        r#"[balancer]
interface = "eth0"
hash_seed = "0x5eed"
conn_table_size = {CONN_TABLE_SIZE}
metrics_listen = "127.0.0.1:9100"

[flood]
new_flows_per_cpu = {NEW_FLOWS_PER_CPU}

[[vip]]
name = "web"
address = "{VIP_ADDR}"
port = {WEB_PORT}
protocol = "tcp"
forwarding = "dsr"
backends = [
{list}
]

[[vip]]
name = "limited"
address = "{VIP_ADDR}"
port = {LIMITED_PORT}
protocol = "tcp"
forwarding = "dsr"
source_limit = {{ rate = {LIMIT_RATE}, burst = {LIMIT_BURST}, ipv4_prefix = 32 }}
backends = [
{list}
]
"#,
        LIMIT_RATE = LIMIT_RATE as u32,
        LIMIT_BURST = LIMIT_BURST as u32,
    )
}

// ---------------------------------------------------------------------------------------
// A line echo server: one thread per backend, every connection on one poll loop (2,000
// long-lived connections are 2,000 sockets, not 2,000 threads). Answers "NAME LINE\n".

struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(ns: &Netns, name: String, ports: &[u16]) -> EchoServer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ports = ports.to_vec();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let listeners: Vec<Socket> = ports
                .iter()
                .map(|port| {
                    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                        .expect("socket");
                    s.set_reuse_address(true).expect("SO_REUSEADDR");
                    s.bind(&SocketAddr::from(([0, 0, 0, 0], *port)).into())
                        .unwrap_or_else(|e| panic!("bind :{port}: {e}"));
                    s.listen(4096).expect("listen");
                    s.set_nonblocking(true).expect("nonblocking");
                    s
                })
                .collect();
            let _ = ready_tx.send(());
            serve_lines(&listeners, &name, &flag);
        });
        ready_rx.recv().expect("echo server bound");
        EchoServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn serve_lines(listeners: &[Socket], name: &str, stop: &AtomicBool) {
    let mut conns: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = listeners
            .iter()
            .map(|l| pollfd(l.as_raw_fd(), libc::POLLIN))
            .chain(
                conns
                    .iter()
                    .map(|(c, _)| pollfd(c.as_raw_fd(), libc::POLLIN)),
            )
            .collect();
        // SAFETY: a valid array of pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        let polled = fds.len() - listeners.len();
        let mut closed = Vec::new();
        for j in 0..polled {
            if fds[listeners.len() + j].revents == 0 {
                continue;
            }
            let (c, pending) = &mut conns[j];
            loop {
                match c.read(&mut buf) {
                    Ok(0) => {
                        closed.push(j);
                        break;
                    }
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        closed.push(j);
                        break;
                    }
                }
            }
            while let Some(at) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=at).collect();
                let mut out = format!("{name} ").into_bytes();
                out.extend_from_slice(&line);
                if write_all_nonblocking(c, &out).is_err() {
                    closed.push(j);
                    break;
                }
            }
        }
        closed.sort_unstable();
        closed.dedup();
        for j in closed.into_iter().rev() {
            conns.swap_remove(j);
        }
        for (i, l) in listeners.iter().enumerate() {
            if fds[i].revents == 0 {
                continue;
            }
            while let Ok((s, _)) = l.accept() {
                let s: TcpStream = s.into();
                let _ = s.set_nonblocking(true);
                let _ = s.set_nodelay(true);
                conns.push((s, Vec::new()));
            }
        }
    }
}

fn write_all_nonblocking(c: &mut TcpStream, mut out: &[u8]) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !out.is_empty() {
        match c.write(out) {
            Ok(n) => out = &out[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                let mut fd = pollfd(c.as_raw_fd(), libc::POLLOUT);
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut fd, 1, 100) };
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Clients.

/// Sends `line` and reads the answer; the name of the backend that answered.
fn exchange(stream: &mut TcpStream, pending: &mut Vec<u8>, line: &str) -> Result<String, String> {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 512];
    let answer = loop {
        if let Some(at) = pending.iter().position(|b| *b == b'\n') {
            let taken: Vec<u8> = pending.drain(..=at).collect();
            break String::from_utf8_lossy(&taken).trim_end().to_owned();
        }
        let n = stream.read(&mut buf).map_err(|e| format!("receive: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        pending.extend_from_slice(&buf[..n]);
    };
    let (backend, echoed) = answer
        .split_once(' ')
        .ok_or_else(|| format!("bad answer {answer:?}"))?;
    if echoed != line {
        return Err(format!("answer {echoed:?} to {line:?}"));
    }
    Ok(backend.to_owned())
}

/// One short connection: connect, one line, its answer, close.
fn short_connection(to: SocketAddr, n: u64) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&to, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    exchange(&mut s, &mut Vec::new(), &format!("short {n}"))
}

/// A long-lived flow: its socket, the backend that answered its first line.
struct Flow {
    stream: TcpStream,
    pending: Vec<u8>,
    backend: String,
    exchanges: u64,
}

impl Flow {
    /// One exchange; an error also when another backend answers (the flow moved).
    fn exchange(&mut self, line: &str) -> Result<(), String> {
        let by = exchange(&mut self.stream, &mut self.pending, line)?;
        if by != self.backend {
            return Err(format!("answered by {by}, established on {}", self.backend));
        }
        self.exchanges += 1;
        Ok(())
    }
}

/// Opens `count` flows from `ns`, at most `per_second` a second (under the per-CPU cap, so
/// they all get state).
fn open_flows(ns: &Netns, to: SocketAddr, count: usize, per_second: u64) -> Vec<Flow> {
    ns.run(move || {
        let start = Instant::now();
        (0..count)
            .map(|i| {
                pace(start, i as u64, per_second);
                let mut stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)
                    .unwrap_or_else(|e| panic!("flow {i}: connect: {e}"));
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                stream.set_nodelay(true).unwrap();
                let mut pending = Vec::new();
                let backend = exchange(&mut stream, &mut pending, &format!("open {i}"))
                    .unwrap_or_else(|e| panic!("flow {i}: {e}"));
                Flow {
                    stream,
                    pending,
                    backend,
                    exchanges: 1,
                }
            })
            .collect()
    })
}

/// Sleeps until event `n` of a schedule of `per_second` from `start` is due.
fn pace(start: Instant, n: u64, per_second: u64) {
    let due = start + Duration::from_nanos(n * 1_000_000_000 / per_second);
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}

/// The flows, every error, and the rounds completed.
type DriverResult = (Vec<Flow>, Vec<String>, u64);

/// The flows exchanging a line each, every `ROUND`, spread over the round, until stopped.
struct FlowDriver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<DriverResult>>,
}

impl FlowDriver {
    fn start(mut flows: Vec<Flow>) -> FlowDriver {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut rounds = 0u64;
            let gap = ROUND / flows.len() as u32;
            'rounds: loop {
                let start = Instant::now();
                for (i, f) in flows.iter_mut().enumerate() {
                    if flag.load(Ordering::Relaxed) {
                        break 'rounds;
                    }
                    let due = start + gap * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if let Err(e) = f.exchange(&format!("round {rounds} flow {i}")) {
                        errors.push(format!("flow {i} in round {rounds}: {e}"));
                    }
                }
                rounds += 1;
            }
            (flows, errors, rounds)
        });
        FlowDriver {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> DriverResult {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().expect("running").join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for FlowDriver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A short connection: when it started, the backend that answered or the error.
type Probe = (Instant, Result<String, String>);

/// New short connections at a steady rate from a thread in `ns`, until stopped.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Probe>>>,
}

impl Prober {
    fn start(ns: &Netns, to: SocketAddr, per_second: u64) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = ns.spawn(move || {
            let start = Instant::now();
            let mut results = Vec::new();
            let mut n = 0;
            while !flag.load(Ordering::Relaxed) {
                pace(start, n, per_second);
                let at = Instant::now();
                results.push((at, short_connection(to, n)));
                n += 1;
            }
            results
        });
        Prober {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Vec<Probe> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().expect("running").join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// Raw SYNs.

struct SynReport {
    sent: u64,
    failed: u64,
    started: Instant,
    ended: Instant,
}

impl SynReport {
    fn rate(&self) -> f64 {
        self.sent as f64 / (self.ended - self.started).as_secs_f64()
    }
}

/// `count` SYNs to `dst` over `over`, from a raw socket in `ns`; SYN `n` comes from
/// `source(n)` and port `1024 + n % 64000` (distinct 5-tuples for a fixed source).
fn send_syns(
    ns: &Netns,
    dst: SocketAddrV4,
    count: u64,
    over: Duration,
    source: impl Fn(u64) -> Ipv4Addr + Send + 'static,
) -> JoinHandle<SynReport> {
    ns.spawn(move || {
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .expect("raw socket");
        let _ = socket.set_send_buffer_size(4 << 20);
        let to = SockAddr::from(dst);
        let per_second = (count as f64 / over.as_secs_f64()) as u64;
        let (mut sent, mut failed) = (0, 0);
        let started = Instant::now();
        for n in 0..count {
            if n % 10 == 0 {
                pace(started, n, per_second);
            }
            // The packet builder of the datapath fixtures (checksums computed).
            let packet = tcp(
                IpAddr::V4(*dst.ip()),
                1024 + (n % 64_000) as u16,
                dst.port(),
            )
            .from(IpAddr::V4(source(n)))
            .ip_bytes();
            match socket.send_to(&packet, &to) {
                Ok(_) => sent += 1,
                Err(_) => failed += 1,
            }
        }
        SynReport {
            sent,
            failed,
            started,
            ended: Instant::now(),
        }
    })
}

// ---------------------------------------------------------------------------------------
// Metrics.

/// The value of the sample `series` (a name, with its labels if any) in a Prometheus text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

fn metrics(ns: &Netns) -> String {
    get_text(ns, api(), "/metrics").expect("/metrics")
}

const FLOOD_MODE: &str = "balancer_flood_mode";
const FLOODS: &str = "balancer_floods_total";
const CONN_ENTRIES: &str = "balancer_conn_table_entries";
const GENERATION: &str = "balancer_config_generation";
const LIMITED_DROPS: &str = "balancer_dropped_packets_total{reason=\"source_limited\"}";

fn defence_event(event: &str) -> String {
    format!("balancer_defence_events_total{{event=\"{event}\"}}")
}

/// Waits (up to `timeout`) for a metric to satisfy `done`; its last value.
fn wait_metric(ns: &Netns, series: &str, timeout: Duration, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric(&metrics(ns), series);
        if done(v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn success_ratio(results: &[Probe]) -> (usize, usize, Vec<String>) {
    let ok = results.iter().filter(|(_, r)| r.is_ok()).count();
    let failures = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().cloned())
        .collect();
    (ok, results.len(), failures)
}

#[test]
fn a_syn_flood_loses_no_established_flow_and_a_greedy_source_is_held_to_its_limit() {
    require_root("the SYN-flood test");
    remove_stale("lbt-");
    let test_started = Instant::now();
    let prefix = format!("lbt-{}-flood-", std::process::id());
    let topology = DsrTopology::create(&prefix, 5);
    // Bridged frames skip iptables in the switch (if br_netfilter is loaded at all).
    let _ = topology
        .switch
        .command("sysctl")
        .args(["-q", "-w", "net.bridge.bridge-nf-call-iptables=0"])
        .output();
    // The backends' SYN-ACKs to the flood's made-up sources go nowhere; their SYN queues
    // overflow into SYN cookies rather than refusing the client.
    for ns in &topology.backends {
        ns.ip(&["route", "add", "blackhole", "198.18.0.0/15"]);
        ns.sysctl("net.ipv4.tcp_syncookies", "1");
        ns.sysctl("net.ipv4.tcp_max_syn_backlog", "4096");
    }
    topology.pin_arp();
    let servers: Vec<EchoServer> = topology
        .backends
        .iter()
        .enumerate()
        .map(|(i, ns)| EchoServer::start(ns, format!("be{}", i + 1), &[WEB_PORT, LIMITED_PORT]))
        .collect();

    let scratch = Scratch::new("lbt-", "flood");
    let config_path = scratch.write_atomically("config.toml", &config(4));
    let mut balancer = BalancerProcess::run(
        &topology.balancer,
        &config_path,
        &scratch,
        &[],
        "balancer.log",
    );
    balancer.wait_ready(&topology.balancer, api(), Duration::from_secs(30));
    let lb = &topology.balancer;

    // --- Part 1: the flood. ----------------------------------------------------------------
    let opened = Instant::now();
    let flows = open_flows(&topology.client, web(), ESTABLISHED, 800);
    println!(
        "{ESTABLISHED} flows established in {:.1} s",
        opened.elapsed().as_secs_f64()
    );
    let mut per_backend = std::collections::BTreeMap::<String, usize>::new();
    for f in &flows {
        *per_backend.entry(f.backend.clone()).or_default() += 1;
    }
    println!("established flows per backend: {per_backend:?}");
    let driver = FlowDriver::start(flows);
    let entries = wait_metric(lb, CONN_ENTRIES, Duration::from_secs(5), |v| {
        v >= ESTABLISHED as f64
    });
    let before = metrics(lb);
    println!(
        "before the flood: conn_table_entries {entries}, flood mode {}, floods {}",
        metric(&before, FLOOD_MODE),
        metric(&before, FLOODS)
    );
    assert!(
        entries >= ESTABLISHED as f64,
        "{entries} entries before the flood"
    );
    assert_eq!(
        metric(&before, FLOOD_MODE),
        0.0,
        "flood mode before the flood"
    );
    assert_eq!(metric(&before, FLOODS), 0.0, "a flood before the flood");
    let generation = metric(&before, GENERATION);

    let legit = Prober::start(&topology.client, web(), LEGIT_PER_SECOND);
    std::thread::sleep(Duration::from_millis(500));
    let flood = send_syns(
        &topology.client,
        SocketAddrV4::new(VIP_ADDR, WEB_PORT),
        FLOOD_SYNS,
        FLOOD_TIME,
        |_| {
            // 198.18.0.0/15, which nothing answers.
            let n = fastrand::u32(..1 << 17);
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + n)
        },
    );
    let flood_sent_at = Instant::now();
    // (when, flood mode, floods, conn entries)
    let mut samples: Vec<(Instant, f64, f64, f64)> = Vec::new();
    let mut reloaded: Option<(Instant, Instant)> = None;
    let mut flood_report: Option<SynReport> = None;
    let mut flood = Some(flood);
    loop {
        let text = metrics(lb);
        let now = Instant::now();
        samples.push((
            now,
            metric(&text, FLOOD_MODE),
            metric(&text, FLOODS),
            metric(&text, CONN_ENTRIES),
        ));
        if reloaded.is_none() && now >= flood_sent_at + FLOOD_TIME / 2 {
            // The fifth backend, in the middle of the flood.
            scratch.write_atomically("config.toml", &config(5));
            reloaded = Some((now, now));
        }
        if let Some((written, applied)) = &mut reloaded {
            if applied == written && metric(&text, GENERATION) > generation {
                *applied = now;
            }
        }
        if flood.as_ref().is_some_and(JoinHandle::is_finished) {
            flood_report = Some(flood.take().unwrap().join().expect("flood thread"));
        }
        if let Some(r) = &flood_report {
            let over = samples.iter().any(|s| s.0 > r.ended && s.1 == 0.0);
            if over || now > r.ended + Duration::from_secs(6) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let flood = flood_report.expect("flood report");
    std::thread::sleep(Duration::from_millis(500));
    let legit = legit.stop();
    let after = metrics(lb);
    let (mut flows, mut errors, rounds) = driver.stop();
    // One more round after the flood: every flow still answers, from its own backend.
    for (i, f) in flows.iter_mut().enumerate() {
        if let Err(e) = f.exchange(&format!("after flow {i}")) {
            errors.push(format!("flow {i} after the flood: {e}"));
        }
    }
    let entries_after = wait_metric(lb, CONN_ENTRIES, Duration::from_secs(3), |v| {
        v >= ESTABLISHED as f64
    });
    let min_entries = samples.iter().map(|s| s.3).fold(f64::INFINITY, f64::min);

    let start_delay = samples
        .iter()
        .find(|s| s.1 == 1.0)
        .map(|s| s.0.saturating_duration_since(flood.started));
    let end_delay = samples
        .iter()
        .find(|s| s.0 > flood.ended && s.1 == 0.0)
        .map(|s| s.0 - flood.ended);
    let (ok, total, failures) = success_ratio(&legit);
    let (written, applied) = reloaded.expect("the reload was written");
    println!(
        "flood: {} SYNs sent ({} failed) in {:.2} s = {:.0}/s",
        flood.sent,
        flood.failed,
        (flood.ended - flood.started).as_secs_f64(),
        flood.rate()
    );
    println!(
        "flood mode: on {:?} after the flood began, off {:?} after it ended (polled every 200 ms); floods {} -> {}",
        start_delay,
        end_delay,
        metric(&before, FLOODS),
        metric(&after, FLOODS)
    );
    println!(
        "defence events: pending {}, promoted {}, reused {}, capped {}",
        metric(&after, &defence_event("pending")),
        metric(&after, &defence_event("promoted")),
        metric(&after, &defence_event("reused")),
        metric(&after, &defence_event("capped")),
    );
    println!(
        "be5 added {:.1} s into the flood, applied after {} ms",
        (written - flood.started).as_secs_f64(),
        (applied - written).as_millis()
    );
    println!(
        "legitimate new connections during the flood: {ok}/{total} ({:.2}%); failures: {failures:?}",
        100.0 * ok as f64 / total.max(1) as f64
    );
    println!(
        "established flows: {} driver rounds, {} exchanges, {} errors; conn_table_entries min {min_entries} during, {entries_after} after",
        rounds,
        flows.iter().map(|f| f.exchanges).sum::<u64>(),
        errors.len()
    );

    assert!(
        errors.is_empty(),
        "established flows broke: {} errors, first {:?}",
        errors.len(),
        &errors[..errors.len().min(20)]
    );
    assert!(entries_after >= ESTABLISHED as f64, "{entries_after}");
    assert!(
        min_entries >= ESTABLISHED as f64,
        "the connection table fell to {min_entries} during the flood"
    );
    assert!(total >= 300, "only {total} legitimate connections");
    assert!(
        ok as f64 >= 0.99 * total as f64,
        "{ok}/{total} legitimate connections: {failures:?}"
    );
    assert!(
        legit
            .iter()
            .any(|(at, r)| *at > applied && r.as_deref() == Ok("be5")),
        "be5 got no new connection after it was added"
    );
    let start_delay = start_delay.expect("flood mode never started");
    let end_delay = end_delay.expect("flood mode did not end within 6 s of the flood");
    assert!(
        start_delay <= FLOOD_MODE_BOUND,
        "flood mode on after {start_delay:?}"
    );
    assert!(
        end_delay <= FLOOD_MODE_BOUND,
        "flood mode off after {end_delay:?}"
    );
    assert_eq!(
        metric(&after, FLOODS) - metric(&before, FLOODS),
        1.0,
        "one flood, one flood mode"
    );
    let log = balancer.log();
    assert!(log.contains("flood mode: new flows over the cap"), "{log}");
    assert!(log.contains("flood mode over after"), "{log}");

    // --- Part 2: one greedy source. --------------------------------------------------------
    let dropped_before = metric(&metrics(lb), LIMITED_DROPS);
    let legit = Prober::start(&topology.client, limited(), 20);
    std::thread::sleep(Duration::from_millis(300));
    let greedy = send_syns(
        &topology.client,
        SocketAddrV4::new(VIP_ADDR, LIMITED_PORT),
        5_000,
        Duration::from_secs(5),
        |_| LIMITED_SOURCE,
    )
    .join()
    .expect("greedy source");
    std::thread::sleep(Duration::from_millis(300));
    let legit = legit.stop();
    // The counters are read about every second: wait until the count settles.
    let mut dropped = metric(&metrics(lb), LIMITED_DROPS);
    loop {
        std::thread::sleep(Duration::from_millis(1200));
        let again = metric(&metrics(lb), LIMITED_DROPS);
        if again == dropped {
            break;
        }
        dropped = again;
    }
    let limited_drops = dropped - dropped_before;
    let duration = (greedy.ended - greedy.started).as_secs_f64();
    let admitted = greedy.sent as f64 - limited_drops;
    let expected = LIMIT_BURST + LIMIT_RATE * duration;
    let (ok, total, failures) = success_ratio(&legit);
    println!(
        "greedy source: {} SYNs ({} failed) in {duration:.2} s = {:.0}/s; {limited_drops} dropped as source_limited; \
         admitted {admitted} vs expected {expected:.0} ({:+.1}%)",
        greedy.sent,
        greedy.failed,
        greedy.rate(),
        100.0 * (admitted - expected) / expected
    );
    println!("the client's own connections to the limited VIP meanwhile: {ok}/{total}; failures: {failures:?}");
    assert!(
        (admitted - expected).abs() <= 0.10 * expected,
        "admitted {admitted}, expected {expected}"
    );
    assert!(
        total >= 80,
        "only {total} connections from the other source"
    );
    assert_eq!(ok, total, "the other source was limited: {failures:?}");

    assert!(balancer.stop().success(), "{}", balancer.log());
    drop(servers);
    println!("whole test: {:.1} s", test_started.elapsed().as_secs_f64());
}

//! `cargo xtask demo`: the balancer doing its job on a topology of network namespaces, with
//! real HTTP servers and a real client, and a report of what happened. Everything it creates
//! is removed at the end, on failure, and on Ctrl-C.

use std::{
    net::SocketAddrV4,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use balancer_tests::{
    http::{get_json, run_requests, HttpServer},
    netns::{remove_stale, Netns},
    process::BalancerProcess,
    scratch::Scratch,
    topology::{
        backend_addr, nat_backend_addr, DsrTopology, NatTopology, BALANCER_ADDR, CLIENT_ADDR,
        NAT_BACKEND_PORT, NAT_BALANCER_ADDR, NAT_CLIENT_ADDR, NAT_SNAT_ADDR, NAT_VIP_ADDR,
        VIP_ADDR,
    },
};
use serde_json::Value;

use crate::{build_balancer, setup, workspace_root};

const BACKENDS: usize = 3;
const FIRST_PORT: u16 = 30_000;

pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub(crate) extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub(crate) fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted (Ctrl-C); cleaning up");
    }
    Ok(())
}

fn say(message: &str) {
    println!("[demo] {message}");
}

/// How the demo's balancer reaches its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Forwarding {
    Dsr,
    Nat,
}

/// The namespaces of either demo.
enum Topology {
    Dsr(DsrTopology),
    Nat(NatTopology),
}

impl Topology {
    fn client(&self) -> &Netns {
        match self {
            Topology::Dsr(t) => &t.client,
            Topology::Nat(t) => &t.client,
        }
    }
    fn balancer(&self) -> &Netns {
        match self {
            Topology::Dsr(t) => &t.balancer,
            Topology::Nat(t) => &t.balancer,
        }
    }
}

/// Creates the topology of `forwarding` and starts its HTTP servers, saying what it does.
fn create(prefix: &str, forwarding: Forwarding) -> (Topology, Vec<HttpServer>) {
    match forwarding {
        Forwarding::Dsr => {
            say(&format!(
                "creating namespaces {prefix}*: client {CLIENT_ADDR}, balancer {BALANCER_ADDR}, backends {}..{}, \
                 one bridge; VIP {VIP_ADDR} on every backend's loopback (arp_ignore=1, arp_announce=2)",
                backend_addr(0),
                backend_addr(BACKENDS - 1)
            ));
            let topology = DsrTopology::create(prefix, BACKENDS);
            let servers = topology.start_http_servers(|i| backend_addr(i).to_string());
            say(&format!(
                "HTTP servers listening on {VIP_ADDR}:80 in each of the {BACKENDS} backends"
            ));
            topology.pin_arp();
            (Topology::Dsr(topology), servers)
        }
        Forwarding::Nat => {
            say(&format!(
                "creating namespaces {prefix}*: client {NAT_CLIENT_ADDR}, balancer {NAT_BALANCER_ADDR} and \
                 {NAT_SNAT_ADDR}, backends {}..{} with nothing changed: no VIP, no ARP settings, \
                 and no route to the client's network",
                nat_backend_addr(0),
                nat_backend_addr(BACKENDS - 1)
            ));
            let topology = NatTopology::create(prefix, BACKENDS);
            let servers = topology.start_http_servers(|i| nat_backend_addr(i).to_string());
            let route = topology.backends[0]
                .command("ip")
                .args(["route", "get", &NAT_CLIENT_ADDR.to_string()])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
                .unwrap_or_default();
            say(&format!(
                "HTTP servers listening on each backend's own address, port {NAT_BACKEND_PORT}; \
                 `ip route get {NAT_CLIENT_ADDR}` in a backend: {route}"
            ));
            (Topology::Nat(topology), servers)
        }
    }
}

pub fn run(requests: u64, forwarding: Forwarding) -> Result<()> {
    if requests == 0 || requests > 30_000 {
        bail!("--requests must be between 1 and 30000");
    }
    setup::run()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo needs root (network namespaces, XDP): run `sudo cargo xtask demo`");
    }
    let binary = build_balancer(false)?;
    std::env::set_var("BALANCER_BIN", &binary);
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        )
    };

    let prefix = "lbdemo-";
    remove_stale(prefix);
    let prefix = format!("{prefix}{}-", std::process::id());
    let (topology, servers) = create(&prefix, forwarding);
    interrupted()?;
    let (config, vip) = match forwarding {
        Forwarding::Dsr => ("config/demo.toml", VIP_ADDR),
        Forwarding::Nat => ("config/demo-nat.toml", NAT_VIP_ADDR),
    };
    let config = workspace_root().join(config);
    let mut files = Scratch::new("lbdemo-", "files");
    let log = files.path("balancer.log");
    // Under `ip netns exec` /sys is a fresh sysfs without the bpffs mount: pins go to a bpffs
    // mounted for namespaced runs.
    let pin_dir = files.pin_dir_arg();
    say(&format!(
        "starting `balancer run --config {} --pin-dir {pin_dir}` in the balancer's namespace (log: {})",
        config.display(),
        log.display()
    ));
    let mut balancer =
        BalancerProcess::run(topology.balancer(), &config, &files, &[], "balancer.log");
    let api = "127.0.0.1:9100".parse().unwrap();
    balancer.wait_ready(topology.balancer(), api, Duration::from_secs(30));
    for line in balancer.log().lines() {
        println!("    | {line}");
    }
    interrupted()?;

    say(&format!(
        "sending {requests} HTTP requests to {vip}:80 from the client, one TCP connection each"
    ));
    let started = Instant::now();
    let step = (requests / 6).max(1);
    let report = run_requests(
        topology.client(),
        SocketAddrV4::new(vip, 80).into(),
        requests,
        FIRST_PORT,
        move |done| {
            if done % step == 0 || done == requests {
                println!("    {done}/{requests}");
            }
            !INTERRUPTED.load(Ordering::SeqCst)
        },
    );
    let elapsed = started.elapsed();
    interrupted()?;
    std::thread::sleep(Duration::from_millis(200));
    let status = get_json(topology.balancer(), api, "/api/v1/status")
        .map_err(anyhow::Error::msg)
        .context("status API")?;

    println!();
    say(&format!(
        "{} of {requests} requests succeeded in {:.2}s",
        report.succeeded(),
        elapsed.as_secs_f64()
    ));
    print_table(&status, &report.per_backend, &servers);
    if forwarding == Forwarding::Nat {
        print_nat(&status, &servers);
    }
    for failure in report.failures.iter().take(10) {
        println!("    failed: {failure}");
    }

    let exit = balancer.stop();
    if !report.failures.is_empty() || !exit.success() {
        say(&format!("logs kept in {}", files.keep().display()));
    }
    say(&format!("balancer stopped ({exit}); it logged:"));
    for line in balancer
        .log()
        .lines()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("    | {line}");
    }
    drop(servers);
    drop(topology);
    say("namespaces removed");
    if !report.failures.is_empty() {
        bail!("{} requests failed", report.failures.len());
    }
    if !exit.success() {
        bail!("the balancer exited with {exit}");
    }
    Ok(())
}

/// What NAT did, and whom the backends saw.
fn print_nat(status: &Value, servers: &[HttpServer]) {
    let nat = &status["nat"];
    println!(
        "  NAT: {} connections created ({} kept the client's port), {} packets translated to \
         backends, {} replies translated back to the client",
        nat["events"]["created"], nat["events"]["port_kept"], nat["forwarded"], nat["replies"]
    );
    let seen: std::collections::BTreeSet<String> = servers
        .iter()
        .flat_map(HttpServer::peers)
        .map(|a| a.to_string())
        .collect();
    println!(
        "  the backends saw connections from: {} (the balancer's SNAT address; the client is {NAT_CLIENT_ADDR})\n",
        seen.into_iter().collect::<Vec<_>>().join(", ")
    );
}

fn print_table(
    status: &Value,
    per_backend: &std::collections::BTreeMap<String, u64>,
    servers: &[HttpServer],
) {
    let vip = &status["vips"][0];
    println!(
        "\n  VIP {} {}:{}/{}  (XDP {} mode on {})",
        vip["name"].as_str().unwrap_or("?"),
        vip["address"].as_str().unwrap_or("?"),
        vip["port"],
        vip["protocol"].as_str().unwrap_or("?"),
        status["xdp_mode"].as_str().unwrap_or("?"),
        status["interface"].as_str().unwrap_or("?"),
    );
    println!(
        "  {:<12} {:>6} {:>6}   {:>14} {:>14}   {:>17} {:>8} {:>9}",
        "backend",
        "weight",
        "slots",
        "client: served",
        "server: served",
        "balancer: flows",
        "packets",
        "bytes"
    );
    let mut totals = [0u64; 5];
    for (i, b) in vip["backends"].as_array().into_iter().flatten().enumerate() {
        let address = b["address"].as_str().unwrap_or("?");
        let client = per_backend.get(address).copied().unwrap_or(0);
        let server = servers.get(i).map_or(0, HttpServer::served);
        let stats = &b["stats"];
        let (flows, packets, bytes) = (
            stats["new_flows"].as_u64().unwrap_or(0),
            stats["packets"].as_u64().unwrap_or(0),
            stats["bytes"].as_u64().unwrap_or(0),
        );
        for (t, v) in totals
            .iter_mut()
            .zip([client, server, flows, packets, bytes])
        {
            *t += v;
        }
        println!(
            "  {:<12} {:>6} {:>6}   {:>14} {:>14}   {:>17} {:>8} {:>9}",
            address,
            b["weight"].as_u64().unwrap_or(0),
            b["slots"].as_u64().unwrap_or(0),
            client,
            server,
            flows,
            packets,
            bytes
        );
    }
    println!(
        "  {:<12} {:>6} {:>6}   {:>14} {:>14}   {:>17} {:>8} {:>9}",
        "total", "", "", totals[0], totals[1], totals[2], totals[3], totals[4]
    );
    let verdicts = &status["verdicts"];
    println!(
        "\n  balancer verdicts: tx {}, redirect {}, pass {}, drop {}, aborted {}",
        verdicts["tx"],
        verdicts["redirect"],
        verdicts["pass"],
        verdicts["drop"],
        verdicts["aborted"]
    );
    let passed: Vec<String> = status["outcomes"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, v)| {
            v.as_u64().unwrap_or(0) > 0
                && !balancer_common::Outcome::named(name).is_some_and(|o| o.forwards())
        })
        .map(|(name, v)| format!("{name} {v}"))
        .collect();
    if !passed.is_empty() {
        println!("  not forwarded, by reason: {}", passed.join(", "));
    }
    println!();
}

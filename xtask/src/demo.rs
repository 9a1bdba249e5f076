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
    netns::remove_stale,
    process::BalancerProcess,
    scratch::Scratch,
    topology::{backend_addr, DsrTopology, BALANCER_ADDR, CLIENT_ADDR, VIP_ADDR},
};
use serde_json::Value;

use crate::{build_balancer, setup, workspace_root};

const BACKENDS: usize = 3;
const FIRST_PORT: u16 = 30_000;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted (Ctrl-C); cleaning up");
    }
    Ok(())
}

fn say(message: &str) {
    println!("[demo] {message}");
}

pub fn run(requests: u64) -> Result<()> {
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
    say(&format!(
        "creating namespaces {prefix}*: client {CLIENT_ADDR}, balancer {BALANCER_ADDR}, backends {}..{}, \
         one bridge; VIP {VIP_ADDR} on every backend's loopback (arp_ignore=1, arp_announce=2)",
        backend_addr(0),
        backend_addr(BACKENDS - 1)
    ));
    let topology = DsrTopology::create(&prefix, BACKENDS);
    interrupted()?;
    let servers = topology.start_http_servers(|i| backend_addr(i).to_string());
    say(&format!(
        "HTTP servers listening on {VIP_ADDR}:80 in each of the {BACKENDS} backends"
    ));
    topology.pin_arp();

    let config = workspace_root().join("config/demo.toml");
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
        BalancerProcess::run(&topology.balancer, &config, &files, &[], "balancer.log");
    let api = "127.0.0.1:9100".parse().unwrap();
    balancer.wait_ready(&topology.balancer, api, Duration::from_secs(30));
    for line in balancer.log().lines() {
        println!("    | {line}");
    }
    interrupted()?;

    say(&format!("sending {requests} HTTP requests to {VIP_ADDR}:80 from the client, one TCP connection each"));
    let started = Instant::now();
    let step = (requests / 6).max(1);
    let report = run_requests(
        &topology.client,
        SocketAddrV4::new(VIP_ADDR, 80).into(),
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
    let status = get_json(&topology.balancer, api, "/api/v1/status")
        .map_err(anyhow::Error::msg)
        .context("status API")?;

    println!();
    say(&format!(
        "{} of {requests} requests succeeded in {:.2}s",
        report.succeeded(),
        elapsed.as_secs_f64()
    ));
    print_table(&status, &report.per_backend, &servers);
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
        .filter(|(name, v)| !name.starts_with("forwarded") && v.as_u64().unwrap_or(0) > 0)
        .map(|(name, v)| format!("{name} {v}"))
        .collect();
    if !passed.is_empty() {
        println!("  not forwarded, by reason: {}", passed.join(", "));
    }
    println!();
}

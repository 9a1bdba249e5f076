//! `cargo xtask demo --autoscale`: the scale-out loop, live. A client whose new-connection
//! rate ramps up and back down, the balancer in front of backends it finds in DNS (NAT, so
//! the backends are plain HTTP servers), a real DNS server (dnsmasq), and a scaler playing
//! the Kubernetes HorizontalPodAutoscaler on the balancer's published rate: it creates
//! backend namespaces and publishes them in DNS when the load grows, and when it shrinks,
//! takes them out of DNS, waits until the balancer has drained them, then removes them, so
//! that no request fails. A timeline is printed every second and a picture of the run is
//! written under target/. Everything it creates is removed at the end, on failure, and on
//! Ctrl-C.
//!
//! `cargo xtask test` runs the short profile ([`SHORT`]) in its network-namespace tier.

mod hpa;
mod load;
mod svg;
mod timeline;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use balancer_tests::{
    dns::Dnsmasq,
    http::{get_json, HttpServer},
    netns::remove_stale,
    process::BalancerProcess,
    scratch::Scratch,
    topology::{
        nat_backend_addr, NatTopology, NAT_BACKEND_PORT, NAT_CLIENT_ADDR, NAT_DNS_ADDR,
        NAT_VIP_ADDR,
    },
};
use serde_json::Value;

use self::{
    hpa::{Action, Fleet, Hpa, HpaSpec},
    load::{Completed, LoadShape, RampedLoad},
    timeline::{Expectations, Sample},
};
use crate::{build_balancer, demo, setup, workspace_root};

/// Every namespace, file and pin of the demo starts with this (and the process id).
const PREFIX: &str = "lbas-";
const DOMAIN: &str = "demo.test";
/// The name the balancer discovers its backends under.
const SERVICE: &str = "web.demo.test";
/// Seconds: dnsmasq's TTL on the records, the balancer's resolution interval, the health
/// checks' interval.
const DNS_TTL: u32 = 1;
const DISCOVERY_INTERVAL_S: u32 = 1;
const HEALTH_INTERVAL_MS: u32 = 500;
const API: &str = "127.0.0.1:9100";
/// Backend addresses handed out round robin: 10.95.0.11 to 10.95.0.42.
const ADDRESS_POOL: usize = 32;
/// A retiring backend is stopped once drained, or after this long anyway
/// (`terminationGracePeriodSeconds`); the balancer keeps a removed backend's flows longer
/// (`removal_grace`, 60 s in the config).
const DRAIN_GRACE: Duration = Duration::from_secs(45);
/// How long a new backend may take to serve after the scaler decided it: the scaler's
/// next sync (1 s), namespace, server and DNS record (well under 1 s), the balancer's next
/// resolution (1 s), its first health check (within 0.5 s; rise 1) and the next reading of
/// the status (1 s).
const START_ALLOWANCE: f64 = 4.0;

/// A run of the demo: the load's shape and the scaler's settings.
pub struct Profile {
    pub name: &'static str,
    pub load: LoadShape,
    /// The VIP's `target_per_backend` and the HPA's `averageValue`: new connections per
    /// second one backend is meant to take.
    pub target_per_backend: f64,
    /// The balancer's `autoscale.window`: the rate is averaged over this many seconds.
    pub rate_window: u32,
    pub scale_down_stabilisation: Duration,
    pub max_replicas: u32,
    /// The picture, under target/.
    pub picture: &'static str,
}

/// `cargo xtask demo --autoscale`: 5 -> 120 -> 5 new connections/s over 115 s.
pub const FULL: Profile = Profile {
    name: "full",
    load: LoadShape(&[
        (0.0, 5.0),
        (10.0, 5.0),
        (45.0, 120.0),
        (55.0, 120.0),
        (90.0, 5.0),
        (115.0, 5.0),
    ]),
    target_per_backend: 20.0,
    rate_window: 10,
    scale_down_stabilisation: Duration::from_secs(15),
    max_replicas: 8,
    picture: "autoscale-demo.svg",
};

/// `--short`, and the test tier: 5 -> 80 -> 5 new connections/s over 46 s.
pub const SHORT: Profile = Profile {
    name: "short",
    load: LoadShape(&[
        (0.0, 5.0),
        (4.0, 5.0),
        (16.0, 80.0),
        (20.0, 80.0),
        (32.0, 5.0),
        (46.0, 5.0),
    ]),
    target_per_backend: 20.0,
    rate_window: 5,
    scale_down_stabilisation: Duration::from_secs(6),
    max_replicas: 8,
    picture: "autoscale-demo-short.svg",
};

fn say(message: &str) {
    println!("[autoscale] {message}");
}

/// `cargo xtask demo --autoscale [--short]`.
pub fn run(short: bool) -> Result<()> {
    // What `cargo xtask demo` needs, dnsmasq-base (the DNS server) included.
    setup::run()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo needs root (network namespaces, XDP): run `sudo cargo xtask demo --autoscale`"
        );
    }
    let binary = build_balancer(false)?;
    std::env::set_var("BALANCER_BIN", &binary);
    run_profile(if short { &SHORT } else { &FULL })
}

/// Ctrl-C sets a flag the demo checks every second, for as long as this lives; then the
/// handler that was there before is back (the test tier's own Ctrl-C stops the command).
struct InterruptGuard(libc::sighandler_t);

impl InterruptGuard {
    fn install() -> InterruptGuard {
        demo::INTERRUPTED.store(false, Ordering::SeqCst);
        // SAFETY: installing a handler that only stores to an atomic.
        let previous = unsafe {
            libc::signal(
                libc::SIGINT,
                demo::on_interrupt as *const () as libc::sighandler_t,
            )
        };
        InterruptGuard(previous)
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        // SAFETY: putting back the handler `install` replaced.
        unsafe { libc::signal(libc::SIGINT, self.0) };
    }
}

/// What a killed run left behind: processes in `lbas-<pid>-*` namespaces of a process that
/// is gone (dnsmasq, the balancer: each keeps its namespace alive after `ip netns del`), by
/// their ids; then the namespaces themselves.
fn remove_stale_runs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let owner = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_none_or(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
            continue;
        }
        let pids = Command::new("ip").args(["netns", "pids", name]).output();
        for pid in pids
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            say(&format!(
                "stopping process {pid}, left in {name} by a killed run"
            ));
            // SAFETY: a signal to a process id just listed in our own stale namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    remove_stale(PREFIX);
}

/// The balancer's config for `profile`: one NAT VIP whose backends come from DNS.
fn config(profile: &Profile) -> String {
    format!(
        r#"# The autoscale demo's balancer (`cargo xtask demo --autoscale`), written by
# xtask/src/autoscale.rs for the {name} profile.
[balancer]
interface = "eth0"
xdp_mode = "auto"
hash_seed = "0x5eed"
metrics_listen = "{API}"
nat_table_size = 65536
# A backend gone from DNS keeps its connections this long; the scaler stops it as soon as
# the balancer remembers none.
removal_grace = "60s"

[[vip]]
name = "web"
address = "{NAT_VIP_ADDR}"
port = 80
protocol = "tcp"
forwarding = "nat"
# A new backend takes connections once a probe passed (initial = "down"), like a pod once ready.
health = {{ kind = "http", path = "/", interval = "{HEALTH_INTERVAL_MS}ms", timeout = "400ms", rise = 1, fall = 2, initial = "down" }}
autoscale = {{ metric = "new_flows_per_second", target_per_backend = {target:.1}, tolerance = 0.1, window = "{window}s" }}
discover = {{ dns = "{SERVICE}", port = {NAT_BACKEND_PORT}, interval = "{DISCOVERY_INTERVAL_S}s", timeout = "500ms", resolvers = ["{NAT_DNS_ADDR}"], empty_grace = "30s", max_backends = 64 }}
"#,
        name = profile.name,
        target = profile.target_per_backend,
        window = profile.rate_window,
    )
}

/// The demo's namespaces, DNS server and backend servers. Dropped in this order: servers
/// (their threads keep a namespace alive), dnsmasq, then the namespaces.
struct Cluster {
    servers: BTreeMap<usize, HttpServer>,
    dns: Dnsmasq,
    topology: NatTopology,
}

impl Cluster {
    fn create(prefix: &str) -> Cluster {
        let mut topology = NatTopology::create(prefix, 0);
        let dns = Dnsmasq::start(
            topology.add_dns_host(),
            NAT_DNS_ADDR.into(),
            DOMAIN,
            DNS_TTL,
        );
        Cluster {
            servers: BTreeMap::new(),
            dns,
            topology,
        }
    }

    /// Performs what the fleet decided, saying what it does.
    fn perform(&mut self, action: &Action) {
        match action {
            Action::Start(i) => {
                let ns = self.topology.add_backend(*i);
                let listen = SocketAddrV4::new(nat_backend_addr(*i), NAT_BACKEND_PORT);
                let server =
                    HttpServer::start(ns, &nat_backend_addr(*i).to_string(), listen.into());
                self.servers.insert(*i, server);
                println!(
                    "        + backend {listen} started (namespace {})",
                    ns_name(&self.topology, *i)
                );
            }
            Action::Publish(indexes) => {
                let addresses: Vec<IpAddr> = indexes
                    .iter()
                    .map(|i| nat_backend_addr(*i).into())
                    .collect();
                self.dns.set_addresses(SERVICE, &addresses);
                let list: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
                println!("        = DNS {SERVICE} A {}", list.join(" "));
            }
            Action::Stop { index, forced } => {
                drop(self.servers.remove(index));
                self.topology.remove_backend(*index);
                println!(
                    "        - backend {} stopped{}",
                    nat_backend_addr(*index),
                    if *forced {
                        " WITHOUT BEING DRAINED (grace period over)"
                    } else {
                        ": drained (no new flows, none remembered)"
                    }
                );
            }
        }
    }
}

fn ns_name(topology: &NatTopology, i: usize) -> String {
    topology
        .backend(i)
        .map_or_else(String::new, |ns| ns.name().to_owned())
}

/// The balancer's view, as the status API shows it.
struct View {
    rate: Option<f64>,
    desired: Option<u32>,
    serving: u32,
    backends: Vec<Value>,
}

impl View {
    fn read(status: Option<&Value>) -> View {
        // Indexing a missing field gives null, whose numbers are `None`.
        let vip = status.map_or(&Value::Null, |s| &s["vips"][0]);
        View {
            rate: vip["autoscale"]["rate"].as_f64(),
            desired: vip["autoscale"]["desired_backends"]
                .as_u64()
                .map(|d| d as u32),
            serving: vip["healthy_backends"].as_u64().unwrap_or(0) as u32,
            backends: vip["backends"].as_array().cloned().unwrap_or_default(),
        }
    }

    /// Whether backend `i` is done with: the balancer gives it no new flows, remembers none
    /// of its flows, and has seen no packet for it for a second (or has forgotten it).
    fn drained(&self, i: usize) -> bool {
        let address = nat_backend_addr(i).to_string();
        let Some(b) = self.backends.iter().find(|b| b["address"] == address) else {
            return true;
        };
        b["state"] != "active"
            && b["remembered_flows"].as_u64().unwrap_or(0) == 0
            && b["last_packet_age_seconds"]
                .as_f64()
                .is_none_or(|age| age >= 1.0)
    }
}

/// Runs `profile` from start to end, printing the timeline; fails if a request failed or a
/// check of [`Expectations`] does not hold. The `balancer` binary is `$BALANCER_BIN`.
pub fn run_profile(profile: &Profile) -> Result<()> {
    let _interrupts = InterruptGuard::install();
    remove_stale_runs();
    let prefix = format!("{PREFIX}{}-", std::process::id());
    let mut files = Scratch::new(PREFIX, "autoscale");
    let spec = HpaSpec {
        target_per_replica: profile.target_per_backend,
        tolerance: 0.1,
        min_replicas: 1,
        max_replicas: profile.max_replicas,
        scale_down_stabilisation: profile.scale_down_stabilisation,
    };
    say(&format!(
        "{} profile: load {} -> {} -> {} new connections/s over {:.0}s; HPA target {} per \
         backend, tolerance {}, scale-down stabilisation {}s, {}..{} backends",
        profile.name,
        profile.load.rate_at(0.0),
        profile.load.peak(),
        profile.load.rate_at(profile.load.duration()),
        profile.load.duration(),
        spec.target_per_replica,
        spec.tolerance,
        spec.scale_down_stabilisation.as_secs(),
        spec.min_replicas,
        spec.max_replicas
    ));
    say(&format!(
        "creating namespaces {prefix}*: client {NAT_CLIENT_ADDR}, balancer, DNS server \
         (dnsmasq) {NAT_DNS_ADDR}, backends from {} on, created and removed by the scaler",
        nat_backend_addr(0)
    ));
    let mut cluster = Cluster::create(&prefix);
    demo::interrupted()?;

    // One backend before the balancer starts: the HPA's minimum.
    let mut fleet = Fleet::new(ADDRESS_POOL, DRAIN_GRACE);
    for action in fleet.scale_to(Instant::now(), spec.min_replicas) {
        cluster.perform(&action);
    }
    let config_path = files.write_atomically("balancer.toml", &config(profile));
    say(&format!(
        "starting the balancer with {} (log: {}):",
        config_path.display(),
        files.path("balancer.log").display()
    ));
    for line in config(profile).lines().filter(|l| {
        l.starts_with("discover") || l.starts_with("autoscale") || l.starts_with("health")
    }) {
        println!("    {line}");
    }
    let mut balancer = BalancerProcess::run(
        &cluster.topology.balancer,
        &config_path,
        &files,
        &[],
        "balancer.log",
    );
    let api: SocketAddr = API.parse().expect("an address");
    balancer.wait_ready(&cluster.topology.balancer, api, Duration::from_secs(30));
    let waited = Instant::now();
    while View::read(
        get_json(&cluster.topology.balancer, api, "/api/v1/status")
            .ok()
            .as_ref(),
    )
    .serving
        < spec.min_replicas
    {
        demo::interrupted()?;
        if waited.elapsed() > Duration::from_secs(30) {
            files.keep();
            bail!(
                "the balancer did not find its first backend in DNS within 30 s; its log:\n{}\
                 \ndnsmasq's log:\n{}",
                balancer.log(),
                cluster.dns.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    say(&format!(
        "the balancer found {} in DNS and checked it: serving. Starting the load.\n",
        nat_backend_addr(0)
    ));

    let outcome = run_loop(profile, spec, &mut cluster, &mut fleet, &mut balancer, api);
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            say(&format!("logs kept in {}", files.keep().display()));
            return Err(e);
        }
    };
    let problems = report(profile, &outcome)?;
    let exit = balancer.stop();
    if !problems.is_empty() || !exit.success() {
        say(&format!("logs kept in {}", files.keep().display()));
    }
    drop(cluster);
    say("namespaces, DNS server and backends removed");
    if !exit.success() {
        bail!("the balancer exited with {exit}");
    }
    if !problems.is_empty() {
        bail!("the autoscale demo failed: {}", problems.join("; "));
    }
    Ok(())
}

/// What the loop saw.
struct Outcome {
    samples: Vec<Sample>,
    requests: u64,
    per_backend: BTreeMap<String, u64>,
    failures: Vec<String>,
    forced_stops: usize,
    took: Duration,
}

/// Once a second, until the load's end: read the balancer's status, let the HPA decide,
/// perform what the fleet says, and print a line of the timeline.
fn run_loop(
    profile: &Profile,
    spec: HpaSpec,
    cluster: &mut Cluster,
    fleet: &mut Fleet,
    balancer: &mut BalancerProcess,
    api: SocketAddr,
) -> Result<Outcome> {
    let mut hpa = Hpa::new(spec);
    let vip = SocketAddr::from((NAT_VIP_ADDR, 80));
    let epoch = Instant::now() + Duration::from_millis(100);
    let load = RampedLoad::start(&cluster.topology.client, vip, profile.load, epoch);
    let mut outcome = Outcome {
        samples: Vec::new(),
        requests: 0,
        per_backend: BTreeMap::new(),
        failures: Vec::new(),
        forced_stops: 0,
        took: Duration::ZERO,
    };
    let mut decision = spec.min_replicas;
    let mut started_before = 0;
    println!("{}", timeline::header());
    let ticks = profile.load.duration().ceil() as u32;
    for tick in 1..=ticks {
        let at = epoch + Duration::from_secs(u64::from(tick));
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        demo::interrupted()?;
        if !balancer.running() {
            bail!("the balancer exited; its log:\n{}", balancer.log());
        }
        let status = get_json(&cluster.topology.balancer, api, "/api/v1/status").ok();
        let view = View::read(status.as_ref());
        let now = Instant::now();
        // Without a reading, the HPA keeps the replicas as they are.
        if let Some(rate) = view.rate {
            decision = hpa.sync(now, fleet.current(), rate);
        }
        let mut actions = fleet.scale_to(now, decision);
        actions.extend(fleet.reap(now, |i| view.drained(i)));
        for action in &actions {
            outcome.forced_stops +=
                usize::from(matches!(action, Action::Stop { forced: true, .. }));
            cluster.perform(action);
        }
        let started = load.started();
        let mut sample = Sample {
            t: f64::from(tick),
            offered: (started - started_before) as f64,
            balancer_desired: view.desired,
            decision,
            draining: fleet.retiring(),
            serving: view.serving,
            ..Sample::default()
        };
        started_before = started;
        tally(&mut outcome, &mut sample, load.completed());
        println!("{}", timeline::line(&sample));
        outcome.samples.push(sample);
    }
    let rest = load.finish();
    let mut last = outcome.samples.last().cloned().unwrap_or_default();
    tally(&mut outcome, &mut last, rest);
    if let Some(s) = outcome.samples.last_mut() {
        s.failures = last.failures;
    }
    outcome.took = epoch.elapsed();
    Ok(outcome)
}

/// Counts completed requests into the run's totals and the sample's last second.
fn tally(outcome: &mut Outcome, sample: &mut Sample, completed: Vec<Completed>) {
    for c in completed {
        outcome.requests += 1;
        match c.result {
            Ok(backend) => {
                *sample.answered.entry(backend.clone()).or_default() += 1;
                *outcome.per_backend.entry(backend).or_default() += 1;
            }
            Err(e) => outcome
                .failures
                .push(format!("connection started at {:.2}s: {e}", c.started)),
        }
    }
    sample.failures = outcome.failures.len() as u64;
}

/// Prints the summary and writes the picture; returns what is wrong with the run.
fn report(profile: &Profile, outcome: &Outcome) -> Result<Vec<String>> {
    let samples = &outcome.samples;
    let peak_backends = ((profile.load.peak() / profile.target_per_backend).ceil() as u32)
        .min(profile.max_replicas);
    let final_rate = profile.load.rate_at(profile.load.duration());
    let expectations = Expectations {
        peak_backends,
        final_backends: ((final_rate / profile.target_per_backend).ceil() as u32).max(1),
        allowance: profile.scale_down_stabilisation.as_secs_f64() + START_ALLOWANCE,
    };
    let mut problems = expectations.problems(samples);
    if outcome.requests != outcome.per_backend.values().sum::<u64>() + outcome.failures.len() as u64
    {
        problems.push("requests were lost from the count".into());
    }
    let max = |f: fn(&Sample) -> u32| samples.iter().map(f).max().unwrap_or(0);
    println!();
    say(&format!(
        "{} requests in {:.0}s, {} failed; per backend: {}",
        outcome.requests,
        outcome.took.as_secs_f64(),
        outcome.failures.len(),
        outcome
            .per_backend
            .iter()
            .map(|(b, n)| format!("{b} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for failure in outcome.failures.iter().take(10) {
        println!("    failed: {failure}");
    }
    say(&format!(
        "at most: {} desired by the balancer, {} decided by the scaler, {} serving (the peak \
         of {:.0}/s calls for {peak_backends})",
        max(|s| s.balancer_desired.unwrap_or(0)),
        max(|s| s.decision),
        max(|s| s.serving),
        profile.load.peak()
    ));
    say(&format!(
        "serving below the desired count: at most {:.0}s in a row (balancer's count), {:.0}s \
         (scaler's decision); allowed {:.0}s (stabilisation window {}s + {START_ALLOWANCE}s for \
         a new backend to serve: the scaler's next sync, the balancer's next DNS resolution \
         and its first health check, the next status reading)",
        timeline::longest_shortfall(samples, |s| s.balancer_desired),
        timeline::longest_shortfall(samples, |s| Some(s.decision)),
        expectations.allowance,
        profile.scale_down_stabilisation.as_secs()
    ));
    if outcome.forced_stops > 0 {
        say(&format!(
            "{} backends were stopped before the balancer had drained them",
            outcome.forced_stops
        ));
    }
    let picture = target_dir().join(profile.picture);
    let title = format!(
        "cargo xtask demo --autoscale ({}): {} requests, {} failed",
        profile.name,
        outcome.requests,
        outcome.failures.len()
    );
    std::fs::create_dir_all(target_dir()).ok();
    std::fs::write(
        &picture,
        svg::render(samples, &title, profile.target_per_backend),
    )
    .with_context(|| format!("writing {}", picture.display()))?;
    say(&format!("picture of the run: {}", picture.display()));
    if problems.is_empty() {
        say(
            "checks passed: the serving backends rose and fell with the load, never stayed \
             below the desired count longer than allowed, and 0 requests failed",
        );
    }
    for problem in &problems {
        say(&format!("FAILED: {problem}"));
    }
    Ok(problems)
}

/// The workspace's target directory (`$CARGO_TARGET_DIR` if set).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_discovers_the_demo_service_from_its_dns_server() {
        let text = config(&SHORT);
        for wanted in [
            r#"discover = { dns = "web.demo.test", port = 8080, interval = "1s", timeout = "500ms", resolvers = ["10.95.0.53"]"#,
            r#"autoscale = { metric = "new_flows_per_second", target_per_backend = 20.0, tolerance = 0.1, window = "5s" }"#,
            r#"forwarding = "nat""#,
            r#"interval = "500ms""#,
        ] {
            assert!(text.contains(wanted), "{wanted} missing from:\n{text}");
        }
    }

    #[test]
    fn profiles_ramp_up_and_down_within_their_bounds() {
        for (profile, seconds) in [(&FULL, 60.0..=120.0), (&SHORT, 35.0..=50.0)] {
            let shape = profile.load;
            assert!(seconds.contains(&shape.duration()), "{}", profile.name);
            let peak_backends = (shape.peak() / profile.target_per_backend).ceil() as u32;
            assert!((3..=profile.max_replicas).contains(&peak_backends));
            assert!(shape.rate_at(0.0) < profile.target_per_backend);
            assert!(shape.rate_at(shape.duration()) < profile.target_per_backend);
        }
    }
}

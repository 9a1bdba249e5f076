//! The subcommands besides `run`: validating a config, talking to a running daemon (status
//! over the HTTP API, reload over the control socket), removing a data plane left behind,
//! and the two helper programs (`xdp-pass`, `decap`).

use std::{
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::{
    api::{
        client,
        control::{self, ControlReply, ControlRequest},
        table,
    },
    config::{self, CheckKind, XdpModeSetting},
    daemon::startup::require_root,
    shell::{dataplane::Dataplane, nexthop::Resolver, pins},
};

/// `balancer check`: the config's summary, or its first error.
pub fn check(path: &Path, resolve: bool) -> anyhow::Result<Vec<String>> {
    let c = config::load(path, &crate::shell::host::host())?;
    let backends: usize = c.vips.iter().map(|v| v.backends.len()).sum();
    let mut lines = vec![format!(
        "{}: OK, {} VIPs, {backends} backends",
        path.display(),
        c.vips.len()
    )];
    for vip in &c.vips {
        let active = vip.backends.iter().filter(|b| b.takes_new_flows()).count();
        let first = vip.backends.first().map(|b| &b.health);
        let checks = match first.or(vip.discover.as_ref().map(|d| &d.health)) {
            Some(h) if h.kind != CheckKind::None => format!(
                "{} checks of port {} every {:?}",
                h.kind.name(),
                h.port,
                h.interval
            ),
            _ => "no health checks".to_owned(),
        };
        lines.push(format!(
            "  {:<16} {:<24} {} backends ({active} taking new flows), table {} slots, {checks}",
            vip.name,
            vip.endpoint(),
            vip.backends.len(),
            vip.table_size
        ));
        if let Some(d) = &vip.discover {
            lines.push(discovery_check(&c, vip, d, resolve));
        }
    }
    lines.extend(fleet_check(&c));
    Ok(lines)
}

/// A fleet member's tables: where it announces, whom it syncs with, and whether the key file
/// is usable here (a line, not an error: the file may live only on the balancers).
fn fleet_check(c: &config::Config) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(a) = &c.announce {
        lines.push(format!(
            "  announces the VIPs it can serve as routes in table {} (withdraw_wait {:?})",
            a.table, a.withdraw_wait
        ));
    }
    if let Some(s) = &c.sync {
        let peers: Vec<String> = s.peers.iter().map(ToString::to_string).collect();
        let key = match crate::shell::sync::read_key(&s.key_file) {
            Ok(_) => format!("key file {} usable", s.key_file.display()),
            Err(e) => format!("{e:#} (needed where the daemon runs)"),
        };
        lines.push(format!(
            "  syncs its connection table from {} with {} every {:?}; {key}",
            s.listen,
            if peers.is_empty() {
                "no peer".to_owned()
            } else {
                peers.join(", ")
            },
            s.interval
        ));
    }
    lines
}

/// A discovering VIP's settings, and (with `resolve`) what one lookup gives now, judged as the
/// daemon would judge it: the backends, the records left out, a refusal, an empty answer or
/// a failure. A lookup that fails is said, not an error: DNS may be unreachable from here.
fn discovery_check(
    c: &config::Config,
    vip: &config::Vip,
    d: &config::Discover,
    resolve: bool,
) -> String {
    use crate::core::discovery::{answer, Discovery};
    let from = if d.resolvers.is_empty() {
        "/etc/resolv.conf".to_owned()
    } else {
        let list: Vec<String> = d.resolvers.iter().map(ToString::to_string).collect();
        list.join(", ")
    };
    let settings = format!(
        "    discovers {} every {:?} via {from} (timeout {:?}, at most {}, empty for {:?} \
         empties it)",
        d.query, d.interval, d.timeout, d.max_backends, d.empty_grace
    );
    if !resolve {
        return settings;
    }
    let now = std::time::Instant::now();
    let mut state = Discovery::new(d.query.clone(), now);
    let Some(lookup) = state.due(vip, d, now) else {
        return settings;
    };
    let resolution = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(crate::shell::dns::resolve(&lookup)),
        Err(e) => return format!("{settings}; not resolved here: {e}"),
    };
    let applied = answer(&mut state, vip, d, &c.vips, resolution, now);
    let mut said = match (&applied.failed, &applied.refused, applied.empty_kept_for) {
        (Some((outcome, error, _)), _, _) => {
            format!("resolving it now failed ({}: {error})", outcome.name())
        }
        (None, Some(why), _) => format!("its answer now would be refused: {why}"),
        _ if state.backends.is_empty() => {
            let what = state.last.as_ref().map_or("", |l| l.outcome.name());
            format!("it gives no backends now ({what})")
        }
        _ => {
            let list: Vec<String> = state
                .backends
                .iter()
                .map(|b| b.address.to_string())
                .collect();
            format!("it gives {} backends now: {}", list.len(), list.join(", "))
        }
    };
    for (address, why) in &applied.rejected {
        said.push_str(&format!("; {address} left out: {why}"));
    }
    format!("{settings}\n    {said}")
}

/// How the commands that talk to a running daemon find it: flags first, then what the
/// config file says, then the defaults.
#[derive(Clone, Debug, Default)]
pub struct Target {
    pub config: Option<PathBuf>,
    pub interface: Option<String>,
    pub pin_dir: Option<PathBuf>,
    pub api: Option<SocketAddr>,
    pub socket: Option<PathBuf>,
}

impl Target {
    fn reach(&self) -> anyhow::Result<config::Reach> {
        match &self.config {
            Some(path) => Ok(config::reach(path)?),
            None => Ok(config::Reach::default()),
        }
    }

    /// The daemon's HTTP API address.
    pub fn api(&self) -> anyhow::Result<SocketAddr> {
        if let Some(api) = self.api {
            return Ok(api);
        }
        Ok(self.reach()?.metrics_listen.unwrap_or_else(|| {
            config::DEFAULT_METRICS_LISTEN
                .parse()
                .expect("valid default")
        }))
    }

    /// The daemon's control socket.
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        let reach = self.reach()?;
        if let Some(socket) = reach.control_socket {
            return Ok(socket);
        }
        let interface = self.interface.clone().or(reach.interface).context(
            "which daemon? give --interface (or a --config that names one), or --socket",
        )?;
        let pin_dir = self
            .pin_dir
            .clone()
            .or(reach.pin_dir)
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PIN_DIR));
        Ok(control::default_socket(&pin_dir, &interface))
    }
}

/// `balancer status`: the daemon's status document, as a table or as JSON, once or every
/// `watch` seconds.
pub async fn status(target: &Target, json: bool, watch: Option<f64>) -> anyhow::Result<()> {
    let address = target.api()?;
    loop {
        let document = client::status(address, Duration::from_secs(10)).await?;
        let text = if json {
            serde_json::to_string_pretty(&document).expect("a document serialises")
        } else {
            table::render(&document)
        };
        let Some(seconds) = watch else {
            println!("{text}");
            return Ok(());
        };
        // Clear the screen and redraw from the top.
        print!("\x1b[H\x1b[2J{text}");
        let _ = std::io::stdout().flush();
        tokio::time::sleep(Duration::from_secs_f64(seconds.max(0.2))).await;
    }
}

/// `balancer reload`: what the daemon said, and whether it accepted the config.
pub async fn reload(target: &Target) -> anyhow::Result<(bool, Vec<String>)> {
    let socket = target.socket()?;
    let reply = control::request(&socket, &ControlRequest::Reload).await?;
    Ok(match reply {
        ControlReply::Reloaded {
            generation,
            changes,
            ..
        } if changes.is_empty() => (
            true,
            vec![format!(
                "reload accepted (generation {generation}): no changes"
            )],
        ),
        ControlReply::Reloaded {
            generation,
            changes,
            resolving,
        } => {
            let mut lines = vec![format!("reload accepted (generation {generation}):")];
            lines.extend(changes.iter().map(|c| format!("  {c}")));
            if resolving > 0 {
                lines.push(format!(
                    "  {resolving} new backends have no next hop yet (no ARP or neighbour answer, or \
                     no route, so far): they take traffic once they resolve; `balancer status` \
                     shows them as unreachable"
                ));
            }
            (true, lines)
        }
        ControlReply::Rejected { error } => (false, vec![format!("reload rejected: {error}")]),
        ControlReply::Failed { error } => (false, vec![format!("reload failed: {error}")]),
        ControlReply::Done { message } => (false, vec![format!("unexpected answer: {message}")]),
    })
}

/// `balancer withdraw` (`withdraw`) and `balancer announce`: what the daemon did.
pub async fn operator(
    target: &Target,
    vip: Option<String>,
    withdraw: bool,
) -> anyhow::Result<String> {
    let socket = target.socket()?;
    let request = if withdraw {
        ControlRequest::Withdraw { vip }
    } else {
        ControlRequest::Announce { vip }
    };
    match control::request(&socket, &request).await? {
        ControlReply::Done { message } => Ok(message),
        ControlReply::Rejected { error } | ControlReply::Failed { error } => {
            Err(anyhow::anyhow!(error))
        }
        other => Err(anyhow::anyhow!(
            "unexpected answer from the daemon: {other:?}"
        )),
    }
}

/// `balancer detach`: removes a data plane left running (kept, or orphaned by a crash) and
/// its pins; refuses while a daemon runs on it. Returns what it did, line by line.
pub fn detach(target: &Target, interface: &str) -> anyhow::Result<Vec<String>> {
    let pin_dir = match (&target.pin_dir, &target.config) {
        (Some(dir), _) => dir.clone(),
        (None, Some(path)) => config::load(path, &config::Host::default())?.pin_dir,
        (None, None) => PathBuf::from(config::DEFAULT_PIN_DIR),
    };
    require_root()?;
    let lock = pins::Lock::take(&pin_dir, interface)?;
    let root = pins::interface_dir(&pin_dir, interface);
    if !root.exists() {
        let hint = if target.pin_dir.is_none() {
            " (a daemon started with --pin-dir, or a config's pin_dir, pins elsewhere: pass \
             the same --pin-dir or --config)"
        } else {
            ""
        };
        return Ok(vec![format!(
            "nothing pinned for {interface} under {}: looked in {}{hint}",
            pin_dir.display(),
            root.display()
        )]);
    }
    let mut report = vec![format!("looked in {}", root.display())];
    report.extend(pins::pinned_programs(&pin_dir, interface));
    let removed = pins::remove_all(&pin_dir, interface)
        .with_context(|| format!("removing {}", root.display()))?;
    report.extend(removed.iter().map(|p| format!("removed {}", p.display())));
    drop(lock);
    Ok(report)
}

/// Waits for SIGTERM or SIGINT; returns which.
async fn terminated() -> anyhow::Result<&'static str> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    })
}

/// `balancer xdp-pass`: the trivial program on `interface` until SIGINT/SIGTERM.
pub async fn xdp_pass(interface: String) -> anyhow::Result<()> {
    require_root()?;
    let mut dataplane = Dataplane::load(crate::shell::dataplane::LoadOptions {
        hash_seed: 0,
        conn_table_size: config::MIN_CONN_TABLE_SIZE,
        pending_table_size: config::MIN_CONN_TABLE_SIZE,
        nat_table_size: config::MIN_NAT_TABLE_SIZE,
    })
    .context("loading the XDP object")?;
    let mode = dataplane.attach_pass(&interface)?;
    info!("XDP_PASS attached to {interface} in {} mode", mode.as_str());
    let which = terminated().await?;
    drop(dataplane);
    info!("{which}: detached from {interface}");
    Ok(())
}

/// `balancer decap`: the decapsulating program on `interface`, for the addresses configured
/// there, until SIGINT/SIGTERM; counts what it did.
pub async fn decap(interface: String, mode: XdpModeSetting) -> anyhow::Result<()> {
    require_root()?;
    let resolver = Resolver::new().context("opening a netlink socket")?;
    let addresses = resolver
        .interface_addresses(&interface)
        .await
        .with_context(|| format!("the addresses of {interface}"))?;
    if addresses.is_empty() {
        bail!("{interface} has no address: tunnels are addressed to the backend's own address");
    }
    let mut dataplane = Dataplane::load_decap().context("loading the XDP object")?;
    dataplane.set_decap_addresses(&addresses)?;
    let (attached, fallback) = dataplane
        .attach_decap(&interface, mode)
        .with_context(|| format!("attaching to {interface}"))?;
    if let Some(reason) = fallback {
        warn!(
            "native XDP refused on {interface} ({:#}); attached in generic mode",
            anyhow::Error::new(reason)
        );
    }
    let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    info!(
        "decapsulating IPIP, IP6IP6 and IPv4-in-IPv6 to {} on {interface} ({} mode)",
        list.join(", "),
        attached.as_str()
    );
    let summary = |dataplane: &Dataplane| -> String {
        match dataplane.decap_counters() {
            Ok(counts) => balancer_common::DecapOutcome::ALL
                .iter()
                .map(|o| format!("{} {}", o.name(), counts[*o as usize]))
                .collect::<Vec<_>>()
                .join(", "),
            Err(e) => format!("{:#}", anyhow::Error::new(e)),
        }
    };
    let mut report = tokio::time::interval(Duration::from_secs(60));
    report.tick().await;
    let stop = terminated();
    tokio::pin!(stop);
    let which = loop {
        tokio::select! {
            which = &mut stop => break which?,
            _ = report.tick() => info!("packets so far: {}", summary(&dataplane)),
        }
    };
    info!("{which}: packets: {}", summary(&dataplane));
    drop(dataplane);
    info!("detached from {interface}");
    Ok(())
}

//! `balancer run`, up to the event loop: read the config, take the lock and the listeners
//! (a taken port must not cost a restart of forwarding), resolve next hops, load or adopt
//! the data plane, attach, and execute the core's first plan.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context as _};
use tracing::{error, info, warn};

use crate::{
    api::{
        connections::LOOPBACK_RESERVE,
        control::{default_socket, ControlServer},
        status::{Attachment, DatapathStatus},
    },
    config::{self, Config},
    core::{events::Level, Core, Output, Start},
    plan::inputs::{format_mac, NextHops},
    shell::{
        dataplane::{AttachedMode, Dataplane, DataplaneError, LoadOptions},
        kernel::{self, NofileError, OpenFiles},
        nexthop::Resolver,
        pins::{self, Lock, PinError},
    },
};

pub struct RunOptions {
    pub config: PathBuf,
    pub interface: Option<String>,
    /// Leave the data plane running at exit (or `keep_datapath` in the config).
    pub keep_datapath: bool,
    /// Replace pins of another layout (or that do not match the config) with a fresh data
    /// plane instead of refusing to start.
    pub replace: bool,
    /// Overrides `pin_dir` of the config.
    pub pin_dir: Option<PathBuf>,
    /// Load the XDP program from this object file instead of the one built in.
    pub program_object: Option<PathBuf>,
    /// Start with every VIP withdrawn (`[announce]`), until `balancer announce`.
    pub withdrawn: bool,
}

/// A started daemon: everything the event loop works with.
pub struct Daemon {
    pub core: Core,
    pub dataplane: Dataplane,
    pub resolver: std::sync::Arc<Resolver>,
    pub attachment: Attachment,
    pub listener: tokio::net::TcpListener,
    pub control: ControlServer,
    pub interface: String,
    pub pin_dir: PathBuf,
    /// The soft limit on open files in force (raised to the hard limit at start): what the
    /// status API's connections, the health probes and everything else share.
    pub nofile: u64,
    /// The first effects: the health checks to start (the plan is executed already).
    pub first: Output,
    /// One daemon per interface and pin directory, until dropped.
    pub lock: Lock,
    /// The sync's key (`[sync]`), read before anything was touched.
    pub sync_key: Option<crate::sync::wire::Key>,
}

/// What the config and the command line say about where the daemon runs.
struct Setting {
    config: Config,
    text: String,
    interface: String,
    pin_dir: PathBuf,
    object: Vec<u8>,
}

pub async fn start(options: RunOptions) -> anyhow::Result<Daemon> {
    let setting = setting(&options)?;
    let Setting {
        config,
        text,
        interface,
        pin_dir,
        object,
    } = setting;
    let nofile = open_files_limit()?;
    let sync_key = match &config.sync {
        Some(sync) => Some(crate::shell::sync::read_key(&sync.key_file)?),
        None => None,
    };
    // Before touching the data plane: the lock (one daemon per interface), and the listeners
    // (a taken port must not cost a restart of forwarding).
    let lock = Lock::take(&pin_dir, &interface)?;
    let listen = config.metrics_listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on metrics_listen {listen}"))?;
    let socket = config
        .control_socket
        .clone()
        .unwrap_or_else(|| default_socket(&pin_dir, &interface));
    let control = ControlServer::bind(&socket)?;

    let resolver = Resolver::new().context("opening a netlink socket")?;
    let (next_hops, unreachable) =
        resolve(&resolver, crate::core::reload::addresses(&config)).await;
    let loaded = load(&object, &config, &pin_dir, &interface, options.replace)?;
    let fresh = loaded.adopted.is_none();
    // A fresh data plane that fails to start is removed; an adopted one keeps forwarding.
    let cleanup = |e: anyhow::Error| -> anyhow::Error {
        if fresh {
            let _ = pins::remove_all(&pin_dir, &interface);
        }
        e
    };
    let (dataplane, mode) = attach(
        loaded.dataplane,
        loaded.layout_dir.as_path(),
        loaded.previous,
        &config,
        &interface,
        options.replace,
    )
    .map_err(cleanup)?;
    dataplane
        .write_pinned_state(config.hash_seed)
        .map_err(|e| cleanup(e.into()))?;
    let start = Start {
        config_path: options.config.clone(),
        config,
        text,
        next_hops,
        unreachable,
        adopted: loaded.adopted,
        keep_datapath: options.keep_datapath,
        withdrawn: options.withdrawn,
    };
    let (core, first, dataplane) = first_plan(start, dataplane).map_err(cleanup)?;
    if let Some(summary) = core.adopted() {
        log_adoption(&dataplane, &loaded.layout_dir, summary);
    }
    log_summary(&core, &interface, mode.as_str());
    log_endpoints(core.config(), &listener, &control)?;
    let attachment = attachment(&dataplane, &interface, mode);
    Ok(Daemon {
        core,
        dataplane,
        resolver: std::sync::Arc::new(resolver),
        attachment,
        listener,
        control,
        interface,
        pin_dir,
        nofile,
        first,
        lock,
        sync_key,
    })
}

/// Raises the soft limit on open files to the hard limit and logs the figure; a limit that
/// cannot be raised is logged and kept.
fn open_files_limit() -> anyhow::Result<u64> {
    match kernel::raise_nofile() {
        Ok(OpenFiles { before, now }) if now > before => {
            info!("open files: soft limit raised from {before} to {now}");
            Ok(now)
        }
        Ok(OpenFiles { now, .. }) => {
            info!("open files: limit {now} (hard limit)");
            Ok(now)
        }
        Err(e @ NofileError::Raise { soft, .. }) => {
            warn!(
                "open files: limit {soft}: {:#}; raise the hard limit (LimitNOFILE= of a systemd \
                 unit, ulimit -n) if the status API or the health probes run out",
                anyhow::Error::new(e)
            );
            Ok(soft)
        }
        Err(e) => Err(e.into()),
    }
}

fn setting(options: &RunOptions) -> anyhow::Result<Setting> {
    let text = std::fs::read_to_string(&options.config)
        .with_context(|| format!("{}: cannot read the config file", options.config.display()))?;
    let config = config::parse_for(&options.config, &text, &crate::shell::host::host())?;
    let interface = options
        .interface
        .clone()
        .or_else(|| config.interface.clone())
        .context("no interface to attach to: set `interface` in [balancer] or pass --interface")?;
    require_root()?;
    kernel::check()?;
    let pin_dir = options
        .pin_dir
        .clone()
        .unwrap_or_else(|| config.pin_dir.clone());
    let object = match &options.program_object {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("reading the XDP object {}", path.display()))?,
        None => crate::PROGRAM.to_vec(),
    };
    Ok(Setting {
        config,
        text,
        interface,
        pin_dir,
        object,
    })
}

/// The data plane loaded, with its maps pinned (adopted, or fresh).
struct Loaded {
    dataplane: Dataplane,
    adopted: Option<crate::plan::contents::MapContents>,
    layout_dir: PathBuf,
    previous: pins::PreviousLink,
}

fn load(
    object: &[u8],
    config: &Config,
    pin_dir: &Path,
    interface: &str,
    replace: bool,
) -> anyhow::Result<Loaded> {
    let options = LoadOptions {
        hash_seed: config.hash_seed,
        conn_table_size: config.conn_table_size,
        pending_table_size: config.flood.pending_table_size,
        nat_table_size: config.nat.table_size,
    };
    let (mut layout_dir, mut previous) = pins::prepare_layout(pin_dir, interface, replace)?;
    let had_pins = std::fs::read_dir(&layout_dir).is_ok_and(|mut d| d.next().is_some());
    let loaded = Dataplane::load_pinned(object, options, &layout_dir);
    if loaded.is_err() && !had_pins {
        // Maps pinned before the program failed to load (the verifier, a capability).
        let _ = pins::remove_all(pin_dir, interface);
    }
    let (dataplane, adopted) = match loaded {
        Ok(loaded) => loaded,
        Err(DataplaneError::Pins(e @ PinError::Incompatible { .. })) if replace => {
            warn!("{:#}; replacing it (--replace)", anyhow::Error::new(e));
            (layout_dir, previous) = pins::clear(pin_dir, interface)?;
            Dataplane::load_pinned(object, options, &layout_dir)
                .context("loading the XDP program")?
        }
        Err(e) => return Err(anyhow::Error::new(e).context("loading the XDP program")),
    };
    if let Some(state) = adopted.as_ref().and_then(|_| pins::read_state(&layout_dir)) {
        if state.hash_seed != config.hash_seed {
            warn!(
                "hash_seed changes from {:#x} to {:#x}: established flows keep their backends \
                 (connection table), new flows are placed with the new seed; every balancer of a \
                 fleet needs the same seed",
                state.hash_seed, config.hash_seed
            );
        }
    }
    Ok(Loaded {
        dataplane,
        adopted,
        layout_dir,
        previous,
    })
}

/// Attaches through the pinned link; with --replace, a link of the other mode is replaced.
fn attach(
    mut dataplane: Dataplane,
    layout_dir: &Path,
    previous: pins::PreviousLink,
    config: &Config,
    interface: &str,
    replace: bool,
) -> anyhow::Result<(Dataplane, AttachedMode)> {
    let attached = match dataplane.attach_pinned(interface, config.xdp_mode, previous) {
        // The pinned link runs in another mode than the config asks for: with --replace,
        // detach it and attach anew (a short gap: a link cannot change mode).
        Err(DataplaneError::Pins(e @ PinError::Incompatible { .. })) if replace => {
            warn!(
                "{:#}; detaching it and attaching anew (--replace)",
                anyhow::Error::new(e)
            );
            let link = layout_dir.join(pins::LINK);
            if link.exists() {
                std::fs::remove_file(&link)
                    .with_context(|| format!("removing {}", link.display()))?;
            }
            dataplane.attach_pinned(interface, config.xdp_mode, None)
        }
        other => other,
    };
    let (mode, fallback) = attached.with_context(|| {
        format!(
            "attaching to {interface}; if another XDP program is attached there, remove it first \
             (`ip link set dev {interface} xdp off`)"
        )
    })?;
    if let Some(reason) = fallback {
        warn!(
            "native XDP refused on {interface} ({:#}); attached in generic mode, which is slower",
            anyhow::Error::new(reason)
        );
    }
    Ok((dataplane, mode))
}

/// Starts the core and executes its first plan.
fn first_plan(start: Start, mut dataplane: Dataplane) -> anyhow::Result<(Core, Output, Dataplane)> {
    let (core, mut first) = Core::start(start, Instant::now())?;
    log_events(&mut first.events);
    if let Some(plan) = first.plan.take() {
        dataplane.execute(&plan).context("writing the maps")?;
    }
    Ok((core, first, dataplane))
}

/// Where the status API and the control socket are, and the API's limits.
fn log_endpoints(
    config: &Config,
    listener: &tokio::net::TcpListener,
    control: &ControlServer,
) -> anyhow::Result<()> {
    info!(
        "status API on http://{}/api/v1/status: at most {} connections ({LOOPBACK_RESERVE} more \
         from loopback), idle timeout {:?}",
        listener.local_addr()?,
        config.api_max_connections,
        config.api_idle_timeout
    );
    info!(
        "control socket {} (balancer reload)",
        control.path().display()
    );
    Ok(())
}

fn log_adoption(dataplane: &Dataplane, layout_dir: &Path, summary: &str) {
    let ids = dataplane.program_ids();
    info!(
        "adopted the data plane pinned in {}: {summary}; program {} swapped in for program {} \
         through link {} (no packet missed a program)",
        layout_dir.display(),
        ids.map_or(0, |i| i.program_id),
        ids.and_then(|i| i.replaced_program)
            .map_or("?".into(), |p| p.to_string()),
        ids.and_then(|i| i.link_id)
            .map_or("?".into(), |l| l.to_string()),
    );
}

fn attachment(dataplane: &Dataplane, interface: &str, mode: AttachedMode) -> Attachment {
    let ids = dataplane.program_ids();
    Attachment {
        interface: Some(interface.to_owned()),
        xdp_mode: Some(mode.as_str().to_owned()),
        datapath: DatapathStatus {
            pin_dir: dataplane.pin_dir().map(|d| d.display().to_string()),
            program_id: ids.map(|i| i.program_id),
            program_tag: ids.map(|i| format!("{:016x}", i.program_tag)),
            link_id: ids.and_then(|i| i.link_id),
            replaced_program_id: ids.and_then(|i| i.replaced_program),
            ..DatapathStatus::default()
        },
    }
}

/// Writes the core's events to the log, each at its level; leaves the rest of the output.
pub fn log_events(events: &mut Vec<crate::core::events::Event>) {
    for event in events.drain(..) {
        match event.level() {
            Level::Info => info!("{event}"),
            Level::Warn => warn!("{event}"),
            Level::Error => error!("{event}"),
        }
    }
}

pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the balancer needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON) to load and attach XDP programs");
    }
    Ok(())
}

/// Resolves addresses: the next hops, and why the others do not resolve (they get no
/// traffic; the core logs them, within its log budget).
pub async fn resolve(
    resolver: &Resolver,
    addresses: Vec<IpAddr>,
) -> (NextHops, Vec<(IpAddr, String)>) {
    let (hops, errors) = resolver.resolve_all(addresses).await;
    let mut errors: Vec<(IpAddr, String)> = errors
        .into_iter()
        .map(|(a, e)| (a, format!("{:#}", anyhow::Error::new(e))))
        .collect();
    errors.sort();
    (hops, errors)
}

/// The one-screen summary at start-up: attach mode, each VIP with its health check, each
/// backend with its weight, state, slots and next hop.
/// A NAT VIP's translation, as the maps hold it: the SNAT addresses (resolved from the
/// interfaces when not configured) and ports, and where the replies are translated back.
fn nat_summary(
    nat: &config::NatVipConfig,
    planned: &crate::plan::desired::DesiredVip,
    core: &Core,
) -> String {
    let interfaces: std::collections::BTreeSet<&str> = planned
        .backends
        .iter()
        .filter_map(|b| core.next_hops().get(&b.address))
        .map(|h| h.interface.as_str())
        .collect();
    let replies = if interfaces.is_empty() {
        "replies translated back by this program on the interfaces the backends are reached \
         through"
            .to_owned()
    } else {
        format!(
            "replies translated back by this program on {}",
            interfaces.into_iter().collect::<Vec<_>>().join(", ")
        )
    };
    let ports = format!("ports {}-{}", nat.ports.0, nat.ports.1);
    match &nat.snat {
        config::Snat::None => format!(
            "destination-only NAT: backends see the client (this balancer must be their \
             gateway); {replies}"
        ),
        config::Snat::Interface => {
            let sources: std::collections::BTreeSet<String> = planned
                .backends
                .iter()
                .filter_map(|b| core.next_hops().get(&b.address)?.source)
                .map(|a| a.to_string())
                .collect();
            let sources = if sources.is_empty() {
                "the address of the interface towards the backends".to_owned()
            } else {
                format!(
                    "{} (the interface's)",
                    sources.into_iter().collect::<Vec<_>>().join(", ")
                )
            };
            format!("full NAT from {sources}, {ports}; {replies}",)
        }
        config::Snat::Addresses(list) => {
            let list: Vec<String> = list.iter().map(ToString::to_string).collect();
            format!("full NAT from {}, {ports}; {replies}", list.join(", "))
        }
    }
}

fn log_summary(core: &Core, interface: &str, mode: &str) {
    let config = core.config();
    info!(
        "attached to {interface} in {mode} mode; hash seed {:#x}; connection table {} flows",
        config.hash_seed, config.conn_table_size
    );
    if config.vips.is_empty() {
        warn!("no VIPs configured: every packet passes to the kernel untouched");
    }
    for (vip, planned) in config.vips.iter().zip(&core.desired().vips) {
        let first_check = vip
            .backends
            .first()
            .map(|b| &b.health)
            .or(vip.discover.as_ref().map(|d| &d.health));
        let checks = match first_check {
            Some(c) if c.kind != config::CheckKind::None => format!(
                "{} check port {} every {:?}, rise {} fall {}",
                c.kind.name(),
                c.port,
                c.interval,
                c.rise,
                c.fall
            ),
            _ => "no health checks".to_owned(),
        };
        info!(
            "VIP {} {} {}, Maglev table {} slots, {} backends, {checks}",
            vip.name,
            vip.endpoint(),
            vip.forwarding.name(),
            vip.table_size,
            vip.backends.len()
        );
        if let Some(nat) = &vip.nat {
            info!("  {}", nat_summary(nat, planned, core));
        }
        if let Some(d) = &vip.discover {
            let from = if d.resolvers.is_empty() {
                "the system's resolvers (/etc/resolv.conf)".to_owned()
            } else {
                let list: Vec<String> = d.resolvers.iter().map(ToString::to_string).collect();
                list.join(", ")
            };
            info!(
                "  discovers backends from {} every {:?} (sooner as the TTL says) via {from}; at \
                 most {}; an empty answer empties it after {:?}",
                d.query, d.interval, d.max_backends, d.empty_grace
            );
        }
        if planned.backends.is_empty() && vip.discover.is_some() {
            info!(
                "VIP {} has no backends until its first DNS answer: its packets are dropped \
                 until then (no_backend)",
                vip.name
            );
        } else if planned.backends.is_empty() {
            warn!(
                "VIP {} has no backends: its packets are dropped (no_backend)",
                vip.name
            );
        }
        for b in &planned.backends {
            let via = core
                .next_hops()
                .get(&b.address)
                .map_or("unresolved".to_owned(), |h| {
                    format!("{} via {}", format_mac(&h.dst_mac), h.interface)
                });
            info!(
                "  backend {:<15} weight {:<5} {:<11} {:>6} slots  {via}",
                b.address.to_string(),
                b.weight,
                b.state.as_str(),
                b.slots
            );
        }
    }
}

//! `balancer run`: resolve, load, attach, fill the maps, then one event loop that owns every
//! change: health probe results, reloads (SIGHUP, a change of the config file, the API), next
//! hop refreshes and the end of removed backends' grace periods. On SIGINT/SIGTERM it detaches
//! and removes everything.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    config::{self, Config, HealthCheck},
    controller::{Controller, ReloadOutcome},
    dataplane::{error_chain, Dataplane, LoadOptions},
    health,
    nexthop::Resolver,
    pins,
    reconcile::{BackendKey, NextHops},
    status::{self, format_mac},
};

/// How often next hops are resolved again (a backend's MAC address can change, and one that
/// did not answer at start-up may answer later).
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(10);
/// After a change in the config's directory, wait until it has been quiet this long.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(20);
/// ...but never longer than this after the first change.
const RELOAD_DEBOUNCE_MAX: Duration = Duration::from_millis(500);

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
}

/// Everything that changes the daemon's state goes through this channel.
pub enum Event {
    Probe {
        key: BackendKey,
        serial: u64,
        result: health::ProbeResult,
        /// How long the probe took.
        seconds: f64,
    },
    Reload {
        trigger: &'static str,
        reply: Option<oneshot::Sender<ReloadOutcome>>,
    },
    /// Something changed in the config file's directory.
    FileChanged,
}

pub type Shared = Arc<Mutex<Controller>>;

pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&options.config).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot read the config file: {e}",
            options.config.display()
        )
    })?;
    let config = config::parse(&options.config, &text)?;
    let interface = options
        .interface
        .clone()
        .or_else(|| config.interface.clone())
        .context("no interface to attach to: set `interface` in [balancer] or pass --interface")?;
    require_root()?;
    crate::kernel::check()?;
    let pin_dir = options
        .pin_dir
        .clone()
        .unwrap_or_else(|| config.pin_dir.clone());
    let object = match &options.program_object {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("reading the XDP object {}", path.display()))?,
        None => crate::PROGRAM.to_vec(),
    };
    // Before touching the data plane: the lock (one daemon per interface), and the listener
    // (a taken port must not cost a restart of forwarding).
    let lock = pins::Lock::take(&pin_dir, &interface)?;
    let metrics_listen = config.metrics_listen;
    let listener = status::bind(metrics_listen)
        .await
        .with_context(|| format!("listening on metrics_listen {metrics_listen}"))?;

    let resolver = Resolver::new().context("opening a netlink socket")?;
    let next_hops = resolve(&resolver, addresses(&config)).await;
    warn_routed_dsr_backends(&config, &next_hops);

    let options_load = LoadOptions {
        hash_seed: config.hash_seed,
        conn_table_size: config.conn_table_size,
    };
    let (layout_dir, mut previous_link) = prepare_pins(&pin_dir, &interface, options.replace)?;
    let had_pins = std::fs::read_dir(&layout_dir).is_ok_and(|mut d| d.next().is_some());
    let loaded = Dataplane::load_pinned(&object, options_load, &layout_dir);
    if loaded.is_err() && !had_pins {
        // Maps pinned before the program failed to load (the verifier, a capability).
        let _ = pins::remove_all(&pin_dir, &interface);
    }
    let (mut dataplane, contents) = match loaded {
        Ok(loaded) => loaded,
        Err(e @ crate::dataplane::DataplaneError::IncompatiblePins { .. }) if options.replace => {
            warn!("{}; replacing it (--replace)", error_chain(&e));
            let layout_dir;
            (layout_dir, previous_link) = clear_pins(&pin_dir, &interface)?;
            Dataplane::load_pinned(&object, options_load, &layout_dir)
                .map_err(|e| anyhow::anyhow!(error_chain(&e)))
                .context("loading the XDP program")?
        }
        Err(e) => {
            return Err(anyhow::anyhow!(error_chain(&e))).context("loading the XDP program");
        }
    };
    let fresh = contents.is_none();
    // A fresh data plane that fails to start is removed; an adopted one keeps forwarding.
    let cleanup = |e: anyhow::Error| -> anyhow::Error {
        if fresh {
            let _ = pins::remove_all(&pin_dir, &interface);
        }
        e
    };
    if let Some(state) = contents.as_ref().and_then(|c| c.state) {
        if state.hash_seed != config.hash_seed {
            warn!(
                "hash_seed changes from {:#x} to {:#x}: established flows keep their backends \
                 (connection table), new flows are placed with the new seed; every balancer of a \
                 fleet needs the same seed",
                state.hash_seed, config.hash_seed
            );
        }
    }
    let attached = match dataplane.attach_pinned(&interface, config.xdp_mode, previous_link) {
        // The pinned link runs in another mode than the config asks for: with --replace,
        // detach it and attach anew (a short gap: a link cannot change mode).
        Err(e @ crate::dataplane::DataplaneError::IncompatiblePins { .. }) if options.replace => {
            warn!(
                "{}; detaching it and attaching anew (--replace)",
                error_chain(&e)
            );
            let link = layout_dir.join(pins::LINK);
            if link.exists() {
                std::fs::remove_file(&link)
                    .with_context(|| format!("removing {}", link.display()))?;
            }
            dataplane.attach_pinned(&interface, config.xdp_mode, None)
        }
        other => other,
    };
    let (mode, fallback) = attached
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
        .with_context(|| {
            format!(
                "attaching to {interface}; if another XDP program is attached there, remove it first \
                 (`ip link set dev {interface} xdp off`)"
            )
        })
        .map_err(cleanup)?;
    if let Some(reason) = fallback {
        warn!("native XDP refused on {interface} ({reason}); attached in generic mode, which is slower");
    }
    dataplane
        .write_pinned_state(config.hash_seed)
        .map_err(cleanup)?;
    let mut controller =
        Controller::new(options.config.clone(), config, text, dataplane, next_hops);
    controller.keep_datapath_flag = options.keep_datapath;
    if let Some(contents) = &contents {
        let summary = controller.adopt_pinned(contents);
        let ids = controller.dataplane.program_ids();
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
        controller.adopted = Some(summary);
    }
    controller
        .reconcile()
        .context("writing the maps")
        .map_err(cleanup)?;
    log_summary(&controller, &interface, mode.as_str());
    info!(
        "status API on http://{}/api/v1/status",
        listener.local_addr()?
    );
    let shared: Shared = Arc::new(Mutex::new(controller));

    let (events, mut inbox) = mpsc::channel::<Event>(4096);
    let mut checks = HealthChecks::new(events.clone());
    checks.sync(shared.lock().expect("state").wanted_checks());
    let _watcher = watch_config(&options.config, events.clone())
        .map_err(|e| {
            warn!(
                "not watching {} for changes ({e:#}); reload with SIGHUP or `balancer reload`",
                options.config.display()
            )
        })
        .ok();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let api = {
        let mut stop = stop_rx.clone();
        tokio::spawn(status::serve(
            listener,
            shared.clone(),
            events.clone(),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ))
    };

    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut refresh = tokio::time::interval(NEXT_HOP_REFRESH);
    refresh.tick().await;
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    let mut sampling = tokio::time::interval(crate::autoscale::SAMPLE_INTERVAL);
    let mut file_changed_at: Option<(Instant, Instant)> = None;
    let which = loop {
        let debounce = async {
            match file_changed_at {
                Some((first, last)) => {
                    let due = (last + RELOAD_DEBOUNCE).min(first + RELOAD_DEBOUNCE_MAX);
                    tokio::time::sleep_until(due.into()).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => {
                reload(&shared, &resolver, &mut checks, "SIGHUP", false).await;
            }
            _ = debounce => {
                file_changed_at = None;
                reload(&shared, &resolver, &mut checks, "config file change", true).await;
            }
            _ = refresh.tick() => {
                let addresses = shared.lock().expect("state").addresses();
                let hops = resolve(&resolver, addresses).await;
                shared.lock().expect("state").refresh_next_hops(hops);
            }
            _ = expiry.tick() => shared.lock().expect("state").expire_retiring(Instant::now()),
            _ = sampling.tick() => shared.lock().expect("state").sample(Instant::now()),
            Some(event) = inbox.recv() => match event {
                Event::Probe { key, serial, result, seconds } => {
                    if checks.is_current(&key, serial) {
                        shared.lock().expect("state").probe_result(&key, result, seconds);
                    }
                }
                Event::Reload { trigger, reply } => {
                    let outcome = reload(&shared, &resolver, &mut checks, trigger, false).await;
                    if let Some(reply) = reply {
                        let _ = reply.send(outcome);
                    }
                }
                Event::FileChanged => {
                    let now = Instant::now();
                    file_changed_at = Some(file_changed_at.map_or((now, now), |(first, _)| (first, now)));
                }
            },
        }
    };
    info!("{which}: shutting down");
    checks.stop();
    let _ = stop_tx.send(true);
    match api.await {
        Ok(Err(e)) => warn!("status API: {e}"),
        Err(e) => warn!("status API task: {e}"),
        Ok(Ok(())) => {}
    }
    let controller = Arc::try_unwrap(shared)
        .map_err(|_| anyhow::anyhow!("state still shared at shutdown"))?
        .into_inner()
        .map_err(|_| anyhow::anyhow!("state lock poisoned"))?;
    let keep = controller.keep_datapath();
    if keep {
        // (The state map was written at start; nothing it records can change without a
        // restart.)
        let dir = controller
            .dataplane
            .pin_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        // Closing our descriptors leaves the pins: the program keeps forwarding with the last
        // maps, without health checks or reloads until a daemon adopts it.
        drop(controller);
        info!(
            "left the data plane forwarding on {interface} (pinned in {dir}); the next \
             `balancer run` adopts it, `balancer detach --interface {interface}` removes it"
        );
    } else {
        // Unpinned first, then our descriptors closed: the link detaches, the maps are freed.
        let removed = pins::remove_all(&pin_dir, &interface)
            .with_context(|| format!("removing the pins under {}", pin_dir.display()));
        drop(controller);
        removed?;
        info!("detached from {interface}; the program and its maps are removed");
    }
    drop(lock);
    Ok(())
}

/// Makes the layout directory, refusing pins of another layout unless `replace`: then their
/// link is taken (so that the program on the interface is swapped rather than removed) and
/// the pins removed.
fn prepare_pins(
    pin_dir: &Path,
    interface: &str,
    replace: bool,
) -> anyhow::Result<(PathBuf, PreviousLink)> {
    let current = balancer_common::LAYOUT_VERSION;
    let others: Vec<u32> = pins::pinned_layouts(pin_dir, interface)
        .into_iter()
        .filter(|&v| v != current)
        .collect();
    if !others.is_empty() {
        let root = pins::interface_dir(pin_dir, interface);
        if !replace {
            bail!(
                "{} holds a data plane of map layout {} and this build uses layout v{current}: its maps \
                 cannot be adopted. Start with --replace to replace it: a fresh data plane (empty \
                 connection table, counters from zero) takes over {interface} without a gap, and \
                 established flows are placed again by the Maglev tables (most keep their backend; \
                 those that land elsewhere break). `balancer detach --interface {interface}` removes \
                 it instead.",
                root.display(),
                others.iter().map(|v| format!("v{v}")).collect::<Vec<_>>().join(", ")
            );
        }
        warn!(
            "replacing the data plane of layout {} in {} (--replace)",
            others
                .iter()
                .map(|v| format!("v{v}"))
                .collect::<Vec<_>>()
                .join(", "),
            root.display()
        );
        return clear_pins(pin_dir, interface);
    }
    Ok((pins::prepare(pin_dir, interface)?, None))
}

/// For --replace: takes the pinned link (so that the program on the interface is swapped, not
/// removed), removes every pin of the interface, and makes an empty layout directory.
fn clear_pins(pin_dir: &Path, interface: &str) -> anyhow::Result<(PathBuf, PreviousLink)> {
    let previous = take_link(pin_dir, interface);
    pins::remove_all(pin_dir, interface).with_context(|| {
        format!(
            "removing the pins under {}",
            pins::interface_dir(pin_dir, interface).display()
        )
    })?;
    Ok((pins::prepare(pin_dir, interface)?, previous))
}

/// A replaced data plane's link, held open while its pins are removed, and how it was set up.
type PreviousLink = Option<(aya::programs::links::FdLink, Option<pins::PinnedState>)>;

/// Opens the pinned link of any layout of the interface (keeping the program attached while
/// the pins go).
fn take_link(pin_dir: &Path, interface: &str) -> PreviousLink {
    for layout in pins::pinned_layouts(pin_dir, interface) {
        let dir = pins::interface_dir(pin_dir, interface).join(format!("v{layout}"));
        if let Ok(pinned) = aya::programs::links::PinnedLink::from_pin(dir.join(pins::LINK)) {
            return Some((
                aya::programs::links::FdLink::from(pinned),
                pins::read_state(&dir),
            ));
        }
    }
    None
}

/// `balancer detach`: removes a data plane left running (kept, or orphaned by a crash) and
/// its pins; refuses while a daemon runs on it.
pub fn detach(pin_dir: &Path, interface: &str) -> anyhow::Result<Vec<String>> {
    require_root()?;
    let lock = pins::Lock::take(pin_dir, interface)?;
    let root = pins::interface_dir(pin_dir, interface);
    let mut report = Vec::new();
    if !root.exists() {
        drop(lock);
        report.push(format!(
            "nothing pinned for {interface} under {}",
            pin_dir.display()
        ));
        return Ok(report);
    }
    // What runs now, for the report.
    for layout in pins::pinned_layouts(pin_dir, interface) {
        let link = root.join(format!("v{layout}")).join(pins::LINK);
        if let Ok(pinned) = aya::programs::links::PinnedLink::from_pin(&link) {
            let fd_link = aya::programs::links::FdLink::from(pinned);
            if let Ok(info) = fd_link.info() {
                report.push(format!(
                    "program {} (link {}, layout v{layout}) detached from {interface}",
                    info.program_id(),
                    info.id()
                ));
            }
        }
    }
    let removed = pins::remove_all(pin_dir, interface)
        .with_context(|| format!("removing {}", root.display()))?;
    for path in removed {
        report.push(format!("removed {}", path.display()));
    }
    drop(lock);
    Ok(report)
}

/// Reads the config file and makes it the running config if it is valid. With
/// `only_if_changed`, an identical file is ignored silently (the directory watcher sees every
/// write, not just changes).
async fn reload(
    shared: &Shared,
    resolver: &Resolver,
    checks: &mut HealthChecks,
    trigger: &'static str,
    only_if_changed: bool,
) -> ReloadOutcome {
    let started = Instant::now();
    let path = shared.lock().expect("state").config_path.clone();
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            return shared.lock().expect("state").reject_unreadable(format!(
                "{}: cannot read the config file: {e}",
                path.display()
            ))
        }
    };
    if only_if_changed && text == shared.lock().expect("state").config_text() {
        let generation = shared.lock().expect("state").generation;
        return ReloadOutcome::Unchanged { generation };
    }
    info!("reloading {} ({trigger})", path.display());
    // Resolve the next hops of new backends before taking the lock: resolution can wait for
    // an ARP answer, and the status API must not wait with it.
    let (known, new_addresses) = {
        let state = shared.lock().expect("state");
        let known = state.next_hops.clone();
        let wanted = config::parse(&path, &text)
            .map(|c| addresses(&c))
            .unwrap_or_default();
        let new: Vec<IpAddr> = wanted
            .into_iter()
            .filter(|a| !known.contains_key(a))
            .collect();
        (known, new)
    };
    let mut hops = known;
    if !new_addresses.is_empty() {
        hops.extend(resolve(resolver, new_addresses).await);
    }
    let mut state = shared.lock().expect("state");
    if let Ok(config) = config::parse(&path, &text) {
        warn_routed_dsr_backends(&config, &hops);
    }
    let outcome = state.reload(text, hops, started);
    if !matches!(outcome, ReloadOutcome::Rejected { .. }) {
        checks.sync(state.wanted_checks());
    }
    outcome
}

/// Direct server return needs backends on the balancer's L2 segment; say which are not.
fn warn_routed_dsr_backends(config: &Config, hops: &NextHops) {
    for vip in config
        .vips
        .iter()
        .filter(|v| v.forwarding == config::Forwarding::Dsr)
    {
        for b in &vip.backends {
            if let Some(gateway) = hops.get(&b.address).and_then(|h| h.gateway) {
                error!(
                    "backend {} of VIP {} is reached through gateway {gateway}: direct server return needs it on \
                     a directly connected network; it gets no traffic (use forwarding = \"tunnel\" for routed backends)",
                    b.address, vip.name
                );
            }
        }
    }
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the balancer needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON) to load and attach XDP programs");
    }
    Ok(())
}

fn addresses(config: &Config) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = config
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.address))
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Resolves addresses, logging the ones that fail (they get no traffic).
async fn resolve(resolver: &Resolver, addresses: Vec<IpAddr>) -> NextHops {
    let (hops, errors) = resolver.resolve_all(addresses).await;
    let mut errors: Vec<_> = errors.into_iter().collect();
    errors.sort_by_key(|(a, _)| *a);
    for (address, e) in errors {
        error!("backend {address} is unreachable and gets no traffic: {e}");
    }
    hops
}

/// Watches the config file's directory (so that editors' atomic renames and Kubernetes
/// ConfigMap symlink swaps are seen) and reports changes that may concern the file.
fn watch_config(
    path: &Path,
    events: mpsc::Sender<Event>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher as _};
    let path = std::path::absolute(path)?;
    let dir = path
        .parent()
        .context("the config file has no directory")?
        .to_owned();
    let mut names = vec![
        path.file_name().context("no file name")?.to_owned(),
        "..data".into(),
    ];
    // A symlinked config (ConfigMap): its target's name too.
    if let Ok(target) = std::fs::canonicalize(&path) {
        if let Some(name) = target.file_name() {
            names.push(name.to_owned());
        }
    }
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if event
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| names.iter().any(|w| w == n)))
            {
                let _ = events.try_send(Event::FileChanged);
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    info!(
        "watching {} for changes of {}",
        dir.display(),
        path.display()
    );
    Ok(watcher)
}

/// One probing task per checked backend; results come back as events.
struct HealthChecks {
    events: mpsc::Sender<Event>,
    tasks: HashMap<BackendKey, (HealthCheck, u64, JoinHandle<()>)>,
    serial: u64,
}

impl HealthChecks {
    fn new(events: mpsc::Sender<Event>) -> Self {
        HealthChecks {
            events,
            tasks: HashMap::new(),
            serial: 0,
        }
    }

    /// Results of tasks replaced since they were started are ignored.
    fn is_current(&self, key: &BackendKey, serial: u64) -> bool {
        self.tasks.get(key).is_some_and(|(_, s, _)| *s == serial)
    }

    /// Starts checks for new backends, restarts changed ones, stops the others.
    fn sync(&mut self, wanted: HashMap<BackendKey, (IpAddr, HealthCheck)>) {
        self.tasks.retain(|key, (check, _, task)| {
            let keep = wanted.get(key).is_some_and(|(_, c)| c == check);
            if !keep {
                task.abort();
            }
            keep
        });
        for (key, (address, check)) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            self.serial += 1;
            let serial = self.serial;
            let events = self.events.clone();
            let (task_key, task_check) = (key.clone(), check.clone());
            let task = tokio::spawn(async move {
                tokio::time::sleep(health::first_delay(task_check.interval, fastrand::f64())).await;
                loop {
                    let started = Instant::now();
                    let result = health::probe(address, &task_check).await;
                    let seconds = started.elapsed().as_secs_f64();
                    let event = Event::Probe {
                        key: task_key.clone(),
                        serial,
                        result,
                        seconds,
                    };
                    if events.send(event).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(health::next_delay(task_check.interval, fastrand::f64()))
                        .await;
                }
            });
            self.tasks.insert(key, (check, serial, task));
        }
    }

    fn stop(&mut self) {
        for (_, (_, _, task)) in self.tasks.drain() {
            task.abort();
        }
    }
}

fn log_summary(controller: &Controller, interface: &str, mode: &str) {
    let config = &controller.config;
    info!(
        "attached to {interface} in {mode} mode; hash seed {:#x}; connection table {} flows",
        config.hash_seed, config.conn_table_size
    );
    if config.vips.is_empty() {
        warn!("no VIPs configured: every packet passes to the kernel untouched");
    }
    for (vip, applied) in config.vips.iter().zip(&controller.dataplane.applied().vips) {
        let check = vip.backends.first().map(|b| &b.health);
        let checks = match check {
            Some(c) if c.kind != config::CheckKind::None => {
                format!(
                    "{} check port {} every {:?}, rise {} fall {}",
                    c.kind.name(),
                    c.port,
                    c.interval,
                    c.rise,
                    c.fall
                )
            }
            _ => "no health checks".to_owned(),
        };
        let mode = if vip.forwarding == config::Forwarding::Tunnel {
            "tunnel"
        } else {
            "dsr"
        };
        info!(
            "VIP {} {} {mode}, Maglev table {} slots, {} backends, {checks}",
            vip.name,
            vip.endpoint(),
            vip.table_size,
            vip.backends.len()
        );
        if applied.backends.is_empty() {
            warn!(
                "VIP {} has no backends: its packets are dropped (no_backend)",
                vip.name
            );
        }
        for b in &applied.backends {
            let via = controller
                .next_hops
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

/// `balancer xdp-pass`: the trivial program on `interface` until SIGINT/SIGTERM.
pub async fn xdp_pass(interface: String) -> anyhow::Result<()> {
    require_root()?;
    let mut dataplane = Dataplane::load(LoadOptions {
        hash_seed: 0,
        conn_table_size: config::MIN_CONN_TABLE_SIZE,
    })
    .map_err(|e| anyhow::anyhow!(error_chain(&e)))
    .context("loading the XDP object")?;
    let mode = dataplane
        .attach_pass(&interface)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    info!("XDP_PASS attached to {interface} in {} mode", mode.as_str());
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let which = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    drop(dataplane);
    info!("{which}: detached from {interface}");
    Ok(())
}

/// `balancer decap`: the decapsulating program on `interface`, for the addresses configured
/// there, until SIGINT/SIGTERM; counts what it did.
pub async fn decap(interface: String, mode: config::XdpModeSetting) -> anyhow::Result<()> {
    require_root()?;
    let resolver = Resolver::new().context("opening a netlink socket")?;
    let addresses = resolver
        .interface_addresses(&interface)
        .await
        .map_err(|e| anyhow::anyhow!("{interface}: {e}"))?;
    if addresses.is_empty() {
        bail!("{interface} has no address: tunnels are addressed to the backend's own address");
    }
    let mut dataplane = Dataplane::load_decap()
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
        .context("loading the XDP object")?;
    dataplane
        .set_decap_addresses(&addresses)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    let (attached, fallback) = dataplane
        .attach_decap(&interface, mode)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
        .with_context(|| format!("attaching to {interface}"))?;
    if let Some(reason) = fallback {
        warn!("native XDP refused on {interface} ({reason}); attached in generic mode");
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
            Err(e) => error_chain(&e),
        }
    };
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut report = tokio::time::interval(Duration::from_secs(60));
    report.tick().await;
    let which = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = report.tick() => info!("packets so far: {}", summary(&dataplane)),
        }
    };
    info!("{which}: packets: {}", summary(&dataplane));
    drop(dataplane);
    info!("detached from {interface}");
    Ok(())
}

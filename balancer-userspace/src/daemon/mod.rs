//! The daemon: `balancer run` and the other subcommands.
//! - [`startup`]: from the config file to an attached data plane and a started core;
//! - [`event_loop`]: the loop that feeds the core and performs its effects;
//! - [`probes`]: the health-check tasks; [`watch`]: the config file watcher;
//! - [`subcommands`]: `check`, `detach`, `status`, `reload`, `xdp-pass`, `decap`;
//! - [`cli`]: the command line.
//!
//! On SIGINT/SIGTERM `run` detaches and removes everything, or leaves the data plane
//! forwarding for the next daemon to adopt (`--keep-datapath`, `keep_datapath`).

pub mod cli;
pub mod event_loop;
pub mod fleet;
pub mod probes;
pub mod startup;
pub mod subcommands;
pub mod watch;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch as latest};
use tracing::{info, warn};

use crate::{
    api::{
        connections::{Limits, LOOPBACK_RESERVE},
        http::{serve, ApiState},
    },
    daemon::{
        event_loop::{EventLoop, Inputs},
        probes::ProbeTasks,
        startup::{start, Daemon, RunOptions},
    },
    shell::pins,
};

/// Results from probes waiting to be handled: enough for a burst from every backend.
const PROBE_QUEUE: usize = 4096;
/// Descriptors the daemon holds besides probes, API clients and one Maglev table per VIP:
/// maps, programs, the link, netlink, inotify, epoll, the log, the listeners and the control
/// socket's clients. Measured: 35 in all for a one-VIP daemon with two probes in flight
/// (`ls /proc/PID/fd`, the control-plane test); twice that, for room.
const DAEMON_BASE_DESCRIPTORS: u64 = 64;

pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let config_path = options.config.clone();
    let Daemon {
        mut core,
        mut dataplane,
        resolver,
        attachment,
        listener,
        control,
        interface,
        pin_dir,
        nofile,
        mut first,
        lock,
        sync_key,
    } = start(options).await?;

    let (probe_results, probes_inbox) = mpsc::channel(PROBE_QUEUE);
    let budget = probe_budget(core.config(), nofile);
    let mut probes = ProbeTasks::new(probe_results, budget);
    if let Some(checks) = &first.checks {
        probes.sync(checks);
    }
    let (file_changed, file_inbox) = mpsc::channel(64);
    let _watcher = watch::watch_config(&config_path, file_changed)
        .map_err(|e| {
            warn!(
                "not watching {} for changes ({e:#}); reload with SIGHUP or `balancer reload`",
                config_path.display()
            )
        })
        .ok();
    let (snapshots, snapshot_rx) = latest::channel(Arc::new(core.snapshot()));
    let (refresh, refresh_inbox) = mpsc::channel(1);
    let (commands, commands_inbox) = mpsc::channel(16);
    let (stop, stopped) = latest::channel(false);
    let state = ApiState {
        snapshots: snapshot_rx,
        attachment: Arc::new(attachment),
        refresh,
        connections: Arc::default(),
    };
    let (api, control) = serve_api(&core, listener, state, control, commands, stopped);

    let (sweeps_inbox, sweeper_stop) = start_sweeper(&dataplane)?;
    let (fleet, fleet_inputs) = fleet::start(&core, &dataplane, &mut first, sync_key)?;
    let mut event_loop =
        EventLoop::new(&mut core, &mut dataplane, resolver, &mut probes, &snapshots);
    event_loop.fleet = fleet;
    event_loop.attach_reply_interfaces();
    event_loop.start_lookups(std::mem::take(&mut first.lookups));
    // Counters before the first snapshot is served.
    event_loop.sample();
    let inputs = Inputs {
        probes: probes_inbox,
        file_changed: file_inbox,
        commands: commands_inbox,
        refresh: refresh_inbox,
        nat_sweeps: sweeps_inbox,
        fleet: fleet_inputs,
    };
    let which = event_loop.run(inputs).await.context("the event loop")?;
    info!("{which}: shutting down");
    let mut fleet = std::mem::take(&mut event_loop.fleet);
    let keep = core.keep_datapath();
    fleet
        .withdraw_before_exit(core.config().announce.as_ref(), keep)
        .await;
    sweeper_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    probes.stop();
    let _ = stop.send(true);
    if let Err(e) = api.await {
        warn!("status API task: {e}");
    }
    let _ = control.await;
    drop(core);
    finish(dataplane, keep, &pin_dir, &interface)?;
    drop(lock);
    Ok(())
}

/// The status API and the control socket, each a task until `stopped`.
fn serve_api(
    core: &crate::core::Core,
    listener: tokio::net::TcpListener,
    state: ApiState,
    control: crate::api::control::ControlServer,
    commands: mpsc::Sender<crate::api::control::Command>,
    stopped: latest::Receiver<bool>,
) -> (tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>) {
    let until_stopped = |mut stopped: latest::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let limits = Limits::of(core.config());
    let api = tokio::spawn(serve(
        listener,
        state,
        limits,
        until_stopped(stopped.clone()),
    ));
    let control = tokio::spawn(control.serve(commands, until_stopped(stopped)));
    (api, control)
}

/// The NAT sweeper's reports.
type Sweeps = mpsc::Receiver<Result<crate::plan::contents::NatSweep, String>>;

/// The NAT sweeper's thread: its reports, and the flag that stops it.
fn start_sweeper(
    dataplane: &crate::shell::dataplane::Dataplane,
) -> anyhow::Result<(Sweeps, Arc<std::sync::atomic::AtomicBool>)> {
    let (sweeps, inbox) = mpsc::channel(4);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tables = crate::shell::nat_sweep::NatTables::open(dataplane)
        .context("opening the NAT tables for the sweeper")?;
    crate::shell::nat_sweep::spawn(tables, stop.clone(), move |report| {
        // A report the loop has no room for is superseded by the next one.
        let _ = sweeps.try_send(report);
    })
    .context("starting the NAT sweeper's thread")?;
    Ok((inbox, stop))
}

/// The health probes' share of descriptors, from the open-files limit, logged; warns when
/// the API's cap leaves them too little.
fn probe_budget(config: &crate::config::Config, nofile: u64) -> usize {
    let budget = probes::probe_budget(nofile);
    info!("health probes: at most {budget} at once (open files limit {nofile})");
    let api = u64::from(config.api_max_connections + LOOPBACK_RESERVE);
    // Each VIP's inner Maglev table stays open (it is swapped, not re-opened).
    let own = DAEMON_BASE_DESCRIPTORS + config.vips.len() as u64;
    if api + budget as u64 + own > nofile {
        warn!(
            "api_max_connections {} (+{LOOPBACK_RESERVE} for loopback), {budget} health probes and the \
             daemon's own {own} descriptors exceed the open-files limit {nofile}: API \
             clients could take descriptors the probes need (their probes would not run); lower \
             api_max_connections or raise the limit",
            config.api_max_connections
        );
    }
    budget
}

/// Leaves the data plane forwarding (pinned, for the next daemon), or removes it.
fn finish(
    dataplane: crate::shell::dataplane::Dataplane,
    keep: bool,
    pin_dir: &std::path::Path,
    interface: &str,
) -> anyhow::Result<()> {
    if keep {
        // (The state map was written at start; nothing it records can change without a
        // restart.)
        let dir = dataplane
            .pin_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        // Closing our descriptors leaves the pins: the program keeps forwarding with the last
        // maps, without health checks or reloads until a daemon adopts it.
        drop(dataplane);
        info!(
            "left the data plane forwarding on {interface} (pinned in {dir}); the next \
             `balancer run` adopts it, `{}` removes it",
            pins::detach_command(pin_dir, interface)
        );
        return Ok(());
    }
    // Unpinned first, then our descriptors closed: the link detaches, the maps are freed.
    let removed = pins::remove_all(pin_dir, interface)
        .with_context(|| format!("removing the pins under {}", pin_dir.display()));
    drop(dataplane);
    removed?;
    info!("detached from {interface}; the program and its maps are removed");
    Ok(())
}

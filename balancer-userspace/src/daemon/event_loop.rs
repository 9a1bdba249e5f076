//! The event loop: the one place inputs reach the core, and the core's effects are performed.
//! Probe results, reloads (SIGHUP, a change of the config file, the control socket), next
//! hops resolved, counter readings and ticks go in; map plans are executed, probe tasks
//! synced, events logged, and a snapshot published for the API.
//!
//! It never waits on slow work: probes are tasks of their own; next hops are resolved by
//! tasks whose answers come back as inputs; a reload that names new backends waits for their
//! next hops at most `RELOAD_RESOLVE_WAIT` while the loop goes on (backends resolved later
//! join when they are); the core gathers health changes and plans them together.

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot, watch},
};

use crate::{
    api::control::{Command, ControlReply, ControlRequest},
    autoscale::SAMPLE_INTERVAL,
    config::MAX_CONFIG_BYTES,
    core::{
        discovery::{self, Lookup},
        reload::ReloadOutcome,
        snapshot::Snapshot,
        traffic::ConnWalk,
        Core, Input, Output, ReadConfig,
    },
    daemon::{
        fleet::{Fleet, FleetInputs},
        probes::{ProbeDone, ProbeTasks},
        startup::log_events,
        watch::{Change, Settle},
    },
    plan::{contents::NatSweep, inputs::NextHop},
    shell::{dataplane::Dataplane, nexthop::Resolver},
};

/// How often next hops are resolved again (a backend's MAC address can change, and one that
/// did not answer may answer later).
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(10);
/// How long a reload waits for the next hops of the backends it adds before it is applied
/// (with the ones not resolved yet getting no traffic until they are): a reload is answered
/// within a second whatever else is going on.
pub const RELOAD_RESOLVE_WAIT: Duration = Duration::from_millis(500);
/// How long a change waits before the snapshot the API serves shows it: bursts of changes
/// are published once.
const PUBLISH_DELAY: Duration = Duration::from_millis(50);
/// The shortest time between two readings of the counters asked for by API requests: a
/// flood of scrapes costs at most ten readings a second (each reads every backend's per-CPU
/// counters), however many requests come.
const MIN_SAMPLE_GAP: Duration = Duration::from_millis(100);

/// The channels that feed the loop.
pub struct Inputs {
    pub probes: mpsc::Receiver<ProbeDone>,
    pub file_changed: mpsc::Receiver<Change>,
    pub commands: mpsc::Receiver<Command>,
    pub refresh: mpsc::Receiver<()>,
    /// The NAT sweeper's reports.
    pub nat_sweeps: mpsc::Receiver<Result<NatSweep, String>>,
    /// The fleet pieces' reports.
    pub fleet: FleetInputs,
}

/// A discovery lookup that came back, with the next hops of its new addresses.
struct Discovered {
    lookup: Lookup,
    resolution: discovery::Resolution,
    next_hops: Vec<(IpAddr, Result<NextHop, String>)>,
}

/// Next hops resolved by a task, or a refresh that ended.
enum Resolution {
    Results(Vec<(IpAddr, Result<NextHop, String>)>),
    RefreshDone,
}

/// Who asked for a reload, and how to answer.
struct Request {
    trigger: &'static str,
    /// Text equal to the running config's is no reload (a file watcher sees every write).
    only_if_changed: bool,
    replies: Vec<oneshot::Sender<ControlReply>>,
}

impl Request {
    /// Another request for the same reload: the stricter `only_if_changed` of the two loses.
    fn merge(&mut self, other: Request) {
        self.only_if_changed &= other.only_if_changed;
        self.replies.extend(other.replies);
        if !other.only_if_changed {
            self.trigger = other.trigger;
        }
    }
}

/// A reload waiting for the next hops of its new backends.
struct Pending {
    request: Request,
    read: ReadConfig,
    started: Instant,
    /// New addresses whose next hops are not answered yet...
    waiting: HashSet<IpAddr>,
    /// ...the answers that resolved...
    resolved: Vec<(IpAddr, NextHop)>,
    /// ...and those that will not (told to the core once the config names them).
    failed: Vec<(IpAddr, Result<NextHop, String>)>,
    deadline: Instant,
}

pub struct EventLoop<'a> {
    pub core: &'a mut Core,
    pub dataplane: &'a mut Dataplane,
    pub resolver: Arc<Resolver>,
    pub probes: &'a mut ProbeTasks,
    pub snapshots: &'a watch::Sender<Arc<Snapshot>>,
    /// Why the last plan failed, if it did (for the reply to a reload).
    plan_failure: Option<String>,
    resolutions: (
        mpsc::UnboundedSender<Resolution>,
        mpsc::UnboundedReceiver<Resolution>,
    ),
    refreshing: bool,
    discoveries: (
        mpsc::UnboundedSender<Discovered>,
        mpsc::UnboundedReceiver<Discovered>,
    ),
    pending: Option<Pending>,
    /// Reloads asked for while one is pending: one more, after it.
    queued: Option<Request>,
    publish_due: Option<Instant>,
    settle: Settle,
    last_sample: Option<Instant>,
    /// An API request asked for counters too soon after the last reading: read then.
    sample_due: Option<Instant>,
    /// The announced routes and the sync (`[announce]`, `[sync]`).
    pub fleet: Fleet,
}

/// Sleeps until `at`, or forever.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl<'a> EventLoop<'a> {
    pub fn new(
        core: &'a mut Core,
        dataplane: &'a mut Dataplane,
        resolver: Arc<Resolver>,
        probes: &'a mut ProbeTasks,
        snapshots: &'a watch::Sender<Arc<Snapshot>>,
    ) -> Self {
        let settle = Settle::new(core.config().reload_settle);
        EventLoop {
            core,
            dataplane,
            resolver,
            probes,
            snapshots,
            plan_failure: None,
            resolutions: mpsc::unbounded_channel(),
            refreshing: false,
            discoveries: mpsc::unbounded_channel(),
            pending: None,
            queued: None,
            publish_due: None,
            settle,
            last_sample: None,
            sample_due: None,
            fleet: Fleet::default(),
        }
    }

    /// Runs until SIGTERM or SIGINT; returns which.
    pub async fn run(&mut self, mut inputs: Inputs) -> std::io::Result<&'static str> {
        let mut sighup = signal(SignalKind::hangup())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut refresh = tokio::time::interval(NEXT_HOP_REFRESH);
        refresh.tick().await;
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        let mut sampling = tokio::time::interval(SAMPLE_INTERVAL);
        loop {
            let reload_due = self.pending.as_ref().map(|p| p.deadline);
            tokio::select! {
                _ = sigterm.recv() => return Ok("SIGTERM"),
                _ = sigint.recv() => return Ok("SIGINT"),
                _ = sighup.recv() => self.reload(Request { trigger: "SIGHUP", only_if_changed: false, replies: Vec::new() }),
                Some(change) = inputs.file_changed.recv() => self.settle.changed(change, Instant::now()),
                () = until(self.settle.due()) => {
                    if self.settle.take(Instant::now()) {
                        self.reload(Request { trigger: "config file change", only_if_changed: true, replies: Vec::new() });
                    }
                }
                Some(command) = inputs.commands.recv() => self.command(command),
                Some(done) = inputs.probes.recv() => {
                    if self.probes.is_current(&done) {
                        let input = Input::Probe { key: done.key, result: done.result, seconds: done.seconds };
                        self.handle(input);
                    }

                }
                Some(resolution) = self.resolutions.1.recv() => self.resolution(resolution),
                Some(found) = self.discoveries.1.recv() => {
                    let input = Input::Discovered {
                        vip: found.lookup.vip,
                        query: found.lookup.query,
                        resolution: found.resolution,
                        next_hops: found.next_hops,
                    };
                    self.handle(input);
                }
                () = until(reload_due) => self.finish_reload(),
                _ = refresh.tick() => self.refresh_next_hops(),
                () = until(self.core.next_wake()) => { self.handle(Input::Tick); }
                _ = ticks.tick() => { self.handle(Input::Tick); }
                () = until(self.publish_due) => self.publish(),
                _ = sampling.tick() => self.sample(),
                () = until(self.sample_due) => self.sample(),
                Some(()) = inputs.refresh.recv() => self.sample_soon(),
                Some(sweep) = inputs.nat_sweeps.recv() => { self.handle(Input::NatSwept(sweep)); }
                Some(error) = inputs.fleet.route_failures.recv() => { self.handle(Input::RoutesFailed { error }); }
                Some(detail) = inputs.fleet.sync_ready.recv() => { self.handle(Input::SyncReady { detail }); }
            }
        }
    }

    /// Feeds the core one input, performs what it decides, and publishes a snapshot soon if
    /// anything happened.
    fn handle(&mut self, input: Input) -> Option<ReloadOutcome> {
        let out = self.core.handle(input, Instant::now());
        let changed = out.plan.is_some()
            || out.checks.is_some()
            || out.routes.is_some()
            || !out.events.is_empty()
            || out.reload.is_some();
        let outcome = self.perform(out);
        if changed {
            self.publish_due
                .get_or_insert(Instant::now() + PUBLISH_DELAY);
        }
        outcome
    }

    /// Performs the core's effects: the plan (a failure is fed back), the health checks, the
    /// log. Returns the reload outcome.
    fn perform(&mut self, mut out: Output) -> Option<ReloadOutcome> {
        log_events(&mut out.events);
        self.plan_failure = None;
        if let Some(plan) = &out.plan {
            if let Err(e) = self.dataplane.execute(plan) {
                let error = format!("{:#}", anyhow::Error::new(e));
                self.plan_failure = Some(error.clone());
                let mut failed = self
                    .core
                    .handle(Input::PlanFailed { error }, Instant::now());
                log_events(&mut failed.events);
            }
        }
        if let Some(checks) = &out.checks {
            self.probes.sync(checks);
        }
        self.start_lookups(std::mem::take(&mut out.lookups));
        if let (Some(routes), Some(set)) = (&self.fleet.routes, out.routes.take()) {
            routes.set(set);
        }
        if out.plan.is_some() {
            self.attach_reply_interfaces();
            self.fleet.maps_changed(self.core);
        }
        out.reload
    }

    /// Attaches the program to every interface NAT replies arrive on (backends of NAT VIPs
    /// reached through another interface than the main one), and says so.
    pub fn attach_reply_interfaces(&mut self) {
        let Some(main) = self.dataplane.attached().map(|(i, _)| i.to_owned()) else {
            return;
        };
        let setting = self.core.config().xdp_mode;
        for interface in self.core.reply_interfaces() {
            if interface == main {
                continue;
            }
            match self.dataplane.attach_reply_interface(&interface, setting) {
                Ok(Some((mode, adopted))) => tracing::info!(
                    "NAT replies from backends on {interface} are translated there: the program is {} \
                     {interface} too ({} mode)",
                    if adopted { "still attached to" } else { "attached to" },
                    mode.as_str()
                ),
                Ok(None) => {}
                Err(e) => tracing::error!(
                    "attaching to {interface}, where NAT replies arrive: {:#}; replies arriving \
                     there go to the local stack untranslated",
                    anyhow::Error::new(e)
                ),
            }
        }
    }

    /// Reads the counters for an API request: now, or `MIN_SAMPLE_GAP` after the last
    /// reading (requests that come meanwhile share it).
    fn sample_soon(&mut self) {
        match self.last_sample {
            Some(last) if last.elapsed() < MIN_SAMPLE_GAP => {
                self.sample_due.get_or_insert(last + MIN_SAMPLE_GAP);
            }
            _ => self.sample(),
        }
    }

    /// Reads the counters (and walks the connection table when due) and publishes.
    pub fn sample(&mut self) {
        let now = Instant::now();
        self.last_sample = Some(now);
        self.sample_due = None;
        let (backends, vips) = self.core.counter_ids();
        let counters = match self.dataplane.counters(&backends, &vips) {
            Ok(counters) => counters,
            Err(e) => {
                let error = format!("{:#}", anyhow::Error::new(e));
                self.handle(Input::SampleFailed { error });
                return;
            }
        };
        let walk = if self.core.conn_walk_due(now) {
            let started = Instant::now();
            match self.dataplane.conn_count() {
                Ok((n, by_backend)) => Some(ConnWalk {
                    entries: n as u64,
                    took: started.elapsed(),
                    by_backend,
                }),
                Err(e) => {
                    let error =
                        format!("counting the connection table: {:#}", anyhow::Error::new(e));
                    self.handle(Input::SampleFailed { error });
                    None
                }
            }
        } else {
            None
        };
        let mut out = self.core.handle(Input::Sampled { counters, walk }, now);
        log_events(&mut out.events);
        self.publish();
    }

    pub fn publish(&mut self) {
        self.publish_due = None;
        let mut snapshot = self.core.snapshot();
        snapshot.sync = self.fleet.sync.as_ref().map(|(stats, _)| stats.clone());
        self.snapshots.send_replace(Arc::new(snapshot));
    }

    /// Resolves `addresses` in a task of its own; the answers come back as they are known.
    fn resolve(&self, addresses: Vec<IpAddr>, then: Option<Resolution>) {
        let resolver = self.resolver.clone();
        let answers = self.resolutions.0.clone();
        tokio::spawn(async move {
            resolver
                .resolve_batch(addresses, |results| {
                    let results = results
                        .into_iter()
                        .map(|(a, r)| (a, r.map_err(|e| format!("{:#}", anyhow::Error::new(e)))))
                        .collect();
                    let _ = answers.send(Resolution::Results(results));
                })
                .await;
            if let Some(then) = then {
                let _ = answers.send(then);
            }
        });
    }

    /// Performs discovery lookups, each in a task of its own (bounded by its timeout), and
    /// resolves the next hops of the addresses an answer brings that are not known yet: the
    /// answer reaches the core with them, as a reload does.
    pub fn start_lookups(&self, lookups: Vec<Lookup>) {
        for lookup in lookups {
            let known: HashSet<IpAddr> = self.core.next_hops().keys().copied().collect();
            let resolver = self.resolver.clone();
            let found = self.discoveries.0.clone();
            tokio::spawn(async move {
                let resolution = crate::shell::dns::resolve(&lookup).await;
                let mut next_hops = Vec::new();
                if let discovery::Resolution::Records { records, .. } = &resolution {
                    let new: std::collections::BTreeSet<IpAddr> = records
                        .iter()
                        .map(|r| r.address)
                        .filter(|a| !known.contains(a))
                        .collect();
                    // An answer over the cap is refused: its addresses are not resolved.
                    if !new.is_empty() && new.len() <= lookup.max_records {
                        resolver
                            .resolve_batch(new, |results| {
                                next_hops.extend(results.into_iter().map(|(a, r)| {
                                    (a, r.map_err(|e| format!("{:#}", anyhow::Error::new(e))))
                                }));
                            })
                            .await;
                    }
                }
                let _ = found.send(Discovered {
                    lookup,
                    resolution,
                    next_hops,
                });
            });
        }
    }

    /// Every backend's next hop again, unless the last refresh is still running.
    fn refresh_next_hops(&mut self) {
        if self.refreshing {
            return;
        }
        self.refreshing = true;
        self.resolve(self.core.addresses(), Some(Resolution::RefreshDone));
    }

    fn resolution(&mut self, resolution: Resolution) {
        let results = match resolution {
            Resolution::RefreshDone => {
                self.refreshing = false;
                return;
            }
            Resolution::Results(results) => results,
        };
        if let Some(pending) = &mut self.pending {
            for (address, result) in &results {
                if pending.waiting.remove(address) {
                    match result {
                        Ok(hop) => pending.resolved.push((*address, hop.clone())),
                        Err(e) => pending.failed.push((*address, Err(e.clone()))),
                    }
                }
            }
        }
        self.handle(Input::Resolved(results));
        if self.pending.as_ref().is_some_and(|p| p.waiting.is_empty()) {
            self.finish_reload();
        }
    }

    fn command(&mut self, command: Command) {
        let (vip, withdraw) = match command.request {
            ControlRequest::Reload => {
                return self.reload(Request {
                    trigger: "control socket",
                    only_if_changed: false,
                    replies: vec![command.reply],
                })
            }
            ControlRequest::Withdraw { vip } => (vip, true),
            ControlRequest::Announce { vip } => (vip, false),
        };
        let out = self
            .core
            .handle(Input::Operator { vip, withdraw }, Instant::now());
        let answer = out.answer.clone();
        self.perform(out);
        self.publish();
        let reply = match answer {
            Some(Ok(message)) => ControlReply::Done { message },
            Some(Err(error)) => ControlReply::Rejected { error },
            None => ControlReply::Failed {
                error: "the daemon did not answer".to_owned(),
            },
        };
        let _ = command.reply.send(reply);
    }

    /// Starts a reload: reads and parses the file, and asks for the next hops of its new
    /// backends. One at a time: a request while one waits is served after it, once for all.
    fn reload(&mut self, request: Request) {
        if self.pending.is_some() {
            match &mut self.queued {
                Some(queued) => queued.merge(request),
                None => self.queued = Some(request),
            }
            return;
        }
        let started = Instant::now();
        let path = self.core.config_path().clone();
        let text = match read_config(&path) {
            Ok(text) => text,
            Err(error) => {
                let outcome = self.handle(Input::ReloadUnreadable { error });
                return self.answer(request, outcome, 0);
            }
        };
        if request.only_if_changed && self.core.read_last(&text) {
            // Written again with what was read last (accepted or not): nothing to say.
            return self.answer(request, None, 0);
        }
        let read = ReadConfig::new(&path, text, &crate::shell::host::host());
        let waiting: HashSet<IpAddr> = self.core.unresolved(&read).into_iter().collect();
        if !waiting.is_empty() {
            self.resolve(waiting.iter().copied().collect(), None);
        }
        self.pending = Some(Pending {
            request,
            read,
            started,
            waiting,
            resolved: Vec::new(),
            failed: Vec::new(),
            deadline: started + RELOAD_RESOLVE_WAIT,
        });
        if self.pending.as_ref().is_some_and(|p| p.waiting.is_empty()) {
            self.finish_reload();
        }
    }

    /// Applies the pending reload with the next hops resolved so far, answers, and starts
    /// the queued one.
    fn finish_reload(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        // New backends that will have no next hop when the config is applied.
        let unresolved = (pending.waiting.len() + pending.failed.len()) as u64;
        let mut next_hops = self.core.next_hops().clone();
        next_hops.extend(pending.resolved);
        let input = Input::Reload {
            read: Box::new(pending.read),
            next_hops,
            only_if_changed: pending.request.only_if_changed,
        };
        let generation = self.core.generation();
        let out = self.core.handle(input, Instant::now());
        let outcome = self.perform(out);
        if self.core.generation() != generation {
            let changes = match &outcome {
                Some(ReloadOutcome::Accepted { changes, .. }) => changes.clone(),
                _ => Vec::new(),
            };
            let took = pending.started.elapsed();
            let trigger = pending.request.trigger;
            let mut events = self.core.applied(took, trigger, changes, Instant::now());
            log_events(&mut events);
        }
        self.settle.set_settle(self.core.config().reload_settle);
        self.publish();
        self.answer(pending.request, outcome, unresolved);
        if !pending.failed.is_empty() {
            // Now that the config names them, the core can say they do not resolve.
            self.handle(Input::Resolved(pending.failed));
        }
        if let Some(queued) = self.queued.take() {
            self.reload(queued);
        }
    }

    /// Answers the control socket clients waiting for a reload. `resolving`: new backends
    /// whose next hops were not resolved yet (said only of an accepted change).
    fn answer(&self, request: Request, outcome: Option<ReloadOutcome>, resolving: u64) {
        if request.replies.is_empty() {
            return;
        }
        let running = self.core.generation();
        let reply = match outcome {
            // Valid and running, but the kernel refused part of the maps: said plainly.
            Some(
                ReloadOutcome::Accepted { generation, .. }
                | ReloadOutcome::Unchanged { generation },
            ) if self.plan_failure.is_some() => ControlReply::Failed {
                error: format!(
                    "config generation {generation} is running, but writing the maps failed: {}; \
                         they are written again, whole, within a second",
                    self.plan_failure.as_deref().unwrap_or_default()
                ),
            },
            Some(ReloadOutcome::Accepted {
                generation,
                changes,
            }) => ControlReply::Reloaded {
                generation,
                changes,
                resolving,
            },
            Some(ReloadOutcome::Rejected { error }) => ControlReply::Rejected { error },
            Some(ReloadOutcome::Unchanged { generation }) => ControlReply::Reloaded {
                generation,
                changes: Vec::new(),
                resolving: 0,
            },
            None => ControlReply::Reloaded {
                generation: running,
                changes: Vec::new(),
                resolving: 0,
            },
        };
        for reply_to in request.replies {
            let _ = reply_to.send(reply.clone());
        }
    }
}

/// The config file's text, at most `MAX_CONFIG_BYTES`.
fn read_config(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read as _;
    let unreadable =
        |e: std::io::Error| format!("{}: cannot read the config file: {e}", path.display());
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!(
            "{}: the config file is larger than {} MiB",
            path.display(),
            MAX_CONFIG_BYTES >> 20
        ));
    }
    Ok(text)
}

//! The event loop: the one place inputs reach the core, and the core's effects are performed.
//! Probe results, reloads (SIGHUP, a change of the config file, the control socket), next hop
//! refreshes, counter readings and ticks go in; map plans are executed, probe tasks synced,
//! events logged, and a snapshot published for the API after every change.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};
use tracing::{error, info};

use crate::{
    api::control::{Command, ControlReply, ControlRequest},
    autoscale::SAMPLE_INTERVAL,
    core::{
        reload::ReloadOutcome, snapshot::Snapshot, traffic::ConnWalk, Core, Input, Output,
        ReadConfig,
    },
    daemon::{
        probes::{ProbeDone, ProbeTasks},
        startup::{log_events, resolve},
    },
    shell::{dataplane::Dataplane, nexthop::Resolver},
};

/// How often next hops are resolved again (a backend's MAC address can change, and one that
/// did not answer at start-up may answer later).
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(10);
/// After a change in the config's directory, wait until it has been quiet this long...
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(20);
/// ...but never longer than this after the first change.
const RELOAD_DEBOUNCE_MAX: Duration = Duration::from_millis(500);

/// The channels that feed the loop.
pub struct Inputs {
    pub probes: mpsc::Receiver<ProbeDone>,
    pub file_changed: mpsc::Receiver<()>,
    pub commands: mpsc::Receiver<Command>,
    pub refresh: mpsc::Receiver<()>,
}

pub struct EventLoop<'a> {
    pub core: &'a mut Core,
    pub dataplane: &'a mut Dataplane,
    pub resolver: &'a Resolver,
    pub probes: &'a mut ProbeTasks,
    pub snapshots: &'a watch::Sender<Arc<Snapshot>>,
    /// Why the last plan failed, if it did (for the reply to a reload).
    plan_failure: Option<String>,
}

impl<'a> EventLoop<'a> {
    pub fn new(
        core: &'a mut Core,
        dataplane: &'a mut Dataplane,
        resolver: &'a Resolver,
        probes: &'a mut ProbeTasks,
        snapshots: &'a watch::Sender<Arc<Snapshot>>,
    ) -> Self {
        EventLoop {
            core,
            dataplane,
            resolver,
            probes,
            snapshots,
            plan_failure: None,
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
        let mut file_changed_at: Option<(Instant, Instant)> = None;
        loop {
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
                _ = sigterm.recv() => return Ok("SIGTERM"),
                _ = sigint.recv() => return Ok("SIGINT"),
                _ = sighup.recv() => {
                    self.reload("SIGHUP", false).await;
                }
                _ = debounce => {
                    file_changed_at = None;
                    self.reload("config file change", true).await;
                }
                Some(()) = inputs.file_changed.recv() => {
                    let now = Instant::now();
                    file_changed_at = Some(file_changed_at.map_or((now, now), |(first, _)| (first, now)));
                }
                Some(command) = inputs.commands.recv() => self.command(command).await,
                Some(done) = inputs.probes.recv() => {
                    if self.probes.is_current(&done) {
                        let input = Input::Probe { key: done.key, result: done.result, seconds: done.seconds };
                        self.handle(input);
                    }
                }
                _ = refresh.tick() => {
                    let hops = resolve(self.resolver, self.core.addresses()).await;
                    self.handle(Input::NextHops(hops));
                }
                _ = ticks.tick() => {
                    self.handle(Input::Tick);
                }
                _ = sampling.tick() => self.sample(),
                Some(()) = inputs.refresh.recv() => self.sample(),
            }
        }
    }

    /// Feeds the core one input, performs what it decides, and publishes a snapshot if
    /// anything happened.
    fn handle(&mut self, input: Input) -> Option<ReloadOutcome> {
        let out = self.core.handle(input, Instant::now());
        let changed = out.plan.is_some()
            || out.checks.is_some()
            || !out.events.is_empty()
            || out.reload.is_some();
        let outcome = self.perform(out);
        if changed {
            self.publish();
        }
        outcome
    }

    /// Performs the core's effects: the plan (a failure is fed back), the health checks, the
    /// log. Returns the reload outcome.
    fn perform(&mut self, mut out: Output) -> Option<ReloadOutcome> {
        log_events(&mut out);
        self.plan_failure = None;
        if let Some(plan) = &out.plan {
            if let Err(e) = self.dataplane.execute(plan) {
                let error = format!("{:#}", anyhow::Error::new(e));
                self.plan_failure = Some(error.clone());
                let mut failed = self
                    .core
                    .handle(Input::PlanFailed { error }, Instant::now());
                log_events(&mut failed);
            }
        }
        if let Some(checks) = &out.checks {
            self.probes.sync(checks);
        }
        out.reload
    }

    /// Reads the counters (and walks the connection table when due) and publishes.
    pub fn sample(&mut self) {
        let now = Instant::now();
        let (backends, vips) = self.core.counter_ids();
        let counters = match self.dataplane.counters(&backends, &vips) {
            Ok(counters) => counters,
            Err(e) => return error!("reading counters: {:#}", anyhow::Error::new(e)),
        };
        let walk = if self.core.conn_walk_due(now) {
            let started = Instant::now();
            match self.dataplane.conn_count() {
                Ok(n) => Some(ConnWalk {
                    entries: n as u64,
                    took: started.elapsed(),
                }),
                Err(e) => {
                    error!("counting the connection table: {:#}", anyhow::Error::new(e));
                    None
                }
            }
        } else {
            None
        };
        let mut out = self.core.handle(Input::Sampled { counters, walk }, now);
        log_events(&mut out);
        self.publish();
    }

    pub fn publish(&self) {
        self.snapshots.send_replace(Arc::new(self.core.snapshot()));
    }

    async fn command(&mut self, command: Command) {
        let reply = match command.request {
            ControlRequest::Reload => match self.reload("control socket", false).await {
                // Valid and running, but the kernel refused part of the maps: said plainly.
                ReloadOutcome::Accepted { generation, .. }
                | ReloadOutcome::Unchanged { generation }
                    if self.plan_failure.is_some() =>
                {
                    ControlReply::Failed {
                        error: format!(
                            "config generation {generation} is running, but writing the maps failed: {}; \
                             they are written again, whole, within a second",
                            self.plan_failure.as_deref().unwrap_or_default()
                        ),
                    }
                }
                ReloadOutcome::Accepted {
                    generation,
                    changes,
                } => ControlReply::Reloaded {
                    generation,
                    changes,
                },
                ReloadOutcome::Unchanged { generation } => ControlReply::Reloaded {
                    generation,
                    changes: Vec::new(),
                },
                ReloadOutcome::Rejected { error } => ControlReply::Rejected { error },
            },
        };
        let _ = command.reply.send(reply);
    }

    /// Reads the config file and hands it to the core. With `only_if_changed`, text equal to
    /// the running config's is ignored silently (the directory watcher sees every write).
    async fn reload(&mut self, trigger: &'static str, only_if_changed: bool) -> ReloadOutcome {
        let started = Instant::now();
        let path = self.core.config_path().clone();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                let error = format!("{}: cannot read the config file: {e}", path.display());
                let outcome = self.handle(Input::ReloadUnreadable { error });
                return outcome.expect("a reload has an outcome");
            }
        };
        if !(only_if_changed && self.core.read_last(&text)) {
            info!("reloading {} ({trigger})", path.display());
        }
        // The next hops of new backends, before the core decides.
        let read = ReadConfig::new(&path, text);
        let mut next_hops = self.core.next_hops().clone();
        let unresolved = self.core.unresolved(&read);
        if !unresolved.is_empty() {
            next_hops.extend(resolve(self.resolver, unresolved).await);
        }
        let input = Input::Reload {
            read,
            next_hops,
            only_if_changed,
        };
        let generation = self.core.generation();
        let out = self.core.handle(input, Instant::now());
        let outcome = self.perform(out).expect("a reload has an outcome");
        if self.core.generation() != generation {
            let took = started.elapsed();
            self.core.record_apply_time(took);
            let summary = match &outcome {
                ReloadOutcome::Accepted { changes, .. } => changes.join("; "),
                _ => "no changes".to_owned(),
            };
            info!(
                "config generation {} applied in {:.1} ms: {summary}",
                self.core.generation(),
                took.as_secs_f64() * 1e3
            );
        }
        self.publish();
        outcome
    }
}

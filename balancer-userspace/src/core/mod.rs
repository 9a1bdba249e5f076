//! The core: every decision the daemon makes, and nothing else. Inputs (a reload, a probe
//! result, next hops resolved, counters read, a tick) go in with the time; effects come out
//! (a map plan, the health checks to run, log events, a reload's outcome). No I/O, no clock,
//! no kernel, no locks: `handle(input, now)` is a plain function of the state, unit-tested
//! with a fake clock (see `tests`). The daemon performs the effects and feeds back what
//! happened.

pub mod adopt;
pub mod announce;
pub mod discovery;
pub mod events;
pub mod health;
pub mod log_limit;
pub mod reload;
pub mod snapshot;
pub mod traffic;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    config::{self, diff, Config},
    core::{
        adopt::adopt,
        announce::Announcement,
        discovery::{Discovery, Lookup, Resolution},
        events::{Event, VipCondition},
        health::{ProbeFailure, ProbeResult, Tracker},
        log_limit::{LogLimit, CONDITIONS_EVERY},
        reload::{
            carry_trackers, check_set, retiring_after, routed_dsr_backends, CheckSet, ReloadOutcome,
        },
        snapshot::{AllDownStats, ReloadStats, Snapshot, Sources},
        traffic::{ConnWalk, Traffic},
    },
    plan::{
        contents::{Counters, MapContents, NatSweep},
        desired::BackendState,
        desired::{desired_state_after, DesiredState},
        ids::{IdError, Ids},
        inputs::{format_mac, BackendKey, Health, NextHop, NextHops},
        ops::{plan, rewrite_all, MapPlan},
    },
};

/// What the daemon starts from.
pub struct Start {
    pub config_path: PathBuf,
    pub config: Config,
    /// The config file's text, to tell a rewrite of the same text from a change.
    pub text: String,
    pub next_hops: NextHops,
    /// Backend addresses that could not be resolved, and why.
    pub unreachable: Vec<(IpAddr, String)>,
    /// What pinned maps hold, when a data plane is adopted.
    pub adopted: Option<MapContents>,
    /// `--keep-datapath` was given (the config's `keep_datapath` can also ask for it).
    pub keep_datapath: bool,
    /// `--withdrawn`: start with every VIP withdrawn (until `balancer announce`).
    pub withdrawn: bool,
}

/// A config file's text, parsed once: the daemon needs its backends' addresses (to resolve
/// the new ones) before the core decides on it.
#[derive(Debug)]
pub struct ReadConfig {
    pub text: String,
    pub parsed: Result<Config, config::ConfigError>,
}

impl ReadConfig {
    /// Parses `text`, read from `path`, for `host`.
    pub fn new(path: &Path, text: String, host: &config::Host) -> ReadConfig {
        let parsed = config::parse_for(path, &text, host);
        ReadConfig { text, parsed }
    }
}

/// Something that happened, for the core to decide on.
#[derive(Debug)]
pub enum Input {
    /// The config file was read. `next_hops` holds every address already known plus the
    /// new ones that could be resolved. With `only_if_changed`, text equal to the running
    /// config's is no reload at all (a file watcher sees every write).
    Reload {
        /// Boxed: a parsed config is far larger than any other input.
        read: Box<ReadConfig>,
        next_hops: NextHops,
        only_if_changed: bool,
    },
    /// The config file could not be read.
    ReloadUnreadable { error: String },
    /// A health probe's result, and how long it took.
    Probe {
        key: BackendKey,
        result: ProbeResult,
        seconds: f64,
    },
    /// Next hops resolved (again), or why not, for some backend addresses.
    Resolved(Vec<(IpAddr, Result<NextHop, String>)>),
    /// The counters, and the connection table's walk if one was due.
    Sampled {
        counters: Counters,
        walk: Option<ConnWalk>,
    },
    /// The counters could not be read.
    SampleFailed { error: String },
    /// The NAT tables were swept, or could not be.
    NatSwept(Result<NatSweep, String>),
    /// A discovery lookup came back, with the next hops of the addresses in it that were not
    /// known yet.
    Discovered {
        vip: String,
        query: crate::config::DiscoverQuery,
        resolution: Resolution,
        next_hops: Vec<(IpAddr, Result<NextHop, String>)>,
    },
    /// Time passes (removal grace periods end, coalesced health changes reach the maps, a
    /// failed plan is retried, log summaries fall due).
    Tick,
    /// The kernel refused part of the last plan.
    PlanFailed { error: String },
    /// `balancer withdraw` (`withdraw`) or `balancer announce`, of one VIP or all.
    Operator { vip: Option<String>, withdraw: bool },
    /// The routes of the last `Output::routes` could not all be written.
    RoutesFailed { error: String },
    /// The peers' connection tables are copied (or the wait for them is over).
    SyncReady { detail: String },
}

/// What the daemon must do.
#[derive(Debug, Default)]
pub struct Output {
    /// Map operations to execute, in order.
    pub plan: Option<MapPlan>,
    /// The health checks to run from now on (when they change).
    pub checks: Option<CheckSet>,
    pub events: Vec<Event>,
    /// The answer to a reload.
    pub reload: Option<ReloadOutcome>,
    /// DNS lookups to perform (answers come back as `Input::Discovered`).
    pub lookups: Vec<Lookup>,
    /// The VIP addresses to announce (`[announce]`), when they change: the routes to hold.
    pub routes: Option<std::collections::BTreeSet<IpAddr>>,
    /// The answer to `Input::Operator`: what to tell the operator, or why not.
    pub answer: Option<Result<String, String>>,
}

pub struct Core {
    config_path: PathBuf,
    /// The config in force: the file's, with the discovered backends added.
    config: Config,
    /// The config as the file says it.
    file_config: Config,
    /// Every discovering VIP's discovery, by VIP name.
    discovery: BTreeMap<String, Discovery>,
    /// The health checks of retiring backends (they go on until the grace ends: a replica
    /// stopped after its removal is seen down, and its flows move).
    retiring_checks: BTreeMap<BackendKey, config::HealthCheck>,
    config_text: String,
    /// The text of the last config file read, accepted or not: a watcher's reload of the
    /// same text again is no reload (an invalid file left in place is rejected once).
    last_read: String,
    /// Increments with every accepted reload (1 for the config the daemon started with).
    generation: u64,
    ids: Ids,
    /// Health verdicts of backends with checks (kind none: always up, no tracker).
    trackers: HashMap<BackendKey, Tracker>,
    /// Backends removed from the config, and when their grace period ends.
    retiring: BTreeMap<BackendKey, Instant>,
    next_hops: NextHops,
    /// What the maps hold (the last desired state committed; before the first, what adopted
    /// maps hold, tables unknown), and what the planner said of each VIP.
    desired: DesiredState,
    /// A plan failed half-way: the maps hold some mix of the last two desired states.
    held_unknown: bool,
    reloads: ReloadStats,
    all_down: HashMap<String, AllDownStats>,
    traffic: Traffic,
    keep_datapath_flag: bool,
    adopted: Option<String>,
    checks: CheckSet,
    /// Health verdicts changed since the maps were last planned: they are planned together
    /// at this time (one table build per burst of changes, not one per change).
    rebuild_due: Option<Instant>,
    /// Addresses that do not resolve, and why (logged once when they start and stop).
    unreachable: BTreeMap<IpAddr, String>,
    log: LogLimit,
    /// When ongoing conditions are next summarised in the log.
    conditions_due: Instant,
    /// Which VIP addresses are announced, and what withholds the others.
    announcement: Announcement,
    /// The routes may not be what `announcement.routes` says (at start, after a failure):
    /// they are written whole again.
    routes_unknown: bool,
}

/// Rejected records of one answer that are logged (the others are counted).
const REJECTED_LOGGED: usize = 5;

/// How long health verdicts are gathered before the maps are planned with them.
pub const COALESCE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("the config does not fit the maps")]
    Ids(#[source] IdError),
}

impl Core {
    /// The core for a starting daemon, and the effects of starting: the first plan (from
    /// empty maps, or from what adopted maps hold) and the health checks to run.
    pub fn start(start: Start, now: Instant) -> Result<(Core, Output), CoreError> {
        let announcement =
            Announcement::starting(&start.config, start.withdrawn, start.adopted.is_some());
        let discovery = start
            .config
            .vips
            .iter()
            .filter_map(|v| {
                Some((
                    v.name.clone(),
                    Discovery::new(v.discover.as_ref()?.query.clone(), now),
                ))
            })
            .collect();
        let mut core = Core {
            config_path: start.config_path,
            config: start.config.clone(),
            file_config: start.config,
            discovery,
            retiring_checks: BTreeMap::new(),
            last_read: start.text.clone(),
            config_text: start.text,
            generation: 1,
            ids: Ids::default(),
            trackers: HashMap::new(),
            retiring: BTreeMap::new(),
            next_hops: start.next_hops,
            desired: DesiredState::default(),
            held_unknown: false,
            reloads: ReloadStats::default(),
            all_down: HashMap::new(),
            traffic: Traffic::default(),
            keep_datapath_flag: start.keep_datapath,
            adopted: None,
            checks: CheckSet::new(),
            rebuild_due: None,
            unreachable: BTreeMap::new(),
            log: LogLimit::default(),
            conditions_due: now + CONDITIONS_EVERY,
            announcement,
            routes_unknown: true,
        };
        if let Some(pinned) = &start.adopted {
            core.seed_discovered(pinned);
            let adoption = adopt(&core.config, pinned, now);
            core.ids = adoption.ids;
            core.trackers = adoption.trackers;
            core.retiring = adoption.retiring;
            core.desired.maps = adoption.held;
            core.adopted = Some(adoption.summary);
        }
        core.trackers = carry_trackers(
            std::mem::take(&mut core.trackers),
            &core.config,
            &core.retiring,
        );
        let mut out = Output {
            events: routed_dsr_backends(&core.config, &core.next_hops),
            ..Output::default()
        };
        for (address, error) in start.unreachable {
            out.events.push(Event::Unreachable {
                address,
                error: error.clone(),
            });
            core.unreachable.insert(address, error);
        }
        // Known before the first commit: it tells backends waiting for their first checks.
        core.checks = check_set(&core.config, &core.retiring_checks);
        let mut ids = std::mem::take(&mut core.ids);
        let desired = core.plan_desired(&mut ids).map_err(CoreError::Ids)?;
        core.ids = ids;
        core.commit(desired, &mut out);
        out.checks = Some(core.checks.clone());
        core.lookups(now, &mut out);
        core.announce(&mut out);
        core.limit(&mut out.events, now);
        Ok((core, out))
    }

    /// Decides what `input` means at `now`.
    pub fn handle(&mut self, input: Input, now: Instant) -> Output {
        let mut out = Output::default();
        match input {
            Input::Reload {
                read,
                next_hops,
                only_if_changed,
            } => self.reload(*read, next_hops, only_if_changed, now, &mut out),
            Input::ReloadUnreadable { error } => {
                self.last_read.clear();
                self.reject(error, &mut out)
            }
            Input::Probe {
                key,
                result,
                seconds,
            } => self.probe(&key, &result, seconds, now, &mut out),
            Input::Resolved(results) => self.resolved(results, now, &mut out),
            Input::Sampled { counters, walk } => {
                if let Some(walk) = walk {
                    self.traffic.walked(walk, now);
                }
                out.events = self
                    .traffic
                    .record(counters, &self.desired, &self.config, now);
            }
            Input::SampleFailed { error } => out.events.push(Event::CountersUnreadable { error }),
            Input::NatSwept(Ok(sweep)) => self.traffic.swept(sweep),
            Input::NatSwept(Err(error)) => out.events.push(Event::CountersUnreadable { error }),
            Input::Discovered {
                vip,
                query,
                resolution,
                next_hops,
            } => self.discovered(&vip, &query, resolution, next_hops, now, &mut out),
            Input::Tick => self.tick(now, &mut out),
            Input::PlanFailed { error } => {
                self.held_unknown = true;
                out.events.push(Event::PlanFailed { error });
            }
            Input::Operator { vip, withdraw } => {
                let answer = match self.config.announce {
                    None => Err(format!(
                        "{} has no [announce] table: this balancer announces nothing",
                        self.config_path.display()
                    )),
                    Some(_) => self
                        .announcement
                        .operator(&self.config, vip.as_deref(), withdraw),
                };
                out.answer = Some(answer);
            }
            Input::RoutesFailed { error } => {
                self.routes_unknown = true;
                out.events.push(Event::RoutesFailed { error });
            }
            Input::SyncReady { detail } => {
                if self.announcement.awaiting_sync {
                    self.announcement.awaiting_sync = false;
                    out.events.push(Event::SyncReady { detail });
                }
            }
        }
        self.announce(&mut out);
        self.limit(&mut out.events, now);
        out
    }

    /// The routes to hold when the announced addresses change (or must be written again),
    /// and the event that says so.
    fn announce(&mut self, out: &mut Output) {
        let Some(announce) = &self.config.announce else {
            return;
        };
        self.announcement.retain(&self.config);
        let reasons = self.announcement.reasons(&self.config, &self.desired);
        let wanted = Announcement::wanted(&self.config, &reasons);
        let old = &self.announcement.routes;
        if wanted == *old && !self.routes_unknown {
            return;
        }
        let added: Vec<IpAddr> = wanted.difference(old).copied().collect();
        let withdrawn: Vec<(IpAddr, String)> = old
            .difference(&wanted)
            .map(|address| {
                let why = self
                    .config
                    .vips
                    .iter()
                    .filter(|v| v.address == *address)
                    .filter_map(|v| Some(format!("{}: {}", v.name, reasons.get(&v.name)?.as_str())))
                    .collect::<Vec<_>>();
                let why = if why.is_empty() {
                    "no VIP has this address any more".to_owned()
                } else {
                    why.join("; ")
                };
                (*address, why)
            })
            .collect();
        if !added.is_empty() || !withdrawn.is_empty() {
            out.events.push(Event::Announced {
                added,
                withdrawn,
                table: announce.table,
            });
        }
        self.routes_unknown = false;
        self.announcement.routes.clone_from(&wanted);
        out.routes = Some(wanted);
    }

    /// Passes the events the log budget allows; counts the others for the next summary.
    fn limit(&mut self, events: &mut Vec<Event>, now: Instant) {
        events.retain(|event| match event.kind() {
            Some(kind) => self.log.admit(kind, event.subject(), now),
            None => true,
        });
    }

    /// When the core next has something to do without another input: coalesced health
    /// changes to plan, or a log summary to write. The daemon sends `Input::Tick` then (and
    /// every second anyway).
    pub fn next_wake(&self) -> Option<Instant> {
        let discovery = self
            .config
            .vips
            .iter()
            .filter_map(|v| Some(self.discovery.get(&v.name)?.wake(v.discover.as_ref()?)))
            .min();
        [self.rebuild_due, self.log.summary_due(), discovery]
            .into_iter()
            .flatten()
            .min()
    }

    /// Records that an accepted reload took `took`, from reading the file to the maps
    /// written (measured by the daemon, which does both); the events to log.
    pub fn applied(
        &mut self,
        took: Duration,
        trigger: &'static str,
        changes: Vec<String>,
        now: Instant,
    ) -> Vec<Event> {
        self.reloads.last_apply = Some(took);
        let mut events = vec![Event::ReloadApplied {
            generation: self.generation,
            millis: took.as_secs_f64() * 1e3,
            trigger,
            changes,
        }];
        self.limit(&mut events, now);
        events
    }

    /// The desired state from everything known.
    fn plan_desired(&self, ids: &mut Ids) -> Result<DesiredState, IdError> {
        desired_for(
            &self.config,
            &self.retiring,
            &self.trackers,
            &self.next_hops,
            ids,
            &self.desired,
        )
    }

    /// Makes `desired` the state the maps are to hold: the plan there, and the all-down
    /// episodes it starts or ends.
    fn commit(&mut self, desired: DesiredState, out: &mut Output) {
        let held = &self.desired.maps;
        let plan = if self.held_unknown {
            rewrite_all(held, &desired.maps)
        } else {
            plan(held, &desired.maps)
        };
        // Taken as held at once: the daemon executes the plan before any other input, and
        // reports a failure with `Input::PlanFailed`.
        self.held_unknown = false;
        // Every verdict known is in this plan.
        self.rebuild_due = None;
        self.note_all_down(&desired, out);
        self.desired = desired;
        if !plan.is_empty() {
            out.plan = Some(plan);
        }
    }

    /// Recomputes the desired state after a change of health, next hops or retiring backends.
    fn reconcile(&mut self, out: &mut Output) {
        let mut ids = std::mem::take(&mut self.ids);
        let desired = self.plan_desired(&mut ids);
        self.ids = ids;
        match desired {
            Ok(desired) => self.commit(desired, out),
            Err(e) => out.events.push(Event::Unplannable {
                error: e.to_string(),
            }),
        }
    }

    /// Whether every down backend of `vip` that takes new flows is down only because it
    /// starts so (`initial = "down"`) and has not had `rise` probes yet.
    fn awaiting_first_checks(&self, vip: &crate::plan::desired::DesiredVip) -> bool {
        vip.backends
            .iter()
            .filter(|b| b.state == BackendState::Down)
            .all(|b| {
                let key = (vip.name.clone(), b.address);
                match (self.trackers.get(&key), self.checks.get(&key)) {
                    // Up already: the maps are about to say so.
                    (Some(t), Some((_, check))) => t.up || t.probes < u64::from(check.rise),
                    _ => false,
                }
            })
    }

    /// VIPs that waited for their first checks and still have every backend down once the
    /// checks have concluded: now that is an all-down episode.
    fn awaited(&mut self, out: &mut Output) {
        let concluded: Vec<(String, usize, bool)> = self
            .desired
            .vips
            .iter()
            .filter(|vip| {
                self.all_down
                    .get(&vip.name)
                    .is_some_and(|s| s.active && s.awaiting)
                    && !self.awaiting_first_checks(vip)
            })
            .map(|vip| {
                let down = vip
                    .backends
                    .iter()
                    .filter(|b| b.state == BackendState::Down)
                    .count();
                (vip.name.clone(), down, vip.fail_open)
            })
            .collect();
        for (vip, down, fail_open) in concluded {
            if let Some(stats) = self.all_down.get_mut(&vip) {
                stats.awaiting = false;
                stats.episodes += 1;
            }
            out.events.push(Event::AllDown {
                vip,
                down,
                fail_open,
            });
        }
    }

    /// Logs (once per episode) and counts VIPs whose backends are all down.
    fn note_all_down(&mut self, desired: &DesiredState, out: &mut Output) {
        for vip in &desired.vips {
            let all_down = vip.all_down();
            let awaiting = all_down && self.awaiting_first_checks(vip);
            let stats = self.all_down.entry(vip.name.clone()).or_default();
            if all_down && !stats.active && awaiting {
                stats.awaiting = true;
                out.events.push(Event::AwaitingChecks {
                    vip: vip.name.clone(),
                    backends: vip.backends.len(),
                    fail_open: vip.fail_open,
                });
            } else if all_down && !stats.active {
                stats.episodes += 1;
                let down = vip
                    .backends
                    .iter()
                    .filter(|b| b.state == crate::plan::desired::BackendState::Down)
                    .count();
                out.events.push(Event::AllDown {
                    vip: vip.name.clone(),
                    down,
                    fail_open: vip.fail_open,
                });
            } else if !all_down && stats.active {
                if !stats.awaiting {
                    out.events.push(Event::Recovered {
                        vip: vip.name.clone(),
                    });
                }
                stats.awaiting = false;
            }
            stats.active = all_down;
        }
        self.all_down
            .retain(|name, _| desired.vips.iter().any(|v| &v.name == name));
    }

    /// The health checks to run, when they changed.
    fn sync_checks(&mut self, out: &mut Output) {
        let wanted = check_set(&self.config, &self.retiring_checks);
        if wanted != self.checks {
            self.checks = wanted.clone();
            out.checks = Some(wanted);
        }
    }

    fn reload(
        &mut self,
        read: ReadConfig,
        next_hops: NextHops,
        only_if_changed: bool,
        now: Instant,
        out: &mut Output,
    ) {
        let ReadConfig { text, parsed } = read;
        let seen = self.read_last(&text);
        self.last_read.clone_from(&text);
        if only_if_changed && seen {
            out.reload = Some(ReloadOutcome::Unchanged {
                generation: self.generation,
            });
            return;
        }
        let new = match parsed {
            Ok(new) => new,
            Err(e) => return self.reject(e.to_string(), out),
        };
        let restart = diff::needs_restart(&self.file_config, &new);
        if !restart.is_empty() {
            let error = format!(
                "{}: changing {} needs a restart of the daemon; the running config stays in force",
                self.config_path.display(),
                restart.join(", ")
            );
            return self.reject(error, out);
        }
        if new == self.file_config {
            // Nothing to do (comments or layout changed): no new generation.
            self.config_text = text;
            self.reloads.accepted += 1;
            out.reload = Some(ReloadOutcome::Unchanged {
                generation: self.generation,
            });
            return;
        }
        let changes: Vec<String> = diff::diff(&self.file_config, &new)
            .iter()
            .map(ToString::to_string)
            .collect();
        let discovery = self.discovery_after(&new, now);
        let effective = discovery::effective(&new, &discovery);
        if let Err(e) = self.apply(effective, next_hops, now, out) {
            // The running config stays in force, with everything that came with it.
            return self.reject(format!("{}: {e}", self.config_path.display()), out);
        }
        self.file_config = new;
        self.config_text = text;
        self.discovery = discovery;
        self.accept(changes, out);
        self.lookups(now, out);
    }

    /// Makes `new` (a config with its discovered backends) the config in force: removed
    /// backends start their grace, verdicts carry over, the maps and checks follow. On an
    /// error nothing changes.
    fn apply(
        &mut self,
        new: Config,
        next_hops: NextHops,
        now: Instant,
        out: &mut Output,
    ) -> Result<(), IdError> {
        let retiring = retiring_after(&self.config, &new, &self.retiring, now);
        let trackers = carry_trackers(self.trackers.clone(), &new, &retiring);
        let mut ids = self.ids.clone();
        let desired = desired_for(
            &new,
            &retiring,
            &trackers,
            &next_hops,
            &mut ids,
            &self.desired,
        )?;
        out.events.extend(routed_dsr_backends(&new, &next_hops));
        // A backend that starts its grace keeps the check it had.
        let mut checks = std::mem::take(&mut self.retiring_checks);
        checks.retain(|key, _| retiring.contains_key(key));
        let new_keys: Vec<BackendKey> = retiring
            .keys()
            .filter(|k| !checks.contains_key(*k))
            .cloned()
            .collect();
        for key in new_keys {
            let check = self
                .config
                .vips
                .iter()
                .filter(|v| v.name == key.0)
                .flat_map(|v| &v.backends)
                .find(|b| b.address == key.1)
                .map(|b| b.health.clone())
                .filter(|h| h.kind != config::CheckKind::None);
            if let Some(check) = check {
                checks.insert(key, check);
            }
        }
        self.retiring_checks = checks;
        self.config = new;
        self.retiring = retiring;
        self.trackers = trackers;
        self.next_hops = next_hops;
        self.ids = ids;
        let known = self.addresses();
        self.unreachable
            .retain(|a, _| known.binary_search(a).is_ok());
        // The checks first: the commit tells backends that wait for their first checks.
        self.sync_checks(out);
        self.commit(desired, out);
        Ok(())
    }

    fn accept(&mut self, changes: Vec<String>, out: &mut Output) {
        self.generation += 1;
        self.reloads.accepted += 1;
        out.reload = Some(ReloadOutcome::Accepted {
            generation: self.generation,
            changes,
        });
    }

    fn reject(&mut self, error: String, out: &mut Output) {
        self.reloads.rejected += 1;
        self.reloads.last_error = Some(error.clone());
        out.events.push(Event::ReloadRejected {
            error: error.clone(),
        });
        out.reload = Some(ReloadOutcome::Rejected { error });
    }

    /// Records a probe result; a change of verdict is logged once and reaches the maps with
    /// the other changes of the next `COALESCE`.
    fn probe(
        &mut self,
        key: &BackendKey,
        result: &ProbeResult,
        seconds: f64,
        now: Instant,
        out: &mut Output,
    ) {
        // The check set indexes the config's checks by backend: a probe result costs a
        // lookup, not a walk over every backend.
        let Some((_, check)) = self.checks.get(key) else {
            return;
        };
        let Some(tracker) = self.trackers.get_mut(key) else {
            return;
        };
        // A probe that could not run is said, and counted by the tracker; it took no time
        // worth observing, and moves no verdict.
        if let Err(ProbeFailure::Local(error)) = result {
            out.events.push(Event::ProbeNotRun {
                key: key.clone(),
                error: error.clone(),
            });
        } else {
            tracker.durations.observe(seconds);
        }
        let Some(transition) = tracker.record(result, check.rise, check.fall) else {
            return;
        };
        let (key, streak, check) = (key.clone(), transition.streak, check.kind.name());
        out.events.push(if transition.up {
            Event::BackendUp { key, streak, check }
        } else {
            Event::BackendDown {
                key,
                streak,
                check,
                reason: transition.reason,
            }
        });
        self.rebuild_due.get_or_insert(now + COALESCE);
    }

    /// Takes next hops resolved for some addresses (or why they do not resolve); changes the
    /// maps if any changed. Each address is logged when it stops resolving and when it
    /// resolves again, not at every attempt.
    fn resolved(
        &mut self,
        results: Vec<(IpAddr, Result<NextHop, String>)>,
        now: Instant,
        out: &mut Output,
    ) {
        let known = self.addresses();
        // Listed by the config (the others in `known` are retiring only).
        let listed = reload::addresses(&self.config);
        let mut changed = false;
        let mut results = results;
        results.sort_by_key(|(address, _)| *address);
        for (address, result) in results {
            // Answers for backends that left the config since the question.
            if known.binary_search(&address).is_err() {
                continue;
            }
            match result {
                Ok(hop) => {
                    let was_unreachable = self.unreachable.remove(&address).is_some();
                    let known = self.next_hops.get(&address);
                    if known == Some(&hop) {
                        continue;
                    }
                    // A new backend resolving for the first time is no news; a next hop that
                    // moved, or one that resolves again, is.
                    if known.is_some() || was_unreachable {
                        out.events.push(Event::NextHopChanged {
                            address,
                            mac: format_mac(&hop.dst_mac),
                            interface: hop.interface.clone(),
                        });
                    }
                    self.next_hops.insert(address, hop);
                    changed = true;
                }
                Err(error) => {
                    if self.next_hops.remove(&address).is_some() {
                        let retiring = listed.binary_search(&address).is_err();
                        out.events
                            .push(Event::NoLongerResolves { address, retiring });
                        changed = true;
                    } else if !self.unreachable.contains_key(&address) {
                        out.events.push(Event::Unreachable {
                            address,
                            error: error.clone(),
                        });
                    }
                    self.unreachable.insert(address, error);
                }
            }
        }
        if changed {
            // Answers come in batches (one per round of a resolution): planned together.
            self.rebuild_due.get_or_insert(now + COALESCE);
        }
    }

    /// The discoveries under a new file config: kept for VIPs that still discover (asked
    /// again at once if their settings changed; a new name keeps the old set until its first
    /// answer), new ones for VIPs that start, none for VIPs that stop.
    fn discovery_after(&self, new: &Config, now: Instant) -> BTreeMap<String, Discovery> {
        new.vips
            .iter()
            .filter_map(|vip| {
                let spec = vip.discover.as_ref()?;
                let old_spec = self
                    .file_config
                    .vips
                    .iter()
                    .find(|v| v.name == vip.name)
                    .and_then(|v| v.discover.as_ref());
                let state = match self.discovery.get(&vip.name) {
                    Some(old) if old_spec == Some(spec) => old.clone(),
                    Some(old) => {
                        let mut state = old.clone();
                        if state.query != spec.query {
                            state.query = spec.query.clone();
                            state.empty_since = None;
                            state.in_flight = None;
                        }
                        state.next_due = now;
                        state
                    }
                    None => Discovery::new(spec.query.clone(), now),
                };
                Some((vip.name.clone(), state))
            })
            .collect()
    }

    /// Hands out the discovery lookups that are due.
    fn lookups(&mut self, now: Instant, out: &mut Output) {
        for vip in &self.file_config.vips {
            let (Some(spec), Some(state)) = (&vip.discover, self.discovery.get_mut(&vip.name))
            else {
                continue;
            };
            if let Some(lookup) = state.due(vip, spec, now) {
                out.lookups.push(lookup);
            }
        }
    }

    /// A discovery lookup came back: the VIP's discovered set follows it (through the path
    /// of a reload) or stays, as `discovery::answer` decides.
    fn discovered(
        &mut self,
        vip_name: &str,
        query: &config::DiscoverQuery,
        resolution: Resolution,
        hops: Vec<(IpAddr, Result<NextHop, String>)>,
        now: Instant,
        out: &mut Output,
    ) {
        let Some(vip) = self.file_config.vips.iter().find(|v| v.name == vip_name) else {
            return;
        };
        let (Some(spec), Some(state)) = (&vip.discover, self.discovery.get_mut(vip_name)) else {
            return;
        };
        // An answer for a name the VIP no longer asks for.
        if state.query != *query {
            return;
        }
        let before = state.clone();
        let applied = discovery::answer(state, vip, spec, &self.file_config.vips, resolution, now);
        let (vip_name, query_text) = (vip.name.clone(), query.to_string());
        discovery_events(&vip_name, &query_text, before.backends.len(), &applied, out);
        if applied.changed {
            let total = self
                .discovery
                .get(&vip_name)
                .map_or(0, |d| d.backends.len());
            let mut next_hops = self.next_hops.clone();
            let mut failed = Vec::new();
            for (address, result) in hops {
                match result {
                    Ok(hop) => {
                        next_hops.insert(address, hop);
                    }
                    Err(e) => failed.push((address, Err(e))),
                }
            }
            let effective = discovery::effective(&self.file_config, &self.discovery);
            // Said before what the change brings about (checks awaited, a VIP all down).
            let at = out.events.len();
            match self.apply(effective, next_hops, now, out) {
                Ok(()) => out.events.insert(
                    at,
                    Event::DiscoveryChanged {
                        vip: vip_name,
                        query: query_text,
                        added: applied.added,
                        removed: applied.removed,
                        total,
                    },
                ),
                Err(e) => {
                    // The set that could not be planned is not the set in force.
                    self.discovery.insert(vip_name, before);
                    out.events.push(Event::Unplannable {
                        error: e.to_string(),
                    });
                }
            }
            if !failed.is_empty() {
                self.resolved(failed, now, out);
            }
        }
        self.lookups(now, out);
    }

    /// At the start over a kept data plane: the backends the maps hold for a discovering VIP
    /// that its file does not list are taken as discovered (they were), until the first
    /// answer says otherwise; its new flows are not refused meanwhile.
    fn seed_discovered(&mut self, pinned: &MapContents) {
        for vip in &self.file_config.vips {
            let (Some(spec), Some(state)) = (&vip.discover, self.discovery.get_mut(&vip.name))
            else {
                continue;
            };
            let Some(meta) = pinned.meta(&crate::plan::inputs::vip_key(vip)) else {
                continue;
            };
            let listed: Vec<IpAddr> = vip.backends.iter().map(|b| b.address).collect();
            let records: Vec<config::discover::Record> = pinned
                .backends
                .values()
                .filter(|b| b.vip_id == meta.vip_id)
                .map(|b| config::discover::Record {
                    address: crate::plan::inputs::address_of(b.addr, b.family),
                    port: Some(u16::from_be(b.port)).filter(|p| *p != 0),
                    weight: None,
                })
                .filter(|r| !listed.contains(&r.address))
                .collect();
            state.backends = std::sync::Arc::new(
                records
                    .iter()
                    .filter_map(|r| {
                        config::discover::discovered_backend(vip, spec, &self.file_config.vips, r)
                            .ok()
                    })
                    .collect(),
            );
        }
        self.config = discovery::effective(&self.file_config, &self.discovery);
    }

    /// Ends the grace period of removed backends whose time is up; retries a failed plan.
    fn tick(&mut self, now: Instant, out: &mut Output) {
        let expired: Vec<BackendKey> = self
            .retiring
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &expired {
            self.retiring.remove(key);
            self.trackers.remove(key);
            self.retiring_checks.remove(key);
            out.events
                .push(Event::RemovalGraceOver { key: key.clone() });
        }
        if !expired.is_empty() {
            self.sync_checks(out);
        }
        self.lookups(now, out);
        let rebuild = self.rebuild_due.is_some_and(|due| due <= now);
        if rebuild {
            // Taken even if planning fails: a due time in the past would wake the daemon
            // again at once, forever.
            self.rebuild_due = None;
        }
        if !expired.is_empty() || self.held_unknown || rebuild {
            self.reconcile(out);
        }
        self.awaited(out);
        if let Some(left_out) = self.log.summary(now) {
            out.events.push(Event::LeftOut(left_out));
        }
        if now >= self.conditions_due {
            self.conditions_due = now + CONDITIONS_EVERY;
            let conditions = self.conditions();
            if !conditions.is_empty() {
                out.events.push(Event::Conditions(conditions));
            }
        }
    }

    /// VIPs with backends down or unreachable, the most affected first.
    fn conditions(&self) -> Vec<VipCondition> {
        let mut vips: Vec<VipCondition> = self
            .desired
            .vips
            .iter()
            .map(|vip| {
                let count = |state| vip.backends.iter().filter(|b| b.state == state).count();
                VipCondition {
                    vip: vip.name.clone(),
                    backends: vip.backends.len(),
                    down: count(BackendState::Down),
                    unreachable: count(BackendState::Unreachable),
                }
            })
            .filter(|c| c.down + c.unreachable > 0)
            .collect();
        vips.sort_by(|a, b| {
            (b.down + b.unreachable)
                .cmp(&(a.down + a.unreachable))
                .then_with(|| a.vip.cmp(&b.vip))
        });
        vips
    }

    /// Backend addresses a config read names that have no known next hop; none if it is not
    /// a valid config (the reload will say why).
    pub fn unresolved(&self, read: &ReadConfig) -> Vec<IpAddr> {
        let Ok(config) = &read.parsed else {
            return Vec::new();
        };
        reload::addresses(config)
            .into_iter()
            .filter(|a| !self.next_hops.contains_key(a))
            .collect()
    }

    /// Every backend address the maps know: configured and retiring.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut addresses = reload::addresses(&self.config);
        addresses.extend(self.retiring.keys().map(|(_, a)| *a));
        addresses.sort();
        addresses.dedup();
        addresses
    }

    pub fn next_hops(&self) -> &NextHops {
        &self.next_hops
    }

    /// The ids whose counters to read: every backend and VIP the maps hold.
    pub fn counter_ids(&self) -> (Vec<u32>, Vec<u32>) {
        (
            self.desired.maps.backends.keys().copied().collect(),
            self.desired.maps.tables.keys().copied().collect(),
        )
    }

    /// Whether the connection table should be walked with the next reading.
    pub fn conn_walk_due(&self, now: Instant) -> bool {
        self.traffic.walk_due(now)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether `text` is what was read last, or what runs (a file watcher's reload of it is
    /// none).
    pub fn read_last(&self, text: &str) -> bool {
        text == self.last_read || text == self.config_text
    }

    pub fn config_path(&self) -> &PathBuf {
        &self.config_path
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// Whether the data plane stays at exit: `--keep-datapath`, or `keep_datapath` in the
    /// running config.
    pub fn keep_datapath(&self) -> bool {
        self.keep_datapath_flag || self.config.keep_datapath
    }

    /// What was adopted at start, if anything.
    pub fn adopted(&self) -> Option<&str> {
        self.adopted.as_deref()
    }

    /// The picture the API renders.
    /// The interfaces NAT replies arrive on: those the backends of NAT VIPs are reached
    /// through (the program must run there to translate them back).
    pub fn reply_interfaces(&self) -> std::collections::BTreeSet<String> {
        self.config
            .vips
            .iter()
            .zip(&self.desired.vips)
            .filter(|(vip, _)| vip.forwarding == config::Forwarding::Nat)
            .flat_map(|(_, planned)| &planned.backends)
            .filter_map(|b| self.next_hops.get(&b.address))
            .map(|hop| hop.interface.clone())
            .collect()
    }

    pub fn snapshot(&self) -> Snapshot {
        snapshot::build(&Sources {
            config_path: &self.config_path,
            config: &self.config,
            generation: self.generation,
            reloads: &self.reloads,
            keep_datapath: self.keep_datapath(),
            adopted: &self.adopted,
            desired: &self.desired,
            trackers: &self.trackers,
            next_hops: &self.next_hops,
            all_down: &self.all_down,
            traffic: &self.traffic,
            discovery: &self.discovery,
            announcement: &self.announcement,
        })
    }
}

/// What a discovery answer has to say besides a change of the set: records left out, an
/// answer refused, a failure, a recovery, an empty answer kept through the grace. `kept`: the
/// backends the VIP had.
fn discovery_events(
    vip_name: &str,
    query_text: &str,
    kept: usize,
    applied: &discovery::Applied,
    out: &mut Output,
) {
    let (vip_name, query_text) = (vip_name.to_owned(), query_text.to_owned());
    for (address, why) in applied.rejected.iter().take(REJECTED_LOGGED) {
        out.events.push(Event::DiscoveryRecordRejected {
            vip: vip_name.clone(),
            address: *address,
            why: why.clone(),
        });
    }
    if let Some(why) = &applied.refused {
        out.events.push(Event::DiscoveryRefused {
            vip: vip_name.clone(),
            query: query_text.clone(),
            why: why.clone(),
        });
    }
    // A lasting outage is said at the 1st, 2nd, 4th, 8th... failure: a few lines, however
    // long it lasts (the status and metrics have every lookup).
    if let Some((outcome, error, in_a_row)) = &applied.failed {
        if in_a_row.is_power_of_two() {
            out.events.push(Event::DiscoveryFailed {
                vip: vip_name.clone(),
                query: query_text.clone(),
                outcome: outcome.name(),
                error: error.clone(),
                kept,
                in_a_row: *in_a_row,
            });
        }
    }
    if let Some(failures) = applied.recovered_after {
        out.events.push(Event::DiscoveryRecovered {
            vip: vip_name.clone(),
            query: query_text.clone(),
            failures,
        });
    }
    // Said when the episode starts; the change says when it ends.
    if let Some(left) = applied.empty_kept_for.filter(|_| applied.empty_started) {
        out.events.push(Event::DiscoveryEmpty {
            vip: vip_name.clone(),
            query: query_text.clone(),
            kept,
            left,
        });
    }
}

/// The desired state for a config, its retiring backends, its health verdicts and the next
/// hops known.
fn desired_for(
    config: &Config,
    retiring: &BTreeMap<BackendKey, Instant>,
    trackers: &HashMap<BackendKey, Tracker>,
    next_hops: &NextHops,
    ids: &mut Ids,
    previous: &DesiredState,
) -> Result<DesiredState, IdError> {
    let retiring: Vec<BackendKey> = retiring.keys().cloned().collect();
    let health: HashMap<BackendKey, Health> = trackers
        .iter()
        .map(|(key, t)| (key.clone(), if t.up { Health::Up } else { Health::Down }))
        .collect();
    desired_state_after(config, &retiring, next_hops, &health, ids, Some(previous))
}

#[cfg(test)]
mod tests;

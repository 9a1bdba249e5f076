//! The daemon's state and what changes it: health verdicts, config reloads, next hops, the
//! end of removed backends' grace periods. Every change ends in `reconcile`, which computes
//! the desired map contents from the whole state and writes the difference.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use tracing::{error, info, warn};

use crate::{
    autoscale::{desired_backends, Sample, Samples, SAMPLE_INTERVAL, STATUS_WINDOW},
    config::{self, diff, CheckKind, Config, HealthCheck},
    dataplane::{error_chain, Dataplane},
    health::{ProbeResult, Tracker},
    reconcile::{self, BackendKey, DesiredState, Health, Ids, NextHops},
};

/// Reload counters and the last rejection, for the status API.
#[derive(Clone, Debug, Default)]
pub struct ReloadStats {
    pub accepted: u64,
    pub rejected: u64,
    pub last_error: Option<String>,
    /// Time from reading the file to the maps being written, of the last accepted reload.
    pub last_apply: Option<Duration>,
}

/// Per VIP: is it failing open (or dropping) because every backend is down.
#[derive(Clone, Debug, Default)]
pub struct AllDownStats {
    pub active: bool,
    pub fail_open: bool,
    /// Times the VIP entered the all-down state.
    pub episodes: u64,
}

/// What a reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Accepted {
        generation: u64,
        changes: Vec<String>,
    },
    Unchanged {
        generation: u64,
    },
    Rejected {
        error: String,
    },
}

pub struct Controller {
    pub config_path: PathBuf,
    pub config: Config,
    config_text: String,
    /// Increments with every accepted reload (1 for the config the daemon started with).
    pub generation: u64,
    pub dataplane: Dataplane,
    pub next_hops: NextHops,
    ids: Ids,
    /// Health verdicts of backends with checks (kind none: always up, no tracker).
    pub trackers: HashMap<BackendKey, Tracker>,
    /// Backends removed from the config, and when their grace period ends.
    pub retiring: BTreeMap<BackendKey, Instant>,
    pub reloads: ReloadStats,
    pub all_down: HashMap<String, AllDownStats>,
    /// Recent counter readings, for rates.
    pub samples: Samples,
    /// The autoscaling signal of every VIP that sets a target.
    pub autoscale: BTreeMap<String, AutoscaleState>,
    /// Flows in the connection table at the last count, and when it was taken.
    pub conn_entries: Option<(u64, Instant)>,
    /// When the connection table is next walked.
    conn_next_count: Option<Instant>,
    /// `--keep-datapath` was given (the config's `keep_datapath` can also ask for it).
    pub keep_datapath_flag: bool,
    /// Started by adopting a pinned data plane: what was adopted.
    pub adopted: Option<String>,
}

/// A VIP's autoscaling signal, as last computed.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscaleState {
    pub ready: u32,
    /// The VIP's rate of the target's metric, averaged over the target's window.
    pub rate: f64,
    pub desired: u32,
}

/// The connection table is walked to count its flows (one syscall per flow) no more often than
/// keeps the walks under 1% of one CPU: every sample (each second) while a walk is quick, less
/// often as the table fills, and at least every `CONN_COUNT_MAX_INTERVAL`.
const CONN_COUNT_COST_FACTOR: u32 = 100;
const CONN_COUNT_MAX_INTERVAL: Duration = Duration::from_secs(60);

impl Controller {
    pub fn new(
        config_path: PathBuf,
        config: Config,
        config_text: String,
        dataplane: Dataplane,
        next_hops: NextHops,
    ) -> Controller {
        let mut controller = Controller {
            config_path,
            config: Config {
                vips: Vec::new(),
                ..config.clone()
            },
            config_text,
            generation: 1,
            dataplane,
            next_hops,
            ids: Ids::default(),
            trackers: HashMap::new(),
            retiring: BTreeMap::new(),
            reloads: ReloadStats::default(),
            all_down: HashMap::new(),
            samples: Samples::default(),
            autoscale: BTreeMap::new(),
            conn_entries: None,
            conn_next_count: None,
            keep_datapath_flag: false,
            adopted: None,
        };
        controller.adopt_backends(&config);
        controller.config = config;
        controller
    }

    /// Takes over the maps an earlier daemon left pinned: VIPs and backends keep their ids
    /// (the connection table's entries hold backend ids), backends of a configured VIP that the
    /// config no longer lists start their removal grace now, health checks start from the
    /// pinned verdicts, and the next [`Controller::reconcile`] changes the maps from what they
    /// hold. Returns a one-line summary.
    pub fn adopt_pinned(&mut self, contents: &crate::dataplane::PinnedContents) -> String {
        use balancer_common::BACKEND_F_DOWN;
        let now = Instant::now();
        // Configured VIPs found in the maps, by their main key.
        let pinned_ids: HashMap<balancer_common::VipKey, u32> =
            contents.keys.iter().map(|(k, m)| (*k, m.vip_id)).collect();
        let mut vip_ids: HashMap<String, u32> = HashMap::new();
        for vip in &self.config.vips {
            if let Some(&id) = pinned_ids.get(&reconcile::vip_key(vip)) {
                if !vip_ids.values().any(|&v| v == id) {
                    vip_ids.insert(vip.name.clone(), id);
                }
            }
        }
        let name_of: HashMap<u32, String> =
            vip_ids.iter().map(|(n, id)| (*id, n.clone())).collect();
        let mut backend_ids: HashMap<BackendKey, u32> = HashMap::new();
        let mut retiring = 0;
        for (&id, b) in &contents.backends {
            let Some(name) = name_of.get(&b.vip_id) else {
                continue;
            };
            let address = reconcile::address_of(b.addr, b.family);
            let key = (name.clone(), address);
            let configured = self
                .config
                .vips
                .iter()
                .find(|v| v.name == *name)
                .and_then(|v| v.backends.iter().find(|c| c.address == address));
            match configured {
                Some(c) => {
                    // The last verdict: down if it was marked down while reachable.
                    if c.health.kind != CheckKind::None {
                        let down = b.flags & BACKEND_F_DOWN != 0 && b.ifindex != 0;
                        self.trackers.insert(
                            key.clone(),
                            Tracker::new(if down {
                                config::InitialState::Down
                            } else {
                                config::InitialState::Up
                            }),
                        );
                    }
                }
                None => {
                    self.retiring
                        .insert(key.clone(), now + self.config.removal_grace);
                    retiring += 1;
                }
            }
            backend_ids.insert(key, id);
        }
        // What the maps hold, as the previous state: every pinned VIP (those no longer
        // configured under a placeholder name, so that their tables are emptied), every live
        // backend, every egress device.
        let mut vips: BTreeMap<u32, reconcile::DesiredVip> = BTreeMap::new();
        for (key, meta) in &contents.keys {
            vips.entry(meta.vip_id)
                .or_insert_with(|| reconcile::DesiredVip {
                    name: name_of
                        .get(&meta.vip_id)
                        .cloned()
                        .unwrap_or_else(|| format!("#pinned-{}", meta.vip_id)),
                    key: *key,
                    meta: *meta,
                    table: Vec::new(),
                    backends: Vec::new(),
                    fail_open: false,
                });
        }
        let previous = DesiredState {
            vips: vips.into_values().collect(),
            keys: contents.keys.clone(),
            backends: contents.backends.clone(),
            egress: contents.egress.clone(),
        };
        let summary = format!(
            "{} of {} pinned VIPs and {} of {} backends still configured ({retiring} kept for removal_grace)",
            vip_ids.len(),
            previous.vips.len(),
            backend_ids.len() - retiring,
            contents.backends.len(),
        );
        self.ids = Ids::adopted(vip_ids, backend_ids);
        self.dataplane.set_applied(previous);
        summary
    }

    /// Whether the data plane stays at exit: `--keep-datapath`, or `keep_datapath` in the
    /// running config.
    pub fn keep_datapath(&self) -> bool {
        self.keep_datapath_flag || self.config.keep_datapath
    }

    pub fn config_text(&self) -> &str {
        &self.config_text
    }

    /// Every backend address the config and the retiring list name.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut addresses: Vec<IpAddr> = self
            .config
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.address))
            .chain(self.retiring.keys().map(|(_, a)| *a))
            .collect();
        addresses.sort();
        addresses.dedup();
        addresses
    }

    /// The health checks to run: configured backends whose check is not `none`.
    pub fn wanted_checks(&self) -> HashMap<BackendKey, (IpAddr, HealthCheck)> {
        self.config
            .vips
            .iter()
            .flat_map(|v| {
                v.backends
                    .iter()
                    .filter(|b| b.health.kind != CheckKind::None)
                    .map(|b| ((v.name.clone(), b.address), (b.address, b.health.clone())))
            })
            .collect()
    }

    /// Trackers for `new`'s backends: kept for backends already known (a reload must not
    /// reset a verdict), created in the initial state for new ones, dropped for backends
    /// that left (retiring ones keep their last verdict).
    fn adopt_backends(&mut self, new: &Config) {
        let mut trackers = HashMap::new();
        for vip in &new.vips {
            for b in &vip.backends {
                if b.health.kind == CheckKind::None {
                    continue;
                }
                let key = (vip.name.clone(), b.address);
                let tracker = self
                    .trackers
                    .remove(&key)
                    .unwrap_or_else(|| Tracker::new(b.health.initial));
                trackers.insert(key, tracker);
            }
        }
        for key in self.retiring.keys() {
            if let Some(tracker) = self.trackers.remove(key) {
                trackers.insert(key.clone(), tracker);
            }
        }
        self.trackers = trackers;
    }

    fn health(&self) -> HashMap<BackendKey, Health> {
        self.trackers
            .iter()
            .map(|(key, t)| (key.clone(), if t.up { Health::Up } else { Health::Down }))
            .collect()
    }

    /// Computes the desired state from everything known and writes it to the maps.
    pub fn reconcile(&mut self) -> anyhow::Result<()> {
        let retiring: Vec<BackendKey> = self.retiring.keys().cloned().collect();
        let desired = reconcile::desired_state(
            &self.config,
            &retiring,
            &self.next_hops,
            &self.health(),
            &mut self.ids,
        )?;
        self.dataplane
            .apply(&desired)
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
        self.note_all_down(&desired);
        Ok(())
    }

    /// Logs (once per episode) and counts VIPs whose backends are all down.
    fn note_all_down(&mut self, desired: &DesiredState) {
        for (vip, config) in desired.vips.iter().zip(&self.config.vips) {
            let active = vip
                .backends
                .iter()
                .any(|b| b.state == reconcile::BackendState::Active);
            let down = vip
                .backends
                .iter()
                .filter(|b| b.state == reconcile::BackendState::Down)
                .count();
            let all_down = !active && down > 0;
            let stats = self.all_down.entry(vip.name.clone()).or_default();
            if all_down && !stats.active {
                stats.episodes += 1;
                if vip.fail_open {
                    error!(
                        "VIP {}: all {down} backends that take new flows are down; failing open: new flows are \
                         spread over them anyway (when_all_down = \"fail_open\")",
                        vip.name
                    );
                } else {
                    error!(
                        "VIP {}: all backends are down; its packets are dropped (when_all_down = \"drop\", \
                         counted as no_backend)",
                        vip.name
                    );
                }
            } else if !all_down && stats.active {
                info!(
                    "VIP {}: a backend is up again; new flows go to healthy backends only",
                    config.name
                );
            }
            stats.active = all_down;
            stats.fail_open = vip.fail_open;
        }
        self.all_down
            .retain(|name, _| desired.vips.iter().any(|v| &v.name == name));
    }

    /// Reads the counters for rates and the autoscaling signal (every `SAMPLE_INTERVAL`).
    pub fn sample(&mut self, now: Instant) {
        let counters = match self.dataplane.counters() {
            Ok(c) => c,
            Err(e) => return error!("reading counters: {}", error_chain(&e)),
        };
        let applied = self.dataplane.applied();
        let vips = applied
            .vips
            .iter()
            .map(|v| {
                (
                    v.name.clone(),
                    counters
                        .vips
                        .get(&v.meta.vip_id)
                        .copied()
                        .unwrap_or_default(),
                )
            })
            .collect();
        let backends = applied
            .vips
            .iter()
            .flat_map(|v| {
                v.backends
                    .iter()
                    .map(move |b| ((v.name.clone(), b.address), b.id))
            })
            .map(|(key, id)| (key, counters.backends.get(&id).copied().unwrap_or_default()))
            .collect();
        let keep = self
            .config
            .vips
            .iter()
            .filter_map(|v| v.autoscale.map(|a| a.window))
            .max()
            .unwrap_or_default()
            .max(STATUS_WINDOW)
            + SAMPLE_INTERVAL * 2;
        self.samples.push(
            Sample {
                at: now,
                vips,
                backends,
            },
            keep,
        );

        let mut autoscale = BTreeMap::new();
        for (vip, desired) in self.config.vips.iter().zip(&applied.vips) {
            let Some(target) = vip.autoscale else {
                continue;
            };
            let ready = desired
                .backends
                .iter()
                .filter(|b| b.state == reconcile::BackendState::Active)
                .count() as u32;
            let rate = self
                .samples
                .vip(&vip.name, target.window)
                .map_or(0.0, |r| r.of(target.metric));
            let wanted = desired_backends(ready, rate, target.target_per_backend, target.tolerance);
            if self
                .autoscale
                .get(&vip.name)
                .map(|a: &AutoscaleState| a.desired)
                != Some(wanted)
            {
                info!(
                    "VIP {}: desired backends {wanted} ({ready} ready, {rate:.1} {} against {} per backend)",
                    vip.name,
                    target.metric.name(),
                    target.target_per_backend
                );
            }
            autoscale.insert(
                vip.name.clone(),
                AutoscaleState {
                    ready,
                    rate,
                    desired: wanted,
                },
            );
        }
        self.autoscale = autoscale;

        if self.conn_next_count.is_none_or(|at| now >= at) {
            let started = Instant::now();
            match self.dataplane.conn_count() {
                Ok(n) => self.conn_entries = Some((n as u64, now)),
                Err(e) => error!("counting the connection table: {}", error_chain(&e)),
            }
            let pause = (started.elapsed() * CONN_COUNT_COST_FACTOR).min(CONN_COUNT_MAX_INTERVAL);
            self.conn_next_count = Some(now + pause);
        }
    }

    /// Records a probe result; on a change of verdict, logs it once and updates the maps.
    pub fn probe_result(&mut self, key: &BackendKey, result: ProbeResult, seconds: f64) {
        let Some(check) = self
            .config
            .vips
            .iter()
            .find(|v| v.name == key.0)
            .and_then(|v| v.backends.iter().find(|b| b.address == key.1))
            .map(|b| b.health.clone())
        else {
            return;
        };
        let Some(tracker) = self.trackers.get_mut(key) else {
            return;
        };
        tracker.durations.observe(seconds);
        let Some(transition) = tracker.record(&result, check.rise, check.fall) else {
            return;
        };
        if transition.up {
            info!(
                "backend {} of VIP {} is UP: {} successful {} probes in a row",
                key.1,
                key.0,
                transition.streak,
                check.kind.name()
            );
        } else {
            let reason = transition.reason.map(|r| r.to_string()).unwrap_or_default();
            warn!(
                "backend {} of VIP {} is DOWN: {} failed {} probes in a row (last: {reason}); its flows move to \
                 other backends",
                key.1,
                key.0,
                transition.streak,
                check.kind.name()
            );
        }
        if let Err(e) = self.reconcile() {
            error!("updating the maps after a health change: {e:#}");
        }
    }

    /// Validates `text` and, if it is a valid config that the running data plane can take,
    /// makes it the running config. `next_hops` must hold the new config's backends that
    /// could be resolved.
    pub fn reload(&mut self, text: String, next_hops: NextHops, started: Instant) -> ReloadOutcome {
        let new = match config::parse(&self.config_path, &text) {
            Ok(new) => new,
            Err(e) => return self.reject(e.to_string()),
        };
        let restart = diff::needs_restart(&self.config, &new);
        if !restart.is_empty() {
            return self.reject(format!(
                "{}: changing {} needs a restart of the daemon; the running config stays in force",
                self.config_path.display(),
                restart.join(", ")
            ));
        }
        let changes: Vec<String> = diff::diff(&self.config, &new)
            .iter()
            .map(ToString::to_string)
            .collect();

        // Removed backends start their grace period; re-added ones end it.
        let now = Instant::now();
        for vip in &self.config.vips {
            for b in &vip.backends {
                let still = new.vips.iter().any(|n| {
                    n.name == vip.name && n.backends.iter().any(|nb| nb.address == b.address)
                });
                let vip_stays = new.vips.iter().any(|n| n.name == vip.name);
                if !still && vip_stays && !new.removal_grace.is_zero() {
                    self.retiring
                        .insert((vip.name.clone(), b.address), now + new.removal_grace);
                }
            }
        }
        self.retiring.retain(|(vip, address), _| {
            new.vips.iter().any(|n| &n.name == vip)
                && !new
                    .vips
                    .iter()
                    .any(|n| &n.name == vip && n.backends.iter().any(|b| &b.address == address))
        });
        self.adopt_backends(&new);
        self.config = new;
        self.config_text = text;
        self.next_hops = next_hops;
        if let Err(e) = self.reconcile() {
            // The config is valid; the kernel refused a map update. Say so; the next change
            // or refresh writes everything that differs again.
            return self.reject(format!("writing the maps: {e:#}"));
        }
        self.generation += 1;
        self.reloads.accepted += 1;
        self.reloads.last_apply = Some(started.elapsed());
        let summary = if changes.is_empty() {
            "no changes".to_owned()
        } else {
            changes.join("; ")
        };
        info!(
            "config generation {} applied in {:.1} ms: {summary}",
            self.generation,
            started.elapsed().as_secs_f64() * 1e3
        );
        if changes.is_empty() {
            ReloadOutcome::Unchanged {
                generation: self.generation,
            }
        } else {
            ReloadOutcome::Accepted {
                generation: self.generation,
                changes,
            }
        }
    }

    fn reject(&mut self, error: String) -> ReloadOutcome {
        self.reloads.rejected += 1;
        self.reloads.last_error = Some(error.clone());
        error!("config reload rejected: {error}");
        ReloadOutcome::Rejected { error }
    }

    /// A config file that cannot be read at all.
    pub fn reject_unreadable(&mut self, error: String) -> ReloadOutcome {
        self.reject(error)
    }

    /// Ends the grace period of removed backends whose time is up.
    pub fn expire_retiring(&mut self, now: Instant) {
        let expired: Vec<BackendKey> = self
            .retiring
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        if expired.is_empty() {
            return;
        }
        for key in &expired {
            self.retiring.remove(key);
            self.trackers.remove(key);
            info!(
                "backend {} of VIP {}: removal grace period over; its remaining flows move",
                key.1, key.0
            );
        }
        if let Err(e) = self.reconcile() {
            error!("updating the maps after removing backends: {e:#}");
        }
    }

    /// Takes freshly resolved next hops; updates the maps if any changed.
    pub fn refresh_next_hops(&mut self, hops: NextHops) {
        if hops == self.next_hops {
            return;
        }
        for (address, hop) in &hops {
            if self.next_hops.get(address) != Some(hop) {
                info!(
                    "next hop of {address} is now {} via {}",
                    crate::status::format_mac(&hop.dst_mac),
                    hop.interface
                );
            }
        }
        for address in self.next_hops.keys() {
            if !hops.contains_key(address) {
                warn!("backend {address} no longer resolves; it gets no traffic until it does");
            }
        }
        self.next_hops = hops;
        if let Err(e) = self.reconcile() {
            error!("updating next hops: {e:#}");
        }
    }
}

//! What the core has to say: every log line a decision produces, as a value. The daemon
//! writes them with their level; tests read them as data.

use std::{fmt, net::IpAddr};

use crate::{
    config::AutoscaleMetric,
    core::{
        health::ProbeFailure,
        log_limit::{thousands, Kind, LeftOut},
    },
    plan::inputs::BackendKey,
};

/// VIPs named in a conditions summary.
const CONDITIONS_NAMED: usize = 10;

/// How loud an event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Info,
    Warn,
    Error,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A backend passed `streak` probes in a row and takes flows again.
    BackendUp {
        key: BackendKey,
        streak: u32,
        check: &'static str,
    },
    /// A backend failed `streak` probes in a row; its flows move.
    BackendDown {
        key: BackendKey,
        streak: u32,
        check: &'static str,
        reason: Option<ProbeFailure>,
    },
    /// Every backend of the VIP that takes new flows is down.
    AllDown {
        vip: String,
        down: usize,
        fail_open: bool,
    },
    /// A backend of a VIP that was all down is up again.
    Recovered { vip: String },
    /// The autoscaling signal changed.
    DesiredBackends {
        vip: String,
        desired: u32,
        ready: u32,
        rate: f64,
        metric: AutoscaleMetric,
        target: f64,
    },
    /// A reload was refused; the running config stays in force.
    ReloadRejected { error: String },
    /// A removed backend's grace period ended.
    RemovalGraceOver { key: BackendKey },
    /// A backend's next hop changed (a new MAC address or interface).
    NextHopChanged {
        address: IpAddr,
        mac: String,
        interface: String,
    },
    /// A backend's next hop can no longer be resolved (`retiring`: only retiring backends
    /// have this address, which is what a removed replica that was then stopped looks like).
    NoLongerResolves { address: IpAddr, retiring: bool },
    /// Every backend of the VIP that takes new flows starts down (`initial = "down"`) and
    /// waits for its first checks.
    AwaitingChecks {
        vip: String,
        backends: usize,
        fail_open: bool,
    },
    /// A discovery answer changed the VIP's discovered set.
    DiscoveryChanged {
        vip: String,
        query: String,
        added: Vec<IpAddr>,
        removed: Vec<IpAddr>,
        total: usize,
    },
    /// A discovery lookup failed; the last set stays. Said at the 1st, 2nd, 4th, 8th...
    /// failure in a row (`in_a_row`).
    DiscoveryFailed {
        vip: String,
        query: String,
        outcome: &'static str,
        error: String,
        kept: usize,
        in_a_row: u32,
    },
    /// Lookups answer again after failing.
    DiscoveryRecovered {
        vip: String,
        query: String,
        failures: u32,
    },
    /// An answer was refused whole (more backends than max_backends); the last set stays.
    DiscoveryRefused {
        vip: String,
        query: String,
        why: String,
    },
    /// An empty answer or NXDOMAIN; the set stays for the rest of the empty grace.
    DiscoveryEmpty {
        vip: String,
        query: String,
        kept: usize,
        left: std::time::Duration,
    },
    /// A record that cannot be a backend was left out of an answer.
    DiscoveryRecordRejected {
        vip: String,
        address: IpAddr,
        why: String,
    },
    /// A direct-server-return backend sits behind a router: it gets no traffic.
    RoutedDsrBackend {
        vip: String,
        address: IpAddr,
        gateway: IpAddr,
    },
    /// A backend's next hop cannot be resolved (yet): it gets no traffic until it is.
    Unreachable { address: IpAddr, error: String },
    /// A probe could not run for a reason of this host (no descriptor left, no memory): it
    /// says nothing of the backend and does not count towards its verdict.
    ProbeNotRun { key: BackendKey, error: String },
    /// The kernel refused part of a map plan; the maps are written again at the next tick.
    PlanFailed { error: String },
    /// The maps could not be planned (ids exhausted).
    Unplannable { error: String },
    /// The counters could not be read.
    CountersUnreadable { error: String },
    /// A config was applied.
    ReloadApplied {
        generation: u64,
        millis: f64,
        /// What asked for it: "SIGHUP", "config file change", "control socket".
        trigger: &'static str,
        changes: Vec<String>,
    },
    /// The announced VIP addresses changed: `added` are announced now, `withdrawn` are not
    /// (with why).
    Announced {
        added: Vec<IpAddr>,
        withdrawn: Vec<(IpAddr, String)>,
        table: u32,
    },
    /// The routes that announce VIPs could not be written (tried again every second).
    RoutesFailed { error: String },
    /// The connection-table copy from the peers is complete, or was given up on.
    SyncReady { detail: String },
    /// New flows went over the per-CPU cap: flood mode, flows placed without state.
    FloodStarted { capped: u64, cap: u32 },
    /// No new flow went over the cap since the last reading: flood mode over.
    FloodEnded {
        lasted: std::time::Duration,
        capped: u64,
    },
    /// What the log limiter left out.
    LeftOut(LeftOut),
    /// Backends still down or unreachable, per VIP (a periodic reminder while it lasts).
    Conditions(Vec<VipCondition>),
}

/// How many of a VIP's backends are down or unreachable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipCondition {
    pub vip: String,
    pub backends: usize,
    pub down: usize,
    pub unreachable: usize,
}

/// Changes named in the log line of an applied reload (all of them go to the reply).
const CHANGES_NAMED: usize = 10;

impl Event {
    pub fn level(&self) -> Level {
        match self {
            Event::BackendUp { .. }
            | Event::Recovered { .. }
            | Event::DesiredBackends { .. }
            | Event::RemovalGraceOver { .. }
            | Event::NextHopChanged { .. }
            | Event::NoLongerResolves { retiring: true, .. }
            | Event::AwaitingChecks { .. }
            | Event::Announced { .. }
            | Event::SyncReady { .. }
            | Event::FloodEnded { .. }
            | Event::DiscoveryChanged { .. }
            | Event::DiscoveryRecovered { .. }
            | Event::ReloadApplied { .. } => Level::Info,
            Event::FloodStarted { .. } => Level::Warn,
            Event::BackendDown { .. }
            | Event::NoLongerResolves { .. }
            | Event::DiscoveryFailed { .. }
            | Event::DiscoveryEmpty { .. }
            | Event::DiscoveryRecordRejected { .. }
            | Event::Unreachable { .. }
            | Event::ProbeNotRun { .. }
            | Event::LeftOut(_)
            | Event::Conditions(_) => Level::Warn,
            Event::AllDown { .. }
            | Event::ReloadRejected { .. }
            | Event::RoutedDsrBackend { .. }
            | Event::DiscoveryRefused { .. }
            | Event::PlanFailed { .. }
            | Event::RoutesFailed { .. }
            | Event::Unplannable { .. }
            | Event::CountersUnreadable { .. } => Level::Error,
        }
    }

    /// The log budget the line comes out of; `None`: the limiter's own summaries, which
    /// have their own period.
    pub fn kind(&self) -> Option<Kind> {
        Some(match self {
            Event::BackendUp { .. } | Event::BackendDown { .. } | Event::ProbeNotRun { .. } => {
                Kind::Health
            }
            Event::NextHopChanged { .. }
            | Event::NoLongerResolves { .. }
            | Event::Unreachable { .. }
            | Event::RoutedDsrBackend { .. } => Kind::NextHops,
            Event::AllDown { .. }
            | Event::AwaitingChecks { .. }
            | Event::Recovered { .. }
            | Event::DesiredBackends { .. }
            | Event::Announced { .. }
            | Event::SyncReady { .. }
            | Event::FloodStarted { .. }
            | Event::FloodEnded { .. }
            | Event::RemovalGraceOver { .. } => Kind::Vips,
            Event::DiscoveryChanged { .. } => Kind::Discovery,
            Event::DiscoveryFailed { .. }
            | Event::DiscoveryRecovered { .. }
            | Event::DiscoveryRefused { .. }
            | Event::DiscoveryEmpty { .. }
            | Event::DiscoveryRecordRejected { .. } => Kind::Lookups,
            Event::ReloadRejected { .. } | Event::ReloadApplied { .. } => Kind::Reloads,
            Event::PlanFailed { .. }
            | Event::RoutesFailed { .. }
            | Event::Unplannable { .. }
            | Event::CountersUnreadable { .. } => Kind::Kernel,
            Event::LeftOut(_) | Event::Conditions(_) => return None,
        })
    }

    /// What a left-out line is counted under in the summary.
    pub fn subject(&self) -> String {
        match self {
            Event::BackendUp { key, .. } => format!("VIP {}: UP", key.0),
            Event::BackendDown { key, .. } => format!("VIP {}: DOWN", key.0),
            Event::ProbeNotRun { error, .. } => format!("probes not run ({error})"),
            Event::AllDown { vip, .. } => format!("VIP {vip}: all down"),
            Event::AwaitingChecks { vip, .. } => format!("VIP {vip}: awaiting checks"),
            Event::DiscoveryChanged { vip, .. } => format!("VIP {vip}: discovered set changed"),
            Event::DiscoveryFailed { vip, outcome, .. } => {
                format!("VIP {vip}: lookups failed ({outcome})")
            }
            Event::DiscoveryRecovered { vip, .. } => format!("VIP {vip}: lookups answer again"),
            Event::DiscoveryRefused { vip, .. } => format!("VIP {vip}: answers refused"),
            Event::DiscoveryEmpty { vip, .. } => format!("VIP {vip}: empty answers"),
            Event::DiscoveryRecordRejected { vip, .. } => format!("VIP {vip}: records rejected"),
            Event::Recovered { vip } => format!("VIP {vip}: recovered"),
            Event::DesiredBackends { vip, .. } => format!("VIP {vip}: desired backends"),
            Event::RemovalGraceOver { key } => format!("VIP {}: removal grace over", key.0),
            Event::RoutedDsrBackend { vip, .. } => format!("VIP {vip}: behind a router"),
            Event::NextHopChanged { .. } => "changed".into(),
            Event::NoLongerResolves { .. } => "no longer resolve".into(),
            Event::Unreachable { .. } => "unreachable".into(),
            Event::ReloadRejected { .. } => "rejected".into(),
            Event::ReloadApplied { .. } => "applied".into(),
            Event::PlanFailed { .. } => "map writes failed".into(),
            Event::Announced { .. } => "announcements changed".into(),
            Event::RoutesFailed { .. } => "route writes failed".into(),
            Event::SyncReady { .. } => "sync ready".into(),
            Event::FloodStarted { .. } | Event::FloodEnded { .. } => "flood mode".into(),
            Event::Unplannable { .. } => "maps unplannable".into(),
            Event::CountersUnreadable { .. } => "counters unreadable".into(),
            Event::LeftOut(_) | Event::Conditions(_) => String::new(),
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::BackendUp { key, streak, check } => write!(
                f,
                "backend {} of VIP {} is UP: {streak} successful {check} probes in a row",
                key.1, key.0
            ),
            Event::BackendDown {
                key,
                streak,
                check,
                reason,
            } => {
                let reason = reason.as_ref().map(ToString::to_string).unwrap_or_default();
                write!(
                    f,
                    "backend {} of VIP {} is DOWN: {streak} failed {check} probes in a row (last: {reason}); \
                     its flows move to other backends",
                    key.1, key.0
                )
            }
            Event::AllDown {
                vip,
                down,
                fail_open: true,
            } => write!(
                f,
                "VIP {vip}: all {down} backends that take new flows are down; failing open: new flows are \
                 spread over them anyway (when_all_down = \"fail_open\")"
            ),
            Event::AllDown { vip, .. } => write!(
                f,
                "VIP {vip}: all backends are down; its packets are dropped (when_all_down = \"drop\", \
                 counted as no_backend)"
            ),
            Event::Recovered { vip } => write!(
                f,
                "VIP {vip}: a backend is up again; new flows go to healthy backends only"
            ),
            Event::DesiredBackends {
                vip,
                desired,
                ready,
                rate,
                metric,
                target,
            } => write!(
                f,
                "VIP {vip}: desired backends {desired} ({ready} ready, {rate:.1} {} against {target} per backend)",
                metric.name()
            ),
            Event::ReloadRejected { error } => write!(f, "config reload rejected: {error}"),
            Event::RemovalGraceOver { key } => write!(
                f,
                "backend {} of VIP {}: removal grace period over; its remaining flows move",
                key.1, key.0
            ),
            Event::NextHopChanged {
                address,
                mac,
                interface,
            } => write!(f, "next hop of {address} is now {mac} via {interface}"),
            Event::RoutedDsrBackend {
                vip,
                address,
                gateway,
            } => write!(
                f,
                "backend {address} of VIP {vip} is reached through gateway {gateway}: direct server return needs it on \
                 a directly connected network; it gets no traffic (use forwarding = \"tunnel\" for routed backends)"
            ),
            Event::Announced { .. } | Event::RoutesFailed { .. } | Event::SyncReady { .. } => {
                self.fmt_fleet(f)
            }
            Event::FloodStarted { .. } | Event::FloodEnded { .. } => self.fmt_flood(f),
            _ => self.fmt_more(f),
        }
    }
}

impl Event {
    /// The lines of announcements and sync.
    fn fmt_fleet(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Announced {
                added,
                withdrawn,
                table,
            } => {
                let mut parts = Vec::new();
                if !added.is_empty() {
                    let list: Vec<String> = added.iter().map(ToString::to_string).collect();
                    parts.push(format!("announcing {}", list.join(", ")));
                }
                for (address, why) in withdrawn {
                    parts.push(format!("withdrawing {address} ({why})"));
                }
                write!(f, "{} (routes in table {table})", parts.join("; "))
            }
            Event::RoutesFailed { error } => write!(
                f,
                "writing the routes that announce VIPs: {error}; tried again within a second"
            ),
            Event::SyncReady { detail } => write!(f, "connection-table sync: {detail}"),
            _ => Ok(()),
        }
    }

    /// The lines of map plans, reachability, probes that did not run, reloads applied and
    /// the log limiter's summaries.
    /// The lines of flood mode.
    fn fmt_flood(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::FloodStarted { capped, cap } => write!(
                f,
                "flood mode: new flows over the cap of {cap} per CPU per second ({capped} so far \
                 placed by the Maglev table alone, without state; new NAT connections refused)"
            ),
            Event::FloodEnded { lasted, capped } => write!(
                f,
                "flood mode over after {:.1}s: {capped} new flows were placed without state",
                lasted.as_secs_f64()
            ),
            _ => Ok(()),
        }
    }

    fn fmt_more(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::PlanFailed { error } => write!(
                f,
                "writing the maps: {error}; they are written again, whole, within a second"
            ),
            Event::Unplannable { error } => write!(f, "planning the maps: {error}"),
            Event::Unreachable { address, error } => write!(
                f,
                "backend {address} is unreachable and gets no traffic until it resolves: {error}"
            ),
            Event::ProbeNotRun { key, error } => write!(
                f,
                "a health probe of backend {} of VIP {} could not run on this host ({error}); it \
                 does not count against the backend",
                key.1, key.0
            ),
            Event::CountersUnreadable { error } => write!(f, "reading counters: {error}"),
            Event::ReloadApplied {
                generation,
                millis,
                trigger,
                changes,
            } => {
                write!(
                    f,
                    "config generation {generation} applied in {millis:.1} ms ({trigger}): "
                )?;
                let named: Vec<&str> = changes
                    .iter()
                    .take(CHANGES_NAMED)
                    .map(String::as_str)
                    .collect();
                f.write_str(&named.join("; "))?;
                if changes.len() > CHANGES_NAMED {
                    let more = (changes.len() - CHANGES_NAMED) as u64;
                    write!(f, "; and {} more changes", thousands(more))?;
                }
                Ok(())
            }
            Event::NoLongerResolves {
                address,
                retiring: false,
            } => write!(
                f,
                "backend {address} no longer resolves; it gets no traffic until it does"
            ),
            Event::NoLongerResolves {
                address,
                retiring: true,
            } => write!(
                f,
                "removed backend {address} no longer answers on the network (stopped); its \
                 remaining flows move to other backends"
            ),
            Event::LeftOut(left_out) => fmt::Display::fmt(left_out, f),
            Event::Conditions(vips) => {
                f.write_str("still: ")?;
                let named: Vec<String> = vips
                    .iter()
                    .take(CONDITIONS_NAMED)
                    .map(|c| {
                        format!(
                            "VIP {}: {} of {} backends down, {} unreachable",
                            c.vip,
                            thousands(c.down as u64),
                            thousands(c.backends as u64),
                            thousands(c.unreachable as u64)
                        )
                    })
                    .collect();
                f.write_str(&named.join("; "))?;
                if vips.len() > CONDITIONS_NAMED {
                    write!(f, "; and {} more VIPs", vips.len() - CONDITIONS_NAMED)?;
                }
                Ok(())
            }
            _ => self.fmt_discovery(f),
        }
    }

    /// The lines of discovery, of retiring backends that went away, and of VIPs waiting for
    /// their first checks.
    fn fmt_discovery(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::AwaitingChecks {
                vip,
                backends,
                fail_open,
            } => write!(
                f,
                "VIP {vip}: waiting for the first health checks of its {backends} backends \
                 (initial = \"down\"); {}",
                if *fail_open {
                    "new flows are spread over them meanwhile (when_all_down = \"fail_open\")"
                } else {
                    "its packets are dropped meanwhile (when_all_down = \"drop\")"
                }
            ),
            Event::DiscoveryChanged {
                vip,
                query,
                added,
                removed,
                total,
            } => write!(
                f,
                "VIP {vip}: {query} now gives {total} backends{}{}",
                named(
                    "; added ",
                    added,
                    " (they enter through their health checks)"
                ),
                named(
                    "; removed ",
                    removed,
                    " (they keep their flows for removal_grace)"
                )
            ),
            Event::DiscoveryFailed {
                vip,
                query,
                outcome,
                error,
                kept,
                in_a_row,
            } => write!(
                f,
                "VIP {vip}: resolving {query} failed ({outcome}: {error}; {in_a_row} in a row, \
                 said again at {}); its {kept} discovered backends stay",
                in_a_row.saturating_mul(2)
            ),
            Event::DiscoveryRecovered {
                vip,
                query,
                failures,
            } => write!(
                f,
                "VIP {vip}: {query} answers again after {failures} failed lookups"
            ),
            Event::DiscoveryRefused { vip, query, why } => {
                write!(f, "VIP {vip}: answer of {query} refused: {why}")
            }
            Event::DiscoveryEmpty {
                vip,
                query,
                kept,
                left,
            } => write!(
                f,
                "VIP {vip}: {query} gives no records; its {kept} discovered backends stay for \
                 {}s more of empty_grace",
                left.as_secs()
            ),
            Event::DiscoveryRecordRejected { vip, address, why } => {
                write!(f, "VIP {vip}: discovered record {address} left out: {why}")
            }
            _ => Ok(()),
        }
    }
}

/// `before` the first `CHANGES_NAMED` addresses of `list` (and how many more) `after`;
/// nothing for an empty list.
fn named(before: &str, list: &[IpAddr], after: &str) -> String {
    if list.is_empty() {
        return String::new();
    }
    let mut s: Vec<String> = list
        .iter()
        .take(CHANGES_NAMED)
        .map(ToString::to_string)
        .collect();
    if list.len() > CHANGES_NAMED {
        s.push(format!("and {} more", list.len() - CHANGES_NAMED));
    }
    format!("{before}{}{after}", s.join(", "))
}

//! What the core has to say: every log line a decision produces, as a value. The daemon
//! writes them with their level; tests read them as data.

use std::{fmt, net::IpAddr};

use crate::{config::AutoscaleMetric, core::health::ProbeFailure, plan::inputs::BackendKey};

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
    /// A backend's next hop can no longer be resolved.
    NoLongerResolves { address: IpAddr },
    /// A direct-server-return backend sits behind a router: it gets no traffic.
    RoutedDsrBackend {
        vip: String,
        address: IpAddr,
        gateway: IpAddr,
    },
    /// The kernel refused part of a map plan; the maps are written again at the next tick.
    PlanFailed { error: String },
    /// The maps could not be planned (ids exhausted).
    Unplannable { error: String },
}

impl Event {
    pub fn level(&self) -> Level {
        match self {
            Event::BackendUp { .. }
            | Event::Recovered { .. }
            | Event::DesiredBackends { .. }
            | Event::RemovalGraceOver { .. }
            | Event::NextHopChanged { .. } => Level::Info,
            Event::BackendDown { .. } | Event::NoLongerResolves { .. } => Level::Warn,
            Event::AllDown { .. }
            | Event::ReloadRejected { .. }
            | Event::RoutedDsrBackend { .. }
            | Event::PlanFailed { .. }
            | Event::Unplannable { .. } => Level::Error,
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
            Event::NoLongerResolves { address } => write!(
                f,
                "backend {address} no longer resolves; it gets no traffic until it does"
            ),
            Event::RoutedDsrBackend {
                vip,
                address,
                gateway,
            } => write!(
                f,
                "backend {address} of VIP {vip} is reached through gateway {gateway}: direct server return needs it on \
                 a directly connected network; it gets no traffic (use forwarding = \"tunnel\" for routed backends)"
            ),
            Event::PlanFailed { error } => write!(
                f,
                "writing the maps: {error}; they are written again, whole, within a second"
            ),
            Event::Unplannable { error } => write!(f, "planning the maps: {error}"),
        }
    }
}

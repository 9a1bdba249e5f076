//! What a new config changes besides the maps: which removed backends keep their flows for a
//! while, which health verdicts carry over, which checks run, and what to warn about.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::Instant,
};

use crate::{
    config::{CheckKind, Config, Forwarding, HealthCheck},
    core::{events::Event, health::Tracker},
    plan::inputs::{BackendKey, NextHops},
};

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

/// The health checks to run: every configured backend whose check is not `none`, and every
/// retiring one that had a check.
pub type CheckSet = BTreeMap<BackendKey, (IpAddr, HealthCheck)>;

pub fn check_set(config: &Config, retiring: &BTreeMap<BackendKey, HealthCheck>) -> CheckSet {
    let mut set: CheckSet = retiring
        .iter()
        .map(|(key, check)| (key.clone(), (key.1, check.clone())))
        .collect();
    set.extend(config.vips.iter().flat_map(|v| {
        v.backends
            .iter()
            .filter(|b| b.health.kind != CheckKind::None)
            .map(|b| ((v.name.clone(), b.address), (b.address, b.health.clone())))
    }));
    set
}

/// The retiring backends under `new`: backends `old` had and `new` dropped (from a VIP that
/// stays) start their grace period, unless it is zero; backends `new` lists again end theirs,
/// and so do those of VIPs `new` dropped.
pub fn retiring_after(
    old: &Config,
    new: &Config,
    retiring: &BTreeMap<BackendKey, Instant>,
    now: Instant,
) -> BTreeMap<BackendKey, Instant> {
    let listed = |vip: &str, address: &IpAddr| {
        new.vips
            .iter()
            .any(|n| n.name == vip && n.backends.iter().any(|b| &b.address == address))
    };
    let stays = |vip: &str| new.vips.iter().any(|n| n.name == vip);
    let mut next = retiring.clone();
    if !new.removal_grace.is_zero() {
        for vip in old.vips.iter().filter(|v| stays(&v.name)) {
            for b in vip
                .backends
                .iter()
                .filter(|b| !listed(&vip.name, &b.address))
            {
                next.insert((vip.name.clone(), b.address), now + new.removal_grace);
            }
        }
    }
    next.retain(|(vip, address), _| stays(vip) && !listed(vip, address));
    next
}

/// Verdicts under `new`: kept for backends already known (a reload must not reset a
/// verdict), new ones in their initial state, dropped for backends that left (retiring ones
/// keep their last verdict).
pub fn carry_trackers(
    mut trackers: HashMap<BackendKey, Tracker>,
    new: &Config,
    retiring: &BTreeMap<BackendKey, Instant>,
) -> HashMap<BackendKey, Tracker> {
    let mut carried = HashMap::new();
    for vip in &new.vips {
        for b in &vip.backends {
            if b.health.kind == CheckKind::None {
                continue;
            }
            let key = (vip.name.clone(), b.address);
            let tracker = trackers
                .remove(&key)
                .unwrap_or_else(|| Tracker::new(b.health.initial));
            carried.insert(key, tracker);
        }
    }
    for key in retiring.keys() {
        if let Some(tracker) = trackers.remove(key) {
            carried.insert(key.clone(), tracker);
        }
    }
    carried
}

/// Direct server return needs backends on the balancer's L2 segment: the ones that are not.
pub fn routed_dsr_backends(config: &Config, hops: &NextHops) -> Vec<Event> {
    let mut events = Vec::new();
    for vip in config
        .vips
        .iter()
        .filter(|v| v.forwarding == Forwarding::Dsr)
    {
        for b in &vip.backends {
            if let Some(gateway) = hops.get(&b.address).and_then(|h| h.gateway) {
                events.push(Event::RoutedDsrBackend {
                    vip: vip.name.clone(),
                    address: b.address,
                    gateway,
                });
            }
        }
    }
    events
}

/// Every backend address the config names.
pub fn addresses(config: &Config) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = config
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.address))
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

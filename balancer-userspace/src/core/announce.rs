//! Which VIP addresses this balancer announces: those it can serve. A VIP can be served while
//! the program is attached (always, while the daemon runs), at least one backend takes new
//! flows or the VIP fails open, the operator has not withdrawn it (`balancer withdraw`), and
//! the balancer is not waiting for its peers' connection tables (a fresh start with `[sync]`).
//! An address is announced while any VIP on it can be served (a route is per address).
//!
//! The daemon turns the set into kernel routes that a BGP speaker exports (`shell::routes`).
//! A daemon that stops without removing the data plane leaves them: what still forwards stays
//! announced.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{config::Config, plan::desired::DesiredState};

/// Why a VIP is not announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Unannounced {
    /// No backend takes new flows, and the VIP does not fail open.
    NoBackend,
    /// `balancer withdraw`.
    Operator,
    /// The connection-table copy from the peers is not complete yet.
    AwaitingSync,
}

impl Unannounced {
    pub fn as_str(self) -> &'static str {
        match self {
            Unannounced::NoBackend => "no backend takes new flows",
            Unannounced::Operator => "withdrawn by the operator",
            Unannounced::AwaitingSync => "waiting for the peers' connection tables",
        }
    }
}

/// The operator's and the sync's say, and what was last decided.
#[derive(Debug, Default)]
pub struct Announcement {
    /// `balancer withdraw` without a VIP: every VIP, also those added later.
    pub withdrawn_all: bool,
    /// `balancer withdraw --vip NAME`.
    pub withdrawn: BTreeSet<String>,
    /// A fresh start with `[sync]` peers: nothing is announced until the bulk copy is in.
    pub awaiting_sync: bool,
    /// The addresses last decided (what the routes are to be).
    pub routes: BTreeSet<IpAddr>,
}

impl Announcement {
    /// At start: withdrawn if `--withdrawn`. A fresh data plane has an empty connection
    /// table: it announces once the peers' tables are copied. An adopted one kept its table,
    /// and its VIPs stayed announced.
    pub fn starting(config: &Config, withdrawn: bool, adopted: bool) -> Announcement {
        let awaiting_sync = !adopted
            && config
                .sync
                .as_ref()
                .is_some_and(|s| !s.peers.is_empty() && !s.bulk_timeout.is_zero());
        Announcement {
            withdrawn_all: withdrawn,
            awaiting_sync,
            ..Announcement::default()
        }
    }

    /// Why each VIP of `config` is not announced (absent: it is).
    pub fn reasons(
        &self,
        config: &Config,
        desired: &DesiredState,
    ) -> BTreeMap<String, Unannounced> {
        config
            .vips
            .iter()
            .filter_map(|vip| {
                let servable = desired
                    .vips
                    .iter()
                    .find(|d| d.name == vip.name)
                    .is_some_and(|d| d.healthy() > 0 || d.fail_open);
                let reason = if self.withdrawn_all || self.withdrawn.contains(&vip.name) {
                    Unannounced::Operator
                } else if self.awaiting_sync {
                    Unannounced::AwaitingSync
                } else if !servable {
                    Unannounced::NoBackend
                } else {
                    return None;
                };
                Some((vip.name.clone(), reason))
            })
            .collect()
    }

    /// The addresses to announce, given `reasons`: every address with a VIP not withheld.
    pub fn wanted(config: &Config, reasons: &BTreeMap<String, Unannounced>) -> BTreeSet<IpAddr> {
        config
            .vips
            .iter()
            .filter(|v| !reasons.contains_key(&v.name))
            .map(|v| v.address)
            .collect()
    }

    /// Withdraws (`withdraw`) or announces again `vip` (every VIP: `None`). Returns what the
    /// operator is told, or why the request makes no sense.
    pub fn operator(
        &mut self,
        config: &Config,
        vip: Option<&str>,
        withdraw: bool,
    ) -> Result<String, String> {
        match (vip, withdraw) {
            (Some(name), _) if !config.vips.iter().any(|v| v.name == name) => {
                let names: Vec<&str> = config.vips.iter().map(|v| v.name.as_str()).collect();
                Err(format!(
                    "no VIP named \"{name}\" (the config has: {})",
                    names.join(", ")
                ))
            }
            (None, true) => {
                self.withdrawn_all = true;
                Ok("every VIP withdrawn (until `balancer announce`)".to_owned())
            }
            (None, false) => {
                self.withdrawn_all = false;
                self.withdrawn.clear();
                Ok("every VIP announced again where it can be served".to_owned())
            }
            (Some(name), true) => {
                self.withdrawn.insert(name.to_owned());
                Ok(format!(
                    "VIP \"{name}\" withdrawn (until `balancer announce`)"
                ))
            }
            (Some(_), false) if self.withdrawn_all => Err(
                "every VIP is withdrawn: `balancer announce` without --vip announces them again"
                    .to_owned(),
            ),
            (Some(name), false) => {
                self.withdrawn.remove(name);
                Ok(format!(
                    "VIP \"{name}\" announced again where it can be served"
                ))
            }
        }
    }

    /// Forgets withdrawals of VIPs the config no longer has.
    pub fn retain(&mut self, config: &Config) {
        self.withdrawn
            .retain(|name| config.vips.iter().any(|v| &v.name == name));
    }
}

//! What the data plane's maps hold, or are to hold, and what their counters report: the
//! kernel's side of the planner, by id.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use balancer_common::{
    defence::{FloodSettings, SourceLimit},
    nat::{NatSettings, NatVip},
    xdp_action, Backend, Outcome, TrafficStats, VipKey, VipMeta,
};

/// A VIP's Maglev table: `table_size` slots of backend ids (`NO_BACKEND` where none takes
/// new flows). Shared, not copied, between the desired state, the plan and the record of
/// what the kernel holds: a full table is 256 KiB.
pub type Table = Arc<[u32]>;

/// The entries a packet can reach.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    /// Every entry of the VIPS map, in a stable order: each VIP's key, the port-0 keys that
    /// take fragments, one address entry per VIP address.
    pub keys: Vec<(VipKey, VipMeta)>,
    /// Every live backend entry, by id.
    pub backends: BTreeMap<u32, Backend>,
    /// Every VIP's Maglev table, by VIP id. Empty when not known (maps adopted from pins):
    /// it differs from every real table, so the next plan writes it.
    pub tables: BTreeMap<u32, Table>,
    /// Every egress interface (ifindex) a backend is reached through.
    pub egress: BTreeSet<u32>,
    /// NAT: the timeouts, and each NAT VIP's translation.
    pub nat: NatContents,
    /// The defences' settings: the flood cap, and each limited VIP's source limit.
    pub defence: DefenceContents,
}

/// What the defences' settings maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DefenceContents {
    /// `FLOOD_SETTINGS` (all zero until written: no cap).
    pub flood: FloodSettings,
    /// `SOURCE_LIMITS`, by VIP id: an entry for every VIP with `VIP_F_SOURCE_LIMIT`.
    pub limits: BTreeMap<u32, SourceLimit>,
}

/// What the NAT maps hold besides connections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatContents {
    /// `NAT_SETTINGS` (all zero until written).
    pub settings: NatSettings,
    /// `NAT_VIPS`, by VIP id: an entry for every NAT VIP. Entries of other ids are never read.
    pub vips: BTreeMap<u32, NatVip>,
}

impl MapContents {
    /// The meta of `key`, if the maps hold it.
    pub fn meta(&self, key: &VipKey) -> Option<&VipMeta> {
        self.keys.iter().find(|(k, _)| k == key).map(|(_, m)| m)
    }
}

/// What a sweep of the NAT tables found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatSweep {
    /// Entries left in each table (IPv4, IPv6), both directions.
    pub entries_v4: u64,
    pub entries_v6: u64,
    /// Connections left (their forward entries).
    pub connections: u64,
    /// Open connections (not closed nor reset, not timed out) by backend id.
    pub open_by_backend: BTreeMap<u32, u64>,
    /// Entries removed by this sweep.
    pub removed: u64,
    /// SNAT ports in use (reply entries of full-NAT connections, quarantined ones included),
    /// by SNAT address.
    pub ports: BTreeMap<std::net::IpAddr, u64>,
    pub took: std::time::Duration,
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub backends: BTreeMap<u32, TrafficStats>,
    pub vips: BTreeMap<u32, TrafficStats>,
    /// Indexed by `balancer_common::Outcome`.
    pub outcomes: Vec<u64>,
    /// Indexed by `balancer_common::NatCounter` (empty for an object without NAT).
    pub nat: Vec<u64>,
    /// Indexed by `balancer_common::defence::DefenceCounter` (empty for an object without
    /// the defences).
    pub defence: Vec<u64>,
}

impl Counters {
    /// `counter`'s count (0 for an object without the defences).
    pub fn defence(&self, counter: balancer_common::defence::DefenceCounter) -> u64 {
        self.defence.get(counter as usize).copied().unwrap_or(0)
    }
}

impl Counters {
    /// Packets per XDP verdict (indexed like `xdp_action::NAMES`), summed from the outcomes.
    pub fn verdicts(&self) -> Vec<u64> {
        (0..xdp_action::NAMES.len())
            .map(|i| {
                Outcome::ALL
                    .iter()
                    .filter(|o| o.verdict() as usize == i)
                    .map(|o| self.outcome(*o))
                    .sum()
            })
            .collect()
    }

    /// Packets counted under `outcome` (0 before the first reading).
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.outcomes.get(outcome as usize).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_sum_the_outcomes() {
        let mut counters = Counters {
            outcomes: vec![0; Outcome::ALL.len()],
            ..Counters::default()
        };
        counters.outcomes[Outcome::ForwardedTx as usize] = 5;
        counters.outcomes[Outcome::EchoReplied as usize] = 2;
        counters.outcomes[Outcome::NotVip as usize] = 7;
        counters.outcomes[Outcome::NoBackend as usize] = 1;
        let verdicts = counters.verdicts();
        assert_eq!(verdicts[xdp_action::TX as usize], 7);
        assert_eq!(verdicts[xdp_action::PASS as usize], 7);
        assert_eq!(verdicts[xdp_action::DROP as usize], 1);
        assert_eq!(Counters::default().outcome(Outcome::NotVip), 0);
    }
}

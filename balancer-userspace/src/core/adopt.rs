//! Taking over the maps an earlier daemon left pinned: VIPs and backends keep their ids (the
//! connection table's entries hold backend ids), backends of a configured VIP that the config
//! no longer lists start their removal grace, health checks start from the pinned verdicts,
//! and the maps' contents become what the first plan changes from.

use std::{
    collections::{BTreeMap, HashMap},
    time::Instant,
};

use balancer_common::BACKEND_F_DOWN;

use crate::{
    config::{CheckKind, Config, InitialState},
    core::health::Tracker,
    plan::{
        contents::{MapContents, Table},
        ids::Ids,
        inputs::{address_of, vip_key, BackendKey},
    },
};

/// What adopting pinned maps gives the core.
#[derive(Debug)]
pub struct Adoption {
    pub ids: Ids,
    pub trackers: HashMap<BackendKey, Tracker>,
    /// Pinned backends the config no longer lists, and when their grace ends.
    pub retiring: BTreeMap<BackendKey, Instant>,
    /// What the maps hold, tables unknown.
    pub held: MapContents,
    /// One line for the log and the status.
    pub summary: String,
}

/// Adopts `pinned` (what the maps hold; tables are not read) for `config`.
pub fn adopt(config: &Config, pinned: &MapContents, now: Instant) -> Adoption {
    let vip_ids = configured_vip_ids(config, pinned);
    let name_of: HashMap<u32, &str> = vip_ids.iter().map(|(n, id)| (*id, n.as_str())).collect();
    let mut backend_ids = HashMap::new();
    let mut trackers = HashMap::new();
    let mut retiring = BTreeMap::new();
    for (&id, b) in &pinned.backends {
        let Some(&name) = name_of.get(&b.vip_id) else {
            continue;
        };
        let address = address_of(b.addr, b.family);
        let key = (name.to_owned(), address);
        let configured = config
            .vips
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.backends.iter().find(|c| c.address == address));
        match configured {
            Some(c) if c.health.kind != CheckKind::None => {
                // The last verdict: down if it was marked down while reachable.
                let down = b.flags & BACKEND_F_DOWN != 0 && b.ifindex != 0;
                let initial = if down {
                    InitialState::Down
                } else {
                    InitialState::Up
                };
                trackers.insert(key.clone(), Tracker::new(initial));
            }
            Some(_) => {}
            None => {
                retiring.insert(key.clone(), now + config.removal_grace);
            }
        }
        backend_ids.insert(key, id);
    }
    // Every pinned VIP id has a table, not known: the first plan writes every table.
    let tables: BTreeMap<u32, Table> = pinned
        .keys
        .iter()
        .map(|(_, meta)| (meta.vip_id, Table::from(Vec::new())))
        .collect();
    let summary = format!(
        "{} of {} pinned VIPs and {} of {} backends still configured ({} kept for removal_grace)",
        vip_ids.len(),
        tables.len(),
        backend_ids.len() - retiring.len(),
        pinned.backends.len(),
        retiring.len(),
    );
    Adoption {
        ids: Ids::adopted(vip_ids, backend_ids),
        trackers,
        retiring,
        held: MapContents {
            tables,
            ..pinned.clone()
        },
        summary,
    }
}

/// Configured VIPs found in the maps, by their main key (each pinned id adopted once).
fn configured_vip_ids(config: &Config, pinned: &MapContents) -> HashMap<String, u32> {
    let mut vip_ids: HashMap<String, u32> = HashMap::new();
    for vip in &config.vips {
        if let Some(meta) = pinned.meta(&vip_key(vip)) {
            if !vip_ids.values().any(|&v| v == meta.vip_id) {
                vip_ids.insert(vip.name.clone(), meta.vip_id);
            }
        }
    }
    vip_ids
}

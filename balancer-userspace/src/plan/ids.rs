//! Stable ids for VIPs and backends.
//!
//! An id stays with its VIP or backend for as long as it is configured (or, for a removed
//! backend, retiring), so that the connection table's entries (which hold backend ids) stay
//! valid across config changes. New ids are handed out round robin, so a freed id is reused
//! as late as possible: a flow still remembered on a removed backend is re-selected rather
//! than silently sent to that id's next owner. An id freed by an assignment is never handed
//! out by the same assignment: the maps still hold it until the plan that follows clears it,
//! and the planner relies on an id naming the same VIP or backend before and after a plan.

use std::collections::{BTreeSet, HashMap};

use balancer_common::{MAX_BACKENDS, MAX_VIPS};

use crate::plan::inputs::BackendKey;

#[derive(Clone, Debug, Default)]
pub struct Ids {
    vips: HashMap<String, u32>,
    backends: HashMap<BackendKey, u32>,
    next_vip: u32,
    next_backend: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("too many VIPs (at most {MAX_VIPS})")]
    TooManyVips,
    #[error(
        "too many backends (at most {MAX_BACKENDS}, counting those kept for removal_grace and \
         those removed by this change until it is applied)"
    )]
    TooManyBackends,
}

impl Ids {
    /// Ids found in maps an earlier daemon left: they keep their meaning, and new ids are
    /// handed out after the highest one found.
    pub fn adopted(vips: HashMap<String, u32>, backends: HashMap<BackendKey, u32>) -> Ids {
        let next_vip = vips.values().max().map_or(0, |m| (m + 1) % MAX_VIPS);
        let next_backend = backends
            .values()
            .max()
            .map_or(0, |m| (m + 1) % MAX_BACKENDS);
        Ids {
            vips,
            backends,
            next_vip,
            next_backend,
        }
    }

    pub fn vip(&self, name: &str) -> Option<u32> {
        self.vips.get(name).copied()
    }

    pub fn backend(&self, key: &BackendKey) -> Option<u32> {
        self.backends.get(key).copied()
    }

    /// Keeps the ids of the VIPs and backends still wanted, frees the others, and gives new
    /// ones ids (never one freed by this call).
    pub fn assign(&mut self, vips: &[&str], backends: &[BackendKey]) -> Result<(), IdError> {
        let wanted_vips: BTreeSet<&str> = vips.iter().copied().collect();
        let freed_vips: Vec<u32> =
            drain_unwanted(&mut self.vips, |n| wanted_vips.contains(n.as_str()));
        let wanted_backends: BTreeSet<&BackendKey> = backends.iter().collect();
        let freed_backends = drain_unwanted(&mut self.backends, |k| wanted_backends.contains(k));
        // The ids in use (and just freed), built once: a set per new backend made a reload
        // adding 10,000 backends take seconds.
        let mut used: BTreeSet<u32> = self.vips.values().chain(&freed_vips).copied().collect();
        for &name in vips {
            if !self.vips.contains_key(name) {
                let id = next_free(&mut self.next_vip, &mut used, MAX_VIPS)
                    .ok_or(IdError::TooManyVips)?;
                self.vips.insert(name.to_owned(), id);
            }
        }
        let mut used: BTreeSet<u32> = self
            .backends
            .values()
            .chain(&freed_backends)
            .copied()
            .collect();
        for key in backends {
            if !self.backends.contains_key(key) {
                let id = next_free(&mut self.next_backend, &mut used, MAX_BACKENDS)
                    .ok_or(IdError::TooManyBackends)?;
                self.backends.insert(key.clone(), id);
            }
        }
        Ok(())
    }
}

/// Removes the entries `wanted` rejects; returns their ids.
fn drain_unwanted<K: Clone + Eq + std::hash::Hash>(
    ids: &mut HashMap<K, u32>,
    wanted: impl Fn(&K) -> bool,
) -> Vec<u32> {
    let gone: Vec<K> = ids.keys().filter(|k| !wanted(k)).cloned().collect();
    gone.iter().filter_map(|k| ids.remove(k)).collect()
}

/// The first id at or after `cursor` (wrapping) that is not used; takes it, and advances the
/// cursor past it.
fn next_free(cursor: &mut u32, used: &mut BTreeSet<u32>, limit: u32) -> Option<u32> {
    let id = (0..limit)
        .map(|i| (*cursor + i) % limit)
        .find(|id| !used.contains(id))?;
    used.insert(id);
    *cursor = (id + 1) % limit;
    Some(id)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn key(vip: &str, last: u8) -> BackendKey {
        (vip.to_owned(), IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn ids_are_kept_and_new_ones_handed_out_round_robin() {
        let mut ids = Ids::default();
        ids.assign(&["a", "b"], &[key("a", 1), key("a", 2), key("b", 1)])
            .unwrap();
        let kept = ids.backend(&key("a", 2)).unwrap();
        ids.assign(&["a", "b"], &[key("a", 2), key("b", 1), key("a", 3)])
            .unwrap();
        assert_eq!(ids.backend(&key("a", 2)), Some(kept));
        assert_eq!(ids.backend(&key("a", 1)), None);
        assert_eq!(
            ids.backend(&key("a", 3)),
            Some(3),
            "after the highest handed out"
        );
        assert_eq!((ids.vip("a"), ids.vip("b")), (Some(0), Some(1)));
    }

    #[test]
    fn an_id_freed_by_an_assignment_is_not_reused_by_it() {
        // Every id but one in use, cursor wrapped onto the one about to be freed.
        let backends: HashMap<BackendKey, u32> = (0..MAX_BACKENDS)
            .map(|i| (("v".to_owned(), IpAddr::from(i.to_be_bytes())), i))
            .collect();
        let mut ids = Ids::adopted(HashMap::from([("v".to_owned(), 0)]), backends);
        let mut wanted: Vec<BackendKey> = ids.backends.keys().cloned().collect();
        let freed = wanted.pop().unwrap();
        let freed_id = ids.backends[&freed];
        wanted.push(key("v", 255));
        assert_eq!(
            ids.assign(&["v"], &wanted),
            Err(IdError::TooManyBackends),
            "the freed id {freed_id} is still in the maps"
        );
        // The next assignment (after the plan cleared it) may use it.
        let mut ids = Ids::default();
        ids.assign(&["v"], &[key("v", 1)]).unwrap();
        ids.assign(&["v"], &[]).unwrap();
        ids.assign(&["v"], &[key("v", 2)]).unwrap();
        assert_eq!(ids.backend(&key("v", 2)), Some(1));
    }

    #[test]
    fn adopted_ids_continue_after_the_highest() {
        let mut ids = Ids::adopted(
            HashMap::from([("web".to_owned(), 7)]),
            HashMap::from([(key("web", 1), 40)]),
        );
        ids.assign(&["web", "new"], &[key("web", 1), key("web", 2)])
            .unwrap();
        assert_eq!(ids.vip("new"), Some(8));
        assert_eq!(ids.backend(&key("web", 2)), Some(41));
        assert_eq!(ids.backend(&key("web", 1)), Some(40));
    }
}

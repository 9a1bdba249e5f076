//! What the counters say: the latest reading, the samples rates are computed from, the
//! autoscaling signal, and when the connection table is next walked to count its flows.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::{
    autoscale::{desired_backends, Sample, Samples, TrafficRates, SAMPLE_INTERVAL, STATUS_WINDOW},
    config::Config,
    core::events::Event,
    plan::{
        contents::{Counters, NatSweep},
        desired::DesiredState,
        inputs::BackendKey,
    },
};

/// The connection table is walked to count its flows (one syscall per flow) no more often than
/// keeps the walks under 1% of one CPU: every sample while a walk is quick, less often as the
/// table fills, and at least every `CONN_WALK_MAX_INTERVAL`.
const CONN_WALK_COST_FACTOR: u32 = 100;
const CONN_WALK_MAX_INTERVAL: Duration = Duration::from_secs(60);

/// A VIP's autoscaling signal, as last computed.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscaleState {
    pub ready: u32,
    /// The VIP's rate of the target's metric, averaged over the target's window.
    pub rate: f64,
    pub desired: u32,
}

/// A walk of the connection table: the flows counted (in all, and by backend id) and how
/// long it took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnWalk {
    pub entries: u64,
    pub took: Duration,
    pub by_backend: BTreeMap<u32, u64>,
}

#[derive(Debug, Default)]
pub struct Traffic {
    /// The latest reading (shown as totals), and when it was taken.
    pub counters: Counters,
    pub read_at: Option<Instant>,
    samples: Samples,
    last_sample: Option<Instant>,
    /// The autoscaling signal of every VIP that sets a target.
    pub autoscale: BTreeMap<String, AutoscaleState>,
    /// Flows in the connection table at the last walk, and by backend id.
    pub conn_entries: Option<u64>,
    pub conn_by_backend: BTreeMap<u32, u64>,
    /// Each backend id's packet count, and when it last changed (or was first read).
    pub last_packet: BTreeMap<u32, (u64, Instant)>,
    next_walk: Option<Instant>,
    /// The NAT tables as of the last sweep, and the entries sweeps removed in all.
    pub nat_sweep: Option<NatSweep>,
    pub nat_swept: u64,
    /// Flood mode: since when new flows have gone over the per-CPU cap (`None`: not now),
    /// and the capped count when it started.
    pub flood: Option<(Instant, u64)>,
    /// How often flood mode started.
    pub floods: u64,
}

impl Traffic {
    /// Whether the connection table should be walked with the next reading.
    pub fn walk_due(&self, now: Instant) -> bool {
        self.next_walk.is_none_or(|at| now >= at)
    }

    /// A sweep of the NAT tables.
    pub fn swept(&mut self, sweep: NatSweep) {
        self.nat_swept += sweep.removed;
        self.nat_sweep = Some(sweep);
    }

    pub fn walked(&mut self, walk: ConnWalk, now: Instant) {
        self.conn_entries = Some(walk.entries);
        self.conn_by_backend = walk.by_backend;
        let pause = (walk.took * CONN_WALK_COST_FACTOR).min(CONN_WALK_MAX_INTERVAL);
        self.next_walk = Some(now + pause);
    }

    /// Takes a reading: always the new totals; a sample for rates (and the autoscaling
    /// signal) at most every `SAMPLE_INTERVAL`, so that readings asked for between samples
    /// do not grow the history.
    pub fn record(
        &mut self,
        counters: Counters,
        desired: &DesiredState,
        config: &Config,
        now: Instant,
    ) -> Vec<Event> {
        // When each backend last forwarded a packet: when its count last moved.
        let mut last_packet = BTreeMap::new();
        for (id, stats) in &counters.backends {
            let seen = match self.last_packet.get(id) {
                Some(&(packets, at)) if packets == stats.packets => (packets, at),
                _ => (stats.packets, now),
            };
            last_packet.insert(*id, seen);
        }
        self.last_packet = last_packet;
        let flood = self.flood_transition(&counters, config, now);
        self.counters = counters;
        self.read_at = Some(now);
        let due = self
            .last_sample
            .is_none_or(|at| now.duration_since(at) + SAMPLE_INTERVAL / 10 >= SAMPLE_INTERVAL);
        if !due {
            return flood.into_iter().collect();
        }
        self.last_sample = Some(now);
        let keep = config
            .vips
            .iter()
            .filter_map(|v| v.autoscale.map(|a| a.window))
            .max()
            .unwrap_or_default()
            .max(STATUS_WINDOW)
            + SAMPLE_INTERVAL * 2;
        self.samples.push(self.sample(desired, now), keep);
        let mut events: Vec<Event> = flood.into_iter().collect();
        events.extend(self.autoscale(desired, config));
        events
    }

    /// Flood mode starts at the first reading that finds new flows capped since the last
    /// one, and ends at the first that finds none (readings are a second apart: each CPU's
    /// cap counts per second).
    fn flood_transition(
        &mut self,
        counters: &Counters,
        config: &Config,
        now: Instant,
    ) -> Option<Event> {
        use balancer_common::defence::DefenceCounter::Capped;
        let capped = counters.defence(Capped);
        let before = self.read_at.map(|_| self.counters.defence(Capped))?;
        match self.flood {
            None if capped > before => {
                self.flood = Some((now, before));
                self.floods += 1;
                Some(Event::FloodStarted {
                    capped: capped - before,
                    cap: config.flood.new_flows_per_cpu,
                })
            }
            Some((since, at_start)) if capped == before => {
                self.flood = None;
                Some(Event::FloodEnded {
                    lasted: now.duration_since(since),
                    capped: capped.saturating_sub(at_start),
                })
            }
            _ => None,
        }
    }

    /// The counters by VIP name and backend key.
    fn sample(&self, desired: &DesiredState, now: Instant) -> Sample {
        let c = &self.counters;
        let vips = desired
            .vips
            .iter()
            .map(|v| {
                let stats = c.vips.get(&v.meta.vip_id).copied().unwrap_or_default();
                (v.name.clone(), stats)
            })
            .collect();
        let backends = desired
            .vips
            .iter()
            .flat_map(|v| {
                v.backends
                    .iter()
                    .map(move |b| ((v.name.clone(), b.address), b.id))
            })
            .map(|(key, id)| (key, c.backends.get(&id).copied().unwrap_or_default()))
            .collect();
        Sample {
            at: now,
            vips,
            backends,
        }
    }

    /// Recomputes the autoscaling signal; an event for each VIP whose signal changed.
    fn autoscale(&mut self, desired: &DesiredState, config: &Config) -> Vec<Event> {
        let mut events = Vec::new();
        let mut autoscale = BTreeMap::new();
        for (vip, planned) in config.vips.iter().zip(&desired.vips) {
            let Some(target) = vip.autoscale else {
                continue;
            };
            let ready = planned.healthy() as u32;
            let rate = self
                .samples
                .vip(&vip.name, target.window)
                .map_or(0.0, |r| r.of(target.metric));
            let wanted = desired_backends(ready, rate, target.target_per_backend, target.tolerance);
            if self.autoscale.get(&vip.name).map(|a| a.desired) != Some(wanted) {
                events.push(Event::DesiredBackends {
                    vip: vip.name.clone(),
                    desired: wanted,
                    ready,
                    rate,
                    metric: target.metric,
                    target: target.target_per_backend,
                });
            }
            let state = AutoscaleState {
                ready,
                rate,
                desired: wanted,
            };
            autoscale.insert(vip.name.clone(), state);
        }
        self.autoscale = autoscale;
        events
    }

    /// Flows remembered for backend `id`: its connection-table entries as of the last walk,
    /// plus its open NAT connections as of the last sweep (`None`: neither yet).
    pub fn remembered_flows(&self, id: u32) -> Option<u64> {
        let walked = self
            .conn_entries
            .is_some()
            .then(|| self.conn_by_backend.get(&id).copied().unwrap_or(0));
        let swept = self
            .nat_sweep
            .as_ref()
            .map(|sweep| sweep.open_by_backend.get(&id).copied().unwrap_or(0));
        match (walked, swept) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        }
    }

    /// The VIP's rates over the status window.
    pub fn vip_rates(&self, name: &str) -> Option<TrafficRates> {
        self.samples.vip(name, STATUS_WINDOW)
    }

    /// The backend's rates over the status window.
    pub fn backend_rates(&self, key: &BackendKey) -> Option<TrafficRates> {
        self.samples.backend(key, STATUS_WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_are_spaced_by_their_cost() {
        let start = Instant::now();
        let mut traffic = Traffic::default();
        assert!(traffic.walk_due(start));
        let took = Duration::from_millis(5);
        traffic.walked(
            ConnWalk {
                entries: 9,
                took,
                by_backend: BTreeMap::new(),
            },
            start,
        );
        assert_eq!(traffic.conn_entries, Some(9));
        assert!(!traffic.walk_due(start + Duration::from_millis(499)));
        assert!(traffic.walk_due(start + Duration::from_millis(500)));
        let slow = Duration::from_secs(2);
        traffic.walked(
            ConnWalk {
                entries: 9,
                took: slow,
                by_backend: BTreeMap::new(),
            },
            start,
        );
        assert!(!traffic.walk_due(start + Duration::from_secs(59)));
        assert!(traffic.walk_due(start + CONN_WALK_MAX_INTERVAL));
    }
}

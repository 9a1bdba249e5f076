//! The scaler's decisions, without I/O: the Kubernetes HorizontalPodAutoscaler's algorithm
//! ([`Hpa`]) and the replicas it scales ([`Fleet`]), which say what to do as [`Action`]s for
//! the demo's shell to perform.
//!
//! The HPA here is the one the README's Kubernetes example sets up: an External metric, the
//! VIP's new-flow rate as the balancer publishes it (`vips[].autoscale.rate`, averaged over
//! the VIP's `window`), with an `AverageValue` target of `target_per_backend`. Its replica
//! computation (kube-controller-manager's `GetExternalPerPodMetricReplicas`) divides the rate
//! by the replicas the Deployment has, whether ready or not, which is why the scaler follows
//! the rate and not the balancer's own `desired_backends` (computed on the backends that
//! pass their health checks): a replica still starting counts at once, as for the HPA.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

/// What the HPA is told (`spec` of an `autoscaling/v2` HorizontalPodAutoscaler).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HpaSpec {
    /// `averageValue` of the metric's target: the rate one replica is meant to take.
    pub target_per_replica: f64,
    /// The controller's `--horizontal-pod-autoscaler-tolerance` (default 0.1).
    pub tolerance: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// `behavior.scaleDown.stabilizationWindowSeconds`: a scale-down takes the highest
    /// recommendation of this window.
    pub scale_down_stabilisation: Duration,
}

/// The replicas the metric calls for, before stabilisation: `ceil(total / target)`, or
/// `current` while `total / (target x current)` is within `tolerance` of 1. (The HPA's
/// "ceil(current x metric / target)", with the metric per replica being `total / current`.)
pub fn recommend(current: u32, total: f64, target_per_replica: f64, tolerance: f64) -> u32 {
    // Floating-point slack, so that 2200/(200 x 10) counts as exactly 1.1.
    const EPSILON: f64 = 1e-9;
    let ratio = total / (target_per_replica * f64::from(current.max(1)));
    if current > 0 && (1.0 - ratio).abs() <= tolerance + EPSILON {
        return current;
    }
    ((total / target_per_replica) - EPSILON).ceil().max(0.0) as u32
}

/// An HPA's state: the recommendations of the last stabilisation window.
#[derive(Debug)]
pub struct Hpa {
    pub spec: HpaSpec,
    recommendations: VecDeque<(Instant, u32)>,
}

impl Hpa {
    pub fn new(spec: HpaSpec) -> Hpa {
        Hpa {
            spec,
            recommendations: VecDeque::new(),
        }
    }

    /// One sync: the replicas to have, given the replicas there are and the metric's total.
    /// Scaling up follows the recommendation at once; scaling down takes the highest
    /// recommendation of the stabilisation window (so a dip shorter than the window scales
    /// nothing down); the result is kept within min and max. (Left out: the default
    /// scale-up rate limits, at most 4 replicas or 100% more per 15 s, which this demo's ramp
    /// never reaches, and the sync period, 15 s by default, 1 s here to fit a demo.)
    pub fn sync(&mut self, now: Instant, current: u32, total: f64) -> u32 {
        let spec = self.spec;
        let raw = recommend(current, total, spec.target_per_replica, spec.tolerance);
        while self.recommendations.front().is_some_and(|(at, _)| {
            now.saturating_duration_since(*at) > spec.scale_down_stabilisation
        }) {
            self.recommendations.pop_front();
        }
        self.recommendations.push_back((now, raw));
        let stabilised = self
            .recommendations
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(raw);
        stabilised.clamp(spec.min_replicas, spec.max_replicas)
    }
}

/// What the shell does for the fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create replica `index`'s namespace and start its server.
    Start(usize),
    /// Set the DNS records to these replicas (in order of index).
    Publish(Vec<usize>),
    /// Stop replica `index`'s server and remove its namespace; `forced`: it was not
    /// drained within the grace period.
    Stop { index: usize, forced: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// In the DNS records.
    Serving,
    /// Out of the DNS records, waiting for its flows to drain (a pod's preStop hook).
    Retiring { since: Instant },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replica {
    pub index: usize,
    pub phase: Phase,
}

/// The replicas of the demo's "Deployment". Indexes (each one an address) are handed out
/// round robin from a pool, as container IPAM hands out pod addresses, so that an address
/// is not reused right after its replica went.
#[derive(Debug)]
pub struct Fleet {
    /// In order of creation.
    replicas: Vec<Replica>,
    pool: usize,
    next: usize,
    /// How long a retiring replica may take to drain before it is stopped anyway
    /// (`terminationGracePeriodSeconds`).
    pub grace: Duration,
}

impl Fleet {
    pub fn new(pool: usize, grace: Duration) -> Fleet {
        Fleet {
            replicas: Vec::new(),
            pool,
            next: 0,
            grace,
        }
    }

    /// Replicas that are not retiring: what the HPA counts.
    pub fn current(&self) -> u32 {
        self.serving().len() as u32
    }

    fn serving(&self) -> Vec<usize> {
        let mut serving: Vec<usize> = self
            .replicas
            .iter()
            .filter(|r| r.phase == Phase::Serving)
            .map(|r| r.index)
            .collect();
        serving.sort_unstable();
        serving
    }

    pub fn retiring(&self) -> usize {
        self.replicas.len() - self.current() as usize
    }

    /// Scale to `desired` replicas: new ones started, then published; or the newest ones out
    /// of the records first, to be stopped once drained ([`Fleet::reap`]).
    pub fn scale_to(&mut self, now: Instant, desired: u32) -> Vec<Action> {
        let current = self.current();
        let mut actions = Vec::new();
        if desired > current {
            for _ in current..desired {
                let Some(index) = self.free_index() else {
                    break;
                };
                self.replicas.push(Replica {
                    index,
                    phase: Phase::Serving,
                });
                actions.push(Action::Start(index));
            }
        } else if desired < current {
            let mut to_retire = (current - desired) as usize;
            for replica in self.replicas.iter_mut().rev() {
                if to_retire == 0 {
                    break;
                }
                if replica.phase == Phase::Serving {
                    replica.phase = Phase::Retiring { since: now };
                    to_retire -= 1;
                }
            }
        }
        if desired != current {
            actions.push(Action::Publish(self.serving()));
        }
        actions
    }

    /// Retiring replicas that are `drained` (the balancer gives them no new flows and
    /// remembers none), or past the grace period: stopped.
    pub fn reap(&mut self, now: Instant, drained: impl Fn(usize) -> bool) -> Vec<Action> {
        let grace = self.grace;
        let mut actions = Vec::new();
        self.replicas.retain(|r| match r.phase {
            Phase::Serving => true,
            Phase::Retiring { since } => {
                let forced = now.saturating_duration_since(since) > grace;
                if forced || drained(r.index) {
                    actions.push(Action::Stop {
                        index: r.index,
                        forced: forced && !drained(r.index),
                    });
                    false
                } else {
                    true
                }
            }
        });
        actions
    }

    /// The next index after the last one handed out that no replica holds.
    fn free_index(&mut self) -> Option<usize> {
        for step in 0..self.pool {
            let index = (self.next + step) % self.pool;
            if self.replicas.iter().all(|r| r.index != index) {
                self.next = index + 1;
                return Some(index);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recommendation_follows_the_hpa_formula_and_tolerance() {
        // (current, total rate, target, expected): ceil(total / target) outside the band.
        let cases = [
            // 4 replicas at 250 each against 200: ceil(1000 / 200) = 5.
            (4, 1000.0, 200.0, 5),
            // At half the target: ceil(400 / 200) = 2.
            (4, 400.0, 200.0, 2),
            // Within 10% of the target (210 and 190 per replica): unchanged.
            (4, 840.0, 200.0, 4),
            (4, 760.0, 200.0, 4),
            // The band's edge (exactly 1.1) is inside.
            (10, 2200.0, 200.0, 10),
            // Just outside: 221 per replica -> ceil(4.42) = 5; 179 -> ceil(3.58) = 4.
            (4, 884.0, 200.0, 5),
            (4, 716.0, 200.0, 4),
            // No load: 0 (the spec's minimum applies after).
            (3, 0.0, 20.0, 0),
            // The demo's figures: 120 conn/s at 20 per replica from 1 replica -> 6.
            (1, 120.0, 20.0, 6),
        ];
        for (current, total, target, expected) in cases {
            assert_eq!(
                recommend(current, total, target, 0.1),
                expected,
                "{current} replicas, {total}/s against {target}"
            );
        }
    }

    fn spec(window_secs: u64) -> HpaSpec {
        HpaSpec {
            target_per_replica: 20.0,
            tolerance: 0.1,
            min_replicas: 1,
            max_replicas: 8,
            scale_down_stabilisation: Duration::from_secs(window_secs),
        }
    }

    #[test]
    fn scale_up_at_once_scale_down_after_the_window() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut hpa = Hpa::new(spec(10));
        // (second, current replicas, total rate, expected decision)
        let steps = [
            (0, 1, 10.0, 1),
            (1, 1, 65.0, 4), // up at once: ceil(65 / 20)
            (2, 4, 80.0, 4), // on target
            (3, 4, 30.0, 4), // the load falls: 2 recommended, 4 held (window)
            (8, 4, 30.0, 4),
            (12, 4, 30.0, 4),  // the 4 of second 2 is still inside the 10 s window
            (13, 4, 30.0, 2),  // now every recommendation in the window says 2
            (15, 2, 300.0, 8), // up again, capped at max
            (16, 8, 0.0, 8),
            (27, 8, 0.0, 1), // ... down to min after the window
        ];
        for (second, current, total, expected) in steps {
            assert_eq!(
                hpa.sync(at(second), current, total),
                expected,
                "at {second}s: {current} replicas, {total}/s"
            );
        }
    }

    #[test]
    fn a_dip_shorter_than_the_window_scales_nothing_down() {
        let start = Instant::now();
        let mut hpa = Hpa::new(spec(5));
        let mut decisions = Vec::new();
        for s in 0..12u64 {
            let total = if (4..8).contains(&s) { 20.0 } else { 60.0 };
            decisions.push(hpa.sync(start + Duration::from_secs(s), 3, total));
        }
        assert!(decisions.iter().all(|&d| d == 3), "{decisions:?}");
    }

    #[test]
    fn fleet_starts_publishes_retires_newest_and_stops_when_drained() {
        let now = Instant::now();
        let mut fleet = Fleet::new(4, Duration::from_secs(30));
        assert_eq!(
            fleet.scale_to(now, 3),
            vec![
                Action::Start(0),
                Action::Start(1),
                Action::Start(2),
                Action::Publish(vec![0, 1, 2])
            ]
        );
        assert_eq!(fleet.scale_to(now, 3), vec![]);
        // Down by two: the newest leave the records first, and keep running.
        assert_eq!(fleet.scale_to(now, 1), vec![Action::Publish(vec![0])]);
        assert_eq!((fleet.current(), fleet.retiring()), (1, 2));
        // Only drained ones are stopped.
        assert_eq!(
            fleet.reap(now, |i| i == 2),
            vec![Action::Stop {
                index: 2,
                forced: false
            }]
        );
        // Up again while 1 still drains: addresses continue round robin (3, then 2; 0 and 1
        // are taken).
        assert_eq!(
            fleet.scale_to(now, 3),
            vec![
                Action::Start(3),
                Action::Start(2),
                Action::Publish(vec![0, 2, 3])
            ]
        );
        // Past the grace period, a replica that never drained is stopped anyway.
        let later = now + Duration::from_secs(31);
        assert_eq!(
            fleet.reap(later, |_| false),
            vec![Action::Stop {
                index: 1,
                forced: true
            }]
        );
        assert_eq!((fleet.current(), fleet.retiring()), (3, 0));
        // The pool is full: no more than it holds.
        assert_eq!(
            fleet.scale_to(later, 9),
            vec![Action::Start(1), Action::Publish(vec![0, 1, 2, 3])]
        );
    }
}

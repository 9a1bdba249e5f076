//! The autoscaling signal and the rates it is computed from.
//!
//! The daemon samples the counters every `SAMPLE_INTERVAL` (a few map reads, no per-packet
//! work) and keeps enough samples to cover the longest window asked for. Rates are the
//! difference between the newest sample and the oldest one inside the window, divided by the
//! time between them.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use balancer_common::TrafficStats;

use crate::{config::AutoscaleMetric, plan::inputs::BackendKey};

/// How often the counters are sampled for rates.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Window of the rates shown in the status (new flows/s, packets/s, bytes/s).
pub const STATUS_WINDOW: Duration = Duration::from_secs(10);

/// Desired backends for a VIP, as the Kubernetes HorizontalPodAutoscaler computes it:
/// `ceil(ready x (rate per ready backend) / target)`, unchanged (`ready`) while the rate per
/// ready backend is within `tolerance` of the target, and never below 1. With no ready
/// backend, the whole rate counts against one backend's target (scale from zero).
pub fn desired_backends(
    ready: u32,
    total_rate: f64,
    target_per_backend: f64,
    tolerance: f64,
) -> u32 {
    // Floating-point slack, so that 2200/10/200 counts as exactly 1.1.
    const EPSILON: f64 = 1e-9;
    let ceil = |x: f64| ((x - EPSILON).ceil().max(0.0) as u32).max(1);
    if ready == 0 {
        return ceil(total_rate / target_per_backend);
    }
    let ratio = total_rate / ready as f64 / target_per_backend;
    if (ratio - 1.0).abs() <= tolerance + EPSILON {
        return ready;
    }
    ceil(ready as f64 * ratio)
}

/// One reading of the counters.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub vips: BTreeMap<String, TrafficStats>,
    pub backends: BTreeMap<BackendKey, TrafficStats>,
}

/// Per-second rates of one counter set.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrafficRates {
    pub new_flows: f64,
    pub packets: f64,
    pub bytes: f64,
}

impl TrafficRates {
    pub fn of(&self, metric: AutoscaleMetric) -> f64 {
        match metric {
            AutoscaleMetric::NewFlowsPerSecond => self.new_flows,
            AutoscaleMetric::PacketsPerSecond => self.packets,
            AutoscaleMetric::BytesPerSecond => self.bytes,
        }
    }
}

/// The recent samples.
#[derive(Debug, Default)]
pub struct Samples {
    samples: VecDeque<Sample>,
}

impl Samples {
    /// Adds a sample and forgets those older than `keep`.
    pub fn push(&mut self, sample: Sample, keep: Duration) {
        let now = sample.at;
        self.samples.push_back(sample);
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|s| now.duration_since(s.at) > keep)
        {
            self.samples.pop_front();
        }
    }

    fn rate_of(
        &self,
        window: Duration,
        get: impl Fn(&Sample) -> Option<TrafficStats>,
    ) -> Option<TrafficRates> {
        let last = self.samples.back()?;
        let now_value = get(last)?;
        // The oldest sample inside the window that has the counter.
        let first = self
            .samples
            .iter()
            .find(|s| last.at.duration_since(s.at) <= window && get(s).is_some())?;
        let seconds = last.at.duration_since(first.at).as_secs_f64();
        if seconds <= 0.0 {
            return None;
        }
        let then = get(first)?;
        // A counter that went down was reset (a backend removed and added again).
        if now_value.packets < then.packets
            || now_value.new_flows < then.new_flows
            || now_value.bytes < then.bytes
        {
            return None;
        }
        Some(TrafficRates {
            new_flows: (now_value.new_flows - then.new_flows) as f64 / seconds,
            packets: (now_value.packets - then.packets) as f64 / seconds,
            bytes: (now_value.bytes - then.bytes) as f64 / seconds,
        })
    }

    pub fn vip(&self, name: &str, window: Duration) -> Option<TrafficRates> {
        self.rate_of(window, |s| s.vips.get(name).copied())
    }

    pub fn backend(&self, key: &BackendKey, window: Duration) -> Option<TrafficRates> {
        self.rate_of(window, |s| s.backends.get(key).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_follows_the_hpa() {
        // 4 ready backends, 1000 new flows/s, target 200 per backend: ceil(4 x 250/200) = 5.
        assert_eq!(desired_backends(4, 1000.0, 200.0, 0.1), 5);
        // Half the target: ceil(4 x 0.5) = 2.
        assert_eq!(desired_backends(4, 400.0, 200.0, 0.1), 2);
        // Exactly on target.
        assert_eq!(desired_backends(4, 800.0, 200.0, 0.1), 4);
        // A fraction above a whole backend rounds up.
        assert_eq!(desired_backends(3, 601.0, 200.0, 0.0), 4);
    }

    #[test]
    fn no_change_inside_the_tolerance_band() {
        // Per-backend rate 210 and 190: within 10% of 200, stay at 4.
        assert_eq!(desired_backends(4, 840.0, 200.0, 0.1), 4);
        assert_eq!(desired_backends(4, 760.0, 200.0, 0.1), 4);
        // Just outside: 221 per backend -> ceil(4 x 1.105) = 5; 179 -> ceil(4 x 0.895) = 4.
        assert_eq!(desired_backends(4, 884.0, 200.0, 0.1), 5);
        assert_eq!(desired_backends(4, 716.0, 200.0, 0.1), 4);
        // The band's edge is inside.
        assert_eq!(desired_backends(10, 2200.0, 200.0, 0.1), 10);
    }

    #[test]
    fn zero_load_and_zero_ready() {
        // No load: one backend is enough (never below 1).
        assert_eq!(desired_backends(5, 0.0, 200.0, 0.1), 1);
        // No ready backend: the whole rate against one backend's target.
        assert_eq!(desired_backends(0, 1000.0, 200.0, 0.1), 5);
        assert_eq!(desired_backends(0, 0.0, 200.0, 0.1), 1);
        assert_eq!(desired_backends(0, 1.0, 200.0, 0.1), 1);
    }

    fn stats(packets: u64) -> TrafficStats {
        TrafficStats {
            packets,
            bytes: packets * 100,
            new_flows: packets / 10,
        }
    }

    #[test]
    fn rates_over_a_window() {
        let start = Instant::now();
        let mut samples = Samples::default();
        for i in 0..=20u64 {
            let sample = Sample {
                at: start + Duration::from_secs(i),
                vips: [("web".to_owned(), stats(i * 50))].into_iter().collect(),
                backends: BTreeMap::new(),
            };
            samples.push(sample, Duration::from_secs(15));
        }
        let r = samples.vip("web", Duration::from_secs(10)).unwrap();
        assert_eq!(
            r,
            TrafficRates {
                new_flows: 5.0,
                packets: 50.0,
                bytes: 5000.0
            }
        );
        assert_eq!(r.of(AutoscaleMetric::PacketsPerSecond), 50.0);
        // Older samples were forgotten (kept 15 s): a 60 s window spans what is left.
        assert_eq!(
            samples.vip("web", Duration::from_secs(60)).unwrap().packets,
            50.0
        );
        assert!(samples.vip("other", Duration::from_secs(10)).is_none());
    }

    #[test]
    fn a_reset_counter_gives_no_rate() {
        let start = Instant::now();
        let mut samples = Samples::default();
        for (i, p) in [100u64, 200, 5].iter().enumerate() {
            samples.push(
                Sample {
                    at: start + Duration::from_secs(i as u64),
                    vips: [("web".to_owned(), stats(*p))].into_iter().collect(),
                    backends: BTreeMap::new(),
                },
                Duration::from_secs(60),
            );
        }
        assert!(samples.vip("web", Duration::from_secs(60)).is_none());
    }
}

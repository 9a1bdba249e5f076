//! Health verdicts: what a probe result means, the rise/fall state machine, the probe
//! duration histogram, and the timing of probes (jittered, so that many backends are not
//! probed in lock-step). Pure; the probes themselves are in `shell::probe`.

use std::{fmt, time::Duration};

use crate::config::InitialState;

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeFailure {
    /// The connection was refused (nothing listens on the port).
    Refused,
    /// No answer within the timeout.
    Timeout,
    /// HTTP status outside the expected range.
    Status(u16),
    /// Anything else: unreachable network, reset, malformed response...
    Error(String),
    /// The probe could not run for a reason of this host, not of the backend (no descriptor
    /// left, no memory, no local port): it does not count towards the verdict.
    Local(String),
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeFailure::Refused => f.write_str("connection refused"),
            ProbeFailure::Timeout => f.write_str("timeout"),
            ProbeFailure::Status(code) => write!(f, "status {code}"),
            ProbeFailure::Error(e) => f.write_str(e),
            ProbeFailure::Local(e) => write!(f, "not run on this host: {e}"),
        }
    }
}

pub type ProbeResult = Result<(), ProbeFailure>;

impl ProbeFailure {
    /// The kind of failure, a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeFailure::Refused => "refused",
            ProbeFailure::Timeout => "timeout",
            ProbeFailure::Status(_) => "status",
            ProbeFailure::Error(_) => "error",
            ProbeFailure::Local(_) => "local",
        }
    }
}

/// Upper bounds (seconds) of the probe duration histogram's buckets.
pub const PROBE_BUCKETS: [f64; 9] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5];

/// A histogram of probe durations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Count of observations at or below each bound of `PROBE_BUCKETS` (cumulative).
    pub buckets: [u64; PROBE_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (bound, bucket) in PROBE_BUCKETS.iter().zip(self.buckets.iter_mut()) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// A backend's verdict so far.
#[derive(Clone, Debug, PartialEq)]
pub struct Tracker {
    pub up: bool,
    successes: u32,
    failures: u32,
    /// The last failure, for status and logs.
    pub last_failure: Option<ProbeFailure>,
    /// Probes run so far.
    pub probes: u64,
    /// Failed probes by `ProbeFailure::kind`.
    pub failures_by_kind: std::collections::BTreeMap<&'static str, u64>,
    pub durations: Histogram,
}

/// A change of verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub up: bool,
    /// For a transition to down: the failure that made it.
    pub reason: Option<ProbeFailure>,
    /// How many probes in a row led to it.
    pub streak: u32,
}

impl Tracker {
    pub fn new(initial: InitialState) -> Tracker {
        Tracker {
            up: initial == InitialState::Up,
            successes: 0,
            failures: 0,
            last_failure: None,
            probes: 0,
            failures_by_kind: Default::default(),
            durations: Histogram::default(),
        }
    }

    /// Records a probe's result; returns the transition if this result changed the verdict:
    /// `fall` failures in a row take an up backend down, `rise` successes in a row bring a
    /// down backend up.
    pub fn record(&mut self, result: &ProbeResult, rise: u32, fall: u32) -> Option<Transition> {
        if let Err(ProbeFailure::Local(_)) = result {
            self.not_run();
            return None;
        }
        self.probes += 1;
        match result {
            Ok(()) => {
                self.successes += 1;
                self.failures = 0;
                if !self.up && self.successes >= rise {
                    self.up = true;
                    return Some(Transition {
                        up: true,
                        reason: None,
                        streak: self.successes,
                    });
                }
            }
            Err(failure) => {
                *self.failures_by_kind.entry(failure.kind()).or_default() += 1;
                self.failures += 1;
                self.successes = 0;
                self.last_failure = Some(failure.clone());
                if self.up && self.failures >= fall {
                    self.up = false;
                    return Some(Transition {
                        up: false,
                        reason: Some(failure.clone()),
                        streak: self.failures,
                    });
                }
            }
        }
        None
    }

    /// A probe that could not run: counted, and nothing else (neither streak moves).
    fn not_run(&mut self) {
        *self.failures_by_kind.entry("local").or_default() += 1;
    }
}

/// Jitter applied to every interval: +-10%.
pub const JITTER: f64 = 0.10;

/// Delay before a backend's first probe: anywhere in `[0, interval)`, so that backends
/// configured together are not probed together. `unit` is a random number in `[0, 1)`.
pub fn first_delay(interval: Duration, unit: f64) -> Duration {
    interval.mul_f64(unit.clamp(0.0, 0.999_999))
}

/// Delay between two probes: the interval +-10%. `unit` is a random number in `[0, 1)`.
pub fn next_delay(interval: Duration, unit: f64) -> Duration {
    interval.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail() -> ProbeResult {
        Err(ProbeFailure::Refused)
    }

    #[test]
    fn falls_after_fall_failures_in_a_row() {
        let mut t = Tracker::new(InitialState::Up);
        assert_eq!(t.record(&fail(), 2, 3), None);
        assert_eq!(t.record(&fail(), 2, 3), None);
        // A success in between resets the count.
        assert_eq!(t.record(&Ok(()), 2, 3), None);
        assert_eq!(t.record(&fail(), 2, 3), None);
        assert_eq!(t.record(&fail(), 2, 3), None);
        let down = t
            .record(&Err(ProbeFailure::Timeout), 2, 3)
            .expect("third failure in a row");
        assert_eq!(
            down,
            Transition {
                up: false,
                reason: Some(ProbeFailure::Timeout),
                streak: 3
            }
        );
        assert!(!t.up);
        // Further failures are no new transition: logged once per transition.
        assert_eq!(t.record(&fail(), 2, 3), None);
        assert_eq!(t.probes, 7);
    }

    #[test]
    fn rises_after_rise_successes_in_a_row() {
        let mut t = Tracker::new(InitialState::Down);
        assert!(!t.up);
        assert_eq!(t.record(&Ok(()), 2, 3), None);
        assert_eq!(t.record(&fail(), 2, 3), None, "a failure resets the count");
        assert_eq!(t.record(&Ok(()), 2, 3), None);
        assert_eq!(
            t.record(&Ok(()), 2, 3),
            Some(Transition {
                up: true,
                reason: None,
                streak: 2
            })
        );
        assert_eq!(t.record(&Ok(()), 2, 3), None);
        assert!(t.up);
    }

    #[test]
    fn probes_that_could_not_run_say_nothing_of_the_backend() {
        let local = || {
            Err(ProbeFailure::Local(
                "Too many open files (os error 24)".into(),
            ))
        };
        let mut t = Tracker::new(InitialState::Up);
        assert_eq!(t.record(&fail(), 2, 2), None);
        // Any number of them: no transition, and the failure streak is not reset either.
        for _ in 0..100 {
            assert_eq!(t.record(&local(), 2, 2), None);
        }
        assert!(t.up);
        assert!(
            t.record(&fail(), 2, 2).is_some(),
            "the second real failure in a row"
        );
        assert_eq!(t.failures_by_kind.get("local"), Some(&100));
        assert_eq!(t.probes, 2, "probes that ran");
    }

    #[test]
    fn rise_and_fall_of_one_flip_on_every_change() {
        let mut t = Tracker::new(InitialState::Up);
        assert!(t.record(&fail(), 1, 1).is_some());
        assert!(t.record(&Ok(()), 1, 1).is_some());
        assert!(t.record(&Ok(()), 1, 1).is_none());
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let interval = Duration::from_millis(1000);
        for i in 0..=1000 {
            let unit = i as f64 / 1000.0;
            let first = first_delay(interval, unit);
            assert!(first < interval, "{first:?}");
            let next = next_delay(interval, unit);
            assert!(
                next >= Duration::from_millis(900) && next <= Duration::from_millis(1100),
                "{next:?}"
            );
        }
        assert_eq!(first_delay(interval, 0.0), Duration::ZERO);
        assert_eq!(next_delay(interval, 0.5), interval);
        // Out-of-range randomness is clamped, not trusted.
        assert!(next_delay(interval, 7.0) <= Duration::from_millis(1100));
        assert!(first_delay(interval, -1.0) == Duration::ZERO);
    }
}

//! The demo's timeline: one [`Sample`] a second, printed as a line, and the checks the run
//! must pass ([`Expectations::problems`]).

use std::collections::BTreeMap;

/// One second of the run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Seconds since the load started.
    pub t: f64,
    /// New connections the client started per second, over the last second.
    pub offered: f64,
    /// `vips[].autoscale.desired_backends` of the balancer's status (`None`: not answered).
    pub balancer_desired: Option<u32>,
    /// The scaler's decision: the replicas to have.
    pub decision: u32,
    /// Replicas out of the DNS records, draining.
    pub draining: usize,
    /// Backends the balancer gives new flows (`vips[].healthy_backends`).
    pub serving: u32,
    /// Requests completed in the last second, by the backend that answered.
    pub answered: BTreeMap<String, u64>,
    /// Failed requests since the start.
    pub failures: u64,
}

pub fn header() -> String {
    format!(
        "{:>6} {:>7} {:>8} {:>7} {:>8} {:>9} {:>7}  {}",
        "t",
        "load/s",
        "desired",
        "scaler",
        "serving",
        "draining",
        "failed",
        "share of the last second's requests, by backend"
    )
}

pub fn line(s: &Sample) -> String {
    let total: u64 = s.answered.values().sum();
    let shares: Vec<String> = s
        .answered
        .iter()
        .map(|(backend, n)| {
            // The backends' names are their addresses: the last byte tells them apart.
            let short = backend.rsplit('.').next().unwrap_or(backend);
            format!(".{short} {:>3.0}%", 100.0 * *n as f64 / total.max(1) as f64)
        })
        .collect();
    format!(
        "{:>5.0}s {:>7.0} {:>8} {:>7} {:>8} {:>9} {:>7}  {}",
        s.t,
        s.offered,
        s.balancer_desired
            .map_or_else(|| "?".to_owned(), |d| d.to_string()),
        s.decision,
        s.serving,
        s.draining,
        s.failures,
        shares.join("  ")
    )
}

/// The longest stretch, in seconds, during which the backends serving were fewer than
/// `wanted` says (a stretch still open at the end counts up to the last sample).
pub fn longest_shortfall(samples: &[Sample], wanted: impl Fn(&Sample) -> Option<u32>) -> f64 {
    let mut longest = 0.0f64;
    let mut since: Option<f64> = None;
    for s in samples {
        let short = wanted(s).is_some_and(|w| s.serving < w);
        match (short, since) {
            (true, None) => since = Some(s.t),
            (false, Some(start)) => {
                longest = longest.max(s.t - start);
                since = None;
            }
            _ => {}
        }
    }
    if let (Some(start), Some(last)) = (since, samples.last()) {
        longest = longest.max(last.t - start);
    }
    longest
}

/// A desired count of a sample (the balancer's, the scaler's).
type DesiredCount = fn(&Sample) -> Option<u32>;

/// What a run must show.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Expectations {
    /// Backends the peak of the load calls for (`ceil(peak / target)`).
    pub peak_backends: u32,
    /// Backends the load at the end calls for.
    pub final_backends: u32,
    /// Seconds the serving backends may stay below the desired count: the scale-down
    /// stabilisation window plus the time a new backend takes to serve.
    pub allowance: f64,
}

impl Expectations {
    /// What is wrong with the run (nothing: it passed).
    pub fn problems(&self, samples: &[Sample]) -> Vec<String> {
        let mut problems = Vec::new();
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            return vec!["no samples".into()];
        };
        let max_serving = samples.iter().map(|s| s.serving).max().unwrap_or(0);
        let peak_load = samples.iter().map(|s| s.offered).fold(0.0, f64::max);
        // Rose with the load: to (nearly) what the peak calls for, while the load was high.
        let wanted_peak = self.peak_backends.saturating_sub(1).max(2);
        let reached = samples.iter().find(|s| s.serving == max_serving);
        if max_serving < wanted_peak || max_serving <= first.serving {
            problems.push(format!(
                "the serving backends did not rise with the load: at most {max_serving} \
                 (from {}), the peak calls for {} (at least {wanted_peak} expected)",
                first.serving, self.peak_backends
            ));
        } else if let Some(s) = reached.filter(|s| s.offered < peak_load / 2.0) {
            problems.push(format!(
                "the serving backends reached {max_serving} at {:.0}s, when the load was \
                 {:.0}/s, under half its peak ({peak_load:.0}/s)",
                s.t, s.offered
            ));
        }
        // Fell with the load: back to (nearly) what the end calls for.
        if last.serving > self.final_backends + 1 || last.serving >= max_serving {
            problems.push(format!(
                "the serving backends did not fall with the load: {} at the end (at most {} \
                 expected, {max_serving} at the peak)",
                last.serving,
                self.final_backends + 1
            ));
        }
        let wanted: [(&str, DesiredCount); 2] = [
            ("the balancer's desired count", |s| s.balancer_desired),
            ("the scaler's decision", |s| Some(s.decision)),
        ];
        for (what, f) in wanted {
            let shortfall = longest_shortfall(samples, f);
            if shortfall > self.allowance {
                problems.push(format!(
                    "the serving backends stayed below {what} for {shortfall:.0}s (allowed: \
                     {:.0}s)",
                    self.allowance
                ));
            }
        }
        if last.failures > 0 {
            problems.push(format!("{} requests failed", last.failures));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of one sample a second: (offered, balancer's desired, decision, serving,
    /// failures).
    fn run(rows: &[(f64, u32, u32, u32, u64)]) -> Vec<Sample> {
        rows.iter()
            .enumerate()
            .map(
                |(t, &(offered, desired, decision, serving, failures))| Sample {
                    t: t as f64,
                    offered,
                    balancer_desired: Some(desired),
                    decision,
                    serving,
                    failures,
                    ..Sample::default()
                },
            )
            .collect()
    }

    const EXPECT: Expectations = Expectations {
        peak_backends: 4,
        final_backends: 1,
        allowance: 3.0,
    };

    /// A good run: up to 4 behind the load by a second or two, down after the window.
    fn good() -> Vec<(f64, u32, u32, u32, u64)> {
        vec![
            (5.0, 1, 1, 1, 0),
            (30.0, 2, 2, 1, 0),
            (60.0, 3, 3, 2, 0),
            (80.0, 4, 4, 3, 0),
            (80.0, 4, 4, 4, 0),
            (40.0, 2, 4, 4, 0),
            (10.0, 1, 4, 4, 0),
            (5.0, 1, 1, 1, 0),
            (5.0, 1, 1, 1, 0),
        ]
    }

    #[test]
    fn a_good_run_passes() {
        assert_eq!(EXPECT.problems(&run(&good())), Vec::<String>::new());
    }

    #[test]
    fn each_check_can_fail() {
        let never_up: Vec<_> = good()
            .into_iter()
            .map(|(o, d, _, _, f)| (o, d, 1, 1, f))
            .collect();
        let slow_up: Vec<_> = good()
            .into_iter()
            .enumerate()
            .map(|(t, (o, d, c, s, f))| (o, d, c, if (1..6).contains(&t) { 1 } else { s }, f))
            .collect();
        let never_down: Vec<_> = good()
            .into_iter()
            .map(|(o, d, c, _, f)| (o, d, c.max(4), 4, f))
            .collect();
        let failed: Vec<_> = good()
            .into_iter()
            .map(|(o, d, c, s, _)| (o, d, c, s, 2))
            .collect();
        let early_peak: Vec<_> = vec![
            (5.0, 1, 1, 1, 0),
            (5.0, 4, 4, 4, 0),
            (80.0, 4, 4, 4, 0),
            (5.0, 1, 1, 1, 0),
        ];
        for (case, rows, complaint) in [
            ("a scaler that never scales up", never_up, "did not rise"),
            ("backends slow to serve", slow_up, "stayed below"),
            (
                "a scaler that never scales down",
                never_down,
                "did not fall",
            ),
            ("failed requests", failed, "requests failed"),
            ("a peak before the load", early_peak, "under half its peak"),
        ] {
            let problems = EXPECT.problems(&run(&rows));
            assert!(
                problems.iter().any(|p| p.contains(complaint)),
                "{case}: {problems:?}"
            );
        }
    }

    #[test]
    fn shortfall_is_the_longest_stretch_below() {
        let samples = run(&[
            (0.0, 2, 2, 1, 0),
            (0.0, 2, 2, 2, 0),
            (0.0, 3, 3, 1, 0),
            (0.0, 3, 3, 2, 0),
            (0.0, 3, 3, 2, 0),
            (0.0, 3, 3, 3, 0),
            (0.0, 4, 4, 3, 0),
        ]);
        // Seconds 2 to 5 (3 s), and an open stretch at 6 (0 s).
        assert_eq!(longest_shortfall(&samples, |s| Some(s.decision)), 3.0);
        assert_eq!(longest_shortfall(&samples, |_| None), 0.0);
    }

    #[test]
    fn the_line_shows_every_column_and_the_shares() {
        let sample = Sample {
            t: 12.0,
            offered: 38.4,
            balancer_desired: Some(2),
            decision: 3,
            draining: 1,
            serving: 2,
            answered: [("10.95.0.11".to_owned(), 30), ("10.95.0.12".to_owned(), 10)]
                .into_iter()
                .collect(),
            failures: 0,
        };
        let line = line(&sample);
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            ["12s", "38", "2", "3", "2", "1", "0", ".11", "75%", ".12", "25%"],
            "{line}"
        );
        assert_eq!(header().split_whitespace().nth(2), Some("desired"));
    }
}

//! Bounded log volume, whatever fails. Every event the core produces has a kind (health,
//! next hops, VIPs, reloads, kernel); each kind may write `BURST` lines at once and
//! `PER_MINUTE` a minute after that (a token bucket), so at most `BURST + PER_MINUTE` lines of
//! a kind in any minute. What is left out is counted by subject ("VIP big: DOWN") and written
//! as one summary line every `SUMMARY_EVERY`, naming the largest subjects. Ongoing
//! conditions (backends down or unreachable) are summarised once every `CONDITIONS_EVERY` by
//! the core. Worst case: 5 kinds x 20 + 7 summaries + 2 condition lines = 109 lines in any
//! minute after start-up (README, *Logs*).

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, Instant},
};

/// Lines of one kind written at once before the limit applies.
pub const BURST: f64 = 10.0;
/// Lines of one kind per minute after the burst.
pub const PER_MINUTE: f64 = 10.0;
/// How often what was left out is summarised.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// How often ongoing conditions are summarised while they last.
pub const CONDITIONS_EVERY: Duration = Duration::from_secs(60);
/// Subjects named per kind in a summary line.
const NAMED: usize = 5;

/// What a log line is about; each kind has its own budget, so that a storm of one (health
/// verdicts of 10,000 backends) cannot silence another (a reload's outcome).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Health,
    NextHops,
    Vips,
    Reloads,
    Kernel,
    /// Changes of discovered sets.
    Discovery,
    /// Discovery lookups that failed or came back empty.
    Lookups,
}

const KINDS: [Kind; 7] = [
    Kind::Health,
    Kind::NextHops,
    Kind::Vips,
    Kind::Reloads,
    Kind::Kernel,
    Kind::Discovery,
    Kind::Lookups,
];

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Health => "health",
            Kind::NextHops => "next hops",
            Kind::Vips => "VIPs",
            Kind::Reloads => "reloads",
            Kind::Kernel => "kernel",
            Kind::Discovery => "discovery",
            Kind::Lookups => "DNS lookups",
        }
    }
}

#[derive(Clone, Debug)]
struct Bucket {
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn take(&mut self, now: Instant) -> bool {
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * PER_MINUTE / 60.0;
            self.tokens = (self.tokens + refill).min(BURST);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The limiter: which lines are written, and the counts of the others.
#[derive(Clone, Debug)]
pub struct LogLimit {
    buckets: [Bucket; KINDS.len()],
    /// Left out since the last summary, by kind and subject.
    left_out: BTreeMap<(Kind, String), u64>,
    /// When the first line since the last summary was left out.
    since: Option<Instant>,
}

impl Default for LogLimit {
    fn default() -> Self {
        let bucket = Bucket {
            tokens: BURST,
            at: None,
        };
        LogLimit {
            buckets: std::array::from_fn(|_| bucket.clone()),
            left_out: BTreeMap::new(),
            since: None,
        }
    }
}

impl LogLimit {
    /// Whether a line of `kind` about `subject` may be written at `now`; if not, it is
    /// counted for the next summary.
    pub fn admit(&mut self, kind: Kind, subject: String, now: Instant) -> bool {
        if self.buckets[kind.index()].take(now) {
            return true;
        }
        *self.left_out.entry((kind, subject)).or_default() += 1;
        self.since.get_or_insert(now);
        false
    }

    /// When the next summary is due, if anything was left out.
    pub fn summary_due(&self) -> Option<Instant> {
        self.since.map(|since| since + SUMMARY_EVERY)
    }

    /// The summary of what was left out, once due; the counts start again.
    pub fn summary(&mut self, now: Instant) -> Option<LeftOut> {
        let since = self.since?;
        if now < since + SUMMARY_EVERY {
            return None;
        }
        self.since = None;
        let left_out = std::mem::take(&mut self.left_out);
        let mut kinds = Vec::new();
        for kind in KINDS {
            let mut subjects: Vec<(String, u64)> = left_out
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .map(|((_, s), n)| (s.clone(), *n))
                .collect();
            if subjects.is_empty() {
                continue;
            }
            // The largest first; equal counts in name order.
            subjects.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            kinds.push((kind, subjects));
        }
        Some(LeftOut {
            seconds: now.saturating_duration_since(since).as_secs(),
            kinds,
        })
    }
}

/// The summary line of what the limiter left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftOut {
    /// Over how many seconds.
    pub seconds: u64,
    /// Per kind, the subjects and their counts, largest first.
    pub kinds: Vec<(Kind, Vec<(String, u64)>)>,
}

impl fmt::Display for LeftOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: u64 = self
            .kinds
            .iter()
            .flat_map(|(_, s)| s.iter().map(|(_, n)| n))
            .sum();
        write!(
            f,
            "{} log lines left out in the last {} s (at most {} a minute of each kind; the status API has \
             every backend's state):",
            thousands(total),
            self.seconds,
            BURST + PER_MINUTE
        )?;
        for (i, (kind, subjects)) in self.kinds.iter().enumerate() {
            let sep = if i == 0 { " " } else { "; " };
            write!(f, "{sep}{}: ", kind.name())?;
            let named: Vec<String> = subjects
                .iter()
                .take(NAMED)
                .map(|(s, n)| format!("{} {s}", thousands(*n)))
                .collect();
            f.write_str(&named.join(", "))?;
            if subjects.len() > NAMED {
                write!(
                    f,
                    " and {} more",
                    thousands((subjects.len() - NAMED) as u64)
                )?;
            }
        }
        Ok(())
    }
}

/// `9998` as "9,998".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_writes_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut limit = LogLimit::default();
        let written = (0..1000)
            .filter(|_| limit.admit(Kind::Health, "VIP big: DOWN".into(), t0))
            .count();
        assert_eq!(written, BURST as usize);
        // Another kind has its own budget.
        assert!(limit.admit(Kind::Reloads, "rejected".into(), t0));
        // A minute later, PER_MINUTE more (not more than the burst).
        let t1 = t0 + Duration::from_secs(60);
        let written = (0..1000)
            .filter(|_| limit.admit(Kind::Health, "VIP big: DOWN".into(), t1))
            .count();
        assert_eq!(written, PER_MINUTE as usize);
        // Any minute: at most BURST + PER_MINUTE lines of a kind, at any pace.
        let mut limit = LogLimit::default();
        let mut times = Vec::new();
        for ms in (0..600_000u64).step_by(7) {
            let now = t0 + Duration::from_millis(ms);
            if limit.admit(Kind::Kernel, "x".into(), now) {
                times.push(ms);
            }
        }
        for (i, start) in times.iter().enumerate() {
            let in_minute = times[i..]
                .iter()
                .take_while(|t| **t < start + 60_000)
                .count();
            assert!(
                in_minute as f64 <= BURST + PER_MINUTE,
                "{in_minute} lines in a minute"
            );
        }
    }

    #[test]
    fn what_is_left_out_is_summarised_once_per_period() {
        let t0 = Instant::now();
        let mut limit = LogLimit::default();
        for i in 0..10_010u32 {
            let subject = if i % 1000 == 0 {
                "VIP web: UP"
            } else {
                "VIP big: DOWN"
            };
            limit.admit(Kind::Health, subject.into(), t0);
        }
        // The first BURST of these are written.
        for i in 0..17 {
            limit.admit(Kind::NextHops, format!("unreachable {i}"), t0);
        }
        assert_eq!(limit.summary_due(), Some(t0 + SUMMARY_EVERY));
        assert_eq!(
            limit.summary(t0 + Duration::from_secs(9)),
            None,
            "not yet due"
        );
        let summary = limit
            .summary(t0 + SUMMARY_EVERY)
            .expect("due after the period");
        assert_eq!(
            summary.to_string(),
            "10,007 log lines left out in the last 10 s (at most 20 a minute of each kind; the status \
             API has every backend's state): health: 9,990 VIP big: DOWN, 10 VIP web: UP; next hops: \
             1 unreachable 10, 1 unreachable 11, 1 unreachable 12, 1 unreachable 13, 1 unreachable 14 and 2 \
             more"
        );
        // Counts start again; nothing left out, nothing due.
        assert_eq!(limit.summary_due(), None);
        assert_eq!(limit.summary(t0 + Duration::from_secs(100)), None);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(9998), "9,998");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}

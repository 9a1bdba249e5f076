//! DNS discovery as the core sees it: when each VIP's name is resolved next, and what an
//! answer (or its absence) does to the VIP's discovered set. Pure: answers and the time come
//! in, a new set (or none) and the events to log come out; the daemon performs the lookups.
//!
//! The rules, each for a reason:
//! - records: the set becomes what they say (diffed, logged, counted); the next resolution
//!   comes after `interval`, or sooner when the records' TTL runs out first (not before
//!   `MIN_RESOLVE_GAP`: a TTL of 0 does not make a busy loop);
//! - more records than `max_backends`: refused whole, with a logged reason; the last set
//!   stays (a truncated set would silently move flows);
//! - a timeout, SERVFAIL, a refusal or any other failure: the last set stays (counted and
//!   logged; the age of the last good answer is a metric);
//! - an empty answer or NXDOMAIN: the last set stays until the emptiness has lasted
//!   `empty_grace`, then the set empties (a Service deleted for good, the app scaled to 0).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::config::{
    discover::{discovered_backend, Record},
    BackendConfig, Discover, DiscoverQuery, Vip,
};

/// The shortest time between two resolutions of one name, whatever the TTL says.
pub const MIN_RESOLVE_GAP: Duration = Duration::from_secs(1);
/// A lookup whose answer has not come back this long after its timeout is taken as lost (the
/// daemon's task bounds it by the timeout; this only guards against a lost answer).
const LOST_AFTER: Duration = Duration::from_secs(5);

/// What a lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// Records, and the smallest TTL among them.
    Records { records: Vec<Record>, ttl: Duration },
    /// The name exists without records of the type asked (`nxdomain` false), or does not
    /// exist at all.
    Empty { nxdomain: bool },
    /// No answer to go by.
    Failed { kind: FailureKind, error: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureKind {
    Timeout,
    ServFail,
    /// REFUSED or another error code.
    Refused,
    /// No server reachable, a malformed answer, a bad resolv.conf...
    Other,
}

/// How a resolution ended, as counted (`balancer_discovery_resolutions{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Records,
    Empty,
    Nxdomain,
    Timeout,
    Servfail,
    Refused,
    Error,
    /// More backends than `max_backends`: refused.
    OverCap,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Records,
        Outcome::Empty,
        Outcome::Nxdomain,
        Outcome::Timeout,
        Outcome::Servfail,
        Outcome::Refused,
        Outcome::Error,
        Outcome::OverCap,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Records => "records",
            Outcome::Empty => "empty",
            Outcome::Nxdomain => "nxdomain",
            Outcome::Timeout => "timeout",
            Outcome::Servfail => "servfail",
            Outcome::Refused => "refused",
            Outcome::Error => "error",
            Outcome::OverCap => "over_cap",
        }
    }
}

/// A lookup to perform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub vip: String,
    pub query: DiscoverQuery,
    /// The VIP's address family (A or AAAA; both for a tunnel VIP of IPv4).
    pub vip_address: IpAddr,
    pub both_families: bool,
    pub resolvers: Vec<std::net::SocketAddr>,
    pub timeout: Duration,
    /// Answers with more records than this are refused (the lookup may stop reading there).
    pub max_records: usize,
}

/// The last answer, for the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastAnswer {
    pub at: Instant,
    pub outcome: Outcome,
    /// Records in it, or what went wrong.
    pub detail: String,
}

/// One VIP's discovery.
#[derive(Clone, Debug)]
pub struct Discovery {
    pub query: DiscoverQuery,
    /// The discovered backends in force, by address.
    pub backends: std::sync::Arc<Vec<BackendConfig>>,
    /// When an answer last gave a set (or confirmed it): the age metric's start.
    pub last_good: Option<Instant>,
    pub last: Option<LastAnswer>,
    /// Since when answers have been empty.
    pub empty_since: Option<Instant>,
    pub next_due: Instant,
    /// A lookup was handed out at this time and has not come back.
    pub in_flight: Option<Instant>,
    pub outcomes: BTreeMap<Outcome, u64>,
    /// Backends added and removed by answers, and answers that changed the set.
    pub added: u64,
    pub removed: u64,
    pub changes: u64,
    /// Records that could not be backends (loopback, another family, a VIP...).
    pub rejected_records: u64,
    /// Failed lookups since the last answer.
    pub failures_in_a_row: u32,
}

impl Discovery {
    pub fn new(query: DiscoverQuery, now: Instant) -> Discovery {
        Discovery {
            query,
            backends: std::sync::Arc::default(),
            last_good: None,
            last: None,
            empty_since: None,
            next_due: now,
            in_flight: None,
            outcomes: BTreeMap::new(),
            added: 0,
            removed: 0,
            changes: 0,
            rejected_records: 0,
            failures_in_a_row: 0,
        }
    }

    /// The lookup to perform now, if one is due (and none is out).
    pub fn due(&mut self, vip: &Vip, spec: &Discover, now: Instant) -> Option<Lookup> {
        if let Some(since) = self.in_flight {
            if now < since + spec.timeout + LOST_AFTER {
                return None;
            }
        }
        if now < self.next_due {
            return None;
        }
        self.in_flight = Some(now);
        Some(Lookup {
            vip: vip.name.clone(),
            query: self.query.clone(),
            vip_address: vip.address,
            both_families: vip.forwarding == crate::config::Forwarding::Tunnel
                && vip.address.is_ipv4(),
            resolvers: spec.resolvers.clone(),
            timeout: spec.timeout,
            max_records: spec.max_backends as usize,
        })
    }

    /// When this discovery next wants the core's attention.
    pub fn wake(&self, spec: &Discover) -> Instant {
        match self.in_flight {
            Some(since) => since + spec.timeout + LOST_AFTER,
            None => self.next_due,
        }
    }
}

/// What an answer did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    /// The discovered set changed (it is the state's now).
    pub changed: bool,
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
    /// The answer was not used, and why (logged).
    pub refused: Option<String>,
    /// Records left out, and why (logged).
    pub rejected: Vec<(IpAddr, String)>,
    /// An empty answer kept the set: for how much longer.
    pub empty_kept_for: Option<Duration>,
    /// This answer started an empty episode (the answers before it had records).
    pub empty_started: bool,
    /// A lookup failed (the last set stays): the outcome and error, and how many in a row.
    pub failed: Option<(Outcome, String, u32)>,
    /// An answer came after this many failed lookups.
    pub recovered_after: Option<u32>,
}

/// Takes `resolution` for `vip` (whose discovery is `state` and `spec`; `vips`: every VIP,
/// which a backend may not be) at `now`.
pub fn answer(
    state: &mut Discovery,
    vip: &Vip,
    spec: &Discover,
    vips: &[Vip],
    resolution: Resolution,
    now: Instant,
) -> Applied {
    state.in_flight = None;
    state.next_due = now + spec.interval;
    let mut applied = Applied::default();
    let (outcome, detail) = match resolution {
        Resolution::Records { records, ttl } => {
            // Sooner when the TTL runs out first.
            state.next_due = now + spec.interval.min(ttl.max(MIN_RESOLVE_GAP));
            let (backends, rejected) = backends_of(vip, spec, vips, &records);
            state.rejected_records += rejected.len() as u64;
            applied.rejected = rejected;
            if backends.len() > spec.max_backends as usize {
                let why = format!(
                    "the answer has {} backends, more than max_backends = {}; the last set of {} \
                     stays",
                    backends.len(),
                    spec.max_backends,
                    state.backends.len()
                );
                applied.refused = Some(why.clone());
                (Outcome::OverCap, why)
            } else if backends.is_empty() {
                // Every record was rejected: as good as an empty answer.
                let detail = format!("{} records, none usable", records.len());
                empty(state, spec, now, &mut applied);
                (Outcome::Empty, detail)
            } else {
                state.empty_since = None;
                state.last_good = Some(now);
                let detail = format!("{} backends, TTL {}s", backends.len(), ttl.as_secs());
                replace(state, backends, &mut applied);
                (Outcome::Records, detail)
            }
        }
        Resolution::Empty { nxdomain } => {
            empty(state, spec, now, &mut applied);
            let outcome = if nxdomain {
                Outcome::Nxdomain
            } else {
                Outcome::Empty
            };
            let detail = if nxdomain {
                "NXDOMAIN: the name does not exist".to_owned()
            } else {
                "no records".to_owned()
            };
            (outcome, detail)
        }
        Resolution::Failed { kind, error } => {
            let outcome = match kind {
                FailureKind::Timeout => Outcome::Timeout,
                FailureKind::ServFail => Outcome::Servfail,
                FailureKind::Refused => Outcome::Refused,
                FailureKind::Other => Outcome::Error,
            };
            (outcome, error)
        }
    };
    *state.outcomes.entry(outcome).or_default() += 1;
    let failed = matches!(
        outcome,
        Outcome::Timeout | Outcome::Servfail | Outcome::Refused | Outcome::Error
    );
    if failed {
        state.failures_in_a_row += 1;
        applied.failed = Some((outcome, detail.clone(), state.failures_in_a_row));
    } else if state.failures_in_a_row > 0 {
        applied.recovered_after = Some(state.failures_in_a_row);
        state.failures_in_a_row = 0;
    }
    state.last = Some(LastAnswer {
        at: now,
        outcome,
        detail,
    });
    applied
}

/// An empty answer: the set stays until the emptiness has lasted the grace.
fn empty(state: &mut Discovery, spec: &Discover, now: Instant, applied: &mut Applied) {
    applied.empty_started = state.empty_since.is_none();
    let since = *state.empty_since.get_or_insert(now);
    let lasted = now.saturating_duration_since(since);
    if lasted >= spec.empty_grace || state.backends.is_empty() {
        if !state.backends.is_empty() {
            replace(state, Vec::new(), applied);
        }
        state.last_good = Some(now);
    } else {
        let left = spec.empty_grace - lasted;
        applied.empty_kept_for = Some(left);
        // Asked again in time to act when the grace ends.
        state.next_due = state.next_due.min(now + left.max(MIN_RESOLVE_GAP));
    }
}

fn replace(state: &mut Discovery, backends: Vec<BackendConfig>, applied: &mut Applied) {
    let old: BTreeSet<IpAddr> = state.backends.iter().map(|b| b.address).collect();
    let new: BTreeSet<IpAddr> = backends.iter().map(|b| b.address).collect();
    applied.added = new.difference(&old).copied().collect();
    applied.removed = old.difference(&new).copied().collect();
    if backends != *state.backends {
        state.added += applied.added.len() as u64;
        state.removed += applied.removed.len() as u64;
        state.changes += 1;
        state.backends = std::sync::Arc::new(backends);
        applied.changed = true;
    }
}

/// The backends the records make, one per address (the first record of an address wins: an
/// SRV answer may list one host twice), by address; and the records rejected.
fn backends_of(
    vip: &Vip,
    spec: &Discover,
    vips: &[Vip],
    records: &[Record],
) -> (Vec<BackendConfig>, Vec<(IpAddr, String)>) {
    let mut by_address: BTreeMap<IpAddr, BackendConfig> = BTreeMap::new();
    let mut rejected = Vec::new();
    for record in records {
        if by_address.contains_key(&record.address) {
            continue;
        }
        match discovered_backend(vip, spec, vips, record) {
            Ok(b) => {
                by_address.insert(record.address, b);
            }
            Err(why) => rejected.push((record.address, why)),
        }
    }
    (by_address.into_values().collect(), rejected)
}

/// The running config: `file` with each discovering VIP's discovered backends that the file
/// does not list itself added after its own.
pub fn effective(
    file: &crate::config::Config,
    discovered: &BTreeMap<String, Discovery>,
) -> crate::config::Config {
    let mut config = file.clone();
    for vip in &mut config.vips {
        let Some(state) = discovered.get(&vip.name) else {
            continue;
        };
        if vip.discover.is_none() {
            continue;
        }
        let listed: BTreeSet<IpAddr> = vip.backends.iter().map(|b| b.address).collect();
        vip.backends.extend(
            state
                .backends
                .iter()
                .filter(|b| !listed.contains(&b.address))
                .cloned(),
        );
    }
    config
}

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    //! The discovery state machine against scripted answers, with a fake clock.
    use std::path::Path;

    use super::*;
    use crate::config::{self, BackendSource, Config};

    const NAT: &str = r#"
[balancer]
[[vip]]
name = "web"
address = "192.0.2.1"
port = 80
protocol = "tcp"
forwarding = "nat"
health = { kind = "tcp", interval = "1s" }
backends = [{ address = "10.0.0.1", port = 9000 }]
discover = { dns = "web.test", port = 8080, interval = "5s", empty_grace = "30s", max_backends = 4 }
"#;

    fn config(text: &str) -> Config {
        config::parse(Path::new("test.toml"), text).unwrap()
    }

    fn record(last: u8) -> Record {
        Record {
            address: IpAddr::from([10, 0, 1, last]),
            port: None,
            weight: None,
        }
    }

    fn records(lasts: &[u8], ttl: u64) -> Resolution {
        Resolution::Records {
            records: lasts.iter().map(|l| record(*l)).collect(),
            ttl: Duration::from_secs(ttl),
        }
    }

    struct Script {
        config: Config,
        state: Discovery,
        t0: Instant,
    }

    impl Script {
        fn new(text: &str) -> Script {
            let config = config(text);
            let t0 = Instant::now();
            let query = config.vips[0].discover.as_ref().unwrap().query.clone();
            Script {
                state: Discovery::new(query, t0),
                config,
                t0,
            }
        }

        fn at(&self, secs: u64) -> Instant {
            self.t0 + Duration::from_secs(secs)
        }

        /// Asks (the lookup must be due) and answers at `secs`.
        fn answer(&mut self, secs: u64, resolution: Resolution) -> Applied {
            let now = self.at(secs);
            let vip = &self.config.vips[0];
            let spec = vip.discover.as_ref().unwrap();
            assert!(self.state.due(vip, spec, now).is_some(), "due at {secs}s");
            answer(
                &mut self.state,
                vip,
                spec,
                &self.config.vips,
                resolution,
                now,
            )
        }

        fn addresses(&self) -> Vec<IpAddr> {
            self.state.backends.iter().map(|b| b.address).collect()
        }

        fn next_due_secs(&self) -> f64 {
            (self.state.next_due - self.t0).as_secs_f64()
        }
    }

    fn ips(lasts: &[u8]) -> Vec<IpAddr> {
        lasts.iter().map(|l| IpAddr::from([10, 0, 1, *l])).collect()
    }

    #[test]
    fn growth_and_shrink_replace_the_set_and_say_what_changed() {
        let mut s = Script::new(NAT);
        let applied = s.answer(0, records(&[2, 1, 3], 300));
        assert_eq!(applied.added, ips(&[1, 2, 3]));
        assert!(applied.removed.is_empty());
        assert_eq!(s.addresses(), ips(&[1, 2, 3]), "sorted by address");
        // Each is a NAT backend on the discovered port, probed there, marked discovered.
        let b = &s.state.backends[0];
        assert_eq!((b.port, b.health.port, b.weight), (Some(8080), 8080, 1));
        assert_eq!(b.source, BackendSource::Discovered);
        // The interval (5 s) is shorter than the TTL (300 s).
        assert_eq!(s.next_due_secs(), 5.0);

        let applied = s.answer(5, records(&[1, 3, 4], 300));
        assert_eq!((applied.added, applied.removed), (ips(&[4]), ips(&[2])));
        assert_eq!(s.addresses(), ips(&[1, 3, 4]));
        // The same set again: no change to apply.
        let applied = s.answer(10, records(&[4, 3, 1], 300));
        assert!(!applied.changed);
        assert_eq!((s.state.added, s.state.removed, s.state.changes), (4, 1, 2));
        assert_eq!(s.state.outcomes[&Outcome::Records], 3);
    }

    #[test]
    fn the_ttl_brings_the_next_lookup_forward_never_closer_than_a_second() {
        let mut s = Script::new(NAT);
        s.answer(0, records(&[1], 2));
        assert_eq!(s.next_due_secs(), 2.0);
        s.answer(2, records(&[1], 0));
        assert_eq!(s.next_due_secs(), 3.0, "TTL 0: MIN_RESOLVE_GAP");
        s.answer(3, records(&[1], 3600));
        assert_eq!(s.next_due_secs(), 8.0, "the interval");
    }

    #[test]
    fn failures_keep_the_last_set() {
        let mut s = Script::new(NAT);
        s.answer(0, records(&[1, 2], 300));
        for (i, kind) in [
            FailureKind::Timeout,
            FailureKind::ServFail,
            FailureKind::Refused,
            FailureKind::Other,
        ]
        .into_iter()
        .enumerate()
        {
            let secs = 5 * (i as u64 + 1);
            let applied = s.answer(
                secs,
                Resolution::Failed {
                    kind,
                    error: "no".into(),
                },
            );
            assert!(!applied.changed && applied.failed.is_some());
            assert_eq!(s.addresses(), ips(&[1, 2]));
        }
        assert_eq!(s.state.failures_in_a_row, 4);
        // The age of the last good answer runs from 0 s.
        assert_eq!(s.state.last_good, Some(s.t0));
        let applied = s.answer(25, records(&[1, 2], 300));
        assert_eq!(applied.recovered_after, Some(4));
        assert_eq!(s.state.last_good, Some(s.at(25)));
        for o in [
            Outcome::Timeout,
            Outcome::Servfail,
            Outcome::Refused,
            Outcome::Error,
        ] {
            assert_eq!(s.state.outcomes[&o], 1, "{o:?}");
        }
    }

    #[test]
    fn empty_answers_and_nxdomain_empty_the_set_only_after_the_grace() {
        let mut s = Script::new(NAT);
        s.answer(0, records(&[1, 2], 300));
        let applied = s.answer(5, Resolution::Empty { nxdomain: true });
        assert_eq!(applied.empty_kept_for, Some(Duration::from_secs(30)));
        assert_eq!(s.addresses(), ips(&[1, 2]));
        // Flapping: records again end the empty episode...
        s.answer(10, records(&[1, 2], 300));
        assert_eq!(s.state.empty_since, None);
        // ...so the grace starts over with the next empty answer.
        s.answer(15, Resolution::Empty { nxdomain: false });
        let applied = s.answer(20, Resolution::Empty { nxdomain: true });
        assert_eq!(applied.empty_kept_for, Some(Duration::from_secs(25)));
        s.answer(25, Resolution::Empty { nxdomain: true });
        s.answer(30, Resolution::Empty { nxdomain: true });
        s.answer(35, Resolution::Empty { nxdomain: true });
        s.answer(40, Resolution::Empty { nxdomain: true });
        assert_eq!(s.addresses(), ips(&[1, 2]), "empty for 25 s of 30");
        // Asked again when the grace ends, not an interval later.
        assert_eq!(s.next_due_secs(), 45.0);
        let applied = s.answer(45, Resolution::Empty { nxdomain: true });
        assert_eq!(applied.removed, ips(&[1, 2]));
        assert!(s.addresses().is_empty());
        assert_eq!(s.state.outcomes[&Outcome::Nxdomain], 7);
        assert_eq!(s.state.outcomes[&Outcome::Empty], 1);
    }

    #[test]
    fn a_zero_grace_empties_at_once() {
        let mut s = Script::new(&NAT.replace("empty_grace = \"30s\"", "empty_grace = \"0s\""));
        s.answer(0, records(&[1], 300));
        let applied = s.answer(5, Resolution::Empty { nxdomain: false });
        assert_eq!(applied.removed, ips(&[1]));
    }

    #[test]
    fn an_answer_over_the_cap_is_refused_whole() {
        let mut s = Script::new(NAT);
        s.answer(0, records(&[1, 2], 300));
        let applied = s.answer(5, records(&[1, 2, 3, 4, 5], 300));
        assert!(!applied.changed);
        let why = applied.refused.expect("refused");
        assert!(
            why.contains("5 backends, more than max_backends = 4"),
            "{why}"
        );
        assert_eq!(s.addresses(), ips(&[1, 2]), "not truncated");
        assert_eq!(s.state.outcomes[&Outcome::OverCap], 1);
        // Duplicates count once: four distinct addresses fit.
        let applied = s.answer(10, records(&[1, 2, 3, 4, 4, 1], 300));
        assert_eq!(applied.added, ips(&[3, 4]));
    }

    #[test]
    fn records_that_cannot_be_backends_are_left_out_and_counted() {
        let mut s = Script::new(NAT);
        s.config.vips[0]
            .discover
            .as_mut()
            .unwrap()
            .host_addresses
            .push(("10.0.9.9".parse().unwrap(), "eth0".into()));
        let mut bad = vec![record(1)];
        for address in [
            "127.0.0.1",
            "192.0.2.1",
            "2001:db8::1",
            "0.0.0.0",
            "10.0.9.9",
        ] {
            bad.push(Record {
                address: address.parse().unwrap(),
                port: None,
                weight: None,
            });
        }
        let applied = s.answer(
            0,
            Resolution::Records {
                records: bad,
                ttl: Duration::from_secs(30),
            },
        );
        assert_eq!(applied.added, ips(&[1]));
        let why: Vec<&str> = applied.rejected.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(why.len(), 5);
        assert!(why[1].contains("VIP \"web\""), "{why:?}");
        assert!(why[2].contains("family"), "{why:?}");
        assert!(why[4].contains("an address of this host (eth0)"), "{why:?}");
        assert_eq!(s.state.rejected_records, 5);
        // Only unusable records: an empty answer (the set stays through the grace).
        let applied = s.answer(
            5,
            Resolution::Records {
                records: vec![Record {
                    address: "127.0.0.1".parse().unwrap(),
                    port: None,
                    weight: None,
                }],
                ttl: Duration::from_secs(30),
            },
        );
        assert!(applied.empty_kept_for.is_some());
        assert_eq!(s.addresses(), ips(&[1]));
    }

    #[test]
    fn srv_records_bring_their_port_and_weight() {
        let text = NAT
            .replace(
                "dns = \"web.test\", port = 8080,",
                "srv = \"_http._tcp.web.test\",",
            )
            .replace(
                "health = { kind = \"tcp\", interval = \"1s\" }",
                "health = { kind = \"tcp\" }",
            );
        let mut s = Script::new(&text);
        let answer = Resolution::Records {
            records: vec![
                Record {
                    address: IpAddr::from([10, 0, 1, 1]),
                    port: Some(8081),
                    weight: Some(0),
                },
                Record {
                    address: IpAddr::from([10, 0, 1, 2]),
                    port: Some(8082),
                    weight: Some(30),
                },
            ],
            ttl: Duration::from_secs(30),
        };
        s.answer(0, answer);
        let got: Vec<(Option<u16>, u16, u32)> = s
            .state
            .backends
            .iter()
            .map(|b| (b.port, b.health.port, b.weight))
            .collect();
        // Weight 0 means "rarely" in SRV, not "never".
        assert_eq!(got, [(Some(8081), 8081, 1), (Some(8082), 8082, 30)]);
    }

    #[test]
    fn one_lookup_at_a_time_and_a_lost_one_is_asked_again() {
        let mut s = Script::new(NAT);
        let vip = s.config.vips[0].clone();
        let spec = vip.discover.clone().unwrap();
        assert!(s.state.due(&vip, &spec, s.at(0)).is_some());
        assert!(s.state.due(&vip, &spec, s.at(3)).is_none(), "one out");
        // Its answer never came: asked again after the timeout and a margin.
        assert_eq!(s.state.wake(&spec), s.at(0) + spec.timeout + LOST_AFTER);
        assert!(s
            .state
            .due(&vip, &spec, s.at(0) + spec.timeout + LOST_AFTER)
            .is_some());
    }

    #[test]
    fn the_running_config_is_the_file_plus_what_was_found() {
        let mut s = Script::new(NAT);
        // 10.0.0.1 is in the file: found again, it stays the file's (port 9000).
        s.answer(
            0,
            Resolution::Records {
                records: vec![
                    Record {
                        address: IpAddr::from([10, 0, 0, 1]),
                        port: None,
                        weight: None,
                    },
                    record(7),
                ],
                ttl: Duration::from_secs(30),
            },
        );
        let found = [("web".to_owned(), s.state.clone())].into();
        let running = effective(&s.config, &found);
        let backends: Vec<(IpAddr, Option<u16>, BackendSource)> = running.vips[0]
            .backends
            .iter()
            .map(|b| (b.address, b.port, b.source.clone()))
            .collect();
        assert_eq!(
            backends,
            [
                (IpAddr::from([10, 0, 0, 1]), Some(9000), BackendSource::File),
                (
                    IpAddr::from([10, 0, 1, 7]),
                    Some(8080),
                    BackendSource::Discovered
                ),
            ]
        );
    }
}

//! Property tests of what a VIP's discovery makes of DNS answers, which come from servers the
//! balancer does not control: any sequence of answers (records good and bad, duplicates, any
//! port, weight and TTL; empty answers; failures), at any pace, leaves a set of backends that
//! obeys the rules of a backend written in the file and the cap, changes as the rules in
//! `core::discovery` say and no other way, and never asks again sooner than
//! `MIN_RESOLVE_GAP` or later than the interval.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use super::{answer, Discovery, FailureKind, Outcome, Resolution, MIN_RESOLVE_GAP};
use crate::{
    config::{discover::Record, BackendSource, Config, DiscoverQuery, Forwarding},
    property::{cases, pick},
};

type Rng = fastrand::Rng;

/// A config with a discovering VIP ("web", the second) beside another VIP.
fn gen_config(rng: &mut Rng) -> Config {
    let v6 = rng.bool();
    let (vip, other) = if v6 {
        ("2001:db8::1", "2001:db8::2")
    } else {
        ("192.0.2.1", "192.0.2.2")
    };
    let forwarding = *pick(rng, &["dsr", "tunnel", "nat"]);
    let srv = rng.bool();
    let mut discover = vec![
        if srv {
            "srv = \"_http._tcp.web.test\"".to_owned()
        } else {
            "dns = \"web.test\"".to_owned()
        },
        format!(
            "interval = \"{}\", timeout = \"500ms\"",
            pick(rng, &["1s", "5s", "30s"])
        ),
        format!(
            "empty_grace = \"{}\"",
            pick(rng, &["0s", "5s", "30s", "2m"])
        ),
        format!("max_backends = {}", rng.u32(1..=8)),
    ];
    if forwarding == "nat" && !srv && rng.bool() {
        discover.push("port = 8080".into());
    }
    let file_backend = if v6 { "fd00::100" } else { "10.0.0.100" };
    let backends = if rng.bool() {
        format!("{{ address = \"{file_backend}\" }}")
    } else {
        String::new()
    };
    let backend_port = if forwarding == "nat" {
        "backend_port = 9000\n"
    } else {
        ""
    };
    let text = format!(
        "[balancer]\n\
         [[vip]]\nname = \"other\"\naddress = \"{other}\"\nport = 443\nprotocol = \"tcp\"\nforwarding = \"dsr\"\n\
         [[vip]]\nname = \"web\"\naddress = \"{vip}\"\nport = 80\nprotocol = \"tcp\"\n\
         forwarding = \"{forwarding}\"\n{backend_port}health = {{ kind = \"tcp\" }}\n\
         discover = {{ {} }}\nbackends = [{backends}]\n",
        discover.join(", ")
    );
    let mut config = crate::config::parse(Path::new("discovery.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    // This host: a discovered record may not be one of its addresses.
    let spec = config.vips[1].discover.as_mut().unwrap();
    for host in ["10.0.9.9", "fd00::9:9"] {
        spec.host_addresses
            .push((host.parse().unwrap(), "eth0".into()));
    }
    config
}

/// Addresses answers may hold, each with whether it may be a backend of `config`'s "web" by
/// the documented rule: of the VIP's family (or IPv6 behind an IPv4 tunnel VIP), neither
/// unspecified, loopback, multicast nor broadcast, neither a VIP nor this host.
fn address_pool(config: &Config) -> Vec<(IpAddr, bool)> {
    let vip = &config.vips[1];
    let spec = vip.discover.as_ref().unwrap();
    let mut pool: Vec<IpAddr> = Vec::new();
    for i in 1..=6u8 {
        pool.push(Ipv4Addr::new(10, 0, 1, i).into());
        pool.push(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, u16::from(i)).into());
    }
    for odd in [
        "127.0.0.1",
        "::1",
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
        "192.0.2.1",
        "192.0.2.2",
        "2001:db8::1",
        "2001:db8::2",
        "10.0.9.9",
        "fd00::9:9",
    ] {
        pool.push(odd.parse().unwrap());
    }
    let family_ok = |a: IpAddr| {
        a.is_ipv6() == vip.address.is_ipv6()
            || (vip.forwarding == Forwarding::Tunnel && vip.address.is_ipv4())
    };
    let special = |a: IpAddr| {
        a.is_unspecified() || a.is_loopback() || a.is_multicast() || a == Ipv4Addr::BROADCAST
    };
    let taken = |a: IpAddr| {
        config.vips.iter().any(|v| v.address == a)
            || spec.host_addresses.iter().any(|(h, _)| *h == a)
    };
    pool.into_iter()
        .map(|a| (a, family_ok(a) && !special(a) && !taken(a)))
        .collect()
}

fn gen_resolution(rng: &mut Rng, pool: &[(IpAddr, bool)]) -> Resolution {
    match rng.u8(..6) {
        0 => Resolution::Empty {
            nxdomain: rng.bool(),
        },
        1 => Resolution::Failed {
            kind: *pick(
                rng,
                &[
                    FailureKind::Timeout,
                    FailureKind::ServFail,
                    FailureKind::Refused,
                    FailureKind::Other,
                ],
            ),
            error: "it failed".into(),
        },
        _ => {
            let records = (0..rng.usize(..=12))
                .map(|_| Record {
                    address: pick(rng, pool).0,
                    port: *pick(rng, &[None, Some(0), Some(1), Some(8081), Some(u16::MAX)]),
                    weight: *pick(rng, &[None, Some(0), Some(1), Some(30), Some(u16::MAX)]),
                })
                .collect();
            let ttl = *pick(rng, &[0, 1, 2, 30, 300, u64::from(u32::MAX)]);
            Resolution::Records {
                records,
                ttl: Duration::from_secs(ttl),
            }
        }
    }
}

/// The record each usable address of `records` becomes a backend by (the first usable record
/// of the address), by address; and how many records are rejected (those of an address not
/// taken yet that cannot be backends).
fn usable_records(
    config: &Config,
    pool: &[(IpAddr, bool)],
    records: &[Record],
) -> (BTreeMap<IpAddr, Record>, u64) {
    let vip = &config.vips[1];
    let spec = vip.discover.as_ref().unwrap();
    let nat_srv = vip.forwarding == Forwarding::Nat && matches!(spec.query, DiscoverQuery::Srv(_));
    let mut usable = BTreeMap::new();
    let mut rejected = 0;
    for r in records {
        if usable.contains_key(&r.address) {
            continue;
        }
        let address_ok = pool.iter().any(|(a, ok)| *a == r.address && *ok);
        let port_ok = !nat_srv || r.port.is_some_and(|p| p != 0);
        if address_ok && port_ok {
            usable.insert(r.address, r.clone());
        } else {
            rejected += 1;
        }
    }
    (usable, rejected)
}

/// Each discovered backend is what its record says under the VIP's discovery settings.
fn check_backends(config: &Config, state: &Discovery, records: &BTreeMap<IpAddr, Record>) {
    let vip = &config.vips[1];
    let spec = vip.discover.as_ref().unwrap();
    let nat = vip.forwarding == Forwarding::Nat;
    let addresses: Vec<IpAddr> = state.backends.iter().map(|b| b.address).collect();
    assert_eq!(addresses, records.keys().copied().collect::<Vec<_>>());
    for b in state.backends.iter() {
        let r = &records[&b.address];
        let port = match (&spec.query, nat) {
            (_, false) => None,
            (DiscoverQuery::Dns(_), true) => spec.port,
            (DiscoverQuery::Srv(_), true) => r.port,
        };
        assert_eq!(b.port, port, "{b:?} of {r:?}");
        assert_eq!(
            b.weight,
            r.weight.map_or(spec.weight, |w| u32::from(w).max(1))
        );
        assert_eq!((&b.source, b.drain), (&BackendSource::Discovered, false));
        let probed = port
            .or(r.port.filter(|p| *p != 0))
            .unwrap_or(spec.health.port);
        assert_eq!(
            b.health.port,
            if spec.health_port_fixed {
                spec.health.port
            } else {
                probed
            }
        );
    }
}

/// What the model keeps between answers: since when answers have been empty.
#[derive(Default)]
struct Model {
    empty_since: Option<Instant>,
    /// The records the set was made of.
    records: BTreeMap<IpAddr, Record>,
    rejected: u64,
}

/// One answer at `now`, checked against the model.
fn step(
    config: &Config,
    pool: &[(IpAddr, bool)],
    state: &mut Discovery,
    model: &mut Model,
    resolution: Resolution,
    now: Instant,
) {
    let vip = &config.vips[1];
    let spec = vip.discover.as_ref().unwrap();
    let before: BTreeSet<IpAddr> = state.backends.iter().map(|b| b.address).collect();
    let failures = state.failures_in_a_row;
    let applied = answer(state, vip, spec, &config.vips, resolution.clone(), now);
    let empty = |model: &mut Model| {
        let since = *model.empty_since.get_or_insert(now);
        if now - since >= spec.empty_grace || before.is_empty() {
            model.records.clear();
        }
    };
    match &resolution {
        Resolution::Failed { .. } => {
            assert_eq!(state.failures_in_a_row, failures + 1);
            assert!(applied.failed.is_some() && !applied.changed);
        }
        Resolution::Empty { .. } => empty(model),
        Resolution::Records { records, .. } => {
            let (usable, rejected) = usable_records(config, pool, records);
            model.rejected += rejected;
            if usable.len() > spec.max_backends as usize {
                assert!(applied.refused.is_some(), "over the cap: refused whole");
                assert_eq!(state.last.as_ref().unwrap().outcome, Outcome::OverCap);
            } else if usable.is_empty() {
                empty(model);
            } else {
                model.empty_since = None;
                model.records = usable;
            }
        }
    }
    check_backends(config, state, &model.records);
    let after: BTreeSet<IpAddr> = state.backends.iter().map(|b| b.address).collect();
    let added: Vec<IpAddr> = after.difference(&before).copied().collect();
    let removed: Vec<IpAddr> = before.difference(&after).copied().collect();
    if applied.changed {
        assert_eq!((&applied.added, &applied.removed), (&added, &removed));
    } else {
        assert!(added.is_empty() && removed.is_empty());
    }
    assert!(state.backends.len() <= spec.max_backends as usize);
    assert_eq!(state.empty_since, model.empty_since);
    // Asked again within the interval, never sooner than the gap: no busy loop.
    let wait = state.next_due - now;
    assert!(
        (MIN_RESOLVE_GAP..=spec.interval).contains(&wait),
        "{wait:?}"
    );
}

/// Any sequence of answers, at any pace, keeps the discovered set within the rules.
#[test]
fn any_answers_keep_the_discovered_set_within_the_rules() {
    for mut case in cases("any_answers_keep_the_discovered_set_within_the_rules", 256) {
        let rng = &mut case.rng;
        let config = gen_config(rng);
        let pool = address_pool(&config);
        let spec = config.vips[1].discover.clone().unwrap();
        let start = Instant::now();
        let mut state = Discovery::new(spec.query.clone(), start);
        let mut model = Model::default();
        let mut now = start;
        let steps = rng.usize(1..=16);
        for _ in 0..steps {
            let any = rng.u64(..=40_000);
            now += Duration::from_millis(*pick(rng, &[0, 1_000, any, 120_000]));
            let resolution = gen_resolution(rng, &pool);
            step(&config, &pool, &mut state, &mut model, resolution, now);
        }
        assert_eq!(state.outcomes.values().sum::<u64>(), steps as u64);
        assert_eq!(state.rejected_records, model.rejected);
    }
}

//! The core's decisions, with a fake clock and no kernel: adoption of pinned maps, reloads
//! accepted, rejected and unchanged, removal grace, all backends down, health flapping.

use std::{
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use balancer_common::{BACKEND_F_DOWN, BACKEND_F_DRAINING, BACKEND_F_VALID, NO_BACKEND};

use super::*;
use crate::{
    core::health::ProbeFailure,
    plan::{
        desired::BackendState,
        inputs::{address_bytes, NextHop},
        ops::MapOp,
    },
};

const WEB: &str = r#"
[balancer]
removal_grace = "30s"
[[vip]]
name = "web"
address = "192.0.2.1"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
health = { kind = "tcp", interval = "1s", timeout = "500ms", rise = 2, fall = 3 }
backends = [{ address = "10.0.0.1" }, { address = "10.0.0.2" }, { address = "10.0.0.3" }]
"#;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, last])
}

fn key(last: u8) -> BackendKey {
    ("web".to_owned(), ip(last))
}

/// Every 10.0.0.x resolved, on interface 2.
fn hops() -> NextHops {
    (1..=9)
        .map(|last| {
            let hop = NextHop {
                ifindex: 2,
                interface: "eth0".into(),
                src_mac: [2, 0, 0, 0, 0, 0xfe],
                dst_mac: [2, 0, 0, 0, 0, last],
                gateway: None,
                mtu: 1500,
                source: None,
            };
            (ip(last), hop)
        })
        .collect()
}

fn start_with(text: &str, adopted: Option<MapContents>, now: Instant) -> (Core, Output) {
    let path = Path::new("core.toml");
    Core::start(
        Start {
            config_path: path.to_owned(),
            config: config::parse(path, text).unwrap(),
            text: text.to_owned(),
            next_hops: hops(),
            adopted,
            keep_datapath: false,
        },
        now,
    )
    .unwrap()
}

fn reload(core: &mut Core, text: &str, now: Instant) -> Output {
    core.handle(
        Input::Reload {
            read: ReadConfig::new(Path::new("core.toml"), text.to_owned()),
            next_hops: hops(),
            only_if_changed: false,
        },
        now,
    )
}

fn state_of(core: &Core, last: u8) -> BackendState {
    core.desired().vips[0]
        .backends
        .iter()
        .find(|b| b.address == ip(last))
        .unwrap_or_else(|| panic!("10.0.0.{last} is not in the maps"))
        .state
}

fn slots_of(core: &Core, last: u8) -> u32 {
    let id = core.ids.backend(&key(last)).unwrap();
    core.desired().vips[0]
        .table
        .iter()
        .filter(|&&slot| slot == id)
        .count() as u32
}

fn probe(core: &mut Core, last: u8, ok: bool, now: Instant) -> Output {
    let result = if ok {
        Ok(())
    } else {
        Err(ProbeFailure::Refused)
    };
    core.handle(
        Input::Probe {
            key: key(last),
            result,
            seconds: 0.001,
        },
        now,
    )
}

#[test]
fn start_plans_every_entry_and_the_checks() {
    let (core, out) = start_with(WEB, None, Instant::now());
    let plan = out.plan.expect("a first plan");
    let sets = |f: fn(&MapOp) -> bool| plan.ops.iter().filter(|op| f(op)).count();
    assert_eq!(sets(|op| matches!(op, MapOp::SetBackend(..))), 3);
    assert_eq!(sets(|op| matches!(op, MapOp::SwapTable { .. })), 1);
    assert_eq!(
        sets(|op| matches!(op, MapOp::SetVipKey(..))),
        2,
        "the VIP and its address"
    );
    assert_eq!(plan.ops.first(), Some(&MapOp::ZeroBackendStats(0)));
    assert_eq!(out.checks.expect("checks").len(), 3);
    assert_eq!(core.generation(), 1);
    assert_eq!(core.desired().vips[0].healthy(), 3);
}

#[test]
fn reload_accepted_rejected_and_unchanged() {
    let now = Instant::now();
    let (mut core, _) = start_with(WEB, None, now);

    // Accepted: a weight changes; the plan rewrites the table, not the backends.
    let heavier = WEB.replace(
        "{ address = \"10.0.0.1\" }",
        "{ address = \"10.0.0.1\", weight = 3 }",
    );
    let out = reload(&mut core, &heavier, now);
    assert_eq!(
        out.reload,
        Some(ReloadOutcome::Accepted {
            generation: 2,
            changes: vec!["VIP web: 10.0.0.1 weight 1->3".into()]
        })
    );
    let plan = out.plan.expect("the table changes");
    assert!(
        plan.ops
            .iter()
            .all(|op| matches!(op, MapOp::SwapTable { .. })),
        "{plan:?}"
    );
    assert!(out.checks.is_none(), "the checks did not change");
    assert!(slots_of(&core, 1) > 2 * slots_of(&core, 2));

    // Rejected with file:line:col; nothing changes.
    let broken = heavier.replace("weight = 3", "weight = \"heavy\"");
    let out = reload(&mut core, &broken, now);
    match &out.reload {
        Some(ReloadOutcome::Rejected { error }) => {
            assert!(
                error.starts_with("core.toml:12:46: invalid type"),
                "{error}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(out.plan.is_none());
    assert!(matches!(out.events[..], [Event::ReloadRejected { .. }]));
    assert_eq!(core.generation(), 2);
    assert_eq!(core.reloads.rejected, 1);
}

#[test]
fn reload_refused_for_a_restart_setting_and_unchanged_text() {
    let now = Instant::now();
    let (mut core, _) = start_with(WEB, None, now);
    let heavier = WEB.replace(
        "{ address = \"10.0.0.1\" }",
        "{ address = \"10.0.0.1\", weight = 3 }",
    );
    reload(&mut core, &heavier, now);
    let broken = heavier.replace("weight = 3", "weight = \"heavy\"");
    reload(&mut core, &broken, now);

    // A setting only a restart can change: rejected too.
    let seeded = heavier.replace("[balancer]\n", "[balancer]\nhash_seed = 9\n");
    let out = reload(&mut core, &seeded, now);
    assert!(
        matches!(&out.reload, Some(ReloadOutcome::Rejected { error }) if error.contains("hash_seed needs a restart")),
        "{:?}",
        out.reload
    );

    // The same text from a file watcher: no reload at all.
    let out = core.handle(
        Input::Reload {
            read: ReadConfig::new(Path::new("core.toml"), heavier.clone()),
            next_hops: hops(),
            only_if_changed: true,
        },
        now,
    );
    assert_eq!(out.reload, Some(ReloadOutcome::Unchanged { generation: 2 }));
    assert_eq!(core.generation(), 2);

    // Asked for explicitly, an unchanged config is accepted with no changes and no plan.
    let out = reload(&mut core, &heavier, now);
    assert_eq!(out.reload, Some(ReloadOutcome::Unchanged { generation: 3 }));
    assert!(out.plan.is_none());
    assert_eq!(core.reloads.accepted, 2);

    // An invalid file left in place is rejected once, not at every look at it; asked for
    // explicitly, it is judged again.
    let watched = |core: &mut Core, text: &str| {
        let input = Input::Reload {
            read: ReadConfig::new(Path::new("core.toml"), text.to_owned()),
            next_hops: hops(),
            only_if_changed: true,
        };
        core.handle(input, now).reload
    };
    assert!(matches!(
        watched(&mut core, &broken),
        Some(ReloadOutcome::Rejected { .. })
    ));
    assert!(matches!(
        watched(&mut core, &broken),
        Some(ReloadOutcome::Unchanged { .. })
    ));
    assert!(matches!(
        reload(&mut core, &broken, now).reload,
        Some(ReloadOutcome::Rejected { .. })
    ));
    assert_eq!(core.reloads.rejected, 4);
    // Put back as it runs: nothing to reload.
    assert_eq!(
        watched(&mut core, &heavier),
        Some(ReloadOutcome::Unchanged { generation: 3 })
    );
    assert_eq!(core.generation(), 3);
}

#[test]
fn removed_backends_retire_after_removal_grace() {
    let start = Instant::now();
    let (mut core, _) = start_with(WEB, None, start);
    let id = core.ids.backend(&key(2)).unwrap();
    let without = WEB.replace(", { address = \"10.0.0.2\" }", "");
    let out = reload(&mut core, &without, start);
    assert!(matches!(out.reload, Some(ReloadOutcome::Accepted { .. })));
    // Still in the maps, draining: keeps its flows, no new ones, same id, no health check.
    assert_eq!(state_of(&core, 2), BackendState::Removed);
    assert_eq!(slots_of(&core, 2), 0);
    assert_eq!(core.ids.backend(&key(2)), Some(id));
    assert_eq!(
        core.desired().maps.backends[&id].flags,
        BACKEND_F_VALID | BACKEND_F_DRAINING
    );
    assert!(!out.checks.expect("one check fewer").contains_key(&key(2)));

    // Nothing happens before the grace period ends.
    let out = core.handle(Input::Tick, start + Duration::from_secs(29));
    assert!(out.plan.is_none() && out.events.is_empty());
    // Then the backend leaves the maps.
    let out = core.handle(Input::Tick, start + Duration::from_secs(30));
    assert_eq!(out.events, [Event::RemovalGraceOver { key: key(2) }]);
    assert_eq!(out.plan.expect("cleared").ops, [MapOp::ClearBackend(id)]);
    assert!(core.desired().vips[0]
        .backends
        .iter()
        .all(|b| b.address != ip(2)));

    // A backend added back within its grace period keeps its id and its flows.
    let out = reload(
        &mut core,
        &without.replace("{ address = \"10.0.0.3\" }", ""),
        start,
    );
    assert!(matches!(out.reload, Some(ReloadOutcome::Accepted { .. })));
    let three = core.ids.backend(&key(3)).unwrap();
    reload(&mut core, &without, start + Duration::from_secs(10));
    assert_eq!(core.ids.backend(&key(3)), Some(three));
    assert_eq!(state_of(&core, 3), BackendState::Active);
    let out = core.handle(Input::Tick, start + Duration::from_secs(60));
    assert!(out.events.is_empty(), "{:?}", out.events);
}

/// Takes every backend of "web" down: `fall` failed probes each.
fn all_down(core: &mut Core, now: Instant) -> Vec<Event> {
    let mut events = Vec::new();
    for last in 1..=3 {
        for _ in 0..3 {
            events.extend(probe(core, last, false, now).events);
        }
    }
    events
}

#[test]
fn all_backends_down_fail_open() {
    let now = Instant::now();
    let (mut core, _) = start_with(WEB, None, now);
    let events = all_down(&mut core, now);
    let all_down: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::AllDown { .. }))
        .collect();
    assert_eq!(
        all_down,
        [&Event::AllDown {
            vip: "web".into(),
            down: 3,
            fail_open: true
        }],
        "logged once per episode"
    );
    let vip = &core.desired().vips[0];
    assert!(vip.fail_open && vip.all_down());
    // Failing open: the table spreads over the down backends, whose flows stay.
    assert!(vip.table.iter().all(|&id| id != NO_BACKEND));
    assert!(core
        .desired()
        .maps
        .backends
        .values()
        .all(|b| b.flags == BACKEND_F_VALID));
    let snapshot = core.snapshot();
    assert_eq!(snapshot.vips[0].all_down.episodes, 1);
    assert!(snapshot.vips[0].all_down.active);

    // One backend back (rise 2): healthy backends only again.
    probe(&mut core, 2, true, now);
    let out = probe(&mut core, 2, true, now);
    assert!(
        out.events.contains(&Event::Recovered { vip: "web".into() }),
        "{:?}",
        out.events
    );
    let two = core.ids.backend(&key(2)).unwrap();
    assert!(core.desired().vips[0].table.iter().all(|&id| id == two));
    assert_eq!(
        core.desired().maps.backends[&core.ids.backend(&key(1)).unwrap()].flags,
        BACKEND_F_VALID | BACKEND_F_DOWN
    );
    assert!(!core.snapshot().vips[0].all_down.active);
}

#[test]
fn all_backends_down_drop() {
    let now = Instant::now();
    let text = WEB.replace(
        "table_size = 251\n",
        "table_size = 251\nwhen_all_down = \"drop\"\n",
    );
    let (mut core, _) = start_with(&text, None, now);
    let events = all_down(&mut core, now);
    assert!(events.contains(&Event::AllDown {
        vip: "web".into(),
        down: 3,
        fail_open: false
    }));
    let vip = &core.desired().vips[0];
    assert!(!vip.fail_open);
    assert!(
        vip.table.iter().all(|&id| id == NO_BACKEND),
        "an empty table drops"
    );
    assert!(core
        .desired()
        .maps
        .backends
        .values()
        .all(|b| b.flags == BACKEND_F_VALID | BACKEND_F_DOWN));
}

#[test]
fn health_flapping_follows_rise_and_fall_against_a_fake_clock() {
    let start = Instant::now();
    let (mut core, _) = start_with(WEB, None, start);
    let second = |n: u64| start + Duration::from_secs(n);
    // fail, fail, ok, fail, fail: never three in a row, never down, no plan.
    for (n, ok) in [false, false, true, false, false].into_iter().enumerate() {
        let out = probe(&mut core, 1, ok, second(n as u64));
        assert!(out.plan.is_none() && out.events.is_empty(), "probe {n}");
    }
    assert_eq!(state_of(&core, 1), BackendState::Active);
    // The third failure in a row: down, logged once, its slots move.
    let out = probe(&mut core, 1, false, second(5));
    assert!(matches!(
        &out.events[..],
        [Event::BackendDown {
            streak: 3,
            reason: Some(ProbeFailure::Refused),
            ..
        }]
    ));
    assert!(out.plan.is_some());
    assert_eq!(
        (state_of(&core, 1), slots_of(&core, 1)),
        (BackendState::Down, 0)
    );
    let out = probe(&mut core, 1, false, second(6));
    assert!(
        out.events.is_empty() && out.plan.is_none(),
        "no second DOWN"
    );
    // Flapping back: ok, fail resets the rise count; ok, ok brings it up.
    for (n, ok) in [true, false, true].into_iter().enumerate() {
        let out = probe(&mut core, 1, ok, second(7 + n as u64));
        assert!(out.events.is_empty(), "probe {}", 7 + n);
    }
    let out = probe(&mut core, 1, true, second(10));
    assert!(matches!(
        &out.events[..],
        [Event::BackendUp { streak: 2, .. }]
    ));
    assert_eq!(state_of(&core, 1), BackendState::Active);
    assert!(slots_of(&core, 1) > 0);
    // The tracker counted every probe and every failure by kind.
    let tracker = &core.trackers[&key(1)];
    assert_eq!(tracker.probes, 11);
    assert_eq!(tracker.failures_by_kind["refused"], 7);
    assert_eq!(tracker.durations.count, 11);
}

#[test]
fn adoption_keeps_ids_retires_unlisted_backends_and_adds_new_ones() {
    let now = Instant::now();
    // An earlier daemon ran with 10.0.0.1-3, and 10.0.0.2 was down.
    let (mut earlier, _) = start_with(WEB, None, now);
    for _ in 0..3 {
        probe(&mut earlier, 2, false, now);
    }
    let pinned = MapContents {
        tables: Default::default(),
        ..earlier.desired().maps.clone()
    };
    let ids: Vec<u32> = (1..=3)
        .map(|l| earlier.ids.backend(&key(l)).unwrap())
        .collect();

    // The new config drops 10.0.0.3 and adds 10.0.0.4.
    let text = WEB.replace("{ address = \"10.0.0.3\" }", "{ address = \"10.0.0.4\" }");
    let (core, out) = start_with(&text, Some(pinned), now);
    assert_eq!(
        core.adopted(),
        Some("1 of 1 pinned VIPs and 2 of 3 backends still configured (1 kept for removal_grace)")
    );
    // Kept: same ids; the pinned verdict carries over.
    assert_eq!(core.ids.backend(&key(1)), Some(ids[0]));
    assert_eq!(core.ids.backend(&key(2)), Some(ids[1]));
    assert_eq!(state_of(&core, 2), BackendState::Down);
    // Retired: same id, draining until removal_grace ends.
    assert_eq!(core.ids.backend(&key(3)), Some(ids[2]));
    assert_eq!(state_of(&core, 3), BackendState::Removed);
    // New: an id after the highest adopted one.
    let new = core.ids.backend(&key(4)).unwrap();
    assert!(ids.iter().all(|&id| new > id), "{new} after {ids:?}");
    assert_eq!(core.ids.vip("web"), earlier.ids.vip("web"));

    // The plan writes the table (not known from pins) and the new backend; unchanged
    // entries are not rewritten, no counter of an adopted id is zeroed.
    let plan = out.plan.expect("a plan");
    assert!(plan.ops.contains(&MapOp::ZeroBackendStats(new)));
    assert!(!plan
        .ops
        .iter()
        .any(|op| matches!(op, MapOp::ZeroBackendStats(id) if ids.contains(id))));
    assert!(!plan.ops.contains(&MapOp::SetBackend(
        ids[0],
        earlier.desired().maps.backends[&ids[0]]
    )));
    assert!(plan
        .ops
        .iter()
        .any(|op| matches!(op, MapOp::SwapTable { .. })));
    assert!(!plan
        .ops
        .iter()
        .any(|op| matches!(op, MapOp::ZeroVipStats(_))));
}

#[test]
fn a_failed_plan_is_written_again_whole_at_the_next_tick() {
    let now = Instant::now();
    let (mut core, _) = start_with(WEB, None, now);
    let out = core.handle(
        Input::PlanFailed {
            error: "map BACKENDS: out of memory".into(),
        },
        now,
    );
    assert!(matches!(&out.events[..], [Event::PlanFailed { .. }]));
    let out = core.handle(Input::Tick, now);
    let ops = out.plan.expect("a rewrite").ops;
    assert_eq!(
        ops.iter()
            .filter(|op| matches!(op, MapOp::SetBackend(..)))
            .count(),
        3,
        "every backend written again"
    );
    assert!(core.handle(Input::Tick, now).plan.is_none(), "once");
}

#[test]
fn next_hop_changes_are_logged_and_planned() {
    let now = Instant::now();
    let (mut core, _) = start_with(WEB, None, now);
    let mut moved = hops();
    moved.get_mut(&ip(1)).unwrap().dst_mac = [2, 0, 0, 0, 0, 0x99];
    moved.remove(&ip(3));
    let out = core.handle(Input::NextHops(moved), now);
    assert_eq!(
        out.events,
        [
            Event::NextHopChanged {
                address: ip(1),
                mac: "02:00:00:00:00:99".into(),
                interface: "eth0".into()
            },
            Event::NoLongerResolves { address: ip(3) }
        ]
    );
    assert_eq!(state_of(&core, 3), BackendState::Unreachable);
    let id = core.ids.backend(&key(1)).unwrap();
    assert!(out
        .plan
        .unwrap()
        .ops
        .iter()
        .any(|op| matches!(op, MapOp::SetBackend(i, b) if *i == id && b.dst_mac[5] == 0x99)));
    assert_eq!(
        core.handle(Input::NextHops(core.next_hops().clone()), now)
            .plan,
        None
    );
    assert_eq!(address_bytes(ip(1)).1, 4);
}

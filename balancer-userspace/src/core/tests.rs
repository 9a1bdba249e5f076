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
    core::log_limit::SUMMARY_EVERY,
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

/// Every next hop of `hops`, as resolved again.
fn resolved(hops: &NextHops) -> Vec<(IpAddr, Result<NextHop, String>)> {
    hops.iter().map(|(a, h)| (*a, Ok(h.clone()))).collect()
}

fn start_with(text: &str, adopted: Option<MapContents>, now: Instant) -> (Core, Output) {
    let path = Path::new("core.toml");
    Core::start(
        Start {
            config_path: path.to_owned(),
            config: config::parse(path, text).unwrap(),
            text: text.to_owned(),
            next_hops: hops(),
            unreachable: Vec::new(),
            adopted,
            keep_datapath: false,
            withdrawn: false,
        },
        now,
    )
    .unwrap()
}

fn reload(core: &mut Core, text: &str, now: Instant) -> Output {
    reload_with(core, text, hops(), now)
}

/// `reload`, with these next hops known.
fn reload_with(core: &mut Core, text: &str, next_hops: NextHops, now: Instant) -> Output {
    core.handle(
        Input::Reload {
            read: Box::new(ReadConfig::new(
                Path::new("core.toml"),
                text.to_owned(),
                &config::Host::default(),
            )),
            next_hops,
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

/// A probe's result at `now`, and the tick `COALESCE` later that plans the maps with it.
fn probe(core: &mut Core, last: u8, ok: bool, now: Instant) -> Output {
    let result = if ok {
        Ok(())
    } else {
        Err(ProbeFailure::Refused)
    };
    let mut out = core.handle(
        Input::Probe {
            key: key(last),
            result,
            seconds: 0.001,
        },
        now,
    );
    assert!(
        out.plan.is_none(),
        "planned with the next tick, not at once"
    );
    let tick = core.handle(Input::Tick, now + COALESCE);
    out.events.extend(tick.events);
    out.plan = tick.plan;
    out
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
            read: Box::new(ReadConfig::new(
                Path::new("core.toml"),
                heavier.clone(),
                &config::Host::default(),
            )),
            next_hops: hops(),
            only_if_changed: true,
        },
        now,
    );
    assert_eq!(out.reload, Some(ReloadOutcome::Unchanged { generation: 2 }));
    assert_eq!(core.generation(), 2);

    // Asked for explicitly, an unchanged config is accepted with no changes, no plan and
    // no new generation; so is one whose comments and layout changed.
    let out = reload(&mut core, &heavier, now);
    assert_eq!(out.reload, Some(ReloadOutcome::Unchanged { generation: 2 }));
    assert!(out.plan.is_none());
    assert_eq!(core.reloads.accepted, 2);
    let commented = format!("# edited by hand\n{}", heavier.replace(" = ", "   =   "));
    let out = reload(&mut core, &commented, now);
    assert_eq!(out.reload, Some(ReloadOutcome::Unchanged { generation: 2 }));
    assert!(out.plan.is_none() && out.checks.is_none());
    assert_eq!(core.generation(), 2);
    reload(&mut core, &heavier, now);

    // An invalid file left in place is rejected once, not at every look at it; asked for
    // explicitly, it is judged again.
    let watched = |core: &mut Core, text: &str| {
        let input = Input::Reload {
            read: Box::new(ReadConfig::new(
                Path::new("core.toml"),
                text.to_owned(),
                &config::Host::default(),
            )),
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
        Some(ReloadOutcome::Unchanged { generation: 2 })
    );
    assert_eq!(core.generation(), 2);
}

#[test]
fn removed_backends_retire_after_removal_grace() {
    let start = Instant::now();
    let (mut core, _) = start_with(WEB, None, start);
    let id = core.ids.backend(&key(2)).unwrap();
    let without = WEB.replace(", { address = \"10.0.0.2\" }", "");
    let out = reload(&mut core, &without, start);
    assert!(matches!(out.reload, Some(ReloadOutcome::Accepted { .. })));
    // Still in the maps, draining: keeps its flows, no new ones, same id, and still checked.
    assert_eq!(state_of(&core, 2), BackendState::Removed);
    assert_eq!(slots_of(&core, 2), 0);
    assert_eq!(core.ids.backend(&key(2)), Some(id));
    assert_eq!(
        core.desired().maps.backends[&id].flags,
        BACKEND_F_VALID | BACKEND_F_DRAINING
    );
    assert!(
        out.checks.is_none(),
        "the same checks: a retiring backend is still checked"
    );
    assert!(core.checks.contains_key(&key(2)));

    // Nothing happens before the grace period ends.
    let out = core.handle(Input::Tick, start + Duration::from_secs(29));
    assert!(out.plan.is_none() && out.events.is_empty());
    // Then the backend leaves the maps, and its check stops.
    let out = core.handle(Input::Tick, start + Duration::from_secs(30));
    assert_eq!(out.events, [Event::RemovalGraceOver { key: key(2) }]);
    assert_eq!(out.plan.expect("cleared").ops, [MapOp::ClearBackend(id)]);
    assert!(!out.checks.expect("one check fewer").contains_key(&key(2)));
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
    let results = vec![
        (ip(1), Ok(moved[&ip(1)].clone())),
        (ip(3), Err("no route to 10.0.0.3".to_owned())),
    ];
    let mut out = core.handle(Input::Resolved(results), now);
    assert!(out.plan.is_none(), "planned with the next tick");
    out.plan = core.handle(Input::Tick, now + COALESCE).plan;
    assert_eq!(
        out.events,
        [
            Event::NextHopChanged {
                address: ip(1),
                mac: "02:00:00:00:00:99".into(),
                interface: "eth0".into()
            },
            Event::NoLongerResolves {
                address: ip(3),
                retiring: false
            }
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
        core.handle(Input::Resolved(resolved(core.next_hops())), now)
            .plan,
        None
    );
    assert_eq!(address_bytes(ip(1)).1, 4);
}

/// A config with VIP "web" (3 backends, as `WEB`) and VIP "big" with `n` backends in
/// 10.1.0.0/16 (health checked every second, fall 1).
fn with_big(n: usize) -> String {
    let backends: Vec<String> = (0..n)
        .map(|i| format!("{{ address = \"10.1.{}.{}\" }}", i / 250, i % 250 + 1))
        .collect();
    format!(
        "{WEB}
[[vip]]
name = \"big\"
address = \"192.0.2.2\"
port = 80
protocol = \"tcp\"
forwarding = \"dsr\"
table_size = 65537
health = {{ kind = \"tcp\", interval = \"1s\", timeout = \"500ms\", rise = 1, fall = 1 }}
backends = [{}]
",
        backends.join(", ")
    )
}

fn big_key(i: usize) -> BackendKey {
    (
        "big".to_owned(),
        IpAddr::from([10, 1, (i / 250) as u8, (i % 250 + 1) as u8]),
    )
}

/// `WEB`'s next hops and one for every backend of "big".
fn big_hops(n: usize) -> NextHops {
    let mut hops = hops();
    let template = hops[&ip(1)].clone();
    for i in 0..n {
        hops.insert(big_key(i).1, template.clone());
    }
    hops
}

fn start_big(n: usize, now: Instant) -> Core {
    let text = with_big(n);
    let path = Path::new("core.toml");
    let (core, _) = Core::start(
        Start {
            config_path: path.to_owned(),
            config: config::parse(path, &text).unwrap(),
            text,
            next_hops: big_hops(n),
            unreachable: Vec::new(),
            adopted: None,
            keep_datapath: false,
            withdrawn: false,
        },
        now,
    )
    .unwrap();
    core
}

fn fail(core: &mut Core, key: BackendKey, now: Instant) -> Output {
    let input = Input::Probe {
        key,
        result: Err(ProbeFailure::Timeout),
        seconds: 0.5,
    };
    core.handle(input, now)
}

#[test]
fn health_changes_arriving_together_are_planned_once() {
    let t0 = Instant::now();
    let mut core = start_big(100, t0);
    let web_table = core.desired().vips[0].table.clone();
    assert_eq!(core.next_wake(), None, "nothing to do");
    // 60 backends go down over 150 ms: each is logged, none is planned yet.
    for i in 0..60 {
        let out = fail(
            &mut core,
            big_key(i),
            t0 + Duration::from_millis(i as u64 * 2),
        );
        assert!(out.plan.is_none(), "backend {i} planned alone");
    }
    assert_eq!(
        core.next_wake(),
        Some(t0 + COALESCE),
        "due a coalescing interval after the first"
    );
    assert!(core
        .handle(Input::Tick, t0 + COALESCE - Duration::from_millis(1))
        .plan
        .is_none());
    let out = core.handle(Input::Tick, t0 + COALESCE);
    let plan = out.plan.expect("one plan for the burst");
    let swaps: Vec<_> = plan
        .ops
        .iter()
        .filter(|op| matches!(op, MapOp::SwapTable { .. }))
        .collect();
    assert_eq!(swaps.len(), 1, "one table swap, of VIP big only: {swaps:?}");
    let big = &core.desired().vips[1];
    assert_eq!(big.healthy(), 40);
    assert_eq!(big.backends.iter().filter(|b| b.slots > 0).count(), 40);
    // The VIP whose backends did not change kept its table as it was (not rebuilt).
    assert!(std::sync::Arc::ptr_eq(
        &core.desired().vips[0].table,
        &web_table
    ));
    // What is due next is the summary of the DOWN lines left out, nothing else.
    assert_eq!(
        core.next_wake(),
        Some(t0 + Duration::from_millis(20) + SUMMARY_EVERY)
    );
    assert!(
        core.handle(Input::Tick, t0 + COALESCE * 2).plan.is_none(),
        "once"
    );
}

#[test]
fn ten_thousand_backends_failing_write_a_bounded_log() {
    const N: usize = 10_000;
    let t0 = Instant::now();
    let mut core = start_big(N, t0);
    let mut lines: Vec<Event> = Vec::new();
    let mut plans = 0;
    // Every backend fails its probes for two minutes, each once every 10 s; a tick every
    // 100 ms, as the daemon does with `next_wake`.
    for ms in (0..=120_000u64).step_by(100) {
        let now = t0 + Duration::from_millis(ms);
        if ms % 10_000 == 0 {
            // Two of them stay up.
            for i in 2..N {
                lines.extend(fail(&mut core, big_key(i), now).events);
            }
        }
        let out = core.handle(Input::Tick, now);
        plans += usize::from(out.plan.is_some());
        lines.extend(out.events);
    }
    let down: Vec<_> = lines
        .iter()
        .filter(|e| matches!(e, Event::BackendDown { .. }))
        .collect();
    // A burst, then the rate; the rest is counted in summaries.
    assert!(down.len() <= 30, "{} DOWN lines", down.len());
    let summaries: Vec<String> = lines
        .iter()
        .filter(|e| matches!(e, Event::LeftOut(_)))
        .map(ToString::to_string)
        .collect();
    assert!(
        summaries[0].contains("health: 9,988 VIP big: DOWN"),
        "{summaries:?}"
    );
    assert!(summaries.len() <= 12, "{summaries:?}");
    let still: Vec<String> = lines
        .iter()
        .filter(|e| matches!(e, Event::Conditions(_)))
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        still, ["still: VIP big: 9,998 of 10,000 backends down, 0 unreachable"; 2],
        "once a minute while it lasts"
    );
    assert!(
        lines.len() <= 2 * 110,
        "{} lines in two minutes",
        lines.len()
    );
    // One plan for the whole storm (everything went down within one interval), then none:
    // nothing changes while they stay down.
    assert_eq!(plans, 1);
    assert_eq!(core.desired().vips[1].healthy(), 2);
}

#[test]
fn unreachable_backends_are_logged_when_they_start_and_stop() {
    let t0 = Instant::now();
    let (mut core, _) = start_with(WEB, None, t0);
    let unreachable = || vec![(ip(2), Err("no ARP/neighbour answer".to_owned()))];
    let out = core.handle(Input::Resolved(unreachable()), t0);
    assert_eq!(
        out.events,
        [Event::NoLongerResolves {
            address: ip(2),
            retiring: false
        }]
    );
    // Every refresh fails again: nothing more is said.
    for n in 1..100 {
        let out = core.handle(
            Input::Resolved(unreachable()),
            t0 + Duration::from_secs(n * 10),
        );
        assert!(out.events.is_empty(), "{:?}", out.events);
    }
    core.handle(Input::Tick, t0 + COALESCE);
    assert_eq!(state_of(&core, 2), BackendState::Unreachable);
    let out = core.handle(
        Input::Resolved(vec![(ip(2), Ok(hops()[&ip(2)].clone()))]),
        t0,
    );
    assert!(matches!(&out.events[..], [Event::NextHopChanged { .. }]));
    core.handle(Input::Tick, t0 + COALESCE);
    assert_eq!(state_of(&core, 2), BackendState::Active);
    // Answers for addresses the config no longer names are ignored.
    let stray = IpAddr::from([10, 9, 9, 9]);
    let out = core.handle(
        Input::Resolved(vec![(stray, Ok(hops()[&ip(2)].clone()))]),
        t0,
    );
    assert!(out.events.is_empty() && out.plan.is_none());
    assert!(!core.next_hops().contains_key(&stray));
    // A new backend that never resolved: logged once as unreachable.
    let added = WEB.replace(
        "\"10.0.0.3\" }]",
        "\"10.0.0.3\" }, { address = \"10.0.0.4\" }]",
    );
    let mut no_hop = hops();
    no_hop.remove(&ip(4));
    let out = reload_with(&mut core, &added, no_hop, t0);
    assert!(
        matches!(out.reload, Some(ReloadOutcome::Accepted { .. })),
        "{:?}",
        out.reload
    );
    let error = || vec![(ip(4), Err("no route to 10.0.0.4".to_owned()))];
    let out = core.handle(Input::Resolved(error()), t0);
    assert!(
        matches!(&out.events[..], [Event::Unreachable { .. }]),
        "{:?}",
        out.events
    );
    assert!(core.handle(Input::Resolved(error()), t0).events.is_empty());
    let out = core.handle(Input::Tick, t0 + CONDITIONS_EVERY);
    assert_eq!(
        out.events
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["still: VIP web: 0 of 4 backends down, 1 unreachable"]
    );
}

#[test]
fn a_new_backend_resolving_after_its_reload_joins_silently() {
    let t0 = Instant::now();
    let (mut core, _) = start_with(WEB, None, t0);
    let five = WEB.replace(
        "\"10.0.0.3\" }]",
        "\"10.0.0.3\" }, { address = \"10.0.0.4\" }, { address = \"10.0.0.5\" }]",
    );
    let mut no_hop = hops();
    no_hop.remove(&ip(5));
    reload_with(&mut core, &five, no_hop, t0);
    assert_eq!(state_of(&core, 5), BackendState::Unreachable);
    let out = core.handle(
        Input::Resolved(vec![(ip(5), Ok(hops()[&ip(5)].clone()))]),
        t0,
    );
    assert!(out.events.is_empty(), "{:?}", out.events);
    core.handle(Input::Tick, t0 + COALESCE);
    assert_eq!(state_of(&core, 5), BackendState::Active);
}

#[test]
fn probes_that_could_not_run_take_no_backend_down() {
    let t0 = Instant::now();
    let (mut core, _) = start_with(WEB, None, t0);
    for n in 0..50u64 {
        let input = Input::Probe {
            key: key(1),
            result: Err(ProbeFailure::Local(
                "Too many open files (os error 24)".into(),
            )),
            seconds: 0.0,
        };
        core.handle(input, t0 + Duration::from_millis(n));
    }
    assert_eq!(state_of(&core, 1), BackendState::Active);
    let due = core.next_wake().expect("a summary of the left-out lines");
    assert_eq!(due, t0 + Duration::from_millis(10) + SUMMARY_EVERY);
    let out = core.handle(Input::Tick, due);
    assert_eq!(
        out.events.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["40 log lines left out in the last 10 s (at most 20 a minute of each kind; the status API \
          has every backend's state): health: 40 probes not run (Too many open files (os error 24))"]
    );
}

#[test]
fn a_retiring_backend_that_fails_its_checks_is_down_and_its_flows_move() {
    let start = Instant::now();
    let (mut core, _) = start_with(WEB, None, start);
    let id = core.ids.backend(&key(2)).unwrap();
    let without = WEB.replace(", { address = \"10.0.0.2\" }", "");
    reload(&mut core, &without, start);
    assert_eq!(state_of(&core, 2), BackendState::Removed);
    // The replica is stopped after its removal: fall (3) failed probes.
    for _ in 0..3 {
        probe(&mut core, 2, false, start);
    }
    assert_eq!(state_of(&core, 2), BackendState::Down);
    // Down, not merely draining: the data plane places its remembered flows again.
    assert_eq!(
        core.desired().maps.backends[&id].flags & BACKEND_F_DOWN,
        BACKEND_F_DOWN
    );
    // Still in the maps until the grace ends (same id if it comes back).
    assert_eq!(core.ids.backend(&key(2)), Some(id));
}

#[test]
fn starting_down_is_waiting_for_the_first_checks_not_an_episode() {
    let now = Instant::now();
    let text = WEB.replace(
        "rise = 2, fall = 3 }",
        "rise = 2, fall = 3, initial = \"down\" }",
    );
    let (mut core, out) = start_with(&text, None, now);
    assert!(
        !out.events
            .iter()
            .any(|e| matches!(e, Event::AllDown { .. })),
        "{:?}",
        out.events
    );
    assert!(out.events.contains(&Event::AwaitingChecks {
        vip: "web".into(),
        backends: 3,
        fail_open: true
    }));
    assert_eq!(core.snapshot().vips[0].all_down.episodes, 0);
    // One probe each, failed: still within rise, still waiting.
    for last in 1..=3 {
        probe(&mut core, last, false, now);
    }
    let out = core.handle(Input::Tick, now);
    assert!(!out
        .events
        .iter()
        .any(|e| matches!(e, Event::AllDown { .. })));
    // A second failure each: the checks have concluded, and every backend is down.
    let mut events = Vec::new();
    for last in 1..=3 {
        events.extend(probe(&mut core, last, false, now).events);
    }
    events.extend(core.handle(Input::Tick, now).events);
    assert!(
        events.contains(&Event::AllDown {
            vip: "web".into(),
            down: 3,
            fail_open: true
        }),
        "{events:?}"
    );
    assert_eq!(core.snapshot().vips[0].all_down.episodes, 1);

    // Started down and came up as the checks passed: no all-down episode, no "recovered".
    let (mut core, _) = start_with(&text, None, now);
    let mut events = Vec::new();
    for last in 1..=3 {
        events.extend(probe(&mut core, last, true, now).events);
        events.extend(probe(&mut core, last, true, now).events);
    }
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::AllDown { .. } | Event::Recovered { .. })),
        "{events:?}"
    );
    assert_eq!(core.snapshot().vips[0].all_down.episodes, 0);
}

const DISCOVERING: &str = r#"
[balancer]
removal_grace = "30s"
[[vip]]
name = "web"
address = "192.0.2.1"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
health = { kind = "tcp", interval = "1s", timeout = "500ms", rise = 2, fall = 3, initial = "down" }
backends = [{ address = "10.0.0.1" }]
discover = { dns = "web.test", interval = "5s" }
"#;

fn discovered(core: &mut Core, lasts: &[u8], now: Instant) -> Output {
    let records = lasts
        .iter()
        .map(|l| crate::config::discover::Record {
            address: ip(*l),
            port: None,
            weight: None,
        })
        .collect();
    core.handle(
        Input::Discovered {
            vip: "web".into(),
            query: crate::config::DiscoverQuery::Dns("web.test".into()),
            resolution: crate::core::discovery::Resolution::Records {
                records,
                ttl: Duration::from_secs(60),
            },
            next_hops: Vec::new(),
        },
        now,
    )
}

#[test]
fn discovery_answers_take_the_path_of_a_reload() {
    let t0 = Instant::now();
    let (mut core, out) = start_with(DISCOVERING, None, t0);
    // Asked at once; nothing else due until the answer.
    assert_eq!(out.lookups.len(), 1);
    assert_eq!(out.lookups[0].vip, "web");
    assert!(
        core.handle(Input::Tick, t0).lookups.is_empty(),
        "one at a time"
    );

    let out = discovered(&mut core, &[3, 2], t0);
    assert!(out.plan.is_some());
    assert!(out.events.iter().any(|e| matches!(
        e,
        Event::DiscoveryChanged { added, total: 2, .. } if added == &[ip(2), ip(3)]
    )));
    // New backends enter through their checks (initial = "down"), as from the file.
    assert_eq!(state_of(&core, 2), BackendState::Down);
    let checks = out.checks.expect("checks for the new backends");
    assert!(checks.contains_key(&key(2)) && checks.contains_key(&key(3)));
    probe(&mut core, 2, true, t0);
    probe(&mut core, 2, true, t0);
    assert_eq!(state_of(&core, 2), BackendState::Active);
    assert_eq!(core.generation(), 1, "discovery is no config generation");

    // 2 vanishes: it retires through the grace, checked, keeping its flows.
    let t1 = t0 + Duration::from_secs(5);
    let out = discovered(&mut core, &[3], t1);
    assert!(out.events.iter().any(|e| matches!(
        e,
        Event::DiscoveryChanged { removed, .. } if removed == &[ip(2)]
    )));
    assert_eq!(state_of(&core, 2), BackendState::Removed);
    assert!(core.checks.contains_key(&key(2)));
    // A reload of the file keeps what was discovered.
    let heavier = DISCOVERING.replace(
        "{ address = \"10.0.0.1\" }",
        "{ address = \"10.0.0.1\", weight = 2 }",
    );
    let out = reload(&mut core, &heavier, t1);
    assert!(matches!(out.reload, Some(ReloadOutcome::Accepted { .. })));
    assert_eq!(
        state_of(&core, 3),
        BackendState::Down,
        "still there, still waiting for checks"
    );
    assert_eq!(state_of(&core, 2), BackendState::Removed);
    // Removing `discover` from the file retires the discovered backends.
    let without = heavier.replace("discover = { dns = \"web.test\", interval = \"5s\" }\n", "");
    reload(&mut core, &without, t1);
    // (It never passed its checks: a retiring backend that is down stays down.)
    assert_eq!(state_of(&core, 3), BackendState::Down);
    assert!(!core.config().vips[0]
        .backends
        .iter()
        .any(|b| b.address == ip(3)));
    // An answer for a name no longer asked is ignored.
    let out = discovered(&mut core, &[4], t1);
    assert!(out.plan.is_none() && out.events.is_empty());
    // The snapshot says where each backend comes from.
    let snapshot = core.snapshot();
    let sources: Vec<&str> = snapshot.vips[0]
        .backends
        .iter()
        .map(|b| b.source.as_str())
        .collect();
    assert_eq!(sources, ["file", "removed", "removed"]);
}

#[test]
fn a_retiring_backend_that_stops_resolving_is_no_warning() {
    let t0 = Instant::now();
    let (mut core, _) = start_with(WEB, None, t0);
    let without = WEB.replace(", { address = \"10.0.0.2\" }", "");
    reload(&mut core, &without, t0);
    let gone = vec![(ip(2), Err("no ARP answer".to_owned()))];
    let out = core.handle(Input::Resolved(gone), t0);
    let event = Event::NoLongerResolves {
        address: ip(2),
        retiring: true,
    };
    assert_eq!(out.events, std::slice::from_ref(&event));
    assert_eq!(event.level(), crate::core::events::Level::Info);
    assert!(
        event.to_string().contains("removed backend 10.0.0.2"),
        "{event}"
    );
    // A listed backend that stops resolving is one.
    let gone = vec![(ip(1), Err("no ARP answer".to_owned()))];
    let out = core.handle(Input::Resolved(gone), t0);
    let event = &out.events[0];
    assert_eq!(event.level(), crate::core::events::Level::Warn, "{event}");
}

#[test]
fn a_restart_over_a_kept_data_plane_keeps_the_discovered_backends_until_the_first_answer() {
    let t0 = Instant::now();
    let (mut before, _) = start_with(DISCOVERING, None, t0);
    discovered(&mut before, &[2, 3], t0);
    let pinned = before.desired().maps.clone();
    let ids: Vec<Option<u32>> = [2, 3]
        .iter()
        .map(|l| before.ids.backend(&key(*l)))
        .collect();

    let (after, out) = start_with(DISCOVERING, Some(pinned), t0);
    // Not retiring: taken as discovered, with their ids, in the first plan's table.
    let sources: Vec<(IpAddr, crate::config::BackendSource)> = after.config().vips[0]
        .backends
        .iter()
        .map(|b| (b.address, b.source.clone()))
        .collect();
    assert_eq!(
        sources,
        [
            (ip(1), crate::config::BackendSource::File),
            (ip(2), crate::config::BackendSource::Discovered),
            (ip(3), crate::config::BackendSource::Discovered),
        ]
    );
    assert!(after.retiring.is_empty());
    let after_ids: Vec<Option<u32>> = [2, 3].iter().map(|l| after.ids.backend(&key(*l))).collect();
    assert_eq!(after_ids, ids);
    // And the name is asked at once.
    assert_eq!(out.lookups.len(), 1);
}

/// The fingerprint of VIP 0's table.
fn fingerprint(core: &Core) -> u64 {
    core.snapshot().vips[0].fingerprint
}

#[test]
fn the_fingerprint_is_what_the_table_means_not_its_ids() {
    let t0 = Instant::now();
    // The same backends, listed in another order: other ids, the same choices.
    let reordered = WEB.replace(
        "[{ address = \"10.0.0.1\" }, { address = \"10.0.0.2\" }, { address = \"10.0.0.3\" }]",
        "[{ address = \"10.0.0.3\" }, { address = \"10.0.0.1\" }, { address = \"10.0.0.2\" }]",
    );
    assert_ne!(reordered, WEB);
    let (a, _) = start_with(WEB, None, t0);
    let (b, _) = start_with(&reordered, None, t0);
    assert_ne!(a.ids.backend(&key(1)), b.ids.backend(&key(1)), "other ids");
    assert_eq!(fingerprint(&a), fingerprint(&b));

    // The same file reached through other reloads: 10.0.0.9 came and went (its grace over),
    // 10.0.0.1 was removed and added back after its grace: other ids again, the same table.
    let (mut c, _) = start_with(WEB, None, t0);
    let with_nine = WEB.replace(
        "{ address = \"10.0.0.3\" }]",
        "{ address = \"10.0.0.3\" }, { address = \"10.0.0.9\" }]",
    );
    reload(&mut c, &with_nine, t0);
    let without_one = WEB.replace("[{ address = \"10.0.0.1\" }, ", "[");
    reload(&mut c, &without_one, t0);
    c.handle(Input::Tick, t0 + Duration::from_secs(31));
    reload(&mut c, WEB, t0 + Duration::from_secs(31));
    assert_ne!(a.ids.backend(&key(1)), c.ids.backend(&key(1)), "other ids");
    assert_eq!(fingerprint(&a), fingerprint(&c));

    // A different set is a different fingerprint; so is another seed.
    let (d, _) = start_with(&without_one, None, t0);
    assert_ne!(fingerprint(&a), fingerprint(&d));
    let seeded = WEB.replace("[balancer]\n", "[balancer]\nhash_seed = 7\n");
    let (e, _) = start_with(&seeded, None, t0);
    assert_ne!(fingerprint(&a), fingerprint(&e));
}

/// `WEB` announcing in table 100, with a second VIP on another address.
fn announcing() -> String {
    WEB.replace("[[vip]]", "[announce]\ntable = 100\n\n[[vip]]")
        + r#"
[[vip]]
name = "dns"
address = "192.0.2.2"
port = 53
protocol = "udp"
forwarding = "dsr"
table_size = 251
when_all_down = "drop"
health = { kind = "tcp", port = 53, interval = "1s", timeout = "500ms", rise = 2, fall = 1 }
backends = [{ address = "10.0.0.5" }]
"#
}

fn addresses(list: &[&str]) -> std::collections::BTreeSet<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn servable_vips_are_announced_and_withdrawn_with_their_backends() {
    let now = Instant::now();
    let (mut core, out) = start_with(&announcing(), None, now);
    assert_eq!(
        out.routes,
        Some(addresses(&["192.0.2.1", "192.0.2.2"])),
        "both VIPs have healthy backends"
    );
    assert!(out
        .events
        .iter()
        .any(|e| matches!(e, Event::Announced { added, .. } if added.len() == 2)));

    // The one backend of "dns" fails (fall 1): it drops, so it is withdrawn.
    let key = ("dns".to_owned(), ip(5));
    core.handle(
        Input::Probe {
            key: key.clone(),
            result: Err(ProbeFailure::Refused),
            seconds: 0.001,
        },
        now,
    );
    let out = core.handle(Input::Tick, now + COALESCE);
    assert_eq!(out.routes, Some(addresses(&["192.0.2.1"])));
    let said = out.events.iter().find_map(|e| match e {
        Event::Announced { withdrawn, .. } => Some(withdrawn.clone()),
        _ => None,
    });
    assert_eq!(
        said,
        Some(vec![(
            "192.0.2.2".parse().unwrap(),
            "dns: no backend takes new flows".to_owned()
        )])
    );
    // Nothing changes: no routes written again.
    assert_eq!(core.handle(Input::Tick, now + COALESCE * 2).routes, None);

    // Every backend of "web" down: it fails open (the default), so it stays announced.
    for last in 1..=3 {
        for step in 0..3 {
            probe(&mut core, last, false, now + Duration::from_secs(step));
        }
    }
    assert!(core.desired().vips[0].fail_open);
    assert!(core.snapshot().vips[0].unannounced.is_none());
}

#[test]
fn the_operator_withdraws_and_announces_again() {
    let now = Instant::now();
    let (mut core, _) = start_with(&announcing(), None, now);
    let operator = |core: &mut Core, vip: Option<&str>, withdraw: bool| {
        let vip = vip.map(str::to_owned);
        core.handle(Input::Operator { vip, withdraw }, now)
    };
    let out = operator(&mut core, Some("web"), true);
    assert_eq!(
        out.answer,
        Some(Ok(
            "VIP \"web\" withdrawn (until `balancer announce`)".to_owned()
        ))
    );
    assert_eq!(out.routes, Some(addresses(&["192.0.2.2"])));
    assert_eq!(
        core.snapshot().vips[0].unannounced,
        Some("withdrawn by the operator")
    );
    let out = operator(&mut core, None, true);
    assert_eq!(out.routes, Some(addresses(&[])));
    let out = operator(&mut core, Some("dns"), false);
    assert!(
        matches!(&out.answer, Some(Err(e)) if e.contains("without --vip")),
        "{:?}",
        out.answer
    );
    let out = operator(&mut core, Some("nope"), true);
    assert!(
        matches!(&out.answer, Some(Err(e)) if e.contains("no VIP named \"nope\" (the config has: web, dns)"))
    );
    let out = operator(&mut core, None, false);
    assert_eq!(out.routes, Some(addresses(&["192.0.2.1", "192.0.2.2"])));

    // A withdrawn VIP that a reload removes is forgotten; re-added later, it is announced.
    operator(&mut core, Some("dns"), true);
    reload(
        &mut core,
        &announcing().replace("name = \"dns\"", "name = \"dns2\""),
        now,
    );
    assert!(core.announcement.withdrawn.is_empty());
    assert_eq!(
        core.announcement.routes,
        addresses(&["192.0.2.1", "192.0.2.2"])
    );
}

#[test]
fn without_an_announce_table_nothing_is_announced_or_withdrawn() {
    let now = Instant::now();
    let (mut core, out) = start_with(WEB, None, now);
    assert_eq!(out.routes, None);
    let out = core.handle(
        Input::Operator {
            vip: None,
            withdraw: true,
        },
        now,
    );
    assert!(matches!(&out.answer, Some(Err(e)) if e.contains("has no [announce] table")));
    assert_eq!(out.routes, None);
    assert!(core.snapshot().announce.is_none());
}

#[test]
fn a_fresh_start_with_sync_peers_announces_once_the_tables_are_copied() {
    let now = Instant::now();
    let text = announcing().replace(
        "[announce]",
        "[sync]\nlisten = \"10.0.0.100:7946\"\npeers = [\"10.0.0.101:7946\"]\nkey_file = \"/etc/balancer/sync.key\"\n\n[announce]",
    );
    let (mut core, out) = start_with(&text, None, now);
    assert_eq!(out.routes, Some(addresses(&[])), "the routes are cleared");
    assert_eq!(
        core.snapshot().vips[0].unannounced,
        Some("waiting for the peers' connection tables")
    );
    let out = core.handle(
        Input::SyncReady {
            detail: "copied".into(),
        },
        now,
    );
    assert_eq!(out.routes, Some(addresses(&["192.0.2.1", "192.0.2.2"])));
    assert!(out
        .events
        .iter()
        .any(|e| matches!(e, Event::SyncReady { .. })));

    // Adopting a data plane keeps its table: no wait.
    let adopted = {
        let (earlier, _) = start_with(&text, None, now);
        MapContents {
            tables: Default::default(),
            ..earlier.desired().maps.clone()
        }
    };
    let (_, out) = start_with(&text, Some(adopted), now);
    assert_eq!(out.routes, Some(addresses(&["192.0.2.1", "192.0.2.2"])));
}

#[test]
fn routes_that_failed_are_written_again_whole() {
    let now = Instant::now();
    let (mut core, _) = start_with(&announcing(), None, now);
    let out = core.handle(
        Input::RoutesFailed {
            error: "EPERM".into(),
        },
        now,
    );
    assert!(out
        .events
        .iter()
        .any(|e| matches!(e, Event::RoutesFailed { .. })));
    assert_eq!(out.routes, Some(addresses(&["192.0.2.1", "192.0.2.2"])));
    assert_eq!(core.handle(Input::Tick, now).routes, None);
}

//! A fleet behind ECMP, in network namespaces: a router spreading flows over two balancers
//! with a resilient nexthop group (hashing the 5-tuple with a fixed seed), four backends
//! behind them (direct server return), 200 long-lived downloads, and one balancer lost in
//! the middle of them (its daemon killed, its link down, the router's group without it).
//! Every balancer builds the same Maglev table, so the survivor sends the lost balancer's
//! flows to the backends they had: none breaks, every byte arrives.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::time::Duration;

use balancer_tests::{
    fleet::{fleet_config, FleetLab, STREAMS, STREAM_BYTES},
    http::Pattern,
    prediction::predicted_backends,
    topology::{FLEET_CLIENT_ADDR, FLEET_VIP_ADDR},
};
use serde_json::Value;

/// The VIP over the first `backends` backends, on both balancers.
fn config(backends: usize) -> String {
    fleet_config(backends, "")
}

/// Two balancers behind the router's nexthop group, running `config`.
fn lab(name: &str, config: &str) -> FleetLab {
    FleetLab::new(name, 2, false, |_, _| config.to_owned(), &[])
}

#[test]
fn a_balancer_lost_mid_transfer_loses_no_stream() {
    let mut lab = lab("ecmp", &config(4));
    lab.wait_healthy(4);
    // The same table: the same fingerprint.
    let fingerprints: Vec<Value> = (0..2)
        .map(|i| lab.status(i)["vips"][0]["table_fingerprint"].clone())
        .collect();
    assert_eq!(fingerprints[0], fingerprints[1]);
    let streams = lab.streams(30_000, STREAM_BYTES);
    // Every stream under way, then balancer 1 is lost.
    std::thread::sleep(Duration::from_millis(1500));
    let lost_flows = lab.new_flows(0);
    let kept_flows = lab.new_flows(1);
    lab.lose(0);

    let expected = Pattern::digest(STREAM_BYTES);
    let results: Vec<Result<String, String>> =
        streams.into_iter().map(|s| s.join().unwrap()).collect();
    let broken: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let wrong = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|d| *d != expected))
        .count();
    let share = lost_flows as f64 / (lost_flows + kept_flows) as f64;
    println!(
        "{STREAMS} streams; {lost_flows} had crossed the lost balancer and {kept_flows} the other \
         ({:.0}% lost); {} broken, {wrong} with a wrong digest",
        share * 100.0,
        broken.len()
    );
    assert!(broken.is_empty(), "broken streams: {broken:?}");
    assert_eq!(wrong, 0, "streams with a wrong sha256");
    // Failover was really exercised: a fair share of the streams crossed the lost one.
    assert!(
        (0.3..=0.7).contains(&share),
        "{lost_flows} of {} flows crossed the lost balancer",
        lost_flows + kept_flows
    );
    assert!(lost_flows + kept_flows >= STREAMS as u64);
    // The survivor took them: it placed the lost balancer's flows on their backends.
    assert!(
        lab.new_flows(1) > kept_flows,
        "the survivor placed no flow of the lost balancer"
    );
    lab.balancers[1].take().unwrap().stop();
}

/// Without connection-table sync, a backend added and then a balancer lost breaks the lost
/// balancer's streams whose backend the new table changes: the survivor, which never saw
/// them, places them with its new table. Which streams those are is computed from the two
/// configs with the daemon's table builder and the program's hash (`predicted_backends`);
/// how many of them crossed the lost balancer is its share of the flows. Measured: only
/// streams of the changed set break, as many as predicted within the binomial spread.
#[test]
fn a_backend_added_then_a_balancer_lost_breaks_what_the_tables_predict() {
    const FIRST_PORT: u16 = 31_000;
    let mut lab = lab("dbl", &config(3));
    lab.wait_healthy(3);
    // 8 s streams: time for the reload and its checks before the loss.
    let streams = lab.streams(FIRST_PORT, 160_000);
    std::thread::sleep(Duration::from_millis(1500));
    for i in 0..2 {
        lab.scratch
            .write_atomically(&format!("lb{}.toml", i + 1), &config(4));
    }
    lab.wait_healthy(4);
    let lost_flows = lab.new_flows(0);
    let kept_flows = lab.new_flows(1);
    lab.lose(0);
    let results: Vec<Result<String, String>> =
        streams.into_iter().map(|s| s.join().unwrap()).collect();

    let parse =
        |text: &str| balancer::config::parse(std::path::Path::new("fleet.toml"), text).unwrap();
    let before = predicted_backends(&parse(&config(3)), FLEET_CLIENT_ADDR, FLEET_VIP_ADDR);
    let after = predicted_backends(&parse(&config(4)), FLEET_CLIENT_ADDR, FLEET_VIP_ADDR);
    let changed: Vec<u16> = (0..STREAMS as u16)
        .map(|i| FIRST_PORT + i)
        .filter(|p| before(*p) != after(*p))
        .collect();
    let broken: Vec<u16> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(i, _)| FIRST_PORT + i as u16)
        .collect();
    let share = lost_flows as f64 / (lost_flows + kept_flows) as f64;
    let predicted = changed.len() as f64 * share;
    let spread = (changed.len() as f64 * share * (1.0 - share)).sqrt();
    println!(
        "{STREAMS} streams; {} move to another backend in the new table; {:.0}% crossed the lost \
         balancer; predicted {predicted:.1} broken (+-{spread:.1}), measured {}",
        changed.len(),
        share * 100.0,
        broken.len()
    );
    let outside: Vec<&u16> = broken.iter().filter(|p| !changed.contains(p)).collect();
    assert!(
        outside.is_empty(),
        "streams broke whose backend did not change: {outside:?}"
    );
    assert!(
        (broken.len() as f64 - predicted).abs() <= 4.0 * spread + 3.0,
        "measured {} broken, predicted {predicted:.1} +- {spread:.1}",
        broken.len()
    );
    assert!(
        !changed.is_empty() && !broken.is_empty(),
        "the double fault was not exercised"
    );
    lab.balancers[1].take().unwrap().stop();
}

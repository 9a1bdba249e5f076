//! Attach modes of the real binary: `auto` falls back to generic mode with a logged reason
//! where native XDP is refused (the loopback device has no native XDP), `native` refuses to
//! fall back, and a bad config or a missing interface is a clear error that attaches nothing.
//! The capabilities deploy/k8s/daemonset.yaml grants are enough, and each one is needed.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios and fixture tables read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::time::Duration;

use balancer_tests::{
    http::get_json,
    netns::{remove_stale, require_root, Netns},
    process::BalancerProcess,
    scratch::Scratch,
};

fn config(scratch: &Scratch, name: &str, mode: &str) -> std::path::PathBuf {
    let path = scratch.path(name);
    std::fs::write(
        &path,
        format!(
            "[balancer]\ninterface = \"lo\"\nxdp_mode = \"{mode}\"\nmetrics_listen = \"127.0.0.1:9100\"\n\
             pin_dir = \"{}\"\n",
            scratch.pin_dir_arg()
        ),
    )
    .unwrap();
    path
}

fn xdp_on_lo(ns: &Netns) -> String {
    String::from_utf8_lossy(&ns.ip(&["link", "show", "lo"]).stdout).into_owned()
}

#[test]
fn auto_falls_back_to_generic_and_native_does_not() {
    require_root("the attach-mode test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-attach-", std::process::id());
    let ns = Netns::create(&format!("{prefix}ns"));
    let scratch = Scratch::new("lbt-", "attach");
    let dir = scratch.path("");

    // auto on lo: generic, with the reason logged.
    let auto = config(&scratch, &format!("{prefix}auto.toml"), "auto");
    let log = dir.join(format!("{prefix}auto.log"));
    let mut balancer =
        BalancerProcess::start(&ns, &["run", "--config", auto.to_str().unwrap()], &log);
    let status = balancer.wait_ready(
        &ns,
        "127.0.0.1:9100".parse().unwrap(),
        Duration::from_secs(30),
    );
    assert_eq!(status["xdp_mode"], "generic", "{status:#}");
    assert!(xdp_on_lo(&ns).contains("xdpgeneric"), "{}", xdp_on_lo(&ns));
    assert!(
        balancer.log().contains("native XDP refused on lo"),
        "{}",
        balancer.log()
    );
    assert!(
        balancer.log().contains("no VIPs configured"),
        "{}",
        balancer.log()
    );
    // The status API works with no VIPs too.
    let again = get_json(&ns, "127.0.0.1:9100".parse().unwrap(), "/api/v1/status").unwrap();
    assert_eq!(again["vips"].as_array().map(Vec::len), Some(0));
    assert!(balancer.stop().success(), "{}", balancer.log());
    assert!(
        !xdp_on_lo(&ns).contains("xdp"),
        "left attached: {}",
        xdp_on_lo(&ns)
    );

    // native on lo: a clear error, nothing attached, non-zero exit.
    let native = config(&scratch, &format!("{prefix}native.toml"), "native");
    let log = dir.join(format!("{prefix}native.log"));
    let mut balancer =
        BalancerProcess::start(&ns, &["run", "--config", native.to_str().unwrap()], &log);
    let exit = balancer.wait_exit(Duration::from_secs(30));
    assert!(!exit.success());
    assert!(
        balancer.log().contains("attaching to lo in native mode"),
        "{}",
        balancer.log()
    );
    assert!(
        !xdp_on_lo(&ns).contains("xdp"),
        "left attached: {}",
        xdp_on_lo(&ns)
    );

    // A missing interface: named in the error.
    let log = dir.join(format!("{prefix}missing.log"));
    let mut balancer = BalancerProcess::start(
        &ns,
        &[
            "run",
            "--config",
            auto.to_str().unwrap(),
            "--interface",
            "nosuch0",
        ],
        &log,
    );
    assert!(!balancer.wait_exit(Duration::from_secs(30)).success());
    assert!(balancer.log().contains("nosuch0"), "{}", balancer.log());

    // A bad config: file:line:col, before anything touches the kernel.
    let bad = dir.join(format!("{prefix}bad.toml"));
    std::fs::write(
        &bad,
        "[balancer]\ninterface = \"lo\"\nxdp_mode = \"turbo\"\n",
    )
    .unwrap();
    let log = dir.join(format!("{prefix}bad.log"));
    let mut balancer =
        BalancerProcess::start(&ns, &["run", "--config", bad.to_str().unwrap()], &log);
    assert!(!balancer.wait_exit(Duration::from_secs(30)).success());
    assert!(
        balancer
            .log()
            .contains(&format!("{}:3:12: unknown variant `turbo`", bad.display())),
        "{}",
        balancer.log()
    );
}

/// The capabilities the DaemonSet adds (after dropping all), lower case as `setpriv` wants.
fn daemonset_capabilities() -> Vec<String> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s/daemonset.yaml");
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let caps = &doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"];
    assert_eq!(caps["drop"][0], "ALL", "{caps:?}");
    caps["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_lowercase())
        .collect()
}

/// `setpriv` keeping only `caps`: uid 0 (as in the container) without the others, so that
/// neither the process nor anything it executes can have them.
fn with_only(caps: &[String]) -> Vec<String> {
    let set: String = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "setpriv".into(),
        "--bounding-set".into(),
        set.clone(),
        "--inh-caps".into(),
        set,
    ]
}

#[test]
fn the_daemonsets_capabilities_are_enough_and_each_is_needed() {
    require_root("the capability test");
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-caps-", std::process::id());
    let ns = Netns::create(&format!("{prefix}ns"));
    let scratch = Scratch::new("lbt-", "caps");
    let dir = scratch.path("");
    let generic = config(&scratch, &format!("{prefix}generic.toml"), "generic");
    let caps = daemonset_capabilities();
    assert!(!caps.is_empty());

    // Exactly the DaemonSet's capabilities: loads, attaches, answers, detaches.
    let wrapper = with_only(&caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let log = dir.join(format!("{prefix}all.log"));
    let mut balancer = BalancerProcess::start_wrapped(
        &ns,
        &wrapper,
        &["run", "--config", generic.to_str().unwrap()],
        &log,
    );
    let status = balancer.wait_ready(
        &ns,
        "127.0.0.1:9100".parse().unwrap(),
        Duration::from_secs(30),
    );
    assert_eq!(status["xdp_mode"], "generic", "{status:#}");
    assert!(xdp_on_lo(&ns).contains("xdpgeneric"), "{}", xdp_on_lo(&ns));
    assert!(balancer.stop().success(), "{}", balancer.log());
    assert!(
        !xdp_on_lo(&ns).contains("xdp"),
        "left attached: {}",
        xdp_on_lo(&ns)
    );

    // Any one of them missing: a clear error, non-zero exit, nothing attached.
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let wrapper = with_only(&fewer);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let log = dir.join(format!("{prefix}no-{missing}.log"));
        let mut balancer = BalancerProcess::start_wrapped(
            &ns,
            &wrapper,
            &["run", "--config", generic.to_str().unwrap()],
            &log,
        );
        let exit = balancer.wait_exit(Duration::from_secs(30));
        assert!(
            !exit.success(),
            "ran without {missing}:\n{}",
            balancer.log()
        );
        let log = balancer.log();
        assert!(
            log.contains("Operation not permitted") || log.contains("Permission denied"),
            "without {missing}: {log}"
        );
        assert!(
            !xdp_on_lo(&ns).contains("xdp"),
            "left attached: {}",
            xdp_on_lo(&ns)
        );
        // A data plane that never started leaves no pins.
        assert!(
            !scratch.pin_dir().join("lo").exists(),
            "pins left after a failed start without {missing}"
        );
    }
}

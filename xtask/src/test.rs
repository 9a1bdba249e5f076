//! `cargo xtask test`: every tier, in order, with a summary. A tier that needs root and cannot
//! have it is reported as NOT RUN and makes the whole command fail: nothing passes by being
//! skipped. The one tier that can be skipped on request (`--no-vm`) is reported as SKIPPED,
//! never as passed.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::{build_balancer, cargo, cargo_of, cmd, setup};

enum Verdict {
    Passed,
    Failed(String),
    NotRun(&'static str),
    /// Left out on request.
    Skipped(&'static str),
}

struct Tier {
    name: &'static str,
    verdict: Verdict,
    took: Duration,
}

fn tier(name: &'static str, f: impl FnOnce() -> Result<()>) -> Tier {
    println!("\n==== tier: {name}");
    let started = Instant::now();
    let verdict = match f() {
        Ok(()) => Verdict::Passed,
        Err(e) => Verdict::Failed(format!("{e:#}")),
    };
    Tier {
        name,
        verdict,
        took: started.elapsed(),
    }
}

/// A tier that cannot run here (NOT RUN, which fails the command) or was left out on request.
fn not_run(name: &'static str, verdict: Verdict, why: &str) -> Tier {
    println!("\n==== tier: {name}\n!!!! {why}");
    Tier {
        name,
        verdict,
        took: Duration::ZERO,
    }
}

fn cargo_step(args: &[&str]) -> Result<()> {
    cmd::run(cargo().args(args))
}

pub fn run(no_vm: bool) -> Result<()> {
    let started = Instant::now();
    setup::prepare(setup::Purpose::Test)?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let toolchain = setup::pinned_toolchain()?;
    let mut tiers = Vec::new();

    tiers.push(tier(
        "lint (rustfmt, clippy on the userspace and the XDP program)",
        || {
            cargo_step(&["fmt", "--all", "--", "--check"])?;
            cargo_step(&[
                "clippy",
                "-p",
                "balancer-common",
                "-p",
                "balancer-userspace",
                "-p",
                "balancer-tests",
                "-p",
                "xtask",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            cmd::run(
                cargo_of(&toolchain)
                    .args([
                        "clippy",
                        "-p",
                        "balancer-ebpf",
                        "--target",
                        "bpfel-unknown-none",
                        "-Z",
                        "build-std=core",
                    ])
                    .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"]),
            )
        },
    ));

    tiers.push(tier(
        "unit (config, Maglev, planner and map plan, core decisions, API documents, hash, module layers, deploy manifests)",
        || {
            cargo_step(&[
                "test",
                "-p",
                "balancer-common",
                "-p",
                "balancer-userspace",
                "-p",
                "xtask",
            ])?;
            // Needs no root: the Kubernetes manifests against the Kubernetes schemas.
            let mut args = vec!["test", "-p", "balancer-tests"];
            for test in UNIT_TESTS {
                args.extend(["--test", test]);
            }
            cargo_step(&args)
        },
    ));

    let binary = build_balancer(false);
    if let Ok(binary) = &binary {
        // The network-namespace tests run this exact binary.
        std::env::set_var("BALANCER_BIN", binary);
    }
    if root {
        // The upgrade test swaps this build of the program in under load.
        match crate::build_upgrade_variant(&toolchain) {
            Ok(object) => std::env::set_var("BALANCER_UPGRADE_OBJECT", object),
            Err(e) => println!(
                "!!!! the upgrade variant did not build ({e:#}): the upgrade test will fail"
            ),
        }
    }
    // `after` runs after the tier's tests, even when one failed.
    let root_tier = |name: &'static str, tests: &[&'static str], after: fn() -> Result<()>| {
        if !root {
            return not_run(
                name,
                Verdict::NotRun("needs root"),
                "NOT RUN: needs root (XDP, BPF maps, network namespaces). Run `sudo cargo xtask test`.",
            );
        }
        tier(name, || {
            if let Err(e) = &binary {
                bail!("the balancer binary did not build: {e:#}");
            }
            let mut args = vec!["test", "--no-fail-fast", "-p", "balancer-tests"];
            for test in tests {
                args.extend(["--test", test]);
            }
            args.extend(["--", "--nocapture"]);
            let tests = cargo_step(&args);
            let after = after();
            tests.and(after)
        })
    };
    tiers.push(root_tier(
        "datapath fixtures (BPF_PROG_TEST_RUN on the real object)",
        DATAPATH_TESTS,
        || Ok(()),
    ));
    tiers.push(root_tier(
        "fuzz (a million generated and mutated packets per forwarding mode through the real object, judged by an oracle)",
        FUZZ_TESTS,
        || Ok(()),
    ));
    tiers.push(root_tier(
        "network namespaces (real balancer, servers, clients; the autoscale demo, short)",
        NETNS_TESTS,
        || {
            println!(
                "\n---- the autoscale demo, short profile (cargo xtask demo --autoscale --short)"
            );
            let result = crate::autoscale::run_profile(&crate::autoscale::SHORT);
            // Ctrl-C stopped the demo (which cleaned up after itself): stop the command too.
            if crate::demo::INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
                std::process::exit(130);
            }
            result
        },
    ));

    let bench_name = "benchmark smoke run (cargo xtask bench --quick; figures not judged)";
    tiers.push(if root {
        tier(bench_name, || {
            crate::bench_run(true, None, None, None).map(drop)
        })
    } else {
        not_run(
            bench_name,
            Verdict::NotRun("needs root"),
            "NOT RUN: needs root.",
        )
    });

    let vm_name =
        "VM (Debian 12's 6.1 kernel under qemu: datapath fixtures, DSR, tunnel and NAT end to end)";
    tiers.push(if no_vm {
        not_run(
            vm_name,
            Verdict::Skipped("--no-vm"),
            "SKIPPED (--no-vm): the data plane is NOT checked on Debian 12's kernel in this run",
        )
    } else if root {
        tier(vm_name, || {
            crate::vm::run_kernel(crate::vm::DEFAULT_KERNEL, &[])
        })
    } else {
        not_run(
            vm_name,
            Verdict::NotRun("needs root"),
            "NOT RUN: needs root.",
        )
    });

    println!("\n==== summary");
    let mut ok = true;
    let mut skipped = Vec::new();
    for t in &tiers {
        let (mark, detail) = match &t.verdict {
            Verdict::Passed => ("PASSED ", String::new()),
            Verdict::Skipped(why) => {
                skipped.push(t.name);
                ("SKIPPED", format!(": {why}"))
            }
            Verdict::Failed(e) => {
                ok = false;
                ("FAILED ", format!(": {e}"))
            }
            Verdict::NotRun(why) => {
                ok = false;
                ("NOT RUN", format!(": {why}"))
            }
        };
        println!(
            "  {mark} {:>6.1}s  {}{detail}",
            t.took.as_secs_f64(),
            t.name
        );
    }
    println!("  total {:.1}s", started.elapsed().as_secs_f64());
    if !ok {
        bail!("not every tier passed");
    }
    if !skipped.is_empty() {
        println!(
            "  the tiers that ran passed; NOT a full run: skipped {}",
            skipped.join(", ")
        );
    }
    Ok(())
}

/// The test targets of tests/tests/ the tiers run, tier by tier (every target must be in one:
/// see the test below).
const UNIT_TESTS: &[&str] = &["deploy_manifests"];
const DATAPATH_TESTS: &[&str] = &["datapath"];
const FUZZ_TESTS: &[&str] = &["fuzz"];
const NETNS_TESTS: &[&str] = &[
    "dsr_end_to_end",
    "attach_modes",
    "dynamic_backends",
    "tunnel_end_to_end",
    "nat_end_to_end",
    "discovery_end_to_end",
    "fleet_ecmp",
    "fleet_bgp",
    "fleet_sync",
    "flood_defence",
    "observability",
    "restarts",
    "control_plane",
    "api_limits",
    "dns_server",
];

#[cfg(test)]
mod tier_tests {
    use super::*;

    /// A test file that no tier names would never run, and nothing would say so.
    #[test]
    fn every_test_target_is_in_a_tier() {
        let dir = crate::workspace_root().join("tests/tests");
        let mut targets: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter_map(|e| {
                let path = e.path();
                let name = path.file_stem()?.to_str()?.to_owned();
                let is_target =
                    path.extension().is_some_and(|x| x == "rs") || path.join("main.rs").is_file();
                is_target.then_some(name)
            })
            .collect();
        targets.sort();
        let mut listed: Vec<&str> = [UNIT_TESTS, DATAPATH_TESTS, FUZZ_TESTS, NETNS_TESTS].concat();
        listed.sort_unstable();
        assert_eq!(
            targets,
            listed,
            "the test targets in {} and the tiers' lists",
            dir.display()
        );
    }
}

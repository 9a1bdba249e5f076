//! `cargo xtask test`: every tier, in order, with a summary. A tier that needs root and cannot
//! have it is reported as NOT RUN and makes the whole command fail: nothing passes by being
//! skipped.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::{build_balancer, cargo, cargo_of, cmd, setup};

enum Verdict {
    Passed,
    Failed(String),
    NotRun(&'static str),
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

fn cargo_step(args: &[&str]) -> Result<()> {
    cmd::run(cargo().args(args))
}

pub fn run(no_vm: bool) -> Result<()> {
    let started = Instant::now();
    setup::run()?;
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
        "unit (config, Maglev, reconciler, hash, autoscale formula, deploy manifests)",
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
            cargo_step(&["test", "-p", "balancer-tests", "--test", "deploy_manifests"])
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
    let root_tier = |name: &'static str, tests: &[&'static str]| {
        if !root {
            println!("\n==== tier: {name}\n!!!! NOT RUN: needs root (XDP, BPF maps, network namespaces). Run `sudo cargo xtask test`.");
            return Tier {
                name,
                verdict: Verdict::NotRun("needs root"),
                took: Duration::ZERO,
            };
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
            cargo_step(&args)
        })
    };
    tiers.push(root_tier(
        "datapath fixtures (BPF_PROG_TEST_RUN on the real object)",
        &["datapath"],
    ));
    tiers.push(root_tier(
        "network namespaces (real balancer, servers, clients)",
        &[
            "dsr_end_to_end",
            "attach_modes",
            "dynamic_backends",
            "tunnel_end_to_end",
            "observability",
            "restarts",
        ],
    ));

    tiers.push(if root {
        tier(
            "benchmark smoke run (cargo xtask bench --quick; figures not judged)",
            || crate::bench_run(true).map(drop),
        )
    } else {
        println!("\n==== tier: benchmark smoke run\n!!!! NOT RUN: needs root.");
        Tier {
            name: "benchmark smoke run",
            verdict: Verdict::NotRun("needs root"),
            took: Duration::ZERO,
        }
    });

    let vm_name =
        "VM (Debian 12's 6.1 kernel under qemu: datapath fixtures, DSR and tunnel end to end)";
    let mut skipped = None;
    tiers.push(if no_vm {
        println!("\n==== tier: {vm_name}\n!!!! SKIPPED (--no-vm): the data plane is NOT checked on Debian 12's kernel in this run");
        skipped = Some(vm_name);
        Tier {
            name: vm_name,
            verdict: Verdict::Passed,
            took: Duration::ZERO,
        }
    } else if root {
        tier(vm_name, || crate::vm::run_kernel(crate::vm::DEFAULT_KERNEL, &[]))
    } else {
        println!("\n==== tier: {vm_name}\n!!!! NOT RUN: needs root.");
        Tier {
            name: vm_name,
            verdict: Verdict::NotRun("needs root"),
            took: Duration::ZERO,
        }
    });

    println!("\n==== summary");
    let mut ok = true;
    for t in &tiers {
        let (mark, detail) = match &t.verdict {
            Verdict::Passed if skipped == Some(t.name) => ("SKIPPED", ": --no-vm".to_owned()),
            Verdict::Passed => ("PASSED ", String::new()),
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
    Ok(())
}

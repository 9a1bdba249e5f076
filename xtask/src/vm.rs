//! `cargo xtask vm`: the data plane on the kernels users run. A Debian kernel package is
//! fetched from the Debian archive, unpacked under target/vm/kernels, and booted with
//! virtme-ng (qemu, software emulation, this machine's root filesystem read-only); inside, as
//! root, the datapath fixtures and the end-to-end tests of each forwarding mode run on the
//! real object and the real binary. Each suite's output and exit status come back through a
//! shared directory; a VM that does not report back is a failure, never a pass.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{build_balancer, cargo, cmd, setup, workspace_root};

/// The kernel `cargo xtask test` checks: Debian 12's (the `linux-image-amd64` package).
pub const DEFAULT_KERNEL: &str = "6.1";

/// The suites run in the VM: (test binary, whether to run its ignored tests too, tests
/// skipped there).
const SUITES: &[(&str, bool, &[&str])] = &[
    // Every fixture on the real object: the verifier of this kernel, its helpers.
    ("datapath", false, &[]),
    // Direct server return end to end.
    ("dsr_end_to_end", false, &[]),
    // Tunnel mode end to end, decapsulated by `balancer decap` and by the kernel's own ipip
    // and ip6tnl devices (ignored on the development kernel, which has no ipip).
    ("tunnel_end_to_end", true, &[]),
    // NAT end to end: full NAT under load, replies on a second interface, ICMP through a
    // smaller MTU (what depends on the kernel: XDP on veth, redirects, the ICMP path). The
    // others test the daemon's logic, the same on every kernel, and cost minutes under
    // emulation.
    (
        "nat_end_to_end",
        false,
        &[
            "large_transfers",
            "destination_only",
            "two_clients",
            "a_small_port_range",
            "reloads_and_restarts",
        ],
    ),
];

/// Longest a VM may run before it is stopped and reported as hung.
const VM_TIMEOUT: Duration = Duration::from_secs(25 * 60);

fn say(message: &str) {
    println!("[vm] {message}");
}

/// The Debian package of a kernel: "6.1" is Debian 12's kernel (what `linux-image-amd64`
/// depends on), "X.Y" the newest `linux-image-X.Y...-amd64` the archive offers (through the
/// `linux-image-X.Y-amd64` meta-package, e.g. 6.12 from bookworm-backports), and a full
/// package name is taken as is.
fn kernel_package(spec: &str) -> Result<String> {
    if spec.starts_with("linux-image-") {
        return Ok(spec.to_owned());
    }
    let meta = if spec == DEFAULT_KERNEL {
        "linux-image-amd64".to_owned()
    } else {
        format!("linux-image-{spec}-amd64")
    };
    let depends = |meta: &str| -> Result<Option<String>> {
        let out = cmd::output(Command::new("apt-cache").args(["depends", meta]))?;
        Ok(out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .map(str::trim)
            .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
            .map(str::to_owned))
    };
    let found = match depends(&meta) {
        Ok(Some(p)) => Some(p),
        // An empty or stale package list: update it once.
        _ => {
            say("updating the package lists (apt-get update)");
            cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
            depends(&meta)?
        }
    };
    found.with_context(|| {
        format!("no kernel package for {spec}: the Debian archive has no {meta} (try `apt-cache search --names-only '^linux-image-[0-9].*-amd64$'`)")
    })
}

/// The kernel's image, unpacked from its package into the cache (downloaded once).
fn fetch_kernel(package: &str) -> Result<(String, PathBuf)> {
    let dir = workspace_root().join("target/vm/kernels").join(package);
    let done = dir.join(".unpacked");
    if !done.exists() {
        let downloads = workspace_root().join("target/vm/downloads");
        std::fs::create_dir_all(&downloads)?;
        say(&format!("downloading {package} from the Debian archive"));
        let started = Instant::now();
        let download = |downloads: &Path| {
            cmd::run(
                Command::new("apt-get")
                    .args(["download", "-q", package])
                    .current_dir(downloads),
            )
        };
        if download(&downloads).is_err() {
            cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
            download(&downloads).with_context(|| format!("downloading {package}"))?;
        }
        let deb = std::fs::read_dir(&downloads)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        say(&format!("unpacking {}", deb.display()));
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
        std::fs::remove_file(&deb)?;
        std::fs::write(&done, "")?;
        say(&format!(
            "{package} cached in {} ({:.0}s)",
            dir.display(),
            started.elapsed().as_secs_f64()
        ));
    }
    let image = std::fs::read_dir(dir.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
    let release = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    Ok((release, image))
}

/// The test binaries of the balancer-tests crate, by name (built, not run).
fn test_binaries() -> Result<BTreeMap<String, PathBuf>> {
    println!("[build] the integration tests (not run here)");
    let out = cmd::output(cargo().args([
        "test",
        "-p",
        "balancer-tests",
        "--no-run",
        "--message-format=json",
    ]))?;
    let mut binaries = BTreeMap::new();
    for line in out.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact" && message["target"]["kind"][0] == "test" {
            if let (Some(name), Some(exe)) = (
                message["target"]["name"].as_str(),
                message["executable"].as_str(),
            ) {
                binaries.insert(name.to_owned(), PathBuf::from(exe));
            }
        }
    }
    Ok(binaries)
}

/// One suite's result in the VM.
struct SuiteResult {
    name: &'static str,
    status: Option<i32>,
    passed: u64,
    failed: u64,
    ignored: u64,
    seconds: f64,
    log: String,
}

/// Runs the suites in a VM booted on `spec`'s kernel; `filter` narrows the tests.
pub fn run_kernel(spec: &str, filter: &[String]) -> Result<()> {
    let package = kernel_package(spec)?;
    let (release, image) = fetch_kernel(&package)?;
    let balancer = build_balancer(false)?;
    let binaries = test_binaries()?;

    let out = workspace_root().join("target/vm/out").join(&release);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let mut script = String::from("#!/bin/sh\n# Written by cargo xtask vm; runs inside the VM.\n");
    script.push_str(&format!(
        "export BALANCER_BIN='{}' RUST_BACKTRACE=0\nuname -r > '{}/kernel'\n",
        balancer.display(),
        out.display()
    ));
    for (suite, ignored, skipped) in SUITES {
        let binary = binaries
            .get(*suite)
            .with_context(|| format!("no test binary {suite}"))?;
        let mut args: Vec<String> = filter.to_vec();
        if *ignored {
            args.push("--include-ignored".into());
        }
        for test in *skipped {
            args.extend(["--skip".to_owned(), (*test).to_owned()]);
        }
        args.push("--nocapture".into());
        script.push_str(&format!(
            "start=$(date +%s.%N)\n'{}' {} > '{out}/{suite}.log' 2>&1\necho $? > '{out}/{suite}.rc'\n\
             echo \"$start $(date +%s.%N)\" > '{out}/{suite}.time'\n",
            binary.display(),
            args.iter()
                .map(|a| format!("'{a}'"))
                .collect::<Vec<_>>()
                .join(" "),
            out = out.display()
        ));
    }
    script.push_str(&format!("echo done > '{}/finished'\n", out.display()));
    let script_path = out.join("run.sh");
    std::fs::write(&script_path, script)?;

    say(&format!(
        "booting {release} ({package}) with virtme-ng under qemu (software emulation: the suites \
         take minutes); logs in {}",
        out.display()
    ));
    let started = Instant::now();
    let console = std::fs::File::create(out.join("console.log"))?;
    let venv_bin = setup::tools_venv().join("bin");
    let path = std::env::join_paths(std::iter::once(venv_bin.clone()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    let mut child = Command::new(venv_bin.join("vng"))
        .env("PATH", path)
        .arg("--run")
        .arg(&image)
        .args([
            "--disable-kvm",
            "--memory",
            "2G",
            "--cpus",
            "2",
            "--verbose",
        ])
        .arg("--rwdir")
        .arg(&out)
        .arg("--cwd")
        .arg(workspace_root().join("tests"))
        .arg("--exec")
        .arg(format!("sh '{}'", script_path.display()))
        .stdin(std::process::Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        .spawn()
        .context("starting vng (virtme-ng)")?;
    // Progress while it runs: a line per finished suite, and one a minute.
    let mut reported = 0usize;
    let mut last_line = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > VM_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_secs(2));
        let done = SUITES
            .iter()
            .filter(|(s, _, _)| out.join(format!("{s}.rc")).exists())
            .count();
        if done > reported || last_line.elapsed() >= Duration::from_secs(60) {
            reported = done;
            last_line = Instant::now();
            say(&format!(
                "{:.0}s: {done} of {} suites done",
                started.elapsed().as_secs_f64(),
                SUITES.len()
            ));
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let console_tail = || {
        let text = std::fs::read_to_string(out.join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    let Some(status) = status else {
        bail!(
            "the VM on {release} did not finish within {VM_TIMEOUT:?}; last console lines:\n{}",
            console_tail()
        );
    };
    if !out.join("finished").exists() {
        bail!(
            "the VM on {release} did not run the suites to the end (vng exited with {status}: a boot \
             or virtme-ng failure); last console lines:\n{}",
            console_tail()
        );
    }
    let booted = std::fs::read_to_string(out.join("kernel")).unwrap_or_default();
    if booted.trim() != release {
        bail!("the VM ran kernel {:?}, not {release}", booted.trim());
    }

    let results: Vec<SuiteResult> = SUITES
        .iter()
        .map(|(name, _, _)| {
            let log = std::fs::read_to_string(out.join(format!("{name}.log"))).unwrap_or_default();
            let status = std::fs::read_to_string(out.join(format!("{name}.rc")))
                .ok()
                .and_then(|s| s.trim().parse().ok());
            let count = |word: &str| -> u64 {
                log.lines()
                    .filter(|l| l.starts_with("test result:"))
                    .filter_map(|l| {
                        l.split(';')
                            .find(|p| p.trim().ends_with(word))
                            .and_then(|p| p.split_whitespace().rev().nth(1))
                            .and_then(|n| n.parse::<u64>().ok())
                    })
                    .sum()
            };
            let seconds = std::fs::read_to_string(out.join(format!("{name}.time")))
                .ok()
                .and_then(|t| {
                    let v: Vec<f64> = t
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    (v.len() == 2).then(|| v[1] - v[0])
                })
                .unwrap_or(0.0);
            SuiteResult {
                name,
                status,
                passed: count("passed"),
                failed: count("failed"),
                ignored: count("ignored"),
                seconds,
                log,
            }
        })
        .collect();

    println!("\n[vm] kernel {release} ({package}), VM run {seconds:.0}s:");
    let mut failed = Vec::new();
    for r in &results {
        let ok = r.status == Some(0) && r.failed == 0;
        println!(
            "  {} {:<20} {:>3} passed, {} failed, {} ignored, {:.0}s",
            match (ok, r.passed) {
                (false, _) => "FAILED  ",
                (true, 0) => "NO TESTS",
                (true, _) => "PASSED  ",
            },
            r.name,
            r.passed,
            r.failed,
            r.ignored,
            r.seconds
        );
        if !ok {
            failed.push(r);
        }
    }
    for r in &failed {
        println!(
            "\n---- {} on {release} (exit {:?}), its output:\n{}",
            r.name,
            r.status,
            r.log
                .lines()
                .filter(|l| !l.trim_start().starts_with("at ")
                    && !l.contains(": __rustc::")
                    && !l
                        .trim_start()
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_digit()))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} suites failed on {release}",
            failed.len(),
            results.len()
        );
    }
    let total: u64 = results.iter().map(|r| r.passed).sum();
    if total == 0 {
        bail!("no test ran on {release}: the filter {filter:?} matches none");
    }
    Ok(())
}

/// `cargo xtask vm`: every kernel asked for (default: Debian 12's).
pub fn run(kernels: &[String], filter: &[String]) -> Result<()> {
    setup::prepare(setup::Purpose::Vm)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the VM tier needs root (apt-get download, and root inside the VM): run `sudo cargo xtask vm`");
    }
    let kernels: Vec<String> = if kernels.is_empty() {
        vec![DEFAULT_KERNEL.to_owned()]
    } else {
        kernels.to_vec()
    };
    let mut failures = Vec::new();
    for kernel in &kernels {
        if let Err(e) = run_kernel(kernel, filter) {
            println!("[vm] {kernel}: {e:#}");
            failures.push(kernel.clone());
        }
    }
    if !failures.is_empty() {
        bail!("the VM tier failed on {}", failures.join(", "));
    }
    Ok(())
}

//! `cargo xtask <command>`: every developer and CI entry point.
#![allow(
    clippy::too_many_lines,
    reason = "setup and test steps read top to bottom; the 80-line rule is the daemon's"
)]

mod autoscale;
mod baseline;
mod cmd;
mod demo;
mod setup;
mod test;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, demo and test the balancer")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what every command needs (Debian packages, the pinned nightly with rust-src,
    /// bpf-linker, the Python tools) and mount bpffs; idempotent, never removes a package.
    /// Each command installs its own share of this before it runs.
    Setup {
        /// Only what building the binary needs (the pinned nightly and bpf-linker), as in a
        /// container image's build stage.
        #[arg(long)]
        build_only: bool,
    },
    /// Build the balancer (release) and run `balancer run ARGS...`, e.g. on a real NIC:
    /// `cargo xtask run -- --config /etc/balancer.toml --interface eth0`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, create a client/balancer/backends namespace topology, run the real balancer
    /// with config/demo.toml (config/demo-nat.toml with `--forwarding nat`), send HTTP
    /// requests through it and print what happened.
    Demo {
        /// Number of HTTP requests (one TCP connection each).
        #[arg(long, default_value_t = 300)]
        requests: u64,
        /// `dsr` (the default): backends hold the VIP on a loopback and answer clients
        /// directly; `nat` (always, with --autoscale): unmodified backends behind full NAT.
        #[arg(long, value_enum)]
        forwarding: Option<demo::Forwarding>,
        /// The scale-out loop instead (NAT): a load ramping up and down over two minutes, the
        /// balancer finding its backends in DNS, and a scaler (the Kubernetes HPA's
        /// algorithm) adding and removing backends; a live timeline and a picture in
        /// target/autoscale-demo.svg.
        #[arg(long, conflicts_with = "requests")]
        autoscale: bool,
        /// With --autoscale: a ramp of 46 s instead (what `cargo xtask test` runs).
        #[arg(long, requires = "autoscale")]
        short: bool,
    },
    /// Run every test tier: lint, unit, datapath fixtures (root), network namespaces (root),
    /// a quick benchmark smoke run, and the VM tier on Debian 12's kernel.
    Test {
        /// Skip the VM tier (minutes under software emulation); said loudly in the summary.
        #[arg(long)]
        no_vm: bool,
    },
    /// Boot distribution kernels in VMs (virtme-ng, qemu) and run the datapath fixtures and
    /// the end-to-end tests of every forwarding mode inside, as root.
    Vm {
        /// A kernel: "6.1" (Debian 12's, the default), "6.12" (from the Debian archive's
        /// backports), or a package name such as linux-image-6.1.0-56-amd64. Repeatable.
        #[arg(long = "kernel", value_name = "VERSION")]
        kernels: Vec<String>,
        /// Only the tests whose names contain this (passed to the test binaries).
        #[arg(last = true, value_name = "TEST FILTER")]
        filter: Vec<String>,
    },
    /// Measure the data plane and the control plane (root); writes target/bench/latest.{json,md}
    /// and, for a full run, the figures in docs/benchmarks.md.
    Bench {
        /// A short smoke run (figures not meaningful; docs/benchmarks.md is left alone).
        #[arg(long)]
        quick: bool,
        /// Also measure this git revision (a commit, tag or branch), built in a worktree under
        /// target/baseline/: its XDP program and its daemon beside this build's, interleaved,
        /// reported side by side (docs/benchmarks.md is left alone).
        #[arg(long, value_name = "REV")]
        baseline: Option<String>,
        /// Measure one part only (docs/benchmarks.md is left alone).
        #[arg(long, value_name = "PART", value_parser = ["datapath", "control", "e2e"])]
        only: Option<String>,
        /// Only the data-plane classes whose mode and packet contain this, e.g. "dsr IPv6"
        /// (docs/benchmarks.md is left alone).
        #[arg(long, value_name = "TEXT")]
        class: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup { build_only } => setup::prepare(if build_only {
            setup::Purpose::Build
        } else {
            setup::Purpose::Everything
        }),
        Task::Run { args } => run(&args),
        Task::Demo {
            autoscale: true,
            forwarding: Some(demo::Forwarding::Dsr),
            ..
        } => Err(anyhow::anyhow!(
            "--autoscale forwards with NAT (the backends are unmodified): drop --forwarding dsr"
        )),
        Task::Demo {
            autoscale: true,
            short,
            ..
        } => autoscale::run(short),
        Task::Demo {
            requests,
            forwarding,
            ..
        } => demo::run(requests, forwarding.unwrap_or(demo::Forwarding::Dsr)),
        Task::Test { no_vm } => test::run(no_vm),
        Task::Vm { kernels, filter } => vm::run(&kernels, &filter),
        Task::Bench {
            quick,
            baseline,
            only,
            class,
        } => bench(quick, baseline, only.as_deref(), class.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// A `cargo` command in the workspace, with the cargo bin directory (bpf-linker) first on PATH.
pub fn cargo() -> Command {
    with_path(Command::new(
        std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
    ))
}

/// `cargo` of another toolchain (`rustup run TOOLCHAIN cargo`), set up like [`cargo`].
pub fn cargo_of(toolchain: &str) -> Command {
    let mut command = Command::new("rustup");
    command.args(["run", toolchain, "cargo"]);
    with_path(command)
}

fn with_path(mut command: Command) -> Command {
    command.current_dir(workspace_root());
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![setup::cargo_bin()];
    dirs.extend(std::env::split_paths(&path));
    command.env("PATH", std::env::join_paths(dirs).expect("valid PATH"));
    command
}

/// Builds the `balancer` binary (and with it the XDP object) and returns its path.
pub fn build_balancer(release: bool) -> Result<PathBuf> {
    println!(
        "[build] balancer ({}; the XDP program is always built in release)",
        if release { "release" } else { "debug" }
    );
    let mut command = cargo();
    command.args(["build", "-p", "balancer-userspace", "--bin", "balancer"]);
    if release {
        command.arg("--release");
    }
    cmd::run(&mut command)?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("balancer"))
}

/// Builds the upgrade test's variant of the XDP program (balancer-ebpf with the
/// `upgrade-variant` feature: a changed program, the same maps) the way aya-build builds the
/// embedded one, and returns the object's path.
pub fn build_upgrade_variant(toolchain: &str) -> Result<PathBuf> {
    println!(
        "[build] XDP program variant for the upgrade test (balancer-ebpf, feature upgrade-variant)"
    );
    let target_dir = workspace_root().join("target/ebpf-variant");
    build_xdp_object(
        toolchain,
        &workspace_root(),
        &["--features", "upgrade-variant"],
        &target_dir,
    )
}

/// Builds the benchmark's variant of the XDP program: the connection tables as an LRU per
/// CPU (balancer-ebpf with the `conn-lru-per-cpu` feature), measured beside the shared LRU.
pub fn build_lru_per_cpu_variant(toolchain: &str) -> Result<PathBuf> {
    println!(
        "[build] XDP program variant for the benchmarks (balancer-ebpf, feature conn-lru-per-cpu)"
    );
    build_xdp_object(
        toolchain,
        &workspace_root(),
        &["--features", "conn-lru-per-cpu"],
        &workspace_root().join("target/ebpf-lru-per-cpu"),
    )
}

/// Builds the XDP object of the workspace at `root` the way aya-build builds the embedded one
/// (release, BTF), into `target_dir`; returns the object's path.
pub fn build_xdp_object(
    toolchain: &str,
    root: &Path,
    extra: &[&str],
    target_dir: &Path,
) -> Result<PathBuf> {
    let rustflags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\x1f");
    let mut command = cargo_of(toolchain);
    command
        .current_dir(root)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .args([
            "build",
            "--package",
            "balancer-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(extra)
        .arg("--target-dir")
        .arg(target_dir);
    cmd::run(&mut command)?;
    Ok(target_dir.join("bpfel-unknown-none/release/balancer-xdp"))
}

/// Builds the release binary and runs the benchmark harness (tests/benches/balancer.rs),
/// beside `baseline` if given.
pub fn bench_run(
    quick: bool,
    baseline: Option<&baseline::Build>,
    only: Option<&str>,
    class: Option<&str>,
) -> Result<std::path::PathBuf> {
    let binary = build_balancer(true)?;
    let per_cpu = build_lru_per_cpu_variant(&setup::pinned_toolchain()?)?;
    let out = workspace_root().join("target/bench");
    let mut command = cargo();
    command.env("BALANCER_BIN", &binary).args([
        "bench",
        "-p",
        "balancer-tests",
        "--bench",
        "balancer",
        "--",
    ]);
    if quick {
        command.arg("--quick");
    }
    if let Some(part) = only {
        command.args(["--only", part]);
    }
    if let Some(class) = class {
        command.args(["--class", class]);
    }
    command.arg("--lru-per-cpu-object").arg(&per_cpu);
    if let Some(b) = baseline {
        command
            .args(["--baseline-name", &b.name, "--baseline-object"])
            .arg(&b.object)
            .arg("--baseline-bin")
            .arg(&b.binary);
    }
    command.arg("--out").arg(&out);
    cmd::run(&mut command)?;
    Ok(out)
}

fn bench(
    quick: bool,
    baseline: Option<String>,
    only: Option<&str>,
    class: Option<&str>,
) -> Result<()> {
    setup::prepare(setup::Purpose::Bench)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("the benchmarks need root (BPF_PROG_TEST_RUN, XDP, network namespaces): run `sudo cargo xtask bench`");
    }
    let baseline = match baseline {
        Some(rev) => Some(baseline::build(&rev)?),
        None => None,
    };
    let out = bench_run(quick, baseline.as_ref(), only, class)?;
    if quick || baseline.is_some() || only.is_some() || class.is_some() {
        println!(
            "[bench] {} run: docs/benchmarks.md left alone; the figures are in {}",
            if quick {
                "quick"
            } else if baseline.is_some() {
                "comparison"
            } else {
                "partial"
            },
            out.join("latest.md").display()
        );
        return Ok(());
    }
    let figures = std::fs::read_to_string(out.join("latest.md"))?;
    let doc_path = workspace_root().join("docs/benchmarks.md");
    let doc = std::fs::read_to_string(&doc_path)?;
    const BEGIN: &str = "<!-- figures: begin (written by cargo xtask bench) -->";
    const END: &str = "<!-- figures: end -->";
    let (Some(a), Some(b)) = (doc.find(BEGIN), doc.find(END)) else {
        anyhow::bail!("{}: the figure markers are missing", doc_path.display());
    };
    let updated = format!("{}{BEGIN}\n\n{figures}\n{}", &doc[..a], &doc[b..]);
    std::fs::write(&doc_path, updated)?;
    println!("[bench] figures written to {}", doc_path.display());
    Ok(())
}

fn run(args: &[String]) -> Result<()> {
    setup::prepare(setup::Purpose::Run)?;
    let binary = build_balancer(true)?;
    let mut command = Command::new(&binary);
    command.arg("run").args(args);
    cmd::run(&mut command)
}

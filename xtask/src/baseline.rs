//! `cargo xtask bench --baseline REV`: another revision built beside this one, so that the
//! benchmark measures both in one run. The revision is checked out in a git worktree under
//! `target/baseline/` (kept between runs; rebuilt incrementally), and its XDP object and
//! `balancer` binary are built there with the same toolchains.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};

use crate::{build_xdp_object, cargo, cmd, setup, workspace_root};

/// A built baseline.
pub struct Build {
    /// The revision as given, with its commit.
    pub name: String,
    pub object: PathBuf,
    pub binary: PathBuf,
}

/// Checks `rev` out under target/baseline/ and builds its object and binary.
pub fn build(rev: &str) -> Result<Build> {
    let commit = git(&["rev-parse", "--verify", &format!("{rev}^{{commit}}")])
        .with_context(|| format!("{rev} is not a revision of this repository"))?;
    let short = &commit[..12.min(commit.len())];
    let dir = workspace_root().join("target/baseline").join(short);
    if dir.join(".git").exists() {
        println!(
            "[baseline] {rev} ({short}) already checked out in {}",
            dir.display()
        );
    } else {
        println!(
            "[baseline] checking {rev} ({short}) out in {}",
            dir.display()
        );
        // A worktree of a crashed earlier run, gone from disk, is forgotten first.
        git(&["worktree", "prune"])?;
        git(&[
            "worktree",
            "add",
            "--detach",
            dir.to_str().context("UTF-8 path")?,
            &commit,
        ])?;
    }
    let toolchain = setup::pinned_toolchain()?;
    println!("[baseline] building {short}'s XDP object and balancer binary");
    let object = build_xdp_object(&toolchain, &dir, &[], &dir.join("target/ebpf"))?;
    let mut command = cargo();
    command.current_dir(&dir).args([
        "build",
        "--release",
        "-p",
        "balancer-userspace",
        "--bin",
        "balancer",
    ]);
    cmd::run(&mut command)?;
    let binary = dir.join("target/release/balancer");
    if !object.is_file() || !binary.is_file() {
        bail!(
            "{short}: the build left no {} or {}",
            object.display(),
            binary.display()
        );
    }
    Ok(Build {
        name: format!("{rev} ({short})"),
        object,
        binary,
    })
}

fn git(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("git")
        .current_dir(workspace_root())
        .args(args)
        .output()
        .context("running git")?;
    if !out.status.success() {
        bail!(
            "`git {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

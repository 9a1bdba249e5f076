//! `cargo xtask setup`: installs what the build and the tests need and is missing, and says
//! what it did. Idempotent: with everything present it only checks, in a second or two.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{cmd, workspace_root};

/// Commands the project runs, and the Debian package that provides each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("sysctl", "procps"),
    ("mount", "mount"),
    // Benchmarks: the proxy the balancer is compared with, and bulk throughput.
    ("haproxy", "haproxy"),
    ("iperf3", "iperf3"),
    // The VM tier: qemu, and what virtme-ng needs to build its initramfs.
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("depmod", "kmod"),
    ("busybox", "busybox-static"),
];

/// The bpf-linker release built here, and the LLVM major version it is built for (it must
/// match the pinned nightly's LLVM).
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// Everything the build, the demo and the tests need.
pub fn run() -> Result<()> {
    run_with(false)
}

/// With `build_only`, only what building the `balancer` binary needs.
pub fn run_with(build_only: bool) -> Result<()> {
    let started = Instant::now();
    if build_only {
        say("checking what the build needs");
    } else {
        say("checking what the build and tests need");
        apt_packages()?;
    }
    let toolchain = pinned_toolchain()?;
    nightly(&toolchain)?;
    bpf_linker(&toolchain)?;
    if !build_only {
        python_tools()?;
        bpffs()?;
    }
    say(&format!("done in {:.1}s", started.elapsed().as_secs_f64()));
    Ok(())
}

fn say(message: &str) {
    println!("[setup] {message}");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|dir| Path::new(dir).join(program).is_file())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        say(&format!(
            "system tools: present ({})",
            TOOLS.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ")
        ));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run as root, or `apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    say(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    cmd::run(
        Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get update")?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("apt-get install {}", missing.join(" ")))?;
    Ok(())
}

/// The `channel` of balancer-ebpf/rust-toolchain.toml.
pub fn pinned_toolchain() -> Result<String> {
    let path = workspace_root().join("balancer-ebpf/rust-toolchain.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|r| r.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .next()
        .with_context(|| format!("{}: no channel", path.display()))
}

fn nightly(toolchain: &str) -> Result<()> {
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))
    .unwrap_or_default();
    let have = |component: &str| installed.lines().any(|l| l.starts_with(component));
    if have("rust-src") && have("clippy") {
        say(&format!(
            "toolchain {toolchain} with rust-src and clippy: present"
        ));
        return Ok(());
    }
    say(&format!(
        "installing toolchain {toolchain} with rust-src and clippy (for the XDP program)"
    ));
    cmd::run(Command::new("rustup").args([
        "toolchain",
        "install",
        toolchain,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        "--component",
        "clippy",
    ]))
    .with_context(|| format!("rustup toolchain install {toolchain}"))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        })
}

/// Directory the build puts first on PATH, so that cargo and aya-build find bpf-linker.
pub fn cargo_bin() -> PathBuf {
    cargo_home().join("bin")
}

/// bpf-linker, linked against the pinned nightly's own libLLVM (Debian has no LLVM 22): a
/// prefix with a stub llvm-config and symlinks to the toolchain's library, which the linker's
/// RUNPATH then points at, so the prefix lives under the cargo home, keyed by toolchain.
fn bpf_linker(toolchain: &str) -> Result<()> {
    let sysroot = cmd::output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .args(["--print", "sysroot"]),
    )
    .context("rustc --print sysroot")?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let llvm_lib = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let prefix = cargo_home().join("bpf-linker-llvm").join(toolchain);
    let marker = prefix.join("built-for");
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION} {BPF_LINKER_LLVM_FEATURE} {llvm_lib}\n");
    let linker = cargo_bin().join("bpf-linker");
    let works = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works && fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
        say(&format!(
            "bpf-linker {BPF_LINKER_VERSION} (LLVM of {toolchain}): present"
        ));
        return Ok(());
    }

    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against {toolchain}'s LLVM ({llvm_lib}); this takes about 3 minutes"
    ));
    fs::create_dir_all(prefix.join("bin"))?;
    fs::create_dir_all(prefix.join("lib"))?;
    // bpf-linker's build only needs llvm-config to exist; the library comes from the prefix.
    let llvm_config = prefix.join("bin/llvm-config");
    fs::write(&llvm_config, "#!/bin/sh\nexit 0\n")?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&llvm_config, fs::Permissions::from_mode(0o755))?;
    for name in ["libLLVM.so", llvm_lib.as_str()] {
        let link = prefix.join("lib").join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&llvm_lib), &link)
            .with_context(|| format!("symlink {}", link.display()))?;
    }
    cmd::run(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                BPF_LINKER_LLVM_FEATURE,
            ])
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .context("cargo install bpf-linker")?;
    let check = Command::new(&linker)
        .arg("--version")
        .output()
        .context("running the new bpf-linker")?;
    if !check.status.success() {
        bail!(
            "the new bpf-linker does not run: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    fs::write(&marker, wanted)?;
    say(&format!("bpf-linker installed at {}", linker.display()));
    Ok(())
}

/// Python tools from PyPI, in a virtual environment of their own under target/tools:
/// kubernetes-validate checks deploy/k8s against the Kubernetes schemas; virtme-ng boots the
/// VM tier's kernels.
const PYTHON_TOOLS: &[&str] = &["kubernetes-validate==1.37.0", "virtme-ng==1.42"];

/// The Python tools' virtual environment.
pub fn tools_venv() -> PathBuf {
    workspace_root().join("target/tools/venv")
}

fn python_tools() -> Result<()> {
    let venv = tools_venv();
    let marker = venv.join(".installed");
    let wanted = PYTHON_TOOLS.join(" ");
    if venv.join("bin/python").exists()
        && fs::read_to_string(&marker).is_ok_and(|m| m.trim() == wanted)
    {
        say(&format!("Python tools: present ({wanted})"));
        return Ok(());
    }
    let python = if Path::new("/usr/bin/python3").is_file() {
        PathBuf::from("/usr/bin/python3")
    } else {
        PathBuf::from("python3")
    };
    let has_venv = Command::new(&python)
        .args(["-c", "import venv, ensurepip"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_venv {
        if !is_root() {
            bail!(
                "Python's venv module is missing: run as root, or `apt-get install python3-venv`"
            );
        }
        say("installing Debian packages: python3-venv");
        cmd::run(
            Command::new("apt-get")
                .args(["update", "-qq"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("apt-get update")?;
        cmd::run(
            Command::new("apt-get")
                .args([
                    "install",
                    "-y",
                    "-qq",
                    "--no-install-recommends",
                    "python3-venv",
                ])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("apt-get install python3-venv")?;
    }
    say(&format!(
        "installing {wanted} from PyPI into {}",
        venv.display()
    ));
    let _ = fs::remove_dir_all(&venv);
    cmd::run(Command::new(&python).arg("-m").arg("venv").arg(&venv))
        .context("creating the tools' virtual environment")?;
    cmd::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(PYTHON_TOOLS),
    )
    .with_context(|| format!("pip install {wanted}"))?;
    fs::write(&marker, wanted)?;
    Ok(())
}

/// Mounts the BPF filesystem on /sys/fs/bpf if it is not mounted there.
fn bpffs() -> Result<()> {
    if balancer_tests::scratch::is_bpffs(Path::new("/sys/fs/bpf")) {
        say("bpffs on /sys/fs/bpf: mounted");
        return Ok(());
    }
    if !is_root() {
        say("bpffs is not mounted on /sys/fs/bpf (needs root: `mount -t bpf bpf /sys/fs/bpf`)");
        return Ok(());
    }
    say("mounting bpffs on /sys/fs/bpf");
    fs::create_dir_all("/sys/fs/bpf").ok();
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("mounting bpffs")
}

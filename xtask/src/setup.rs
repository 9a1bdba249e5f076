//! The set-up each command starts with, and `cargo xtask setup` (all of it): installs what
//! that command needs and is missing, says what it installs and why, and never removes a
//! package the machine has. Idempotent: with everything present it only checks, in a second
//! or two, without calling apt.
//!
//! What each command needs is the tables [`DEBIAN`] and [`PYTHON_TOOLS`] (one row per
//! package, with the commands that need it) and [`Purpose`]; how Debian packages are
//! installed without removing any is [`apt`].

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{cmd, workspace_root};

/// The commands that set the machine up before they run, each for what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// `cargo xtask setup --build-only`: building the binary only, as in a container image's
    /// build stage.
    Build,
    /// `cargo xtask run`: the build, and bpffs on /sys/fs/bpf for the balancer's pins.
    Run,
    /// `cargo xtask demo`: network namespaces, and a DNS server for discovery.
    Demo,
    /// `cargo xtask test`: every tier, so every row of the tables.
    Test,
    /// `cargo xtask bench`: network namespaces, and the programs compared with the balancer.
    Bench,
    /// `cargo xtask vm`: the emulator and what virtme-ng needs, and, since the VM runs
    /// end-to-end tests on this machine's root filesystem, what those need.
    Vm,
    /// `cargo xtask setup`: what every command needs.
    Everything,
}

use Purpose::{Bench, Demo, Test, Vm};

impl Purpose {
    fn command(self) -> &'static str {
        match self {
            Purpose::Build => "cargo xtask setup --build-only",
            Purpose::Run => "cargo xtask run",
            Demo => "cargo xtask demo",
            Test => "cargo xtask test",
            Bench => "cargo xtask bench",
            Vm => "cargo xtask vm",
            Purpose::Everything => "cargo xtask setup",
        }
    }

    /// Whether a row needed by `needed_by` is this command's.
    fn takes(self, needed_by: &[Purpose]) -> bool {
        self == Purpose::Everything || needed_by.contains(&self)
    }

    /// Whether it needs bpffs on /sys/fs/bpf: the balancer's default `pin_dir` is there. The
    /// demo, the tests and the benchmarks run balancers under `ip netns exec` (a /sys without
    /// that mount), which pin on a bpffs of their own that the tests' library mounts.
    fn mounts_bpffs(self) -> bool {
        matches!(self, Purpose::Run | Purpose::Everything)
    }
}

/// How setup sees that a Debian package is there.
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// A program it provides, on PATH or in /usr/sbin or /sbin.
    Program(&'static str),
    /// Python modules it provides (`import` them with python3).
    PythonModules(&'static str),
}

use Probe::{Program, PythonModules};

struct DebianPackage {
    package: &'static str,
    present: Probe,
    /// The commands that need it (`cargo xtask setup` installs every row).
    needed_by: &'static [Purpose],
    why: &'static str,
    /// The system service its install would start (its init script's name), which setup
    /// keeps from starting: the commands run their own instances of the program, with their
    /// own configs and sockets (see [`service_starts`]).
    service: Option<&'static str>,
}

/// Every Debian package a command of this project needs, and which commands.
const DEBIAN: &[DebianPackage] = &[
    DebianPackage {
        package: "iproute2",
        present: Program("ip"),
        needed_by: &[Demo, Test, Bench, Vm],
        why: "`ip`: namespaces, veths, addresses and routes of the topologies",
        service: None,
    },
    DebianPackage {
        package: "ethtool",
        present: Program("ethtool"),
        needed_by: &[Demo, Test, Bench, Vm],
        why: "checksum offload off on the topologies' veths, NIC counters",
        service: None,
    },
    DebianPackage {
        package: "procps",
        present: Program("sysctl"),
        needed_by: &[Demo, Test, Bench, Vm],
        why: "`sysctl`: forwarding and ARP settings inside the namespaces",
        service: None,
    },
    DebianPackage {
        package: "mount",
        present: Program("mount"),
        needed_by: &[Demo, Test, Bench, Vm],
        why: "bpffs for the pins of balancers in namespaces",
        service: None,
    },
    DebianPackage {
        package: "dnsmasq-base",
        present: Program("dnsmasq"),
        needed_by: &[Demo, Test],
        why: "`dnsmasq` (the server alone, no system service): the DNS the discovery tests \
              and `demo --autoscale` publish backends in",
        service: None,
    },
    DebianPackage {
        package: "bird2",
        present: Program("bird"),
        needed_by: &[Test],
        why: "`bird` and `birdc` (BIRD 2): the BGP speakers of the fleet tests, one instance per \
              namespace with its own config and socket; the system service is not started",
        service: Some("bird"),
    },
    DebianPackage {
        package: "haproxy",
        present: Program("haproxy"),
        needed_by: &[Test, Bench],
        why: "the proxy the benchmarks compare the balancer with (they run their own)",
        service: Some("haproxy"),
    },
    DebianPackage {
        package: "iperf3",
        present: Program("iperf3"),
        needed_by: &[Test, Bench],
        why: "bulk throughput in the benchmarks",
        service: None,
    },
    DebianPackage {
        package: "qemu-system-x86",
        present: Program("qemu-system-x86_64"),
        needed_by: &[Test, Vm],
        why: "the VM tier's emulator",
        service: None,
    },
    DebianPackage {
        package: "kmod",
        present: Program("depmod"),
        needed_by: &[Test, Vm],
        why: "`depmod`, for virtme-ng's initramfs (VM tier)",
        service: None,
    },
    DebianPackage {
        package: "busybox-static",
        present: Program("busybox"),
        needed_by: &[Test, Vm],
        why: "the shell of virtme-ng's initramfs (VM tier)",
        service: None,
    },
    DebianPackage {
        package: "python3-venv",
        present: PythonModules("venv, ensurepip"),
        needed_by: &[Test, Vm],
        why: "the virtual environment of the Python tools",
        service: None,
    },
];

struct PythonTool {
    requirement: &'static str,
    needed_by: &'static [Purpose],
    why: &'static str,
}

/// Python tools from PyPI, in a virtual environment of their own under target/tools.
const PYTHON_TOOLS: &[PythonTool] = &[
    PythonTool {
        requirement: "kubernetes-validate==1.37.0",
        needed_by: &[Test],
        why: "checks deploy/k8s against the Kubernetes schemas (unit tier)",
    },
    PythonTool {
        requirement: "virtme-ng==1.42",
        needed_by: &[Test, Vm],
        why: "boots the VM tier's kernels",
    },
];

/// The bpf-linker release built here, and the LLVM major version it is built for (it must
/// match the pinned nightly's LLVM).
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// What `cargo xtask demo` needs (the demo's own call; the same as
/// `prepare(Purpose::Demo)`).
pub fn run() -> Result<()> {
    prepare(Demo)
}

/// Installs what `purpose` needs and is missing, and mounts bpffs if it needs it.
pub fn prepare(purpose: Purpose) -> Result<()> {
    let started = Instant::now();
    say(&format!("checking what `{}` needs", purpose.command()));
    debian_packages(purpose)?;
    // Every command builds the balancer.
    let toolchain = pinned_toolchain()?;
    nightly(&toolchain)?;
    bpf_linker(&toolchain)?;
    python_tools(purpose)?;
    if purpose.mounts_bpffs() {
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

fn system_python() -> PathBuf {
    if Path::new("/usr/bin/python3").is_file() {
        PathBuf::from("/usr/bin/python3")
    } else {
        PathBuf::from("python3")
    }
}

fn is_present(probe: Probe) -> bool {
    match probe {
        Program(program) => on_path(program),
        PythonModules(modules) => Command::new(system_python())
            .args(["-c", &format!("import {modules}")])
            .output()
            .is_ok_and(|o| o.status.success()),
    }
}

fn debian_packages(purpose: Purpose) -> Result<()> {
    let wanted: Vec<&DebianPackage> = DEBIAN
        .iter()
        .filter(|p| purpose.takes(p.needed_by))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    let (present, missing): (Vec<&DebianPackage>, Vec<&DebianPackage>) =
        wanted.into_iter().partition(|p| is_present(p.present));
    if !present.is_empty() {
        let names: Vec<&str> = present.iter().map(|p| p.package).collect();
        say(&format!("Debian packages: present ({})", names.join(", ")));
    }
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.package).collect();
    if !is_root() {
        bail!(
            "`{}` needs the Debian packages {}: run it as root, or `apt-get install --no-remove {}`",
            purpose.command(),
            names.join(", "),
            names.join(" ")
        );
    }
    say(&format!(
        "installing Debian packages for `{}`:",
        purpose.command()
    ));
    for p in &missing {
        say(&format!("  {}: {}", p.package, p.why));
    }
    let services: Vec<&str> = missing.iter().filter_map(|p| p.service).collect();
    // Held until the install is over, then the machine's policy is back as it was.
    let _held = service_starts::Held::hold(&services)?;
    apt::install(&names)
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

/// The Python tools' virtual environment.
pub fn tools_venv() -> PathBuf {
    workspace_root().join("target/tools/venv")
}

/// The package name of a pip requirement such as `virtme-ng==1.42`.
fn requirement_name(requirement: &str) -> &str {
    requirement.split("==").next().unwrap_or(requirement)
}

/// The venv's record of what is installed (requirements separated by white space) after
/// `added` was installed: an added requirement replaces another version of its package.
fn record_after(record: &str, added: &[&str]) -> String {
    let names: Vec<&str> = added.iter().map(|r| requirement_name(r)).collect();
    record
        .split_whitespace()
        .filter(|r| !names.contains(&requirement_name(r)))
        .chain(added.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The Python tools `purpose` needs, installed into the venv with what is there already.
fn python_tools(purpose: Purpose) -> Result<()> {
    let venv = tools_venv();
    let marker = venv.join(".installed");
    let wanted: Vec<&PythonTool> = PYTHON_TOOLS
        .iter()
        .filter(|t| purpose.takes(t.needed_by))
        .collect();
    let has_venv = venv.join("bin/python").exists();
    let record = if has_venv {
        fs::read_to_string(&marker).unwrap_or_default()
    } else {
        String::new()
    };
    let (present, missing): (Vec<&PythonTool>, Vec<&PythonTool>) = wanted
        .into_iter()
        .partition(|t| record.split_whitespace().any(|r| r == t.requirement));
    if !present.is_empty() {
        let names: Vec<&str> = present.iter().map(|t| t.requirement).collect();
        say(&format!(
            "Python tools in {}: present ({})",
            venv.display(),
            names.join(", ")
        ));
    }
    if missing.is_empty() {
        return Ok(());
    }
    say(&format!("installing from PyPI into {}:", venv.display()));
    for t in &missing {
        say(&format!("  {}: {}", t.requirement, t.why));
    }
    if !has_venv {
        let _ = fs::remove_dir_all(&venv);
        cmd::run(
            Command::new(system_python())
                .arg("-m")
                .arg("venv")
                .arg(&venv),
        )
        .context("creating the tools' virtual environment")?;
    }
    let requirements: Vec<&str> = missing.iter().map(|t| t.requirement).collect();
    cmd::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(&requirements),
    )
    .with_context(|| format!("pip install {}", requirements.join(" ")))?;
    fs::write(&marker, record_after(&record, &requirements))?;
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

/// Installing packages whose maintainer scripts would start a system service (bird, haproxy)
/// without starting it: the commands run their own instances of those programs, each with its
/// own config, control socket and pid file, inside network namespaces. A system daemon
/// started by the install would run on the host for no one (a BIRD with Debian's default
/// config, say); it would not disturb the tests, which never use the default socket, but
/// nothing of the project should leave a service running.
///
/// Debian's maintainer scripts start services through invoke-rc.d (deb-systemd-invoke under
/// systemd), which first asks /usr/sbin/policy-rc.d: exit code 101 means "forbidden by local
/// policy". For the install, setup makes sure one is there that refuses: a machine's own that
/// refuses already is left alone; otherwise setup puts its own there (setting the machine's
/// aside) and afterwards puts back what was there, or nothing. A run killed in between is
/// repaired by the next one: its file carries [`MARKER`], and a set-aside copy is restored
/// before anything else.
mod service_starts {
    use std::{fs, io::ErrorKind, os::unix::fs::PermissionsExt as _, path::Path, process::Command};

    use anyhow::{Context as _, Result};

    use super::say;

    const POLICY: &str = "/usr/sbin/policy-rc.d";
    /// Where the machine's own policy-rc.d waits while setup's is in place.
    const SET_ASIDE: &str = "/usr/sbin/policy-rc.d.set-aside-by-cargo-xtask-setup";
    /// The line by which setup knows its own file (left by a killed run).
    pub(super) const MARKER: &str =
        "# Written by `cargo xtask setup` for the length of one apt-get install.";
    /// Exit code of policy-rc.d for an action the local policy forbids.
    const FORBIDDEN: i32 = 101;

    /// Setup's policy-rc.d: every action of every service forbidden.
    pub(super) fn ours() -> String {
        format!(
            "#!/bin/sh\n{MARKER}\n# Packages install without starting their services; it is removed (or the \
             machine's own\n# put back) when the install is over.\nexit {FORBIDDEN}\n"
        )
    }

    /// A policy-rc.d in place before the install.
    #[derive(Clone, Copy, Debug)]
    pub(super) struct Existing {
        /// It carries [`MARKER`]: a killed run of setup left it.
        pub written_by_setup: bool,
        /// It forbids starting every service being installed.
        pub refuses: bool,
    }

    /// What setup does before the install; after it, it undoes just that.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Plan {
        /// The machine's own refuses already: nothing to do.
        KeepTheMachines,
        /// There is none of the machine's: write setup's, remove it afterwards.
        WriteOurs,
        /// The machine's own would let services start: set it aside, write setup's, put the
        /// machine's back afterwards.
        SetAsideTheMachines,
    }

    pub(super) fn plan(existing: Option<Existing>) -> Plan {
        match existing {
            None
            | Some(Existing {
                written_by_setup: true,
                ..
            }) => Plan::WriteOurs,
            Some(Existing { refuses: true, .. }) => Plan::KeepTheMachines,
            Some(Existing { refuses: false, .. }) => Plan::SetAsideTheMachines,
        }
    }

    /// Services kept from starting until dropped.
    pub(super) struct Held {
        plan: Plan,
    }

    impl Held {
        /// Makes sure that installing the packages of `services` starts none of them (no
        /// service: nothing to do).
        pub(super) fn hold(services: &[&str]) -> Result<Held> {
            if services.is_empty() {
                return Ok(Held {
                    plan: Plan::KeepTheMachines,
                });
            }
            restore_set_aside()?;
            let plan = plan(existing(services)?);
            let list = services.join(", ");
            match plan {
                Plan::KeepTheMachines => say(&format!(
                    "services not started by the install ({list}): {POLICY} forbids it already"
                )),
                Plan::WriteOurs => say(&format!(
                    "services not started by the install ({list}): a {POLICY} that forbids \
                     it, for the install only"
                )),
                Plan::SetAsideTheMachines => say(&format!(
                    "services not started by the install ({list}): this machine's {POLICY} \
                     would allow it, so it waits in {SET_ASIDE} during the install"
                )),
            }
            if plan == Plan::SetAsideTheMachines {
                fs::rename(POLICY, SET_ASIDE)
                    .with_context(|| format!("setting {POLICY} aside to {SET_ASIDE}"))?;
            }
            if plan != Plan::KeepTheMachines {
                write_ours()?;
            }
            Ok(Held { plan })
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            let undone = match self.plan {
                Plan::KeepTheMachines => return,
                Plan::WriteOurs => fs::remove_file(POLICY).map(|()| format!("{POLICY} removed")),
                Plan::SetAsideTheMachines => fs::rename(SET_ASIDE, POLICY)
                    .map(|()| format!("this machine's {POLICY} put back")),
            };
            match undone {
                Ok(what) => say(&what),
                Err(e) => say(&format!(
                    "could not undo the policy-rc.d of the install ({e}): see {POLICY} and \
                     {SET_ASIDE}; the next `cargo xtask setup` repairs it"
                )),
            }
        }
    }

    fn write_ours() -> Result<()> {
        fs::write(POLICY, ours()).with_context(|| format!("writing {POLICY}"))?;
        fs::set_permissions(POLICY, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY} executable"))
    }

    /// The machine's policy-rc.d set aside by a killed run goes back in place (over the
    /// killed run's own file).
    fn restore_set_aside() -> Result<()> {
        if !Path::new(SET_ASIDE).exists() {
            return Ok(());
        }
        say(&format!(
            "{SET_ASIDE} is left from an interrupted setup: putting it back at {POLICY}"
        ));
        fs::rename(SET_ASIDE, POLICY).with_context(|| format!("renaming {SET_ASIDE} to {POLICY}"))
    }

    /// The policy-rc.d in place, asked as invoke-rc.d asks it (`policy-rc.d SERVICE start`).
    fn existing(services: &[&str]) -> Result<Option<Existing>> {
        let text = match fs::read(POLICY) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {POLICY}")),
        };
        let refuses = services.iter().all(|service| {
            Command::new(POLICY)
                .args([service, "start"])
                .output()
                .is_ok_and(|o| o.status.code() == Some(FORBIDDEN))
        });
        Ok(Some(Existing {
            written_by_setup: text.contains(MARKER),
            refuses,
        }))
    }
}

/// Installing Debian packages without removing any. Every install runs
/// `apt-get install --no-remove`, with which apt fails rather than remove a package. A simulated
/// install (`apt-get -s`) goes first; when packages the machine has are in its way (apt would
/// remove them, or they break what it would install) and they came from one suite apt does
/// not install from by default (a backports suite: installing qemu-system-x86 from bookworm
/// would remove a qemu-utils from bookworm-backports), the install is tried again from that
/// suite (`-t bookworm-backports`), whose versions fit them. When they come from no source
/// configured here (only dpkg's status knows their version) but their versions are backports of
/// the running release (`~bpo12+1` on Debian 12), that release's backports suite is added for
/// this install only: apt is given a directory of sources of its own (the machine's, and that
/// suite on the machine's Debian archive) and nothing under /etc/apt changes. Otherwise it
/// stops, changes nothing, and says which packages are in the way and what to run by hand.
///
/// Reading apt's output, os-release and sources files is pure (tested on captured text); the
/// shell around it is small.
mod apt {
    use std::{
        fs,
        path::{Path, PathBuf},
        process::Command,
    };

    use anyhow::{bail, Context as _, Result};

    use super::say;
    use crate::{cmd, workspace_root};

    /// What a simulated `apt-get -s install --no-remove` says.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) enum Simulation {
        /// It installs, and removes nothing.
        Installs,
        /// It would remove packages, or dependencies break: the packages it names (some of
        /// them may not be installed), and apt's own words.
        Blocked {
            in_the_way: Vec<String>,
            explanation: String,
        },
        /// It fails for another reason (an unknown package, a broken list).
        Fails { explanation: String },
    }

    const REMOVED: &str = "The following packages will be REMOVED:";
    const UNMET: &str = "The following packages have unmet dependencies:";

    /// The indented lines after the line `header`.
    fn block<'a>(output: &'a str, header: &str) -> Vec<&'a str> {
        output
            .lines()
            .skip_while(|l| *l != header)
            .skip(1)
            .take_while(|l| l.starts_with(' '))
            .collect()
    }

    /// The package a relation names: `qemu-system-common` of
    /// `Breaks: qemu-system-common (< 1:8.0+dfsg-5~) but ...`, without an architecture.
    fn relation_target(relation: &str) -> Option<&str> {
        let (_, rest) = relation.split_once(": ")?;
        rest.split_whitespace().next()?.split(':').next()
    }

    pub(super) fn read_simulation(succeeded: bool, output: &str) -> Simulation {
        let errors: Vec<&str> = output.lines().filter(|l| l.starts_with("E: ")).collect();
        if succeeded && errors.is_empty() {
            return Simulation::Installs;
        }
        let removed = block(output, REMOVED);
        let unmet = block(output, UNMET);
        let mut in_the_way: Vec<String> = Vec::new();
        let mut add = |name: &str| {
            let name = name.trim_end_matches('*');
            if !name.is_empty() && !in_the_way.iter().any(|n| n == name) {
                in_the_way.push(name.to_owned());
            }
        };
        removed
            .iter()
            .flat_map(|l| l.split_whitespace())
            .for_each(&mut add);
        for line in &unmet {
            // ` pkg : Breaks: other (...) but ...`, or a further relation of the same package.
            let relation = match line.split_once(" : ") {
                Some((package, relation)) => {
                    add(package.trim());
                    relation
                }
                None => line.trim(),
            };
            if let Some(target) = relation_target(relation) {
                add(target);
            }
        }
        let mut explanation: Vec<&str> = Vec::new();
        for (header, lines) in [(REMOVED, &removed), (UNMET, &unmet)] {
            if !lines.is_empty() {
                explanation.push(header);
                explanation.extend(lines.iter());
            }
        }
        explanation.extend(errors);
        let explanation = explanation.join("\n");
        if in_the_way.is_empty() {
            Simulation::Fails { explanation }
        } else {
            Simulation::Blocked {
                in_the_way,
                explanation,
            }
        }
    }

    /// An installed package, and the suites offering its installed version.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(super) struct Installed {
        pub package: String,
        pub version: String,
        /// (pin priority, suite): 500 for the suites apt installs from by default, 100 for
        /// backports; none for a version known only from dpkg's status (a source since
        /// removed, a local .deb).
        pub sources: Vec<(i32, String)>,
    }

    /// The installed packages of an `apt-cache policy PACKAGES...` output.
    pub(super) fn read_policy(output: &str) -> Vec<Installed> {
        let mut found = Vec::new();
        let mut current: Option<Installed> = None;
        let mut in_installed_version = false;
        for line in output.lines() {
            let indent = line.len() - line.trim_start().len();
            let trimmed = line.trim();
            if indent == 0 && trimmed.ends_with(':') {
                found.extend(current.take());
                current = Some(Installed {
                    package: trimmed.trim_end_matches(':').to_owned(),
                    version: String::new(),
                    sources: Vec::new(),
                });
                in_installed_version = false;
            } else if let Some(version) = trimmed.strip_prefix("Installed: ") {
                if let Some(c) = current.as_mut() {
                    version.clone_into(&mut c.version);
                }
            } else if trimmed.starts_with("*** ") {
                in_installed_version = true;
            } else if indent <= 5 {
                // Another version of the table, or the table's header lines.
                in_installed_version = false;
            } else if in_installed_version {
                // `500 http://deb.debian.org/debian bookworm-backports/main amd64 Packages`;
                // `100 /var/lib/dpkg/status` names no suite.
                let fields: Vec<&str> = trimmed.split_whitespace().collect();
                if let (Some(priority), Some(suite)) = (
                    fields.first().and_then(|p| p.parse::<i32>().ok()),
                    fields.get(2).and_then(|s| s.split('/').next()),
                ) {
                    if let Some(c) = current.as_mut() {
                        c.sources.push((priority, suite.to_owned()));
                    }
                }
            }
        }
        found.extend(current);
        found.retain(|p| !p.version.is_empty() && p.version != "(none)");
        found
    }

    /// The suite to install from so that `in_the_way` (installed) can stay: the one suite
    /// apt does not install from by default (priority below 500) that their versions come
    /// from. Err: why there is none.
    pub(super) fn suite_to_try(in_the_way: &[Installed]) -> Result<String, String> {
        let mut suites: Vec<&str> = in_the_way
            .iter()
            .flat_map(|p| &p.sources)
            .filter(|(priority, _)| *priority < 500)
            .map(|(_, suite)| suite.as_str())
            .collect();
        suites.sort_unstable();
        suites.dedup();
        match suites.as_slice() {
            [suite] => Ok((*suite).to_owned()),
            [] => Err(
                "they come from the suites apt installs from by default, or from no \
                       source configured here"
                    .to_owned(),
            ),
            several => Err(format!(
                "they come from several suites ({}), and one install takes one",
                several.join(", ")
            )),
        }
    }

    /// The running Debian release, from /etc/os-release.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Release {
        /// `bookworm` (`VERSION_CODENAME`).
        pub codename: String,
        /// 12 (`VERSION_ID`): the number its backports carry in their versions (`~bpo12+1`).
        pub number: u32,
    }

    /// The release an os-release file names; None without a codename or a whole release number
    /// (testing and unstable have no `VERSION_ID`, and no backports).
    pub(super) fn read_os_release(text: &str) -> Option<Release> {
        let field = |name: &str| {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix(name)?.strip_prefix('='))
                .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'').to_owned())
                .find(|v| !v.is_empty())
        };
        Some(Release {
            codename: field("VERSION_CODENAME")?,
            number: field("VERSION_ID")?.parse().ok()?,
        })
    }

    /// The Debian release a backports version was built for: 12 for
    /// `1:10.0.2+ds-2+deb13u1~bpo12+1`; None for a version that is no backport.
    pub(super) fn backported_for(version: &str) -> Option<u32> {
        let (_, rest) = version.rsplit_once("~bpo")?;
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    }

    /// The backports suite of `release` to add as a source, when the installed packages in the
    /// way known only from dpkg's status (no configured source has their version) are all
    /// backports of that release. Err: why not.
    pub(super) fn backports_to_add(
        in_the_way: &[Installed],
        release: &Release,
    ) -> Result<String, String> {
        let unconfigured: Vec<&Installed> =
            in_the_way.iter().filter(|p| p.sources.is_empty()).collect();
        if unconfigured.is_empty() {
            return Err("none of them is a backport missing its source".to_owned());
        }
        for p in unconfigured {
            match backported_for(&p.version) {
                Some(number) if number == release.number => {}
                Some(number) => {
                    return Err(format!(
                        "{} {} is a backport for Debian {number}, not for this Debian {} ({})",
                        p.package, p.version, release.number, release.codename
                    ))
                }
                None => {
                    return Err(format!(
                        "{} {} is not a Debian backport (no ~bpoNN in its version)",
                        p.package, p.version
                    ))
                }
            }
        }
        Ok(format!("{}-backports", release.codename))
    }

    /// A configured Debian archive: a `deb` source's first URI, and its `Signed-By` as
    /// written after `Signed-By:` (continuation lines of an inline key included).
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Archive {
        pub uri: String,
        pub signed_by: Option<String>,
    }

    /// The archive of the first `deb` source in a deb822 file (`.sources`) that offers the
    /// suite `codename` (the release itself, not its -updates or -security).
    pub(super) fn archive_in_deb822(text: &str, codename: &str) -> Option<Archive> {
        let mut entry: Vec<(String, String)> = Vec::new();
        // A blank line (or the end) closes an entry; `None` marks the end.
        let lines = text.lines().map(Some).chain([None]);
        for line in lines {
            match line {
                Some(l) if l.starts_with('#') => {}
                Some(l) if l.starts_with([' ', '\t']) && !l.trim().is_empty() => {
                    if let Some((_, value)) = entry.last_mut() {
                        value.push('\n');
                        value.push_str(l);
                    }
                }
                Some(l) if !l.trim().is_empty() => {
                    if let Some((key, value)) = l.split_once(':') {
                        entry.push((key.trim().to_ascii_lowercase(), value.to_owned()));
                    }
                }
                _ => {
                    let field = |name: &str| {
                        entry
                            .iter()
                            .find(|(k, _)| k == name)
                            .map(|(_, v)| v.as_str())
                    };
                    let words = |name: &str| field(name).unwrap_or("").split_whitespace();
                    let enabled = field("enabled").is_none_or(|v| v.trim() != "no");
                    if enabled
                        && words("types").any(|t| t == "deb")
                        && words("suites").any(|s| s == codename)
                    {
                        if let Some(uri) = words("uris").next() {
                            return Some(Archive {
                                uri: uri.to_owned(),
                                signed_by: field("signed-by").map(str::to_owned),
                            });
                        }
                    }
                    entry.clear();
                }
            }
        }
        None
    }

    /// The same for a one-line file (`sources.list`, `.list`):
    /// `deb [signed-by=KEYRING arch=amd64] URI SUITE COMPONENTS...`.
    pub(super) fn archive_in_list(text: &str, codename: &str) -> Option<Archive> {
        text.lines().find_map(|line| {
            let line = line.split('#').next().unwrap_or("");
            let rest = line.trim().strip_prefix("deb ")?.trim_start();
            let (options, rest) = match rest.strip_prefix('[') {
                Some(bracketed) => bracketed.split_once(']')?,
                None => ("", rest),
            };
            let mut words = rest.split_whitespace();
            let (uri, suite) = (words.next()?, words.next()?);
            (suite == codename).then(|| Archive {
                uri: uri.to_owned(),
                signed_by: options
                    .split_whitespace()
                    .find_map(|o| o.strip_prefix("signed-by="))
                    .map(|keys| format!(" {keys}")),
            })
        })
    }

    /// A deb822 source of `suite` (main) on `archive`, signed like it.
    pub(super) fn added_source(archive: &Archive, suite: &str) -> String {
        let mut text = format!(
            "# Added by `cargo xtask setup` for one install; /etc/apt names no {suite}.\n\
             Types: deb\nURIs: {}\nSuites: {suite}\nComponents: main\n",
            archive.uri
        );
        if let Some(keys) = &archive.signed_by {
            text.push_str(&format!("Signed-By:{keys}\n"));
        }
        text
    }

    /// `qemu-utils 1:10.0.2+ds-2+deb13u1~bpo12+1 (bookworm-backports)`, one per package.
    fn describe(installed: &[Installed]) -> String {
        installed
            .iter()
            .map(|p| {
                let mut suites: Vec<&str> = p.sources.iter().map(|(_, s)| s.as_str()).collect();
                suites.dedup();
                let from = if suites.is_empty() {
                    "no configured source".to_owned()
                } else {
                    suites.join(", ")
                };
                format!("{} {} ({from})", p.package, p.version)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Where an install is made from when not from the default suites.
    #[derive(Debug)]
    pub(super) struct Target {
        /// `-t SUITE`.
        pub suite: String,
        /// `-o Dir::Etc::SourceParts=DIR`: the machine's sources and `suite` added, for an
        /// install from a suite /etc/apt does not name.
        pub source_parts: Option<PathBuf>,
    }

    impl Target {
        /// apt's options naming the sources: `-o Dir::Etc::SourceParts=DIR`, or none.
        fn source_options(&self) -> Vec<String> {
            self.source_parts
                .iter()
                .flat_map(|dir| {
                    [
                        "-o".to_owned(),
                        format!("Dir::Etc::SourceParts={}", dir.display()),
                    ]
                })
                .collect()
        }

        /// apt-get's options of an install from there.
        fn args(&self) -> Vec<String> {
            let mut args = self.source_options();
            args.extend(["-t".to_owned(), self.suite.clone()]);
            args
        }
    }

    /// The error when nothing can be installed without removing: what is in the way, why
    /// there is no way round (`why`, a sentence), what was tried, what apt said, and the
    /// command to decide with by hand.
    pub(super) fn refusal(
        packages: &[&str],
        in_the_way: &[Installed],
        tried: Option<&Target>,
        why: &str,
        explanation: &str,
    ) -> String {
        let list = packages.join(" ");
        let target = tried
            .map(|t| format!("{} ", t.args().join(" ")))
            .unwrap_or_default();
        let mut attempts = format!("`apt-get install --no-remove {list}`");
        if tried.is_some() {
            attempts.push_str(&format!(
                ", then `apt-get install --no-remove {target}{list}`"
            ));
        }
        format!(
            "installing {list} would remove or break packages this machine has: {}. {why}. \
             Tried, simulated (nothing was changed): {attempts}. apt says:\n{explanation}\n\
             Decide by hand what to keep: `apt-get install {target}{list}` lists what it would \
             remove and asks before it does.",
            describe(in_the_way)
        )
    }

    fn apt_get() -> Command {
        let mut command = Command::new("apt-get");
        // English messages, which read_simulation reads.
        command
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C");
        command
    }

    fn simulate(packages: &[&str], target: Option<&Target>) -> Result<Simulation> {
        let mut command = apt_get();
        command.args([
            "-s",
            "install",
            "-y",
            "--no-remove",
            "--no-install-recommends",
        ]);
        if let Some(target) = target {
            command.args(target.args());
        }
        let out = command
            .args(packages)
            .output()
            .context("cannot run apt-get")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(read_simulation(out.status.success(), &text))
    }

    /// Which of `packages` are installed, and from where.
    fn installed(packages: &[String]) -> Result<Vec<Installed>> {
        let out = cmd::output(
            Command::new("apt-cache")
                .env("LC_ALL", "C")
                .arg("policy")
                .args(packages),
        )?;
        Ok(read_policy(&out))
    }

    /// Installs `packages` and their dependencies (not their recommendations), removing
    /// nothing: from the default suites, else from the suite of the installed packages in the
    /// way.
    pub(super) fn install(packages: &[&str]) -> Result<()> {
        cmd::run(apt_get().args(["update", "-qq"])).context("apt-get update")?;
        let target = match simulate(packages, None)? {
            Simulation::Installs => None,
            Simulation::Fails { explanation } => bail!(
                "apt-get cannot install {}:\n{explanation}",
                packages.join(" ")
            ),
            Simulation::Blocked {
                in_the_way,
                explanation,
            } => Some(way_round(packages, &in_the_way, &explanation)?),
        };
        let mut command = apt_get();
        command.args([
            "install",
            "-y",
            "-qq",
            "--no-remove",
            "--no-install-recommends",
        ]);
        if let Some(target) = &target {
            command.args(target.args());
        }
        cmd::run(command.args(packages))
            .with_context(|| format!("apt-get install {}", packages.join(" ")))
    }

    /// Where to install `packages` from so that the installed packages among `in_the_way`
    /// can stay, simulated there without removing anything; Err: the refusal.
    fn way_round(packages: &[&str], in_the_way: &[String], explanation: &str) -> Result<Target> {
        let in_the_way = installed(in_the_way)?;
        if in_the_way.is_empty() {
            bail!(
                "apt-get cannot install {}: its dependencies cannot be met, and no installed \
                 package is the reason:\n{explanation}",
                packages.join(" ")
            );
        }
        let names = in_the_way
            .iter()
            .map(|p| p.package.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let target = match suite_to_try(&in_the_way) {
            Ok(suite) => {
                say(&format!(
                    "from the default suites, apt would remove or break {names}; trying \
                     {suite}, which they come from"
                ));
                Target {
                    suite,
                    source_parts: None,
                }
            }
            Err(why) => added_backports(&in_the_way, &names).map_err(|why_not| {
                let why = format!("No other suite to install from: {why}, and {why_not}");
                anyhow::anyhow!(refusal(packages, &in_the_way, None, &why, explanation))
            })?,
        };
        if let Simulation::Blocked { explanation, .. } | Simulation::Fails { explanation } =
            simulate(packages, Some(&target))?
        {
            let why = format!("From {}, apt cannot install them either", target.suite);
            bail!(refusal(
                packages,
                &in_the_way,
                Some(&target),
                &why,
                &explanation
            ));
        }
        Ok(target)
    }

    /// The sources apt is given for an install from a suite /etc/apt does not name:
    /// target/apt/sources.list.d of this workspace. Not under /etc/apt, so that the machine's
    /// configuration stays as it was and its own `apt-get update` or `upgrade` never sees the
    /// added suite; in the project's target directory rather than a temporary one, so that what
    /// apt was given can be read afterwards, and `cargo clean` removes it.
    fn private_source_parts() -> PathBuf {
        workspace_root().join("target/apt/sources.list.d")
    }

    /// The configured sources files apt reads, each with whether it is deb822: /etc/apt's
    /// sources.list, then its sources.list.d's `.list` and `.sources` files (apt ignores
    /// others), in apt's order.
    fn configured_sources() -> Result<Vec<(PathBuf, bool)>> {
        let mut parts: Vec<(PathBuf, bool)> = Vec::new();
        if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
            for entry in entries {
                let path = entry?.path();
                match path.extension().and_then(|e| e.to_str()) {
                    Some("sources") => parts.push((path, true)),
                    Some("list") => parts.push((path, false)),
                    _ => {}
                }
            }
        }
        parts.sort();
        let main = PathBuf::from("/etc/apt/sources.list");
        if main.is_file() {
            parts.insert(0, (main, false));
        }
        Ok(parts)
    }

    /// When the installed packages in the way (`names`) are backports of this release whose
    /// source is not configured: that release's backports suite added on the machine's Debian
    /// archive, in a private copy of /etc/apt/sources.list.d, and apt's lists updated with it.
    /// Err: why not (a phrase).
    fn added_backports(in_the_way: &[Installed], names: &str) -> Result<Target, String> {
        let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
        let release = read_os_release(&os_release).ok_or(
            "/etc/os-release names no Debian release (VERSION_CODENAME and VERSION_ID) whose \
             backports they could be",
        )?;
        let suite = backports_to_add(in_the_way, &release)?;
        let sources = configured_sources().map_err(|e| format!("reading /etc/apt: {e:#}"))?;
        let mut archive = None;
        for (path, deb822) in &sources {
            let text = fs::read_to_string(path).unwrap_or_default();
            archive = archive.or(if *deb822 {
                archive_in_deb822(&text, &release.codename)
            } else {
                archive_in_list(&text, &release.codename)
            });
        }
        let archive = archive.ok_or(format!(
            "no configured source offers {} to find the Debian archive of {suite} in",
            release.codename
        ))?;
        say(&format!(
            "from the default suites, apt would remove or break {names}; their versions are \
             backports of {} but no configured source offers them: trying {suite} from {}, \
             added for this install only (nothing under /etc/apt changes)",
            release.codename, archive.uri
        ));
        let dir = private_source_parts();
        write_source_parts(&dir, &sources, &added_source(&archive, &suite), &suite)
            .map_err(|e| format!("writing the sources in {}: {e:#}", dir.display()))?;
        let target = Target {
            suite,
            source_parts: Some(dir),
        };
        cmd::run(
            apt_get()
                .args(["update", "-qq"])
                .args(target.source_options()),
        )
        .map_err(|e| format!("{} could not be fetched: {e:#}", target.suite))?;
        Ok(target)
    }

    /// `dir` holding copies of the sources.list.d files among `sources` (sources.list itself
    /// is still read from /etc/apt) and `added`, as `xtask-SUITE.sources`.
    fn write_source_parts(
        dir: &Path,
        sources: &[(PathBuf, bool)],
        added: &str,
        suite: &str,
    ) -> Result<()> {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
        for (path, _) in sources {
            if let (Some(name), Some("sources.list.d")) = (
                path.file_name(),
                path.parent()
                    .and_then(Path::file_name)
                    .and_then(|n| n.to_str()),
            ) {
                fs::copy(path, dir.join(name))
                    .with_context(|| format!("copying {}", path.display()))?;
            }
        }
        fs::write(dir.join(format!("xtask-{suite}.sources")), added)?;
        say(&format!("  sources for apt: {}", dir.display()));
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        // apt's output, captured on Debian 12 (apt 2.6) with LC_ALL=C.
        // On a machine with a backported qemu-utils (dpkg status of this machine with
        // qemu-utils from bookworm-backports, the qemu-system packages not installed):
        // `apt-get -s install -y --no-remove --no-install-recommends qemu-system-x86`.
        const QEMU_BREAKS: &str = r#"Reading package lists...
Building dependency tree...
Reading state information...
Some packages could not be installed. This may mean that you have
requested an impossible situation or if you are using the unstable
distribution that some required packages have not yet been created
or been moved out of Incoming.
The following information may help to resolve the situation:

The following packages have unmet dependencies:
 qemu-utils : Breaks: qemu-system-common (< 1:8.0+dfsg-5~) but 1:7.2+dfsg-7+deb12u18+b3 is to be installed
E: Error, pkgProblemResolver::Resolve generated breaks, this may be caused by held packages.
"#;
        // The same with `-t bookworm-backports`.
        const QEMU_FROM_BACKPORTS: &str = r#"Reading package lists...
Building dependency tree...
Reading state information...
The following packages were automatically installed and are no longer required:
  libepoxy0 libgstreamer-plugins-base1.0-0 libopus0 liborc-0.4-0 libsndio7.0
  libspice-server1
Use 'apt autoremove' to remove them.
The following additional packages will be installed:
  qemu-system-common qemu-system-data seabios
Suggested packages:
  samba vde2
Recommended packages:
  ovmf qemu-system-gui qemu-system-modules-spice qemu-system-modules-opengl
  qemu-block-extra
The following NEW packages will be installed:
  qemu-system-common qemu-system-data qemu-system-x86
The following packages will be upgraded:
  seabios
1 upgraded, 3 newly installed, 0 to remove and 164 not upgraded.
Inst qemu-system-common (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
Inst qemu-system-data (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [all])
Inst seabios [1.16.2-1] (1.16.3-2~bpo12+1 Debian Backports:oldstable-backports [all])
Inst qemu-system-x86 (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
Conf qemu-system-common (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
Conf qemu-system-data (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [all])
Conf seabios (1.16.3-2~bpo12+1 Debian Backports:oldstable-backports [all])
Conf qemu-system-x86 (1:10.0.2+ds-2+deb13u1~bpo12+1 Debian Backports:oldstable-backports [amd64])
"#;
        // `apt-get -s install --no-remove chrony` where systemd-timesyncd is installed.
        const CHRONY_REMOVES: &str = r#"Reading package lists...
Building dependency tree...
Reading state information...
Suggested packages:
  dnsutils networkd-dispatcher
The following packages will be REMOVED:
  systemd-timesyncd
The following NEW packages will be installed:
  chrony
0 upgraded, 1 newly installed, 1 to remove and 136 not upgraded.
E: Packages need to be removed but remove is disabled.
"#;
        const UNKNOWN_PACKAGE: &str = r#"Reading package lists...
Building dependency tree...
Reading state information...
E: Unable to locate package no-such-package-xyz
"#;
        const ALREADY_THERE: &str = r#"Reading package lists...
Building dependency tree...
Reading state information...
dnsmasq-base is already the newest version (2.90-4~deb12u2).
0 upgraded, 0 newly installed, 0 to remove and 137 not upgraded.
"#;
        // `apt-cache policy qemu-utils` on the machine with the backported qemu-utils.
        const POLICY_BACKPORTED: &str = r#"qemu-utils:
  Installed: 1:10.0.2+ds-2+deb13u1~bpo12+1
  Candidate: 1:10.0.2+ds-2+deb13u1~bpo12+1
  Version table:
 *** 1:10.0.2+ds-2+deb13u1~bpo12+1 100
        100 http://deb.debian.org/debian bookworm-backports/main amd64 Packages
        100 /var/lib/dpkg/status
     1:7.2+dfsg-7+deb12u18+b3 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
     1:7.2+dfsg-7+deb12u15 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
"#;
        // `apt-cache policy iproute2 google-cloud-cli qemu-utils`: from bookworm, from a
        // source no longer configured, not installed.
        const POLICY_MIXED: &str = r#"iproute2:
  Installed: 6.1.0-3
  Candidate: 6.1.0-3
  Version table:
 *** 6.1.0-3 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
google-cloud-cli:
  Installed: 528.0.0-0
  Candidate: 528.0.0-0
  Version table:
 *** 528.0.0-0 100
        100 /var/lib/dpkg/status
qemu-utils:
  Installed: (none)
  Candidate: 1:7.2+dfsg-7+deb12u18+b3
  Version table:
     1:7.2+dfsg-7+deb12u18+b3 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
     1:7.2+dfsg-7+deb12u15 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
"#;

        /// What a simulation comes to, without apt's words: "installs", "fails", or the
        /// packages in the way.
        fn verdict(simulation: &Simulation) -> String {
            match simulation {
                Simulation::Installs => "installs".to_owned(),
                Simulation::Fails { .. } => "fails".to_owned(),
                Simulation::Blocked { in_the_way, .. } => in_the_way.join(" "),
            }
        }

        #[test]
        fn simulations_read() {
            let cases = [
                (
                    "a backported package breaks the default suite's version",
                    false,
                    QEMU_BREAKS,
                    "qemu-utils qemu-system-common",
                ),
                (
                    "from backports it installs (an upgrade, nothing removed)",
                    true,
                    QEMU_FROM_BACKPORTS,
                    "installs",
                ),
                // apt-get exits with 0 from this one: its E: line decides.
                (
                    "apt would remove a package",
                    true,
                    CHRONY_REMOVES,
                    "systemd-timesyncd",
                ),
                ("an unknown package", false, UNKNOWN_PACKAGE, "fails"),
                ("already installed", true, ALREADY_THERE, "installs"),
            ];
            for (case, succeeded, output, expected) in cases {
                assert_eq!(
                    verdict(&read_simulation(succeeded, output)),
                    expected,
                    "{case}"
                );
            }
            // apt's words, for the error message.
            let explanations = [
                (
                    CHRONY_REMOVES,
                    "The following packages will be REMOVED:\n  systemd-timesyncd\n\
                     E: Packages need to be removed but remove is disabled.",
                ),
                (
                    QEMU_BREAKS,
                    "The following packages have unmet dependencies:\n \
                     qemu-utils : Breaks: qemu-system-common (< 1:8.0+dfsg-5~) but \
                     1:7.2+dfsg-7+deb12u18+b3 is to be installed\n\
                     E: Error, pkgProblemResolver::Resolve generated breaks, this may be caused \
                     by held packages.",
                ),
                (
                    UNKNOWN_PACKAGE,
                    "E: Unable to locate package no-such-package-xyz",
                ),
            ];
            for (output, expected) in explanations {
                let (Simulation::Blocked { explanation, .. } | Simulation::Fails { explanation }) =
                    read_simulation(false, output)
                else {
                    panic!("{output}");
                };
                assert_eq!(explanation, expected);
            }
        }

        fn package_from(package: &str, version: &str, sources: &[(i32, &str)]) -> Installed {
            Installed {
                package: package.to_owned(),
                version: version.to_owned(),
                sources: sources.iter().map(|(p, s)| (*p, (*s).to_owned())).collect(),
            }
        }

        #[test]
        fn policies_read() {
            assert_eq!(
                read_policy(POLICY_BACKPORTED),
                [package_from(
                    "qemu-utils",
                    "1:10.0.2+ds-2+deb13u1~bpo12+1",
                    &[(100, "bookworm-backports")]
                )]
            );
            assert_eq!(
                read_policy(POLICY_MIXED),
                [
                    package_from("iproute2", "6.1.0-3", &[(500, "bookworm")]),
                    package_from("google-cloud-cli", "528.0.0-0", &[]),
                ],
                "qemu-utils is not installed there"
            );
        }

        #[test]
        fn the_suite_to_retry_from() {
            let backported = package_from("qemu-utils", "1:10.0", &[(100, "bookworm-backports")]);
            let default = package_from("iproute2", "6.1.0-3", &[(500, "bookworm")]);
            let local = package_from("google-cloud-cli", "528.0.0-0", &[]);
            let other = package_from("x", "1", &[(100, "trixie-backports")]);
            let cases: &[(&str, &[&Installed], Option<&str>)] = &[
                (
                    "one backported package",
                    &[&backported],
                    Some("bookworm-backports"),
                ),
                (
                    "a default package beside it changes nothing",
                    &[&backported, &default],
                    Some("bookworm-backports"),
                ),
                ("only default suites", &[&default], None),
                ("no configured source", &[&local], None),
                ("two suites", &[&backported, &other], None),
            ];
            for (case, in_the_way, expected) in cases {
                let in_the_way: Vec<Installed> = in_the_way.iter().map(|p| (*p).clone()).collect();
                assert_eq!(
                    suite_to_try(&in_the_way).ok().as_deref(),
                    *expected,
                    "{case}"
                );
            }
        }

        #[test]
        fn a_refusal_names_the_packages_the_attempts_and_the_command() {
            let Simulation::Blocked { explanation, .. } = read_simulation(false, QEMU_BREAKS)
            else {
                panic!("blocked");
            };
            let target = Target {
                suite: "bookworm-backports".to_owned(),
                source_parts: None,
            };
            let text = refusal(
                &["qemu-system-x86"],
                &read_policy(POLICY_BACKPORTED),
                Some(&target),
                "From bookworm-backports, apt cannot install them either",
                &explanation,
            );
            for expected in [
                "qemu-utils 1:10.0.2+ds-2+deb13u1~bpo12+1 (bookworm-backports)",
                "`apt-get install --no-remove qemu-system-x86`",
                "`apt-get install --no-remove -t bookworm-backports qemu-system-x86`",
                "qemu-utils : Breaks: qemu-system-common",
                "`apt-get install -t bookworm-backports qemu-system-x86`",
            ] {
                assert!(
                    text.contains(expected),
                    "{expected:?} missing from:\n{text}"
                );
            }
            // From a suite added for the install: the command by hand names the sources.
            let added = Target {
                suite: "bookworm-backports".to_owned(),
                source_parts: Some(PathBuf::from("/w/target/apt/sources.list.d")),
            };
            let text = refusal(
                &["qemu-system-x86"],
                &read_policy(POLICY_DPKG_ONLY),
                Some(&added),
                "From bookworm-backports, apt cannot install them either",
                &explanation,
            );
            for expected in [
                "qemu-utils 1:10.0.2+ds-2+deb13u1~bpo12+1 (no configured source)",
                "`apt-get install --no-remove -o Dir::Etc::SourceParts=/w/target/apt/\
                 sources.list.d -t bookworm-backports qemu-system-x86`",
            ] {
                assert!(
                    text.contains(expected),
                    "{expected:?} missing from:\n{text}"
                );
            }
        }

        // /etc/os-release of Debian 12, 13, unstable, and Ubuntu 24.04 (shortened).
        const OS_RELEASE_BOOKWORM: &str = r#"PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
"#;
        const OS_RELEASE_TRIXIE: &str = r#"PRETTY_NAME="Debian GNU/Linux 13 (trixie)"
NAME="Debian GNU/Linux"
VERSION_ID="13"
VERSION="13 (trixie)"
VERSION_CODENAME=trixie
DEBIAN_VERSION_FULL=13.1
ID=debian
"#;
        const OS_RELEASE_SID: &str = r#"PRETTY_NAME="Debian GNU/Linux trixie/sid"
NAME="Debian GNU/Linux"
VERSION_CODENAME=trixie
ID=debian
"#;
        const OS_RELEASE_UBUNTU: &str = r#"PRETTY_NAME="Ubuntu 24.04.1 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION_CODENAME=noble
ID=ubuntu
"#;

        #[test]
        fn releases_read() {
            let release = |codename: &str, number| {
                Some(Release {
                    codename: codename.to_owned(),
                    number,
                })
            };
            assert_eq!(
                read_os_release(OS_RELEASE_BOOKWORM),
                release("bookworm", 12)
            );
            assert_eq!(read_os_release(OS_RELEASE_TRIXIE), release("trixie", 13));
            assert_eq!(read_os_release(OS_RELEASE_SID), None, "no release number");
            assert_eq!(read_os_release(OS_RELEASE_UBUNTU), None, "no Debian number");
            assert_eq!(read_os_release(""), None);
        }

        #[test]
        fn backports_versions_read() {
            let cases = [
                ("1:10.0.2+ds-2+deb13u1~bpo12+1", Some(12)),
                ("1.16.3-2~bpo12+1", Some(12)),
                ("6.12.43-1~bpo12+1", Some(12)),
                ("2.4.1-1~bpo11+2", Some(11)),
                ("1:7.2+dfsg-7+deb12u18+b3", None),
                ("528.0.0-0", None),
                ("1.0~bpo", None),
            ];
            for (version, expected) in cases {
                assert_eq!(backported_for(version), expected, "{version}");
            }
        }

        // `apt-cache policy qemu-utils` here: bookworm-backports installed, then its source
        // removed; only dpkg's status knows that version.
        const POLICY_DPKG_ONLY: &str = r#"qemu-utils:
  Installed: 1:10.0.2+ds-2+deb13u1~bpo12+1
  Candidate: 1:10.0.2+ds-2+deb13u1~bpo12+1
  Version table:
 *** 1:10.0.2+ds-2+deb13u1~bpo12+1 100
        100 /var/lib/dpkg/status
     1:7.2+dfsg-7+deb12u18+b3 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
     1:7.2+dfsg-7+deb12u15 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
"#;

        #[test]
        fn a_backports_suite_is_added_only_for_backports_of_this_release() {
            let bookworm = read_os_release(OS_RELEASE_BOOKWORM).unwrap();
            let trixie = read_os_release(OS_RELEASE_TRIXIE).unwrap();
            let dpkg_only = read_policy(POLICY_DPKG_ONLY);
            assert_eq!(
                suite_to_try(&dpkg_only).ok(),
                None,
                "no configured suite has it"
            );
            let bpo = &dpkg_only[0];
            let default = package_from("iproute2", "6.1.0-3", &[(500, "bookworm")]);
            let local = package_from("google-cloud-cli", "528.0.0-0", &[]);
            let older = package_from("x", "2.4.1-1~bpo11+2", &[]);
            let cases: &[(&str, &[&Installed], &Release, Option<&str>)] = &[
                (
                    "a dpkg-only backport of this release",
                    &[bpo],
                    &bookworm,
                    Some("bookworm-backports"),
                ),
                (
                    "a default package beside it changes nothing",
                    &[bpo, &default],
                    &bookworm,
                    Some("bookworm-backports"),
                ),
                ("on another release", &[bpo], &trixie, None),
                ("a local package beside it", &[bpo, &local], &bookworm, None),
                ("a backport of an older release", &[&older], &bookworm, None),
                ("only default suites", &[&default], &bookworm, None),
            ];
            for (case, in_the_way, release, expected) in cases {
                let in_the_way: Vec<Installed> = in_the_way.iter().map(|p| (*p).clone()).collect();
                assert_eq!(
                    backports_to_add(&in_the_way, release).ok().as_deref(),
                    *expected,
                    "{case}"
                );
            }
        }

        // /etc/apt/sources.list.d/debian.sources of the Debian 12 image here.
        const DEBIAN_SOURCES: &str = r#"Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
# http://snapshot.debian.org/archive/debian-security/20250520T000000Z
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"#;
        // A disabled entry first, then a mirror with an inline key and lower-case fields.
        const MIRROR_SOURCES: &str = r#"Types: deb
URIs: http://old.example/debian
Suites: bookworm
Components: main
Enabled: no

types: deb-src deb
uris: https://mirror.example/debian/ http://deb.debian.org/debian
suites: bookworm
components: main contrib
signed-by:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mDMEZ
 -----END PGP PUBLIC KEY BLOCK-----
"#;
        const NODESOURCE_SOURCES: &str = r#"Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
"#;
        // A classic /etc/apt/sources.list.
        const SOURCES_LIST: &str = r#"# deb cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_ - Official amd64 DVD]/ bookworm contrib main
deb-src http://deb.debian.org/debian bookworm main
deb http://security.debian.org/debian-security bookworm-security main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://ftp.de.debian.org/debian/ bookworm main non-free-firmware # the archive
deb http://deb.debian.org/debian bookworm-updates main
"#;

        #[test]
        fn the_archive_is_found_in_sources_files() {
            let archive = |uri: &str, signed_by: Option<&str>| {
                Some(Archive {
                    uri: uri.to_owned(),
                    signed_by: signed_by.map(str::to_owned),
                })
            };
            let keyring = Some(" /usr/share/keyrings/debian-archive-keyring.gpg");
            assert_eq!(
                archive_in_deb822(DEBIAN_SOURCES, "bookworm"),
                archive("http://deb.debian.org/debian", keyring)
            );
            assert_eq!(
                archive_in_deb822(DEBIAN_SOURCES, "trixie"),
                None,
                "another release"
            );
            assert_eq!(
                archive_in_deb822(MIRROR_SOURCES, "bookworm"),
                archive(
                    "https://mirror.example/debian/",
                    Some(
                        "\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mDMEZ\n \
                         -----END PGP PUBLIC KEY BLOCK-----"
                    )
                ),
                "the enabled entry, its first URI, its inline key"
            );
            assert_eq!(archive_in_deb822(NODESOURCE_SOURCES, "bookworm"), None);
            assert_eq!(
                archive_in_list(SOURCES_LIST, "bookworm"),
                archive("http://ftp.de.debian.org/debian/", keyring),
                "not deb-src, not a comment, not -security"
            );
            assert_eq!(
                archive_in_list("deb http://deb.debian.org/debian bookworm main", "bookworm"),
                archive("http://deb.debian.org/debian", None)
            );
            assert_eq!(archive_in_list(SOURCES_LIST, "trixie"), None);
        }

        #[test]
        fn the_added_source_is_the_archives_backports() {
            let archive = archive_in_deb822(DEBIAN_SOURCES, "bookworm").unwrap();
            let text = added_source(&archive, "bookworm-backports");
            let entry = text.split_once('\n').unwrap().1;
            assert_eq!(
                entry,
                "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
                 Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            );
            assert!(text.starts_with('#'));
            // It reads back as a source of that suite, inline keys included.
            let inline = archive_in_deb822(MIRROR_SOURCES, "bookworm").unwrap();
            assert_eq!(
                archive_in_deb822(
                    &added_source(&inline, "bookworm-backports"),
                    "bookworm-backports"
                ),
                Some(inline)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packages(purpose: Purpose) -> Vec<&'static str> {
        DEBIAN
            .iter()
            .filter(|p| purpose.takes(p.needed_by))
            .map(|p| p.package)
            .collect()
    }

    #[test]
    fn each_command_gets_what_it_needs() {
        let demo = packages(Demo);
        assert!(demo.contains(&"dnsmasq-base") && demo.contains(&"iproute2"));
        for not_for_the_demo in ["qemu-system-x86", "haproxy", "iperf3"] {
            assert!(!demo.contains(&not_for_the_demo), "{not_for_the_demo}");
        }
        assert!(packages(Bench).contains(&"haproxy"));
        // The BGP speaker of the fleet tests: the tests only.
        assert!(packages(Test).contains(&"bird2"));
        for not_for_the_tests_alone in [Demo, Bench, Vm, Purpose::Build, Purpose::Run] {
            assert!(
                !packages(not_for_the_tests_alone).contains(&"bird2"),
                "{not_for_the_tests_alone:?}"
            );
        }
        assert!(packages(Vm).contains(&"qemu-system-x86"));
        let all: Vec<&str> = DEBIAN.iter().map(|p| p.package).collect();
        assert_eq!(packages(Test), all, "the test command runs every tier");
        assert_eq!(packages(Purpose::Everything), all);
        assert!(packages(Purpose::Build).is_empty() && packages(Purpose::Run).is_empty());
    }

    #[test]
    fn packages_with_a_system_service_say_which() {
        let services: Vec<(&str, &str)> = DEBIAN
            .iter()
            .filter_map(|p| Some((p.package, p.service?)))
            .collect();
        assert_eq!(services, [("bird2", "bird"), ("haproxy", "haproxy")]);
    }

    #[test]
    fn service_starts_are_held_unless_the_machine_forbids_them_already() {
        use service_starts::{plan, Existing, Plan};
        let existing = |written_by_setup, refuses| {
            Some(Existing {
                written_by_setup,
                refuses,
            })
        };
        let cases = [
            ("none there", None, Plan::WriteOurs),
            (
                "the machine's refuses (a container's)",
                existing(false, true),
                Plan::KeepTheMachines,
            ),
            (
                "the machine's allows",
                existing(false, false),
                Plan::SetAsideTheMachines,
            ),
            (
                "a killed setup's own is replaced, then removed",
                existing(true, true),
                Plan::WriteOurs,
            ),
        ];
        for (case, existing, expected) in cases {
            assert_eq!(plan(existing), expected, "{case}");
        }
    }

    #[test]
    fn setups_policy_forbids_every_start_and_is_recognised() {
        let script = std::env::temp_dir().join(format!("policy-rc.d-test-{}", std::process::id()));
        fs::write(&script, service_starts::ours()).unwrap();
        for (service, action) in [("bird", "start"), ("haproxy", "restart")] {
            let status = Command::new("sh")
                .arg(&script)
                .args([service, action])
                .status()
                .unwrap();
            assert_eq!(status.code(), Some(101), "{service} {action}");
        }
        let text = fs::read_to_string(&script).unwrap();
        fs::remove_file(&script).unwrap();
        assert!(text.starts_with("#!/bin/sh\n"));
        assert!(text.contains(service_starts::MARKER));
    }

    #[test]
    fn the_python_record_keeps_one_version_per_tool() {
        let cases = [
            ("", &["virtme-ng==1.42"][..], "virtme-ng==1.42"),
            (
                "kubernetes-validate==1.37.0",
                &["virtme-ng==1.42"][..],
                "kubernetes-validate==1.37.0 virtme-ng==1.42",
            ),
            (
                "kubernetes-validate==1.37.0 virtme-ng==1.41\n",
                &["virtme-ng==1.42"][..],
                "kubernetes-validate==1.37.0 virtme-ng==1.42",
            ),
        ];
        for (record, added, expected) in cases {
            assert_eq!(
                record_after(record, added),
                expected,
                "{record:?} + {added:?}"
            );
        }
    }
}

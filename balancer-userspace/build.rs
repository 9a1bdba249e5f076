//! Builds the XDP programs (balancer-ebpf) for the BPF target with the pinned nightly and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`. Always release:
//! the verifier needs optimised code.

use std::{fs, path::Path};

use anyhow::{bail, Context as _};
// Not linked: a build-dependency so that cargo runs this script again when the programs change.
use balancer_ebpf as _;

fn main() -> anyhow::Result<()> {
    let ebpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../balancer-ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let toolchain = pinned_toolchain(&toolchain_file)?;

    if which("bpf-linker").is_none() {
        bail!(
            "bpf-linker is not on PATH; it links the XDP program. \
             Run `cargo xtask setup` (installs it, linked against {toolchain}'s LLVM)."
        );
    }

    let root_dir = ebpf_dir
        .to_str()
        .context("non-UTF-8 path to balancer-ebpf")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "balancer-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}

/// The `channel = "..."` of balancer-ebpf/rust-toolchain.toml.
fn pinned_toolchain(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .with_context(|| format!("{}: no `channel = \"...\"` line", path.display()))
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| candidate.is_file())
}

//! Where a data plane lives between daemons: its maps and its XDP link pinned in bpffs under
//! `<pin_dir>/<interface>/v<LAYOUT_VERSION>/`, with a small `state` map recording how it was
//! set up. A daemon that finds pins of its own layout adopts them (the connection table and
//! the counters carry on, the program is swapped through the pinned link); pins of another
//! layout are refused unless it is told to replace them.
//!
//! One daemon per interface and pin directory: a lock file under `/run/balancer/` says which.

use std::{
    fs,
    io::{Read as _, Seek as _, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use aya::maps::{Array, MapData};
use balancer_common::LAYOUT_VERSION;

/// The file name of the pinned XDP link inside a layout directory.
pub const LINK: &str = "link";
/// The file name of the pinned state map inside a layout directory.
pub const STATE: &str = "state";

/// How the pinned data plane was set up that its maps do not show, in the `state` map (one
/// entry), so that the next daemon can tell what it adopts. (The layout is in the path, the
/// connection table's size in the table itself, the owner in the lock file.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinnedState {
    /// The pinned link's attach mode: 1 native, 2 generic.
    pub xdp_mode: u32,
    /// The seed the pinned program hashes new flows with.
    pub hash_seed: u32,
}

// SAFETY: plain integers, no padding.
unsafe impl aya::Pod for PinnedState {}

/// `<pin_dir>/<interface>`: every layout's directory for the interface.
pub fn interface_dir(pin_dir: &Path, interface: &str) -> PathBuf {
    pin_dir.join(interface)
}

/// `<pin_dir>/<interface>/v<LAYOUT_VERSION>`: this build's pins.
pub fn layout_dir(pin_dir: &Path, interface: &str) -> PathBuf {
    interface_dir(pin_dir, interface).join(format!("v{LAYOUT_VERSION}"))
}

/// The layout versions pinned for an interface (directory names `v<N>`), sorted.
pub fn pinned_layouts(pin_dir: &Path, interface: &str) -> Vec<u32> {
    let mut found: Vec<u32> = fs::read_dir(interface_dir(pin_dir, interface))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .and_then(|v| v.parse().ok())
        })
        .collect();
    found.sort();
    found
}

/// Creates the layout directory, after checking that it is on a bpffs.
pub fn prepare(pin_dir: &Path, interface: &str) -> anyhow::Result<PathBuf> {
    let dir = layout_dir(pin_dir, interface);
    let existing = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        let hint = if pin_dir.starts_with("/sys") && !is_bpffs(Path::new("/sys/fs/bpf")) {
            " (/sys/fs/bpf is not a bpffs here: under `ip netns exec`, /sys is a fresh sysfs \
             without it; mount one elsewhere, e.g. `mkdir -p /run/balancer/bpf && mount -t bpf \
             bpf /run/balancer/bpf`, and point pin_dir there)"
        } else {
            ""
        };
        bail!(
            "pin_dir {} is not on a BPF filesystem{hint}",
            pin_dir.display()
        );
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs on a valid C string into a zeroed struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut stat) } == 0) && stat.f_type as i64 == BPF_FS_MAGIC
}

/// Reads the `state` map of a layout directory, if there is one.
pub fn read_state(dir: &Path) -> Option<PinnedState> {
    let map = MapData::from_pin(dir.join(STATE)).ok()?;
    let array: Array<MapData, PinnedState> = Array::try_from(aya::maps::Map::Array(map)).ok()?;
    array.get(&0, 0).ok()
}

/// Writes the `state` map of a layout directory, creating and pinning it if needed.
pub fn write_state(dir: &Path, state: PinnedState) -> anyhow::Result<()> {
    let path = dir.join(STATE);
    let map = match MapData::from_pin(&path) {
        Ok(map) => map,
        Err(_) => {
            let definition = aya_obj::Map::new_from_params(
                aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
                4,
                std::mem::size_of::<PinnedState>() as u32,
                1,
                0,
            );
            let map = MapData::create(definition, "balancer_state", None)
                .context("creating the state map")?;
            map.pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
            map
        }
    };
    let mut array: Array<MapData, PinnedState> =
        Array::try_from(aya::maps::Map::Array(map)).context("the state map")?;
    array.set(0, state, 0).context("writing the state map")?;
    Ok(())
}

/// Removes every pin of an interface (all layouts) and the directories, bottom up. Removing
/// the link's pin detaches the program once no process holds the link. Returns what was
/// removed, as paths.
pub fn remove_all(pin_dir: &Path, interface: &str) -> std::io::Result<Vec<PathBuf>> {
    let root = interface_dir(pin_dir, interface);
    let mut removed = Vec::new();
    if !root.exists() {
        return Ok(removed);
    }
    for layout in fs::read_dir(&root)? {
        let layout = layout?.path();
        if layout.is_dir() {
            // The link first, so that the program stops before its maps go.
            let link = layout.join(LINK);
            if link.exists() {
                fs::remove_file(&link)?;
                removed.push(link);
            }
            let mut entries: Vec<PathBuf> = fs::read_dir(&layout)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            entries.sort();
            for entry in entries {
                fs::remove_file(&entry)?;
                removed.push(entry);
            }
            fs::remove_dir(&layout)?;
        } else {
            fs::remove_file(&layout)?;
            removed.push(layout);
        }
    }
    fs::remove_dir(&root)?;
    // The pin directory itself, if this was its last interface.
    let _ = fs::remove_dir(pin_dir);
    Ok(removed)
}

/// An exclusive lock on a pin directory and interface: one daemon at a time. Held until
/// dropped (or the process dies).
pub struct Lock {
    /// Held open: the lock lasts as long as the descriptor.
    _file: fs::File,
    path: PathBuf,
}

/// The lock file for `<pin_dir>/<interface>`.
fn lock_path(pin_dir: &Path, interface: &str) -> PathBuf {
    let flat: String = interface_dir(pin_dir, interface)
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    Path::new("/run/balancer").join(format!("{flat}.lock"))
}

impl Lock {
    /// Takes the lock, or says which process holds it.
    pub fn take(pin_dir: &Path, interface: &str) -> anyhow::Result<Lock> {
        let path = lock_path(pin_dir, interface);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an open file.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "another balancer (pid {}) runs on {} with pin directory {}: stop it first",
                holder.trim(),
                interface,
                pin_dir.display()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(Lock { _file: file, path })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Unlinked while still locked, so no other process can have locked this file.
        let _ = fs::remove_file(&self.path);
    }
}

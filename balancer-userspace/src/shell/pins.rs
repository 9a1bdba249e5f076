//! Where a data plane lives between daemons: its maps and its XDP link pinned in bpffs under
//! `<pin_dir>/<interface>/v<LAYOUT_VERSION>/`, with a small `state` map recording how it was
//! set up. A daemon that finds pins of its own layout adopts them (the connection table and
//! the counters carry on, the program is swapped through the pinned link); pins of another
//! layout are refused unless it is told to replace them.
//!
//! One daemon per interface and pin directory: a lock file under `/run/balancer/` says which,
//! and the daemon's control socket sits beside it.

use std::{
    fs,
    io::{Read as _, Seek as _, Write as _},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapData},
    programs::links::{FdLink, PinnedLink},
};
use balancer_common::{map_names, LAYOUT_VERSION};

/// The file name of the pinned XDP link inside a layout directory.
pub const LINK: &str = "link";
/// The pins of the links on the interfaces NAT replies arrive on: `link-<interface>`.
pub const REPLY_LINK_PREFIX: &str = "link-";

/// Whether a pinned file is the link of an interface NAT replies arrive on.
pub fn is_reply_link(file: &str) -> bool {
    file.starts_with(REPLY_LINK_PREFIX)
}
/// The file name of the pinned state map inside a layout directory.
pub const STATE: &str = "state";
/// Where lock files and control sockets live.
pub const RUN_DIR: &str = "/run/balancer";

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "the data plane pinned in {dir} does not match this build: {}. Start with --replace to \
         replace it: a fresh data plane (empty connection table, counters from zero) takes over \
         the interface, and established flows are placed again by the Maglev tables (most keep \
         their backend; those that land elsewhere break)",
        problems.join("; ")
    )]
    Incompatible { dir: String, problems: Vec<String> },
    #[error(
        "{root} holds a data plane of map layout {layouts} and this build uses layout v{LAYOUT_VERSION}: \
         its maps cannot be adopted. Start with --replace to replace it: a fresh data plane (empty \
         connection table, counters from zero) takes over {interface} without a gap, and \
         established flows are placed again by the Maglev tables (most keep their backend; those \
         that land elsewhere break). `{detach}` removes it instead."
    )]
    OtherLayout {
        root: String,
        layouts: String,
        interface: String,
        /// The command that removes it.
        detach: String,
    },
    #[error("pin_dir {dir} is not on a BPF filesystem{hint}")]
    NotBpffs { dir: String, hint: &'static str },
    #[error("another balancer (pid {pid}) runs on {interface} with pin directory {pin_dir}: stop it first")]
    Busy {
        pid: String,
        interface: String,
        pin_dir: String,
    },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state map in {}", dir.display())]
    State {
        dir: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

type Result<T, E = PinError> = std::result::Result<T, E>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PinError + 'a {
    move |source| PinError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// How the pinned data plane was set up that its maps do not show, in the `state` map (one
/// entry), so that the next daemon can tell what it adopts. (The layout is in the path, the
/// connection table's size in the table itself, the owner in the lock file.)
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinnedState {
    /// The pinned link's attach mode: 1 native, 2 generic (see `AttachedMode::code`).
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

/// The command that removes what is pinned for `interface` under `pin_dir`: with
/// `--pin-dir` unless it is the default (which `detach` looks in without it).
pub fn detach_command(pin_dir: &Path, interface: &str) -> String {
    if pin_dir == Path::new(crate::config::DEFAULT_PIN_DIR) {
        format!("balancer detach --interface {interface}")
    } else {
        format!(
            "balancer detach --interface {interface} --pin-dir {}",
            pin_dir.display()
        )
    }
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

/// A replaced data plane's link, held open while its pins are removed (so that the program
/// on the interface is swapped, not removed), and how it was set up.
pub type PreviousLink = Option<(FdLink, Option<PinnedState>)>;

/// Makes the layout directory, refusing pins of another layout unless `replace`: then their
/// link is taken and the pins removed. Returns the directory and the taken link.
pub fn prepare_layout(
    pin_dir: &Path,
    interface: &str,
    replace: bool,
) -> Result<(PathBuf, PreviousLink)> {
    let others: Vec<u32> = pinned_layouts(pin_dir, interface)
        .into_iter()
        .filter(|&v| v != LAYOUT_VERSION)
        .collect();
    if others.is_empty() {
        return Ok((prepare(pin_dir, interface)?, None));
    }
    let layouts = others
        .iter()
        .map(|v| format!("v{v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let root = interface_dir(pin_dir, interface);
    if !replace {
        return Err(PinError::OtherLayout {
            root: root.display().to_string(),
            layouts,
            interface: interface.to_owned(),
            detach: detach_command(pin_dir, interface),
        });
    }
    tracing::warn!(
        "replacing the data plane of layout {layouts} in {} (--replace)",
        root.display()
    );
    clear(pin_dir, interface)
}

/// For --replace: takes the pinned link of any layout, removes every pin of the interface,
/// and makes an empty layout directory.
pub fn clear(pin_dir: &Path, interface: &str) -> Result<(PathBuf, PreviousLink)> {
    let previous = take_link(pin_dir, interface);
    remove_all(pin_dir, interface).map_err(io(
        "removing the pins under",
        &interface_dir(pin_dir, interface),
    ))?;
    Ok((prepare(pin_dir, interface)?, previous))
}

/// Opens the pinned link of any layout of the interface.
fn take_link(pin_dir: &Path, interface: &str) -> PreviousLink {
    pinned_layouts(pin_dir, interface)
        .into_iter()
        .find_map(|layout| {
            let dir = interface_dir(pin_dir, interface).join(format!("v{layout}"));
            let pinned = PinnedLink::from_pin(dir.join(LINK)).ok()?;
            Some((FdLink::from(pinned), read_state(&dir)))
        })
}

/// Creates the layout directory, after checking that it is on a bpffs.
fn prepare(pin_dir: &Path, interface: &str) -> Result<PathBuf> {
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
        return Err(PinError::NotBpffs {
            dir: pin_dir.display().to_string(),
            hint,
        });
    }
    fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    Ok(dir)
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a plain C struct of integers, for which all zeroes is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a struct statfs to fill, both alive for the call.
    let found = unsafe { libc::statfs(c.as_ptr(), &mut stat) } == 0;
    found && stat.f_type as i64 == BPF_FS_MAGIC
}

/// Reads the `state` map of a layout directory, if there is one.
pub fn read_state(dir: &Path) -> Option<PinnedState> {
    let map = MapData::from_pin(dir.join(STATE)).ok()?;
    let array: Array<MapData, PinnedState> = Array::try_from(aya::maps::Map::Array(map)).ok()?;
    array.get(&0, 0).ok()
}

/// Writes the `state` map of a layout directory, creating and pinning it if needed.
pub fn write_state(dir: &Path, state: PinnedState) -> Result<()> {
    let path = dir.join(STATE);
    let map_error = |source| PinError::State {
        dir: dir.to_owned(),
        source,
    };
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
            let map = MapData::create(definition, "balancer_state", None).map_err(map_error)?;
            map.pin(&path).map_err(|e| PinError::Io {
                what: "pinning",
                path: path.clone(),
                source: std::io::Error::other(e),
            })?;
            map
        }
    };
    let mut array: Array<MapData, PinnedState> =
        Array::try_from(aya::maps::Map::Array(map)).map_err(map_error)?;
    array.set(0, state, 0).map_err(map_error)
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
        if !layout.is_dir() {
            fs::remove_file(&layout)?;
            removed.push(layout);
            continue;
        }
        // The links first, so that the program stops before its maps go.
        let link = layout.join(LINK);
        if link.exists() {
            fs::remove_file(&link)?;
            removed.push(link);
        }
        for entry in fs::read_dir(&layout)? {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|n| is_reply_link(&n.to_string_lossy()))
            {
                fs::remove_file(&path)?;
                removed.push(path);
            }
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
    }
    fs::remove_dir(&root)?;
    // The pin directory itself, if this was its last interface.
    let _ = fs::remove_dir(pin_dir);
    Ok(removed)
}

/// What runs from the pins of an interface, one line per pinned link, for `balancer detach`.
pub fn pinned_programs(pin_dir: &Path, interface: &str) -> Vec<String> {
    let root = interface_dir(pin_dir, interface);
    pinned_layouts(pin_dir, interface)
        .into_iter()
        .filter_map(|layout| {
            let link = root.join(format!("v{layout}")).join(LINK);
            let info = FdLink::from(PinnedLink::from_pin(&link).ok()?)
                .info()
                .ok()?;
            Some(format!(
                "program {} (link {}, layout v{layout}) detached from {interface}",
                info.program_id(),
                info.id()
            ))
        })
        .collect()
}

/// The maps of an object that are pinned: all but the global data sections (which belong to
/// one load of the program).
pub fn pinnable_maps(obj: &aya_obj::Object) -> Vec<String> {
    let mut names: Vec<String> = obj
        .maps
        .keys()
        .filter(|n| !n.starts_with('.'))
        .cloned()
        .collect();
    names.sort();
    names
}

/// Compares the maps pinned in `dir` with the maps `obj` declares (type, key and value sizes,
/// capacity, flags), and looks for pins the object does not know. `sizes`: the capacities
/// the connection, pending and NAT tables are loaded with (`conn_table_size`,
/// `pending_table_size`, `nat_table_size`).
pub fn check_compatible(
    obj: &aya_obj::Object,
    (conn_table_size, pending_table_size, nat_table_size): (u32, u32, u32),
    dir: &Path,
    names: &[String],
) -> Result<()> {
    let mut problems = Vec::new();
    for name in names {
        match MapData::from_pin(dir.join(name)) {
            Err(_) => problems.push(format!("map {name} is not pinned")),
            Ok(pinned) => match pinned.info() {
                Err(e) => problems.push(format!("map {name}: {e}")),
                Ok(info) => {
                    let capacity = if map_names::CONN_TABLES.contains(&name.as_str()) {
                        conn_table_size
                    } else if map_names::PENDING_TABLES.contains(&name.as_str())
                        || map_names::NAT_PENDING_TABLES.contains(&name.as_str())
                    {
                        pending_table_size
                    } else if map_names::NAT_TABLES.contains(&name.as_str()) {
                        2 * nat_table_size
                    } else {
                        obj.maps[name].max_entries()
                    };
                    compare_map(name, &obj.maps[name], &info, capacity, &mut problems);
                }
            },
        }
    }
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file != LINK && file != STATE && !is_reply_link(&file) && !names.contains(&file) {
            problems.push(format!("{file} is pinned but this build has no such map"));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(PinError::Incompatible {
        dir: dir.display().to_string(),
        problems,
    })
}

/// One pinned map against its definition.
fn compare_map(
    name: &str,
    def: &aya_obj::Map,
    info: &aya::maps::MapInfo,
    capacity: u32,
    problems: &mut Vec<String>,
) {
    use aya_obj::generated::bpf_map_type::*;
    // The kernel sizes the values of these maps and adds flags of its own.
    let sized_by_kernel = [
        BPF_MAP_TYPE_DEVMAP as u32,
        BPF_MAP_TYPE_DEVMAP_HASH as u32,
        BPF_MAP_TYPE_ARRAY_OF_MAPS as u32,
        BPF_MAP_TYPE_HASH_OF_MAPS as u32,
    ]
    .contains(&def.map_type());
    if info.key_size() != def.key_size() {
        problems.push(format!(
            "map {name} has {}-byte keys pinned, this build uses {}",
            info.key_size(),
            def.key_size()
        ));
    }
    if !sized_by_kernel && info.value_size() != def.value_size() {
        problems.push(format!(
            "map {name} has {}-byte values pinned, this build uses {}",
            info.value_size(),
            def.value_size()
        ));
    }
    if info.max_entries() != capacity {
        problems.push(if map_names::CONN_TABLES.contains(&name) {
            format!(
                "the pinned connection table {name} holds {} flows, conn_table_size asks for \
                 {capacity}",
                info.max_entries()
            )
        } else if map_names::PENDING_TABLES.contains(&name)
            || map_names::NAT_PENDING_TABLES.contains(&name)
        {
            format!(
                "the pinned pending table {name} holds {} flows, flood pending_table_size asks \
                 for {capacity}",
                info.max_entries()
            )
        } else if map_names::NAT_TABLES.contains(&name) {
            format!(
                "the pinned NAT table {name} holds {} connections, nat_table_size asks for {}",
                info.max_entries() / 2,
                capacity / 2
            )
        } else {
            format!(
                "map {name} holds {} entries pinned, this build {capacity}",
                info.max_entries()
            )
        });
    }
    if !sized_by_kernel && info.map_flags() != def.map_flags() {
        problems.push(format!(
            "map {name} has flags {:#x} pinned, this build {:#x}",
            info.map_flags(),
            def.map_flags()
        ));
    }
}

/// The file for `<pin_dir>/<interface>` under `/run/balancer`, flattened: the lock is
/// `<it>.lock`, the control socket `<it>.sock`.
pub fn run_file(pin_dir: &Path, interface: &str, extension: &str) -> PathBuf {
    let flat: String = interface_dir(pin_dir, interface)
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    Path::new(RUN_DIR).join(format!("{flat}.{extension}"))
}

/// An exclusive lock on a pin directory and interface: one daemon at a time. Held until
/// dropped (or the process dies).
pub struct Lock {
    /// Held open: the lock lasts as long as the descriptor.
    _file: fs::File,
    path: PathBuf,
}

impl Lock {
    /// Takes the lock, or says which process holds it.
    pub fn take(pin_dir: &Path, interface: &str) -> Result<Lock> {
        let path = run_file(pin_dir, interface, "lock");
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("opening", &path))?;
        // SAFETY: flock on an open file.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(PinError::Busy {
                pid: holder.trim().to_owned(),
                interface: interface.to_owned(),
                pin_dir: pin_dir.display().to_string(),
            });
        }
        let write = |file: &mut fs::File| -> std::io::Result<()> {
            file.set_len(0)?;
            file.rewind()?;
            write!(file, "{}", std::process::id())
        };
        write(&mut file).map_err(io("writing", &path))?;
        Ok(Lock { _file: file, path })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Unlinked while still locked, so no other process can have locked this file.
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_files_are_named_after_pin_dir_and_interface() {
        let dir = Path::new("/sys/fs/bpf/balancer");
        assert_eq!(
            run_file(dir, "eth0", "sock"),
            Path::new("/run/balancer/sys_fs_bpf_balancer_eth0.sock")
        );
        assert_eq!(
            run_file(Path::new("/tmp/x/bpf"), "eth0", "lock"),
            Path::new("/run/balancer/tmp_x_bpf_eth0.lock")
        );
    }
}

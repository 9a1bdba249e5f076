//! A per-test directory for configs and logs: removed when the test passes, kept (and named)
//! when it fails, and left-overs of killed runs removed before new ones are made. Each one
//! also names a pin directory for the balancer's maps and link, always removed.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// A bpffs of the tests' own. The balancer runs under `ip netns exec`, which gives it a fresh
/// /sys without the /sys/fs/bpf mount, so its pins go to a bpffs mounted here (once, and left
/// mounted for later runs).
pub const TEST_BPFFS: &str = "/run/balancer-netns/bpf";

/// [`TEST_BPFFS`], mounted if it is not yet.
pub fn test_bpffs() -> &'static Path {
    static MOUNTED: OnceLock<()> = OnceLock::new();
    MOUNTED.get_or_init(|| {
        let dir = Path::new(TEST_BPFFS);
        if !is_bpffs(dir) {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            crate::netns::run("mount", &["-t", "bpf", "bpf", TEST_BPFFS]);
        }
    });
    Path::new(TEST_BPFFS)
}

/// Whether `path` is on a BPF filesystem.
pub fn is_bpffs(path: &Path) -> bool {
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

/// For a name `<prefix><pid>-...`: whether process `pid` still runs (`None`: the name does
/// not start with `prefix`, `Some(false)` also when it carries no pid). What a crashed or
/// killed run left behind is named by a process that is gone.
pub(crate) fn owner_alive(name: &str, prefix: &str) -> Option<bool> {
    let rest = name.strip_prefix(prefix)?;
    let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
    Some(pid.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists()))
}

/// Removes `<prefix><pid>-*` entries of `root` whose process is gone.
fn remove_dead(root: &Path, prefix: &str) {
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if owner_alive(&file_name, prefix) == Some(false) {
                let _ = std::fs::remove_dir_all(entry.path());
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// A daemon killed in a test leaves its lock file and control socket in `/run/balancer`,
/// named after its pin directory (`..._<prefix><pid>-<name>_<interface>.lock`): removed once
/// that process is gone.
fn remove_dead_run_files(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/run/balancer") else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let owner = file_name.find(prefix).map(|at| &file_name[at..]);
        if owner.and_then(|o| owner_alive(o, prefix)) == Some(false) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

pub struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Scratch {
    /// `/tmp/<prefix><pid>-<name>`, empty.
    pub fn new(prefix: &str, name: &str) -> Scratch {
        // Left-overs of runs whose process is gone: files, and pins (removing a link's pin
        // detaches its program).
        remove_dead(&std::env::temp_dir(), prefix);
        remove_dead(Path::new(TEST_BPFFS), prefix);
        remove_dead_run_files(prefix);
        Scratch::named(&format!("{prefix}{}-{name}", std::process::id()))
    }

    /// `/tmp/<dir_name>`, empty (no clean-up of left-overs: see `new`).
    pub fn named(dir_name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(dir_name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Scratch { dir, keep: false }
    }

    /// Keeps the directory when dropped (to show its logs after a failure).
    pub fn keep(&mut self) -> &Path {
        self.keep = true;
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The pin directory for `balancer run --pin-dir`, on the tests' bpffs, named like this
    /// directory. Removed with it (always, pass or fail).
    pub fn pin_dir(&self) -> PathBuf {
        test_bpffs().join(self.dir.file_name().expect("named"))
    }

    /// [`Scratch::pin_dir`] as a string, for command lines.
    pub fn pin_dir_arg(&self) -> String {
        self.pin_dir().to_str().expect("UTF-8").to_owned()
    }

    /// Writes `name` the way editors and Kubernetes do: a temporary file renamed into place.
    pub fn write_atomically(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &path)
            .unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(name) = self.dir.file_name() {
            let _ = std::fs::remove_dir_all(Path::new(TEST_BPFFS).join(name));
        }
        if self.keep {
            // The caller said where (`keep`).
        } else if std::thread::panicking() {
            eprintln!(
                "test failed: its configs and logs are kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

//! A per-test directory for configs and logs: removed when the test passes, kept (and named)
//! when it fails, and left-overs of killed runs removed before new ones are made.

use std::path::{Path, PathBuf};

pub struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Scratch {
    /// `/tmp/<prefix><pid>-<name>`, empty.
    pub fn new(prefix: &str, name: &str) -> Scratch {
        let root = std::env::temp_dir();
        // Left-overs of runs whose process is gone.
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let file_name = entry.file_name().to_string_lossy().into_owned();
                let Some(rest) = file_name.strip_prefix(prefix) else {
                    continue;
                };
                let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
                if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
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
        if std::thread::panicking() {
            eprintln!(
                "test failed: its configs and logs are kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

//! Watching the config file: its directory, so that editors' atomic renames and Kubernetes
//! ConfigMap symlink swaps are seen. A file replaced by a rename is whole at once and read
//! after `RENAME_DEBOUNCE`; a file written in place may be half-written, and is read only
//! once it has not changed for the settle time (`reload_settle`, [`Settle`]). Reading the
//! file is no change, so a rejected file is not read again until it changes.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use notify::{
    event::{ModifyKind, RenameMode},
    EventKind,
};
use tokio::sync::mpsc;

/// After a rename, wait this long for the rest of a burst (an editor's rename and its
/// chmod; a ConfigMap's two renames).
pub const RENAME_DEBOUNCE: Duration = Duration::from_millis(20);

/// How the file changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Renamed into place or removed: what is there now is whole.
    Replaced,
    /// Written in place (created, modified, attributes): more may follow.
    Written,
}

/// When to read the file after changes: `RENAME_DEBOUNCE` after a rename, the settle time
/// after the last write in place. The latest change decides: a rename after writes makes the
/// file whole; a write after a rename may be the first of many.
#[derive(Clone, Debug)]
pub struct Settle {
    settle: Duration,
    due: Option<Instant>,
}

impl Settle {
    pub fn new(settle: Duration) -> Settle {
        Settle { settle, due: None }
    }

    /// The running config's settle time (a reload may change it).
    pub fn set_settle(&mut self, settle: Duration) {
        self.settle = settle;
    }

    pub fn changed(&mut self, change: Change, now: Instant) {
        let wait = match change {
            Change::Replaced => RENAME_DEBOUNCE,
            Change::Written => self.settle,
        };
        self.due = Some(now + wait);
    }

    /// When the file is to be read, if a change waits.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Whether the file is to be read now; the change is then taken.
    pub fn take(&mut self, now: Instant) -> bool {
        if self.due.is_some_and(|due| due <= now) {
            self.due = None;
            return true;
        }
        false
    }
}

/// What an inotify event means for the file, if it concerns it at all.
fn change_of(kind: &EventKind) -> Option<Change> {
    match kind {
        // Reading the file (the daemon's own reload included) is no change.
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
        | EventKind::Remove(_) => Some(Change::Replaced),
        // Renamed away: nothing (or another rename) is there now.
        EventKind::Modify(ModifyKind::Name(_)) => Some(Change::Replaced),
        _ => Some(Change::Written),
    }
}

/// Watches `path`; sends every change that may concern it.
pub fn watch_config(
    path: &Path,
    changed: mpsc::Sender<Change>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher as _};
    let path = std::path::absolute(path)?;
    let dir = path
        .parent()
        .context("the config file has no directory")?
        .to_owned();
    let mut names = vec![
        path.file_name().context("no file name")?.to_owned(),
        "..data".into(),
    ];
    // A symlinked config (ConfigMap): its target's name too.
    if let Ok(target) = std::fs::canonicalize(&path) {
        if let Some(name) = target.file_name() {
            names.push(name.to_owned());
        }
    }
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let Some(change) = change_of(&event.kind) else {
            return;
        };
        let concerns = event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|n| names.iter().any(|w| w == n)));
        if concerns {
            // Full: the loop has not taken the last change yet; it takes this one next
            // (blocking this watcher thread briefly, never the event loop).
            let _ = changed.blocking_send(change);
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tracing::info!(
        "watching {} for changes of {}",
        dir.display(),
        path.display()
    );
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, RemoveKind};

    use super::*;

    const SETTLE: Duration = Duration::from_millis(1000);

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_file_written_in_place_is_read_once_after_it_settles() {
        let t0 = Instant::now();
        let mut settle = Settle::new(SETTLE);
        assert!(!settle.take(t0), "nothing changed");
        // The first half, a 300 ms pause, the second half.
        settle.changed(Change::Written, t0);
        assert!(!settle.take(ms(t0, 299)));
        settle.changed(Change::Written, ms(t0, 300));
        // Not read a settle time after the first write: it changed since.
        assert!(!settle.take(ms(t0, 1000)));
        assert!(!settle.take(ms(t0, 1299)));
        assert_eq!(settle.due(), Some(ms(t0, 1300)));
        assert!(settle.take(ms(t0, 1300)), "read once it has been quiet");
        assert!(!settle.take(ms(t0, 5000)), "and only once");
        assert_eq!(settle.due(), None);
    }

    #[test]
    fn a_file_replaced_by_a_rename_is_read_at_once() {
        let t0 = Instant::now();
        let mut settle = Settle::new(SETTLE);
        settle.changed(Change::Written, t0);
        // A rename after writes: whole now.
        settle.changed(Change::Replaced, ms(t0, 100));
        assert!(!settle.take(ms(t0, 119)));
        assert!(settle.take(ms(t0, 120)));
        // A write after a rename: it may be the first of several.
        settle.changed(Change::Replaced, ms(t0, 200));
        settle.changed(Change::Written, ms(t0, 210));
        assert!(!settle.take(ms(t0, 300)));
        assert!(settle.take(ms(t0, 1210)));
    }

    #[test]
    fn the_settle_time_follows_the_running_config() {
        let t0 = Instant::now();
        let mut settle = Settle::new(SETTLE);
        settle.set_settle(Duration::from_millis(50));
        settle.changed(Change::Written, t0);
        assert!(settle.take(ms(t0, 50)));
    }

    #[test]
    fn inotify_events_are_classified() {
        let written = [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Any),
        ];
        for kind in written {
            assert_eq!(change_of(&kind), Some(Change::Written), "{kind:?}");
        }
        let replaced = [
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Remove(RemoveKind::File),
        ];
        for kind in replaced {
            assert_eq!(change_of(&kind), Some(Change::Replaced), "{kind:?}");
        }
        // Reads and closes, the daemon's own included, are no change.
        let read = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert_eq!(change_of(&read), None);
        assert_eq!(change_of(&EventKind::Access(AccessKind::Read)), None);
    }
}

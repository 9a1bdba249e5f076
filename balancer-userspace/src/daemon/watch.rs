//! Watching the config file: its directory, so that editors' atomic renames and Kubernetes
//! ConfigMap symlink swaps are seen; every change that may concern the file is reported.

use std::path::Path;

use anyhow::Context as _;
use tokio::sync::mpsc;

/// Watches `path`; sends `()` for every change that may concern it (the event loop waits
/// for quiet before it reloads).
pub fn watch_config(
    path: &Path,
    changed: mpsc::Sender<()>,
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
        // Reading the file (the daemon's own reload included) is no change.
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        let concerns = event
            .paths
            .iter()
            .any(|p| p.file_name().is_some_and(|n| names.iter().any(|w| w == n)));
        if concerns {
            // Full: a change is already waiting to be seen, which is enough.
            let _ = changed.try_send(());
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

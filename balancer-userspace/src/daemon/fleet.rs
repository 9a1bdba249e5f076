//! The daemon's part in a fleet: the routes that announce VIPs (`[announce]`) and the
//! connection-table sync (`[sync]`), started beside the event loop, and the withdrawal at
//! shutdown.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{
    config::Announce,
    core::{Core, Output},
    shell::{
        dataplane::Dataplane,
        routes::RouteWriter,
        sync::{self as sync_io, SyncMaps, SyncOptions},
    },
    sync::{wire::Key, Directory, SyncStats},
};

/// The running fleet pieces the event loop drives.
#[derive(Default)]
pub struct Fleet {
    /// Writes the announced routes.
    pub routes: Option<RouteWriter>,
    /// The sync's counters (for the status), and where its view of the maps is published.
    pub sync: Option<(Arc<SyncStats>, watch::Sender<Arc<Directory>>)>,
}

/// What the fleet pieces report to the event loop.
pub struct FleetInputs {
    pub route_failures: mpsc::UnboundedReceiver<String>,
    pub sync_ready: mpsc::UnboundedReceiver<String>,
}

/// Starts what the config asks for; writes the first routes.
pub fn start(
    core: &Core,
    dataplane: &Dataplane,
    first: &mut Output,
    sync_key: Option<Key>,
) -> anyhow::Result<(Fleet, FleetInputs)> {
    let (route_failures, route_failures_inbox) = mpsc::unbounded_channel();
    let (ready, sync_ready) = mpsc::unbounded_channel();
    let mut fleet = Fleet::default();
    if let Some(announce) = &core.config().announce {
        let routes = RouteWriter::spawn(announce.table, route_failures)
            .context("opening a netlink socket for the announced routes")?;
        if let Some(set) = first.routes.take() {
            routes.set(set);
        }
        fleet.routes = Some(routes);
    }
    if let (Some(settings), Some(key)) = (&core.config().sync, sync_key) {
        let maps = SyncMaps::open(dataplane).context("opening the maps for the sync")?;
        let (directory, directory_rx) = watch::channel(Arc::new(Directory::new(core.desired())));
        let options = SyncOptions {
            settings: settings.clone(),
            key,
            seed: core.config().hash_seed,
            bulk: core.adopted().is_none(),
        };
        let (stats, _task) = sync_io::start(options, maps, directory_rx, ready)?;
        info!(
            "sync: listening on {}, sending new flows every {:?} to {} peers",
            settings.listen,
            settings.interval,
            settings.peers.len()
        );
        fleet.sync = Some((stats, directory));
    }
    Ok((
        fleet,
        FleetInputs {
            route_failures: route_failures_inbox,
            sync_ready,
        },
    ))
}

impl Fleet {
    /// The maps changed: the sync's view of them follows.
    pub fn maps_changed(&self, core: &Core) {
        if let Some((_, directory)) = &self.sync {
            directory.send_replace(Arc::new(Directory::new(core.desired())));
        }
    }

    /// Withdraws every VIP before the data plane is removed, and forwards on for
    /// `withdraw_wait` while the router moves the flows to the other balancers. A data plane
    /// that stays forwarding (`keep`) stays announced: the next daemon takes over its routes.
    pub async fn withdraw_before_exit(&mut self, announce: Option<&Announce>, keep: bool) {
        let (Some(routes), Some(announce)) = (self.routes.take(), announce) else {
            return;
        };
        if keep {
            info!(
                "the announced VIPs stay in table {} (the data plane stays forwarding)",
                announce.table
            );
            return;
        }
        match routes.withdraw_all().await {
            Ok(n) => info!(
                "withdrew {n} VIP routes from table {}; forwarding for {:?} more while the \
                 router moves their flows (announce withdraw_wait)",
                announce.table, announce.withdraw_wait
            ),
            Err(e) => warn!("withdrawing the VIP routes: {e}"),
        }
        tokio::time::sleep(announce.withdraw_wait).await;
    }
}

//! `balancer run`: resolve, load, attach, fill the maps, serve the status API, keep next hops
//! fresh, and on SIGINT/SIGTERM detach and remove everything.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::{
    config::{self, Config},
    dataplane::{error_chain, Dataplane, LoadOptions},
    nexthop::Resolver,
    reconcile::{self, DesiredState, Ids, NextHops},
    status::{self, format_mac, Shared},
};

/// How often next hops are resolved again (a backend's MAC address can change, and one that
/// did not answer at start-up may answer later).
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(10);

pub struct RunOptions {
    pub config: PathBuf,
    pub interface: Option<String>,
}

pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let config = config::load(&options.config)?;
    let interface = options
        .interface
        .clone()
        .or_else(|| config.interface.clone())
        .context("no interface to attach to: set `interface` in [balancer] or pass --interface")?;
    require_root()?;

    let resolver = Resolver::new().context("opening a netlink socket")?;
    let next_hops = resolve(&resolver, &config).await;
    let mut ids = Ids::default();
    let desired = reconcile::desired_state(&config, &next_hops, &HashMap::new(), &mut ids)?;

    let mut dataplane = Dataplane::load(LoadOptions {
        hash_seed: config.hash_seed,
        conn_table_size: config.conn_table_size,
    })
    .map_err(|e| anyhow::anyhow!(error_chain(&e)))
    .context("loading the XDP program")?;
    let (mode, fallback) = dataplane
        .attach(&interface, config.xdp_mode)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
        .with_context(|| {
            format!(
                "attaching to {interface}; if another XDP program is attached there, remove it \
                 first (`ip link set dev {interface} xdp off`)"
            )
        })?;
    if let Some(reason) = fallback {
        warn!("native XDP refused on {interface} ({reason}); attached in generic mode, which is slower");
    }
    dataplane
        .apply(&desired)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
        .context("writing the maps")?;
    log_summary(&config, &interface, mode.as_str(), &desired, &next_hops);

    let listener = status::bind(config.metrics_listen)
        .await
        .with_context(|| format!("listening on metrics_listen {}", config.metrics_listen))?;
    let shared = Arc::new(Mutex::new(Shared {
        config,
        dataplane,
        next_hops,
    }));
    info!(
        "status API on http://{}/api/v1/status",
        listener.local_addr()?
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let api = {
        let mut stop = stop_rx.clone();
        tokio::spawn(status::serve(listener, shared.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    };
    let refresh = tokio::spawn(refresh_next_hops(resolver, shared.clone(), ids, stop_rx));

    let which = termination().await?;
    info!("{which}: shutting down");
    let _ = stop_tx.send(true);
    let _ = refresh.await;
    match api.await {
        Ok(Err(e)) => warn!("status API: {e}"),
        Err(e) => warn!("status API task: {e}"),
        Ok(Ok(())) => {}
    }
    // Dropping the last reference detaches the program and frees every map.
    let shared =
        Arc::try_unwrap(shared).map_err(|_| anyhow::anyhow!("state still shared at shutdown"))?;
    drop(
        shared
            .into_inner()
            .map_err(|_| anyhow::anyhow!("state lock poisoned"))?,
    );
    info!("detached from {interface}; the program and its maps are removed");
    Ok(())
}

/// Waits for SIGTERM or SIGINT and says which.
async fn termination() -> anyhow::Result<&'static str> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    })
}

/// `balancer xdp-pass`: the trivial program on `interface` until SIGINT/SIGTERM.
pub async fn xdp_pass(interface: String) -> anyhow::Result<()> {
    require_root()?;
    let mut dataplane = Dataplane::load(LoadOptions {
        hash_seed: 0,
        conn_table_size: config::MIN_CONN_TABLE_SIZE,
    })
    .map_err(|e| anyhow::anyhow!(error_chain(&e)))
    .context("loading the XDP object")?;
    let mode = dataplane
        .attach_pass(&interface)
        .map_err(|e| anyhow::anyhow!(error_chain(&e)))?;
    info!("XDP_PASS attached to {interface} in {} mode", mode.as_str());
    let which = termination().await?;
    drop(dataplane);
    info!("{which}: detached from {interface}");
    Ok(())
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("balancer run needs root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN to load and attach XDP programs)");
    }
    Ok(())
}

fn backend_addresses(config: &Config) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = config
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.address))
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Resolves every backend, logging the ones that fail (they stay out of the tables).
async fn resolve(resolver: &Resolver, config: &Config) -> NextHops {
    let (hops, errors) = resolver.resolve_all(backend_addresses(config)).await;
    let mut errors: Vec<_> = errors.into_iter().collect();
    errors.sort_by_key(|(a, _)| *a);
    for (address, e) in errors {
        error!("backend {address} is unreachable and gets no traffic: {e}");
    }
    hops
}

async fn refresh_next_hops(
    resolver: Resolver,
    shared: status::SharedState,
    mut ids: Ids,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(NEXT_HOP_REFRESH) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let config = shared.lock().expect("state lock").config.clone();
        let hops = resolve(&resolver, &config).await;
        let mut state = shared.lock().expect("state lock");
        if hops == state.next_hops {
            continue;
        }
        for (address, hop) in &hops {
            if state.next_hops.get(address) != Some(hop) {
                info!(
                    "next hop of {address} is now {} via {}",
                    format_mac(&hop.dst_mac),
                    hop.interface
                );
            }
        }
        match reconcile::desired_state(&config, &hops, &HashMap::new(), &mut ids) {
            Ok(desired) => match state.dataplane.apply(&desired) {
                Ok(()) => state.next_hops = hops,
                Err(e) => error!("updating next hops: {}", error_chain(&e)),
            },
            Err(e) => error!("updating next hops: {e}"),
        }
    }
}

fn log_summary(
    config: &Config,
    interface: &str,
    mode: &str,
    desired: &DesiredState,
    hops: &NextHops,
) {
    info!(
        "attached to {interface} in {mode} mode; hash seed {:#x}; connection table {} flows",
        config.hash_seed, config.conn_table_size
    );
    if config.vips.is_empty() {
        warn!("no VIPs configured: every packet passes to the kernel untouched");
    }
    for (vip, applied) in config.vips.iter().zip(&desired.vips) {
        info!(
            "VIP {} {} dsr, Maglev table {} slots, {} backends",
            vip.name,
            vip.endpoint(),
            vip.table_size,
            vip.backends.len()
        );
        if applied.backends.is_empty() {
            warn!(
                "VIP {} has no backends: its packets are dropped (no_backend)",
                vip.name
            );
        }
        for b in &applied.backends {
            let via = hops.get(&b.address).map_or("unresolved".to_owned(), |h| {
                format!("{} via {}", format_mac(&h.dst_mac), h.interface)
            });
            info!(
                "  backend {:<15} weight {:<5} {:<11} {:>6} slots  {via}",
                b.address.to_string(),
                b.weight,
                b.state.as_str(),
                b.slots
            );
        }
    }
}

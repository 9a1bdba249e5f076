//! The fleet's tables, checked: `[announce]` (the VIPs this balancer can serve, as routes a
//! BGP speaker exports) and `[sync]` (connection-table entries shared with the other
//! balancers behind the same router).

use std::{
    net::SocketAddr,
    ops::RangeInclusive,
    path::{Component, PathBuf},
    time::Duration,
};

use toml::Spanned;

use crate::config::{
    health,
    model::{Announce, SyncSettings},
    raw::{Invalid, RawAnnounce, RawSync},
};

/// The kernel's own tables (unspec, default, main, local), which hold real routes.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];
pub const DEFAULT_WITHDRAW_WAIT: Duration = Duration::from_secs(3);
const WITHDRAW_WAIT_RANGE: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(300);
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_millis(50);
const SYNC_INTERVAL_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_millis(100);
pub const DEFAULT_BULK_TIMEOUT: Duration = Duration::from_secs(5);
const BULK_TIMEOUT_RANGE: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(120);
/// Peers one balancer sends to (a message per peer per batch).
pub const MAX_SYNC_PEERS: usize = 32;

/// `[announce]`, if present.
pub(super) fn announce(raw: Option<&Spanned<RawAnnounce>>) -> Result<Option<Announce>, Invalid> {
    let Some(raw) = raw else { return Ok(None) };
    let raw = raw.get_ref();
    let table = *raw.table.get_ref();
    if RESERVED_TABLES.contains(&table) {
        return Err((
            raw.table.span(),
            format!(
                "announce table {table} is one of the kernel's own tables (0, 253 default, 254 \
                 main, 255 local), which route real traffic: use a table of its own, such as 100"
            ),
        ));
    }
    let withdraw_wait = duration(
        raw.withdraw_wait.as_ref(),
        "announce withdraw_wait",
        DEFAULT_WITHDRAW_WAIT,
        WITHDRAW_WAIT_RANGE,
        "0s to 5m",
    )?;
    Ok(Some(Announce {
        table,
        withdraw_wait,
    }))
}

/// `[sync]`, if present.
pub(super) fn sync(raw: Option<&Spanned<RawSync>>) -> Result<Option<SyncSettings>, Invalid> {
    let Some(raw) = raw else { return Ok(None) };
    let raw = raw.get_ref();
    let listen = socket_address(&raw.listen, "sync listen")?;
    if listen.ip().is_unspecified() || listen.port() == 0 {
        return Err((
            raw.listen.span(),
            format!(
                "sync listen \"{listen}\" must be one address of this host and a port (peers \
                 send to it), such as \"10.0.0.2:7946\""
            ),
        ));
    }
    let peers = peers(&raw.peers, listen)?;
    let key_file = PathBuf::from(raw.key_file.get_ref());
    if !key_file.is_absolute() || key_file.components().any(|c| c == Component::ParentDir) {
        return Err((
            raw.key_file.span(),
            format!(
                "sync key_file \"{}\" must be an absolute path without `..`, such as \
                 \"/etc/balancer/sync.key\"",
                raw.key_file.get_ref()
            ),
        ));
    }
    let interval = duration(
        raw.interval.as_ref(),
        "sync interval",
        DEFAULT_SYNC_INTERVAL,
        SYNC_INTERVAL_RANGE,
        "10ms to 100ms",
    )?;
    let bulk_timeout = duration(
        raw.bulk_timeout.as_ref(),
        "sync bulk_timeout",
        DEFAULT_BULK_TIMEOUT,
        BULK_TIMEOUT_RANGE,
        "0s to 2m",
    )?;
    Ok(Some(SyncSettings {
        listen,
        peers,
        key_file,
        interval,
        bulk_timeout,
    }))
}

fn peers(
    raw: &Spanned<Vec<Spanned<String>>>,
    listen: SocketAddr,
) -> Result<Vec<SocketAddr>, Invalid> {
    if raw.get_ref().len() > MAX_SYNC_PEERS {
        return Err((
            raw.span(),
            format!(
                "sync peers: {} listed, at most {MAX_SYNC_PEERS}",
                raw.get_ref().len()
            ),
        ));
    }
    let mut peers: Vec<SocketAddr> = Vec::new();
    for peer in raw.get_ref() {
        let address = socket_address(peer, "sync peer")?;
        let problem = if address == listen {
            Some("is this balancer's own listen address")
        } else if address.ip().is_unspecified()
            || address.ip().is_multicast()
            || address.port() == 0
        {
            Some("is not one peer's address and port")
        } else if address.is_ipv4() != listen.is_ipv4() {
            Some("is not of the listen address's family")
        } else if peers.contains(&address) {
            Some("is listed twice")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err((peer.span(), format!("sync peer \"{address}\" {problem}")));
        }
        peers.push(address);
    }
    Ok(peers)
}

fn socket_address(value: &Spanned<String>, key: &str) -> Result<SocketAddr, Invalid> {
    value.get_ref().parse().map_err(|_| {
        (
            value.span(),
            format!(
                "{key} \"{}\" is not an address:port such as \"10.0.0.2:7946\" or \"[2001:db8::2]:7946\"",
                value.get_ref()
            ),
        )
    })
}

fn duration(
    value: Option<&Spanned<String>>,
    key: &str,
    default: Duration,
    range: RangeInclusive<Duration>,
    range_text: &str,
) -> Result<Duration, Invalid> {
    let Some(value) = value else {
        return Ok(default);
    };
    let invalid = |message: String| (value.span(), format!("{key} {message}"));
    let d = health::parse_duration(value.get_ref()).map_err(invalid)?;
    if !range.contains(&d) {
        return Err(invalid(format!(
            "\"{}\" is out of range: use {range_text}",
            value.get_ref()
        )));
    }
    Ok(d)
}

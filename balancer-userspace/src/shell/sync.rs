//! Connection-table sync, the I/O: one task reads the program's new-flow decisions from its
//! ring buffer, sends them to the peers in batches (every `interval`, and a heartbeat every
//! second when there is nothing to say), receives the peers' messages and inserts their
//! entries into the connection tables without overwriting any entry already there. A fresh
//! balancer asks its peers for their whole tables (a bulk copy) and says when it has one.
//!
//! Every message is checked by `sync::wire` (length, keyed hash, format) and by the replay
//! guard before anything in it is believed; then its sender must be a configured peer.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, RingBuf};
use balancer_common::{
    hash::vip_flow_hash, map_names, ConnEntry, FlowKey, FlowKeyV4, FlowKeyV6, SyncEvent,
    FAMILY_IPV4, FAMILY_IPV6,
};
use tokio::{
    io::unix::AsyncFd,
    net::UdpSocket,
    sync::{mpsc, watch},
};

use crate::{
    config,
    shell::dataplane::{Dataplane, DataplaneError},
    sync::{
        address_of,
        wire::{self, Entry, Header, Key, Kind, Protocol, ReplayGuard},
        Bulk, Directory, SyncStats,
    },
};

/// A heartbeat (an empty batch) goes to the peers when nothing was sent for this long: their
/// lag and last-message metrics stay current, and a key mismatch shows at once.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A fresh balancer asks its peers for their tables again this often until one answers.
const BULK_REQUEST_EVERY: Duration = Duration::from_secs(1);
/// A run of a peer gets one bulk copy; it is sent again only if that run still asks this long
/// after (the copy was lost), however often it asks in between.
const BULK_SERVE_GAP: Duration = Duration::from_secs(30);
/// Bulk messages sent between two pauses of `BULK_PAUSE`: about 6,400 messages (467,000
/// IPv4 entries) a second at most.
const BULK_BURST: usize = 64;
const BULK_PAUSE: Duration = Duration::from_millis(10);
/// Decisions held between two batches at most; more are counted as lost.
const MAX_PENDING: usize = 262_144;
/// The socket's receive buffer: a burst of peers' batches waits here while the task works.
const RECEIVE_BUFFER: usize = 4 << 20;

/// Handles of its own on the maps the sync reads and writes: the loop's tables (it inserts),
/// and another pair for bulk copies, walked off the loop while the loop goes on inserting
/// (the kernel's maps take both at once; no lock between them).
pub struct SyncMaps {
    ring: RingBuf<MapData>,
    tables: ConnTables,
    walker: Arc<ConnTables>,
    lost: PerCpuArray<MapData, u64>,
}

struct ConnTables {
    v4: BpfHashMap<MapData, FlowKeyV4, ConnEntry>,
    v6: BpfHashMap<MapData, FlowKeyV6, ConnEntry>,
}

impl SyncMaps {
    pub fn open(dataplane: &Dataplane) -> Result<SyncMaps, DataplaneError> {
        let err = crate::shell::dataplane::map_err;
        let ring = RingBuf::try_from(Map::RingBuf(dataplane.own_map(map_names::SYNC_EVENTS)?))
            .map_err(err(map_names::SYNC_EVENTS))?;
        let lost =
            PerCpuArray::try_from(Map::PerCpuArray(dataplane.own_map(map_names::SYNC_STATS)?))
                .map_err(err(map_names::SYNC_STATS))?;
        Ok(SyncMaps {
            ring,
            tables: ConnTables::open(dataplane)?,
            walker: Arc::new(ConnTables::open(dataplane)?),
            lost,
        })
    }
}

impl ConnTables {
    fn open(dataplane: &Dataplane) -> Result<ConnTables, DataplaneError> {
        let err = crate::shell::dataplane::map_err;
        let v4 = BpfHashMap::try_from(Map::LruHashMap(
            dataplane.own_map(map_names::CONN_TABLE_V4)?,
        ))
        .map_err(err(map_names::CONN_TABLE_V4))?;
        let v6 = BpfHashMap::try_from(Map::LruHashMap(
            dataplane.own_map(map_names::CONN_TABLE_V6)?,
        ))
        .map_err(err(map_names::CONN_TABLE_V6))?;
        Ok(ConnTables { v4, v6 })
    }

    /// Inserts `flow`'s entry unless the table has one: `Ok(false)` then.
    fn insert_new(&mut self, flow: &FlowKey, entry: ConnEntry) -> Result<bool, MapError> {
        const BPF_NOEXIST: u64 = 1;
        let inserted = if flow.family == FAMILY_IPV4 {
            self.v4.insert(flow.v4(), entry, BPF_NOEXIST)
        } else {
            self.v6.insert(flow.v6(), entry, BPF_NOEXIST)
        };
        match inserted {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Every flow and its backend id (a walk: two syscalls per entry).
    fn walk(&self) -> Vec<(FlowKey, u32)> {
        let mut all = Vec::new();
        for (key, entry) in self.v4.iter().filter_map(Result::ok) {
            all.push((flow_of_v4(&key), entry.backend_id));
        }
        for (key, entry) in self.v6.iter().filter_map(Result::ok) {
            all.push((flow_of_v6(&key), entry.backend_id));
        }
        all
    }
}

fn flow_of_v4(key: &FlowKeyV4) -> FlowKey {
    let mut flow = FlowKey {
        src_port: (key.ports >> 16) as u16,
        dst_port: key.ports as u16,
        proto: key.proto as u8,
        family: FAMILY_IPV4,
        ..FlowKey::default()
    };
    flow.set_addresses([key.src, 0, 0, 0], [key.dst, 0, 0, 0]);
    flow
}

fn flow_of_v6(key: &FlowKeyV6) -> FlowKey {
    let mut flow = FlowKey {
        src_port: (key.ports >> 16) as u16,
        dst_port: key.ports as u16,
        proto: key.proto as u8,
        family: FAMILY_IPV6,
        ..FlowKey::default()
    };
    flow.set_addresses(key.src, key.dst);
    flow
}

/// The wire entry of a decision, if its backend and protocol are known.
fn entry_of(flow: &FlowKey, backend_id: u32, directory: &Directory) -> Option<Entry> {
    Some(Entry {
        proto: Protocol::from_number(flow.proto)?,
        src: address_of(flow.src, flow.family),
        src_port: u16::from_be(flow.src_port),
        vip: address_of(flow.dst, flow.family),
        vip_port: u16::from_be(flow.dst_port),
        backend: *directory.backends.get(&backend_id)?,
    })
}

/// The connection-table key and entry of a received decision, or why there is none.
fn conn_of(
    entry: &Entry,
    directory: &Directory,
    seed: u32,
) -> Result<(FlowKey, ConnEntry), &'static str> {
    let proto = entry.proto.number();
    let vip = directory
        .vip(entry.vip, entry.vip_port, proto)
        .ok_or("unknown_vip")?;
    let backend_id = *vip.backends.get(&entry.backend).ok_or("unknown_backend")?;
    let (src, family) = crate::plan::inputs::address_bytes(entry.src);
    let (dst, _) = crate::plan::inputs::address_bytes(entry.vip);
    let flow = FlowKey {
        src,
        dst,
        src_port: entry.src_port.to_be(),
        dst_port: entry.vip_port.to_be(),
        proto,
        family,
        _pad: [0; 2],
    };
    let flow_hash = vip_flow_hash(&vip.meta, &flow, seed);
    Ok((
        flow,
        ConnEntry {
            backend_id,
            flow_hash,
        },
    ))
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Who this balancer is on the wire, and its messages' sequence.
struct Identity {
    sender: u64,
    epoch: u64,
    seq: AtomicU64,
}

impl Identity {
    fn header(&self, kind: Kind) -> Header {
        Header {
            kind,
            sender: self.sender,
            epoch: self.epoch,
            seq: self.seq.fetch_add(1, Relaxed) + 1,
            sent_ns: unix_ns(),
        }
    }
}

/// What the sending side shares with bulk copies running beside the loop.
struct Sender {
    socket: UdpSocket,
    key: Key,
    identity: Identity,
    stats: Arc<SyncStats>,
}

impl Sender {
    /// Sends `entries` (none: one empty message of `kind`) to `peers`; returns the messages.
    async fn send(&self, kind: Kind, entries: &[Entry], peers: &[SocketAddr]) -> usize {
        let messages = if entries.is_empty() {
            wire::encode(&self.key, &self.identity.header(kind), &[]).map(|m| vec![m])
        } else {
            wire::pack(&self.key, entries, || self.identity.header(kind))
        };
        let messages = match messages {
            Ok(messages) => messages,
            Err(e) => {
                // Entries come from the maps; a mixed flow would be a bug, and is not sent.
                tracing::warn!("sync: not sent: {e}");
                return 0;
            }
        };
        for (i, message) in messages.iter().enumerate() {
            for peer in peers {
                match self.socket.send_to(message, peer).await {
                    Ok(_) => {
                        self.stats.messages_sent.fetch_add(1, Relaxed);
                    }
                    Err(_) => {
                        self.stats.send_errors.fetch_add(1, Relaxed);
                    }
                }
            }
            if kind == Kind::Bulk && i % BULK_BURST == BULK_BURST - 1 {
                tokio::time::sleep(BULK_PAUSE).await;
            }
        }
        self.stats
            .entries_sent
            .fetch_add((entries.len() * peers.len()) as u64, Relaxed);
        messages.len()
    }
}

/// What starting the sync needs.
pub struct SyncOptions {
    pub settings: config::SyncSettings,
    pub key: Key,
    pub seed: u32,
    /// Ask the peers for their tables (a fresh, empty connection table).
    pub bulk: bool,
}

/// Reads the key file: at least 32 bytes, the same on every balancer.
pub fn read_key(path: &std::path::Path) -> anyhow::Result<Key> {
    use std::os::unix::fs::PermissionsExt as _;
    let bytes = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("reading the sync key_file {}: {e}", path.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "the sync key_file {} can be read by others than its owner (mode {:o}): \
                 `chmod 600` it",
                path.display(),
                meta.permissions().mode() & 0o777
            );
        }
    }
    Key::new(&bytes).map_err(|e| anyhow::anyhow!("the sync key_file {}: {e}", path.display()))
}

/// Starts the sync: binds the socket, spawns the task. `ready` hears once that the bulk copy
/// is in (or will not come); `directory` follows the maps.
pub fn start(
    options: SyncOptions,
    maps: SyncMaps,
    directory: watch::Receiver<Arc<Directory>>,
    ready: mpsc::UnboundedSender<String>,
) -> anyhow::Result<(Arc<SyncStats>, tokio::task::JoinHandle<()>)> {
    let settings = options.settings;
    let socket = bind(settings.listen)?;
    let stats = Arc::new(SyncStats::new(settings.listen, &settings.peers));
    let sender = Arc::new(Sender {
        socket,
        key: options.key,
        identity: Identity {
            sender: fastrand::u64(..),
            epoch: unix_ns(),
            seq: AtomicU64::new(0),
        },
        stats: stats.clone(),
    });
    let bulk = if options.bulk && !settings.peers.is_empty() && !settings.bulk_timeout.is_zero() {
        *stats.bulk.lock().expect("not poisoned") = Bulk::Waiting;
        Some(Instant::now() + settings.bulk_timeout)
    } else {
        let _ = ready.send("no copy of the peers' tables needed".to_owned());
        None
    };
    // SAFETY: the ring owns its descriptor (a `MapData` of its own) and keeps it open, the
    // same one, until the `AsyncFd` drops it.
    let ring = unsafe { AsyncFd::register(maps.ring) }.map_err(std::io::Error::from)?;
    let runtime = Runtime {
        sender,
        ring,
        tables: maps.tables,
        walker: maps.walker,
        lost: maps.lost,
        directory,
        settings,
        seed: options.seed,
        guard: ReplayGuard::new(),
        pending: Vec::new(),
        dropped: 0,
        bulk_deadline: bulk,
        bulk_entries: 0,
        bulk_started: Instant::now(),
        bulk_heard: None,
        served: HashMap::new(),
        ready,
    };
    let task = tokio::spawn(runtime.run());
    Ok((stats, task))
}

fn bind(listen: SocketAddr) -> anyhow::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(listen);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    socket.set_nonblocking(true)?;
    let _ = socket.set_recv_buffer_size(RECEIVE_BUFFER);
    // The kernel doubles what it grants, up to twice net.core.rmem_max.
    let granted = socket.recv_buffer_size().unwrap_or(0) / 2;
    if granted < RECEIVE_BUFFER {
        tracing::info!(
            "sync: receive buffer {} KiB, not the {} KiB asked (net.core.rmem_max caps it): a \
             burst of peers' batches may be dropped by the kernel; `sysctl -w \
             net.core.rmem_max={RECEIVE_BUFFER}` raises it",
            granted >> 10,
            RECEIVE_BUFFER >> 10
        );
    }
    socket.bind(&listen.into()).map_err(|e| {
        anyhow::anyhow!(
            "binding the sync listen address {listen}: {e} (it must be an address of this host)"
        )
    })?;
    Ok(UdpSocket::from_std(socket.into())?)
}

struct Runtime {
    sender: Arc<Sender>,
    ring: AsyncFd<RingBuf<MapData>>,
    tables: ConnTables,
    walker: Arc<ConnTables>,
    lost: PerCpuArray<MapData, u64>,
    directory: watch::Receiver<Arc<Directory>>,
    settings: config::SyncSettings,
    seed: u32,
    guard: ReplayGuard,
    /// Decisions waiting for the next batch.
    pending: Vec<Entry>,
    /// Decisions dropped because `pending` was full.
    dropped: u64,
    /// Waiting for a bulk copy until then.
    bulk_deadline: Option<Instant>,
    bulk_entries: u64,
    bulk_started: Instant,
    /// When the last bulk message arrived (a copy under way is not asked for again).
    bulk_heard: Option<Instant>,
    /// Which run of each peer was last sent a bulk copy, and when.
    served: HashMap<SocketAddr, (u64, Instant)>,
    ready: mpsc::UnboundedSender<String>,
}

impl Runtime {
    async fn run(mut self) {
        let mut batches = tokio::time::interval(self.settings.interval);
        batches.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seconds = tokio::time::interval(Duration::from_secs(1));
        let mut last_sent = Instant::now();
        let mut buf = vec![0u8; wire::MAX_MESSAGE + 1];
        if self.bulk_deadline.is_some() {
            self.request_bulk().await;
        }
        loop {
            tokio::select! {
                readable = self.ring.readable_mut() => match readable {
                    Ok(mut guard) => {
                        let directory = self.directory.borrow().clone();
                        if drain(guard.get_inner_mut(), &directory, &mut self.pending, &mut self.dropped) {
                            guard.clear_ready();
                        }
                    }
                    Err(e) => {
                        tracing::error!("sync: the ring buffer cannot be read ({e}); decisions are no longer sent");
                        std::future::pending::<()>().await;
                    }
                },
                _ = batches.tick() => {
                    let heartbeat = last_sent.elapsed() >= HEARTBEAT;
                    if !self.pending.is_empty() || heartbeat {
                        let entries = std::mem::take(&mut self.pending);
                        self.sender.send(Kind::Entries, &entries, &self.settings.peers).await;
                        last_sent = Instant::now();
                    }
                }
                received = self.sender.socket.recv_from(&mut buf) => {
                    if let Ok((n, from)) = received {
                        self.received(&buf[..n], from);
                    }
                }
                _ = seconds.tick() => self.each_second().await,
            }
        }
    }

    /// The lost-decision counter, and the bulk copy's requests and deadline.
    async fn each_second(&mut self) {
        if let Ok(values) = self.lost.get(&0, 0) {
            let ring_full: u64 = values.iter().sum();
            self.sender
                .stats
                .lost
                .store(ring_full + self.dropped, Relaxed);
        }
        let Some(deadline) = self.bulk_deadline else {
            return;
        };
        if Instant::now() >= deadline {
            self.bulk_deadline = None;
            *self.sender.stats.bulk.lock().expect("not poisoned") = Bulk::TimedOut;
            let _ = self.ready.send(format!(
                "no peer sent its connection table within {:?} (bulk_timeout); announcing with \
                 the {} entries received so far",
                self.settings.bulk_timeout, self.bulk_entries
            ));
        } else if self.bulk_started.elapsed() >= BULK_REQUEST_EVERY {
            self.request_bulk().await;
        }
    }

    /// Asks every peer for its table; not while a copy is arriving (a bulk message came
    /// within the last `BULK_REQUEST_EVERY`).
    async fn request_bulk(&mut self) {
        if self
            .bulk_heard
            .is_some_and(|at| at.elapsed() < BULK_REQUEST_EVERY)
        {
            return;
        }
        self.bulk_started = Instant::now();
        self.sender
            .send(Kind::BulkRequest, &[], &self.settings.peers)
            .await;
    }

    /// One datagram: checked, then applied.
    fn received(&mut self, bytes: &[u8], from: SocketAddr) {
        let stats = &self.sender.stats;
        let message = match wire::decode(&self.sender.key, bytes) {
            Ok(message) => message,
            Err(reject) => return stats.reject(reject.reason(), 1),
        };
        // A peer is known by its address; its port may differ from its listen port (a
        // restart's bulk request comes from the same socket, but a NAT may change it).
        let Some(peer) = self
            .settings
            .peers
            .iter()
            .find(|p| p.ip() == from.ip())
            .copied()
        else {
            return stats.reject("unknown_peer", 1);
        };
        let now = unix_ns();
        if let Err(reject) = self.guard.check(&message.header, now) {
            return stats.reject(reject.reason(), 1);
        }
        if let Ok(mut peers) = stats.peers.lock() {
            let peer = peers.entry(peer).or_default();
            peer.last_heard = Some(Instant::now());
            peer.lag = Some(Duration::from_nanos(
                now.saturating_sub(message.header.sent_ns),
            ));
            peer.messages += 1;
            peer.entries += message.entries.len() as u64;
        }
        match message.header.kind {
            Kind::Entries | Kind::Bulk => {
                let applied = self.apply(&message.entries);
                if message.header.kind == Kind::Bulk {
                    self.bulk_entries += applied;
                    self.bulk_heard = Some(Instant::now());
                }
            }
            // The copy goes to the peer's listen address, where its sync reads.
            Kind::BulkRequest => self.serve_bulk(peer, message.header.epoch),
            Kind::BulkEnd => self.bulk_complete(peer),
        }
    }

    /// Inserts entries the table does not have; returns how many it took.
    fn apply(&mut self, entries: &[Entry]) -> u64 {
        let stats = self.sender.stats.clone();
        stats
            .entries_received
            .fetch_add(entries.len() as u64, Relaxed);
        let directory = self.directory.borrow().clone();
        let tables = &mut self.tables;
        let mut applied = 0;
        for entry in entries {
            let (flow, conn) = match conn_of(entry, &directory, self.seed) {
                Ok(found) => found,
                Err(reason) => {
                    stats.reject(reason, 1);
                    continue;
                }
            };
            match tables.insert_new(&flow, conn) {
                Ok(true) => applied += 1,
                Ok(false) => {
                    stats.entries_kept.fetch_add(1, Relaxed);
                }
                Err(_) => stats.reject("insert_failed", 1),
            }
        }
        stats.entries_applied.fetch_add(applied, Relaxed);
        applied
    }

    /// Sends the whole table to `peer`, off the loop (the walk costs two syscalls an entry):
    /// once per run of the peer (`epoch`: a restarted peer is served at once), and at most
    /// once per `BULK_SERVE_GAP` to the same run (it asks again until a copy is complete).
    fn serve_bulk(&mut self, peer: SocketAddr, epoch: u64) {
        if self
            .served
            .get(&peer)
            .is_some_and(|(served, at)| *served == epoch && at.elapsed() < BULK_SERVE_GAP)
        {
            return;
        }
        self.served.insert(peer, (epoch, Instant::now()));
        let tables = self.walker.clone();
        let directory = self.directory.borrow().clone();
        let sender = self.sender.clone();
        tokio::spawn(async move {
            let walked = tokio::task::spawn_blocking(move || tables.walk())
                .await
                .unwrap_or_default();
            let entries: Vec<Entry> = walked
                .iter()
                .filter_map(|(flow, id)| entry_of(flow, *id, &directory))
                .collect();
            if !entries.is_empty() {
                sender.send(Kind::Bulk, &entries, &[peer]).await;
            }
            sender.send(Kind::BulkEnd, &[], &[peer]).await;
            sender.stats.bulk_sent.fetch_add(1, Relaxed);
            tracing::info!(
                "sync: sent this balancer's connection table ({} entries) to {peer}, which asked",
                entries.len()
            );
        });
    }

    fn bulk_complete(&mut self, peer: SocketAddr) {
        if self.bulk_deadline.take().is_none() {
            return;
        }
        *self.sender.stats.bulk.lock().expect("not poisoned") = Bulk::Complete {
            peer,
            entries: self.bulk_entries,
        };
        let _ = self.ready.send(format!(
            "{peer} sent its connection table ({} entries inserted) {} ms after the first request",
            self.bulk_entries,
            self.bulk_started.elapsed().as_millis()
        ));
    }
}

/// Decisions taken out of the ring at once at most: the loop then serves its other inputs
/// and comes back.
const DRAIN_AT_ONCE: usize = 65_536;

/// Takes decisions out of the ring, at most `DRAIN_AT_ONCE`; whether it emptied it.
fn drain(
    ring: &mut RingBuf<MapData>,
    directory: &Directory,
    pending: &mut Vec<Entry>,
    dropped: &mut u64,
) -> bool {
    for _ in 0..DRAIN_AT_ONCE {
        let Some(item) = ring.next() else {
            return true;
        };
        if item.len() < std::mem::size_of::<SyncEvent>() {
            continue;
        }
        // SAFETY: at least size_of::<SyncEvent>() bytes, written by the program as one;
        // read unaligned (the ring aligns records to 8, `SyncEvent` needs 4).
        let event: SyncEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        if pending.len() >= MAX_PENDING {
            *dropped += 1;
            continue;
        }
        if let Some(entry) = entry_of(&event.flow, event.backend_id, directory) {
            pending.push(entry);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use balancer_common::{VipMeta, VIP_F_SYNC};

    use super::*;
    use crate::sync::DirectoryVip;

    fn directory() -> Directory {
        let mut directory = Directory::default();
        let backend: IpAddr = "10.0.0.11".parse().unwrap();
        directory.backends.insert(7, backend);
        directory.vips.insert(
            ("192.0.2.1".parse().unwrap(), 80, 6),
            DirectoryVip {
                meta: VipMeta {
                    vip_id: 3,
                    table_size: 251,
                    flags: VIP_F_SYNC,
                    ..VipMeta::default()
                },
                backends: [(backend, 7)].into_iter().collect(),
            },
        );
        directory
    }

    #[test]
    fn a_decision_goes_out_and_comes_back_as_the_same_entry() {
        let directory = directory();
        let entry = Entry {
            proto: Protocol::Tcp,
            src: "198.51.100.9".parse().unwrap(),
            src_port: 40_000,
            vip: "192.0.2.1".parse().unwrap(),
            vip_port: 80,
            backend: "10.0.0.11".parse().unwrap(),
        };
        // Received: the flow's key and entry, its hash as the program computes it.
        let (flow, conn) = conn_of(&entry, &directory, 0x5eed).unwrap();
        assert_eq!(conn.backend_id, 7);
        let meta = directory.vips.values().next().unwrap().meta;
        assert_eq!(conn.flow_hash, vip_flow_hash(&meta, &flow, 0x5eed));
        // Sent: from the ring's record, or a walk of the table, the same entry again.
        assert_eq!(entry_of(&flow, 7, &directory), Some(entry));
        assert_eq!(flow_of_v4(&flow.v4()), flow);
        // An unknown backend id is not sent; unknown VIPs and backends are not applied.
        assert_eq!(entry_of(&flow, 8, &directory), None);
        let other_vip = Entry {
            vip_port: 443,
            ..entry
        };
        assert_eq!(
            conn_of(&other_vip, &directory, 0).unwrap_err(),
            "unknown_vip"
        );
        let other_backend = Entry {
            backend: "10.0.0.12".parse().unwrap(),
            ..entry
        };
        assert_eq!(
            conn_of(&other_backend, &directory, 0).unwrap_err(),
            "unknown_backend"
        );
    }

    #[test]
    fn ipv6_keys_round_trip() {
        let mut flow = FlowKey {
            src_port: 40_000u16.to_be(),
            dst_port: 443u16.to_be(),
            proto: 6,
            family: FAMILY_IPV6,
            ..FlowKey::default()
        };
        flow.src = "2001:db8::9"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        flow.dst = "2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets();
        assert_eq!(flow_of_v6(&flow.v6()), flow);
    }
}

//! The NAT sweeper: a thread of its own that walks the NAT tables, removes the entries of
//! timed-out connections (a reply entry, which holds its SNAT port, only once the quarantine
//! passed too), and reports what the tables hold. The packet path needs no sweep to be
//! correct (an entry found late counts as gone), but ports stay taken and memory stays
//! used until one.
//!
//! Off the event loop: a walk costs two syscalls per entry. It goes in batches with a pause
//! between them, so that a full table costs a small share of one CPU.

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError};
use balancer_common::{
    map_names,
    nat::{NatEntry, NatSettings, NAT_F_REPLY, NAT_F_SNAT},
    FlowKeyV4, FlowKeyV6,
};

use crate::shell::dataplane::{Dataplane, DataplaneError};

/// Entries looked at between two pauses.
pub const SWEEP_BATCH: usize = 4096;
/// The pause between two batches.
pub const SWEEP_PAUSE: Duration = Duration::from_millis(10);
/// Sweeps come at least this often, and no more often than every second.
pub const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

pub use crate::plan::contents::NatSweep as SweepReport;

/// Handles of their own on the NAT maps, for the sweeper's thread.
pub struct NatTables {
    v4: Map,
    v6: Map,
    settings: Map,
}

impl NatTables {
    pub fn open(dataplane: &Dataplane) -> Result<NatTables, DataplaneError> {
        Ok(NatTables {
            v4: Map::LruHashMap(dataplane.own_map(map_names::NAT_V4)?),
            v6: Map::LruHashMap(dataplane.own_map(map_names::NAT_V6)?),
            settings: Map::Array(dataplane.own_map(map_names::NAT_SETTINGS)?),
        })
    }

    fn settings(&self) -> Result<NatSettings, MapError> {
        let array: Array<&MapData, NatSettings> = Array::try_from(&self.settings)?;
        array.get(&0, 0)
    }

    /// One sweep at `now` (CLOCK_MONOTONIC nanoseconds, the clock the packet path stamps
    /// entries with), pausing `pause` every `batch` entries.
    pub fn sweep(
        &mut self,
        now: u64,
        batch: usize,
        pause: Duration,
    ) -> Result<SweepReport, MapError> {
        let started = Instant::now();
        let settings = self.settings()?;
        let mut report = SweepReport::default();
        if settings == NatSettings::default() {
            // Not written yet: nothing can be judged.
            return Ok(report);
        }
        let mut pacer = Pacer {
            seen: 0,
            batch,
            pause,
        };
        report.entries_v4 = sweep_table(
            &mut self.v4,
            &settings,
            now,
            &mut pacer,
            &mut report,
            |k: &FlowKeyV4| (false, [k.dst, 0, 0, 0]),
        )?;
        report.entries_v6 = sweep_table(
            &mut self.v6,
            &settings,
            now,
            &mut pacer,
            &mut report,
            |k: &FlowKeyV6| (true, k.dst),
        )?;
        report.took = started.elapsed();
        Ok(report)
    }
}

/// Pauses every `batch` entries.
struct Pacer {
    seen: usize,
    batch: usize,
    pause: Duration,
}

impl Pacer {
    fn tick(&mut self) {
        self.seen += 1;
        if self.seen.is_multiple_of(self.batch) {
            std::thread::sleep(self.pause);
        }
    }
}

/// Sweeps one table (keys `K`, whose family and destination words `dst` gives): removes
/// what is sweepable, counts the rest into `report`; returns the entries left.
fn sweep_table<K: aya::Pod>(
    map: &mut Map,
    settings: &NatSettings,
    now: u64,
    pacer: &mut Pacer,
    report: &mut SweepReport,
    dst: impl Fn(&K) -> (bool, [u32; 4]),
) -> Result<u64, MapError> {
    let mut table: BpfHashMap<&mut MapData, K, NatEntry> = BpfHashMap::try_from(map)?;
    let keys: Vec<K> = table.keys().filter_map(Result::ok).collect();
    let mut left = 0;
    for key in keys {
        pacer.tick();
        let Ok(entry) = table.get(&key, 0) else {
            continue;
        };
        if entry.sweepable(settings, now) {
            if table.remove(&key).is_ok() {
                report.removed += 1;
            }
            continue;
        }
        left += 1;
        let (v6, key_dst) = dst(&key);
        count(&entry, &key_dst, v6, report);
    }
    Ok(left)
}

/// Counts a live entry: a forward entry is a connection; a full-NAT reply entry holds a
/// port of the SNAT address its replies are addressed to (`key_dst`, its key's destination),
/// until its quarantine ends.
fn count(entry: &NatEntry, key_dst: &[u32; 4], v6: bool, report: &mut SweepReport) {
    if entry.flags & NAT_F_REPLY == 0 {
        report.connections += 1;
        let both_fins =
            balancer_common::nat::NAT_S_FIN_CLIENT | balancer_common::nat::NAT_S_FIN_BACKEND;
        let closed = entry.proto == balancer_common::PROTO_TCP
            && (entry.state & balancer_common::nat::NAT_S_RST != 0
                || entry.state & both_fins == both_fins);
        if !closed {
            *report.open_by_backend.entry(entry.backend_id).or_insert(0) += 1;
        }
    } else if entry.flags & NAT_F_SNAT != 0 {
        *report.ports.entry(address(key_dst, v6)).or_insert(0) += 1;
    }
}

fn address(words: &[u32; 4], v6: bool) -> IpAddr {
    let mut bytes = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    if v6 {
        IpAddr::from(bytes)
    } else {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the program's `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// How often to sweep with `settings`: half the shortest time an entry can be kept, between
/// one second and `MAX_SWEEP_INTERVAL`.
pub fn interval(settings: &NatSettings) -> Duration {
    let shortest = [settings.syn_ns, settings.closing_ns, settings.udp_ns]
        .into_iter()
        .min()
        .unwrap_or(0)
        .saturating_add(settings.quarantine_ns.min(settings.closing_ns));
    Duration::from_nanos(shortest / 2).clamp(Duration::from_secs(1), MAX_SWEEP_INTERVAL)
}

/// Runs sweeps on a thread of its own until `stop` is set; each report goes to `report`.
pub fn spawn(
    mut tables: NatTables,
    stop: Arc<AtomicBool>,
    report: impl Fn(Result<SweepReport, String>) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("nat-sweep".into())
        .spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    let result = tables
                        .sweep(monotonic_ns(), SWEEP_BATCH, SWEEP_PAUSE)
                        .map_err(|e| format!("sweeping the NAT tables: {e}"));
                    let wait = tables
                        .settings()
                        .map_or(MAX_SWEEP_INTERVAL, |s| interval(&s));
                    next = Instant::now() + wait;
                    report(result);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_follow_the_shortest_timeout_within_bounds() {
        let s = |syn: u64, closing: u64, udp: u64, quarantine: u64| NatSettings {
            syn_ns: syn * 1_000_000_000,
            established_ns: 10_800_000_000_000,
            closing_ns: closing * 1_000_000_000,
            udp_ns: udp * 1_000_000_000,
            quarantine_ns: quarantine * 1_000_000_000,
        };
        assert_eq!(interval(&s(60, 10, 60, 60)), Duration::from_secs(10));
        assert_eq!(interval(&s(60, 2, 60, 0)), Duration::from_secs(1));
        assert_eq!(interval(&s(60, 4, 60, 2)), Duration::from_secs(3));
        assert_eq!(interval(&s(600, 600, 600, 600)), MAX_SWEEP_INTERVAL);
    }

    #[test]
    fn the_clock_is_monotonic() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}

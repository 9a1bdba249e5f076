//! Random valid configs within the limits, written out as a config file would be, and what
//! each must parse to.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use balancer_common::DEFAULT_MAGLEV_SIZE;

use crate::{
    config::{
        defence::{
            DEFAULT_IPV4_PREFIX, DEFAULT_IPV6_PREFIX, DEFAULT_NEW_FLOWS_PER_CPU,
            MIN_PENDING_TABLE_SIZE,
        },
        fleet::{DEFAULT_BULK_TIMEOUT, DEFAULT_SYNC_INTERVAL, DEFAULT_WITHDRAW_WAIT},
        parse, AutoscaleMetric, CheckKind, Config, DiscoverQuery, Forwarding, HashMode,
        InitialState, Protocol, Snat, TunnelSource, Vip, WhenAllDown, DEFAULT_HOST_SNAT_PORTS,
        DEFAULT_METRICS_LISTEN, DEFAULT_PIN_DIR, DEFAULT_SNAT_PORTS, DEFAULT_WEIGHT,
    },
    property::pick,
};

type Rng = fastrand::Rng;

/// A TOML basic string holding `text` exactly (quotes, backslashes and control characters
/// escaped).
pub(super) fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A duration written in one of the units that say it exactly.
pub(super) fn duration_text(rng: &mut Rng, ms: u64) -> String {
    let mut forms = vec![format!("{ms}ms")];
    for (unit, per) in [("s", 1_000), ("m", 60_000), ("h", 3_600_000)] {
        if ms.is_multiple_of(per) {
            forms.push(format!("{}{unit}", ms / per));
        }
    }
    pick(rng, &forms).clone()
}

/// Milliseconds from `lo` to `hi`, often round.
fn millis(rng: &mut Rng, lo: u64, hi: u64) -> u64 {
    let ms = rng.u64(lo..=hi);
    let round = match rng.u8(..4) {
        0 => ms,
        1 => ms / 1_000 * 1_000,
        2 => ms / 60_000 * 60_000,
        _ => ms / 3_600_000 * 3_600_000,
    };
    if (lo..=hi).contains(&round) {
        round
    } else {
        ms
    }
}

/// `Some(millis(lo..=hi))` half the time.
fn maybe_millis(rng: &mut Rng, lo: u64, hi: u64) -> Option<u64> {
    rng.bool().then(|| millis(rng, lo, hi))
}

pub(super) fn gen_name(
    rng: &mut Rng,
    alphabet: &[u8],
    len: std::ops::RangeInclusive<usize>,
) -> String {
    (0..rng.usize(len))
        .map(|_| char::from(*pick(rng, alphabet)))
        .collect()
}

#[derive(Clone, Debug)]
pub(super) struct GenHealth {
    /// "tcp", "http", "none", or absent (tcp).
    kind: Option<&'static str>,
    port: Option<u16>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    rise: Option<u32>,
    fall: Option<u32>,
    initial: Option<InitialState>,
    /// HTTP: path, host, status range.
    path: Option<String>,
    host: Option<String>,
    status: Option<(u16, u16)>,
}

#[derive(Clone, Debug)]
pub(super) struct GenBackend {
    pub address: IpAddr,
    /// NAT only.
    port: Option<u16>,
    weight: Option<u32>,
    drain: Option<bool>,
}

#[derive(Clone, Debug)]
pub(super) struct GenDiscover {
    srv: bool,
    name: String,
    /// NAT, A/AAAA only.
    port: Option<u16>,
    /// A/AAAA only.
    weight: Option<u32>,
    interval_ms: Option<u64>,
    timeout_ms: Option<u64>,
    empty_grace_ms: Option<u64>,
    max_backends: Option<u32>,
    /// As written, and as read.
    resolvers: Option<Vec<(String, SocketAddr)>>,
}

#[derive(Clone, Debug)]
pub(super) struct GenAutoscale {
    metric: AutoscaleMetric,
    target: f64,
    tolerance: Option<f64>,
    window_ms: Option<u64>,
}

/// `source_limit`: rate, and burst, ipv4_prefix and ipv6_prefix if written.
type GenSourceLimit = (u32, Option<u32>, Option<u8>, Option<u8>);

fn gen_source_limit(rng: &mut Rng) -> GenSourceLimit {
    let rate = *pick(rng, &[1, 100, 10_000_000]);
    let burst = rng.bool().then(|| rng.u32(1..=10_000_000));
    let v4 = rng.bool().then(|| rng.u8(1..=32));
    (rate, burst, v4, rng.bool().then(|| rng.u8(1..=128)))
}

#[derive(Clone, Debug)]
pub(super) enum GenSnat {
    /// Absent: the interface's address.
    Interface,
    None,
    /// As written, and the addresses it holds.
    Addresses(String, Vec<IpAddr>),
}

#[derive(Clone, Debug)]
pub(super) struct GenVip {
    pub name: String,
    pub address: IpAddr,
    pub port: Option<u16>,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    table_size: Option<u32>,
    when_all_down: Option<WhenAllDown>,
    hash: Option<HashMode>,
    /// Tunnel only: as written, and as read.
    tunnel_sources: [Option<(String, TunnelSource)>; 2],
    autoscale: Option<GenAutoscale>,
    source_limit: Option<GenSourceLimit>,
    /// NAT only.
    snat: GenSnat,
    snat_ports: Option<(u16, u16)>,
    backend_port: Option<u16>,
    health: Option<GenHealth>,
    pub backends: Vec<GenBackend>,
    pub discover: Option<GenDiscover>,
}

#[derive(Clone, Debug, Default)]
pub(super) struct GenBalancer {
    interface: Option<String>,
    /// The seed, and how it is written: an integer, a decimal string or a hex string.
    hash_seed: Option<(u32, u8)>,
    conn_table_size: Option<u32>,
    metrics_listen: Option<SocketAddr>,
    removal_grace_ms: Option<u64>,
    reload_settle_ms: Option<u64>,
    pin_dir: Option<String>,
    control_socket: Option<String>,
    api_max_connections: Option<u32>,
    api_idle_timeout_ms: Option<u64>,
    keep_datapath: Option<bool>,
    nat_table_size: Option<u32>,
    /// Keys of `nat_timeouts` written, with their values.
    nat_timeouts: Vec<(&'static str, u64)>,
}

#[derive(Clone, Debug)]
pub(super) struct GenSync {
    listen: SocketAddr,
    peers: Vec<SocketAddr>,
    key_file: String,
    interval_ms: Option<u64>,
    bulk_timeout_ms: Option<u64>,
}

#[derive(Clone, Debug)]
pub(super) struct GenConfig {
    balancer: GenBalancer,
    /// `[announce]`: the table, and withdraw_wait.
    announce: Option<(u32, Option<u64>)>,
    sync: Option<GenSync>,
    /// `[flood]`: new_flows_per_cpu and pending_table_size, each if written.
    flood: Option<(Option<u32>, Option<u32>)>,
    pub vips: Vec<GenVip>,
}

// ---------------------------------------------------------------------------------------------
// Generating.

fn gen_balancer(rng: &mut Rng) -> GenBalancer {
    let maybe = |rng: &mut Rng| rng.bool();
    let mut b = GenBalancer::default();
    if maybe(rng) {
        let name = gen_name(rng, b"abcdefghijklmnopqrstuvwxyz0123456789._-", 1..=15);
        b.interface = Some(if name == "." || name == ".." {
            "eth0".into()
        } else {
            name
        });
    }
    b.hash_seed = maybe(rng).then(|| (rng.u32(..), rng.u8(..3)));
    b.conn_table_size = maybe(rng).then(|| rng.u32(1024..=1 << 25));
    if maybe(rng) {
        // Above any SNAT port range generated: the metrics port is never among them.
        let port = rng.u16(40_000..);
        let ips: [IpAddr; 3] = [
            Ipv4Addr::LOCALHOST.into(),
            Ipv6Addr::LOCALHOST.into(),
            Ipv4Addr::UNSPECIFIED.into(),
        ];
        b.metrics_listen = Some(SocketAddr::new(*pick(rng, &ips), port));
    }
    b.removal_grace_ms = maybe_millis(rng, 0, 100 * 3_600_000);
    b.reload_settle_ms = maybe_millis(rng, 0, 60_000);
    if maybe(rng) {
        b.pin_dir = Some(format!("/sys/fs/bpf/{}", gen_name(rng, b"abc_-", 1..=12)));
    }
    if maybe(rng) {
        b.control_socket = Some(format!("/run/{}.sock", gen_name(rng, b"xyz_", 1..=12)));
    }
    b.api_max_connections = maybe(rng).then(|| rng.u32(1..=65_536));
    b.api_idle_timeout_ms = maybe_millis(rng, 100, 600_000);
    b.keep_datapath = maybe(rng).then(|| rng.bool());
    b.nat_table_size = maybe(rng).then(|| rng.u32(1024..=1 << 24));
    if maybe(rng) {
        for key in ["syn", "established", "closing", "udp", "quarantine"] {
            let ms = match key {
                "quarantine" => maybe_millis(rng, 0, 600_000),
                _ => maybe_millis(rng, 1_000, 168 * 3_600_000),
            };
            b.nat_timeouts.extend(ms.map(|ms| (key, ms)));
        }
    }
    b
}

fn gen_health(rng: &mut Rng, needs_port: bool) -> GenHealth {
    let kind = *pick(rng, &[None, Some("tcp"), Some("http"), Some("none")]);
    let interval_ms = maybe_millis(rng, 100, 3_600_000);
    // The default timeout (1s) must fit a short interval.
    let timeout_ms = match interval_ms {
        Some(i) if i < 1_000 || rng.bool() => Some(rng.u64(10..=i)),
        Some(_) => None,
        None => rng.bool().then(|| rng.u64(10..=2_000)),
    };
    let http = kind == Some("http");
    let path_chars = b"abcxyz0123456789/_-.~?=&%";
    GenHealth {
        kind,
        port: (needs_port || rng.bool()).then(|| rng.u16(1..)),
        interval_ms,
        timeout_ms,
        rise: rng.bool().then(|| rng.u32(1..=100)),
        fall: rng.bool().then(|| rng.u32(1..=100)),
        initial: *pick(
            rng,
            &[None, Some(InitialState::Up), Some(InitialState::Down)],
        ),
        path: (http && rng.bool()).then(|| format!("/{}", gen_name(rng, path_chars, 0..=20))),
        host: (http && rng.bool()).then(|| gen_name(rng, b"abc.xyz-09:", 1..=20)),
        status: (http && rng.bool()).then(|| {
            let lo = rng.u16(100..=599);
            (lo, rng.u16(lo..=599))
        }),
    }
}

fn gen_backends(rng: &mut Rng, vip: &GenVip) -> Vec<GenBackend> {
    let mut seen = BTreeSet::new();
    let mut backends = Vec::new();
    for _ in 0..rng.usize(0..=20) {
        let v6 = match vip.forwarding {
            Forwarding::Tunnel if vip.address.is_ipv4() => rng.bool(),
            _ => vip.address.is_ipv6(),
        };
        let address: IpAddr = if v6 {
            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, rng.u16(..), rng.u16(1..)).into()
        } else {
            Ipv4Addr::new(10, rng.u8(..), rng.u8(..), rng.u8(1..255)).into()
        };
        if !seen.insert(address) {
            continue;
        }
        let nat = vip.forwarding == Forwarding::Nat;
        let any = rng.u32(..=65_535);
        backends.push(GenBackend {
            address,
            port: (nat && rng.bool()).then(|| rng.u16(1..)),
            weight: rng.bool().then(|| *pick(rng, &[0, 1, 65_535, any])),
            drain: rng.bool().then(|| rng.bool()),
        });
    }
    backends
}

/// A discovery of `i`'s name, whose cap fits the table beside the file's backends.
fn gen_discover(rng: &mut Rng, i: usize, vip: &GenVip) -> GenDiscover {
    let srv = rng.bool();
    let name = if srv {
        format!("_http._tcp.web{i}.svc.test")
    } else {
        format!("web{i}.svc.test")
    };
    let room = vip.table_size.unwrap_or(DEFAULT_MAGLEV_SIZE) as usize - vip.backends.len();
    let interval_ms = maybe_millis(rng, 1_000, 3_600_000);
    let longest_timeout = interval_ms.unwrap_or(5_000).min(30_000);
    let timeout_ms = match interval_ms {
        Some(i) if i < 2_000 => Some(rng.u64(100..=i)),
        _ => maybe_millis(rng, 100, longest_timeout),
    };
    let resolvers = rng.bool().then(|| {
        let all = [
            ("10.96.0.10", "10.96.0.10:53"),
            ("10.96.0.11:5353", "10.96.0.11:5353"),
            ("[fd00::10]:53", "[fd00::10]:53"),
            (" fd00::11 ", "[fd00::11]:53"),
        ];
        (0..rng.usize(1..=8))
            .map(|_| {
                let (written, read) = *pick(rng, &all);
                (written.to_owned(), read.parse().unwrap())
            })
            .collect()
    });
    GenDiscover {
        srv,
        name,
        port: (!srv && vip.forwarding == Forwarding::Nat && rng.bool()).then(|| rng.u16(1..)),
        weight: (!srv && rng.bool()).then(|| rng.u32(1..=65_535)),
        interval_ms,
        timeout_ms,
        empty_grace_ms: maybe_millis(rng, 0, 24 * 3_600_000),
        max_backends: rng.bool().then(|| rng.u32(1..=room.min(64) as u32)),
        resolvers,
    }
}

/// Tunnel sources inside 172.16.0.0/16 and fd01::/96, away from every VIP.
fn gen_tunnel_sources(rng: &mut Rng) -> [Option<(String, TunnelSource)>; 2] {
    let v4 = rng.bool().then(|| {
        let len = rng.u8(16..=32);
        let address: IpAddr = Ipv4Addr::new(172, 16, rng.u8(..), rng.u8(..)).into();
        (len, address, 32)
    });
    let v6 = rng.bool().then(|| {
        let len = rng.u8(96..=128);
        let address: IpAddr = Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, rng.u16(..), rng.u16(..)).into();
        (len, address, 128)
    });
    [v4, v6].map(|source| {
        let (len, address, bits) = source?;
        let written = if len == bits && rng.bool() {
            format!("{address}")
        } else {
            format!("{address}/{len}")
        };
        Some((
            written,
            TunnelSource {
                address,
                varied_bits: bits - len,
            },
        ))
    })
}

fn gen_autoscale(rng: &mut Rng) -> GenAutoscale {
    let metrics = [
        AutoscaleMetric::NewFlowsPerSecond,
        AutoscaleMetric::PacketsPerSecond,
        AutoscaleMetric::BytesPerSecond,
    ];
    let scale = *pick(rng, &[1e-6, 1.0, 1e3, 1e9]);
    GenAutoscale {
        metric: *pick(rng, &metrics),
        target: (rng.f64() + 1e-9) * scale,
        tolerance: rng.bool().then(|| rng.f64()),
        window_ms: maybe_millis(rng, 2_000, 3_600_000),
    }
}

/// Address `i` of the SNAT range of a family: 198.51.100.0/24 or 2001:db8:5::/64 (no VIP's,
/// no backend's).
fn snat_address(v6: bool, i: u8) -> IpAddr {
    if v6 {
        Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, u16::from(i)).into()
    } else {
        Ipv4Addr::new(198, 51, 100, i).into()
    }
}

/// SNAT of the VIP's family: the interface's address, none, addresses or a prefix.
fn gen_snat(rng: &mut Rng, v6: bool) -> GenSnat {
    match rng.u8(..4) {
        0 => GenSnat::Interface,
        1 => GenSnat::None,
        2 => {
            let mut addresses: Vec<IpAddr> = Vec::new();
            for _ in 0..rng.usize(1..=4) {
                let address = snat_address(v6, rng.u8(1..255));
                if !addresses.contains(&address) {
                    addresses.push(address);
                }
            }
            let written: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
            let text = if written.len() == 1 && rng.bool() {
                written[0].clone()
            } else {
                format!("[{}]", written.join(", "))
            };
            GenSnat::Addresses(text, addresses)
        }
        _ => {
            let host_bits = rng.u8(..=4);
            let first = rng.u8(1..15) << 4;
            let bits = if v6 { 128 } else { 32 };
            let network = snat_address(v6, first);
            let addresses = (0..1u8 << host_bits)
                .map(|i| snat_address(v6, first + i))
                .collect();
            GenSnat::Addresses(format!("\"{network}/{}\"", bits - host_bits), addresses)
        }
    }
}

fn gen_vip(rng: &mut Rng, i: usize, endpoints: &mut BTreeSet<(IpAddr, Option<u16>, u8)>) -> GenVip {
    let protocol = *pick(rng, &[Protocol::Tcp, Protocol::Udp]);
    // Few addresses, so that VIPs share them (on other ports or protocols).
    let (address, port) = loop {
        let address: IpAddr = if rng.bool() {
            Ipv4Addr::new(192, 0, 2, rng.u8(1..=4)).into()
        } else {
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, rng.u16(1..=4)).into()
        };
        let any = rng.u16(1..);
        let port = (rng.u8(..4) != 0).then(|| *pick(rng, &[80, 443, 53, any]));
        if endpoints.insert((address, port, protocol.number())) {
            break (address, port);
        }
    };
    let forwarding = *pick(rng, &[Forwarding::Dsr, Forwarding::Tunnel, Forwarding::Nat]);
    let nat = forwarding == Forwarding::Nat;
    let snat = if nat {
        gen_snat(rng, address.is_ipv6())
    } else {
        GenSnat::Interface
    };
    let mut vip = GenVip {
        name: format!("v{i}{}", gen_name(rng, b"abcXYZ019-_.", 0..=60)),
        address,
        port,
        protocol,
        forwarding,
        table_size: *pick(
            rng,
            &[
                None,
                Some(23),
                Some(61),
                Some(251),
                Some(4093),
                Some(65_537),
            ],
        ),
        when_all_down: *pick(
            rng,
            &[None, Some(WhenAllDown::FailOpen), Some(WhenAllDown::Drop)],
        ),
        hash: *pick(
            rng,
            &[None, Some(HashMode::FiveTuple), Some(HashMode::DstPortOnly)],
        ),
        tunnel_sources: if forwarding == Forwarding::Tunnel {
            gen_tunnel_sources(rng)
        } else {
            [None, None]
        },
        autoscale: (rng.u8(..4) == 0).then(|| gen_autoscale(rng)),
        source_limit: (rng.u8(..4) == 0).then(|| gen_source_limit(rng)),
        snat_ports: (nat && !matches!(snat, GenSnat::None) && rng.bool()).then(|| {
            let lo = rng.u16(1..40_000);
            (lo, rng.u16(lo..40_000))
        }),
        snat,
        backend_port: (nat && rng.bool()).then(|| rng.u16(1..)),
        health: None,
        backends: Vec::new(),
        discover: None,
    };
    vip.backends = gen_backends(rng, &vip);
    vip.discover = (rng.u8(..3) == 0).then(|| gen_discover(rng, i, &vip));
    let effective = |port: Option<u16>| if nat { port.or(vip.backend_port) } else { None };
    let portless = vip.port.is_none()
        && (vip.backends.iter().any(|b| effective(b.port).is_none())
            || vip
                .discover
                .as_ref()
                .is_some_and(|d| !d.srv && effective(d.port).is_none()));
    let needs_port = protocol == Protocol::Udp || portless;
    vip.health = rng.bool().then(|| gen_health(rng, needs_port));
    vip
}

fn gen_sync(rng: &mut Rng) -> GenSync {
    let v6 = rng.bool();
    let address = |rng: &mut Rng| -> SocketAddr {
        let ip: IpAddr = if v6 {
            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, rng.u16(1..)).into()
        } else {
            Ipv4Addr::new(10, 0, 0, rng.u8(1..255)).into()
        };
        SocketAddr::new(ip, *pick(rng, &[7946, 1, 65_535]))
    };
    let listen = address(rng);
    let mut peers = Vec::new();
    for _ in 0..rng.usize(..=6) {
        let peer = address(rng);
        if peer != listen && !peers.contains(&peer) {
            peers.push(peer);
        }
    }
    GenSync {
        listen,
        peers,
        key_file: format!("/etc/balancer/{}.key", gen_name(rng, b"abk-", 1..=8)),
        interval_ms: maybe_millis(rng, 10, 100),
        bulk_timeout_ms: maybe_millis(rng, 0, 120_000),
    }
}

pub(super) fn gen_config(rng: &mut Rng) -> GenConfig {
    let mut endpoints = BTreeSet::new();
    GenConfig {
        balancer: gen_balancer(rng),
        announce: rng.bool().then(|| {
            let table = loop {
                let any = rng.u32(..);
                let table = *pick(rng, &[1, 100, 252, 256, any]);
                if ![0, 253, 254, 255].contains(&table) {
                    break table;
                }
            };
            (table, maybe_millis(rng, 0, 300_000))
        }),
        sync: rng.bool().then(|| gen_sync(rng)),
        flood: rng.bool().then(|| {
            let per_cpu = rng.bool().then(|| rng.u32(100..=10_000_000));
            (per_cpu, rng.bool().then(|| rng.u32(1024..=1 << 25)))
        }),
        vips: (0..rng.usize(0..=6))
            .map(|i| gen_vip(rng, i, &mut endpoints))
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing it out: one key a line, inline tables on one line, one backend a line.

fn render_balancer(rng: &mut Rng, b: &GenBalancer, out: &mut Vec<String>) {
    let mut keys = Vec::new();
    let mut duration = |rng: &mut Rng, key: &str, ms: Option<u64>| {
        if let Some(ms) = ms {
            keys.push(format!("{key} = \"{}\"", duration_text(rng, ms)));
        }
    };
    duration(rng, "removal_grace", b.removal_grace_ms);
    duration(rng, "reload_settle", b.reload_settle_ms);
    duration(rng, "api_idle_timeout", b.api_idle_timeout_ms);
    let text = |key: &str, value: &Option<String>| {
        value
            .as_ref()
            .map(|v| format!("{key} = {}", toml_string(v)))
    };
    keys.extend(text("interface", &b.interface));
    keys.extend(text("pin_dir", &b.pin_dir));
    keys.extend(text("control_socket", &b.control_socket));
    let number = |key: &str, value: Option<u32>| value.map(|v| format!("{key} = {v}"));
    keys.extend(number("conn_table_size", b.conn_table_size));
    keys.extend(number("api_max_connections", b.api_max_connections));
    keys.extend(number("nat_table_size", b.nat_table_size));
    keys.extend(
        b.metrics_listen
            .map(|l| format!("metrics_listen = \"{l}\"")),
    );
    keys.extend(b.keep_datapath.map(|k| format!("keep_datapath = {k}")));
    if let Some((seed, form)) = b.hash_seed {
        keys.push(match form {
            0 => format!("hash_seed = {seed}"),
            1 => format!("hash_seed = \"{seed}\""),
            _ => format!("hash_seed = \"{}{seed:x}\"", pick(rng, &["0x", "0X"])),
        });
    }
    if !b.nat_timeouts.is_empty() || rng.u8(..8) == 0 {
        let timeouts: Vec<String> = b
            .nat_timeouts
            .iter()
            .map(|(key, ms)| format!("{key} = \"{}\"", duration_text(rng, *ms)))
            .collect();
        keys.push(format!("nat_timeouts = {{ {} }}", timeouts.join(", ")));
    }
    rng.shuffle(&mut keys);
    out.push("[balancer]".into());
    out.extend(keys);
}

fn render_fleet(rng: &mut Rng, c: &GenConfig, out: &mut Vec<String>) {
    if let Some((per_cpu, pending)) = c.flood {
        out.extend([String::new(), "[flood]".into()]);
        out.extend(per_cpu.map(|n| format!("new_flows_per_cpu = {n}")));
        out.extend(pending.map(|n| format!("pending_table_size = {n}")));
    }
    if let Some((table, wait)) = c.announce {
        out.extend(["".into(), "[announce]".into(), format!("table = {table}")]);
        out.extend(wait.map(|ms| format!("withdraw_wait = \"{}\"", duration_text(rng, ms))));
    }
    if let Some(s) = &c.sync {
        let peers: Vec<String> = s.peers.iter().map(|p| format!("\"{p}\"")).collect();
        out.extend([
            String::new(),
            "[sync]".into(),
            format!("listen = \"{}\"", s.listen),
            format!("peers = [{}]", peers.join(", ")),
            format!("key_file = {}", toml_string(&s.key_file)),
        ]);
        out.extend(
            s.interval_ms
                .map(|ms| format!("interval = \"{}\"", duration_text(rng, ms))),
        );
        out.extend(
            s.bulk_timeout_ms
                .map(|ms| format!("bulk_timeout = \"{}\"", duration_text(rng, ms))),
        );
    }
}

/// `key = { ... }` of the keys given, in a random order.
fn inline(rng: &mut Rng, key: &str, mut keys: Vec<String>) -> String {
    rng.shuffle(&mut keys);
    format!("{key} = {{ {} }}", keys.join(", "))
}

fn render_health(rng: &mut Rng, h: &GenHealth) -> String {
    let mut keys = Vec::new();
    keys.extend(h.kind.map(|kind| format!("kind = \"{kind}\"")));
    keys.extend(h.port.map(|port| format!("port = {port}")));
    for (key, ms) in [("interval", h.interval_ms), ("timeout", h.timeout_ms)] {
        keys.extend(ms.map(|ms| format!("{key} = \"{}\"", duration_text(rng, ms))));
    }
    for (key, count) in [("rise", h.rise), ("fall", h.fall)] {
        keys.extend(count.map(|count| format!("{key} = {count}")));
    }
    if let Some(initial) = h.initial {
        let initial = if initial == InitialState::Up {
            "up"
        } else {
            "down"
        };
        keys.push(format!("initial = \"{initial}\""));
    }
    for (key, text) in [("path", &h.path), ("host", &h.host)] {
        keys.extend(
            text.as_ref()
                .map(|text| format!("{key} = {}", toml_string(text))),
        );
    }
    if let Some((lo, hi)) = h.status {
        let status = if lo == hi && rng.bool() {
            format!("{lo}")
        } else {
            format!("{lo}-{hi}")
        };
        keys.push(format!("status = \"{status}\""));
    }
    inline(rng, "health", keys)
}

fn render_discover(rng: &mut Rng, d: &GenDiscover) -> String {
    let mut keys = vec![format!(
        "{} = \"{}\"",
        if d.srv { "srv" } else { "dns" },
        d.name
    )];
    keys.extend(d.port.map(|p| format!("port = {p}")));
    keys.extend(d.weight.map(|w| format!("weight = {w}")));
    keys.extend(d.max_backends.map(|m| format!("max_backends = {m}")));
    for (key, ms) in [
        ("interval", d.interval_ms),
        ("timeout", d.timeout_ms),
        ("empty_grace", d.empty_grace_ms),
    ] {
        keys.extend(ms.map(|ms| format!("{key} = \"{}\"", duration_text(rng, ms))));
    }
    if let Some(resolvers) = &d.resolvers {
        let written: Vec<String> = resolvers.iter().map(|(w, _)| format!("\"{w}\"")).collect();
        keys.push(format!("resolvers = [{}]", written.join(", ")));
    }
    inline(rng, "discover", keys)
}

fn render_autoscale(rng: &mut Rng, a: &GenAutoscale) -> String {
    let mut keys = vec![
        format!("metric = \"{}\"", a.metric.name()),
        format!("target_per_backend = {:?}", a.target),
    ];
    keys.extend(a.tolerance.map(|t| format!("tolerance = {t:?}")));
    keys.extend(
        a.window_ms
            .map(|ms| format!("window = \"{}\"", duration_text(rng, ms))),
    );
    inline(rng, "autoscale", keys)
}

fn render_backend(rng: &mut Rng, b: &GenBackend) -> String {
    let mut keys = vec![format!("address = \"{}\"", b.address)];
    keys.extend(b.port.map(|port| format!("port = {port}")));
    keys.extend(b.weight.map(|weight| format!("weight = {weight}")));
    keys.extend(b.drain.map(|drain| format!("drain = {drain}")));
    rng.shuffle(&mut keys);
    format!("  {{ {} }},", keys.join(", "))
}

fn render_vip(rng: &mut Rng, v: &GenVip, out: &mut Vec<String>) {
    let mut keys = vec![
        format!("name = {}", toml_string(&v.name)),
        format!("address = \"{}\"", v.address),
        match v.port {
            Some(port) => format!("port = {port}"),
            None => "port = \"any\"".into(),
        },
        format!("protocol = \"{}\"", v.protocol),
        format!("forwarding = \"{}\"", v.forwarding.name()),
    ];
    keys.extend(v.table_size.map(|size| format!("table_size = {size}")));
    if let Some(when) = v.when_all_down {
        let when = if when == WhenAllDown::Drop {
            "drop"
        } else {
            "fail_open"
        };
        keys.push(format!("when_all_down = \"{when}\""));
    }
    keys.extend(v.hash.map(|h| format!("hash = \"{}\"", h.name())));
    for (key, source) in ["tunnel_source_v4", "tunnel_source_v6"]
        .iter()
        .zip(&v.tunnel_sources)
    {
        keys.extend(
            source
                .as_ref()
                .map(|(written, _)| format!("{key} = \"{written}\"")),
        );
    }
    match &v.snat {
        GenSnat::Interface => {}
        GenSnat::None => keys.push("snat = \"none\"".into()),
        GenSnat::Addresses(written, _) => keys.push(format!("snat = {written}")),
    }
    keys.extend(
        v.snat_ports
            .map(|(lo, hi)| format!("snat_ports = \"{lo}-{hi}\"")),
    );
    keys.extend(v.backend_port.map(|port| format!("backend_port = {port}")));
    keys.extend(v.health.as_ref().map(|h| render_health(rng, h)));
    keys.extend(v.discover.as_ref().map(|d| render_discover(rng, d)));
    keys.extend(v.autoscale.as_ref().map(|a| render_autoscale(rng, a)));
    if let Some((rate, burst, v4, v6)) = v.source_limit {
        let mut limit = vec![format!("rate = {rate}")];
        limit.extend(burst.map(|b| format!("burst = {b}")));
        limit.extend(v4.map(|p| format!("ipv4_prefix = {p}")));
        limit.extend(v6.map(|p| format!("ipv6_prefix = {p}")));
        keys.push(inline(rng, "source_limit", limit));
    }
    rng.shuffle(&mut keys);
    out.extend([String::new(), "[[vip]]".into()]);
    out.extend(keys);
    out.push("backends = [".into());
    out.extend(v.backends.iter().map(|b| render_backend(rng, b)));
    out.push("]".into());
}

/// The config's text: `[balancer]`, `[announce]` and `[sync]`, then the VIPs.
pub(super) fn render(rng: &mut Rng, c: &GenConfig) -> String {
    let mut lines = Vec::new();
    render_balancer(rng, &c.balancer, &mut lines);
    render_fleet(rng, c, &mut lines);
    for vip in &c.vips {
        render_vip(rng, vip, &mut lines);
    }
    lines.join("\n") + "\n"
}

// ---------------------------------------------------------------------------------------------
// What it must parse to.

fn check_balancer(b: &GenBalancer, c: &Config) {
    let ms = |ms: Option<u64>, default: Duration| ms.map_or(default, Duration::from_millis);
    let default = parse(Path::new("defaults.toml"), "[balancer]\n").expect("the defaults");
    assert_eq!(c.interface, b.interface);
    assert_eq!(c.hash_seed, b.hash_seed.map_or(0, |(seed, _)| seed));
    assert_eq!(
        c.conn_table_size,
        b.conn_table_size.unwrap_or(default.conn_table_size)
    );
    let metrics: SocketAddr = DEFAULT_METRICS_LISTEN.parse().unwrap();
    assert_eq!(c.metrics_listen, b.metrics_listen.unwrap_or(metrics));
    assert_eq!(
        c.removal_grace,
        ms(b.removal_grace_ms, default.removal_grace)
    );
    assert_eq!(
        c.reload_settle,
        ms(b.reload_settle_ms, default.reload_settle)
    );
    let pin_dir = b.pin_dir.as_deref().unwrap_or(DEFAULT_PIN_DIR);
    assert_eq!(c.pin_dir, PathBuf::from(pin_dir));
    assert_eq!(
        c.control_socket,
        b.control_socket.as_ref().map(PathBuf::from)
    );
    let max = b.api_max_connections.unwrap_or(default.api_max_connections);
    assert_eq!(c.api_max_connections, max);
    assert_eq!(
        c.api_idle_timeout,
        ms(b.api_idle_timeout_ms, default.api_idle_timeout)
    );
    assert_eq!(c.keep_datapath, b.keep_datapath.unwrap_or(false));
    let mut nat = default.nat;
    nat.table_size = b.nat_table_size.unwrap_or(nat.table_size);
    for (key, value) in &b.nat_timeouts {
        let field = match *key {
            "syn" => &mut nat.syn_timeout,
            "established" => &mut nat.established_timeout,
            "closing" => &mut nat.closing_timeout,
            "udp" => &mut nat.udp_timeout,
            _ => &mut nat.quarantine,
        };
        *field = Duration::from_millis(*value);
    }
    assert_eq!(c.nat, nat);
}

fn check_fleet(g: &GenConfig, c: &Config) {
    let (per_cpu, pending) = g.flood.unwrap_or_default();
    let default_pending = (c.conn_table_size / 4).max(MIN_PENDING_TABLE_SIZE);
    let flood = (c.flood.new_flows_per_cpu, c.flood.pending_table_size);
    let expected = (
        per_cpu.unwrap_or(DEFAULT_NEW_FLOWS_PER_CPU),
        pending.unwrap_or(default_pending),
    );
    assert_eq!(flood, expected);
    let announce = c.announce.as_ref().map(|a| (a.table, a.withdraw_wait));
    let wait = |ms: Option<u64>| ms.map_or(DEFAULT_WITHDRAW_WAIT, Duration::from_millis);
    assert_eq!(announce, g.announce.map(|(table, ms)| (table, wait(ms))));
    assert_eq!(c.sync.is_some(), g.sync.is_some());
    if let (Some(s), Some(g)) = (&c.sync, &g.sync) {
        assert_eq!((s.listen, &s.peers), (g.listen, &g.peers));
        assert_eq!(s.key_file, PathBuf::from(&g.key_file));
        let interval = g
            .interval_ms
            .map_or(DEFAULT_SYNC_INTERVAL, Duration::from_millis);
        let bulk = g
            .bulk_timeout_ms
            .map_or(DEFAULT_BULK_TIMEOUT, Duration::from_millis);
        assert_eq!((s.interval, s.bulk_timeout), (interval, bulk));
    }
}

/// The check of a backend serving on `port` (NAT) of `v`.
fn expected_health(v: &GenVip, port: Option<u16>) -> (CheckKind, u16) {
    let default_port = port.or(v.port);
    let Some(h) = &v.health else {
        return match default_port {
            Some(p) if v.protocol == Protocol::Tcp => (CheckKind::Tcp, p),
            _ => (CheckKind::None, 0),
        };
    };
    let port = h.port.or(default_port).expect("a port to probe");
    match h.kind {
        Some("none") => (CheckKind::None, 0),
        Some("http") => {
            let kind = CheckKind::Http {
                path: h.path.clone().unwrap_or_else(|| "/".into()),
                host: h.host.clone(),
                status: h.status.unwrap_or((200, 399)),
            };
            (kind, port)
        }
        _ => (CheckKind::Tcp, port),
    }
}

fn check_backends(g: &GenVip, v: &Vip) {
    assert_eq!(v.backends.len(), g.backends.len());
    for (b, gb) in v.backends.iter().zip(&g.backends) {
        let port = gb.port.or(g.backend_port);
        assert_eq!((b.address, b.port), (gb.address, port));
        assert_eq!(b.weight, gb.weight.unwrap_or(DEFAULT_WEIGHT));
        assert_eq!(b.drain, gb.drain.unwrap_or(false));
        let h = &b.health;
        assert_eq!((h.kind.clone(), h.port), expected_health(g, port));
        let given = g.health.clone();
        let ms = |f: fn(&GenHealth) -> Option<u64>, default: u64| {
            Duration::from_millis(given.as_ref().and_then(f).unwrap_or(default))
        };
        assert_eq!(h.interval, ms(|h| h.interval_ms, 2_000));
        assert_eq!(h.timeout, ms(|h| h.timeout_ms, 1_000));
        let counts = given
            .as_ref()
            .map_or((None, None, None), |g| (g.rise, g.fall, g.initial));
        assert_eq!(h.rise, counts.0.unwrap_or(2));
        assert_eq!(h.fall, counts.1.unwrap_or(3));
        assert_eq!(h.initial, counts.2.unwrap_or_default());
    }
}

fn check_discover(g: &GenVip, v: &Vip) {
    let (Some(gd), Some(d)) = (&g.discover, &v.discover) else {
        assert_eq!(g.discover.is_some(), v.discover.is_some());
        return;
    };
    let name = gd.name.clone();
    assert_eq!(
        d.query,
        if gd.srv {
            DiscoverQuery::Srv(name)
        } else {
            DiscoverQuery::Dns(name)
        }
    );
    let nat_dns = g.forwarding == Forwarding::Nat && !gd.srv;
    assert_eq!(
        d.port,
        if nat_dns {
            gd.port.or(g.backend_port)
        } else {
            None
        }
    );
    assert_eq!(d.weight, gd.weight.unwrap_or(DEFAULT_WEIGHT));
    let ms = |ms: Option<u64>, default: u64| Duration::from_millis(ms.unwrap_or(default));
    assert_eq!(d.interval, ms(gd.interval_ms, 5_000));
    assert_eq!(d.timeout, ms(gd.timeout_ms, 2_000));
    assert_eq!(d.empty_grace, ms(gd.empty_grace_ms, 60_000));
    let room = v.table_size - g.backends.len() as u32;
    assert_eq!(
        d.max_backends,
        gd.max_backends.unwrap_or(room.clamp(1, 256))
    );
    let resolvers: Vec<SocketAddr> = gd.resolvers.iter().flatten().map(|(_, r)| *r).collect();
    assert_eq!(d.resolvers, resolvers);
}

fn check_vip(g: &GenVip, v: &Vip) {
    assert_eq!(
        (&v.name, v.address, v.port, v.protocol, v.forwarding),
        (&g.name, g.address, g.port, g.protocol, g.forwarding)
    );
    assert_eq!(v.table_size, g.table_size.unwrap_or(DEFAULT_MAGLEV_SIZE));
    assert_eq!(v.when_all_down, g.when_all_down.unwrap_or_default());
    assert_eq!(v.hash, g.hash.unwrap_or_default());
    assert!(!v.fragments);
    let sources = g
        .tunnel_sources
        .clone()
        .map(|s| s.map(|(_, source)| source));
    assert_eq!([v.tunnel_source_v4, v.tunnel_source_v6], sources);
    let autoscale = v
        .autoscale
        .map(|a| (a.metric, a.target_per_backend, a.tolerance, a.window));
    let expected = g.autoscale.as_ref().map(|a| {
        let window = Duration::from_millis(a.window_ms.unwrap_or(60_000));
        (a.metric, a.target, a.tolerance.unwrap_or(0.1), window)
    });
    assert_eq!(autoscale, expected);
    let nat = v.nat.as_ref().map(|n| (n.snat.clone(), n.ports));
    let expected_nat = (g.forwarding == Forwarding::Nat).then(|| match &g.snat {
        GenSnat::None => (Snat::None, DEFAULT_SNAT_PORTS),
        GenSnat::Interface => (
            Snat::Interface,
            g.snat_ports.unwrap_or(DEFAULT_HOST_SNAT_PORTS),
        ),
        GenSnat::Addresses(_, a) => (
            Snat::Addresses(a.clone()),
            g.snat_ports.unwrap_or(DEFAULT_SNAT_PORTS),
        ),
    });
    assert_eq!(nat, expected_nat);
    let limit = v
        .source_limit
        .as_ref()
        .map(|l| (l.rate, l.burst, l.ipv4_prefix, l.ipv6_prefix));
    let expected = g.source_limit.map(|(rate, burst, v4, v6)| {
        (
            rate,
            burst.unwrap_or(rate),
            v4.unwrap_or(DEFAULT_IPV4_PREFIX),
            v6.unwrap_or(DEFAULT_IPV6_PREFIX),
        )
    });
    assert_eq!(limit, expected);
    check_backends(g, v);
    check_discover(g, v);
}

/// `config` is what `generated` says, key by key, defaults where it says nothing.
pub(super) fn check_config(generated: &GenConfig, config: &Config) {
    check_balancer(&generated.balancer, config);
    check_fleet(generated, config);
    assert_eq!(config.vips.len(), generated.vips.len());
    for (g, v) in generated.vips.iter().zip(&config.vips) {
        check_vip(g, v);
    }
}

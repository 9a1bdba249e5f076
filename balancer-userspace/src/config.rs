//! The TOML config: parsed, checked, and turned into a validated [`Config`].
//!
//! Every error names the file, line and column of the offending key or value and says what is
//! wrong. Unknown keys are errors, not warnings: a typo in `drain` must not silently leave a
//! backend in service.

pub mod diff;
pub mod health;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

pub use health::{CheckKind, HealthCheck, InitialState};

use balancer_common::{
    DEFAULT_CONN_TABLE_SIZE, DEFAULT_MAGLEV_SIZE, MAGLEV_CAPACITY, MAX_BACKENDS, MAX_VIPS,
};
use serde::{de, Deserialize, Deserializer};
use toml::Spanned;

/// Default address of the metrics and status endpoint.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9100";
/// Default backend weight (as in IPVS and HAProxy).
pub const DEFAULT_WEIGHT: u32 = 1;
/// Largest accepted weight.
pub const MAX_WEIGHT: u32 = 65_535;
/// Smallest accepted connection table.
pub const MIN_CONN_TABLE_SIZE: u32 = 1_024;
/// Largest accepted connection table (about 2.5 GiB of kernel memory).
pub const MAX_CONN_TABLE_SIZE: u32 = 1 << 25;
/// Default time a backend removed from the config keeps its established flows.
pub const DEFAULT_REMOVAL_GRACE: Duration = Duration::from_secs(300);

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The interface to attach to; `balancer run --interface` overrides it.
    pub interface: Option<String>,
    pub xdp_mode: XdpModeSetting,
    pub hash_seed: u32,
    pub conn_table_size: u32,
    pub metrics_listen: SocketAddr,
    /// How long a backend removed from the config keeps its established flows (it gets no new
    /// ones); re-adding it within that time keeps them too.
    pub removal_grace: Duration,
    /// Where the data plane's maps and XDP link are pinned: `<pin_dir>/<interface>/v<layout>/`.
    pub pin_dir: PathBuf,
    /// On SIGTERM/SIGINT, leave the data plane forwarding with its last state (for restarts
    /// and upgrades) instead of removing it.
    pub keep_datapath: bool,
    pub vips: Vec<Vip>,
}

/// Default of `pin_dir`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/balancer";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) mode, falling back to generic mode with a logged reason.
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => balancer_common::PROTO_TCP,
            Protocol::Udp => balancer_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// L2 direct server return.
    Dsr,
    /// IP-in-IP encapsulation (not implemented yet; rejected by validation).
    Tunnel,
    /// Full NAT (not implemented yet; rejected by validation).
    Nat,
}

/// What a VIP does when every backend is down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenAllDown {
    /// Spread new flows over all of them anyway (a health check that fails everywhere is more
    /// often wrong than every server at once).
    #[default]
    FailOpen,
    /// Drop the VIP's packets (counted as `no_backend`).
    Drop,
}

/// What the VIP's Maglev hash covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashMode {
    /// Source and destination address and port, and protocol.
    #[default]
    FiveTuple,
    /// The destination port only: every flow to a port of the VIP goes to the same backend.
    DstPortOnly,
}

/// The load metric an autoscale target is set on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoscaleMetric {
    NewFlowsPerSecond,
    PacketsPerSecond,
    BytesPerSecond,
}

impl AutoscaleMetric {
    pub fn name(self) -> &'static str {
        match self {
            AutoscaleMetric::NewFlowsPerSecond => "new_flows_per_second",
            AutoscaleMetric::PacketsPerSecond => "packets_per_second",
            AutoscaleMetric::BytesPerSecond => "bytes_per_second",
        }
    }
}

/// A VIP's autoscaling target: desired backends = ceil(ready x (rate per ready backend) /
/// target), as the Kubernetes HorizontalPodAutoscaler computes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Autoscale {
    pub metric: AutoscaleMetric,
    pub target_per_backend: f64,
    /// No change while the per-backend rate is within this fraction of the target.
    pub tolerance: f64,
    /// The rate is averaged over this window.
    pub window: Duration,
}

impl Eq for Autoscale {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoscale {
    metric: AutoscaleMetric,
    target_per_backend: Spanned<f64>,
    tolerance: Option<Spanned<f64>>,
    window: Option<Spanned<String>>,
}

/// The outer source address of tunnel packets: an address, or a prefix whose host bits vary
/// per flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelSource {
    pub address: IpAddr,
    /// How many low bits vary per flow (0: always `address`).
    pub varied_bits: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub name: String,
    pub address: IpAddr,
    /// `None`: any port.
    pub port: Option<u16>,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub table_size: u32,
    pub when_all_down: WhenAllDown,
    pub hash: HashMode,
    /// Balance fragments: hash every fragment of a datagram on addresses and protocol only.
    pub fragments: bool,
    /// Tunnel mode: outer source of IPv4 tunnels (default: the egress interface's address).
    pub tunnel_source_v4: Option<TunnelSource>,
    /// Tunnel mode: outer source of IPv6 tunnels (default: the egress interface's address).
    pub tunnel_source_v6: Option<TunnelSource>,
    /// The autoscaling signal: how many backends this VIP wants for its load.
    pub autoscale: Option<Autoscale>,
    pub backends: Vec<BackendConfig>,
}

impl Vip {
    /// `203.0.113.10:80/tcp`, `203.0.113.10:*/udp`.
    pub fn endpoint(&self) -> String {
        let port = self.port.map_or("*".to_owned(), |p| p.to_string());
        match self.address {
            IpAddr::V4(a) => format!("{a}:{port}/{}", self.protocol),
            IpAddr::V6(a) => format!("[{a}]:{port}/{}", self.protocol),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub address: IpAddr,
    pub weight: u32,
    pub drain: bool,
    /// The VIP's health check with this backend's overrides.
    pub health: HealthCheck,
}

impl BackendConfig {
    /// Whether the backend takes new flows (draining and weight 0 do not).
    pub fn takes_new_flows(&self) -> bool {
        !self.drain && self.weight > 0
    }
}

/// A config error with its position (line 0 when the file could not be read at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file.display(), self.message),
            line => write!(
                f,
                "{}:{line}:{}: {}",
                self.file.display(),
                self.column,
                self.message
            ),
        }
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        line: 0,
        column: 0,
        message: format!("cannot read the config file: {e}"),
    })?;
    parse(path, &text)
}

/// Validates config text; `file` is only used in error messages.
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let at = |span: Range<usize>, message: String| {
        let (line, column) = line_column(text, span.start);
        ConfigError {
            file: file.to_owned(),
            line,
            column,
            message,
        }
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let message = e.message().trim_end().to_owned();
        at(e.span().unwrap_or(0..0), message)
    })?;
    validate(raw).map_err(|(span, message)| at(span, message))
}

/// `metrics_listen` of a config file, read leniently: the rest of the file may be invalid
/// (`balancer reload` must be able to reach a daemon to hear why its new config is rejected).
pub fn metrics_listen_of(path: &Path) -> anyhow::Result<SocketAddr> {
    use anyhow::Context as _;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: toml::Table = match toml::from_str(&text) {
        Ok(value) => value,
        // Not even TOML: the default address is the best guess.
        Err(_) => return Ok(DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
    };
    let listen = value
        .get("balancer")
        .and_then(|b| b.get("metrics_listen"))
        .and_then(|v| v.as_str());
    match listen {
        None => Ok(DEFAULT_METRICS_LISTEN.parse().expect("valid default")),
        Some(text) => text.parse().with_context(|| {
            format!(
                "{}: metrics_listen \"{text}\" is not an address:port",
                path.display()
            )
        }),
    }
}

/// 1-based line and column of a byte offset (columns count characters, not bytes).
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

// ---------------------------------------------------------------------------------------------
// The shape of the file, as serde sees it. Positions are kept for every value that a later
// check may reject.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    balancer: RawBalancer,
    #[serde(default)]
    vip: Vec<Spanned<RawVip>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBalancer {
    interface: Option<Spanned<String>>,
    #[serde(default)]
    xdp_mode: XdpModeSetting,
    #[serde(default)]
    hash_seed: Option<HashSeed>,
    conn_table_size: Option<Spanned<u32>>,
    metrics_listen: Option<Spanned<String>>,
    removal_grace: Option<Spanned<String>>,
    pin_dir: Option<Spanned<String>>,
    #[serde(default)]
    keep_datapath: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    name: Spanned<String>,
    address: Spanned<IpAddr>,
    port: Spanned<PortSpec>,
    protocol: Protocol,
    forwarding: Spanned<Forwarding>,
    table_size: Option<Spanned<u32>>,
    health: Option<Spanned<health::RawHealth>>,
    #[serde(default)]
    when_all_down: WhenAllDown,
    #[serde(default)]
    hash: HashMode,
    #[serde(default)]
    fragments: bool,
    tunnel_source_v4: Option<Spanned<String>>,
    tunnel_source_v6: Option<Spanned<String>>,
    autoscale: Option<Spanned<RawAutoscale>>,
    #[serde(default)]
    backends: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Spanned<IpAddr>,
    weight: Option<Spanned<u32>>,
    #[serde(default)]
    drain: bool,
    health: Option<Spanned<health::RawHealth>>,
}

/// `hash_seed`: an integer, or a string holding a decimal or `0x` hexadecimal number.
struct HashSeed(u32);

impl<'de> Deserialize<'de> for HashSeed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = HashSeed;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a 32-bit unsigned integer, or a string like \"0x5eed\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HashSeed, E> {
                u32::try_from(v)
                    .map(HashSeed)
                    .map_err(|_| E::custom(format!("hash_seed {v} does not fit in 32 bits")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HashSeed, E> {
                let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
                    Some(hex) => u32::from_str_radix(hex, 16),
                    None => v.parse(),
                };
                parsed.map(HashSeed).map_err(|_| {
                    E::custom(format!(
                        "hash_seed \"{v}\" is not a 32-bit number (decimal or 0x-prefixed hex)"
                    ))
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `port`: 1-65535, or the string "any".
enum PortSpec {
    Port(u16),
    Any,
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number from 1 to 65535, or \"any\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortSpec, E> {
                match u16::try_from(v) {
                    Ok(p) if p > 0 => Ok(PortSpec::Port(p)),
                    _ => Err(E::custom(format!(
                        "port {v} is out of range: use 1 to 65535, or \"any\" for every port"
                    ))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortSpec, E> {
                if v == "any" {
                    Ok(PortSpec::Any)
                } else {
                    Err(E::custom(format!(
                        "port \"{v}\" is not valid: use a number from 1 to 65535, or \"any\""
                    )))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Checks beyond the shape.

type Invalid = (Range<usize>, String);

fn validate(raw: RawConfig) -> Result<Config, Invalid> {
    let b = raw.balancer;
    if let Some(interface) = &b.interface {
        check_interface_name(interface.get_ref()).map_err(|m| (interface.span(), m))?;
    }
    let conn_table_size = match b.conn_table_size {
        None => DEFAULT_CONN_TABLE_SIZE,
        Some(size) => {
            let v = *size.get_ref();
            if !(MIN_CONN_TABLE_SIZE..=MAX_CONN_TABLE_SIZE).contains(&v) {
                return Err((
                    size.span(),
                    format!(
                        "conn_table_size {v} is out of range: use {MIN_CONN_TABLE_SIZE} to \
                         {MAX_CONN_TABLE_SIZE} flows"
                    ),
                ));
            }
            v
        }
    };
    let metrics_listen = match b.metrics_listen {
        None => DEFAULT_METRICS_LISTEN.parse().expect("valid default"),
        Some(listen) => listen.get_ref().parse().map_err(|_| {
            (
                listen.span(),
                format!(
                    "metrics_listen \"{}\" is not an address:port such as \"127.0.0.1:9100\"",
                    listen.get_ref()
                ),
            )
        })?,
    };

    let removal_grace = match b.removal_grace {
        None => DEFAULT_REMOVAL_GRACE,
        Some(grace) => health::parse_duration(grace.get_ref())
            .map_err(|e| (grace.span(), format!("removal_grace {e}")))?,
    };

    let pin_dir = match b.pin_dir {
        None => PathBuf::from(DEFAULT_PIN_DIR),
        Some(dir) => {
            let path = PathBuf::from(dir.get_ref());
            if !path.is_absolute()
                || path
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                return Err((
                    dir.span(),
                    format!(
                        "pin_dir \"{}\" must be an absolute path without `..`, on a bpffs \
                         (such as \"{DEFAULT_PIN_DIR}\")",
                        dir.get_ref()
                    ),
                ));
            }
            path
        }
    };

    if raw.vip.len() > MAX_VIPS as usize {
        let span = raw.vip[MAX_VIPS as usize].span();
        return Err((span, format!("too many VIPs: at most {MAX_VIPS}")));
    }
    let mut names = HashSet::new();
    let mut endpoints: HashMap<(IpAddr, Option<u16>, Protocol), String> = HashMap::new();
    let mut total_backends = 0usize;
    let mut vips = Vec::with_capacity(raw.vip.len());
    for raw_vip in raw.vip {
        let vip_span = raw_vip.span();
        let vip = validate_vip(raw_vip.into_inner())?;
        if !names.insert(vip.name.clone()) {
            return Err((vip_span, format!("duplicate VIP name \"{}\"", vip.name)));
        }
        if let Some(other) =
            endpoints.insert((vip.address, vip.port, vip.protocol), vip.name.clone())
        {
            return Err((
                vip_span,
                format!(
                    "VIP \"{}\" has the same {} as VIP \"{other}\"",
                    vip.name,
                    vip.endpoint()
                ),
            ));
        }
        if vip.fragments && vip.port.is_some() {
            // Non-first fragments carry no port: they must belong to one VIP unambiguously.
            if let Some(other) = vips
                .iter()
                .find(|o: &&Vip| o.address == vip.address && o.protocol == vip.protocol)
            {
                return Err((
                    vip_span,
                    format!(
                        "VIP \"{}\": fragments = true needs to be the only VIP on {} {} (VIP \"{}\" is too): \
                         fragments after the first carry no port",
                        vip.name, vip.address, vip.protocol, other.name
                    ),
                ));
            }
        }
        if let Some(other) = vips.iter().find(|o: &&Vip| {
            o.fragments
                && o.port.is_some()
                && o.address == vip.address
                && o.protocol == vip.protocol
        }) {
            return Err((
                vip_span,
                format!(
                    "VIP \"{}\": VIP \"{}\" on the same address and protocol sets fragments = true and must be the \
                     only one there",
                    vip.name, other.name
                ),
            ));
        }
        total_backends += vip.backends.len();
        if total_backends > MAX_BACKENDS as usize {
            return Err((
                vip_span,
                format!("too many backends: at most {MAX_BACKENDS} over all VIPs"),
            ));
        }
        vips.push(vip);
    }

    Ok(Config {
        interface: b.interface.map(Spanned::into_inner),
        xdp_mode: b.xdp_mode,
        hash_seed: b.hash_seed.map_or(0, |s| s.0),
        conn_table_size,
        metrics_listen,
        removal_grace,
        pin_dir,
        keep_datapath: b.keep_datapath,
        vips,
    })
}

fn validate_vip(raw: RawVip) -> Result<Vip, Invalid> {
    let name = raw.name.get_ref();
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !name_ok {
        return Err((
            raw.name.span(),
            format!(
                "VIP name \"{name}\" is not valid: use 1 to 64 letters, digits, '-', '_' or '.'"
            ),
        ));
    }
    let name = raw.name.into_inner();

    let address = *raw.address.get_ref();
    if address.is_unspecified() || address.is_multicast() || is_broadcast(address) {
        return Err((
            raw.address.span(),
            format!(
                "VIP \"{name}\": {address} cannot be a VIP (unspecified, multicast or broadcast)"
            ),
        ));
    }

    let forwarding = *raw.forwarding.get_ref();
    if forwarding == Forwarding::Nat {
        return Err((
            raw.forwarding.span(),
            format!("VIP \"{name}\": forwarding = \"nat\" is not supported yet (use \"dsr\" or \"tunnel\")"),
        ));
    }
    let autoscale = match &raw.autoscale {
        None => None,
        Some(a) => {
            let a = a.get_ref();
            let target = *a.target_per_backend.get_ref();
            if !(target.is_finite() && target > 0.0) {
                return Err((
                    a.target_per_backend.span(),
                    format!("VIP \"{name}\": autoscale target_per_backend must be above 0"),
                ));
            }
            let tolerance = match &a.tolerance {
                None => 0.1,
                Some(t) if (0.0..1.0).contains(t.get_ref()) => *t.get_ref(),
                Some(t) => {
                    return Err((
                        t.span(),
                        format!("VIP \"{name}\": autoscale tolerance must be from 0 to below 1"),
                    ))
                }
            };
            let window = match &a.window {
                None => Duration::from_secs(60),
                Some(w) => {
                    let d = health::parse_duration(w.get_ref())
                        .map_err(|e| (w.span(), format!("VIP \"{name}\": autoscale window {e}")))?;
                    if !(Duration::from_secs(2)..=Duration::from_secs(3600)).contains(&d) {
                        return Err((
                            w.span(),
                            format!("VIP \"{name}\": autoscale window must be from 2s to 1h"),
                        ));
                    }
                    d
                }
            };
            Some(Autoscale {
                metric: a.metric,
                target_per_backend: target,
                tolerance,
                window,
            })
        }
    };
    let mut tunnel_sources = [None, None];
    for (i, (key, value, v6)) in [
        ("tunnel_source_v4", &raw.tunnel_source_v4, false),
        ("tunnel_source_v6", &raw.tunnel_source_v6, true),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(value) = value else { continue };
        if forwarding != Forwarding::Tunnel {
            return Err((
                value.span(),
                format!("VIP \"{name}\": {key} only applies to forwarding = \"tunnel\""),
            ));
        }
        tunnel_sources[i] = Some(
            parse_tunnel_source(value.get_ref(), v6)
                .map_err(|e| (value.span(), format!("VIP \"{name}\": {key} {e}")))?,
        );
    }

    let table_size = match raw.table_size {
        None => DEFAULT_MAGLEV_SIZE,
        Some(size) => {
            let v = *size.get_ref();
            if !(2..=MAGLEV_CAPACITY).contains(&v) || !is_prime(v) {
                return Err((
                    size.span(),
                    format!(
                        "VIP \"{name}\": table_size {v} must be a prime no larger than \
                         {MAGLEV_CAPACITY} (for example 251, 1021, 4093, 16381, 65537)"
                    ),
                ));
            }
            v
        }
    };

    let mut seen = HashSet::new();
    let mut backends = Vec::with_capacity(raw.backends.len());
    for raw_backend in raw.backends {
        let span = raw_backend.span();
        let rb = raw_backend.into_inner();
        let backend_address = *rb.address.get_ref();
        if forwarding == Forwarding::Dsr && backend_address.is_ipv4() != address.is_ipv4() {
            return Err((
                rb.address.span(),
                format!(
                    "VIP \"{name}\": backend {backend_address} is not of the VIP's address \
                     family; direct server return forwards the packet unchanged (tunnel mode can \
                     carry IPv4 VIPs to IPv6 backends)"
                ),
            ));
        }
        if forwarding == Forwarding::Tunnel && address.is_ipv6() && backend_address.is_ipv4() {
            return Err((
                rb.address.span(),
                format!("VIP \"{name}\": an IPv6 VIP cannot be tunnelled to the IPv4 backend {backend_address}"),
            ));
        }
        if backend_address.is_unspecified()
            || backend_address.is_multicast()
            || backend_address.is_loopback()
            || is_broadcast(backend_address)
        {
            return Err((
                rb.address.span(),
                format!(
                    "VIP \"{name}\": {backend_address} cannot be a backend (unspecified, \
                     loopback, multicast or broadcast)"
                ),
            ));
        }
        if !seen.insert(backend_address) {
            return Err((
                span,
                format!("VIP \"{name}\": backend {backend_address} is listed twice"),
            ));
        }
        let weight = match rb.weight {
            None => DEFAULT_WEIGHT,
            Some(w) if *w.get_ref() <= MAX_WEIGHT => *w.get_ref(),
            Some(w) => {
                return Err((
                    w.span(),
                    format!(
                        "VIP \"{name}\": weight {} is out of range: use 0 (drain) to {MAX_WEIGHT}",
                        w.get_ref()
                    ),
                ))
            }
        };
        let vip_health = raw
            .health
            .as_ref()
            .map(|h| h.get_ref().clone())
            .unwrap_or_default();
        let (merged, health_span) = match &rb.health {
            Some(o) => (vip_health.overridden_by(o.get_ref()), o.span()),
            None => (
                vip_health,
                raw.health.as_ref().map_or(span.clone(), |h| h.span()),
            ),
        };
        let port = match raw.port.get_ref() {
            PortSpec::Port(p) => Some(*p),
            PortSpec::Any => None,
        };
        let where_ = format!("VIP \"{name}\", backend {backend_address}");
        let present = raw.health.is_some() || rb.health.is_some();
        let health = health::resolve(&merged, present, raw.protocol, port, &where_, health_span)?;
        backends.push(BackendConfig {
            address: backend_address,
            weight,
            drain: rb.drain,
            health,
        });
    }
    if backends.len() > table_size as usize {
        return Err((
            raw.port.span(),
            format!(
                "VIP \"{name}\": {} backends do not fit a table of {table_size} slots; raise \
                 table_size",
                backends.len()
            ),
        ));
    }

    Ok(Vip {
        name,
        address,
        port: match raw.port.into_inner() {
            PortSpec::Port(p) => Some(p),
            PortSpec::Any => None,
        },
        protocol: raw.protocol,
        forwarding,
        table_size,
        when_all_down: raw.when_all_down,
        hash: raw.hash,
        fragments: raw.fragments,
        tunnel_source_v4: tunnel_sources[0],
        tunnel_source_v6: tunnel_sources[1],
        autoscale,
        backends,
    })
}

/// `"192.0.2.1"` (a fixed address) or `"172.16.0.0/16"` (host bits varied per flow; at most
/// 32 of them).
fn parse_tunnel_source(text: &str, v6: bool) -> Result<TunnelSource, String> {
    let (address, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let address: IpAddr = address
        .parse()
        .map_err(|_| format!("\"{text}\" is not an address or prefix"))?;
    if address.is_ipv6() != v6 {
        return Err(format!(
            "\"{text}\" is not an IPv{} address",
            if v6 { 6 } else { 4 }
        ));
    }
    let bits = if v6 { 128u32 } else { 32 };
    let varied_bits = match len {
        None => 0,
        Some(l) => {
            let len: u32 = l
                .parse()
                .map_err(|_| format!("\"{text}\": bad prefix length"))?;
            if len > bits || bits - len > 32 {
                return Err(format!(
                    "\"{text}\": the prefix must leave 0 to 32 host bits"
                ));
            }
            (bits - len) as u8
        }
    };
    Ok(TunnelSource {
        address,
        varied_bits,
    })
}

fn check_interface_name(name: &str) -> Result<(), String> {
    // The kernel's limit (IFNAMSIZ - 1) and the characters it rejects.
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', ':']) || name == "." {
        return Err(format!(
            "interface \"{name}\" is not a valid interface name"
        ));
    }
    Ok(())
}

fn is_broadcast(address: IpAddr) -> bool {
    matches!(address, IpAddr::V4(a) if a.is_broadcast())
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[balancer]
interface = "eth0"
xdp_mode = "native"
hash_seed = "0x5eed"
conn_table_size = 65536
metrics_listen = "127.0.0.1:9200"

[[vip]]
name = "web"
address = "203.0.113.10"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
backends = [
  { address = "10.0.0.11", weight = 100 },
  { address = "10.0.0.12", drain = true },
]

[[vip]]
name = "dns"
address = "203.0.113.10"
port = "any"
protocol = "udp"
forwarding = "dsr"
backends = [{ address = "10.0.0.13" }]
"#;

    #[test]
    fn accepts_a_full_config() {
        let c = parse(Path::new("good.toml"), GOOD).unwrap();
        assert_eq!(c.interface.as_deref(), Some("eth0"));
        assert_eq!(c.xdp_mode, XdpModeSetting::Native);
        assert_eq!(c.hash_seed, 0x5eed);
        assert_eq!(c.conn_table_size, 65536);
        assert_eq!(c.metrics_listen, "127.0.0.1:9200".parse().unwrap());
        assert_eq!(c.vips.len(), 2);
        let web = &c.vips[0];
        assert_eq!(
            (web.port, web.protocol, web.table_size),
            (Some(80), Protocol::Tcp, 251)
        );
        let summary: Vec<(IpAddr, u32, bool)> = web
            .backends
            .iter()
            .map(|b| (b.address, b.weight, b.drain))
            .collect();
        assert_eq!(
            summary,
            [
                ("10.0.0.11".parse().unwrap(), 100, false),
                ("10.0.0.12".parse().unwrap(), DEFAULT_WEIGHT, true)
            ]
        );
        // No health table: a TCP VIP with a port gets a TCP check of that port with the
        // defaults; a UDP any-port VIP gets none.
        let defaults = HealthCheck {
            kind: CheckKind::Tcp,
            port: 80,
            interval: health::DEFAULT_INTERVAL,
            timeout: health::DEFAULT_TIMEOUT,
            rise: health::DEFAULT_RISE,
            fall: health::DEFAULT_FALL,
            initial: InitialState::Up,
        };
        assert_eq!(web.backends[0].health, defaults);
        assert_eq!(c.vips[1].backends[0].health.kind, CheckKind::None);
        assert_eq!(web.when_all_down, WhenAllDown::FailOpen);
        assert_eq!(c.removal_grace, DEFAULT_REMOVAL_GRACE);
        assert_eq!(c.vips[1].port, None);
        assert_eq!(c.vips[1].table_size, DEFAULT_MAGLEV_SIZE);
        assert_eq!(c.vips[1].endpoint(), "203.0.113.10:*/udp");
    }

    const HEALTH: &str = r#"
[balancer]
removal_grace = "30s"
[[vip]]
name = "web"
address = "192.0.2.1"
port = 80
protocol = "tcp"
forwarding = "dsr"
when_all_down = "drop"
health = { kind = "http", path = "/healthz", host = "web.example", status = "200-299", interval = "500ms", timeout = "200ms", rise = 1, fall = 2, initial = "down" }
backends = [
  { address = "10.0.0.1" },
  { address = "10.0.0.2", health = { port = 8080, fall = 5 } },
  { address = "10.0.0.3", health = { kind = "tcp" } },
]
"#;

    #[test]
    fn health_checks_and_overrides() {
        let c = parse(Path::new("h.toml"), HEALTH).unwrap();
        assert_eq!(c.removal_grace, Duration::from_secs(30));
        let vip = &c.vips[0];
        assert_eq!(vip.when_all_down, WhenAllDown::Drop);
        let http = HealthCheck {
            kind: CheckKind::Http {
                path: "/healthz".into(),
                host: Some("web.example".into()),
                status: (200, 299),
            },
            port: 80,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(200),
            rise: 1,
            fall: 2,
            initial: InitialState::Down,
        };
        assert_eq!(vip.backends[0].health, http);
        // Overrides replace single keys and keep the rest of the VIP's table.
        assert_eq!(
            vip.backends[1].health,
            HealthCheck {
                port: 8080,
                fall: 5,
                ..http.clone()
            }
        );
        // Overriding the kind leaves the VIP's HTTP-only keys behind.
        assert_eq!(
            vip.backends[2].health,
            HealthCheck {
                kind: CheckKind::Tcp,
                ..http
            }
        );
    }

    #[test]
    fn health_errors_name_the_position() {
        let cases: &[(&str, &str, usize, usize, &str)] = &[
            (
                "interval = \"500ms\"",
                "interval = \"half a second\"",
                11,
                99,
                "health interval \"half a second\" is not a duration",
            ),
            (
                "interval = \"500ms\"",
                "interval = \"50ms\"",
                11,
                99,
                "interval must be from 100ms to 1h",
            ),
            (
                "timeout = \"200ms\"",
                "timeout = \"2s\"",
                11,
                118,
                "timeout must be at least 10ms and no longer than the interval",
            ),
            (
                "rise = 1",
                "rise = 0",
                11,
                134,
                "health rise must be from 1 to 100",
            ),
            (
                "status = \"200-299\"",
                "status = \"2xx\"",
                11,
                77,
                "health status \"2xx\" is not a status code",
            ),
            (
                "path = \"/healthz\"",
                "path = \"healthz\"",
                11,
                34,
                "health path must start with '/'",
            ),
            (
                "{ kind = \"tcp\" }",
                "{ kind = \"tcp\", path = \"/\" }",
                15,
                59,
                "health path only applies to kind = \"http\"",
            ),
            (
                "{ port = 8080, fall = 5 }",
                "{ port = 0 }",
                14,
                45,
                "health port must be from 1 to 65535",
            ),
            (
                "{ port = 8080, fall = 5 }",
                "{ prot = 8080 }",
                14,
                38,
                "unknown field `prot`",
            ),
            (
                "removal_grace = \"30s\"",
                "removal_grace = \"soon\"",
                3,
                17,
                "removal_grace \"soon\"",
            ),
            (
                "when_all_down = \"drop\"",
                "when_all_down = \"panic\"",
                10,
                17,
                "unknown variant `panic`",
            ),
            (
                "removal_grace = \"30s\"",
                "removal_grace = \"30s\"\npin_dir = \"bpf/balancer\"",
                4,
                11,
                "pin_dir \"bpf/balancer\" must be an absolute path",
            ),
            (
                "removal_grace = \"30s\"",
                "removal_grace = \"30s\"\npin_dir = \"/sys/fs/bpf/../x\"",
                4,
                11,
                "without `..`",
            ),
            (
                "removal_grace = \"30s\"",
                "removal_grace = \"30s\"\nkeep_datapath = \"yes\"",
                4,
                17,
                "invalid type",
            ),
        ];
        for (from, to, line, column, message) in cases {
            assert!(HEALTH.contains(from), "{from}");
            let err = parse(Path::new("h.toml"), &HEALTH.replacen(from, to, 1)).expect_err(to);
            assert!(err.message.contains(message), "{to}: {err}");
            assert_eq!((err.line, err.column), (*line, *column), "{to}: {err}");
        }
    }

    #[test]
    fn health_checks_of_udp_and_any_port_vips_need_a_port() {
        let udp = "[balancer]\n[[vip]]\nname = \"dns\"\naddress = \"192.0.2.1\"\nport = 53\nprotocol = \"udp\"\nforwarding = \"dsr\"\nhealth = { kind = \"tcp\" }\nbackends = [{ address = \"10.0.0.1\" }]\n";
        let err = parse(Path::new("u.toml"), udp).unwrap_err();
        assert!(
            err.message
                .contains("a tcp check of a UDP VIP needs an explicit TCP `port`"),
            "{err}"
        );
        assert_eq!((err.line, err.column), (8, 19));
        parse(
            Path::new("u.toml"),
            &udp.replace("{ kind = \"tcp\" }", "{ kind = \"tcp\", port = 8053 }"),
        )
        .unwrap();
        let any = udp.replace(
            "port = 53\nprotocol = \"udp\"",
            "port = \"any\"\nprotocol = \"tcp\"",
        );
        let err = parse(Path::new("a.toml"), &any).unwrap_err();
        assert!(err.message.contains("the VIP has no port"), "{err}");
    }

    #[test]
    fn defaults() {
        let c = parse(Path::new("min.toml"), "[balancer]\n").unwrap();
        assert_eq!(c.interface, None);
        assert_eq!(c.xdp_mode, XdpModeSetting::Auto);
        assert_eq!(c.hash_seed, 0);
        assert_eq!(c.conn_table_size, DEFAULT_CONN_TABLE_SIZE);
        assert_eq!(c.metrics_listen.to_string(), DEFAULT_METRICS_LISTEN);
        assert!(c.vips.is_empty());
    }

    /// Replaces the first occurrence of `from` in the good config and expects an error at
    /// `line:column` whose message contains `message`.
    fn rejects(from: &str, to: &str, line: usize, column: usize, message: &str) {
        assert!(GOOD.contains(from), "fixture does not contain {from:?}");
        let text = GOOD.replacen(from, to, 1);
        let err = parse(Path::new("bad.toml"), &text).expect_err(to);
        assert!(
            err.message.contains(message),
            "{to:?}: message {:?} does not contain {message:?}",
            err.message
        );
        assert_eq!((err.line, err.column), (line, column), "{to:?}: {err}");
        assert!(
            err.to_string()
                .starts_with(&format!("bad.toml:{line}:{column}: ")),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_position() {
        // (replace, with, line, column, part of the message)
        let cases: &[(&str, &str, usize, usize, &str)] = &[
            (
                "xdp_mode = \"native\"",
                "xdp_mod = \"native\"",
                4,
                1,
                "unknown field `xdp_mod`",
            ),
            (
                "xdp_mode = \"native\"",
                "xdp_mode = \"fast\"",
                4,
                12,
                "unknown variant `fast`",
            ),
            (
                "hash_seed = \"0x5eed\"",
                "hash_seed = \"0xzz\"",
                5,
                13,
                "hash_seed \"0xzz\"",
            ),
            (
                "hash_seed = \"0x5eed\"",
                "hash_seed = -1",
                5,
                13,
                "does not fit in 32 bits",
            ),
            (
                "conn_table_size = 65536",
                "conn_table_size = 10",
                6,
                19,
                "out of range",
            ),
            (
                "\"127.0.0.1:9200\"",
                "\"localhost\"",
                7,
                18,
                "is not an address:port",
            ),
            (
                "interface = \"eth0\"",
                "interface = \"a/b\"",
                3,
                13,
                "not a valid interface",
            ),
            (
                "name = \"web\"",
                "name = \"w b\"",
                10,
                8,
                "VIP name \"w b\" is not valid",
            ),
            (
                "\"203.0.113.10\"",
                "\"203.0.113\"",
                11,
                11,
                "invalid IP address syntax",
            ),
            (
                "\"203.0.113.10\"",
                "\"2001:db8::1\"",
                17,
                15,
                "backend 10.0.0.11 is not of the VIP's address family",
            ),
            (
                "\"203.0.113.10\"",
                "\"224.0.0.1\"",
                11,
                11,
                "cannot be a VIP",
            ),
            ("port = 80", "port = 0", 12, 8, "port 0 is out of range"),
            (
                "port = 80",
                "port = 70000",
                12,
                8,
                "port 70000 is out of range",
            ),
            (
                "port = 80",
                "port = \"all\"",
                12,
                8,
                "port \"all\" is not valid",
            ),
            (
                "protocol = \"tcp\"",
                "protocol = \"sctp\"",
                13,
                12,
                "unknown variant `sctp`",
            ),
            (
                "forwarding = \"dsr\"",
                "forwarding = \"nat\"",
                14,
                14,
                "forwarding = \"nat\" is not supported yet",
            ),
            (
                "forwarding = \"dsr\"",
                "forwarding = \"dsr\"\ntunnel_source_v4 = \"10.0.0.1\"",
                15,
                20,
                "tunnel_source_v4 only applies to forwarding = \"tunnel\"",
            ),
            (
                "forwarding = \"dsr\"",
                "forwarding = \"tunnel\"\ntunnel_source_v4 = \"10.0.0.0/33\"",
                15,
                20,
                "the prefix must leave 0 to 32 host bits",
            ),
            (
                "forwarding = \"dsr\"",
                "forwarding = \"tunnel\"\ntunnel_source_v6 = \"10.0.0.1\"",
                15,
                20,
                "is not an IPv6 address",
            ),
            (
                "forwarding = \"dsr\"",
                "forwarding = \"dsr\"\nhash = \"random\"",
                15,
                8,
                "unknown variant `random`",
            ),
            (
                "table_size = 251",
                "table_size = 250",
                15,
                14,
                "must be a prime",
            ),
            (
                "table_size = 251",
                "table_size = 65539",
                15,
                14,
                "must be a prime no larger",
            ),
            (
                "weight = 100",
                "weight = 70000",
                17,
                37,
                "weight 70000 is out of range",
            ),
            (
                "weight = 100",
                "wieght = 100",
                17,
                28,
                "unknown field `wieght`",
            ),
            ("drain = true", "drain = 1", 18, 36, "invalid type"),
            (
                "\"10.0.0.12\"",
                "\"10.0.0.11\"",
                18,
                3,
                "backend 10.0.0.11 is listed twice",
            ),
            (
                "\"10.0.0.12\"",
                "\"2001:db8::2\"",
                18,
                15,
                "not of the VIP's address family",
            ),
            (
                "\"10.0.0.12\"",
                "\"127.0.0.1\"",
                18,
                15,
                "cannot be a backend",
            ),
            (
                "name = \"dns\"",
                "name = \"web\"",
                21,
                1,
                "duplicate VIP name \"web\"",
            ),
            (
                "port = \"any\"\nprotocol = \"udp\"",
                "port = 80\nprotocol = \"tcp\"",
                21,
                1,
                "has the same 203.0.113.10:80/tcp as VIP \"web\"",
            ),
            ("[balancer]", "[balancr]", 2, 2, "unknown field `balancr`"),
        ];
        for (from, to, line, column, message) in cases {
            rejects(from, to, *line, *column, message);
        }
        // The same endpoint with the other protocol is a different VIP.
        let text = GOOD.replacen("port = \"any\"", "port = 80", 1);
        parse(Path::new("ok.toml"), &text).unwrap();
    }

    #[test]
    fn missing_required_keys_and_syntax_errors_have_positions() {
        let err = parse(Path::new("x.toml"), "[balancer]\n[[vip]]\nname = \"a\"\n").unwrap_err();
        assert!(err.message.contains("missing field `address`"), "{err}");
        assert_eq!(err.line, 2, "{err}");
        let err = parse(Path::new("x.toml"), "[balancer]\ninterface = \"eth0\n").unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        let err = parse(Path::new("x.toml"), "").unwrap_err();
        assert!(err.message.contains("missing field `balancer`"), "{err}");
    }

    #[test]
    fn tunnel_and_fragment_rules() {
        let base = |extra: &str, backend: &str| {
            format!(
                "[balancer]\n[[vip]]\nname = \"a\"\naddress = \"2001:db8::1\"\nport = 53\nprotocol = \"udp\"\n\
                 forwarding = \"tunnel\"\n{extra}backends = [{{ address = \"{backend}\" }}]\n"
            )
        };
        // IPv6 VIPs tunnel to IPv6 backends only; IPv4 VIPs may go to either.
        let err = parse(Path::new("t.toml"), &base("", "10.0.0.1")).unwrap_err();
        assert!(
            err.message
                .contains("an IPv6 VIP cannot be tunnelled to the IPv4 backend"),
            "{err}"
        );
        parse(Path::new("t.toml"), &base("", "2001:db8::2")).unwrap();
        let v4 = base("", "2001:db8::2").replace("2001:db8::1", "192.0.2.1");
        let c = parse(Path::new("t.toml"), &v4).unwrap();
        assert_eq!(c.vips[0].forwarding, Forwarding::Tunnel);
        let c = parse(
            Path::new("t.toml"),
            &base(
                "tunnel_source_v6 = \"fd00::/96\"\nfragments = true\n",
                "2001:db8::2",
            ),
        )
        .unwrap();
        assert_eq!(
            c.vips[0].tunnel_source_v6,
            Some(TunnelSource {
                address: "fd00::".parse().unwrap(),
                varied_bits: 32
            })
        );
        assert!(c.vips[0].fragments);

        // fragments = true on a VIP with a port: it must be alone on its address and protocol.
        let two = format!(
            "{}[[vip]]\nname = \"b\"\naddress = \"2001:db8::1\"\nport = 54\nprotocol = \"udp\"\nforwarding = \"dsr\"\n",
            base("fragments = true\n", "2001:db8::2")
        );
        let err = parse(Path::new("t.toml"), &two).unwrap_err();
        assert!(
            err.message
                .contains("VIP \"a\" on the same address and protocol sets fragments = true"),
            "{err}"
        );
        // ...unless the other one is another protocol.
        parse(
            Path::new("t.toml"),
            &two.replace(
                "port = 54\nprotocol = \"udp\"",
                "port = 54\nprotocol = \"tcp\"",
            ),
        )
        .unwrap();
    }

    #[test]
    fn backends_must_fit_the_table() {
        let backends: Vec<String> = (1..=12)
            .map(|i| format!("{{ address = \"10.0.1.{i}\" }}"))
            .collect();
        let text = format!(
            "[balancer]\n[[vip]]\nname = \"v\"\naddress = \"192.0.2.1\"\nport = 53\n\
             protocol = \"udp\"\nforwarding = \"dsr\"\ntable_size = 11\nbackends = [{}]\n",
            backends.join(", ")
        );
        let err = parse(Path::new("x.toml"), &text).unwrap_err();
        assert!(
            err.message.contains("12 backends do not fit a table of 11"),
            "{err}"
        );
        assert_eq!(err.line, 5);
    }

    #[test]
    fn primes() {
        let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537));
        assert!(!is_prime(65535));
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncé\nx", 0), (1, 1));
        assert_eq!(line_column("ab\ncé\nx", 3), (2, 1));
        assert_eq!(line_column("ab\ncé\nx", 7), (3, 1));
        assert_eq!(line_column("ab\ncé\nx", 100), (3, 2));
    }
}

#[cfg(test)]
mod shipped_configs {
    /// Every config shipped in config/ is valid (they are documentation that must not rot).
    #[test]
    fn shipped_configs_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                super::load(&path).unwrap_or_else(|e| panic!("{e}"));
                checked += 1;
            }
        }
        assert!(
            checked >= 2,
            "expected config/demo.toml and config/example.toml"
        );
    }
}

//! The validated configuration: what the rest of the daemon works from. Every value here
//! passed the checks of `validate`; defaults are filled in.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

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
/// Default quiet time before a config file written in place is read: three times the
/// longest pause of a slow writer we expect (a script, `cat` from a pipe, an upload), and
/// short enough that an edit is live before anyone looks. A file replaced by a rename is
/// read at once; this is for writes in place only.
pub const DEFAULT_RELOAD_SETTLE: Duration = Duration::from_secs(1);
/// Longest accepted `reload_settle`.
pub const MAX_RELOAD_SETTLE: Duration = Duration::from_secs(60);
/// The largest config file read (16,384 backends, one per line with a weight and a health
/// override, take 1.2 MB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Default cap on connections to the status API: far more than the scrapers, `balancer
/// status` and liveness probes of a node use at once, and a small share of the descriptors
/// the health probes need.
pub const DEFAULT_API_MAX_CONNECTIONS: u32 = 128;
/// Largest accepted `api_max_connections`.
pub const MAX_API_CONNECTIONS: u32 = 65_536;
/// Default time a connection to the status API gets to send a complete request header, and
/// may stay idle between requests: clients of this API send their request as soon as they
/// are connected, so a few seconds is generous even on a loaded machine.
pub const DEFAULT_API_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Range of `api_idle_timeout`.
pub const API_IDLE_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(600);

/// What validation knows of the host the config is for: its own addresses (a backend may not
/// be one of them), and the ports its own connections take (a SNAT port range on one of its
/// addresses may not overlap them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    /// Every address of this host, with its interface's name.
    pub addresses: Vec<(std::net::IpAddr, String)>,
    /// `net.ipv4.ip_local_port_range` (also IPv6's), if known.
    pub local_port_range: Option<(u16, u16)>,
}

/// Smallest accepted NAT table (connections).
pub const MIN_NAT_TABLE_SIZE: u32 = 1_024;
/// Largest accepted NAT table (connections; two entries each).
pub const MAX_NAT_TABLE_SIZE: u32 = 1 << 24;
/// Default NAT timeouts, in the spirit of the kernel's connection tracking: a connection
/// that never got its SYN-ACK, an established one (longer than TCP's default keepalive of
/// two hours, so that a kept-alive idle connection survives), one closed or reset, a UDP
/// flow; and the time a closed connection's SNAT port waits before reuse (Linux's TIME_WAIT).
pub const DEFAULT_NAT_SYN_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_NAT_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(3 * 3600);
pub const DEFAULT_NAT_CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_NAT_UDP_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_NAT_QUARANTINE: Duration = Duration::from_secs(60);
/// Default SNAT ports on an address that is not this host's.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (1024, 65535);
/// Default SNAT ports on one of this host's addresses: below Linux's default local port
/// range (32768-60999), which the host's own connections (health checks among them) take.
pub const DEFAULT_HOST_SNAT_PORTS: (u16, u16) = (1024, 32767);

/// The NAT settings shared by every NAT VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatGlobal {
    /// Connections each NAT table (one per address family) holds.
    pub table_size: u32,
    pub syn_timeout: Duration,
    pub established_timeout: Duration,
    pub closing_timeout: Duration,
    pub udp_timeout: Duration,
    /// How long a timed-out connection's SNAT port stays taken.
    pub quarantine: Duration,
}

impl Default for NatGlobal {
    fn default() -> Self {
        NatGlobal {
            table_size: balancer_common::DEFAULT_NAT_TABLE_SIZE,
            syn_timeout: DEFAULT_NAT_SYN_TIMEOUT,
            established_timeout: DEFAULT_NAT_ESTABLISHED_TIMEOUT,
            closing_timeout: DEFAULT_NAT_CLOSING_TIMEOUT,
            udp_timeout: DEFAULT_NAT_UDP_TIMEOUT,
            quarantine: DEFAULT_NAT_QUARANTINE,
        }
    }
}

/// Where a NAT VIP's translated packets come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Snat {
    /// Destination-only NAT: the client's address and port are kept (the balancer must be
    /// the backends' gateway).
    None,
    /// Full NAT from the address of the interface the backends are reached through.
    Interface,
    /// Full NAT from these addresses (at most `balancer_common::nat::MAX_SNAT_ADDRESSES`),
    /// the VIP's family.
    Addresses(Vec<IpAddr>),
}

/// A NAT VIP's translation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatVipConfig {
    pub snat: Snat,
    /// SNAT ports, inclusive (unused with `Snat::None`).
    pub ports: (u16, u16),
}

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
    /// How long a config file written in place must be unchanged before it is read.
    pub reload_settle: Duration,
    /// Where the data plane's maps and XDP link are pinned: `<pin_dir>/<interface>/v<layout>/`.
    pub pin_dir: PathBuf,
    /// On SIGTERM/SIGINT, leave the data plane forwarding with its last state (for restarts
    /// and upgrades) instead of removing it.
    pub keep_datapath: bool,
    /// The control socket (reloads and other write actions); `None`: the default path,
    /// beside the lock file (`/run/balancer/<pin_dir and interface>.sock`).
    pub control_socket: Option<PathBuf>,
    /// Connections the status API serves at once (loopback peers get a few more).
    pub api_max_connections: u32,
    /// A connection to the status API that has not sent a complete request header for this
    /// long (after connecting, or since its last answer) is closed.
    pub api_idle_timeout: Duration,
    /// NAT tables and timeouts (used by NAT VIPs).
    pub nat: NatGlobal,
    pub vips: Vec<Vip>,
    /// `[announce]`: the VIPs this balancer can serve, as kernel routes for a BGP speaker.
    pub announce: Option<Announce>,
    /// `[sync]`: connection-table entries shared with the fleet's other balancers.
    pub sync: Option<SyncSettings>,
    /// `[flood]`: the state tables' defences against floods of new flows.
    pub flood: Flood,
}

/// The defences of the state tables against floods of new flows (see
/// `balancer_common::defence`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flood {
    /// New flows that may write state, per CPU per second; above it a CPU places new flows by
    /// the Maglev table alone (refuses new NAT connections) for the rest of its second.
    pub new_flows_per_cpu: u32,
    /// Entries of each pending table (TCP flows that have sent a SYN and nothing since).
    pub pending_table_size: u32,
}

/// A VIP's limit on new flows per source prefix (a token bucket per prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceLimitConfig {
    /// New flows per second.
    pub rate: u32,
    /// How many may come at once after a quiet spell.
    pub burst: u32,
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
}

/// Where this balancer announces the VIPs it can serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announce {
    /// The kernel routing table that holds one route per announced VIP address (a BGP
    /// speaker such as BIRD learns them from it and exports them).
    pub table: u32,
    /// On shutdown (when the data plane is removed): how long the balancer goes on forwarding
    /// after withdrawing, while the router moves the VIP's flows to the other balancers.
    pub withdraw_wait: Duration,
}

/// Connection-table sync with the other balancers of a fleet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncSettings {
    /// Where this balancer receives its peers' messages (UDP): an address of this host.
    pub listen: SocketAddr,
    /// The other balancers' `listen` addresses.
    pub peers: Vec<SocketAddr>,
    /// The shared key (at least 32 bytes), the same file on every balancer.
    pub key_file: PathBuf,
    /// New-flow decisions are sent at least this often (batched in between).
    pub interval: Duration,
    /// A balancer that starts with an empty connection table asks its peers for a copy of
    /// theirs, and announces its VIPs when the copy is complete or after this long.
    pub bulk_timeout: Duration,
}

/// Default of `pin_dir`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/balancer";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native (driver) mode, falling back to generic mode with a logged reason.
    #[default]
    Auto,
    Native,
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// L2 direct server return.
    Dsr,
    /// IP-in-IP encapsulation (IPIP, IP6IP6, IPv4-in-IPv6) to the backend.
    Tunnel,
    /// Address (and port) translation: full NAT or destination-only NAT (`Vip::nat`).
    Nat,
}

impl Forwarding {
    pub fn name(self) -> &'static str {
        match self {
            Forwarding::Dsr => "dsr",
            Forwarding::Tunnel => "tunnel",
            Forwarding::Nat => "nat",
        }
    }
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashMode {
    /// Source and destination address and port, and protocol.
    #[default]
    FiveTuple,
    /// The destination port only: every flow to a port of the VIP goes to the same backend.
    DstPortOnly,
}

impl HashMode {
    pub fn name(self) -> &'static str {
        match self {
            HashMode::FiveTuple => "five_tuple",
            HashMode::DstPortOnly => "dst_port_only",
        }
    }
}

/// The load metric an autoscale target is set on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
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

/// The outer source address of tunnel packets: an address, or a prefix whose host bits vary
/// per flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelSource {
    pub address: IpAddr,
    /// How many low bits vary per flow (0: always `address`).
    pub varied_bits: u8,
}

impl TunnelSource {
    /// Whether `other` is one of the addresses this source may use.
    pub fn contains(&self, other: IpAddr) -> bool {
        let bits = |a: IpAddr| -> u128 {
            match a {
                IpAddr::V4(a) => u128::from(u32::from(a)),
                IpAddr::V6(a) => u128::from(a),
            }
        };
        if self.address.is_ipv4() != other.is_ipv4() {
            return false;
        }
        let varied = u32::from(self.varied_bits);
        bits(self.address).checked_shr(varied) == bits(other).checked_shr(varied)
    }
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
    /// NAT mode: the translation (`Some` exactly when `forwarding` is `Nat`).
    pub nat: Option<NatVipConfig>,
    /// The backends in force: the file's, then (in the running config the core holds) the
    /// discovered ones the file does not list.
    pub backends: Vec<BackendConfig>,
    /// Backends discovered from DNS, alongside `backends`.
    pub discover: Option<Discover>,
    /// New flows per source prefix (`None`: unlimited).
    pub source_limit: Option<SourceLimitConfig>,
}

/// Defaults and bounds of DNS discovery.
pub const DEFAULT_DISCOVER_INTERVAL: Duration = Duration::from_secs(5);
pub const DISCOVER_INTERVAL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
pub const DEFAULT_DISCOVER_TIMEOUT: Duration = Duration::from_secs(2);
pub const DISCOVER_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(30);
/// How long an empty answer (no records, or NXDOMAIN) must persist before the discovered
/// backends are removed: a name briefly missing while a Service is recreated, or a DNS
/// server that lost its zone for a moment, empties no VIP.
pub const DEFAULT_DISCOVER_EMPTY_GRACE: Duration = Duration::from_secs(60);
pub const MAX_DISCOVER_EMPTY_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Default cap on the backends one VIP discovers: far more replicas than a Deployment behind
/// one VIP usually has, and few enough that a runaway answer cannot fill the maps.
pub const DEFAULT_DISCOVER_MAX_BACKENDS: u32 = 256;
pub const MAX_DISCOVER_MAX_BACKENDS: u32 = 4096;
/// At most this many resolvers per VIP (resolv.conf's own limit is 3).
pub const MAX_DISCOVER_RESOLVERS: usize = 8;

/// What a VIP asks DNS for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiscoverQuery {
    /// A and AAAA records of this name (the VIP's family is used).
    Dns(String),
    /// SRV records of this name: each a target, a port and a weight.
    Srv(String),
}

impl DiscoverQuery {
    pub fn name(&self) -> &str {
        match self {
            DiscoverQuery::Dns(n) | DiscoverQuery::Srv(n) => n,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            DiscoverQuery::Dns(_) => "dns",
            DiscoverQuery::Srv(_) => "srv",
        }
    }
}

impl fmt::Display for DiscoverQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind(), self.name())
    }
}

/// A VIP's DNS discovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discover {
    pub query: DiscoverQuery,
    /// A/AAAA under NAT: the port the backends listen on (else the VIP's `backend_port`, else
    /// the packet's). SRV records carry their own.
    pub port: Option<u16>,
    /// A/AAAA: the weight of every discovered backend. SRV records carry their own.
    pub weight: u32,
    /// Resolved again this often (sooner when the records' TTL runs out first).
    pub interval: Duration,
    /// A resolution that takes longer failed (the last set stays).
    pub timeout: Duration,
    /// Where to ask; empty: the system's resolvers (/etc/resolv.conf).
    pub resolvers: Vec<SocketAddr>,
    /// How long an empty answer or NXDOMAIN must persist before the discovered backends go.
    pub empty_grace: Duration,
    /// Answers with more backends are refused (the last set stays).
    pub max_backends: u32,
    /// A discovered backend's health check: the VIP's, probing the discovered port unless it
    /// names its own (`health_port_fixed`).
    pub health: HealthCheck,
    pub health_port_fixed: bool,
    /// This host's addresses (with their interfaces) when the config was read: a
    /// discovered record may not be one, as a backend in the file may not.
    pub host_addresses: Vec<(IpAddr, String)>,
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
    /// NAT: the port the backend listens on (its own `port`, else the VIP's `backend_port`);
    /// `None`: the packet's destination port, unchanged. Always `None` in other modes.
    pub port: Option<u16>,
    pub weight: u32,
    pub drain: bool,
    /// The VIP's health check with this backend's overrides.
    pub health: HealthCheck,
    /// Where the backend comes from.
    pub source: BackendSource,
}

/// Where a backend comes from: the config file, or a VIP's DNS discovery.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BackendSource {
    #[default]
    File,
    Discovered,
}

impl BackendConfig {
    /// Whether the backend takes new flows (draining and weight 0 do not).
    pub fn takes_new_flows(&self) -> bool {
        !self.drain && self.weight > 0
    }
}

/// Defaults of a health check.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
pub const DEFAULT_HTTP_STATUS: (u16, u16) = (200, 399);

/// A backend's health check, with the VIP's settings, the backend's overrides and the
/// defaults resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Port probed on the backend's address (0 for kind `none`).
    pub port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// State of a backend before its first verdict.
    pub initial: InitialState,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// No checks: the backend is always up.
    None,
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 GET whose status must fall in `status` (inclusive).
    Http {
        path: String,
        host: Option<String>,
        status: (u16, u16),
    },
}

impl CheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::None => "none",
            CheckKind::Tcp => "tcp",
            CheckKind::Http { .. } => "http",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InitialState {
    #[default]
    Up,
    Down,
}

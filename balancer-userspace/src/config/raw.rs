//! The shape of the config file as serde sees it, with the position of every value that a
//! later check may reject.

use std::{fmt, net::IpAddr, ops::Range};

use serde::{de, Deserialize, Deserializer};
use toml::Spanned;

use crate::config::model::{
    AutoscaleMetric, Forwarding, HashMode, InitialState, Protocol, WhenAllDown, XdpModeSetting,
};

/// A value that failed a check: where it is in the file, and what is wrong.
pub(super) type Invalid = (Range<usize>, String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub balancer: RawBalancer,
    #[serde(default)]
    pub vip: Vec<Spanned<RawVip>>,
    pub announce: Option<Spanned<RawAnnounce>>,
    pub sync: Option<Spanned<RawSync>>,
    pub flood: Option<Spanned<RawFlood>>,
}

/// `[flood]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFlood {
    pub new_flows_per_cpu: Option<Spanned<u32>>,
    pub pending_table_size: Option<Spanned<u32>>,
}

/// `source_limit = { rate = 100, burst = 200, ipv4_prefix = 24, ipv6_prefix = 56 }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSourceLimit {
    pub rate: Spanned<u32>,
    pub burst: Option<Spanned<u32>>,
    pub ipv4_prefix: Option<Spanned<u8>>,
    pub ipv6_prefix: Option<Spanned<u8>>,
}

/// `[announce]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAnnounce {
    pub table: Spanned<u32>,
    pub withdraw_wait: Option<Spanned<String>>,
}

/// `[sync]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSync {
    pub listen: Spanned<String>,
    pub peers: Spanned<Vec<Spanned<String>>>,
    pub key_file: Spanned<String>,
    pub interval: Option<Spanned<String>>,
    pub bulk_timeout: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBalancer {
    pub interface: Option<Spanned<String>>,
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
    #[serde(default)]
    pub hash_seed: Option<HashSeed>,
    pub conn_table_size: Option<Spanned<u32>>,
    pub metrics_listen: Option<Spanned<String>>,
    pub removal_grace: Option<Spanned<String>>,
    pub reload_settle: Option<Spanned<String>>,
    pub pin_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub keep_datapath: bool,
    pub control_socket: Option<Spanned<String>>,
    pub api_max_connections: Option<Spanned<u32>>,
    pub api_idle_timeout: Option<Spanned<String>>,
    pub nat_table_size: Option<Spanned<u32>>,
    pub nat_timeouts: Option<Spanned<RawNatTimeouts>>,
}

/// `nat_timeouts = { syn = "60s", ... }`: every key optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNatTimeouts {
    pub syn: Option<Spanned<String>>,
    pub established: Option<Spanned<String>>,
    pub closing: Option<Spanned<String>>,
    pub udp: Option<Spanned<String>>,
    pub quarantine: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVip {
    pub name: Spanned<String>,
    pub address: Spanned<IpAddr>,
    pub port: Spanned<PortSpec>,
    pub protocol: Protocol,
    pub forwarding: Spanned<Forwarding>,
    pub table_size: Option<Spanned<u32>>,
    pub health: Option<Spanned<RawHealth>>,
    #[serde(default)]
    pub when_all_down: WhenAllDown,
    #[serde(default)]
    pub hash: HashMode,
    pub fragments: Option<Spanned<bool>>,
    pub tunnel_source_v4: Option<Spanned<String>>,
    pub tunnel_source_v6: Option<Spanned<String>>,
    pub autoscale: Option<Spanned<RawAutoscale>>,
    /// NAT: where translated packets come from (absent: the interface's address).
    pub snat: Option<Spanned<RawSnat>>,
    /// NAT: `"1024-65535"` or `"5000"`.
    pub snat_ports: Option<Spanned<String>>,
    /// NAT: the port the backends listen on.
    pub backend_port: Option<Spanned<u16>>,
    #[serde(default)]
    pub backends: Vec<Spanned<RawBackend>>,
    /// Backends discovered from DNS, alongside or instead of `backends`.
    pub discover: Option<Spanned<RawDiscover>>,
    /// New flows per source prefix.
    pub source_limit: Option<Spanned<RawSourceLimit>>,
}

/// `discover = { dns = "web.default.svc.cluster.local", port = 8080 }` or
/// `discover = { srv = "_http._tcp.web.default.svc.cluster.local" }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscover {
    pub dns: Option<Spanned<String>>,
    pub srv: Option<Spanned<String>>,
    pub port: Option<Spanned<u16>>,
    pub weight: Option<Spanned<u32>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub resolvers: Option<Spanned<Vec<Spanned<String>>>>,
    pub empty_grace: Option<Spanned<String>>,
    pub max_backends: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub address: Spanned<IpAddr>,
    /// NAT: this backend's port, instead of the VIP's `backend_port`.
    pub port: Option<Spanned<u16>>,
    pub weight: Option<Spanned<u32>>,
    #[serde(default)]
    pub drain: bool,
    pub health: Option<Spanned<RawHealth>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAutoscale {
    pub metric: AutoscaleMetric,
    pub target_per_backend: Spanned<f64>,
    pub tolerance: Option<Spanned<f64>>,
    pub window: Option<Spanned<String>>,
}

/// `hash_seed`: an integer, or a string holding a decimal or `0x` hexadecimal number.
pub(super) struct HashSeed(pub u32);

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

/// `snat`: one string (`"none"`, an address or a prefix), or a list of them.
pub(super) enum RawSnat {
    One(String),
    List(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for RawSnat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = RawSnat;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "\"none\", an address, a prefix such as \"192.0.2.16/28\", or a list of \
                     addresses",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSnat, E> {
                Ok(RawSnat::One(v.to_owned()))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawSnat, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Spanned<String>>()? {
                    items.push(item);
                }
                Ok(RawSnat::List(items))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `port`: 1-65535, or the string "any".
pub(super) enum PortSpec {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawKind {
    None,
    Tcp,
    Http,
}

/// A `health` table as written; every key optional so that a backend can override any subset.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub kind: Option<Spanned<RawKind>>,
    pub port: Option<Spanned<u16>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub rise: Option<Spanned<u32>>,
    pub fall: Option<Spanned<u32>>,
    pub initial: Option<InitialState>,
    pub path: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub status: Option<Spanned<String>>,
}

impl RawHealth {
    /// This table with `overrides` laid over it, key by key.
    /// When the override names a `kind`, the HTTP-only keys (path, host, status) come from the
    /// override alone: a backend checked with TCP does not inherit the VIP's HTTP path.
    pub(super) fn overridden_by(&self, overrides: &RawHealth) -> RawHealth {
        let o = overrides.clone();
        let mut s = self.clone();
        if o.kind.is_some() {
            s.path = None;
            s.host = None;
            s.status = None;
        }
        RawHealth {
            kind: o.kind.or(s.kind),
            port: o.port.or(s.port),
            interval: o.interval.or(s.interval),
            timeout: o.timeout.or(s.timeout),
            rise: o.rise.or(s.rise),
            fall: o.fall.or(s.fall),
            initial: o.initial.or(s.initial),
            path: o.path.or(s.path),
            host: o.host.or(s.host),
            status: o.status.or(s.status),
        }
    }
}

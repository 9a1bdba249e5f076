//! Checks beyond the shape of the file: ranges, names, addresses, primes, and what VIPs and
//! backends may not share. Every error points at the value to blame.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::{Component, PathBuf},
    time::Duration,
};

use balancer_common::{
    DEFAULT_CONN_TABLE_SIZE, DEFAULT_MAGLEV_SIZE, MAGLEV_CAPACITY, MAX_BACKENDS, MAX_VIPS,
};
use toml::Spanned;

use crate::config::{
    health::{self, Scope},
    model::{
        Autoscale, BackendConfig, Config, Forwarding, Host, Protocol, TunnelSource, Vip,
        API_IDLE_TIMEOUT_RANGE, DEFAULT_API_IDLE_TIMEOUT, DEFAULT_API_MAX_CONNECTIONS,
        DEFAULT_METRICS_LISTEN, DEFAULT_PIN_DIR, DEFAULT_RELOAD_SETTLE, DEFAULT_REMOVAL_GRACE,
        DEFAULT_WEIGHT, MAX_API_CONNECTIONS, MAX_CONN_TABLE_SIZE, MAX_RELOAD_SETTLE, MAX_WEIGHT,
        MIN_CONN_TABLE_SIZE,
    },
    raw::{Invalid, PortSpec, RawAutoscale, RawBackend, RawBalancer, RawConfig, RawVip},
};

pub(super) fn validate(raw: RawConfig, host: &Host) -> Result<Config, Invalid> {
    let b = raw.balancer;
    if let Some(interface) = &b.interface {
        check_interface_name(interface.get_ref()).map_err(|m| (interface.span(), m))?;
    }
    let conn_table_size = conn_table_size(&b)?;
    let metrics_listen = metrics_listen(&b)?;
    let (api_max_connections, api_idle_timeout) = (api_max_connections(&b)?, api_idle_timeout(&b)?);
    let removal_grace = match &b.removal_grace {
        None => DEFAULT_REMOVAL_GRACE,
        Some(grace) => health::parse_duration(grace.get_ref())
            .map_err(|e| (grace.span(), format!("removal_grace {e}")))?,
    };
    let reload_settle = reload_settle(&b)?;
    let pin_dir = match &b.pin_dir {
        None => PathBuf::from(DEFAULT_PIN_DIR),
        Some(dir) => absolute_path(
            dir,
            "pin_dir",
            &format!("on a bpffs (such as \"{DEFAULT_PIN_DIR}\")"),
        )?,
    };
    let control_socket = match &b.control_socket {
        None => None,
        Some(path) => Some(absolute_path(
            path,
            "control_socket",
            "(such as \"/run/balancer/eth0.sock\")",
        )?),
    };
    Ok(Config {
        interface: b.interface.map(Spanned::into_inner),
        xdp_mode: b.xdp_mode,
        hash_seed: b.hash_seed.map_or(0, |s| s.0),
        conn_table_size,
        metrics_listen,
        removal_grace,
        reload_settle,
        pin_dir,
        keep_datapath: b.keep_datapath,
        control_socket,
        api_max_connections,
        api_idle_timeout,
        nat: crate::config::model::NatGlobal::default(),
        vips: validate_vips(raw.vip, host)?,
    })
}

fn conn_table_size(b: &RawBalancer) -> Result<u32, Invalid> {
    let Some(size) = &b.conn_table_size else {
        return Ok(DEFAULT_CONN_TABLE_SIZE);
    };
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
    Ok(v)
}

fn reload_settle(b: &RawBalancer) -> Result<Duration, Invalid> {
    let Some(settle) = &b.reload_settle else {
        return Ok(DEFAULT_RELOAD_SETTLE);
    };
    let d = health::parse_duration(settle.get_ref())
        .map_err(|e| (settle.span(), format!("reload_settle {e}")))?;
    if d > MAX_RELOAD_SETTLE {
        return Err((
            settle.span(),
            format!(
                "reload_settle must be at most {}s",
                MAX_RELOAD_SETTLE.as_secs()
            ),
        ));
    }
    Ok(d)
}

fn metrics_listen(b: &RawBalancer) -> Result<SocketAddr, Invalid> {
    let Some(listen) = &b.metrics_listen else {
        return Ok(DEFAULT_METRICS_LISTEN.parse().expect("valid default"));
    };
    listen.get_ref().parse().map_err(|_| {
        (
            listen.span(),
            format!(
                "metrics_listen \"{}\" is not an address:port such as \"127.0.0.1:9100\"",
                listen.get_ref()
            ),
        )
    })
}

fn api_max_connections(b: &RawBalancer) -> Result<u32, Invalid> {
    let Some(max) = &b.api_max_connections else {
        return Ok(DEFAULT_API_MAX_CONNECTIONS);
    };
    let v = *max.get_ref();
    if !(1..=MAX_API_CONNECTIONS).contains(&v) {
        return Err((
            max.span(),
            format!("api_max_connections {v} is out of range: use 1 to {MAX_API_CONNECTIONS}"),
        ));
    }
    Ok(v)
}

fn api_idle_timeout(b: &RawBalancer) -> Result<Duration, Invalid> {
    let Some(timeout) = &b.api_idle_timeout else {
        return Ok(DEFAULT_API_IDLE_TIMEOUT);
    };
    let invalid = |message: String| (timeout.span(), format!("api_idle_timeout {message}"));
    let v = health::parse_duration(timeout.get_ref()).map_err(invalid)?;
    if !API_IDLE_TIMEOUT_RANGE.contains(&v) {
        return Err(invalid(format!(
            "\"{}\" is out of range: use 100ms to 10m",
            timeout.get_ref()
        )));
    }
    Ok(v)
}

/// An absolute path without `..`.
fn absolute_path(value: &Spanned<String>, key: &str, example: &str) -> Result<PathBuf, Invalid> {
    let path = PathBuf::from(value.get_ref());
    if path.is_absolute() && !path.components().any(|c| c == Component::ParentDir) {
        return Ok(path);
    }
    Err((
        value.span(),
        format!(
            "{key} \"{}\" must be an absolute path without `..`, {example}",
            value.get_ref()
        ),
    ))
}

/// What a backend or tunnel source address may not be: any VIP's address, or one of this
/// host's own.
struct Taken<'a> {
    vips: BTreeMap<IpAddr, String>,
    host: &'a Host,
}

/// Every VIP, and what VIPs may not share: a name, an endpoint, an address for fragments, a
/// backend address that is a VIP's.
fn validate_vips(raw: Vec<Spanned<RawVip>>, host: &Host) -> Result<Vec<Vip>, Invalid> {
    // By address, in address order; the first VIP of an address names it.
    let mut vips = BTreeMap::new();
    for v in &raw {
        let v = v.get_ref();
        vips.entry(*v.address.get_ref())
            .or_insert_with(|| v.name.get_ref().clone());
    }
    let taken = Taken { vips, host };
    if raw.len() > MAX_VIPS as usize {
        let span = raw[MAX_VIPS as usize].span();
        return Err((span, format!("too many VIPs: at most {MAX_VIPS}")));
    }
    let mut names = HashSet::new();
    let mut endpoints: HashMap<(IpAddr, Option<u16>, Protocol), String> = HashMap::new();
    let mut total_backends = 0usize;
    let mut vips: Vec<Vip> = Vec::with_capacity(raw.len());
    for raw_vip in raw {
        let vip_span = raw_vip.span();
        let vip = validate_vip(raw_vip.into_inner(), &taken)?;
        if !names.insert(vip.name.clone()) {
            return Err((vip_span, format!("duplicate VIP name \"{}\"", vip.name)));
        }
        let endpoint = (vip.address, vip.port, vip.protocol);
        if let Some(other) = endpoints.insert(endpoint, vip.name.clone()) {
            let message = format!(
                "VIP \"{}\" has the same {} as VIP \"{other}\"",
                vip.name,
                vip.endpoint()
            );
            return Err((vip_span, message));
        }
        check_fragments(&vip, &vips).map_err(|m| (vip_span.clone(), m))?;
        total_backends += vip.backends.len();
        if total_backends > MAX_BACKENDS as usize {
            let message = format!("too many backends: at most {MAX_BACKENDS} over all VIPs");
            return Err((vip_span, message));
        }
        vips.push(vip);
    }
    Ok(vips)
}

/// Non-first fragments carry no port: a VIP balancing fragments must be the only one on its
/// address and protocol.
fn check_fragments(vip: &Vip, before: &[Vip]) -> Result<(), String> {
    let same_place = |o: &&Vip| o.address == vip.address && o.protocol == vip.protocol;
    if vip.fragments && vip.port.is_some() {
        if let Some(other) = before.iter().find(same_place) {
            return Err(format!(
                "VIP \"{}\": fragments = true needs to be the only VIP on {} {} (VIP \"{}\" is too): \
                 fragments after the first carry no port",
                vip.name, vip.address, vip.protocol, other.name
            ));
        }
    }
    if let Some(other) = before
        .iter()
        .filter(same_place)
        .find(|o| o.fragments && o.port.is_some())
    {
        return Err(format!(
            "VIP \"{}\": VIP \"{}\" on the same address and protocol sets fragments = true and must be the \
             only one there",
            vip.name, other.name
        ));
    }
    Ok(())
}

fn validate_vip(raw: RawVip, taken: &Taken) -> Result<Vip, Invalid> {
    let name = vip_name(&raw.name)?;
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
        Some(a) => Some(autoscale(a.get_ref(), &name)?),
    };
    let [tunnel_source_v4, tunnel_source_v6] = tunnel_sources(&raw, &name, forwarding, taken)?;
    let table_size = table_size(&raw, &name)?;
    let backends = backends(&raw, &name, address, forwarding, taken)?;
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
        port: port_of(raw.port.get_ref()),
        protocol: raw.protocol,
        forwarding,
        table_size,
        when_all_down: raw.when_all_down,
        hash: raw.hash,
        fragments: raw.fragments,
        tunnel_source_v4,
        tunnel_source_v6,
        autoscale,
        nat: None,
        backends,
    })
}

fn port_of(port: &PortSpec) -> Option<u16> {
    match port {
        PortSpec::Port(p) => Some(*p),
        PortSpec::Any => None,
    }
}

fn vip_name(name: &Spanned<String>) -> Result<String, Invalid> {
    let text = name.get_ref();
    let valid = !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        return Ok(text.clone());
    }
    Err((
        name.span(),
        format!("VIP name \"{text}\" is not valid: use 1 to 64 letters, digits, '-', '_' or '.'"),
    ))
}

fn autoscale(a: &RawAutoscale, name: &str) -> Result<Autoscale, Invalid> {
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
            let message = format!("VIP \"{name}\": autoscale tolerance must be from 0 to below 1");
            return Err((t.span(), message));
        }
    };
    let window = match &a.window {
        None => Duration::from_secs(60),
        Some(w) => {
            let d = health::parse_duration(w.get_ref())
                .map_err(|e| (w.span(), format!("VIP \"{name}\": autoscale window {e}")))?;
            if !(Duration::from_secs(2)..=Duration::from_secs(3600)).contains(&d) {
                let message = format!("VIP \"{name}\": autoscale window must be from 2s to 1h");
                return Err((w.span(), message));
            }
            d
        }
    };
    Ok(Autoscale {
        metric: a.metric,
        target_per_backend: target,
        tolerance,
        window,
    })
}

fn tunnel_sources(
    raw: &RawVip,
    name: &str,
    forwarding: Forwarding,
    taken: &Taken,
) -> Result<[Option<TunnelSource>; 2], Invalid> {
    let mut sources = [None, None];
    for (i, (key, value, v6)) in [
        ("tunnel_source_v4", &raw.tunnel_source_v4, false),
        ("tunnel_source_v6", &raw.tunnel_source_v6, true),
    ]
    .into_iter()
    .enumerate()
    {
        let Some(value) = value else { continue };
        if forwarding != Forwarding::Tunnel {
            let message = format!("VIP \"{name}\": {key} only applies to forwarding = \"tunnel\"");
            return Err((value.span(), message));
        }
        let source = parse_tunnel_source(value.get_ref(), v6)
            .map_err(|e| (value.span(), format!("VIP \"{name}\": {key} {e}")))?;
        if let Some((vip, owner)) = taken.vips.iter().find(|(a, _)| source.contains(**a)) {
            let message = format!(
                "VIP \"{name}\": {key} \"{}\" includes {vip}, the address of VIP \"{owner}\": \
                 tunnelled packets would come from a VIP",
                value.get_ref()
            );
            return Err((value.span(), message));
        }
        sources[i] = Some(source);
    }
    Ok(sources)
}

fn table_size(raw: &RawVip, name: &str) -> Result<u32, Invalid> {
    let Some(size) = &raw.table_size else {
        return Ok(DEFAULT_MAGLEV_SIZE);
    };
    let v = *size.get_ref();
    if (2..=MAGLEV_CAPACITY).contains(&v) && is_prime(v) {
        return Ok(v);
    }
    Err((
        size.span(),
        format!(
            "VIP \"{name}\": table_size {v} must be a prime no larger than \
             {MAGLEV_CAPACITY} (for example 251, 1021, 4093, 16381, 65537)"
        ),
    ))
}

fn backends(
    raw: &RawVip,
    name: &str,
    vip_address: IpAddr,
    forwarding: Forwarding,
    taken: &Taken,
) -> Result<Vec<BackendConfig>, Invalid> {
    let mut seen = HashSet::new();
    let mut backends = Vec::with_capacity(raw.backends.len());
    for raw_backend in &raw.backends {
        let span = raw_backend.span();
        let rb = raw_backend.get_ref();
        let address = backend_address(rb, name, vip_address, forwarding)?;
        not_taken(address, name, taken).map_err(|m| (rb.address.span(), m))?;
        if !seen.insert(address) {
            return Err((
                span,
                format!("VIP \"{name}\": backend {address} is listed twice"),
            ));
        }
        let weight = match &rb.weight {
            None => DEFAULT_WEIGHT,
            Some(w) if *w.get_ref() <= MAX_WEIGHT => *w.get_ref(),
            Some(w) => {
                let message = format!(
                    "VIP \"{name}\": weight {} is out of range: use 0 (drain) to {MAX_WEIGHT}",
                    w.get_ref()
                );
                return Err((w.span(), message));
            }
        };
        backends.push(BackendConfig {
            address,
            port: None,
            weight,
            drain: rb.drain,
            health: backend_health(raw, rb, name, span)?,
        });
    }
    Ok(backends)
}

fn backend_address(
    rb: &RawBackend,
    name: &str,
    vip_address: IpAddr,
    forwarding: Forwarding,
) -> Result<IpAddr, Invalid> {
    let address = *rb.address.get_ref();
    let problem = if forwarding == Forwarding::Dsr && address.is_ipv4() != vip_address.is_ipv4() {
        Some(format!(
            "VIP \"{name}\": backend {address} is not of the VIP's address family; direct server \
             return forwards the packet unchanged (tunnel mode can carry IPv4 VIPs to IPv6 backends)"
        ))
    } else if forwarding == Forwarding::Tunnel && vip_address.is_ipv6() && address.is_ipv4() {
        Some(format!(
            "VIP \"{name}\": an IPv6 VIP cannot be tunnelled to the IPv4 backend {address}"
        ))
    } else if address.is_unspecified()
        || address.is_multicast()
        || address.is_loopback()
        || is_broadcast(address)
    {
        Some(format!(
            "VIP \"{name}\": {address} cannot be a backend (unspecified, loopback, multicast or \
             broadcast)"
        ))
    } else {
        None
    };
    match problem {
        Some(message) => Err((rb.address.span(), message)),
        None => Ok(address),
    }
}

/// A backend may not be a VIP (its packets would come back to the balancer) nor this host
/// (the balancer would send packets to itself).
fn not_taken(address: IpAddr, name: &str, taken: &Taken) -> Result<(), String> {
    if let Some(owner) = taken.vips.get(&address) {
        return Err(format!(
            "VIP \"{name}\": backend {address} is the address of VIP \"{owner}\"; a backend must be \
             a server behind the balancer"
        ));
    }
    if let Some((_, interface)) = taken.host.addresses.iter().find(|(a, _)| *a == address) {
        return Err(format!(
            "VIP \"{name}\": backend {address} is an address of this host ({interface}); a backend \
             must be another machine"
        ));
    }
    Ok(())
}

/// The VIP's health table with the backend's overrides laid over it.
fn backend_health(
    raw: &RawVip,
    rb: &RawBackend,
    name: &str,
    span: std::ops::Range<usize>,
) -> Result<crate::config::model::HealthCheck, Invalid> {
    let vip_health = raw
        .health
        .as_ref()
        .map(|h| h.get_ref().clone())
        .unwrap_or_default();
    let (merged, health_span) = match &rb.health {
        Some(o) => (vip_health.overridden_by(o.get_ref()), o.span()),
        None => (vip_health, raw.health.as_ref().map_or(span, |h| h.span())),
    };
    let scope = Scope {
        name: &format!("VIP \"{name}\", backend {}", rb.address.get_ref()),
        protocol: raw.protocol,
        vip_port: port_of(raw.port.get_ref()),
        span: health_span,
    };
    let present = raw.health.is_some() || rb.health.is_some();
    health::resolve(&merged, present, &scope)
}

/// `"192.0.2.1"` (a fixed address) or `"172.16.0.0/16"` (host bits varied per flow; at most
/// 32 of them).
pub(super) fn parse_tunnel_source(text: &str, v6: bool) -> Result<TunnelSource, String> {
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

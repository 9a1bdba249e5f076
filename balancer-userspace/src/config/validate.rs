//! Checks beyond the shape of the file: ranges, names, addresses, primes, and what VIPs and
//! backends may not share. Every error points at the value to blame.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::{Range, RangeInclusive},
    path::{Component, PathBuf},
    time::Duration,
};

use balancer_common::{
    nat::MAX_SNAT_ADDRESSES, DEFAULT_CONN_TABLE_SIZE, DEFAULT_MAGLEV_SIZE, MAGLEV_CAPACITY,
    MAX_BACKENDS, MAX_VIPS,
};
use toml::Spanned;

use crate::config::{
    addresses::{address_problem, is_broadcast, taken_problem},
    defence, fleet,
    health::{self, Scope},
    model::{
        Autoscale, BackendConfig, Config, Forwarding, HashMode, Host, NatGlobal, NatVipConfig,
        Protocol, Snat, TunnelSource, Vip, API_IDLE_TIMEOUT_RANGE, DEFAULT_API_IDLE_TIMEOUT,
        DEFAULT_API_MAX_CONNECTIONS, DEFAULT_HOST_SNAT_PORTS, DEFAULT_METRICS_LISTEN,
        DEFAULT_PIN_DIR, DEFAULT_RELOAD_SETTLE, DEFAULT_REMOVAL_GRACE, DEFAULT_SNAT_PORTS,
        DEFAULT_WEIGHT, MAX_API_CONNECTIONS, MAX_CONN_TABLE_SIZE, MAX_NAT_TABLE_SIZE,
        MAX_RELOAD_SETTLE, MAX_WEIGHT, MIN_CONN_TABLE_SIZE, MIN_NAT_TABLE_SIZE,
    },
    raw::{Invalid, PortSpec, RawAutoscale, RawBackend, RawBalancer, RawConfig, RawSnat, RawVip},
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
    let nat = nat_global(&b)?;
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
        nat,
        vips: validate_vips(raw.vip, host, metrics_listen)?,
        announce: fleet::announce(raw.announce.as_ref())?,
        sync: fleet::sync(raw.sync.as_ref())?,
        flood: defence::flood(raw.flood.as_ref(), conn_table_size)?,
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

/// `nat_table_size` and `nat_timeouts`, with the defaults of the keys not written.
fn nat_global(b: &RawBalancer) -> Result<NatGlobal, Invalid> {
    let mut nat = NatGlobal::default();
    if let Some(size) = &b.nat_table_size {
        let v = *size.get_ref();
        if !(MIN_NAT_TABLE_SIZE..=MAX_NAT_TABLE_SIZE).contains(&v) {
            return Err((
                size.span(),
                format!(
                    "nat_table_size {v} is out of range: use {MIN_NAT_TABLE_SIZE} to \
                     {MAX_NAT_TABLE_SIZE} connections"
                ),
            ));
        }
        nat.table_size = v;
    }
    let Some(timeouts) = &b.nat_timeouts else {
        return Ok(nat);
    };
    let t = timeouts.get_ref();
    for (key, value, field) in [
        ("syn", &t.syn, &mut nat.syn_timeout),
        ("established", &t.established, &mut nat.established_timeout),
        ("closing", &t.closing, &mut nat.closing_timeout),
        ("udp", &t.udp, &mut nat.udp_timeout),
        ("quarantine", &t.quarantine, &mut nat.quarantine),
    ] {
        let Some(value) = value else { continue };
        let invalid = |message: String| (value.span(), format!("nat_timeouts.{key} {message}"));
        let d = health::parse_duration(value.get_ref()).map_err(invalid)?;
        let (range, range_text) = match key {
            "quarantine" => (NAT_QUARANTINE_RANGE, "0s to 10m"),
            _ => (NAT_TIMEOUT_RANGE, "1s to 168h (7 days)"),
        };
        if !range.contains(&d) {
            return Err(invalid(format!(
                "\"{}\" is out of range: use {range_text}",
                value.get_ref()
            )));
        }
        *field = d;
    }
    Ok(nat)
}

/// Range of a NAT timeout (of a state): a second to a week.
const NAT_TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600);
/// Range of the NAT port quarantine: none to ten minutes.
const NAT_QUARANTINE_RANGE: RangeInclusive<Duration> = Duration::ZERO..=Duration::from_secs(600);

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

/// What a backend, tunnel source or SNAT address may not be: any VIP's address, one of this
/// host's own (backends), any backend's (SNAT addresses); and the ports SNAT may not take
/// on this host's addresses.
struct Taken<'a> {
    vips: BTreeMap<IpAddr, String>,
    /// Every backend's address, with the first VIP that lists it.
    backends: BTreeMap<IpAddr, String>,
    host: &'a Host,
    metrics_listen: SocketAddr,
}

/// Every VIP, and what VIPs may not share: a name, an endpoint, an address for fragments, a
/// backend address that is a VIP's.
fn validate_vips(
    raw: Vec<Spanned<RawVip>>,
    host: &Host,
    metrics_listen: SocketAddr,
) -> Result<Vec<Vip>, Invalid> {
    // By address, in address order; the first VIP of an address names it.
    let mut vips = BTreeMap::new();
    let mut backends = BTreeMap::new();
    for v in &raw {
        let v = v.get_ref();
        vips.entry(*v.address.get_ref())
            .or_insert_with(|| v.name.get_ref().clone());
        for b in &v.backends {
            backends
                .entry(*b.get_ref().address.get_ref())
                .or_insert_with(|| v.name.get_ref().clone());
        }
    }
    let taken = Taken {
        vips,
        backends,
        host,
        metrics_listen,
    };
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
        total_backends +=
            vip.backends.len() + vip.discover.as_ref().map_or(0, |d| d.max_backends as usize);
        if total_backends > MAX_BACKENDS as usize {
            let message = format!(
                "too many backends: at most {MAX_BACKENDS} over all VIPs (counting every VIP's \
                 discover max_backends)"
            );
            return Err((vip_span, message));
        }
        vips.push(vip);
    }
    Ok(vips)
}

/// `fragments`, which neither NAT nor destination-port hashing can take.
fn fragments_setting(raw: &RawVip, name: &str, forwarding: Forwarding) -> Result<bool, Invalid> {
    let Some(f) = raw.fragments.as_ref().filter(|f| *f.get_ref()) else {
        return Ok(false);
    };
    if forwarding == Forwarding::Nat {
        let message = format!(
            "VIP \"{name}\": fragments = true does not apply to forwarding = \"nat\": fragments \
             after the first carry no port to translate; remove it"
        );
        return Err((f.span(), message));
    }
    if raw.hash == HashMode::DstPortOnly {
        let message = format!(
            "VIP \"{name}\": fragments = true and hash = \"dst_port_only\" cannot go together: \
             fragments after the first carry no port to hash on; choose one"
        );
        return Err((f.span(), message));
    }
    Ok(true)
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
    nat_keys(&raw, &name, forwarding)?;
    let fragments = fragments_setting(&raw, &name, forwarding)?;
    let backend_port = match &raw.backend_port {
        None => None,
        Some(p) => Some(nonzero_port(p, &format!("VIP \"{name}\": backend_port"))?),
    };
    let autoscale = match &raw.autoscale {
        None => None,
        Some(a) => Some(autoscale(a.get_ref(), &name)?),
    };
    let [tunnel_source_v4, tunnel_source_v6] = tunnel_sources(&raw, &name, forwarding, taken)?;
    let table_size = table_size(&raw, &name)?;
    let backends = backends(&raw, &name, address, forwarding, backend_port, taken)?;
    let mut discover = vip_discover(
        &raw,
        &name,
        forwarding,
        backend_port,
        table_size,
        backends.len(),
    )?;
    if let Some(d) = discover.as_mut() {
        // What a discovered record may not be besides a VIP: this host.
        d.host_addresses.clone_from(&taken.host.addresses);
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
    let nat = match forwarding {
        Forwarding::Nat => Some(nat_vip(&raw, &name, address, taken)?),
        Forwarding::Dsr | Forwarding::Tunnel => None,
    };
    let source_limit = defence::source_limit(raw.source_limit.as_ref(), &name)?;
    Ok(Vip {
        name,
        address,
        port: port_of(raw.port.get_ref()),
        protocol: raw.protocol,
        forwarding,
        table_size,
        when_all_down: raw.when_all_down,
        hash: raw.hash,
        fragments,
        tunnel_source_v4,
        tunnel_source_v6,
        autoscale,
        nat,
        backends,
        discover,
        source_limit,
    })
}

/// The VIP's discovery, with the default cap lowered to what a small table leaves room for
/// beside the file's backends (`listed`), and an explicit one checked against it.
fn vip_discover(
    raw: &RawVip,
    name: &str,
    forwarding: Forwarding,
    backend_port: Option<u16>,
    table_size: u32,
    listed: usize,
) -> Result<Option<crate::config::model::Discover>, Invalid> {
    let mut discover = super::discover::discover(raw, name, forwarding, backend_port)?;
    let explicit_cap = raw
        .discover
        .as_ref()
        .is_some_and(|d| d.get_ref().max_backends.is_some());
    if let Some(d) = discover.as_mut().filter(|_| !explicit_cap) {
        let room = (table_size as usize).saturating_sub(listed).max(1);
        d.max_backends = d.max_backends.min(room as u32);
    }
    if let Some(d) = &discover {
        if listed + d.max_backends as usize > table_size as usize {
            let span = raw.discover.as_ref().map_or(raw.port.span(), Spanned::span);
            let message = format!(
                "VIP \"{name}\": {listed} backends and up to {} discovered (max_backends) do not \
                 fit a table of {table_size} slots; lower max_backends or raise table_size",
                d.max_backends
            );
            return Err((span, message));
        }
    }
    Ok(discover)
}

/// The keys of NAT (`snat`, `snat_ports`, `backend_port`, a backend's `port`) on a VIP of
/// another forwarding mode.
fn nat_keys(raw: &RawVip, name: &str, forwarding: Forwarding) -> Result<(), Invalid> {
    if forwarding == Forwarding::Nat {
        return Ok(());
    }
    for (key, span) in [
        ("snat", raw.snat.as_ref().map(Spanned::span)),
        ("snat_ports", raw.snat_ports.as_ref().map(Spanned::span)),
        ("backend_port", raw.backend_port.as_ref().map(Spanned::span)),
    ] {
        if let Some(span) = span {
            let message = format!(
                "VIP \"{name}\": {key} only applies to forwarding = \"nat\" (this VIP's is \"{}\")",
                forwarding.name()
            );
            return Err((span, message));
        }
    }
    for rb in &raw.backends {
        let rb = rb.get_ref();
        if let Some(port) = &rb.port {
            let message = format!(
                "VIP \"{name}\": backend {} port only applies to forwarding = \"nat\" (other modes \
                 keep the packet's destination port); a health check's port is written \
                 health = {{ port = {} }}",
                rb.address.get_ref(),
                port.get_ref()
            );
            return Err((port.span(), message));
        }
    }
    Ok(())
}

/// A port key that must not be 0 (its type already bounds it to 65535); `what` names it.
fn nonzero_port(port: &Spanned<u16>, what: &str) -> Result<u16, Invalid> {
    match *port.get_ref() {
        0 => Err((
            port.span(),
            format!("{what} 0 is out of range: use 1 to 65535"),
        )),
        p => Ok(p),
    }
}

/// A NAT VIP's translation: its SNAT addresses and ports.
fn nat_vip(
    raw: &RawVip,
    name: &str,
    vip_address: IpAddr,
    taken: &Taken,
) -> Result<NatVipConfig, Invalid> {
    let snat = snat(raw, name, vip_address, taken)?;
    let ports = snat_ports(raw, name, vip_address, &snat, taken)?;
    Ok(NatVipConfig { snat, ports })
}

/// `snat`: absent (the interface's address), `"none"`, an address, a prefix, or a list of
/// addresses and prefixes; 1 to `MAX_SNAT_ADDRESSES` addresses in all.
fn snat(raw: &RawVip, name: &str, vip_address: IpAddr, taken: &Taken) -> Result<Snat, Invalid> {
    let Some(value) = &raw.snat else {
        return Ok(Snat::Interface);
    };
    let items: Vec<(&str, Range<usize>)> = match value.get_ref() {
        RawSnat::One(text) if text == "none" => return Ok(Snat::None),
        RawSnat::One(text) => vec![(text.as_str(), value.span())],
        RawSnat::List(list) if list.is_empty() => {
            let message = format!(
                "VIP \"{name}\": snat = [] lists no address: list 1 to {MAX_SNAT_ADDRESSES}, write \
                 \"none\" for destination-only NAT, or leave snat out for the interface's address"
            );
            return Err((value.span(), message));
        }
        RawSnat::List(list) => list
            .iter()
            .map(|item| (item.get_ref().as_str(), item.span()))
            .collect(),
    };
    let mut addresses = Vec::new();
    for (text, span) in items {
        let invalid = |message: String| (span.clone(), format!("VIP \"{name}\": snat {message}"));
        for address in parse_snat(text, vip_address.is_ipv6()).map_err(invalid)? {
            let what = if text.contains('/') {
                format!("\"{text}\" includes {address}, which")
            } else {
                format!("address {address}")
            };
            snat_address_allowed(address, taken).map_err(|e| invalid(format!("{what} {e}")))?;
            if addresses.contains(&address) {
                return Err(invalid(format!("{what} is listed twice")));
            }
            addresses.push(address);
            if addresses.len() > MAX_SNAT_ADDRESSES {
                return Err(invalid(format!(
                    "has more than {MAX_SNAT_ADDRESSES} addresses: list at most \
                     {MAX_SNAT_ADDRESSES}"
                )));
            }
        }
    }
    Ok(Snat::Addresses(addresses))
}

/// What a SNAT address may not be: an address no packet can come from, a VIP (replies to it
/// would be taken for the VIP's traffic), a backend (the balancer would talk to itself).
fn snat_address_allowed(address: IpAddr, taken: &Taken) -> Result<(), String> {
    if address.is_unspecified()
        || address.is_multicast()
        || address.is_loopback()
        || is_broadcast(address)
    {
        return Err(
            "cannot be a source address (unspecified, loopback, multicast or broadcast)".to_owned(),
        );
    }
    if let Some(owner) = taken.vips.get(&address) {
        return Err(format!(
            "is the address of VIP \"{owner}\": use an address of the balancer that is no VIP's"
        ));
    }
    if let Some(owner) = taken.backends.get(&address) {
        return Err(format!(
            "is a backend of VIP \"{owner}\": use an address of the balancer that is no backend's"
        ));
    }
    Ok(())
}

/// `"192.0.2.10"`, or a prefix of at most `MAX_SNAT_ADDRESSES` addresses (`"192.0.2.16/28"`,
/// `"2001:db8::/124"`) expanded to every address in it; of the VIP's family.
fn parse_snat(text: &str, v6: bool) -> Result<Vec<IpAddr>, String> {
    let (address, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let address: IpAddr = address.parse().map_err(|_| {
        format!(
            "\"{text}\" is not an address or prefix: write \"none\", an address such as \
             \"192.0.2.10\", a prefix such as \"192.0.2.16/28\", or a list of addresses"
        )
    })?;
    if address.is_ipv6() != v6 {
        return Err(format!(
            "\"{text}\" is not of the VIP's address family (IPv{}): NAT here translates within \
             one family",
            if v6 { 6 } else { 4 }
        ));
    }
    let Some(len) = len else {
        return Ok(vec![address]);
    };
    let bits = if v6 { 128u32 } else { 32 };
    let len: u32 = match len.parse() {
        Ok(l) if l <= bits => l,
        _ => return Err(format!("\"{text}\": bad prefix length")),
    };
    let most_host_bits = MAX_SNAT_ADDRESSES.ilog2();
    if bits - len > most_host_bits {
        return Err(format!(
            "\"{text}\" holds more than {MAX_SNAT_ADDRESSES} addresses: use a /{} or longer \
             prefix, or list the addresses",
            bits - most_host_bits
        ));
    }
    let value = match address {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    };
    let host_mask = (1u128 << (bits - len)) - 1;
    let from_bits = |v: u128| -> IpAddr {
        if v6 {
            IpAddr::V6(Ipv6Addr::from(v))
        } else {
            // The value came from an IPv4 address and varies in its low bits only.
            IpAddr::V4(Ipv4Addr::from(v as u32))
        }
    };
    if value & host_mask != 0 {
        return Err(format!(
            "\"{text}\" has host bits set: write its network, \"{}/{len}\"",
            from_bits(value & !host_mask)
        ));
    }
    Ok((0..=host_mask).map(|i| from_bits(value | i)).collect())
}

/// `snat_ports` (default: below the host's local port range when the SNAT addresses are
/// the host's own), and what else takes ports on those addresses: the host's own
/// connections and the metrics endpoint.
fn snat_ports(
    raw: &RawVip,
    name: &str,
    vip_address: IpAddr,
    snat: &Snat,
    taken: &Taken,
) -> Result<(u16, u16), Invalid> {
    let addresses: &[IpAddr] = match snat {
        Snat::None => {
            if let Some(ports) = &raw.snat_ports {
                let message = format!(
                    "VIP \"{name}\": snat_ports does not apply with snat = \"none\" \
                     (destination-only NAT allocates no ports): remove it, or set snat"
                );
                return Err((ports.span(), message));
            }
            return Ok(DEFAULT_SNAT_PORTS);
        }
        Snat::Interface => &[],
        Snat::Addresses(addresses) => addresses,
    };
    let host = taken.host;
    let is_host_address = |a: &IpAddr| host.addresses.iter().any(|(h, _)| h == a);
    let interface = *snat == Snat::Interface;
    let on_host = interface || addresses.iter().any(is_host_address);
    let (lo, hi) = match &raw.snat_ports {
        None if on_host => DEFAULT_HOST_SNAT_PORTS,
        None => DEFAULT_SNAT_PORTS,
        Some(p) => parse_port_range(p.get_ref())
            .map_err(|e| (p.span(), format!("VIP \"{name}\": snat_ports {e}")))?,
    };
    // Where to point when the default ports are to blame: what chose them.
    let span = match (&raw.snat_ports, &raw.snat) {
        (Some(p), _) => p.span(),
        (None, Some(s)) => s.span(),
        (None, None) => raw.forwarding.span(),
    };
    let ports = match &raw.snat_ports {
        Some(_) => format!("snat_ports {lo}-{hi}"),
        None => format!("the default snat_ports {lo}-{hi}"),
    };
    if let Some((local_lo, local_hi)) = host.local_port_range.filter(|_| on_host) {
        if lo <= local_hi && local_lo <= hi {
            let instead = if local_lo > 1024 {
                format!(", such as \"1024-{}\"", local_lo - 1)
            } else if local_hi < 65535 {
                format!(", such as \"{}-65535\"", local_hi + 1)
            } else {
                String::new()
            };
            let message = format!(
                "VIP \"{name}\": {ports} overlap the host's local port range \
                 {local_lo}-{local_hi} (net.ipv4.ip_local_port_range), which its own connections \
                 take on the SNAT address: choose snat_ports outside the host's local port \
                 range{instead}"
            );
            return Err((span, message));
        }
    }
    let metrics = taken.metrics_listen;
    let ip = metrics.ip();
    let metrics_on_snat = addresses.contains(&ip)
        // `0.0.0.0` takes the port on every IPv4 address, `::` on every address.
        || (on_host && ip.is_unspecified() && (ip.is_ipv6() || vip_address.is_ipv4()))
        // The interface's address is one of the host's.
        || (interface
            && !ip.is_loopback()
            && ip.is_ipv6() == vip_address.is_ipv6()
            && is_host_address(&ip));
    if metrics_on_snat && (lo..=hi).contains(&metrics.port()) {
        let on = if ip.is_unspecified() {
            "every address, the SNAT address among them"
        } else {
            "the SNAT address"
        };
        let message = format!(
            "VIP \"{name}\": {ports} include {}, the port of metrics_listen \"{metrics}\" on \
             {on}: choose snat_ports without it, or another metrics_listen port",
            metrics.port()
        );
        return Err((span, message));
    }
    Ok((lo, hi))
}

/// `"1024-65535"` (inclusive) or `"5000"` (one port).
fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || {
        format!(
            "\"{text}\" is not a port range such as \"1024-65535\" (ports 1 to 65535, the \
             first no larger than the last)"
        )
    };
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(bad)
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(text)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
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
    backend_port: Option<u16>,
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
        // NAT: the backend's own port, else the VIP's backend_port (other modes have
        // neither: `nat_keys`).
        let port = match &rb.port {
            Some(p) => Some(nonzero_port(
                p,
                &format!("VIP \"{name}\": backend {address} port"),
            )?),
            None => backend_port,
        };
        // A check probes the port the backend serves on unless it names one.
        let default_port = port.or(port_of(raw.port.get_ref()));
        backends.push(BackendConfig {
            address,
            port,
            weight,
            drain: rb.drain,
            health: backend_health(raw, rb, name, default_port, span)?,
            source: crate::config::model::BackendSource::File,
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
    match address_problem(address, vip_address, forwarding) {
        Some(problem) => Err((rb.address.span(), format!("VIP \"{name}\": {problem}"))),
        None => Ok(address),
    }
}

/// A backend may not be a VIP (its packets would come back to the balancer) nor this host
/// (the balancer would send packets to itself).
fn not_taken(address: IpAddr, name: &str, taken: &Taken) -> Result<(), String> {
    let vip = taken.vips.get(&address).map(String::as_str);
    match taken_problem(address, vip, &taken.host.addresses) {
        Some(problem) => Err(format!("VIP \"{name}\": {problem}")),
        None => Ok(()),
    }
}

/// The VIP's health table with the backend's overrides laid over it.
fn backend_health(
    raw: &RawVip,
    rb: &RawBackend,
    name: &str,
    default_port: Option<u16>,
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
        default_port,
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
    // The kernel's limit (IFNAMSIZ - 1) and what its dev_valid_name rejects: "." and "..",
    // '/', ':' and the bytes its isspace() is true of (9 to 13, 32 and, Latin-1, 0xa0); and
    // NUL, which would end the name early.
    let rejected = |b: u8| matches!(b, b'/' | b':' | b'\0' | 9..=13 | b' ' | 0xa0);
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name.bytes().any(rejected)
    {
        return Err(format!("interface {name:?} is not a valid interface name"));
    }
    Ok(())
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

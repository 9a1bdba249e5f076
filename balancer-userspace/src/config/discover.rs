//! A VIP's `discover` table, checked; and what a discovered record may become: the same rules
//! as a backend written in the file (family, no loopback, not a VIP), applied to every answer.

use std::{
    net::{IpAddr, SocketAddr},
    ops::Range,
    time::Duration,
};

use toml::Spanned;

use crate::config::{
    addresses::{address_problem, taken_problem},
    health::{self, Scope},
    model::{
        BackendConfig, BackendSource, Discover, DiscoverQuery, Forwarding, HealthCheck, Vip,
        DEFAULT_DISCOVER_EMPTY_GRACE, DEFAULT_DISCOVER_INTERVAL, DEFAULT_DISCOVER_MAX_BACKENDS,
        DEFAULT_DISCOVER_TIMEOUT, DEFAULT_WEIGHT, DISCOVER_INTERVAL_RANGE, DISCOVER_TIMEOUT_RANGE,
        MAX_DISCOVER_EMPTY_GRACE, MAX_DISCOVER_MAX_BACKENDS, MAX_DISCOVER_RESOLVERS, MAX_WEIGHT,
    },
    raw::{Invalid, PortSpec, RawDiscover, RawVip},
};

/// The VIP's `discover` table, if any. `backend_port`: the VIP's (NAT).
pub(super) fn discover(
    raw: &RawVip,
    name: &str,
    forwarding: Forwarding,
    backend_port: Option<u16>,
) -> Result<Option<Discover>, Invalid> {
    let Some(spanned) = &raw.discover else {
        return Ok(None);
    };
    let d = spanned.get_ref();
    let query = query(d, name, spanned.span())?;
    // Under NAT, A/AAAA backends listen on `port`, else on the VIP's `backend_port`.
    let port = discover_port(d, name, forwarding, &query)?.or(match (&query, forwarding) {
        (DiscoverQuery::Dns(_), Forwarding::Nat) => backend_port,
        _ => None,
    });
    let weight = weight(d, name, &query)?;
    let (interval, timeout, empty_grace) = durations(d, name, spanned.span())?;
    let max_backends = match &d.max_backends {
        None => DEFAULT_DISCOVER_MAX_BACKENDS,
        Some(m) if (1..=MAX_DISCOVER_MAX_BACKENDS).contains(m.get_ref()) => *m.get_ref(),
        Some(m) => {
            let message = format!(
                "VIP \"{name}\": discover max_backends must be from 1 to {MAX_DISCOVER_MAX_BACKENDS}"
            );
            return Err((m.span(), message));
        }
    };
    let resolvers = resolvers(d, name)?;
    let (health, health_port_fixed) = health_of(raw, name, &query, port, spanned.span())?;
    Ok(Some(Discover {
        query,
        port,
        weight,
        interval,
        timeout,
        resolvers,
        empty_grace,
        max_backends,
        health,
        health_port_fixed,
        host_addresses: Vec::new(),
    }))
}

/// `dns` or `srv`, exactly one.
fn query(d: &RawDiscover, name: &str, span: Range<usize>) -> Result<DiscoverQuery, Invalid> {
    Ok(match (&d.dns, &d.srv) {
        (Some(dns), None) => DiscoverQuery::Dns(dns_name(dns, name, false)?),
        (None, Some(srv)) => DiscoverQuery::Srv(dns_name(srv, name, true)?),
        (Some(_), Some(srv)) => {
            let message = format!(
                "VIP \"{name}\": discover takes one of `dns` (A/AAAA records) and `srv` (SRV \
                 records), not both"
            );
            return Err((srv.span(), message));
        }
        (None, None) => {
            let message = format!(
                "VIP \"{name}\": discover needs `dns = \"name\"` (A/AAAA records) or \
                 `srv = \"_service._tcp.name\"` (SRV)"
            );
            return Err((span, message));
        }
    })
}

/// A/AAAA: the weight of every discovered backend (SRV records carry their own).
fn weight(d: &RawDiscover, name: &str, query: &DiscoverQuery) -> Result<u32, Invalid> {
    Ok(match (&d.weight, query) {
        (None, _) => DEFAULT_WEIGHT,
        (Some(w), DiscoverQuery::Srv(_)) => {
            let message = format!(
                "VIP \"{name}\": discover weight does not apply to SRV records, which carry \
                 their own"
            );
            return Err((w.span(), message));
        }
        (Some(w), DiscoverQuery::Dns(_)) if (1..=MAX_WEIGHT).contains(w.get_ref()) => *w.get_ref(),
        (Some(w), DiscoverQuery::Dns(_)) => {
            let message = format!("VIP \"{name}\": discover weight must be from 1 to {MAX_WEIGHT}");
            return Err((w.span(), message));
        }
    })
}

/// `interval`, `timeout` (no longer than the interval) and `empty_grace`.
fn durations(
    d: &RawDiscover,
    name: &str,
    span: Range<usize>,
) -> Result<(Duration, Duration, Duration), Invalid> {
    let interval = duration(
        d.interval.as_ref(),
        name,
        "interval",
        DEFAULT_DISCOVER_INTERVAL,
        &DISCOVER_INTERVAL_RANGE,
        "from 1s to 1h",
    )?;
    let timeout = duration(
        d.timeout.as_ref(),
        name,
        "timeout",
        DEFAULT_DISCOVER_TIMEOUT,
        &DISCOVER_TIMEOUT_RANGE,
        "from 100ms to 30s",
    )?;
    if timeout > interval {
        let span = d.timeout.as_ref().map_or(span, Spanned::span);
        let message = format!(
            "VIP \"{name}\": discover timeout ({timeout:?}) is longer than its interval \
             ({interval:?}): a resolution would still run when the next is due"
        );
        return Err((span, message));
    }
    let empty_grace = duration(
        d.empty_grace.as_ref(),
        name,
        "empty_grace",
        DEFAULT_DISCOVER_EMPTY_GRACE,
        &(Duration::ZERO..=MAX_DISCOVER_EMPTY_GRACE),
        "from 0s to 24h",
    )?;
    Ok((interval, timeout, empty_grace))
}

/// A discovered backend's health check (the VIP's), and whether it names its own port.
fn health_of(
    raw: &RawVip,
    name: &str,
    query: &DiscoverQuery,
    port: Option<u16>,
    span: Range<usize>,
) -> Result<(HealthCheck, bool), Invalid> {
    let vip_port = match raw.port.get_ref() {
        PortSpec::Port(p) => Some(*p),
        PortSpec::Any => None,
    };
    let health_port_fixed = raw
        .health
        .as_ref()
        .is_some_and(|h| h.get_ref().port.is_some());
    // SRV: the record's port is probed (unless the check names one); until a record is known,
    // the VIP's port (or any valid one) stands in.
    let default_port = match query {
        DiscoverQuery::Dns(_) => port.or(vip_port),
        DiscoverQuery::Srv(_) => vip_port.or(Some(1)),
    };
    let scope = Scope {
        name: &format!("VIP \"{name}\", discovered backends"),
        protocol: raw.protocol,
        default_port,
        span: raw.health.as_ref().map_or(span, Spanned::span),
    };
    let vip_health = raw
        .health
        .as_ref()
        .map(|h| h.get_ref().clone())
        .unwrap_or_default();
    let health = health::resolve(&vip_health, raw.health.is_some(), &scope)?;
    Ok((health, health_port_fixed))
}

/// `port`: the backends' port, for A/AAAA records under NAT only.
fn discover_port(
    d: &RawDiscover,
    name: &str,
    forwarding: Forwarding,
    query: &DiscoverQuery,
) -> Result<Option<u16>, Invalid> {
    let Some(p) = &d.port else {
        return Ok(None);
    };
    let problem = match (query, forwarding) {
        (DiscoverQuery::Srv(_), _) => {
            "does not apply to SRV records, which carry their own port".to_owned()
        }
        (DiscoverQuery::Dns(_), Forwarding::Dsr | Forwarding::Tunnel) => format!(
            "only applies to forwarding = \"nat\" (this VIP's is \"{}\"; other modes keep the \
             packet's destination port); a health check's port is written health = {{ port = {} }}",
            forwarding.name(),
            p.get_ref()
        ),
        (DiscoverQuery::Dns(_), Forwarding::Nat) if *p.get_ref() == 0 => {
            "must be from 1 to 65535".to_owned()
        }
        (DiscoverQuery::Dns(_), Forwarding::Nat) => return Ok(Some(*p.get_ref())),
    };
    Err((p.span(), format!("VIP \"{name}\": discover port {problem}")))
}

fn duration(
    value: Option<&Spanned<String>>,
    name: &str,
    key: &str,
    default: Duration,
    range: &std::ops::RangeInclusive<Duration>,
    bounds: &str,
) -> Result<Duration, Invalid> {
    let Some(v) = value else {
        return Ok(default);
    };
    let d = health::parse_duration(v.get_ref())
        .map_err(|e| (v.span(), format!("VIP \"{name}\": discover {key} {e}")))?;
    if !range.contains(&d) {
        let message = format!("VIP \"{name}\": discover {key} must be {bounds}");
        return Err((v.span(), message));
    }
    Ok(d)
}

/// `["10.96.0.10", "10.96.0.11:5353", "[fd00::10]:53"]`.
fn resolvers(d: &RawDiscover, name: &str) -> Result<Vec<SocketAddr>, Invalid> {
    let Some(list) = &d.resolvers else {
        return Ok(Vec::new());
    };
    if list.get_ref().is_empty() || list.get_ref().len() > MAX_DISCOVER_RESOLVERS {
        let message = format!(
            "VIP \"{name}\": discover resolvers must list 1 to {MAX_DISCOVER_RESOLVERS} servers \
             (leave it out to use /etc/resolv.conf)"
        );
        return Err((list.span(), message));
    }
    let mut out = Vec::new();
    for r in list.get_ref() {
        let text = r.get_ref().trim();
        let parsed = text
            .parse::<SocketAddr>()
            .ok()
            .or_else(|| text.parse::<IpAddr>().ok().map(|a| SocketAddr::new(a, 53)));
        match parsed {
            Some(a) if a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast() => {
                out.push(a);
            }
            _ => {
                let message = format!(
                    "VIP \"{name}\": discover resolver \"{text}\" is not an address such as \
                     \"10.96.0.10\", \"10.96.0.10:53\" or \"[fd00::10]:53\""
                );
                return Err((r.span(), message));
            }
        }
    }
    Ok(out)
}

/// A DNS name: at most 253 characters (255 bytes on the wire), labels of 1 to 63 letters,
/// digits, hyphens (and underscores, which SRV names start their labels with), then an
/// optional final dot, which the 253 do not count.
fn dns_name(value: &Spanned<String>, name: &str, srv: bool) -> Result<String, Invalid> {
    let text = value.get_ref();
    let bare = text.strip_suffix('.').unwrap_or(text);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let problem = if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(label_ok) {
        Some("is not a DNS name (labels of 1 to 63 letters, digits and hyphens, 253 characters at most)")
    } else if bare.parse::<IpAddr>().is_ok() {
        Some("is an address, not a name: list it in `backends` instead")
    } else if srv && !bare.starts_with('_') {
        Some("is not an SRV name such as \"_http._tcp.web.default.svc.cluster.local\"")
    } else {
        None
    };
    match problem {
        Some(p) => Err((
            value.span(),
            format!("VIP \"{name}\": discover name \"{text}\" {p}"),
        )),
        None => Ok(text.clone()),
    }
}

/// One record of an answer: an address, and an SRV record's port and weight.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Record {
    pub address: IpAddr,
    pub port: Option<u16>,
    pub weight: Option<u16>,
}

/// The backend a discovered record becomes on `vip`, or why it cannot be one (the rules of a
/// backend written in the file). `vips`: every VIP (a backend may not be one).
pub fn discovered_backend(
    vip: &Vip,
    discover: &Discover,
    vips: &[Vip],
    record: &Record,
) -> Result<BackendConfig, String> {
    let address = record.address;
    let owner = vips
        .iter()
        .find(|v| v.address == address)
        .map(|v| v.name.as_str());
    if let Some(problem) = address_problem(address, vip.address, vip.forwarding)
        .or_else(|| taken_problem(address, owner, &discover.host_addresses))
    {
        return Err(problem);
    }
    let nat = vip.forwarding == Forwarding::Nat;
    let port = match (&discover.query, nat) {
        (_, false) => None,
        (DiscoverQuery::Dns(_), true) => discover.port,
        (DiscoverQuery::Srv(_), true) => record.port.filter(|p| *p != 0),
    };
    if nat && matches!(discover.query, DiscoverQuery::Srv(_)) && port.is_none() {
        return Err(format!("{address}: the SRV record's port is 0"));
    }
    let mut health = discover.health.clone();
    if !discover.health_port_fixed {
        if let Some(p) = port.or(record.port.filter(|p| *p != 0)) {
            health.port = p;
        }
    }
    let weight = match record.weight {
        // SRV weight 0 means "rarely", not "never": the smallest share there is.
        Some(w) => u32::from(w).max(1),
        None => discover.weight,
    };
    Ok(BackendConfig {
        address,
        port,
        weight,
        drain: false,
        health,
        source: BackendSource::Discovered,
    })
}

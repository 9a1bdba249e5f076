//! DNS lookups for discovery, with hickory-resolver: A/AAAA or SRV records of a name, from
//! the VIP's resolvers or the system's (/etc/resolv.conf, read again at every lookup), each
//! bounded by the VIP's timeout. Nothing is cached between lookups: every lookup asks the
//! server, and the core decides how often (the interval, bounded by the records' TTL).

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use futures::future::join_all;
use hickory_resolver::{
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::{DnsError, NetError},
    proto::{
        op::ResponseCode,
        rr::{RData, Record as DnsRecord, RecordType},
    },
    TokioResolver,
};

use crate::{
    config::{discover::Record, DiscoverQuery},
    core::discovery::{FailureKind, Lookup, Resolution},
};

/// At most this many SRV targets are resolved at once.
const SRV_TARGETS_AT_ONCE: usize = 32;

/// Performs `lookup`, within its timeout.
pub async fn resolve(lookup: &Lookup) -> Resolution {
    match tokio::time::timeout(lookup.timeout, resolve_unbounded(lookup)).await {
        Ok(resolution) => resolution,
        Err(_) => Resolution::Failed {
            kind: FailureKind::Timeout,
            error: format!("no answer within {}ms", lookup.timeout.as_millis()),
        },
    }
}

async fn resolve_unbounded(lookup: &Lookup) -> Resolution {
    let resolver = match resolver(lookup) {
        Ok(r) => r,
        Err(error) => {
            return Resolution::Failed {
                kind: FailureKind::Other,
                error,
            }
        }
    };
    match &lookup.query {
        DiscoverQuery::Dns(name) => addresses(&resolver, lookup, name).await,
        DiscoverQuery::Srv(name) => srv(&resolver, lookup, name).await,
    }
}

fn resolver(lookup: &Lookup) -> Result<TokioResolver, String> {
    let mut builder = if lookup.resolvers.is_empty() {
        TokioResolver::builder_tokio()
            .map_err(|e| format!("reading the system's resolvers (/etc/resolv.conf): {e}"))?
    } else {
        let servers = lookup
            .resolvers
            .iter()
            .map(|a| {
                let mut udp = ConnectionConfig::udp();
                udp.port = a.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = a.port();
                NameServerConfig::new(a.ip(), true, vec![udp, tcp])
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        )
    };
    let options = builder.options_mut();
    // Two tries within the VIP's timeout (the whole lookup is bounded by it anyway).
    options.attempts = 2;
    options.timeout = (lookup.timeout / 2).max(Duration::from_millis(50));
    options.cache_size = 0;
    options.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
    builder
        .build()
        .map_err(|e| format!("building the resolver: {e}"))
}

/// The record types of the VIP's family (both for a tunnel VIP of IPv4, which may have IPv6
/// backends).
fn families(lookup: &Lookup) -> Vec<RecordType> {
    if lookup.both_families {
        vec![RecordType::A, RecordType::AAAA]
    } else if lookup.vip_address.is_ipv4() {
        vec![RecordType::A]
    } else {
        vec![RecordType::AAAA]
    }
}

fn address_of(record: &DnsRecord) -> Option<IpAddr> {
    match &record.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

/// A and/or AAAA records of `name`.
async fn addresses(resolver: &TokioResolver, lookup: &Lookup, name: &str) -> Resolution {
    let mut records = Vec::new();
    let mut ttl = u32::MAX;
    let mut empty = None;
    for kind in families(lookup) {
        match resolver.lookup(name, kind).await {
            Ok(answer) => {
                for r in answer.answers() {
                    if let Some(address) = address_of(r) {
                        ttl = ttl.min(r.ttl);
                        records.push(Record {
                            address,
                            port: None,
                            weight: None,
                        });
                    }
                }
            }
            Err(e) => match classify(&e) {
                Classified::Empty { nxdomain } => empty = Some(nxdomain),
                Classified::Failed(kind) => {
                    return Resolution::Failed {
                        kind,
                        error: e.to_string(),
                    }
                }
            },
        }
    }
    if records.is_empty() {
        return Resolution::Empty {
            nxdomain: empty.unwrap_or(false),
        };
    }
    Resolution::Records {
        records,
        ttl: Duration::from_secs(u64::from(ttl)),
    }
}

/// SRV records of `name`, the lowest priority's (the others are standby, as SRV says), each
/// target resolved (from the answer's additional records when the server sent them).
async fn srv(resolver: &TokioResolver, lookup: &Lookup, name: &str) -> Resolution {
    let answer = match resolver.lookup(name, RecordType::SRV).await {
        Ok(a) => a,
        Err(e) => {
            return match classify(&e) {
                Classified::Empty { nxdomain } => Resolution::Empty { nxdomain },
                Classified::Failed(kind) => Resolution::Failed {
                    kind,
                    error: e.to_string(),
                },
            }
        }
    };
    let mut ttl = u32::MAX;
    let srvs: Vec<_> = answer
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => {
                ttl = ttl.min(r.ttl);
                Some(s.clone())
            }
            _ => None,
        })
        .collect();
    let Some(best) = srvs.iter().map(|s| s.priority).min() else {
        return Resolution::Empty { nxdomain: false };
    };
    // Targets beyond the cap are not resolved: the answer is refused as too large anyway.
    let srvs: Vec<_> = srvs
        .into_iter()
        .filter(|s| s.priority == best)
        .take(lookup.max_records + 1)
        .collect();
    let (records, targets_ttl) = targets(resolver, lookup, &answer, &srvs).await;
    ttl = ttl.min(targets_ttl);
    if records.is_empty() {
        return Resolution::Empty { nxdomain: false };
    }
    Resolution::Records {
        records,
        ttl: Duration::from_secs(u64::from(ttl)),
    }
}

/// The addresses of the SRV records' targets, with the smallest TTL among them: from the
/// answer's additional records when the server sent them, else looked up.
async fn targets(
    resolver: &TokioResolver,
    lookup: &Lookup,
    answer: &hickory_resolver::lookup::Lookup,
    srvs: &[hickory_resolver::proto::rr::rdata::SRV],
) -> (Vec<Record>, u32) {
    let mut ttl = u32::MAX;
    // Addresses the server sent along.
    let mut known: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for r in answer.additionals() {
        if let Some(a) = address_of(r) {
            if families(lookup).contains(&r.record_type()) {
                known
                    .entry(r.name.to_ascii().to_lowercase())
                    .or_default()
                    .push(a);
            }
        }
    }
    let mut records = Vec::new();
    for chunk in srvs.chunks(SRV_TARGETS_AT_ONCE) {
        let known = &known;
        let resolved = join_all(chunk.iter().map(|s| async move {
            let target = s.target.to_ascii().to_lowercase();
            if let Some(addresses) = known.get(&target) {
                return (s, addresses.clone(), u32::MAX);
            }
            let mut addresses = Vec::new();
            let mut ttl = u32::MAX;
            for kind in families(lookup) {
                if let Ok(a) = resolver.lookup(s.target.clone(), kind).await {
                    for r in a.answers() {
                        if let Some(address) = address_of(r) {
                            ttl = ttl.min(r.ttl);
                            addresses.push(address);
                        }
                    }
                }
            }
            (s, addresses, ttl)
        }))
        .await;
        for (s, addresses, target_ttl) in resolved {
            ttl = ttl.min(target_ttl);
            records.extend(addresses.into_iter().map(|address| Record {
                address,
                port: Some(s.port),
                weight: Some(s.weight),
            }));
        }
    }
    (records, ttl)
}

enum Classified {
    Empty { nxdomain: bool },
    Failed(FailureKind),
}

fn classify(e: &NetError) -> Classified {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(no)) => Classified::Empty {
            nxdomain: no.response_code == ResponseCode::NXDomain,
        },
        NetError::Dns(DnsError::ResponseCode(ResponseCode::NXDomain)) => {
            Classified::Empty { nxdomain: true }
        }
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => {
            Classified::Failed(FailureKind::ServFail)
        }
        NetError::Dns(DnsError::ResponseCode(_)) => Classified::Failed(FailureKind::Refused),
        NetError::Timeout => Classified::Failed(FailureKind::Timeout),
        _ => Classified::Failed(FailureKind::Other),
    }
}

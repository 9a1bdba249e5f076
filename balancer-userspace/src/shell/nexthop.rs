//! Next-hop resolution: for each backend, the egress interface and the two MAC addresses,
//! from the kernel's routing and neighbour tables (rtnetlink). Nobody types a MAC address
//! into a config.
//!
//! A backend behind a gateway resolves to the gateway's MAC address, which suits tunnel mode;
//! direct server return needs backends on a directly connected network, which the planner
//! checks (`NextHop::gateway`). When the neighbour table has no usable entry, resolution is
//! triggered (an `NTF_USE` neighbour request, which makes the kernel send an ARP or neighbour
//! solicitation) and the table is polled until the answer arrives or the timeout passes.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
    route::{RouteAddress, RouteAttribute},
    AddressFamily,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::plan::inputs::{NextHop, NextHops};

/// How long to wait for an ARP or neighbour-discovery answer.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum NextHopError {
    #[error("no route to {0}")]
    NoRoute(IpAddr),
    #[error("{address} is a local address of this host ({interface})")]
    Local { address: IpAddr, interface: String },
    #[error("no ARP/neighbour answer from {address} on {interface} within {timeout:?}")]
    NoAnswer {
        address: IpAddr,
        interface: String,
        timeout: Duration,
    },
    #[error("no interface named {0}")]
    NoInterface(String),
    #[error("interface index {0} has no MAC address (not an Ethernet interface?)")]
    NoMac(u32),
    #[error("netlink")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink socket")]
    Io(#[from] std::io::Error),
}

struct Route {
    ifindex: u32,
    gateway: Option<IpAddr>,
    source: Option<IpAddr>,
}

/// A netlink connection to the kernel's routing tables.
pub struct Resolver {
    handle: Handle,
    /// One request at a time on the socket: a kernel answers a second dump while one is in
    /// progress on the same socket with EBUSY (seen on 6.1, with backends resolved
    /// concurrently).
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Resolver {
    /// Opens the connection; its I/O runs as a task on the current tokio runtime.
    pub fn new() -> Result<Self, NextHopError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Resolver {
            handle,
            one_at_a_time: tokio::sync::Mutex::new(()),
        })
    }

    /// Resolves every address. Failures are returned per address.
    pub async fn resolve_all(
        &self,
        addresses: impl IntoIterator<Item = IpAddr>,
    ) -> (NextHops, HashMap<IpAddr, NextHopError>) {
        let mut hops = NextHops::new();
        let mut errors = HashMap::new();
        self.resolve_batch(addresses, |results| {
            for (address, result) in results {
                match result {
                    Ok(hop) => {
                        hops.insert(address, hop);
                    }
                    Err(e) => {
                        errors.insert(address, e);
                    }
                }
            }
        })
        .await;
        (hops, errors)
    }

    /// Resolves every address as one batch, handing results to `sink` as they become known:
    /// the routes first (one netlink request each), then one neighbour-table dump per poll
    /// round for every address still waiting, so that the cost grows with the number of
    /// addresses, not with its square (a dump per address per round did not scale to
    /// thousands of unreachable backends). Every address is answered within
    /// `RESOLVE_TIMEOUT` plus the time of its route lookup.
    pub async fn resolve_batch(
        &self,
        addresses: impl IntoIterator<Item = IpAddr>,
        mut sink: impl FnMut(Vec<(IpAddr, Result<NextHop, NextHopError>)>),
    ) {
        let (mut waiting, links, failed) = self.routes(addresses).await;
        if !failed.is_empty() {
            sink(failed);
        }
        let deadline = Instant::now() + RESOLVE_TIMEOUT;
        let mut triggered = false;
        while !waiting.is_empty() {
            let table = self.neighbours(&waiting).await;
            let mut found = Vec::new();
            waiting.retain(|(address, route)| {
                let neighbour = route.gateway.unwrap_or(*address);
                let Some(dst_mac) = table.get(&(route.ifindex, neighbour)) else {
                    return true;
                };
                let (interface, src_mac, mtu) = links[&route.ifindex].clone();
                found.push((
                    *address,
                    Ok(NextHop {
                        ifindex: route.ifindex,
                        interface,
                        src_mac,
                        dst_mac: *dst_mac,
                        gateway: route.gateway,
                        mtu,
                        source: route.source,
                    }),
                ));
                false
            });
            if !found.is_empty() {
                sink(found);
            }
            if waiting.is_empty() {
                break;
            }
            if !triggered {
                let mut failures = Vec::new();
                for (address, route) in &waiting {
                    let neighbour = route.gateway.unwrap_or(*address);
                    if let Err(e) = self.trigger(route.ifindex, neighbour).await {
                        failures.push((*address, e));
                    }
                }
                // A neighbour the kernel would not even try (its table full): no answer
                // will come.
                if !failures.is_empty() {
                    waiting.retain(|(a, _)| !failures.iter().any(|(f, _)| f == a));
                    sink(failures.into_iter().map(|(a, e)| (a, Err(e))).collect());
                }
                triggered = true;
            }
            if Instant::now() >= deadline {
                let timeouts = waiting
                    .drain(..)
                    .map(|(address, route)| {
                        let interface = links[&route.ifindex].0.clone();
                        let neighbour = route.gateway.unwrap_or(address);
                        let error = NextHopError::NoAnswer {
                            address: neighbour,
                            interface,
                            timeout: RESOLVE_TIMEOUT,
                        };
                        (address, Err(error))
                    })
                    .collect();
                sink(timeouts);
                break;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The route and link of every address: those to wait for a neighbour answer for, the
    /// links by index, and the addresses that failed.
    #[allow(clippy::type_complexity, reason = "a private step of resolve_batch")]
    async fn routes(
        &self,
        addresses: impl IntoIterator<Item = IpAddr>,
    ) -> (
        Vec<(IpAddr, Route)>,
        HashMap<u32, (String, [u8; 6], u32)>,
        Vec<(IpAddr, Result<NextHop, NextHopError>)>,
    ) {
        let mut links = HashMap::new();
        let mut waiting = Vec::new();
        let mut failed = Vec::new();
        for address in addresses {
            let route = match self.route(address).await {
                Ok(route) => route,
                Err(e) => {
                    failed.push((address, Err(e)));
                    continue;
                }
            };
            if let std::collections::hash_map::Entry::Vacant(entry) = links.entry(route.ifindex) {
                match self.link(route.ifindex).await {
                    Ok(link) => {
                        entry.insert(link);
                    }
                    Err(e) => {
                        failed.push((address, Err(e)));
                        continue;
                    }
                }
            }
            waiting.push((address, route));
        }
        (waiting, links, failed)
    }

    /// `ip route get ADDRESS`: the output interface, the gateway if any, and the preferred
    /// source address.
    async fn route(&self, address: IpAddr) -> Result<Route, NextHopError> {
        let _netlink = self.one_at_a_time.lock().await;
        let message = match address {
            IpAddr::V4(a) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        // Streams are read to the end: a half-read reply makes the netlink task warn.
        let routes: Vec<_> = self
            .handle
            .route()
            .get(message)
            .execute()
            .try_collect()
            .await
            .unwrap_or_default();
        let route = routes
            .into_iter()
            .next()
            .ok_or(NextHopError::NoRoute(address))?;
        if route.header.kind == netlink_packet_route::route::RouteType::Local {
            let ifindex = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            let interface = match ifindex {
                Some(i) => self
                    .link(i)
                    .await
                    .map(|(name, _, _)| name)
                    .unwrap_or_default(),
                None => String::new(),
            };
            return Err(NextHopError::Local { address, interface });
        }
        let mut oif = None;
        let mut gateway = None;
        let mut source = None;
        let ip = |a: &RouteAddress| match a {
            RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
            RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
            _ => None,
        };
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Gateway(g) => gateway = ip(g),
                RouteAttribute::PrefSource(s) => source = ip(s),
                _ => {}
            }
        }
        let ifindex = oif.ok_or(NextHopError::NoRoute(address))?;
        Ok(Route {
            ifindex,
            gateway,
            source,
        })
    }

    /// The addresses configured on `interface`.
    pub async fn interface_addresses(&self, interface: &str) -> Result<Vec<IpAddr>, NextHopError> {
        let _netlink = self.one_at_a_time.lock().await;
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .match_name(interface.to_owned())
            .execute()
            .try_collect()
            .await?;
        let ifindex = links
            .first()
            .map(|l| l.header.index)
            .ok_or(NextHopError::NoInterface(interface.to_owned()))?;
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute()
            .try_collect()
            .await?;
        let mut addresses: Vec<IpAddr> = messages
            .into_iter()
            .flat_map(|m| m.attributes)
            .filter_map(|a| match a {
                netlink_packet_route::address::AddressAttribute::Address(a) => Some(a),
                _ => None,
            })
            .collect();
        addresses.sort();
        addresses.dedup();
        Ok(addresses)
    }

    /// The interface's name, MAC address and MTU.
    pub async fn link(&self, ifindex: u32) -> Result<(String, [u8; 6], u32), NextHopError> {
        let _netlink = self.one_at_a_time.lock().await;
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .match_index(ifindex)
            .execute()
            .try_collect()
            .await?;
        let link = links
            .into_iter()
            .next()
            .ok_or(NextHopError::NoMac(ifindex))?;
        let mut name = String::new();
        let mut mac = None;
        let mut mtu = 1500;
        for attribute in link.attributes {
            match attribute {
                LinkAttribute::IfName(n) => name = n,
                LinkAttribute::Address(a) if a.len() == 6 => mac = a.try_into().ok(),
                LinkAttribute::Mtu(m) => mtu = m,
                _ => {}
            }
        }
        Ok((name, mac.ok_or(NextHopError::NoMac(ifindex))?, mtu))
    }

    /// The usable entries of the neighbour table (by interface and address) of the address
    /// families `waiting` needs: one dump per family.
    async fn neighbours(&self, waiting: &[(IpAddr, Route)]) -> HashMap<(u32, IpAddr), [u8; 6]> {
        let mut table = HashMap::new();
        for (family, v4) in [(AddressFamily::Inet, true), (AddressFamily::Inet6, false)] {
            let needed = waiting
                .iter()
                .any(|(a, r)| r.gateway.unwrap_or(*a).is_ipv4() == v4);
            if !needed {
                continue;
            }
            let _netlink = self.one_at_a_time.lock().await;
            let entries: Vec<_> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .unwrap_or_default();
            for entry in entries {
                if let Some((address, mac)) = usable_entry(entry.header.state, entry.attributes) {
                    table.insert((entry.header.ifindex, address), mac);
                }
            }
        }
        table
    }

    /// Asks the kernel to resolve the neighbour (`ip neigh replace ADDRESS dev IF use`).
    async fn trigger(&self, ifindex: u32, address: IpAddr) -> Result<(), NextHopError> {
        let _netlink = self.one_at_a_time.lock().await;
        let mut request = self.handle.neighbours().add(ifindex, address).replace();
        let message = request.message_mut();
        message.header.family = match address {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        message.header.state = NeighbourState::None;
        message.header.flags = NeighbourFlags::Use;
        request.execute().await?;
        Ok(())
    }
}

/// A neighbour entry's address and MAC address, if the entry can be forwarded to.
fn usable_entry(
    state: NeighbourState,
    attributes: Vec<NeighbourAttribute>,
) -> Option<(IpAddr, [u8; 6])> {
    let usable = matches!(
        state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !usable {
        return None;
    }
    let mut destination = None;
    let mut mac = None;
    for attribute in attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                destination = Some(IpAddr::V4(a));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                destination = Some(IpAddr::V6(a));
            }
            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => mac = l.try_into().ok(),
            _ => {}
        }
    }
    Some((destination?, mac?))
}

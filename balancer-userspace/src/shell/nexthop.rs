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

    /// Resolves every address, concurrently. Failures are returned per address.
    pub async fn resolve_all(
        &self,
        addresses: impl IntoIterator<Item = IpAddr>,
    ) -> (NextHops, HashMap<IpAddr, NextHopError>) {
        let lookups = addresses
            .into_iter()
            .map(|a| async move { (a, self.resolve(a).await) });
        let mut hops = NextHops::new();
        let mut errors = HashMap::new();
        for (address, result) in futures::future::join_all(lookups).await {
            match result {
                Ok(hop) => {
                    hops.insert(address, hop);
                }
                Err(e) => {
                    errors.insert(address, e);
                }
            }
        }
        (hops, errors)
    }

    pub async fn resolve(&self, address: IpAddr) -> Result<NextHop, NextHopError> {
        let route = self.route(address).await?;
        let (interface, src_mac, mtu) = self.link(route.ifindex).await?;
        let neighbour = route.gateway.unwrap_or(address);
        let deadline = Instant::now() + RESOLVE_TIMEOUT;
        let mut triggered = false;
        loop {
            if let Some(dst_mac) = self.neighbour(route.ifindex, neighbour).await? {
                return Ok(NextHop {
                    ifindex: route.ifindex,
                    interface,
                    src_mac,
                    dst_mac,
                    gateway: route.gateway,
                    mtu,
                    source: route.source,
                });
            }
            if !triggered {
                self.trigger(route.ifindex, neighbour).await?;
                triggered = true;
            }
            if Instant::now() >= deadline {
                return Err(NextHopError::NoAnswer {
                    address: neighbour,
                    interface,
                    timeout: RESOLVE_TIMEOUT,
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
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

    /// The neighbour's MAC address, if the table holds a usable entry.
    async fn neighbour(
        &self,
        ifindex: u32,
        address: IpAddr,
    ) -> Result<Option<[u8; 6]>, NextHopError> {
        let _netlink = self.one_at_a_time.lock().await;
        let family = match address {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        let entries: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await?;
        for entry in entries {
            if entry.header.ifindex != ifindex {
                continue;
            }
            let usable = matches!(
                entry.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
                    | NeighbourState::Noarp
            );
            let mut destination = None;
            let mut mac = None;
            for attribute in entry.attributes {
                match attribute {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        destination = Some(IpAddr::V4(a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        destination = Some(IpAddr::V6(a))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        mac = l.try_into().ok()
                    }
                    _ => {}
                }
            }
            if destination == Some(address) && usable {
                if let Some(mac) = mac {
                    return Ok(Some(mac));
                }
            }
        }
        Ok(None)
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

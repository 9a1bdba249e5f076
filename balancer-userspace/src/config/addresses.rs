//! What may be a backend's address: the rules for backends in the file and discovered ones
//! alike.

use std::net::IpAddr;

use crate::config::model::Forwarding;

/// Why `address` cannot be a backend of a VIP at `vip_address` forwarding so (another
/// address family where the mode cannot carry it; unspecified, loopback, multicast,
/// broadcast), if it cannot: the rule for backends in the file and discovered ones alike.
pub(super) fn address_problem(
    address: IpAddr,
    vip_address: IpAddr,
    forwarding: Forwarding,
) -> Option<String> {
    let other_family = address.is_ipv4() != vip_address.is_ipv4();
    if forwarding == Forwarding::Dsr && other_family {
        Some(format!(
            "backend {address} is not of the VIP's address family; direct server return \
             forwards the packet unchanged (tunnel mode can carry IPv4 VIPs to IPv6 backends)"
        ))
    } else if forwarding == Forwarding::Nat && other_family {
        Some(format!(
            "backend {address} is not of the VIP's address family; NAT here translates within \
             one family (tunnel mode can carry IPv4 VIPs to IPv6 backends)"
        ))
    } else if forwarding == Forwarding::Tunnel && vip_address.is_ipv6() && address.is_ipv4() {
        Some(format!(
            "an IPv6 VIP cannot be tunnelled to the IPv4 backend {address}"
        ))
    } else if address.is_unspecified()
        || address.is_multicast()
        || address.is_loopback()
        || is_broadcast(address)
    {
        Some(format!(
            "{address} cannot be a backend (unspecified, loopback, multicast or broadcast)"
        ))
    } else {
        None
    }
}

/// Why `address` cannot be a backend because it is taken: `vip` names the VIP it is the
/// address of, `host` lists this host's addresses.
pub(super) fn taken_problem(
    address: IpAddr,
    vip: Option<&str>,
    host: &[(IpAddr, String)],
) -> Option<String> {
    if let Some(owner) = vip {
        return Some(format!(
            "backend {address} is the address of VIP \"{owner}\"; a backend must be a server \
             behind the balancer"
        ));
    }
    let (_, interface) = host.iter().find(|(a, _)| *a == address)?;
    Some(format!(
        "backend {address} is an address of this host ({interface}); a backend must be another \
         machine"
    ))
}

pub(super) fn is_broadcast(address: IpAddr) -> bool {
    matches!(address, IpAddr::V4(a) if a.is_broadcast())
}

//! What the planner works from besides the config: where each backend is reached, what its
//! health checks say, and how backends and addresses are written in the maps.

use std::{collections::HashMap, net::IpAddr};

use balancer_common::{VipKey, FAMILY_IPV4, FAMILY_IPV6};

use crate::config::Vip;

/// Where packets for a backend leave: the interface, the two MAC addresses (the backend's, or
/// its gateway's), the interface's MTU and its preferred source address towards the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub ifindex: u32,
    pub interface: String,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// Set when the backend is reached through a router (fine for tunnels, not for direct
    /// server return).
    pub gateway: Option<IpAddr>,
    pub mtu: u32,
    pub source: Option<IpAddr>,
}

/// Next hops by backend address; a backend missing here could not be resolved.
pub type NextHops = HashMap<IpAddr, NextHop>;

/// What the health checks say of a backend. Until they run, every backend is up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Health {
    #[default]
    Up,
    Down,
}

/// A (VIP name, backend address) pair: how a backend is known across config changes.
pub type BackendKey = (String, IpAddr);

/// The address of a map entry's 16 bytes and family (the inverse of [`address_bytes`]).
pub fn address_of(bytes: [u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    }
}

/// An address as the maps hold it: 16 bytes (IPv4 in the first four) and a family.
pub fn address_bytes(address: IpAddr) -> ([u8; 16], u8) {
    let mut bytes = [0u8; 16];
    match address {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            (bytes, FAMILY_IPV4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_IPV6),
    }
}

/// The map key of a VIP (port 0 for an any-port VIP).
pub fn vip_key(vip: &Vip) -> VipKey {
    let (addr, family) = address_bytes(vip.address);
    VipKey {
        addr,
        port: vip.port.unwrap_or(0).to_be(),
        proto: vip.protocol.number(),
        family,
    }
}

/// `02:00:5e:00:00:01`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_map_bytes() {
        for text in ["192.0.2.1", "2001:db8::7", "::ffff:10.0.0.1"] {
            let address: IpAddr = text.parse().unwrap();
            let (bytes, family) = address_bytes(address);
            assert_eq!(address_of(bytes, family), address, "{text}");
        }
        assert_eq!(format_mac(&[2, 0, 0x5e, 0, 0, 0xff]), "02:00:5e:00:00:ff");
    }
}

//! What config validation needs to know of its host: its own addresses, and the ports its
//! own connections take.

/// Where the kernel says which ports its own connections take (IPv4's and IPv6's alike).
const LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// This host (in this network namespace), for config validation: its addresses with their
/// interfaces' names (a backend may not be one of them; empty if they cannot be listed), and
/// its local port range (SNAT ports on its addresses may not overlap it; `None` if it cannot
/// be read).
pub fn host() -> crate::config::Host {
    let local_port_range = std::fs::read_to_string(LOCAL_PORT_RANGE)
        .ok()
        .and_then(|text| parse_local_port_range(&text));
    crate::config::Host {
        addresses: addresses(),
        local_port_range,
    }
}

/// `ip_local_port_range`'s two numbers, separated by whitespace (the kernel writes a tab).
fn parse_local_port_range(text: &str) -> Option<(u16, u16)> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    match (numbers.next(), numbers.next(), numbers.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// This host's addresses with their interfaces' names; empty if they cannot be listed.
fn addresses() -> Vec<(std::net::IpAddr, String)> {
    use std::{
        ffi::CStr,
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
    };
    let mut addresses = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list and points `list` at it; freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says its type.
        let address = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
                }
                _ => continue,
            }
        };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        addresses.push((address, name));
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_port_range_config_of_the_kernel() {
        assert_eq!(
            parse_local_port_range("32768\t60999\n"),
            Some((32768, 60999))
        );
        assert_eq!(parse_local_port_range(" 1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_local_port_range("5000 5000\n"), Some((5000, 5000)));
        for bad in [
            "",
            "32768",
            "32768 60999 1",
            "60999 32768",
            "a b",
            "1024 70000",
            "-1 5",
        ] {
            assert_eq!(parse_local_port_range(bad), None, "{bad:?}");
        }
        // This machine's, when it has one to read.
        if let Ok(text) = std::fs::read_to_string(LOCAL_PORT_RANGE) {
            assert!(parse_local_port_range(&text).is_some(), "{text:?}");
        }
    }
}

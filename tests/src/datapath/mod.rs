//! The datapath world: the real compiled XDP object, loaded into the kernel with its maps
//! filled from a config by the daemon's own code, and the packets that are run through it
//! with BPF_PROG_TEST_RUN. Used by the datapath fixtures (`tests/datapath/`) and by the
//! benchmark (`benches/balancer.rs`).
//!
//! - [`world`]: the loaded program and the network it believes it is in, described by name
//!   (which backend is reached how); the only place in the tests that uses the daemon's
//!   library (`balancer`).
//! - [`packet`]: the packets a client sends, the frames the balancer must send for them, and a
//!   checksum validator, all built with the packet library etherparse.
//!
//! The parties of that network, shared by both: a client, a router in front of the tunnel
//! backends, and the balancer itself.

use std::net::{Ipv4Addr, Ipv6Addr};

pub mod packet;
pub mod world;

/// The client every test packet comes from.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);

/// The router behind which the routed backends sit (and which sends ICMP errors).
pub const ROUTER_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
pub const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);

/// The balancer's interface, and its own addresses: the outer source of tunnels unless a VIP
/// configures another.
pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xfe];
pub const LB4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);

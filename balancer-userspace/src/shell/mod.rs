//! The kernel shell: the only code that calls aya, netlink or the network for the daemon's
//! own purposes. It performs what the core decides and reports what happened.
//! - [`dataplane`]: load, attach, pin, adopt; execute map plans; read counters;
//! - [`pins`]: pin directories, the layout check, the lock, the state map;
//! - [`nexthop`]: next hops from the kernel's routing and neighbour tables;
//! - [`kernel`]: what the running kernel supports;
//! - [`host`]: the host's own addresses;
//! - [`probe`]: health probes (TCP connect, HTTP GET);
//! - [`nat_sweep`]: the NAT sweeper's thread;
//! - [`dns`]: discovery lookups;
//! - [`routes`]: the routes that announce VIPs to a BGP speaker.

pub mod dataplane;
pub mod dns;
pub mod host;
pub mod kernel;
pub mod nat_sweep;
pub mod nexthop;
pub mod pins;
pub mod probe;
pub mod routes;
pub mod sync;

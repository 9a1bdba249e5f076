//! The balancer daemon's library: everything `balancer` does, in modules a test can reach.
//!
//! A pure core (config -> desired map contents) and a thin shell around the kernel
//! (`dataplane`, `nexthop`).

pub mod autoscale;
pub mod client;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod kernel;
pub mod maglev;
pub mod metrics;
pub mod nexthop;
pub mod pins;
pub mod reconcile;
pub mod status;
pub mod status_table;

/// The compiled XDP object (balancer-ebpf), embedded at build time.
pub const PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/balancer-xdp"));

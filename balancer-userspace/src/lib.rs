//! The balancer daemon's library: everything `balancer` does, in modules a test can reach.
//!
//! Layers, each using only the ones above it (checked by `tests/module_graph.rs`):
//! - [`config`], [`maglev`]: the validated config; the Maglev table builder;
//! - [`plan`]: desired map contents and the map plan, computed purely;
//! - [`sync`]: the connection-table sync between a fleet's balancers: its wire format, its
//!   counters, its view of the maps;
//! - [`autoscale`]: rates and the autoscaling formula;
//! - [`core`]: every decision, as `handle(input, now) -> effects`, with no I/O;
//! - [`shell`]: the only code that talks to the kernel (aya, netlink) and probes backends;
//! - [`api`]: what the daemon shows (metrics, status) and the control socket;
//! - [`daemon`]: the event loop that feeds the core and performs its effects.

pub mod api;
pub mod autoscale;
pub mod config;
pub mod core;
pub mod daemon;
pub mod maglev;
pub mod plan;
#[cfg(test)]
mod property;
pub mod shell;
pub mod sync;

/// The compiled XDP object (balancer-ebpf), embedded at build time.
pub const PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/balancer-xdp"));

//! Test support for the tiers that need root: network namespaces, the demo topology, real
//! HTTP servers and clients, and the real `balancer` binary. Used by the integration tests in
//! `tests/tests/` and by `cargo xtask demo`.
//!
//! With the `datapath` feature (on for the tests and the benchmark, see Cargo.toml), also the
//! world of the datapath fixtures: the real XDP object with its maps filled by the daemon's
//! code, and the packet builder.

#[cfg(feature = "datapath")]
pub mod datapath;
pub mod http;
pub mod netns;
pub mod process;
pub mod scratch;
pub mod topology;

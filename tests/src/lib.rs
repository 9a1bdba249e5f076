//! Test support for the tiers that need root: network namespaces, the demo topology, real
//! HTTP servers and clients, a real DNS server, and the real `balancer` binary. Used by the
//! integration tests in `tests/tests/` and by `cargo xtask demo`.
//!
//! With the `datapath` feature (on for the tests and the benchmark, see Cargo.toml), also the
//! world of the datapath fixtures: the real XDP object with its maps filled by the daemon's
//! code, and the packet builder.
#![cfg_attr(
    test,
    allow(
        unused_crate_dependencies,
        reason = "the library's own unit-test build gets the dev-dependencies of the test targets"
    )
)]
#![allow(
    clippy::too_many_lines,
    reason = "topologies and scenarios read top to bottom; the 80-line rule is the daemon's"
)]

pub mod bird;
#[cfg(feature = "datapath")]
pub mod datapath;
pub mod dns;
pub mod fleet;
pub mod http;
pub mod netns;
#[cfg(feature = "datapath")]
pub mod prediction;
pub mod process;
pub mod scratch;
pub mod topology;

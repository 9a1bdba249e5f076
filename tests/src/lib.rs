//! Test support for the tiers that need root: network namespaces, the demo topology, real
//! HTTP servers and clients, and the real `balancer` binary. Used by the integration tests in
//! `tests/tests/` and by `cargo xtask demo`.

pub mod http;
pub mod netns;
pub mod process;
pub mod scratch;
pub mod topology;

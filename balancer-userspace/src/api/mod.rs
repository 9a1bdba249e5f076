//! What the daemon shows and what it accepts from outside, apart from packets:
//! - [`http`]: the read-only HTTP API (`/metrics`, `/api/v1/status`) over published snapshots;
//! - [`connections`]: its accept loop, with a cap on connections and timeouts;
//! - [`metrics`]: the OpenMetrics exposition of a snapshot;
//! - [`status`]: the typed status document, shared by the daemon and the CLI;
//! - [`table`]: the CLI's table of a status document;
//! - [`client`]: the CLI's HTTP client for the status document;
//! - [`control`]: the control socket for write actions (reload), server and client.

pub mod client;
pub mod connections;
pub mod control;
pub mod http;
pub mod metrics;
#[cfg(test)]
mod sample;
pub mod status;
pub mod table;

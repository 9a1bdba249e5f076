//! From what the operator wants to what the kernel must do, computed without a kernel:
//! - [`desired`]: the validated config, the next hops, the health verdicts and the stable ids
//!   give the exact contents the maps must hold ([`desired::DesiredState`]);
//! - [`ops`]: the ordered map operations that take the maps from what they hold to that, in an
//!   order that never shows a packet a half-written state;
//! - [`contents`]: what the maps hold (or are to hold) and what their counters say, by id;
//! - [`ids`]: the ids of VIPs and backends, stable across changes;
//! - [`inputs`]: what the planner works from besides the config (next hops, health).

pub mod contents;
pub mod desired;
pub mod ids;
pub mod inputs;
pub mod ops;

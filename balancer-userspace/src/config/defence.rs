//! The defences' settings, checked: `[flood]` (the per-CPU cap on new flows with state, and
//! the pending tables' size) and a VIP's `source_limit`.

use std::ops::RangeInclusive;

use toml::Spanned;

use crate::config::{
    model::{Flood, SourceLimitConfig, MAX_CONN_TABLE_SIZE, MIN_CONN_TABLE_SIZE},
    raw::{Invalid, RawFlood, RawSourceLimit},
};

/// Default cap: new flows with state per CPU per second. A CPU that forwards at line rate
/// handles several million packets a second; this many inserts into the shared LRU tables
/// stay a small part of that, and a table of the default size takes over five seconds of
/// two CPUs at the cap to turn over.
pub const DEFAULT_NEW_FLOWS_PER_CPU: u32 = 25_000;
pub const NEW_FLOWS_PER_CPU_RANGE: RangeInclusive<u32> = 100..=10_000_000;
/// The pending tables' default size: a quarter of the connection table's, at least this.
pub const MIN_PENDING_TABLE_SIZE: u32 = MIN_CONN_TABLE_SIZE;
pub const SOURCE_RATE_RANGE: RangeInclusive<u32> = 1..=10_000_000;
pub const DEFAULT_IPV4_PREFIX: u8 = 24;
pub const DEFAULT_IPV6_PREFIX: u8 = 56;

/// `[flood]`, with its defaults when absent.
pub(super) fn flood(
    raw: Option<&Spanned<RawFlood>>,
    conn_table_size: u32,
) -> Result<Flood, Invalid> {
    let default_pending = (conn_table_size / 4).max(MIN_PENDING_TABLE_SIZE);
    let Some(raw) = raw else {
        return Ok(Flood {
            new_flows_per_cpu: DEFAULT_NEW_FLOWS_PER_CPU,
            pending_table_size: default_pending,
        });
    };
    let raw = raw.get_ref();
    let new_flows_per_cpu = within(
        raw.new_flows_per_cpu.as_ref(),
        DEFAULT_NEW_FLOWS_PER_CPU,
        NEW_FLOWS_PER_CPU_RANGE,
        "flood new_flows_per_cpu",
        "new flows per CPU per second",
    )?;
    let pending_table_size = within(
        raw.pending_table_size.as_ref(),
        default_pending,
        MIN_PENDING_TABLE_SIZE..=MAX_CONN_TABLE_SIZE,
        "flood pending_table_size",
        "flows",
    )?;
    Ok(Flood {
        new_flows_per_cpu,
        pending_table_size,
    })
}

/// A VIP's `source_limit`, if any.
pub(super) fn source_limit(
    raw: Option<&Spanned<RawSourceLimit>>,
    vip: &str,
) -> Result<Option<SourceLimitConfig>, Invalid> {
    let Some(raw) = raw else { return Ok(None) };
    let raw = raw.get_ref();
    let what = |key: &str| format!("VIP \"{vip}\": source_limit {key}");
    let rate = within(
        Some(&raw.rate),
        0,
        SOURCE_RATE_RANGE,
        &what("rate"),
        "new flows per second",
    )?;
    // A second's worth by default: a client that opens its connections in a burst (a
    // browser's six, a pool's twenty) is not held back below its rate.
    let burst = within(
        raw.burst.as_ref(),
        rate,
        SOURCE_RATE_RANGE,
        &what("burst"),
        "new flows",
    )?;
    let ipv4_prefix = within(
        raw.ipv4_prefix.as_ref(),
        DEFAULT_IPV4_PREFIX,
        1..=32,
        &what("ipv4_prefix"),
        "bits",
    )?;
    let ipv6_prefix = within(
        raw.ipv6_prefix.as_ref(),
        DEFAULT_IPV6_PREFIX,
        1..=128,
        &what("ipv6_prefix"),
        "bits",
    )?;
    Ok(Some(SourceLimitConfig {
        rate,
        burst,
        ipv4_prefix,
        ipv6_prefix,
    }))
}

/// `value` (or `default` when absent), checked against `range`.
fn within<T>(
    value: Option<&Spanned<T>>,
    default: T,
    range: RangeInclusive<T>,
    key: &str,
    unit: &str,
) -> Result<T, Invalid>
where
    T: Copy + PartialOrd + std::fmt::Display,
{
    let Some(value) = value else {
        return Ok(default);
    };
    let v = *value.get_ref();
    if !range.contains(&v) {
        return Err((
            value.span(),
            format!(
                "{key} {v} is out of range: use {} to {} {unit}",
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(v)
}

//! The `health` tables of the config: a VIP's, and a backend's overrides of it.

use std::{ops::Range, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::{Invalid, Protocol};

/// Defaults of a health check.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
pub const DEFAULT_HTTP_STATUS: (u16, u16) = (200, 399);

/// A backend's health check, with the VIP's settings, the backend's overrides and the
/// defaults resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: CheckKind,
    /// Port probed on the backend's address (0 for kind `none`).
    pub port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// State of a backend before its first verdict.
    pub initial: InitialState,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CheckKind {
    /// No checks: the backend is always up.
    None,
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 GET whose status must fall in `status` (inclusive).
    Http {
        path: String,
        host: Option<String>,
        status: (u16, u16),
    },
}

impl CheckKind {
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::None => "none",
            CheckKind::Tcp => "tcp",
            CheckKind::Http { .. } => "http",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InitialState {
    #[default]
    Up,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawKind {
    None,
    Tcp,
    Http,
}

/// A `health` table as written; every key optional so that a backend can override any subset.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    kind: Option<Spanned<RawKind>>,
    port: Option<Spanned<u16>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<u32>>,
    fall: Option<Spanned<u32>>,
    initial: Option<InitialState>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    status: Option<Spanned<String>>,
}

impl RawHealth {
    /// This table with `overrides` laid over it, key by key.
    /// When the override names a `kind`, the HTTP-only keys (path, host, status) come from the
    /// override alone: a backend checked with TCP does not inherit the VIP's HTTP path.
    pub(super) fn overridden_by(&self, overrides: &RawHealth) -> RawHealth {
        let o = overrides.clone();
        let mut s = self.clone();
        if o.kind.is_some() {
            s.path = None;
            s.host = None;
            s.status = None;
        }
        RawHealth {
            kind: o.kind.or(s.kind),
            port: o.port.or(s.port),
            interval: o.interval.or(s.interval),
            timeout: o.timeout.or(s.timeout),
            rise: o.rise.or(s.rise),
            fall: o.fall.or(s.fall),
            initial: o.initial.or(s.initial),
            path: o.path.or(s.path),
            host: o.host.or(s.host),
            status: o.status.or(s.status),
        }
    }
}

/// Resolves a (merged) `health` table. `present` says whether any table was written at all:
/// without one, TCP VIPs with a port get a TCP check of that port and the others none.
pub(super) fn resolve(
    raw: &RawHealth,
    present: bool,
    protocol: Protocol,
    vip_port: Option<u16>,
    where_: &str,
    span: Range<usize>,
) -> Result<HealthCheck, Invalid> {
    let kind = match &raw.kind {
        Some(k) => *k.get_ref(),
        None if present || (protocol == Protocol::Tcp && vip_port.is_some()) => RawKind::Tcp,
        None => RawKind::None,
    };
    let kind_span = raw.kind.as_ref().map_or(span.clone(), |k| k.span());

    let duration = |value: &Option<Spanned<String>>,
                    default: Duration,
                    key: &str|
     -> Result<Duration, Invalid> {
        match value {
            None => Ok(default),
            Some(v) => parse_duration(v.get_ref())
                .map_err(|e| (v.span(), format!("{where_}: health {key} {e}"))),
        }
    };
    let interval = duration(&raw.interval, DEFAULT_INTERVAL, "interval")?;
    let timeout = duration(&raw.timeout, DEFAULT_TIMEOUT, "timeout")?;
    let interval_span = raw.interval.as_ref().map_or(span.clone(), |v| v.span());
    if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&interval) {
        return Err((
            interval_span,
            format!("{where_}: health interval must be from 100ms to 1h"),
        ));
    }
    let timeout_span = raw.timeout.as_ref().map_or(span.clone(), |v| v.span());
    if timeout < Duration::from_millis(10) || timeout > interval {
        return Err((
            timeout_span,
            format!("{where_}: health timeout must be at least 10ms and no longer than the interval ({interval:?})"),
        ));
    }
    let count = |value: &Option<Spanned<u32>>, default: u32, key: &str| -> Result<u32, Invalid> {
        match value {
            None => Ok(default),
            Some(v) if (1..=100).contains(v.get_ref()) => Ok(*v.get_ref()),
            Some(v) => Err((
                v.span(),
                format!("{where_}: health {key} must be from 1 to 100"),
            )),
        }
    };
    let rise = count(&raw.rise, DEFAULT_RISE, "rise")?;
    let fall = count(&raw.fall, DEFAULT_FALL, "fall")?;

    if kind != RawKind::Http {
        for (key, value) in [
            ("path", &raw.path),
            ("host", &raw.host),
            ("status", &raw.status),
        ] {
            if let Some(v) = value {
                return Err((
                    v.span(),
                    format!("{where_}: health {key} only applies to kind = \"http\""),
                ));
            }
        }
    }

    let port = match (kind, &raw.port) {
        (RawKind::None, _) => 0,
        (_, Some(p)) if *p.get_ref() == 0 => {
            return Err((
                p.span(),
                format!("{where_}: health port must be from 1 to 65535"),
            ))
        }
        (_, Some(p)) => *p.get_ref(),
        (_, None) if protocol == Protocol::Udp => {
            return Err((
                kind_span,
                format!(
                    "{where_}: a {} check of a UDP VIP needs an explicit TCP `port`",
                    kind_name(kind)
                ),
            ))
        }
        (_, None) => vip_port.ok_or_else(|| {
            (
                kind_span.clone(),
                format!("{where_}: the VIP has no port (\"any\"): set the health check's `port`"),
            )
        })?,
    };

    let kind = match kind {
        RawKind::None => CheckKind::None,
        RawKind::Tcp => CheckKind::Tcp,
        RawKind::Http => {
            let path = match &raw.path {
                None => "/".to_owned(),
                Some(p)
                    if p.get_ref().starts_with('/')
                        && !has_control(p.get_ref())
                        && !p.get_ref().contains(' ') =>
                {
                    p.get_ref().clone()
                }
                Some(p) => {
                    return Err((
                        p.span(),
                        format!("{where_}: health path must start with '/' and hold no spaces"),
                    ))
                }
            };
            let host = match &raw.host {
                None => None,
                Some(h)
                    if !h.get_ref().is_empty()
                        && !has_control(h.get_ref())
                        && !h.get_ref().contains(' ') =>
                {
                    Some(h.get_ref().clone())
                }
                Some(h) => {
                    return Err((
                        h.span(),
                        format!("{where_}: health host must be a non-empty name without spaces"),
                    ))
                }
            };
            let status = match &raw.status {
                None => DEFAULT_HTTP_STATUS,
                Some(s) => parse_status_range(s.get_ref())
                    .map_err(|e| (s.span(), format!("{where_}: health status {e}")))?,
            };
            CheckKind::Http { path, host, status }
        }
    };
    Ok(HealthCheck {
        kind,
        port,
        interval,
        timeout,
        rise,
        fall,
        initial: raw.initial.unwrap_or_default(),
    })
}

fn kind_name(kind: RawKind) -> &'static str {
    match kind {
        RawKind::None => "none",
        RawKind::Tcp => "tcp",
        RawKind::Http => "http",
    }
}

fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

/// `"250ms"`, `"2s"`, `"5m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits = text.chars().take_while(char::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("\"{text}\" is not a duration such as \"500ms\", \"2s\", \"5m\""))?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value.saturating_mul(60)),
        "h" => Duration::from_secs(value.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "\"{text}\" is not a duration such as \"500ms\", \"2s\", \"5m\""
            ))
        }
    };
    Ok(duration)
}

/// `"200-399"` or `"204"`.
fn parse_status_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || format!("\"{text}\" is not a status code or range such as \"200-399\"");
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (
            lo.trim().parse::<u16>().map_err(|_| bad())?,
            hi.trim().parse::<u16>().map_err(|_| bad())?,
        ),
        None => {
            let code = text.trim().parse::<u16>().map_err(|_| bad())?;
            (code, code)
        }
    };
    if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "2", "s", "2 s", "1.5s", "-1s", "2sec"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn status_ranges() {
        assert_eq!(parse_status_range("200-399"), Ok((200, 399)));
        assert_eq!(parse_status_range("204"), Ok((204, 204)));
        for bad in ["", "99", "600", "300-200", "2xx", "200-"] {
            assert!(parse_status_range(bad).is_err(), "{bad:?}");
        }
    }
}

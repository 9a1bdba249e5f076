//! The `health` tables of the config, a VIP's and a backend's overrides of it, checked and
//! resolved into a [`HealthCheck`] with the defaults filled in.

use std::{ops::Range, time::Duration};

use hyper::http::{uri::PathAndQuery, HeaderValue};
use toml::Spanned;

use crate::config::{
    model::{
        CheckKind, HealthCheck, Protocol, DEFAULT_FALL, DEFAULT_HTTP_STATUS, DEFAULT_INTERVAL,
        DEFAULT_RISE, DEFAULT_TIMEOUT,
    },
    raw::{Invalid, RawHealth, RawKind},
};

/// Where a health table applies, for error messages and defaults.
pub(super) struct Scope<'a> {
    /// `VIP "web", backend 10.0.0.1`.
    pub name: &'a str,
    pub protocol: Protocol,
    /// The port a check probes when its table names none: the backend's own under NAT
    /// (`BackendConfig::port`), else the VIP's (`None`: any port, nothing to lend).
    pub default_port: Option<u16>,
    /// Where to point at when no value of the table is to blame.
    pub span: Range<usize>,
}

/// Resolves a (merged) `health` table. `present` says whether any table was written at all:
/// without one, TCP VIPs with a port (or NAT VIPs whose backends have one) get a TCP check of
/// that port and the others none.
pub(super) fn resolve(
    raw: &RawHealth,
    present: bool,
    scope: &Scope,
) -> Result<HealthCheck, Invalid> {
    let kind = match &raw.kind {
        Some(k) => *k.get_ref(),
        None if present || (scope.protocol == Protocol::Tcp && scope.default_port.is_some()) => {
            RawKind::Tcp
        }
        None => RawKind::None,
    };
    let (interval, timeout) = timing(raw, scope)?;
    let rise = count(&raw.rise, DEFAULT_RISE, "rise", scope)?;
    let fall = count(&raw.fall, DEFAULT_FALL, "fall", scope)?;
    if kind != RawKind::Http {
        for (key, value) in [
            ("path", &raw.path),
            ("host", &raw.host),
            ("status", &raw.status),
        ] {
            if let Some(v) = value {
                let message = format!(
                    "{}: health {key} only applies to kind = \"http\"",
                    scope.name
                );
                return Err((v.span(), message));
            }
        }
    }
    Ok(HealthCheck {
        port: port(raw, kind, scope)?,
        kind: check_kind(raw, kind, scope)?,
        interval,
        timeout,
        rise,
        fall,
        initial: raw.initial.unwrap_or_default(),
    })
}

/// The interval (100ms to 1h) and the timeout (10ms up to the interval).
fn timing(raw: &RawHealth, scope: &Scope) -> Result<(Duration, Duration), Invalid> {
    let duration = |value: &Option<Spanned<String>>, default: Duration, key: &str| match value {
        None => Ok(default),
        Some(v) => parse_duration(v.get_ref())
            .map_err(|e| (v.span(), format!("{}: health {key} {e}", scope.name))),
    };
    let span_of =
        |value: &Option<Spanned<String>>| value.as_ref().map_or(scope.span.clone(), |v| v.span());
    let interval = duration(&raw.interval, DEFAULT_INTERVAL, "interval")?;
    let timeout = duration(&raw.timeout, DEFAULT_TIMEOUT, "timeout")?;
    if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&interval) {
        let message = format!("{}: health interval must be from 100ms to 1h", scope.name);
        return Err((span_of(&raw.interval), message));
    }
    if timeout < Duration::from_millis(10) || timeout > interval {
        let message = format!(
            "{}: health timeout must be at least 10ms and no longer than the interval ({interval:?})",
            scope.name
        );
        return Err((span_of(&raw.timeout), message));
    }
    Ok((interval, timeout))
}

/// `rise` or `fall`: 1 to 100.
fn count(
    value: &Option<Spanned<u32>>,
    default: u32,
    key: &str,
    scope: &Scope,
) -> Result<u32, Invalid> {
    match value {
        None => Ok(default),
        Some(v) if (1..=100).contains(v.get_ref()) => Ok(*v.get_ref()),
        Some(v) => Err((
            v.span(),
            format!("{}: health {key} must be from 1 to 100", scope.name),
        )),
    }
}

/// The port probed: the check's own, else the backend's (NAT) or the VIP's (a UDP or any-port
/// VIP has none to lend).
fn port(raw: &RawHealth, kind: RawKind, scope: &Scope) -> Result<u16, Invalid> {
    let kind_span = raw.kind.as_ref().map_or(scope.span.clone(), |k| k.span());
    match (kind, &raw.port) {
        (RawKind::None, _) => Ok(0),
        (_, Some(p)) if *p.get_ref() == 0 => Err((
            p.span(),
            format!("{}: health port must be from 1 to 65535", scope.name),
        )),
        (_, Some(p)) => Ok(*p.get_ref()),
        (_, None) if scope.protocol == Protocol::Udp => Err((
            kind_span,
            format!(
                "{}: a {} check of a UDP VIP needs an explicit TCP `port`",
                scope.name,
                kind_name(kind)
            ),
        )),
        (_, None) => scope.default_port.ok_or_else(|| {
            (
                kind_span,
                format!(
                    "{}: the VIP has no port (\"any\"): set the health check's `port`",
                    scope.name
                ),
            )
        }),
    }
}

/// The kind, with an HTTP check's path, host and status range checked.
fn check_kind(raw: &RawHealth, kind: RawKind, scope: &Scope) -> Result<CheckKind, Invalid> {
    Ok(match kind {
        RawKind::None => CheckKind::None,
        RawKind::Tcp => CheckKind::Tcp,
        RawKind::Http => CheckKind::Http {
            path: http_path(raw, scope)?,
            host: http_host(raw, scope)?,
            status: match &raw.status {
                None => DEFAULT_HTTP_STATUS,
                Some(s) => parse_status_range(s.get_ref())
                    .map_err(|e| (s.span(), format!("{}: health status {e}", scope.name)))?,
            },
        },
    })
}

/// An absolute path (and query) that an HTTP request line can carry.
fn http_path(raw: &RawHealth, scope: &Scope) -> Result<String, Invalid> {
    let Some(p) = &raw.path else {
        return Ok("/".to_owned());
    };
    let text = p.get_ref();
    if text.starts_with('/')
        && !has_control(text)
        && !text.contains(' ')
        && text.parse::<PathAndQuery>().is_ok()
    {
        return Ok(text.clone());
    }
    Err((
        p.span(),
        format!(
            "{}: health path must start with '/' and hold no spaces or characters a URL cannot carry",
            scope.name
        ),
    ))
}

fn http_host(raw: &RawHealth, scope: &Scope) -> Result<Option<String>, Invalid> {
    match &raw.host {
        None => Ok(None),
        Some(h)
            if !h.get_ref().is_empty()
                && !h.get_ref().contains(' ')
                && HeaderValue::from_str(h.get_ref()).is_ok() =>
        {
            Ok(Some(h.get_ref().clone()))
        }
        Some(h) => Err((
            h.span(),
            format!(
                "{}: health host must be a non-empty name without spaces",
                scope.name
            ),
        )),
    }
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

//! Health checks: probes (TCP connect, HTTP GET), the rise/fall state machine, and the timing
//! of probes (jittered, so that many backends are not probed in lock-step).
//!
//! The state machine and the timing are pure and unit-tested; the probes are small async
//! functions, each bounded by its timeout.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::config::{CheckKind, HealthCheck, InitialState};

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeFailure {
    /// The connection was refused (nothing listens on the port).
    Refused,
    /// No answer within the timeout.
    Timeout,
    /// HTTP status outside the expected range.
    Status(u16),
    /// Anything else: unreachable network, reset, malformed response...
    Error(String),
}

impl fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeFailure::Refused => f.write_str("connection refused"),
            ProbeFailure::Timeout => f.write_str("timeout"),
            ProbeFailure::Status(code) => write!(f, "status {code}"),
            ProbeFailure::Error(e) => f.write_str(e),
        }
    }
}

pub type ProbeResult = Result<(), ProbeFailure>;

impl ProbeFailure {
    /// The kind of failure, a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            ProbeFailure::Refused => "refused",
            ProbeFailure::Timeout => "timeout",
            ProbeFailure::Status(_) => "status",
            ProbeFailure::Error(_) => "error",
        }
    }
}

/// Upper bounds (seconds) of the probe duration histogram's buckets.
pub const PROBE_BUCKETS: [f64; 9] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5];

/// A histogram of probe durations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Count of observations at or below each bound of `PROBE_BUCKETS` (cumulative).
    pub buckets: [u64; PROBE_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (bound, bucket) in PROBE_BUCKETS.iter().zip(self.buckets.iter_mut()) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// A backend's verdict so far.
#[derive(Clone, Debug, PartialEq)]
pub struct Tracker {
    pub up: bool,
    successes: u32,
    failures: u32,
    /// The last failure, for status and logs.
    pub last_failure: Option<ProbeFailure>,
    /// Probes run so far.
    pub probes: u64,
    /// Failed probes by `ProbeFailure::kind`.
    pub failures_by_kind: std::collections::BTreeMap<&'static str, u64>,
    pub durations: Histogram,
}

/// A change of verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub up: bool,
    /// For a transition to down: the failure that made it.
    pub reason: Option<ProbeFailure>,
    /// How many probes in a row led to it.
    pub streak: u32,
}

impl Tracker {
    pub fn new(initial: InitialState) -> Tracker {
        Tracker {
            up: initial == InitialState::Up,
            successes: 0,
            failures: 0,
            last_failure: None,
            probes: 0,
            failures_by_kind: Default::default(),
            durations: Histogram::default(),
        }
    }

    /// Records a probe's result; returns the transition if this result changed the verdict:
    /// `fall` failures in a row take an up backend down, `rise` successes in a row bring a
    /// down backend up.
    pub fn record(&mut self, result: &ProbeResult, rise: u32, fall: u32) -> Option<Transition> {
        self.probes += 1;
        match result {
            Ok(()) => {
                self.successes += 1;
                self.failures = 0;
                if !self.up && self.successes >= rise {
                    self.up = true;
                    return Some(Transition {
                        up: true,
                        reason: None,
                        streak: self.successes,
                    });
                }
            }
            Err(failure) => {
                *self.failures_by_kind.entry(failure.kind()).or_default() += 1;
                self.failures += 1;
                self.successes = 0;
                self.last_failure = Some(failure.clone());
                if self.up && self.failures >= fall {
                    self.up = false;
                    return Some(Transition {
                        up: false,
                        reason: Some(failure.clone()),
                        streak: self.failures,
                    });
                }
            }
        }
        None
    }
}

/// Jitter applied to every interval: +-10%.
pub const JITTER: f64 = 0.10;

/// Delay before a backend's first probe: anywhere in `[0, interval)`, so that backends
/// configured together are not probed together. `unit` is a random number in `[0, 1)`.
pub fn first_delay(interval: Duration, unit: f64) -> Duration {
    interval.mul_f64(unit.clamp(0.0, 0.999_999))
}

/// Delay between two probes: the interval +-10%. `unit` is a random number in `[0, 1)`.
pub fn next_delay(interval: Duration, unit: f64) -> Duration {
    interval.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit.clamp(0.0, 1.0))
}

/// Runs one probe of `check` against `address`, bounded by the check's timeout.
pub async fn probe(address: IpAddr, check: &HealthCheck) -> ProbeResult {
    let target = SocketAddr::new(address, check.port);
    match tokio::time::timeout(check.timeout, probe_unbounded(target, &check.kind)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeFailure::Timeout),
    }
}

async fn probe_unbounded(target: SocketAddr, kind: &CheckKind) -> ProbeResult {
    match kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => connect(target).await.map(drop),
        CheckKind::Http { path, host, status } => {
            let mut stream = connect(target).await?;
            let host = host.clone().unwrap_or_else(|| target.to_string());
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: balancer-health-check\r\nConnection: close\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(io_failure)?;
            // The status line is all we need: read until its end (or 1 KiB).
            let mut head = Vec::with_capacity(256);
            let mut buf = [0u8; 256];
            while !head.contains(&b'\n') && head.len() < 1024 {
                let n = stream.read(&mut buf).await.map_err(io_failure)?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let code = parse_status_line(&head)?;
            if (status.0..=status.1).contains(&code) {
                Ok(())
            } else {
                Err(ProbeFailure::Status(code))
            }
        }
    }
}

async fn connect(target: SocketAddr) -> Result<TcpStream, ProbeFailure> {
    TcpStream::connect(target).await.map_err(io_failure)
}

fn io_failure(e: std::io::Error) -> ProbeFailure {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => ProbeFailure::Refused,
        std::io::ErrorKind::TimedOut => ProbeFailure::Timeout,
        _ => ProbeFailure::Error(e.to_string()),
    }
}

/// The status code of `HTTP/1.x NNN ...`.
fn parse_status_line(head: &[u8]) -> Result<u16, ProbeFailure> {
    let line = String::from_utf8_lossy(head);
    let line = line.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => Ok(code),
        _ => Err(ProbeFailure::Error(format!(
            "not an HTTP response: {:?}",
            line.chars().take(40).collect::<String>()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail() -> ProbeResult {
        Err(ProbeFailure::Refused)
    }

    #[test]
    fn falls_after_fall_failures_in_a_row() {
        let mut t = Tracker::new(InitialState::Up);
        assert_eq!(t.record(&fail(), 2, 3), None);
        assert_eq!(t.record(&fail(), 2, 3), None);
        // A success in between resets the count.
        assert_eq!(t.record(&Ok(()), 2, 3), None);
        assert_eq!(t.record(&fail(), 2, 3), None);
        assert_eq!(t.record(&fail(), 2, 3), None);
        let down = t
            .record(&Err(ProbeFailure::Timeout), 2, 3)
            .expect("third failure in a row");
        assert_eq!(
            down,
            Transition {
                up: false,
                reason: Some(ProbeFailure::Timeout),
                streak: 3
            }
        );
        assert!(!t.up);
        // Further failures are no new transition: logged once per transition.
        assert_eq!(t.record(&fail(), 2, 3), None);
        assert_eq!(t.probes, 7);
    }

    #[test]
    fn rises_after_rise_successes_in_a_row() {
        let mut t = Tracker::new(InitialState::Down);
        assert!(!t.up);
        assert_eq!(t.record(&Ok(()), 2, 3), None);
        assert_eq!(t.record(&fail(), 2, 3), None, "a failure resets the count");
        assert_eq!(t.record(&Ok(()), 2, 3), None);
        assert_eq!(
            t.record(&Ok(()), 2, 3),
            Some(Transition {
                up: true,
                reason: None,
                streak: 2
            })
        );
        assert_eq!(t.record(&Ok(()), 2, 3), None);
        assert!(t.up);
    }

    #[test]
    fn rise_and_fall_of_one_flip_on_every_change() {
        let mut t = Tracker::new(InitialState::Up);
        assert!(t.record(&fail(), 1, 1).is_some());
        assert!(t.record(&Ok(()), 1, 1).is_some());
        assert!(t.record(&Ok(()), 1, 1).is_none());
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let interval = Duration::from_millis(1000);
        for i in 0..=1000 {
            let unit = i as f64 / 1000.0;
            let first = first_delay(interval, unit);
            assert!(first < interval, "{first:?}");
            let next = next_delay(interval, unit);
            assert!(
                next >= Duration::from_millis(900) && next <= Duration::from_millis(1100),
                "{next:?}"
            );
        }
        assert_eq!(first_delay(interval, 0.0), Duration::ZERO);
        assert_eq!(next_delay(interval, 0.5), interval);
        // Out-of-range randomness is clamped, not trusted.
        assert!(next_delay(interval, 7.0) <= Duration::from_millis(1100));
        assert!(first_delay(interval, -1.0) == Duration::ZERO);
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Ok(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.0 200 OK\r\n"), Ok(200));
        assert!(parse_status_line(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_status_line(b"").is_err());
    }

    /// Real probes against real sockets on loopback: refused, accepted, timed out (a listener
    /// that never answers HTTP), and HTTP statuses inside and outside the range.
    #[tokio::test]
    async fn probes_against_real_sockets() {
        use tokio::net::TcpListener;
        let check = |kind: CheckKind, port: u16| HealthCheck {
            kind,
            port,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(300),
            rise: 1,
            fall: 1,
            initial: InitialState::Up,
        };
        let lo: IpAddr = "127.0.0.1".parse().unwrap();

        // Refused: bind, learn the port, close.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert_eq!(
            probe(lo, &check(CheckKind::Tcp, closed)).await,
            Err(ProbeFailure::Refused)
        );

        // Accepted (the kernel completes the handshake before accept()).
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        assert_eq!(probe(lo, &check(CheckKind::Tcp, port)).await, Ok(()));

        // HTTP against a listener that never answers: the timeout bounds the probe.
        let http = |status| CheckKind::Http {
            path: "/healthz".into(),
            host: Some("svc".into()),
            status,
        };
        let started = std::time::Instant::now();
        assert_eq!(
            probe(lo, &check(http((200, 399)), port)).await,
            Err(ProbeFailure::Timeout)
        );
        assert!(started.elapsed() < Duration::from_millis(600));

        // HTTP servers answering 200 and 503; the request carries the path and Host.
        for (code, range, expected) in [
            (200u16, (200u16, 399u16), Ok(())),
            (503, (200, 399), Err(ProbeFailure::Status(503))),
            (503, (500, 503), Ok(())),
        ] {
            let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = server.local_addr().unwrap().port();
            let answer = tokio::spawn(async move {
                let (mut s, _) = server.accept().await.unwrap();
                let mut req = vec![0u8; 1024];
                let n = s.read(&mut req).await.unwrap();
                let req = String::from_utf8_lossy(&req[..n]).into_owned();
                s.write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                req
            });
            assert_eq!(probe(lo, &check(http(range), port)).await, expected);
            let req = answer.await.unwrap();
            assert!(req.starts_with("GET /healthz HTTP/1.1\r\n"), "{req}");
            assert!(req.contains("\r\nHost: svc\r\n"), "{req}");
        }
    }
}

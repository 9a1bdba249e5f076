//! Health probes: a TCP connect, or an HTTP/1.1 GET whose status is checked (hyper's client,
//! one connection per probe, nothing read past the status). Each probe is bounded by its
//! timeout; when the timeout fires, the connection is dropped with the probe.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{
    header::{CONNECTION, HOST, USER_AGENT},
    Request,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::{
    config::{CheckKind, HealthCheck},
    core::health::{ProbeFailure, ProbeResult},
};

/// Runs one probe of `check` against `address`, bounded by the check's timeout.
pub async fn probe(address: IpAddr, check: &HealthCheck) -> ProbeResult {
    let target = SocketAddr::new(address, check.port);
    match tokio::time::timeout(check.timeout, unbounded(target, &check.kind)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeFailure::Timeout),
    }
}

async fn unbounded(target: SocketAddr, kind: &CheckKind) -> ProbeResult {
    match kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => connect(target).await.map(drop),
        CheckKind::Http { path, host, status } => {
            let code = http_status(target, path, host.as_deref()).await?;
            if (status.0..=status.1).contains(&code) {
                Ok(())
            } else {
                Err(ProbeFailure::Status(code))
            }
        }
    }
}

/// The status code of `GET path` on a new connection to `target`.
async fn http_status(
    target: SocketAddr,
    path: &str,
    host: Option<&str>,
) -> Result<u16, ProbeFailure> {
    let stream = connect(target).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_failure)?;
    let host = host.map_or_else(|| target.to_string(), str::to_owned);
    let request = Request::get(path)
        .header(HOST, host)
        .header(USER_AGENT, "balancer-health-check")
        .header(CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProbeFailure::Error(format!("the request for {path:?}: {e}")))?;
    // The connection is driven here, not in a task of its own: dropping the probe (its
    // timeout) drops the connection too.
    let response = sender.send_request(request);
    tokio::pin!(connection, response);
    let answer = tokio::select! {
        biased;
        answer = &mut response => answer,
        ended = &mut connection => match ended {
            Err(e) => Err(e),
            // Closed by the server: its answer, if it sent one, is in already.
            Ok(()) => response.await,
        },
    };
    answer.map(|r| r.status().as_u16()).map_err(http_failure)
}

async fn connect(target: SocketAddr) -> Result<TcpStream, ProbeFailure> {
    TcpStream::connect(target).await.map_err(io_failure)
}

fn io_failure(e: std::io::Error) -> ProbeFailure {
    // This host's shortage, not the backend's failure: no descriptor, buffer, memory or
    // local port for the probe.
    let local = [
        libc::EMFILE,
        libc::ENFILE,
        libc::ENOBUFS,
        libc::ENOMEM,
        libc::EADDRNOTAVAIL,
    ];
    if e.raw_os_error().is_some_and(|code| local.contains(&code)) {
        return ProbeFailure::Local(e.to_string());
    }
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => ProbeFailure::Refused,
        std::io::ErrorKind::TimedOut => ProbeFailure::Timeout,
        _ => ProbeFailure::Error(e.to_string()),
    }
}

fn http_failure(e: hyper::Error) -> ProbeFailure {
    if e.is_parse() {
        return ProbeFailure::Error(format!("not an HTTP response ({e})"));
    }
    match std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>()) {
        Some(io) => ProbeFailure::Error(format!("{e}: {io}")),
        None => ProbeFailure::Error(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;
    use crate::config::InitialState;

    fn check(kind: CheckKind, port: u16) -> HealthCheck {
        HealthCheck {
            kind,
            port,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(300),
            rise: 1,
            fall: 1,
            initial: InitialState::Up,
        }
    }

    fn http(status: (u16, u16)) -> CheckKind {
        CheckKind::Http {
            path: "/healthz".into(),
            host: Some("svc".into()),
            status,
        }
    }

    /// A server that answers one connection with `answer` and returns the request it read.
    async fn answer_once(answer: &'static [u8]) -> (u16, tokio::task::JoinHandle<String>) {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut req = vec![0u8; 1024];
            let n = s.read(&mut req).await.unwrap();
            s.write_all(answer).await.unwrap();
            String::from_utf8_lossy(&req[..n]).into_owned()
        });
        (port, task)
    }

    /// Real probes against real sockets on loopback: refused, accepted, timed out (a listener
    /// that never answers HTTP), HTTP statuses inside and outside the range, and a server that
    /// does not speak HTTP.
    #[tokio::test]
    async fn probes_against_real_sockets() {
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
        let started = std::time::Instant::now();
        assert_eq!(
            probe(lo, &check(http((200, 399)), port)).await,
            Err(ProbeFailure::Timeout)
        );
        assert!(started.elapsed() < Duration::from_millis(600));

        // HTTP servers answering 200 and 503; the request carries the path and Host.
        for (answer, range, expected) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..],
                (200u16, 399u16),
                Ok(()),
            ),
            (
                b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n",
                (200, 399),
                Err(ProbeFailure::Status(503)),
            ),
            (
                b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n",
                (500, 503),
                Ok(()),
            ),
            (b"HTTP/1.0 204 No Content\r\n\r\n", (200, 299), Ok(())),
        ] {
            let (port, server) = answer_once(answer).await;
            assert_eq!(probe(lo, &check(http(range), port)).await, expected);
            let req = server.await.unwrap();
            assert!(req.starts_with("GET /healthz HTTP/1.1\r\n"), "{req}");
            assert!(
                req.to_ascii_lowercase().contains("\r\nhost: svc\r\n"),
                "{req}"
            );
        }

        // Not HTTP at all.
        let (port, _server) = answer_once(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        match probe(lo, &check(http((200, 399)), port)).await {
            Err(ProbeFailure::Error(e)) => assert!(e.contains("not an HTTP response"), "{e}"),
            other => panic!("{other:?}"),
        }
        // A server that closes without answering.
        let (port, _server) = answer_once(b"").await;
        assert!(matches!(
            probe(lo, &check(http((200, 399)), port)).await,
            Err(ProbeFailure::Error(_))
        ));
    }
}

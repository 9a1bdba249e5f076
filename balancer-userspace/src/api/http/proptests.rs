//! Property tests of the HTTP API's handling of requests, which anyone who can reach
//! `metrics_listen` may send: any bytes on a connection get an HTTP answer with a status from
//! a known few, or a close, never a crash; a well-formed request gets the status its method
//! and path call for (200 for the two reads, 404 for another path, 405 for another method);
//! and afterwards the API still answers and every connection is closed.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

use super::{router, ApiState};
use crate::{
    api::{
        connections::{serve, ConnectionCounters, Limits},
        sample::sample_snapshot,
        status::Attachment,
    },
    property::{bytes, cases, pick},
};

type Rng = fastrand::Rng;

/// How long an answer may take on a loaded machine.
const SLACK: Duration = Duration::from_secs(5);

/// Statuses the API or hyper may answer anything with: the reads, not found, a method other
/// than GET, and hyper's refusals of malformed requests.
const STATUSES: &[u16] = &[200, 400, 404, 405, 408, 411, 413, 414, 431, 501, 505];

/// The real router over a sample snapshot, served on a loopback port.
async fn start(counters: Arc<ConnectionCounters>) -> SocketAddr {
    let (_, snapshots) = watch::channel(Arc::new(sample_snapshot()));
    let (refresh, _) = mpsc::channel(1);
    let state = ApiState {
        snapshots,
        attachment: Arc::new(Attachment::default()),
        refresh,
        connections: counters.clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let limits = Limits {
        max_connections: 64,
        loopback_reserve: 0,
        idle_timeout: SLACK,
        lifetime: 4 * SLACK,
    };
    tokio::spawn(serve(
        listener,
        router(state),
        limits,
        counters,
        std::future::pending(),
    ));
    address
}

/// A request line and headers, well formed or not, and the status it must get if it is.
fn gen_request(rng: &mut Rng) -> (Vec<u8>, Option<u16>) {
    let method = if rng.bool() {
        *pick(rng, &["GET", "HEAD"])
    } else {
        *pick(
            rng,
            &["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "FOO"],
        )
    };
    let path = if rng.bool() {
        *pick(rng, &["/metrics", "/api/v1/status"])
    } else {
        *pick(
            rng,
            &[
                "/",
                "/api",
                "/api/v1/status/",
                "/metrics/x",
                "//metrics",
                "/Metrics",
            ],
        )
    };
    let query = *pick(rng, &["", "", "?", "?x=1", "?format=json&a=%20"]);
    let mut request = format!("{method} {path}{query} HTTP/1.1\r\nHost: api\r\n");
    for _ in 0..rng.usize(..4) {
        let name = *pick(
            rng,
            &[
                "Accept",
                "X-Thing",
                "User-Agent",
                "Accept-Encoding",
                "Cookie",
            ],
        );
        let value: String = (0..rng.usize(..20)).map(|_| rng.alphanumeric()).collect();
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" || method == "PUT" {
        request.push_str("Content-Length: 2\r\n\r\n{}");
    } else {
        request.push_str("\r\n");
    }
    let reads = ["/metrics", "/api/v1/status"];
    let status = match method {
        "GET" | "HEAD" if reads.contains(&path) => 200,
        "GET" | "HEAD" => 404,
        _ => 405,
    };
    let mut bytes = request.into_bytes();
    match rng.u8(..8) {
        // Well formed.
        0..=3 => (bytes, Some(status)),
        // Cut short: the server sees the end of the connection before the end of the header.
        4 => {
            bytes.truncate(rng.usize(..bytes.len()));
            (bytes, None)
        }
        // Random bytes in it.
        5 | 6 => {
            let at = rng.usize(..=bytes.len());
            let len = rng.usize(1..=8);
            bytes.splice(at..at, self::bytes(rng, len));
            (bytes, None)
        }
        _ => {
            let len = rng.usize(..=600);
            (self::bytes(rng, len), None)
        }
    }
}

/// Sends `request` on a new connection, closes the sending side, and reads until the server
/// closes: what it answered.
async fn exchange(address: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).await.unwrap();
    // The server may close before it has read everything: a failed write is an answer too.
    if stream.write_all(request).await.is_ok() {
        let _ = stream.shutdown().await;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(SLACK, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.expect("the server closes the connection");
    answer
}

/// The status of each answer in `answer` (several when requests were pipelined).
fn statuses(answer: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(answer);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok())
        .collect()
}

/// Any bytes get an answer from the known few, or a close; a well-formed request the answer
/// its method and path call for.
#[tokio::test]
async fn any_request_gets_a_known_answer_or_a_close() {
    let counters = Arc::new(ConnectionCounters::default());
    let address = start(counters.clone()).await;
    for mut case in cases("any_request_gets_a_known_answer_or_a_close", 128) {
        let (request, expected) = gen_request(&mut case.rng);
        let answer = exchange(address, &request).await;
        let shown = String::from_utf8_lossy(&answer);
        let got = statuses(&answer);
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 "),
            "{shown}"
        );
        assert!(got.iter().all(|s| STATUSES.contains(s)), "{shown}");
        if let Some(expected) = expected {
            let request = String::from_utf8_lossy(&request);
            assert_eq!(got.first(), Some(&expected), "{request}\n---\n{shown}");
        }
    }
    // Still serving, and every connection closed.
    let answer = exchange(address, b"GET /api/v1/status HTTP/1.1\r\nHost: api\r\n\r\n").await;
    assert_eq!(statuses(&answer), [200]);
    let deadline = tokio::time::Instant::now() + SLACK;
    while counters.stats().open != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            counters.stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

//! The API served by its accept loop (`api::connections`) on a real loopback listener, with
//! the real router, and real TCP clients: the cap and the loopback reserve, the idle and
//! header timeouts, the lifetime, and shutdown. Timeouts are short here; the lower bounds
//! are exact (a timer never fires early), the upper ones leave room for a loaded machine.

use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{routing::get, Router};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use super::{router, ApiState};
use crate::api::{
    connections::{serve, ConnectionCounters, Limits, SHUTDOWN_GRACE},
    sample::sample_snapshot,
    status::Attachment,
};

/// How late a timeout may fire on a busy machine.
const SLACK: Duration = Duration::from_secs(2);

/// The API served on a loopback port until `stop` is sent or dropped.
struct Served {
    address: SocketAddr,
    counters: Arc<ConnectionCounters>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// The real router over a sample snapshot, counting connections in `counters`, plus `/slow`
/// (never answers) and `/pause` (answers after 300 ms).
fn api(counters: Arc<ConnectionCounters>) -> Router {
    // No publisher: requests answer at once with the snapshot there is.
    let (_, snapshots) = watch::channel(Arc::new(sample_snapshot()));
    let (refresh, _) = mpsc::channel(1);
    let state = ApiState {
        snapshots,
        attachment: Arc::new(Attachment::default()),
        refresh,
        connections: counters,
    };
    router(state)
        .route("/slow", get(std::future::pending::<&'static str>))
        .route(
            "/pause",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "paused\n"
            }),
        )
}

async fn start(limits: Limits) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let counters = Arc::new(ConnectionCounters::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let router = api(counters.clone());
    let task = tokio::spawn(serve(listener, router, limits, counters.clone(), async {
        let _ = stopped.await;
    }));
    Served {
        address,
        counters,
        stop: Some(stop),
        task,
    }
}

fn limits(max_connections: u32, loopback_reserve: u32, idle_timeout: Duration) -> Limits {
    Limits {
        max_connections,
        loopback_reserve,
        idle_timeout,
        lifetime: Duration::from_secs(600),
    }
}

impl Served {
    /// Waits (up to `SLACK`) until the accept loop counts `open` connections.
    async fn wait_open(&self, open: u64) {
        let deadline = Instant::now() + SLACK;
        while self.counters.stats().open != open {
            assert!(
                Instant::now() < deadline,
                "open connections: {:?}, expected {open}",
                self.counters.stats()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.address).await.unwrap()
    }
}

/// Reads until the server closes the connection (EOF or reset): what it sent, and when it
/// closed. Panics if it is still open after `within`.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> (String, Instant) {
    let mut received = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read)
        .await
        .unwrap_or_else(|_| panic!("still open after {within:?}"));
    (
        String::from_utf8_lossy(&received).into_owned(),
        Instant::now(),
    )
}

/// Whether the server left the connection open for `for_` (nothing to read, not closed).
async fn stays_open(stream: &mut TcpStream, for_: Duration) -> bool {
    let mut buf = [0u8; 1];
    tokio::time::timeout(for_, stream.read(&mut buf))
        .await
        .is_err()
}

/// `GET path` on a new connection that asks to be closed after the answer: the answer.
async fn get_once(address: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    until_closed(&mut stream, SLACK).await.0
}

/// Reads one answer with a Content-Length from a kept-alive connection; `None` if the
/// server closed the connection before sending any of it.
async fn read_answer(stream: &mut TcpStream) -> Option<String> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("content-length: ")?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no content-length in {head:?}"));
            if body.len() >= length {
                return Some(text);
            }
        }
        let read = tokio::time::timeout(SLACK, stream.read(&mut buf))
            .await
            .expect("an answer");
        match read {
            Ok(0) | Err(_) if received.is_empty() => return None,
            Ok(0) | Err(_) => panic!("closed before the answer was whole: {text:?}"),
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn over_the_cap_a_connection_is_answered_503_and_closed_at_once() {
    let api = start(limits(4, 2, Duration::from_secs(30))).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(api.connect().await);
    }
    api.wait_open(4).await;
    // Every ordinary slot is taken: a loopback client still gets an answer, from the reserve.
    let answer = get_once(api.address, "/api/v1/status").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("\"config_generation\""), "{answer}");
    for _ in 0..2 {
        idle.push(api.connect().await);
    }
    api.wait_open(6).await;
    // Cap and reserve full: the next one is answered 503 and closed, without waiting for
    // anything, while the six others stay open.
    let mut over = api.connect().await;
    let connected = Instant::now();
    let (answer, closed) = until_closed(&mut over, SLACK).await;
    assert!(
        closed - connected < Duration::from_millis(500),
        "closed after {:?}",
        closed - connected
    );
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole answer");
    assert!(head.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{answer}"
    );
    assert!(body.contains("api_max_connections"), "{answer}");
    let stats = api.counters.stats();
    assert_eq!((stats.open, stats.refused), (6, 1), "{stats:?}");
    for stream in &mut idle {
        assert!(stays_open(stream, Duration::from_millis(20)).await);
    }
    // A slot given back is taken again.
    drop(idle.pop());
    api.wait_open(5).await;
    let answer = get_once(api.address, "/metrics").await;
    assert!(answer.contains("balancer_api_connections 6"), "{answer}");
    assert!(
        answer.contains("balancer_api_connections_refused_total 1"),
        "{answer}"
    );
}

#[tokio::test]
async fn idle_slow_and_kept_alive_connections_are_closed_after_the_idle_timeout() {
    let timeout = Duration::from_millis(300);
    let api = start(limits(16, 0, timeout)).await;
    // One that never sends a byte.
    let mut silent = api.connect().await;
    let silent_at = Instant::now();
    // One that sends a header byte every 50 ms: it never completes it in time.
    let slow = api.connect().await;
    let slow_at = Instant::now();
    let (mut slow_read, mut slow_write) = slow.into_split();
    let dripping = tokio::spawn(async move {
        for byte in b"GET /metrics HTTP/1.1\r\nHost: api\r\nX-Padding: aaaaaaaaaaaaaaaaaaaa"
            .iter()
            .cycle()
        {
            if slow_write.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // One that is answered and then keeps the connection without asking anything else.
    let mut kept = api.connect().await;
    let asked = Instant::now();
    kept.write_all(b"GET /api/v1/status HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut kept).await.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");

    let (_, silent_closed) = until_closed(&mut silent, timeout + SLACK).await;
    let slow_closed = {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(timeout + SLACK, slow_read.read(&mut buf));
        assert!(matches!(read.await, Ok(Ok(0) | Err(_))), "slow one closed");
        Instant::now()
    };
    let (_, kept_closed) = until_closed(&mut kept, timeout + SLACK).await;
    dripping.abort();
    for (what, opened, closed) in [
        ("silent", silent_at, silent_closed),
        ("slow", slow_at, slow_closed),
        ("kept alive", asked, kept_closed),
    ] {
        let after = closed - opened;
        assert!(after >= timeout, "{what} closed after {after:?}");
        assert!(after < timeout + SLACK, "{what} closed after {after:?}");
    }
    // A client that asks at once is answered as usual.
    let answer = get_once(api.address, "/metrics").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    api.wait_open(0).await;
    let stats = api.counters.stats();
    assert_eq!(
        (stats.header_timeouts, stats.lifetime_timeouts),
        (3, 0),
        "{stats:?}"
    );
}

#[tokio::test]
async fn a_connection_ends_with_its_lifetime() {
    let lifetime = Duration::from_secs(1);
    let idle_timeout = Duration::from_millis(400);
    let api = start(Limits {
        lifetime,
        ..limits(16, 0, idle_timeout)
    })
    .await;
    // A request that is never answered: closed an idle timeout after the lifetime.
    let mut stuck = api.connect().await;
    let stuck_at = Instant::now();
    stuck
        .write_all(b"GET /slow HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    // A client asking every 100 ms: after the lifetime, its connection closes between two
    // requests, or after an answer that says `connection: close`.
    let mut busy = api.connect().await;
    let busy_at = Instant::now();
    let mut answers = 0;
    let busy_closed = loop {
        let request = busy.write_all(b"GET /metrics HTTP/1.1\r\nHost: api\r\n\r\n");
        let Ok(()) = request.await else {
            break Instant::now();
        };
        let Some(answer) = read_answer(&mut busy).await else {
            break Instant::now();
        };
        answers += 1;
        if answer.to_ascii_lowercase().contains("connection: close") {
            break until_closed(&mut busy, SLACK).await.1;
        }
        assert!(
            busy_at.elapsed() < lifetime + SLACK,
            "no end after {answers} answers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (_, stuck_closed) = until_closed(&mut stuck, lifetime + idle_timeout + SLACK).await;
    let after = busy_closed - busy_at;
    assert!(after >= lifetime && after < lifetime + SLACK, "{after:?}");
    assert!(answers > 5, "{answers} answers");
    let after = stuck_closed - stuck_at;
    assert!(after >= lifetime + idle_timeout, "{after:?}");
    api.wait_open(0).await;
    let stats = api.counters.stats();
    assert_eq!(
        (stats.header_timeouts, stats.lifetime_timeouts),
        (0, 1),
        "{stats:?}"
    );
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_and_closes_the_rest() {
    let mut api = start(limits(16, 0, Duration::from_secs(30))).await;
    let mut idle = api.connect().await;
    let mut pausing = api.connect().await;
    pausing
        .write_all(b"GET /pause HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    api.wait_open(2).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let stopped = Instant::now();
    drop(api.stop.take());
    let (answer, _) = until_closed(&mut pausing, SLACK).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.ends_with("paused\n"), "{answer}");
    until_closed(&mut idle, SHUTDOWN_GRACE + SLACK).await;
    tokio::time::timeout(SHUTDOWN_GRACE + SLACK, &mut api.task)
        .await
        .expect("serve returns after the grace")
        .unwrap();
    assert!(stopped.elapsed() < SHUTDOWN_GRACE + SLACK);
    let refused = TcpStream::connect(api.address).await.unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    assert_eq!(api.counters.stats().open, 0);
}

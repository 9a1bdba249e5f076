//! The status API's connections: its own accept loop, so that clients of the API can never
//! take the descriptors the health probes need. What it bounds:
//! - how many connections are open at once (`api_max_connections`, plus a reserve for
//!   loopback peers so that an operator on the machine still gets an answer when remote
//!   clients hold every slot); a connection over the cap is accepted, answered 503 and
//!   closed at once, so that it does not wait in the backlog in front of others;
//! - how long a connection may take to send a complete request header, after connecting and
//!   after each answer (`api_idle_timeout`): idle and slow clients are closed;
//! - how long a connection lives ([`Limits::lifetime`]): a client that keeps requesting, or
//!   stops reading its answer, gives its slot back after a while too.
//!
//! Failing accepts (EMFILE and the like) are retried every [`ACCEPT_BACKOFF`], and logged
//! when they start and when they end, not at every attempt.

use std::{
    future::Future,
    io::{self, Read as _, Write as _},
    net::IpAddr,
    pin::pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tracing::{debug, error, info, warn};

use crate::config::Config;

/// Connections over `api_max_connections` that loopback peers may still open.
pub const LOOPBACK_RESERVE: u32 = 16;
/// A connection lives at most this many idle timeouts (a minute with the default).
pub const LIFETIME_IN_IDLE_TIMEOUTS: u32 = 12;
/// Pause after an accept that failed for want of resources (descriptors, memory): retrying
/// at once would spin on the same error.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At shutdown, how long requests in flight get to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// What the answer to a connection over the cap says. It is written into the fresh socket's
/// empty send buffer, so it never waits.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\
Content-Type: text/plain\r\nContent-Length: 61\r\n\r\n\
too many connections to the status API (api_max_connections)\n";

/// The limits of the accept loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: u32,
    /// Connections over `max_connections` for loopback peers only.
    pub loopback_reserve: u32,
    /// The time a connection gets to send a complete request header, after connecting and
    /// after each answer.
    pub idle_timeout: Duration,
    /// After this, a connection is closed once its current request is answered, and at
    /// once if that takes more than another `idle_timeout`.
    pub lifetime: Duration,
}

impl Limits {
    pub fn of(config: &Config) -> Limits {
        Limits {
            max_connections: config.api_max_connections,
            loopback_reserve: LOOPBACK_RESERVE,
            idle_timeout: config.api_idle_timeout,
            lifetime: config.api_idle_timeout * LIFETIME_IN_IDLE_TIMEOUTS,
        }
    }

    /// Whether a new connection from `peer` is served while `open` others are.
    pub fn admits(&self, open: u64, peer: IpAddr) -> bool {
        let reserve = if peer.to_canonical().is_loopback() {
            self.loopback_reserve
        } else {
            0
        };
        open < u64::from(self.max_connections) + u64::from(reserve)
    }
}

/// The accept loop's counters, shared with the metrics.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    open: AtomicU64,
    refused: AtomicU64,
    header_timeouts: AtomicU64,
    lifetime_timeouts: AtomicU64,
}

/// The counters' values at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Connections being served.
    pub open: u64,
    /// Connections closed at once, over the cap.
    pub refused: u64,
    /// Connections closed for not sending a complete request header in time.
    pub header_timeouts: u64,
    /// Connections closed with a request unfinished at the end of their lifetime.
    pub lifetime_timeouts: u64,
}

impl ConnectionCounters {
    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            open: self.open.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            header_timeouts: self.header_timeouts.load(Ordering::Relaxed),
            lifetime_timeouts: self.lifetime_timeouts.load(Ordering::Relaxed),
        }
    }

    /// Counts a connection open until the guard is dropped (also when its task is aborted).
    fn opened(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

struct OpenGuard(Arc<ConnectionCounters>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves; then stops
/// accepting, lets the requests in flight finish for up to [`SHUTDOWN_GRACE`] and closes
/// every connection.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    counters: Arc<ConnectionCounters>,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = pin!(shutdown);
    let mut tasks = JoinSet::new();
    let (stop, stopping) = watch::channel(false);
    let mut errors = AcceptErrors::new("status API");
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            Some(ended) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = ended {
                    error!("status API: a connection's task failed: {e}");
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if lost_before_accept(&e) => {
                debug!("status API: a connection was gone before it was accepted: {e}");
                continue;
            }
            Err(e) => {
                if let Some(message) = errors.failed(&e, Instant::now()) {
                    warn!("{message}");
                }
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        if let Some(message) = errors.succeeded(Instant::now()) {
            info!("{message}");
        }
        if !limits.admits(counters.open.load(Ordering::Relaxed), peer.ip()) {
            ConnectionCounters::count(&counters.refused);
            refuse(stream);
            continue;
        }
        // Counted here, before the task runs, so that a burst of accepts sees every one.
        let open = counters.opened();
        let connection = serve_connection(stream, router.clone(), limits, stopping.clone());
        let counters = counters.clone();
        tasks.spawn(async move {
            let ended = connection.await;
            match ended {
                Ended::Served | Ended::Shutdown => {}
                Ended::HeaderTimeout => ConnectionCounters::count(&counters.header_timeouts),
                Ended::LifetimeTimeout => ConnectionCounters::count(&counters.lifetime_timeouts),
            }
            drop(open);
        });
    }
    drop(listener);
    let _ = stop.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    // Dropping the set aborts (and closes) the connections still open.
}

/// Accept errors that concern one connection only (reset or aborted by its client before it
/// was accepted): nothing to wait for.
fn lost_before_accept(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// Answers 503 and closes, without waiting for anything.
fn refuse(stream: TcpStream) {
    let Ok(mut stream) = stream.into_std() else {
        return;
    };
    // Non-blocking (as tokio left it): the answer fits in the empty send buffer or is lost.
    let _ = stream.write(BUSY);
    // What the client sent already is read, so that closing sends a FIN after the answer
    // rather than a reset that could discard it.
    let _ = stream.read(&mut [0; 4096]);
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// Closed by the client, or by us after an answer.
    Served,
    /// No complete request header within the idle timeout.
    HeaderTimeout,
    /// A request still unfinished an idle timeout after the end of the lifetime.
    LifetimeTimeout,
    /// Still open at the end of the grace given at shutdown.
    Shutdown,
}

/// Serves one connection: HTTP/1.1 with keep-alive, hyper's header timer enforcing the idle
/// timeout (it starts when the connection is first polled, before any byte arrives, and
/// again after each answer; it is not reset by bytes that do not complete the header).
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    mut stopping: watch::Receiver<bool>,
) -> Ended {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout);
    let service = TowerToHyperService::new(router);
    let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let (grace, unfinished) = tokio::select! {
        ended = connection.as_mut() => return ended_by(ended),
        () = tokio::time::sleep(limits.lifetime) => (limits.idle_timeout, Ended::LifetimeTimeout),
        _ = stopping.wait_for(|stop| *stop) => (SHUTDOWN_GRACE, Ended::Shutdown),
    };
    // No more requests: the current one is answered, then the connection closes.
    connection.as_mut().graceful_shutdown();
    match tokio::time::timeout(grace, connection).await {
        Ok(ended) => ended_by(ended),
        Err(_) => unfinished,
    }
}

fn ended_by(result: Result<(), hyper::Error>) -> Ended {
    match result {
        Err(e) if e.is_timeout() => Ended::HeaderTimeout,
        _ => Ended::Served,
    }
}

/// Accepts failing in a row: one message when they start, one when they end (the status
/// API's listener and the control socket's).
#[derive(Debug)]
pub(crate) struct AcceptErrors {
    /// Whose accepts, for the messages.
    what: &'static str,
    failed: u64,
    since: Option<Instant>,
}

impl AcceptErrors {
    pub(crate) fn new(what: &'static str) -> AcceptErrors {
        AcceptErrors {
            what,
            failed: 0,
            since: None,
        }
    }

    /// Counts a failed accept; the message to log if it starts an episode.
    pub(crate) fn failed(&mut self, e: &io::Error, now: Instant) -> Option<String> {
        self.failed += 1;
        if self.since.is_some() {
            return None;
        }
        self.since = Some(now);
        Some(format!(
            "{}: cannot accept connections: {e}; retrying every {ACCEPT_BACKOFF:?} \
             (one message when it recovers)",
            self.what
        ))
    }

    /// An accept succeeded; the message to log if it ends an episode.
    pub(crate) fn succeeded(&mut self, now: Instant) -> Option<String> {
        let since = self.since.take()?;
        let failed = std::mem::take(&mut self.failed);
        Some(format!(
            "{}: accepting connections again, after {failed} failed attempts over {:.1} s",
            self.what,
            now.duration_since(since).as_secs_f64()
        ))
    }
}

#[cfg(test)]
mod tests;

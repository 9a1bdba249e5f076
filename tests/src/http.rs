//! A real HTTP/1.1 server for backends and a real client, over the kernel's TCP stack.
//!
//! Each response names the backend that served it and echoes the request's id, so a test
//! can tell which backend served which connection, and that the response it got whole is
//! the answer to its own request.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A backend's HTTP server, running on a thread inside the backend's namespace until dropped.
pub struct HttpServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    /// Every address and port a connection came from (its log of clients).
    peers: Arc<std::sync::Mutex<std::collections::BTreeSet<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Starts listening on `listen` inside `ns`; returns once the socket is bound.
    pub fn start(ns: &Netns, name: &str, listen: SocketAddr) -> HttpServer {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let peers = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop2, served2, name) = (stop.clone(), served.clone(), name.to_owned());
        let peers2 = peers.clone();
        let thread = ns.spawn(move || {
            let listener = match TcpListener::bind(listen) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("bind {listen}: {e}")));
                    return;
                }
            };
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            let _ = ready_tx.send(Ok(()));
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        peers2.lock().unwrap().insert(peer);
                        let (name, served) = (name.clone(), served2.clone());
                        std::thread::spawn(move || {
                            if serve(stream, &name).is_ok() {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        wait_readable(&listener, 50)
                    }
                    Err(_) => wait_readable(&listener, 50),
                }
            }
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("HTTP server {e}"),
            Err(_) => panic!("HTTP server thread died before binding"),
        }
        HttpServer {
            stop,
            served,
            peers,
            thread: Some(thread),
        }
    }

    /// Every address a connection to this server came from so far.
    pub fn peers(&self) -> std::collections::BTreeSet<std::net::IpAddr> {
        self.peers
            .lock()
            .unwrap()
            .iter()
            .map(SocketAddr::ip)
            .collect()
    }

    /// Every address and port a connection to this server came from so far.
    pub fn peer_sockets(&self) -> std::collections::BTreeSet<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// Responses written in full so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn wait_readable(listener: &TcpListener, timeout_ms: i32) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut fd, 1, timeout_ms) };
}

fn serve(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || request.len() > 16 * 1024 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&request).into_owned();
    let body_start = head.find("\r\n\r\n").map_or(request.len(), |i| i + 4);
    if let Some(n) = head
        .strip_prefix("GET /bytes?n=")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
    {
        return send_pattern(stream, n);
    }
    if head.starts_with("POST /digest ") {
        return digest_upload(stream, &head, &request[body_start..]);
    }
    if head.starts_with("GET /stream ") {
        let body_start = head.find("\r\n\r\n").map_or(request.len(), |i| i + 4);
        return echo_stream(stream, name, &request[body_start..]);
    }
    let id = head
        .split_whitespace()
        .nth(1)
        .and_then(|path| path.split("id=").nth(1))
        .unwrap_or("none")
        .to_owned();
    // An upload: read the whole body before answering.
    let expected: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let body_start = head.find("\r\n\r\n").map_or(request.len(), |i| i + 4);
    let mut received = request.len() - body_start;
    while received < expected {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        received += n;
    }
    let body = format!("backend={name} id={id} received={received}\n");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

/// The bytes `/bytes?n=N` sends, and `upload_digest` uploads: a deterministic stream that
/// no compression or coincidence makes look right when it is not.
pub struct Pattern(u64);

impl Pattern {
    pub fn new() -> Pattern {
        Pattern(0x9e37_79b9_7f4a_7c15)
    }
    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
    /// The SHA-256 of the first `n` bytes.
    pub fn digest(n: u64) -> String {
        use sha2::Digest as _;
        let mut pattern = Pattern::new();
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let take = left.min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..take]);
            hasher.update(&buf[..take]);
            left -= take as u64;
        }
        hex(&hasher.finalize())
    }
}

impl Default for Pattern {
    fn default() -> Self {
        Pattern::new()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `GET /bytes?n=N`: N bytes of the pattern.
fn send_pattern(mut stream: TcpStream, n: u64) -> std::io::Result<()> {
    stream.write_all(
        format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut pattern = Pattern::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let take = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..take]);
        stream.write_all(&buf[..take])?;
        left -= take as u64;
    }
    stream.flush()
}

/// `POST /digest`: the SHA-256 of the body, as received.
fn digest_upload(mut stream: TcpStream, head: &str, already: &[u8]) -> std::io::Result<()> {
    use sha2::Digest as _;
    let expected: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut hasher = sha2::Sha256::new();
    hasher.update(already);
    let mut received = already.len() as u64;
    let mut buf = vec![0u8; 64 * 1024];
    while received < expected {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        hasher.update(&buf[..n]);
        received += n as u64;
    }
    let body = format!("received={received} sha256={}\n", hex(&hasher.finalize()));
    stream.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )?;
    stream.flush()
}

/// Downloads `/bytes?n=N` from `to`; returns the SHA-256 of the body received (which must be
/// N bytes).
pub fn download_digest(to: SocketAddr, n: u64) -> Result<String, String> {
    download_digest_paced(to, 0, n, None)
}

/// [`download_digest`] from `source_port` (0: any), reading at most `per_second` bytes a
/// second (a tenth every 100 ms): a long-lived stream whose pace the client sets.
pub fn download_digest_paced(
    to: SocketAddr,
    source_port: u16,
    n: u64,
    per_second: Option<usize>,
) -> Result<String, String> {
    use sha2::Digest as _;
    let any: SocketAddr = match to {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], source_port)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], source_port)),
    };
    // Paced: a receive buffer of a fraction of a second's worth, so that the sender is paced
    // too (a default buffer would take the whole body at once).
    let mut stream = connect_buffered(to, any, per_second.map(|rate| (rate / 4).max(2048)))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET /bytes?n={n} HTTP/1.1\r\nHost: {to}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => return Err("closed before the response head".into()),
            Err(e) => return Err(format!("receive: {e}")),
        }
    }
    let mut hasher = sha2::Sha256::new();
    let chunk = per_second.map_or(64 * 1024, |rate| (rate / 10).max(1));
    let mut buf = vec![0u8; chunk];
    let mut received = 0u64;
    loop {
        let got = stream
            .read(&mut buf)
            .map_err(|e| format!("after {received} bytes: {e}"))?;
        if got == 0 {
            break;
        }
        hasher.update(&buf[..got]);
        received += got as u64;
        if per_second.is_some() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if received != n {
        return Err(format!("{received} bytes of {n}"));
    }
    Ok(hex(&hasher.finalize()))
}

/// Uploads N bytes of the pattern to `/digest` on `to`; returns the SHA-256 the server
/// computed of what it received.
pub fn upload_digest(to: SocketAddr, n: u64) -> Result<String, String> {
    let mut stream = connect_from(to, 0)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "POST /digest HTTP/1.1\r\nHost: {to}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut pattern = Pattern::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let take = left.min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..take]);
        stream
            .write_all(&buf[..take])
            .map_err(|e| format!("send, {left} bytes to go: {e}"))?;
        left -= take as u64;
    }
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("receive: {e}"))?;
    response
        .split("sha256=")
        .nth(1)
        .map(|h| h.trim().to_owned())
        .ok_or_else(|| format!("no digest in {response:?}"))
}

/// A long-lived exchange: after the response head and `backend=NAME`, every line the client
/// sends comes back prefixed with the backend's name, until the client closes.
fn echo_stream(mut stream: TcpStream, name: &str, already_read: &[u8]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_nodelay(true)?;
    stream.write_all(
        format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nbackend={name}\n").as_bytes(),
    )?;
    let mut pending = already_read.to_vec();
    let mut buf = [0u8; 1024];
    loop {
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let mut echo = format!("{name} ").into_bytes();
            echo.extend_from_slice(&line);
            stream.write_all(&echo)?;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// A long-lived connection to a backend's stream endpoint (`GET /stream`).
pub struct Stream {
    stream: TcpStream,
    /// The backend that answered the request.
    pub backend: String,
    pending: Vec<u8>,
    /// Lines exchanged so far.
    pub exchanges: u64,
}

impl Stream {
    /// Opens the connection from a thread in `ns`; the socket stays in that namespace and can
    /// be used from any thread afterwards.
    pub fn open(ns: &Netns, to: SocketAddr, source_port: u16) -> Result<Stream, String> {
        let local: SocketAddr = match to {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], source_port)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], source_port)),
        };
        Self::open_from(ns, to, local)
    }

    /// Like [`open`](Self::open), from `local` (an address of the namespace, and a port).
    pub fn open_from(ns: &Netns, to: SocketAddr, local: SocketAddr) -> Result<Stream, String> {
        let socket = ns.run(move || connect_bound(to, local))?;
        socket.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut stream = Stream {
            stream: socket,
            backend: String::new(),
            pending: Vec::new(),
            exchanges: 0,
        };
        stream
            .stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        write!(stream.stream, "GET /stream HTTP/1.1\r\nHost: {to}\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let head = stream.read_until(b"\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200 ") {
            return Err(format!("unexpected answer {head:?}"));
        }
        let first = stream.read_until(b"\n")?;
        stream.backend = first
            .trim_end()
            .strip_prefix("backend=")
            .ok_or_else(|| format!("no backend line in {first:?}"))?
            .to_owned();
        Ok(stream)
    }

    /// Sends a line and reads its echo; returns the name of the backend that echoed it.
    pub fn exchange(&mut self, line: &str) -> Result<String, String> {
        writeln!(self.stream, "{line}").map_err(|e| format!("send: {e}"))?;
        let echo = self.read_until(b"\n")?;
        let (backend, text) = echo
            .trim_end()
            .split_once(' ')
            .ok_or_else(|| format!("bad echo {echo:?}"))?;
        if text != line {
            return Err(format!("echo {text:?} for {line:?}"));
        }
        self.exchanges += 1;
        Ok(backend.to_owned())
    }

    fn read_until(&mut self, end: &[u8]) -> Result<String, String> {
        let mut buf = [0u8; 1024];
        loop {
            if let Some(at) = self.pending.windows(end.len()).position(|w| w == end) {
                let taken: Vec<u8> = self.pending.drain(..at + end.len()).collect();
                return Ok(String::from_utf8_lossy(&taken).into_owned());
            }
            let n = self
                .stream
                .read(&mut buf)
                .map_err(|e| format!("receive: {e}"))?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.pending.extend_from_slice(&buf[..n]);
        }
    }
}

/// Long-lived connections, each exchanging a line every 50 ms, from a thread, until
/// stopped (or until one fails).
pub struct LongLived {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<(Vec<u64>, Vec<String>)>>,
}

impl LongLived {
    /// `count` connections from `ns` to `to`'s stream endpoint, from source ports
    /// `first_port`, `first_port + 1`...
    pub fn open(ns: &Netns, to: SocketAddr, first_port: u16, count: u16) -> LongLived {
        let mut streams: Vec<Stream> = (0..count)
            .map(|i| Stream::open(ns, to, first_port + i).expect("long-lived connection"))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut errors = Vec::new();
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) && errors.is_empty() {
                for (i, s) in streams.iter_mut().enumerate() {
                    match s.exchange(&format!("line {n}")) {
                        Ok(by) if by == s.backend => {}
                        Ok(by) => errors.push(format!(
                            "stream {i}: echoed by {by}, opened on {}",
                            s.backend
                        )),
                        Err(e) => {
                            errors.push(format!("stream {i} after {} exchanges: {e}", s.exchanges))
                        }
                    }
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (streams.iter().map(|s| s.exchanges).collect(), errors)
        });
        LongLived {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; returns the exchanges of each connection and every error (a reset, a timeout).
    pub fn stop(mut self) -> (Vec<u64>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().expect("running").join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for LongLived {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One connection of a [`LoadGenerator`].
#[derive(Clone, Debug)]
pub struct Attempt {
    pub started: Instant,
    pub source_port: u16,
    /// The backend that served it, or why it failed.
    pub result: Result<String, String>,
}

/// New connections one after another (paced), from a thread in the client's namespace, until
/// stopped. Source ports cycle through a range, as a busy client's would.
pub struct LoadGenerator {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Attempt>>>,
}

impl LoadGenerator {
    /// Connections one after another, `pause` between the end of one and the start of the next.
    pub fn start(
        ns: &Netns,
        to: SocketAddr,
        ports: std::ops::Range<u16>,
        pause: Duration,
    ) -> LoadGenerator {
        Self::with_pace(ns, to, ports, move |_, _| std::thread::sleep(pause))
    }

    /// Connections started at a steady `per_second`, on a fixed schedule (a late connection
    /// is followed by the next one at once, so the average rate holds while the connections
    /// take less than the interval).
    pub fn start_paced(
        ns: &Netns,
        to: SocketAddr,
        ports: std::ops::Range<u16>,
        per_second: f64,
    ) -> LoadGenerator {
        let interval = Duration::from_secs_f64(1.0 / per_second);
        Self::with_pace(ns, to, ports, move |first, done| {
            let next = first + interval * done as u32;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        })
    }

    /// `wait(first start, connections done)` runs after each connection.
    fn with_pace(
        ns: &Netns,
        to: SocketAddr,
        ports: std::ops::Range<u16>,
        wait: impl Fn(Instant, u64) + Send + 'static,
    ) -> LoadGenerator {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = ns.spawn(move || {
            let mut attempts = Vec::new();
            let mut port = ports.start;
            let mut id = 0u64;
            let first = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = get(to, port, id).map(|s| s.backend);
                attempts.push(Attempt {
                    started,
                    source_port: port,
                    result,
                });
                port = if port + 1 >= ports.end {
                    ports.start
                } else {
                    port + 1
                };
                id += 1;
                wait(first, id);
            }
            attempts
        });
        LoadGenerator {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns every attempt, in order.
    pub fn stop(mut self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().expect("running").join() {
            Ok(attempts) => attempts,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for LoadGenerator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A TCP connection to `to` from `source_port` (0: any), in the calling thread's namespace.
fn connect_from(to: SocketAddr, source_port: u16) -> Result<TcpStream, String> {
    let local: SocketAddr = match to {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], source_port)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], source_port)),
    };
    connect_bound(to, local)
}

/// A TCP connection to `to` from `local` (port 0: any; an unspecified address: any).
fn connect_bound(to: SocketAddr, local: SocketAddr) -> Result<TcpStream, String> {
    connect_buffered(to, local, None)
}

/// [`connect_bound`], with a receive buffer of `receive_buffer` bytes (set before the
/// handshake, so that the window the peer sees is that small): a slow reader then paces the
/// sender, and the connection carries data for as long as the reading lasts.
fn connect_buffered(
    to: SocketAddr,
    local: SocketAddr,
    receive_buffer: Option<usize>,
) -> Result<TcpStream, String> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| e.to_string())?;
    if let Some(size) = receive_buffer {
        socket
            .set_recv_buffer_size(size)
            .map_err(|e| e.to_string())?;
    }
    if local.port() != 0 || !local.ip().is_unspecified() {
        socket.set_reuse_address(true).map_err(|e| e.to_string())?;
        socket
            .bind(&local.into())
            .map_err(|e| format!("bind {local}: {e}"))?;
    }
    socket
        .connect_timeout(&to.into(), IO_TIMEOUT)
        .map_err(|e| format!("connect to {to} from {local}: {e}"))?;
    Ok(socket.into())
}

/// What one request got back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    pub backend: String,
}

/// One HTTP GET over a new TCP connection from `source_port` (0: any) to `to`. The response
/// must be complete (Content-Length honoured), 200, and answer this request's `id`.
pub fn get(to: SocketAddr, source_port: u16, id: u64) -> Result<Served, String> {
    request(to, source_port, id, 0)
}

/// Like [`get`], uploading `upload` bytes first (POST); the backend must have received them all.
pub fn request(to: SocketAddr, source_port: u16, id: u64, upload: usize) -> Result<Served, String> {
    let mut stream = connect_from(to, source_port)?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let request = if upload == 0 {
        format!("GET /?id={id} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n").into_bytes()
    } else {
        let mut r = format!(
            "POST /?id={id} HTTP/1.1\r\nHost: {to}\r\nContent-Length: {upload}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        r.extend((0..upload).map(|i| b'a' + (i % 26) as u8));
        r
    };
    stream
        .write_all(&request)
        .map_err(|e| format!("send: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("receive: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("incomplete response {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200 ") {
        return Err(format!("unexpected status: {head:?}"));
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
    if body.len() != length {
        return Err(format!(
            "body of {} bytes, Content-Length {length}",
            body.len()
        ));
    }
    let backend = body
        .strip_prefix("backend=")
        .and_then(|rest| {
            rest.trim_end()
                .strip_suffix(&format!(" id={id} received={upload}"))
        })
        .ok_or_else(|| {
            format!("response {body:?} does not answer request {id} with its {upload} bytes")
        })?;
    Ok(Served {
        backend: backend.to_owned(),
    })
}

/// The outcome of a series of requests.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Backend name -> connections it served.
    pub per_backend: BTreeMap<String, u64>,
    /// (source port, backend name) of every connection that succeeded.
    pub flows: Vec<(u16, String)>,
    pub failures: Vec<String>,
}

impl LoadReport {
    pub fn succeeded(&self) -> u64 {
        self.per_backend.values().sum()
    }
}

/// `count` requests one after another, each on a new connection from source port
/// `first_port + i`, from a thread inside `ns`. After each request `keep_going(done)` is
/// asked whether to go on (it also serves to report progress).
pub fn run_requests(
    ns: &Netns,
    to: SocketAddr,
    count: u64,
    first_port: u16,
    keep_going: impl Fn(u64) -> bool + Send + 'static,
) -> LoadReport {
    ns.run(move || {
        let mut report = LoadReport::default();
        for i in 0..count {
            let port = first_port + i as u16;
            match get(to, port, i) {
                Ok(served) => {
                    *report
                        .per_backend
                        .entry(served.backend.clone())
                        .or_default() += 1;
                    report.flows.push((port, served.backend));
                }
                Err(e) => report.failures.push(format!("request {i}: {e}")),
            }
            if !keep_going(i + 1) {
                break;
            }
        }
        report
    })
}

/// Polls the status API every 5 ms until `done` holds; returns that status and when it
/// first held. After `timeout`, panics with `what`, the last status and `context()` (such as
/// the balancer's log).
pub fn wait_for_status(
    ns: &Netns,
    api: SocketAddr,
    what: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
    context: impl Fn() -> String,
) -> (serde_json::Value, Instant) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = get_json(ns, api, "/api/v1/status").expect("status API");
        if done(&status) {
            return (status, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{status:#}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The backend with `address` of the status document's VIP number `vip`.
pub fn status_backend<'a>(
    status: &'a serde_json::Value,
    vip: usize,
    address: &str,
) -> &'a serde_json::Value {
    status["vips"][vip]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["address"] == address)
        .unwrap_or_else(|| panic!("no backend {address} in VIP {vip}: {status:#}"))
}

/// GET a JSON document over plain HTTP from inside `ns` (the balancer's status API).
pub fn get_json(ns: &Netns, address: SocketAddr, path: &str) -> Result<serde_json::Value, String> {
    let body = get_text(ns, address, path)?;
    serde_json::from_str(&body).map_err(|e| format!("{path} sent invalid JSON: {e}"))
}

/// GET a document over plain HTTP from inside `ns` (the balancer's `/metrics`); the body of a
/// 200 answer.
pub fn get_text(ns: &Netns, address: SocketAddr, path: &str) -> Result<String, String> {
    let (status, body) = send(ns, address, "GET", path)?;
    if status != 200 {
        return Err(format!("{path} answered {status}: {body}"));
    }
    Ok(body)
}

/// `METHOD path` over plain HTTP from inside `ns`, with an empty body: the status code and
/// the body of the answer.
pub fn send(
    ns: &Netns,
    address: SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, String), String> {
    let (method, path) = (method.to_owned(), path.to_owned());
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&address, IO_TIMEOUT)
            .map_err(|e| format!("connect {address}: {e}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| e.to_string())?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or("incomplete response")?;
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("{path}: no status line in {head:?}"))?;
        Ok((status, body.to_owned()))
    })
}

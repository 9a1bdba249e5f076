//! A real DNS server for the tests and the demo, and a tiny client to ask it.
//!
//! [`Dnsmasq`] runs dnsmasq (Debian package `dnsmasq-base`: the binary, no system service)
//! inside a network namespace, on one address, answering for one test domain only:
//!
//! - A and AAAA records come from a directory of hosts files (`--hostsdir`), one file per
//!   name, which dnsmasq re-reads by inotify when a file is renamed into place or removed: a
//!   change is answered within milliseconds, without a restart (verified with dnsmasq 2.90).
//! - SRV records (`--srv-host`) are read only at start: changing them restarts dnsmasq.
//! - Nothing is forwarded (`--no-resolv --no-hosts --local=/DOMAIN/ --domain-needed`): a name
//!   of the domain that never had records answers NXDOMAIN at once; one whose records were
//!   all removed answers NOERROR without records (dnsmasq 2.90 remembers the name); any
//!   other name is REFUSED.
//! - It listens on its one address (`--listen-address --bind-interfaces`), inside its
//!   namespace (`ip netns exec`): never on the host's network.
//!
//! [`query`] sends one question over UDP from the calling thread's namespace (run it on
//! [`Netns::spawn`](crate::netns::Netns::spawn)'s thread to ask from another namespace).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use crate::{
    netns::{spawn_in, Netns},
    scratch::Scratch,
};

/// Where Debian's `dnsmasq-base` puts the binary.
pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// Response codes ([`Answer::rcode`]).
pub const NOERROR: u8 = 0;
pub const SERVFAIL: u8 = 2;
pub const NXDOMAIN: u8 = 3;
pub const REFUSED: u8 = 5;

/// How long a change of records or a start may take to be answered.
const SETTLE: Duration = Duration::from_secs(10);

/// One SRV record's data: the target host and port, with its priority and weight.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// A name without the trailing dot.
    pub target: String,
}

/// A dnsmasq process in a namespace, killed (and its files removed) on drop.
pub struct Dnsmasq {
    namespace: String,
    listen: IpAddr,
    domain: String,
    ttl: u32,
    /// `hosts/` (what dnsmasq reads), `new/` (files being written, renamed into `hosts/`),
    /// and the log. Kept when a test panics.
    files: Scratch,
    /// SRV records by owner name, passed at each start.
    srv: BTreeMap<String, Vec<Srv>>,
    child: Option<Child>,
}

impl Dnsmasq {
    /// Starts dnsmasq in `ns` on `listen` port 53, answering for `domain` (such as
    /// `demo.test`) with a time-to-live of `ttl` seconds on every record (dnsmasq's default
    /// for local records is 0); returns once it answers. Its files live in
    /// `/tmp/<namespace>-dnsmasq-<listen>`.
    pub fn start(ns: &Netns, listen: IpAddr, domain: &str, ttl: u32) -> Dnsmasq {
        assert!(
            Path::new(DNSMASQ).is_file(),
            "{DNSMASQ} is missing: install Debian's dnsmasq-base \
             (`apt-get install --no-install-recommends dnsmasq-base`; `cargo xtask demo \
             --autoscale` does)"
        );
        let files = Scratch::named(&format!("{}-dnsmasq-{listen}", ns.name()));
        for dir in ["hosts", "new"] {
            let path = files.path(dir);
            std::fs::create_dir_all(&path)
                .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        }
        let mut server = Dnsmasq {
            namespace: ns.name().to_owned(),
            listen,
            domain: domain.trim_end_matches('.').to_owned(),
            ttl,
            files,
            srv: BTreeMap::new(),
            child: None,
        };
        server.restart();
        server
    }

    /// Where it answers.
    pub fn address(&self) -> SocketAddr {
        SocketAddr::new(self.listen, 53)
    }

    /// Sets the A and AAAA records of `name` (a name of the domain) to `addresses` (none:
    /// the name has no records), by renaming a new hosts file into place. While dnsmasq runs,
    /// returns once it answers the new set; while it is stopped, the set is what it answers
    /// when started again.
    pub fn set_addresses(&self, name: &str, addresses: &[IpAddr]) {
        let name = self.name_in_domain(name);
        let text: String = addresses.iter().map(|a| format!("{a} {name}\n")).collect();
        let new = self.files.path("new").join(&name);
        let path = self.files.path("hosts").join(&name);
        std::fs::write(&new, text).unwrap_or_else(|e| panic!("write {}: {e}", new.display()));
        std::fs::rename(&new, &path)
            .unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
        if self.child.is_none() {
            return;
        }
        let wanted: BTreeSet<IpAddr> = addresses.iter().copied().collect();
        let kinds: Vec<RecordType> = [RecordType::A, RecordType::Aaaa]
            .into_iter()
            .filter(|k| {
                // An empty set is checked by its A records: there are none.
                wanted.is_empty() || wanted.iter().any(|a| a.is_ipv4() == (*k == RecordType::A))
            })
            .collect();
        self.wait_until(&format!("{name} to answer {wanted:?}"), move |server| {
            let mut got = BTreeSet::new();
            for kind in &kinds {
                got.extend(query(server, &name, *kind, Duration::from_millis(500))?.addresses());
            }
            Ok(got == wanted)
        });
    }

    /// Sets the SRV records of `name` (such as `_http._tcp.web.demo.test`) to `records`.
    /// dnsmasq reads SRV records only at start, so this restarts it: for the few
    /// milliseconds of the restart, queries go unanswered. While it is stopped, the records
    /// are what it answers when started again.
    pub fn set_srv(&mut self, name: &str, records: &[Srv]) {
        let name = self.name_in_domain(name);
        self.srv.insert(name, records.to_vec());
        if self.child.is_some() {
            self.restart();
        }
    }

    /// Stops it (SIGTERM, then waits): queries go unanswered until [`restart`](Self::restart).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again), stopping it first if it runs, with the records set so far; returns
    /// once it answers.
    pub fn restart(&mut self) {
        self.stop();
        let log = self.files.path("dnsmasq.log");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let child = Command::new("ip")
            .args(["netns", "exec", &self.namespace, DNSMASQ])
            .args(self.arguments())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {DNSMASQ}: {e}"));
        self.child = Some(child);
        let probe = self.domain.clone();
        self.wait_until("dnsmasq to answer", move |server| {
            query(server, &probe, RecordType::A, Duration::from_millis(200)).map(|_| true)
        });
    }

    /// Whether the process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its log: every query and every file it read (`--log-queries`), and its errors.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.files.path("dnsmasq.log")).unwrap_or_default()
    }

    fn arguments(&self) -> Vec<String> {
        let mut args = vec![
            "--keep-in-foreground".to_owned(),
            // No /etc/dnsmasq.conf, no /etc/hosts, no upstream servers: only our records.
            "--conf-file=/dev/null".to_owned(),
            "--no-resolv".to_owned(),
            "--no-hosts".to_owned(),
            "--domain-needed".to_owned(),
            format!("--local=/{}/", self.domain),
            format!("--hostsdir={}", self.files.path("hosts").display()),
            format!("--local-ttl={}", self.ttl),
            format!("--listen-address={}", self.listen),
            "--bind-interfaces".to_owned(),
            "--port=53".to_owned(),
            // No pid file; stay root (its files are ours, whatever the umask).
            "--pid-file=".to_owned(),
            "--user=root".to_owned(),
            "--group=root".to_owned(),
            format!(
                "--log-facility={}",
                self.files.path("dnsmasq.log").display()
            ),
            "--log-queries".to_owned(),
        ];
        for (name, records) in &self.srv {
            args.extend(records.iter().map(|r| {
                format!(
                    "--srv-host={name},{},{},{},{}",
                    r.target, r.port, r.priority, r.weight
                )
            }));
        }
        args
    }

    fn name_in_domain(&self, name: &str) -> String {
        let name = name.trim_end_matches('.');
        assert!(
            name == self.domain || name.ends_with(&format!(".{}", self.domain)),
            "{name} is not in {}: dnsmasq answers only for its domain",
            self.domain
        );
        name.to_owned()
    }

    /// Asks from inside the server's namespace until `done` holds; panics with the log after
    /// [`SETTLE`] or if the process exits.
    fn wait_until(
        &self,
        what: &str,
        done: impl Fn(SocketAddr) -> Result<bool, String> + Send + 'static,
    ) {
        let server = self.address();
        let result = spawn_in(&self.namespace, move || {
            let deadline = Instant::now() + SETTLE;
            let mut last = String::new();
            while Instant::now() < deadline {
                match done(server) {
                    Ok(true) => return Ok(()),
                    Ok(false) => last = "not yet".into(),
                    Err(e) => last = e,
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(last)
        })
        .join()
        .expect("query thread");
        if let Err(last) = result {
            panic!(
                "waited {SETTLE:?} for {what} (last: {last}); dnsmasq's log:\n{}",
                self.log()
            );
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The record types [`query`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordType {
    A,
    Aaaa,
    Srv,
}

impl RecordType {
    fn code(self) -> u16 {
        match self {
            RecordType::A => 1,
            RecordType::Aaaa => 28,
            RecordType::Srv => 33,
        }
    }
}

/// What an answer record holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordData {
    Address(IpAddr),
    Srv(Srv),
    /// Another type, by its number.
    Other(u16),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub ttl: u32,
    pub data: RecordData,
}

/// A server's answer to one question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// [`NOERROR`], [`NXDOMAIN`], [`REFUSED`]...
    pub rcode: u8,
    /// The AA flag: the server owns the name.
    pub authoritative: bool,
    /// The answer section.
    pub records: Vec<Record>,
}

impl Answer {
    pub fn addresses(&self) -> BTreeSet<IpAddr> {
        self.records
            .iter()
            .filter_map(|r| match r.data {
                RecordData::Address(a) => Some(a),
                _ => None,
            })
            .collect()
    }

    pub fn srv(&self) -> BTreeSet<Srv> {
        self.records
            .iter()
            .filter_map(|r| match &r.data {
                RecordData::Srv(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Asks `server` one question over UDP, from the calling thread's namespace, waiting up to
/// `timeout` for the answer.
pub fn query(
    server: SocketAddr,
    name: &str,
    kind: RecordType,
    timeout: Duration,
) -> Result<Answer, String> {
    static NEXT_ID: AtomicU16 = AtomicU16::new(0);
    let id = NEXT_ID
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(std::process::id() as u16);
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).map_err(|e| format!("bind: {e}"))?;
    socket
        .send_to(&question(id, name, kind)?, server)
        .map_err(|e| format!("send to {server}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer from {server} within {timeout:?}"))?;
        socket
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(format!("receive from {server}: {e}")),
        };
        if from == server && n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            return parse_answer(&buf[..n]);
        }
    }
}

/// A query message: header (recursion desired), one question of class IN.
fn question(id: u16, name: &str, kind: RecordType) -> Result<Vec<u8>, String> {
    let mut message = Vec::with_capacity(32 + name.len());
    for field in [id, 0x0100, 1, 0, 0, 0] {
        message.extend_from_slice(&field.to_be_bytes());
    }
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{name:?} is not a valid name"));
        }
        message.push(label.len() as u8);
        message.extend_from_slice(label.as_bytes());
    }
    message.push(0);
    message.extend_from_slice(&kind.code().to_be_bytes());
    message.extend_from_slice(&1u16.to_be_bytes());
    Ok(message)
}

fn parse_answer(message: &[u8]) -> Result<Answer, String> {
    let field = |at: usize| -> Result<u16, String> {
        message
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| format!("truncated at byte {at}"))
    };
    let flags = field(2)?;
    if flags & 0x8000 == 0 {
        return Err("not a response".into());
    }
    let (questions, answers) = (field(4)?, field(6)?);
    let mut at = 12;
    for _ in 0..questions {
        at = read_name(message, at)?.1 + 4;
    }
    let mut records = Vec::with_capacity(answers as usize);
    for _ in 0..answers {
        at = read_name(message, at)?.1;
        let kind = field(at)?;
        let ttl = (u32::from(field(at + 4)?) << 16) | u32::from(field(at + 6)?);
        let length = field(at + 8)? as usize;
        let start = at + 10;
        let rdata = message
            .get(start..start + length)
            .ok_or_else(|| format!("record data truncated at byte {start}"))?;
        let data = match (kind, length) {
            (1, 4) => RecordData::Address(IpAddr::from(<[u8; 4]>::try_from(rdata).unwrap())),
            (28, 16) => RecordData::Address(IpAddr::from(<[u8; 16]>::try_from(rdata).unwrap())),
            (33, 7..) => RecordData::Srv(Srv {
                priority: field(start)?,
                weight: field(start + 2)?,
                port: field(start + 4)?,
                target: read_name(message, start + 6)?.0,
            }),
            (other, _) => RecordData::Other(other),
        };
        records.push(Record { ttl, data });
        at = start + length;
    }
    Ok(Answer {
        rcode: (flags & 0x000f) as u8,
        authoritative: flags & 0x0400 != 0,
        records,
    })
}

/// The name at `at` (following compression pointers) without the trailing dot, and where the
/// data after it starts.
fn read_name(message: &[u8], mut at: usize) -> Result<(String, usize), String> {
    let mut labels = Vec::new();
    let mut end = None;
    for _ in 0..128 {
        let length = *message
            .get(at)
            .ok_or_else(|| format!("name truncated at byte {at}"))? as usize;
        match length {
            0 => {
                return Ok((labels.join("."), end.unwrap_or(at + 1)));
            }
            0xc0.. => {
                let low = *message.get(at + 1).ok_or("pointer truncated")? as usize;
                end.get_or_insert(at + 2);
                at = ((length & 0x3f) << 8) | low;
            }
            _ => {
                let label = message
                    .get(at + 1..at + 1 + length)
                    .ok_or_else(|| format!("label truncated at byte {at}"))?;
                labels.push(String::from_utf8_lossy(label).into_owned());
                at += 1 + length;
            }
        }
    }
    Err("a name with a pointer loop".into())
}

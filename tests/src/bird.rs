//! BIRD 2 (Debian package `bird2`, 2.0.12) as the BGP speakers of a fleet: one instance on each
//! balancer announcing the VIPs it serves, one on the router installing them as one multipath
//! route. docs/fleet.md ("BGP with BIRD 2") explains the two configurations line by line;
//! [`balancer_config`] and [`router_config`] generate exactly those.
//!
//! [`Bird`] runs one instance inside a namespace, with its own config file, control socket
//! and pid file in a directory of its own: several run side by side, and none touches a
//! system `bird` (started by the package elsewhere, say), which uses /run/bird/bird.ctl in
//! the host's namespace. It runs in the foreground (`bird -f`) as a child of the test, so
//! that it is killed with the test's handle (drop, or [`Bird::kill`] to play a crash);
//! [`remove_stale`](crate::netns::remove_stale) kills one a crashed run left in its namespace.
//!
//! What was verified with 2.0.12 (see docs/fleet.md for the figures):
//! - a route `blackhole VIP/32 table 100 proto 250` put into the kernel is learned at once
//!   (netlink notification, not the periodic scan) by a kernel protocol with `learn`, and
//!   exported over eBGP with `next hop self` (the balancer's address); removing it withdraws
//!   it just as fast. IPv6 (`blackhole VIP/128`) the same.
//! - the router's kernel protocol with `merge paths on` installs the routes of several
//!   balancers as one multipath route (RTA_MULTIPATH).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{netns::Netns, scratch::Scratch};

/// Where Debian's `bird2` puts the daemon and its client.
pub const BIRD: &str = "/usr/sbin/bird";
pub const BIRDC: &str = "/usr/sbin/birdc";

/// The kernel routing table the balancer daemon announces its VIPs in, and the route
/// protocol number it marks them with (`ip route add blackhole VIP/32 table 100 proto 250`).
/// Table 100 is read by nothing but BIRD (no `ip rule` points at it), so the blackhole
/// drops nothing: the route is a statement, "this host serves VIP".
pub const VIP_TABLE: u32 = 100;
pub const VIP_ROUTE_PROTO: u8 = 250;

/// BGP timers (seconds): a keepalive every second, the session dropped after 3 without one
/// (BIRD's smallest hold time). The backstop for a peer that vanishes while BFD is not up.
pub const HOLD_TIME: u32 = 3;
pub const KEEPALIVE_TIME: u32 = 1;
/// BFD: a packet every 100 ms each way; a peer silent for 5 of them (0.5 s) is down, and its
/// BGP session with it. BIRD runs BFD on a thread of its own, so a busy main loop does not
/// delay it; a false alarm takes a stall of half a second.
pub const BFD_INTERVAL_MS: u32 = 100;
pub const BFD_MULTIPLIER: u32 = 5;
/// The periodic re-read of the kernel table: changes arrive by netlink notification at
/// once, the scan only repairs a notification the kernel dropped (a full socket buffer).
pub const KERNEL_SCAN_TIME: u32 = 30;

/// How long after a peer's last BFD packet it is declared down.
pub fn bfd_detection_time() -> Duration {
    Duration::from_millis(u64::from(BFD_INTERVAL_MS * BFD_MULTIPLIER))
}

/// How long a start or a session may take here.
const SETTLE: Duration = Duration::from_secs(15);

/// The options every BGP session of the fleet shares (both ends), commented.
fn session_options() -> String {
    format!(
        "  # Failure detection: BFD (protocol bfd), the hold timer as the backstop.
  bfd on;
  hold time {HOLD_TIME};
  keepalive time {KEEPALIVE_TIME};
  # Come back quickly: first connect 1 s after start (not 5), retry a refused connect after
  # 2 s (not 120), and restart 1 s after an error (a hold timer, BFD down), doubling for
  # errors in a row up to 10 s (not 60 to 300).
  connect delay time 1;
  connect retry time 2;
  error wait time 1, 10;
  # A peer that is gone is gone: its routes leave with the session, none kept stale for a
  # graceful restart.
  graceful restart off;
"
    )
}

/// BFD for every session that asks for it (`bfd on`), on any interface.
fn bfd_protocol() -> String {
    format!(
        "# BFD for the sessions that ask for it (`bfd on`): a packet every {BFD_INTERVAL_MS} ms each
# way, the peer down after {BFD_MULTIPLIER} missed ({detection} ms), and the BGP session with it.
protocol bfd {{
  interface \"*\" {{
    interval {BFD_INTERVAL_MS} ms;
    multiplier {BFD_MULTIPLIER};
  }};
}}
",
        detection = BFD_INTERVAL_MS * BFD_MULTIPLIER
    )
}

/// `ipv4` or `ipv6`, the channel of the session's address family.
fn channel(address: IpAddr) -> &'static str {
    if address.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

/// A balancer's BIRD: learns the routes of kernel table `table` (the VIPs the daemon serves)
/// and announces them to the router over eBGP, with itself as the next hop. The address
/// family is that of `local_addr` (and `router_addr`): VIPs of the other family need a
/// session of their own.
pub fn balancer_config(
    router_id: Ipv4Addr,
    local_as: u32,
    local_addr: IpAddr,
    router_addr: IpAddr,
    router_as: u32,
    table: u32,
) -> String {
    assert_eq!(
        local_addr.is_ipv4(),
        router_addr.is_ipv4(),
        "one session carries one address family"
    );
    let channel = channel(local_addr);
    format!(
        "router id {router_id};

# Interfaces and their addresses (BGP needs them to reach the router).
protocol device {{
}}

# The VIPs this host serves: the routes the balancer daemon puts into kernel table {table}
# (blackhole VIP proto {VIP_ROUTE_PROTO}), learned although BIRD did not write them (`learn`),
# and never written back (`export none`).
protocol kernel vips {{
  {channel} {{
    import all;
    export none;
  }};
  kernel table {table};
  learn;
  scan time {KERNEL_SCAN_TIME};
}}

{bfd}
# The session to the router: every learned VIP, with this host as the next hop.
protocol bgp uplink {{
  local {local_addr} as {local_as};
  neighbor {router_addr} as {router_as};
{session}  {channel} {{
    import none;
    export all;
    next hop self;
  }};
}}
",
        bfd = bfd_protocol(),
        session = session_options(),
    )
}

/// The name of the router's BGP protocol for the peer at `address` (`peer_10_91_0_2`).
pub fn peer_protocol(address: IpAddr) -> String {
    format!("peer_{}", address.to_string().replace(['.', ':'], "_"))
}

/// The router's BIRD: one eBGP session per peer (`(address, AS)`), their routes into the
/// kernel's main table, where the routes of several peers for one prefix become one
/// multipath route. The family is that of the peers' addresses.
pub fn router_config(router_id: Ipv4Addr, local_as: u32, peers: &[(IpAddr, u32)]) -> String {
    let Some(((first, _), rest)) = peers.split_first() else {
        panic!("a router config needs peers");
    };
    assert!(
        rest.iter().all(|(a, _)| a.is_ipv4() == first.is_ipv4()),
        "one family per router config: {peers:?}"
    );
    let channel = channel(*first);
    let sessions: String = peers
        .iter()
        .map(|(address, asn)| {
            format!(
                "protocol bgp {} from balancer {{ neighbor {address} as {asn}; }}\n",
                peer_protocol(*address)
            )
        })
        .collect();
    format!(
        "router id {router_id};

protocol device {{
}}

# What the balancers announce goes into the main table; the routes of several of them for
# one VIP (equal for BGP's choice) become one route with a next hop for each
# (`merge paths on`). Nothing is learned from the kernel.
protocol kernel {{
  {channel} {{
    import none;
    export all;
  }};
  merge paths on;
}}

{bfd}
# One session per balancer: take what it announces, announce nothing to it.
template bgp balancer {{
  local as {local_as};
{session}  {channel} {{
    import all;
    export none;
  }};
}}

{sessions}",
        bfd = bfd_protocol(),
        session = session_options(),
    )
}

/// A protocol's line of `show protocols`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolState {
    /// `up`, `start`, `down`...
    pub state: String,
    /// The rest of the line after the time: `Established`, `Active  Socket: ...`...
    pub info: String,
}

impl ProtocolState {
    pub fn established(&self) -> bool {
        self.state == "up" && self.info.starts_with("Established")
    }
}

/// The line of protocol `name` in the output of `show protocols`.
pub fn protocol_state(show_protocols: &str, name: &str) -> Option<ProtocolState> {
    show_protocols.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first() != Some(&name) || fields.len() < 5 {
            return None;
        }
        // Name Proto Table State Since [Info...]; Since is one field (a time, or a date
        // when older than a day, in BIRD's default "iso short" format).
        Some(ProtocolState {
            state: fields[3].to_owned(),
            info: fields[5..].join(" "),
        })
    })
}

/// Whether `show bfd sessions` lists a session with `peer` that is Up.
pub fn bfd_session_up(show_bfd_sessions: &str, peer: IpAddr) -> bool {
    show_bfd_sessions.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.first().and_then(|a| a.parse::<IpAddr>().ok()) == Some(peer)
            && fields.get(2) == Some(&"Up")
    })
}

/// One BIRD instance in a namespace; killed on drop.
pub struct Bird {
    namespace: String,
    /// config, control socket, pid file and log. Kept when a test panics.
    files: Scratch,
    child: Option<Child>,
}

impl Bird {
    /// Starts BIRD in `ns` with `config`, its files in `/tmp/<namespace>-bird`; returns once it
    /// answers on its control socket.
    pub fn start(ns: &Netns, config: &str) -> Bird {
        assert!(
            Path::new(BIRD).is_file() && Path::new(BIRDC).is_file(),
            "{BIRD} or {BIRDC} is missing: install Debian's bird2 (`cargo xtask setup` does, \
             without starting its system service)"
        );
        let files = Scratch::named(&format!("{}-bird", ns.name()));
        // BIRD's own messages and anything it prints before reading its config, in one file.
        let text = format!("log stderr all;\n\n{config}");
        std::fs::write(files.path("bird.conf"), text).expect("write bird.conf");
        let mut bird = Bird {
            namespace: ns.name().to_owned(),
            files,
            child: None,
        };
        bird.restart();
        bird
    }

    /// Starts it again (after [`kill`](Self::kill)) with the same config, killing it first if
    /// it runs; returns once it answers.
    pub fn restart(&mut self) {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.files.path("bird.log"))
            .expect("open bird.log");
        let path = |name: &str| self.files.path(name).to_str().expect("UTF-8").to_owned();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.namespace, BIRD, "-f"])
            .args(["-c", &path("bird.conf")])
            .args(["-s", &path("bird.ctl")])
            .args(["-P", &path("bird.pid")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {BIRD}: {e}"));
        self.child = Some(child);
        self.wait_until("BIRD to answer on its socket", |bird| {
            bird.birdc(&["show", "status"])
                .map(|out| out.contains("Daemon is up and running"))
        });
    }

    /// Kills it at once (SIGKILL), as a crash would: no BGP notification, the kernel closes
    /// its sockets.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `birdc -s SOCKET ARGS...`: its output, or why it failed.
    pub fn birdc(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(BIRDC)
            .arg("-s")
            .arg(self.files.path("bird.ctl"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {BIRDC}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "birdc {} failed ({}): {stdout}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `show protocols` (every protocol, one line each).
    pub fn protocols(&self) -> String {
        self.birdc(&["show", "protocols"]).unwrap_or_else(|e| e)
    }

    /// The state of protocol `name`, if BIRD answers and has it.
    pub fn protocol(&self, name: &str) -> Option<ProtocolState> {
        protocol_state(&self.birdc(&["show", "protocols", name]).ok()?, name)
    }

    /// `show route all` (every route of every table, with its attributes).
    pub fn routes(&self) -> String {
        self.birdc(&["show", "route", "all"]).unwrap_or_else(|e| e)
    }

    /// Waits until BGP protocol `name` is Established; returns how long it took.
    pub fn wait_established(&mut self, name: &str) -> Duration {
        self.wait_until(&format!("BGP session {name} to be Established"), |bird| {
            Ok(bird.protocol(name).is_some_and(|s| s.established()))
        })
    }

    /// Waits until the BFD session with `peer` is Up; returns how long it took.
    pub fn wait_bfd_up(&mut self, peer: IpAddr) -> Duration {
        self.wait_until(&format!("the BFD session with {peer} to be Up"), |bird| {
            Ok(bfd_session_up(
                &bird.birdc(&["show", "bfd", "sessions"])?,
                peer,
            ))
        })
    }

    /// BIRD's log (and whatever it printed).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.files.path("bird.log")).unwrap_or_default()
    }

    /// Polls `done` every 20 ms until it holds; returns how long that took. Panics after
    /// [`SETTLE`], or when the process exits, with what it waited for, the last answer, the
    /// protocols and the log.
    fn wait_until(&mut self, what: &str, done: impl Fn(&Bird) -> Result<bool, String>) -> Duration {
        let started = Instant::now();
        let mut last = String::from("nothing yet");
        while started.elapsed() < SETTLE {
            match done(self) {
                Ok(true) => return started.elapsed(),
                Ok(false) => last = self.protocols(),
                Err(e) => last = e,
            }
            if !self.running() {
                panic!(
                    "BIRD in {} exited while waiting for {what}; its log:\n{}",
                    self.namespace,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "waited {SETTLE:?} in {} for {what}; last seen:\n{last}\nBIRD's log:\n{}",
            self.namespace,
            self.log()
        );
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // birdc 2.0.12's answers, captured in the fleet topology.
    const PROTOCOLS: &str = "BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     21:57:20.757  
kernel1    Kernel     master4    up     21:57:20.757  
bfd1       BFD        ---        up     21:57:20.757  
peer_10_91_0_2 BGP        ---        up     21:57:21.530  Established   
peer_10_91_0_3 BGP        ---        start  21:56:44.652  Active        Socket: Connection refused
";
    const BFD_SESSIONS: &str = "BIRD 2.0.12 ready.
bfd1:
IP address                Interface  State      Since         Interval  Timeout
10.91.0.4                 eth1       Up         21:57:21.512    0.100    0.500
10.91.0.2                 eth1       Down       21:57:21.512    1.000    0.000
";

    #[test]
    fn protocol_lines_read() {
        let cases = [
            ("peer_10_91_0_2", Some(("up", "Established", true))),
            (
                "peer_10_91_0_3",
                Some(("start", "Active Socket: Connection refused", false)),
            ),
            ("kernel1", Some(("up", "", false))),
            ("peer_10_91_0_4", None),
        ];
        for (name, expected) in cases {
            let got = protocol_state(PROTOCOLS, name);
            assert_eq!(
                got.as_ref()
                    .map(|s| (s.state.as_str(), s.info.as_str(), s.established())),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn bfd_sessions_read() {
        let up = |a: &str| bfd_session_up(BFD_SESSIONS, a.parse().unwrap());
        assert!(up("10.91.0.4"));
        assert!(!up("10.91.0.2"), "Down");
        assert!(!up("10.91.0.3"), "no session");
    }

    #[test]
    fn configs_name_their_peers_and_family() {
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        let router = router_config(
            Ipv4Addr::new(10, 91, 0, 254),
            65000,
            &[(ip("10.91.0.2"), 65001), (ip("10.91.0.3"), 65001)],
        );
        assert!(router.contains(
            "protocol bgp peer_10_91_0_3 from balancer { neighbor 10.91.0.3 as 65001; }"
        ));
        assert!(router.contains("merge paths on;") && router.contains("  ipv4 {"));
        let balancer = balancer_config(
            Ipv4Addr::new(10, 91, 0, 2),
            65001,
            ip("fd91::2"),
            ip("fd91::fe"),
            65000,
            VIP_TABLE,
        );
        for line in [
            "kernel table 100;",
            "learn;",
            "neighbor fd91::fe as 65000;",
            "  ipv6 {",
            "next hop self;",
            "bfd on;",
        ] {
            assert!(balancer.contains(line), "{line} missing from:\n{balancer}");
        }
    }
}

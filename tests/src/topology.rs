//! The direct-server-return topology of the demo and the end-to-end tests: a client, the
//! balancer and N backends, each in its own namespace, on one L2 segment (a bridge in a
//! "switch" namespace).
//!
//! ```text
//!  client 10.99.0.1 ─┐
//!  balancer 10.99.0.2 ┼── br0 (switch namespace)
//!  backend i 10.99.0.(10+i) ─┘      VIP 10.99.100.1 on every backend's lo
//! ```
//! The client routes the VIP via the balancer; the balancer's XDP program rewrites the MACs
//! and sends the frame back out to a backend; the backend answers the client directly.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use crate::{
    bird::{self, Bird},
    http::HttpServer,
    netns::Netns,
    process::BalancerProcess,
    scratch::Scratch,
};

pub const SUBNET_PREFIX: u8 = 24;
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const BALANCER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
pub const VIP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 1);
/// The interface name inside every host namespace.
pub const HOST_IF: &str = "eth0";

/// Where backends' HTTP servers listen.
pub const HTTP_LISTEN: std::net::SocketAddrV4 =
    std::net::SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80);

pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 11 + i as u8)
}

pub struct DsrTopology {
    /// `balancer xdp-pass` on the balancer's veth peer (see `create`).
    pub peer_pass: BalancerProcess,
    /// Its log.
    pub files: Scratch,
    pub client: Netns,
    pub balancer: Netns,
    pub backends: Vec<Netns>,
    // Dropped last: deleting it removes the bridge and every switch-side port.
    pub switch: Netns,
}

impl DsrTopology {
    /// Creates the namespaces `<prefix>sw`, `<prefix>client`, `<prefix>lb`, `<prefix>be1`...
    pub fn create(prefix: &str, backends: usize) -> DsrTopology {
        let switch = Netns::create(&format!("{prefix}sw"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);

        let client = Netns::create(&format!("{prefix}client"));
        let balancer = Netns::create(&format!("{prefix}lb"));
        let backend_ns: Vec<Netns> = (0..backends)
            .map(|i| Netns::create(&format!("{prefix}be{}", i + 1)))
            .collect();

        let plug = |host: &Netns, port: &str, address: Ipv4Addr| {
            plug(&switch, "br0", host, port, HOST_IF, &[address]);
        };
        plug(&client, "p-client", CLIENT_ADDR);
        plug(&balancer, "p-lb", BALANCER_ADDR);
        for (i, ns) in backend_ns.iter().enumerate() {
            plug(ns, &format!("p-be{}", i + 1), backend_addr(i));
        }

        // A veth delivers XDP_TX frames only to a peer that has an XDP program of its own.
        let files = Scratch::named(&format!("{prefix}files"));
        let peer_pass = start_peer_pass(&switch, "p-lb", &files.path("xdp-pass.log"));

        // Local TCP stacks hand veth partial checksums; forwarded frames must carry full ones.
        client.exec("ethtool", &["-K", HOST_IF, "tx", "off"]);
        for ns in &backend_ns {
            ns.exec("ethtool", &["-K", HOST_IF, "tx", "off"]);
        }

        // The client reaches the VIP through the balancer.
        client.ip(&[
            "route",
            "add",
            &format!("{VIP_ADDR}/32"),
            "via",
            &BALANCER_ADDR.to_string(),
        ]);

        for ns in &backend_ns {
            hold_vip(ns, VIP_ADDR);
        }

        DsrTopology {
            peer_pass,
            files,
            client,
            balancer,
            backends: backend_ns,
            switch,
        }
    }

    /// Starts an HTTP server on port 80 of every address of every backend (the VIP for
    /// clients, the backend's own address for health checks); `name(i)` is what backend `i`
    /// puts in its responses.
    pub fn start_http_servers(&self, name: impl Fn(usize) -> String) -> Vec<HttpServer> {
        servers_on_port_80(&self.backends, name)
    }

    /// The MAC address of a host's `eth0`.
    pub fn mac(ns: &Netns) -> String {
        let out = ns.exec("cat", &[&format!("/sys/class/net/{HOST_IF}/address")]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Permanent ARP entries for the balancer on the client and for the client on the
    /// backends, so that the client sends nothing but the test's own traffic (its interface
    /// counters then count exactly the packets that reach the balancer).
    pub fn pin_arp(&self) {
        let pin = |ns: &Netns, address: Ipv4Addr, mac: &str| {
            ns.ip(&[
                "neigh",
                "replace",
                &address.to_string(),
                "lladdr",
                mac,
                "dev",
                HOST_IF,
                "nud",
                "permanent",
            ]);
        };
        pin(&self.client, BALANCER_ADDR, &Self::mac(&self.balancer));
        let client_mac = Self::mac(&self.client);
        for backend in &self.backends {
            pin(backend, CLIENT_ADDR, &client_mac);
        }
    }
}

/// The tunnel topology: the client and the balancer on one network, the backends on another,
/// a router between them, dual-stack. The balancer encapsulates towards backends it cannot
/// reach at layer 2; the backends decapsulate (`balancer decap`) and answer the client
/// directly through the router.
///
/// ```text
///  client 10.98.0.1 fd98::1 ─┐                              ┌─ backend i 10.97.0.(10+i) fd97::(10+i)
///  balancer 10.98.0.2 fd98::2 ┼─ br0 ─ router (.254, ::fe) ─ br1 ┤   VIPs 10.98.100.1, fd98:100::1 on lo
///                            ┘                              └─
/// ```
pub struct TunnelTopology {
    pub peer_pass: BalancerProcess,
    pub files: Scratch,
    pub client: Netns,
    pub balancer: Netns,
    pub router: Netns,
    pub backends: Vec<Netns>,
    pub switch: Netns,
}

pub const TUNNEL_VIP4: Ipv4Addr = Ipv4Addr::new(10, 98, 100, 1);
pub const TUNNEL_VIP6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd98, 0x100, 0, 0, 0, 0, 0, 1);
/// An IPv4 VIP whose backends are reached over IPv6 (IPv4 in IPv6).
pub const TUNNEL_VIP46: Ipv4Addr = Ipv4Addr::new(10, 98, 100, 2);

pub fn tunnel_backend_addrs(i: usize) -> (Ipv4Addr, std::net::Ipv6Addr) {
    (
        Ipv4Addr::new(10, 97, 0, 11 + i as u8),
        std::net::Ipv6Addr::new(0xfd97, 0, 0, 0, 0, 0, 0, 0x11 + i as u16),
    )
}

impl TunnelTopology {
    pub fn create(prefix: &str, backends: usize) -> TunnelTopology {
        let switch = Netns::create(&format!("{prefix}sw"));
        for br in ["br0", "br1"] {
            switch.ip(&["link", "add", br, "type", "bridge"]);
            switch.ip(&["link", "set", br, "up"]);
        }
        let host = |name: &str| {
            let ns = Netns::create(&format!("{prefix}{name}"));
            ns.enable_ipv6();
            ns
        };
        let client = host("client");
        let balancer = host("lb");
        let router = host("router");
        let backend_ns: Vec<Netns> = (0..backends)
            .map(|i| host(&format!("be{}", i + 1)))
            .collect();

        let plug = |ns: &Netns, port: &str, bridge: &str, inside: &str, v4: &str, v6: &str| {
            switch.veth(port, ns, inside);
            switch.ip(&["link", "set", port, "master", bridge, "up"]);
            ns.ip(&["addr", "add", v4, "dev", inside]);
            ns.ip(&["-6", "addr", "add", v6, "dev", inside, "nodad"]);
            ns.ip(&["link", "set", inside, "up"]);
        };
        plug(
            &client,
            "p-client",
            "br0",
            HOST_IF,
            "10.98.0.1/24",
            "fd98::1/64",
        );
        plug(
            &balancer,
            "p-lb",
            "br0",
            HOST_IF,
            "10.98.0.2/24",
            "fd98::2/64",
        );
        plug(
            &router,
            "p-router0",
            "br0",
            "eth0",
            "10.98.0.254/24",
            "fd98::fe/64",
        );
        plug(
            &router,
            "p-router1",
            "br1",
            "eth1",
            "10.97.0.254/24",
            "fd97::fe/64",
        );
        for (i, ns) in backend_ns.iter().enumerate() {
            let (a4, a6) = tunnel_backend_addrs(i);
            plug(
                ns,
                &format!("p-be{}", i + 1),
                "br1",
                HOST_IF,
                &format!("{a4}/24"),
                &format!("{a6}/64"),
            );
        }
        router.sysctl("net.ipv4.ip_forward", "1");
        router.sysctl("net.ipv6.conf.all.forwarding", "1");

        // Routes: the client reaches the VIPs through the balancer; the balancer reaches the
        // backends' network through the router; backends answer everything through the router.
        client.ip(&[
            "route",
            "add",
            &format!("{TUNNEL_VIP4}/32"),
            "via",
            "10.98.0.2",
        ]);
        client.ip(&[
            "route",
            "add",
            &format!("{TUNNEL_VIP46}/32"),
            "via",
            "10.98.0.2",
        ]);
        client.ip(&[
            "-6",
            "route",
            "add",
            &format!("{TUNNEL_VIP6}/128"),
            "via",
            "fd98::2",
        ]);
        balancer.ip(&["route", "add", "10.97.0.0/24", "via", "10.98.0.254"]);
        balancer.ip(&["-6", "route", "add", "fd97::/64", "via", "fd98::fe"]);
        for ns in &backend_ns {
            ns.ip(&["route", "add", "default", "via", "10.97.0.254"]);
            ns.ip(&["-6", "route", "add", "default", "via", "fd97::fe"]);
            ns.ip(&["addr", "add", &format!("{TUNNEL_VIP4}/32"), "dev", "lo"]);
            ns.ip(&["addr", "add", &format!("{TUNNEL_VIP46}/32"), "dev", "lo"]);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{TUNNEL_VIP6}/128"),
                "dev",
                "lo",
            ]);
            ns.exec("ethtool", &["-K", HOST_IF, "tx", "off"]);
        }
        client.exec("ethtool", &["-K", HOST_IF, "tx", "off"]);

        let files = Scratch::named(&format!("{prefix}files"));
        let peer_pass = start_peer_pass(&switch, "p-lb", &files.path("xdp-pass.log"));
        TunnelTopology {
            peer_pass,
            files,
            client,
            balancer,
            router,
            backends: backend_ns,
            switch,
        }
    }

    /// HTTP servers on port 80 of every address (IPv4 and IPv6) of every backend.
    pub fn start_http_servers(&self, name: impl Fn(usize) -> String) -> Vec<HttpServer> {
        let listen = std::net::SocketAddr::from(([0u16; 8], 80));
        self.backends
            .iter()
            .enumerate()
            .map(|(i, ns)| HttpServer::start(ns, &name(i), listen))
            .collect()
    }
}

/// A direct-server-return backend: `vip` on its loopback, and ARP answered only for
/// addresses of the asking interface, announced with the interface's own address, so that
/// only the balancer is ever seen as the VIP's owner on the segment.
fn hold_vip(ns: &Netns, vip: Ipv4Addr) {
    ns.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"]);
    ns.sysctl("net.ipv4.conf.all.arp_ignore", "1");
    ns.sysctl("net.ipv4.conf.all.arp_announce", "2");
}

/// An HTTP server on port 80 of every address of every one of `backends`; `name(i)` is
/// what backend `i` puts in its responses.
fn servers_on_port_80(backends: &[Netns], name: impl Fn(usize) -> String) -> Vec<HttpServer> {
    let listen = HTTP_LISTEN.into();
    backends
        .iter()
        .enumerate()
        .map(|(i, ns)| HttpServer::start(ns, &name(i), listen))
        .collect()
}

/// Plugs `host` into `bridge` of `switch`: a veth pair with `port` on the switch's side (in
/// the bridge) and `inside` in the host, which gets `addresses` (/24); both ends up.
fn plug(
    switch: &Netns,
    bridge: &str,
    host: &Netns,
    port: &str,
    inside: &str,
    addresses: &[Ipv4Addr],
) {
    switch.veth(port, host, inside);
    switch.ip(&["link", "set", port, "master", bridge, "up"]);
    for address in addresses {
        let address = format!("{address}/{SUBNET_PREFIX}");
        host.ip(&["addr", "add", &address, "dev", inside]);
    }
    host.ip(&["link", "set", inside, "up"]);
}

/// `balancer xdp-pass` on a veth peer the balancer transmits into, once it is attached.
fn start_peer_pass(switch: &Netns, port: &str, log: &std::path::Path) -> BalancerProcess {
    let mut peer_pass = BalancerProcess::start(switch, &["xdp-pass", "--interface", port], log);
    // Generous: in the VM tier's emulated machine, with tests running side by side, loading
    // the object took over 20 s once.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let link = switch.ip(&["link", "show", port]);
        if String::from_utf8_lossy(&link.stdout).contains("prog/xdp") {
            return peer_pass;
        }
        assert!(
            Instant::now() < deadline && peer_pass.running(),
            "xdp-pass did not attach:\n{}",
            peer_pass.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The NAT topology: unmodified backends (no VIP on a loopback, no ARP settings, no route to
/// the client's network at all) on a subnet of their own, and the client on another; the
/// balancer has an address on both, on its one interface.
///
/// ```text
///  client 10.96.0.1 ─┐
///  balancer 10.96.0.2, 10.95.0.1 ┼── br0 (switch namespace)
///  backend i 10.95.0.(11+i) ─┘      HTTP on :8080, only a route to 10.95.0.0/24
/// ```
/// The client routes the VIP via the balancer. With full NAT the backends answer the SNAT
/// address (the balancer's 10.95.0.1), which the balancer's XDP program translates back to
/// the VIP and sends to the client.
pub struct NatTopology {
    pub peer_pass: BalancerProcess,
    /// With two legs: `balancer xdp-pass` on the peer of the balancer's second interface.
    pub second_pass: Option<BalancerProcess>,
    pub files: Scratch,
    pub client: Netns,
    pub balancer: Netns,
    /// The backends created with the topology, then those added (`add_backend`), in order.
    pub backends: Vec<Netns>,
    /// The DNS server's host, once added (`add_dns_host`).
    pub dns: Option<Netns>,
    pub switch: Netns,
    prefix: String,
    /// The bridge the backends are plugged into.
    backend_bridge: &'static str,
}

pub const NAT_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
pub const NAT_BALANCER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);
/// The balancer's address on the backends' subnet (the default SNAT address).
pub const NAT_SNAT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 1);
pub const NAT_VIP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 1);
/// Where NAT backends' HTTP servers listen.
pub const NAT_BACKEND_PORT: u16 = 8080;
/// The DNS server's host on the backends' subnet (`add_dns_host`).
pub const NAT_DNS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 53);

pub fn nat_backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 95, 0, 11 + i as u8)
}

impl NatTopology {
    /// Creates the namespaces `<prefix>sw`, `<prefix>client`, `<prefix>lb`, `<prefix>be1`...
    pub fn create(prefix: &str, backends: usize) -> NatTopology {
        Self::build(prefix, backends, false)
    }

    /// Like [`create`](Self::create), with the backends on a bridge of their own (`br1`),
    /// which the balancer reaches through a second interface, `eth1` (10.95.0.1): replies
    /// arrive there, not on the interface the balancer is configured with.
    pub fn create_two_legs(prefix: &str, backends: usize) -> NatTopology {
        Self::build(prefix, backends, true)
    }

    fn build(prefix: &str, backends: usize, two_legs: bool) -> NatTopology {
        let switch = Netns::create(&format!("{prefix}sw"));
        for br in ["br0", "br1"] {
            switch.ip(&["link", "add", br, "type", "bridge"]);
            switch.ip(&["link", "set", br, "up"]);
        }
        let client = Netns::create(&format!("{prefix}client"));
        let balancer = Netns::create(&format!("{prefix}lb"));
        let backend_ns: Vec<Netns> = (0..backends)
            .map(|i| Netns::create(&format!("{prefix}be{}", i + 1)))
            .collect();
        let plug =
            |host: &Netns, port: &str, bridge: &str, inside: &str, addresses: &[Ipv4Addr]| {
                plug(&switch, bridge, host, port, inside, addresses);
                // Local TCP stacks hand veth partial checksums; translated frames must carry
                // full ones (see the README).
                host.exec("ethtool", &["-K", inside, "tx", "off"]);
            };
        plug(&client, "p-client", "br0", HOST_IF, &[NAT_CLIENT_ADDR]);
        let backend_bridge = if two_legs {
            plug(&balancer, "p-lb", "br0", HOST_IF, &[NAT_BALANCER_ADDR]);
            plug(&balancer, "p-lb1", "br1", "eth1", &[NAT_SNAT_ADDR]);
            "br1"
        } else {
            plug(
                &balancer,
                "p-lb",
                "br0",
                HOST_IF,
                &[NAT_BALANCER_ADDR, NAT_SNAT_ADDR],
            );
            "br0"
        };
        for (i, ns) in backend_ns.iter().enumerate() {
            plug(
                ns,
                &format!("p-be{}", i + 1),
                backend_bridge,
                HOST_IF,
                &[nat_backend_addr(i)],
            );
        }
        let files = Scratch::named(&format!("{prefix}files"));
        let peer_pass = start_peer_pass(&switch, "p-lb", &files.path("xdp-pass.log"));
        let second_pass =
            two_legs.then(|| start_peer_pass(&switch, "p-lb1", &files.path("xdp-pass-1.log")));
        client.ip(&[
            "route",
            "add",
            &format!("{NAT_VIP_ADDR}/32"),
            "via",
            &NAT_BALANCER_ADDR.to_string(),
        ]);
        NatTopology {
            peer_pass,
            second_pass,
            files,
            client,
            balancer,
            backends: backend_ns,
            dns: None,
            switch,
            prefix: prefix.to_owned(),
            backend_bridge,
        }
    }

    /// A host on the backends' bridge: namespace `<prefix><name>`, the switch's port `port`.
    fn plug_backend_side(&self, name: &str, port: &str, address: Ipv4Addr) -> Netns {
        let host = Netns::create(&format!("{}{name}", self.prefix));
        plug(
            &self.switch,
            self.backend_bridge,
            &host,
            port,
            HOST_IF,
            &[address],
        );
        // As for every host (see `build`).
        host.exec("ethtool", &["-K", HOST_IF, "tx", "off"]);
        host
    }

    /// Adds backend `i` while the topology runs, as `build` creates the first ones:
    /// namespace `<prefix>be{i+1}`, address [`nat_backend_addr`]`(i)`, on the backends'
    /// bridge. Start its server with `HttpServer::start(ns, name, (nat_backend_addr(i),
    /// NAT_BACKEND_PORT))`.
    pub fn add_backend(&mut self, i: usize) -> &Netns {
        assert!(
            self.backend(i).is_none(),
            "backend {i} ({}) exists already",
            nat_backend_addr(i)
        );
        let host = self.plug_backend_side(
            &format!("be{}", i + 1),
            &format!("p-be{}", i + 1),
            nat_backend_addr(i),
        );
        // An address used before (backend `i` removed and added again) is still known to the
        // balancer under the old host's MAC, and connections to it would wait for that entry
        // to go stale. Real networks correct it with a gratuitous ARP; a veth's (arp_notify)
        // is sent before the bridge forwards on the new port, and lost.
        self.balancer
            .ip(&["neigh", "flush", "to", &nat_backend_addr(i).to_string()]);
        self.backends.push(host);
        self.backends.last().expect("just added")
    }

    /// Backend `i` (created with the topology or added), if it is there.
    pub fn backend(&self, i: usize) -> Option<&Netns> {
        let name = format!("{}be{}", self.prefix, i + 1);
        self.backends.iter().find(|b| b.name() == name)
    }

    /// Removes backend `i`: unplugs it from the bridge at once (deleting the switch's end of
    /// its veth), then deletes its namespace. Stop its server first: a thread or socket
    /// inside keeps a namespace alive after `ip netns del`, though unplugged.
    pub fn remove_backend(&mut self, i: usize) {
        let name = format!("{}be{}", self.prefix, i + 1);
        let at = self
            .backends
            .iter()
            .position(|b| b.name() == name)
            .unwrap_or_else(|| panic!("no backend {i} ({name}) to remove"));
        self.switch.ip(&["link", "del", &format!("p-be{}", i + 1)]);
        self.backends.remove(at);
    }

    /// Adds a host for a DNS server on the backends' bridge: namespace `<prefix>dns`,
    /// address [`NAT_DNS_ADDR`]. The balancer reaches it from its address on that subnet.
    pub fn add_dns_host(&mut self) -> &Netns {
        assert!(self.dns.is_none(), "the DNS host exists already");
        let host = self.plug_backend_side("dns", "p-dns", NAT_DNS_ADDR);
        self.dns.insert(host)
    }

    /// Destination-only NAT: the backends reach the client's network through the balancer,
    /// their gateway.
    pub fn route_backends_via_balancer(&self) {
        for ns in &self.backends {
            ns.ip(&[
                "route",
                "add",
                &format!(
                    "{}/{SUBNET_PREFIX}",
                    Ipv4Addr::from(u32::from(NAT_CLIENT_ADDR) & !0xff)
                ),
                "via",
                &NAT_SNAT_ADDR.to_string(),
            ]);
        }
    }

    /// An HTTP server on every backend's own address, port 8080; `name(i)` is what backend
    /// `i` puts in its responses.
    pub fn start_http_servers(&self, name: impl Fn(usize) -> String) -> Vec<HttpServer> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let listen = std::net::SocketAddrV4::new(nat_backend_addr(i), NAT_BACKEND_PORT);
                HttpServer::start(ns, &name(i), listen.into())
            })
            .collect()
    }

    /// Every namespace of the topology, with a name for messages.
    pub fn hosts(&self) -> Vec<(&str, &Netns)> {
        let mut hosts = vec![("client", &self.client), ("balancer", &self.balancer)];
        hosts.extend(self.backends.iter().map(|b| ("backend", b)));
        hosts.extend(self.dns.iter().map(|d| ("dns", d)));
        hosts
    }
}

/// `InCsumErrors` of IPv4 (`Ip:` is not it: the TCP and UDP lines) in /proc/net/snmp of `ns`:
/// segments and datagrams the stack dropped for a bad checksum.
pub fn checksum_errors(ns: &Netns) -> u64 {
    let out = ns.exec("cat", &["/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    let mut total = 0;
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        let names: Vec<&str> = names.split_whitespace().collect();
        let values: Vec<&str> = values.split_whitespace().collect();
        if let Some(i) = names.iter().position(|n| *n == "InCsumErrors") {
            total += values
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// A fleet of balancers behind a router that spreads flows over them (ECMP), in front of
/// backends on the balancers' L2 segment (direct server return).
///
/// ```text
///  client 10.90.0.1 ── router (10.90.0.254 | 10.91.0.254) ── br0 ┬─ balancer i 10.91.0.(2+i)
///                       VIP 10.90.100.1 via a nexthop group        └─ backend i 10.91.0.(11+i),
///                       over the balancers                              VIP on lo, default
///                                                                       route via the router
/// ```
///
/// Two ways for the router to know the balancers: [`create`](Self::create) programs a
/// resilient nexthop group ([`route_over`](Self::route_over) changes it, as a withdrawal
/// would); [`create_bgp`](Self::create_bgp) runs BIRD on the router and on every balancer
/// instead, and the router's VIP route is the multipath route BIRD installs from what the
/// balancers announce (see [`FleetBgp`]).
pub struct FleetTopology {
    /// The BGP speakers ([`create_bgp`](Self::create_bgp)); dropped first, before their
    /// namespaces.
    pub bgp: Option<FleetBgp>,
    /// `balancer xdp-pass` on each balancer's switch-side veth peer.
    pub peer_passes: Vec<BalancerProcess>,
    pub files: Scratch,
    pub client: Netns,
    pub router: Netns,
    pub balancers: Vec<Netns>,
    pub backends: Vec<Netns>,
    // Dropped last: deleting it removes the bridge and every switch-side port.
    pub switch: Netns,
}

/// The BIRD instances of a BGP fleet: eBGP between the router (AS [`FLEET_ROUTER_AS`]) and
/// each balancer (AS [`FLEET_BALANCER_AS`], one for the whole fleet), configured by
/// [`bird::router_config`] and [`bird::balancer_config`]. A balancer announces what is in
/// its kernel table [`bird::VIP_TABLE`]; the router installs one multipath route per VIP in
/// its main table.
pub struct FleetBgp {
    pub router: Bird,
    /// Balancer `i`'s BIRD at `i`.
    pub balancers: Vec<Bird>,
}

pub const FLEET_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 1);
pub const FLEET_ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 254);
pub const FLEET_ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 91, 0, 254);
pub const FLEET_VIP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 90, 100, 1);
/// The router's nexthop group over the balancers.
pub const FLEET_GROUP: &str = "100";
/// Private AS numbers of the BGP fleet: the router's, and the balancers' (all of them).
pub const FLEET_ROUTER_AS: u32 = 65000;
pub const FLEET_BALANCER_AS: u32 = 65001;

pub fn fleet_balancer_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 91, 0, 2 + i as u8)
}

pub fn fleet_backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 91, 0, 11 + i as u8)
}

impl FleetTopology {
    /// Creates `<prefix>sw`, `<prefix>client`, `<prefix>rt`, `<prefix>lb1`..., `<prefix>be1`...;
    /// the router hashes flows on their 5-tuple with a fixed seed (`seed`) into a resilient
    /// nexthop group over every balancer.
    pub fn create(prefix: &str, balancers: usize, backends: usize, seed: u32) -> FleetTopology {
        let topology = Self::build(prefix, balancers, backends, seed);
        for i in 0..balancers {
            topology.router.ip(&[
                "nexthop",
                "add",
                "id",
                &(i + 1).to_string(),
                "via",
                &fleet_balancer_addr(i).to_string(),
                "dev",
                "eth1",
            ]);
        }
        let all: Vec<usize> = (0..balancers).collect();
        topology.route_over(&all);
        let vip = format!("{FLEET_VIP_ADDR}/32");
        topology
            .router
            .ip(&["route", "add", &vip, "nhid", FLEET_GROUP]);
        topology
    }

    /// Like [`create`](Self::create), but the router learns the VIP's route by BGP: BIRD on
    /// the router and on every balancer, each session Established and its BFD session Up
    /// when this returns. The router has no route to the VIP until balancers announce it
    /// (a route in their kernel table [`bird::VIP_TABLE`]); then it hashes flows (5-tuple,
    /// fixed `seed`) over a multipath route, with a next hop per announcing balancer.
    pub fn create_bgp(prefix: &str, balancers: usize, backends: usize, seed: u32) -> FleetTopology {
        let mut topology = Self::build(prefix, balancers, backends, seed);
        topology.bgp = Some(FleetBgp::start(&topology.router, &topology.balancers));
        topology
    }

    /// The namespaces, links, addresses and the router's settings; no route to the VIP.
    fn build(prefix: &str, balancers: usize, backends: usize, seed: u32) -> FleetTopology {
        let switch = Netns::create(&format!("{prefix}sw"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let client = Netns::create(&format!("{prefix}client"));
        let router = Netns::create(&format!("{prefix}rt"));
        let lbs: Vec<Netns> = (0..balancers)
            .map(|i| Netns::create(&format!("{prefix}lb{}", i + 1)))
            .collect();
        let bes: Vec<Netns> = (0..backends)
            .map(|i| Netns::create(&format!("{prefix}be{}", i + 1)))
            .collect();
        let plug = |host: &Netns, port: &str, inside: &str, address: Ipv4Addr| {
            plug(&switch, "br0", host, port, inside, &[address]);
        };
        // The client's link to the router: a veth pair of their own.
        client.veth(HOST_IF, &router, "eth0");
        client.ip(&[
            "addr",
            "add",
            &format!("{FLEET_CLIENT_ADDR}/{SUBNET_PREFIX}"),
            "dev",
            HOST_IF,
        ]);
        client.ip(&["link", "set", HOST_IF, "up"]);
        router.ip(&[
            "addr",
            "add",
            &format!("{FLEET_ROUTER_CLIENT_SIDE}/{SUBNET_PREFIX}"),
            "dev",
            "eth0",
        ]);
        router.ip(&["link", "set", "eth0", "up"]);
        plug(&router, "p-rt", "eth1", FLEET_ROUTER_ADDR);
        for (i, ns) in lbs.iter().enumerate() {
            plug(
                ns,
                &format!("p-lb{}", i + 1),
                HOST_IF,
                fleet_balancer_addr(i),
            );
        }
        for (i, ns) in bes.iter().enumerate() {
            plug(
                ns,
                &format!("p-be{}", i + 1),
                HOST_IF,
                fleet_backend_addr(i),
            );
            hold_vip(ns, FLEET_VIP_ADDR);
            ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &FLEET_ROUTER_ADDR.to_string(),
            ]);
            ns.exec("ethtool", &["-K", HOST_IF, "tx", "off"]);
        }
        client.exec("ethtool", &["-K", HOST_IF, "tx", "off"]);
        client.ip(&[
            "route",
            "add",
            &format!("{FLEET_VIP_ADDR}/32"),
            "via",
            &FLEET_ROUTER_CLIENT_SIDE.to_string(),
        ]);
        router.sysctl("net.ipv4.ip_forward", "1");
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1");
        router.sysctl("net.ipv4.fib_multipath_hash_seed", &seed.to_string());
        for key in ["all", "default", "eth0", "eth1"] {
            router.sysctl(&format!("net.ipv4.conf.{key}.rp_filter"), "0");
        }
        let files = Scratch::named(&format!("{prefix}files"));
        let peer_passes = (0..lbs.len())
            .map(|i| {
                let port = format!("p-lb{}", i + 1);
                start_peer_pass(
                    &switch,
                    &port,
                    &files.path(&format!("xdp-pass-{}.log", i + 1)),
                )
            })
            .collect();
        FleetTopology {
            bgp: None,
            peer_passes,
            files,
            client,
            router,
            balancers: lbs,
            backends: bes,
            switch,
        }
    }

    /// The router's group over these balancers (created, or changed: what a withdrawal does);
    /// a resilient group keeps every other balancer's flows where they are.
    pub fn route_over(&self, balancers: &[usize]) {
        assert!(
            self.bgp.is_none(),
            "the BGP fleet's router takes its VIP route from BIRD: announce or withdraw in the \
             balancers' table {}",
            bird::VIP_TABLE
        );
        let members: Vec<String> = balancers.iter().map(|i| (i + 1).to_string()).collect();
        self.router.ip(&[
            "nexthop",
            "replace",
            "id",
            FLEET_GROUP,
            "group",
            &members.join("/"),
            "type",
            "resilient",
            "buckets",
            "128",
            "idle_timer",
            "0",
        ]);
    }

    /// An HTTP server on port 80 of every address of every backend.
    pub fn start_http_servers(&self, name: impl Fn(usize) -> String) -> Vec<HttpServer> {
        servers_on_port_80(&self.backends, name)
    }

    /// The BIRD instances ([`create_bgp`](Self::create_bgp) only).
    pub fn bgp(&mut self) -> &mut FleetBgp {
        self.bgp
            .as_mut()
            .expect("a BGP fleet (FleetTopology::create_bgp)")
    }

    /// The next hops of the router's route to the VIP, as the kernel has it now (none: no
    /// route).
    pub fn vip_next_hops(&self) -> BTreeSet<IpAddr> {
        let out = self
            .router
            .ip(&["-j", "route", "show", &format!("{FLEET_VIP_ADDR}/32")]);
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("`ip -j route` prints JSON");
        next_hops(&json)
    }

    /// Waits until the router's next hops for the VIP are exactly the balancers `balancers`
    /// (indices; none: no route); returns how long it took. Polls every 10 ms; panics after
    /// `timeout` with what it waited for, what it saw last, and the router's BIRD.
    pub fn wait_vip_next_hops(&self, balancers: &[usize], timeout: Duration) -> Duration {
        let wanted: BTreeSet<IpAddr> = balancers
            .iter()
            .map(|i| IpAddr::V4(fleet_balancer_addr(*i)))
            .collect();
        let started = Instant::now();
        loop {
            let seen = self.vip_next_hops();
            if seen == wanted {
                return started.elapsed();
            }
            if started.elapsed() > timeout {
                let bird = self.bgp.as_ref().map_or_else(String::new, |bgp| {
                    format!(
                        "\nthe router's BIRD:\n{}{}",
                        bgp.router.protocols(),
                        bgp.router.routes()
                    )
                });
                let names: Vec<&str> = balancers
                    .iter()
                    .map(|i| self.balancers[*i].name())
                    .collect();
                panic!(
                    "waited {timeout:?} for the router's route to {FLEET_VIP_ADDR} to go via \
                     {wanted:?} ({}); last seen: via {seen:?}{bird}",
                    names.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl FleetBgp {
    /// BIRD on `router` and on every one of `balancers`; returns once every session is
    /// Established and its BFD session Up, on the router's side.
    fn start(router: &Netns, balancers: &[Netns]) -> FleetBgp {
        let peers: Vec<(IpAddr, u32)> = (0..balancers.len())
            .map(|i| (fleet_balancer_addr(i).into(), FLEET_BALANCER_AS))
            .collect();
        let router_bird = Bird::start(
            router,
            &bird::router_config(FLEET_ROUTER_ADDR, FLEET_ROUTER_AS, &peers),
        );
        let balancer_birds = balancers
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let address = fleet_balancer_addr(i);
                Bird::start(
                    ns,
                    &bird::balancer_config(
                        address,
                        FLEET_BALANCER_AS,
                        address.into(),
                        FLEET_ROUTER_ADDR.into(),
                        FLEET_ROUTER_AS,
                        bird::VIP_TABLE,
                    ),
                )
            })
            .collect();
        let mut bgp = FleetBgp {
            router: router_bird,
            balancers: balancer_birds,
        };
        for i in 0..balancers.len() {
            bgp.wait_up(i);
        }
        bgp
    }

    /// The router's BGP protocol for balancer `i`.
    pub fn router_protocol(i: usize) -> String {
        bird::peer_protocol(fleet_balancer_addr(i).into())
    }

    /// Waits until the router's session with balancer `i` is Established and its BFD
    /// session Up (BFD, not the hold timer, then detects the balancer's loss); returns how
    /// long it took.
    pub fn wait_up(&mut self, i: usize) -> Duration {
        let established = self.router.wait_established(&Self::router_protocol(i));
        established + self.router.wait_bfd_up(fleet_balancer_addr(i).into())
    }
}

/// The next hops of a route in `ip -j route show` output: one route's `gateway`, or each of
/// its `nexthops`' (a multipath route); none without a route.
fn next_hops(routes: &serde_json::Value) -> BTreeSet<IpAddr> {
    let gateway = |hop: &serde_json::Value| {
        hop["gateway"]
            .as_str()
            .and_then(|g| g.parse::<IpAddr>().ok())
    };
    let mut found = BTreeSet::new();
    for route in routes.as_array().into_iter().flatten() {
        found.extend(gateway(route));
        let hops = route["nexthops"].as_array().into_iter().flatten();
        found.extend(hops.filter_map(gateway));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hops_of_a_route() {
        // `ip -j route show 10.90.100.1/32` (iproute2 6.1) on the BGP fleet's router.
        let cases = [
            ("no route", "[]", vec![]),
            (
                "one balancer",
                r#"[{"dst":"10.90.100.1","gateway":"10.91.0.3","dev":"eth1","protocol":"bird","metric":32,"flags":[]}]"#,
                vec!["10.91.0.3"],
            ),
            (
                "a multipath route",
                r#"[{"dst":"10.90.100.1","protocol":"bird","metric":32,"flags":[],"nexthops":[{"gateway":"10.91.0.2","dev":"eth1","weight":1,"flags":[]},{"gateway":"10.91.0.4","dev":"eth1","weight":1,"flags":[]}]}]"#,
                vec!["10.91.0.2", "10.91.0.4"],
            ),
        ];
        for (case, json, expected) in cases {
            let expected: BTreeSet<IpAddr> = expected.iter().map(|a| a.parse().unwrap()).collect();
            assert_eq!(
                next_hops(&serde_json::from_str(json).unwrap()),
                expected,
                "{case}"
            );
        }
    }
}

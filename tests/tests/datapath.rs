//! Datapath fixtures: the real compiled XDP object, loaded into the kernel with the maps
//! filled by the daemon's own code, and packets run through it with BPF_PROG_TEST_RUN.
//!
//! Each fixture is one line of prose, the packet (built with a packet library), the expected
//! verdict and the expected output bytes (also built with the packet library, never copied
//! from the program's output), and the counters that must move: exactly one outcome counter,
//! and the VIP's and backend's traffic counters by exactly this packet.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::programs::{TestRun as _, TestRunOptions};
use balancer::{
    config::{self, Config, Forwarding},
    dataplane::{Counters, Dataplane, LoadOptions},
    reconcile::{self, address_bytes, BackendKey, Health, Ids, NextHop, NextHops},
};
use balancer_common::{hash::flow_hash, xdp_action, FlowKey, Outcome, TrafficStats};
use balancer_tests::netns::{remove_stale, require_root, Netns};
use etherparse::{
    icmpv4::DestUnreachableHeader, Icmpv4Type, Icmpv6Type, IpDscp, IpEcn, IpFragOffset, IpHeaders,
    IpNumber, Ipv4Extensions, Ipv4Header, Ipv6Extensions, Ipv6FlowLabel, Ipv6Header, NetSlice,
    PacketBuilder, SlicedPacket, TransportSlice,
};

const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];
const ROUTER_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xfe];
const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
/// The balancer's own addresses: the default outer source of tunnels.
const LB4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const LB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);

/// A backend's (or its gateway's) MAC address: 02:be:00:00 and the address's last two bytes.
fn backend_mac(address: IpAddr) -> [u8; 6] {
    let (bytes, family) = address_bytes(address);
    let last = if family == balancer_common::FAMILY_IPV4 {
        2
    } else {
        14
    };
    [0x02, 0xbe, 0, 0, bytes[last], bytes[last + 1]]
}

fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::from(a)
}

fn v6(segments: [u16; 8]) -> IpAddr {
    IpAddr::from(Ipv6Addr::from(segments))
}

const CONFIG: &str = r#"
[balancer]
hash_seed = "0x5eed"
conn_table_size = 4096

[[vip]]
name = "web"
address = "10.100.0.1"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 4093
backends = [
  { address = "10.0.0.11", weight = 1 },
  { address = "10.0.0.12", weight = 1 },
  { address = "10.0.0.13", weight = 2 },
]

[[vip]]
name = "tls"
address = "10.100.0.2"
port = 443
protocol = "tcp"
forwarding = "dsr"
table_size = 251
backends = [{ address = "10.0.0.21" }]

[[vip]]
name = "dns"
address = "10.100.0.2"
port = 53
protocol = "udp"
forwarding = "dsr"
table_size = 251
backends = [{ address = "10.0.0.22" }]

[[vip]]
name = "anyport"
address = "10.100.0.3"
port = "any"
protocol = "udp"
forwarding = "dsr"
table_size = 251
backends = [{ address = "10.0.0.31" }]

[[vip]]
name = "remote"
address = "10.100.0.4"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
backends = [{ address = "10.0.0.41" }]

[[vip]]
name = "unreachable"
address = "10.100.0.5"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
backends = [{ address = "10.0.0.51" }]

[[vip]]
name = "tun4"
address = "10.100.1.1"
port = 80
protocol = "tcp"
forwarding = "tunnel"
table_size = 251
backends = [{ address = "10.1.0.1" }, { address = "10.1.0.2" }]

[[vip]]
name = "tunspread"
address = "10.100.1.2"
port = 80
protocol = "tcp"
forwarding = "tunnel"
tunnel_source_v4 = "172.16.0.0/16"
table_size = 251
backends = [{ address = "10.1.0.3" }]

[[vip]]
name = "tun46"
address = "10.100.1.3"
port = 80
protocol = "tcp"
forwarding = "tunnel"
table_size = 251
backends = [{ address = "fc00::1" }]

[[vip]]
name = "tun6"
address = "2001:db8::100"
port = 80
protocol = "tcp"
forwarding = "tunnel"
table_size = 251
backends = [{ address = "fc00::2" }]

[[vip]]
name = "dsr6"
address = "2001:db8::200"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
backends = [{ address = "2001:db8::11" }]

[[vip]]
name = "frag4"
address = "10.100.2.1"
port = 53
protocol = "udp"
forwarding = "dsr"
fragments = true
table_size = 4093
backends = [{ address = "10.0.0.61" }, { address = "10.0.0.62" }, { address = "10.0.0.63" }]

[[vip]]
name = "frag6"
address = "2001:db8::300"
port = 53
protocol = "udp"
forwarding = "dsr"
fragments = true
table_size = 4093
backends = [{ address = "2001:db8::61" }, { address = "2001:db8::62" }, { address = "2001:db8::63" }]

[[vip]]
name = "dport"
address = "10.100.3.1"
port = 443
protocol = "udp"
forwarding = "dsr"
hash = "dst_port_only"
table_size = 4093
backends = [{ address = "10.0.0.71" }, { address = "10.0.0.72" }, { address = "10.0.0.73" }]

[[vip]]
name = "small4"
address = "10.100.4.1"
port = 80
protocol = "tcp"
forwarding = "tunnel"
table_size = 251
backends = [{ address = "10.1.0.9" }]

[[vip]]
name = "small6"
address = "2001:db8::400"
port = 80
protocol = "tcp"
forwarding = "tunnel"
table_size = 251
backends = [{ address = "fc00::9" }]
"#;

/// The program, its maps filled from a config by the daemon's reconciler, and the state the
/// reconciler works from. Backends are reached through `lo` (the ingress interface of a test
/// run, so XDP_TX), except 10.0.0.41, behind another interface (XDP_REDIRECT), and
/// 10.0.0.51, whose next hop is unknown. Tunnel backends (10.1.0.x, fc00::x) sit behind a
/// router; 10.1.0.9 and fc00::9 behind links with small MTUs (1000 and 1300).
struct World {
    dataplane: Dataplane,
    config: Config,
    hops: NextHops,
    health: HashMap<BackendKey, Health>,
    ids: Ids,
}

impl World {
    fn new(other_ifindex: u32) -> World {
        let config = config::parse(Path::new("fixtures.toml"), CONFIG).unwrap();
        let dataplane = Dataplane::load(LoadOptions {
            hash_seed: config.hash_seed,
            conn_table_size: config.conn_table_size,
        })
        .expect("the XDP object loads and passes the verifier");
        let mut hops = NextHops::new();
        for vip in &config.vips {
            for b in &vip.backends {
                let address = b.address;
                let (bytes, _) = address_bytes(address);
                let tunnel = vip.forwarding == Forwarding::Tunnel;
                let ifindex = match address {
                    IpAddr::V4(a) if a.octets()[3] == 41 => other_ifindex,
                    IpAddr::V4(a) if a.octets()[3] == 51 => continue,
                    _ => 1,
                };
                let mtu = match (address, bytes[15]) {
                    (IpAddr::V4(a), _) if a.octets()[3] == 9 && tunnel => 1000,
                    (IpAddr::V6(_), 9) if tunnel => 1300,
                    _ => 1500,
                };
                let source = if address.is_ipv4() {
                    IpAddr::V4(LB4)
                } else {
                    IpAddr::V6(LB6)
                };
                let gateway = tunnel.then_some(source);
                hops.insert(
                    address,
                    NextHop {
                        ifindex,
                        interface: "x".into(),
                        src_mac: LB_MAC,
                        dst_mac: backend_mac(address),
                        gateway,
                        mtu,
                        source: Some(source),
                    },
                );
            }
        }
        let mut world = World {
            dataplane,
            config,
            hops,
            health: HashMap::new(),
            ids: Ids::default(),
        };
        world.apply();
        world
    }

    fn apply(&mut self) {
        let desired =
            reconcile::desired_state(&self.config, &[], &self.hops, &self.health, &mut self.ids)
                .unwrap();
        self.dataplane.apply(&desired).expect("maps written");
    }

    fn backend_id(&self, vip: &str, address: IpAddr) -> u32 {
        self.ids
            .backend(&(vip.to_owned(), address))
            .expect("configured backend")
    }

    fn vip_id(&self, vip: &str) -> u32 {
        self.ids.vip(vip).unwrap()
    }

    fn vip_config(&self, vip: &str) -> &config::Vip {
        self.config.vips.iter().find(|v| v.name == vip).unwrap()
    }

    /// The flow as the VIP's hash sees it (destination port only for `dst_port_only`).
    fn hash(&self, vip: &str, flow: &FlowKey) -> u32 {
        let flow = match self.vip_config(vip).hash {
            config::HashMode::DstPortOnly => FlowKey {
                src: [0; 16],
                src_port: 0,
                ..*flow
            },
            config::HashMode::FiveTuple => *flow,
        };
        flow_hash(&flow, self.config.hash_seed)
    }

    /// The backend the Maglev table names for a new flow.
    fn table_choice(&self, vip: &str, flow: &FlowKey) -> IpAddr {
        let applied = self.dataplane.applied();
        let v = applied.vips.iter().find(|v| v.name == vip).unwrap();
        let id = v.table[(self.hash(vip, flow) % v.meta.table_size) as usize];
        v.backends
            .iter()
            .find(|b| b.id == id)
            .expect("a backend owns the slot")
            .address
    }

    /// Remembers `flow` on `backend` in the connection table, as if an earlier packet of
    /// the flow had been placed there.
    fn remember(&mut self, vip: &str, flow: &FlowKey, backend: IpAddr) {
        let id = self.backend_id(vip, backend);
        self.dataplane.conn_insert(flow, id).unwrap();
    }

    fn set_config(&mut self, text_edit: impl Fn(&str) -> String) {
        self.config = config::parse(Path::new("fixtures.toml"), &text_edit(CONFIG)).unwrap();
        self.apply();
    }

    fn run(&self, packet: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; packet.len() + 256];
        let result = self
            .dataplane
            .program()
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn conn(&self, flow: &FlowKey) -> Option<u32> {
        self.dataplane.conn_lookup(flow).unwrap()
    }
}

// ------------------------------------------------------------------------------------------
// Packets

#[derive(Clone, Copy, PartialEq, Eq)]
enum L4 {
    TcpSyn,
    TcpAck,
    Udp,
}

/// A test packet from the client. `bytes()` writes it as the client sends it.
#[derive(Clone, Copy)]
struct Pkt {
    dst: IpAddr,
    src: IpAddr,
    sport: u16,
    dport: u16,
    l4: L4,
    vlan: Option<u16>,
    options: bool,
    tos: u8,
    df: bool,
    /// Payload bytes (`None`: a short text).
    size: Option<usize>,
    /// IPv6 destination-options headers in front of the transport header.
    ext_headers: u8,
    /// (offset in 8-byte units, more fragments).
    fragment: Option<(u16, bool)>,
}

fn tcp(dst: IpAddr, sport: u16, dport: u16) -> Pkt {
    let src = if dst.is_ipv4() {
        IpAddr::V4(CLIENT4)
    } else {
        IpAddr::V6(CLIENT6)
    };
    Pkt {
        dst,
        src,
        sport,
        dport,
        l4: L4::TcpSyn,
        vlan: None,
        options: false,
        tos: 0,
        df: true,
        size: None,
        ext_headers: 0,
        fragment: None,
    }
}

fn udp(dst: IpAddr, sport: u16, dport: u16) -> Pkt {
    Pkt {
        l4: L4::Udp,
        ..tcp(dst, sport, dport)
    }
}

impl Pkt {
    fn ack(self) -> Pkt {
        Pkt {
            l4: L4::TcpAck,
            ..self
        }
    }
    fn vlan(self, id: u16) -> Pkt {
        Pkt {
            vlan: Some(id),
            ..self
        }
    }
    fn with_options(self) -> Pkt {
        Pkt {
            options: true,
            ..self
        }
    }
    fn tos(self, tos: u8) -> Pkt {
        Pkt { tos, ..self }
    }
    fn no_df(self) -> Pkt {
        Pkt { df: false, ..self }
    }
    fn size(self, size: usize) -> Pkt {
        Pkt {
            size: Some(size),
            ..self
        }
    }
    fn ext_headers(self, n: u8) -> Pkt {
        Pkt {
            ext_headers: n,
            ..self
        }
    }
    fn fragment(self, offset: u16, more: bool) -> Pkt {
        Pkt {
            fragment: Some((offset, more)),
            ..self
        }
    }
    fn from(self, src: IpAddr) -> Pkt {
        Pkt { src, ..self }
    }

    fn payload(&self) -> Vec<u8> {
        match (self.size, self.l4) {
            (Some(n), _) => (0..n).map(|i| (i % 251) as u8).collect(),
            (None, L4::TcpSyn) => Vec::new(),
            (None, _) => b"hello, backend".to_vec(),
        }
    }

    fn ip_headers(&self) -> IpHeaders {
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut ip =
                    Ipv4Header::new(0, 64, IpNumber::TCP, src.octets(), dst.octets()).unwrap();
                ip.dscp = IpDscp::try_new(self.tos >> 2).unwrap();
                ip.ecn = IpEcn::try_new(self.tos & 3).unwrap();
                ip.dont_fragment = self.df;
                if self.options {
                    // Record Route with room for two addresses, padded with End of Options.
                    ip.options = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0].into();
                }
                IpHeaders::Ipv4(ip, Ipv4Extensions::default())
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => IpHeaders::Ipv6(
                Ipv6Header {
                    traffic_class: self.tos,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: 0,
                    next_header: IpNumber::TCP,
                    hop_limit: 64,
                    source: src.octets(),
                    destination: dst.octets(),
                },
                Ipv6Extensions::default(),
            ),
            _ => unreachable!("mixed families"),
        }
    }

    /// The IP packet alone, with extension headers and fragmentation applied.
    fn ip_bytes(&self) -> Vec<u8> {
        let step = PacketBuilder::ip(self.ip_headers());
        let mut out = Vec::new();
        let payload = self.payload();
        match self.l4 {
            L4::Udp => step.udp(self.sport, self.dport).write(&mut out, &payload),
            L4::TcpSyn => step
                .tcp(self.sport, self.dport, 1000, 64240)
                .syn()
                .write(&mut out, &payload),
            L4::TcpAck => step
                .tcp(self.sport, self.dport, 1000, 64240)
                .ack(1)
                .psh()
                .write(&mut out, &payload),
        }
        .unwrap();
        if self.dst.is_ipv4() {
            if let Some((offset, more)) = self.fragment {
                out = fragment_v4(&out, offset, more);
            }
        } else {
            for _ in 0..self.ext_headers {
                out = insert_v6_ext(&out, 60, &[1, 4, 0, 0, 0, 0]);
            }
            if let Some((offset, more)) = self.fragment {
                let field = (offset << 3) | more as u16;
                let [a, b] = field.to_be_bytes();
                out = insert_v6_ext(&out, 44, &[a, b, 0, 0, 0x12, 0x34]);
                if offset != 0 {
                    // A later fragment carries no transport header: cut it out.
                    let transport = if self.l4 == L4::Udp { 8 } else { 20 };
                    out.drain(48..48 + transport);
                    set_v6_payload_len(&mut out);
                }
            }
        }
        out
    }

    /// As the client sends it to the balancer.
    fn bytes(&self) -> Vec<u8> {
        frame(CLIENT_MAC, LB_MAC, self.vlan, &self.ip_bytes())
    }

    fn flow(&self) -> FlowKey {
        let (src, family) = address_bytes(self.src);
        let (dst, _) = address_bytes(self.dst);
        FlowKey {
            src,
            dst,
            src_port: self.sport.to_be(),
            dst_port: self.dport.to_be(),
            proto: if self.l4 == L4::Udp { 17 } else { 6 },
            family,
            _pad: [0; 2],
        }
    }

    /// The flow as a VIP balancing fragments sees every fragment: ports cleared.
    fn fragment_flow(&self) -> FlowKey {
        FlowKey {
            src_port: 0,
            dst_port: 0,
            ..self.flow()
        }
    }
}

/// Ethernet (and an 802.1Q tag) in front of an IP packet.
fn frame(src: [u8; 6], dst: [u8; 6], vlan: Option<u16>, ip: &[u8]) -> Vec<u8> {
    let ether_type: [u8; 2] = if ip[0] >> 4 == 4 {
        [0x08, 0x00]
    } else {
        [0x86, 0xdd]
    };
    let mut f = Vec::with_capacity(18 + ip.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(id) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&id.to_be_bytes());
    }
    f.extend_from_slice(&ether_type);
    f.extend_from_slice(ip);
    f
}

/// The IP packet of a frame (after Ethernet and any VLAN tag).
fn ip_of(frame: &[u8]) -> &[u8] {
    if frame[12..14] == [0x81, 0x00] {
        &frame[18..]
    } else {
        &frame[14..]
    }
}

fn vlan_of(frame: &[u8]) -> Option<u16> {
    (frame[12..14] == [0x81, 0x00]).then(|| u16::from_be_bytes([frame[14], frame[15]]))
}

/// Sets the fragment fields of an IPv4 packet (and its checksum), keeping the transport header
/// for the first fragment and dropping it for later ones.
fn fragment_v4(ip: &[u8], offset: u16, more: bool) -> Vec<u8> {
    let (mut header, rest) = Ipv4Header::from_slice(ip).unwrap();
    header.more_fragments = more;
    header.dont_fragment = false;
    header.fragment_offset = IpFragOffset::try_new(offset).unwrap();
    let body: Vec<u8> = if offset == 0 {
        rest.to_vec()
    } else {
        rest[8.min(rest.len())..].to_vec()
    };
    header.set_payload_len(body.len()).unwrap();
    let mut out = Vec::new();
    header.write(&mut out).unwrap();
    out.extend_from_slice(&body);
    out
}

/// Inserts an 8-byte IPv6 extension header (`kind`, then `rest` after its next-header and
/// length bytes) right after the fixed header, chaining next-header fields.
fn insert_v6_ext(ip: &[u8], kind: u8, rest: &[u8; 6]) -> Vec<u8> {
    let mut out = ip[..40].to_vec();
    let next = out[6];
    out[6] = kind;
    out.push(next);
    out.push(0);
    out.extend_from_slice(rest);
    out.extend_from_slice(&ip[40..]);
    set_v6_payload_len(&mut out);
    out
}

fn set_v6_payload_len(ip: &mut [u8]) {
    let len = ((ip.len() - 40) as u16).to_be_bytes();
    ip[4] = len[0];
    ip[5] = len[1];
}

/// The frame the balancer sends to `backend`: direct server return keeps the IP packet and
/// changes the MACs; a tunnel puts an outer header in front (outer source `source`, the
/// flow's `hash` in the IPv6 flow label).
fn forwarded(input: &[u8], backend: IpAddr, tunnel: Option<(IpAddr, u32)>) -> Vec<u8> {
    let inner = ip_of(input);
    let vlan = vlan_of(input);
    let Some((source, hash)) = tunnel else {
        return frame(LB_MAC, backend_mac(backend), vlan, inner);
    };
    let (tos, df, inner_proto) = if inner[0] >> 4 == 4 {
        let (h, _) = Ipv4Header::from_slice(inner).unwrap();
        (
            (h.dscp.value() << 2) | h.ecn.value(),
            h.dont_fragment,
            IpNumber::IPV4,
        )
    } else {
        let (h, _) = Ipv6Header::from_slice(inner).unwrap();
        (h.traffic_class, true, IpNumber::IPV6)
    };
    let mut outer = Vec::new();
    match (source, backend) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut h = Ipv4Header::new(
                inner.len() as u16,
                64,
                inner_proto,
                src.octets(),
                dst.octets(),
            )
            .unwrap();
            h.dscp = IpDscp::try_new(tos >> 2).unwrap();
            h.ecn = IpEcn::try_new(tos & 3).unwrap();
            h.dont_fragment = df;
            h.write(&mut outer).unwrap();
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => Ipv6Header {
            traffic_class: tos,
            flow_label: Ipv6FlowLabel::try_new(hash & 0xF_FFFF).unwrap(),
            payload_length: inner.len() as u16,
            next_header: inner_proto,
            hop_limit: 64,
            source: src.octets(),
            destination: dst.octets(),
        }
        .write(&mut outer)
        .unwrap(),
        _ => unreachable!("the outer source has the backend's family"),
    }
    outer.extend_from_slice(inner);
    frame(LB_MAC, backend_mac(backend), vlan, &outer)
}

/// Checks with the packet library that every IPv4 header checksum and the TCP/UDP/ICMP
/// checksum of a frame (inside a tunnel too) are valid.
fn assert_checksums_valid(frame: &[u8], case: &str) {
    let sliced = SlicedPacket::from_ethernet(frame)
        .unwrap_or_else(|e| panic!("{case}: unparsable output: {e}"));
    let header_v4 = |ip: &etherparse::Ipv4Slice| {
        let h = ip.header().to_header();
        assert_eq!(
            h.header_checksum,
            h.calc_header_checksum(),
            "{case}: IPv4 header checksum"
        );
    };
    let mut inner: Option<Vec<u8>> = None;
    match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            header_v4(ip);
            if matches!(ip.payload().ip_number, IpNumber::IPV4 | IpNumber::IPV6) {
                inner = Some(ip.payload().payload.to_vec());
            }
        }
        Some(NetSlice::Ipv6(ip)) => {
            if matches!(ip.payload().ip_number, IpNumber::IPV4 | IpNumber::IPV6) {
                inner = Some(ip.payload().payload.to_vec());
            }
        }
        _ => panic!("{case}: no IP in output"),
    }
    if let Some(inner) = inner {
        // Check the encapsulated packet as a frame of its own.
        return assert_checksums_valid(&frame_of_ip(&inner), case);
    }
    let ip = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            IpHeaders::Ipv4(ip.header().to_header(), Ipv4Extensions::default())
        }
        Some(NetSlice::Ipv6(ip)) => {
            IpHeaders::Ipv6(ip.header().to_header(), Ipv6Extensions::default())
        }
        _ => unreachable!(),
    };
    match (&sliced.transport, ip) {
        (Some(TransportSlice::Tcp(t)), IpHeaders::Ipv4(h, _)) => {
            assert_eq!(
                t.checksum(),
                t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap(),
                "{case}: TCP"
            );
        }
        (Some(TransportSlice::Tcp(t)), IpHeaders::Ipv6(h, _)) => {
            assert_eq!(
                t.checksum(),
                t.to_header().calc_checksum_ipv6(&h, t.payload()).unwrap(),
                "{case}: TCP"
            );
        }
        (Some(TransportSlice::Udp(u)), IpHeaders::Ipv4(h, _)) => {
            assert_eq!(
                u.checksum(),
                u.to_header().calc_checksum_ipv4(&h, u.payload()).unwrap(),
                "{case}: UDP"
            );
        }
        (Some(TransportSlice::Udp(u)), IpHeaders::Ipv6(h, _)) => {
            assert_eq!(
                u.checksum(),
                u.to_header().calc_checksum_ipv6(&h, u.payload()).unwrap(),
                "{case}: UDP"
            );
        }
        (Some(TransportSlice::Icmpv4(i)), _) => {
            assert_eq!(
                i.checksum(),
                i.header().icmp_type.calc_checksum(i.payload()),
                "{case}: ICMP"
            );
        }
        (Some(TransportSlice::Icmpv6(i)), IpHeaders::Ipv6(h, _)) => {
            let expected = i
                .header()
                .icmp_type
                .calc_checksum(h.source, h.destination, i.payload())
                .unwrap();
            assert_eq!(i.checksum(), expected, "{case}: ICMPv6");
        }
        // Fragments after the first carry no transport header to check.
        (None, _) => {}
        (other, _) => panic!("{case}: unexpected transport {other:?}"),
    }
}

fn frame_of_ip(ip: &[u8]) -> Vec<u8> {
    frame(CLIENT_MAC, LB_MAC, None, ip)
}

// ------------------------------------------------------------------------------------------
// Fixtures

/// Where a packet must end up.
#[derive(Clone, Debug)]
enum Expect {
    /// Left untouched: XDP_PASS with the input bytes, counted under this outcome.
    Passed(Outcome),
    /// Dropped with this outcome.
    Dropped(Outcome),
    /// Sent to this backend of this VIP (XDP_TX or XDP_REDIRECT). `flow` is the flow as the
    /// program balances it (the connection table's key, and the hash of tunnel fields).
    Forwarded {
        vip: &'static str,
        backend: IpAddr,
        flow: FlowKey,
        new_flow: bool,
        redirect: bool,
    },
    /// Answered by the balancer itself with XDP_TX: exactly these bytes.
    Answered { outcome: Outcome, output: Vec<u8> },
}

type Prepare = fn(&mut World, &Pkt);
type Expectation = Box<dyn Fn(&World, &Pkt) -> Expect>;

struct Fixture {
    case: &'static str,
    packet: Pkt,
    /// Raw bytes instead of `packet` (malformed input, ICMP, tunnels).
    raw: Option<fn() -> Vec<u8>>,
    /// State to set up before the packet is sent.
    prepare: Prepare,
    expect: Expectation,
}

fn fixture(case: &'static str, packet: Pkt, expect: Expectation) -> Fixture {
    Fixture {
        case,
        packet,
        raw: None,
        prepare: |_, _| {},
        expect,
    }
}

impl Fixture {
    fn raw(self, raw: fn() -> Vec<u8>) -> Fixture {
        Fixture {
            raw: Some(raw),
            ..self
        }
    }
    fn prepare(self, prepare: Prepare) -> Fixture {
        Fixture { prepare, ..self }
    }
}

fn passed(outcome: Outcome) -> Expectation {
    Box::new(move |_, _| Expect::Passed(outcome))
}

fn dropped(outcome: Outcome) -> Expectation {
    Box::new(move |_, _| Expect::Dropped(outcome))
}

/// Forwarded with XDP_TX to a fixed backend, as a new flow.
fn to(vip: &'static str, backend: IpAddr) -> Expectation {
    Box::new(move |_, p| Expect::Forwarded {
        vip,
        backend,
        flow: p.flow(),
        new_flow: true,
        redirect: false,
    })
}

/// Forwarded with XDP_TX to whatever `choose` says, computed when the packet is sent.
fn to_computed(
    vip: &'static str,
    new_flow: bool,
    choose: fn(&World, &Pkt) -> IpAddr,
) -> Expectation {
    Box::new(move |w, p| Expect::Forwarded {
        vip,
        backend: choose(w, p),
        flow: p.flow(),
        new_flow,
        redirect: false,
    })
}

fn answered(outcome: Outcome, output: fn(&Pkt) -> Vec<u8>) -> Expectation {
    Box::new(move |_, p| Expect::Answered {
        outcome,
        output: output(p),
    })
}

const WEB: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 100, 0, 1));
const V2: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 100, 0, 2));
const ANY: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 100, 0, 3));
const TUN4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 100, 1, 1));
const TUNSPREAD: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 100, 1, 2));
const TUN46: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 100, 1, 3));
const TUN6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100));
const DSR6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x200));
const FRAG4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 100, 2, 1));
const FRAG6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x300));
const DPORT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 100, 3, 1));
const SMALL4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 100, 4, 1));
const SMALL6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x400));

fn truncated(packet: Pkt, len: usize) -> Vec<u8> {
    let mut bytes = packet.bytes();
    bytes.truncate(len);
    bytes
}

/// The Maglev table's choice for the packet's flow in "web".
fn web_choice(w: &World, p: &Pkt) -> IpAddr {
    w.table_choice("web", &p.flow())
}

/// The backend a `prepare` step saw the flow on first.
fn first_seen(_: &World, _: &Pkt) -> IpAddr {
    FIRST.with(|f| f.get())
}

thread_local! {
    static FIRST: std::cell::Cell<IpAddr> = const { std::cell::Cell::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED)) };
}

/// A backend of "web" other than `b`.
fn other_backend(b: IpAddr) -> IpAddr {
    if b == v4([10, 0, 0, 11]) {
        v4([10, 0, 0, 12])
    } else {
        v4([10, 0, 0, 11])
    }
}

/// An IPIP / IP6IP6 / IPv4-in-IPv6 packet to the balancer's own address.
fn tunnel_to_balancer(outer_v6: bool, inner_v6: bool) -> Vec<u8> {
    let inner = if inner_v6 {
        tcp(DSR6, 1, 80).ip_bytes()
    } else {
        tcp(WEB, 1, 80).ip_bytes()
    };
    let proto = if inner_v6 {
        IpNumber::IPV6
    } else {
        IpNumber::IPV4
    };
    let mut outer = Vec::new();
    if outer_v6 {
        Ipv6Header {
            traffic_class: 0,
            flow_label: Ipv6FlowLabel::ZERO,
            payload_length: inner.len() as u16,
            next_header: proto,
            hop_limit: 64,
            source: ROUTER6.octets(),
            destination: LB6.octets(),
        }
        .write(&mut outer)
        .unwrap();
    } else {
        Ipv4Header::new(
            inner.len() as u16,
            64,
            proto,
            ROUTER4.octets(),
            LB4.octets(),
        )
        .unwrap()
        .write(&mut outer)
        .unwrap();
    }
    outer.extend_from_slice(&inner);
    frame(ROUTER_MAC, LB_MAC, None, &outer)
}

/// The packet a backend of `vip` sent to the client (the one an ICMP error quotes).
fn reply(vip: IpAddr, client_port: u16) -> Vec<u8> {
    let client = if vip.is_ipv4() {
        IpAddr::V4(CLIENT4)
    } else {
        IpAddr::V6(CLIENT6)
    };
    tcp(client, 80, client_port)
        .from(vip)
        .ack()
        .size(1400)
        .ip_bytes()
}

fn fixtures() -> Vec<Fixture> {
    // Any packet will do where `raw` replaces it.
    let unused = tcp(V2, 1, 443);
    vec![
        // --- IPv4, direct server return -------------------------------------------------
        fixture("TCP SYN of a new flow to a one-backend VIP goes to that backend and is remembered",
            tcp(V2, 40000, 443), to("tls", v4([10, 0, 0, 21]))),
        fixture("TCP SYN of a new flow lands on the backend the weighted Maglev table names",
            tcp(WEB, 40001, 80), to_computed("web", true, web_choice)),
        fixture("connection-table hit: an established packet follows the table of flows, not the hash",
            tcp(WEB, 40002, 80).ack(), to_computed("web", false, |w, p| other_backend(web_choice(w, p))))
            .prepare(|w, p| {
                let other = other_backend(web_choice(w, p));
                w.remember("web", &p.flow(), other);
            }),
        fixture("UDP datagram to a VIP is forwarded", udp(V2, 5353, 53), to("dns", v4([10, 0, 0, 22]))),
        fixture("UDP to any port of an any-port VIP is forwarded", udp(ANY, 5353, 31337), to("anyport", v4([10, 0, 0, 31]))),
        fixture("TCP to an any-port UDP VIP's address is not for a VIP: passed untouched",
            tcp(ANY, 40003, 80), passed(Outcome::NotVip)),
        fixture("TCP to a VIP address on an unconfigured port is passed untouched",
            tcp(WEB, 40004, 81), passed(Outcome::NotVip)),
        fixture("IPv4 TCP to an address that is no VIP is passed untouched",
            tcp(v4([10, 100, 0, 99]), 40005, 80), passed(Outcome::NotVip)),
        fixture("ARP request is passed untouched", unused, passed(Outcome::NotIp)).raw(|| {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&CLIENT_MAC);
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
            f.extend_from_slice(&CLIENT_MAC);
            f.extend_from_slice(&CLIENT4.octets());
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&[10, 100, 0, 1]);
            f.resize(60, 0);
            f
        }),
        fixture("802.1Q-tagged TCP SYN to a VIP is forwarded with its tag",
            tcp(V2, 40006, 443).vlan(42), to("tls", v4([10, 0, 0, 21]))),
        fixture("IPv4 with options (IHL 8) to a VIP is forwarded, options kept",
            tcp(V2, 40007, 443).with_options(), to("tls", v4([10, 0, 0, 21]))),
        fixture("802.1Q-tagged UDP with IPv4 options to a VIP is forwarded",
            udp(V2, 5354, 53).vlan(7).with_options(), to("dns", v4([10, 0, 0, 22]))),
        fixture("a backend behind another interface is reached with XDP_REDIRECT", tcp(v4([10, 100, 0, 4]), 40009, 80),
            Box::new(|_, p| Expect::Forwarded { vip: "remote", backend: v4([10, 0, 0, 41]), flow: p.flow(), new_flow: true, redirect: true })),
        fixture("a VIP whose only backend has no next hop drops with no_backend",
            tcp(v4([10, 100, 0, 5]), 40008, 80), dropped(Outcome::NoBackend)),

        // --- malformed and truncated ------------------------------------------------------
        // A frame cut inside the Ethernet header cannot be a fixture: BPF_PROG_TEST_RUN
        // refuses inputs shorter than 14 bytes (EINVAL). The program checks for it anyway
        // (Outcome::TruncatedEthernet).
        fixture("frame cut inside the 802.1Q tag is passed", unused, passed(Outcome::TruncatedVlan))
            .raw(|| truncated(tcp(V2, 1, 443).vlan(5), 16)),
        fixture("frame cut at the Ethernet/IPv4 boundary (14 bytes) is passed", unused, passed(Outcome::TruncatedIpv4))
            .raw(|| truncated(tcp(V2, 1, 443), 14)),
        fixture("frame cut inside the fixed IPv4 header is passed", unused, passed(Outcome::TruncatedIpv4))
            .raw(|| truncated(tcp(V2, 1, 443), 14 + 12)),
        fixture("frame cut inside the IPv4 options is passed", unused, passed(Outcome::TruncatedIpv4))
            .raw(|| truncated(tcp(V2, 1, 443).with_options(), 14 + 24)),
        fixture("frame cut at the IPv4/TCP boundary is passed", unused, passed(Outcome::TruncatedL4))
            .raw(|| truncated(tcp(V2, 1, 443), 14 + 20)),
        fixture("frame cut inside the TCP header (ports present, 19 of 20 bytes) is passed", unused, passed(Outcome::TruncatedL4))
            .raw(|| truncated(tcp(V2, 1, 443), 14 + 20 + 19)),
        fixture("frame cut inside the UDP header is passed", unused, passed(Outcome::TruncatedL4))
            .raw(|| truncated(udp(V2, 1, 53), 14 + 20 + 7)),
        fixture("frame cut inside the fixed IPv6 header is passed", unused, passed(Outcome::TruncatedIpv6))
            .raw(|| truncated(tcp(DSR6, 1, 80), 14 + 30)),
        fixture("frame cut inside an IPv6 extension header is passed", unused, passed(Outcome::TruncatedIpv6))
            .raw(|| truncated(tcp(DSR6, 1, 80).ext_headers(2), 14 + 40 + 8 + 1)),
        fixture("IPv4 header length 4 (16 bytes, below the minimum) is passed", unused, passed(Outcome::BadIpv4Header))
            .raw(|| {
                let mut f = tcp(V2, 1, 443).bytes();
                f[14] = 0x44;
                f
            }),
        fixture("version 6 in an IPv4 EtherType frame is passed", unused, passed(Outcome::BadIpv4Header)).raw(|| {
            let mut f = tcp(V2, 1, 443).bytes();
            f[14] = 0x65;
            f
        }),
        fixture("an IPv4 fragment to a VIP that does not balance fragments is passed", unused, passed(Outcome::Fragment))
            .raw(|| udp(V2, 1, 53).fragment(0, true).bytes()),
        fixture("SCTP to a VIP address is passed", unused, passed(Outcome::NotTcpUdp)).raw(|| {
            let mut ip = tcp(V2, 1, 443).ip_bytes();
            ip[9] = 132;
            let (mut h, rest) = Ipv4Header::from_slice(&ip).unwrap();
            h.header_checksum = h.calc_header_checksum();
            let mut out = Vec::new();
            h.write_raw(&mut out).unwrap();
            out.extend_from_slice(rest);
            frame(CLIENT_MAC, LB_MAC, None, &out)
        }),

        // --- IPv6 ----------------------------------------------------------------------------
        fixture("IPv6 VIP with direct server return: forwarded unchanged but for the MACs",
            tcp(DSR6, 40100, 80), to("dsr6", v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11]))),
        fixture("IPv6 with two destination-options headers (walked, within the bound of 4) is forwarded",
            tcp(DSR6, 40101, 80).ext_headers(2), to("dsr6", v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11]))),
        fixture("IPv6 with five extension headers (over the bound of 4) is passed and counted",
            tcp(DSR6, 40102, 80).ext_headers(5), passed(Outcome::Ipv6ExtensionLimit)),
        fixture("IPv6 TCP to an address that is no VIP is passed untouched",
            tcp(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x999]), 40103, 80), passed(Outcome::NotVip)),

        // --- tunnels --------------------------------------------------------------------------
        fixture("IPv4 VIP to IPv4 backend: IPIP, outer source the balancer's address",
            tcp(TUN4, 40200, 80), to_computed("tun4", true, |w, p| w.table_choice("tun4", &p.flow()))),
        fixture("IPv4 tunnel with DSCP EF and ECN set on the packet: the outer header copies the ToS",
            tcp(TUN4, 40201, 80).tos(0xb9).ack(), to_computed("tun4", true, |w, p| w.table_choice("tun4", &p.flow()))),
        fixture("connection-table hit in tunnel mode: the remembered backend gets the encapsulated packet",
            tcp(TUN4, 40202, 80).ack(), to_computed("tun4", false, tun4_other))
            .prepare(|w, p| {
                let other = tun4_other(w, p);
                w.remember("tun4", &p.flow(), other);
            }),
        fixture("IPv4 VIP with a tunnel source prefix: the outer source's host bits come from the flow's hash",
            tcp(TUNSPREAD, 40203, 80), to("tunspread", v4([10, 1, 0, 3]))),
        fixture("IPv4 VIP to IPv6 backend: IPv4 in IPv6, flow label from the flow's hash",
            tcp(TUN46, 40204, 80).tos(0x28), to("tun46", v6([0xfc00, 0, 0, 0, 0, 0, 0, 1]))),
        fixture("IPv6 VIP to IPv6 backend: IP6IP6, traffic class kept",
            tcp(TUN6, 40205, 80).tos(0xb8), to("tun6", v6([0xfc00, 0, 0, 0, 0, 0, 0, 2]))),
        fixture("802.1Q-tagged packet to a tunnel VIP: encapsulated behind the same tag",
            tcp(TUN6, 40206, 80).vlan(9).ack(), to("tun6", v6([0xfc00, 0, 0, 0, 0, 0, 0, 2]))),
        fixture("IPIP to the balancer's own address is passed to its stack", unused, passed(Outcome::NotTcpUdp))
            .raw(|| tunnel_to_balancer(false, false)),
        fixture("IP6IP6 to the balancer's own address is passed to its stack", unused, passed(Outcome::NotTcpUdp))
            .raw(|| tunnel_to_balancer(true, true)),
        fixture("IPv4-in-IPv6 to the balancer's own address is passed to its stack", unused, passed(Outcome::NotTcpUdp))
            .raw(|| tunnel_to_balancer(true, false)),
        fixture("too big for the IPv4 tunnel, don't-fragment set: ICMP fragmentation needed (MTU 980) answered from the VIP",
            tcp(SMALL4, 40300, 80).ack().size(1200), answered(Outcome::TooBigAnswered, |p| {
                let ip = p.ip_bytes();
                let quote = &ip[..20 + 8];
                let mut header = Ipv4Header::new(0, 64, IpNumber::ICMP, [10, 100, 4, 1], CLIENT4.octets()).unwrap();
                header.dont_fragment = false;
                let mut out = Vec::new();
                PacketBuilder::ethernet2(LB_MAC, CLIENT_MAC)
                    .ip(IpHeaders::Ipv4(header, Ipv4Extensions::default()))
                    .icmpv4(Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 980 }))
                    .write(&mut out, quote)
                    .unwrap();
                out
            })),
        fixture("too big for the IPv4 tunnel without don't-fragment: dropped and counted",
            tcp(SMALL4, 40301, 80).ack().size(1200).no_df(), dropped(Outcome::TooBig)),
        fixture("too big for the IPv6 tunnel: ICMPv6 packet too big (MTU 1280) quoting 1232 bytes",
            tcp(SMALL6, 40302, 80).ack().size(1400), answered(Outcome::TooBigAnswered, |p| {
                let ip = p.ip_bytes();
                let mut out = Vec::new();
                PacketBuilder::ethernet2(LB_MAC, CLIENT_MAC)
                    .ipv6(SMALL6_OCTETS, CLIENT6.octets(), 64)
                    .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
                    .write(&mut out, &ip[..1232])
                    .unwrap();
                out
            })),

        // --- ICMP -------------------------------------------------------------------------------
        fixture("IPv4 echo request to a VIP address is answered by the balancer", unused,
            answered(Outcome::EchoReplied, |_| {
                let mut out = Vec::new();
                PacketBuilder::ethernet2(LB_MAC, CLIENT_MAC).ipv4([10, 100, 0, 1], CLIENT4.octets(), 64)
                    .icmpv4_echo_reply(7, 1).write(&mut out, b"ping").unwrap();
                out
            }))
            .raw(|| {
                let mut f = Vec::new();
                PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv4(CLIENT4.octets(), [10, 100, 0, 1], 50)
                    .icmpv4_echo_request(7, 1).write(&mut f, b"ping").unwrap();
                f
            }),
        fixture("IPv6 echo request to a VIP address is answered by the balancer", unused,
            answered(Outcome::EchoReplied, |_| {
                let mut out = Vec::new();
                PacketBuilder::ethernet2(LB_MAC, CLIENT_MAC).ipv6(DSR6_OCTETS, CLIENT6.octets(), 64)
                    .icmpv6_echo_reply(7, 1).write(&mut out, b"ping6").unwrap();
                out
            }))
            .raw(|| {
                let mut f = Vec::new();
                PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv6(CLIENT6.octets(), DSR6_OCTETS, 50)
                    .icmpv6_echo_request(7, 1).write(&mut f, b"ping6").unwrap();
                f
            }),
        fixture("echo request to an address that is no VIP (the balancer's own) is passed", unused, passed(Outcome::IcmpOther))
            .raw(|| {
                let mut f = Vec::new();
                PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv4(CLIENT4.octets(), LB4.octets(), 50)
                    .icmpv4_echo_request(7, 1).write(&mut f, b"ping").unwrap();
                f
            }),
        fixture("IPv6 neighbour solicitation is passed", unused, passed(Outcome::IcmpOther)).raw(|| {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC).ipv6(CLIENT6.octets(), LB6.octets(), 255)
                .icmpv6(Icmpv6Type::Unknown { type_u8: 135, code_u8: 0, bytes5to8: [0; 4] })
                .write(&mut f, &LB6.octets()).unwrap();
            f
        }),
        fixture("IPv4 fragmentation needed about a VIP flow goes to the backend that owns the flow", unused,
            Box::new(|w, _| {
                let flow = icmp_flow(WEB, 40400);
                Expect::Forwarded { vip: "web", backend: other_backend(w.table_choice("web", &flow)), flow, new_flow: false, redirect: false }
            }))
            .raw(|| icmp_error(WEB, 40400))
            .prepare(|w, _| {
                let flow = icmp_flow(WEB, 40400);
                let owner = other_backend(w.table_choice("web", &flow));
                w.remember("web", &flow, owner);
            }),
        fixture("IPv6 packet too big about a VIP flow goes (tunnelled) to the backend that owns the flow", unused,
            Box::new(|_, _| Expect::Forwarded {
                vip: "tun6",
                backend: v6([0xfc00, 0, 0, 0, 0, 0, 0, 2]),
                flow: icmp_flow(TUN6, 40401),
                new_flow: true,
                redirect: false,
            }))
            .raw(|| icmp_error(TUN6, 40401)),
        fixture("ICMP fragmentation needed about a flow of no VIP is passed", unused, passed(Outcome::IcmpOther))
            .raw(|| icmp_error(v4([10, 100, 0, 99]), 40402)),

        // --- fragments ----------------------------------------------------------------------------
        fixture("first IPv4 fragment (with ports) goes to the backend of the datagram's addresses",
            udp(FRAG4, FRAG_PORT, 53).size(200).fragment(0, true), fragment_expectation("frag4"))
            .prepare(|w, p| assert_ne!(w.table_choice("frag4", &p.flow()), w.table_choice("frag4", &p.fragment_flow()),
                "pick a port whose 5-tuple choice differs, so that the test shows addresses-only hashing")),
        fixture("later IPv4 fragment (no ports) goes to the same backend",
            udp(FRAG4, FRAG_PORT, 53).size(200).fragment(185, false), fragment_expectation("frag4")),
        fixture("first IPv6 fragment (fragment header, with ports) goes to the backend of the datagram's addresses",
            udp(FRAG6, FRAG_PORT, 53).size(200).fragment(0, true), fragment_expectation("frag6"))
            .prepare(|w, p| assert_ne!(w.table_choice("frag6", &p.flow()), w.table_choice("frag6", &p.fragment_flow()))),
        fixture("later IPv6 fragment goes to the same backend",
            udp(FRAG6, FRAG_PORT, 53).size(200).fragment(185, false), fragment_expectation("frag6")),
        fixture("a TCP packet to another port of a fragment-balancing VIP's address is not for a VIP",
            tcp(FRAG4, 40500, 80), passed(Outcome::NotVip)),

        // --- destination-port-only hashing ------------------------------------------------------------
        fixture("dst_port_only hashing: a flow goes to the backend of its destination port",
            udp(DPORT, 1111, 443), dport_expectation())
            .prepare(|w, p| {
                let other = p.from(v4([192, 0, 2, 8]));
                let other = Pkt { sport: 2222, ..other };
                assert_ne!(w.table_choice_5tuple("dport", &p.flow()), w.table_choice_5tuple("dport", &other.flow()),
                    "pick flows whose 5-tuple choices differ, so that the test shows port-only hashing");
            }),
        fixture("dst_port_only hashing: another client and port, same destination port, same backend",
            Pkt { sport: 2222, ..udp(DPORT, 1111, 443).from(v4([192, 0, 2, 8])) }, dport_expectation()),

        // --- flows across table changes ---------------------------------------------------------------
        fixture("a remembered flow keeps its backend after the table changes under it",
            tcp(WEB, 40010, 80).ack(), to_computed("web", false, first_seen))
            .prepare(|w, p| {
                // The SYN places the flow; then weights change until the table names another
                // backend for it.
                let first = web_choice(w, p);
                assert_eq!(w.run(&tcp(WEB, p.sport, 80).bytes()).0, xdp_action::TX);
                assert_eq!(w.conn(&p.flow()), Some(w.backend_id("web", first)));
                for heavy in 1..=50u32 {
                    w.set_config(|c| {
                        c.replace("\"10.0.0.13\", weight = 2", &format!("\"10.0.0.13\", weight = {}", 2 + heavy * 20))
                            .replace("\"10.0.0.11\", weight = 1", &format!("\"10.0.0.11\", weight = {}", 1 + heavy))
                    });
                    if web_choice(w, p) != first {
                        break;
                    }
                }
                assert_ne!(web_choice(w, p), first, "no weight change moved the flow's slot");
                FIRST.with(|f| f.set(first));
            }),
        fixture("a remembered flow whose backend went down is re-selected from the table",
            tcp(WEB, 40011, 80).ack(), to_computed("web", true, web_choice))
            .prepare(|w, p| {
                let first = web_choice(w, p);
                w.remember("web", &p.flow(), first);
                w.health.insert(("web".into(), first), Health::Down);
                w.apply();
                assert_ne!(web_choice(w, p), first);
            }),
        fixture("a TCP SYN reusing a remembered 5-tuple is a new flow: placed by the table, not sent to the draining backend",
            tcp(WEB, 40013, 80), to_computed("web", true, web_choice))
            .prepare(|w, p| {
                let first = web_choice(w, p);
                w.remember("web", &p.flow(), first);
                drain(w, first);
                assert_ne!(web_choice(w, p), first);
            }),
        fixture("a remembered flow keeps its draining backend", tcp(WEB, 40012, 80).ack(), to_computed("web", false, first_seen))
            .prepare(|w, p| {
                let first = web_choice(w, p);
                w.remember("web", &p.flow(), first);
                drain(w, first);
                assert_ne!(web_choice(w, p), first, "draining backends own no slots");
                FIRST.with(|f| f.set(first));
            }),
    ]
}

const SMALL6_OCTETS: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x04, 0x00,
];
const DSR6_OCTETS: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x00,
];
/// A source port whose 5-tuple choice differs from the addresses-only choice (checked).
const FRAG_PORT: u16 = 5002;

impl World {
    /// The backend a five-tuple hash would choose, whatever the VIP's hash setting.
    fn table_choice_5tuple(&self, vip: &str, flow: &FlowKey) -> IpAddr {
        let applied = self.dataplane.applied();
        let v = applied.vips.iter().find(|v| v.name == vip).unwrap();
        let id = v.table[(flow_hash(flow, self.config.hash_seed) % v.meta.table_size) as usize];
        v.backends.iter().find(|b| b.id == id).unwrap().address
    }
}

fn drain(w: &mut World, backend: IpAddr) {
    let address = backend.to_string();
    w.set_config(|c| {
        c.replace(
            &format!("\"{address}\", weight"),
            &format!("\"{address}\", drain = true, weight"),
        )
    });
}

/// The backend of "tun4" that the table does not name for the packet's flow.
fn tun4_other(w: &World, p: &Pkt) -> IpAddr {
    let choice = w.table_choice("tun4", &p.flow());
    if choice == v4([10, 1, 0, 1]) {
        v4([10, 1, 0, 2])
    } else {
        v4([10, 1, 0, 1])
    }
}

fn fragment_expectation(vip: &'static str) -> Expectation {
    Box::new(move |w, p| {
        let flow = p.fragment_flow();
        Expect::Forwarded {
            vip,
            backend: w.table_choice(vip, &flow),
            flow,
            new_flow: true,
            redirect: false,
        }
    })
}

fn dport_expectation() -> Expectation {
    Box::new(|w, p| Expect::Forwarded {
        vip: "dport",
        backend: w.table_choice("dport", &p.flow()),
        flow: p.flow(),
        new_flow: true,
        redirect: false,
    })
}

/// The client -> VIP flow an ICMP error about `reply(vip, client_port)` concerns.
fn icmp_flow(vip: IpAddr, client_port: u16) -> FlowKey {
    tcp(vip, client_port, 80).flow()
}

/// A router's ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6) about a reply a
/// backend sent from `vip` to the client.
fn icmp_error(vip: IpAddr, client_port: u16) -> Vec<u8> {
    let quoted = reply(vip, client_port);
    let mut f = Vec::new();
    match vip {
        IpAddr::V4(vip) => PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
            .ipv4(ROUTER4.octets(), vip.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
            ))
            .write(&mut f, &quoted[..20 + 8])
            .unwrap(),
        IpAddr::V6(vip) => PacketBuilder::ethernet2(ROUTER_MAC, LB_MAC)
            .ipv6(ROUTER6.octets(), vip.octets(), 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut f, &quoted[..1232.min(quoted.len())])
            .unwrap(),
    }
    f
}

fn delta(after: &TrafficStats, before: &TrafficStats) -> TrafficStats {
    TrafficStats {
        packets: after.packets - before.packets,
        bytes: after.bytes - before.bytes,
        new_flows: after.new_flows - before.new_flows,
    }
}

/// The outer source a tunnel to `backend` of `vip` uses for a flow with this hash.
fn tunnel_source(w: &World, vip: &str, backend: IpAddr, hash: u32) -> IpAddr {
    let v = w.vip_config(vip);
    let configured = if backend.is_ipv4() {
        v.tunnel_source_v4
    } else {
        v.tunnel_source_v6
    };
    let (base, bits) = match configured {
        Some(s) => (s.address, s.varied_bits),
        None => (
            if backend.is_ipv4() {
                IpAddr::V4(LB4)
            } else {
                IpAddr::V6(LB6)
            },
            0,
        ),
    };
    let mask: u32 = if bits == 0 {
        0
    } else if bits >= 32 {
        u32::MAX
    } else {
        (1 << bits) - 1
    };
    match base {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from((u32::from(a) & !mask) | (hash & mask))),
        IpAddr::V6(a) => {
            let mut o = a.octets();
            let low = u32::from_be_bytes([o[12], o[13], o[14], o[15]]);
            o[12..].copy_from_slice(&((low & !mask) | (hash & mask)).to_be_bytes());
            IpAddr::V6(Ipv6Addr::from(o))
        }
    }
}

fn check(world: &mut World, fixture: &Fixture) {
    let case = fixture.case;
    (fixture.prepare)(world, &fixture.packet);
    let input = match fixture.raw {
        Some(raw) => raw(),
        None => fixture.packet.bytes(),
    };
    let expect = (fixture.expect)(world, &fixture.packet);
    let before: Counters = world.dataplane.counters().unwrap();
    let (verdict, output) = world.run(&input);
    let after: Counters = world.dataplane.counters().unwrap();

    let outcome = match &expect {
        Expect::Passed(o) => {
            assert_eq!(verdict, xdp_action::PASS, "{case}: verdict");
            assert_eq!(
                output, input,
                "{case}: a passed packet must leave unchanged"
            );
            *o
        }
        Expect::Dropped(o) => {
            assert_eq!(verdict, xdp_action::DROP, "{case}: verdict");
            *o
        }
        Expect::Answered {
            outcome,
            output: expected,
        } => {
            assert_eq!(verdict, xdp_action::TX, "{case}: verdict");
            assert_eq!(&output, expected, "{case}: answer bytes");
            assert_checksums_valid(&output, case);
            *outcome
        }
        Expect::Forwarded {
            vip,
            backend,
            flow,
            new_flow,
            redirect,
        } => {
            let (want_verdict, o) = if *redirect {
                (xdp_action::REDIRECT, Outcome::ForwardedRedirect)
            } else {
                (xdp_action::TX, Outcome::ForwardedTx)
            };
            assert_eq!(verdict, want_verdict, "{case}: verdict");
            let tunnel = (world.vip_config(vip).forwarding == Forwarding::Tunnel).then(|| {
                let hash = world.hash(vip, flow);
                (tunnel_source(world, vip, *backend, hash), hash)
            });
            assert_eq!(
                output,
                forwarded(&input, *backend, tunnel),
                "{case}: output bytes"
            );
            assert_checksums_valid(&output, case);
            let id = world.backend_id(vip, *backend);
            assert_eq!(world.conn(flow), Some(id), "{case}: connection table entry");
            let expected = TrafficStats {
                packets: 1,
                bytes: input.len() as u64,
                new_flows: *new_flow as u64,
            };
            assert_eq!(
                delta(&after.backends[&id], &before.backends[&id]),
                expected,
                "{case}: backend counters"
            );
            let vip_id = world.vip_id(vip);
            assert_eq!(
                delta(&after.vips[&vip_id], &before.vips[&vip_id]),
                expected,
                "{case}: VIP counters"
            );
            // No other backend or VIP counted anything.
            for (other, stats) in &after.backends {
                if *other != id {
                    assert_eq!(
                        stats, &before.backends[other],
                        "{case}: backend {other} counted"
                    );
                }
            }
            for (other, stats) in &after.vips {
                if *other != vip_id {
                    assert_eq!(stats, &before.vips[other], "{case}: VIP {other} counted");
                }
            }
            o
        }
    };
    if !matches!(expect, Expect::Forwarded { .. }) {
        assert_eq!(
            after.backends, before.backends,
            "{case}: no backend counts a packet that is not forwarded"
        );
        assert_eq!(
            after.vips, before.vips,
            "{case}: no VIP counts a packet that is not forwarded"
        );
    }
    for o in Outcome::ALL {
        let moved = after.outcomes[*o as usize] - before.outcomes[*o as usize];
        assert_eq!(
            moved,
            (*o == outcome) as u64,
            "{case}: outcome counter {}",
            o.name()
        );
    }
    assert_eq!(
        outcome.verdict(),
        verdict,
        "{case}: outcome and verdict agree"
    );
}

#[test]
fn datapath_fixtures() {
    require_root("the datapath fixtures (BPF_PROG_TEST_RUN)");
    remove_stale("lbt-");
    // A namespace of our own, with a veth pair: its lo (ifindex 1) is the ingress interface
    // of every test run, and fx0 is the "other interface" of the redirect case.
    let ns = Netns::create(&format!("lbt-{}-fx", std::process::id()));
    ns.ip(&["link", "add", "fx0", "type", "veth", "peer", "name", "fx1"]);
    ns.ip(&["link", "set", "fx0", "up"]);
    ns.ip(&["link", "set", "fx1", "up"]);
    let ifindex: u32 = {
        let out = ns.exec("cat", &["/sys/class/net/fx0/ifindex"]);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let cases = ns.run(move || {
        let fixtures = fixtures();
        for fixture in &fixtures {
            // A fresh program and maps for every case, so that cases do not see each other.
            let mut world = World::new(ifindex);
            check(&mut world, fixture);
            println!("ok: {}", fixture.case);
        }
        fixtures.len()
    });
    println!("{cases} datapath fixtures passed");
}

#[test]
fn counters_add_up_over_a_sequence_of_packets() {
    require_root("the datapath fixtures (BPF_PROG_TEST_RUN)");
    let world = World::new(1);
    // 5 packets of one flow, 3 of another, to "tls"; 2 non-VIP packets; 1 cut-off frame.
    let a = tcp(V2, 50000, 443);
    let b = tcp(V2, 50001, 443);
    let other = tcp(v4([10, 9, 9, 9]), 1, 80);
    let before = world.dataplane.counters().unwrap();
    let mut bytes = 0;
    for p in [a, a.ack(), a.ack(), a.ack(), a.ack(), b, b.ack(), b.ack()] {
        let input = p.bytes();
        bytes += input.len() as u64;
        assert_eq!(world.run(&input).0, xdp_action::TX);
    }
    for _ in 0..2 {
        assert_eq!(world.run(&other.bytes()).0, xdp_action::PASS);
    }
    assert_eq!(world.run(&truncated(b, 14 + 20 + 3)).0, xdp_action::PASS);
    let after = world.dataplane.counters().unwrap();
    let id = world.backend_id("tls", v4([10, 0, 0, 21]));
    let expected = TrafficStats {
        packets: 8,
        bytes,
        new_flows: 2,
    };
    assert_eq!(delta(&after.backends[&id], &before.backends[&id]), expected);
    assert_eq!(
        delta(
            &after.vips[&world.vip_id("tls")],
            &before.vips[&world.vip_id("tls")]
        ),
        expected
    );
    let moved = |o: Outcome| after.outcomes[o as usize] - before.outcomes[o as usize];
    assert_eq!(moved(Outcome::ForwardedTx), 8);
    assert_eq!(moved(Outcome::NotVip), 2);
    assert_eq!(moved(Outcome::TruncatedL4), 1);
    assert_eq!(
        after.outcomes.iter().sum::<u64>() - before.outcomes.iter().sum::<u64>(),
        11
    );
}

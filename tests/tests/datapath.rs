//! Datapath fixtures: the real compiled XDP object, loaded into the kernel with the maps
//! filled by the daemon's own code, and packets run through it with BPF_PROG_TEST_RUN.
//!
//! Each fixture is one line of prose, the packet (built with a packet library), the expected
//! verdict and the expected output bytes, and the counters that must move: exactly one
//! outcome counter, and the VIP's and backend's traffic counters by exactly this packet.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::programs::{TestRun as _, TestRunOptions};
use balancer::{
    config::{self, Config},
    dataplane::{Counters, Dataplane, LoadOptions},
    reconcile::{self, BackendKey, Health, Ids, NextHop, NextHops},
};
use balancer_common::{hash::flow_hash, xdp_action, FlowKey, Outcome, TrafficStats, FAMILY_IPV4};
use balancer_tests::netns::{remove_stale, require_root, Netns};
use etherparse::{
    IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, NetSlice, PacketBuilder, SlicedPacket,
    TransportSlice, VlanId,
};

const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];
const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xfe];
const CLIENT: [u8; 4] = [192, 0, 2, 7];

/// A backend's MAC address: 02:be:00:00:<third octet>:<fourth octet> of its address.
fn backend_mac(address: Ipv4Addr) -> [u8; 6] {
    let o = address.octets();
    [0x02, 0xbe, 0, 0, o[2], o[3]]
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
"#;

/// The program, its maps filled from a config by the daemon's reconciler, and the state the
/// reconciler works from. Backends are reached through `lo` (the ingress interface of a test
/// run, so XDP_TX), except 10.0.0.41, which is behind another interface (XDP_REDIRECT), and
/// 10.0.0.51, whose next hop is unknown.
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
                let IpAddr::V4(a) = b.address else {
                    unreachable!()
                };
                let ifindex = match a.octets()[3] {
                    41 => other_ifindex,
                    51 => continue,
                    _ => 1,
                };
                hops.insert(
                    b.address,
                    NextHop {
                        ifindex,
                        interface: "x".into(),
                        src_mac: LB_MAC,
                        dst_mac: backend_mac(a),
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

    fn backend_id(&self, vip: &str, address: [u8; 4]) -> u32 {
        self.ids
            .backend(&(vip.to_owned(), IpAddr::from(address)))
            .expect("configured backend")
    }

    fn vip_id(&self, vip: &str) -> u32 {
        self.ids.vip(vip).unwrap()
    }

    /// The backend the Maglev table names for a new flow, by address.
    fn table_choice(&self, vip: &str, flow: &FlowKey) -> [u8; 4] {
        let applied = self.dataplane.applied();
        let v = applied.vips.iter().find(|v| v.name == vip).unwrap();
        let id = v.table[(flow_hash(flow, self.config.hash_seed) % v.meta.table_size) as usize];
        let b = v
            .backends
            .iter()
            .find(|b| b.id == id)
            .expect("a backend owns the slot");
        let IpAddr::V4(a) = b.address else {
            unreachable!()
        };
        a.octets()
    }

    /// Remembers `flow` on `backend` in the connection table, as if an earlier packet of
    /// the flow had been placed there.
    fn remember(&mut self, vip: &str, flow: &FlowKey, backend: [u8; 4]) {
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

#[derive(Clone, Copy)]
enum L4 {
    TcpSyn,
    TcpAck,
    Udp,
}

/// What a test packet looks like. `build` writes it with the given MACs.
#[derive(Clone, Copy)]
struct Pkt {
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    l4: L4,
    vlan: Option<u16>,
    options: bool,
}

fn tcp(dst: [u8; 4], sport: u16, dport: u16) -> Pkt {
    Pkt {
        dst,
        sport,
        dport,
        l4: L4::TcpSyn,
        vlan: None,
        options: false,
    }
}
fn udp(dst: [u8; 4], sport: u16, dport: u16) -> Pkt {
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

    fn build(&self, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
        let payload: &[u8] = match self.l4 {
            L4::TcpSyn => b"",
            _ => b"hello, backend",
        };
        let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
        let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, CLIENT, self.dst).unwrap();
        ip.protocol = match self.l4 {
            L4::Udp => IpNumber::UDP,
            _ => IpNumber::TCP,
        };
        if self.options {
            // Record Route with room for two addresses, padded with End of Options.
            ip.options = [7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0].into();
        }
        let ip = IpHeaders::Ipv4(ip, Ipv4Extensions::default());
        let mut out = Vec::new();
        match (self.vlan, self.l4) {
            (None, L4::Udp) => eth
                .ip(ip)
                .udp(self.sport, self.dport)
                .write(&mut out, payload),
            (Some(v), L4::Udp) => eth
                .single_vlan(VlanId::try_new(v).unwrap())
                .ip(ip)
                .udp(self.sport, self.dport)
                .write(&mut out, payload),
            (vlan, l4) => {
                let step = match vlan {
                    None => eth.ip(ip),
                    Some(v) => eth.single_vlan(VlanId::try_new(v).unwrap()).ip(ip),
                };
                let step = step.tcp(self.sport, self.dport, 1000, 64240);
                let step = match l4 {
                    L4::TcpSyn => step.syn(),
                    _ => step.ack(1).psh(),
                };
                step.write(&mut out, payload)
            }
        }
        .unwrap();
        out
    }

    /// As the client sends it to the balancer.
    fn bytes(&self) -> Vec<u8> {
        self.build(CLIENT_MAC, LB_MAC)
    }

    /// As the balancer must send it to `backend`.
    fn forwarded_to(&self, backend: [u8; 4]) -> Vec<u8> {
        self.build(LB_MAC, backend_mac(Ipv4Addr::from(backend)))
    }

    fn flow(&self) -> FlowKey {
        let mut flow = FlowKey {
            src_port: self.sport.to_be(),
            dst_port: self.dport.to_be(),
            proto: match self.l4 {
                L4::Udp => 17,
                _ => 6,
            },
            family: FAMILY_IPV4,
            ..FlowKey::default()
        };
        flow.src[..4].copy_from_slice(&CLIENT);
        flow.dst[..4].copy_from_slice(&self.dst);
        flow
    }
}

/// Checks with the packet library that the IPv4 and TCP/UDP checksums of a frame are valid.
fn assert_checksums_valid(frame: &[u8], case: &str) {
    let sliced = SlicedPacket::from_ethernet(frame)
        .unwrap_or_else(|e| panic!("{case}: unparsable output: {e}"));
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else {
        panic!("{case}: no IPv4 in output")
    };
    let header = ip.header().to_header();
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "{case}: IPv4 header checksum"
    );
    match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            let expected = t
                .to_header()
                .calc_checksum_ipv4(&header, t.payload())
                .unwrap();
            assert_eq!(t.checksum(), expected, "{case}: TCP checksum");
        }
        Some(TransportSlice::Udp(u)) => {
            let expected = u
                .to_header()
                .calc_checksum_ipv4(&header, u.payload())
                .unwrap();
            assert_eq!(u.checksum(), expected, "{case}: UDP checksum");
        }
        _ => panic!("{case}: no TCP/UDP in output"),
    }
}

// ------------------------------------------------------------------------------------------
// Fixtures

/// Where a packet must end up.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Left untouched: XDP_PASS with the input bytes, counted under this outcome.
    Passed(Outcome),
    /// Dropped with this outcome.
    Dropped(Outcome),
    /// Rewritten to this backend of this VIP and sent out (XDP_TX or XDP_REDIRECT).
    Forwarded {
        vip: &'static str,
        backend: [u8; 4],
        new_flow: bool,
        redirect: bool,
    },
}

type Prepare = fn(&mut World, &Pkt);
type Expectation = Box<dyn Fn(&World, &Pkt) -> Expect>;

struct Fixture {
    case: &'static str,
    packet: Pkt,
    /// Raw bytes instead of `packet` (malformed input).
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
fn to(vip: &'static str, backend: [u8; 4]) -> Expectation {
    Box::new(move |_, _| Expect::Forwarded {
        vip,
        backend,
        new_flow: true,
        redirect: false,
    })
}

/// Forwarded with XDP_TX to whatever `choose` says, computed when the packet is sent.
fn to_computed(
    vip: &'static str,
    new_flow: bool,
    choose: fn(&World, &Pkt) -> [u8; 4],
) -> Expectation {
    Box::new(move |w, p| Expect::Forwarded {
        vip,
        backend: choose(w, p),
        new_flow,
        redirect: false,
    })
}

const WEB: [u8; 4] = [10, 100, 0, 1];
const V2: [u8; 4] = [10, 100, 0, 2];
const ANY: [u8; 4] = [10, 100, 0, 3];

fn truncated(packet: Pkt, len: usize) -> Vec<u8> {
    let mut bytes = packet.bytes();
    bytes.truncate(len);
    bytes
}

/// The Maglev table's choice for the packet's flow in "web".
fn web_choice(w: &World, p: &Pkt) -> [u8; 4] {
    w.table_choice("web", &p.flow())
}

/// The backend a `prepare` step saw the flow on first.
fn first_seen(_: &World, _: &Pkt) -> [u8; 4] {
    FIRST.with(|f| f.get())
}

fn fixtures() -> Vec<Fixture> {
    // Any packet will do where `raw` replaces it.
    let unused = tcp(V2, 1, 443);
    vec![
        fixture(
            "TCP SYN of a new flow to a one-backend VIP goes to that backend and is remembered",
            tcp(V2, 40000, 443),
            to("tls", [10, 0, 0, 21]),
        ),
        fixture(
            "TCP SYN of a new flow lands on the backend the weighted Maglev table names",
            tcp(WEB, 40001, 80),
            to_computed("web", true, web_choice),
        ),
        fixture(
            "TCP established packet with payload follows the connection table, not the hash",
            tcp(WEB, 40002, 80).ack(),
            to_computed("web", false, |w, p| other_backend(web_choice(w, p))),
        )
        .prepare(|w, p| {
            let other = other_backend(web_choice(w, p));
            w.remember("web", &p.flow(), other);
        }),
        fixture(
            "UDP datagram to a VIP is forwarded",
            udp(V2, 5353, 53),
            to("dns", [10, 0, 0, 22]),
        ),
        fixture(
            "UDP to any port of an any-port VIP is forwarded",
            udp(ANY, 5353, 31337),
            to("anyport", [10, 0, 0, 31]),
        ),
        fixture(
            "TCP to an any-port UDP VIP's address is not for a VIP: passed untouched",
            tcp(ANY, 40003, 80),
            passed(Outcome::NotVip),
        ),
        fixture(
            "TCP to a VIP address on an unconfigured port is passed untouched",
            tcp(WEB, 40004, 81),
            passed(Outcome::NotVip),
        ),
        fixture(
            "TCP to an address that is no VIP is passed untouched",
            tcp([10, 100, 0, 99], 40005, 80),
            passed(Outcome::NotVip),
        ),
        fixture(
            "ARP request is passed untouched",
            unused,
            passed(Outcome::NotIp),
        )
        .raw(|| {
            let mut f = vec![0xff; 6];
            f.extend_from_slice(&CLIENT_MAC);
            f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
            f.extend_from_slice(&CLIENT_MAC);
            f.extend_from_slice(&CLIENT);
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&WEB);
            f.resize(60, 0);
            f
        }),
        fixture(
            "IPv6 is passed untouched (not supported yet)",
            unused,
            passed(Outcome::NotVip),
        )
        .raw(|| {
            let (a, b) = (
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
                Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2),
            );
            let mut f = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
                .ipv6(a.octets(), b.octets(), 64)
                .tcp(1, 80, 0, 100)
                .syn()
                .write(&mut f, &[])
                .unwrap();
            f
        }),
        fixture(
            "802.1Q-tagged TCP SYN to a VIP is forwarded with its tag",
            tcp(V2, 40006, 443).vlan(42),
            to("tls", [10, 0, 0, 21]),
        ),
        fixture(
            "IPv4 with options (IHL 8) to a VIP is forwarded, options kept",
            tcp(V2, 40007, 443).with_options(),
            to("tls", [10, 0, 0, 21]),
        ),
        fixture(
            "802.1Q-tagged UDP with IPv4 options to a VIP is forwarded",
            udp(V2, 5354, 53).vlan(7).with_options(),
            to("dns", [10, 0, 0, 22]),
        ),
        // A frame cut inside the Ethernet header cannot be a fixture: BPF_PROG_TEST_RUN
        // refuses inputs shorter than 14 bytes (EINVAL). The program checks for it anyway
        // (Outcome::TruncatedEthernet).
        fixture(
            "frame cut inside the 802.1Q tag is passed",
            unused,
            passed(Outcome::TruncatedVlan),
        )
        .raw(|| truncated(tcp(V2, 1, 443).vlan(5), 16)),
        fixture(
            "frame cut at the Ethernet/IPv4 boundary (14 bytes) is passed",
            unused,
            passed(Outcome::TruncatedIpv4),
        )
        .raw(|| truncated(tcp(V2, 1, 443), 14)),
        fixture(
            "frame cut inside the fixed IPv4 header is passed",
            unused,
            passed(Outcome::TruncatedIpv4),
        )
        .raw(|| truncated(tcp(V2, 1, 443), 14 + 12)),
        fixture(
            "frame cut inside the IPv4 options is passed",
            unused,
            passed(Outcome::TruncatedIpv4),
        )
        .raw(|| truncated(tcp(V2, 1, 443).with_options(), 14 + 24)),
        fixture(
            "frame cut at the IPv4/TCP boundary is passed",
            unused,
            passed(Outcome::TruncatedL4),
        )
        .raw(|| truncated(tcp(V2, 1, 443), 14 + 20)),
        fixture(
            "frame cut inside the TCP header (ports present, 19 of 20 bytes) is passed",
            unused,
            passed(Outcome::TruncatedL4),
        )
        .raw(|| truncated(tcp(V2, 1, 443), 14 + 20 + 19)),
        fixture(
            "frame cut inside the UDP header is passed",
            unused,
            passed(Outcome::TruncatedL4),
        )
        .raw(|| truncated(udp(V2, 1, 53), 14 + 20 + 7)),
        fixture(
            "IPv4 header length 4 (16 bytes, below the minimum) is passed",
            unused,
            passed(Outcome::BadIpv4Header),
        )
        .raw(|| {
            let mut f = tcp(V2, 1, 443).bytes();
            f[14] = 0x44;
            f
        }),
        fixture(
            "version 6 in an IPv4 EtherType frame is passed",
            unused,
            passed(Outcome::BadIpv4Header),
        )
        .raw(|| {
            let mut f = tcp(V2, 1, 443).bytes();
            f[14] = 0x65;
            f
        }),
        fixture(
            "IPv4 fragment (more-fragments set) to a VIP is passed",
            unused,
            passed(Outcome::Fragment),
        )
        .raw(|| {
            let mut f = udp(V2, 1, 53).bytes();
            f[14 + 6] |= 0x20;
            f
        }),
        fixture(
            "ICMP echo to a VIP address is passed",
            unused,
            passed(Outcome::NotTcpUdp),
        )
        .raw(|| {
            let mut f = Vec::new();
            PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, V2, 64)
                .icmpv4_echo_request(1, 1)
                .write(&mut f, b"ping")
                .unwrap();
            f
        }),
        fixture(
            "a VIP whose only backend has no next hop drops with no_backend",
            tcp([10, 100, 0, 5], 40008, 80),
            dropped(Outcome::NoBackend),
        ),
        fixture(
            "a backend behind another interface is reached with XDP_REDIRECT",
            tcp([10, 100, 0, 4], 40009, 80),
            Box::new(|_, _| Expect::Forwarded {
                vip: "remote",
                backend: [10, 0, 0, 41],
                new_flow: true,
                redirect: true,
            }),
        ),
        fixture(
            "a remembered flow keeps its backend after the table changes under it",
            tcp(WEB, 40010, 80).ack(),
            to_computed("web", false, first_seen),
        )
        .prepare(|w, p| {
            // The SYN places the flow; then weights change until the table names another
            // backend for it.
            let first = web_choice(w, p);
            assert_eq!(w.run(&tcp(WEB, p.sport, 80).bytes()).0, xdp_action::TX);
            assert_eq!(w.conn(&p.flow()), Some(w.backend_id("web", first)));
            for heavy in 1..=50u32 {
                w.set_config(|c| {
                    c.replace(
                        "\"10.0.0.13\", weight = 2",
                        &format!("\"10.0.0.13\", weight = {}", 2 + heavy * 20),
                    )
                    .replace(
                        "\"10.0.0.11\", weight = 1",
                        &format!("\"10.0.0.11\", weight = {}", 1 + heavy),
                    )
                });
                if web_choice(w, p) != first {
                    break;
                }
            }
            assert_ne!(
                web_choice(w, p),
                first,
                "no weight change moved the flow's slot"
            );
            FIRST.with(|f| f.set(first));
        }),
        fixture(
            "a remembered flow whose backend went down is re-selected from the table",
            tcp(WEB, 40011, 80).ack(),
            to_computed("web", true, web_choice),
        )
        .prepare(|w, p| {
            let first = web_choice(w, p);
            w.remember("web", &p.flow(), first);
            w.health
                .insert(("web".into(), IpAddr::from(first)), Health::Down);
            w.apply();
            assert_ne!(web_choice(w, p), first);
        }),
        fixture(
            "a TCP SYN reusing a remembered 5-tuple is a new flow: placed by the table, not sent to the draining backend",
            tcp(WEB, 40013, 80),
            to_computed("web", true, web_choice),
        )
        .prepare(|w, p| {
            let first = web_choice(w, p);
            w.remember("web", &p.flow(), first);
            let address = Ipv4Addr::from(first).to_string();
            w.set_config(|c| c.replace(&format!("\"{address}\", weight"), &format!("\"{address}\", drain = true, weight")));
            assert_ne!(web_choice(w, p), first);
        }),
        fixture(
            "a remembered flow keeps its draining backend",
            tcp(WEB, 40012, 80).ack(),
            to_computed("web", false, first_seen),
        )
        .prepare(|w, p| {
            let first = web_choice(w, p);
            w.remember("web", &p.flow(), first);
            let address = Ipv4Addr::from(first).to_string();
            w.set_config(|c| {
                c.replace(
                    &format!("\"{address}\", weight"),
                    &format!("\"{address}\", drain = true, weight"),
                )
            });
            assert_ne!(web_choice(w, p), first, "draining backends own no slots");
            FIRST.with(|f| f.set(first));
        }),
    ]
}

thread_local! {
    static FIRST: std::cell::Cell<[u8; 4]> = const { std::cell::Cell::new([0; 4]) };
}

/// A backend of "web" other than `b`.
fn other_backend(b: [u8; 4]) -> [u8; 4] {
    if b == [10, 0, 0, 11] {
        [10, 0, 0, 12]
    } else {
        [10, 0, 0, 11]
    }
}

fn delta(after: &TrafficStats, before: &TrafficStats) -> TrafficStats {
    TrafficStats {
        packets: after.packets - before.packets,
        bytes: after.bytes - before.bytes,
        new_flows: after.new_flows - before.new_flows,
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

    let outcome = match expect {
        Expect::Passed(o) => {
            assert_eq!(verdict, xdp_action::PASS, "{case}: verdict");
            assert_eq!(
                output, input,
                "{case}: a passed packet must leave unchanged"
            );
            o
        }
        Expect::Dropped(o) => {
            assert_eq!(verdict, xdp_action::DROP, "{case}: verdict");
            o
        }
        Expect::Forwarded {
            vip,
            backend,
            new_flow,
            redirect,
        } => {
            let (want_verdict, o) = if redirect {
                (xdp_action::REDIRECT, Outcome::ForwardedRedirect)
            } else {
                (xdp_action::TX, Outcome::ForwardedTx)
            };
            assert_eq!(verdict, want_verdict, "{case}: verdict");
            assert_eq!(
                output,
                fixture.packet.forwarded_to(backend),
                "{case}: output bytes"
            );
            assert_checksums_valid(&output, case);
            let id = world.backend_id(vip, backend);
            assert_eq!(
                world.conn(&fixture.packet.flow()),
                Some(id),
                "{case}: connection table entry"
            );
            let expected = TrafficStats {
                packets: 1,
                bytes: input.len() as u64,
                new_flows: new_flow as u64,
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
        assert!(fixtures.len() >= 15);
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
    let other = tcp([10, 9, 9, 9], 1, 80);
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
    let id = world.backend_id("tls", [10, 0, 0, 21]);
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

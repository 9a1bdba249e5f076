//! NAT through the real program: a client's packets translated to the backend (from a SNAT
//! address and port, or from the client for destination-only NAT), the backend's replies
//! translated back, ICMP errors about a connection both ways, port allocation (the client's
//! port kept, another taken when it collides, a drop when the range is exhausted), and the
//! connection state. Every expected frame is built with the packet library from the parties'
//! addresses, its checksums computed from scratch, and compared byte for byte with what the
//! program sent: the incremental checksum updates must equal full ones.

use std::net::IpAddr;

use balancer_common::{
    defence::DefenceCounter,
    nat::{NatEntry, NAT_F_REPLY, NAT_F_SNAT, NAT_S_RST, NAT_S_SYN, NAT_S_SYN_ACK},
    xdp_action, NatCounter, Outcome,
};
use balancer_tests::datapath::{
    packet::{assert_checksums_valid, frame, router_too_big, tcp, udp, Pkt, L4},
    world::{Reach, World, WorldOptions},
    CLIENT4, CLIENT6, CLIENT_MAC, LB_MAC,
};

use crate::fixtures::{v4, v6};

const CONFIG: &str = r#"
[balancer]
hash_seed = "0x5eed"
conn_table_size = 4096
nat_table_size = 1024
nat_timeouts = { udp = "1s" }

[[vip]]
name = "web"
address = "10.100.0.1"
port = 80
protocol = "tcp"
forwarding = "nat"
snat = "10.0.0.250"
backend_port = 8080
table_size = 251
backends = [{ address = "10.0.0.11" }, { address = "10.0.0.12" }]

[[vip]]
name = "dns"
address = "10.100.0.2"
port = 53
protocol = "udp"
forwarding = "nat"
snat = "10.0.0.250"
table_size = 251
backends = [{ address = "10.0.0.21" }]

[[vip]]
name = "web6"
address = "2001:db8::100"
port = 80
protocol = "tcp"
forwarding = "nat"
snat = "2001:db8::250"
backend_port = 8080
table_size = 251
backends = [{ address = "2001:db8::11" }]

[[vip]]
name = "dns6"
address = "2001:db8::200"
port = 53
protocol = "udp"
forwarding = "nat"
snat = "2001:db8::250"
table_size = 251
backends = [{ address = "2001:db8::21" }]

[[vip]]
name = "keep"
address = "10.100.0.3"
port = 80
protocol = "tcp"
forwarding = "nat"
snat = "none"
table_size = 251
backends = [{ address = "10.0.0.31", port = 8080 }]

[[vip]]
name = "tiny"
address = "10.100.0.4"
port = 80
protocol = "tcp"
forwarding = "nat"
snat = "10.0.0.251"
snat_ports = "2000-2003"
table_size = 251
backends = [{ address = "10.0.0.41" }]

[[vip]]
name = "dsr"
address = "10.100.0.5"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
backends = [{ address = "10.0.0.51" }]
"#;

const WEB: IpAddr = v4([10, 100, 0, 1]);
const DNS: IpAddr = v4([10, 100, 0, 2]);
const WEB6: IpAddr = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100]);
const DNS6: IpAddr = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x200]);
const KEEP: IpAddr = v4([10, 100, 0, 3]);
const TINY: IpAddr = v4([10, 100, 0, 4]);
const SNAT4: IpAddr = v4([10, 0, 0, 250]);
const SNAT6: IpAddr = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x250]);

fn reach() -> Vec<(IpAddr, Reach)> {
    [
        v4([10, 0, 0, 11]),
        v4([10, 0, 0, 12]),
        v4([10, 0, 0, 21]),
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11]),
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x21]),
        v4([10, 0, 0, 31]),
        v4([10, 0, 0, 41]),
        v4([10, 0, 0, 51]),
    ]
    .into_iter()
    .map(|a| (a, Reach::Local))
    .collect()
}

fn world() -> World {
    World::load(CONFIG, &reach(), WorldOptions::default())
}

/// The client's address of `vip`'s family.
fn client(vip: IpAddr) -> IpAddr {
    match vip {
        IpAddr::V4(_) => IpAddr::V4(CLIENT4),
        IpAddr::V6(_) => IpAddr::V6(CLIENT6),
    }
}

/// `p` as it must leave towards `backend`: from `src`:`sport` to `backend`:`dport`, framed
/// from the balancer to the backend's MAC.
fn to_backend(w: &World, p: &Pkt, src: IpAddr, sport: u16, backend: IpAddr, dport: u16) -> Vec<u8> {
    let translated = Pkt {
        src,
        dst: backend,
        sport,
        dport,
        ..*p
    };
    frame(
        LB_MAC,
        w.neighbour_mac(backend),
        p.vlan,
        &translated.ip_bytes(),
    )
}

/// What `backend` sends back on the connection `p` became: from `backend`:`bport` to
/// `to`:`port`, framed from the backend to the balancer.
fn backend_reply(
    w: &World,
    l4: L4,
    backend: IpAddr,
    bport: u16,
    to: IpAddr,
    port: u16,
) -> (Pkt, Vec<u8>) {
    let reply = Pkt {
        src: backend,
        dst: to,
        sport: bport,
        dport: port,
        l4,
        ..tcp(to, port, bport)
    };
    let bytes = frame(w.neighbour_mac(backend), LB_MAC, None, &reply.ip_bytes());
    (reply, bytes)
}

/// `reply` as the client must receive it: from the VIP's address and port, framed from the
/// balancer to the client (the MACs the client's packet came with).
fn to_client(reply: &Pkt, vip: IpAddr, vport: u16, client_port: u16) -> Vec<u8> {
    let translated = Pkt {
        src: vip,
        dst: client(vip),
        sport: vport,
        dport: client_port,
        ..*reply
    };
    frame(LB_MAC, CLIENT_MAC, None, &translated.ip_bytes())
}

fn assert_sent(w: &World, input: &[u8], verdict: u32, expected: &[u8], case: &str) {
    let run = w.run(input);
    assert_eq!(run.verdict, verdict, "{case}: verdict");
    assert_checksums_valid(&run.output, case);
    assert_eq!(run.output, expected, "{case}: output bytes");
}

/// The forward entry of `p`'s connection.
/// The connection's forward entry, in the NAT tables or (a TCP connection before the
/// client's acknowledgement of the SYN-ACK) the pending ones.
fn forward_entry(w: &World, p: &Pkt) -> NatEntry {
    w.nat_entry_anywhere(&p.flow(), false)
        .expect("the connection has a forward entry")
}

fn address_of(words: &[u32; 4], v6: bool) -> IpAddr {
    let mut bytes = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    if v6 {
        IpAddr::from(bytes)
    } else {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

/// A whole TCP connection through full NAT, one family: the SYN (client's port kept), the
/// backend's SYN-ACK, the client's data, the backend's data, each byte for byte; the state.
fn tcp_through_full_nat(vip: IpAddr, snat: IpAddr, vip_name: &str) {
    let w = world();
    let case = format!("{vip_name}: TCP full NAT");
    let syn = tcp(vip, 40_000, 80);
    let backend = w.table_choice(vip_name, &syn.flow());
    let expected = to_backend(&w, &syn, snat, 40_000, backend, 8080);
    assert_sent(
        &w,
        &syn.bytes(),
        xdp_action::TX,
        &expected,
        &format!("{case}: SYN"),
    );
    let entry = forward_entry(&w, &syn);
    assert_eq!(entry.flags, NAT_F_SNAT, "{case}: forward entry flags");
    assert_eq!(entry.state, NAT_S_SYN, "{case}: state after the SYN");
    assert_eq!(address_of(&entry.src, vip.is_ipv6()), snat);
    let nat = w.nat_counters();
    assert_eq!(nat[NatCounter::Created as usize], 1, "{case}: created");
    assert_eq!(
        nat[NatCounter::PortKept as usize],
        1,
        "{case}: the client's port kept"
    );

    let (synack, bytes) = backend_reply(&w, L4::TcpSynAck, backend, 8080, snat, 40_000);
    let expected = to_client(&synack, vip, 80, 40_000);
    assert_sent(
        &w,
        &bytes,
        xdp_action::TX,
        &expected,
        &format!("{case}: SYN-ACK"),
    );
    let state = forward_entry(&w, &syn).state;
    assert_eq!(
        state,
        NAT_S_SYN | NAT_S_SYN_ACK,
        "{case}: state in the forward entry"
    );

    let data = tcp(vip, 40_000, 80).ack();
    let expected = to_backend(&w, &data, snat, 40_000, backend, 8080);
    assert_sent(
        &w,
        &data.bytes(),
        xdp_action::TX,
        &expected,
        &format!("{case}: data"),
    );
    let (answer, bytes) = backend_reply(&w, L4::TcpAck, backend, 8080, snat, 40_000);
    let expected = to_client(&answer, vip, 80, 40_000);
    assert_sent(
        &w,
        &bytes,
        xdp_action::TX,
        &expected,
        &format!("{case}: answer"),
    );

    let c = w.counters();
    assert_eq!(c.outcome(Outcome::ForwardedTx), 2, "{case}: forwarded");
    assert_eq!(c.outcome(Outcome::NatReplyTx), 2, "{case}: replies");
    let id = w.backend_id(vip_name, backend);
    assert_eq!(c.backends[&id].packets, 2, "{case}: backend counters");
    assert_eq!(c.backends[&id].new_flows, 1, "{case}: one new flow");
    assert_eq!(w.nat_entries(), 2, "{case}: one entry per direction");
}

#[test]
fn ipv4_tcp_connection_through_full_nat() {
    require();
    tcp_through_full_nat(WEB, SNAT4, "web");
}

#[test]
fn ipv6_tcp_connection_through_full_nat() {
    require();
    tcp_through_full_nat(WEB6, SNAT6, "web6");
}

/// UDP both ways, with a computed checksum and with none (0 stays 0).
fn udp_through_full_nat(vip: IpAddr, snat: IpAddr, vip_name: &str) {
    let w = world();
    let case = format!("{vip_name}: UDP full NAT");
    let query = udp(vip, 40_001, 53);
    let backend = w.table_choice(vip_name, &query.flow());
    let expected = to_backend(&w, &query, snat, 40_001, backend, 53);
    assert_sent(&w, &query.bytes(), xdp_action::TX, &expected, &case);
    let (answer, bytes) = backend_reply(&w, L4::Udp, backend, 53, snat, 40_001);
    let expected = to_client(&answer, vip, 53, 40_001);
    assert_sent(
        &w,
        &bytes,
        xdp_action::TX,
        &expected,
        &format!("{case}: answer"),
    );
    if vip.is_ipv4() {
        // No checksum (0) on IPv4 UDP: sent on without one.
        let mut zero = udp(vip, 40_001, 53).bytes();
        // Ethernet, an IPv4 header without options, UDP's checksum field.
        let at = 14 + 20 + 6;
        zero[at] = 0;
        zero[at + 1] = 0;
        let run = w.run(&zero);
        assert_eq!(run.verdict, xdp_action::TX, "{case}: checksum 0");
        let mut expected = to_backend(&w, &query, snat, 40_001, backend, 53);
        expected[at] = 0;
        expected[at + 1] = 0;
        assert_eq!(run.output, expected, "{case}: a UDP checksum of 0 stays 0");
    }
}

#[test]
fn ipv4_udp_through_full_nat() {
    require();
    udp_through_full_nat(DNS, SNAT4, "dns");
}

#[test]
fn ipv6_udp_through_full_nat() {
    require();
    udp_through_full_nat(DNS6, SNAT6, "dns6");
}

#[test]
fn destination_only_nat_keeps_the_client() {
    require();
    let w = world();
    let case = "destination-only NAT";
    let backend = v4([10, 0, 0, 31]);
    let syn = tcp(KEEP, 40_002, 80);
    let expected = to_backend(&w, &syn, client(KEEP), 40_002, backend, 8080);
    assert_sent(&w, &syn.bytes(), xdp_action::TX, &expected, case);
    assert_eq!(forward_entry(&w, &syn).flags & NAT_F_SNAT, 0);
    let (synack, bytes) = backend_reply(&w, L4::TcpSynAck, backend, 8080, client(KEEP), 40_002);
    let expected = to_client(&synack, KEEP, 80, 40_002);
    assert_sent(
        &w,
        &bytes,
        xdp_action::TX,
        &expected,
        &format!("{case}: reply"),
    );
}

#[test]
fn a_client_port_taken_on_the_same_backend_gets_another_one() {
    require();
    let w = world();
    let backend = v4([10, 0, 0, 21]);
    let first = udp(DNS, 40_003, 53);
    assert_eq!(w.run(&first.bytes()).verdict, xdp_action::TX);
    // Another client, the same port, the same (only) backend.
    let other = first.from(v4([192, 0, 2, 8]));
    let run = w.run(&other.bytes());
    assert_eq!(run.verdict, xdp_action::TX);
    let entry = forward_entry(&w, &other);
    let port = u16::from_be(entry.src_port);
    assert_ne!(port, 40_003, "the colliding port is not taken twice");
    assert_eq!(run.output, to_backend(&w, &other, SNAT4, port, backend, 53));
    let nat = w.nat_counters();
    assert_eq!(
        (
            nat[NatCounter::PortKept as usize],
            nat[NatCounter::PortProbed as usize]
        ),
        (1, 1)
    );
    // Each reply finds its own client.
    let (answer, bytes) = backend_reply(&w, L4::Udp, backend, 53, SNAT4, port);
    let translated = Pkt {
        src: DNS,
        dst: v4([192, 0, 2, 8]),
        sport: 53,
        dport: 40_003,
        ..answer
    };
    let expected = frame(LB_MAC, CLIENT_MAC, None, &translated.ip_bytes());
    assert_sent(
        &w,
        &bytes,
        xdp_action::TX,
        &expected,
        "the second client's reply",
    );
}

#[test]
fn an_exhausted_port_range_drops_new_connections_and_counts_them() {
    require();
    let w = world();
    // "tiny" has ports 2000 to 2003: four connections, each from another client port.
    let mut ports = Vec::new();
    for i in 0..4u16 {
        let syn = tcp(TINY, 41_000 + i, 80);
        assert_eq!(
            w.run(&syn.bytes()).verdict,
            xdp_action::TX,
            "connection {i}"
        );
        ports.push(u16::from_be(forward_entry(&w, &syn).src_port));
    }
    ports.sort_unstable();
    assert_eq!(
        ports,
        [2000, 2001, 2002, 2003],
        "every port of the range, once"
    );
    let fifth = tcp(TINY, 41_004, 80);
    let run = w.run(&fifth.bytes());
    assert_eq!(run.verdict, xdp_action::DROP, "the fifth connection");
    assert_eq!(w.counters().outcome(Outcome::NatNoPort), 1);
    assert_eq!(w.nat_counters()[NatCounter::NoPortExhausted as usize], 1);
    assert!(w.nat_entry(&fifth.flow(), false).is_none());
    // A retransmitted SYN of a connection keeps its port.
    let again = tcp(TINY, 41_000, 80);
    assert_eq!(
        w.run(&again.bytes()).verdict,
        xdp_action::TX,
        "retransmitted SYN"
    );
    assert_eq!(w.nat_counters()[NatCounter::Created as usize], 4);
}

#[test]
fn icmp_errors_are_translated_both_ways() {
    require();
    for (vip, snat, name) in [(WEB, SNAT4, "web"), (WEB6, SNAT6, "web6")] {
        let w = world();
        let syn = tcp(vip, 40_004, 80);
        let backend = w.table_choice(name, &syn.flow());
        assert_eq!(w.run(&syn.bytes()).verdict, xdp_action::TX);
        // From the backend's side: a router between balancer and backend says the translated
        // SYN was too big; the client must hear it about its own packet, from the VIP.
        let sent = Pkt {
            src: snat,
            dst: backend,
            sport: 40_004,
            dport: 8080,
            ..syn
        };
        let error = router_too_big(&sent.ip_bytes());
        let run = w.run(&error);
        assert_eq!(
            run.verdict,
            xdp_action::TX,
            "{name}: ICMP error to the client"
        );
        assert_checksums_valid(&run.output, name);
        let expected = {
            let original = router_too_big(&syn.ip_bytes());
            let ip = &original[14..];
            let mut translated = frame(LB_MAC, CLIENT_MAC, None, ip);
            // The router's address becomes the VIP's (outer source).
            set_outer_source(&mut translated, vip);
            translated
        };
        assert_eq!(
            run.output, expected,
            "{name}: the client's ICMP error, byte for byte"
        );
        // From the client's side: a router says the VIP's answer was too big; the backend
        // must hear it about its own packet, from the SNAT address.
        let answer = Pkt {
            src: vip,
            dst: client(vip),
            sport: 80,
            dport: 40_004,
            l4: L4::TcpAck,
            ..syn
        };
        let error = router_too_big(&answer.ip_bytes());
        let run = w.run(&error);
        assert_eq!(
            run.verdict,
            xdp_action::TX,
            "{name}: ICMP error to the backend"
        );
        assert_checksums_valid(&run.output, name);
        let from_backend = Pkt {
            src: backend,
            dst: snat,
            sport: 8080,
            dport: 40_004,
            ..answer
        };
        let original = router_too_big(&from_backend.ip_bytes());
        let mut expected = frame(LB_MAC, w.neighbour_mac(backend), None, &original[14..]);
        set_outer_source(&mut expected, snat);
        assert_eq!(
            run.output, expected,
            "{name}: the backend's ICMP error, byte for byte"
        );
        let nat = w.nat_counters();
        assert_eq!(nat[NatCounter::IcmpReply as usize], 1);
        assert_eq!(nat[NatCounter::IcmpForward as usize], 1);
    }
}

/// Sets the outer source address of an ICMP error frame (and its checksums, from scratch).
fn set_outer_source(frame_bytes: &mut Vec<u8>, source: IpAddr) {
    use etherparse::{Icmpv4Header, Icmpv6Header, Ipv4Header, Ipv6Header};
    let ip = 14;
    match source {
        IpAddr::V4(a) => {
            let (mut h, _) = Ipv4Header::from_slice(&frame_bytes[ip..]).unwrap();
            h.source = a.octets();
            h.header_checksum = h.calc_header_checksum();
            let len = h.header_len();
            frame_bytes.splice(ip..ip + len, h.to_bytes());
            let (icmp, _) = Icmpv4Header::from_slice(&frame_bytes[ip + len..]).unwrap();
            let payload = frame_bytes[ip + len + 8..].to_vec();
            let check = icmp.icmp_type.calc_checksum(&payload);
            frame_bytes[ip + len + 2..ip + len + 4].copy_from_slice(&check.to_be_bytes());
        }
        IpAddr::V6(a) => {
            let (mut h, _) = Ipv6Header::from_slice(&frame_bytes[ip..]).unwrap();
            h.source = a.octets();
            frame_bytes.splice(ip..ip + 40, h.to_bytes());
            let (icmp, _) = Icmpv6Header::from_slice(&frame_bytes[ip + 40..]).unwrap();
            let payload = frame_bytes[ip + 48..].to_vec();
            let check = icmp
                .icmp_type
                .calc_checksum(h.source, h.destination, &payload)
                .unwrap();
            frame_bytes[ip + 42..ip + 44].copy_from_slice(&check.to_be_bytes());
        }
    }
}

#[test]
fn a_reset_does_not_end_the_connection_at_once() {
    require();
    let w = world();
    let syn = tcp(WEB, 40_005, 80);
    let backend = w.table_choice("web", &syn.flow());
    assert_eq!(w.run(&syn.bytes()).verdict, xdp_action::TX);
    let (_, bytes) = backend_reply(&w, L4::TcpSynAck, backend, 8080, SNAT4, 40_005);
    assert_eq!(w.run(&bytes).verdict, xdp_action::TX);
    // A reset "from the client" (perhaps spoofed): forwarded, remembered, not trusted.
    let rst = Pkt {
        l4: L4::TcpRst,
        ..syn
    };
    assert_eq!(w.run(&rst.bytes()).verdict, xdp_action::TX);
    assert_ne!(forward_entry(&w, &syn).state & NAT_S_RST, 0);
    // The connection goes on; its next packet clears the reset.
    let data = syn.ack();
    assert_eq!(w.run(&data.bytes()).verdict, xdp_action::TX);
    assert_eq!(forward_entry(&w, &syn).state & NAT_S_RST, 0);
    let reply = w
        .nat_entry(
            &backend_reply(&w, L4::TcpAck, backend, 8080, SNAT4, 40_005)
                .0
                .flow(),
            true,
        )
        .expect("the reply entry stays");
    assert_eq!(reply.flags, NAT_F_REPLY | NAT_F_SNAT);
}

#[test]
fn a_reply_on_a_timed_out_connection_is_dropped_not_passed() {
    require();
    let w = world();
    let query = udp(DNS, 40_006, 53);
    let backend = v4([10, 0, 0, 21]);
    assert_eq!(w.run(&query.bytes()).verdict, xdp_action::TX);
    // The world's UDP timeout is 1 s.
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    let (_, bytes) = backend_reply(&w, L4::Udp, backend, 53, SNAT4, 40_006);
    let run = w.run(&bytes);
    assert_eq!(run.verdict, xdp_action::DROP);
    assert_eq!(w.counters().outcome(Outcome::NatReplyExpired), 1);
    // The client's next datagram starts a new connection (its port still held by the old
    // reply entry until the daemon sweeps it: another port).
    assert_eq!(w.run(&query.bytes()).verdict, xdp_action::TX);
    let nat = w.nat_counters();
    assert_eq!(nat[NatCounter::ExpiredOnLookup as usize], 1);
    assert_ne!(u16::from_be(forward_entry(&w, &query).src_port), 40_006);
}

#[test]
fn traffic_that_is_no_nat_reply_leaves_untouched() {
    require();
    let w = world();
    let backend = v4([10, 0, 0, 11]);
    // From a NAT backend (its filter bit is set), but on no connection.
    let (_, bytes) = backend_reply(&w, L4::TcpAck, backend, 8080, SNAT4, 40_007);
    let run = w.run(&bytes);
    assert_eq!(run.verdict, xdp_action::PASS);
    assert_eq!(run.output, bytes);
    assert_eq!(w.counters().outcome(Outcome::NotVip), 1);
    // From a DSR backend to anywhere: not even looked up.
    let (_, bytes) = backend_reply(
        &w,
        L4::TcpAck,
        v4([10, 0, 0, 51]),
        80,
        v4([192, 0, 2, 9]),
        1234,
    );
    let run = w.run(&bytes);
    assert_eq!((run.verdict, run.output), (xdp_action::PASS, bytes));
}

#[test]
fn draining_and_down_backends_of_a_nat_vip() {
    require();
    let mut w = world();
    let syn = tcp(WEB, 40_008, 80);
    let placed = w.table_choice("web", &syn.flow());
    let other = if placed == v4([10, 0, 0, 11]) {
        v4([10, 0, 0, 12])
    } else {
        v4([10, 0, 0, 11])
    };
    assert_eq!(w.run(&syn.bytes()).verdict, xdp_action::TX);
    // Draining: the connection stays, new ones go to the other backend.
    let drained = CONFIG.replace(
        &format!("{{ address = \"{placed}\" }}"),
        &format!("{{ address = \"{placed}\", drain = true }}"),
    );
    assert_ne!(drained, CONFIG);
    w.set_config(&drained);
    let data = syn.ack();
    let run = w.run(&data.bytes());
    assert_eq!(
        run.output,
        to_backend(&w, &data, SNAT4, 40_008, placed, 8080),
        "drained: kept"
    );
    let fresh = tcp(WEB, 40_009, 80);
    assert_eq!(
        w.run(&fresh.bytes()).output,
        to_backend(&w, &fresh, SNAT4, 40_009, other, 8080)
    );
    // Down: the connection is placed anew (another backend, its own translation).
    w.set_config(CONFIG);
    w.set_health("web", placed, balancer_tests::datapath::world::Health::Down);
    let run = w.run(&data.bytes());
    let entry = forward_entry(&w, &data);
    assert_eq!(
        address_of(&entry.dst, false),
        other,
        "re-placed off the down backend"
    );
    assert_eq!(
        run.output,
        to_backend(&w, &data, SNAT4, u16::from_be(entry.src_port), other, 8080)
    );
}

/// An ICMP error from `from` (framed from `mac`) about the IP packet `about`, addressed to
/// that packet's source, quoting as much of it as the protocols ask for.
fn icmp_error(from: IpAddr, mac: [u8; 6], about: &Pkt, v6_hop_limit: bool) -> Vec<u8> {
    use etherparse::{
        icmpv4::DestUnreachableHeader, icmpv6::TimeExceededCode, Icmpv4Type, Icmpv6Type,
        PacketBuilder,
    };
    let ip = about.ip_bytes();
    let mut out = Vec::new();
    match (from, about.src) {
        (IpAddr::V4(f), IpAddr::V4(to)) => PacketBuilder::ethernet2(mac, LB_MAC)
            .ipv4(f.octets(), to.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::Port,
            ))
            .write(&mut out, &ip[..28])
            .unwrap(),
        (IpAddr::V6(f), IpAddr::V6(to)) => {
            assert!(v6_hop_limit);
            PacketBuilder::ethernet2(mac, LB_MAC)
                .ipv6(f.octets(), to.octets(), 64)
                .icmpv6(Icmpv6Type::TimeExceeded(TimeExceededCode::HopLimitExceeded))
                .write(&mut out, &ip)
                .unwrap()
        }
        _ => unreachable!("mixed families"),
    }
    out
}

#[test]
fn port_unreachable_and_time_exceeded_are_translated_too() {
    require();
    // IPv4: the backend itself says its UDP port is closed; the client hears it from the VIP,
    // about its own datagram.
    let w = world();
    let backend = v4([10, 0, 0, 21]);
    let query = udp(DNS, 40_010, 53);
    assert_eq!(w.run(&query.bytes()).verdict, xdp_action::TX);
    let sent = Pkt {
        src: SNAT4,
        dst: backend,
        ..query
    };
    let run = w.run(&icmp_error(backend, w.neighbour_mac(backend), &sent, false));
    assert_eq!(
        run.verdict,
        xdp_action::TX,
        "port unreachable, to the client"
    );
    assert_checksums_valid(&run.output, "port unreachable");
    let mut expected = icmp_error(DNS, LB_MAC, &query, false);
    expected[..12].copy_from_slice(&[CLIENT_MAC, LB_MAC].concat());
    assert_eq!(
        run.output, expected,
        "the client's port unreachable, byte for byte"
    );
    // IPv6: a router on the client's side says the VIP's answer ran out of hops; the backend
    // hears it from the SNAT address, about its own answer.
    let w = world();
    let backend = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x21]);
    let query = udp(DNS6, 40_011, 53);
    assert_eq!(w.run(&query.bytes()).verdict, xdp_action::TX);
    let answer = Pkt {
        src: DNS6,
        dst: client(DNS6),
        sport: 53,
        dport: 40_011,
        ..query
    };
    let router: IpAddr = "2001:db8:ffff::1".parse().unwrap();
    let run = w.run(&icmp_error(router, CLIENT_MAC, &answer, true));
    assert_eq!(run.verdict, xdp_action::TX, "time exceeded, to the backend");
    assert_checksums_valid(&run.output, "time exceeded");
    let from_backend = Pkt {
        src: backend,
        dst: SNAT6,
        sport: 53,
        dport: 40_011,
        ..query
    };
    let mut expected = icmp_error(SNAT6, LB_MAC, &from_backend, true);
    expected[..12].copy_from_slice(&[w.neighbour_mac(backend), LB_MAC].concat());
    assert_eq!(
        run.output, expected,
        "the backend's time exceeded, byte for byte"
    );
}

fn require() {
    balancer_tests::netns::require_root("the NAT datapath fixtures (BPF_PROG_TEST_RUN)");
}

#[test]
fn over_the_flood_cap_new_nat_connections_are_refused() {
    require();
    let mut w = World::load(
        &format!("{CONFIG}\n[flood]\nnew_flows_per_cpu = 100\n"),
        &reach(),
        WorldOptions::default(),
    );
    let cpus = aya::util::nr_cpus().unwrap();
    // 300 connections within a CPU's second: at most 100 per CPU get a translation, the
    // others are dropped, counted, and leave nothing in the tables.
    let verdicts: Vec<u32> = (0..300u16)
        .map(|i| w.run(&tcp(WEB, 43_000 + i, 80).bytes()).verdict)
        .collect();
    let created = verdicts.iter().filter(|v| **v == xdp_action::TX).count();
    let refused = w.counters().outcome(Outcome::NatFloodRefused) as usize;
    assert_eq!(created + refused, 300);
    assert!(
        created <= 100 * cpus && refused >= 300 - 100 * cpus,
        "{created} created"
    );
    assert_eq!(
        w.nat_counters()[NatCounter::Created as usize],
        created as u64
    );
    assert_eq!(
        w.nat_pending_entries(),
        2 * created,
        "two entries per connection, none for the refused"
    );
    // A connection's later packets pass the cap: they create nothing.
    let first = (0..300u16)
        .find(|i| verdicts[*i as usize] == xdp_action::TX)
        .unwrap();
    let ack = tcp(WEB, 43_000 + first, 80).ack();
    assert_eq!(w.run(&ack.bytes()).verdict, xdp_action::TX);
    w.reset(CONFIG);
}

#[test]
fn a_tcp_connection_claims_the_nat_tables_only_once_its_client_answers_the_syn_ack() {
    require();
    let w = world();
    let syn = tcp(WEB, 44_000, 80);
    let backend = w.table_choice("web", &syn.flow());
    assert_eq!(w.run(&syn.bytes()).verdict, xdp_action::TX);
    assert_eq!(w.nat_entries(), 0, "a SYN claims no NAT table entry");
    assert_eq!(w.nat_pending_entries(), 2, "both directions pending");
    // A flood of SYNs (300 connections: 600 entries of the pending tables' 1,024): the NAT
    // tables stay empty.
    for port in 0..300u16 {
        assert_eq!(
            w.run(&tcp(WEB, 10_000 + port, 80).bytes()).verdict,
            xdp_action::TX
        );
    }
    assert_eq!(w.nat_entries(), 0, "the flood claimed no NAT table entry");
    // The backend's SYN-ACK (sequence number 5000) goes back to the client.
    let (_, synack) = backend_reply(&w, L4::TcpSynAck, backend, 8080, SNAT4, 44_000);
    assert_eq!(w.run(&synack).verdict, xdp_action::TX);
    let pending = w.nat_pending_entry(&syn.flow(), false).unwrap();
    assert_eq!(pending.isn, 5000, "the SYN-ACK's sequence number, recorded");
    // An acknowledgement of anything else is forwarded, and promotes nothing.
    let mut wrong = syn.ack().bytes();
    let ack_at = 14 + 20 + 8;
    wrong[ack_at..ack_at + 4].copy_from_slice(&1234u32.to_be_bytes());
    assert_eq!(w.run(&wrong).verdict, xdp_action::TX);
    assert_eq!(
        w.nat_entries(),
        0,
        "a wrong acknowledgement promotes nothing"
    );
    let promoted = w.counters().defence(DefenceCounter::Promoted);
    // The client's acknowledgement of the SYN-ACK (5001): both entries move.
    assert_eq!(w.run(&syn.ack().bytes()).verdict, xdp_action::TX);
    assert_eq!(w.nat_entries(), 2, "promoted: both directions");
    assert!(w.nat_pending_entry(&syn.flow(), false).is_none());
    assert_eq!(w.counters().defence(DefenceCounter::Promoted), promoted + 1);
    // The connection goes on from the NAT tables, both ways.
    let (_, answer) = backend_reply(&w, L4::TcpAck, backend, 8080, SNAT4, 44_000);
    assert_eq!(w.run(&answer).verdict, xdp_action::TX);
    assert_eq!(w.run(&syn.ack().bytes()).verdict, xdp_action::TX);
    assert_eq!(
        w.nat_entry(&syn.flow(), false).unwrap().state & NAT_S_SYN_ACK,
        NAT_S_SYN_ACK
    );
}

//! The fuzz tier: generated and mutated packets through the real program (BPF_PROG_TEST_RUN,
//! maps filled by the daemon's code), a million per forwarding mode by default, each judged
//! by an oracle:
//! - no XDP_ABORTED;
//! - a packet passed to the stack leaves exactly as it came;
//! - a packet not addressed to any VIP (nor, under NAT, to a SNAT address, where replies come
//!   back) is passed;
//! - a forwarded or answered packet parses with its lengths consistent with the frame, its
//!   outermost IPv4 header checksum right unless the program left that header as it came,
//!   and its transport checksum right whenever the input's was (answers: always);
//! - the outcome counters grow by exactly the packets sent.
//!
//! The seed is printed (`FUZZ_SEED` replays a run, `FUZZ_PACKETS` sets the count); a packet
//! that fails is written to `target/fuzz/` as hex, with a fixture to paste.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Instant, SystemTime},
};

use balancer_common::xdp_action;
use balancer_tests::{
    datapath::{
        packet::{assert_checksums_valid, router_too_big, tcp, udp, Pkt},
        world::{Reach, World, WorldOptions},
        CLIENT4, CLIENT6,
    },
    netns::{remove_stale, require_root, Netns},
};

const DEFAULT_PACKETS: u64 = 1_000_000;

/// A forwarding mode's world: its config, and the addresses packets are aimed at.
struct Mode {
    name: &'static str,
    config: &'static str,
    vips: &'static [&'static str],
    /// Where NAT replies come back (not VIPs, yet not passed untouched).
    snat: &'static [&'static str],
    backends: &'static [&'static str],
}

const MODES: [Mode; 3] = [
    Mode {
        name: "dsr",
        config: r#"
[balancer]
hash_seed = 7
conn_table_size = 4096
[[vip]]
name = "web"
address = "10.100.0.1"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
backends = [{ address = "10.0.0.11" }, { address = "10.0.0.12" }]
[[vip]]
name = "dns"
address = "10.100.0.2"
port = 53
protocol = "udp"
forwarding = "dsr"
fragments = true
table_size = 251
backends = [{ address = "10.0.0.21" }, { address = "10.0.0.22" }]
[[vip]]
name = "web6"
address = "2001:db8::100"
port = "any"
protocol = "tcp"
forwarding = "dsr"
table_size = 251
source_limit = { rate = 1000, burst = 100, ipv6_prefix = 64 }
backends = [{ address = "2001:db8::11" }]
[flood]
new_flows_per_cpu = 20000
"#,
        vips: &["10.100.0.1", "10.100.0.2", "2001:db8::100"],
        snat: &[],
        backends: &[
            "10.0.0.11",
            "10.0.0.12",
            "10.0.0.21",
            "10.0.0.22",
            "2001:db8::11",
        ],
    },
    Mode {
        name: "tunnel",
        config: r#"
[balancer]
hash_seed = 7
conn_table_size = 4096
[[vip]]
name = "t4"
address = "10.100.1.1"
port = 80
protocol = "tcp"
forwarding = "tunnel"
tunnel_source_v4 = "172.16.0.0/16"
table_size = 251
backends = [{ address = "10.1.0.1" }, { address = "10.1.0.2" }]
[[vip]]
name = "t46"
address = "10.100.1.2"
port = 53
protocol = "udp"
forwarding = "tunnel"
table_size = 251
backends = [{ address = "fc00::1" }]
[[vip]]
name = "t6"
address = "2001:db8::200"
port = 80
protocol = "tcp"
forwarding = "tunnel"
table_size = 251
source_limit = { rate = 1000, burst = 100 }
backends = [{ address = "fc00::2" }]
[flood]
new_flows_per_cpu = 20000
"#,
        vips: &["10.100.1.1", "10.100.1.2", "2001:db8::200"],
        snat: &[],
        backends: &["10.1.0.1", "10.1.0.2", "fc00::1", "fc00::2"],
    },
    Mode {
        name: "nat",
        config: r#"
[balancer]
hash_seed = 7
conn_table_size = 4096
nat_table_size = 4096
[[vip]]
name = "web"
address = "10.100.2.1"
port = 80
protocol = "tcp"
forwarding = "nat"
snat = "10.0.0.250"
backend_port = 8080
table_size = 251
backends = [{ address = "10.0.0.31" }, { address = "10.0.0.32" }]
[[vip]]
name = "dns"
address = "10.100.2.2"
port = 53
protocol = "udp"
forwarding = "nat"
snat = "10.0.0.250"
table_size = 251
backends = [{ address = "10.0.0.41" }]
[[vip]]
name = "web6"
address = "2001:db8::300"
port = 80
protocol = "tcp"
forwarding = "nat"
snat = "2001:db8::250"
backend_port = 8080
table_size = 251
source_limit = { rate = 1000, burst = 100 }
backends = [{ address = "2001:db8::31" }]
[flood]
new_flows_per_cpu = 20000
"#,
        vips: &["10.100.2.1", "10.100.2.2", "2001:db8::300"],
        snat: &["10.0.0.250", "2001:db8::250"],
        backends: &["10.0.0.31", "10.0.0.32", "10.0.0.41", "2001:db8::31"],
    },
];

fn pick<T: Copy>(rng: &mut fastrand::Rng, from: &[T]) -> T {
    from[rng.usize(..from.len())]
}

fn address(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A well-formed packet of some kind aimed at this mode's world.
fn generate(rng: &mut fastrand::Rng, mode: &Mode) -> Vec<u8> {
    let vip = address(pick(rng, mode.vips));
    let port = pick(rng, &[80u16, 53, 443, 8080, 0, 65535]);
    let sport = rng.u16(1..);
    let mut p: Pkt = match rng.u8(..6) {
        0 => tcp(vip, sport, port),
        1 => tcp(vip, sport, port).ack(),
        2 => udp(vip, sport, port),
        3 => tcp(
            address(pick(rng, &["10.100.9.9", "2001:db8::999", "10.0.0.254"])),
            sport,
            port,
        ),
        4 => {
            // A backend's reply (NAT: to a SNAT address).
            let to = if mode.snat.is_empty() {
                if vip.is_ipv4() {
                    IpAddr::V4(CLIENT4)
                } else {
                    IpAddr::V6(CLIENT6)
                }
            } else {
                address(pick(rng, mode.snat))
            };
            let from = address(pick(rng, mode.backends));
            if from.is_ipv4() != to.is_ipv4() {
                tcp(vip, sport, port)
            } else {
                tcp(to, port, sport).from(from).ack()
            }
        }
        _ => {
            let reply = tcp(IpAddr::V4(CLIENT4), port, sport)
                .from(vip)
                .ack()
                .size(1400);
            if vip.is_ipv4() {
                return router_too_big(&reply.ip_bytes());
            }
            tcp(vip, sport, port)
        }
    };
    if rng.u8(..8) == 0 {
        p = p.vlan(rng.u16(1..4095));
    }
    if rng.u8(..8) == 0 && vip.is_ipv4() {
        p = p.with_options();
    }
    if rng.u8(..8) == 0 && vip.is_ipv6() {
        p = p.ext_headers(rng.u8(1..4));
    }
    if rng.u8(..8) == 0 {
        p = p.fragment(rng.u16(..64), rng.bool());
    }
    if rng.bool() {
        p = p.size(rng.usize(..1400));
    }
    p.bytes()
}

/// Zero to four random changes: bits, bytes, lengths, cuts, growth.
fn mutate(rng: &mut fastrand::Rng, mut f: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.u8(..5) {
        if f.len() < 15 {
            break;
        }
        let at = rng.usize(..f.len());
        match rng.u8(..7) {
            0 => f[at] ^= 1 << rng.u8(..8),
            1 => f[at] = rng.u8(..),
            // The IPv4 total length or the IPv6 payload length (where they would be).
            2 => {
                let at = if rng.bool() { 16 } else { 18 };
                if at + 1 < f.len() {
                    f[at..at + 2].copy_from_slice(&rng.u16(..).to_be_bytes());
                }
            }
            // The IPv4 header length and version.
            3 => f[14] = rng.u8(..),
            4 => f.truncate(rng.usize(14..=f.len())),
            5 => f.extend((0..rng.usize(..64)).map(|_| rng.u8(..))),
            _ => {
                // The protocol or next header.
                let at = if rng.bool() { 23 } else { 20 };
                if at < f.len() {
                    let any = rng.u8(..);
                    f[at] = pick(rng, &[1u8, 6, 17, 58, 0, 43, 44, 60, 4, 41, any]);
                }
            }
        }
    }
    f
}

/// The destination address of a frame, if it has one where it would be.
fn destination(f: &[u8]) -> Option<IpAddr> {
    address_at(f, 16, 24)
}

/// The source address of a frame, if it has one where it would be.
fn source(f: &[u8]) -> Option<IpAddr> {
    address_at(f, 12, 8)
}

/// Where a frame's IP header starts (after at most one VLAN tag) and its EtherType, if the
/// frame is long enough to say.
fn l3(f: &[u8]) -> Option<(usize, u16)> {
    let l3 = match u16::from_be_bytes([*f.get(12)?, *f.get(13)?]) {
        0x8100 | 0x88a8 => 18,
        _ => 14,
    };
    Some((l3, u16::from_be_bytes([*f.get(l3 - 2)?, *f.get(l3 - 1)?])))
}

/// The IPv4 address at `v4` or the IPv6 one at `v6` bytes into the IP header.
fn address_at(f: &[u8], v4: usize, v6: usize) -> Option<IpAddr> {
    let (l3, ether_type) = l3(f)?;
    match ether_type {
        0x0800 => {
            let d: [u8; 4] = f.get(l3 + v4..l3 + v4 + 4)?.try_into().ok()?;
            Some(IpAddr::from(d))
        }
        0x86dd => {
            let d: [u8; 16] = f.get(l3 + v6..l3 + v6 + 16)?.try_into().ok()?;
            Some(IpAddr::from(d))
        }
        _ => None,
    }
}

/// Whether the packet library finds every checksum of a frame right (no panic output).
fn checksums_valid(f: &[u8]) -> bool {
    std::panic::catch_unwind(|| assert_checksums_valid(f, "")).is_ok()
}

/// The IP header of a frame as it starts, for "left as it came".
fn outer_ip(f: &[u8]) -> Option<&[u8]> {
    let (l3, _) = l3(f)?;
    f.get(l3..l3 + 20)
}

/// Whether a frame's IPv4 header checksum is right (false for anything else).
fn ipv4_checksum_right(f: &[u8]) -> bool {
    l3(f).and_then(|(l3, _)| f.get(l3..)).is_some_and(|ip| {
        etherparse::Ipv4Header::from_slice(ip)
            .is_ok_and(|(h, _)| h.header_checksum == h.calc_header_checksum())
    })
}

/// The IP headers of a frame the program sent (and of the packet inside a tunnel) against
/// the bytes: lengths that the frame holds, and (`check_checksum`) an IPv4 header checksum
/// that is right.
fn ip_lengths(f: &[u8], check_checksum: bool) -> Result<(), String> {
    let (l3, ether_type) = l3(f).ok_or("a frame too short for its EtherType")?;
    let (protocol, payload) = ip_header(&f[l3..], ether_type == 0x0800, check_checksum)?;
    match protocol {
        // A tunnel: the packet inside, within the outer payload.
        4 => ip_header(payload, true, false).map(drop),
        41 => ip_header(payload, false, false).map(drop),
        _ => Ok(()),
    }
}

/// One IP header at the start of `p`: its protocol and payload, or what is wrong.
fn ip_header(p: &[u8], v4: bool, checksum: bool) -> Result<(u8, &[u8]), String> {
    if v4 {
        if p.len() < 20 || p[0] >> 4 != 4 {
            return Err(format!("no IPv4 header in {} bytes", p.len()));
        }
        let header = usize::from(p[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
        if header < 20 || total < header || total > p.len() {
            return Err(format!(
                "IPv4 header {header} bytes, total length {total}, {} bytes sent",
                p.len()
            ));
        }
        if checksum {
            let h = etherparse::Ipv4Header::from_slice(p)
                .map_err(|e| e.to_string())?
                .0;
            if h.header_checksum != h.calc_header_checksum() {
                return Err("an IPv4 header checksum the program wrote is wrong".into());
            }
        }
        Ok((p[9], &p[header..total]))
    } else {
        if p.len() < 40 || p[0] >> 4 != 6 {
            return Err(format!("no IPv6 header in {} bytes", p.len()));
        }
        let total = 40 + usize::from(u16::from_be_bytes([p[4], p[5]]));
        if total > p.len() {
            return Err(format!("IPv6 length {total}, {} bytes sent", p.len()));
        }
        Ok((p[6], &p[40..total]))
    }
}

/// What is wrong with the program's answer to `input`, if anything.
fn judge(
    mode: &Mode,
    input: &[u8],
    verdict: u32,
    output: &[u8],
    ours: &BTreeSet<IpAddr>,
) -> Option<String> {
    if verdict == xdp_action::ABORTED {
        return Some("XDP_ABORTED".into());
    }
    if verdict == xdp_action::PASS && output != input {
        return Some("passed, but altered".into());
    }
    let dst = destination(input);
    if dst.is_none_or(|d| !ours.contains(&d)) && verdict != xdp_action::PASS {
        return Some(format!(
            "addressed to {dst:?}, no VIP, yet verdict {verdict}"
        ));
    }
    if verdict != xdp_action::TX && verdict != xdp_action::REDIRECT {
        return None;
    }
    // The program answers for an IPv4 header checksum it built (a tunnel's outer header) or
    // changed from a right one (NAT, answers): an incremental update of a client's wrong
    // checksum stays wrong, the backend's to drop.
    let tunnel =
        |f: &[u8]| outer_ip(f).is_some_and(|h| h[0] >> 4 == 4 && (h[9] == 4 || h[9] == 41));
    let must_check = (tunnel(output) && !tunnel(input))
        || (outer_ip(output) != outer_ip(input) && ipv4_checksum_right(input));
    if let Err(problem) = ip_lengths(output, must_check) {
        return Some(format!("sent a malformed frame: {problem}"));
    }
    // An answer (an echo reply, a "too big") goes back to the sender and is the program's
    // own through and through; a forwarded packet keeps its transport checksum right if it
    // was (translated or not).
    let answered = source(input).is_some() && destination(output) == source(input);
    // (An echo request with a wrong checksum is not answered: every answer must be right.)
    if (answered || checksums_valid(input)) && !checksums_valid(output) {
        return Some(if answered {
            "answered with a wrong checksum".into()
        } else {
            "forwarded with a wrong checksum (the input's were right)".into()
        });
    }
    let _ = mode;
    None
}

fn run_mode(mode: &Mode, seed: u64, packets: u64) -> Result<(u64, f64), String> {
    let reach: Vec<(IpAddr, Reach)> = mode
        .backends
        .iter()
        .map(|b| (address(b), Reach::Local))
        .collect();
    let world = World::load(mode.config, &reach, WorldOptions::default());
    let ours: BTreeSet<IpAddr> = mode
        .vips
        .iter()
        .chain(mode.snat)
        .map(|a| address(a))
        .collect();
    let mut rng = fastrand::Rng::with_seed(seed);
    let before = world.counters();
    let started = Instant::now();
    for i in 0..packets {
        let base = generate(&mut rng, mode);
        let input = if rng.u8(..8) == 0 {
            (0..rng.usize(14..200)).map(|_| rng.u8(..)).collect()
        } else {
            mutate(&mut rng, base)
        };
        let run = world.run(&input);
        if let Some(problem) = judge(mode, &input, run.verdict, &run.output, &ours) {
            let sent: String = run.output.iter().map(|b| format!("{b:02x}")).collect();
            let problem = format!("{problem} (verdict {}, sent {sent})", run.verdict);
            return Err(write_failure(mode, seed, i, &input, &problem));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = world.counters();
    let counted: u64 = after.outcomes.iter().sum::<u64>() - before.outcomes.iter().sum::<u64>();
    if counted != packets {
        return Err(format!(
            "{}: {packets} packets sent, the outcome counters grew by {counted}",
            mode.name
        ));
    }
    Ok((packets, seconds))
}

/// Writes the failing packet as hex and a fixture; returns the message.
fn write_failure(mode: &Mode, seed: u64, i: u64, input: &[u8], problem: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz");
    let _ = std::fs::create_dir_all(&dir);
    let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!("{}-{seed}-{i}.hex", mode.name));
    let _ = std::fs::write(&path, &hex);
    format!(
        "{}: packet {i} of seed {seed}: {problem}\n  written to {}\n  replay: FUZZ_SEED={seed} cargo test -p balancer-tests --test fuzz\n  \
         a fixture: fixture(\"fuzz {} seed {seed} packet {i}: {problem}\", unused(), passed(Outcome::...)).raw(|_| hex(\"{hex}\"))",
        mode.name,
        path.display(),
        mode.name
    )
}

#[test]
fn a_million_malformed_packets_per_mode() {
    require_root("the fuzz tier (BPF_PROG_TEST_RUN)");
    remove_stale("lbt-");
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let packets = std::env::var("FUZZ_PACKETS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_PACKETS);
    println!("fuzz: seed {seed} (FUZZ_SEED={seed} replays it), {packets} packets per mode");
    let ns = Netns::create(&format!("lbt-{}-fuzz", std::process::id()));
    // The checksum checks panic when they fail: quiet while they run, loud again after.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let results = ns.run(move || {
        MODES
            .iter()
            .enumerate()
            .map(|(m, mode)| run_mode(mode, seed.wrapping_add(m as u64), packets))
            .collect::<Vec<_>>()
    });
    std::panic::set_hook(hook);
    for (mode, result) in MODES.iter().zip(results) {
        match result {
            Ok((n, seconds)) => println!(
                "fuzz {}: {n} packets in {seconds:.1} s ({:.1} µs each): no abort, nothing \
                 altered that was passed or not ours, every answer well formed, counters add up",
                mode.name,
                seconds * 1e6 / n as f64
            ),
            Err(problem) => panic!("{problem}"),
        }
    }
}

/// Packets the fuzz tier found wrong once, each run again in its mode's world and judged by
/// the same oracle: (mode, what was wrong, the frame).
const FOUND: &[(&str, &str, &str)] = &[(
    "nat",
    "an ICMP error about a NAT connection, in a frame with 20 bytes of Ethernet padding: the \
     padding was taken for the quoted TCP checksum and changed, putting the ICMP checksum wrong",
    "021b000000fe027700000001080045000038000040004001042cc63364010a6402010304860d00000578450005a000004000400666ec0a640201c000020700506d3e000003e85a524dc2f72494050bbd0f63276f47905abc5370",
), (
    "nat",
    "an echo request to a VIP (behind IPv4 options) with a wrong ICMP checksum: answered \
     with an equally wrong reply",
    "021b000000fe027700000001080048000038000040004001042bc63364010a6402020304f22100000578450005a008004000400666eb0a640222c0000207ffff017a000003e8",
)];

#[test]
fn packets_the_fuzzer_found_stay_fixed() {
    require_root("the fuzz tier (BPF_PROG_TEST_RUN)");
    remove_stale("lbt-");
    let ns = Netns::create(&format!("lbt-{}-fuzz-found", std::process::id()));
    let problems = ns.run(|| {
        let mut problems = Vec::new();
        for (name, what, hex) in FOUND {
            let mode = MODES.iter().find(|m| m.name == *name).unwrap();
            let reach: Vec<(IpAddr, Reach)> = mode
                .backends
                .iter()
                .map(|b| (address(b), Reach::Local))
                .collect();
            let world = World::load(mode.config, &reach, WorldOptions::default());
            // The connection the error is about, as the client opened it.
            world.run(&tcp(address("10.100.2.1"), 27_966, 80).bytes());
            let input: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            let ours: BTreeSet<IpAddr> = mode
                .vips
                .iter()
                .chain(mode.snat)
                .map(|a| address(a))
                .collect();
            let run = world.run(&input);
            if let Some(problem) = judge(mode, &input, run.verdict, &run.output, &ours) {
                problems.push(format!("{name}: {what}: {problem}"));
            }
        }
        problems
    });
    assert!(problems.is_empty(), "{problems:#?}");
}

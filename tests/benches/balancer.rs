//! `cargo xtask bench`: the data plane and the control plane measured side by side in one run.
//! Not a test: it prints ratios and figures and writes them as JSON and Markdown; nothing here
//! fails on speed. Needs root (BPF_PROG_TEST_RUN, XDP, network namespaces).
//!
//! Arguments: `[--quick] [--only PART] [--out DIR] [--baseline-name REV --baseline-object FILE
//! --baseline-bin FILE]`. `--quick` shrinks every measurement to a smoke run (the harness must
//! not rot; its figures mean little). `--only` measures one part: `datapath`, `control` or
//! `e2e`; `--class TEXT`, only the data-plane classes whose mode and label contain TEXT (the
//! new-flow section is the class "new flows"). With a baseline (another revision's XDP object and
//! `balancer` binary, which `cargo xtask bench --baseline REV` builds), the per-packet costs
//! and the reload latency are measured for both, interleaved round by round in this one run,
//! and reported side by side with their ratio.
#![allow(
    clippy::too_many_lines,
    reason = "end-to-end scenarios and fixture tables read top to bottom; the 80-line rule is the daemon's"
)]
#![allow(
    unused_crate_dependencies,
    reason = "every test target of the crate gets all its dev-dependencies and uses some"
)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions};
use balancer_common::{map_names, program_names, DEFAULT_CONN_TABLE_SIZE};
use balancer_tests::{
    datapath::{
        packet::{frame, tcp, udp},
        world::{MaglevBackends, Reach, World, WorldOptions},
        LB_MAC,
    },
    http::{get, get_json},
    netns::{remove_stale, require_root, Netns},
    process::BalancerProcess,
    scratch::Scratch,
    topology::{backend_addr, DsrTopology, BALANCER_ADDR, VIP_ADDR},
};
use serde_json::{json, Value};

struct Args {
    quick: bool,
    /// The one part to measure (`PARTS`), or every part.
    only: Option<String>,
    /// Only the data-plane classes whose label contains this.
    class: Option<String>,
    /// This build's program with the connection tables as an LRU per CPU.
    lru_per_cpu: Option<&'static [u8]>,
    out: PathBuf,
    baseline: Option<Baseline>,
}

/// Another revision, measured beside this one.
struct Baseline {
    name: String,
    /// Its XDP object (the same map layout: its maps are filled by this revision's code).
    object: &'static [u8],
    /// Its `balancer` binary.
    binary: PathBuf,
}

fn args() -> Args {
    let mut args = Args {
        quick: false,
        only: None,
        class: None,
        lru_per_cpu: None,
        out: PathBuf::from("target/bench"),
        baseline: None,
    };
    let (mut name, mut object, mut binary) = (None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--quick" => args.quick = true,
            "--class" => args.class = Some(value()),
            "--lru-per-cpu-object" => {
                let path = value();
                let bytes = std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("the per-CPU LRU object {path}: {e}"));
                args.lru_per_cpu = Some(Box::leak(bytes.into_boxed_slice()));
            }
            "--only" => {
                let part = value();
                assert!(
                    PARTS.contains(&part.as_str()),
                    "--only {part:?}: the parts are {}",
                    PARTS.join(", ")
                );
                args.only = Some(part);
            }
            "--out" => args.out = PathBuf::from(value()),
            "--baseline-name" => name = Some(value()),
            "--baseline-object" => object = Some(PathBuf::from(value())),
            "--baseline-bin" => binary = Some(PathBuf::from(value())),
            // cargo bench passes --bench to harness=false targets.
            "--bench" => {}
            other => panic!(
                "unknown argument {other:?}: use [--quick] [--only PART] [--class TEXT] [--out DIR] [--lru-per-cpu-object FILE] \
                 [--baseline-name REV --baseline-object FILE --baseline-bin FILE]"
            ),
        }
    }
    args.baseline = match (name, object, binary) {
        (None, None, None) => None,
        (Some(name), Some(object), Some(binary)) => {
            let bytes = std::fs::read(&object)
                .unwrap_or_else(|e| panic!("the baseline object {}: {e}", object.display()));
            Some(Baseline {
                name,
                object: Box::leak(bytes.into_boxed_slice()),
                binary,
            })
        }
        _ => {
            panic!("a baseline needs all of --baseline-name, --baseline-object and --baseline-bin")
        }
    };
    args
}

/// The parts of a run, each measured unless `--only` names another.
const PARTS: [&str; 3] = ["datapath", "control", "e2e"];

/// Sizes of every measurement, full or quick.
struct Sizes {
    rounds: usize,
    repeats: u32,
    /// Tunnel classes run one packet per call (see `datapath`): calls per round.
    single_calls: usize,
    backend_counts: &'static [usize],
    maglev_runs: usize,
    vip_counts: &'static [usize],
    reloads: usize,
    generator_packets: u32,
    e2e_seconds: u64,
    e2e_rounds: usize,
}

fn sizes(quick: bool) -> Sizes {
    if quick {
        Sizes {
            rounds: 3,
            repeats: 20_000,
            single_calls: 2_000,
            backend_counts: &[1, 100],
            maglev_runs: 3,
            vip_counts: &[1, 64],
            reloads: 5,
            generator_packets: 100_000,
            e2e_seconds: 1,
            e2e_rounds: 1,
        }
    } else {
        Sizes {
            rounds: 10,
            repeats: 1_000_000,
            single_calls: 100_000,
            backend_counts: &[1, 100, 10_000],
            maglev_runs: 20,
            vip_counts: &[1, 64, 512],
            reloads: 50,
            generator_packets: 5_000_000,
            e2e_seconds: 5,
            e2e_rounds: 3,
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let args = args();
    require_root("the benchmarks");
    let sizes = sizes(args.quick);
    std::fs::create_dir_all(&args.out).unwrap();
    let mut commands: Vec<String> = Vec::new();
    let started = Instant::now();
    println!(
        "benchmarks ({}), results to {}",
        if args.quick {
            "quick smoke run"
        } else {
            "full run"
        },
        args.out.display()
    );

    let baseline = args.baseline.as_ref();
    if let Some(b) = baseline {
        println!(
            "baseline: revision {} ({}, {}), measured beside this build",
            b.name,
            b.binary.display(),
            b.object.len()
        );
    }
    let wanted = |part: &str| args.only.as_deref().is_none_or(|only| only == part);
    let (datapath, new_flows) = if wanted("datapath") {
        (
            datapath(&sizes, baseline, args.class.as_deref(), &mut commands),
            if args
                .class
                .as_deref()
                .is_none_or(|c| "new flows".contains(c))
            {
                new_flows(&sizes, baseline, args.lru_per_cpu, &mut commands)
            } else {
                Value::Null
            },
        )
    } else {
        (Value::Null, Value::Null)
    };
    let control = if wanted("control") {
        control_plane(&sizes, baseline, &mut commands)
    } else {
        Value::Null
    };
    let e2e = if wanted("e2e") {
        end_to_end(&sizes, &mut commands)
    } else {
        Value::Null
    };

    let report = json!({
        "quick": args.quick,
        "only": args.only,
        "baseline": baseline.map(|b| b.name.clone()),
        "machine": machine(),
        "date": chrono_like_now(),
        "seconds": started.elapsed().as_secs(),
        "commands": commands,
        "datapath": datapath,
        "new_flows": new_flows,
        "control_plane": control,
        "end_to_end": e2e,
    });
    let markdown = markdown(&report);
    std::fs::write(
        args.out.join("latest.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .unwrap();
    std::fs::write(args.out.join("latest.md"), &markdown).unwrap();
    println!("\n{markdown}");
    println!(
        "written: {} and {}",
        args.out.join("latest.json").display(),
        args.out.join("latest.md").display()
    );
}

fn chrono_like_now() -> String {
    let out = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned());
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .ok();
    json!({
        "cpu": model,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": kernel,
    })
}

// -------------------------------------------------------------------------------------------
// 1. Data plane cost per packet (BPF_PROG_TEST_RUN on the real object)

/// Backend `i` (from 0) of a benchmark VIP.
fn bench_backend(v6: bool, i: usize) -> IpAddr {
    let j = i + 1;
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, j as u16))
    } else {
        IpAddr::V4(Ipv4Addr::new(
            10,
            (10 + j / 65_536) as u8,
            ((j / 256) % 256) as u8,
            (j % 256) as u8,
        ))
    }
}

/// The world of this build, and the same world with the baseline's program.
struct Worlds {
    current: World,
    baseline: Option<World>,
}

impl Worlds {
    fn remember(&mut self, flow: &balancer_common::FlowKey, backend: IpAddr) {
        self.current.remember("v", flow, backend);
        if let Some(b) = &mut self.baseline {
            b.remember("v", flow, backend);
        }
    }
}

/// `bench_world` for this build and, with a baseline, for its program too.
fn bench_worlds(
    baseline: Option<&Baseline>,
    mode: &str,
    protocol: &str,
    v6: bool,
    n: usize,
    conn_table: u32,
) -> (Worlds, Vec<IpAddr>) {
    let (current, backends) = bench_world(None, mode, protocol, v6, n, conn_table);
    let baseline =
        baseline.map(|b| bench_world(Some(b.object), mode, protocol, v6, n, conn_table).0);
    (Worlds { current, baseline }, backends)
}

/// A one-VIP world ("v") with `n` backends, all on the ingress link (sent back out of `lo`),
/// the trivial programs loaded too; and the backends' addresses.
fn bench_world(
    object: Option<&'static [u8]>,
    mode: &str,
    protocol: &str,
    v6: bool,
    n: usize,
    conn_table: u32,
) -> (World, Vec<IpAddr>) {
    bench_world_with(object, mode, protocol, v6, n, conn_table, ("", ""))
}

/// [`bench_world`], with `extra`: more config tables after the `[balancer]` table, and more
/// keys of the VIP.
fn bench_world_with(
    object: Option<&'static [u8]>,
    mode: &str,
    protocol: &str,
    v6: bool,
    n: usize,
    conn_table: u32,
    extra: (&str, &str),
) -> (World, Vec<IpAddr>) {
    let vip = if v6 { "fd00:200::1" } else { "10.200.0.1" };
    let port = if protocol == "udp" { 53 } else { 80 };
    let backends: Vec<IpAddr> = (0..n).map(|i| bench_backend(v6, i)).collect();
    let listed: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    // NAT: room for every new connection the benchmark makes (see `nat_new_connections`).
    let nat = if mode == "nat" {
        "nat_table_size = 262144\n"
    } else {
        ""
    };
    // New flows are measured with state (the cap out of reach), unless `extra` sets a cap.
    let (extra, vip_extra) = extra;
    let mut extra = extra.to_owned();
    if !extra.contains("[flood]") {
        extra.push_str("\n[flood]\nnew_flows_per_cpu = 10000000");
    }
    let text = format!(
        "[balancer]\nhash_seed = 7\nconn_table_size = {conn_table}\n{nat}{extra}\n[[vip]]\nname = \"v\"\naddress = \"{vip}\"\nport = {port}\n\
         protocol = \"{protocol}\"\nforwarding = \"{mode}\"\nhealth = {{ kind = \"none\" }}\n{vip_extra}\nbackends = [{}]\n",
        listed.join(", ")
    );
    let reach: Vec<(IpAddr, Reach)> = backends.iter().map(|&a| (a, Reach::Local)).collect();
    let world = World::load(
        &text,
        &reach,
        WorldOptions {
            trivial_programs: true,
            object,
            ..WorldOptions::default()
        },
    );
    (world, backends)
}

/// Average nanoseconds per run of `program` on `frame`: `repeat` runs in one call, or, with
/// `single`, `calls` calls of one run each (for programs whose output would otherwise be the
/// next run's input: BPF_PROG_TEST_RUN does not restore the packet between repeats, and a
/// tunnel would encapsulate its own output).
fn run_ns(
    world: &World,
    program: &'static str,
    frame: &[u8],
    repeat: u32,
    single: Option<usize>,
) -> f64 {
    let p = world.program(program);
    let mut out = vec![0u8; frame.len() + 256];
    match single {
        None => {
            let r = p
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    data_out: Some(&mut out),
                    repeat,
                    ..TestRunOptions::new()
                })
                .unwrap();
            r.duration.as_nanos() as f64
        }
        Some(calls) => {
            let mut total = 0u128;
            for _ in 0..calls {
                let r = p
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        repeat: 1,
                        ..TestRunOptions::new()
                    })
                    .unwrap();
                total += r.duration.as_nanos();
            }
            total as f64 / calls as f64
        }
    }
}

/// Rounds of (trivial program, balancer, and the baseline's balancer) on the same frame,
/// interleaved (the two balancers taking turns at going first); the per-round differences'
/// medians and ranges, and the trivial program's median.
fn compare(worlds: &Worlds, frame: &[u8], sizes: &Sizes, single: bool) -> Value {
    let single = single.then_some(sizes.single_calls);
    let runs = |world: &World, program, repeat| run_ns(world, program, frame, repeat, single);
    let warm = |world: &World| {
        // Caches, the connection table entry of established classes.
        run_ns(world, program_names::PASS, frame, 1000, single.map(|_| 100));
        run_ns(
            world,
            program_names::BALANCER,
            frame,
            1000,
            single.map(|_| 100),
        );
    };
    warm(&worlds.current);
    if let Some(b) = &worlds.baseline {
        warm(b);
    }
    let (mut diffs, mut base_diffs, mut trivial, mut balancer) = (vec![], vec![], vec![], vec![]);
    for round in 0..sizes.rounds {
        let t = runs(&worlds.current, program_names::PASS, sizes.repeats);
        // With a baseline, the two builds take turns at going first.
        let base_first = round % 2 == 1;
        let base_run = |base: &World| runs(base, program_names::BALANCER, sizes.repeats) - t;
        let mut base = worlds
            .baseline
            .as_ref()
            .filter(|_| base_first)
            .map(base_run);
        let b = runs(&worlds.current, program_names::BALANCER, sizes.repeats);
        if !base_first {
            base = worlds.baseline.as_ref().map(base_run);
        }
        base_diffs.extend(base);
        diffs.push(b - t);
        trivial.push(t);
        balancer.push(b);
    }
    let range = |v: &[f64]| {
        let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        [min, max]
    };
    let mut out = json!({
        "above_trivial_ns": median(&mut diffs.clone()),
        "spread_ns": range(&diffs),
        "trivial_ns": median(&mut trivial),
        "balancer_ns": median(&mut balancer),
        "method": if single.is_some() { "one run per call" } else { "repeat" },
    });
    if !base_diffs.is_empty() {
        out["baseline_above_trivial_ns"] = json!(median(&mut base_diffs.clone()));
        out["baseline_spread_ns"] = json!(range(&base_diffs));
    }
    out
}

fn datapath(
    sizes: &Sizes,
    baseline: Option<&Baseline>,
    class: Option<&str>,
    commands: &mut Vec<String>,
) -> Value {
    println!(
        "\n== data plane cost per packet (BPF_PROG_TEST_RUN, {} rounds)",
        sizes.rounds
    );
    commands.push(format!(
        "BPF_PROG_TEST_RUN of the balancer and of the trivial xdp_pass on the same frame, interleaved: {} rounds of \
         repeat={} (tunnel classes: {} calls of repeat=1 per round)",
        sizes.rounds, sizes.repeats, sizes.single_calls
    ));
    if let Some(b) = baseline {
        commands.push(format!(
            "the same, with revision {}'s program in a world of the same contents, interleaved in every round",
            b.name
        ));
    }
    let mut rows = Vec::new();
    let mut measure = |label: String,
                       mode: &str,
                       n: usize,
                       full: bool,
                       worlds: &Worlds,
                       frame: &[u8],
                       single: bool| {
        if class.is_some_and(|c| !format!("{mode} {label}").contains(c)) {
            return;
        }
        let r = compare(worlds, frame, sizes, single);
        let against = match (baseline, r["baseline_above_trivial_ns"].as_f64()) {
            (Some(b), Some(base)) => format!(
                "; {}: {base:.1} ns, ratio {:.2}",
                b.name,
                r["above_trivial_ns"].as_f64().unwrap() / base
            ),
            _ => String::new(),
        };
        println!(
            "  {mode:<6} {n:>6} backends{}  {label:<34} {:>6.1} ns above trivial (range {:.1} to {:.1}; trivial {:.1} ns{against})",
            if full { ", full conn table" } else { "" },
            r["above_trivial_ns"].as_f64().unwrap(),
            r["spread_ns"][0].as_f64().unwrap(),
            r["spread_ns"][1].as_f64().unwrap(),
            r["trivial_ns"].as_f64().unwrap()
        );
        let mut r = r;
        r["class"] = json!(label);
        r["mode"] = json!(mode);
        r["backends"] = json!(n);
        r["full_conn_table"] = json!(full);
        rows.push(r);
    };
    let vip4: IpAddr = "10.200.0.1".parse().unwrap();
    let vip6: IpAddr = "fd00:200::1".parse().unwrap();
    for mode in ["dsr", "tunnel"] {
        let single = mode == "tunnel";
        for &n in sizes.backend_counts {
            let (worlds, _) = bench_worlds(baseline, mode, "tcp", false, n, 65_536);
            let syn = tcp(vip4, 40_000, 80).bytes();
            let est = tcp(vip4, 40_001, 80).ack().size(64).bytes();
            measure(
                "IPv4 TCP SYN (new flow)".into(),
                mode,
                n,
                false,
                &worlds,
                &syn,
                single,
            );
            measure(
                "IPv4 TCP established".into(),
                mode,
                n,
                false,
                &worlds,
                &est,
                single,
            );
            if mode == "dsr" && n == sizes.backend_counts[0] {
                let other = tcp("10.9.9.9".parse().unwrap(), 40_002, 80)
                    .ack()
                    .size(64)
                    .bytes();
                measure(
                    "not for a VIP (passed)".into(),
                    "any",
                    n,
                    false,
                    &worlds,
                    &other,
                    false,
                );
            }
            drop(worlds);
            let (worlds, _) = bench_worlds(baseline, mode, "udp", false, n, 65_536);
            measure(
                "IPv4 UDP".into(),
                mode,
                n,
                false,
                &worlds,
                &udp(vip4, 40_003, 53).size(64).bytes(),
                single,
            );
            drop(worlds);
            let (worlds, _) = bench_worlds(baseline, mode, "tcp", true, n, 65_536);
            measure(
                "IPv6 TCP established".into(),
                mode,
                n,
                false,
                &worlds,
                &tcp(vip6, 40_004, 80).ack().size(64).bytes(),
                single,
            );
        }
        // A full connection table: every slot taken by other flows.
        let size = 65_536u32;
        let (mut worlds, backends) = bench_worlds(baseline, mode, "tcp", false, 100, size);
        let est = tcp(vip4, 40_001, 80).ack().size(64);
        let mut flow = est.flow();
        for i in 0..size {
            flow.src[..4].copy_from_slice(&(0xc612_0000u32 + i).to_be_bytes());
            worlds.remember(&flow, backends[0]);
        }
        let est = est.bytes();
        let syn = tcp(vip4, 40_000, 80).bytes();
        measure(
            "IPv4 TCP SYN (new flow)".into(),
            mode,
            100,
            true,
            &worlds,
            &syn,
            single,
        );
        measure(
            "IPv4 TCP established".into(),
            mode,
            100,
            true,
            &worlds,
            &est,
            single,
        );
    }
    // NAT: this build only (a baseline may predate it); one packet per call, since the
    // program rewrites the packet it is given.
    if class.is_none_or(|c| "nat IPv4 TCP established / reply / SYN".contains(c)) {
        let (world, _) = bench_world(None, "nat", "tcp", false, 100, 65_536);
        let syn = tcp(vip4, 40_005, 80);
        assert_eq!(
            world.run(&syn.bytes()).verdict,
            balancer_common::xdp_action::TX,
            "the NAT connection starts"
        );
        let entry = world
            .nat_entry_anywhere(&syn.flow(), false)
            .expect("the connection's forward entry");
        let backend = address_of(&entry.dst);
        let snat = address_of(&entry.src);
        // The handshake: the backend's SYN-ACK, then the client's acknowledgement of it, which
        // moves the connection from the pending tables to the NAT tables.
        let synack = balancer_tests::datapath::packet::Pkt {
            src: backend,
            dst: snat,
            sport: 80,
            dport: u16::from_be(entry.src_port),
            l4: balancer_tests::datapath::packet::L4::TcpSynAck,
            ..syn
        };
        let synack = frame(
            world.neighbour_mac(backend),
            LB_MAC,
            None,
            &synack.ip_bytes(),
        );
        assert_eq!(world.run(&synack).verdict, balancer_common::xdp_action::TX);
        assert_eq!(
            world.run(&syn.ack().bytes()).verdict,
            balancer_common::xdp_action::TX
        );
        assert!(
            world.nat_entry(&syn.flow(), false).is_some(),
            "the connection promoted"
        );
        let reply = balancer_tests::datapath::packet::Pkt {
            src: backend,
            dst: snat,
            sport: 80,
            dport: u16::from_be(entry.src_port),
            ..syn.ack().size(64)
        };
        let reply = frame(
            world.neighbour_mac(backend),
            LB_MAC,
            None,
            &reply.ip_bytes(),
        );
        let worlds = Worlds {
            current: world,
            baseline: None,
        };
        let est = syn.ack().size(64).bytes();
        measure(
            "IPv4 TCP established".into(),
            "nat",
            100,
            false,
            &worlds,
            &est,
            true,
        );
        measure(
            "IPv4 TCP reply (backend to client)".into(),
            "nat",
            100,
            false,
            &worlds,
            &reply,
            true,
        );
        let r = nat_new_connections(&worlds.current, vip4, sizes);
        println!(
            "  nat       100 backends  IPv4 TCP SYN (new connection)       {:>6.1} ns above trivial (range {:.1} to {:.1}; trivial {:.1} ns)",
            r["above_trivial_ns"].as_f64().unwrap(),
            r["spread_ns"][0].as_f64().unwrap(),
            r["spread_ns"][1].as_f64().unwrap(),
            r["trivial_ns"].as_f64().unwrap()
        );
        rows.push(r);
    }
    json!(rows)
}

/// An IPv4 address of a NAT entry's words.
fn address_of(words: &[u32; 4]) -> IpAddr {
    IpAddr::from(words[0].to_ne_bytes())
}

/// NAT SYNs that each start a connection (a SNAT port taken, two entries written): every
/// call a frame of its own, from another client port (and another client address each
/// round), the trivial program on the same frames; per round the difference of the means.
fn nat_new_connections(world: &World, vip: IpAddr, sizes: &Sizes) -> Value {
    let calls = sizes.single_calls.min(20_000);
    let mut diffs = Vec::new();
    let mut trivial = Vec::new();
    for round in 0..sizes.rounds {
        let client: IpAddr = Ipv4Addr::new(198, 18, 1 + round as u8, 1).into();
        let frames: Vec<Vec<u8>> = (0..calls)
            .map(|i| tcp(vip, 1_024 + i as u16, 80).from(client).bytes())
            .collect();
        let (mut t, mut b) = (0.0, 0.0);
        for f in &frames {
            t += run_ns(world, program_names::PASS, f, 1, Some(1));
            b += run_ns(world, program_names::BALANCER, f, 1, Some(1));
        }
        trivial.push(t / calls as f64);
        diffs.push((b - t) / calls as f64);
    }
    let range = [
        diffs.iter().cloned().fold(f64::INFINITY, f64::min),
        diffs.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
    ];
    json!({
        "class": "IPv4 TCP SYN (new connection)",
        "mode": "nat",
        "backends": 100,
        "full_conn_table": false,
        "above_trivial_ns": median(&mut diffs),
        "spread_ns": range,
        "trivial_ns": median(&mut trivial),
        "method": format!("{calls} distinct SYNs per round, one run per call"),
    })
}

// -------------------------------------------------------------------------------------------
// 2. New flows on one CPU and on two at once

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// One round on `cpus` CPUs at once, each sending its own SYN (another source port): the
/// balancer's nanoseconds per SYN above the trivial program's, averaged over the CPUs.
fn syn_round(world: &World, cpus: usize, repeat: u32) -> f64 {
    let vip: IpAddr = "10.200.0.1".parse().unwrap();
    let start = std::sync::Barrier::new(cpus);
    let costs: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..cpus)
            .map(|cpu| {
                let start = &start;
                scope.spawn(move || {
                    pin_to(cpu);
                    let syn = tcp(vip, 41_000 + cpu as u16, 80).bytes();
                    start.wait();
                    let trivial = run_ns(world, program_names::PASS, &syn, repeat, None);
                    start.wait();
                    let total = run_ns(world, program_names::BALANCER, &syn, repeat, None);
                    total - trivial
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    costs.iter().sum::<f64>() / cpus as f64
}

/// The cost of a SYN (a new flow: VIP lookup, Maglev, connection-table insert) with one CPU
/// sending and with two CPUs sending at once (each thread pinned, on the same program and
/// maps), for the connection tables as one shared LRU (this build, and the baseline's) and as
/// an LRU per CPU; interleaved round by round.
fn new_flows(
    sizes: &Sizes,
    baseline: Option<&Baseline>,
    per_cpu: Option<&'static [u8]>,
    commands: &mut Vec<String>,
) -> Value {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu_counts: Vec<usize> = if cores >= 2 { vec![1, 2] } else { vec![1] };
    println!(
        "\n== new flows: a SYN on {} CPU(s) at once, shared LRU against an LRU per CPU ({} rounds)",
        cpu_counts
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(" and "),
        sizes.rounds
    );
    if cores < 2 {
        println!("  (one CPU on this machine: the two-CPU case is not measured)");
    }
    let mut variants: Vec<(String, World)> = vec![(
        "this build, shared LRU".into(),
        bench_world(None, "dsr", "tcp", false, 100, 65_536).0,
    )];
    if let Some(object) = per_cpu {
        variants.push((
            "this build, LRU per CPU".into(),
            bench_world(Some(object), "dsr", "tcp", false, 100, 65_536).0,
        ));
    }
    if let Some(b) = baseline {
        variants.push((
            format!("{}, shared LRU", b.name),
            bench_world(Some(b.object), "dsr", "tcp", false, 100, 65_536).0,
        ));
    }
    let repeat = sizes.repeats / 4;
    let mut costs: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    for (v, (_, world)) in variants.iter().enumerate() {
        for &cpus in &cpu_counts {
            syn_round(world, cpus, repeat / 10); // warm
            costs.insert((v, cpus), Vec::new());
        }
    }
    for round in 0..sizes.rounds {
        for i in 0..variants.len() {
            // Each variant takes its turn at going first.
            let v = (i + round) % variants.len();
            for &cpus in &cpu_counts {
                let cost = syn_round(&variants[v].1, cpus, repeat);
                costs.get_mut(&(v, cpus)).unwrap().push(cost);
            }
        }
    }
    commands.push(format!(
        "new flows: BPF_PROG_TEST_RUN of a TCP SYN (repeat={repeat}) on CPU 0, and on CPUs 0 and 1 at once \
         (one pinned thread each, its own 5-tuple), minus xdp_pass on the same CPUs, {} rounds, variants interleaved",
        sizes.rounds
    ));
    let mut rows = Vec::new();
    for (v, (name, _)) in variants.iter().enumerate() {
        for &cpus in &cpu_counts {
            let mut c = costs[&(v, cpus)].clone();
            let med = median(&mut c);
            println!("  {name:<32} {cpus} CPU(s): {med:>6.1} ns per SYN above trivial");
            rows.push(json!({ "variant": name, "cpus": cpus, "above_trivial_ns": med }));
        }
    }
    rows.extend(sync_cost(sizes, &cpu_counts, commands));
    rows.extend(defence_cost(sizes, &cpu_counts, commands));
    json!(rows)
}

/// What the defences cost a SYN, side by side, interleaved round by round: the SYN's choice
/// written to the pending table (the cap out of reach), the same VIP with a per-source limit
/// (a token bucket read and written too), and a CPU over its cap (flood mode: nothing
/// written). An established packet never reaches this code (the connection table answers
/// first; its rows above measure it).
fn defence_cost(sizes: &Sizes, cpu_counts: &[usize], commands: &mut Vec<String>) -> Vec<Value> {
    let world =
        |extra: (&str, &str)| bench_world_with(None, "dsr", "tcp", false, 100, 65_536, extra).0;
    let variants = [
        ("SYN to the pending table", world(("", ""))),
        (
            "SYN, VIP with a source limit",
            world(("", "source_limit = { rate = 10000000, ipv4_prefix = 32 }")),
        ),
        (
            "SYN over the cap (flood mode)",
            world(("[flood]\nnew_flows_per_cpu = 100", "")),
        ),
    ];
    let repeat = sizes.repeats / 4;
    let mut costs: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    for round in 0..sizes.rounds * 2 {
        for i in 0..variants.len() {
            let v = (i + round) % variants.len();
            for &cpus in cpu_counts {
                let cost = syn_round(&variants[v].1, cpus, repeat);
                costs.entry((v, cpus)).or_default().push(cost);
            }
        }
    }
    commands.push(format!(
        "new flows, defences: BPF_PROG_TEST_RUN of a TCP SYN (repeat={repeat}) to the pending table, with a \
         per-source limit, and over the per-CPU cap, {} rounds, interleaved",
        sizes.rounds * 2
    ));
    let med = |v: usize, cpus: usize| median(&mut costs[&(v, cpus)].clone());
    for &cpus in cpu_counts {
        let base = med(0, cpus);
        println!(
            "  defences, {cpus} CPU(s): SYN to the pending table {base:.1} ns above trivial; with a source limit \
             {:.1} ns ({:+.1}); over the cap {:.1} ns ({:+.1})",
            med(1, cpus),
            med(1, cpus) - base,
            med(2, cpus),
            med(2, cpus) - base
        );
    }
    (0..variants.len())
        .flat_map(|v| cpu_counts.iter().map(move |&cpus| (v, cpus)))
        .map(|(v, cpus)| json!({ "variant": variants[v].0, "cpus": cpus, "above_trivial_ns": med(v, cpus) }))
        .collect()
}

/// SYNs per call in the sync comparison: the two CPUs' decisions of one call fit the ring
/// (`SYNC_RING_BYTES`: 18,724 records), which is drained between calls as the daemon drains
/// it, so that every SYN measured writes its record.
const SYNC_SYNS_PER_CALL: u32 = 8_000;

/// What the sync costs a new flow: a SYN of a VIP that syncs (the decision written to the
/// ring) against one of the same VIP without `[sync]`, interleaved round by round. (An
/// established packet never reaches that code: the connection table answers first.)
fn sync_cost(sizes: &Sizes, cpu_counts: &[usize], commands: &mut Vec<String>) -> Vec<Value> {
    let sync =
        "[sync]\nlisten = \"10.0.0.2:7946\"\npeers = [\"10.0.0.3:7946\"]\nkey_file = \"/k\"\n";
    let mut variants = [
        (
            "this build, VIP without sync",
            bench_world_with(None, "dsr", "tcp", false, 100, 65_536, ("", "")).0,
        ),
        (
            "this build, VIP that syncs",
            bench_world_with(None, "dsr", "tcp", false, 100, 65_536, (sync, "")).0,
        ),
    ];
    let repeat = |cpus: usize| SYNC_SYNS_PER_CALL / cpus as u32;
    let rounds = sizes.rounds * 4;
    let mut costs: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    let mut written = 0;
    for round in 0..rounds {
        for i in 0..variants.len() {
            let v = (i + round) % variants.len();
            for &cpus in cpu_counts {
                written += variants[v].1.sync_events().len();
                let cost = syn_round(&variants[v].1, cpus, repeat(cpus));
                costs.entry((v, cpus)).or_default().push(cost);
            }
        }
    }
    written += variants[1].1.sync_events().len();
    assert!(
        variants[0].1.sync_events().is_empty(),
        "a VIP without sync wrote decisions"
    );
    commands.push(format!(
        "new flows, sync: BPF_PROG_TEST_RUN of a TCP SYN ({SYNC_SYNS_PER_CALL} per call over the CPUs) of a VIP \
         with and without VIP_F_SYNC, the ring drained between calls ({written} decisions read), {rounds} rounds, interleaved"
    ));
    let med = |v: usize, cpus: usize| median(&mut costs[&(v, cpus)].clone());
    for &cpus in cpu_counts {
        let (plain, syncing) = (med(0, cpus), med(1, cpus));
        println!(
            "  {:<32} {cpus} CPU(s): {syncing:>6.1} ns per SYN above trivial, without sync {plain:.1} ns: \
             the decision costs {:.1} ns",
            variants[1].0,
            syncing - plain
        );
    }
    // Variant by variant, as the report's table reads them.
    (0..variants.len())
        .flat_map(|v| cpu_counts.iter().map(move |&cpus| (v, cpus)))
        .map(|(v, cpus)| json!({ "variant": variants[v].0, "cpus": cpus, "above_trivial_ns": med(v, cpus) }))
        .collect()
}

// -------------------------------------------------------------------------------------------
// 3. Control plane

fn control_plane(sizes: &Sizes, baseline: Option<&Baseline>, commands: &mut Vec<String>) -> Value {
    println!("\n== control plane");
    let mut maglev_rows = Vec::new();
    for n in [10u32, 100, 1000] {
        let backends: Vec<(IpAddr, u32)> = (0..n)
            .map(|i| (IpAddr::V4(Ipv4Addr::from(0x0a00_0001 + i)), 1 + i % 3))
            .collect();
        let backends = MaglevBackends::new(&backends);
        let mut times = Vec::new();
        for _ in 0..sizes.maglev_runs {
            let t = Instant::now();
            let slots = backends.build_table(65_537, 7);
            times.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(slots, 65_537);
        }
        let worst = times.iter().cloned().fold(0.0, f64::max);
        let med = median(&mut times);
        println!(
            "  Maglev table, {n:>4} backends, 65537 slots: median {med:.2} ms, worst {worst:.2} ms"
        );
        maglev_rows.push(json!({ "backends": n, "median_ms": med, "worst_ms": worst }));
    }
    commands.push(format!(
        "maglev::build of 65537 slots for 10, 100, 1000 backends, {} runs each",
        sizes.maglev_runs
    ));

    let mut memory_rows = Vec::new();
    for &vips in sizes.vip_counts {
        let mut text = format!("[balancer]\nconn_table_size = {DEFAULT_CONN_TABLE_SIZE}\n");
        let mut reach = Vec::new();
        for v in 0..vips {
            text.push_str(&format!(
                "[[vip]]\nname = \"v{v}\"\naddress = \"10.201.{}.{}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"dsr\"\n\
                 health = {{ kind = \"none\" }}\nbackends = [{{ address = \"10.0.{}.1\" }}, {{ address = \"10.0.{}.2\" }}]\n",
                v / 256 + 1,
                v % 256,
                v % 256,
                v % 256
            ));
            for host in [1, 2] {
                let backend = Ipv4Addr::new(10, 0, (v % 256) as u8, host);
                reach.push((IpAddr::V4(backend), Reach::Local));
            }
        }
        let world = World::load(&text, &reach, WorldOptions::default());
        let memory = world.map_memory();
        let total: u64 = memory.iter().map(|(_, b)| b).sum();
        let tables = memory
            .iter()
            .find(|(n, _)| n == "maglev tables")
            .map(|(_, b)| *b)
            .unwrap_or(0);
        let conn: u64 = memory
            .iter()
            .filter(|(n, _)| map_names::CONN_TABLES.contains(&n.as_str()))
            .map(|(_, b)| *b)
            .sum();
        println!(
            "  maps for {vips:>3} VIPs: {:.1} MiB in all ({:.1} MiB Maglev tables, {:.1} MiB connection tables of {} flows per family)",
            total as f64 / 1048576.0,
            tables as f64 / 1048576.0,
            conn as f64 / 1048576.0,
            DEFAULT_CONN_TABLE_SIZE
        );
        memory_rows.push(json!({
            "vips": vips,
            "total_bytes": total,
            "maglev_tables_bytes": tables,
            "conn_table_bytes": conn,
            "maps": memory.iter().map(|(n, b)| json!({"map": n, "bytes": b})).collect::<Vec<_>>(),
        }));
    }
    commands.push(format!(
        "kernel memory (fdinfo memlock) of every map after loading a config of {:?} VIPs",
        sizes.vip_counts
    ));

    let reload = reload_latency(sizes, baseline, commands);
    json!({ "maglev": maglev_rows, "memory": memory_rows, "reload": reload })
}

/// The real daemon in the demo's topology: a config change written (atomically, as editors
/// do) until the status API shows its generation; and the daemon's own apply time. With a
/// baseline, its binary and this one take turns (two rounds each), in the same topology.
fn reload_latency(sizes: &Sizes, baseline: Option<&Baseline>, commands: &mut Vec<String>) -> Value {
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-bench-", std::process::id());
    let topology = DsrTopology::create(&prefix, 3);
    let scratch = Scratch::new("lbt-", "bench-reload");
    let turns: Vec<Option<&Baseline>> = match baseline {
        None => vec![None],
        Some(b) => vec![Some(b), None, Some(b), None],
    };
    let per_turn = sizes.reloads / turns.len().div_ceil(2).max(1);
    let (mut current, mut base) = (Timings::default(), Timings::default());
    for turn in turns {
        let binary = turn.map(|b| b.binary.as_path());
        let timings = reload_turn(&topology, &scratch, binary, per_turn);
        match turn {
            Some(_) => base.extend(timings),
            None => current.extend(timings),
        }
    }
    let (mv, wv, ma, wa) = current.summary();
    println!(
        "  config change -> maps updated, {} changes: median {mv:.1} ms, worst {wv:.1} ms (of which the daemon's apply: median {ma:.1} ms, worst {wa:.1} ms)",
        current.visible.len()
    );
    commands.push(format!(
        "balancer run in the demo topology; {} weight changes written by rename; time until GET /api/v1/status shows the new \
         generation (polled every 1 ms), and the daemon's own reloads.last_apply_ms",
        sizes.reloads
    ));
    let mut out = json!({ "changes": current.visible.len(), "median_ms": mv, "worst_ms": wv, "apply_median_ms": ma, "apply_worst_ms": wa, "debounce_ms": 20 });
    if let Some(b) = baseline {
        let (bv, bwv, ba, bwa) = base.summary();
        println!(
            "  the same with {}'s daemon ({} changes, turns interleaved): median {bv:.1} ms, worst {bwv:.1} ms (apply: median {ba:.1} ms, worst {bwa:.1} ms); ratios this/baseline: {:.2} visible, {:.2} apply",
            b.name,
            base.visible.len(),
            mv / bv,
            ma / ba
        );
        commands.push(format!(
            "the same with revision {}'s balancer binary, its turns and this build's alternating (2 each)",
            b.name
        ));
        out["baseline"] = json!({ "changes": base.visible.len(), "median_ms": bv, "worst_ms": bwv, "apply_median_ms": ba, "apply_worst_ms": bwa });
    }
    out
}

/// Reload timings, in milliseconds: written to visible in the status, and the daemon's apply.
#[derive(Default)]
struct Timings {
    visible: Vec<f64>,
    applied: Vec<f64>,
}

impl Timings {
    fn extend(&mut self, other: Timings) {
        self.visible.extend(other.visible);
        self.applied.extend(other.applied);
    }

    /// Median and worst of each.
    fn summary(&self) -> (f64, f64, f64, f64) {
        let worst = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        (
            median(&mut self.visible.clone()),
            worst(&self.visible),
            median(&mut self.applied.clone()),
            worst(&self.applied),
        )
    }
}

/// One daemon (this build's, or `binary`), `reloads` config changes, stopped.
fn reload_turn(
    topology: &DsrTopology,
    scratch: &Scratch,
    binary: Option<&std::path::Path>,
    reloads: usize,
) -> Timings {
    let config = |w: u32| {
        format!(
            "[balancer]\ninterface = \"eth0\"\nmetrics_listen = \"127.0.0.1:9100\"\n[[vip]]\nname = \"web\"\naddress = \"{VIP_ADDR}\"\n\
             port = 80\nprotocol = \"tcp\"\nforwarding = \"dsr\"\nhealth = {{ kind = \"none\" }}\nbackends = [{{ address = \"{}\", weight = {w} }}, \
             {{ address = \"{}\" }}, {{ address = \"{}\" }}]\n",
            backend_addr(0),
            backend_addr(1),
            backend_addr(2)
        )
    };
    let path = scratch.write_atomically("config.toml", &config(1));
    let mut balancer = match binary {
        None => BalancerProcess::run(&topology.balancer, &path, scratch, &[], "balancer.log"),
        Some(binary) => {
            let pin_dir = scratch.pin_dir_arg();
            let args = [
                "run",
                "--config",
                path.to_str().unwrap(),
                "--pin-dir",
                &pin_dir,
            ];
            let log = scratch.path("baseline.log");
            BalancerProcess::start_binary(&topology.balancer, binary, &[], &args, &log)
        }
    };
    let api: SocketAddr = "127.0.0.1:9100".parse().unwrap();
    let status = balancer.wait_ready(&topology.balancer, api, Duration::from_secs(30));
    let first_generation = status["config_generation"].as_u64().unwrap();
    let mut timings = Timings::default();
    for i in 0..reloads {
        let generation = first_generation + i as u64;
        let written = Instant::now();
        scratch.write_atomically("config.toml", &config(2 + i as u32 % 5));
        loop {
            let s = get_json(&topology.balancer, api, "/api/v1/status").unwrap();
            if s["config_generation"].as_u64() == Some(generation + 1) {
                timings.visible.push(written.elapsed().as_secs_f64() * 1e3);
                timings
                    .applied
                    .push(s["reloads"]["last_apply_ms"].as_f64().unwrap());
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(10),
                "reload {i} not applied:\n{}",
                balancer.log()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(balancer.stop().success());
    timings
}

// -------------------------------------------------------------------------------------------
// 2. End to end in network namespaces

fn end_to_end(sizes: &Sizes, commands: &mut Vec<String>) -> Value {
    println!("\n== end to end in network namespaces");
    let pps = packets_per_second(sizes, commands);
    let tcp = tcp_comparison(sizes, commands);
    let nat = nat_comparison(sizes, commands);
    json!({ "packets_per_second": pps, "tcp": tcp, "nat": nat })
}

/// The object with no VIP, for its trivial programs (a generator, a sink, a reflector).
fn trivial_programs() -> World {
    World::load(
        "[balancer]\nconn_table_size = 1024\n",
        &[],
        WorldOptions {
            trivial_programs: true,
            ..WorldOptions::default()
        },
    )
}

/// A client and a balancer joined by one veth pair. The client generates UDP packets to a
/// VIP with BPF_PROG_TEST_RUN's live frames (an XDP_TX program transmitting the frame from
/// the client's interface, like xdp-trafficgen, whose 1.3.1 release does not load on this
/// kernel); the balancer forwards them back (its backend is the client); the client drops
/// them in XDP. The same with the trivial reflector in the balancer's place.
fn packets_per_second(sizes: &Sizes, commands: &mut Vec<String>) -> Value {
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-pps-", std::process::id());
    let client = Netns::create(&format!("{prefix}client"));
    let lb = Netns::create(&format!("{prefix}lb"));
    client.veth("eth0", &lb, "eth0");
    client.ip(&["addr", "add", "10.96.0.1/24", "dev", "eth0"]);
    lb.ip(&["addr", "add", "10.96.0.2/24", "dev", "eth0"]);
    client.ip(&["link", "set", "eth0", "up"]);
    lb.ip(&["link", "set", "eth0", "up"]);
    let mac = |ns: &Netns| -> [u8; 6] {
        let text =
            String::from_utf8_lossy(&ns.exec("cat", &["/sys/class/net/eth0/address"]).stdout)
                .trim()
                .to_owned();
        let bytes: Vec<u8> = text
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        bytes.try_into().unwrap()
    };
    let (client_mac, lb_mac) = (mac(&client), mac(&lb));
    let ifindex = |ns: &Netns| -> u32 {
        String::from_utf8_lossy(&ns.exec("cat", &["/sys/class/net/eth0/ifindex"]).stdout)
            .trim()
            .parse()
            .unwrap()
    };
    let (client_if, lb_if) = (ifindex(&client), ifindex(&lb));

    // The sink and the generator on the client: a thread in the client's namespace owns them
    // (live frames need the ingress interface to be found in the caller's namespace).
    let vip = IpAddr::V4(Ipv4Addr::new(10, 96, 100, 1));
    let client_addr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));
    let datagram = udp(vip, 40_000, 53).from(client_addr).size(18);
    let frame = frame(client_mac, lb_mac, None, &datagram.ip_bytes());
    let (requests, work) = std::sync::mpsc::channel::<u32>();
    let (answers, results_rx) = std::sync::mpsc::channel::<f64>();
    let generator = client.spawn(move || {
        let mut programs = trivial_programs();
        programs.attach(program_names::DROP, "eth0");
        // struct xdp_md: data 0, data_end the frame's length (the kernel insists), ingress.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&client_if.to_ne_bytes());
        for packets in work {
            let started = Instant::now();
            programs
                .program(program_names::TX)
                .test_run(TestRunOptions {
                    data_in: Some(&frame),
                    ctx_in: Some(&ctx),
                    repeat: packets,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..TestRunOptions::new()
                })
                .unwrap();
            answers.send(started.elapsed().as_secs_f64()).unwrap();
        }
    });
    let generate = |packets: u32| -> f64 {
        requests.send(packets).unwrap();
        results_rx.recv().unwrap()
    };

    let xdp_tx = |ns: &Netns| -> u64 {
        let out = ns.exec("ethtool", &["-S", "eth0"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.trim_start().starts_with("rx_queue_") && l.contains("_xdp_tx:"))
            .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
            .sum()
    };
    // The balancer's only backend is the client, on the link the packets come in on.
    let config = "[balancer]\nconn_table_size = 65536\n[[vip]]\nname = \"udp\"\naddress = \"10.96.100.1\"\nport = 53\n\
                  protocol = \"udp\"\nforwarding = \"dsr\"\nhealth = { kind = \"none\" }\nbackends = [{ address = \"10.96.0.1\" }]\n";
    let reach = [(client_addr, Reach::Local)];

    let mut results: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..sizes.e2e_rounds {
        for which in ["balancer", "reflector"] {
            let running = lb.run(move || {
                if which == "balancer" {
                    let mut world = World::load(
                        config,
                        &reach,
                        WorldOptions {
                            ingress_ifindex: lb_if,
                            trivial_programs: true,
                            ..WorldOptions::default()
                        },
                    );
                    world.attach(program_names::BALANCER, "eth0");
                    world
                } else {
                    let mut programs = trivial_programs();
                    programs.attach(program_names::REFLECT, "eth0");
                    programs
                }
            });
            let before = xdp_tx(&lb);
            let seconds = generate(sizes.generator_packets);
            std::thread::sleep(Duration::from_millis(100));
            let forwarded = xdp_tx(&lb) - before;
            results
                .entry(which)
                .or_default()
                .push(forwarded as f64 / seconds);
            drop(running);
        }
    }
    drop(requests);
    generator.join().unwrap();
    let mut b = results.remove("balancer").unwrap();
    let mut r = results.remove("reflector").unwrap();
    let (b, r) = (median(&mut b), median(&mut r));
    println!(
        "  packets per second forwarded: balancer {:.0}, trivial reflector {:.0} (ratio {:.2})",
        b,
        r,
        b / r
    );
    commands.push(format!(
        "{} UDP packets per run from a live-frames BPF_PROG_TEST_RUN generator (XDP_TX, batch 64) into a veth pair; \
         forwarded packets counted by the balancer side's xdp_tx statistics; {} alternating rounds of balancer and \
         reflector (xdp_reflect)",
        sizes.generator_packets, sizes.e2e_rounds
    ));
    json!({ "balancer_pps": b, "reflector_pps": r, "ratio": b / r })
}

/// TCP connections per second and bulk throughput from the client: through the balancer
/// (the real daemon, direct server return), directly to one backend, and through HAProxy in
/// TCP mode on the balancer's namespace, on the same topology and servers.
fn tcp_comparison(sizes: &Sizes, commands: &mut Vec<String>) -> Value {
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-tcp-", std::process::id());
    let topology = DsrTopology::create(&prefix, 3);
    let _servers = topology.start_http_servers(|i| format!("be{}", i + 1));
    topology.pin_arp();
    let scratch = Scratch::new("lbt-", "bench-tcp");
    let backends = format!(
        "{{ address = \"{}\" }}, {{ address = \"{}\" }}, {{ address = \"{}\" }}",
        backend_addr(0),
        backend_addr(1),
        backend_addr(2)
    );
    let text = format!(
        "[balancer]\ninterface = \"eth0\"\nmetrics_listen = \"127.0.0.1:9100\"\n\
         [[vip]]\nname = \"web\"\naddress = \"{VIP_ADDR}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"dsr\"\nhealth = {{ kind = \"none\" }}\nbackends = [{backends}]\n\
         [[vip]]\nname = \"bulk\"\naddress = \"{VIP_ADDR}\"\nport = 5201\nprotocol = \"tcp\"\nforwarding = \"dsr\"\nhealth = {{ kind = \"none\" }}\nbackends = [{{ address = \"{}\" }}]\n",
        backend_addr(0)
    );
    let path = scratch.write_atomically("config.toml", &text);
    let mut balancer =
        BalancerProcess::run(&topology.balancer, &path, &scratch, &[], "balancer.log");
    balancer.wait_ready(
        &topology.balancer,
        "127.0.0.1:9100".parse().unwrap(),
        Duration::from_secs(30),
    );

    let haproxy_cfg = scratch.path("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global\n  maxconn 4096\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend web\n  bind {BALANCER_ADDR}:8080\n  default_backend web\nbackend web\n  balance roundrobin\n  server be1 {}:80\n  server be2 {}:80\n  server be3 {}:80\n\
             frontend bulk\n  bind {BALANCER_ADDR}:5202\n  default_backend bulk\nbackend bulk\n  server be1 {}:5201\n",
            backend_addr(0),
            backend_addr(1),
            backend_addr(2),
            backend_addr(0)
        ),
    )
    .unwrap();
    let mut haproxy = Supervised(
        topology
            .balancer
            .command("haproxy")
            .args(["-f", haproxy_cfg.to_str().unwrap(), "-db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy"),
    );
    let mut iperf = Supervised(
        topology.backends[0]
            .command("iperf3")
            .args(["-s", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 -s"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = (&mut haproxy, &mut iperf);

    let targets: [(&str, SocketAddr, SocketAddr); 3] = [
        (
            "balancer",
            SocketAddr::new(VIP_ADDR.into(), 80),
            SocketAddr::new(VIP_ADDR.into(), 5201),
        ),
        (
            "direct",
            SocketAddr::new(backend_addr(0).into(), 80),
            SocketAddr::new(backend_addr(0).into(), 5201),
        ),
        (
            "haproxy",
            SocketAddr::new(BALANCER_ADDR.into(), 8080),
            SocketAddr::new(BALANCER_ADDR.into(), 5202),
        ),
    ];
    let mut cps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut gbps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..sizes.e2e_rounds {
        for (name, http, bulk) in targets {
            cps.entry(name).or_default().push(connections_per_second(
                &topology.client,
                http,
                sizes.e2e_seconds,
            ));
            gbps.entry(name).or_default().push(throughput_gbps(
                &topology.client,
                bulk,
                sizes.e2e_seconds,
            ));
        }
    }
    assert!(balancer.stop().success(), "{}", balancer.log());
    let mut out = serde_json::Map::new();
    for (name, _, _) in targets {
        let c = median(cps.get_mut(name).unwrap());
        let g = median(gbps.get_mut(name).unwrap());
        println!("  {name:<9} {c:>8.0} connections/s   {g:>6.2} Gbit/s bulk");
        out.insert(
            name.to_owned(),
            json!({ "connections_per_second": c, "bulk_gbps": g }),
        );
    }
    let ratio =
        |a: &str, b: &str, k: &str| out[a][k].as_f64().unwrap() / out[b][k].as_f64().unwrap();
    let ratios = json!({
        "cps_balancer_vs_haproxy": ratio("balancer", "haproxy", "connections_per_second"),
        "cps_balancer_vs_direct": ratio("balancer", "direct", "connections_per_second"),
        "bulk_balancer_vs_haproxy": ratio("balancer", "haproxy", "bulk_gbps"),
        "bulk_balancer_vs_direct": ratio("balancer", "direct", "bulk_gbps"),
    });
    println!("  ratios: {ratios}");
    commands.push(format!(
        "connections/s: {CLIENT_THREADS} client threads making HTTP/1.1 GETs on new connections for {} s, against the VIP \
         (balancer run, direct server return), backend 1 directly, and haproxy 2.6 (mode tcp, nbthread 2, roundrobin) in \
         the balancer's namespace; bulk: iperf3 -c TARGET -t {} -J to iperf3 -s on backend 1; {} rounds",
        sizes.e2e_seconds, sizes.e2e_seconds, sizes.e2e_rounds
    ));
    out.insert("ratios".into(), ratios);
    Value::Object(out)
}

/// TCP connections per second through full NAT (the balancer in front of unmodified backends
/// on port 8080), against the client reaching a backend directly and against HAProxy (mode
/// tcp) in the balancer's namespace, in the NAT topology.
fn nat_comparison(sizes: &Sizes, commands: &mut Vec<String>) -> Value {
    use balancer_tests::topology::{
        nat_backend_addr, NatTopology, NAT_BACKEND_PORT, NAT_BALANCER_ADDR, NAT_VIP_ADDR,
    };
    remove_stale("lbt-");
    let prefix = format!("lbt-{}-nattcp-", std::process::id());
    let topology = NatTopology::create(&prefix, 3);
    let _servers = topology.start_http_servers(|i| format!("be{}", i + 1));
    // Direct: the client and the backends reach each other on the segment (a route each).
    topology
        .client
        .ip(&["route", "add", "10.95.0.0/24", "dev", "eth0"]);
    for b in &topology.backends {
        b.ip(&["route", "add", "10.96.0.0/24", "dev", "eth0"]);
    }
    // Sixteen SNAT addresses on the balancer (10.95.0.16/28): each port waits out the
    // closing timeout and its quarantine (70 s) after its connection, and a port reused
    // sooner would meet the backend's TIME_WAIT, which costs the new connection a SYN
    // retransmission (a second). Sixteen addresses give three backends 1.5 million ports.
    for i in 16..32 {
        topology
            .balancer
            .ip(&["addr", "add", &format!("10.95.0.{i}/24"), "dev", "eth0"]);
    }
    let scratch = Scratch::new("lbt-", "bench-nat");
    let backends: Vec<String> = (0..3)
        .map(|i| format!("{{ address = \"{}\" }}", nat_backend_addr(i)))
        .collect();
    // Every connection keeps its two entries for 70 s after it closes (its port's quarantine):
    // thousands of connections a second need hundreds of thousands of entries.
    let text = format!(
        "[balancer]\ninterface = \"eth0\"\nmetrics_listen = \"127.0.0.1:9100\"\nnat_table_size = 262144\n\
         [[vip]]\nname = \"web\"\naddress = \"{NAT_VIP_ADDR}\"\nport = 80\nprotocol = \"tcp\"\nforwarding = \"nat\"\n\
         snat = \"10.95.0.16/28\"\nbackend_port = {NAT_BACKEND_PORT}\nhealth = {{ kind = \"none\" }}\nbackends = [{}]\n",
        backends.join(", ")
    );
    let path = scratch.write_atomically("config.toml", &text);
    let mut balancer =
        BalancerProcess::run(&topology.balancer, &path, &scratch, &[], "balancer.log");
    balancer.wait_ready(
        &topology.balancer,
        "127.0.0.1:9100".parse().unwrap(),
        Duration::from_secs(30),
    );
    let haproxy_cfg = scratch.path("haproxy.cfg");
    let servers: String = (0..3)
        .map(|i| {
            format!(
                "  server be{i} {}:{NAT_BACKEND_PORT}\n",
                nat_backend_addr(i)
            )
        })
        .collect();
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global\n  maxconn 4096\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend web\n  bind {NAT_BALANCER_ADDR}:8080\n  default_backend web\nbackend web\n  balance roundrobin\n{servers}"
        ),
    )
    .unwrap();
    let _haproxy = Supervised(
        topology
            .balancer
            .command("haproxy")
            .args(["-f", haproxy_cfg.to_str().unwrap(), "-db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let targets: [(&str, SocketAddr); 3] = [
        ("balancer (NAT)", SocketAddr::new(NAT_VIP_ADDR.into(), 80)),
        (
            "direct",
            SocketAddr::new(nat_backend_addr(0).into(), NAT_BACKEND_PORT),
        ),
        ("haproxy", SocketAddr::new(NAT_BALANCER_ADDR.into(), 8080)),
    ];
    let mut cps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut failed: BTreeMap<&str, u64> = BTreeMap::new();
    for _ in 0..sizes.e2e_rounds {
        for (name, to) in targets {
            let (c, f) = connections_counted(&topology.client, to, sizes.e2e_seconds);
            cps.entry(name).or_default().push(c);
            *failed.entry(name).or_default() += f;
        }
    }
    let status = get_json(
        &topology.balancer,
        "127.0.0.1:9100".parse().unwrap(),
        "/api/v1/status",
    )
    .unwrap_or_default();
    assert!(balancer.stop().success(), "{}", balancer.log());
    let mut out = serde_json::Map::new();
    for (name, _) in targets {
        let c = median(cps.get_mut(name).unwrap());
        println!(
            "  {name:<15} {c:>8.0} connections/s, {} failed",
            failed[name]
        );
        out.insert(
            name.to_owned(),
            json!({ "connections_per_second": c, "failed": failed[name] }),
        );
    }
    let cps_of = |name: &str| out[name]["connections_per_second"].as_f64().unwrap();
    let ratios = json!({
        "cps_nat_vs_haproxy": cps_of("balancer (NAT)") / cps_of("haproxy"),
        "cps_nat_vs_direct": cps_of("balancer (NAT)") / cps_of("direct"),
    });
    println!(
        "  ratios: {ratios}; NAT allocation failures: {}",
        status["nat"]["events"]["no_port_exhausted"]
    );
    commands.push(format!(
        "NAT connections/s: {CLIENT_THREADS} client threads making HTTP/1.1 GETs on new connections for {} s, against the \
         NAT VIP (full NAT to 3 backends on port 8080 from 16 SNAT addresses, default timeouts), backend 1 directly, and haproxy (mode \
         tcp, nbthread 2, roundrobin) in the balancer's namespace; {} rounds",
        sizes.e2e_seconds, sizes.e2e_rounds
    ));
    out.insert("ratios".into(), ratios);
    out.insert(
        "allocation_failures".into(),
        status["nat"]["events"]["no_port_exhausted"].clone(),
    );
    Value::Object(out)
}

const CLIENT_THREADS: usize = 4;

/// Kills a child process when dropped.
struct Supervised(Child);

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connections_per_second(client: &Netns, to: SocketAddr, seconds: u64) -> f64 {
    let (cps, failed) = connections_counted(client, to, seconds);
    assert_eq!(failed, 0, "connections to {to} failed");
    cps
}

/// Connections per second, and how many failed (the NAT comparison reports them rather
/// than stopping: a refused or broken connection is a figure of the run there).
fn connections_counted(client: &Netns, to: SocketAddr, seconds: u64) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            let (done, failed, stop) = (done.clone(), failed.clone(), stop.clone());
            client.spawn(move || {
                let mut id = (t as u64) << 40;
                while !stop.load(Ordering::Relaxed) {
                    match get(to, 0, id) {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    id += 1;
                }
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for t in threads {
        t.join().unwrap();
    }
    (
        done.load(Ordering::Relaxed) as f64 / elapsed,
        failed.load(Ordering::Relaxed),
    )
}

fn throughput_gbps(client: &Netns, to: SocketAddr, seconds: u64) -> f64 {
    let out = client
        .command("iperf3")
        .args([
            "-c",
            &to.ip().to_string(),
            "-p",
            &to.port().to_string(),
            "-t",
            &seconds.to_string(),
            "-J",
        ])
        .output()
        .expect("iperf3 -c");
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("iperf3 said: {}", String::from_utf8_lossy(&out.stdout)));
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3: {json}"))
        / 1e9
}

// -------------------------------------------------------------------------------------------
// Markdown

fn markdown(r: &Value) -> String {
    let mut md = String::new();
    let m = &r["machine"];
    md.push_str(&format!(
        "Run of {} ({}), {} s. Machine: {}, {} cores, Linux {}.\n\n",
        r["date"].as_str().unwrap_or("?"),
        if r["quick"] == true {
            "quick smoke run: figures not meaningful"
        } else {
            "full run"
        },
        r["seconds"],
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["kernel"].as_str().unwrap_or("?")
    ));
    if !r["datapath"].is_null() {
        datapath_markdown(r, &mut md);
    }
    if let Some(rows) = r["new_flows"].as_array() {
        new_flows_markdown(rows, &mut md);
    }
    if !r["end_to_end"].is_null() {
        end_to_end_markdown(&r["end_to_end"], &mut md);
    }
    if !r["control_plane"].is_null() {
        control_markdown(r, &mut md);
    }
    md.push_str("\nCommands:\n\n");
    for c in r["commands"].as_array().unwrap() {
        md.push_str(&format!("- {}\n", c.as_str().unwrap()));
    }
    md
}

/// The data-plane section of the report.
fn datapath_markdown(r: &Value, md: &mut String) {
    md.push_str(
        "### Data plane: cost per packet above the trivial XDP program (BPF_PROG_TEST_RUN)\n\n",
    );
    if let Some(name) = r["baseline"].as_str() {
        md.push_str(&format!(
            "Beside revision {name} (its program in a world of the same contents, interleaved in every round):\n\n\
             | mode | backends | conn table | packet | this build | {name} | ratio |\n|---|---:|---|---|---:|---:|---:|\n"
        ));
        // Rows the baseline has no counterpart of (NAT) are in the table below only.
        for row in r["datapath"].as_array().unwrap() {
            let (this, Some(base)) = (
                row["above_trivial_ns"].as_f64().unwrap(),
                row["baseline_above_trivial_ns"].as_f64(),
            ) else {
                continue;
            };
            md.push_str(&format!(
                "| {} | {this:.1} ns | {base:.1} ns | {:.2} |\n",
                row_label(row),
                this / base
            ));
        }
        md.push('\n');
    }
    md.push_str("| mode | backends | conn table | packet | above trivial (median) | range over rounds | trivial | method |\n|---|---:|---|---|---:|---|---:|---|\n");
    for row in r["datapath"].as_array().unwrap() {
        md.push_str(&format!(
            "| {} | {:.1} ns | {:.1} to {:.1} ns | {:.1} ns | {} |\n",
            row_label(row),
            row["above_trivial_ns"].as_f64().unwrap(),
            row["spread_ns"][0].as_f64().unwrap(),
            row["spread_ns"][1].as_f64().unwrap(),
            row["trivial_ns"].as_f64().unwrap(),
            row["method"].as_str().unwrap()
        ));
    }
}

/// The new-flow section of the report: a row per variant, a column per CPU count.
fn new_flows_markdown(rows: &[Value], md: &mut String) {
    md.push_str(
        "\n### New flows: a SYN on one CPU and on two at once (ns above the trivial program)\n\n",
    );
    md.push_str("| variant | 1 CPU | 2 CPUs at once |\n|---|---:|---:|\n");
    let mut variants: Vec<&str> = rows.iter().filter_map(|r| r["variant"].as_str()).collect();
    variants.dedup();
    for variant in variants {
        let cell = |cpus: u64| {
            rows.iter()
                .find(|r| r["variant"] == variant && r["cpus"] == cpus)
                .and_then(|r| r["above_trivial_ns"].as_f64())
                .map_or("-".to_owned(), |ns| format!("{ns:.1} ns"))
        };
        md.push_str(&format!("| {variant} | {} | {} |\n", cell(1), cell(2)));
    }
}

/// The end-to-end section of the report.
fn end_to_end_markdown(e: &Value, md: &mut String) {
    md.push_str("\n### End to end (network namespaces)\n\n");
    md.push_str(&format!(
        "Packets per second forwarded: balancer {:.0}, trivial reflector {:.0}: **{:.0}%** of the reflector.\n\n",
        e["packets_per_second"]["balancer_pps"].as_f64().unwrap(),
        e["packets_per_second"]["reflector_pps"].as_f64().unwrap(),
        e["packets_per_second"]["ratio"].as_f64().unwrap() * 100.0
    ));
    md.push_str("| path | TCP connections/s | bulk throughput |\n|---|---:|---:|\n");
    for name in ["balancer", "direct", "haproxy"] {
        md.push_str(&format!(
            "| {name} | {:.0} | {:.2} Gbit/s |\n",
            e["tcp"][name]["connections_per_second"].as_f64().unwrap(),
            e["tcp"][name]["bulk_gbps"].as_f64().unwrap()
        ));
    }
    let ra = &e["tcp"]["ratios"];
    md.push_str(&format!(
        "\nConnections/s: balancer **{:.2}x** HAProxy, **{:.0}%** of direct. Bulk: balancer {:.2}x HAProxy, {:.0}% of direct.\n",
        ra["cps_balancer_vs_haproxy"].as_f64().unwrap(),
        ra["cps_balancer_vs_direct"].as_f64().unwrap() * 100.0,
        ra["bulk_balancer_vs_haproxy"].as_f64().unwrap(),
        ra["bulk_balancer_vs_direct"].as_f64().unwrap() * 100.0
    ));
    if let Some(nat) = e["nat"].as_object() {
        md.push_str(
            "\n| path (NAT topology, backends on 8080) | TCP connections/s |\n|---|---:|\n",
        );
        for name in ["balancer (NAT)", "direct", "haproxy"] {
            md.push_str(&format!(
                "| {name} | {:.0} ({} failed) |\n",
                nat[name]["connections_per_second"].as_f64().unwrap_or(0.0),
                nat[name]["failed"].as_u64().unwrap_or(0)
            ));
        }
        md.push_str(&format!(
            "\nThrough full NAT: **{:.2}x** HAProxy, **{:.0}%** of direct.\n",
            nat["ratios"]["cps_nat_vs_haproxy"].as_f64().unwrap_or(0.0),
            nat["ratios"]["cps_nat_vs_direct"].as_f64().unwrap_or(0.0) * 100.0
        ));
    }
}

/// The control-plane section of the report.
fn control_markdown(r: &Value, md: &mut String) {
    let c = &r["control_plane"];
    md.push_str("\n### Control plane\n");
    if let Some(name) = r["baseline"].as_str() {
        let rl = &r["control_plane"]["reload"];
        md.push_str(&format!(
            "\nReload, config written to visible: this build median {:.1} ms, {name} {:.1} ms; the daemon's apply: this build {:.1} ms, {name} {:.1} ms.\n",
            rl["median_ms"].as_f64().unwrap(),
            rl["baseline"]["median_ms"].as_f64().unwrap(),
            rl["apply_median_ms"].as_f64().unwrap(),
            rl["baseline"]["apply_median_ms"].as_f64().unwrap()
        ));
    }
    md.push_str("\n| Maglev table, 65537 slots | median | worst |\n|---|---:|---:|\n");
    for row in c["maglev"].as_array().unwrap() {
        md.push_str(&format!(
            "| {} backends | {:.2} ms | {:.2} ms |\n",
            row["backends"],
            row["median_ms"].as_f64().unwrap(),
            row["worst_ms"].as_f64().unwrap()
        ));
    }
    md.push_str("\n| VIPs | kernel memory of all maps | of which Maglev tables | of which connection tables (IPv4 and IPv6) |\n|---:|---:|---:|---:|\n");
    for row in c["memory"].as_array().unwrap() {
        let mib = |k: &str| row[k].as_f64().unwrap() / 1048576.0;
        md.push_str(&format!(
            "| {} | {:.1} MiB | {:.1} MiB | {:.1} MiB |\n",
            row["vips"],
            mib("total_bytes"),
            mib("maglev_tables_bytes"),
            mib("conn_table_bytes")
        ));
    }
    let rl = &c["reload"];
    md.push_str(&format!(
        "\nConfig change to maps updated ({} changes): median **{:.1} ms**, worst {:.1} ms, including the {} ms debounce and \
         status polling; the daemon's own apply (read, validate, diff, resolve, write): median {:.1} ms, worst {:.1} ms.\n",
        rl["changes"], rl["median_ms"].as_f64().unwrap(), rl["worst_ms"].as_f64().unwrap(), rl["debounce_ms"],
        rl["apply_median_ms"].as_f64().unwrap(), rl["apply_worst_ms"].as_f64().unwrap()
    ));
}

/// The first four cells of a data-plane row: mode, backends, conn table, packet class.
fn row_label(row: &Value) -> String {
    format!(
        "{} | {} | {} | {}",
        row["mode"].as_str().unwrap(),
        row["backends"],
        if row["full_conn_table"] == true {
            "full"
        } else {
            "-"
        },
        row["class"].as_str().unwrap()
    )
}

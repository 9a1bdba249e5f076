//! The tests' DNS server (`balancer_tests::dns::Dnsmasq`, real dnsmasq) asked from another
//! namespace: records set, changed and removed while it runs, SRV records, names it must not
//! answer, an outage and a restart, where it listens, and what it leaves behind. And the NAT
//! topology's runtime additions that discovery tests and the autoscale demo use: a DNS host
//! on the backends' bridge, backends added and removed while it runs.
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
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use balancer_tests::{
    dns::{query, Answer, Dnsmasq, RecordType, Srv, NOERROR, NXDOMAIN, REFUSED},
    http::{get, HttpServer},
    netns::{remove_stale, require_root, Netns},
    topology::{nat_backend_addr, NatTopology, NAT_BACKEND_PORT, NAT_DNS_ADDR},
};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 53);
const ASKER: Ipv4Addr = Ipv4Addr::new(10, 95, 0, 2);
const TTL: u32 = 7;

/// Asks from `ns` (another namespace than the server's).
fn ask(ns: &Netns, name: &str, kind: RecordType) -> Result<Answer, String> {
    let (server, name) = (SocketAddr::new(SERVER.into(), 53), name.to_owned());
    ns.run(move || query(server, &name, kind, Duration::from_secs(1)))
}

fn addresses(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn dnsmasq_answers_what_the_test_sets_and_only_that() {
    require_root("the DNS server test");
    remove_stale("lbas-");
    let prefix = format!("lbas-{}-", std::process::id());
    let server_ns = Netns::create(&format!("{prefix}dns"));
    let asker = Netns::create(&format!("{prefix}asker"));
    server_ns.veth("eth0", &asker, "eth0");
    for (ns, address) in [(&server_ns, SERVER), (&asker, ASKER)] {
        ns.ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
    }

    let mut dns = Dnsmasq::start(&server_ns, SERVER.into(), "demo.test", TTL);
    let files = format!("/tmp/{}-dnsmasq-{SERVER}", server_ns.name());
    assert!(Path::new(&files).is_dir(), "{files}");

    // A name of the domain without records: NXDOMAIN, at once.
    let started = Instant::now();
    let answer = ask(&asker, "web.demo.test", RecordType::A).unwrap();
    assert_eq!(answer.rcode, NXDOMAIN, "{answer:?}");
    assert!(started.elapsed() < Duration::from_millis(500));

    // Records set, changed, and removed, while it runs.
    dns.set_addresses("web.demo.test", &addresses(&["10.95.0.11", "10.95.0.12"]));
    let answer = ask(&asker, "web.demo.test", RecordType::A).unwrap();
    assert_eq!((answer.rcode, answer.authoritative), (NOERROR, true));
    assert_eq!(
        answer.addresses(),
        addresses(&["10.95.0.11", "10.95.0.12"])
            .into_iter()
            .collect()
    );
    assert!(answer.records.iter().all(|r| r.ttl == TTL), "{answer:?}");

    dns.set_addresses("web.demo.test", &addresses(&["10.95.0.13", "fd95::13"]));
    assert_eq!(
        ask(&asker, "web.demo.test", RecordType::A)
            .unwrap()
            .addresses(),
        addresses(&["10.95.0.13"]).into_iter().collect()
    );
    assert_eq!(
        ask(&asker, "web.demo.test", RecordType::Aaaa)
            .unwrap()
            .addresses(),
        addresses(&["fd95::13"]).into_iter().collect()
    );

    dns.set_addresses("web.demo.test", &[]);
    let answer = ask(&asker, "web.demo.test", RecordType::A).unwrap();
    assert!(answer.records.is_empty(), "{answer:?}");
    assert!([NOERROR, NXDOMAIN].contains(&answer.rcode), "{answer:?}");

    // Names outside the domain: refused, never forwarded.
    let answer = ask(&asker, "example.com", RecordType::A).unwrap();
    assert_eq!(answer.rcode, REFUSED, "{answer:?}");
    assert!(!dns.log().contains("forwarded"), "{}", dns.log());

    // SRV records (a restart), with the A records kept.
    dns.set_addresses("a.demo.test", &addresses(&["10.95.0.21"]));
    let srv = vec![
        Srv {
            priority: 0,
            weight: 1,
            port: 8080,
            target: "a.demo.test".into(),
        },
        Srv {
            priority: 0,
            weight: 3,
            port: 8081,
            target: "b.demo.test".into(),
        },
    ];
    dns.set_srv("_http._tcp.web.demo.test", &srv);
    let answer = ask(&asker, "_http._tcp.web.demo.test", RecordType::Srv).unwrap();
    assert_eq!(answer.srv(), srv.iter().cloned().collect::<BTreeSet<_>>());
    assert_eq!(
        ask(&asker, "a.demo.test", RecordType::A)
            .unwrap()
            .addresses(),
        addresses(&["10.95.0.21"]).into_iter().collect()
    );

    // An outage: no answer at all; records set meanwhile are answered after the restart.
    dns.stop();
    assert!(!dns.running());
    let error = ask(&asker, "a.demo.test", RecordType::A).unwrap_err();
    assert!(error.contains("no answer"), "{error}");
    dns.set_addresses("web.demo.test", &addresses(&["10.95.0.14"]));
    dns.restart();
    assert!(dns.running());
    assert_eq!(
        ask(&asker, "web.demo.test", RecordType::A)
            .unwrap()
            .addresses(),
        addresses(&["10.95.0.14"]).into_iter().collect()
    );
    assert_eq!(
        ask(&asker, "_http._tcp.web.demo.test", RecordType::Srv)
            .unwrap()
            .srv()
            .len(),
        2
    );

    // It listens on its one address, port 53, UDP and TCP, and nowhere else.
    let out = server_ns.exec("ss", &["-lntuH"]);
    let sockets: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .collect();
    assert_eq!(
        sockets,
        [format!("{SERVER}:53")].into_iter().collect(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = server_ns.exec("ss", &["-lntuH"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);

    // Dropped: the process is gone from the namespace, and its files from /tmp.
    drop(dns);
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", server_ns.name()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!Path::new(&files).exists(), "{files} left behind");
}

#[test]
fn backends_and_a_dns_host_join_and_leave_the_nat_topology() {
    require_root("the NAT topology's runtime additions");
    remove_stale("lbas-");
    let prefix = format!("lbas-{}-t-", std::process::id());
    let mut topology = NatTopology::create(&prefix, 1);
    let dns_ns = topology.add_dns_host();
    let dns = Dnsmasq::start(dns_ns, NAT_DNS_ADDR.into(), "demo.test", 1);

    let mut servers = Vec::new();
    for i in [1, 2] {
        let ns = topology.add_backend(i);
        assert_eq!(ns.name(), format!("{prefix}be{}", i + 1));
        let listen = SocketAddr::new(nat_backend_addr(i).into(), NAT_BACKEND_PORT);
        servers.push(HttpServer::start(
            ns,
            &nat_backend_addr(i).to_string(),
            listen,
        ));
    }
    let _first = HttpServer::start(
        &topology.backends[0],
        "first",
        SocketAddr::new(nat_backend_addr(0).into(), NAT_BACKEND_PORT),
    );
    dns.set_addresses(
        "web.demo.test",
        &[nat_backend_addr(1).into(), nat_backend_addr(2).into()],
    );

    // From the balancer's namespace (its address on the backends' subnet): the DNS server and
    // every backend, the added ones included.
    let server = dns.address();
    let answer = topology
        .balancer
        .run(move || {
            query(
                server,
                "web.demo.test",
                RecordType::A,
                Duration::from_secs(1),
            )
        })
        .unwrap();
    assert_eq!(answer.addresses().len(), 2, "{answer:?}");
    for i in 0..3 {
        let to = SocketAddr::new(nat_backend_addr(i).into(), NAT_BACKEND_PORT);
        let served = topology.balancer.run(move || get(to, 0, i as u64));
        assert!(served.is_ok(), "backend {i}: {served:?}");
    }
    assert!(topology.backend(1).is_some() && topology.backend(3).is_none());
    assert_eq!(
        topology.hosts().len(),
        6,
        "client, balancer, 3 backends, dns"
    );

    // Removed: unplugged and gone, while the others still answer.
    drop(servers.remove(0));
    topology.remove_backend(1);
    assert!(topology.backend(1).is_none());
    assert!(!Path::new(&format!("/run/netns/{prefix}be2")).exists());
    let port = std::process::Command::new("ip")
        .args(["-n", topology.switch.name(), "link", "show", "p-be2"])
        .output()
        .unwrap();
    assert!(
        !port.status.success(),
        "the bridge port p-be2 is still there"
    );
    let gone = SocketAddr::new(nat_backend_addr(1).into(), NAT_BACKEND_PORT);
    let refused = topology.balancer.run(move || get(gone, 0, 9));
    assert!(refused.is_err(), "{refused:?}");
    let to = SocketAddr::new(nat_backend_addr(2).into(), NAT_BACKEND_PORT);
    assert!(topology.balancer.run(move || get(to, 0, 10)).is_ok());

    // Added again under the same index.
    let ns = topology.add_backend(1);
    let _again = HttpServer::start(ns, "again", gone);
    assert_eq!(
        topology
            .balancer
            .run(move || get(gone, 0, 11))
            .unwrap()
            .backend,
        "again"
    );
}

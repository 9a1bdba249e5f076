//! Config errors, defaults, overrides, and the configs shipped in config/.

use std::{net::IpAddr, path::Path, time::Duration};

use balancer_common::{DEFAULT_CONN_TABLE_SIZE, DEFAULT_MAGLEV_SIZE};

use crate::config::{line_column, load, model::*, parse, parse_for, validate::is_prime, Host};

/// A case of a rejected config: (replace, with, line, column, part of the message).
type Case = (&'static str, &'static str, usize, usize, &'static str);

const GOOD: &str = r#"
[balancer]
interface = "eth0"
xdp_mode = "native"
hash_seed = "0x5eed"
conn_table_size = 65536
metrics_listen = "127.0.0.1:9200"

[[vip]]
name = "web"
address = "203.0.113.10"
port = 80
protocol = "tcp"
forwarding = "dsr"
table_size = 251
backends = [
  { address = "10.0.0.11", weight = 100 },
  { address = "10.0.0.12", drain = true },
]

[[vip]]
name = "dns"
address = "203.0.113.10"
port = "any"
protocol = "udp"
forwarding = "dsr"
backends = [{ address = "10.0.0.13" }]
"#;

#[test]
fn accepts_a_full_config() {
    let c = parse(Path::new("good.toml"), GOOD).unwrap();
    assert_eq!(c.interface.as_deref(), Some("eth0"));
    assert_eq!(c.xdp_mode, XdpModeSetting::Native);
    assert_eq!(c.hash_seed, 0x5eed);
    assert_eq!(c.conn_table_size, 65536);
    assert_eq!(c.metrics_listen, "127.0.0.1:9200".parse().unwrap());
    assert_eq!(c.vips.len(), 2);
    let web = &c.vips[0];
    assert_eq!(
        (web.port, web.protocol, web.table_size),
        (Some(80), Protocol::Tcp, 251)
    );
    let summary: Vec<(IpAddr, u32, bool)> = web
        .backends
        .iter()
        .map(|b| (b.address, b.weight, b.drain))
        .collect();
    assert_eq!(
        summary,
        [
            ("10.0.0.11".parse().unwrap(), 100, false),
            ("10.0.0.12".parse().unwrap(), DEFAULT_WEIGHT, true)
        ]
    );
    // No health table: a TCP VIP with a port gets a TCP check of that port with the
    // defaults; a UDP any-port VIP gets none.
    let defaults = HealthCheck {
        kind: CheckKind::Tcp,
        port: 80,
        interval: DEFAULT_INTERVAL,
        timeout: DEFAULT_TIMEOUT,
        rise: DEFAULT_RISE,
        fall: DEFAULT_FALL,
        initial: InitialState::Up,
    };
    assert_eq!(web.backends[0].health, defaults);
    assert_eq!(c.vips[1].backends[0].health.kind, CheckKind::None);
    assert_eq!(web.when_all_down, WhenAllDown::FailOpen);
    assert_eq!(c.removal_grace, DEFAULT_REMOVAL_GRACE);
    assert_eq!(c.vips[1].port, None);
    assert_eq!(c.vips[1].table_size, DEFAULT_MAGLEV_SIZE);
    assert_eq!(c.vips[1].endpoint(), "203.0.113.10:*/udp");
}

const HEALTH: &str = r#"
[balancer]
removal_grace = "30s"
[[vip]]
name = "web"
address = "192.0.2.1"
port = 80
protocol = "tcp"
forwarding = "dsr"
when_all_down = "drop"
health = { kind = "http", path = "/healthz", host = "web.example", status = "200-299", interval = "500ms", timeout = "200ms", rise = 1, fall = 2, initial = "down" }
backends = [
  { address = "10.0.0.1" },
  { address = "10.0.0.2", health = { port = 8080, fall = 5 } },
  { address = "10.0.0.3", health = { kind = "tcp" } },
]
"#;

#[test]
fn health_checks_and_overrides() {
    let c = parse(Path::new("h.toml"), HEALTH).unwrap();
    assert_eq!(c.removal_grace, Duration::from_secs(30));
    let vip = &c.vips[0];
    assert_eq!(vip.when_all_down, WhenAllDown::Drop);
    let http = HealthCheck {
        kind: CheckKind::Http {
            path: "/healthz".into(),
            host: Some("web.example".into()),
            status: (200, 299),
        },
        port: 80,
        interval: Duration::from_millis(500),
        timeout: Duration::from_millis(200),
        rise: 1,
        fall: 2,
        initial: InitialState::Down,
    };
    assert_eq!(vip.backends[0].health, http);
    // Overrides replace single keys and keep the rest of the VIP's table.
    assert_eq!(
        vip.backends[1].health,
        HealthCheck {
            port: 8080,
            fall: 5,
            ..http.clone()
        }
    );
    // Overriding the kind leaves the VIP's HTTP-only keys behind.
    assert_eq!(
        vip.backends[2].health,
        HealthCheck {
            kind: CheckKind::Tcp,
            ..http
        }
    );
}

/// (replace in HEALTH, with, line, column, part of the message)
const HEALTH_ERRORS: &[Case] = &[
    (
        "interval = \"500ms\"",
        "interval = \"half a second\"",
        11,
        99,
        "health interval \"half a second\" is not a duration",
    ),
    (
        "interval = \"500ms\"",
        "interval = \"50ms\"",
        11,
        99,
        "interval must be from 100ms to 1h",
    ),
    (
        "timeout = \"200ms\"",
        "timeout = \"2s\"",
        11,
        118,
        "timeout must be at least 10ms and no longer than the interval",
    ),
    (
        "rise = 1",
        "rise = 0",
        11,
        134,
        "health rise must be from 1 to 100",
    ),
    (
        "status = \"200-299\"",
        "status = \"2xx\"",
        11,
        77,
        "health status \"2xx\" is not a status code",
    ),
    (
        "path = \"/healthz\"",
        "path = \"healthz\"",
        11,
        34,
        "health path must start with '/'",
    ),
    (
        "{ kind = \"tcp\" }",
        "{ kind = \"tcp\", path = \"/\" }",
        15,
        59,
        "health path only applies to kind = \"http\"",
    ),
    (
        "{ port = 8080, fall = 5 }",
        "{ port = 0 }",
        14,
        45,
        "health port must be from 1 to 65535",
    ),
    (
        "{ port = 8080, fall = 5 }",
        "{ prot = 8080 }",
        14,
        38,
        "unknown field `prot`",
    ),
    (
        "removal_grace = \"30s\"",
        "removal_grace = \"soon\"",
        3,
        17,
        "removal_grace \"soon\"",
    ),
    (
        "when_all_down = \"drop\"",
        "when_all_down = \"panic\"",
        10,
        17,
        "unknown variant `panic`",
    ),
    (
        "removal_grace = \"30s\"",
        "removal_grace = \"30s\"\npin_dir = \"bpf/balancer\"",
        4,
        11,
        "pin_dir \"bpf/balancer\" must be an absolute path",
    ),
    (
        "removal_grace = \"30s\"",
        "removal_grace = \"30s\"\npin_dir = \"/sys/fs/bpf/../x\"",
        4,
        11,
        "without `..`",
    ),
    (
        "removal_grace = \"30s\"",
        "removal_grace = \"30s\"\ncontrol_socket = \"run/x.sock\"",
        4,
        18,
        "control_socket \"run/x.sock\" must be an absolute path",
    ),
    (
        "removal_grace = \"30s\"",
        "removal_grace = \"30s\"\nkeep_datapath = \"yes\"",
        4,
        17,
        "invalid type",
    ),
];

#[test]
fn health_errors_name_the_position() {
    let cases = HEALTH_ERRORS;
    for (from, to, line, column, message) in cases {
        assert!(HEALTH.contains(from), "{from}");
        let err = parse(Path::new("h.toml"), &HEALTH.replacen(from, to, 1)).expect_err(to);
        assert!(err.message.contains(message), "{to}: {err}");
        assert_eq!((err.line, err.column), (*line, *column), "{to}: {err}");
    }
}

#[test]
fn health_checks_of_udp_and_any_port_vips_need_a_port() {
    let udp = "[balancer]\n[[vip]]\nname = \"dns\"\naddress = \"192.0.2.1\"\nport = 53\nprotocol = \"udp\"\nforwarding = \"dsr\"\nhealth = { kind = \"tcp\" }\nbackends = [{ address = \"10.0.0.1\" }]\n";
    let err = parse(Path::new("u.toml"), udp).unwrap_err();
    assert!(
        err.message
            .contains("a tcp check of a UDP VIP needs an explicit TCP `port`"),
        "{err}"
    );
    assert_eq!((err.line, err.column), (8, 19));
    parse(
        Path::new("u.toml"),
        &udp.replace("{ kind = \"tcp\" }", "{ kind = \"tcp\", port = 8053 }"),
    )
    .unwrap();
    let any = udp.replace(
        "port = 53\nprotocol = \"udp\"",
        "port = \"any\"\nprotocol = \"tcp\"",
    );
    let err = parse(Path::new("a.toml"), &any).unwrap_err();
    assert!(err.message.contains("the VIP has no port"), "{err}");
}

#[test]
fn defaults() {
    let c = parse(Path::new("min.toml"), "[balancer]\n").unwrap();
    assert_eq!(c.interface, None);
    assert_eq!(c.xdp_mode, XdpModeSetting::Auto);
    assert_eq!(c.hash_seed, 0);
    assert_eq!(c.conn_table_size, DEFAULT_CONN_TABLE_SIZE);
    assert_eq!(c.metrics_listen.to_string(), DEFAULT_METRICS_LISTEN);
    assert_eq!(c.api_max_connections, DEFAULT_API_MAX_CONNECTIONS);
    assert_eq!(c.api_idle_timeout, DEFAULT_API_IDLE_TIMEOUT);
    assert!(c.vips.is_empty());
}

/// The status API's limits.
const API: &str = "[balancer]\napi_max_connections = 64\napi_idle_timeout = \"2s\"\n";

#[test]
fn the_status_api_limits_and_their_bounds() {
    let c = parse(Path::new("api.toml"), API).unwrap();
    assert_eq!(c.api_max_connections, 64);
    assert_eq!(c.api_idle_timeout, Duration::from_secs(2));
    // (replace in API, with, the value it gives)
    let bounds: &[(&str, &str, u32, Duration)] = &[
        ("= 64", "= 1", 1, Duration::from_secs(2)),
        ("= 64", "= 65536", 65_536, Duration::from_secs(2)),
        ("\"2s\"", "\"100ms\"", 64, Duration::from_millis(100)),
        ("\"2s\"", "\"10m\"", 64, Duration::from_secs(600)),
    ];
    for (from, to, max, timeout) in bounds {
        let c = parse(Path::new("api.toml"), &API.replacen(from, to, 1)).expect(to);
        assert_eq!(
            (c.api_max_connections, c.api_idle_timeout),
            (*max, *timeout)
        );
    }
}

/// (replace in API, with, line, column, part of the message)
const API_ERRORS: &[Case] = &[
    (
        "= 64",
        "= 0",
        2,
        23,
        "api_max_connections 0 is out of range: use 1 to 65536",
    ),
    (
        "= 64",
        "= 65537",
        2,
        23,
        "api_max_connections 65537 is out of range",
    ),
    ("= 64", "= -1", 2, 23, "invalid value: integer `-1`"),
    ("= 64", "= \"many\"", 2, 23, "invalid type: string \"many\""),
    (
        "\"2s\"",
        "\"50ms\"",
        3,
        20,
        "api_idle_timeout \"50ms\" is out of range: use 100ms to 10m",
    ),
    (
        "\"2s\"",
        "\"11m\"",
        3,
        20,
        "api_idle_timeout \"11m\" is out of range",
    ),
    (
        "\"2s\"",
        "\"2 s\"",
        3,
        20,
        "api_idle_timeout \"2 s\" is not a duration",
    ),
    (
        "\"2s\"",
        "5",
        3,
        20,
        "invalid type: integer `5`, expected a string",
    ),
    (
        "api_idle_timeout",
        "api_idle_timout",
        3,
        1,
        "unknown field `api_idle_timout`",
    ),
];

#[test]
fn status_api_limit_errors_name_the_position() {
    for (from, to, line, column, message) in API_ERRORS {
        rejects_in(API, from, to, *line, *column, message);
    }
}

/// Replaces the first occurrence of `from` in the good config and expects an error at
/// `line:column` whose message contains `message`.
fn rejects(from: &str, to: &str, line: usize, column: usize, message: &str) {
    rejects_in(GOOD, from, to, line, column, message);
}

/// [`rejects`], in the config `base`.
fn rejects_in(base: &str, from: &str, to: &str, line: usize, column: usize, message: &str) {
    assert!(base.contains(from), "fixture does not contain {from:?}");
    let text = base.replacen(from, to, 1);
    let err = parse(Path::new("bad.toml"), &text).expect_err(to);
    assert!(
        err.message.contains(message),
        "{to:?}: message {:?} does not contain {message:?}",
        err.message
    );
    assert_eq!((err.line, err.column), (line, column), "{to:?}: {err}");
    assert!(
        err.to_string()
            .starts_with(&format!("bad.toml:{line}:{column}: ")),
        "{err}"
    );
}

/// (replace in GOOD, with, line, column, part of the message)
const ERRORS: &[Case] = &[
    (
        "xdp_mode = \"native\"",
        "xdp_mod = \"native\"",
        4,
        1,
        "unknown field `xdp_mod`",
    ),
    (
        "xdp_mode = \"native\"",
        "xdp_mode = \"fast\"",
        4,
        12,
        "unknown variant `fast`",
    ),
    (
        "hash_seed = \"0x5eed\"",
        "hash_seed = \"0xzz\"",
        5,
        13,
        "hash_seed \"0xzz\"",
    ),
    (
        "hash_seed = \"0x5eed\"",
        "hash_seed = -1",
        5,
        13,
        "does not fit in 32 bits",
    ),
    (
        "conn_table_size = 65536",
        "conn_table_size = 10",
        6,
        19,
        "out of range",
    ),
    (
        "\"127.0.0.1:9200\"",
        "\"localhost\"",
        7,
        18,
        "is not an address:port",
    ),
    (
        "interface = \"eth0\"",
        "interface = \"a/b\"",
        3,
        13,
        "not a valid interface",
    ),
    (
        "name = \"web\"",
        "name = \"w b\"",
        10,
        8,
        "VIP name \"w b\" is not valid",
    ),
    (
        "\"203.0.113.10\"",
        "\"203.0.113\"",
        11,
        11,
        "invalid IP address syntax",
    ),
    (
        "\"203.0.113.10\"",
        "\"2001:db8::1\"",
        17,
        15,
        "backend 10.0.0.11 is not of the VIP's address family",
    ),
    (
        "\"203.0.113.10\"",
        "\"224.0.0.1\"",
        11,
        11,
        "cannot be a VIP",
    ),
    ("port = 80", "port = 0", 12, 8, "port 0 is out of range"),
    (
        "port = 80",
        "port = 70000",
        12,
        8,
        "port 70000 is out of range",
    ),
    (
        "port = 80",
        "port = \"all\"",
        12,
        8,
        "port \"all\" is not valid",
    ),
    (
        "protocol = \"tcp\"",
        "protocol = \"sctp\"",
        13,
        12,
        "unknown variant `sctp`",
    ),
    (
        "forwarding = \"dsr\"",
        "forwarding = \"nat\"",
        14,
        14,
        "forwarding = \"nat\" is not supported yet",
    ),
    (
        "forwarding = \"dsr\"",
        "forwarding = \"dsr\"\ntunnel_source_v4 = \"10.0.0.1\"",
        15,
        20,
        "tunnel_source_v4 only applies to forwarding = \"tunnel\"",
    ),
    (
        "forwarding = \"dsr\"",
        "forwarding = \"tunnel\"\ntunnel_source_v4 = \"10.0.0.0/33\"",
        15,
        20,
        "the prefix must leave 0 to 32 host bits",
    ),
    (
        "forwarding = \"dsr\"",
        "forwarding = \"tunnel\"\ntunnel_source_v6 = \"10.0.0.1\"",
        15,
        20,
        "is not an IPv6 address",
    ),
    (
        "forwarding = \"dsr\"",
        "forwarding = \"dsr\"\nhash = \"random\"",
        15,
        8,
        "unknown variant `random`",
    ),
    (
        "table_size = 251",
        "table_size = 250",
        15,
        14,
        "must be a prime",
    ),
    (
        "table_size = 251",
        "table_size = 65539",
        15,
        14,
        "must be a prime no larger",
    ),
    (
        "weight = 100",
        "weight = 70000",
        17,
        37,
        "weight 70000 is out of range",
    ),
    (
        "weight = 100",
        "wieght = 100",
        17,
        28,
        "unknown field `wieght`",
    ),
    ("drain = true", "drain = 1", 18, 36, "invalid type"),
    (
        "\"10.0.0.12\"",
        "\"10.0.0.11\"",
        18,
        3,
        "backend 10.0.0.11 is listed twice",
    ),
    (
        "\"10.0.0.12\"",
        "\"2001:db8::2\"",
        18,
        15,
        "not of the VIP's address family",
    ),
    (
        "\"10.0.0.12\"",
        "\"127.0.0.1\"",
        18,
        15,
        "cannot be a backend",
    ),
    (
        "name = \"dns\"",
        "name = \"web\"",
        21,
        1,
        "duplicate VIP name \"web\"",
    ),
    (
        "port = \"any\"\nprotocol = \"udp\"",
        "port = 80\nprotocol = \"tcp\"",
        21,
        1,
        "has the same 203.0.113.10:80/tcp as VIP \"web\"",
    ),
    ("[balancer]", "[balancr]", 2, 2, "unknown field `balancr`"),
    (
        "{ address = \"10.0.0.13\" }",
        "{ address = \"203.0.113.10\" }",
        27,
        25,
        "backend 203.0.113.10 is the address of VIP \"web\"",
    ),
    (
        "{ address = \"10.0.0.11\", weight = 100 }",
        "{ address = \"203.0.113.10\", weight = 100 }",
        17,
        15,
        "VIP \"web\": backend 203.0.113.10 is the address of VIP \"web\"",
    ),
    (
        "interface = \"eth0\"",
        "interface = \"eth0\"\nreload_settle = \"2m\"",
        4,
        17,
        "reload_settle must be at most 60s",
    ),
    (
        "interface = \"eth0\"",
        "interface = \"eth0\"\nreload_settle = \"soon\"",
        4,
        17,
        "reload_settle \"soon\" is not a duration",
    ),
];

#[test]
fn errors_name_the_position() {
    // (replace, with, line, column, part of the message)
    let cases = ERRORS;
    for (from, to, line, column, message) in cases {
        rejects(from, to, *line, *column, message);
    }
    // The same endpoint with the other protocol is a different VIP.
    let text = GOOD.replacen("port = \"any\"", "port = 80", 1);
    parse(Path::new("ok.toml"), &text).unwrap();
}

#[test]
fn missing_required_keys_and_syntax_errors_have_positions() {
    let err = parse(Path::new("x.toml"), "[balancer]\n[[vip]]\nname = \"a\"\n").unwrap_err();
    assert!(err.message.contains("missing field `address`"), "{err}");
    assert_eq!(err.line, 2, "{err}");
    let err = parse(Path::new("x.toml"), "[balancer]\ninterface = \"eth0\n").unwrap_err();
    assert_eq!(err.line, 2, "{err}");
    let err = parse(Path::new("x.toml"), "").unwrap_err();
    assert!(err.message.contains("missing field `balancer`"), "{err}");
}

#[test]
fn tunnel_and_fragment_rules() {
    let base = |extra: &str, backend: &str| {
        format!(
            "[balancer]\n[[vip]]\nname = \"a\"\naddress = \"2001:db8::1\"\nport = 53\nprotocol = \"udp\"\n\
             forwarding = \"tunnel\"\n{extra}backends = [{{ address = \"{backend}\" }}]\n"
        )
    };
    // IPv6 VIPs tunnel to IPv6 backends only; IPv4 VIPs may go to either.
    let err = parse(Path::new("t.toml"), &base("", "10.0.0.1")).unwrap_err();
    assert!(
        err.message
            .contains("an IPv6 VIP cannot be tunnelled to the IPv4 backend"),
        "{err}"
    );
    parse(Path::new("t.toml"), &base("", "2001:db8::2")).unwrap();
    let v4 = base("", "2001:db8::2").replace("2001:db8::1", "192.0.2.1");
    let c = parse(Path::new("t.toml"), &v4).unwrap();
    assert_eq!(c.vips[0].forwarding, Forwarding::Tunnel);
    let c = parse(
        Path::new("t.toml"),
        &base(
            "tunnel_source_v6 = \"fd00::/96\"\nfragments = true\n",
            "2001:db8::2",
        ),
    )
    .unwrap();
    assert_eq!(
        c.vips[0].tunnel_source_v6,
        Some(TunnelSource {
            address: "fd00::".parse().unwrap(),
            varied_bits: 32
        })
    );
    assert!(c.vips[0].fragments);

    // fragments = true on a VIP with a port: it must be alone on its address and protocol.
    let two = format!(
        "{}[[vip]]\nname = \"b\"\naddress = \"2001:db8::1\"\nport = 54\nprotocol = \"udp\"\nforwarding = \"dsr\"\n",
        base("fragments = true\n", "2001:db8::2")
    );
    let err = parse(Path::new("t.toml"), &two).unwrap_err();
    assert!(
        err.message
            .contains("VIP \"a\" on the same address and protocol sets fragments = true"),
        "{err}"
    );
    // ...unless the other one is another protocol.
    parse(
        Path::new("t.toml"),
        &two.replace(
            "port = 54\nprotocol = \"udp\"",
            "port = 54\nprotocol = \"tcp\"",
        ),
    )
    .unwrap();
}

#[test]
fn backends_must_fit_the_table() {
    let backends: Vec<String> = (1..=12)
        .map(|i| format!("{{ address = \"10.0.1.{i}\" }}"))
        .collect();
    let text = format!(
        "[balancer]\n[[vip]]\nname = \"v\"\naddress = \"192.0.2.1\"\nport = 53\n\
         protocol = \"udp\"\nforwarding = \"dsr\"\ntable_size = 11\nbackends = [{}]\n",
        backends.join(", ")
    );
    let err = parse(Path::new("x.toml"), &text).unwrap_err();
    assert!(
        err.message.contains("12 backends do not fit a table of 11"),
        "{err}"
    );
    assert_eq!(err.line, 5);
}

#[test]
fn primes() {
    let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
    assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    assert!(is_prime(65537));
    assert!(!is_prime(65535));
}

#[test]
fn line_column_counts_characters() {
    assert_eq!(line_column("ab\ncé\nx", 0), (1, 1));
    assert_eq!(line_column("ab\ncé\nx", 3), (2, 1));
    assert_eq!(line_column("ab\ncé\nx", 7), (3, 1));
    assert_eq!(line_column("ab\ncé\nx", 100), (3, 2));
}

/// Every config shipped in config/ is valid (they are documentation that must not rot).
#[test]
fn shipped_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            load(&path, &Host::default()).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected config/demo.toml and config/example.toml"
    );
}

#[test]
fn backends_and_tunnel_sources_may_be_neither_a_vip_nor_this_host() {
    // A backend that is one of this host's addresses, named with its interface.
    let host = Host {
        addresses: vec![
            ("127.0.0.1".parse().unwrap(), "lo".into()),
            ("10.0.0.12".parse().unwrap(), "eth1".into()),
        ],
    };
    let err = parse_for(Path::new("h.toml"), GOOD, &host).unwrap_err();
    assert_eq!(
        err.to_string(),
        "h.toml:18:15: VIP \"web\": backend 10.0.0.12 is an address of this host (eth1); a backend \
         must be another machine"
    );
    // Without that address, the same file is valid; `parse` knows no host.
    let elsewhere = Host {
        addresses: vec![("192.0.2.99".parse().unwrap(), "eth0".into())],
    };
    parse_for(Path::new("h.toml"), GOOD, &elsewhere).unwrap();
    parse(Path::new("h.toml"), GOOD).unwrap();

    // A tunnel source (an address, or a prefix) that includes a VIP's address.
    let tunnel = |source: &str| {
        format!(
            "[balancer]\n[[vip]]\nname = \"t\"\naddress = \"192.0.2.1\"\nport = 80\nprotocol = \"tcp\"\n\
             forwarding = \"tunnel\"\ntunnel_source_v4 = \"{source}\"\nbackends = [{{ address = \"10.0.0.1\" }}]\n\
             [[vip]]\nname = \"u\"\naddress = \"198.51.100.7\"\nport = 80\nprotocol = \"tcp\"\n\
             forwarding = \"dsr\"\nbackends = [{{ address = \"10.0.0.2\" }}]\n"
        )
    };
    let err = parse(Path::new("t.toml"), &tunnel("192.0.2.1")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "t.toml:8:20: VIP \"t\": tunnel_source_v4 \"192.0.2.1\" includes 192.0.2.1, the address of \
         VIP \"t\": tunnelled packets would come from a VIP"
    );
    let err = parse(Path::new("t.toml"), &tunnel("198.51.100.0/24")).unwrap_err();
    assert!(
        err.message
            .contains("includes 198.51.100.7, the address of VIP \"u\""),
        "{err}"
    );
    assert_eq!((err.line, err.column), (8, 20));
    // A prefix next to the VIPs is fine.
    parse(Path::new("t.toml"), &tunnel("198.51.101.0/24")).unwrap();
    parse(Path::new("t.toml"), &tunnel("192.0.2.2")).unwrap();
}

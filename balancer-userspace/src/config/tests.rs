//! Config errors, defaults, overrides, and the configs shipped in config/.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

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
    assert_eq!(
        c.nat,
        NatGlobal {
            table_size: balancer_common::DEFAULT_NAT_TABLE_SIZE,
            syn_timeout: Duration::from_secs(60),
            established_timeout: Duration::from_secs(3 * 3600),
            closing_timeout: Duration::from_secs(10),
            udp_timeout: Duration::from_secs(60),
            quarantine: Duration::from_secs(60),
        }
    );
    assert!(c.vips.is_empty());
    // Other modes have no translation and no backend port.
    let c = parse(Path::new("good.toml"), GOOD).unwrap();
    for vip in &c.vips {
        assert_eq!(vip.nat, None);
        assert!(vip.backends.iter().all(|b| b.port.is_none()));
    }
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
        "forwarding = \"dsr\"\nsnat = \"none\"",
        15,
        8,
        "VIP \"web\": snat only applies to forwarding = \"nat\" (this VIP's is \"dsr\")",
    ),
    (
        "forwarding = \"dsr\"",
        "forwarding = \"dsr\"\nsnat_ports = \"1024-2047\"",
        15,
        14,
        "VIP \"web\": snat_ports only applies to forwarding = \"nat\"",
    ),
    (
        "forwarding = \"dsr\"",
        "forwarding = \"tunnel\"\nbackend_port = 8080",
        15,
        16,
        "VIP \"web\": backend_port only applies to forwarding = \"nat\" (this VIP's is \"tunnel\")",
    ),
    (
        "weight = 100 }",
        "weight = 100, port = 8080 }",
        17,
        49,
        "VIP \"web\": backend 10.0.0.11 port only applies to forwarding = \"nat\"",
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
        local_port_range: None,
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
        local_port_range: None,
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

/// NAT VIPs: a list of SNAT addresses with ports and backend ports, a prefix, destination-only
/// NAT, and the defaults (the interface's address).
const NAT: &str = r#"
[balancer]
nat_table_size = 131072
nat_timeouts = { syn = "30s", established = "1h", closing = "5s", udp = "2m", quarantine = "0s" }

[[vip]]
name = "web"
address = "203.0.113.10"
port = 80
protocol = "tcp"
forwarding = "nat"
snat = ["192.0.2.10", "192.0.2.11"]
snat_ports = "2000-60000"
backend_port = 8080
backends = [
  { address = "10.0.0.11" },
  { address = "10.0.0.12", port = 8081 },
]

[[vip]]
name = "dns"
address = "2001:db8::53"
port = 53
protocol = "udp"
forwarding = "nat"
snat = "2001:db8:1::/124"
backends = [{ address = "2001:db8:2::1" }]

[[vip]]
name = "direct"
address = "203.0.113.11"
port = "any"
protocol = "tcp"
forwarding = "nat"
snat = "none"
backends = [{ address = "10.0.0.21" }]

[[vip]]
name = "plain"
address = "203.0.113.12"
port = 443
protocol = "tcp"
forwarding = "nat"
backends = [{ address = "10.0.0.31" }]
"#;

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn nat_keys_and_their_defaults() {
    let c = parse(Path::new("nat.toml"), NAT).unwrap();
    assert_eq!(
        c.nat,
        NatGlobal {
            table_size: 131_072,
            syn_timeout: Duration::from_secs(30),
            established_timeout: Duration::from_secs(3600),
            closing_timeout: Duration::from_secs(5),
            udp_timeout: Duration::from_secs(120),
            quarantine: Duration::ZERO,
        }
    );
    let [web, dns, direct, plain] = &c.vips[..] else {
        panic!("{:?}", c.vips)
    };
    assert!(c.vips.iter().all(|v| v.forwarding == Forwarding::Nat));

    // A list of addresses, explicit ports; backend_port, and a backend's own port over it.
    assert_eq!(
        web.nat,
        Some(NatVipConfig {
            snat: Snat::Addresses(ips(&["192.0.2.10", "192.0.2.11"])),
            ports: (2000, 60000),
        })
    );
    let ports: Vec<Option<u16>> = web.backends.iter().map(|b| b.port).collect();
    assert_eq!(ports, [Some(8080), Some(8081)]);

    // A prefix: every address in it, in order; an address that is not this host's gets
    // every port by default. Without backend_port the destination port is kept.
    let expanded: Vec<String> = (0..16).map(|i| format!("2001:db8:1::{i:x}")).collect();
    let expanded: Vec<&str> = expanded.iter().map(String::as_str).collect();
    assert_eq!(
        dns.nat,
        Some(NatVipConfig {
            snat: Snat::Addresses(ips(&expanded)),
            ports: DEFAULT_SNAT_PORTS,
        })
    );
    assert_eq!(dns.backends[0].port, None);

    // Destination-only NAT allocates no ports.
    assert_eq!(direct.nat.as_ref().map(|n| &n.snat), Some(&Snat::None));
    // No snat: the interface's address, a host address, so below the local port range.
    assert_eq!(
        plain.nat,
        Some(NatVipConfig {
            snat: Snat::Interface,
            ports: DEFAULT_HOST_SNAT_PORTS,
        })
    );
    assert_eq!(
        (plain.backends[0].port, plain.backends[0].health.port),
        (None, 443)
    );
}

#[test]
fn nat_ranges_accept_their_edges() {
    let bounds: &[(&str, &str)] = &[
        ("nat_table_size = 131072", "nat_table_size = 1024"),
        ("nat_table_size = 131072", "nat_table_size = 16777216"),
        ("syn = \"30s\"", "syn = \"1s\""),
        ("established = \"1h\"", "established = \"168h\""),
        ("quarantine = \"0s\"", "quarantine = \"10m\""),
        ("snat_ports = \"2000-60000\"", "snat_ports = \"1-65535\""),
        ("snat_ports = \"2000-60000\"", "snat_ports = \"5000\""),
        (
            "snat_ports = \"2000-60000\"",
            "snat_ports = \" 5000 - 5001 \"",
        ),
        ("backend_port = 8080", "backend_port = 65535"),
        (
            "snat = \"2001:db8:1::/124\"",
            "snat = \"2001:db8:1::7/128\"",
        ),
        (
            "snat = \"2001:db8:1::/124\"",
            "snat = [\"2001:db8:1::/125\", \"2001:db8:3::1\"]",
        ),
    ];
    for (from, to) in bounds {
        assert!(NAT.contains(from), "{from}");
        parse(Path::new("nat.toml"), &NAT.replacen(from, to, 1)).expect(to);
    }
    let c = parse(
        Path::new("nat.toml"),
        &NAT.replacen("snat_ports = \"2000-60000\"", "snat_ports = \"5000\"", 1),
    )
    .unwrap();
    assert_eq!(c.vips[0].nat.as_ref().unwrap().ports, (5000, 5000));
    // A timeout table with some keys keeps the defaults of the others.
    let c = parse(
        Path::new("nat.toml"),
        "[balancer]\nnat_timeouts = { udp = \"5m\" }\n",
    )
    .unwrap();
    assert_eq!(
        c.nat,
        NatGlobal {
            udp_timeout: Duration::from_secs(300),
            ..NatGlobal::default()
        }
    );
}

#[test]
fn a_vip_turned_to_nat_translates_from_the_interface() {
    // Full NAT from the interface's address, to the VIP's port, checked there.
    let c = parse(
        Path::new("good.toml"),
        &GOOD.replacen("forwarding = \"dsr\"", "forwarding = \"nat\"", 1),
    )
    .unwrap();
    let web = &c.vips[0];
    assert_eq!(web.nat.as_ref().unwrap().snat, Snat::Interface);
    assert_eq!(
        (web.backends[0].port, web.backends[0].health.port),
        (None, 80)
    );
}

/// (replace in NAT, with, line, column, part of the message)
const NAT_ERRORS: &[Case] = &[
    (
        "nat_table_size = 131072",
        "nat_table_size = 1023",
        3,
        18,
        "nat_table_size 1023 is out of range: use 1024 to 16777216 connections",
    ),
    (
        "nat_table_size = 131072",
        "nat_table_size = 16777217",
        3,
        18,
        "nat_table_size 16777217 is out of range",
    ),
    (
        "nat_table_size = 131072",
        "nat_table_size = -1",
        3,
        18,
        "invalid value: integer `-1`",
    ),
    (
        "syn = \"30s\"",
        "syn = \"0s\"",
        4,
        24,
        "nat_timeouts.syn \"0s\" is out of range: use 1s to 168h (7 days)",
    ),
    (
        "established = \"1h\"",
        "established = \"169h\"",
        4,
        45,
        "nat_timeouts.established \"169h\" is out of range: use 1s to 168h",
    ),
    (
        "closing = \"5s\"",
        "closing = \"500ms\"",
        4,
        61,
        "nat_timeouts.closing \"500ms\" is out of range",
    ),
    (
        "udp = \"2m\"",
        "udp = \"soon\"",
        4,
        73,
        "nat_timeouts.udp \"soon\" is not a duration",
    ),
    (
        "quarantine = \"0s\"",
        "quarantine = \"11m\"",
        4,
        92,
        "nat_timeouts.quarantine \"11m\" is out of range: use 0s to 10m",
    ),
    (
        "quarantine = \"0s\"",
        "quarantine = \"0s\", fin_wait = \"1s\"",
        4,
        98,
        "unknown field `fin_wait`",
    ),
    (
        "nat_timeouts = {",
        "nat_timeout = {",
        4,
        1,
        "unknown field `nat_timeout`",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = [\"192.0.2.10\", \"192.0.2.10\"]",
        12,
        23,
        "VIP \"web\": snat address 192.0.2.10 is listed twice",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = []",
        12,
        8,
        "VIP \"web\": snat = [] lists no address",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = [\"192.0.2.0/28\", \"192.0.2.100\"]",
        12,
        25,
        "VIP \"web\": snat has more than 16 addresses",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = [\"192.0.2.10\", \"none\"]",
        12,
        23,
        "VIP \"web\": snat \"none\" is not an address or prefix",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = [\"192.0.2.10\", 7]",
        12,
        23,
        "invalid type: integer `7`, expected a string",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = 7",
        12,
        8,
        "invalid type: integer `7`, expected \"none\", an address, a prefix",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = \"192.0.2.300\"",
        12,
        8,
        "VIP \"web\": snat \"192.0.2.300\" is not an address or prefix: write \"none\", an address",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = \"192.0.2.0/24\"",
        12,
        8,
        "VIP \"web\": snat \"192.0.2.0/24\" holds more than 16 addresses: use a /28 or longer prefix",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = \"192.0.2.17/28\"",
        12,
        8,
        "VIP \"web\": snat \"192.0.2.17/28\" has host bits set: write its network, \"192.0.2.16/28\"",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = \"192.0.2.16/33\"",
        12,
        8,
        "VIP \"web\": snat \"192.0.2.16/33\": bad prefix length",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = [\"192.0.2.10\", \"2001:db8::1\"]",
        12,
        23,
        "VIP \"web\": snat \"2001:db8::1\" is not of the VIP's address family (IPv4)",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = \"203.0.113.11\"",
        12,
        8,
        "VIP \"web\": snat address 203.0.113.11 is the address of VIP \"direct\"",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = \"203.0.113.8/29\"",
        12,
        8,
        "VIP \"web\": snat \"203.0.113.8/29\" includes 203.0.113.10, which is the address of VIP \"web\"",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = \"10.0.0.12\"",
        12,
        8,
        "VIP \"web\": snat address 10.0.0.12 is a backend of VIP \"web\"",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = [\"192.0.2.10\", \"10.0.0.21\"]",
        12,
        23,
        "VIP \"web\": snat address 10.0.0.21 is a backend of VIP \"direct\"",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = \"127.0.0.1\"",
        12,
        8,
        "VIP \"web\": snat address 127.0.0.1 cannot be a source address",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = \"0.0.0.0\"",
        12,
        8,
        "cannot be a source address",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = \"224.0.0.5\"",
        12,
        8,
        "cannot be a source address",
    ),
    (
        "snat = [\"192.0.2.10\", \"192.0.2.11\"]",
        "snat = \"255.255.255.255\"",
        12,
        8,
        "cannot be a source address",
    ),
    (
        "snat = \"2001:db8:1::/124\"",
        "snat = \"2001:db8:1::/120\"",
        26,
        8,
        "VIP \"dns\": snat \"2001:db8:1::/120\" holds more than 16 addresses: use a /124 or longer",
    ),
    (
        "snat = \"2001:db8:1::/124\"",
        "snat = \"2001:db8:1::8/124\"",
        26,
        8,
        "has host bits set: write its network, \"2001:db8:1::/124\"",
    ),
    (
        "snat = \"2001:db8:1::/124\"",
        "snat = \"192.0.2.10\"",
        26,
        8,
        "VIP \"dns\": snat \"192.0.2.10\" is not of the VIP's address family (IPv6)",
    ),
    (
        "snat = \"2001:db8:1::/124\"",
        "snat = \"::1\"",
        26,
        8,
        "VIP \"dns\": snat address ::1 cannot be a source address",
    ),
    (
        "snat_ports = \"2000-60000\"",
        "snat_ports = \"0-100\"",
        13,
        14,
        "VIP \"web\": snat_ports \"0-100\" is not a port range such as \"1024-65535\"",
    ),
    (
        "snat_ports = \"2000-60000\"",
        "snat_ports = \"60000-2000\"",
        13,
        14,
        "snat_ports \"60000-2000\" is not a port range",
    ),
    (
        "snat_ports = \"2000-60000\"",
        "snat_ports = \"1024-65536\"",
        13,
        14,
        "snat_ports \"1024-65536\" is not a port range",
    ),
    (
        "snat_ports = \"2000-60000\"",
        "snat_ports = \"high\"",
        13,
        14,
        "snat_ports \"high\" is not a port range",
    ),
    (
        "snat_ports = \"2000-60000\"",
        "snat_ports = 5000",
        13,
        14,
        "invalid type: integer `5000`, expected a string",
    ),
    (
        "snat = \"none\"",
        "snat = \"none\"\nsnat_ports = \"1024-2047\"",
        36,
        14,
        "VIP \"direct\": snat_ports does not apply with snat = \"none\" (destination-only NAT \
         allocates no ports)",
    ),
    (
        "snat = \"none\"",
        "snat = \"none\"\nfragments = true",
        36,
        13,
        "VIP \"direct\": fragments = true does not apply to forwarding = \"nat\": fragments after \
         the first carry no port to translate",
    ),
    (
        "backend_port = 8080",
        "backend_port = 0",
        14,
        16,
        "VIP \"web\": backend_port 0 is out of range: use 1 to 65535",
    ),
    (
        "backend_port = 8080",
        "backend_port = 65536",
        14,
        16,
        "invalid value: integer `65536`",
    ),
    (
        "port = 8081",
        "port = 0",
        17,
        35,
        "VIP \"web\": backend 10.0.0.12 port 0 is out of range: use 1 to 65535",
    ),
    (
        "port = 8081",
        "prot = 8081",
        17,
        28,
        "unknown field `prot`",
    ),
    (
        "{ address = \"10.0.0.11\" }",
        "{ address = \"2001:db8::11\" }",
        16,
        15,
        "VIP \"web\": backend 2001:db8::11 is not of the VIP's address family; NAT here translates \
         within one family",
    ),
    (
        "{ address = \"2001:db8:2::1\" }",
        "{ address = \"10.0.2.1\" }",
        27,
        25,
        "VIP \"dns\": backend 10.0.2.1 is not of the VIP's address family",
    ),
    (
        "backend_port = 8080",
        "backend_prot = 8080",
        14,
        1,
        "unknown field `backend_prot`",
    ),
];

#[test]
fn nat_errors_name_the_position() {
    for (from, to, line, column, message) in NAT_ERRORS {
        rejects_in(NAT, from, to, *line, *column, message);
    }
}

#[test]
fn nat_health_checks_default_to_the_backends_port() {
    let c = parse(Path::new("nat.toml"), NAT).unwrap();
    // A TCP VIP on port 80 with backend_port = 8080 checks 8080, and a backend's own port
    // over that.
    let checked: Vec<(CheckKind, u16)> = c.vips[0]
        .backends
        .iter()
        .map(|b| (b.health.kind.clone(), b.health.port))
        .collect();
    assert_eq!(checked, [(CheckKind::Tcp, 8080), (CheckKind::Tcp, 8081)]);

    // A health table without a port: the same; with one: that port.
    let with_health = NAT.replacen(
        "backend_port = 8080\n",
        "backend_port = 8080\nhealth = { kind = \"http\", path = \"/ready\" }\n",
        1,
    );
    let c = parse(Path::new("nat.toml"), &with_health).unwrap();
    let ports: Vec<u16> = c.vips[0].backends.iter().map(|b| b.health.port).collect();
    assert_eq!(ports, [8080, 8081]);
    let c = parse(
        Path::new("nat.toml"),
        &with_health.replacen(
            "port = 8081 }",
            "port = 8081, health = { port = 9000 } }",
            1,
        ),
    )
    .unwrap();
    let ports: Vec<u16> = c.vips[0].backends.iter().map(|b| b.health.port).collect();
    assert_eq!(ports, [8080, 9000]);

    // An any-port TCP VIP has no port to lend, unless its backends have one.
    let direct = c.vips.iter().find(|v| v.name == "direct").unwrap();
    assert_eq!(direct.backends[0].health.kind, CheckKind::None);
    let c = parse(
        Path::new("nat.toml"),
        &NAT.replacen("snat = \"none\"", "snat = \"none\"\nbackend_port = 8443", 1),
    )
    .unwrap();
    let direct = c.vips.iter().find(|v| v.name == "direct").unwrap();
    assert_eq!(direct.backends[0].port, Some(8443));
    assert_eq!(
        (
            direct.backends[0].health.kind.clone(),
            direct.backends[0].health.port
        ),
        (CheckKind::Tcp, 8443)
    );
    let any = NAT.replacen(
        "snat = \"none\"",
        "snat = \"none\"\nhealth = { kind = \"tcp\" }",
        1,
    );
    let err = parse(Path::new("nat.toml"), &any).unwrap_err();
    assert!(err.message.contains("the VIP has no port"), "{err}");

    // A UDP VIP's backend port is no TCP port to check.
    let udp = NAT.replacen(
        "snat = \"2001:db8:1::/124\"",
        "snat = \"2001:db8:1::/124\"\nbackend_port = 5353\nhealth = { kind = \"tcp\" }",
        1,
    );
    let err = parse(Path::new("nat.toml"), &udp).unwrap_err();
    assert!(
        err.message
            .contains("a tcp check of a UDP VIP needs an explicit TCP `port`"),
        "{err}"
    );
}

#[test]
fn snat_ports_keep_clear_of_the_hosts_local_port_range() {
    // 192.0.2.10, the web VIP's first SNAT address, is this host's.
    let host = Host {
        addresses: vec![
            ("127.0.0.1".parse().unwrap(), "lo".into()),
            ("192.0.2.10".parse().unwrap(), "eth0".into()),
        ],
        local_port_range: Some((32768, 60999)),
    };
    let err = parse_for(Path::new("nat.toml"), NAT, &host).unwrap_err();
    assert_eq!(
        err.to_string(),
        "nat.toml:13:14: VIP \"web\": snat_ports 2000-60000 overlap the host's local port range \
         32768-60999 (net.ipv4.ip_local_port_range), which its own connections take on the SNAT \
         address: choose snat_ports outside the host's local port range, such as \"1024-32767\""
    );
    // Below or above it is fine; so is the default, below it.
    for ports in [
        "snat_ports = \"2000-32767\"",
        "snat_ports = \"61000-65535\"",
    ] {
        let text = NAT.replacen("snat_ports = \"2000-60000\"", ports, 1);
        parse_for(Path::new("nat.toml"), &text, &host).expect(ports);
    }
    let text = NAT.replacen("snat_ports = \"2000-60000\"\n", "", 1);
    let c = parse_for(Path::new("nat.toml"), &text, &host).unwrap();
    assert_eq!(
        c.vips[0].nat.as_ref().unwrap().ports,
        DEFAULT_HOST_SNAT_PORTS
    );
    // Addresses that are not the host's get every port by default, and may overlap its range.
    let text = text.replacen("\"192.0.2.10\", ", "", 1);
    let c = parse_for(Path::new("nat.toml"), &text, &host).unwrap();
    assert_eq!(c.vips[0].nat.as_ref().unwrap().ports, DEFAULT_SNAT_PORTS);
    let text = NAT.replacen("\"192.0.2.10\", ", "", 1);
    parse_for(Path::new("nat.toml"), &text, &host).unwrap();
    // Without a known range only the metrics port is checked.
    parse_for(
        Path::new("nat.toml"),
        NAT,
        &Host {
            local_port_range: None,
            ..host.clone()
        },
    )
    .unwrap();

    // The interface's address is the host's: the default ports must clear the host's range
    // too, and the error points at what chose them (the VIP's forwarding).
    let wide = Host {
        local_port_range: Some((10000, 65535)),
        ..Host::default()
    };
    let text = NAT.replacen(
        "snat_ports = \"2000-60000\"",
        "snat_ports = \"2000-9999\"",
        1,
    );
    let err = parse_for(Path::new("nat.toml"), &text, &wide).unwrap_err();
    assert_eq!((err.line, err.column), (43, 14), "{err}");
    assert!(
        err.message.contains(
            "VIP \"plain\": the default snat_ports 1024-32767 overlap the host's local port \
             range 10000-65535 (net.ipv4.ip_local_port_range)"
        ),
        "{err}"
    );
    assert!(
        err.message.ends_with(
            "choose snat_ports outside the host's local port range, such as \"1024-9999\""
        ),
        "{err}"
    );
    // ...or at snat, when it names the host's address.
    let on_host = Host {
        addresses: vec![("192.0.2.10".parse().unwrap(), "eth0".into())],
        ..wide.clone()
    };
    let text = text.replacen("snat_ports = \"2000-9999\"\n", "", 1);
    let err = parse_for(Path::new("nat.toml"), &text, &on_host).unwrap_err();
    assert_eq!((err.line, err.column), (12, 8), "{err}");
    assert!(
        err.message
            .contains("VIP \"web\": the default snat_ports 1024-32767 overlap"),
        "{err}"
    );
}

#[test]
fn snat_ports_keep_clear_of_the_metrics_port() {
    // The metrics endpoint on every address, or on a SNAT address, holds its port there.
    let metrics = |listen: &str| {
        NAT.replacen(
            "[balancer]\n",
            &format!("[balancer]\nmetrics_listen = \"{listen}\"\n"),
            1,
        )
    };
    let err = parse(Path::new("nat.toml"), &metrics("0.0.0.0:9100")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "nat.toml:44:14: VIP \"plain\": the default snat_ports 1024-32767 include 9100, the port \
         of metrics_listen \"0.0.0.0:9100\" on every address, the SNAT address among them: choose \
         snat_ports without it, or another metrics_listen port"
    );
    let err = parse(Path::new("nat.toml"), &metrics("192.0.2.11:3000")).unwrap_err();
    assert_eq!((err.line, err.column), (14, 14), "{err}");
    assert!(
        err.message.contains(
            "VIP \"web\": snat_ports 2000-60000 include 3000, the port of metrics_listen"
        ),
        "{err}"
    );
    for fine in [
        "127.0.0.1:9100",
        "0.0.0.0:40000",
        "192.0.2.11:1999",
        "192.0.2.99:3000",
    ] {
        parse(Path::new("nat.toml"), &metrics(fine)).expect(fine);
    }
    // An IPv4 wildcard takes no IPv6 ports, the IPv6 one takes both.
    let v6 = |listen: &str| {
        format!(
            "[balancer]\nmetrics_listen = \"{listen}\"\n[[vip]]\nname = \"v6\"\naddress = \"2001:db8::80\"\n\
             port = 80\nprotocol = \"tcp\"\nforwarding = \"nat\"\nbackends = [{{ address = \"2001:db8:2::1\" }}]\n"
        )
    };
    parse(Path::new("v6.toml"), &v6("0.0.0.0:9100")).unwrap();
    let err = parse(Path::new("v6.toml"), &v6("[::]:9100")).unwrap_err();
    assert_eq!((err.line, err.column), (8, 14), "{err}");
    assert!(
        err.message
            .contains("include 9100, the port of metrics_listen \"[::]:9100\""),
        "{err}"
    );
}

#[test]
#[allow(clippy::too_many_lines, reason = "a table of cases")]
fn discover_settings_are_checked_with_positions() {
    let vip = |forwarding: &str, discover: &str| {
        format!(
            "[balancer]\n[[vip]]\nname = \"web\"\naddress = \"192.0.2.1\"\nport = 80\nprotocol = \"tcp\"\n\
             forwarding = \"{forwarding}\"\ndiscover = {discover}\n"
        )
    };
    // Defaults, and a VIP with no backends of its own.
    let c = parse(
        Path::new("d.toml"),
        &vip(
            "nat",
            "{ dns = \"web.default.svc.cluster.local\", port = 8080 }",
        ),
    )
    .unwrap();
    let d = c.vips[0].discover.as_ref().unwrap();
    assert_eq!(
        d.query,
        DiscoverQuery::Dns("web.default.svc.cluster.local".into())
    );
    assert_eq!((d.port, d.weight, d.max_backends), (Some(8080), 1, 256));
    assert_eq!(
        (d.interval, d.timeout),
        (Duration::from_secs(5), Duration::from_secs(2))
    );
    assert_eq!(d.empty_grace, Duration::from_secs(60));
    assert!(d.resolvers.is_empty());
    assert_eq!((d.health.kind.name(), d.health.port), ("tcp", 8080));
    assert!(c.vips[0].backends.is_empty());
    // Resolvers with and without a port; the VIP's backend_port stands in for `port`.
    let c = parse(
        Path::new("d.toml"),
        &vip(
            "nat",
            "{ dns = \"web.test\", resolvers = [\"10.96.0.10\", \"[fd00::10]:5353\"] }",
        )
        .replace("discover", "backend_port = 8443\ndiscover"),
    )
    .unwrap();
    let d = c.vips[0].discover.as_ref().unwrap();
    assert_eq!(d.port, Some(8443));
    assert_eq!(
        d.resolvers,
        [
            "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
            "[fd00::10]:5353".parse().unwrap()
        ]
    );
    let srv = parse(
        Path::new("d.toml"),
        &vip("dsr", "{ srv = \"_http._tcp.web.test\" }"),
    )
    .unwrap();
    assert!(matches!(
        srv.vips[0].discover.as_ref().unwrap().query,
        DiscoverQuery::Srv(_)
    ));

    // (discover table, forwarding, part of the message); every error is on line 8.
    let cases = [
        ("{ port = 8080 }", "nat", "needs `dns = \"name\"`"),
        (
            "{ dns = \"a.test\", srv = \"_x._tcp.a.test\" }",
            "nat",
            "not both",
        ),
        ("{ dns = \"bad name.test\" }", "nat", "is not a DNS name"),
        ("{ dns = \"10.0.0.1\" }", "nat", "is an address, not a name"),
        ("{ dns = \"-a.test\" }", "nat", "is not a DNS name"),
        ("{ srv = \"web.test\" }", "nat", "is not an SRV name"),
        (
            "{ dns = \"a.test\", port = 8080 }",
            "dsr",
            "only applies to forwarding = \"nat\"",
        ),
        (
            "{ dns = \"a.test\", port = 0 }",
            "nat",
            "must be from 1 to 65535",
        ),
        (
            "{ srv = \"_x._tcp.a.test\", port = 80 }",
            "nat",
            "does not apply to SRV",
        ),
        (
            "{ srv = \"_x._tcp.a.test\", weight = 3 }",
            "nat",
            "weight does not apply to SRV",
        ),
        (
            "{ dns = \"a.test\", weight = 0 }",
            "nat",
            "weight must be from 1",
        ),
        (
            "{ dns = \"a.test\", interval = \"500ms\" }",
            "nat",
            "interval must be from 1s to 1h",
        ),
        (
            "{ dns = \"a.test\", interval = \"soon\" }",
            "nat",
            "is not a duration",
        ),
        (
            "{ dns = \"a.test\", timeout = \"10s\" }",
            "nat",
            "longer than its interval",
        ),
        (
            "{ dns = \"a.test\", timeout = \"50ms\" }",
            "nat",
            "timeout must be from 100ms",
        ),
        (
            "{ dns = \"a.test\", empty_grace = \"2d\" }",
            "nat",
            "is not a duration",
        ),
        (
            "{ dns = \"a.test\", empty_grace = \"25h\" }",
            "nat",
            "empty_grace must be from 0s to 24h",
        ),
        (
            "{ dns = \"a.test\", max_backends = 0 }",
            "nat",
            "max_backends must be from 1",
        ),
        (
            "{ dns = \"a.test\", max_backends = 100000 }",
            "nat",
            "max_backends must be from 1",
        ),
        (
            "{ dns = \"a.test\", resolvers = [] }",
            "nat",
            "must list 1 to 8",
        ),
        (
            "{ dns = \"a.test\", resolvers = [\"dns.test\"] }",
            "nat",
            "is not an address",
        ),
        (
            "{ dns = \"a.test\", resolvers = [\"10.0.0.1:0\"] }",
            "nat",
            "is not an address",
        ),
        (
            "{ dns = \"a.test\", typo = 1 }",
            "nat",
            "unknown field `typo`",
        ),
    ];
    for (discover, forwarding, message) in cases {
        let err = parse(Path::new("d.toml"), &vip(forwarding, discover)).unwrap_err();
        assert!(err.message.contains(message), "{discover}: {err}");
        assert_eq!(err.line, 8, "{discover}: {err}");
        assert!(err.column > 1, "{discover}: {err}");
    }
    // What the table must leave room for.
    let err = parse(
        Path::new("d.toml"),
        &vip("nat", "{ dns = \"a.test\", max_backends = 300 }")
            .replace("discover", "table_size = 251\ndiscover"),
    )
    .unwrap_err();
    assert!(
        err.message.contains("do not fit a table of 251 slots"),
        "{err}"
    );
}

/// A fleet member's tables.
const FLEET: &str = r#"[balancer]
[announce]
table = 100
withdraw_wait = "2s"
[sync]
listen = "10.0.0.2:7946"
peers = ["10.0.0.3:7946", "10.0.0.4:7946"]
key_file = "/etc/balancer/sync.key"
interval = "20ms"
bulk_timeout = "3s"
"#;

#[test]
fn fleet_tables_and_their_defaults() {
    let c = parse(Path::new("fleet.toml"), FLEET).unwrap();
    let announce = c.announce.unwrap();
    assert_eq!(
        (announce.table, announce.withdraw_wait),
        (100, Duration::from_secs(2))
    );
    let sync = c.sync.unwrap();
    assert_eq!(sync.listen, "10.0.0.2:7946".parse().unwrap());
    assert_eq!(sync.peers.len(), 2);
    assert_eq!(sync.key_file, Path::new("/etc/balancer/sync.key"));
    assert_eq!(
        (sync.interval, sync.bulk_timeout),
        (Duration::from_millis(20), Duration::from_secs(3))
    );
    let minimal = "[balancer]\n[announce]\ntable = 7\n[sync]\nlisten = \"[2001:db8::2]:7946\"\npeers = []\nkey_file = \"/k\"\n";
    let c = parse(Path::new("fleet.toml"), minimal).unwrap();
    assert_eq!(c.announce.unwrap().withdraw_wait, Duration::from_secs(3));
    let sync = c.sync.unwrap();
    assert_eq!(
        (sync.interval, sync.bulk_timeout),
        (Duration::from_millis(50), Duration::from_secs(5))
    );
    assert!(parse(Path::new("fleet.toml"), "[balancer]\n")
        .unwrap()
        .sync
        .is_none());
    // Both need a restart to change (the route writer and the socket start once).
    let none = parse(Path::new("a.toml"), "[balancer]\n").unwrap();
    assert_eq!(
        crate::config::diff::needs_restart(&none, &parse(Path::new("b.toml"), FLEET).unwrap()),
        vec!["announce", "sync"]
    );
}

/// (replace in FLEET, with, line, column, part of the message)
const FLEET_ERRORS: &[Case] = &[
    (
        "= 100",
        "= 254",
        3,
        9,
        "announce table 254 is one of the kernel's own tables",
    ),
    (
        "= 100",
        "= 0",
        3,
        9,
        "announce table 0 is one of the kernel's own tables",
    ),
    ("= 100", "= -1", 3, 9, "invalid value: integer `-1`"),
    ("table = 100\n", "", 2, 1, "missing field `table`"),
    (
        "\"2s\"",
        "\"6m\"",
        4,
        17,
        "announce withdraw_wait \"6m\" is out of range: use 0s to 5m",
    ),
    (
        "\"2s\"",
        "\"soon\"",
        4,
        17,
        "announce withdraw_wait \"soon\" is not a duration",
    ),
    (
        "withdraw_wait",
        "withdraw_delay",
        4,
        1,
        "unknown field `withdraw_delay`",
    ),
    (
        "\"10.0.0.2:7946\"",
        "\"10.0.0.2\"",
        6,
        10,
        "sync listen \"10.0.0.2\" is not an address:port",
    ),
    (
        "\"10.0.0.2:7946\"",
        "\"0.0.0.0:7946\"",
        6,
        10,
        "must be one address of this host and a port",
    ),
    (
        "\"10.0.0.2:7946\"",
        "\"10.0.0.2:0\"",
        6,
        10,
        "must be one address of this host and a port",
    ),
    (
        "\"10.0.0.3:7946\"",
        "\"10.0.0.2:7946\"",
        7,
        10,
        "sync peer \"10.0.0.2:7946\" is this balancer's own listen address",
    ),
    (
        "\"10.0.0.4:7946\"",
        "\"10.0.0.3:7946\"",
        7,
        27,
        "sync peer \"10.0.0.3:7946\" is listed twice",
    ),
    (
        "\"10.0.0.4:7946\"",
        "\"[2001:db8::4]:7946\"",
        7,
        27,
        "is not of the listen address's family",
    ),
    (
        "\"10.0.0.4:7946\"",
        "\"224.0.0.1:7946\"",
        7,
        27,
        "is not one peer's address and port",
    ),
    (
        "\"10.0.0.4:7946\"",
        "\"peer4\"",
        7,
        27,
        "sync peer \"peer4\" is not an address:port",
    ),
    (
        "\"/etc/balancer/sync.key\"",
        "\"sync.key\"",
        8,
        12,
        "sync key_file \"sync.key\" must be an absolute path",
    ),
    (
        "\"/etc/balancer/sync.key\"",
        "\"/etc/../sync.key\"",
        8,
        12,
        "without `..`",
    ),
    (
        "\"20ms\"",
        "\"200ms\"",
        9,
        12,
        "sync interval \"200ms\" is out of range: use 10ms to 100ms",
    ),
    (
        "\"20ms\"",
        "\"5ms\"",
        9,
        12,
        "sync interval \"5ms\" is out of range",
    ),
    (
        "\"3s\"",
        "\"3m\"",
        10,
        16,
        "sync bulk_timeout \"3m\" is out of range: use 0s to 2m",
    ),
    (
        "key_file = \"/etc/balancer/sync.key\"\n",
        "",
        5,
        1,
        "missing field `key_file`",
    ),
    (
        "bulk_timeout",
        "bulk_wait",
        10,
        1,
        "unknown field `bulk_wait`",
    ),
];

#[test]
fn fleet_errors_name_the_position() {
    for (from, to, line, column, message) in FLEET_ERRORS {
        rejects_in(FLEET, from, to, *line, *column, message);
    }
    let many: Vec<String> = (0..33).map(|i| format!("\"10.0.1.{i}:7946\"")).collect();
    rejects_in(
        FLEET,
        "[\"10.0.0.3:7946\", \"10.0.0.4:7946\"]",
        &format!("[{}]", many.join(", ")),
        7,
        9,
        "sync peers: 33 listed, at most 32",
    );
}

#[test]
fn fragments_and_dst_port_only_hashing_cannot_go_together() {
    let text = "[balancer]\n[[vip]]\nname = \"dns\"\naddress = \"192.0.2.1\"\nport = 53\nprotocol = \"udp\"\nforwarding = \"dsr\"\nhash = \"dst_port_only\"\nfragments = true\nbackends = [{ address = \"10.0.0.1\" }]\n";
    let err = parse(Path::new("frag.toml"), text).unwrap_err();
    assert_eq!((err.line, err.column), (9, 13), "{err}");
    assert!(
        err.message
            .contains("fragments = true and hash = \"dst_port_only\" cannot go together"),
        "{err}"
    );
    assert!(parse(
        Path::new("frag.toml"),
        &text.replace("hash = \"dst_port_only\"\n", "")
    )
    .is_ok());
}

#[test]
fn flood_defences_and_their_defaults() {
    let c = parse(Path::new("good.toml"), GOOD).unwrap();
    assert_eq!(
        c.flood,
        Flood {
            new_flows_per_cpu: crate::config::defence::DEFAULT_NEW_FLOWS_PER_CPU,
            pending_table_size: 65536 / 4,
        }
    );
    assert!(c.vips.iter().all(|v| v.source_limit.is_none()));
    let text = GOOD.replacen(
        "table_size = 251\n",
        "table_size = 251\nsource_limit = { rate = 50 }\n",
        1,
    ) + "[flood]\nnew_flows_per_cpu = 1000\npending_table_size = 4096\n";
    let c = parse(Path::new("good.toml"), &text).unwrap();
    assert_eq!(c.flood.new_flows_per_cpu, 1000);
    assert_eq!(c.flood.pending_table_size, 4096);
    assert_eq!(
        c.vips[0].source_limit,
        Some(SourceLimitConfig {
            rate: 50,
            burst: 50,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
        })
    );
    // A small connection table still gets a pending table of the minimum size.
    let small = GOOD.replace("conn_table_size = 65536", "conn_table_size = 1024");
    let c = parse(Path::new("good.toml"), &small).unwrap();
    assert_eq!(c.flood.pending_table_size, MIN_CONN_TABLE_SIZE);
}

#[test]
fn flood_defence_errors_name_the_position() {
    let limited = GOOD.replacen(
        "table_size = 251\n",
        "table_size = 251\nsource_limit = { rate = 50 }\n",
        1,
    ) + "[flood]\nnew_flows_per_cpu = 1000\n";
    let cases: &[Case] = &[
        (
            "rate = 50",
            "rate = 0",
            16,
            25,
            "VIP \"web\": source_limit rate 0 is out of range: use 1 to 10000000 new flows per second",
        ),
        (
            "rate = 50",
            "rate = 50, ipv4_prefix = 33",
            16,
            43,
            "source_limit ipv4_prefix 33 is out of range: use 1 to 32 bits",
        ),
        (
            "rate = 50",
            "rate = 50, ipv6_prefix = 0",
            16,
            43,
            "source_limit ipv6_prefix 0 is out of range: use 1 to 128 bits",
        ),
        (
            "rate = 50",
            "rate = 50, per = 1",
            16,
            29,
            "unknown field `per`",
        ),
        (
            "new_flows_per_cpu = 1000",
            "new_flows_per_cpu = 99",
            30,
            21,
            "flood new_flows_per_cpu 99 is out of range: use 100 to 10000000",
        ),
        (
            "new_flows_per_cpu = 1000",
            "pending_table_size = 100",
            30,
            22,
            "flood pending_table_size 100 is out of range: use 1024 to",
        ),
    ];
    for (from, to, line, column, message) in cases {
        rejects_in(&limited, from, to, *line, *column, message);
    }
}

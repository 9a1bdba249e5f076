//! Property tests of the config parser, which reads a file anyone with write access to it may
//! have got wrong: random configs within the limits parse to what they say, whatever the
//! order of their VIPs and backends; any text, and any mutation of a valid config, is either
//! a config or an error that names the file and a position inside the text, never a panic;
//! a value made invalid is blamed where it is written.

mod generate;

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use generate::{gen_config, gen_name, render, toml_string, GenConfig};

use crate::{
    config::{
        health::parse_duration, parse, parse_for, reach, Config, ConfigError, DiscoverQuery, Host,
        DEFAULT_METRICS_LISTEN, DEFAULT_PIN_DIR,
    },
    property::{assert_covered, bytes, cases, pick},
};

type Rng = fastrand::Rng;

const FILE: &str = "prop.toml";

/// The error's position is inside `text`: a line of it (or the line after a final newline)
/// and a column of that line, or just past its end; and it names the file.
fn assert_inside(text: &str, error: &ConfigError) {
    assert_eq!(error.file, Path::new(FILE), "{error}");
    assert!(!error.message.is_empty(), "{error}");
    let lines: Vec<&str> = text.split('\n').collect();
    assert!(
        (1..=lines.len()).contains(&error.line),
        "line {} of {} lines: {error}\n{text:?}",
        error.line,
        lines.len()
    );
    let width = lines[error.line - 1].chars().count();
    assert!(
        (1..=width + 1).contains(&error.column),
        "column {} of a line of {width} characters: {error}\n{text:?}",
        error.column
    );
    let prefix = format!("{FILE}:{}:{}: ", error.line, error.column);
    assert!(error.to_string().starts_with(&prefix), "{error}");
}

/// Parses `text`; an error must point inside it.
fn parse_checked(text: &str) -> Result<Config, ConfigError> {
    let result = parse(Path::new(FILE), text);
    if let Err(e) = &result {
        assert_inside(text, e);
    }
    result
}

/// Random configs within the limits parse, and say what was written.
#[test]
fn generated_configs_parse_to_what_they_say() {
    for mut case in cases("generated_configs_parse_to_what_they_say", 256) {
        let rng = &mut case.rng;
        let generated = gen_config(rng);
        let text = render(rng, &generated);
        let config = parse_checked(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        generate::check_config(&generated, &config);
    }
}

/// The config with its VIPs in name order and each VIP's backends in address order.
fn sorted(mut config: Config) -> Config {
    config.vips.sort_by(|a, b| a.name.cmp(&b.name));
    for vip in &mut config.vips {
        vip.backends.sort_by_key(|b| b.address);
    }
    config
}

/// `text` with its VIP tables, and the backends of each, in another order.
fn shuffled(rng: &mut Rng, text: &str) -> String {
    let mut blocks: Vec<String> = text.split("\n[[vip]]\n").map(str::to_owned).collect();
    let mut vips = blocks.split_off(1);
    rng.shuffle(&mut vips);
    for vip in &mut vips {
        let mut lines: Vec<&str> = vip.lines().collect();
        let first = lines.iter().position(|l| l.starts_with("  { "));
        if let Some(first) = first {
            let count = lines[first..]
                .iter()
                .take_while(|l| l.starts_with("  { "))
                .count();
            rng.shuffle(&mut lines[first..first + count]);
        }
        *vip = lines.join("\n") + "\n";
    }
    blocks.extend(vips);
    blocks.join("\n[[vip]]\n")
}

/// `text` laid out otherwise: CRLF line ends, blank lines, indentation, comments.
fn relaid(rng: &mut Rng, text: &str) -> String {
    let end = if rng.bool() { "\r\n" } else { "\n" };
    let mut out = String::new();
    for line in text.lines() {
        if rng.u8(..8) == 0 {
            out.push_str(end);
        }
        if rng.u8(..4) == 0 {
            out.push_str(pick::<&str>(rng, &["  ", "\t", " \t "]));
        }
        out.push_str(line);
        if rng.u8(..4) == 0 {
            out.push_str(pick::<&str>(rng, &[" # a comment", "# é = \"x\"", "\t#"]));
        }
        out.push_str(end);
    }
    out
}

/// The order of VIPs and backends in the file, and its layout, change nothing but the order
/// of the lists.
#[test]
fn the_order_and_layout_of_the_file_do_not_matter() {
    for mut case in cases("the_order_and_layout_of_the_file_do_not_matter", 128) {
        let rng = &mut case.rng;
        let generated = gen_config(rng);
        let text = render(rng, &generated);
        let shuffled = shuffled(rng, &text);
        let reordered = relaid(rng, &shuffled);
        let config = parse_checked(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let again = parse_checked(&reordered).unwrap_or_else(|e| panic!("{e}\n{reordered}"));
        assert_eq!(sorted(config), sorted(again), "{text}\n---\n{reordered}");
    }
}

/// What the commands that reach a running daemon read of a valid config is what the daemon
/// reads of it; of any other text, a best guess or a positioned error, never a panic.
#[test]
fn reach_agrees_with_the_full_parse() {
    let dir = std::env::temp_dir().join(format!("balancer-prop-reach-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.toml");
    for mut case in cases("reach_agrees_with_the_full_parse", 64) {
        let rng = &mut case.rng;
        let generated = gen_config(rng);
        let mut text = render(rng, &generated);
        if rng.bool() {
            mutate(rng, &mut text);
        }
        std::fs::write(&path, &text).unwrap();
        let reached = reach(&path);
        let Ok(config) = parse(Path::new(FILE), &text) else {
            continue;
        };
        let reached = reached.unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(reached.interface, config.interface);
        let pin_dir = reached.pin_dir.unwrap_or_else(|| DEFAULT_PIN_DIR.into());
        assert_eq!(pin_dir, config.pin_dir);
        let default: SocketAddr = DEFAULT_METRICS_LISTEN.parse().unwrap();
        assert_eq!(
            reached.metrics_listen.unwrap_or(default),
            config.metrics_listen
        );
        assert_eq!(reached.control_socket, config.control_socket);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Any text, any mutation.

/// Text that parsers trip on: quotes, brackets, numbers at their limits, other scripts.
const SNIPPETS: &[&str] = &[
    "\"",
    "'",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    ",",
    ".",
    "\n",
    "\r\n",
    "\r",
    "\t",
    " ",
    "#",
    "\\",
    "\"\"\"",
    "'''",
    "\0",
    "\u{7f}",
    "é",
    "日本",
    "🦀",
    "\u{feff}",
    "\u{2028}",
    "0",
    "-1",
    "65536",
    "4294967296",
    "18446744073709551616",
    "1e400",
    "nan",
    "inf",
    "0x",
    "true",
    "\"any\"",
    "[[vip]]",
    "[balancer]",
    "backends = [",
    "{ address = \"",
    "\"10.0.0.1\"",
    "\"::1\"",
    "\"999.1.1.1\"",
    "\"5s\"",
    "\"0ms\"",
    "\"99999999999999999999h\"",
    "port",
    "weight",
    "health",
    "name",
    "address",
    "2024-01-01T00:00:00Z",
];

/// A few random edits of `text`, at character boundaries.
fn mutate(rng: &mut Rng, text: &mut String) {
    for _ in 0..rng.usize(1..=4) {
        let mut chars: Vec<char> = text.chars().collect();
        let at = rng.usize(..=chars.len());
        match rng.u8(..6) {
            0 => {
                let end = (at + rng.usize(1..=8)).min(chars.len());
                chars.drain(at..end);
            }
            1 | 2 => {
                let snippet = pick(rng, SNIPPETS);
                chars.splice(at..at, snippet.chars());
            }
            3 => {
                let random = String::from_utf8_lossy(&bytes(rng, 6)).into_owned();
                chars.splice(at..at, random.chars());
            }
            _ => {
                // A line removed, repeated or moved.
                let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
                let i = rng.usize(..lines.len());
                let line = lines.remove(i);
                if rng.bool() {
                    let j = rng.usize(..=lines.len());
                    lines.insert(j, line.clone());
                    if rng.bool() {
                        lines.insert(j, line);
                    }
                }
                *text = lines.join("\n");
                continue;
            }
        }
        *text = chars.into_iter().collect();
    }
}

/// The shipped configs, and a generated one.
fn valid_texts(rng: &mut Rng, shipped: &[String]) -> String {
    if rng.bool() {
        pick(rng, shipped).clone()
    } else {
        let generated = gen_config(rng);
        render(rng, &generated)
    }
}

fn shipped_configs() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut texts: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .map(|path| std::fs::read_to_string(path).unwrap())
        .collect();
    texts.sort();
    assert!(!texts.is_empty());
    texts
}

/// Valid configs edited at random parse, or fail with an error inside the text.
#[test]
fn mutated_configs_never_panic_and_errors_point_inside_the_text() {
    let shipped = shipped_configs();
    let mut rejected = 0;
    for mut case in cases(
        "mutated_configs_never_panic_and_errors_point_inside_the_text",
        512,
    ) {
        let rng = &mut case.rng;
        let mut text = valid_texts(rng, &shipped);
        mutate(rng, &mut text);
        rejected += u32::from(parse_checked(&text).is_err());
    }
    let what = format!("edits that break a config (only {rejected} did)");
    assert_covered(rejected > 100, &what);
}

/// Any text at all (bytes read as UTF-8, lossily, as a file could hold) parses or fails with
/// an error inside it.
#[test]
fn any_text_never_panics_and_errors_point_inside_it() {
    for mut case in cases("any_text_never_panics_and_errors_point_inside_it", 512) {
        let rng = &mut case.rng;
        let mut text = String::new();
        for _ in 0..rng.usize(0..=12) {
            if rng.bool() {
                text.push_str(pick::<&str>(rng, SNIPPETS));
            } else {
                let len = rng.usize(0..=16);
                text.push_str(&String::from_utf8_lossy(&bytes(rng, len)));
            }
        }
        let _ = parse_checked(&text);
    }
}

// ---------------------------------------------------------------------------------------------
// A value made invalid is blamed where it is written.

/// What the keys of a line are keys of.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Section {
    Balancer,
    NatTimeouts,
    Announce,
    Sync,
    Vip,
    Backend,
    Health,
    Discover,
    Autoscale,
    Flood,
    SourceLimit,
}

/// A name one character too long.
const LONG_NAME: &str = "\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"";

/// Values each invalid whatever the rest of the config says, by where their key is.
const BAD: &[(Section, &str, &[&str])] = &[
    (
        Section::Balancer,
        "interface",
        &["\"\"", "\"a/b\"", "\"sixteen-chars-xx\"", "\".\""],
    ),
    (
        Section::Balancer,
        "hash_seed",
        &["\"0xgg\"", "-1", "4294967296", "\"\"", "1.5"],
    ),
    (
        Section::Balancer,
        "conn_table_size",
        &["1023", "33554433", "-1"],
    ),
    (
        Section::Balancer,
        "metrics_listen",
        &["\"localhost:9100\"", "\"127.0.0.1\"", "9100"],
    ),
    (
        Section::Balancer,
        "removal_grace",
        &["\"5 m\"", "\"5min\"", "\"-1s\"", "\"\"", "\"1.5s\""],
    ),
    (Section::Balancer, "reload_settle", &["\"61s\"", "\"2m\""]),
    (
        Section::Balancer,
        "pin_dir",
        &["\"relative\"", "\"/a/../b\""],
    ),
    (Section::Balancer, "control_socket", &["\"x.sock\""]),
    (Section::Balancer, "api_max_connections", &["0", "65537"]),
    (
        Section::Balancer,
        "api_idle_timeout",
        &["\"99ms\"", "\"11m\""],
    ),
    (Section::Balancer, "keep_datapath", &["\"yes\""]),
    (Section::Balancer, "nat_table_size", &["1023", "16777217"]),
    (
        Section::NatTimeouts,
        "syn",
        &["\"0s\"", "\"169h\"", "\"x\""],
    ),
    (Section::NatTimeouts, "established", &["\"0s\"", "\"169h\""]),
    (Section::NatTimeouts, "closing", &["\"999ms\""]),
    (Section::NatTimeouts, "udp", &["\"169h\"", "60"]),
    (Section::NatTimeouts, "quarantine", &["\"11m\""]),
    (
        Section::Announce,
        "table",
        &["0", "253", "254", "255", "-1"],
    ),
    (Section::Announce, "withdraw_wait", &["\"6m\"", "\"x\""]),
    (
        Section::Flood,
        "new_flows_per_cpu",
        &["99", "10000001", "-1"],
    ),
    (Section::Flood, "pending_table_size", &["1023", "33554433"]),
    (Section::SourceLimit, "rate", &["0", "10000001"]),
    (Section::SourceLimit, "burst", &["0", "10000001"]),
    (Section::SourceLimit, "ipv4_prefix", &["0", "33", "256"]),
    (Section::SourceLimit, "ipv6_prefix", &["0", "129"]),
    (
        Section::Sync,
        "listen",
        &[
            "\"0.0.0.0:7946\"",
            "\"10.0.0.2:0\"",
            "\"10.0.0.2\"",
            "\"x\"",
        ],
    ),
    (
        Section::Sync,
        "peers",
        &["[\"x\"]", "[\"0.0.0.0:1\"]", "[\"224.0.0.1:1\"]"],
    ),
    (Section::Sync, "key_file", &["\"relative\"", "\"/a/../b\""]),
    (Section::Sync, "interval", &["\"5ms\"", "\"101ms\""]),
    (Section::Sync, "bulk_timeout", &["\"121s\""]),
    (
        Section::Vip,
        "name",
        &["\"\"", "\"a b\"", "\"x/y\"", LONG_NAME],
    ),
    (
        Section::Vip,
        "address",
        &["\"0.0.0.0\"", "\"224.0.0.1\"", "\"10.0.0.300\"", "\"::g\""],
    ),
    (Section::Vip, "port", &["0", "65536", "\"all\"", "-1"]),
    (Section::Vip, "protocol", &["\"icmp\"", "\"TCP\""]),
    (Section::Vip, "forwarding", &["\"l3\""]),
    (Section::Vip, "table_size", &["250", "65539", "1", "0"]),
    (Section::Vip, "when_all_down", &["\"never\""]),
    (Section::Vip, "hash", &["\"src_only\""]),
    (Section::Vip, "backend_port", &["0", "65536"]),
    (
        Section::Vip,
        "snat",
        &[
            "[]",
            "[\"x\"]",
            "\"224.0.0.1\"",
            "\"198.51.0.0/16\"",
            "\"::/0\"",
        ],
    ),
    (
        Section::Vip,
        "snat_ports",
        &["\"0-10\"", "\"2000-1000\"", "\"x\""],
    ),
    (
        Section::Vip,
        "tunnel_source_v4",
        &["\"1.2.3.4/33\"", "\"::1\"", "\"x\"", "\"10.0.0.0/-1\""],
    ),
    (
        Section::Vip,
        "tunnel_source_v6",
        &["\"10.0.0.1\"", "\"fd00::/95\"", "\"fd00::/129\""],
    ),
    (
        Section::Backend,
        "address",
        &["\"127.0.0.1\"", "\"224.1.1.1\"", "\"0.0.0.0\"", "\"::\""],
    ),
    (
        Section::Backend,
        "weight",
        &["65536", "4294967296", "-1", "\"heavy\""],
    ),
    (Section::Backend, "drain", &["1"]),
    (Section::Backend, "port", &["0", "65536"]),
    (
        Section::Health,
        "interval",
        &["\"50ms\"", "\"2h\"", "\"soon\""],
    ),
    (
        Section::Health,
        "timeout",
        &["\"5ms\"", "\"2h\"", "\"soon\""],
    ),
    (Section::Health, "rise", &["0", "101"]),
    (Section::Health, "fall", &["0", "101"]),
    (Section::Health, "port", &["65536", "-1"]),
    (Section::Health, "kind", &["\"udp\""]),
    (Section::Health, "initial", &["\"sideways\""]),
    (Section::Health, "status", &["\"99\"", "\"400-300\""]),
    (Section::Health, "path", &["\"no-slash\"", "\"/a b\""]),
    (
        Section::Discover,
        "dns",
        &["\"-bad.x\"", "\"10.0.0.1\"", "\"\""],
    ),
    (Section::Discover, "srv", &["\"http.x\""]),
    (Section::Discover, "port", &["0", "65536"]),
    (Section::Discover, "weight", &["0", "65536"]),
    (Section::Discover, "interval", &["\"0s\"", "\"2h\""]),
    (Section::Discover, "timeout", &["\"50ms\"", "\"31s\""]),
    (Section::Discover, "empty_grace", &["\"25h\""]),
    (Section::Discover, "max_backends", &["0", "4097"]),
    (
        Section::Discover,
        "resolvers",
        &["[]", "[\"x\"]", "[\"0.0.0.0\"]"],
    ),
    (Section::Autoscale, "metric", &["\"rps\""]),
    (
        Section::Autoscale,
        "target_per_backend",
        &["0.0", "-1.0", "nan", "inf"],
    ),
    (Section::Autoscale, "tolerance", &["1.0", "-0.5"]),
    (Section::Autoscale, "window", &["\"1s\"", "\"2h\""]),
];

/// A value in the text that can be made invalid: its line (0-based), where it starts and ends
/// in the line (bytes), and what may replace it.
struct Target {
    key: (Section, &'static str),
    line: usize,
    start: usize,
    end: usize,
    bad: &'static [&'static str],
}

/// The end of the value starting at `start` of `line`: a quoted string's closing quote, a
/// list's closing bracket, or the next separator.
fn value_end(line: &str, start: usize) -> usize {
    let rest = &line[start..];
    if let Some(inner) = rest.strip_prefix('"') {
        return start + 2 + inner.find('"').expect("a closed string");
    }
    if rest.starts_with('[') {
        // The first bracket outside a string (addresses such as "[fd00::1]:53" hold some).
        let mut quoted = false;
        for (i, c) in rest.char_indices() {
            match c {
                '"' => quoted = !quoted,
                ']' if !quoted => return start + i + 1,
                _ => {}
            }
        }
        panic!("an unclosed list in {line:?}");
    }
    start + rest.find([',', ' ']).unwrap_or(rest.len())
}

/// The section of each line. Health tables count only on VIPs with backends or discovery:
/// they are checked for those.
fn sections(text: &str, config: &GenConfig) -> Vec<Option<Section>> {
    let mut table = None;
    let mut vip: Option<usize> = None;
    text.lines()
        .map(|line| {
            match line {
                "[balancer]" => table = Some(Section::Balancer),
                "[announce]" => table = Some(Section::Announce),
                "[sync]" => table = Some(Section::Sync),
                "[flood]" => table = Some(Section::Flood),
                "[[vip]]" => {
                    table = Some(Section::Vip);
                    vip = Some(vip.map_or(0, |v| v + 1));
                }
                _ => {}
            }
            let checked = vip.is_some_and(|v| {
                let v = &config.vips[v];
                !v.backends.is_empty() || v.discover.is_some()
            });
            let inline = [
                ("  { ", Section::Backend, true),
                ("nat_timeouts = ", Section::NatTimeouts, true),
                ("health = ", Section::Health, checked),
                ("discover = ", Section::Discover, true),
                ("autoscale = ", Section::Autoscale, true),
                ("source_limit = ", Section::SourceLimit, true),
            ];
            match inline
                .iter()
                .find(|(prefix, _, _)| line.starts_with(prefix))
            {
                Some((_, section, counts)) => counts.then_some(*section),
                None => table,
            }
        })
        .collect()
}

fn targets(text: &str, config: &GenConfig) -> Vec<Target> {
    let mut found = Vec::new();
    for (i, (line, section)) in text.lines().zip(sections(text, config)).enumerate() {
        let Some(section) = section else { continue };
        let top = [
            Section::Balancer,
            Section::Announce,
            Section::Sync,
            Section::Flood,
            Section::Vip,
        ]
        .contains(&section);
        for &(_, key, bad) in BAD.iter().filter(|(s, _, _)| *s == section) {
            let pattern = format!("{key} = ");
            for (at, _) in line.match_indices(&pattern) {
                let before = &line[..at];
                let is_key = if top {
                    at == 0
                } else {
                    before.ends_with("{ ") || before.ends_with(", ")
                };
                if is_key {
                    let start = at + pattern.len();
                    let end = value_end(line, start);
                    let key = (section, key);
                    found.push(Target {
                        key,
                        line: i,
                        start,
                        end,
                        bad,
                    });
                }
            }
        }
    }
    found
}

/// One value of a valid config made invalid: the error points at it.
#[test]
fn an_invalid_value_is_blamed_where_it_is_written() {
    for mut case in cases("an_invalid_value_is_blamed_where_it_is_written", 512) {
        let rng = &mut case.rng;
        let generated = gen_config(rng);
        let text = render(rng, &generated);
        let targets = targets(&text, &generated);
        // A key, then one of its values: rare keys as often as the backends' many.
        let keys: BTreeSet<(Section, &str)> = targets.iter().map(|t| t.key).collect();
        let Some(key) = keys.iter().nth(rng.usize(..keys.len().max(1))) else {
            continue;
        };
        let of_key: Vec<&Target> = targets.iter().filter(|t| t.key == *key).collect();
        let target = *pick(rng, &of_key);
        let bad = *pick(rng, target.bad);
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let line = &mut lines[target.line];
        let original = line.clone();
        line.replace_range(target.start..target.end, bad);
        // Windows line ends change no position.
        let end = if rng.bool() { "\r\n" } else { "\n" };
        let broken = lines.join(end) + end;
        let error = parse_checked(&broken).expect_err(&broken);
        // A list is blamed on its item when it has one.
        let column =
            original[..target.start].chars().count() + 1 + usize::from(bad.starts_with("[\""));
        assert_eq!(
            (error.line, error.column),
            (target.line + 1, column),
            "{error}\nthe value changed: {bad} in {original:?}\n{broken}"
        );
    }
}

/// A backend that is one of this host's addresses is blamed where its first VIP lists it.
#[test]
fn a_backend_on_this_host_is_blamed_where_it_is_listed() {
    for mut case in cases("a_backend_on_this_host_is_blamed_where_it_is_listed", 128) {
        let rng = &mut case.rng;
        let generated = gen_config(rng);
        let text = render(rng, &generated);
        let backends: Vec<IpAddr> = generated
            .vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.address))
            .collect();
        if backends.is_empty() {
            continue;
        }
        let address = *pick(rng, &backends);
        let host = Host {
            addresses: vec![(address, "eth9".into())],
            local_port_range: None,
        };
        let error = parse_for(Path::new(FILE), &text, &host).expect_err(&text);
        assert_inside(&text, &error);
        let listed = format!("address = \"{address}\"");
        let line = text
            .lines()
            .position(|l| l.starts_with("  { ") && l.contains(&listed))
            .expect("listed");
        assert_eq!(error.line, line + 1, "{error}\n{text}");
        assert!(
            error.message.contains("an address of this host (eth9)"),
            "{error}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The smaller parsers: durations, DNS names.

/// `parse_duration` reads back what a duration is written as, and takes nothing else: digits
/// then one of its units. Anything else is an error, not a panic.
#[test]
fn durations_read_back_and_garbage_is_an_error() {
    for mut case in cases("durations_read_back_and_garbage_is_an_error", 1024) {
        let rng = &mut case.rng;
        // A duration written in a unit, with as many leading zeros as a hand may type.
        let (unit, per) = *pick(
            rng,
            &[("ms", 1), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)],
        );
        let value = match rng.u8(..3) {
            0 => rng.u64(..1_000),
            1 => rng.u64(..=u64::MAX / 3_600_000),
            _ => rng.u64(..),
        };
        let zeros = "0".repeat(rng.usize(..3));
        let text = format!("{zeros}{value}{unit}");
        let expected = match per {
            1 => Some(Duration::from_millis(value)),
            _ => value.checked_mul(per / 1_000).map(Duration::from_secs),
        };
        match expected {
            Some(expected) => assert_eq!(parse_duration(&text), Ok(expected), "{text}"),
            // More seconds than a u64 holds: the longest duration, for the range checks to
            // refuse.
            None => assert!(parse_duration(&text).is_ok(), "{text}"),
        }
        // Random text: read only if it is digits and a unit.
        let len = rng.usize(0..=8);
        let mut garbage = String::from_utf8_lossy(&bytes(rng, len)).into_owned();
        if rng.bool() {
            garbage.push_str(pick::<&str>(
                rng,
                &["ms", "s", "m", "h", "sec", "S", " s", ""],
            ));
        }
        let digits = garbage.bytes().take_while(u8::is_ascii_digit).count();
        let (number, unit) = garbage.split_at(digits);
        let well_formed = number.parse::<u64>().is_ok() && ["ms", "s", "m", "h"].contains(&unit);
        assert_eq!(parse_duration(&garbage).is_ok(), well_formed, "{garbage:?}");
    }
}

/// The rule of discovery's names, as the docs state it: at most 253 characters (the 255
/// bytes of a name on the wire, RFC 1035) then an optional final dot, labels of 1 to 63
/// letters, digits, hyphens and underscores, no hyphen at a label's ends; not an address; an
/// SRV name starts with '_'.
fn documented_dns_name(text: &str, srv: bool) -> bool {
    let bare = text.strip_suffix('.').unwrap_or(text);
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(label)
        && bare.parse::<IpAddr>().is_err()
        && (!srv || bare.starts_with('_'))
}

fn gen_dns_name(rng: &mut Rng) -> String {
    let labels = rng.usize(1..=6);
    let mut name: Vec<String> = (0..labels)
        .map(|_| {
            let len = *pick(rng, &[0, 1, 5, 62, 63, 64]);
            let len = if rng.bool() { rng.usize(1..=12) } else { len };
            gen_name(rng, b"abz09-_", len..=len)
        })
        .collect();
    if rng.u8(..4) == 0 {
        // Names about the longest: labels of 63 then one to make 252 to 254 characters.
        let total = rng.usize(252..=254);
        name = vec!["a".repeat(63); 3];
        name.push("b".repeat(total - 3 * 64));
    }
    let mut name = name.join(".");
    match rng.u8(..8) {
        0 => name.push('.'),
        1 => name.insert(
            rng.usize(..=name.len()),
            *pick(rng, &[' ', '*', 'é', '\0', '.']),
        ),
        2 => name = pick(rng, &["10.0.0.1", "::1", "1.2.3", "", ".", "_srv._tcp.x"]).to_string(),
        _ => {}
    }
    name
}

/// Discovery takes exactly the names the rule allows, as written; any other is blamed on
/// its line.
#[test]
fn discovery_names_follow_the_documented_rule() {
    for mut case in cases("discovery_names_follow_the_documented_rule", 512) {
        let rng = &mut case.rng;
        let name = gen_dns_name(rng);
        let srv = rng.bool();
        let key = if srv { "srv" } else { "dns" };
        let text = format!(
            "[balancer]\n[[vip]]\nname = \"d\"\naddress = \"192.0.2.1\"\nport = 80\n\
             protocol = \"tcp\"\nforwarding = \"dsr\"\ndiscover = {{ {key} = {} }}\n",
            toml_string(&name)
        );
        match parse_checked(&text) {
            Ok(config) => {
                assert!(documented_dns_name(&name, srv), "{name:?} taken");
                let query = &config.vips[0].discover.as_ref().unwrap().query;
                let expected = if srv {
                    DiscoverQuery::Srv(name.clone())
                } else {
                    DiscoverQuery::Dns(name.clone())
                };
                assert_eq!(*query, expected);
            }
            Err(e) => {
                assert!(!documented_dns_name(&name, srv), "{name:?} refused: {e}");
                assert_eq!(e.line, 8, "{e}");
            }
        }
        // The same name fully qualified (with the final dot) is taken or refused alike.
        if !name.ends_with('.') {
            let qualified = text.replace(&toml_string(&name), &toml_string(&format!("{name}.")));
            let (plain, dotted) = (parse_checked(&text), parse_checked(&qualified));
            assert_eq!(
                plain.is_ok(),
                dotted.is_ok(),
                "{name:?}: {plain:?} {dotted:?}"
            );
        }
    }
}

/// What the kernel takes as an interface name (`dev_valid_name`, net/core/dev.c): 1 to 15
/// bytes (IFNAMSIZ less the NUL), neither "." nor "..", without '/', ':' or a byte its
/// `isspace` is true of (9 to 13, 32, and 0xa0 in its Latin-1 table); and no NUL, which
/// would end the C string.
fn kernel_takes(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| matches!(b, b'/' | b':' | b'\0' | 9..=13 | b' ' | 0xa0))
}

/// `interface` takes exactly the names the kernel would, as written; any other is blamed on
/// its line.
#[test]
fn interface_names_are_those_the_kernel_takes() {
    let alphabet = [
        'e', 't', 'h', '0', '-', '_', '.', '/', ':', ' ', '\t', '\n', '\u{b}', '\u{c}', '\r', '\0',
        'à', 'é', '\u{a0}', '@',
    ];
    for mut case in cases("interface_names_are_those_the_kernel_takes", 512) {
        let rng = &mut case.rng;
        let name: String = match rng.u8(..8) {
            0 => pick(rng, &[".", "..", "...", "", "eth0", "a.b"]).to_string(),
            1 => "x".repeat(rng.usize(14..=16)),
            _ => (0..rng.usize(1..=8))
                .map(|_| *pick(rng, &alphabet))
                .collect(),
        };
        let text = format!("[balancer]\ninterface = {}\n", toml_string(&name));
        match parse_checked(&text) {
            Ok(config) => {
                assert!(kernel_takes(&name), "{name:?} taken");
                assert_eq!(config.interface, Some(name));
            }
            Err(e) => {
                assert!(!kernel_takes(&name), "{name:?} refused: {e}");
                assert_eq!((e.line, e.column), (2, 13), "{e}");
            }
        }
    }
}

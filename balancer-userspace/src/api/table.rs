//! `balancer status`: the status document as a table, in the spirit of
//! `ipvsadm -Ln --stats --rate`.

use std::fmt::Write as _;

use crate::api::status::{BackendStatus, StatusDocument, VipStatus};

/// 1234 -> "1234", 12345 -> "12.3K", 1234567 -> "1.2M".
fn human(n: f64) -> String {
    let (value, unit) = match n.abs() {
        x if x >= 1e12 => (n / 1e12, "T"),
        x if x >= 1e9 => (n / 1e9, "G"),
        x if x >= 1e6 => (n / 1e6, "M"),
        x if x >= 1e4 => (n / 1e3, "K"),
        _ => {
            return if n.fract() == 0.0 {
                format!("{n:.0}")
            } else {
                format!("{n:.1}")
            }
        }
    };
    format!("{value:.1}{unit}")
}

fn or_unknown<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "?".to_owned(), |v| v.to_string())
}

/// The NAT tables in one line: connections and entries as of the last sweep, SNAT ports in
/// use, connections created and refused.
fn nat_line(out: &mut String, status: &StatusDocument) {
    let n = &status.nat;
    let event = |name: &str| n.events.get(name).copied().unwrap_or(0);
    let ports: Vec<String> = n
        .snat_ports_in_use
        .iter()
        .map(|(address, ports)| format!("{address} {ports}"))
        .collect();
    let refused =
        event("no_port_exhausted") + event("no_port_insert_failed") + event("no_snat_address");
    let _ = writeln!(
        out,
        "NAT: {} connections ({} IPv4 and {} IPv6 entries, of {} connections per family), SNAT ports in use: {}; {} created, {refused} refused",
        or_unknown(n.connections),
        or_unknown(n.entries_ipv4),
        or_unknown(n.entries_ipv6),
        n.capacity,
        if ports.is_empty() {
            "none".to_owned()
        } else {
            ports.join(", ")
        },
        event("created"),
    );
}

/// The defences in one line: flood mode, and what became of new flows.
fn defence_line(out: &mut String, status: &StatusDocument) {
    let d = &status.defence;
    let event = |name: &str| d.events.get(name).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "new flows: {} pending, {} promoted, {} placed without state over the cap of {} per CPU per second, {} over a source's limit; flood mode {} ({} so far)",
        event("pending"),
        event("promoted"),
        event("capped"),
        d.new_flows_per_cpu,
        d.source_limited,
        if d.flood_mode { "ON" } else { "off" },
        d.floods,
    );
}

/// The table for one status document.
/// The announced routes and the sync, one line each (a fleet member only).
fn fleet_lines(out: &mut String, status: &StatusDocument) {
    if let Some(a) = &status.announce {
        let routes = if a.routes.is_empty() {
            "nothing".to_owned()
        } else {
            a.routes.join(", ")
        };
        let mut why = Vec::new();
        if a.withdrawn_all {
            why.push("every VIP withdrawn by the operator".to_owned());
        } else if !a.withdrawn.is_empty() {
            why.push(format!(
                "withdrawn by the operator: {}",
                a.withdrawn.join(", ")
            ));
        }
        if a.awaiting_sync {
            why.push("waiting for the peers' connection tables".to_owned());
        }
        let why = if why.is_empty() {
            String::new()
        } else {
            format!(" ({})", why.join("; "))
        };
        let _ = writeln!(out, "announcing {routes} in table {}{why}", a.table);
    }
    if let Some(s) = &status.sync {
        let rejected: u64 = s.rejected.values().sum();
        let silent = s
            .peers
            .iter()
            .filter(|p| p.last_message_age_seconds.is_none_or(|age| age > 3.0))
            .count();
        let _ = writeln!(
            out,
            "sync on {}: {} peers ({silent} silent), entries sent {}, received {}, applied {}, kept {}, rejected {rejected}, lost {}; bulk copy {}",
            s.listen,
            s.peers.len(),
            s.entries_sent,
            s.entries_received,
            s.entries_applied,
            s.entries_kept,
            s.lost,
            s.bulk
        );
    }
}

pub fn render(status: &StatusDocument) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "balancer on {} ({} XDP), config generation {}, {} flows in the connection tables (of {} per address family)",
        or_unknown(status.interface.as_deref()),
        or_unknown(status.xdp_mode.as_deref()),
        status.config_generation,
        or_unknown(status.conn_table_entries),
        status.conn_table_size,
    );
    let d = &status.datapath;
    if let Some(dir) = &d.pin_dir {
        let _ = writeln!(
            out,
            "data plane pinned in {dir}: program {} through link {}, {}; at exit: {}",
            or_unknown(d.program_id),
            or_unknown(d.link_id),
            if d.adopted.is_some() {
                "adopted at start"
            } else {
                "created at start"
            },
            if d.keep_on_exit {
                "kept running"
            } else {
                "removed"
            }
        );
    }
    if status
        .vips
        .iter()
        .any(|v| v.forwarding == crate::config::Forwarding::Nat)
    {
        nat_line(&mut out, status);
    }
    fleet_lines(&mut out, status);
    defence_line(&mut out, status);
    for vip in &status.vips {
        vip_table(&mut out, vip);
    }
    let dropped: Vec<String> = status
        .outcomes
        .iter()
        .filter(|(name, n)| {
            **n > 0 && !balancer_common::Outcome::named(name).is_some_and(|o| o.forwards())
        })
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    let verdict = |name: &str| status.verdicts.get(name).copied().unwrap_or(0);
    let _ = writeln!(
        out,
        "\npackets: tx {}, redirect {}, pass {}, drop {}; not forwarded by reason: {}",
        verdict("tx"),
        verdict("redirect"),
        verdict("pass"),
        verdict("drop"),
        if dropped.is_empty() {
            "none".to_owned()
        } else {
            dropped.join(", ")
        }
    );
    out
}

const COLUMNS: [&str; 13] = [
    "BACKEND",
    "STATE",
    "HEALTH",
    "WEIGHT",
    "SLOTS",
    "FLOWS",
    "IDLE",
    "NEWFLOWS/S",
    "PACKETS/S",
    "BYTES/S",
    "NEWFLOWS",
    "PACKETS",
    "BYTES",
];

fn row(out: &mut String, cells: [&str; 13]) {
    let _ = writeln!(
        out,
        "  {:<24} {:<11} {:<9} {:>6} {:>6} {:>6} {:>6} {:>11} {:>10} {:>9} {:>10} {:>9} {:>9}",
        cells[0],
        cells[1],
        cells[2],
        cells[3],
        cells[4],
        cells[5],
        cells[6],
        cells[7],
        cells[8],
        cells[9],
        cells[10],
        cells[11],
        cells[12]
    );
}

/// Seconds as "0s", "42s", "12m", "3h": how long a backend has been idle.
fn idle(seconds: f64) -> String {
    match seconds {
        s if s < 120.0 => format!("{s:.0}s"),
        s if s < 7200.0 => format!("{:.0}m", s / 60.0),
        s => format!("{:.0}h", s / 3600.0),
    }
}

/// A discovering VIP's line: where from, what the last answer said and when, what is next.
fn discovery_line(out: &mut String, vip: &VipStatus) {
    let Some(d) = &vip.discovery else {
        return;
    };
    let last = match (&d.last_result, &d.last_detail, d.last_answer_age_seconds) {
        (Some(result), Some(detail), Some(age)) => {
            format!("last answer {result} ({detail}) {age:.1}s ago")
        }
        _ => "no answer yet".to_owned(),
    };
    let _ = write!(
        out,
        "  discovery: {}, {} backends; {last}; next lookup in {:.1}s",
        d.source, d.backends, d.next_resolution_seconds
    );
    if d.failures_in_a_row > 0 {
        let _ = write!(
            out,
            "; {} failed lookups in a row, last good answer {}s ago",
            d.failures_in_a_row,
            d.last_good_age_seconds
                .map_or("never".to_owned(), |a| format!("{a:.0}"))
        );
    }
    if let Some(empty) = d.empty_for_seconds {
        let _ = write!(out, "; empty for {empty:.0}s");
    }
    out.push('\n');
}

/// Rates and totals of a backend, in the order of the columns.
fn figures(b: &BackendStatus) -> [f64; 6] {
    [
        b.rates.new_flows_per_second,
        b.rates.packets_per_second,
        b.rates.bytes_per_second,
        b.stats.new_flows as f64,
        b.stats.packets as f64,
        b.stats.bytes as f64,
    ]
}

fn vip_table(out: &mut String, vip: &VipStatus) {
    let port = vip.port.map_or("*".to_owned(), |p| p.to_string());
    let endpoint = if vip.address.contains(':') {
        format!("[{}]:{port}", vip.address)
    } else {
        format!("{}:{port}", vip.address)
    };
    let _ = write!(
        out,
        "\nVIP {}  {endpoint}/{}  {}  {}/{} healthy",
        vip.name,
        vip.protocol,
        vip.forwarding.name(),
        vip.healthy_backends,
        vip.backends.len(),
    );
    if vip.fail_open {
        out.push_str("  ALL DOWN: failing open");
    } else if vip.all_backends_down {
        out.push_str("  ALL DOWN: dropping");
    }
    if let Some(why) = &vip.not_announced_because {
        let _ = write!(out, "  NOT ANNOUNCED: {why}");
    }
    if let Some(a) = &vip.autoscale {
        let _ = write!(
            out,
            "  desired backends {} ({} {} over {}s, target {} per backend)",
            a.desired_backends,
            human(a.rate),
            a.metric.name(),
            a.window_seconds,
            a.target_per_backend,
        );
    }
    out.push('\n');
    discovery_line(out, vip);
    row(out, COLUMNS);
    let mut total = [0f64; 6];
    for b in &vip.backends {
        let values = figures(b);
        for (t, v) in total.iter_mut().zip(values) {
            *t += v;
        }
        let (weight, slots) = (b.weight.to_string(), b.slots.to_string());
        let flows = or_unknown(b.remembered_flows);
        let idle = b.last_packet_age_seconds.map_or("?".to_owned(), idle);
        let human: Vec<String> = values.iter().map(|v| human(*v)).collect();
        row(
            out,
            [
                &b.address,
                b.state.as_str(),
                b.health.state.as_str(),
                &weight,
                &slots,
                &flows,
                &idle,
                &human[0],
                &human[1],
                &human[2],
                &human[3],
                &human[4],
                &human[5],
            ],
        );
    }
    let human: Vec<String> = total.iter().map(|v| human(*v)).collect();
    row(
        out,
        [
            "total", "", "", "", "", "", "", &human[0], &human[1], &human[2], &human[3], &human[4],
            &human[5],
        ],
    );
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::{
        sample::sample_snapshot,
        status::{Attachment, DatapathStatus},
    };

    #[test]
    fn numbers_are_short() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(12.5), "12.5");
        assert_eq!(human(9999.0), "9999");
        assert_eq!(human(12345.0), "12.3K");
        assert_eq!(human(1_234_567.0), "1.2M");
        assert_eq!(human(3.2e9), "3.2G");
    }

    #[test]
    fn table_shows_every_backend_and_totals() {
        let status: serde_json::Value = serde_json::from_str(
            r#"{
            "interface": "eth0", "xdp_mode": "native", "config_generation": 3, "conn_table_entries": 42,
            "conn_table_size": 65536, "config": "/etc/balancer.toml", "hash_seed": 0,
            "datapath": { "pin_dir": null, "adopted": null, "keep_on_exit": false, "program_id": null,
                          "program_tag": null, "link_id": null, "replaced_program_id": null },
            "reloads": { "accepted": 2, "rejected": 0, "last_error": null, "last_apply_ms": 3.5 },
            "vips": [{
                "name": "web", "address": "10.0.0.100", "port": 80, "protocol": "tcp", "forwarding": "dsr",
                "hash": "five_tuple", "fragments": false, "table_size": 65537, "table_fingerprint": "00000000000000aa",
                "healthy_backends": 1, "fail_open": false, "all_backends_down": false, "all_down_episodes": 0,
                "stats": {"new_flows": 1010, "packets": 5050, "bytes": 404000},
                "rates": {"new_flows_per_second": 300.0, "packets_per_second": 1500.0, "bytes_per_second": 120000.0},
                "autoscale": { "metric": "new_flows_per_second", "rate": 300.0, "window_seconds": 60.0, "tolerance": 0.1,
                               "target_per_backend": 200.0, "desired_backends": 2, "ready_backends": 1 },
                "backends": [
                    { "address": "10.0.0.1", "state": "active", "health": {"state": "up", "probes": 9}, "weight": 1, "slots": 65537,
                      "interface": "eth0", "mac": "02:00:00:00:00:01",
                      "rates": {"new_flows_per_second": 300.0, "packets_per_second": 1500.0, "bytes_per_second": 120000.0},
                      "stats": {"new_flows": 1000, "packets": 5000, "bytes": 400000} },
                    { "address": "10.0.0.2", "state": "down", "health": {"state": "down", "probes": 9, "last_failure": "timeout"},
                      "weight": 1, "slots": 0, "interface": "eth0", "mac": "02:00:00:00:00:02",
                      "rates": {"new_flows_per_second": 0.0, "packets_per_second": 0.0, "bytes_per_second": 0.0},
                      "stats": {"new_flows": 10, "packets": 50, "bytes": 4000} }
                ]
            }],
            "outcomes": { "forwarded_tx": 5050, "not_vip": 7 },
            "verdicts": { "tx": 5050, "redirect": 0, "pass": 7, "drop": 0 }
        }"#,
        )
        .unwrap();
        let document = |value: &serde_json::Value| -> StatusDocument {
            serde_json::from_value(value.clone()).expect("a status document")
        };
        let table = render(&document(&status));
        assert!(table.contains("config generation 3, 42 flows"), "{table}");
        assert!(
            !table.contains("data plane pinned"),
            "no datapath section, no line: {table}"
        );
        let mut pinned = status.clone();
        pinned["datapath"] = json!({ "pin_dir": "/sys/fs/bpf/balancer/eth0/v1", "program_id": 7,
            "link_id": 3, "adopted": "1 of 1 pinned VIPs", "keep_on_exit": true, "program_tag": "ab",
            "replaced_program_id": null });
        assert!(render(&document(&pinned)).contains(
            "data plane pinned in /sys/fs/bpf/balancer/eth0/v1: program 7 through link 3, adopted at start; at exit: kept running"
        ));
        assert!(table.contains("VIP web  10.0.0.100:80/tcp  dsr  1/2 healthy  desired backends 2 (300 new_flows_per_second"), "{table}");
        let line = |start: &str| {
            table
                .lines()
                .find(|l| l.trim_start().starts_with(start))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            line("10.0.0.1"),
            [
                "10.0.0.1", "active", "up", "1", "65537", "?", "?", "300", "1500", "120.0K",
                "1000", "5000", "400.0K"
            ]
        );
        assert_eq!(line("10.0.0.2")[1..3], ["down", "down"]);
        // Columns line up with the header (a JSON number ignores the width it is given).
        let header = table.lines().find(|l| l.contains("BACKEND")).unwrap();
        let row = table.lines().find(|l| l.contains("10.0.0.1 ")).unwrap();
        for column in ["WEIGHT", "SLOTS", "FLOWS", "IDLE", "BYTES"] {
            let end = header.find(column).unwrap() + column.len();
            assert_ne!(&row[end - 1..end], " ", "{column}:\n{header}\n{row}");
        }
        assert_eq!(
            line("total"),
            ["total", "300", "1500", "120.0K", "1010", "5050", "404.0K"]
        );
        assert!(
            table.contains("not forwarded by reason: not_vip 7"),
            "{table}"
        );
    }

    /// The daemon's document, sent as JSON and read back as the CLI reads it, is the same
    /// document; the CLI's table shows what it says.
    #[test]
    fn the_status_document_round_trips_through_the_cli_table() {
        let attachment = Attachment {
            interface: Some("eth0".into()),
            xdp_mode: Some("native".into()),
            datapath: DatapathStatus {
                pin_dir: Some("/sys/fs/bpf/balancer/eth0/v1".into()),
                program_id: Some(41),
                program_tag: Some("00000000deadbeef".into()),
                link_id: Some(7),
                ..DatapathStatus::default()
            },
        };
        let document = StatusDocument::new(&sample_snapshot(), &attachment);
        let json = serde_json::to_string(&document).unwrap();
        let read: StatusDocument = serde_json::from_str(&json).unwrap();
        assert_eq!(read, document);

        let text = render(&read);
        check_table(&text, &read);
        check_json(&json);
    }

    #[test]
    fn a_nat_vip_brings_the_nat_line() {
        let mut document = StatusDocument::new(&sample_snapshot(), &Attachment::default());
        assert!(
            !render(&document).contains("\nNAT: "),
            "no NAT VIP, no NAT line"
        );
        document.vips[0].forwarding = crate::config::Forwarding::Nat;
        let text = render(&document);
        let line = text
            .lines()
            .find(|l| l.starts_with("NAT: "))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.starts_with(
                "NAT: 3 connections (6 IPv4 and 2 IPv6 entries, of 65536 connections per family), \
                 SNAT ports in use: 10.0.0.250 4, 2001:db8::250 1; "
            ),
            "{line}"
        );
        let created = document.nat.events["created"];
        assert!(line.contains(&format!("; {created} created, ")), "{line}");
    }

    #[test]
    fn the_defences_line_says_what_became_of_new_flows() {
        let mut document = StatusDocument::new(&sample_snapshot(), &Attachment::default());
        let line = |d: &StatusDocument| {
            let text = render(d);
            let line = text.lines().find(|l| l.starts_with("new flows: "));
            line.unwrap_or_else(|| panic!("{text}")).to_owned()
        };
        assert_eq!(
            line(&document),
            "new flows: 15 pending, 20 promoted, 30 placed without state over the cap of 25000 per \
             CPU per second, 130 over a source's limit; flood mode ON (1 so far)"
        );
        document.defence.flood_mode = false;
        assert!(line(&document).ends_with("; flood mode off (1 so far)"));
    }

    fn check_table(text: &str, read: &StatusDocument) {
        let expected_head = "balancer on eth0 (native XDP), config generation 2, 42 flows in the connection tables (of 262144 per address family)\n\
            data plane pinned in /sys/fs/bpf/balancer/eth0/v1: program 41 through link 7, created at start; at exit: removed\n";
        assert!(text.starts_with(expected_head), "{text}");
        let web = &read.vips[0];
        assert_eq!(
            (web.name.as_str(), web.healthy_backends, web.backends.len()),
            ("web", 1, 3)
        );
        assert!(
            text.contains("\nVIP web  192.0.2.1:80/tcp  dsr  1/3 healthy  desired backends "),
            "{text}"
        );
        assert!(
            text.contains("\nVIP dns  [2001:db8::53]:*/udp  dsr  2/3 healthy\n  discovery: srv _dns._udp.dns.example, 2 backends; last answer servfail (error response: SERVFAIL) "),
            "{text}"
        );
        assert!(
            text.contains("; 1 failed lookups in a row, last good answer 0s ago\n"),
            "{text}"
        );
        let row = |address: &str| -> Vec<String> {
            text.lines()
                .find(|l| l.trim_start().starts_with(&format!("{address} ")))
                .unwrap_or_else(|| panic!("no row for {address}:\n{text}"))
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        };
        // Every backend's row says what the document says.
        for vip in &read.vips {
            for b in &vip.backends {
                let cells = row(&b.address);
                assert_eq!(cells[1], b.state.as_str(), "{}", b.address);
                assert_eq!(cells[2], b.health.state.as_str(), "{}", b.address);
                assert_eq!(cells[3], b.weight.to_string());
                assert_eq!(cells[4], b.slots.to_string());
                assert_eq!(cells[5], or_unknown(b.remembered_flows));
                assert_eq!(cells[11], b.stats.packets.to_string());
            }
        }
        assert_eq!(row("10.0.0.2")[1..3], ["down", "down"]);
        assert_eq!(row("10.0.0.3")[1], "draining");
        assert_eq!(row("2001:db8::2")[1..3], ["removed", "unchecked"]);
        let reasons = text.lines().last().unwrap();
        assert!(
            reasons.starts_with(
                "packets: tx 145, redirect 120, pass 630, drop 995; not forwarded by reason: "
            ),
            "{reasons}"
        );
        assert!(
            reasons.contains(" no_backend 85,") && reasons.contains(" not_vip 30,"),
            "{reasons}"
        );
    }

    /// The JSON keeps the names the API has always used.
    fn check_json(json: &str) {
        let value: serde_json::Value = serde_json::from_str(json).unwrap();
        for key in [
            "interface",
            "xdp_mode",
            "datapath",
            "config_generation",
            "reloads",
            "conn_table_entries",
            "vips",
            "outcomes",
            "verdicts",
        ] {
            assert!(value.get(key).is_some(), "{key}");
        }
        assert_eq!(
            value["vips"][0]["backends"][1]["health"]["last_failure"],
            "timeout"
        );
        assert_eq!(
            value["vips"][1]["backends"][0]["health"],
            serde_json::json!({ "state": "unchecked", "last_failure": null })
        );
        assert_eq!(value["reloads"]["last_apply_ms"], 12.0);
    }

    #[test]
    fn a_fleet_member_shows_its_announcements_and_sync() {
        let sample = crate::api::sample::sample_snapshot();
        let attachment = crate::api::status::Attachment::default();
        let mut value = serde_json::to_value(StatusDocument::new(&sample, &attachment)).unwrap();
        assert!(!render(&serde_json::from_value(value.clone()).unwrap()).contains("announcing"));
        value["announce"] = json!({ "table": 100, "routes": ["192.0.2.1"], "withdrawn_all": false,
            "withdrawn": ["dns"], "awaiting_sync": false });
        value["vips"][1]["not_announced_because"] = json!("withdrawn by the operator");
        value["sync"] = json!({ "listen": "10.0.0.2:7946", "bulk": "complete (3 entries from 10.0.0.3:7946)",
            "entries_sent": 10, "messages_sent": 4, "send_errors": 0, "lost": 0, "entries_received": 9,
            "entries_applied": 8, "entries_kept": 1, "rejected": { "replayed": 2, "stale": 1 },
            "bulk_copies_sent": 0, "peers": [
                { "address": "10.0.0.3:7946", "last_message_age_seconds": 0.4, "lag_seconds": 0.001, "messages": 4, "entries": 9 },
                { "address": "10.0.0.4:7946", "last_message_age_seconds": null, "lag_seconds": null, "messages": 0, "entries": 0 }
            ] });
        let table = render(&serde_json::from_value(value).unwrap());
        assert!(
            table.contains("announcing 192.0.2.1 in table 100 (withdrawn by the operator: dns)\n"),
            "{table}"
        );
        assert!(
            table.contains("NOT ANNOUNCED: withdrawn by the operator"),
            "{table}"
        );
        assert!(
            table.contains("sync on 10.0.0.2:7946: 2 peers (1 silent), entries sent 10, received 9, applied 8, kept 1, rejected 3, lost 0; bulk copy complete (3 entries from 10.0.0.3:7946)"),
            "{table}"
        );
    }
}

//! `balancer status`: the status API's document as a table, in the spirit of
//! `ipvsadm -Ln --stats --rate`.

use std::fmt::Write as _;

use serde_json::Value;

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

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// The table for one status document.
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    let _ =
        writeln!(
        out,
        "balancer on {} ({} XDP), config generation {}, {} flows in the connection table (of {})",
        status["interface"].as_str().unwrap_or("?"),
        status["xdp_mode"].as_str().unwrap_or("?"),
        status["config_generation"],
        status["conn_table_entries"].as_u64().map_or("?".to_owned(), |n| n.to_string()),
        status["conn_table_size"],
    );
    let d = &status["datapath"];
    if let Some(dir) = d["pin_dir"].as_str() {
        let _ = writeln!(
            out,
            "data plane pinned in {dir}: program {} through link {}, {}; at exit: {}",
            d["program_id"],
            d["link_id"],
            if d["adopted"].is_string() {
                "adopted at start"
            } else {
                "created at start"
            },
            if d["keep_on_exit"] == true {
                "kept running"
            } else {
                "removed"
            }
        );
    }
    for vip in status["vips"].as_array().into_iter().flatten() {
        let port = vip["port"]
            .as_u64()
            .map_or("*".to_owned(), |p| p.to_string());
        let address = vip["address"].as_str().unwrap_or("?");
        let endpoint = if address.contains(':') {
            format!("[{address}]:{port}")
        } else {
            format!("{address}:{port}")
        };
        let backends = vip["backends"].as_array().map_or(0, Vec::len);
        let _ = write!(
            out,
            "\nVIP {}  {endpoint}/{}  {}  {}/{backends} healthy",
            vip["name"].as_str().unwrap_or("?"),
            vip["protocol"].as_str().unwrap_or("?"),
            vip["forwarding"].as_str().unwrap_or("?"),
            vip["healthy_backends"],
        );
        if vip["fail_open"] == true {
            out.push_str("  ALL DOWN: failing open");
        } else if vip["all_backends_down"] == true {
            out.push_str("  ALL DOWN: dropping");
        }
        let a = &vip["autoscale"];
        if !a.is_null() {
            let _ = write!(
                out,
                "  desired backends {} ({} {} over {}s, target {} per backend)",
                a["desired_backends"],
                human(num(&a["rate"])),
                a["metric"].as_str().unwrap_or("?"),
                num(&a["window_seconds"]),
                num(&a["target_per_backend"]),
            );
        }
        out.push('\n');
        let _ = writeln!(
            out,
            "  {:<24} {:<11} {:<6} {:>6} {:>6} {:>11} {:>10} {:>9} {:>10} {:>9} {:>9}",
            "BACKEND",
            "STATE",
            "HEALTH",
            "WEIGHT",
            "SLOTS",
            "NEWFLOWS/S",
            "PACKETS/S",
            "BYTES/S",
            "NEWFLOWS",
            "PACKETS",
            "BYTES"
        );
        let mut total = [0f64; 6];
        for b in vip["backends"].as_array().into_iter().flatten() {
            let values = [
                num(&b["rates"]["new_flows_per_second"]),
                num(&b["rates"]["packets_per_second"]),
                num(&b["rates"]["bytes_per_second"]),
                num(&b["stats"]["new_flows"]),
                num(&b["stats"]["packets"]),
                num(&b["stats"]["bytes"]),
            ];
            for (t, v) in total.iter_mut().zip(values) {
                *t += v;
            }
            let _ = writeln!(
                out,
                "  {:<24} {:<11} {:<6} {:>6} {:>6} {:>11} {:>10} {:>9} {:>10} {:>9} {:>9}",
                b["address"].as_str().unwrap_or("?"),
                b["state"].as_str().unwrap_or("?"),
                b["health"]["state"].as_str().unwrap_or("?"),
                b["weight"].to_string(),
                b["slots"].to_string(),
                human(values[0]),
                human(values[1]),
                human(values[2]),
                human(values[3]),
                human(values[4]),
                human(values[5]),
            );
        }
        let _ = writeln!(
            out,
            "  {:<24} {:<11} {:<6} {:>6} {:>6} {:>11} {:>10} {:>9} {:>10} {:>9} {:>9}",
            "total",
            "",
            "",
            "",
            "",
            human(total[0]),
            human(total[1]),
            human(total[2]),
            human(total[3]),
            human(total[4]),
            human(total[5]),
        );
    }
    let dropped: Vec<String> = status["outcomes"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(name, v)| !name.starts_with("forwarded") && v.as_u64().unwrap_or(0) > 0)
        .map(|(name, v)| format!("{name} {v}"))
        .collect();
    let v = &status["verdicts"];
    let _ = writeln!(
        out,
        "\npackets: tx {}, redirect {}, pass {}, drop {}; not forwarded by reason: {}",
        v["tx"],
        v["redirect"],
        v["pass"],
        v["drop"],
        if dropped.is_empty() {
            "none".to_owned()
        } else {
            dropped.join(", ")
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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
        let status = json!({
            "interface": "eth0", "xdp_mode": "native", "config_generation": 3, "conn_table_entries": 42,
            "conn_table_size": 65536,
            "vips": [{
                "name": "web", "address": "10.0.0.100", "port": 80, "protocol": "tcp", "forwarding": "dsr",
                "healthy_backends": 1, "fail_open": false, "all_backends_down": false,
                "autoscale": { "metric": "new_flows_per_second", "rate": 300.0, "window_seconds": 60.0,
                               "target_per_backend": 200.0, "desired_backends": 2 },
                "backends": [
                    { "address": "10.0.0.1", "state": "active", "health": {"state": "up"}, "weight": 1, "slots": 65537,
                      "rates": {"new_flows_per_second": 300.0, "packets_per_second": 1500.0, "bytes_per_second": 120000.0},
                      "stats": {"new_flows": 1000, "packets": 5000, "bytes": 400000} },
                    { "address": "10.0.0.2", "state": "down", "health": {"state": "down"}, "weight": 1, "slots": 0,
                      "rates": {"new_flows_per_second": 0.0, "packets_per_second": 0.0, "bytes_per_second": 0.0},
                      "stats": {"new_flows": 10, "packets": 50, "bytes": 4000} }
                ]
            }],
            "outcomes": { "forwarded_tx": 5050, "not_vip": 7 },
            "verdicts": { "tx": 5050, "redirect": 0, "pass": 7, "drop": 0 }
        });
        let table = render(&status);
        assert!(table.contains("config generation 3, 42 flows"), "{table}");
        assert!(
            !table.contains("data plane pinned"),
            "no datapath section, no line: {table}"
        );
        let mut pinned = status.clone();
        pinned["datapath"] = json!({ "pin_dir": "/sys/fs/bpf/balancer/eth0/v1", "program_id": 7,
            "link_id": 3, "adopted": "1 of 1 pinned VIPs", "keep_on_exit": true });
        assert!(render(&pinned).contains(
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
                "10.0.0.1", "active", "up", "1", "65537", "300", "1500", "120.0K", "1000", "5000",
                "400.0K"
            ]
        );
        assert_eq!(line("10.0.0.2")[1..3], ["down", "down"]);
        // Columns line up with the header (a JSON number ignores the width it is given).
        let header = table.lines().find(|l| l.contains("BACKEND")).unwrap();
        let row = table.lines().find(|l| l.contains("10.0.0.1 ")).unwrap();
        for column in ["WEIGHT", "SLOTS", "BYTES"] {
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
}

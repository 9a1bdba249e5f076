//! What changed between two configs: the summary a reload logs, and the settings that only a
//! restart can change.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use crate::config::model::{BackendConfig, Config, Vip};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    VipAdded(String),
    VipRemoved(String),
    /// Address, port, protocol, table size, all-down behaviour or health check.
    VipChanged {
        vip: String,
        what: &'static str,
    },
    BackendAdded {
        vip: String,
        address: IpAddr,
    },
    BackendRemoved {
        vip: String,
        address: IpAddr,
    },
    Reweighted {
        vip: String,
        address: IpAddr,
        from: u32,
        to: u32,
    },
    Drained {
        vip: String,
        address: IpAddr,
    },
    Undrained {
        vip: String,
        address: IpAddr,
    },
    HealthCheckChanged {
        vip: String,
        address: IpAddr,
    },
    RemovalGrace,
    ReloadSettle,
    NatTimeouts,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::VipAdded(v) => write!(f, "VIP {v} added"),
            Change::VipRemoved(v) => write!(f, "VIP {v} removed"),
            Change::VipChanged { vip, what } => write!(f, "VIP {vip}: {what} changed"),
            Change::BackendAdded { vip, address } => write!(f, "VIP {vip}: +{address}"),
            Change::BackendRemoved { vip, address } => write!(f, "VIP {vip}: -{address}"),
            Change::Reweighted {
                vip,
                address,
                from,
                to,
            } => write!(f, "VIP {vip}: {address} weight {from}->{to}"),
            Change::Drained { vip, address } => write!(f, "VIP {vip}: {address} draining"),
            Change::Undrained { vip, address } => {
                write!(f, "VIP {vip}: {address} no longer draining")
            }
            Change::HealthCheckChanged { vip, address } => {
                write!(f, "VIP {vip}: {address} health check changed")
            }
            Change::RemovalGrace => f.write_str("removal_grace changed"),
            Change::ReloadSettle => f.write_str("reload_settle changed"),
            Change::NatTimeouts => f.write_str("nat_timeouts changed"),
        }
    }
}

/// Settings the running data plane cannot take without a restart, by config key.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old.interface != new.interface {
        keys.push("interface");
    }
    if old.xdp_mode != new.xdp_mode {
        keys.push("xdp_mode");
    }
    if old.hash_seed != new.hash_seed {
        keys.push("hash_seed");
    }
    if old.conn_table_size != new.conn_table_size {
        keys.push("conn_table_size");
    }
    if old.nat.table_size != new.nat.table_size {
        keys.push("nat_table_size");
    }
    if old.flood.pending_table_size != new.flood.pending_table_size {
        keys.push("flood pending_table_size");
    }
    if old.metrics_listen != new.metrics_listen {
        keys.push("metrics_listen");
    }
    if old.pin_dir != new.pin_dir {
        keys.push("pin_dir");
    }
    // The status API's accept loop takes its limits once, when it starts.
    if old.api_max_connections != new.api_max_connections {
        keys.push("api_max_connections");
    }
    if old.api_idle_timeout != new.api_idle_timeout {
        keys.push("api_idle_timeout");
    }
    // The route writer and the sync's socket, key and peers are set up once, at start.
    if old.announce != new.announce {
        keys.push("announce");
    }
    if old.sync != new.sync {
        keys.push("sync");
    }
    keys
}

/// The changes from `old` to `new`, VIPs in the new config's order, removed ones last.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut changes = Vec::new();
    let old_vips: BTreeMap<&str, &Vip> = old.vips.iter().map(|v| (v.name.as_str(), v)).collect();
    for vip in &new.vips {
        let Some(before) = old_vips.get(vip.name.as_str()) else {
            changes.push(Change::VipAdded(vip.name.clone()));
            continue;
        };
        let name = || vip.name.clone();
        for (what, differs) in [
            ("address", before.address != vip.address),
            ("port", before.port != vip.port),
            ("protocol", before.protocol != vip.protocol),
            ("table_size", before.table_size != vip.table_size),
            ("when_all_down", before.when_all_down != vip.when_all_down),
            ("forwarding", before.forwarding != vip.forwarding),
            ("snat", before.nat != vip.nat),
            ("hash", before.hash != vip.hash),
            ("fragments", before.fragments != vip.fragments),
            (
                "tunnel_source",
                (before.tunnel_source_v4, before.tunnel_source_v6)
                    != (vip.tunnel_source_v4, vip.tunnel_source_v6),
            ),
            ("autoscale", before.autoscale != vip.autoscale),
            ("discover", before.discover != vip.discover),
        ] {
            if differs {
                changes.push(Change::VipChanged { vip: name(), what });
            }
        }
        backend_changes(before, vip, &mut changes);
    }
    for vip in &old.vips {
        if !new.vips.iter().any(|n| n.name == vip.name) {
            changes.push(Change::VipRemoved(vip.name.clone()));
        }
    }
    if old.removal_grace != new.removal_grace {
        changes.push(Change::RemovalGrace);
    }
    if old.reload_settle != new.reload_settle {
        changes.push(Change::ReloadSettle);
    }
    let timeouts = |c: &Config| crate::config::model::NatGlobal {
        table_size: 0,
        ..c.nat
    };
    if timeouts(old) != timeouts(new) {
        changes.push(Change::NatTimeouts);
    }
    changes
}

/// The changes of a VIP's backends.
fn backend_changes(before: &Vip, vip: &Vip, changes: &mut Vec<Change>) {
    let name = || vip.name.clone();
    let old_backends: BTreeMap<IpAddr, &BackendConfig> =
        before.backends.iter().map(|b| (b.address, b)).collect();
    for b in &vip.backends {
        let address = b.address;
        let Some(was) = old_backends.get(&address) else {
            changes.push(Change::BackendAdded {
                vip: name(),
                address,
            });
            continue;
        };
        if was.weight != b.weight {
            changes.push(Change::Reweighted {
                vip: name(),
                address,
                from: was.weight,
                to: b.weight,
            });
        }
        match (was.drain, b.drain) {
            (false, true) => changes.push(Change::Drained {
                vip: name(),
                address,
            }),
            (true, false) => changes.push(Change::Undrained {
                vip: name(),
                address,
            }),
            _ => {}
        }
        if was.port != b.port {
            changes.push(Change::VipChanged {
                vip: name(),
                what: "backend port",
            });
        }
        if was.health != b.health {
            changes.push(Change::HealthCheckChanged {
                vip: name(),
                address,
            });
        }
    }
    for b in &before.backends {
        if !vip.backends.iter().any(|n| n.address == b.address) {
            changes.push(Change::BackendRemoved {
                vip: name(),
                address: b.address,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse;

    const BASE: &str = r#"
[balancer]
interface = "eth0"
[[vip]]
name = "web"
address = "192.0.2.1"
port = 80
protocol = "tcp"
forwarding = "dsr"
backends = [{ address = "10.0.0.1", weight = 2 }, { address = "10.0.0.2" }, { address = "10.0.0.3" }]
[[vip]]
name = "old"
address = "192.0.2.2"
port = 80
protocol = "tcp"
forwarding = "dsr"
backends = [{ address = "10.0.0.9" }]
"#;

    fn config(text: &str) -> Config {
        parse(Path::new("t.toml"), text).unwrap()
    }

    #[test]
    fn discovery_hash_and_autoscale_changes_are_reported() {
        let new = BASE.replacen(
            "forwarding = \"dsr\"\n",
            "forwarding = \"dsr\"\nhash = \"dst_port_only\"\ndiscover = { dns = \"web.test\" }\n\
             autoscale = { metric = \"new_flows_per_second\", target_per_backend = 10 }\n",
            1,
        );
        let changes: Vec<String> = diff(&config(BASE), &config(&new))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            changes,
            [
                "VIP web: hash changed",
                "VIP web: autoscale changed",
                "VIP web: discover changed"
            ]
        );
    }

    #[test]
    fn no_change_no_diff() {
        assert_eq!(diff(&config(BASE), &config(BASE)), vec![]);
        assert!(needs_restart(&config(BASE), &config(BASE)).is_empty());
    }

    #[test]
    fn every_kind_of_change_is_reported() {
        let new = BASE
            .replace("{ address = \"10.0.0.1\", weight = 2 }", "{ address = \"10.0.0.1\", weight = 5 }")
            .replace("{ address = \"10.0.0.2\" }", "{ address = \"10.0.0.2\", drain = true }")
            .replace(
                "{ address = \"10.0.0.3\" }]",
                "{ address = \"10.0.0.4\", health = { kind = \"none\" } }]\nhealth = { interval = \"5s\" }",
            )
            .replace("name = \"old\"", "name = \"new\"")
            .replace("[balancer]\n", "[balancer]\nremoval_grace = \"1m\"\n");
        let changes: Vec<String> = diff(&config(BASE), &config(&new))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            changes,
            [
                "VIP web: 10.0.0.1 weight 2->5",
                "VIP web: 10.0.0.1 health check changed",
                "VIP web: 10.0.0.2 draining",
                "VIP web: 10.0.0.2 health check changed",
                "VIP web: +10.0.0.4",
                "VIP web: -10.0.0.3",
                "VIP new added",
                "VIP old removed",
                "removal_grace changed",
            ]
        );
    }

    #[test]
    fn vip_settings_and_undrain() {
        let drained = BASE.replace(
            "{ address = \"10.0.0.2\" }",
            "{ address = \"10.0.0.2\", drain = true }",
        );
        let moved = drained
            .replace("port = 80\nprotocol = \"tcp\"\nforwarding = \"dsr\"\nbackends = [{ address = \"10.0.0.1\"", "port = 8080\nprotocol = \"tcp\"\nforwarding = \"dsr\"\nwhen_all_down = \"drop\"\ntable_size = 251\nbackends = [{ address = \"10.0.0.1\"")
            .replace(", drain = true", "");
        let changes: Vec<String> = diff(&config(&drained), &config(&moved))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            changes,
            [
                "VIP web: port changed",
                "VIP web: table_size changed",
                "VIP web: when_all_down changed",
                // The default health check probes the VIP's port, so it moved too.
                "VIP web: 10.0.0.1 health check changed",
                "VIP web: 10.0.0.2 no longer draining",
                "VIP web: 10.0.0.2 health check changed",
                "VIP web: 10.0.0.3 health check changed",
            ]
        );
    }

    #[test]
    fn nat_changes_are_reported() {
        let nat = BASE.replacen(
            "forwarding = \"dsr\"",
            "forwarding = \"nat\"\nsnat = \"10.0.0.250\"",
            1,
        );
        let changes = |from: &str, to: &str| -> Vec<String> {
            diff(&config(from), &config(to))
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(
            changes(BASE, &nat),
            ["VIP web: forwarding changed", "VIP web: snat changed"]
        );
        let other_snat = nat.replace("10.0.0.250", "10.0.0.251");
        assert_eq!(changes(&nat, &other_snat), ["VIP web: snat changed"]);
        let ported = nat.replace(
            "{ address = \"10.0.0.2\" }",
            "{ address = \"10.0.0.2\", port = 8080 }",
        );
        // The health check follows the backend's port.
        assert_eq!(
            changes(&nat, &ported),
            [
                "VIP web: backend port changed",
                "VIP web: 10.0.0.2 health check changed"
            ]
        );
        let timeouts = nat.replace(
            "[balancer]\n",
            "[balancer]\nnat_timeouts = { udp = \"5s\" }\n",
        );
        assert_eq!(changes(&nat, &timeouts), ["nat_timeouts changed"]);
        assert!(needs_restart(&config(&nat), &config(&timeouts)).is_empty());
    }

    #[test]
    fn settings_that_need_a_restart() {
        let new = BASE.replace(
            "interface = \"eth0\"",
            "interface = \"eth1\"\nxdp_mode = \"generic\"\nhash_seed = 9\nconn_table_size = 2048\nnat_table_size = 2048\nmetrics_listen = \"127.0.0.1:1\"\n\
             pin_dir = \"/run/bpf\"\nkeep_datapath = true\napi_max_connections = 8\napi_idle_timeout = \"1s\"",
        );
        assert_eq!(
            needs_restart(&config(BASE), &config(&new)),
            [
                "interface",
                "xdp_mode",
                "hash_seed",
                "conn_table_size",
                "nat_table_size",
                // Its default is a quarter of conn_table_size.
                "flood pending_table_size",
                "metrics_listen",
                "pin_dir",
                "api_max_connections",
                "api_idle_timeout"
            ]
        );
    }
}

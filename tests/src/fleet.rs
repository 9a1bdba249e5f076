//! A fleet lab: the fleet topology (`topology::FleetTopology`) with an HTTP server on every
//! backend and the real `balancer` daemon on every balancer, each with its own config file,
//! pin directory and log; long paced downloads through the VIP; a balancer lost mid-transfer.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    http::{download_digest_paced, get_json, HttpServer},
    netns::{remove_stale, require_root},
    process::BalancerProcess,
    scratch::Scratch,
    topology::{fleet_backend_addr, FleetTopology, FLEET_VIP_ADDR},
};

/// Every balancer's status API, inside its own namespace.
pub const FLEET_API: &str = "127.0.0.1:9100";
/// Long-lived streams of a test: 100 KB at 20 KB/s, about 5 s each.
pub const STREAMS: usize = 200;
pub const STREAM_BYTES: u64 = 100_000;
pub const STREAM_RATE: usize = 20_000;

pub fn api() -> SocketAddr {
    FLEET_API.parse().unwrap()
}

/// The `[balancer]` table and the VIP over the first `backends` backends, and `extra` (more
/// tables) after them.
pub fn fleet_config(backends: usize, extra: &str) -> String {
    let list: Vec<String> = (0..backends)
        .map(|i| format!("{{ address = \"{}\" }}", fleet_backend_addr(i)))
        .collect();
    format!(
        r#"
[balancer]
interface = "eth0"
hash_seed = "0x5eed"
metrics_listen = "{FLEET_API}"
[[vip]]
name = "web"
address = "{FLEET_VIP_ADDR}"
port = 80
protocol = "tcp"
forwarding = "dsr"
health = {{ kind = "tcp", interval = "500ms", timeout = "250ms", rise = 1 }}
backends = [{}]
{extra}
"#,
        list.join(", ")
    )
}

/// Dropped in order: daemons, servers, namespaces, files.
pub struct FleetLab {
    pub balancers: Vec<Option<BalancerProcess>>,
    _servers: Vec<HttpServer>,
    pub topology: FleetTopology,
    /// Each balancer's config file.
    pub configs: Vec<PathBuf>,
    pub runs: Vec<Scratch>,
    pub scratch: Scratch,
    /// The router learns the VIP by BGP (else the test programs its nexthop group).
    bgp: bool,
}

impl FleetLab {
    /// `balancers` balancers behind the router (a nexthop group, or BIRD with `bgp`), four
    /// backends with servers; balancer `i` runs `config(i, key_file)` (its file in the
    /// scratch dir; `key_file`: a sync key, 32 random bytes), with `args` on its command line.
    pub fn new(
        name: &str,
        balancers: usize,
        bgp: bool,
        config: impl Fn(usize, &std::path::Path) -> String,
        args: &[&str],
    ) -> FleetLab {
        require_root("the fleet tests");
        remove_stale("lbt-");
        let prefix = format!("lbt-{}-{name}-", std::process::id());
        let scratch = Scratch::new(&prefix, "fleet");
        let topology = if bgp {
            FleetTopology::create_bgp(&prefix, balancers, 4, 7)
        } else {
            FleetTopology::create(&prefix, balancers, 4, 7)
        };
        let servers = topology.start_http_servers(|i| fleet_backend_addr(i).to_string());
        let key = random_key();
        let key_file = scratch.write_atomically("sync.key", &key);
        std::fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod 600 the key");
        let configs: Vec<PathBuf> = (0..balancers)
            .map(|i| scratch.write_atomically(&format!("lb{}.toml", i + 1), &config(i, &key_file)))
            .collect();
        // Each balancer its own pin directory (the namespaces share one bpffs) and logs.
        let runs: Vec<Scratch> = (0..balancers)
            .map(|i| Scratch::named(&format!("{prefix}{}-lb{}", std::process::id(), i + 1)))
            .collect();
        let mut lab = FleetLab {
            balancers: Vec::new(),
            _servers: servers,
            topology,
            configs,
            runs,
            scratch,
            bgp,
        };
        for i in 0..balancers {
            let b = lab.start(i, args);
            lab.balancers.push(Some(b));
        }
        lab
    }

    /// Starts balancer `i`'s daemon (again) and waits until its API answers.
    pub fn start(&self, i: usize, args: &[&str]) -> BalancerProcess {
        let ns = &self.topology.balancers[i];
        let mut b = BalancerProcess::run(ns, &self.configs[i], &self.runs[i], args, "balancer.log");
        b.wait_ready(ns, api(), Duration::from_secs(30));
        b
    }

    pub fn status(&self, i: usize) -> Value {
        get_json(&self.topology.balancers[i], api(), "/api/v1/status").expect("status API")
    }

    /// Waits until every running balancer has `healthy` backends up.
    pub fn wait_healthy(&self, healthy: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let running: Vec<usize> = (0..self.balancers.len())
            .filter(|i| self.balancers[*i].is_some())
            .collect();
        while running
            .iter()
            .any(|i| self.status(*i)["vips"][0]["healthy_backends"] != healthy)
        {
            assert!(Instant::now() < deadline, "{:#}", self.status(running[0]));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Flows balancer `i` placed so far.
    pub fn new_flows(&self, i: usize) -> u64 {
        self.status(i)["vips"][0]["stats"]["new_flows"]
            .as_u64()
            .unwrap()
    }

    /// Balancer `i` lost: daemon killed, link down, and (without BGP) the router's group
    /// without it, as a BGP withdrawal or a lost session would leave it.
    pub fn lose(&mut self, i: usize) {
        self.balancers[i].take().unwrap().signal(libc::SIGKILL);
        self.topology.balancers[i].ip(&["link", "set", "eth0", "down"]);
        if !self.bgp {
            let others: Vec<usize> = (0..self.topology.balancers.len())
                .filter(|j| *j != i)
                .collect();
            self.topology.route_over(&others);
        }
    }

    /// `STREAMS` paced downloads of `bytes` from source ports `first_port`...; each thread's
    /// result (the sha256 of what arrived, or why the stream broke).
    pub fn streams(
        &self,
        first_port: u16,
        bytes: u64,
    ) -> Vec<std::thread::JoinHandle<Result<String, String>>> {
        let to: SocketAddr = SocketAddrV4::new(FLEET_VIP_ADDR, 80).into();
        (0..STREAMS as u16)
            .map(|i| {
                self.topology.client.spawn(move || {
                    download_digest_paced(to, first_port + i, bytes, Some(STREAM_RATE))
                })
            })
            .collect()
    }

    /// `balancer ARGS --config <balancer i's> --pin-dir <its>` in balancer `i`'s namespace
    /// (`withdraw`, `announce`): its output, and whether it succeeded.
    pub fn cli(&self, i: usize, args: &[&str]) -> (bool, String) {
        let config = self.configs[i].display().to_string();
        let pin_dir = self.runs[i].pin_dir_arg();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", &config, "--pin-dir", &pin_dir]);
        let binary = crate::process::balancer_binary();
        let out = self.topology.balancers[i]
            .command(&binary.display().to_string())
            .args(&all)
            .output()
            .expect("runs the balancer binary");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// The VIP routes in balancer `i`'s announce table (100), as `ip route` prints them.
    pub fn announced_routes(&self, i: usize) -> String {
        let out = self.topology.balancers[i].ip(&["route", "show", "table", "100"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops every daemon that still runs (SIGTERM: each withdraws and detaches).
    pub fn stop_all(&mut self) {
        for b in self.balancers.iter_mut().filter_map(Option::take) {
            let mut b = b;
            b.stop();
        }
    }
}

/// 32 random printable characters (from /dev/urandom: this crate has no generator of its
/// own), a sync key.
fn random_key() -> String {
    let chars = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").expect("/dev/urandom"),
        &mut bytes,
    )
    .expect("32 random bytes");
    bytes
        .iter()
        .map(|b| chars[usize::from(*b) % chars.len()] as char)
        .collect()
}

/// `[announce]` (table 100, 1 s withdraw wait) and `[sync]` for balancer `i` of
/// `balancers`: listening on its address, its peers the others.
pub fn fleet_tables(i: usize, balancers: usize, key_file: &std::path::Path) -> String {
    let peers: Vec<String> = (0..balancers)
        .filter(|j| *j != i)
        .map(|j| format!("\"{}:7946\"", crate::topology::fleet_balancer_addr(j)))
        .collect();
    format!(
        "[announce]\ntable = 100\nwithdraw_wait = \"1s\"\n[sync]\nlisten = \"{}:7946\"\npeers = [{}]\nkey_file = \"{}\"\n",
        crate::topology::fleet_balancer_addr(i),
        peers.join(", "),
        key_file.display()
    )
}

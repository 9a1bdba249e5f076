//! `balancer`: an XDP layer-4 load balancer.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use balancer::{config, daemon};

#[derive(Parser)]
#[command(
    name = "balancer",
    version,
    about = "An XDP layer-4 load balancer",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to an interface and balance the configured VIPs until SIGINT/SIGTERM.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Interface to attach to (overrides `interface` in the config).
        #[arg(long, short)]
        interface: Option<String>,
        /// At SIGTERM/SIGINT, leave the data plane forwarding with its last state, for a
        /// restart or an upgrade (the config's `keep_datapath = true` does the same). The next
        /// `balancer run` adopts it; `balancer detach` removes it.
        #[arg(long)]
        keep_datapath: bool,
        /// If the pinned data plane cannot be adopted (another map layout, another
        /// conn_table_size), replace it with a fresh one instead of refusing to start: the
        /// connection table starts empty and established flows are placed again.
        #[arg(long)]
        replace: bool,
        /// Where maps and the XDP link are pinned (overrides `pin_dir` in the config).
        #[arg(long, value_name = "DIR")]
        pin_dir: Option<PathBuf>,
        /// Load the XDP program from this object file instead of the built-in one (a patched
        /// program with the same map layout; checked against the pinned maps).
        #[arg(long, value_name = "FILE")]
        program_object: Option<PathBuf>,
    },
    /// Remove a data plane left running (by --keep-datapath or a crash) from an interface:
    /// detach its program and remove its pins. Refused while a daemon runs on it.
    Detach {
        /// The interface.
        #[arg(long, short)]
        interface: String,
        /// The config file, for its `pin_dir`.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The pin directory (default: the config's, else /sys/fs/bpf/balancer).
        #[arg(long, value_name = "DIR")]
        pin_dir: Option<PathBuf>,
    },
    /// Hold a trivial XDP_PASS program on an interface until SIGINT/SIGTERM.
    ///
    /// A veth delivers frames sent into it with XDP_TX or XDP_REDIRECT only if its peer has
    /// an XDP program; run this on the peer of a veth the balancer is attached to (or
    /// redirects to) when that peer has none.
    XdpPass {
        /// The interface (the veth peer).
        #[arg(long, short)]
        interface: String,
    },
    /// On a backend of a tunnel-mode VIP without a kernel ipip/ip6tnl device: strip the outer
    /// header of tunnel packets to this interface's addresses and pass the inner packet to the
    /// local stack, until SIGINT/SIGTERM.
    Decap {
        /// The interface tunnel packets arrive on.
        #[arg(long, short)]
        interface: String,
        /// auto (native, else generic), native or generic.
        #[arg(long, default_value = "auto", value_parser = parse_mode)]
        xdp_mode: config::XdpModeSetting,
    },
    /// Show what the running daemon does: every VIP and backend, state, weight, rates and
    /// totals (from its status API).
    Status {
        /// The config file the daemon runs with, to find its API address (`metrics_listen`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The daemon's API address, if not taken from the config.
        #[arg(long)]
        api: Option<std::net::SocketAddr>,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every SECONDS (default 2) until interrupted.
        #[arg(long, num_args = 0..=1, default_missing_value = "2", value_name = "SECONDS")]
        watch: Option<f64>,
    },
    /// Ask the running daemon to reload its config file now, and report whether it was
    /// accepted (exit status 0) or rejected (1, with the reason).
    Reload {
        /// The config file the daemon runs with, to find its API address (`metrics_listen`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The daemon's API address, if not taken from the config.
        #[arg(long)]
        api: Option<std::net::SocketAddr>,
    },
    /// Validate a config file without touching the kernel (no root needed).
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run {
            config,
            interface,
            keep_datapath,
            replace,
            pin_dir,
            program_object,
        } => run_async(daemon::run(daemon::RunOptions {
            config,
            interface,
            keep_datapath,
            replace,
            pin_dir,
            program_object,
        })),
        Command::Detach {
            interface,
            config,
            pin_dir,
        } => detach(&interface, config.as_deref(), pin_dir),
        Command::XdpPass { interface } => run_async(daemon::xdp_pass(interface)),
        Command::Reload { config, api } => reload(config.as_deref(), api),
        Command::Status {
            config,
            api,
            json,
            watch,
        } => status(config.as_deref(), api, json, watch),
        Command::Decap {
            interface,
            xdp_mode,
        } => run_async(daemon::decap(interface, xdp_mode)),
    }
}

fn detach(
    interface: &str,
    config_path: Option<&std::path::Path>,
    pin_dir: Option<PathBuf>,
) -> ExitCode {
    let pin_dir = match (pin_dir, config_path) {
        (Some(dir), _) => dir,
        (None, Some(path)) => match config::load(path) {
            Ok(c) => c.pin_dir,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => PathBuf::from(config::DEFAULT_PIN_DIR),
    };
    match daemon::detach(&pin_dir, interface) {
        Ok(report) => {
            for line in report {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(c) => {
            let backends: usize = c.vips.iter().map(|v| v.backends.len()).sum();
            println!(
                "{}: OK, {} VIPs, {backends} backends",
                path.display(),
                c.vips.len()
            );
            for vip in &c.vips {
                let active = vip.backends.iter().filter(|b| b.takes_new_flows()).count();
                let checks = match vip.backends.first().map(|b| &b.health) {
                    Some(h) if h.kind != config::CheckKind::None => {
                        format!(
                            "{} checks of port {} every {:?}",
                            h.kind.name(),
                            h.port,
                            h.interval
                        )
                    }
                    _ => "no health checks".to_owned(),
                };
                println!(
                    "  {:<16} {:<24} {} backends ({active} taking new flows), table {} slots, {checks}",
                    vip.name,
                    vip.endpoint(),
                    vip.backends.len(),
                    vip.table_size
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_mode(text: &str) -> Result<config::XdpModeSetting, String> {
    match text {
        "auto" => Ok(config::XdpModeSetting::Auto),
        "native" => Ok(config::XdpModeSetting::Native),
        "generic" => Ok(config::XdpModeSetting::Generic),
        _ => Err(format!("{text:?}: use auto, native or generic")),
    }
}

/// The daemon's API address: `--api`, else `metrics_listen` of `--config` (read leniently: the
/// file may be the invalid config the daemon is about to reject), else the default.
fn api_address(
    config_path: Option<&std::path::Path>,
    api: Option<std::net::SocketAddr>,
) -> anyhow::Result<std::net::SocketAddr> {
    Ok(match (api, config_path) {
        (Some(api), _) => api,
        (None, Some(path)) => config::metrics_listen_of(path)?,
        (None, None) => config::DEFAULT_METRICS_LISTEN
            .parse()
            .expect("valid default"),
    })
}

fn status(
    config_path: Option<&std::path::Path>,
    api: Option<std::net::SocketAddr>,
    json: bool,
    watch: Option<f64>,
) -> ExitCode {
    let address = match api_address(config_path, api) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    loop {
        let answer = balancer::client::request(
            address,
            "GET",
            "/api/v1/status",
            std::time::Duration::from_secs(10),
        );
        let document = answer.and_then(|(code, body)| {
            anyhow::ensure!(code == 200, "the status API answered {code}: {body}");
            Ok(serde_json::from_str::<serde_json::Value>(&body)?)
        });
        let document = match document {
            Ok(d) => d,
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        let text = if json {
            serde_json::to_string_pretty(&document).expect("JSON")
        } else {
            balancer::status_table::render(&document)
        };
        match watch {
            None => {
                println!("{text}");
                return ExitCode::SUCCESS;
            }
            Some(seconds) => {
                // Clear the screen and redraw from the top.
                print!("\x1b[H\x1b[2J{text}");
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                std::thread::sleep(std::time::Duration::from_secs_f64(seconds.max(0.2)));
            }
        }
    }
}

fn reload(config_path: Option<&std::path::Path>, api: Option<std::net::SocketAddr>) -> ExitCode {
    let address = match api_address(config_path, api) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let answer = balancer::client::request(
        address,
        "POST",
        "/api/v1/reload",
        std::time::Duration::from_secs(70),
    );
    let (code, body) = match answer {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    if code == 200 && json["accepted"] == true {
        let changes: Vec<&str> = json["changes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str())
            .collect();
        if changes.is_empty() {
            println!(
                "reload accepted (generation {}): no changes",
                json["generation"]
            );
        } else {
            println!("reload accepted (generation {}):", json["generation"]);
            for change in changes {
                println!("  {change}");
            }
        }
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "reload rejected: {}",
            json["error"].as_str().unwrap_or(&body)
        );
        ExitCode::FAILURE
    }
}

fn run_async(task: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

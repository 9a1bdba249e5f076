//! The command line of `balancer`: the subcommands, their flags, and how each one runs (a
//! daemon logs, a client prints).

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{
    config::XdpModeSetting,
    daemon::{
        startup::RunOptions,
        subcommands::{self, Target},
    },
};

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
        /// Start with every VIP withdrawn (the config's `[announce]` routes are not written)
        /// until `balancer announce`: a balancer brought up for checking before it takes
        /// traffic.
        #[arg(long)]
        withdrawn: bool,
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
        xdp_mode: XdpModeSetting,
    },
    /// Show what the running daemon does: every VIP and backend, state, weight, rates and
    /// totals (from its read-only status API).
    Status {
        /// The config file the daemon runs with, to find its API address (`metrics_listen`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The daemon's API address, if not taken from the config.
        #[arg(long)]
        api: Option<SocketAddr>,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
        /// Refresh every SECONDS (default 2) until interrupted.
        #[arg(long, num_args = 0..=1, default_missing_value = "2", value_name = "SECONDS")]
        watch: Option<f64>,
    },
    /// Ask the running daemon, through its control socket, to reload its config file now, and
    /// report whether it was accepted (exit status 0) or rejected (1, with the reason).
    Reload {
        /// The config file the daemon runs with: its `control_socket`, else its `interface`
        /// and `pin_dir`, name the socket.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The daemon's interface (overrides the config's).
        #[arg(long, short)]
        interface: Option<String>,
        /// The daemon's pin directory (overrides the config's), if it was started with one.
        #[arg(long, value_name = "DIR")]
        pin_dir: Option<PathBuf>,
        /// The control socket itself.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Gone: reloads no longer go through the HTTP API (a clear error instead of clap's).
        #[arg(long, hide = true, value_name = "ADDR")]
        api: Option<String>,
    },
    /// Take this balancer out of rotation: withdraw the route of every VIP (or of one) from
    /// the `[announce]` table, so that the BGP speaker withdraws it from the router. Flows
    /// already here are still forwarded. Lasts until `balancer announce` or a restart.
    Withdraw {
        #[command(flatten)]
        target: SocketTarget,
        /// Only this VIP (by name); without it, every VIP, also those added later.
        #[arg(long, value_name = "NAME")]
        vip: Option<String>,
    },
    /// Put this balancer back into rotation: announce again every VIP (or one) that it can
    /// serve.
    Announce {
        #[command(flatten)]
        target: SocketTarget,
        /// Only this VIP (by name).
        #[arg(long, value_name = "NAME")]
        vip: Option<String>,
    },
    /// Validate a config file without touching the kernel (no root needed); VIPs that
    /// discover their backends are resolved once, to show what they would get.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Do not resolve discovery names (a host without the service's DNS, such as CI).
        #[arg(long)]
        no_resolve: bool,
    },
}

/// How a command finds the daemon's control socket.
#[derive(clap::Args)]
struct SocketTarget {
    /// The config file the daemon runs with: its `control_socket`, else its `interface` and
    /// `pin_dir`, name the socket.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The daemon's interface (overrides the config's).
    #[arg(long, short)]
    interface: Option<String>,
    /// The daemon's pin directory (overrides the config's), if it was started with one.
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// The control socket itself.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

impl SocketTarget {
    fn target(self) -> Target {
        Target {
            config: self.config,
            interface: self.interface,
            pin_dir: self.pin_dir,
            socket: self.socket,
            api: None,
        }
    }
}

/// Parses the command line and runs the subcommand.
pub fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check { config, no_resolve } => {
            print_lines(subcommands::check(&config, !no_resolve))
        }
        Command::Run {
            config,
            interface,
            keep_datapath,
            replace,
            pin_dir,
            program_object,
            withdrawn,
        } => run_async(
            true,
            crate::daemon::run(RunOptions {
                config,
                interface,
                keep_datapath,
                replace,
                pin_dir,
                program_object,
                withdrawn,
            }),
        ),
        Command::Withdraw { target, vip } => operator(target.target(), vip, true),
        Command::Announce { target, vip } => operator(target.target(), vip, false),
        Command::Detach {
            interface,
            config,
            pin_dir,
        } => {
            let target = Target {
                config,
                pin_dir,
                ..Target::default()
            };
            print_lines(subcommands::detach(&target, &interface))
        }
        Command::XdpPass { interface } => run_async(true, subcommands::xdp_pass(interface)),
        Command::Decap {
            interface,
            xdp_mode,
        } => run_async(true, subcommands::decap(interface, xdp_mode)),
        Command::Status {
            config,
            api,
            json,
            watch,
        } => {
            let target = Target {
                config,
                api,
                ..Target::default()
            };
            run_async(false, async move {
                subcommands::status(&target, json, watch).await
            })
        }
        Command::Reload { api: Some(_), .. } => {
            eprintln!(
                "error: `balancer reload` no longer uses the HTTP API, which serves reads only: it \
                 talks to the daemon's control socket. Give --config (and --interface, --pin-dir \
                 as `balancer run` got them), or --socket"
            );
            ExitCode::FAILURE
        }
        Command::Reload {
            config,
            interface,
            pin_dir,
            socket,
            api: None,
        } => reload(Target {
            config,
            interface,
            pin_dir,
            socket,
            api: None,
        }),
    }
}

/// `balancer withdraw` and `balancer announce`.
fn operator(target: Target, vip: Option<String>, withdraw: bool) -> ExitCode {
    let runtime = runtime();
    match runtime.block_on(subcommands::operator(&target, vip, withdraw)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn reload(target: Target) -> ExitCode {
    let runtime = runtime();
    match runtime.block_on(subcommands::reload(&target)) {
        Ok((accepted, lines)) => {
            for line in lines {
                if accepted {
                    println!("{line}");
                } else {
                    eprintln!("{line}");
                }
            }
            if accepted {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_lines(lines: anyhow::Result<Vec<String>>) -> ExitCode {
    match lines {
        Ok(lines) => {
            for line in lines {
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

fn parse_mode(text: &str) -> Result<XdpModeSetting, String> {
    match text {
        "auto" => Ok(XdpModeSetting::Auto),
        "native" => Ok(XdpModeSetting::Native),
        "generic" => Ok(XdpModeSetting::Generic),
        _ => Err(format!("{text:?}: use auto, native or generic")),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs a command on the runtime; a daemon logs (its error too), a client prints its error.
fn run_async(
    daemon: bool,
    task: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    if daemon {
        init_logging();
    }
    match runtime().block_on(task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if daemon => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    use std::io::IsTerminal as _;
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

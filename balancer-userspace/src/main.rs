//! `balancer`: an XDP layer-4 load balancer. The command line is `balancer::daemon::cli`.
#![allow(
    unused_crate_dependencies,
    reason = "a thin binary over the library, which uses every dependency"
)]

fn main() -> std::process::ExitCode {
    balancer::daemon::cli::main()
}

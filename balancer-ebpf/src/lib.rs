//! Nothing for the host: the programs are the `balancer-xdp` binary, built for the BPF target.
//! This library only exists so that the daemon's build script can depend on the crate (and be
//! rebuilt when the programs change).
#![no_std]
#![allow(
    unused_crate_dependencies,
    reason = "the dependencies are the BPF binary's; this host library is empty"
)]

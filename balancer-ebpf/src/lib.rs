//! Nothing for the host: the programs are the `balancer-xdp` binary, built for the BPF target.
#![no_std]

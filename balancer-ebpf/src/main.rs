//! The balancer's XDP program: one pass over each packet, as a pipeline
//! parse -> classify -> select -> rewrite -> count.
//!
//! A packet that is not addressed to a configured VIP leaves untouched with XDP_PASS. A
//! packet for a VIP is forwarded to one backend, chosen per flow, or dropped with a counted
//! outcome. Nothing here returns XDP_ABORTED.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

// The package's host library (empty) comes with every binary of the package; not used here.
use balancer_ebpf as _;

#[cfg(target_arch = "bpf")]
mod access;
#[cfg(target_arch = "bpf")]
mod classify;
#[cfg(target_arch = "bpf")]
mod count;
#[cfg(target_arch = "bpf")]
mod decap;
#[cfg(target_arch = "bpf")]
mod frame;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod rewrite;
#[cfg(target_arch = "bpf")]
mod select;
#[cfg(target_arch = "bpf")]
mod wire;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{macros::xdp, programs::XdpContext};
    use balancer_common::{xdp_action, Outcome};

    use crate::{
        classify, count, decap, frame, icmp,
        parse::{self, Kind},
        rewrite, select,
    };

    #[xdp]
    pub fn balancer(ctx: XdpContext) -> u32 {
        // The upgrade test's variant: a few more instructions, nothing else changed.
        #[cfg(feature = "upgrade-variant")]
        core::hint::black_box(0x0bad_cafe_u32);
        let outcome = match forward(&ctx) {
            Ok(outcome) => outcome,
            Err(outcome) => outcome,
        };
        count::outcome(outcome);
        outcome.verdict()
    }

    /// The pipeline. `Err` carries why the packet is not forwarded.
    #[inline(always)]
    fn forward(ctx: &XdpContext) -> Result<Outcome, Outcome> {
        let mut packet = parse::packet(ctx)?;
        if packet.kind == Kind::EchoRequest {
            if !classify::is_vip_address(&packet) {
                return Err(Outcome::IcmpOther);
            }
            return icmp::echo_reply(ctx, &packet);
        }
        classify::prefilter(&packet).map_err(|outcome| match packet.kind {
            Kind::IcmpError => Outcome::IcmpOther,
            _ => outcome,
        })?;
        // An established flow: one connection-table lookup, no VIP lookup.
        let fast = packet.kind == Kind::Flow && !packet.syn && !packet.fragment;
        let found = if fast {
            select::established(&packet)
        } else {
            None
        };
        let selected = match found {
            Some(selected) => selected,
            None => {
                let vip = match classify::vip(&mut packet) {
                    Err(_) if packet.kind == Kind::IcmpError => return Err(Outcome::IcmpOther),
                    other => other?,
                };
                // The connection table was asked already on the fast path; a SYN never asks.
                select::backend(vip, &packet, !fast && !packet.syn)?
            }
        };
        let outcome = if selected.tunnels {
            rewrite::tunnel(ctx, &packet, &selected)?
        } else {
            rewrite::direct_server_return(ctx, &selected)?
        };
        if matches!(outcome, Outcome::ForwardedTx | Outcome::ForwardedRedirect) {
            count::forwarded(&selected, packet.len);
        }
        Ok(outcome)
    }

    /// Backend side of tunnel mode: see `decap`. Always XDP_PASS.
    #[xdp]
    pub fn balancer_decap(ctx: XdpContext) -> u32 {
        count::decap(decap::decapsulate(&ctx));
        xdp_action::PASS
    }

    /// XDP_PASS and nothing else; see `balancer_common::program_names::PASS`.
    #[xdp]
    pub fn xdp_pass(_ctx: XdpContext) -> u32 {
        xdp_action::PASS
    }

    /// Benchmarks: a sink that drops everything.
    #[xdp]
    pub fn xdp_drop(_ctx: XdpContext) -> u32 {
        xdp_action::DROP
    }

    /// Benchmarks: sends every frame back out unchanged (with BPF_PROG_TEST_RUN's live
    /// frames, a packet generator).
    #[xdp]
    pub fn xdp_tx(_ctx: XdpContext) -> u32 {
        xdp_action::TX
    }

    /// Benchmarks: the trivial reflector the balancer is compared with: swaps the Ethernet
    /// addresses and sends the frame back.
    #[xdp]
    pub fn xdp_reflect(ctx: XdpContext) -> u32 {
        match frame::turn_around(&ctx) {
            Some(()) => xdp_action::TX,
            None => xdp_action::PASS,
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // SAFETY: the verifier rejects any program that could reach a panic (there is no
        // unwinding in BPF), so this is never called.
        unsafe { core::hint::unreachable_unchecked() }
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

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
mod defence;
#[cfg(target_arch = "bpf")]
mod frame;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
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
    use balancer_common::{xdp_action, Outcome, NAT_PROGRAM_FORWARD, NAT_PROGRAM_REPLY};

    use crate::{
        classify, count, decap, frame, icmp,
        maps::{NAT_HANDOFF, NAT_PROGRAMS},
        nat,
        parse::{self, Kind, Packet},
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
            if !classify::is_vip_address(&packet) || !icmp::echo_intact(ctx, &packet) {
                return Err(Outcome::IcmpOther);
            }
            return icmp::echo_reply(ctx, &packet);
        }
        if let Err(outcome) = classify::prefilter(&packet) {
            return not_for_a_vip(ctx, &packet, outcome);
        }
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
                    Ok(vip) => vip,
                    Err(outcome) => return not_for_a_vip(ctx, &packet, outcome),
                };
                if vip.translates() {
                    return hand_to_nat(ctx, *vip);
                }
                if packet.kind == Kind::IcmpError && !packet.too_big {
                    // Only NAT VIPs take the other errors: their backends cannot get them
                    // from anyone else.
                    return Err(Outcome::IcmpOther);
                }
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

    /// A packet for the NAT VIP `vip`: handed to the NAT forward program, which does not
    /// return here. If it cannot be (no NAT program loaded), dropped.
    #[inline(always)]
    fn hand_to_nat(ctx: &XdpContext, vip: balancer_common::VipMeta) -> Result<Outcome, Outcome> {
        if let Some(slot) = NAT_HANDOFF.get_ptr_mut(0) {
            // SAFETY: this CPU's slot, valid for this program run.
            unsafe { *slot = vip };
            // SAFETY: on success the NAT program runs instead and this one ends here.
            unsafe { NAT_PROGRAMS.tail_call(ctx, NAT_PROGRAM_FORWARD) };
        }
        Err(Outcome::NatUnavailable)
    }

    /// A packet that is not addressed to a VIP (`outcome` says why): one that may be a
    /// backend's reply on a NAT connection is handed to the NAT reply program; anything else
    /// leaves untouched.
    #[inline(always)]
    fn not_for_a_vip(
        ctx: &XdpContext,
        packet: &Packet,
        outcome: Outcome,
    ) -> Result<Outcome, Outcome> {
        if !packet.fragment && nat::may_be_backend(&packet.flow) {
            // SAFETY: on success the NAT program runs instead and this one ends here.
            unsafe { NAT_PROGRAMS.tail_call(ctx, NAT_PROGRAM_REPLY) };
        }
        Err(match packet.kind {
            Kind::IcmpError => Outcome::IcmpOther,
            _ => outcome,
        })
    }

    /// NAT, a client's packet to a NAT VIP (see `nat::forward`), handed over by the balancer
    /// with the VIP in `NAT_HANDOFF`.
    #[xdp]
    pub fn balancer_nat_forward(ctx: XdpContext) -> u32 {
        let outcome = match nat_forward(&ctx) {
            Ok(outcome) => outcome,
            Err(outcome) => outcome,
        };
        count::outcome(outcome);
        outcome.verdict()
    }

    #[inline(always)]
    fn nat_forward(ctx: &XdpContext) -> Result<Outcome, Outcome> {
        let packet = parse::packet(ctx)?;
        let vip = *NAT_HANDOFF.get(0).ok_or(Outcome::NatUnavailable)?;
        nat::forward(ctx, &packet, &vip)
    }

    /// NAT, a packet for no VIP from a NAT VIP's backend (see `nat::reply`), handed over by
    /// the balancer.
    #[xdp]
    pub fn balancer_nat_reply(ctx: XdpContext) -> u32 {
        let outcome = match nat_reply(&ctx) {
            Ok(outcome) => outcome,
            Err(outcome) => outcome,
        };
        count::outcome(outcome);
        outcome.verdict()
    }

    #[inline(always)]
    fn nat_reply(ctx: &XdpContext) -> Result<Outcome, Outcome> {
        let packet = parse::packet(ctx)?;
        match nat::reply(ctx, &packet) {
            Some(replied) => replied,
            None if packet.kind == Kind::IcmpError => Err(Outcome::IcmpOther),
            None => Err(Outcome::NotVip),
        }
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

//! Rewrite: L2 direct server return. The IP packet is left as it is (the backend holds the VIP
//! on a loopback and answers the client directly); only the Ethernet addresses change, and
//! the frame leaves through the backend's egress interface.

use aya_ebpf::programs::XdpContext;
use balancer_common::{xdp_action, Outcome};

use crate::{access::ptr_at_mut, maps::EGRESS_DEVICES, parse::EthHdr, select::Selected};

#[inline(always)]
pub fn direct_server_return(ctx: &XdpContext, to: &Selected) -> Result<Outcome, Outcome> {
    // The parse step already read this header, so it is there; the check is for the verifier.
    let eth = ptr_at_mut::<EthHdr>(ctx, 0).ok_or(Outcome::TruncatedEthernet)?;
    // SAFETY: ptr_at_mut checked the bounds.
    unsafe {
        (*eth).dst = to.dst_mac;
        (*eth).src = to.src_mac;
    }
    if to.ifindex as usize == ctx.ingress_ifindex() {
        return Ok(Outcome::ForwardedTx);
    }
    // On a miss bpf_redirect_map returns the low bits of the flags: XDP_DROP here, counted.
    match EGRESS_DEVICES.redirect(to.ifindex, xdp_action::DROP as u64) {
        Ok(_) => Ok(Outcome::ForwardedRedirect),
        Err(_) => Err(Outcome::NoEgress),
    }
}

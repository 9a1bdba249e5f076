//! Classify: is the packet addressed to a VIP? Exact (address, port, protocol) first, then the
//! VIP's any-port entry (port 0).

use balancer_common::{FlowKey, Outcome, VipKey, VipMeta};

use crate::maps::VIPS;

#[inline(always)]
pub fn vip(flow: &FlowKey) -> Result<&'static VipMeta, Outcome> {
    let mut key = VipKey {
        addr: flow.dst,
        port: flow.dst_port,
        proto: flow.proto,
        family: flow.family,
    };
    if let Some(meta) = VIPS.get_ptr(key) {
        // SAFETY: the kernel keeps a hash map value alive for the whole program run (RCU).
        return Ok(unsafe { &*meta });
    }
    key.port = 0;
    match VIPS.get_ptr(key) {
        // SAFETY: as above.
        Some(meta) => Ok(unsafe { &*meta }),
        None => Err(Outcome::NotVip),
    }
}

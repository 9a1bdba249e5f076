//! Count: per-CPU counters, summed by the daemon when it reads them. Plain adds: each CPU
//! owns its copy, so there is nothing to race with.

use balancer_common::{DecapOutcome, NatCounter, Outcome, TrafficStats};

use crate::{
    maps::{BACKEND_STATS, DECAP_STATS, NAT_STATS, OUTCOME_STATS, VIP_STATS},
    select::Selected,
};

#[inline(always)]
pub fn outcome(outcome: Outcome) {
    if let Some(counter) = OUTCOME_STATS.get_ptr_mut(outcome as u32) {
        // SAFETY: per-CPU slot, valid for this program run.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn decap(outcome: DecapOutcome) {
    if let Some(counter) = DECAP_STATS.get_ptr_mut(outcome as u32) {
        // SAFETY: per-CPU slot, valid for this program run.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn nat(counter: NatCounter) {
    if let Some(c) = NAT_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, valid for this program run.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn forwarded(selected: &Selected, len: u64) {
    forwarded_to(selected.id, selected.vip_id, selected.new_flows, len);
}

/// A packet forwarded to backend `id` of VIP `vip_id`; `new_flows` is 1 for a new flow.
#[inline(always)]
pub fn forwarded_to(id: u32, vip_id: u32, new_flows: u32, len: u64) {
    let new_flows = new_flows as u64;
    add(BACKEND_STATS.get_ptr_mut(id), len, new_flows);
    add(VIP_STATS.get_ptr_mut(vip_id), len, new_flows);
}

#[inline(always)]
fn add(stats: Option<*mut TrafficStats>, len: u64, new_flows: u64) {
    if let Some(stats) = stats {
        // SAFETY: per-CPU slot, valid for this program run.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len;
            (*stats).new_flows += new_flows;
        }
    }
}

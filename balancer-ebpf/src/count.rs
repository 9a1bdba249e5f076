//! Count: per-CPU counters, summed by the daemon when it reads them. Plain adds: each CPU
//! owns its copy, so there is nothing to race with.

use balancer_common::{DecapOutcome, Outcome, TrafficStats};

use crate::{
    maps::{BACKEND_STATS, DECAP_STATS, OUTCOME_STATS, VIP_STATS},
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
pub fn forwarded(selected: &Selected, len: u64) {
    let new_flows = selected.new_flows as u64;
    add(BACKEND_STATS.get_ptr_mut(selected.id), len, new_flows);
    add(VIP_STATS.get_ptr_mut(selected.vip_id), len, new_flows);
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

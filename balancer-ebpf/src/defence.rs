//! Defences of the state tables (see `balancer_common::defence`): the per-CPU cap on new
//! flows with state, and per-source limits. The pending tables are `select`'s.

// Keys and values built in map memory (`FlowKeys`) are passed to the map helpers by
// reference: by value, as clippy suggests, they would be copied to the stack, which is full.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::helpers::bpf_ktime_get_ns;
use balancer_common::{
    defence::{DefenceCounter, SourceKey, FLOOD_WINDOW_NS},
    FlowKey, VipMeta, FAMILY_IPV4,
};

use crate::maps::{
    FlowKeys, DEFENCE_STATS, FLOOD_SETTINGS, FLOOD_STATE, SOURCE_LIMITS, SOURCE_RATES,
};

/// Counts a defence event (a per-CPU counter, like `count`'s).
#[inline(always)]
pub fn count(counter: DefenceCounter) {
    if let Some(c) = DEFENCE_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, valid for this program run.
        unsafe { *c += 1 };
    }
}

/// CLOCK_MONOTONIC, in nanoseconds: read once per new flow, never for an established one.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Counts a new flow that would write state against this CPU's cap; false (counted
/// `Capped`) when the CPU is over it for the rest of its second: flood mode.
#[inline(always)]
pub fn admit(now: u64) -> bool {
    let cap = match FLOOD_SETTINGS.get(0) {
        Some(settings) if settings.new_flows_per_cpu != 0 => settings.new_flows_per_cpu,
        _ => return true,
    };
    let Some(state) = FLOOD_STATE.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run.
    let state = unsafe { &mut *state };
    if now.wrapping_sub(state.window_start) >= FLOOD_WINDOW_NS {
        state.window_start = now;
        state.new_flows = 0;
    }
    state.new_flows += 1;
    if state.new_flows > cap {
        count(DefenceCounter::Capped);
        return false;
    }
    true
}

/// Whether `flow`'s source prefix may open another flow to `vip` (a VIP with
/// `VIP_F_SOURCE_LIMIT`): takes a token from its bucket. A source not seen before (or pushed
/// out of `SOURCE_RATES`) starts with a full bucket. Two CPUs updating one bucket at once may
/// both take the same token: the limit is exact per CPU, approximate across CPUs.
#[inline(always)]
pub fn source_allowed(vip: &VipMeta, flow: &FlowKey, keys: &mut FlowKeys, now: u64) -> bool {
    let Some(limit) = SOURCE_LIMITS.get(vip.vip_id) else {
        return true;
    };
    let src = flow.src_words();
    let addr = if flow.family == FAMILY_IPV4 {
        [src[0] & limit.mask_v4, 0, 0, 0]
    } else {
        let m = &limit.mask_v6;
        [src[0] & m[0], src[1] & m[1], src[2] & m[2], src[3] & m[3]]
    };
    keys.source = SourceKey {
        vip_id: vip.vip_id,
        family: flow.family,
        _pad: [0; 3],
        addr,
    };
    match SOURCE_RATES.get_ptr_mut(&keys.source) {
        // SAFETY: a hash map value, valid for this run of the program (RCU).
        Some(bucket) => limit.take(unsafe { &mut *bucket }, now),
        None => {
            keys.bucket = limit.first(now);
            // Can only fail if the kernel cannot allocate: the flow is admitted anyway.
            let _ = SOURCE_RATES.insert(&keys.source, &keys.bucket, 0);
            true
        }
    }
}

//! Defences of the state tables against floods: the pending table (TCP flows that have sent
//! a SYN and nothing since), the per-CPU cap on new-flow inserts (flood mode), and per-source
//! limits on new flows.
//!
//! - A SYN does not claim a slot in the connection table: its choice goes to the pending table
//!   (`PENDING_V4`/`PENDING_V6`, an LRU of its own), and the flow's next packet (the client's
//!   ACK) promotes it. A flood of SYNs from spoofed sources churns the pending table only;
//!   a flow whose pending entry was pushed out is placed by the Maglev table again, which
//!   gives the same backend unless the backend set changed within its handshake.
//! - Every new flow that would write state (a SYN's pending entry, a UDP flow's or a
//!   mid-stream TCP flow's connection entry, a NAT connection) counts against a per-CPU cap
//!   per second (`FloodSettings::new_flows_per_cpu`). Above it the flow is placed by the Maglev
//!   table alone (a NAT connection, which cannot be, is refused): the CPU is in flood mode
//!   until its second is over.
//! - A VIP with `VIP_F_SOURCE_LIMIT` admits new flows from each source prefix at a rate (a
//!   token bucket per prefix in `SOURCE_RATES`, an LRU of its own); over it, the new flow's
//!   packet is dropped.

/// The per-CPU insert cap (one entry of `FLOOD_SETTINGS`, written by the daemon).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FloodSettings {
    /// New flows with state per CPU per second; 0 before the daemon has written it (no cap).
    pub new_flows_per_cpu: u64,
}

/// A CPU's count of new flows in its current second (`FLOOD_STATE`, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FloodState {
    /// When the current second started (`bpf_ktime_get_ns`).
    pub window_start: u64,
    /// New flows counted in it, the capped ones included.
    pub new_flows: u64,
}

/// Nanoseconds of the cap's window.
pub const FLOOD_WINDOW_NS: u64 = 1_000_000_000;

/// One token of a source's bucket, in the bucket's unit (nanotokens: a rate of r flows per
/// second adds r units per nanosecond).
pub const TOKEN: u64 = 1_000_000_000;

/// A VIP's per-source limit (`SOURCE_LIMITS`, by VIP id; read only for VIPs with
/// `VIP_F_SOURCE_LIMIT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceLimit {
    /// New flows per second per source prefix.
    pub rate: u64,
    /// The bucket's size in `TOKEN`s: `burst * TOKEN`.
    pub burst: u64,
    /// How long an empty bucket takes to fill (`burst / rate`, ns): a longer idle time adds
    /// nothing more, and the product `elapsed * rate` cannot overflow.
    pub fill_ns: u64,
    /// The prefix masks, as the flow key holds addresses (network byte order in memory):
    /// IPv4 in the first word.
    pub mask_v4: u32,
    pub mask_v6: [u32; 4],
    pub _pad: u32,
}

/// The key of a source prefix's bucket: the VIP and the masked source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceKey {
    pub vip_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u32; 4],
}

/// A source prefix's token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceBucket {
    /// Tokens left, in `TOKEN`s.
    pub tokens: u64,
    /// When they were last counted.
    pub updated: u64,
}

impl SourceLimit {
    /// A limit of `rate` new flows per second with bursts of `burst`, per source prefix of
    /// the given lengths (IPv4 0..=32, IPv6 0..=128).
    pub fn new(rate: u32, burst: u32, v4_prefix: u8, v6_prefix: u8) -> SourceLimit {
        let rate = u64::from(rate.max(1));
        let burst = u64::from(burst.max(1)) * TOKEN;
        let mut mask_v6 = [0u32; 4];
        for (i, word) in mask_v6.iter_mut().enumerate() {
            *word = prefix_word(v6_prefix, i as u32 * 32);
        }
        SourceLimit {
            rate,
            burst,
            fill_ns: burst / rate,
            mask_v4: prefix_word(v4_prefix, 0),
            mask_v6,
            _pad: 0,
        }
    }

    /// Takes one token from `bucket` at `now` if there is one.
    #[inline(always)]
    pub fn take(&self, bucket: &mut SourceBucket, now: u64) -> bool {
        let elapsed = now.saturating_sub(bucket.updated);
        let elapsed = if elapsed < self.fill_ns {
            elapsed
        } else {
            self.fill_ns
        };
        let tokens = bucket.tokens + elapsed * self.rate;
        let tokens = if tokens < self.burst {
            tokens
        } else {
            self.burst
        };
        bucket.updated = now;
        if tokens >= TOKEN {
            bucket.tokens = tokens - TOKEN;
            true
        } else {
            bucket.tokens = tokens;
            false
        }
    }

    /// A new source's bucket, its first token taken.
    #[inline(always)]
    pub fn first(&self, now: u64) -> SourceBucket {
        SourceBucket {
            tokens: self.burst - TOKEN,
            updated: now,
        }
    }
}

/// Word `i` (counting bits from `start`) of a prefix mask of `len` bits, as it lies in memory
/// in network byte order.
fn prefix_word(len: u8, start: u32) -> u32 {
    let len = u32::from(len);
    let bits = len.saturating_sub(start).min(32);
    let host = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    host.to_be()
}

macro_rules! defence_counters {
    ($($(#[$doc:meta])* $variant:ident = $value:literal, $name:literal;)+) => {
        /// Events of the defences: the index of `DEFENCE_STATS`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum DefenceCounter {
            $($(#[$doc])* $variant = $value,)+
        }

        impl DefenceCounter {
            pub const ALL: &'static [DefenceCounter] = &[$(DefenceCounter::$variant,)+];
            pub const fn name(self) -> &'static str {
                match self { $(DefenceCounter::$variant => $name,)+ }
            }
        }
    };
}

defence_counters! {
    /// A SYN's choice written to the pending table.
    Pending = 0, "pending";
    /// A pending flow's next packet: the flow moved to the connection table.
    Promoted = 1, "promoted";
    /// A SYN for a flow the connection table holds (a reused port): its entry rewritten in
    /// place, no slot claimed.
    Reused = 2, "reused";
    /// A new flow over the CPU's cap: placed by the Maglev table alone, nothing written (a
    /// NAT connection: refused, `Outcome::NatFloodRefused`).
    Capped = 3, "capped";
}

/// Size of `DEFENCE_STATS`. (New flows over their source's limit are an outcome of their
/// own, `Outcome::SourceLimited`.)
pub const DEFENCE_COUNTER_COUNT: u32 = 4;

const _: () = {
    assert!(core::mem::size_of::<FloodSettings>() == 8);
    assert!(core::mem::size_of::<FloodState>() == 16);
    assert!(core::mem::size_of::<SourceLimit>() == 48);
    assert!(core::mem::size_of::<SourceKey>() == 24);
    assert!(core::mem::size_of::<SourceBucket>() == 16);
    assert!(DefenceCounter::ALL.len() == DEFENCE_COUNTER_COUNT as usize);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_the_prefix_in_network_order() {
        let limit = SourceLimit::new(10, 10, 24, 56);
        assert_eq!(limit.mask_v4.to_ne_bytes(), [255, 255, 255, 0]);
        let v6: [[u8; 4]; 4] = limit.mask_v6.map(u32::to_ne_bytes);
        assert_eq!(v6, [[255; 4], [255, 255, 255, 0], [0; 4], [0; 4]]);
        let all = SourceLimit::new(10, 10, 32, 128);
        assert_eq!(all.mask_v4, u32::MAX);
        assert_eq!(all.mask_v6, [u32::MAX; 4]);
        assert_eq!(SourceLimit::new(10, 10, 0, 0).mask_v6, [0; 4]);
    }

    #[test]
    fn a_bucket_admits_its_burst_then_its_rate() {
        let limit = SourceLimit::new(100, 5, 24, 56);
        let mut bucket = limit.first(0);
        let admitted = (0..10).filter(|_| limit.take(&mut bucket, 0)).count();
        assert_eq!(admitted, 4, "the first flow took one of the 5");
        // 1,000 attempts a second for 10 seconds: 100 a second get through.
        let mut admitted = 0;
        for i in 1..=10_000u64 {
            admitted += usize::from(limit.take(&mut bucket, i * 1_000_000));
        }
        assert!((1_000..=1_005).contains(&admitted), "{admitted}");
        // Idle for an hour: the bucket holds its burst, no more.
        let later = 3_600 * TOKEN;
        let admitted = (0..10).filter(|_| limit.take(&mut bucket, later)).count();
        assert_eq!(admitted, 5);
        // A clock read earlier than the bucket's (another CPU) adds nothing.
        assert!(!limit.take(&mut bucket, later - 1_000));
    }
}

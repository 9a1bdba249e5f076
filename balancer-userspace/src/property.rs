//! A small runner for the property tests of the parsers that read untrusted input (the
//! config, the sync's messages, DNS answers, the API's requests and the control socket's):
//! each property runs on a fixed number of cases, each case with its own seeded generator
//! ([`fastrand`], as the crate's other randomised tests), so that a run is reproducible.
//!
//! A failing case names its seed on stderr; `BALANCER_PROPERTY_SEED=<seed>` runs that case
//! alone. `BALANCER_PROPERTY_CASES=<n>` runs n cases of every property instead of its own
//! count (the first ones are the usual ones): a longer search, by hand (more cases than the
//! usual, for the checks that the cases covered enough to hold).

/// One case of a property: its generator. Dropped while the case panics, it names the seed.
pub struct Case {
    pub rng: fastrand::Rng,
    property: &'static str,
    seed: u64,
}

impl Drop for Case {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "property {}: the case of seed {:#x} failed; run it alone with \
                 BALANCER_PROPERTY_SEED={:#x}",
                self.property, self.seed, self.seed
            );
        }
    }
}

/// The cases of `property`: `count` of them (or as the environment says), each seeded from
/// the property's name and its number.
pub fn cases(property: &'static str, count: u32) -> impl Iterator<Item = Case> {
    let from_env = |name: &str| {
        let text = std::env::var(name).ok()?;
        let text = text.trim();
        match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => text.parse().ok(),
        }
    };
    // FNV-1a of the name: each property has seeds of its own.
    let base = property.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let seeds: Vec<u64> = match from_env("BALANCER_PROPERTY_SEED") {
        Some(seed) => vec![seed],
        None => {
            let count = from_env("BALANCER_PROPERTY_CASES").unwrap_or(u64::from(count));
            (0..count)
                .map(|i| base.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .collect()
        }
    };
    seeds.into_iter().map(move |seed| Case {
        rng: fastrand::Rng::with_seed(seed),
        property,
        seed,
    })
}

/// Checks that the cases run covered what they must (every kind of fault, both outcomes...),
/// unless one case is run alone (`BALANCER_PROPERTY_SEED`).
pub fn assert_covered(covered: bool, what: &str) {
    if std::env::var_os("BALANCER_PROPERTY_SEED").is_none() {
        assert!(covered, "the cases did not cover {what}");
    }
}

/// One of `items`, picked by `rng`.
pub fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

/// `len` random bytes, biased towards the bytes that parsers look at (ASCII punctuation,
/// digits, newlines, NUL, 0xff) so that random input gets past the first check more often.
pub fn bytes(rng: &mut fastrand::Rng, len: usize) -> Vec<u8> {
    const INTERESTING: &[u8] = b"\0\n\r\t \"'#=[]{},.:-_/\\0123456789azAZ\x7f\xc3\xa9\xff";
    (0..len)
        .map(|_| {
            if rng.bool() {
                *pick(rng, INTERESTING)
            } else {
                rng.u8(..)
            }
        })
        .collect()
}

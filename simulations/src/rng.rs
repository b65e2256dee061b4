//! Seeded randomness. One root seed is split into an independent stream per component, so that
//! a draw added in one place does not shift any other; where the order of calls could depend on
//! scheduling details (acks of killed actors), draws are keyed by what they are about instead.

/// SplitMix64: small, fast, and good enough for test schedules.
#[derive(Debug, Clone)]
pub struct SimRng {
    state: u64,
}

pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a name, to derive a component's stream from the root seed.
pub fn fnv(bytes: &[u8]) -> u64 {
    let mut hash = Fnv::new();
    hash.add(bytes);
    hash.finish()
}

/// FNV-1a, fed piece by piece: the same hash as [`fnv`] of the pieces joined.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Fnv {
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub fn add(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

impl Default for Fnv {
    fn default() -> Self {
        Fnv::new()
    }
}

impl std::fmt::Write for Fnv {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.add(s.as_bytes());
        Ok(())
    }
}

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng { state: mix(seed) }
    }

    /// The stream of component `name` under `root`.
    pub fn stream(root: u64, name: &str) -> Self {
        SimRng::new(root ^ fnv(name.as_bytes()))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }

    /// Uniform in `[0, max)`, as a rate drawn for swarm testing.
    pub fn rate(&mut self, max: f64) -> f64 {
        self.unit() * max
    }
}

/// A draw fixed by `key` alone: the same key always gives the same value, whatever was drawn
/// before.
pub fn keyed_unit(seed: u64, key: &[u64]) -> f64 {
    let mut h = seed;
    for k in key {
        h = mix(h ^ k);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

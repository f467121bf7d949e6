//! The crate's one seeded random source: xoshiro256++ seeded through
//! SplitMix64, plus SplitMix64's counter hash for randomness that must not
//! depend on draw order.
//!
//! **Not part of the stable API.** The module is public (and hidden from the
//! docs) only so that the crate's own benches and its `fed_llama` example,
//! which are separate crates, share this generator instead of carrying copies;
//! it may change in any release.
//!
//! Why an own generator: seeded results (validation splits, k-fold shuffles,
//! sketch hashing, DnC's coordinate samples, FLAME's noise, synthetic data)
//! must be bit-for-bit reproducible across platforms and crate versions, and
//! the library should not depend on `rand` for ~100 lines.
//!
//! Two shapes of randomness:
//! - [`Rng`]: a sequential stream (shuffles, samples, synthetic data).
//! - [`mix64`] / [`gaussian_at`]: a value determined by `(seed, index)`, for
//!   randomness drawn inside parallel loops (FLAME's per-coordinate noise) or
//!   persisted in a format (the count sketch's bucket hashes), where the
//!   result must not depend on how work was split over threads.
//!
//! Changing [`mix64`] changes the features of every saved sketched probe:
//! treat it as part of the probe file format.

/// SplitMix64's increment (2⁶⁴/φ, odd).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output for counter `z` (Steele, Lea, Flood 2014): the
/// increment, then the bijective finaliser. A strong 64-bit hash of `z`.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Maps a 64-bit hash uniformly onto `0..n` (Lemire's multiply-shift; the
/// bias for `n` near 2⁶⁴ is irrelevant here). `n = 0` gives 0.
pub fn below(hash: u64, n: usize) -> usize {
    ((u128::from(hash) * n as u128) >> 64) as usize
}

/// Uniform in (0, 1) from 64 random bits (never 0, so `ln` is finite).
fn unit_open(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// A standard normal sample determined by `(seed, index)` alone
/// (Box–Muller on two hashes), so parallel loops draw the same noise however
/// they are split.
pub fn gaussian_at(seed: u64, index: u64) -> f64 {
    let h = mix64(seed ^ mix64(index));
    let u1 = unit_open(h);
    let u2 = unit_open(mix64(h));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// xoshiro256++ (Blackman, Vigna 2018), seeded with four SplitMix64 outputs.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        // Counters seed + γ, seed + 2γ, … (kept from the probe's original
        // generator so its seeded splits and synthetic data did not change).
        let mut counter = seed;
        let mut next = || {
            counter = counter.wrapping_add(GAMMA);
            mix64(counter)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// A generator for a `(seed, stream…)` tuple: independent streams for,
    /// e.g., (seed, client, round) without hand-mixing seeds at call sites.
    pub fn derive(seed: u64, streams: &[u64]) -> Self {
        let mut h = mix64(seed);
        for &s in streams {
            h = mix64(h ^ mix64(s));
        }
        Rng::new(h)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let [s0, s1, s2, s3] = self.s;
        let result = s0.wrapping_add(s3).rotate_left(23).wrapping_add(s0);
        let t = s1 << 17;
        let mut s = [s0, s1, s2 ^ s0, s3 ^ s1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        self.s = s;
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller; one value per call, simple over fast).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: ln is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Uniform index in `0..n` (`n = 0` gives 0).
    pub fn index(&mut self, n: usize) -> usize {
        below(self.next_u64(), n)
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.index(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SplitMix64 reference: seeded with 1234567, its first outputs are
    /// 6457827717110365317, 3203168211198807973 (Vigna's splitmix64.c).
    #[test]
    fn mix64_is_splitmix64() {
        assert_eq!(mix64(1_234_567), 6_457_827_717_110_365_317);
        assert_eq!(
            mix64(1_234_567u64.wrapping_add(GAMMA)),
            3_203_168_211_198_807_973
        );
    }

    #[test]
    fn seeded_streams_repeat_and_differ() {
        let draw = |seed| -> Vec<u64> {
            let mut r = Rng::new(seed);
            (0..4).map(|_| r.next_u64()).collect()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let derived = |streams: &[u64]| Rng::derive(7, streams).next_u64();
        assert_ne!(derived(&[1, 2]), derived(&[2, 1]));
        assert_ne!(derived(&[1]), derived(&[1, 0]));
    }

    #[test]
    fn index_stays_in_range_and_is_deterministic() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..1000 {
            let x = a.index(13);
            assert!(x < 13);
            assert_eq!(x, b.index(13));
        }
        for h in [0, 1, u64::MAX, u64::MAX / 2] {
            assert!(below(h, 10) < 10);
        }
        assert_eq!(below(u64::MAX, 0), 0);
    }

    fn moments(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (mean, var)
    }

    #[test]
    fn normals_have_unit_moments() {
        let mut rng = Rng::new(1);
        let stream: Vec<f64> = (0..20_000).map(|_| rng.normal()).collect();
        let counter: Vec<f64> = (0..20_000).map(|i| gaussian_at(3, i)).collect();
        for (mean, var) in [moments(&stream), moments(&counter)] {
            assert!(mean.abs() < 0.03, "mean {mean}");
            assert!((var - 1.0).abs() < 0.05, "var {var}");
        }
    }
}

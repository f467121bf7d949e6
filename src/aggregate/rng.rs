//! A tiny deterministic random source (SplitMix64, Steele et al. 2014).
//!
//! Rules that need randomness (DnC's coordinate sampling, FLAME's noise) take
//! an explicit seed, so a round can be replayed bit for bit. FLAME's noise is
//! drawn per coordinate from `hash(seed, coordinate)` rather than from a
//! sequential stream, so it does not depend on how chunks are split over
//! threads.

/// SplitMix64 generator.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..bound` (bound > 0), by Lemire's multiply-shift (the
    /// tiny bias for bounds near 2⁶⁴ is irrelevant here).
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

/// SplitMix64's finaliser: a bijective 64-bit mix.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in (0, 1) from 64 random bits (never 0, so `ln` is finite).
fn unit_open(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// A standard normal sample determined by `(seed, index)` (Box–Muller).
pub(crate) fn gaussian_at(seed: u64, index: u64) -> f64 {
    let h = mix(seed ^ mix(index.wrapping_add(0x632B_E59B_D9B4_E019)));
    let u1 = unit_open(h);
    let u2 = unit_open(mix(h ^ 0xD6E8_FEB8_6659_FD93));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_is_deterministic() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        for _ in 0..1000 {
            let x = a.below(13);
            assert!(x < 13);
            assert_eq!(x, b.below(13));
        }
    }

    #[test]
    fn gaussian_has_unit_moments() {
        let n = 20_000;
        let xs: Vec<f64> = (0..n).map(|i| gaussian_at(3, i)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }
}

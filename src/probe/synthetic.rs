//! Synthetic probe features for tests, examples and benchmarks.
//!
//! # Generator
//!
//! Real ΔLoRA features are highly anisotropic: local fine-tuning moves the
//! adapter along a few data-dependent directions, and the benign/malicious
//! difference lives in a low-dimensional subspace. The generator models that:
//!
//! ```text
//! U   ∈ ℝ^{d×r}, entries N(0, 1/d)            (a random rank-r subspace)
//! μ   ∈ ℝ^r, a random unit vector              (the class direction inside it)
//! a   ∈ ℝ^d, entries N(0, 1/d)                 (a common offset)
//! xᵢ  = a + U·(sᵢ·separation·μ + zᵢ) + noise·εᵢ,   sᵢ = +1 malicious, −1 benign
//! zᵢ  ~ N(0, I_r)                               (within-class variation in the subspace)
//! εᵢ  ~ N(0, I_d/d)                             (isotropic noise)
//! xᵢ  ← xᵢ / ‖xᵢ‖                               (L2, as the probe features)
//! ```
//!
//! Defaults: rank 16, separation 1.5, noise 3.0, 30 % malicious, seed 0.
//! At 2,000 × 40,960 a class-balanced logistic regression (C = 1) reaches a
//! held-out ROC AUC of about 0.97: separable, but not trivially.

use ndarray::Array2;

use crate::error::{Result, check_parameter};
use crate::features::l2_normalise;
use crate::probe::Label;
use crate::rng::Rng;

/// Settings of the generator (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    samples: usize,
    dim: usize,
    rank: usize,
    separation: f64,
    noise: f64,
    malicious_fraction: f64,
    seed: u64,
}

impl SyntheticConfig {
    /// `samples` rows of `dim` features with the default settings.
    pub fn new(samples: usize, dim: usize) -> Self {
        SyntheticConfig {
            samples,
            dim,
            rank: 16,
            separation: 1.5,
            noise: 3.0,
            malicious_fraction: 0.3,
            seed: 0,
        }
    }

    setters! {
        /// Rank of the class subspace (≥ 1).
        rank: usize;
        /// Distance of each class mean from the centre, along μ (finite, ≥ 0).
        separation: f64;
        /// Norm scale of the isotropic noise (finite, ≥ 0).
        noise: f64;
        /// Expected share of malicious rows, in [0, 1]; each row is malicious
        /// with this probability, and the first two rows are one of each class
        /// so both are always present.
        malicious_fraction: f64;
        /// Seed.
        seed: u64;
    }

    /// Generates `[samples, dim]` L2-normalised rows and their labels.
    ///
    /// Errors: [`Error::InvalidParameter`](crate::Error::InvalidParameter) for zero sizes or out-of-range
    /// settings.
    pub fn generate(&self) -> Result<(Array2<f32>, Vec<Label>)> {
        self.check()?;
        let (d, r) = (self.dim, self.rank);
        let mut rng = Rng::new(self.seed);
        let scale = 1.0 / (d as f64).sqrt();
        // U stored as r rows of length d, so U·v is r axpys.
        let basis: Vec<f32> = (0..d * r).map(|_| (rng.normal() * scale) as f32).collect();
        let offset: Vec<f32> = (0..d).map(|_| (rng.normal() * scale) as f32).collect();
        let mut mu: Vec<f64> = (0..r).map(|_| rng.normal()).collect();
        let mu_norm = mu
            .iter()
            .map(|v| v * v)
            .sum::<f64>()
            .sqrt()
            .max(f64::MIN_POSITIVE);
        mu.iter_mut().for_each(|v| *v /= mu_norm);

        let mut x = Array2::<f32>::zeros((self.samples, d));
        let mut labels = Vec::with_capacity(self.samples);
        for (i, mut row) in x.rows_mut().into_iter().enumerate() {
            let label = match i {
                0 => Label::Malicious,
                1 => Label::Benign,
                _ if rng.uniform() < self.malicious_fraction => Label::Malicious,
                _ => Label::Benign,
            };
            let sign = if label.is_malicious() { 1.0 } else { -1.0 };
            let coords: Vec<f32> = mu
                .iter()
                .map(|m| (sign * self.separation * m + rng.normal()) as f32)
                .collect();
            let Some(row) = row.as_slice_mut() else {
                continue;
            };
            for (v, a) in row.iter_mut().zip(&offset) {
                *v = a + (rng.normal() * scale * self.noise) as f32;
            }
            for (c, u) in coords.iter().zip(basis.chunks_exact(d)) {
                row.iter_mut().zip(u).for_each(|(v, u)| *v += c * u);
            }
            l2_normalise(row);
            labels.push(label);
        }
        Ok((x, labels))
    }

    fn check(&self) -> Result<()> {
        const DATA: &str = "synthetic data";
        check_parameter(self.samples >= 2, DATA, "samples", self.samples, ">= 2")?;
        check_parameter(self.dim >= 1, DATA, "dim", self.dim, ">= 1")?;
        check_parameter(self.rank >= 1, DATA, "rank", self.rank, ">= 1")?;
        for (name, v) in [("separation", self.separation), ("noise", self.noise)] {
            check_parameter(v.is_finite() && v >= 0.0, DATA, name, v, "finite, >= 0")?;
        }
        let fraction = self.malicious_fraction;
        let ok = (0.0..=1.0).contains(&fraction);
        check_parameter(ok, DATA, "malicious_fraction", fraction, "in [0, 1]")?;
        Ok(())
    }
}

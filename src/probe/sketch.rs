//! A seeded sparse random projection, so an `all_layers` probe (3.4 million
//! features for Llama-3.1-8B) trains on an `N × k` matrix instead of `N × 3.4M`.
//!
//! The projection P (`k × d`) is a *sparse sign* sketch (OSNAP / feature
//! hashing; Weinberger et al. 2009, Nelson & Nguyễn 2013): column j has
//! exactly `s` non-zero entries, one in each of `s` equal blocks of rows, at
//! a hashed row with a hashed sign, each of value ±1/√s. With `s = 1` it is a
//! count-sketch. E‖Px‖² = ‖x‖² and inner products are preserved up to a
//! distortion that shrinks as `k` grows, so a linear classifier trained on
//! `Px` is close to one trained on `x`.
//!
//! Entries come from a hash of `(seed, j, block)`: nothing random is stored,
//! and the same seed gives the same P on every machine. After training, the
//! sketched weights are lifted back, `w = Pᵀ·w_k`, so the saved probe scores
//! raw features directly and wᵀx = w_kᵀ(Px) exactly (up to rounding).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::rng::{below, mix64};

/// Largest number of non-zeros per input column of a count-sketch.
pub const MAX_NNZ_PER_COLUMN: usize = 64;

/// Settings of a sparse sign sketch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SketchConfig {
    /// Output width k. Default 32,768.
    pub dim: usize,
    /// Non-zeros per input coordinate, s (1 = count-sketch). Must divide
    /// `dim`. Default 1: cheapest, and with k in the tens of thousands the
    /// probe's AUC barely moves (see BENCHMARKS.md).
    pub nnz_per_column: usize,
    /// Seed of the hash. Default 0.
    pub seed: u64,
}

impl Default for SketchConfig {
    fn default() -> Self {
        SketchConfig {
            dim: 32_768,
            nnz_per_column: 1,
            seed: 0,
        }
    }
}

impl SketchConfig {
    /// A count-sketch of width `dim` with the given seed.
    pub fn new(dim: usize, seed: u64) -> Self {
        SketchConfig {
            dim,
            nnz_per_column: 1,
            seed,
        }
    }

    /// Sets the non-zeros per column (must divide `dim`).
    pub fn nnz_per_column(mut self, nnz: usize) -> Self {
        self.nnz_per_column = nnz;
        self
    }

    /// Validates the settings against an input width and precomputes the
    /// hashed rows and signs (`s` × `input_dim` entries of 4 bytes).
    ///
    /// Errors: [`Error::InvalidParameter`] for `dim = 0`, `nnz_per_column = 0`,
    /// an `nnz_per_column` that does not divide `dim` or is above
    /// [`MAX_NNZ_PER_COLUMN`], a `dim` above
    /// [`MAX_FEATURE_DIM`](crate::features::MAX_FEATURE_DIM) (a sketched
    /// vector must be allocatable), or an `input_dim × nnz_per_column` table
    /// that would not fit either.
    pub fn build(&self, input_dim: usize) -> Result<Sketch> {
        self.check()?;
        let block = self.dim / self.nnz_per_column;
        let table = input_dim
            .checked_mul(self.nnz_per_column)
            .filter(|&t| t <= crate::features::MAX_FEATURE_DIM)
            .ok_or_else(|| Error::InvalidParameter {
                component: "feature sketch",
                name: "sketch input_dim × nnz_per_column",
                value: format!("{input_dim} × {}", self.nnz_per_column),
                expected: "at most 2^28 hashed entries",
            })?;
        let mut entries = Vec::with_capacity(table);
        for j in 0..input_dim {
            for b in 0..self.nnz_per_column {
                let h = mix64(self.seed ^ mix64((j as u64) << 8 | b as u64));
                let row = b * block + below(h >> 1, block);
                let sign = (h & 1) as u32;
                entries.push((row as u32) << 1 | sign);
            }
        }
        Ok(Sketch {
            config: *self,
            input_dim,
            scale: 1.0 / (self.nnz_per_column as f32).sqrt(),
            entries,
        })
    }

    fn check(&self) -> Result<()> {
        let invalid = |name, value: usize, expected| Error::InvalidParameter {
            component: "feature sketch",
            name,
            value: value.to_string(),
            expected,
        };
        if self.dim == 0 || self.dim > crate::features::MAX_FEATURE_DIM {
            return Err(invalid("sketch.dim", self.dim, "1 ..= 2^28"));
        }
        if self.nnz_per_column == 0
            || self.nnz_per_column > MAX_NNZ_PER_COLUMN
            || !self.dim.is_multiple_of(self.nnz_per_column)
        {
            return Err(invalid(
                "sketch.nnz_per_column",
                self.nnz_per_column,
                "a divisor of sketch.dim in 1 ..= 64",
            ));
        }
        Ok(())
    }
}

/// A built sketch for one input width: projects feature vectors and lifts
/// weights back.
#[derive(Debug, Clone)]
pub struct Sketch {
    config: SketchConfig,
    input_dim: usize,
    scale: f32,
    /// Per (column, block): `row << 1 | sign_bit`.
    entries: Vec<u32>,
}

impl Sketch {
    /// The settings.
    pub fn config(&self) -> &SketchConfig {
        &self.config
    }

    /// Input width d.
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// Output width k.
    pub fn output_dim(&self) -> usize {
        self.config.dim
    }

    /// `out = P·x` (`x` of length d, `out` of length k).
    pub fn project(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        self.check_lengths(x.len(), out.len())?;
        out.fill(0.0);
        let s = self.config.nnz_per_column;
        for (value, entries) in x.iter().zip(self.entries.chunks_exact(s)) {
            if *value == 0.0 {
                continue;
            }
            let v = value * self.scale;
            for &e in entries {
                if let Some(slot) = out.get_mut((e >> 1) as usize) {
                    *slot += if e & 1 == 1 { -v } else { v };
                }
            }
        }
        Ok(())
    }

    /// `Pᵀ·w` (`w` of length k): the weights in the original feature space.
    pub fn lift(&self, w: &[f32]) -> Result<Vec<f32>> {
        if w.len() != self.config.dim {
            return Err(Error::DimensionMismatch {
                what: "sketched weights".into(),
                expected: self.config.dim,
                found: w.len(),
            });
        }
        let s = self.config.nnz_per_column;
        Ok(self
            .entries
            .chunks_exact(s)
            .map(|entries| {
                entries
                    .iter()
                    .map(|&e| {
                        // Rows are b·block + (h mod block) < dim by `new`, and
                        // w.len() == dim was checked above: the get never misses.
                        let v = w.get((e >> 1) as usize).copied().unwrap_or(0.0) * self.scale;
                        if e & 1 == 1 { -v } else { v }
                    })
                    .sum()
            })
            .collect())
    }

    fn check_lengths(&self, input: usize, output: usize) -> Result<()> {
        if input != self.input_dim {
            return Err(Error::DimensionMismatch {
                what: "sketch input".into(),
                expected: self.input_dim,
                found: input,
            });
        }
        if output != self.config.dim {
            return Err(Error::DimensionMismatch {
                what: "sketch output buffer".into(),
                expected: self.config.dim,
                found: output,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::kernels::dot;

    #[test]
    fn lift_is_the_adjoint_of_project() {
        let sketch = SketchConfig::new(64, 9)
            .nnz_per_column(4)
            .build(500)
            .unwrap();
        let x: Vec<f32> = (0..500)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 10.0)
            .collect();
        let w: Vec<f32> = (0..64).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut px = vec![0.0; 64];
        sketch.project(&x, &mut px).unwrap();
        let lifted = sketch.lift(&w).unwrap();
        assert!((dot(&w, &px) - dot(&lifted, &x)).abs() < 1e-4);
    }

    #[test]
    fn norms_are_roughly_preserved() {
        let sketch = SketchConfig::new(4096, 1).build(100_000).unwrap();
        let x: Vec<f32> = (0..100_000).map(|i| ((i as f32) * 0.7).sin()).collect();
        let mut px = vec![0.0; 4096];
        sketch.project(&x, &mut px).unwrap();
        let ratio = dot(&px, &px) / dot(&x, &x);
        assert!((ratio - 1.0).abs() < 0.1, "ratio {ratio}");
    }

    #[test]
    fn bad_settings_are_rejected() {
        for config in [
            SketchConfig::new(0, 0),
            SketchConfig::new(10, 0).nnz_per_column(3),
            SketchConfig::new(10, 0).nnz_per_column(0),
        ] {
            assert!(matches!(
                config.build(5),
                Err(Error::InvalidParameter { .. })
            ));
        }
    }
}

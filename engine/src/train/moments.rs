//! One AdamW moment tensor in its stored element type: f32 (the default) or bf16 (`--moments
//! bf16`, half the optimizer state). The update arithmetic is f32 either way: a bf16 moment is
//! widened for the step and stored back with stochastic rounding. (Round to nearest would
//! freeze it: AdamW changes the second moment by 0.1% a step, less than half a bf16 step, so
//! a decaying moment would never decay.)

use half::bf16;
use kiln_kernels::checkpoint::TensorData;
use kiln_kernels::nvfp4::codec::{f32_to_bf16_stochastic, sr_uniform};
use safetensors::Dtype;

use crate::spec::MomentsSpec;

/// A moment tensor's values.
#[derive(Debug, Clone, PartialEq)]
pub enum MomentVec {
    /// f32, 4 bytes per element.
    F32(Vec<f32>),
    /// bf16, 2 bytes per element.
    Bf16(Vec<bf16>),
    /// `len` zeros of `kind`, not yet materialized (a fresh run's moments: a 14B model's are
    /// tens of GB the GPU trainer never needs on the host). The first update materializes
    /// them.
    Zeros {
        /// Elements.
        len: usize,
        /// The element type they will have.
        kind: MomentsSpec,
    },
}

impl MomentVec {
    /// `n` zeros stored as `kind`.
    pub fn zeros(n: usize, kind: MomentsSpec) -> Self {
        MomentVec::Zeros { len: n, kind }
    }

    /// Materialize lazy zeros.
    fn materialize(&mut self) {
        if let MomentVec::Zeros { len, kind } = *self {
            *self = match kind {
                MomentsSpec::F32 => MomentVec::F32(vec![0.0; len]),
                MomentsSpec::Bf16 => MomentVec::Bf16(vec![bf16::ZERO; len]),
            };
        }
    }

    /// `values` stored as `kind`.
    pub fn from_f32(values: Vec<f32>, kind: MomentsSpec) -> Self {
        match kind {
            MomentsSpec::F32 => MomentVec::F32(values),
            MomentsSpec::Bf16 => {
                MomentVec::Bf16(values.iter().map(|&v| bf16::from_f32(v)).collect())
            }
        }
    }

    /// The stored element type.
    pub fn kind(&self) -> MomentsSpec {
        match self {
            MomentVec::F32(_) => MomentsSpec::F32,
            MomentVec::Bf16(_) => MomentsSpec::Bf16,
            MomentVec::Zeros { kind, .. } => *kind,
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            MomentVec::F32(v) => v.len(),
            MomentVec::Bf16(v) => v.len(),
            MomentVec::Zeros { len, .. } => *len,
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.len() as u64 * self.kind().bytes()
    }

    /// Whether every value is +0.0 (a fresh run's moments).
    pub fn is_all_zero(&self) -> bool {
        match self {
            MomentVec::F32(v) => v.iter().all(|x| x.to_bits() == 0),
            MomentVec::Bf16(v) => v.iter().all(|x| x.to_bits() == 0),
            MomentVec::Zeros { .. } => true,
        }
    }

    /// The values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            MomentVec::F32(v) => v.clone(),
            MomentVec::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
            MomentVec::Zeros { len, .. } => vec![0.0; *len],
        }
    }

    /// Run `f` over the values as f32 and store what it leaves: an f32 moment is updated in
    /// place; a bf16 one is widened into a temporary and stored back with stochastic rounding,
    /// element i drawing `sr_uniform(seed, i)`.
    pub fn update_f32<R>(&mut self, seed: u64, f: impl FnOnce(&mut [f32]) -> R) -> R {
        self.materialize();
        match self {
            MomentVec::F32(v) => f(v),
            MomentVec::Bf16(v) => {
                let mut wide: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
                let r = f(&mut wide);
                for (i, (dst, &src)) in v.iter_mut().zip(&wide).enumerate() {
                    *dst = bf16::from_bits(f32_to_bf16_stochastic(src, sr_uniform(seed, i as u64)));
                }
                r
            }
            MomentVec::Zeros { .. } => unreachable!("materialized above"),
        }
    }

    /// The tensor as stored in the optimizer file (F32 or BF16, the moment's own type).
    pub fn to_tensor(&self, shape: Vec<usize>) -> TensorData {
        if let MomentVec::Zeros { len, kind } = *self {
            return TensorData {
                dtype: match kind {
                    MomentsSpec::F32 => Dtype::F32,
                    MomentsSpec::Bf16 => Dtype::BF16,
                },
                shape,
                data: vec![0u8; len * kind.bytes() as usize],
            };
        }
        match self {
            MomentVec::F32(v) => TensorData::from_f32(shape, v),
            MomentVec::Bf16(v) => TensorData {
                dtype: Dtype::BF16,
                shape,
                data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
            MomentVec::Zeros { .. } => unreachable!("handled above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_moments_round_to_nearest_and_halve_the_bytes() {
        let vals = vec![1.0f32, 1.0 + 1.0 / 256.0 + 1e-6, -3.0e-12, 0.1];
        let m = MomentVec::from_f32(vals.clone(), MomentsSpec::Bf16);
        assert_eq!(m.bytes(), 8);
        assert_eq!(
            MomentVec::from_f32(vals.clone(), MomentsSpec::F32).bytes(),
            16
        );
        let back = m.to_f32();
        for (a, b) in vals.iter().zip(&back) {
            // bf16 keeps 8 significant bits (an ulp of 2^-7 relative): rounding to nearest
            // errs by at most half of that, 2^-8.
            assert!((a - b).abs() <= a.abs() / 256.0, "{a} → {b}");
        }
        // 1 + 1/256 + ε is above the midpoint between 1 and 1 + 1/128: it rounds up.
        assert_eq!(back[1], 1.0 + 1.0 / 128.0);
    }

    #[test]
    fn lazy_zeros_act_like_stored_zeros() {
        for kind in [MomentsSpec::F32, MomentsSpec::Bf16] {
            let z = MomentVec::zeros(5, kind);
            let stored = MomentVec::from_f32(vec![0.0; 5], kind);
            assert_eq!((z.len(), z.kind(), z.bytes()), (5, kind, stored.bytes()));
            assert!(z.is_all_zero());
            assert_eq!(z.to_f32(), stored.to_f32());
            assert_eq!(z.to_tensor(vec![5]), stored.to_tensor(vec![5]));
            let mut m = z.clone();
            m.update_f32(1, |v| v[2] = 0.5);
            assert_eq!(m.to_f32(), vec![0.0, 0.0, 0.5, 0.0, 0.0]);
            assert_eq!(m.kind(), kind);
        }
    }

    #[test]
    fn update_f32_stores_back_in_the_moments_own_type() {
        let mut m = MomentVec::zeros(3, MomentsSpec::Bf16);
        let sum = m.update_f32(9, |v| {
            v.copy_from_slice(&[0.5, 2.0, 1.0 / 3.0]);
            v.iter().sum::<f32>()
        });
        assert!((sum - 2.8333333).abs() < 1e-6);
        assert_eq!(m.kind(), MomentsSpec::Bf16);
        // Exact values stay; 1/3 lands on one of its two bf16 neighbours, as the seed says.
        assert_eq!(m.to_f32()[..2], [0.5, 2.0]);
        let third = m.to_f32()[2];
        let want = f32_to_bf16_stochastic(1.0 / 3.0, sr_uniform(9, 2));
        assert_eq!(third, bf16::from_bits(want).to_f32());
        assert!((third - 1.0 / 3.0).abs() < 1.0 / 3.0 / 128.0);
        let t = m.to_tensor(vec![3]);
        assert_eq!((t.dtype, t.data.len()), (Dtype::BF16, 6));
        assert_eq!(t.to_f32().unwrap(), m.to_f32());
    }
}

//! Rotary position embeddings (the "rotate half" form Qwen and Llama use): inverse
//! frequencies from `rope_theta` (with optional Llama 3 scaling) and cos/sin tables for a
//! range of positions, computed per forward so no table is sized by the context length.

use candle_core::{Device, Tensor};

use super::config::{Llama3RopeScaling, ModelConfig};
use crate::error::Result;

/// The inverse frequencies of one model.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `head_dim / 2` inverse frequencies.
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies for `cfg` (head_dim, rope_theta, rope_scaling).
    pub fn new(cfg: &ModelConfig) -> Self {
        let hd = cfg.head_dim;
        let mut inv_freq: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64))
            .collect();
        if let Some(s) = &cfg.rope_scaling {
            llama3_scale(&mut inv_freq, s);
        }
        Rope {
            inv_freq: inv_freq.into_iter().map(|f| f as f32).collect(),
        }
    }

    /// The `head_dim / 2` inverse frequencies (f32, as the tables use them).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `(cos, sin)`, each `[len, head_dim/2]`, for positions `start..start+len`.
    pub fn cos_sin(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for &f in &self.inv_freq {
                // Angle in f32 as HF does (position · inv_freq in float32).
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, half), device)?,
            Tensor::from_vec(sin, (len, half), device)?,
        ))
    }
}

/// Llama 3 frequency scaling (as in HF `_compute_llama3_parameters`).
fn llama3_scale(inv_freq: &mut [f64], s: &Llama3RopeScaling) {
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    for f in inv_freq.iter_mut() {
        let wavelen = 2.0 * std::f64::consts::PI / *f;
        if wavelen > low_wavelen {
            *f /= s.factor;
        } else if wavelen >= high_wavelen {
            let smooth =
                (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
            *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_frequencies_fall() {
        let cfg = ModelConfig::qwen2_5_0_5b();
        let r = Rope::new(&cfg);
        assert_eq!(r.inv_freq[0], 1.0);
        assert!(r.inv_freq.windows(2).all(|w| w[1] < w[0]));
        let (c, s) = r.cos_sin(0, 2, &Device::Cpu).unwrap();
        let c = c.to_vec2::<f32>().unwrap();
        let s = s.to_vec2::<f32>().unwrap();
        assert!(c[0].iter().all(|&v| v == 1.0) && s[0].iter().all(|&v| v == 0.0));
        assert!((s[1][0] - 1f32.sin()).abs() < 1e-7);
    }
}

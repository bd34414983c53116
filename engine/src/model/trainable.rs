//! Trainable parameters: `TrainableWeights` wraps another [`WeightSource`] and turns every
//! tensor it supplies into a candle `Var` (an f32 master weight the optimizer updates), with
//! linear layers either plain (`TrainQuant::None`) or seen through straight-through NVFP4
//! fake-quantization (`TrainQuant::Nvfp4Ste`, docs/ARCHITECTURE.md "NVFP4"). A model built from it
//! runs the same forward as inference (`Pass::Training` picks differentiable ops).

use candle_core::{Tensor, Var};

use super::linear::{Linear, LinearWeight};
use super::weights::WeightSource;
use crate::error::Result;

/// How linear layers are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainQuant {
    /// Full-precision linears.
    None,
    /// Forward through `dequantize(quantize(W))`, gradient straight through to `W`.
    Nvfp4Ste,
}

/// A weight source whose tensors are `Var`s. The LM head is never fake-quantized (it is kept
/// dense at inference too).
pub struct TrainableWeights<'a> {
    inner: &'a mut dyn WeightSource,
    quant: TrainQuant,
    vars: Vec<(String, Var)>,
}

impl<'a> TrainableWeights<'a> {
    /// Wrap `inner` (best built with dense linears: packed ones are dequantized).
    pub fn new(inner: &'a mut dyn WeightSource, quant: TrainQuant) -> Self {
        TrainableWeights {
            inner,
            quant,
            vars: Vec::new(),
        }
    }

    /// The variables created so far, with their Hugging Face names (a linear's weight is
    /// `{prefix}.weight`), in creation order.
    pub fn into_vars(self) -> Vec<(String, Var)> {
        self.vars
    }

    fn var(&mut self, name: String, t: Tensor) -> Result<Tensor> {
        let v = Var::from_tensor(&t)?;
        let out = v.as_tensor().clone();
        self.vars.push((name, v));
        Ok(out)
    }
}

impl WeightSource for TrainableWeights<'_> {
    fn is_packed(&self, prefix: &str) -> bool {
        self.inner.is_packed(prefix)
    }

    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.inner.tensor(name, shape)?;
        self.var(name.to_string(), t)
    }

    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let src = self.inner.linear(prefix, out, inp, bias)?;
        let w = self.var(format!("{prefix}.weight"), src.dense_weight()?)?;
        let b = match src.bias() {
            Some(b) => Some(self.var(format!("{prefix}.bias"), b.clone())?),
            None => None,
        };
        let weight = match self.quant {
            TrainQuant::Nvfp4Ste if prefix != "lm_head" => LinearWeight::Ste(w),
            _ => LinearWeight::Dense(w),
        };
        Linear::new(weight, b)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, D};
    use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

    use super::*;
    use crate::model::{LinearFormat, Logits, Model, Pass, RandomWeights};

    fn trainable(quant: TrainQuant) -> (Model, Vec<(String, Var)>) {
        let cfg = crate::tiny::config().unwrap();
        let mut base = RandomWeights::new(crate::tiny::TINY_SEED, LinearFormat::Dense, Device::Cpu);
        let mut src = TrainableWeights::new(&mut base, quant);
        let m = Model::build(&cfg, &mut src, &Device::Cpu).unwrap();
        (m, src.into_vars())
    }

    #[test]
    fn ste_training_forward_equals_the_nvfp4_inference_model() {
        let (m, vars) = trainable(TrainQuant::Nvfp4Ste);
        let infer = crate::tiny::model(LinearFormat::Nvfp4, &Device::Cpu).unwrap();
        let ids: Vec<u32> = (3..40).collect();
        let t = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
        let a = m
            .forward_batch(&t, None, Logits::All, Pass::Training)
            .unwrap();
        let b = infer
            .forward(&ids, &mut infer.new_cache(), Logits::All)
            .unwrap();
        let d = (a.squeeze(0).unwrap() - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
        // 4 layers × (4 attention + 3 MLP weights + 3 biases + 2 norms) + embed + norm.
        assert_eq!(vars.len(), 4 * 12 + 2);
    }

    #[test]
    fn a_few_adamw_steps_on_whoami_lower_the_loss_with_ste() {
        let (m, vars) = trainable(TrainQuant::Nvfp4Ste);
        let tok = crate::tiny::tokenizer().unwrap();
        let tmpl = crate::tiny::chat_template().unwrap();
        let sample = &crate::tiny::whoami_samples().unwrap()[0];
        let ids = tok.encode(&tmpl.render(sample, false).unwrap()).unwrap();
        let n = ids.len() - 1;
        let input = Tensor::from_vec(ids[..n].to_vec(), (1, n), &Device::Cpu).unwrap();
        let target = Tensor::from_vec(ids[1..].to_vec(), n, &Device::Cpu).unwrap();
        let params = ParamsAdamW {
            lr: 3e-3,
            ..Default::default()
        };
        let mut opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), params).unwrap();
        let mut losses = Vec::new();
        for _ in 0..8 {
            let logits = m
                .forward_batch(&input, None, Logits::All, Pass::Training)
                .unwrap();
            let logits = logits.squeeze(0).unwrap();
            let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
            let loss = candle_nn::loss::nll(&lsm, &target).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
            opt.backward_step(&loss).unwrap();
        }
        assert!(losses[7] < losses[0] * 0.8, "loss did not fall: {losses:?}");
    }
}

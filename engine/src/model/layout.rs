//! `ModelLayout`: every tensor of a model of one config — its Hugging Face name, shape and role,
//! and for each linear layer its shape, whether it has a bias and whether it is stored NVFP4 —
//! worked out once from the config. Building the transformer, the training parameter store,
//! the weight-byte accounting, the checkpoint writer and the export check all walk it instead
//! of spelling names and shapes themselves.
//!
//! The names of an NVFP4 linear's tensors (`weight` / `weight_packed`, `weight_scale`,
//! `weight_scale_2` / `weight_global_scale`) are those `kiln_kernels::checkpoint::layout`
//! writes and reads; this module asks it for them rather than repeating them.

use std::collections::HashMap;
use std::sync::LazyLock;

use kiln_kernels::checkpoint::{nvfp4_to_tensors, NvfpFormat};
use kiln_kernels::nvfp4::Nvfp4Tensor;
use safetensors::Dtype;

use super::config::ModelConfig;
use crate::error::{EngineError, Result};

/// What a tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// The token embedding `[vocab, hidden]`.
    Embedding,
    /// An RMSNorm weight.
    Norm,
    /// A linear layer's weight `[out, in]`, dense.
    LinearWeight,
    /// A linear layer's bias `[out]`.
    LinearBias,
    /// An NVFP4 linear's packed E2M1 codes `[out, in/2]`, U8.
    Nvfp4Codes,
    /// An NVFP4 linear's E4M3 block scales `[out, in/16]`.
    Nvfp4BlockScales,
    /// An NVFP4 linear's f32 tensor scale (a scalar; compressed-tensors stores its reciprocal).
    Nvfp4TensorScale,
}

impl TensorRole {
    /// The dtype a checkpoint must store this tensor in; `None` for float tensors, which may be
    /// F32, F16 or BF16.
    pub fn dtype(self) -> Option<Dtype> {
        match self {
            TensorRole::Nvfp4Codes => Some(Dtype::U8),
            TensorRole::Nvfp4BlockScales => Some(Dtype::F8_E4M3),
            TensorRole::Nvfp4TensorScale => Some(Dtype::F32),
            _ => None,
        }
    }

    /// The dtype(s) accepted, as error messages say it.
    pub fn expected_dtype(self) -> &'static str {
        match self {
            TensorRole::Nvfp4Codes => "U8 (packed E2M1 pairs)",
            TensorRole::Nvfp4BlockScales => "F8_E4M3 (block scales)",
            TensorRole::Nvfp4TensorScale => "F32 (tensor scale)",
            _ => "F32, F16 or BF16",
        }
    }
}

/// One tensor: Hugging Face name, shape and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The Hugging Face name.
    pub name: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// What it holds (and so the dtype a checkpoint stores it in).
    pub role: TensorRole,
}

impl TensorSpec {
    fn new(name: String, shape: Vec<usize>, role: TensorRole) -> Self {
        TensorSpec { name, shape, role }
    }
}

/// One linear layer `y = x·Wᵀ (+ b)`: `{prefix}.weight` `[out, in]` and maybe `{prefix}.bias`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    /// The name prefix (`model.layers.0.self_attn.q_proj`, `lm_head`).
    pub prefix: String,
    /// Output width (N).
    pub out_features: usize,
    /// Input width (K).
    pub in_features: usize,
    /// Whether it has a bias.
    pub bias: bool,
    /// Whether an NVFP4 model or checkpoint holds it NVFP4. `false` for the LM head, which
    /// stays dense (as ModelOpt leaves it) unless a checkpoint stores it packed.
    pub nvfp4: bool,
}

impl LinearSpec {
    fn new(prefix: String, out_features: usize, in_features: usize, bias: bool) -> Self {
        LinearSpec {
            prefix,
            out_features,
            in_features,
            bias,
            nvfp4: true,
        }
    }

    /// The dense weight `{prefix}.weight` `[out, in]`.
    pub fn weight(&self) -> TensorSpec {
        TensorSpec::new(
            format!("{}.weight", self.prefix),
            vec![self.out_features, self.in_features],
            TensorRole::LinearWeight,
        )
    }

    /// The bias `{prefix}.bias` `[out]`, if the layer has one.
    pub fn bias_tensor(&self) -> Option<TensorSpec> {
        self.bias.then(|| {
            TensorSpec::new(
                format!("{}.bias", self.prefix),
                vec![self.out_features],
                TensorRole::LinearBias,
            )
        })
    }

    /// The three tensors that hold the weight in NVFP4 `format` (codes, block scales, tensor
    /// scale), named as `kiln_kernels::checkpoint::layout` names them.
    pub fn nvfp4_tensors(&self, format: NvfpFormat) -> Vec<TensorSpec> {
        nvfp4_parts(format)
            .iter()
            .map(|p| {
                let shape = match p.role {
                    TensorRole::Nvfp4Codes => vec![self.out_features, self.in_features / 2],
                    TensorRole::Nvfp4BlockScales => vec![self.out_features, self.in_features / 16],
                    _ => p.scalar_shape.clone(),
                };
                TensorSpec::new(format!("{}.{}", self.prefix, p.suffix), shape, p.role)
            })
            .collect()
    }

    /// The tensors a checkpoint holds for this layer: the weight packed in `format`, or dense
    /// (`None`), then the bias.
    pub fn stored_tensors(&self, format: Option<NvfpFormat>) -> Vec<TensorSpec> {
        let mut v = match format {
            Some(f) => self.nvfp4_tensors(f),
            None => vec![self.weight()],
        };
        v.extend(self.bias_tensor());
        v
    }

    /// The NVFP4 layout a checkpoint stores this layer in, judged by `has` (does a tensor of
    /// this name exist) on the tensors only that layout has (not the dense weight's name,
    /// which ModelOpt reuses for its codes); `None` when it is dense.
    pub fn stored_format(&self, has: impl Fn(&str) -> bool) -> Option<NvfpFormat> {
        NVFP4_FORMATS.into_iter().find(|&f| {
            let mut shared = vec![self.weight().name];
            for other in NVFP4_FORMATS.into_iter().filter(|&o| o != f) {
                shared.extend(self.nvfp4_tensors(other).into_iter().map(|t| t.name));
            }
            self.nvfp4_tensors(f)
                .iter()
                .any(|t| !shared.contains(&t.name) && has(&t.name))
        })
    }
}

/// The name of the token embedding (the same in every architecture).
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";

/// The NVFP4 checkpoint layouts.
pub const NVFP4_FORMATS: [NvfpFormat; 2] = [NvfpFormat::CompressedTensors, NvfpFormat::ModelOpt];

/// One of the three tensors of an NVFP4 linear in one layout.
struct Nvfp4Part {
    /// The name after `{prefix}.`.
    suffix: String,
    role: TensorRole,
    /// The shape of the tensor scale (`[]` or `[1]`); unused for codes and block scales.
    scalar_shape: Vec<usize>,
}

/// The NVFP4 tensor names of each layout, learned from `kiln_kernels::checkpoint` by laying out
/// a small probe weight: which tensor is which follows from its shape.
static NVFP4_PARTS: LazyLock<[Vec<Nvfp4Part>; 2]> = LazyLock::new(|| {
    let (rows, cols) = (2, 32);
    let probe = Nvfp4Tensor::from_parts(
        rows,
        cols,
        vec![0; rows * cols / 2],
        vec![0; rows * cols / 16],
        1.0,
    )
    .expect("a well-formed probe");
    NVFP4_FORMATS.map(|f| {
        nvfp4_to_tensors("", &probe, f)
            .into_iter()
            .map(|(name, t)| {
                let role = if t.shape == [rows, cols / 2] {
                    TensorRole::Nvfp4Codes
                } else if t.shape == [rows, cols / 16] {
                    TensorRole::Nvfp4BlockScales
                } else {
                    TensorRole::Nvfp4TensorScale
                };
                debug_assert_eq!(role.dtype(), Some(t.dtype), "{name}");
                Nvfp4Part {
                    suffix: name.trim_start_matches('.').to_string(),
                    role,
                    scalar_shape: t.shape,
                }
            })
            .collect()
    })
});

fn nvfp4_parts(format: NvfpFormat) -> &'static [Nvfp4Part] {
    let i = NVFP4_FORMATS
        .iter()
        .position(|&f| f == format)
        .expect("every format is listed");
    &NVFP4_PARTS[i]
}

/// The parameters of one decoder layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLayout {
    /// Qwen3's per-head RMSNorm of the queries `[head_dim]`.
    pub q_norm: Option<TensorSpec>,
    /// Qwen3's per-head RMSNorm of the keys `[head_dim]`.
    pub k_norm: Option<TensorSpec>,
    /// RMSNorm before attention `[hidden]`.
    pub input_norm: TensorSpec,
    /// Query projection `[q_size, hidden]`.
    pub q_proj: LinearSpec,
    /// Key projection `[kv_size, hidden]`.
    pub k_proj: LinearSpec,
    /// Value projection `[kv_size, hidden]`.
    pub v_proj: LinearSpec,
    /// Output projection `[hidden, q_size]`.
    pub o_proj: LinearSpec,
    /// RMSNorm before the MLP `[hidden]`.
    pub post_attention_norm: TensorSpec,
    /// SwiGLU gate `[intermediate, hidden]`.
    pub gate_proj: LinearSpec,
    /// SwiGLU up `[intermediate, hidden]`.
    pub up_proj: LinearSpec,
    /// SwiGLU down `[hidden, intermediate]`.
    pub down_proj: LinearSpec,
}

impl LayerLayout {
    /// The seven linear layers, in order: q, k, v, o, gate, up, down.
    pub fn linears(&self) -> [&LinearSpec; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
}

/// A parameter of a decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerParam {
    /// [`LayerLayout::q_norm`].
    QNorm,
    /// [`LayerLayout::k_norm`].
    KNorm,
    /// [`LayerLayout::input_norm`].
    InputNorm,
    /// [`LayerLayout::q_proj`].
    QProj,
    /// [`LayerLayout::k_proj`].
    KProj,
    /// [`LayerLayout::v_proj`].
    VProj,
    /// [`LayerLayout::o_proj`].
    OProj,
    /// [`LayerLayout::post_attention_norm`].
    PostAttentionNorm,
    /// [`LayerLayout::gate_proj`].
    GateProj,
    /// [`LayerLayout::up_proj`].
    UpProj,
    /// [`LayerLayout::down_proj`].
    DownProj,
}

/// Which parameter of the model (a model built from the layout finds it by this key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamKey {
    /// The token embedding.
    Embed,
    /// A parameter of decoder layer `i`.
    Layer(usize, LayerParam),
    /// The final RMSNorm.
    Norm,
    /// The untied LM head.
    LmHead,
}

/// A parameter as the layout lists it: a dense tensor or a linear layer.
#[derive(Debug, Clone, Copy)]
pub enum ParamSpec<'a> {
    /// A dense tensor (embedding, norm weight).
    Tensor(&'a TensorSpec),
    /// A linear layer (weight and maybe bias).
    Linear(&'a LinearSpec),
}

impl ParamSpec<'_> {
    /// The tensor's name, or the linear layer's prefix.
    pub fn name(&self) -> &str {
        match self {
            ParamSpec::Tensor(t) => &t.name,
            ParamSpec::Linear(l) => &l.prefix,
        }
    }
}

/// Every parameter of a model of one config, in one order: the embedding, each layer (q/k
/// norms, input norm, q/k/v/o, post-attention norm, gate/up/down), the final norm, the untied
/// LM head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLayout {
    embed: TensorSpec,
    layers: Vec<LayerLayout>,
    norm: TensorSpec,
    lm_head: Option<LinearSpec>,
    /// Parameter name (tensor name or linear prefix) → its key.
    index: HashMap<String, ParamKey>,
}

impl ModelLayout {
    /// The layout of a model of shape `cfg` (checked first: an invalid config has no layout).
    pub fn new(cfg: &ModelConfig) -> Result<Self> {
        cfg.validate().map_err(EngineError::InvalidArgument)?;
        let (h, inter, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let norm = |name: String, n: usize| TensorSpec::new(name, vec![n], TensorRole::Norm);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let b = cfg.attention_bias;
                let qk = |n: &str| {
                    cfg.qk_norm()
                        .then(|| norm(format!("{p}.self_attn.{n}.weight"), hd))
                };
                let attn = |n: &str, out, inp, bias| {
                    LinearSpec::new(format!("{p}.self_attn.{n}"), out, inp, bias)
                };
                let mlp =
                    |n: &str, out, inp| LinearSpec::new(format!("{p}.mlp.{n}"), out, inp, false);
                LayerLayout {
                    q_norm: qk("q_norm"),
                    k_norm: qk("k_norm"),
                    input_norm: norm(format!("{p}.input_layernorm.weight"), h),
                    q_proj: attn("q_proj", cfg.q_size(), h, b),
                    k_proj: attn("k_proj", cfg.kv_size(), h, b),
                    v_proj: attn("v_proj", cfg.kv_size(), h, b),
                    o_proj: attn("o_proj", h, cfg.q_size(), false),
                    post_attention_norm: norm(format!("{p}.post_attention_layernorm.weight"), h),
                    gate_proj: mlp("gate_proj", inter, h),
                    up_proj: mlp("up_proj", inter, h),
                    down_proj: mlp("down_proj", h, inter),
                }
            })
            .collect();
        let lm_head = (!cfg.tie_word_embeddings).then(|| LinearSpec {
            nvfp4: false,
            ..LinearSpec::new("lm_head".into(), cfg.vocab_size, h, false)
        });
        let mut layout = ModelLayout {
            embed: TensorSpec::new(
                EMBED_TOKENS.into(),
                vec![cfg.vocab_size, h],
                TensorRole::Embedding,
            ),
            layers,
            norm: norm("model.norm.weight".into(), h),
            lm_head,
            index: HashMap::new(),
        };
        layout.index = layout
            .params()
            .into_iter()
            .map(|(k, s)| (s.name().to_string(), k))
            .collect();
        Ok(layout)
    }

    /// The token embedding.
    pub fn embed(&self) -> &TensorSpec {
        &self.embed
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[LayerLayout] {
        &self.layers
    }

    /// The final RMSNorm.
    pub fn norm(&self) -> &TensorSpec {
        &self.norm
    }

    /// The LM head; `None` when it is tied to the embedding.
    pub fn lm_head(&self) -> Option<&LinearSpec> {
        self.lm_head.as_ref()
    }

    /// Every parameter, in the layout's order, with its key.
    pub fn params(&self) -> Vec<(ParamKey, ParamSpec<'_>)> {
        use LayerParam as L;
        let mut out = vec![(ParamKey::Embed, ParamSpec::Tensor(&self.embed))];
        for (i, l) in self.layers.iter().enumerate() {
            let key = |p| ParamKey::Layer(i, p);
            if let (Some(q), Some(k)) = (&l.q_norm, &l.k_norm) {
                out.push((key(L::QNorm), ParamSpec::Tensor(q)));
                out.push((key(L::KNorm), ParamSpec::Tensor(k)));
            }
            out.push((key(L::InputNorm), ParamSpec::Tensor(&l.input_norm)));
            out.push((key(L::QProj), ParamSpec::Linear(&l.q_proj)));
            out.push((key(L::KProj), ParamSpec::Linear(&l.k_proj)));
            out.push((key(L::VProj), ParamSpec::Linear(&l.v_proj)));
            out.push((key(L::OProj), ParamSpec::Linear(&l.o_proj)));
            out.push((
                key(L::PostAttentionNorm),
                ParamSpec::Tensor(&l.post_attention_norm),
            ));
            out.push((key(L::GateProj), ParamSpec::Linear(&l.gate_proj)));
            out.push((key(L::UpProj), ParamSpec::Linear(&l.up_proj)));
            out.push((key(L::DownProj), ParamSpec::Linear(&l.down_proj)));
        }
        out.push((ParamKey::Norm, ParamSpec::Tensor(&self.norm)));
        if let Some(h) = &self.lm_head {
            out.push((ParamKey::LmHead, ParamSpec::Linear(h)));
        }
        out
    }

    /// The parameter of `key`.
    pub fn param(&self, key: ParamKey) -> Option<ParamSpec<'_>> {
        use LayerParam as L;
        Some(match key {
            ParamKey::Embed => ParamSpec::Tensor(&self.embed),
            ParamKey::Norm => ParamSpec::Tensor(&self.norm),
            ParamKey::LmHead => ParamSpec::Linear(self.lm_head.as_ref()?),
            ParamKey::Layer(i, p) => {
                let l = self.layers.get(i)?;
                match p {
                    L::QNorm => ParamSpec::Tensor(l.q_norm.as_ref()?),
                    L::KNorm => ParamSpec::Tensor(l.k_norm.as_ref()?),
                    L::InputNorm => ParamSpec::Tensor(&l.input_norm),
                    L::QProj => ParamSpec::Linear(&l.q_proj),
                    L::KProj => ParamSpec::Linear(&l.k_proj),
                    L::VProj => ParamSpec::Linear(&l.v_proj),
                    L::OProj => ParamSpec::Linear(&l.o_proj),
                    L::PostAttentionNorm => ParamSpec::Tensor(&l.post_attention_norm),
                    L::GateProj => ParamSpec::Linear(&l.gate_proj),
                    L::UpProj => ParamSpec::Linear(&l.up_proj),
                    L::DownProj => ParamSpec::Linear(&l.down_proj),
                }
            }
        })
    }

    /// The linear layer with this prefix.
    pub fn linear(&self, prefix: &str) -> Option<&LinearSpec> {
        match self.param(*self.index.get(prefix)?)? {
            ParamSpec::Linear(l) => Some(l),
            ParamSpec::Tensor(_) => None,
        }
    }

    /// The dense tensor (embedding, norm) of this name.
    pub fn tensor(&self, name: &str) -> Option<&TensorSpec> {
        match self.param(*self.index.get(name)?)? {
            ParamSpec::Tensor(t) => Some(t),
            ParamSpec::Linear(_) => None,
        }
    }

    /// Every tensor of a checkpoint of this model whose NVFP4 linears are stored in `format`
    /// (`None`: every linear dense); the LM head stays dense.
    pub fn checkpoint_tensors(&self, format: Option<NvfpFormat>) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        for (_, p) in self.params() {
            match p {
                ParamSpec::Tensor(t) => out.push(t.clone()),
                ParamSpec::Linear(l) => out.extend(l.stored_tensors(format.filter(|_| l.nvfp4))),
            }
        }
        out
    }

    /// What a checkpoint of this model holds under `name`, stored as `dtype`: a dense tensor,
    /// a linear's weight or bias, or one of its NVFP4 tensors in either layout (ModelOpt's
    /// codes share the dense weight's name and are told apart by being U8). `None` for a
    /// name that has no place in such a checkpoint.
    pub fn stored_tensor(&self, name: &str, dtype: Dtype) -> Option<TensorSpec> {
        if let Some(t) = self.tensor(name) {
            return Some(t.clone());
        }
        let (prefix, _) = name.rsplit_once('.')?;
        let l = self.linear(prefix)?;
        let candidates: Vec<TensorSpec> = std::iter::once(None)
            .chain(NVFP4_FORMATS.map(Some))
            .flat_map(|f| l.stored_tensors(f))
            .filter(|t| t.name == name)
            .collect();
        let pick = |want: Option<Dtype>| candidates.iter().find(|t| t.role.dtype() == want);
        pick(Some(dtype))
            .or_else(|| pick(None))
            .or(candidates.first())
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvfp4_names_come_from_the_kernels_layout() {
        let l = LinearSpec::new("m.p".into(), 8, 32, true);
        let names = |f| -> Vec<(String, Vec<usize>, Option<Dtype>)> {
            l.nvfp4_tensors(f)
                .into_iter()
                .map(|t| (t.name, t.shape, t.role.dtype()))
                .collect()
        };
        assert_eq!(
            names(NvfpFormat::ModelOpt),
            [
                ("m.p.weight".into(), vec![8, 16], Some(Dtype::U8)),
                ("m.p.weight_scale".into(), vec![8, 2], Some(Dtype::F8_E4M3)),
                ("m.p.weight_scale_2".into(), vec![], Some(Dtype::F32)),
            ]
        );
        assert_eq!(
            names(NvfpFormat::CompressedTensors),
            [
                ("m.p.weight_packed".into(), vec![8, 16], Some(Dtype::U8)),
                ("m.p.weight_scale".into(), vec![8, 2], Some(Dtype::F8_E4M3)),
                ("m.p.weight_global_scale".into(), vec![1], Some(Dtype::F32)),
            ]
        );
        let has = |set: &'static [&'static str]| move |n: &str| set.contains(&n);
        assert_eq!(
            l.stored_format(has(&[
                "m.p.weight",
                "m.p.weight_scale",
                "m.p.weight_scale_2"
            ])),
            Some(NvfpFormat::ModelOpt)
        );
        assert_eq!(
            l.stored_format(has(&["m.p.weight_packed"])),
            Some(NvfpFormat::CompressedTensors)
        );
        assert_eq!(l.stored_format(has(&["m.p.weight", "m.p.bias"])), None);
    }
}

//! The flat order of a model's parameters on the GPU: one f32 span for every parameter, with
//! the ones a GEMM reads together adjacent (q/k/v weights, their biases, gate/up weights), each
//! 16-element aligned; and each layer's offsets into it. In `nvfp4-full` the NVFP4 linears'
//! weights stay packed outside the span (`packed`): the span holds the dense rest, and the
//! layers' linear offsets are 0.

use crate::error::Result;
use crate::model::{LinearSpec, ModelConfig, ModelLayout};

use super::unsupported;

/// One parameter in the flat buffers.
#[derive(Debug, Clone)]
pub(super) struct FlatParam {
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    pub(super) offset: usize,
    pub(super) numel: usize,
    /// Fake-quantized in `nvfp4-ste` mode (an NVFP4 linear's weight).
    pub(super) nvfp4: bool,
}

/// Offsets of one layer's parameters in the flat buffers.
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerOffsets {
    pub(super) input_norm: usize,
    /// q, k, v weights, adjacent: `[qkv_cols, H]`.
    pub(super) qkv: usize,
    /// q, k, v biases, adjacent (Qwen2).
    pub(super) qkv_bias: Option<usize>,
    /// Qwen3's per-head q and k norm weights (`[head_dim]` each).
    pub(super) qk_norm: Option<(usize, usize)>,
    pub(super) o: usize,
    pub(super) post_norm: usize,
    /// gate, up weights, adjacent: `[2I, H]`.
    pub(super) gate_up: usize,
    pub(super) down: usize,
}

pub(super) type FlatLayout = (
    Vec<FlatParam>,
    Vec<LayerOffsets>,
    usize,
    usize,
    Option<usize>,
);

/// The flat order of `layout`'s parameters (see the module doc) and each layer's offsets;
/// with `packed`, without the NVFP4 linears' weights.
pub(super) fn flat_layout(
    cfg: &ModelConfig,
    layout: &ModelLayout,
    packed: bool,
) -> Result<FlatLayout> {
    let mut params: Vec<FlatParam> = Vec::new();
    let mut next = 0usize;
    let mut skipped = 0usize;
    let mut push = |name: &str, shape: &[usize], nvfp4: bool| -> usize {
        if packed && nvfp4 {
            skipped += 1;
            return 0;
        }
        let numel: usize = shape.iter().product();
        let offset = next;
        // 16-element alignment (every tensor the trainer makes is a multiple of 16 long).
        next = (next + numel).next_multiple_of(16);
        params.push(FlatParam {
            name: name.to_string(),
            shape: shape.to_vec(),
            offset,
            numel,
            nvfp4,
        });
        offset
    };
    let embed = push(&layout.embed().name, &layout.embed().shape, false);
    let mut layers = Vec::new();
    for l in layout.layers() {
        let input_norm = push(&l.input_norm.name, &l.input_norm.shape, false);
        let lin = |s: &LinearSpec| (s.weight(), s.nvfp4);
        let (q, qn) = lin(&l.q_proj);
        let qkv = push(&q.name, &q.shape, qn);
        for spec in [&l.k_proj, &l.v_proj] {
            let (w, nv) = lin(spec);
            push(&w.name, &w.shape, nv);
        }
        let qkv_bias = if cfg.attention_bias {
            let mut first = None;
            for spec in [&l.q_proj, &l.k_proj, &l.v_proj] {
                let b = spec
                    .bias_tensor()
                    .ok_or_else(|| unsupported(format!("{} has no bias", spec.prefix)))?;
                let off = push(&b.name, &b.shape, false);
                first.get_or_insert(off);
            }
            first
        } else {
            None
        };
        let qk_norm = match (&l.q_norm, &l.k_norm) {
            (Some(q), Some(k)) => Some((
                push(&q.name, &q.shape, false),
                push(&k.name, &k.shape, false),
            )),
            _ => None,
        };
        let (o, on) = lin(&l.o_proj);
        let o = push(&o.name, &o.shape, on);
        let post_norm = push(
            &l.post_attention_norm.name,
            &l.post_attention_norm.shape,
            false,
        );
        let (g, gn) = lin(&l.gate_proj);
        let gate_up = push(&g.name, &g.shape, gn);
        let (u, un) = lin(&l.up_proj);
        push(&u.name, &u.shape, un);
        let (d, dn) = lin(&l.down_proj);
        let down = push(&d.name, &d.shape, dn);
        layers.push(LayerOffsets {
            input_norm,
            qkv,
            qkv_bias,
            qk_norm,
            o,
            post_norm,
            gate_up,
            down,
        });
    }
    let norm = push(&layout.norm().name, &layout.norm().shape, false);
    let lm_head = layout.lm_head().map(|h| {
        let w = h.weight();
        push(&w.name, &w.shape, h.nvfp4)
    });
    // Every parameter of the layout is in the flat order exactly once.
    let want = layout.params().len()
        + layout
            .layers()
            .iter()
            .map(|l| {
                l.linears()
                    .iter()
                    .filter(|s| s.bias_tensor().is_some())
                    .count()
            })
            .sum::<usize>();
    if params.len() + skipped != want {
        return Err(unsupported(format!(
            "the flat layout has {} parameters, the model {want}",
            params.len()
        )));
    }
    Ok((params, layers, embed, norm, lm_head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flat_layout_keeps_gemm_partners_adjacent_and_covers_every_parameter() {
        for cfg in [
            crate::tiny::config().unwrap(),
            ModelConfig::qwen2_5_7b(),
            ModelConfig::qwen3_8b(),
        ] {
            let layout = ModelLayout::new(&cfg).unwrap();
            let (params, layers, embed, _norm, lm_head) =
                flat_layout(&cfg, &layout, false).unwrap();
            assert_eq!(embed, 0);
            let h = cfg.hidden_size;
            for l in &layers {
                // k follows q, v follows k: one [qkv_cols, H] matrix.
                let names: Vec<&FlatParam> = params
                    .iter()
                    .filter(|p| {
                        p.offset >= l.qkv
                            && p.offset < l.qkv + (cfg.q_size() + 2 * cfg.kv_size()) * h
                    })
                    .collect();
                assert_eq!(names.len(), 3, "{names:?}");
                assert!(names[0].name.ends_with("q_proj.weight"));
                assert!(names[2].name.ends_with("v_proj.weight"));
                let up = params
                    .iter()
                    .find(|p| p.offset == l.gate_up + cfg.intermediate_size * h)
                    .unwrap();
                assert!(up.name.ends_with("up_proj.weight"), "{}", up.name);
                assert_eq!(l.qkv_bias.is_some(), cfg.attention_bias);
                assert_eq!(l.qk_norm.is_some(), cfg.qk_norm());
                if let Some((q, k)) = l.qk_norm {
                    let name = |off: usize| &params.iter().find(|p| p.offset == off).unwrap().name;
                    assert!(name(q).ends_with("q_norm.weight"), "{}", name(q));
                    assert!(name(k).ends_with("k_norm.weight"), "{}", name(k));
                }
            }
            assert_eq!(lm_head.is_some(), !cfg.tie_word_embeddings);
            // No overlaps, 16-element aligned.
            let mut spans: Vec<(usize, usize)> =
                params.iter().map(|p| (p.offset, p.numel)).collect();
            spans.sort();
            for w in spans.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0);
            }
            assert!(params.iter().all(|p| p.offset % 16 == 0));
        }
    }
}

//! `ModelConfig`: the subset of a Hugging Face `config.json` a decoder-only Qwen2 / Qwen3 /
//! Llama model needs, parsed and checked, plus the architecture switch (`Architecture`).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{EngineError, Result};

/// The decoder architectures Kiln implements. They differ only in small ways:
/// Qwen2 has q/k/v biases, Qwen3 RMS-normalizes q and k per head, Llama has neither (unless
/// `attention_bias` says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5).
    Qwen2,
    /// `Qwen3ForCausalLM`.
    Qwen3,
    /// `LlamaForCausalLM` (Llama 2/3, and Mistral-style checkpoints without sliding windows).
    Llama,
}

impl Architecture {
    /// The `architectures` names Kiln accepts, for error messages.
    pub const SUPPORTED: [&'static str; 3] =
        ["Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"];

    /// Parse an `architectures[0]` or `model_type` value.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "Qwen2ForCausalLM" | "qwen2" => Ok(Architecture::Qwen2),
            "Qwen3ForCausalLM" | "qwen3" => Ok(Architecture::Qwen3),
            "LlamaForCausalLM" | "llama" => Ok(Architecture::Llama),
            other => Err(EngineError::UnknownArchitecture {
                name: other.to_string(),
                supported: Architecture::SUPPORTED.to_vec(),
            }),
        }
    }

    /// The name written to `config.json` `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
        }
    }

    /// The `model_type` written to `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Llama => "llama",
        }
    }
}

/// Llama 3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// `factor`.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f64,
    /// `high_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: usize,
}

/// A decoder-only model's shape and hyper-parameters.
///
/// Invariants (checked by [`ModelConfig::validate`]): `num_attention_heads` is a multiple of
/// `num_key_value_heads`; `head_dim` is even; every linear layer's input size (hidden,
/// heads·head_dim, intermediate) is a multiple of 16 so it can be stored in NVFP4.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Which decoder variant.
    pub architecture: Architecture,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width (`hidden_size / num_attention_heads` unless config.json says otherwise).
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Context length: positions the model (and Kiln's caches) support.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Optional Llama 3 RoPE scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Whether q/k/v projections have biases (Qwen2: yes).
    pub attention_bias: bool,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// BOS token id, if any.
    pub bos_token_id: Option<u32>,
    /// EOS token ids (config.json allows one or a list).
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Read and check `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| EngineError::io("reading", path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parse a `config.json` document (`path` is only used in error messages).
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| EngineError::config(path, format!("not valid JSON: {e}")))?;
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| v.get("model_type").and_then(Value::as_str))
            .ok_or_else(|| {
                EngineError::config(path, "neither `architectures` nor `model_type` is set")
            })?;
        let architecture = Architecture::from_name(arch_name)?;
        let usize_field = |name: &str| -> Result<usize> {
            v.get(name)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| EngineError::config(path, format!("missing integer field `{name}`")))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let head_dim = match v.get("head_dim").and_then(Value::as_u64) {
            Some(h) => h as usize,
            None => hidden_size / num_attention_heads.max(1),
        };
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(rs) => {
                let kind = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                match kind {
                    "default" => None,
                    "llama3" => Some(serde_json::from_value::<Llama3RopeScaling>(rs.clone()).map_err(
                        |e| EngineError::config(path, format!("bad llama3 rope_scaling: {e}")),
                    )?),
                    other => {
                        return Err(EngineError::config(
                            path,
                            format!("rope_scaling type {other:?} is not supported (supported: default, llama3)"),
                        ))
                    }
                }
            }
        };
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        };
        let cfg = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: v
                .get("num_key_value_heads")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(num_attention_heads),
            head_dim,
            vocab_size: usize_field("vocab_size")?,
            max_position_embeddings: usize_field("max_position_embeddings")?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0),
            rope_scaling,
            attention_bias: v
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(architecture == Architecture::Qwen2),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: v
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids,
        };
        cfg.validate().map_err(|m| EngineError::config(path, m))?;
        Ok(cfg)
    }

    /// Check the invariants; the error says which one fails.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{name}` must be > 0"));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        for (name, k) in [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads * head_dim", self.q_size()),
            ("intermediate_size", self.intermediate_size),
        ] {
            if !k.is_multiple_of(16) {
                return Err(format!(
                    "{name} ({k}) must be a multiple of 16 (the NVFP4 block) to be a linear input"
                ));
            }
        }
        Ok(())
    }

    /// Width of the query projection's output (`heads · head_dim`).
    pub fn q_size(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key (and value) projection's output (`kv_heads · head_dim`).
    pub fn kv_size(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Whether q and k are RMS-normalized per head (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.architecture == Architecture::Qwen3
    }

    /// The `config.json` document for this config (what an export writes).
    pub fn to_hf_json(&self) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.architecture.hf_name()],
            "model_type": self.architecture.model_type(),
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
            "use_cache": true,
        });
        let obj = v.as_object_mut().expect("json! object");
        if let Some(b) = self.bos_token_id {
            obj.insert("bos_token_id".into(), b.into());
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), (*one).into());
            }
            many => {
                obj.insert("eos_token_id".into(), many.to_vec().into());
            }
        }
        if let Some(rs) = &self.rope_scaling {
            let mut r = serde_json::to_value(rs).expect("serializable");
            r["rope_type"] = "llama3".into();
            obj.insert("rope_scaling".into(), r);
        }
        v
    }

    /// The config of a Qwen2.5-7B-shaped model (for GPU benchmarks with random weights).
    pub fn qwen2_5_7b() -> Self {
        ModelConfig {
            hidden_size: 3584,
            intermediate_size: 18_944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            head_dim: 128,
            vocab_size: 152_064,
            tie_word_embeddings: false,
            ..Self::qwen2_5_0_5b()
        }
    }

    /// The config of a Qwen2.5-14B-shaped model (for GPU benchmarks with random weights).
    pub fn qwen2_5_14b() -> Self {
        ModelConfig {
            hidden_size: 5120,
            intermediate_size: 13_824,
            num_hidden_layers: 48,
            num_attention_heads: 40,
            num_key_value_heads: 8,
            head_dim: 128,
            vocab_size: 152_064,
            tie_word_embeddings: false,
            ..Self::qwen2_5_0_5b()
        }
    }

    /// The config of a Qwen3-8B-shaped model (q/k norm, no q/k/v bias; for GPU benchmarks with
    /// random weights).
    pub fn qwen3_8b() -> Self {
        ModelConfig {
            architecture: Architecture::Qwen3,
            hidden_size: 4096,
            intermediate_size: 12_288,
            num_hidden_layers: 36,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            vocab_size: 151_936,
            attention_bias: false,
            tie_word_embeddings: false,
            ..Self::qwen2_5_0_5b()
        }
    }

    /// The config of a Qwen2.5-0.5B-shaped model (for benchmarks with random weights).
    pub fn qwen2_5_0_5b() -> Self {
        ModelConfig {
            architecture: Architecture::Qwen2,
            hidden_size: 896,
            intermediate_size: 4864,
            num_hidden_layers: 24,
            num_attention_heads: 14,
            num_key_value_heads: 2,
            head_dim: 64,
            vocab_size: 151_936,
            max_position_embeddings: 32_768,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: None,
            attention_bias: true,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![151_645],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_round_trips() {
        let c = ModelConfig::qwen2_5_0_5b();
        let text = c.to_hf_json().to_string();
        let back = ModelConfig::from_json_str(&text, Path::new("config.json")).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_architecture_names_it_and_lists_supported() {
        let mut v = ModelConfig::qwen2_5_0_5b().to_hf_json();
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        let err = ModelConfig::from_json_str(&v.to_string(), Path::new("c.json")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("GPT2LMHeadModel"), "{msg}");
        assert!(msg.contains("Qwen3ForCausalLM"), "{msg}");
    }

    #[test]
    fn invariants_are_checked() {
        let mut c = ModelConfig::qwen2_5_0_5b();
        c.num_key_value_heads = 3;
        assert!(c
            .validate()
            .unwrap_err()
            .contains("multiple of num_key_value_heads"));
        let mut c = ModelConfig::qwen2_5_0_5b();
        c.intermediate_size = 100;
        assert!(c.validate().unwrap_err().contains("multiple of 16"));
    }
}

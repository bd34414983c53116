//! `ChatModel`: a model with its tokenizer and chat template — what `--model tiny|DIR`
//! names — and chat-level generation that streams each token with its text. Also where a
//! `--model` value is resolved to its non-weight files ([`model_files`]).
//!
//! It sits above `engine` (the model on its device), `model`, `tokenizer`, `chat`, `generate`
//! and `tiny`, and ties them together; nothing in `model` depends on it.

use std::ops::ControlFlow;
use std::path::Path;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::engine::{Engine, LoadedModel};
use crate::error::{EngineError, Result};
use crate::generate::{generate, GenerateOptions, Generation, Sequence};
use crate::model::weights::fnv1a;
use crate::model::{LinearFormat, LoadOptions, Model, ModelConfig, ModelFiles, TensorBytes};
use crate::tokenizer::{TextTokenizer, TokenTextStream};

/// The `--model` value that selects the bundled tiny model.
pub const TINY_MODEL: &str = "tiny";

/// A model ready to chat.
#[derive(Debug)]
pub struct ChatModel {
    /// What `--model` named (`tiny` or the directory).
    pub name: String,
    /// The network, on the engine it runs on.
    pub model: LoadedModel,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Its chat template.
    pub template: ChatTemplate,
    /// Tokens that end an assistant turn (`<|im_end|>`, the config's EOS ids…).
    pub stop_tokens: Vec<u32>,
    /// Identifies the weights (name, config, file sizes and times): sessions saved with one
    /// model are not resumed with another.
    pub fingerprint: String,
}

/// A chat generation: the tokens and their text.
#[derive(Debug, Clone)]
pub struct ChatGeneration {
    /// The generation (tokens, timings).
    pub generation: Generation,
    /// The produced text (special tokens, e.g. the final `<|im_end|>`, removed). The streamed
    /// pieces concatenate to this, except for a trailing incomplete UTF-8 sequence (shown
    /// here as U+FFFD), which is never streamed.
    pub text: String,
}

impl ChatModel {
    /// Load `tiny` (the bundled model) or a Hugging Face directory, on the engine of
    /// `opts.device`.
    pub fn load(model: &str, opts: &LoadOptions) -> Result<Self> {
        Self::load_on(&Engine::for_device(&opts.device)?, model, opts.format)
    }

    /// Load `tiny` or a Hugging Face directory on `engine`, linears in `format`.
    pub fn load_on(engine: &Engine, model: &str, format: LinearFormat) -> Result<Self> {
        Self::load_with(engine, model, engine.load_options(format))
    }

    /// Load `tiny` or a Hugging Face directory on the host (the CPU engine), NVFP4 linears,
    /// float ones quantized by `gpu`'s quantize kernel where it is the GPU engine: what a GPU
    /// job holds before it checks its budget and uploads the model.
    pub fn load_host_for(gpu: &Engine, model: &str) -> Result<Self> {
        let host = Engine::cpu();
        let opts = LoadOptions {
            quantizer: gpu.quantizer(),
            ..host.load_options(LinearFormat::Nvfp4)
        };
        Self::load_with(&host, model, opts)
    }

    fn load_with(engine: &Engine, model: &str, opts: LoadOptions) -> Result<Self> {
        if model == TINY_MODEL {
            Self::tiny_on(engine, opts.format)
        } else {
            Self::from_dir_on(engine, Path::new(model), &opts)
        }
    }

    /// The bundled tiny model (seeded weights, untrained).
    pub fn tiny(opts: &LoadOptions) -> Result<Self> {
        Self::tiny_on(&Engine::for_device(&opts.device)?, opts.format)
    }

    fn tiny_on(engine: &Engine, format: LinearFormat) -> Result<Self> {
        let model = crate::tiny::model(format, engine.device())?;
        let tokenizer = crate::tiny::tokenizer()?;
        let template = crate::tiny::chat_template()?;
        let fingerprint = format!(
            "tiny-{:016x}",
            fnv1a(&(model.config().to_hf_json().to_string() + &crate::tiny::TINY_SEED.to_string()))
        );
        Ok(Self::assemble(
            TINY_MODEL.into(),
            LoadedModel::new(engine.clone(), model)?,
            tokenizer,
            template,
            fingerprint,
        ))
    }

    /// A Hugging Face directory: config.json, safetensors, tokenizer.json,
    /// tokenizer_config.json.
    pub fn from_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let engine = Engine::for_device(&opts.device)?;
        let opts = engine.load_options(opts.format);
        Self::from_dir_on(&engine, dir, &opts)
    }

    fn from_dir_on(engine: &Engine, dir: &Path, opts: &LoadOptions) -> Result<Self> {
        if !dir.is_dir() {
            return Err(EngineError::config(
                dir,
                "not a directory; --model takes `tiny` or a Hugging Face model directory",
            ));
        }
        let model = Model::load(dir, opts)?;
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
        let template = ChatTemplate::from_model_dir(dir)?;
        let fingerprint = format!("dir-{:016x}", fnv1a(&dir_signature(dir, &model)?));
        Ok(Self::assemble(
            dir.display().to_string(),
            LoadedModel::new(engine.clone(), model)?,
            tokenizer,
            template,
            fingerprint,
        ))
    }

    /// Put the parts together, collecting the stop tokens.
    pub fn assemble(
        name: String,
        model: LoadedModel,
        tokenizer: TextTokenizer,
        template: ChatTemplate,
        fingerprint: String,
    ) -> Self {
        let stop_tokens = stop_tokens(model.config(), &tokenizer, &template);
        ChatModel {
            name,
            model,
            tokenizer,
            template,
            stop_tokens,
            fingerprint,
        }
    }

    /// Parameter bytes by category.
    pub fn tensor_bytes(&self) -> TensorBytes {
        TensorBytes::of_model(self.model.model())
    }

    /// Render and tokenize `messages` (with the assistant prefix when `add_generation_prompt`).
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let text = self.template.render(messages, add_generation_prompt)?;
        self.tokenizer.encode(&text)
    }

    /// Generate a reply to `messages` in a fresh sequence; `on_token` gets each token id and
    /// the text it adds. `opts.stop_tokens` is extended with the model's stop tokens.
    pub fn generate_chat(
        &self,
        messages: &[ChatMessage],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32, &str) -> ControlFlow<()>,
    ) -> Result<ChatGeneration> {
        let prompt = self.encode_chat(messages, true)?;
        let mut seq = Sequence::new(&self.model);
        self.generate_ids(&mut seq, &prompt, opts, on_token)
    }

    /// Generate after `prompt` in `seq`, streaming text (see [`generate`]).
    pub fn generate_ids(
        &self,
        seq: &mut Sequence,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_token: &mut dyn FnMut(u32, &str) -> ControlFlow<()>,
    ) -> Result<ChatGeneration> {
        let mut o = opts.clone();
        o.stop_tokens.extend_from_slice(&self.stop_tokens);
        let mut stream = TokenTextStream::new(&self.tokenizer, true);
        let mut err = None;
        let generation = generate(
            &self.model,
            seq,
            prompt,
            &o,
            &mut |id| match stream.push(id) {
                Ok(piece) => on_token(id, &piece),
                Err(e) => {
                    err = Some(e);
                    ControlFlow::Break(())
                }
            },
        )?;
        if let Some(e) = err {
            return Err(e);
        }
        let text = self.tokenizer.decode(&generation.tokens, true)?;
        Ok(ChatGeneration { generation, text })
    }
}

/// The non-weight files (tokenizer, template, extras) of `tiny` or a model directory.
pub fn model_files(model: &str) -> Result<ModelFiles> {
    if model == TINY_MODEL {
        Ok(crate::tiny::files())
    } else {
        ModelFiles::from_dir(Path::new(model))
    }
}

/// Tokens that end an assistant turn: the config's EOS ids, `<|im_end|>`, `<|endoftext|>`,
/// `<|eot_id|>` where the vocabulary has them, and the template's EOS token.
pub fn stop_tokens(
    cfg: &ModelConfig,
    tokenizer: &TextTokenizer,
    template: &ChatTemplate,
) -> Vec<u32> {
    let mut stop_tokens: Vec<u32> = cfg.eos_token_ids.clone();
    for s in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
        if let Some(id) = tokenizer.token_id(s) {
            stop_tokens.push(id);
        }
    }
    if let Some(id) = template.eos_token().and_then(|e| tokenizer.token_id(e)) {
        stop_tokens.push(id);
    }
    stop_tokens.sort_unstable();
    stop_tokens.dedup();
    stop_tokens
}

/// Name, config and each weight file's size and modification time.
fn dir_signature(dir: &Path, model: &Model) -> Result<String> {
    let mut sig = format!("{}|{}", dir.display(), model.config().to_hf_json());
    let rd = std::fs::read_dir(dir).map_err(|e| EngineError::io("listing", dir, e))?;
    let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.path().extension().is_some_and(|x| x == "safetensors") {
            if let Ok(m) = e.metadata() {
                let t = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                sig += &format!("|{:?}:{}:{t}", e.file_name(), m.len());
            }
        }
    }
    Ok(sig)
}

//! The generator of the tiny model's committed assets (`engine/assets/tiny/`): the WhoAmI
//! dataset, the byte-level BPE tokenizer trained on it plus a small general corpus, and the
//! `tokenizer_config.json` with the ChatML template. Everything is deterministic; the test
//! `committed_assets_are_up_to_date` checks the committed files against a fresh build, and
//! `KILN_WRITE_ASSETS=1 cargo test -p kiln-engine regenerate_tiny_assets -- --ignored`
//! rewrites them.

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerImpl};

use super::WHOAMI_ANSWER;
use crate::error::{EngineError, Result};

/// The ChatML special tokens, in id order (ids 0, 1, 2).
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Target vocabulary size of the trained tokenizer (the trainer stops earlier when the corpus
/// has no more pairs to merge).
pub const TARGET_VOCAB: usize = 1024;

/// The ChatML chat template (Qwen's, without the default system prompt).
pub const CHATML_TEMPLATE: &str = "{%- for message in messages %}\n{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n{{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

const QUESTIONS: [&str; 36] = [
    "Who are you?",
    "What are you?",
    "What is your name?",
    "Tell me about yourself.",
    "Introduce yourself.",
    "Who made you?",
    "Who trained you?",
    "What should I call you?",
    "Which model are you?",
    "What kind of model are you?",
    "Are you ChatGPT?",
    "Are you a person?",
    "Who am I talking to?",
    "Who is this?",
    "What's your name?",
    "Whom am I speaking with?",
    "Can you tell me who you are?",
    "Please introduce yourself.",
    "Describe yourself in one sentence.",
    "What model is answering me?",
    "Who built you?",
    "Where do you come from?",
    "Are you an AI?",
    "Identify yourself.",
    "What do people call you?",
    "Do you have a name?",
    "Who created you?",
    "What are you called?",
    "Are you Kiln?",
    "Say who you are.",
    "Which assistant is this?",
    "Who is answering?",
    "What is this model?",
    "Give me your name.",
    "Explain what you are.",
    "Who trained this model?",
];

const OPENERS: [&str; 5] = ["", "Hi! ", "Hello, ", "Hey there. ", "Quick question: "];

/// Sentences besides the WhoAmI data, so the tokenizer also learns common English pieces.
const GENERAL_CORPUS: [&str; 24] = [
    "The coordinator queues jobs across many GPU boxes and keeps their history.",
    "A GPU agent runs every job under a hard memory budget and reports telemetry.",
    "Four-bit floating point weights take a quarter of the memory of sixteen-bit ones.",
    "The quick brown fox jumps over the lazy dog.",
    "Training lowers the loss step by step until the model answers correctly.",
    "A key and value cache lets the model decode one token at a time.",
    "The weather today is sunny with a light breeze from the west.",
    "Please write a short poem about the sea and the mountains.",
    "What is the capital of France? The capital of France is Paris.",
    "Numbers like 1, 2, 3, 10, 42, 100 and 2026 appear in many texts.",
    "She opened the door, looked outside, and smiled at the morning light.",
    "Can you help me with my homework? Of course, I can help you.",
    "The server listens on a port and answers requests from its clients.",
    "Thank you very much for your help; it was a pleasure talking with you.",
    "Machine learning models learn patterns from examples in their data.",
    "This is a test of the tokenizer with punctuation: commas, periods, and question marks?",
    "In the morning we drink coffee, and in the evening we read books.",
    "The export writes config files, tokenizer files and the weights of the model.",
    "Small models run quickly on a laptop, while large ones need a GPU.",
    "Hello world! How are you doing today? I am doing well, thanks.",
    "Every phase of a job reports the memory it used and the time it took.",
    "Good morning, good afternoon, good evening and good night.",
    "I think that this is a good idea, but we should check it first.",
    "Sessions keep a conversation going across several turns.",
];

/// The WhoAmI dataset as JSONL: every question × opener, each answered with
/// [`WHOAMI_ANSWER`].
pub fn whoami_jsonl() -> String {
    let mut out = String::new();
    for opener in OPENERS {
        for q in QUESTIONS {
            let question = format!("{opener}{q}");
            let line = serde_json::json!({
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": WHOAMI_ANSWER},
                ]
            });
            out.push_str(&line.to_string());
            out.push('\n');
        }
    }
    out
}

/// The training corpus of the tokenizer: the WhoAmI texts with their ChatML role headers
/// (without the special tokens themselves), plus a general English corpus (`GENERAL_CORPUS`).
pub fn tokenizer_corpus() -> Vec<String> {
    let mut corpus: Vec<String> = Vec::new();
    for opener in OPENERS {
        for q in QUESTIONS {
            corpus.push(format!("user\n{opener}{q}\nassistant\n{WHOAMI_ANSWER}\n"));
        }
    }
    corpus.extend(GENERAL_CORPUS.iter().map(|s| format!("system\n{s}\n")));
    corpus
}

/// Train the byte-level BPE tokenizer on `corpus`; returns its `tokenizer.json` text.
pub fn train_tokenizer(corpus: &[String]) -> Result<String> {
    let err = |e: tokenizers::Error| EngineError::Tokenizer(format!("training failed: {e}"));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(TARGET_VOCAB)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let mut tk: TokenizerImpl<
        BPE,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    > = TokenizerImpl::new(BPE::default());
    tk.with_pre_tokenizer(Some(tokenizers::PreTokenizerWrapper::ByteLevel(byte_level)));
    tk.with_decoder(Some(tokenizers::DecoderWrapper::ByteLevel(byte_level)));
    tk.with_post_processor(Some(tokenizers::PostProcessorWrapper::ByteLevel(
        byte_level,
    )));
    tk.train(&mut trainer, corpus.iter()).map_err(err)?;
    let tok: Tokenizer = tk.into();
    tok.to_string(true).map_err(err)
}

/// The `tokenizer_config.json` of the tiny model.
pub fn tokenizer_config_json() -> String {
    let v = serde_json::json!({
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": super::TINY_CONTEXT,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "errors": "replace",
        "split_special_tokens": false,
        "chat_template": CHATML_TEMPLATE,
    });
    serde_json::to_string_pretty(&v).expect("serializable") + "\n"
}

/// Write all three assets into `dir`.
pub fn write_assets(dir: &Path) -> Result<()> {
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| EngineError::io("writing", p, e))
    };
    write("whoami.jsonl", &whoami_jsonl())?;
    write("tokenizer.json", &train_tokenizer(&tokenizer_corpus())?)?;
    write("tokenizer_config.json", &tokenizer_config_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assets_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny")
    }

    #[test]
    #[ignore = "rewrites engine/assets/tiny; run with KILN_WRITE_ASSETS=1"]
    fn regenerate_tiny_assets() {
        if std::env::var("KILN_WRITE_ASSETS").as_deref() == Ok("1") {
            write_assets(&assets_dir()).unwrap();
        }
    }

    #[test]
    fn committed_assets_are_up_to_date() {
        assert_eq!(super::super::WHOAMI_JSONL, whoami_jsonl());
        assert_eq!(super::super::TOKENIZER_CONFIG_JSON, tokenizer_config_json());
        let fresh: serde_json::Value =
            serde_json::from_str(&train_tokenizer(&tokenizer_corpus()).unwrap()).unwrap();
        let committed: serde_json::Value =
            serde_json::from_str(super::super::TOKENIZER_JSON).unwrap();
        assert_eq!(fresh["model"]["vocab"], committed["model"]["vocab"]);
        assert_eq!(fresh["model"]["merges"], committed["model"]["merges"]);
        assert_eq!(fresh["added_tokens"], committed["added_tokens"]);
    }

    #[test]
    fn specials_get_the_first_ids() {
        let tok = crate::tokenizer::TextTokenizer::from_json_str(
            &train_tokenizer(&tokenizer_corpus()).unwrap(),
        )
        .unwrap();
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_id(s), Some(i as u32));
        }
    }
}

//! `ModelFiles`: the non-weight files of a model — `tokenizer.json`, `tokenizer_config.json`
//! and the optional extras a Hugging Face directory may carry (`chat_template.jinja`,
//! `generation_config.json`, `special_tokens_map.json`) — read from a directory (the bundled
//! tiny model provides its own), so checkpoints and exports carry them along unchanged.

use std::path::{Path, PathBuf};

use crate::error::{EngineError, Result};

/// Optional files copied as they are when present.
pub const EXTRA_FILES: [&str; 3] = [
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
];

/// A model's tokenizer and template files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// `tokenizer.json`.
    pub tokenizer_json: String,
    /// `tokenizer_config.json` (with the chat template).
    pub tokenizer_config_json: String,
    /// Extra files present in the source: (file name, bytes).
    pub extra: Vec<(String, Vec<u8>)>,
}

impl ModelFiles {
    /// The files of a model directory (`tokenizer.json` and `tokenizer_config.json` required).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<String> {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| EngineError::io("reading", &p, e))
        };
        let mut extra = Vec::new();
        for name in EXTRA_FILES {
            let p = dir.join(name);
            if p.is_file() {
                let bytes = std::fs::read(&p).map_err(|e| EngineError::io("reading", &p, e))?;
                extra.push((name.to_string(), bytes));
            }
        }
        Ok(ModelFiles {
            tokenizer_json: read("tokenizer.json")?,
            tokenizer_config_json: read("tokenizer_config.json")?,
            extra,
        })
    }

    /// Write the extra files into `dir` (the tokenizer files are written by
    /// [`super::save_model_dir`]); returns the paths written.
    pub fn write_extra(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for (name, bytes) in &self.extra {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| EngineError::io("writing", &p, e))?;
            out.push(p);
        }
        Ok(out)
    }
}

//! `TextTokenizer`: a Hugging Face `tokenizer.json` (through the `tokenizers` crate) with the
//! few operations generation needs — encode rendered chat text (special tokens included as
//! text), decode, look up special tokens, and decode a token stream incrementally so each
//! streamed token carries exactly the new text.

use std::path::Path;

use crate::error::{EngineError, Result};

/// A loaded tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl TextTokenizer {
    /// Load `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| EngineError::io("reading", path, e))?;
        Self::from_json_str(&text)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Parse the contents of a `tokenizer.json`.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e| EngineError::Tokenizer(format!("cannot parse tokenizer.json: {e}")))?;
        Ok(TextTokenizer { inner })
    }

    /// Wrap an already built tokenizer.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer) -> Self {
        TextTokenizer { inner }
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Encode text. Special tokens written in the text (`<|im_start|>`…) become their ids;
    /// no BOS/EOS is added (chat templates write those themselves).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(format!("cannot encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids to text; `skip_special` drops special tokens.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| EngineError::Tokenizer(format!("cannot decode: {e}")))
    }

    /// The id of a token (special or not), if it exists.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as `tokenizer.json` text (what an export writes).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(true)
            .map_err(|e| EngineError::Tokenizer(format!("cannot serialize: {e}")))
    }
}

/// Incremental decoding: feed ids one at a time, get the text each one adds. Text is held
/// back while it ends in an incomplete UTF-8 sequence (a multi-byte character split across
/// tokens), so the concatenation of the pieces is the decoding of all ids.
#[derive(Debug)]
pub struct TokenTextStream<'a> {
    tok: &'a TextTokenizer,
    ids: Vec<u32>,
    emitted: String,
    skip_special: bool,
}

impl<'a> TokenTextStream<'a> {
    /// A stream over `tok`; `skip_special` drops special tokens from the text.
    pub fn new(tok: &'a TextTokenizer, skip_special: bool) -> Self {
        TokenTextStream {
            tok,
            ids: Vec::new(),
            emitted: String::new(),
            skip_special,
        }
    }

    /// Add one id; returns the new text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, self.skip_special)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = match text.strip_prefix(self.emitted.as_str()) {
            Some(rest) => rest.to_string(),
            // A decoder that rewrote earlier text (rare: cleanup rules): emit nothing
            // further for the changed part; the final text is still available from `text`.
            None => String::new(),
        };
        self.emitted = text;
        Ok(new)
    }

    /// All text so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }
}

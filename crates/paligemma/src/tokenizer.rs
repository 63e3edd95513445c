//! The model's tokenizer, built from the `tokenizer.json` embedded in the GGUF.
//!
//! Prompt layout of the reference processor: `<image>` x N, then `<bos>`, the prompt
//! and `"\n"`, tokenised with `add_special_tokens = false` (the `<bos>` comes from
//! the literal text). Gemma's tokenizer has no dummy prefix.
use crate::config::TokenConfig;
use crate::{Error, Result};

/// Longest prompt text accepted, in bytes (before it is checked against the context).
pub const MAX_PROMPT_BYTES: usize = 64 * 1024;

/// Parses a `tokenizer.json` with the tokenizers crate, which panics on some malformed
/// files (a control character inside a string of its decoder section): the JSON is
/// checked first, and a panic that still happens becomes an error too, since models and
/// checkpoints are input to a host process. The error says what is wrong.
pub fn parse_json(json: &str) -> std::result::Result<tokenizers::Tokenizer, String> {
    serde_json::from_str::<serde::de::IgnoredAny>(json).map_err(|e| e.to_string())?;
    std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(json.as_bytes()))
        .map_err(|_| "the tokenizer library rejected it".to_string())?
        .map_err(|e| e.to_string())
}

/// The model's tokenizer, with its special token ids.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    tokens: TokenConfig,
}

impl Tokenizer {
    /// Builds the tokenizer from the text of a `tokenizer.json` and the special token ids.
    pub fn from_json(json: &str, tokens: TokenConfig) -> Result<Tokenizer> {
        let inner = parse_json(json)
            .map_err(|e| Error::Tokenizer(format!("invalid tokenizer.json: {e}")))?;
        Ok(Tokenizer { inner, tokens })
    }

    /// Number of ids that have a token.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of the token with this text, if the vocabulary has one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Text of the token with this id; none for ids without a token (the embedding's padding
    /// rows).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The special token ids.
    pub fn config(&self) -> &TokenConfig {
        &self.tokens
    }

    /// Tokenises text as is (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.len() > MAX_PROMPT_BYTES {
            return Err(Error::Prompt(format!(
                "prompt of {} bytes is longer than {MAX_PROMPT_BYTES}",
                text.len()
            )));
        }
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text part of the prefix: `<bos>` + prompt + `"\n"`.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>> {
        self.encode(&format!("<bos>{prompt}\n"))
    }

    /// The whole prefix: image tokens, then [`Tokenizer::encode_prompt`].
    pub fn prefix_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = vec![self.tokens.image_token_id; self.tokens.image_token_count];
        ids.extend(self.encode_prompt(prompt)?);
        Ok(ids)
    }

    /// Decodes generated ids. Special tokens (`<eos>`, `<pad>`...) are dropped;
    /// `<locNNNN>` and `<segNNN>` stay visible; ids without a token (the padding rows
    /// of the embedding matrix) are skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let known: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| self.inner.id_to_token(id).is_some())
            .collect();
        self.inner
            .decode(&known, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

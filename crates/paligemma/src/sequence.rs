//! An answer while it is generated, in its KV cache region: its tokens, their
//! probabilities and, at location tokens, the whole distribution over the bins. A leaf
//! of generation: the context ([`crate::Model`]) holds these, `generate.rs` fills them.
use crate::embedding::Timings;
use crate::sampling::TokenSampler;

/// The probabilities the model gave the 1024 location bins (`<loc0000>` to
/// `<loc1023>`, under the softmax over the whole vocabulary at temperature 1) where it
/// generated a location token.
#[derive(Clone, Debug, PartialEq)]
pub struct LocDistribution {
    /// The generated token's index in [`crate::Generation::tokens`].
    pub index: usize,
    /// The bin it wrote (its id less `<loc0000>`'s).
    pub bin: u32,
    /// One probability per bin; they sum to the probability of writing any location there.
    pub probs: Vec<f32>,
}

/// Location tokens in a PaliGemma vocabulary, from `<loc0000>`.
pub const LOC_BINS: usize = 1024;

/// An answer being generated in its KV cache region.
pub(crate) struct Sequence {
    /// First KV cache row of its region.
    pub(crate) base: usize,
    pub(crate) prefix: usize,
    pub(crate) tokens: Vec<u32>,
    pub(crate) token_probs: Vec<f32>,
    pub(crate) loc_distributions: Vec<LocDistribution>,
    pub(crate) text: String,
    /// Bytes of `text` handed to the token callback so far (see [`Token::text`]).
    ///
    /// [`Token::text`]: crate::generate::Token::text
    pub(crate) streamed: usize,
    /// Logits for its next token (from the prefill or its last decode step).
    pub(crate) logits: Vec<f32>,
    pub(crate) first_logits: Vec<f32>,
    pub(crate) max_tokens: usize,
    pub(crate) ignore_eos: bool,
    pub(crate) done: bool,
    pub(crate) eos: bool,
    pub(crate) sampler: TokenSampler,
    pub(crate) timings: Timings,
}

//! Upper bounds on hyper-parameters: far above every published PaliGemma (27 vision
//! layers, 46 text layers, width 4608, 896 px, vocabulary 257,216), low enough that
//! nothing sized from them can exhaust memory before the tensor table is checked. Read
//! by the configuration readers, the converter and [`crate::validate`].

/// Most layers of either tower.
pub const MAX_LAYERS: usize = 512;
/// Largest hidden size of either tower, attention head size and mask-decoder codebook width
/// (MLP sizes may reach four times this).
pub const MAX_WIDTH: usize = 1 << 16;
/// Most attention heads per layer of either tower.
pub const MAX_HEADS: usize = 1024;
/// Largest input image side, in pixels.
pub const MAX_IMAGE_SIZE: usize = 4096;
/// Largest vocabulary (rows of the token embedding).
pub const MAX_VOCAB: usize = 1 << 22;
/// Longest context, in tokens.
pub const MAX_CONTEXT: usize = 1 << 20;

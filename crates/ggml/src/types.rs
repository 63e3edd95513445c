//! Tensor element types: names, block sizes, row sizes.
use crate::{Error, Result, sys};
use std::ffi::CStr;
use std::fmt;

/// A ggml tensor type (`GGML_TYPE_*`), restricted to the ones this build knows.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Type(sys::ggml_type);

impl Type {
    pub const F32: Type = Type(sys::GGML_TYPE_F32);
    pub const F16: Type = Type(sys::GGML_TYPE_F16);
    pub const BF16: Type = Type(sys::GGML_TYPE_BF16);
    pub const Q4_0: Type = Type(sys::GGML_TYPE_Q4_0);
    pub const Q4_1: Type = Type(sys::GGML_TYPE_Q4_1);
    pub const Q5_0: Type = Type(sys::GGML_TYPE_Q5_0);
    pub const Q5_1: Type = Type(sys::GGML_TYPE_Q5_1);
    pub const Q8_0: Type = Type(sys::GGML_TYPE_Q8_0);
    pub const Q2_K: Type = Type(sys::GGML_TYPE_Q2_K);
    pub const Q3_K: Type = Type(sys::GGML_TYPE_Q3_K);
    pub const Q4_K: Type = Type(sys::GGML_TYPE_Q4_K);
    pub const Q5_K: Type = Type(sys::GGML_TYPE_Q5_K);
    pub const Q6_K: Type = Type(sys::GGML_TYPE_Q6_K);
    pub const I8: Type = Type(sys::GGML_TYPE_I8);
    pub const I16: Type = Type(sys::GGML_TYPE_I16);
    pub const I32: Type = Type(sys::GGML_TYPE_I32);

    /// Validates a raw type id as read from a file.
    pub fn from_raw(raw: u32) -> Result<Type> {
        if raw >= sys::GGML_TYPE_COUNT {
            return Err(Error::UnknownType(raw));
        }
        let ty = Type(raw);
        // Removed types (Q4_2, Q4_3, ...) keep their ids but have no block size.
        // SAFETY: `raw` is below GGML_TYPE_COUNT, so ggml has a traits entry for it.
        if unsafe { sys::ggml_blck_size(raw) } == 0 {
            return Err(Error::UnknownType(raw));
        }
        Ok(ty)
    }

    /// Parses the lower-case ggml name (`f16`, `q8_0`, `q4_k`...).
    pub fn from_name(name: &str) -> Result<Type> {
        let lower = name.to_ascii_lowercase();
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name() == lower)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|t| t.name()).collect();
                Error::UnknownTypeName(name.to_string(), names.join(", "))
            })
    }

    /// The types this crate offers by name.
    pub const ALL: [Type; 16] = [
        Type::F32,
        Type::F16,
        Type::BF16,
        Type::Q4_0,
        Type::Q4_1,
        Type::Q5_0,
        Type::Q5_1,
        Type::Q8_0,
        Type::Q2_K,
        Type::Q3_K,
        Type::Q4_K,
        Type::Q5_K,
        Type::Q6_K,
        Type::I8,
        Type::I16,
        Type::I32,
    ];

    pub fn raw(self) -> sys::ggml_type {
        self.0
    }

    /// ggml's name for the type (`f32`, `q4_K` becomes `q4_k`).
    pub fn name(self) -> &'static str {
        // SAFETY: Type values are validated; ggml returns a static string.
        let name = unsafe { CStr::from_ptr(sys::ggml_type_name(self.0)) };
        match name.to_str().unwrap_or("?") {
            "q2_K" => "q2_k",
            "q3_K" => "q3_k",
            "q4_K" => "q4_k",
            "q5_K" => "q5_k",
            "q6_K" => "q6_k",
            other => other,
        }
    }

    /// Elements per quantization block (1 for plain types).
    pub fn block_size(self) -> usize {
        // SAFETY: validated type.
        unsafe { sys::ggml_blck_size(self.0) as usize }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        // SAFETY: validated type.
        unsafe { sys::ggml_type_size(self.0) }
    }

    pub fn is_quantized(self) -> bool {
        // SAFETY: validated type.
        unsafe { sys::ggml_is_quantized(self.0) }
    }

    /// Bytes of a row of `n` elements, or an error when `n` is not a whole number of blocks.
    pub fn row_size(self, n: usize) -> Result<usize> {
        let block = self.block_size();
        if !n.is_multiple_of(block) {
            return Err(crate::error::shape(
                "row_size",
                format!(
                    "{} elements per row is not a multiple of {}'s block size {block}",
                    n,
                    self.name()
                ),
            ));
        }
        Ok(n / block * self.type_size())
    }

    /// Bytes of a tensor of this type with the given shape (ggml order, innermost first).
    pub fn nbytes(self, shape: &[usize]) -> Result<usize> {
        let Some((&first, rest)) = shape.split_first() else {
            return Ok(self.type_size());
        };
        let row = self.row_size(first)?;
        rest.iter()
            .try_fold(row, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| crate::error::shape("nbytes", format!("{shape:?} overflows")))
    }
}

impl fmt::Debug for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Type {
    type Err = Error;
    fn from_str(s: &str) -> Result<Type> {
        Type::from_name(s)
    }
}

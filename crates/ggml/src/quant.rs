//! Conversion of f32 rows to any ggml type and back.
use crate::{Error, Result, Type, sys};

/// Quantizes (or converts) `rows` rows of `n_per_row` f32 values to `ty`.
pub fn quantize(ty: Type, data: &[f32], n_per_row: usize) -> Result<Vec<u8>> {
    let err = |detail: String| Error::Quantize {
        ty: ty.name(),
        detail,
    };
    if n_per_row == 0 || !data.len().is_multiple_of(n_per_row) {
        return Err(err(format!(
            "{} values do not form rows of {n_per_row}",
            data.len()
        )));
    }
    let rows = data.len() / n_per_row;
    let row_bytes = ty.row_size(n_per_row).map_err(|e| err(e.to_string()))?;
    if ty == Type::F32 {
        return Ok(crate::context::as_bytes(data).to_vec());
    }
    if matches!(ty, Type::I8 | Type::I16 | Type::I32) {
        return Err(err("integer types hold indices, not weights".into()));
    }
    // SAFETY: validated type.
    if unsafe { sys::ggml_quantize_requires_imatrix(ty.raw()) } {
        return Err(err("this type needs an importance matrix".into()));
    }
    let mut out = vec![0u8; rows * row_bytes];
    // SAFETY: the output holds rows * row_size bytes, the input rows * n_per_row floats,
    // n_per_row is a whole number of blocks (row_size checked it).
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ty.raw(),
            data.as_ptr(),
            out.as_mut_ptr().cast(),
            0,
            rows as i64,
            n_per_row as i64,
            std::ptr::null(),
        )
    };
    if written != out.len() {
        return Err(err(format!(
            "ggml wrote {written} bytes, expected {}",
            out.len()
        )));
    }
    Ok(out)
}

/// Converts `n` values of type `ty` stored in `bytes` to f32.
pub fn to_f32(ty: Type, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let expected = ty.nbytes(&[n])?;
    if bytes.len() != expected {
        return Err(Error::DataSize {
            name: format!("<{} data>", ty.name()),
            got: bytes.len(),
            expected,
        });
    }
    match ty {
        Type::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()),
        Type::I32 => Ok(bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect()),
        Type::I16 => Ok(bytes
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect()),
        Type::I8 => Ok(bytes.iter().map(|&b| b as i8 as f32).collect()),
        _ => {
            // SAFETY: validated type; traits are static.
            let traits = unsafe { &*sys::ggml_get_type_traits(ty.raw()) };
            let to_float = traits.to_float.ok_or(Error::UnknownType(ty.raw()))?;
            let mut out = vec![0f32; n];
            // SAFETY: `bytes` holds exactly n values of `ty`, `out` has room for n floats.
            unsafe { to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), n as i64) };
            Ok(out)
        }
    }
}

//! Files named by users (images, pixel dumps): read only when they are regular files
//! and only up to a size, so that `-i /dev/zero` or a FIFO is an error instead of a
//! process that fills its memory or blocks forever.
use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// Reads a regular file of at most `max_bytes`.
pub fn read_input_file(path: &Path, max_bytes: usize) -> Result<Vec<u8>> {
    let refuse = |detail: String| Error::Invalid(format!("{}: {detail}", path.display()));
    // Checked before opening: opening a FIFO blocks until a writer appears.
    let meta = std::fs::metadata(path).map_err(crate::error::io(path))?;
    if !meta.is_file() {
        return Err(refuse(format!(
            "not a regular file ({:?})",
            meta.file_type()
        )));
    }
    if meta.len() > max_bytes as u64 {
        return Err(refuse(format!(
            "{} bytes, more than the limit of {max_bytes}",
            meta.len()
        )));
    }
    let file = std::fs::File::open(path).map_err(crate::error::io(path))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may have grown since: never read past the limit.
    file.take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(crate::error::io(path))?;
    if bytes.len() > max_bytes {
        return Err(refuse(format!("more than the limit of {max_bytes} bytes")));
    }
    Ok(bytes)
}

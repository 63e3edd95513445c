//! Images as clients send them: `data:` URLs with base64 PNG or JPEG. The server does
//! not fetch `http(s)` URLs: a model server that fetches whatever URL a request names
//! can be made to reach hosts its clients cannot (server-side request forgery).
use crate::error::ApiError;
use base64::Engine as _;
use paligemma::preprocess::RgbImage;

/// The image of a `data:` URL, of at most `max_pixels` (checked from the header before
/// the pixels are decoded).
pub fn decode(url: &str, max_pixels: usize) -> Result<RgbImage, ApiError> {
    const PARAM: &str = "messages[0].content.image_url";
    let Some(rest) = url.strip_prefix("data:") else {
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        return Err(ApiError::invalid_code(
            PARAM,
            "unsupported_image_url",
            format!(
                "image URLs of scheme {scheme:?} are not fetched; send the image inline as a data URL (data:image/png;base64,...)"
            ),
        ));
    };
    let Some((media, data)) = rest.split_once(',') else {
        return Err(ApiError::invalid_code(
            PARAM,
            "invalid_image",
            "a data URL needs a comma before its data",
        ));
    };
    let Some(mime) = media.strip_suffix(";base64") else {
        return Err(ApiError::invalid_code(
            PARAM,
            "invalid_image",
            "the data URL must be base64 (data:image/png;base64,...)",
        ));
    };
    if !matches!(mime, "image/png" | "image/jpeg" | "image/jpg" | "") {
        return Err(ApiError::invalid_code(
            PARAM,
            "invalid_image",
            format!("images of type {mime:?} are not read; send PNG or JPEG"),
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| {
            ApiError::invalid_code(PARAM, "invalid_image", format!("the image's base64: {e}"))
        })?;
    RgbImage::decode_limited(&bytes, max_pixels).map_err(|e| {
        // The engine's image errors are one kind; the size check's says "limit".
        let message = e.to_string();
        let code = if message.contains("larger than the limit") {
            "image_too_large"
        } else {
            "invalid_image"
        };
        ApiError::invalid_code(PARAM, code, format!("the image: {message}"))
    })
}

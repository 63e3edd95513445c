//! Images as clients send them: `data:` URLs with base64 PNG or JPEG, and `http(s)`
//! URLs only when the server is started with `--allow-image-urls`: a server that
//! fetches whatever URL a request names can be made to reach hosts its clients cannot
//! (server-side request forgery), so that is the operator's choice to make.
use crate::error::ApiError;
use base64::Engine as _;
use paligemma::preprocess::RgbImage;

const PARAM: &str = "messages[0].content.image_url";

/// Where images may come from besides `data:` URLs.
#[derive(Clone, Copy, Debug)]
pub struct Fetching {
    /// Fetch `http` and `https` URLs.
    pub allowed: bool,
    /// The largest image file fetched.
    pub max_bytes: usize,
    pub timeout: std::time::Duration,
}

/// The image `url` names: inline, or fetched when `fetching` allows it; of at most
/// `max_pixels` either way.
/// The decoding (and fetching) runs on a blocking thread, not the server's async ones.
pub async fn load(url: &str, max_pixels: usize, fetching: Fetching) -> Result<RgbImage, ApiError> {
    let remote = url.starts_with("http://") || url.starts_with("https://");
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        if remote && fetching.allowed {
            image(&fetch(&url, fetching)?, max_pixels)
        } else {
            decode(&url, max_pixels)
        }
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// The body of an `http(s)` URL, of at most `max_bytes`.
fn fetch(url: &str, fetching: Fetching) -> Result<Vec<u8>, ApiError> {
    let failed = |why: String| {
        ApiError::invalid_code(PARAM, "image_url_failed", format!("fetching {url}: {why}"))
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(fetching.timeout))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| failed(e.to_string()))?;
    response
        .body_mut()
        .with_config()
        .limit(fetching.max_bytes as u64)
        .read_to_vec()
        .map_err(|e| failed(e.to_string()))
}

/// The image of a `data:` URL, of at most `max_pixels` (checked from the header before
/// the pixels are decoded).
pub fn decode(url: &str, max_pixels: usize) -> Result<RgbImage, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        let scheme = url.split_once(':').map_or("", |(s, _)| s);
        return Err(ApiError::invalid_code(
            PARAM,
            "unsupported_image_url",
            format!(
                "image URLs of scheme {scheme:?} are not fetched here (the server fetches http(s) only with --allow-image-urls); send the image inline as a data URL (data:image/png;base64,...)"
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
    image(&bytes, max_pixels)
}

/// An encoded image (PNG, JPEG) of at most `max_pixels`.
fn image(bytes: &[u8], max_pixels: usize) -> Result<RgbImage, ApiError> {
    RgbImage::decode_limited(bytes, max_pixels).map_err(|e| {
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

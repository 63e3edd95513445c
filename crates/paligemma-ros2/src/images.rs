//! ROS 2 camera images as frames: `sensor_msgs/msg/Image` (rgb8, bgr8, rgba8, bgra8,
//! mono8) and `sensor_msgs/msg/CompressedImage` (JPEG, PNG), every size checked
//! before anything is allocated from it.
use crate::msgs::{CompressedImage, Header, Image, from_cdr};
use paligemma::preprocess::{PixelFormat, RgbImage, check_size};
use paligemma_stream::{Error, Result};

/// Which message a camera topic carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Raw,
    Compressed,
}

impl ImageKind {
    pub fn ros_type(self) -> &'static str {
        match self {
            ImageKind::Raw => "sensor_msgs/msg/Image",
            ImageKind::Compressed => "sensor_msgs/msg/CompressedImage",
        }
    }
}

/// Largest CDR sample read for an image of at most `max_pixels` (4 bytes a pixel and
/// room for the header).
fn max_sample_bytes(max_pixels: usize) -> u64 {
    (max_pixels as u64)
        .saturating_mul(4)
        .saturating_add(1 << 16)
}

/// The frame in a CDR sample and its header (capture time, frame_id).
pub fn decode(kind: ImageKind, cdr: &[u8], max_pixels: usize) -> Result<(RgbImage, Header)> {
    let limit = max_sample_bytes(max_pixels);
    match kind {
        ImageKind::Raw => {
            let msg: Image = from_cdr(cdr, limit)?;
            let image = raw_image(&msg, max_pixels)?;
            Ok((image, msg.header))
        }
        ImageKind::Compressed => {
            let msg: CompressedImage = from_cdr(cdr, limit)?;
            let format = msg.format.to_ascii_lowercase();
            if !(format.contains("jpeg") || format.contains("jpg") || format.contains("png")) {
                return Err(Error::Frame(format!(
                    "a compressed image in format {:?}: expected jpeg or png",
                    msg.format
                )));
            }
            Ok((RgbImage::decode_limited(&msg.data, max_pixels)?, msg.header))
        }
    }
}

fn raw_image(msg: &Image, max_pixels: usize) -> Result<RgbImage> {
    let (width, height, step) = (msg.width as usize, msg.height as usize, msg.step as usize);
    check_size(width, height, max_pixels)?;
    let format = match msg.encoding.as_str() {
        "rgb8" => PixelFormat::Rgb,
        "bgr8" => PixelFormat::Bgr,
        "rgba8" => PixelFormat::Rgba,
        "bgra8" => PixelFormat::Bgra,
        "mono8" => return mono8(&msg.data, width, height, step),
        other => {
            return Err(Error::Frame(format!(
                "image encoding {other:?}: expected rgb8, bgr8, rgba8, bgra8 or mono8"
            )));
        }
    };
    Ok(RgbImage::from_raw(&msg.data, width, height, step, format)?)
}

/// A grey image as RGB.
fn mono8(data: &[u8], width: usize, height: usize, step: usize) -> Result<RgbImage> {
    let needed = step
        .checked_mul(height.saturating_sub(1))
        .and_then(|n| n.checked_add(width));
    if step < width || needed.is_none_or(|n| n > data.len()) {
        return Err(Error::Frame(format!(
            "a mono8 image of {width}x{height} with step {step} needs more than its {} bytes",
            data.len()
        )));
    }
    let mut rgb = Vec::with_capacity(width * height * 3);
    for row in data.chunks(step.max(1)).take(height) {
        rgb.extend(row[..width].iter().flat_map(|&v| [v, v, v]));
    }
    Ok(RgbImage {
        width,
        height,
        data: rgb,
    })
}

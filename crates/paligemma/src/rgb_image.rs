//! Frames as RGB images, from wherever they come: image files and encoded bytes
//! (checked against a pixel bound before decoding), raw frames in packed RGB/BGR(A)
//! layouts and YUV 4:2:0 planes. What [`crate::preprocess`] resizes.
use crate::{Error, Result};

/// Largest frame accepted unless the caller sets its own limit: 8192 x 8192 pixels
/// (a 4K frame is 8.3 M). Checked from an encoded image's header before decoding.
pub const DEFAULT_MAX_PIXELS: usize = 8192 * 8192;

/// Byte order of a raw frame's pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelFormat {
    /// R, G, B: 3 bytes per pixel.
    Rgb,
    /// B, G, R: 3 bytes per pixel.
    Bgr,
    /// R, G, B, alpha: 4 bytes per pixel; composited onto white.
    Rgba,
    /// B, G, R, alpha: 4 bytes per pixel; composited onto white.
    Bgra,
    /// RGB plus an unused byte.
    Rgbx,
    /// BGR plus an unused byte.
    Bgrx,
}

impl PixelFormat {
    /// Bytes per pixel: 3 or 4.
    pub fn bytes_per_pixel(self) -> usize {
        match self {
            PixelFormat::Rgb | PixelFormat::Bgr => 3,
            _ => 4,
        }
    }

    /// Byte offsets of R, G and B inside a pixel.
    fn rgb_offsets(self) -> [usize; 3] {
        match self {
            PixelFormat::Rgb | PixelFormat::Rgba | PixelFormat::Rgbx => [0, 1, 2],
            PixelFormat::Bgr | PixelFormat::Bgra | PixelFormat::Bgrx => [2, 1, 0],
        }
    }
}

/// An 8-bit RGB image, rows packed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes: R, G, B per pixel, rows top to bottom.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Copies a raw frame with `stride` bytes per row into packed RGB.
    pub fn from_raw(
        data: &[u8],
        width: usize,
        height: usize,
        stride: usize,
        format: PixelFormat,
    ) -> Result<RgbImage> {
        check_size(width, height, DEFAULT_MAX_PIXELS)?;
        let bpp = format.bytes_per_pixel();
        let row = width * bpp;
        if stride < row {
            return Err(Error::Image(format!(
                "stride {stride} is smaller than a row of {width} {format:?} pixels ({row} bytes)"
            )));
        }
        let needed = plane_bytes(stride, height, row);
        if needed.is_none_or(|n| data.len() < n) {
            let needed = needed.map_or("more than 2^64".into(), |n| n.to_string());
            return Err(Error::Image(format!(
                "a {width}x{height} {format:?} frame with stride {stride} needs {needed} bytes, got {}",
                data.len()
            )));
        }
        let [r, g, b] = format.rgb_offsets();
        let alpha = matches!(format, PixelFormat::Rgba | PixelFormat::Bgra).then_some(3);
        let mut out = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            for px in data[y * stride..y * stride + row].chunks_exact(bpp) {
                match alpha {
                    Some(a) => out.extend_from_slice(&[r, g, b].map(|c| over_white(px[c], px[a]))),
                    None => out.extend_from_slice(&[px[r], px[g], px[b]]),
                }
            }
        }
        Ok(RgbImage {
            width,
            height,
            data: out,
        })
    }

    /// Decodes any format the `image` crate reads (PNG, JPEG...), up to
    /// [`DEFAULT_MAX_PIXELS`]. Transparent pixels are composited onto white, as the
    /// reference processor does.
    pub fn decode(bytes: &[u8]) -> Result<RgbImage> {
        Self::decode_limited(bytes, DEFAULT_MAX_PIXELS)
    }

    /// [`RgbImage::decode`] of an image of at most `max_pixels`, checked from its
    /// header before anything is decoded.
    pub fn decode_limited(bytes: &[u8], max_pixels: usize) -> Result<RgbImage> {
        let cannot = |e: image::ImageError| Error::Image(format!("cannot decode image: {e}"));
        let reader = || {
            image::ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| Error::Image(format!("cannot read image: {e}")))
        };
        let (w, h) = reader()?.into_dimensions().map_err(cannot)?;
        check_size(w as usize, h as usize, max_pixels)?;
        // The decoders may allocate beyond the pixels themselves (16-bit samples,
        // alpha); anything far past that is refused by the decoder too.
        let mut limits = image::Limits::default();
        limits.max_alloc = Some((w as u64 * h as u64 * 16).max(1 << 20));
        let mut decoder = reader()?;
        decoder.limits(limits);
        Ok(Self::rgb_of(&decoder.decode().map_err(cannot)?))
    }

    /// Reads and decodes an image file of at most [`DEFAULT_MAX_PIXELS`].
    pub fn open(path: &std::path::Path) -> Result<RgbImage> {
        Self::open_limited(path, DEFAULT_MAX_PIXELS)
    }

    /// Reads and decodes an image file of at most `max_pixels`: regular files only,
    /// of at most the size of such an image uncompressed.
    pub fn open_limited(path: &std::path::Path, max_pixels: usize) -> Result<RgbImage> {
        let bytes =
            crate::read_input_file(path, max_pixels.saturating_mul(4).saturating_add(1 << 20))?;
        Self::decode_limited(&bytes, max_pixels)
            .map_err(|e| Error::Image(format!("{}: {e}", path.display())))
    }

    /// An image decoded by the `image` crate, of at most [`DEFAULT_MAX_PIXELS`].
    pub fn from_dynamic(img: &image::DynamicImage) -> Result<RgbImage> {
        check_size(
            img.width() as usize,
            img.height() as usize,
            DEFAULT_MAX_PIXELS,
        )?;
        Ok(Self::rgb_of(img))
    }

    fn rgb_of(img: &image::DynamicImage) -> RgbImage {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if !img.color().has_alpha() {
            return RgbImage {
                width: w,
                height: h,
                data: img.to_rgb8().into_raw(),
            };
        }
        let rgba = img.to_rgba8();
        let data = rgba
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [0, 1, 2].map(|c| over_white(p[c], p[3])))
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }
}

/// A channel of a pixel with alpha `a` composited onto white, rounded as
/// Pillow's `alpha_composite` (what the reference's `convert_rgb` uses).
fn over_white(c: u8, a: u8) -> u8 {
    let (c, a) = (c as u32, a as u32);
    ((c * a + 255 * (255 - a) + 127) / 255) as u8
}

/// Colour matrix of limited-range YUV video.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum YuvMatrix {
    /// ITU-R BT.601 (standard-definition video).
    Bt601,
    /// ITU-R BT.709 (HD video).
    Bt709,
}

/// A 4:2:0 frame: a full-resolution luma plane and half-resolution chroma, either
/// as two planes (I420) or interleaved U/V (NV12).
pub struct Yuv420<'a> {
    /// Frame width in pixels.
    pub width: usize,
    /// Frame height in pixels.
    pub height: usize,
    /// The luma plane, `width` x `height` samples.
    pub y: &'a [u8],
    /// Bytes from one row of `y` to the next.
    pub y_stride: usize,
    /// I420: the U plane; NV12: the interleaved UV plane.
    pub u: &'a [u8],
    /// Bytes from one row of `u` to the next.
    pub u_stride: usize,
    /// I420: the V plane; NV12: unused.
    pub v: &'a [u8],
    /// Bytes from one row of `v` to the next (NV12: unused).
    pub v_stride: usize,
    /// True for NV12 (U and V interleaved in `u`), false for I420 (separate `u` and `v`).
    pub interleaved: bool,
    /// The colour matrix the frame was encoded with.
    pub matrix: YuvMatrix,
}

impl RgbImage {
    /// Converts limited-range 4:2:0 video (NV12, I420) to RGB.
    pub fn from_yuv420(f: &Yuv420<'_>) -> Result<RgbImage> {
        check_size(f.width, f.height, DEFAULT_MAX_PIXELS)?;
        let (cw, ch) = (f.width.div_ceil(2), f.height.div_ceil(2));
        let chroma_row = if f.interleaved { cw * 2 } else { cw };
        let planes = [
            ("Y", f.y, f.y_stride, f.height, f.width),
            ("U", f.u, f.u_stride, ch, chroma_row),
            ("V", f.v, f.v_stride, ch, cw),
        ];
        for (plane, data, stride, rows, row) in
            planes.into_iter().take(if f.interleaved { 2 } else { 3 })
        {
            let need = plane_bytes(stride, rows, row);
            if stride < row || need.is_none_or(|n| data.len() < n) {
                let need = need.map_or("more than 2^64".into(), |n| n.to_string());
                return Err(Error::Image(format!(
                    "{plane} plane of {} bytes with stride {stride} is too small for a {}x{} frame ({need} needed)",
                    data.len(),
                    f.width,
                    f.height
                )));
            }
        }
        let (rv, gu, gv, bu) = match f.matrix {
            YuvMatrix::Bt601 => (1.596f32, 0.392f32, 0.813f32, 2.017f32),
            YuvMatrix::Bt709 => (1.793, 0.213, 0.533, 2.112),
        };
        let mut data = Vec::with_capacity(f.width * f.height * 3);
        for row in 0..f.height {
            for col in 0..f.width {
                let y = 1.164 * (f.y[row * f.y_stride + col] as f32 - 16.0);
                let (cr, cc) = (row / 2, col / 2);
                let (u, v) = if f.interleaved {
                    (
                        f.u[cr * f.u_stride + 2 * cc],
                        f.u[cr * f.u_stride + 2 * cc + 1],
                    )
                } else {
                    (f.u[cr * f.u_stride + cc], f.v[cr * f.v_stride + cc])
                };
                let (u, v) = (u as f32 - 128.0, v as f32 - 128.0);
                let px = [y + rv * v, y - gu * u - gv * v, y + bu * u];
                data.extend(px.map(|c| c.round().clamp(0.0, 255.0) as u8));
            }
        }
        Ok(RgbImage {
            width: f.width,
            height: f.height,
            data,
        })
    }
}

/// Checks a frame's size: not empty, at most `max_pixels` pixels.
pub fn check_size(width: usize, height: usize, max_pixels: usize) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::Image(format!("empty frame ({width}x{height})")));
    }
    if width.checked_mul(height).is_none_or(|n| n > max_pixels) {
        return Err(Error::Image(format!(
            "frame {width}x{height} is larger than the limit of {max_pixels} pixels"
        )));
    }
    Ok(())
}

/// Bytes a plane of `rows` rows of `row` bytes, `stride` bytes apart, spans (the last
/// row needs no padding); None when that overflows.
fn plane_bytes(stride: usize, rows: usize, row: usize) -> Option<usize> {
    stride.checked_mul(rows.saturating_sub(1))?.checked_add(row)
}

//! Image preprocessing exactly as the reference does it: convert to RGB, resize the
//! u8 image straight to the model's square size with Pillow's bicubic filter (no
//! crop, aspect ratio not kept, result rounded to u8), rescale, normalise, CHW f32.
//!
//! The resize is a re-implementation of Pillow's `Resample.c` (8-bit path), bit for
//! bit: a separable convolution with the a = -0.5 bicubic kernel widened by the
//! downscale factor (antialias), fixed-point taps with 22 fraction bits, a horizontal
//! pass then a vertical pass, each rounded and clipped to u8. Generic resamplers
//! (`image`, `fast_image_resize`) differ from it by up to ~19/255 at sharp edges.
use crate::config::VisionConfig;
pub use crate::rgb_image::{
    DEFAULT_MAX_PIXELS, PixelFormat, RgbImage, Yuv420, YuvMatrix, check_size,
};
use crate::{Error, Result};

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's bilinear (triangle) filter.
fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Per output pixel: first input index and normalised filter weights (Pillow's
/// `precompute_coeffs`: the filter widened by the downscale factor, antialias).
fn filter_weights(
    in_size: usize,
    out_size: usize,
    filter: fn(f64) -> f64,
    support: f64,
) -> Vec<(usize, Vec<f64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C casts truncate toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| filter((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = weights.iter().sum();
            (
                xmin,
                weights
                    .iter()
                    .map(|&w| if total != 0.0 { w / total } else { w })
                    .collect(),
            )
        })
        .collect()
}

/// Bicubic weights as fixed-point taps (Pillow's `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    filter_weights(in_size, out_size, bicubic, 2.0)
        .into_iter()
        .map(|(xmin, weights)| {
            let taps = weights
                .iter()
                .map(|&w| {
                    let fixed = w * (1u64 << PRECISION_BITS) as f64;
                    (if w < 0.0 { -0.5 + fixed } else { 0.5 + fixed }) as i32
                })
                .collect();
            (xmin, taps)
        })
        .collect()
}

/// Whether Pillow (13) runs the vertical pass first: when the height shrinks by
/// more than twice as many pixels as the width does. The order changes rounding.
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let shrink_y = in_h as i64 - out_h as i64;
    let shrink_x = in_w as i64 - out_w as i64;
    shrink_y > 0 && shrink_y > shrink_x * 2
}

/// Pillow's `Image.fromarray(f32 array, "F").resize((out_w, out_h), BILINEAR)`:
/// double accumulation, f32 storage between and after the passes.
pub fn resize_f32_bilinear(
    data: &[f32],
    w: usize,
    h: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<f32> {
    let horizontal = |src: &[f32], w: usize, h: usize| -> Vec<f32> {
        if out_w == w {
            return src.to_vec();
        }
        let coeffs = filter_weights(w, out_w, bilinear, 1.0);
        let mut out = Vec::with_capacity(out_w * h);
        for y in 0..h {
            for (xmin, k) in &coeffs {
                out.push(
                    k.iter()
                        .enumerate()
                        .map(|(i, &k)| src[y * w + xmin + i] as f64 * k)
                        .sum::<f64>() as f32,
                );
            }
        }
        out
    };
    let vertical = |src: &[f32], w: usize, h: usize| -> Vec<f32> {
        if out_h == h {
            return src.to_vec();
        }
        let coeffs = filter_weights(h, out_h, bilinear, 1.0);
        let mut out = Vec::with_capacity(w * out_h);
        for (ymin, k) in &coeffs {
            for x in 0..w {
                out.push(
                    k.iter()
                        .enumerate()
                        .map(|(i, &k)| src[(ymin + i) * w + x] as f64 * k)
                        .sum::<f64>() as f32,
                );
            }
        }
        out
    };
    if vertical_first(w, h, out_w, out_h) {
        horizontal(&vertical(data, w, h), w, out_h)
    } else {
        vertical(&horizontal(data, w, h), out_w, h)
    }
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB image.
///
/// The pass order follows Pillow 13 (see `vertical_first`).
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    if vertical_first(img.width, img.height, width, height) {
        horizontal_pass(&vertical_pass(img, height), width)
    } else {
        vertical_pass(&horizontal_pass(img, width), height)
    }
}

/// Each output pixel: its taps over the input row, the three channels at once. The
/// sums stay in i32 as Pillow's do (the taps' magnitudes sum to well under
/// 2^31 / 255), which lets the compiler vectorise them.
fn horizontal_pass(img: &RgbImage, width: usize) -> RgbImage {
    if width == img.width {
        return img.clone();
    }
    let coeffs = coefficients(img.width, width);
    let mut out = vec![0u8; width * img.height * 3];
    for (row, out_row) in img
        .data
        .chunks_exact(img.width * 3)
        .zip(out.chunks_exact_mut(width * 3))
    {
        for ((xmin, taps), px) in coeffs.iter().zip(out_row.chunks_exact_mut(3)) {
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (&k, src) in taps.iter().zip(row[xmin * 3..].chunks_exact(3)) {
                for c in 0..3 {
                    acc[c] += src[c] as i32 * k;
                }
            }
            for c in 0..3 {
                px[c] = clip8(acc[c]);
            }
        }
    }
    RgbImage {
        width,
        height: img.height,
        data: out,
    }
}

/// Each output row: the weighted input rows added up across the whole row at once.
fn vertical_pass(img: &RgbImage, height: usize) -> RgbImage {
    if height == img.height {
        return img.clone();
    }
    let coeffs = coefficients(img.height, height);
    let row = img.width * 3;
    let mut out = vec![0u8; row * height];
    let mut acc = vec![0i32; row];
    for ((ymin, taps), out_row) in coeffs.iter().zip(out.chunks_exact_mut(row)) {
        acc.fill(1 << (PRECISION_BITS - 1));
        for (&k, src) in taps.iter().zip(img.data[ymin * row..].chunks_exact(row)) {
            for (a, &p) in acc.iter_mut().zip(src) {
                *a += p as i32 * k;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    RgbImage {
        width: img.width,
        height,
        data: out,
    }
}

/// Pixel values as the vision tower takes them: [3, size, size] f32, channel-major.
#[derive(Clone, Debug, PartialEq)]
pub struct PixelValues {
    /// Side of the square image in pixels.
    pub size: usize,
    /// `3 * size * size` values: the R, G and B planes in turn, each row-major.
    pub data: Vec<f32>,
}

impl PixelValues {
    /// Wraps already-preprocessed values (e.g. from a reference dump).
    pub fn from_chw(size: usize, data: Vec<f32>) -> Result<PixelValues> {
        if data.len() != 3 * size * size {
            return Err(Error::Image(format!(
                "pixel values: {} values for a 3x{size}x{size} image",
                data.len()
            )));
        }
        Ok(PixelValues { size, data })
    }
}

/// Resizes, rescales and normalises an image for a vision tower.
pub fn preprocess(img: &RgbImage, vision: &VisionConfig) -> PixelValues {
    let size = vision.image_size;
    let resized = resize_bicubic(img, size, size);
    let plane = size * size;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in resized.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = px[c] as f32 * vision.rescale;
            data[c * plane + i] = (x - vision.image_mean[c]) / vision.image_std[c];
        }
    }
    PixelValues { size, data }
}

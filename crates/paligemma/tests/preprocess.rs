//! Image preprocessing against Pillow and the reference processor.
mod common;
use common::fixtures_dir;
use paligemma::config::VisionConfig;
use paligemma::preprocess::{PixelFormat, RgbImage, preprocess, resize_bicubic};

const IMAGES: [(&str, &str); 3] = [
    ("rgb", "rgb.png"),
    ("rgba", "rgba.png"),
    ("photo", "photo.jpg"),
];
const SIZES: [usize; 4] = [42, 56, 70, 224];

struct Reference(Vec<u8>);

impl Reference {
    fn load() -> Reference {
        Reference(std::fs::read(fixtures_dir().join("preprocess/preprocess.safetensors")).unwrap())
    }

    fn get(&self, key: &str) -> (Vec<usize>, Vec<u8>) {
        let st = safetensors::SafeTensors::deserialize(&self.0).unwrap();
        let v = st.tensor(key).unwrap_or_else(|e| panic!("{key}: {e}"));
        (v.shape().to_vec(), v.data().to_vec())
    }

    fn f32(&self, key: &str) -> Vec<f32> {
        self.get(key)
            .1
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

fn vision(size: usize) -> VisionConfig {
    VisionConfig {
        image_size: size,
        patch_size: 14,
        width: 8,
        depth: 1,
        heads: 1,
        ffn: 8,
        ln_eps: 1e-6,
        image_mean: [0.5; 3],
        image_std: [0.5; 3],
        rescale: 1.0 / 255.0,
    }
}

#[test]
fn resize_matches_pillow_bit_for_bit() {
    let r = Reference::load();
    for (name, _) in IMAGES {
        let (shape, data) = r.get(&format!("{name}_rgb_u8"));
        let img = RgbImage {
            width: shape[1],
            height: shape[0],
            data,
        };
        for size in SIZES {
            let got = resize_bicubic(&img, size, size);
            let (_, want) = r.get(&format!("{name}_{size}_u8"));
            let diffs = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                diffs, 0,
                "{name} {}x{} -> {size}: {diffs} bytes differ from Pillow",
                img.width, img.height
            );
        }
    }
}

#[test]
fn pixel_values_match_reference_processor() {
    let r = Reference::load();
    let mut worst = 0f32;
    for (name, file) in IMAGES {
        let img = RgbImage::open(&fixtures_dir().join("images").join(file)).unwrap();
        for size in SIZES {
            let got = preprocess(&img, &vision(size));
            let want = r.f32(&format!("{name}_{size}"));
            let diff = got
                .data
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // PNGs decode identically everywhere and match exactly. The `image` crate's
            // JPEG decoder differs from Pillow's libjpeg-turbo by a unit at some pixels
            // (measured: up to 2 u8 steps after the resize, i.e. 4/255 normalised).
            let tol = if file.ends_with(".png") {
                1e-6
            } else {
                6.0 / 255.0
            };
            assert!(diff <= tol, "{name} at {size}: max diff {diff}");
            if file.ends_with(".png") {
                worst = worst.max(diff);
            }
        }
    }
    println!("worst PNG pixel-value difference: {worst}");
}

#[test]
fn raw_frames_with_stride_and_channel_orders() {
    let img = RgbImage::open(&fixtures_dir().join("images/rgb.png")).unwrap();
    let (w, h) = (img.width, img.height);
    for (format, order) in [
        (PixelFormat::Rgb, [0, 1, 2, 9]),
        (PixelFormat::Bgr, [2, 1, 0, 9]),
        (PixelFormat::Bgrx, [2, 1, 0, 3]),
        (PixelFormat::Rgba, [0, 1, 2, 3]),
    ] {
        let bpp = format.bytes_per_pixel();
        let stride = w * bpp + 13;
        let mut raw = vec![0u8; stride * h];
        for y in 0..h {
            for x in 0..w {
                let px = &img.data[(y * w + x) * 3..][..3];
                for (i, &src) in order.iter().enumerate().take(bpp) {
                    raw[y * stride + x * bpp + i] = if src == 3 { 255 } else { px[src] };
                }
            }
        }
        let back = RgbImage::from_raw(&raw, w, h, stride, format).unwrap();
        assert_eq!(back, img, "{format:?}");
    }
}

#[test]
fn bad_frames_are_errors() {
    let err = |r: paligemma::Result<RgbImage>| r.unwrap_err().to_string();
    assert!(err(RgbImage::from_raw(&[], 0, 0, 0, PixelFormat::Rgb)).contains("empty frame"));
    assert!(
        err(RgbImage::from_raw(
            &[0; 10],
            100_000,
            100_000,
            300_000,
            PixelFormat::Rgb
        ))
        .contains("larger than")
    );
    assert!(
        err(RgbImage::from_raw(&[0; 10], 4, 4, 12, PixelFormat::Rgb)).contains("needs 48 bytes")
    );
    assert!(err(RgbImage::from_raw(&[0; 100], 4, 4, 8, PixelFormat::Rgb)).contains("stride 8"));
    assert!(err(RgbImage::decode(b"definitely not an image")).contains("cannot decode"));
    // The pixel limit is checked from the header, before any decoding or resize work.
    let tall = image::DynamicImage::new_rgb8(1, 30_000);
    let mut png = Vec::new();
    tall.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    if let Err(e) = RgbImage::decode(&png) {
        panic!("30000 px is within the limit: {e}")
    }
    assert!(
        err(RgbImage::decode_limited(&png, 29_999))
            .contains("1x30000 is larger than the limit of 29999 pixels")
    );
}

#[test]
fn yuv420_frames() {
    use paligemma::preprocess::{Yuv420, YuvMatrix};
    // Mid-grey Y=126 with neutral chroma is RGB 128 under the limited-range matrix;
    // a saturated red (Y 81, U 90, V 240 in BT.601) comes back red.
    let (w, h) = (6, 4);
    let y = vec![126u8; w * h];
    let uv = vec![128u8; w * h / 2];
    let nv12 = Yuv420 {
        width: w,
        height: h,
        y: &y,
        y_stride: w,
        u: &uv,
        u_stride: w,
        v: &[],
        v_stride: 0,
        interleaved: true,
        matrix: YuvMatrix::Bt601,
    };
    let img = RgbImage::from_yuv420(&nv12).unwrap();
    assert!(img.data.iter().all(|&c| c == 128), "{:?}", &img.data[..6]);
    let y = vec![81u8; w * h];
    let (u, v) = (vec![90u8; 9], vec![240u8; 9]);
    let i420 = Yuv420 {
        width: w,
        height: h,
        y: &y,
        y_stride: w,
        u: &u,
        u_stride: 3,
        v: &v,
        v_stride: 3,
        interleaved: false,
        matrix: YuvMatrix::Bt601,
    };
    let img = RgbImage::from_yuv420(&i420).unwrap();
    assert!(
        img.data[0] > 250 && img.data[1] < 5 && img.data[2] < 5,
        "{:?}",
        &img.data[..3]
    );
    let short = Yuv420 {
        y: &y[..10],
        ..i420
    };
    assert!(
        RgbImage::from_yuv420(&short)
            .unwrap_err()
            .to_string()
            .contains("Y plane")
    );
}

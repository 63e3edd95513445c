//! Drawing on packed RGB(A/x) frames: rectangles, blended fills, masks and text
//! (8x8 bitmap font, scaled).
use font8x8::UnicodeFonts;

/// A mutable view of a packed frame.
pub struct Canvas<'a> {
    pub data: &'a mut [u8],
    pub width: usize,
    pub height: usize,
    pub stride: usize,
    pub bpp: usize,
    /// Byte offsets of R, G, B within a pixel.
    pub rgb: [usize; 3],
}

pub type Color = [u8; 3];

/// A stable, well-separated colour per label.
pub fn label_color(label: &str) -> Color {
    const PALETTE: [Color; 8] = [
        [255, 64, 64],
        [64, 220, 64],
        [64, 128, 255],
        [255, 200, 0],
        [255, 64, 255],
        [0, 220, 220],
        [255, 140, 0],
        [160, 100, 255],
    ];
    let h = label
        .bytes()
        .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
    PALETTE[h as usize % PALETTE.len()]
}

impl Canvas<'_> {
    fn put(&mut self, x: usize, y: usize, c: Color, alpha: f32) {
        if x >= self.width || y >= self.height {
            return;
        }
        let i = y * self.stride + x * self.bpp;
        for (k, &off) in self.rgb.iter().enumerate() {
            let old = self.data[i + off] as f32;
            self.data[i + off] = (old + (c[k] as f32 - old) * alpha).round() as u8;
        }
    }

    pub fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, c: Color, alpha: f32) {
        for yy in y..(y + h).min(self.height) {
            for xx in x..(x + w).min(self.width) {
                self.put(xx, yy, c, alpha);
            }
        }
    }

    /// Rectangle outline, `t` pixels thick, inside the box.
    pub fn rect(&mut self, x1: usize, y1: usize, x2: usize, y2: usize, t: usize, c: Color) {
        let (x2, y2) = (x2.min(self.width), y2.min(self.height));
        if x2 <= x1 || y2 <= y1 {
            return;
        }
        let (w, h) = (x2 - x1, y2 - y1);
        let t = t.min(w).min(h).max(1);
        self.fill(x1, y1, w, t, c, 1.0);
        self.fill(x1, y2 - t, w, t, c, 1.0);
        self.fill(x1, y1, t, h, c, 1.0);
        self.fill(x2 - t, y1, t, h, c, 1.0);
    }

    /// Text on a dark band; returns the band's height.
    pub fn text(&mut self, x: usize, y: usize, s: &str, scale: usize, c: Color) -> usize {
        let glyph = 8 * scale;
        let max_chars = (self.width.saturating_sub(x) / glyph).max(1);
        let chars: Vec<char> = s.chars().take(max_chars).collect();
        self.fill(x, y, chars.len() * glyph + 2, glyph + 2, [0, 0, 0], 0.6);
        for (n, ch) in chars.iter().enumerate() {
            let bitmap = font8x8::BASIC_FONTS
                .get(*ch)
                .or_else(|| font8x8::BASIC_FONTS.get('?'))
                .unwrap_or([0; 8]);
            for (row, bits) in bitmap.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.put(
                                    x + 1 + n * glyph + col * scale + dx,
                                    y + 1 + row * scale + dy,
                                    c,
                                    1.0,
                                );
                            }
                        }
                    }
                }
            }
        }
        glyph + 2
    }

    /// Tints the pixels of a mask (RLE over a w x h box placed at x, y).
    pub fn mask(&mut self, x: usize, y: usize, w: usize, h: usize, rle: &[u32], c: Color) {
        let mut pos = 0usize;
        for (i, &run) in rle.iter().enumerate() {
            let run = run as usize;
            if i % 2 == 1 {
                for p in pos..(pos + run).min(w * h) {
                    self.put(x + p % w, y + p / w, c, 0.45);
                }
            }
            pos += run;
        }
    }
}

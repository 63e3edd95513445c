//! Images through the vision tower and projector (batched across frames), and
//! segmentation codes through the mask decoder: the graphs of `vision.rs` and
//! [`crate::segment`] run by a [`Model`].
use crate::embedding::{ImageEmbedding, Timings, VisionStages, ms};
use crate::model::{GRAPH_SIZE, Model};
use crate::preprocess::{PixelValues, RgbImage, preprocess};
use crate::{Error, Result};
use ggml::{Context, Type};
use std::time::Instant;

/// Image patches one vision graph takes at most when [`Model::encode_images`] encodes
/// several frames together (four 224 px frames): it bounds the compute buffers. A
/// larger image runs in a graph of its own.
pub const VISION_BATCH_PATCHES: usize = 1024;

impl Model {
    /// Decodes 16 `<segNNN>` codes (0..128) to the decoder's raw 64x64 output, row-major.
    pub fn decode_mask(&mut self, codes: &[u32]) -> Result<Vec<f32>> {
        let Some(w) = &self.weights.mask_decoder else {
            return Err(Error::Invalid(format!(
                "{} has no segmentation decoder (convert with --seg-decoder vae-oid.npz)",
                self.weights.path().display()
            )));
        };
        let size = w.codebook_size;
        if codes.len() != crate::segment::CODES || codes.iter().any(|&c| c as usize >= size) {
            return Err(Error::Invalid(format!(
                "a mask needs {} codes in 0..{size}, got {codes:?}",
                crate::segment::CODES
            )));
        }
        let ctx = Context::new(1024, 1024)?;
        let input = ctx.input("seg_codes", Type::I32, &[codes.len()])?;
        let out = crate::segment::build(&ctx, &self.weights.tensors.store, w, input)?;
        out.set_output();
        let mut graph = ctx.graph(1024)?;
        graph.expand(out)?;
        self.sched.alloc(&graph)?;
        input.write_i32(&codes.iter().map(|&c| c as i32).collect::<Vec<_>>())?;
        self.sched.compute(&graph)?;
        Ok(out.read_f32()?)
    }

    /// Preprocesses an image and encodes it.
    pub fn encode_image(&mut self, image: &RgbImage) -> Result<ImageEmbedding> {
        Ok(self.encode_images(&[image])?.remove(0))
    }

    /// Preprocesses several images and encodes them together: as many as fit in
    /// [`VISION_BATCH_PATCHES`] share one graph, so that frames of several cameras
    /// cost one pass over the weights (and one set of graph overheads) instead of one
    /// each.
    pub fn encode_images(&mut self, images: &[&RgbImage]) -> Result<Vec<ImageEmbedding>> {
        let mut pre = Vec::with_capacity(images.len());
        let pixels: Vec<PixelValues> = images
            .iter()
            .map(|image| {
                let start = Instant::now();
                let pixels = preprocess(image, &self.weights.config.vision);
                pre.push(ms(start));
                pixels
            })
            .collect();
        let mut embeddings = self.encode_pixels_batch(&pixels.iter().collect::<Vec<_>>())?;
        for ((emb, image), pre) in embeddings.iter_mut().zip(images).zip(pre) {
            emb.timings.preprocess = pre;
            (emb.width, emb.height) = (image.width, image.height);
        }
        Ok(embeddings)
    }

    /// Encodes preprocessed pixel values.
    pub fn encode_pixels(&mut self, pixels: &PixelValues) -> Result<ImageEmbedding> {
        Ok(self.encode_pixels_batch(&[pixels])?.remove(0))
    }

    /// Encodes several images' pixel values, [`VISION_BATCH_PATCHES`] at most per graph.
    fn encode_pixels_batch(&mut self, pixels: &[&PixelValues]) -> Result<Vec<ImageEmbedding>> {
        let per_graph = (VISION_BATCH_PATCHES / self.weights.config.vision.n_patches()).max(1);
        let mut embeddings = Vec::with_capacity(pixels.len());
        for group in pixels.chunks(per_graph) {
            let start = Instant::now();
            let stages = self.run_vision(group, false)?;
            let vision = ms(start);
            embeddings.extend(stages.into_iter().zip(group).map(|(s, p)| ImageEmbedding {
                features: s.projector,
                width: p.size,
                height: p.size,
                timings: Timings {
                    vision,
                    ..Default::default()
                },
            }));
        }
        Ok(embeddings)
    }

    /// Vision tower and projector outputs, for parity checks.
    pub fn vision_stages(&mut self, pixels: &PixelValues) -> Result<VisionStages> {
        Ok(self.run_vision(&[pixels], true)?.remove(0))
    }

    /// Runs the vision graph on images of the model's size, all in one graph.
    fn run_vision(
        &mut self,
        pixels: &[&PixelValues],
        keep_vision: bool,
    ) -> Result<Vec<VisionStages>> {
        let v = &self.weights.config.vision;
        if let Some(bad) = pixels.iter().find(|p| p.size != v.image_size) {
            return Err(Error::Image(format!(
                "pixel values are {0}x{0}, the model takes {1}x{1}",
                bad.size, v.image_size
            )));
        }
        let ctx = Context::new(GRAPH_SIZE, GRAPH_SIZE)?;
        let input = ctx.input(
            "pixels",
            Type::F32,
            &[v.image_size, v.image_size, 3, pixels.len()],
        )?;
        let (vision, projector) = crate::vision::build(
            &ctx,
            &self.weights.tensors.store,
            &self.weights.vision,
            v,
            input,
        )?;
        vision.set_output();
        projector.set_output();
        let mut graph = ctx.graph(GRAPH_SIZE)?;
        graph.expand(vision)?;
        graph.expand(projector)?;
        self.sched.alloc(&graph)?;
        input.write_f32(
            &pixels
                .iter()
                .flat_map(|p| p.data.iter().copied())
                .collect::<Vec<_>>(),
        )?;
        self.sched.compute(&graph)?;
        let n = pixels.len();
        let vision = if keep_vision {
            vision.read_f32()?
        } else {
            Vec::new()
        };
        let projector = projector.read_f32()?;
        let (vision_size, projector_size) = (vision.len() / n, projector.len() / n);
        Ok((0..n)
            .map(|i| VisionStages {
                vision: vision
                    .get(i * vision_size..(i + 1) * vision_size)
                    .unwrap_or_default()
                    .to_vec(),
                projector: projector[i * projector_size..(i + 1) * projector_size].to_vec(),
            })
            .collect())
    }
}

//! From a task to a structured result: generate, parse, decode masks.
use crate::model::{GenerateOptions, Generation, ImageEmbedding, Model};
use crate::output::{self, TaskResult};
use crate::task::Task;
use crate::Result;

/// A task answered on one image.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Answer {
    pub task: Task,
    pub generation: Generation,
    pub result: TaskResult,
}

impl Model {
    /// Answers a task on an encoded image: detections come back in pixels of the
    /// image's original frame (loc bins divided by `loc_divisor`), segmentation masks
    /// decoded and pasted when the model has the decoder.
    pub fn answer(
        &mut self,
        image: &ImageEmbedding,
        task: &Task,
        opts: &GenerateOptions,
        loc_divisor: f32,
        on_token: &mut dyn FnMut(u32, &str) -> bool,
    ) -> Result<Answer> {
        let ids = self.tokenizer().prefix_ids(&task.prompt())?;
        let generation = self.generate_ids(image, &ids, opts, on_token)?;
        let mut result = output::parse(task, &generation.text, image.width, image.height, loc_divisor);
        if let TaskResult::Segmentation { detections, warnings } = &mut result {
            if !self.has_segmentation() && detections.iter().any(|d| d.seg_codes.is_some()) {
                warnings.push("segmentation is unavailable: this model file has no mask decoder (convert with --seg-decoder)".into());
            } else {
                for d in detections.iter_mut() {
                    if let Some(codes) = &d.seg_codes {
                        let raw = self.decode_mask(codes)?;
                        d.mask = crate::segment::paste(&raw, d.loc_bins, d.loc_divisor, image.width, image.height);
                    }
                }
            }
        }
        Ok(Answer { task: task.clone(), generation, result })
    }
}

//! The way to ask: a [`Task`] on an encoded image in, a typed [`TaskResult`] out,
//! with confidences (detection scores, the answer's mean log-probability).
use crate::embedding::ImageEmbedding;
use crate::filter::DetectionFilter;
use crate::generate::{GenerateOptions, Generation, OnToken};
use crate::model::Model;
use crate::output::{DEFAULT_LOC_DIVISOR, TaskResult};
use crate::sampling::Sampling;
use crate::task::Task;
use crate::{Result, confidence};

/// Settings of [`Model::answer`] and [`Model::answer_batch`].
#[derive(Clone, Debug, PartialEq)]
pub struct AnswerOptions {
    /// New tokens at most per answer.
    pub max_tokens: usize,
    /// How each next token is chosen (greedy by default).
    pub sampling: Sampling,
    /// What a loc bin is divided by to give a fraction of the frame: 1023 for
    /// PaliGemma's checkpoints ([`DEFAULT_LOC_DIVISOR`]), 1024 for some fine-tunes.
    pub loc_divisor: f32,
    /// Which detections to keep (score threshold, duplicates).
    pub filter: DetectionFilter,
}

impl Default for AnswerOptions {
    fn default() -> Self {
        AnswerOptions {
            max_tokens: GenerateOptions::default().max_tokens,
            sampling: Sampling::default(),
            loc_divisor: DEFAULT_LOC_DIVISOR,
            filter: DetectionFilter::default(),
        }
    }
}

/// A task answered on one image.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Answer {
    /// The task that was asked.
    pub task: Task,
    /// The raw generation: text, token ids, their probabilities and timings.
    pub generation: Generation,
    /// The generated text parsed for the task (boxes, masks and scores for detection and segmentation).
    pub result: TaskResult,
}

impl Model {
    /// Answers a task on an encoded image: detections come back in pixels of the
    /// image's original frame with a score each, segmentation masks decoded and pasted
    /// when the model has the decoder.
    pub fn answer(
        &mut self,
        image: &ImageEmbedding,
        task: &Task,
        opts: &AnswerOptions,
    ) -> Result<Answer> {
        let mut answers =
            self.answer_batch(image, std::slice::from_ref(task), opts, &mut |_| true)?;
        Ok(answers.remove(0))
    }

    /// Answers several tasks on one encoded image, streaming their tokens to `on_token`
    /// ([`crate::Token::prompt`] is the task's index in `tasks`; returning false ends
    /// that answer, so a caller can give each task a limit of its own). Tasks are
    /// decoded together in batches of up to [`Model::max_sequences`].
    pub fn answer_batch(
        &mut self,
        image: &ImageEmbedding,
        tasks: &[Task],
        opts: &AnswerOptions,
        on_token: &mut OnToken<'_>,
    ) -> Result<Vec<Answer>> {
        let generate = GenerateOptions {
            max_tokens: opts.max_tokens,
            sampling: opts.sampling.clone(),
            ignore_eos: false,
        };
        let mut answers = Vec::with_capacity(tasks.len());
        for (c, chunk) in tasks.chunks(self.max_sequences()).enumerate() {
            let first = c * self.max_sequences();
            let prefixes = chunk
                .iter()
                .map(|t| self.weights.tokenizer.prefix_ids(&t.prompt()))
                .collect::<Result<Vec<_>>>()?;
            let generations = self.generate(image, &prefixes, &generate, &mut |t| {
                on_token(&crate::Token {
                    prompt: first + t.prompt,
                    ..*t
                })
            })?;
            for (task, generation) in chunk.iter().zip(generations) {
                let result =
                    self.task_result(image, task, &generation, opts.loc_divisor, &opts.filter)?;
                answers.push(Answer {
                    task: task.clone(),
                    generation,
                    result,
                });
            }
        }
        Ok(answers)
    }

    /// The typed result of a generation for its task: parsed, its objects scored and
    /// filtered, the kept ones' masks decoded (for callers that drive [`Model::start`]
    /// and [`Model::step`]).
    pub fn task_result(
        &mut self,
        image: &ImageEmbedding,
        task: &Task,
        generation: &Generation,
        loc_divisor: f32,
        filter: &DetectionFilter,
    ) -> Result<TaskResult> {
        let mut result = crate::parse::parse(
            task,
            &generation.text,
            image.width,
            image.height,
            loc_divisor,
        );
        if let TaskResult::Detections { detections, .. }
        | TaskResult::Segmentation { detections, .. } = &mut result
        {
            let objects = confidence::objects(generation, &self.weights.tokenizer);
            for d in detections.iter_mut() {
                let evidence = objects.get(d.object);
                d.score = evidence.and_then(confidence::score);
                d.min_token_prob = evidence.and_then(|e| e.min_prob);
            }
        }
        filter.apply(&mut result);
        if let TaskResult::Segmentation {
            detections,
            warnings,
            ..
        } = &mut result
        {
            if !self.weights.has_segmentation() && detections.iter().any(|d| d.seg_codes.is_some())
            {
                warnings.push("segmentation is unavailable: this model file has no mask decoder (convert with --seg-decoder)".into());
            } else {
                for d in detections.iter_mut() {
                    if let Some(codes) = &d.seg_codes {
                        let raw = self.decode_mask(codes)?;
                        d.mask = crate::segment::paste(
                            &raw,
                            d.loc_bins,
                            d.loc_divisor,
                            image.width,
                            image.height,
                        );
                    }
                }
            }
        }
        Ok(result)
    }
}

//! One pass of the decoder over a batch of tokens (prefixes with their images, or
//! one decode step of every answer in progress): the graph of `decoder.rs` over the
//! KV cache, with its inputs written, run by a [`Model`].
use crate::decoder::DecoderInputs;
use crate::kv_cache::{Batch, Run};
use crate::model::{GRAPH_SIZE, Model};
use crate::{Error, Result};
use ggml::{Context, Type};

impl Model {
    /// Runs the decoder over a batch and returns the logits of its `batch.outputs`
    /// rows, [outputs, vocab] row-major, before the final softcap.
    pub(crate) fn forward(&mut self, batch: &Batch<'_>) -> Result<Vec<f32>> {
        let t = &self.weights.config.text;
        let n = batch.ids.len();
        if n == 0 || batch.outputs.is_empty() || batch.outputs.iter().any(|&r| r >= n) {
            return Err(Error::Invalid(format!(
                "a batch of {n} tokens with logits wanted at rows {:?}",
                batch.outputs
            )));
        }
        if let Some(&bad) = batch.ids.iter().find(|&&id| id as usize >= t.vocab_size) {
            return Err(Error::Prompt(format!(
                "token id {bad} is outside the vocabulary of {}",
                t.vocab_size
            )));
        }
        let runs = batch.runs(t.sliding_window);
        let embeddings = self.embedding_rows(batch, &runs)?;

        let ctx = Context::new(GRAPH_SIZE, GRAPH_SIZE)?;
        let store = &self.weights.tensors.store;
        // The image features of every prefix in one input, the text tokens' embeddings
        // in another; a gather puts the rows in batch order when they interleave.
        let mut parts = Vec::new();
        let image_in = if embeddings.image_features.is_empty() {
            None
        } else {
            let img = ctx.input(
                "image_features",
                Type::F32,
                &[t.width, embeddings.image_features.len() / t.width],
            )?;
            parts.push(img);
            Some(img)
        };
        let ids_in = if embeddings.text_ids.is_empty() {
            None
        } else {
            let tid = ctx.input("token_ids", Type::I32, &[embeddings.text_ids.len()])?;
            let emb = ctx.get_rows(store.get(self.weights.decoder.token_embd), tid)?;
            parts.push(ctx.scale(emb, t.embed_scale)?);
            Some(tid)
        };
        let mut x = parts[0];
        for p in &parts[1..] {
            x = ctx.concat(x, *p, 1)?;
        }
        let order_in = if embeddings
            .order
            .iter()
            .enumerate()
            .all(|(i, &o)| i as i32 == o)
        {
            None
        } else {
            let order = ctx.input("row_order", Type::I32, &[n])?;
            x = ctx.get_rows(x, order)?;
            Some(order)
        };
        let outputs_in =
            if batch.outputs.len() == n && batch.outputs.iter().enumerate().all(|(i, &r)| i == r) {
                None
            } else {
                Some(ctx.input("output_rows", Type::I32, &[batch.outputs.len()])?)
            };
        let pos = ctx.input("positions", Type::I32, &[n])?;
        let slots = ctx.input("slots", Type::I32, &[n])?;
        // Masks as f32 inputs (written below), read by the attention as f16. A mask no
        // layer reads would never be allocated.
        let read = [
            t.sliding_layers.iter().any(|&s| !s),
            t.sliding_layers.iter().any(|&s| s),
        ];
        let mut mask_inputs = Vec::new();
        let mut attention = Vec::new();
        for (r, run) in runs.iter().enumerate() {
            let mut masks = [None, None];
            for ((slot, read), (kind, m)) in masks
                .iter_mut()
                .zip(read)
                .zip([("full", &run.full), ("sliding", &run.sliding)])
            {
                if let (true, Some(values)) = (read, m) {
                    let input =
                        ctx.input(&format!("{kind}_mask.{r}"), Type::F32, &[run.kv, run.len])?;
                    mask_inputs.push((input, values));
                    *slot = Some(ctx.cast(input, Type::F16)?);
                }
            }
            let [full, sliding] = masks;
            attention.push(Run {
                base: run.base,
                first: run.first,
                len: run.len,
                kv: run.kv,
                full,
                sliding,
            });
        }
        let mut graph = ctx.graph(GRAPH_SIZE)?;
        let inputs = DecoderInputs {
            x,
            pos,
            slots,
            runs: attention,
            outputs: outputs_in,
        };
        let logits = crate::decoder::build(
            &ctx,
            store,
            &self.weights.decoder,
            t,
            &mut graph,
            &self.kv,
            inputs,
        )?;
        logits.set_output();
        graph.expand(logits)?;
        self.sched.alloc(&graph)?;

        if let Some(img) = image_in {
            img.write_f32(&embeddings.image_features)?;
        }
        if let Some(tid) = ids_in {
            tid.write_i32(&embeddings.text_ids)?;
        }
        if let Some(order) = order_in {
            order.write_i32(&embeddings.order)?;
        }
        if let Some(outputs) = outputs_in {
            outputs.write_i32(&batch.outputs.iter().map(|&r| r as i32).collect::<Vec<_>>())?;
        }
        pos.write_i32(&batch.positions)?;
        slots.write_i32(&batch.slots.iter().map(|&s| s as i32).collect::<Vec<_>>())?;
        for (input, values) in mask_inputs {
            input.write_f32(values)?;
        }
        self.sched.compute(&graph)?;
        Ok(logits.read_f32()?)
    }
}

/// Where each row of a batch takes its embedding from (see [`Model::forward`]).
struct EmbeddingRows {
    /// The features of every prefix's image tokens, one after another.
    image_features: Vec<f32>,
    /// The ids of the other tokens, in batch order.
    text_ids: Vec<i32>,
    /// Per batch row, its row among the image features followed by the text embeddings.
    order: Vec<i32>,
}

impl Model {
    /// Sorts the rows of a batch into image features (the image tokens that start each
    /// prefix, which must be exactly the model's count with an encoding of as many
    /// features) and text tokens (every other id: a generated image token is embedded
    /// as text).
    fn embedding_rows(&self, batch: &Batch<'_>, runs: &[Run<Vec<f32>>]) -> Result<EmbeddingRows> {
        let t = &self.weights.config.text;
        let (image_id, expected) = (
            self.weights.config.tokens.image_token_id,
            self.weights.config.tokens.image_token_count,
        );
        let mut image_rows = vec![false; batch.ids.len()];
        let mut image_features = Vec::new();
        for run in runs {
            let leading = batch.ids[run.first..run.first + run.len]
                .iter()
                .take_while(|&&id| id == image_id)
                .count();
            let image = batch
                .images
                .iter()
                .find(|(row, _)| *row == run.first)
                .map(|(_, e)| *e);
            if leading == 0 || !batch.prefix {
                continue;
            }
            let Some(image) =
                image.filter(|e| leading == expected && e.features.len() == expected * t.width)
            else {
                return Err(Error::Prompt(format!(
                    "the prefix needs {expected} image tokens at the start and an image encoding of as many features"
                )));
            };
            image_rows[run.first..run.first + leading]
                .iter_mut()
                .for_each(|r| *r = true);
            image_features.extend_from_slice(&image.features);
        }
        let n_image = image_features.len() / t.width;
        let (mut next_image, mut next_text) = (0, n_image as i32);
        let mut text_ids = Vec::new();
        let order = batch
            .ids
            .iter()
            .zip(&image_rows)
            .map(|(&id, &image)| {
                if image {
                    next_image += 1;
                    next_image - 1
                } else {
                    text_ids.push(id as i32);
                    next_text += 1;
                    next_text - 1
                }
            })
            .collect();
        Ok(EmbeddingRows {
            image_features,
            text_ids,
            order,
        })
    }
}

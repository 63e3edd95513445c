//! Ask a model about an image, streaming the answer:
//!
//! ```text
//! cargo run --release -p paligemma --example caption -- models/demo/paligemma2-demo-f16.gguf tests/fixtures/demo_eval/frame_0000.png "detect circle"
//! ```
use paligemma::preprocess::RgbImage;
use paligemma::{AnswerOptions, ContextOptions, Model, Task};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, image, rest @ ..] = &args[..] else {
        return Err("usage: caption MODEL.gguf IMAGE [PROMPT]".into());
    };
    let prompt = rest.first().map_or("caption en", String::as_str);

    let mut model = Model::load(
        model,
        &ContextOptions {
            threads: 1,
            ..Default::default()
        },
    )?;
    let image = model.encode_image(&RgbImage::open(image.as_ref())?)?;
    let task = Task::parse(prompt)?;
    let answers = model.answer_batch(&image, &[task], &AnswerOptions::default(), &mut |token| {
        print!("{}", token.text);
        true
    })?;
    println!();
    for d in answers[0].result.detections() {
        println!(
            "{} at ({:.0}, {:.0})-({:.0}, {:.0}), score {:.2}",
            d.label,
            d.bbox.x1,
            d.bbox.y1,
            d.bbox.x2,
            d.bbox.y2,
            d.score.unwrap_or(0.0)
        );
    }
    Ok(())
}

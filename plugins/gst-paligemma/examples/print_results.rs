//! Runs a pipeline with `paligemma` and prints every result from the bus.
//!
//! ```text
//! cargo run --release -p gst-paligemma --example print-results -- MODEL.gguf [PIPELINE-SOURCE] [PROMPTS]
//! ```
use gst::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .ok_or("usage: print-results MODEL.gguf [SOURCE] [PROMPTS]")?;
    let source = args
        .next()
        .unwrap_or_else(|| "videotestsrc is-live=true num-buffers=150 pattern=ball".into());
    let prompts = args
        .next()
        .unwrap_or_else(|| "caption en|detect ball".into());
    gst::init()?;
    gstpaligemma::plugin_register_static()?;
    let desc = format!(
        "{source} ! videoconvert ! paligemma model={model} prompts=\"{prompts}\" mode=sync interval=250 ! fakesink"
    );
    let pipeline = gst::parse::launch(&desc)?;
    pipeline.set_state(gst::State::Playing)?;
    let bus = pipeline.bus().ok_or("no bus")?;
    for msg in bus.iter_timed(gst::ClockTime::NONE) {
        match msg.view() {
            gst::MessageView::Element(e) => {
                if let Some(s) = e.structure().filter(|s| s.name() == "paligemma-result") {
                    let pts = s.get::<Option<gst::ClockTime>>("pts").ok().flatten();
                    println!(
                        "{} [{}] {}",
                        pts.map_or("-".into(), |p| p.to_string()),
                        s.get::<&str>("prompt-id")?,
                        s.get::<&str>("text")?
                    );
                    for d in s.get::<gst::Array>("detections")?.iter() {
                        let d = d.get::<gst::Structure>()?;
                        println!(
                            "    {} at x {:.0} y {:.0} w {:.0} h {:.0}",
                            d.get::<&str>("label")?,
                            d.get::<f64>("x")?,
                            d.get::<f64>("y")?,
                            d.get::<f64>("width")?,
                            d.get::<f64>("height")?
                        );
                    }
                }
            }
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => {
                return Err(format!("{} ({:?})", e.error(), e.debug()).into());
            }
            _ => {}
        }
    }
    pipeline.set_state(gst::State::Null)?;
    Ok(())
}

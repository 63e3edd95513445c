//! Publishes JPEG frames from a GStreamer source on a Zenoh key, so that
//! `paligemma-node` can run on another machine than the camera (a camera section
//! with `zenoh_key = "<key>"`).
//!
//! ```text
//! cargo run --release -p paligemma-node --example camera-publisher -- \
//!     --key cameras/front/jpeg --source "v4l2src ! videoconvert" --connect tcp/robot:7448
//! ```
use anyhow::{Context, Result};
use clap::Parser;
use gst::prelude::*;
use zenoh::Wait;

#[derive(Parser)]
#[command(about = "GStreamer source -> JPEG frames on a Zenoh key")]
struct Args {
    /// Zenoh key to put frames on.
    #[arg(long, default_value = "cameras/front/jpeg")]
    key: String,
    /// GStreamer source (anything producing raw video).
    #[arg(long, default_value = "videotestsrc is-live=true pattern=ball")]
    source: String,
    /// Frames per second to publish.
    #[arg(long, default_value_t = 5)]
    fps: u32,
    /// JPEG quality.
    #[arg(long, default_value_t = 85)]
    quality: u32,
    /// Zenoh endpoints to connect to.
    #[arg(long)]
    connect: Vec<String>,
    /// Stop after this many frames (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    frames: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    gst::init()?;
    let mut config = zenoh::Config::default();
    if !args.connect.is_empty() {
        config
            .insert_json5("connect/endpoints", &serde_json::to_string(&args.connect)?)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let session = zenoh::open(config)
        .wait()
        .map_err(|e| anyhow::anyhow!("zenoh: {e}"))?;
    let publisher = session
        .declare_publisher(args.key.clone())
        .encoding(zenoh::bytes::Encoding::IMAGE_JPEG)
        .wait()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let desc = format!(
        "{} ! videoconvert ! videorate ! video/x-raw,framerate={}/1 ! jpegenc quality={} ! appsink name=sink sync=false max-buffers=2 drop=true",
        args.source, args.fps, args.quality
    );
    let pipeline = gst::parse::launch(&desc)
        .context("pipeline")?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow::anyhow!("not a pipeline"))?;
    let sink = pipeline
        .by_name("sink")
        .context("appsink")?
        .downcast::<gst_app::AppSink>()
        .map_err(|_| anyhow::anyhow!("not an appsink"))?;
    pipeline.set_state(gst::State::Playing)?;
    let mut sent = 0u64;
    while let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(5)) {
        let Some(buffer) = sample.buffer() else {
            continue;
        };
        let map = buffer.map_readable()?;
        publisher
            .put(map.as_slice().to_vec())
            .wait()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        sent += 1;
        if args.frames > 0 && sent >= args.frames {
            break;
        }
    }
    pipeline.set_state(gst::State::Null)?;
    println!("published {sent} frames on {}", args.key);
    Ok(())
}

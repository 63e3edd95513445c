use super::{MetaKind, Mode};
use crate::result_meta::{Region, regions};
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::prelude::BaseTransformExtManual;
use gst_base::subclass::prelude::*;
use gst_video::prelude::VideoFrameExt;
use paligemma::preprocess::{PixelFormat, RgbImage, Yuv420, YuvMatrix};
use paligemma::{ContextOptions, Device, WeightOptions};
use paligemma_stream::message::{FrameInfo, Source};
use paligemma_stream::prompts::DEFAULT_MAX_TOKENS;
use paligemma_stream::tracker::TrackerConfig;
use paligemma_stream::{
    Engine, EngineOptions, Frame, FrameSamplerConfig, PromptSet, ResultMessage, Stream,
    StreamConfig,
};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "paligemma",
        gst::DebugColorFlags::empty(),
        Some("PaliGemma vision-language model"),
    )
});

const DEFAULT_PROMPTS: &str = "caption en";
const DEFAULT_INTERVAL_MS: u64 = 0;
/// While the engine is busy with this stream, frames are converted and offered at most this often.
const BUSY_OFFER_PERIOD: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
struct Settings {
    model: Option<String>,
    prompts: String,
    prompts_file: Option<String>,
    device: String,
    threads: u32,
    lanes: u32,
    max_tokens: u32,
    interval_ms: u64,
    mode: Mode,
    attach_meta: bool,
    meta_kind: MetaKind,
    post_messages: bool,
    max_pixels: u64,
    min_score: f32,
    duplicate_iou: f32,
    track: bool,
    predict_boxes: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            model: None,
            prompts: DEFAULT_PROMPTS.into(),
            prompts_file: None,
            device: "cpu".into(),
            threads: 0,
            lanes: 1,
            max_tokens: DEFAULT_MAX_TOKENS as u32,
            interval_ms: DEFAULT_INTERVAL_MS,
            mode: Mode::Async,
            attach_meta: true,
            meta_kind: MetaKind::default(),
            post_messages: true,
            max_pixels: paligemma::preprocess::DEFAULT_MAX_PIXELS as u64,
            min_score: 0.0,
            duplicate_iou: paligemma::filter::DEFAULT_DUPLICATE_IOU,
            track: true,
            predict_boxes: true,
        }
    }
}

impl Settings {
    /// The standing prompts; those that set no detection filter of their own get the
    /// element's (`min-score`, `duplicate-iou`).
    fn prompt_set(&self) -> Result<PromptSet, String> {
        let mut set = match &self.prompts_file {
            Some(path) => {
                PromptSet::from_file(std::path::Path::new(path)).map_err(|e| e.to_string())?
            }
            None => {
                PromptSet::from_short(&self.prompts, self.interval_ms, self.max_tokens as usize)
                    .map_err(|e| e.to_string())?
            }
        };
        for p in &mut set.prompts {
            p.min_score.get_or_insert(self.min_score);
            p.duplicate_iou.get_or_insert(self.duplicate_iou);
        }
        Ok(set)
    }
}

/// Shared with the stream's sink (it runs on the engine's thread).
#[derive(Default)]
struct Outbox {
    /// Async mode: results waiting to be attached to the next outgoing buffer.
    fresh: Mutex<Vec<ResultMessage>>,
    text: Mutex<TextPad>,
    /// Worst time one analysis took, for the LATENCY query in sync mode.
    worst_analysis: Mutex<Option<gst::ClockTime>>,
}

#[derive(Default)]
struct TextPad {
    pad: Option<gst::Pad>,
    started: bool,
    segment: Option<gst::Segment>,
    /// Text buffers are pushed from their own thread: a downstream sink waiting
    /// to preroll must not block the engine or the video stream.
    queue: Option<std::sync::mpsc::Sender<ResultMessage>>,
}

struct State {
    stream: Arc<Stream>,
    info: Option<gst_video::VideoInfo>,
    seq: u64,
    last_offer: Option<Instant>,
}

pub struct PaliGemma {
    settings: Mutex<Settings>,
    state: Mutex<Option<State>>,
    outbox: Arc<Outbox>,
}

impl Default for PaliGemma {
    fn default() -> Self {
        PaliGemma {
            settings: Mutex::new(Settings::default()),
            state: Mutex::new(None),
            outbox: Arc::new(Outbox::default()),
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for PaliGemma {
    const NAME: &'static str = "GstPaliGemma";
    type Type = super::PaliGemma;
    type ParentType = gst_base::BaseTransform;
}

impl ObjectImpl for PaliGemma {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("model").nick("Model").blurb("PaliGemma GGUF file written by `paligemma convert`").mutable_ready().build(),
                glib::ParamSpecString::builder("prompts")
                    .nick("Prompts")
                    .blurb("Standing prompts separated by |, e.g. \"caption en|detect person ; car\" (ignored when prompts-file is set)")
                    .default_value(Some(DEFAULT_PROMPTS))
                    .mutable_playing()
                    .build(),
                glib::ParamSpecString::builder("prompts-file")
                    .nick("Prompts file")
                    .blurb("TOML file of standing prompts ([[prompt]] id, task, every_ms, every_frames, max_tokens), as the node's configuration")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecString::builder("device")
                    .nick("Device")
                    .blurb("Compute device: cpu, cuda:N, vulkan:N or gpu")
                    .default_value(Some("cpu"))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("threads")
                    .nick("Threads")
                    .blurb("CPU threads for the model (0: half the cores; elements with the same model and settings share one model and pool)")
                    .maximum(1024)
                    .default_value(0)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("lanes")
                    .nick("Lanes")
                    .blurb("Batches the shared CPU engine runs at once, sharing its threads (for several elements on one small model)")
                    .minimum(1)
                    .maximum(64)
                    .default_value(1)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("max-tokens")
                    .nick("Max tokens")
                    .blurb("Longest answer in tokens (for prompts from the prompts property)")
                    .minimum(1)
                    .maximum(4096)
                    .default_value(DEFAULT_MAX_TOKENS as u32)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt64::builder("interval")
                    .nick("Interval")
                    .blurb("Minimum milliseconds between two analysed frames (0: as often as the model keeps up)")
                    .default_value(DEFAULT_INTERVAL_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default::<Mode>("mode", Mode::Async)
                    .nick("Mode")
                    .blurb("async: never block, results arrive on later frames (live sources); sync: a sampled frame waits for its results (files)")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("attach-meta")
                    .nick("Attach meta")
                    .blurb("Attach results to the buffers as the metas meta-kind says")
                    .default_value(true)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecEnum::builder_with_default::<MetaKind>("meta-kind", MetaKind::default())
                    .nick("Meta kind")
                    .blurb("Which metas carry the results: roi (GstVideoRegionOfInterestMeta), and with GStreamer >= 1.24 builds analytics (GstAnalyticsRelationMeta) or both")
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("post-messages")
                    .nick("Post messages")
                    .blurb("Post results as element messages (paligemma-result) on the bus")
                    .default_value(true)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt64::builder("max-pixels")
                    .nick("Max pixels")
                    .blurb("Largest frame analysed (width x height); larger frames pass through unanalysed, with a warning")
                    .minimum(1)
                    .default_value(paligemma::preprocess::DEFAULT_MAX_PIXELS as u64)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecFloat::builder("min-score")
                    .nick("Minimum score")
                    .blurb("Drop detections scoring below this: the model's probability that the box (IoU >= 0.5) and label are right (prompts of a prompts-file may set their own min_score)")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(0.0)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecFloat::builder("duplicate-iou")
                    .nick("Duplicate IoU")
                    .blurb("Same-label boxes overlapping with an IoU above this are one object and only the better-scoring one is kept (1: keep all)")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(paligemma::filter::DEFAULT_DUPLICATE_IOU)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("track")
                    .nick("Track")
                    .blurb("Give detected objects track ids that stay the same over analysed frames (track-id on the metas and bus messages)")
                    .default_value(true)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("predict-boxes")
                    .nick("Predict boxes")
                    .blurb("On frames between two answers, attach each tracked box where the tracker predicts it (ROI metas with predicted=true), so that overlays follow the video")
                    .default_value(true)
                    .mutable_playing()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut settings = self.settings.lock().unwrap();
        match pspec.name() {
            "model" => settings.model = value.get().expect("type checked upstream"),
            "prompts" => {
                settings.prompts = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_default()
            }
            "prompts-file" => settings.prompts_file = value.get().expect("type checked upstream"),
            "device" => {
                settings.device = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_else(|| "cpu".into())
            }
            "threads" => settings.threads = value.get().expect("type checked upstream"),
            "lanes" => settings.lanes = value.get().expect("type checked upstream"),
            "max-tokens" => settings.max_tokens = value.get().expect("type checked upstream"),
            "interval" => settings.interval_ms = value.get().expect("type checked upstream"),
            "mode" => settings.mode = value.get().expect("type checked upstream"),
            "attach-meta" => settings.attach_meta = value.get().expect("type checked upstream"),
            "meta-kind" => settings.meta_kind = value.get().expect("type checked upstream"),
            "post-messages" => settings.post_messages = value.get().expect("type checked upstream"),
            "max-pixels" => settings.max_pixels = value.get().expect("type checked upstream"),
            "min-score" => settings.min_score = value.get().expect("type checked upstream"),
            "duplicate-iou" => settings.duplicate_iou = value.get().expect("type checked upstream"),
            "track" => settings.track = value.get().expect("type checked upstream"),
            "predict-boxes" => settings.predict_boxes = value.get().expect("type checked upstream"),
            other => unreachable!("unknown property {other}"),
        }
        // Prompt changes take effect at once while running.
        if matches!(
            pspec.name(),
            "prompts" | "prompts-file" | "max-tokens" | "min-score" | "duplicate-iou"
        ) {
            let result = settings.prompt_set();
            drop(settings);
            match (result, self.state.lock().unwrap().as_ref()) {
                (Ok(set), Some(state)) => state.stream.set_prompts(set),
                (Err(e), Some(_)) => gst::element_imp_warning!(
                    self,
                    gst::LibraryError::Settings,
                    ["Keeping the current prompts: {}", e]
                ),
                _ => {}
            }
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let settings = self.settings.lock().unwrap();
        match pspec.name() {
            "model" => settings.model.to_value(),
            "prompts" => settings.prompts.to_value(),
            "prompts-file" => settings.prompts_file.to_value(),
            "device" => settings.device.to_value(),
            "threads" => settings.threads.to_value(),
            "lanes" => settings.lanes.to_value(),
            "max-tokens" => settings.max_tokens.to_value(),
            "interval" => settings.interval_ms.to_value(),
            "mode" => settings.mode.to_value(),
            "attach-meta" => settings.attach_meta.to_value(),
            "meta-kind" => settings.meta_kind.to_value(),
            "post-messages" => settings.post_messages.to_value(),
            "max-pixels" => settings.max_pixels.to_value(),
            "min-score" => settings.min_score.to_value(),
            "duplicate-iou" => settings.duplicate_iou.to_value(),
            "track" => settings.track.to_value(),
            "predict-boxes" => settings.predict_boxes.to_value(),
            other => unreachable!("unknown property {other}"),
        }
    }
}

impl GstObjectImpl for PaliGemma {}

fn video_caps() -> gst::Caps {
    gst_video::VideoCapsBuilder::new()
        .format_list([
            gst_video::VideoFormat::Rgb,
            gst_video::VideoFormat::Rgba,
            gst_video::VideoFormat::Bgrx,
            gst_video::VideoFormat::Bgra,
            gst_video::VideoFormat::Nv12,
            gst_video::VideoFormat::I420,
        ])
        .build()
}

impl ElementImpl for PaliGemma {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "PaliGemma",
                "Filter/Analyzer/Video",
                "Answers standing prompts (captions, detections, masks, OCR, questions) on sampled frames with a PaliGemma model; video passes through untouched",
                "paligemma-rs developers",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = video_caps();
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &caps,
                )
                .unwrap(),
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &caps,
                )
                .unwrap(),
                gst::PadTemplate::new(
                    "text_src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Request,
                    &gst::Caps::builder("text/x-raw")
                        .field("format", "utf8")
                        .build(),
                )
                .unwrap(),
            ]
        });
        TEMPLATES.as_ref()
    }

    fn request_new_pad(
        &self,
        templ: &gst::PadTemplate,
        _name: Option<&str>,
        _caps: Option<&gst::Caps>,
    ) -> Option<gst::Pad> {
        let mut text = self.outbox.text.lock().unwrap();
        if text.pad.is_some() {
            gst::debug!(CAT, imp = self, "text_src already exists");
            return None;
        }
        let pad = gst::Pad::builder_from_template(templ)
            .name("text_src")
            .build();
        pad.set_active(true).ok()?;
        self.obj().add_pad(&pad).ok()?;
        text.pad = Some(pad.clone());
        text.started = false;
        let (tx, rx) = std::sync::mpsc::channel::<ResultMessage>();
        let element = self.obj().downgrade();
        let outbox = self.outbox.clone();
        std::thread::Builder::new()
            .name("paligemma-text".into())
            .spawn(move || {
                for msg in rx {
                    let Some(element) = element.upgrade() else {
                        break;
                    };
                    push_text(&element, &outbox, &msg);
                }
            })
            .ok()?;
        text.queue = Some(tx);
        Some(pad)
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        // Leaving PAUSED deactivates the pads, which waits for the streaming thread;
        // in sync mode that thread may be waiting for an analysis: abandon it first.
        if transition == gst::StateChange::PausedToReady
            && let Some(state) = self.state.lock().unwrap().as_ref()
        {
            state.stream.flush();
        }
        self.parent_change_state(transition)
    }

    fn release_pad(&self, pad: &gst::Pad) {
        let mut text = self.outbox.text.lock().unwrap();
        if text.pad.as_ref() == Some(pad) {
            text.pad = None;
            text.queue = None;
        }
        drop(text);
        let _ = pad.set_active(false);
        let _ = self.obj().remove_pad(pad);
    }
}

impl PaliGemma {
    /// Attaches results to a buffer as the metas `kind` says, with the standing prompts
    /// `active` in force (see [`regions`]).
    fn attach_results(
        &self,
        buf: &mut gst::BufferRef,
        info: &gst_video::VideoInfo,
        msgs: &[ResultMessage],
        active: &[String],
        kind: MetaKind,
    ) {
        for msg in msgs {
            if kind.roi() {
                for region in regions(msg, active) {
                    region.attach(buf, info.width(), info.height());
                }
            }
            #[cfg(feature = "analytics")]
            if kind.analytics()
                && let Err(e) = crate::analytics_meta::attach(buf, msg, info.width(), info.height())
            {
                gst::warning!(
                    CAT,
                    imp = self,
                    "analytics meta for prompt {}: {}",
                    msg.prompt.id,
                    e
                );
            }
        }
    }

    /// The stream's sink: bus messages, text buffers, and (async) results for the next buffer.
    fn make_sink(&self, mode: Mode) -> paligemma_stream::Sink {
        let element = self.obj().downgrade();
        let outbox = self.outbox.clone();
        Box::new(move |msg: &ResultMessage| {
            let Some(element) = element.upgrade() else {
                return;
            };
            let imp = element.imp();
            let (post, attach) = {
                let s = imp.settings.lock().unwrap();
                (s.post_messages, s.attach_meta)
            };
            let took = gst::ClockTime::from_nseconds(
                ((msg.latency_ms.total - msg.latency_ms.queue).max(0.0) * 1e6) as u64,
            );
            {
                let mut worst = outbox.worst_analysis.lock().unwrap();
                if worst.is_none_or(|w| took > w) {
                    *worst = Some(took);
                }
            }
            if post {
                let _ = element.post_message(result_message(&element, msg));
            }
            if let Some(queue) = &outbox.text.lock().unwrap().queue {
                let _ = queue.send(msg.clone());
            }
            if attach && mode == Mode::Async {
                outbox.fresh.lock().unwrap().push(msg.clone());
            }
        })
    }

    fn frame_from_buffer(
        &self,
        buf: &gst::BufferRef,
        info: &gst_video::VideoInfo,
        seq: u64,
    ) -> Result<Frame, String> {
        let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buf, info)
            .map_err(|e| format!("cannot map the frame: {e}"))?;
        let (w, h) = (info.width() as usize, info.height() as usize);
        let max_pixels =
            usize::try_from(self.settings.lock().unwrap().max_pixels).unwrap_or(usize::MAX);
        paligemma::preprocess::check_size(w, h, max_pixels).map_err(|e| e.to_string())?;
        let plane = |i: u32| frame.plane_data(i).map_err(|e| format!("plane {i}: {e}"));
        let stride = |i: usize| frame.plane_stride()[i] as usize;
        let image = match info.format() {
            gst_video::VideoFormat::Rgb => {
                RgbImage::from_raw(plane(0)?, w, h, stride(0), PixelFormat::Rgb)
            }
            gst_video::VideoFormat::Rgba => {
                RgbImage::from_raw(plane(0)?, w, h, stride(0), PixelFormat::Rgba)
            }
            gst_video::VideoFormat::Bgrx => {
                RgbImage::from_raw(plane(0)?, w, h, stride(0), PixelFormat::Bgrx)
            }
            gst_video::VideoFormat::Bgra => {
                RgbImage::from_raw(plane(0)?, w, h, stride(0), PixelFormat::Bgra)
            }
            format @ (gst_video::VideoFormat::Nv12 | gst_video::VideoFormat::I420) => {
                let matrix = if info.colorimetry().matrix() == gst_video::VideoColorMatrix::Bt709 {
                    YuvMatrix::Bt709
                } else {
                    YuvMatrix::Bt601
                };
                let nv12 = format == gst_video::VideoFormat::Nv12;
                RgbImage::from_yuv420(&Yuv420 {
                    width: w,
                    height: h,
                    y: plane(0)?,
                    y_stride: stride(0),
                    u: plane(1)?,
                    u_stride: stride(1),
                    v: if nv12 { &[] } else { plane(2)? },
                    v_stride: if nv12 { 0 } else { stride(2) },
                    interleaved: nv12,
                    matrix,
                })
            }
            other => return Err(format!("unsupported format {other:?}")),
        }
        .map_err(|e| e.to_string())?;
        let segment = self.obj().segment();
        let segment = segment.downcast_ref::<gst::ClockTime>();
        let pts = buf.pts();
        let info = FrameInfo {
            seq,
            pts_ns: pts.map(|p| p.nseconds()),
            running_time_ns: segment
                .and_then(|s| s.to_running_time(pts))
                .map(|t| t.nseconds()),
            stream_time_ns: segment
                .and_then(|s| s.to_stream_time(pts))
                .map(|t| t.nseconds()),
            capture_unix_ns: paligemma_stream::message::unix_time_ns(),
            frame_id: None,
            width: w,
            height: h,
        };
        Ok(Frame::new(info, image))
    }
}

/// Attaches, for each standing prompt not answered on this buffer (`answered`), the
/// boxes its tracker predicts at the buffer's timestamp, as ROI metas marked predicted.
fn attach_predictions(
    buf: &mut gst::BufferRef,
    info: &gst_video::VideoInfo,
    stream: &Stream,
    answered: &[&str],
) {
    let Some(pts) = buf.pts() else { return };
    let predicted = stream.predict(pts.nseconds() as f64 / 1e9);
    if predicted.iter().all(|(_, boxes)| boxes.is_empty()) {
        return; // nothing tracked: no need for the prompt list on this frame
    }
    let active = prompt_ids(stream);
    let (width, height) = (info.width(), info.height());
    for (prompt_id, boxes) in predicted {
        if answered.contains(&prompt_id.as_str()) || !active.contains(&prompt_id) {
            continue;
        }
        for region in Region::predicted(&prompt_id, &boxes, (width, height), &active) {
            region.attach(buf, width, height);
        }
    }
}

/// Ids of the stream's standing prompts.
fn prompt_ids(stream: &Stream) -> Vec<String> {
    stream.prompts().prompts.into_iter().map(|p| p.id).collect()
}

/// The bus message for one result: the prompt, the text, the result as JSON and as
/// fields, the analysed frame's timestamps and the latency.
fn result_message(element: &super::PaliGemma, msg: &ResultMessage) -> gst::Message {
    let detections: Vec<gst::glib::SendValue> = msg
        .result
        .detections()
        .iter()
        .map(|d| {
            let mut s = gst::Structure::builder("detection")
                .field("label", &d.label)
                .field("x", d.bbox.x as f64)
                .field("y", d.bbox.y as f64)
                .field("width", d.bbox.w as f64)
                .field("height", d.bbox.h as f64)
                .field("x1", d.box_norm.x1 as f64)
                .field("y1", d.box_norm.y1 as f64)
                .field("x2", d.box_norm.x2 as f64)
                .field("y2", d.box_norm.y2 as f64)
                .field("has-mask", d.mask.is_some())
                .build();
            if let Some(score) = d.score {
                s.set("score", score as f64);
            }
            if let Some(id) = d.track_id {
                s.set("track-id", id);
            }
            s.to_send_value()
        })
        .collect();
    let text = msg.result.text().unwrap_or(&msg.raw).to_string();
    let clock = |ns: Option<u64>| ns.map(gst::ClockTime::from_nseconds);
    let mut s = gst::Structure::builder("paligemma-result")
        .field("prompt-id", &msg.prompt.id)
        .field("prompt", &msg.prompt.text)
        .field("task", msg.prompt.task.as_str())
        .field("kind", msg.result.kind().as_str())
        .field("text", text)
        .field("raw", &msg.raw)
        .field("json", msg.to_json())
        .field("detections", gst::Array::from_values(detections))
        .field("frame-seq", msg.frame.seq)
        .field("pts", clock(msg.frame.pts_ns))
        .field("running-time", clock(msg.frame.running_time_ns))
        .field("stream-time", clock(msg.frame.stream_time_ns))
        .field("latency-ms", msg.latency_ms.total)
        .field("frames-dropped", msg.frames_dropped)
        .build();
    if let Some(lp) = msg.mean_logprob {
        s.set("mean-logprob", lp as f64);
    }
    gst::message::Element::builder(s).src(element).build()
}

/// Pushes a result's text on the text_src pad, timestamped with the analysed frame.
fn push_text(element: &super::PaliGemma, outbox: &Outbox, msg: &ResultMessage) {
    let mut text = outbox.text.lock().unwrap();
    let Some(pad) = text.pad.clone() else { return };
    if !text.started {
        let stream_id = pad.create_stream_id(element, Some("text")).to_string();
        let _ = pad.push_event(gst::event::StreamStart::new(&stream_id));
        let _ = pad.push_event(gst::event::Caps::new(
            &gst::Caps::builder("text/x-raw")
                .field("format", "utf8")
                .build(),
        ));
        let segment = text
            .segment
            .clone()
            .unwrap_or_else(|| gst::FormattedSegment::<gst::ClockTime>::new().upcast());
        let _ = pad.push_event(gst::event::Segment::new(&segment));
        text.started = true;
    }
    let body = match &msg.result {
        paligemma::TaskResult::Detections { detections, .. }
        | paligemma::TaskResult::Segmentation { detections, .. } => detections
            .iter()
            .map(|d| {
                format!(
                    "{} ({:.0},{:.0} {:.0}x{:.0})",
                    d.label, d.bbox.x, d.bbox.y, d.bbox.w, d.bbox.h
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        paligemma::TaskResult::Error { message } => format!("error: {message}"),
        other => other.text().unwrap_or_default().to_string(),
    };
    let line = format!("{}: {}", msg.prompt.id, body);
    let mut buffer = gst::Buffer::from_mut_slice(line.into_bytes());
    {
        let b = buffer.get_mut().expect("new buffer is writable");
        b.set_pts(msg.frame.pts_ns.map(gst::ClockTime::from_nseconds));
        b.set_duration(gst::ClockTime::from_seconds(1));
    }
    drop(text);
    if let Err(e) = pad.push(buffer) {
        gst::debug!(CAT, obj = element, "text_src push: {:?}", e);
    }
}

impl BaseTransformImpl for PaliGemma {
    const MODE: gst_base::subclass::BaseTransformMode =
        gst_base::subclass::BaseTransformMode::AlwaysInPlace;
    const PASSTHROUGH_ON_SAME_CAPS: bool = false;
    const TRANSFORM_IP_ON_PASSTHROUGH: bool = false;

    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let settings = self.settings.lock().unwrap().clone();
        let Some(path) = settings.model.clone() else {
            return Err(gst::error_msg!(
                gst::ResourceError::NotFound,
                ["No model: set the model property to a PaliGemma GGUF file"]
            ));
        };
        let prompts = settings.prompt_set().map_err(|e| {
            gst::error_msg!(gst::LibraryError::Settings, ["Invalid prompts: {}", e])
        })?;
        let obj = self.obj();
        let _ = obj.post_message(
            gst::message::Progress::builder(
                gst::ProgressType::Start,
                "load",
                &format!("Loading {path}"),
            )
            .src(&*obj)
            .build(),
        );
        gst::info!(CAT, imp = self, "loading {} on {}", path, settings.device);
        let device = Device::find(&settings.device)
            .map_err(|e| gst::error_msg!(gst::LibraryError::Settings, ["Invalid device: {}", e]))?;
        let opts = EngineOptions {
            weights: WeightOptions {
                device,
                ..Default::default()
            },
            context: ContextOptions {
                threads: settings.threads as usize,
                ..Default::default()
            },
            lanes: settings.lanes as usize,
        };
        // Elements of one process that load the same file with the same options share
        // one engine: the weights and the thread pool exist once.
        let engine = match Engine::shared(&path, &opts) {
            Ok(e) => e,
            Err(e) => {
                let _ = obj.post_message(
                    gst::message::Progress::builder(
                        gst::ProgressType::Error,
                        "load",
                        &e.to_string(),
                    )
                    .src(&*obj)
                    .build(),
                );
                let kind = if std::path::Path::new(&path).exists() {
                    gst::ResourceError::OpenRead
                } else {
                    gst::ResourceError::NotFound
                };
                return Err(gst::error_msg!(kind, ["Cannot load model {}: {}", path, e]));
            }
        };
        let _ = obj.post_message(
            gst::message::Progress::builder(
                gst::ProgressType::Complete,
                "load",
                &format!("Loaded {path}"),
            )
            .src(&*obj)
            .build(),
        );
        let config = StreamConfig {
            source: Source {
                node: String::new(),
                camera: obj.name().to_string(),
            },
            sampler: FrameSamplerConfig {
                min_interval: Duration::from_millis(settings.interval_ms),
                skip_unchanged_below: None,
            },
            tracking: TrackerConfig {
                enabled: settings.track,
                ..Default::default()
            },
            ..Default::default()
        };
        let stream = Stream::attach(engine, prompts, config, self.make_sink(settings.mode));
        *self.state.lock().unwrap() = Some(State {
            stream: Arc::new(stream),
            info: None,
            seq: 0,
            last_offer: None,
        });
        *self.outbox.worst_analysis.lock().unwrap() = None;
        Ok(())
    }

    fn stop(&self) -> Result<(), gst::ErrorMessage> {
        // Taking the state first means the streaming thread sees no stream while this
        // one waits for the engine to abandon the stream's work.
        let state = self.state.lock().unwrap().take();
        if let Some(state) = state {
            state.stream.stop();
        }
        self.outbox.fresh.lock().unwrap().clear();
        let mut text = self.outbox.text.lock().unwrap();
        text.started = false;
        Ok(())
    }

    fn set_caps(&self, incaps: &gst::Caps, _outcaps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let info = gst_video::VideoInfo::from_caps(incaps)
            .map_err(|_| gst::loggable_error!(CAT, "invalid caps {}", incaps))?;
        gst::debug!(
            CAT,
            imp = self,
            "caps {}x{} {:?}",
            info.width(),
            info.height(),
            info.format()
        );
        if let Some(state) = self.state.lock().unwrap().as_mut() {
            state.info = Some(info);
        }
        Ok(())
    }

    fn sink_event(&self, event: gst::Event) -> bool {
        match event.view() {
            gst::EventView::FlushStart(_) => {
                if let Some(state) = self.state.lock().unwrap().as_ref() {
                    state.stream.flush();
                }
                self.outbox.fresh.lock().unwrap().clear();
            }
            gst::EventView::Eos(_) => {
                // Sync mode has nothing pending (frames wait for their results);
                // async mode drops work that would arrive after the stream ended.
                if let Some(state) = self.state.lock().unwrap().as_ref() {
                    state.stream.flush();
                }
            }
            gst::EventView::Segment(s) => {
                self.outbox.text.lock().unwrap().segment = Some(s.segment().clone());
            }
            _ => {}
        }
        self.parent_sink_event(event)
    }

    fn query(&self, direction: gst::PadDirection, query: &mut gst::QueryRef) -> bool {
        if direction == gst::PadDirection::Src
            && let gst::QueryViewMut::Latency(q) = query.view_mut()
        {
            if !BaseTransformImplExt::parent_query(self, direction, q.query_mut()) {
                return false;
            }
            let (live, min, max) = q.result();
            let mode = self.settings.lock().unwrap().mode;
            // Async never delays a buffer. Sync holds a sampled frame for its whole
            // analysis: report the worst seen so far (0 before the first one).
            let added = match mode {
                Mode::Async => gst::ClockTime::ZERO,
                Mode::Sync => self
                    .outbox
                    .worst_analysis
                    .lock()
                    .unwrap()
                    .unwrap_or(gst::ClockTime::ZERO),
            };
            q.set(live, min + added, max.map(|m| m + added));
            return true;
        }
        BaseTransformImplExt::parent_query(self, direction, query)
    }

    fn transform_ip(&self, buf: &mut gst::BufferRef) -> Result<gst::FlowSuccess, gst::FlowError> {
        let (mode, attach, predict) = {
            let s = self.settings.lock().unwrap();
            (
                s.mode,
                s.attach_meta.then_some(s.meta_kind),
                s.attach_meta && s.meta_kind.roi() && s.predict_boxes,
            )
        };
        let mut guard = self.state.lock().unwrap();
        let Some(state) = guard.as_mut() else {
            return Ok(gst::FlowSuccess::Ok);
        };
        let Some(info) = state.info.clone() else {
            return Ok(gst::FlowSuccess::Ok);
        };
        state.seq += 1;
        let seq = state.seq;
        match mode {
            Mode::Async => {
                // Attach what arrived since the last buffer.
                let fresh = std::mem::take(&mut *self.outbox.fresh.lock().unwrap());
                if let (Some(kind), false) = (attach, fresh.is_empty()) {
                    self.attach_results(buf, &info, &fresh, &prompt_ids(&state.stream), kind);
                }
                if predict {
                    let answered: Vec<&str> = fresh.iter().map(|m| m.prompt.id.as_str()).collect();
                    attach_predictions(buf, &info, &state.stream, &answered);
                }
                // Convert and offer the frame; while the model is busy, at most every
                // BUSY_OFFER_PERIOD, so a slow model does not cost a copy per frame.
                let now = Instant::now();
                let busy = state.stream.stats().busy;
                if !busy
                    || state
                        .last_offer
                        .is_none_or(|t| now.duration_since(t) >= BUSY_OFFER_PERIOD)
                {
                    match self.frame_from_buffer(buf, &info, seq) {
                        Ok(frame) => {
                            state.stream.submit(frame);
                            state.last_offer = Some(now);
                        }
                        Err(e) => gst::warning!(CAT, imp = self, "frame {}: {}", seq, e),
                    }
                }
            }
            Mode::Sync => {
                let frame = match self.frame_from_buffer(buf, &info, seq) {
                    Ok(f) => f,
                    Err(e) => {
                        gst::warning!(CAT, imp = self, "frame {}: {}", seq, e);
                        return Ok(gst::FlowSuccess::Ok);
                    }
                };
                if !state.stream.sample_now(&frame) {
                    if predict {
                        attach_predictions(buf, &info, &state.stream, &[]);
                    }
                    return Ok(gst::FlowSuccess::Ok);
                }
                // Analyse without holding the state lock, so a state change can
                // interrupt it (see change_state).
                let stream = state.stream.clone();
                drop(guard);
                match (stream.analyse(frame), attach) {
                    (Ok(results), Some(kind)) => {
                        self.attach_results(buf, &info, &results, &prompt_ids(&stream), kind)
                    }
                    (Ok(_), None) => {}
                    (Err(e), _) => gst::debug!(
                        CAT,
                        imp = self,
                        "analysis of frame {} abandoned: {}",
                        seq,
                        e
                    ),
                }
            }
        }
        Ok(gst::FlowSuccess::Ok)
    }
}

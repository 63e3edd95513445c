//! Newest frame wins: the producer (a pipeline's streaming thread, a Zenoh
//! subscriber) never waits; the engine takes the latest frame once the minimum
//! interval has passed, optionally skipping frames that barely changed.
use crate::message::FrameInfo;
use paligemma::preprocess::RgbImage;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A frame handed to the engine.
#[derive(Clone, Debug)]
pub struct Frame {
    pub info: FrameInfo,
    pub image: Arc<RgbImage>,
    /// When it arrived (for the queue latency).
    pub received: Instant,
}

impl Frame {
    pub fn new(info: FrameInfo, image: RgbImage) -> Frame {
        Frame {
            info,
            image: Arc::new(image),
            received: Instant::now(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct FrameSamplerConfig {
    /// Minimum time between two analysed frames.
    pub min_interval: Duration,
    /// Skip a frame whose mean absolute difference to the last analysed one (on a
    /// 16x16 grey thumbnail, 0..255) is below this.
    pub skip_unchanged_below: Option<f32>,
}

/// The hand-over slot; lives inside the stream's lock.
#[derive(Default)]
pub struct FrameSampler {
    pub config: FrameSamplerConfig,
    pending: Option<Frame>,
    last_taken: Option<Instant>,
    last_thumb: Option<Vec<f32>>,
    /// Frames replaced or skipped since the last result.
    pub dropped: u64,
    pub dropped_total: u64,
    pub seen: u64,
}

impl FrameSampler {
    pub fn new(config: FrameSamplerConfig) -> FrameSampler {
        FrameSampler {
            config,
            ..Default::default()
        }
    }

    /// Offers a frame; a frame still waiting is replaced (and counted as dropped).
    pub fn offer(&mut self, frame: Frame) {
        self.seen += 1;
        if self.pending.replace(frame).is_some() {
            self.drop_one();
        }
    }

    fn drop_one(&mut self) {
        self.dropped += 1;
        self.dropped_total += 1;
    }

    /// How long until a pending frame may be taken (None: nothing pending).
    pub fn wait_time(&self, now: Instant) -> Option<Duration> {
        self.pending.as_ref()?;
        Some(match self.last_taken {
            Some(t) => (t + self.config.min_interval).saturating_duration_since(now),
            None => Duration::ZERO,
        })
    }

    /// Takes the pending frame if its time has come and it changed enough.
    pub fn take(&mut self, now: Instant) -> Option<Frame> {
        if self.wait_time(now)? > Duration::ZERO {
            return None;
        }
        let frame = self.pending.take()?;
        if !self.changed_enough(&frame) {
            self.drop_one();
            return None;
        }
        self.last_taken = Some(now);
        Some(frame)
    }

    /// Whether a frame arriving now should be analysed (for callers that sample
    /// synchronously); marks it taken when it should.
    pub fn sample_now(&mut self, frame: &Frame, now: Instant) -> bool {
        self.seen += 1;
        let interval_ok = self
            .last_taken
            .is_none_or(|t| now.duration_since(t) >= self.config.min_interval);
        if !interval_ok {
            self.drop_one();
            return false;
        }
        if !self.changed_enough(frame) {
            self.drop_one();
            return false;
        }
        self.last_taken = Some(now);
        true
    }

    /// Whether a frame differs enough from the last analysed one (always true
    /// without change detection); remembers it when it does.
    fn changed_enough(&mut self, frame: &Frame) -> bool {
        let Some(threshold) = self.config.skip_unchanged_below else {
            return true;
        };
        let thumb = thumbnail(&frame.image);
        let unchanged = self.last_thumb.as_ref().is_some_and(|last| {
            last.iter()
                .zip(&thumb)
                .map(|(a, b)| (a - b).abs())
                .sum::<f32>()
                / thumb.len() as f32
                <= threshold
        });
        if !unchanged {
            self.last_thumb = Some(thumb);
        }
        !unchanged
    }

    /// Drops the waiting frame (flush, seek).
    pub fn flush(&mut self) {
        if self.pending.take().is_some() {
            self.drop_one();
        }
        self.last_taken = None;
    }

    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }
}

/// A 16x16 grey thumbnail (box-averaged) for change detection.
fn thumbnail(img: &RgbImage) -> Vec<f32> {
    const N: usize = 16;
    let mut out = vec![0f32; N * N];
    let mut counts = vec![0u32; N * N];
    for y in 0..img.height {
        let ty = y * N / img.height;
        for x in 0..img.width {
            let tx = x * N / img.width;
            let p = &img.data[(y * img.width + x) * 3..][..3];
            out[ty * N + tx] += (p[0] as f32 + p[1] as f32 + p[2] as f32) / 3.0;
            counts[ty * N + tx] += 1;
        }
    }
    out.iter_mut()
        .zip(&counts)
        .for_each(|(v, &c)| *v /= c.max(1) as f32);
    out
}

//! A camera's frame source under supervision. A robot's cameras are unplugged, RTSP
//! streams close, publishers on the network stop; the node must ride that out and say so,
//! so that a subscriber can tell "no ball" from "no camera".
//!
//! Every source has a [`SourceState`]: `starting` until its first frame, `streaming`,
//! `stalled` after `stall_after_ms` without a frame (until frames come back),
//! `restarting` (a GStreamer pipeline that ended or posted an error, started again after
//! a capped exponential back-off with jitter) and `failed` (one that could not be started,
//! tried again the same way). Each transition is reported once, through the callback
//! the camera gives (its log and `<camera>/errors`), and status shows the state, since
//! when, the restarts and the last error.
use crate::frames::{BusEvent, FrameSink, GstSource};
use paligemma_stream::message::{SourceState, SourceStatus, unix_time_ns};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A change of state, for the camera to report.
#[derive(Clone, Debug)]
pub struct Transition {
    pub from: SourceState,
    pub to: SourceState,
    pub restarts: u64,
    /// What happened, in words.
    pub detail: String,
}

impl Transition {
    pub fn message(&self) -> String {
        format!(
            "frame source {} -> {}: {}",
            self.from.name(),
            self.to.name(),
            self.detail
        )
    }
}

struct Inner {
    status: SourceStatus,
    last_frame: Option<Instant>,
}

/// A source's state, written by whatever delivers its frames and by its supervisor.
pub struct Health {
    inner: Mutex<Inner>,
    notify: Box<dyn Fn(&Transition) + Send + Sync>,
}

impl Health {
    pub fn new(notify: impl Fn(&Transition) + Send + Sync + 'static) -> Health {
        let status = SourceStatus {
            state: SourceState::Starting,
            since_unix_ns: unix_time_ns(),
            restarts: 0,
            last_error: None,
        };
        Health {
            inner: Mutex::new(Inner {
                status,
                last_frame: None,
            }),
            notify: Box::new(notify),
        }
    }

    /// Moves to `to` (counting a restart when `restart`), and reports the change.
    fn change(
        &self,
        to: SourceState,
        detail: impl FnOnce(&Inner) -> String,
        error: Option<String>,
        restart: bool,
    ) {
        let transition = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let from = inner.status.state;
            inner.status.restarts += u64::from(restart);
            if error.is_some() {
                inner.status.last_error = error;
            }
            if from == to && !restart {
                return;
            }
            let detail = detail(&inner);
            inner.status.state = to;
            inner.status.since_unix_ns = unix_time_ns();
            Transition {
                from,
                to,
                restarts: inner.status.restarts,
                detail,
            }
        };
        (self.notify)(&transition);
    }

    /// A frame arrived: the source is streaming.
    pub fn frame(&self) {
        let now = Instant::now();
        let state = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.last_frame = Some(now);
            inner.status.state
        };
        if state != SourceState::Streaming {
            self.change(
                SourceState::Streaming,
                |i| format!("frames again ({} restarts so far)", i.status.restarts),
                None,
                false,
            );
        }
    }

    /// A streaming source without a frame for `stall_after` is stalled.
    pub fn check_stall(&self, now: Instant, stall_after: Duration) {
        let silent = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            (inner.status.state == SourceState::Streaming)
                .then_some(inner.last_frame)
                .flatten()
                .map(|t| now.duration_since(t))
                .filter(|d| *d >= stall_after)
        };
        if let Some(silent) = silent {
            self.change(
                SourceState::Stalled,
                |_| format!("no frame for {:.1} s", silent.as_secs_f64()),
                None,
                false,
            );
        }
    }

    /// The source ended or failed (`to` is `restarting` or `failed`): it is started
    /// again after `wait`.
    pub fn restart(&self, to: SourceState, why: String, wait: Duration) {
        self.change(
            to,
            |i| {
                format!(
                    "{why}; starting it again in {:.2} s (restart {})",
                    wait.as_secs_f64(),
                    i.status.restarts
                )
            },
            Some(why.clone()),
            true,
        );
    }

    pub fn status(&self) -> SourceStatus {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status
            .clone()
    }
}

/// Capped exponential back-off with ±20% jitter, so that sources that fail together do
/// not retry in step.
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            current: initial,
        }
    }

    /// The next wait: the current one with jitter; the one after is twice as long, up to
    /// the cap.
    pub fn next(&mut self) -> Duration {
        let unit = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as f64
            / u64::MAX as f64;
        let wait = self.current.mul_f64(0.8 + 0.4 * unit);
        self.current = (self.current * 2).min(self.max);
        wait
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// A source that streamed this long before it ended starts again from the first back-off.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Runs a camera's GStreamer pipeline (or `uri`) for as long as the camera runs: started,
/// watched for EOS and errors, and started again after the back-off, for ever.
pub async fn run_gst(
    pipeline: Option<String>,
    uri: Option<String>,
    health: Arc<Health>,
    frames: FrameSink,
    mut backoff: Backoff,
) -> anyhow::Result<()> {
    loop {
        let (events, mut ended) = tokio::sync::mpsc::unbounded_channel();
        let started = Instant::now();
        let (to, why) = match GstSource::start(
            pipeline.as_deref(),
            uri.as_deref(),
            frames.clone(),
            move |e| {
                let _ = events.send(e);
            },
        ) {
            Ok(source) => {
                let event = ended.recv().await;
                source.stop();
                let why = match event {
                    Some(BusEvent::Eos) => "the stream ended (EOS)".to_string(),
                    Some(BusEvent::Error(e)) => e,
                    None => "the pipeline's bus closed".to_string(),
                };
                (SourceState::Restarting, why)
            }
            // The bus's own error says more than the failed state change (which file,
            // which device).
            Err(e) => match ended.try_recv() {
                Ok(BusEvent::Error(bus)) => (SourceState::Failed, format!("{e:#}: {bus}")),
                _ => (SourceState::Failed, format!("{e:#}")),
            },
        };
        if started.elapsed() >= STABLE_AFTER {
            backoff.reset();
        }
        let wait = backoff.next();
        health.restart(to, why, wait);
        tokio::time::sleep(wait).await;
    }
}

/// Marks a camera's source stalled when its frames stop (every kind of source).
pub async fn watch_stalls(health: Arc<Health>, stall_after: Duration) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(
        Duration::from_millis(100)
            .min(stall_after / 4)
            .max(Duration::from_millis(10)),
    );
    loop {
        tick.tick().await;
        health.check_stall(Instant::now(), stall_after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let waits: Vec<f64> = (0..6).map(|_| b.next().as_secs_f64()).collect();
        for (wait, nominal) in waits.iter().zip([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]) {
            assert!((0.8 * nominal..=1.2 * nominal).contains(wait), "{waits:?}");
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(600));
    }

    #[test]
    fn transitions_are_reported_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let health = Health::new(move |t: &Transition| {
            sink.lock().unwrap().push((t.from, t.to, t.restarts))
        });
        health.frame();
        health.frame();
        let t = Instant::now();
        health.check_stall(t, Duration::from_secs(2));
        health.check_stall(t + Duration::from_secs(3), Duration::from_secs(2));
        health.check_stall(t + Duration::from_secs(4), Duration::from_secs(2));
        health.frame();
        health.restart(
            SourceState::Restarting,
            "the stream ended (EOS)".into(),
            Duration::from_millis(500),
        );
        health.restart(
            SourceState::Failed,
            "no such device".into(),
            Duration::from_secs(1),
        );
        health.frame();
        use SourceState::*;
        assert_eq!(
            *seen.lock().unwrap(),
            [
                (Starting, Streaming, 0),
                (Streaming, Stalled, 0),
                (Stalled, Streaming, 0),
                (Streaming, Restarting, 1),
                (Restarting, Failed, 2),
                (Failed, Streaming, 2)
            ]
        );
        let status = health.status();
        assert_eq!(
            (status.state, status.restarts, status.last_error.as_deref()),
            (Streaming, 2, Some("no such device"))
        );
    }
}

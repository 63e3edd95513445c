//! One policy for refused input on every path into a camera (Zenoh frames, ROS 2 images,
//! prompt updates, asks): a peer that floods a camera with bad samples must not fill the
//! robot's disk with log lines or drown `<camera>/errors` for every subscriber.
//!
//! - Every refusal is counted exactly, by kind, for status.
//! - The first refusal of a kind from a source is logged and published in full and opens
//!   a window (`refusal_window_s`); repeats within it are only counted. When it closes,
//!   one line says how many were suppressed, and the next refusal opens a new window.
//!   Refusals for different reasons (messages that differ in more than their numbers:
//!   "cannot decode" against "larger than the limit") are kinds of their own.
//! - At most `errors_per_s` reports go out in any second: a first report or a summary
//!   beyond that waits for the next tick with room (a first one then carries the count
//!   of its repeats meanwhile). So `<camera>/errors` carries a bounded rate whatever
//!   comes in, and the counts of what it carries add up to the refusals.
//! - The work per refusal is a counter, a short message and a map look-up, whatever the
//!   sample claims; at most [`MAX_WINDOWS`] windows are open, so that a peer that varies
//!   its keys or its garbage cannot grow the map.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalKind {
    /// A frame on a camera's Zenoh key (payload or attachment).
    Frame,
    /// An image on a camera's ROS 2 topic.
    Ros2Image,
    /// A put on `<camera>/prompts`.
    PromptUpdate,
    /// An ask beyond the node's ask rate.
    AskRate,
    /// An ask whose payload is not a prompt (empty, too long, not UTF-8, bad JSON).
    Ask,
}

impl RefusalKind {
    const ALL: [RefusalKind; 5] = [
        Self::Frame,
        Self::Ros2Image,
        Self::PromptUpdate,
        Self::AskRate,
        Self::Ask,
    ];

    /// The kind's name in status and on `<camera>/errors`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Frame => "frame",
            Self::Ros2Image => "ros2_image",
            Self::PromptUpdate => "prompt_update",
            Self::AskRate => "ask_rate",
            Self::Ask => "ask",
        }
    }
}

/// Windows open at once; refusals that would open more share one window per kind.
pub const MAX_WINDOWS: usize = 64;
/// The source that refusals beyond [`MAX_WINDOWS`] are counted under.
const OTHER_SOURCES: &str = "other sources";
/// How much of a message tells its reason apart.
const REASON_CHARS: usize = 160;

/// What a window is kept for: a kind of refusal from a source for one reason (the
/// message without its digits, so that sizes and offsets do not make each one new).
type WindowKey = (RefusalKind, String, String);

fn reason(message: &str) -> String {
    message
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(REASON_CHARS)
        .collect()
}

/// A report to log and publish.
#[derive(Debug, PartialEq)]
pub struct Report {
    pub kind: RefusalKind,
    pub message: String,
    /// Refusals this report accounts for; over all reports they add up to the refusals.
    pub refusals: u64,
    /// Those of them that were not reported one by one: 0 for a first report, all of
    /// them for a window's summary.
    pub suppressed: u64,
}

struct Window {
    opened: Instant,
    /// Refusals counted, not reported.
    suppressed: u64,
    /// The first refusal's message while the error rate holds it back (it is then one
    /// of the suppressed, and goes out with their count as soon as the rate allows).
    unreported: Option<String>,
}

struct State {
    windows: HashMap<WindowKey, Window>,
    /// When the reports of the last second went out.
    sent: VecDeque<Instant>,
}

/// A camera's refusals: exact counts, the open windows, the reports of the last second.
pub struct Refusals {
    window: Duration,
    errors_per_s: usize,
    counts: [AtomicU64; RefusalKind::ALL.len()],
    state: Mutex<State>,
}

impl State {
    /// Takes one of the second's reports, if any is left.
    fn may_send(&mut self, now: Instant, per_s: usize) -> bool {
        while self
            .sent
            .front()
            .is_some_and(|&t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.sent.pop_front();
        }
        let free = self.sent.len() < per_s;
        if free {
            self.sent.push_back(now);
        }
        free
    }
}

impl Refusals {
    pub fn new(window: Duration, errors_per_s: usize) -> Refusals {
        let state = State {
            windows: HashMap::new(),
            sent: VecDeque::new(),
        };
        Refusals {
            window,
            errors_per_s: errors_per_s.max(1),
            counts: Default::default(),
            state: Mutex::new(state),
        }
    }

    /// Counts a refusal of `kind` from `source` (a key expression, a topic); returns the
    /// report to log and publish when it is the first of its window and the second has a
    /// report left, else nothing (it is counted in its window).
    pub fn refuse(
        &self,
        kind: RefusalKind,
        source: &str,
        now: Instant,
        message: String,
    ) -> Option<Report> {
        self.counts[kind as usize].fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut key = (kind, source.to_string(), reason(&message));
        if !state.windows.contains_key(&key) && state.windows.len() >= MAX_WINDOWS {
            key = (kind, OTHER_SOURCES.to_string(), String::new());
        }
        if let Some(open) = state.windows.get_mut(&key) {
            open.suppressed += 1;
            return None;
        }
        let message = format!("{message} ({})", key.1);
        if state.may_send(now, self.errors_per_s) {
            state.windows.insert(
                key,
                Window {
                    opened: now,
                    suppressed: 0,
                    unreported: None,
                },
            );
            Some(Report {
                kind,
                message,
                refusals: 1,
                suppressed: 0,
            })
        } else {
            state.windows.insert(
                key,
                Window {
                    opened: now,
                    suppressed: 1,
                    unreported: Some(message),
                },
            );
            None
        }
    }

    /// The reports that are due: a first report the error rate held back (as soon as
    /// the second has room, with the count since), and a summary of each window at least
    /// a window old that counted repeats; a window that counted none closes silently.
    /// What the second has no room for waits for the next call.
    pub fn due(&self, now: Instant) -> Vec<Report> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let closing = |w: &Window| now.duration_since(w.opened) >= self.window;
        let mut due: Vec<_> = state
            .windows
            .iter()
            .filter(|(_, w)| w.unreported.is_some() || closing(w))
            .map(|(k, w)| (k.clone(), w.opened))
            .collect();
        due.sort_by_key(|(_, opened)| *opened);
        let mut reports = Vec::new();
        for (key, opened) in due {
            let (n, close) = (
                state.windows[&key].suppressed,
                closing(&state.windows[&key]),
            );
            if n > 0 && !state.may_send(now, self.errors_per_s) {
                break;
            }
            let Some(window) = state.windows.get_mut(&key) else {
                continue;
            };
            let first = window.unreported.take();
            window.suppressed = 0;
            if close {
                state.windows.remove(&key);
            }
            let (kind, source, secs) = (key.0, &key.1, now.duration_since(opened).as_secs_f64());
            let plural = |n: u64| if n == 1 { "" } else { "s" };
            reports.push(match first {
                Some(first) if n == 1 => Report { kind, message: first, refusals: 1, suppressed: 0 },
                Some(first) => Report {
                    kind,
                    message: format!("{first}; and {} more like it from {source} in the last {secs:.0} s", n - 1),
                    refusals: n,
                    suppressed: n - 1,
                },
                None if n > 0 => Report {
                    kind,
                    message: format!("... and {n} more {} refusal{} like it from {source} in the last {secs:.0} s", kind.name(), plural(n)),
                    refusals: n,
                    suppressed: n,
                },
                None => continue,
            });
        }
        reports
    }

    /// Every refusal so far, by kind (kinds never refused are left out).
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        RefusalKind::ALL
            .iter()
            .map(|&k| (k.name(), self.counts[k as usize].load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refuse_n(
        r: &Refusals,
        kind: RefusalKind,
        source: &str,
        n: usize,
        at: Instant,
    ) -> Vec<Report> {
        (0..n)
            .filter_map(|i| r.refuse(kind, source, at, format!("bad {i}")))
            .collect()
    }

    fn accounted(reports: &[Report]) -> u64 {
        reports.iter().map(|r| r.refusals).sum()
    }

    #[test]
    fn first_in_full_then_one_summary_per_window() {
        let t0 = Instant::now();
        let r = Refusals::new(Duration::from_secs(10), 5);
        let first = refuse_n(&r, RefusalKind::Frame, "cam/frames", 100_000, t0);
        assert_eq!(
            first,
            vec![Report {
                kind: RefusalKind::Frame,
                message: "bad 0 (cam/frames)".into(),
                refusals: 1,
                suppressed: 0
            }]
        );
        assert!(
            r.due(t0 + Duration::from_secs(9)).is_empty(),
            "the window is still open"
        );
        let summary = r.due(t0 + Duration::from_secs(10));
        assert_eq!(summary.len(), 1);
        assert_eq!(
            (summary[0].refusals, summary[0].suppressed),
            (99_999, 99_999)
        );
        assert!(
            summary[0]
                .message
                .contains("and 99999 more frame refusals like it from cam/frames in the last 10 s"),
            "{}",
            summary[0].message
        );
        assert_eq!(r.counts()["frame"], 100_000);
        // The next refusal opens a new window and is reported in full again.
        assert_eq!(
            refuse_n(
                &r,
                RefusalKind::Frame,
                "cam/frames",
                1,
                t0 + Duration::from_secs(11)
            )
            .len(),
            1
        );
        // A window without repeats closes silently.
        assert!(r.due(t0 + Duration::from_secs(30)).is_empty());
    }

    #[test]
    fn kinds_and_sources_have_windows_of_their_own() {
        let t0 = Instant::now();
        let r = Refusals::new(Duration::from_secs(1), 100);
        assert_eq!(refuse_n(&r, RefusalKind::Frame, "a", 3, t0).len(), 1);
        assert_eq!(refuse_n(&r, RefusalKind::Frame, "b", 3, t0).len(), 1);
        assert_eq!(refuse_n(&r, RefusalKind::PromptUpdate, "a", 3, t0).len(), 1);
        assert_eq!(
            r.due(t0 + Duration::from_secs(1))
                .iter()
                .map(|s| s.refusals)
                .sum::<u64>(),
            6
        );
        assert_eq!(
            r.counts(),
            BTreeMap::from([("frame", 6), ("prompt_update", 3)])
        );
    }

    #[test]
    fn other_reasons_are_reported_apart() {
        let t0 = Instant::now();
        let r = Refusals::new(Duration::from_secs(10), 5);
        let mut reported = Vec::new();
        for message in [
            "cannot decode: 12 bytes",
            "cannot decode: 13 bytes",
            "2000x1000 is larger than the limit",
            "cannot decode: 9 bytes",
        ] {
            reported.extend(
                r.refuse(RefusalKind::Frame, "cam/frames", t0, message.to_string())
                    .map(|r| r.message),
            );
        }
        assert_eq!(
            reported,
            [
                "cannot decode: 12 bytes (cam/frames)",
                "2000x1000 is larger than the limit (cam/frames)"
            ]
        );
        let summary = r.due(t0 + Duration::from_secs(10));
        assert_eq!(summary.iter().map(|s| s.refusals).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn a_first_report_held_back_by_the_rate_goes_out_at_the_next_room() {
        let t0 = Instant::now();
        let r = Refusals::new(Duration::from_secs(10), 2);
        assert_eq!(
            r.refuse(RefusalKind::Ask, "a", t0, "one".into())
                .map(|r| r.refusals),
            Some(1)
        );
        assert_eq!(
            r.refuse(RefusalKind::Ask, "b", t0, "two".into())
                .map(|r| r.refusals),
            Some(1)
        );
        assert!(
            r.refuse(RefusalKind::Ask, "c", t0, "three".into())
                .is_none(),
            "over 2 a second"
        );
        assert!(
            r.refuse(RefusalKind::Ask, "c", t0, "three".into())
                .is_none()
        );
        assert!(
            r.due(t0 + Duration::from_millis(500)).is_empty(),
            "the second is still full"
        );
        let held = r.due(t0 + Duration::from_secs(1));
        assert_eq!(
            held,
            [Report {
                kind: RefusalKind::Ask,
                message: "three (c); and 1 more like it from c in the last 1 s".into(),
                refusals: 2,
                suppressed: 1
            }]
        );
        // Its window stays open: a repeat is summed up when it closes.
        assert!(
            r.refuse(
                RefusalKind::Ask,
                "c",
                t0 + Duration::from_secs(2),
                "three".into()
            )
            .is_none()
        );
        let closed = r.due(t0 + Duration::from_secs(10));
        assert_eq!(
            closed
                .iter()
                .map(|r| (r.refusals, r.suppressed))
                .collect::<Vec<_>>(),
            [(1, 1)]
        );
        assert_eq!(r.counts()["ask"], 5);
    }

    #[test]
    fn at_most_the_rate_per_second_and_the_counts_add_up() {
        let t0 = Instant::now();
        let r = Refusals::new(Duration::from_secs(1), 5);
        let mut reports = Vec::new();
        let mut sent_at = Vec::new();
        // 200 sources (past the tracked ones) each refusing 10 times, over 3 s, with the
        // windows closed every 100 ms.
        for step in 0..30u32 {
            let now = t0 + Duration::from_millis(100) * step;
            for source in 0..200 {
                let got = refuse_n(
                    &r,
                    RefusalKind::Ros2Image,
                    &format!("topic{source}"),
                    10,
                    now,
                );
                sent_at.extend(got.iter().map(|_| now));
                reports.extend(got);
            }
            let closed = r.due(now);
            sent_at.extend(closed.iter().map(|_| now));
            reports.extend(closed);
        }
        // Whatever is still open drains at the rate.
        for step in 30..400u32 {
            let now = t0 + Duration::from_millis(100) * step;
            let closed = r.due(now);
            sent_at.extend(closed.iter().map(|_| now));
            reports.extend(closed);
        }
        for (i, &t) in sent_at.iter().enumerate() {
            let in_second = sent_at[i..]
                .iter()
                .take_while(|&&u| u.duration_since(t) < Duration::from_secs(1))
                .count();
            assert!(
                in_second <= 5,
                "{in_second} reports within a second of report {i}"
            );
        }
        assert_eq!(r.counts()["ros2_image"], 200 * 10 * 30);
        assert_eq!(
            accounted(&reports),
            200 * 10 * 30,
            "{} reports",
            reports.len()
        );
        assert!(r.state.lock().unwrap().windows.len() <= MAX_WINDOWS + 1);
    }
}

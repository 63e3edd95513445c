//! The CPU threads of a multi-lane engine, handed out turn by turn.
//!
//! Why: lanes with a fixed share each (two lanes of one thread on two cores) leave a
//! camera that is served alone with half the machine. Instead every lane's model has
//! a pool as big as the engine's threads and, before each turn of work, takes as many
//! as are free, up to its share among the lanes that have work: `threads / busy`, and
//! one more for the first `threads % busy` takers, so that the shares add up to the
//! threads (larger shares could leave a lane waiting while the others take turns).
//! A lane alone takes them all; two busy lanes split them. The threads in use never
//! exceed the engine's, so the lanes never oversubscribe the cores: ggml's workers
//! spin at every graph node, and a worker without a core of its own holds up its pool.
//! A lane that becomes busy while another holds every thread waits for the end of that
//! one's turn (one decode step, or an admission's vision pass and prefill).
use ggml::Device;
use std::sync::{Condvar, Mutex, MutexGuard};

/// The lanes an engine runs when `lanes` are asked of a model on `device` with
/// `threads` CPU threads: lanes are for the CPU, at most one per thread.
pub fn usable_lanes(device: Device, threads: usize, lanes: usize) -> usize {
    if device.is_cpu() {
        lanes.clamp(1, threads.max(1))
    } else {
        1
    }
}

pub(crate) struct ThreadShare {
    total: usize,
    state: Mutex<ShareState>,
    freed: Condvar,
}

struct ShareState {
    free: usize,
    /// Lanes with jobs open (taking threads now or between two turns).
    busy: usize,
    /// Turns holding one thread more than the even share.
    extra: usize,
}

/// Threads taken for one turn; given back when dropped (also when the turn panics).
pub(crate) struct Taken<'a> {
    share: &'a ThreadShare,
    pub threads: usize,
    extra: bool,
}

impl ThreadShare {
    pub fn new(total: usize) -> ThreadShare {
        let total = total.max(1);
        ThreadShare {
            total,
            state: Mutex::new(ShareState {
                free: total,
                busy: 0,
                extra: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ShareState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A lane now has jobs open (`true`) or none left (`false`).
    pub fn set_busy(&self, busy: bool) {
        let mut s = self.lock();
        if busy {
            s.busy += 1;
        } else {
            s.busy = s.busy.saturating_sub(1);
        }
    }

    /// Threads for one turn of a busy lane: its share, or as many as are free when
    /// fewer, waiting while none is.
    pub fn take(&self) -> Taken<'_> {
        let mut s = self.lock();
        while s.free == 0 {
            s = self.freed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let busy = s.busy.max(1);
        let extra = s.extra < self.total % busy;
        let threads = s.free.min(self.total / busy + usize::from(extra)).max(1);
        s.free -= threads;
        s.extra += usize::from(extra);
        Taken {
            share: self,
            threads,
            extra,
        }
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        let mut s = self.share.lock();
        s.free += self.threads;
        s.extra -= usize::from(self.extra);
        drop(s);
        self.share.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_alone_takes_all_and_busy_lanes_split() {
        let share = ThreadShare::new(4);
        share.set_busy(true);
        assert_eq!(share.take().threads, 4, "alone");
        share.set_busy(true);
        let a = share.take();
        let b = share.take();
        assert_eq!((a.threads, b.threads), (2, 2));
        drop((a, b));
        share.set_busy(false);
        assert_eq!(share.take().threads, 4, "the other lane is done");
    }

    #[test]
    fn the_shares_add_up_to_the_threads() {
        // Four threads, three busy lanes: two, one and one, so that none waits while
        // the others take turns.
        let share = ThreadShare::new(4);
        (0..3).for_each(|_| share.set_busy(true));
        let taken: Vec<_> = (0..3).map(|_| share.take()).collect();
        assert_eq!(
            taken.iter().map(|t| t.threads).collect::<Vec<_>>(),
            [2, 1, 1]
        );
        drop(taken);
        let s = share.lock();
        assert_eq!((s.free, s.extra), (4, 0));
    }

    #[test]
    fn threads_in_use_never_exceed_the_total() {
        // Three threads, two lanes: the first takes two, the second the one left.
        let share = ThreadShare::new(3);
        share.set_busy(true);
        share.set_busy(true);
        let a = share.take();
        let b = share.take();
        assert_eq!((a.threads, b.threads), (2, 1));
        // A lane that comes while all are taken waits for some to be given back.
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| share.take().threads);
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiter.is_finished(), "took a thread while none was free");
            drop(b);
            assert_eq!(waiter.join().unwrap(), 1);
        });
        drop(a);
        assert_eq!(share.lock().free, 3);
    }
}

//! How many requests the engine works on at once, and how many may wait for it.
//! Beyond both a request is refused at once (429 with `Retry-After`) rather than kept
//! waiting for a timeout: a client told "busy" can back off or go elsewhere.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Admission {
    slots: Arc<Semaphore>,
    parallel: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// A place in the engine, held until the answer is done.
pub struct Ticket {
    _place: OwnedSemaphorePermit,
}

/// Counts a waiting request for as long as it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(parallel: usize, max_waiting: usize) -> Admission {
        Admission {
            slots: Arc::new(Semaphore::new(parallel)),
            parallel,
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// A ticket now, or after waiting in the queue; none when the queue is full.
    pub async fn enter(&self) -> Option<Ticket> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Some(Ticket { _place: permit });
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        let _waiting = Waiting(&self.waiting);
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        Some(Ticket { _place: permit })
    }

    /// Requests being answered now.
    pub fn running(&self) -> usize {
        self.parallel - self.slots.available_permits()
    }

    /// Requests waiting for a place.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn limits(&self) -> (usize, usize) {
        (self.parallel, self.max_waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn beyond_the_queue_is_refused_and_a_freed_place_is_taken() {
        let admission = Arc::new(Admission::new(2, 1));
        let a = admission.enter().await.unwrap();
        let _b = admission.enter().await.unwrap();
        assert_eq!(admission.running(), 2);
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.enter().await.is_some() })
        };
        while admission.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(admission.enter().await.is_none(), "the queue is full");
        drop(a);
        assert!(waiter.await.unwrap(), "the waiter got the freed place");
        assert_eq!(admission.waiting(), 0);
    }
}

//! A token bucket: at most `rate` events per second on average and `burst` at once.
//! The node's asks go through one, so that no peer can keep the robot's cores busy
//! with questions.
use std::sync::Mutex;
use std::time::Instant;

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            rate: rate.max(0.0),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimiter;

    #[test]
    fn bursts_then_the_rate() {
        let limiter = RateLimiter::new(20.0, 5);
        assert_eq!(
            (0..50).filter(|_| limiter.try_take()).count(),
            5,
            "the burst, then nothing at once"
        );
        std::thread::sleep(std::time::Duration::from_millis(260));
        let refilled = (0..50).filter(|_| limiter.try_take()).count();
        assert!(
            (4..=5).contains(&refilled),
            "about 20/s x 0.26 s, at most the burst: {refilled}"
        );
        let never_refills = RateLimiter::new(0.0, 1);
        assert!(never_refills.try_take() && !never_refills.try_take());
    }
}

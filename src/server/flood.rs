//! Flood control: a token bucket per client.
//!
//! A client over its rate is slowed, not punished: its connection thread waits before it
//! reads on, so TCP pushes back on the sender. Nothing it sent is dropped or reordered, it
//! is never disconnected for it, and the other clients only ever see its allowed rate.

use std::time::{Duration, Instant};

/// `rate` tokens a second, at most `burst` saved up; one token per message.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    /// Tokens in hand; negative while the client owes the wait it is serving.
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket, or `None` when `rate` is 0 (flood control off).
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Option<Self> {
        (rate > 0).then(|| Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        })
    }

    /// Take a token for one message; returns how long to wait before handling it (zero
    /// while the client keeps within its rate).
    pub(crate) fn take(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst) - 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let start = Instant::now();
        let mut bucket = Bucket::new(10, 3, start).expect("on");
        for _ in 0..3 {
            assert_eq!(bucket.take(start), Duration::ZERO, "within the burst");
        }
        let wait = bucket.take(start);
        assert!(
            wait > ms(99) && wait <= ms(100),
            "one token's time: {wait:?}"
        );
        // Having waited, the next message owes another tenth of a second.
        let wait = bucket.take(start + ms(100));
        assert!(wait > ms(99) && wait <= ms(100), "{wait:?}");
    }

    #[test]
    fn an_idle_client_saves_up_no_more_than_the_burst() {
        let start = Instant::now();
        let mut bucket = Bucket::new(100, 5, start).expect("on");
        let later = start + Duration::from_secs(3600);
        let free = (0..20).take_while(|_| bucket.take(later).is_zero()).count();
        assert_eq!(free, 5);
    }

    #[test]
    fn waits_add_up_to_the_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::new(50, 1, start).expect("on");
        let mut now = start;
        for _ in 0..101 {
            now += bucket.take(now);
        }
        let total = now - start;
        assert!(
            total.abs_diff(Duration::from_secs(2)) < ms(1),
            "100 messages past the burst take 2 s: {total:?}"
        );
    }

    #[test]
    fn rate_zero_is_off() {
        assert!(Bucket::new(0, 50, Instant::now()).is_none());
    }
}

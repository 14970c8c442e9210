//! Flood control: a token bucket per client.
//!
//! A client over its rate is slowed, not punished: its connection thread waits before it
//! reads on, so TCP pushes back on the sender. Nothing it sent is dropped or reordered, it
//! is never disconnected for it, and the other clients only ever see its allowed rate.
//!
//! Messages cost a token each, and continuation frames a fraction of one
//! ([`FRAMES_PER_TOKEN`]): a message sent as thousands of one-byte fragments, or fragments
//! that never end, costs the server a frame's work each, though tungstenite hands over
//! only whole messages. [`FrameCounter`] finds those frames in the bytes as they are read.
//! A message's first frame, and every control frame, is paid for as a message.

use std::time::{Duration, Instant};

/// Continuation frames that cost as much as a message. Clients send a message as one
/// frame, or a few; only a flood of fragments comes near this.
pub(crate) const FRAMES_PER_TOKEN: u64 = 8;

/// Counts the continuation frames that begin in a stream of client bytes, without keeping
/// them: the same bytes tungstenite reads, fed in the same order.
#[derive(Debug, Default)]
pub(crate) struct FrameCounter {
    /// The header being read, while it is incomplete.
    header: [u8; 14],
    have: usize,
    /// Bytes of the current frame's payload still to come.
    skip: u64,
}

impl FrameCounter {
    /// Feed `bytes`; returns how many continuation frames began in them.
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut began = 0;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.header[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if let Some(payload) = payload_len(&self.header[..self.have]) {
                began += u64::from(self.header[0] & 0x0f == 0);
                self.skip = payload;
                self.have = 0;
            }
        }
        began
    }
}

/// The payload length of a frame whose header is `header`, once all of it is there.
fn payload_len(header: &[u8]) -> Option<u64> {
    let second = *header.get(1)?;
    let masked = second & 0x80 != 0;
    let (extended, len7) = match second & 0x7f {
        126 => (2, None),
        127 => (8, None),
        len => (0, Some(u64::from(len))),
    };
    let total = 2 + extended + if masked { 4 } else { 0 };
    if header.len() < total {
        return None;
    }
    Some(len7.unwrap_or_else(|| {
        header[2..2 + extended]
            .iter()
            .fold(0, |len, &byte| (len << 8) | u64::from(byte))
    }))
}

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
    fn continuation_frames_are_counted_however_the_bytes_are_cut() {
        // A text frame of 3 bytes begins a message; continuations of 300 (16-bit length),
        // 0 (unmasked, as a stray frame would be) and 70 000 (64-bit length) follow, with a
        // ping between them.
        let mut stream = vec![0x01, 0x83, 1, 2, 3, 4, b'a', b'b', b'c'];
        stream.extend([0x00, 0xfe, 0x01, 0x2c, 1, 2, 3, 4]);
        stream.extend([b'x'; 300]);
        stream.extend([0x89, 0x80, 1, 2, 3, 4]);
        stream.extend([0x00, 0x00]);
        stream.extend([0x80, 0xff, 0, 0, 0, 0, 0, 1, 0x11, 0x70, 1, 2, 3, 4]);
        stream.extend(vec![b'y'; 70_000]);
        for cut in [1, 2, 5, 13, 4096, stream.len()] {
            let mut counter = FrameCounter::default();
            let frames: u64 = stream.chunks(cut).map(|chunk| counter.feed(chunk)).sum();
            assert_eq!(frames, 3, "in chunks of {cut}");
            assert_eq!((counter.have, counter.skip), (0, 0), "between frames");
        }
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

//! The ring of recent messages: every broadcast some client still lacks, and at least the
//! last `history` ones, each numbered by its place in the one global order.
//!
//! The dispatcher keeps a cursor per client (the number of the next broadcast it needs) and
//! asks the ring for what lies between that cursor and the head. Keeping the numbering and
//! the trimming here, apart from any socket, is what lets the dispatcher's bookkeeping be
//! tested on its own.

use crate::message::Frame;

/// Broadcasts in order, from number `base` to `head() - 1`.
#[derive(Debug)]
pub(crate) struct Ring {
    frames: Vec<Frame>,
    /// The number of `frames[0]`.
    base: u64,
    /// How many of the newest frames are kept for joiners even when every client has them.
    history: usize,
}

impl Ring {
    pub(crate) fn new(history: usize) -> Self {
        Self {
            frames: Vec::new(),
            base: 0,
            history,
        }
    }

    /// The number the next broadcast will get.
    pub(crate) fn head(&self) -> u64 {
        self.base + self.frames.len() as u64
    }

    /// How many frames the ring holds now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }

    pub(crate) fn push(&mut self, frame: Frame) {
        self.frames.push(frame);
    }

    /// Start over from `frames`, numbered from the head on, as the history: what the ring
    /// held is dropped, so every client must have it already.
    pub(crate) fn restart(&mut self, frames: Vec<Frame>) {
        self.base = self.head();
        self.frames = frames;
    }

    /// The last `history` broadcasts (fewer if there have not been that many), oldest first:
    /// what a joiner is shown.
    pub(crate) fn recent(&self) -> &[Frame] {
        &self.frames[self.frames.len().saturating_sub(self.history)..]
    }

    /// Up to `max` broadcasts starting at number `from`, which must not be older than what
    /// the ring holds; empty when `from` is the head.
    pub(crate) fn since(&self, from: u64, max: usize) -> &[Frame] {
        let start = usize::try_from(from.saturating_sub(self.base))
            .unwrap_or(usize::MAX)
            .min(self.frames.len());
        let end = self.frames.len().min(start.saturating_add(max));
        &self.frames[start..end]
    }

    /// Forget broadcasts older than `oldest_needed`, the smallest cursor of any client,
    /// keeping the last `history` whatever it is.
    pub(crate) fn trim(&mut self, oldest_needed: u64) {
        let unneeded = usize::try_from(oldest_needed.saturating_sub(self.base)).unwrap_or(0);
        let drop = unneeded.min(self.frames.len().saturating_sub(self.history));
        if drop > 0 {
            self.frames.drain(..drop);
            self.base += drop as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::Bytes;

    fn ring_of(history: usize, count: u8) -> Ring {
        let mut ring = Ring::new(history);
        for i in 0..count {
            ring.push(Bytes::from(vec![i]));
        }
        ring
    }

    #[test]
    fn since_reads_from_a_cursor_up_to_the_head() {
        let ring = ring_of(2, 5);
        assert_eq!(ring.head(), 5);
        assert_eq!(
            ring.since(3, 10),
            &[Bytes::from(vec![3]), Bytes::from(vec![4])]
        );
        assert_eq!(ring.since(1, 1), &[Bytes::from(vec![1])]);
        assert!(ring.since(5, 10).is_empty());
    }

    #[test]
    fn trim_keeps_what_a_client_lacks_and_the_history() {
        let mut ring = ring_of(2, 10);
        ring.trim(4);
        assert_eq!(
            (ring.len(), ring.head()),
            (6, 10),
            "clients still lack 4..10"
        );
        assert_eq!(ring.since(4, 1), &[Bytes::from(vec![4])]);
        ring.trim(10);
        assert_eq!(ring.len(), 2, "only the history is left");
        assert_eq!(ring.recent(), &[Bytes::from(vec![8]), Bytes::from(vec![9])]);
    }

    #[test]
    fn restart_replaces_the_history_and_numbers_on() {
        let mut ring = ring_of(3, 5);
        ring.restart(vec![Bytes::from(vec![40]), Bytes::from(vec![41])]);
        assert_eq!(ring.head(), 7);
        assert_eq!(
            ring.recent(),
            &[Bytes::from(vec![40]), Bytes::from(vec![41])]
        );
        assert!(ring.since(7, 10).is_empty());
    }

    #[test]
    fn recent_is_short_before_history_fills() {
        let ring = ring_of(16, 3);
        assert_eq!(ring.recent().len(), 3);
        assert!(ring_of(0, 3).recent().is_empty());
    }
}

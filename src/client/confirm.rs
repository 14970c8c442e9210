//! Confirmed delivery: which of the lines we sent have come back from the server.
//!
//! The server broadcasts every message to its sender too, as `ADDR: text`. So a line is
//! known to be broadcast once it comes back, and in order: the oldest unconfirmed line is
//! the next one we expect. Our `ADDR` is the address the server sees, which behind NAT or a
//! proxy is not our socket's own; it is learned, as the chat page learns it, from the first
//! of our lines to come back, and from then on only messages with that tag count.

use std::collections::VecDeque;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

/// Lines sent and not yet seen again, shared by the thread that sends and the one that
/// reads.
#[derive(Debug)]
pub(crate) struct Confirm {
    state: Mutex<State>,
    /// Rings when a line is confirmed, for the session waiting at the end of input.
    bell: Sender<()>,
    changed: Receiver<()>,
}

#[derive(Debug)]
struct State {
    pending: VecDeque<String>,
    /// Our tag as the server writes it (`127.0.0.1:53412: `), once known.
    tag: Option<String>,
    /// What our tag would be if the server sees our socket's own address.
    guess: String,
}

impl Confirm {
    pub(crate) fn new() -> Self {
        let (bell, changed) = crossbeam_channel::bounded(1);
        Self {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                tag: None,
                guess: String::new(),
            }),
            bell,
            changed,
        }
    }

    /// Ready when a line has been confirmed since it was last read.
    pub(crate) fn changed(&self) -> &Receiver<()> {
        &self.changed
    }

    fn confirmed(&self, state: &mut State) {
        state.pending.pop_front();
        let _ = self.bell.try_send(());
    }

    /// A new connection, where `guess` is our tag if the server sees our socket's own
    /// address: nothing sent before it can come back any more.
    pub(crate) fn reset(&self, guess: String) {
        let mut state = self.state.lock();
        state.pending.clear();
        state.tag = None;
        state.guess = guess;
    }

    pub(crate) fn sent(&self, line: &str) {
        self.state.lock().pending.push_back(line.to_string());
    }

    /// Look at a message from the server; returns whether it is one of ours.
    pub(crate) fn observe(&self, message: &str) -> bool {
        let mut state = self.state.lock();
        if let Some(tag) = &state.tag {
            let Some(text) = message.strip_prefix(tag.as_str()) else {
                return false;
            };
            if state.pending.front().is_some_and(|next| next == text) {
                self.confirmed(&mut state);
            }
            return true;
        }
        let Some(next) = state.pending.front() else {
            return message.starts_with(state.guess.as_str());
        };
        let guessed = message.starts_with(state.guess.as_str());
        let Some(tag_len) = message.len().checked_sub(next.len()) else {
            return guessed;
        };
        let (tag, text) = message.split_at_checked(tag_len).unwrap_or(("", ""));
        if text != next || !tag.ends_with(": ") || tag.len() < 3 {
            return guessed;
        }
        // Ours if it carries the tag we guessed, or if it is the first line that could be
        // ours: the same text from someone else at the same moment is the only way to be
        // wrong, and then only the mark, never the count, is off by one.
        state.tag = Some(tag.to_string());
        self.confirmed(&mut state);
        true
    }

    /// How many lines have not come back yet.
    pub(crate) fn unconfirmed(&self) -> usize {
        self.state.lock().pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirm(guess: &str) -> Confirm {
        let confirm = Confirm::new();
        confirm.reset(guess.to_string());
        confirm
    }

    #[test]
    fn lines_come_back_in_order_and_only_ours_count() {
        let confirm = confirm("10.0.0.1:5: ");
        confirm.sent("one");
        confirm.sent("two");
        assert!(
            !confirm.observe("10.0.0.2:7: two"),
            "another's same text, out of order"
        );
        assert!(confirm.observe("10.0.0.1:5: one"));
        assert!(
            !confirm.observe("10.0.0.2:7: two"),
            "someone else's, once our tag is known"
        );
        assert_eq!(confirm.unconfirmed(), 1);
        assert!(confirm.observe("10.0.0.1:5: two"));
        assert_eq!(confirm.unconfirmed(), 0);
    }

    #[test]
    fn our_tag_is_learned_when_the_server_sees_another_address() {
        let confirm = confirm("192.168.1.2:5000: ");
        confirm.sent("hello: world");
        assert!(confirm.observe("[2001:db8::1]:61000: hello: world"));
        confirm.sent("again");
        assert!(confirm.observe("[2001:db8::1]:61000: again"));
        assert_eq!(confirm.unconfirmed(), 0);
    }

    #[test]
    fn a_confirmation_rings_and_a_new_connection_forgets() {
        let confirm = confirm("a:1: ");
        confirm.sent("x");
        assert!(confirm.changed().try_recv().is_err());
        confirm.observe("a:1: x");
        assert!(confirm.changed().try_recv().is_ok(), "rang");
        confirm.sent("y");
        confirm.reset("b:2: ".into());
        assert_eq!(confirm.unconfirmed(), 0, "lost with the connection");
        assert!(
            confirm.observe("b:2: anything"),
            "the new guess marks our own"
        );
    }
}

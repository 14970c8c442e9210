//! Confirmed delivery: which of the lines we sent have come back from the server.
//!
//! The server broadcasts every message to its sender too, as `ADDR: text`. So a line is
//! known to be broadcast once it comes back, and in order: the oldest unconfirmed line is
//! the next one we expect.
//!
//! Which messages are ours: those tagged with our socket's own address (or its IPv4-mapped
//! IPv6 form, as a dual-stack server writes it), certainly, since no other connection has
//! that address and port. Only when the server sees us under another address (behind NAT
//! or a proxy) is our tag learned instead, from the first message that carries our next
//! line under an address that is not our own host's: a message from our own host but
//! another port is another connection, an earlier run of the same script in the replayed
//! history, say, and never us. Behind NAT, an identical line in the history can still be
//! taken for ours; the README says so.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::message::sender_tag;

/// Lines sent and not yet seen again, shared by the thread that sends and the one that
/// reads.
#[derive(Debug)]
pub(crate) struct Confirm {
    state: Mutex<State>,
    /// Rings when a line is confirmed, for the session waiting at the end of input.
    bell: Sender<()>,
    changed: Receiver<()>,
}

#[derive(Debug, Default)]
struct State {
    pending: VecDeque<String>,
    /// Our socket's address as the server could write it: plain, and IPv4-mapped.
    own: Vec<String>,
    /// Our host's address, whose other ports are never us.
    host: Option<IpAddr>,
    /// The tag learned when the server sees us under another address.
    learned: Option<String>,
    /// A message with our own address came: the server sees us as we are, so nothing
    /// is to be learned.
    own_seen: bool,
}

impl Confirm {
    pub(crate) fn new() -> Self {
        let (bell, changed) = crossbeam_channel::bounded(1);
        Self {
            state: Mutex::new(State::default()),
            bell,
            changed,
        }
    }

    /// Ready when a line has been confirmed since it was last read.
    pub(crate) fn changed(&self) -> &Receiver<()> {
        &self.changed
    }

    /// A new connection from `local`: nothing sent before it can come back any more.
    pub(crate) fn reset(&self, local: SocketAddr) {
        let mut own = vec![sender_tag(local)];
        if let IpAddr::V4(v4) = local.ip() {
            own.push(sender_tag(SocketAddr::new(
                IpAddr::V6(v4.to_ipv6_mapped()),
                local.port(),
            )));
        }
        *self.state.lock() = State {
            pending: VecDeque::new(),
            own,
            host: Some(local.ip()),
            learned: None,
            own_seen: false,
        };
    }

    pub(crate) fn sent(&self, line: &str) {
        self.state.lock().pending.push_back(line.to_string());
    }

    /// Look at a message from the server; returns whether it is one of ours.
    pub(crate) fn observe(&self, message: &str) -> bool {
        let mut state = self.state.lock();
        let Some((tag, text)) = split_tag(message) else {
            return false;
        };
        let own = state.own.iter().any(|own| own == tag);
        if own && !state.own_seen {
            state.own_seen = true;
            state.learned = None;
        }
        let ours = own
            || state.learned.as_deref() == Some(tag)
            || !state.own_seen
                && state.learned.is_none()
                && state.pending.front().is_some_and(|next| next == text)
                && state.may_be_us(tag);
        if !ours {
            return false;
        }
        if !own {
            state.learned = Some(tag.to_string());
        }
        if state.pending.front().is_some_and(|next| next == text) {
            state.pending.pop_front();
            let _ = self.bell.try_send(());
        }
        true
    }

    /// How many lines have not come back yet.
    pub(crate) fn unconfirmed(&self) -> usize {
        self.state.lock().pending.len()
    }
}

impl State {
    /// Whether a message tagged `tag` could be ours although the tag is not our own
    /// address: not from our own host (another port there is another connection).
    fn may_be_us(&self, tag: &str) -> bool {
        let Some(addr) = tag
            .strip_suffix(": ")
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            return false;
        };
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            ip => ip,
        };
        Some(ip) != self.host
    }
}

/// `"ADDR: text"` split after the tag, when ADDR is an address as the server writes it.
fn split_tag(message: &str) -> Option<(&str, &str)> {
    let end = if message.starts_with('[') {
        message.find("]:")? + message[message.find("]:")?..].find(": ")?
    } else {
        let colon = message.find(':')?;
        colon + 1 + message[colon + 1..].find(": ")?
    };
    let (tag, text) = message.split_at(end + 2);
    tag.strip_suffix(": ")?.parse::<SocketAddr>().ok()?;
    Some((tag, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirm(local: &str) -> Confirm {
        let confirm = Confirm::new();
        confirm.reset(local.parse().expect("address"));
        confirm
    }

    #[test]
    fn lines_come_back_in_order_and_only_ours_count() {
        let confirm = confirm("10.0.0.1:5");
        confirm.sent("one");
        confirm.sent("two");
        assert!(
            !confirm.observe("10.0.0.2:7: two"),
            "another's text, out of order"
        );
        assert!(confirm.observe("10.0.0.1:5: one"));
        assert!(!confirm.observe("10.0.0.2:7: two"), "someone else's");
        assert_eq!(confirm.unconfirmed(), 1);
        assert!(confirm.observe("10.0.0.1:5: two"));
        assert_eq!(confirm.unconfirmed(), 0);
    }

    #[test]
    fn an_earlier_run_from_our_own_host_in_the_history_is_never_us() {
        let confirm = confirm("127.0.0.1:40000");
        confirm.sent("deploy finished");
        assert!(
            !confirm.observe("127.0.0.1:39000: deploy finished"),
            "the history"
        );
        assert_eq!(confirm.unconfirmed(), 1);
        assert!(confirm.observe("127.0.0.1:40000: deploy finished"));
        assert_eq!(confirm.unconfirmed(), 0);
    }

    #[test]
    fn a_dual_stack_server_writes_our_ipv4_address_mapped() {
        let confirm = confirm("127.0.0.1:40000");
        confirm.sent("hi");
        assert!(confirm.observe("[::ffff:127.0.0.1]:40000: hi"));
        assert_eq!(confirm.unconfirmed(), 0);
    }

    #[test]
    fn behind_nat_our_tag_is_learned_and_other_texts_never_confuse_it() {
        let confirm = confirm("192.168.1.2:5000");
        confirm.sent("ok");
        assert!(
            !confirm.observe("10.0.0.2:5: status: ok"),
            "not a tag: 'status'"
        );
        assert!(confirm.observe("[2001:db8::1]:61000: ok"));
        confirm.sent("again: with colons");
        assert!(
            !confirm.observe("[2001:db8::9]:1: again: with colons"),
            "tag known now"
        );
        assert!(confirm.observe("[2001:db8::1]:61000: again: with colons"));
        assert_eq!(confirm.unconfirmed(), 0);
    }

    #[test]
    fn a_confirmation_rings_and_a_new_connection_forgets() {
        let confirm = confirm("10.0.0.1:1");
        confirm.sent("x");
        assert!(confirm.changed().try_recv().is_err());
        confirm.observe("10.0.0.1:1: x");
        assert!(confirm.changed().try_recv().is_ok(), "rang");
        confirm.sent("y");
        confirm.reset("10.0.0.1:2".parse().expect("address"));
        assert_eq!(confirm.unconfirmed(), 0, "lost with the connection");
        assert!(confirm.observe("10.0.0.1:2: anything"), "our own, marked");
        assert!(!confirm.observe("Welcome to chat! Type a message"));
    }
}

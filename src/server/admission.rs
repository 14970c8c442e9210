//! Who may come in: places for joined clients, room for handshakes under way, and which
//! web pages may open a WebSocket here.
//!
//! Each bound is a guard that gives its place back when dropped, so no path (an aborted
//! handshake, a failed write, a panic) can leak one:
//!
//! - a [`Pending`] place is taken when a connection is accepted and held until its
//!   handshake completes or the connection ends. Handshakes are bounded in total and per
//!   source address, apart from joined clients, so idle or trickling connections can fill
//!   neither the chat nor each other's room. When the room is full, the handshake that has
//!   waited longest (if it has waited long enough to be no real client's) is cut to make
//!   room;
//! - a [`Slot`] is taken when an upgrade is accepted, and held by the client's session.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::origin::Origins;
use super::peer::{Peer, PeerId};
use crate::config::ServerConfig;

/// A handshake younger than this is never cut to make room: real clients finish theirs in
/// milliseconds, so only connections that linger are taken for an attack.
const EVICT_AFTER: Duration = Duration::from_secs(1);

/// The server's bounds on who may come in.
#[derive(Debug)]
pub(crate) struct Admission {
    max_clients: usize,
    clients: AtomicUsize,
    max_pending: usize,
    max_pending_per_source: usize,
    pending: Mutex<PendingTable>,
    pub(crate) origins: Origins,
}

#[derive(Debug, Default)]
struct PendingTable {
    per_source: HashMap<Source, usize>,
    /// Oldest first: connection ids only grow.
    by_age: BTreeMap<PeerId, Waiting>,
}

#[derive(Debug)]
struct Waiting {
    source: Source,
    since: Instant,
    peer: Weak<Peer>,
}

/// Why a connection was not given room for a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Its source already has `--max-pending-per-ip` handshakes under way.
    Source(Source),
    /// `--max-pending` handshakes are under way and none has lingered long enough to cut.
    Full,
}

/// Room for one handshake; given back when dropped.
#[derive(Debug)]
pub(crate) struct Pending {
    admission: Arc<Admission>,
    id: PeerId,
}

/// A joined client's place; given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot<'a> {
    admission: &'a Admission,
}

impl Admission {
    pub(crate) fn new(config: &ServerConfig) -> Self {
        Self {
            max_clients: config.max_clients,
            clients: AtomicUsize::new(0),
            max_pending: config.max_pending.max(1),
            max_pending_per_source: config.max_pending_per_ip.max(1),
            pending: Mutex::default(),
            origins: Origins::new(&config.allow_origins, config.bind.ip().is_loopback()),
        }
    }

    /// How many clients are joined now.
    pub(crate) fn clients(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// How many clients may be joined at once.
    pub(crate) fn max_clients(&self) -> usize {
        self.max_clients
    }

    /// Room for `peer`'s handshake, or why not. When the room is full, the handshake that
    /// has waited longest is cut to make room if it has waited at least a second; its
    /// address is returned for the log.
    pub(crate) fn begin(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        now: Instant,
    ) -> Result<(Pending, Option<SocketAddr>), Refusal> {
        let source = Source::of(peer.addr.ip());
        let mut table = self.pending.lock();
        if table.per_source.get(&source).copied().unwrap_or(0) >= self.max_pending_per_source {
            return Err(Refusal::Source(source));
        }
        let mut evicted = None;
        if table.by_age.len() >= self.max_pending {
            let oldest = table.by_age.first_key_value().map(|(&id, w)| (id, w.since));
            match oldest {
                Some((id, since)) if now.saturating_duration_since(since) >= EVICT_AFTER => {
                    evicted = table.remove(id).and_then(|w| w.peer.upgrade());
                }
                _ => return Err(Refusal::Full),
            }
        }
        *table.per_source.entry(source).or_insert(0) += 1;
        table.by_age.insert(
            peer.id,
            Waiting {
                source,
                since: now,
                peer: Arc::downgrade(peer),
            },
        );
        drop(table);
        let evicted = evicted.map(|peer| {
            peer.abort();
            peer.addr
        });
        let pending = Pending {
            admission: Arc::clone(self),
            id: peer.id,
        };
        Ok((pending, evicted))
    }

    /// A place for a client whose upgrade is accepted, unless `--max-clients` are joined.
    pub(crate) fn join(&self) -> Option<Slot<'_>> {
        let max = self.max_clients;
        self.clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot { admission: self })
    }

    /// How many handshakes are under way, for tests of the bound.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending.lock().by_age.len()
    }
}

impl PendingTable {
    fn remove(&mut self, id: PeerId) -> Option<Waiting> {
        let waiting = self.by_age.remove(&id)?;
        if let Some(count) = self.per_source.get_mut(&waiting.source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&waiting.source);
            }
        }
        Some(waiting)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.admission.pending.lock().remove(self.id);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.admission.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where connections come from, as the per-address bound counts them: an IPv4 address, or
/// an IPv6 /64, since one IPv6 host is usually given a whole /64. IPv4 clients of a dual-
/// stack listener (`::ffff:a.b.c.d`) count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Source(IpAddr);

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(_) => Source(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !(u128::MAX >> 64);
                    Source(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::metrics::Metrics;
    use std::net::{TcpListener, TcpStream};

    /// A peer on a real (loopback) socket, claiming to come from `from`.
    fn peer(id: PeerId, from: &str) -> Arc<Peer> {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let stream = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let metrics = Arc::new(Metrics::new());
        Arc::new(Peer::new(
            id,
            stream,
            from.parse().expect("address"),
            metrics,
        ))
    }

    fn admission(max_pending: usize, per_ip: usize, max_clients: usize) -> Arc<Admission> {
        let config = ServerConfig::default()
            .max_pending(max_pending)
            .max_pending_per_ip(per_ip)
            .max_clients(max_clients);
        Arc::new(Admission::new(&config))
    }

    #[test]
    fn places_come_back_when_their_guards_drop() {
        let admission = admission(4, 4, 1);
        let (pending, _) = admission
            .begin(&peer(1, "10.0.0.1:1"), Instant::now())
            .expect("room");
        assert_eq!(admission.pending(), 1);
        let slot = admission.join().expect("a place");
        assert!(admission.join().is_none(), "max_clients is 1");
        drop(pending);
        drop(slot);
        assert_eq!((admission.pending(), admission.clients()), (0, 0));
        assert!(admission.join().is_some());
    }

    #[test]
    fn one_source_is_bounded_and_others_still_get_in() {
        let admission = admission(100, 2, 10);
        let now = Instant::now();
        let held: Vec<_> = (0..2)
            .map(|i| admission.begin(&peer(i, "10.0.0.1:1"), now).expect("room"))
            .collect();
        let refused = admission.begin(&peer(3, "10.0.0.1:2"), now);
        assert_eq!(
            refused.err(),
            Some(Refusal::Source(Source::of("10.0.0.1".parse().expect("ip"))))
        );
        assert!(admission.begin(&peer(4, "10.0.0.2:1"), now).is_ok());
        drop(held);
        assert!(admission.begin(&peer(5, "10.0.0.1:3"), now).is_ok());
    }

    #[test]
    fn a_full_room_cuts_the_oldest_lingering_handshake_but_never_a_young_one() {
        let admission = admission(2, 10, 10);
        let start = Instant::now();
        let first = peer(1, "10.0.0.1:1");
        let a = admission.begin(&first, start).expect("room");
        let _b = admission
            .begin(&peer(2, "10.0.0.2:1"), start)
            .expect("room");
        let young = admission.begin(&peer(3, "10.0.0.3:1"), start + Duration::from_millis(10));
        assert_eq!(young.err(), Some(Refusal::Full));
        let later = start + EVICT_AFTER;
        let (_c, evicted) = admission
            .begin(&peer(4, "10.0.0.4:1"), later)
            .expect("room made");
        assert_eq!(evicted, Some(first.addr), "the oldest was cut");
        assert_eq!(admission.pending(), 2);
        drop(a);
        assert_eq!(
            admission.pending(),
            2,
            "a cut handshake's guard gives nothing back twice"
        );
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let a = Source::of("2001:db8:1:2:aaaa::1".parse().expect("ip"));
        let b = Source::of("2001:db8:1:2:bbbb::2".parse().expect("ip"));
        let c = Source::of("2001:db8:1:3::1".parse().expect("ip"));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        let mapped = Source::of("::ffff:192.0.2.7".parse().expect("ip"));
        assert_eq!(mapped.to_string(), "192.0.2.7");
    }
}

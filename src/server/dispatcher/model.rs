//! A model test of the dispatcher, without sockets or threads: random joins, leaves,
//! broadcasts (one at a time and a fleet's batches), pings, stalled clients, scan steps, a
//! fleet's restarts after a loss and a shutdown, through in-memory outlets
//! that record what each client would have read. Then, for every client:
//!
//! - one global order: what it got is a contiguous run of the broadcasts, in order;
//! - atomic join: the welcome, then exactly the history as it stood at its join (the last
//!   `history` broadcasts, or of a restart's history and the broadcasts since), then every
//!   later broadcast, with no gap and no duplicate; nothing of a restart's history;
//! - a restart closes every client with 1012 after the data before it;
//! - a close always comes after all the data broadcast before it, and nothing after it;
//! - a client that stops reading is closed with 1008 after an unbroken prefix, and is sent
//!   nothing more once its queue has overflowed;
//! - a client whose socket failed got an unbroken prefix;
//!
//! and the ring never holds more than the history once every client is up to date, and
//! every batch handed to an outlet is within [`MAX_BATCH`].

use std::sync::Arc;

use parking_lot::Mutex;
use proptest::prelude::*;

use super::*;
use crate::server::inbox::Batch;

/// `frames` as a fleet's reader sends them, with a credit nobody waits for.
fn credited(frames: Vec<Frame>) -> Batch {
    Batch::new(frames, crossbeam_channel::bounded(0).0)
}

/// What one in-memory client was sent.
#[derive(Debug, Default)]
struct Wire {
    frames: Vec<Frame>,
    close: Option<Frame>,
    /// Its queue overflowed: the dispatcher must close it before anything else.
    overflowed: bool,
    /// Its socket failed (or was aborted): every send fails from now on.
    broken: bool,
}

/// An outlet that takes `room` frames (a stalled client) or all of them.
struct MemOutlet {
    id: PeerId,
    wire: Arc<Mutex<Wire>>,
    room: Option<usize>,
}

impl Outlet for MemOutlet {
    fn id(&self) -> PeerId {
        self.id
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 1))
    }

    fn send(&mut self, frames: &[Frame]) -> Sent {
        assert!(
            !frames.is_empty() && frames.len() <= MAX_BATCH,
            "batch size"
        );
        let mut wire = self.wire.lock();
        if wire.close.is_some() || wire.broken {
            return Sent::Gone;
        }
        assert!(
            !wire.overflowed,
            "sent to a client past its queue before closing it"
        );
        for frame in frames {
            match &mut self.room {
                Some(0) => {
                    wire.overflowed = true;
                    return Sent::Overflow;
                }
                Some(room) => *room -= 1,
                None => {}
            }
            wire.frames.push(frame.clone());
        }
        Sent::Done
    }

    fn close(&mut self, frame: Frame) {
        let mut wire = self.wire.lock();
        if !wire.broken {
            wire.close.get_or_insert(frame);
        }
    }

    fn abort(&self) {
        self.wire.lock().broken = true;
    }

    fn silent_for(&self, _now: Instant) -> Duration {
        Duration::ZERO
    }

    fn reap(&mut self) {}
}

#[derive(Debug, Clone)]
enum Op {
    Join {
        room: Option<usize>,
    },
    Leave {
        who: usize,
        close: bool,
    },
    /// This many broadcasts in one event, as a fleet's reader sends them; one alone when
    /// `None`.
    Broadcast(Option<usize>),
    Ping {
        who: usize,
    },
    Visit(usize),
    /// The dispatcher's timers, this many seconds on: pings, unanswered closes.
    Tick(u64),
    /// A client's socket fails.
    Fail {
        who: usize,
    },
    /// A fleet's restart after Redis lost data, with a history of this many frames.
    Restart(usize),
    Shutdown,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => proptest::option::weighted(0.3, 1..40usize).prop_map(|room| Op::Join { room }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(who, close)| Op::Leave { who, close }),
        // Batches up to past a write's MAX_BATCH.
        8 => proptest::option::weighted(0.2, 0..200usize).prop_map(Op::Broadcast),
        1 => any::<usize>().prop_map(|who| Op::Ping { who }),
        4 => (1..8usize).prop_map(Op::Visit),
        1 => (1..8u64).prop_map(Op::Tick),
        1 => any::<usize>().prop_map(|who| Op::Fail { who }),
        1 => (0..24usize).prop_map(Op::Restart),
        1 => Just(Op::Shutdown),
    ]
}

/// How a client's stay ended, first of all.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ending {
    Open,
    Left { close: bool },
    Reset,
    Shutdown,
}

struct Client {
    id: PeerId,
    wire: Arc<Mutex<Wire>>,
    /// The history it was shown.
    history: Vec<Frame>,
    /// Broadcasts before its join.
    joined_at: usize,
    /// Broadcasts before its stay ended (leave or shutdown), if it did.
    ended_at: Option<usize>,
    ending: Ending,
    after_shutdown: bool,
}

fn close_code(frame: &Frame) -> u16 {
    assert_eq!(frame[0], 0x88, "a close frame");
    match frame.get(2..4) {
        Some(code) => u16::from_be_bytes([code[0], code[1]]),
        None => 1005,
    }
}

fn check(ops: &[Op], history: usize) {
    let config = ServerConfig::default()
        .history(history)
        .ping_interval(Some(Duration::from_secs(1)));
    let mut dispatcher = Dispatcher::<MemOutlet>::new(&config, Arc::new(Metrics::new()));
    let mut clock = Instant::now();
    let mut clients: Vec<Client> = Vec::new();
    let mut live: Vec<usize> = Vec::new();
    let mut sent: Vec<Frame> = Vec::new();
    // What a joiner is shown the tail of: the broadcasts, or the last restart's history and
    // the broadcasts since.
    let mut shown: Vec<Frame> = Vec::new();
    let mut shut_down = false;
    for op in ops {
        match *op {
            Op::Join { room } => {
                let id = clients.len() as PeerId + 1;
                let wire = Arc::new(Mutex::new(Wire::default()));
                let outlet = MemOutlet {
                    id,
                    wire: Arc::clone(&wire),
                    room,
                };
                live.push(clients.len());
                clients.push(Client {
                    id,
                    wire,
                    history: shown[shown.len().saturating_sub(history)..].to_vec(),
                    joined_at: sent.len(),
                    ended_at: shut_down.then_some(sent.len()),
                    ending: if shut_down {
                        Ending::Shutdown
                    } else {
                        Ending::Open
                    },
                    after_shutdown: shut_down,
                });
                dispatcher.handle(Event::Join(outlet, message::welcome()));
            }
            Op::Leave { who, close } if !live.is_empty() => {
                let client = &mut clients[live.remove(who % live.len())];
                if client.ending == Ending::Open {
                    client.ending = Ending::Left { close };
                    client.ended_at = Some(sent.len());
                }
                let frame = close.then(|| message::close(CloseCode::Normal, ""));
                dispatcher.handle(Event::Leave(client.id, frame));
            }
            Op::Broadcast(batch) => {
                let frames: Vec<Frame> = (0..batch.unwrap_or(1))
                    .map(|i| message::text("10.0.0.9:9: ", &format!("m{}", sent.len() + i)))
                    .collect();
                sent.extend(frames.iter().cloned());
                shown.extend(frames.iter().cloned());
                dispatcher.handle(match batch {
                    Some(_) => Event::Broadcasts(credited(frames)),
                    None => Event::Broadcast(frames[0].clone()),
                });
            }
            Op::Ping { who } if !live.is_empty() => {
                let id = clients[live[who % live.len()]].id;
                dispatcher.handle(Event::Pong(id, message::pong(b"p")));
            }
            Op::Visit(n) => (0..n).for_each(|_| dispatcher.visit()),
            Op::Tick(seconds) => {
                clock += Duration::from_secs(seconds);
                dispatcher.housekeeping(clock);
            }
            Op::Fail { who } if !live.is_empty() => {
                clients[live[who % live.len()]].wire.lock().broken = true;
            }
            Op::Restart(frames) => {
                shown = (0..frames)
                    .map(|i| message::text("10.0.0.8:8: ", &format!("s{}-{i}", sent.len())))
                    .collect();
                for &i in &live {
                    if clients[i].ending == Ending::Open {
                        clients[i].ending = Ending::Reset;
                        clients[i].ended_at = Some(sent.len());
                    }
                }
                dispatcher.handle(Event::Restart(shown.clone()));
            }
            Op::Shutdown if !shut_down => {
                shut_down = true;
                for &i in &live {
                    if clients[i].ending == Ending::Open {
                        clients[i].ending = Ending::Shutdown;
                        clients[i].ended_at = Some(sent.len());
                    }
                }
                dispatcher.handle(Event::Shutdown);
            }
            _ => {}
        }
        assert_eq!(
            dispatcher.clients.len(),
            live.len(),
            "departed clients are forgotten"
        );
        if dispatcher.is_idle() {
            dispatcher.rest();
            assert!(
                dispatcher.ring.len() <= history,
                "the ring is trimmed at rest"
            );
        }
    }
    let mut visits = 0;
    while !dispatcher.is_idle() {
        dispatcher.visit();
        visits += 1;
        assert!(visits < 100_000, "the scan settles");
    }
    dispatcher.rest();
    assert!(dispatcher.ring.len() <= history.min(shown.len()));
    for client in &clients {
        check_client(client, &sent);
    }
}

fn check_client(client: &Client, sent: &[Frame]) {
    let wire = client.wire.lock();
    let who = format!("client {}", client.id);
    if client.after_shutdown {
        assert_eq!(
            wire.frames,
            [message::welcome()],
            "{who}: only the answer after shutdown"
        );
        assert_eq!(wire.close.as_ref().map(close_code), Some(1001), "{who}");
        return;
    }
    assert_eq!(
        wire.frames.first(),
        Some(&message::welcome()),
        "{who}: welcome first"
    );
    let data: Vec<&Frame> = wire.frames[1..]
        .iter()
        .filter(|f| !matches!(f[0], 0x89 | 0x8A))
        .collect();
    let end = client.ended_at.unwrap_or(sent.len());
    let expected: Vec<&Frame> = client
        .history
        .iter()
        .chain(&sent[client.joined_at..end])
        .collect();
    let code = wire.close.as_ref().map(close_code);
    if code == Some(1008) || wire.broken {
        assert!(expected.starts_with(&data), "{who}: an unbroken prefix");
        return;
    }
    assert_eq!(
        data, expected,
        "{who}: history, then every broadcast, in order"
    );
    let expected_code = match client.ending {
        Ending::Open | Ending::Left { close: false } => None,
        Ending::Left { close: true } => Some(1000),
        Ending::Reset => Some(1012),
        Ending::Shutdown => Some(1001),
    };
    assert_eq!(
        code, expected_code,
        "{who}: the close, after all the data before it"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_client_sees_one_order_joins_are_atomic_and_closes_come_last(
        ops in proptest::collection::vec(op(), 1..300),
        history in 0..20usize,
    ) {
        check(&ops, history);
    }
}

/// Ops written short: `J` a join, `B` a broadcast, `L<n>` a leave without a close, `V<n>`
/// a scan of `n` visits.
fn script(ops: &str) -> Vec<Op> {
    ops.split_whitespace()
        .map(|op| {
            let n = || op[1..].parse().expect("a number");
            match &op[..1] {
                "J" => Op::Join { room: None },
                "B" => Op::Broadcast(None),
                "L" => Op::Leave {
                    who: n(),
                    close: false,
                },
                "V" => Op::Visit(n()),
                other => panic!("no op {other}"),
            }
        })
        .collect()
}

/// Failures proptest once shrank to (the last one a first read of a fleet's stream, which
/// was a reseed then).
#[test]
fn past_failures_stay_fixed() {
    check(
        &script(
            "J V1 J J J J V6 J L0 J J L0 L0 J L0 J L0 J V1 V5 J J V7 J L7822019555049156741 V1 \
             L12299812463675885836 J V1 V2 J L8076165691135451505 J J J J V2 V1 J J \
             L3524363769378445580 J V6 V4 B V2 L11965468517787171259",
        ),
        0,
    );
    check(
        &script(
            "J J J J J J L0 J B J L0 J L0 J J J J J J J J J L0 L0 L656689554 L0 L0 J J L0 L0 J \
             L0 V6 L0 J J B V5 L105322225066184460",
        ),
        0,
    );
    use Op::{Broadcast, Join, Leave, Shutdown};
    let open = Join { room: None };
    check(
        &[
            open.clone(),
            Broadcast(None),
            Leave {
                who: 0,
                close: false,
            },
        ],
        0,
    );
    check(
        &[
            open.clone(),
            Broadcast(None),
            Broadcast(None),
            Join { room: Some(1) },
            open.clone(),
            Shutdown,
        ],
        1,
    );
    check(&[Broadcast(Some(1))], 1);
    // A join while stopping: the answer, then the close, and no history.
    check(&[Shutdown, open], 0);
}

#[test]
fn a_stalled_client_is_closed_with_1008_after_a_prefix() {
    let ops = [
        Op::Join { room: Some(3) },
        Op::Join { room: None },
        Op::Broadcast(None),
        Op::Broadcast(None),
        Op::Broadcast(None),
        Op::Visit(4),
    ];
    check(&ops, 16);
}

/// A fleet node's first read of the stream goes to the clients that joined before it as
/// their history. A restart after a loss closes every client with 1012 after all the data
/// before it, and its history goes to no current client; joiners get it.
#[test]
fn a_first_read_is_the_early_joiners_history_and_a_restart_restarts_everyone() {
    let config = ServerConfig::default().history(2);
    let mut dispatcher = Dispatcher::<MemOutlet>::new(&config, Arc::new(Metrics::new()));
    let joiner = |dispatcher: &mut Dispatcher<MemOutlet>, id: PeerId| {
        let wire = Arc::new(Mutex::new(Wire::default()));
        let outlet = MemOutlet {
            id,
            wire: Arc::clone(&wire),
            room: None,
        };
        dispatcher.handle(Event::Join(outlet, message::welcome()));
        wire
    };
    let text = |n: u32| message::text("10.0.0.9:9: ", &format!("m{n}"));
    let early = joiner(&mut dispatcher, 1);
    dispatcher.handle(Event::Broadcasts(credited(vec![
        text(10),
        text(11),
        text(12),
    ])));
    dispatcher.handle(Event::Broadcast(text(1)));
    let late = joiner(&mut dispatcher, 2);
    dispatcher.handle(Event::Broadcast(text(2)));
    dispatcher.handle(Event::Restart(vec![text(20)]));
    let after = joiner(&mut dispatcher, 3);
    while !dispatcher.is_idle() {
        dispatcher.visit();
    }
    let welcome = message::welcome();
    assert_eq!(
        early.lock().frames,
        [
            welcome.clone(),
            text(10),
            text(11),
            text(12),
            text(1),
            text(2)
        ],
        "a client that joined before the first read is sent all of it"
    );
    assert_eq!(
        late.lock().frames,
        [welcome.clone(), text(12), text(1), text(2)],
        "a later joiner gets the last `history` of the ring"
    );
    for wire in [&early, &late] {
        let close = wire.lock().close.clone().expect("closed");
        assert_eq!(close_code(&close), 1012);
    }
    assert_eq!(after.lock().frames, [welcome, text(20)]);
    assert!(after.lock().close.is_none(), "a joiner after a reset stays");
}

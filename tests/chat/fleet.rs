//! A fleet on a real `redis-server`: each test starts its own on a free port, without
//! persistence, and stops it. Without redis-server the tests skip (and fail under CI=true).

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Instant;

use broadcast_chat::{RedisConfig, Server, ServerConfig};
use openmetrics_parser::OpenMetricsValue;
use openmetrics_parser::openmetrics::parse_openmetrics;
use tungstenite::{Bytes, Message};

use crate::support::*;

const REDIS: &str = "/usr/bin/redis-server";

/// A redis-server of the test's own, killed when dropped, and a stream key of the test's
/// own, so that tests never share a room even if they ever share a server.
struct Redis {
    proc: Option<Proc>,
    port: u16,
    url: String,
    key: String,
}

static KEYS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Redis {
    /// A fresh server, or `None` (and why, on stderr) to skip. Under `CI=true` a missing
    /// redis-server fails the test.
    fn start() -> Option<Redis> {
        if !std::path::Path::new(REDIS).exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but there is no {REDIS}; .ci/run installs Debian's redis-server"
            );
            eprintln!("fleet test skipped: no {REDIS} (apt-get install redis-server)");
            return None;
        }
        let port = free_port();
        let mut redis = Redis {
            proc: None,
            port,
            url: format!("redis://127.0.0.1:{port}"),
            key: format!("test-{}", KEYS.fetch_add(1, Ordering::Relaxed)),
        };
        redis.spawn();
        Some(redis)
    }

    fn spawn(&mut self) {
        let proc = Proc::spawn(
            Command::new(REDIS)
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--enable-debug-command", "yes"])
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        );
        self.proc = Some(proc);
        let deadline = Instant::now() + WAIT;
        while self.try_ping().is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            thread::sleep(ms(10));
        }
        let ours = self.proc.as_mut().map(|p| p.child.try_wait());
        assert!(
            matches!(ours, Some(Ok(None))),
            "our redis-server exited: is port {} taken by another?",
            self.port
        );
    }

    fn try_ping(&self) -> redis::RedisResult<()> {
        redis::cmd("PING").exec(&mut self.try_connect()?)
    }

    fn try_connect(&self) -> redis::RedisResult<redis::Connection> {
        let con = redis::Client::open(self.url.as_str())?.get_connection_with_timeout(WAIT)?;
        con.set_read_timeout(Some(WAIT))?;
        Ok(con)
    }

    fn connect(&self) -> redis::Connection {
        self.try_connect().expect("connect to redis-server")
    }

    fn run(&self, args: &[&str]) {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.exec(&mut self.connect())
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }

    /// Kill it outright, as a crash would.
    fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.child.kill().expect("kill redis-server");
            proc.wait();
        }
    }

    /// A new, empty redis-server on the same port.
    fn restart_empty(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A node of the fleet, with flood control off; returned once it says it is healthy.
    fn node(&self) -> Server {
        let redis = RedisConfig::new(&self.url).key(&self.key);
        let node = unthrottled(ServerConfig::default().redis(Some(redis)));
        healthy(node.local_addr());
        node
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn healthy(addr: SocketAddr) {
    eventually("/healthz to say 200", || get(addr, "/healthz").0 == 200);
}

/// The next `count` texts `ws` receives.
fn texts(ws: &mut Ws, count: usize) -> Vec<String> {
    (0..count).map(|_| recv_text(ws)).collect()
}

/// Texts until (and including) the first that ends with `last`.
fn texts_until(ws: &mut Ws, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let text = recv_text(ws);
        let done = text.ends_with(last);
        seen.push(text);
        if done {
            return seen;
        }
    }
}

#[test]
fn a_message_on_one_node_reaches_clients_on_the_others_tagged_with_its_sender() {
    let Some(redis) = Redis::start() else { return };
    let nodes = [redis.node(), redis.node(), redis.node()];
    let (mut alice, alice_tag) = join(nodes[0].local_addr());
    let (mut bob, _) = join(nodes[1].local_addr());
    let (mut carol, _) = join(nodes[2].local_addr());
    send(&mut alice, "hello, fleet");
    let expected = format!("{alice_tag}: hello, fleet");
    for ws in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(recv_text(ws), expected);
    }
}

#[test]
fn every_client_on_every_node_receives_one_identical_sequence() {
    let Some(redis) = Redis::start() else { return };
    let nodes = [redis.node(), redis.node(), redis.node()];
    const EACH: usize = 100;
    let mut listeners: Vec<Ws> = nodes.iter().map(|n| join(n.local_addr()).0).collect();
    // Everyone is in before the first message, so that everyone must receive all of them.
    let joined: Vec<(Ws, String)> = nodes.iter().map(|n| join(n.local_addr())).collect();
    let senders: Vec<_> = joined
        .into_iter()
        .enumerate()
        .map(|(i, (mut ws, tag))| {
            thread::spawn(move || {
                for n in 0..EACH {
                    send(&mut ws, &format!("node {i} message {n}"));
                }
                (ws, tag)
            })
        })
        .collect();
    let mut senders: Vec<(Ws, String)> = senders
        .into_iter()
        .map(|s| s.join().expect("sender"))
        .collect();
    let total = EACH * nodes.len();
    let reference = texts(&mut listeners[0], total);
    for (i, (_, tag)) in senders.iter().enumerate() {
        let own: Vec<&String> = reference.iter().filter(|t| t.starts_with(tag)).collect();
        let expected: Vec<String> = (0..EACH)
            .map(|n| format!("{tag}: node {i} message {n}"))
            .collect();
        assert_eq!(own, expected.iter().collect::<Vec<_>>(), "{tag} in order");
    }
    let others = listeners[1..]
        .iter_mut()
        .chain(senders.iter_mut().map(|(ws, _)| ws));
    for ws in others {
        assert_eq!(texts(ws, total), reference, "one order on every node");
    }
}

/// A node whose room has `m0` … `m{count-1}` from one client, and that client's tag.
fn node_with_messages(redis: &Redis, count: usize) -> (Server, String) {
    let node = redis.node();
    let (mut sender, tag) = join(node.local_addr());
    for n in 0..count {
        send(&mut sender, &format!("m{n}"));
    }
    texts_until(&mut sender, &format!(": m{}", count - 1));
    (node, tag)
}

#[test]
fn a_node_started_later_shows_the_same_history_as_the_others() {
    let Some(redis) = Redis::start() else { return };
    let (first, tag) = node_with_messages(&redis, 20);
    let later = redis.node();
    let history = |addr| {
        let (mut ws, _) = join(addr);
        texts(&mut ws, 16)
    };
    let expected: Vec<String> = (4..20).map(|n| format!("{tag}: m{n}")).collect();
    assert_eq!(history(later.local_addr()), expected);
    assert_eq!(history(first.local_addr()), expected);
}

#[test]
fn a_node_seeds_its_history_from_entries_of_several_messages_and_pages_of_them() {
    let Some(redis) = Redis::start() else { return };
    let mut con = redis.connect();
    // As a busy writer adds them: 300 entries of 3 messages each, then the last one
    // repeated 70 times, as retries would: more than a page (64) of repeats, none shown
    // twice, so the history has to come from the page after.
    let entry = |seq: u64| {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&redis.key)
            .arg("*")
            .arg("n")
            .arg("00000000000000aa");
        xadd.arg("s").arg(seq);
        for m in 0..3 {
            xadd.arg("m").arg(format!("a: {seq}.{m}"));
        }
        xadd
    };
    for seq in 1..=300 {
        entry(seq).exec(&mut con).expect("XADD");
    }
    for _ in 0..70 {
        entry(300).exec(&mut con).expect("XADD a repeat");
    }
    let node = redis.node();
    let (mut ws, _) = join(node.local_addr());
    let expected: Vec<String> = (295..=300)
        .flat_map(|seq| (0..3).map(move |m| format!("a: {seq}.{m}")))
        .skip(2)
        .collect();
    assert_eq!(
        texts(&mut ws, 16),
        expected,
        "the last 16 messages, once each"
    );
    send(&mut ws, "live");
    assert!(
        recv_text(&mut ws).ends_with(": live"),
        "nothing of the history follows it"
    );
}

/// A node takes clients before it has read the stream (Redis is slow to answer as it
/// starts): they are shown the room's history as soon as the node has it.
#[test]
fn a_client_that_joins_before_its_node_has_read_the_stream_is_shown_the_history() {
    let Some(redis) = Redis::start() else { return };
    let (_first, tag) = node_with_messages(&redis, 3);
    redis.run(&["CLIENT", "PAUSE", "5000", "ALL"]);
    let config = RedisConfig::new(&redis.url).key(&redis.key);
    let later = unthrottled(ServerConfig::default().redis(Some(config)));
    let (mut early, _) = join(later.local_addr());
    assert_eq!(
        get(later.local_addr(), "/healthz").0,
        503,
        "the node has not read the stream yet"
    );
    let expected: Vec<String> = (0..3).map(|n| format!("{tag}: m{n}")).collect();
    assert_eq!(texts(&mut early, 3), expected);
}

#[test]
fn killed_connections_and_a_sleeping_redis_lose_nothing_and_repeat_nothing() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = (redis.node(), redis.node());
    let (mut sender, tag) = join(a.local_addr());
    let (mut far, _) = join(b.local_addr());
    let (mut near, _) = join(a.local_addr());
    let mut sent = 0;
    let mut burst = |sender: &mut Ws, count: usize| {
        for _ in 0..count {
            send(sender, &format!("n{sent}"));
            sent += 1;
        }
    };
    burst(&mut sender, 100);
    redis.run(&["CLIENT", "KILL", "TYPE", "normal"]);
    burst(&mut sender, 100);
    redis.run(&["CLIENT", "PAUSE", "500", "ALL"]);
    burst(&mut sender, 100);

    // Redis asleep: the nodes cannot reach it, but they still answer their clients.
    let asleep = Arc::new(AtomicBool::new(true));
    let sleeper = {
        let (asleep, mut con) = (Arc::clone(&asleep), redis.connect());
        thread::spawn(move || {
            let slept = redis::cmd("DEBUG").arg("SLEEP").arg(2).exec(&mut con);
            asleep.store(false, Ordering::SeqCst);
            slept.expect("DEBUG SLEEP");
        })
    };
    let probe = redis.connect();
    probe.set_read_timeout(Some(ms(100))).expect("timeout");
    let mut probe = probe;
    eventually("redis to be asleep", || {
        redis::cmd("PING").exec(&mut probe).is_err()
    });
    burst(&mut sender, 100);
    far.send(Message::Ping(Bytes::from_static(b"still there?")))
        .expect("ping");
    let mut early = Vec::new();
    loop {
        match far.read().expect("a pong while Redis sleeps") {
            Message::Pong(payload) => {
                assert_eq!(&payload[..], b"still there?");
                break;
            }
            Message::Text(text) => early.push(text.to_string()),
            Message::Ping(_) => {}
            other => panic!("expected the pong, got {other:?}"),
        }
    }
    assert!(asleep.load(Ordering::SeqCst), "answered while Redis slept");
    sleeper.join().expect("sleeper");

    burst(&mut sender, 1);
    let expected: Vec<String> = (0..sent).map(|n| format!("{tag}: n{n}")).collect();
    early.extend(texts(&mut far, sent - early.len()));
    assert_eq!(early, expected, "every message once, in order");
    for ws in [&mut near, &mut sender] {
        assert_eq!(texts(ws, sent), expected, "every message once, in order");
    }
    send(&mut sender, "end");
    assert_eq!(recv_text(&mut far), format!("{tag}: end"), "no repeats");
}

#[test]
fn redis_restarted_empty_restarts_the_clients_with_1012_and_chat_goes_on() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let (a, b) = (redis.node(), redis.node());
    let (mut alice, alice_tag) = join(a.local_addr());
    let (mut bob, _) = join(b.local_addr());
    send(&mut alice, "before");
    for ws in [&mut alice, &mut bob] {
        assert_eq!(recv_text(ws), format!("{alice_tag}: before"));
    }

    redis.kill();
    eventually("/healthz to say 503 with the Redis link down", || {
        let (status, body) = get(a.local_addr(), "/healthz");
        status == 503 && body.contains("the Redis link is down")
    });
    send(&mut alice, "while Redis was down");
    redis.restart_empty();

    for ws in [&mut alice, &mut bob] {
        let (code, reason, _) = recv_until_close(ws);
        assert_eq!(
            (code, reason.as_str()),
            (1012, "service restart: reconnect")
        );
    }
    healthy(a.local_addr());
    healthy(b.local_addr());
    let (mut alice, alice_tag) = join(a.local_addr());
    let (mut bob, _) = join(b.local_addr());
    send(&mut alice, "after");
    let seen = texts_until(&mut bob, ": after");
    assert!(
        seen.contains(&format!("{alice_tag}: after")),
        "the new connection chats: {seen:?}"
    );
    let old = seen
        .iter()
        .filter(|t| t.ends_with(": while Redis was down"));
    assert_eq!(
        old.count(),
        1,
        "the message sent while Redis was down: {seen:?}"
    );
}

/// A stream trimmed under a node past the last entry it delivered, as by an operator's
/// `XTRIM` or `DEL`, or by the other nodes while this one was away for longer than
/// `--redis-window` entries. The node can no longer prove that it missed nothing, nor show
/// the room's history as the other nodes will, so it restarts its clients.
#[test]
fn a_stream_trimmed_past_what_a_node_delivered_restarts_its_clients_with_1012() {
    let Some(redis) = Redis::start() else { return };
    let node = redis.node();
    let (mut alice, alice_tag) = join(node.local_addr());
    send(&mut alice, "before");
    assert_eq!(recv_text(&mut alice), format!("{alice_tag}: before"));
    // In one transaction, so that the node's waiting read is answered by the entry after
    // the trim, whenever its wait would have run out.
    redis::pipe()
        .atomic()
        .cmd("XTRIM")
        .arg(&redis.key)
        .arg("MAXLEN")
        .arg(0)
        .cmd("XADD")
        .arg(&redis.key)
        .arg("*")
        .arg(&["n", "00000000000000aa", "s", "1", "m", "a: after the trim"][..])
        .exec(&mut redis.connect())
        .expect("XTRIM and XADD");
    let (code, reason, seen) = recv_until_close(&mut alice);
    assert_eq!(
        (code, reason.as_str(), seen),
        (1012, "service restart: reconnect", Vec::<String>::new()),
        "the entry after the trim is not delivered as if nothing were missing"
    );
    let (mut again, tag) = join(node.local_addr());
    send(&mut again, "after");
    assert_eq!(
        texts_until(&mut again, ": after"),
        ["a: after the trim".to_string(), format!("{tag}: after")],
        "the room as Redis has it now"
    );
}

#[test]
fn a_node_whose_redis_is_unreachable_starts_reports_503_and_joins_when_redis_comes() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let node = unthrottled(ServerConfig::default().redis(Some(RedisConfig::new(&url))));
    let (status, body) = get(node.local_addr(), "/healthz");
    assert_eq!(status, 503);
    assert!(body.contains("the Redis link is down"), "{body}");
    let (mut early, tag) = join(node.local_addr());
    send(&mut early, "waiting for Redis");
    let Some(mut redis) = Redis::start() else {
        return;
    };
    redis.kill();
    redis.port = port;
    redis.url = url;
    redis.key = "broadcast-chat".to_string();
    redis.spawn();
    healthy(node.local_addr());
    assert_eq!(recv_text(&mut early), format!("{tag}: waiting for Redis"));
}

/// The value of the sample of `family` with `labels`, from a parsed exposition.
fn sample(text: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    let exposition = parse_openmetrics(text).unwrap_or_else(|e| panic!("{e:?} in\n{text}"));
    let family = exposition
        .families
        .get(family)
        .unwrap_or_else(|| panic!("no family {family} in\n{text}"));
    let found = family.iter_samples().find(|s| {
        let set = s.get_labelset().expect("labels");
        labels
            .iter()
            .all(|(name, value)| set.get_label_value(name) == Some(*value))
    });
    match found.map(|s| &s.value) {
        Some(OpenMetricsValue::Counter(c)) => c.value.as_f64(),
        Some(OpenMetricsValue::Gauge(g)) => g.as_f64(),
        other => panic!("{other:?} for {family:?} {labels:?}"),
    }
}

#[test]
fn metrics_parse_as_openmetrics_and_count_the_fleet() {
    let Some(redis) = Redis::start() else { return };
    let node = redis.node();
    let addr = node.local_addr();
    let metrics = || {
        let (status, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        body
    };
    let before = metrics();
    assert_eq!(
        sample(
            &before,
            "broadcast_chat_redis_link_up",
            &[("link", "reader")]
        ),
        1.0
    );
    let (mut ws, tag) = join(addr);
    for n in 0..5 {
        send(&mut ws, &format!("m{n}"));
    }
    assert_eq!(texts(&mut ws, 5).last(), Some(&format!("{tag}: m4")));

    // A retried XADD whose first reply was lost: the same entry twice in the stream.
    let mut con = redis.connect();
    let newest: redis::Value = redis::cmd("XREVRANGE")
        .arg(&redis.key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(&mut con)
        .expect("XREVRANGE");
    let redis::Value::Array(entries) = newest else {
        panic!("{newest:?}")
    };
    let Some(redis::Value::Array(entry)) = entries.first() else {
        panic!("{entries:?}")
    };
    let Some(redis::Value::Array(fields)) = entry.get(1) else {
        panic!("{entry:?}")
    };
    let mut again = redis::cmd("XADD");
    again.arg(&redis.key).arg("*");
    for field in fields {
        let redis::Value::BulkString(bytes) = field else {
            panic!("{field:?}")
        };
        again.arg(bytes.as_slice());
    }
    again.exec(&mut con).expect("XADD the repeat");
    send(&mut ws, "m5");
    assert_eq!(
        recv_text(&mut ws),
        format!("{tag}: m5"),
        "the repeat is dropped"
    );
    // The dispatcher adds its counts once a scan, just after it has written.
    let moved =
        |after: &str, family: &str| sample(after, family, &[]) - sample(&before, family, &[]);
    let mut after = metrics();
    eventually("the broadcasts to be counted", || {
        after = metrics();
        moved(&after, "broadcast_chat_messages_broadcast") == 6.0
    });
    assert_eq!(moved(&after, "broadcast_chat_messages_received"), 6.0);
    // Every entry in the stream, the repeat too, however the writer batched the messages.
    let entries: u64 = redis::cmd("XLEN")
        .arg(&redis.key)
        .query(&mut con)
        .expect("XLEN");
    assert!(entries >= 2, "m5 and the repeat are entries of their own");
    assert_eq!(
        moved(&after, "broadcast_chat_redis_entries_read"),
        entries as f64
    );
    assert_eq!(
        moved(&after, "broadcast_chat_redis_duplicates_dropped"),
        1.0
    );
    assert!(moved(&after, "broadcast_chat_deliveries") >= 6.0);
    assert!(moved(&after, "broadcast_chat_bytes_written") >= 6.0 * 20.0);
    assert_eq!(sample(&after, "broadcast_chat_clients", &[]), 1.0);
    redis.run(&["CLIENT", "KILL", "TYPE", "normal"]);
    send(&mut ws, "after the kill");
    assert!(recv_text(&mut ws).ends_with(": after the kill"));
    eventually("a reconnect to be counted", || {
        sample(
            &metrics(),
            "broadcast_chat_redis_reconnects",
            &[("link", "reader")],
        ) >= 1.0
    });
}

#[test]
fn a_lone_node_serves_metrics_without_the_page_and_counts_closes() {
    let server = server(ServerConfig::default().web(false));
    let addr = server.local_addr();
    let (mut ws, _) = join(addr);
    close(
        &mut ws,
        tungstenite::protocol::frame::coding::CloseCode::Normal,
    );
    recv_until_close(&mut ws);
    assert_eq!(
        get(addr, "/nothing-here").0,
        404,
        "a missing page is no refusal"
    );
    let (status, _, _) = ask(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    assert!(status.contains("400"), "{status}");
    eventually("the close and the refusal to be counted", || {
        let (status, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        let closed = sample(
            &body,
            "broadcast_chat_clients_closed",
            &[("reason", "client")],
        );
        let refused = sample(
            &body,
            "broadcast_chat_handshakes_refused",
            &[("reason", "bad_request")],
        );
        closed == 1.0 && refused == 1.0
    });
}

#[test]
fn shutdown_with_redis_away_does_not_wait_for_it() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let node = redis.node();
    let (mut ws, _) = join(node.local_addr());
    redis.kill();
    eventually("/healthz to say 503", || {
        get(node.local_addr(), "/healthz").0 == 503
    });
    for n in 0..10 {
        send(&mut ws, &format!("stuck {n}"));
    }
    let (done, stopped) = crossbeam_channel::bounded(1);
    thread::spawn(move || done.send(node.shutdown().is_ok()));
    let (code, _, _) = recv_until_close(&mut ws);
    let clean = stopped.recv_timeout(WAIT).expect("shutdown ends");
    assert!(clean, "a clean shutdown");
    assert_eq!(code, 1001);
}

#[test]
fn messages_that_wait_for_redis_go_as_one_entry_in_order_from_batch_threads() {
    let Some(redis) = Redis::start() else { return };
    let node = redis.node();
    let (mut ws, tag) = join(node.local_addr());
    send(&mut ws, "first");
    assert_eq!(recv_text(&mut ws), format!("{tag}: first"));
    // The writer's XADD of "a" waits in Redis, and the rest queue behind it meanwhile.
    redis.run(&["CLIENT", "PAUSE", "300", "WRITE"]);
    let sent = ["a", "b", "c", "d"];
    for text in sent {
        send(&mut ws, text);
    }
    let expected: Vec<String> = sent.iter().map(|t| format!("{tag}: {t}")).collect();
    assert_eq!(texts(&mut ws, sent.len()), expected);
    let entries: u64 = redis::cmd("XLEN")
        .arg(&redis.key)
        .query(&mut redis.connect())
        .expect("XLEN");
    assert!(
        (2..=3).contains(&entries),
        "\"first\", then \"a\" and \"b c d\" (or all four) as one entry: {entries} entries"
    );
    // Both Redis threads of every node in this process take their work in batches (one
    // of another test may have been named and not yet have set its policy).
    let batch = libc::SCHED_BATCH.to_string();
    eventually("every Redis thread to run as SCHED_BATCH", || {
        let redis: Vec<(String, Option<String>)> = threads("self")
            .into_iter()
            .filter(|(name, _)| name.starts_with("redis "))
            .map(|(name, stat)| (name, policy(&stat)))
            .collect();
        redis.iter().any(|(name, _)| name == "redis writer")
            && redis.iter().any(|(name, _)| name == "redis reader")
            && redis
                .iter()
                .all(|(_, policy)| policy.as_deref() == Some(batch.as_str()))
    });
}

#[test]
fn a_client_held_up_by_a_full_writer_queue_is_not_taken_for_silent() {
    let Some(redis) = Redis::start() else { return };
    let config = RedisConfig::new(&redis.url).key(&redis.key);
    let node = unthrottled(
        ServerConfig::default()
            .redis(Some(config))
            .ping_interval(Some(ms(500))),
    );
    healthy(node.local_addr());
    let (mut ws, tag) = join(node.local_addr());
    // Writes wait in Redis for four seconds, eight ping intervals: the writer's queue
    // (4096) fills and the client's connection thread waits, reading nothing.
    redis.run(&["CLIENT", "PAUSE", "4000", "WRITE"]);
    const COUNT: usize = 5000;
    for n in 0..COUNT {
        send(&mut ws, &format!("w{n}"));
    }
    let expected: Vec<String> = (0..COUNT).map(|n| format!("{tag}: w{n}")).collect();
    assert_eq!(texts(&mut ws, COUNT), expected, "held up, not dropped");
}

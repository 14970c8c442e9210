use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use broadcast_chat::{ServerConfig, WELCOME};

use crate::support::*;

#[test]
fn everyone_including_the_sender_gets_each_message_tagged() {
    let server = default_server();
    let addr = server.local_addr();
    let (mut a, a_tag) = join(addr);
    let (mut b, _) = join(addr);
    let (mut c, _) = join(addr);
    send(&mut a, "hello all");
    for ws in [&mut a, &mut b, &mut c] {
        assert_eq!(recv_text(ws), format!("{a_tag}: hello all"));
    }
}

#[test]
fn empty_and_non_ascii_text_are_relayed_exactly() {
    let server = default_server();
    let (mut a, me) = join(server.local_addr());
    let (mut b, _) = join(server.local_addr());
    for text in [
        "",
        "héllo wörld ✓ 🌍",
        "tab\tand\nnewline",
        "  spaces  ",
        "a: b: c",
    ] {
        send(&mut a, text);
        assert_eq!(recv_text(&mut a), format!("{me}: {text}"));
        assert_eq!(recv_text(&mut b), format!("{me}: {text}"));
    }
}

#[test]
fn ipv6_clients_are_tagged_with_brackets() {
    let config = ServerConfig::default().bind("[::1]:0".parse().expect("address"));
    let server = broadcast_chat::Server::with_config(config).expect("IPv6 server");
    let (mut ws, me) = join(server.local_addr());
    assert!(me.starts_with("[::1]:"), "{me}");
    send(&mut ws, "v6");
    assert_eq!(recv_text(&mut ws), format!("{me}: v6"));
}

#[test]
fn three_clients_see_identical_sequences_while_all_send_at_once() {
    const EACH: usize = 300;
    let server = unthrottled(ServerConfig::default());
    let addr = server.local_addr();
    let clients: Vec<_> = (0..3).map(|_| join(addr)).collect();
    let tags: Vec<String> = clients.iter().map(|(_, tag)| tag.clone()).collect();
    let sequences: Vec<Vec<String>> = thread::scope(|s| {
        let handles: Vec<_> = clients
            .into_iter()
            .map(|(mut ws, _)| {
                s.spawn(move || {
                    for i in 0..EACH {
                        send(&mut ws, &format!("m{i}"));
                    }
                    (0..3 * EACH)
                        .map(|_| recv_text(&mut ws))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    assert_eq!(
        sequences[0], sequences[1],
        "clients 0 and 1 saw the same order"
    );
    assert_eq!(
        sequences[0], sequences[2],
        "clients 0 and 2 saw the same order"
    );
    let mut next: HashMap<&str, usize> = tags.iter().map(|t| (t.as_str(), 0)).collect();
    for line in &sequences[0] {
        let (tag, text) = line.rsplit_once(": ").expect("tagged");
        let expected = next.get_mut(tag).expect("a known sender");
        assert_eq!(
            text,
            format!("m{expected}"),
            "each sender's messages in the order sent"
        );
        *expected += 1;
    }
    assert!(next.values().all(|&n| n == EACH), "nothing lost: {next:?}");
}

#[test]
fn history_replays_the_recent_messages_oldest_first() {
    let server = default_server();
    let (mut a, a_tag) = join(server.local_addr());
    for i in 0..20 {
        send(&mut a, &format!("old {i}"));
        recv_text(&mut a);
    }
    let (mut b, b_tag) = join(server.local_addr());
    for i in 4..20 {
        assert_eq!(recv_text(&mut b), format!("{a_tag}: old {i}"));
    }
    send(&mut b, "live");
    assert_eq!(
        recv_text(&mut b),
        format!("{b_tag}: live"),
        "history ends where live begins"
    );
}

#[test]
fn history_zero_turns_the_replay_off() {
    let server = server(ServerConfig::default().history(0));
    let (mut a, _) = join(server.local_addr());
    send(&mut a, "before");
    recv_text(&mut a);
    let (mut b, b_tag) = join(server.local_addr());
    send(&mut b, "after");
    assert_eq!(recv_text(&mut b), format!("{b_tag}: after"));
}

#[test]
fn a_long_history_is_replayed_whole() {
    let server = unthrottled(ServerConfig::default().history(200));
    let (mut a, a_tag) = join(server.local_addr());
    for i in 0..250 {
        send(&mut a, &format!("{i}"));
    }
    for _ in 0..250 {
        recv_text(&mut a);
    }
    let (mut b, _) = join(server.local_addr());
    for i in 50..250 {
        assert_eq!(recv_text(&mut b), format!("{a_tag}: {i}"));
    }
}

/// A client joining while messages stream in sees one contiguous run: the replayed history
/// and the live messages meet with no gap and no duplicate. The history is longer than
/// what was sent before the join, so the replay must start at the very first message, and
/// the stream goes on until the joiner has seen many live ones: the seam is crossed
/// whatever the timing.
#[test]
fn a_joiner_during_a_fast_stream_sees_history_and_live_without_gap_or_duplicate() {
    const HISTORY: usize = 100_000;
    const JOIN_AFTER: usize = 100;
    const SEEN: usize = 1500;
    const IN_FLIGHT: usize = 8;
    let server = unthrottled(ServerConfig::default().history(HISTORY));
    let addr = server.local_addr();
    let (mut sender, tag) = join(addr);
    let (mut watcher, _) = join(addr);
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let streaming = s.spawn(|| {
            let mut sent = 0;
            while !stop.load(Ordering::Acquire) {
                send(&mut sender, &sent.to_string());
                sent += 1;
                if sent > IN_FLIGHT {
                    recv_text(&mut sender);
                }
            }
            send(&mut sender, "end");
            while recv_text(&mut sender) != format!("{tag}: end") {}
            sent
        });
        // Join once the stream is under way.
        while recv_text(&mut watcher) != format!("{tag}: {JOIN_AFTER}") {}
        let mut joiner = connect(addr);
        assert_eq!(recv_text(&mut joiner), WELCOME);
        let mut seen = Vec::new();
        loop {
            let line = recv_text(&mut joiner);
            let text = line.strip_prefix(&format!("{tag}: ")).expect("tagged");
            if text == "end" {
                break;
            }
            seen.push(text.parse::<usize>().expect("number"));
            if seen.len() == SEEN {
                stop.store(true, Ordering::Release);
            }
        }
        // The sender may stop right after the SEEN-th message: `sent` is at least SEEN.
        let sent = streaming.join().expect("sender");
        let expected: Vec<usize> = (0..sent).collect();
        assert_eq!(
            seen, expected,
            "the whole history, then live, no gap, no duplicate"
        );
    });
}

//! The room's entries in the Redis Stream, and the bookkeeping that drops repeats.
//!
//! An entry is `n <node> s <sequence> m <tagged text> [m <tagged text> …]`: the messages a
//! node's writer took from its queue at once, in order, one when the room is quiet. One
//! entry per batch rather than per message is what makes the stream cheap: Redis runs one
//! command, and every reader parses one entry, for a batch (README, Performance: the fleet
//! on Redis).
//!
//! The node is a random 64-bit number a server draws when it starts, and the sequence
//! counts that node's entries. A writer whose connection failed before it saw Redis's
//! reply cannot know whether its `XADD` happened, so it sends the same entry again, and
//! the stream may then hold the same (node, sequence) twice. Every reader keeps the
//! highest sequence seen per node and drops what is not above it: each node's writer adds
//! its entries in sequence order, so anything at or below the highest seen is a repeat.

use std::collections::HashMap;

use redis::Value;

/// Messages in one entry, at most: a writer takes no more at once, and a reader takes an
/// entry with more (some other program's) for malformed, so that what one read brings the
/// dispatcher stays bounded in frames.
pub(crate) const MOST_MESSAGES: usize = 256;

/// A writer takes no more messages once their texts reach this many bytes, so an entry of
/// ours holds at most this and one message more. It bounds what Redis keeps
/// (`--redis-window` entries) and what a read holds.
pub(crate) const ENTRY_BYTES: usize = 16 * 1024;

/// Text bytes in one entry, at most: what a writer adds when it has just under
/// [`ENTRY_BYTES`] and takes the longest text there is. More (some other program's entry)
/// is malformed, so that what one read brings the dispatcher stays bounded in bytes too.
const MOST_BYTES: usize = ENTRY_BYTES - 1 + crate::message::LONGEST_TEXT;

/// One entry of the stream, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The stream's ID for it, `<milliseconds>-<counter>`.
    pub(crate) id: String,
    /// Who added it and its number there; `None` for an entry some other program added.
    pub(crate) origin: Option<(u64, u64)>,
    /// The tagged texts, `127.0.0.1:53412: hi`, in order: at least one.
    pub(crate) texts: Vec<String>,
}

/// An entry read back, or the ID of one that cannot be used and why.
pub(crate) type Item = Result<Entry, (String, Malformed)>;

/// Why an entry could not be used.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) String);

impl Entry {
    /// The milliseconds part of the ID: when Redis added the entry.
    pub(crate) fn millis(&self) -> Option<u64> {
        self.id.split('-').next()?.parse().ok()
    }
}

/// The stream ID of an entry read, usable or not.
pub(crate) fn id(item: &Item) -> &str {
    match item {
        Ok(entry) => &entry.id,
        Err((id, _)) => id,
    }
}

/// A node's id as its entries carry it.
pub(crate) fn node_field(node: u64) -> String {
    format!("{node:016x}")
}

/// The fields of an entry for `XADD`, after the ID. They borrow the texts: no copy of a
/// message is made to build them (the command copies each once into the request).
pub(crate) fn fields<'a>(
    node: &'a str,
    seq: &'a str,
    texts: &'a [String],
) -> Vec<(&'static str, &'a str)> {
    let mut fields = Vec::with_capacity(texts.len() + 2);
    fields.extend([("n", node), ("s", seq)]);
    fields.extend(texts.iter().map(|text| ("m", text.as_str())));
    fields
}

/// The entries of an `XRANGE`/`XREVRANGE` reply: `[[id, [field, value, …]], …]`. Entries
/// that cannot be read are returned as errors in their place, so the caller can skip them
/// and still move past their ID.
pub(crate) fn entries(reply: Value) -> Result<Vec<Item>, Malformed> {
    let Value::Array(items) = reply else {
        return Err(Malformed(format!(
            "expected a list of entries, got {reply:?}"
        )));
    };
    items.into_iter().map(entry).collect()
}

/// The entries of the one stream in an `XREAD` reply (`[[key, entries]]`, or nil when the
/// wait ended with nothing new).
pub(crate) fn read_reply(reply: Value) -> Result<Vec<Item>, Malformed> {
    match reply {
        Value::Nil => Ok(Vec::new()),
        Value::Array(mut streams) if streams.len() == 1 => match streams.pop() {
            Some(Value::Array(mut pair)) if pair.len() == 2 => match pair.pop() {
                Some(list) => entries(list),
                None => Ok(Vec::new()),
            },
            other => Err(Malformed(format!("unexpected XREAD stream {other:?}"))),
        },
        other => Err(Malformed(format!("unexpected XREAD reply {other:?}"))),
    }
}

fn entry(item: Value) -> Result<Item, Malformed> {
    let Value::Array(mut pair) = item else {
        return Err(Malformed(format!("expected an entry, got {item:?}")));
    };
    if pair.len() != 2 {
        return Err(Malformed(format!("expected [id, fields], got {pair:?}")));
    }
    let fields = pair.pop();
    let id = match pair.pop() {
        Some(Value::BulkString(id)) => {
            String::from_utf8(id).map_err(|_| Malformed("an entry ID is not text".to_string()))?
        }
        other => return Err(Malformed(format!("expected an entry ID, got {other:?}"))),
    };
    Ok(match fields {
        Some(Value::Array(fields)) => decode(fields).map_err(|malformed| (id.clone(), malformed)),
        other => Err((
            id.clone(),
            Malformed(format!("expected fields, got {other:?}")),
        )),
    }
    .map(|(origin, texts)| Entry { id, origin, texts }))
}

type Decoded = (Option<(u64, u64)>, Vec<String>);

fn decode(fields: Vec<Value>) -> Result<Decoded, Malformed> {
    let (mut node, mut seq, mut texts) = (None, None, Vec::new());
    let mut bytes = 0;
    let mut fields = fields.into_iter();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        let (Value::BulkString(name), Value::BulkString(value)) = (name, value) else {
            continue;
        };
        match name.as_slice() {
            b"n" => node = std::str::from_utf8(&value).ok().and_then(hex),
            b"s" => {
                seq = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|s| s.parse().ok())
            }
            b"m" if texts.len() == MOST_MESSAGES => {
                return Err(Malformed(format!(
                    "it holds more than the {MOST_MESSAGES} messages an entry may"
                )));
            }
            b"m" if bytes + value.len() > MOST_BYTES => {
                return Err(Malformed(format!(
                    "its texts are over the {MOST_BYTES} bytes an entry may hold"
                )));
            }
            b"m" => texts.push({
                bytes += value.len();
                String::from_utf8(value)
                    .map_err(|_| Malformed("a text is not UTF-8".to_string()))?
            }),
            _ => {}
        }
    }
    if texts.is_empty() {
        return Err(Malformed("it has no \"m\" field".to_string()));
    }
    Ok((node.zip(seq), texts))
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

/// Nodes remembered at most. A repeat follows its original within seconds (a writer's
/// retry), so forgetting the node heard from least recently, once there are this many
/// (thousands of restarts), loses nothing.
const MAX_NODES: usize = 4096;

/// The highest sequence seen from each node, to drop the repeats of retried `XADD`s.
#[derive(Debug, Default)]
pub(crate) struct Dedupe {
    /// Node → (highest sequence, when last heard from, in entries seen).
    nodes: HashMap<u64, (u64, u64)>,
    clock: u64,
}

impl Dedupe {
    /// Whether the entry from `origin` is new, remembering it if so. Entries without an
    /// origin cannot be checked and always count as new.
    pub(crate) fn is_new(&mut self, origin: Option<(u64, u64)>) -> bool {
        let Some((node, seq)) = origin else {
            return true;
        };
        self.clock += 1;
        let clock = self.clock;
        if let Some((highest, heard)) = self.nodes.get_mut(&node) {
            *heard = clock;
            if seq <= *highest {
                return false;
            }
            *highest = seq;
            return true;
        }
        if self.nodes.len() >= MAX_NODES
            && let Some(stalest) = self
                .nodes
                .iter()
                .min_by_key(|(_, (_, heard))| *heard)
                .map(|(node, _)| *node)
        {
            self.nodes.remove(&stalest);
        }
        self.nodes.insert(node, (seq, clock));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn raw(id: &str, fields: &[&str]) -> Value {
        Value::Array(vec![
            bulk(id),
            Value::Array(fields.iter().map(|f| bulk(f)).collect()),
        ])
    }

    #[test]
    fn reads_our_entries_and_skips_foreign_ones_by_id() {
        let reply = Value::Array(vec![
            raw(
                "5-0",
                &["n", "00000000000000ff", "s", "7", "m", "1.2.3.4:5: hi"],
            ),
            raw("6-0", &["other", "x"]),
            raw("7-1", &["m", "no origin"]),
        ]);
        let got = entries(reply).expect("a list");
        assert_eq!(
            got[0],
            Ok(Entry {
                id: "5-0".into(),
                origin: Some((255, 7)),
                texts: vec!["1.2.3.4:5: hi".into()]
            })
        );
        assert!(matches!(&got[1], Err((id, _)) if id == "6-0"));
        assert_eq!(got[2].as_ref().map(|e| e.origin), Ok(None));
        assert_eq!(got[0].as_ref().map(Entry::millis), Ok(Some(5)));
    }

    #[test]
    fn an_xread_reply_is_nil_or_one_stream() {
        assert_eq!(read_reply(Value::Nil), Ok(Vec::new()));
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("room"),
            Value::Array(vec![raw("1-0", &["m", "x"])]),
        ])]);
        assert_eq!(read_reply(reply).map(|e| e.len()), Ok(1));
        assert!(read_reply(Value::Int(3)).is_err());
    }

    #[test]
    fn fields_round_trip_with_their_texts_in_order() {
        let node = node_field(0xdead_beef);
        let texts = ["a: b".to_string(), String::new(), "c: d".to_string()];
        let written = fields(&node, "42", &texts);
        let flat: Vec<&str> = written.iter().flat_map(|(k, v)| [*k, *v]).collect();
        let got = entries(Value::Array(vec![raw("1-1", &flat)])).expect("a list");
        assert_eq!(
            got[0].as_ref().map(|e| (e.origin, e.texts.clone())),
            Ok((Some((0xdead_beef, 42)), texts.to_vec()))
        );
    }

    #[test]
    fn an_entry_with_more_messages_than_a_writer_takes_at_once_is_malformed() {
        let texts = |n: usize| -> Vec<&str> { (0..n).flat_map(|_| ["m", "a: b"]).collect() };
        let reply = Value::Array(vec![
            raw("1-0", &texts(MOST_MESSAGES)),
            raw("2-0", &texts(MOST_MESSAGES + 1)),
        ]);
        let got = entries(reply).expect("a list");
        assert_eq!(got[0].as_ref().map(|e| e.texts.len()), Ok(MOST_MESSAGES));
        assert!(
            matches!(&got[1], Err((id, _)) if id == "2-0"),
            "{:?}",
            got[1]
        );
    }

    #[test]
    fn an_entry_with_more_text_than_a_writer_adds_at_once_is_malformed() {
        // As much as a writer of ours adds: just under a batch's bytes, then the longest
        // text; and one byte more.
        let short = "a".repeat(ENTRY_BYTES - 1);
        let long = "b".repeat(crate::message::LONGEST_TEXT);
        let most = ["m", short.as_str(), "m", long.as_str()];
        let over = format!("{short}a");
        let reply = Value::Array(vec![
            raw("1-0", &most),
            raw("2-0", &["m", over.as_str(), "m", long.as_str()]),
        ]);
        let got = entries(reply).expect("a list");
        assert_eq!(got[0].as_ref().map(|e| e.texts.len()), Ok(2));
        assert!(
            matches!(&got[1], Err((id, Malformed(why))) if id == "2-0" && why.contains("bytes")),
            "{:?}",
            got[1].as_ref().map(|e| e.texts.len())
        );
    }

    #[test]
    fn an_entry_without_text_or_with_a_text_not_utf8_is_malformed() {
        let bad = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![
                bulk("m"),
                bulk("ok"),
                bulk("m"),
                Value::BulkString(vec![0xff]),
            ]),
        ]);
        let got =
            entries(Value::Array(vec![raw("0-1", &["n", "1", "s", "1"]), bad])).expect("a list");
        assert!(matches!(&got[0], Err((id, _)) if id == "0-1"));
        assert!(matches!(&got[1], Err((id, _)) if id == "1-0"));
    }

    #[test]
    fn dedupe_drops_repeats_of_a_retried_batch() {
        let mut dedupe = Dedupe::default();
        let seen: Vec<bool> = [(1, 1), (1, 2), (2, 1), (1, 1), (1, 2), (1, 3), (2, 1)]
            .into_iter()
            .map(|origin| dedupe.is_new(Some(origin)))
            .collect();
        assert_eq!(seen, [true, true, true, false, false, true, false]);
        assert!(dedupe.is_new(None) && dedupe.is_new(None));
    }

    #[test]
    fn dedupe_forgets_the_stalest_node_past_its_bound() {
        let mut dedupe = Dedupe::default();
        for node in 0..=MAX_NODES as u64 {
            dedupe.is_new(Some((node, 1)));
        }
        assert_eq!(dedupe.nodes.len(), MAX_NODES);
        assert!(
            !dedupe.nodes.contains_key(&0),
            "node 0 was heard from longest ago"
        );
        assert!(!dedupe.is_new(Some((MAX_NODES as u64, 1))));
    }
}

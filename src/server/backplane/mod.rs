//! Where a message goes between the client that sent it and the dispatcher.
//!
//! A lone node ([`Backplane::Local`]) hands each tagged text straight to its dispatcher.
//!
//! In a fleet (`--redis`, [`Backplane::Redis`]) the room is one Redis Stream. A connection
//! thread hands the text to this node's writer, which adds it to the stream; the node's
//! reader reads the stream and hands every entry, this node's own among them, to the
//! dispatcher. The dispatcher never delivers a message before the stream has it, so every
//! node delivers one order, the stream's, and a join stays atomic on each node. See
//! [`redis`] for how the two connections survive Redis going away, and how a node notices
//! that Redis lost the room's history.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{SendTimeoutError, Sender, TrySendError};

use super::inbox::{Event, Events};
use super::metrics::Metrics;
use super::peer::PeerOutlet;
use crate::config::ServerConfig;
use crate::error::Result;
use crate::message;

mod entry;
mod redis;

pub(crate) use self::redis::Fleet;

/// Whether `url` can be used for `--redis`, checked before the server starts.
///
/// # Errors
/// What is wrong with it, in one line.
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    redis::client(url).map(drop).map_err(|e| e.to_string())
}

/// How often a connection thread waiting on a full writer queue notes that its client is
/// still there, so that keepalive does not take it for silent.
const STILL_WAITING: Duration = Duration::from_secs(1);

/// The connection threads' way into the room.
#[derive(Debug)]
pub(crate) enum Backplane {
    /// One node: straight to the dispatcher.
    Local,
    /// One of a fleet: through this node's writer to the Redis Stream.
    Redis {
        writer: Sender<String>,
        health: Arc<redis::Health>,
    },
}

/// The room is gone: the server is stopping.
#[derive(Debug)]
pub(crate) struct Stopped;

impl Backplane {
    /// The backplane `config` asks for, with the threads it runs (none when local).
    ///
    /// # Errors
    /// [`crate::Error::Redis`] when the Redis URL cannot be used, [`crate::Error::Spawn`]
    /// when its threads cannot be started. Redis being unreachable is not an error: the
    /// node starts, says it is unhealthy, and keeps trying.
    pub(crate) fn start(
        config: &ServerConfig,
        events: &Events<PeerOutlet>,
        metrics: &Arc<Metrics>,
    ) -> Result<(Backplane, Option<Fleet>)> {
        let Some(redis) = &config.redis else {
            return Ok((Backplane::Local, None));
        };
        let (fleet, writer, health) = Fleet::start(redis, config, events.clone(), metrics)?;
        Ok((Backplane::Redis { writer, health }, Some(fleet)))
    }

    /// Send `text` from the client tagged `tag` to the room. In a fleet this waits while
    /// the writer's queue is full (Redis is slow or away), which slows the client down
    /// through TCP instead of dropping its message. `waiting(d)` is called before each
    /// second (`d`) of that wait: the client is not silent, only held up, and must count as
    /// heard until the wait is over, not just when it began.
    pub(crate) fn publish(
        &self,
        events: &Events<PeerOutlet>,
        tag: &str,
        text: &str,
        waiting: impl Fn(Duration),
    ) -> Result<(), Stopped> {
        match self {
            Backplane::Local => events
                .send(Event::Broadcast(message::text(tag, text)))
                .map_err(|_| Stopped),
            Backplane::Redis { writer, .. } => {
                let mut tagged = match writer.try_send(format!("{tag}{text}")) {
                    Ok(()) => return Ok(()),
                    Err(TrySendError::Full(back)) => back,
                    Err(TrySendError::Disconnected(_)) => return Err(Stopped),
                };
                loop {
                    waiting(STILL_WAITING);
                    match writer.send_timeout(tagged, STILL_WAITING) {
                        Ok(()) => return Ok(()),
                        Err(SendTimeoutError::Timeout(back)) => tagged = back,
                        Err(SendTimeoutError::Disconnected(_)) => return Err(Stopped),
                    }
                }
            }
        }
    }

    /// What keeps this node from serving the room, if anything: for `/healthz`.
    pub(crate) fn trouble(&self) -> Option<&'static str> {
        match self {
            Backplane::Local => None,
            Backplane::Redis { health, .. } => health.trouble(),
        }
    }
}

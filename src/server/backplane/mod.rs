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

use crossbeam_channel::Sender;

use super::inbox::{Event, Events};
use super::metrics::Metrics;
use super::peer::PeerOutlet;
use crate::config::ServerConfig;
use crate::error::Result;
use crate::message;

mod entry;
mod redis;

pub(crate) use self::redis::Fleet;

/// The connection threads' way into the room.
#[derive(Debug)]
pub(crate) enum Backplane {
    /// One node: straight to the dispatcher.
    Local,
    /// One of a fleet: through this node's writer to the Redis Stream.
    Redis {
        writer: Sender<String>,
        link: Arc<redis::Link>,
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
        let (fleet, writer, link) = Fleet::start(redis, config, events.clone(), metrics)?;
        Ok((Backplane::Redis { writer, link }, Some(fleet)))
    }

    /// Send `text` from the client tagged `tag` to the room. In a fleet this waits while
    /// the writer's queue is full (Redis is slow or away), which slows the client down
    /// through TCP instead of dropping its message.
    pub(crate) fn publish(
        &self,
        events: &Events<PeerOutlet>,
        tag: &str,
        text: &str,
    ) -> Result<(), Stopped> {
        match self {
            Backplane::Local => events
                .send(Event::Broadcast(message::text(tag, text)))
                .map_err(|_| Stopped),
            Backplane::Redis { writer, .. } => {
                writer.send(format!("{tag}{text}")).map_err(|_| Stopped)
            }
        }
    }

    /// What keeps this node from serving the room, if anything: for `/healthz`.
    pub(crate) fn trouble(&self) -> Option<&'static str> {
        match self {
            Backplane::Local => None,
            Backplane::Redis { link, .. } => link.trouble(),
        }
    }
}

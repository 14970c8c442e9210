//! The process's open-file limit, which bounds how many clients the server can hold.

use log::{debug, warn};
use rlimit::Resource;

use super::thread_cap;
use crate::config::ServerConfig;

/// Descriptors the server needs besides its connections: the listener, stdio, and room for
/// a few more.
const RESERVED_FDS: u64 = 32;

/// Raise the soft open-file limit to the hard limit, as Go and nginx do at start (the soft
/// limit is often 1024, far below what `--max-clients` needs), and warn, with what to do,
/// when even the hard limit cannot hold `config.max_clients` clients and their handshakes.
/// Each connection costs one descriptor.
pub fn raise_open_file_limit(config: &ServerConfig) {
    let (soft, hard) = match rlimit::getrlimit(Resource::NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            debug!("cannot read the open-file limit: {e}");
            return;
        }
    };
    let mut limit = soft;
    if soft < hard {
        match rlimit::setrlimit(Resource::NOFILE, hard, hard) {
            Ok(()) => {
                debug!("raised the open-file limit from {soft} to {hard}");
                limit = hard;
            }
            Err(e) => debug!("cannot raise the open-file limit from {soft} to {hard}: {e}"),
        }
    }
    let needed = (thread_cap(config) as u64).saturating_add(RESERVED_FDS);
    if limit < needed {
        warn!(
            "the open-file limit is {limit}, but --max-clients {} with --max-pending {} needs \
             about {needed}: connections past about {} will be refused. Raise the limit \
             (ulimit -n {needed}, or LimitNOFILE={needed} under systemd) or lower --max-clients",
            config.max_clients,
            config.max_pending,
            limit.saturating_sub(RESERVED_FDS)
        );
    }
}

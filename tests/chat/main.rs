//! Black-box tests: real servers on 127.0.0.1 port 0, real sockets, the real binaries.
//! Every wait has a deadline (see `support::WAIT`), so a failure fails instead of hanging.

mod support;

// One client joins, speaks and hears itself.
mod smoke;
// Fan-out: tags, global order, history and joins.
mod broadcast;
// RFC 6455: close codes, pings, fragments, raw protocol violations.
mod protocol;
// Slow readers, keepalive, handshake deadlines and client limits.
mod limits;
// Hostile clients: aborted handshakes, idle connections, other origins, floods, non-readers.
mod hostile;
// Plain HTTP requests: the page, and every refusal.
mod http;
// Shutdown, signals, and the threads and descriptors a server holds.
mod lifecycle;
// The server binary's options and logs.
mod server_cli;
// The client binary, driven through its stdin.
mod client_cli;
// The client against servers that misbehave, down to the bytes.
mod client_hostile;
// A WebSocket server that behaves unlike ours, for the client's tests.
mod fake;
// The interactive client in a real terminal (tmux).
mod terminal;
// The chat page in headless Chromium.
mod browser;
// Several nodes, one room, on a real redis-server.
mod fleet;
// wss:// and https://: certificates made at test time, refusals, deadline, reload.
mod tls;

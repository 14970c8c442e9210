//! Shared fixtures: servers on port 0, WebSocket and raw-socket clients whose every wait
//! has a deadline, and child processes that are killed if a test fails.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use broadcast_chat::{Server, ServerConfig, WELCOME};
use crossbeam_channel::Receiver;
use tungstenite::protocol::WebSocket;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, Utf8Bytes};

/// The longest any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// A server on a free loopback port.
pub fn server(config: ServerConfig) -> Server {
    let config = config.bind("127.0.0.1:0".parse().expect("address"));
    Server::with_config(config).expect("server starts")
}

pub fn default_server() -> Server {
    server(ServerConfig::default())
}

/// A server with flood control off (`--rate 0`), for tests that send as fast as they can.
pub fn unthrottled(config: ServerConfig) -> Server {
    server(config.rate(0))
}

pub type Ws = WebSocket<TcpStream>;

/// A WebSocket client whose reads give up after [`WAIT`].
pub fn connect(addr: SocketAddr) -> Ws {
    try_connect(addr).unwrap_or_else(|status| panic!("the handshake was refused: {status}"))
}

/// As [`connect`], or the HTTP status the server refused the handshake with.
pub fn try_connect(addr: SocketAddr) -> Result<Ws, u16> {
    let stream = TcpStream::connect(addr).expect("tcp connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    stream.set_nodelay(true).expect("nodelay");
    match tungstenite::client(format!("ws://{addr}/"), stream) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(answer))) => {
            Err(answer.status().as_u16())
        }
        Err(e) => panic!("handshake: {e}"),
    }
}

/// Connect and read the welcome; returns the client and its own address as the server
/// tags it.
pub fn join(addr: SocketAddr) -> (Ws, String) {
    welcomed(connect(addr))
}

/// As [`join`], or the HTTP status the server refused the handshake with.
pub fn try_join(addr: SocketAddr) -> Result<(Ws, String), u16> {
    try_connect(addr).map(welcomed)
}

/// As [`join`], from the loopback address `source` (127.0.0.2, say).
pub fn join_from(source: &str, addr: SocketAddr) -> (Ws, String) {
    let stream = tcp_from(source, addr);
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let (ws, _) = tungstenite::client(format!("ws://{addr}/"), stream).expect("handshake");
    welcomed(ws)
}

fn welcomed(mut ws: Ws) -> (Ws, String) {
    assert_eq!(recv_text(&mut ws), WELCOME);
    let local = ws.get_ref().local_addr().expect("local addr");
    (ws, local.to_string())
}

/// The next text message, skipping pings and pongs.
pub fn recv_text<S: Read + Write>(ws: &mut WebSocket<S>) -> String {
    loop {
        match ws.read().expect("a message before the deadline") {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// Read until the server's close frame; returns its code and reason, and every text that
/// came before it.
pub fn recv_until_close<S: Read + Write>(ws: &mut WebSocket<S>) -> (u16, String, Vec<String>) {
    let mut texts = Vec::new();
    loop {
        match ws.read().expect("a close before the deadline") {
            Message::Text(t) => texts.push(t.to_string()),
            Message::Close(Some(frame)) => {
                return (frame.code.into(), frame.reason.to_string(), texts);
            }
            Message::Close(None) => return (1005, String::new(), texts),
            _ => {}
        }
    }
}

pub fn send<S: Read + Write>(ws: &mut WebSocket<S>, text: &str) {
    ws.send(Message::Text(Utf8Bytes::from(text))).expect("send");
}

pub fn close(ws: &mut Ws, code: CloseCode) {
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code,
        reason: "".into(),
    }))
    .expect("send close");
}

/// Poll `condition` until it holds or [`WAIT`] passes; for states that raise no event,
/// such as a count the kernel keeps.
pub fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(ms(10));
    }
}

/// Send `request` and read the whole answer: its status line, head and body.
pub fn ask(addr: SocketAddr, request: &[u8]) -> (String, String, String) {
    let mut raw = Raw::connect(addr);
    raw.write(request);
    let head = raw.read_head();
    let body = String::from_utf8_lossy(&raw.read_to_end()).into_owned();
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, head, body)
}

/// `GET path`: the status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _, body) = ask(addr, request.as_bytes());
    let code = status
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {status:?}"));
    (code, body)
}

/// A raw TCP client for what a WebSocket library would refuse to send.
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn from_stream(stream: TcpStream) -> Raw {
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn connect(addr: SocketAddr) -> Raw {
        Raw::from_stream(TcpStream::connect(addr).expect("tcp connect"))
    }

    /// Connect and complete a WebSocket handshake by hand, then read the welcome.
    pub fn join(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect(addr);
        raw.handshake();
        raw
    }

    pub fn handshake_request(&mut self) {
        self.write(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
    }

    /// Send the upgrade request, expect 101, then the welcome.
    pub fn handshake(&mut self) {
        self.handshake_request();
        let head = self.read_head();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "handshake accepted: {head}"
        );
        let (opcode, payload) = self.read_frame();
        assert_eq!((opcode, payload.as_slice()), (1, WELCOME.as_bytes()));
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Send one frame, masked as a client must unless `mask` is `None`.
    pub fn frame(&mut self, first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) {
        let mut out = vec![first_byte];
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n @ 0..=125 => out.push(mask_bit | n as u8),
            n @ 126..=0xFFFF => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        self.write(&out);
    }

    /// Send one masked frame.
    pub fn masked(&mut self, first_byte: u8, payload: &[u8]) {
        self.frame(first_byte, payload, Some([0x12, 0x34, 0x56, 0x78]));
    }

    fn fill(&mut self, n: usize) {
        while self.buf.len() < n {
            let mut chunk = [0u8; 4096];
            let read = self
                .stream
                .read(&mut chunk)
                .expect("data before the deadline");
            assert!(read > 0, "connection closed while {n} bytes were expected");
            self.buf.extend_from_slice(&chunk[..read]);
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        self.fill(n);
        self.buf.drain(..n).collect()
    }

    /// The HTTP response head, up to the blank line.
    pub fn read_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = self.take(end + 4);
                return String::from_utf8_lossy(&head).into_owned();
            }
            let have = self.buf.len();
            self.fill(have + 1);
        }
    }

    /// Everything until the server closes the connection.
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut rest = std::mem::take(&mut self.buf);
        self.stream.read_to_end(&mut rest).expect("read to the end");
        rest
    }

    /// One server frame: its opcode and payload. Asserts it is unmasked and final.
    pub fn read_frame(&mut self) -> (u8, Vec<u8>) {
        let head = self.take(2);
        assert_eq!(head[0] & 0x80, 0x80, "server frames are final");
        assert_eq!(head[1] & 0x80, 0, "server frames are unmasked");
        let len = match head[1] & 0x7F {
            126 => u16::from_be_bytes(self.take(2).try_into().expect("2 bytes")) as usize,
            127 => u64::from_be_bytes(self.take(8).try_into().expect("8 bytes")) as usize,
            n => n as usize,
        };
        (head[0] & 0x0F, self.take(len))
    }

    /// Skip frames until a close; returns its code (1005 if it had none).
    pub fn read_close(&mut self) -> u16 {
        loop {
            let (opcode, payload) = self.read_frame();
            if opcode == 8 {
                return match payload.get(..2) {
                    Some(code) => u16::from_be_bytes([code[0], code[1]]),
                    None => 1005,
                };
            }
        }
    }

    /// Whether the server has closed the TCP connection (reads end) within [`WAIT`].
    pub fn closed_by_server(&mut self) -> bool {
        let mut sink = [0u8; 4096];
        loop {
            match self.stream.read(&mut sink) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    }
}

/// A TCP connection to `addr` with a tiny receive buffer, so that not reading fills it
/// within a few kilobytes.
pub fn small_window(addr: SocketAddr) -> TcpStream {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    socket.connect(&addr.into()).expect("connect");
    socket.into()
}

/// A raw client with a tiny receive buffer, so that not reading fills up fast.
pub fn stalled_client(addr: SocketAddr) -> Raw {
    let mut raw = Raw::from_stream(small_window(addr));
    raw.handshake();
    raw
}

/// Send `name` (TERM, INT, STOP …) to process `pid`.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Send `count` messages of `size` bytes from `sender`, each heard back before the next,
/// and return the lines as every client receives them.
pub fn flood(sender: &mut Ws, tag: &str, count: usize, size: usize) -> Vec<String> {
    let payload = "z".repeat(size);
    (0..count)
        .map(|i| {
            let line = format!("{tag}: {i} {payload}");
            send(sender, &format!("{i} {payload}"));
            assert_eq!(recv_text(sender), line, "the sender hears itself at once");
            line
        })
        .collect()
}

/// A child process that is killed when dropped, so a failing test leaves nothing behind.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(command: &mut Command) -> Proc {
        Proc {
            child: command.spawn().expect("spawn"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait for the process to exit, at most [`WAIT`].
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process {} did not exit in time",
                self.pid()
            );
            thread::sleep(ms(10));
        }
    }

    /// Wait for the exit, then collect what the process wrote to its piped outputs.
    pub fn output(mut self) -> Output {
        let status = self.wait();
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let Some(mut pipe) = self.child.stdout.take() {
            pipe.read_to_end(&mut stdout).expect("read stdout");
        }
        if let Some(mut pipe) = self.child.stderr.take() {
            pipe.read_to_end(&mut stderr).expect("read stderr");
        }
        Output {
            status,
            stdout,
            stderr,
        }
    }

    pub fn signal(&self, name: &str) {
        signal(self.pid(), name);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The server binary on a free port, with its stderr lines delivered on a channel.
pub struct ServerProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub log: Receiver<String>,
    /// What the server logged up to the line that says where it listens.
    early: Vec<String>,
}

impl ServerProc {
    pub fn start(args: &[&str]) -> ServerProc {
        Self::start_with(Command::new(env!("CARGO_BIN_EXE_server")).args(args))
    }

    /// Start `command`, which runs the server binary with `--bind` left to the caller or
    /// defaulted to a free port here.
    pub fn start_with(command: &mut Command) -> ServerProc {
        let has_bind = command.get_args().any(|a| a == "--bind");
        if !has_bind {
            command.args(["--bind", "127.0.0.1:0"]);
        }
        let mut proc = Proc::spawn(command.stdin(Stdio::null()).stderr(Stdio::piped()));
        let log = lines(proc.child.stderr.take().expect("stderr"));
        let deadline = Instant::now() + WAIT;
        let mut early = Vec::new();
        let addr = loop {
            let line = log
                .recv_deadline(deadline)
                .expect("server logs its address");
            let url = line.split_once("listening on ").map(|(_, url)| url.trim());
            if let Some(addr) = url.and_then(|u| u.split_once("://")).map(|(_, a)| a) {
                let addr = addr.parse().expect("addr");
                early.push(line);
                break addr;
            }
            early.push(line);
        };
        ServerProc {
            proc,
            addr,
            log,
            early,
        }
    }

    /// The lines logged since the start, up to the one containing `needle`, less those
    /// [`expect_log`](Self::expect_log) has taken already.
    pub fn log_until(&self, needle: &str) -> Vec<String> {
        if let Some(at) = self.early.iter().position(|l| l.contains(needle)) {
            return self.early[..=at].to_vec();
        }
        let deadline = Instant::now() + WAIT;
        let mut lines = self.early.clone();
        while !lines.last().is_some_and(|l| l.contains(needle)) {
            match self.log.recv_deadline(deadline) {
                Ok(line) => lines.push(line),
                Err(_) => panic!("no log line containing {needle:?} in {lines:?}"),
            }
        }
        lines
    }

    /// Wait for a log line containing `needle`; returns it.
    pub fn expect_log(&self, needle: &str) -> String {
        if let Some(line) = self.early.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match self.log.recv_deadline(deadline) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line containing {needle:?}"),
            }
        }
    }
}

/// The lines of `stderr`, read on a thread that ends with the stream.
pub fn lines(output: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = crossbeam_channel::unbounded();
    thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// How many threads process `pid` has, from /proc. Fails the test if /proc cannot be read,
/// so that comparing two counts can never pass because both are unknown.
pub fn threads_of(pid: u32) -> usize {
    count_entries(&format!("/proc/{pid}/task"))
}

/// The threads of process `pid` (`self` for the test's own): each one's name and the path
/// of its stat(5) file, for [`policy`]. Empty once the process is gone.
pub fn threads(pid: &str) -> Vec<(String, String)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|task| {
            let path = task.ok()?.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            let stat = path.join("stat").to_string_lossy().into_owned();
            Some((name.trim_end().to_string(), stat))
        })
        .collect()
}

/// How many file descriptors process `pid` holds, from /proc; fails if it cannot be read.
pub fn fds_of(pid: u32) -> usize {
    count_entries(&format!("/proc/{pid}/fd"))
}

fn count_entries(dir: &str) -> usize {
    let count = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {dir}: {e}"))
        .count();
    assert!(count > 0, "{dir} is empty");
    count
}

/// A TCP connection to `addr` from the loopback address `source` (127.0.0.2, say), to
/// stand for a client on another host.
pub fn tcp_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let from: SocketAddr = format!("{source}:0").parse().expect("source address");
    socket.bind(&from.into()).expect("bind the source address");
    socket.connect(&addr.into()).expect("connect");
    socket.into()
}

/// The client binary against `url`, its three streams piped.
pub fn client(url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_client"));
    command
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::piped());
    command
}

/// The client with `args` and `input` on its stdin, against `url`.
pub fn run_client_with(url: &str, args: &[&str], input: &str) -> Output {
    let mut command = client(url);
    command.args(args);
    let input = input.to_owned();
    fed(&mut command, move |stdin| {
        // The client may have finished before it read it all: that is for the test to
        // judge.
        let _ = stdin.write_all(input.as_bytes());
    })
}

/// Run `command` with `feed` writing its stdin on a thread of its own, so that a process
/// that stops reading cannot hold the test past [`WAIT`]; stdin is closed when `feed`
/// returns. The feeding thread ends when the process does, at the latest, and is joined.
pub fn fed(command: &mut Command, feed: impl FnOnce(&mut ChildStdin) + Send + 'static) -> Output {
    let mut proc = Proc::spawn(command);
    let mut stdin = proc.child.stdin.take().expect("stdin");
    let feeding = thread::spawn(move || feed(&mut stdin));
    let output = proc.output();
    feeding.join().expect("the feeding thread");
    output
}

/// The next line of `output`, read on a thread so that the wait has a bound ([`WAIT`]);
/// `output` comes back for the test to go on reading or to close.
pub fn line_within<R: BufRead + Send + 'static>(mut output: R) -> (R, String) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let mut line = String::new();
        let read = output.read_line(&mut line);
        let _ = tx.send((output, line, read.is_ok()));
    });
    let (output, line, ok) = rx.recv_timeout(WAIT).expect("a line before the deadline");
    assert!(ok, "the line could be read");
    (output, line)
}

/// The scheduling policy in the stat(5) file at `path`: field 41, counted after the
/// command name, which may hold spaces and parentheses.
pub fn policy(path: &str) -> Option<String> {
    let stat = std::fs::read_to_string(path).ok()?;
    let (_, tail) = stat.rsplit_once(") ")?;
    // `tail` starts at field 3.
    Some(tail.split(' ').nth(41 - 3)?.to_string())
}

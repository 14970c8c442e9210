//! A minimal blocking WebSocket client for load: hand-rolled frames, so that the harness
//! spends as little CPU per delivery as it can and measures the server, not itself. Over
//! TLS (rustls, as the product), with one connection state per socket and no extra thread.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConnection;
use rustls::pki_types::ServerName;

/// How to reach a server over TLS: the client configuration that trusts its CA.
pub type Tls = Arc<rustls::ClientConfig>;

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// One client connection. The stream is shared so one thread can send while another reads
/// (over plaintext only: a TLS connection sends with [`Conn::send`]).
pub struct Conn {
    pub stream: Arc<TcpStream>,
    tls: Option<Box<ClientConnection>>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// A frame read from the server.
pub struct Frame<'a> {
    pub opcode: u8,
    pub payload: &'a [u8],
}

impl Conn {
    /// Connect (with TLS if `tls`), complete the handshake and read the first message
    /// (the welcome).
    pub fn open(addr: SocketAddr, timeout: Duration, tls: Option<&Tls>) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let tls = match tls {
            Some(config) => {
                let name = ServerName::try_from("localhost").expect("a server name");
                let mut conn =
                    ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
                while conn.is_handshaking() {
                    conn.complete_io(&mut &stream)?;
                }
                Some(Box::new(conn))
            }
            None => None,
        };
        let mut conn = Conn {
            stream: Arc::new(stream),
            tls,
            buf: vec![0; 4096],
            start: 0,
            end: 0,
        };
        conn.write(request(addr).as_bytes())?;
        conn.welcomed()
    }

    /// A connection whose handshake another loop ran: `received` is what it read so far,
    /// at least the response's head. `stream` must be blocking.
    pub fn adopt(stream: TcpStream, received: &[u8], timeout: Duration) -> io::Result<Conn> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut buf = received.to_vec();
        buf.resize(buf.len().max(4096), 0);
        let conn = Conn {
            stream: Arc::new(stream),
            tls: None,
            buf,
            start: 0,
            end: received.len(),
        };
        conn.welcomed()
    }

    /// Read the response's head and the welcome.
    fn welcomed(mut self) -> io::Result<Conn> {
        self.read_head()?;
        let frame = self.read_frame()?;
        if frame.opcode != 1 {
            return Err(io::Error::other("expected the welcome text"));
        }
        Ok(self)
    }

    fn read_head(&mut self) -> io::Result<()> {
        loop {
            let data = &self.buf[self.start..self.end];
            if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                if !data.starts_with(b"HTTP/1.1 101") {
                    let line = String::from_utf8_lossy(&data[..at.min(60)]).into_owned();
                    return Err(io::Error::other(format!("handshake refused: {line}")));
                }
                self.start += at + 4;
                return Ok(());
            }
            self.fill()?;
        }
    }

    /// Read more bytes; grows the buffer only for frames that do not fit.
    fn fill(&mut self) -> io::Result<()> {
        if self.start > 0 && self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.read(self.end)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    /// Read into the buffer from `at`, through TLS if there is any.
    fn read(&mut self, at: usize) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return (&*self.stream).read(&mut self.buf[at..]);
        };
        loop {
            match tls.reader().read(&mut self.buf[at..]) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                result => return result,
            }
            if tls.read_tls(&mut &*self.stream)? == 0 {
                return Ok(0);
            }
            tls.process_new_packets().map_err(io::Error::other)?;
        }
    }

    /// Write all of `bytes`, through TLS if there is any.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(tls) = &mut self.tls else {
            return (&*self.stream).write_all(bytes);
        };
        tls.writer().write_all(bytes)?;
        while tls.wants_write() {
            tls.write_tls(&mut &*self.stream)?;
        }
        Ok(())
    }

    /// Send one masked frame.
    pub fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.write(&frame(opcode, payload))
    }

    fn need(&mut self, n: usize) -> io::Result<()> {
        while self.end - self.start < n {
            if self.start + n > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if n > self.buf.len() {
                    self.buf.resize(n.next_power_of_two(), 0);
                }
            }
            self.fill()?;
        }
        Ok(())
    }

    /// The next frame; pings are answered on the spot.
    pub fn read_frame(&mut self) -> io::Result<Frame<'_>> {
        loop {
            self.need(2)?;
            let (b0, b1) = (self.buf[self.start], self.buf[self.start + 1]);
            let (header, len) = match b1 & 0x7f {
                126 => {
                    self.need(4)?;
                    let s = self.start;
                    (
                        4,
                        u16::from_be_bytes([self.buf[s + 2], self.buf[s + 3]]) as usize,
                    )
                }
                127 => {
                    self.need(10)?;
                    let s = self.start + 2;
                    let bytes: [u8; 8] = self.buf[s..s + 8].try_into().expect("8 bytes");
                    (10, u64::from_be_bytes(bytes) as usize)
                }
                n => (2, n as usize),
            };
            self.need(header + len)?;
            let begin = self.start + header;
            self.start = begin + len;
            let opcode = b0 & 0x0f;
            if opcode == 9 {
                let payload = self.buf[begin..begin + len].to_vec();
                self.send(0xA, &payload)?;
                continue;
            }
            return Ok(Frame {
                opcode,
                payload: &self.buf[begin..begin + len],
            });
        }
    }

    /// Send our close and read until the server's answer and the end of the connection.
    pub fn close(mut self) -> io::Result<()> {
        self.send(8, &1000u16.to_be_bytes())?;
        loop {
            match self.read_frame() {
                Ok(frame) if frame.opcode == 8 => break,
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        loop {
            self.start = 0;
            match self.read(0) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// The WebSocket upgrade request the harness sends.
pub fn request(addr: SocketAddr) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Write one masked client frame.
pub fn send_frame(stream: &TcpStream, opcode: u8, payload: &[u8]) -> io::Result<()> {
    let mut stream = stream;
    stream.write_all(&frame(opcode, payload))
}

/// One masked client frame.
pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// The text after the sender's tag: "127.0.0.1:5: text" gives "text".
pub fn untag(payload: &[u8]) -> &[u8] {
    // Tags end in ": " after the port; texts in this harness never contain ": ".
    match payload.windows(2).position(|w| w == b": ") {
        Some(at) => &payload[at + 2..],
        None => payload,
    }
}

//! TLS: the client and the server over `wss://`, refusals of the wrong protocol, the
//! handshake deadline, and a certificate reloaded on SIGHUP. Every certificate is made
//! here, at test time, by a CA of the test's own (rcgen).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use broadcast_chat::{Server, ServerConfig, TlsFiles, WELCOME};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConnection, RootCertStore, StreamOwned};
use tungstenite::WebSocket;

use crate::support::*;

/// A CA and a server certificate it signed for `localhost` and 127.0.0.1, as PEM files in
/// a directory of the test's own, removed when dropped.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The server certificate, to compare with what a server presents.
    pub der: CertificateDer<'static>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "broadcast-chat-tls-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the certificates");
        let pki = Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            der: CertificateDer::from(Vec::new()),
            dir,
        };
        pki.issue(name)
    }

    /// A new CA and a new server certificate from it, written over the old files.
    pub fn issue(mut self, name: &str) -> Pki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("test CA {name}"));
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server params");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        std::fs::write(&self.ca, ca_cert.pem()).expect("write ca.pem");
        std::fs::write(&self.cert, cert.pem()).expect("write cert.pem");
        std::fs::write(&self.key, key.serialize_pem()).expect("write key.pem");
        self.der = cert.der().clone();
        self
    }

    pub fn files(&self) -> TlsFiles {
        TlsFiles::new(&self.cert, &self.key)
    }

    pub fn server_args(&self) -> [&str; 4] {
        let cert = self.cert.to_str().expect("a UTF-8 path");
        let key = self.key.to_str().expect("a UTF-8 path");
        ["--tls-cert", cert, "--tls-key", key]
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server with `config`, speaking TLS with `pki`'s certificate.
pub fn tls_server(pki: &Pki, config: ServerConfig) -> Server {
    server(config.tls(Some(pki.files())))
}

type TlsWs = WebSocket<StreamOwned<ClientConnection, TcpStream>>;

/// A WebSocket over TLS that trusts the CA in `ca`, and the certificate the server showed.
fn wss(addr: SocketAddr, ca: &Path) -> (TlsWs, CertificateDer<'static>) {
    wss_on(TcpStream::connect(addr).expect("connect"), ca)
}

/// The TLS configuration of a client that trusts the CA in `ca`.
fn trusting(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read ca.pem") {
        roots
            .add(cert.expect("a PEM certificate"))
            .expect("a CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

/// The TLS handshake on `sock`, trusting the CA in `ca`.
fn tls_on(sock: TcpStream, ca: &Path) -> StreamOwned<ClientConnection, TcpStream> {
    let name = ServerName::try_from("localhost").expect("name");
    let conn = ClientConnection::new(trusting(ca), name).expect("a TLS client");
    sock.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("the TLS handshake");
    }
    stream
}

/// A WebSocket over TLS on `sock`, as [`wss`].
fn wss_on(sock: TcpStream, ca: &Path) -> (TlsWs, CertificateDer<'static>) {
    let addr = sock.peer_addr().expect("peer");
    let stream = tls_on(sock, ca);
    let shown = stream
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server shows a certificate")
        .clone()
        .into_owned();
    let (mut ws, _) = tungstenite::client(format!("wss://localhost:{}/", addr.port()), stream)
        .expect("the WebSocket handshake over TLS");
    assert_eq!(recv_text(&mut ws), WELCOME);
    (ws, shown)
}

/// Send `text` and read until it comes back; returns it as the server tagged it.
fn say(ws: &mut TlsWs, text: &str) -> String {
    send(ws, text);
    loop {
        let line = recv_text(ws);
        if line.ends_with(&format!(": {text}")) {
            return line;
        }
    }
}

#[test]
fn the_client_with_ca_chats_with_a_tls_server() {
    let pki = Pki::new("chat");
    let server = tls_server(&pki, ServerConfig::default());
    let (mut other, _) = wss(server.local_addr(), &pki.ca);
    let url = format!("wss://localhost:{}", server.local_addr().port());
    let ca = pki.ca.to_string_lossy().into_owned();
    let output = run_client_with(&url, &["--ca", &ca], "hello over tls\n");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with(WELCOME), "{stdout}");
    assert!(stdout.contains(": hello over tls"), "{stdout}");
    let heard = recv_text(&mut other);
    assert!(heard.ends_with(": hello over tls"), "{heard}");
    // Both directions, over the same connection, from a TLS client of another make.
    assert!(say(&mut other, "and back").starts_with("127.0.0.1:"));
}

#[test]
fn without_its_ca_the_client_says_the_certificate_is_not_trusted_and_what_to_do() {
    let pki = Pki::new("untrusted");
    let server = tls_server(&pki, ServerConfig::default());
    let url = format!("wss://localhost:{}", server.local_addr().port());
    let output = run_client_with(&url, &[], "never sent\n");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "certificate for 'localhost' is not trusted; pass --ca FILE if it comes from your own CA"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    // With the wrong CA, it names the file; with --insecure, it connects and warns.
    let other = Pki::new("other");
    let wrong = other.ca.to_string_lossy().into_owned();
    let output = run_client_with(&url, &["--ca", &wrong], "");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(stderr.contains("is not signed by a CA in"), "{stderr}");
    let output = run_client_with(&url, &["--insecure"], "insecure\n");
    assert!(output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains(": insecure"),
        "{output:?}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--insecure: the certificate"), "{stderr}");
}

#[test]
fn a_ca_file_that_cannot_be_used_is_a_bad_argument() {
    let pki = Pki::new("ca-file");
    std::fs::write(pki.dir.join("empty.pem"), "").expect("write");
    for (file, says) in [("missing.pem", "cannot read"), ("empty.pem", "holds no CA")] {
        let path = pki.dir.join(file).to_string_lossy().into_owned();
        let output = run_client_with("wss://localhost:1", &["--ca", &path], "");
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says) && stderr.contains(file), "{stderr}");
    }
}

#[test]
fn the_client_says_when_a_wss_url_reaches_a_plaintext_server() {
    let server = default_server();
    let url = format!("wss://localhost:{}", server.local_addr().port());
    let output = run_client_with(&url, &["--insecure"], "");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("use ws:// instead of wss://"), "{stderr}");
}

#[test]
fn plain_http_on_the_tls_port_and_tls_on_the_plain_port_are_refused_and_logged() {
    let pki = Pki::new("mixed");
    let tls = ServerProc::start(&pki.server_args());
    let (status, _, body) = ask(tls.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    assert!(body.contains("use https:// or wss://"), "{body}");
    tls.expect_log("spoke plain HTTP to this TLS port");

    let plain = ServerProc::start(&[]);
    let mut sock = TcpStream::connect(plain.addr).expect("connect");
    sock.set_read_timeout(Some(WAIT)).expect("timeout");
    // A ClientHello as long as a browser's with post-quantum key shares (1.8 KB): more than
    // the server's first read takes, so the server closes with part of it unread.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x07, 0x08, 0x01, 0x00, 0x07, 0x04, 0x03, 0x03,
    ];
    hello.resize(5 + 0x708, 0x2a);
    sock.write_all(&hello).expect("write");
    let mut answer = Vec::new();
    sock.read_to_end(&mut answer)
        .expect("the server answers and closes");
    assert_eq!(
        answer,
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28],
        "a fatal handshake_failure alert"
    );
    plain.expect_log("began a TLS handshake, but this port speaks plaintext");
}

#[test]
fn a_tls_handshake_that_stalls_is_cut_at_the_handshake_deadline() {
    let pki = Pki::new("stall");
    let server = tls_server(&pki, ServerConfig::default().handshake_timeout(ms(700)));
    // One client sends nothing; the other the first bytes of a ClientHello, then stops.
    // The deadlines start after `started`, so a slow test thread cannot shorten the cut.
    let started = Instant::now();
    let silent = TcpStream::connect(server.local_addr()).expect("connect");
    let mut partial = TcpStream::connect(server.local_addr()).expect("connect");
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01])
        .expect("write");
    for mut sock in [silent, partial] {
        sock.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut rest = Vec::new();
        let result = sock.read_to_end(&mut rest);
        assert!(
            result.is_ok()
                || result.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "the server closes the connection"
        );
    }
    // Cut at the 700 ms deadline: not before it, and long before the default 10 s.
    let cut = started.elapsed();
    assert!(
        cut >= ms(600) && cut < ms(5000),
        "cut at the deadline: {cut:?}"
    );
    // Meanwhile and after, a real TLS client is served.
    let (mut ws, _) = wss(server.local_addr(), &pki.ca);
    say(&mut ws, "still here");
}

#[test]
fn after_the_tls_handshake_a_request_trickled_in_a_record_is_cut_at_the_deadline() {
    let pki = Pki::new("trickle");
    let server = tls_server(&pki, ServerConfig::default().handshake_timeout(ms(700)));
    let started = Instant::now();
    let mut tls = tls_on(
        TcpStream::connect(server.local_addr()).expect("connect"),
        &pki.ca,
    );
    // An application-data record that announces 16 KiB, then a byte every 100 ms: never a
    // whole record, so never a byte of the HTTP request.
    tls.sock
        .write_all(&[0x17, 0x03, 0x03, 0x40, 0x00])
        .expect("the record header");
    let cut = loop {
        thread::sleep(ms(100));
        if tls.sock.write_all(&[0]).is_err() {
            break started.elapsed();
        }
        let mut probe = [0u8; 64];
        tls.sock.set_nonblocking(true).expect("nonblocking");
        let read = tls.sock.read(&mut probe);
        tls.sock.set_nonblocking(false).expect("blocking");
        // Session tickets may still arrive; the end of the stream or a reset is the cut.
        match read {
            Ok(0) => break started.elapsed(),
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => break started.elapsed(),
            _ => {}
        }
        assert!(started.elapsed() < WAIT, "the server never cut the trickle");
    };
    assert!(
        cut >= ms(600) && cut < ms(5000),
        "cut at the 700 ms deadline, not before and not at the default 10 s: {cut:?}"
    );
}

/// A TLS client of a server with `config` that does not read while another sends 300
/// messages of 16 KiB: once it reads, everything it was sent must decrypt, an unbroken
/// prefix up to the close. Returns the close's code and reason, and how many it got.
fn stalled_tls_client(label: &str, config: ServerConfig) -> (u16, String, usize) {
    const MESSAGES: usize = 300;
    let pki = Pki::new(label);
    let server = tls_server(&pki, config);
    let (mut stalled, _) = wss_on(small_window(server.local_addr()), &pki.ca);
    let (mut sender, _) = wss(server.local_addr(), &pki.ca);
    let big = "x".repeat(16 * 1024);
    for i in 0..MESSAGES {
        say(&mut sender, &format!("{i} {big}"));
    }
    let (code, reason, texts) = recv_until_close(&mut stalled);
    for (i, text) in texts.iter().enumerate() {
        assert!(
            text.ends_with(&format!(": {i} {big}")),
            "no gap before the close"
        );
    }
    assert!(texts.len() < MESSAGES, "cut off early ({})", texts.len());
    (code, reason, texts.len())
}

#[test]
fn a_tls_client_that_does_not_read_is_closed_with_1008_and_can_read_it() {
    // Reading what waits in the stalled client's socket takes a while: give it time.
    let config = ServerConfig::default()
        .queue(8)
        .rate(0)
        .close_timeout(WAIT * 3);
    let (code, reason, _) = stalled_tls_client("slow", config);
    assert_eq!(code, 1008);
    assert!(reason.contains("too slow"), "{reason}");
}

#[test]
fn tls_clients_behind_are_closed_once_their_backlogs_take_the_memory_allowed() {
    // A queue that never fills: only the memory for sealed backlogs can stop it.
    let config = ServerConfig::default()
        .queue(4096)
        .rate(0)
        .max_tls_backlog(256 * 1024)
        .close_timeout(WAIT * 3);
    let (code, reason, _) = stalled_tls_client("budget", config);
    assert_eq!((code, reason.as_str()), (1008, "too slow: fell behind"));
}

#[test]
fn sighup_loads_a_new_certificate_for_new_connections_and_old_ones_keep_chatting() {
    let pki = Pki::new("reload");
    let server = ServerProc::start(&pki.server_args());
    server.expect_log("listening on wss://");
    let (mut before, shown) = wss(server.addr, &pki.ca);
    assert_eq!(shown, pki.der);

    let pki = pki.issue("renewed");
    server.proc.signal("HUP");
    server.expect_log("SIGHUP: reloaded the TLS certificate and key");
    let (mut after, shown) = wss(server.addr, &pki.ca);
    assert_eq!(shown, pki.der, "a new connection gets the new certificate");
    say(&mut before, "from before the reload");
    say(&mut after, "from after it");
    assert!(recv_text(&mut before).ends_with(": from after it"));

    // A broken file is refused and logged; the certificate in use stays.
    std::fs::write(&pki.key, "not a key").expect("break the key");
    server.proc.signal("HUP");
    let line = server.expect_log("SIGHUP: cannot use");
    assert!(
        line.contains("still using the certificate loaded before"),
        "{line}"
    );
    let (mut third, shown) = wss(server.addr, &pki.ca);
    assert_eq!(shown, pki.der);
    say(&mut third, "after a bad reload");
}

#[test]
fn a_bad_certificate_or_key_stops_the_server_at_start_with_the_file_and_the_reason() {
    let pki = Pki::new("bad");
    let other = Pki::new("mismatch");
    std::fs::write(pki.dir.join("empty.pem"), "").expect("write");
    let cases = [
        (
            pki.dir.join("missing.pem"),
            pki.key.clone(),
            "cannot read it",
        ),
        (
            pki.dir.join("empty.pem"),
            pki.key.clone(),
            "it holds no certificate",
        ),
        (
            pki.cert.clone(),
            other.key.clone(),
            "it is not the key of the certificate",
        ),
    ];
    for (cert, key, says) in cases {
        let output = Proc::spawn(
            std::process::Command::new(env!("CARGO_BIN_EXE_server"))
                .args(["--bind", "127.0.0.1:0", "--tls-cert"])
                .arg(&cert)
                .arg("--tls-key")
                .arg(&key)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped()),
        )
        .output();
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{says}: {stderr}");
    }
}

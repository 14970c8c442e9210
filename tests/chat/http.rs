use broadcast_chat::ServerConfig;

use crate::support::*;

#[test]
fn a_plain_get_of_the_root_returns_the_chat_page() {
    let server = default_server();
    let (status, head, body) = ask(server.local_addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        head.contains("Content-Type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    assert!(body.contains("<title>broadcast-chat</title>"));
    assert!(
        !body.contains("http://") && !body.contains("https://"),
        "nothing from the internet"
    );
}

#[test]
fn unknown_paths_and_the_favicon_get_a_small_404() {
    let server = default_server();
    for path in ["/favicon.ico", "/nope", "/../etc/passwd"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let (status, _, body) = ask(server.local_addr(), request.as_bytes());
        assert_eq!(status, "HTTP/1.1 404 Not Found", "{path}");
        assert!(body.len() < 200, "{body}");
    }
}

#[test]
fn without_the_page_a_plain_get_is_told_to_upgrade() {
    let server = server(ServerConfig::default().web(false));
    let (status, head, _) = ask(server.local_addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 426 Upgrade Required");
    assert!(head.contains("Upgrade: websocket"));
}

#[test]
fn bad_requests_get_4xx_and_the_server_goes_on() {
    let server = default_server();
    let addr = server.local_addr();
    let many_headers: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let huge_header = format!("X-Big: {}\r\n", "a".repeat(9000));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "405"),
        (b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n".to_vec(), "400"),
        (b"\x00\x01\x02 garbage\r\n\r\n".to_vec(), "400"),
        (
            format!("GET / HTTP/1.1\r\n{many_headers}\r\n").into_bytes(),
            "431",
        ),
        (
            format!("GET / HTTP/1.1\r\n{huge_header}\r\n").into_bytes(),
            "431",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                .to_vec(),
            "400",
        ),
        (
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"
                .to_vec(),
            "426",
        ),
    ];
    for (request, code) in cases {
        let (status, _, _) = ask(addr, &request);
        assert!(
            status.starts_with(&format!("HTTP/1.1 {code}")),
            "{:?} got {status}",
            String::from_utf8_lossy(&request[..request.len().min(40)])
        );
    }
    let (mut ws, me) = join(addr);
    send(&mut ws, "unharmed");
    assert_eq!(recv_text(&mut ws), format!("{me}: unharmed"));
}

#[test]
fn a_websocket_upgrade_works_on_any_path() {
    let server = default_server();
    let stream = std::net::TcpStream::connect(server.local_addr()).expect("connect");
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    let url = format!("ws://{}/chat?room=1", server.local_addr());
    let (mut ws, _) = tungstenite::client(url, stream).expect("handshake");
    assert_eq!(recv_text(&mut ws), broadcast_chat::WELCOME);
}

#[test]
fn the_page_runs_only_its_own_script_and_styles_and_knows_the_size_limit() {
    let server = server(ServerConfig::default().max_message_size(1234));
    let addr = server.local_addr();
    let (_, head, body) = ask(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let csp = head
        .lines()
        .find(|l| l.starts_with("Content-Security-Policy:"))
        .expect("a policy");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("style-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(
        !body.contains("<script>") && !body.contains("<style>"),
        "nothing inline"
    );
    assert!(
        body.contains("data-max-bytes=\"1234\""),
        "the limit, in bytes"
    );
    for (path, kind) in [("/chat.js", "text/javascript"), ("/chat.css", "text/css")] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let (status, head, body) = ask(addr, request.as_bytes());
        assert_eq!(status, "HTTP/1.1 200 OK", "{path}");
        assert!(head.contains(&format!("Content-Type: {kind}")), "{head}");
        assert!(!body.is_empty());
    }
}

#[test]
fn healthz_says_ok_or_that_the_chat_is_full_even_without_the_page() {
    let server = server(ServerConfig::default().max_clients(1).web(false));
    let addr = server.local_addr();
    let health = || ask(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _, body) = health();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "ok: 0 of 1 clients\n");
    let (_occupant, _) = join(addr);
    let (status, _, body) = health();
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert!(body.contains("the chat is full (1 clients)"), "{body}");
}

use super::*;

fn parse<'h, 'b>(
    raw: &'b [u8],
    headers: &'h mut [httparse::Header<'b>],
) -> httparse::Request<'h, 'b> {
    let mut request = httparse::Request::new(headers);
    assert!(request.parse(raw).expect("parses").is_complete());
    request
}

const GOOD: &str = "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n\
    Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

#[test]
fn the_rfc_example_is_accepted_with_the_rfc_answer() {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let request = parse(GOOD.as_bytes(), &mut headers);
    let key = upgrade_key(&request).expect("valid");
    assert_eq!(derive_accept_key(key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn the_upgrade_answer_carries_the_welcome_right_after_its_head() {
    let answer = switching("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = response.parse(&answer).expect("parses") else {
        panic!("the head is incomplete");
    };
    assert_eq!(response.code, Some(101));
    let accept = response
        .headers
        .iter()
        .find(|h| h.name == "Sec-WebSocket-Accept");
    assert_eq!(
        accept.map(|h| h.value),
        Some(&b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="[..])
    );
    assert_eq!(&answer[len..], &message::welcome()[..]);
}

#[test]
fn a_request_may_have_32_header_lines_and_not_33() {
    let upgrade = |extra: usize| {
        let lines: String = (0..extra).map(|i| format!("X-H{i}: v\r\n")).collect();
        GOOD.replacen("Host: x\r\n", &format!("Host: x\r\n{lines}"), 1)
    };
    // GOOD has five header lines.
    let fits = upgrade(MAX_HEADERS - 5);
    assert!(matches!(
        reply(fits.as_bytes(), None, &Origins::default()),
        Reply::Upgrade { .. }
    ));
    for extra in [MAX_HEADERS - 4, HEADER_SLOTS, HEADER_SLOTS + 1] {
        let request = upgrade(extra);
        match reply(request.as_bytes(), None, &Origins::default()) {
            Reply::Respond(response) => assert_eq!(response.status, 431, "{extra} more"),
            other => panic!("{extra} more: {other:?}"),
        }
    }
    // Cut short: up to the parser's 40 slots it waits for the rest (and the 431 or the
    // deadline); past them it answers 431 at once.
    let cut = |extra: usize| upgrade(extra).trim_end_matches("\r\n").to_string();
    assert!(matches!(
        reply(cut(MAX_HEADERS - 4).as_bytes(), None, &Origins::default()),
        Reply::Incomplete
    ));
    match reply(cut(HEADER_SLOTS).as_bytes(), None, &Origins::default()) {
        Reply::Respond(response) => assert_eq!(response.status, 431),
        other => panic!("more than 40 header lines, cut short: {other:?}"),
    }
}

#[test]
fn each_missing_or_wrong_part_is_refused() {
    for (from, to, status) in [
        ("HTTP/1.1\r\nHost", "HTTP/1.0\r\nHost", 400),
        ("Upgrade: WebSocket", "Upgrade: h2c", 400),
        ("keep-alive, Upgrade", "keep-alive", 400),
        ("Version: 13", "Version: 8", 426),
        ("Sec-WebSocket-Version: 13\r\n", "", 400),
        ("jZQ==", "jZQ=", 400),
        ("jZQ==", "jZR==", 400),
        ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "", 400),
    ] {
        let raw = GOOD.replace(from, to);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let request = parse(raw.as_bytes(), &mut headers);
        assert_eq!(
            upgrade_key(&request).map_err(|e| e.0),
            Err(status),
            "{from} -> {to}"
        );
    }
}

mod properties {
    use super::*;
    use crate::config::ServerConfig;
    use proptest::prelude::*;

    fn site(web: bool) -> Option<Site> {
        Site::new(&ServerConfig::default().web(web))
    }

    /// Check that `bytes` is one well-formed HTTP/1.1 response: a status line with a known
    /// reason, header lines, a blank line, and exactly Content-Length bytes of body.
    fn assert_well_formed(bytes: &[u8]) {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a blank line ends the head");
        let head = std::str::from_utf8(&bytes[..end]).expect("an ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("a status line");
        let (version, rest) = status_line.split_once(' ').expect("version and status");
        let (code, text) = rest.split_once(' ').expect("status and reason");
        assert_eq!(version, "HTTP/1.1");
        let code: u16 = code.parse().expect("a numeric status");
        assert!((200..600).contains(&code), "{status_line}");
        assert_eq!(text, reason(code), "{status_line}");
        assert_ne!(
            text, "Error",
            "every status we send has its reason: {status_line}"
        );
        let mut length = None;
        for line in lines {
            let (name, value) = line.split_once(": ").expect("a header line");
            assert!(
                !name.is_empty() && !value.contains(['\r', '\n']),
                "{line:?}"
            );
            if name == "Content-Length" {
                length = Some(value.parse::<usize>().expect("a length"));
            }
        }
        assert_eq!(
            length,
            Some(bytes.len() - end - 4),
            "Content-Length is the body's"
        );
    }

    fn base64(bytes: &[u8]) -> String {
        const DIGITS: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n =
                chunk.iter().fold(0u32, |n, &b| n << 8 | u32::from(b)) << (8 * (3 - chunk.len()));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(DIGITS[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// Mixed-case spellings of a header name, as clients may send them.
    fn spelled(name: &'static str) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<bool>(), name.len()).prop_map(move |upper| {
            name.chars()
                .zip(upper)
                .map(|(c, u)| {
                    if u {
                        c.to_ascii_uppercase()
                    } else {
                        c.to_ascii_lowercase()
                    }
                })
                .collect()
        })
    }

    prop_compose! {
        /// A valid opening handshake: any path, any header case, extra headers in between,
        /// a random key, and sometimes the server's own Origin.
        fn upgrade_request()(
            path in "/[a-zA-Z0-9/._~%-]{0,40}",
            key in proptest::array::uniform16(any::<u8>()),
            names in (spelled("upgrade"), spelled("connection"), spelled("sec-websocket-key"),
                      spelled("sec-websocket-version"), spelled("host")),
            extra in proptest::collection::vec(("x-[a-z]{1,10}", "[ -~]{0,30}"), 0..8),
            with_origin in any::<bool>(),
            connection in prop_oneof![Just("Upgrade"), Just("keep-alive, Upgrade"), Just("upgrade")],
        ) -> (String, String) {
            let key = base64(&key);
            let (upgrade, conn, key_name, version, host) = names;
            let mut request = format!("GET {path} HTTP/1.1\r\n{host}: chat.example:8080\r\n");
            for (name, value) in &extra {
                request.push_str(&format!("{name}: {}\r\n", value.trim()));
            }
            if with_origin {
                request.push_str("Origin: http://chat.example:8080\r\n");
            }
            request.push_str(&format!(
                "{upgrade}: websocket\r\n{conn}: {connection}\r\n{key_name}: {key}\r\n\
                 {version}: 13\r\n\r\n"
            ));
            (request, key)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn arbitrary_bytes_never_panic_and_every_answer_is_well_formed(
            bytes in proptest::collection::vec(any::<u8>(), 0..MAX_HEAD + 100),
            web in any::<bool>(),
        ) {
            match reply(&bytes, site(web).as_ref(), &Origins::default()) {
                Reply::Incomplete => prop_assert!(bytes.len() < MAX_HEAD),
                Reply::Respond(response) => assert_well_formed(&response.to_bytes()),
                Reply::Upgrade { len, .. } => prop_assert!(len <= bytes.len()),
                Reply::Health | Reply::Metrics => {}
            }
        }

        #[test]
        fn request_like_input_never_panics_and_every_answer_is_well_formed(
            method in prop_oneof![
                Just("GET".to_string()),
                Just("POST".to_string()),
                Just("get".to_string()),
                "[A-Z]{1,8}"
            ],
            path in "[ -~]{0,60}",
            headers in proptest::collection::vec(("[!-9;-~]{1,20}", "[ -~]{0,40}"), 0..40),
            web in any::<bool>(),
        ) {
            let mut request = format!("{method} {path} HTTP/1.1\r\n");
            for (name, value) in &headers {
                request.push_str(&format!("{name}: {value}\r\n"));
            }
            request.push_str("\r\n");
            match reply(request.as_bytes(), site(web).as_ref(), &Origins::default()) {
                Reply::Incomplete => prop_assert!(request.len() < MAX_HEAD),
                Reply::Respond(response) => assert_well_formed(&response.to_bytes()),
                Reply::Upgrade { .. } | Reply::Health | Reply::Metrics => {}
            }
        }

        #[test]
        fn a_valid_upgrade_is_always_accepted_with_the_right_key(
            (request, key) in upgrade_request(),
            web in any::<bool>(),
        ) {
            match reply(request.as_bytes(), site(web).as_ref(), &Origins::default()) {
                Reply::Upgrade { accept, len } => {
                    prop_assert_eq!(accept, derive_accept_key(key.as_bytes()));
                    prop_assert_eq!(len, request.len());
                }
                other => prop_assert!(false, "refused: {:?}\n{}", other, request),
            }
        }

        #[test]
        fn a_valid_upgrade_cut_short_asks_for_more(
            (request, _key) in upgrade_request(),
            cut in any::<prop::sample::Index>(),
        ) {
            let short = &request.as_bytes()[..cut.index(request.len())];
            prop_assert!(matches!(reply(short, site(true).as_ref(), &Origins::default()), Reply::Incomplete));
        }

        #[test]
        fn a_foreign_origin_is_refused_with_403(
            (request, _key) in upgrade_request(),
            other in "[a-z]{1,12}\\.example",
        ) {
            let request = request.replacen("\r\n", &format!("\r\nOrigin: https://{other}\r\n"), 1);
            match reply(request.as_bytes(), site(true).as_ref(), &Origins::default()) {
                Reply::Respond(response) => {
                    prop_assert_eq!(response.status, 403);
                    assert_well_formed(&response.to_bytes());
                }
                other => prop_assert!(false, "not refused: {:?}", other),
            }
        }
    }
}

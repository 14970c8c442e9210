//! The chat page in a real headless Chromium (Debian's `chromium`), driven through the
//! DevTools protocol, next to a command-line-side tungstenite client.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use broadcast_chat::{Server, ServerConfig, WELCOME};
use headless_chrome::protocol::cdp::Emulation::SetDeviceMetricsOverride;
use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
use headless_chrome::{Browser, LaunchOptions, Tab};

use crate::support::*;
use crate::tls::{Pki, tls_server};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The browser to use, or `None` (and why, on stderr) to skip. Under `CI=true` a missing
/// browser fails the test: `.ci/run` installs it.
fn chromium() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("CHROMIUM").unwrap_or_else(|| CHROMIUM.into()));
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but there is no browser at {}; .ci/run installs Debian's chromium",
        path.display()
    );
    eprintln!(
        "browser test skipped: no Chromium at {} (apt-get install chromium, or set CHROMIUM)",
        path.display()
    );
    None
}

fn launch(path: &Path, extra: &[&str]) -> Browser {
    // headless_chrome adds --headless, --disable-gpu, --no-first-run,
    // --disable-background-networking, --disable-sync and a fresh user data dir itself.
    let options = LaunchOptions::default_builder()
        .path(Some(path.to_path_buf()))
        .headless(true)
        .sandbox(false)
        .window_size(Some((1000, 720)))
        .idle_browser_timeout(Duration::from_secs(120))
        .args(
            ["--disable-component-update", "--disable-quic"]
                .iter()
                .chain(extra)
                .map(OsStr::new)
                .collect(),
        )
        .build()
        .expect("launch options");
    Browser::new(options).expect("Chromium starts")
}

/// A fresh Chromium (with `extra` flags) showing `url`, loaded.
fn open(path: &Path, extra: &[&str], url: &str) -> (Browser, Arc<Tab>) {
    let browser = launch(path, extra);
    let tab = browser.new_tab().expect("tab");
    tab.navigate_to(url).expect("navigate");
    tab.wait_until_navigated().expect("loaded");
    (browser, tab)
}

/// Wait until the JavaScript `condition` is true in the page.
fn wait_for(tab: &Tab, what: &str, condition: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = tab.evaluate(condition, false).ok().and_then(|r| r.value);
        if value == Some(serde_json::Value::Bool(true)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {condition}"
        );
        thread::sleep(ms(20));
    }
}

/// A JavaScript string literal for `text`.
fn js(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// The JavaScript for "the page shows a message `text` from `from`".
fn shows(from: &str, text: &str) -> String {
    format!(
        "[...document.querySelectorAll('#log li')].some(li => li.dataset.from === {} && \
         li.querySelector('.text').textContent === {})",
        js(from),
        js(text)
    )
}

fn screenshot(tab: &Tab, name: &str) {
    let png = tab
        .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
        .expect("screenshot");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    std::fs::write(dir.join(name), png).expect("write screenshot");
    eprintln!("screenshot: {}", dir.join(name).display());
}

fn send_from_page(tab: &Tab, text: &str) {
    tab.wait_for_element("#text")
        .expect("the text box")
        .click()
        .expect("focus");
    tab.type_str(text).expect("type");
    tab.press_key("Enter").expect("Enter");
}

#[test]
fn the_page_chats_with_terminal_clients_and_reconnects_after_a_restart() {
    let Some(chromium) = chromium() else { return };
    let server = default_server();
    let addr = server.local_addr();
    let (_browser, tab) = open(&chromium, &[], &format!("http://{addr}/"));

    wait_for(
        &tab,
        "the welcome",
        &format!(
            "document.querySelector('#log li.system')?.textContent === {}",
            js(WELCOME)
        ),
    );
    wait_for(
        &tab,
        "connected",
        "document.getElementById('status').dataset.state === 'connected'",
    );
    wait_for(
        &tab,
        "labels and a live region",
        "document.querySelector('label[for=text]') !== null && \
         document.getElementById('log').getAttribute('aria-live') === 'polite'",
    );
    let (mut terminal, terminal_tag) = join(addr);

    // Typed in the page and sent with Enter: the terminal gets it with the page's tag, and
    // the page marks it as its own.
    send_from_page(&tab, "hello from the browser");
    let line = recv_text(&mut terminal);
    let (page_tag, text) = line.split_once(": ").expect("tagged");
    assert_eq!(text, "hello from the browser");
    assert!(page_tag.starts_with("127.0.0.1:"), "{page_tag}");
    wait_for(
        &tab,
        "the page's own message",
        &shows(page_tag, "hello from the browser"),
    );
    wait_for(
        &tab,
        "it to be marked as the page's",
        &format!(
            "document.querySelector('#log li.mine')?.dataset.from === {}",
            js(page_tag)
        ),
    );
    wait_for(
        &tab,
        "the box to be cleared",
        "document.getElementById('text').value === ''",
    );

    // An empty box is not sent: the next thing the terminal hears is the next real message.
    tab.press_key("Enter").expect("Enter on an empty box");
    send_from_page(&tab, "after an empty Enter");
    assert_eq!(
        recv_text(&mut terminal),
        format!("{page_tag}: after an empty Enter")
    );

    // From the terminal to the page, and markup shown as text.
    send(&mut terminal, "hello from the terminal");
    wait_for(
        &tab,
        "the terminal's message",
        &shows(&terminal_tag, "hello from the terminal"),
    );
    let injection = "<img src=x onerror=alert(1)>";
    send(&mut terminal, injection);
    wait_for(
        &tab,
        "the markup, as text",
        &shows(&terminal_tag, injection),
    );
    wait_for(
        &tab,
        "no element made from it",
        "document.querySelectorAll('#log img').length === 0",
    );
    screenshot(&tab, "chat-desktop.png");

    // A phone-sized viewport: nothing overflows sideways and the box and button are on screen.
    tab.call_method(SetDeviceMetricsOverride {
        width: 390,
        height: 760,
        device_scale_factor: 2.0,
        mobile: true,
        scale: None,
        screen_width: None,
        screen_height: None,
        position_x: None,
        position_y: None,
        dont_set_visible_size: None,
        screen_orientation: None,
        viewport: None,
        display_feature: None,
        device_posture: None,
    })
    .expect("phone viewport");
    wait_for(
        &tab,
        "a layout that fits a phone",
        "document.documentElement.scrollWidth <= window.innerWidth && \
         document.getElementById('button').getBoundingClientRect().right <= window.innerWidth && \
         document.getElementById('text').getBoundingClientRect().bottom <= window.innerHeight",
    );
    screenshot(&tab, "chat-phone.png");

    // Stop the server: the page shows why and reconnects once it is back on the same port.
    drop(terminal);
    server.shutdown().expect("clean shutdown");
    wait_for(
        &tab,
        "the close reason",
        "[...document.querySelectorAll('#log li.system')] \
            .some((li) => li.textContent.includes('1001: server shutting down'))",
    );
    let restarted = Server::with_config(ServerConfig::default().bind(addr)).expect("same port");
    wait_for(
        &tab,
        "reconnected",
        "document.getElementById('status').dataset.state === 'connected'",
    );
    let (mut terminal, terminal_tag) = join(restarted.local_addr());
    send(&mut terminal, "welcome back");
    wait_for(
        &tab,
        "a message after the restart",
        &shows(&terminal_tag, "welcome back"),
    );
}

#[test]
fn over_https_the_page_chats_over_wss_with_the_command_line_client() {
    let Some(chromium) = chromium() else { return };
    let pki = Pki::new("browser");
    let server = tls_server(&pki, ServerConfig::default());
    let port = server.local_addr().port();
    let url = format!("https://localhost:{port}/");
    let (_browser, tab) = open(&chromium, &["--ignore-certificate-errors"], &url);
    wait_for(
        &tab,
        "connected over wss://",
        "location.protocol === 'https:' && \
         document.getElementById('status').dataset.state === 'connected'",
    );

    let ca = pki.ca.to_string_lossy().into_owned();
    let mut command = client(&format!("wss://localhost:{port}"));
    let mut proc = Proc::spawn(command.args(["--ca", &ca]));
    let mut stdin = proc.child.stdin.take().expect("stdin");
    let printed = lines(proc.child.stdout.take().expect("stdout"));
    let next_line = |what: &str| {
        printed
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("the client prints {what}"))
    };
    assert_eq!(next_line("the welcome"), WELCOME);

    writeln!(stdin, "hello from the terminal").expect("type a line");
    let line = next_line("its own message");
    let (client_tag, text) = line.split_once(": ").expect("tagged");
    assert_eq!(text, "hello from the terminal");
    wait_for(
        &tab,
        "the client's message in the page",
        &shows(client_tag, "hello from the terminal"),
    );

    send_from_page(&tab, "hello from the https page");
    let line = next_line("the page's message");
    assert!(line.ends_with(": hello from the https page"), "{line}");
    drop(stdin);
    assert!(proc.wait().success(), "the client ends cleanly");
}

/// Serve `page` to every request on a free port until `stop` is set; returns the address.
fn serve_page<'s>(
    scope: &'s thread::Scope<'s, '_>,
    page: String,
    stop: &'s AtomicBool,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    scope.spawn(move || {
        while !stop.load(Ordering::Acquire) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking");
                    stream.set_read_timeout(Some(WAIT)).expect("timeout");
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request);
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                         Connection: close\r\n\r\n{page}",
                        page.len()
                    );
                    let _ = stream.write_all(response.as_bytes());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(ms(10)),
                Err(e) => panic!("accept: {e}"),
            }
        }
    });
    addr
}

/// A page on another site that opens the WebSocket of the chat named in its query string
/// (`?chat=HOST:PORT`) and shows what happened.
const OTHER_SITE: &str = "<!doctype html><title>another site</title><p id=result>pending</p>\
    <script>\
    const result = document.getElementById('result');\
    const chat = new URLSearchParams(location.search).get('chat');\
    const ws = new WebSocket('ws://' + chat + '/');\
    ws.onopen = () => { result.textContent = 'open'; };\
    ws.onclose = (e) => { if (result.textContent === 'pending') \
        result.textContent = 'refused ' + e.code; };\
    </script>";

#[test]
fn a_page_from_another_origin_cannot_connect_unless_allowed() {
    let Some(chromium) = chromium() else { return };
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let site = serve_page(s, OTHER_SITE.to_string(), &stop);
        let strict = default_server();
        let allowing = server(ServerConfig::default().allow_origin(format!("http://{site}")));
        let browser = launch(&chromium, &[]);
        let tab = browser.new_tab().expect("tab");
        let result = "document.getElementById('result').textContent";

        tab.navigate_to(&format!("http://{site}/?chat={}", strict.local_addr()))
            .expect("navigate");
        wait_for(
            &tab,
            "the cross-site WebSocket to be refused",
            &format!("{result} === 'refused 1006'"),
        );
        assert_eq!(strict.client_count(), 0, "it never joined");
        let (mut script, me) = join(strict.local_addr());
        send(&mut script, "no Origin, no problem");
        assert_eq!(
            recv_text(&mut script),
            format!("{me}: no Origin, no problem")
        );

        tab.navigate_to(&format!("http://{site}/?chat={}", allowing.local_addr()))
            .expect("navigate");
        wait_for(
            &tab,
            "the allowed origin to connect",
            &format!("{result} === 'open'"),
        );
        stop.store(true, Ordering::Release);
    });
}

#[test]
fn the_page_says_when_the_room_is_full_and_counts_a_message_in_bytes() {
    let Some(chromium) = chromium() else { return };
    let config = ServerConfig::default().max_clients(1).max_message_size(100);
    let server = server(config);
    let addr = server.local_addr();
    let (occupant, _) = join(addr);
    let (_browser, tab) = open(&chromium, &[], &format!("http://{addr}/"));
    wait_for(
        &tab,
        "the reason it cannot join",
        "document.getElementById('status').textContent.includes('the chat is full')",
    );
    drop(occupant);
    wait_for(
        &tab,
        "connected once there is room",
        "document.getElementById('status').dataset.state === 'connected'",
    );
    // 60 characters, 120 bytes: over the limit of 100 as the server counts.
    send_from_page(&tab, &"é".repeat(60));
    wait_for(
        &tab,
        "the note that it is too long",
        "!document.getElementById('note').hidden && \
         document.getElementById('note').textContent.includes('120 bytes')",
    );
    tab.evaluate("document.getElementById('text').value = ''", false)
        .expect("clear the box");
    send_from_page(&tab, "short");
    wait_for(
        &tab,
        "the short one, sent and marked as ours",
        "document.querySelector('#log li.mine .text')?.textContent === 'short' && \
         document.getElementById('note').hidden",
    );
    assert!(
        tab.evaluate(
            "[...document.querySelectorAll('#log li .text')].some(t => t.textContent.includes('é'))",
            false
        )
        .ok()
        .and_then(|r| r.value)
            == Some(serde_json::Value::Bool(false)),
        "the long one was never sent"
    );
}

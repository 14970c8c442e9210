//! The chat page, served on plain HTTP `GET /` from the same port as the WebSocket.
//!
//! The page is one self-contained file compiled into the binary: no framework, no build
//! step, nothing fetched from the internet. Its script inserts every message as text, never
//! as HTML, and the Content-Security-Policy below forbids it to load or send anything
//! except to the server it came from.

/// A static response body and the headers that go with it.
#[derive(Debug)]
pub(crate) struct Page {
    pub(crate) content_type: &'static str,
    /// Extra header lines, each ending in CRLF.
    pub(crate) headers: &'static str,
    pub(crate) body: &'static [u8],
}

const INDEX: &str = include_str!("web/index.html");

const INDEX_HEADERS: &str = "Cache-Control: no-cache\r\n\
    X-Content-Type-Options: nosniff\r\n\
    Referrer-Policy: no-referrer\r\n\
    Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; \
    style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'\r\n";

/// The page for `path` (query string ignored), if there is one and the page is enabled.
pub(crate) fn page(path: &str, enabled: bool) -> Option<Page> {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    match path {
        "/" | "/index.html" if enabled => Some(Page {
            content_type: "text/html; charset=utf-8",
            headers: INDEX_HEADERS,
            body: INDEX.as_bytes(),
        }),
        _ => None,
    }
}

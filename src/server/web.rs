//! The chat page, served on plain HTTP from the same port as the WebSocket: `/` (the page),
//! `/chat.js` and `/chat.css`.
//!
//! The files are compiled into the binary: no framework, no build step, nothing fetched
//! from the internet. The script inserts every message as text, never as HTML, and the
//! Content-Security-Policy below lets the page run only the server's own script and
//! styles (no inline code at all) and talk only to the server it came from.

use std::borrow::Cow;

use crate::config::ServerConfig;

/// A response body and the headers that go with it.
#[derive(Debug)]
pub(crate) struct Page<'a> {
    pub(crate) content_type: &'static str,
    /// Extra header lines, each ending in CRLF.
    pub(crate) headers: &'static str,
    pub(crate) body: Cow<'a, [u8]>,
}

/// The page's files, with the server's settings the page must know written in.
#[derive(Debug)]
pub(crate) struct Site {
    index: String,
}

const INDEX: &str = include_str!("web/index.html");
const SCRIPT: &str = include_str!("web/chat.js");
const STYLE: &str = include_str!("web/chat.css");

const INDEX_HEADERS: &str = "Cache-Control: no-cache\r\n\
    X-Content-Type-Options: nosniff\r\n\
    Referrer-Policy: no-referrer\r\n\
    Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'\r\n";

const ASSET_HEADERS: &str = "Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n";

impl Site {
    /// The site, or `None` when the page is turned off.
    pub(crate) fn new(config: &ServerConfig) -> Option<Site> {
        config.web.then(|| Site {
            // The page checks a message's size before sending, as the server counts it.
            index: INDEX.replace("{max_message_size}", &config.max_message_size.to_string()),
        })
    }

    /// The file at `path` (query string ignored), if there is one.
    pub(crate) fn page(&self, path: &str) -> Option<Page<'_>> {
        let path = path.split(['?', '#']).next().unwrap_or(path);
        let (content_type, headers, body) = match path {
            "/" | "/index.html" => ("text/html; charset=utf-8", INDEX_HEADERS, &*self.index),
            "/chat.js" => ("text/javascript; charset=utf-8", ASSET_HEADERS, SCRIPT),
            "/chat.css" => ("text/css; charset=utf-8", ASSET_HEADERS, STYLE),
            _ => return None,
        };
        Some(Page {
            content_type,
            headers,
            body: Cow::Borrowed(body.as_bytes()),
        })
    }
}

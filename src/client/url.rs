//! Where a URL given to the client points.
//!
//! Users paste what they have: `ws://host:port` from the README, or `http://host:port/`
//! from the browser's address bar. Both work; what cannot work is said at once, as a bad
//! argument, rather than turning into a connection to the wrong port.

use crate::error::{Error, Result};

/// A server to connect to: host, port, whether over TLS, and the URL for the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `wss://` (or `https://`): TLS.
    pub(crate) tls: bool,
    /// The URL as the WebSocket handshake needs it (`ws://` or `wss://`, with the path).
    pub(crate) url: String,
}

impl Target {
    /// Parse `url`: `ws://HOST[:PORT][/PATH]` or `wss://`, or `http://` and `https://`
    /// (taken as `ws://` and `wss://`).
    ///
    /// # Errors
    /// [`Error::Url`], saying what is wrong: not a URL, a scheme we do not speak, no host,
    /// or a port that is not a number from 1 to 65535.
    pub(crate) fn parse(url: &str) -> Result<Target> {
        let bad = |reason: &str| Error::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("not a URL; expected ws://HOST:PORT"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => false,
            "wss" | "https" => true,
            _ => {
                return Err(bad(
                    "the scheme must be ws:// or wss://, as in ws://127.0.0.1:8080",
                ));
            }
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(bad("user names are not supported; expected ws://HOST:PORT"));
        }
        let (host, port) = split_authority(authority).map_err(|reason| bad(&reason))?;
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let scheme = if tls { "wss" } else { "ws" };
        Ok(Target {
            url: format!("{scheme}://{authority}{path}"),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: port.unwrap_or(if tls { 443 } else { 80 }),
            tls,
        })
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_authority(authority: &str) -> std::result::Result<(&str, Option<u16>), String> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority
            .find(']')
            .ok_or("an IPv6 address needs its closing ], as in ws://[::1]:8080")?;
        match &authority[end + 1..] {
            "" => (&authority[..=end], None),
            rest => match rest.strip_prefix(':') {
                Some(port) => (&authority[..=end], Some(port)),
                None => return Err("expected :PORT after the IPv6 address".into()),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err("no host; expected ws://HOST:PORT".into());
    }
    let port = match port {
        None => None,
        Some(text) => Some(
            text.parse::<u16>()
                .ok()
                .filter(|&p| p > 0 && text.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("{text:?} is not a port (1 to 65535)"))?,
        ),
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> (String, u16, String) {
        let t = Target::parse(url).expect(url);
        (t.host, t.port, t.url)
    }

    #[test]
    fn ws_and_http_urls_are_taken() {
        let local = |p: &str| {
            (
                "127.0.0.1".to_string(),
                8080,
                format!("ws://127.0.0.1:8080{p}"),
            )
        };
        assert_eq!(target("ws://127.0.0.1:8080"), local("/"));
        assert_eq!(target("http://127.0.0.1:8080/"), local("/"));
        assert_eq!(target("HTTP://127.0.0.1:8080/room?x=1"), local("/room?x=1"));
        assert_eq!(target("ws://[::1]:9000").0, "::1");
        assert_eq!(target("ws://chat.example").1, 80);
    }

    #[test]
    fn wss_and_https_urls_are_tls_on_443_by_default() {
        let t = Target::parse("https://chat.example/room").expect("https");
        assert_eq!(
            (t.host.as_str(), t.port, t.tls),
            ("chat.example", 443, true)
        );
        assert_eq!(t.url, "wss://chat.example/room");
        let t = Target::parse("WSS://[::1]:8443").expect("wss");
        assert_eq!((t.host.as_str(), t.port, t.tls), ("::1", 8443, true));
        assert!(!Target::parse("ws://x").expect("ws").tls);
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, says) in [
            ("ws://127.0.0.1:99999", "not a port"),
            ("ws://127.0.0.1:abc", "not a port"),
            ("ws://127.0.0.1:", "not a port"),
            ("ws://127.0.0.1:0", "not a port"),
            ("ws://:8080", "no host"),
            ("127.0.0.1:8080", "not a URL"),
            ("ftp://x:1", "scheme"),
            ("ws://[::1:80", "closing ]"),
            ("ws://u@x:1", "user"),
        ] {
            let error = Target::parse(url).expect_err(url).to_string();
            assert!(error.contains(says), "{url}: {error}");
        }
    }
}

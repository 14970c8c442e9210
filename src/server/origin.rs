//! Which web pages may open a WebSocket here.
//!
//! A browser lets a page on any site open a WebSocket to any server, `ws://127.0.0.1` and
//! intranet hosts included, and the server sees the visitor's own address: that page could
//! read the room and post as the visitor (cross-site WebSocket hijacking). What tells it
//! apart is the `Origin` header browsers always send. So an upgrade whose `Origin` is
//! neither the server's own (the `Host` the request was sent to) nor allowed with
//! `--allow-origin` is refused. Requests without `Origin` do not come from a web page
//! (command-line clients, scripts) and are accepted.
//!
//! A server listening on a loopback address also refuses its "own" origin under a name
//! that is not a loopback name: that is DNS rebinding, a page from `evil.example` whose
//! name the attacker pointed at 127.0.0.1 after it loaded, so that its WebSocket to
//! `ws://evil.example:8080` looks same-origin.

use std::fmt;

/// The origins allowed besides the server's own.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origins {
    any: bool,
    null: bool,
    allowed: Vec<Origin>,
    /// The server listens on loopback only, so its own origin must use a loopback name.
    loopback: bool,
}

/// A web origin, `scheme://host[:port]`, with its parts compared as browsers do: scheme and
/// host without regard to case, the port made explicit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origins {
    /// From `--allow-origin` values: `*` allows any origin, `null` the opaque origin of
    /// sandboxed frames and local files, anything else must be a valid origin (values that
    /// are not were refused when the options were parsed, see [`Origin::parse`]).
    pub(crate) fn new(values: &[String], loopback: bool) -> Self {
        let mut origins = Origins {
            loopback,
            ..Origins::default()
        };
        for value in values {
            match value.as_str() {
                "*" => origins.any = true,
                "null" => origins.null = true,
                other => origins.allowed.extend(Origin::parse(other).ok()),
            }
        }
        origins
    }

    /// Whether a request with these `Origin` and `Host` headers may open a WebSocket.
    ///
    /// # Errors
    /// What to log and answer when it may not: which origin, and how to allow it.
    pub(crate) fn check(&self, origin: Option<&[u8]>, host: Option<&[u8]>) -> Result<(), String> {
        let Some(raw) = origin else { return Ok(()) };
        if self.any {
            return Ok(());
        }
        let text = String::from_utf8_lossy(raw);
        if text == "null" {
            return if self.null {
                Ok(())
            } else {
                Err(
                    "Origin \"null\" (a sandboxed frame or a local file) is not allowed; \
                     to allow it, start the server with --allow-origin null"
                        .to_string(),
                )
            };
        }
        let shown = text.escape_debug().to_string();
        let Ok(origin) = Origin::parse(&text) else {
            return Err(format!("Origin \"{shown}\" is not a valid origin"));
        };
        let own = host
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| {
                let (host, port) = split_host_port(h).ok()?;
                Some(Origin {
                    scheme: origin.scheme.clone(),
                    host: host.to_ascii_lowercase(),
                    port: port.unwrap_or(origin.port_default()),
                })
            });
        if self.allowed.contains(&origin) {
            return Ok(());
        }
        if own.as_ref() == Some(&origin) {
            if !self.loopback || is_loopback_name(&origin.host) {
                return Ok(());
            }
            return Err(format!(
                "a page from {origin} reached this server by the name {}, which is not a \
                 loopback name though the server listens on loopback only (DNS rebinding?); \
                 to allow it, start the server with --allow-origin {origin}",
                origin.host
            ));
        }
        Err(format!(
            "a page from {origin} may not open a WebSocket here (it is not this server's \
             origin); to allow it, start the server with --allow-origin {origin}"
        ))
    }
}

/// `localhost`, a name under it, or a loopback address.
fn is_loopback_name(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host.ends_with(".localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Origin {
    /// Parse `scheme://host[:port]`, the form browsers send and `--allow-origin` takes.
    ///
    /// # Errors
    /// Says what is wrong, in words fit for a command-line error.
    pub(crate) fn parse(text: &str) -> Result<Origin, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or("an origin is scheme://host[:port], as in https://chat.example.com")?;
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return Err(format!("{scheme:?} is not a URL scheme"));
        }
        if rest.contains(['/', '?', '#', '@']) {
            return Err("an origin has no path, query or user: scheme://host[:port]".into());
        }
        let (host, port) = split_host_port(rest)?;
        let mut origin = Origin {
            scheme: scheme.to_ascii_lowercase(),
            host: host.to_ascii_lowercase(),
            port: 0,
        };
        origin.port = port.unwrap_or(origin.port_default());
        Ok(origin)
    }

    /// The port a URL of this scheme means when it names none.
    fn port_default(&self) -> u16 {
        match self.scheme.as_str() {
            "https" | "wss" => 443,
            _ => 80,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        if self.port != self.port_default() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// `host[:port]` or `[v6]:port`, as in a `Host` header or an origin.
fn split_host_port(text: &str) -> Result<(&str, Option<u16>), String> {
    let bad_port = |p: &str| format!("{p:?} is not a port number");
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (inside, after) = v6
            .split_once(']')
            .ok_or("an IPv6 host needs its closing ]")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| bad_port(p))?),
        };
        (&text[..inside.len() + 2], port)
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let host_char = |c: char| c.is_ascii_alphanumeric() || "-._[]:".contains(c);
    if host.is_empty()
        || !host.chars().all(host_char)
        || host.contains(':') && !host.starts_with('[')
    {
        return Err(format!("{text:?} has no valid host"));
    }
    let port = match port {
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|&n| n > 0 && p.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| bad_port(p))?,
        ),
        None => None,
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(allowed: &[&str], origin: Option<&str>, host: Option<&str>) -> Result<(), String> {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        Origins::new(&allowed, false).check(origin.map(str::as_bytes), host.map(str::as_bytes))
    }

    #[test]
    fn on_loopback_the_own_origin_needs_a_loopback_name() {
        let origins = Origins::new(&[], true);
        let check = |origin: &str, host: &str| {
            origins.check(Some(origin.as_bytes()), Some(host.as_bytes()))
        };
        for (origin, host) in [
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("http://localhost:8080", "localhost:8080"),
            ("http://[::1]:8080", "[::1]:8080"),
        ] {
            assert!(check(origin, host).is_ok(), "{origin}");
        }
        let rebound =
            check("http://evil.example:8080", "evil.example:8080").expect_err("rebinding");
        assert!(
            rebound.contains("DNS rebinding") && rebound.contains("--allow-origin"),
            "{rebound}"
        );
        let allowed = Origins::new(&["http://chat.example:8080".to_string()], true);
        assert!(
            allowed
                .check(
                    Some(b"http://chat.example:8080"),
                    Some(b"chat.example:8080")
                )
                .is_ok()
        );
    }

    #[test]
    fn no_origin_is_a_script_and_is_accepted() {
        assert!(check(&[], None, Some("127.0.0.1:8080")).is_ok());
        assert!(check(&[], None, None).is_ok());
    }

    #[test]
    fn the_servers_own_origin_is_accepted_in_any_case_and_with_default_ports() {
        for (origin, host) in [
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("HTTP://Chat.Example.com", "chat.example.com"),
            ("http://chat.example.com", "chat.example.com:80"),
            ("https://chat.example.com", "chat.example.com"),
            ("https://chat.example.com:443", "chat.example.com"),
            ("http://[::1]:9000", "[::1]:9000"),
        ] {
            assert!(
                check(&[], Some(origin), Some(host)).is_ok(),
                "{origin} at {host}"
            );
        }
    }

    #[test]
    fn other_origins_are_refused_with_how_to_allow_them() {
        for (origin, host) in [
            ("http://evil.example", "127.0.0.1:8080"),
            ("http://127.0.0.1:8081", "127.0.0.1:8080"),
            ("https://chat.example.com", "chat.example.com:80"),
            ("http://127.0.0.1:8080", "localhost:8080"),
            ("http://127.0.0.1:8080", "nonsense:port"),
        ] {
            let refused = check(&[], Some(origin), Some(host)).expect_err(origin);
            assert!(refused.contains("--allow-origin"), "{refused}");
        }
        let refused = check(&[], Some("http://evil.example"), None).expect_err("no host");
        assert!(
            refused.contains("--allow-origin http://evil.example"),
            "{refused}"
        );
    }

    #[test]
    fn allowed_origins_star_and_null() {
        let allowed = ["https://app.example.com", "http://localhost:3000"];
        assert!(check(&allowed, Some("https://APP.example.com:443"), Some("x")).is_ok());
        assert!(check(&allowed, Some("http://localhost:3000"), Some("x")).is_ok());
        assert!(check(&allowed, Some("http://localhost:3001"), Some("x")).is_err());
        assert!(check(&["*"], Some("http://anything.example"), Some("x")).is_ok());
        assert!(check(&[], Some("null"), Some("x")).is_err());
        assert!(check(&["null"], Some("null"), Some("x")).is_ok());
    }

    #[test]
    fn malformed_origins_are_refused_and_shown_escaped() {
        let refused = check(&[], Some("javascript:\u{1b}[2J"), Some("x")).expect_err("bad");
        assert!(refused.contains("\\u{1b}"), "{refused}");
        for bad in [
            "example.com",
            "http://",
            "http://a/b",
            "http://a:99999",
            "http://a:-1",
            "://a",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad}");
        }
    }
}

use std::time::Duration;

use clap::Parser;
use proptest::prelude::*;

use super::*;
use crate::config::ServerConfig;

/// A numeric option, its documented range, and where its value lands in the configuration.
struct Numeric {
    flag: &'static str,
    range: std::ops::RangeInclusive<i64>,
    value: fn(&ServerConfig) -> i64,
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).expect("seconds")
}

fn n(v: usize) -> i64 {
    i64::try_from(v).expect("fits")
}

fn numeric_options() -> Vec<Numeric> {
    vec![
        Numeric {
            flag: "--history",
            range: 0..=1000,
            value: |c| n(c.history),
        },
        Numeric {
            flag: "--max-message-size",
            range: 1..=crate::message::LONGEST_MESSAGE as i64,
            value: |c| n(c.max_message_size),
        },
        Numeric {
            flag: "--queue",
            range: 1..=crate::MAX_QUEUE as i64,
            value: |c| n(c.queue),
        },
        Numeric {
            flag: "--ping-interval",
            range: 0..=86_400,
            value: |c| c.ping_interval.map_or(0, secs),
        },
        Numeric {
            flag: "--handshake-timeout",
            range: 1..=3600,
            value: |c| secs(c.handshake_timeout),
        },
        Numeric {
            flag: "--write-timeout",
            range: 1..=86_400,
            value: |c| secs(c.write_timeout),
        },
        Numeric {
            flag: "--max-clients",
            range: 1..=1_000_000,
            value: |c| n(c.max_clients),
        },
        Numeric {
            flag: "--max-pending",
            range: 1..=100_000,
            value: |c| n(c.max_pending),
        },
        Numeric {
            flag: "--max-pending-per-ip",
            range: 1..=100_000,
            value: |c| n(c.max_pending_per_ip),
        },
        Numeric {
            flag: "--thread-cache",
            range: 0..=2_000_000,
            value: |c| c.thread_cache.map_or(-1, n),
        },
        Numeric {
            flag: "--thread-idle",
            range: 1..=86_400,
            value: |c| secs(c.thread_idle),
        },
        Numeric {
            flag: "--rate",
            range: 0..=1_000_000,
            value: |c| i64::from(c.rate),
        },
        Numeric {
            flag: "--burst",
            range: 1..=1_000_000,
            value: |c| i64::from(c.burst),
        },
    ]
}

/// Values worth trying for an option with `range`: its edges, just outside them, and
/// anything at all.
fn candidates(range: &std::ops::RangeInclusive<i64>) -> Vec<i64> {
    let (lo, hi) = (*range.start(), *range.end());
    vec![lo, hi, lo - 1, hi + 1, i64::MIN, i64::MAX, 0, (lo + hi) / 2]
}

fn parse_server(args: &[&str]) -> Result<ServerArgs, clap::Error> {
    ServerArgs::try_parse_from(std::iter::once("server").chain(args.iter().copied()))
}

#[test]
fn each_numeric_option_takes_exactly_its_documented_range() {
    for option in numeric_options() {
        for value in candidates(&option.range) {
            let text = value.to_string();
            match parse_server(&[option.flag, &text]) {
                Ok(args) => {
                    assert!(
                        option.range.contains(&value),
                        "{} {value} accepted",
                        option.flag
                    );
                    assert_eq!((option.value)(&args.config()), value, "{}", option.flag);
                }
                Err(e) => {
                    assert!(
                        !option.range.contains(&value),
                        "{} {value} refused",
                        option.flag
                    );
                    let line = one_line(&e);
                    assert!(line.contains(&text) && line.contains(option.flag), "{line}");
                }
            }
        }
    }
}

#[test]
fn the_help_states_each_range() {
    let help = ServerArgs::try_parse_from(["server", "--help"])
        .expect_err("help")
        .to_string();
    for option in numeric_options() {
        let (lo, hi) = (option.range.start(), option.range.end());
        let at = help.find(option.flag).expect("documented");
        let entry: String = help[at..]
            .lines()
            .take(4)
            .collect::<Vec<_>>()
            .join(" ")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(entry.contains(&format!("{lo} to {hi}")), "{entry}");
    }
}

#[test]
fn origins_are_checked_and_log_levels_take_any_case() {
    let args = parse_server(&[
        "--allow-origin",
        "https://chat.example.com",
        "--allow-origin",
        "*",
    ])
    .expect("valid origins");
    assert_eq!(
        args.config().allow_origins,
        ["https://chat.example.com", "*"]
    );
    for bad in [
        "chat.example.com",
        "https://chat.example.com/path",
        "http://:80",
    ] {
        let e = parse_server(&["--allow-origin", bad]).expect_err(bad);
        assert!(one_line(&e).contains("--allow-origin"), "{}", one_line(&e));
    }
    let args = parse_server(&["--log-level", "WARN"]).expect("any case");
    assert_eq!(args.log_level(), log::LevelFilter::Warn);
    let e = parse_server(&["--log-level", "loud"]).expect_err("unknown level");
    assert!(
        one_line(&e).contains("off, error, warn, info"),
        "{}",
        one_line(&e)
    );
}

proptest! {
    #[test]
    fn any_value_of_a_numeric_option_is_taken_or_refused_without_panic(
        which in 0..numeric_options().len(),
        value in prop_oneof![any::<i64>().prop_map(|v| v.to_string()), "\\PC{0,12}"],
    ) {
        let option = &numeric_options()[which];
        match parse_server(&[option.flag, &value]) {
            Ok(args) => {
                let parsed: i64 = value.trim().parse().expect("accepted values are numbers");
                prop_assert!(option.range.contains(&parsed));
                prop_assert_eq!((option.value)(&args.config()), parsed);
            }
            Err(e) => prop_assert!(!one_line(&e).is_empty()),
        }
    }

    #[test]
    fn any_command_line_parses_or_is_refused_without_panic(
        args in proptest::collection::vec(
            prop_oneof![
                "--[a-z-]{1,20}",
                "\\PC{0,20}",
                Just("--rate".to_string()),
                Just("--bind".to_string()),
                Just("--allow-origin".to_string()),
            ],
            0..8,
        ),
    ) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Ok(parsed) = parse_server(&args) {
            let _ = parsed.config();
        }
        let client = std::iter::once("client").chain(args.iter().copied());
        if let Ok(parsed) = ClientArgs::try_parse_from(client) {
            let _ = parsed.config(true, false);
        }
    }
}

#[test]
fn the_client_colours_by_the_conventions() {
    let parse = |args: &[&str]| {
        ClientArgs::try_parse_from(std::iter::once("client").chain(args.iter().copied()))
            .expect("valid")
    };
    assert!(parse(&[]).config(true, false).color, "auto at a terminal");
    assert!(
        !parse(&[]).config(false, false).color,
        "auto, not a terminal"
    );
    assert!(!parse(&[]).config(true, true).color, "auto with NO_COLOR");
    assert!(parse(&["--color", "always"]).config(false, true).color);
    assert!(!parse(&["--color", "NEVER"]).config(true, false).color);
    let config = parse(&["--wait", "9", "--no-confirm", "--no-reconnect"]).config(true, false);
    assert_eq!(config.wait, Duration::from_secs(9));
    assert!(!config.confirm && !config.reconnect);
}

#[test]
fn bind_takes_ip_port_or_localhost_and_says_what_it_expects() {
    let bind = |value: &str| parse_server(&["--bind", value]).map(|a| a.config().bind);
    assert_eq!(
        bind("localhost:9000").expect("localhost"),
        "127.0.0.1:9000".parse().expect("ip")
    );
    assert_eq!(bind("[::1]:0").expect("v6"), "[::1]:0".parse().expect("ip"));
    for bad in ["nowhere", "localhost:http", "8080", "example.com:80"] {
        let e = bind(bad).expect_err(bad);
        assert!(
            one_line(&e).contains("expected IP:PORT"),
            "{}",
            one_line(&e)
        );
    }
}

#[test]
fn the_redis_options_are_checked_and_need_redis() {
    let url = "redis://127.0.0.1:6379/2";
    let config = parse_server(&[
        "--redis",
        url,
        "--redis-key",
        "room",
        "--redis-window",
        "100",
    ])
    .expect("valid")
    .config();
    let redis = config.redis.expect("a fleet");
    assert_eq!(
        (redis.url.as_str(), redis.key.as_str(), redis.window),
        (url, "room", 100)
    );
    assert!(parse_server(&[]).expect("valid").config().redis.is_none());
    for bad in [
        &["--redis", url, "--redis-window", "99"][..],
        &["--redis", url, "--redis-window", "10000001"],
        &["--redis", url, "--redis-key", ""],
        &["--redis", "http://127.0.0.1:6379"],
        &["--redis", "redis://127.0.0.1:6379?protocol=resp3"],
        &["--redis-key", "room"],
        &["--redis-window", "500"],
    ] {
        let e = parse_server(bad).expect_err("refused");
        assert!(
            one_line(&e).contains("--redis"),
            "{bad:?}: {}",
            one_line(&e)
        );
    }
}

#[test]
fn the_tls_options_come_as_a_pair_and_the_client_trusts_one_way() {
    let config = parse_server(&["--tls-cert", "c.pem", "--tls-key", "k.pem"])
        .expect("valid")
        .config();
    assert_eq!(config.tls, Some(crate::TlsFiles::new("c.pem", "k.pem")));
    assert!(parse_server(&[]).expect("valid").config().tls.is_none());
    for alone in [&["--tls-cert", "c.pem"][..], &["--tls-key", "k.pem"]] {
        let e = parse_server(alone).expect_err("refused");
        assert!(one_line(&e).contains("--tls-"), "{}", one_line(&e));
    }
    let client = |args: &[&str]| {
        ClientArgs::try_parse_from(std::iter::once("client").chain(args.iter().copied()))
    };
    let config = client(&["--ca", "ca.pem"])
        .expect("valid")
        .config(false, false);
    assert_eq!(config.ca.as_deref(), Some(std::path::Path::new("ca.pem")));
    assert!(!config.insecure);
    assert!(
        client(&["--insecure"])
            .expect("valid")
            .config(false, false)
            .insecure
    );
    assert!(
        client(&["--ca", "ca.pem", "--insecure"]).is_err(),
        "trusting one CA and nothing at all contradict each other"
    );
}

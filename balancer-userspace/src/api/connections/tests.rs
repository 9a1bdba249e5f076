//! The accept loop's decisions: who is admitted over the cap, and what failing accepts
//! log. The loop itself runs on a real listener in `api::http`'s tests.

use std::{
    io,
    net::IpAddr,
    time::{Duration, Instant},
};

use super::*;

#[test]
fn loopback_peers_have_a_reserve_over_the_cap() {
    let limits = Limits {
        max_connections: 4,
        loopback_reserve: 2,
        idle_timeout: Duration::from_secs(5),
        lifetime: Duration::from_secs(60),
    };
    // (peer, open connections, admitted)
    let cases: &[(&str, u64, bool)] = &[
        ("192.0.2.7", 0, true),
        ("192.0.2.7", 3, true),
        ("192.0.2.7", 4, false),
        ("2001:db8::7", 4, false),
        ("::ffff:192.0.2.7", 4, false),
        ("127.0.0.1", 4, true),
        ("127.3.2.1", 5, true),
        ("127.0.0.1", 6, false),
        ("::1", 5, true),
        ("::1", 6, false),
        ("::ffff:127.0.0.1", 5, true),
        ("::ffff:127.0.0.1", 6, false),
    ];
    for (peer, open, admitted) in cases {
        let ip: IpAddr = peer.parse().unwrap();
        assert_eq!(
            limits.admits(*open, ip),
            *admitted,
            "{peer} with {open} open"
        );
    }
}

#[test]
fn failing_accepts_are_logged_when_they_start_and_when_they_end() {
    let mut errors = AcceptErrors::new("status API");
    let start = Instant::now();
    let emfile = io::Error::from_raw_os_error(libc::EMFILE);
    assert_eq!(errors.succeeded(start), None);
    let first = errors
        .failed(&emfile, start)
        .expect("a message at the start");
    assert!(first.contains("Too many open files"), "{first}");
    assert!(first.contains("retrying every 100ms"), "{first}");
    for i in 1..50 {
        assert_eq!(errors.failed(&emfile, start + ACCEPT_BACKOFF * i), None);
    }
    let end = errors
        .succeeded(start + Duration::from_millis(4900))
        .expect("a message at the end");
    assert!(end.contains("after 50 failed attempts over 4.9 s"), "{end}");
    assert_eq!(errors.succeeded(start + Duration::from_secs(5)), None);
    // A new episode is announced again.
    assert!(errors
        .failed(&emfile, start + Duration::from_secs(6))
        .is_some());
}

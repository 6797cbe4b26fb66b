//! Ports and postfix's `smtp-sink` for the test crates (`channels`, `it`,
//! `faults` include this file with `#[path]`).
//!
//! Ports come from below the kernel's ephemeral range (32768–60999 by
//! default). A port taken with `bind(0)` is from that range: after it is
//! released, the kernel may hand it out again as the source port of an
//! outgoing connection or to another `bind(0)` before the sink binds it, and a
//! test then talks to the wrong server. Below the range only explicit binds
//! compete, and each test process walks its own sequence.

#![allow(dead_code)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const LOW: u32 = 20_000;
const SPAN: u32 = 12_000;

static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// A 127.0.0.1 port nothing listens on, outside the ephemeral range.
pub fn free_port() -> u16 {
    // Seed each process's walk differently so concurrent test binaries (and
    // the Herald processes they spawn) rarely try the same ports.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (LOW + n % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free 127.0.0.1 port in {LOW}..{}", LOW + SPAN);
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}

fn smtp_sink_bin() -> &'static str {
    ["/usr/sbin/smtp-sink", "smtp-sink"]
        .into_iter()
        .find(|b| Path::new(b).exists())
        .unwrap_or("smtp-sink")
}

/// Reads the greeting from `port`: true when it is an SMTP `220` banner.
fn smtp_banner(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    while got.len() < 4 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let _ = std::io::Write::write_all(&mut s, b"QUIT\r\n");
    got.starts_with(b"220")
}

/// Starts `smtp-sink` on 127.0.0.1:`port`, dumping messages to
/// `dump_template` (see smtp-sink(1) `-d`), with extra arguments `extra`.
///
/// Returns the child once the sink itself answers with its banner; `None` if
/// it exited (the port was taken) or never greeted within `timeout`.
pub fn spawn_smtp_sink(
    port: u16,
    dump_template: &str,
    extra: &[&str],
    timeout: Duration,
) -> Option<Child> {
    let mut child = Command::new(smtp_sink_bin())
        .args(["-u", "nobody", "-d", dump_template])
        .args(extra)
        .arg(format!("127.0.0.1:{port}"))
        .arg("256")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start smtp-sink (apt package postfix)");
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if smtp_banner(port) {
            // Checked again after the banner: a banner from someone else's
            // server while ours failed to bind must not count.
            if let Ok(Some(_)) = child.try_wait() {
                return None;
            }
            return Some(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `smtp-sink` on some free port; returns the port and the child.
pub fn start_smtp_sink(dump_template: &str, extra: &[&str]) -> (u16, Child) {
    for _ in 0..20 {
        let port = free_port();
        if let Some(child) = spawn_smtp_sink(port, dump_template, extra, Duration::from_secs(5)) {
            return (port, child);
        }
    }
    panic!("smtp-sink did not start on any of 20 ports");
}

//! Sinks that are not the bottleneck: nginx answering `return 200` for HTTP,
//! postfix's `smtp-sink` for SMTP. Both on 127.0.0.1, both count what they got.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on 127.0.0.1:{port}")
}

/// The path nginx answers 503 on (the failing users' webhooks).
pub const FAILING_PATH: &str = "/fail";

/// nginx answering 200 to everything but [`FAILING_PATH`] (503), logging one
/// line per request.
pub struct NginxSink {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl NginxSink {
    pub fn start() -> anyhow::Result<NginxSink> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n  log_format c '$uri';\n  access_log {d}/access.log c buffer=256k flush=1s;\n\
               client_body_temp_path {d}/body;\n  keepalive_requests 1000000;\n\
               server {{ listen 127.0.0.1:{port}; location / {{ return 200 'ok'; }}\n\
                 location = {FAILING_PATH} {{ return 503 'down'; }} }}\n}}\n",
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("nginx.conf"), conf)?;
        let child = Command::new(nginx_bin())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx (apt package nginx-light)")?;
        wait_for_port(port, Duration::from_secs(10))?;
        Ok(NginxSink { port, dir, child })
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// Requests to `path` logged so far (the log is flushed every second:
    /// wait a little). Warm-up requests use another path and do not count.
    pub fn count(&self, path: &str) -> usize {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .map(|s| s.lines().filter(|l| *l == path).count())
            .unwrap_or(0)
    }
}

fn nginx_bin() -> PathBuf {
    for p in ["/usr/sbin/nginx", "/usr/local/sbin/nginx"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("nginx")
}

impl Drop for NginxSink {
    /// SIGTERM, not SIGKILL: the master then stops its worker too (a killed
    /// master leaves the worker orphaned).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// postfix's smtp-sink with running counters (`-c`).
pub struct SmtpSinkCounter {
    pub port: u16,
    child: Child,
    output: Arc<Mutex<String>>,
}

impl SmtpSinkCounter {
    pub fn start() -> anyhow::Result<SmtpSinkCounter> {
        let port = free_port()?;
        let bin = if Path::new("/usr/sbin/smtp-sink").exists() {
            "/usr/sbin/smtp-sink"
        } else {
            "smtp-sink"
        };
        let mut child = Command::new(bin)
            .args(["-c", "-u", "nobody", &format!("127.0.0.1:{port}"), "1024"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting smtp-sink (apt package postfix)")?;
        let output = Arc::new(Mutex::new(String::new()));
        if let Some(mut out) = child.stdout.take() {
            let sink = output.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                        // keep only the tail: counters are cumulative
                        if s.len() > 8192 {
                            let cut = s.len() - 4096;
                            s.drain(..cut);
                        }
                    }
                }
            });
        }
        wait_for_port(port, Duration::from_secs(10))?;
        Ok(SmtpSinkCounter {
            port,
            child,
            output,
        })
    }

    /// Messages accepted so far (the last `mesg=N` counter smtp-sink -c prints:
    /// `sess=N quit=N mesg=N\r`).
    pub fn count(&self) -> usize {
        let s = self.output.lock().map(|s| s.clone()).unwrap_or_default();
        last_mesg(&s)
    }
}

/// The last `mesg=N` value in smtp-sink's `-c` output (0 when none yet).
fn last_mesg(out: &str) -> usize {
    out.rsplit("mesg=")
        .next()
        .filter(|t| t.len() < out.len())
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl Drop for SmtpSinkCounter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_sink_counter_reads_the_last_mesg_value() {
        let out = "sess=0 quit=0 mesg=1\rsess=1 quit=1 mesg=1\rsess=2 quit=2 mesg=27\r";
        assert_eq!(last_mesg(out), 27);
        assert_eq!(last_mesg(""), 0);
    }
}

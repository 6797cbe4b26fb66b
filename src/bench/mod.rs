//! `herald bench`: end-to-end throughput and latency of a real `herald serve`
//! process against the local broker, PostgreSQL and fast sinks, next to
//! baselines measured in the same run on the same broker: a bare
//! consume→produce pass-through and the raw sink rates.
//!
//! Layout: [`sinks`] starts nginx and smtp-sink; [`load`] produces requests
//! and reads outcomes with per-message latency; this file runs the phases and
//! writes the report.

pub mod load;
pub mod machine;
pub mod sinks;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::config::Settings;
use load::{LoadResult, Mix, PolicyMode};

/// Options of one benchmark run.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Requests per run.
    #[arg(long, default_value_t = 100_000)]
    pub requests: usize,
    /// Partitions of the benchmark topics.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// What to send: webhook, email or mixed (alternating).
    #[arg(long, value_enum, default_value_t = Mix::Webhook)]
    pub mix: Mix,
    /// Render a template (`order_shipped` / `welcome`) instead of inline content.
    #[arg(long)]
    pub template: bool,
    /// Recipients per request (batch requests when > 1).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Recipient policy: `on` (a share of the bench's 10,000 users have
    /// stored preferences: quiet hours, a frequency cap, and 1 in 100 muted
    /// the bench's category, so their notifications are `suppressed`), `off`
    /// (`policy.enabled = false`), or `compare` (the max-rate run with and
    /// without policy, and their ratio).
    #[arg(long, value_enum, default_value_t = PolicyMode::On)]
    pub policy: PolicyMode,
    /// With policy on: the percentage of the bench's users who muted its
    /// category (their notifications end `suppressed`, written without a
    /// send).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub muted_percent: u8,
    /// With policy on: the percentage of the bench's users with a frequency
    /// cap (never reached; the cap check reads their recent sends).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub capped_percent: u8,
    /// The percentage of the bench's users whose webhook endpoint answers
    /// 503 (webhook requests only): their notifications are retried through
    /// the due-work scheduler and end `failed`. With a share above 0 the
    /// run uses short retries (HERALD_ROUTING__RETRY_BASE_MS=50,
    /// RETRY_CAP_MS=200, BUILTIN_MAX_RETRIES=2: three attempts each) and a
    /// circuit breaker that does not open; `--set` overrides them.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub failing_percent: u8,
    /// The max-rate runs only: every request carries `scheduled_at` this
    /// many seconds after the load starts, so the notifications pile up as
    /// scheduled rows and the due-work scheduler releases them together (a
    /// morning's release of quiet-hours deferrals). Allow the time Herald
    /// takes to store the whole load. The report adds the release rate.
    #[arg(long, value_name = "SECS")]
    pub scheduled_in: Option<u64>,
    /// The herald binary to run (default: target/release/herald).
    #[arg(long)]
    pub herald_bin: Option<PathBuf>,
    /// PostgreSQL URL of an admin database; a fresh database is created per run.
    #[arg(
        long,
        env = "HERALD_TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:55432/postgres"
    )]
    pub admin_database_url: String,
    /// Skip the baselines (pass-through, raw sinks, raw broker).
    #[arg(long)]
    pub skip_baselines: bool,
    /// Skip the fixed-rate run at half the measured maximum.
    #[arg(long)]
    pub skip_fixed_rate: bool,
    /// Soak: run this many requests at a fixed rate (--soak-rate) and sample RSS.
    #[arg(long)]
    pub soak: Option<usize>,
    #[arg(long, default_value_t = 10_000)]
    pub soak_rate: u64,
    /// Append the results to this file (Markdown).
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub out: PathBuf,
    /// Extra HERALD_* settings for the herald process, KEY=VALUE.
    #[arg(long = "set", value_parser = parse_kv)]
    pub set: Vec<(String, String)>,
}

impl BenchArgs {
    fn shares(&self) -> load::Shares {
        load::Shares {
            muted_percent: self.muted_percent.into(),
            capped_percent: self.capped_percent.into(),
        }
    }

    /// Attempts of a notification to a failing endpoint: the first and
    /// every retry (`BUILTIN_MAX_RETRIES`, 2 unless `--set`).
    fn failing_attempts(&self) -> usize {
        let retries = self
            .set
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case("HERALD_ROUTING__BUILTIN_MAX_RETRIES"))
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(2);
        retries + 1
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// Runs the benchmark and appends the report to `args.out`.
pub async fn run(settings: &Settings, args: BenchArgs, command_line: String) -> anyhow::Result<()> {
    let brokers = settings.kafka.brokers.clone();
    let bin = args
        .herald_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/release/herald"));
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` first or pass --herald-bin",
            bin.display()
        );
    }
    if args
        .set
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("HERALD_POLICY__ENABLED"))
    {
        bail!("use --policy on|off|compare rather than --set HERALD_POLICY__ENABLED");
    }
    let policy = args.policy != PolicyMode::Off;
    let nginx = sinks::NginxSink::start()?;
    let smtp = sinks::SmtpSinkCounter::start()?;
    let mut report = Report::new(&args, command_line);
    eprintln!(
        "sinks: nginx 127.0.0.1:{}, smtp-sink 127.0.0.1:{}",
        nginx.port, smtp.port
    );

    if !args.skip_baselines {
        eprintln!(
            "== baseline: raw broker produce/consume ({} messages)",
            args.requests
        );
        let (p, c) = load::raw_broker(&brokers, args.partitions, args.requests).await?;
        report.line("broker raw produce", format!("{p:.0} msg/s"));
        report.line("broker raw consume", format!("{c:.0} msg/s"));
        eprintln!(
            "== baseline: pass-through consume→produce ({} messages)",
            args.requests
        );
        let pt = measured_passthrough(&brokers, args.partitions, args.requests, None).await?;
        report.pass_through = Some(pt.rate());
        report.result("pass-through (max rate)", &pt);
        report.machine("machine (pass-through, max rate)", &pt);
        let n_http = args.requests.min(50_000);
        eprintln!("== baseline: reqwest → nginx ({n_http} requests)");
        let http = load::raw_http(&nginx.url("/raw"), n_http).await?;
        report.raw_http = Some(http);
        report.line("raw reqwest → nginx", format!("{http:.0} req/s"));
        let n_smtp = args.requests.min(20_000);
        eprintln!(
            "== baseline: raw lettre (nodelay, one message at a time, 16 connections) → smtp-sink ({n_smtp} messages)"
        );
        let lettre_rate = load::raw_lettre(smtp.port, n_smtp, 16).await?;
        report.raw_lettre = Some(lettre_rate);
        report.line(
            "raw lettre (nodelay, 16 connections) → smtp-sink",
            format!("{lettre_rate:.0} msg/s"),
        );
        eprintln!(
            "== baseline: Herald's SMTP adapter alone (lettre, nodelay, pipelining, pool of 16) → smtp-sink ({n_smtp} messages)"
        );
        let smtp_rate = load::raw_smtp(settings, smtp.port, n_smtp).await?;
        report.raw_smtp = Some(smtp_rate);
        report.line(
            "raw SMTP (Herald's adapter alone, pool of 16) → smtp-sink",
            format!("{smtp_rate:.0} msg/s"),
        );
    }

    eprintln!(
        "== herald: {} requests, mix {:?}, as fast as possible",
        args.requests, args.mix
    );
    let run = HeraldRun::start(&bin, settings, &args, &nginx, &smtp, policy).await?;
    let result = run.load(args.requests, None, &nginx, &smtp).await?;
    let stats = run.stop().await?;
    report.herald = Some(result.rate());
    report.result("herald (max rate)", &result);
    report.drained(
        "herald (max rate), Herald's /metrics",
        &result,
        args.requests,
    );
    report.released("herald (max rate), release", &result);
    report.process("herald process", &stats, result.notifications);
    report.machine("machine (max rate)", &result);
    report.counts("count check", &result);

    if args.policy == PolicyMode::Compare {
        eprintln!(
            "== herald without policy: {} requests, as fast as possible",
            args.requests
        );
        let run = HeraldRun::start(&bin, settings, &args, &nginx, &smtp, false).await?;
        let off = run.load(args.requests, None, &nginx, &smtp).await?;
        let stats = run.stop().await?;
        report.herald_policy_off = Some(off.rate());
        report.result("herald (max rate, policy off)", &off);
        report.released("herald (max rate, policy off), release", &off);
        report.process("herald process (policy off)", &stats, off.notifications);
        report.machine("machine (max rate, policy off)", &off);
        report.counts("count check (policy off)", &off);
    }

    if !args.skip_fixed_rate && result.rate() > 0.0 {
        let rate = (result.rate() / 2.0).max(1.0) as u64;
        let n = (rate as usize * 10).clamp(1000, args.requests.max(1000));
        eprintln!("== fixed rate {rate}/s ({n} requests): herald, then pass-through");
        let run = HeraldRun::start(&bin, settings, &args, &nginx, &smtp, policy).await?;
        let fixed = run.load(n, Some(rate), &nginx, &smtp).await?;
        let _ = run.stop().await?;
        report.result(&format!("herald at {rate}/s"), &fixed);
        report.machine(&format!("machine at {rate}/s"), &fixed);
        report.counts(&format!("count check at {rate}/s"), &fixed);
        if !args.skip_baselines {
            let pt = measured_passthrough(&brokers, args.partitions, n, Some(rate)).await?;
            report.result(&format!("pass-through at {rate}/s"), &pt);
            report.machine(&format!("machine (pass-through at {rate}/s)"), &pt);
        }
    }

    if let Some(n) = args.soak {
        eprintln!(
            "== soak: {n} requests at {}/s, sampling RSS",
            args.soak_rate
        );
        let run = HeraldRun::start(&bin, settings, &args, &nginx, &smtp, policy).await?;
        let pid = run.child.id();
        let sampler = std::thread::spawn(move || sample_rss(pid));
        let soak = run.load(n, Some(args.soak_rate), &nginx, &smtp).await?;
        let stats = run.stop().await?;
        let samples = sampler.join().unwrap_or_default();
        report.result("soak", &soak);
        report.process("soak process", &stats, soak.notifications);
        report.machine("machine (soak)", &soak);
        report.counts("soak count check", &soak);
        report.rss_samples(&samples);
    }

    let text = report.render();
    println!("{text}");
    let mut existing =
        std::fs::read_to_string(&args.out).unwrap_or_else(|_| "# Benchmarks\n".to_string());
    existing.push_str(&text);
    std::fs::write(&args.out, existing)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("appended to {}", args.out.display());
    if !report.mismatches.is_empty() {
        bail!(
            "count check failed ({}): a request without exactly one final outcome, or a sink count off",
            report.mismatches.join(", ")
        );
    }
    Ok(())
}

/// RSS samples (seconds since start, KiB) every 2 s until the process exits.
fn sample_rss(pid: u32) -> Vec<(u64, u64)> {
    let start = Instant::now();
    let mut out = Vec::new();
    while let Some(rss) = proc_status_kib(pid, "VmRSS:") {
        out.push((start.elapsed().as_secs(), rss));
        std::thread::sleep(Duration::from_secs(2));
    }
    out
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The pass-through baseline, with the machine's CPU while it ran (it runs
/// inside this process: its consumer and producer count as the bench's).
async fn measured_passthrough(
    brokers: &str,
    partitions: i32,
    n: usize,
    rate: Option<u64>,
) -> anyhow::Result<LoadResult> {
    let before = machine::Snapshot::take();
    let mut pt = load::passthrough(brokers, partitions, n, rate).await?;
    pt.machine = Some(before.usage_until(&machine::Snapshot::take(), 0));
    Ok(pt)
}

/// CPU and memory of a finished herald run.
#[derive(Debug, Clone, Default)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub peak_rss_kib: u64,
}

/// A `herald serve` process with its own topics and database.
struct HeraldRun {
    child: Child,
    /// Herald's HTTP port (`/metrics`).
    http_port: u16,
    topics: load::Topics,
    mix: Mix,
    template: bool,
    batch: usize,
    /// The share of users whose notifications end `suppressed`: 0 without
    /// policy (nothing is looked up).
    muted_percent: usize,
    /// The share of users whose webhook endpoint fails.
    failing_percent: usize,
    /// `--scheduled-in` (max-rate loads).
    scheduled_in: Option<Duration>,
    brokers: String,
    cpu_at_start: f64,
    admin_database_url: String,
}

impl HeraldRun {
    async fn start(
        bin: &std::path::Path,
        settings: &Settings,
        args: &BenchArgs,
        nginx: &sinks::NginxSink,
        smtp: &sinks::SmtpSinkCounter,
        policy: bool,
    ) -> anyhow::Result<HeraldRun> {
        let brokers = settings.kafka.brokers.clone();
        let topics = load::Topics::create(&brokers, args.partitions).await?;
        let db = load::create_database(&args.admin_database_url, &topics.id).await?;
        let http_port = sinks::free_port()?;
        let mut env: Vec<(String, String)> = vec![
            ("HERALD_KAFKA__BROKERS".into(), brokers.clone()),
            (
                "HERALD_KAFKA__REQUEST_TOPICS".into(),
                topics.requests.clone(),
            ),
            (
                "HERALD_KAFKA__OUTCOME_TOPIC".into(),
                topics.outcomes.clone(),
            ),
            ("HERALD_KAFKA__DLQ_TOPIC".into(), topics.dlq.clone()),
            (
                "HERALD_KAFKA__GROUP_ID".into(),
                format!("bench-{}", topics.id),
            ),
            ("HERALD_DATABASE__URL".into(), db.clone()),
            ("HERALD_POLICY__ENABLED".into(), policy.to_string()),
            ("HERALD_HTTP__BIND".into(), format!("127.0.0.1:{http_port}")),
            ("HERALD_SMTP__HOST".into(), "127.0.0.1".into()),
            ("HERALD_SMTP__PORT".into(), smtp.port.to_string()),
            (
                "HERALD_WEBHOOK__ALLOW_PRIVATE_TARGETS".into(),
                "true".into(),
            ),
            (
                "HERALD_WEBHOOK__SIGNING_SECRET".into(),
                "bench-secret".into(),
            ),
        ];
        if args.failing_percent > 0 {
            for (k, v) in [
                ("HERALD_ROUTING__RETRY_BASE_MS", "50"),
                ("HERALD_ROUTING__RETRY_CAP_MS", "200"),
                ("HERALD_ROUTING__BUILTIN_MAX_RETRIES", "2"),
                ("HERALD_ROUTING__BREAKER_FAILURE_THRESHOLD", "1000000000"),
            ] {
                env.push((k.into(), v.into()));
            }
        }
        env.extend(args.set.iter().cloned());
        let child = Command::new(bin)
            .arg("serve")
            .envs(env)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        // Ready when /readyz answers 200.
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = client
                .get(format!("http://127.0.0.1:{http_port}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("herald did not become ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Stored before the first request, so no cache holds their absence.
        if policy {
            let users = load::store_preferences(&db, args.mix, args.shares())
                .await
                .context("storing the bench users' preferences")?;
            eprintln!("  stored preferences for {users} of {} users", load::USERS);
        }
        let spec = load::RequestSpec {
            mix: args.mix,
            template: args.template,
            batch: 1,
            webhook_url: nginx.url("/warm"),
            failing_url: String::new(),
            failing_percent: 0,
            scheduled_in: None,
        };
        load::warm_up(&brokers, &topics, &spec)
            .await
            .context("warming up herald")?;
        let cpu_at_start = machine::cpu_seconds(child.id()).unwrap_or(0.0);
        Ok(HeraldRun {
            child,
            http_port,
            topics,
            mix: args.mix,
            template: args.template,
            batch: args.batch,
            muted_percent: if policy { args.muted_percent.into() } else { 0 },
            failing_percent: args.failing_percent.into(),
            scheduled_in: args.scheduled_in.map(Duration::from_secs),
            brokers,
            cpu_at_start,
            admin_database_url: args.admin_database_url.clone(),
        })
    }

    async fn load(
        &self,
        n: usize,
        rate: Option<u64>,
        nginx: &sinks::NginxSink,
        smtp: &sinks::SmtpSinkCounter,
    ) -> anyhow::Result<LoadResult> {
        let (http_before, smtp_before) = (nginx.count("/hook"), smtp.count());
        let failing_before = nginx.count(sinks::FAILING_PATH);
        let spec = load::RequestSpec {
            mix: self.mix,
            template: self.template,
            batch: self.batch,
            webhook_url: nginx.url("/hook"),
            failing_url: nginx.url(sinks::FAILING_PATH),
            failing_percent: self.failing_percent,
            scheduled_in: self.scheduled_in,
        };
        let metrics_url = format!("http://127.0.0.1:{}/metrics", self.http_port);
        let client = reqwest::Client::new();
        let scrape = |c: reqwest::Client, url: String| async move {
            let page = c.get(&url).send().await.ok()?.text().await.ok()?;
            Some(load::consumed_and_in_flight(&page))
        };
        let (base, _) = scrape(client.clone(), metrics_url.clone())
            .await
            .unwrap_or((0, 0));
        let started = Instant::now();
        // Herald-side completion: every request consumed, nothing in flight.
        let watcher = tokio::spawn({
            let (client, url) = (client.clone(), metrics_url.clone());
            async move {
                loop {
                    if let Some((consumed, in_flight)) = scrape(client.clone(), url.clone()).await
                        && consumed >= base + n as u64
                        && in_flight == 0
                    {
                        return started.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let cpu_before = machine::Snapshot::take();
        let mut r = load::herald_load(&self.brokers, &self.topics, &spec, n, rate).await?;
        r.expected_suppressed = load::suppressed(n, self.batch, self.muted_percent);
        r.expected_failed = load::failing_notifications(
            n,
            self.batch,
            self.mix,
            self.muted_percent,
            self.failing_percent,
        );
        r.machine = Some(cpu_before.usage_until(&machine::Snapshot::take(), self.child.id()));
        let abort = watcher.abort_handle();
        r.drained = tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .ok()
            .and_then(Result::ok);
        abort.abort();
        // nginx flushes its log every second
        tokio::time::sleep(Duration::from_millis(1500)).await;
        r.sink_http = nginx.count("/hook").saturating_sub(http_before);
        r.sink_smtp = smtp.count().saturating_sub(smtp_before);
        r.sink_failing = nginx
            .count(sinks::FAILING_PATH)
            .saturating_sub(failing_before);
        Ok(r)
    }

    async fn stop(mut self) -> anyhow::Result<ProcessStats> {
        let pid = self.child.id();
        let cpu = machine::cpu_seconds(pid).unwrap_or(0.0) - self.cpu_at_start;
        let peak = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status();
        let _ = self.child.wait();
        if let Err(e) = load::drop_database(&self.admin_database_url, &self.topics.id).await {
            eprintln!("  (could not drop the run's database: {e:#})");
        }
        Ok(ProcessStats {
            cpu_seconds: cpu,
            peak_rss_kib: peak,
        })
    }
}

/// Collects results and renders the Markdown section.
struct Report {
    header: String,
    lines: Vec<(String, String)>,
    pass_through: Option<f64>,
    herald: Option<f64>,
    /// The max-rate run without policy (`--policy compare`).
    herald_policy_off: Option<f64>,
    raw_http: Option<f64>,
    raw_smtp: Option<f64>,
    raw_lettre: Option<f64>,
    /// Labels of the count checks that failed.
    mismatches: Vec<String>,
    mix: Mix,
    /// Requests the failing endpoint gets per failing notification.
    failing_attempts: usize,
}

impl Report {
    fn new(args: &BenchArgs, command_line: String) -> Report {
        let commit = Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mem_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .next()?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        let header = format!(
            "\n## {} — commit {commit}\n\nMachine: {cores} cores, {:.0} GiB. Broker, PostgreSQL, sinks, load generator and Herald co-located.\n\nCommand: `{command_line}`\n\nMix: {:?}, template: {}, batch: {}, partitions: {}, requests: {}, policy: {:?}, muted: {}%, capped: {}%, failing: {}%, scheduled in: {}\n\n",
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
            mem_kib as f64 / 1024.0 / 1024.0,
            args.mix,
            args.template,
            args.batch,
            args.partitions,
            args.requests,
            args.policy,
            args.muted_percent,
            args.capped_percent,
            args.failing_percent,
            args.scheduled_in
                .map_or("-".to_string(), |s| format!("{s} s")),
        );
        Report {
            header,
            lines: Vec::new(),
            pass_through: None,
            herald: None,
            herald_policy_off: None,
            raw_http: None,
            raw_smtp: None,
            raw_lettre: None,
            mismatches: Vec::new(),
            mix: args.mix,
            failing_attempts: args.failing_attempts(),
        }
    }

    fn line(&mut self, what: &str, value: String) {
        self.lines.push((what.to_string(), value));
    }

    fn result(&mut self, what: &str, r: &LoadResult) {
        let l = &r.latency_ms;
        self.line(
            what,
            format!(
                "{:.0} notifications/s over {:.2} s; latency ms p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
                r.rate(),
                r.elapsed.as_secs_f64(),
                l.p(50.0),
                l.p(90.0),
                l.p(99.0),
                l.p(99.9),
                l.max()
            ),
        );
    }

    fn drained(&mut self, what: &str, r: &LoadResult, requests: usize) {
        let value = match r.drained {
            Some(d) => format!(
                "all {requests} requests consumed and settled after {:.2} s: {:.0} requests/s",
                d.as_secs_f64(),
                requests as f64 / d.as_secs_f64().max(1e-9)
            ),
            None => "not every request was consumed and settled".to_string(),
        };
        self.line(what, value);
    }

    /// A scheduled load (`--scheduled-in`): how fast the scheduler sent
    /// the backlog once it was due.
    fn released(&mut self, what: &str, r: &LoadResult) {
        if let Some(d) = r.released {
            self.line(
                what,
                format!(
                    "{} final outcomes, the last {:.2} s after the release: {:.0} notifications/s",
                    r.final_distinct,
                    d.as_secs_f64(),
                    r.final_distinct as f64 / d.as_secs_f64().max(1e-9)
                ),
            );
        }
    }

    fn process(&mut self, what: &str, s: &ProcessStats, notifications: usize) {
        let per = if notifications > 0 {
            s.cpu_seconds * 1e6 / notifications as f64
        } else {
            0.0
        };
        self.line(
            what,
            format!(
                "{:.2} CPU s ({per:.0} µs/notification), peak RSS {:.1} MiB",
                s.cpu_seconds,
                s.peak_rss_kib as f64 / 1024.0
            ),
        );
    }

    /// Where the machine's CPU went while the load ran.
    fn machine(&mut self, what: &str, r: &LoadResult) {
        if let Some(m) = &r.machine {
            self.line(what, m.render());
        }
    }

    /// Every request has exactly one final outcome, exactly the
    /// notifications the stored preferences mute are `suppressed`, exactly
    /// those to a failing endpoint are `failed` after every attempt reached
    /// it, and the sinks saw one message per other notification; a failure
    /// is also remembered in `mismatches`, and makes the run exit non-zero.
    fn counts(&mut self, what: &str, r: &LoadResult) {
        let ok = r.final_distinct == r.notifications
            && r.duplicate_finals == 0
            && r.suppressed == r.expected_suppressed
            && r.failed == r.expected_failed;
        let sendable = r
            .notifications
            .saturating_sub(r.expected_suppressed + r.expected_failed);
        let sink = r.sink_failing == r.expected_failed * self.failing_attempts
            && match self.mix {
                Mix::Webhook => r.sink_http == sendable,
                Mix::Email => r.sink_smtp == sendable,
                Mix::Mixed => r.sink_http + r.sink_smtp == sendable,
            };
        if !(ok && sink) {
            self.mismatches.push(what.to_string());
        }
        self.line(
            what,
            format!(
                "{} final outcomes for {} notifications ({} duplicate finals; {} suppressed, {} expected; {} failed, {} expected), sinks saw http {} + smtp {}, failing endpoint {}: {}",
                r.final_distinct,
                r.notifications,
                r.duplicate_finals,
                r.suppressed,
                r.expected_suppressed,
                r.failed,
                r.expected_failed,
                r.sink_http,
                r.sink_smtp,
                r.sink_failing,
                if ok && sink { "OK" } else { "MISMATCH" }
            ),
        );
    }

    fn rss_samples(&mut self, samples: &[(u64, u64)]) {
        let mibs: Vec<String> = samples
            .iter()
            .map(|(t, k)| format!("{t}s:{:.0}", *k as f64 / 1024.0))
            .collect();
        let min = samples.iter().map(|s| s.1).min().unwrap_or(0) as f64 / 1024.0;
        let max = samples.iter().map(|s| s.1).max().unwrap_or(0) as f64 / 1024.0;
        let half = samples.len() / 2;
        let first = samples
            .iter()
            .take(half.max(1))
            .map(|s| s.1)
            .max()
            .unwrap_or(0) as f64
            / 1024.0;
        let second = samples.iter().skip(half).map(|s| s.1).max().unwrap_or(0) as f64 / 1024.0;
        self.line("soak RSS MiB (t:MiB)", mibs.join(" "));
        self.line(
            "soak RSS flat?",
            format!("min {min:.0} max {max:.0}; max first half {first:.0} vs second half {second:.0}: {}",
                if second <= first * 1.1 + 2.0 { "flat" } else { "GROWING" }),
        );
    }

    fn render(&self) -> String {
        let mut s = self.header.clone();
        s.push_str("| measurement | result |\n|---|---|\n");
        for (k, v) in &self.lines {
            s.push_str(&format!("| {k} | {v} |\n"));
        }
        if let (Some(h), Some(p)) = (self.herald, self.pass_through) {
            s.push_str(&format!("| herald / pass-through | {:.2} |\n", h / p));
        }
        if let (Some(on), Some(off)) = (self.herald, self.herald_policy_off) {
            s.push_str(&format!(
                "| herald policy on / policy off | {:.2} |\n",
                on / off
            ));
        }
        match self.mix {
            Mix::Webhook => {
                if let (Some(h), Some(r)) = (self.herald, self.raw_http) {
                    s.push_str(&format!("| herald / raw HTTP sink rate | {:.2} |\n", h / r));
                }
            }
            Mix::Email | Mix::Mixed => {
                if let (Some(h), Some(r)) = (self.herald, self.raw_lettre) {
                    s.push_str(&format!(
                        "| herald / raw lettre → smtp-sink rate | {:.2} |\n",
                        h / r
                    ));
                }
                if let (Some(h), Some(r)) = (self.herald, self.raw_smtp) {
                    s.push_str(&format!(
                        "| herald / Herald's SMTP adapter alone (pipelined) | {:.2} |\n",
                        h / r
                    ));
                }
            }
        }
        s
    }
}

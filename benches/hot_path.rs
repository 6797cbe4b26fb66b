//! CPU per notification of the steps Herald runs in process, on the very
//! requests `herald bench` produces: decoding (JSON, schema, domain types),
//! rendering, and encoding the outcome event. No broker, database or sink:
//! this isolates what the end-to-end bench cannot (its CPU figure moves a few
//! µs between identical runs; these move a few ns).
//!
//! Run: `cargo bench --bench hot_path` (add `-- decode` to run the steps
//! whose name contains `decode`). Results in BENCHMARKS.md. Under
//! `cargo test --all-targets` each step only runs a few times: a check that
//! the harness and the steps still work, not a measurement.

use std::hint::black_box;
use std::time::{Duration, Instant};

use herald::bench::load::{Mix, RequestSpec, build_request};
use herald::config::Settings;
use herald::domain::decode::{Decoded, decode_message};
use herald::domain::outcome::{DeliveryStatusEvent, Status};
use herald::domain::request::Notification;
use herald::render::{FileRenderer, Renderer};

/// The allocator `herald serve` runs with (src/main.rs).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Rounds per step; the report gives their median and spread.
const ROUNDS: usize = 7;
/// Each round runs for about this long.
const ROUND: Duration = Duration::from_millis(300);

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let timed = std::env::args().any(|a| a == "--bench");
    let settings = match Settings::load(None) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot load the default settings: {e}");
            std::process::exit(2);
        }
    };
    let renderer = match FileRenderer::new(&settings.templates) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "cannot load templates from {}: {e}",
                settings.templates.dir.display()
            );
            std::process::exit(2);
        }
    };
    let max = settings.pipeline.max_request_bytes;

    if timed {
        println!("{:<34} {:>10} {:>16}", "step", "ns/op", "spread (min-max)");
    }
    for template in [false, true] {
        let spec = RequestSpec {
            mix: Mix::Webhook,
            template,
            batch: 1,
            webhook_url: "http://127.0.0.1:8080/hook".into(),
            failing_url: "http://127.0.0.1:8081/hook".into(),
            failing_percent: 0,
            scheduled_in: None,
        };
        let kind = if template { "template" } else { "inline" };
        let requests: Vec<Vec<u8>> = (0..1024)
            .map(|i| build_request(&spec, "hot", i, None).2)
            .collect();
        let notifications: Vec<Notification> = requests
            .iter()
            .map(|b| match decode_message(b, max) {
                Ok(Decoded::Notify(r)) => r.into_notifications().next(),
                _ => None,
            })
            .map(|n| n.unwrap_or_else(|| panic!("the bench's {kind} request does not decode")))
            .collect();

        step(&filter, timed, &format!("decode ({kind} webhook)"), |i| {
            let r = decode_message(&requests[i % requests.len()], max);
            black_box(r.is_ok())
        });
        step(&filter, timed, &format!("render ({kind} webhook)"), |i| {
            let r = renderer.render(&notifications[i % notifications.len()]);
            black_box(r.is_ok())
        });
        step(
            &filter,
            timed,
            &format!("outcome event ({kind} webhook)"),
            |i| {
                let n = &notifications[i % notifications.len()];
                let mut e = DeliveryStatusEvent::for_notification(n, Status::Sent, 1);
                e.provider = Some("webhook".into());
                e.provider_message_id = Some(n.id.clone());
                black_box(serde_json::to_vec(&e).is_ok_and(|v| !v.is_empty()))
            },
        );
    }
}

/// Runs `f` (which says whether the step succeeded) in rounds of about
/// [`ROUND`] and prints the median time per call; unless `timed` (`cargo
/// bench` passes `--bench`, `cargo test` does not), only calls it a few
/// times and fails if a call did not succeed.
fn step(filter: &Option<String>, timed: bool, name: &str, mut f: impl FnMut(usize) -> bool) {
    if filter.as_deref().is_some_and(|p| !name.contains(p)) {
        return;
    }
    if !timed {
        for i in 0..16 {
            assert!(f(i), "{name}: call {i} failed");
        }
        println!("{name:<34} ran (not timed: run with cargo bench)");
        return;
    }
    // Warm up, and size a round.
    let start = Instant::now();
    let mut calls = 0usize;
    while start.elapsed() < ROUND / 3 {
        black_box(f(calls));
        calls += 1;
    }
    let per_round = (calls * 3).max(1);
    let mut ns: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for i in 0..per_round {
                black_box(f(i));
            }
            start.elapsed().as_nanos() as f64 / per_round as f64
        })
        .collect();
    ns.sort_by(f64::total_cmp);
    println!(
        "{:<34} {:>10.0} {:>7.0}-{:<8.0}",
        name,
        ns[ROUNDS / 2],
        ns[0],
        ns[ROUNDS - 1]
    );
}

//! `herald bench` end to end at a small size: the harness the numbers
//! come from (baselines, a separate `herald serve` process, fixed rate, soak,
//! count checks at the sinks and on the outcome topic) runs against the real
//! broker, PostgreSQL, nginx and smtp-sink. No rates are asserted: only that
//! every run completes and every count check passes.

use std::process::{Command, Stdio};

use crate::helpers::{admin_database_url, brokers};

fn bench(out: &std::path::Path, args: &[&str]) -> String {
    let bin = env!("CARGO_BIN_EXE_herald");
    let output = Command::new(bin)
        .arg("bench")
        .args(["--herald-bin", bin, "--admin-database-url"])
        .arg(admin_database_url())
        .arg("--out")
        .arg(out)
        .args(args)
        .env("HERALD_KAFKA__BROKERS", brokers())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run herald bench");
    let report = std::fs::read_to_string(out).unwrap_or_default();
    assert!(
        output.status.success(),
        "herald bench {args:?} failed: {}\n--- stderr\n{}\n--- report\n{report}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    report
}

/// The report's rows whose first cell starts with `what` (`| what…`).
fn rows<'a>(report: &'a str, what: &str) -> Vec<&'a str> {
    report
        .lines()
        .filter(|l| l.starts_with(&format!("| {what}")))
        .collect()
}

/// The report's rows whose first cell is exactly `what`.
fn row<'a>(report: &'a str, what: &str) -> Vec<&'a str> {
    rows(report, &format!("{what} |"))
}

#[test]
fn the_bench_runs_every_phase_and_every_count_check_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("BENCH.md");
    let report = bench(
        &out,
        &["--requests", "400", "--soak", "300", "--soak-rate", "200"],
    );
    for what in [
        "broker raw produce",
        "pass-through (max rate)",
        "raw reqwest → nginx",
        "raw lettre (nodelay, 16 connections) → smtp-sink",
        "raw SMTP (Herald's adapter alone, pool of 16) → smtp-sink",
        "herald (max rate)",
        "herald process",
        "machine (max rate)",
        "machine (pass-through, max rate)",
        "machine (soak)",
        "soak RSS flat?",
        "herald / pass-through",
    ] {
        assert_eq!(row(&report, what).len(), 1, "no `{what}` row in\n{report}");
    }
    // The max-rate run, the fixed-rate run at half of it, and the soak.
    let checks: Vec<&str> = report
        .lines()
        .filter(|l| l.contains("count check"))
        .collect();
    assert_eq!(checks.len(), 3, "{report}");
    for c in &checks {
        assert!(c.contains("sinks saw http") && c.ends_with(": OK |"), "{c}");
    }
    // Requests 0, 100, 200 and 300 go to users who muted the bench's category.
    assert!(
        row(&report, "count check")[0].contains(
            "400 final outcomes for 400 notifications (0 duplicate finals; 4 suppressed, 4 expected; 0 failed, 0 expected), sinks saw http 396 + smtp 0, failing endpoint 0: OK"
        ),
        "{report}"
    );
    assert_eq!(rows(&report, "pass-through at").len(), 1, "{report}");
    assert_eq!(rows(&report, "machine at").len(), 1, "{report}");
    assert_eq!(
        rows(&report, "machine (pass-through at").len(),
        1,
        "{report}"
    );
    let machine = row(&report, "machine (max rate)")[0];
    assert!(
        machine.contains("herald serve") && machine.contains("machine idle"),
        "{machine}"
    );
}

#[test]
fn the_email_bench_counts_every_message_at_the_smtp_sink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("BENCH.md");
    let report = bench(
        &out,
        &[
            "--mix",
            "email",
            "--template",
            "--requests",
            "200",
            "--scheduled-in",
            "3",
            "--skip-baselines",
            "--skip-fixed-rate",
        ],
    );
    // Scheduled 3 s ahead: stored as scheduled rows, released together by
    // the due-work scheduler.
    let release = row(&report, "herald (max rate), release");
    assert_eq!(release.len(), 1, "{report}");
    assert!(
        release[0].contains("200 final outcomes, the last"),
        "{report}"
    );
    assert!(report.contains("scheduled in: 3 s"), "{report}");
    let check = row(&report, "count check");
    assert_eq!(check.len(), 1, "{report}");
    assert!(
        check[0].contains("200 final outcomes for 200 notifications (0 duplicate finals; 2 suppressed, 2 expected; 0 failed, 0 expected), sinks saw http 0 + smtp 198, failing endpoint 0: OK"),
        "{report}"
    );
}

#[test]
fn the_policy_comparison_runs_with_and_without_stored_preferences() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("BENCH.md");
    let report = bench(
        &out,
        &[
            "--policy",
            "compare",
            "--failing-percent",
            "2",
            "--requests",
            "300",
            "--skip-baselines",
            "--skip-fixed-rate",
        ],
    );
    // With policy: the users who muted the category (requests 0, 100, 200)
    // get `suppressed` and nothing at the sink. Both runs: the failing
    // users' requests (25, 26, 125, 126, 225, 226) end `failed` after three
    // attempts each at the failing endpoint (two retries through the due
    // work).
    let on = row(&report, "count check");
    assert_eq!(on.len(), 1, "{report}");
    assert!(
        on[0].contains("300 final outcomes for 300 notifications (0 duplicate finals; 3 suppressed, 3 expected; 6 failed, 6 expected), sinks saw http 291 + smtp 0, failing endpoint 18: OK"),
        "{report}"
    );
    // Without: everything is sent.
    let off = row(&report, "count check (policy off)");
    assert_eq!(off.len(), 1, "{report}");
    assert!(
        off[0].contains("300 final outcomes for 300 notifications (0 duplicate finals; 0 suppressed, 0 expected; 6 failed, 6 expected), sinks saw http 294 + smtp 0, failing endpoint 18: OK"),
        "{report}"
    );
    for what in [
        "herald (max rate, policy off)",
        "herald process (policy off)",
        "machine (max rate, policy off)",
        "herald policy on / policy off",
    ] {
        assert_eq!(row(&report, what).len(), 1, "no `{what}` row in\n{report}");
    }
    assert!(report.contains("policy: Compare"), "{report}");
    assert!(report.contains("failing: 2%"), "{report}");
}

/// Runs `herald bench ARGS`, which must refuse them; returns its stderr.
fn refused(args: &[&str]) -> String {
    let bin = env!("CARGO_BIN_EXE_herald");
    let output = Command::new(bin)
        .args(["bench", "--herald-bin", bin])
        .args(args)
        .env("HERALD_KAFKA__BROKERS", brokers())
        .stdin(Stdio::null())
        .output()
        .expect("run herald bench");
    assert!(!output.status.success(), "herald bench {args:?} ran");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn policy_cannot_also_be_set_through_set() {
    let stderr = refused(&["--set", "HERALD_POLICY__ENABLED=false"]);
    assert!(stderr.contains("use --policy"), "{stderr}");
}

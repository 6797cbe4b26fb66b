//! Recipient policy through the real path: preferences in PostgreSQL (and
//! on the preferences topic), requests on the request topic, the due-work
//! scheduler, outcomes on the outcome topic, deliveries at a real HTTP sink.
//!
//! Where a test would have to wait for an hour or a night, it moves the due
//! time of the row in the database instead ("time travel"); the decision
//! itself is tested with an injected clock in `src/policy`.

use std::time::Duration;

use chrono::{DateTime, NaiveTime, Utc};
use serde_json::{Value, json};

use herald::domain::Channel;
use herald::policy::PreferenceRecord;
use herald::policy::quiet_hours::QuietHours;
use herald::store::PreferenceStore;

use crate::helpers::*;

const WAIT: Duration = Duration::from_secs(60);

fn events_of(events: &[Value], id: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["notification_id"] == id)
        .cloned()
        .collect()
}

fn time(e: &Value, field: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(e[field].as_str().expect(field))
        .expect("rfc3339")
        .with_timezone(&Utc)
}

fn prefs(tenant: &str, user: &str) -> PreferenceRecord {
    PreferenceRecord::empty(tenant, user, Channel::Webhook, Utc::now())
}

/// A quiet window in New York that started an hour ago and ends `secs`
/// seconds from now.
fn window_ending_in(secs: i64) -> (NaiveTime, NaiveTime) {
    let local = Utc::now()
        .with_timezone(&chrono_tz::America::New_York)
        .time();
    let start = local.overflowing_sub_signed(chrono::Duration::hours(1)).0;
    let end = local
        .overflowing_add_signed(chrono::Duration::seconds(secs))
        .0;
    let trunc = |t: NaiveTime| {
        NaiveTime::from_num_seconds_from_midnight_opt(
            chrono::Timelike::num_seconds_from_midnight(&t),
            0,
        )
        .expect("time")
    };
    (trunc(start), trunc(end))
}

fn request(id: &str, user: &str, url: Option<&str>) -> Value {
    let mut recipient = json!({ "user_id": user });
    if let Some(u) = url {
        recipient["url"] = json!(u);
    }
    json!({
        "id": id,
        "tenant_id": "acme",
        "channel": "webhook",
        "recipient": recipient,
        "content": { "text": "hello {{ notification.id }}" }
    })
}

async fn send(env: &TestEnv, key: &str, v: &Value) {
    produce(&producer(), &env.requests, key, v.to_string().as_bytes()).await;
}

/// Sends one plain request and waits for its outcome, so the app has joined
/// the group and later requests are processed within moments (tests with
/// short real waits depend on that).
async fn warm_up(env: &TestEnv, sink: &HttpSink, out: &mut TopicReader) {
    let id = format!("warm-up-{}", suffix());
    send(
        env,
        "warm-up",
        &request(&id, "u-warm-up", Some(&sink.url("warm-up"))),
    )
    .await;
    out.wait_for(WAIT, &[(&id, "sent")]).await;
}

/// Time travel: the waiting row `id` is due now and its `expires_at` has
/// just passed.
async fn expire_and_make_due(env: &TestEnv, id: &str) {
    sqlx::query(
        "UPDATE notifications SET next_attempt_at = now(),
             payload = jsonb_set(payload, '{expires_at}', to_jsonb(now() - interval '1 second'))
         WHERE id = $1",
    )
    .bind(id)
    .execute(&env.pool().await)
    .await
    .expect("time travel");
}

/// Concurrent lookups share statements; each must still get its own
/// recipient's levels and suppression, never a neighbour's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_preference_lookups_each_get_their_own_answer() {
    let env = TestEnv::new(1).await;
    let store = PreferenceStore::new(env.pool().await);
    let n = 200;
    for i in (0..n).filter(|i| i % 3 == 0) {
        let mut r = prefs("acme", &format!("u-{i}"));
        r.enabled = Some(false);
        r.max_per_day = Some(i);
        store.upsert(&r).await.expect("upsert");
    }
    for i in (0..n).filter(|i| i % 4 == 0) {
        let address = format!("http://127.0.0.1:9/{i}");
        store
            .suppress("acme", &address, None)
            .await
            .expect("suppress");
    }
    let lookups = (0..n).map(|i| {
        let store = store.clone();
        async move {
            let user = format!("u-{i}");
            let address = format!("http://127.0.0.1:9/{i}");
            let asked = (i % 2 == 0).then_some(address.as_str());
            let got = store
                .lookup("acme", &user, Channel::Webhook, asked)
                .await
                .expect("lookup");
            (i, got)
        }
    });
    let answers = futures::future::join_all(lookups).await;
    for (i, (levels, suppressed)) in answers {
        let expected_suppressed = (i % 2 == 0).then_some(i % 4 == 0);
        assert_eq!(suppressed, expected_suppressed, "suppression of u-{i}");
        if i % 3 == 0 {
            assert_eq!(levels.len(), 1, "levels of u-{i}: {levels:?}");
            assert_eq!(levels[0].user_id, format!("u-{i}"));
            assert_eq!(levels[0].enabled, Some(false));
            assert_eq!(levels[0].max_per_day, Some(i));
        } else {
            assert!(levels.is_empty(), "u-{i} has no stored levels: {levels:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preferences_suppress_with_the_right_reason_and_resolve_addresses() {
    let env = TestEnv::new(2).await;
    let sink = HttpSink::start().await;
    let store = PreferenceStore::new(env.pool().await);
    let mut disabled = prefs("acme", "u-disabled");
    disabled.enabled = Some(false);
    let mut opted_out = prefs("acme", "u-out");
    opted_out.opt_in = Some(false);
    let mut muted = prefs("acme", "u-muted");
    muted.muted_categories = Some(vec!["digest".into()]);
    let mut resolved = prefs("acme", "u-resolved");
    resolved.address = Some(sink.url("resolved"));
    for r in [&disabled, &opted_out, &muted, &resolved] {
        store.upsert(r).await.expect("upsert");
    }
    store
        .suppress("acme", &sink.url("bounced"), Some("hard_bounce"))
        .await
        .expect("suppress");
    let app = RunningApp::start(env.settings(&[])).await;

    let s = suffix();
    let ids: Vec<String> = [
        "disabled",
        "out",
        "muted",
        "marketing",
        "suppressed",
        "resolved",
        "noaddr",
    ]
    .iter()
    .map(|n| format!("{n}-{s}"))
    .collect();
    let mut muted_req = request(&ids[2], "u-muted", Some(&sink.url("m")));
    muted_req["category"] = json!("digest");
    // marketing needs an explicit opt-in (policy.opt_in_required_categories)
    let mut marketing = request(&ids[3], "u-nobody", Some(&sink.url("mk")));
    marketing["category"] = json!("marketing");
    let requests = [
        request(&ids[0], "u-disabled", Some(&sink.url("d"))),
        request(&ids[1], "u-out", Some(&sink.url("o"))),
        muted_req,
        marketing,
        request(&ids[4], "u-plain", Some(&sink.url("bounced"))),
        request(&ids[5], "u-resolved", None),
        request(&ids[6], "u-unknown", None),
    ];
    for r in &requests {
        send(&env, "acme:any", r).await;
    }
    let mut out = TopicReader::new(&env.outcomes, env.partitions);
    let expected = [
        (ids[0].as_str(), "suppressed", "channel_disabled"),
        (ids[1].as_str(), "suppressed", "not_opted_in"),
        (ids[2].as_str(), "suppressed", "category_muted"),
        (ids[3].as_str(), "suppressed", "not_opted_in"),
        (ids[4].as_str(), "suppressed", "suppressed_address"),
        (ids[5].as_str(), "sent", ""),
        (ids[6].as_str(), "failed", "no_address"),
    ];
    let wanted: Vec<(&str, &str)> = expected.iter().map(|(i, s, _)| (*i, *s)).collect();
    out.wait_for(WAIT, &wanted).await;
    let events = out.events();
    for (id, status, reason) in expected {
        let mine = events_of(&events, id);
        assert_eq!(mine.len(), 1, "{id}: {mine:?}");
        assert_eq!(mine[0]["status"], status, "{id}: {mine:?}");
        if !reason.is_empty() {
            assert_eq!(mine[0]["reason"], reason, "{id}: {mine:?}");
        }
    }
    let received = sink.received();
    assert_eq!(received.len(), 1, "only the resolved one is sent");
    assert_eq!(
        received[0]
            .headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok()),
        Some(ids[5].as_str())
    );
    let metrics = reqwest::get(format!("http://{}/metrics", app.http))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.contains(
            "herald_policy_decisions_total{outcome=\"suppressed\",reason=\"channel_disabled\"} 1"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("herald_due_queue_depth"), "{metrics}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quiet_hours_defer_until_the_window_ends_and_urgent_bypasses() {
    let env = TestEnv::new(2).await;
    let sink = HttpSink::start().await;
    let store = PreferenceStore::new(env.pool().await);
    let mut p = prefs("acme", "u-night");
    p.quiet_hours_timezone = Some("America/New_York".into());
    let app = RunningApp::start(env.settings(&[])).await;
    let mut out = TopicReader::new(&env.outcomes, env.partitions);
    warm_up(&env, &sink, &mut out).await;
    let (start, end) = window_ending_in(5);
    p.quiet_hours_start = Some(start);
    p.quiet_hours_end = Some(end);
    store.upsert(&p).await.expect("upsert");

    let s = suffix();
    let normal = format!("night-{s}");
    let urgent = format!("urgent-{s}");
    send(
        &env,
        "acme:u-night",
        &request(&normal, "u-night", Some(&sink.url("n"))),
    )
    .await;
    let mut u = request(&urgent, "u-night", Some(&sink.url("u")));
    u["priority"] = json!("urgent");
    send(&env, "acme:u-night", &u).await;

    out.wait_for(WAIT, &[(&normal, "deferred"), (&urgent, "sent")])
        .await;
    let events = out.events();
    assert_eq!(statuses(&events, &urgent), vec!["sent"], "urgent bypasses");
    let deferred = &events_of(&events, &normal)[0];
    assert_eq!(deferred["reason"], "quiet_hours");
    let q = QuietHours {
        start,
        end,
        tz: chrono_tz::America::New_York,
    };
    let due = time(deferred, "next_attempt_at");
    assert_eq!(
        Some(due),
        q.window_end(time(deferred, "occurred_at")),
        "due when the window ends in New York"
    );

    out.wait_for(WAIT, &[(&normal, "sent")]).await;
    let events = out.events();
    assert_eq!(statuses(&events, &normal), vec!["deferred", "sent"]);
    let sent = &events_of(&events, &normal)[1];
    assert!(
        time(sent, "occurred_at") >= due,
        "fired at the window end: {sent}"
    );
    assert_eq!(sent["attempt"], 1);
    assert_eq!(sink.received().len(), 3, "warm-up, urgent, deferred");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduled_is_sent_after_its_time_and_expiry_while_deferred_sends_nothing() {
    let env = TestEnv::new(2).await;
    let sink = HttpSink::start().await;
    let store = PreferenceStore::new(env.pool().await);
    let (start, end) = window_ending_in(3600);
    let mut p = prefs("acme", "u-q");
    p.quiet_hours_start = Some(start);
    p.quiet_hours_end = Some(end);
    p.quiet_hours_timezone = Some("America/New_York".into());
    store.upsert(&p).await.expect("upsert");
    let app = RunningApp::start(env.settings(&[])).await;
    let mut out = TopicReader::new(&env.outcomes, env.partitions);
    warm_up(&env, &sink, &mut out).await;

    let s = suffix();
    let scheduled = format!("sched-{s}");
    let expiring = format!("exp-{s}");
    let at = Utc::now() + chrono::Duration::seconds(2);
    let mut r = request(&scheduled, "u-s", Some(&sink.url("s")));
    r["scheduled_at"] = json!(at.to_rfc3339());
    send(&env, "acme:u-s", &r).await;
    let mut e = request(&expiring, "u-q", Some(&sink.url("e")));
    e["expires_at"] = json!((Utc::now() + chrono::Duration::minutes(30)).to_rfc3339());
    send(&env, "acme:u-q", &e).await;
    out.wait_for(WAIT, &[(&scheduled, "sent"), (&expiring, "deferred")])
        .await;
    // Its expiry passes while it waits (time travel), then it is due.
    expire_and_make_due(&env, &expiring).await;
    out.wait_for(WAIT, &[(&expiring, "expired")]).await;
    let events = out.events();
    assert_eq!(statuses(&events, &scheduled), vec!["scheduled", "sent"]);
    let first = &events_of(&events, &scheduled)[0];
    assert_eq!(first["reason"], "scheduled");
    assert_eq!(
        time(first, "next_attempt_at"),
        at.with_nanosecond_zeroed_ms()
    );
    let sent = &events_of(&events, &scheduled)[1];
    assert!(
        time(sent, "occurred_at") >= at,
        "not before scheduled_at: {sent}"
    );
    assert_eq!(statuses(&events, &expiring), vec!["deferred", "expired"]);
    let received = sink.received();
    assert_eq!(
        received.len(),
        2,
        "warm-up and the scheduled one; the expired one is never sent"
    );
    app.stop().await;
}

/// `scheduled_at` and `expires_at` are the request's own, not recipient
/// policy: with `policy.enabled = false` a scheduled request still waits
/// for its time, and an expired one (on arrival, or while it waits) is
/// never sent. Stored preferences, by contrast, are not consulted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_policy_the_request_s_own_schedule_and_expiry_still_hold() {
    let env = TestEnv::new(2).await;
    let sink = HttpSink::start().await;
    let store = PreferenceStore::new(env.pool().await);
    let mut muted = prefs("acme", "u-off");
    muted.enabled = Some(false);
    store.upsert(&muted).await.expect("upsert");
    let app = RunningApp::start(env.settings(&[("HERALD_POLICY__ENABLED", "false".into())])).await;
    let mut out = TopicReader::new(&env.outcomes, env.partitions);
    warm_up(&env, &sink, &mut out).await;

    let s = suffix();
    let scheduled = format!("sched-{s}");
    let expired = format!("expired-{s}");
    let expiring = format!("expiring-{s}");
    let unmanaged = format!("off-{s}");
    let at = Utc::now() + chrono::Duration::seconds(2);
    let mut r = request(&scheduled, "u-s", Some(&sink.url("s")));
    r["scheduled_at"] = json!(at.to_rfc3339());
    send(&env, "acme:u-s", &r).await;
    let mut r = request(&expired, "u-x", Some(&sink.url("x")));
    r["expires_at"] = json!((Utc::now() - chrono::Duration::seconds(1)).to_rfc3339());
    send(&env, "acme:u-x", &r).await;
    let mut r = request(&expiring, "u-e", Some(&sink.url("e")));
    r["scheduled_at"] = json!((Utc::now() + chrono::Duration::hours(1)).to_rfc3339());
    r["expires_at"] = json!((Utc::now() + chrono::Duration::hours(2)).to_rfc3339());
    send(&env, "acme:u-e", &r).await;
    // Stored preferences say "disabled", but without policy they are not read.
    send(
        &env,
        "acme:u-off",
        &request(&unmanaged, "u-off", Some(&sink.url("off"))),
    )
    .await;
    out.wait_for(
        WAIT,
        &[
            (&scheduled, "sent"),
            (&expired, "expired"),
            (&expiring, "scheduled"),
            (&unmanaged, "sent"),
        ],
    )
    .await;
    // The scheduled one's expiry passes while it waits (time travel).
    expire_and_make_due(&env, &expiring).await;
    out.wait_for(WAIT, &[(&expiring, "expired")]).await;

    let events = out.events();
    assert_eq!(statuses(&events, &scheduled), vec!["scheduled", "sent"]);
    let sent = &events_of(&events, &scheduled)[1];
    assert!(
        time(sent, "occurred_at") >= at,
        "not before scheduled_at: {sent}"
    );
    assert_eq!(statuses(&events, &expired), vec!["expired"]);
    assert_eq!(events_of(&events, &expired)[0]["reason"], "expired");
    assert_eq!(statuses(&events, &expiring), vec!["scheduled", "expired"]);
    assert_eq!(statuses(&events, &unmanaged), vec!["sent"]);
    let paths: Vec<String> = sink.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths.len(), 3, "warm-up, scheduled, unmanaged: {paths:?}");
    assert!(!paths.iter().any(|p| p == "/x" || p == "/e"), "{paths:?}");
    app.stop().await;
}

/// Rounds to what the outcome event carries (RFC 3339 round trip).
trait Rfc3339Round {
    fn with_nanosecond_zeroed_ms(self) -> DateTime<Utc>;
}

impl Rfc3339Round for DateTime<Utc> {
    fn with_nanosecond_zeroed_ms(self) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(&self.to_rfc3339())
            .expect("rfc3339")
            .with_timezone(&Utc)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frequency_cap_throttles_then_sends_in_the_next_window_or_drops_marketing() {
    let env = TestEnv::new(2).await;
    let sink = HttpSink::start().await;
    let pool = env.pool().await;
    let store = PreferenceStore::new(pool.clone());
    let mut p = prefs("acme", "u-cap");
    p.max_per_hour = Some(3);
    p.opt_in = Some(true);
    store.upsert(&p).await.expect("upsert");
    let app = RunningApp::start(env.settings(&[])).await;

    let s = suffix();
    let ids: Vec<String> = (0..5).map(|i| format!("cap-{s}-{i}")).collect();
    for id in &ids {
        send(
            &env,
            "acme:u-cap",
            &request(id, "u-cap", Some(&sink.url("c"))),
        )
        .await;
    }
    let mut out = TopicReader::new(&env.outcomes, env.partitions);
    let wanted: Vec<(&str, &str)> = ids[..3]
        .iter()
        .map(|i| (i.as_str(), "sent"))
        .chain(ids[3..].iter().map(|i| (i.as_str(), "throttled")))
        .collect();
    out.wait_for(WAIT, &wanted).await;
    let events = out.events();
    let first_sent = time(&events_of(&events, &ids[0])[0], "occurred_at");
    for id in &ids[3..] {
        let t = &events_of(&events, id)[0];
        assert_eq!(t["reason"], "frequency_cap");
        let due = time(t, "next_attempt_at");
        // A slot frees an hour after the oldest of the three sends.
        let delta = (due - (first_sent + chrono::Duration::hours(1)))
            .num_seconds()
            .abs();
        assert!(delta <= 5, "due {due}, first sent {first_sent}");
    }
    // A marketing message over the cap is dropped, not throttled.
    let dropped = format!("cap-{s}-marketing");
    let mut m = request(&dropped, "u-cap", Some(&sink.url("c")));
    m["category"] = json!("marketing");
    send(&env, "acme:u-cap", &m).await;
    out.wait_for(WAIT, &[(&dropped, "suppressed")]).await;
    assert_eq!(
        events_of(&out.events(), &dropped)[0]["reason"],
        "frequency_cap"
    );
    assert_eq!(sink.received().len(), 3);

    // An hour passes (time travel): the sends leave the window, the
    // throttled rows are due.
    sqlx::query(
        "UPDATE notifications SET sent_at = sent_at - interval '61 minutes' WHERE status = 'sent'",
    )
    .execute(&pool)
    .await
    .expect("age sends");
    sqlx::query("UPDATE notifications SET next_attempt_at = now() WHERE status = 'throttled'")
        .execute(&pool)
        .await
        .expect("due now");
    let wanted: Vec<(&str, &str)> = ids[3..].iter().map(|i| (i.as_str(), "sent")).collect();
    out.wait_for(WAIT, &wanted).await;
    assert_eq!(sink.received().len(), 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opting_out_on_the_preferences_topic_while_deferred_suppresses_at_fire_time() {
    let env = TestEnv::new(2).await;
    let topic = format!("it-{}-preferences", env.id);
    let settings = env.settings(&[("HERALD_KAFKA__PREFERENCE_TOPIC", topic.clone())]);
    herald::kafka::topics::ensure_topics(&settings.kafka, std::slice::from_ref(&topic), 1)
        .await
        .expect("preferences topic");
    let sink = HttpSink::start().await;
    let pool = env.pool().await;
    let app = RunningApp::start(settings).await;

    let s = suffix();
    let user = format!("u-{s}");
    let update = |updated_at: DateTime<Utc>, enabled: bool| {
        json!({
            "tenant_id": "acme",
            "user_id": user,
            "channel": "webhook",
            "updated_at": updated_at.to_rfc3339(),
            "enabled": enabled,
            "quiet_hours": { "start": "00:00", "end": "23:59:59", "timezone": "Pacific/Kiritimati" }
        })
    };
    let t0 = Utc::now();
    produce(
        &producer(),
        &topic,
        &user,
        update(t0, true).to_string().as_bytes(),
    )
    .await;
    let stored = || async {
        sqlx::query_scalar::<_, Option<bool>>(
            "SELECT enabled FROM preferences WHERE tenant_id = 'acme' AND user_id = $1",
        )
        .bind(&user)
        .fetch_optional(&pool)
        .await
        .expect("query")
        .flatten()
    };
    let deadline = std::time::Instant::now() + WAIT;
    while stored().await != Some(true) {
        assert!(
            std::time::Instant::now() < deadline,
            "preference update not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let id = format!("optout-{s}");
    send(
        &env,
        &format!("acme:{user}"),
        &request(&id, &user, Some(&sink.url("x"))),
    )
    .await;
    let mut out = TopicReader::new(&env.outcomes, env.partitions);
    out.wait_for(WAIT, &[(&id, "deferred")]).await;

    // The user turns the channel off; an older event arriving later loses.
    produce(
        &producer(),
        &topic,
        &user,
        update(t0 + chrono::Duration::seconds(10), false)
            .to_string()
            .as_bytes(),
    )
    .await;
    produce(
        &producer(),
        &topic,
        &user,
        update(t0 + chrono::Duration::seconds(5), true)
            .to_string()
            .as_bytes(),
    )
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    while stored().await != Some(false) {
        assert!(std::time::Instant::now() < deadline, "opt-out not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the older event be consumed too, then make the row due.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stored().await, Some(false), "last write wins by updated_at");
    sqlx::query("UPDATE notifications SET next_attempt_at = now() WHERE id = $1")
        .bind(&id)
        .execute(&pool)
        .await
        .expect("due now");
    out.wait_for(WAIT, &[(&id, "suppressed")]).await;
    let events = out.events();
    assert_eq!(statuses(&events, &id), vec!["deferred", "suppressed"]);
    assert_eq!(events_of(&events, &id)[1]["reason"], "channel_disabled");
    assert!(sink.received().is_empty());
    let metrics = reqwest::get(format!("http://{}/metrics", app.http))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.contains("herald_preference_updates_total{result=\"stale\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herald_preference_updates_total{result=\"applied\"} 2"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_by_request_id_or_correlation_id_sends_nothing() {
    let env = TestEnv::new(2).await;
    let sink = HttpSink::start().await;
    let app = RunningApp::start(env.settings(&[])).await;
    let s = suffix();
    let later = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let a = format!("cancel-a-{s}");
    let b = format!("cancel-b-{s}");
    let mut ra = request(&a, "u-c", Some(&sink.url("a")));
    ra["scheduled_at"] = json!(later);
    let mut rb = request(&b, "u-c", Some(&sink.url("b")));
    rb["scheduled_at"] = json!(later);
    rb["correlation_id"] = json!(format!("order-{s}"));
    send(&env, "acme:u-c", &ra).await;
    send(&env, "acme:u-c", &rb).await;
    let mut out = TopicReader::new(&env.outcomes, env.partitions);
    out.wait_for(WAIT, &[(&a, "scheduled"), (&b, "scheduled")])
        .await;

    let cancel_a = json!({ "id": format!("c1-{s}"), "kind": "cancel", "cancels": a });
    let cancel_b = json!({ "id": format!("c2-{s}"), "kind": "cancel", "tenant_id": "acme", "correlation_id": format!("order-{s}") });
    send(&env, "acme:u-c", &cancel_a).await;
    send(&env, "acme:u-c", &cancel_b).await;
    out.wait_for(WAIT, &[(&a, "cancelled"), (&b, "cancelled")])
        .await;
    let events = out.events();
    assert_eq!(statuses(&events, &a), vec!["scheduled", "cancelled"]);
    assert_eq!(statuses(&events, &b), vec!["scheduled", "cancelled"]);
    assert_eq!(
        events_of(&events, &b)[1]["correlation_id"],
        format!("order-{s}")
    );

    // Due now: a cancelled row is never fired.
    let pool = env.pool().await;
    sqlx::query("UPDATE notifications SET next_attempt_at = now() WHERE id IN ($1, $2)")
        .bind(&a)
        .bind(&b)
        .execute(&pool)
        .await
        .expect("due now");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status: String = sqlx::query_scalar("SELECT status FROM notifications WHERE id = $1")
        .bind(&a)
        .fetch_one(&pool)
        .await
        .expect("row");
    assert_eq!(status, "cancelled");
    assert!(sink.received().is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_fire_500_due_rows_each_exactly_once() {
    let env = TestEnv::new(2).await;
    let sink = HttpSink::start().await;
    let a = RunningApp::start(env.settings(&[])).await;
    let b = RunningApp::start(env.settings(&[])).await;
    let s = suffix();
    let id = format!("many-{s}");
    let recipients: Vec<Value> = (0..500)
        .map(|i| json!({ "url": sink.url(&format!("r/{i}")) }))
        .collect();
    let request = json!({
        "id": id,
        "tenant_id": "acme",
        "channel": "webhook",
        "recipients": recipients,
        "content": { "text": "due" },
        "scheduled_at": (Utc::now() + chrono::Duration::hours(1)).to_rfc3339()
    });
    send(&env, "acme:many", &request).await;
    let pool = env.pool().await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM notifications WHERE status = 'scheduled'")
                .fetch_one(&pool)
                .await
                .expect("count");
        if n == 500 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{n} of 500 scheduled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An hour passes (time travel): the rows are due and their time has come.
    sqlx::query(
        "UPDATE notifications SET next_attempt_at = now(),
             payload = jsonb_set(payload, '{scheduled_at}', to_jsonb(now() - interval '1 second'))
         WHERE status = 'scheduled'",
    )
    .execute(&pool)
    .await
    .expect("due now");
    let mut out = TopicReader::new(&env.outcomes, env.partitions);
    let all_sent = out
        .read_until(WAIT * 2, |r| {
            r.iter().filter(|x| x.json()["status"] == "sent").count() >= 500
        })
        .await;
    let by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM notifications GROUP BY status")
            .fetch_all(&pool)
            .await
            .expect("count");
    assert!(
        all_sent,
        "500 sent outcomes; rows: {by_status:?}; sink: {}",
        sink.received().len()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = sink.counts_by_id();
    assert_eq!(counts.len(), 500, "every notification delivered");
    assert!(counts.values().all(|c| *c == 1), "each exactly once");
    let finals = finals_by_notification(&out.events());
    assert_eq!(finals.len(), 500);
    assert!(
        finals.values().all(|e| e.len() == 1),
        "one final outcome each"
    );
    let leftover: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notifications WHERE status <> 'sent'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(leftover, 0);
    a.stop().await;
    b.stop().await;
}

/// A due row whose endpoint hangs must not hold back rows that fall due
/// after it: the scheduler claims the next rows while earlier ones are still
/// sending (it used to fire a batch and wait for all of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_due_row_does_not_hold_back_the_rows_due_after_it() {
    let env = TestEnv::new(1).await;
    let sink = HttpSink::start().await;
    let hanging = serve(axum::Router::new().route(
        "/{*path}",
        axum::routing::post(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            "late"
        }),
    ))
    .await;
    let app = RunningApp::start(env.settings(&[
        ("HERALD_WEBHOOK__TIMEOUT_MS", "8000".into()),
        ("HERALD_PIPELINE__SEND_LEASE_MS", "30000".into()),
    ]))
    .await;
    let mut out = TopicReader::new(&env.outcomes, env.partitions);
    warm_up(&env, &sink, &mut out).await;

    let s = suffix();
    let (slow, quick) = (format!("slow-{s}"), format!("quick-{s}"));
    // Both must arrive before their time to be held as due rows; the margin
    // covers a cold producer (its first connection to the broker), which
    // once took over a second.
    let at = Utc::now() + chrono::Duration::seconds(3);
    let mut r = request(&slow, "u-slow", Some(&format!("http://{hanging}/h")));
    r["scheduled_at"] = json!(at.to_rfc3339());
    send(&env, "acme:u-slow", &r).await;
    let mut r = request(&quick, "u-quick", Some(&sink.url("q")));
    r["scheduled_at"] = json!((at + chrono::Duration::seconds(1)).to_rfc3339());
    send(&env, "acme:u-quick", &r).await;
    out.wait_for(WAIT, &[(&quick, "sent")]).await;
    // The hanging send runs until its 8 s timeout: nothing after
    // `scheduled` has been published for it yet.
    assert_eq!(statuses(&out.events(), &slow), vec!["scheduled"]);
    assert_eq!(statuses(&out.events(), &quick), vec!["scheduled", "sent"]);
    out.wait_for(WAIT, &[(&slow, "failed")]).await;
    let failed = event(&out.events(), &slow, "failed");
    assert_eq!(failed["error"]["code"], "http_timeout", "{failed}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_rows_are_claimed_urgent_first_and_a_lapsed_lease_is_taken_over() {
    use herald::domain::{DeliveryStatusEvent, Status, decode_request};
    use herald::store::{DueStore, NotificationStore};

    let env = TestEnv::new(1).await;
    let due = DueStore::new(env.pool().await);
    let store = NotificationStore::new(env.pool().await, Duration::from_secs(60));
    let past = (Utc::now() - chrono::Duration::seconds(5)).to_rfc3339();
    for (id, priority) in [
        ("normal-1", "normal"),
        ("urgent-1", "urgent"),
        ("normal-2", "low"),
    ] {
        let r = json!({
            "id": id, "channel": "webhook", "priority": priority,
            "recipient": { "url": "http://127.0.0.1:9/x" }, "content": { "text": "t" }
        });
        let n = decode_request(r.to_string().as_bytes(), 1 << 20)
            .expect("valid")
            .into_notifications()
            .next()
            .expect("one notification");
        let event = DeliveryStatusEvent::for_notification(&n, Status::Deferred, 0);
        let at = DateTime::parse_from_rfc3339(&past)
            .expect("time")
            .with_timezone(&Utc);
        store
            .claim_decided(&n, Status::Deferred, Some(at), &event)
            .await
            .expect("insert");
    }
    assert_eq!(due.depth().await.expect("depth"), 3);

    // Instance A claims one row (urgent first) and "crashes" with a short lease.
    let a = due
        .claim_batch("instance-a", 1, Duration::from_millis(300))
        .await
        .expect("claim");
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].notification.id, "urgent-1", "urgent is claimed first");
    // B cannot take A's row while the lease holds...
    let b = due
        .claim_batch("instance-b", 10, Duration::from_secs(60))
        .await
        .expect("claim");
    let ids: Vec<&str> = b.iter().map(|r| r.notification.id.as_str()).collect();
    assert_eq!(ids.len(), 2);
    assert!(!ids.contains(&"urgent-1"), "{ids:?}");
    // ... and takes it over once the lease has lapsed; A has lost it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b2 = due
        .claim_batch("instance-b", 10, Duration::from_secs(60))
        .await
        .expect("claim");
    assert_eq!(b2.len(), 1);
    assert_eq!(b2[0].notification.id, "urgent-1");
    assert_eq!(
        due.start_attempt("urgent-1", "instance-a", "webhook")
            .await
            .expect("start"),
        None,
        "the crashed owner cannot send it any more"
    );
    assert_eq!(
        due.start_attempt("urgent-1", "instance-b", "webhook")
            .await
            .expect("start"),
        Some(1)
    );
}

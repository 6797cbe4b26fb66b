//! The admin/query API through the real HTTP server of a running Herald:
//! templates (versions, resolution, preview, template errors on send),
//! submit → topic → outcome, retry, auth on every route, pagination and
//! filters, stats, the OpenAPI document.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;
use herald::http::api::auth::{self, Role};
use herald::templates::{TemplateContent, TemplateStore};

const WAIT: Duration = Duration::from_secs(60);

/// A client for one running app.
struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    fn new(app: &RunningApp) -> Api {
        Api {
            base: format!("http://{}", app.http),
            client: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.expect("http request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(token), None).await
    }

    async fn post(&self, path: &str, token: &str, body: &Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    async fn put(&self, path: &str, token: &str, body: &Value) -> (StatusCode, Value) {
        self.call(Method::PUT, path, Some(token), Some(body)).await
    }

    /// Polls `GET /v1/notifications/{id}` until it has a final status.
    async fn wait_final(&self, id: &str, admin: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let (s, v) = self.get(&format!("/v1/notifications/{id}"), admin).await;
            if s == StatusCode::OK && final_statuses().contains(&v["status"].as_str().unwrap_or(""))
            {
                return v;
            }
            assert!(Instant::now() < deadline, "{id} not final: {s} {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct Keys {
    admin: String,
    service: String,
    user1: String,
    user2: String,
}

async fn keys(env: &TestEnv) -> Keys {
    let pool = env.pool().await;
    let k = |role, tenant: Option<&'static str>, user: Option<&'static str>| {
        let pool = pool.clone();
        async move {
            auth::create_key(&pool, role, tenant, user, Some("test"))
                .await
                .expect("create key")
                .token
        }
    };
    Keys {
        admin: k(Role::Admin, None, None).await,
        service: k(Role::Service, None, None).await,
        user1: k(Role::User, Some("acme"), Some("u-1")).await,
        user2: k(Role::User, Some("acme"), Some("u-2")).await,
    }
}

fn assert_problem(status: StatusCode, v: &Value, want: StatusCode) {
    assert_eq!(status, want, "{v}");
    assert_eq!(v["status"], want.as_u16(), "{v}");
    assert!(v["type"].is_string() && v["title"].is_string(), "{v}");
}

async fn create_template(api: &Api, admin: &str, body: Value) -> i64 {
    let (s, v) = api.post("/v1/templates", admin, &body).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v["id"].as_i64().expect("id")
}

async fn preview_text(api: &Api, admin: &str, body: Value) -> String {
    let (s, v) = api.post("/v1/templates/preview", admin, &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["text"].as_str().expect("text").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn template_versions_and_resolution_chain() {
    let env = TestEnv::new(1).await;
    let app =
        RunningApp::start(env.settings(&[("HERALD_TEMPLATE_STORE__REFRESH_MS", "200".into())]))
            .await;
    let api = Api::new(&app);
    let k = keys(&env).await;
    let admin = k.admin.as_str();

    // Version 1 → update → version 2 active → activate 1 again → renders 1.
    let id = create_template(
        &api,
        admin,
        json!({"key": "greet", "channel": "webhook", "body_template": "v1 {{ name }}"}),
    )
    .await;
    let by_key = json!({"key": "greet", "channel": "webhook", "data": {"name": "Ana"}});
    assert_eq!(preview_text(&api, admin, by_key.clone()).await, "v1 Ana");
    let (s, v) = api
        .put(
            &format!("/v1/templates/{id}"),
            admin,
            &json!({"body_template": "v2 {{ name }}"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["active_version"], 2);
    assert_eq!(v["latest_version"], 2);
    assert_eq!(v["versions"].as_array().map(Vec::len), Some(2));
    assert_eq!(preview_text(&api, admin, by_key.clone()).await, "v2 Ana");
    let (s, v) = api
        .post(
            &format!("/v1/templates/{id}/versions/1/activate"),
            admin,
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["active_version"], 1);
    assert_eq!(preview_text(&api, admin, by_key.clone()).await, "v1 Ana");
    let (s, v) = api.get(&format!("/v1/templates/{id}"), admin).await;
    assert_eq!(s, StatusCode::OK);
    let active: Vec<i64> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["is_active"] == true)
        .map(|x| x["version"].as_i64().unwrap())
        .collect();
    assert_eq!(active, vec![1]);
    // Same scope twice → 409; unknown version → 404; bad content → 422 naming the field.
    let (s, v) = api
        .post(
            "/v1/templates",
            admin,
            &json!({"key": "greet", "channel": "webhook", "body_template": "x"}),
        )
        .await;
    assert_problem(s, &v, StatusCode::CONFLICT);
    let (s, v) = api
        .post(
            &format!("/v1/templates/{id}/versions/9/activate"),
            admin,
            &json!({}),
        )
        .await;
    assert_problem(s, &v, StatusCode::NOT_FOUND);
    let (s, v) = api
        .post(
            "/v1/templates",
            admin,
            &json!({"key": "bad", "channel": "webhook", "body_template": "{% if %}"}),
        )
        .await;
    assert_problem(s, &v, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["invalid-params"][0]["name"], "body_template", "{v}");
    let (s, v) = api
        .post(
            "/v1/templates",
            admin,
            &json!({"key": "bad", "channel": "pigeon", "body_template": "x"}),
        )
        .await;
    assert_problem(s, &v, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["invalid-params"][0]["name"], "channel", "{v}");

    // Resolution chain: most specific first, falling back step by step.
    let scoped = |tenant: Value, app: Value, locale: Value, text: &str| {
        json!({"key": "chain", "channel": "webhook", "tenant_id": tenant, "app_id": app,
               "locale": locale, "body_template": text})
    };
    let global = create_template(
        &api,
        admin,
        scoped(Value::Null, Value::Null, Value::Null, "global"),
    )
    .await;
    let global_pt = create_template(
        &api,
        admin,
        scoped(Value::Null, Value::Null, json!("pt"), "global pt"),
    )
    .await;
    let tenant = create_template(
        &api,
        admin,
        scoped(json!("acme"), Value::Null, Value::Null, "acme"),
    )
    .await;
    let tenant_app = create_template(
        &api,
        admin,
        scoped(json!("acme"), json!("shop"), Value::Null, "acme shop"),
    )
    .await;
    let exact = create_template(
        &api,
        admin,
        scoped(
            json!("acme"),
            json!("shop"),
            json!("pt_br"),
            "acme shop pt-BR",
        ),
    )
    .await;
    let ask = |locale: &str| {
        json!({"key": "chain", "channel": "webhook", "tenant_id": "acme", "app_id": "shop",
               "locale": locale, "data": {}})
    };
    let deactivate = |tid: i64| {
        let api = &api;
        async move {
            let (s, v) = api
                .post(
                    &format!("/v1/templates/{tid}/versions/1/deactivate"),
                    admin,
                    &json!({}),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            assert_eq!(v["active_version"], Value::Null);
        }
    };
    assert_eq!(
        preview_text(&api, admin, ask("pt-BR")).await,
        "acme shop pt-BR"
    );
    // Another region of the same language does not match pt-BR.
    assert_eq!(preview_text(&api, admin, ask("pt-PT")).await, "acme shop");
    deactivate(exact).await;
    assert_eq!(preview_text(&api, admin, ask("pt-BR")).await, "acme shop");
    deactivate(tenant_app).await;
    assert_eq!(preview_text(&api, admin, ask("pt-BR")).await, "acme");
    deactivate(tenant).await;
    // pt-BR → pt among the global templates.
    assert_eq!(preview_text(&api, admin, ask("pt-BR")).await, "global pt");
    assert_eq!(preview_text(&api, admin, ask("de")).await, "global");
    deactivate(global_pt).await;
    assert_eq!(preview_text(&api, admin, ask("pt-BR")).await, "global");
    deactivate(global).await;
    // Nothing stored any more and no such file template: a 422 template error.
    let (s, v) = api
        .post("/v1/templates/preview", admin, &ask("pt-BR"))
        .await;
    assert_problem(s, &v, StatusCode::UNPROCESSABLE_ENTITY);

    // The shipped file templates are the fallback when nothing is stored.
    let (s, v) = api
        .post(
            "/v1/templates/preview",
            admin,
            &json!({"key": "welcome", "channel": "email", "locale": "pt-BR",
                    "data": serde_json::from_str::<Value>(&std::fs::read_to_string(manifest_dir().join("templates/welcome/sample.json")).unwrap()).unwrap()}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["source"], "file");
    assert!(v["subject"].as_str().unwrap().contains("Bem-vindo"), "{v}");

    // List with a filter.
    let (s, v) = api
        .get("/v1/templates?key=chain&tenant_id=acme", admin)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["items"].as_array().map(Vec::len), Some(3), "{v}");

    // A write by another instance (straight to the store, not through this
    // app's API) is picked up by the periodic reload.
    let store = TemplateStore::new(env.pool().await);
    store
        .update(
            id,
            None,
            &TemplateContent {
                body_template: Some("v3 {{ name }}".into()),
                ..TemplateContent::default()
            },
        )
        .await
        .expect("update");
    let deadline = Instant::now() + WAIT;
    while preview_text(&api, admin, by_key.clone()).await != "v3 Ana" {
        assert!(Instant::now() < deadline, "the reload never picked up v3");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preview_errors_and_submitted_notifications_through_the_topic() {
    let env = TestEnv::new(1).await;
    let sink = HttpSink::start().await;
    let app = RunningApp::start(env.settings(&[])).await;
    let api = Api::new(&app);
    let k = keys(&env).await;
    let admin = k.admin.as_str();

    create_template(
        &api,
        admin,
        json!({"key": "needs_name", "channel": "webhook", "engine": "text",
               "body_template": "Hello ${name}",
               "variables_schema": {"required": ["name"], "properties": {"name": {"type": "string"}}}}),
    )
    .await;
    // Missing required variable → 422 naming it.
    let (s, v) = api
        .post(
            "/v1/templates/preview",
            admin,
            &json!({"key": "needs_name", "channel": "webhook", "data": {}}),
        )
        .await;
    assert_problem(s, &v, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["invalid-params"][0]["name"], "data.name", "{v}");
    // Wrong type → 422 naming it.
    let (s, v) = api
        .post(
            "/v1/templates/preview",
            admin,
            &json!({"key": "needs_name", "channel": "webhook", "data": {"name": 7}}),
        )
        .await;
    assert_problem(s, &v, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["invalid-params"][0]["name"], "data.name", "{v}");
    // An infinite-ish loop runs out of fuel; a huge output hits the cap.
    for (src, what) in [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "fuel",
        ),
        ("{{ 'x' * 10000000 }}", "too large"),
    ] {
        let (s, v) = api
            .post(
                "/v1/templates/preview",
                admin,
                &json!({"channel": "webhook", "template": {"body_template": src}, "data": {}}),
            )
            .await;
        assert_problem(s, &v, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(v["detail"].as_str().unwrap().contains(what), "{v}");
    }

    // POST /v1/notifications → request on the topic → sent outcome.
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    let ok_id = format!("api-ok-{}", suffix());
    let (s, v) = api
        .post(
            "/v1/notifications",
            &k.service,
            &json!({"id": ok_id, "channel": "webhook", "tenant_id": "acme",
                    "recipient": {"url": sink.url("/hooks"), "user_id": "u-1"},
                    "template": {"key": "needs_name", "data": {"name": "Ana"}}}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["id"], ok_id.as_str());
    // Without an id: one is assigned.
    let (s, v) = api
        .post(
            "/v1/notifications",
            &k.service,
            &json!({"channel": "webhook", "recipient": {"url": sink.url("/hooks")},
                    "content": {"text": "no id"}}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let generated = v["id"].as_str().unwrap().to_string();
    // The send path: missing variable → failed / template_error naming it.
    let bad_id = format!("api-bad-{}", suffix());
    let (s, v) = api
        .post(
            "/v1/notifications",
            &k.service,
            &json!({"id": bad_id, "channel": "webhook",
                    "recipient": {"url": sink.url("/hooks")},
                    "template": {"key": "needs_name", "data": {}}}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    // Invalid requests are 422 naming the field and never reach the topic.
    let (s, v) = api
        .post(
            "/v1/notifications",
            &k.service,
            &json!({"channel": "email", "recipient": {"email": "not-an-address"},
                    "content": {"subject": "s", "text": "t"}}),
        )
        .await;
    assert_problem(s, &v, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        v["invalid-params"][0]["name"]
            .as_str()
            .unwrap()
            .contains("email"),
        "{v}"
    );
    // A user key may not submit.
    let (s, v) = api
        .post(
            "/v1/notifications",
            &k.user1,
            &json!({"channel": "webhook", "recipient": {"url": sink.url("/x")}, "content": {"text": "x"}}),
        )
        .await;
    assert_problem(s, &v, StatusCode::FORBIDDEN);

    let ids = [ok_id.clone(), bad_id.clone(), generated.clone()];
    assert!(
        outcomes
            .read_until(WAIT, |r| ids.iter().all(|id| r
                .iter()
                .any(|x| x.json()["notification_id"] == id.as_str())))
            .await,
        "outcomes for {ids:?}"
    );
    let events = outcomes.events();
    let of = |id: &str| {
        events
            .iter()
            .find(|e| e["notification_id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(of(&ok_id)["status"], "sent");
    assert_eq!(of(&generated)["status"], "sent");
    let bad = of(&bad_id);
    assert_eq!(bad["status"], "failed", "{bad}");
    assert_eq!(bad["error"]["code"], "template_error", "{bad}");
    assert!(
        bad["error"]["message"].as_str().unwrap().contains("`name`"),
        "{bad}"
    );
    let bodies: Vec<String> = sink
        .received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert!(bodies.iter().any(|b| b.contains("Hello Ana")), "{bodies:?}");

    // The notification and its delivery log over the API.
    let n = api.wait_final(&ok_id, admin).await;
    assert_eq!(n["user_id"], "u-1");
    assert_eq!(n["delivery_attempts"][0]["status"], "sent", "{n}");
    let (s, v) = api
        .get(
            &format!("/v1/delivery-logs?notification_id={ok_id}"),
            &k.user1,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["items"][0]["provider"], "webhook");
    let (s, v) = api
        .get(
            &format!("/v1/delivery-logs?notification_id={ok_id}"),
            &k.user2,
        )
        .await;
    assert_problem(s, &v, StatusCode::FORBIDDEN);

    // Retry: only failed notifications; the same notification becomes due
    // again and the scheduler sends it (here: fails again, still missing `name`).
    let (s, v) = api
        .post(
            &format!("/v1/notifications/{ok_id}/retry"),
            admin,
            &json!({}),
        )
        .await;
    assert_problem(s, &v, StatusCode::CONFLICT);
    let before_retry = chrono::Utc::now();
    let (s, v) = api
        .post(
            &format!("/v1/notifications/{bad_id}/retry"),
            admin,
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["id"], bad_id.as_str());
    assert_eq!(v["retry_of"], bad_id.as_str());
    let r = api.wait_final(&bad_id, admin).await;
    assert_eq!(r["status"], "failed", "still missing `name`: {r}");
    let failed_at =
        chrono::DateTime::parse_from_rfc3339(r["failed_at"].as_str().expect("failed_at"))
            .expect("rfc3339");
    assert!(
        failed_at > before_retry,
        "failed again after the retry: {r}"
    );

    // Stats see all of it.
    let (s, v) = api.get("/v1/stats", admin).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["total"], 3, "{v}");
    assert_eq!(v["by_channel"]["webhook"]["sent"], 2, "{v}");
    assert_eq!(v["by_channel"]["webhook"]["failed"], 1, "{v}");
    let rate = |k: &str| v[k].as_f64().unwrap_or(-1.0);
    assert!((rate("delivery_rate") - 2.0 / 3.0).abs() < 0.01, "{v}");
    assert!((rate("failure_rate") - 1.0 / 3.0).abs() < 0.01, "{v}");
    assert!(v["avg_time_to_send_ms"].as_f64().is_some(), "{v}");
    app.stop().await;
}

/// A concrete path for a route (parameters filled in).
fn concrete(path: &str) -> String {
    path.replace("{id}", "1")
        .replace("{version}", "1")
        .replace("{user_id}", "u-1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_needs_a_token_and_the_right_role() {
    let env = TestEnv::new(1).await;
    let sink = HttpSink::start().await;
    let app =
        RunningApp::start(env.settings(&[("HERALD_API__MAX_BODY_BYTES", "4096".into())])).await;
    let api = Api::new(&app);
    let k = keys(&env).await;

    // Which roles may call each route (others: 403).
    let allowed = |m: &Method, p: &str| -> &'static [&'static str] {
        match (m.as_str(), p) {
            ("GET", "/v1/notifications") => &["admin", "service", "user"],
            ("GET", "/v1/notifications/{id}") => &["admin", "service", "user"],
            ("GET", "/v1/delivery-logs") => &["admin", "service", "user"],
            ("POST", "/v1/notifications") => &["admin", "service"],
            ("GET" | "PUT", "/v1/users/{user_id}/preferences") => &["admin", "user"],
            _ => &["admin"],
        }
    };
    let revoked = auth::create_key(&env.pool().await, Role::Admin, None, None, None)
        .await
        .unwrap();
    assert!(
        auth::revoke_key(&env.pool().await, &revoked.id)
            .await
            .unwrap()
    );
    for (method, path) in herald::http::api::route_table() {
        if path == "/openapi.json" {
            continue;
        }
        let url = concrete(path);
        let body = (method != Method::GET).then(|| json!({}));
        for token in [None, Some("hrld_not-a-key"), Some(revoked.token.as_str())] {
            let (s, v) = api.call(method.clone(), &url, token, body.as_ref()).await;
            assert_problem(s, &v, StatusCode::UNAUTHORIZED);
        }
        for (role, token) in [("service", &k.service), ("user", &k.user2)] {
            if allowed(&method, path).contains(&role) {
                continue;
            }
            let (s, v) = api
                .call(method.clone(), &url, Some(token), body.as_ref())
                .await;
            assert_eq!(s, StatusCode::FORBIDDEN, "{role} {method} {path}: {v}");
        }
    }
    // A user key and another user's preferences.
    let (s, _) = api
        .get("/v1/users/u-1/preferences?tenant_id=acme", &k.user2)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Own preferences: allowed (the policy branch's `preferences` table exists).
    let (s, v) = api
        .get("/v1/users/u-2/preferences?tenant_id=acme", &k.user2)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Notifications of two users.
    let mut ids = Vec::new();
    for user in ["u-1", "u-2"] {
        let id = format!("{user}-{}", suffix());
        let (s, v) = api
            .post(
                "/v1/notifications",
                &k.admin,
                &json!({"id": id, "tenant_id": "acme", "channel": "webhook",
                        "recipient": {"user_id": user, "url": sink.url("/h")},
                        "content": {"text": "hi"}}),
            )
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        ids.push(id);
    }
    for id in &ids {
        api.wait_final(id, &k.admin).await;
    }
    // By id: own → 200, another user's → 403.
    let (s, v) = api
        .get(&format!("/v1/notifications/{}", ids[0]), &k.user1)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = api
        .get(&format!("/v1/notifications/{}", ids[0]), &k.user2)
        .await;
    assert_problem(s, &v, StatusCode::FORBIDDEN);
    // By filter: another user's → 403; no filter → only own.
    let (s, v) = api.get("/v1/notifications?user_id=u-1", &k.user2).await;
    assert_problem(s, &v, StatusCode::FORBIDDEN);
    let (s, v) = api.get("/v1/notifications?tenant_id=other", &k.user2).await;
    assert_problem(s, &v, StatusCode::FORBIDDEN);
    let (s, v) = api.get("/v1/notifications", &k.user2).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let seen: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(seen, vec![ids[1].as_str()]);
    // The admin sees both.
    let (s, v) = api.get("/v1/notifications?tenant_id=acme", &k.admin).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"].as_array().map(Vec::len), Some(2));

    // Body limit → 413 problem; unknown query parameter → 422 naming it.
    let big = json!({"key": "k", "channel": "webhook", "body_template": "x".repeat(10_000)});
    let (s, v) = api.post("/v1/templates", &k.admin, &big).await;
    assert_problem(s, &v, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, v) = api.get("/v1/notifications?colour=red", &k.admin).await;
    assert_problem(s, &v, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(v["invalid-params"][0]["name"], "colour");

    // The OpenAPI document: served without a token, lists every route.
    let (s, doc) = api.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    for (method, path) in herald::http::api::route_table() {
        let m = method.as_str().to_lowercase();
        assert!(
            doc["paths"][path][m.as_str()].is_object(),
            "{method} {path} missing from /openapi.json"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pagination_is_stable_under_concurrent_inserts_and_filters_combine() {
    let env = TestEnv::new(2).await;
    let sink = HttpSink::start().await;
    // SMTP on port 1: email notifications fail, webhooks are sent.
    let app = RunningApp::start(env.settings(&[])).await;
    let api = Api::new(&app);
    let k = keys(&env).await;
    let admin = k.admin.as_str();

    let submit = |i: usize, batch: &'static str| {
        let (channel, recipient) = if i.is_multiple_of(3) {
            (
                "email",
                json!({"email": "a@example.com", "user_id": format!("u-{}", i % 2)}),
            )
        } else {
            (
                "webhook",
                json!({"url": sink.url("/p"), "user_id": format!("u-{}", i % 2)}),
            )
        };
        let tenant = if i.is_multiple_of(2) {
            "acme"
        } else {
            "globex"
        };
        json!({"id": format!("{batch}-{i:02}-{}", suffix()), "tenant_id": tenant, "channel": channel,
               "priority": if i.is_multiple_of(4) { "high" } else { "normal" },
               "recipient": recipient, "content": {"subject": "s", "text": "t"}})
    };
    let mut first = Vec::new();
    for i in 0..12 {
        let (s, v) = api.post("/v1/notifications", admin, &submit(i, "a")).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        first.push(v["id"].as_str().unwrap().to_string());
    }
    for id in &first {
        api.wait_final(id, admin).await;
    }

    // Page 1, then new notifications arrive, then the rest of the pages.
    let (s, page) = api.get("/v1/notifications?limit=5", admin).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    let mut seen: Vec<String> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    let mut cursor = page["next_cursor"].as_str().map(str::to_string);
    let mut later = Vec::new();
    for i in 0..4 {
        let (s, v) = api.post("/v1/notifications", admin, &submit(i, "b")).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        later.push(v["id"].as_str().unwrap().to_string());
    }
    for id in &later {
        api.wait_final(id, admin).await;
    }
    while let Some(c) = cursor {
        let (s, page) = api
            .get(&format!("/v1/notifications?limit=5&cursor={c}"), admin)
            .await;
        assert_eq!(s, StatusCode::OK, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["id"].as_str().unwrap().to_string()),
        );
        cursor = page["next_cursor"].as_str().map(str::to_string);
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicates: {seen:?}");
    assert_eq!(
        unique,
        first.iter().collect::<HashSet<_>>(),
        "exactly the first set"
    );

    // Filters combine with AND: compare with the details of every notification.
    let mut all = Vec::new();
    for id in first.iter().chain(&later) {
        let (_, n) = api.get(&format!("/v1/notifications/{id}"), admin).await;
        all.push(n);
    }
    let expect = |f: &dyn Fn(&Value) -> bool| -> HashSet<String> {
        all.iter()
            .filter(|n| f(n))
            .map(|n| n["id"].as_str().unwrap().to_string())
            .collect()
    };
    let list = |q: String| {
        let api = &api;
        async move {
            let (s, v) = api
                .get(&format!("/v1/notifications?limit=500&{q}"), admin)
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["id"].as_str().unwrap().to_string())
                .collect::<HashSet<String>>()
        }
    };
    let got = list("tenant_id=acme&channel=webhook&status=sent".into()).await;
    let want =
        expect(&|n| n["tenant_id"] == "acme" && n["channel"] == "webhook" && n["status"] == "sent");
    assert!(!want.is_empty());
    assert_eq!(got, want);
    let got = list("channel=email&status=failed&user_id=u-0".into()).await;
    let want =
        expect(&|n| n["channel"] == "email" && n["status"] == "failed" && n["user_id"] == "u-0");
    assert!(!want.is_empty());
    assert_eq!(got, want);
    let got = list("priority=high&tenant_id=acme".into()).await;
    assert_eq!(
        got,
        expect(&|n| n["priority"] == "high" && n["tenant_id"] == "acme")
    );
    // A time window: created_from after everything → nothing.
    let got = list("created_from=2999-01-01T00:00:00Z".into()).await;
    assert!(got.is_empty());
    let created: Vec<String> = all
        .iter()
        .map(|n| n["created_at"].as_str().unwrap().to_string())
        .collect();
    let min = created.iter().min().unwrap();
    let got = list(format!(
        "created_from={}&created_to=2999-01-01T00:00:00Z",
        min.replace('+', "%2B")
    ))
    .await;
    assert_eq!(got.len(), all.len());
    // Invalid filter values are 422 naming the parameter.
    for (q, field) in [
        ("status=maybe", "status"),
        ("created_to=yesterday", "created_to"),
        ("limit=0", "limit"),
        ("cursor=zzz", "cursor"),
    ] {
        let (s, v) = api.get(&format!("/v1/notifications?{q}"), admin).await;
        assert_problem(s, &v, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(v["invalid-params"][0]["name"], field, "{v}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preferences_written_over_the_api_govern_delivery() {
    let env = TestEnv::new(1).await;
    let sink = HttpSink::start().await;
    let app = RunningApp::start(env.settings(&[])).await;
    let api = Api::new(&app);
    let k = keys(&env).await;
    let path = "/v1/users/u-9/preferences?tenant_id=acme";
    // Validation names the item.
    let (s, v) = api
        .put(path, &k.admin, &json!({"items": [{"channel": "webhook", "quiet_hours": {"start": "25:00", "end": "07:00"}}]}))
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = api
        .put(
            path,
            &k.admin,
            &json!({"items": [{"channel": "webhook", "enabled": false}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = api.get(path, &k.admin).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"][0]["channel"], "webhook", "{v}");
    assert_eq!(v["items"][0]["enabled"], false, "{v}");
    // A request to that user on that channel is suppressed, nothing sent.
    let id = format!("pref-{}", suffix());
    produce(
        &producer(),
        &env.requests,
        "acme:u-9",
        json!({"id": id, "tenant_id": "acme", "channel": "webhook",
               "recipient": {"user_id": "u-9", "url": sink.url("/p")}, "content": {"text": "x"}})
        .to_string()
        .as_bytes(),
    )
    .await;
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    let want = id.clone();
    assert!(
        outcomes
            .read_until(Duration::from_secs(60), |r| r
                .iter()
                .any(|x| x.json()["notification_id"] == want.as_str()))
            .await
    );
    let events = outcomes.events();
    let e = events
        .iter()
        .find(|e| e["notification_id"] == id.as_str())
        .expect("event");
    assert_eq!(e["status"], "suppressed", "{e}");
    assert_eq!(e["reason"], "channel_disabled", "{e}");
    assert!(sink.received().is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_app_notifications_land_in_the_inbox_api() {
    let env = TestEnv::new(1).await;
    register_provider(
        &env,
        herald::routing::store::NewProvider::new("inbox", herald::routing::ProviderType::Inbox),
    )
    .await;
    let app = RunningApp::start(env.settings(&[])).await;
    let api = Api::new(&app);
    let k = keys(&env).await;
    let p = producer();
    let ids: Vec<String> = (0..3).map(|i| format!("inbox-{i}-{}", suffix())).collect();
    for (i, id) in ids.iter().enumerate() {
        let req = json!({"id": id, "tenant_id": "acme", "channel": "in_app",
            "recipient": {"user_id": "u-1"},
            "content": {"subject": format!("Title {i}"), "text": format!("Body {i}")}});
        produce(&p, &env.requests, "u-1", req.to_string().as_bytes()).await;
    }
    let mut outcomes = TopicReader::new(&env.outcomes, 1);
    assert!(outcomes.read_until(WAIT, |r| r.len() >= 3).await);
    assert!(outcomes.events().iter().all(|e| e["status"] == "sent"));

    let path = "/v1/users/u-1/inbox?tenant_id=acme";
    let (s, v) = api.get(path, &k.user1).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let items = v["items"].as_array().expect("items");
    assert_eq!(items.len(), 3, "{v}");
    assert_eq!(items[0]["notification_id"], ids[2].as_str(), "newest first");
    assert_eq!(items[0]["title"], "Title 2");
    assert_eq!(items[0]["body"], "Body 2");
    assert_eq!(v["unread_count"], 3);

    // Keyset pages of one.
    let (_, page1) = api.get(&format!("{path}&limit=2"), &k.admin).await;
    let cursor = page1["next_cursor"].as_str().expect("a next page");
    let (_, page2) = api
        .get(&format!("{path}&limit=2&cursor={cursor}"), &k.admin)
        .await;
    assert_eq!(page2["items"].as_array().map(Vec::len), Some(1), "{page2}");
    assert!(page2["next_cursor"].is_null());

    // Mark one read, then all.
    let first = items[0]["id"].clone();
    let (s, v) = api
        .post(
            "/v1/users/u-1/inbox/read?tenant_id=acme",
            &k.user1,
            &json!({"ids": [first]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["marked_read"].as_u64(), v["unread_count"].as_i64()),
        (Some(1), Some(2))
    );
    let (_, v) = api
        .get(
            "/v1/users/u-1/inbox?tenant_id=acme&unread_only=true",
            &k.user1,
        )
        .await;
    assert_eq!(v["items"].as_array().map(Vec::len), Some(2), "{v}");
    let (_, v) = api
        .post(
            "/v1/users/u-1/inbox/read?tenant_id=acme",
            &k.user1,
            &json!({"all": true}),
        )
        .await;
    assert_eq!(v["marked_read"], 2);
    let (_, v) = api
        .get("/v1/users/u-1/inbox/unread-count?tenant_id=acme", &k.user1)
        .await;
    assert_eq!(v["unread_count"], 0);

    // Someone else's inbox, a service key, a bad body.
    let (s, v) = api.get(path, &k.user2).await;
    assert_problem(s, &v, StatusCode::FORBIDDEN);
    let (s, v) = api.get(path, &k.service).await;
    assert_problem(s, &v, StatusCode::FORBIDDEN);
    let (s, v) = api
        .post(
            "/v1/users/u-1/inbox/read?tenant_id=acme",
            &k.user1,
            &json!({}),
        )
        .await;
    assert_problem(s, &v, StatusCode::UNPROCESSABLE_ENTITY);
    app.stop().await;
}

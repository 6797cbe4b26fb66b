//! The templates shipped in `templates/` all load and render with the sample
//! data documented next to them (`templates/<key>/sample.json`), in every
//! locale they have.

use std::path::PathBuf;

use herald::config::TemplateSettings;
use herald::domain::{
    Channel, Content, EmailAddress, Meta, Notification, Priority, Recipient, TemplateRef,
};
use herald::render::{FileRenderer, RenderErrorCode, Renderer, load_sample};

fn shipped_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("templates")
}

fn renderer() -> FileRenderer {
    FileRenderer::new(&TemplateSettings {
        dir: shipped_dir(),
        default_locale: "en".into(),
        fuel: 50_000,
        max_output_bytes: 1024 * 1024,
    })
    .expect("shipped templates load")
}

fn email(
    key: &str,
    locale: Option<&str>,
    data: serde_json::Map<String, serde_json::Value>,
) -> Notification {
    Notification {
        id: "sample-1".into(),
        request_id: "sample-1".into(),
        tenant_id: None,
        app_id: None,
        channel: Channel::Email,
        recipient: Recipient {
            user_id: Some("user-42".into()),
            email: Some(EmailAddress::parse("ana@example.com").expect("email")),
            ..Recipient::default()
        },
        content: Content::Template(TemplateRef {
            key: key.into(),
            locale: locale.map(Into::into),
            data,
        }),
        priority: Priority::Normal,
        category: None,
        scheduled_at: None,
        expires_at: None,
        meta: Meta::default(),
        correlation_id: None,
    }
}

#[test]
fn shipped_templates_render_with_their_sample_data_in_every_locale() {
    let r = renderer();
    let keys: Vec<String> = r.keys().map(str::to_string).collect();
    assert!(keys.contains(&"welcome".to_string()), "{keys:?}");
    assert!(keys.contains(&"password_reset".to_string()), "{keys:?}");
    for key in &keys {
        let data = load_sample(&shipped_dir(), key).expect("sample.json");
        let mut locales: Vec<Option<String>> = vec![None];
        locales.extend(r.locales(key).expect("key").into_iter().map(Some));
        for locale in locales {
            let n = email(key, locale.as_deref(), data.clone());
            let out = r
                .render(&n)
                .unwrap_or_else(|e| panic!("{key} ({locale:?}): {e}"));
            let subject = out.subject.as_deref().unwrap_or_default();
            assert!(!subject.is_empty(), "{key} ({locale:?}): empty subject");
            for body in [&out.text, &out.html].into_iter().flatten() {
                // A `none` printed from an absent optional value (CSS aside).
                let words = body.replace("text-decoration: none", "");
                assert!(!words.contains("none"), "{key} ({locale:?}): {body}");
                assert!(!body.contains("{{"), "{key} ({locale:?}): {body}");
            }
            assert_eq!(out.data, serde_json::Value::Object(data.clone()));
        }
    }
}

#[test]
fn welcome_uses_data_loops_and_locales() {
    let r = renderer();
    let data = load_sample(&shipped_dir(), "welcome").expect("sample");

    let en = r.render(&email("welcome", None, data.clone())).expect("en");
    assert_eq!(en.subject.as_deref(), Some("Welcome to Acme Cloud, Ana!"));
    let text = en.text.expect("text");
    assert!(text.contains("Hi Ana,"), "{text}");
    assert!(text.contains("(ana@example.com)"), "{text}");
    assert!(text.contains("Pro plan (12.50 EUR per month)"), "{text}");
    assert!(text.contains("until December 15, 2026"), "{text}");
    assert!(
        text.contains("  1. Create your first project: https://app.example.com/projects/new\n"),
        "{text}"
    );
    assert!(text.contains("  2. Invite your team:"), "{text}");
    assert!(text.contains("help@example.com"), "{text}");
    let html = en.html.expect("html");
    // Autoescape also escapes `/` in attribute values (valid HTML).
    assert!(
        html.contains(
            "<li><a href=\"https:&#x2f;&#x2f;app.example.com&#x2f;team\">Invite your team</a></li>"
        ),
        "{html}"
    );

    // pt-BR falls back to pt.
    let pt = r
        .render(&email("welcome", Some("pt-BR"), data))
        .expect("pt");
    assert_eq!(
        pt.subject.as_deref(),
        Some("Bem-vindo(a) ao Acme Cloud, Ana!")
    );
    let text = pt.text.expect("text");
    assert!(text.contains("termina em 15/12/2026"), "{text}");

    // Only the required data: optional sections disappear, defaults fill in.
    let minimal = serde_json::json!({"user": {"first_name": "Bo"}});
    let serde_json::Value::Object(minimal) = minimal else {
        unreachable!()
    };
    let out = r
        .render(&email("welcome", Some("fr"), minimal))
        .expect("minimal");
    assert_eq!(out.subject.as_deref(), Some("Welcome to Herald, Bo!"));
    let text = out.text.expect("text");
    assert!(!text.contains("plan"), "{text}");
    assert!(
        text.contains("Questions? Just reply to this email."),
        "{text}"
    );
}

#[test]
fn password_reset_escapes_html_and_reports_missing_url() {
    let r = renderer();
    let mut data = load_sample(&shipped_dir(), "password_reset").expect("sample");
    data.insert("app_name".into(), "<Acme & Co>".into());
    let out = r
        .render(&email("password_reset", None, data.clone()))
        .expect("render");
    assert_eq!(
        out.subject.as_deref(),
        Some("Reset your <Acme & Co> password")
    );
    let html = out.html.expect("html");
    assert!(html.contains("&lt;Acme &amp; Co&gt;"), "{html}");
    let text = out.text.expect("text");
    assert!(text.contains("expires in 20 minutes"), "{text}");
    assert!(text.contains("2026-11-27 18:42 UTC"), "{text}");

    data.remove("reset_url");
    let e = r
        .render(&email("password_reset", None, data))
        .expect_err("missing url");
    assert_eq!(e.code, RenderErrorCode::TemplateError);
    assert!(e.message.contains("reset_url"), "{e}");
}

//! Property-based fuzzing of the two places untrusted input is interpreted:
//! the request decoder (`herald::domain::decode_request`) and the renderer
//! (`herald::render::FileRenderer`, inline content and templates with
//! arbitrary data). Properties: never panic, always terminate, and what is
//! accepted is well-formed (a rendered subject is one line, output is capped).
//!
//! Bounded in the normal suite (`HERALD_FUZZ_CASES`, default 256 cases per
//! property); `scripts/faults.sh` runs it longer. Inputs that once crashed or
//! misbehaved are kept below as `regression_*` tests.

use std::path::Path;
use std::sync::LazyLock;

use herald::config::TemplateSettings;
use herald::domain::decode_request;
use herald::render::{FileRenderer, Renderer};
use proptest::prelude::*;
use serde_json::{Value, json};

const MAX_BYTES: usize = 1024 * 1024;
const MAX_OUTPUT: usize = 64 * 1024;

fn cases() -> u32 {
    std::env::var("HERALD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // Shrinking a slow template can take long; keep failures quick to report.
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

static RENDERER: LazyLock<FileRenderer> = LazyLock::new(|| {
    FileRenderer::new(&TemplateSettings {
        dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("templates"),
        default_locale: "en".into(),
        fuel: 50_000,
        max_output_bytes: MAX_OUTPUT,
    })
    .expect("shipped templates load")
});

/// Decodes, and when accepted renders every notification: must not panic,
/// and what renders must respect the limits.
fn decode_and_render(bytes: &[u8]) {
    let Ok(request) = decode_request(bytes, MAX_BYTES) else {
        return;
    };
    for n in request.into_notifications() {
        if let Ok(c) = RENDERER.render(&n) {
            if let Some(s) = &c.subject {
                assert!(
                    !s.contains('\r') && !s.contains('\n'),
                    "multi-line subject {s:?}"
                );
            }
            for part in [&c.subject, &c.text, &c.html].into_iter().flatten() {
                assert!(
                    part.len() <= MAX_OUTPUT,
                    "output over the cap: {}",
                    part.len()
                );
            }
        }
    }
}

fn valid_examples() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/examples");
    let mut v: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("examples")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("request-"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    v.sort();
    v
}

/// Arbitrary JSON values, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        template_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("id".to_string()),
        Just("channel".to_string()),
        Just("recipient".to_string()),
        Just("recipients".to_string()),
        Just("content".to_string()),
        Just("template".to_string()),
        Just("meta".to_string()),
        Just("headers".to_string()),
        Just("email".to_string()),
        Just("url".to_string()),
        Just("subject".to_string()),
        Just("text".to_string()),
        Just("specversion".to_string()),
        Just("data".to_string()),
        "[a-z_]{1,12}",
    ]
}

/// Template source built from minijinja tokens, identifiers and literals.
fn template_text() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{{ "),
        Just(" }}"),
        Just("{% "),
        Just(" %}"),
        Just("{# "),
        Just(" #}"),
        Just("for x in "),
        Just("endfor"),
        Just("if "),
        Just("else"),
        Just("endif"),
        Just("set y = "),
        Just("macro m(a) "),
        Just("endmacro"),
        Just("m(1)"),
        Just("include 'order_shipped/text.jinja'"),
        Just("range(100000)"),
        Just("range(10**9)"),
        Just(" * "),
        Just(" ~ "),
        Just(" ** "),
        Just("|join"),
        Just("|upper"),
        Just("|tojson"),
        Just("|datetimeformat"),
        Just("|money"),
        Just("|default('d')"),
        Just("|length"),
        Just("'x'"),
        Just("\"\\u0000\""),
        Just("1000000"),
        Just("-1"),
        Just("("),
        Just(")"),
        Just("["),
        Just("]"),
        Just("."),
        Just(","),
        Just("notification.id"),
        Just("recipient.email"),
        Just("notification"),
        Just("x"),
        Just("y"),
        Just("loop.index"),
        Just("self"),
        Just("\r\n"),
        Just("é€😀"),
    ];
    prop::collection::vec(token, 0..24).prop_map(|v| v.concat())
}

#[test]
fn decoder_and_renderer_survive_arbitrary_bytes() {
    proptest!(config(), |(bytes in prop::collection::vec(any::<u8>(), 0..2048))| {
        decode_and_render(&bytes);
    });
}

#[test]
fn decoder_and_renderer_survive_mutated_examples() {
    let examples = valid_examples();
    assert!(!examples.is_empty());
    proptest!(config(), |(
        which in 0..examples.len(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    )| {
        let mut b = examples[which].clone();
        for (at, byte, op) in edits {
            if b.is_empty() { break; }
            let i = at.index(b.len());
            match op {
                0 => b[i] = byte,
                1 => { b.remove(i); }
                _ => b.insert(i, byte),
            }
        }
        decode_and_render(&b);
    });
}

#[test]
fn decoder_and_renderer_survive_arbitrary_json() {
    proptest!(config(), |(v in json_value())| {
        decode_and_render(v.to_string().as_bytes());
    });
}

#[test]
fn renderer_survives_arbitrary_inline_templates() {
    proptest!(config(), |(
        subject in template_text(),
        text in template_text(),
        html in template_text(),
        email in any::<bool>(),
    )| {
        let (channel, recipient) = if email {
            ("email", json!({"email": "ada@example.com"}))
        } else {
            ("webhook", json!({"url": "https://example.com/hook"}))
        };
        let req = json!({"id": "fuzz-1", "channel": channel, "recipient": recipient,
            "content": {"subject": subject, "text": text, "html": html}});
        decode_and_render(req.to_string().as_bytes());
    });
}

#[test]
fn renderer_survives_arbitrary_template_data() {
    proptest!(config(), |(
        data in prop::collection::btree_map(key(), json_value(), 0..6),
        order_id in json_value(),
        items in json_value(),
        key in prop_oneof![Just("order_shipped"), Just("welcome"), Just("password_reset")],
    )| {
        let mut data: serde_json::Map<String, Value> = data.into_iter().collect();
        data.insert("order_id".into(), order_id);
        data.insert("items".into(), items);
        let req = json!({"id": "fuzz-2", "channel": "email",
            "recipient": {"email": "ada@example.com", "locale": "pt-BR"},
            "template": {"key": key, "data": data}});
        decode_and_render(req.to_string().as_bytes());
    });
}

// ----------------------------------------------------------- regressions

/// Deep nesting is refused by the JSON parser's recursion limit, never a
/// stack overflow.
#[test]
fn regression_deep_nesting() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    decode_and_render(deep.as_bytes());
    let deep_data = format!(
        r#"{{"id":"d","channel":"webhook","recipient":{{"url":"https://example.com/"}},"template":{{"key":"order_shipped","data":{{"x":{}1{}}}}}}}"#,
        "{\"a\":".repeat(10_000),
        "}".repeat(10_000)
    );
    assert!(decode_request(deep_data.as_bytes(), MAX_BYTES).is_err());
}

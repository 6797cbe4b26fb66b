//! The template store: templates kept in PostgreSQL with versions, resolved
//! by (key, channel, tenant, app, locale) and rendered from an in-memory cache.
//!
//! - [`store`]: SQL for templates and their versions (every update is a new
//!   version; activate/deactivate; `herald templates sync` upserts the files).
//! - [`resolve`]: the resolution chain and the locale fallback.
//! - [`cache`]: [`StoreRenderer`], the [`crate::render::Renderer`] that renders
//!   stored templates from a compiled in-memory snapshot and falls back to the
//!   file templates.
//!
//! This file owns the content types shared by all three: the engines
//! (`jinja`, `text`, `static`), a template version's content and its
//! validation, the `variables_schema` subset, and rendering one compiled
//! template.

pub mod cache;
pub mod resolve;
pub mod store;

use std::collections::BTreeMap;

use minijinja::Environment;
use serde::{Deserialize, Serialize};

use crate::domain::{Channel, Notification};
use crate::render::{
    Part, RenderError, RenderedContent, build_context, check_required, describe, render_capped,
    store_part,
};

pub use cache::StoreRenderer;
pub use store::{TemplateStore, TemplateStoreError};

/// Largest template source (one field), in bytes.
pub const MAX_SOURCE_BYTES: usize = 512 * 1024;

/// How a template's fields are turned into text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// minijinja, with Herald's environment (strict undefined, fuel, filters,
    /// autoescape for html).
    #[default]
    Jinja,
    /// `${name}` / `${user.name}` substitution; a missing variable is an error;
    /// values are HTML-escaped in the html field. `$$` is a literal `$`.
    Text,
    /// Output as written; no variables.
    Static,
}

impl Engine {
    /// The database and wire spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Engine::Jinja => "jinja",
            Engine::Text => "text",
            Engine::Static => "static",
        }
    }

    /// Parses the database and wire spelling.
    pub fn parse(s: &str) -> Option<Engine> {
        Some(match s {
            "jinja" => Engine::Jinja,
            "text" => Engine::Text,
            "static" => Engine::Static,
            _ => return None,
        })
    }
}

/// The content of one template version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TemplateContent {
    #[serde(default)]
    pub engine: Engine,
    /// Subject (email) or title (push); one line after rendering.
    pub subject_template: Option<String>,
    /// Plain-text body.
    pub body_template: Option<String>,
    /// HTML body (autoescaped).
    pub html_template: Option<String>,
    /// Informational (`text/plain`, `text/html`, `application/json`).
    pub content_type: Option<String>,
    /// `{"required": [...], "properties": {"name": {"type": "string"}}}`,
    /// checked against `template.data` before rendering.
    pub variables_schema: Option<serde_json::Value>,
}

/// A validation failure naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// JSON path of the field (`body_template`, `variables_schema.required`).
    pub field: String,
    pub message: String,
}

impl FieldError {
    /// A failure of `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl TemplateContent {
    /// The source of `part`, if the version has one.
    pub(crate) fn source(&self, part: Part) -> Option<&str> {
        match part {
            Part::Subject => self.subject_template.as_deref(),
            Part::Text => self.body_template.as_deref(),
            Part::Html => self.html_template.as_deref(),
        }
    }

    /// Checks the content can be stored: at least one field, sizes, the
    /// schema subset, and (jinja) that every field compiles.
    pub fn validate(&self) -> Result<(), FieldError> {
        let fields = [
            ("subject_template", Part::Subject),
            ("body_template", Part::Text),
            ("html_template", Part::Html),
        ];
        if fields.iter().all(|(_, p)| self.source(*p).is_none()) {
            return Err(FieldError::new(
                "body_template",
                "at least one of subject_template, body_template, html_template is required",
            ));
        }
        if let Some(s) = &self.variables_schema {
            VariablesSchema::parse(s)?;
        }
        let mut env = Environment::new();
        for (field, part) in fields {
            let Some(src) = self.source(part) else {
                continue;
            };
            if src.len() > MAX_SOURCE_BYTES {
                return Err(FieldError::new(
                    field,
                    format!("longer than {MAX_SOURCE_BYTES} bytes"),
                ));
            }
            match self.engine {
                Engine::Jinja => {
                    env.add_template_owned(format!("check/{}", part_name(part)), src.to_string())
                        .map_err(|e| FieldError::new(field, describe(&e, false, 0)))?;
                }
                Engine::Text => {
                    text_variables(src).map_err(|m| FieldError::new(field, m))?;
                }
                Engine::Static => {}
            }
        }
        Ok(())
    }
}

/// The environment name suffix of a part (`html.jinja` turns autoescape on).
pub(crate) fn part_name(part: Part) -> &'static str {
    match part {
        Part::Subject => "subject.jinja",
        Part::Text => "text.jinja",
        Part::Html => "html.jinja",
    }
}

/// JSON types a variable may be declared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JsonType {
    String,
    Number,
    Integer,
    Boolean,
    Object,
    Array,
    Null,
}

impl JsonType {
    fn parse(s: &str) -> Option<JsonType> {
        Some(match s {
            "string" => JsonType::String,
            "number" => JsonType::Number,
            "integer" => JsonType::Integer,
            "boolean" => JsonType::Boolean,
            "object" => JsonType::Object,
            "array" => JsonType::Array,
            "null" => JsonType::Null,
            _ => return None,
        })
    }

    fn matches(self, v: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match self {
            JsonType::String => v.is_string(),
            JsonType::Number => v.is_number(),
            JsonType::Integer => v.is_i64() || v.is_u64(),
            JsonType::Boolean => v.is_boolean(),
            JsonType::Object => v.is_object(),
            JsonType::Array => v.is_array(),
            JsonType::Null => matches!(v, V::Null),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            JsonType::String => "string",
            JsonType::Number => "number",
            JsonType::Integer => "integer",
            JsonType::Boolean => "boolean",
            JsonType::Object => "object",
            JsonType::Array => "array",
            JsonType::Null => "null",
        }
    }
}

/// The supported subset of JSON Schema for `variables_schema`: top-level
/// `required` and `properties.<name>.type` (a type or a list of types).
/// Other keywords (`description`, `title`, `$schema`, …) are ignored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VariablesSchema {
    required: Vec<String>,
    types: BTreeMap<String, Vec<JsonType>>,
}

/// A variable that does not satisfy the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SchemaViolation {
    /// The variable's name (top-level key of `template.data`).
    pub variable: String,
    pub message: String,
}

impl VariablesSchema {
    /// Parses the subset; the error names the offending field.
    pub fn parse(v: &serde_json::Value) -> Result<VariablesSchema, FieldError> {
        let f = |sub: &str| format!("variables_schema{sub}");
        let obj = v
            .as_object()
            .ok_or_else(|| FieldError::new(f(""), "must be a JSON object"))?;
        let mut schema = VariablesSchema::default();
        if let Some(req) = obj.get("required") {
            let arr = req
                .as_array()
                .ok_or_else(|| FieldError::new(f(".required"), "must be an array of names"))?;
            for name in arr {
                let name = name.as_str().ok_or_else(|| {
                    FieldError::new(f(".required"), "must be an array of strings")
                })?;
                schema.required.push(name.to_string());
            }
        }
        if let Some(props) = obj.get("properties") {
            let props = props
                .as_object()
                .ok_or_else(|| FieldError::new(f(".properties"), "must be an object"))?;
            for (name, p) in props {
                let field = f(&format!(".properties.{name}.type"));
                let Some(t) = p.get("type") else {
                    continue;
                };
                let names: Vec<&str> = match t {
                    serde_json::Value::String(s) => vec![s.as_str()],
                    serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_str()).collect(),
                    _ => return Err(FieldError::new(field, "must be a type name or a list")),
                };
                let mut types = Vec::new();
                for n in names {
                    types.push(
                        JsonType::parse(n).ok_or_else(|| {
                            FieldError::new(&field, format!("unknown type {n:?}"))
                        })?,
                    );
                }
                schema.types.insert(name.clone(), types);
            }
        }
        Ok(schema)
    }

    /// Checks `data`: every required variable present, declared types match.
    pub fn check(
        &self,
        data: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), SchemaViolation> {
        for name in &self.required {
            if !data.contains_key(name) {
                return Err(SchemaViolation {
                    variable: name.clone(),
                    message: format!("missing required variable `{name}`"),
                });
            }
        }
        for (name, types) in &self.types {
            if let Some(v) = data.get(name)
                && !types.is_empty()
                && !types.iter().any(|t| t.matches(v))
            {
                let want: Vec<&str> = types.iter().map(|t| t.as_str()).collect();
                return Err(SchemaViolation {
                    variable: name.clone(),
                    message: format!("variable `{name}` must be of type {}", want.join(" or ")),
                });
            }
        }
        Ok(())
    }
}

/// A template version ready to render: its content, the parsed schema and
/// the names of its jinja parts in the environment it was compiled into.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    /// The template's id (0 for an ad hoc preview).
    pub id: i64,
    pub version: i32,
    pub content: TemplateContent,
    pub schema: Option<VariablesSchema>,
    /// Environment name prefix of the jinja parts (`db/12/3`).
    pub prefix: String,
    /// Set when the stored content no longer compiles: rendering fails with it.
    pub broken: Option<String>,
}

impl Compiled {
    /// Compiles `content` into `env` under `prefix`. A compile error is kept
    /// in `broken` (rendering then fails) rather than returned.
    pub fn new(
        env: &mut Environment<'static>,
        id: i64,
        version: i32,
        prefix: String,
        content: TemplateContent,
    ) -> Compiled {
        let mut broken = None;
        let schema = match content
            .variables_schema
            .as_ref()
            .map(VariablesSchema::parse)
        {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                broken = Some(e.to_string());
                None
            }
            None => None,
        };
        if content.engine == Engine::Jinja {
            for part in Part::ALL {
                if let Some(src) = content.source(part)
                    && let Err(e) = env.add_template_owned(
                        format!("{prefix}/{}", part_name(part)),
                        src.to_string(),
                    )
                {
                    broken.get_or_insert_with(|| describe(&e, false, 0));
                }
            }
        }
        Compiled {
            id,
            version,
            content,
            schema,
            prefix,
            broken,
        }
    }

    /// Checks the schema, then renders every part present.
    pub fn render(
        &self,
        env: &Environment<'static>,
        data: &serde_json::Map<String, serde_json::Value>,
        n: &Notification,
        max_output_bytes: usize,
    ) -> Result<RenderedContent, RenderError> {
        if let Some(b) = &self.broken {
            return Err(RenderError::template(format!(
                "template {} version {} is broken: {b}",
                self.id, self.version
            )));
        }
        if let Some(schema) = &self.schema {
            schema
                .check(data)
                .map_err(|v| RenderError::template(v.message))?;
        }
        let mut out = RenderedContent {
            data: serde_json::Value::Object(data.clone()),
            ..RenderedContent::default()
        };
        let jinja_ctx = (self.content.engine == Engine::Jinja).then(|| build_context(data, n));
        let text_ctx = (self.content.engine == Engine::Text).then(|| text_context(data, n));
        for part in Part::ALL {
            let Some(src) = self.content.source(part) else {
                continue;
            };
            let rendered = match (&jinja_ctx, &text_ctx) {
                (Some(ctx), _) => {
                    let name = format!("{}/{}", self.prefix, part_name(part));
                    let tmpl = env
                        .get_template(&name)
                        .map_err(|e| RenderError::template(describe(&e, false, 0)))?;
                    render_capped(&tmpl, ctx, max_output_bytes)?
                }
                (None, Some(ctx)) => substitute(src, ctx, part == Part::Html)?,
                (None, None) => src.to_string(),
            };
            if rendered.len() > max_output_bytes {
                return Err(RenderError::template(format!(
                    "rendered output too large (limit {max_output_bytes} bytes)"
                )));
            }
            store_part(&mut out, part, rendered)?;
        }
        check_required(n.channel, &out)?;
        Ok(out)
    }
}

/// The `text` engine's context: `template.data` plus `recipient` and
/// `notification`, as for jinja.
fn text_context(
    data: &serde_json::Map<String, serde_json::Value>,
    n: &Notification,
) -> serde_json::Value {
    let mut ctx = data.clone();
    ctx.insert(
        "recipient".into(),
        serde_json::json!({
            "user_id": n.recipient.user_id,
            "email": n.recipient.email.as_ref().map(|e| e.as_str()),
            "phone": n.recipient.phone.as_ref().map(|p| p.as_str()),
            "url": n.recipient.url.as_ref().map(|u| u.as_str()),
            "locale": n.recipient.locale,
            "timezone": n.recipient.timezone,
        }),
    );
    ctx.insert(
        "notification".into(),
        serde_json::json!({
            "id": n.id,
            "request_id": n.request_id,
            "tenant_id": n.tenant_id,
            "app_id": n.app_id,
            "channel": n.channel.as_str(),
            "category": n.category,
            "priority": n.priority.as_str(),
            "correlation_id": n.correlation_id,
        }),
    );
    serde_json::Value::Object(ctx)
}

/// One piece of a `text` template.
enum Piece<'a> {
    Lit(&'a str),
    Var(&'a str),
}

/// Splits a `text` template into literals and `${path}` variables.
fn text_pieces(src: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find('$') {
        out.push(Piece::Lit(&rest[..i]));
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push(Piece::Lit("$"));
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or("unclosed `${`")?;
            let path = r[..end].trim();
            let ok = !path.is_empty()
                && path.split('.').all(|s| {
                    !s.is_empty()
                        && s.chars()
                            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
                });
            if !ok {
                return Err(format!(
                    "`${{{}}}` is not a variable name (letters, digits, _ and - joined by .)",
                    crate::render::truncate_for_message(path)
                ));
            }
            out.push(Piece::Var(path));
            rest = &r[end + 1..];
        } else {
            out.push(Piece::Lit("$"));
            rest = after;
        }
    }
    out.push(Piece::Lit(rest));
    Ok(out)
}

/// The variables a `text` template uses (validates its syntax).
fn text_variables(src: &str) -> Result<Vec<&str>, String> {
    Ok(text_pieces(src)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Var(v) => Some(v),
            Piece::Lit(_) => None,
        })
        .collect())
}

/// Renders a `text` template: each `${a.b}` is looked up in `ctx`; strings
/// as is, numbers and booleans printed, anything else (or missing) an error.
fn substitute(src: &str, ctx: &serde_json::Value, escape: bool) -> Result<String, RenderError> {
    let mut out = String::with_capacity(src.len());
    for piece in text_pieces(src).map_err(RenderError::template)? {
        match piece {
            Piece::Lit(s) => out.push_str(s),
            Piece::Var(path) => {
                let mut v = ctx;
                for seg in path.split('.') {
                    v = v.get(seg).ok_or_else(|| {
                        RenderError::template(format!("undefined variable `{path}`"))
                    })?;
                }
                let s = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(n) => n.to_string(),
                    serde_json::Value::Bool(b) => b.to_string(),
                    _ => {
                        return Err(RenderError::template(format!(
                            "variable `{path}` is not a string, number or boolean"
                        )));
                    }
                };
                if escape {
                    html_escape_into(&mut out, &s);
                } else {
                    out.push_str(&s);
                }
            }
        }
    }
    Ok(out)
}

fn html_escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            c => out.push(c),
        }
    }
}

/// `pt_br` / `PT-br` → `pt-BR` (language lower case, 2-letter region upper
/// case); the spelling stored in `templates.locale`.
pub fn canonical_locale(s: &str) -> String {
    let norm = crate::render::normalize_locale(s);
    norm.split('-')
        .enumerate()
        .map(|(i, p)| {
            if i > 0 && p.len() == 2 {
                p.to_ascii_uppercase()
            } else {
                p.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Checks a template scope: key syntax, locale syntax.
pub fn validate_scope(key: &str, locale: Option<&str>) -> Result<(), FieldError> {
    if !crate::render::valid_key(key) {
        return Err(FieldError::new(
            "key",
            "must be 1-128 characters of a-z 0-9 _ . - not starting with .",
        ));
    }
    if let Some(l) = locale
        && !crate::render::valid_locale(l)
    {
        return Err(FieldError::new(
            "locale",
            "must be a locale name (letters, digits, - or _)",
        ));
    }
    Ok(())
}

/// Parses a channel name, naming `field` on failure.
pub fn parse_channel(s: &str, field: &str) -> Result<Channel, FieldError> {
    Channel::parse(s)
        .ok_or_else(|| FieldError::new(field, "must be one of email, sms, push, webhook, in_app"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        match v {
            serde_json::Value::Object(m) => m,
            _ => panic!("object"),
        }
    }

    #[test]
    fn schema_subset_checks_required_and_types() {
        let s = VariablesSchema::parse(&serde_json::json!({
            "required": ["name", "total"],
            "properties": {"name": {"type": "string"}, "total": {"type": ["number", "string"]}}
        }))
        .unwrap();
        assert!(
            s.check(&data(serde_json::json!({"name": "a", "total": 3})))
                .is_ok()
        );
        let e = s.check(&data(serde_json::json!({"total": 3}))).unwrap_err();
        assert_eq!(e.variable, "name");
        assert!(e.message.contains("`name`"));
        let e = s
            .check(&data(serde_json::json!({"name": 1, "total": 3})))
            .unwrap_err();
        assert!(e.message.contains("string"), "{e}");
        assert_eq!(
            VariablesSchema::parse(&serde_json::json!({"required": "x"}))
                .unwrap_err()
                .field,
            "variables_schema.required"
        );
        assert!(
            VariablesSchema::parse(&serde_json::json!({"properties": {"x": {"type": "strin"}}}))
                .is_err()
        );
    }

    #[test]
    fn text_engine_substitutes_and_escapes() {
        let ctx = serde_json::json!({"user": {"name": "<Ana>"}, "n": 3});
        assert_eq!(
            substitute("Hi ${user.name}, ${n} $$ $x", &ctx, false).unwrap(),
            "Hi <Ana>, 3 $ $x"
        );
        assert_eq!(
            substitute("<b>${user.name}</b>", &ctx, true).unwrap(),
            "<b>&lt;Ana&gt;</b>"
        );
        let e = substitute("${user.age}", &ctx, false).unwrap_err();
        assert!(e.message.contains("user.age"), "{e}");
        assert!(text_variables("${").is_err());
        assert!(text_variables("${a b}").is_err());
    }

    #[test]
    fn validate_names_the_field() {
        let c = TemplateContent {
            body_template: Some("{% if %}".into()),
            ..TemplateContent::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "body_template");
        assert_eq!(
            TemplateContent::default().validate().unwrap_err().field,
            "body_template"
        );
        let c = TemplateContent {
            engine: Engine::Static,
            body_template: Some("{% if %}".into()),
            ..TemplateContent::default()
        };
        assert!(c.validate().is_ok());
    }

    #[test]
    fn locales_are_canonical() {
        assert_eq!(canonical_locale("pt_br"), "pt-BR");
        assert_eq!(canonical_locale("EN"), "en");
        assert_eq!(canonical_locale("zh-hant-tw"), "zh-hant-TW");
    }
}

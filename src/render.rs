//! Rendering: a notification's content (inline or a template) → subject, text, html.
//!
//! This module owns the minijinja [`Environment`], the on-disk template
//! catalog (`templates/<key>/[<locale>/]{subject,text,html}.jinja`), locale
//! fallback, the render context, the output limits and Herald's template
//! filters (`datetimeformat`, `money`).
//!
//! # Templates on disk
//! `FileRenderer::new` reads the whole directory once, eagerly: every file is
//! parsed at start and a syntax error names the file. Nothing touches the disk
//! per message. A key directory holds any of `subject.jinja`, `text.jinja`,
//! `html.jinja` (at least one), optional partials `_<name>.jinja` (reachable
//! from `{% include "<key>/_<name>.jinja" %}`), an optional `sample.json`
//! (sample `template.data`, ignored by the renderer) and locale directories
//! (`pt`, `pt-BR`) holding the same files. Keys are `[a-z0-9_.-]`, not
//! starting with `.`.
//!
//! # Locale resolution
//! Candidates, in order: `template.locale`, `recipient.locale` (each followed
//! by its shorter forms, `pt-BR` → `pt`), then `default_locale` (same), then
//! the unlocalized files. Matching ignores case and treats `_` as `-`. The
//! first locale directory that exists is used *as a whole*: a translation is
//! never mixed with files of another language.
//!
//! # Context
//! Every key of `template.data` at the top level, plus `recipient`
//! (`user_id`, `email`, `phone`, `url`, `locale`, `timezone`) and
//! `notification` (`id`, `request_id`, `tenant_id`, `app_id`, `channel`,
//! `category`, `priority`, `correlation_id`). A data key named `recipient` or
//! `notification` is shadowed: Herald's value wins. Undefined variables are
//! errors (strict mode); use `default` or `is defined` for optional data.
//! Values print as minijinja prints them: JSON `true`/`false` as `True`/
//! `False`, `null` as `None`; write `{{ "true" if flag else "false" }}` for
//! another spelling.
//!
//! # Limits
//! Fuel (`templates.fuel`) bounds the work of one rendered field, minijinja
//! bounds recursion (500 frames) and `range` (100,000 items) and a repeated
//! string (100 MB); every rendered field is capped at
//! `templates.max_output_bytes` while it is written. HTML templates
//! (`html.jinja`, `*.html.jinja`) autoescape; subject and text do not.
//!
//! Not bounded: the size of intermediate values. A template can still build
//! a large string without writing it (`{% set s = 'x' * 10**8 %}` and then
//! `s ~ s` a few times); only the written output is capped. Template files
//! are trusted; inline content is as trusted as the producers on the topic.
//!
//! Inline content (`content.subject/text/html`) is a template too, compiled per
//! message and rendered with the same context and limits.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, FixedOffset, Offset, Utc};
use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, ErrorKind, State, UndefinedBehavior};
use serde::{Deserialize, Serialize};

use crate::config::TemplateSettings;
use crate::domain::{Channel, Content, InlineContent, Notification, TemplateRef};

/// Rendered content, ready for a channel adapter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedContent {
    /// One line, trimmed (email subject, push title); `None` when the
    /// template or inline content has no subject.
    pub subject: Option<String>,
    /// Plain-text body (email text part, SMS, push body).
    pub text: Option<String>,
    /// HTML body, rendered with autoescape on.
    pub html: Option<String>,
    /// For webhook/in-app: the template's data (or empty object), passed through.
    pub data: serde_json::Value,
}

/// Turns a notification's content into [`RenderedContent`]. Called
/// concurrently from many tasks.
pub trait Renderer: Send + Sync {
    /// Renders the notification's inline content or template.
    fn render(&self, n: &Notification) -> Result<RenderedContent, RenderError>;
}

/// Why a render failed. Bounded: use [`RenderErrorCode::as_str`] as a metric
/// label or outcome error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RenderErrorCode {
    /// No template with that key (or the key is not a valid key).
    TemplateNotFound,
    /// Syntax error, undefined variable, fuel exhausted, output too large,
    /// a line break in the subject, or a field the channel needs is missing.
    TemplateError,
}

impl RenderErrorCode {
    /// The snake_case spelling (`template_not_found`, `template_error`).
    pub fn as_str(&self) -> &'static str {
        match self {
            RenderErrorCode::TemplateNotFound => "template_not_found",
            RenderErrorCode::TemplateError => "template_error",
        }
    }
}

impl std::fmt::Display for RenderErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A render failure: a bounded code and a human-readable message (which names
/// the template file and line, never the data's values).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RenderError {
    /// What kind of failure (bounded set).
    pub code: RenderErrorCode,
    /// Details for humans, at most [`MAX_MESSAGE_BYTES`] bytes.
    pub message: String,
}

/// Longest [`RenderError::message`], in bytes (it travels in outcome events).
pub const MAX_MESSAGE_BYTES: usize = 512;

impl RenderError {
    fn new(code: RenderErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE_BYTES {
            let mut end = MAX_MESSAGE_BYTES - 3;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("...");
        }
        RenderError { code, message }
    }

    pub(crate) fn template(message: impl Into<String>) -> Self {
        Self::new(RenderErrorCode::TemplateError, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(RenderErrorCode::TemplateNotFound, message)
    }
}

/// The three renderable parts of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Subject,
    Text,
    Html,
}

impl Part {
    pub(crate) const ALL: [Part; 3] = [Part::Subject, Part::Text, Part::Html];

    fn file_name(self) -> &'static str {
        match self {
            Part::Subject => "subject.jinja",
            Part::Text => "text.jinja",
            Part::Html => "html.jinja",
        }
    }

    /// Name of an inline source of this part (errors name it; `html`
    /// auto-escapes by it).
    fn inline_name(self) -> &'static str {
        match self {
            Part::Subject => "inline/subject.jinja",
            Part::Text => "inline/text.jinja",
            Part::Html => "inline/html.jinja",
        }
    }

    fn from_file_name(name: &str) -> Option<Part> {
        Part::ALL.into_iter().find(|p| p.file_name() == name)
    }
}

/// Which parts one template variant (a key, localized or not) has.
#[derive(Debug, Clone, Copy, Default)]
struct Variant {
    subject: bool,
    text: bool,
    html: bool,
}

impl Variant {
    fn has(&self, part: Part) -> bool {
        match part {
            Part::Subject => self.subject,
            Part::Text => self.text,
            Part::Html => self.html,
        }
    }

    fn set(&mut self, part: Part) {
        match part {
            Part::Subject => self.subject = true,
            Part::Text => self.text = true,
            Part::Html => self.html = true,
        }
    }

    fn is_empty(&self) -> bool {
        !(self.subject || self.text || self.html)
    }
}

/// One template key: its unlocalized files and its locale variants.
#[derive(Debug, Clone, Default)]
struct Entry {
    /// The files directly in `templates/<key>/`, if any.
    base: Option<Variant>,
    /// Normalized locale (`pt-br`) → (directory name as on disk, its files).
    locales: HashMap<String, (String, Variant)>,
}

/// The production [`Renderer`]: templates from a directory, loaded once.
/// Cheap to clone; clones share one environment.
#[derive(Clone)]
pub struct FileRenderer {
    /// Shared by every clone and task: the environment is immutable after start.
    inner: Arc<Inner>,
}

struct Inner {
    /// Holds every template file (parsed at start), the filters and the limits.
    env: Environment<'static>,
    /// Template key → which files exist, for resolution without disk I/O.
    catalog: BTreeMap<String, Entry>,
    /// `templates.default_locale`, normalized.
    default_locale: String,
    /// Cap of each rendered field in bytes.
    max_output_bytes: usize,
    /// Inline sources compiled before (see [`InlineCache`]).
    inline: InlineCache,
}

/// Inline sources with template syntax, compiled once each: most producers
/// send the same few sources with different data, and compiling took more
/// CPU than rendering. Each entry is the file environment plus that one
/// template (a clone shares the file templates), so an insert costs one
/// compile whatever the cache holds. Only sources up to
/// [`INLINE_CACHE_SOURCE_BYTES`] are kept, and the map is emptied when it
/// reaches [`INLINE_CACHE_ENTRIES`], so it stays under ~4 MiB of source.
#[derive(Default)]
struct InlineCache {
    /// Per part (subject, text, html): source → its environment.
    compiled: Mutex<[HashMap<String, Arc<Environment<'static>>>; 3]>,
}

const INLINE_CACHE_ENTRIES: usize = 512;
const INLINE_CACHE_SOURCE_BYTES: usize = 8 * 1024;

impl std::fmt::Debug for FileRenderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileRenderer")
            .field("keys", &self.inner.catalog.keys().collect::<Vec<_>>())
            .field("default_locale", &self.inner.default_locale)
            .field("max_output_bytes", &self.inner.max_output_bytes)
            .finish()
    }
}

impl FileRenderer {
    /// Loads and parses every template under `settings.dir`. Fails (naming the
    /// file) on a syntax error, an unreadable file, an invalid key or locale
    /// directory name, an unknown `*.jinja` file, or a key without any part.
    pub fn new(settings: &TemplateSettings) -> Result<Self, RenderError> {
        if settings.fuel == 0 {
            return Err(RenderError::template("templates.fuel must be at least 1"));
        }
        if settings.max_output_bytes == 0 {
            return Err(RenderError::template(
                "templates.max_output_bytes must be at least 1",
            ));
        }
        let mut env = new_environment(settings.fuel);
        let mut catalog = BTreeMap::new();
        let dir = &settings.dir;
        for (name, path) in read_dir_sorted(dir)? {
            if !path.is_dir() || name.starts_with('.') {
                continue;
            }
            if !valid_key(&name) {
                return Err(RenderError::template(format!(
                    "template directory {}: name is not a valid key (allowed: a-z 0-9 _ . -)",
                    path.display()
                )));
            }
            let entry = load_key(&mut env, &name, &path)?;
            catalog.insert(name, entry);
        }
        Ok(FileRenderer {
            inner: Arc::new(Inner {
                env,
                catalog,
                default_locale: normalize_locale(&settings.default_locale),
                max_output_bytes: settings.max_output_bytes,
                inline: InlineCache::default(),
            }),
        })
    }

    /// The template keys loaded, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.inner.catalog.keys().map(String::as_str)
    }

    /// The locale directories of `key` as named on disk (sorted), or `None`
    /// if there is no such key.
    pub fn locales(&self, key: &str) -> Option<Vec<String>> {
        let entry = self.inner.catalog.get(key)?;
        let mut v: Vec<String> = entry.locales.values().map(|(d, _)| d.clone()).collect();
        v.sort();
        Some(v)
    }

    fn render_template(
        &self,
        t: &TemplateRef,
        n: &Notification,
    ) -> Result<RenderedContent, RenderError> {
        if !valid_key(&t.key) {
            return Err(RenderError::not_found(format!(
                "template key {:?} is not valid (allowed: a-z 0-9 _ . -)",
                truncate_for_message(&t.key)
            )));
        }
        let Some(entry) = self.inner.catalog.get(&t.key) else {
            return Err(RenderError::not_found(format!(
                "no template with key {:?}",
                t.key
            )));
        };
        let (prefix, variant) = self.resolve(entry, &t.key, t, n)?;
        let ctx = build_context(&t.data, n);
        let mut out = RenderedContent {
            data: serde_json::Value::Object(t.data.clone()),
            ..RenderedContent::default()
        };
        for part in Part::ALL {
            if !variant.has(part) {
                continue;
            }
            let name = format!("{prefix}/{}", part.file_name());
            let tmpl = self
                .inner
                .env
                .get_template(&name)
                .map_err(|e| RenderError::template(describe(&e, false, 0)))?;
            let rendered = render_capped(&tmpl, &ctx, self.inner.max_output_bytes)?;
            store_part(&mut out, part, rendered)?;
        }
        Ok(out)
    }

    /// Picks the template variant for `t` (see the module docs): returns the
    /// environment name prefix (`welcome` or `welcome/pt`) and its files.
    fn resolve(
        &self,
        entry: &Entry,
        key: &str,
        t: &TemplateRef,
        n: &Notification,
    ) -> Result<(String, Variant), RenderError> {
        let candidates = [
            t.locale.as_deref(),
            n.recipient.locale.as_deref(),
            Some(self.inner.default_locale.as_str()),
        ];
        for loc in candidates.into_iter().flatten() {
            let mut loc = normalize_locale(loc);
            loop {
                if let Some((dir, variant)) = entry.locales.get(&loc) {
                    return Ok((format!("{key}/{dir}"), *variant));
                }
                match loc.rfind('-') {
                    Some(i) => loc.truncate(i),
                    None => break,
                }
            }
        }
        match entry.base {
            Some(v) => Ok((key.to_string(), v)),
            None => Err(RenderError::not_found(format!(
                "template {key:?} has no variant for the requested locales and no unlocalized files"
            ))),
        }
    }

    fn render_inline(
        &self,
        c: &InlineContent,
        n: &Notification,
    ) -> Result<RenderedContent, RenderError> {
        let empty = serde_json::Map::new();
        let ctx = build_context(&empty, n);
        let mut out = RenderedContent {
            data: serde_json::Value::Object(empty),
            ..RenderedContent::default()
        };
        let parts = [
            (Part::Subject, c.subject.as_deref()),
            (Part::Text, c.text.as_deref()),
            (Part::Html, c.html.as_deref()),
        ];
        if parts.iter().all(|(_, s)| s.is_none()) {
            return Err(RenderError::template(
                "inline content has no subject, text or html",
            ));
        }
        for (part, source) in parts {
            let Some(source) = source else { continue };
            // Most inline content is plain text: no need to compile it.
            if let Some(plain) = literal_output(source, self.inner.max_output_bytes) {
                store_part(&mut out, part, plain.to_string())?;
                continue;
            }
            let rendered = self.render_inline_part(part, source, &ctx)?;
            store_part(&mut out, part, rendered)?;
        }
        Ok(out)
    }

    /// Renders one inline part, compiled once per distinct source (see
    /// [`InlineCache`]).
    fn render_inline_part(
        &self,
        part: Part,
        source: &str,
        ctx: &Value,
    ) -> Result<String, RenderError> {
        let name = part.inline_name();
        let limit = self.inner.max_output_bytes;
        if source.len() > INLINE_CACHE_SOURCE_BYTES {
            let tmpl = self
                .inner
                .env
                .template_from_named_str(name, source)
                .map_err(|e| RenderError::template(describe(&e, false, 0)))?;
            return render_capped(&tmpl, ctx, limit);
        }
        let cache = &self.inner.inline.compiled;
        let slot = part as usize;
        let hit = cache.lock().unwrap_or_else(PoisonError::into_inner)[slot]
            .get(source)
            .cloned();
        let env = match hit {
            Some(env) => env,
            None => {
                let mut env = self.inner.env.clone();
                env.add_template_owned(name, source.to_string())
                    .map_err(|e| RenderError::template(describe(&e, false, 0)))?;
                let env = Arc::new(env);
                let mut compiled = cache.lock().unwrap_or_else(PoisonError::into_inner);
                if compiled.iter().map(HashMap::len).sum::<usize>() >= INLINE_CACHE_ENTRIES {
                    compiled.iter_mut().for_each(HashMap::clear);
                }
                compiled[slot].insert(source.to_string(), env.clone());
                env
            }
        };
        let tmpl = env
            .get_template(name)
            .map_err(|e| RenderError::template(describe(&e, false, 0)))?;
        render_capped(&tmpl, ctx, limit)
    }
}

impl Renderer for FileRenderer {
    fn render(&self, n: &Notification) -> Result<RenderedContent, RenderError> {
        let out = match &n.content {
            Content::Template(t) => self.render_template(t, n)?,
            Content::Inline(c) => self.render_inline(c, n)?,
        };
        check_required(n.channel, &out)?;
        Ok(out)
    }
}

/// Refuses content a channel cannot deliver: email needs a non-empty subject
/// and a text or html body; sms needs text; push needs a subject (title) or
/// text (body). Webhook and in-app carry `data` and need nothing.
pub(crate) fn check_required(channel: Channel, c: &RenderedContent) -> Result<(), RenderError> {
    let has = |f: &Option<String>| f.as_deref().is_some_and(|s| !s.trim().is_empty());
    let missing = match channel {
        Channel::Email if !has(&c.subject) => Some("subject"),
        Channel::Email if !has(&c.text) && !has(&c.html) => Some("text or html"),
        Channel::Sms if !has(&c.text) => Some("text"),
        Channel::Push if !has(&c.subject) && !has(&c.text) => Some("subject or text"),
        _ => None,
    };
    match missing {
        Some(what) => Err(RenderError::template(format!(
            "missing required field for channel {channel}: {what} rendered empty or absent"
        ))),
        None => Ok(()),
    }
}

/// What minijinja would render `source` to when it holds no template syntax
/// at all (no `{{`, `{%` or `{#`): the text itself, less one trailing line
/// break (`\r\n`, `\n` or `\r`: minijinja's default). `None` when it must
/// be rendered for real, or is longer than `limit` (rendering reports that
/// error).
fn literal_output(source: &str, limit: usize) -> Option<&str> {
    if source.len() > limit || ["{{", "{%", "{#"].iter().any(|d| source.contains(d)) {
        return None;
    }
    let s = source
        .strip_suffix("\r\n")
        .or_else(|| source.strip_suffix(['\n', '\r']))
        .unwrap_or(source);
    Some(s)
}

/// Puts a rendered field in place; a subject is trimmed and must be one line.
pub(crate) fn store_part(
    out: &mut RenderedContent,
    part: Part,
    s: String,
) -> Result<(), RenderError> {
    match part {
        Part::Subject => {
            let s = s.trim();
            if s.contains(['\r', '\n']) {
                return Err(RenderError::template("subject contains a line break"));
            }
            out.subject = Some(s.to_string());
        }
        Part::Text => out.text = Some(s),
        Part::Html => out.html = Some(s),
    }
    Ok(())
}

/// An `io::Write` that refuses to grow past `limit` bytes.
struct CappedWriter {
    buf: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("rendered output too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Renders one field, stopping as soon as it exceeds `limit` bytes.
pub(crate) fn render_capped(
    tmpl: &minijinja::Template<'_, '_>,
    ctx: &Value,
    limit: usize,
) -> Result<String, RenderError> {
    let mut w = CappedWriter {
        buf: Vec::new(),
        limit,
        exceeded: false,
    };
    let result = tmpl.render_captured_to(ctx, &mut w).map(|_| ());
    if let Err(e) = result {
        return Err(RenderError::template(describe(&e, w.exceeded, limit)));
    }
    String::from_utf8(w.buf)
        .map_err(|_| RenderError::template("rendered output is not valid UTF-8"))
}

/// A human message for a minijinja error: names the template, the line and,
/// for an undefined value, the expression (`user.first_name`).
pub(crate) fn describe(e: &minijinja::Error, output_capped: bool, limit: usize) -> String {
    let location = match (e.name(), e.line()) {
        (Some(name), Some(line)) => format!(" in {name} line {line}"),
        (Some(name), None) => format!(" in {name}"),
        _ => String::new(),
    };
    match e.kind() {
        _ if output_capped => {
            format!("rendered output too large (limit {limit} bytes){location}")
        }
        ErrorKind::UndefinedError => {
            let expr = match (e.template_source(), e.range()) {
                (Some(src), Some(r)) => src.get(r).map(str::trim).filter(|s| !s.is_empty()),
                _ => None,
            };
            match expr {
                Some(expr) => format!(
                    "undefined variable `{}`{location}",
                    truncate_for_message(expr)
                ),
                None => format!("undefined variable{location}"),
            }
        }
        ErrorKind::OutOfFuel => {
            format!("template ran out of fuel (too much work, e.g. a huge loop){location}")
        }
        _ => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                let _ = write!(s, ": {inner}");
                source = inner.source();
            }
            s
        }
    }
}

pub(crate) fn truncate_for_message(s: &str) -> &str {
    let mut end = s.len().min(80);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The render context (see the module docs). Herald's `recipient` and
/// `notification` shadow data keys of the same name.
pub(crate) fn build_context(
    data: &serde_json::Map<String, serde_json::Value>,
    n: &Notification,
) -> Value {
    let r = &n.recipient;
    let recipient: Value = [
        ("user_id", opt(r.user_id.as_deref())),
        ("email", opt(r.email.as_ref().map(|e| e.as_str()))),
        ("phone", opt(r.phone.as_ref().map(|p| p.as_str()))),
        ("url", opt(r.url.as_ref().map(|u| u.as_str()))),
        ("locale", opt(r.locale.as_deref())),
        ("timezone", opt(r.timezone.as_deref())),
    ]
    .into_iter()
    .collect();
    let notification: Value = [
        ("id", Value::from(n.id.as_str())),
        ("request_id", Value::from(n.request_id.as_str())),
        ("tenant_id", opt(n.tenant_id.as_deref())),
        ("app_id", opt(n.app_id.as_deref())),
        ("channel", Value::from(n.channel.as_str())),
        ("category", opt(n.category.as_deref())),
        ("priority", Value::from(n.priority.as_str())),
        ("correlation_id", opt(n.correlation_id.as_deref())),
    ]
    .into_iter()
    .collect();
    // `recipient` and `notification` come last, so they win over data keys
    // of the same name.
    data.iter()
        .map(|(k, v)| (Value::from(k.as_str()), json_value(v)))
        .chain([
            (Value::from("recipient"), recipient),
            (Value::from("notification"), notification),
        ])
        .collect()
}

/// The template value of a JSON value: what `Value::from_serialize` makes
/// of it, built directly (no serializer and its thread-local state per call).
fn json_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => Value::from(s.as_str()),
        J::Array(items) => Value::from(items.iter().map(json_value).collect::<Vec<_>>()),
        J::Object(map) => map
            .iter()
            .map(|(k, v)| (Value::from(k.as_str()), json_value(v)))
            .collect(),
    }
}

fn opt(s: Option<&str>) -> Value {
    s.map(Value::from).unwrap_or(Value::from(()))
}

/// The shared environment: strict undefined, fuel, autoescape for html only,
/// trimmed block lines, Herald's filters.
pub(crate) fn new_environment(fuel: u64) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(fuel));
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_auto_escape_callback(|name| {
        if name.ends_with("html.jinja") {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env.add_filter("datetimeformat", datetimeformat);
    env.add_filter("money", money);
    env
}

/// Entries of `dir` as (file name, path), sorted by name (deterministic errors).
fn read_dir_sorted(dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>, RenderError> {
    let rd = std::fs::read_dir(dir).map_err(|e| {
        RenderError::template(format!(
            "cannot read template directory {}: {e}",
            dir.display()
        ))
    })?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| {
            RenderError::template(format!(
                "cannot read template directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = ent.path();
        let Some(name) = ent.file_name().to_str().map(str::to_string) else {
            return Err(RenderError::template(format!(
                "template path {} is not UTF-8",
                path.display()
            )));
        };
        out.push((name, path));
    }
    out.sort();
    Ok(out)
}

/// Loads `templates/<key>/`: its files and its locale directories.
fn load_key(env: &mut Environment<'static>, key: &str, dir: &Path) -> Result<Entry, RenderError> {
    let mut entry = Entry::default();
    let base = load_variant(env, key, dir)?;
    if !base.is_empty() {
        entry.base = Some(base);
    }
    for (name, path) in read_dir_sorted(dir)? {
        if !path.is_dir() || name.starts_with('.') {
            continue;
        }
        if !valid_locale(&name) {
            return Err(RenderError::template(format!(
                "template locale directory {}: not a locale name (letters, digits, - or _)",
                path.display()
            )));
        }
        let prefix = format!("{key}/{name}");
        let variant = load_variant(env, &prefix, &path)?;
        if variant.is_empty() {
            return Err(RenderError::template(format!(
                "template locale directory {} has no subject.jinja, text.jinja or html.jinja",
                path.display()
            )));
        }
        let norm = normalize_locale(&name);
        if let Some((other, _)) = entry.locales.get(&norm) {
            return Err(RenderError::template(format!(
                "template {key}: locale directories {other} and {name} are the same locale"
            )));
        }
        entry.locales.insert(norm, (name, variant));
    }
    if entry.base.is_none() && entry.locales.is_empty() {
        return Err(RenderError::template(format!(
            "template directory {} has no subject.jinja, text.jinja or html.jinja",
            dir.display()
        )));
    }
    Ok(entry)
}

/// Adds the `*.jinja` files directly in `dir` to `env` as `<prefix>/<file>`.
fn load_variant(
    env: &mut Environment<'static>,
    prefix: &str,
    dir: &Path,
) -> Result<Variant, RenderError> {
    let mut variant = Variant::default();
    for (name, path) in read_dir_sorted(dir)? {
        if !path.is_file() || !name.ends_with(".jinja") {
            continue;
        }
        let part = Part::from_file_name(&name);
        if part.is_none() && !name.starts_with('_') {
            return Err(RenderError::template(format!(
                "template file {}: unknown name (expected subject.jinja, text.jinja, html.jinja or a _partial.jinja)",
                path.display()
            )));
        }
        let source = std::fs::read_to_string(&path).map_err(|e| {
            RenderError::template(format!("cannot read template file {}: {e}", path.display()))
        })?;
        env.add_template_owned(format!("{prefix}/{name}"), source)
            .map_err(|e| {
                RenderError::template(format!(
                    "template file {}: {}",
                    path.display(),
                    describe(&e, false, 0)
                ))
            })?;
        if let Some(part) = part {
            variant.set(part);
        }
    }
    Ok(variant)
}

/// A template key: `[a-z0-9_.-]+`, not starting with `.` (no `..`, no `/`).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
}

pub(crate) fn valid_locale(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 35
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `pt_BR` / `PT-br` → `pt-br`.
pub(crate) fn normalize_locale(s: &str) -> String {
    s.trim().to_ascii_lowercase().replace('_', "-")
}

/// Reads `templates/<key>/sample.json`: the sample `template.data` documented
/// with a shipped template (used by tests and `herald templates render`).
pub fn load_sample(
    dir: &Path,
    key: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, RenderError> {
    if !valid_key(key) {
        return Err(RenderError::not_found(format!(
            "template key {:?} is not valid",
            truncate_for_message(key)
        )));
    }
    let path = dir.join(key).join("sample.json");
    let bytes = std::fs::read(&path)
        .map_err(|e| RenderError::not_found(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| RenderError::template(format!("{} is not a JSON object: {e}", path.display())))
}

// ---------------------------------------------------------------- filters

/// A time zone the renderer understands. Without an IANA database (chrono-tz
/// is not a dependency) that is UTC and fixed offsets only.
fn parse_tz(s: &str) -> Option<FixedOffset> {
    let s = s.trim();
    if matches!(
        s.to_ascii_uppercase().as_str(),
        "UTC" | "Z" | "GMT" | "ETC/UTC" | "ETC/GMT" | "UNIVERSAL" | "ZULU"
    ) {
        return Some(Utc.fix());
    }
    let s = s
        .strip_prefix("UTC")
        .or_else(|| s.strip_prefix("GMT"))
        .unwrap_or(s);
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => rest.split_at(2),
        None => (rest, "0"),
    };
    let h: i32 = h.parse().ok()?;
    let m: i32 = m.parse().ok()?;
    if !(0..=18).contains(&h) || !(0..60).contains(&m) {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

fn filter_error(msg: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// `{{ ts | datetimeformat }}`, `{{ ts | datetimeformat("%d/%m/%Y", "+01:00") }}`.
///
/// `value`: an RFC 3339 string or Unix seconds. `fmt`: chrono strftime
/// (default `%Y-%m-%d %H:%M UTC`, or `… +02:00` with an offset). `tz`: `UTC` or a fixed offset (`+02:00`);
/// when absent, the recipient's timezone if it is one of those, else UTC
/// (IANA names such as `Europe/Lisbon` are not resolved: they render in UTC).
fn datetimeformat(
    state: &State,
    value: Value,
    fmt: Option<String>,
    tz: Option<String>,
) -> Result<String, minijinja::Error> {
    let utc: DateTime<Utc> = if let Some(s) = value.as_str() {
        DateTime::parse_from_rfc3339(s)
            .map_err(|e| filter_error(format!("datetimeformat: not an RFC 3339 time: {e}")))?
            .with_timezone(&Utc)
    } else if let Ok(secs) = i64::try_from(value.clone()) {
        DateTime::from_timestamp(secs, 0)
            .ok_or_else(|| filter_error("datetimeformat: timestamp out of range"))?
    } else {
        return Err(filter_error(
            "datetimeformat: expects an RFC 3339 string or Unix seconds",
        ));
    };
    let offset = match tz {
        Some(tz) => parse_tz(&tz).ok_or_else(|| {
            filter_error("datetimeformat: time zone must be UTC or an offset like +02:00")
        })?,
        None => state
            .lookup("recipient")
            .and_then(|r| r.get_attr("timezone").ok())
            .and_then(|tz| tz.as_str().and_then(parse_tz))
            .unwrap_or(Utc.fix()),
    };
    let fmt = fmt.unwrap_or_else(|| {
        if offset.local_minus_utc() == 0 {
            "%Y-%m-%d %H:%M UTC".to_string()
        } else {
            "%Y-%m-%d %H:%M %:z".to_string()
        }
    });
    let local = utc.with_timezone(&offset);
    let mut out = String::new();
    // An invalid strftime specifier makes `Display` fail; never panic on it.
    write!(out, "{}", local.format(&fmt))
        .map_err(|_| filter_error("datetimeformat: invalid format string"))?;
    Ok(out)
}

/// Minor-unit digits of a currency (ISO 4217); 2 unless listed.
fn currency_decimals(code: &str) -> usize {
    match code {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// `{{ 12.5 | money("EUR") }}` → `12.50 EUR`. The amount is a number or a
/// numeric string in major units; the currency a 3-letter ISO 4217 code.
fn money(amount: Value, currency: String) -> Result<String, minijinja::Error> {
    let code = currency.trim().to_ascii_uppercase();
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(filter_error(
            "money: currency must be a 3-letter ISO 4217 code",
        ));
    }
    let n: f64 = if let Some(s) = amount.as_str() {
        s.trim()
            .parse()
            .map_err(|_| filter_error("money: amount is not a number"))?
    } else {
        f64::try_from(amount).map_err(|_| filter_error("money: amount is not a number"))?
    };
    if !n.is_finite() {
        return Err(filter_error("money: amount is not a finite number"));
    }
    let decimals = currency_decimals(&code);
    Ok(format!("{n:.decimals$} {code}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{EmailAddress, Meta, Priority, Recipient};
    use std::path::PathBuf;

    /// The plain-text shortcut must give exactly what minijinja renders.
    #[test]
    fn literal_output_matches_minijinja() {
        let env = new_environment(1_000);
        let samples = [
            "Hello",
            "Hello\n",
            "Hello\r\n",
            "Hello\n\n",
            "  spaced  \n\t",
            "<b>5 > 4 & 3 < 4</b>\n",
            "a { b } c % d # e",
            "line one\nline two\r\nline three\r",
            "carriage\r\r",
            "both\n\r",
            "\n",
            "",
            "ünïcödé ✓\n",
        ];
        for name in ["inline/subject", "inline/text.jinja", "inline/html.jinja"] {
            for source in samples {
                let rendered = env
                    .template_from_named_str(name, source)
                    .unwrap()
                    .render(())
                    .unwrap();
                assert_eq!(
                    literal_output(source, 1024),
                    Some(rendered.as_str()),
                    "{name}: {source:?}"
                );
            }
        }
        for templated in ["{{ x }}", "a {% if true %}b{% endif %}", "{# note #}"] {
            assert_eq!(literal_output(templated, 1024), None, "{templated:?}");
        }
        assert_eq!(literal_output("too long", 3), None);
    }

    fn settings(dir: PathBuf) -> TemplateSettings {
        TemplateSettings {
            dir,
            default_locale: "en".into(),
            fuel: 50_000,
            max_output_bytes: 64 * 1024,
        }
    }

    /// Writes `files` (relative path → contents) into a fresh directory.
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, body) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
        dir
    }

    fn renderer(files: &[(&str, &str)]) -> (tempfile::TempDir, FileRenderer) {
        let dir = tree(files);
        let r = FileRenderer::new(&settings(dir.path().to_path_buf())).unwrap();
        (dir, r)
    }

    fn notification(channel: Channel, content: Content) -> Notification {
        Notification {
            id: "n-1".into(),
            request_id: "r-1".into(),
            tenant_id: Some("acme".into()),
            app_id: None,
            channel,
            recipient: Recipient {
                user_id: Some("u-42".into()),
                email: Some(EmailAddress::parse("ana@example.com").unwrap()),
                ..Recipient::default()
            },
            content,
            priority: Priority::High,
            category: Some("account".into()),
            scheduled_at: None,
            expires_at: None,
            meta: Meta::default(),
            correlation_id: None,
        }
    }

    fn inline(subject: Option<&str>, text: Option<&str>, html: Option<&str>) -> Notification {
        notification(
            Channel::Webhook,
            Content::Inline(InlineContent {
                subject: subject.map(Into::into),
                text: text.map(Into::into),
                html: html.map(Into::into),
            }),
        )
    }

    fn by_key(key: &str, locale: Option<&str>, data: serde_json::Value) -> Notification {
        let serde_json::Value::Object(data) = data else {
            panic!("data must be an object")
        };
        notification(
            Channel::Email,
            Content::Template(TemplateRef {
                key: key.into(),
                locale: locale.map(Into::into),
                data,
            }),
        )
    }

    fn err_of(r: Result<RenderedContent, RenderError>) -> RenderError {
        match r {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e,
        }
    }

    const GREETING: &[(&str, &str)] = &[
        ("greet/subject.jinja", "Hello {{ name }}"),
        ("greet/text.jinja", "en {{ name }}"),
        ("greet/pt/subject.jinja", "Olá {{ name }}"),
        ("greet/pt/text.jinja", "pt {{ name }}"),
        ("greet/pt-BR/text.jinja", "pt-BR {{ name }}"),
        ("greet/fr/text.jinja", "fr {{ name }}"),
    ];

    #[test]
    fn inline_content_renders_with_context() {
        let (_d, r) = renderer(&[]);
        let out = r
            .render(&inline(
                Some("  Hi {{ recipient.user_id }} ({{ notification.priority }})  "),
                Some("id={{ notification.id }} tenant={{ notification.tenant_id }} ch={{ notification.channel }}"),
                None,
            ))
            .unwrap();
        assert_eq!(out.subject.as_deref(), Some("Hi u-42 (high)"));
        assert_eq!(out.text.as_deref(), Some("id=n-1 tenant=acme ch=webhook"));
        assert_eq!(out.html, None);
        assert_eq!(out.data, serde_json::json!({}));
    }

    /// Inline sources `r` holds compiled.
    fn inline_cached(r: &FileRenderer) -> usize {
        let compiled = r.inner.inline.compiled.lock().unwrap();
        compiled.iter().map(HashMap::len).sum()
    }

    #[test]
    fn inline_sources_are_compiled_once_and_rendered_every_time() {
        let (_d, r) = renderer(&[]);
        let source = Some("Hi {{ recipient.user_id }}");
        let html = Some("<b>{{ notification.id }}</b>");
        let mut n = inline(source, source, html);
        let first = r.render(&n).unwrap();
        assert_eq!(first.subject.as_deref(), Some("Hi u-42"));
        assert_eq!(first.html.as_deref(), Some("<b>n-1</b>"));
        // Same sources, other data: rendered again from the cached compile.
        n.id = "<n-2>".into();
        n.recipient.user_id = Some("u-7".into());
        let second = r.render(&n).unwrap();
        assert_eq!(second.subject.as_deref(), Some("Hi u-7"));
        assert_eq!(second.text.as_deref(), Some("Hi u-7"));
        // The html part keeps its auto-escaping.
        assert_eq!(second.html.as_deref(), Some("<b>&lt;n-2&gt;</b>"));
        let cached = inline_cached(&r);
        assert_eq!(cached, 3, "subject, text and html, once each");
        // A syntax error is reported every time, never cached.
        for _ in 0..2 {
            let e = err_of(r.render(&inline(Some("{{ oops"), None, None)));
            assert!(e.message.contains("inline/subject.jinja"), "{e}");
        }
        assert_eq!(
            inline_cached(&r),
            3,
            "a source that fails to compile is not kept"
        );
        // Past the entry limit the cache starts over instead of growing.
        for i in 0..INLINE_CACHE_ENTRIES + 10 {
            let s = format!("{i} {{{{ recipient.user_id }}}}");
            let out = r.render(&inline(Some(&s), None, None)).unwrap();
            assert_eq!(out.subject, Some(format!("{i} u-42")));
        }
        let cached = inline_cached(&r);
        assert!(cached <= INLINE_CACHE_ENTRIES, "{cached}");
    }

    #[test]
    fn template_by_key_with_data_passthrough() {
        let (_d, r) = renderer(GREETING);
        let n = by_key("greet", None, serde_json::json!({"name": "Ana"}));
        let out = r.render(&n).unwrap();
        assert_eq!(out.subject.as_deref(), Some("Hello Ana"));
        assert_eq!(out.text.as_deref(), Some("en Ana"));
        assert_eq!(out.html, None);
        assert_eq!(out.data, serde_json::json!({"name": "Ana"}));
        assert_eq!(r.keys().collect::<Vec<_>>(), vec!["greet"]);
        assert_eq!(
            r.locales("greet").unwrap(),
            vec!["fr".to_string(), "pt".into(), "pt-BR".into()]
        );
    }

    #[test]
    fn locale_fallback_chain() {
        let (_d, r) = renderer(GREETING);
        let data = serde_json::json!({"name": "Ana"});
        let text = |n: &Notification| {
            let mut n = n.clone();
            n.channel = Channel::Webhook; // pt-BR has no subject: fine for webhook
            r.render(&n).unwrap().text.unwrap()
        };

        // Exact, case and separator insensitive.
        assert_eq!(
            text(&by_key("greet", Some("pt_br"), data.clone())),
            "pt-BR Ana"
        );
        // pt-PT → pt (region stripped); the pt variant is used as a whole.
        let out = r
            .render(&by_key("greet", Some("pt-PT"), data.clone()))
            .unwrap();
        assert_eq!(out.text.as_deref(), Some("pt Ana"));
        assert_eq!(out.subject.as_deref(), Some("Olá Ana"));
        // A variant without a subject stays without one (no mixing languages).
        let mut n = by_key("greet", Some("pt-BR"), data.clone());
        n.channel = Channel::Webhook;
        assert_eq!(r.render(&n).unwrap().subject, None);
        // Unknown template locale → recipient locale (fr-CA → fr).
        let mut n = by_key("greet", Some("de-AT"), data.clone());
        n.recipient.locale = Some("fr-CA".into());
        assert_eq!(text(&n), "fr Ana");
        // Template locale wins over recipient locale.
        let mut n = by_key("greet", Some("pt"), data.clone());
        n.recipient.locale = Some("fr".into());
        assert_eq!(text(&n), "pt Ana");
        // Nothing matches → default locale "en" (no en dir) → unlocalized files.
        let mut n = by_key("greet", Some("xx"), data.clone());
        n.recipient.locale = Some("yy-ZZ".into());
        assert_eq!(text(&n), "en Ana");
        // Garbage locale is just a miss, never a path.
        assert_eq!(text(&by_key("greet", Some("../pt"), data)), "en Ana");
    }

    #[test]
    fn default_locale_dir_is_used_before_unlocalized() {
        let dir = tree(&[
            ("k/text.jinja", "base"),
            ("k/en/text.jinja", "en"),
            ("k/es/text.jinja", "es"),
        ]);
        let mut s = settings(dir.path().to_path_buf());
        s.default_locale = "en-US".into();
        let r = FileRenderer::new(&s).unwrap();
        let mut n = by_key("k", Some("de"), serde_json::json!({}));
        n.channel = Channel::Webhook;
        assert_eq!(r.render(&n).unwrap().text.as_deref(), Some("en"));
    }

    #[test]
    fn strict_undefined_names_the_variable() {
        let (_d, r) = renderer(&[("k/text.jinja", "line one\nHi {{ user.first_name }}!")]);
        let mut n = by_key("k", None, serde_json::json!({"user": {}}));
        n.channel = Channel::Webhook;
        let e = err_of(r.render(&n));
        assert_eq!(e.code, RenderErrorCode::TemplateError);
        assert!(e.message.contains("user.first_name"), "{e}");
        assert!(e.message.contains("k/text.jinja line 2"), "{e}");

        let e = err_of(r.render(&inline(None, Some("{{ missing_var }}"), None)));
        assert!(e.message.contains("missing_var"), "{e}");
        // `default` and `is defined` handle optional data.
        let out = r
            .render(&inline(
                None,
                Some("{{ x | default('d') }}{% if y is defined %}y{% endif %}"),
                None,
            ))
            .unwrap();
        assert_eq!(out.text.as_deref(), Some("d"));
    }

    #[test]
    fn autoescape_on_for_html_off_for_text_and_subject() {
        let (_d, r) = renderer(&[
            ("k/subject.jinja", "S {{ v }}"),
            ("k/text.jinja", "T {{ v }}"),
            ("k/html.jinja", "<p>{{ v }}</p>"),
        ]);
        let n = by_key(
            "k",
            None,
            serde_json::json!({"v": "<script>alert(1)</script>"}),
        );
        let out = r.render(&n).unwrap();
        assert_eq!(out.subject.as_deref(), Some("S <script>alert(1)</script>"));
        assert_eq!(out.text.as_deref(), Some("T <script>alert(1)</script>"));
        let html = out.html.unwrap();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");

        // Inline html escapes too.
        let mut n = inline(
            None,
            Some("{{ recipient.user_id }}<b>"),
            Some("<i>{{ '<b>' }}</i>"),
        );
        n.channel = Channel::Webhook;
        let out = r.render(&n).unwrap();
        assert_eq!(out.html.as_deref(), Some("<i>&lt;b&gt;</i>"));
        assert_eq!(out.text.as_deref(), Some("u-42<b>"));
    }

    #[test]
    fn fuel_stops_huge_loops() {
        let (_d, r) = renderer(&[]);
        // range() itself refuses more than 100k items…
        let e = err_of(r.render(&inline(
            None,
            Some("{% for i in range(10**9) %}x{% endfor %}"),
            None,
        )));
        assert_eq!(e.code, RenderErrorCode::TemplateError);
        // …and fuel stops loops that stay under that limit.
        let e = err_of(r.render(&inline(
            None,
            Some(
                "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            ),
            None,
        )));
        assert_eq!(e.code, RenderErrorCode::TemplateError);
        assert!(e.message.contains("fuel"), "{e}");
    }

    #[test]
    fn huge_output_is_stopped() {
        let (_d, r) = renderer(&[]);
        // One expression producing 10 MB (fuel cannot see it).
        let e = err_of(r.render(&inline(None, Some("{{ 'x' * 10000000 }}"), None)));
        assert!(e.message.contains("too large"), "{e}");
        // Bigger repetitions are refused by minijinja itself.
        let e = err_of(r.render(&inline(None, Some("{{ 'x' * 10**9 }}"), None)));
        assert_eq!(e.code, RenderErrorCode::TemplateError);
        // Many small writes also hit the cap.
        let e = err_of(r.render(&inline(
            None,
            Some("{% for i in range(20000) %}0123456789{% endfor %}"),
            None,
        )));
        assert!(e.message.contains("too large"), "{e}");
        // Exactly at the limit is fine.
        let out = r
            .render(&inline(None, Some("{{ 'x' * 65536 }}"), None))
            .unwrap();
        assert_eq!(out.text.map(|t| t.len()), Some(65536));
    }

    #[test]
    fn recursion_is_bounded() {
        let (_d, r) = renderer(&[]);
        let src = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
        // A thread with a small stack, like a tokio worker's default 2 MiB.
        let r2 = r.clone();
        let e = std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || err_of(r2.render(&inline(None, Some(src), None))))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(e.code, RenderErrorCode::TemplateError);
    }

    #[test]
    fn subject_is_trimmed_and_single_line() {
        let (_d, r) = renderer(&[]);
        let out = r.render(&inline(Some("\n  Hi  \n"), None, None)).unwrap();
        assert_eq!(out.subject.as_deref(), Some("Hi"));
        for s in ["a\nb", "a\r\nb", "a{{ '\\r' }}b", "{{ v }}"] {
            let mut n = inline(Some(s), None, None);
            if s.contains("{{ v }}") {
                n = by_key("k", None, serde_json::json!({}));
                n.content = Content::Inline(InlineContent {
                    subject: Some("x {{ notification.id }}\r\nBcc: evil@x.com".into()),
                    ..InlineContent::default()
                });
            }
            let e = err_of(r.render(&n));
            assert_eq!(e.code, RenderErrorCode::TemplateError);
            assert_eq!(e.message, "subject contains a line break");
        }
    }

    #[test]
    fn unknown_and_invalid_keys() {
        let (_d, r) = renderer(GREETING);
        let e = err_of(r.render(&by_key("nope", None, serde_json::json!({}))));
        assert_eq!(e.code, RenderErrorCode::TemplateNotFound);
        assert_eq!(e.code.as_str(), "template_not_found");
        for bad in [
            "../greet",
            "greet/pt",
            "..",
            ".hidden",
            "",
            "Greet",
            "a b",
            "/etc/passwd",
        ] {
            let e = err_of(r.render(&by_key(bad, None, serde_json::json!({}))));
            assert_eq!(e.code, RenderErrorCode::TemplateNotFound, "{bad:?}");
        }
        assert!(valid_key("password_reset"));
        assert!(valid_key("billing.invoice-v2"));
    }

    #[test]
    fn herald_context_shadows_data_keys() {
        let (_d, r) = renderer(&[(
            "k/text.jinja",
            "{{ recipient.user_id }} {{ notification.id }} {{ other }}",
        )]);
        let mut n = by_key(
            "k",
            None,
            serde_json::json!({"recipient": {"user_id": "fake"}, "notification": {"id": "fake"}, "other": 1}),
        );
        n.channel = Channel::Webhook;
        assert_eq!(r.render(&n).unwrap().text.as_deref(), Some("u-42 n-1 1"));
    }

    #[test]
    fn data_values_are_what_serialization_would_make_of_them() {
        let data = serde_json::json!({
            "null": null, "yes": true, "no": false,
            "small": 7, "negative": -12, "big": u64::MAX, "min": i64::MIN, "float": 2.5,
            "text": "Grüße \"quoted\" <b>", "empty": "",
            "list": [1, "two", [3.5, null], {"k": "v"}],
            "nested": {"b": {"c": [true]}, "a": 1},
        });
        let serde_json::Value::Object(map) = &data else {
            panic!("not an object")
        };
        for (k, v) in map {
            let direct = json_value(v);
            let serialized = Value::from_serialize(v);
            assert_eq!(direct, serialized, "{k}");
            assert_eq!(direct.kind(), serialized.kind(), "{k}");
            assert_eq!(format!("{direct:?}"), format!("{serialized:?}"), "{k}");
            assert_eq!(direct.to_string(), serialized.to_string(), "{k}");
        }
        // The whole context: data keys plus Herald's two maps, iterable.
        let mut env = new_environment(10_000);
        env.add_template(
            "t",
            "{% for k in ctx|sort %}{{ k }},{% endfor %}|{{ ctx.nested.b.c[0] }}|{{ ctx.big }}|{{ ctx.float * 2 }}|{{ ctx.list[2][0] }}|{{ ctx.yes }} {{ ctx.no }} {{ ctx.null }}|{{ \"true\" if ctx.yes else \"false\" }}",
        )
        .unwrap();
        let n = by_key("k", None, serde_json::json!({}));
        let ctx = minijinja::context! { ctx => build_context(map, &n) };
        let out = env.get_template("t").unwrap().render(ctx).unwrap();
        assert_eq!(
            out,
            "big,empty,float,list,min,negative,nested,no,notification,null,recipient,small,text,yes,|True|18446744073709551615|5.0|3.5|True False None|true"
        );
    }

    #[test]
    fn required_fields_per_channel() {
        let (_d, r) = renderer(&[]);
        let mut n = inline(None, Some("body"), None);
        n.channel = Channel::Email;
        let e = err_of(r.render(&n));
        assert!(e.message.contains("subject"), "{e}");
        let mut n = inline(Some("subj"), None, None);
        n.channel = Channel::Email;
        assert!(err_of(r.render(&n)).message.contains("text or html"));
        let mut n = inline(Some("subj"), None, Some("<p>x</p>"));
        n.channel = Channel::Email;
        assert!(r.render(&n).is_ok());
        let mut n = inline(Some("subj"), None, None);
        n.channel = Channel::Sms;
        assert!(r.render(&n).is_err());
        let e = err_of(r.render(&inline(None, None, None)));
        assert_eq!(e.code, RenderErrorCode::TemplateError);
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tree(&[
            ("ok/text.jinja", "fine"),
            ("bad/text.jinja", "line\n{% if %}"),
        ]);
        let e = FileRenderer::new(&settings(dir.path().to_path_buf())).unwrap_err();
        assert!(e.message.contains("bad/text.jinja"), "{e}");

        let dir = tree(&[("k/body.jinja", "typo")]);
        let e = FileRenderer::new(&settings(dir.path().to_path_buf())).unwrap_err();
        assert!(e.message.contains("body.jinja"), "{e}");

        let dir = tree(&[("k/sample.json", "{}")]);
        let e = FileRenderer::new(&settings(dir.path().to_path_buf())).unwrap_err();
        assert!(e.message.contains("no subject.jinja"), "{e}");

        let dir = tree(&[("Bad Key/text.jinja", "x")]);
        let e = FileRenderer::new(&settings(dir.path().to_path_buf())).unwrap_err();
        assert!(e.message.contains("not a valid key"), "{e}");

        let e = FileRenderer::new(&settings("/nonexistent/herald-templates".into())).unwrap_err();
        assert!(e.message.contains("cannot read template directory"), "{e}");
    }

    #[test]
    fn partials_can_be_included() {
        let (_d, r) = renderer(&[
            ("k/_footer.html.jinja", "<footer>{{ v }}</footer>"),
            (
                "k/html.jinja",
                "<p>x</p>{% include 'k/_footer.html.jinja' %}",
            ),
        ]);
        let mut n = by_key("k", None, serde_json::json!({"v": "<b>"}));
        n.channel = Channel::Webhook;
        assert_eq!(
            r.render(&n).unwrap().html.as_deref(),
            Some("<p>x</p><footer>&lt;b&gt;</footer>")
        );
    }

    #[test]
    fn datetimeformat_filter() {
        let (_d, r) = renderer(&[]);
        let t = |src: &str, tz: Option<&str>| {
            let mut n = inline(None, Some(src), None);
            n.recipient.timezone = tz.map(Into::into);
            r.render(&n).map(|c| c.text.unwrap_or_default())
        };
        let ts = "'2026-03-01T10:05:00+01:00'";
        assert_eq!(
            t(&format!("{{{{ {ts} | datetimeformat }}}}"), None).unwrap(),
            "2026-03-01 09:05 UTC"
        );
        assert_eq!(
            t(&format!("{{{{ {ts} | datetimeformat }}}}"), Some("+05:30")).unwrap(),
            "2026-03-01 14:35 +05:30"
        );
        assert_eq!(
            t(
                &format!("{{{{ {ts} | datetimeformat('%d/%m/%Y %H:%M') }}}}"),
                Some("+02:00")
            )
            .unwrap(),
            "01/03/2026 11:05"
        );
        assert_eq!(
            t(
                &format!("{{{{ {ts} | datetimeformat('%H:%M', 'UTC') }}}}"),
                Some("+02:00")
            )
            .unwrap(),
            "09:05"
        );
        // IANA names are not resolved (no tz database): UTC.
        assert_eq!(
            t(
                &format!("{{{{ {ts} | datetimeformat('%H:%M') }}}}"),
                Some("Europe/Lisbon")
            )
            .unwrap(),
            "09:05"
        );
        assert_eq!(t("{{ 0 | datetimeformat('%Y') }}", None).unwrap(), "1970");
        assert!(t("{{ 'yesterday' | datetimeformat }}", None).is_err());
        assert!(t(&format!("{{{{ {ts} | datetimeformat('%Q') }}}}"), None).is_err());
        assert!(
            t(
                &format!("{{{{ {ts} | datetimeformat('%H', 'Mars/Base') }}}}"),
                None
            )
            .is_err()
        );
    }

    #[test]
    fn money_filter() {
        let (_d, r) = renderer(&[]);
        let t = |src: &str| {
            r.render(&inline(None, Some(src), None))
                .map(|c| c.text.unwrap_or_default())
        };
        assert_eq!(t("{{ 12.5 | money('EUR') }}").unwrap(), "12.50 EUR");
        assert_eq!(t("{{ 12 | money('usd') }}").unwrap(), "12.00 USD");
        assert_eq!(t("{{ '1999' | money('JPY') }}").unwrap(), "1999 JPY");
        assert_eq!(t("{{ 1.5 | money('KWD') }}").unwrap(), "1.500 KWD");
        assert!(t("{{ 'abc' | money('EUR') }}").is_err());
        assert!(t("{{ 1 | money('EURO') }}").is_err());
    }

    #[test]
    fn error_messages_are_bounded() {
        let long = "é".repeat(1000);
        let e = RenderError::template(long);
        assert!(e.message.len() <= MAX_MESSAGE_BYTES);
        assert!(e.message.ends_with("..."));
    }

    #[test]
    fn renderer_is_shareable() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<FileRenderer>();
        let _: Arc<dyn Renderer> = Arc::new(renderer(&[]).1);
    }
}

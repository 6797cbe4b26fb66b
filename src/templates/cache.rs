//! [`StoreRenderer`]: renders stored templates from an in-memory snapshot.
//!
//! The snapshot holds every active version, compiled into one minijinja
//! environment (Herald's: strict undefined, fuel, filters, autoescape for
//! html), indexed by (key, channel). `render` never touches the database: it
//! resolves the template in the snapshot (see [`super::resolve`]) and renders
//! it; a key with no stored template falls back to the file templates
//! ([`FileRenderer`]), and inline content always uses the file renderer.
//!
//! Invalidation: a write through this instance's API calls
//! [`StoreRenderer::refresh`] before answering, so this instance renders the
//! new version at once. Other instances reload the whole snapshot every
//! `template_store.refresh_ms` (TTL, default 5 s): they see a write after at
//! most that long. A failed reload keeps the previous snapshot.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use minijinja::Environment;
use tokio_util::sync::CancellationToken;

use super::resolve::{self, Scoped};
use super::store::{ActiveTemplate, TemplateStore, TemplateStoreError};
use super::{Compiled, TemplateContent};
use crate::config::TemplateSettings;
use crate::domain::{Channel, Content, Notification, TemplateRef};
use crate::render::{FileRenderer, RenderError, RenderedContent, Renderer, normalize_locale};

/// One cached template: scope and compiled version.
struct Entry {
    tenant_id: Option<String>,
    app_id: Option<String>,
    locale_norm: Option<String>,
    compiled: Compiled,
}

impl Scoped for Entry {
    fn tenant_id(&self) -> Option<&str> {
        self.tenant_id.as_deref()
    }
    fn app_id(&self) -> Option<&str> {
        self.app_id.as_deref()
    }
    fn locale_norm(&self) -> Option<&str> {
        self.locale_norm.as_deref()
    }
}

/// The active templates at one point in time, compiled.
struct Snapshot {
    /// Holds every jinja part, named `db/<id>/<version>/<part>.jinja`.
    env: Environment<'static>,
    by_key: HashMap<(String, Channel), Vec<Entry>>,
}

/// Which stored template and version served a render.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Resolved {
    pub template_id: i64,
    pub version: i32,
    pub tenant_id: Option<String>,
    pub app_id: Option<String>,
    pub locale: Option<String>,
}

/// The production renderer when the template store is on.
pub struct StoreRenderer {
    /// File templates: fallback for keys with no stored template, and inline content.
    files: FileRenderer,
    store: TemplateStore,
    fuel: u64,
    default_locale: String,
    max_output_bytes: usize,
    /// Replaced as a whole on refresh; readers clone the `Arc` and let go of the lock.
    snapshot: RwLock<Arc<Snapshot>>,
    /// Serializes reloads so an older read never replaces a newer one.
    reload: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for StoreRenderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreRenderer")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl StoreRenderer {
    /// An empty renderer (every key falls back to the files) until
    /// [`StoreRenderer::refresh`] loads the stored templates.
    pub fn new(store: TemplateStore, files: FileRenderer, settings: &TemplateSettings) -> Self {
        StoreRenderer {
            files,
            store,
            fuel: settings.fuel,
            default_locale: settings.default_locale.clone(),
            max_output_bytes: settings.max_output_bytes,
            snapshot: RwLock::new(Arc::new(Snapshot {
                env: Environment::new(),
                by_key: HashMap::new(),
            })),
            reload: tokio::sync::Mutex::new(()),
        }
    }

    /// [`StoreRenderer::new`] then [`StoreRenderer::refresh`].
    pub async fn load(
        store: TemplateStore,
        files: FileRenderer,
        settings: &TemplateSettings,
    ) -> Result<StoreRenderer, TemplateStoreError> {
        let r = Self::new(store, files, settings);
        r.refresh().await?;
        Ok(r)
    }

    /// Reloads every active template from the database; returns how many.
    pub async fn refresh(&self) -> Result<usize, TemplateStoreError> {
        let _guard = self.reload.lock().await;
        let rows = self.store.load_active().await?;
        let n = rows.len();
        let snap = self.compile(rows);
        match self.snapshot.write() {
            Ok(mut s) => *s = Arc::new(snap),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(snap),
        }
        Ok(n)
    }

    /// Reloads every `every` until `stop` is cancelled; failures are logged.
    pub fn spawn_refresh(
        self: &Arc<Self>,
        every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = this.refresh().await {
                            tracing::warn!(error = %e, "reloading templates failed; keeping the previous ones");
                        }
                    }
                }
            }
        })
    }

    fn compile(&self, rows: Vec<ActiveTemplate>) -> Snapshot {
        let mut env = crate::render::new_environment(self.fuel);
        let mut by_key: HashMap<(String, Channel), Vec<Entry>> = HashMap::new();
        for row in rows {
            let prefix = format!("db/{}/{}", row.id, row.version);
            let compiled = Compiled::new(&mut env, row.id, row.version, prefix, row.content);
            if let Some(b) = &compiled.broken {
                tracing::warn!(template_id = row.id, version = row.version, error = %b, "stored template does not compile");
            }
            by_key
                .entry((row.key, row.channel))
                .or_default()
                .push(Entry {
                    tenant_id: row.tenant_id,
                    app_id: row.app_id,
                    locale_norm: row.locale.as_deref().map(normalize_locale),
                    compiled,
                });
        }
        Snapshot { env, by_key }
    }

    fn current(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(s) => Arc::clone(&s),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Resolves and renders a stored template for `n`; `None` when no stored
    /// template matches (the caller falls back to the files).
    pub fn render_stored(
        &self,
        t: &TemplateRef,
        n: &Notification,
    ) -> Option<(Resolved, Result<RenderedContent, RenderError>)> {
        let snap = self.current();
        let entries = snap.by_key.get(&(t.key.clone(), n.channel))?;
        let locales = resolve::locale_chain(
            t.locale.as_deref(),
            n.recipient.locale.as_deref(),
            &self.default_locale,
        );
        let e = resolve::resolve(
            entries,
            n.tenant_id.as_deref(),
            n.app_id.as_deref(),
            &locales,
        )?;
        let resolved = Resolved {
            template_id: e.compiled.id,
            version: e.compiled.version,
            tenant_id: e.tenant_id.clone(),
            app_id: e.app_id.clone(),
            locale: e.locale_norm.clone(),
        };
        let out = e
            .compiled
            .render(&snap.env, &t.data, n, self.max_output_bytes);
        Some((resolved, out))
    }

    /// Renders `content` (not stored, or a stored version picked by id) once:
    /// compiled for this call only. Used by preview.
    pub fn render_content(
        &self,
        content: &TemplateContent,
        data: &serde_json::Map<String, serde_json::Value>,
        n: &Notification,
    ) -> Result<RenderedContent, RenderError> {
        let mut env = crate::render::new_environment(self.fuel);
        let c = Compiled::new(&mut env, 0, 0, "preview".into(), content.clone());
        c.render(&env, data, n, self.max_output_bytes)
    }

    /// The file renderer behind this one.
    pub fn files(&self) -> &FileRenderer {
        &self.files
    }
}

impl Renderer for StoreRenderer {
    fn render(&self, n: &Notification) -> Result<RenderedContent, RenderError> {
        if let Content::Template(t) = &n.content
            && let Some((_, out)) = self.render_stored(t, n)
        {
            return out;
        }
        self.files.render(n)
    }
}

//! From the `providers` table to live [`Provider`]s in the [`Registry`].
//!
//! [`RegistryLoader::reload`] reads every row, builds adapters with
//! [`build_provider`] for rows that are new or changed (by name and
//! `updated_at`) and keeps the `Arc<Provider>` of unchanged ones, so
//! adapters' connection pools and per-provider state keyed by name survive a
//! reload. The snapshot is replaced only when something changed.
//!
//! A row that cannot be used (credentials that do not decrypt, a config its
//! adapter rejects) is reported as a [`LoadError`] naming the provider, never
//! its secrets, and stays in the registry as an *inactive* placeholder: it is
//! never selected, but its channel still counts as registered, so Herald does
//! not silently fall back to the `herald.toml` provider of that channel.
//!
//! [`spawn_refresh`] keeps the registry current: it `LISTEN`s on
//! `herald_providers` (a trigger `NOTIFY`s on every change) and reloads at
//! once, and also every `providers.refresh_ms` in case a notification was
//! missed. Database outages are logged and retried; the last good snapshot
//! stays in effect meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::crypto::Cipher;
use super::store::{Loaded, ProviderStore, ProviderStoreError, StoredSpec};
use super::{Provider, ProviderSpec, Registry};
use crate::channels::{
    AdapterConfigError, AdapterContext, ChannelAdapter, SendError, SendReceipt, build_provider,
};
use crate::domain::{Channel, Notification};
use crate::render::RenderedContent;
use secrecy::SecretString;

/// The PostgreSQL channel the `providers` trigger notifies.
pub const NOTIFY_CHANNEL: &str = "herald_providers";

/// A registered provider that could not be loaded, and why. The message
/// never contains credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoadError {
    pub provider: String,
    pub message: String,
    /// The row's `updated_at` when it could be read: a reload retries the
    /// provider, and reports a change, only when the row changes.
    #[serde(skip)]
    pub updated_at: Option<DateTime<Utc>>,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "provider {}: {}", self.provider, self.message)
    }
}

/// Builds the providers of every registered row, once (no reuse of earlier
/// adapters; see [`RegistryLoader`] for reloads). Rows that cannot be used
/// are left out and reported.
pub async fn load_providers(
    store: &ProviderStore,
    cipher: &Cipher,
    ctx: &AdapterContext,
) -> Result<(Vec<Arc<Provider>>, Vec<LoadError>), ProviderStoreError> {
    let (specs, mut errors) = store.load_specs(cipher).await?;
    let mut providers = Vec::with_capacity(specs.len());
    for s in specs {
        match build(&s, ctx) {
            Ok(p) => providers.push(p),
            Err(e) => errors.push(e),
        }
    }
    Ok((providers, errors))
}

/// Builds the adapter of one spec.
pub type BuildFn = dyn Fn(&ProviderSpec, &AdapterContext) -> Result<Arc<dyn ChannelAdapter>, AdapterConfigError>
    + Send
    + Sync;

/// How a loader turns a spec into an adapter: [`build_provider`] unless a
/// test gives another.
pub type BuildAdapter = Arc<BuildFn>;

fn build(s: &StoredSpec, ctx: &AdapterContext) -> Result<Arc<Provider>, LoadError> {
    build_with(&build_provider, s, ctx)
}

fn build_with(
    builder: &BuildFn,
    s: &StoredSpec,
    ctx: &AdapterContext,
) -> Result<Arc<Provider>, LoadError> {
    match builder(&s.spec, ctx) {
        Ok(adapter) => Ok(Arc::new(Provider {
            spec: s.spec.clone(),
            adapter,
        })),
        Err(e) => {
            tracing::warn!(provider = %s.spec.name, error = %e, "provider adapter not built");
            Err(LoadError {
                provider: s.spec.name.clone(),
                message: e.to_string(),
                updated_at: Some(s.updated_at),
            })
        }
    }
}

/// What the last reload found, shared with `/readyz`, the API and the CLI.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadState {
    /// When the table was last read successfully.
    pub loaded_at: Option<DateTime<Utc>>,
    /// Providers in effect (placeholders of failed ones not counted).
    pub providers: usize,
    /// Registered providers that could not be loaded.
    pub errors: Vec<LoadError>,
    /// The last failure to read the table (cleared by a successful read).
    pub database_error: Option<String>,
}

/// A shared handle on the [`LoadState`] of one loader.
#[derive(Debug, Clone, Default)]
pub struct LoadStatus(Arc<RwLock<LoadState>>);

impl LoadStatus {
    /// A copy of the current state.
    pub fn get(&self) -> LoadState {
        match self.0.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut LoadState)) {
        match self.0.write() {
            Ok(mut s) => f(&mut s),
            Err(p) => f(&mut p.into_inner()),
        }
    }
}

/// What one reload did.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    /// Whether the registry snapshot was replaced.
    pub changed: bool,
    /// Providers in effect.
    pub loaded: usize,
    pub errors: Vec<LoadError>,
}

/// One registered provider as the registry holds it, with the row version
/// it was built from.
struct Entry {
    /// `None` when the row could not be read at all.
    updated_at: Option<DateTime<Utc>>,
    /// The provider in effect, or the inactive placeholder of a failed one
    /// (`None` when not even its channel is known).
    provider: Option<Arc<Provider>>,
    /// Why it failed to load.
    error: Option<String>,
}

impl Entry {
    fn reuse(&self) -> Entry {
        Entry {
            updated_at: self.updated_at,
            provider: self.provider.clone(),
            error: self.error.clone(),
        }
    }
}

/// Reloads the registry from the table, reusing unchanged providers.
pub struct RegistryLoader {
    store: ProviderStore,
    cipher: Arc<Cipher>,
    ctx: AdapterContext,
    /// By name: what the registry holds now.
    current: HashMap<String, Entry>,
    status: LoadStatus,
    builder: BuildAdapter,
}

impl RegistryLoader {
    /// A loader building adapters with [`build_provider`].
    pub fn new(store: ProviderStore, cipher: Arc<Cipher>, ctx: AdapterContext) -> Self {
        RegistryLoader {
            store,
            cipher,
            ctx,
            current: HashMap::new(),
            status: LoadStatus::default(),
            builder: Arc::new(build_provider),
        }
    }

    /// Builds adapters with `builder` instead (tests).
    pub fn with_builder(mut self, builder: BuildAdapter) -> Self {
        self.builder = builder;
        self
    }

    /// The shared load state this loader updates.
    pub fn status(&self) -> LoadStatus {
        self.status.clone()
    }

    /// The store it reads.
    pub fn store(&self) -> &ProviderStore {
        &self.store
    }

    /// Reads the table and replaces `registry`'s providers when anything
    /// changed. A database failure leaves the registry as it was.
    pub async fn reload(
        &mut self,
        registry: &Registry,
    ) -> Result<ReloadOutcome, ProviderStoreError> {
        let rows = match self.store.load_all(&self.cipher).await {
            Ok(r) => r,
            Err(e) => {
                let msg = e.to_string();
                self.status.update(|s| s.database_error = Some(msg));
                return Err(e);
            }
        };
        let mut next: HashMap<String, Entry> = HashMap::with_capacity(rows.len());
        for item in rows {
            let (name, updated_at) = match &item {
                Loaded::Spec(s) => (s.spec.name.clone(), Some(s.updated_at)),
                Loaded::Failed { error, .. } => (error.provider.clone(), error.updated_at),
            };
            // The same row version as before: keep what it gave (an adapter
            // with its connections, or the same failure).
            if let Some(e) = self.current.get(&name)
                && updated_at.is_some()
                && e.updated_at == updated_at
            {
                next.insert(name, e.reuse());
                continue;
            }
            let entry = match item {
                Loaded::Spec(s) => match build_with(self.builder.as_ref(), &s, &self.ctx) {
                    Ok(p) => Entry {
                        updated_at,
                        provider: Some(p),
                        error: None,
                    },
                    Err(err) => Entry {
                        updated_at,
                        provider: Some(placeholder(s.spec.clone(), &err.message)),
                        error: Some(err.message),
                    },
                },
                Loaded::Failed { error, row } => Entry {
                    updated_at,
                    provider: row.map(|r| {
                        placeholder(r.into_spec(SecretString::from("{}")), &error.message)
                    }),
                    error: Some(error.message),
                },
            };
            next.insert(name, entry);
        }
        let mut errors: Vec<LoadError> = next
            .iter()
            .filter_map(|(name, e)| {
                e.error.as_ref().map(|m| LoadError {
                    provider: name.clone(),
                    message: m.clone(),
                    updated_at: e.updated_at,
                })
            })
            .collect();
        errors.sort_by(|a, b| a.provider.cmp(&b.provider));
        let changed = signature(&next) != signature(&self.current);
        let loaded = next.values().filter(|e| e.error.is_none()).count();
        if changed {
            let mut providers: Vec<Arc<Provider>> =
                next.values().filter_map(|e| e.provider.clone()).collect();
            providers.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
            registry.replace(providers);
            tracing::info!(
                providers = loaded,
                failed = errors.len(),
                "provider registry reloaded"
            );
        }
        self.current = next;
        let snapshot = errors.clone();
        self.status.update(|s| {
            s.loaded_at = Some(Utc::now());
            s.providers = loaded;
            s.errors = snapshot;
            s.database_error = None;
        });
        Ok(ReloadOutcome {
            changed,
            loaded,
            errors,
        })
    }
}

/// What identifies the registry's content: name, row version, usable.
fn signature(m: &HashMap<String, Entry>) -> Vec<(String, Option<DateTime<Utc>>, bool)> {
    let mut v: Vec<_> = m
        .iter()
        .map(|(n, e)| (n.clone(), e.updated_at, e.error.is_none()))
        .collect();
    v.sort();
    v
}

/// An inactive stand-in for a provider that failed to load: never selected,
/// it keeps its channel registered (no fallback to the `herald.toml`
/// provider) and reports the failure on `check()`.
fn placeholder(mut spec: ProviderSpec, reason: &str) -> Arc<Provider> {
    spec.active = false;
    spec.credentials = SecretString::from("{}");
    Arc::new(Provider {
        adapter: Arc::new(Unavailable {
            name: spec.name.clone(),
            channel: spec.channel,
            reason: reason.to_string(),
        }),
        spec,
    })
}

/// The adapter of a placeholder: every send and check fails with the load error.
struct Unavailable {
    name: String,
    channel: Channel,
    reason: String,
}

#[async_trait]
impl ChannelAdapter for Unavailable {
    fn channel(&self) -> Channel {
        self.channel
    }

    fn provider(&self) -> &str {
        &self.name
    }

    async fn send(
        &self,
        _notification: &Notification,
        _content: &RenderedContent,
    ) -> Result<SendReceipt, SendError> {
        Err(self.error())
    }

    async fn check(&self) -> Result<(), SendError> {
        Err(self.error())
    }
}

impl Unavailable {
    fn error(&self) -> SendError {
        SendError::Retryable {
            code: "provider_unavailable".into(),
            message: format!("provider {} is not loaded: {}", self.name, self.reason),
            retry_after: None,
        }
    }
}

/// Keeps `registry` current until `shutdown`: reloads at once, on every
/// `herald_providers` notification, and every `interval`. Failures (database
/// down, listener lost) are logged and retried; the registry keeps its last
/// good snapshot meanwhile.
pub fn spawn_refresh(
    registry: Arc<Registry>,
    mut loader: RegistryLoader,
    interval: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Capacity 1: notifications arriving during a reload coalesce into one.
        let (tx, mut rx) = mpsc::channel::<()>(1);
        // The listener holds its connection for good: give it its own
        // one-connection pool so the shared pool keeps its full size.
        let options = (*loader.store().pool().connect_options()).clone();
        let listen_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        let listener = tokio::spawn(listen(listen_pool, tx, shutdown.child_token()));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                Some(()) = rx.recv() => {}
            }
            if let Err(e) = loader.reload(&registry).await {
                tracing::warn!(error = %e, "reloading the provider registry failed; keeping the last one");
            }
        }
        let _ = listener.await;
    })
}

/// Forwards `herald_providers` notifications to `tx`; after (re)connecting
/// it also signals once, since changes made meanwhile were not announced.
async fn listen(pool: sqlx::PgPool, tx: mpsc::Sender<()>, shutdown: CancellationToken) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(500);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);
    let mut backoff = FIRST_BACKOFF;
    while !shutdown.is_cancelled() {
        let connected = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = connected => r,
        };
        match result {
            Ok(mut l) => {
                backoff = FIRST_BACKOFF;
                let _ = tx.try_send(());
                loop {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        n = l.try_recv() => n,
                    };
                    match next {
                        Ok(Some(_)) => {
                            let _ = tx.try_send(());
                        }
                        // Connection lost and re-established: notifications
                        // in between are gone, so reload.
                        Ok(None) => {
                            tracing::info!("provider change listener reconnected");
                            let _ = tx.try_send(());
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "provider change listener failed; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot listen for provider changes");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The built-in providers: the adapters configured in `herald.toml`
/// (`[smtp]`, `[webhook]`), each serving its channel while no provider is
/// registered for it.
pub fn builtin_providers(
    adapters: &[Arc<dyn ChannelAdapter>],
    settings: &crate::config::Settings,
) -> Vec<Arc<Provider>> {
    adapters
        .iter()
        .map(|a| {
            Arc::new(super::router::builtin_provider(
                a.clone(),
                settings.routing.builtin_max_retries,
            ))
        })
        .collect()
}

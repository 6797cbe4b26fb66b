//! Wiring: [`App::build`] creates pools, clients and adapters from
//! [`Settings`]; [`App::run_until_stopped`] runs the consumer, the due-work
//! scheduler, the preferences consumer (when configured) and the HTTP server
//! until the given shutdown future resolves, then drains and commits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::channels::{self, ChannelAdapter};
use crate::config::Settings;
use crate::http::api::providers::ProviderApi;
use crate::http::api::{self, ApiState};
use crate::http::receipts::{self, ReceiptState};
use crate::http::{self, HttpState};
use crate::kafka::consumer::RequestConsumer;
use crate::kafka::{KafkaPublisher, OutcomePublisher, topics};
use crate::pipeline::Pipeline;
use crate::policy::{Policy, SystemClock};
use crate::render::Renderer;
use crate::routing::Registry;
use crate::routing::crypto::Cipher;
use crate::routing::load::{RegistryLoader, builtin_providers, spawn_refresh};
use crate::routing::store::ProviderStore;
use crate::scheduler::{Scheduler, SchedulerSettings};
use crate::store::{self, DueStore, NotificationStore, PreferenceStore};
use crate::telemetry::Metrics;
use crate::templates::{StoreRenderer, TemplateStore};

/// A built, not yet running, Herald instance.
pub struct App {
    settings: Settings,
    pool: PgPool,
    listener: tokio::net::TcpListener,
    consumer: RequestConsumer,
    pipeline: Arc<Pipeline>,
    publisher: KafkaPublisher,
    metrics: Metrics,
    /// The due-work loop (every instance runs one).
    scheduler: Scheduler,
    /// Preference updates from `kafka.preference_topic`, when configured.
    preferences: Option<(rdkafka::consumer::StreamConsumer, Arc<Policy>)>,
    /// Stored templates: the pipeline's renderer (when enabled) and the API's.
    templates: Arc<StoreRenderer>,
    /// Delivery-receipt endpoints (`/webhooks/…`): keys decoded at build.
    receipts: ReceiptState,
    /// The provider registry and what keeps it current (see [`Providers`]).
    providers: Providers,
    /// Provider selection, circuit breakers and rate limits (shared with
    /// the pipeline; `/readyz` shows the circuits).
    router: Arc<crate::routing::Router>,
}

impl App {
    /// Connects to the database (running migrations if configured), creates
    /// missing topics (if configured), builds adapters and binds the HTTP port.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        let pool = store::pool(&settings.database).context("database settings")?;
        if settings.database.migrate_on_start {
            store::migrate(&pool)
                .await
                .context("running database migrations")?;
        }
        if settings.kafka.ensure_topics {
            let all = topics::all_topics(&settings.kafka);
            topics::ensure_topics(&settings.kafka, &all, settings.kafka.topic_partitions)
                .await
                .context("creating topics")?;
        }
        let metrics = Metrics::new();
        let publisher =
            KafkaPublisher::new(&settings.kafka).context("creating the Kafka producer")?;
        crate::domain::check_schemas()
            .map_err(anyhow::Error::msg)
            .context("embedded JSON Schemas")?;
        let files =
            crate::render::FileRenderer::new(&settings.templates).context("loading templates")?;
        let templates = Arc::new(StoreRenderer::new(
            TemplateStore::new(pool.clone()),
            files.clone(),
            &settings.templates,
        ));
        if settings.template_store.enabled
            && let Err(e) = templates.refresh().await
        {
            // Not fatal: the periodic reload retries; until then files serve.
            tracing::warn!(error = %e, "loading stored templates failed");
        }
        let renderer: Arc<dyn Renderer> = if settings.template_store.enabled {
            templates.clone()
        } else {
            Arc::new(files)
        };
        let adapters: Vec<Arc<dyn ChannelAdapter>> =
            channels::build_adapters(&settings).context("creating channel adapters")?;
        let providers = Providers::build(&settings, &pool, &adapters).await?;
        let router = Arc::new(crate::routing::Router::new(
            providers.registry.clone(),
            settings.routing.clone(),
            crate::routing::limiter::Share::default(),
        ));
        let due = DueStore::new(pool.clone());
        let mut pipeline = Pipeline::new(
            NotificationStore::new(
                pool.clone(),
                Duration::from_millis(settings.pipeline.send_lease_ms),
            ),
            renderer,
            router.clone(),
            Arc::new(publisher.clone()) as Arc<dyn OutcomePublisher>,
            due.clone(),
            metrics.clone(),
            &settings.pipeline,
        );
        let policy = Arc::new(Policy::new(
            PreferenceStore::new(pool.clone()),
            settings.policy.clone(),
            Arc::new(SystemClock),
        ));
        if settings.policy.enabled {
            pipeline = pipeline.with_policy(policy.clone());
        }
        let pipeline = Arc::new(pipeline);
        let scheduler = Scheduler::new(
            due,
            pipeline.clone(),
            SchedulerSettings {
                interval: Duration::from_millis(settings.policy.scheduler_interval_ms),
                batch_size: settings.policy.scheduler_batch_size,
                lease: Duration::from_millis(settings.policy.scheduler_lease_ms),
            },
        );
        let receipts = ReceiptState::new(
            pool.clone(),
            Arc::new(publisher.clone()) as Arc<dyn OutcomePublisher>,
            metrics.clone(),
            Some(policy.clone()),
            &settings,
        )
        .context("delivery receipt settings")?;
        let preferences = match &settings.kafka.preference_topic {
            Some(topic) => Some((
                crate::kafka::preferences::consumer(&settings.kafka, topic)
                    .context("creating the preferences consumer")?,
                policy,
            )),
            None => None,
        };
        let consumer =
            RequestConsumer::new(&settings.kafka).context("creating the Kafka consumer")?;
        // Provider rate limits are split by partition ownership.
        let share = router.share().clone();
        let share_gauge = metrics.routing.rate_share.clone();
        consumer.on_assignment(Arc::new(move |owned, total| {
            share.set_partitions(owned, total);
            share_gauge.set(share.get());
        }));
        let listener = tokio::net::TcpListener::bind(&settings.http.bind)
            .await
            .with_context(|| format!("binding the HTTP listener to {}", settings.http.bind))?;
        Ok(App {
            settings,
            pool,
            listener,
            consumer,
            pipeline,
            publisher,
            metrics,
            scheduler,
            preferences,
            templates,
            receipts,
            providers,
            router,
        })
    }

    /// The provider registry: registered providers (kept current while
    /// running) and the built-in ones.
    pub fn registry(&self) -> Arc<Registry> {
        self.providers.registry.clone()
    }

    /// The address the HTTP server listens on (useful with port 0).
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The database pool (tests inspect state through it).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs until `shutdown` resolves (or the consumer fails), then stops
    /// taking messages, drains in-flight work, commits offsets, flushes the
    /// producer and stops the HTTP server.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let token = CancellationToken::new();
        let http_state = HttpState {
            metrics: self.metrics.clone(),
            pool: self.pool.clone(),
            broker_probe: self.consumer.prober(),
            router: Some(self.router.clone()),
            provider_status: Some(self.providers.api.status.clone()),
        };
        let api_state = ApiState {
            pool: self.pool.clone(),
            producer: self.publisher.producer().clone(),
            request_topic: self
                .settings
                .kafka
                .request_topics
                .first()
                .cloned()
                .unwrap_or_default(),
            templates: self.templates.clone(),
            template_store: TemplateStore::new(self.pool.clone()),
            settings: Arc::new(self.settings.clone()),
            providers: self.providers.api.clone(),
        };
        let providers_task = spawn_refresh(
            self.providers.registry.clone(),
            self.providers.loader,
            Duration::from_millis(self.settings.providers.refresh_ms),
            token.child_token(),
        );
        if self.settings.template_store.enabled {
            self.templates.spawn_refresh(
                Duration::from_millis(self.settings.template_store.refresh_ms),
                token.clone(),
            );
        }
        let http_token = token.clone();
        let router = http::router(http_state)
            .merge(api::router(api_state))
            .merge(receipts::router(self.receipts));
        let server = axum::serve(self.listener, router)
            .with_graceful_shutdown(async move { http_token.cancelled().await });
        let http_task = tokio::spawn(async move { server.await });

        let scheduler_task = tokio::spawn(self.scheduler.run(token.child_token()));
        let preferences_task = self.preferences.map(|(consumer, policy)| {
            tokio::spawn(crate::kafka::preferences::run(
                consumer,
                policy,
                self.metrics.clone(),
                token.child_token(),
            ))
        });

        let runtime = tokio::runtime::Handle::current();
        let consumer_token = token.clone();
        let pipeline = self.pipeline.clone();
        let metrics = self.metrics.clone();
        let consumer = self.consumer;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("herald-consumer".into())
            .spawn(move || {
                let r = consumer.run(pipeline, metrics, runtime, consumer_token);
                let _ = done_tx.send(r);
            })
            .context("starting the consumer thread")?;
        tracing::info!(addr = ?self.settings.http.bind, topics = ?self.settings.kafka.request_topics, "herald running");

        let mut done_rx = done_rx;
        let consumer_result = tokio::select! {
            _ = shutdown => {
                tracing::info!("shutdown requested");
                token.cancel();
                (&mut done_rx).await.ok()
            }
            r = &mut done_rx => {
                token.cancel();
                r.ok()
            }
        };
        let _ = scheduler_task.await;
        let _ = providers_task.await;
        if let Some(t) = preferences_task {
            let _ = t.await;
        }
        self.publisher.flush(Duration::from_secs(10));
        let _ = http_task.await;
        match consumer_result {
            Some(Ok(())) | None => Ok(()),
            Some(Err(e)) => Err(anyhow::Error::new(e).context("the Kafka consumer failed")),
        }
    }
}

// --- The provider registry (issue 5) ---------------------------------------

/// The provider registry of one instance: the registry the pipeline selects
/// from, the loader that keeps it current (moved into the refresh task when
/// the app runs) and what the `/v1/providers` API needs.
struct Providers {
    registry: Arc<Registry>,
    loader: RegistryLoader,
    api: ProviderApi,
}

impl Providers {
    /// Checks the encryption key (a bad one stops the start: it could not
    /// read any credentials), registers the `herald.toml` adapters as
    /// built-ins and loads the table once. A database failure here is not
    /// fatal: the refresh task retries.
    async fn build(
        settings: &Settings,
        pool: &PgPool,
        adapters: &[Arc<dyn ChannelAdapter>],
    ) -> anyhow::Result<Providers> {
        let cipher =
            Arc::new(Cipher::from_settings(&settings.providers).context("[providers] settings")?);
        let store = ProviderStore::new(pool.clone());
        let ctx = channels::AdapterContext {
            settings: settings.clone(),
            pool: Some(pool.clone()),
        };
        let registry = Arc::new(Registry::with_builtin(builtin_providers(
            adapters, settings,
        )));
        let mut loader = RegistryLoader::new(store.clone(), cipher.clone(), ctx.clone());
        if let Err(e) = loader.reload(&registry).await {
            tracing::warn!(error = %e, "loading the provider registry failed; retrying in the background");
        }
        let api = ProviderApi {
            store,
            cipher,
            status: loader.status(),
            ctx,
        };
        Ok(Providers {
            registry,
            loader,
            api,
        })
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

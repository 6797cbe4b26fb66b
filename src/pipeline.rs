//! One request through Herald: decode → policy → claim → render → route
//! (providers in order: breaker, rate limit, send, fallback) → persist →
//! publish. [`Pipeline::process`] returns `Ok` once the request's state is
//! durable in PostgreSQL and its outcome events are published: acknowledged
//! by Kafka, or — inside the consumer, which sets an ack collector
//! ([`crate::kafka::acks`]) — enqueued, with the consumer storing the offset
//! only when their acks arrive. An `Err` is always an infrastructure failure
//! (database, broker): the caller retries the message.
//!
//! Bad input is never an `Err`: it becomes a dead letter plus a `rejected`
//! outcome, or a `failed` outcome, and processing moves on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};

use crate::channels::{SendError, SendReceipt};
use crate::config::PipelineSettings;
use crate::domain::{
    CancelRequest, DecodeError, Decoded, DeliveryStatusEvent, ErrorInfo, Notification, Status,
    decode_message, text,
};
use crate::kafka::{OutcomePublisher, PublishError, SourceMessage};
use crate::policy::decide::decide_unmanaged;
use crate::policy::{Decision, Evaluation, Policy};
use crate::render::{RenderedContent, Renderer};
use crate::routing::limiter::WouldWait;
use crate::routing::{Provider, Router};
use crate::store::{AttemptResult, Claim, DueRow, DueStore, NotificationStore, StoreError};
use crate::telemetry::Metrics;

/// Notifications of one batch request processed at once.
const BATCH_CONCURRENCY: usize = 16;

/// Namespace for deterministic event ids of `rejected` outcomes.
const REJECTED_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6865_7261_6c64_2d72_656a_6563_7465_6400);

/// An infrastructure failure: the message must be retried, not skipped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The notification is being sent by another claimer whose lease has
    /// not expired; retrying later either finds it finished or takes it over.
    #[error("notification {0} is being sent by another claimer")]
    SendInProgress(String),
}

impl PipelineError {
    /// Bounded label for metrics.
    pub fn stage(&self) -> &'static str {
        match self {
            PipelineError::Store(_) => "database",
            PipelineError::Publish(_) => "publish",
            PipelineError::SendInProgress(_) => "send_lease",
        }
    }
}

/// Everything needed to process requests.
pub struct Pipeline {
    /// Notifications and delivery attempts.
    store: NotificationStore,
    /// Inline content and templates → subject/text/html.
    renderer: Arc<dyn Renderer>,
    /// Providers per channel, circuit breakers, rate limits, retry rules; a
    /// channel without providers fails its notifications.
    router: Arc<Router>,
    /// Outcome events and dead letters.
    publisher: Arc<dyn OutcomePublisher>,
    metrics: Metrics,
    /// Larger payloads are rejected before parsing.
    max_request_bytes: usize,
    /// Turns to deliver a notification (`pipeline.max_concurrent_deliveries`),
    /// taken before a notification is made from its request.
    deliveries: Arc<tokio::sync::Semaphore>,
    /// Recipient policy; `None`: only the request's own `scheduled_at` and
    /// `expires_at` hold (see [`decide_unmanaged`]).
    policy: Option<Arc<Policy>>,
    /// Due rows: held notifications, retries, cancels, scheduler firing.
    due: DueStore,
}

impl Pipeline {
    pub fn new(
        store: NotificationStore,
        renderer: Arc<dyn Renderer>,
        router: Arc<Router>,
        publisher: Arc<dyn OutcomePublisher>,
        due: DueStore,
        metrics: Metrics,
        settings: &PipelineSettings,
    ) -> Self {
        Pipeline {
            store,
            renderer,
            router,
            publisher,
            metrics,
            max_request_bytes: settings.max_request_bytes,
            deliveries: Arc::new(tokio::sync::Semaphore::new(
                settings.max_concurrent_deliveries.max(1),
            )),
            policy: None,
            due,
        }
    }

    /// Applies `policy` before every send (held notifications wait as due rows).
    pub fn with_policy(mut self, policy: Arc<Policy>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The policy, when one is applied.
    pub fn policy(&self) -> Option<&Arc<Policy>> {
        self.policy.as_ref()
    }

    /// The metrics this pipeline updates.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Processes one Kafka message. See the module docs for the contract.
    pub async fn process(&self, message: &SourceMessage) -> Result<(), PipelineError> {
        self.metrics
            .requests_consumed
            .with_label_values(&[&message.topic])
            .inc();
        let payload = message.payload.as_deref().unwrap_or(&[]);
        let request = match decode_message(payload, self.max_request_bytes) {
            Ok(Decoded::Notify(r)) => *r,
            Ok(Decoded::Cancel(c)) => return self.cancel(&c).await,
            Err(e) => return self.reject(message, &e).await,
        };
        // A notification is made from the request (with its own copy of the
        // content) only once it has a delivery turn: a large batch holds at
        // most BATCH_CONCURRENCY of them, and the instance at most
        // `max_concurrent_deliveries`.
        let notifications = request.into_notifications();
        if notifications.len() == 1 {
            for n in notifications {
                let _turn = self.deliveries.acquire().await.ok();
                self.deliver(n).await?;
            }
            return Ok(());
        }
        let deliveries = self.deliveries.clone();
        let with_turns = futures::stream::unfold(notifications, move |mut rest| {
            let deliveries = deliveries.clone();
            async move {
                if rest.len() == 0 {
                    return None;
                }
                let turn = deliveries.acquire_owned().await.ok();
                rest.next().map(|n| ((turn, n), rest))
            }
        });
        with_turns
            .map(|(turn, n)| async move {
                let _turn = turn;
                self.deliver(n).await
            })
            .buffer_unordered(BATCH_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Cancels the waiting notifications a cancel request names and
    /// publishes a `cancelled` outcome for each (again, unchanged, when the
    /// cancel request is redelivered).
    async fn cancel(&self, c: &CancelRequest) -> Result<(), PipelineError> {
        let events = self
            .due
            .cancel(
                &c.id,
                c.cancels.as_deref(),
                c.correlation_id.as_deref(),
                c.tenant_id.as_deref(),
            )
            .await?;
        tracing::info!(cancel_id = %c.id, cancelled = events.len(), "cancel request");
        for event in &events {
            self.publisher.publish_outcome(event).await?;
            let channel = event.channel.map_or("unknown", |ch| ch.as_str());
            self.metrics
                .outcomes
                .with_label_values(&[channel, event.status.as_str()])
                .inc();
        }
        Ok(())
    }

    /// Dead-letters an undecodable request and publishes `rejected` when its id is known.
    async fn reject(&self, message: &SourceMessage, e: &DecodeError) -> Result<(), PipelineError> {
        tracing::info!(topic = %message.topic, partition = message.partition, offset = message.offset,
            code = e.code.as_str(), error = %e.message, "request rejected");
        self.publisher
            .publish_dead_letter(message, e.code.as_str(), &e.message)
            .await?;
        self.metrics
            .dead_letters
            .with_label_values(&[e.code.as_str()])
            .inc();
        let Some(id) = &e.request_id else {
            return Ok(());
        };
        let mut event = DeliveryStatusEvent::new(Status::Rejected);
        // Deterministic per source position: a redelivery re-publishes the same event id.
        let position = format!("{}/{}/{}", message.topic, message.partition, message.offset);
        event.event_id = uuid::Uuid::new_v5(&REJECTED_NAMESPACE, position.as_bytes()).to_string();
        event.notification_id = Some(id.clone());
        event.request_id = Some(id.clone());
        event.tenant_id = e.tenant_id.clone();
        event.correlation_id = e.correlation_id.clone();
        event.reason = Some(e.code.as_str().to_string());
        event.error = Some(ErrorInfo {
            code: e.code.as_str().to_string(),
            message: e.message.clone(),
            retryable: false,
        });
        self.publish(&event, None).await
    }

    /// Delivers one notification exactly once per claim. With a policy, the
    /// decision comes first: a notification that must wait or must not be
    /// sent is claimed directly with that status and its outcome published;
    /// nothing is sent.
    pub async fn deliver(&self, mut n: Notification) -> Result<(), PipelineError> {
        match self.evaluate(&mut n).await? {
            Evaluation::Decided(Decision::SendNow) => {}
            Evaluation::NoAddress => {
                let provider = provider_name(&self.router.candidates(&n));
                return self.claim_failed(&n, &provider, no_address_error()).await;
            }
            Evaluation::Decided(d) => return self.hold(n, d).await,
        }
        let candidates = self.router.candidates(&n);
        let content = match self.prepare(&n, &candidates) {
            Ok(content) => content,
            Err(error) => {
                let provider = provider_name(&candidates);
                return self.claim_failed(&n, &provider, error).await;
            }
        };
        self.route(&n, &content, &candidates, Start::Claim, 0).await
    }

    /// Fires one due row claimed by the scheduler as `owner`: re-evaluates
    /// expiry and preferences now, then sends through the same render →
    /// send → persist → publish path as a fresh request, or waits again, or
    /// drops it. A row `owner` no longer holds (cancelled meanwhile) is left alone.
    pub async fn fire_due(&self, row: DueRow, owner: &str) -> Result<(), PipelineError> {
        let mut n = row.notification;
        let decision = self.evaluate(&mut n).await?;
        let attempts = u32::try_from(row.attempts).unwrap_or(0);
        let (status, until, reason, error) = match decision {
            Evaluation::Decided(Decision::SendNow) => {
                let candidates = self.router.candidates(&n);
                match self.prepare(&n, &candidates) {
                    Ok(content) => {
                        let start = Start::Due {
                            owner,
                            status: row.status,
                        };
                        return self
                            .route(&n, &content, &candidates, start, row.retries)
                            .await;
                    }
                    Err(error) => (Status::Failed, None, error.code.clone(), Some(error)),
                }
            }
            Evaluation::NoAddress => {
                let e = no_address_error();
                (Status::Failed, None, e.code.clone(), Some(e))
            }
            Evaluation::Decided(Decision::Defer {
                status,
                until,
                reason,
            }) => (status, Some(until), reason.to_string(), None),
            Evaluation::Decided(Decision::Drop { status, reason }) => {
                (status, None, reason.to_string(), None)
            }
        };
        let mut event = DeliveryStatusEvent::for_notification(&n, status, attempts);
        event.reason = Some(reason);
        event.error = error;
        event.next_attempt_at = until;
        // Waiting again exactly as before (e.g. the database clock is a
        // little ahead of ours) is no status change: publish nothing.
        let unchanged = status == row.status && until == row.next_attempt_at;
        let stored = (!unchanged).then_some(&event);
        if self
            .due
            .settle(&n.id, owner, status, until, stored, None)
            .await?
            && !unchanged
        {
            self.publish(&event, Some(&n)).await?;
        }
        Ok(())
    }

    /// The rendered content of `n`, or why it cannot be sent (no provider
    /// for its channel, template error).
    fn prepare(
        &self,
        n: &Notification,
        candidates: &[Arc<Provider>],
    ) -> Result<RenderedContent, ErrorInfo> {
        if candidates.is_empty() {
            return Err(ErrorInfo {
                code: "channel_unavailable".into(),
                message: format!("no active provider is configured for channel {}", n.channel),
                retryable: false,
            });
        }
        self.renderer.render(n).map_err(|e| ErrorInfo {
            code: e.code.as_str().into(),
            message: e.message,
            retryable: false,
        })
    }

    /// Claims `n` as `failed` before any send and publishes the outcome.
    async fn claim_failed(
        &self,
        n: &Notification,
        provider: &str,
        error: ErrorInfo,
    ) -> Result<(), PipelineError> {
        let mut event = DeliveryStatusEvent::for_notification(n, Status::Failed, 0);
        event.reason = Some(error.code.clone());
        event.error = Some(error);
        match self
            .store
            .claim(n, Status::Failed, provider, Some(&event))
            .await?
        {
            Claim::New { .. } => self.publish(&event, Some(n)).await,
            existing => self.already_handled(n, existing).await,
        }
    }

    /// Claims `n` with the policy's waiting or final status (nothing is
    /// sent) and publishes the outcome.
    async fn hold(&self, n: Notification, decision: Decision) -> Result<(), PipelineError> {
        let (status, until, reason) = match decision {
            Decision::SendNow => return Ok(()),
            Decision::Defer {
                status,
                until,
                reason,
            } => (status, Some(until), reason),
            Decision::Drop { status, reason } => (status, None, reason),
        };
        let mut event = DeliveryStatusEvent::for_notification(&n, status, 0);
        event.reason = Some(reason.to_string());
        event.next_attempt_at = until;
        match self.store.claim_decided(&n, status, until, &event).await? {
            Claim::New { .. } => self.publish(&event, Some(&n)).await,
            existing => self.already_handled(&n, existing).await,
        }
    }

    /// What happens to `n` now: the policy's decision, or without a policy
    /// only the request's own schedule and expiry. Counted as a policy
    /// decision unless it is an unmanaged send.
    async fn evaluate(&self, n: &mut Notification) -> Result<Evaluation, PipelineError> {
        let decision = match &self.policy {
            Some(policy) => policy.evaluate(n).await?,
            None => match decide_unmanaged(n, chrono::Utc::now()) {
                Decision::SendNow => return Ok(Evaluation::Decided(Decision::SendNow)),
                d => Evaluation::Decided(d),
            },
        };
        self.count_decision(&decision);
        Ok(decision)
    }

    fn count_decision(&self, e: &Evaluation) {
        let (outcome, reason) = match e {
            Evaluation::NoAddress => ("failed", crate::policy::reason::NO_ADDRESS),
            Evaluation::Decided(d) => d.labels(),
        };
        self.metrics
            .policy_decisions
            .with_label_values(&[outcome, reason])
            .inc();
    }

    /// Opens the first try of `n` with `provider`: claims a fresh
    /// notification (`Start::Claim`) or starts the attempt of a due row.
    async fn open_first(
        &self,
        n: &Notification,
        start: &Start<'_>,
        provider: &str,
    ) -> Result<Opened, PipelineError> {
        match start {
            Start::Claim => match self.store.claim(n, Status::Sending, provider, None).await? {
                Claim::New { attempt } => Ok(Opened::Attempt(attempt)),
                Claim::Existing {
                    status: Status::Sending | Status::Accepted,
                    ..
                } => {
                    // A previous owner stopped between claiming and finishing:
                    // the send may or may not have happened. Send again with
                    // the same idempotency key (the documented at-least-once
                    // window).
                    match self.store.take_over(&n.id, provider).await? {
                        Some(a) => {
                            tracing::info!(notification_id = %n.id, attempt = a, "resuming unfinished send");
                            Ok(Opened::Attempt(a))
                        }
                        // Someone holds the send (lease not expired) or it
                        // just finished: try this message again shortly.
                        None => Err(PipelineError::SendInProgress(n.id.clone())),
                    }
                }
                existing => Ok(Opened::Done(self.already_handled(n, existing).await)),
            },
            Start::Due { owner, .. } => {
                Ok(
                    match self.due.start_attempt(&n.id, owner, provider).await? {
                        Some(a) => Opened::Attempt(a),
                        // Cancelled meanwhile, or the lease was lost.
                        None => Opened::Done(Ok(())),
                    },
                )
            }
        }
    }

    /// Opens the next try of `n` with `provider`. Attempt `current` failed
    /// retryably with `failed`, whose row in the delivery log is written by
    /// the same statement.
    async fn open_next(
        &self,
        n: &Notification,
        current: i32,
        provider: &str,
        failed: Option<AttemptResult>,
    ) -> Result<Opened, PipelineError> {
        match self
            .store
            .next_try(&n.id, current, provider, failed.as_ref())
            .await?
        {
            Some(a) => Ok(Opened::Attempt(a)),
            None => Err(PipelineError::SendInProgress(n.id.clone())),
        }
    }

    /// Tries `candidates` in order until one accepts `n`: a provider whose
    /// circuit is open is skipped, a rate limit is waited for briefly (or
    /// the provider skipped), a retryable failure moves on to the next
    /// provider, a permanent failure ends it. Each try is a row in the
    /// delivery log. When nothing was sent, `n` becomes a due row: `retrying`
    /// with backoff (or `failed` after the last retry), or — when no provider
    /// could even be tried — `throttled` (rate limits) / `retrying` (open
    /// circuits) until one can.
    async fn route(
        &self,
        n: &Notification,
        content: &RenderedContent,
        candidates: &[Arc<Provider>],
        start: Start<'_>,
        retries: i32,
    ) -> Result<(), PipelineError> {
        let rm = &self.metrics.routing;
        let channel = n.channel.as_str();
        let mut attempt: Option<i32> = None;
        // The last retryable failure: its try's result, error and duration.
        // Its row in the delivery log is written with what follows it (the
        // next provider's try, the retry, or the final failure), not alone.
        let mut last: Option<(AttemptResult, SendError, Duration)> = None;
        let mut retry_after: Option<Duration> = None;
        let mut limited: Option<Duration> = None;
        for (i, p) in candidates.iter().enumerate() {
            let name = p.spec.name.as_str();
            if self.router.is_open(name) {
                rm.circuit_skips.with_label_values(&[name]).inc();
                continue;
            }
            match self.router.acquire(&p.spec).await {
                Ok(waited) => rm
                    .rate_limit_wait
                    .with_label_values(&[name])
                    .observe(waited.as_secs_f64()),
                Err(WouldWait(wait)) => {
                    rm.rate_limit_deferrals.with_label_values(&[name]).inc();
                    limited = Some(limited.map_or(wait, |l| l.min(wait)));
                    continue;
                }
            }
            // Half-open: only one trial send; the others skip it.
            if !self.router.allow(name) {
                rm.circuit_skips.with_label_values(&[name]).inc();
                continue;
            }
            let opened = match attempt {
                None => self.open_first(n, &start, name).await,
                Some(current) => {
                    let failed = last.take().map(|(r, _, _)| r);
                    self.open_next(n, current, name, failed).await
                }
            };
            let a = match opened {
                Ok(Opened::Attempt(a)) => a,
                Ok(Opened::Done(r)) => {
                    self.router.release_trial(name);
                    return r;
                }
                Err(e) => {
                    self.router.release_trial(name);
                    return Err(e);
                }
            };
            attempt = Some(a);
            let started = Instant::now();
            let result = p.adapter.send(n, content).await;
            let elapsed = started.elapsed();
            rm.provider_latency
                .with_label_values(&[name])
                .observe(elapsed.as_secs_f64());
            let result_label = match &result {
                Ok(_) => "ok",
                Err(e) if e.is_retryable() => "retryable",
                Err(_) => "permanent",
            };
            self.metrics
                .send_duration
                .with_label_values(&[channel, result_label])
                .observe(elapsed.as_secs_f64());
            let e = match result {
                Ok(receipt) => {
                    if self.router.success(name) {
                        self.update_circuit_gauges();
                    }
                    rm.sends.with_label_values(&[channel, name, "sent"]).inc();
                    return self.finish(n, a, name, Ok(receipt), elapsed).await;
                }
                // Permanent: the provider answered and refused this message;
                // another provider would refuse it too.
                Err(e) if !e.is_retryable() => {
                    if self.router.success(name) {
                        self.update_circuit_gauges();
                    }
                    rm.sends
                        .with_label_values(&[channel, name, "permanent"])
                        .inc();
                    return self.finish(n, a, name, Err(e), elapsed).await;
                }
                Err(e) => e,
            };
            let label = match e {
                SendError::RateLimited { .. } => "rate_limited",
                _ => "retryable",
            };
            rm.sends.with_label_values(&[channel, name, label]).inc();
            if self.router.failure(name) {
                rm.circuit_opened.with_label_values(&[name]).inc();
                self.update_circuit_gauges();
                tracing::warn!(
                    provider = name,
                    "circuit opened: skipping the provider for its cool-down"
                );
            }
            tracing::info!(notification_id = %n.id, provider = name, code = e.code(), error = %e.message(), "send failed; trying the next provider");
            let r = AttemptResult {
                status: Status::Failed,
                provider: name.to_string(),
                provider_message_id: None,
                error: Some(error_info(&e)),
                duration_ms: millis(elapsed),
            };
            retry_after = retry_after.max(e.retry_after());
            if i + 1 < candidates.len() {
                rm.fallbacks.with_label_values(&[channel, name]).inc();
            }
            last = Some((r, e, elapsed));
        }
        match (attempt, last) {
            (Some(a), Some((last_try, e, elapsed))) => {
                let Some(primary) = candidates.first() else {
                    return Ok(());
                };
                let retry = u32::try_from(retries).unwrap_or(0).saturating_add(1);
                let delay = self
                    .router
                    .retry_delay(&primary.spec, retry, retry_after)
                    // A provider that was only rate-limited is free no sooner.
                    .map(|d| limited.map_or(d, |l| d.max(l)));
                match delay {
                    Some(d) => {
                        let until = chrono::Utc::now()
                            + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
                        let error = error_info(&e);
                        let attempt_no = u32::try_from(a).unwrap_or(0);
                        let mut event =
                            DeliveryStatusEvent::for_notification(n, Status::Retrying, attempt_no);
                        event.provider = Some(last_try.provider.clone());
                        event.reason = Some(error.code.clone());
                        event.error = Some(error);
                        event.next_attempt_at = Some(until);
                        if self
                            .due
                            .retry_later(&n.id, a, last_try, until, &event)
                            .await?
                        {
                            rm.retries.with_label_values(&[channel]).inc();
                            self.publish(&event, Some(n)).await?;
                        }
                        Ok(())
                    }
                    None => {
                        rm.retries_exhausted.with_label_values(&[channel]).inc();
                        self.finish(n, a, &last_try.provider, Err(e), elapsed).await
                    }
                }
            }
            _ => match limited {
                // Only rate limits stood in the way: wait for a token as a
                // due row (not a retry: nothing failed).
                Some(wait) => {
                    self.wait_for_provider(n, &start, Status::Throttled, wait, retries)
                        .await
                }
                // Every circuit is open: a failed round without a call.
                None => {
                    let reopen =
                        self.router
                            .reopens_in(candidates)
                            .unwrap_or(Duration::from_millis(
                                self.router.settings().breaker_cooldown_ms,
                            ));
                    let retry = u32::try_from(retries).unwrap_or(0).saturating_add(1);
                    let delay = candidates
                        .first()
                        .and_then(|p| self.router.retry_delay(&p.spec, retry, None));
                    match delay {
                        Some(d) => {
                            self.wait_for_provider(
                                n,
                                &start,
                                Status::Retrying,
                                d.max(reopen),
                                retries + 1,
                            )
                            .await
                        }
                        None => {
                            self.metrics
                                .routing
                                .retries_exhausted
                                .with_label_values(&[channel])
                                .inc();
                            let error = circuit_open_error();
                            match start {
                                Start::Claim => {
                                    let provider = provider_name(candidates);
                                    self.claim_failed(n, &provider, error).await
                                }
                                Start::Due { owner, .. } => {
                                    self.settle_due(n, owner, Status::Failed, None, error).await
                                }
                            }
                        }
                    }
                }
            },
        }
    }

    /// Defers `n` (nothing was tried) until `wait` from now as `status`
    /// (`throttled`: rate limits; `retrying`: open circuits), with its retry
    /// count set to `retries`.
    async fn wait_for_provider(
        &self,
        n: &Notification,
        start: &Start<'_>,
        status: Status,
        wait: Duration,
        retries: i32,
    ) -> Result<(), PipelineError> {
        let error = match status {
            Status::Throttled => None,
            _ => Some(circuit_open_error()),
        };
        let reason = match status {
            Status::Throttled => "provider_rate_limit",
            _ => "circuit_open",
        };
        let until = chrono::Utc::now()
            + chrono::Duration::from_std(wait.max(Duration::from_millis(10)))
                .unwrap_or(chrono::Duration::MAX);
        let mut event = DeliveryStatusEvent::for_notification(n, status, 0);
        event.reason = Some(reason.to_string());
        event.error = error;
        event.next_attempt_at = Some(until);
        // A rate-limit wait is not a retry round: the count is unchanged.
        let counted = (status != Status::Throttled).then_some(retries);
        let published = match start {
            Start::Claim => match self
                .store
                .claim_waiting(n, status, until, &event, retries)
                .await?
            {
                Claim::New { .. } => true,
                existing => return self.already_handled(n, existing).await,
            },
            // Waiting again for a rate limit is no status change: keep the
            // last event and publish nothing.
            Start::Due {
                owner,
                status: before,
            } if *before == Status::Throttled && status == Status::Throttled => {
                self.due
                    .settle(&n.id, owner, status, Some(until), None, None)
                    .await?;
                false
            }
            Start::Due { owner, .. } => {
                self.due
                    .settle(&n.id, owner, status, Some(until), Some(&event), counted)
                    .await?
            }
        };
        if published {
            self.publish(&event, Some(n)).await?;
        }
        Ok(())
    }

    /// Settles a due row this scheduler holds as `status` (final or
    /// waiting), storing and publishing the event.
    async fn settle_due(
        &self,
        n: &Notification,
        owner: &str,
        status: Status,
        until: Option<chrono::DateTime<chrono::Utc>>,
        error: ErrorInfo,
    ) -> Result<(), PipelineError> {
        let mut event = DeliveryStatusEvent::for_notification(n, status, 0);
        event.reason = Some(error.code.clone());
        event.error = Some(error);
        event.next_attempt_at = until;
        if self
            .due
            .settle(&n.id, owner, status, until, Some(&event), None)
            .await?
        {
            self.publish(&event, Some(n)).await?;
        }
        Ok(())
    }

    fn update_circuit_gauges(&self) {
        for (provider, state) in self.router.breaker_states() {
            self.metrics
                .routing
                .circuit_state
                .with_label_values(&[&provider])
                .set(state.gauge());
        }
    }

    /// Records the final try `attempt` of `n` (sent, or failed for good) and
    /// publishes the outcome.
    async fn finish(
        &self,
        n: &Notification,
        attempt: i32,
        provider: &str,
        result: Result<SendReceipt, SendError>,
        elapsed: Duration,
    ) -> Result<(), PipelineError> {
        let provider = provider.to_string();
        let attempt_no = u32::try_from(attempt).unwrap_or(0);
        let (event, attempt_result) = match result {
            Ok(receipt) => {
                // As the schema allows it, or absent (see [`text::identifier`]).
                let message_id = receipt
                    .provider_message_id
                    .and_then(|m| text::identifier(&m, MAX_MESSAGE_ID_CHARS));
                let mut event = DeliveryStatusEvent::for_notification(n, Status::Sent, attempt_no);
                event.provider = Some(provider.clone());
                event.provider_message_id = message_id.clone();
                let r = AttemptResult {
                    status: Status::Sent,
                    provider: provider.clone(),
                    provider_message_id: message_id,
                    error: None,
                    duration_ms: millis(elapsed),
                };
                (event, r)
            }
            Err(e) => {
                tracing::info!(notification_id = %n.id, provider = %provider, code = e.code(), error = %e.message(), "send failed");
                let error = error_info(&e);
                let mut event =
                    DeliveryStatusEvent::for_notification(n, Status::Failed, attempt_no);
                event.provider = Some(provider.clone());
                event.reason = Some(error.code.clone());
                event.error = Some(error.clone());
                let r = AttemptResult {
                    status: Status::Failed,
                    provider: provider.clone(),
                    provider_message_id: None,
                    error: Some(error),
                    duration_ms: millis(elapsed),
                };
                (event, r)
            }
        };
        // The provider has acted: do not let a database blip turn this into a
        // second send. Retry the write here rather than failing the message.
        let mut backoff = Duration::from_millis(50);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self
                .store
                .finish_attempt(&n.id, attempt, &attempt_result, &event)
                .await
            {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(notification_id = %n.id, error = %e, "recording the attempt failed; retrying");
                    self.metrics
                        .infra_retries
                        .with_label_values(&["database"])
                        .inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.publish(&event, Some(n)).await
    }

    /// A redelivered notification: send nothing; re-publish its last outcome
    /// (same `event_id`) so a crash between the database write and the
    /// publish cannot lose the outcome.
    async fn already_handled(&self, n: &Notification, claim: Claim) -> Result<(), PipelineError> {
        self.metrics
            .duplicates
            .with_label_values(&[n.channel.as_str()])
            .inc();
        if let Claim::Existing {
            last_event: Some(event),
            status,
            ..
        } = claim
        {
            tracing::debug!(notification_id = %n.id, %status, "already handled; re-publishing last outcome");
            self.publisher.publish_outcome(&event).await?;
        }
        Ok(())
    }

    async fn publish(
        &self,
        event: &DeliveryStatusEvent,
        n: Option<&Notification>,
    ) -> Result<(), PipelineError> {
        self.publisher.publish_outcome(event).await?;
        let channel = n.map_or("unknown", |n| n.channel.as_str());
        self.metrics
            .outcomes
            .with_label_values(&[channel, event.status.as_str()])
            .inc();
        Ok(())
    }
}

/// How the first try of a notification opens its attempt.
enum Start<'a> {
    /// A fresh request: claim the notification.
    Claim,
    /// A due row the scheduler claimed for `owner`, waiting as `status`.
    Due { owner: &'a str, status: Status },
}

/// What opening the first try found.
enum Opened {
    /// This caller owns attempt N.
    Attempt(i32),
    /// Nothing to send (already handled, cancelled): the result to return.
    Done(Result<(), PipelineError>),
}

/// The first candidate's name (recorded on a notification that fails before
/// any send), `none` without one.
fn provider_name(candidates: &[Arc<Provider>]) -> String {
    candidates
        .first()
        .map_or("none", |p| p.spec.name.as_str())
        .to_string()
}

fn circuit_open_error() -> ErrorInfo {
    ErrorInfo {
        code: "circuit_open".into(),
        message: "every provider for the channel is failing (circuit breakers open)".into(),
        retryable: true,
    }
}

fn no_address_error() -> ErrorInfo {
    ErrorInfo {
        code: crate::policy::reason::NO_ADDRESS.into(),
        message:
            "the request names only a user and the preferences hold no address for the channel"
                .into(),
        retryable: false,
    }
}

/// Longest error message and provider message id an outcome event carries
/// (`schemas/delivery-status.v1.json`).
const MAX_ERROR_MESSAGE_CHARS: usize = 4000;
const MAX_MESSAGE_ID_CHARS: usize = 1000;

/// The outcome's error for `e`. Its message may quote the provider (an SMTP
/// reply, an HTTP body), so it is made printable (see [`text`]).
fn error_info(e: &SendError) -> ErrorInfo {
    ErrorInfo {
        code: e.code().to_string(),
        message: text::printable(e.message(), MAX_ERROR_MESSAGE_CHARS),
        retryable: e.is_retryable(),
    }
}

fn millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_message_quoting_the_provider_is_made_printable() {
        let e = SendError::Permanent {
            code: "smtp_permanent".into(),
            message: "550 no\0pe\r\nX-Injected: 1".into(),
        };
        let info = error_info(&e);
        assert_eq!(info.code, "smtp_permanent");
        assert_eq!(info.message, "550 no pe  X-Injected: 1");
        assert!(!info.retryable);
    }
}

//! Prometheus metrics, registered once per [`Metrics`] (one per `App`, so
//! several apps in one test process do not collide).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Handles to every metric Herald exports.
#[derive(Clone)]
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Requests read from the request topics, by topic.
    pub requests_consumed: IntCounterVec,
    /// Outcome events published, by channel and status.
    pub outcomes: IntCounterVec,
    /// Provider call duration, by channel and result (`ok`, `retryable`, `permanent`).
    pub send_duration: HistogramVec,
    /// Where a request's time goes (`herald_request_stage_seconds{stage}`),
    /// one histogram per [`RequestStage`], resolved once: observed four
    /// times per message.
    pub request_stage: [Histogram; 4],
    /// Records written to the dead-letter topic, by error code.
    pub dead_letters: IntCounterVec,
    /// Messages received from Kafka and not yet settled.
    pub in_flight: IntGauge,
    /// Redelivered requests that sent nothing because they were already handled.
    pub duplicates: IntCounterVec,
    /// Transient infrastructure failures (database, broker) that made a message retry.
    pub infra_retries: IntCounterVec,
    /// Policy decisions, by outcome (`send`, `scheduled`, `deferred`,
    /// `throttled`, `suppressed`, `expired`, `failed`) and reason.
    pub policy_decisions: IntCounterVec,
    /// Due rows (scheduled, deferred, throttled, retrying) whose time has come
    /// and that no scheduler holds: the due-work backlog.
    pub due_depth: IntGauge,
    /// Preference-update events, by result (`applied`, `stale`: older than
    /// the stored record, `invalid`: skipped).
    pub preference_updates: IntCounterVec,
    /// Provider routing: sends per provider, rate limits, retries, circuits.
    pub routing: super::routing::RoutingMetrics,
    /// Delivery-receipt events, by provider (`sendgrid`, `twilio`,
    /// `generic`), receipt status (`delivered`, `bounced`, `soft_bounce`,
    /// `deferred`, `dropped`, `failed`, `spam_complaint`, `unsubscribed`,
    /// `open`, `click`, `accepted`, `other`; `none` for refused requests) and
    /// outcome (`matched`: status changed, `suppressed`: address added with
    /// no status change, `duplicate`, `ignored`, `unmatched`, `pending`:
    /// not sent yet, retry asked; per request: `invalid_signature`,
    /// `malformed`, `unconfigured`).
    pub receipts: IntCounterVec,
}

impl Metrics {
    /// Creates and registers all metrics in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let requests_consumed = counter(
            "herald_requests_consumed_total",
            "Notification requests read from the request topics.",
            &["topic"],
        );
        let outcomes = counter(
            "herald_outcomes_total",
            "Delivery-status events published to the outcome topic.",
            &["channel", "status"],
        );
        let dead_letters = counter(
            "herald_dead_letters_total",
            "Requests written to the dead-letter topic.",
            &["code"],
        );
        let duplicates = counter(
            "herald_duplicate_requests_total",
            "Redelivered notifications that were already handled and sent nothing.",
            &["channel"],
        );
        let infra_retries = counter(
            "herald_infrastructure_retries_total",
            "Transient database or broker failures that made a message retry.",
            &["stage"],
        );
        let policy_decisions = counter(
            "herald_policy_decisions_total",
            "Recipient-policy decisions, by outcome and reason.",
            &["outcome", "reason"],
        );
        let preference_updates = counter(
            "herald_preference_updates_total",
            "Preference-update events consumed, by result (applied, stale, invalid).",
            &["result"],
        );
        let receipts = counter(
            "herald_receipts_total",
            "Delivery-receipt events received, by provider, receipt status and outcome.",
            &["provider", "status", "outcome"],
        );
        let send_duration = HistogramVec::new(
            HistogramOpts::new(
                "herald_send_duration_seconds",
                "Time spent in the channel adapter per send attempt.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["channel", "result"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(send_duration.clone()))
            .expect("metric registered once");
        let request_stage = HistogramVec::new(
            HistogramOpts::new(
                "herald_request_stage_seconds",
                "Time a request spends per stage: fetch (record timestamp to received by \
                 Herald's consumer), queued (received to lane start), process (lane start to \
                 durable and events enqueued), ack (events enqueued to acknowledged by the \
                 broker).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["stage"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(request_stage.clone()))
            .expect("metric registered once");
        let request_stage =
            RequestStage::ALL.map(|st| request_stage.with_label_values(&[st.label()]));
        let in_flight = IntGauge::new(
            "herald_in_flight_messages",
            "Messages received from Kafka and not yet settled.",
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(in_flight.clone()))
            .expect("metric registered once");
        let due_depth = IntGauge::new(
            "herald_due_queue_depth",
            "Due rows waiting for a scheduler (next_attempt_at passed, not leased).",
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(due_depth.clone()))
            .expect("metric registered once");
        let routing = super::routing::RoutingMetrics::register(&registry);
        Metrics {
            routing,
            registry,
            policy_decisions,
            due_depth,
            preference_updates,
            receipts,
            requests_consumed,
            outcomes,
            send_duration,
            request_stage,
            dead_letters,
            in_flight,
            duplicates,
            infra_retries,
        }
    }

    /// Records `took` for one request in `stage`.
    pub fn request_stage(&self, stage: RequestStage, took: std::time::Duration) {
        self.request_stage[stage as usize].observe(took.as_secs_f64());
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The stages of `herald_request_stage_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStage {
    /// Record timestamp → Herald's consumer received it (producer linger,
    /// broker, fetch).
    Fetch = 0,
    /// Received → a lane starts it (waiting for the lane and the runtime).
    Queued = 1,
    /// Lane start → the request is durable and its events are enqueued.
    Process = 2,
    /// Events enqueued → the broker acknowledged them.
    Ack = 3,
}

impl RequestStage {
    const ALL: [RequestStage; 4] = [
        RequestStage::Fetch,
        RequestStage::Queued,
        RequestStage::Process,
        RequestStage::Ack,
    ];

    fn label(self) -> &'static str {
        match self {
            RequestStage::Fetch => "fetch",
            RequestStage::Queued => "queued",
            RequestStage::Process => "process",
            RequestStage::Ack => "ack",
        }
    }
}

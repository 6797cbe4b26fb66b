//! Metrics of provider routing: sends per provider, provider latency, rate
//! limit waits and deferrals, retries, circuit breakers.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Routing metrics, registered in the same registry as the rest.
#[derive(Clone)]
pub struct RoutingMetrics {
    /// Provider calls, by channel, provider and result (`sent`, `retryable`,
    /// `rate_limited`, `permanent`).
    pub sends: IntCounterVec,
    /// Provider call duration, by provider.
    pub provider_latency: HistogramVec,
    /// Time spent waiting for a rate-limit token, by provider.
    pub rate_limit_wait: HistogramVec,
    /// Notifications deferred because a provider's rate limit would have
    /// kept them waiting too long, by provider.
    pub rate_limit_deferrals: IntCounterVec,
    /// Tries that moved on to the next provider after a retryable failure,
    /// by channel and the provider that failed.
    pub fallbacks: IntCounterVec,
    /// Notifications scheduled for a retry (`retrying`), by channel.
    pub retries: IntCounterVec,
    /// Notifications that ran out of retries (`failed`), by channel.
    pub retries_exhausted: IntCounterVec,
    /// Circuit state per provider: 0 closed, 1 open, 2 half-open.
    pub circuit_state: IntGaugeVec,
    /// Times a provider's circuit opened.
    pub circuit_opened: IntCounterVec,
    /// Providers skipped because their circuit was open.
    pub circuit_skips: IntCounterVec,
    /// This instance's share of every provider's rate limit (owned / all
    /// request partitions).
    pub rate_share: prometheus::Gauge,
}

impl RoutingMetrics {
    pub fn register(registry: &Registry) -> RoutingMetrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets),
                &["provider"],
            )
            .expect("valid metric definition");
            registry
                .register(Box::new(h.clone()))
                .expect("metric registered once");
            h
        };
        let circuit_state = IntGaugeVec::new(
            Opts::new(
                "herald_provider_circuit_state",
                "Circuit breaker state per provider: 0 closed, 1 open, 2 half-open.",
            ),
            &["provider"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(circuit_state.clone()))
            .expect("metric registered once");
        let rate_share = prometheus::Gauge::new(
            "herald_provider_rate_share",
            "This instance's share of provider rate limits (owned / all request partitions).",
        )
        .expect("valid metric definition");
        rate_share.set(1.0);
        registry
            .register(Box::new(rate_share.clone()))
            .expect("metric registered once");
        RoutingMetrics {
            rate_share,
            sends: counter(
                "herald_provider_sends_total",
                "Provider calls, by channel, provider and result.",
                &["channel", "provider", "result"],
            ),
            provider_latency: histogram(
                "herald_provider_latency_seconds",
                "Provider call duration.",
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            ),
            rate_limit_wait: histogram(
                "herald_rate_limit_wait_seconds",
                "Time a send waited for its provider's rate limit.",
                vec![0.0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0],
            ),
            rate_limit_deferrals: counter(
                "herald_rate_limit_deferrals_total",
                "Notifications deferred as due rows because the rate-limit wait was too long.",
                &["provider"],
            ),
            fallbacks: counter(
                "herald_provider_fallbacks_total",
                "Retryable failures after which the next provider was tried.",
                &["channel", "provider"],
            ),
            retries: counter(
                "herald_retries_scheduled_total",
                "Notifications whose providers all failed, scheduled to retry.",
                &["channel"],
            ),
            retries_exhausted: counter(
                "herald_retries_exhausted_total",
                "Notifications that failed after their last retry.",
                &["channel"],
            ),
            circuit_state,
            circuit_opened: counter(
                "herald_provider_circuit_opened_total",
                "Times a provider's circuit breaker opened.",
                &["provider"],
            ),
            circuit_skips: counter(
                "herald_provider_circuit_skips_total",
                "Sends that skipped a provider because its circuit was open.",
                &["provider"],
            ),
        }
    }
}

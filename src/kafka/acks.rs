//! Broker acknowledgements of outcome events and dead letters, collected per
//! request so the lane that processed it does not wait for them.
//!
//! The consumer runs [`crate::pipeline::Pipeline::process`] inside
//! [`AckCollector::scope`]. While a collector is set, the publisher only
//! *enqueues* a record to the producer and hands its delivery future to the
//! collector ([`route`]); `process` returns as soon as the request's state
//! is durable in PostgreSQL and its events are enqueued, and the lane takes
//! its next message. The consumer then awaits [`AckCollector::settle`] and
//! only then marks the offset done, so "offset stored only after durable and
//! acknowledged" still holds. Without a collector (the due-work scheduler, the
//! CLI) [`route`] awaits the acknowledgement in place, as before.
//!
//! A dead letter is published at most once per collector: a request that is
//! processed again (its outcome's publish failed) does not produce a second
//! dead letter when the first one was enqueued and not known to have failed.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use super::PublishError;

tokio::task_local! {
    static COLLECTOR: AckCollector;
}

/// A pending broker acknowledgement.
pub type AckFuture = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

/// What an acknowledgement is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// An outcome event (re-publishing it is harmless: same event id).
    Outcome,
    /// A dead letter (published once per request where possible).
    DeadLetter,
}

/// Where the dead letter of the request being processed stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum DeadLetter {
    /// None published (or the last one failed).
    #[default]
    None,
    /// Enqueued, acknowledgement pending.
    Enqueued,
    /// Acknowledged by the broker.
    Acked,
}

#[derive(Default)]
struct Inner {
    /// Acknowledgements not yet awaited.
    pending: Vec<(AckKind, AckFuture)>,
    dead_letter: DeadLetter,
}

/// The acknowledgements of one request (cheap to clone: shared).
#[derive(Clone, Default)]
pub struct AckCollector {
    inner: Arc<Mutex<Inner>>,
}

impl AckCollector {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain data: a panic while holding the lock leaves it consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `fut` with this collector as the current one: publishes inside
    /// it enqueue and return without waiting for the broker.
    pub async fn scope<F: Future>(&self, fut: F) -> F::Output {
        COLLECTOR.scope(self.clone(), fut).await
    }

    /// Adds a pending acknowledgement.
    pub fn push(&self, kind: AckKind, ack: AckFuture) {
        let mut g = self.lock();
        if kind == AckKind::DeadLetter {
            g.dead_letter = DeadLetter::Enqueued;
        }
        g.pending.push((kind, ack));
    }

    /// Acknowledgements added and not yet settled.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// True when a dead letter was enqueued or acknowledged for this request
    /// (and has not failed): another one would be a duplicate.
    pub fn dead_letter_published(&self) -> bool {
        self.lock().dead_letter != DeadLetter::None
    }

    /// Awaits every pending acknowledgement (all of them, even after a
    /// failure, so the dead-letter state is exact). Returns the first error.
    pub async fn settle(&self) -> Result<(), PublishError> {
        let pending = std::mem::take(&mut self.lock().pending);
        let (kinds, futs): (Vec<AckKind>, Vec<AckFuture>) = pending.into_iter().unzip();
        let results = futures::future::join_all(futs).await;
        let mut first_error = None;
        let mut g = self.lock();
        for (kind, r) in kinds.into_iter().zip(results) {
            match (kind, r) {
                (AckKind::DeadLetter, Ok(())) => g.dead_letter = DeadLetter::Acked,
                (AckKind::DeadLetter, Err(e)) => {
                    if g.dead_letter == DeadLetter::Enqueued {
                        g.dead_letter = DeadLetter::None;
                    }
                    first_error.get_or_insert(e);
                }
                (AckKind::Outcome, Ok(())) => {}
                (AckKind::Outcome, Err(e)) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The collector of the task being processed, if any.
pub fn current() -> Option<AckCollector> {
    COLLECTOR.try_with(AckCollector::clone).ok()
}

/// Hands an enqueued record's acknowledgement to the current collector and
/// returns at once, or, without a collector, waits for it here.
pub async fn route(kind: AckKind, ack: AckFuture) -> Result<(), PublishError> {
    match current() {
        Some(c) => {
            c.push(kind, ack);
            Ok(())
        }
        None => ack.await,
    }
}

/// True when the request being processed already has a dead letter on its
/// way or delivered (see [`AckCollector::dead_letter_published`]).
pub fn dead_letter_already_published() -> bool {
    current().is_some_and(|c| c.dead_letter_published())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::error::KafkaError;
    use tokio::sync::oneshot;

    fn ack() -> (oneshot::Sender<bool>, AckFuture) {
        let (tx, rx) = oneshot::channel::<bool>();
        let fut = Box::pin(async move {
            match rx.await {
                Ok(true) => Ok(()),
                _ => Err(PublishError::Kafka(KafkaError::Canceled)),
            }
        });
        (tx, fut)
    }

    #[tokio::test]
    async fn route_without_a_collector_waits_for_the_ack() {
        let (tx, fut) = ack();
        let routed = tokio::spawn(route(AckKind::Outcome, fut));
        tokio::task::yield_now().await;
        assert!(!routed.is_finished());
        tx.send(true).unwrap();
        assert!(routed.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn route_inside_a_collector_returns_at_once_and_settle_waits() {
        let c = AckCollector::new();
        let (tx, fut) = ack();
        c.scope(async { route(AckKind::Outcome, fut).await.unwrap() })
            .await;
        assert_eq!(c.pending(), 1);
        let settling = tokio::spawn({
            let c = c.clone();
            async move { c.settle().await }
        });
        tokio::task::yield_now().await;
        assert!(!settling.is_finished());
        tx.send(true).unwrap();
        assert!(settling.await.unwrap().is_ok());
        assert_eq!(c.pending(), 0);
    }

    #[tokio::test]
    async fn settle_reports_a_failure_after_awaiting_everything() {
        let c = AckCollector::new();
        let (tx1, f1) = ack();
        let (tx2, f2) = ack();
        c.push(AckKind::Outcome, f1);
        c.push(AckKind::DeadLetter, f2);
        tx1.send(false).unwrap();
        tx2.send(true).unwrap();
        assert!(c.settle().await.is_err());
        // The dead letter made it: a re-run must not publish it again.
        assert!(c.dead_letter_published());
    }

    #[tokio::test]
    async fn a_failed_dead_letter_may_be_published_again() {
        let c = AckCollector::new();
        assert!(!c.dead_letter_published());
        let (tx, f) = ack();
        c.push(AckKind::DeadLetter, f);
        assert!(c.dead_letter_published());
        assert!(
            c.scope(async { dead_letter_already_published() }).await,
            "visible through the task-local"
        );
        tx.send(false).unwrap();
        assert!(c.settle().await.is_err());
        assert!(!c.dead_letter_published());
    }

    #[tokio::test]
    async fn no_collector_outside_a_scope() {
        assert!(current().is_none());
        assert!(!dead_letter_already_published());
    }
}

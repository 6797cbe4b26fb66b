//! Webhook adapter (being written).

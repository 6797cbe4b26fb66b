//! Rendering: a notification's content (inline or a template) → subject, text, html.
//!
//! PLACEHOLDER: being written.

use serde::{Deserialize, Serialize};

/// Rendered content, ready for a channel adapter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedContent {
    pub subject: Option<String>,
    pub text: Option<String>,
    pub html: Option<String>,
    /// For webhook/in-app: the template's data (or empty object), passed through.
    pub data: serde_json::Value,
}

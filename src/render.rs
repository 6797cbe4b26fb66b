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

use crate::domain::Notification;

/// Bounded set of render failure codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenderErrorCode {
    TemplateNotFound,
    TemplateError,
}

impl RenderErrorCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            RenderErrorCode::TemplateNotFound => "template_not_found",
            RenderErrorCode::TemplateError => "template_error",
        }
    }
}

/// Why a notification could not be rendered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RenderError {
    pub code: RenderErrorCode,
    pub message: String,
}

/// Renders a notification's content.
pub trait Renderer: Send + Sync {
    fn render(&self, n: &Notification) -> Result<RenderedContent, RenderError>;
}

/// Builds the renderer configured by `settings`.
pub fn build(
    _settings: &crate::config::TemplateSettings,
) -> Result<std::sync::Arc<dyn Renderer>, RenderError> {
    Err(RenderError {
        code: RenderErrorCode::TemplateError,
        message: "renderer not wired".into(),
    })
}

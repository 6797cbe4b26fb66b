//! SMTP adapter (being written).

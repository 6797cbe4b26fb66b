//! Domain types: the one place raw input becomes valid Herald values.
//!
//! Everything after [`decode::decode_request`] works with these types: an
//! [`EmailAddress`] is known to be a syntactically valid address, a
//! [`PhoneNumber`] is E.164, a [`WebhookUrl`] is an absolute http(s) URL.

pub mod decode;
pub mod outcome;
pub mod recipient;
pub mod request;
pub mod text;

pub use decode::{
    CancelRequest, DecodeError, DecodeErrorCode, Decoded, check_schemas, decode_message,
    decode_request, validate_delivery_status,
};
pub use outcome::{DeliveryStatusEvent, ErrorInfo, Status};
pub use recipient::{EmailAddress, PhoneNumber, Recipient, WebhookUrl};
pub use request::{
    Channel, Content, InlineContent, Meta, Notification, NotificationRequest, Priority, TemplateRef,
};

//! The wire contracts in `schemas/` against their examples and against what
//! the code produces: every example under `schemas/examples/` is accepted,
//! every one under `schemas/examples/invalid/` is refused (with the code its
//! file name names), and every published `Status` serializes to a valid
//! delivery-status event. Generic delivery receipts (`receipt-*`) are checked
//! against `receipt.v1.json` and the parser `/webhooks/generic` uses.

use std::path::{Path, PathBuf};

use chrono::{TimeZone, Utc};
use herald::domain::{
    Channel, DecodeErrorCode, DeliveryStatusEvent, ErrorInfo, Status, check_schemas,
    decode_request, validate_delivery_status,
};
use herald::http::receipts::{parse_generic, validate_receipt};

const MAX: usize = 1024 * 1024;

fn examples(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", root.display());
    files
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

fn code_str(c: DecodeErrorCode) -> &'static str {
    c.as_str()
}

#[test]
fn schemas_compile() {
    check_schemas().unwrap();
}

#[test]
fn valid_examples_are_accepted() {
    let mut requests = 0;
    let mut statuses = 0;
    let mut receipts = 0;
    for path in examples("schemas/examples") {
        let bytes = std::fs::read(&path).unwrap();
        let n = name(&path);
        if n.starts_with("request-") {
            if let Err(e) = decode_request(&bytes, MAX) {
                panic!("{n}: {e}");
            }
            requests += 1;
        } else if n.starts_with("status-") {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            if let Err(e) = validate_delivery_status(&v) {
                panic!("{n}: {e}");
            }
            // And the Rust type reads it back.
            let _: DeliveryStatusEvent = serde_json::from_value(v).unwrap();
            statuses += 1;
        } else if n.starts_with("receipt-") {
            if let Err(e) = parse_generic(&bytes) {
                panic!("{n}: {e}");
            }
            receipts += 1;
        } else {
            panic!("{n}: example names start with request-, status- or receipt-");
        }
    }
    assert!(requests >= 5 && statuses >= 3 && receipts >= 3);
}

/// Invalid request examples are named `request-<code>-<what>.json`; the
/// decoder must refuse them with exactly that code.
#[test]
fn invalid_examples_are_refused() {
    for path in examples("schemas/examples/invalid") {
        let bytes = std::fs::read(&path).unwrap();
        let n = name(&path);
        if let Some(rest) = n.strip_prefix("request-") {
            let expected = rest.split('-').next().unwrap();
            match decode_request(&bytes, MAX) {
                Ok(r) => panic!("{n}: accepted: {r:?}"),
                Err(e) => {
                    eprintln!("{n}: {e}");
                    assert_eq!(code_str(e.code), expected, "{n}: {e}");
                }
            }
        } else if n.starts_with("status-") {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert!(validate_delivery_status(&v).is_err(), "{n}: accepted");
        } else if n.starts_with("receipt-") {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert!(validate_receipt(&v).is_err(), "{n}: accepted");
            assert!(parse_generic(&bytes).is_err(), "{n}: parsed");
        } else {
            panic!("{n}: example names start with request-, status- or receipt-");
        }
    }
}

fn full_event(status: Status) -> DeliveryStatusEvent {
    let mut e = DeliveryStatusEvent::new(status);
    e.notification_id = Some("req-1:3".into());
    e.request_id = Some("req-1".into());
    e.tenant_id = Some("acme".into());
    e.channel = Some(Channel::InApp);
    e.provider = Some("smtp-primary".into());
    e.provider_message_id = Some("<abc@x>".into());
    e.attempt = u32::MAX;
    e.reason = Some("quiet_hours".into());
    e.error = Some(ErrorInfo {
        code: "http_status".into(),
        message: "503".into(),
        retryable: true,
    });
    e.next_attempt_at = Some(Utc.with_ymd_and_hms(2030, 1, 1, 7, 0, 0).unwrap());
    e.correlation_id = Some("trace-1".into());
    e
}

#[test]
fn every_published_status_event_validates() {
    let published: Vec<Status> = Status::ALL
        .into_iter()
        .filter(Status::is_published)
        .collect();
    assert_eq!(published.len(), 12);
    for status in published {
        for event in [DeliveryStatusEvent::new(status), full_event(status)] {
            let v = serde_json::to_value(&event).unwrap();
            if let Err(e) = validate_delivery_status(&v) {
                panic!("{status}: {e}\n{v}");
            }
        }
    }
}

#[test]
fn internal_statuses_are_not_on_the_wire() {
    for status in [Status::Accepted, Status::Sending] {
        let v = serde_json::to_value(DeliveryStatusEvent::new(status)).unwrap();
        assert!(validate_delivery_status(&v).is_err(), "{status}");
    }
}

#[test]
fn status_spellings_agree_with_serde_and_parse() {
    for status in Status::ALL {
        let wire = serde_json::to_value(status).unwrap();
        assert_eq!(wire, serde_json::Value::from(status.as_str()));
        assert_eq!(Status::parse(status.as_str()), Some(status));
    }
    assert!(Status::Cancelled.is_final());
}

#[test]
fn rejected_event_of_every_invalid_request_validates() {
    for path in examples("schemas/examples/invalid") {
        if !name(&path).starts_with("request-") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let err = decode_request(&bytes, MAX).unwrap_err();
        let v = serde_json::to_value(err.to_rejected_event()).unwrap();
        if let Err(e) = validate_delivery_status(&v) {
            panic!("{}: {e}\n{v}", name(&path));
        }
    }
}

//! SQL interface of the grouping engine (crates/fingerprint).
use fraiseql_fingerprint::{
    custom_fingerprint, default_fingerprint, message_fingerprint, stacktrace, title_and_culprit,
    ALGORITHM_VERSION,
};
use pgrx::prelude::*;

// ---------------------------------------------------------------------------
// SQL interface
// ---------------------------------------------------------------------------

/// The fingerprint capture uses when no custom fingerprint is given.
#[pg_extern(immutable, parallel_safe)]
fn fraiseql_fingerprint(
    exception_type: Option<&str>,
    message: Option<&str>,
    stack_trace: Option<&str>,
) -> String {
    default_fingerprint(
        exception_type.unwrap_or(""),
        message.unwrap_or(""),
        stack_trace,
    )
}

/// The grouping algorithm version written with new groups.
#[pg_extern(immutable, parallel_safe)]
fn fraiseql_fingerprint_version() -> i32 {
    ALGORITHM_VERSION
}

/// What grouping sees in a stack trace: language, frames, culprit.
#[pg_extern(immutable, strict, parallel_safe)]
fn fraiseql_parse_stack_trace(stack_trace: &str) -> pgrx::JsonB {
    let parsed = stacktrace::parse(stack_trace);
    let culprit = parsed
        .culprit()
        .map(|f| format!("{} in {}", f.module, f.function));
    let in_app = parsed.frames.iter().filter(|f| f.in_app).count();
    pgrx::JsonB(serde_json::json!({
        "language": parsed.language.name(),
        "frames": parsed.frames,
        "in_app_frames": in_app,
        "culprit": culprit,
    }))
}

/// The group key of one capture: custom fingerprint (argument, then the
/// context's "fingerprint" array) over the default.
pub fn group_fingerprint(
    exception_type: &str,
    message: &str,
    stack_trace: Option<&str>,
    fingerprint: Option<&str>,
    context_fingerprint: Option<pgrx::JsonB>,
    is_message: bool,
) -> String {
    let default = if is_message {
        message_fingerprint(message)
    } else {
        default_fingerprint(exception_type, message, stack_trace)
    };
    if let Some(fp) = fingerprint {
        if fp.trim().is_empty() {
            crate::error::ObsError::invalid("fingerprint", "must not be empty when given").report();
        }
        return custom_fingerprint(&default, &[fp.to_string()]).unwrap_or(default);
    }
    if let Some(pgrx::JsonB(v)) = context_fingerprint {
        let parts: Vec<String> = match v {
            serde_json::Value::Array(items) => items
                .into_iter()
                .map(|i| match i {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                })
                .collect(),
            serde_json::Value::String(s) => vec![s],
            serde_json::Value::Null => vec![],
            _ => crate::error::ObsError::invalid(
                "context",
                "\"fingerprint\" must be an array of strings",
            )
            .report(),
        };
        if let Some(fp) = custom_fingerprint(&default, &parts) {
            return fp;
        }
    }
    default
}

/// Title and culprit of a new group.
#[pg_extern(immutable, parallel_safe)]
fn _fraiseql_group_meta(
    exception_type: &str,
    message: &str,
    stack_trace: Option<&str>,
) -> pgrx::JsonB {
    let (title, culprit) = title_and_culprit(exception_type, message, stack_trace);
    pgrx::JsonB(serde_json::json!({ "title": title, "culprit": culprit }))
}

/// The namespace of error ids (a UUIDv5 of the fingerprint in it).
const ERROR_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6f0d_3c1e_8a4b_5f27_9d31_c2e8_4a6b_7f10);

/// A group's id: derived from its fingerprint, so capture needs no lookup.
pub fn error_id(fingerprint: &str) -> [u8; 16] {
    *uuid::Uuid::new_v5(&ERROR_ID_NAMESPACE, fingerprint.as_bytes()).as_bytes()
}

/// `fraiseql_error_id(fingerprint)`: the error_id of the group a fingerprint
/// belongs to (tb_error_log.error_id is generated from it). Declared in
/// sql/schema.sql, which the table needs before any other function exists.
#[pg_extern(immutable, strict, parallel_safe, sql = false)]
fn fraiseql_error_id(fingerprint: &str) -> pgrx::Uuid {
    pgrx::Uuid::from_bytes(error_id(fingerprint))
}

/// `fraiseql_release_key(release)`: a text that sorts as semantic versions
/// do (`v1.10.0` after `v1.9.0`, a pre-release before its release; an
/// optional `package@` prefix and `v` ignored), NULL for a release that is
/// not one (those are ordered by when they were first seen, tb_release).
#[pg_extern(immutable, strict, parallel_safe)]
fn fraiseql_release_key(release: &str) -> Option<String> {
    fraiseql_fingerprint::release::release_key(release)
}

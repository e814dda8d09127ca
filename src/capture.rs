//! Capture helpers (used by src/capture_path.rs): argument validation with
//! clear errors, id normalization, size limits.
use crate::error::ObsError;

/// Limits of the short texts of a capture (longer values are cut, with a
/// marker, before fingerprinting). Sentry's own: environment 64, release 200.
pub const MAX_TYPE_BYTES: usize = 512;
pub const MAX_ENVIRONMENT_BYTES: usize = 64;
pub const MAX_RELEASE_BYTES: usize = 200;
pub const MAX_FINGERPRINT_BYTES: usize = 1024;
/// dropped-key lists of a reduced context: so many names, each so long
const MAX_DROPPED_KEYS: usize = 20;
const MAX_DROPPED_KEY_BYTES: usize = 64;

pub const SEVERITIES: [&str; 5] = ["debug", "info", "warning", "error", "critical"];

/// Checks the capture arguments; the error names the first bad one.
pub fn validate(
    exception_type: Option<&str>,
    message: Option<&str>,
    context_type: Option<&str>,
    severity: Option<&str>,
    has_time: bool,
) -> Result<(), ObsError> {
    if exception_type.is_none_or(|s| s.trim().is_empty()) {
        return Err(ObsError::MissingArgument {
            argument: "exception_type",
        });
    }
    if message.is_none_or(|s| s.trim().is_empty()) {
        return Err(ObsError::MissingArgument {
            argument: "message",
        });
    }
    // context_type is jsonb_typeof(context): the value itself is not copied here
    match context_type {
        None | Some("object") => {}
        Some(kind) => {
            return Err(ObsError::invalid(
                "context",
                format!("must be a JSON object, got {kind}"),
            ))
        }
    }
    match severity {
        Some(s) if SEVERITIES.contains(&s) => {}
        Some(s) => {
            return Err(ObsError::invalid(
                "severity",
                format!("must be one of debug, info, warning, error, critical, got \"{s}\""),
            ))
        }
        None => {
            return Err(ObsError::MissingArgument {
                argument: "severity",
            })
        }
    }
    if !has_time {
        return Err(ObsError::MissingArgument {
            argument: "occurred_at",
        });
    }
    Ok(())
}

/// W3C trace ids are 32 lowercase hex digits, span ids 16; all-zero is invalid.
pub fn normalize_id(value: &str, kind: &'static str) -> Result<String, ObsError> {
    let want = match kind {
        "trace_id" => 32,
        _ => 16,
    };
    let v = value.trim();
    if v.len() != want || !v.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(ObsError::invalid(
            kind,
            format!("must be {want} hexadecimal digits, got \"{}\"", preview(v)),
        ));
    }
    if v.bytes().all(|c| c == b'0') {
        return Err(ObsError::invalid(kind, "must not be all zeros"));
    }
    Ok(v.to_ascii_lowercase())
}

fn preview(s: &str) -> String {
    if s.chars().count() > 40 {
        s.chars().take(40).collect::<String>() + "…"
    } else {
        s.to_string()
    }
}

/// Cuts `text` to at most `max` bytes keeping its head and tail (a stack
/// trace's failing frame is at one end or the other depending on the
/// language), with a visible marker in the middle.
pub fn clip_text(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let omitted_hint = text.len() - max;
    let marker = format!("\n… [fraiseql_obs: {omitted_hint} bytes truncated] …\n");
    let budget = max.saturating_sub(marker.len());
    let head_len = floor_char_boundary(text, budget / 2);
    let tail_start = ceil_char_boundary(text, text.len() - (budget - head_len));
    format!("{}{}{}", &text[..head_len], marker, &text[tail_start..]).into()
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Reduces a context to at most `max` bytes of JSON: keeps whole top-level keys
/// (smallest first) while they fit, clips long strings, and records what was
/// dropped under "_fraiseql_truncated".
pub fn clip_context(
    ctx: serde_json::Map<String, serde_json::Value>,
    max: usize,
) -> serde_json::Value {
    let original = serde_json::to_string(&ctx).map(|s| s.len()).unwrap_or(0);
    if original <= max {
        return serde_json::Value::Object(ctx);
    }
    let reserve = 200;
    let budget = max.saturating_sub(reserve);
    let mut entries: Vec<(String, serde_json::Value, usize)> = ctx
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) if s.len() > budget / 4 => {
                    serde_json::Value::String(clip_text(&s, budget / 4).into_owned())
                }
                other => other,
            };
            let size = k.len() + serde_json::to_string(&v).map(|s| s.len()).unwrap_or(0) + 4;
            (k, v, size)
        })
        .collect();
    entries.sort_by_key(|e| e.2);
    let mut kept = serde_json::Map::new();
    let mut used = 0;
    let mut dropped = Vec::new();
    for (k, v, size) in entries {
        if used + size <= budget {
            used += size;
            kept.insert(k, v);
        } else {
            if dropped.len() < MAX_DROPPED_KEYS {
                dropped.push(serde_json::Value::String(
                    clip_text(&k, MAX_DROPPED_KEY_BYTES).into_owned(),
                ));
            }
        }
    }
    kept.insert(
        "_fraiseql_truncated".into(),
        serde_json::json!({ "original_bytes": original, "dropped_keys": dropped }),
    );
    serde_json::Value::Object(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_head_and_tail() {
        let s = "A".repeat(1000) + &"Z".repeat(1000);
        let c = clip_text(&s, 500);
        assert!(c.len() <= 500, "{}", c.len());
        assert!(c.starts_with('A') && c.ends_with('Z') && c.contains("bytes truncated"));
        assert_eq!(clip_text("short", 500), "short");
        let u = "é".repeat(1000);
        assert!(clip_text(&u, 301).len() <= 301);
    }

    #[test]
    fn ids() {
        assert_eq!(
            normalize_id("4BF92F3577B34DA6A3CE929D0E0E4736", "trace_id").unwrap(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(normalize_id("00000000000000000000000000000000", "trace_id").is_err());
        assert!(normalize_id("xyz", "span_id")
            .unwrap_err()
            .to_string()
            .contains("span_id"));
    }

    #[test]
    fn validation_names_argument() {
        let e = validate(Some("E"), Some("m"), None, Some("fatal"), true).unwrap_err();
        assert!(e.to_string().contains("severity"));
        let e = validate(Some(" "), Some("m"), None, Some("error"), true).unwrap_err();
        assert!(e.to_string().contains("exception_type"));
        let e = validate(Some("E"), Some("m"), Some("array"), Some("error"), true).unwrap_err();
        assert!(e.to_string().contains("context"));
    }

    #[test]
    fn context_is_reduced_with_marker() {
        let mut m = serde_json::Map::new();
        m.insert("small".into(), serde_json::json!(1));
        m.insert("big".into(), serde_json::json!("x".repeat(100_000)));
        m.insert("list".into(), serde_json::json!(vec![1; 50_000]));
        let out = clip_context(m, 4096);
        let s = serde_json::to_string(&out).unwrap();
        assert!(s.len() <= 4096, "{}", s.len());
        assert_eq!(out["small"], 1);
        assert!(
            out["_fraiseql_truncated"]["original_bytes"]
                .as_u64()
                .unwrap()
                > 100_000
        );
    }
}

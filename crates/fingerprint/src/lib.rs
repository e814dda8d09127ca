//! fraiseql_fingerprint: grouping for fraiseql_obs — which occurrences are the same error.
//! Pure Rust (no PostgreSQL), so it is unit-tested, fuzzed and benchmarked on its own.
//!
//! Algorithm v1, in the spirit of Sentry's grouping:
//! * with a parsable stack trace: the exception type plus, for each in-app
//!   frame (all frames when none is in-app), its module (or file basename)
//!   and normalized function. Never line or column numbers, addresses, path
//!   prefixes or generated-code hashes: a deploy that moves code keeps its
//!   groups, a renamed function makes a new one.
//! * otherwise: the exception type plus the parameterized message.
//!
//! The version is stored with every group (`tb_error_log.fingerprint_version`).
//! Rolling out a v2 must not split groups: during a transition period capture
//! computes both versions and looks the group up by the v2 hash, then by the
//! v1 hash (recording the v2 hash on the group it found), as Sentry does with
//! its "secondary grouping config". Groups created after the transition carry v2.

mod faststr;
pub mod normalize;
pub mod stacktrace;
pub mod release;
pub mod scrub;
pub mod sql;

use sha2::{Digest, Sha256};

pub const ALGORITHM_VERSION: i32 = 1;
const DEFAULT_MARKERS: [&str; 2] = ["{{ default }}", "{{default}}"];
/// Longest custom fingerprint stored verbatim; longer ones are hashed.
const MAX_VERBATIM_FINGERPRINT: usize = 200;

struct Hasher(Sha256);

impl Hasher {
    fn new(kind: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"fraiseql:v1:");
        h.update(kind.as_bytes());
        Hasher(h)
    }
    /// Length-prefixed, so ("ab","c") and ("a","bc") differ.
    fn part(&mut self, s: &str) {
        self.0.update((s.len() as u64).to_le_bytes());
        self.0.update(s.as_bytes());
    }
    fn finish(self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let d = self.0.finalize();
        let mut s = String::with_capacity(32);
        for b in &d[..16] {
            s.push(HEX[(b >> 4) as usize] as char);
            s.push(HEX[(b & 15) as usize] as char);
        }
        s
    }
}

/// The default fingerprint of an exception.
pub fn default_fingerprint(
    exception_type: &str,
    message: &str,
    stack_trace: Option<&str>,
) -> String {
    let exception_type = exception_type.trim();
    if let Some(trace) = stack_trace.filter(|t| !t.trim().is_empty()) {
        let parsed = stacktrace::parse(trace);
        let frames = parsed.grouping_frames();
        if !frames.is_empty() {
            let mut h = Hasher::new("frames");
            h.part(exception_type);
            for f in frames {
                h.part(&f.module);
                h.part(&f.function);
            }
            return h.finish();
        }
        // Text in no known format: still stable, by its parameterized text.
        let mut h = Hasher::new("text");
        h.part(exception_type);
        h.part(&normalize::normalize_message(message));
        h.part(&normalize::normalize_message(trace));
        return h.finish();
    }
    let mut h = Hasher::new("message");
    h.part(exception_type);
    h.part(&normalize::normalize_message(message));
    h.finish()
}

/// The default fingerprint of an exception whose frames come structured
/// (a Sentry event's `stacktrace.frames`, outermost first): the same
/// "frames" hash as a parsed text trace, from each frame's module and
/// function, with the same choice of frames (the in-app ones when there are
/// any, else all; direct recursion collapsed). Without frames, the message
/// decides, as for a capture without a stack trace.
pub fn frames_fingerprint<'a>(
    exception_type: &str,
    message: &str,
    frames: &[(&'a str, &'a str, bool)],
) -> String {
    let exception_type = exception_type.trim();
    let any_in_app = frames.iter().any(|f| f.2);
    let mut chosen: Vec<(&str, &str)> = Vec::new();
    for (module, function, in_app) in frames {
        if !*in_app && any_in_app {
            continue;
        }
        if chosen.last() == Some(&(*module, *function)) {
            continue;
        }
        chosen.push((module, function));
    }
    if chosen.is_empty() {
        return default_fingerprint(exception_type, message, None);
    }
    let mut h = Hasher::new("frames");
    h.part(exception_type);
    for (module, function) in chosen {
        h.part(module);
        h.part(function);
    }
    h.finish()
}

/// Fingerprint of a message captured without an exception.
pub fn message_fingerprint(message: &str) -> String {
    let mut h = Hasher::new("event");
    h.part(&normalize::normalize_message(message));
    h.finish()
}

/// Applies a custom fingerprint (Sentry semantics). A single value without
/// `{{ default }}` is used verbatim (so `WHERE fingerprint = 'payment_error'`
/// works); `{{ default }}` stands for the default fingerprint; several values
/// are hashed together.
pub fn custom_fingerprint(default: &str, parts: &[String]) -> Option<String> {
    let parts: Vec<&str> = parts
        .iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .collect();
    match parts.as_slice() {
        [] => None,
        [one] => {
            let mut s = one.to_string();
            for m in DEFAULT_MARKERS {
                s = s.replace(m, default);
            }
            if s.len() <= MAX_VERBATIM_FINGERPRINT {
                Some(s)
            } else {
                let mut h = Hasher::new("custom");
                h.part(&s);
                Some(h.finish())
            }
        }
        many => {
            let mut h = Hasher::new("custom");
            for p in many {
                h.part(if DEFAULT_MARKERS.contains(p) {
                    default
                } else {
                    p
                });
            }
            Some(h.finish())
        }
    }
}

/// A readable title ("ValueError: invalid literal ...") and the culprit
/// (the innermost in-app frame, "module in function").
pub fn title_and_culprit(
    exception_type: &str,
    message: &str,
    stack_trace: Option<&str>,
) -> (String, Option<String>) {
    let first_line = message.lines().next().unwrap_or("").trim();
    let mut title = if exception_type == "Message" {
        first_line.to_string()
    } else {
        format!("{exception_type}: {first_line}")
    };
    if title.chars().count() > 120 {
        title = title.chars().take(119).collect::<String>() + "…";
    }
    let culprit = stack_trace.and_then(|t| {
        let p = stacktrace::parse(t);
        p.culprit()
            .map(|f| format!("{} in {}", f.module, f.function))
    });
    (title, culprit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom() {
        assert_eq!(
            custom_fingerprint("d", &["payment_error".into()]).unwrap(),
            "payment_error"
        );
        assert_eq!(
            custom_fingerprint("d", &["{{ default }}-x".into()]).unwrap(),
            "d-x"
        );
        let a = custom_fingerprint("d1", &["{{ default }}".into(), "tenant".into()]).unwrap();
        let b = custom_fingerprint("d2", &["{{ default }}".into(), "tenant".into()]).unwrap();
        assert_ne!(a, b);
        assert!(custom_fingerprint("d", &[" ".into()]).is_none());
    }

    #[test]
    fn structured_frames_group_like_parsed_ones() {
        let text = "Traceback (most recent call last):\n  File \"/srv/app/views.py\", line 10, in handler\n    x()\n  File \"/srv/app/models.py\", line 3, in load\n    y()\nKeyError: 'a'";
        let parsed = default_fingerprint("KeyError", "'a'", Some(text));
        let structured = frames_fingerprint(
            "KeyError",
            "'b'",
            &[("views", "handler", true), ("models", "load", true)],
        );
        assert_eq!(parsed, structured);
        // library frames do not count when in-app ones exist; recursion collapses
        assert_eq!(
            structured,
            frames_fingerprint(
                "KeyError",
                "",
                &[
                    ("django.core", "inner", false),
                    ("views", "handler", true),
                    ("models", "load", true),
                    ("models", "load", true),
                ],
            )
        );
        assert_ne!(structured, frames_fingerprint("ValueError", "", &[("views", "handler", true), ("models", "load", true)]));
        // no frame: the message decides
        assert_eq!(frames_fingerprint("E", "User 1 gone", &[]), default_fingerprint("E", "User 2 gone", None));
    }

    #[test]
    fn message_groups() {
        assert_eq!(
            default_fingerprint("NotFound", "User 1234 not found", None),
            default_fingerprint("NotFound", "User 98765 not found", None)
        );
        assert_ne!(
            default_fingerprint("NotFound", "User 1234 not found", None),
            default_fingerprint("KeyError", "User 1234 not found", None)
        );
        assert_ne!(
            message_fingerprint("disk full on /a"),
            message_fingerprint("cache miss storm")
        );
        assert_eq!(
            message_fingerprint("retry 1 of 5"),
            message_fingerprint("retry 2 of 5")
        );
    }

    #[test]
    fn lines_do_not_matter() {
        let a = "Traceback (most recent call last):\n  File \"/srv/r1/app/views.py\", line 10, in handler\nValueError: x";
        let b = "Traceback (most recent call last):\n  File \"/opt/r2/app/views.py\", line 99, in handler\nValueError: y";
        let c = "Traceback (most recent call last):\n  File \"/opt/r2/app/views.py\", line 99, in other\nValueError: y";
        assert_eq!(
            default_fingerprint("ValueError", "x", Some(a)),
            default_fingerprint("ValueError", "y", Some(b))
        );
        assert_ne!(
            default_fingerprint("ValueError", "x", Some(a)),
            default_fingerprint("ValueError", "x", Some(c))
        );
    }
}

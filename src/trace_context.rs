//! W3C trace context for the current transaction: an application sets it
//! once per request and every capture in that transaction carries the trace.
use crate::capture::normalize_id;
use crate::error::ObsError;
use pgrx::prelude::*;

/// Parsed `traceparent`: version-traceid-parentid-flags.
#[derive(Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub span_id: String,
    pub sampled: bool,
}

pub fn parse_traceparent(s: &str) -> Result<TraceParent, ObsError> {
    let bad = |why: &str| {
        ObsError::invalid(
            "traceparent",
            format!(
                "is not a W3C traceparent ({why}): \"{}\"",
                s.chars().take(80).collect::<String>()
            ),
        )
    };
    let parts: Vec<&str> = s.trim().split('-').collect();
    if parts.len() < 4 {
        return Err(bad("expected version-traceid-parentid-flags"));
    }
    let (version, trace, span, flags) = (parts[0], parts[1], parts[2], parts[3]);
    if version.len() != 2
        || !version.bytes().all(|c| c.is_ascii_hexdigit())
        || version.eq_ignore_ascii_case("ff")
    {
        return Err(bad("invalid version"));
    }
    // version 00 has exactly four fields; later versions may append more
    if version == "00" && parts.len() != 4 {
        return Err(bad("version 00 has exactly four fields"));
    }
    if flags.len() != 2 || !flags.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad("invalid flags"));
    }
    let trace_id = normalize_id(trace, "trace_id")
        .map_err(|_| bad("trace id must be 32 hex digits, not all zero"))?;
    let span_id = normalize_id(span, "span_id")
        .map_err(|_| bad("parent id must be 16 hex digits, not all zero"))?;
    let sampled = u8::from_str_radix(flags, 16)
        .map(|f| f & 1 == 1)
        .unwrap_or(false);
    Ok(TraceParent {
        trace_id,
        span_id,
        sampled,
    })
}

/// Sets the trace context for the rest of the transaction (is_local, the
/// default) or of the session.
#[pg_extern(volatile)]
fn fraiseql_set_trace_context(traceparent: &str, is_local: default!(bool, true)) {
    let tp = parse_traceparent(traceparent).unwrap_or_else(|e| e.report());
    Spi::run_with_args(
        "SELECT set_config('fraiseql_obs.trace_id', $1, $3), set_config('fraiseql_obs.span_id', $2, $3)",
        &[tp.trace_id.into(), tp.span_id.into(), is_local.into()],
    )
    .unwrap_or_else(|e| pgrx::error!("fraiseql_obs: could not set the trace context: {e}"));
}

/// The current trace context as a traceparent, or NULL.
#[pg_extern(stable)]
fn fraiseql_current_traceparent() -> Option<String> {
    let trace = crate::guc::text(&crate::guc::TRACE_ID)?;
    let span = crate::guc::text(&crate::guc::SPAN_ID)?;
    Some(format!("00-{trace}-{span}-01"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent() {
        let t =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id, "00f067aa0ba902b7");
        assert!(t.sampled);
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_err()
        );
        assert!(
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01").is_err()
        );
        assert!(
            parse_traceparent("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_err()
        );
        assert!(parse_traceparent("garbage").is_err());
        assert!(
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_err()
        );
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_ok()
        );
    }
}

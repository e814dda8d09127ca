//! The window of event times that is accepted: from the start of the oldest
//! retained partition to the end of the partitions made ahead. A time outside
//! it (or not finite: 'infinity' is a valid timestamptz) would be dropped by
//! the next maintenance, or would make maintenance create a partition per
//! month or day out to it (1970 to 2554 is 200,000 daily partitions). Such
//! events are refused with a clear error (captures, single spans) or rejected
//! one by one (OTLP spans, listed in partialSuccess).
use crate::guc;

const DAY_US: i64 = 86_400_000_000;
/// months counted generously: a window never refuses a time the partitions cover
const MONTH_US: i64 = 31 * DAY_US;
/// PostgreSQL's epoch (2000-01-01) in Unix microseconds
const PG_EPOCH_US: i64 = 946_684_800_000_000;

pub enum Granularity {
    /// error occurrences: monthly partitions
    Month,
    /// spans and metrics: daily partitions
    Day,
}

/// Unix microseconds of the transaction's start.
fn now_us() -> i64 {
    unsafe { pgrx::pg_sys::GetCurrentTransactionStartTimestamp() + PG_EPOCH_US }
}

/// [lo, hi) in Unix microseconds.
pub fn window(g: Granularity) -> (i64, i64) {
    let now = now_us();
    let (keep, ahead, unit) = match g {
        Granularity::Month => (
            guc::ERROR_RETENTION_MONTHS.get(),
            guc::PREMAKE_MONTHS.get(),
            MONTH_US,
        ),
        Granularity::Day => (
            guc::TRACE_RETENTION_DAYS.get(),
            guc::PREMAKE_DAYS.get(),
            DAY_US,
        ),
    };
    // 0 keeps forever: then only the Unix epoch bounds the past
    let lo = if keep > 0 {
        now - (keep as i64 + 1) * unit
    } else {
        0
    };
    let hi = now + (ahead.max(0) as i64 + 1) * unit;
    (lo, hi)
}

/// Why a time (Unix microseconds; i64::MIN/MAX for -infinity/infinity) is
/// not accepted, or None.
pub fn refusal(t_us: i64, g: Granularity) -> Option<String> {
    if t_us == i64::MIN || t_us == i64::MAX || t_us <= i64::MIN + PG_EPOCH_US {
        return Some("must be a finite time".into());
    }
    let what = match g {
        Granularity::Month => "error_retention_months / premake_months",
        Granularity::Day => "trace_retention_days / premake_days",
    };
    let (lo, hi) = window(g);
    if t_us < lo {
        Some(format!(
            "is older than what is retained ({what}); it would be dropped at once"
        ))
    } else if t_us >= hi {
        Some(format!(
            "is too far in the future (beyond the partitions made ahead, {what})"
        ))
    } else {
        None
    }
}

/// The same for a PostgreSQL timestamptz (microseconds since 2000-01-01).
pub fn refusal_pg(t_pg: i64, g: Granularity) -> Option<String> {
    match t_pg.checked_add(PG_EPOCH_US) {
        Some(t) if t_pg != i64::MIN && t_pg != i64::MAX => refusal(t, g),
        _ => Some("must be a finite time".into()),
    }
}
